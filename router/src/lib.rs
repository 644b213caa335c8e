//! # dopd-router: the front door
//!
//! An OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions` with and without
//! SSE streaming, `/v1/models`, `/health`, `/metrics`) in front of prefill, decode and mixed
//! workers, with DOPD's length-aware scheduling ([`schedule`]), a worker registry with health
//! checks ([`pool`]) and the cumulative counts the planner reads (`GET /v1/dopd/load`,
//! `dopd_protocol::load::LoadSnapshot`: read by any number of readers without changing them).
//! Requests are tokenized here, so their prompt length is known before routing.
//!
//! Operational endpoints: `GET /v1/dopd/workers`, `POST /v1/dopd/workers {"url"}` (register),
//! `POST /v1/dopd/drain {"workers": [url or worker id]}` (no new work; answers their in-flight
//! counts).

pub mod discovery;
pub mod gate;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod schedule;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as Http};
use dopd_model::tokenizer::{Message, ModelTokenizer};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::openai::{
    ApiError, ChatRequest, CompletionRequest, Kind, Sampling, Shape, Usage, finish_reason,
};
use crate::pool::Pool;
use crate::schedule::{Job, Piece, ScheduleConfig, Scheduler};

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The model name clients ask for.
    pub model: String,
    /// The model's context (prompt plus completion tokens).
    pub context: usize,
    /// Requests admitted but not yet streaming; beyond this, 429 with Retry-After.
    pub max_waiting: usize,
    /// When not empty, `/v1/*` needs `Authorization: Bearer <key>` with one of these keys (one
    /// per client).
    pub api_keys: Vec<String>,
    /// With API keys: most requests one key may have in flight at once (0: no bound); beyond
    /// it, 429 with Retry-After.
    pub max_streams_per_key: usize,
    pub schedule: ScheduleConfig,
}

/// The router's shared state.
pub struct Router {
    pub cfg: RouterConfig,
    tokenizer: Arc<ModelTokenizer>,
    /// The tokenizer's vocabulary size (computing it builds the whole vocabulary map).
    vocab: usize,
    pub pool: Arc<Pool>,
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
    /// Admitted requests before their first token.
    starting: AtomicUsize,
    /// Requests in flight per API key.
    per_key: Arc<Mutex<HashMap<String, usize>>>,
    next_id: AtomicU64,
    started: Instant,
}

impl Router {
    /// A router over `pool` (needs a tokio runtime: the short batcher is a task).
    pub fn new(cfg: RouterConfig, tokenizer: ModelTokenizer, pool: Arc<Pool>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let scheduler = Scheduler::new(pool.clone(), cfg.schedule.clone(), metrics.clone());
        Arc::new(Self {
            cfg,
            vocab: tokenizer.vocab_size(),
            tokenizer: Arc::new(tokenizer),
            pool,
            scheduler,
            metrics,
            starting: AtomicUsize::new(0),
            per_key: Arc::default(),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    /// The counts since the router started, the requests waiting in it and every worker's
    /// view. Reading changes nothing.
    pub fn load(&self) -> dopd_protocol::load::LoadSnapshot {
        // Requests held in the router itself (short batching); those sent to a worker count in
        // its own queue.
        let waiting = self.metrics.router_waiting.get().max(0) as u64;
        let totals = self
            .scheduler
            .load
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        dopd_protocol::load::LoadSnapshot::new(
            totals,
            waiting,
            self.started.elapsed().as_secs_f64(),
            self.pool.views(),
        )
    }

    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            self.started.elapsed().as_micros() as u64 & 0xffff_ffff,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// The HTTP application.
pub fn app(r: Arc<Router>) -> Http {
    Http::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/dopd/load", get(load))
        .route("/v1/dopd/workers", get(workers).post(add_worker))
        .route("/v1/dopd/drain", post(drain))
        .route("/v1/dopd/forecast", post(forecast))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(r)
}

/// Serves `app` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    r: Arc<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // No Nagle delay on small responses and stream chunks.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(r))
        .with_graceful_shutdown(shutdown)
        .await
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request's place in its API key's bound, given back when the request ends (however it
/// ends: the guard lives as long as the response or its stream).
struct KeySlot {
    key: String,
    per_key: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut m = self.per_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Checks the API key (when the router has keys); `Some` with the key's name when it does.
fn authorize(r: &Router, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    if r.cfg.api_keys.is_empty() {
        return Ok(None);
    }
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(k) if r.cfg.api_keys.iter().any(|x| x == k) => Ok(Some(k.to_string())),
        _ => {
            r.metrics.reject("unauthorized");
            Err(ApiError::status(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .with_code("invalid_api_key"))
        }
    }
}

/// Takes a place in `key`'s bound on requests in flight, or answers 429.
fn admit_key(r: &Router, key: Option<String>) -> Result<Option<KeySlot>, ApiError> {
    let Some(key) = key else {
        return Ok(None);
    };
    let max = r.cfg.max_streams_per_key;
    let mut m = r.per_key.lock().unwrap_or_else(|p| p.into_inner());
    let n = m.entry(key.clone()).or_insert(0);
    if max > 0 && *n >= max {
        r.metrics.reject("key_limit");
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("this API key has {n} requests in flight, its bound; retry when one ends"),
            )
        });
    }
    *n += 1;
    Ok(Some(KeySlot {
        key,
        per_key: r.per_key.clone(),
    }))
}

/// Largest request body the API reads (a full 8k-token context is about 40 kB of text).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// A request body as read, or why it could not be (over [`MAX_BODY_BYTES`], a broken stream).
type Body = Result<Bytes, BytesRejection>;

fn parse<T: serde::de::DeserializeOwned>(body: &Body) -> Result<T, ApiError> {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the request body is larger than {} MiB",
                    MAX_BODY_BYTES >> 20
                )
            } else {
                format!("cannot read the request body: {}", e.body_text())
            };
            return Err(ApiError::status(status, "invalid_request_error", message));
        }
    };
    if body.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "the request body is empty; send JSON",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "invalid JSON"
        } else {
            "invalid request"
        };
        ApiError::invalid("body", format!("{what}: {e}"))
    })
}

