//! Reconciling one `DopdService`: children, the planner loop, drain-safe scale-down and status.
//!
//! One reconcile:
//! 1. checks the spec (the schema's rules, again) and resolves the profile;
//! 2. lists the worker pods: ready, starting, and Pending past `pendingTimeoutSeconds`
//!    (unschedulable: reported as capacity-constrained, never waited for);
//! 3. finishes drains whose pods have no requests left (or whose time is up) by lowering replicas;
//! 4. when the interval has passed, reads the router's load, runs the planner tick and applies
//!    its targets: up at once, down by draining chosen pods first (least in-flight work, marked
//!    with `controller.kubernetes.io/pod-deletion-cost` so the ReplicaSet removes exactly them);
//! 5. applies the children that differ from what is in the cluster (server-side apply, one field
//!    manager) and puts back replica counts someone else changed, with an Event;
//! 6. writes the status when it changed.
//!
//! The operator keeps the planner (forecasters, correction factors) in memory per DopdService;
//! the targets live in `status`, so a new leader carries on from them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dopd_planner::planner::{Decision, Observation, Planner, PlannerConfig, ReplicaState};
use dopd_planner::profile::{PerRole, Profile, roofline};
use dopd_planner::sizing::Replicas;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::children::{self, Child, FIELD_MANAGER, Kind, WORKER_PORT, WorkerRole};
use crate::control::{Clock, RouterApi};
use crate::crd::{
    DEFAULT_PRESET, DecisionRecord, DopdService, DopdServiceSpec, DopdServiceStatus, DrainStatus,
    FINALIZER, ForecastStatus, HeadroomStatus, RoleStatus,
};
use crate::metrics::{DecisionLabel, ForecastLabel, KindLabel, Metrics, ResultLabel, RoleLabel};

/// Annotation the ReplicaSet controller reads to choose which pods to remove first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Cost given to drained pods (lower goes first; unset is 0).
pub const VICTIM_COST: &str = "-1000";
/// Annotation the cluster autoscaler reads before evicting a pod to empty a node.
pub const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";

/// A reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Short kind for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.is_conflict() => "conflict",
            Self::Kube(kube::Error::Api(s)) if s.is_not_found() => "not_found",
            Self::Kube(kube::Error::Api(s)) if s.is_invalid() => "invalid",
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "transport",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

/// Settings of the reconciler.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Requeue while something is in motion (drains, starting pods).
    pub busy_requeue: Duration,
    /// Reporter of Events.
    pub reporter: Reporter,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            busy_requeue: Duration::from_secs(2),
            reporter: Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        }
    }
}

/// Shared by all reconciles.
pub struct Ctx {
    pub client: Client,
    pub router: Arc<dyn RouterApi>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    recorder: Recorder,
    state: Mutex<HashMap<String, SvcState>>,
}

impl Ctx {
    pub fn new(
        client: Client,
        router: Arc<dyn RouterApi>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), settings.reporter.clone()),
            client,
            router,
            clock,
            metrics,
            settings,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn take_state(&self, key: &str) -> Option<SvcState> {
        self.state.lock().ok()?.remove(key)
    }

    fn put_state(&self, key: String, st: SvcState) {
        if let Ok(mut m) = self.state.lock() {
            m.insert(key, st);
        }
    }

    /// The planner's current targets for a service (tests, debugging).
    pub fn targets(&self, namespace: &str, name: &str) -> Option<Replicas> {
        let m = self.state.lock().ok()?;
        m.get(&format!("{namespace}/{name}")).map(|s| s.target)
    }
}

/// What the operator remembers per DopdService between reconciles.
struct SvcState {
    planner: Planner,
    /// Hash of the planner's config and profile: a change rebuilds the planner.
    planner_key: u64,
    next_tick: f64,
    target: Replicas,
    /// Replicas this operator last wrote per role (to tell its own changes from others').
    applied: PerRole<Option<u32>>,
    drains: Vec<Drain>,
    last_decision: Option<Decision>,
    /// Placeholder pods per role (spec.headroom).
    headroom: Option<dopd_planner::headroom::Headroom>,
}

