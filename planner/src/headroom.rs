//! Headroom for the cluster autoscaler: how many placeholder pods, sized like a worker, to keep so
//! GPU nodes are up before the forecast load arrives.
//!
//! A new instance is useful only `startup_s` after it is asked for (node provisioning, image pull,
//! weight load). So the operator keeps low-priority placeholders for the instances the *upper*
//! bound of the forecast would need over that horizon, beyond the current target; the autoscaler
//! (or Karpenter) provisions nodes for them, and when the planner scales up, real workers preempt
//! them and start on warm nodes.
//!
//! The forecasters predict one interval ahead. Over `h` intervals the upper bound is widened like
//! a random walk's: `point + (upper - point) * sqrt(h)`. Placeholders never take the service past
//! its GPU budget: `target + placeholders` fits in it.

use serde::{Deserialize, Serialize};

use crate::forecast::Forecast;
use crate::forecast::WorkloadForecast;
use crate::profile::{PerRole, Profile, Role};
use crate::sizing::{self, Replicas, SizingConfig, SizingInput};

/// The headroom decision and what it was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Headroom {
    /// Placeholder pods per role.
    pub placeholders: Replicas,
    /// Instances the upper bound would need at each role's horizon.
    pub upper: Replicas,
    /// Each role's start-up horizon, in planner intervals.
    pub horizon_intervals: PerRole<u32>,
}

/// Planner intervals one start-up spans (at least one).
pub fn horizon_intervals(startup_s: f64, interval_s: f64) -> u32 {
    if !(startup_s.is_finite() && startup_s > 0.0 && interval_s.is_finite() && interval_s > 0.0) {
        return 1;
    }
    ((startup_s / interval_s).ceil() as u32).max(1)
}

/// The upper bound of a one-step forecast widened to `h` steps.
pub fn horizon_upper(f: Forecast, h: u32) -> f64 {
    let width = (f.upper - f.point).max(0.0);
    let v = f.point + width * f64::from(h.max(1)).sqrt();
    if v.is_finite() { v.max(0.0) } else { 0.0 }
}

/// Placeholders per role: what `upper` needs beyond `target`, trimmed (largest GPU user first)
/// until `target + placeholders` fits in `budget` GPUs.
pub fn placeholders(
    target: Replicas,
    upper: Replicas,
    gpus: PerRole<u32>,
    budget: u32,
) -> Replicas {
    let mut p = PerRole {
        prefill: upper.prefill.saturating_sub(target.prefill),
        decode: upper.decode.saturating_sub(target.decode),
    };
    let used = |p: &Replicas| {
        (target.prefill + p.prefill) * gpus.prefill + (target.decode + p.decode) * gpus.decode
    };
    while used(&p) > budget && (p.prefill > 0 || p.decode > 0) {
        let cost_p = p.prefill * gpus.prefill;
        let cost_d = p.decode * gpus.decode;
        if p.prefill > 0 && (cost_p >= cost_d || p.decode == 0) {
            p.prefill -= 1;
        } else {
            p.decode -= 1;
        }
    }
    p
}

