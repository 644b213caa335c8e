//! P/D sizing: how many prefill and decode instances the next interval needs.
//!
//! [`size_dopd`] is DOPD's method (paper §3.2, as implemented in the authors' code):
//!
//! ```text
//! n_blk = ceil((ISL + OSL/2) / b)                      blocks per request
//! B_max = floor(M_KV / n_blk)                          decode concurrency per D-instance (KV bound)
//! N_D   = max(N_min, ceil(R̂ / B_max))                  decode instances
//! r*    = B_max·T_TTFT(ISL) / (OSL·T_TPOT(B_max, ISL+OSL/2)·κ_D)
//! N_P   = max(N_min, ceil(r*·N_D))   (general form)     or   max(N_min, ceil(r*))  (authors' code)
//! while N_P·g_P + N_D·g_D > G_max:                     GPU budget
//!     s = G_max / (N_P·g_P + N_D·g_D)
//!     N_P = max(N_min, floor(N_P·s));  N_D = max(N_min, floor((G_max − N_P·g_P)/g_D))
//! ```
//!
//! Two choices beyond the paper, both documented on the config: R̂ may be read as the paper's
//! requests-per-interval or converted to a concurrency by Little's law; and the budget loop never
//! grants more decode instances than the load asked for (the paper's loop can hand spare GPUs to
//! decode when prefill shrinks, which only wastes them).
//!
//! [`size_dyn_sla`] is Dynamo's SLA planner (paper §8.1, the DYN-SLA baseline): throughput-based
//! counts from the same profile, then a single rounding pass to fit the budget.

use serde::{Deserialize, Serialize};

use crate::profile::{PerRole, Profile, Role};

/// Instance counts per role.
pub type Replicas = PerRole<u32>;

impl Replicas {
    /// GPUs used by these counts (saturating).
    pub fn gpus(&self, profile: &Profile) -> u32 {
        let g = u64::from(self.prefill) * u64::from(profile.gpus.prefill)
            + u64::from(self.decode) * u64::from(profile.gpus.decode);
        u32::try_from(g).unwrap_or(u32::MAX)
    }
}

/// Why a number is what it is. Every decision carries a list of these, so metrics and logs can
/// say which constraint bound it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// Targets computed from the forecast of the next interval.
    Forecast { requests: f64, isl: f64, osl: f64 },
    /// Decode count set by KV capacity: `ceil(load / B_max)`.
    KvCapacity { b_max: u64, load: f64 },
    /// Prefill count set by producer/consumer balance with decode.
    ProducerConsumerBalance { r_star: f64 },
    /// Count set by a throughput requirement (Dynamo's SLA planner).
    Throughput {
        role: Role,
        required: f64,
        per_instance: f64,
    },
    /// Counts reduced to fit the GPU budget.
    Budget { wanted_gpus: u32, budget: u32 },
    /// The budget cannot hold even the minimum per role; minimums are kept.
    BudgetInfeasible { minimum_gpus: u32, budget: u32 },
    /// Raised to the configured minimum.
    MinReplicas { role: Role, min: u32 },
    /// Lowered to the configured maximum.
    MaxReplicas { role: Role, max: u32 },
    /// Scaled up at once because a pressure signal crossed its threshold.
    Emergency {
        role: Role,
        signal: Signal,
        value: f64,
        threshold: f64,
    },
    /// A load-threshold rule fired (Dynamo's load planner).
    LoadThreshold {
        role: Role,
        signal: Signal,
        value: f64,
        threshold: f64,
        up: bool,
    },
    /// A scale-down held back by stabilisation/cooldown.
    Cooldown {
        role: Role,
        held_at: u32,
        wanted: u32,
    },
    /// No requests for a while: shrink to the minimum.
    Idle { idle_s: f64 },
    /// A previous change has not landed yet; no new change this tick.
    ReconfigInFlight { waited_s: f64 },
    /// The interval just seen lay far above the forecast (a step it has not caught up with):
    /// the next one was sized for what was seen.
    Step { seen: f64, forecast: f64 },
    /// Not enough history to forecast: the last values were used.
    Warmup { observations: usize },
    /// Counts the SLOs need (the `dopd` policy's queueing model): the arrival rates each role was
    /// sized for, the bypass threshold, and the predicted TTFT (of a mean prompt at the
    /// miss-budget quantile) and TPOT at those counts.
    SloNeed {
        prefill: u32,
        decode: u32,
        rate_p: f64,
        rate_d: f64,
        bypass_max_isl: u32,
        ttft_s: f64,
        tpot_s: f64,
    },
    /// Instances added to a role because its observed latencies missed the SLO while the model
    /// said it had enough.
    SloCorrection { role: Role, extra: u32 },
    /// The forecaster whose recent out-of-sample error was lowest answered (predictor `best`).
    Predictor { chosen: String },
}