/// A scale-down waiting for its pods to finish their requests.
#[derive(Clone, Debug)]
struct Drain {
    role: WorkerRole,
    pods: Vec<String>,
    urls: Vec<String>,
    target: u32,
    started: f64,
    started_at: String,
}

/// A worker pod as the reconciler sees it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub url: Option<String>,
    pub ready: bool,
    /// Pending past the timeout.
    pub unschedulable: bool,
    /// Marked `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`.
    pub evict_protected: bool,
}

/// Counts of one role's pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounts {
    pub ready: u32,
    pub pending: u32,
    pub unschedulable: u32,
}

fn role_get(r: &Replicas, role: WorkerRole) -> u32 {
    r.get(role.planner())
}

fn role_set(r: &mut Replicas, role: WorkerRole, v: u32) {
    match role {
        WorkerRole::Prefill => r.prefill = v,
        WorkerRole::Decode => r.decode = v,
    }
}

fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

/// Entry point for the controller: the finalizer wraps apply and cleanup.
pub async fn reconcile(svc: Arc<DopdService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = svc.namespace().unwrap_or_default();
    let api: Api<DopdService> = Api::namespaced(ctx.client.clone(), &ns);
    let res = finalizer(&api, FINALIZER, svc, |ev| async {
        match ev {
            Finalizer::Apply(s) => apply(s, &ctx).await,
            Finalizer::Cleanup(s) => cleanup(s, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let result = match &res {
        Ok(_) => "ok".to_string(),
        Err(e) => {
            ctx.metrics
                .errors
                .get_or_create(&KindLabel {
                    kind: e.kind().into(),
                })
                .inc();
            "error".to_string()
        }
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result })
        .inc();
    res
}

/// Retry policy after a failed reconcile.
pub fn error_policy(svc: Arc<DopdService>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(service = %svc.name_any(), error = %err, "reconcile failed; retrying");
    // Conflicts clear up at once (someone else wrote first); other errors get a pause.
    match err.kind() {
        "conflict" => Action::requeue(Duration::from_millis(200)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// Deletion: remove the children (owner references would too, given a garbage collector) and
/// forget the planner state. Children already gone are fine.
async fn cleanup(svc: Arc<DopdService>, ctx: &Ctx) -> Result<Action, Error> {
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    ctx.take_state(&format!("{ns}/{name}"));
    let mut all = children::children(&svc, "", |_| 0, |_| 0);
    all.retain(|c| !c.name.contains("-headroom-"));
    let mut names: Vec<(Kind, String)> = all.into_iter().map(|c| (c.kind, c.name)).collect();
    for role in WorkerRole::ALL {
        names.push((Kind::Deployment, children::headroom_name(&name, role)));
    }
    for (kind, child) in names {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &kind.api_resource());
        match api.delete(&child, &DeleteParams::background()).await {
            Ok(_) => {
                ctx.metrics.writes.inc();
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        };
    }
    for role in ["prefill", "decode"] {
        for m in [&ctx.metrics.desired, &ctx.metrics.ready] {
            m.remove(&RoleLabel {
                namespace: ns.clone(),
                service: name.clone(),
                role: role.into(),
            });
        }
    }
    tracing::info!(service = %name, namespace = %ns, "DopdService deleted; children removed");
    Ok(Action::await_change())
}

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

/// The profile a spec names, with GPUs per instance from the spec.
async fn resolve_profile(ctx: &Ctx, ns: &str, spec: &DopdServiceSpec) -> Result<Profile, String> {
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

async fn api_key(ctx: &Ctx, ns: &str, spec: &DopdServiceSpec) -> Option<String> {
    let name = spec.router.api_key_secret.as_ref()?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let s = api.get_opt(name).await.ok()??;
    let bytes = s.data?.get("api-key")?.0.clone();
    String::from_utf8(bytes).ok()
}

/// The worker pods of each role.
pub fn pod_infos(pods: &[Pod], pending_timeout_s: f64, now: Timestamp) -> Vec<PodInfo> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let status = p.status.as_ref();
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
            let age = p
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0.0, |t| (now - t.0).get_seconds() as f64);
            PodInfo {
                name: p.name_any(),
                url: status
                    .and_then(|s| s.pod_ip.as_ref())
                    .map(|ip| format!("http://{ip}:{WORKER_PORT}")),
                ready,
                unschedulable: phase == "Pending" && age > pending_timeout_s,
                evict_protected: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SAFE_TO_EVICT))
                    .is_some_and(|v| v == "false"),
            }
        })
        .collect()
}

pub fn counts(pods: &[PodInfo]) -> PodCounts {
    let mut c = PodCounts::default();
    for p in pods {
        if p.ready {
            c.ready += 1;
        } else {
            c.pending += 1;
            if p.unschedulable {
                c.unschedulable += 1;
            }
        }
    }
    c
}

/// The `n` pods to remove: pods that are not ready first (they hold no requests), then the least
/// in-flight work per the router, then by name (deterministic).
pub fn pick_victims<'a>(
    pods: &'a [PodInfo],
    in_flight: &HashMap<String, usize>,
    n: usize,
) -> Vec<&'a PodInfo> {
    let mut v: Vec<&PodInfo> = pods.iter().collect();
    v.sort_by_key(|p| {
        let load = p
            .url
            .as_ref()
            .and_then(|u| in_flight.get(u))
            .copied()
            .unwrap_or(0);
        (p.ready, load, p.name.clone())
    });
    v.truncate(n);
    v
}

