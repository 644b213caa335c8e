//! The worker process: the engine on its own thread behind a channel ([`EngineHandle`]), and the
//! gRPC service (`proto/dopd/worker/v1/worker.proto`) in front of it ([`WorkerService`]).
//!
//! The engine thread sleeps while idle, otherwise takes new commands between steps. A request
//! whose client went away (its event receiver dropped) is cancelled before the next step, so a
//! disconnected stream frees its KV blocks at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use dopd_ucx::Ucx;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_stream::{Stream, StreamExt, wrappers::UnboundedReceiverStream};
use tonic::{Request as Rpc, Response, Status};

use crate::engine::{Engine, EngineError, EngineStats, Event, Mode, Request, RequestId, Start};
use crate::kv::{KvExport, KvLayout};
use crate::sampling::{FinishReason, SamplingParams, StopConditions};
use crate::transfer::{KvHandle, KvTransport, LeaseTable, TransferError, fetch};
use dopd_model::tokenizer::ModelTokenizer;

use dopd_protocol::proto;
use dopd_protocol::{H2_WINDOW, MAX_MESSAGE_BYTES, Role};
use proto::worker_server::{Worker, WorkerServer};

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

/// Who this worker is.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub worker_id: String,
    /// Changes at each start (nanoseconds since the epoch at start-up).
    pub epoch: u64,
    pub model: String,
    pub role: Role,
    pub context: usize,
}

/// Decode-side transfer counters.
#[derive(Clone, Debug, Default)]
struct TransferStats {
    pulls: u64,
    bytes: u64,
    seconds: f64,
    failures: HashMap<String, u64>,
    recomputes: u64,
    /// Streams taken over after another worker failed mid-stream.
    resumes: u64,
    /// Per prefill peer (its URL).
    peers: HashMap<String, PeerStats>,
}

/// Transfers from one prefill peer.
#[derive(Clone, Debug, Default)]
struct PeerStats {
    transport: &'static str,
    ucx_transports: Vec<String>,
    degraded: bool,
    transfers: u64,
    bytes: u64,
    seconds: f64,
    last_seconds: f64,
    failures: u64,
}

/// The gRPC service. Cloning shares the engine, leases and counters.
#[derive(Clone)]
pub struct WorkerService {
    engine: EngineHandle,
    info: WorkerInfo,
    tokenizer: Option<Arc<ModelTokenizer>>,
    eos: Vec<u32>,
    draining: Arc<AtomicBool>,
    leases: Arc<Mutex<LeaseTable>>,
    lease_ttl: Duration,
    deadline: Duration,
    transfers: Arc<Mutex<TransferStats>>,
    peers:
        Arc<Mutex<HashMap<String, proto::worker_client::WorkerClient<tonic::transport::Channel>>>>,
    ucx: Option<Arc<Ucx>>,
    /// Transports a UCX link is expected to use (prefixes); empty: "anything faster than TCP
    /// that the context offers".
    expect_transports: Vec<String>,
    next_tag: Arc<AtomicU64>,
    kv_send_delay: Duration,
    pool: Option<Arc<crate::transfer::BlockPool>>,
}

/// How long pinned KV blocks wait for their decode worker by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default deadline of one KV pull.
pub const DEFAULT_TRANSFER_DEADLINE: Duration = Duration::from_secs(5);

impl WorkerService {
    /// The KV of a live lease for sending (either transport), after the test hook's send delay.
    async fn leased(&self, lease: u64, epoch: u64) -> Result<Arc<KvExport>, Status> {
        let kv = self
            .leases
            .lock()
            .map_err(|_| Status::internal("lease table poisoned"))?
            .get(lease, epoch, Instant::now())
            .map_err(|e| transfer_status(&e))?;
        if !self.kv_send_delay.is_zero() {
            tokio::time::sleep(self.kv_send_delay).await;
        }
        Ok(kv)
    }

    pub fn new(
        engine: EngineHandle,
        info: WorkerInfo,
        tokenizer: Option<Arc<ModelTokenizer>>,
        eos: Vec<u32>,
    ) -> Self {
        let leases = LeaseTable::new(info.worker_id.clone(), info.epoch, DEFAULT_LEASE_TTL);
        Self {
            engine,
            info,
            tokenizer,
            eos,
            draining: Arc::new(AtomicBool::new(false)),
            leases: Arc::new(Mutex::new(leases)),
            lease_ttl: DEFAULT_LEASE_TTL,
            deadline: DEFAULT_TRANSFER_DEADLINE,
            transfers: Arc::default(),
            peers: Arc::default(),
            ucx: None,
            expect_transports: Vec::new(),
            next_tag: Arc::new(AtomicU64::new(1)),
            kv_send_delay: Duration::ZERO,
            pool: None,
        }
    }

