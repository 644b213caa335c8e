//! Length-aware request routing (paper §5), pure.
//!
//! - **Ultra-short** prompts (ISL ≤ 511 tokens by default, the DOPD configs'
//!   `max-local-prefill-length`) are prefilled on a decode instance: moving their KV cache would
//!   cost about as much as computing it.
//! - **Long** prompts (ISL above the *forecast mean ISL* of the interval) go to a prefill instance
//!   at once, unbatched.
//! - **Short** prompts (the rest) are grouped by a [`ShortBatcher`] under a token cap and a wait
//!   cap, so one prefill pass serves several of them.
//! - Prefill work waits in one [`DeadlineQueue`] for a free prefill instance, earliest feasible
//!   TTFT deadline first.
//!
//! Time is an argument (`now`, seconds on any monotonic clock the caller owns): the router passes
//! its clock, the simulator its virtual time.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

mod queue;
pub use queue::{DeadlineQueue, PrefillQueue, QueueOrder};

/// Settings of the length-aware scheduler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Prompts up to this many tokens are prefilled on the decode instance.
    pub ultra_short_max_isl: u32,
    /// Turn the ultra-short bypass off (ablation).
    pub ultra_short_bypass: bool,
    /// An ultra-short prompt is prefilled on a decode instance only while that instance has KV
    /// room for it, else on a prefill instance (off: always on the decode instance; ablation).
    pub bypass_needs_kv_room: bool,
    /// Turn short-request batching off (ablation): short prompts then go out one by one.
    pub short_batching: bool,
    /// A short batch is sent once it holds this many prompt tokens. The paper does not give a
    /// value; 8192 matches vLLM's default `max_num_batched_tokens` for chunked prefill.
    pub batch_token_cap: u32,
    /// ... or once its oldest request has waited this long (seconds). 50 ms is 2.5% of the
    /// paper's 2 s TTFT SLO.
    pub batch_wait_cap_s: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            ultra_short_max_isl: 511,
            ultra_short_bypass: true,
            bypass_needs_kv_room: true,
            short_batching: true,
            batch_token_cap: 8192,
            batch_wait_cap_s: 0.05,
        }
    }
}

/// Length class of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestClass {
    /// Prefill on a decode instance; no KV transfer.
    UltraShort,
    /// Batch with other short requests, then prefill remotely.
    Short,
    /// Prefill remotely at once.
    Long,
}

impl RequestClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::UltraShort => "ultra_short",
            Self::Short => "short",
            Self::Long => "long",
        }
    }
}

/// Classifies a prompt of `isl` tokens given the forecast mean ISL of the interval.
pub fn classify(isl: u32, forecast_mean_isl: f64, cfg: &RoutingConfig) -> RequestClass {
    if cfg.ultra_short_bypass && isl <= cfg.ultra_short_max_isl {
        return RequestClass::UltraShort;
    }
    // A NaN forecast means "no threshold": everything (above ultra-short) is long.
    if !cfg.short_batching || !(f64::from(isl) <= forecast_mean_isl) {
        RequestClass::Long
    } else {
        RequestClass::Short
    }
}

/// The prefill budget a prompt run on a decode instance asks of the decode step that prefills it
/// (0: none). A prompt sent past prefill (ultra-short) asks for the bypass threshold, the
/// largest prompt whose prefill keeps a step within the TPOT SLO, so that a burst of them is
/// spread over steps; one that runs there because no prefill instance can take it asks for
/// nothing. The router sends it with the request; the simulator models the same.
pub fn step_prefill_budget(class: RequestClass, cfg: &RoutingConfig) -> u32 {
    if class == RequestClass::UltraShort && cfg.ultra_short_bypass {
        cfg.ultra_short_max_isl
    } else {
        0
    }
}

/// Why a batch was released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushReason {
    /// Adding the next request would exceed the token cap (or it reached the cap exactly).
    TokenCap,
    /// The oldest request waited the wait cap.
    WaitCap,
    /// The caller asked for everything (shutdown, drain, ablation).
    Drain,
}

