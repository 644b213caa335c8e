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
//! time per output token; concurrency follows Little's law, solved with the profile's
//! `κ_D·TPOT(n, ctx)` (slowed by the prompts the instance prefills itself) as a fixed point. A full
//! KV cache delays admissions rather than failing them, so the cache is a queue too: its servers
//! are the sequences that fit, each held `OSL·t`. Decode gets the fewest instances whose TPOT is
//! within the target and whose share of requests waiting for KV longer than half their TTFT
//! allowance is within the miss budget.
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
    /// Surges are kept as requests above the forecast they rose over and read at forecasts
    /// like the current one (within a factor of two), once a dozen were seen there: a quiet
    /// spell is readied for the bursts that ended quiet spells, a burst for the surges within
    /// bursts (off: as a share of the forecast, read at any level; measured from near-idle
    /// forecasts, that share sized a burst for several times its rate).
    pub level_surges: bool,
    /// Quiet spells are sized as any other interval: each role keeps what the surges seen at
    /// quiet levels call for, and its other instances for its own hold (off: no arrivals and
    /// nothing in flight for `idle_after_s`, or the shorter role's hold if longer, shrinks both
    /// roles to the minimums at once).
    pub size_idle: bool,
    /// A role shrinks only after its surplus has lasted this many of its start-ups (0: the
    /// planner's `scale_down_stabilization_s`).
    pub hold_startups: f64,
    /// A decode instance asked for because the KV cache filled is held this many decode
    /// start-ups (capped at the decode hold): long enough to come up and serve, after which a
    /// cache still full asks for it again and a cache with room lets it go.
    pub kv_emergency_hold_startups: f64,
    /// The hold's stretch for bursty arrivals (beyond `hold_startups`, growing with the index of
    /// dispersion) applies in proportion to the rate's swings relative to its level, in full
    /// once their squared coefficient of variation reaches 1 (off: by the index of dispersion
    /// alone, which grows with the rate for the same relative swings).
    pub hold_by_swing: bool,
    /// Add instances to a role whose observed latencies miss the SLO while the model says it has
    /// enough (off: open loop).
    pub closed_loop: bool,
    /// Most the closed loop may raise a role's count, as a factor of its last target.
    pub max_correction: f64,
    /// Correct the decode model's concurrency by the measured KV occupancy (off: the model's
    /// own estimate from the tracked lengths).
    pub kv_calibration: bool,

    /// The bypass threshold when it is not derived (the routing's fixed setting).
    pub fixed_bypass_isl: u32,
    /// KV link bandwidth between prefill and decode, bytes/s (0: transfers not modelled).
    pub kv_link_bytes_per_s: f64,
    /// Prefill work waits in the router's deadline-first queue (its default), so under a
    /// length-aware TTFT SLO a short prompt waits only behind work due no later than itself
    /// (off: one arrival-order queue, as `shared-fifo` and the per-instance queues).
    pub deadline_first: bool,
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
            level_surges: true,
            size_idle: true,
            hold_startups: 3.0,
            kv_emergency_hold_startups: 1.0,
            hold_by_swing: true,
            closed_loop: true,
            max_correction: 1.25,
            kv_calibration: true,
            fixed_bypass_isl: 511,
            kv_link_bytes_per_s: 0.0,
            deadline_first: true,
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
    /// Squared coefficient of variation of the gaps between arrivals (1 for Poisson), the
    /// arrival side of the queues' waits.
    pub arrival_cv2: f64,
    /// Observed over profiled latency, per role.
    pub kappa: PerRole<f64>,
    /// KV transfer seconds per prompt token (0: not modelled).
    pub transfer_s_per_token: f64,
    /// The measured prompt-length distribution (shares of the length histogram's buckets), when
    /// there is one; else a log-normal with `isl` and `isl_cv2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isl_shares: Option<Vec<f64>>,
    /// Observed over modelled KV in use on the decode instances (1: the model as it is). Output
    /// lengths are known only when requests finish, so the model's concurrency lags a change in
    /// them; the cache's measured occupancy corrects it.
    #[serde(default = "one")]
    pub kv_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl Workload {
    /// Poisson arrivals at `rate` per second with mean lengths `isl` and `osl` (moderately
    /// spread: squared coefficients of variation 0.5), the profile trusted as it is, no KV
    /// transfer modelled.
    pub fn new(rate: f64, isl: f64, osl: f64) -> Self {
        Self {
            rate_p: rate,
            rate_d: rate,
            rate_now: rate,
            isl,
            isl_cv2: 0.5,
            osl,
            osl_cv2: 0.5,
            arrival_cv2: 1.0,
            kappa: PerRole {
                prefill: 1.0,
                decode: 1.0,
            },
            transfer_s_per_token: 0.0,
            isl_shares: None,
            kv_scale: 1.0,
        }
    }

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

mod decode;
mod dist;
mod prefill;
mod tracker;

use decode::DecodeModel;
use prefill::PrefillModel;

pub use dist::{LengthDist, Lengths, normal_cdf, normal_quantile};
pub use tracker::{Tracker, share_above};

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

/// The share of all requests the model expects to miss at a split of the instances, under one
/// load.
struct SplitMiss<'a> {
    slo: &'a SloTargets,
    policy: &'a SloPolicy,
    pre: PrefillModel<'a>,
    dec: DecodeModel<'a>,
}

