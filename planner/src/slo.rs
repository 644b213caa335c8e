//! SLO-aware sizing: how many prefill and decode instances keep the TTFT and TPOT SLOs for a
//! forecast workload, from a queueing model of each role on the performance profile.
//!
//! **Prefill** is a multi-server queue. Requests arrive at rate `λ_P` (those the router does not
//! prefill on decode instances), each needs `S(ISL) = κ_P·TTFT(ISL)` of one instance. With `c`
//! instances and offered load `a = λ_P·E[S]`, a request waits with the Erlang-C probability
//! `C(c, a)`, and a wait longer than `t` has probability
//! `C(c, a)·exp(−(c − a)·t / (β·E[S]))`, where `β = (C_a² + C_s²)/2` stretches the M/M/c tail for
//! burstier arrivals and more variable service (Kingman's correction). A request of length `x`
//! meets its TTFT SLO when its wait is below its slack `T_TTFT(x) − S(x) − transfer(x)`. Prefill
//! gets the fewest instances whose expected share of misses, over the prompt-length distribution
//! (log-normal with the observed mean and variance), is within its miss budget.
//!
//! **Decode** holds each request's KV blocks (`ISL + OSL` tokens) for `OSL·t` seconds, `t` the
//! time per output token. The KV tokens in use are a sum over concurrent requests (Little's law for
//! the mean; Poisson-like, widened by the arrivals' dispersion, for the spread): decode gets enough
//! instances that the KV demand exceeds their capacity with probability within its miss budget,
//! and that each instance's concurrency keeps `κ_D·TPOT(n, ctx)`, slowed by the prompts it
//! prefills itself, within the TPOT target.
//!
//! **Bypass.** A prompt is prefilled on a decode instance only when a decode step carrying its
//! prefill still meets the TPOT SLO at the current decode load: the threshold follows the profile
//! and the load instead of a fixed 511 tokens.
//!
//! Everything here is a pure function of its inputs.

use serde::{Deserialize, Serialize};

use crate::profile::{PerRole, Profile};
use crate::sizing::{MAX_INSTANCES, Replicas};

/// The service's SLOs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SloTargets {
    /// TTFT, seconds: `ttft_s + ttft_per_token_s · ISL` (a per-token allowance makes it
    /// length-aware).
    pub ttft_s: f64,
    pub ttft_per_token_s: f64,
    /// Time per output token, seconds.
    pub tpot_s: f64,
}

impl Default for SloTargets {
    fn default() -> Self {
        Self {
            ttft_s: 2.0,
            ttft_per_token_s: 0.0,
            tpot_s: 0.08,
        }
    }
}

impl SloTargets {
    /// The TTFT SLO of a prompt of `isl` tokens.
    pub fn ttft_at(&self, isl: f64) -> f64 {
        self.ttft_s + self.ttft_per_token_s * isl.max(0.0)
    }
}

/// Settings of the SLO-aware policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SloPolicy {
    /// Share of requests each role may let miss its SLO by queueing (the rest of the miss budget
    /// is for what no count fixes).
    pub miss_budget: f64,
    /// Size so the modelled TTFT stays within this fraction of the SLO (headroom for what the
    /// model does not see).
    pub ttft_target: f64,
    /// Size so the modelled TPOT stays within this fraction of the SLO.
    pub tpot_target: f64,
    /// Largest prompt ever prefilled on a decode instance, tokens.
    pub max_bypass_isl: u32,
    /// Most of their time decode instances spend prefilling bypassed prompts.
    pub max_local_prefill_share: f64,
    /// Derive the bypass threshold from the profile and the load (off: the routing config's
    /// fixed threshold).
    pub bypass_from_profile: bool,
    /// Size each role for the load at the end of its start-up horizon when arrivals trend up
    /// (off: the next interval's forecast).
    pub burst_ready: bool,
    /// A role shrinks only after its surplus has lasted this many of its start-ups (0: the
    /// planner's `scale_down_stabilization_s`).
    pub hold_startups: f64,
    /// Add instances to a role whose observed latencies miss the SLO while the model says it has
    /// enough (off: open loop).
    pub closed_loop: bool,
    /// Most the closed loop may raise a role's count, as a factor of its last target.
    pub max_correction: f64,
    /// The bypass threshold when it is not derived (the routing's fixed setting).
    pub fixed_bypass_isl: u32,
    /// KV link bandwidth between prefill and decode, bytes/s (0: transfers not modelled).
    pub kv_link_bytes_per_s: f64,
}

