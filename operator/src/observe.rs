//! What the control loop observes in a cluster, as pure functions: worker pods (with what the
//! router knows of each) become the loop's instances.

use dopd_planner::control::{Instance, InstanceState};
use dopd_protocol::load::{LoadSnapshot, fill_instance};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::children::WORKER_PORT;
use dopd_protocol::Role;

/// Annotation the cluster autoscaler reads before evicting a pod to empty a node.
pub const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
/// Annotation the ReplicaSet controller reads to choose which pods to remove first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Cost given to the pods the loop drains or retires (lower goes first; unset is 0).
pub const VICTIM_COST: &str = "-1000";

/// A worker pod as the reconciler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub name: String,
    pub role: Role,
    /// Its gRPC URL (from the pod IP), once it has one.
    pub url: Option<String>,
    /// The pod's phase (`Pending`, `Running`, ...).
    pub phase: String,
    /// Its Ready condition.
    pub ready: bool,
    /// Pending past the timeout.
    pub unschedulable: bool,
    /// Marked `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`.
    pub evict_protected: bool,
    /// Marked to go first when its Deployment shrinks ([`VICTIM_COST`]).
    pub victim: bool,
    /// Creation time, Unix seconds.
    pub created: f64,
}

/// The worker pods of `role` (pods being deleted left out), at wall time `now`.
pub fn pod_infos(pods: &[Pod], role: Role, pending_timeout_s: f64, now: Timestamp) -> Vec<PodInfo> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let status = p.status.as_ref();
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let phase = status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into());
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let annotation = |k: &str| p.metadata.annotations.as_ref().and_then(|a| a.get(k));
            let age = created.map_or(0.0, |t| (now - t).get_seconds() as f64);
            PodInfo {
                name: p.name_any(),
                role,
                url: status
                    .and_then(|s| s.pod_ip.as_ref())
                    .map(|ip| format!("http://{ip}:{WORKER_PORT}")),
                ready,
                unschedulable: phase == "Pending" && age > pending_timeout_s,
                phase,
                evict_protected: annotation(SAFE_TO_EVICT).is_some_and(|v| v == "false"),
                victim: annotation(DELETION_COST).is_some_and(|v| v == VICTIM_COST),
                created: created.map_or(0.0, |t| t.as_second() as f64),
            }
        })
        .collect()
}

/// The control loop's instances: one per pod, its state from the pod (and from the router, which
/// knows which workers it drains), its load from the router. With no reading of the router, the
/// requests a pod holds are unknown, so no drain can end early.
pub fn instances(pods: &[PodInfo], load: Option<&LoadSnapshot>) -> Vec<Instance> {
    pods.iter()
        .map(|p| {
            let view = p.url.as_ref().and_then(|u| load.and_then(|l| l.worker(u)));
            let state = if p.ready {
                if view.is_some_and(|v| v.draining) {
                    InstanceState::Draining
                } else {
                    InstanceState::Ready
                }
            } else if p.unschedulable {
                InstanceState::Unschedulable
            } else if p.phase == "Pending" {
                InstanceState::Pending
            } else {
                InstanceState::Starting
            };
            let mut inst = Instance {
                id: p.name.clone(),
                role: p.role,
                state,
                // A worker the router does not know gets nothing from it.
                in_flight: load.map(|_| 0),
                work: 0.0,
                queued: 0,
                kv_usage: None,
                created: p.created,
            };
            if let Some(v) = view {
                fill_instance(&mut inst, v);
            }
            inst
        })
        .collect()
}

/// Pods whose eviction guard must change: busy workers must not be evicted by the autoscaler to
/// empty a node (`true`: set it), idle ones may be (`false`: remove it). Nothing when the
/// router could not be read.
pub fn eviction_changes(pods: &[PodInfo], load: Option<&LoadSnapshot>) -> Vec<(String, bool)> {
    let Some(load) = load else {
        return Vec::new();
    };
    pods.iter()
        .filter_map(|p| {
            let busy = p
                .url
                .as_ref()
                .and_then(|u| load.worker(u))
                .is_some_and(|v| v.in_flight > 0);
            (busy != p.evict_protected).then(|| (p.name.clone(), busy))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dopd_protocol::load::WorkerView;

    fn pod(name: &str, ready: bool, phase: &str, unschedulable: bool) -> PodInfo {
        PodInfo {
            name: name.into(),
            role: Role::Decode,
            url: Some(format!("http://{name}:50051")),
            phase: phase.into(),
            ready,
            unschedulable,
            evict_protected: false,
            victim: false,
            created: 0.0,
        }
    }

    fn view(url: &str, in_flight: usize, draining: bool) -> WorkerView {
        WorkerView {
            url: url.into(),
            worker_id: url.into(),
            role: Some(Role::Decode),
            healthy: true,
            draining,
            in_flight,
            outstanding_tokens: 10 * in_flight as u64,
            kv_blocks_used: Some(1),
            kv_blocks_free: Some(3),
            waiting: Some(0),
            kv_degraded: None,
        }
    }

    #[test]
    fn pods_become_instances_with_the_routers_view() {
        let pods = [
            pod("a", true, "Running", false),
            pod("b", true, "Running", false),
            pod("c", false, "Running", false),
            pod("d", false, "Pending", false),
            pod("e", false, "Pending", true),
        ];
        let load = LoadSnapshot {
            workers: vec![
                view("http://a:50051", 2, false),
                view("http://b:50051", 0, true),
            ],
            ..LoadSnapshot::default()
        };
        let i = instances(&pods, Some(&load));
        let states: Vec<InstanceState> = i.iter().map(|i| i.state).collect();
        assert_eq!(
            states,
            [
                InstanceState::Ready,
                InstanceState::Draining,
                InstanceState::Starting,
                InstanceState::Pending,
                InstanceState::Unschedulable,
            ]
        );
        assert_eq!(
            (i[0].in_flight, i[0].work, i[0].kv_usage),
            (Some(2), 20.0, Some(0.25))
        );
        // Unknown to the router: holds nothing.
        assert_eq!(i[2].in_flight, Some(0));
        // No reading at all: unknown.
        assert!(instances(&pods, None).iter().all(|i| i.in_flight.is_none()));
    }

    #[test]
    fn only_busy_workers_are_guarded_against_eviction() {
        let mut guarded = pod("b", true, "Running", false);
        guarded.evict_protected = true;
        let pods = [pod("a", true, "Running", false), guarded];
        let load = LoadSnapshot {
            workers: vec![
                view("http://a:50051", 2, false),
                view("http://b:50051", 0, false),
            ],
            ..LoadSnapshot::default()
        };
        assert_eq!(
            eviction_changes(&pods, Some(&load)),
            [("a".to_string(), true), ("b".to_string(), false)]
        );
        assert!(eviction_changes(&pods, None).is_empty());
    }
}