    /// Receives UCX transfers into vectors from `pool` (give the same pool to the engine with
    /// [`Engine::with_block_pool`], which returns them after each import).
    pub fn with_block_pool(mut self, pool: Arc<crate::transfer::BlockPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Fault injection for tests: waits this long before sending a lease's blocks (PullKv,
    /// PushKvUcx), so a test can kill the worker in the middle of a transfer.
    #[doc(hidden)]
    pub fn with_kv_send_delay(mut self, d: Duration) -> Self {
        self.kv_send_delay = d;
        self
    }

    /// Moves KV blocks over UCX where both workers have it (prefill: sends; decode: receives).
    /// `expect` lists the UCX transports a link should use (prefixes such as `rc`, `cuda_ipc`);
    /// a link without any of them is flagged degraded. Empty: degraded when the link fell back
    /// to TCP although the context offers something faster.
    pub fn with_ucx(mut self, ucx: Arc<Ucx>, expect: Vec<String>) -> Self {
        // Tags are unique per receiving worker: start from the epoch's low bits.
        self.next_tag = Arc::new(AtomicU64::new((self.info.epoch << 20) | 1));
        self.ucx = Some(ucx);
        self.expect_transports = expect;
        self
    }

    /// The transport this worker prefers for KV blocks.
    pub fn kv_transport(&self) -> &'static str {
        if self.ucx.is_some() { "ucx" } else { "grpc" }
    }

    /// What the Stats RPC answers.
    pub fn stats_snapshot(&self) -> proto::StatsResponse {
        let s = self.engine.stats();
        let leases = self
            .leases
            .lock()
            .map(|mut l| {
                l.sweep(Instant::now());
                (l.pinned(), l.pinned_bytes(), l.expired)
            })
            .unwrap_or_default();
        let t = self.transfers.lock().map(|t| t.clone()).unwrap_or_default();
        proto::StatsResponse {
            running: s.running as u32,
            waiting: s.waiting as u32,
            kv_blocks_used: s.kv_blocks_used as u32,
            kv_blocks_free: s.kv_blocks_free as u32,
            kv_block_size: self.engine.kv_layout().block_size as u32,
            steps: s.steps,
            preemptions: s.preemptions,
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated_tokens,
            finished: s.finished,
            failed: s.failed,
            recent_steps: s
                .recent_steps
                .iter()
                .map(|&(batch, prefill, secs)| proto::StepTime {
                    batch: batch as u32,
                    prefill_tokens: prefill as u32,
                    seconds: secs,
                })
                .collect(),
            draining: self.draining.load(Ordering::Relaxed),
            in_flight: self.engine.in_flight() as u32,
            kv_leases_pinned: leases.0 as u32,
            kv_leases_pinned_bytes: leases.1 as u64,
            kv_leases_expired: leases.2,
            kv_pulls: t.pulls,
            kv_pull_bytes: t.bytes,
            kv_pull_seconds: t.seconds,
            kv_pull_failures: t.failures,
            kv_recomputes: t.recomputes,
            resumed_streams: t.resumes,
            kv_transport: self.kv_transport().to_string(),
            ucx_version: self
                .ucx
                .as_ref()
                .map(|u| u.info().version.clone())
                .unwrap_or_default(),
            ucx_transports: self
                .ucx
                .as_ref()
                .map(|u| u.info().transports.clone())
                .unwrap_or_default(),
            kv_degraded: t.peers.values().any(|p| p.degraded),
            kv_peers: {
                let mut peers: Vec<proto::KvPeer> = t
                    .peers
                    .iter()
                    .map(|(peer, p)| proto::KvPeer {
                        peer: peer.clone(),
                        transport: p.transport.to_string(),
                        ucx_transports: p.ucx_transports.clone(),
                        degraded: p.degraded,
                        transfers: p.transfers,
                        bytes: p.bytes,
                        seconds: p.seconds,
                        last_seconds: p.last_seconds,
                        last_gib_per_s: if p.last_seconds > 0.0 && p.transfers > 0 {
                            (p.bytes as f64 / p.transfers as f64)
                                / p.last_seconds
                                / f64::from(1u32 << 30)
                        } else {
                            0.0
                        },
                        failures: p.failures,
                    })
                    .collect();
                peers.sort_by(|a, b| a.peer.cmp(&b.peer));
                peers
            },
        }
    }

