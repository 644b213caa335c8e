//! The OpenAI wire format this router speaks: request bodies (validated into one internal
//! [`Job`](crate::schedule::Job)), responses, stream chunks and the error envelope.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An error in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
            retry_after: None,
        }
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = s.to_string().parse()
        {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        r
    }
}

/// `stop`: a string or a list of up to 4 strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `prompt` of a completion: a string, a list holding one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Tokens(Vec<u32>),
    Many(Vec<String>),
}

/// A completion prompt after validation: text to tokenize, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u32>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// Accepted and ignored (the request's id is the router's own).
    pub user: Option<String>,
    /// Extension (as in vLLM): keep generating past end-of-sequence until `max_tokens`
    /// (benchmarks use it to control output lengths).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message's content: a string, or a list of text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt: u32, completion: u32) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Sampling settings after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// Default completion length when `max_tokens` is absent (OpenAI's legacy completions default
/// is 16; chat has none, so it runs to the context limit: here capped at this).
pub const DEFAULT_MAX_TOKENS: u32 = 256;

impl Common {
    /// Checks the shared fields; `served` is the model name this router serves.
    pub fn validate(&self, served: &str, default_max: u32) -> Result<Sampling, ApiError> {
        if self.model != served {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "The model `{}` does not exist; this server serves `{served}`",
                    self.model
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
                retry_after: None,
            });
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid("n", "only n=1 is supported"));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max);
        if max_tokens == 0 {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let stop = self.stop.clone().map(Stop::into_vec).unwrap_or_default();
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop takes up to 4 non-empty strings",
            ));
        }
        Ok(Sampling {
            max_tokens,
            temperature,
            top_p,
            seed: self.seed.unwrap_or_else(rand::random),
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos,
        })
    }
}

impl CompletionRequest {
    pub fn prompt_input(&self) -> Result<PromptInput, ApiError> {
        match &self.prompt {
            Prompt::One(s) => Ok(PromptInput::Text(s.clone())),
            Prompt::Tokens(t) => Ok(PromptInput::Tokens(t.clone())),
            Prompt::Many(v) if v.len() == 1 => Ok(PromptInput::Text(v[0].clone())),
            Prompt::Many(_) => Err(ApiError::invalid(
                "prompt",
                "only one prompt per request is supported",
            )),
        }
    }
}

impl ChatRequest {
    /// The conversation as (role, text) pairs.
    pub fn turns(&self) -> Result<Vec<(String, String)>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "developer" | "tool"
                ) {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!("unknown role {:?}", m.role),
                    ));
                }
                let text = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut t = String::new();
                        for p in parts {
                            if p.kind != "text" {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content parts of type {:?} are not supported", p.kind),
                                ));
                            }
                            t.push_str(p.text.as_deref().unwrap_or(""));
                        }
                        t
                    }
                };
                let role = if m.role == "developer" {
                    "system".to_string()
                } else {
                    m.role.clone()
                };
                Ok((role, text))
            })
            .collect()
    }
}

/// `finish_reason` as OpenAI spells it.
pub fn finish_reason(r: i32) -> &'static str {
    use dopd_protocol::proto::FinishReason;
    match FinishReason::try_from(r).unwrap_or_default() {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// Which endpoint answers: it sets the labels and the shape of every response object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

impl Kind {
    pub fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        }
    }

    /// The prefix of the response ids.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }
}

/// The response objects of one request (OpenAI's shapes): what they all repeat, and one
/// constructor per object.
#[derive(Clone, Debug)]
pub struct Shape {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Shape {
    /// The whole answer (`stream: false`).
    pub fn completion(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let (id, created, model) = (&self.id, self.created, &self.model);
        match self.kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null,
                             "finish_reason": finish}],
                "usage": usage,
            }),
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": text},
                             "logprobs": null,
                             "finish_reason": finish}],
                "usage": usage,
            }),
        }
    }

    /// One streamed chunk carrying `delta` (a string for completions, an object for chat).
    pub fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let (id, created, model) = (&self.id, self.created, &self.model);
        match self.kind {
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
    }

    /// The chat stream's first chunk, which names the role (none for completions).
    pub fn opening(&self) -> Option<Value> {
        (self.kind == Kind::Chat)
            .then(|| self.chunk(json!({"role": "assistant", "content": ""}), None))
    }

    /// The chunk carrying streamed text `t`.
    pub fn text(&self, t: &str) -> Value {
        match self.kind {
            Kind::Completion => self.chunk(json!(t), None),
            Kind::Chat => self.chunk(json!({"content": t}), None),
        }
    }

    /// The chunk that closes the choice with its finish reason.
    pub fn finish(&self, finish: &str) -> Value {
        let empty = match self.kind {
            Kind::Completion => json!(""),
            Kind::Chat => json!({}),
        };
        self.chunk(empty, Some(finish))
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage(&self, usage: Usage) -> Value {
        let mut u = self.chunk(json!(""), None);
        u["choices"] = json!([]);
        u["usage"] = json!(usage);
        u
    }
}

/// `GET /v1/models`: the one model served.
pub fn model_list(model: &str) -> Value {
    json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "dopd"}],
    })
}
