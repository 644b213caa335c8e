//! Driving any OpenAI-compatible endpoint: `dopd bench load` (replay a trace open-loop and
//! report TTFT/TPOT quantiles, goodput and SLO attainment) and `dopd profile measure` (TTFT over
//! prompt lengths and TPOT over concurrency and context, written as a planner/simulator
//! profile).
//!
//! Requests are streamed completions whose prompt is given as token ids (so its length is
//! exact) with `ignore_eos` (so the output length is the trace's), timed on arrival of each
//! chunk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::progress::Progress;

/// One streamed request's timings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Seconds from send to the first text.
    pub ttft_s: f64,
    /// Mean seconds per token after the first (0 with one token).
    pub tpot_s: f64,
    pub completion_tokens: u32,
    pub ok: bool,
}

/// A fixed, deterministic prompt of `n` token ids, different per `seed`.
pub fn prompt_ids(seed: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|j| (100 + (seed * 7919 + j * 104_729) % 29_000) as u32)
        .collect()
}

/// Asks the endpoint which model it serves (the first of `/v1/models`).
pub async fn served_model(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let v: Value = client
        .get(format!("{base}/models"))
        .send()
        .await
        .with_context(|| format!("GET {base}/models"))?
        .error_for_status()?
        .json()
        .await?;
    v["data"][0]["id"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("{base}/models lists no model"))
}

/// Sends one streamed completion and times it.
pub async fn timed(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    prompt: Vec<u32>,
    max_tokens: u32,
) -> Timing {
    let t0 = Instant::now();
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens.max(1), "temperature": 0,
        "stream": true, "ignore_eos": true, "stream_options": {"include_usage": true},
    });
    let Ok(mut resp) = client
        .post(format!("{base}/completions"))
        .json(&body)
        .send()
        .await
    else {
        return Timing::default();
    };
    if !resp.status().is_success() {
        return Timing::default();
    }
    let (mut first, mut last, mut tokens, mut done, mut failed) = (None, t0, 0u32, false, false);
    let mut buf = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if v.get("error").is_some() {
                    failed = true;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as u32;
                }
                if v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                }
            }
        }
    }
    let Some(first) = first else {
        return Timing::default();
    };
    Timing {
        ttft_s: first.duration_since(t0).as_secs_f64(),
        tpot_s: if tokens > 1 {
            last.duration_since(first).as_secs_f64() / f64::from(tokens - 1)
        } else {
            0.0
        },
        completion_tokens: tokens,
        ok: done && !failed,
    }
}

/// Nearest-rank quantile `q` of `v` (NaN when empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    dopd_planner::stats::nearest_rank(&s, q)
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The endpoint's base URL (ending in /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1")]
    pub url: String,
    /// A request trace (Azure CSV, Mooncake JSONL or BurstGPT CSV).
    #[arg(long)]
    pub trace: PathBuf,
    /// Multiply the arrival rate (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Replay only the first D of the (scaled) trace, e.g. 60s.
    #[arg(long)]
    pub duration: Option<String>,
    /// At most this many requests.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// Multiply prompt lengths (e.g. 0.1 to fit a CPU), at least 1 token.
    #[arg(long, default_value_t = 1.0)]
    pub isl_scale: f64,
    /// Multiply output lengths, at least 1 token.
    #[arg(long, default_value_t = 1.0)]
    pub osl_scale: f64,
    /// TTFT SLO for attainment and goodput.
    #[arg(long, default_value = "2s")]
    pub ttft_slo: String,
    /// Per-prompt-token TTFT allowance: a request's TTFT SLO is `--ttft-slo` plus this times its
    /// prompt length (e.g. "0.2ms"; default none).
    #[arg(long)]
    pub ttft_slo_per_token: Option<String>,
    /// TPOT SLO.
    #[arg(long, default_value = "200ms")]
    pub tpot_slo: String,
    /// Model name (default: the endpoint's first).
    #[arg(long)]
    pub model: Option<String>,
    /// Write per-request timings here (CSV).
    #[arg(long)]
    pub records: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `dopd bench load`'s summary of a replay against an endpoint (not the router's load snapshot,