impl Default for SloPolicy {
    fn default() -> Self {
        Self {
            miss_budget: 0.005,
            ttft_target: 0.9,
            tpot_target: 0.85,
            max_bypass_isl: 2048,
            max_local_prefill_share: 0.3,
            bypass_from_profile: true,
            burst_ready: true,
            hold_startups: 3.0,
            closed_loop: true,
            max_correction: 1.25,
            fixed_bypass_isl: 511,
            kv_link_bytes_per_s: 0.0,
        }
    }
}

/// What the sizing knows of the next interval's workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Arrival rate to size prefill for, requests per second.
    pub rate_p: f64,
    /// Arrival rate to size decode for.
    pub rate_d: f64,
    /// The next interval's arrival rate (without readiness for what comes later): when the
    /// budget cannot hold the need, it is split to serve this load best.
    #[serde(default)]
    pub rate_now: f64,
    /// Mean prompt length and its squared coefficient of variation.
    pub isl: f64,
    pub isl_cv2: f64,
    /// Mean output length and its squared coefficient of variation.
    pub osl: f64,
    pub osl_cv2: f64,
    /// Index of dispersion of arrivals (variance over mean of counts; 1 for Poisson).
    pub dispersion: f64,
    /// Observed over profiled latency, per role.
    pub kappa: PerRole<f64>,
    /// KV transfer seconds per prompt token (0: not modelled).
    pub transfer_s_per_token: f64,
    /// Decode concurrency per instance now (reported; the bypass threshold is derived from the
    /// workload instead, so that it cannot feed back on itself).
    pub decode_concurrency: f64,
    /// The measured prompt-length distribution (shares of the length histogram's buckets), when
    /// there is one; else a log-normal with `isl` and `isl_cv2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isl_shares: Option<Vec<f64>>,
}

impl Workload {
    fn isl_dist(&self) -> LengthDist {
        LengthDist::new(self.isl_shares.as_deref(), self.isl, self.isl_cv2)
    }
}

/// The model's prediction for a count of instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Share of prefilled requests expected to miss the TTFT SLO by waiting.
    pub ttft_miss: f64,
    /// TTFT of a mean-length prompt at the miss-budget quantile of waits, seconds.
    pub ttft_s: f64,
    /// Time per output token at the instances' concurrency, seconds.
    pub tpot_s: f64,
    /// Probability that the KV demand exceeds the decode instances' capacity.
    pub kv_overflow: f64,
}

/// An SLO-aware sizing and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SloSizing {
    /// Counts the SLOs need (with the closed loop's extra instances; before minimums, maximums
    /// and the budget).
    pub need: Replicas,
    /// Counts to run: the need within the minimums, maximums and the budget.
    pub target: Replicas,
    /// Prompts up to this many tokens are prefilled on decode instances.
    pub bypass_max_isl: u32,
    /// Share of requests that bypass prefill.
    pub bypass_share: f64,
    /// Prefill's offered load (instances' worth of work) and decode's concurrency.
    pub prefill_load: f64,
    pub decode_concurrency: f64,
    /// Share of prefilled requests whose own prefill exceeds their TTFT SLO (no count helps).
    pub infeasible_share: f64,
    /// Predictions at `target`, and with one instance fewer of each role.
    pub at_need: Prediction,
    pub one_fewer: PerRole<Option<Prediction>>,
}

// === distributions ===

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 through erf; |error| < 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-z * z).exp();
    let erf = if z >= 0.0 { y } else { -y };
    0.5 * (1.0 + erf)
}

/// Standard normal quantile (Acklam's rational approximation; relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// A log-normal length distribution with a given mean and squared coefficient of variation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lengths {
    mean: f64,
    mu: f64,
    sigma: f64,
}

impl Lengths {
    pub fn new(mean: f64, cv2: f64) -> Self {
        let mean = if mean.is_finite() && mean > 0.0 {
            mean
        } else {
            1.0
        };
        let s2 = if cv2.is_finite() && cv2 > 0.0 {
            (1.0 + cv2.min(100.0)).ln()
        } else {
            0.0
        };
        Self {
            mean,
            mu: mean.ln() - s2 / 2.0,
            sigma: s2.sqrt(),
        }
    }

    /// `P(X <= x)`.
    pub fn cdf(&self, x: f64) -> f64 {
        if x <= 0.0 {
            return 0.0;
        }
        if self.sigma == 0.0 {
            return if self.mean <= x { 1.0 } else { 0.0 };
        }
        normal_cdf((x.ln() - self.mu) / self.sigma)
    }

    /// `E[X; X <= x]` (the partial mean).
    pub fn partial_mean(&self, x: f64) -> f64 {
        if x <= 0.0 {
            return 0.0;
        }
        if self.sigma == 0.0 {
            return if self.mean <= x { self.mean } else { 0.0 };
        }
        self.mean * normal_cdf((x.ln() - self.mu - self.sigma * self.sigma) / self.sigma)
    }

