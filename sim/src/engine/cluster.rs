//! The simulated cluster's instances: launching them within the GPU budget, starting, draining
//! and stopping them, and choosing one for new work.

use super::*;

impl Sim<'_> {
    pub(super) fn decode_kind(&self) -> Kind {
        if matches!(self.cfg.policy, PolicySpec::Aggregated { .. }) {
            Kind::Aggregated
        } else {
            Kind::Decode
        }
    }

    pub(super) fn gpus_changed(&mut self, delta: i64) {
        self.gpu_integral += f64::from(self.gpus_now) * (self.now - self.last_gpu_change);
        self.last_gpu_change = self.now;
        self.gpus_now = u32::try_from(i64::from(self.gpus_now) + delta).unwrap_or(0);
        self.peak_gpus = self.peak_gpus.max(self.gpus_now);
    }

    /// Adds an instance: ready at once (the initial fleet), starting, or pending when its GPUs
    /// would exceed the budget while other instances drain.
    pub(super) fn launch(&mut self, kind: Kind, ready: bool) {
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
    pub(super) fn start_pending(&mut self, k: usize) {
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

    pub(super) fn stop(&mut self, k: usize, at: f64) {
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
    pub(super) fn pick(&self, kind: Kind) -> Option<usize> {
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
    pub(super) fn load(&self, i: &Inst) -> f64 {
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

    /// A draining instance that has become idle: the control loop retires it.
    pub(super) fn maybe_retire(&mut self, k: usize) {
        if self.insts[k].state == State::Draining && self.insts[k].idle() {
            self.control();
        }
    }

    pub(super) fn counts(&self) -> PerRole<ReplicaState> {
        let mut c = PerRole::<ReplicaState>::default();
        for i in &self.insts {
            let s = match i.role() {
                Role::Prefill => &mut c.prefill,
                Role::Decode | Role::Mixed => &mut c.decode,
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
    pub(super) fn instances(&self) -> Vec<Instance> {
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

    pub(super) fn kind_of(&self, role: Role) -> Kind {
        if role == Role::Prefill {
            Kind::Prefill
        } else {
            self.decode_kind()
        }
    }

    pub(super) fn ids(&self, ids: &[String]) -> Vec<usize> {
        ids.iter()
            .filter_map(|id| id.parse::<usize>().ok())
            .filter(|&k| k < self.insts.len())
            .collect()
    }
}
