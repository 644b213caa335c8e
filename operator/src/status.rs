//! A DopdService's status, as a pure function of what the reconcile saw and the control loop's
//! state: role counts, targets, the latest decision and forecast, the history of changes,
//! headroom, drains in progress, phase and conditions.

use dopd_planner::control::{Controller, InstanceState, TickReport};
use dopd_planner::planner::Decision;
use dopd_planner::profile::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{
    DecisionRecord, DopdServiceSpec, DopdServiceStatus, DrainStatus, ForecastStatus,
    HeadroomStatus, RoleStatus,
};
use crate::observe::PodInfo;

/// Everything the status is made of.
pub struct Inputs<'a> {
    pub spec: &'a DopdServiceSpec,
    pub generation: Option<i64>,
    pub old: &'a DopdServiceStatus,
    pub ctrl: &'a Controller,
    /// Every worker pod, and the loop's state of each (same order).
    pub pods: &'a [(PodInfo, InstanceState)],
    /// The tick of this reconcile, if one ran.
    pub tick: Option<&'a TickReport>,
    /// Why a due tick could not run (the router could not be read).
    pub load_error: Option<&'a str>,
    /// The loop's clock and the wall clock, read once per reconcile.
    pub now: f64,
    pub wall: Timestamp,
}

/// Counts of one role's pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounts {
    /// Ready and not draining.
    pub ready: u32,
    /// Not ready yet (starting or Pending).
    pub pending: u32,
    pub unschedulable: u32,
}

pub fn counts(pods: &[(PodInfo, InstanceState)], role: Role) -> PodCounts {
    let mut c = PodCounts::default();
    for (p, state) in pods.iter().filter(|(p, _)| p.role == role) {
        if p.ready {
            c.ready += u32::from(*state != InstanceState::Draining);
        } else {
            c.pending += 1;
            c.unschedulable += u32::from(p.unschedulable);
        }
    }
    c
}

/// The reasons of a decision, as their tags.
pub fn reasons_text(d: &Decision) -> String {
    match d.reason_tags() {
        t if t.is_empty() => "no change needed".into(),
        t => t,
    }
}

pub fn round2(v: f64) -> f64 {
    if v.is_finite() {
        (v * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// The forecast of a tick, as the status shows it.
pub fn forecast(t: &TickReport) -> Option<ForecastStatus> {
    t.decision.forecast.as_ref().map(|f| ForecastStatus {
        requests: round2(f.requests.point),
        requests_upper: round2(f.requests.upper),
        mean_isl: round2(f.isl.point),
        mean_osl: round2(f.osl.point),
    })
}

/// The status. Conditions keep their transition time while their status stays.
pub fn build(i: &Inputs) -> DopdServiceStatus {
    let mut s = DopdServiceStatus {
        observed_generation: i.generation,
        model: i.spec.served_name(),
        ..Default::default()
    };
    decisions(i, &mut s);
    let target = i.ctrl.target();
    for role in Role::SIZED {
        let c = counts(i.pods, role);
        let desired = target.get(role);
        let rs = RoleStatus {
            ready: c.ready,
            desired,
            pending: c.pending,
            unschedulable: c.unschedulable,
            summary: format!("{}/{desired}", c.ready),
        };
        match role {
            Role::Prefill => s.prefill = rs,
            Role::Decode | Role::Mixed => s.decode = rs,
        }
    }
    s.ratio = format!("{}:{}", target.prefill, target.decode);
    s.headroom = i.ctrl.headroom().map(|h| HeadroomStatus {
        prefill: h.placeholders.prefill,
        decode: h.placeholders.decode,
        upper: format!("{}:{}", h.upper.prefill, h.upper.decode),
    });
    s.draining = drains(i);
    conditions(i, &mut s);
    s
}

/// Last decision, forecast and history: from this reconcile's tick, else kept.
fn decisions(i: &Inputs, s: &mut DopdServiceStatus) {
    s.history = i.old.history.clone();
    match i.tick {
        Some(t) => {
            let rec = DecisionRecord {
                time: i.wall.to_string(),
                prefill: t.decision.target.prefill,
                decode: t.decision.target.decode,
                reason: reasons_text(&t.decision),
            };
            if t.changed() {
                s.history.push(rec.clone());
            }
            s.last_decision = Some(rec);
            s.forecast = forecast(t);
        }
        None => {
            s.last_decision = i.old.last_decision.clone();
            s.forecast = i.old.forecast.clone();
        }
    }
    let limit = i.spec.planner.history_limit as usize;
    if s.history.len() > limit {
        let cut = s.history.len() - limit;
        s.history.drain(..cut);
    }
}

/// Two copies of the decision history as one: every entry of either, once, oldest first (entries
/// are told apart by their time).
pub fn merge_history(a: &[DecisionRecord], b: &[DecisionRecord]) -> Vec<DecisionRecord> {
    let mut all: Vec<DecisionRecord> = a.to_vec();
    all.extend(
        b.iter()
            .filter(|r| !a.iter().any(|x| x.time == r.time))
            .cloned(),
    );
    // By time (stable: entries whose time does not parse come first, in their order).
    all.sort_by_key(|r| r.time.parse::<Timestamp>().ok());
    all
}

/// Drains in progress, one entry per role.
fn drains(i: &Inputs) -> Vec<DrainStatus> {
    let mut out = Vec::new();
    for role in Role::SIZED {
        let mine: Vec<_> = i.ctrl.drains().iter().filter(|d| d.role == role).collect();
        let Some(first) = mine.iter().map(|d| d.started).reduce(f64::min) else {
            continue;
        };
        let ago = SignedDuration::from_secs_f64((i.now - first).max(0.0));
        out.push(DrainStatus {
            role: role.as_str().into(),
            pods: mine.iter().map(|d| d.id.clone()).collect(),
            target: i.ctrl.target().get(role),
            started: i.wall.checked_sub(ago).unwrap_or(i.wall).to_string(),
        });
    }
    out
}

/// Sets a condition, keeping its transition time when its status does not change.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    old: &[Condition],
    (type_, on): (&str, bool),
    reason: &str,
    message: String,
    generation: Option<i64>,
    wall: Timestamp,
) {
    let status = if on { "True" } else { "False" };
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(wall), |c| c.last_transition_time.clone());
    conds.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: last,
        observed_generation: generation,
    });
}