/// A group of short requests to prefill together.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch<T> {
    pub items: Vec<T>,
    pub tokens: u64,
    pub reason: FlushReason,
}

#[derive(Clone, Debug)]
struct Pending<T> {
    item: T,
    tokens: u32,
    arrived: f64,
}

/// Forms batches of short requests under a token cap and a wait cap, FIFO (so no request
/// starves). Drive it with [`push`](Self::push) on arrival and [`poll`](Self::poll) at
/// [`deadline`](Self::deadline).
#[derive(Clone, Debug)]
pub struct ShortBatcher<T> {
    pending: VecDeque<Pending<T>>,
    tokens: u64,
    token_cap: u64,
    wait_cap_s: f64,
}

impl<T> ShortBatcher<T> {
    pub fn new(cfg: &RoutingConfig) -> Self {
        Self {
            pending: VecDeque::new(),
            tokens: 0,
            token_cap: u64::from(cfg.batch_token_cap.max(1)),
            wait_cap_s: cfg.batch_wait_cap_s.max(0.0),
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Prompt tokens waiting.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    fn take(&mut self, reason: FlushReason) -> Option<Batch<T>> {
        if self.pending.is_empty() {
            return None;
        }
        let items = self.pending.drain(..).map(|p| p.item).collect();
        let tokens = std::mem::take(&mut self.tokens);
        Some(Batch {
            items,
            tokens,
            reason,
        })
    }

    /// Adds a request that arrived at `now`; returns the batches that became ready (zero, one, or
    /// two when the current batch is closed and the new request fills one on its own).
    pub fn push(&mut self, item: T, tokens: u32, now: f64) -> Vec<Batch<T>> {
        let mut out = Vec::new();
        if !self.pending.is_empty() && self.tokens + u64::from(tokens) > self.token_cap {
            out.extend(self.take(FlushReason::TokenCap));
        }
        self.pending.push_back(Pending {
            item,
            tokens,
            arrived: now,
        });
        self.tokens += u64::from(tokens);
        if self.tokens >= self.token_cap {
            out.extend(self.take(FlushReason::TokenCap));
        }
        out
    }

    /// When the oldest waiting request reaches the wait cap (`None` when empty).
    pub fn deadline(&self) -> Option<f64> {
        self.pending.front().map(|p| p.arrived + self.wait_cap_s)
    }

    /// Releases the batch if its oldest request has waited the wait cap by `now`.
    pub fn poll(&mut self, now: f64) -> Option<Batch<T>> {
        match self.deadline() {
            Some(d) if now >= d => self.take(FlushReason::WaitCap),
            _ => None,
        }
    }

    /// Releases whatever is waiting.
    pub fn drain(&mut self) -> Option<Batch<T>> {
        self.take(FlushReason::Drain)
    }

    /// Token counts of the waiting requests, oldest first.
    pub fn pending_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.pending.iter().map(|p| p.tokens)
    }
}

/// Index of the least-loaded candidate (ties go to the lowest index), skipping non-finite loads.
/// `loads` is any additive load measure, e.g. outstanding tokens per instance.
pub fn least_loaded(loads: &[f64]) -> Option<usize> {
    loads
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

/// Where a request's prefill runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// On the decode instance that will generate (no KV transfer).
    Local,
    /// On a prefill instance; the KV blocks then move to a decode instance.
    Disaggregated,
    /// Wait in the short-request batcher; the batch's release decides.
    Batch,
}

/// Why a request took its route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteReason {
    UltraShort,
    Long,
    Short,
    ShortTokenCap,
    ShortWaitCap,
    ShortDrain,
    /// No prefill instance can take it: prefill locally rather than drop it.
    NoPrefillWorker,
    /// Its prefill instance failed and no other is left.
    PrefillFailed,
    /// Its worker failed; another of the same kind takes it.
    Retry,
    /// Ultra-short, but the decode instance that would prefill it has no KV room for it now:
    /// prefilled on a prefill instance, its first token does not wait for decode's KV.
    DecodeFull,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Disaggregated => "disaggregated",
            Self::Batch => "batch",
        }
    }
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UltraShort => "ultra_short",
            Self::Long => "long",
            Self::Short => "short",
            Self::ShortTokenCap => "short_token_cap",
            Self::ShortWaitCap => "short_wait_cap",
            Self::ShortDrain => "short_drain",
            Self::NoPrefillWorker => "no_prefill_worker",
            Self::PrefillFailed => "prefill_failed",
            Self::Retry => "retry",
            Self::DecodeFull => "decode_full",
        }
    }
}

