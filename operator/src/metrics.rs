//! The operator's Prometheus metrics (OpenMetrics text on `/metrics`).

use std::sync::atomic::{AtomicBool, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub namespace: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub namespace: String,
    pub service: String,
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub namespace: String,
    pub service: String,
    pub changed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PredictorLabel {
    pub namespace: String,
    pub service: String,
    pub predictor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForecastLabel {
    pub namespace: String,
    pub service: String,
    pub quantity: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub errors: Family<KindLabel, Counter>,
    pub decisions: Family<DecisionLabel, Counter>,
    pub forecast: Family<ForecastLabel, Gauge<f64, AtomicU64>>,
    /// Decisions by the forecaster the scorecard chose (predictor `best`).
    pub predictor: Family<PredictorLabel, Counter>,
    pub desired: Family<RoleLabel, Gauge>,
    pub ready: Family<RoleLabel, Gauge>,
    pub writes: Counter,
    pub leader: Gauge,
    /// Ready to serve `/readyz`: the API server answered the last leader-election round.
    pub api_ok: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dopd_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let reconcile_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let errors = Family::<KindLabel, Counter>::default();
        let decisions = Family::<DecisionLabel, Counter>::default();
        let forecast = Family::<ForecastLabel, Gauge<f64, AtomicU64>>::default();
        let predictor = Family::<PredictorLabel, Counter>::default();
        let desired = Family::<RoleLabel, Gauge>::default();
        let ready = Family::<RoleLabel, Gauge>::default();
        let writes = Counter::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles of DopdServices, by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by kind of error",
            errors.clone(),
        );
        registry.register(
            "planner_decisions",
            "Planner decisions per DopdService (changed: a count moved)",
            decisions.clone(),
        );
        registry.register(
            "predicted_load",
            "The planner's forecast of the next interval (requests, mean_isl, mean_osl)",
            forecast.clone(),
        );
        registry.register(
            "planner_predictor_choices",
            "Planner decisions by the forecaster whose recent error was lowest (predictor best)",
            predictor.clone(),
        );
        registry.register(
            "desired_replicas",
            "Instances the planner wants, per role",
            desired.clone(),
        );
        registry.register("ready_replicas", "Ready instances, per role", ready.clone());
        registry.register(
            "api_writes",
            "Writes (apply, patch, create, delete) sent to the API server",
            writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_seconds,
            errors,
            decisions,
            forecast,
            predictor,
            desired,
            ready,
            writes,
            leader,
            api_ok: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
