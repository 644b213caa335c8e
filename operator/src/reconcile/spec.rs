//! What a DopdService's spec configures: the planner, the control loop, the performance profile
//! (a preset, a roofline spec or a ConfigMap) and the router's API key (a Secret).

use dopd_planner::control::ControlConfig;
use dopd_planner::planner::PlannerConfig;
use dopd_planner::profile::{PerRole, Profile, roofline};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;

use super::Ctx;
use crate::crd::{DEFAULT_PRESET, DopdServiceSpec};

/// The planner configuration a spec asks for.
pub fn planner_config(spec: &DopdServiceSpec) -> PlannerConfig {
    let p = &spec.planner;
    let mut c = PlannerConfig {
        policy: p.policy.parse().unwrap_or_default(),
        ..PlannerConfig::default()
    };
    if let Ok(k) = p.predictor.parse() {
        c.predictor = k;
    }
    c.forecast.window = p.window as usize;
    c.sla.ttft_s = f64::from(spec.slo.ttft_ms) / 1000.0;
    c.sla.itl_s = f64::from(spec.slo.tpot_ms) / 1000.0;
    let routing = dopd_planner::routing::RoutingConfig {
        ultra_short_max_isl: p.ultra_short_max_isl,
        ..Default::default()
    };
    c.follow_routing(&routing, true);
    c.slo = dopd_planner::slo::SloTargets {
        ttft_s: c.sla.ttft_s,
        ttft_per_token_s: spec.slo.ttft_per_token_ms.max(0.0) / 1000.0,
        tpot_s: c.sla.itl_s,
    };
    c.sizing.min_replicas = PerRole {
        prefill: spec.prefill.min_replicas,
        decode: spec.decode.min_replicas,
    };
    c.sizing.max_replicas = PerRole {
        prefill: Some(spec.prefill.max_replicas),
        decode: Some(spec.decode.max_replicas),
    };
    c.static_replicas = c.sizing.min_replicas;
    c.sizing.gpu_budget = p.gpu_budget;
    c.emergency.enabled = p.emergency.enabled;
    c.emergency.prefill_queue_per_instance = p.emergency.prefill_queue_per_instance;
    c.emergency.kv_usage = p.emergency.kv_usage;
    c.scale_down_stabilization_s = f64::from(p.scale_down_stabilization_seconds);
    // Pods stuck Pending are not waited for longer than this.
    c.max_reconfig_wait_s = f64::from(p.pending_timeout_seconds);
    c
}

/// The control loop's own settings from a spec.
pub fn control_config(spec: &DopdServiceSpec) -> ControlConfig {
    ControlConfig {
        interval_s: f64::from(spec.planner.interval_seconds.max(1)),
        drain_timeout_s: f64::from(spec.planner.drain_timeout_seconds),
        headroom: spec.headroom.enabled,
        paused: spec.planner.paused,
    }
}

/// The profile a spec names, with GPUs per instance from the spec.
pub(crate) async fn resolve_profile(
    ctx: &Ctx,
    ns: &str,
    spec: &DopdServiceSpec,
) -> Result<Profile, String> {
    let src = &spec.profile;
    let mut profile = if let Some(text) = &src.inline {
        Profile::parse(text).map_err(|e| format!("spec.profile.inline: {e}"))?
    } else if let Some(r) = &src.config_map_ref {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let cm = api
            .get_opt(&r.name)
            .await
            .map_err(|e| format!("reading ConfigMap {}: {e}", r.name))?
            .ok_or_else(|| format!("spec.profile.configMapRef: ConfigMap {} not found", r.name))?;
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .ok_or_else(|| format!("ConfigMap {} has no key {:?}", r.name, r.key))?;
        Profile::parse(text).map_err(|e| format!("ConfigMap {} key {}: {e}", r.name, r.key))?
    } else {
        let name = src.preset.as_deref().unwrap_or(DEFAULT_PRESET);
        roofline::RooflineSpec::preset(name)
            .ok_or_else(|| {
                format!(
                    "spec.profile.preset {name:?} is unknown; known: {}",
                    roofline::PRESETS.join(", ")
                )
            })?
            .build()
            .map_err(|e| format!("preset {name}: {e}"))?
    };
    // The budget counts GPUs as the spec declares them (a CPU instance counts as one).
    profile.gpus = PerRole {
        prefill: spec.prefill.gpus_per_instance.max(1),
        decode: spec.decode.gpus_per_instance.max(1),
    };
    profile.validate().map_err(|e| format!("profile: {e}"))?;
    Ok(profile)
}

pub(crate) async fn api_key(ctx: &Ctx, ns: &str, spec: &DopdServiceSpec) -> Option<String> {
    let name = spec.router.api_key_secret.as_ref()?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let s = api.get_opt(name).await.ok()??;
    let bytes = s.data?.get("api-key")?.0.clone();
    String::from_utf8(bytes).ok()
}
