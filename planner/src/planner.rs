//! The planner's tick API: `tick(now, observation) -> decision`.
//!
//! Once per adjustment interval the caller (operator, local mode, simulator) hands the planner an
//! [`Observation`] — the interval's aggregates — and the current time. The planner feeds its
//! forecasters, updates its correction factors and returns a [`Decision`]: the target replica
//! counts and every reason behind them. It never reads a clock and never does I/O; the caller
//! applies the decision through its actuator.
//!
//! Order of rules in one tick:
//! 1. feed the forecasters (requests, mean ISL, mean OSL) and update κ_P, κ_D;
//! 2. **in flight**: if the last change has not landed (replicas pending, or ready counts differ
//!    from the last target) hold everything, for at most `max_reconfig_wait_s`;
//! 3. **idle**: no requests for `idle_after_s` → minimums;
//! 4. the **policy** computes desired counts (DOPD, DYN-SLA, DYN-LOAD or static);
//! 5. **emergency** scale-up by one instance of the role under pressure (prefill queue per
//!    instance, KV usage), within the budget;
//! 6. **scale-down stabilisation**: a role shrinks only to the largest count desired during the
//!    last `scale_down_stabilization_s` (scale-up is immediate).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::forecast::{Forecast, ForecastConfig, Forecaster, ForecasterKind};
use crate::headroom;
use crate::profile::{PerRole, Profile, Role};
use crate::sizing::{
    self, BudgetRule, Reason, Replicas, Signal, Sizing, SizingConfig, SizingInput, SlaTargets,
};
use crate::slo::{self, SloPolicy, SloSizing, SloTargets, Tracker};

mod config;
pub use crate::forecast::WorkloadForecast;
pub use crate::observation::{Observation, ReplicaState};
pub use config::{ConfigError, EmergencyConfig, LoadThresholds, PlannerConfig, PolicyKind};

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

fn finite0(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// A planner decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The tick's time.
    pub at: f64,
    pub policy: PolicyKind,
    /// Counts to run from now on.
    pub target: Replicas,
    /// True when `target` differs from what was running or requested before.
    pub changed: bool,
    /// Every rule that shaped `target`, in the order applied.
    pub reasons: Vec<Reason>,
    pub forecast: Option<WorkloadForecast>,
    pub sizing: Option<Sizing>,
    /// The SLO-aware sizing (the `dopd` policy): what the SLOs need and the predicted latencies
    /// at the chosen counts and at one instance fewer per role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSizing>,
    /// Current correction factors (observed / profiled latency).
    pub kappa: PerRole<f64>,
}

impl Decision {
    /// The reasons' tags (`forecast`, `kv_capacity`, ...), comma-separated, for logs and Events.
    pub fn reason_tags(&self) -> String {
        let tags: Vec<String> = self
            .reasons
            .iter()
            .filter_map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(String::from))
            })
            .collect();
        tags.join(", ")
    }
}

/// The planner: forecasters, correction factors and the bookkeeping for hysteresis.
#[derive(Debug)]
pub struct Planner {
    cfg: PlannerConfig,
    profile: Profile,
    requests: Box<dyn Forecaster>,
    isl: Box<dyn Forecaster>,
    osl: Box<dyn Forecaster>,
    kappa: PerRole<f64>,
    /// Last target issued (what the actuator was asked for).
    issued: Option<Replicas>,
    issued_at: f64,
    last_request_at: Option<f64>,
    started_at: Option<f64>,
    desired_history: VecDeque<(f64, Replicas)>,
    /// When the KV cache last filled and the decode count that asked for (held for
    /// `slo_policy.kv_emergency_hold_startups` decode start-ups, not the whole hold).
    kv_emergency_at: Option<(f64, u32)>,
    decode_grace_left: u32,
    queue_history: VecDeque<f64>,
    last_now: Option<f64>,
    isl_threshold: Option<f64>,
    /// What the `dopd` policy learns from the observations.
    tracker: Tracker,
    /// The bypass threshold of the last SLO-aware sizing.
    bypass: Option<u32>,
    /// The last SLO-aware target for the arrivals as they are, with the surges they have shown
    /// but without what a prefill backlog or a trend's look-ahead asked for: what the hold
    /// remembers (a backlog is cleared once; a trend that is gone no longer calls for the
    /// instances it readied).
    sustained: Option<Replicas>,
    /// Whether this tick's sizing looks ahead over the start-up horizons (burst readiness on a
    /// forecast; not for a known next interval): the hold can then be shorter for smooth loads.
    looks_ahead: bool,
}