    /// The `q` quantile.
    pub fn quantile(&self, q: f64) -> f64 {
        (self.mu + self.sigma * normal_quantile(q)).exp()
    }

    /// `n` points of equal probability above `from` (their quantiles' midpoints), for averaging
    /// over the distribution of the lengths above `from`.
    pub fn points_above(&self, from: f64, n: usize) -> Vec<f64> {
        let lo = self.cdf(from);
        (0..n)
            .map(|i| self.quantile(lo + (1.0 - lo) * (i as f64 + 0.5) / n as f64))
            .collect()
    }
}

/// A prompt-length distribution: measured (shares of the length histogram's buckets, see
/// [`crate::load::length_bounds`]) or, until there are measurements, log-normal.
#[derive(Clone, Debug, PartialEq)]
pub enum LengthDist {
    LogNormal(Lengths),
    Measured {
        /// Share of prompts in each bucket (sums to 1).
        shares: Vec<f64>,
        mean: f64,
    },
}

impl LengthDist {
    /// A measured distribution from bucket shares (log-normal from `mean`/`cv2` when the shares
    /// do not fit the layout or are empty).
    pub fn new(shares: Option<&[f64]>, mean: f64, cv2: f64) -> Self {
        let layout = crate::load::length_bounds().len() + 1;
        match shares {
            Some(s) if s.len() == layout && s.iter().sum::<f64>() > 0.5 => {
                let total: f64 = s.iter().sum();
                Self::Measured {
                    shares: s.iter().map(|v| v / total).collect(),
                    mean,
                }
            }
            _ => Self::LogNormal(Lengths::new(mean, cv2)),
        }
    }

    /// Lower and upper edge of bucket `k` (the unbounded last bucket spans one doubling).
    fn edges(k: usize) -> (f64, f64) {
        let b = crate::load::length_bounds();
        let lo = if k == 0 { 0.0 } else { b[k - 1] };
        let hi = b.get(k).copied().unwrap_or(lo * 2.0);
        (lo, hi)
    }

    pub fn mean(&self) -> f64 {
        match self {
            Self::LogNormal(l) => l.mean,
            Self::Measured { mean, .. } => *mean,
        }
    }

    /// `P(X <= x)`.
    pub fn cdf(&self, x: f64) -> f64 {
        match self {
            Self::LogNormal(l) => l.cdf(x),
            Self::Measured { shares, .. } => shares
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (lo, hi) = Self::edges(k);
                    p * ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
                })
                .sum::<f64>()
                .min(1.0),
        }
    }

    /// `E[f(X); X <= x]`, with lengths spread evenly within a bucket (midpoint rule).
    pub fn expect_below(&self, x: f64, f: &dyn Fn(f64) -> f64) -> f64 {
        match self {
            Self::LogNormal(l) => {
                let below = l.cdf(x);
                if below <= 0.0 {
                    return 0.0;
                }
                let pts: Vec<f64> = (0..16)
                    .map(|i| l.quantile(below * (f64::from(i) + 0.5) / 16.0))
                    .collect();
                below * pts.iter().map(|&v| f(v)).sum::<f64>() / 16.0
            }
            Self::Measured { shares, .. } => shares
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (lo, hi) = Self::edges(k);
                    let top = hi.min(x);
                    if top <= lo {
                        0.0
                    } else {
                        p * (top - lo) / (hi - lo) * f((lo + top) / 2.0)
                    }
                })
                .sum(),
        }
    }

    /// The `q` quantile.
    pub fn quantile(&self, q: f64) -> f64 {
        match self {
            Self::LogNormal(l) => l.quantile(q),
            Self::Measured { shares, .. } => {
                let mut acc = 0.0;
                for (k, p) in shares.iter().enumerate() {
                    if *p > 0.0 && acc + p >= q {
                        let (lo, hi) = Self::edges(k);
                        return lo + (hi - lo) * ((q - acc) / p).clamp(0.0, 1.0);
                    }
                    acc += p;
                }
                Self::edges(shares.len().saturating_sub(1)).1
            }
        }
    }

    /// `n` points of equal probability above `from`.
    pub fn points_above(&self, from: f64, n: usize) -> Vec<f64> {
        let lo = self.cdf(from);
        (0..n)
            .map(|i| {
                self.quantile(lo + (1.0 - lo) * (i as f64 + 0.5) / n as f64)
                    .max(from)
            })
            .collect()
    }
}

// === queues ===

