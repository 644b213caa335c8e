//! What the planner is configured with: the policy, its thresholds and limits
//! ([`PlannerConfig`]), and the check that refuses settings it cannot work with.

use super::*;

/// The scaling policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// DOPD as this project runs it: SLO-aware sizing from a queueing model, closed on the
    /// observed latencies, ready for bursts (see `crate::slo`).
    #[default]
    Dopd,
    /// DOPD as the paper states it: forecast, KV-bound decode, producer/consumer-balanced prefill
    /// (paper §3), kept for fidelity and ablation.
    DopdPaper,
    /// Dynamo's SLA planner (throughput per GPU from the profile).
    DynSla,
    /// Dynamo's load planner (thresholds on KV usage and prefill queue).
    DynLoad,
    /// Fixed counts.
    Static,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dopd" => Ok(Self::Dopd),
            "dopd-paper" => Ok(Self::DopdPaper),
            "dyn-sla" => Ok(Self::DynSla),
            "dyn-load" => Ok(Self::DynLoad),
            "static" => Ok(Self::Static),
            other => Err(format!(
                "unknown policy {other:?}: expected dopd, dopd-paper, dyn-sla, dyn-load or static"
            )),
        }
    }
}

/// Thresholds of Dynamo's load planner (its shipped defaults, paper §6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadThresholds {
    pub kv_scale_up: f64,
    pub kv_scale_down: f64,
    pub queue_scale_up: f64,
    pub queue_scale_down: f64,
    /// Planning ticks (held ticks do not count) without decode changes after a decode scale-up.
    pub decode_grace_intervals: u32,
    /// Intervals of queue history for the "queue is draining" check.
    pub queue_trend_intervals: usize,
}

impl Default for LoadThresholds {
    fn default() -> Self {
        Self {
            kv_scale_up: 0.9,
            kv_scale_down: 0.5,
            queue_scale_up: 5.0,
            queue_scale_down: 0.2,
            decode_grace_intervals: 3,
            queue_trend_intervals: 3,
        }
    }
}

/// Emergency scale-up thresholds (paper §6: values not published; these follow Dynamo's
/// load-planner scale-up thresholds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmergencyConfig {
    pub enabled: bool,
    /// Prefill queue length per ready prefill instance.
    pub prefill_queue_per_instance: f64,
    /// Decode KV usage fraction above which one decode instance is added (1 or more: never).
    pub kv_usage: f64,
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prefill_queue_per_instance: 5.0,
            kv_usage: 0.9,
        }
    }
}

/// Everything the planner is configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlannerConfig {
    pub policy: PolicyKind,
    pub predictor: ForecasterKind,
    pub forecast: ForecastConfig,
    pub sizing: SizingConfig,
    pub sla: SlaTargets,
    /// The service's SLOs (the `dopd` policy sizes for them).
    pub slo: SloTargets,
    /// Settings of the `dopd` policy's SLO-aware sizing, closed loop and hysteresis.
    pub slo_policy: SloPolicy,
    pub load: LoadThresholds,
    pub emergency: EmergencyConfig,
    /// Counts used by the static policy.
    pub static_replicas: Replicas,
    /// Shrink to the minimums after this long without requests (DOPD code: 50 s).
    pub idle_after_s: f64,
    /// Scale-down looks back this far and keeps the largest desired count (0 disables).
    pub scale_down_stabilization_s: f64,
    /// Give up waiting for an in-flight change after this long (e.g. pods stuck Pending).
    pub max_reconfig_wait_s: f64,
    /// Correction factors are clamped to `[1/k, k]`.
    pub kappa_limit: f64,
    /// Mean ISL assumed until the first request has been seen.
    pub default_isl: f64,
    /// Mean OSL assumed until the first request has been seen.
    pub default_osl: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Dopd,
            predictor: ForecasterKind::Best,
            forecast: ForecastConfig::default(),
            sizing: SizingConfig::default(),
            sla: SlaTargets::default(),
            slo: SloTargets::default(),
            slo_policy: SloPolicy::default(),
            load: LoadThresholds::default(),
            emergency: EmergencyConfig::default(),
            static_replicas: PerRole {
                prefill: 1,
                decode: 1,
            },
            idle_after_s: 50.0,
            scale_down_stabilization_s: 30.0,
            max_reconfig_wait_s: 300.0,
            kappa_limit: 10.0,
            default_isl: 1024.0,
            default_osl: 256.0,
        }
    }
}

