//! The prefill side of the SLO model: queueing for `c` prefill instances (Erlang C with a
//! Kingman correction), the TTFT at the miss-budget quantile, and the share that cannot meet it.

use super::*;

/// The prefill side for `c` instances: share of requests missing by waiting, the TTFT of a
/// mean prompt at the miss-budget quantile, and the share that cannot meet it at all.
pub(super) struct PrefillModel<'a> {
    pub(super) profile: &'a Profile,
    pub(super) slo: &'a SloTargets,
    pub(super) policy: &'a SloPolicy,
    pub(super) w: &'a Workload,
    pub(super) lengths: LengthDist,
    pub(super) bypass: f64,
    pub(super) rate: f64,
    pub(super) mean_s: f64,
    pub(super) beta: f64,
    pub(super) points: Vec<f64>,
}

impl<'a> PrefillModel<'a> {
    pub(super) fn new(
        profile: &'a Profile,
        slo: &'a SloTargets,
        policy: &'a SloPolicy,
        w: &'a Workload,
        bypass: u32,
    ) -> Self {
        let lengths = w.isl_dist();
        let from = f64::from(bypass);
        let points = lengths.points_above(from, 16);
        let service = |x: f64| w.kappa.prefill * prefill_time(profile, x);
        let mean_s = points.iter().map(|&x| service(x)).sum::<f64>() / points.len() as f64;
        let s2 = points.iter().map(|&x| service(x).powi(2)).sum::<f64>() / points.len() as f64;
        let cs2 = if mean_s > 0.0 {
            (s2 / (mean_s * mean_s) - 1.0).max(0.0)
        } else {
            0.0
        };
        Self {
            profile,
            slo,
            policy,
            w,
            bypass: lengths.cdf(from),
            rate: w.rate_p.max(0.0) * (1.0 - lengths.cdf(from)),
            lengths,
            mean_s,
            beta: (w.arrival_cv2.max(0.0) + cs2) / 2.0,
            points,
        }
    }

    pub(super) fn service(&self, x: f64) -> f64 {
        self.w.kappa.prefill * prefill_time(self.profile, x)
    }

    pub(super) fn slack(&self, x: f64) -> f64 {
        self.policy.ttft_target * self.slo.ttft_at(x)
            - self.service(x)
            - self.w.transfer_s_per_token * x
    }

    pub(super) fn load(&self) -> f64 {
        self.rate * self.mean_s
    }

    pub(super) fn infeasible(&self) -> f64 {
        let n = self.points.len() as f64;
        self.points
            .iter()
            .filter(|&&x| self.slack(x) <= 0.0)
            .count() as f64
            / n
    }

    /// Share of the feasible requests expected to wait past their slack with `c` instances (an
    /// overloaded queue serves about `c/a` of its demand in time).
    pub(super) fn miss(&self, c: u32) -> f64 {
        let a = self.load();
        if a >= f64::from(c) {
            return 1.0 - f64::from(c) / a * 0.5;
        }
        let feasible: Vec<f64> = self
            .points
            .iter()
            .copied()
            .filter(|&x| self.slack(x) > 0.0)
            .collect();
        if feasible.is_empty() {
            return 0.0;
        }
        feasible
            .iter()
            .map(|&x| {
                let mean = self.mean_s * self.priority_factor(c, x);
                wait_tail(c, a, mean, self.beta, self.slack(x))
            })
            .sum::<f64>()
            / feasible.len() as f64
    }

    /// How a prompt of `x` tokens' wait compares with the arrival-order wait, when the queue
    /// serves the earliest deadline first: it waits behind the work due no later than itself
    /// (under a length-aware TTFT SLO, the shorter prompts'), not behind everything queued.
    /// Each deadline class's mean wait scales as in the non-preemptive M/G/1 priority queue
    /// (Cobham's formula, which Bondi and Buzen carry over to `c` servers):
    /// `(1 - rho) / ((1 - sigma_before) (1 - sigma_upto))`, with `rho` the instances'
    /// utilisation and the sigmas that of the work due strictly before and no later than `x`.
    /// A fixed SLO gives every prompt one deadline offset and the factor 1; so does an
    /// arrival-order queue.
    pub(super) fn priority_factor(&self, c: u32, x: f64) -> f64 {
        if !self.policy.deadline_first || self.points.is_empty() || c == 0 {
            return 1.0;
        }
        let per_point = self.rate / (self.points.len() as f64 * f64::from(c));
        let due = self.slo.ttft_at(x);
        let (mut before, mut upto) = (0.0, 0.0);
        for &y in &self.points {
            let u = per_point * self.service(y);
            let d = self.slo.ttft_at(y);
            if d < due {
                before += u;
            }
            if d <= due {
                upto += u;
            }
        }
        let rho = (self.load() / f64::from(c)).min(1.0);
        let denom = (1.0 - before) * (1.0 - upto);
        if rho >= 1.0 || denom <= 0.0 {
            return 1.0;
        }
        ((1.0 - rho) / denom).max(0.0)
    }

    /// TTFT of a mean-length prompt at the miss-budget quantile of its wait.
    pub(super) fn ttft(&self, c: u32) -> f64 {
        let a = self.load();
        let cf = f64::from(c);
        let x = self.lengths.mean().max(1.0);
        let base = self.service(x) + self.w.transfer_s_per_token * x;
        if a >= cf {
            return f64::INFINITY;
        }
        let pw = erlang_c(c, a);
        let eps = self.policy.miss_budget.max(1e-6);
        let wait = if pw <= eps {
            0.0
        } else {
            (pw / eps).ln() * self.beta * self.mean_s * self.priority_factor(c, x) / (cf - a)
        };
        base + wait
    }

    /// Fewest instances within the miss budget (or, when no wait is affordable, keeping the mean
    /// wait under a quarter of a service), stable at 90% utilisation at most.
    pub(super) fn needed(&self) -> u32 {
        let a = self.load();
        if !(a > 0.0) {
            return 0;
        }
        let mut c = ceil_count(a / 0.9).max(1);
        while c < MAX_INSTANCES {
            let ok = if self.infeasible() >= 1.0 {
                let cf = f64::from(c);
                erlang_c(c, a) * self.beta * self.mean_s / (cf - a) <= 0.25 * self.mean_s
            } else {
                self.miss(c) <= self.policy.miss_budget
            };
            if ok {
                return c;
            }
            c += 1;
        }
        c
    }
}
