//! The `DopdService` custom resource (`dopd.dev/v1alpha1`).
//!
//! One object names a model, its SLOs and a GPU budget; the operator turns it into a router,
//! prefill workers and decode workers and keeps their ratio optimal. The schema carries the
//! validation an API server enforces (ranges, enums, required fields, CEL rules); [`DopdServiceSpec::validate`]
//! repeats the same rules in Rust so the operator never acts on a spec an older CRD let through.

// Each `printcolumn(...)` repeats `type_ = "string"`; clippy takes that for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the CRD.
pub const GROUP: &str = "dopd.dev";
/// Finalizer that removes the children and the planner state on deletion.
pub const FINALIZER: &str = "dopd.dev/cleanup";

/// A DOPD serving system: router, prefill workers and decode workers for one model, sized by the
/// planner to meet the SLOs with the fewest GPUs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dopd.dev",
    version = "v1alpha1",
    kind = "DopdService",
    plural = "dopdservices",
    singular = "dopdservice",
    shortname = "dopd",
    category = "dopd",
    namespaced,
    status = "DopdServiceStatus",
    doc = "A DOPD serving system: an OpenAI-compatible router, prefill workers and decode workers for one model, resized by the planner to meet TTFT/TPOT SLOs with the fewest GPUs.",
    printcolumn(name = "Model", type_ = "string", json_path = ".status.model"),
    printcolumn(
        name = "Prefill",
        type_ = "string",
        description = "ready/desired prefill instances",
        json_path = ".status.prefill.summary"
    ),
    printcolumn(
        name = "Decode",
        type_ = "string",
        description = "ready/desired decode instances",
        json_path = ".status.decode.summary"
    ),
    printcolumn(
        name = "Ratio",
        type_ = "string",
        description = "prefill:decode",
        json_path = ".status.ratio"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "self.planner.gpuBudget >= self.prefill.minReplicas * self.prefill.gpusPerInstance + self.decode.minReplicas * self.decode.gpusPerInstance"
).message("planner.gpuBudget is smaller than the GPUs the minimum instances need (prefill.minReplicas * prefill.gpusPerInstance + decode.minReplicas * decode.gpusPerInstance)"))]
#[serde(rename_all = "camelCase")]
pub struct DopdServiceSpec {
    pub model: ModelSpec,
    #[serde(default)]
    pub images: Images,
    #[serde(default)]
    pub prefill: RoleSpec,
    #[serde(default)]
    pub decode: RoleSpec,
    #[serde(default)]
    pub router: RouterSpec,
    pub slo: Slo,
    #[serde(default)]
    pub planner: PlannerSpec,
    #[serde(default)]
    pub profile: ProfileSource,
    #[serde(default)]
    pub headroom: HeadroomSpec,
}

/// Placeholder pods that make the cluster autoscaler (or Karpenter) provision GPU nodes ahead of
/// the forecast load: sized like a worker, at a low priority so real workers preempt them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeadroomSpec {
    #[serde(default)]
    pub enabled: bool,
    /// PriorityClass of the placeholders (the chart creates `dopd-headroom`, value -10).
    #[serde(default = "default_headroom_class")]
    pub priority_class_name: String,
    /// Image of the placeholders (it only sleeps).
    #[serde(default = "default_pause_image")]
    pub image: String,
}

fn default_headroom_class() -> String {
    "dopd-headroom".into()
}
fn default_pause_image() -> String {
    "registry.k8s.io/pause:3.10".into()
}

impl Default for HeadroomSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            priority_class_name: default_headroom_class(),
            image: default_pause_image(),
        }
    }
}

/// The model to serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the weights are: an absolute path inside the images (`/models/x.gguf`), or
    /// `pvc://CLAIM/PATH` for a file on a PersistentVolumeClaim (mounted read-only). Weights are
    /// never downloaded from a model hub at run time.
    #[x_kube(validation = Rule::new("self.startsWith('/') || self.startsWith('pvc://')")
        .message("model.source must be an absolute path inside the image or pvc://CLAIM/PATH"))]
    #[schemars(length(min = 1))]
    pub source: String,
    /// Name clients pass as `model` (default: the file name without extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Tokenizer file (GGUF or HF `tokenizer.json`); default: the tokenizer in the GGUF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

