//! `dopd up`: the whole system on one machine — the router in this process, prefill and decode
//! worker processes on loopback, and the shared control loop (`dopd_planner::control`, the one
//! the operator and the simulator run) resizing them through a local-process actuator.
//!
//! Nothing blocks the loop: workers start, drain and stop on tasks of their own (`tokio::process`),
//! and the loop sees them through their state (starting, ready, draining) at its next step.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dopd_planner::control::{
    Actuator, ControlConfig, Controller, Instance, InstanceState, Snapshot, TickReport,
};
use dopd_planner::planner::{Planner, PlannerConfig, PolicyKind};
use dopd_planner::profile::{PerRole, Role};
use dopd_planner::sizing::Replicas;
use dopd_router::Router;
use dopd_router::pool::Pool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::router::{FrontArgs, build_router};
use super::worker::shutdown_signal;

/// Compute threads each CPU worker started here uses (the size of its thread pool, set through
/// `RAYON_NUM_THREADS` unless that is set already). A standalone `dopd worker` uses every core;
/// workers started side by side would fight over them, so the default budget runs one worker
/// per core, each on one thread.
pub const CPU_WORKER_THREADS: usize = 1;

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
    /// Most workers the planner may run at once (the local stand-in for the GPU budget).
    /// Default: as many as this machine runs side by side without slowing each other — one per
    /// core on CPU (a worker computes on one thread), at least 2; 2 with `--device cuda`.
    #[arg(long)]
    pub max_workers: Option<u32>,
    /// Planning interval.
    #[arg(long, default_value = "10s")]
    pub interval: String,
    /// Keep the starting counts (the planner still reports every interval).
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
    /// Extra arguments for every worker (e.g. "--device cuda" or --int8-activations), split on
    /// spaces.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub worker_args: String,
}

/// Workers a machine with `cores` cores runs side by side when each computes on `threads`
/// threads: more would share cores and slow every one of them. At least one prefill and one
/// decode worker.
pub fn worker_budget(cores: usize, threads: usize) -> u32 {
    u32::try_from(cores / threads.max(1)).map_or(u32::MAX, |n| n.max(2))
}

fn default_budget(worker_args: &str) -> u32 {
    if worker_args.split_whitespace().any(|a| a == "cuda") {
        // One GPU, shared: a prefill and a decode worker.
        return 2;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    worker_budget(cores, CPU_WORKER_THREADS)
}

/// Where a worker process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Started; its address not known yet.
    Launching,
    /// Registered with the router (ready once the router's health check says so).
    Up,
    Draining,
}

/// A worker process started by `dopd up`.
struct Proc {
    id: String,
    role: Role,
    phase: Phase,
    url: Option<String>,
    created: f64,
    /// Tells its supervising task to stop it.
    stop: Option<oneshot::Sender<()>>,
}

/// The worker processes, shared by the loop and the tasks that start and stop them.
struct Fleet {
    exe: PathBuf,
    model: PathBuf,
    kv_blocks: usize,
    extra: Vec<String>,
    pool: Arc<Pool>,
    router: Arc<Router>,
    procs: Mutex<Vec<Proc>>,
    /// Lines for the console (starts, exits, failures), printed by the loop.
    notices: mpsc::UnboundedSender<String>,
    t0: Instant,
    next: Mutex<u64>,
}

