//! Tests of the SLO-aware sizing and the tracker.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::profile::roofline::RooflineSpec;

fn profile() -> Profile {
    RooflineSpec::llama33_70b_fp8_h100().build().unwrap()
}

fn open() -> Bounds {
    Bounds {
        min: Replicas::default(),
        max: PerRole {
            prefill: None,
            decode: None,
        },
        budget: u32::MAX,
        current: None,
    }
}

/// The sizing with no bounds and no closed-loop extra.
fn sized(p: &Profile, w: &Workload, slo: &SloTargets, pol: &SloPolicy) -> SloSizing {
    size(p, w, slo, pol, Replicas::default(), &open())
}

fn workload(rate: f64, isl: f64, osl: f64) -> Workload {
    Workload::new(rate, isl, osl)
}

/// An interval's observation that holds only its arrival count.
fn obs(n: f64) -> crate::observation::Observation {
    crate::observation::Observation {
        interval_s: 10.0,
        requests: n,
        ..Default::default()
    }
}

#[test]
fn surges_are_learned_from_what_the_forecast_missed() {
    let (slo, pol) = (SloTargets::default(), SloPolicy::default());
    // A steady load that the forecast (100 per interval) gets right: no surge, even with
    // Poisson-sized noise.
    let mut t = Tracker::default();
    for k in 0..60 {
        t.observe(&obs(if k % 2 == 0 { 110.0 } else { 92.0 }), &slo, &pol);
        t.record_forecast(100.0, 4);
    }
    assert_eq!(t.surge(), 0.0);
    // Every eighth interval starts four at half as much again, which a forecast of 100 does
    // not see coming: the surge is learned.
    let mut t = Tracker::default();
    for k in 0..120 {
        t.observe(&obs(if k % 8 < 4 { 150.0 } else { 100.0 }), &slo, &pol);
        t.record_forecast(100.0, 4);
    }
    let s = t.surge();
    assert!(s > 0.25 && s < 0.5, "{s}");
}

#[test]
fn surges_are_read_at_forecasts_like_the_current_one() {
    let (slo, pol) = (SloTargets::default(), SloPolicy::default());
    // On/off: eight quiet intervals (forecast 0), then eight busy ones (forecast 100, with
    // bursts of 140). From the quiet forecasts, the load rises by a burst's 100 or more; within
    // the bursts, by 40 less the noise allowance.
    let mut t = Tracker::default();
    for k in 0..60 {
        let n = if k % 16 < 8 {
            0.0
        } else if k % 4 == 0 {
            140.0
        } else {
            100.0
        };
        t.observe(&obs(n), &slo, &pol);
        t.record_forecast(
            if k % 16 < 7 || k % 16 == 15 {
                0.0
            } else {
                100.0
            },
            2,
        );
    }
    let quiet = t.surge_near(0.0).expect("quiet horizons measured");
    let busy = t.surge_near(100.0).expect("busy horizons measured");
    assert!((100.0..=140.0).contains(&quiet), "{quiet}");
    assert!(busy > 10.0 && busy <= 20.0, "{busy}");
    // No horizon started at a forecast near 20: nothing is read there.
    assert_eq!(t.surge_near(20.0), None);
}

#[test]
fn a_ramp_the_trend_carries_is_not_a_surge() {
    let (slo, pol) = (SloTargets::default(), SloPolicy::default());
    // A steady climb of 20 requests an interval, forecast as the last count: over a start-up
    // horizon of four intervals the load outruns that forecast by 80, which the surge learns
    // when measured against the bare forecast, and not once the trend is carried.
    let surge = |carry: bool| {
        let mut t = Tracker::default();
        for k in 0..60 {
            let n = 100.0 + 20.0 * f64::from(k);
            t.observe(&obs(n), &slo, &pol);
            let trend = if carry { t.trend() * 4.0 } else { 0.0 };
            t.record_forecast(n + trend, 4);
        }
        t.surge()
    };
    assert!(surge(false) > 0.05, "{}", surge(false));
    assert_eq!(surge(true), 0.0);
}

