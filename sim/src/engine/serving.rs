//! Serving requests: routing on arrival, the prefill queues and instances, KV transfer, and the
//! decode steps (with chunked local prefill) until each request finishes.

use super::*;

impl Sim<'_> {
    pub(super) fn arrive(&mut self, i: usize) {
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
        self.reqs[i].step_budget = routing::step_prefill_budget(class, &self.routing);
        // The router's policy. Whether a prefill instance can take the request is decided when
        // the prefill is dispatched (`dispatch_prefill`), as the router does for batches.
        let (route, why) =
            routing::route_with_room(class, true, &self.routing, || self.local_room(i));
        if why == routing::RouteReason::DecodeFull {
            self.reqs[i].route = Route::Long;
        }
        match route {
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

    /// Whether the decode instance a local prefill of request `i` would go to can admit it at
    /// its next step (its reservation fits beside those running and those already waiting).
    fn local_room(&self, i: usize) -> bool {
        let Some(k) = self.pick(self.decode_kind()) else {
            return true;
        };
        let inst = &self.insts[k];
        let block = u64::from(self.profile.kv.block_size.max(1));
        let blocks = |j: usize| {
            let r = &self.reqs[j].r;
            (u64::from(r.isl) + u64::from(r.osl)).div_ceil(block)
        };
        let waiting: u64 = inst.waiting.iter().map(|&j| blocks(j)).sum();
        inst.state == State::Ready
            && inst.blocks_used + waiting + blocks(i) <= self.profile.kv.blocks
    }

    pub(super) fn schedule_batch_deadline(&mut self) {
        let next = self.batcher.deadline().map(|d| d.max(self.now));
        if next.is_some() && next != self.batch_deadline_at {
            self.batch_deadline_at = next;
            self.push(next.unwrap_or(self.now), Ev::BatchDeadline);
        }
    }

    pub(super) fn dispatch_prefill(&mut self, b: Batch<usize>) {
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
    pub(super) fn prefill_time(&self, tokens: u64) -> f64 {
        let t = tokens as f64;
        let max = self.profile.max_isl();
        if t <= max || self.profile.prefill.isl.len() < 2 {
            self.profile.ttft(t)
        } else {
            self.profile.ttft(max) * t / max
        }
    }

    /// Starts work on an idle, ready instance.
    pub(super) fn kick(&mut self, k: usize) {
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

    pub(super) fn start_prefill(&mut self, k: usize, batch: Vec<usize>) {
        let tokens: u64 = batch.iter().map(|&r| u64::from(self.reqs[r].r.isl)).sum();
        let dt = self.prefill_time(tokens);
        self.insts[k].current = batch;
        self.push(self.now + dt, Ev::PrefillDone(k));
    }

    /// The TTFT deadline of request `i`.
    pub(super) fn deadline(&self, i: usize) -> f64 {
        let r = &self.reqs[i].r;
        r.arrival_s + self.cfg.slo_ttft_s + self.cfg.slo_ttft_per_token_s * f64::from(r.isl)
    }

    /// [`PrefillQueue::Shared`]: every free ready prefill instance takes a waiting batch, the
    /// earliest deadline among those that can still meet theirs first, else the earliest one.
    /// With no prefill instance left to wait for, the batches are prefilled locally.
    pub(super) fn feed_prefill(&mut self) {
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

    /// Twice a sequence's mean context over its decode (its prompt and half its output).
    fn ctx2(&self, i: usize) -> u64 {
        2 * u64::from(self.reqs[i].r.isl) + u64::from(self.reqs[i].r.osl)
    }

    /// Whether some ready decode instance can take `batch` and keep its steps within the TPOT
    /// SLO (an idle one always can).
    pub(super) fn decode_room(&self, batch: &[usize]) -> bool {
        let k = batch.len();
        let added: u64 = batch.iter().map(|&i| self.ctx2(i)).sum();
        // (Prompts still in prefill or in transfer are not counted: counting them too held
        // prefills back while the planner, seeing the backlog, added prefill instances, not
        // decode ones; see docs/experiments.md.)
        self.insts
            .iter()
            .filter(|i| i.kind == self.decode_kind() && i.state == State::Ready && !i.retiring)
            .any(|i| {
                let n = i.running.len() + i.waiting.len();
                // The step the instance would take: every sequence it holds and the batch, at
                // their mean context (the batch's own context alone made one long prompt at
                // the head of the queue hold every prefill back behind it).
                let mean = (i.ctx2_held + added) as f64 / 2.0 / (n + k).max(1) as f64;
                n == 0 || self.profile.tpot((n + k) as f64, mean) <= self.cfg.slo_tpot_s
            })
    }

    pub(super) fn prefill_done(&mut self, k: usize) {
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

    pub(super) fn first_token(&mut self, i: usize) {
        let q = &mut self.reqs[i];
        q.first_token = Some(self.now);
        q.generated = 1;
        self.totals.first_token(self.now - q.r.arrival_s);
    }

    pub(super) fn kv_arrived(&mut self, i: usize) {
        self.first_token(i);
        if self.reqs[i].r.osl <= 1 {
            self.finish(i);
        } else {
            self.send_to_decode(i, false);
        }
    }

    /// Queues request `i` on a decode (or aggregated) instance; `local` prefills it there.
    pub(super) fn send_to_decode(&mut self, i: usize, local: bool) {
        let kind = self.decode_kind();
        let Some(k) = self.pick(kind) else {
            // Unreachable with at least one decode instance (minimums are >= 1).
            debug_assert!(false, "no decode instance");
            return;
        };
        let q = &mut self.reqs[i];
        q.prefill_left = if local { q.r.isl } else { 0 };
        self.insts[k].ctx2_held += self.ctx2(i);
        self.insts[k].waiting.push_back(i);
        self.kick(k);
    }

    pub(super) fn start_step(&mut self, k: usize) {
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
        for &i in &self.insts[k].running {
            let q = &self.reqs[i];
            if q.prefill_left == 0 {
                n += 1;
                ctx += f64::from(q.r.isl) + f64::from(q.generated);
            }
        }
        let plan = self.local_prefill_plan(k, n > 0);
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

    /// The prompt tokens a decode step on instance `k` prefills locally, in admission order, as
    /// the worker admits them: the first prompt always (up to a chunk,
    /// [`SimConfig::prefill_chunk_tokens`]), the others while the step's chunk lasts. A bypassed
    /// prompt carries the router's step budget (the bypass threshold): while sequences are
    /// decoding, it joins a step only if the step's local prefill stays within it. The threshold
    /// is the largest prompt whose prefill keeps a step within the TPOT SLO; steps that took a
    /// burst of bypassed prompts at once ran 0.1-0.2 s at an 80 ms SLO and slowed every running
    /// sequence past it (every TPOT miss of the bursty row, `docs/experiments.md`).
    pub(super) fn local_prefill_plan(&self, k: usize, decoding: bool) -> Vec<(usize, u32)> {
        let chunk = self.cfg.prefill_chunk_tokens;
        let mut plan = Vec::new();
        let mut taken = 0u32;
        for &i in &self.insts[k].running {
            let q = &self.reqs[i];
            let left = q.prefill_left;
            if left == 0 {
                continue;
            }
            if plan.is_empty() {
                let take = left.min(chunk);
                taken = take;
                plan.push((i, take));
                continue;
            }
            if taken >= chunk {
                break;
            }
            if decoding && q.step_budget > 0 {
                if taken + left <= q.step_budget.min(chunk) {
                    taken += left;
                    plan.push((i, left));
                }
                continue;
            }
            let take = left.min(chunk - taken);
            taken += take;
            plan.push((i, take));
        }
        plan
    }

    pub(super) fn step_done(&mut self, k: usize) {
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
                    self.insts[k].ctx2_held -= self.ctx2(i);
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
                    self.insts[k].ctx2_held -= self.ctx2(i);
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

    pub(super) fn finish(&mut self, i: usize) {
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
}
