//! Interval aggregates for the planner (`GET /v1/dopd/load`): what arrived and how it was served
//! since the previous read, plus the queues and KV use of every worker now.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::pool::WorkerView;

/// One finished (or failed) request.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    pub isl: u32,
    pub osl: u32,
    /// Seconds from arrival to the first token (`None` when none came).
    pub ttft_s: Option<f64>,
    /// Mean seconds between later tokens (`None` with fewer than two tokens).
    pub itl_s: Option<f64>,
    /// Arrival to last token.
    pub duration_s: f64,
    pub ok: bool,
}

/// p50, p90 and p99 of a sample.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Nearest-rank quantiles (`None` for an empty sample).
pub fn quantiles(v: &mut [f64]) -> Option<Quantiles> {
    if v.is_empty() {
        return None;
    }
    let [p50, p90, p99] = dopd_planner::stats::quantiles(v, [0.5, 0.9, 0.99]);
    Some(Quantiles { p50, p90, p99 })
}

/// The answer of `GET /v1/dopd/load`: everything `dopd_planner::Observation` needs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadReport {
    /// Seconds since the previous read (or since the router started).
    pub interval_s: f64,
    /// Requests that arrived in the interval.
    pub requests: u64,
    /// Of those finished in the interval: how many, how many failed.
    pub finished: u64,
    pub failed: u64,
    pub mean_isl: Option<f64>,
    pub mean_osl: Option<f64>,
    pub mean_ttft_s: Option<f64>,
    pub mean_itl_s: Option<f64>,
    pub mean_duration_s: Option<f64>,
    pub ttft_s: Option<Quantiles>,
    pub itl_s: Option<Quantiles>,
    /// Requests in the router not yet streaming (admission and short batching), now.
    pub router_waiting: u64,
    /// Requests waiting in prefill-capable workers' queues, now.
    pub prefill_queue_depth: u64,
    /// Mean fraction of KV blocks in use over decode-capable workers, now.
    pub kv_usage: f64,
    pub workers: Vec<WorkerView>,
}

/// Accumulates between reads.
#[derive(Debug)]
pub struct LoadWindow {
    since: Instant,
    arrived: u64,
    done: Vec<Finished>,
}

impl Default for LoadWindow {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            arrived: 0,
            done: Vec::new(),
        }
    }
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl LoadWindow {
    pub fn arrived(&mut self) {
        self.arrived += 1;
    }

    pub fn finished(&mut self, f: Finished) {
        self.done.push(f);
    }

    /// The interval's aggregates; starts the next interval.
    pub fn take(
        &mut self,
        now: Instant,
        router_waiting: u64,
        workers: Vec<WorkerView>,
    ) -> LoadReport {
        let ok: Vec<&Finished> = self.done.iter().filter(|f| f.ok).collect();
        let mut ttft: Vec<f64> = ok.iter().filter_map(|f| f.ttft_s).collect();
        let mut itl: Vec<f64> = ok.iter().filter_map(|f| f.itl_s).collect();
        let prefill_queue_depth = workers
            .iter()
            .filter(|w| w.role != crate::pool::WorkerRole::Decode)
            .filter_map(|w| w.waiting)
            .map(u64::from)
            .sum();
        let kv: Vec<f64> = workers
            .iter()
            .filter(|w| w.role != crate::pool::WorkerRole::Prefill)
            .filter_map(|w| match (w.kv_blocks_used, w.kv_blocks_free) {
                (Some(u), Some(f)) if u + f > 0 => Some(f64::from(u) / f64::from(u + f)),
                _ => None,
            })
            .collect();
        let r = LoadReport {
            interval_s: now.duration_since(self.since).as_secs_f64(),
            requests: self.arrived,
            finished: self.done.len() as u64,
            failed: self.done.iter().filter(|f| !f.ok).count() as u64,
            mean_isl: mean(ok.iter().map(|f| f64::from(f.isl))),
            mean_osl: mean(ok.iter().map(|f| f64::from(f.osl))),
            mean_ttft_s: mean(ttft.iter().copied()),
            mean_itl_s: mean(itl.iter().copied()),
            mean_duration_s: mean(ok.iter().map(|f| f.duration_s)),
            ttft_s: quantiles(&mut ttft),
            itl_s: quantiles(&mut itl),
            router_waiting,
            prefill_queue_depth,
            kv_usage: mean(kv.into_iter()).unwrap_or(0.0),
            workers,
        };
        self.since = now;
        self.arrived = 0;
        self.done.clear();
        r
    }
}

impl LoadReport {
    /// The planner's observation of this interval, with `replicas` as the caller counts them.
    pub fn observation(
        &self,
        replicas: dopd_planner::profile::PerRole<dopd_planner::planner::ReplicaState>,
    ) -> dopd_planner::planner::Observation {
        dopd_planner::planner::Observation {
            interval_s: self.interval_s,
            requests: self.requests as f64,
            mean_isl: self.mean_isl,
            mean_osl: self.mean_osl,
            ttft_s: self.mean_ttft_s,
            itl_s: self.mean_itl_s,
            request_duration_s: self.mean_duration_s,
            prefill_queue_depth: (self.prefill_queue_depth + self.router_waiting) as f64,
            kv_usage: self.kv_usage,
            replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let q = quantiles(&mut v).expect("non-empty");
        assert_eq!((q.p50, q.p90, q.p99), (50.0, 90.0, 99.0));
        assert_eq!(quantiles(&mut []), None);
    }

    #[test]
    fn a_window_reports_its_interval_and_starts_the_next() {
        let mut w = LoadWindow::default();
        for _ in 0..3 {
            w.arrived();
        }
        let f = |isl, osl, ok| Finished {
            isl,
            osl,
            ttft_s: Some(0.1),
            itl_s: Some(0.02),
            duration_s: 1.0,
            ok,
        };
        w.finished(f(100, 10, true));
        w.finished(f(300, 30, true));
        w.finished(f(999, 0, false));
        let r = w.take(Instant::now(), 2, vec![]);
        assert_eq!((r.requests, r.finished, r.failed), (3, 3, 1));
        assert_eq!((r.mean_isl, r.mean_osl), (Some(200.0), Some(20.0)));
        assert_eq!(r.router_waiting, 2);
        let next = w.take(Instant::now(), 0, vec![]);
        assert_eq!((next.requests, next.finished, next.mean_isl), (0, 0, None));
    }
}
