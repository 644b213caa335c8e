//! What the SLO-aware policy learns from each interval's observation.

use serde::{Deserialize, Serialize};

use super::{SloPolicy, SloTargets};
use crate::profile::PerRole;
use crate::sizing::Replicas;

/// What the SLO-aware policy learns from the observations: the lengths' means and spread, the
/// arrivals' burstiness and trend, and extra instances per role that grow while the role's
/// observed latencies miss the SLO though the model says it has enough, and decay back when they
/// do not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tracker {
    /// Squared coefficients of variation of prompt and output lengths (smoothed).
    pub isl_cv2: f64,
    pub osl_cv2: f64,
    /// Index of dispersion of arrival counts from one interval to the next (smoothed; 1 =
    /// Poisson): how bursty the load is at the scale of intervals.
    pub dispersion: f64,
    /// Squared coefficient of variation of the arrival rate's swings from one interval to the
    /// next beyond Poisson noise (smoothed; 0 = a level rate): how far the load moves relative
    /// to its level. Unlike the index of dispersion it does not grow with the rate, so a busy
    /// but level load and a load that falls quiet and comes back are told apart.
    #[serde(default)]
    pub swing: f64,
    /// Squared coefficient of variation of the gaps between arrivals within intervals
    /// (smoothed; 1 = Poisson; `None` until measured): how bursty the load is at the scale of a
    /// queue.
    #[serde(default)]
    pub arrival_cv2: Option<f64>,
    /// Instances the closed loop adds per role, on top of the model's need.
    pub extra: PerRole<f64>,
    /// Whether each role's last target was held below its need (by a maximum or the budget):
    /// then its misses are no news about the model.
    pub bound: PerRole<bool>,
    /// Each role's last target.
    pub last_target: Replicas,
    /// Mean prompt and output lengths over roughly the last `LENGTH_MEMORY` requests (steadier
    /// than one interval's mean, which a few long prompts can swing).
    pub isl: Option<f64>,
    pub osl: Option<f64>,
    /// The prompt-length distribution over the same memory (shares of the length histogram's
    /// buckets).
    pub isl_shares: Option<Vec<f64>>,
    /// Observed over modelled KV occupancy of the decode instances (smoothed; 1 until measured).
    pub kv_scale: f64,
    counts: std::collections::VecDeque<f64>,
    /// Arrival counts and the point forecasts made at the same ticks (newest last), for the
    /// forecast's surges.
    history: std::collections::VecDeque<(f64, Option<f64>)>,
    /// Recent surges: the forecast made at the start of a start-up horizon (at least 1) and how
    /// many requests the busiest interval within it rose above that forecast, beyond Poisson
    /// noise.
    surges: std::collections::VecDeque<(f64, f64)>,
    /// The start-up horizon, intervals, the surges are measured over.
    horizon: u32,
}

/// Surges remembered (at 10 s intervals, half an hour).
const SURGE_MEMORY: usize = 180;

/// Requests the smoothed lengths remember.
const LENGTH_MEMORY: f64 = 200.0;

impl Default for Tracker {
    fn default() -> Self {
        Self {
            isl_cv2: 1.0,
            osl_cv2: 1.0,
            dispersion: 1.0,
            swing: 0.0,
            arrival_cv2: None,
            extra: PerRole {
                prefill: 0.0,
                decode: 0.0,
            },
            bound: PerRole {
                prefill: false,
                decode: false,
            },
            last_target: Replicas::default(),
            isl: None,
            osl: None,
            isl_shares: None,
            kv_scale: 1.0,
            counts: std::collections::VecDeque::new(),
            history: std::collections::VecDeque::new(),
            surges: std::collections::VecDeque::new(),
            horizon: 1,
        }
    }
}

/// Share of a latency histogram's observations above `t` seconds.
pub fn share_above(h: &crate::load::Histogram, t: f64) -> Option<f64> {
    if h.count == 0 {
        return None;
    }
    let bounds = crate::load::latency_bounds_s();
    if h.counts.len() != bounds.len() + 1 {
        return None;
    }
    let mut above = 0.0;
    for (k, &n) in h.counts.iter().enumerate() {
        let lo = if k == 0 { 0.0 } else { bounds[k - 1] };
        let hi = bounds.get(k).copied().unwrap_or(f64::INFINITY);
        if lo >= t {
            above += n as f64;
        } else if hi > t && hi.is_finite() {
            above += n as f64 * (hi - t) / (hi - lo);
        } else if !hi.is_finite() {
            above += n as f64;
        }
    }
    Some((above / h.count as f64).clamp(0.0, 1.0))
}

