//! The control loop the simulator, `dopd up` and the operator share.
//!
//! A [`Controller`] owns everything between the world and the [`Planner`]: when to tick, how the
//! interval's [`Observation`] is built (one meaning for every field, below), the short/long
//! routing threshold it hands to the router, headroom placeholders, which instances count as
//! ready or pending, and the scale plan: how many instances to run, and which ones to drain or
//! retire first. It reaches the world only through two traits:
//! - an [`Observer`] gives the router's cumulative [`LoadReading`] and every [`Instance`] with its
//!   state and the work it holds;
//! - an [`Actuator`] sets counts, drains and retires named instances, sets placeholders and the
//!   routing threshold.
//!
//! The loop does no I/O and never reads a clock: [`Controller::step`] takes the time as an
//! argument. Adapters that do I/O asynchronously (the operator, `dopd up`) read into a
//! [`Snapshot`] first and act on recorded [`Orders`] afterwards; the simulator reads its own state.
//!
//! ## The observation
//! Built at each tick from the difference between this reading and the previous one
//! ([`LoadTotals::since`]) and from the instances now:
//!
//! | field | meaning |
//! |---|---|
//! | `interval_s` | seconds since the previous tick (or since the first reading) |
//! | `requests` | requests admitted in the interval |
//! | `mean_isl` | mean prompt length of those requests |
//! | `mean_osl` | mean output length of the requests that *finished* in the interval (an output's length is known only at its end) |
//! | `ttft_s`, `ttft_p90_s` | mean and P90 time to first token of the first tokens delivered in the interval |
//! | `itl_s`, `itl_p90_s` | mean and P90 of the per-request mean inter-token latency of requests that finished in the interval |
//! | `request_duration_s` | mean arrival-to-last-token time of requests that finished in the interval |
//! | `finished`, `failed` | requests that finished, and that ended without finishing, in the interval |
//! | `prefill_queue_depth` | now: requests waiting in the router plus those queued on prefill instances |
//! | `kv_usage` | now: mean KV use over ready decode instances |
//! | `replicas` | now: ready = serving and not draining; pending = asked for and not serving yet (starting, or waiting for capacity), unschedulable and draining ones left out |
//!
//! ## Scaling down
//! Victims are chosen in this order: unschedulable, then pending, then starting instances (newest
//! first), then ready ones with the least outstanding work (then fewest requests, then newest).
//! A victim that holds no work and is not serving is retired at once; every other one is drained
//! (no new work) and retired when it holds no requests, or after `drain_timeout_s`. Retired
//! instances still observed (a pod being deleted, a process being stopped) count for nothing.

use serde::{Deserialize, Serialize};

use crate::headroom::{self, Headroom};
use crate::load::{LoadReading, LoadTotals};
use crate::planner::{Decision, Observation, Planner, ReplicaState};
use crate::profile::{PerRole, Role};
use crate::sizing::{Replicas, SizingInput};

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Asked for, and given up on waiting for capacity (a pod Pending past its timeout). It
    /// counts against the budget but the planner does not wait for it.
    Unschedulable,
    /// Asked for, waiting for capacity (GPUs, a node).
    Pending,
    /// Has its capacity and is starting (loading weights, warming up).
    Starting,
    /// Serving.
    Ready,
    /// Takes no new work; finishing what it holds.
    Draining,
}

impl InstanceState {
    /// Order in which victims are taken (lower first).
    fn victim_rank(self) -> u8 {
        match self {
            Self::Unschedulable => 0,
            Self::Pending => 1,
            Self::Starting => 2,
            Self::Ready => 3,
            Self::Draining => 4,
        }
    }
}

/// One instance (worker process, pod, simulated instance) as an observer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Stable identity (pod name, process id, simulator index).
    pub id: String,
    pub role: Role,
    pub state: InstanceState,
    /// Requests it holds (queued or running); `None` when unknown (e.g. the router cannot be
    /// read). A draining instance is retired only once this is known to be 0.
    pub in_flight: Option<u32>,
    /// Outstanding work in tokens (prompt tokens still to prefill plus output tokens still to
    /// generate), used to pick the cheapest victims; 0 when unknown.
    pub work: f64,
    /// Requests waiting for prefill in its queue.
    pub queued: u32,
    /// Fraction of its KV blocks in use (decode instances; `None` when unknown).
    pub kv_usage: Option<f64>,
    /// When it was asked for, in any unit where newer is larger (only compared).
    pub created: f64,
}

impl Instance {
    /// A ready instance holding nothing (tests, fakes).
    pub fn ready(id: impl Into<String>, role: Role) -> Self {
        Self {
            id: id.into(),
            role,
            state: InstanceState::Ready,
            in_flight: Some(0),
            work: 0.0,
            queued: 0,
            kv_usage: Some(0.0),
            created: 0.0,
        }
    }
}