/// Whether a condition is on in `conds`.
pub fn is_on(conds: &[Condition], type_: &str) -> bool {
    conds.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Pods Pending past the timeout, per role, as words (empty when none).
pub fn constrained(i: &Inputs) -> Vec<String> {
    let timeout = i.spec.planner.pending_timeout_seconds;
    Role::SIZED
        .into_iter()
        .filter_map(|role| {
            let n = counts(i.pods, role).unschedulable;
            (n > 0).then(|| {
                format!(
                    "{n} {} pod(s) Pending for more than {timeout} s",
                    role.as_str()
                )
            })
        })
        .collect()
}

fn conditions(i: &Inputs, s: &mut DopdServiceStatus) {
    let target = i.ctrl.target();
    let (p, d) = (&s.prefill, &s.decode);
    let starting = [(p, Role::Prefill), (d, Role::Decode)]
        .iter()
        .any(|(c, role)| c.pending > 0 || c.ready != target.get(*role));
    let draining = !s.draining.is_empty();
    let all_ready = !starting && !draining;
    let degraded = i.load_error.is_some() && !i.spec.planner.paused;
    s.phase = if degraded {
        "Degraded"
    } else if d.ready == 0 {
        "Pending"
    } else if !all_ready {
        "Scaling"
    } else {
        "Running"
    }
    .into();
    let ready_msg = format!(
        "prefill {}/{}, decode {}/{} ready",
        p.ready, target.prefill, d.ready, target.decode
    );
    let ready_reason = if all_ready { "AllReady" } else { "Progressing" };
    let scaling = if draining {
        let pods: Vec<String> = s.draining.iter().flat_map(|d| d.pods.clone()).collect();
        (
            "Draining",
            format!("draining {} before scaling down", pods.join(", ")),
        )
    } else if starting {
        ("PodsStarting", "waiting for pods to become ready".into())
    } else {
        ("Stable", "replicas match the planner's targets".into())
    };
    let set = |conds: &mut Vec<Condition>, type_on, (reason, msg): (&str, String)| {
        set_condition(
            conds,
            &i.old.conditions,
            type_on,
            reason,
            msg,
            i.generation,
            i.wall,
        );
    };
    let conds = &mut s.conditions;
    set(conds, ("Ready", all_ready), (ready_reason, ready_msg));
    set(conds, ("Scaling", !all_ready), scaling);
    let degraded = degraded_condition(i);
    set(
        conds,
        ("Degraded", degraded.0 == "LoadUnavailable"),
        degraded,
    );
    let constrained = constrained(i);
    let capacity = if constrained.is_empty() {
        ("Schedulable", "every pod found a node".to_string())
    } else {
        (
            "PodsUnschedulable",
            format!(
                "{}; counted against the GPU budget, not waited for",
                constrained.join(", ")
            ),
        )
    };
    set(
        conds,
        ("CapacityConstrained", !constrained.is_empty()),
        capacity,
    );
}

/// The Degraded condition's reason and message: a failed load read keeps its message until the
/// next successful tick.
fn degraded_condition(i: &Inputs) -> (&'static str, String) {
    let msg = match (i.load_error, i.tick) {
        (Some(e), _) => Some(format!("cannot read the router's load: {e}")),
        (None, None) => i
            .old
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| c.message.clone()),
        (None, Some(_)) => None,
    };
    match msg {
        Some(m) => ("LoadUnavailable", m),
        None => ("AsExpected", "the planner reads the router's load".into()),
    }
}
