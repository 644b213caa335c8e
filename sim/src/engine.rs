//! The event loop. See the crate docs for the model.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use dopd_planner::control::{
    Actuator, ControlConfig, Controller, Instance, InstanceState, Orders, Snapshot,
};
use dopd_planner::load::{LoadReading, LoadTotals};
use dopd_planner::planner::{ConfigError, Planner, PlannerConfig, PolicyKind, ReplicaState};
use dopd_planner::profile::{PerRole, Profile, Role};
pub use dopd_planner::routing::PrefillQueue;
use dopd_planner::routing::{
    self, Batch, DeadlineQueue, QueueOrder, RequestClass, RoutingConfig, ShortBatcher,
};
use dopd_planner::sizing::{Replicas, SizingInput};
use serde::{Deserialize, Serialize};

use crate::report::{self, ControlStep, IntervalPoint, RequestRecord, Route, SimResult};
use crate::workload::SimRequest;

/// The scaling policy of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PolicySpec {
    /// DOPD: forecasting planner plus length-aware routing.
    Dopd,
    /// DOPD as the paper states its sizing, with the same routing.
    DopdPaper,
    /// DOPD sizing fed the true next interval (the lower bound on GPUs for this planner).
    Oracle,
    /// Dynamo's SLA planner; every request prefilled remotely, one at a time.
    DynSla,
    /// Dynamo's load planner; every request prefilled remotely, one at a time.
    DynLoad,
    /// Fixed prefill/decode counts; every request prefilled remotely, one at a time.
    Static { replicas: Replicas },
    /// `instances` identical instances that prefill and decode (vLLM-like), each with the
    /// decode role's GPUs.
    Aggregated { instances: u32 },
}

impl PolicySpec {
    pub fn name(&self) -> String {
        match self {
            Self::Dopd => "dopd".into(),
            Self::DopdPaper => "dopd-paper".into(),
            Self::Oracle => "oracle".into(),
            Self::DynSla => "dyn-sla".into(),
            Self::DynLoad => "dyn-load".into(),
            Self::Static { replicas } => {
                format!("static-{}p{}d", replicas.prefill, replicas.decode)
            }
            Self::Aggregated { instances } => format!("aggregated-{instances}"),
        }
    }

    fn planner_kind(&self) -> PolicyKind {
        match self {
            Self::Dopd | Self::Oracle => PolicyKind::Dopd,
            Self::DopdPaper => PolicyKind::DopdPaper,
            Self::DynSla => PolicyKind::DynSla,
            Self::DynLoad => PolicyKind::DynLoad,
            Self::Static { .. } | Self::Aggregated { .. } => PolicyKind::Static,
        }
    }

    /// DOPD's length-aware routing is part of DOPD; the baselines send every prompt to a
    /// prefill instance as it arrives.
    fn length_aware(&self) -> bool {
        matches!(self, Self::Dopd | Self::DopdPaper | Self::Oracle)
    }
}

/// Settings of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub policy: PolicySpec,
    /// Planner settings (the policy kind is taken from `policy`).
    pub planner: PlannerConfig,
    /// Routing settings for length-aware policies (ablations switch parts off here).
    pub routing: RoutingConfig,
    /// Planner tick, seconds (the DOPD configs use 10).
    pub interval_s: f64,
    /// KV-transfer bandwidth between prefill and decode, bytes/s (0: instantaneous).
    pub kv_link_bytes_per_s: f64,
    /// Fixed KV-transfer latency, seconds.
    pub kv_link_latency_s: f64,
    /// Most prompt tokens a decode/aggregated step prefills (chunked prefill).
    pub prefill_chunk_tokens: u32,
    /// TTFT SLO: `slo_ttft_s + slo_ttft_per_token_s × ISL` (the per-token allowance makes it
    /// length-aware; 0 gives a fixed SLO).
    pub slo_ttft_s: f64,
    pub slo_ttft_per_token_s: f64,
    pub slo_tpot_s: f64,
    /// Instances running (and ready) when the replay starts.
    pub initial: Replicas,
    /// Force DOPD's length-aware routing on (or off) whatever the policy (`None`: on for DOPD and
    /// the oracle only). With a static policy this isolates the routing's effect.
    pub length_aware_routing: Option<bool>,
    /// Keep every step of the control loop (what it observed, the orders it gave) in
    /// [`SimResult::control`], to replay them through another loop.
    pub record_control: bool,
    /// Warm-up: requests arriving before this are served but not scored, and GPUs count from
    /// here (so dynamic policies are measured running, not on a cold start from `initial`).
    pub score_from_s: f64,
    /// How prefill work waits for an instance (see [`PrefillQueue`]).
    pub prefill_queue: PrefillQueue,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            policy: PolicySpec::Dopd,
            planner: PlannerConfig::default(),
            routing: RoutingConfig::default(),
            interval_s: 10.0,
            kv_link_bytes_per_s: 50e9,
            kv_link_latency_s: 0.0005,
            prefill_chunk_tokens: 2048,
            slo_ttft_s: 2.0,
            slo_ttft_per_token_s: 0.0,
            slo_tpot_s: 0.08,
            initial: PerRole {
                prefill: 1,
                decode: 1,
            },
            length_aware_routing: None,
            record_control: false,
            score_from_s: 0.0,
            prefill_queue: PrefillQueue::default(),
        }
    }
}

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "the run stalled with {finished} of {total} requests finished (no instance could serve the rest)"
    )]
    Incomplete { finished: usize, total: usize },
    #[error("simulator config `{field}` = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

// === events ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Arrival(usize),
    BatchDeadline,
    PrefillDone(usize),
    KvArrived(usize),
    StepDone(usize),
    Ready(usize),
    /// The control loop's next tick.
    Tick,
}

/// Heap entry: earliest time first, then insertion order (determinism).
#[derive(Clone, Copy, Debug)]
struct Entry {
    t: f64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

// === state ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Prefill,
    Decode,
    Aggregated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Asked for, but the GPU budget is held by instances still draining: no GPU yet.
    Pending,
    Starting,
    Ready,
    Draining,
    Stopped,
}