/// Container images.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Images {
    /// Image of the router (the slim `dopd` image).
    #[serde(default = "default_router_image")]
    pub router: String,
    /// Image of the workers (the CUDA `dopd` image).
    #[serde(default = "default_worker_image")]
    pub worker: String,
    #[serde(default = "default_pull_policy")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']")
        .message("images.pullPolicy must be Always, IfNotPresent or Never"))]
    pub pull_policy: String,
    /// Names of image pull Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<String>,
}

fn default_router_image() -> String {
    format!("ghcr.io/dopd/dopd:{}", env!("CARGO_PKG_VERSION"))
}
fn default_worker_image() -> String {
    format!(
        "ghcr.io/dopd/dopd-worker-cuda:{}",
        env!("CARGO_PKG_VERSION")
    )
}
fn default_pull_policy() -> String {
    "IfNotPresent".into()
}

impl Default for Images {
    fn default() -> Self {
        Self {
            router: default_router_image(),
            worker: default_worker_image(),
            pull_policy: default_pull_policy(),
            pull_secrets: Vec::new(),
        }
    }
}

/// One worker role (prefill or decode).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("minReplicas must not exceed maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Fewest instances the planner may run.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub min_replicas: u32,
    /// Most instances the planner may run.
    #[serde(default = "eight")]
    #[schemars(range(min = 1))]
    pub max_replicas: u32,
    /// GPUs of one instance (its tensor-parallel degree); 0 runs the worker on CPU.
    #[serde(default = "one")]
    #[schemars(range(max = 16))]
    pub gpus_per_instance: u32,
    /// Container resources; `nvidia.com/gpu` is set from `gpusPerInstance` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node capacity type (`spot` or `on-demand`), as the `karpenter.sh/capacity-type` node label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['spot', 'on-demand']")
        .message("capacityType must be spot or on-demand"))]
    pub capacity_type: Option<String>,
    /// KV cache blocks per instance (default: the worker's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_blocks: Option<u32>,
    /// Extra `dopd worker` arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// Extra environment of the worker container (e.g. `UCX_TLS`, `UCX_NET_DEVICES`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

fn one() -> u32 {
    1
}
fn eight() -> u32 {
    8
}

impl Default for RoleSpec {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 8,
            gpus_per_instance: 1,
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            capacity_type: None,
            kv_blocks: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The router (front door).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: u32,
    /// HTTP port of the OpenAI API.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// Requests queued in the router beyond which new ones get 429.
    #[serde(default = "default_max_waiting")]
    #[schemars(range(min = 1))]
    pub max_waiting: u32,
    /// Secret holding the API key clients must send (key `api-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<String>,
    #[serde(default = "default_service_type")]
    #[x_kube(validation = Rule::new("self in ['ClusterIP', 'NodePort', 'LoadBalancer']")
        .message("router.serviceType must be ClusterIP, NodePort or LoadBalancer"))]
    pub service_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_http_port() -> u32 {
    8000
}
fn default_max_waiting() -> u32 {
    256
}
fn default_service_type() -> String {
    "ClusterIP".into()
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            port: default_http_port(),
            max_waiting: default_max_waiting(),
            api_key_secret: None,
            service_type: default_service_type(),
            resources: None,
        }
    }
}

