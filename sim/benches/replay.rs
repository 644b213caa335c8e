//! Simulator speed: the Azure conversation trace (19,366 requests) through the six default
//! policies of `dopd sim compare`.
//!
//! Run: `cargo bench -p dopd-sim --bench replay`

use criterion::{Criterion, criterion_group, criterion_main};
use dopd_planner::profile::{PerRole, roofline::RooflineSpec};
use dopd_planner::trace::Trace;
use dopd_sim::{PolicySpec, SimConfig, Window, from_trace, simulate};

fn bench(c: &mut Criterion) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../traces/AzureLLMInferenceTrace_conv.csv"
    );
    let trace = Trace::parse(&std::fs::read_to_string(path).expect("trace")).expect("valid");
    let requests = from_trace(&trace, 1.0, Window::default());
    let profile = RooflineSpec::llama33_70b_fp8_h100()
        .build()
        .expect("preset");
    let policies = [
        PolicySpec::Dopd,
        PolicySpec::Oracle,
        PolicySpec::DynSla,
        PolicySpec::DynLoad,
        PolicySpec::Static {
            replicas: PerRole {
                prefill: 1,
                decode: 1,
            },
        },
        PolicySpec::Aggregated { instances: 4 },
    ];
    let mut g = c.benchmark_group("sim");
    g.sample_size(10);
    g.bench_function("conv_trace_six_policies", |b| {
        b.iter(|| {
            policies
                .iter()
                .map(|p| {
                    let cfg = SimConfig {
                        policy: p.clone(),
                        ..SimConfig::default()
                    };
                    simulate(&requests, &profile, &cfg)
                        .expect("runs")
                        .summary
                        .slo_attainment
                })
                .sum::<f64>()
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