impl Planner {
    /// A planner for `profile`, after validating both.
    pub fn new(profile: Profile, cfg: PlannerConfig) -> Result<Self, ConfigError> {
        profile.validate()?;
        cfg.validate()?;
        let build = || cfg.predictor.build(&cfg.forecast);
        Ok(Self {
            requests: build(),
            isl: build(),
            osl: build(),
            profile,
            kappa: PerRole {
                prefill: 1.0,
                decode: 1.0,
            },
            issued: None,
            issued_at: 0.0,
            last_request_at: None,
            started_at: None,
            desired_history: VecDeque::new(),
            kv_emergency_at: None,
            decode_grace_left: 0,
            queue_history: VecDeque::new(),
            last_now: None,
            isl_threshold: None,
            tracker: Tracker::default(),
            bypass: None,
            sustained: None,
            looks_ahead: false,
            cfg,
        })
    }

    /// The long/short routing threshold for the next interval (paper §5): the forecast mean ISL
    /// of the last tick that forecast, else the last observed mean ISL; `None` before any request.
    pub fn isl_threshold(&self) -> Option<f64> {
        self.isl_threshold
    }

    /// The largest prompt to prefill on a decode instance (the `dopd` policy derives it from the
    /// profile and the decode load); `None` when the routing's fixed setting applies.
    pub fn bypass_threshold(&self) -> Option<u32> {
        self.bypass
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// One planning step using the planner's own forecasts.
    pub fn tick(&mut self, now: f64, obs: &Observation) -> Decision {
        self.step(now, obs, None)
    }

    /// One planning step with the next interval given instead of forecast (the simulator's
    /// oracle policy: the lower bound of what forecasting can achieve).
    pub fn tick_with_known_next(
        &mut self,
        now: f64,
        obs: &Observation,
        next: SizingInput,
    ) -> Decision {
        self.step(now, obs, Some(next))
    }

    fn observe(&mut self, now: f64, obs: &Observation) {
        let requests = finite0(obs.requests);
        self.requests.observe(requests);
        let (isl, osl) = if requests > 0.0 {
            (finite(obs.mean_isl), finite(obs.mean_osl))
        } else {
            (None, None)
        };
        self.isl.observe(isl.unwrap_or(f64::NAN));
        self.osl.observe(osl.unwrap_or(f64::NAN));
        if isl.is_some() {
            self.isl_threshold = isl;
        }
        if requests > 0.0 {
            self.last_request_at = Some(now);
        }
        self.started_at.get_or_insert(now);
        let lim = self.cfg.kappa_limit.max(1.0);
        let clamp = |k: f64| k.clamp(1.0 / lim, lim);
        // κ_P = observed TTFT / profiled TTFT(ISL).
        if let (Some(ttft), Some(isl)) = (finite(obs.ttft_s), isl) {
            let k = ttft / self.profile.ttft(isl);
            if k.is_finite() && k > 0.0 {
                self.kappa.prefill = clamp(k);
            }
        }
        // κ_D = observed ITL / profiled TPOT(c_obs, ISL + OSL/2), c_obs by Little's law.
        if let (Some(itl), Some(isl), Some(osl)) = (finite(obs.itl_s), isl, osl) {
            let n_d = f64::from(obs.replicas.decode.ready.max(1));
            let interval = if obs.interval_s > 0.0 {
                obs.interval_s
            } else {
                10.0
            };
            let duration = finite(obs.request_duration_s).unwrap_or(osl * itl);
            let c_obs = (requests / n_d * duration / interval).max(1.0);
            let k = itl / self.profile.tpot(c_obs, isl + osl / 2.0);
            if k.is_finite() && k > 0.0 {
                self.kappa.decode = clamp(k);
            }
        }
        if self.cfg.policy == PolicyKind::Dopd {
            self.tracker
                .observe(obs, &self.cfg.slo, &self.cfg.slo_policy);
        }
        let ready_p = f64::from(obs.replicas.prefill.ready.max(1));
        self.queue_history
            .push_back(finite0(obs.prefill_queue_depth) / ready_p);
        while self.queue_history.len() > self.cfg.load.queue_trend_intervals.max(2) {
            self.queue_history.pop_front();
        }
    }

    fn forecast(&mut self) -> WorkloadForecast {
        WorkloadForecast {
            requests: self.requests.predict(),
            isl: self.isl.predict(),
            osl: self.osl.predict(),
        }
    }

    fn step(&mut self, now: f64, obs: &Observation, known: Option<SizingInput>) -> Decision {
        // A non-finite clock reading is treated as "no time passed".
        let now = if now.is_finite() {
            now
        } else {
            self.last_now.unwrap_or(0.0)
        };
        self.last_now = Some(now);
        self.looks_ahead = known.is_none() && self.cfg.slo_policy.burst_ready;
        self.observe(now, obs);
        let r = &obs.replicas;
        let running = PerRole {
            prefill: r.prefill.ready.saturating_add(r.prefill.pending),
            decode: r.decode.ready.saturating_add(r.decode.pending),
        };
        let ready = PerRole {
            prefill: r.prefill.ready,
            decode: r.decode.ready,
        };
        let current = self.issued.unwrap_or(running);
        let mut reasons = Vec::new();
        let slo_policy = self.cfg.policy == PolicyKind::Dopd;
        let decision = |target: Replicas,
                        reasons: Vec<Reason>,
                        forecast,
                        sizing,
                        slo: Option<SloSizing>,
                        this: &mut Self| {
            let mut reasons = reasons;
            // Which forecaster answered, when one is chosen among several (the scorecard).
            if let Some(at) = reasons
                .iter()
                .position(|r| matches!(r, Reason::Forecast { .. }))
                && let Some(chosen) = this.requests.chosen()
            {
                reasons.insert(
                    at + 1,
                    Reason::Predictor {
                        chosen: chosen.to_string(),
                    },
                );
            }
            let changed = target != current;
            if changed || this.issued.is_none() {
                this.issued = Some(target);
                this.issued_at = now;
            }
            Decision {
                at: now,
                policy: this.cfg.policy,
                target,
                changed,
                reasons,
                forecast,
                sizing,
                slo,
                kappa: this.kappa,
            }
        };

        // 2. A change still landing: hold — except for an emergency on a role whose own change
        // has landed (pressure must not wait out someone else's slow start).
        // (The SLO-aware policy sizes from the workload, not from the counts, so it never needs
        // to wait for a change to land: the hysteresis below keeps it from undoing one.)
        let pending = r.prefill.pending.saturating_add(r.decode.pending);
        if let Some(issued) = self.issued.filter(|_| !slo_policy) {
            let waited = now - self.issued_at;
            if (pending > 0 || ready != issued) && waited < self.cfg.max_reconfig_wait_s {
                reasons.push(Reason::ReconfigInFlight { waited_s: waited });
                // The held target counts as desired for the scale-down stabilisation, so the
                // window starts when the change lands, not when it was asked for.
                self.remember_desired(now, issued);
                let landed = PerRole {
                    prefill: r.prefill.pending == 0 && ready.prefill == issued.prefill,
                    decode: r.decode.pending == 0 && ready.decode == issued.decode,
                };
                let target = self.emergency(issued, issued, ready, landed, obs, &mut reasons);
                return decision(target, reasons, None, None, None, self);
            }
        }

        // 3. Idle: no arrivals for a while and nothing left in flight (decoding requests hold KV).
        let idle_s = now - self.last_request_at.or(self.started_at).unwrap_or(now);
        let drained = finite0(obs.prefill_queue_depth) == 0.0 && finite0(obs.kv_usage) < 0.01;
        // The SLO-aware policy waits out its hysteresis too: a quiet spell shorter than that is
        // cheaper to sit through than to restart from.
        let idle_after = if slo_policy {
            self.cfg
                .idle_after_s
                .max(self.hold_windows().prefill.min(self.hold_windows().decode))
        } else {
            self.cfg.idle_after_s
        };
        // The SLO-aware policy sizes quiet spells itself when told to: its surge readiness keeps
        // what the bursts ending such spells have needed, and each role's hold runs its course
        // (the idle rule cut both roles' holds at the shorter one).
        let sizes_idle = slo_policy && self.cfg.slo_policy.size_idle;
        if self.cfg.idle_after_s > 0.0
            && idle_s >= idle_after
            && drained
            && self.cfg.policy != PolicyKind::Static
            && !sizes_idle
        {
            reasons.push(Reason::Idle { idle_s });
            let target = self.cfg.sizing.min_replicas;
            self.desired_history.clear();
            self.kv_emergency_at = None;
            return decision(target, reasons, None, None, None, self);
        }

        // 4. Policy.
        let mut forecast = None;
        let mut sizing_out = None;
        let mut slo_out = None;
        let mut desired = match self.cfg.policy {
            PolicyKind::Dopd => {
                let (t, f, s) = self.slo_desired(obs, known, &mut reasons);
                forecast = f;
                slo_out = Some(s);
                t
            }
            PolicyKind::Static => self.constrained(self.cfg.static_replicas, &mut reasons),
            PolicyKind::DynLoad => {
                let t = self.load_policy(current, obs, &mut reasons);
                self.constrained(t, &mut reasons)
            }
            PolicyKind::DopdPaper | PolicyKind::DynSla => {
                let input = match known {
                    Some(k) => k,
                    None => {
                        let f = self.forecast();
                        let held = self.requests.len();
                        if held < self.warmup_len() {
                            reasons.push(Reason::Warmup { observations: held });
                        }
                        forecast = Some(f);
                        if f.isl.point > 0.0 {
                            self.isl_threshold = Some(f.isl.point);
                        }
                        // Before any request has been seen there is no length to forecast: use
                        // the configured defaults rather than sizing for 1-token requests.
                        let isl = if self.isl.is_empty() {
                            self.cfg.default_isl
                        } else {
                            f.isl.point
                        };
                        let osl = if self.osl.is_empty() {
                            self.cfg.default_osl
                        } else {
                            f.osl.point
                        };
                        SizingInput {
                            requests: f.requests.point,
                            isl,
                            osl,
                            interval_s: if obs.interval_s > 0.0 {
                                obs.interval_s
                            } else {
                                10.0
                            },
                            kappa_d: 1.0,
                            kappa_p: 1.0,
                        }
                    }
                };
                // The planner's own correction factors always apply (also to known inputs).
                let input = SizingInput {
                    kappa_d: self.kappa.decode,
                    kappa_p: self.kappa.prefill,
                    ..input
                };
                let s = if self.cfg.policy != PolicyKind::DynSla {
                    sizing::size_dopd(&self.profile, &input, &self.cfg.sizing)
                } else {
                    sizing::size_dyn_sla(&self.profile, &input, &self.cfg.sla, &self.cfg.sizing)
                };
                reasons.extend(s.reasons.iter().cloned());
                let t = s.replicas;
                sizing_out = Some(s);
                t
            }
        };

        // 5. Emergency scale-up on pressure, within the budget and the maximums.
        if matches!(
            self.cfg.policy,
            PolicyKind::Dopd | PolicyKind::DopdPaper | PolicyKind::DynSla
        ) {
            let all = PerRole {
                prefill: true,
                decode: true,
            };
            desired = self.emergency(desired, current, ready, all, obs, &mut reasons);
        }

        // 6. Scale-down stabilisation. The SLO-aware policy's hold remembers what the arrivals
        // need, not what a backlog or a prefill-queue emergency asked for once: a backlog is
        // cleared once. A full KV cache is different: it says the decode instances hold more
        // than the model gives them, and dropping the instance it asked for before it was up
        // left the cache full (a decode-heavy load flapped 2 <-> 3 decode instances with the
        // third never serving; `docs/experiments.md`). That instance is held for
        // `kv_emergency_hold_startups` decode start-ups: it comes up and serves, and then stays
        // only while the cache fills again.
        let kv_emergency = reasons.iter().any(|r| {
            matches!(
                r,
                Reason::Emergency {
                    signal: Signal::KvUsage,
                    ..
                }
            )
        });
        let dopd = self.cfg.policy == PolicyKind::Dopd;
        let basis = match (dopd, self.sustained.take()) {
            (true, Some(s)) => PerRole {
                prefill: desired.prefill.min(s.prefill),
                decode: desired.decode.min(s.decode),
            },
            _ => desired,
        };
        self.remember_desired(now, basis);
        let windows = self.hold_windows();
        let kv_window = if dopd {
            (self.cfg.slo_policy.kv_emergency_hold_startups * self.profile.startup_s.decode)
                .min(windows.decode)
        } else {
            0.0
        };
        if kv_emergency && dopd {
            let before = match self.kv_emergency_at {
                Some((t, n)) if now - t <= kv_window => n,
                _ => 0,
            };
            self.kv_emergency_at = Some((now, desired.decode.max(before)));
        }
        if windows.prefill > 0.0 || windows.decode > 0.0 {
            let within = |t: f64, w: f64| now - t <= w;
            let mut peak = self
                .desired_history
                .iter()
                .fold(desired, |m, (t, r)| PerRole {
                    prefill: if within(*t, windows.prefill) {
                        m.prefill.max(r.prefill)
                    } else {
                        m.prefill
                    },
                    decode: if within(*t, windows.decode) {
                        m.decode.max(r.decode)
                    } else {
                        m.decode
                    },
                });
            if let Some((t, n)) = self.kv_emergency_at
                && within(t, kv_window)
            {
                peak.decode = peak.decode.max(n);
            }
            let mut held = desired;
            let mut held_reasons = Vec::new();
            for role in Role::SIZED {
                let (d, cur, pk) = match role {
                    Role::Prefill => (&mut held.prefill, current.prefill, peak.prefill),
                    Role::Decode | Role::Mixed => (&mut held.decode, current.decode, peak.decode),
                };
                if *d < cur {
                    let keep = pk.min(cur);
                    if keep > *d {
                        held_reasons.push(Reason::Cooldown {
                            role,
                            held_at: keep,
                            wanted: *d,
                        });
                        *d = keep;
                    }
                }
            }
            // Holding one role back must not push the total over the budget while the other
            // role scales up: then the scale-up wins and the hold is dropped — unless the held
            // role still has instances starting and the other role only grows back to where it
            // was (a swap under the budget still landing, [`Swap::landing`]). Reversing such a
            // swap stopped the starting instances before they served, and the split flapped
            // with some of its GPUs never serving (conversation x4, `docs/experiments.md`).
            let budget = self.cfg.sizing.gpu_budget;
            if held.gpus(&self.profile) <= budget || desired.gpus(&self.profile) > budget {
                desired = held;
                reasons.extend(held_reasons);
            } else if self.cfg.policy == PolicyKind::Dopd {
                // Which role grows back to a count it was given within its hold (a reversal,
                // not a new high).
                let n = self.desired_history.len().saturating_sub(1);
                let before = |role: Role, w: f64| {
                    self.desired_history
                        .iter()
                        .take(n)
                        .filter(|(t, _)| within(*t, w))
                        .map(|(_, r)| r.get(role))
                        .max()
                        .unwrap_or(0)
                };
                let back = PerRole {
                    prefill: desired.prefill <= before(Role::Prefill, windows.prefill),
                    decode: desired.decode <= before(Role::Decode, windows.decode),
                };
                let starting = PerRole {
                    prefill: obs.replicas.prefill.pending > 0,
                    decode: obs.replicas.decode.pending > 0,
                };
                let swap = Swap {
                    held,
                    desired,
                    current,
                    starting,
                    back,
                };
                if let Some(f) = swap.landing(&self.profile, budget) {
                    desired = f;
                    reasons.extend(held_reasons);
                }
            }
        }
        decision(desired, reasons, forecast, sizing_out, slo_out, self)
    }

    /// Observations after which a forecast is model-based rather than a repeat of the last value.
    fn warmup_len(&self) -> usize {
        match self.cfg.predictor {
            ForecasterKind::Arima => self.cfg.forecast.arima.min_history,
            ForecasterKind::Kalman => 4,
            // Until every member is scored it answers with ARIMA.
            ForecasterKind::Best => self.cfg.forecast.arima.min_history,
            ForecasterKind::Last | ForecasterKind::MovingAverage => 1,
        }
    }

    fn remember_desired(&mut self, now: f64, desired: Replicas) {
        let w = self.hold_windows();
        let window = w.prefill.max(w.decode);
        self.desired_history.push_back((now, desired));
        while self
            .desired_history
            .front()
            .is_some_and(|(t, _)| !(now - t <= window))
        {
            self.desired_history.pop_front();
        }
    }

    /// Minimums, maximums and the budget applied to counts a policy produced.
    fn constrained(&self, raw: Replicas, reasons: &mut Vec<Reason>) -> Replicas {
        sizing::constrain(
            &self.profile,
            raw,
            &self.cfg.sizing,
            BudgetRule::PaperLoop,
            None,
            reasons,
        )
    }

    /// Emergency rule: a role under pressure gets one instance more than it has (`current`), when
    /// `eligible`, within the budget and its maximum.
    fn emergency(
        &self,
        mut desired: Replicas,
        current: Replicas,
        ready: Replicas,
        eligible: PerRole<bool>,
        obs: &Observation,
        reasons: &mut Vec<Reason>,
    ) -> Replicas {
        let e = &self.cfg.emergency;
        if !e.enabled {
            return desired;
        }
        let per_p = finite0(obs.prefill_queue_depth) / f64::from(ready.prefill.max(1));
        let kv = finite0(obs.kv_usage);
        let max = self.cfg.sizing.max_replicas;
        for (role, signal, value, threshold) in [
            (
                Role::Prefill,
                Signal::PrefillQueuePerInstance,
                per_p,
                e.prefill_queue_per_instance,
            ),
            (Role::Decode, Signal::KvUsage, kv, e.kv_usage),
        ] {
            if !eligible.get(role) || !(value > threshold) {
                continue;
            }
            let mut up = desired;
            let (slot, cur, cap) = match role {
                Role::Prefill => (&mut up.prefill, current.prefill, max.prefill),
                Role::Decode | Role::Mixed => (&mut up.decode, current.decode, max.decode),
            };
            *slot = (*slot).max(cur.saturating_add(1));
            if cap.is_some_and(|c| *slot > c) {
                continue;
            }
            if up != desired && up.gpus(&self.profile) <= self.cfg.sizing.gpu_budget {
                desired = up;
                reasons.push(Reason::Emergency {
                    role,
                    signal,
                    value,
                    threshold,
                });
            }
        }
        desired
    }

    /// Dynamo's load planner: ±1 per role on thresholds, with a decode grace period and a check
    /// that the prefill queue is not already draining.
    fn load_policy(
        &mut self,
        current: Replicas,
        obs: &Observation,
        reasons: &mut Vec<Reason>,
    ) -> Replicas {
        let t = self.cfg.load.clone();
        let min = self.cfg.sizing.min_replicas;
        let budget = self.cfg.sizing.gpu_budget;
        let mut target = current;
        let per_p = finite0(obs.prefill_queue_depth) / f64::from(obs.replicas.prefill.ready.max(1));
        let draining = {
            // Least-squares slope over the history, extrapolated over the same span.
            let h: Vec<f64> = self.queue_history.iter().copied().collect();
            crate::stats::trend_line(&h)
                .is_some_and(|(slope, _)| per_p + slope * (h.len() as f64) < t.queue_scale_up)
        };
        let gpus = |r: &Replicas| r.gpus(&self.profile);
        if per_p > t.queue_scale_up && !draining {
            let mut up = target;
            up.prefill += 1;
            if gpus(&up) <= budget {
                target = up;
                reasons.push(Reason::LoadThreshold {
                    role: Role::Prefill,
                    signal: Signal::PrefillQueuePerInstance,
                    value: per_p,
                    threshold: t.queue_scale_up,
                    up: true,
                });
            }
        } else if per_p < t.queue_scale_down && target.prefill > min.prefill {
            target.prefill -= 1;
            reasons.push(Reason::LoadThreshold {
                role: Role::Prefill,
                signal: Signal::PrefillQueuePerInstance,
                value: per_p,
                threshold: t.queue_scale_down,
                up: false,
            });
        }
        let kv = finite0(obs.kv_usage);
        if self.decode_grace_left > 0 {
            self.decode_grace_left -= 1;
        } else if kv > t.kv_scale_up {
            let mut up = target;
            up.decode += 1;
            if gpus(&up) <= budget {
                target = up;
                self.decode_grace_left = t.decode_grace_intervals;
                reasons.push(Reason::LoadThreshold {
                    role: Role::Decode,
                    signal: Signal::KvUsage,
                    value: kv,
                    threshold: t.kv_scale_up,
                    up: true,
                });
            }
        } else if kv < t.kv_scale_down && target.decode > min.decode {
            target.decode -= 1;
            reasons.push(Reason::LoadThreshold {
                role: Role::Decode,
                signal: Signal::KvUsage,
                value: kv,
                threshold: t.kv_scale_down,
                up: false,
            });
        }
        target
    }
}

/// A split of the budget between the roles that is changing: the counts the hold keeps
/// (`held`, over the budget), the counts the sizing asks for (`desired`, within it), those last
/// given (`current`), which roles have instances starting, and which role grows back to a count
/// it had within its hold.
struct Swap {
    held: Replicas,
    desired: Replicas,
    current: Replicas,
    starting: PerRole<bool>,
    back: PerRole<bool>,
}

impl Swap {
    /// The counts that let a swap still landing land: when the held role has instances starting
    /// and the other role grows back to where it was, the held role keeps its count and the
    /// other gets what fits beside it, never less than it was given. `None`: the growing role
    /// wins (a new high, or nothing starting to protect).
    fn landing(&self, profile: &Profile, budget: u32) -> Option<Replicas> {
        let (h, d, c) = (self.held, self.desired, self.current);
        let g = profile.gpus;
        let fitted = if h.decode > d.decode && self.starting.decode && self.back.prefill {
            let room = budget.saturating_sub(h.decode * g.decode) / g.prefill.max(1);
            Replicas {
                prefill: d.prefill.min(room).max(c.prefill),
                decode: h.decode,
            }
        } else if h.prefill > d.prefill && self.starting.prefill && self.back.decode {
            let room = budget.saturating_sub(h.prefill * g.prefill) / g.decode.max(1);
            Replicas {
                prefill: h.prefill,
                decode: d.decode.min(room).max(c.decode),
            }
        } else {
            return None;
        };
        (fitted.gpus(profile) <= budget).then_some(fitted)
    }
}

mod slo_policy;

#[cfg(test)]
mod tests;
