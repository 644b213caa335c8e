//! Reconciling one `DopdService`: children, the shared control loop, drain-safe scale-down and
//! status.
//!
//! One reconcile:
//! 1. checks the spec (the schema's rules, again) and resolves the profile (`prepare`);
//! 2. lists the worker pods and reads the router (`observe`);
//! 3. steps the control loop (`dopd_planner::control::Controller`, the one the simulator and
//!    `dopd up` run) on the pods as instances ([`crate::observe`]): it ticks when the interval has
//!    passed, names the pods to drain or retire, and ends drains whose pods hold no requests;
//! 4. carries out its orders: victims get `controller.kubernetes.io/pod-deletion-cost` so the
//!    ReplicaSet removes exactly them, drains and the routing thresholds go to the router; busy
//!    workers are guarded against autoscaler eviction (`carry_out`, `protect`);
//! 5. applies the children that differ from what is in the cluster (server-side apply, one field
//!    manager), worker replicas being the loop's targets plus the pods still draining, and puts
//!    back replica counts someone else changed, with an Event (`apply_children`);
//! 6. writes the status with server-side apply when it changed ([`crate::status`]).
//!
//! The operator keeps the loop (forecasters, correction factors, drains) in memory per
//! DopdService; the targets live in `status`, so a new leader carries on from them and adopts the
//! drains the router still reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dopd_planner::control::{
    ControlConfig, Controller, InstanceState, Order, Orders, Retired, Snapshot, StepReport,
    TickReport,
};
use dopd_planner::planner::{Planner, PlannerConfig};
use dopd_planner::profile::{PerRole, Profile};
use dopd_planner::sizing::{Reason, Replicas};
use dopd_protocol::load::LoadSnapshot;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::children::{self, FIELD_MANAGER, Kind};
use crate::control::{Clock, RouterApi, RouterError};
use crate::crd::{DopdService, DopdServiceStatus, FINALIZER};
use crate::metrics::{
    DecisionLabel, ForecastLabel, KindLabel, Metrics, PredictorLabel, ResultLabel, RoleLabel,
};
use crate::observe::{self, DELETION_COST, PodInfo, SAFE_TO_EVICT, VICTIM_COST};
use crate::status;
use dopd_protocol::Role;

mod spec;
mod writes;

use spec::{api_key, resolve_profile};
pub use spec::{control_config, planner_config};
use writes::{annotate_pod, apply_children, patch_status, publish, warn_constrained};

/// A reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("planner settings: {0}")]
    Planner(#[from] dopd_planner::planner::ConfigError),
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
            Self::Planner(_) => "planner",
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
    pub(crate) recorder: Recorder,
    pub(crate) state: Mutex<HashMap<String, SvcState>>,
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

    /// The control loop's current targets for a service (tests, debugging).
    pub fn targets(&self, namespace: &str, name: &str) -> Option<Replicas> {
        let m = self.state.lock().ok()?;
        m.get(&format!("{namespace}/{name}"))
            .map(|s| s.ctrl.target())
    }
}

/// What the operator remembers per DopdService between reconciles.
pub(crate) struct SvcState {
    pub(crate) ctrl: Controller,
    /// Hash of the planner's config and profile: a change rebuilds the planner.
    pub(crate) planner_key: u64,
    /// Replicas this operator last wrote per role (to tell its own changes from others').
    pub(crate) applied: PerRole<Option<u32>>,
    /// The status this operator last wrote, and the resourceVersion of the object it read then.
    pub(crate) written: Option<(Option<String>, DopdServiceStatus)>,
}

/// The status a reconcile starts from. The informer's copy can trail this operator's own last
/// write (the watch event is still on its way when the next reconcile runs, as it is after a
/// status write against a real API server); a status built from that copy would drop the
/// decision just recorded. While the cached object is still the one that write was based on, the
/// written status is the truth; once it moved on, the cached copy is, with the history of both
/// (entries are unique by time) so no recorded decision is lost either way.
fn status_base(svc: &DopdService, st: &SvcState) -> DopdServiceStatus {
    let cached = svc.status.clone().unwrap_or_default();
    match &st.written {
        Some((base, mine)) if *base == svc.metadata.resource_version => mine.clone(),
        Some((_, mine)) => {
            let history = status::merge_history(&cached.history, &mine.history);
            DopdServiceStatus { history, ..cached }
        }
        None => cached,
    }
}

