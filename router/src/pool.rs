//! The worker registry: which workers exist, their role and health, and the router's own view
//! of their load (outstanding tokens and requests it sent them). A health loop polls every
//! worker's Health and Stats; a worker that fails leaves the candidate set and comes back once it
//! answers Health as serving again.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dopd_protocol::Role;
use dopd_protocol::load::WorkerView;
use dopd_protocol::proto::{self, worker_client::WorkerClient};
use tonic::transport::{Channel, Endpoint};

/// One worker as the router sees it.
pub struct WorkerEntry {
    pub url: String,
    pub client: WorkerClient<Channel>,
    /// Its last Health answer's role (none before the first).
    role: Mutex<Option<Role>>,
    worker_id: Mutex<String>,
    healthy: AtomicBool,
    /// Told to drain by the router's drain endpoint (or draining by its own Health).
    draining: AtomicBool,
    /// Prompt plus maximum new tokens of the requests the router has in flight there.
    outstanding_tokens: AtomicU64,
    in_flight: AtomicUsize,
    stats: Mutex<Option<proto::StatsResponse>>,
}

impl WorkerEntry {
    pub fn role(&self) -> Option<Role> {
        self.role.lock().ok().and_then(|r| *r)
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.lock().map(|w| w.clone()).unwrap_or_default()
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn outstanding_tokens(&self) -> u64 {
        self.outstanding_tokens.load(Ordering::Relaxed)
    }

    /// The last Stats the health loop read.
    pub fn stats(&self) -> Option<proto::StatsResponse> {
        self.stats.lock().ok().and_then(|s| s.clone())
    }

    /// No new work for this worker (the router's side of a drain; `Pool::drain` also tells the
    /// worker).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Takes the worker out of rotation until the health loop sees it serving again.
    pub fn mark_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }

    /// After a failed call: a status that says the worker is gone (unavailable, or the
    /// connection broke) marks it unhealthy until its next good Health answer.
    pub fn failed_with(&self, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ) {
            self.mark_unhealthy();
        }
    }

    /// Counts `tokens` of work against this worker until the returned guard drops.
    pub fn charge(self: &Arc<Self>, tokens: u64) -> Charge {
        self.outstanding_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Charge {
            worker: self.clone(),
            tokens,
        }
    }

    /// Test double: sets what the health loop would have read.
    #[cfg(test)]
    pub(crate) fn fake(&self, role: Role, healthy: bool, stats: Option<proto::StatsResponse>) {
        if let Ok(mut r) = self.role.lock() {
            *r = Some(role);
        }
        self.healthy.store(healthy, Ordering::Relaxed);
        if let Ok(mut s) = self.stats.lock() {
            *s = stats;
        }
    }

    async fn probe(&self) {
        let mut c = self.client.clone();
        let health =
            tokio::time::timeout(Duration::from_secs(2), c.health(proto::HealthRequest {})).await;
        match health {
            Ok(Ok(h)) => {
                let h = h.into_inner();
                if let Ok(mut r) = self.role.lock() {
                    *r = h.role.parse().ok();
                }
                if let Ok(mut w) = self.worker_id.lock() {
                    w.clone_from(&h.worker_id);
                }
                let serving = h.status == proto::health_response::Status::Serving as i32;
                let draining = h.status == proto::health_response::Status::Draining as i32;
                if draining {
                    self.draining.store(true, Ordering::Relaxed);
                }
                let was = self.healthy.swap(serving || draining, Ordering::Relaxed);
                if !was && (serving || draining) {
                    tracing::info!(worker = %self.url, role = %h.role, "worker is healthy");
                }
            }
            _ => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(worker = %self.url, "worker stopped answering; out of rotation");
                }
                return;
            }
        }
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), c.stats(proto::StatsRequest {})).await
            && let Ok(mut st) = self.stats.lock()
        {
            *st = Some(s.into_inner());
        }
    }
}

