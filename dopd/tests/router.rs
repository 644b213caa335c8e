//! `dopd router` in front of real SmolLM2 worker processes on loopback: the OpenAI endpoints
//! (whole and streamed answers, errors in OpenAI's envelope), length-aware routing with its
//! counters, the planner's load endpoint, draining, and a decode worker killed mid-stream.

use std::io::{BufRead, BufReader, Read};

use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{MODEL, Proc, get, http, http_raw, post, send};

const NAME: &str = "SmolLM2-135M-Instruct.Q4_1";

/// Starts `dopd <args>` and returns it with the `host:port` after `marker` in its first line.
fn start(args: &[&str], marker: &str) -> (Proc, String) {
    let (p, line) = common::spawn(args);
    let addr = common::addr_after(&line, marker)
        .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"));
    (p, addr)
}

fn worker(role: &str) -> (Proc, String) {
    let (p, a) = start(
        &[
            "worker",
            "--role",
            role,
            "--model",
            MODEL,
            "--listen",
            "127.0.0.1:0",
            "--kv-blocks",
            "256",
        ],
        "listening on ",
    );
    (p, format!("http://{a}"))
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn wait_healthy(addr: &str, decode: usize) {
    let t = Instant::now();
    loop {
        let (s, b) = get(addr, "/health");
        let v: Value = serde_json::from_str(&b).unwrap_or_default();
        if s == 200 && v["decode_workers"].as_u64() == Some(decode as u64) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "router never healthy: {b}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[test]
fn the_openai_api_routes_by_length_and_reports_load() {
    let (_p, pre) = worker("prefill");
    let (_d, dec) = worker("decode");
    let workers = format!("{pre},{dec}");
    let (_r, addr) = start(
        &[
            "router",
            "--model",
            MODEL,
            "--listen",
            "127.0.0.1:0",
            "--worker",
            &workers,
            "--ultra-short-max-isl",
            "8",
        ],
        "on http://",
    );
    wait_healthy(&addr, 1);

    // A whole chat answer (prompt above the ultra-short cap: prefilled remotely).
    let (s, v) = post(
        &addr,
        "/v1/chat/completions",
        chat("What is the capital of France?", 24),
    );
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(text.contains("Paris"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64() > Some(8) && u["completion_tokens"].as_u64() > Some(0));
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(
            u["prompt_tokens"].as_u64().unwrap_or(0) + u["completion_tokens"].as_u64().unwrap_or(0)
        )
    );

    // The same, streamed: the deltas add up to the same text, then [DONE].
    let mut req = chat("What is the capital of France?", 24);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (s, head, body) = http(&addr, "POST", "/v1/chat/completions", Some(&req));
    assert_eq!(s, 200);
    assert!(head.contains("text/event-stream"), "{head}");
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("JSON chunk"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string())
    );
    assert!(
        chunks
            .last()
            .is_some_and(|c| c["usage"]["completion_tokens"].as_u64() > Some(0))
    );

    // A completion with an ultra-short prompt (prefilled on the decode worker), streamed.
    let (s, _, body) = http(
        &addr,
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": NAME, "prompt": "Paris is", "max_tokens": 5, "temperature": 0,
                     "stream": true}),
        ),
    );
    assert_eq!(s, 200);
    let ev = events(&body);
    let streamed: String = ev[..ev.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert!(!streamed.trim().is_empty(), "{body}");

    // Errors in OpenAI's envelope.
    let (s, _, b) = http(&addr, "POST", "/v1/chat/completions", None);
    assert_eq!(s, 400, "{b}");
    let (s, _, b) = http_raw(&addr, "POST", "/v1/completions", "{not json");
    assert_eq!(s, 400);
    assert!(b.contains("invalid JSON"), "{b}");
    let mut bad = chat("hi", 4);
    bad["model"] = json!("gpt-4");
    let (s, v) = post(&addr, "/v1/chat/completions", bad);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{v}"
    );
    let mut bad = chat("hi", 4);
    bad["temperature"] = json!(5);
    let (s, v) = post(&addr, "/v1/chat/completions", bad);
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("temperature")),
        "{v}"
    );
    let (s, v) = post(&addr, "/v1/chat/completions", chat("hi", 100_000));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );

    // Models, metrics with routing reasons, and the planner's load.
    let (s, b) = get(&addr, "/v1/models");
    assert_eq!(s, 200);
    assert!(b.contains(NAME));
    let (_, m) = get(&addr, "/metrics");
    assert!(m.contains("dopd_router_routing_decisions_total{class=\"ultra_short\",route=\"local\",reason=\"ultra_short\"} 1"), "{m}");
    assert!(m.contains("route=\"disaggregated\""), "{m}");
    let (s, b) = get(&addr, "/v1/dopd/load");
    assert_eq!(s, 200);
    let load: Value = serde_json::from_str(&b).expect("JSON");
    // Three requests were scheduled (the invalid ones never reached a worker).
    assert_eq!(load["arrived"].as_u64(), Some(3), "{load}");
    assert_eq!(load["finished"].as_u64(), Some(3), "{load}");
    assert_eq!(load["failed"].as_u64(), Some(0), "{load}");
    assert!(load["prompt_tokens"].as_u64() > Some(3), "{load}");
    assert_eq!(load["ttft_s"]["count"].as_u64(), Some(3), "{load}");
    assert_eq!(load["workers"].as_array().map(Vec::len), Some(2));
    // Counts since the start: reading again (anyone may) changes nothing.
    let (_, b) = get(&addr, "/v1/dopd/load");
    let again: Value = serde_json::from_str(&b).expect("JSON");
    for k in [
        "epoch",
        "arrived",
        "prompt_tokens",
        "finished",
        "output_tokens",
        "ttft_s",
    ] {
        assert_eq!(again[k], load[k], "{k}");
    }

    // Draining the only decode worker: no new work goes there.
    let (s, v) = post(&addr, "/v1/dopd/drain", json!({"workers": [dec]}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["draining"][0]["in_flight"].as_u64(), Some(0));
    let (s, v) = post(&addr, "/v1/chat/completions", chat("What is 2+2?", 4));
    assert_eq!(s, 503, "{v}");
    let (s, _) = post(
        &addr,
        "/v1/dopd/drain",
        json!({"workers": ["http://nowhere:1"]}),
    );
    assert_eq!(s, 404);
}