impl Tracker {
    /// Remembers the point forecast (requests in the next interval) made at this tick and the
    /// start-up horizon, in intervals, it has to hold over.
    pub fn record_forecast(&mut self, point: f64, horizon: u32) {
        self.horizon = horizon.max(1);
        if let Some(last) = self.history.back_mut() {
            last.1 = point.is_finite().then_some(point.max(0.0));
        }
    }

    /// The upper surge over the forecast a start-up horizon has seen recently (its 90th
    /// percentile, relative to the forecast; 0 until a dozen horizons have been measured).
    pub fn surge(&self) -> f64 {
        if self.surges.len() < 12 {
            return 0.0;
        }
        let mut v: Vec<f64> = self
            .surges
            .iter()
            .map(|(at, above)| (above / at).min(4.0))
            .collect();
        v.sort_by(f64::total_cmp);
        crate::stats::nearest_rank(&v, 0.9)
    }

    /// The upper surge, in requests above the forecast, that start-up horizons beginning at a
    /// forecast like `forecast` (within a factor of two; below one request counts as one) have
    /// seen recently: the 90th percentile, once a dozen such horizons were measured.
    pub fn surge_near(&self, forecast: f64) -> Option<f64> {
        let b = if forecast.is_finite() {
            forecast.max(1.0)
        } else {
            return None;
        };
        let mut v: Vec<f64> = self
            .surges
            .iter()
            .filter(|(at, _)| *at >= b / 2.0 && *at <= b * 2.0)
            .map(|(_, above)| *above)
            .collect();
        if v.len() < 12 {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(crate::stats::nearest_rank(&v, 0.9))
    }

    /// The arrival trend, requests per interval per interval: the least-squares slope of the
    /// last counts when it stands out of their noise (t-statistic above 2), else 0.
    pub fn trend(&self) -> f64 {
        let recent: Vec<f64> = self.counts.iter().rev().take(6).rev().copied().collect();
        if recent.len() < 4 {
            return 0.0;
        }
        match crate::stats::trend_line(&recent) {
            Some((slope, se)) if slope.is_finite() && (se == 0.0 || slope.abs() > 2.0 * se) => {
                slope
            }
            _ => 0.0,
        }
    }

    /// The arrivals' squared coefficient of variation for a queue's waits: the measured gaps'
    /// when the source times its arrivals, else the counts' index of dispersion (which also
    /// holds the rate's swings from one interval to the next).
    pub fn queue_arrival_cv2(&self) -> f64 {
        self.arrival_cv2.unwrap_or(self.dispersion)
    }

    /// Learns how the decode instances' measured KV occupancy compares with the model's
    /// (`modelled`, for the interval's arrivals at the counts that served them). Only a cache
    /// that is neither nearly empty nor saturated says how much the running sequences hold.
    pub fn observe_kv(&mut self, observed: f64, modelled: f64) {
        if !(observed.is_finite() && modelled.is_finite()) {
            return;
        }
        if !(0.05..=0.9).contains(&observed) || !(0.05..=0.95).contains(&modelled) {
            return;
        }
        let (lo, hi) = super::KV_SCALE;
        let r = (observed / modelled).clamp(lo, hi);
        self.kv_scale = (self.kv_scale + 0.3 * (r - self.kv_scale)).clamp(lo, hi);
    }

    /// Learns from one interval's observation.
    pub fn observe(
        &mut self,
        obs: &crate::observation::Observation,
        slo: &SloTargets,
        p: &SloPolicy,
    ) {
        let smooth = |old: f64, new: f64, w: f64| old + w * (new - old);
        let cv2 = |m: Option<f64>, m2: Option<f64>| match (m, m2) {
            (Some(m), Some(m2)) if m > 0.0 && m2.is_finite() => Some((m2 / (m * m) - 1.0).max(0.0)),
            _ => None,
        };
        // Weigh an interval by how much it saw (a handful of requests says little).
        let weight = |n: f64| (n / 50.0).clamp(0.0, 0.3);
        if let Some(c) = cv2(obs.mean_isl, obs.isl_sq_mean) {
            self.isl_cv2 = smooth(self.isl_cv2, c.min(25.0), weight(obs.requests));
        }
        if let Some(c) = cv2(obs.mean_osl, obs.osl_sq_mean) {
            self.osl_cv2 = smooth(self.osl_cv2, c.min(25.0), weight(obs.finished));
        }
        if let Some(c) = obs.arrival_cv2.filter(|c| c.is_finite() && *c >= 0.0) {
            let c = c.min(16.0);
            self.arrival_cv2 = Some(match self.arrival_cv2 {
                Some(old) => smooth(old, c, weight(obs.requests)),
                None => c,
            });
        }
        // Count-weighted means: an interval of n requests moves them by n / (n + memory).
        let blend = |old: Option<f64>, new: Option<f64>, n: f64| match (old, new) {
            (_, Some(v)) if !(v.is_finite() && v > 0.0) => old,
            (None, Some(v)) => Some(v),
            (Some(o), Some(v)) if n > 0.0 => Some(o + (v - o) * n / (n + LENGTH_MEMORY)),
            (o, _) => o,
        };
        self.isl = blend(self.isl, obs.mean_isl, obs.requests.max(0.0));
        self.osl = blend(self.osl, obs.mean_osl, obs.finished.max(0.0));
        if let Some(new) = obs.isl_hist.as_ref().and_then(|h| h.shares()) {
            let n = obs.requests.max(0.0);
            self.isl_shares = Some(match self.isl_shares.take() {
                Some(old) if old.len() == new.len() => {
                    let w = n / (n + LENGTH_MEMORY);
                    old.iter().zip(&new).map(|(o, v)| o + (v - o) * w).collect()
                }
                _ => new,
            });
        }
        let n = if obs.requests.is_finite() {
            obs.requests.max(0.0)
        } else {
            0.0
        };
        self.counts.push_back(n);
        self.history.push_back((n, None));
        while self.history.len() > 64 {
            self.history.pop_front();
        }
        let h = self.horizon as usize;
        if self.history.len() > h {
            let at = self.history.len() - 1 - h;
            if let Some(f) = self.history[at].1 {
                let busiest = self
                    .history
                    .iter()
                    .skip(at + 1)
                    .map(|x| x.0)
                    .fold(0.0, f64::max);
                let base = f.max(1.0);
                let above = (busiest - f - 2.0 * base.sqrt()).max(0.0);
                self.surges.push_back((base, above));
                while self.surges.len() > SURGE_MEMORY {
                    self.surges.pop_front();
                }
            }
        }
        while self.counts.len() > 12 {
            self.counts.pop_front();
        }
        if self.counts.len() >= 4 {
            let mean = self.counts.iter().sum::<f64>() / self.counts.len() as f64;
            if mean >= 2.0 {
                // Differences remove slow trends; half their mean square estimates the variance.
                let d2: Vec<f64> = self
                    .counts
                    .iter()
                    .zip(self.counts.iter().skip(1))
                    .map(|(a, b)| (b - a).powi(2))
                    .collect();
                let var = d2.iter().sum::<f64>() / d2.len() as f64 / 2.0;
                self.dispersion = smooth(self.dispersion, (var / mean).clamp(1.0, 16.0), 0.3);
                let swing = ((var - mean) / (mean * mean)).clamp(0.0, 4.0);
                self.swing = smooth(self.swing, swing, 0.3);
            }
        }
        if !p.closed_loop {
            return;
        }
        let isl = obs.mean_isl.unwrap_or(0.0);
        let misses = [
            obs.ttft_hist.as_ref().and_then(|h| {
                (h.count >= 10)
                    .then(|| share_above(h, slo.ttft_at(isl)))
                    .flatten()
            }),
            obs.itl_hist.as_ref().and_then(|h| {
                (h.count >= 10)
                    .then(|| share_above(h, slo.tpot_s))
                    .flatten()
            }),
        ];
        for (k, miss) in misses.into_iter().enumerate() {
            let (extra, bound, last) = if k == 0 {
                (
                    &mut self.extra.prefill,
                    self.bound.prefill,
                    self.last_target.prefill,
                )
            } else {
                (
                    &mut self.extra.decode,
                    self.bound.decode,
                    self.last_target.decode,
                )
            };
            let cap = (p.max_correction - 1.0).max(0.0) * f64::from(last.max(1));
            match miss {
                // The model said the role was enough, and it missed: one more instance (a tenth
                // more for large roles), up to the cap.
                Some(m) if m > 5.0 * p.miss_budget && !bound => {
                    *extra = (*extra + (0.1 * f64::from(last)).max(1.0)).min(cap);
                }
                _ => {
                    *extra *= 0.9;
                    if *extra < 0.5 {
                        *extra = 0.0;
                    }
                }
            }
        }
    }
}
