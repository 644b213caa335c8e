//! Tests of the planner's tick.

use super::*;
use crate::profile::roofline::RooflineSpec;

impl Planner {
    fn new_ok(profile: Profile, cfg: PlannerConfig) -> Self {
        Self::new(profile, cfg).expect("valid config")
    }
}

#[test]
fn bad_config_is_rejected_with_the_field_named() {
    let c = PlannerConfig {
        idle_after_s: f64::NAN,
        ..Default::default()
    };
    let e = Planner::new(profile(), c).expect_err("NaN").to_string();
    assert!(e.contains("idle_after_s"), "{e}");
    let mut c = PlannerConfig::default();
    c.sizing.min_replicas.decode = 0;
    let e = Planner::new(profile(), c)
        .expect_err("no decode")
        .to_string();
    assert!(e.contains("sizing.min_replicas.decode"), "{e}");
}

#[test]
fn an_emergency_is_not_blocked_by_another_roles_slow_start() {
    let c = with_budget(cfg(PolicyKind::DopdPaper), 100);
    let mut p = Planner::new_ok(profile(), c);
    let one = ONE;
    let t = p.tick(0.0, &obs(300.0, one)).target;
    // Decode has landed, prefill is still starting; KV pressure on decode.
    let mut o = obs(
        300.0,
        PerRole {
            prefill: 1,
            decode: t.decode,
        },
    );
    o.replicas.prefill.pending = t.prefill - 1;
    o.kv_usage = 0.97;
    let d = p.tick(10.0, &o);
    assert!(
        d.reasons
            .iter()
            .any(|r| matches!(r, Reason::ReconfigInFlight { .. }))
    );
    assert_eq!(d.target.decode, t.decode + 1, "{d:?}");
    assert_eq!(d.target.prefill, t.prefill);
}

#[test]
fn no_idle_shrink_while_requests_still_decode() {
    let c = PlannerConfig {
        scale_down_stabilization_s: 100.0,
        ..cfg(PolicyKind::DopdPaper)
    };
    let mut p = Planner::new_ok(profile(), c);
    let t = p.tick(0.0, &obs(300.0, ONE)).target;
    for k in 1..=8 {
        let mut o = obs(0.0, t);
        o.kv_usage = 0.5;
        let d = p.tick(f64::from(k) * 10.0, &o);
        assert!(
            !d.reasons.iter().any(|r| matches!(r, Reason::Idle { .. })),
            "{k}: {d:?}"
        );
    }
}

#[test]
fn load_planner_respects_minimums_and_budget_from_any_start() {
    let c = with_budget(cfg(PolicyKind::DynLoad), 8);
    let mut p = Planner::new_ok(profile(), c);
    let d = p.tick(
        0.0,
        &obs(
            10.0,
            PerRole {
                prefill: 0,
                decode: 0,
            },
        ),
    );
    assert_eq!(
        d.target,
        PerRole {
            prefill: 1,
            decode: 1
        }
    );
    let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::DynLoad), 8));
    let d = p.tick(
        0.0,
        &obs(
            10.0,
            PerRole {
                prefill: 10,
                decode: 10,
            },
        ),
    );
    assert!(d.target.gpus(p.profile()) <= 8, "{d:?}");
}

#[test]
fn a_landed_scale_up_is_not_undone_at_once() {
    let c = with_budget(cfg(PolicyKind::DopdPaper), 100);
    let mut p = Planner::new_ok(profile(), c);
    let one = ONE;
    let big = p.tick(0.0, &obs(2000.0, one)).target;
    // Slow start: still landing at 10..40 s.
    for k in 1..=4 {
        let mut o = obs(10.0, one);
        o.replicas.decode.pending = big.decode - 1;
        p.tick(f64::from(k) * 10.0, &o);
    }
    // Lands at 50 s while the forecast has collapsed: held for the stabilisation window.
    let d = p.tick(50.0, &obs(10.0, big));
    assert_eq!(d.target, big, "{d:?}");
}

fn profile() -> Profile {
    RooflineSpec::llama33_70b_fp8_h100()
        .build()
        .expect("preset")
}

