//! Length-aware scheduling (DOPD §3.3) through the planner crate's routing policy, and the
//! execution of a request on the workers it picked.
//!
//! - **Ultra-short** prompts (`<= ultra_short_max_isl` tokens) run whole on a decode (or mixed)
//!   worker: no KV transfer.
//! - **Long** prompts (above the forecast mean ISL) go to a prefill worker at once; a decode
//!   worker then pulls the KV blocks by lease and streams the rest.
//! - **Short** prompts wait in the [`ShortBatcher`] until its token cap or wait cap releases the
//!   batch; the whole batch goes to one prefill worker together.
//!
//! Prefill work waits in the router's shared queue ([`crate::gate`]) for a free prefill worker,
//! earliest feasible TTFT deadline first (`--prefill-queue per-instance`: sent on arrival to the
//! least-loaded worker and queued there). Decode workers are chosen by least outstanding tokens. A failure before the first token is retried
//! on other workers. A failure after it is resumed on another decode worker: the prompt and the
//! tokens already streamed are recomputed there and sampling continues at the same position with
//! the same seed, so the client sees one uninterrupted stream (at most `retries` times; then the
//! stream ends with an error piece). Every decision is counted with its class, route and reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dopd_planner::load::LoadTotals;
use dopd_planner::routing::{
    self, FlushReason, PrefillQueue, Route, RoutingConfig, ShortBatcher, classify,
};
use dopd_planner::slo::SloTargets;
use dopd_protocol::proto::{self, generate_event::Event as Ev};
use tokio::sync::{mpsc, oneshot};
use tonic::Code;

use crate::gate::{PrefillGate, Slot};
use crate::metrics::Metrics;
use crate::openai::{ApiError, Sampling};
use crate::pool::{Charge, Pool, WorkerEntry};
use dopd_protocol::Role;

/// A validated, tokenized request.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub prompt_tokens: Vec<u32>,
    pub sampling: Sampling,
    pub arrived: Instant,
}

/// What the API layer streams to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Done {
        finish_reason: i32,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// The request failed after its first token.
    Error(String),
}

/// Scheduling settings.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub routing: RoutingConfig,
    /// Attempts on other workers when one fails before the first token.
    pub retries: usize,
    /// Deadline a decode worker gets for pulling KV blocks.
    pub transfer_deadline: Duration,
    /// Where prefill work waits for a free prefill worker.
    pub prefill_queue: PrefillQueue,
    /// The SLOs: TTFT deadlines order the shared prefill queue; the TPOT SLO paces it.
    pub slo: SloTargets,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            routing: RoutingConfig::default(),
            retries: 2,
            transfer_deadline: Duration::from_secs(5),
            prefill_queue: PrefillQueue::default(),
            slo: SloTargets::default(),
        }
    }
}

/// The scheduler shared by all requests.
pub struct Scheduler {
    pub pool: Arc<Pool>,
    cfg: ScheduleConfig,
    /// The forecast mean ISL (f64 bits): set by the planner loop; until then a running mean.
    mean_isl: AtomicU64,
    planned_mean_isl: AtomicU64,
    /// The largest prompt prefilled on a decode worker (the planner may move it).
    ultra_short: std::sync::atomic::AtomicU32,
    batcher: mpsc::UnboundedSender<(u32, Instant, oneshot::Sender<Release>)>,
    /// The shared prefill queue (`None`: per instance).
    gate: Option<Arc<PrefillGate>>,
    pub metrics: Arc<Metrics>,
    /// What the planner reads: counts since the router started (never reset).
    pub load: Arc<Mutex<LoadTotals>>,
    /// The clock the load's arrival times are read on.
    started: Instant,
}

/// A short batch's release: why, and the prefill worker the whole batch goes to.
struct Release {
    reason: FlushReason,
    prefill: Option<Assigned>,
}

