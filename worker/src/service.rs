//! The gRPC service (`proto/dopd/worker/v1/worker.proto`, generated in `dopd_protocol`) in front
//! of the engine thread ([`WorkerService`]), and the servers for it and for `/metrics`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dopd_ucx::Ucx;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::{Stream, StreamExt, wrappers::UnboundedReceiverStream};
use tonic::{Request as Rpc, Response, Status};

use crate::engine::{EngineError, Event, Mode, Request, Start};
use crate::kv::KvExport;
use crate::sampling::{FinishReason, SamplingParams, StopConditions};
use crate::transfer::{LeaseTable, TransferError, fetch};
use dopd_model::tokenizer::ModelTokenizer;

use crate::engine_thread::EngineHandle;
use crate::transfer::wire::*;
use crate::transfer::{GrpcTransport, LeaseParts, UcxTransport};
use dopd_protocol::proto;
use dopd_protocol::{H2_WINDOW, MAX_MESSAGE_BYTES, Role};
use proto::worker_server::{Worker, WorkerServer};

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
    /// [`crate::engine::Engine::with_block_pool`], which returns them after each import).
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
            step_budget: None,
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
        let rx = self.engine.submit(Request {
            step_budget: (r.step_prefill_budget > 0).then_some(r.step_prefill_budget as usize),
            ..self.request(prompt, r.sampling, r.stop, Mode::Generate, Start::Prompt)
        });
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
            async move { dopd_protocol::openmetrics(text) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
