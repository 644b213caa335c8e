//! The operator's view of the world outside the API server: the router of each DopdService (what
//! the control loop observes: its cumulative load and its workers; and the routing half of the
//! actuator: drains and the short/long threshold) and the clock.
//!
//! Both are traits so the reconciler can be driven by a fake router and a manual clock in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dopd_protocol::load::LoadSnapshot;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::DopdService;

/// A boxed future (the traits are used as `dyn`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A call to the router that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request did not get an answer (connection refused, timeout, DNS).
    #[error("{call}: {source}")]
    Transport {
        call: String,
        #[source]
        source: reqwest::Error,
    },
    /// The router answered with an error status.
    #[error("{call}: HTTP {status}: {body}")]
    Status {
        call: String,
        status: u16,
        body: String,
    },
    /// The answer was not what the operator expects (another version of the router?).
    #[error("{call}: unexpected answer: {source}")]
    Decode {
        call: String,
        #[source]
        source: reqwest::Error,
    },
    /// Not reachable, for another reason (used by fakes).
    #[error("{0}")]
    Unavailable(String),
}

impl RouterError {
    /// Short kind for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transport { .. } | Self::Unavailable(_) => "unreachable",
            Self::Status { .. } => "status",
            Self::Decode { .. } => "decode",
        }
    }
}

/// What the operator asks a DopdService's router.
pub trait RouterApi: Send + Sync {
    /// Its cumulative counts, waiting requests and workers (`GET /v1/dopd/load`; reading
    /// changes nothing).
    fn load<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
    ) -> BoxFut<'a, Result<LoadSnapshot, RouterError>>;
    /// The short/long threshold for the next interval, a mean prompt length, and the largest
    /// prompt to prefill on a decode worker when the planner derives it
    /// (`POST /v1/dopd/forecast`).
    fn set_threshold<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        mean_isl: f64,
        ultra_short_max_isl: Option<u32>,
    ) -> BoxFut<'a, Result<(), RouterError>>;
    /// Stop routing to these workers (`POST /v1/dopd/drain`); unknown ones are not an error.
    fn drain<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        workers: &'a [String],
    ) -> BoxFut<'a, Result<(), RouterError>>;
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
        call: String,
        api_key: Option<&str>,
    ) -> Result<T, RouterError> {
        let req = match api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(source) => return Err(RouterError::Transport { call, source }),
        };
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default().trim().to_string();
            return Err(RouterError::Status {
                call,
                status: status.as_u16(),
                body,
            });
        }
        resp.json::<T>()
            .await
            .map_err(|source| RouterError::Decode { call, source })
    }
}

impl RouterApi for HttpRouter {
    fn load<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
    ) -> BoxFut<'a, Result<LoadSnapshot, RouterError>> {
        Box::pin(async move {
            let url = format!("{}/v1/dopd/load", self.base(svc));
            self.call(self.client.get(&url), format!("GET {url}"), api_key)
                .await
        })
    }

    fn set_threshold<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        mean_isl: f64,
        ultra_short_max_isl: Option<u32>,
    ) -> BoxFut<'a, Result<(), RouterError>> {
        Box::pin(async move {
            let url = format!("{}/v1/dopd/forecast", self.base(svc));
            let req = self.client.post(&url).json(&serde_json::json!({
                "mean_isl": mean_isl,
                "ultra_short_max_isl": ultra_short_max_isl,
            }));
            self.call::<serde_json::Value>(req, format!("POST {url}"), api_key)
                .await
                .map(|_| ())
        })
    }

    fn drain<'a>(
        &'a self,
        svc: &'a DopdService,
        api_key: Option<&'a str>,
        workers: &'a [String],
    ) -> BoxFut<'a, Result<(), RouterError>> {
        Box::pin(async move {
            let url = format!("{}/v1/dopd/drain", self.base(svc));
            let req = self
                .client
                .post(&url)
                .json(&serde_json::json!({ "workers": workers }));
            match self
                .call::<serde_json::Value>(req, format!("POST {url}"), api_key)
                .await
            {
                Ok(_) => Ok(()),
                // Workers the router has not discovered (yet or any more) take no traffic anyway.
                Err(RouterError::Status { status: 404, .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

/// The operator's time. The planner runs on `now` (monotonic seconds); status timestamps and
/// pod ages use `wall`. Nothing else in the reconciler reads a clock.
pub trait Clock: Send + Sync {
    fn now(&self) -> f64;
    fn wall(&self) -> Timestamp;
}

/// The process's clocks.
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
    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock tests move by hand: `now` starts at 0, `wall` at 2026-06-01T00:00:00Z, and both move
/// together.
pub struct ManualClock {
    t: Mutex<f64>,
    base: Timestamp,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self {
            t: Mutex::new(0.0),
            base: Timestamp::from_second(1_780_272_000).unwrap_or(Timestamp::UNIX_EPOCH),
        }
    }
}

impl ManualClock {
    pub fn advance(&self, s: f64) {
        if let Ok(mut t) = self.t.lock() {
            *t += s;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> f64 {
        self.t.lock().map(|t| *t).unwrap_or_default()
    }
    fn wall(&self) -> Timestamp {
        self.base
            .checked_add(SignedDuration::from_secs_f64(self.now()))
            .unwrap_or(self.base)
    }
}
