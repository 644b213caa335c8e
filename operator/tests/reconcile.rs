//! Reconcile paths against the in-memory API server (`fake/`) with a fake router and a manual
//! clock: create, no-op, scale up, drain then scale down, conflict retry, cleanup with children
//! already gone, Pending timeout, replicas changed by someone else, invalid spec.

#![allow(clippy::unwrap_used)]

mod fake;

use std::sync::{Arc, Mutex};

use dopd_operator::control::{BoxFut, ManualClock, RouterApi, RouterError};
use dopd_operator::crd::DopdService;
use dopd_operator::metrics::Metrics;
use dopd_operator::reconcile::{self, Ctx, Settings};
use dopd_planner::load::LoadTotals;
use dopd_protocol::Role;
use dopd_protocol::load::LoadSnapshot;
use dopd_protocol::load::WorkerView;
use fake::Fake;
use http::Method;
use serde_json::{Value, json};

const NS: &str = "ml";
const SVC: &str = "/apis/dopd.dev/v1alpha1/namespaces/ml/dopdservices/chat";
const DEPLOY: &str = "/apis/apps/v1/namespaces/ml/deployments";
const PODS: &str = "/api/v1/namespaces/ml/pods";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";

/// A router whose counts only grow, like the real one's.
#[derive(Default)]
struct FakeRouter {
    totals: Mutex<LoadTotals>,
    in_flight: Mutex<Vec<(String, usize)>>,
    drained: Mutex<Vec<String>>,
    down: Mutex<bool>,
    forecast_isl: Mutex<Option<f64>>,
}

impl FakeRouter {
    /// `n` requests of `isl` prompt tokens arrive and finish with `osl` output tokens.
    fn serve(&self, n: u64, isl: u32, osl: u32) {
        let mut t = self.totals.lock().unwrap();
        for _ in 0..n {
            t.arrive(isl);
            t.first_token(0.2);
            t.finish(osl, Some(0.02), 0.2 + 0.02 * f64::from(osl));
        }
    }

    fn views(&self) -> Vec<WorkerView> {
        let drained = self.drained.lock().unwrap().clone();
        self.in_flight
            .lock()
            .unwrap()
            .iter()
            .map(|(url, n)| WorkerView {
                url: url.clone(),
                worker_id: url.clone(),
                role: Some(Role::Decode),
                healthy: true,
                draining: drained.contains(url),
                in_flight: *n,
                outstanding_tokens: 0,
                kv_blocks_used: None,
                kv_blocks_free: None,
                waiting: None,
                kv_degraded: None,
            })
            .collect()
    }
}

impl RouterApi for FakeRouter {
    fn load<'a>(
        &'a self,
        _: &'a DopdService,
        _: Option<&'a str>,
    ) -> BoxFut<'a, Result<LoadSnapshot, RouterError>> {
        Box::pin(async move {
            if *self.down.lock().unwrap() {
                return Err(RouterError::Unavailable("connection refused".into()));
            }
            let totals = self.totals.lock().unwrap().clone();
            Ok(LoadSnapshot::new(totals, 0, 1.0, self.views()))
        })
    }
    fn set_threshold<'a>(
        &'a self,
        _: &'a DopdService,
        _: Option<&'a str>,
        mean_isl: f64,
        _bypass: Option<u32>,
    ) -> BoxFut<'a, Result<(), RouterError>> {
        Box::pin(async move {
            *self.forecast_isl.lock().unwrap() = Some(mean_isl);
            Ok(())
        })
    }
    fn drain<'a>(
        &'a self,
        _: &'a DopdService,
        _: Option<&'a str>,
        workers: &'a [String],
    ) -> BoxFut<'a, Result<(), RouterError>> {
        Box::pin(async move {
            self.drained.lock().unwrap().extend(workers.iter().cloned());
            Ok(())
        })
    }
}

struct World {
    api: Arc<Fake>,
    router: Arc<FakeRouter>,
    clock: Arc<ManualClock>,
    ctx: Arc<Ctx>,
}

/// A service whose two workers run, and a load that the next tick scales up for (a `Scaling`
/// decision on record once `w.reconcile()` ran after `w.clock.advance(31.0)`).
async fn running_then_heavy() -> World {
    let w = world();
    w.create(spec(json!({})), None);
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    w.settle().await;
    // About 390 requests a second of 2000-token prompts: more than one prefill and one decode
    // instance of the profile carry.
    w.router.serve(12000, 2000, 400);
    w
}

