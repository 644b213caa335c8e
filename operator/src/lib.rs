//! DOPD's Kubernetes operator.
//!
//! - [`crd`]: the `DopdService` custom resource and its schema;
//! - [`children`]: the objects a DopdService is made of, as pure functions of its spec;
//! - [`control`]: the router (the planner's observer and the drain half of its actuator) and the
//!   clock, behind traits;
//! - [`reconcile`]: the reconciler: children, planner loop, drain-safe scale-down, status;
//! - [`lease`]: leader election on a coordination.k8s.io Lease;
//! - [`metrics`] and [`run`]: the process (`dopd operator`).

pub mod children;
pub mod control;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod run;
