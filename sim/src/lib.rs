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
//! - **Scaling**: the shared control loop ([`dopd_planner::control::Controller`], the one the
//!   operator and `dopd up` run) observes the simulator the way it observes a router and its
//!   workers (cumulative counts, instance states) and ticks every `interval_s`; the simulator is
//!   its actuator: new instances serve after the profile's start-up time; victims are cancelled
//!   if still starting and idle, otherwise drained (no new work, finish what they hold) and
//!   stopped when the loop sees them idle. No request is dropped. GPU-seconds run from launch to
//!   stop.
//!
//! ```
//! use dopd_planner::profile::{PerRole, Profile};
//! use dopd_sim::{PolicySpec, SimConfig, SimRequest, simulate};
//!
//! // TTFT 0.1 s, TPOT 0.01 s; one prefill and one decode instance; instant KV transfer.
//! let profile = Profile::constant_latency(0.1, 0.01, 2040, 128);
//! let cfg = SimConfig {
//!     policy: PolicySpec::Static { replicas: PerRole { prefill: 1, decode: 1 } },
//!     kv_link_bytes_per_s: 0.0,
//!     kv_link_latency_s: 0.0,
//!     ..SimConfig::default()
//! };
//! let run = simulate(&[SimRequest { arrival_s: 0.0, isl: 1000, osl: 11 }], &profile, &cfg)
//!     .expect("a valid run");
//! let r = run.records[0];
//! assert!((r.ttft_s - 0.1).abs() < 1e-9); // one prefill
//! assert!((r.finish_s - 0.2).abs() < 1e-9); // then ten decode steps
//! ```

mod engine;
mod report;
mod workload;

pub use engine::{
    PolicySpec, PrefillQueue, SimConfig, SimError, planner_config, search_static, simulate,
    simulate_with_progress,
};
pub use report::{ControlStep, IntervalPoint, RequestRecord, Route, SimResult, Summary};
pub use workload::{Arrivals, Lengths, SimRequest, SyntheticSpec, Window, from_trace, synthetic};
