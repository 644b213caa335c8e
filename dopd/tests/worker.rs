//! `dopd worker` processes on loopback with the real SmolLM2 model: a mixed worker answers a chat
//! prompt, and a prefill worker plus a decode worker (KV blocks moved over gRPC, and over UCX
//! where libucp is installed) produce exactly the mixed worker's text; a prefill worker killed in
//! the middle of a transfer costs a local recompute, not the request. `dopd generate` is the
//! client.

use std::process::Command;
use std::time::{Duration, Instant};

use dopd_protocol::proto::StatsResponse;

mod common;

use common::{MODEL, Proc};

/// A worker process, killed on drop.
struct Worker {
    proc: Proc,
    url: String,
    /// `host:port` of its metrics endpoint, when started with `--metrics-listen`.
    metrics: Option<String>,
}

fn worker(role: &str, extra: &[&str]) -> Worker {
    let mut args = vec![
        "worker",
        "--role",
        role,
        "--model",
        MODEL,
        "--listen",
        "127.0.0.1:0",
        "--kv-blocks",
        "256",
    ];
    args.extend_from_slice(extra);
    let (proc, line) = common::spawn(&args);
    let addr = common::addr_after(&line, "listening on ")
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Worker {
        proc,
        url: format!("http://{addr}"),
        metrics: common::addr_after(&line, "metrics on http://"),
    }
}

/// `GET /metrics` over a plain HTTP/1.1 connection; the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics port");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

fn generate(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_dopd"))
        .arg("generate")
        .args(args)
        .args(["--model", MODEL, "--chat", "--max-tokens", "24"])
        .arg("What is the capital of France?")
        .output()
        .expect("dopd generate runs");
    assert!(
        o.status.success(),
        "dopd generate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stats(url: &str) -> StatsResponse {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        dopd_protocol::connect(url.to_string())
            .await
            .expect("connects")
            .stats(dopd_protocol::proto::StatsRequest {})
            .await
            .expect("stats")
            .into_inner()
    })
}

/// The KV transports to test: gRPC always, UCX where the library loads.
fn transports() -> Vec<&'static str> {
    match dopd_ucx::Ucx::start() {
        Ok(_) => vec!["grpc", "ucx"],
        Err(e) => {
            eprintln!("UCX cases skipped: {e}");
            vec!["grpc"]
        }
    }
}

#[test]
fn mixed_and_disaggregated_workers_give_the_same_answer() {
    let mixed = worker("mixed", &[]);
    let a = generate(&["--worker", &mixed.url]);
    assert!(a.contains("Paris"), "answer: {a:?}");
    for t in transports() {
        // Over UCX the decode worker expects RDMA ("rc"): loopback TCP must be flagged degraded.
        let expect: &[&str] = if t == "ucx" {
            &["--kv-expect-transports", "rc"]
        } else {
            &[]
        };
        let pre = worker("prefill", &["--kv-transport", t]);
        let dec = worker(
            "decode",
            &[
                &["--kv-transport", t, "--metrics-listen", "127.0.0.1:0"][..],
                expect,
            ]
            .concat(),
        );
        let b = generate(&["--worker", &dec.url, "--prefill-worker", &pre.url]);
        assert_eq!(a, b, "over {t}");
        // The decode worker really received the blocks (a recompute would give the same text).
        let d = stats(&dec.url);
        assert_eq!((d.kv_pulls, d.kv_recomputes), (1, 0), "{t}: {d:?}");
        assert!(d.kv_pull_bytes > 0);
        assert_eq!(d.kv_peers.len(), 1);
        let peer = &d.kv_peers[0];
        assert_eq!(
            (peer.peer.as_str(), peer.transport.as_str()),
            (&pre.url[..], t)
        );
        assert_eq!(peer.bytes, d.kv_pull_bytes);
        if t == "ucx" {
            assert!(peer.ucx_transports.iter().any(|x| x == "tcp"), "{peer:?}");
            assert!(peer.degraded && d.kv_degraded, "{peer:?}");
        } else {
            assert!(!peer.degraded && !d.kv_degraded);
        }
        assert_eq!(
            stats(&pre.url).kv_leases_pinned,
            0,
            "the lease was released"
        );
        // The same figures on /metrics, degraded flag included.
        let m = scrape(
            dec.metrics
                .as_deref()
                .expect("metrics address in the banner"),
        );
        let line = |name: &str| {
            m.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in\n{m}"))
                .to_string()
        };
        let value = |l: &str| -> f64 {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no value in {l}"))
        };
        assert_eq!(value(&line("dopd_worker_kv_pulls_total")), 1.0, "{m}");
        let degraded = line("dopd_worker_kv_peer_degraded");
        assert!(
            degraded.contains(&format!("transport=\"{t}\"")),
            "{degraded}"
        );
        let want = if t == "ucx" { 1.0 } else { 0.0 };
        assert_eq!(value(&degraded), want, "{degraded}");
    }
}

#[test]
fn a_prefill_worker_killed_mid_transfer_costs_a_recompute_not_the_request() {
    let mixed = worker("mixed", &[]);
    let want = generate(&["--worker", &mixed.url]);
    for t in transports() {
        // The prefill worker holds each transfer for 3 s; the decode worker's deadline is 20 s,
        // so only the broken connection (not the deadline) can end the transfer early.
        let mut pre = worker(
            "prefill",
            &["--kv-transport", t, "--fault-kv-send-delay", "3s"],
        );
        let dec = worker(
            "decode",
            &["--kv-transport", t, "--kv-transfer-deadline", "20s"],
        );
        let before = stats(&dec.url);
        let (d_url, p_url) = (dec.url.clone(), pre.url.clone());
        let client =
            std::thread::spawn(move || generate(&["--worker", &d_url, "--prefill-worker", &p_url]));
        // Wait until the prefill is done and its blocks are pinned: the decode worker is then
        // asking for them, and the prefill worker is holding the transfer.
        let t0 = Instant::now();
        while stats(&pre.url).kv_leases_pinned == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "prefill never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = pre.proc.0.kill();
        let killed = Instant::now();
        let got = client.join().expect("client thread");
        eprintln!(
            "{t}: prefill worker killed mid-transfer; the request finished {:?} later",
            killed.elapsed()
        );
        assert_eq!(got, want, "over {t}");
        let d = stats(&dec.url);
        assert_eq!(d.kv_pull_failures.get("transport"), Some(&1), "{t}: {d:?}");
        assert_eq!(d.kv_pull_failures.get("deadline"), None, "{t}: {d:?}");
        assert_eq!((d.kv_pulls, d.kv_recomputes), (0, 1));
        // No block leaked: the allocator is back where it started.
        assert_eq!(
            (d.kv_blocks_used, d.kv_blocks_free),
            (before.kv_blocks_used, before.kv_blocks_free)
        );
        assert_eq!(d.kv_peers[0].failures, 1);
    }
}

#[test]
fn a_missing_model_file_is_a_clear_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_dopd"))
        .args(["worker", "--model", "/nonexistent/model.gguf"])
        .output()
        .expect("runs");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}
