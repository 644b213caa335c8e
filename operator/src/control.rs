//! The operator's view of the world outside the API server: the router of each DopdService (the
//! planner's observer: its load report; and the drain half of the actuator) and the clock.
//!
//! Both are traits so the reconciler can be driven by a fake router and a manual clock in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dopd_router::load::LoadReport;
use dopd_router::pool::WorkerView;

use crate::crd::DopdService;

/// A boxed future (the traits are used as `dyn`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the operator asks a DopdService's router.
pub trait RouterApi: Send + Sync {
    /// The load since the previous read (`GET /v1/dopd/load`). Only the planner reads it.
    fn load<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
    ) -> BoxFut<'a, Result<LoadReport, String>>;
    /// Every worker the router knows, with its in-flight count (`GET /v1/dopd/workers`).
    fn workers<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
    ) -> BoxFut<'a, Result<Vec<WorkerView>, String>>;
    /// The forecast mean ISL of the next interval: the router's short/long threshold
    /// (`POST /v1/dopd/forecast`).
    fn set_forecast<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        mean_isl: f64,
    ) -> BoxFut<'a, Result<(), String>>;
    /// Stop routing to these workers (`POST /v1/dopd/drain`); unknown ones are not an error.
    fn drain<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        workers: &'a [String],
    ) -> BoxFut<'a, Result<(), String>>;
}

/// Talks to the router over HTTP. The URL comes from a template with `{name}`, `{namespace}` and
/// `{port}`; in a cluster it is the router Service's DNS name.
pub struct HttpRouter {
    client: reqwest::Client,
    template: String,
}

/// The in-cluster address of a DopdService's router.
pub const DEFAULT_ROUTER_URL: &str = "http://{name}-router.{namespace}.svc:{port}";

impl HttpRouter {
    pub fn new(template: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            client,
            template: template.to_string(),
        }
    }

    pub fn base(&self, svc: &DopdService) -> String {
        self.template
            .replace("{name}", svc.metadata.name.as_deref().unwrap_or_default())
            .replace(
                "{namespace}",
                svc.metadata.namespace.as_deref().unwrap_or_default(),
            )
            .replace("{port}", &svc.spec.router.port.to_string())
            .trim_end_matches('/')
            .to_string()
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
        api_key: Option<&str>,
    ) -> Result<T, String> {
        let req = match api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let resp = req.send().await.map_err(|e| format!("{what}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("{what}: HTTP {status}: {}", body.trim()));
        }
        resp.json::<T>()
            .await
            .map_err(|e| format!("{what}: unexpected answer: {e}"))
    }
}

impl RouterApi for HttpRouter {
    fn load<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
    ) -> BoxFut<'a, Result<LoadReport, String>> {
        Box::pin(async move {
            let url = format!("{}/v1/dopd/load", self.base(svc));
            self.call(self.client.get(&url), &format!("GET {url}"), api_key)
                .await
        })
    }

    fn workers<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
    ) -> BoxFut<'a, Result<Vec<WorkerView>, String>> {
        Box::pin(async move {
            #[derive(serde::Deserialize)]
            struct Workers {
                workers: Vec<WorkerView>,
            }
            let url = format!("{}/v1/dopd/workers", self.base(svc));
            let w: Workers = self
                .call(self.client.get(&url), &format!("GET {url}"), api_key)
                .await?;
            Ok(w.workers)
        })
    }

    fn set_forecast<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        mean_isl: f64,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            let url = format!("{}/v1/dopd/forecast", self.base(svc));
            let req = self
                .client
                .post(&url)
                .json(&serde_json::json!({ "mean_isl": mean_isl }));
            self.call::<serde_json::Value>(req, &format!("POST {url}"), api_key)
                .await
                .map(|_| ())
        })
    }

    fn drain<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        workers: &'a [String],
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            let url = format!("{}/v1/dopd/drain", self.base(svc));
            let req = self
                .client
                .post(&url)
                .json(&serde_json::json!({ "workers": workers }));
            match self
                .call::<serde_json::Value>(req, &format!("POST {url}"), api_key)
                .await
            {
                Ok(_) => Ok(()),
                // Workers the router has not discovered (yet or any more) take no traffic anyway.
                Err(e) if e.contains("HTTP 404") => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

/// Monotonic seconds for the planner (it never reads a clock itself).
pub trait Clock: Send + Sync {
    fn now(&self) -> f64;
}

/// The process's monotonic clock.
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// A clock tests move by hand.
#[derive(Default)]
pub struct ManualClock(Mutex<f64>);

impl ManualClock {
    pub fn advance(&self, s: f64) {
        if let Ok(mut t) = self.0.lock() {
            *t += s;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> f64 {
        self.0.lock().map(|t| *t).unwrap_or_default()
    }
}
