//! The router's HTTP front: authorization, per-key bounds, admission, body limits, load
//! readings and fuzzed request bodies, against a router with no workers.

use super::*;
use axum::body::Body;
use axum::http::Request;
use proptest::strategy::Strategy;
use tower::ServiceExt;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

/// A router with no workers (requests that pass the front checks then find none).
fn router(api_key: Option<&str>, max_waiting: usize) -> Arc<Router> {
    let (tok, c, _) = dopd_model::load_tokenizer(std::path::Path::new(MODEL))
        .expect("the test model (scripts/setup.sh)");
    Router::new(
        RouterConfig {
            model: "m".into(),
            context: c.context,
            max_waiting,
            api_keys: api_key.map(String::from).into_iter().collect(),
            max_streams_per_key: 2,
            schedule: ScheduleConfig::default(),
        },
        tok,
        Pool::new(),
    )
}

async fn call(r: &Arc<Router>, key: Option<&str>) -> Response {
    let mut req = Request::post("/v1/chat/completions").header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body =
        r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#;
    app(r.clone())
        .oneshot(req.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible")
}

async fn json(resp: Response) -> Value {
    let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    serde_json::from_slice(&b).expect("JSON")
}

/// A JSON value of any shape, with the OpenAI request's field names among its keys.
fn arb_json() -> impl Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,12}".prop_map(Value::from),
        Just(Value::from("m")),
        Just(Value::from("user")),
    ];
    let keys = prop::sample::select(vec![
        "model",
        "messages",
        "prompt",
        "role",
        "content",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "include_usage",
        "n",
        "type",
        "text",
        "ignore_eos",
        "x",
    ]);
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

    /// Any body, JSON or not, gets an answer in OpenAI's error envelope (no worker is
    /// there to serve the valid ones: 503), never a panic or a bare text error.
    #[test]
    fn any_request_body_gets_an_openai_answer(
        body in proptest::prop_oneof![
            arb_json().prop_map(|v| v.to_string()),
            "\\PC{0,64}",
        ],
        chat in proptest::prelude::any::<bool>(),
    ) {
        let (rt, r) = fuzz_router();
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, v) = rt.block_on(async {
            let req = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .expect("request");
            let resp = app(r.clone()).oneshot(req).await.expect("infallible");
            let status = resp.status();
            let b = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
            (status, serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
        });
        proptest::prop_assert!(
            [400, 404, 413, 503].contains(&status.as_u16()),
            "{status} for {body}"
        );
        proptest::prop_assert!(v["error"]["message"].is_string(), "{status} {v} for {body}");
    }
}

/// One runtime and router for all the fuzz cases (loading the tokenizer once).
fn fuzz_router() -> &'static (tokio::runtime::Runtime, Arc<Router>) {
    static R: std::sync::OnceLock<(tokio::runtime::Runtime, Arc<Router>)> =
        std::sync::OnceLock::new();
    R.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let r = {
            let _in = rt.enter();
            router(None, 1 << 20)
        };
        (rt, r)
    })
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_in_openais_envelope() {
    let r = router(None, 8);
    let big = format!(
        r#"{{"model": "m", "prompt": "{}", "max_tokens": 4}}"#,
        "a".repeat(12 << 20)
    );
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(big))
        .expect("request");
    let resp = app(r).oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json(resp).await["error"]["message"].is_string());
}

