//! What a simulation produces: per-request records, a time series per planner interval, and a
//! summary.

use dopd_planner::control::{Orders, Snapshot};
use dopd_planner::planner::Decision;
use serde::{Deserialize, Serialize};

/// How a request was served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Prefilled on its decode instance (ultra-short).
    UltraShort,
    /// Batched with other short prompts on a prefill instance.
    Short,
    /// Prefilled alone on a prefill instance.
    #[default]
    Long,
    /// Served start to finish by an aggregated instance.
    Aggregated,
}

impl Route {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::UltraShort => "ultra_short",
            Self::Short => "short",
            Self::Long => "long",
            Self::Aggregated => "aggregated",
        }
    }
}

/// One finished request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: usize,
    pub arrival_s: f64,
    pub isl: u32,
    pub osl: u32,
    pub route: Route,
    pub ttft_s: f64,
    /// Mean time per output token after the first (0 for one-token outputs).
    pub tpot_s: f64,
    pub finish_s: f64,
    pub met_slo: bool,
}

/// The planner's view and decision at one tick.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntervalPoint {
    pub t_s: f64,
    /// Requests that arrived in the interval that just ended.
    pub requests: f64,
    /// Forecast of the next interval's requests (`None` for policies that do not forecast).
    pub forecast_requests: Option<f64>,
    pub target_prefill: u32,
    pub target_decode: u32,
    pub ready_prefill: u32,
    pub ready_decode: u32,
    /// GPUs held (starting, ready or draining instances) at the tick.
    pub gpus: u32,
}

/// Aggregates of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub policy: String,
    pub requests: usize,
    /// First arrival to last finish, seconds.
    pub duration_s: f64,
    pub slo_ttft_s: f64,
    /// Per-token TTFT allowance (length-aware SLO), seconds per prompt token.
    #[serde(default)]
    pub slo_ttft_per_token_s: f64,
    pub slo_tpot_s: f64,
    /// Fraction of requests meeting both SLOs.
    pub slo_attainment: f64,
    /// Output tokens per second of requests that met both SLOs.
    pub goodput_tokens_per_s: f64,
    /// Requests per second that met both SLOs.
    pub goodput_requests_per_s: f64,
    /// All output tokens per second.
    pub throughput_tokens_per_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub ttft_p99_s: f64,
    pub tpot_p50_s: f64,
    pub tpot_p90_s: f64,
    pub tpot_p99_s: f64,
    pub gpu_seconds: f64,
    pub peak_gpus: u32,
    /// Mean GPUs held over the run.
    pub mean_gpus: f64,
    /// Ticks that changed a target, per hour of the run (0 without a planner).
    #[serde(default)]
    pub target_changes_per_hour: f64,
    /// Scored from this time on (the warm-up before it is not scored).
    #[serde(default)]
    pub score_from_s: f64,
}

/// Ticks whose targets differ from the previous tick's, per hour of `duration_s`.
pub(crate) fn changes_per_hour(intervals: &[IntervalPoint], duration_s: f64) -> f64 {
    let changes = intervals
        .windows(2)
        .filter(|w| {
            (w[0].target_prefill, w[0].target_decode) != (w[1].target_prefill, w[1].target_decode)
        })
        .count();
    if duration_s > 0.0 {
        changes as f64 * 3600.0 / duration_s
    } else {
        0.0
    }
}

/// Everything a run produces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    pub summary: Summary,
    pub records: Vec<RequestRecord>,
    pub intervals: Vec<IntervalPoint>,
    /// ∫ GPUs dt sampled at every change of the GPU count (equals `summary.gpu_seconds`; kept as
    /// an independent check).
    pub gpu_seconds_integral: f64,
    /// Every step of the control loop, when `SimConfig::record_control` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control: Vec<ControlStep>,
}

/// One step of the control loop in a run: what it observed and what it ordered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlStep {
    pub at: f64,
    pub snapshot: Snapshot,
    pub orders: Orders,
    /// The planner's decision, when the step ticked.
    pub decision: Option<Decision>,
}

/// Linear-interpolation percentile of sorted data (`q` in 0..=1).
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub(crate) fn summarize(
    policy: String,
    records: &[RequestRecord],
    slo: (f64, f64),
    gpu_seconds: f64,
    peak_gpus: u32,
) -> Summary {
    let start = records
        .iter()
        .map(|r| r.arrival_s)
        .fold(f64::INFINITY, f64::min);
    let end = records
        .iter()
        .map(|r| r.finish_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration = if records.is_empty() {
        0.0
    } else {
        (end - start).max(1e-9)
    };
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let good: Vec<&RequestRecord> = records.iter().filter(|r| r.met_slo).collect();
    let mut ttft: Vec<f64> = records.iter().map(|r| r.ttft_s).collect();
    let mut tpot: Vec<f64> = records
        .iter()
        .filter(|r| r.osl > 1)
        .map(|r| r.tpot_s)
        .collect();
    ttft.sort_by(f64::total_cmp);
    tpot.sort_by(f64::total_cmp);
    Summary {
        policy,
        requests: records.len(),
        duration_s: duration,
        slo_ttft_s: slo.0,
        slo_ttft_per_token_s: 0.0,
        slo_tpot_s: slo.1,
        slo_attainment: if records.is_empty() {
            0.0
        } else {
            good.len() as f64 / records.len() as f64
        },
        goodput_tokens_per_s: per_s(good.iter().map(|r| f64::from(r.osl)).sum()),
        goodput_requests_per_s: per_s(good.len() as f64),
        throughput_tokens_per_s: per_s(records.iter().map(|r| f64::from(r.osl)).sum()),
        ttft_p50_s: percentile(&ttft, 0.5),
        ttft_p90_s: percentile(&ttft, 0.9),
        ttft_p99_s: percentile(&ttft, 0.99),
        tpot_p50_s: percentile(&tpot, 0.5),
        tpot_p90_s: percentile(&tpot, 0.9),
        tpot_p99_s: percentile(&tpot, 0.99),
        gpu_seconds,
        peak_gpus,
        mean_gpus: if duration > 0.0 {
            gpu_seconds / duration
        } else {
            0.0
        },
        target_changes_per_hour: 0.0,
        score_from_s: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
