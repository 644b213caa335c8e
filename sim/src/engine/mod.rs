//! The event loop of a run. See the crate docs for the model. The loop's parts live in
//! `config` (what a run is told), `cluster` (the instances), `serving` (requests through
//! prefill, transfer and decode), `control` (what the control loop observes and orders) and
//! `search` (the best static split).

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

mod cluster;
mod config;
mod control;
mod search;
mod serving;

use config::validate;
pub use config::{PolicySpec, SimConfig, SimError, planner_config};
use control::oracle_inputs;
pub use search::search_static;

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
    /// Twice the summed mean decode context (prompt plus half the output) of the waiting and
    /// running sequences, kept as they come and go (the paced queue's room check reads it).
    ctx2_held: u64,
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
            ctx2_held: 0,
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
    /// The router's hint for a bypassed prompt: the most prompt tokens the decode step that
    /// prefills it may prefill in all (the bypass threshold when it was routed; 0: none).
    step_budget: u32,
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
                step_budget: 0,
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
}
