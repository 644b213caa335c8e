//! # dopd-router: the front door
//!
//! An OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions` with and without
//! SSE streaming, `/v1/models`, `/health`, `/metrics`) in front of prefill, decode and mixed
//! workers, with DOPD's length-aware scheduling ([`schedule`]), a worker registry with health
//! checks ([`pool`]) and the cumulative counts the planner reads (`GET /v1/dopd/load`,
//! [`load`]: read by any number of readers without changing them). Requests are tokenized here, so their prompt length is known before routing.
//!
//! Operational endpoints: `GET /v1/dopd/workers`, `POST /v1/dopd/workers {"url"}` (register),
//! `POST /v1/dopd/drain {"workers": [url or worker id]}` (no new work; answers their in-flight
//! counts).

pub mod discovery;
pub mod load;
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
use dopd_worker::tokenizer::{Message, ModelTokenizer};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::openai::{ApiError, ChatRequest, CompletionRequest, Sampling, Usage, finish_reason};
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
    pub fn load(&self) -> load::LoadSnapshot {
        // Requests held in the router itself (short batching); those sent to a worker count in
        // its own queue.
        let waiting = self.metrics.router_waiting.get().max(0) as u64;
        let totals = self
            .scheduler
            .load
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        load::LoadSnapshot::new(
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

/// Which endpoint answers, for labels and response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        }
    }
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
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = r.id(prefix);
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
    let created = now_s();
    if sampling.stream {
        Ok(stream(
            r.cfg.model.clone(),
            kind,
            id,
            created,
            isl,
            sampling,
            Answer { rx, slot },
        ))
    } else {
        let out = whole(r.cfg.model.clone(), kind, id, created, isl, rx).await;
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
    model: String,
    kind: Kind,
    id: String,
    created: u64,
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
    let body = match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null,
                         "finish_reason": finish_reason(reason)}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text},
                         "logprobs": null,
                         "finish_reason": finish_reason(reason)}],
            "usage": usage,
        }),
    };
    Ok(Json(body).into_response())
}