fn obs(requests: f64, ready: Replicas) -> Observation {
    Observation {
        interval_s: 10.0,
        requests,
        mean_isl: Some(1000.0),
        mean_osl: Some(245.0),
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
        ..Default::default()
    }
}

fn with_budget(mut c: PlannerConfig, gpus: u32) -> PlannerConfig {
    c.sizing.gpu_budget = gpus;
    c
}

const ONE: Replicas = PerRole {
    prefill: 1,
    decode: 1,
};

fn cfg(policy: PolicyKind) -> PlannerConfig {
    PlannerConfig {
        policy,
        predictor: ForecasterKind::Last,
        ..Default::default()
    }
}

#[test]
fn first_tick_sizes_from_the_observation() {
    let c = PlannerConfig {
        predictor: ForecasterKind::Arima,
        ..cfg(PolicyKind::DopdPaper)
    };
    let mut p = Planner::new_ok(profile(), c);
    let d = p.tick(0.0, &obs(300.0, ONE));
    assert!(d.changed);
    assert!(d.target.gpus(p.profile()) <= 8);
    assert!(
        d.reasons
            .iter()
            .any(|r| matches!(r, Reason::KvCapacity { .. }))
    );
    assert!(d.reasons.iter().any(|r| matches!(r, Reason::Warmup { .. })));
}

#[test]
fn holds_while_a_change_is_in_flight() {
    let mut p = Planner::new_ok(profile(), cfg(PolicyKind::DopdPaper));
    let one = ONE;
    let d = p.tick(0.0, &obs(300.0, one));
    assert_ne!(d.target, one);
    // Next tick: still the old counts ready → in flight.
    let d2 = p.tick(10.0, &obs(5.0, one));
    assert!(!d2.changed);
    assert_eq!(d2.target, d.target);
    assert!(matches!(d2.reasons[0], Reason::ReconfigInFlight { .. }));
    // Once it lands the planner plans again.
    let d3 = p.tick(20.0, &obs(300.0, d.target));
    assert!(
        !d3.reasons
            .iter()
            .any(|r| matches!(r, Reason::ReconfigInFlight { .. }))
    );
}

#[test]
fn gives_up_waiting_after_the_reconfig_timeout() {
    let mut c = cfg(PolicyKind::DopdPaper);
    c.max_reconfig_wait_s = 30.0;
    let mut p = Planner::new_ok(profile(), c);
    let one = ONE;
    p.tick(0.0, &obs(300.0, one));
    let d = p.tick(40.0, &obs(300.0, one));
    assert!(
        !d.reasons
            .iter()
            .any(|r| matches!(r, Reason::ReconfigInFlight { .. }))
    );
}

#[test]
fn shrinks_to_minimum_after_idle() {
    // A long stabilisation window keeps the forecast-driven scale-down out of the way.
    let c = PlannerConfig {
        scale_down_stabilization_s: 100.0,
        ..cfg(PolicyKind::DopdPaper)
    };
    let mut p = Planner::new_ok(profile(), c);
    let d = p.tick(0.0, &obs(300.0, ONE));
    let t = d.target;
    for k in 1..=4 {
        let d = p.tick(f64::from(k) * 10.0, &obs(0.0, t));
        assert!(
            !d.reasons.iter().any(|r| matches!(r, Reason::Idle { .. })),
            "idle too early"
        );
    }
    let last = p.tick(50.0, &obs(0.0, t));
    assert_eq!(
        last.target,
        PerRole {
            prefill: 1,
            decode: 1
        }
    );
    assert!(matches!(last.reasons[0], Reason::Idle { .. }));
}

#[test]
fn scale_down_waits_for_the_stabilisation_window() {
    let mut c = cfg(PolicyKind::DopdPaper);
    c.scale_down_stabilization_s = 30.0;
    c.sizing.gpu_budget = 100;
    let mut p = Planner::new_ok(profile(), c);
    let big = p.tick(0.0, &obs(2000.0, ONE)).target;
    let d = p.tick(10.0, &obs(10.0, big));
    assert_eq!(d.target, big, "{:?}", d.reasons);
    assert!(
        d.reasons
            .iter()
            .any(|r| matches!(r, Reason::Cooldown { .. }))
    );
    let d = p.tick(45.0, &obs(10.0, big));
    assert!(d.target.decode < big.decode, "{:?}", d);
}

