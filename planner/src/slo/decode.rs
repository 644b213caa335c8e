//! The decode side of the SLO model: the time per output token at the concurrency Little's law
//! gives, KV overflow, and the wait for KV space priced against each request's slack.

use super::*;

/// The decode side: for `n_d` instances, the time per output token, the KV overflow probability
/// and whether both meet the targets.
#[derive(Clone, Copy)]
pub(super) struct DecodeModel<'a> {
    pub(super) profile: &'a Profile,
    pub(super) slo: &'a SloTargets,
    pub(super) policy: &'a SloPolicy,
    pub(super) w: &'a Workload,
    /// Mean context during decode, tokens.
    pub(super) ctx: f64,
    /// KV tokens one request reserves (rounded up to blocks), mean and second moment.
    pub(super) kv_mean: f64,
    pub(super) kv_m2: f64,
    /// Local prefill seconds per second of arrivals (bypassed prompts).
    pub(super) local_prefill: f64,
    /// Arrivals reaching decode, requests per second.
    pub(super) rate: f64,
    /// Observed over modelled KV occupancy.
    pub(super) scale: f64,
    /// Share of requests prefilled here (bypassed).
    pub(super) local_share: f64,
}

impl<'a> DecodeModel<'a> {
    pub(super) fn new(
        profile: &'a Profile,
        slo: &'a SloTargets,
        policy: &'a SloPolicy,
        w: &'a Workload,
        bypass: u32,
    ) -> Self {
        let block = f64::from(profile.kv.block_size.max(1));
        let isl = w.isl_dist();
        let (im, om) = (w.isl.max(1.0), w.osl.max(1.0));
        let (i2, o2) = (im * im * (1.0 + w.isl_cv2), om * om * (1.0 + w.osl_cv2));
        // Reserved tokens X = ISL + OSL (+ half a block lost to rounding).
        let kv_mean = im + om + block / 2.0;
        let kv_m2 = i2 + o2 + 2.0 * im * om + block * kv_mean;
        let from = f64::from(bypass);
        let cost = isl.expect_below(from, &|x| w.kappa.prefill * prefill_time(profile, x));
        Self {
            profile,
            slo,
            policy,
            w,
            ctx: im + om / 2.0,
            kv_mean,
            kv_m2,
            local_prefill: w.rate_d.max(0.0) * cost,
            rate: w.rate_d.max(0.0),
            local_share: isl.cdf(from),
            scale: if w.kv_scale.is_finite() && w.kv_scale > 0.0 {
                w.kv_scale.clamp(KV_SCALE.0, KV_SCALE.1)
            } else {
                1.0
            },
        }
    }

    /// Time per output token at `n_d` instances and the sequences running at once (a fixed
    /// point of Little's law and the profile).
    pub(super) fn operating_point(&self, n_d: u32) -> (f64, f64) {
        let nd = f64::from(n_d.max(1));
        let busy = (self.local_prefill / nd).min(0.95);
        let osl = self.w.osl.max(1.0);
        let mut t = self.w.kappa.decode * self.profile.tpot(1.0, self.ctx) / (1.0 - busy);
        // The batch is the sequences running (Little's law); the KV correction scales what
        // they hold, not how many they are: long outputs stay longer, so the running sequences
        // hold more KV than the mean request, but they are no more numerous.
        let mut running = 0.0;
        for _ in 0..8 {
            running = self.rate * osl * t;
            t = self.w.kappa.decode * self.profile.tpot((running / nd).max(1.0), self.ctx)
                / (1.0 - busy);
        }
        (t, running)
    }