/// Service-level objectives.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Slo {
    /// Time to first token, milliseconds.
    #[schemars(range(min = 1, max = 600000))]
    pub ttft_ms: u32,
    /// Time per output token (inter-token latency), milliseconds.
    #[schemars(range(min = 1, max = 60000))]
    pub tpot_ms: u32,
    /// Length-aware TTFT: milliseconds allowed per prompt token on top of `ttftMs` (a fixed TTFT
    /// cannot hold for very long prompts whatever the sizing). 0: a fixed TTFT SLO.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub ttft_per_token_ms: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Planner settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlannerSpec {
    /// Adjustment interval, seconds (the paper's 30 s).
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: u32,
    /// Scaling policy.
    #[serde(default = "default_policy")]
    #[x_kube(validation = Rule::new("self in ['dopd', 'dopd-paper', 'dyn-sla', 'dyn-load', 'static']")
        .message("planner.policy must be dopd, dopd-paper, dyn-sla, dyn-load or static"))]
    pub policy: String,
    /// Forecaster of the next interval's requests, ISL and OSL: `best` (the one of the others
    /// with the lowest recent error), `arima`, `kalman`, `ma` or `last`.
    #[serde(default = "default_predictor")]
    #[x_kube(validation = Rule::new("self in ['best', 'arima', 'last', 'ma', 'kalman']")
        .message("planner.predictor must be best, arima, last, ma or kalman"))]
    pub predictor: String,
    /// Observations the forecaster keeps.
    #[serde(default = "default_window")]
    #[schemars(range(min = 2, max = 1000))]
    pub window: u32,
    /// Total GPUs the service may use.
    #[serde(default = "eight")]
    #[schemars(range(min = 1))]
    pub gpu_budget: u32,
    /// Prompts up to this many tokens are prefilled on a decode instance (policy `dopd` starts
    /// from this and derives the threshold from the profile and the decode load).
    #[serde(default = "default_ultra_short")]
    pub ultra_short_max_isl: u32,
    #[serde(default)]
    pub emergency: Emergency,
    /// Scale-down looks back this far and keeps the largest count wanted.
    #[serde(default = "default_stabilization")]
    #[schemars(range(max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// Longest wait for drained instances to finish their requests before they are removed.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub drain_timeout_seconds: u32,
    /// Pods Pending longer than this are reported as capacity-constrained and no longer waited for.
    #[serde(default = "default_pending_timeout")]
    #[schemars(range(min = 1, max = 7200))]
    pub pending_timeout_seconds: u32,
    /// Decisions kept in `status.history`.
    #[serde(default = "default_history")]
    #[schemars(range(max = 100))]
    pub history_limit: u32,
    /// Stop resizing (replicas stay where they are).
    #[serde(default)]
    pub paused: bool,
}

fn default_interval() -> u32 {
    30
}
fn default_policy() -> String {
    "dopd".into()
}
fn default_predictor() -> String {
    "best".into()
}
fn default_window() -> u32 {
    50
}
fn default_ultra_short() -> u32 {
    32
}
fn default_stabilization() -> u32 {
    30
}
fn default_drain_timeout() -> u32 {
    120
}
fn default_pending_timeout() -> u32 {
    300
}
fn default_history() -> u32 {
    10
}

impl Default for PlannerSpec {
    fn default() -> Self {
        Self {
            interval_seconds: default_interval(),
            policy: default_policy(),
            predictor: default_predictor(),
            window: default_window(),
            gpu_budget: 8,
            ultra_short_max_isl: default_ultra_short(),
            emergency: Emergency::default(),
            scale_down_stabilization_seconds: default_stabilization(),
            drain_timeout_seconds: default_drain_timeout(),
            pending_timeout_seconds: default_pending_timeout(),
            history_limit: default_history(),
            paused: false,
        }
    }
}

/// Emergency scale-up thresholds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Emergency {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Prefill queue length per ready prefill instance that adds one.
    #[serde(default = "default_queue")]
    #[schemars(range(min = 0.0))]
    pub prefill_queue_per_instance: f64,
    /// Decode KV usage (0..1) that adds one decode instance.
    #[serde(default = "default_kv")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub kv_usage: f64,
}

fn yes() -> bool {
    true
}
fn default_queue() -> f64 {
    5.0
}
fn default_kv() -> f64 {
    0.9
}

impl Default for Emergency {
    fn default() -> Self {
        Self {
            enabled: true,
            prefill_queue_per_instance: default_queue(),
            kv_usage: default_kv(),
        }
    }
}

/// Where the performance profile (TTFT over ISL, TPOT over batch and context, KV capacity) comes
/// from: at most one of `preset`, `inline`, `configMapRef`; none means the preset for SmolLM2 on
/// an H100.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("(has(self.preset) ? 1 : 0) + (has(self.inline) ? 1 : 0) + (has(self.configMapRef) ? 1 : 0) <= 1")
    .message("profile: set at most one of preset, inline and configMapRef"))]