/// What the loop reads from the world.
pub trait Observer {
    /// The router's cumulative reading now; `None` when it cannot be read.
    fn load(&self) -> Option<LoadReading>;
    /// Every instance asked for and not yet stopped.
    fn instances(&self) -> Vec<Instance>;
    /// The true workload of the next interval, where the observer knows it (the simulator's
    /// oracle); the planner then sizes for it instead of its forecast.
    fn known_next(&self) -> Option<SizingInput> {
        None
    }
}

/// How the loop changes the world. Calls within one step come in this order: retire, drain,
/// set_count, then placeholders and the routing threshold.
pub trait Actuator {
    /// Keep `serving` instances of `role` that take work (starting ones included), plus
    /// `draining` draining ones until they are retired. Start what is missing. Never remove an
    /// instance on its own: victims are always named first through `drain` or `retire`.
    fn set_count(&mut self, role: Role, serving: u32, draining: u32);
    /// Send no new work to these instances; they finish what they hold.
    fn drain(&mut self, role: Role, ids: &[String]);
    /// Stop these instances now (cancelling the ones still starting).
    fn retire(&mut self, role: Role, ids: &[String]);
    /// Placeholder instances per role for the cluster autoscaler.
    fn set_placeholders(&mut self, _placeholders: Replicas) {}
    /// The router's short/long threshold (a mean prompt length, tokens).
    fn set_routing_threshold(&mut self, _isl: f64) {}
    /// The largest prompt the router prefills on a decode instance (tokens), when the planner
    /// derives it.
    fn set_bypass_threshold(&mut self, _max_isl: u32) {}
}

/// An observation taken ahead of the step (for adapters that read asynchronously).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub load: Option<LoadReading>,
    pub instances: Vec<Instance>,
    pub known_next: Option<SizingInput>,
}

impl Observer for Snapshot {
    fn load(&self) -> Option<LoadReading> {
        self.load.clone()
    }
    fn instances(&self) -> Vec<Instance> {
        self.instances.clone()
    }
    fn known_next(&self) -> Option<SizingInput> {
        self.known_next
    }
}

/// One actuator call, recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "order", rename_all = "snake_case")]
pub enum Order {
    SetCount {
        role: Role,
        serving: u32,
        draining: u32,
    },
    Drain {
        role: Role,
        ids: Vec<String>,
    },
    Retire {
        role: Role,
        ids: Vec<String>,
    },
    Placeholders {
        placeholders: Replicas,
    },
    RoutingThreshold {
        isl: f64,
    },
    BypassThreshold {
        max_isl: u32,
    },
}

/// An actuator that records its calls, to be carried out afterwards (asynchronously, or by a
/// simulator that cannot lend itself to the loop while it observes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Orders(pub Vec<Order>);

impl Actuator for Orders {
    fn set_count(&mut self, role: Role, serving: u32, draining: u32) {
        self.0.push(Order::SetCount {
            role,
            serving,
            draining,
        });
    }
    fn drain(&mut self, role: Role, ids: &[String]) {
        self.0.push(Order::Drain {
            role,
            ids: ids.to_vec(),
        });
    }
    fn retire(&mut self, role: Role, ids: &[String]) {
        self.0.push(Order::Retire {
            role,
            ids: ids.to_vec(),
        });
    }
    fn set_placeholders(&mut self, placeholders: Replicas) {
        self.0.push(Order::Placeholders { placeholders });
    }
    fn set_routing_threshold(&mut self, isl: f64) {
        self.0.push(Order::RoutingThreshold { isl });
    }
    fn set_bypass_threshold(&mut self, max_isl: u32) {
        self.0.push(Order::BypassThreshold { max_isl });
    }
}

impl Orders {
    /// Carries the recorded calls out on `a`, in order.
    pub fn apply(&self, a: &mut dyn Actuator) {
        for o in &self.0 {
            match o {
                Order::SetCount {
                    role,
                    serving,
                    draining,
                } => a.set_count(*role, *serving, *draining),
                Order::Drain { role, ids } => a.drain(*role, ids),
                Order::Retire { role, ids } => a.retire(*role, ids),
                Order::Placeholders { placeholders } => a.set_placeholders(*placeholders),
                Order::RoutingThreshold { isl } => a.set_routing_threshold(*isl),
                Order::BypassThreshold { max_isl } => a.set_bypass_threshold(*max_isl),
            }
        }
    }
}