fn world() -> World {
    let api = Fake::new();
    let router = Arc::new(FakeRouter::default());
    let clock = Arc::new(ManualClock::default());
    let ctx = Arc::new(Ctx::new(
        api.client(),
        router.clone(),
        clock.clone(),
        Arc::new(Metrics::default()),
        Settings::default(),
    ));
    World {
        api,
        router,
        clock,
        ctx,
    }
}

fn spec(extra: Value) -> Value {
    let mut s = json!({
        "model": {"source": "/models/smollm2.gguf", "servedName": "smollm2"},
        "slo": {"ttftMs": 2000, "tpotMs": 100},
        "prefill": {"minReplicas": 1, "maxReplicas": 4, "gpusPerInstance": 1},
        "decode": {"minReplicas": 1, "maxReplicas": 4, "gpusPerInstance": 1},
        "planner": {"intervalSeconds": 30, "gpuBudget": 8, "scaleDownStabilizationSeconds": 0},
    });
    fake::merge(&mut s, &extra);
    s
}

impl World {
    fn create(&self, spec: Value, status: Option<Value>) {
        let mut obj = json!({
            "apiVersion": "dopd.dev/v1alpha1", "kind": "DopdService",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": spec,
        });
        if let Some(s) = status {
            obj["status"] = s;
        }
        self.api.put(SVC, obj);
    }

    fn svc(&self) -> DopdService {
        serde_json::from_value(self.api.get(SVC).expect("the DopdService")).unwrap()
    }

    async fn reconcile(&self) -> Result<kube::runtime::controller::Action, reconcile::Error> {
        reconcile::reconcile(Arc::new(self.svc()), self.ctx.clone()).await
    }

    /// Reconciles until the finalizer is on and the children exist.
    async fn settle(&self) {
        for _ in 0..2 {
            self.reconcile().await.unwrap();
        }
    }

    fn replicas(&self, role: &str) -> u64 {
        self.api.get(&format!("{DEPLOY}/chat-{role}")).unwrap()["spec"]["replicas"]
            .as_u64()
            .unwrap()
    }

    fn status(&self) -> Value {
        self.api.get(SVC).unwrap()["status"].clone()
    }