/// `dopd_protocol::load::LoadSnapshot`).
#[derive(Debug, Serialize)]
pub struct ReplaySummary {
    pub requests: usize,
    pub ok: usize,
    pub wall_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub ttft_p99_s: f64,
    pub tpot_p50_s: f64,
    pub tpot_p90_s: f64,
    pub tpot_p99_s: f64,
    /// Requests meeting both SLOs per second of replay.
    pub goodput_rps: f64,
    /// Fraction of requests meeting both SLOs.
    pub slo_attainment: f64,
    pub output_tokens_per_s: f64,
}

/// `dopd bench load`.
pub fn bench_load(a: LoadArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.trace)
        .with_context(|| format!("reading {}", a.trace.display()))?;
    let trace = dopd_planner::trace::Trace::parse(&text)
        .with_context(|| format!("invalid trace {}", a.trace.display()))?;
    if !(a.rate_scale > 0.0 && a.isl_scale > 0.0 && a.osl_scale > 0.0) {
        bail!("--rate-scale, --isl-scale and --osl-scale must be positive");
    }
    let ttft_slo = super::parse_duration_s(&a.ttft_slo).context("--ttft-slo")?;
    let tpot_slo = super::parse_duration_s(&a.tpot_slo).context("--tpot-slo")?;
    let ttft_per_token = match &a.ttft_slo_per_token {
        Some(v) => super::parse_duration_s(v).context("--ttft-slo-per-token")?,
        None => 0.0,
    };
    let limit = a
        .duration
        .as_deref()
        .map(super::parse_duration_s)
        .transpose()
        .context("--duration")?
        .unwrap_or(f64::INFINITY);
    let t_first = trace.requests.first().map_or(0, |r| r.arrival_ns);
    let plan: Vec<(f64, u32, u32)> = trace
        .requests
        .iter()
        .map(|r| {
            (
                (r.arrival_ns - t_first) as f64 / 1e9 / a.rate_scale,
                ((f64::from(r.isl) * a.isl_scale).round() as u32).max(1),
                ((f64::from(r.osl) * a.osl_scale).round() as u32).max(1),
            )
        })
        .take_while(|(t, _, _)| *t <= limit)
        .take(a.max_requests.unwrap_or(usize::MAX))
        .collect();
    if plan.is_empty() {
        bail!("no request of the trace falls in the replay window");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let (timings, wall) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        let base = a.url.trim_end_matches('/').to_string();
        let model = match &a.model {
            Some(m) => m.clone(),
            None => served_model(&client, &base).await?,
        };
        eprintln!(
            "replaying {} requests over {:.0} s against {base} ({model})",
            plan.len(),
            plan.last().map_or(0.0, |p| p.0)
        );
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let model = Arc::new(model);
        for (i, &(at, isl, osl)) in plan.iter().enumerate() {
            let (client, base, model, tx) =
                (client.clone(), base.clone(), model.clone(), tx.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(
                    start + Duration::from_secs_f64(at),
                ))
                .await;
                let t = timed(&client, &base, &model, prompt_ids(i, isl as usize), osl).await;
                let _ = tx.send((i, t));
            });
        }
        drop(tx);
        let mut timings = vec![Timing::default(); plan.len()];
        let mut progress = Progress::new("bench load");
        let mut n = 0;
        while let Some((i, t)) = rx.recv().await {
            timings[i] = t;
            n += 1;
            progress.update(n, plan.len());
        }
        anyhow::Ok((timings, start.elapsed().as_secs_f64()))
    })?;
    let ok: Vec<&Timing> = timings.iter().filter(|t| t.ok).collect();
    let ttft: Vec<f64> = ok.iter().map(|t| t.ttft_s).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|t| t.completion_tokens > 1)
        .map(|t| t.tpot_s)
        .collect();
    let good = timings
        .iter()
        .zip(&plan)
        .filter(|(t, p)| {
            t.ok && t.ttft_s <= ttft_slo + ttft_per_token * f64::from(p.1) && t.tpot_s <= tpot_slo
        })
        .count();
    let report = ReplaySummary {
        requests: timings.len(),
        ok: ok.len(),
        wall_s: wall,
        ttft_p50_s: quantile(&ttft, 0.5),
        ttft_p90_s: quantile(&ttft, 0.9),
        ttft_p99_s: quantile(&ttft, 0.99),
        tpot_p50_s: quantile(&tpot, 0.5),
        tpot_p90_s: quantile(&tpot, 0.9),
        tpot_p99_s: quantile(&tpot, 0.99),
        goodput_rps: good as f64 / wall,
        slo_attainment: good as f64 / timings.len() as f64,
        output_tokens_per_s: ok
            .iter()
            .map(|t| f64::from(t.completion_tokens))
            .sum::<f64>()
            / wall,
    };
    if let Some(path) = &a.records {
        let mut csv = String::from("index,arrival_s,isl,osl,ok,ttft_s,tpot_s,completion_tokens\n");
        for (i, (t, p)) in timings.iter().zip(&plan).enumerate() {
            csv.push_str(&format!(
                "{i},{:.6},{},{},{},{:.6},{:.6},{}\n",
                p.0, p.1, p.2, t.ok, t.ttft_s, t.tpot_s, t.completion_tokens
            ));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let ms = |s: f64| format!("{:.0} ms", s * 1e3);
    println!(
        "{} requests, {} ok, {:.1} s; TTFT p50/p90/p99 {} / {} / {}; TPOT p50/p90/p99 {} / {} / {}",
        report.requests,
        report.ok,
        report.wall_s,
        ms(report.ttft_p50_s),
        ms(report.ttft_p90_s),
        ms(report.ttft_p99_s),
        ms(report.tpot_p50_s),
        ms(report.tpot_p90_s),
        ms(report.tpot_p99_s)
    );
    let per_token = a
        .ttft_slo_per_token
        .as_ref()
        .map(|v| format!(" + {v} per prompt token"))
        .unwrap_or_default();
    println!(
        "SLO (TTFT {}{per_token}, TPOT {}) attainment {:.1}%, goodput {:.2} req/s, {:.1} output tok/s",
        a.ttft_slo,
        a.tpot_slo,
        100.0 * report.slo_attainment,
        report.goodput_rps,
        report.output_tokens_per_s
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// The endpoint's base URL (ending in /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1")]
    pub url: String,
    /// Where to write the profile (YAML).
    #[arg(long)]
    pub out: PathBuf,
    /// Profile name.
    #[arg(long, default_value = "measured")]
    pub name: String,
    /// Prompt lengths for TTFT.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024")]
    pub isl: Vec<u32>,
    /// Concurrent sequences for TPOT.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub concurrency: Vec<u32>,
    /// Prompt lengths (resident context) for TPOT.
    #[arg(long, value_delimiter = ',', default_value = "64,512")]
    pub context: Vec<u32>,
    /// Tokens generated per TPOT request.
    #[arg(long, default_value_t = 24)]
    pub decode_tokens: u32,
    /// Repetitions per point (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// KV blocks of one decode worker (default: read from the router's worker list).
    #[arg(long)]
    pub kv_blocks: Option<u64>,
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// KV bytes per token (SmolLM2-135M in f32: 46080).
    #[arg(long, default_value_t = 46_080)]
    pub bytes_per_token: u64,
    /// Start-up time of an instance, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub startup_s: f64,
}

/// `dopd profile measure`.
pub fn measure(a: MeasureArgs) -> anyhow::Result<()> {
    use dopd_planner::profile::{DecodeProfile, KvSpec, PerRole, PrefillProfile, Profile};
    if a.isl.is_empty() || a.concurrency.is_empty() || a.context.is_empty() || a.reps == 0 {
        bail!("--isl, --concurrency, --context and --reps must not be empty");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let profile = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        let base = a.url.trim_end_matches('/').to_string();
        let model = served_model(&client, &base).await?;
        let blocks = match a.kv_blocks {
            Some(b) => b,
            None => {
                let root = base.trim_end_matches("/v1");
                let v: Value = client
                    .get(format!("{root}/v1/dopd/workers"))
                    .send()
                    .await?
                    .json()
                    .await
                    .context("reading the router's worker list (or pass --kv-blocks)")?;
                v["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| w["role"] != "prefill")
                    .filter_map(|w| {
                        Some(w["kv_blocks_used"].as_u64()? + w["kv_blocks_free"].as_u64()?)
                    })
                    .min()
                    .context("no decode worker reports its KV blocks; pass --kv-blocks")?
            }
        };
        let points = a.isl.len() + a.concurrency.len() * a.context.len();
        let mut progress = Progress::new("profile measure");
        let mut done = 0;
        // TTFT: one request at a time, one output token.
        let mut ttft = Vec::new();
        for &isl in &a.isl {
            let mut v = Vec::new();
            for r in 0..a.reps {
                let t = timed(&client, &base, &model, prompt_ids(r + 7, isl as usize), 1).await;
                if !t.ok {
                    bail!("a {isl}-token prompt failed at {base}");
                }
                v.push(t.ttft_s);
            }
            ttft.push(quantile(&v, 0.5));
            done += 1;
            progress.update(done, points);
        }
        // TPOT: `c` concurrent streams of `ctx`-token prompts.
        let mut tpot = Vec::new();
        for &c in &a.concurrency {
            let mut row = Vec::new();
            for &ctx in &a.context {
                let mut v = Vec::new();
                for r in 0..a.reps {
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..c {
                        let (client, base, model) = (client.clone(), base.clone(), model.clone());
                        let p = prompt_ids(r * 1000 + i as usize, ctx as usize);
                        let n = a.decode_tokens;
                        set.spawn(async move { timed(&client, &base, &model, p, n).await });
                    }
                    let mut per = Vec::new();
                    while let Some(t) = set.join_next().await {
                        let t = t?;
                        if !t.ok {
                            bail!("a decode request (concurrency {c}, context {ctx}) failed");
                        }
                        per.push(t.tpot_s);
                    }
                    v.push(per.iter().sum::<f64>() / per.len() as f64);
                }
                row.push(quantile(&v, 0.5));
                done += 1;
                progress.update(done, points);
            }
            tpot.push(row);
        }
        let mut isl: Vec<f64> = a.isl.iter().map(|&x| f64::from(x)).collect();
        // Measured TTFT may dip with noise; the profile needs it non-decreasing.
        for i in 1..ttft.len() {
            ttft[i] = ttft[i].max(ttft[i - 1]);
        }
        isl.dedup();
        anyhow::Ok(Profile {
            name: a.name.clone(),
            source: format!("dopd profile measure --url {base} ({model})"),
            prefill: PrefillProfile { isl, ttft_s: ttft },
            decode: DecodeProfile {
                concurrency: a.concurrency.iter().map(|&x| f64::from(x)).collect(),
                context: a.context.iter().map(|&x| f64::from(x)).collect(),
                tpot_s: tpot,
            },
            kv: KvSpec {
                blocks,
                block_size: a.block_size,
                bytes_per_token: a.bytes_per_token,
            },
            gpus: PerRole {
                prefill: 1,
                decode: 1,
            },
            startup_s: PerRole {
                prefill: a.startup_s,
                decode: a.startup_s,
            },
        })
    })?;
    profile
        .validate()
        .context("the measured profile is not valid (try more repetitions or other points)")?;
    std::fs::write(&a.out, serde_yaml::to_string(&profile)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} ({})", a.out.display(), profile.source);
    Ok(())
}