/// The headroom for a decision's `target` given its forecast: DOPD sizing at each role's
/// horizon-widened upper bound of requests (mean ISL and OSL at their point forecasts), minus the
/// target, within the budget.
pub fn plan(
    profile: &Profile,
    cfg: &SizingConfig,
    forecast: &WorkloadForecast,
    kappa: PerRole<f64>,
    interval_s: f64,
    target: Replicas,
) -> Headroom {
    let h = PerRole {
        prefill: horizon_intervals(profile.startup_s.prefill, interval_s),
        decode: horizon_intervals(profile.startup_s.decode, interval_s),
    };
    let upper_at = |role: Role| {
        let input = SizingInput {
            requests: horizon_upper(forecast.requests, h.get(role)),
            interval_s,
            kappa_d: kappa.decode,
            kappa_p: kappa.prefill,
            ..SizingInput::new(0.0, forecast.isl.point, forecast.osl.point)
        };
        sizing::size_dopd(profile, &input, cfg).replicas.get(role)
    };
    let upper = PerRole {
        prefill: upper_at(Role::Prefill),
        decode: upper_at(Role::Decode),
    };
    Headroom {
        placeholders: placeholders(target, upper, profile.gpus, cfg.gpu_budget),
        upper,
        horizon_intervals: h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fc(point: f64, upper: f64) -> Forecast {
        Forecast {
            point,
            lower: 0.0,
            upper,
        }
    }

    #[test]
    fn the_horizon_counts_whole_intervals() {
        assert_eq!(horizon_intervals(90.0, 30.0), 3);
        assert_eq!(horizon_intervals(91.0, 30.0), 4);
        assert_eq!(horizon_intervals(5.0, 30.0), 1);
        assert_eq!(horizon_intervals(f64::NAN, 30.0), 1);
        assert_eq!(horizon_upper(fc(100.0, 120.0), 1), 120.0);
        assert_eq!(horizon_upper(fc(100.0, 120.0), 4), 140.0);
        assert_eq!(horizon_upper(fc(f64::NAN, 1.0), 4), 0.0);
    }

    #[test]
    fn placeholders_cover_the_gap_within_the_budget() {
        let r = |p, d| PerRole {
            prefill: p,
            decode: d,
        };
        let g = r(1, 2);
        assert_eq!(placeholders(r(2, 1), r(4, 2), g, 100), r(2, 1));
        assert_eq!(placeholders(r(4, 2), r(2, 1), g, 100), r(0, 0));
        // 2 + 1*2 = 4 GPUs used; budget 7 leaves 3: the larger GPU user (decode) shrinks first.
        assert_eq!(placeholders(r(2, 1), r(4, 2), g, 7), r(1, 1));
        assert_eq!(placeholders(r(2, 1), r(4, 2), g, 4), r(0, 0));
    }

    #[test]
    fn more_uncertainty_and_longer_start_up_mean_more_placeholders() {
        let profile = crate::profile::roofline::RooflineSpec::preset("llama-3.3-70b-fp8-h100")
            .expect("preset")
            .build()
            .expect("profile");
        let cfg = SizingConfig {
            gpu_budget: 64,
            ..SizingConfig::default()
        };
        let wf = |upper| WorkloadForecast {
            requests: fc(300.0, upper),
            isl: fc(1000.0, 1000.0),
            osl: fc(250.0, 250.0),
        };
        let kappa = PerRole {
            prefill: 1.0,
            decode: 1.0,
        };
        let target =
            sizing::size_dopd(&profile, &SizingInput::new(300.0, 1000.0, 250.0), &cfg).replicas;
        let none = plan(&profile, &cfg, &wf(300.0), kappa, 30.0, target);
        assert_eq!(
            none.placeholders,
            PerRole {
                prefill: 0,
                decode: 0
            }
        );
        let some = plan(&profile, &cfg, &wf(600.0), kappa, 30.0, target);
        let total = |h: &Headroom| h.placeholders.prefill + h.placeholders.decode;
        assert!(total(&some) > 0, "{some:?}");
        // A shorter interval means more intervals per start-up: a wider bound.
        let short = plan(&profile, &cfg, &wf(600.0), kappa, 5.0, target);
        assert!(short.horizon_intervals.decode > some.horizon_intervals.decode);
        assert!(total(&short) >= total(&some), "{short:?} vs {some:?}");
    }

    proptest! {
        #[test]
        fn never_past_the_budget(tp in 0u32..20, td in 0u32..20, up in 0u32..40, ud in 0u32..40,
                                 gp in 1u32..8, gd in 1u32..8, budget in 0u32..200) {
            let target = PerRole { prefill: tp, decode: td };
            let gpus = PerRole { prefill: gp, decode: gd };
            let p = placeholders(target, PerRole { prefill: up, decode: ud }, gpus, budget);
            let base = tp * gp + td * gd;
            let with = (tp + p.prefill) * gp + (td + p.decode) * gd;
            // Within the budget whenever the target itself fits; never more than the gap.
            prop_assert!(with <= budget.max(base));
            prop_assert!(p.prefill <= up.saturating_sub(tp) && p.decode <= ud.saturating_sub(td));
            // Only trimmed when needed: with an unlimited budget the whole gap is kept.
            let full = placeholders(target, PerRole { prefill: up, decode: ud }, gpus, u32::MAX / 4);
            prop_assert_eq!(full, PerRole { prefill: up.saturating_sub(tp), decode: ud.saturating_sub(td) });
        }
    }
}
