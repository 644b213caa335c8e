//! Tests of the control loop against fakes.
#![allow(clippy::unwrap_used)]

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