fn reasons_text(d: &Decision) -> String {
    let tags: Vec<String> = d
        .reasons
        .iter()
        .filter_map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|v| v["reason"].as_str().map(String::from))
        })
        .collect();
    if tags.is_empty() {
        "no change needed".into()
    } else {
        tags.join(", ")
    }
}

/// Sets a condition, keeping its transition time when its status does not change.
fn set_condition(
    conds: &mut Vec<Condition>,
    old: &[Condition],
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) {
    let status = if on { "True" } else { "False" };
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    conds.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: last,
        observed_generation: generation,
    });
}

async fn publish(ctx: &Ctx, svc: &DopdService, type_: EventType, reason: &str, note: String) {
    tracing::info!(service = %svc.name_any(), reason, "{note}");
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    match ctx.recorder.publish(&ev, &svc.object_ref(&())).await {
        Ok(()) => {
            ctx.metrics.writes.inc();
        }
        Err(e) => tracing::warn!("cannot record an Event: {e}"),
    }
}

/// Reports a problem that stops the reconcile: a Warning Event (once per message), the phase, one
/// condition (`(type, status)`) with `reason` and `msg`, the role counts kept from before.
async fn stop_with(
    ctx: &Ctx,
    svc: &DopdService,
    mut status: DopdServiceStatus,
    phase: &str,
    condition: (&str, bool),
    reason: &str,
    msg: String,
) -> Result<(), Error> {
    let old = svc.status.clone().unwrap_or_default();
    let repeated = old.phase == phase && old.conditions.iter().any(|c| c.message == msg);
    if !repeated {
        publish(ctx, svc, EventType::Warning, reason, msg.clone()).await;
    }
    status.phase = phase.into();
    status.prefill = old.prefill.clone();
    status.decode = old.decode.clone();
    set_condition(
        &mut status.conditions,
        &old.conditions,
        condition.0,
        condition.1,
        reason,
        msg,
        status.observed_generation,
    );
    patch_status(ctx, svc, status).await
}

/// Sets (or, with null, removes) one annotation of a pod; a pod already gone is fine.
async fn annotate_pod(
    ctx: &Ctx,
    pods: &Api<Pod>,
    name: &str,
    key: &str,
    value: Value,
) -> Result<(), Error> {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    match pods
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            ctx.metrics.writes.inc();
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn patch_status(
    ctx: &Ctx,
    svc: &DopdService,
    status: DopdServiceStatus,
) -> Result<(), Error> {
    if svc.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<DopdService> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    // A merge patch keeps keys it does not mention: fields now empty are sent as null.
    let mut new = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let (Some(old), Some(n)) = (
        svc.status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok()),
        new.as_object_mut(),
    ) && let Some(old) = old.as_object()
    {
        for k in old.keys() {
            n.entry(k.clone()).or_insert(Value::Null);
        }
    }
    api.patch_status(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": new })),
    )
    .await?;
    ctx.metrics.writes.inc();
    Ok(())
}