/// A pressure signal watched by the emergency and load-threshold rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Prefill queue length per ready prefill instance.
    PrefillQueuePerInstance,
    /// Fraction of decode KV blocks in use.
    KvUsage,
}

/// How the prefill count follows from `r*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefillRule {
    /// `N_P = ceil(r*·N_D)`: balance the whole decode pool (paper §3.2, general form).
    #[default]
    General,
    /// `N_P = ceil(r*)`: the ratio per decode instance used directly, as the authors' code does.
    /// Equal to the general form when `N_D = 1`.
    PerDecodeInstance,
    /// `N_P = ceil(r*·load/B_max)`: the balance equation without rounding `N_D` up first, so a
    /// partly used decode instance does not get a full share of producers.
    Proportional,
}

/// How the forecast request count becomes a decode load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecodeLoad {
    /// `load = R̂`, requests per interval, as the authors' code does (exact when a request lives
    /// about one interval).
    #[default]
    RequestsPerInterval,
    /// `load = R̂/interval · (TTFT + OSL·TPOT)`: concurrency by Little's law.
    LittlesLaw,
}

/// Knobs of the sizing step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SizingConfig {
    pub min_replicas: Replicas,
    /// Upper bound per role (`None`: only the budget bounds it).
    pub max_replicas: PerRole<Option<u32>>,
    /// Total GPUs the service may use (`G_max`).
    pub gpu_budget: u32,
    pub prefill_rule: PrefillRule,
    pub decode_load: DecodeLoad,
    /// How DOPD fits its counts into the budget.
    pub budget_rule: BudgetRule,
}

impl Default for SizingConfig {
    fn default() -> Self {
        Self {
            min_replicas: PerRole {
                prefill: 1,
                decode: 1,
            },
            max_replicas: PerRole {
                prefill: None,
                decode: None,
            },
            gpu_budget: 8,
            prefill_rule: PrefillRule::General,
            decode_load: DecodeLoad::RequestsPerInterval,
            budget_rule: BudgetRule::Balanced,
        }
    }
}

/// What the sizing formulas consume: the (forecast) workload of the next interval and the
/// correction factors.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizingInput {
    /// Requests in the next interval (`R̂`).
    pub requests: f64,
    /// Mean input length, tokens.
    pub isl: f64,
    /// Mean output length, tokens.
    pub osl: f64,
    /// Interval length, seconds (used by Little's law and throughput rules).
    pub interval_s: f64,
    /// Observed / profiled decode latency.
    pub kappa_d: f64,
    /// Observed / profiled prefill latency.
    pub kappa_p: f64,
}

impl SizingInput {
    /// A workload with neutral correction factors and the DOPD configs' 10 s interval.
    pub fn new(requests: f64, isl: f64, osl: f64) -> Self {
        Self {
            requests,
            isl,
            osl,
            interval_s: 10.0,
            kappa_d: 1.0,
            kappa_p: 1.0,
        }
    }

