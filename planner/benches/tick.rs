//! Planner tick cost: one `tick` = three auto-ARIMA fits (requests, mean ISL, mean OSL) on a
//! sliding window of 50 plus sizing. Driven by the Azure conversation trace at 10 s intervals.
//!
//! Run: `cargo bench -p dopd-planner --bench tick`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dopd_planner::forecast::{ArimaConfig, auto_arima};
use dopd_planner::planner::{Observation, Planner, PlannerConfig, ReplicaState};
use dopd_planner::profile::{PerRole, roofline::RooflineSpec};
use dopd_planner::sizing::{Replicas, SizingConfig, SizingInput, size_dopd};
use dopd_planner::slo::{Bounds, SloPolicy, SloTargets, Workload, size};
use dopd_planner::trace::{IntervalStats, Series, Trace};

fn intervals() -> Vec<IntervalStats> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../traces/AzureLLMInferenceTrace_conv.csv"
    );
    let text = std::fs::read_to_string(path).expect("trace in the repository");
    Trace::parse(&text)
        .expect("valid trace")
        .intervals(10_000_000_000)
        .expect("10 s intervals")
}

fn observation(s: &IntervalStats, ready: PerRole<u32>) -> Observation {
    Observation {
        interval_s: 10.0,
        requests: s.count as f64,
        mean_isl: Some(s.mean_isl()),
        mean_osl: Some(s.mean_osl()),
        replicas: PerRole {
            prefill: ReplicaState {
                ready: ready.prefill,
                pending: 0,
            },
            decode: ReplicaState {
                ready: ready.decode,
                pending: 0,
            },
        },
        ..Observation::default()
    }
}

fn bench(c: &mut Criterion) {
    let iv = intervals();
    let profile = RooflineSpec::llama33_70b_fp8_h100()
        .build()
        .expect("preset");

    let mut group = c.benchmark_group("planner");
    group.sample_size(30);
    group.bench_function("tick_dopd_arima_window50", |b| {
        let cfg = PlannerConfig {
            sizing: SizingConfig {
                gpu_budget: 64,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut planner = Planner::new(profile.clone(), cfg).expect("valid config");
        let mut ready = PerRole {
            prefill: 1,
            decode: 1,
        };
        // Fill the window first so every measured tick refits on 50 points.
        for (k, s) in iv.iter().take(50).enumerate() {
            ready = planner.tick(k as f64 * 10.0, &observation(s, ready)).target;
        }
        let mut k = 50usize;
        b.iter(|| {
            let s = &iv[k % iv.len()];
            let d = planner.tick(k as f64 * 10.0, &observation(s, ready));
            ready = d.target;
            k += 1;
            d
        });
    });
    group.bench_function("size_dopd", |b| {
        let cfg = SizingConfig::default();
        b.iter(|| size_dopd(&profile, &SizingInput::new(300.0, 1000.0, 245.0), &cfg));
    });
    // The SLO-aware sizing of one tick (the `dopd` policy), on a long-prompt load: with a fixed
    // TTFT SLO, and with a length-aware one whose prefill model waits prompts deadline-first
    // (as the router's queue serves them) or in arrival order.
    let long_prompts = Workload {
        isl_cv2: 1.7,
        osl_cv2: 0.4,
        ..Workload::new(0.8, 8000.0, 300.0)
    };
    let bounds = Bounds {
        min: Replicas::default(),
        max: PerRole {
            prefill: None,
            decode: None,
        },
        budget: 16,
        current: None,
    };
    let aware = SloTargets {
        ttft_per_token_s: 0.0002,
        ..SloTargets::default()
    };
    let fifo = SloPolicy {
        deadline_first: false,
        ..SloPolicy::default()
    };
    for (name, slo, policy) in [
        (
            "size_slo_fixed_ttft",
            SloTargets::default(),
            SloPolicy::default(),
        ),
        (
            "size_slo_length_aware_deadline_first",
            aware.clone(),
            SloPolicy::default(),
        ),
        ("size_slo_length_aware_arrival_order", aware, fifo),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                size(
                    &profile,
                    &long_prompts,
                    &slo,
                    &policy,
                    Replicas::default(),
                    &bounds,
                )
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("auto_arima_window50");
    group.sample_size(30);
    for series in Series::ALL {
        let values: Vec<f64> = series
            .extract(&iv)
            .into_iter()
            .filter(|v| v.is_finite())
            .collect();
        let window = &values[100..150];
        group.bench_with_input(
            BenchmarkId::from_parameter(series.as_str()),
            window,
            |b, w| {
                b.iter(|| auto_arima(w, &ArimaConfig::default()).expect("fits"));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
