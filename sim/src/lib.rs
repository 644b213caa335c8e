//! # dopd-sim: a deterministic discrete-event simulator of a prefill/decode cluster
//!
//! It replays a request trace through prefill, decode and aggregated instances whose speed comes
//! from a [`Profile`](dopd_planner::profile::Profile), and lets the *same* planner and routing
//! code that the operator and local mode run decide how many instances there are and where each
//! request goes. Time is virtual; the same inputs always give the same outputs.
//!
//! ## Model
//! - **Prefill instance**: serves one batch at a time, FIFO. A batch of prompts totalling `T`
//!   tokens takes `TTFT(T)` from the profile (extrapolated linearly past the profiled range).
//!   Then each request's KV cache crosses the link (`ISL · kv_bytes_per_token / bandwidth +
//!   latency`) and the decode instance emits the first token: that moment is the TTFT.
//! - **Decode instance**: continuous batching. A step takes `TPOT(n, mean context)` for the `n`
//!   sequences decoding, plus `TTFT(t)` for `t` prompt tokens of local prefills (ultra-short
//!   requests, or everything on an aggregated instance), at most `prefill_chunk_tokens` per step
//!   (chunked prefill). KV capacity is enforced by reserving `ceil((ISL+OSL)/block)` blocks at
//!   admission; a request waits until its blocks fit (no preemption). A request larger than a
//!   whole instance is admitted alone rather than never.
//! - **Aggregated instance**: a decode instance that prefills every request itself (vLLM-like).
//! - **Routing**: the planner crate's [`classify`](dopd_planner::routing::classify) and
//!   [`ShortBatcher`](dopd_planner::routing::ShortBatcher); instances chosen by least outstanding
//!   work among ready ones (starting ones only when none is ready).
//! - **Scaling**: every `interval_s` the planner ticks on the interval's observation; the
//!   simulator applies its target: new instances serve after the profile's start-up time; removed
//!   ones are cancelled if still starting, otherwise drained (no new work, finish what they
//!   hold). No request is dropped. GPU-seconds run from launch to stop.

mod engine;
mod report;
mod workload;

pub use engine::{
    PolicySpec, SimConfig, SimError, search_static, simulate, simulate_with_progress,
};
pub use report::{IntervalPoint, RequestRecord, Route, SimResult, Summary};
pub use workload::{Arrivals, Lengths, SimRequest, SyntheticSpec, Window, from_trace, synthetic};
