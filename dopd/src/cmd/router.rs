//! `dopd router`: the OpenAI-compatible front door over a static list of workers (`dopd up`, in
//! [`super::up`], runs it in front of workers of its own).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dopd_planner::routing::PrefillQueue;
use dopd_planner::slo::SloTargets;
use dopd_router::pool::Pool;
use dopd_router::schedule::ScheduleConfig;
use dopd_router::{Router, RouterConfig};

use super::worker::{DEFAULT_MODEL, shutdown_signal};

/// Settings shared by `dopd router` and `dopd up`.
#[derive(Debug, clap::Args)]
pub struct FrontArgs {
    /// The model file or HF directory (the router reads its tokenizer and context only).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// The model name clients send (default: the file's stem).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Requests admitted but not yet streaming before the router answers 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: the DOPD_API_KEY variable, if
    /// set). Several keys, comma-separated, are several clients, each with its own bound.
    #[arg(
        long,
        env = "DOPD_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,
    /// With API keys: most requests one key may have in flight at once; beyond it, 429 (0: no
    /// bound).
    #[arg(long, default_value_t = 64)]
    pub max_streams_per_key: usize,
    /// Prompts up to this many tokens are prefilled on the decode worker (no KV transfer). Under
    /// `dopd up`'s planner (policy `dopd`) this is the starting value: the planner replaces it
    /// with one derived from the profile and the decode load.
    #[arg(long, default_value_t = 32)]
    pub ultra_short_max_isl: u32,
    /// A short batch is sent once it holds this many prompt tokens...
    #[arg(long, default_value_t = 8192)]
    pub batch_token_cap: u32,
    /// ... or once its oldest request waited this long.
    #[arg(long, default_value = "50ms")]
    pub batch_wait_cap: String,
    /// Deadline for a decode worker's KV pull before it recomputes the prompt.
    #[arg(long, default_value = "5s")]
    pub kv_transfer_deadline: String,
    /// Where prefill work waits for a free prefill worker: `shared` (in the router, earliest
    /// feasible TTFT deadline first, paced by room on the decode workers), `shared-fifo` (in the
    /// router, oldest first) or `per-instance` (sent on arrival to the least-loaded worker and
    /// queued there).
    #[arg(long, default_value = "shared", value_parser = parse_prefill_queue)]
    pub prefill_queue: PrefillQueue,
    /// TTFT SLO, seconds: the deadlines of the shared prefill queue, and what `dopd up`'s
    /// planner sizes for (default 2 s).
    #[arg(long)]
    pub slo_ttft: Option<f64>,
    /// Per-prompt-token TTFT allowance, seconds per token: the SLO becomes
    /// `slo_ttft + slo_ttft_per_token * ISL` (default 0).
    #[arg(long)]
    pub slo_ttft_per_token: Option<f64>,
    /// Time-per-output-token SLO, seconds: paces the shared prefill queue, and `dopd up`'s
    /// planner sizes for it (default 0.08 s).
    #[arg(long)]
    pub slo_tpot: Option<f64>,
    /// How often every worker's Health and Stats are read.
    #[arg(long, default_value = "1s")]
    pub health_interval: String,
}

fn parse_prefill_queue(s: &str) -> Result<PrefillQueue, String> {
    s.parse()
}

impl FrontArgs {
    /// The SLOs given (the defaults for the rest).
    pub fn slo(&self) -> anyhow::Result<SloTargets> {
        let mut slo = SloTargets::default();
        for (name, v, field) in [
            ("--slo-ttft", self.slo_ttft, &mut slo.ttft_s),
            (
                "--slo-ttft-per-token",
                self.slo_ttft_per_token,
                &mut slo.ttft_per_token_s,
            ),
            ("--slo-tpot", self.slo_tpot, &mut slo.tpot_s),
        ] {
            if let Some(v) = v {
                anyhow::ensure!(
                    v.is_finite() && v >= 0.0,
                    "{name} must be a non-negative number of seconds, got {v}"
                );
                *field = v;
            }
        }
        anyhow::ensure!(
            slo.ttft_s > 0.0 && slo.tpot_s > 0.0,
            "--slo-ttft and --slo-tpot must be positive"
        );
        Ok(slo)
    }
}

#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    pub front: FrontArgs,
    /// A worker's gRPC URL (repeat, or comma-separate); more can be registered with
    /// `POST /v1/dopd/workers`.
    #[arg(long = "worker", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Discover workers from Kubernetes EndpointSlices: NAMESPACE/LABEL_SELECTOR[#PORT_NAME]
    /// (repeatable; the port named `grpc` by default). Uses the in-cluster service account or
    /// the kubeconfig.
    #[arg(long = "discover")]
    pub discover: Vec<dopd_router::discovery::SliceSelector>,
    /// How often EndpointSlices are listed.
    #[arg(long, default_value = "5s")]
    pub discover_interval: String,
}

pub(super) fn build_router(f: &FrontArgs, pool: Arc<Pool>) -> anyhow::Result<Arc<Router>> {
    let (tokenizer, config, name) = dopd_model::load_tokenizer(&f.model)
        .with_context(|| format!("reading the tokenizer of {}", f.model.display()))?;
    let routing = dopd_planner::routing::RoutingConfig {
        ultra_short_max_isl: f.ultra_short_max_isl,
        batch_token_cap: f.batch_token_cap,
        batch_wait_cap_s: super::parse_duration_s(&f.batch_wait_cap).context("--batch-wait-cap")?,
        ..Default::default()
    };
    let cfg = RouterConfig {
        model: f.served_model_name.clone().unwrap_or(name),
        context: config.context,
        max_waiting: f.max_waiting.max(1),
        api_keys: f
            .api_key
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect(),
        max_streams_per_key: f.max_streams_per_key,
        schedule: ScheduleConfig {
            routing,
            transfer_deadline: Duration::from_secs_f64(
                super::parse_duration_s(&f.kv_transfer_deadline)
                    .context("--kv-transfer-deadline")?,
            ),
            prefill_queue: f.prefill_queue,
            slo: f.slo()?,
            ..Default::default()
        },
    };
    Ok(Router::new(cfg, tokenizer, pool))
}

/// `dopd router`.
pub fn router(a: RouterArgs) -> anyhow::Result<()> {
    let health = super::parse_duration_s(&a.front.health_interval).context("--health-interval")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let pool = Pool::new();
        for w in &a.workers {
            pool.add(w).await.map_err(anyhow::Error::msg)?;
        }
        pool.spawn_health_loop(Duration::from_secs_f64(health.max(0.05)));
        if !a.discover.is_empty() {
            let every =
                super::parse_duration_s(&a.discover_interval).context("--discover-interval")?;
            let client = kube::Client::try_default()
                .await
                .context("--discover: no Kubernetes configuration (in-cluster or kubeconfig)")?;
            for sel in &a.discover {
                dopd_router::discovery::spawn(
                    client.clone(),
                    &pool,
                    sel.clone(),
                    Duration::from_secs_f64(every.max(0.5)),
                );
            }
        }
        let r = build_router(&a.front, pool)?;
        let listener = tokio::net::TcpListener::bind(&a.front.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.front.listen))?;
        println!(
            "dopd router: serving {} on http://{} ({} workers)",
            r.cfg.model,
            listener.local_addr()?,
            a.workers.len()
        );
        std::io::stdout().flush()?;
        dopd_router::serve(listener, r, shutdown_signal()).await?;
        eprintln!("dopd router: stopped");
        anyhow::Ok(())
    })
}
