//! Worker discovery from Kubernetes EndpointSlices: every `every`, list the slices matching a
//! label selector in a namespace, turn their ready endpoints into worker URLs, add the new ones
//! to the pool and remove the ones that went away (only those this discovery added).
//!
//! The client comes from the usual places (in-cluster service account, else `KUBECONFIG` /
//! `~/.kube/config`), so the router runs in and out of a cluster.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use crate::pool::Pool;

/// Where to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSelector {
    pub namespace: String,
    /// A label selector, e.g. `app.kubernetes.io/component=decode,dopd.io/service=chat`.
    pub labels: String,
    /// The port to use (by name); `None`: a port named `grpc`, else the slice's first port.
    pub port_name: Option<String>,
}

impl std::str::FromStr for SliceSelector {
    type Err = String;

    /// `NAMESPACE/SELECTOR[#PORT_NAME]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/LABEL_SELECTOR[#PORT_NAME]"))?;
        let (labels, port) = match rest.split_once('#') {
            Some((l, p)) => (l, Some(p.to_string())),
            None => (rest, None),
        };
        if ns.is_empty() || labels.is_empty() {
            return Err(format!(
                "{s:?}: the namespace and the label selector must not be empty"
            ));
        }
        Ok(Self {
            namespace: ns.to_string(),
            labels: labels.to_string(),
            port_name: port.filter(|p| !p.is_empty()),
        })
    }
}

/// The worker URLs (`http://address:port`) of the ready endpoints of `slices`.
pub fn urls(slices: &[EndpointSlice], port_name: Option<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in slices {
        let ports = s.ports.as_deref().unwrap_or_default();
        let port = match port_name {
            Some(n) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
            None => ports
                .iter()
                .find(|p| p.name.as_deref() == Some("grpc"))
                .or(ports.first()),
        }
        .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for e in s.endpoints.iter().flatten() {
            // Absent `ready` means ready (the API's convention); terminating endpoints are not.
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true)
                && !c.and_then(|c| c.terminating).unwrap_or(false);
            if !ready {
                continue;
            }
            for a in &e.addresses {
                let host = if s.address_type == "IPv6" {
                    format!("[{a}]")
                } else {
                    a.clone()
                };
                out.insert(format!("http://{host}:{port}"));
            }
        }
    }
    out
}

/// Brings the pool in line with `want`: adds what is new, removes what this discovery added
/// earlier and is gone. `known` is what it added so far.
pub async fn sync(pool: &Pool, known: &mut BTreeSet<String>, want: BTreeSet<String>) {
    for gone in known.difference(&want) {
        tracing::info!(worker = %gone, "worker left the EndpointSlices; removed");
        pool.remove(gone);
    }
    for new in want.difference(known) {
        match pool.add(new).await {
            Ok(_) => tracing::info!(worker = %new, "worker discovered"),
            Err(e) => tracing::warn!(worker = %new, error = %e, "cannot add a discovered worker"),
        }
    }
    *known = want;
}