#[tokio::test]
async fn an_api_key_is_required_when_configured() {
    let r = router(Some("sekrit"), 8);
    let resp = call(&r, None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json(resp).await["error"]["code"], "invalid_api_key");
    assert_eq!(
        call(&r, Some("wrong")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // The right key passes the check (then no worker can serve: 503).
    let resp = call(&r, Some("sekrit")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn each_api_key_has_its_own_bound_on_requests_in_flight() {
    let mut r = router(Some("alice"), 8);
    Arc::get_mut(&mut r)
        .expect("only one")
        .cfg
        .api_keys
        .push("bob".into());
    // Alice has two requests in flight (the test router's bound): a third is refused.
    let held: Vec<KeySlot> = (0..2)
        .map(|_| {
            admit_key(&r, Some("alice".into()))
                .expect("within the bound")
                .expect("a key")
        })
        .collect();
    let resp = call(&r, Some("alice")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let v = json(resp).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 requests in flight")),
        "{v}"
    );
    // Bob is not held back by Alice (then no worker can serve: 503).
    assert_eq!(
        call(&r, Some("bob")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A request that ended gave its place back; one that failed held none.
    drop(held);
    assert_eq!(
        call(&r, Some("alice")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(r.per_key.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn over_the_admission_bound_the_answer_is_429_with_retry_after() {
    let r = router(None, 2);
    r.starting.store(2, Ordering::Relaxed);
    let resp = call(&r, None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(json(resp).await["error"]["type"], "rate_limit_error");
    r.starting.store(0, Ordering::Relaxed);
    assert_eq!(
        call(&r, None).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

async fn read_load(r: &Arc<Router>) -> dopd_protocol::load::LoadSnapshot {
    let resp = app(r.clone())
        .oneshot(
            Request::get("/v1/dopd/load")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    serde_json::from_value(json(resp).await).expect("a load snapshot")
}

async fn send(r: &Arc<Router>, words: usize) {
    let text = vec!["word"; words].join(" ");
    let body = json!({"model": "m", "max_tokens": 4,
                      "messages": [{"role": "user", "content": text}]});
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    // No worker: admitted, counted, then failed.
    let resp = app(r.clone()).oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// The planner's decisions over a scripted load, read through `GET /v1/dopd/load`, with or
/// without another client reading the endpoint in between.
async fn decisions(second_reader: bool) -> Vec<dopd_planner::sizing::Replicas> {
    use dopd_planner::control::{ControlConfig, Controller, Instance, Order, Orders, Snapshot};
    use dopd_planner::planner::{Planner, PlannerConfig};
    use dopd_planner::profile::{PerRole, Profile, Role};
    let r = router(None, 64);
    // The paper's sizing follows a load this small (the SLO-aware one rightly keeps one
    // instance per role for it); either reads the same observations.
    let mut cfg = PlannerConfig {
        policy: dopd_planner::planner::PolicyKind::DopdPaper,
        predictor: dopd_planner::forecast::ForecasterKind::Last,
        scale_down_stabilization_s: 0.0,
        ..PlannerConfig::default()
    };
    cfg.sizing.gpu_budget = 16;
    let profile = Profile::constant_latency(0.5, 0.05, 64, 16);
    let one = PerRole {
        prefill: 1,
        decode: 1,
    };
    let mut c = Controller::new(
        Planner::new(profile, cfg).expect("planner"),
        ControlConfig::default(),
        one,
    );
    let mut instances = vec![
        Instance::ready("p0", Role::Prefill),
        Instance::ready("d0", Role::Decode),
    ];
    let mut out = Vec::new();
    for k in 0..6u32 {
        for j in 0..(2 + 3 * (k % 3)) {
            send(&r, 5 + 40 * j as usize).await;
            if second_reader {
                read_load(&r).await;
            }
        }
        let snap = Snapshot {
            load: Some(read_load(&r).await.reading),
            instances: instances.clone(),
            known_next: None,
        };
        let mut orders = Orders::default();
        let step = c.step(f64::from(k) * 10.0, &snap, &mut orders);
        if let Some(t) = step.tick {
            out.push(t.decision.target);
        }
        // Instances follow the orders at once.
        for o in orders.0 {
            match o {
                Order::SetCount { role, serving, .. } => {
                    let have = instances.iter().filter(|i| i.role == role).count();
                    for n in have..serving as usize {
                        instances.push(Instance::ready(format!("{role}{n}"), role));
                    }
                }
                Order::Drain { ids, .. } | Order::Retire { ids, .. } => {
                    instances.retain(|i| !ids.contains(&i.id));
                }
                _ => {}
            }
        }
    }
    out
}

#[tokio::test]
async fn a_second_reader_of_the_load_leaves_the_planners_decisions_unchanged() {
    let alone = decisions(false).await;
    assert_eq!(alone.len(), 5);
    assert!(
        alone.windows(2).any(|w| w[0] != w[1]),
        "the scripted load should move the targets: {alone:?}"
    );
    assert_eq!(alone, decisions(true).await);
}

#[tokio::test]
async fn load_readings_are_cumulative_and_reading_changes_nothing() {
    let r = router(None, 8);
    send(&r, 3).await;
    send(&r, 30).await;
    let a = read_load(&r).await;
    let b = read_load(&r).await;
    assert_eq!(a.reading, b.reading);
    let t = &a.reading.totals;
    assert_eq!((t.arrived, t.failed, t.finished), (2, 2, 0));
    assert!(t.prompt_tokens > 33, "{t:?}");
    // Arrivals are timed on the router's clock: the second one left a gap.
    assert_eq!(t.gaps, 1, "{t:?}");
    assert!(t.last_arrival_s.is_some_and(|s| s >= 0.0), "{t:?}");
    send(&r, 3).await;
    let t = read_load(&r).await.reading.totals;
    assert_eq!((t.arrived, t.gaps), (3, 2));
}

#[tokio::test]
async fn the_planner_forecast_sets_the_short_long_threshold() {
    let r = router(None, 8);
    let post = |body: &'static str| {
        app(r.clone()).oneshot(
            Request::post("/v1/dopd/forecast")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("request"),
        )
    };
    let resp = post(r#"{"mean_isl": 812.5}"#).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["threshold"], 812.5);
    assert_eq!(r.scheduler.threshold(), 812.5);
    let resp = post(r#"{"mean_isl": -1}"#).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(resp).await["error"]["param"], "mean_isl");
    assert_eq!(r.scheduler.threshold(), 812.5);
}