    /// The Stats snapshot as OpenMetrics text (see [`crate::metrics`]).
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(
            &self.stats_snapshot(),
            &self.info.worker_id,
            &self.info.role.to_string(),
        )
    }

    /// Records a transfer from `peer` (success or failure) in the per-peer stats.
    fn record_peer(
        &self,
        peer: &str,
        transport: &'static str,
        result: Result<(usize, &[String]), ()>,
        seconds: f64,
    ) {
        let available = self
            .ucx
            .as_ref()
            .map(|u| u.info().transports.clone())
            .unwrap_or_default();
        if let Ok(mut t) = self.transfers.lock() {
            let p = t.peers.entry(peer.to_string()).or_default();
            p.transport = transport;
            match result {
                Ok((bytes, lanes)) => {
                    p.transfers += 1;
                    p.bytes += bytes as u64;
                    p.seconds += seconds;
                    p.last_seconds = seconds;
                    if transport == "ucx" {
                        p.ucx_transports = lanes.to_vec();
                        p.degraded = dopd_ucx::degraded(lanes, &available, &self.expect_transports);
                    } else {
                        p.ucx_transports.clear();
                        // gRPC where UCX was wanted is a fallback.
                        p.degraded = !self.expect_transports.is_empty();
                    }
                }
                Err(()) => p.failures += 1,
            }
        }
    }

    /// Sets the KV lease TTL (prefill side) and the pull deadline (decode side).
    pub fn with_transfer(mut self, lease_ttl: Duration, deadline: Duration) -> Self {
        self.leases = Arc::new(Mutex::new(LeaseTable::new(
            self.info.worker_id.clone(),
            self.info.epoch,
            lease_ttl,
        )));
        self.lease_ttl = lease_ttl;
        self.deadline = deadline;
        self
    }

    fn count_failure(&self, e: &TransferError) {
        if let Ok(mut t) = self.transfers.lock() {
            *t.failures.entry(e.kind().to_string()).or_default() += 1;
            t.recomputes += 1;
        }
    }

    /// A transport to the prefill worker at `url` (connections are reused).
    async fn grpc_transport(
        &self,
        url: &str,
        deadline: Duration,
    ) -> Result<GrpcTransport, TransferError> {
        if let Some(c) = self.peers.lock().ok().and_then(|p| p.get(url).cloned()) {
            return Ok(GrpcTransport { client: c });
        }
        let t = GrpcTransport::connect(url, deadline).await?;
        if let Ok(mut p) = self.peers.lock() {
            p.insert(url.to_string(), t.client.clone());
        }
        Ok(t)
    }

    /// The prefill side's lease table (for benchmarks and local mode).
    pub fn lease_table(&self) -> Arc<Mutex<LeaseTable>> {
        self.leases.clone()
    }

    /// The tonic server for this service, with message limits sized for inline KV blocks.
    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn admit(&self, rpc: &str, allowed: &[Role]) -> Result<(), Status> {
        if !allowed.contains(&self.info.role) {
            return Err(Status::failed_precondition(format!(
                "{rpc} is not served by a {} worker",
                self.info.role
            )));
        }
        if self.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable("worker is draining"));
        }
        if !self.engine.alive() {
            return Err(Status::unavailable(
                "the worker's engine has failed; restart it",
            ));
        }
        Ok(())
    }

    fn prompt(&self, text: &str, tokens: &[u32]) -> Result<Vec<u32>, Status> {
        if !tokens.is_empty() {
            return Ok(tokens.to_vec());
        }
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Status::invalid_argument("this worker has no tokenizer: send prompt_tokens")
        })?;
        tok.encode(text)
            .map_err(|e| Status::invalid_argument(format!("prompt: {e}")))
    }

    fn request(
        &self,
        prompt: Vec<u32>,
        sampling: Option<proto::Sampling>,
        stop: Option<proto::StopSettings>,
        mode: Mode,
        start: Start,
    ) -> Request {
        let s = sampling.unwrap_or_default();
        let st = stop.unwrap_or_default();
        Request {
            id: 0,
            prompt,
            sampling: SamplingParams {
                temperature: s.temperature.max(0.0),
                top_k: s.top_k as usize,
                top_p: if s.top_p > 0.0 && s.top_p < 1.0 {
                    s.top_p
                } else {
                    1.0
                },
                seed: s.seed,
            },
            stop: StopConditions {
                eos: if st.ignore_eos {
                    Vec::new()
                } else {
                    self.eos.clone()
                },
                max_tokens: st.max_tokens as usize,
                stop_strings: st.stop,
            },
            mode,
            start,
        }
    }
}

fn status_of(e: &EngineError) -> Status {
    match e {
        EngineError::EmptyPrompt
        | EngineError::EmptyResume
        | EngineError::PromptTooLong { .. }
        | EngineError::TooLargeForCache { .. }
        | EngineError::BadToken { .. } => Status::invalid_argument(e.to_string()),
        EngineError::Import(_) => Status::failed_precondition(e.to_string()),
        EngineError::DuplicateId(_) | EngineError::Kv(_) => Status::internal(e.to_string()),
        EngineError::Stopped(_) => Status::unavailable(e.to_string()),
    }
}

fn finish_of(r: FinishReason) -> proto::FinishReason {
    match r {
        FinishReason::Stop => proto::FinishReason::Stop,
        FinishReason::Length => proto::FinishReason::Length,
    }
}