    fn sanitized(&self) -> Self {
        let nonneg = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        let factor = |v: f64| if v.is_finite() && v > 0.0 { v } else { 1.0 };
        Self {
            requests: nonneg(self.requests),
            isl: nonneg(self.isl).max(1.0),
            osl: nonneg(self.osl).max(1.0),
            interval_s: if self.interval_s.is_finite() && self.interval_s > 0.0 {
                self.interval_s
            } else {
                10.0
            },
            kappa_d: factor(self.kappa_d),
            kappa_p: factor(self.kappa_p),
        }
    }
}

/// The result of a sizing step, with its intermediate quantities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sizing {
    /// KV blocks per request (`n_blk`).
    pub blocks_per_request: u64,
    /// Decode concurrency per instance (`B_max`).
    pub b_max: u64,
    /// Decode load the counts were sized for (requests or concurrency).
    pub decode_load: f64,
    /// Producer/consumer ratio `r*` (0 for policies that do not use it).
    pub r_star: f64,
    /// Profiled TTFT at the forecast ISL.
    pub ttft_s: f64,
    /// Profiled TPOT at (B_max, ISL + OSL/2).
    pub tpot_s: f64,
    /// Counts before the budget and caps.
    pub unconstrained: Replicas,
    /// Final counts.
    pub replicas: Replicas,
    pub gpus: u32,
    pub reasons: Vec<Reason>,
}

/// `ceil((ISL + OSL/2) / b)`, at least 1.
pub fn blocks_per_request(isl: f64, osl: f64, block_size: u32) -> u64 {
    let ctx = isl + osl / 2.0;
    ((ctx / f64::from(block_size.max(1))).ceil() as u64).max(1)
}

/// Instance counts are capped here: far above any cluster, far below integer overflow.
pub const MAX_INSTANCES: u32 = 1_000_000;

fn ceil_u32(x: f64) -> u32 {
    // NaN and non-positive values need nothing; +inf saturates like any huge demand.
    if !(x > 0.0) {
        0
    } else {
        x.ceil().min(f64::from(MAX_INSTANCES)) as u32
    }
}

/// DOPD's sizing (see the module docs).
pub fn size_dopd(profile: &Profile, input: &SizingInput, cfg: &SizingConfig) -> Sizing {
    let inp = input.sanitized();
    let n_blk = blocks_per_request(inp.isl, inp.osl, profile.kv.block_size);
    let b_max = (profile.kv.blocks / n_blk).max(1);
    let ctx = inp.isl + inp.osl / 2.0;
    let ttft = profile.ttft(inp.isl);
    let tpot = profile.tpot(b_max as f64, ctx);
    let load = match cfg.decode_load {
        DecodeLoad::RequestsPerInterval => inp.requests,
        DecodeLoad::LittlesLaw => {
            inp.requests / inp.interval_s * (ttft * inp.kappa_p + inp.osl * tpot * inp.kappa_d)
        }
    };
    let r_star = b_max as f64 * ttft / (inp.osl * tpot * inp.kappa_d);
    let mut reasons = vec![Reason::Forecast {
        requests: inp.requests,
        isl: inp.isl,
        osl: inp.osl,
    }];
    let n_d = ceil_u32(load / b_max as f64);
    reasons.push(Reason::KvCapacity { b_max, load });
    let n_p = match cfg.prefill_rule {
        PrefillRule::General => ceil_u32(r_star * f64::from(n_d)),
        PrefillRule::PerDecodeInstance if load > 0.0 => ceil_u32(r_star),
        PrefillRule::PerDecodeInstance => 0,
        PrefillRule::Proportional => ceil_u32(r_star * load / b_max as f64),
    };
    reasons.push(Reason::ProducerConsumerBalance { r_star });
    let unconstrained = Replicas {
        prefill: n_p,
        decode: n_d,
    };
    let balance = Balance {
        r_star,
        rule: cfg.prefill_rule,
        demand: load / b_max as f64,
    };
    let replicas = constrain(
        profile,
        unconstrained,
        cfg,
        cfg.budget_rule,
        Some(balance),
        &mut reasons,
    );
    Sizing {
        blocks_per_request: n_blk,
        b_max,
        decode_load: load,
        r_star,
        ttft_s: ttft,
        tpot_s: tpot,
        unconstrained,
        gpus: replicas.gpus(profile),
        replicas,
        reasons,
    }
}

