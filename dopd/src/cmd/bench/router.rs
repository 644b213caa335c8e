//! `dopd bench router`: the router's added latency per request, the same requests sent to a
//! worker directly (gRPC) and through the router (HTTP), at a fixed rate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use dopd_worker::engine::{Engine, EngineConfig};
use serde::Serialize;

use crate::cmd::worker::DEFAULT_MODEL;

#[derive(Debug, clap::Args)]
pub struct RouterBenchArgs {
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Requests per path.
    #[arg(long, default_value_t = 500)]
    pub requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    /// The model whose tokenizer the router loads (the worker runs a tiny random model).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct OverheadRow {
    path: &'static str,
    requests: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

/// `dopd bench router`.
pub(super) fn router_overhead(a: RouterBenchArgs) -> anyhow::Result<()> {
    use dopd_protocol::{Role, connect};
    use dopd_router::pool::Pool;
    use dopd_worker::engine_thread::EngineHandle;
    use dopd_worker::model::{Llama, LlamaConfig};
    use dopd_worker::service::{WorkerInfo, WorkerService, serve};
    use std::time::Duration;

    if !(a.rate > 0.0) || a.requests == 0 || a.prompt_tokens == 0 {
        bail!("--rate, --requests and --prompt-tokens must be positive");
    }
    let (tokenizer, _, _) = dopd_model::load_tokenizer(&a.model)
        .with_context(|| format!("reading the tokenizer of {}", a.model.display()))?;
    let rt = tokio::runtime::Runtime::new()?;
    let rows = rt.block_on(async {
        let cfg = LlamaConfig::tiny();
        let vocab = cfg.vocab as u32;
        let model = Llama::<burn::backend::Flex>::random(cfg, 1, &Default::default())?;
        let engine = Engine::new(
            Arc::new(model),
            None,
            EngineConfig {
                kv_blocks: 4096,
                max_running: 256,
                ..EngineConfig::default()
            },
        );
        let info = WorkerInfo {
            worker_id: "bench-worker".into(),
            epoch: 1,
            model: "tiny".into(),
            role: Role::Mixed,
            context: 4096,
        };
        let svc = WorkerService::new(EngineHandle::spawn(engine), info, None, vec![]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let wurl = format!("http://{}", listener.local_addr()?);
        tokio::spawn(serve(listener, svc, std::future::pending()));
        let pool = Pool::new();
        pool.add(&wurl).await.map_err(anyhow::Error::msg)?;
        let router = dopd_router::Router::new(
            dopd_router::RouterConfig {
                model: "bench".into(),
                context: 4096,
                max_waiting: 100_000,
                api_keys: Vec::new(),
                max_streams_per_key: 0,
                schedule: Default::default(),
            },
            tokenizer,
            pool,
        );
        let rl = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let raddr = rl.local_addr()?;
        tokio::spawn(dopd_router::serve(rl, router, std::future::pending()));
        let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
            .map(|i| 1 + i % (vocab - 1))
            .collect();
        let grpc = connect(wurl.clone()).await?;
        let mut rows = Vec::new();
        for path in ["worker (gRPC)", "router (HTTP)"] {
            eprint!("{path}: ");
            let start = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for i in 0..a.requests {
                let at = start + Duration::from_secs_f64(i as f64 / a.rate);
                let (mut grpc, prompt) = (grpc.clone(), prompt.clone());
                let max_tokens = a.max_tokens;
                set.spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    let t = Instant::now();
                    let ok = if path.starts_with("worker") {
                        let req = dopd_protocol::proto::GenerateRequest {
                            request_id: i.to_string(),
                            prompt_tokens: prompt,
                            stop: Some(dopd_protocol::proto::StopSettings {
                                max_tokens,
                                stop: vec![],
                                ignore_eos: true,
                            }),
                            ..Default::default()
                        };
                        match grpc.generate(req).await {
                            Ok(s) => {
                                let mut s = s.into_inner();
                                let mut done = false;
                                while let Ok(Some(ev)) = s.message().await {
                                    done |= matches!(
                                        ev.event,
                                        Some(
                                            dopd_protocol::proto::generate_event::Event::Finished(
                                                _
                                            )
                                        )
                                    );
                                }
                                done
                            }
                            Err(_) => false,
                        }
                    } else {
                        let body = serde_json::json!({
                            "model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": true,
                        })
                        .to_string();
                        http_post(&raddr, "/v1/completions", &body).await
                    };
                    (ok, t.elapsed().as_secs_f64())
                });
            }
            let mut lat = Vec::new();
            let mut failed = 0;
            while let Some(r) = set.join_next().await {
                let (ok, s) = r?;
                if ok {
                    lat.push(s);
                } else {
                    failed += 1;
                }
            }
            eprintln!("done");
            if failed > 0 {
                bail!("{failed} requests failed on the {path} path");
            }
            let q = |p: f64| crate::cmd::load::quantile(&lat, p) * 1e3;
            rows.push(OverheadRow {
                path,
                requests: lat.len(),
                p50_ms: q(0.5),
                p90_ms: q(0.9),
                p99_ms: q(0.99),
            });
        }
        anyhow::Ok(rows)
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{} requests per path at {} req/s, {} prompt tokens, {} generated",
        a.requests, a.rate, a.prompt_tokens, a.max_tokens
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9}",
        "path", "p50 ms", "p90 ms", "p99 ms"
    );
    for r in &rows {
        println!(
            "{:<16} {:>9.2} {:>9.2} {:>9.2}",
            r.path, r.p50_ms, r.p90_ms, r.p99_ms
        );
    }
    if let [w, r] = &rows[..] {
        println!(
            "{:<16} {:>9.2} {:>9.2} {:>9.2}",
            "router overhead",
            r.p50_ms - w.p50_ms,
            r.p90_ms - w.p90_ms,
            r.p99_ms - w.p99_ms
        );
    }
    Ok(())
}

/// One HTTP/1.1 POST on a fresh loopback connection (what a client without a connection pool
/// pays); whether it answered 200.
async fn http_post(addr: &std::net::SocketAddr, path: &str, body: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.is_ok() && out.starts_with(b"HTTP/1.1 200")
}