/// The text of a streamed chat answer's SSE body, and whether it carried an error event.
fn streamed_text(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut error = false;
    for e in events(body) {
        let Ok(v) = serde_json::from_str::<Value>(&e) else {
            continue;
        };
        error |= v.get("error").is_some();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    (text, error)
}

#[test]
fn a_decode_worker_killed_mid_stream_is_resumed_elsewhere_and_the_client_sees_one_stream() {
    let (_p, pre) = worker("prefill");
    let (d1, dec1) = worker("decode");
    let (d2, dec2) = worker("decode");
    let mut decs = vec![(d1, dec1.clone()), (d2, dec2.clone())];
    let workers = format!("{pre},{dec1},{dec2}");
    let (_r, addr) = start(
        &[
            "router",
            "--model",
            MODEL,
            "--listen",
            "127.0.0.1:0",
            "--worker",
            &workers,
            "--health-interval",
            "200ms",
        ],
        "on http://",
    );
    wait_healthy(&addr, 2);
    // A long streamed answer, greedy: first undisturbed.
    let mut req = chat("Write a long story about a dragon.", 160);
    req["stream"] = json!(true);
    let (s, _, body) = http(&addr, "POST", "/v1/chat/completions", Some(&req));
    assert_eq!(s, 200);
    let (undisturbed, error) = streamed_text(&body);
    assert!(!error && undisturbed.len() > 100, "{body}");

    // Again, and the decode worker serving it is killed once some text has streamed.
    let s = send(&addr, "POST", "/v1/chat/completions", &req.to_string());
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("stream") > 0,
            "stream ended early"
        );
        head.push_str(&line);
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            seen += 1;
        }
    }
    let (_, b) = get(&addr, "/v1/dopd/workers");
    let v: Value = serde_json::from_str(&b).expect("JSON");
    let busy = v["workers"]
        .as_array()
        .and_then(|ws| {
            ws.iter()
                .find(|w| w["in_flight"].as_u64() > Some(0) && w["role"] == "decode")
        })
        .and_then(|w| w["url"].as_str())
        .expect("a busy decode worker")
        .to_string();
    let i = decs
        .iter()
        .position(|(_, u)| *u == busy)
        .expect("one of ours");
    let (victim, _) = decs.remove(i);
    drop(victim);
    // The stream goes on from the other decode worker: no error, the same text to the byte.
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let all = head + &rest;
    let (text, error) = streamed_text(&all);
    assert!(!error, "{all}");
    assert!(all.contains("[DONE]"), "{all}");
    assert_eq!(text, undisturbed);
    // Counted: one resume, no stream error, in the metrics and the planner's load endpoint.
    let (_, m) = get(&addr, "/metrics");
    assert!(m.contains("dopd_router_resumes_total 1"), "{m}");
    assert!(m.contains("dopd_router_stream_errors_total 0"), "{m}");
    let (_, load) = get(&addr, "/v1/dopd/load");
    let load: Value = serde_json::from_str(&load).expect("JSON");
    assert_eq!(load["resumed"], 1, "{load}");
    // The router keeps serving on the other decode worker.
    let (s, v) = post(
        &addr,
        "/v1/chat/completions",
        chat("What is the capital of France?", 24),
    );
    assert_eq!(s, 200, "{v}");
}
