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
    /// Each point's prefill time.
    services: Vec<f64>,
    /// For each point, the prefill work (seconds per arriving request) due strictly before it
    /// and no later than it, when a deadline-first queue orders prompts by length (a
    /// length-aware SLO); empty when every prompt waits in arrival order.
    ahead: Vec<(f64, f64)>,
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
        let services: Vec<f64> = points
            .iter()
            .map(|&x| w.kappa.prefill * prefill_time(profile, x))
            .collect();
        let n = points.len() as f64;
        let mean_s = services.iter().sum::<f64>() / n;
        let s2 = services.iter().map(|s| s.powi(2)).sum::<f64>() / n;
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
            ahead: if policy.deadline_first && slo.ttft_per_token_s > 0.0 {
                points
                    .iter()
                    .map(|&x| work_ahead(&points, &services, slo, x))
                    .collect()
            } else {
                Vec::new()
            },
            points,
            services,
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
        let mut late = 0.0;
        let mut counted = 0usize;
        for (i, &x) in self.points.iter().enumerate() {
            let slack = self.slack(x);
            if slack <= 0.0 {
                continue;
            }
            let factor = self.ahead.get(i).map_or(1.0, |&w| self.factor(c, w));
            late += wait_tail(c, a, self.mean_s * factor, self.beta, slack);
            counted += 1;
        }
        if counted == 0 {
            return 0.0;
        }
        late / counted as f64
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
        if self.ahead.is_empty() {
            return 1.0;
        }
        self.factor(c, work_ahead(&self.points, &self.services, self.slo, x))
    }

    /// The factor for work `(before, upto)` due ahead, in seconds per arriving request.
    fn factor(&self, c: u32, (before, upto): (f64, f64)) -> f64 {
        if c == 0 {
            return 1.0;
        }
        let cf = f64::from(c);
        let rho = (self.load() / cf).min(1.0);
        let denom = (1.0 - self.rate * before / cf) * (1.0 - self.rate * upto / cf);
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

/// The prefill work (seconds per arriving request, over the equally likely `points` with
/// their prefill `services`) due strictly before and no later than a prompt of `x` tokens.
fn work_ahead(points: &[f64], services: &[f64], slo: &SloTargets, x: f64) -> (f64, f64) {
    let n = points.len().max(1) as f64;
    let due = slo.ttft_at(x);
    let (mut before, mut upto) = (0.0, 0.0);
    for (&y, &s) in points.iter().zip(services) {
        let d = slo.ttft_at(y);
        if d < due {
            before += s / n;
        }
        if d <= due {
            upto += s / n;
        }
    }
    (before, upto)
}
