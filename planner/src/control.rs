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
//! | `arrival_cv2` | squared coefficient of variation of the gaps between the interval's timed arrivals (from at least 10 gaps; 1 for Poisson arrivals) |
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

/// Gaps between arrivals an interval needs before their spread is reported.
const MIN_GAPS: u64 = 10;

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
            // Placeholders sit beside both what runs now and what the target will run once its
            // instances are up, so neither with them exceeds the budget (measured against what
            // runs alone, a target still starting instances plus the placeholders could).
            let held = self.held();
            let base = PerRole {
                prefill: held.prefill.max(self.target.prefill),
                decode: held.decode.max(self.target.decode),
            };
            let cfg = self.planner.config();
            if let Some(f) = &decision.forecast {
                self.headroom = Some(headroom::plan(
                    self.planner.profile(),
                    &cfg.sizing,
                    f,
                    decision.kappa,
                    self.cfg.interval_s,
                    base,
                ));
            } else if let Some(h) = &mut self.headroom {
                // A tick without a forecast keeps the last upper bound, trimmed again for this
                // tick's target.
                h.placeholders = headroom::placeholders(
                    base,
                    h.upper,
                    self.planner.profile().gpus,
                    cfg.sizing.gpu_budget,
                );
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
        arrival_cv2: d.arrival_cv2(MIN_GAPS),
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
mod tests;