    fn events(&self, reason: &str) -> Vec<Value> {
        self.api
            .list(EVENTS)
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    fn pod(&self, role: &str, i: usize, ready: bool, phase: &str, created: &str) {
        let name = format!("chat-{role}-{i}");
        self.api.put(
            &format!("{PODS}/{name}"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "creationTimestamp": created,
                    "labels": {"dopd.dev/service": "chat", "dopd.dev/role": role}},
                "spec": {"containers": [{"name": "worker"}]},
                "status": {"phase": phase, "podIP": format!("10.0.{}.{i}", if role == "prefill" {1} else {2}),
                    "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            }),
        );
    }

    /// Plays the ReplicaSet controller: ready pods for every worker Deployment's replicas; when
    /// there are too many, the lowest `pod-deletion-cost` goes first.
    fn follow(&self) {
        for role in ["prefill", "decode"] {
            let want = self.replicas(role) as usize;
            let mut have: Vec<Value> = self
                .api
                .list(PODS)
                .into_iter()
                .filter(|p| p["metadata"]["labels"]["dopd.dev/role"] == role)
                .collect();
            let mut i = 0;
            while have.len() < want {
                let name = format!("chat-{role}-{i}");
                if !have.iter().any(|p| p["metadata"]["name"] == name.as_str()) {
                    self.pod(role, i, true, "Running", OLD);
                    have.push(json!({"metadata": {"name": name}}));
                }
                i += 1;
            }
            let cost = |p: &Value| {
                p["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"]
                    .as_str()
                    .and_then(|c| c.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            have.sort_by_key(cost);
            for p in have.iter().take(have.len().saturating_sub(want)) {
                let name = p["metadata"]["name"].as_str().unwrap();
                self.api.remove(&format!("{PODS}/{name}"));
            }
        }
    }

    fn condition(&self, type_: &str) -> Value {
        self.status()["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

const OLD: &str = "2026-01-01T00:00:00Z";

#[tokio::test]
async fn create_makes_every_child_and_a_status() {
    let w = world();
    w.create(spec(json!({})), None);
    w.reconcile().await.unwrap();
    assert_eq!(
        w.api.get(SVC).unwrap()["metadata"]["finalizers"],
        json!(["dopd.dev/cleanup"])
    );
    w.reconcile().await.unwrap();
    for path in [
        "/api/v1/namespaces/ml/configmaps/chat-config",
        "/api/v1/namespaces/ml/serviceaccounts/chat-router",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/roles/chat-router",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings/chat-router",
        "/apis/apps/v1/namespaces/ml/deployments/chat-router",
        "/apis/apps/v1/namespaces/ml/deployments/chat-prefill",
        "/apis/apps/v1/namespaces/ml/deployments/chat-decode",
        "/api/v1/namespaces/ml/services/chat-router",
        "/api/v1/namespaces/ml/services/chat-prefill",
        "/api/v1/namespaces/ml/services/chat-decode",
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/chat-decode",
    ] {
        let o = w.api.get(path).unwrap_or_else(|| panic!("{path} missing"));
        assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], "DopdService");
    }
    assert_eq!(w.replicas("prefill"), 1);
    assert_eq!(w.replicas("decode"), 1);
    let cm = w
        .api
        .get("/api/v1/namespaces/ml/configmaps/chat-config")
        .unwrap();
    assert!(
        cm["data"]["profile.yaml"]
            .as_str()
            .unwrap()
            .contains("smollm2")
    );
    let st = w.status();
    assert_eq!(st["model"], "smollm2");
    assert_eq!(st["decode"]["summary"], "0/1");
    assert_eq!(st["phase"], "Pending");
}

#[tokio::test]
async fn an_unchanged_service_costs_no_writes() {
    let w = world();
    w.create(spec(json!({})), None);
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    w.settle().await;
    w.reconcile().await.unwrap();
    let before = w.api.writes().len();
    w.reconcile().await.unwrap();
    w.reconcile().await.unwrap();
    assert_eq!(w.api.writes()[before..], [], "a no-op reconcile wrote");
    assert_eq!(w.status()["phase"], "Running");
}

#[tokio::test]
async fn a_reconcile_from_a_stale_copy_keeps_the_recorded_decision() {
    // Against a real API server the informer's copy can trail the operator's own status write:
    // the next reconcile may run on the object as it was before the decision was recorded.
    let w = running_then_heavy().await;
    let stale = w.svc();
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.status()["history"].as_array().unwrap().len(), 1);
    let decided = w.status()["lastDecision"].clone();
    w.clock.advance(1.0);
    reconcile::reconcile(Arc::new(stale.clone()), w.ctx.clone())
        .await
        .unwrap();
    let st = w.status();
    assert_eq!(st["history"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["lastDecision"], decided);
    // Once the copy moved on (here: an edit by someone else), its history and the one written
    // are merged, so the decision is still there.
    let mut moved = stale;
    moved.metadata.resource_version = Some("moved-on".into());
    reconcile::reconcile(Arc::new(moved), w.ctx.clone())
        .await
        .unwrap();
    assert_eq!(w.status()["history"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn heavy_load_scales_up_with_an_event_and_history() {
    let w = running_then_heavy().await;
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    let (p, d) = (w.replicas("prefill"), w.replicas("decode"));
    assert!(p + d > 2, "no scale-up: prefill {p}, decode {d}");
    assert!(p <= 4 && d <= 4, "max replicas ignored: {p} {d}");
    let st = w.status();
    assert_eq!(st["history"].as_array().unwrap().len(), 1);
    assert_eq!(st["ratio"], format!("{p}:{d}"));
    assert_eq!(st["forecast"]["meanIsl"], 2000.0);
    assert_eq!(
        *w.router.forecast_isl.lock().unwrap(),
        Some(2000.0),
        "threshold not sent"
    );
    assert_eq!(w.events("Scaling").len(), 1, "{:?}", w.api.list(EVENTS));
    assert_eq!(st["phase"], "Scaling");
    assert_eq!(w.condition("Scaling")["status"], "True");
    // The default predictor is the scorecard; until its members are scored ARIMA answers, and
    // the choice is counted.
    let m = w.ctx.metrics.render();
    assert!(
        m.contains("planner_predictor_choices_total{") && m.contains("predictor=\"arima\""),
        "{m}"
    );
}

#[tokio::test]
async fn scale_down_drains_the_least_busy_pods_first() {
    let w = world();
    // Running at 3 decode instances (from a previous leader's status); the static policy wants 1.
    w.create(
        spec(json!({"planner": {"policy": "static"}})),
        Some(json!({"prefill": {"desired": 1, "ready": 1, "pending": 0, "unschedulable": 0, "summary": "1/1"},
                    "decode": {"desired": 3, "ready": 3, "pending": 0, "unschedulable": 0, "summary": "3/3"}})),
    );
    w.pod("prefill", 0, true, "Running", OLD);
    for i in 0..3 {
        w.pod("decode", i, true, "Running", OLD);
    }
    *w.router.in_flight.lock().unwrap() = vec![
        ("http://10.0.2.0:50051".into(), 5),
        ("http://10.0.2.1:50051".into(), 0),
        ("http://10.0.2.2:50051".into(), 2),
    ];
    w.settle().await;
    assert_eq!(w.replicas("decode"), 3);
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    // Victims: the idle one and the one with 2 requests; not the busiest.
    let mut drained = w.router.drained.lock().unwrap().clone();
    drained.sort();
    assert_eq!(drained, ["http://10.0.2.1:50051", "http://10.0.2.2:50051"]);
    let cost = |i: usize| {
        w.api.get(&format!("{PODS}/chat-decode-{i}")).unwrap()["metadata"]["annotations"]
            ["controller.kubernetes.io/pod-deletion-cost"]
            .clone()
    };
    assert_eq!(
        (cost(0), cost(1), cost(2)),
        (Value::Null, json!("-1000"), json!("-1000"))
    );
    assert_eq!(
        w.replicas("decode"),
        3,
        "scaled down before the drain finished"
    );
    assert_eq!(
        w.status()["draining"][0]["pods"],
        json!(["chat-decode-1", "chat-decode-2"])
    );
    // The idle one goes at the next look; the busy one stays.
    w.clock.advance(1.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("decode"), 2);
    assert_eq!(w.status()["draining"][0]["pods"], json!(["chat-decode-2"]));
    let ev = w.events("ScaledDown");
    assert!(
        ev[0]["note"].as_str().unwrap().contains("chat-decode-1"),
        "{ev:?}"
    );
    // Done: replicas go down and the drain is reported.
    w.router.in_flight.lock().unwrap()[2].1 = 0;
    w.clock.advance(1.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("decode"), 1);
    // The Event recorder folds the second ScaledDown into the first one's series.
    let ev = w.events("ScaledDown");
    assert_eq!(
        (ev.len(), &ev[0]["series"]["count"]),
        (1, &json!(2)),
        "{ev:?}"
    );
    assert!(w.status().get("draining").is_none());
    // The pods the ReplicaSet removes next are exactly the drained ones.
    w.follow();
    let left: Vec<Value> = w
        .api
        .list(PODS)
        .into_iter()
        .filter(|p| p["metadata"]["labels"]["dopd.dev/role"] == "decode")
        .map(|p| p["metadata"]["name"].clone())
        .collect();
    assert_eq!(left, [json!("chat-decode-0")]);
}

#[tokio::test]
async fn a_drain_that_never_ends_is_cut_at_the_timeout() {
    let w = world();
    w.create(
        spec(json!({"planner": {"policy": "static", "drainTimeoutSeconds": 10}})),
        Some(json!({"decode": {"desired": 2, "ready": 2, "pending": 0, "unschedulable": 0, "summary": "2/2"}})),
    );
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    w.pod("decode", 1, true, "Running", OLD);
    *w.router.in_flight.lock().unwrap() = vec![
        ("http://10.0.2.0:50051".into(), 3),
        ("http://10.0.2.1:50051".into(), 4),
    ];
    w.settle().await;
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("decode"), 2);
    w.clock.advance(11.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("decode"), 1);
    let ev = w.events("ScaledDown");
    assert!(
        ev[0]["note"].as_str().unwrap().contains("timed out"),
        "{ev:?}"
    );
}

#[tokio::test]
async fn a_conflict_fails_the_reconcile_and_the_retry_succeeds() {
    let w = world();
    w.create(spec(json!({})), None);
    w.reconcile().await.unwrap();
    w.api
        .fail(Method::PATCH, "/deployments/chat-prefill", 409, 1);
    let err = w.reconcile().await.unwrap_err();
    assert_eq!(err.kind(), "conflict");
    let action = reconcile::error_policy(Arc::new(w.svc()), &err, w.ctx.clone());
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_millis(200))
    );
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("prefill"), 1);
}

#[tokio::test]
async fn deletion_removes_children_even_when_some_are_already_gone() {
    let w = world();
    w.create(spec(json!({})), None);
    w.settle().await;
    w.api.remove(&format!("{DEPLOY}/chat-decode"));
    w.api.remove("/api/v1/namespaces/ml/services/chat-prefill");
    // kubectl delete: the finalizer holds the object with a deletionTimestamp.
    let mut obj = w.api.get(SVC).unwrap();
    obj["metadata"]["deletionTimestamp"] = json!(OLD);
    w.api.put(SVC, obj.clone());
    w.reconcile().await.unwrap();
    assert!(w.api.get(SVC).is_none(), "the finalizer was not removed");
    assert!(w.api.list(DEPLOY).is_empty());
    assert!(w.api.list("/api/v1/namespaces/ml/configmaps").is_empty());
    assert!(w.ctx.targets(NS, "chat").is_none());
    // The informer's copy can still show the object (finalizer and all) once it is gone, as it
    // does against a real API server: that cleanup finds nothing to remove, and is no failure.
    let stale: DopdService = serde_json::from_value(obj).unwrap();
    reconcile::reconcile(Arc::new(stale), w.ctx.clone())
        .await
        .unwrap();
}

#[tokio::test]
async fn pods_pending_past_the_timeout_are_reported_and_do_not_wedge_the_planner() {
    let w = world();
    w.create(
        spec(json!({"planner": {"pendingTimeoutSeconds": 300}})),
        Some(json!({"decode": {"desired": 2, "ready": 1, "pending": 1, "unschedulable": 0, "summary": "1/2"}})),
    );
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    // Created long ago, still no node.
    w.pod("decode", 1, false, "Pending", OLD);
    w.settle().await;
    let c = w.condition("CapacityConstrained");
    assert_eq!(c["status"], "True", "{c}");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("1 decode pod(s) Pending")
    );
    assert_eq!(w.status()["decode"]["unschedulable"], 1);
    assert_eq!(w.events("CapacityConstrained").len(), 1);
    // The planner still decides (it does not wait for the stuck pod).
    w.router.serve(10, 500, 100);
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    let st = w.status();
    assert!(st["lastDecision"].is_object(), "{st}");
    assert!(
        !st["lastDecision"]["reason"]
            .as_str()
            .unwrap()
            .contains("reconfig_in_flight"),
        "{st}"
    );
}

#[tokio::test]
async fn replicas_changed_by_someone_else_are_put_back_with_an_event() {
    let w = world();
    w.create(spec(json!({})), None);
    w.settle().await;
    let path = format!("{DEPLOY}/chat-decode");
    let mut d = w.api.get(&path).unwrap();
    d["spec"]["replicas"] = json!(5);
    w.api.put(&path, d);
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("decode"), 1);
    let ev = w.events("ReplicasReverted");
    assert_eq!(ev.len(), 1);
    assert!(ev[0]["note"].as_str().unwrap().contains("scaled to 5"));
}

#[tokio::test]
async fn a_router_that_cannot_be_read_degrades_the_service_but_keeps_it() {
    let w = world();
    w.create(spec(json!({})), None);
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    w.settle().await;
    *w.router.down.lock().unwrap() = true;
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.status()["phase"], "Degraded");
    let c = w.condition("Degraded");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{c}"
    );
    assert_eq!(w.replicas("decode"), 1);
    *w.router.down.lock().unwrap() = false;
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.condition("Degraded")["status"], "False");
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_created() {
    let w = world();
    w.create(
        spec(json!({"decode": {"minReplicas": 5, "maxReplicas": 2}, "planner": {"gpuBudget": 2}})),
        None,
    );
    w.settle().await;
    assert!(w.api.list(DEPLOY).is_empty());
    assert_eq!(w.status()["phase"], "Invalid");
    let msg = w.condition("Ready")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("minReplicas (5) must not exceed maxReplicas (2)"),
        "{msg}"
    );
    assert!(msg.contains("gpuBudget (2)"), "{msg}");
    assert_eq!(w.events("InvalidSpec").len(), 1);
}

