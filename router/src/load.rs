//! The planner's input (`GET /v1/dopd/load`): the router's cumulative counts since it started
//! ([`LoadTotals`]: arrivals, first tokens, finishes, failures, latency histograms), the requests
//! it holds that are not streaming yet, and every worker's view (queue, KV use, requests in
//! flight).
//!
//! Reading changes nothing, so any number of readers may read at any time; the control loop
//! (`dopd_planner::control`) computes each interval from the difference of two readings.

use dopd_planner::control::Instance;
use dopd_planner::load::{LoadReading, LoadTotals};
use serde::{Deserialize, Serialize};

use crate::pool::WorkerView;

/// The answer of `GET /v1/dopd/load`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadSnapshot {
    #[serde(flatten)]
    pub reading: LoadReading,
    /// Seconds since the router started.
    pub uptime_s: f64,
    pub workers: Vec<WorkerView>,
}

impl LoadSnapshot {
    /// A snapshot of `totals`, with `router_waiting` requests admitted and not streaming yet.
    pub fn new(
        totals: LoadTotals,
        router_waiting: u64,
        uptime_s: f64,
        workers: Vec<WorkerView>,
    ) -> Self {
        Self {
            reading: LoadReading {
                totals,
                router_waiting,
            },
            uptime_s,
            workers,
        }
    }

    /// The view of the worker at `url`, if the router knows it.
    pub fn worker(&self, url: &str) -> Option<&WorkerView> {
        self.workers.iter().find(|w| w.url == url)
    }
}

/// Fills what the router knows about a worker into the control loop's instance: requests in
/// flight, outstanding tokens, queued prefills and KV use.
pub fn fill_instance(inst: &mut Instance, v: &WorkerView) {
    inst.in_flight = Some(u32::try_from(v.in_flight).unwrap_or(u32::MAX));
    inst.work = v.outstanding_tokens as f64;
    inst.queued = v.waiting.unwrap_or(0);
    inst.kv_usage = match (v.kv_blocks_used, v.kv_blocks_free) {
        (Some(u), Some(f)) if u + f > 0 => Some(f64::from(u) / f64::from(u + f)),
        _ => None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::WorkerRole;
    use dopd_planner::profile::Role;

    #[test]
    fn a_workers_view_fills_its_instance() {
        let v = WorkerView {
            url: "http://w".into(),
            worker_id: "w".into(),
            role: WorkerRole::Decode,
            healthy: true,
            draining: false,
            in_flight: 3,
            outstanding_tokens: 700,
            kv_blocks_used: Some(30),
            kv_blocks_free: Some(90),
            waiting: Some(2),
            kv_degraded: None,
        };
        let mut i = Instance::ready("w", Role::Decode);
        fill_instance(&mut i, &v);
        assert_eq!((i.in_flight, i.work, i.queued), (Some(3), 700.0, 2));
        assert_eq!(i.kv_usage, Some(0.25));
    }

    #[test]
    fn the_snapshot_is_flat_json() {
        let mut t = LoadTotals::new(5);
        t.arrive(10);
        let s = LoadSnapshot::new(t, 2, 1.5, vec![]);
        let v = serde_json::to_value(&s).expect("JSON");
        assert_eq!(v["arrived"], 1);
        assert_eq!(v["router_waiting"], 2);
        assert_eq!(v["epoch"], 5);
        let back: LoadSnapshot = serde_json::from_value(v).expect("back");
        assert_eq!(back, s);
    }
}