/// Settings of Dynamo's SLA planner (DYN-SLA).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlaTargets {
    /// Target inter-token latency, seconds (Dynamo configs: 0.05).
    pub itl_s: f64,
    /// Target TTFT, seconds (Dynamo configs: 1.5).
    pub ttft_s: f64,
}

impl Default for SlaTargets {
    fn default() -> Self {
        Self {
            itl_s: 0.05,
            ttft_s: 1.5,
        }
    }
}

/// Best decode throughput (tokens/s) of one instance whose ITL stays within `itl_target` at
/// context `ctx`, and the concurrency that achieves it.
pub fn best_decode_throughput(profile: &Profile, itl_target: f64, ctx: f64) -> (f64, f64) {
    let n_blk = ((ctx / f64::from(profile.kv.block_size)).ceil() as u64).max(1);
    let cap = (profile.kv.blocks / n_blk).max(1);
    let mut best = (1.0 / profile.tpot(1.0, ctx), 1.0);
    // Coarse-to-fine scan: every concurrency up to 64, then ~2% steps.
    let mut c = 1u64;
    while c <= cap {
        let t = profile.tpot(c as f64, ctx);
        if t <= itl_target {
            let thpt = c as f64 / t;
            if thpt > best.0 {
                best = (thpt, c as f64);
            }
        }
        c = match c.checked_add(if c < 64 { 1 } else { (c / 50).max(1) }) {
            Some(next) => next,
            None => break,
        };
    }
    best
}

/// Dynamo's SLA planner (paper §8.1):
///
/// ```text
/// N_P = ceil(R̂·ISL/interval · min(1, κ_P) / thpt_P(ISL) / g_P)
/// N_D = ceil(R̂·OSL/interval / thpt_D^best(ITL_target/κ_D, ISL+OSL/2) / g_D)
/// ```
///
/// with per-GPU throughputs from the profile, then one rounding pass to fit the budget.
pub fn size_dyn_sla(
    profile: &Profile,
    input: &SizingInput,
    targets: &SlaTargets,
    cfg: &SizingConfig,
) -> Sizing {
    let inp = input.sanitized();
    let (g_p, g_d) = (
        f64::from(profile.gpus.prefill),
        f64::from(profile.gpus.decode),
    );
    let ctx = inp.isl + inp.osl / 2.0;
    let ttft = profile.ttft(inp.isl);
    let thpt_p_gpu = inp.isl / ttft / g_p;
    let need_p = inp.requests * inp.isl / inp.interval_s * inp.kappa_p.min(1.0);
    let n_p = ceil_u32(need_p / thpt_p_gpu / g_p);
    let (thpt_d, conc) = best_decode_throughput(profile, targets.itl_s / inp.kappa_d, ctx);
    let thpt_d_gpu = thpt_d / g_d;
    let need_d = inp.requests * inp.osl / inp.interval_s;
    let n_d = ceil_u32(need_d / thpt_d_gpu / g_d);
    let mut reasons = vec![
        Reason::Forecast {
            requests: inp.requests,
            isl: inp.isl,
            osl: inp.osl,
        },
        Reason::Throughput {
            role: Role::Prefill,
            required: need_p,
            per_instance: thpt_p_gpu * g_p,
        },
        Reason::Throughput {
            role: Role::Decode,
            required: need_d,
            per_instance: thpt_d,
        },
    ];
    let unconstrained = Replicas {
        prefill: n_p,
        decode: n_d,
    };
    let replicas = constrain(
        profile,
        unconstrained,
        cfg,
        BudgetRule::DynamoSla,
        None,
        &mut reasons,
    );
    let n_blk = blocks_per_request(inp.isl, inp.osl, profile.kv.block_size);
    Sizing {
        blocks_per_request: n_blk,
        b_max: conc as u64,
        decode_load: need_d,
        r_star: 0.0,
        ttft_s: ttft,
        tpot_s: profile.tpot(conc, ctx),
        unconstrained,
        gpus: replicas.gpus(profile),
        replicas,
        reasons,
    }
}

