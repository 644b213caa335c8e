//! `dopd router`: the OpenAI-compatible front door over a static list of workers; and
//! `dopd up`: the whole system on one machine — the router, prefill and decode worker processes
//! on loopback, and the planner loop resizing them through a local-process actuator.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dopd_planner::planner::{Observation, Planner, PlannerConfig, ReplicaState};
use dopd_planner::profile::PerRole;
use dopd_router::pool::{Pool, WorkerRole};
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
    /// Require `Authorization: Bearer KEY` on /v1/* (default: the DOPD_API_KEY variable, if set).
    #[arg(long, env = "DOPD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Prompts up to this many tokens are prefilled on the decode worker (no KV transfer).
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
    /// How often every worker's Health and Stats are read.
    #[arg(long, default_value = "1s")]
    pub health_interval: String,
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

fn build_router(f: &FrontArgs, pool: Arc<Pool>) -> anyhow::Result<Arc<Router>> {
    let (tokenizer, config, name) = dopd_worker::service::load_tokenizer(&f.model)
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
        api_key: f.api_key.clone().filter(|k| !k.is_empty()),
        schedule: ScheduleConfig {
            routing,
            transfer_deadline: Duration::from_secs_f64(
                super::parse_duration_s(&f.kv_transfer_deadline)
                    .context("--kv-transfer-deadline")?,
            ),
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

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub front: FrontArgs,
    /// Prefill workers at start.
    #[arg(long, default_value_t = 1)]
    pub prefill: u32,
    /// Decode workers at start.
    #[arg(long, default_value_t = 1)]
    pub decode: u32,
    /// Most workers the planner may run (the local stand-in for the GPU budget).
    #[arg(long, default_value_t = 4)]
    pub max_workers: u32,
    /// Planning interval.
    #[arg(long, default_value = "10s")]
    pub interval: String,
    /// Keep the starting counts (no planner).
    #[arg(long)]
    pub no_planner: bool,
    /// Performance profile for the planner (YAML/JSON); without it, --preset.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    #[arg(long, default_value = "smollm2-135m-cpu")]
    pub preset: String,
    /// KV blocks per worker (16 tokens each).
    #[arg(long, default_value_t = 512)]
    pub kv_blocks: usize,
    /// Extra arguments for every worker (e.g. "--device cuda"), split on spaces.
    #[arg(long, default_value = "")]
    pub worker_args: String,
}

/// A worker process started by `dopd up`.
struct Proc {
    child: Child,
    url: String,
    role: WorkerRole,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local-process actuator: starts worker processes and drains then stops them.
struct Local {
    model: PathBuf,
    kv_blocks: usize,
    extra: Vec<String>,
    procs: Vec<Proc>,
}

impl Local {
    fn count(&self, role: WorkerRole) -> u32 {
        self.procs.iter().filter(|p| p.role == role).count() as u32
    }

    /// Starts a worker and waits for its banner (its address).
    fn start(&mut self, role: WorkerRole) -> anyhow::Result<String> {
        let role_s = match role {
            WorkerRole::Prefill => "prefill",
            WorkerRole::Decode => "decode",
            _ => "mixed",
        };
        let exe = std::env::current_exe().context("finding the dopd binary")?;
        let mut child = Command::new(exe)
            .args(["worker", "--role", role_s, "--listen", "127.0.0.1:0"])
            .arg("--model")
            .arg(&self.model)
            .args(["--kv-blocks", &self.kv_blocks.to_string()])
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a worker process")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("worker stdout")?)
            .read_line(&mut line)
            .context("reading the worker's banner")?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .filter(|a| a.contains(':'));
        let Some(addr) = addr else {
            let _ = child.kill();
            bail!(
                "the {role_s} worker did not start (its output: {line:?}); try `dopd worker --role {role_s}` to see why"
            );
        };
        let url = format!("http://{addr}");
        self.procs.push(Proc {
            child,
            url: url.clone(),
            role,
        });
        Ok(url)
    }
}

/// `dopd up`.
pub fn up(a: UpArgs) -> anyhow::Result<()> {
    if a.prefill + a.decode > a.max_workers || a.decode == 0 {
        bail!("need at least one decode worker and --prefill + --decode <= --max-workers");
    }
    let interval = super::parse_duration_s(&a.interval).context("--interval")?;
    let health = super::parse_duration_s(&a.front.health_interval).context("--health-interval")?;
    let profile = super::load_profile(a.profile.as_deref(), &a.preset)?;
    let mut pcfg = PlannerConfig::default();
    pcfg.sizing.gpu_budget = a.max_workers * profile.gpus.prefill.max(profile.gpus.decode);
    let mut planner = Planner::new(profile, pcfg).context("planner settings")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let pool = Pool::new();
        let r = build_router(&a.front, pool.clone())?;
        let mut local = Local {
            model: a.front.model.clone(),
            kv_blocks: a.kv_blocks,
            extra: a.worker_args.split_whitespace().map(String::from).collect(),
            procs: Vec::new(),
        };
        eprintln!(
            "dopd up: starting {} prefill and {} decode workers with {}",
            a.prefill,
            a.decode,
            a.front.model.display()
        );
        for (role, n) in [(WorkerRole::Prefill, a.prefill), (WorkerRole::Decode, a.decode)] {
            for _ in 0..n {
                let url = local.start(role)?;
                pool.add(&url).await.map_err(anyhow::Error::msg)?;
            }
        }
        pool.spawn_health_loop(Duration::from_secs_f64(health.max(0.05)));
        let listener = tokio::net::TcpListener::bind(&a.front.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.front.listen))?;
        let addr = listener.local_addr()?;
        println!(
            "dopd up: serving {} on http://{addr}/v1 (OpenAI API); Ctrl-C stops",
            r.cfg.model
        );
        std::io::stdout().flush()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_server = stop_rx.clone();
        let server = tokio::spawn(dopd_router::serve(listener, r.clone(), async move {
            let _ = stop_server.changed().await;
        }));
        let t0 = Instant::now();
        let tty = std::io::stderr().is_terminal();
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(interval.max(0.5)));
        ticker.tick().await;
        let sig = shutdown_signal();
        tokio::pin!(sig);
        loop {
            tokio::select! {
                () = &mut sig => break,
                _ = ticker.tick() => {}
            }
            let report = r.take_load();
            let replicas = PerRole {
                prefill: ReplicaState {
                    ready: count_ready(&pool, WorkerRole::Prefill),
                    pending: 0,
                },
                decode: ReplicaState {
                    ready: count_ready(&pool, WorkerRole::Decode),
                    pending: 0,
                },
            };
            let obs: Observation = report.observation(replicas);
            let now = t0.elapsed().as_secs_f64();
            let decision = planner.tick(now, &obs);
            if let Some(f) = &decision.forecast
                && f.isl.point.is_finite()
            {
                r.scheduler.set_forecast_mean_isl(f.isl.point);
            }
            if !a.no_planner
                && let Err(e) = apply(&mut local, &pool, decision.target).await
            {
                eprintln!("\ndopd up: scaling failed: {e:#}");
            }
            let (p, d) = (local.count(WorkerRole::Prefill), local.count(WorkerRole::Decode));
            let fc = decision
                .forecast
                .as_ref()
                .map(|f| format!("{:.0} req, ISL {:.0}, OSL {:.0}", f.requests.point, f.isl.point, f.osl.point))
                .unwrap_or_else(|| "-".into());
            let line = format!(
                "dopd up: {p} prefill : {d} decode (ratio {:.2}) | last {:.0}s: {} req, ISL {}, OSL {}, TTFT p50 {} | next: {fc}",
                f64::from(p) / f64::from(d.max(1)),
                report.interval_s,
                report.requests,
                report.mean_isl.map_or("-".into(), |v| format!("{v:.0}")),
                report.mean_osl.map_or("-".into(), |v| format!("{v:.0}")),
                report.ttft_s.map_or("-".into(), |q| format!("{:.0} ms", q.p50 * 1e3)),
            );
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
        }
        eprintln!("\ndopd up: stopping");
        let _ = stop_tx.send(true);
        let _ = server.await;
        let all: Vec<String> = local.procs.iter().map(|p| p.url.clone()).collect();
        pool.drain(&all).await;
        drop(local);
        eprintln!("dopd up: stopped");
        anyhow::Ok(())
    })
}

