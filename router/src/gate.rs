//! The shared prefill queue (`--prefill-queue shared`, the default): prefill work waits here, in
//! the router, until a prefill worker is free, instead of queueing on the worker picked at
//! arrival.
//!
//! A queue on each worker keeps a backlog where it was built: workers started to clear it only
//! see new arrivals, and requests that have already missed their TTFT hold up those that could
//! still make theirs. Here a free worker takes the next work from one [`DeadlineQueue`]: the
//! earliest TTFT deadline among the work that can still meet it first (the planner crate's rule,
//! the one the simulator replays).
//! A worker is free when it has no prefill of ours in flight; a short batch is one piece of
//! work and holds its worker until its last prompt is prefilled.
//!
//! Paced (`shared`): work leaves the queue only while some decode worker has room — its last
//! step was within the TPOT SLO and nothing waits in its engine — so a backlog does not land on
//! the decode workers all at once (the simulator paces on the profile's TPOT instead). With no
//! prefill worker left, the waiting work is handed back to be prefilled on a decode worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dopd_planner::routing::{DeadlineQueue, PrefillQueue};
use tokio::sync::oneshot;

use crate::pool::{Pool, WorkerEntry};
use dopd_protocol::Role;

/// A prefill worker held for one piece of work; dropping it frees the worker.
pub struct Slot {
    pub worker: Arc<WorkerEntry>,
    gate: Weak<PrefillGate>,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed
            && let Some(g) = self.gate.upgrade()
        {
            g.release(&self.worker.url);
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("worker", &self.worker.url)
            .finish()
    }
}

/// What a waiter is told: a worker, or that no prefill worker is left.
type Waiter = oneshot::Sender<Option<Slot>>;

struct State {
    queue: DeadlineQueue<Waiter>,
    busy: HashMap<String, usize>,
}

/// The shared prefill queue.
pub struct PrefillGate {
    pool: Arc<Pool>,
    paced: bool,
    slo_tpot_s: f64,
    state: Mutex<State>,
    /// Seconds of prefill per prompt token (f64 bits), learnt from finished prefills; 0 until
    /// the first one (work then counts as late only once its deadline has passed).
    sec_per_token: AtomicU64,
    started: Instant,
}

