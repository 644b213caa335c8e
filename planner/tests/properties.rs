//! Property tests of the planner's invariants.

use dopd_planner::forecast::{ForecastConfig, ForecasterKind};
use dopd_planner::planner::{Observation, Planner, PlannerConfig, PolicyKind, ReplicaState};
use dopd_planner::profile::{PerRole, Profile, roofline::RooflineSpec};
use dopd_planner::routing::{RoutingConfig, ShortBatcher};
use dopd_planner::sizing::{
    BudgetRule, DecodeLoad, PrefillRule, SizingConfig, SizingInput, SlaTargets, size_dopd,
    size_dyn_sla,
};
use dopd_planner::trace::Trace;
use proptest::prelude::*;

fn prefill_rule() -> impl Strategy<Value = PrefillRule> {
    prop_oneof![
        Just(PrefillRule::General),
        Just(PrefillRule::PerDecodeInstance),
        Just(PrefillRule::Proportional)
    ]
}

fn decode_load() -> impl Strategy<Value = DecodeLoad> {
    prop_oneof![
        Just(DecodeLoad::RequestsPerInterval),
        Just(DecodeLoad::LittlesLaw)
    ]
}

prop_compose! {
    fn profile()(ttft in 0.01f64..2.0, tpot in 0.005f64..0.2, blocks in 1u64..5000,
                 block in prop::sample::select(vec![16u32, 32, 64, 128]),
                 g_p in 1u32..4, g_d in 1u32..4) -> Profile {
        let mut p = Profile::constant_latency(ttft, tpot, blocks, block);
        p.gpus = PerRole { prefill: g_p, decode: g_d };
        p
    }
}

prop_compose! {
    fn sizing_cfg()(min_p in 1u32..3, min_d in 1u32..3, budget in 0u32..64,
                    max_p in prop::option::of(1u32..20), max_d in prop::option::of(1u32..20),
                    rule in prefill_rule(), load in decode_load(),
                    budget_rule in prop_oneof![Just(BudgetRule::Balanced), Just(BudgetRule::PaperLoop)]) -> SizingConfig {
        SizingConfig {
            min_replicas: PerRole { prefill: min_p, decode: min_d },
            max_replicas: PerRole { prefill: max_p, decode: max_d },
            gpu_budget: budget,
            prefill_rule: rule,
            decode_load: load,
            budget_rule,
        }
    }
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => 0.0f64..10_000.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => -1000.0f64..0.0,
        1 => Just(0.0),
    ]
}

