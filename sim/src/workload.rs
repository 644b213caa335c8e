//! Requests to replay: from a parsed trace, with time scaling and a time window.

use dopd_planner::trace::Trace;
use serde::{Deserialize, Serialize};

/// One request as the simulator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimRequest {
    /// Seconds after the start of the replay.
    pub arrival_s: f64,
    pub isl: u32,
    pub osl: u32,
}

/// A time window of the trace, in seconds after its first request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub start_s: f64,
    /// `None`: to the end.
    pub end_s: Option<f64>,
}

/// Requests of `trace` inside `window`, shifted to start at 0 and with arrivals compressed by
/// `rate_scale` (2.0 replays twice as fast, i.e. twice the request rate). Requests with no output
/// tokens are kept with one output token (the first token is always produced).
pub fn from_trace(trace: &Trace, rate_scale: f64, window: Window) -> Vec<SimRequest> {
    let scale = if rate_scale.is_finite() && rate_scale > 0.0 {
        rate_scale
    } else {
        1.0
    };
    let t0 = trace.requests.first().map_or(0, |r| r.arrival_ns);
    let mut out: Vec<SimRequest> = trace
        .requests
        .iter()
        .map(|r| ((r.arrival_ns - t0) as f64 / 1e9, r))
        .filter(|(t, _)| *t >= window.start_s && window.end_s.is_none_or(|e| *t < e))
        .map(|(t, r)| SimRequest {
            arrival_s: (t - window.start_s) / scale,
            isl: r.isl.max(1),
            osl: r.osl.max(1),
        })
        .collect();
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    out
}