#[test]
fn emergency_adds_a_decode_instance_on_kv_pressure() {
    let mut c = cfg(PolicyKind::DopdPaper);
    c.sizing.gpu_budget = 100;
    let mut p = Planner::new_ok(profile(), c);
    let t = p.tick(0.0, &obs(10.0, ONE)).target;
    let mut o = obs(10.0, t);
    o.kv_usage = 0.97;
    let d = p.tick(10.0, &o);
    assert_eq!(d.target.decode, t.decode + 1);
    assert!(d.reasons.iter().any(|r| matches!(
        r,
        Reason::Emergency {
            role: Role::Decode,
            ..
        }
    )));
}

#[test]
fn load_planner_follows_thresholds_with_grace() {
    let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::DynLoad), 100));
    let one = ONE;
    let mut o = obs(10.0, one);
    o.kv_usage = 0.95;
    let d = p.tick(0.0, &o);
    assert_eq!(
        d.target,
        PerRole {
            prefill: 1,
            decode: 2
        }
    );
    // Grace period: high KV usage again does not add another decode instance right away.
    let mut o = obs(10.0, d.target);
    o.kv_usage = 0.95;
    let d2 = p.tick(10.0, &o);
    assert_eq!(d2.target.decode, 2);
}

#[test]
fn the_routing_threshold_follows_the_isl_forecast() {
    let mut p = Planner::new_ok(profile(), cfg(PolicyKind::DopdPaper));
    assert_eq!(p.isl_threshold(), None);
    let mut o = obs(100.0, ONE);
    o.mean_isl = Some(1500.0);
    p.tick(0.0, &o);
    // The last-value forecaster forecasts the observed mean.
    assert_eq!(p.isl_threshold(), Some(1500.0));
    // An empty interval keeps the threshold.
    p.tick(10.0, &obs(0.0, ONE));
    assert_eq!(p.isl_threshold(), Some(1500.0));
}

#[test]
fn oracle_input_bypasses_the_forecasters() {
    let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::DopdPaper), 100));
    let d = p.tick_with_known_next(0.0, &obs(1.0, ONE), SizingInput::new(2000.0, 1000.0, 245.0));
    assert!(d.forecast.is_none());
    assert!(d.target.decode >= 9, "{:?}", d.target);
}

#[test]
fn the_hold_keeps_what_arrivals_needed_not_what_a_backlog_asked_for() {
    let run = |backlog: f64, burst: f64| {
        let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::Dopd), 100));
        let mut ready = ONE;
        for k in 0..12 {
            ready = p.tick(f64::from(k) * 10.0, &obs(50.0, ready)).target;
        }
        let steady = ready;
        // One interval with a backlog in front of prefill, or with a burst of arrivals.
        let mut o = obs(burst, ready);
        o.prefill_queue_depth = backlog;
        let up = p.tick(120.0, &o).target;
        assert!(up.prefill > steady.prefill, "{up:?} vs {steady:?}");
        // The instances land, the backlog is gone and arrivals are back to the steady level.
        let after = p.tick(130.0, &obs(50.0, up)).target;
        (steady, up, after)
    };
    let (steady, _, after) = run(2000.0, 50.0);
    assert_eq!(
        after.prefill, steady.prefill,
        "a cleared backlog is not held"
    );
    let (_, up, after) = run(0.0, 400.0);
    assert_eq!(after.prefill, up.prefill, "a burst of arrivals is held");
}

#[test]
fn a_step_the_forecast_has_not_caught_up_with_is_sized_for_what_was_seen() {
    let c = PlannerConfig {
        policy: PolicyKind::Dopd,
        ..Default::default()
    };
    let mut p = Planner::new_ok(profile(), with_budget(c, 100));
    let mut ready = ONE;
    let step = |r: &Reason| matches!(r, Reason::Step { .. });
    for k in 0..30 {
        let n = if k % 2 == 0 { 45.0 } else { 55.0 };
        let d = p.tick(f64::from(k) * 10.0, &obs(n, ready));
        assert!(
            !d.reasons.iter().any(step),
            "noise is no step: {:?}",
            d.reasons
        );
        ready = d.target;
    }
    // Five times the level at once: the smoothing forecaster still says about 50, but the next
    // interval is sized for the 250 just seen.
    let d = p.tick(300.0, &obs(250.0, ready));
    assert!(d.reasons.iter().any(step), "{:?}", d.reasons);
    let rate_p = d.reasons.iter().find_map(|r| match r {
        Reason::SloNeed { rate_p, .. } => Some(*rate_p),
        _ => None,
    });
    assert!(rate_p.is_some_and(|r| r >= 25.0), "{:?}", d.reasons);
    assert!(
        d.target.prefill > ready.prefill,
        "{:?} vs {ready:?}",
        d.target
    );
}