#[derive(Debug)]
struct Inst {
    kind: Kind,
    state: State,
    gpus: u32,
    launched: f64,
    stopped: Option<f64>,
    // Prefill: queued batches and the one in service.
    queue: VecDeque<Vec<usize>>,
    current: Vec<usize>,
    // Decode/aggregated: waiting and running sequences.
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    blocks_used: u64,
    stepping: bool,
    /// Prompt tokens each running request prefills in the step under way.
    step_prefill: Vec<(usize, u32)>,
    /// Cancelled while starting but already holding work: drains once it is up.
    retiring: bool,
}

impl Inst {
    fn new(kind: Kind, state: State, gpus: u32, now: f64) -> Self {
        Self {
            kind,
            state,
            gpus,
            launched: now,
            stopped: None,
            queue: VecDeque::new(),
            current: Vec::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks_used: 0,
            stepping: false,
            step_prefill: Vec::new(),
            retiring: false,
        }
    }

    fn active(&self) -> bool {
        matches!(self.state, State::Pending | State::Starting | State::Ready) && !self.retiring
    }

    fn role(&self) -> Role {
        match self.kind {
            Kind::Prefill => Role::Prefill,
            Kind::Decode | Kind::Aggregated => Role::Decode,
        }
    }

    fn idle(&self) -> bool {
        self.queue.is_empty()
            && self.current.is_empty()
            && self.waiting.is_empty()
            && self.running.is_empty()
    }
}

#[derive(Clone, Debug)]
struct Req {
    r: SimRequest,
    route: Route,
    first_token: Option<f64>,
    finish: Option<f64>,
    generated: u32,
    prefill_left: u32,
    blocks: u64,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    profile: &'a Profile,
    /// The shared control loop (none for aggregated serving, which has no planner).
    ctrl: Option<Controller>,
    /// When the one live tick event fires.
    tick_at: Option<f64>,
    routing: RoutingConfig,
    batcher: ShortBatcher<usize>,
    reqs: Vec<Req>,
    insts: Vec<Inst>,
    heap: BinaryHeap<Entry>,
    seq: u64,
    now: f64,
    /// Instances up at time 0.
    initial: Replicas,
    /// When the one live batch-deadline event fires.
    batch_deadline_at: Option<f64>,
    /// Forecast mean ISL: the long/short threshold.
    isl_threshold: f64,
    /// What a router would count (see `dopd_planner::load`).
    totals: LoadTotals,
    /// Prefill batches waiting in the router for a free instance ([`PrefillQueue::Shared`]).
    waiting_prefill: DeadlineQueue<Vec<usize>>,
    records: Vec<RequestRecord>,
    intervals: Vec<IntervalPoint>,
    gpus_now: u32,
    peak_gpus: u32,
    /// GPUs the cluster may hold at once (new instances wait while draining ones hold GPUs).
    budget: u32,
    gpu_integral: f64,
    last_gpu_change: f64,
    finished: usize,
    /// True next-interval workloads for the oracle, by tick index.
    oracle: Vec<SizingInput>,
    control: Vec<ControlStep>,
}

/// The planner's settings for a run: `cfg.planner` with the run's policy, SLOs, KV link and
/// routing (what a loop outside the simulator needs to decide the same).
pub fn planner_config(cfg: &SimConfig) -> PlannerConfig {
    let mut planner_cfg = cfg.planner.clone();
    planner_cfg.policy = cfg.policy.planner_kind();
    // The planner sizes for the run's SLOs, KV link and routing.
    planner_cfg.slo = dopd_planner::slo::SloTargets {
        ttft_s: cfg.slo_ttft_s,
        ttft_per_token_s: cfg.slo_ttft_per_token_s,
        tpot_s: cfg.slo_tpot_s,
    };
    planner_cfg.slo_policy.kv_link_bytes_per_s = cfg.kv_link_bytes_per_s;
    planner_cfg.follow_routing(
        &cfg.routing,
        cfg.length_aware_routing
            .unwrap_or(cfg.policy.length_aware()),
    );
    planner_cfg
}

/// Runs `requests` (sorted by arrival) through a cluster described by `profile` and `cfg`.
pub fn simulate(
    requests: &[SimRequest],
    profile: &Profile,
    cfg: &SimConfig,
) -> Result<SimResult, SimError> {
    simulate_with_progress(requests, profile, cfg, &mut |_, _| {})
}