async fn completions(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    let out = async {
        let key = authorize(&r, &headers)?;
        let req: CompletionRequest = parse(&body)?;
        let sampling = req.common.validate(&r.cfg.model, 16)?;
        let tokens = match req.prompt_input()? {
            openai::PromptInput::Text(text) => r
                .tokenizer
                .encode(&text)
                .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize: {e}")))?,
            openai::PromptInput::Tokens(t) => {
                let vocab = r.vocab;
                if let Some(bad) = t.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {vocab}"),
                    ));
                }
                t
            }
        };
        run(&r, Kind::Completion, tokens, sampling, key).await
    }
    .await;
    respond(&r, Kind::Completion, out)
}

async fn chat(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    let out = async {
        let key = authorize(&r, &headers)?;
        let req: ChatRequest = parse(&body)?;
        let sampling = req
            .common
            .validate(&r.cfg.model, openai::DEFAULT_MAX_TOKENS)?;
        let turns = req.turns()?;
        let messages: Vec<Message> = turns.iter().map(|(ro, c)| Message::new(ro, c)).collect();
        let prompt = r.tokenizer.chat_prompt(&messages);
        let tokens = r
            .tokenizer
            .encode(&prompt)
            .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize: {e}")))?;
        run(&r, Kind::Chat, tokens, sampling, key).await
    }
    .await;
    respond(&r, Kind::Chat, out)
}

fn respond(r: &Router, kind: Kind, out: Result<Response, ApiError>) -> Response {
    let resp = out.unwrap_or_else(IntoResponse::into_response);
    r.metrics.request(kind.endpoint(), resp.status().as_u16());
    resp
}

/// Admission, context check, scheduling, and the response (streamed or whole).
async fn run(
    r: &Arc<Router>,
    kind: Kind,
    tokens: Vec<u32>,
    sampling: Sampling,
    key: Option<String>,
) -> Result<Response, ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let isl = tokens.len();
    if isl + sampling.max_tokens as usize > r.cfg.context {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "This model's maximum context length is {} tokens; the prompt has {isl} and \
                 max_tokens asks for {} more",
                r.cfg.context, sampling.max_tokens
            ),
        )
        .with_code("context_length_exceeded"));
    }
    if r.starting.load(Ordering::Relaxed) >= r.cfg.max_waiting {
        r.metrics.reject("overloaded");
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the server is at its admission bound ({} requests waiting); retry shortly",
                    r.cfg.max_waiting
                ),
            )
        });
    }
    let slot = admit_key(r, key)?;
    let id = r.id(kind.id_prefix());
    let job = Job {
        id: id.clone(),
        prompt_tokens: tokens,
        sampling: sampling.clone(),
        arrived: Instant::now(),
    };
    r.starting.fetch_add(1, Ordering::Relaxed);
    let started = r.scheduler.start(job).await;
    r.starting.fetch_sub(1, Ordering::Relaxed);
    let rx = started?;
    let shape = Shape {
        kind,
        id,
        created: now_s(),
        model: r.cfg.model.clone(),
    };
    if sampling.stream {
        Ok(stream(shape, isl, sampling, Answer { rx, slot }))
    } else {
        let out = whole(shape, isl, rx).await;
        drop(slot);
        out
    }
}

/// A request's pieces as they come, and its place in its API key's bound, held until the
/// answer has been sent.
struct Answer {
    rx: mpsc::Receiver<Piece>,
    slot: Option<KeySlot>,
}

async fn whole(
    shape: Shape,
    isl: usize,
    mut rx: mpsc::Receiver<Piece>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut done = None;
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => done = Some((finish_reason, prompt_tokens, completion_tokens)),
            Piece::Error(e) => {
                return Err(ApiError::status(StatusCode::BAD_GATEWAY, "server_error", e));
            }
        }
    }
    let (reason, prompt_tokens, completion_tokens) = done.ok_or_else(|| {
        ApiError::status(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "the worker ended the request without finishing it",
        )
    })?;
    let prompt_tokens = if prompt_tokens == 0 {
        isl as u32
    } else {
        prompt_tokens
    };
    let usage = Usage::new(prompt_tokens, completion_tokens);
    Ok(Json(shape.completion(&text, finish_reason(reason), usage)).into_response())
}