fn count_ready(pool: &Pool, role: WorkerRole) -> u32 {
    pool.all()
        .iter()
        .filter(|w| w.role() == role && w.healthy() && !w.draining())
        .count() as u32
}

/// Moves the local workers toward `target`: starts what is missing; drains the surplus (least
/// in-flight first), waits (up to 30 s) for their requests to finish, then stops them.
async fn apply(
    local: &mut Local,
    pool: &Arc<Pool>,
    target: dopd_planner::sizing::Replicas,
) -> anyhow::Result<()> {
    for (role, want) in [
        (WorkerRole::Prefill, target.prefill),
        (WorkerRole::Decode, target.decode.max(1)),
    ] {
        let have = local.count(role);
        for _ in have..want {
            let url = local.start(role)?;
            pool.add(&url).await.map_err(anyhow::Error::msg)?;
        }
        if have > want {
            let mut mine: Vec<(usize, String)> = local
                .procs
                .iter()
                .filter(|p| p.role == role)
                .map(|p| (pool.get(&p.url).map_or(0, |w| w.in_flight()), p.url.clone()))
                .collect();
            mine.sort();
            let victims: Vec<String> = mine
                .into_iter()
                .take((have - want) as usize)
                .map(|(_, u)| u)
                .collect();
            pool.drain(&victims).await;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30)
                && victims
                    .iter()
                    .any(|u| pool.get(u).is_some_and(|w| w.in_flight() > 0))
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for u in &victims {
                pool.remove(u);
            }
            local.procs.retain(|p| !victims.contains(&p.url));
        }
    }
    Ok(())
}