#[tokio::test]
async fn a_spec_made_invalid_keeps_the_decisions_on_record() {
    let w = running_then_heavy().await;
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    let before = w.status();
    assert_eq!(before["history"].as_array().unwrap().len(), 1);
    let mut obj = w.api.get(SVC).unwrap();
    obj["spec"]["decode"]["minReplicas"] = json!(9);
    obj["spec"]["decode"]["maxReplicas"] = json!(2);
    w.api.put(SVC, obj);
    w.reconcile().await.unwrap();
    let st = w.status();
    assert_eq!(st["phase"], "Invalid");
    assert_eq!(st["history"], before["history"]);
    assert_eq!(st["lastDecision"], before["lastDecision"]);
}

#[tokio::test]
async fn headroom_follows_the_forecast_upper_bound_within_the_budget() {
    let w = world();
    w.create(
        spec(json!({"headroom": {"enabled": true},
                    "prefill": {"maxReplicas": 8}, "decode": {"maxReplicas": 8},
                    "planner": {"gpuBudget": 12},
                    "profile": {"preset": "llama-3.3-70b-fp8-h100"}})),
        None,
    );
    w.settle().await;
    let hd = |role: &str| {
        w.api
            .get(&format!("{DEPLOY}/chat-headroom-{role}"))
            .map(|d| d["spec"]["replicas"].as_u64().unwrap())
    };
    assert_eq!((hd("prefill"), hd("decode")), (Some(0), Some(0)));
    // A noisy load: the forecast's upper bound sits well above its point.
    let mut most = 0;
    for (i, n) in [80u64, 400, 120, 380, 90, 420, 100, 390, 110, 410]
        .into_iter()
        .enumerate()
    {
        w.follow();
        w.router.serve(n, 1000, 250);
        w.clock.advance(31.0);
        w.reconcile().await.unwrap();
        let (p, d) = (w.replicas("prefill"), w.replicas("decode"));
        let (hp, hdd) = (hd("prefill").unwrap(), hd("decode").unwrap());
        assert!(
            p + d + hp + hdd <= 12,
            "tick {i}: {p}+{d} workers and {hp}+{hdd} placeholders exceed 12 GPUs"
        );
        most = most.max(hp + hdd);
    }
    assert!(most > 0, "no headroom under a noisy load: {}", w.status());
    assert!(w.status()["headroom"]["upper"].is_string());
    // Turned off: the placeholders go.
    let mut obj = w.api.get(SVC).unwrap();
    obj["spec"]["headroom"]["enabled"] = json!(false);
    w.api.put(SVC, obj);
    w.reconcile().await.unwrap();
    assert_eq!((hd("prefill"), hd("decode")), (None, None));
}