/// Work counted against a worker; released on drop.
pub struct Charge {
    worker: Arc<WorkerEntry>,
    tokens: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.worker
            .outstanding_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        self.worker.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The registry.
#[derive(Default)]
pub struct Pool {
    workers: RwLock<Vec<Arc<WorkerEntry>>>,
}

impl Pool {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds a worker (no-op if present) and probes it once. The connection is lazy: a worker
    /// that is not up yet is added unhealthy and joins when it answers.
    pub async fn add(&self, url: &str) -> Result<Arc<WorkerEntry>, String> {
        if let Some(w) = self.get(url) {
            return Ok(w);
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("bad worker URL {url:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .initial_stream_window_size(Some(dopd_protocol::H2_WINDOW))
            .initial_connection_window_size(Some(dopd_protocol::H2_WINDOW));
        let client = WorkerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(dopd_protocol::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(dopd_protocol::MAX_MESSAGE_BYTES);
        let w = Arc::new(WorkerEntry {
            url: url.to_string(),
            client,
            role: Mutex::new(None),
            worker_id: Mutex::new(String::new()),
            healthy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            outstanding_tokens: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            stats: Mutex::new(None),
        });
        w.probe().await;
        if let Ok(mut ws) = self.workers.write() {
            ws.push(w.clone());
        }
        Ok(w)
    }

    /// Removes a worker from the registry (in-flight requests keep their handle).
    pub fn remove(&self, url: &str) -> bool {
        self.workers.write().is_ok_and(|mut ws| {
            let n = ws.len();
            ws.retain(|w| w.url != url);
            ws.len() != n
        })
    }

    pub fn get(&self, url: &str) -> Option<Arc<WorkerEntry>> {
        self.all().into_iter().find(|w| w.url == url)
    }

    pub fn all(&self) -> Vec<Arc<WorkerEntry>> {
        self.workers.read().map(|w| w.clone()).unwrap_or_default()
    }

    /// Healthy, non-draining workers of one of `roles`, minus `exclude` (URLs).
    pub fn candidates(&self, roles: &[Role], exclude: &[String]) -> Vec<Arc<WorkerEntry>> {
        self.all()
            .into_iter()
            .filter(|w| {
                w.healthy()
                    && !w.draining()
                    && w.role().is_some_and(|r| roles.contains(&r))
                    && !exclude.contains(&w.url)
            })
            .collect()
    }

    /// The least-loaded candidate by outstanding tokens (the planner crate's rule).
    pub fn pick(&self, roles: &[Role], exclude: &[String]) -> Option<Arc<WorkerEntry>> {
        least_loaded(&self.candidates(roles, exclude))
    }

    /// Marks the workers whose URL or worker id is in `names` as draining (no new work); returns
    /// their views, unknown names left out.
    pub async fn drain(&self, names: &[String]) -> Vec<WorkerView> {
        let mut out = Vec::new();
        for w in self.all() {
            if names.contains(&w.url) || names.contains(&w.worker_id()) {
                w.draining.store(true, Ordering::Relaxed);
                // Tell the worker too, so it refuses work from anyone else.
                let mut c = w.client.clone();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), c.drain(proto::DrainRequest {}))
                        .await;
                out.push(view(&w));
            }
        }
        out
    }

    pub fn views(&self) -> Vec<WorkerView> {
        self.all().iter().map(|w| view(w)).collect()
    }

    /// Probes every worker once.
    pub async fn probe_all(&self) {
        let mut set = tokio::task::JoinSet::new();
        for w in self.all() {
            set.spawn(async move { w.probe().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Probes every worker every `every` until the pool is dropped.
    pub fn spawn_health_loop(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                pool.probe_all().await;
            }
        });
    }
}

/// The least-loaded of `workers` by outstanding tokens (the planner crate's rule, ties to the
/// first).
pub fn least_loaded(workers: &[Arc<WorkerEntry>]) -> Option<Arc<WorkerEntry>> {
    let loads: Vec<f64> = workers
        .iter()
        .map(|w| w.outstanding_tokens() as f64)
        .collect();
    dopd_planner::routing::least_loaded(&loads).map(|i| workers[i].clone())
}

/// What the router knows of one worker.
pub fn view(w: &WorkerEntry) -> WorkerView {
    let s = w.stats();
    WorkerView {
        url: w.url.clone(),
        worker_id: w.worker_id(),
        role: w.role(),
        healthy: w.healthy(),
        draining: w.draining(),
        in_flight: w.in_flight(),
        outstanding_tokens: w.outstanding_tokens(),
        kv_blocks_used: s.as_ref().map(|s| s.kv_blocks_used),
        kv_blocks_free: s.as_ref().map(|s| s.kv_blocks_free),
        waiting: s.as_ref().map(|s| s.waiting),
        kv_degraded: s.as_ref().map(|s| s.kv_degraded),
    }
}