#[serde(rename_all = "camelCase")]
pub struct ProfileSource {
    /// A built-in roofline preset (`dopd profile presets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A profile document (YAML or JSON, as written by `dopd profile measure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// A ConfigMap key holding a profile document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKey>,
}

/// A key of a ConfigMap in the DopdService's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default = "default_profile_key")]
    pub key: String,
}

fn default_profile_key() -> String {
    "profile.yaml".into()
}

/// Default profile preset.
pub const DEFAULT_PRESET: &str = "smollm2-135m-h100";

/// Observed state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DopdServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Scaling, Degraded or Invalid.
    #[serde(default)]
    pub phase: String,
    /// The served model name.
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub prefill: RoleStatus,
    #[serde(default)]
    pub decode: RoleStatus,
    /// Desired prefill:decode, e.g. `1:2`.
    #[serde(default)]
    pub ratio: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<ForecastStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<DecisionRecord>,
    /// The latest decisions that changed a count, newest last (bounded by `planner.historyLimit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<DecisionRecord>,
    /// Placeholder pods kept for the autoscaler (when `spec.headroom.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<HeadroomStatus>,
    /// Scale-downs waiting for drained instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<DrainStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Counts of one role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub ready: u32,
    pub desired: u32,
    /// Pods not ready yet (starting or Pending).
    pub pending: u32,
    /// Pods Pending longer than `planner.pendingTimeoutSeconds` (no capacity for them).
    pub unschedulable: u32,
    /// `ready/desired`, for `kubectl get`.
    pub summary: String,
}

/// Placeholders per role and the start-up horizon they cover.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeadroomStatus {
    pub prefill: u32,
    pub decode: u32,
    /// Instances the forecast's upper bound needs at the start-up horizon (prefill, decode).
    pub upper: String,
}

/// The planner's forecast of the next interval.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ForecastStatus {
    pub requests: f64,
    /// Upper bound of the requests forecast (for headroom).
    pub requests_upper: f64,
    pub mean_isl: f64,
    pub mean_osl: f64,
}

/// One planner decision.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    /// RFC 3339 time of the decision.
    pub time: String,
    pub prefill: u32,
    pub decode: u32,
    /// The rules that shaped the counts.
    pub reason: String,
}

/// A scale-down in progress.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    pub role: String,
    /// Pods being drained.
    pub pods: Vec<String>,
    /// Replicas once they are done.
    pub target: u32,
    /// RFC 3339 start time.
    pub started: String,
}

/// The CRD as YAML, as committed in `crds/` and printed by `dopd crd`.
pub fn crd_yaml() -> String {
    let mut crd = serde_json::to_value(DopdService::crd()).unwrap_or_default();
    kubernetes_formats(&mut crd);
    let body = serde_yaml::to_string(&crd).unwrap_or_default();
    format!(
        "# Generated by `dopd crd` from operator/src/crd.rs; do not edit.\n# Regenerate: cargo run -p dopd -- crd > crds/dopdservice.yaml\n{body}"
    )
}

/// schemars names Rust's unsigned integers `format: uint32`, a format the API server does not
/// know (it warns "unrecognized format" on every apply). They become `int64` within the bounds
/// of a `u32`, so an out-of-range value is rejected by the API server, not by deserialization.
fn kubernetes_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("format").and_then(|f| f.as_str()) == Some("uint32") {
                m.insert("format".into(), "int64".into());
                // A bound the schema set stays (as an integer); a missing one is the u32's.
                let bound = |b: Option<&serde_json::Value>, default: u32| {
                    b.and_then(|b| b.as_f64()).map_or(default, |b| b as u32)
                };
                let min = bound(m.get("minimum"), 0);
                let max = bound(m.get("maximum"), u32::MAX);
                m.insert("minimum".into(), min.into());
                m.insert("maximum".into(), max.into());
            }
            m.values_mut().for_each(kubernetes_formats);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}