/// Settings of the loop itself (the planner has its own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Seconds between ticks.
    pub interval_s: f64,
    /// A drained instance still holding requests after this long is retired anyway
    /// (`f64::INFINITY`: never).
    pub drain_timeout_s: f64,
    /// Compute placeholders for the cluster autoscaler from the forecast's upper bound.
    pub headroom: bool,
    /// No ticks (drains still finish).
    pub paused: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            interval_s: 10.0,
            drain_timeout_s: 300.0,
            headroom: false,
            paused: false,
        }
    }
}

/// An instance being drained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    pub id: String,
    pub role: Role,
    /// When the drain began (the loop's clock).
    pub started: f64,
}

/// A drain that ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retired {
    pub id: String,
    pub role: Role,
    /// Seconds it drained.
    pub drained_s: f64,
    /// Retired at the timeout with requests still in flight.
    pub timed_out: bool,
}

/// What one tick saw and decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TickReport {
    pub at: f64,
    pub observation: Observation,
    pub decision: Decision,
    /// Serving targets before the tick.
    pub before: Replicas,
    /// Victims drained by this tick, and those retired at once.
    pub drained: Vec<(Role, String)>,
    pub retired: Vec<(Role, String)>,
    pub headroom: Option<Headroom>,
    /// The short/long threshold handed to the router.
    pub routing_threshold: Option<f64>,
    /// The bypass threshold handed to the router (when the planner derives it).
    #[serde(default)]
    pub bypass_threshold: Option<u32>,
}

impl TickReport {
    /// Whether the tick changed a target.
    pub fn changed(&self) -> bool {
        self.decision.target != self.before
    }
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The tick, when one was due and the load could be read.
    pub tick: Option<TickReport>,
    /// Drains that ended in this step.
    pub retired: Vec<Retired>,
    /// A tick was due but the load could not be read (it is retried at the next step).
    pub load_unavailable: bool,
    /// The first reading was taken (the first tick follows one interval later).
    pub baseline: bool,
}

/// The control loop. See the module docs.
#[derive(Debug)]
pub struct Controller {
    planner: Planner,
    cfg: ControlConfig,
    target: Replicas,
    next_tick: Option<f64>,
    last_tick_at: f64,
    baseline: Option<LoadTotals>,
    drains: Vec<Drain>,
    /// Instances retired and still observed (being stopped): neither live nor adoptable.
    retired: Vec<String>,
    headroom: Option<Headroom>,
    last: Option<TickReport>,
    last_now: f64,
}

impl Controller {
    /// A loop around `planner`, starting from `initial` serving instances per role (clamped to
    /// the planner's bounds).
    pub fn new(planner: Planner, cfg: ControlConfig, initial: Replicas) -> Self {
        let mut c = Self {
            planner,
            cfg,
            target: initial,
            next_tick: None,
            last_tick_at: 0.0,
            baseline: None,
            drains: Vec::new(),
            retired: Vec::new(),
            headroom: None,
            last: None,
            last_now: 0.0,
        };
        c.target = c.clamped(initial);
        c
    }

    /// The planner (its config, profile and routing threshold).
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    /// Serving instances per role the loop wants now.
    pub fn target(&self) -> Replicas {
        self.target
    }

    /// Instances being drained.
    pub fn drains(&self) -> &[Drain] {
        &self.drains
    }

    /// Draining instances per role.
    pub fn draining(&self) -> Replicas {
        let n = |role| self.drains.iter().filter(|d| d.role == role).count() as u32;
        PerRole {
            prefill: n(Role::Prefill),
            decode: n(Role::Decode),
        }
    }

    /// Instances to keep per role: the targets plus those still draining (what a Deployment's
    /// replica count must be).
    pub fn held(&self) -> Replicas {
        let d = self.draining();
        PerRole {
            prefill: self.target.prefill + d.prefill,
            decode: self.target.decode + d.decode,
        }
    }

    pub fn headroom(&self) -> Option<&Headroom> {
        self.headroom.as_ref()
    }

    /// The latest tick.
    pub fn last_tick(&self) -> Option<&TickReport> {
        self.last.as_ref()
    }

    /// When the next tick is due (`None` before the first step).
    pub fn next_tick(&self) -> Option<f64> {
        self.next_tick
    }

    /// Replaces the planner (new settings or profile), keeping targets, drains and the reading.
    pub fn replace_planner(&mut self, planner: Planner) {
        self.planner = planner;
        self.target = self.clamped(self.target);
    }

    /// New loop settings; a shorter interval applies from `now`.
    pub fn set_config(&mut self, cfg: ControlConfig, now: f64) {
        if let Some(n) = self.next_tick.as_mut() {
            *n = n.min(now + cfg.interval_s);
        }
        if !cfg.headroom {
            self.headroom = None;
        }
        self.cfg = cfg;
    }