/// Erlang C: probability that an arrival waits, `c` servers, offered load `a` Erlangs (1 when the
/// queue is unstable).
pub fn erlang_c(c: u32, a: f64) -> f64 {
    if !(a > 0.0) {
        return 0.0;
    }
    let cf = f64::from(c);
    if a >= cf {
        return 1.0;
    }
    // Erlang B by recursion (stable), then C.
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (f64::from(k) + a * b);
    }
    let p = cf * b / (cf - a * (1.0 - b));
    p.clamp(0.0, 1.0)
}

/// `P(wait > t)` in a `c`-server queue with offered load `a`, mean service `s`, and tail
/// stretch `beta`.
pub fn wait_tail(c: u32, a: f64, s: f64, beta: f64, t: f64) -> f64 {
    let cf = f64::from(c);
    if a >= cf {
        return 1.0;
    }
    if t <= 0.0 {
        return erlang_c(c, a).max(if a > 0.0 { 1e-12 } else { 0.0 });
    }
    erlang_c(c, a) * (-(cf - a) * t / (beta.max(0.1) * s.max(1e-9))).exp()
}

/// Seconds the prefill of `isl` tokens takes on one instance per the profile, extended linearly
/// past the profiled range (as the simulator does).
pub fn prefill_time(profile: &Profile, isl: f64) -> f64 {
    let max = profile.max_isl();
    if isl <= max || profile.prefill.isl.len() < 2 {
        profile.ttft(isl)
    } else {
        profile.ttft(max) * isl / max
    }
}

// === the sizing ===

