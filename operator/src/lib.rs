//! DOPD's Kubernetes operator.
//!
//! - [`crd`]: the `DopdService` custom resource and its schema;
//! - [`children`]: the objects a DopdService is made of, as pure functions of its spec;
//! - [`control`]: the router (what the control loop observes, and the routing half of its
//!   actuator) and the clock, behind traits;
//! - [`observe`]: worker pods as the control loop's instances (pure);
//! - [`reconcile`]: the reconciler: children, the shared control loop
//!   (`dopd_planner::control`), drain-safe scale-down;
//! - [`status`]: the status, from what a reconcile saw and decided (pure);
//! - [`lease`]: leader election on a coordination.k8s.io Lease;
//! - [`metrics`] and [`run`]: the process (`dopd operator`).

pub mod children;
pub mod control;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod observe;
pub mod reconcile;
pub mod run;
pub mod status;