#[test]
fn the_hold_is_priced_in_start_ups_and_grows_with_burstiness() {
    let run = |counts: &[f64], known: bool| {
        let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::Dopd), 100));
        let mut ready = ONE;
        for (k, &n) in counts.iter().cycle().take(30).enumerate() {
            let (t, o) = (k as f64 * 10.0, obs(n, ready));
            ready = if known {
                p.tick_with_known_next(t, &o, SizingInput::new(n, 1000.0, 245.0))
            } else {
                p.tick(t, &o)
            }
            .target;
        }
        (p.hold_windows(), p.tracker.dispersion)
    };
    let s = profile().startup_s;
    // A steady (Poisson-like) load: one and a half start-ups of each role.
    let (steady, d) = run(&[50.0], false);
    assert!((d - 1.0).abs() < 1e-9, "{d}");
    assert!(
        (steady.prefill - 1.5 * s.prefill).abs() < 1e-9,
        "{steady:?}"
    );
    assert!((steady.decode - 1.5 * s.decode).abs() < 1e-9, "{steady:?}");
    // Sizing for a known next interval does not look ahead over the start-ups: three.
    let (oracle, _) = run(&[50.0], true);
    assert!(
        (oracle.prefill - 3.0 * s.prefill).abs() < 1e-9,
        "{oracle:?}"
    );
    // Bursts that come back: held longer, up to eight times three start-ups.
    let (bursty, d) = run(&[5.0, 150.0], false);
    assert!(d > 4.0, "{d}");
    assert!(bursty.prefill > 3.0 * steady.prefill, "{bursty:?}");
    assert!(bursty.prefill <= 24.0 * s.prefill + 1e-9, "{bursty:?}");
    // The other policies keep their stabilisation window.
    let mut p = Planner::new_ok(profile(), cfg(PolicyKind::DopdPaper));
    p.tick(0.0, &obs(50.0, ONE));
    assert_eq!(
        p.hold_windows().prefill,
        PlannerConfig::default().scale_down_stabilization_s
    );
}

#[test]
fn a_busy_level_load_is_not_held_as_long_as_one_that_falls_quiet_and_comes_back() {
    let run = |counts: &[f64], by_swing: bool| {
        let mut c = with_budget(cfg(PolicyKind::Dopd), 100);
        c.slo_policy.hold_by_swing = by_swing;
        let mut p = Planner::new_ok(profile(), c);
        let mut ready = ONE;
        for (k, &n) in counts.iter().cycle().take(30).enumerate() {
            ready = p.tick(k as f64 * 10.0, &obs(n, ready)).target;
        }
        (p.hold_windows(), p.tracker.dispersion, p.tracker.swing)
    };
    let s = profile().startup_s;
    // 80 <-> 120 requests an interval: an index of dispersion of 8, but the rate moves by a
    // fifth of its level.
    let (level, d, swing) = run(&[80.0, 120.0], true);
    assert!(d > 6.0, "{d}");
    assert!(swing < 0.1, "{swing}");
    // 5 <-> 150: the load falls quiet and comes back.
    let (on_off, _, swing) = run(&[5.0, 150.0], true);
    assert!(swing > 1.0, "{swing}");
    assert!(
        on_off.prefill > 3.0 * level.prefill,
        "{on_off:?} vs {level:?}"
    );
    assert!(level.prefill < 4.0 * s.prefill, "{level:?}");
    assert!(level.prefill >= 3.0 * s.prefill, "{level:?}");
    // By the index of dispersion alone, both are held about as long.
    let (level_by_d, _, _) = run(&[80.0, 120.0], false);
    assert!(
        level_by_d.prefill > 2.0 * level.prefill,
        "{level_by_d:?} vs {level:?}"
    );
    assert_eq!(run(&[5.0, 150.0], false).0, on_off);
}