/// f32 values as little-endian bytes (a plain copy on little-endian hosts).
pub fn f32_to_le_bytes(v: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice::<f32, u8>(v).to_vec()
    } else {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

/// Little-endian bytes (a multiple of 4) as f32 values.
pub fn le_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec::<u8, f32>(&b[..b.len() / 4 * 4])
    } else {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// The proto form of a layout.
pub fn layout_to_proto(l: &KvLayout) -> proto::KvLayout {
    proto::KvLayout {
        layers: l.layers as u32,
        kv_heads: l.kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_size: l.block_size as u32,
        model_hash: l.model_hash,
        dtype: "f32".into(),
        fingerprint: l.fingerprint(),
    }
}

/// KV blocks as bytes (f32 little-endian).
pub fn kv_to_proto(kv: &KvExport, layout: &KvLayout) -> proto::KvBlocks {
    proto::KvBlocks {
        layout: Some(layout_to_proto(layout)),
        tokens: kv.tokens as u32,
        blocks: kv.blocks.iter().map(|b| f32_to_le_bytes(b)).collect(),
    }
}

/// Parses KV blocks; the engine checks the fingerprint and sizes against its own layout.
pub fn kv_from_proto(kv: proto::KvBlocks) -> Result<KvExport, Status> {
    let layout = kv
        .layout
        .ok_or_else(|| Status::invalid_argument("kv.layout is missing"))?;
    if layout.dtype != "f32" {
        return Err(Status::failed_precondition(format!(
            "KV dtype {:?} is not supported (f32 is)",
            layout.dtype
        )));
    }
    let blocks = kv
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if b.len() % 4 != 0 {
                return Err(Status::invalid_argument(format!(
                    "kv block {i} has {} bytes, not a whole number of f32",
                    b.len()
                )));
            }
            Ok(le_bytes_to_f32(b))
        })
        .collect::<Result<Vec<Vec<f32>>, Status>>()?;
    Ok(KvExport {
        fingerprint: layout.fingerprint,
        tokens: kv.tokens as usize,
        blocks,
    })
}

fn handle_to_proto(h: &KvHandle, ttl: Duration, ucx: bool) -> proto::KvHandle {
    proto::KvHandle {
        worker_id: h.worker_id.clone(),
        epoch: h.epoch,
        lease: h.lease,
        fingerprint: h.fingerprint,
        tokens: h.tokens as u32,
        blocks: h.blocks as u32,
        block_bytes: h.block_bytes as u64,
        ttl_ms: ttl.as_millis().min(u128::from(u32::MAX)) as u32,
        ucx,
    }
}

/// A handle from its proto form.
pub fn handle_from_proto(h: &proto::KvHandle) -> KvHandle {
    KvHandle {
        worker_id: h.worker_id.clone(),
        epoch: h.epoch,
        lease: h.lease,
        fingerprint: h.fingerprint,
        tokens: h.tokens as usize,
        blocks: h.blocks as usize,
        block_bytes: h.block_bytes as usize,
    }
}

/// A transfer error as a status whose message starts with `kv:<kind>:<number>:` so that the
/// client gets the same typed error back.
fn transfer_status(e: &TransferError) -> Status {
    let (code, n) = match e {
        TransferError::StaleEpoch { current, .. } => (tonic::Code::FailedPrecondition, *current),
        TransferError::Expired(l) | TransferError::UnknownLease(l) => (tonic::Code::NotFound, *l),
        TransferError::LayoutMismatch { want, .. } => (tonic::Code::FailedPrecondition, *want),
        TransferError::Deadline(d) => (tonic::Code::DeadlineExceeded, d.as_millis() as u64),
        TransferError::Transport(_) => (tonic::Code::Unavailable, 0),
    };
    Status::new(code, format!("kv:{}:{n}: {e}", e.kind()))
}

fn transfer_error(s: &Status, h: &KvHandle) -> TransferError {
    let mut parts = s.message().splitn(3, ':');
    let (tag, kind, n) = (parts.next(), parts.next(), parts.next());
    let n: u64 = n.and_then(|x| x.parse().ok()).unwrap_or(0);
    match (tag, kind) {
        (Some("kv"), Some("stale_epoch")) => TransferError::StaleEpoch {
            got: h.epoch,
            current: n,
        },
        (Some("kv"), Some("expired")) => TransferError::Expired(h.lease),
        (Some("kv"), Some("unknown_lease")) => TransferError::UnknownLease(h.lease),
        _ => TransferError::Transport(format!("{}: {}", s.code(), s.message())),
    }
}

/// The gRPC transport: pulls a lease's blocks as a stream of messages from the prefill worker.
pub struct GrpcTransport {
    client: proto::worker_client::WorkerClient<tonic::transport::Channel>,
}