    /// Share of requests that wait for KV space longer than they can afford at `n_d` instances.
    /// A full KV cache does not fail a request: it waits for a running sequence to finish and
    /// free its blocks. So the cache is a queue whose servers are the sequences that fit
    /// (capacity over the mean reservation), each held for OSL x TPOT seconds. A request
    /// prefilled elsewhere has streamed its first token already, so its wait stretches its time
    /// per output token: it can afford `(OSL - 1)·(SLO - t)`. One prefilled here waits before its
    /// first token: half its TTFT allowance.
    pub(super) fn overflow(&self, n_d: u32, t: f64) -> f64 {
        let cap = f64::from(n_d) * self.profile.kv.tokens() as f64;
        let osl = self.w.osl.max(1.0);
        let conc = self.rate * osl * t * self.scale;
        if !(conc > 0.0) {
            return 0.0;
        }
        // Reservations vary: the sequences that fit are fewer than capacity over the mean by
        // about one standard deviation of their sum.
        let slots_mean = cap / self.kv_mean;
        let sd_one = (self.kv_m2 - self.kv_mean * self.kv_mean).max(0.0).sqrt();
        let slots = (cap - sd_one * slots_mean.sqrt()) / self.kv_mean;
        let hold = osl * t * self.scale;
        let c = slots.floor().clamp(0.0, f64::from(u32::MAX / 2));
        // Beyond what fits, the cache serves `c / hold` requests a second and the rest queue:
        // over the horizon it takes to add capacity (a decode start-up), the wait of an arrival
        // grows linearly to `g·T`, `g` the excess over what is served. Within it, waits are
        // those of a stable `c`-server queue.
        let g = if conc >= c {
            (conc - c) / c.max(1.0)
        } else {
            0.0
        };
        let horizon = self.profile.startup_s.decode.max(1.0);
        let c = c as u32;
        let beta = (self.w.arrival_cv2.max(0.0) + self.w.osl_cv2) / 2.0;
        let late_by = |allowance: f64| {
            if c == 0 {
                1.0
            } else if g > 0.0 {
                (1.0 - allowance.max(0.0) / (g * horizon)).clamp(0.0, 1.0)
            } else {
                wait_tail(c, conc, hold, beta, allowance)
            }
        };
        let local = self.local_share.clamp(0.0, 1.0);
        let first = 0.5 * self.slo.ttft_at(self.w.isl.max(1.0));
        let mut late = local * late_by(first);
        if local < 1.0 {
            let spare = (self.slo.tpot_s - t).max(0.0);
            let outputs = Lengths::new(osl, self.w.osl_cv2);
            const N: usize = 8;
            let remote: f64 = (0..N)
                .map(|k| {
                    let o = outputs.quantile((k as f64 + 0.5) / N as f64).max(1.0);
                    late_by((o - 1.0) * spare)
                })
                .sum::<f64>()
                / N as f64;
            late += (1.0 - local) * remote;
        }
        late
    }

    /// Modelled share of the KV cache in use at `n_d` instances (reservations of the running
    /// sequences, the cache full at most).
    pub(super) fn occupancy(&self, n_d: u32) -> f64 {
        let cap = f64::from(n_d.max(1)) * self.profile.kv.tokens() as f64;
        let (_, running) = self.operating_point(n_d);
        (running * self.scale * self.kv_mean / cap.max(1.0)).min(1.0)
    }

    /// The same decode side when only a share of the arrivals reaches it (an overloaded prefill
    /// passes on what it serves).
    pub(super) fn throttled(&self, share: f64) -> Self {
        Self {
            rate: self.rate * share.clamp(0.0, 1.0),
            ..*self
        }
    }

    pub(super) fn predict(&self, n_d: u32) -> (f64, f64) {
        let (t, _) = self.operating_point(n_d);
        (t, self.overflow(n_d, t))
    }

    pub(super) fn ok(&self, n_d: u32) -> bool {
        let (t, overflow) = self.predict(n_d);
        t <= self.policy.tpot_target * self.slo.tpot_s && overflow <= self.policy.miss_budget
    }

    pub(super) fn needed(&self) -> u32 {
        if !(self.rate > 0.0) {
            return 0;
        }
        // Grow geometrically, then bisect on the first count that meets both targets.
        let mut hi = 1u32;
        while !self.ok(hi) && hi < MAX_INSTANCES / 2 {
            hi *= 2;
        }
        let mut lo = hi / 2;
        if lo == 0 {
            return hi;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.ok(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }
}