/// [`simulate`], calling `progress(finished, total)` as requests finish (every 1%).
pub fn simulate_with_progress(
    requests: &[SimRequest],
    profile: &Profile,
    cfg: &SimConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SimResult, SimError> {
    validate(cfg)?;
    profile.validate().map_err(ConfigError::from)?;
    for (k, r) in requests.iter().enumerate() {
        if !(r.arrival_s.is_finite() && r.arrival_s >= 0.0) || r.isl == 0 {
            return Err(SimError::Invalid {
                field: "requests",
                value: format!("#{k}: arrival {} s, ISL {}", r.arrival_s, r.isl),
                reason: "arrivals must be finite and >= 0, prompts at least 1 token",
            });
        }
        if k > 0 && r.arrival_s < requests[k - 1].arrival_s {
            return Err(SimError::Invalid {
                field: "requests",
                value: format!("#{k} at {} s", r.arrival_s),
                reason: "must be sorted by arrival",
            });
        }
    }
    let mut planner_cfg = planner_config(cfg);
    let mut initial = cfg.initial;
    if let PolicySpec::Static { replicas } = cfg.policy {
        // Static means static: start with the counts, and let no budget or bound change them.
        planner_cfg.static_replicas = replicas;
        planner_cfg.sizing.gpu_budget = replicas.gpus(profile).max(planner_cfg.sizing.gpu_budget);
        planner_cfg.sizing.min_replicas = PerRole {
            prefill: 1,
            decode: 1,
        };
        planner_cfg.sizing.max_replicas = PerRole {
            prefill: None,
            decode: None,
        };
        initial = replicas;
    }
    let ctrl = match cfg.policy {
        PolicySpec::Aggregated { .. } => None,
        _ => Some(Controller::new(
            Planner::new(profile.clone(), planner_cfg)?,
            ControlConfig {
                interval_s: cfg.interval_s,
                // Simulated requests always finish: a drain is never cut short.
                drain_timeout_s: f64::INFINITY,
                headroom: false,
                paused: false,
            },
            initial,
        )),
    };
    let routing = if cfg
        .length_aware_routing
        .unwrap_or(cfg.policy.length_aware())
    {
        cfg.routing.clone()
    } else {
        RoutingConfig {
            ultra_short_bypass: false,
            short_batching: false,
            ..cfg.routing.clone()
        }
    };
    let mut sim = Sim {
        cfg,
        profile,
        ctrl,
        tick_at: None,
        batcher: ShortBatcher::new(&routing),
        routing,
        reqs: requests
            .iter()
            .map(|r| Req {
                r: *r,
                route: Route::Long,
                first_token: None,
                finish: None,
                generated: 0,
                prefill_left: 0,
                blocks: 0,
            })
            .collect(),
        insts: Vec::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        initial,
        batch_deadline_at: None,
        isl_threshold: f64::INFINITY,
        totals: LoadTotals::new(1),
        waiting_prefill: DeadlineQueue::new(
            cfg.prefill_queue
                .order()
                .unwrap_or(QueueOrder::DeadlineFirst),
        ),
        records: Vec::with_capacity(requests.len()),
        intervals: Vec::new(),
        gpus_now: 0,
        peak_gpus: 0,
        budget: match cfg.policy {
            PolicySpec::Aggregated { instances } => instances.saturating_mul(profile.gpus.decode),
            PolicySpec::Static { replicas } => {
                replicas.gpus(profile).max(cfg.planner.sizing.gpu_budget)
            }
            _ => cfg.planner.sizing.gpu_budget,
        },
        gpu_integral: 0.0,
        last_gpu_change: 0.0,
        finished: 0,
        oracle: if matches!(cfg.policy, PolicySpec::Oracle) {
            oracle_inputs(requests, cfg.interval_s)
        } else {
            Vec::new()
        },
        control: Vec::new(),
    };
    sim.run(progress);
    if sim.finished != sim.reqs.len() {
        return Err(SimError::Incomplete {
            finished: sim.finished,
            total: sim.reqs.len(),
        });
    }
    // What is scored starts after the warm-up: requests arriving from then, GPUs held from then.
    let from = cfg.score_from_s;
    let gpu_seconds: f64 = sim
        .insts
        .iter()
        .map(|i| f64::from(i.gpus) * (i.stopped.unwrap_or(sim.now) - i.launched.max(from)).max(0.0))
        .sum();
    sim.records.sort_by_key(|r| r.id);
    let scored: Vec<RequestRecord> = sim
        .records
        .iter()
        .filter(|r| r.arrival_s >= from)
        .copied()
        .collect();
    let mut summary = report::summarize(
        cfg.policy.name(),
        &scored,
        (cfg.slo_ttft_s, cfg.slo_tpot_s),
        gpu_seconds,
        sim.peak_gpus,
    );
    summary.slo_ttft_per_token_s = cfg.slo_ttft_per_token_s;
    summary.score_from_s = from;
    let ticks: Vec<IntervalPoint> = sim
        .intervals
        .iter()
        .filter(|p| p.t_s >= from)
        .copied()
        .collect();
    summary.target_changes_per_hour = report::changes_per_hour(&ticks, summary.duration_s);
    Ok(SimResult {
        summary,
        records: sim.records,
        intervals: sim.intervals,
        gpu_seconds_integral: sim.gpu_integral,
        control: sim.control,
    })
}

fn validate(cfg: &SimConfig) -> Result<(), SimError> {
    let bad = |field, value: f64, reason| {
        Err(SimError::Invalid {
            field,
            value: value.to_string(),
            reason,
        })
    };
    if !(cfg.interval_s.is_finite() && cfg.interval_s > 0.0) {
        return bad("interval_s", cfg.interval_s, "must be finite and > 0");
    }
    for (field, v) in [
        ("kv_link_bytes_per_s", cfg.kv_link_bytes_per_s),
        ("kv_link_latency_s", cfg.kv_link_latency_s),
        ("slo_ttft_s", cfg.slo_ttft_s),
        ("slo_ttft_per_token_s", cfg.slo_ttft_per_token_s),
        ("slo_tpot_s", cfg.slo_tpot_s),
        ("score_from_s", cfg.score_from_s),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return bad(field, v, "must be finite and >= 0");
        }
    }
    if cfg.prefill_chunk_tokens == 0 {
        return bad("prefill_chunk_tokens", 0.0, "must be >= 1");
    }
    if cfg.initial.decode == 0
        && !matches!(
            cfg.policy,
            PolicySpec::Aggregated { .. } | PolicySpec::Static { .. }
        )
    {
        return bad(
            "initial.decode",
            0.0,
            "must be >= 1: requests need a decode instance from the start",
        );
    }
    if let PolicySpec::Static { replicas } = cfg.policy
        && replicas.decode == 0
    {
        return bad("policy.replicas.decode", 0.0, "must be >= 1");
    }
    if let PolicySpec::Aggregated { instances: 0 } = cfg.policy {
        return bad("policy.instances", 0.0, "must be >= 1");
    }
    Ok(())
}