/// The route of a newly classified request (paper §5): ultra-short prompts stay on the decode
/// instance, long ones go to a prefill instance at once, short ones wait for a batch; without any
/// prefill instance everything is prefilled locally.
pub fn route(class: RequestClass, has_prefill: bool) -> (Route, RouteReason) {
    match class {
        _ if !has_prefill => (Route::Local, RouteReason::NoPrefillWorker),
        RequestClass::UltraShort => (Route::Local, RouteReason::UltraShort),
        RequestClass::Long => (Route::Disaggregated, RouteReason::Long),
        RequestClass::Short => (Route::Batch, RouteReason::Short),
    }
}

/// [`route`], for a request whose decode instance may have no KV room for it: an ultra-short
/// prompt goes to a prefill instance at once when `cfg.bypass_needs_kv_room` and `decode_room`
/// (asked only then) says the decode instance a local prefill would use cannot take it now.
/// Prefilled locally it would wait for KV before its first token, on its TTFT; prefilled
/// remotely its first token comes from prefill, and a wait for decode's KV is spread over its
/// output, on its TPOT, which has far more slack for long outputs.
pub fn route_with_room(
    class: RequestClass,
    has_prefill: bool,
    cfg: &RoutingConfig,
    decode_room: impl FnOnce() -> bool,
) -> (Route, RouteReason) {
    match route(class, has_prefill) {
        (Route::Local, RouteReason::UltraShort) if cfg.bypass_needs_kv_room && !decode_room() => {
            (Route::Disaggregated, RouteReason::DecodeFull)
        }
        r => r,
    }
}

/// Whether a decode instance can take a local prefill of `prompt` tokens at its next step, from
/// what it last reported: free KV for the prompt (and its first token) behind the `waiting`
/// requests it has not admitted yet, each taken to be the size of this one.
pub fn kv_room(waiting: u32, free_blocks: u32, block_size: u32, prompt: u32) -> bool {
    let free = u64::from(free_blocks) * u64::from(block_size.max(1));
    free >= (u64::from(waiting) + 1) * (u64::from(prompt) + 1)
}

/// The route of a short request once its batch is released (`has_prefill`: an instance took it).
pub fn route_batch(reason: FlushReason, has_prefill: bool) -> (Route, RouteReason) {
    if !has_prefill {
        return (Route::Local, RouteReason::NoPrefillWorker);
    }
    let why = match reason {
        FlushReason::TokenCap => RouteReason::ShortTokenCap,
        FlushReason::WaitCap => RouteReason::ShortWaitCap,
        FlushReason::Drain => RouteReason::ShortDrain,
    };
    (Route::Disaggregated, why)
}

/// The route after the worker of `failed` failed before the first token: the same kind of worker
/// when one is left (`prefill_left` counts the prefill instances not yet tried), else local.
pub fn reroute(failed: Route, prefill_left: bool) -> (Route, RouteReason) {
    if failed == Route::Disaggregated && !prefill_left {
        (Route::Local, RouteReason::PrefillFailed)
    } else if failed == Route::Batch {
        (Route::Disaggregated, RouteReason::Retry)
    } else {
        (failed, RouteReason::Retry)
    }
}

/// Weight of the newest prompt in the running mean ISL used until a forecast arrives.
pub const RUNNING_ISL_WEIGHT: f64 = 0.05;

