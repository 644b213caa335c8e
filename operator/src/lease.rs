//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas can run and only
//! one reconciles.
//!
//! The holder renews the Lease every `renew`; a candidate takes it over once `renewTime +
//! leaseDurationSeconds` has passed. Every write carries the resourceVersion it read, so two
//! candidates racing for an expired Lease cannot both win (the loser gets 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a candidate retries).
    pub renew: Duration,
}

/// The outcome of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// We hold the Lease.
    Leader,
    /// Someone else holds a valid Lease.
    Follower { holder: String },
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

/// One acquire-or-renew attempt at time `now`.
pub async fn round(
    api: &Api<Lease>,
    s: &LeaseSettings,
    now: Timestamp,
) -> Result<Round, kube::Error> {
    let secs = i32::try_from(s.duration.as_secs()).unwrap_or(i32::MAX);
    let fresh = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(secs),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&s.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                namespace: Some(s.namespace.clone()),
                ..Default::default()
            },
            spec: Some(fresh(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Round::Leader),
            Err(e) if conflict(&e) => Ok(Round::Follower {
                holder: "another candidate".into(),
            }),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mine = holder == s.identity;
    let valid_for =
        SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs)));
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|t| t.0 + valid_for < now);
    if !mine && !expired && !holder.is_empty() {
        return Ok(Round::Follower { holder });
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
    lease.spec = Some(fresh(
        transitions,
        if mine { spec.acquire_time } else { None },
    ));
    match api.replace(&s.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Round::Leader),
        Err(e) if conflict(&e) => Ok(Round::Follower { holder }),
        Err(e) => Err(e),
    }
}
