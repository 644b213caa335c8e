//! The objects one `DopdService` is made of, as pure functions of its spec.
//!
//! Every child carries the standard `app.kubernetes.io/*` labels, `dopd.dev/service` and
//! `dopd.dev/role`, an owner reference to the DopdService (so deleting it deletes them), and a
//! `dopd.dev/config-hash` annotation: a hash of the child as applied. The reconciler compares that
//! hash (and, for worker Deployments, the replica count) with what is in the cluster and writes only
//! what differs, so an unchanged DopdService costs reads and no writes.

use kube::Resource;
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use crate::crd::{DopdService, DopdServiceSpec, RoleSpec};
use dopd_protocol::Role;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "dopd-operator";
/// Annotation holding the hash of the applied child.
pub const HASH_ANNOTATION: &str = "dopd.dev/config-hash";
/// Label naming the owning DopdService.
pub const SERVICE_LABEL: &str = "dopd.dev/service";
/// Label naming the role (router, prefill, decode).
pub const ROLE_LABEL: &str = "dopd.dev/role";
/// Label the worker Services carry (and their EndpointSlices inherit) for the router's discovery.
pub const WORKER_LABEL: &str = "dopd.dev/worker";
/// gRPC port of the workers.
pub const WORKER_PORT: u16 = 50051;
/// Metrics port of the workers.
pub const WORKER_METRICS_PORT: u16 = 9090;

/// Kinds of children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ConfigMap,
    ServiceAccount,
    Role,
    RoleBinding,
    Service,
    Deployment,
    PodDisruptionBudget,
}

impl Kind {
    pub fn api_resource(self) -> ApiResource {
        use k8s_openapi::api::{apps, core, policy, rbac};
        match self {
            Self::ConfigMap => ApiResource::erase::<core::v1::ConfigMap>(&()),
            Self::ServiceAccount => ApiResource::erase::<core::v1::ServiceAccount>(&()),
            Self::Role => ApiResource::erase::<rbac::v1::Role>(&()),
            Self::RoleBinding => ApiResource::erase::<rbac::v1::RoleBinding>(&()),
            Self::Service => ApiResource::erase::<core::v1::Service>(&()),
            Self::Deployment => ApiResource::erase::<apps::v1::Deployment>(&()),
            Self::PodDisruptionBudget => ApiResource::erase::<policy::v1::PodDisruptionBudget>(&()),
        }
    }
}

/// The part of the spec that describes `role`'s workers (a mixed worker is sized as decode).
pub fn role_spec(role: Role, spec: &DopdServiceSpec) -> &RoleSpec {
    match role {
        Role::Prefill => &spec.prefill,
        Role::Decode | Role::Mixed => &spec.decode,
    }
}

/// One child object.
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    pub kind: Kind,
    pub name: String,
    /// The full object to apply (its hash annotation included).
    pub body: Value,
    /// Replicas of a Deployment the planner sizes; excluded from the hash.
    pub replicas: Option<u32>,
    /// The worker role whose replicas the DopdService owns (edits by others are reverted).
    pub owner_role: Option<Role>,
}

/// Names of the children.
pub fn router_name(svc: &str) -> String {
    format!("{svc}-router")
}
pub fn worker_name(svc: &str, role: Role) -> String {
    format!("{svc}-{}", role.as_str())
}
pub fn config_name(svc: &str) -> String {
    format!("{svc}-config")
}
pub fn headroom_name(svc: &str, role: Role) -> String {
    format!("{svc}-headroom-{}", role.as_str())
}

/// The standard labels of a component.
pub fn labels(svc: &str, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "dopd",
        "app.kubernetes.io/instance": svc,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "dopd",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        SERVICE_LABEL: svc,
        ROLE_LABEL: component,
    })
}

/// The label selector of one role's pods.
pub fn selector(svc: &str, component: &str) -> Value {
    json!({ SERVICE_LABEL: svc, ROLE_LABEL: component })
}