impl GrpcTransport {
    /// Connects to the worker at `url`, failing after `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, TransferError> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| TransferError::Transport(format!("bad prefill_url {url:?}: {e}")))?
            .connect_timeout(timeout)
            .initial_stream_window_size(Some(H2_WINDOW))
            .initial_connection_window_size(Some(H2_WINDOW));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| TransferError::Transport(format!("cannot reach {url}: {e}")))?;
        Ok(Self {
            client: proto::worker_client::WorkerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }
}

#[tonic::async_trait]
impl KvTransport for GrpcTransport {
    fn name(&self) -> &'static str {
        "grpc"
    }

    async fn pull(&self, h: &KvHandle) -> Result<KvExport, TransferError> {
        let mut c = self.client.clone();
        let mut stream = c
            .pull_kv(proto::PullKvRequest {
                lease: h.lease,
                epoch: h.epoch,
            })
            .await
            .map_err(|s| transfer_error(&s, h))?
            .into_inner();
        let mut blocks = Vec::with_capacity(h.blocks);
        while let Some(chunk) = stream.message().await.map_err(|s| transfer_error(&s, h))? {
            if chunk.index as usize != blocks.len() || chunk.data.len() != h.block_bytes {
                return Err(TransferError::Transport(format!(
                    "block {} of {} bytes, expected block {} of {} bytes",
                    chunk.index,
                    chunk.data.len(),
                    blocks.len(),
                    h.block_bytes
                )));
            }
            blocks.push(le_bytes_to_f32(&chunk.data));
        }
        if blocks.len() != h.blocks {
            return Err(TransferError::Transport(format!(
                "stream ended after {} of {} blocks",
                blocks.len(),
                h.blocks
            )));
        }
        Ok(KvExport {
            fingerprint: h.fingerprint,
            tokens: h.tokens,
            blocks,
        })
    }

    async fn release(&self, h: &KvHandle) -> Result<(), TransferError> {
        let mut c = self.client.clone();
        c.release_kv(proto::ReleaseKvRequest {
            lease: h.lease,
            epoch: h.epoch,
        })
        .await
        .map(|_| ())
        .map_err(|s| transfer_error(&s, h))
    }
}

/// A pinned export as UCX message parts: one per block, sent from the lease's own memory.
struct LeaseParts(Arc<KvExport>);

impl dopd_ucx::Parts for LeaseParts {
    fn parts(&self) -> Vec<&[u8]> {
        // The receiver is the same architecture family (UCX peers exchange raw f32 memory).
        self.0
            .blocks
            .iter()
            .map(|b| bytemuck::cast_slice::<f32, u8>(b))
            .collect()
    }
}

/// The UCX transport: the decode worker posts a tagged receive of the whole lease, asks the
/// prefill worker (over gRPC) to send it there over UCX, and releases the lease over gRPC.
pub struct UcxTransport {
    pub grpc: GrpcTransport,
    pub ucx: Arc<Ucx>,
    /// Source of tags unique among this worker's receives (one per pull).
    pub tags: Arc<AtomicU64>,
    pub deadline: Duration,
    /// Filled with the link's UCX transports (as the sender reports them) on success.
    pub lanes: Arc<Mutex<Vec<String>>>,
    /// Recycled block vectors to receive into (fresh ones otherwise).
    pub pool: Option<Arc<crate::transfer::BlockPool>>,
}

