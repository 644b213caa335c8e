//! Properties of the shared control loop, against a fake cluster: instances start after a delay,
//! drained ones hold their requests for a while, retired ones take a step to go.
//!
//! - Under a constant workload the targets stop changing after warm-up (no oscillation).
//! - Whatever the observations, targets and counts stay within the minimums, maximums and the
//!   GPU budget, and placeholders never take the total past the budget.

use dopd_planner::control::{
    Actuator, ControlConfig, Controller, Instance, InstanceState, Observer, Snapshot, StepReport,
};
use dopd_planner::forecast::ForecasterKind;
use dopd_planner::load::{LoadReading, LoadTotals};
use dopd_planner::planner::{Planner, PlannerConfig, PolicyKind};
use dopd_planner::profile::{PerRole, Profile, Role, roofline::RooflineSpec};
use dopd_planner::sizing::Replicas;
use proptest::prelude::*;

/// A fake cluster.
struct Cluster {
    insts: Vec<Instance>,
    /// Steps until each instance is ready, or until a draining one is empty.
    timers: Vec<u32>,
    totals: LoadTotals,
    kv_usage: f64,
    queued: u32,
    startup_steps: u32,
    drain_steps: u32,
    next_id: u32,
    /// Every count ever asked for, with the budget check's inputs.
    counts: Vec<(Role, u32)>,
    placeholders: Vec<Replicas>,
}

impl Cluster {
    fn new(initial: Replicas, startup_steps: u32, drain_steps: u32) -> Self {
        let mut c = Self {
            insts: Vec::new(),
            timers: Vec::new(),
            totals: LoadTotals::new(1),
            kv_usage: 0.0,
            queued: 0,
            startup_steps,
            drain_steps,
            next_id: 0,
            counts: Vec::new(),
            placeholders: Vec::new(),
        };
        for (role, n) in [
            (Role::Prefill, initial.prefill),
            (Role::Decode, initial.decode),
        ] {
            for _ in 0..n {
                c.add(role, InstanceState::Ready, 0);
            }
        }
        c
    }

    fn add(&mut self, role: Role, state: InstanceState, timer: u32) {
        self.next_id += 1;
        self.insts.push(Instance {
            state,
            created: f64::from(self.next_id),
            ..Instance::ready(format!("{role}-{}", self.next_id), role)
        });
        self.timers.push(timer);
    }

    /// Time passes: instances finish starting, drained ones empty.
    fn advance(&mut self) {
        for (i, t) in self.insts.iter_mut().zip(&mut self.timers) {
            *t = t.saturating_sub(1);
            match i.state {
                InstanceState::Starting if *t == 0 => i.state = InstanceState::Ready,
                InstanceState::Draining if *t == 0 => i.in_flight = Some(0),
                _ => {}
            }
            i.kv_usage = Some(self.kv_usage);
            i.queued = if i.role == Role::Prefill {
                self.queued
            } else {
                0
            };
        }
    }

    fn serve(&mut self, n: u32, isl: u32, osl: u32, ttft: f64, itl: f64) {
        for _ in 0..n {
            self.totals.arrive(isl);
            self.totals.first_token(ttft);
            self.totals
                .finish(osl, Some(itl), ttft + itl * f64::from(osl));
        }
    }
}

impl Observer for Cluster {
    fn load(&self) -> Option<LoadReading> {
        Some(LoadReading {
            totals: self.totals.clone(),
            router_waiting: 0,
        })
    }
    fn instances(&self) -> Vec<Instance> {
        self.insts.clone()
    }
}

impl Actuator for Cluster {
    fn set_count(&mut self, role: Role, serving: u32, _draining: u32) {
        self.counts.push((role, serving));
        let live = self
            .insts
            .iter()
            .filter(|i| i.role == role && i.state != InstanceState::Draining)
            .count() as u32;
        for _ in live..serving {
            self.add(role, InstanceState::Starting, self.startup_steps);
        }
    }
    fn drain(&mut self, _role: Role, ids: &[String]) {
        for (i, t) in self.insts.iter_mut().zip(&mut self.timers) {
            if ids.contains(&i.id) {
                i.state = InstanceState::Draining;
                i.in_flight = Some(3);
                *t = self.drain_steps;
            }
        }
    }
    fn retire(&mut self, _role: Role, ids: &[String]) {
        let keep: Vec<bool> = self.insts.iter().map(|i| !ids.contains(&i.id)).collect();
        let mut k = keep.iter();
        self.insts.retain(|_| *k.next().unwrap_or(&true));
        let mut k = keep.iter();
        self.timers.retain(|_| *k.next().unwrap_or(&true));
    }
    fn set_placeholders(&mut self, p: Replicas) {
        self.placeholders.push(p);
    }
}

/// Steps the loop `ticks` intervals on (two steps per interval: a tick and one between).
fn run(
    ctrl: &mut Controller,
    c: &mut Cluster,
    from: u32,
    ticks: u32,
    mut load: impl FnMut(&mut Cluster, u32),
) -> Vec<StepReport> {
    let mut out = Vec::new();
    for k in from..from + ticks {
        load(c, k);
        c.advance();
        out.push(step(ctrl, c, f64::from(k) * 10.0));
        c.advance();
        out.push(step(ctrl, c, f64::from(k) * 10.0 + 5.0));
    }
    out
}