/// A prefill worker given to a request (with the shared queue's hold on it, freed when the
/// last holder is done; `tokens`: the prompt tokens prefilled together).
#[derive(Clone)]
struct Assigned {
    worker: Arc<WorkerEntry>,
    /// Held, not read: dropping the last one frees the worker in the shared queue.
    _slot: Option<Arc<Slot>>,
    tokens: u64,
}

impl Assigned {
    /// The worker of a slot from the shared queue, held until the last clone drops.
    fn held(slot: Slot, tokens: u64) -> Self {
        Self {
            worker: slot.worker.clone(),
            _slot: Some(Arc::new(slot)),
            tokens,
        }
    }
}

/// Why an attempt failed.
enum Failure {
    /// Try another worker (this one is marked unhealthy when `dead`).
    Retry {
        worker: String,
        dead: bool,
        why: String,
    },
    /// The request itself is wrong; tell the client.
    Client(ApiError),
}

impl Scheduler {
    pub fn new(pool: Arc<Pool>, cfg: ScheduleConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = PrefillGate::new(pool.clone(), cfg.prefill_queue, cfg.slo.tpot_s);
        let s = Arc::new(Self {
            pool: pool.clone(),
            mean_isl: AtomicU64::new(f64::NAN.to_bits()),
            planned_mean_isl: AtomicU64::new(f64::NAN.to_bits()),
            ultra_short: std::sync::atomic::AtomicU32::new(cfg.routing.ultra_short_max_isl),
            batcher: tx,
            gate: gate.clone(),
            metrics,
            load: Arc::new(Mutex::new(LoadTotals::new(epoch_ms()))),
            started: Instant::now(),
            cfg,
        });
        tokio::spawn(run_batcher(rx, s.cfg.routing.clone(), pool, gate));
        s
    }

    /// The planner's forecast of the next interval's mean ISL (the short/long threshold).
    pub fn set_forecast_mean_isl(&self, isl: f64) {
        self.planned_mean_isl
            .store(isl.to_bits(), Ordering::Relaxed);
    }

    /// The planner's bypass threshold: prompts up to `max_isl` tokens run whole on a decode
    /// worker.
    pub fn set_ultra_short_max_isl(&self, max_isl: u32) {
        self.ultra_short.store(max_isl, Ordering::Relaxed);
    }

    pub fn ultra_short_max_isl(&self) -> u32 {
        self.ultra_short.load(Ordering::Relaxed)
    }

    /// The short/long threshold now: the planner's forecast, else a running mean of recent
    /// prompts (NaN before any: everything above ultra-short is long).
    pub fn threshold(&self) -> f64 {
        routing::threshold(
            f64::from_bits(self.planned_mean_isl.load(Ordering::Relaxed)),
            f64::from_bits(self.mean_isl.load(Ordering::Relaxed)),
        )
    }

    fn observe_isl(&self, isl: u32) {
        let old = f64::from_bits(self.mean_isl.load(Ordering::Relaxed));
        self.mean_isl.store(
            routing::running_mean_isl(old, isl).to_bits(),
            Ordering::Relaxed,
        );
    }