#[test]
fn a_swap_under_the_budget_lands_before_it_is_reversed() {
    let p = profile();
    let gpus = |r: Replicas| r.gpus(&p);
    let budget = gpus(Replicas {
        prefill: 4,
        decode: 2,
    });
    // Decode was given a second instance (still starting) in exchange for prefill; prefill now
    // asks for its old count back, which the budget only holds without that instance.
    let swap = Swap {
        held: Replicas {
            prefill: 5,
            decode: 2,
        },
        desired: Replicas {
            prefill: 5,
            decode: 1,
        },
        current: Replicas {
            prefill: 4,
            decode: 2,
        },
        starting: PerRole {
            prefill: false,
            decode: true,
        },
        back: PerRole {
            prefill: true,
            decode: false,
        },
    };
    let kept = swap.landing(&p, budget).expect("the swap lands");
    assert_eq!(
        kept,
        Replicas {
            prefill: 4,
            decode: 2
        }
    );
    assert!(gpus(kept) <= budget);
    // Once decode's instance is up, or where prefill grows to a new high, prefill wins.
    let landed = Swap {
        starting: PerRole {
            prefill: false,
            decode: false,
        },
        ..swap
    };
    assert_eq!(landed.landing(&p, budget), None);
    let new_high = Swap {
        back: PerRole {
            prefill: false,
            decode: false,
        },
        ..swap
    };
    assert_eq!(new_high.landing(&p, budget), None);
}

/// Twelve steady intervals, then one with the decode instances' KV cache full (at 120 s):
/// returns the steady counts and the target of the full interval, checked to be one decode
/// instance more, at once.
fn steady_then_full_cache(p: &mut Planner) -> (Replicas, Replicas) {
    let mut ready = ONE;
    for k in 0..12 {
        ready = p.tick(f64::from(k) * 10.0, &obs(50.0, ready)).target;
    }
    let mut o = obs(50.0, ready);
    o.kv_usage = 0.97;
    let up = p.tick(120.0, &o).target;
    assert_eq!(up.decode, ready.decode + 1, "{up:?} vs {ready:?}");
    (ready, up)
}

#[test]
fn an_instance_a_full_kv_cache_asked_for_is_held() {
    let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::Dopd), 100));
    let (ready, up) = steady_then_full_cache(&mut p);
    // The next interval looks like the steady ones (the new instance is still starting): it
    // is kept, not stopped before it serves.
    let mut o = obs(50.0, ready);
    o.replicas.decode.pending = 1;
    let next = p.tick(130.0, &o).target;
    assert_eq!(next.decode, up.decode, "{next:?}");
}

#[test]
fn an_instance_a_full_kv_cache_asked_for_is_held_one_decode_start_up() {
    // Returns the decode targets just inside and just past one decode start-up after the
    // cache filled, with the new instance up and the cache no longer full.
    let run = |hold_startups: f64| {
        let mut c = with_budget(cfg(PolicyKind::Dopd), 100);
        c.slo_policy.kv_emergency_hold_startups = hold_startups;
        let mut p = Planner::new_ok(profile(), c);
        let startup = profile().startup_s.decode;
        let (steady, up) = steady_then_full_cache(&mut p);
        let mut t = 130.0;
        let mut inside = up;
        while t <= 120.0 + startup {
            inside = p.tick(t, &obs(50.0, up)).target;
            t += 10.0;
        }
        let past = p.tick(t, &obs(50.0, up)).target;
        (steady.decode, up.decode, inside.decode, past.decode)
    };
    let (steady, up, inside, past) = run(1.0);
    assert_eq!(inside, up, "held while it comes up");
    assert_eq!(
        past, steady,
        "let go once it has served and the cache has room"
    );
    // Held for the whole decode hold (the earlier rule), it outlives the start-up.
    let (_, up, _, past) = run(1e9);
    assert_eq!(past, up);
}

