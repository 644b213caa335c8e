//! The planner's input (`GET /v1/dopd/load`), as the router serves it: its cumulative counts
//! since it started ([`LoadTotals`]: arrivals, first tokens, finishes, failures, latency
//! histograms), the requests it holds that are not streaming yet, and every worker's view
//! (queue, KV use, requests in flight).
//!
//! Reading changes nothing, so any number of readers may read at any time; the control loop
//! (`dopd_planner::control`) computes each interval from the difference of two readings.

use dopd_planner::control::Instance;
use dopd_planner::load::{LoadReading, LoadTotals};
use serde::{Deserialize, Serialize};

use crate::Role;

/// A worker's public view, as the router has it (`/v1/dopd/workers`, drain answers and the load
/// snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    pub url: String,
    pub worker_id: String,
    /// What the worker said it does in its last Health answer (`"unknown"` before the first).
    #[serde(with = "role_or_unknown")]
    pub role: Option<Role>,
    pub healthy: bool,
    pub draining: bool,
    pub in_flight: usize,
    pub outstanding_tokens: u64,
    pub kv_blocks_used: Option<u32>,
    pub kv_blocks_free: Option<u32>,
    pub waiting: Option<u32>,
    pub kv_degraded: Option<bool>,
}

/// A role in JSON: its name, or `"unknown"` for none.
mod role_or_unknown {
    use super::Role;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &Option<Role>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.map_or("unknown", |r| r.as_str()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Role>, D::Error> {
        let name = String::deserialize(d)?;
        Ok(name.parse().ok())
    }
}

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

    #[test]
    fn a_workers_view_fills_its_instance() {
        let v = WorkerView {
            url: "http://w".into(),
            worker_id: "w".into(),
            role: Some(Role::Decode),
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
    fn a_view_names_its_role_or_unknown() {
        let mut v = WorkerView {
            url: "http://w".into(),
            worker_id: "w".into(),
            role: None,
            healthy: false,
            draining: false,
            in_flight: 0,
            outstanding_tokens: 0,
            kv_blocks_used: None,
            kv_blocks_free: None,
            waiting: None,
            kv_degraded: None,
        };
        for (role, name) in [(None, "unknown"), (Some(Role::Mixed), "mixed")] {
            v.role = role;
            let j = serde_json::to_value(&v).expect("JSON");
            assert_eq!(j["role"], name);
            let back: WorkerView = serde_json::from_value(j).expect("back");
            assert_eq!(back, v);
        }
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
