//! Leader election rounds against the in-memory API server.

#![allow(clippy::unwrap_used)]

mod fake;

use std::time::Duration;

use dopd_operator::lease::{LeaseSettings, Round, round};
use fake::Fake;
use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;

fn settings(id: &str) -> LeaseSettings {
    LeaseSettings {
        name: "dopd-operator".into(),
        namespace: "ops".into(),
        identity: id.into(),
        duration: Duration::from_secs(15),
        renew: Duration::from_secs(5),
    }
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/dopd-operator";

#[tokio::test]
async fn one_leader_renews_and_another_takes_over_only_after_expiry() {
    let f = Fake::new();
    let api: Api<Lease> = Api::namespaced(f.client(), "ops");
    let t0 = Timestamp::now();
    let (a, b) = (settings("a"), settings("b"));
    assert_eq!(round(&api, &a, t0).await.unwrap(), Round::Leader);
    assert_eq!(
        round(&api, &b, t0).await.unwrap(),
        Round::Follower { holder: "a".into() }
    );
    // a renews; b still cannot take it 10 s later.
    let t1 = t0 + SignedDuration::from_secs(10);
    assert_eq!(round(&api, &a, t1).await.unwrap(), Round::Leader);
    assert_eq!(
        round(&api, &b, t1 + SignedDuration::from_secs(10))
            .await
            .unwrap(),
        Round::Follower { holder: "a".into() }
    );
    // a stops renewing: 16 s after its last renewal, b leads.
    let t2 = t1 + SignedDuration::from_secs(16);
    assert_eq!(round(&api, &b, t2).await.unwrap(), Round::Leader);
    let l = f.get(LEASE).unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "b");
    assert_eq!(l["spec"]["leaseTransitions"], 1);
    assert_eq!(
        round(&api, &a, t2).await.unwrap(),
        Round::Follower { holder: "b".into() }
    );
}

#[tokio::test]
async fn a_candidate_that_loses_the_write_race_follows() {
    let f = Fake::new();
    let api: Api<Lease> = Api::namespaced(f.client(), "ops");
    let t0 = Timestamp::now();
    round(&api, &settings("a"), t0).await.unwrap();
    // Expired; b reads it, but someone else's write lands first (409 on b's replace).
    f.fail(Method::PUT, "/leases/dopd-operator", 409, 1);
    let t1 = t0 + SignedDuration::from_secs(60);
    assert!(matches!(
        round(&api, &settings("b"), t1).await.unwrap(),
        Round::Follower { .. }
    ));
    assert_eq!(f.get(LEASE).unwrap()["spec"]["holderIdentity"], "a");
}
