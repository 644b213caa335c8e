//! The planner's input for one interval ([`Observation`]) and the replica counts it carries.
//! The control loop builds it from two load readings (`crate::load`); every policy and the SLO
//! tracker read it.

use serde::{Deserialize, Serialize};

use crate::profile::PerRole;

/// Replica counts of one role as the actuator sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// Serving.
    pub ready: u32,
    /// Asked for but not serving yet (starting, or Pending on the cluster).
    pub pending: u32,
}

/// What happened during the last interval. Built by the control loop
/// ([`crate::control::Controller`]), the same way for the router's readings and the simulator's;
/// the meaning of every field is documented in [`crate::control`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Observation {
    /// Length of the interval, seconds.
    pub interval_s: f64,
    /// Requests that arrived in the interval.
    pub requests: f64,
    /// Mean prompt length of those requests (`None` when there were none).
    pub mean_isl: Option<f64>,
    /// Mean output length.
    pub mean_osl: Option<f64>,
    /// Mean observed TTFT, seconds.
    pub ttft_s: Option<f64>,
    /// P90 of the observed TTFT, seconds.
    pub ttft_p90_s: Option<f64>,
    /// Mean observed inter-token latency, seconds.
    pub itl_s: Option<f64>,
    /// P90 of the observed per-request inter-token latency, seconds.
    pub itl_p90_s: Option<f64>,
    /// Mean request duration (arrival to last token), seconds.
    pub request_duration_s: Option<f64>,
    /// Requests that finished in the interval.
    pub finished: f64,
    /// Requests that ended without finishing in the interval.
    pub failed: f64,
    /// Mean squared prompt length of the requests that arrived (with `mean_isl`, their spread).
    pub isl_sq_mean: Option<f64>,
    /// Mean squared output length of the requests that finished.
    pub osl_sq_mean: Option<f64>,
    /// The interval's TTFT and ITL histograms (for the share of requests over an SLO).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_hist: Option<crate::load::Histogram>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itl_hist: Option<crate::load::Histogram>,
    /// The interval's prompt lengths (the requests that arrived).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isl_hist: Option<crate::load::LengthHistogram>,
    /// Squared coefficient of variation of the gaps between the interval's arrivals (1 for
    /// Poisson; `None` when too few arrivals were timed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_cv2: Option<f64>,
    /// Requests waiting for prefill, all instances together.
    pub prefill_queue_depth: f64,
    /// Mean fraction of KV blocks in use over decode instances, 0..1.
    pub kv_usage: f64,
    pub replicas: PerRole<ReplicaState>,
}