/// The true workload of each planner interval, for the oracle: tick `k` at `k·Δ` sizes for
/// arrivals in `[k·Δ, (k+1)·Δ)`.
fn oracle_inputs(requests: &[SimRequest], interval_s: f64) -> Vec<SizingInput> {
    let n = requests
        .last()
        .map_or(0, |r| (r.arrival_s / interval_s) as usize + 1);
    let mut acc = vec![(0.0f64, 0.0f64, 0.0f64); n + 1];
    for r in requests {
        let k = (r.arrival_s / interval_s) as usize;
        acc[k].0 += 1.0;
        acc[k].1 += f64::from(r.isl);
        acc[k].2 += f64::from(r.osl);
    }
    acc.into_iter()
        .map(|(c, i, o)| SizingInput {
            interval_s,
            ..SizingInput::new(
                c,
                if c > 0.0 { i / c } else { 0.0 },
                if c > 0.0 { o / c } else { 0.0 },
            )
        })
        .collect()
}

impl Sim<'_> {
    fn push(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Entry {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn run(&mut self, progress: &mut dyn FnMut(usize, usize)) {
        let total = self.reqs.len();
        let step = (total / 100).max(1);
        let mut reported = 0;
        for i in 0..self.reqs.len() {
            self.push(self.reqs[i].r.arrival_s, Ev::Arrival(i));
        }
        let initial = match self.cfg.policy {
            PolicySpec::Aggregated { instances } => PerRole {
                prefill: 0,
                decode: instances,
            },
            _ => self.initial,
        };
        for _ in 0..initial.prefill {
            self.launch(Kind::Prefill, true);
        }
        let decode_kind = self.decode_kind();
        for _ in 0..initial.decode {
            self.launch(decode_kind, true);
        }
        // The loop's first step takes its baseline reading and schedules the first tick.
        self.control();
        while let Some(Entry { t, ev, .. }) = self.heap.pop() {
            // Everything served: the run ends at the last finish, whatever is still scheduled.
            if self.finished == self.reqs.len() {
                break;
            }
            self.now = t;
            if self.finished >= reported + step {
                reported = self.finished;
                progress(reported, total);
            }
            match ev {
                Ev::Arrival(i) => self.arrive(i),
                Ev::BatchDeadline => {
                    // Only the latest scheduled deadline counts; earlier ones are stale.
                    if self.batch_deadline_at == Some(t) {
                        self.batch_deadline_at = None;
                        if let Some(b) = self.batcher.poll(self.now) {
                            self.dispatch_prefill(b);
                        }
                        self.schedule_batch_deadline();
                    }
                }
                Ev::PrefillDone(k) => self.prefill_done(k),
                Ev::KvArrived(i) => self.kv_arrived(i),
                Ev::StepDone(k) => self.step_done(k),
                Ev::Ready(k) => {
                    let inst = &mut self.insts[k];
                    if inst.state == State::Starting {
                        inst.state = if inst.retiring {
                            State::Draining
                        } else {
                            State::Ready
                        };
                        self.kick(k);
                    }
                }
                Ev::Tick => {
                    // Only the latest scheduled tick counts.
                    if self.tick_at == Some(t) {
                        self.tick_at = None;
                        self.control();
                    }
                }
            }
        }
        // Everything served: release every instance (pending ones first, so that stopping the
        // others does not hand them GPUs).
        let end = self.now;
        for pass in [
            State::Pending,
            State::Starting,
            State::Ready,
            State::Draining,
        ] {
            for k in 0..self.insts.len() {
                if self.insts[k].state == pass {
                    self.stop(k, end);
                }
            }
        }
    }

    fn decode_kind(&self) -> Kind {
        if matches!(self.cfg.policy, PolicySpec::Aggregated { .. }) {
            Kind::Aggregated
        } else {
            Kind::Decode
        }
    }

    fn gpus_changed(&mut self, delta: i64) {
        self.gpu_integral += f64::from(self.gpus_now) * (self.now - self.last_gpu_change);
        self.last_gpu_change = self.now;
        self.gpus_now = u32::try_from(i64::from(self.gpus_now) + delta).unwrap_or(0);
        self.peak_gpus = self.peak_gpus.max(self.gpus_now);
    }

    /// Adds an instance: ready at once (the initial fleet), starting, or pending when its GPUs
    /// would exceed the budget while other instances drain.
    fn launch(&mut self, kind: Kind, ready: bool) {
        let gpus = match kind {
            Kind::Prefill => self.profile.gpus.prefill,
            Kind::Decode | Kind::Aggregated => self.profile.gpus.decode,
        };
        if ready {
            self.insts
                .push(Inst::new(kind, State::Ready, gpus, self.now));
            self.gpus_changed(i64::from(gpus));
            return;
        }
        self.insts
            .push(Inst::new(kind, State::Pending, gpus, self.now));
        let k = self.insts.len() - 1;
        self.start_pending(k);
    }

    /// Gives a pending instance its GPUs if the budget allows, starting its start-up clock.
    fn start_pending(&mut self, k: usize) {
        let inst = &self.insts[k];
        if inst.state != State::Pending || self.gpus_now + inst.gpus > self.budget {
            return;
        }
        let (gpus, role) = (inst.gpus, inst.role());
        let inst = &mut self.insts[k];
        inst.state = State::Starting;
        inst.launched = self.now;
        self.gpus_changed(i64::from(gpus));
        self.push(self.now + self.profile.startup_s.get(role), Ev::Ready(k));
    }

    fn stop(&mut self, k: usize, at: f64) {
        let inst = &mut self.insts[k];
        let held = inst.state != State::Pending;
        inst.state = State::Stopped;
        inst.stopped = Some(at);
        if !held {
            inst.launched = at;
            return;
        }
        let gpus = inst.gpus;
        self.gpus_changed(-i64::from(gpus));
        // Freed GPUs go to instances waiting for them, oldest first.
        for j in 0..self.insts.len() {
            if self.insts[j].state == State::Pending {
                self.start_pending(j);
            }
        }
    }

    /// Least-loaded instance of `kind` among the ready ones, else among the starting ones.
    fn pick(&self, kind: Kind) -> Option<usize> {
        for want in [State::Ready, State::Starting] {
            let cands: Vec<(usize, f64)> = self
                .insts
                .iter()
                .enumerate()
                .filter(|(_, i)| i.kind == kind && i.state == want && !i.retiring)
                .map(|(k, i)| (k, self.load(i)))
                .collect();
            let loads: Vec<f64> = cands.iter().map(|c| c.1).collect();
            if let Some(j) = routing::least_loaded(&loads) {
                return Some(cands[j].0);
            }
        }
        None
    }

    /// Outstanding work of an instance, in tokens.
    fn load(&self, i: &Inst) -> f64 {
        let toks = |ids: &mut dyn Iterator<Item = &usize>| -> f64 {
            ids.map(|&r| {
                let q = &self.reqs[r];
                f64::from(q.prefill_left) + f64::from(q.r.osl.saturating_sub(q.generated))
            })
            .sum()
        };
        let prefill: f64 = i
            .queue
            .iter()
            .flatten()
            .chain(&i.current)
            .map(|&r| f64::from(self.reqs[r].r.isl))
            .sum();
        prefill + toks(&mut i.waiting.iter()) + toks(&mut i.running.iter())
    }

    fn arrive(&mut self, i: usize) {
        let r = self.reqs[i].r;
        self.totals.arrive_at(r.isl, self.now);
        if self.decode_kind() == Kind::Aggregated {
            self.reqs[i].route = Route::Aggregated;
            self.send_to_decode(i, true);
            return;
        }
        let class = routing::classify(r.isl, self.isl_threshold, &self.routing);
        self.reqs[i].route = match class {
            RequestClass::UltraShort => Route::UltraShort,
            RequestClass::Short => Route::Short,
            RequestClass::Long => Route::Long,
        };
        // The router's policy. Whether a prefill instance can take the request is decided when
        // the prefill is dispatched (`dispatch_prefill`), as the router does for batches.
        match routing::route(class, true).0 {
            routing::Route::Local => self.send_to_decode(i, true),
            routing::Route::Disaggregated => self.dispatch_prefill(Batch {
                items: vec![i],
                tokens: u64::from(r.isl),
                reason: routing::FlushReason::Drain,
            }),
            routing::Route::Batch => {
                for b in self.batcher.push(i, r.isl, self.now) {
                    self.dispatch_prefill(b);
                }
                self.schedule_batch_deadline();
            }
        }
    }

    fn schedule_batch_deadline(&mut self) {
        let next = self.batcher.deadline().map(|d| d.max(self.now));
        if next.is_some() && next != self.batch_deadline_at {
            self.batch_deadline_at = next;
            self.push(next.unwrap_or(self.now), Ev::BatchDeadline);
        }
    }

    fn dispatch_prefill(&mut self, b: Batch<usize>) {
        if self.cfg.prefill_queue != PrefillQueue::PerInstance && self.pick(Kind::Prefill).is_some()
        {
            let deadline = b
                .items
                .iter()
                .map(|&i| self.deadline(i))
                .fold(f64::INFINITY, f64::min);
            let tokens: u64 = b.items.iter().map(|&r| u64::from(self.reqs[r].r.isl)).sum();
            let service = self.prefill_time(tokens);
            self.waiting_prefill.push(b.items, deadline, service);
            self.feed_prefill();
            return;
        }
        match self.pick(Kind::Prefill) {
            Some(k) => {
                self.insts[k].queue.push_back(b.items);
                self.kick(k);
            }
            // No prefill instance at all: the routing policy prefills locally (never drops).
            None => {
                debug_assert_eq!(
                    routing::route_batch(b.reason, false).0,
                    routing::Route::Local
                );
                b.items
                    .into_iter()
                    .for_each(|i| self.send_to_decode(i, true));
            }
        }
    }

    /// Prefill time of `tokens` prompt tokens: the profile's TTFT curve, extended linearly past
    /// the profiled range (a one-sample profile is constant).
    fn prefill_time(&self, tokens: u64) -> f64 {
        let t = tokens as f64;
        let max = self.profile.max_isl();
        if t <= max || self.profile.prefill.isl.len() < 2 {
            self.profile.ttft(t)
        } else {
            self.profile.ttft(max) * t / max
        }
    }

    /// Starts work on an idle, ready instance.
    fn kick(&mut self, k: usize) {
        let inst = &self.insts[k];
        if !matches!(inst.state, State::Ready | State::Draining) {
            return;
        }
        match inst.kind {
            Kind::Prefill => {
                if !inst.current.is_empty() {
                    return;
                }
                if self.cfg.prefill_queue != PrefillQueue::PerInstance {
                    self.feed_prefill();
                    if self.insts[k].current.is_empty() {
                        self.maybe_retire(k);
                    }
                    return;
                }
                let Some(batch) = self.insts[k].queue.pop_front() else {
                    self.maybe_retire(k);
                    return;
                };
                self.start_prefill(k, batch);
            }
            Kind::Decode | Kind::Aggregated => {
                if !inst.stepping {
                    self.start_step(k);
                }
            }
        }
    }

    fn start_prefill(&mut self, k: usize, batch: Vec<usize>) {
        let tokens: u64 = batch.iter().map(|&r| u64::from(self.reqs[r].r.isl)).sum();
        let dt = self.prefill_time(tokens);
        self.insts[k].current = batch;
        self.push(self.now + dt, Ev::PrefillDone(k));
    }

    /// The TTFT deadline of request `i`.
    fn deadline(&self, i: usize) -> f64 {
        let r = &self.reqs[i].r;
        r.arrival_s + self.cfg.slo_ttft_s + self.cfg.slo_ttft_per_token_s * f64::from(r.isl)
    }

    /// [`PrefillQueue::Shared`]: every free ready prefill instance takes a waiting batch, the
    /// earliest deadline among those that can still meet theirs first, else the earliest one.
    /// With no prefill instance left to wait for, the batches are prefilled locally.
    fn feed_prefill(&mut self) {
        let paced = self.cfg.prefill_queue.paced();
        while !self.waiting_prefill.is_empty() {
            if self.pick(Kind::Prefill).is_none() {
                for b in self.waiting_prefill.drain() {
                    b.into_iter().for_each(|i| self.send_to_decode(i, true));
                }
                return;
            }
            // Paced by the decode instances: with no room for even the oldest batch, nothing
            // is chosen.
            if paced
                && self
                    .waiting_prefill
                    .oldest()
                    .is_some_and(|b| !self.decode_room(b))
            {
                return;
            }
            let Some(k) = self.insts.iter().position(|i| {
                i.kind == Kind::Prefill
                    && i.state == State::Ready
                    && !i.retiring
                    && i.current.is_empty()
            }) else {
                return;
            };
            let now = self.now;
            let Some(next) = self.waiting_prefill.peek(now).map(|(b, _)| b.clone()) else {
                return;
            };
            if paced && !self.decode_room(&next) {
                return;
            }
            if let Some(batch) = self.waiting_prefill.pop(now) {
                self.start_prefill(k, batch);
            }
        }
    }

    /// Whether some ready decode instance can take `batch` and keep its steps within the TPOT
    /// SLO (an idle one always can).
    fn decode_room(&self, batch: &[usize]) -> bool {
        let k = batch.len();
        let ctx = batch
            .iter()
            .map(|&i| f64::from(self.reqs[i].r.isl) + f64::from(self.reqs[i].r.osl) / 2.0)
            .sum::<f64>()
            / k.max(1) as f64;
        // (Prompts still in prefill or in transfer are not counted: counting them too held
        // prefills back while the planner, seeing the backlog, added prefill instances, not
        // decode ones; see docs/experiments.md.)
        self.insts
            .iter()
            .filter(|i| i.kind == self.decode_kind() && i.state == State::Ready && !i.retiring)
            .any(|i| {
                let n = i.running.len() + i.waiting.len();
                n == 0 || self.profile.tpot((n + k) as f64, ctx) <= self.cfg.slo_tpot_s
            })
    }

    /// A draining instance that has become idle: the control loop retires it.
    fn maybe_retire(&mut self, k: usize) {
        if self.insts[k].state == State::Draining && self.insts[k].idle() {
            self.control();
        }
    }

    fn prefill_done(&mut self, k: usize) {
        let batch = std::mem::take(&mut self.insts[k].current);
        for i in batch {
            let bytes = f64::from(self.reqs[i].r.isl) * self.profile.kv.bytes_per_token as f64;
            let transfer = if self.cfg.kv_link_bytes_per_s > 0.0 {
                bytes / self.cfg.kv_link_bytes_per_s + self.cfg.kv_link_latency_s
            } else {
                self.cfg.kv_link_latency_s
            };
            self.push(self.now + transfer, Ev::KvArrived(i));
        }
        self.kick(k);
    }

    fn first_token(&mut self, i: usize) {
        let q = &mut self.reqs[i];
        q.first_token = Some(self.now);
        q.generated = 1;
        self.totals.first_token(self.now - q.r.arrival_s);
    }

    fn kv_arrived(&mut self, i: usize) {
        self.first_token(i);
        if self.reqs[i].r.osl <= 1 {
            self.finish(i);
        } else {
            self.send_to_decode(i, false);
        }
    }

    /// Queues request `i` on a decode (or aggregated) instance; `local` prefills it there.
    fn send_to_decode(&mut self, i: usize, local: bool) {
        let kind = self.decode_kind();
        let Some(k) = self.pick(kind) else {
            // Unreachable with at least one decode instance (minimums are >= 1).
            debug_assert!(false, "no decode instance");
            return;
        };
        let q = &mut self.reqs[i];
        q.prefill_left = if local { q.r.isl } else { 0 };
        self.insts[k].waiting.push_back(i);
        self.kick(k);
    }

    fn start_step(&mut self, k: usize) {
        let block = u64::from(self.profile.kv.block_size.max(1));
        let cap = self.profile.kv.blocks;
        // Admit FIFO while the reserved blocks fit (a lone oversized request is admitted alone).
        while let Some(&i) = self.insts[k].waiting.front() {
            let q = &self.reqs[i];
            let need = (u64::from(q.r.isl) + u64::from(q.r.osl)).div_ceil(block);
            let inst = &self.insts[k];
            if inst.blocks_used + need > cap && !inst.running.is_empty() {
                break;
            }
            self.insts[k].waiting.pop_front();
            self.insts[k].running.push(i);
            self.insts[k].blocks_used += need;
            self.reqs[i].blocks = need;
        }
        if self.insts[k].running.is_empty() {
            self.insts[k].stepping = false;
            self.maybe_retire(k);
            return;
        }
        let mut n = 0u32;
        let mut ctx = 0.0;
        let mut budget = self.cfg.prefill_chunk_tokens;
        let mut plan = Vec::new();
        for &i in &self.insts[k].running {
            let q = &self.reqs[i];
            if q.prefill_left == 0 {
                n += 1;
                ctx += f64::from(q.r.isl) + f64::from(q.generated);
            } else if budget > 0 {
                let take = q.prefill_left.min(budget);
                budget -= take;
                plan.push((i, take));
            }
        }
        let prefill_tokens: u64 = plan.iter().map(|p| u64::from(p.1)).sum();
        let mut dt = 0.0;
        if n > 0 {
            dt += self.profile.tpot(f64::from(n), ctx / f64::from(n));
        }
        if prefill_tokens > 0 {
            dt += self.prefill_time(prefill_tokens);
        }
        self.insts[k].step_prefill = plan;
        self.insts[k].stepping = true;
        self.push(self.now + dt, Ev::StepDone(k));
    }

    fn step_done(&mut self, k: usize) {
        let plan = std::mem::take(&mut self.insts[k].step_prefill);
        let prefilling: Vec<usize> = plan.iter().map(|p| p.0).collect();
        let running = std::mem::take(&mut self.insts[k].running);
        let mut keep = Vec::with_capacity(running.len());
        for i in running {
            if prefilling.contains(&i) {
                keep.push(i);
                continue;
            }
            if self.reqs[i].prefill_left == 0 {
                self.reqs[i].generated += 1;
                if self.reqs[i].generated >= self.reqs[i].r.osl {
                    self.insts[k].blocks_used -= self.reqs[i].blocks;
                    self.finish(i);
                    continue;
                }
            }
            keep.push(i);
        }
        for (i, take) in plan {
            self.reqs[i].prefill_left -= take;
            if self.reqs[i].prefill_left == 0 {
                self.first_token(i);
                if self.reqs[i].r.osl <= 1 {
                    keep.retain(|&j| j != i);
                    self.insts[k].blocks_used -= self.reqs[i].blocks;
                    self.finish(i);
                }
            }
        }
        self.insts[k].running = keep;
        self.insts[k].stepping = false;
        self.kick(k);
        // Sequences that ended made room for prefills paced by it.
        if self.cfg.prefill_queue.paced() {
            self.feed_prefill();
        }
    }

    fn finish(&mut self, i: usize) {
        let q = &mut self.reqs[i];
        debug_assert!(q.finish.is_none(), "request {i} finished twice");
        q.finish = Some(self.now);
        self.finished += 1;
        let ft = q.first_token.unwrap_or(self.now);
        let ttft = ft - q.r.arrival_s;
        let tpot = if q.r.osl > 1 {
            (self.now - ft) / f64::from(q.r.osl - 1)
        } else {
            0.0
        };
        self.totals.finish(
            q.r.osl,
            (q.r.osl > 1).then_some(tpot),
            self.now - q.r.arrival_s,
        );
        self.records.push(RequestRecord {
            id: i,
            arrival_s: q.r.arrival_s,
            isl: q.r.isl,
            osl: q.r.osl,
            route: q.route,
            ttft_s: ttft,
            tpot_s: tpot,
            finish_s: self.now,
            met_slo: ttft
                <= self.cfg.slo_ttft_s + self.cfg.slo_ttft_per_token_s * f64::from(q.r.isl)
                && (q.r.osl <= 1 || tpot <= self.cfg.slo_tpot_s),
        });
    }

    fn counts(&self) -> PerRole<ReplicaState> {
        let mut c = PerRole::<ReplicaState>::default();
        for i in &self.insts {
            let s = match i.role() {
                Role::Prefill => &mut c.prefill,
                Role::Decode => &mut c.decode,
            };
            match i.state {
                State::Ready => s.ready += 1,
                State::Pending | State::Starting if !i.retiring => s.pending += 1,
                State::Pending | State::Starting | State::Draining | State::Stopped => {}
            }
        }
        c
    }

    /// The instances as the control loop sees them.
    fn instances(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for (k, i) in self.insts.iter().enumerate() {
            let state = match i.state {
                State::Stopped => continue,
                State::Pending if i.retiring => InstanceState::Draining,
                State::Starting if i.retiring => InstanceState::Draining,
                State::Pending => InstanceState::Pending,
                State::Starting => InstanceState::Starting,
                State::Ready => InstanceState::Ready,
                State::Draining => InstanceState::Draining,
            };
            let held = i.queue.iter().map(Vec::len).sum::<usize>()
                + i.current.len()
                + i.waiting.len()
                + i.running.len();
            out.push(Instance {
                id: k.to_string(),
                role: i.role(),
                state,
                in_flight: Some(held as u32),
                work: self.load(i),
                queued: i.queue.iter().map(Vec::len).sum::<usize>() as u32,
                kv_usage: (i.role() == Role::Decode)
                    .then(|| i.blocks_used as f64 / self.profile.kv.blocks as f64),
                created: k as f64,
            });
        }
        out
    }

    fn snapshot(&self) -> Snapshot {
        let known_next = matches!(self.cfg.policy, PolicySpec::Oracle).then(|| {
            let k = (self.now / self.cfg.interval_s).round() as usize;
            self.oracle
                .get(k)
                .copied()
                .unwrap_or(SizingInput::new(0.0, 0.0, 0.0))
        });
        Snapshot {
            load: Some(LoadReading {
                totals: self.totals.clone(),
                router_waiting: (self.batcher.len()
                    + self.waiting_prefill.iter().map(Vec::len).sum::<usize>())
                    as u64,
            }),
            instances: self.instances(),
            known_next,
        }
    }

    /// Runs the control loop now (it ticks when a tick is due) and carries out its orders; again
    /// while a drained instance is already idle, so it is retired at once.
    fn control(&mut self) {
        for _ in 0..2 {
            let Some(mut ctrl) = self.ctrl.take() else {
                return;
            };
            let snapshot = self.snapshot();
            let mut orders = Orders::default();
            let report = ctrl.step(self.now, &snapshot, &mut orders);
            let next = ctrl.next_tick();
            self.ctrl = Some(ctrl);
            orders.apply(self);
            // Work waiting for a prefill instance that is no longer coming goes local.
            self.feed_prefill();
            if let Some(t) = &report.tick {
                let c = self.counts();
                self.intervals.push(IntervalPoint {
                    t_s: t.at,
                    requests: t.observation.requests,
                    forecast_requests: t.decision.forecast.map(|f| f.requests.point),
                    target_prefill: t.decision.target.prefill,
                    target_decode: t.decision.target.decode,
                    ready_prefill: c.prefill.ready,
                    ready_decode: c.decode.ready,
                    gpus: self.gpus_now,
                });
            }
            if self.cfg.record_control {
                self.control.push(ControlStep {
                    at: self.now,
                    snapshot,
                    orders,
                    decision: report.tick.map(|t| t.decision),
                });
            }
            // Keep ticking while work remains and something else can still happen.
            if let Some(n) = next
                && self.tick_at != Some(n)
                && self.finished < self.reqs.len()
                && !self.heap.is_empty()
            {
                self.tick_at = Some(n);
                self.push(n, Ev::Tick);
            }
            let drained_idle = self
                .insts
                .iter()
                .any(|i| i.state == State::Draining && i.idle());
            if !drained_idle {
                return;
            }
        }
    }

    fn kind_of(&self, role: Role) -> Kind {
        if role == Role::Prefill {
            Kind::Prefill
        } else {
            self.decode_kind()
        }
    }

    fn ids(&self, ids: &[String]) -> Vec<usize> {
        ids.iter()
            .filter_map(|id| id.parse::<usize>().ok())
            .filter(|&k| k < self.insts.len())
            .collect()
    }
}

/// The simulator is the control loop's actuator: it launches, drains and stops its instances.
impl Actuator for Sim<'_> {
    fn set_count(&mut self, role: Role, serving: u32, _draining: u32) {
        let kind = self.kind_of(role);
        let active = self
            .insts
            .iter()
            .filter(|i| i.kind == kind && i.active())
            .count() as u32;
        for _ in active..serving {
            self.launch(kind, false);
        }
    }

    fn drain(&mut self, _role: Role, ids: &[String]) {
        for k in self.ids(ids) {
            match self.insts[k].state {
                State::Ready => self.insts[k].state = State::Draining,
                // A starting instance already holding work finishes starting, serves that work
                // and leaves.
                State::Pending | State::Starting => self.insts[k].retiring = true,
                State::Draining | State::Stopped => {}
            }
        }
    }

    fn retire(&mut self, _role: Role, ids: &[String]) {
        for k in self.ids(ids) {
            if self.insts[k].state == State::Stopped {
                continue;
            }
            if self.insts[k].idle() {
                self.stop(k, self.now);
            } else {
                // Work is never dropped: an instance told to stop with work left drains it first.
                debug_assert!(false, "instance {k} retired while holding work");
                self.drain(Role::Decode, &[k.to_string()]);
            }
        }
    }

    fn set_routing_threshold(&mut self, isl: f64) {
        self.isl_threshold = isl;
    }

    fn set_bypass_threshold(&mut self, max_isl: u32) {
        self.routing.ultra_short_max_isl = max_isl;
    }
}