    /// Schedules `job`; returns once its first piece is ready (so a failure before it can still
    /// become an HTTP error), with a receiver for the rest.
    pub async fn start(self: &Arc<Self>, job: Job) -> Result<mpsc::Receiver<Piece>, ApiError> {
        let isl = job.prompt_tokens.len() as u32;
        if let Ok(mut l) = self.load.lock() {
            l.arrive_at(
                isl,
                job.arrived
                    .saturating_duration_since(self.started)
                    .as_secs_f64(),
            );
        }
        let routing = RoutingConfig {
            ultra_short_max_isl: self.ultra_short_max_isl(),
            ..self.cfg.routing.clone()
        };
        let class = classify(isl, self.threshold(), &routing);
        self.observe_isl(isl);
        let has_prefill = !self.pool.candidates(&[Role::Prefill], &[]).is_empty();
        // Short prompts wait for their batch first (once; retries go straight on).
        let (mut route, mut reason) =
            routing::route_with_room(class, has_prefill, &routing, || {
                decode_room(&self.pool, isl)
            });
        let mut batch_prefill = None;
        if route == Route::Batch {
            let (tx, rx) = oneshot::channel();
            let _ = self.batcher.send((isl, self.deadline(&job), tx));
            self.metrics.router_waiting.inc();
            let rel = rx.await;
            self.metrics.router_waiting.dec();
            let (flush, prefill) = match rel {
                Ok(Release { reason, prefill }) => (reason, prefill),
                Err(_) => (FlushReason::Drain, None),
            };
            (route, reason) = routing::route_batch(flush, prefill.is_some());
            batch_prefill = prefill;
        }
        let class_label = class.as_str();
        let mut exclude: Vec<String> = Vec::new();
        let mut last_error = String::from("no worker available");
        for attempt in 0..=self.cfg.retries {
            self.metrics
                .decision(class_label, route.as_str(), reason.as_str());
            let r = if route == Route::Local {
                self.local(
                    &job,
                    &exclude,
                    routing::step_prefill_budget(class, &routing),
                )
                .await
            } else {
                self.disaggregated(&job, batch_prefill.take(), &exclude)
                    .await
            };
            match r {
                Ok(rx) => return Ok(rx),
                Err(Failure::Client(e)) => {
                    self.record_failure();
                    return Err(e);
                }
                Err(Failure::Retry { worker, dead, why }) => {
                    tracing::warn!(%worker, attempt, %why, "worker failed before the first token; retrying elsewhere");
                    self.metrics.retries.inc();
                    if dead && let Some(w) = self.pool.get(&worker) {
                        w.mark_unhealthy();
                    }
                    exclude.push(worker);
                    last_error = why;
                    // After a failure the request no longer waits for a batch.
                    (route, reason) = routing::reroute(route, self.any(&[Role::Prefill], &exclude));
                }
            }
        }
        self.record_failure();
        Err(ApiError {
            retry_after: Some(1),
            ..ApiError::status(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("no worker could serve the request: {last_error}"),
            )
        })
    }

    fn any(&self, roles: &[Role], exclude: &[String]) -> bool {
        !self.pool.candidates(roles, exclude).is_empty()
    }

    /// When `job`'s first token is due (its TTFT SLO).
    fn deadline(&self, job: &Job) -> Instant {
        let s =
            self.cfg.slo.ttft_s + self.cfg.slo.ttft_per_token_s * job.prompt_tokens.len() as f64;
        job.arrived
            + Duration::from_secs_f64(if s.is_finite() {
                s.clamp(0.0, 1e9)
            } else {
                1e9
            })
    }

    /// Requests waiting in the shared prefill queue (not counting short batches).
    pub fn prefill_waiting(&self) -> usize {
        self.gate.as_ref().map_or(0, |g| g.waiting())
    }

    fn record_failure(&self) {
        if let Ok(mut l) = self.load.lock() {
            l.fail();
        }
    }

    /// The first token of `job` is on its way to the client: its TTFT counts now.
    fn first_token(&self, job: &Job) {
        let ttft = job.arrived.elapsed().as_secs_f64();
        self.metrics.ttft.observe(ttft);
        if let Ok(mut l) = self.load.lock() {
            l.first_token(ttft);
        }
    }

    fn request(job: &Job) -> proto::GenerateRequest {
        proto::GenerateRequest {
            step_prefill_budget: 0,
            request_id: job.id.clone(),
            inline_kv: false,
            prompt: String::new(),
            prompt_tokens: job.prompt_tokens.clone(),
            sampling: Some(proto::Sampling {
                temperature: job.sampling.temperature,
                top_k: 0,
                top_p: job.sampling.top_p,
                seed: job.sampling.seed,
            }),
            stop: Some(proto::StopSettings {
                max_tokens: job.sampling.max_tokens,
                stop: job.sampling.stop.clone(),
                ignore_eos: job.sampling.ignore_eos,
            }),
        }
    }