#[tonic::async_trait]
impl KvTransport for UcxTransport {
    fn name(&self) -> &'static str {
        "ucx"
    }

    async fn pull(&self, h: &KvHandle) -> Result<KvExport, TransferError> {
        if !h.block_bytes.is_multiple_of(4) || h.blocks > dopd_ucx::MAX_PARTS {
            return Err(TransferError::Transport(format!(
                "handle of {} blocks of {} bytes cannot travel over UCX",
                h.blocks, h.block_bytes
            )));
        }
        let tag = self.tags.fetch_add(1, Ordering::Relaxed) & dopd_ucx::MAX_TAG;
        // Each block is received straight into its final vector.
        let blocks = match &self.pool {
            Some(p) => p.take(h.blocks, h.block_bytes / 4),
            None => (0..h.blocks)
                .map(|_| vec![0f32; h.block_bytes / 4])
                .collect(),
        };
        let receive = self
            .ucx
            .recv_into(tag, blocks, self.deadline)
            .map_err(|e| TransferError::Transport(e.to_string()))?;
        let mut c = self.grpc.client.clone();
        // An error here (lease gone, prefill worker dead) drops `receive`, which cancels it.
        let sent = c
            .push_kv_ucx(proto::PushKvUcxRequest {
                lease: h.lease,
                epoch: h.epoch,
                ucx_address: self.ucx.address().to_vec(),
                tag,
                deadline_ms: self.deadline.as_millis().min(u128::from(u32::MAX)) as u32,
            })
            .await
            .map_err(|s| transfer_error(&s, h))?
            .into_inner();
        let blocks = receive.wait().await.map_err(|e| match e {
            dopd_ucx::UcxError::Deadline(_) => TransferError::Deadline(self.deadline),
            e => TransferError::Transport(e.to_string()),
        })?;
        if let Ok(mut l) = self.lanes.lock() {
            *l = sent.ucx_transports;
        }
        Ok(KvExport {
            fingerprint: h.fingerprint,
            tokens: h.tokens,
            blocks,
        })
    }

    async fn release(&self, h: &KvHandle) -> Result<(), TransferError> {
        self.grpc.release(h).await
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateEvent, Status>> + Send>>;

fn event_stream(rx: UnboundedReceiver<Event>) -> EventStream {
    Box::pin(UnboundedReceiverStream::new(rx).filter_map(|ev| match ev {
        Event::Token { token, text, .. } => Some(Ok(proto::GenerateEvent {
            event: Some(proto::generate_event::Event::Token(proto::Token {
                id: token,
                text,
            })),
        })),
        Event::Finished {
            reason,
            text,
            usage,
            ..
        } => Some(Ok(proto::GenerateEvent {
            event: Some(proto::generate_event::Event::Finished(proto::Finished {
                reason: finish_of(reason) as i32,
                text,
                prompt_tokens: usage.prompt_tokens as u32,
                completion_tokens: usage.completion_tokens as u32,
            })),
        })),
        Event::Failed { error, .. } => Some(Err(status_of(&error))),
        Event::Prefilled { .. } => None,
    }))
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = EventStream;
    type DecodeStream = EventStream;

    async fn generate(
        &self,
        req: Rpc<proto::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.admit("Generate", &[Role::Decode, Role::Mixed])?;
        let r = req.into_inner();
        let prompt = self.prompt(&r.prompt, &r.prompt_tokens)?;
        let rx = self.engine.submit(self.request(
            prompt,
            r.sampling,
            r.stop,
            Mode::Generate,
            Start::Prompt,
        ));
        Ok(Response::new(event_stream(rx)))
    }

    async fn prefill(
        &self,
        req: Rpc<proto::GenerateRequest>,
    ) -> Result<Response<proto::PrefillResponse>, Status> {
        self.admit("Prefill", &[Role::Prefill, Role::Mixed])?;
        let r = req.into_inner();
        let inline_kv = r.inline_kv;
        let prompt = self.prompt(&r.prompt, &r.prompt_tokens)?;
        let mut rx = self.engine.submit(self.request(
            prompt.clone(),
            r.sampling,
            r.stop,
            Mode::Prefill,
            Start::Prompt,
        ));
        match rx.recv().await {
            Some(Event::Prefilled {
                first_token,
                text,
                kv,
                finish,
                ..
            }) => {
                let inline = inline_kv.then(|| kv_to_proto(&kv, &self.engine.kv_layout()));
                let handle = if finish.is_none() {
                    let mut t = self
                        .leases
                        .lock()
                        .map_err(|_| Status::internal("lease table poisoned"))?;
                    Some(handle_to_proto(
                        &t.pin(kv, Instant::now()),
                        self.lease_ttl,
                        self.ucx.is_some(),
                    ))
                } else {
                    None
                };
                Ok(Response::new(proto::PrefillResponse {
                    handle,
                    first_token,
                    text,
                    prompt_tokens: prompt,
                    kv: inline,
                    finish: finish.map_or(proto::FinishReason::Unspecified, finish_of) as i32,
                    worker_id: self.info.worker_id.clone(),
                    epoch: self.info.epoch,
                }))
            }
            Some(Event::Failed { error, .. }) => Err(status_of(&error)),
            _ => Err(Status::internal(
                "the engine ended the prefill without a result",
            )),
        }
    }

    async fn decode(
        &self,
        req: Rpc<proto::DecodeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.admit("Decode", &[Role::Decode, Role::Mixed])?;
        let r = req.into_inner();
        if r.prompt_tokens.is_empty() {
            return Err(Status::invalid_argument("prompt_tokens is empty"));
        }
        let resume = !r.resume_tokens.is_empty() || r.resume_sent_bytes > 0;
        let start = match (r.kv, r.handle) {
            // A stream resumed after a failure: recompute everything it has generated.
            _ if resume => {
                if let Ok(mut t) = self.transfers.lock() {
                    t.resumes += 1;
                }
                let mut generated = vec![r.first_token];
                generated.extend_from_slice(&r.resume_tokens);
                Start::Resume {
                    generated,
                    sent: r.resume_sent_bytes as usize,
                }
            }
            (Some(kv), _) => Start::Imported {
                kv: kv_from_proto(kv)?,
                first_token: r.first_token,
            },
            (None, Some(h)) => {
                let handle = handle_from_proto(&h);
                let deadline = if r.transfer_deadline_ms > 0 {
                    Duration::from_millis(u64::from(r.transfer_deadline_ms))
                } else {
                    self.deadline
                };
                let t0 = Instant::now();
                let want = self.engine.kv_layout().fingerprint();
                let use_ucx = h.ucx && self.ucx.is_some();
                let transport = if use_ucx { "ucx" } else { "grpc" };
                let lanes = Arc::new(Mutex::new(Vec::new()));
                let got = match self.grpc_transport(&r.prefill_url, deadline).await {
                    Ok(g) => match &self.ucx {
                        Some(ucx) if use_ucx => {
                            let t = UcxTransport {
                                grpc: g,
                                ucx: ucx.clone(),
                                tags: self.next_tag.clone(),
                                pool: self.pool.clone(),
                                deadline,
                                lanes: lanes.clone(),
                            };
                            fetch(&t, &handle, want, deadline).await
                        }
                        _ => fetch(&g, &handle, want, deadline).await,
                    },
                    Err(e) => Err(e),
                };
                let secs = t0.elapsed().as_secs_f64();
                let lanes = lanes.lock().map(|l| l.clone()).unwrap_or_default();
                let outcome = got.as_ref().map(|_| (handle.total_bytes(), &lanes[..]));
                self.record_peer(&r.prefill_url, transport, outcome.map_err(|_| ()), secs);
                match got {
                    Ok(kv) => {
                        if let Ok(mut t) = self.transfers.lock() {
                            t.pulls += 1;
                            t.bytes += handle.total_bytes() as u64;
                            t.seconds += secs;
                        }
                        Start::Imported {
                            kv,
                            first_token: r.first_token,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            prefill = %r.prefill_url,
                            transport,
                            "KV transfer failed; recomputing the prompt locally"
                        );
                        self.count_failure(&e);
                        Start::Recompute {
                            first_token: r.first_token,
                        }
                    }
                }
            }
            (None, None) => {
                if let Ok(mut t) = self.transfers.lock() {
                    t.recomputes += 1;
                }
                Start::Recompute {
                    first_token: r.first_token,
                }
            }
        };
        let rx = self.engine.submit(self.request(
            r.prompt_tokens,
            r.sampling,
            r.stop,
            Mode::Generate,
            start,
        ));
        Ok(Response::new(event_stream(rx)))
    }

    async fn health(
        &self,
        _: Rpc<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        let status = if !self.engine.alive() {
            proto::health_response::Status::Failed
        } else if self.draining.load(Ordering::Relaxed) {
            proto::health_response::Status::Draining
        } else {
            proto::health_response::Status::Serving
        };
        Ok(Response::new(proto::HealthResponse {
            status: status as i32,
            role: self.info.role.to_string(),
            model: self.info.model.clone(),
            worker_id: self.info.worker_id.clone(),
            epoch: self.info.epoch,
            kv_layout: Some(layout_to_proto(&self.engine.kv_layout())),
            context: self.info.context as u32,
        }))
    }

    async fn stats(
        &self,
        _: Rpc<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        Ok(Response::new(self.stats_snapshot()))
    }

    type PullKvStream = Pin<Box<dyn Stream<Item = Result<proto::KvChunk, Status>> + Send>>;

    async fn pull_kv(
        &self,
        req: Rpc<proto::PullKvRequest>,
    ) -> Result<Response<Self::PullKvStream>, Status> {
        let r = req.into_inner();
        let kv = self.leased(r.lease, r.epoch).await?;
        let chunks: Vec<Result<proto::KvChunk, Status>> = kv
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(proto::KvChunk {
                    index: i as u32,
                    data: f32_to_le_bytes(b),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn release_kv(
        &self,
        req: Rpc<proto::ReleaseKvRequest>,
    ) -> Result<Response<proto::ReleaseKvResponse>, Status> {
        let r = req.into_inner();
        let mut t = self
            .leases
            .lock()
            .map_err(|_| Status::internal("lease table poisoned"))?;
        if r.epoch != t.epoch() {
            return Err(transfer_status(&TransferError::StaleEpoch {
                got: r.epoch,
                current: t.epoch(),
            }));
        }
        Ok(Response::new(proto::ReleaseKvResponse {
            released: t.release(r.lease),
        }))
    }

    async fn push_kv_ucx(
        &self,
        req: Rpc<proto::PushKvUcxRequest>,
    ) -> Result<Response<proto::PushKvUcxResponse>, Status> {
        let r = req.into_inner();
        let ucx = self
            .ucx
            .clone()
            .ok_or_else(|| Status::failed_precondition("this worker has no UCX"))?;
        let deadline = if r.deadline_ms > 0 {
            Duration::from_millis(u64::from(r.deadline_ms))
        } else {
            self.deadline
        };
        let kv = self.leased(r.lease, r.epoch).await?;
        let sent = ucx
            .send(&r.ucx_address, r.tag, LeaseParts(kv), deadline)
            .await
            .map_err(|e| match e {
                dopd_ucx::UcxError::Deadline(_) => {
                    transfer_status(&TransferError::Deadline(deadline))
                }
                e => transfer_status(&TransferError::Transport(e.to_string())),
            })?;
        Ok(Response::new(proto::PushKvUcxResponse {
            bytes: sent.bytes as u64,
            ucx_transports: sent.transports,
        }))
    }

    async fn drain(
        &self,
        _: Rpc<proto::DrainRequest>,
    ) -> Result<Response<proto::DrainResponse>, Status> {
        self.draining.store(true, Ordering::Relaxed);
        Ok(Response::new(proto::DrainResponse {
            in_flight: self.engine.in_flight() as u32,
        }))
    }
}

/// A model ready to serve.
pub struct LoadedModel<B: Backend> {
    pub model: crate::model::Llama<B>,
    pub tokenizer: Option<ModelTokenizer>,
    /// End-of-sequence ids (EOS and ChatML's `<|im_end|>`).
    pub eos: Vec<u32>,
    /// Identifies the weights (see [`model_hash`]).
    pub model_hash: u64,
    /// Served name (the file stem).
    pub name: String,
}

/// Loads a model: a GGUF file, or a Hugging Face checkpoint directory (`config.json`,
/// `*.safetensors`, `tokenizer.json`).
pub fn load_model<B: Backend>(
    path: &std::path::Path,
    device: &B::Device,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    if path.is_dir() {
        load_hf(path, device)
    } else {
        load_gguf(path, device)
    }
}

/// Loads a Hugging Face checkpoint directory.
pub fn load_hf<B: Backend>(
    dir: &std::path::Path,
    device: &B::Device,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    use crate::model::ModelError;
    let config = dir.join("config.json");
    let c = dopd_model::hf::config_from_json(&config)?;
    let weights = crate::hf::HfWeights::open(dir)?;
    let model = crate::model::Llama::load(c, &weights, device)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(
            ModelTokenizer::from_hf_files(&tok_path, &config).map_err(|e| ModelError::File {
                file: tok_path.display().to_string(),
                msg: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let mut eos = dopd_model::hf::eos_from_json(&config);
    if let Some(t) = &tokenizer {
        for id in [Some(t.eos_id), t.token_id("<|im_end|>")]
            .into_iter()
            .flatten()
        {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        eos,
        model_hash: model_hash(dir).map_err(|e| ModelError::File {
            file: dir.display().to_string(),
            msg: e.to_string(),
        })?,
        name: dir
            .file_name()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
    })
}

/// Loads a GGUF model file with its tokenizer.
pub fn load_gguf<B: Backend>(
    path: &std::path::Path,
    device: &B::Device,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    let g = dopd_model::gguf::Gguf::open(path)?;
    let model = crate::model::Llama::from_gguf(&g, device)?;
    let tokenizer = ModelTokenizer::from_gguf(&g).map_err(|e| crate::model::ModelError::File {
        file: path.display().to_string(),
        msg: format!("tokenizer: {e}"),
    })?;
    let mut eos = vec![tokenizer.eos_id];
    if let Some(id) = tokenizer.token_id("<|im_end|>")
        && !eos.contains(&id)
    {
        eos.push(id);
    }
    Ok(LoadedModel {
        model,
        tokenizer: Some(tokenizer),
        eos,
        model_hash: model_hash(path).map_err(|e| crate::model::ModelError::File {
            file: path.display().to_string(),
            msg: e.to_string(),
        })?,
        name: path
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
    })
}

/// A fingerprint of a model file or directory: FNV-1a over its size and 16 evenly spaced 64 KiB
/// samples per file (the whole file when smaller). Two workers agree on it exactly when they load
/// the same bytes (barring a crafted collision), without hashing gigabytes at start-up.
pub fn model_hash(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    const CHUNK: u64 = 64 << 10;
    for p in files {
        let mut f = std::fs::File::open(&p)?;
        let len = f.metadata()?.len();
        eat(&len.to_le_bytes());
        let mut buf = vec![0u8; CHUNK as usize];
        for i in 0..16u64 {
            let at = if len <= 16 * CHUNK {
                i * CHUNK
            } else {
                (len - CHUNK) / 15 * i
            };
            if at >= len {
                break;
            }
            f.seek(SeekFrom::Start(at))?;
            let n = f.read(&mut buf)?;
            eat(&buf[..n]);
        }
    }
    Ok(h)
}

/// Serves `service` on `listener` until `shutdown` resolves; in-flight streams are given the
/// time tonic's graceful shutdown allows.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: WorkerService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        // Wide HTTP/2 windows: KV blocks are megabytes; the 64 KiB default would make every
        // block wait for window updates.
        .initial_stream_window_size(Some(H2_WINDOW))
        .initial_connection_window_size(Some(H2_WINDOW))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// Serves `GET /metrics` (OpenMetrics text of `service`'s Stats) on `listener` until
/// `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    service: WorkerService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = service.metrics_text();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
