//! What a run is told: the policy, the settings, and the checks that refuse a run that could not
//! start.

use super::*;

/// The scaling policy of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PolicySpec {
    /// DOPD: forecasting planner plus length-aware routing.
    Dopd,
    /// DOPD as the paper states its sizing, with the same routing.
    DopdPaper,
    /// DOPD sizing fed the true next interval (the lower bound on GPUs for this planner).
    Oracle,
    /// Dynamo's SLA planner; every request prefilled remotely, one at a time.
    DynSla,
    /// Dynamo's load planner; every request prefilled remotely, one at a time.
    DynLoad,
    /// Fixed prefill/decode counts; every request prefilled remotely, one at a time.
    Static { replicas: Replicas },
    /// `instances` identical instances that prefill and decode (vLLM-like), each with the
    /// decode role's GPUs.
    Aggregated { instances: u32 },
}

impl PolicySpec {
    pub fn name(&self) -> String {
        match self {
            Self::Dopd => "dopd".into(),
            Self::DopdPaper => "dopd-paper".into(),
            Self::Oracle => "oracle".into(),
            Self::DynSla => "dyn-sla".into(),
            Self::DynLoad => "dyn-load".into(),
            Self::Static { replicas } => {
                format!("static-{}p{}d", replicas.prefill, replicas.decode)
            }
            Self::Aggregated { instances } => format!("aggregated-{instances}"),
        }
    }

    pub(super) fn planner_kind(&self) -> PolicyKind {
        match self {
            Self::Dopd | Self::Oracle => PolicyKind::Dopd,
            Self::DopdPaper => PolicyKind::DopdPaper,
            Self::DynSla => PolicyKind::DynSla,
            Self::DynLoad => PolicyKind::DynLoad,
            Self::Static { .. } | Self::Aggregated { .. } => PolicyKind::Static,
        }
    }

    /// DOPD's length-aware routing is part of DOPD; the baselines send every prompt to a
    /// prefill instance as it arrives.
    pub(super) fn length_aware(&self) -> bool {
        matches!(self, Self::Dopd | Self::DopdPaper | Self::Oracle)
    }
}

/// Settings of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub policy: PolicySpec,
    /// Planner settings (the policy kind is taken from `policy`).
    pub planner: PlannerConfig,
    /// Routing settings for length-aware policies (ablations switch parts off here).
    pub routing: RoutingConfig,
    /// Planner tick, seconds (the DOPD configs use 10).
    pub interval_s: f64,
    /// KV-transfer bandwidth between prefill and decode, bytes/s (0: instantaneous).
    pub kv_link_bytes_per_s: f64,
    /// Fixed KV-transfer latency, seconds.
    pub kv_link_latency_s: f64,
    /// Most prompt tokens a decode/aggregated step prefills (chunked prefill).
    pub prefill_chunk_tokens: u32,
    /// TTFT SLO: `slo_ttft_s + slo_ttft_per_token_s × ISL` (the per-token allowance makes it
    /// length-aware; 0 gives a fixed SLO).
    pub slo_ttft_s: f64,
    pub slo_ttft_per_token_s: f64,
    pub slo_tpot_s: f64,
    /// Instances running (and ready) when the replay starts.
    pub initial: Replicas,
    /// Force DOPD's length-aware routing on (or off) whatever the policy (`None`: on for DOPD and
    /// the oracle only). With a static policy this isolates the routing's effect.
    pub length_aware_routing: Option<bool>,
    /// Keep every step of the control loop (what it observed, the orders it gave) in
    /// [`SimResult::control`], to replay them through another loop.
    pub record_control: bool,
    /// Warm-up: requests arriving before this are served but not scored, and GPUs count from
    /// here (so dynamic policies are measured running, not on a cold start from `initial`).
    pub score_from_s: f64,
    /// How prefill work waits for an instance (see [`PrefillQueue`]).
    pub prefill_queue: PrefillQueue,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            policy: PolicySpec::Dopd,
            planner: PlannerConfig::default(),
            routing: RoutingConfig::default(),
            interval_s: 10.0,
            kv_link_bytes_per_s: 50e9,
            kv_link_latency_s: 0.0005,
            prefill_chunk_tokens: 2048,
            slo_ttft_s: 2.0,
            slo_ttft_per_token_s: 0.0,
            slo_tpot_s: 0.08,
            initial: PerRole {
                prefill: 1,
                decode: 1,
            },
            length_aware_routing: None,
            record_control: false,
            score_from_s: 0.0,
            prefill_queue: PrefillQueue::default(),
        }
    }
}

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "the run stalled with {finished} of {total} requests finished (no instance could serve the rest)"
    )]
    Incomplete { finished: usize, total: usize },
    #[error("simulator config `{field}` = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// The planner's settings for a run: `cfg.planner` with the run's policy, SLOs, KV link and
/// routing (what a loop outside the simulator needs to decide the same).
pub fn planner_config(cfg: &SimConfig) -> PlannerConfig {
    let mut planner_cfg = cfg.planner.clone();
    planner_cfg.policy = cfg.policy.planner_kind();
    // The planner sizes for the run's SLOs, KV link and routing.
    planner_cfg.slo = dopd_planner::slo::SloTargets {
        ttft_s: cfg.slo_ttft_s,
        ttft_per_token_s: cfg.slo_ttft_per_token_s,
        tpot_s: cfg.slo_tpot_s,
    };
    planner_cfg.slo_policy.kv_link_bytes_per_s = cfg.kv_link_bytes_per_s;
    planner_cfg.follow_prefill_queue(cfg.prefill_queue);
    planner_cfg.follow_routing(
        &cfg.routing,
        cfg.length_aware_routing
            .unwrap_or(cfg.policy.length_aware()),
    );
    planner_cfg
}

pub(super) fn validate(cfg: &SimConfig) -> Result<(), SimError> {
    let bad = |field, value: f64, reason| {
        Err(SimError::Invalid {
            field,
            value: value.to_string(),
            reason,
        })
    };
    if !(cfg.interval_s.is_finite() && cfg.interval_s > 0.0) {
        return bad("interval_s", cfg.interval_s, "must be finite and > 0");
    }
    for (field, v) in [
        ("kv_link_bytes_per_s", cfg.kv_link_bytes_per_s),
        ("kv_link_latency_s", cfg.kv_link_latency_s),
        ("slo_ttft_s", cfg.slo_ttft_s),
        ("slo_ttft_per_token_s", cfg.slo_ttft_per_token_s),
        ("slo_tpot_s", cfg.slo_tpot_s),
        ("score_from_s", cfg.score_from_s),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return bad(field, v, "must be finite and >= 0");
        }
    }
    if cfg.prefill_chunk_tokens == 0 {
        return bad("prefill_chunk_tokens", 0.0, "must be >= 1");
    }
    if cfg.initial.decode == 0
        && !matches!(
            cfg.policy,
            PolicySpec::Aggregated { .. } | PolicySpec::Static { .. }
        )
    {
        return bad(
            "initial.decode",
            0.0,
            "must be >= 1: requests need a decode instance from the start",
        );
    }
    if let PolicySpec::Static { replicas } = cfg.policy
        && replicas.decode == 0
    {
        return bad("policy.replicas.decode", 0.0, "must be >= 1");
    }
    if let PolicySpec::Aggregated { instances: 0 } = cfg.policy {
        return bad("policy.instances", 0.0, "must be >= 1");
    }
    Ok(())
}
