//! The operator process: leader election, the controller, and `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::{Controller, watcher};
use kube::{Client, Config};

use crate::control::{HttpRouter, SystemClock};
use crate::crd::DopdService;
use crate::lease::{self, LeaseSettings, Round};
use crate::metrics::Metrics;
use crate::reconcile::{self, Ctx, Settings};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch one namespace (`None`: all).
    pub namespace: Option<String>,
    /// Router URL template (`{name}`, `{namespace}`, `{port}`).
    pub router_url: String,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Leader election (`None`: this replica reconciles alone).
    pub lease: Option<LeaseSettings>,
}

async fn serve_http(listen: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let m2 = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move { dopd_protocol::openmetrics(m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let m = m2.clone();
                async move {
                    if m.api_ok.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the API server has not answered yet",
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--metrics-listen)"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(addr)
}

/// Runs until Ctrl-C / SIGTERM, or until leadership is lost (then returns an error so the pod
/// restarts and stands as a candidate again).
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let config = Config::infer().await.context(
        "no Kubernetes configuration: run in a cluster, or set KUBECONFIG / ~/.kube/config",
    )?;
    tracing::info!(server = %config.cluster_url, "connecting to the API server");
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    let metrics = Arc::new(Metrics::default());
    let addr = serve_http(opts.metrics_listen, metrics.clone()).await?;
    println!("dopd operator: metrics, healthz and readyz on http://{addr}");

    // The CRD must be installed.
    let svcs: Api<DopdService> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match svcs.list(&ListParams::default().limit(1)).await {
        Ok(_) => metrics.api_ok.store(true, Ordering::Relaxed),
        Err(kube::Error::Api(s)) if s.is_not_found() => anyhow::bail!(
            "the DopdService CRD is not installed: kubectl apply -f crds/dopdservice.yaml (or `dopd crd | kubectl apply -f -`)"
        ),
        Err(e) => return Err(e).context("listing DopdServices"),
    }

    // Leader election.
    let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
    if let Some(ls) = opts.lease.clone() {
        let api: Api<Lease> = Api::namespaced(client.clone(), &ls.namespace);
        let mut said = String::new();
        loop {
            match lease::round(&api, &ls, Timestamp::now()).await {
                Ok(Round::Leader) => break,
                Ok(Round::Follower { holder }) => {
                    metrics.api_ok.store(true, Ordering::Relaxed);
                    if said != holder {
                        println!(
                            "dopd operator: standing by; {holder} leads (Lease {}/{})",
                            ls.namespace, ls.name
                        );
                        said = holder;
                    }
                }
                Err(e) => {
                    metrics.api_ok.store(false, Ordering::Relaxed);
                    tracing::warn!("leader election: {e}");
                }
            }
            tokio::time::sleep(ls.renew).await;
        }
        println!("dopd operator: leading as {}", ls.identity);
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(ls.renew).await;
                match lease::round(&api, &ls, Timestamp::now()).await {
                    Ok(Round::Leader) => {
                        last_ok = tokio::time::Instant::now();
                        m.api_ok.store(true, Ordering::Relaxed);
                    }
                    Ok(Round::Follower { holder }) => {
                        tracing::error!("lost the Lease to {holder}");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        m.api_ok.store(false, Ordering::Relaxed);
                        tracing::warn!("renewing the Lease: {e}");
                        // Stop before another candidate may take over.
                        if last_ok.elapsed() + ls.renew >= ls.duration {
                            tracing::error!("could not renew the Lease in time");
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
    } else {
        println!("dopd operator: leader election off; reconciling");
    }
    metrics.leader.set(1);

    let ctx = Arc::new(Ctx::new(
        client.clone(),
        Arc::new(HttpRouter::new(&opts.router_url)),
        Arc::new(SystemClock::default()),
        metrics.clone(),
        Settings::default(),
    ));
    let deployments: Api<Deployment> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let controller = Controller::new(svcs, watcher::Config::default())
        .owns(
            deployments,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=dopd-operator"),
        )
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(service = %obj.name, "reconciled"),
                Err(e) => tracing::debug!("reconcile: {e}"),
            }
        });
    tokio::select! {
        () = controller => {
            println!("dopd operator: stopped");
            Ok(())
        }
        _ = lost_rx.wait_for(|l| *l) => {
            metrics.leader.set(0);
            anyhow::bail!("lost leadership; exiting so a fresh start can stand as a candidate")
        }
    }
}

/// Default Lease timing: valid 15 s (as client-go), renewed every 5 s.
pub fn default_lease(namespace: &str, identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: "dopd-operator".into(),
        namespace: namespace.into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        renew: Duration::from_secs(5),
    }
}