impl<'a> SplitMiss<'a> {
    fn new(
        profile: &'a Profile,
        slo: &'a SloTargets,
        policy: &'a SloPolicy,
        w: &'a Workload,
        bypass: u32,
    ) -> Self {
        Self {
            slo,
            policy,
            pre: PrefillModel::new(profile, slo, policy, w, bypass),
            dec: DecodeModel::new(profile, slo, policy, w, bypass),
        }
    }

    fn miss(&self, p: u32, d: u32) -> f64 {
        let (pre, dec) = (&self.pre, &self.dec);
        // An overloaded prefill passes on only what it serves, so decode is judged at that rate.
        let a = pre.load();
        let through = if a > f64::from(p) {
            f64::from(p) / a
        } else {
            1.0
        };
        let share = pre.bypass + (1.0 - pre.bypass) * through;
        let (tpot, overflow) = dec.throttled(share).predict(d.max(1));
        let ttft_miss = if p == 0 { 1.0 } else { pre.miss(p) };
        let ttft = (1.0 - pre.bypass) * ttft_miss.min(1.0);
        let ratio = tpot / self.slo.tpot_s;
        let target = self.policy.tpot_target;
        let tpot = if ratio <= target {
            0.0
        } else {
            ((ratio - target) / (1.0 - target).max(1e-6)).min(1.0)
        };
        // A request that waits for KV space is late only if its output is too short to make up
        // the wait: count half of the overflow.
        1.0 - (1.0 - ttft) * (1.0 - tpot.max(0.5 * overflow))
    }
}

/// Bounds of the KV occupancy correction: the model is trusted within a factor of two.
pub const KV_SCALE: (f64, f64) = (0.5, 2.0);

/// The KV occupancy the model expects on `n_d` decode instances under workload `w` (arrivals
/// at `w.rate_d`, prompts up to `bypass` tokens prefilled locally), with no correction: the
/// reference the observed occupancy is compared with.
pub fn kv_occupancy(
    profile: &Profile,
    w: &Workload,
    slo: &SloTargets,
    policy: &SloPolicy,
    bypass: u32,
    n_d: u32,
) -> f64 {
    let plain = Workload {
        kv_scale: 1.0,
        ..w.clone()
    };
    DecodeModel::new(profile, slo, policy, &plain, bypass).occupancy(n_d)
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
/// counts to run within `bounds`, and the bypass threshold (`policy.fixed_bypass_isl` when the
/// policy does not derive it). When the need does not fit the budget, the budget is split to miss the fewest
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
    extra: Replicas,
    bounds: &Bounds,
) -> SloSizing {
    if !policy.bypass_from_profile {
        return size_at(
            profile,
            w,
            slo,
            policy,
            policy.fixed_bypass_isl,
            extra,
            bounds,
        )
        .0;
    }
    let top = max_bypass(profile, w, slo, policy);
    // Under a budget that cannot hold the need, decode instances are needed for decoding: the
    // roles stay apart (a local prefill slows every sequence on its instance).
    let plain = size_at(profile, w, slo, policy, 0, extra, bounds);
    if plain.0.target != plain.0.need {
        return plain.0;
    }
    // Thresholds from the largest down to none; on a tie the larger one stays.
    let mut best = size_at(profile, w, slo, policy, top, extra, bounds);
    let rest = (1..=3u32)
        .rev()
        .map(|k| size_at(profile, w, slo, policy, top * k / 4, extra, bounds))
        .chain(std::iter::once(plain));
    for (s, miss) in rest {
        let (b, bm) = (&best.0, best.1);
        let better = match (s.target == s.need, b.target == b.need) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => s.need.gpus(profile) < b.need.gpus(profile),
            (false, false) => miss < bm - 1e-9,
        };
        if better {
            best = (s, miss);
        }
    }
    best.0
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
    // The models at the load the roles are readied for (what the need is sized for), and at the
    // next interval's load.
    let at_ready = SplitMiss::new(profile, slo, policy, w, bypass);
    let (pre, dec) = (&at_ready.pre, &at_ready.dec);
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
    // Share of all requests the model expects to miss at (p, d). A split chosen now serves until
    // instances started now are up, so it is judged over that horizon: half at the next
    // interval's load, half at the load the roles are readied for.
    let now = Workload {
        rate_p: w.rate_now.min(w.rate_p),
        rate_d: w.rate_now.min(w.rate_d),
        ..w.clone()
    };
    let at_now = SplitMiss::new(profile, slo, policy, &now, bypass);
    let miss = |p: u32, d: u32| 0.5 * (at_now.miss(p, d) + at_ready.miss(p, d));
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
        (Some((m, _)), Some(cur))
            if cur.gpus(profile) <= b.budget
                && cur.prefill >= b.min.prefill
                && cur.decode >= b.min.decode
                && miss(cur.prefill, cur.decode) <= m + 0.002 =>
        {
            cur
        }
        (Some((_, c)), _) => c,
        (None, _) => b.min,
    }
}

#[cfg(test)]
mod tests;