#[test]
fn what_a_trend_looked_ahead_for_is_not_held_once_the_trend_is_gone() {
    let mut p = Planner::new_ok(profile(), with_budget(cfg(PolicyKind::Dopd), 200));
    let mut ready = ONE;
    let mut t = 0.0;
    let mut run = |p: &mut Planner, counts: &[f64]| {
        let mut out = Vec::new();
        for &n in counts {
            let d = p.tick(t, &obs(n, ready));
            ready = d.target;
            t += 10.0;
            out.push(d);
        }
        out
    };
    // A steady load, then a gentle climb (15 requests an interval, within what the forecast
    // misses by noise, so no surge is learnt) that the trend carries over the decode start-up:
    // a third decode instance is asked for ahead of the load.
    run(&mut p, &[400.0; 20]);
    let ramp = run(&mut p, &[415.0, 430.0, 445.0, 460.0, 475.0, 490.0]);
    let peak = ramp.iter().map(|d| d.target.decode).max().unwrap_or(0);
    // The load stays where the climb ended. Once the trend is gone (the decode rate sized for
    // is the count's own), the target is what that rate needs: the look-ahead is not held.
    let flat = run(&mut p, &[490.0; 10]);
    let need = |d: &Decision| {
        d.reasons.iter().find_map(|r| match r {
            Reason::SloNeed { decode, rate_d, .. } => Some((*decode, *rate_d)),
            _ => None,
        })
    };
    let settled = flat
        .iter()
        .find(|d| need(d).is_some_and(|(_, r)| r <= 49.0 + 1e-9))
        .expect("the trend fades");
    let (decode, _) = need(settled).expect("an SLO need");
    assert!(decode < peak, "{decode} vs {peak}");
    assert_eq!(settled.target.decode, decode, "{:?}", settled.reasons);
}

#[test]
fn the_prefill_model_orders_waiting_work_as_the_routers_queue_does() {
    use crate::routing::PrefillQueue;
    let follow = |deadline_first: bool, q: PrefillQueue| {
        let mut c = PlannerConfig::default();
        c.slo_policy.deadline_first = deadline_first;
        c.follow_prefill_queue(q);
        c.slo_policy.deadline_first
    };
    assert!(follow(true, PrefillQueue::Shared));
    assert!(!follow(true, PrefillQueue::SharedFifo));
    assert!(!follow(true, PrefillQueue::PerInstance));
    // An ablation that turned it off stays off.
    assert!(!follow(false, PrefillQueue::Shared));
}

#[test]
fn quiet_spells_are_sized_by_the_policy_not_cut_short_by_the_idle_rule() {
    // Bursts of 300 requests an interval for six intervals, then 200 quiet ones, three times.
    let run = |size_idle: bool| {
        let mut c = with_budget(cfg(PolicyKind::Dopd), 200);
        c.slo_policy.size_idle = size_idle;
        let mut p = Planner::new_ok(profile(), c);
        let mut ready = ONE;
        let mut out = Vec::new();
        for k in 0..(206 * 3) {
            let n = if k % 206 < 6 { 300.0 } else { 0.0 };
            let d = p.tick(f64::from(k) * 10.0, &obs(n, ready));
            ready = d.target;
            let idle = d.reasons.iter().any(|r| matches!(r, Reason::Idle { .. }));
            out.push((d.target, idle));
        }
        out
    };
    // The last quiet spell, after two cycles of learning.
    let (sized, cut) = (run(true), run(false));
    let last = 206 * 2 + 6..206 * 3;
    // With the idle rule, both roles drop to the minimums together at some point of the spell.
    let at = last
        .clone()
        .find(|&k| cut[k].1)
        .expect("the idle rule fires in a long quiet spell");
    assert_eq!(cut[at].0, ONE);
    // Sized by the policy, nothing is cut short: each role keeps its instances for its own
    // hold, so more than the minimums still run where the idle rule had dropped them, and the
    // spell still ends at the minimums once the holds have run out.
    assert!(sized.iter().all(|(_, idle)| !idle));
    assert!(
        sized[at].0.gpus(&profile()) > ONE.gpus(&profile()),
        "{:?}",
        sized[at]
    );
    assert_eq!(sized[206 * 3 - 1].0, ONE);
}