    fn cost(job: &Job) -> u64 {
        job.prompt_tokens.len() as u64 + u64::from(job.sampling.max_tokens)
    }

    async fn local(
        self: &Arc<Self>,
        job: &Job,
        exclude: &[String],
        step_budget: u32,
    ) -> Result<mpsc::Receiver<Piece>, Failure> {
        let w = self
            .pool
            .pick(&[Role::Decode, Role::Mixed], exclude)
            .ok_or_else(|| Failure::Retry {
                worker: String::new(),
                dead: false,
                why: "no healthy decode or mixed worker".into(),
            })?;
        let charge = w.charge(Self::cost(job));
        let mut c = w.client.clone();
        let stream = c
            .generate(proto::GenerateRequest {
                step_prefill_budget: step_budget,
                ..Self::request(job)
            })
            .await
            .map_err(|s| failure(&w, &s))?
            .into_inner();
        self.stream(job, w, stream, None, charge, exclude).await
    }

    async fn disaggregated(
        self: &Arc<Self>,
        job: &Job,
        batch_prefill: Option<Assigned>,
        exclude: &[String],
    ) -> Result<mpsc::Receiver<Piece>, Failure> {
        let no_prefill = || Failure::Retry {
            worker: String::new(),
            dead: false,
            why: "no healthy prefill worker".into(),
        };
        let tokens = job.prompt_tokens.len() as u64;
        let assigned = match batch_prefill
            .filter(|p| !exclude.contains(&p.worker.url) && p.worker.healthy())
        {
            Some(p) => p,
            // A first attempt waits in the shared queue; a retry goes straight to a worker.
            None => match (&self.gate, exclude.is_empty()) {
                (Some(gate), true) => {
                    self.metrics.router_waiting.inc();
                    let slot = gate.acquire(self.deadline(job), tokens).await;
                    self.metrics.router_waiting.dec();
                    Assigned::held(slot.ok_or_else(no_prefill)?, tokens)
                }
                _ => Assigned {
                    worker: self
                        .pool
                        .pick(&[Role::Prefill], exclude)
                        .ok_or_else(no_prefill)?,
                    _slot: None,
                    tokens,
                },
            },
        };
        let pre = assigned.worker.clone();
        let no_decode = || Failure::Retry {
            worker: String::new(),
            dead: false,
            why: "no healthy decode worker".into(),
        };
        if !self.any(&[Role::Decode, Role::Mixed], exclude) {
            return Err(no_decode());
        }
        let p = {
            let _charge = pre.charge(tokens);
            let mut c = pre.client.clone();
            let t0 = Instant::now();
            let p = c
                .prefill(Self::request(job))
                .await
                .map_err(|s| failure(&pre, &s))?
                .into_inner();
            if let Some(g) = &self.gate {
                g.observe(assigned.tokens, t0.elapsed().as_secs_f64());
            }
            // The prefill worker is free for the next work (once the batch's last prompt is done).
            drop(assigned);
            p
        };
        if p.finish != proto::FinishReason::Unspecified as i32 {
            // The first token already ended the request.
            let (tx, rx) = mpsc::channel(4);
            self.first_token(job);
            let _ = tx.try_send(Piece::Text(p.text));
            let _ = tx.try_send(Piece::Done {
                finish_reason: p.finish,
                prompt_tokens: p.prompt_tokens.len() as u32,
                completion_tokens: 1,
            });
            self.finish(job, None, 1, true);
            return Ok(rx);
        }
        // The decode worker is picked once the prefill is done and charged at once, so that
        // prompts prefilled together (a batch) spread over the decode workers.
        let dec = self
            .pool
            .pick(&[Role::Decode, Role::Mixed], exclude)
            .ok_or_else(no_decode)?;
        let charge = dec.charge(Self::cost(job));
        let req = Self::request(job);
        let mut c = dec.client.clone();
        let stream = c
            .decode(proto::DecodeRequest {
                request_id: job.id.clone(),
                prompt_tokens: p.prompt_tokens,
                first_token: p.first_token,
                kv: None,
                handle: p.handle,
                prefill_url: pre.url.clone(),
                transfer_deadline_ms: self.cfg.transfer_deadline.as_millis() as u32,
                sampling: req.sampling,
                stop: req.stop,
                resume_tokens: Vec::new(),
                resume_sent_bytes: 0,
            })
            .await
            .map_err(|s| failure(&dec, &s))?
            .into_inner();
        // The prefill worker's first token is the first piece.
        self.stream(
            job,
            dec,
            stream,
            Some((p.first_token, p.text)),
            charge,
            exclude,
        )
        .await
    }