#[test]
fn queue_burstiness_comes_from_the_measured_gaps_when_there_are_any() {
    let (slo, pol) = (SloTargets::default(), SloPolicy::default());
    let obs = |n: f64, cv2: Option<f64>| crate::observation::Observation {
        interval_s: 10.0,
        requests: n,
        arrival_cv2: cv2,
        ..Default::default()
    };
    // Counts that swing from one interval to the next (a rate the forecast follows) and no
    // timed arrivals: the counts' dispersion is all there is.
    let mut t = Tracker::default();
    for k in 0..20 {
        t.observe(
            &obs(if k % 2 == 0 { 200.0 } else { 50.0 }, None),
            &slo,
            &pol,
        );
    }
    assert!(t.queue_arrival_cv2() > 4.0, "{t:?}");
    // The same counts with Poisson gaps inside each interval: the queue sees Poisson arrivals.
    let mut t = Tracker::default();
    for k in 0..20 {
        t.observe(
            &obs(if k % 2 == 0 { 200.0 } else { 50.0 }, Some(1.0)),
            &slo,
            &pol,
        );
    }
    assert!((t.queue_arrival_cv2() - 1.0).abs() < 1e-9, "{t:?}");
    // Bursty gaps are learned, within bounds; nonsense is ignored.
    for _ in 0..40 {
        t.observe(&obs(100.0, Some(4.0)), &slo, &pol);
        t.observe(&obs(100.0, Some(f64::NAN)), &slo, &pol);
    }
    assert!((t.queue_arrival_cv2() - 4.0).abs() < 0.01, "{t:?}");
    t.observe(&obs(100.0, Some(1e9)), &slo, &pol);
    assert!(t.queue_arrival_cv2() <= 16.0);
}

#[test]
fn a_full_kv_cache_delays_rather_than_fails() {
    let (p, slo, pol) = (profile(), SloTargets::default(), SloPolicy::default());
    let w = workload(20.0, 1200.0, 200.0);
    let d = DecodeModel::new(&p, &slo, &pol, &w, 0);
    let (t, conc) = d.operating_point(1);
    let slots = p.kv.tokens() as f64 / d.kv_mean;
    // Near but below the sequences that fit: a short wait for blocks, rarely past the
    // allowance.
    let near = d.throttled(0.85 * slots / conc);
    assert!(near.overflow(1, t) < 0.05, "{}", near.overflow(1, t));
    // Past them the queue grows without bound.
    let over = d.throttled(1.0).overflow(1, 1.5 * slots / (20.0 * 200.0));
    assert!(over > 0.5, "{over}");
    // More instances never overflow more.
    let mut last = 1.0;
    for n in 1..6 {
        let o = d.overflow(n, t);
        assert!(o <= last + 1e-12, "{n}: {o} > {last}");
        last = o;
    }
}

#[test]
fn the_normal_distribution_is_right_to_many_digits() {
    assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
    assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
    assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
    assert!((normal_quantile(0.01) + 2.326_348).abs() < 1e-5);
    for p in [0.001, 0.2, 0.5, 0.9, 0.999] {
        assert!((normal_cdf(normal_quantile(p)) - p).abs() < 1e-6, "{p}");
    }
}

#[test]
fn log_normal_lengths_keep_their_mean() {
    let l = Lengths::new(1000.0, 0.8);
    let pts = l.points_above(0.0, 400);
    let mean = pts.iter().sum::<f64>() / pts.len() as f64;
    assert!((mean - 1000.0).abs() / 1000.0 < 0.03, "{mean}");
    assert!((l.partial_mean(1e12) - 1000.0).abs() < 1e-6);
    assert!(l.cdf(l.quantile(0.3)) - 0.3 < 1e-6);
    let fixed = Lengths::new(500.0, 0.0);
    assert_eq!((fixed.cdf(499.0), fixed.cdf(500.0)), (0.0, 1.0));
}

