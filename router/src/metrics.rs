//! The router's Prometheus metrics (OpenMetrics text on `/metrics`).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use dopd_protocol::load::WorkerView;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<Labels, Counter>,
    pub decisions: Family<Labels, Counter>,
    pub rejected: Family<Labels, Counter>,
    pub retries: Counter,
    pub stream_errors: Counter,
    pub resumes: Counter,
    pub router_waiting: Gauge,
    pub ttft: Histogram,
    pub itl: Histogram,
}

/// Latency buckets from 5 ms to about 80 s.
fn buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("dopd_router");
        let requests = Family::<Labels, Counter>::default();
        let decisions = Family::<Labels, Counter>::default();
        let rejected = Family::<Labels, Counter>::default();
        let retries = Counter::default();
        let stream_errors = Counter::default();
        let resumes = Counter::default();
        let router_waiting = Gauge::default();
        let ttft = Histogram::new(buckets());
        let itl = Histogram::new(buckets());
        r.register(
            "requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        r.register(
            "routing_decisions",
            "Routing decisions by request class, route and reason",
            decisions.clone(),
        );
        r.register(
            "rejected",
            "Requests refused before scheduling, by reason",
            rejected.clone(),
        );
        r.register(
            "retries",
            "Attempts moved to another worker after a failure before the first token",
            retries.clone(),
        );
        r.register(
            "stream_errors",
            "Streams ended by a worker failure after the first token (none could resume them)",
            stream_errors.clone(),
        );
        r.register(
            "resumes",
            "Streams resumed on another worker after theirs failed mid-stream",
            resumes.clone(),
        );
        r.register(
            "waiting",
            "Requests waiting in the router (short batching and the shared prefill queue)",
            router_waiting.clone(),
        );
        r.register("ttft_seconds", "Time to first token", ttft.clone());
        r.register(
            "itl_seconds",
            "Mean inter-token latency per request",
            itl.clone(),
        );
        Self {
            registry: Mutex::new(r),
            requests,
            decisions,
            rejected,
            retries,
            stream_errors,
            resumes,
            router_waiting,
            ttft,
            itl,
        }
    }
}

impl Metrics {
    pub fn decision(&self, class: &str, route: &str, reason: &str) {
        self.decisions
            .get_or_create(&vec![
                ("class", class.to_string()),
                ("route", route.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// The registry's text plus per-worker gauges from `workers`.
    pub fn render(&self, workers: &[WorkerView]) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode(&mut out, &r);
        }
        // Per-worker figures are a snapshot: a fresh registry each scrape.
        let mut w = Registry::with_prefix("dopd_router_worker");
        let fam = || Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let (healthy, in_flight, outstanding, kv) = (fam(), fam(), fam(), fam());
        for v in workers {
            let l: Labels = vec![
                ("worker", v.url.clone()),
                ("role", v.role.map_or("unknown", |r| r.as_str()).to_string()),
            ];
            healthy
                .get_or_create(&l)
                .set(if v.healthy && !v.draining { 1.0 } else { 0.0 });
            in_flight.get_or_create(&l).set(v.in_flight as f64);
            outstanding
                .get_or_create(&l)
                .set(v.outstanding_tokens as f64);
            if let (Some(u), Some(f)) = (v.kv_blocks_used, v.kv_blocks_free)
                && u + f > 0
            {
                kv.get_or_create(&l).set(f64::from(u) / f64::from(u + f));
            }
        }
        w.register("healthy", "1 when the worker takes new work", healthy);
        w.register(
            "in_flight",
            "Requests the router has in flight there",
            in_flight,
        );
        w.register(
            "outstanding_tokens",
            "Prompt plus max new tokens the router has in flight there",
            outstanding,
        );
        w.register("kv_usage", "Fraction of KV blocks in use", kv);
        let mut more = String::new();
        let _ = encode(&mut more, &w);
        // One exposition: drop the first part's EOF marker.
        if let Some(stripped) = out.strip_suffix("# EOF\n") {
            out.truncate(stripped.len());
        }
        out + &more
    }
}