    /// Waits for the worker's first event (a failure before it is retried), then forwards the
    /// rest on a task, resuming on another worker if this one fails mid-stream.
    async fn stream(
        self: &Arc<Self>,
        job: &Job,
        w: Arc<WorkerEntry>,
        mut stream: tonic::Streaming<proto::GenerateEvent>,
        first: Option<(u32, String)>,
        charge: Charge,
        exclude: &[String],
    ) -> Result<mpsc::Receiver<Piece>, Failure> {
        let (tx, rx) = mpsc::channel(64);
        let mut sent = Sent::default();
        if let Some((id, text)) = first {
            self.first_token(job);
            sent.ids.push(id);
            sent.bytes += text.len();
            sent.tokens = 1;
            let _ = tx.send(Piece::Text(text)).await;
        } else {
            // Nothing reached the client yet: a failure here is retried elsewhere.
            match stream.message().await {
                Ok(Some(ev)) => {
                    self.first_token(job);
                    if forward(&tx, ev, &mut sent).await {
                        self.finish(job, None, sent.tokens, true);
                        return Ok(rx);
                    }
                }
                Ok(None) => {
                    return Err(Failure::Retry {
                        worker: w.url.clone(),
                        dead: false,
                        why: "the worker ended the stream without an answer".into(),
                    });
                }
                Err(s) => return Err(failure(&w, &s)),
            }
        }
        let me = self.clone();
        let job = job.clone();
        let mut exclude = exclude.to_vec();
        tokio::spawn(async move {
            let (mut w, mut stream, mut _charge) = (w, stream, charge);
            let started = Instant::now();
            let mut resumes = 0;
            let ok = loop {
                let why = match stream.message().await {
                    Ok(Some(ev)) => {
                        if forward(&tx, ev, &mut sent).await {
                            break true;
                        }
                        if tx.is_closed() {
                            // The client went away: dropping the stream cancels the request.
                            break false;
                        }
                        continue;
                    }
                    Ok(None) => "the worker ended the stream early".to_string(),
                    Err(s) => {
                        w.failed_with(&s);
                        format!("worker {} failed mid-stream: {}", w.url, s.message())
                    }
                };
                // Resume on another worker from what the client already has.
                exclude.push(w.url.clone());
                let resumed = if resumes < me.cfg.retries && !tx.is_closed() {
                    me.resume(&job, &sent, &mut exclude).await
                } else {
                    None
                };
                match resumed {
                    Some((nw, ns, nc)) => {
                        tracing::warn!(request = %job.id, from = %w.url, to = %nw.url, tokens = sent.ids.len(), %why, "stream resumed on another worker");
                        resumes += 1;
                        me.metrics.resumes.inc();
                        if let Ok(mut l) = me.load.lock() {
                            l.resume();
                        }
                        (w, stream, _charge) = (nw, ns, nc);
                    }
                    None => {
                        me.metrics.stream_errors.inc();
                        let _ = tx.send(Piece::Error(why)).await;
                        break false;
                    }
                }
            };
            let tokens = sent.tokens;
            let itl = (tokens > 1).then(|| started.elapsed().as_secs_f64() / f64::from(tokens - 1));
            me.finish(&job, itl, tokens, ok);
        });
        Ok(rx)
    }