#[test]
fn erlang_c_matches_known_values() {
    // One server: P(wait) = utilisation.
    assert!((erlang_c(1, 0.7) - 0.7).abs() < 1e-12);
    // Two servers, 1 Erlang: 1/3.
    assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    // Unstable and idle.
    assert_eq!(erlang_c(3, 3.5), 1.0);
    assert_eq!(erlang_c(3, 0.0), 0.0);
    // More servers never wait more.
    assert!(erlang_c(10, 8.0) > erlang_c(11, 8.0));
}

#[test]
fn more_load_needs_more_instances_and_none_need_none() {
    let p = profile();
    let slo = SloTargets::default();
    let pol = SloPolicy::default();
    let mut last = Replicas::default();
    for rate in [0.5, 2.0, 8.0, 32.0] {
        let s = size(
            &p,
            &workload(rate, 2000.0, 300.0),
            &slo,
            &pol,
            Replicas::default(),
            &open(),
        );
        assert!(
            s.need.prefill >= last.prefill && s.need.decode >= last.decode,
            "{s:?}"
        );
        assert!(s.at_need.ttft_miss <= pol.miss_budget, "{s:?}");
        assert!(s.at_need.tpot_s <= pol.tpot_target * slo.tpot_s, "{s:?}");
        last = s.need;
    }
    assert!(last.prefill >= 8, "{last:?}");
    let idle = size(
        &p,
        &workload(0.0, 2000.0, 300.0),
        &slo,
        &pol,
        Replicas::default(),
        &open(),
    );
    assert_eq!(idle.need, Replicas::default());
}

#[test]
fn an_over_budget_need_is_split_to_miss_the_fewest() {
    let p = profile();
    let slo = SloTargets::default();
    let pol = SloPolicy::default();
    let w = workload(40.0, 2000.0, 300.0);
    let free = sized(&p, &w, &slo, &pol);
    let budget = free.need.gpus(&p) / 2;
    let b = Bounds {
        min: PerRole {
            prefill: 1,
            decode: 1,
        },
        max: PerRole {
            prefill: None,
            decode: None,
        },
        budget,
        current: None,
    };
    let s = size(&p, &w, &slo, &pol, Replicas::default(), &b);
    assert!(s.target.gpus(&p) <= budget, "{s:?}");
    assert!(s.target.prefill <= s.need.prefill && s.target.decode <= s.need.decode);
    // Neither role is starved to nothing while the other keeps everything.
    assert!(s.target.prefill > 1 && s.target.decode > 1, "{s:?}");
}

#[test]
fn one_fewer_instance_would_break_an_slo() {
    let p = profile();
    let slo = SloTargets::default();
    let pol = SloPolicy::default();
    let s = size(
        &p,
        &workload(20.0, 3000.0, 400.0),
        &slo,
        &pol,
        Replicas::default(),
        &open(),
    );
    let fewer_p = s.one_fewer.prefill.unwrap();
    assert!(fewer_p.ttft_miss > pol.miss_budget, "{s:?}");
    let fewer_d = s.one_fewer.decode.unwrap();
    assert!(
        fewer_d.tpot_s > pol.tpot_target * slo.tpot_s || fewer_d.kv_overflow > pol.miss_budget,
        "{s:?}"
    );
}

#[test]
fn prefill_is_sized_by_queueing_not_by_throughput_alone() {
    // 4 Erlangs of prefill work: throughput alone says 4 instances; a 2 s TTFT with 1 s
    // prompts leaves 1 s of slack, which needs more.
    let p = profile();
    let isl = 8000.0;
    let rate = 4.0 / prefill_time(&p, isl);
    let mut w = workload(rate, isl, 200.0);
    w.isl_cv2 = 0.0;
    let s = sized(&p, &w, &SloTargets::default(), &SloPolicy::default());
    assert!(s.need.prefill > 5, "{s:?}");
    // Burstier arrivals need more.
    w.arrival_cv2 = 4.0;
    let b = sized(&p, &w, &SloTargets::default(), &SloPolicy::default());
    assert!(b.need.prefill > s.need.prefill, "{b:?} vs {s:?}");
}