async fn apply(svc: Arc<DopdService>, ctx: &Ctx) -> Result<Action, Error> {
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let spec = &svc.spec;
    let generation = svc.metadata.generation;
    let old = svc.status.clone().unwrap_or_default();
    let mut status = DopdServiceStatus {
        observed_generation: generation,
        model: spec.served_name(),
        ..Default::default()
    };

    // 1. The spec and the profile.
    if let Err(errs) = spec.validate() {
        let msg = errs.join("; ");
        let (phase, cond) = ("Invalid", "Ready");
        stop_with(ctx, &svc, status, phase, (cond, false), "InvalidSpec", msg).await?;
        return Ok(Action::await_change());
    }
    let profile = match resolve_profile(ctx, &ns, spec).await {
        Ok(p) => p,
        Err(msg) => {
            let (phase, cond) = ("Degraded", "Degraded");
            stop_with(
                ctx,
                &svc,
                status,
                phase,
                (cond, true),
                "ProfileUnavailable",
                msg,
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let profile_yaml = serde_yaml::to_string(&profile).unwrap_or_default();
    let cfg = planner_config(spec);
    let planner_key = children::fnv1a(
        format!(
            "{}{}",
            serde_json::to_string(&cfg).unwrap_or_default(),
            profile_yaml
        )
        .as_bytes(),
    );
    let key_api = api_key(ctx, &ns, spec).await;

    // 2. Pods.
    let now = ctx.clock.now();
    let pending_timeout = f64::from(spec.planner.pending_timeout_seconds);
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut pods: BTreeMap<WorkerRole, Vec<PodInfo>> = BTreeMap::new();
    for role in WorkerRole::ALL {
        let lp = ListParams::default().labels(&children::selector_string(&name, role.as_str()));
        let list = pod_api.list(&lp).await?;
        pods.insert(
            role,
            pod_infos(&list.items, pending_timeout, Timestamp::now()),
        );
    }
    let count = |role: WorkerRole| counts(pods.get(&role).map_or(&[][..], |v| v));

    // The remembered state, or a fresh one carrying on from the status.
    let clamp = |role: WorkerRole, v: u32| {
        let r = role.spec(spec);
        v.clamp(r.min_replicas, r.max_replicas)
    };
    let mut st = match ctx.take_state(&key) {
        Some(s) => s,
        None => {
            let planner = Planner::new(profile.clone(), cfg.clone())
                .map_err(|e| Error::Finalizer(format!("planner settings: {e}")))?;
            let from_status = |r: &RoleStatus, role: WorkerRole| {
                clamp(role, if r.desired > 0 { r.desired } else { 0 })
            };
            let target = PerRole {
                prefill: from_status(&old.prefill, WorkerRole::Prefill),
                decode: from_status(&old.decode, WorkerRole::Decode),
            };
            let known = svc.status.is_some() && old.decode.desired > 0;
            SvcState {
                planner,
                planner_key,
                next_tick: now + f64::from(spec.planner.interval_seconds),
                target,
                applied: PerRole {
                    prefill: known.then_some(target.prefill),
                    decode: known.then_some(target.decode),
                },
                drains: Vec::new(),
                last_decision: None,
                headroom: None,
            }
        }
    };
    if st.planner_key != planner_key {
        match Planner::new(profile.clone(), cfg.clone()) {
            Ok(p) => {
                st.planner = p;
                st.planner_key = planner_key;
                st.next_tick = now.min(st.next_tick);
            }
            Err(e) => tracing::warn!(service = %name, "planner settings: {e}"),
        }
    }
    // A shorter interval applies from now on.
    let interval = f64::from(spec.planner.interval_seconds);
    st.next_tick = st.next_tick.min(now + interval);
    // Bounds may have changed.
    for role in WorkerRole::ALL {
        let v = clamp(role, role_get(&st.target, role));
        role_set(&mut st.target, role, v);
    }

    let mut load_error: Option<String> = None;

    // 3. Drains.
    if !st.drains.is_empty() {
        let in_flight: Result<HashMap<String, usize>, String> = ctx
            .router
            .workers(&svc, key_api.as_deref())
            .await
            .map(|ws| ws.into_iter().map(|w| (w.url, w.in_flight)).collect());
        let timeout = f64::from(spec.planner.drain_timeout_seconds);
        let mut keep = Vec::new();
        for d in std::mem::take(&mut st.drains) {
            let busy: usize = match &in_flight {
                Ok(m) => d.urls.iter().filter_map(|u| m.get(u)).sum(),
                Err(_) => usize::MAX,
            };
            let timed_out = now - d.started >= timeout;
            if busy == 0 || timed_out {
                let note = if busy == 0 {
                    format!(
                        "{} drained ({} pods idle); {} replicas -> {}",
                        d.role.as_str(),
                        d.pods.len(),
                        d.role.as_str(),
                        d.target
                    )
                } else {
                    format!(
                        "{} drain timed out after {timeout:.0} s with requests still in flight; {} replicas -> {}",
                        d.role.as_str(),
                        d.role.as_str(),
                        d.target
                    )
                };
                let kind = if busy == 0 {
                    EventType::Normal
                } else {
                    EventType::Warning
                };
                publish(ctx, &svc, kind, "ScaledDown", note).await;
                role_set(&mut st.target, d.role, d.target);
            } else {
                keep.push(d);
            }
        }
        st.drains = keep;
    }

    // 4. The planner.
    if !spec.planner.paused && st.drains.is_empty() && now >= st.next_tick {
        st.next_tick = now + f64::from(spec.planner.interval_seconds);
        match ctx.router.load(&svc, key_api.as_deref()).await {
            Err(e) => load_error = Some(e),
            Ok(report) => {
                let replicas = PerRole {
                    prefill: ReplicaState {
                        ready: count(WorkerRole::Prefill).ready,
                        pending: count(WorkerRole::Prefill).pending
                            - count(WorkerRole::Prefill).unschedulable,
                    },
                    decode: ReplicaState {
                        ready: count(WorkerRole::Decode).ready,
                        pending: count(WorkerRole::Decode).pending
                            - count(WorkerRole::Decode).unschedulable,
                    },
                };
                let obs: Observation = report.observation(replicas);
                let d = st.planner.tick(now, &obs);
                let in_flight: HashMap<String, usize> = report
                    .workers
                    .iter()
                    .map(|w| (w.url.clone(), w.in_flight))
                    .collect();
                // Busy workers must not be evicted by the autoscaler to empty a node; idle ones
                // may be.
                for p in pods.values().flatten() {
                    let busy = p
                        .url
                        .as_ref()
                        .and_then(|u| in_flight.get(u))
                        .is_some_and(|n| *n > 0);
                    if busy != p.evict_protected {
                        let v = if busy { json!("false") } else { Value::Null };
                        annotate_pod(ctx, &pod_api, &p.name, SAFE_TO_EVICT, v).await?;
                    }
                }
                let before = st.target;
                let mut moves = Vec::new();
                for role in WorkerRole::ALL {
                    let cur = role_get(&st.target, role);
                    let want = clamp(role, role_get(&d.target, role));
                    if want > cur {
                        role_set(&mut st.target, role, want);
                        moves.push(format!("{} {cur} -> {want}", role.as_str()));
                    } else if want < cur {
                        let rp = pods.get(&role).map_or(&[][..], |v| v);
                        let victims = pick_victims(rp, &in_flight, (cur - want) as usize);
                        for v in &victims {
                            annotate_pod(ctx, &pod_api, &v.name, DELETION_COST, json!(VICTIM_COST))
                                .await?;
                        }
                        let urls: Vec<String> =
                            victims.iter().filter_map(|v| v.url.clone()).collect();
                        if !urls.is_empty()
                            && let Err(e) = ctx.router.drain(&svc, key_api.as_deref(), &urls).await
                        {
                            tracing::warn!(service = %name, "drain request failed: {e}");
                        }
                        let names: Vec<String> = victims.iter().map(|v| v.name.clone()).collect();
                        moves.push(format!(
                            "{} {cur} -> {want} after draining {}",
                            role.as_str(),
                            if names.is_empty() {
                                "nothing".to_string()
                            } else {
                                names.join(", ")
                            }
                        ));
                        if urls.is_empty() {
                            // Nothing to wait for (pods not ready or not there).
                            role_set(&mut st.target, role, want);
                        } else {
                            st.drains.push(Drain {
                                role,
                                pods: names,
                                urls,
                                target: want,
                                started: now,
                                started_at: now_rfc3339(),
                            });
                        }
                    }
                }
                let changed = !moves.is_empty();
                let fc = d.forecast.as_ref().map(|f| ForecastStatus {
                    requests: round2(f.requests.point),
                    requests_upper: round2(f.requests.upper),
                    mean_isl: round2(f.isl.point),
                    mean_osl: round2(f.osl.point),
                });
                if let Some(f) = &d.forecast
                    && f.isl.point.is_finite()
                    && let Err(e) = ctx
                        .router
                        .set_forecast(&svc, key_api.as_deref(), f.isl.point)
                        .await
                {
                    tracing::warn!(service = %name, "sending the forecast to the router: {e}");
                }
                let reason = reasons_text(&d);
                let after_p = st
                    .drains
                    .iter()
                    .find(|x| x.role == WorkerRole::Prefill)
                    .map_or(st.target.prefill, |x| x.target);
                let after_d = st
                    .drains
                    .iter()
                    .find(|x| x.role == WorkerRole::Decode)
                    .map_or(st.target.decode, |x| x.target);
                let note = format!(
                    "{} (prefill:decode {after_p}:{after_d}); last {:.0} s: {} requests, ISL {}, OSL {}; forecast: {}; reasons: {reason}",
                    if changed {
                        moves.join(", ")
                    } else {
                        format!(
                            "keep prefill {} and decode {}",
                            before.prefill, before.decode
                        )
                    },
                    report.interval_s,
                    report.requests,
                    report.mean_isl.map_or("-".into(), |v| format!("{v:.0}")),
                    report.mean_osl.map_or("-".into(), |v| format!("{v:.0}")),
                    fc.as_ref().map_or("-".into(), |f| format!(
                        "{:.1} requests, ISL {:.0}, OSL {:.0}",
                        f.requests, f.mean_isl, f.mean_osl
                    )),
                );
                publish(
                    ctx,
                    &svc,
                    EventType::Normal,
                    if changed { "Scaling" } else { "Planned" },
                    note,
                )
                .await;
                ctx.metrics
                    .decisions
                    .get_or_create(&DecisionLabel {
                        namespace: ns.clone(),
                        service: name.clone(),
                        changed: changed.to_string(),
                    })
                    .inc();
                if let Some(f) = &fc {
                    for (q, v) in [
                        ("requests", f.requests),
                        ("mean_isl", f.mean_isl),
                        ("mean_osl", f.mean_osl),
                    ] {
                        ctx.metrics
                            .forecast
                            .get_or_create(&ForecastLabel {
                                namespace: ns.clone(),
                                service: name.clone(),
                                quantity: q.into(),
                            })
                            .set(v);
                    }
                }
                let rec = DecisionRecord {
                    time: now_rfc3339(),
                    prefill: after_p,
                    decode: after_d,
                    reason,
                };
                status.last_decision = Some(rec.clone());
                status.forecast = fc;
                status.history = old.history.clone();
                if changed {
                    status.history.push(rec);
                }
                st.headroom = match (&d.forecast, spec.headroom.enabled) {
                    (Some(f), true) => Some(dopd_planner::headroom::plan(
                        &profile,
                        &cfg.sizing,
                        f,
                        d.kappa,
                        f64::from(spec.planner.interval_seconds),
                        // What will run: during a drain the Deployment keeps its old size.
                        PerRole {
                            prefill: after_p.max(st.applied.prefill.unwrap_or(0)),
                            decode: after_d.max(st.applied.decode.unwrap_or(0)),
                        },
                    )),
                    (None, true) => st.headroom,
                    (_, false) => None,
                };
                st.last_decision = Some(d);
            }
        }
    } else {
        status.last_decision = old.last_decision.clone();
        status.forecast = old.forecast.clone();
        status.history = old.history.clone();
    }
    let limit = spec.planner.history_limit as usize;
    if status.history.len() > limit {
        let cut = status.history.len() - limit;
        status.history.drain(..cut);
    }

    // 5. Children. Worker replicas stay up while their pods drain.
    let replicas_now = |role: WorkerRole| {
        st.drains
            .iter()
            .find(|d| d.role == role)
            .map_or(role_get(&st.target, role), |_| {
                // During a drain the Deployment keeps its size; the target applies afterwards.
                st.applied
                    .get(role.planner())
                    .unwrap_or(role_get(&st.target, role))
            })
    };
    let placeholders = |role: WorkerRole| {
        st.headroom
            .as_ref()
            .map_or(0, |h| h.placeholders.get(role.planner()))
    };
    let desired = children::children(&svc, &profile_yaml, replicas_now, placeholders);
    for c in &desired {
        apply_child(ctx, &svc, &ns, c, &mut st.applied).await?;
    }
    if !spec.headroom.enabled {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &Kind::Deployment.api_resource());
        for role in WorkerRole::ALL {
            let n = children::headroom_name(&name, role);
            if api.get_opt(&n).await?.is_some() {
                api.delete(&n, &DeleteParams::background()).await?;
                ctx.metrics.writes.inc();
            }
        }
    }

    // 6. Status.
    let mut any_pending = false;
    let mut constrained = Vec::new();
    for role in WorkerRole::ALL {
        let c = count(role);
        let desired = role_get(&st.target, role);
        any_pending |= c.pending > 0 || c.ready != desired;
        if c.unschedulable > 0 {
            constrained.push(format!(
                "{} {} pod(s) Pending for more than {pending_timeout:.0} s",
                c.unschedulable,
                role.as_str()
            ));
        }
        let rs = RoleStatus {
            ready: c.ready,
            desired,
            pending: c.pending,
            unschedulable: c.unschedulable,
            summary: format!("{}/{desired}", c.ready),
        };
        for (m, v) in [
            (&ctx.metrics.desired, desired),
            (&ctx.metrics.ready, c.ready),
        ] {
            m.get_or_create(&RoleLabel {
                namespace: ns.clone(),
                service: name.clone(),
                role: role.as_str().into(),
            })
            .set(i64::from(v));
        }
        match role {
            WorkerRole::Prefill => status.prefill = rs,
            WorkerRole::Decode => status.decode = rs,
        }
    }
    status.ratio = format!("{}:{}", st.target.prefill, st.target.decode);
    status.headroom = st.headroom.as_ref().map(|h| HeadroomStatus {
        prefill: h.placeholders.prefill,
        decode: h.placeholders.decode,
        upper: format!("{}:{}", h.upper.prefill, h.upper.decode),
    });
    status.draining = st
        .drains
        .iter()
        .map(|d| DrainStatus {
            role: d.role.as_str().into(),
            pods: d.pods.clone(),
            target: d.target,
            started: d.started_at.clone(),
        })
        .collect();
    let all_ready = !any_pending && st.drains.is_empty();
    let degraded = load_error.is_some() && !spec.planner.paused;
    status.phase = if degraded {
        "Degraded"
    } else if count(WorkerRole::Decode).ready == 0 {
        "Pending"
    } else if !all_ready {
        "Scaling"
    } else {
        "Running"
    }
    .into();
    let conds = &mut status.conditions;
    set_condition(
        conds,
        &old.conditions,
        "Ready",
        all_ready,
        if all_ready { "AllReady" } else { "Progressing" },
        format!(
            "prefill {}/{}, decode {}/{} ready",
            count(WorkerRole::Prefill).ready,
            st.target.prefill,
            count(WorkerRole::Decode).ready,
            st.target.decode
        ),
        generation,
    );
    let scaling_msg = if !st.drains.is_empty() {
        format!(
            "draining {} before scaling down",
            status
                .draining
                .iter()
                .flat_map(|d| d.pods.clone())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else if any_pending {
        "waiting for pods to become ready".into()
    } else {
        "replicas match the planner's targets".into()
    };
    set_condition(
        conds,
        &old.conditions,
        "Scaling",
        !all_ready,
        if !st.drains.is_empty() {
            "Draining"
        } else if any_pending {
            "PodsStarting"
        } else {
            "Stable"
        },
        scaling_msg,
        generation,
    );
    // A failed load read keeps its message until the next successful one.
    let load_msg = match &load_error {
        Some(e) => Some(format!("cannot read the router's load: {e}")),
        None if st.next_tick > now && st.last_decision.is_none() => old
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| c.message.clone()),
        None => None,
    };
    if let Some(e) = &load_error
        && !old
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True")
    {
        publish(ctx, &svc, EventType::Warning, "LoadUnavailable", e.clone()).await;
    }
    set_condition(
        conds,
        &old.conditions,
        "Degraded",
        load_msg.is_some(),
        if load_msg.is_some() {
            "LoadUnavailable"
        } else {
            "AsExpected"
        },
        load_msg.unwrap_or_else(|| "the planner reads the router's load".into()),
        generation,
    );
    if !constrained.is_empty()
        && !old
            .conditions
            .iter()
            .any(|c| c.type_ == "CapacityConstrained" && c.status == "True")
    {
        publish(
            ctx,
            &svc,
            EventType::Warning,
            "CapacityConstrained",
            format!(
                "{}; they count against the GPU budget and the planner no longer waits for them",
                constrained.join(", ")
            ),
        )
        .await;
    }
    set_condition(
        conds,
        &old.conditions,
        "CapacityConstrained",
        !constrained.is_empty(),
        if constrained.is_empty() {
            "Schedulable"
        } else {
            "PodsUnschedulable"
        },
        if constrained.is_empty() {
            "every pod found a node".into()
        } else {
            format!(
                "{}; counted against the GPU budget, not waited for",
                constrained.join(", ")
            )
        },
        generation,
    );
    patch_status(ctx, &svc, status).await?;

    let busy = !st.drains.is_empty() || any_pending;
    let until_tick = (st.next_tick - now).max(0.5);
    let wait = if busy {
        ctx.settings.busy_requeue.as_secs_f64().min(until_tick)
    } else {
        until_tick
    };
    ctx.put_state(key, st);
    Ok(Action::requeue(Duration::from_secs_f64(wait)))
}

fn round2(v: f64) -> f64 {
    if v.is_finite() {
        (v * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// Applies `c` unless the cluster already has it as wanted. A worker Deployment whose replica
/// count someone else changed is put back, with an Event.
async fn apply_child(
    ctx: &Ctx,
    svc: &DopdService,
    ns: &str,
    c: &Child,
    applied: &mut PerRole<Option<u32>>,
) -> Result<(), Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &c.kind.api_resource());
    let existing = api.get_opt(&c.name).await?;
    let mut write = true;
    if let Some(obj) = &existing {
        let body = serde_json::to_value(obj).unwrap_or(Value::Null);
        let same = children::applied_hash(&body) == children::applied_hash(&c.body);
        let have = body["spec"]["replicas"].as_u64().map(|v| v as u32);
        let replicas_ok = c.replicas.is_none_or(|want| have == Some(want));
        write = !(same && replicas_ok);
        if let (Some(role), Some(want), Some(have)) = (c.owner_role, c.replicas, have) {
            let mine = applied.get(role.planner());
            if have != want && mine.is_some_and(|m| m != have) {
                publish(
                    ctx,
                    svc,
                    EventType::Warning,
                    "ReplicasReverted",
                    format!(
                        "Deployment {} was scaled to {have} outside the operator; set back to {want}. The DopdService owns worker replicas: change spec.{}.minReplicas/maxReplicas or spec.planner instead",
                        c.name,
                        role.as_str()
                    ),
                )
                .await;
            }
        }
    }
    if write {
        api.patch(
            &c.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&c.body),
        )
        .await?;
        ctx.metrics.writes.inc();
        tracing::debug!(kind = ?c.kind, name = %c.name, "applied");
    }
    if let (Some(role), Some(want)) = (c.owner_role, c.replicas) {
        match role {
            WorkerRole::Prefill => applied.prefill = Some(want),
            WorkerRole::Decode => applied.decode = Some(want),
        }
    }
    Ok(())
}