/// How counts that exceed the GPU budget are cut down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetRule {
    /// Serve the largest share of the decode demand whose counts — decode and its balanced
    /// prefill under the configured prefill rule — fit the budget. Which shares fit does not
    /// depend on the load, so more forecast requests never yield fewer decode instances.
    #[default]
    Balanced,
    /// The authors' loop (paper §3.2): scale both by `s = G/total`, `floor` prefill, give decode
    /// the rest; repeat. Faithful, but not monotone: a bigger forecast can floor prefill up by
    /// one and so leave decode an instance fewer (see the `paper_loop_is_not_monotone` test).
    /// We also never raise decode above its demand (the raw loop can hand it spare GPUs).
    PaperLoop,
    /// Dynamo's SLA planner: one scaling pass with `round`, then trim to the budget.
    DynamoSla,
}

/// What a balanced cut needs to know: `r*`, how prefill follows decode, and the decode demand
/// in instances (`load / B_max`, fractional).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Balance {
    pub r_star: f64,
    pub rule: PrefillRule,
    pub demand: f64,
}

impl Balance {
    /// Raw (prefill, decode) counts when serving `x <= demand` decode instances' worth of load.
    /// At `x = demand` this is exactly what [`size_dopd`] asks for before the budget.
    fn counts(&self, x: f64) -> (u32, u32) {
        let decode = ceil_u32(x);
        let prefill = match self.rule {
            PrefillRule::General => ceil_u32(self.r_star * f64::from(decode)),
            PrefillRule::PerDecodeInstance if x > 0.0 => ceil_u32(self.r_star),
            PrefillRule::PerDecodeInstance => 0,
            PrefillRule::Proportional => ceil_u32(self.r_star * x),
        };
        (prefill, decode)
    }
}

