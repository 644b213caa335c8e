//! `dopd operator` (the Kubernetes controller) and `dopd crd` (the CRD it serves).

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args as ClapArgs, ValueEnum};
use dopd_operator::control::DEFAULT_ROUTER_URL;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DOPD_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Where each DopdService's router answers; `{name}`, `{namespace}` and `{port}` are filled in.
    #[arg(long, default_value = DEFAULT_ROUTER_URL)]
    pub router_url: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Elect a leader through a Lease so several replicas can run (only the leader reconciles).
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: the pod name or host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter (`info`, `dopd_operator=debug,kube=info`, ...).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

/// `dopd operator`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&a.log)
        .with_context(|| format!("--log {:?} is not a valid filter", a.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match a.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let identity = a.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("dopd-operator-{}", std::process::id()))
    });
    let lease = a.leader_elect.then(|| {
        dopd_operator::run::default_lease(
            a.lease_namespace.as_deref().unwrap_or("default"),
            &identity,
        )
    });
    let opts = dopd_operator::run::Options {
        namespace: a.namespace,
        router_url: a.router_url,
        metrics_listen: a.metrics_listen,
        lease,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(dopd_operator::run::run(opts))
}

/// `dopd crd`.
pub fn crd() -> anyhow::Result<()> {
    print!("{}", dopd_operator::crd::crd_yaml());
    Ok(())
}