/// One step: the cluster is observed (a snapshot), then acts.
fn step(ctrl: &mut Controller, c: &mut Cluster, now: f64) -> StepReport {
    let snap = Snapshot {
        load: c.load(),
        instances: c.instances(),
        known_next: None,
    };
    ctrl.step(now, &snap, c)
}

fn profile() -> Profile {
    RooflineSpec::llama33_70b_fp8_h100()
        .build()
        .expect("preset")
}

fn predictor() -> impl Strategy<Value = ForecasterKind> {
    prop::sample::select(vec![
        ForecasterKind::Arima,
        ForecasterKind::Kalman,
        ForecasterKind::Last,
        ForecasterKind::MovingAverage,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_constant_workload_settles_and_stays(
        policy in prop::sample::select(vec![PolicyKind::Dopd, PolicyKind::DynSla]),
        predictor in predictor(),
        requests in 1u32..800,
        isl in 50u32..6000,
        osl in 10u32..800,
        kv in 0.0f64..0.85,
        startup in 0u32..6,
    ) {
        let p = profile();
        let mut cfg = PlannerConfig { policy, predictor, ..PlannerConfig::default() };
        cfg.sizing.gpu_budget = 64;
        let ttft = p.ttft(f64::from(isl));
        let one = PerRole { prefill: 1, decode: 1 };
        let mut ctrl = Controller::new(
            Planner::new(p, cfg).expect("planner"),
            ControlConfig::default(),
            one,
        );
        let mut c = Cluster::new(one, startup, 2);
        c.kv_usage = kv;
        let load = |c: &mut Cluster, _k: u32| c.serve(requests, isl, osl, ttft, 0.03);
        // Warm-up: the forecasters' history, the learned spreads and the scale-down hold (six
        // start-ups of 45 s) all fit in ten minutes.
        let warm = run(&mut ctrl, &mut c, 0, 60, load);
        prop_assert!(warm.iter().any(|r| r.tick.is_some()));
        let settled = ctrl.target();
        for r in run(&mut ctrl, &mut c, 60, 30, load) {
            if let Some(t) = r.tick {
                prop_assert_eq!(t.decision.target, settled, "moved at {} s: {:?}", t.at, t.decision.reasons);
            }
        }
    }

    #[test]
    fn any_observations_keep_targets_within_bounds_and_budget(
        policy in prop::sample::select(vec![PolicyKind::Dopd, PolicyKind::DynSla, PolicyKind::DynLoad, PolicyKind::Static]),
        budget in 3u32..40,
        min in (1u32..3, 1u32..2),
        max in (prop::option::of(1u32..12), prop::option::of(1u32..12)),
        start in (1u32..6, 1u32..6),
        startup in 0u32..5,
        drain in 0u32..5,
        ticks in prop::collection::vec((0u32..3000, 1u32..9000, 1u32..2000, 0.0f64..1.2, 0u32..60), 1..30),
    ) {
        let p = profile();
        let mut cfg = PlannerConfig {
            policy,
            predictor: ForecasterKind::Last,
            ..PlannerConfig::default()
        };
        let max = PerRole {
            prefill: max.0.map(|m| m.max(min.0)),
            decode: max.1.map(|m| m.max(min.1)),
        };
        cfg.sizing.min_replicas = PerRole { prefill: min.0, decode: min.1 };
        cfg.sizing.max_replicas = max;
        cfg.sizing.gpu_budget = budget.max(min.0 + 2 * min.1);
        let budget = cfg.sizing.gpu_budget;
        let start = PerRole { prefill: start.0, decode: start.1 };
        let mut ctrl = Controller::new(
            Planner::new(p.clone(), cfg).expect("planner"),
            ControlConfig { headroom: true, drain_timeout_s: 40.0, ..ControlConfig::default() },
            start,
        );
        let mut c = Cluster::new(start, startup, drain);
        let n = ticks.len() as u32;
        let reports = run(&mut ctrl, &mut c, 0, n, |c, k| {
            let (requests, isl, osl, kv, queue) = ticks[k as usize];
            c.kv_usage = kv;
            c.queued = queue;
            c.serve(requests, isl, osl, 0.5, 0.05);
        });
        let within = |r: Replicas| {
            r.prefill >= min.0
                && r.decode >= min.1
                && max.prefill.is_none_or(|m| r.prefill <= m)
                && max.decode.is_none_or(|m| r.decode <= m)
        };
        for r in reports.iter().filter_map(|r| r.tick.as_ref()) {
            let t = r.decision.target;
            prop_assert!(t.gpus(&p) <= budget, "{t:?} over {budget} GPUs");
            // A starting point outside the bounds is brought inside from the first tick.
            prop_assert!(within(t), "{t:?} outside {min:?}..{max:?}");
            if let Some(h) = r.headroom {
                let total = PerRole {
                    prefill: t.prefill + h.placeholders.prefill,
                    decode: t.decode + h.placeholders.decode,
                };
                prop_assert!(total.gpus(&p) <= budget, "{t:?} + {h:?}");
            }
        }
        for (role, n) in &c.counts {
            let (lo, hi) = match role {
                Role::Prefill => (min.0, max.prefill),
                Role::Decode | Role::Mixed => (min.1, max.decode),
            };
            prop_assert!(*n >= lo && hi.is_none_or(|h| *n <= h), "{role} count {n}");
        }
    }
}
