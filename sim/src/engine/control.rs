//! The control loop's view of the cluster: what it observes at each tick, the orders it gives
//! (the simulator implements the planner crate's `Actuator`), and the oracle's true workloads.

use super::*;

impl Sim<'_> {
    pub(super) fn snapshot(&self) -> Snapshot {
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
    pub(super) fn control(&mut self) {
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

/// The true workload of each planner interval, for the oracle: tick `k` at `k·Δ` sizes for
/// arrivals in `[k·Δ, (k+1)·Δ)`.
pub(super) fn oracle_inputs(requests: &[SimRequest], interval_s: f64) -> Vec<SizingInput> {
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