/// DistServe-style search for the best static split: the `N_P:N_D` (each at least 1) that fits
/// `cfg.planner.sizing.gpu_budget` with the most requests meeting both SLOs, then the fewest
/// GPUs. (A count, not a rate: a rate over the run's duration would reward a split whose last
/// request ends a moment sooner, e.g. with several idle decode instances.) Returns the winner and
/// its run.
///
/// For each decode count it runs the most prefill the budget leaves, then finds the fewest
/// prefill instances with the same goodput by bisection (more prefill never serves fewer requests
/// within SLO), so a budget of `G` GPUs costs about `G/g_D · log2(G)` runs instead of `G²/2`.
/// Decode counts are tried in parallel, and the scan stops once three decode counts in a row
/// fall short of the best even with all the prefill they can have.
pub fn search_static(
    requests: &[SimRequest],
    profile: &Profile,
    cfg: &SimConfig,
) -> Result<(Replicas, SimResult), SimError> {
    let budget = cfg.planner.sizing.gpu_budget;
    let (g_p, g_d) = (profile.gpus.prefill.max(1), profile.gpus.decode.max(1));
    let max_decode = budget.saturating_sub(g_p) / g_d;
    let run = |prefill: u32, decode: u32| {
        let replicas = PerRole { prefill, decode };
        let run_cfg = SimConfig {
            policy: PolicySpec::Static { replicas },
            initial: replicas,
            record_control: false,
            ..cfg.clone()
        };
        simulate(requests, profile, &run_cfg).map(|r| (replicas, r))
    };
    let goodput = |r: &SimResult| {
        r.records
            .iter()
            .filter(|x| x.met_slo && x.arrival_s >= cfg.score_from_s)
            .count() as f64
    };
    // The best split for `decode` decode instances.
    let best_for = |decode: u32| -> Result<(Replicas, SimResult), SimError> {
        let most = (budget - decode * g_d) / g_p;
        let top = run(most, decode)?;
        let want = goodput(&top.1) - 0.5;
        let (mut lo, mut hi, mut found) = (1, most, top);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let r = run(mid, decode)?;
            if goodput(&r.1) >= want {
                hi = mid;
                found = r;
            } else {
                lo = mid + 1;
            }
        }
        Ok(found)
    };
    let scored = requests
        .iter()
        .filter(|r| r.arrival_s >= cfg.score_from_s)
        .count() as f64;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8) as u32;
    let mut best: Option<(Replicas, SimResult)> = None;
    let mut worse_in_a_row = 0;
    let mut next = 1;
    while next <= max_decode && worse_in_a_row < 3 {
        let batch: Vec<u32> = (next..=max_decode.min(next + threads - 1)).collect();
        next += batch.len() as u32;
        let found: Vec<Result<(Replicas, SimResult), SimError>> = std::thread::scope(|sc| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&d| sc.spawn(move || best_for(d)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or(Err(SimError::Invalid {
                        field: "search",
                        value: String::new(),
                        reason: "a search thread panicked",
                    }))
                })
                .collect()
        });
        for f in found {
            let (replicas, r) = f?;
            let better = best.as_ref().is_none_or(|(b, br)| {
                let (g, bg) = (goodput(&r), goodput(br));
                g > bg + 0.5 || ((g - bg).abs() <= 0.5 && replicas.gpus(profile) < b.gpus(profile))
            });
            // Stop only on splits that serve fewer, or as many with more GPUs, than a best that
            // serves most requests: among splits too small for the load, which requests still
            // make their SLOs says little (a deadline-first queue saves a few on one prefill
            // instance and none on many, whose prefills flood too few decode instances).
            let best_serves = best
                .as_ref()
                .is_some_and(|(_, br)| goodput(br) >= scored / 2.0);
            if better {
                best = Some((replicas, r));
                worse_in_a_row = 0;
            } else if best_serves {
                worse_in_a_row += 1;
            }
        }
    }
    best.ok_or(SimError::Invalid {
        field: "planner.sizing.gpu_budget",
        value: budget.to_string(),
        reason: "leaves no room for one prefill and one decode instance",
    })
}