    /// Starts `job` again on a decode (or mixed) worker not in `exclude`, from the tokens in
    /// `sent`: the worker recomputes them and streams what the client does not have yet. Workers
    /// that refuse are added to `exclude`; `None` when none is left.
    async fn resume(
        &self,
        job: &Job,
        sent: &Sent,
        exclude: &mut Vec<String>,
    ) -> Option<(
        Arc<WorkerEntry>,
        tonic::Streaming<proto::GenerateEvent>,
        Charge,
    )> {
        let (&first, rest) = sent.ids.split_first()?;
        let req = Self::request(job);
        loop {
            let w = self.pool.pick(&[Role::Decode, Role::Mixed], exclude)?;
            let charge = w.charge(Self::cost(job));
            let mut c = w.client.clone();
            let r = c
                .decode(proto::DecodeRequest {
                    request_id: job.id.clone(),
                    prompt_tokens: job.prompt_tokens.clone(),
                    first_token: first,
                    kv: None,
                    handle: None,
                    prefill_url: String::new(),
                    transfer_deadline_ms: 0,
                    sampling: req.sampling,
                    stop: req.stop.clone(),
                    resume_tokens: rest.to_vec(),
                    resume_sent_bytes: u32::try_from(sent.bytes).unwrap_or(u32::MAX),
                })
                .await;
            match r {
                Ok(s) => return Some((w, s.into_inner(), charge)),
                Err(s) => {
                    tracing::warn!(worker = %w.url, error = %s.message(), "a worker refused to resume a stream");
                    w.failed_with(&s);
                    exclude.push(w.url.clone());
                }
            }
        }
    }

    /// `job` ended: successfully with `osl` tokens, or not. (Its TTFT was counted when its first
    /// token came.)
    fn finish(&self, job: &Job, itl: Option<f64>, osl: u32, ok: bool) {
        if let Some(t) = itl {
            self.metrics.itl.observe(t);
        }
        if let Ok(mut l) = self.load.lock() {
            if ok {
                l.finish(osl, itl, job.arrived.elapsed().as_secs_f64());
            } else {
                l.fail();
            }
        }
    }
}

/// What a stream has delivered so far: the generated token ids (the first included), the bytes
/// of text sent to the client, and the completion tokens counted.
#[derive(Debug, Default)]
struct Sent {
    ids: Vec<u32>,
    bytes: usize,
    tokens: u32,
}

/// Sends one worker event on; returns whether it was the last.
async fn forward(tx: &mpsc::Sender<Piece>, ev: proto::GenerateEvent, sent: &mut Sent) -> bool {
    match ev.event {
        Some(Ev::Token(t)) => {
            sent.tokens += 1;
            sent.ids.push(t.id);
            if !t.text.is_empty() {
                sent.bytes += t.text.len();
                let _ = tx.send(Piece::Text(t.text)).await;
            }
            false
        }
        Some(Ev::Finished(f)) => {
            if !f.text.is_empty() {
                sent.bytes += f.text.len();
                let _ = tx.send(Piece::Text(f.text)).await;
            }
            sent.tokens = sent.tokens.max(f.completion_tokens);
            let _ = tx
                .send(Piece::Done {
                    finish_reason: f.reason,
                    prompt_tokens: f.prompt_tokens,
                    completion_tokens: f.completion_tokens,
                })
                .await;
            true
        }
        None => false,
    }
}

/// A worker's gRPC error as a retry (transport-level: the worker is likely gone) or a client
/// error (the request is wrong).
fn failure(w: &WorkerEntry, s: &tonic::Status) -> Failure {
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => Failure::Client(ApiError::invalid(
            "prompt",
            format!("the worker refused the request: {}", s.message()),
        )),
        code => Failure::Retry {
            worker: w.url.clone(),
            dead: matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled),
            why: format!("{}: {:?}: {}", w.url, code, s.message()),
        },
    }
}