/// Same, as a `key=value,...` string for list calls.
pub fn selector_string(svc: &str, component: &str) -> String {
    format!("{SERVICE_LABEL}={svc},{ROLE_LABEL}={component}")
}

/// 64-bit FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Everything DOPD runs for `svc`, with worker replicas from `replicas` and, when
/// `spec.headroom.enabled`, placeholder Deployments sized by `headroom`.
pub fn children(
    svc: &DopdService,
    profile_yaml: &str,
    replicas: impl Fn(Role) -> u32,
    headroom: impl Fn(Role) -> u32,
) -> Vec<Child> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let owner = svc.controller_owner_ref(&()).map(|o| {
        json!([{
            "apiVersion": o.api_version, "kind": o.kind, "name": o.name, "uid": o.uid,
            "controller": true, "blockOwnerDeletion": true,
        }])
    });
    let s = &svc.spec;
    let mut out = Vec::new();
    let mut push = |kind: Kind,
                    api_version: &str,
                    child: &str,
                    component: &str,
                    mut body: Value,
                    replicas: Option<(Option<Role>, u32)>| {
        let extra = body["metadata"]["labels"].take();
        body["apiVersion"] = json!(api_version);
        body["kind"] = json!(format!("{kind:?}"));
        body["metadata"]["name"] = json!(child);
        body["metadata"]["namespace"] = json!(ns);
        body["metadata"]["labels"] = labels(&name, component);
        if let Value::Object(m) = extra {
            for (k, v) in m {
                body["metadata"]["labels"][k] = v;
            }
        }
        if let Some(o) = &owner {
            body["metadata"]["ownerReferences"] = o.clone();
        }
        let hash = fnv1a(body.to_string().as_bytes());
        body["metadata"]["annotations"] = json!({ HASH_ANNOTATION: format!("{hash:016x}") });
        if let Some((_, n)) = replicas {
            body["spec"]["replicas"] = json!(n);
        }
        out.push(Child {
            kind,
            name: child.to_string(),
            body,
            replicas: replicas.map(|r| r.1),
            owner_role: replicas.and_then(|r| r.0),
        });
    };

    // Profile and router settings, for the router and for people reading the cluster.
    let router_cfg = json!({
        "servedModelName": s.served_name(),
        "ultraShortMaxIsl": s.planner.ultra_short_max_isl,
        "maxWaiting": s.router.max_waiting,
        "slo": {"ttftMs": s.slo.ttft_ms, "tpotMs": s.slo.tpot_ms},
    });
    push(
        Kind::ConfigMap,
        "v1",
        &config_name(&name),
        "config",
        json!({"data": {
            "profile.yaml": profile_yaml,
            "router.json": router_cfg.to_string(),
        }}),
        None,
    );

    // The router discovers workers from EndpointSlices: it needs to read them.
    let router = router_name(&name);
    push(
        Kind::ServiceAccount,
        "v1",
        &router,
        "router",
        json!({}),
        None,
    );
    push(
        Kind::Role,
        "rbac.authorization.k8s.io/v1",
        &router,
        "router",
        json!({"rules": [{
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }]}),
        None,
    );
    push(
        Kind::RoleBinding,
        "rbac.authorization.k8s.io/v1",
        &router,
        "router",
        json!({
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router},
            "subjects": [{"kind": "ServiceAccount", "name": router, "namespace": ns}],
        }),
        None,
    );

    let (volumes, mounts) = model_volume(s);
    let pull_secrets: Vec<Value> = s
        .images
        .pull_secrets
        .iter()
        .map(|n| json!({"name": n}))
        .collect();

    // Router.
    let args = vec![
        "router".to_string(),
        "--listen".into(),
        format!("0.0.0.0:{}", s.router.port),
        // The router reads only the tokenizer and context length.
        "--model".into(),
        s.model.tokenizer.clone().unwrap_or_else(|| s.model_path()),
        "--served-model-name".into(),
        s.served_name(),
        "--max-waiting".into(),
        s.router.max_waiting.to_string(),
        "--ultra-short-max-isl".into(),
        s.planner.ultra_short_max_isl.to_string(),
        // The SLOs order and pace the router's shared prefill queue.
        "--slo-ttft".into(),
        (f64::from(s.slo.ttft_ms) / 1e3).to_string(),
        "--slo-ttft-per-token".into(),
        (s.slo.ttft_per_token_ms / 1e3).to_string(),
        "--slo-tpot".into(),
        (f64::from(s.slo.tpot_ms) / 1e3).to_string(),
        "--discover".into(),
        format!("{ns}/{SERVICE_LABEL}={name},{WORKER_LABEL}=true#grpc"),
    ];
    let mut env = vec![json!({"name": "RUST_LOG", "value": "info"})];
    if let Some(secret) = &s.router.api_key_secret {
        env.push(json!({"name": "DOPD_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "api-key"}}}));
    }
    let mut router_container = json!({
        "name": "router",
        "image": s.images.router,
        "imagePullPolicy": s.images.pull_policy,
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": s.router.port}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": mounts,
        "securityContext": restricted(),
    });
    if let Some(r) = &s.router.resources {
        router_container["resources"] = json!(r);
    }
    push(
        Kind::Deployment,
        "apps/v1",
        &router,
        "router",
        json!({"spec": {
            "replicas": s.router.replicas,
            "selector": {"matchLabels": selector(&name, "router")},
            "template": {
                "metadata": {"labels": labels(&name, "router")},
                "spec": {
                    "serviceAccountName": router,
                    "containers": [router_container],
                    "volumes": volumes,
                    "imagePullSecrets": pull_secrets,
                },
            },
        }}),
        None,
    );
    push(
        Kind::Service,
        "v1",
        &router,
        "router",
        json!({"spec": {
            "type": s.router.service_type,
            "selector": selector(&name, "router"),
            "ports": [{"name": "http", "port": s.router.port, "targetPort": "http"}],
        }}),
        None,
    );
    push(
        Kind::PodDisruptionBudget,
        "policy/v1",
        &router,
        "router",
        json!({"spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(&name, "router")}}}),
        None,
    );

    // Workers.
    for role in Role::SIZED {
        let r = role_spec(role, s);
        let child = worker_name(&name, role);
        let comp = role.as_str();
        let mut args = vec![
            "worker".to_string(),
            "--role".into(),
            comp.into(),
            "--listen".into(),
            format!("0.0.0.0:{WORKER_PORT}"),
            "--metrics-listen".into(),
            format!("0.0.0.0:{WORKER_METRICS_PORT}"),
            "--model".into(),
            s.model_path(),
            "--device".into(),
            if r.gpus_per_instance > 0 {
                "cuda"
            } else {
                "cpu"
            }
            .into(),
        ];
        if let Some(b) = r.kv_blocks {
            args.extend(["--kv-blocks".into(), b.to_string()]);
        }
        args.extend(r.extra_args.iter().cloned());
        let mut resources = r
            .resources
            .as_ref()
            .map(|x| json!(x))
            .unwrap_or_else(|| json!({}));
        if r.gpus_per_instance > 0 && resources["limits"]["nvidia.com/gpu"].is_null() {
            resources["limits"]["nvidia.com/gpu"] = json!(r.gpus_per_instance.to_string());
        }
        let mut node_selector = json!(r.node_selector);
        if let Some(c) = &r.capacity_type {
            node_selector["karpenter.sh/capacity-type"] = json!(c);
        }
        let mut env = vec![
            json!({"name": "RUST_LOG", "value": "info"}),
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        ];
        env.extend(r.env.iter().map(|e| json!(e)));
        let container = json!({
            "name": "worker",
            "image": s.images.worker,
            "imagePullPolicy": s.images.pull_policy,
            "args": args,
            "env": env,
            "ports": [
                {"name": "grpc", "containerPort": WORKER_PORT},
                {"name": "metrics", "containerPort": WORKER_METRICS_PORT},
            ],
            "readinessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5},
            "startupProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5, "failureThreshold": 120},
            "resources": resources,
            "volumeMounts": mounts,
            "securityContext": restricted(),
        });
        push(
            Kind::Deployment,
            "apps/v1",
            &child,
            comp,
            json!({"spec": {
                "selector": {"matchLabels": selector(&name, comp)},
                // New pods before old ones go: a worker restart never drops capacity.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {
                        "labels": labels(&name, comp),
                        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": WORKER_METRICS_PORT.to_string()},
                    },
                    "spec": {
                        "containers": [container],
                        "nodeSelector": node_selector,
                        "tolerations": r.tolerations,
                        "volumes": volumes,
                        "imagePullSecrets": pull_secrets,
                        "terminationGracePeriodSeconds": s.planner.drain_timeout_seconds,
                    },
                },
            }}),
            Some((Some(role), replicas(role))),
        );
        let mut body = json!({"spec": {
            "clusterIP": "None",
            "selector": selector(&name, comp),
            "ports": [{"name": "grpc", "port": WORKER_PORT, "targetPort": "grpc"}],
        }});
        // EndpointSlices inherit the Service's labels: this one is what the router discovers.
        body["metadata"]["labels"] = json!({ WORKER_LABEL: "true" });
        push(Kind::Service, "v1", &child, comp, body, None);
        push(
            Kind::PodDisruptionBudget,
            "policy/v1",
            &child,
            comp,
            json!({"spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(&name, comp)}}}),
            None,
        );
        if s.headroom.enabled {
            // Placeholders: a worker's resources and placement, a sleeping container, a low
            // priority (real workers preempt them), no grace period.
            let hcomp = format!("headroom-{comp}");
            push(
                Kind::Deployment,
                "apps/v1",
                &headroom_name(&name, role),
                &hcomp,
                json!({"spec": {
                    "selector": {"matchLabels": selector(&name, &hcomp)},
                    "template": {
                        "metadata": {"labels": labels(&name, &hcomp)},
                        "spec": {
                            "priorityClassName": s.headroom.priority_class_name,
                            "terminationGracePeriodSeconds": 0,
                            "containers": [{
                                "name": "placeholder",
                                "image": s.headroom.image,
                                "resources": resources,
                                "securityContext": restricted(),
                            }],
                            "nodeSelector": node_selector,
                            "tolerations": r.tolerations,
                        },
                    },
                }}),
                Some((None, headroom(role))),
            );
        }
    }
    out
}

/// A container security context for the restricted Pod Security Standard.
fn restricted() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The model volume and its mount when the model is on a PVC.
fn model_volume(s: &DopdServiceSpec) -> (Value, Value) {
    match s.pvc() {
        Some((claim, _)) => (
            json!([{"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}}]),
            json!([{"name": "model", "mountPath": format!("/models/{claim}"), "readOnly": true}]),
        ),
        None => (json!([]), json!([])),
    }
}

/// The hash an applied child carries (`None` when it has none).
pub fn applied_hash(obj: &Value) -> Option<&str> {
    obj["metadata"]["annotations"][HASH_ANNOTATION].as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ModelSpec, Slo};
    use k8s_openapi::api::apps::v1::Deployment;

    pub(crate) fn service() -> DopdService {
        let mut svc = DopdService::new(
            "chat",
            DopdServiceSpec {
                model: ModelSpec {
                    source: "pvc://models/smollm2/SmolLM2.gguf".into(),
                    served_name: None,
                    tokenizer: None,
                },
                images: Default::default(),
                prefill: Default::default(),
                decode: Default::default(),
                router: Default::default(),
                slo: Slo {
                    ttft_ms: 2000,
                    tpot_ms: 100,
                    ttft_per_token_ms: 0.0,
                },
                planner: Default::default(),
                profile: Default::default(),
                headroom: Default::default(),
            },
        );
        svc.metadata.namespace = Some("ml".into());
        svc.metadata.uid = Some("u-1".into());
        svc
    }

    #[test]
    fn children_are_typed_objects_with_owner_and_labels() {
        let svc = service();
        let kids = children(&svc, "name: p\n", |_| 3, |_| 0);
        assert_eq!(kids.len(), 13);
        for c in &kids {
            assert_eq!(c.body["metadata"]["namespace"], "ml");
            assert_eq!(c.body["metadata"]["ownerReferences"][0]["uid"], "u-1");
            assert_eq!(c.body["metadata"]["labels"][SERVICE_LABEL], "chat");
            assert!(applied_hash(&c.body).is_some(), "{}", c.name);
        }
        let dec = kids
            .iter()
            .find(|c| c.name == "chat-decode" && c.kind == Kind::Deployment)
            .expect("decode deployment");
        let d: Deployment = serde_json::from_value(dec.body.clone()).expect("a valid Deployment");
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.expect("pod spec");
        let c = &pod.containers[0];
        assert_eq!(
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("nvidia.com/gpu"))
                .map(|q| q.0.as_str()),
            Some("1")
        );
        let args = c.args.clone().unwrap_or_default();
        assert!(
            args.windows(2)
                .any(|w| w == ["--model", "/models/models/smollm2/SmolLM2.gguf"]),
            "{args:?}"
        );
        let router = kids
            .iter()
            .find(|c| c.name == "chat-router" && c.kind == Kind::Deployment)
            .expect("router deployment");
        let r: Deployment =
            serde_json::from_value(router.body.clone()).expect("a valid Deployment");
        let pod = r.spec.template.spec.expect("pod spec");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        for want in [["--slo-ttft", "2"], ["--slo-tpot", "0.1"]] {
            assert!(args.windows(2).any(|w| w == want), "{want:?} in {args:?}");
        }
        let svc_obj = kids
            .iter()
            .find(|c| c.name == "chat-prefill" && c.kind == Kind::Service)
            .expect("prefill service");
        assert_eq!(svc_obj.body["metadata"]["labels"][WORKER_LABEL], "true");
        assert_eq!(svc_obj.body["spec"]["clusterIP"], "None");
    }

    #[test]
    fn replicas_do_not_change_the_hash_but_the_spec_does() {
        let svc = service();
        let a = children(&svc, "p", |_| 1, |_| 0);
        let b = children(&svc, "p", |_| 5, |_| 0);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(applied_hash(&x.body), applied_hash(&y.body), "{}", x.name);
        }
        let mut svc2 = service();
        svc2.spec.images.worker = "other:1".into();
        let c = children(&svc2, "p", |_| 1, |_| 0);
        let changed: Vec<&str> = a
            .iter()
            .zip(&c)
            .filter(|(x, y)| applied_hash(&x.body) != applied_hash(&y.body))
            .map(|(x, _)| x.name.as_str())
            .collect();
        assert_eq!(changed, ["chat-prefill", "chat-decode"]);
    }

    #[test]
    fn headroom_placeholders_look_like_workers_at_low_priority() {
        let mut svc = service();
        assert!(
            !children(&svc, "p", |_| 1, |_| 2)
                .iter()
                .any(|c| c.name.contains("headroom"))
        );
        svc.spec.headroom.enabled = true;
        svc.spec.decode.capacity_type = Some("on-demand".into());
        let kids = children(&svc, "p", |_| 1, |r| if r == Role::Decode { 2 } else { 0 });
        let h = kids
            .iter()
            .find(|c| c.name == "chat-headroom-decode")
            .expect("decode placeholders");
        assert_eq!((h.replicas, h.owner_role), (Some(2), None));
        let d: Deployment = serde_json::from_value(h.body.clone()).expect("a valid Deployment");
        let pod = d.spec.template.spec.expect("pod spec");
        assert_eq!(pod.priority_class_name.as_deref(), Some("dopd-headroom"));
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert_eq!(
            limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
            Some("1")
        );
        assert_eq!(
            pod.node_selector
                .expect("selector")
                .get("karpenter.sh/capacity-type")
                .map(String::as_str),
            Some("on-demand")
        );
        // Their pods are not worker pods.
        assert_eq!(
            h.body["spec"]["selector"]["matchLabels"][ROLE_LABEL],
            "headroom-decode"
        );
    }
}