#[tokio::test]
async fn busy_workers_are_protected_from_autoscaler_eviction_and_idle_ones_are_not() {
    let w = world();
    w.create(spec(json!({})), None);
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    w.settle().await;
    let protected = |role: &str| {
        w.api.get(&format!("{PODS}/chat-{role}-0")).unwrap()["metadata"]["annotations"]
            ["cluster-autoscaler.kubernetes.io/safe-to-evict"]
            .clone()
    };
    *w.router.in_flight.lock().unwrap() = vec![("http://10.0.2.0:50051".into(), 3)];
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    assert_eq!(protected("decode"), json!("false"));
    assert_eq!(protected("prefill"), Value::Null);
    w.router.in_flight.lock().unwrap()[0].1 = 0;
    w.clock.advance(31.0);
    w.reconcile().await.unwrap();
    assert_eq!(protected("decode"), Value::Null);
}

#[tokio::test]
async fn a_new_leader_keeps_a_drain_in_progress_until_the_pod_is_idle() {
    let w = world();
    // The previous leader scaled decode from 2 to 1 and was draining chat-decode-1 when it left:
    // its status says 1, the Deployment still has 2, the router still drains the pod.
    w.create(
        spec(json!({"planner": {"policy": "static"}})),
        Some(json!({"prefill": {"desired": 1, "ready": 1, "pending": 0, "unschedulable": 0, "summary": "1/1"},
                    "decode": {"desired": 1, "ready": 1, "pending": 0, "unschedulable": 0, "summary": "1/1"}})),
    );
    w.pod("prefill", 0, true, "Running", OLD);
    w.pod("decode", 0, true, "Running", OLD);
    w.pod("decode", 1, true, "Running", OLD);
    *w.router.in_flight.lock().unwrap() = vec![
        ("http://10.0.2.0:50051".into(), 1),
        ("http://10.0.2.1:50051".into(), 2),
    ];
    w.router
        .drained
        .lock()
        .unwrap()
        .push("http://10.0.2.1:50051".into());
    w.settle().await;
    assert_eq!(w.replicas("decode"), 2, "the draining pod was cut short");
    assert_eq!(w.status()["draining"][0]["pods"], json!(["chat-decode-1"]));
    assert_eq!(w.status()["decode"]["summary"], "1/1");
    w.router.in_flight.lock().unwrap()[1].1 = 0;
    w.clock.advance(1.0);
    w.reconcile().await.unwrap();
    assert_eq!(w.replicas("decode"), 1);
    w.follow();
    assert!(w.api.get(&format!("{PODS}/chat-decode-1")).is_none());
    assert!(w.api.get(&format!("{PODS}/chat-decode-0")).is_some());
}