/// Lists the slices every `every` and syncs the pool, until the pool is dropped. A failed
/// listing is logged and retried; the pool keeps what it has meanwhile.
pub fn spawn(
    client: kube::Client,
    pool: &Arc<Pool>,
    sel: SliceSelector,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(pool);
    tokio::spawn(async move {
        let api: Api<EndpointSlice> = Api::namespaced(client, &sel.namespace);
        let lp = ListParams::default().labels(&sel.labels);
        let mut known = BTreeSet::new();
        loop {
            let Some(pool) = weak.upgrade() else { return };
            match api.list(&lp).await {
                Ok(list) => {
                    let want = urls(&list.items, sel.port_name.as_deref());
                    sync(&pool, &mut known, want).await;
                }
                Err(e) => tracing::warn!(
                    namespace = %sel.namespace,
                    selector = %sel.labels,
                    error = %e,
                    "cannot list EndpointSlices; keeping the current workers"
                ),
            }
            drop(pool);
            tokio::time::sleep(every).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(
        kind: &str,
        ports: &[(&str, i32)],
        eps: &[(&str, Option<bool>, bool)],
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: kind.into(),
            endpoints: Some(
                eps.iter()
                    .map(|(a, ready, terminating)| Endpoint {
                        addresses: vec![a.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: None,
                            terminating: Some(*terminating),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_on_the_grpc_port_become_worker_urls() {
        let s = [
            slice(
                "IPv4",
                &[("metrics", 9090), ("grpc", 50051)],
                &[
                    ("10.0.0.1", Some(true), false),
                    ("10.0.0.2", None, false),
                    ("10.0.0.3", Some(false), false),
                    ("10.0.0.4", Some(true), true),
                ],
            ),
            slice("IPv6", &[("x", 7000)], &[("fd00::5", Some(true), false)]),
        ];
        let got: Vec<String> = urls(&s, None).into_iter().collect();
        assert_eq!(
            got,
            [
                "http://10.0.0.1:50051",
                "http://10.0.0.2:50051",
                "http://[fd00::5]:7000"
            ]
        );
        let by_name: Vec<String> = urls(&s, Some("metrics")).into_iter().collect();
        assert_eq!(by_name, ["http://10.0.0.1:9090", "http://10.0.0.2:9090"]);
    }

    #[test]
    fn selectors_parse_with_an_optional_port_name() {
        let s: SliceSelector = "dopd/app=decode,tier=x#grpc".parse().expect("valid");
        assert_eq!(
            (
                s.namespace.as_str(),
                s.labels.as_str(),
                s.port_name.as_deref()
            ),
            ("dopd", "app=decode,tier=x", Some("grpc"))
        );
        assert!("no-slash".parse::<SliceSelector>().is_err());
        assert!("/app=x".parse::<SliceSelector>().is_err());
    }

    #[tokio::test]
    async fn sync_adds_new_workers_and_removes_only_its_own_departed_ones() {
        let pool = Pool::new();
        // A statically configured worker the discovery must leave alone.
        pool.add("http://127.0.0.1:1").await.expect("added");
        let mut known = BTreeSet::new();
        let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        sync(
            &pool,
            &mut known,
            want(&["http://127.0.0.1:2", "http://127.0.0.1:3"]),
        )
        .await;
        let urls = |p: &Pool| {
            let mut v: Vec<String> = p.all().iter().map(|w| w.url.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(
            urls(&pool),
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
        sync(&pool, &mut known, want(&["http://127.0.0.1:3"])).await;
        assert_eq!(urls(&pool), ["http://127.0.0.1:1", "http://127.0.0.1:3"]);
    }

    #[tokio::test]
    async fn the_listing_goes_through_the_api_server_with_the_label_selector() {
        use axum::extract::{Path, RawQuery};
        // A fake API server answering the one list call.
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
            axum::routing::get(move |Path(ns): Path<String>, RawQuery(q): RawQuery| {
                let log = log.clone();
                async move {
                    if let Ok(mut l) = log.lock() {
                        l.push(format!("{ns}?{}", q.unwrap_or_default()));
                    }
                    axum::Json(serde_json::json!({
                        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                        "metadata": {"resourceVersion": "1"},
                        "items": [{
                            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                            "metadata": {"name": "decode-abc", "namespace": ns},
                            "addressType": "IPv4",
                            "endpoints": [{"addresses": ["127.0.0.1"],
                                           "conditions": {"ready": true}}],
                            "ports": [{"name": "grpc", "port": 50123, "protocol": "TCP"}]
                        }]
                    }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("port");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            kube::Client::try_from(kube::Config::new(url.parse().expect("uri"))).expect("client");
        let pool = Pool::new();
        let sel: SliceSelector = "serving/app=dopd-decode".parse().expect("selector");
        let task = spawn(client, &pool, sel, Duration::from_millis(50));
        let t = std::time::Instant::now();
        while pool.get("http://127.0.0.1:50123").is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "never discovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let q = seen.lock().map(|l| l[0].clone()).unwrap_or_default();
        assert!(q.starts_with("serving?"), "{q}");
        assert!(q.contains("labelSelector=app%3Ddopd-decode"), "{q}");
    }
}
