//! The `dopd` binary end to end: arguments in, text or JSON out, clear errors on bad input.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn dopd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dopd"))
        .args(args)
        .output()
        .expect("dopd runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file in a fresh temporary directory, removed with the guard.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dopd-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

const PAPER_PROFILE: &str = "\
name: paper-example
prefill: { isl: [1.0], ttft_s: [0.15] }
decode: { concurrency: [1.0], context: [1.0], tpot_s: [[0.040]] }
kv: { blocks: 2040, block_size: 128, bytes_per_token: 327680 }
gpus: { prefill: 1, decode: 2 }
startup_s: { prefill: 30.0, decode: 45.0 }
";

#[test]
fn plan_reproduces_the_papers_worked_example() {
    let profile = TempFile::new("profile.yaml", PAPER_PROFILE);
    let out = dopd(&[
        "plan",
        "--profile",
        profile.path(),
        "--isl",
        "1000",
        "--osl",
        "245",
        "--requests",
        "300",
        "--budget",
        "8",
        "--budget-rule",
        "paper-loop",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["b_max"], 226);
    assert!((v["r_star"].as_f64().expect("r*") - 3.46).abs() < 0.005);
    assert_eq!(
        v["unconstrained"],
        serde_json::json!({ "prefill": 7, "decode": 2 })
    );
    assert_eq!(
        v["replicas"],
        serde_json::json!({ "prefill": 5, "decode": 1 })
    );
    assert!(
        v["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r["reason"] == "budget")
    );
}

#[test]
fn plan_prints_the_binding_constraints_as_text() {
    let out = dopd(&[
        "plan",
        "--isl",
        "1000",
        "--osl",
        "245",
        "--requests",
        "300",
        "--budget",
        "8",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("B_max") && text.contains("\"reason\":\"kv_capacity\""),
        "{text}"
    );
}

#[test]
fn plan_rejects_bad_numbers_and_names() {
    let out = dopd(&["plan", "--isl", "-5", "--osl", "245", "--requests", "3"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--isl"), "{}", stderr(&out));
    let out = dopd(&[
        "plan",
        "--isl",
        "5",
        "--osl",
        "5",
        "--requests",
        "3",
        "--preset",
        "gpt-9",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown preset \"gpt-9\""),
        "{}",
        stderr(&out)
    );
}

fn small_trace() -> String {
    let mut s = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\r\n");
    for i in 0..600u32 {
        let sec = i / 5;
        s += &format!(
            "2023-11-16 18:{:02}:{:02}.{:07},{},{}\r\n",
            sec / 60,
            sec % 60,
            i * 13 % 1000,
            100 + i % 900,
            10 + i % 50
        );
    }
    s
}

#[test]
fn forecast_backtests_every_predictor_on_all_three_series() {
    let trace = TempFile::new("trace.csv", &small_trace());
    let out = dopd(&[
        "forecast",
        "--trace",
        trace.path(),
        "--interval",
        "10s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["requests"], 600);
    assert_eq!(v["intervals"], 12);
    let results = v["results"].as_array().expect("results");
    assert_eq!(
        results.len(),
        15,
        "3 series x 5 predictors (the scorecard among them)"
    );
    for r in results {
        assert_eq!(r["scored"], 7, "{r}");
        assert!(r["rmse"].as_f64().expect("rmse").is_finite(), "{r}");
    }
    // Five requests per second, every interval: the count series is constant, so every
    // predictor is exact on it.
    for r in results.iter().filter(|r| r["series"] == "count") {
        assert_eq!(r["rmse"].as_f64(), Some(0.0), "{r}");
    }
}

#[test]
fn forecast_writes_a_plot_on_request() {
    let trace = TempFile::new("trace.csv", &small_trace());
    let svg = trace.0.with_file_name("forecast.svg");
    let out = dopd(&[
        "forecast",
        "--trace",
        trace.path(),
        "--predictor",
        "last",
        "--plot",
        svg.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&svg).expect("plot written");
    assert!(
        text.starts_with("<svg") && text.contains(">last<") && text.contains("mean input length")
    );
    assert_eq!(
        text.matches("<path").count(),
        6,
        "3 panels x (actual + last)"
    );
}

#[test]
fn forecast_names_the_bad_line_of_a_trace() {
    let trace = TempFile::new(
        "bad.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,10,3\n2023-11-16 18:17:04.1,ten,3\n",
    );
    let out = dopd(&["forecast", "--trace", trace.path()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("line 3") && err.contains("ContextTokens"),
        "{err}"
    );
    let out = dopd(&["forecast", "--trace", "/nonexistent/trace.csv"]);
    assert!(
        stderr(&out).contains("cannot read trace"),
        "{}",
        stderr(&out)
    );
    let out = dopd(&[
        "forecast",
        "--trace",
        trace.path(),
        "--predictor",
        "prophet",
    ]);
    assert!(
        stderr(&out).contains("unknown predictor"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn roofline_presets_round_trip_through_profile_check() {
    let out = dopd(&["profile", "roofline", "--preset", "llama-3.3-70b-fp8-h100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = TempFile::new("llama.yaml", &stdout(&out));
    let out = dopd(&["profile", "check", file.path()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ok"), "{}", stdout(&out));
}

#[test]
fn profile_check_names_the_bad_field() {
    let bad = PAPER_PROFILE.replace("blocks: 2040", "blocks: 0");
    let file = TempFile::new("bad.yaml", &bad);
    let out = dopd(&["profile", "check", file.path()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("kv.blocks"), "{}", stderr(&out));
}

#[test]
fn sim_compare_runs_every_policy_on_the_same_workload() {
    let trace = TempFile::new("trace.csv", &small_trace());
    let out = dopd(&[
        "sim",
        "compare",
        "--trace",
        trace.path(),
        "--policies",
        "dopd,static:1x1,aggregated:2,dopd-no-bypass",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let rows = v.as_array().expect("one summary per policy");
    assert_eq!(rows.len(), 4);
    for r in rows {
        assert_eq!(r["requests"], 600, "{r}");
        let att = r["slo_attainment"].as_f64().expect("attainment");
        assert!((0.0..=1.0).contains(&att), "{r}");
        assert!(r["gpu_seconds"].as_f64().expect("gpu-s") > 0.0, "{r}");
    }
    assert_eq!(rows[1]["policy"], "static:1x1");

    let dir = trace.0.with_file_name("plots");
    let out = dopd(&[
        "sim",
        "compare",
        "--trace",
        trace.path(),
        "--policies",
        "dopd,dyn-load",
        "--plot-dir",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (f, line) in [
        ("load.svg", ">dopd forecast<"),
        ("instances.svg", ">dyn-load<"),
        ("ttft.svg", ">dyn-load<"),
    ] {
        let svg = std::fs::read_to_string(dir.join(f)).expect(f);
        assert!(svg.starts_with("<svg") && svg.contains(line), "{f}");
    }
}

#[test]
fn sim_run_writes_per_request_records_and_the_decisions_with_their_reasons() {
    let trace = TempFile::new("trace.csv", &small_trace());
    let csv = trace.0.with_file_name("records.csv");
    let jsonl = trace.0.with_file_name("decisions.jsonl");
    let out = dopd(&[
        "sim",
        "run",
        "--trace",
        trace.path(),
        "--policy",
        "dopd",
        "--records",
        csv.to_str().expect("utf-8"),
        "--decisions",
        jsonl.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("dopd"));
    let text = std::fs::read_to_string(&csv).expect("records written");
    assert_eq!(text.lines().count(), 601, "header + one line per request");
    let text = std::fs::read_to_string(&jsonl).expect("decisions written");
    let steps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(steps.len() > 3, "{} control steps", steps.len());
    let decided: Vec<&serde_json::Value> =
        steps.iter().filter(|s| !s["decision"].is_null()).collect();
    assert!(!decided.is_empty());
    for d in decided {
        let d = &d["decision"];
        assert!(
            d["target"]["prefill"].as_u64().is_some_and(|p| p >= 1),
            "{d}"
        );
        assert!(
            d["reasons"].as_array().is_some_and(|r| !r.is_empty()),
            "{d}"
        );
    }
    // The ticks come in time order.
    let at: Vec<f64> = steps
        .iter()
        .map(|s| s["at"].as_f64().expect("a time"))
        .collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn sim_rejects_unknown_policies_before_running() {
    let trace = TempFile::new("trace.csv", &small_trace());
    let out = dopd(&[
        "sim",
        "compare",
        "--trace",
        trace.path(),
        "--policies",
        "dopd,magic",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown policy \"magic\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sim_replays_a_seeded_synthetic_workload() {
    let spec = TempFile::new(
        "w.yaml",
        "seed: 3\nrequests: 300\narrivals: { kind: gamma, rate: 4.0, cv: 2.0 }\n\
         isl: { kind: log-normal, mean: 800.0, sigma: 0.8, max: 8000 }\nosl: { kind: zipf, max: 400, exponent: 1.1 }\n",
    );
    let run = || {
        dopd(&[
            "sim",
            "run",
            "--synthetic",
            spec.path(),
            "--policy",
            "dopd",
            "--json",
        ])
    };
    let (a, b) = (run(), run());
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b), "same seed, same output");
    let v: serde_json::Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(v["summary"]["requests"], 300);
    assert!(!v["intervals"].as_array().expect("time series").is_empty());
    let bad = TempFile::new(
        "bad.yaml",
        "seed: 1\nrequests: 5\narrivals: { kind: poisson, rate: -2 }\nisl: { kind: constant, value: 5 }\nosl: { kind: constant, value: 5 }\n",
    );
    let out = dopd(&["sim", "run", "--synthetic", bad.path()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("arrivals"), "{}", stderr(&out));
}
