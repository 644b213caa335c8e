//! The engine on its own thread behind a channel ([`EngineHandle`]). The thread sleeps while
//! idle, otherwise takes new commands between steps. A request whose client went away (its event
//! receiver dropped) is cancelled before the next step, so a disconnected stream frees its KV
//! blocks at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::engine::{Engine, EngineError, EngineStats, Event, Request, RequestId};
use crate::kv::KvLayout;

/// After waking from idle, how long the thread keeps taking commands before its first step. The
/// router sends a short batch's prompts to one prefill worker as separate calls within a moment
/// of each other; gathered, they start in one step and so in one packed prefill. A lone request
/// waits this long at most, against a prefill of tens of milliseconds.
const GATHER: Duration = Duration::from_millis(2);

enum Cmd {
    Submit(Request, UnboundedSender<Event>),
    Cancel(RequestId),
}

/// A running engine thread. Cloning shares it.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    stats: Arc<Mutex<EngineStats>>,
    in_flight: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    layout: KvLayout,
    dead: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Moves `engine` onto a new thread. The thread ends when every handle is dropped and the
    /// last request is done.
    pub fn spawn<B: Backend>(engine: Engine<B>) -> Self
    where
        Engine<B>: Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(engine.stats()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let layout = engine.kv_layout();
        let dead = Arc::new(AtomicBool::new(false));
        let (s, f, d) = (stats.clone(), in_flight.clone(), dead.clone());
        std::thread::Builder::new()
            .name("dopd-engine".into())
            .spawn(move || run_engine(engine, rx, s, f, d))
            .expect("the OS can start a thread");
        Self {
            tx,
            stats,
            in_flight,
            next_id: Arc::new(AtomicU64::new(1)),
            layout,
            dead,
        }
    }

    /// Queues a request (its `id` is replaced by a fresh one); events arrive on the receiver,
    /// ending with `Finished`, `Prefilled` or `Failed`. Dropping the receiver cancels it.
    pub fn submit(&self, mut r: Request) -> UnboundedReceiver<Event> {
        r.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let id = r.id;
        if self.tx.send(Cmd::Submit(r, tx.clone())).is_err() {
            let _ = tx.send(Event::Failed {
                id,
                error: EngineError::Stopped("the engine thread is gone".into()),
            });
        }
        rx
    }

    /// Cancels a request by id.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Cmd::Cancel(id));
    }

    /// The engine's counters after its last step.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether the engine thread is still running (false after an internal failure).
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    /// Requests submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }
}

fn run_engine<B: Backend>(
    mut engine: Engine<B>,
    rx: mpsc::Receiver<Cmd>,
    stats: Arc<Mutex<EngineStats>>,
    in_flight: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
) {
    let mut senders: HashMap<RequestId, UnboundedSender<Event>> = HashMap::new();
    let handle = |engine: &mut Engine<B>,
                  senders: &mut HashMap<RequestId, UnboundedSender<Event>>,
                  cmd: Cmd| match cmd {
        Cmd::Submit(r, tx) => {
            let id = r.id;
            match engine.submit(r) {
                Ok(()) => {
                    senders.insert(id, tx);
                }
                Err(error) => {
                    let _ = tx.send(Event::Failed { id, error });
                }
            }
        }
        Cmd::Cancel(id) => {
            engine.cancel(id);
            senders.remove(&id);
        }
    };
    loop {
        if !engine.has_work() {
            match rx.recv() {
                Ok(cmd) => handle(&mut engine, &mut senders, cmd),
                Err(_) => return,
            }
            let until = Instant::now() + GATHER;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(cmd) => handle(&mut engine, &mut senders, cmd),
                    Err(_) => break,
                }
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut engine, &mut senders, cmd);
        }
        // Clients that went away.
        senders.retain(|&id, tx| {
            let open = !tx.is_closed();
            if !open {
                engine.cancel(id);
            }
            open
        });
        if engine.has_work() {
            // A panic inside a step is a bug; the engine's state can no longer be trusted, so
            // every request in flight fails with the reason and the worker reports itself failed
            // (Health) instead of hanging its clients.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
            let events = match step {
                Ok(ev) => ev,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                        .unwrap_or_else(|| "panic".into());
                    dead.store(true, Ordering::Relaxed);
                    for (id, tx) in senders.drain() {
                        let _ = tx.send(Event::Failed {
                            id,
                            error: EngineError::Stopped(format!("engine step failed: {msg}")),
                        });
                    }
                    in_flight.store(0, Ordering::Relaxed);
                    return;
                }
            };
            // Publish the counters before the events: a client that has seen its request
            // finish must not then read stats that still count it.
            let ended: Vec<RequestId> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Token { .. } => None,
                    Event::Prefilled { id, .. }
                    | Event::Finished { id, .. }
                    | Event::Failed { id, .. } => Some(*id),
                })
                .collect();
            in_flight.store(
                senders.keys().filter(|id| !ended.contains(id)).count(),
                Ordering::Relaxed,
            );
            if let Ok(mut s) = stats.lock() {
                *s = engine.stats();
            }
            for ev in events {
                let (id, last) = match &ev {
                    Event::Token { id, .. } => (*id, false),
                    Event::Prefilled { id, .. }
                    | Event::Finished { id, .. }
                    | Event::Failed { id, .. } => (*id, true),
                };
                let gone = senders.get(&id).is_none_or(|tx| tx.send(ev).is_err());
                if gone && !last {
                    engine.cancel(id);
                }
                if last || gone {
                    senders.remove(&id);
                }
            }
        }
        in_flight.store(senders.len(), Ordering::Relaxed);
        if let Ok(mut s) = stats.lock() {
            *s = engine.stats();
        }
    }
}