fn stream(
    model: String,
    kind: Kind,
    id: String,
    created: u64,
    isl: usize,
    sampling: Sampling,
    answer: Answer,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        // The key's place is given back when the stream ends.
        let Answer {
            mut rx,
            slot: _slot,
        } = answer;
        let chunk = |delta: Value, finish: Option<&str>| -> Value {
            match kind {
                Kind::Completion => json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": delta.as_str().unwrap_or(""),
                                 "logprobs": null, "finish_reason": finish}],
                }),
                Kind::Chat => json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                }),
            }
        };
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if kind == Kind::Chat
            && !send(chunk(json!({"role": "assistant", "content": ""}), None)).await
        {
            return;
        }
        while let Some(p) = rx.recv().await {
            let alive = match p {
                Piece::Text(t) => {
                    let delta = match kind {
                        Kind::Completion => json!(t),
                        Kind::Chat => json!({"content": t}),
                    };
                    send(chunk(delta, None)).await
                }
                Piece::Done {
                    finish_reason: reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let empty = match kind {
                        Kind::Completion => json!(""),
                        Kind::Chat => json!({}),
                    };
                    let mut ok = send(chunk(empty, Some(finish_reason(reason)))).await;
                    if sampling.include_usage {
                        let prompt = if prompt_tokens == 0 {
                            isl as u32
                        } else {
                            prompt_tokens
                        };
                        let mut u = chunk(json!(""), None);
                        u["choices"] = json!([]);
                        u["usage"] = json!(Usage::new(prompt, completion_tokens));
                        ok = ok && send(u).await;
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
    Json(json!({
        "object": "list",
        "data": [{"id": r.cfg.model, "object": "model", "created": 0, "owned_by": "dopd"}],
    }))
    .into_response()
}

async fn health(State(r): State<Arc<Router>>) -> Response {
    use crate::pool::WorkerRole::{Decode, Mixed, Prefill};
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
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        r.metrics.render(&r.pool.views()),
    )
        .into_response()
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
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use proptest::strategy::Strategy;
    use tower::ServiceExt;

    const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    /// A router with no workers (requests that pass the front checks then find none).
    fn router(api_key: Option<&str>, max_waiting: usize) -> Arc<Router> {
        let (tok, c, _) = dopd_worker::service::load_tokenizer(std::path::Path::new(MODEL))
            .expect("the test model (scripts/setup.sh)");
        Router::new(
            RouterConfig {
                model: "m".into(),
                context: c.context,
                max_waiting,
                api_keys: api_key.map(String::from).into_iter().collect(),
                max_streams_per_key: 2,
                schedule: ScheduleConfig::default(),
            },
            tok,
            Pool::new(),
        )
    }

    async fn call(r: &Arc<Router>, key: Option<&str>) -> Response {
        let mut req =
            Request::post("/v1/chat/completions").header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let body =
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#;
        app(r.clone())
            .oneshot(req.body(Body::from(body)).expect("request"))
            .await
            .expect("infallible")
    }

    async fn json(resp: Response) -> Value {
        let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        serde_json::from_slice(&b).expect("JSON")
    }

    /// A JSON value of any shape, with the OpenAI request's field names among its keys.
    fn arb_json() -> impl Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "\\PC{0,12}".prop_map(Value::from),
            Just(Value::from("m")),
            Just(Value::from("user")),
        ];
        let keys = prop::sample::select(vec![
            "model",
            "messages",
            "prompt",
            "role",
            "content",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "include_usage",
            "n",
            "type",
            "text",
            "ignore_eos",
            "x",
        ]);
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| {
                    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Any body, JSON or not, gets an answer in OpenAI's error envelope (no worker is
        /// there to serve the valid ones: 503), never a panic or a bare text error.
        #[test]
        fn any_request_body_gets_an_openai_answer(
            body in proptest::prop_oneof![
                arb_json().prop_map(|v| v.to_string()),
                "\\PC{0,64}",
            ],
            chat in proptest::prelude::any::<bool>(),
        ) {
            let (rt, r) = fuzz_router();
            let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
            let (status, v) = rt.block_on(async {
                let req = Request::post(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body.clone()))
                    .expect("request");
                let resp = app(r.clone()).oneshot(req).await.expect("infallible");
                let status = resp.status();
                let b = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
                (status, serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
            });
            proptest::prop_assert!(
                [400, 404, 413, 503].contains(&status.as_u16()),
                "{status} for {body}"
            );
            proptest::prop_assert!(v["error"]["message"].is_string(), "{status} {v} for {body}");
        }
    }

    /// One runtime and router for all the fuzz cases (loading the tokenizer once).
    fn fuzz_router() -> &'static (tokio::runtime::Runtime, Arc<Router>) {
        static R: std::sync::OnceLock<(tokio::runtime::Runtime, Arc<Router>)> =
            std::sync::OnceLock::new();
        R.get_or_init(|| {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let r = {
                let _in = rt.enter();
                router(None, 1 << 20)
            };
            (rt, r)
        })
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413_in_openais_envelope() {
        let r = router(None, 8);
        let big = format!(
            r#"{{"model": "m", "prompt": "{}", "max_tokens": 4}}"#,
            "a".repeat(12 << 20)
        );
        let req = Request::post("/v1/completions")
            .header("content-type", "application/json")
            .body(Body::from(big))
            .expect("request");
        let resp = app(r).oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(json(resp).await["error"]["message"].is_string());
    }

    #[tokio::test]
    async fn an_api_key_is_required_when_configured() {
        let r = router(Some("sekrit"), 8);
        let resp = call(&r, None).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(json(resp).await["error"]["code"], "invalid_api_key");
        assert_eq!(
            call(&r, Some("wrong")).await.status(),
            StatusCode::UNAUTHORIZED
        );
        // The right key passes the check (then no worker can serve: 503).
        let resp = call(&r, Some("sekrit")).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key("retry-after"));
    }

    #[tokio::test]
    async fn each_api_key_has_its_own_bound_on_requests_in_flight() {
        let mut r = router(Some("alice"), 8);
        Arc::get_mut(&mut r)
            .expect("only one")
            .cfg
            .api_keys
            .push("bob".into());
        // Alice has two requests in flight (the test router's bound): a third is refused.
        let held: Vec<KeySlot> = (0..2)
            .map(|_| {
                admit_key(&r, Some("alice".into()))
                    .expect("within the bound")
                    .expect("a key")
            })
            .collect();
        let resp = call(&r, Some("alice")).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().contains_key("retry-after"));
        let v = json(resp).await;
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("2 requests in flight")),
            "{v}"
        );
        // Bob is not held back by Alice (then no worker can serve: 503).
        assert_eq!(
            call(&r, Some("bob")).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // A request that ended gave its place back; one that failed held none.
        drop(held);
        assert_eq!(
            call(&r, Some("alice")).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(r.per_key.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn over_the_admission_bound_the_answer_is_429_with_retry_after() {
        let r = router(None, 2);
        r.starting.store(2, Ordering::Relaxed);
        let resp = call(&r, None).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_eq!(json(resp).await["error"]["type"], "rate_limit_error");
        r.starting.store(0, Ordering::Relaxed);
        assert_eq!(
            call(&r, None).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    async fn read_load(r: &Arc<Router>) -> load::LoadSnapshot {
        let resp = app(r.clone())
            .oneshot(
                Request::get("/v1/dopd/load")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        serde_json::from_value(json(resp).await).expect("a load snapshot")
    }

    async fn send(r: &Arc<Router>, words: usize) {
        let text = vec!["word"; words].join(" ");
        let body = json!({"model": "m", "max_tokens": 4,
                          "messages": [{"role": "user", "content": text}]});
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        // No worker: admitted, counted, then failed.
        let resp = app(r.clone()).oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// The planner's decisions over a scripted load, read through `GET /v1/dopd/load`, with or
    /// without another client reading the endpoint in between.
    async fn decisions(second_reader: bool) -> Vec<dopd_planner::sizing::Replicas> {
        use dopd_planner::control::{ControlConfig, Controller, Instance, Order, Orders, Snapshot};
        use dopd_planner::planner::{Planner, PlannerConfig};
        use dopd_planner::profile::{PerRole, Profile, Role};
        let r = router(None, 64);
        // The paper's sizing follows a load this small (the SLO-aware one rightly keeps one
        // instance per role for it); either reads the same observations.
        let mut cfg = PlannerConfig {
            policy: dopd_planner::planner::PolicyKind::DopdPaper,
            predictor: dopd_planner::forecast::ForecasterKind::Last,
            scale_down_stabilization_s: 0.0,
            ..PlannerConfig::default()
        };
        cfg.sizing.gpu_budget = 16;
        let profile = Profile::constant_latency(0.5, 0.05, 64, 16);
        let one = PerRole {
            prefill: 1,
            decode: 1,
        };
        let mut c = Controller::new(
            Planner::new(profile, cfg).expect("planner"),
            ControlConfig::default(),
            one,
        );
        let mut instances = vec![
            Instance::ready("p0", Role::Prefill),
            Instance::ready("d0", Role::Decode),
        ];
        let mut out = Vec::new();
        for k in 0..6u32 {
            for j in 0..(2 + 3 * (k % 3)) {
                send(&r, 5 + 40 * j as usize).await;
                if second_reader {
                    read_load(&r).await;
                }
            }
            let snap = Snapshot {
                load: Some(read_load(&r).await.reading),
                instances: instances.clone(),
                known_next: None,
            };
            let mut orders = Orders::default();
            let step = c.step(f64::from(k) * 10.0, &snap, &mut orders);
            if let Some(t) = step.tick {
                out.push(t.decision.target);
            }
            // Instances follow the orders at once.
            for o in orders.0 {
                match o {
                    Order::SetCount { role, serving, .. } => {
                        let have = instances.iter().filter(|i| i.role == role).count();
                        for n in have..serving as usize {
                            instances.push(Instance::ready(format!("{role}{n}"), role));
                        }
                    }
                    Order::Drain { ids, .. } | Order::Retire { ids, .. } => {
                        instances.retain(|i| !ids.contains(&i.id));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn a_second_reader_of_the_load_leaves_the_planners_decisions_unchanged() {
        let alone = decisions(false).await;
        assert_eq!(alone.len(), 5);
        assert!(
            alone.windows(2).any(|w| w[0] != w[1]),
            "the scripted load should move the targets: {alone:?}"
        );
        assert_eq!(alone, decisions(true).await);
    }

    #[tokio::test]
    async fn load_readings_are_cumulative_and_reading_changes_nothing() {
        let r = router(None, 8);
        send(&r, 3).await;
        send(&r, 30).await;
        let a = read_load(&r).await;
        let b = read_load(&r).await;
        assert_eq!(a.reading, b.reading);
        let t = &a.reading.totals;
        assert_eq!((t.arrived, t.failed, t.finished), (2, 2, 0));
        assert!(t.prompt_tokens > 33, "{t:?}");
        // Arrivals are timed on the router's clock: the second one left a gap.
        assert_eq!(t.gaps, 1, "{t:?}");
        assert!(t.last_arrival_s.is_some_and(|s| s >= 0.0), "{t:?}");
        send(&r, 3).await;
        let t = read_load(&r).await.reading.totals;
        assert_eq!((t.arrived, t.gaps), (3, 2));
    }

    #[tokio::test]
    async fn the_planner_forecast_sets_the_short_long_threshold() {
        let r = router(None, 8);
        let post = |body: &'static str| {
            app(r.clone()).oneshot(
                Request::post("/v1/dopd/forecast")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .expect("request"),
            )
        };
        let resp = post(r#"{"mean_isl": 812.5}"#).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(json(resp).await["threshold"], 812.5);
        assert_eq!(r.scheduler.threshold(), 812.5);
        let resp = post(r#"{"mean_isl": -1}"#).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json(resp).await["error"]["param"], "mean_isl");
        assert_eq!(r.scheduler.threshold(), 812.5);
    }
}