fn stream(shape: Shape, isl: usize, sampling: Sampling, answer: Answer) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        // The key's place is given back when the stream ends.
        let Answer {
            mut rx,
            slot: _slot,
        } = answer;
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if let Some(first) = shape.opening()
            && !send(first).await
        {
            return;
        }
        while let Some(p) = rx.recv().await {
            let alive = match p {
                Piece::Text(t) => send(shape.text(&t)).await,
                Piece::Done {
                    finish_reason: reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut ok = send(shape.finish(finish_reason(reason))).await;
                    if sampling.include_usage {
                        let prompt = if prompt_tokens == 0 {
                            isl as u32
                        } else {
                            prompt_tokens
                        };
                        ok = ok && send(shape.usage(Usage::new(prompt, completion_tokens))).await;
                    }
                    ok
                }
                Piece::Error(e) => {
                    let err = ApiError::status(StatusCode::BAD_GATEWAY, "server_error", e);
                    send(err.body()).await
                }
            };
            if !alive {
                // The client went away; dropping `rx` cancels the request on the worker.
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn models(State(r): State<Arc<Router>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&r, &headers) {
        return e.into_response();
    }
    Json(openai::model_list(&r.cfg.model)).into_response()
}

async fn health(State(r): State<Arc<Router>>) -> Response {
    use dopd_protocol::Role::{Decode, Mixed, Prefill};
    let serving = r.pool.candidates(&[Decode, Mixed], &[]).len();
    let prefill = r.pool.candidates(&[Prefill], &[]).len();
    let body = Json(json!({
        "status": if serving > 0 { "ok" } else { "unavailable" },
        "decode_workers": serving,
        "prefill_workers": prefill,
    }));
    if serving > 0 {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(r): State<Arc<Router>>) -> Response {
    dopd_protocol::openmetrics(r.metrics.render(&r.pool.views()))
}

async fn load(State(r): State<Arc<Router>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&r, &headers) {
        return e.into_response();
    }
    Json(r.load()).into_response()
}

async fn workers(State(r): State<Arc<Router>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&r, &headers) {
        return e.into_response();
    }
    Json(json!({"workers": r.pool.views()})).into_response()
}

/// The planner's forecast for the next interval; its mean ISL becomes the short/long threshold,
/// and `ultra_short_max_isl` (optional) the largest prompt prefilled on a decode worker.
async fn forecast(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    let out = async {
        authorize(&r, &headers)?;
        let v: Value = parse(&body)?;
        let isl = v["mean_isl"]
            .as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                ApiError::invalid("mean_isl", "send {\"mean_isl\": tokens (a number >= 0)}")
            })?;
        let bypass = match &v["ultra_short_max_isl"] {
            Value::Null => None,
            b => Some(
                b.as_u64()
                    .and_then(|b| u32::try_from(b).ok())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "ultra_short_max_isl",
                            "the largest prompt prefilled on a decode worker: a whole number of tokens",
                        )
                    })?,
            ),
        };
        r.scheduler.set_forecast_mean_isl(isl);
        if let Some(b) = bypass {
            r.scheduler.set_ultra_short_max_isl(b);
        }
        Ok::<_, ApiError>(
            Json(json!({
                "threshold": r.scheduler.threshold(),
                "ultra_short_max_isl": r.scheduler.ultra_short_max_isl(),
            }))
            .into_response(),
        )
    }
    .await;
    out.unwrap_or_else(IntoResponse::into_response)
}

async fn add_worker(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    let out = async {
        authorize(&r, &headers)?;
        let v: Value = parse(&body)?;
        let url = v["url"]
            .as_str()
            .ok_or_else(|| ApiError::invalid("url", "send {\"url\": \"http://host:port\"}"))?;
        let w = r
            .pool
            .add(url)
            .await
            .map_err(|e| ApiError::invalid("url", e))?;
        Ok::<_, ApiError>(Json(json!({"url": w.url, "healthy": w.healthy()})).into_response())
    }
    .await;
    out.unwrap_or_else(IntoResponse::into_response)
}

async fn drain(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    let out = async {
        authorize(&r, &headers)?;
        let v: Value = parse(&body)?;
        let names: Vec<String> = v["workers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .filter(|n: &Vec<String>| !n.is_empty())
            .ok_or_else(|| {
                ApiError::invalid("workers", "send {\"workers\": [url or worker id, ...]}")
            })?;
        let drained = r.pool.drain(&names).await;
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| !drained.iter().any(|d| &d.url == *n || &d.worker_id == *n))
            .collect();
        if !unknown.is_empty() {
            return Err(ApiError::status(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("unknown workers: {unknown:?}"),
            ));
        }
        Ok(Json(json!({"draining": drained})).into_response())
    }
    .await;
    out.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests;