    fn clamped(&self, r: Replicas) -> Replicas {
        let s = &self.planner.config().sizing;
        let clamp = |v: u32, min: u32, max: Option<u32>| v.max(min).min(max.unwrap_or(u32::MAX));
        PerRole {
            prefill: clamp(r.prefill, s.min_replicas.prefill, s.max_replicas.prefill),
            decode: clamp(r.decode, s.min_replicas.decode, s.max_replicas.decode),
        }
    }

    /// One pass of the loop at time `now`: ends drains that are done, and ticks when a tick is
    /// due. Cheap when nothing is due; adapters call it as often as they like.
    pub fn step(
        &mut self,
        now: f64,
        observer: &dyn Observer,
        actuator: &mut dyn Actuator,
    ) -> StepReport {
        let now = if now.is_finite() { now } else { self.last_now };
        self.last_now = now;
        let instances = observer.instances();
        let mut report = StepReport {
            retired: self.finish_drains(now, &instances, actuator),
            ..StepReport::default()
        };
        let Some(due) = self.next_tick else {
            // The first step: the reading to measure the first interval from.
            self.next_tick = Some(now + self.cfg.interval_s);
            self.last_tick_at = now;
            if let Some(r) = observer.load() {
                self.baseline = Some(r.totals);
                report.baseline = true;
            }
            return report;
        };
        if self.cfg.paused || now < due {
            return report;
        }
        let Some(reading) = observer.load() else {
            report.load_unavailable = true;
            return report;
        };
        let Some(base) = self.baseline.take() else {
            self.baseline = Some(reading.totals);
            self.last_tick_at = now;
            self.next_tick = Some(now + self.cfg.interval_s);
            report.baseline = true;
            return report;
        };
        let tick = self.tick(now, &base, &reading, &instances, observer, actuator);
        self.baseline = Some(reading.totals);
        self.last_tick_at = now;
        let next = due + self.cfg.interval_s;
        self.next_tick = Some(if next > now {
            next
        } else {
            now + self.cfg.interval_s
        });
        self.last = Some(tick.clone());
        report.tick = Some(tick);
        report
    }

    fn tracked(&self, id: &str) -> bool {
        self.drains.iter().any(|d| d.id == id) || self.retired.iter().any(|r| r == id)
    }

    /// Retires drained instances that hold nothing (or whose time is up); forgets those gone.
    /// A draining instance the loop did not drain itself (drained before a restart of the loop,
    /// e.g. by the previous operator leader) is adopted.
    fn finish_drains(
        &mut self,
        now: f64,
        instances: &[Instance],
        actuator: &mut dyn Actuator,
    ) -> Vec<Retired> {
        self.retired
            .retain(|id| instances.iter().any(|i| &i.id == id));
        for i in instances {
            if i.state == InstanceState::Draining && !self.tracked(&i.id) {
                self.drains.push(Drain {
                    id: i.id.clone(),
                    role: i.role,
                    started: now,
                });
            }
        }
        let mut done = Vec::new();
        let mut gone = false;
        let timeout = self.cfg.drain_timeout_s;
        self.drains.retain(|d| {
            let Some(i) = instances.iter().find(|i| i.id == d.id) else {
                gone = true;
                return false;
            };
            let idle = i.in_flight == Some(0);
            let timed_out = !idle && now - d.started >= timeout;
            if idle || timed_out {
                done.push(Retired {
                    id: d.id.clone(),
                    role: d.role,
                    drained_s: now - d.started,
                    timed_out,
                });
                return false;
            }
            true
        });
        for role in [Role::Prefill, Role::Decode] {
            let ids: Vec<String> = done
                .iter()
                .filter(|r| r.role == role)
                .map(|r| r.id.clone())
                .collect();
            if !ids.is_empty() {
                actuator.retire(role, &ids);
                self.retired.extend(ids);
            }
        }
        if !done.is_empty() || gone {
            let d = self.draining();
            for role in [Role::Prefill, Role::Decode] {
                actuator.set_count(role, self.target.get(role), d.get(role));
            }
        }
        done
    }