#[test]
fn the_bypass_follows_the_decode_load() {
    let p = profile();
    let one = PerRole {
        prefill: 1.0,
        decode: 1.0,
    };
    let light = bypass_threshold(&p, one, 8.0, 1000.0, 0.08, 2048);
    let heavy = bypass_threshold(&p, one, 512.0, 1000.0, 0.08, 2048);
    assert!(light > 256, "{light}");
    assert!(heavy < light, "{heavy} vs {light}");
    // A step already over the SLO takes nothing.
    assert_eq!(bypass_threshold(&p, one, 2045.0, 16384.0, 0.08, 2048), 0);
    // In a sizing, the threshold follows the load per decode instance the SLOs call for.
    let s = |rate: f64| {
        let w = workload(rate, 1000.0, 800.0);
        sized(&p, &w, &SloTargets::default(), &SloPolicy::default())
    };
    assert!(
        s(50.0).bypass_max_isl <= s(0.5).bypass_max_isl,
        "{:?}",
        s(50.0)
    );
}

#[test]
fn a_length_aware_slo_makes_long_prompts_feasible() {
    let p = profile();
    let mut w = workload(0.5, 20_000.0, 300.0);
    w.isl_cv2 = 1.0;
    let fixed = sized(&p, &w, &SloTargets::default(), &SloPolicy::default());
    assert!(fixed.infeasible_share > 0.4, "{fixed:?}");
    let aware = SloTargets {
        ttft_per_token_s: 0.0002,
        ..SloTargets::default()
    };
    let s = sized(&p, &w, &aware, &SloPolicy::default());
    assert!(s.infeasible_share < 0.1, "{s:?}");
}

#[test]
fn a_mild_kv_overload_is_absorbed_by_the_tpot_slack() {
    let (p, slo, pol) = (profile(), SloTargets::default(), SloPolicy::default());
    // Arrivals well past what one instance holds, throttled to the concurrency each case needs.
    let w = workload(80.0, 1200.0, 200.0);
    let d = DecodeModel::new(&p, &slo, &pol, &w, 0);
    let slots = p.kv.tokens() as f64 / d.kv_mean;
    let at = |over: f64| {
        let share = (1..=1000)
            .map(|k| f64::from(k) / 1000.0)
            .find(|&s| d.throttled(s).operating_point(1).1 >= over * slots)
            .unwrap();
        let m = d.throttled(share);
        (m, m.operating_point(1).0)
    };
    // A few percent past the sequences that fit: requests prefilled elsewhere have streamed
    // their first token and wait within their time-per-token slack; most stay on time.
    let (mild, t) = at(1.03);
    let late = mild.overflow(1, t);
    assert!(late < 0.25, "{late}");
    // Twice past them, the queue outgrows any slack within a start-up.
    let (heavy, t2) = at(2.0);
    let heavy = heavy.overflow(1, t2);
    assert!(heavy > 0.5 && heavy > late, "{heavy} vs {late}");
    // Prompts prefilled on the instance wait before their first token: less slack.
    let local = DecodeModel {
        local_share: 1.0,
        ..mild
    };
    assert!(
        local.overflow(1, t) > late,
        "{} vs {late}",
        local.overflow(1, t)
    );
}