/// What a reconcile works from, once the spec checked out.
pub(crate) struct Prepared {
    pub(crate) ns: String,
    pub(crate) name: String,
    pub(crate) profile: Profile,
    pub(crate) profile_yaml: String,
    pub(crate) planner: PlannerConfig,
    pub(crate) control: ControlConfig,
    pub(crate) planner_key: u64,
    pub(crate) api_key: Option<String>,
}

/// What a reconcile saw of the cluster and the router.
struct Seen {
    pods: Vec<PodInfo>,
    load: Result<LoadSnapshot, RouterError>,
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
    .await;
    // A cleanup run on an informer copy that still shows a deleted object (its finalizer already
    // removed by the previous run) finds the object gone: that is the cleanup's goal, not a failure.
    let res = match res {
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(e)))
            if e.code == 404 =>
        {
            Ok(Action::await_change())
        }
        other => other,
    }
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
        Ok(_) => "ok",
        Err(e) => {
            let kind = e.kind().into();
            ctx.metrics.errors.get_or_create(&KindLabel { kind }).inc();
            "error"
        }
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel {
            result: result.into(),
        })
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
/// forget the loop's state. Children already gone are fine.
async fn cleanup(svc: Arc<DopdService>, ctx: &Ctx) -> Result<Action, Error> {
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    ctx.take_state(&format!("{ns}/{name}"));
    let mut all = children::children(&svc, "", |_| 0, |_| 0);
    all.retain(|c| !c.name.contains("-headroom-"));
    let mut names: Vec<(Kind, String)> = all.into_iter().map(|c| (c.kind, c.name)).collect();
    for role in Role::SIZED {
        names.push((Kind::Deployment, children::headroom_name(&name, role)));
    }
    for (kind, child) in names {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &kind.api_resource());
        match api.delete(&child, &DeleteParams::background()).await {
            Ok(_) => ctx.metrics.writes.inc(),
            Err(kube::Error::Api(s)) if s.is_not_found() => 0,
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

/// Reports a problem that stops the reconcile: a Warning Event (once per message), the phase, one
/// condition (`(type, status)`) with `reason` and `msg`, the role counts and the decisions kept
/// from before.
async fn stop_with(
    ctx: &Ctx,
    svc: &DopdService,
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
    let mut status = DopdServiceStatus {
        observed_generation: svc.metadata.generation,
        model: svc.spec.served_name(),
        phase: phase.into(),
        prefill: old.prefill.clone(),
        decode: old.decode.clone(),
        // What was decided before stays on record.
        last_decision: old.last_decision.clone(),
        forecast: old.forecast.clone(),
        history: old.history.clone(),
        ..Default::default()
    };
    let generation = status.observed_generation;
    let wall = ctx.clock.wall();
    status::set_condition(
        &mut status.conditions,
        &old.conditions,
        condition,
        reason,
        msg,
        generation,
        wall,
    );
    patch_status(ctx, svc, &old, &status).await.map(|_| ())
}

/// The spec checked, the profile resolved; or the action to return when the reconcile must stop
/// here (the problem already reported).
async fn prepare(ctx: &Ctx, svc: &DopdService) -> Result<Result<Prepared, Action>, Error> {
    let spec = &svc.spec;
    let ns = svc.namespace().unwrap_or_default();
    if let Err(errs) = spec.validate() {
        let msg = errs.join("; ");
        stop_with(ctx, svc, "Invalid", ("Ready", false), "InvalidSpec", msg).await?;
        return Ok(Err(Action::await_change()));
    }
    let profile = match resolve_profile(ctx, &ns, spec).await {
        Ok(p) => p,
        Err(msg) => {
            let cond = ("Degraded", true);
            stop_with(ctx, svc, "Degraded", cond, "ProfileUnavailable", msg).await?;
            return Ok(Err(Action::requeue(Duration::from_secs(30))));
        }
    };
    let profile_yaml = serde_yaml::to_string(&profile).unwrap_or_default();
    let planner = planner_config(spec);
    let cfg_json = serde_json::to_string(&planner).unwrap_or_default();
    let planner_key = children::fnv1a(format!("{cfg_json}{profile_yaml}").as_bytes());
    Ok(Ok(Prepared {
        name: svc.name_any(),
        api_key: api_key(ctx, &ns, spec).await,
        ns,
        profile,
        profile_yaml,
        control: control_config(spec),
        planner,
        planner_key,
    }))
}

/// Lists the worker pods and reads the router.
async fn observe(ctx: &Ctx, svc: &DopdService, p: &Prepared) -> Result<Seen, Error> {
    let timeout = f64::from(svc.spec.planner.pending_timeout_seconds);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.ns);
    let mut pods = Vec::new();
    for role in Role::SIZED {
        let lp = ListParams::default().labels(&children::selector_string(&p.name, role.as_str()));
        let list = api.list(&lp).await?;
        pods.extend(observe::pod_infos(
            &list.items,
            role,
            timeout,
            ctx.clock.wall(),
        ));
    }
    let load = ctx.router.load(svc, p.api_key.as_deref()).await;
    Ok(Seen { pods, load })
}

/// The remembered loop, or a new one carrying on from the status; planner and loop settings
/// brought up to date with the spec.
fn state_for(ctx: &Ctx, svc: &DopdService, p: &Prepared, now: f64) -> Result<SvcState, Error> {
    let key = format!("{}/{}", p.ns, p.name);
    let mut st = match ctx.take_state(&key) {
        Some(s) => s,
        None => {
            let old = svc.status.clone().unwrap_or_default();
            let known = svc.status.is_some() && old.decode.desired > 0;
            // Zero (unknown) is raised to the minimum by the loop.
            let target = PerRole {
                prefill: old.prefill.desired,
                decode: old.decode.desired,
            };
            let planner = Planner::new(p.profile.clone(), p.planner.clone())?;
            let ctrl = Controller::new(planner, p.control.clone(), target);
            let applied = ctrl.target();
            SvcState {
                ctrl,
                planner_key: p.planner_key,
                applied: PerRole {
                    prefill: known.then_some(applied.prefill),
                    decode: known.then_some(applied.decode),
                },
                written: None,
            }
        }
    };
    if st.planner_key != p.planner_key {
        match Planner::new(p.profile.clone(), p.planner.clone()) {
            Ok(planner) => {
                st.ctrl.replace_planner(planner);
                st.planner_key = p.planner_key;
            }
            Err(e) => tracing::warn!(service = %p.name, "planner settings: {e}"),
        }
    }
    st.ctrl.set_config(p.control.clone(), now);
    Ok(st)
}

/// The pods that are the named instances.
fn pods_named<'a>(seen: &'a Seen, ids: &[String]) -> Vec<&'a PodInfo> {
    seen.pods.iter().filter(|p| ids.contains(&p.name)).collect()
}