/// The short-request batcher's task: releases batches on the token cap (at push) or the wait
/// cap (on a timer); each batch goes to one prefill worker: the next free one from the shared
/// queue (earliest deadline of the batch), or the least loaded at release.
async fn run_batcher(
    mut rx: mpsc::UnboundedReceiver<(u32, Instant, oneshot::Sender<Release>)>,
    cfg: RoutingConfig,
    pool: Arc<Pool>,
    gate: Option<Arc<PrefillGate>>,
) {
    type Member = (Instant, oneshot::Sender<Release>);
    let mut b: ShortBatcher<Member> = ShortBatcher::new(&cfg);
    let t0 = Instant::now();
    let now = || t0.elapsed().as_secs_f64();
    fn tell(members: Vec<Member>, reason: FlushReason, prefill: Option<Assigned>) {
        for (_, tx) in members {
            let _ = tx.send(Release {
                reason,
                prefill: prefill.clone(),
            });
        }
    }
    let release = |batch: routing::Batch<Member>| match &gate {
        Some(gate) => {
            let gate = gate.clone();
            let deadline = batch.items.iter().map(|(d, _)| *d).min();
            let tokens = batch.tokens;
            let reason = batch.reason;
            let members = batch.items;
            tokio::spawn(async move {
                let slot = match deadline {
                    Some(d) => gate.acquire(d, tokens).await,
                    None => None,
                };
                tell(members, reason, slot.map(|s| Assigned::held(s, tokens)));
            });
        }
        None => {
            let prefill = pool.pick(&[Role::Prefill], &[]).map(|w| Assigned {
                worker: w,
                _slot: None,
                tokens: batch.tokens,
            });
            tell(batch.items, batch.reason, prefill);
        }
    };
    loop {
        let wait = b
            .deadline()
            .map(|d| Duration::from_secs_f64((d - now()).max(0.0)));
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((tokens, deadline, tx)) => {
                    for batch in b.push((deadline, tx), tokens, now()) {
                        release(batch);
                    }
                }
                None => {
                    if let Some(batch) = b.drain() {
                        release(batch);
                    }
                    return;
                }
            },
            () = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(batch) = b.poll(now()) {
                    release(batch);
                }
            }
        }
    }
}

/// This process's start in Unix milliseconds: the epoch of its load counters.
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

/// Whether the decode worker an ultra-short prompt of `isl` tokens would be prefilled on (the
/// one a local route picks) has KV room for it by its last stats report; none yet counts as
/// room.
fn decode_room(pool: &Pool, isl: u32) -> bool {
    pool.pick(&[Role::Decode, Role::Mixed], &[])
        .and_then(|w| w.stats())
        .is_none_or(|s| routing::kv_room(s.waiting, s.kv_blocks_free, s.kv_block_size, isl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_decode_worker_s_last_report_decides_the_room() {
        let pool = Pool::new();
        // Nothing listens there: the entry is faked, never called.
        let d = pool.add("http://127.0.0.1:1").await.expect("URL");
        d.fake(Role::Decode, true, None);
        assert!(decode_room(&pool, 20), "no report yet counts as room");
        let report = |waiting, free| proto::StatsResponse {
            waiting,
            kv_blocks_free: free,
            kv_block_size: 16,
            ..Default::default()
        };
        d.fake(Role::Decode, true, Some(report(0, 2)));
        assert!(decode_room(&pool, 20));
        d.fake(Role::Decode, true, Some(report(0, 1)));
        assert!(!decode_room(&pool, 20), "21 tokens in one block of 16");
        d.fake(Role::Decode, true, Some(report(1, 2)));
        assert!(!decode_room(&pool, 20), "behind one waiting request");
    }
}