#[test]
fn the_measured_kv_occupancy_corrects_the_decode_model() {
    let mut t = Tracker::default();
    // The cache holds half again what the model expects.
    for _ in 0..30 {
        t.observe_kv(0.6, 0.4);
    }
    assert!((t.kv_scale - 1.5).abs() < 0.01, "{}", t.kv_scale);
    // A saturated or idle cache says nothing; nonsense is ignored.
    let before = t.kv_scale;
    t.observe_kv(0.97, 0.4);
    t.observe_kv(0.01, 0.4);
    t.observe_kv(f64::NAN, 0.4);
    t.observe_kv(0.5, f64::INFINITY);
    assert_eq!(t.kv_scale, before);
    // Far off, the correction stays within its bounds.
    for _ in 0..60 {
        t.observe_kv(0.8, 0.06);
    }
    assert!(t.kv_scale <= KV_SCALE.1 + 1e-12, "{}", t.kv_scale);
    // A larger measured occupancy asks for more decode instances, a smaller one for fewer.
    let (p, slo, pol) = (profile(), SloTargets::default(), SloPolicy::default());
    let base = workload(60.0, 3000.0, 500.0);
    let with = |scale: f64| {
        let w = Workload {
            kv_scale: scale,
            ..base.clone()
        };
        sized(&p, &w, &slo, &pol).need.decode
    };
    assert!(with(2.0) > with(1.0), "{} vs {}", with(2.0), with(1.0));
    assert!(with(0.5) < with(1.0), "{} vs {}", with(0.5), with(1.0));
    // The reference the measurement is compared with is the uncorrected model.
    let w = Workload {
        kv_scale: 2.0,
        ..base.clone()
    };
    assert_eq!(
        kv_occupancy(&p, &w, &slo, &pol, 0, 4),
        kv_occupancy(&p, &base, &slo, &pol, 0, 4)
    );
}

#[test]
fn a_deadline_first_queue_under_a_length_aware_slo_puts_short_prompts_first() {
    let p = profile();
    let mut w = workload(0.5, 8000.0, 300.0);
    w.isl_cv2 = 1.5;
    let aware = SloTargets {
        ttft_per_token_s: 0.0002,
        ..SloTargets::default()
    };
    let edf = SloPolicy::default();
    let fifo = SloPolicy {
        deadline_first: false,
        ..SloPolicy::default()
    };
    let m = PrefillModel::new(&p, &aware, &edf, &w, 0);
    let c = 3;
    let (short, long) = (m.points[0], m.points[m.points.len() - 1]);
    assert!(
        m.priority_factor(c, short) < 1.0,
        "{}",
        m.priority_factor(c, short)
    );
    assert!(
        m.priority_factor(c, long) > 1.0,
        "{}",
        m.priority_factor(c, long)
    );
    // Priorities move waiting between prompts, not its total: weighted by each prompt's
    // work, the factors average to one (the conservation law Cobham's formula keeps).
    let rho = m.load() / f64::from(c);
    let weighted: f64 = m
        .points
        .iter()
        .map(|&x| m.service(x) * m.priority_factor(c, x))
        .sum::<f64>()
        / m.points.iter().map(|&x| m.service(x)).sum::<f64>();
    assert!(
        rho > 0.05 && (weighted - 1.0).abs() < 1e-9,
        "{weighted} at {rho}"
    );
    // Arrival order, or one deadline offset for every prompt, leaves the wait as it is.
    let m_fifo = PrefillModel::new(&p, &aware, &fifo, &w, 0);
    let fixed = SloTargets::default();
    let m_fixed = PrefillModel::new(&p, &fixed, &edf, &w, 0);
    for &x in &m.points {
        assert_eq!(m_fifo.priority_factor(c, x), 1.0);
        assert!((m_fixed.priority_factor(c, x) - 1.0).abs() < 1e-12);
    }
    // Short prompts that no longer wait behind long ones need no more instances, and fewer at
    // some load.
    let needs: Vec<(u32, u32)> = [0.3, 0.6, 1.0, 1.5, 2.0]
        .iter()
        .map(|&rate| {
            let w = Workload {
                rate_p: rate,
                rate_d: rate,
                rate_now: rate,
                ..w.clone()
            };
            let n = |pol: &SloPolicy| sized(&p, &w, &aware, pol).need.prefill;
            (n(&edf), n(&fifo))
        })
        .collect();
    assert!(needs.iter().all(|(e, f)| e <= f), "{needs:?}");
    assert!(needs.iter().any(|(e, f)| e < f), "{needs:?}");
}
