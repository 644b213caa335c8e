//! The operator's writes: children applied by server-side apply (drift put back, with an
//! Event), pod annotations, the status subresource and Events.

use dopd_planner::profile::PerRole;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::{Ctx, Error, Prepared, SvcState};
use crate::children::{self, Child, FIELD_MANAGER, Kind};
use crate::crd::{DopdService, DopdServiceStatus};
use crate::status;
use dopd_protocol::Role;

pub(crate) async fn publish(
    ctx: &Ctx,
    svc: &DopdService,
    type_: EventType,
    reason: &str,
    note: String,
) {
    tracing::info!(service = %svc.name_any(), reason, "{note}");
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    match ctx.recorder.publish(&ev, &svc.object_ref(&())).await {
        Ok(()) => ctx.metrics.writes.inc(),
        Err(e) => {
            tracing::warn!("cannot record an Event: {e}");
            0
        }
    };
}

/// Sets (or, with null, removes) one annotation of a pod; a pod already gone is fine.
pub(crate) async fn annotate_pod(
    ctx: &Ctx,
    pods: &Api<Pod>,
    name: &str,
    key: &str,
    value: Value,
) -> Result<(), Error> {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    match pods
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            ctx.metrics.writes.inc();
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the status with server-side apply (the operator owns all of it) when it differs from
/// `old`, the status the reconcile started from; says whether it wrote.
pub(crate) async fn patch_status(
    ctx: &Ctx,
    svc: &DopdService,
    old: &DopdServiceStatus,
    status: &DopdServiceStatus,
) -> Result<bool, Error> {
    if svc.status.is_some() && old == status {
        return Ok(false);
    }
    let api: Api<DopdService> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": DopdService::api_version(&()),
        "kind": DopdService::kind(&()),
        "status": status,
    });
    api.patch_status(
        &svc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.metrics.writes.inc();
    Ok(true)
}

/// Applies the children: worker replicas are the loop's targets plus the pods still draining,
/// placeholders its headroom. Headroom Deployments go when headroom is off.
pub(crate) async fn apply_children(
    ctx: &Ctx,
    svc: &DopdService,
    p: &Prepared,
    st: &mut SvcState,
) -> Result<(), Error> {
    let held = st.ctrl.held();
    let placeholders = st.ctrl.headroom().map(|h| h.placeholders);
    let desired = children::children(
        svc,
        &p.profile_yaml,
        |role| held.get(role),
        |role| placeholders.map_or(0, |h| h.get(role)),
    );
    for c in &desired {
        apply_child(ctx, svc, &p.ns, c, &mut st.applied).await?;
    }
    if !svc.spec.headroom.enabled {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &p.ns, &Kind::Deployment.api_resource());
        for role in Role::SIZED {
            let n = children::headroom_name(&p.name, role);
            if api.get_opt(&n).await?.is_some() {
                api.delete(&n, &DeleteParams::background()).await?;
                ctx.metrics.writes.inc();
            }
        }
    }
    Ok(())
}

/// A Warning Event when pods first stay Pending past the timeout.
pub(crate) async fn warn_constrained(
    ctx: &Ctx,
    svc: &DopdService,
    old: &DopdServiceStatus,
    i: &status::Inputs<'_>,
) {
    let constrained = status::constrained(i);
    if constrained.is_empty() || status::is_on(&old.conditions, "CapacityConstrained") {
        return;
    }
    let note = format!(
        "{}; they count against the GPU budget and the planner no longer waits for them",
        constrained.join(", ")
    );
    publish(ctx, svc, EventType::Warning, "CapacityConstrained", note).await;
}

/// Applies `c` unless the cluster already has it as wanted. A worker Deployment whose replica
/// count someone else changed is put back, with an Event.
pub(crate) async fn apply_child(
    ctx: &Ctx,
    svc: &DopdService,
    ns: &str,
    c: &Child,
    applied: &mut PerRole<Option<u32>>,
) -> Result<(), Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &c.kind.api_resource());
    let existing = api.get_opt(&c.name).await?;
    let mut write = true;
    if let Some(obj) = &existing {
        let body = serde_json::to_value(obj).unwrap_or(Value::Null);
        let same = children::applied_hash(&body) == children::applied_hash(&c.body);
        let have = body["spec"]["replicas"].as_u64().map(|v| v as u32);
        let replicas_ok = c.replicas.is_none_or(|want| have == Some(want));
        write = !(same && replicas_ok);
        if let (Some(role), Some(want), Some(have)) = (c.owner_role, c.replicas, have) {
            let mine = applied.get(role);
            if have != want && mine.is_some_and(|m| m != have) {
                let note = format!(
                    "Deployment {} was scaled to {have} outside the operator; set back to {want}. The DopdService owns worker replicas: change spec.{}.minReplicas/maxReplicas or spec.planner instead",
                    c.name,
                    role.as_str()
                );
                publish(ctx, svc, EventType::Warning, "ReplicasReverted", note).await;
            }
        }
    }
    if write {
        api.patch(
            &c.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&c.body),
        )
        .await?;
        ctx.metrics.writes.inc();
        tracing::debug!(kind = ?c.kind, name = %c.name, "applied");
    }
    if let (Some(role), Some(want)) = (c.owner_role, c.replicas) {
        match role {
            Role::Prefill => applied.prefill = Some(want),
            Role::Decode | Role::Mixed => applied.decode = Some(want),
        }
    }
    Ok(())
}