/// Carries out the loop's orders: victims are marked to go first when their Deployment shrinks,
/// drains and the routing threshold go to the router. (Counts and placeholders are applied with
/// the children.)
async fn carry_out(
    ctx: &Ctx,
    svc: &DopdService,
    p: &Prepared,
    seen: &Seen,
    orders: &Orders,
) -> Result<(), Error> {
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.ns);
    let key = p.api_key.as_deref();
    for order in &orders.0 {
        match order {
            Order::Drain { ids, .. } | Order::Retire { ids, .. } => {
                for pod in pods_named(seen, ids).into_iter().filter(|p| !p.victim) {
                    let cost = json!(VICTIM_COST);
                    annotate_pod(ctx, &pod_api, &pod.name, DELETION_COST, cost).await?;
                }
                if let Order::Drain { ids, .. } = order {
                    let urls: Vec<String> = pods_named(seen, ids)
                        .into_iter()
                        .filter_map(|p| p.url.clone())
                        .collect();
                    if let Err(e) = ctx.router.drain(svc, key, &urls).await {
                        tracing::warn!(service = %p.name, "drain request failed: {e}");
                    }
                }
            }
            Order::SetCount { .. }
            | Order::Placeholders { .. }
            | Order::RoutingThreshold { .. }
            | Order::BypassThreshold { .. } => {}
        }
    }
    // The routing thresholds go together, in one request.
    let isl = orders.0.iter().find_map(|o| match o {
        Order::RoutingThreshold { isl } => Some(*isl),
        _ => None,
    });
    let bypass = orders.0.iter().find_map(|o| match o {
        Order::BypassThreshold { max_isl } => Some(*max_isl),
        _ => None,
    });
    if let Some(isl) = isl
        && let Err(e) = ctx.router.set_threshold(svc, key, isl, bypass).await
    {
        tracing::warn!(service = %p.name, "sending the routing thresholds: {e}");
    }
    Ok(())
}

