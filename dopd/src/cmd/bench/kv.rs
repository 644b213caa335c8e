//! `dopd bench kv`: KV-block transfer bandwidth and latency between a prefill and a decode
//! worker on loopback, over gRPC and UCX, with `ucx_perftest` and a raw TCP socket as references.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use dopd_worker::engine::{Engine, EngineConfig};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct KvArgs {
    /// Prompt lengths (tokens) whose KV blocks are moved, in SmolLM2-135M's layout
    /// (30 layers, 3 KV heads of 64, f32: 45 KiB per token).
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048,8192")]
    pub tokens: Vec<usize>,
    /// Also move this many MiB as synthetic 4 MiB blocks (0: skip).
    #[arg(long, default_value_t = 64)]
    pub synthetic_mib: usize,
    /// Transfers per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct KvRow {
    case: String,
    /// `grpc` and `ucx`: the decode worker's pull path end to end; `ucx-msg`: one tagged UCX
    /// message between two workers (no RPC, no conversion); `ucx_perftest`: UCX's own tag_bw
    /// on the same link; `tcp`: a plain loopback socket.
    transport: &'static str,
    bytes: usize,
    median_ms: f64,
    min_ms: f64,
    gib_per_s: f64,
}

fn kv_row(case: &str, transport: &'static str, bytes: usize, mut times: Vec<f64>) -> KvRow {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    KvRow {
        case: case.to_string(),
        transport,
        bytes,
        median_ms: median * 1e3,
        min_ms: times[0] * 1e3,
        gib_per_s: bytes as f64 / median / f64::from(1u32 << 30),
    }
}

/// Pins exports in a real prefill worker's lease table and pulls them the way a decode worker
/// does, over gRPC and (where libucp loads) over UCX; then times one bare UCX message of the
/// same size, runs `ucx_perftest` tag_bw on the same link, and a plain TCP socket.
pub(super) fn kv(a: KvArgs) -> anyhow::Result<()> {
    use dopd_protocol::Role;
    use dopd_worker::engine_thread::EngineHandle;
    use dopd_worker::kv::KvExport;
    use dopd_worker::model::{Llama, LlamaConfig};
    use dopd_worker::service::{WorkerInfo, WorkerService, serve};
    use dopd_worker::transfer::{GrpcTransport, KvTransport, UcxTransport};
    use std::sync::Mutex;
    use std::time::Duration;

    if a.reps == 0 || a.tokens.contains(&0) {
        bail!("--reps and --tokens must be positive");
    }
    // SmolLM2-135M: 30 layers x (K and V) x 16 tokens x 3 KV heads x 64 dims.
    let smol_block = 30 * 2 * 16 * 3 * 64;
    let mut cases: Vec<(String, usize, usize)> = a
        .tokens
        .iter()
        .map(|&t| (format!("smollm2 {t} tokens"), t.div_ceil(16), smol_block))
        .collect();
    if a.synthetic_mib > 0 {
        cases.push((
            format!("synthetic {} MiB", a.synthetic_mib),
            a.synthetic_mib.div_ceil(4),
            (4 << 20) / 4,
        ));
    }
    // Two UCX workers (prefill side, decode side), or the reason there are none.
    let ucx = match (dopd_ucx::Ucx::start(), dopd_ucx::Ucx::start()) {
        (Ok(p), Ok(d)) => {
            eprintln!(
                "UCX {} with transports {} (UCX_TLS={})",
                p.info().version,
                p.info().transports.join(","),
                std::env::var("UCX_TLS").unwrap_or_else(|_| "unset".into())
            );
            Some((Arc::new(p), Arc::new(d)))
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("UCX rows skipped: {e}");
            None
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let rows = rt.block_on(async {
        // A prefill worker: a tiny model serves (pulls never touch the engine).
        let cfg = LlamaConfig::tiny();
        let model = Llama::<burn::backend::Flex>::random(cfg, 1, &Default::default())?;
        let engine = Engine::new(Arc::new(model), None, EngineConfig::default());
        let info = WorkerInfo {
            worker_id: "bench-prefill".into(),
            epoch: 1,
            model: "tiny".into(),
            role: Role::Prefill,
            context: 4096,
        };
        let mut svc = WorkerService::new(EngineHandle::spawn(engine), info, None, vec![])
            .with_transfer(Duration::from_secs(600), Duration::from_secs(60));
        if let Some((p, _)) = &ucx {
            svc = svc.with_ucx(p.clone(), vec![]);
        }
        let table = svc.lease_table();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, svc, async {
            let _ = stopped.await;
        }));
        let deadline = Duration::from_secs(60);
        let tags = Arc::new(std::sync::atomic::AtomicU64::new(1));
        // The decode worker's recycled receive vectors (its engine returns them after import;
        // here each pull's blocks go back once checked).
        let pool = Arc::new(dopd_worker::transfer::BlockPool::new(1 << 30));
        let mut transports: Vec<Box<dyn KvTransport>> =
            vec![Box::new(GrpcTransport::connect(&url, deadline).await?)];
        if let Some((_, d)) = &ucx {
            transports.push(Box::new(UcxTransport {
                grpc: GrpcTransport::connect(&url, deadline).await?,
                ucx: d.clone(),
                tags: tags.clone(),
                deadline,
                lanes: Arc::new(Mutex::new(Vec::new())),
                pool: Some(pool.clone()),
            }));
        }
        let mut rows = Vec::new();
        for (name, blocks, floats) in &cases {
            let kv = KvExport {
                fingerprint: 0,
                tokens: blocks * 16,
                blocks: (0..*blocks)
                    .map(|b| (0..*floats).map(|i| (b * 31 + i) as f32).collect())
                    .collect(),
            };
            let bytes = blocks * floats * 4;
            for t in &transports {
                eprint!("{name} over {}: ", t.name());
                let mut times = Vec::new();
                for rep in 0..a.reps {
                    let handle = table
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lease table poisoned"))?
                        .pin(kv.clone(), Instant::now());
                    let t0 = Instant::now();
                    let got = t.pull(&handle).await?;
                    times.push(t0.elapsed().as_secs_f64());
                    t.release(&handle).await?;
                    if rep == 0 && got != kv {
                        bail!("{name}: the blocks pulled over {} differ", t.name());
                    }
                    pool.give(got.blocks);
                    eprint!(".");
                }
                eprintln!();
                rows.push(kv_row(name, t.name(), bytes, times));
            }
            if let Some((p, d)) = &ucx {
                // The same bytes as one bare tagged message between the two workers.
                eprint!("{name} as one UCX message: ");
                let mut times = Vec::new();
                // Warm buffers reused across messages, as ucx_perftest does.
                let data = Arc::new(vec![7u8; bytes]);
                let mut buf = vec![0u8; bytes];
                for _ in 0..a.reps {
                    let tag = tags.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let t0 = Instant::now();
                    let recv = d.recv_into(tag, buf, deadline)?;
                    p.send(d.address(), tag, data.clone(), deadline).await?;
                    buf = recv.wait().await?;
                    times.push(t0.elapsed().as_secs_f64());
                    eprint!(".");
                }
                eprintln!();
                rows.push(kv_row(name, "ucx-msg", bytes, times));
                match ucx_perftest(bytes, a.reps) {
                    Ok(gib_per_s) => rows.push(KvRow {
                        case: name.clone(),
                        transport: "ucx_perftest",
                        bytes,
                        median_ms: bytes as f64 / gib_per_s / f64::from(1u32 << 30) * 1e3,
                        min_ms: f64::NAN,
                        gib_per_s,
                    }),
                    Err(e) => eprintln!("ucx_perftest skipped: {e:#}"),
                }
            }
        }
        // The link itself: the largest case's bytes over a plain loopback TCP socket.
        if let Some(big) = rows.iter().map(|r| r.bytes).max() {
            eprint!("raw tcp: ");
            let mut times = Vec::new();
            for _ in 0..a.reps {
                times.push(raw_tcp(big).await?);
                eprint!(".");
            }
            eprintln!();
            rows.push(kv_row("raw loopback TCP", "tcp", big, times));
        }
        let _ = stop.send(());
        anyhow::Ok(rows)
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>13} {:>12} {:>11} {:>9} {:>8} {:>11}",
        "case", "transport", "bytes", "median ms", "min ms", "GiB/s", "/perftest"
    );
    for r in &rows {
        let perf = rows
            .iter()
            .find(|p| p.case == r.case && p.transport == "ucx_perftest")
            .map(|p| p.gib_per_s);
        let ratio = match (perf, r.transport.starts_with("ucx")) {
            (Some(p), true) => format!("{:.2}", r.gib_per_s / p),
            _ => String::new(),
        };
        println!(
            "{:<24} {:>13} {:>12} {:>11.2} {:>9.2} {:>8.3} {:>11}",
            r.case, r.transport, r.bytes, r.median_ms, r.min_ms, r.gib_per_s, ratio
        );
    }
    Ok(())
}