impl DopdServiceSpec {
    /// The rules of the schema, checked in Rust: every problem, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if !(self.model.source.starts_with('/') || self.model.source.starts_with("pvc://")) {
            errs.push(format!(
                "spec.model.source {:?}: must be an absolute path inside the image or pvc://CLAIM/PATH",
                self.model.source
            ));
        }
        if self.model.source.starts_with("pvc://") && self.pvc().is_none() {
            errs.push(format!(
                "spec.model.source {:?}: expected pvc://CLAIM/PATH",
                self.model.source
            ));
        }
        for (role, r) in [("prefill", &self.prefill), ("decode", &self.decode)] {
            if r.min_replicas == 0 {
                errs.push(format!("spec.{role}.minReplicas: must be >= 1"));
            }
            if r.min_replicas > r.max_replicas {
                errs.push(format!(
                    "spec.{role}: minReplicas ({}) must not exceed maxReplicas ({})",
                    r.min_replicas, r.max_replicas
                ));
            }
            if let Some(c) = &r.capacity_type
                && c != "spot"
                && c != "on-demand"
            {
                errs.push(format!(
                    "spec.{role}.capacityType {c:?}: must be spot or on-demand"
                ));
            }
        }
        let need = self.prefill.min_replicas * self.prefill.gpus_per_instance
            + self.decode.min_replicas * self.decode.gpus_per_instance;
        if self.planner.gpu_budget < need {
            errs.push(format!(
                "spec.planner.gpuBudget ({}) is smaller than the {need} GPUs the minimum instances need",
                self.planner.gpu_budget
            ));
        }
        if self.slo.ttft_ms == 0 || self.slo.tpot_ms == 0 {
            errs.push("spec.slo: ttftMs and tpotMs must be >= 1".into());
        }
        if self.planner.interval_seconds == 0 {
            errs.push("spec.planner.intervalSeconds: must be >= 1".into());
        }
        if self
            .planner
            .policy
            .parse::<dopd_planner::planner::PolicyKind>()
            .is_err()
        {
            errs.push(format!(
                "spec.planner.policy {:?}: must be dopd, dopd-paper, dyn-sla, dyn-load or static",
                self.planner.policy
            ));
        }
        if self
            .planner
            .predictor
            .parse::<dopd_planner::forecast::ForecasterKind>()
            .is_err()
        {
            errs.push(format!(
                "spec.planner.predictor {:?}: must be best, arima, last, ma or kalman",
                self.planner.predictor
            ));
        }
        let e = &self.planner.emergency;
        if !(e.kv_usage.is_finite() && (0.0..=1.0).contains(&e.kv_usage)) {
            errs.push(format!(
                "spec.planner.emergency.kvUsage ({}): must be within 0..1",
                e.kv_usage
            ));
        }
        if !(e.prefill_queue_per_instance.is_finite() && e.prefill_queue_per_instance >= 0.0) {
            errs.push("spec.planner.emergency.prefillQueuePerInstance: must be >= 0".into());
        }
        let p = &self.profile;
        if usize::from(p.preset.is_some())
            + usize::from(p.inline.is_some())
            + usize::from(p.config_map_ref.is_some())
            > 1
        {
            errs.push("spec.profile: set at most one of preset, inline and configMapRef".into());
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// `(claim, path inside it)` when the model lives on a PersistentVolumeClaim.
    pub fn pvc(&self) -> Option<(&str, &str)> {
        let rest = self.model.source.strip_prefix("pvc://")?;
        let (claim, path) = rest.split_once('/')?;
        (!claim.is_empty() && !path.is_empty()).then_some((claim, path))
    }

    /// The model path as the containers see it.
    pub fn model_path(&self) -> String {
        match self.pvc() {
            Some((claim, path)) => format!("/models/{claim}/{path}"),
            None => self.model.source.clone(),
        }
    }

    /// The name clients use.
    pub fn served_name(&self) -> String {
        if let Some(n) = &self.model.served_name {
            return n.clone();
        }
        let file = self.model.source.rsplit('/').next().unwrap_or("model");
        file.split('.').next().unwrap_or(file).to_string()
    }
}