/// Applies minimums, maximums and the GPU budget to raw counts, recording what bound them.
pub fn constrain(
    profile: &Profile,
    raw: Replicas,
    cfg: &SizingConfig,
    rule: BudgetRule,
    balance: Option<Balance>,
    reasons: &mut Vec<Reason>,
) -> Replicas {
    let (g_p, g_d) = (profile.gpus.prefill, profile.gpus.decode);
    let gpus = |p: u32, d: u32| u64::from(p) * u64::from(g_p) + u64::from(d) * u64::from(g_d);
    let min = cfg.min_replicas;
    let budget = cfg.gpu_budget;
    let mut r = raw;
    for role in Role::SIZED {
        let (v, lo) = match role {
            Role::Prefill => (&mut r.prefill, min.prefill),
            Role::Decode | Role::Mixed => (&mut r.decode, min.decode),
        };
        if *v < lo {
            *v = lo;
            reasons.push(Reason::MinReplicas { role, min: lo });
        }
    }
    // With a balanced rule, a decode maximum also caps the prefill that balances it: serve at most
    // `max_d` decode instances' worth of load (the paper loop and Dynamo's rule cap afterwards).
    let mut balance = balance;
    if let (BudgetRule::Balanced, Some(b), Some(max_d)) =
        (rule, balance.as_mut(), cfg.max_replicas.decode)
        && b.demand > f64::from(max_d)
    {
        b.demand = f64::from(max_d.max(min.decode));
        let (p, d) = b.counts(b.demand);
        r = Replicas {
            prefill: p.max(min.prefill),
            decode: d.max(min.decode),
        };
    }
    let min_gpus = gpus(min.prefill, min.decode);
    let budget64 = u64::from(budget);
    if min_gpus > budget64 {
        reasons.push(Reason::BudgetInfeasible {
            minimum_gpus: u32::try_from(min_gpus).unwrap_or(u32::MAX),
            budget,
        });
        return min;
    }
    let wanted = gpus(r.prefill, r.decode);
    if wanted > budget64 {
        let demand_d = r.decode;
        let rule = if rule == BudgetRule::Balanced && balance.is_none() {
            BudgetRule::PaperLoop
        } else {
            rule
        };
        match rule {
            BudgetRule::Balanced => {
                let b = balance.expect("checked above");
                // Serve the largest share x of the decode demand whose balanced counts fit.
                // Whether x fits does not depend on the load and only gets harder as x grows,
                // so the result grows with the load (never fewer decode instances for more).
                let counts = |x: f64| {
                    let (p, d) = b.counts(x);
                    (p.max(min.prefill), d.max(min.decode))
                };
                let fits = |x: f64| {
                    let (p, d) = counts(x);
                    gpus(p, d) <= budget64
                };
                let cap = f64::from(MAX_INSTANCES);
                let (mut lo, mut hi) = (
                    0.0,
                    if b.demand > 0.0 {
                        b.demand.min(cap)
                    } else {
                        0.0
                    },
                );
                for _ in 0..64 {
                    let mid = 0.5 * (lo + hi);
                    if fits(mid) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                (r.prefill, r.decode) = counts(lo);
            }
            BudgetRule::PaperLoop => {
                // Terminates: while over budget, s < 1 so floor(N_P·s) < N_P until N_P hits its
                // minimum, and the minimums alone fit (checked above).
                while gpus(r.prefill, r.decode) > budget64 {
                    let s = budget64 as f64 / gpus(r.prefill, r.decode) as f64;
                    r.prefill = ((f64::from(r.prefill) * s).floor() as u32).max(min.prefill);
                    let room = budget.saturating_sub(r.prefill * g_p) / g_d;
                    r.decode = room.max(min.decode).min(demand_d);
                }
            }
            BudgetRule::DynamoSla => {
                let s = budget64 as f64 / wanted as f64;
                r.prefill = ((f64::from(r.prefill) * s).round() as u32).max(min.prefill);
                let room = (f64::from(budget) - f64::from(r.prefill * g_p)) / f64::from(g_d);
                r.decode = (room.max(0.0).round() as u32).max(min.decode);
                // Rounding can overshoot by one instance; trim the role furthest above its minimum.
                while gpus(r.prefill, r.decode) > budget64 {
                    if r.prefill > min.prefill
                        && (r.prefill - min.prefill) * g_p >= (r.decode - min.decode) * g_d
                    {
                        r.prefill -= 1;
                    } else if r.decode > min.decode {
                        r.decode -= 1;
                    } else {
                        r.prefill -= 1;
                    }
                }
            }
        }
        reasons.push(Reason::Budget {
            wanted_gpus: u32::try_from(wanted).unwrap_or(u32::MAX),
            budget,
        });
    }
    // Per-role maximums last: they only lower counts, so the budget still holds, and the
    // budget split above sees the true demand of both roles.
    for role in Role::SIZED {
        let (v, lo, hi) = match role {
            Role::Prefill => (&mut r.prefill, min.prefill, cfg.max_replicas.prefill),
            Role::Decode | Role::Mixed => (&mut r.decode, min.decode, cfg.max_replicas.decode),
        };
        if let Some(hi) = hi.filter(|hi| *v > *hi) {
            *v = hi.max(lo);
            reasons.push(Reason::MaxReplicas { role, max: hi });
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paper_profile() -> Profile {
        Profile::constant_latency(0.15, 0.040, 2040, 128)
    }

    #[test]
    fn paper_worked_example() {
        // dopd-paper.md §3.2: ISL 1000, OSL 245 → n_blk 9, B_max 226, r* ≈ 3.46, N_P = 4 per D.
        let p = paper_profile();
        let cfg = SizingConfig {
            gpu_budget: 100,
            prefill_rule: PrefillRule::PerDecodeInstance,
            ..Default::default()
        };
        let s = size_dopd(&p, &SizingInput::new(100.0, 1000.0, 245.0), &cfg);
        assert_eq!(s.blocks_per_request, 9);
        assert_eq!(s.b_max, 226);
        assert!((s.r_star - 3.459).abs() < 0.001, "{}", s.r_star);
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 4,
                decode: 1
            }
        );

        // R̂ = 300 → N_D = 2 and, in the general form, N_P = 7.
        let cfg = SizingConfig {
            gpu_budget: 100,
            ..Default::default()
        };
        let s = size_dopd(&p, &SizingInput::new(300.0, 1000.0, 245.0), &cfg);
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 7,
                decode: 2
            }
        );
        assert_eq!(s.gpus, 11);

        // With g_P = 1, g_D = 2 and G_max = 8 the balanced rule keeps the one decode instance that
        // fits with its balanced prefill (ceil(3.46) = 4): 4P + 1D, 6 GPUs.
        let cfg = SizingConfig {
            gpu_budget: 8,
            ..Default::default()
        };
        let s = size_dopd(&p, &SizingInput::new(300.0, 1000.0, 245.0), &cfg);
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 4,
                decode: 1
            }
        );

        // ... and the paper's budget loop returns 5P + 1D (7 GPUs).
        let cfg = SizingConfig {
            gpu_budget: 8,
            budget_rule: BudgetRule::PaperLoop,
            ..Default::default()
        };
        let s = size_dopd(&p, &SizingInput::new(300.0, 1000.0, 245.0), &cfg);
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 5,
                decode: 1
            }
        );
        assert!(s.reasons.contains(&Reason::Budget {
            wanted_gpus: 11,
            budget: 8
        }));
    }

    #[test]
    fn paper_loop_is_not_monotone() {
        // Found by the monotonicity property: a bigger forecast floors prefill up by one and
        // leaves decode an instance fewer under the paper's loop; the balanced rule does not.
        let mut p = Profile::constant_latency(1.0654032421311956, 0.048397668321405914, 2700, 128);
        p.gpus = PerRole {
            prefill: 3,
            decode: 3,
        };
        let cfg = SizingConfig {
            gpu_budget: 59,
            prefill_rule: PrefillRule::Proportional,
            budget_rule: BudgetRule::PaperLoop,
            ..Default::default()
        };
        let small = SizingInput::new(3743.471691739645, 3050.743069669135, 677.3275856594847);
        let big = SizingInput {
            requests: 3743.471691739645 + 4610.054179188846,
            ..small
        };
        let a = size_dopd(&p, &small, &cfg).replicas;
        let b = size_dopd(&p, &big, &cfg).replicas;
        assert!(b.decode < a.decode, "{a:?} -> {b:?}");
        let cfg = SizingConfig {
            budget_rule: BudgetRule::Balanced,
            ..cfg
        };
        let a = size_dopd(&p, &small, &cfg).replicas;
        let b = size_dopd(&p, &big, &cfg).replicas;
        assert!(b.decode >= a.decode, "{a:?} -> {b:?}");
    }

    #[test]
    fn a_decode_maximum_also_caps_the_balancing_prefill() {
        // 300 requests want 2 decode + 7 prefill; with at most 1 decode instance, the balanced
        // rule keeps prefill at what one decode instance can consume (ceil(3.46) = 4).
        let cfg = SizingConfig {
            gpu_budget: 100,
            max_replicas: PerRole {
                prefill: None,
                decode: Some(1),
            },
            ..Default::default()
        };
        let s = size_dopd(
            &paper_profile(),
            &SizingInput::new(300.0, 1000.0, 245.0),
            &cfg,
        );
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 4,
                decode: 1
            }
        );
    }

    #[test]
    fn infinite_demand_saturates_instead_of_collapsing() {
        let cfg = SizingConfig {
            gpu_budget: 1000,
            decode_load: DecodeLoad::LittlesLaw,
            ..Default::default()
        };
        let s = size_dopd(
            &paper_profile(),
            &SizingInput::new(1e308, 1000.0, 1e308),
            &cfg,
        );
        assert!(s.replicas.decode > 1, "{:?}", s.replicas);
    }

    #[test]
    fn kappa_d_slows_consumers_and_lowers_the_ratio() {
        let p = paper_profile();
        let cfg = SizingConfig::default();
        let base = size_dopd(&p, &SizingInput::new(100.0, 1000.0, 245.0), &cfg);
        let slow = size_dopd(
            &p,
            &SizingInput {
                kappa_d: 2.0,
                ..SizingInput::new(100.0, 1000.0, 245.0)
            },
            &cfg,
        );
        assert!((slow.r_star * 2.0 - base.r_star).abs() < 1e-9);
    }

    #[test]
    fn zero_load_gives_the_minimums() {
        let s = size_dopd(
            &paper_profile(),
            &SizingInput::new(0.0, 0.0, 0.0),
            &SizingConfig::default(),
        );
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 1,
                decode: 1
            }
        );
        assert!(
            s.reasons
                .iter()
                .any(|r| matches!(r, Reason::MinReplicas { .. }))
        );
    }

    #[test]
    fn non_finite_inputs_do_not_poison_the_counts() {
        let s = size_dopd(
            &paper_profile(),
            &SizingInput {
                requests: f64::NAN,
                isl: f64::INFINITY,
                osl: -3.0,
                interval_s: 0.0,
                kappa_d: f64::NAN,
                kappa_p: 0.0,
            },
            &SizingConfig::default(),
        );
        assert!(s.replicas.prefill >= 1 && s.replicas.decode >= 1);
        assert!(s.gpus <= 8);
    }

    #[test]
    fn infeasible_budget_keeps_minimums_and_says_so() {
        let cfg = SizingConfig {
            gpu_budget: 2,
            ..Default::default()
        };
        let s = size_dopd(
            &paper_profile(),
            &SizingInput::new(1000.0, 1000.0, 245.0),
            &cfg,
        );
        assert_eq!(
            s.replicas,
            Replicas {
                prefill: 1,
                decode: 1
            }
        );
        assert!(s.reasons.contains(&Reason::BudgetInfeasible {
            minimum_gpus: 3,
            budget: 2
        }));
    }

    #[test]
    fn maximums_cap_each_role() {
        let cfg = SizingConfig {
            gpu_budget: 100,
            max_replicas: PerRole {
                prefill: Some(3),
                decode: None,
            },
            ..Default::default()
        };
        let s = size_dopd(
            &paper_profile(),
            &SizingInput::new(300.0, 1000.0, 245.0),
            &cfg,
        );
        assert_eq!(s.replicas.prefill, 3);
        assert!(s.reasons.contains(&Reason::MaxReplicas {
            role: Role::Prefill,
            max: 3
        }));
    }

    #[test]
    fn dyn_sla_scales_with_token_throughput() {
        let p = crate::profile::roofline::RooflineSpec::llama33_70b_fp8_h100()
            .build()
            .expect("preset");
        let cfg = SizingConfig {
            gpu_budget: 1000,
            ..Default::default()
        };
        let t = SlaTargets::default();
        let small = size_dyn_sla(&p, &SizingInput::new(100.0, 1000.0, 245.0), &t, &cfg);
        let big = size_dyn_sla(&p, &SizingInput::new(1000.0, 1000.0, 245.0), &t, &cfg);
        assert!(big.replicas.prefill > small.replicas.prefill);
        assert!(big.replicas.decode > small.replicas.decode);
        let fit = size_dyn_sla(
            &p,
            &SizingInput::new(1000.0, 1000.0, 245.0),
            &t,
            &SizingConfig::default(),
        );
        assert!(fit.gpus <= 8);
    }

    #[test]
    fn best_decode_throughput_respects_the_itl_target() {
        let p = crate::profile::roofline::RooflineSpec::llama33_70b_fp8_h100()
            .build()
            .expect("preset");
        let (thpt, c) = best_decode_throughput(&p, 0.05, 1122.5);
        assert!(p.tpot(c, 1122.5) <= 0.05);
        assert!(thpt > 1000.0, "{thpt}");
    }
}