/// The running mean ISL after a prompt of `isl` tokens (NaN before the first).
pub fn running_mean_isl(old: f64, isl: u32) -> f64 {
    if old.is_finite() {
        (1.0 - RUNNING_ISL_WEIGHT) * old + RUNNING_ISL_WEIGHT * f64::from(isl)
    } else {
        f64::from(isl)
    }
}

/// The short/long threshold: the planner's forecast mean ISL when there is one, else the running
/// mean (NaN: no threshold, everything above ultra-short is long).
pub fn threshold(forecast_mean_isl: f64, running_mean_isl: f64) -> f64 {
    if forecast_mean_isl.is_finite() {
        forecast_mean_isl
    } else {
        running_mean_isl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_prompt_sent_past_prefill_carries_a_step_budget() {
        let cfg = RoutingConfig {
            ultra_short_max_isl: 300,
            ..RoutingConfig::default()
        };
        assert_eq!(step_prefill_budget(RequestClass::UltraShort, &cfg), 300);
        // Short and long prompts run on a decode instance only when no prefill instance can
        // take them.
        assert_eq!(step_prefill_budget(RequestClass::Short, &cfg), 0);
        assert_eq!(step_prefill_budget(RequestClass::Long, &cfg), 0);
        let off = RoutingConfig {
            ultra_short_bypass: false,
            ..cfg
        };
        assert_eq!(step_prefill_budget(RequestClass::UltraShort, &off), 0);
    }

    #[test]
    fn classification_follows_the_paper() {
        let cfg = RoutingConfig::default();
        assert_eq!(classify(511, 1000.0, &cfg), RequestClass::UltraShort);
        assert_eq!(classify(512, 1000.0, &cfg), RequestClass::Short);
        assert_eq!(classify(1000, 1000.0, &cfg), RequestClass::Short);
        assert_eq!(classify(1001, 1000.0, &cfg), RequestClass::Long);
        assert_eq!(classify(600, f64::NAN, &cfg), RequestClass::Long);
    }

    #[test]
    fn ablations_switch_classes_off() {
        let no_bypass = RoutingConfig {
            ultra_short_bypass: false,
            ..Default::default()
        };
        assert_eq!(classify(10, 1000.0, &no_bypass), RequestClass::Short);
        let no_batching = RoutingConfig {
            short_batching: false,
            ..Default::default()
        };
        assert_eq!(classify(800, 1000.0, &no_batching), RequestClass::Long);
        assert_eq!(classify(10, 1000.0, &no_batching), RequestClass::UltraShort);
    }

    #[test]
    fn batches_close_at_the_token_cap() {
        let cfg = RoutingConfig {
            batch_token_cap: 1000,
            ..Default::default()
        };
        let mut b = ShortBatcher::new(&cfg);
        assert!(b.push(1, 600, 0.0).is_empty());
        let out = b.push(2, 600, 0.01);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].items, vec![1]);
        assert_eq!(out[0].reason, FlushReason::TokenCap);
        assert_eq!(b.len(), 1);
        // Exactly reaching the cap releases at once.
        let out = b.push(3, 400, 0.02);
        assert_eq!(out[0].items, vec![2, 3]);
        assert_eq!(out[0].tokens, 1000);
        assert!(b.is_empty());
    }

    #[test]
    fn an_oversized_request_goes_alone() {
        let cfg = RoutingConfig {
            batch_token_cap: 1000,
            ..Default::default()
        };
        let mut b = ShortBatcher::new(&cfg);
        b.push("a", 100, 0.0);
        let out = b.push("b", 5000, 0.0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].items, vec!["a"]);
        assert_eq!(out[1].items, vec!["b"]);
    }

    #[test]
    fn batches_close_at_the_wait_cap_on_the_injected_clock() {
        let cfg = RoutingConfig {
            batch_wait_cap_s: 0.05,
            ..Default::default()
        };
        let mut b = ShortBatcher::new(&cfg);
        b.push(1, 10, 10.0);
        b.push(2, 10, 10.03);
        assert_eq!(b.deadline(), Some(10.05));
        assert!(b.poll(10.049).is_none());
        let batch = b.poll(10.05).expect("due");
        assert_eq!(batch.items, vec![1, 2]);
        assert_eq!(batch.reason, FlushReason::WaitCap);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn least_loaded_breaks_ties_by_index_and_skips_nan() {
        assert_eq!(least_loaded(&[3.0, 1.0, 1.0]), Some(1));
        assert_eq!(least_loaded(&[f64::NAN, 2.0]), Some(1));
        assert_eq!(least_loaded(&[]), None);
    }

    #[test]
    fn routes_follow_the_class_and_fall_back_to_local() {
        assert_eq!(
            route(RequestClass::UltraShort, true),
            (Route::Local, RouteReason::UltraShort)
        );
        assert_eq!(
            route(RequestClass::Long, true),
            (Route::Disaggregated, RouteReason::Long)
        );
        assert_eq!(
            route(RequestClass::Short, true),
            (Route::Batch, RouteReason::Short)
        );
        for c in [
            RequestClass::UltraShort,
            RequestClass::Short,
            RequestClass::Long,
        ] {
            assert_eq!(
                route(c, false),
                (Route::Local, RouteReason::NoPrefillWorker)
            );
        }
        assert_eq!(
            route_batch(FlushReason::WaitCap, true),
            (Route::Disaggregated, RouteReason::ShortWaitCap)
        );
        assert_eq!(
            route_batch(FlushReason::TokenCap, false),
            (Route::Local, RouteReason::NoPrefillWorker)
        );
        assert_eq!(
            reroute(Route::Disaggregated, false),
            (Route::Local, RouteReason::PrefillFailed)
        );
        assert_eq!(
            reroute(Route::Disaggregated, true),
            (Route::Disaggregated, RouteReason::Retry)
        );
        assert_eq!(
            reroute(Route::Local, false),
            (Route::Local, RouteReason::Retry)
        );
    }

    #[test]
    fn an_ultra_short_prompt_goes_to_prefill_when_decode_has_no_kv_room() {
        let cfg = RoutingConfig::default();
        assert_eq!(
            route_with_room(RequestClass::UltraShort, true, &cfg, || false),
            (Route::Disaggregated, RouteReason::DecodeFull)
        );
        assert_eq!(
            route_with_room(RequestClass::UltraShort, true, &cfg, || true),
            (Route::Local, RouteReason::UltraShort)
        );
        // Without a prefill instance it stays local; other classes do not look at the room,
        // nor does the ablation.
        assert_eq!(
            route_with_room(RequestClass::UltraShort, false, &cfg, || false),
            (Route::Local, RouteReason::NoPrefillWorker)
        );
        assert_eq!(
            route_with_room(RequestClass::Short, true, &cfg, || false),
            (Route::Batch, RouteReason::Short)
        );
        let off = RoutingConfig {
            bypass_needs_kv_room: false,
            ..RoutingConfig::default()
        };
        assert_eq!(
            route_with_room(RequestClass::UltraShort, true, &off, || false),
            (Route::Local, RouteReason::UltraShort)
        );
        // 2 free blocks of 16 tokens: room for a 31-token prompt and its first token, not for
        // a 32-token one, and not for a 15-token one behind another waiting.
        assert!(kv_room(0, 2, 16, 31));
        assert!(!kv_room(0, 2, 16, 32));
        assert!(!kv_room(1, 2, 16, 16));
        assert!(kv_room(1, 2, 16, 15));
        assert!(!kv_room(0, 0, 16, 1));
    }

    #[test]
    fn the_threshold_is_the_forecast_else_a_running_mean() {
        let mut m = f64::NAN;
        assert!(threshold(f64::NAN, m).is_nan());
        m = running_mean_isl(m, 100);
        assert_eq!(m, 100.0);
        m = running_mean_isl(m, 300);
        assert!((m - 110.0).abs() < 1e-9);
        assert_eq!(threshold(f64::NAN, m), m);
        assert_eq!(threshold(512.0, m), 512.0);
    }
}