/// `ucx_perftest -t tag_bw` between a server and a client process on loopback, with messages of
/// `bytes` (the environment, UCX_TLS included, is inherited): the overall bandwidth in GiB/s.
fn ucx_perftest(bytes: usize, reps: usize) -> anyhow::Result<f64> {
    use std::process::{Command, Stdio};
    // A free port (released before the server binds it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port()
        .to_string();
    // At least 5 messages and about 1 GiB in all, after UCX's own warm-up.
    let iters = (reps.max(5)).max((1usize << 30) / bytes.max(1)).to_string();
    let size = bytes.to_string();
    let args = ["-t", "tag_bw", "-s", &size, "-n", &iters, "-p", &port];
    let mut server = Command::new("ucx_perftest")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running ucx_perftest (Debian package ucx-utils)")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let o = Command::new("ucx_perftest")
            .arg("127.0.0.1")
            .args(args)
            .output()?;
        if o.status.success() {
            out = Some(String::from_utf8_lossy(&o.stdout).into_owned());
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("ucx_perftest client never connected to its server")?;
    // "Final:  iters  p50  avg  overall  bw_avg  bw_overall  rate_avg  rate_overall" (MB/s is
    // MiB/s in UCX).
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Final:"))
        .context("no Final: line in ucx_perftest output")?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    let mib_per_s = *nums
        .get(5)
        .context("short Final: line in ucx_perftest output")?;
    Ok(mib_per_s / 1024.0)
}

/// Seconds to move `bytes` through a loopback TCP connection (write_all / read_exact, 4 MiB
/// buffers): the ceiling any TCP-based transport on this link can reach.
async fn raw_tcp(bytes: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sender = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let buf = vec![7u8; 4 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n]).await?;
            left -= n;
        }
        s.flush().await?;
        anyhow::Ok(())
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    let t = Instant::now();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        c.read_exact(&mut buf[..n]).await?;
        left -= n;
    }
    let secs = t.elapsed().as_secs_f64();
    sender.await??;
    Ok(secs)
}