impl PrefillGate {
    /// `None` for [`PrefillQueue::PerInstance`] (no gate: work goes to a worker on arrival).
    /// Spawns the task that re-checks the queue as workers come and go.
    pub fn new(pool: Arc<Pool>, mode: PrefillQueue, slo_tpot_s: f64) -> Option<Arc<Self>> {
        let order = mode.order()?;
        let g = Arc::new(Self {
            pool,
            paced: mode.paced(),
            slo_tpot_s,
            state: Mutex::new(State {
                queue: DeadlineQueue::new(order),
                busy: HashMap::new(),
            }),
            sec_per_token: AtomicU64::new(0f64.to_bits()),
            started: Instant::now(),
        });
        let weak = Arc::downgrade(&g);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(g) = weak.upgrade() else { return };
                g.dispatch();
            }
        });
        Some(g)
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Requests waiting in the queue.
    pub fn waiting(&self) -> usize {
        self.state.lock().map_or(0, |s| s.queue.len())
    }

    /// Waits for a free prefill worker for `tokens` prompt tokens due by `deadline`; `None`
    /// when no prefill worker is left (prefill on a decode worker instead).
    pub async fn acquire(self: &Arc<Self>, deadline: Instant, tokens: u64) -> Option<Slot> {
        let (tx, rx) = oneshot::channel();
        let service = tokens as f64 * f64::from_bits(self.sec_per_token.load(Ordering::Relaxed));
        if let Ok(mut s) = self.state.lock() {
            s.queue.push(tx, self.secs(deadline), service);
        } else {
            return None;
        }
        self.dispatch();
        rx.await.ok().flatten()
    }

    /// A prefill of `tokens` tokens took `secs` (the estimate of what waiting work will take).
    pub fn observe(&self, tokens: u64, secs: f64) {
        if tokens == 0 || !secs.is_finite() || secs <= 0.0 {
            return;
        }
        let x = secs / tokens as f64;
        let old = f64::from_bits(self.sec_per_token.load(Ordering::Relaxed));
        let new = if old > 0.0 { 0.8 * old + 0.2 * x } else { x };
        self.sec_per_token.store(new.to_bits(), Ordering::Relaxed);
    }

    fn release(self: &Arc<Self>, url: &str) {
        if let Ok(mut s) = self.state.lock()
            && let Some(n) = s.busy.get_mut(url)
        {
            *n = n.saturating_sub(1);
        }
        self.dispatch();
    }

    /// Whether some decode worker has room: its last step within the TPOT SLO and nothing
    /// waiting in its engine (a worker not yet read, or idle, has room).
    fn decode_room(&self) -> bool {
        let decode = self.pool.candidates(&[Role::Decode, Role::Mixed], &[]);
        decode.is_empty()
            || decode.iter().any(|w| match w.stats() {
                None => true,
                Some(st) => {
                    st.waiting == 0
                        && st
                            .recent_steps
                            .last()
                            .is_none_or(|s| st.running == 0 || s.seconds <= self.slo_tpot_s)
                }
            })
    }

    /// Hands free prefill workers the work that goes next.
    pub fn dispatch(self: &Arc<Self>) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        while !s.queue.is_empty() {
            let prefill = self.pool.candidates(&[Role::Prefill], &[]);
            if prefill.is_empty() {
                for tx in s.queue.drain() {
                    let _ = tx.send(None);
                }
                return;
            }
            let free: Vec<_> = prefill
                .into_iter()
                .filter(|w| w.in_flight() == 0 && s.busy.get(&w.url).copied().unwrap_or(0) == 0)
                .collect();
            let Some(w) = crate::pool::least_loaded(&free) else {
                return;
            };
            if self.paced && !self.decode_room() {
                return;
            }
            let now = self.now();
            let Some(tx) = s.queue.pop(now) else { return };
            *s.busy.entry(w.url.clone()).or_insert(0) += 1;
            let slot = Slot {
                worker: w,
                gate: Arc::downgrade(self),
                armed: true,
            };
            if let Err(Some(mut slot)) = tx.send(Some(slot)) {
                // The waiter went away (its client disconnected): the worker stays free.
                slot.armed = false;
                if let Some(n) = s.busy.get_mut(&slot.worker.url) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dopd_protocol::proto;

    async fn worker(pool: &Arc<Pool>, port: u16, role: Role) -> Arc<WorkerEntry> {
        // Nothing listens there: the entry is faked, never called.
        let w = pool
            .add(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("URL");
        w.fake(role, true, None);
        w
    }

    /// Lets the gate's tick and the woken tasks run.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(80)).await;
    }

    /// The waiter's answer (it must come within 10 s).
    async fn answer(h: tokio::task::JoinHandle<Option<Slot>>) -> Option<Slot> {
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("answered")
            .expect("task")
    }

    fn waiter(
        g: &Arc<PrefillGate>,
        in_s: f64,
        tokens: u64,
    ) -> tokio::task::JoinHandle<Option<Slot>> {
        let g = g.clone();
        let deadline = Instant::now() + Duration::from_secs_f64(in_s);
        tokio::spawn(async move { g.acquire(deadline, tokens).await })
    }

    #[tokio::test]
    async fn a_freed_worker_takes_the_earliest_deadline_next() {
        let pool = Pool::new();
        worker(&pool, 1, Role::Prefill).await;
        let g = PrefillGate::new(pool, PrefillQueue::Shared, 0.08).expect("shared");
        let first = waiter(&g, 10.0, 10).await.expect("task").expect("a slot");
        let late_deadline = waiter(&g, 5.0, 10);
        let early_deadline = waiter(&g, 1.0, 10);
        settle().await;
        assert_eq!(g.waiting(), 2, "one worker, one piece of work at a time");
        drop(first);
        let next = answer(early_deadline).await.expect("a slot");
        settle().await;
        assert!(
            !late_deadline.is_finished(),
            "the earliest deadline went first"
        );
        drop(next);
        let last = answer(late_deadline).await.expect("a slot");
        assert_eq!(g.waiting(), 0);
        drop(last);
    }

    #[tokio::test]
    async fn work_that_can_still_make_its_deadline_goes_before_work_that_cannot() {
        let pool = Pool::new();
        worker(&pool, 1, Role::Prefill).await;
        let g = PrefillGate::new(pool, PrefillQueue::Shared, 0.08).expect("shared");
        // One millisecond per prompt token.
        g.observe(1000, 1.0);
        let held = waiter(&g, 10.0, 10).await.expect("task").expect("a slot");
        // Due first, but its 2,000 tokens take 2 s: it cannot make it.
        let hopeless = waiter(&g, 1.0, 2000);
        let feasible = waiter(&g, 3.0, 100);
        settle().await;
        drop(held);
        let next = answer(feasible).await;
        settle().await;
        assert!(
            !hopeless.is_finished(),
            "late work waits while other work can be saved"
        );
        drop(next);
        assert!(answer(hopeless).await.is_some(), "never dropped");
    }

    #[tokio::test]
    async fn with_no_prefill_worker_left_the_waiting_work_is_handed_back() {
        let pool = Pool::new();
        let p = worker(&pool, 1, Role::Prefill).await;
        let g = PrefillGate::new(pool, PrefillQueue::Shared, 0.08).expect("shared");
        let held = waiter(&g, 10.0, 10).await.expect("task").expect("a slot");
        let waiting = waiter(&g, 10.0, 10);
        settle().await;
        assert!(!waiting.is_finished());
        p.fake(Role::Prefill, false, None);
        assert!(
            answer(waiting).await.is_none(),
            "prefill on a decode worker"
        );
        drop(held);
    }

    #[tokio::test]
    async fn paced_work_waits_for_room_on_a_decode_worker() {
        let pool = Pool::new();
        worker(&pool, 1, Role::Prefill).await;
        let d = worker(&pool, 2, Role::Decode).await;
        let full = |waiting, last_step| proto::StatsResponse {
            running: 8,
            waiting,
            recent_steps: vec![proto::StepTime {
                batch: 8,
                prefill_tokens: 0,
                seconds: last_step,
            }],
            ..Default::default()
        };
        d.fake(Role::Decode, true, Some(full(3, 0.02)));
        let g = PrefillGate::new(pool.clone(), PrefillQueue::Shared, 0.08).expect("shared");
        let w = waiter(&g, 10.0, 10);
        settle().await;
        assert!(!w.is_finished(), "sequences wait in the decode engine");
        d.fake(Role::Decode, true, Some(full(0, 0.2)));
        settle().await;
        assert!(!w.is_finished(), "the last step was over the TPOT SLO");
        d.fake(Role::Decode, true, Some(full(0, 0.03)));
        let slot = answer(w).await;
        assert!(slot.is_some());
        drop(slot);
        // Unpaced (shared-fifo) work does not wait for the decode workers.
        d.fake(Role::Decode, true, Some(full(3, 0.2)));
        let fifo = PrefillGate::new(pool, PrefillQueue::SharedFifo, 0.08).expect("shared");
        assert!(answer(waiter(&fifo, 10.0, 10)).await.is_some());
        assert!(PrefillGate::new(Pool::new(), PrefillQueue::PerInstance, 0.08).is_none());
    }
}