impl Fleet {
    fn with_procs<T>(&self, f: impl FnOnce(&mut Vec<Proc>) -> T) -> T {
        match self.procs.lock() {
            Ok(mut p) => f(&mut p),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn notice(&self, line: String) {
        let _ = self.notices.send(line);
    }

    /// The workers as the control loop sees them.
    fn instances(&self) -> Vec<Instance> {
        self.with_procs(|procs| {
            procs
                .iter()
                .map(|p| {
                    let entry = p.url.as_ref().and_then(|u| self.pool.get(u));
                    let state = match (p.phase, &entry) {
                        (Phase::Draining, _) => InstanceState::Draining,
                        (Phase::Up, Some(w)) if w.draining() => InstanceState::Draining,
                        (Phase::Up, Some(w)) if w.healthy() => InstanceState::Ready,
                        _ => InstanceState::Starting,
                    };
                    let mut inst = Instance {
                        id: p.id.clone(),
                        role: p.role,
                        state,
                        in_flight: Some(0),
                        work: 0.0,
                        queued: 0,
                        kv_usage: None,
                        created: p.created,
                    };
                    if let Some(w) = entry {
                        dopd_protocol::load::fill_instance(&mut inst, &dopd_router::pool::view(&w));
                    }
                    inst
                })
                .collect()
        })
    }

    /// Starts one worker of `role` on a task of its own, which then supervises it: it registers
    /// the worker with the router once it prints its address, and stops it when told to.
    fn launch(self: &Arc<Self>, role: Role) {
        let id = {
            let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            format!("{role}-{n}")
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        self.with_procs(|procs| {
            procs.push(Proc {
                id: id.clone(),
                role,
                phase: Phase::Launching,
                url: None,
                created: self.t0.elapsed().as_secs_f64(),
                stop: Some(stop_tx),
            });
        });
        let me = self.clone();
        tokio::spawn(async move {
            me.keep_running(&id, role, stop_rx).await;
            me.forget(&id);
        });
    }

    /// Runs worker `id` until told to stop, as a Deployment would: a worker that exits
    /// unexpectedly after it came up is restarted, after 1 s, then 2, 4, ... up to 30 s while it
    /// keeps failing within a minute of its start; it counts as starting meanwhile, never as
    /// capacity. One that cannot start at all (a bad model, a bad argument) is reported and not
    /// restarted, and one that exits while draining was leaving anyway.
    async fn keep_running(&self, id: &str, role: Role, mut stop: oneshot::Receiver<()>) {
        let mut restarts = 0u32;
        loop {
            let started = Instant::now();
            let why = match self.supervise(id, role, &mut stop).await {
                Ok(None) => return,
                Ok(Some(why)) => why,
                Err(e) => {
                    self.notice(format!("dopd up: {id}: {e:#}"));
                    return;
                }
            };
            // Out of the router's rotation while it is down.
            let (leaving, url) =
                self.with_procs(|procs| match procs.iter_mut().find(|p| p.id == id) {
                    Some(p) if p.phase != Phase::Draining => {
                        p.phase = Phase::Launching;
                        (false, p.url.take())
                    }
                    Some(p) => (true, p.url.take()),
                    None => (true, None),
                });
            if let Some(u) = &url {
                self.pool.remove(u);
            }
            if leaving {
                self.notice(format!("dopd up: {id}: {why} while draining"));
                return;
            }
            if started.elapsed() > Duration::from_secs(60) {
                restarts = 0;
            }
            let backoff = Duration::from_secs(1 << restarts.min(5)).min(Duration::from_secs(30));
            restarts += 1;
            self.notice(format!(
                "dopd up: {id}: {why}; restarting it in {} s (restart {restarts})",
                backoff.as_secs()
            ));
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = &mut stop => return,
            }
        }
    }

    fn forget(&self, id: &str) {
        let url = self.with_procs(|procs| {
            let url = procs
                .iter()
                .find(|p| p.id == id)
                .and_then(|p| p.url.clone());
            procs.retain(|p| p.id != id);
            url
        });
        if let Some(u) = url {
            self.pool.remove(&u);
        }
    }

    /// Starts worker `id` and waits: `Ok(None)` once told to stop (it is killed), `Ok(Some(why))`
    /// when it exited by itself after it came up, `Err` when it did not come up.
    async fn supervise(
        &self,
        id: &str,
        role: Role,
        stop: &mut oneshot::Receiver<()>,
    ) -> anyhow::Result<Option<String>> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", CPU_WORKER_THREADS.to_string());
        }
        let mut child = cmd
            .args(["worker", "--role", role.as_str(), "--listen", "127.0.0.1:0"])
            .arg("--model")
            .arg(&self.model)
            .args(["--kv-blocks", &self.kv_blocks.to_string()])
            .args(&self.extra)
            // The worker exits when this pipe closes: when this process ends, however it ends.
            .arg("--exit-with-stdin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let _stdin = child.stdin.take();
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::select! {
            line = lines.next_line() => line.context("reading the worker's banner")?,
            _ = &mut *stop => {
                let _ = child.kill().await;
                return Ok(None);
            }
        };
        let addr = banner
            .as_deref()
            .and_then(|l| l.split("listening on ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .filter(|a| a.contains(':'));
        let Some(addr) = addr else {
            let _ = child.kill().await;
            bail!(
                "the {role} worker did not start (its output: {banner:?}); try `dopd worker --role {role}` to see why"
            );
        };
        let url = format!("http://{addr}");
        self.pool.add(&url).await.map_err(anyhow::Error::msg)?;
        self.with_procs(|procs| {
            if let Some(p) = procs.iter_mut().find(|p| p.id == id) {
                p.url = Some(url.clone());
                p.phase = Phase::Up;
            }
        });
        tokio::select! {
            status = child.wait() => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                Ok(Some(format!("the worker at {url} exited unexpectedly ({status})")))
            }
            _ = &mut *stop => {
                let _ = child.kill().await;
                Ok(None)
            }
        }
    }

    fn ids_of(&self, ids: &[String]) -> Vec<(String, Option<String>)> {
        self.with_procs(|procs| {
            procs
                .iter()
                .filter(|p| ids.contains(&p.id))
                .map(|p| (p.id.clone(), p.url.clone()))
                .collect()
        })
    }
}

/// The local-process actuator: nothing here waits; processes start and stop on their own tasks.
struct Local(Arc<Fleet>);

impl Actuator for Local {
    fn set_count(&mut self, role: Role, serving: u32, _draining: u32) {
        let have = self.0.with_procs(|procs| {
            procs
                .iter()
                .filter(|p| p.role == role && p.phase != Phase::Draining && p.stop.is_some())
                .count() as u32
        });
        for _ in have..serving {
            self.0.launch(role);
        }
    }

    fn drain(&mut self, _role: Role, ids: &[String]) {
        let targets = self.0.ids_of(ids);
        self.0.with_procs(|procs| {
            for p in procs.iter_mut().filter(|p| ids.contains(&p.id)) {
                p.phase = Phase::Draining;
            }
        });
        let urls: Vec<String> = targets.into_iter().filter_map(|(_, u)| u).collect();
        // The router stops routing to them at once; the workers hear it on this task.
        for u in &urls {
            if let Some(w) = self.0.pool.get(u) {
                w.set_draining();
            }
        }
        let pool = self.0.pool.clone();
        tokio::spawn(async move {
            pool.drain(&urls).await;
        });
    }

    fn retire(&mut self, _role: Role, ids: &[String]) {
        self.0.with_procs(|procs| {
            for p in procs.iter_mut().filter(|p| ids.contains(&p.id)) {
                if let Some(stop) = p.stop.take() {
                    let _ = stop.send(());
                }
            }
        });
    }

    fn set_routing_threshold(&mut self, isl: f64) {
        self.0.router.scheduler.set_forecast_mean_isl(isl);
    }

    fn set_bypass_threshold(&mut self, max_isl: u32) {
        self.0.router.scheduler.set_ultra_short_max_isl(max_isl);
    }
}

fn status_line(t: &TickReport, budget: u32) -> String {
    let o = &t.observation;
    let r = &o.replicas;
    let target = t.decision.target;
    let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0}", v * 1e3));
    let next = t.decision.forecast.as_ref().map_or("-".into(), |f| {
        format!(
            "{:.0} req, ISL {:.0}, OSL {:.0}",
            f.requests.point, f.isl.point, f.osl.point
        )
    });
    format!(
        "dopd up: t={:.0}s ready {}:{} (target {}:{}, ratio {:.2}, budget {budget}) | last {:.1}s: {} req, ISL {}, OSL {}, TTFT {}/{} ms (mean/p90) | next: {next}",
        t.at,
        r.prefill.ready,
        r.decode.ready,
        target.prefill,
        target.decode,
        f64::from(target.prefill) / f64::from(target.decode.max(1)),
        o.interval_s,
        o.requests,
        num(o.mean_isl),
        num(o.mean_osl),
        ms(o.ttft_s),
        ms(o.ttft_p90_s),
    )
}

/// The planner settings of `dopd up`.
fn planner_config(a: &UpArgs, budget: u32, gpus: PerRole<u32>) -> PlannerConfig {
    let mut c = PlannerConfig::default();
    c.sizing.gpu_budget = budget.saturating_mul(gpus.prefill.max(gpus.decode));
    if let Some(t) = a.front.slo_ttft {
        c.slo.ttft_s = t;
        c.sla.ttft_s = t;
    }
    if let Some(k) = a.front.slo_ttft_per_token {
        c.slo.ttft_per_token_s = k;
    }
    if let Some(t) = a.front.slo_tpot {
        c.slo.tpot_s = t;
        c.sla.itl_s = t;
    }
    let routing = dopd_planner::routing::RoutingConfig {
        ultra_short_max_isl: a.front.ultra_short_max_isl,
        ..Default::default()
    };
    c.follow_routing(&routing, true);
    c.follow_prefill_queue(a.front.prefill_queue);
    if a.no_planner {
        c.policy = PolicyKind::Static;
        c.static_replicas = PerRole {
            prefill: a.prefill,
            decode: a.decode,
        };
    }
    c
}

/// Starts the initial workers and waits until the router sees them serving.
async fn start_fleet(fleet: &Arc<Fleet>, initial: Replicas) -> anyhow::Result<()> {
    let mut local = Local(fleet.clone());
    local.set_count(Role::Prefill, initial.prefill, 0);
    local.set_count(Role::Decode, initial.decode, 0);
    let want = (initial.prefill + initial.decode) as usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let insts = fleet.instances();
        if insts.len() < want {
            bail!("a worker did not start (see above)");
        }
        if insts.iter().all(|i| i.state == InstanceState::Ready) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the workers did not become ready within 300 s");
        }
        fleet.pool.probe_all().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dopd up`.
pub fn up(a: UpArgs) -> anyhow::Result<()> {
    let budget = a
        .max_workers
        .unwrap_or_else(|| default_budget(&a.worker_args));
    let initial_workers = a.prefill.saturating_add(a.decode);
    if a.prefill == 0 || a.decode == 0 || initial_workers > budget {
        bail!(
            "need at least one prefill and one decode worker, and --prefill + --decode ({}) within the worker budget ({budget}; --max-workers)",
            initial_workers
        );
    }
    let interval = super::parse_duration_s(&a.interval).context("--interval")?;
    let profile = super::load_profile(a.profile.as_deref(), &a.preset)?;
    let pcfg = planner_config(&a, budget, profile.gpus);
    let initial = PerRole {
        prefill: a.prefill,
        decode: a.decode,
    };
    let ccfg = ControlConfig {
        interval_s: interval.max(0.5),
        drain_timeout_s: 30.0,
        headroom: false,
        paused: false,
    };
    let ctrl = Controller::new(
        Planner::new(profile, pcfg).context("planner settings")?,
        ccfg,
        initial,
    );
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(run(a, ctrl, budget))
}

/// Clears the status line on a terminal before a line of its own.
fn clear(tty: bool) -> &'static str {
    if tty { "\r\x1b[2K" } else { "" }
}

async fn run(a: UpArgs, mut ctrl: Controller, budget: u32) -> anyhow::Result<()> {
    let health = super::parse_duration_s(&a.front.health_interval).context("--health-interval")?;
    let pool = Pool::new();
    let router = build_router(&a.front, pool.clone())?;
    let (notices, mut notes) = mpsc::unbounded_channel();
    let fleet = Arc::new(Fleet {
        exe: std::env::current_exe().context("finding the dopd binary")?,
        model: a.front.model.clone(),
        kv_blocks: a.kv_blocks,
        extra: a.worker_args.split_whitespace().map(String::from).collect(),
        pool: pool.clone(),
        router: router.clone(),
        procs: Mutex::new(Vec::new()),
        notices,
        t0: Instant::now(),
        next: Mutex::new(0),
    });
    eprintln!(
        "dopd up: starting {} prefill and {} decode workers with {} (budget {budget} workers)",
        a.prefill,
        a.decode,
        a.front.model.display()
    );
    let started = start_fleet(&fleet, ctrl.target()).await;
    while let Ok(n) = notes.try_recv() {
        eprintln!("{n}");
    }
    started?;
    pool.spawn_health_loop(Duration::from_secs_f64(health.max(0.05)));
    let listener = tokio::net::TcpListener::bind(&a.front.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.front.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "dopd up: serving {} on http://{addr}/v1 (OpenAI API); Ctrl-C stops",
        router.cfg.model
    );
    std::io::stdout().flush()?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(dopd_router::serve(listener, router.clone(), async move {
        let _ = stop_rx.changed().await;
    }));
    control_loop(&mut ctrl, &fleet, &mut notes, budget).await;
    eprintln!("\ndopd up: stopping");
    let _ = stop_tx.send(true);
    let _ = server.await;
    stop_fleet(&fleet).await;
    eprintln!("dopd up: stopped");
    Ok(())
}

/// Steps the control loop four times a second until Ctrl-C (or SIGTERM), printing what it does.
async fn control_loop(
    ctrl: &mut Controller,
    fleet: &Arc<Fleet>,
    notes: &mut mpsc::UnboundedReceiver<String>,
    budget: u32,
) {
    let tty = std::io::stderr().is_terminal();
    let sig = shutdown_signal();
    tokio::pin!(sig);
    let mut local = Local(fleet.clone());
    loop {
        tokio::select! {
            () = &mut sig => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        while let Ok(n) = notes.try_recv() {
            eprintln!("{}{n}", clear(tty));
        }
        let snapshot = Snapshot {
            load: Some(fleet.router.load().reading),
            instances: fleet.instances(),
            known_next: None,
        };
        let report = ctrl.step(fleet.t0.elapsed().as_secs_f64(), &snapshot, &mut local);
        for r in &report.retired {
            let how = if r.timed_out {
                "timed out after"
            } else {
                "drained in"
            };
            let (id, s) = (&r.id, r.drained_s);
            eprintln!("{}dopd up: {id} {how} {s:.1} s; stopping it", clear(tty));
        }
        let Some(t) = &report.tick else {
            continue;
        };
        if t.changed() {
            let (b, d) = (t.before, t.decision.target);
            eprintln!(
                "{}dopd up: planner: prefill {} -> {}, decode {} -> {} ({})",
                clear(tty),
                b.prefill,
                d.prefill,
                b.decode,
                d.decode,
                t.decision.reason_tags()
            );
        }
        let line = status_line(t, budget);
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Drains every worker, then stops them and waits (up to 5 s) for their tasks to reap them.
async fn stop_fleet(fleet: &Arc<Fleet>) {
    let all: Vec<String> = fleet.with_procs(|p| p.iter().filter_map(|p| p.url.clone()).collect());
    fleet.pool.drain(&all).await;
    let ids: Vec<String> = fleet.with_procs(|p| p.iter().map(|p| p.id.clone()).collect());
    Local(fleet.clone()).retire(Role::Decode, &ids);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.with_procs(|p| !p.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_budget_follows_the_cores() {
        assert_eq!(worker_budget(2, 1), 2);
        assert_eq!(worker_budget(16, 1), 16);
        assert_eq!(worker_budget(16, 4), 4);
        // Never fewer than one prefill and one decode worker.
        assert_eq!(worker_budget(1, 1), 2);
        assert_eq!(worker_budget(8, 0), 8);
    }

    #[test]
    fn worker_args_may_start_with_a_dash() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        for (given, want) in [
            ("--int8-activations", "--int8-activations"),
            ("--device cuda", "--device cuda"),
        ] {
            let cli = <Cli as clap::Parser>::try_parse_from(["dopd up", "--worker-args", given])
                .expect("parses");
            assert_eq!(cli.up.worker_args, want);
        }
    }
}