fn within_bounds(r: PerRole<u32>, p: &Profile, cfg: &SizingConfig) -> Result<(), TestCaseError> {
    let min = cfg.min_replicas;
    let min_gpus = min.prefill * p.gpus.prefill + min.decode * p.gpus.decode;
    prop_assert!(
        r.prefill >= min.prefill && r.decode >= min.decode,
        "{r:?} below {min:?}"
    );
    if min_gpus <= cfg.gpu_budget {
        prop_assert!(
            r.gpus(p) <= cfg.gpu_budget,
            "{r:?} uses {} > {}",
            r.gpus(p),
            cfg.gpu_budget
        );
        if let Some(mx) = cfg.max_replicas.prefill {
            prop_assert!(r.prefill <= mx.max(min.prefill));
        }
        if let Some(mx) = cfg.max_replicas.decode {
            prop_assert!(r.decode <= mx.max(min.decode));
        }
    } else {
        prop_assert_eq!(r, min, "an infeasible budget keeps the minimums");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn replicas_stay_within_min_max_and_budget(
        p in profile(), cfg in sizing_cfg(),
        requests in value(), isl in value(), osl in value(), kappa in value(),
    ) {
        let input = SizingInput { requests, isl, osl, interval_s: 10.0, kappa_d: kappa, kappa_p: kappa };
        let s = size_dopd(&p, &input, &cfg);
        within_bounds(s.replicas, &p, &cfg)?;
        prop_assert_eq!(s.gpus, s.replicas.gpus(&p));
        prop_assert!(s.r_star.is_finite() && s.r_star >= 0.0);
        let s = size_dyn_sla(&p, &input, &SlaTargets::default(), &cfg);
        within_bounds(s.replicas, &p, &cfg)?;
    }

    #[test]
    fn more_forecast_requests_never_give_fewer_decode_instances(
        p in profile(), cfg in sizing_cfg(),
        r1 in 0.0f64..5000.0, extra in 0.0f64..5000.0, isl in 1.0f64..16384.0, osl in 1.0f64..2048.0,
    ) {
        // The default (balanced) budget rule; the paper's loop is not monotone (unit test).
        let cfg = SizingConfig { budget_rule: BudgetRule::Balanced, ..cfg };
        let a = size_dopd(&p, &SizingInput::new(r1, isl, osl), &cfg);
        let b = size_dopd(&p, &SizingInput::new(r1 + extra, isl, osl), &cfg);
        prop_assert!(b.replicas.decode >= a.replicas.decode, "{:?} -> {:?}", a.replicas, b.replicas);
    }

    #[test]
    fn simple_forecasts_are_finite_and_non_negative(
        values in prop::collection::vec(value(), 0..120),
        kind in prop::sample::select(vec![ForecasterKind::Last, ForecasterKind::MovingAverage, ForecasterKind::Kalman]),
    ) {
        let mut f = kind.build(&ForecastConfig::default());
        for v in values {
            f.observe(v);
            let p = f.predict();
            prop_assert!(p.point.is_finite() && p.point >= 0.0, "{kind}: {p:?}");
            prop_assert!(p.lower <= p.point && p.point <= p.upper, "{kind}: {p:?}");
            prop_assert!(p.lower >= 0.0 && p.upper.is_finite());
        }
    }

    #[test]
    fn batches_neither_lose_nor_duplicate_requests(
        reqs in prop::collection::vec((1u32..20_000, 0.0f64..0.2), 0..200),
        cap in 1u32..20_000, wait in 0.0f64..0.1,
    ) {
        let cfg = RoutingConfig { batch_token_cap: cap, batch_wait_cap_s: wait, ..RoutingConfig::default() };
        let mut b = ShortBatcher::new(&cfg);
        let mut now = 0.0;
        let mut out = Vec::new();
        for (id, (tokens, gap)) in reqs.iter().enumerate() {
            now += gap;
            if let Some(batch) = b.poll(now) {
                out.push(batch);
            }
            out.extend(b.push(id, *tokens, now));
        }
        out.extend(b.drain());
        let mut ids: Vec<usize> = out.iter().flat_map(|b| b.items.iter().copied()).collect();
        ids.sort_unstable();
        prop_assert_eq!(ids, (0..reqs.len()).collect::<Vec<_>>());
        for batch in &out {
            prop_assert!(batch.tokens <= u64::from(cap) || batch.items.len() == 1, "{batch:?}");
            prop_assert!(!batch.items.is_empty());
        }
    }

    #[test]
    fn trace_parsing_never_panics(text in "\\PC{0,400}") {
        let _ = Trace::parse(&text);
    }
}

proptest! {
    // ARIMA refits are milliseconds each: fewer, shorter cases.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arima_forecasts_are_finite_and_non_negative(values in prop::collection::vec(value(), 0..60)) {
        let mut f = ForecasterKind::Arima.build(&ForecastConfig::default());
        for (i, v) in values.iter().enumerate() {
            f.observe(*v);
            if i % 7 == 6 || i + 1 == values.len() {
                let p = f.predict();
                prop_assert!(p.point.is_finite() && p.point >= 0.0, "{p:?}");
                prop_assert!(p.lower <= p.point && p.point <= p.upper, "{p:?}");
            }
        }
    }

    #[test]
    fn planner_decisions_respect_the_budget(
        policy in prop::sample::select(vec![PolicyKind::Dopd, PolicyKind::DynSla, PolicyKind::DynLoad, PolicyKind::Static]),
        budget in 3u32..40,
        start in (0u32..12, 0u32..12),
        ticks in prop::collection::vec((value(), value(), 0.0f64..1.2, 0.0f64..50.0, any::<bool>()), 1..25),
    ) {
        let profile = RooflineSpec::llama33_70b_fp8_h100().build().expect("preset");
        let cfg = PlannerConfig {
            policy,
            predictor: ForecasterKind::Last,
            sizing: SizingConfig { gpu_budget: budget, ..SizingConfig::default() },
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(profile.clone(), cfg).expect("valid config");
        // Any starting point: a cold start, or a deployment bigger than the budget allows.
        let mut running = PerRole { prefill: start.0, decode: start.1 };
        for (k, (requests, isl, kv, queue, lands)) in ticks.into_iter().enumerate() {
            let obs = Observation {
                interval_s: 10.0,
                requests,
                mean_isl: Some(isl),
                mean_osl: Some(200.0),
                kv_usage: kv,
                prefill_queue_depth: queue,
                replicas: PerRole {
                    prefill: ReplicaState { ready: running.prefill, pending: 0 },
                    decode: ReplicaState { ready: running.decode, pending: 0 },
                },
                ..Observation::default()
            };
            let d = planner.tick(k as f64 * 10.0, &obs);
            prop_assert!(d.target.gpus(&profile) <= budget, "{d:?}");
            prop_assert!(d.target.prefill >= 1 && d.target.decode >= 1);
            if lands {
                running = d.target;
            }
        }
    }
}

#[test]
fn paper_worked_example() {
    // dopd-paper.md §3.2: ISL 1000, OSL 245, TTFT 0.15 s, TPOT 0.040 s, 2040 blocks of 128.
    let p = Profile::constant_latency(0.15, 0.040, 2040, 128);
    let s = size_dopd(
        &p,
        &SizingInput::new(300.0, 1000.0, 245.0),
        &SizingConfig::default(),
    );
    assert_eq!(s.b_max, 226);
    assert!((s.r_star - 3.46).abs() < 0.005, "{}", s.r_star);
}

#[test]
fn committed_preset_profiles_are_current() {
    // profiles/*.yaml are generated by `dopd profile roofline --preset NAME`; regenerate them
    // when the roofline model or a preset changes.
    for name in dopd_planner::profile::roofline::PRESETS {
        let path = format!("{}/../profiles/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let built = RooflineSpec::preset(name)
            .expect("preset")
            .build()
            .expect("builds");
        assert_eq!(
            Profile::from_yaml(&committed).expect("valid"),
            built,
            "{path} is stale"
        );
    }
}