    fn tick(
        &mut self,
        now: f64,
        base: &LoadTotals,
        reading: &LoadReading,
        instances: &[Instance],
        observer: &dyn Observer,
        actuator: &mut dyn Actuator,
    ) -> TickReport {
        let interval = if now > self.last_tick_at {
            now - self.last_tick_at
        } else {
            self.cfg.interval_s
        };
        let live: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.state != InstanceState::Draining && !self.tracked(&i.id))
            .collect();
        let obs = observation(reading, base, &live, instances, interval);
        let known = observer.known_next();
        let decision = match known {
            Some(k) => self.planner.tick_with_known_next(now, &obs, k),
            None => self.planner.tick(now, &obs),
        };
        let before = self.target;
        self.target = decision.target;
        let (drained, retired) = self.scale(now, &live, actuator);
        let threshold = known
            .map(|k| k.isl)
            .filter(|isl| *isl > 0.0)
            .or(self.planner.isl_threshold());
        if let Some(t) = threshold {
            actuator.set_routing_threshold(t);
        }
        if let Some(b) = self.planner.bypass_threshold() {
            actuator.set_bypass_threshold(b);
        }
        if self.cfg.headroom {
            if let Some(f) = &decision.forecast {
                let d = self.draining();
                let running = PerRole {
                    prefill: self.target.prefill + d.prefill,
                    decode: self.target.decode + d.decode,
                };
                let cfg = self.planner.config();
                self.headroom = Some(headroom::plan(
                    self.planner.profile(),
                    &cfg.sizing,
                    f,
                    decision.kappa,
                    self.cfg.interval_s,
                    running,
                ));
            }
            let p = self
                .headroom
                .map_or_else(Replicas::default, |h| h.placeholders);
            actuator.set_placeholders(p);
        }
        TickReport {
            at: now,
            observation: obs,
            decision,
            before,
            drained,
            retired,
            headroom: self.headroom,
            routing_threshold: threshold,
            bypass_threshold: self.planner.bypass_threshold(),
        }
    }

    /// Brings each role to its target: names victims (retired at once when idle and not
    /// serving, drained otherwise), then sets the counts.
    #[allow(clippy::type_complexity)]
    fn scale(
        &mut self,
        now: f64,
        live: &[&Instance],
        actuator: &mut dyn Actuator,
    ) -> (Vec<(Role, String)>, Vec<(Role, String)>) {
        let (mut drained, mut retired) = (Vec::new(), Vec::new());
        for role in [Role::Prefill, Role::Decode] {
            let mine: Vec<&Instance> = live.iter().copied().filter(|i| i.role == role).collect();
            let want = self.target.get(role) as usize;
            let excess = mine.len().saturating_sub(want);
            let (mut drain, mut retire) = (Vec::new(), Vec::new());
            for v in victims(&mine, excess) {
                if v.state != InstanceState::Ready && v.in_flight.unwrap_or(0) == 0 {
                    retire.push(v.id.clone());
                } else {
                    drain.push(v.id.clone());
                }
            }
            if !retire.is_empty() {
                actuator.retire(role, &retire);
                self.retired.extend(retire.iter().cloned());
            }
            if !drain.is_empty() {
                actuator.drain(role, &drain);
                self.drains.extend(drain.iter().map(|id| Drain {
                    id: id.clone(),
                    role,
                    started: now,
                }));
            }
            drained.extend(drain.into_iter().map(|id| (role, id)));
            retired.extend(retire.into_iter().map(|id| (role, id)));
            let d = self.draining();
            actuator.set_count(role, self.target.get(role), d.get(role));
        }
        (drained, retired)
    }
}

/// The interval's observation (see the module docs for each field's meaning). `live` are the
/// instances neither draining nor being drained; `all` every instance.
pub fn observation(
    reading: &LoadReading,
    base: &LoadTotals,
    live: &[&Instance],
    all: &[Instance],
    interval_s: f64,
) -> Observation {
    let d = reading.totals.since(Some(base));
    let count = |role: Role, states: &[InstanceState]| {
        live.iter()
            .filter(|i| i.role == role && states.contains(&i.state))
            .count() as u32
    };
    let waiting = [InstanceState::Pending, InstanceState::Starting];
    let ready = [InstanceState::Ready];
    let replicas = PerRole {
        prefill: ReplicaState {
            ready: count(Role::Prefill, &ready),
            pending: count(Role::Prefill, &waiting),
        },
        decode: ReplicaState {
            ready: count(Role::Decode, &ready),
            pending: count(Role::Decode, &waiting),
        },
    };
    let queued: u64 = all
        .iter()
        .filter(|i| i.role == Role::Prefill)
        .map(|i| u64::from(i.queued))
        .sum();
    let kv: Vec<f64> = live
        .iter()
        .filter(|i| i.role == Role::Decode && i.state == InstanceState::Ready)
        .filter_map(|i| i.kv_usage)
        .filter(|v| v.is_finite())
        .collect();
    let ttft = d.ttft_s.as_ref();
    let itl = d.itl_s.as_ref();
    Observation {
        interval_s,
        requests: d.arrived as f64,
        mean_isl: d.mean_isl(),
        mean_osl: d.mean_osl(),
        ttft_s: ttft.and_then(|h| h.mean()),
        ttft_p90_s: ttft.and_then(|h| h.quantile(0.9)),
        itl_s: itl.and_then(|h| h.mean()),
        itl_p90_s: itl.and_then(|h| h.quantile(0.9)),
        request_duration_s: d.mean_duration_s(),
        finished: d.finished as f64,
        failed: d.failed as f64,
        isl_sq_mean: d.mean_isl_sq(),
        osl_sq_mean: d.mean_osl_sq(),
        ttft_hist: d.ttft_s.clone(),
        itl_hist: d.itl_s.clone(),
        isl_hist: d.prompt_lengths.clone(),
        prefill_queue_depth: (reading.router_waiting + queued) as f64,
        kv_usage: if kv.is_empty() {
            0.0
        } else {
            kv.iter().sum::<f64>() / kv.len() as f64
        },
        replicas,
    }
}