/// Busy workers must not be evicted by the autoscaler to empty a node; idle ones may be.
async fn protect(ctx: &Ctx, p: &Prepared, seen: &Seen) -> Result<(), Error> {
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.ns);
    for (name, busy) in observe::eviction_changes(&seen.pods, seen.load.as_ref().ok()) {
        let v = if busy { json!("false") } else { Value::Null };
        annotate_pod(ctx, &pod_api, &name, SAFE_TO_EVICT, v).await?;
    }
    Ok(())
}

/// One tick's Event note: what moved and why.
fn tick_note(t: &TickReport, ctrl: &Controller) -> String {
    let mut moves = Vec::new();
    for role in Role::SIZED {
        let r = role;
        let (from, to) = (t.before.get(r), t.decision.target.get(r));
        if from == to {
            continue;
        }
        let victims: Vec<&str> = t
            .drained
            .iter()
            .chain(&t.retired)
            .filter(|(vr, _)| *vr == r)
            .map(|(_, id)| id.as_str())
            .collect();
        let after = match victims.is_empty() {
            true => String::new(),
            false => format!(" after draining {}", victims.join(", ")),
        };
        moves.push(format!("{} {from} -> {to}{after}", role.as_str()));
    }
    let target = ctrl.target();
    let what = match moves.is_empty() {
        true => format!(
            "keep prefill {} and decode {}",
            t.before.prefill, t.before.decode
        ),
        false => moves.join(", "),
    };
    let o = &t.observation;
    let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let fc = status::forecast(t).map_or("-".into(), |f| {
        let (r, i, s) = (f.requests, f.mean_isl, f.mean_osl);
        format!("{r:.1} requests, ISL {i:.0}, OSL {s:.0}")
    });
    format!(
        "{what} (prefill:decode {}:{}); last {:.0} s: {} requests, ISL {}, OSL {}; forecast: {fc}; reasons: {}",
        target.prefill,
        target.decode,
        o.interval_s,
        o.requests,
        num(o.mean_isl),
        num(o.mean_osl),
        status::reasons_text(&t.decision),
    )
}

/// Events and metrics for what the step did.
async fn announce(ctx: &Ctx, svc: &DopdService, p: &Prepared, st: &SvcState, r: &StepReport) {
    let held = st.ctrl.held();
    for role in Role::SIZED {
        let done: Vec<&Retired> = r.retired.iter().filter(|x| x.role == role).collect();
        if done.is_empty() {
            continue;
        }
        let names: Vec<&str> = done.iter().map(|x| x.id.as_str()).collect();
        let late = done.iter().any(|x| x.timed_out);
        let (kind, how) = match late {
            true => (
                EventType::Warning,
                "drain timed out with requests still in flight",
            ),
            false => (EventType::Normal, "drained (no requests left)"),
        };
        let (role_s, n) = (role.as_str(), held.get(role));
        let note = format!(
            "{role_s} {}: {how}; {role_s} replicas -> {n}",
            names.join(", ")
        );
        publish(ctx, svc, kind, "ScaledDown", note).await;
    }
    let Some(t) = &r.tick else {
        return;
    };
    let reason = if t.changed() { "Scaling" } else { "Planned" };
    publish(ctx, svc, EventType::Normal, reason, tick_note(t, &st.ctrl)).await;
    let label = DecisionLabel {
        namespace: p.ns.clone(),
        service: p.name.clone(),
        changed: t.changed().to_string(),
    };
    ctx.metrics.decisions.get_or_create(&label).inc();
    for r in &t.decision.reasons {
        if let Reason::Predictor { chosen } = r {
            let label = PredictorLabel {
                namespace: p.ns.clone(),
                service: p.name.clone(),
                predictor: chosen.clone(),
            };
            ctx.metrics.predictor.get_or_create(&label).inc();
        }
    }
    if let Some(f) = status::forecast(t) {
        for (q, v) in [
            ("requests", f.requests),
            ("mean_isl", f.mean_isl),
            ("mean_osl", f.mean_osl),
        ] {
            let label = ForecastLabel {
                namespace: p.ns.clone(),
                service: p.name.clone(),
                quantity: q.into(),
            };
            ctx.metrics.forecast.get_or_create(&label).set(v);
        }
    }
}