/// Prompts of up to how many tokens a decode instance running `n` sequences of context `ctx`
/// can prefill inside one step and still meet the TPOT target: the largest `L` on the profile's
/// grid (and `cap`) with `κ_P·TTFT(L) + κ_D·TPOT(n, ctx) <= target`.
pub fn bypass_threshold(
    profile: &Profile,
    kappa: PerRole<f64>,
    n: f64,
    ctx: f64,
    target: f64,
    cap: u32,
) -> u32 {
    let step = kappa.decode * profile.tpot(n.max(1.0), ctx);
    let fits = |l: f64| kappa.prefill * prefill_time(profile, l) + step <= target;
    if !fits(1.0) {
        return 0;
    }
    // Bisection on an increasing prefill time.
    let (mut lo, mut hi) = (1u32, cap.max(1));
    if fits(f64::from(hi)) {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(f64::from(mid)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

fn ceil_count(x: f64) -> u32 {
    if !(x > 0.0) {
        0
    } else {
        x.ceil().min(f64::from(MAX_INSTANCES)) as u32
    }
}

/// The prefill side for `c` instances: share of requests missing by waiting, the TTFT of a
/// mean prompt at the miss-budget quantile, and the share that cannot meet it at all.
struct PrefillModel<'a> {
    profile: &'a Profile,
    slo: &'a SloTargets,
    policy: &'a SloPolicy,
    w: &'a Workload,
    lengths: LengthDist,
    bypass: f64,
    rate: f64,
    mean_s: f64,
    beta: f64,
    points: Vec<f64>,
}

impl<'a> PrefillModel<'a> {
    fn new(
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
            beta: (w.dispersion.max(1.0) + cs2) / 2.0,
            points,
        }
    }

    fn service(&self, x: f64) -> f64 {
        self.w.kappa.prefill * prefill_time(self.profile, x)
    }

    fn slack(&self, x: f64) -> f64 {
        self.policy.ttft_target * self.slo.ttft_at(x)
            - self.service(x)
            - self.w.transfer_s_per_token * x
    }

    fn load(&self) -> f64 {
        self.rate * self.mean_s
    }

    fn infeasible(&self) -> f64 {
        let n = self.points.len() as f64;
        self.points
            .iter()
            .filter(|&&x| self.slack(x) <= 0.0)
            .count() as f64
            / n
    }

    /// Share of the feasible requests expected to wait past their slack with `c` instances (an
    /// overloaded queue serves about `c/a` of its demand in time).
    fn miss(&self, c: u32) -> f64 {
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
            .map(|&x| wait_tail(c, a, self.mean_s, self.beta, self.slack(x)))
            .sum::<f64>()
            / feasible.len() as f64
    }

    /// TTFT of a mean-length prompt at the miss-budget quantile of its wait.
    fn ttft(&self, c: u32) -> f64 {
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
            (pw / eps).ln() * self.beta * self.mean_s / (cf - a)
        };
        base + wait
    }

    /// Fewest instances within the miss budget (or, when no wait is affordable, keeping the mean
    /// wait under a quarter of a service), stable at 90% utilisation at most.
    fn needed(&self) -> u32 {
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

/// The decode side: for `n_d` instances, the time per output token, the KV overflow probability
/// and whether both meet the targets.
#[derive(Clone, Copy)]
struct DecodeModel<'a> {
    profile: &'a Profile,
    slo: &'a SloTargets,
    policy: &'a SloPolicy,
    w: &'a Workload,
    /// Mean context during decode, tokens.
    ctx: f64,
    /// KV tokens one request reserves (rounded up to blocks), mean and second moment.
    kv_mean: f64,
    kv_m2: f64,
    /// Local prefill seconds per second of arrivals (bypassed prompts).
    local_prefill: f64,
    /// Arrivals reaching decode, requests per second.
    rate: f64,
}

impl<'a> DecodeModel<'a> {
    fn new(
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
        }
    }

    /// Time per output token at `n_d` instances and the concurrency that implies (a fixed point
    /// of Little's law and the profile).
    fn operating_point(&self, n_d: u32) -> (f64, f64) {
        let nd = f64::from(n_d.max(1));
        let busy = (self.local_prefill / nd).min(0.95);
        let osl = self.w.osl.max(1.0);
        let mut t = self.w.kappa.decode * self.profile.tpot(1.0, self.ctx) / (1.0 - busy);
        let mut conc = 0.0;
        for _ in 0..8 {
            conc = self.rate * osl * t;
            t = self.w.kappa.decode * self.profile.tpot((conc / nd).max(1.0), self.ctx)
                / (1.0 - busy);
        }
        (t, conc)
    }

    /// Share of requests that wait for KV space longer than half their TTFT allowance at `n_d`
    /// instances. A full KV cache does not fail a request: it waits for a running sequence to
    /// finish and free its blocks. So the cache is a queue whose servers are the sequences that
    /// fit (capacity over the mean reservation), each held for OSL x TPOT seconds.
    fn overflow(&self, n_d: u32, t: f64) -> f64 {
        let cap = f64::from(n_d) * self.profile.kv.tokens() as f64;
        let osl = self.w.osl.max(1.0);
        let conc = self.rate * osl * t;
        if !(conc > 0.0) {
            return 0.0;
        }
        // Reservations vary: the sequences that fit are fewer than capacity over the mean by
        // about one standard deviation of their sum.
        let slots_mean = cap / self.kv_mean;
        let sd_one = (self.kv_m2 - self.kv_mean * self.kv_mean).max(0.0).sqrt();
        let slots = (cap - sd_one * slots_mean.sqrt()) / self.kv_mean;
        if conc >= slots {
            return 1.0 - slots.max(0.0) / conc * 0.5;
        }
        let c = slots.floor().min(f64::from(u32::MAX / 2)) as u32;
        let beta = (self.w.dispersion.max(1.0) + self.w.osl_cv2) / 2.0;
        let slack = 0.5 * self.slo.ttft_at(self.w.isl.max(1.0));
        wait_tail(c, conc, osl * t, beta, slack)
    }

    /// The same decode side when only a share of the arrivals reaches it (an overloaded prefill
    /// passes on what it serves).
    fn throttled(&self, share: f64) -> Self {
        Self {
            rate: self.rate * share.clamp(0.0, 1.0),
            ..*self
        }
    }

    fn predict(&self, n_d: u32) -> (f64, f64) {
        let (t, _) = self.operating_point(n_d);
        (t, self.overflow(n_d, t))
    }

    fn ok(&self, n_d: u32) -> bool {
        let (t, overflow) = self.predict(n_d);
        t <= self.policy.tpot_target * self.slo.tpot_s && overflow <= self.policy.miss_budget
    }

    fn needed(&self) -> u32 {
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

/// Where the counts must stay: minimums, maximums and a GPU budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    pub min: Replicas,
    pub max: PerRole<Option<u32>>,
    pub budget: u32,
    /// The counts running now: when the budget binds, a split is changed only for a clearly
    /// better one (each change costs a start-up).
    pub current: Option<Replicas>,
}

/// The counts the SLOs need for workload `w` (plus `extra`, the closed loop's instances), the
/// counts to run within `bounds`, and the bypass threshold (`fixed_bypass` when the policy does
/// not derive it). When the need does not fit the budget, the budget is split to miss the fewest
/// requests the model predicts.
///
/// A derived bypass threshold is chosen with the counts: from the thresholds a decode step can
/// carry (see [`bypass_threshold`]), with decode instances spending at most
/// `max_local_prefill_share` of their time prefilling, the one that needs the fewest GPUs,
/// larger ones first on ties. When the need does not fit the budget even without bypass, there
/// is none.
pub fn size(
    profile: &Profile,
    w: &Workload,
    slo: &SloTargets,
    policy: &SloPolicy,
    fixed_bypass: u32,
    extra: Replicas,
    bounds: &Bounds,
) -> SloSizing {
    if !policy.bypass_from_profile {
        return size_at(profile, w, slo, policy, fixed_bypass, extra, bounds).0;
    }
    let top = max_bypass(profile, w, slo, policy);
    // Under a budget that cannot hold the need, decode instances are needed for decoding: the
    // roles stay apart (a local prefill slows every sequence on its instance).
    let plain = size_at(profile, w, slo, policy, 0, extra, bounds).0;
    if plain.target != plain.need {
        return plain;
    }
    let mut best: Option<(SloSizing, f64)> = None;
    for k in (0..=4u32).rev() {
        let l = top * k / 4;
        let (s, miss) = size_at(profile, w, slo, policy, l, extra, bounds);
        let fits = s.target == s.need;
        let better = match &best {
            None => true,
            Some((b, bm)) => {
                let b_fits = b.target == b.need;
                match (fits, b_fits) {
                    (true, false) => true,
                    (false, true) => false,
                    (true, true) => s.need.gpus(profile) < b.need.gpus(profile),
                    (false, false) => miss < bm - 1e-9,
                }
            }
        };
        if better {
            best = Some((s, miss));
        }
    }
    best.map(|b| b.0)
        .unwrap_or_else(|| size_at(profile, w, slo, policy, 0, extra, bounds).0)
}

/// The largest bypass threshold a decode step can carry at the decode load the SLOs call for
/// without any bypass, with decode instances spending at most `max_local_prefill_share` of their
/// time prefilling (a function of the workload alone, so it cannot feed back on itself).
fn max_bypass(profile: &Profile, w: &Workload, slo: &SloTargets, policy: &SloPolicy) -> u32 {
    let ctx = w.isl.max(1.0) + w.osl.max(1.0) / 2.0;
    let plain = DecodeModel::new(profile, slo, policy, w, 0);
    let d0 = plain.needed().max(1);
    let n = plain.operating_point(d0).1 / f64::from(d0);
    let one_step = bypass_threshold(profile, w.kappa, n, ctx, slo.tpot_s, policy.max_bypass_isl);
    let step = w.kappa.decode * profile.tpot(n.max(1.0), ctx);
    let share = (1.0 - step / (policy.tpot_target * slo.tpot_s))
        .min(policy.max_local_prefill_share)
        .max(0.0);
    let dist = w.isl_dist();
    let busy = |l: u32| {
        w.rate_d.max(0.0)
            * dist.expect_below(f64::from(l), &|x| {
                w.kappa.prefill * prefill_time(profile, x)
            })
            / f64::from(d0)
    };
    let (mut lo, mut hi) = (0u32, one_step);
    if busy(hi) <= share {
        lo = hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if busy(mid) <= share {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The sizing at one bypass threshold, and the share of requests the model expects to miss at
/// its target.
fn size_at(
    profile: &Profile,
    w: &Workload,
    slo: &SloTargets,
    policy: &SloPolicy,
    bypass: u32,
    extra: Replicas,
    bounds: &Bounds,
) -> (SloSizing, f64) {
    let pre = PrefillModel::new(profile, slo, policy, w, bypass);
    let dec = DecodeModel::new(profile, slo, policy, w, bypass);
    let base = Replicas {
        prefill: pre.needed(),
        decode: dec.needed(),
    };
    let need = Replicas {
        prefill: base.prefill.saturating_add(extra.prefill),
        decode: base.decode.saturating_add(extra.decode),
    };
    let predict = |p: u32, d: u32| {
        let (tpot, overflow) = dec.predict(d.max(1));
        Prediction {
            ttft_miss: if p == 0 { 1.0 } else { pre.miss(p) },
            ttft_s: if p == 0 { f64::INFINITY } else { pre.ttft(p) },
            tpot_s: tpot,
            kv_overflow: overflow,
        }
    };
    // Share of all requests the model expects to miss at (p, d) under the next interval's load.
    // An overloaded prefill passes on only what it serves, so decode is judged at that rate.
    let now = Workload {
        rate_p: w.rate_now.min(w.rate_p),
        rate_d: w.rate_now.min(w.rate_d),
        ..w.clone()
    };
    let pre_now = PrefillModel::new(profile, slo, policy, &now, bypass);
    let dec_now = DecodeModel::new(profile, slo, policy, &now, bypass);
    let miss = |p: u32, d: u32| {
        let (pre, dec) = (&pre_now, &dec_now);
        let a = pre.load();
        let through = if a > f64::from(p) {
            f64::from(p) / a
        } else {
            1.0
        };
        let share = pre.bypass + (1.0 - pre.bypass) * through;
        let (tpot, overflow) = dec.throttled(share).predict(d.max(1));
        let at = Prediction {
            ttft_miss: if p == 0 { 1.0 } else { pre.miss(p) },
            ttft_s: 0.0,
            tpot_s: tpot,
            kv_overflow: overflow,
        };
        let ttft = (1.0 - pre.bypass) * at.ttft_miss.min(1.0);
        let ratio = at.tpot_s / slo.tpot_s;
        let tpot = if ratio <= policy.tpot_target {
            0.0
        } else {
            ((ratio - policy.tpot_target) / (1.0 - policy.tpot_target).max(1e-6)).min(1.0)
        };
        // A request that waits for KV space is late only if its output is too short to make up
        // the wait: count half of the overflow.
        1.0 - (1.0 - ttft) * (1.0 - tpot.max(0.5 * at.kv_overflow))
    };
    let target = fit(profile, need, bounds, &miss);
    let (p, d) = (target.prefill.max(1), target.decode.max(1));
    let at_target = miss(p, d);
    let sizing = SloSizing {
        need,
        target,
        bypass_max_isl: bypass,
        bypass_share: pre.bypass,
        prefill_load: pre.load(),
        decode_concurrency: dec.operating_point(d).1,
        infeasible_share: pre.infeasible(),
        at_need: predict(p, d),
        one_fewer: PerRole {
            prefill: (p > 1).then(|| predict(p - 1, d)),
            decode: (d > 1).then(|| predict(p, d - 1)),
        },
    };
    (sizing, at_target)
}

/// `need` within `bounds`: clamped to the minimums and maximums, and when that exceeds the
/// budget, the split of the budget (neither role above its need) with the fewest predicted
/// misses, then the fewest GPUs.
fn fit(profile: &Profile, need: Replicas, b: &Bounds, miss: &dyn Fn(u32, u32) -> f64) -> Replicas {
    let clamp =
        |v: u32, min: u32, max: Option<u32>| v.max(min).min(max.unwrap_or(u32::MAX).max(min));
    let r = Replicas {
        prefill: clamp(need.prefill, b.min.prefill, b.max.prefill),
        decode: clamp(need.decode, b.min.decode, b.max.decode),
    };
    if r.gpus(profile) <= b.budget || b.min.gpus(profile) > b.budget {
        return if b.min.gpus(profile) > b.budget {
            b.min
        } else {
            r
        };
    }
    let (g_p, g_d) = (profile.gpus.prefill.max(1), profile.gpus.decode.max(1));
    let mut best: Option<(f64, Replicas)> = None;
    let top_d = r
        .decode
        .min(b.budget.saturating_sub(b.min.prefill * g_p) / g_d);
    for d in b.min.decode..=top_d {
        let p = r.prefill.min((b.budget - d * g_d) / g_p);
        if p < b.min.prefill {
            continue;
        }
        let cand = Replicas {
            prefill: p,
            decode: d,
        };
        let m = miss(p, d);
        let better = best.as_ref().is_none_or(|(bm, bc)| {
            m < bm - 1e-9 || ((m - bm).abs() <= 1e-9 && cand.gpus(profile) < bc.gpus(profile))
        });
        if better {
            best = Some((m, cand));
        }
    }
    match (best, b.current) {
        (Some((m, c)), Some(cur))
            if cur.gpus(profile) <= b.budget
                && cur.prefill >= b.min.prefill
                && cur.decode >= b.min.decode
                && miss(cur.prefill, cur.decode) <= m + 0.002 =>
        {
            let _ = c;
            cur
        }
        (Some((_, c)), _) => c,
        (None, _) => b.min,
    }
}

/// What the SLO-aware policy learns from the observations: the lengths' means and spread, the
/// arrivals' burstiness and trend, and extra instances per role that grow while the role's
/// observed latencies miss the SLO though the model says it has enough, and decay back when they
/// do not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tracker {
    /// Squared coefficients of variation of prompt and output lengths (smoothed).
    pub isl_cv2: f64,
    pub osl_cv2: f64,
    /// Index of dispersion of arrivals (smoothed; 1 = Poisson).
    pub dispersion: f64,
    /// Instances the closed loop adds per role, on top of the model's need.
    pub extra: PerRole<f64>,
    /// Whether each role's last target was held below its need (by a maximum or the budget):
    /// then its misses are no news about the model.
    pub bound: PerRole<bool>,
    /// Each role's last target.
    pub last_target: Replicas,
    /// Decode concurrency per instance at the last sizing.
    pub decode_concurrency: f64,
    /// Mean prompt and output lengths over roughly the last `LENGTH_MEMORY` requests (steadier
    /// than one interval's mean, which a few long prompts can swing).
    pub isl: Option<f64>,
    pub osl: Option<f64>,
    /// The prompt-length distribution over the same memory (shares of the length histogram's
    /// buckets).
    pub isl_shares: Option<Vec<f64>>,
    counts: std::collections::VecDeque<f64>,
    /// Arrival counts and the point forecasts made at the same ticks (newest last), for the
    /// forecast's surges.
    history: std::collections::VecDeque<(f64, Option<f64>)>,
    /// Recent surges: how far the busiest interval within a start-up horizon rose above the
    /// forecast made at its start, beyond Poisson noise, relative to that forecast.
    surges: std::collections::VecDeque<f64>,
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
            extra: PerRole {
                prefill: 0.0,
                decode: 0.0,
            },
            bound: PerRole {
                prefill: false,
                decode: false,
            },
            last_target: Replicas::default(),
            decode_concurrency: 1.0,
            isl: None,
            osl: None,
            isl_shares: None,
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
        let mut v: Vec<f64> = self.surges.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let k = ((v.len() as f64 * 0.9).ceil() as usize).clamp(1, v.len()) - 1;
        v[k]
    }

    /// The arrival trend, requests per interval per interval: the least-squares slope of the
    /// last counts when it stands out of their noise (t-statistic above 2), else 0.
    pub fn trend(&self) -> f64 {
        let recent: Vec<f64> = self.counts.iter().rev().take(6).rev().copied().collect();
        let n = recent.len();
        if n < 4 {
            return 0.0;
        }
        let nf = n as f64;
        let mx = (nf - 1.0) / 2.0;
        let my = recent.iter().sum::<f64>() / nf;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (i, y) in recent.iter().enumerate() {
            sxy += (i as f64 - mx) * (y - my);
            sxx += (i as f64 - mx).powi(2);
        }
        let slope = sxy / sxx;
        let resid: f64 = recent
            .iter()
            .enumerate()
            .map(|(i, y)| (y - my - slope * (i as f64 - mx)).powi(2))
            .sum();
        let se = (resid / (nf - 2.0) / sxx).sqrt();
        if slope.is_finite() && (se == 0.0 || slope.abs() > 2.0 * se) {
            slope
        } else {
            0.0
        }
    }

    /// Learns from one interval's observation.
    pub fn observe(&mut self, obs: &crate::planner::Observation, slo: &SloTargets, p: &SloPolicy) {
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
                let excess = ((busiest - f - 2.0 * base.sqrt()) / base).clamp(0.0, 4.0);
                self.surges.push_back(excess);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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

    fn workload(rate: f64, isl: f64, osl: f64) -> Workload {
        Workload {
            rate_p: rate,
            rate_d: rate,
            rate_now: rate,
            isl,
            isl_cv2: 0.5,
            osl,
            osl_cv2: 0.5,
            dispersion: 1.0,
            kappa: PerRole {
                prefill: 1.0,
                decode: 1.0,
            },
            transfer_s_per_token: 0.0,
            decode_concurrency: 16.0,
            isl_shares: None,
        }
    }

    #[test]
    fn surges_are_learned_from_what_the_forecast_missed() {
        let (slo, pol) = (SloTargets::default(), SloPolicy::default());
        let obs = |n: f64| crate::planner::Observation {
            interval_s: 10.0,
            requests: n,
            ..Default::default()
        };
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
                511,
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
            511,
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
        let free = size(&p, &w, &slo, &pol, 511, Replicas::default(), &open());
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
        let s = size(&p, &w, &slo, &pol, 511, Replicas::default(), &b);
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
            511,
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
        let s = size(
            &p,
            &w,
            &SloTargets::default(),
            &SloPolicy::default(),
            0,
            Replicas::default(),
            &open(),
        );
        assert!(s.need.prefill > 5, "{s:?}");
        // Burstier arrivals need more.
        w.dispersion = 4.0;
        let b = size(
            &p,
            &w,
            &SloTargets::default(),
            &SloPolicy::default(),
            0,
            Replicas::default(),
            &open(),
        );
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
            size(
                &p,
                &w,
                &SloTargets::default(),
                &SloPolicy::default(),
                511,
                Replicas::default(),
                &open(),
            )
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
        let fixed = size(
            &p,
            &w,
            &SloTargets::default(),
            &SloPolicy::default(),
            511,
            Replicas::default(),
            &open(),
        );
        assert!(fixed.infeasible_share > 0.4, "{fixed:?}");
        let aware = SloTargets {
            ttft_per_token_s: 0.0002,
            ..SloTargets::default()
        };
        let s = size(
            &p,
            &w,
            &aware,
            &SloPolicy::default(),
            511,
            Replicas::default(),
            &open(),
        );
        assert!(s.infeasible_share < 0.1, "{s:?}");
    }
}