/// The `n` instances to remove first (see the module docs for the order). Ties keep the later
/// position in `candidates` first (newer, where observers list instances oldest first).
pub fn victims<'a>(candidates: &[&'a Instance], n: usize) -> Vec<&'a Instance> {
    let mut v: Vec<(usize, &Instance)> = candidates.iter().copied().enumerate().collect();
    v.sort_by(|(pa, a), (pb, b)| {
        let ready = a.state == InstanceState::Ready;
        let by_load = if ready && b.state == InstanceState::Ready {
            a.work.total_cmp(&b.work).then(
                a.in_flight
                    .unwrap_or(u32::MAX)
                    .cmp(&b.in_flight.unwrap_or(u32::MAX)),
            )
        } else {
            std::cmp::Ordering::Equal
        };
        a.state
            .victim_rank()
            .cmp(&b.state.victim_rank())
            .then(by_load)
            .then(b.created.total_cmp(&a.created))
            .then(pb.cmp(pa))
    });
    v.into_iter().take(n).map(|(_, i)| i).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::forecast::ForecasterKind;
    use crate::planner::{PlannerConfig, PolicyKind};
    use crate::profile::Profile;

    fn planner(policy: PolicyKind) -> Planner {
        let mut c = PlannerConfig {
            policy,
            predictor: ForecasterKind::Last,
            scale_down_stabilization_s: 0.0,
            ..PlannerConfig::default()
        };
        c.sizing.gpu_budget = 8;
        c.static_replicas = PerRole {
            prefill: 1,
            decode: 1,
        };
        Planner::new(Profile::constant_latency(0.2, 0.02, 2000, 16), c).unwrap()
    }

    fn inst(id: &str, role: Role, state: InstanceState, in_flight: u32, work: f64) -> Instance {
        Instance {
            state,
            in_flight: Some(in_flight),
            work,
            ..Instance::ready(id, role)
        }
    }

    #[test]
    fn victims_go_not_ready_first_then_least_loaded_then_newest() {
        let a = inst("a", Role::Decode, InstanceState::Ready, 3, 300.0);
        let b = inst("b", Role::Decode, InstanceState::Ready, 1, 100.0);
        let c = inst("c", Role::Decode, InstanceState::Starting, 0, 0.0);
        let d = inst("d", Role::Decode, InstanceState::Ready, 1, 100.0);
        let e = inst("e", Role::Decode, InstanceState::Unschedulable, 0, 0.0);
        let all = [&a, &b, &c, &d, &e];
        let ids: Vec<&str> = victims(&all, 4).iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["e", "c", "d", "b"]);
        assert!(victims(&all, 0).is_empty());
        assert_eq!(victims(&all, 9).len(), 5);
    }

    /// A fake world: instances follow set_count at once (ready after `startup` steps), drains
    /// empty when told.
    #[derive(Default)]
    struct World {
        insts: Vec<Instance>,
        load: LoadReading,
        next_id: u32,
        threshold: Option<f64>,
    }

    impl Observer for World {
        fn load(&self) -> Option<LoadReading> {
            Some(self.load.clone())
        }
        fn instances(&self) -> Vec<Instance> {
            self.insts.clone()
        }
    }

    impl Actuator for World {
        fn set_count(&mut self, role: Role, serving: u32, _draining: u32) {
            let live = self
                .insts
                .iter()
                .filter(|i| i.role == role && i.state != InstanceState::Draining)
                .count() as u32;
            for _ in live..serving {
                self.next_id += 1;
                let id = format!("{}{}", role.as_str(), self.next_id);
                self.insts
                    .push(inst(&id, role, InstanceState::Ready, 0, 0.0));
            }
        }
        fn drain(&mut self, _role: Role, ids: &[String]) {
            for i in &mut self.insts {
                if ids.contains(&i.id) {
                    i.state = InstanceState::Draining;
                }
            }
        }
        fn retire(&mut self, _role: Role, ids: &[String]) {
            self.insts.retain(|i| !ids.contains(&i.id));
        }
        fn set_routing_threshold(&mut self, isl: f64) {
            self.threshold = Some(isl);
        }
    }

    fn arrive(w: &mut World, n: u32, isl: u32) {
        for _ in 0..n {
            w.load.totals.arrive(isl);
        }
    }

    /// Drives the loop against the world with the recording actuator in between (the way the
    /// async adapters do), checking both paths give the same orders.
    fn step(c: &mut Controller, w: &mut World, now: f64) -> StepReport {
        let snap = Snapshot {
            load: w.load(),
            instances: w.instances(),
            known_next: None,
        };
        let mut orders = Orders::default();
        let r = c.step(now, &snap, &mut orders);
        orders.apply(w);
        r
    }

    #[test]
    fn the_first_step_takes_a_baseline_and_ticks_follow_at_the_interval() {
        let mut w = World::default();
        arrive(&mut w, 1000, 100);
        w.insts = vec![
            Instance::ready("p", Role::Prefill),
            Instance::ready("d", Role::Decode),
        ];
        let one = PerRole {
            prefill: 1,
            decode: 1,
        };
        let mut c = Controller::new(planner(PolicyKind::Dopd), ControlConfig::default(), one);
        let r = step(&mut c, &mut w, 5.0);
        assert!(r.baseline && r.tick.is_none());
        assert_eq!(c.next_tick(), Some(15.0));
        assert!(step(&mut c, &mut w, 14.9).tick.is_none());
        arrive(&mut w, 30, 500);
        let t = step(&mut c, &mut w, 15.0).tick.unwrap();
        // Only what came after the baseline counts.
        assert_eq!(t.observation.requests, 30.0);
        assert_eq!(t.observation.mean_isl, Some(500.0));
        assert_eq!(t.observation.interval_s, 10.0);
        assert_eq!(c.next_tick(), Some(25.0));
        assert_eq!(w.threshold, Some(500.0));
        // A late step ticks once and schedules the next tick one interval on.
        let t = step(&mut c, &mut w, 47.0).tick.unwrap();
        assert_eq!(t.observation.interval_s, 32.0);
        assert_eq!(c.next_tick(), Some(57.0));
    }

    #[test]
    fn scale_down_drains_busy_victims_and_retires_them_once_idle() {
        let mut w = World {
            insts: vec![
                Instance::ready("p", Role::Prefill),
                inst("d1", Role::Decode, InstanceState::Ready, 4, 400.0),
                inst("d2", Role::Decode, InstanceState::Ready, 1, 50.0),
                inst("d3", Role::Decode, InstanceState::Starting, 0, 0.0),
            ],
            ..World::default()
        };
        let mut c = Controller::new(
            planner(PolicyKind::Static),
            ControlConfig {
                drain_timeout_s: 60.0,
                ..ControlConfig::default()
            },
            PerRole {
                prefill: 1,
                decode: 3,
            },
        );
        step(&mut c, &mut w, 0.0);
        let t = step(&mut c, &mut w, 10.0).tick.unwrap();
        assert_eq!(t.decision.target.decode, 1);
        assert_eq!(t.retired, [(Role::Decode, "d3".to_string())]);
        assert_eq!(t.drained, [(Role::Decode, "d2".to_string())]);
        assert_eq!(c.held().decode, 2);
        // Still busy: kept.
        assert!(step(&mut c, &mut w, 11.0).retired.is_empty());
        w.insts[2].in_flight = Some(0);
        let r = step(&mut c, &mut w, 12.0);
        assert_eq!(r.retired.len(), 1);
        assert!(!r.retired[0].timed_out);
        assert_eq!(c.held().decode, 1);
        let ids: Vec<&str> = w.insts.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["p", "d1"]);
    }

    #[test]
    fn a_drain_that_never_ends_is_cut_at_the_timeout_and_unknown_load_is_not_idle() {
        let mut w = World {
            insts: vec![
                Instance::ready("p", Role::Prefill),
                inst("d1", Role::Decode, InstanceState::Ready, 4, 400.0),
                inst("d2", Role::Decode, InstanceState::Ready, 2, 200.0),
            ],
            ..World::default()
        };
        let mut c = Controller::new(
            planner(PolicyKind::Static),
            ControlConfig {
                drain_timeout_s: 30.0,
                ..ControlConfig::default()
            },
            PerRole {
                prefill: 1,
                decode: 2,
            },
        );
        step(&mut c, &mut w, 0.0);
        step(&mut c, &mut w, 10.0);
        assert_eq!(c.drains().len(), 1);
        w.insts[2].in_flight = None;
        assert!(step(&mut c, &mut w, 39.0).retired.is_empty());
        let r = step(&mut c, &mut w, 40.0);
        assert!(r.retired[0].timed_out, "{r:?}");
        assert!(c.drains().is_empty());
    }

    #[test]
    fn earlier_drains_are_adopted_and_retired_instances_still_listed_count_for_nothing() {
        let mut snap = Snapshot {
            load: Some(LoadReading::default()),
            instances: vec![
                Instance::ready("p", Role::Prefill),
                Instance::ready("d1", Role::Decode),
                inst("d2", Role::Decode, InstanceState::Draining, 1, 10.0),
            ],
            known_next: None,
        };
        let one = PerRole {
            prefill: 1,
            decode: 1,
        };
        let mut c = Controller::new(planner(PolicyKind::Static), ControlConfig::default(), one);
        let mut o = Orders::default();
        c.step(0.0, &snap, &mut o);
        assert_eq!(c.held().decode, 2, "the drain in progress is kept");
        snap.instances[2].in_flight = Some(0);
        let r = c.step(1.0, &snap, &mut o);
        assert_eq!(r.retired.len(), 1);
        assert_eq!(c.held().decode, 1);
        // Still listed while it stops (a pod being deleted): not adopted again, not live.
        for t in [2.0, 10.0, 20.0] {
            let r = c.step(t, &snap, &mut o);
            assert!(r.retired.is_empty());
            assert_eq!(c.held().decode, 1);
            if let Some(t) = r.tick {
                assert_eq!(t.observation.replicas.decode.ready, 1);
                assert!(t.drained.is_empty() && t.retired.is_empty(), "{t:?}");
            }
        }
        // A retired starting instance still listed is not counted either.
        snap.instances
            .push(inst("d3", Role::Decode, InstanceState::Starting, 0, 0.0));
        snap.instances.remove(2);
        let t = c.step(30.0, &snap, &mut o).tick.expect("a tick");
        assert_eq!(t.retired, [(Role::Decode, "d3".to_string())]);
        let t = c.step(40.0, &snap, &mut o).tick.expect("a tick");
        assert_eq!(t.observation.replicas.decode.pending, 0);
        assert!(t.retired.is_empty());
    }

    #[test]
    fn draining_and_unschedulable_instances_are_neither_ready_nor_pending() {
        let reading = LoadReading::default();
        let all = vec![
            inst("p1", Role::Prefill, InstanceState::Ready, 0, 0.0),
            Instance {
                queued: 3,
                ..inst("p2", Role::Prefill, InstanceState::Draining, 3, 0.0)
            },
            inst("p3", Role::Prefill, InstanceState::Unschedulable, 0, 0.0),
            Instance {
                kv_usage: Some(0.5),
                ..inst("d1", Role::Decode, InstanceState::Ready, 0, 0.0)
            },
            Instance {
                kv_usage: Some(0.9),
                ..inst("d2", Role::Decode, InstanceState::Draining, 0, 0.0)
            },
            inst("d3", Role::Decode, InstanceState::Starting, 0, 0.0),
        ];
        let live: Vec<&Instance> = all
            .iter()
            .filter(|i| i.state != InstanceState::Draining)
            .collect();
        let o = observation(&reading, &LoadTotals::default(), &live, &all, 10.0);
        assert_eq!(
            (o.replicas.prefill.ready, o.replicas.prefill.pending),
            (1, 0)
        );
        assert_eq!((o.replicas.decode.ready, o.replicas.decode.pending), (1, 1));
        // Queued prefills count wherever they are; KV use only on serving decode instances.
        assert_eq!(o.prefill_queue_depth, 3.0);
        assert_eq!(o.kv_usage, 0.5);
        assert_eq!(o.requests, 0.0);
        assert_eq!(o.mean_isl, None);
    }

    #[test]
    fn an_unreadable_load_postpones_the_tick_and_a_pause_stops_it() {
        struct Blind;
        impl Observer for Blind {
            fn load(&self) -> Option<LoadReading> {
                None
            }
            fn instances(&self) -> Vec<Instance> {
                Vec::new()
            }
        }
        let one = PerRole {
            prefill: 1,
            decode: 1,
        };
        let mut c = Controller::new(planner(PolicyKind::Dopd), ControlConfig::default(), one);
        let mut o = Orders::default();
        assert!(!c.step(0.0, &Blind, &mut o).baseline);
        let r = c.step(10.0, &Blind, &mut o);
        assert!(r.load_unavailable && r.tick.is_none());
        // The first good reading becomes the baseline; the tick follows an interval later.
        let mut w = World::default();
        assert!(step(&mut c, &mut w, 11.0).baseline);
        assert!(step(&mut c, &mut w, 21.0).tick.is_some());
        c.set_config(
            ControlConfig {
                paused: true,
                ..ControlConfig::default()
            },
            21.0,
        );
        assert!(step(&mut c, &mut w, 40.0).tick.is_none());
    }
}