/// A configuration value the planner cannot work with.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("planner config `{field}` = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
}

impl PlannerConfig {
    /// Sizes for the routing the router runs: its fixed ultra-short threshold is the bypass
    /// when the policy does not derive one, and a routing without the bypass (or without length
    /// awareness) gets none derived either.
    pub fn follow_routing(&mut self, routing: &crate::routing::RoutingConfig, length_aware: bool) {
        let on = length_aware && routing.ultra_short_bypass;
        self.slo_policy.fixed_bypass_isl = if on { routing.ultra_short_max_isl } else { 0 };
        self.slo_policy.bypass_from_profile &= on;
    }

    /// The prefill model orders waiting work as the router's prefill queue `q` does:
    /// deadline-first only in the shared queue (an ablation may have turned it off already).
    pub fn follow_prefill_queue(&mut self, q: crate::routing::PrefillQueue) {
        self.slo_policy.deadline_first &= q == crate::routing::PrefillQueue::Shared;
    }

    /// Checks every number the tick relies on; errors name the field and value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, reason| {
            Err(ConfigError::Invalid {
                field,
                value,
                reason,
            })
        };
        for (field, v) in [
            ("idle_after_s", self.idle_after_s),
            (
                "scale_down_stabilization_s",
                self.scale_down_stabilization_s,
            ),
            ("max_reconfig_wait_s", self.max_reconfig_wait_s),
            (
                "emergency.prefill_queue_per_instance",
                self.emergency.prefill_queue_per_instance,
            ),
            ("emergency.kv_usage", self.emergency.kv_usage),
            ("load.kv_scale_up", self.load.kv_scale_up),
            ("load.kv_scale_down", self.load.kv_scale_down),
            ("load.queue_scale_up", self.load.queue_scale_up),
            ("load.queue_scale_down", self.load.queue_scale_down),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v.to_string(), "must be finite and >= 0");
            }
        }
        for (field, v) in [
            ("slo.ttft_per_token_s", self.slo.ttft_per_token_s),
            ("slo_policy.hold_startups", self.slo_policy.hold_startups),
            (
                "slo_policy.kv_emergency_hold_startups",
                self.slo_policy.kv_emergency_hold_startups,
            ),
            (
                "slo_policy.kv_link_bytes_per_s",
                self.slo_policy.kv_link_bytes_per_s,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v.to_string(), "must be finite and >= 0");
            }
        }
        for (field, v) in [
            ("slo_policy.miss_budget", self.slo_policy.miss_budget),
            ("slo_policy.ttft_target", self.slo_policy.ttft_target),
            ("slo_policy.tpot_target", self.slo_policy.tpot_target),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(field, v.to_string(), "must be in (0, 1]");
            }
        }
        if !(self.slo_policy.max_correction >= 1.0 && self.slo_policy.max_correction.is_finite()) {
            return bad(
                "slo_policy.max_correction",
                self.slo_policy.max_correction.to_string(),
                "must be finite and >= 1",
            );
        }
        for (field, v) in [
            ("default_isl", self.default_isl),
            ("default_osl", self.default_osl),
            ("sla.itl_s", self.sla.itl_s),
            ("sla.ttft_s", self.sla.ttft_s),
            ("slo.ttft_s", self.slo.ttft_s),
            ("slo.tpot_s", self.slo.tpot_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, v.to_string(), "must be finite and > 0");
            }
        }
        if !(self.kappa_limit.is_finite() && self.kappa_limit >= 1.0) {
            return bad(
                "kappa_limit",
                self.kappa_limit.to_string(),
                "must be finite and >= 1",
            );
        }
        if self.forecast.window == 0 {
            return bad("forecast.window", "0".into(), "must be >= 1");
        }
        let s = &self.sizing;
        for (field, min, max) in [
            (
                "sizing.min_replicas.prefill",
                s.min_replicas.prefill,
                s.max_replicas.prefill,
            ),
            (
                "sizing.min_replicas.decode",
                s.min_replicas.decode,
                s.max_replicas.decode,
            ),
        ] {
            if min == 0 {
                return bad(
                    field,
                    "0".into(),
                    "must be >= 1 (a role with no instance serves nothing)",
                );
            }
            if max.is_some_and(|m| m < min) {
                return bad(
                    field,
                    min.to_string(),
                    "must not exceed the role's max_replicas",
                );
            }
        }
        Ok(())
    }
}
