//! The engine's public vocabulary: requests, their modes and starts, the events it streams, its
//! errors, configuration and statistics.

use crate::kv::{KvError, KvExport};
use crate::sampling::{FinishReason, SamplingParams, StopConditions};

/// A request's id, chosen by the caller (unique among live requests).
pub type RequestId = u64;

/// Turns token ids into text (for streaming and stop strings).
pub trait Detokenizer: Send + Sync {
    /// Text of `ids`, special tokens skipped.
    fn detokenize(&self, ids: &[u32]) -> String;
}

impl Detokenizer for dopd_model::tokenizer::ModelTokenizer {
    fn detokenize(&self, ids: &[u32]) -> String {
        self.decode(ids, false).unwrap_or_default()
    }
}

/// Engine limits.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub kv_blocks: usize,
    /// Most sequences in the running batch.
    pub max_running: usize,
    /// Prompt tokens prefilled per step (beyond the first admission).
    pub max_prefill_tokens: usize,
    /// Identifies the weights in the KV layout fingerprint.
    pub model_hash: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_blocks: 1024,
            max_running: 64,
            max_prefill_tokens: 4096,
            model_hash: 0,
        }
    }
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Generate until a stop condition.
    Generate,
    /// Prefill only: sample the first token and export the prompt's KV blocks.
    Prefill,
}

/// How a request's sequence starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Start {
    /// Run the prompt here.
    Prompt,
    /// Continue a remote prefill: the prompt's KV blocks and the token it sampled.
    Imported { kv: KvExport, first_token: u32 },
    /// Continue a remote prefill whose blocks could not be had: recompute the prompt here and
    /// keep the token the prefill worker sampled.
    Recompute { first_token: u32 },
    /// Continue a stream whose worker failed: recompute the prompt and the tokens generated so
    /// far (at least one), sample on from there, and stream the text after the first `sent`
    /// bytes (what the client already has).
    Resume { generated: Vec<u32>, sent: usize },
}

/// One request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: RequestId,
    /// Prompt token ids (also kept for imported sequences, to recompute after a preemption).
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub mode: Mode,
    pub start: Start,
    /// For a prompt prefilled here while other sequences decode (a prompt the router sent past
    /// prefill): the most prompt tokens the step that prefills it may prefill in all, its own
    /// included (`None`: the engine's `max_prefill_tokens`). The router sets the bypass
    /// threshold, the largest prompt whose prefill keeps a step within the TPOT SLO, so a burst
    /// of such prompts is spread over steps.
    pub step_budget: Option<usize>,
}

/// Token counts of a finished request (OpenAI's `usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the engine reports, in order, per request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it made final (empty while a character or a possible stop
    /// string is still incomplete).
    Token {
        id: RequestId,
        token: u32,
        text: String,
    },
    /// A [`Mode::Prefill`] request is done: the first token and the prompt's KV blocks. When the
    /// first token already ends the request, `finish` says why and there is nothing to decode.
    Prefilled {
        id: RequestId,
        first_token: u32,
        text: String,
        kv: KvExport,
        finish: Option<FinishReason>,
    },
    /// The request ended; `text` is the last piece of output held back until now.
    Finished {
        id: RequestId,
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    /// The request cannot run.
    Failed { id: RequestId, error: EngineError },
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("request {0} is already running")]
    DuplicateId(RequestId),
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("a resumed stream names no generated token")]
    EmptyResume,
    #[error("prompt of {tokens} tokens exceeds the model context of {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("needs {needed} KV blocks but the whole cache has {capacity}")]
    TooLargeForCache { needed: usize, capacity: usize },
    #[error("token id {token} outside the vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("KV import: {0}")]
    Import(KvError),
    #[error("KV cache: {0}")]
    Kv(KvError),
    #[error("the engine has stopped: {0}")]
    Stopped(String),
}

/// Counters and gauges of the engine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_free: usize,
    pub steps: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub finished: u64,
    pub failed: u64,
    /// The most recent steps: (batch size, prefill tokens, seconds), oldest first.
    pub recent_steps: Vec<(usize, usize, f64)>,
}
