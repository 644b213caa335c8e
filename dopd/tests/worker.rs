//! `dopd worker` processes on loopback with the real SmolLM2 model: a mixed worker answers a chat
//! prompt, and a prefill worker plus a decode worker (KV blocks handed over gRPC) produce exactly
//! the mixed worker's text. `dopd generate` is the client.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

/// A worker process, killed on drop.
struct Worker {
    child: Child,
    url: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker(role: &str) -> Worker {
    assert!(
        std::path::Path::new(MODEL).exists(),
        "{MODEL} is missing — run scripts/setup.sh"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_dopd"))
        .args([
            "worker",
            "--role",
            role,
            "--model",
            MODEL,
            "--listen",
            "127.0.0.1:0",
            "--kv-blocks",
            "256",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dopd worker starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("reads the banner");
    let addr = line
        .rsplit("listening on ")
        .next()
        .map(str::trim)
        .filter(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Worker {
        child,
        url: format!("http://{addr}"),
    }
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

#[test]
fn mixed_and_disaggregated_workers_give_the_same_answer() {
    let mixed = worker("mixed");
    let pre = worker("prefill");
    let dec = worker("decode");
    let a = generate(&["--worker", &mixed.url]);
    assert!(a.contains("Paris"), "answer: {a:?}");
    let b = generate(&["--worker", &dec.url, "--prefill-worker", &pre.url]);
    assert_eq!(a, b);
    // The decode worker really pulled the blocks (a recompute would give the same text).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (d, p) = rt.block_on(async {
        let stats = |url: String| async move {
            dopd_worker::service::connect(url)
                .await
                .expect("connects")
                .stats(dopd_worker::service::proto::StatsRequest {})
                .await
                .expect("stats")
                .into_inner()
        };
        (stats(dec.url.clone()).await, stats(pre.url.clone()).await)
    });
    assert_eq!((d.kv_pulls, d.kv_recomputes), (1, 0), "{d:?}");
    assert!(d.kv_pull_bytes > 0);
    assert_eq!(p.kv_leases_pinned, 0, "the lease was released");
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