/// Role gauges, and when to come back: soon while something moves, else at the next tick.
fn wrap_up(ctx: &Ctx, p: &Prepared, st: &SvcState, s: &DopdServiceStatus, now: f64) -> Action {
    for (role, rs) in [("prefill", &s.prefill), ("decode", &s.decode)] {
        let label = RoleLabel {
            namespace: p.ns.clone(),
            service: p.name.clone(),
            role: role.into(),
        };
        ctx.metrics
            .desired
            .get_or_create(&label)
            .set(i64::from(rs.desired));
        ctx.metrics
            .ready
            .get_or_create(&label)
            .set(i64::from(rs.ready));
    }
    let busy = ctx.settings.busy_requeue.as_secs_f64();
    // A tick already due (the router could not be read) is retried at the busy pace.
    let until_tick = st
        .ctrl
        .next_tick()
        .map(|t| t - now)
        .filter(|d| *d > 0.0)
        .unwrap_or(busy);
    let wait = match s.phase.as_str() {
        "Running" => until_tick,
        _ => busy.min(until_tick),
    };
    Action::requeue(Duration::from_secs_f64(wait.max(0.2)))
}

async fn apply(svc: Arc<DopdService>, ctx: &Ctx) -> Result<Action, Error> {
    let p = match prepare(ctx, &svc).await? {
        Ok(p) => p,
        Err(action) => return Ok(action),
    };
    let seen = observe(ctx, &svc, &p).await?;
    let now = ctx.clock.now();
    let mut st = state_for(ctx, &svc, &p, now)?;
    let load = seen.load.as_ref().ok();
    let snapshot = Snapshot {
        load: load.map(|l| l.reading.clone()),
        instances: observe::instances(&seen.pods, load),
        known_next: None,
    };
    let mut orders = Orders::default();
    let report = st.ctrl.step(now, &snapshot, &mut orders);
    carry_out(ctx, &svc, &p, &seen, &orders).await?;
    announce(ctx, &svc, &p, &st, &report).await;
    protect(ctx, &p, &seen).await?;
    apply_children(ctx, &svc, &p, &mut st).await?;
    let load_error = match (&seen.load, report.load_unavailable) {
        (Err(e), true) => Some(e.to_string()),
        _ => None,
    };
    let old = status_base(&svc, &st);
    if let Some(e) = &load_error
        && !status::is_on(&old.conditions, "Degraded")
    {
        publish(ctx, &svc, EventType::Warning, "LoadUnavailable", e.clone()).await;
    }
    let pods: Vec<(PodInfo, InstanceState)> = seen
        .pods
        .iter()
        .zip(&snapshot.instances)
        .map(|(p, i)| (p.clone(), i.state))
        .collect();
    let inputs = status::Inputs {
        spec: &svc.spec,
        generation: svc.metadata.generation,
        old: &old,
        ctrl: &st.ctrl,
        pods: &pods,
        tick: report.tick.as_ref(),
        load_error: load_error.as_deref(),
        now,
        wall: ctx.clock.wall(),
    };
    let new = status::build(&inputs);
    warn_constrained(ctx, &svc, &old, &inputs).await;
    let action = wrap_up(ctx, &p, &st, &new, now);
    if patch_status(ctx, &svc, &old, &new).await? {
        st.written = Some((svc.metadata.resource_version.clone(), new));
    }
    ctx.put_state(format!("{}/{}", p.ns, p.name), st);
    Ok(action)
}
