//! `dopd bench worker`: the engine's prefill and decode throughput on a model, measured in
//! process (no network), at several batch sizes; optionally the logits of a device checked
//! against the CPU backend (the GPU check).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::prelude::*;
use dopd_worker::engine::{Engine, EngineConfig, Mode, Request, Start};
use dopd_worker::loading::load_model;
use dopd_worker::sampling::{SamplingParams, StopConditions};
use serde::Serialize;

use super::worker::{DEFAULT_MODEL, Device};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prefill and decode tokens/s of the worker engine at batch 1, 8 and 32.
    Worker(WorkerArgs),
    /// KV-block transfer bandwidth and latency between two workers on loopback.
    Kv(KvArgs),
    /// Replay a request trace against an OpenAI-compatible endpoint: TTFT/TPOT quantiles,
    /// goodput and SLO attainment.
    Load(super::load::LoadArgs),
    /// The router's added latency per request: the same requests to a worker directly (gRPC)
    /// and through the router (HTTP), at a fixed rate, against a worker with a tiny model.
    Router(RouterBenchArgs),
}

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

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// A GGUF model file, or a Hugging Face checkpoint directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens decoded per request (EOS ignored).
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Also run a fixed prompt on the CPU backend and report the largest logit difference.
    #[arg(long)]
    pub check_logits: bool,
    /// Use seeded random weights of SmolLM2-135M's shape instead of --model (for machines the
    /// model file cannot reach).
    #[arg(long)]
    pub random_smollm2: bool,
    /// With --random-smollm2: this many layers instead of 30 (to localise a logit difference).
    #[arg(long, requires = "random_smollm2")]
    pub layers: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    batch: usize,
    prompt_len: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    /// Mean seconds per decode step.
    decode_step_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    device: String,
    rows: Vec<Row>,
    logits_vs_cpu: Option<LogitCheck>,
}

/// This backend's logits against the CPU backend's on one fixed prompt.
#[derive(Debug, Serialize)]
struct LogitCheck {
    positions: usize,
    /// Largest absolute difference over all positions and vocabulary entries.
    max_abs_diff: f64,
    /// Largest absolute CPU logit (the scale the difference is measured against).
    max_abs_logit: f64,
    /// `max_abs_diff / max_abs_logit`.
    rel_diff: f64,
    /// Fraction of positions whose arg-max token is the same on both backends.
    top1_agreement: f64,
    /// Greedy tokens the engine generates (cached prefill, batched decode) on this backend
    /// before the first that differs from the CPU backend's, out of `greedy_tokens`.
    greedy_same_prefix: usize,
    greedy_tokens: usize,
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Worker(a) => worker(a),
        Command::Kv(a) => kv(a),
        Command::Load(a) => super::load::bench_load(a),
        Command::Router(a) => router_overhead(a),
    }
}

fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    if a.batches.is_empty() || a.batches.contains(&0) || a.prompt_len == 0 || a.decode_tokens == 0 {
        bail!("--batches, --prompt-len and --decode-tokens must be positive");
    }
    match a.device {
        Device::Cpu => bench_on::<burn::backend::Flex>(a, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            super::worker::check_cuda()?;
            bench_on::<burn::backend::Cuda<f32>>(a, Default::default())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => bail!("this dopd was built without CUDA: rebuild with --features cuda"),
    }
}

/// SmolLM2-135M's geometry (for random weights of the real shape), `layers` deep (30 in the
/// real model).
fn smollm2_shape(layers: Option<usize>) -> dopd_worker::model::LlamaConfig {
    dopd_worker::model::LlamaConfig {
        vocab: 49_152,
        hidden: 576,
        layers: layers.unwrap_or(30),
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
        rope_theta: 100_000.0,
        rms_eps: 1e-5,
        context: 8192,
        tied_embeddings: true,
        ..dopd_worker::model::LlamaConfig::tiny()
    }
}

/// Seeded random weights of SmolLM2-135M's shape with std 0.02 (the usual initialisation
/// scale), so activations stay in a trained model's range rather than growing layer by layer
/// (where any rounding difference between backends would be amplified).
fn random_smollm2<B: Backend>(
    layers: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<dopd_worker::model::Llama<B>> {
    let w = dopd_worker::model::RandomWeights { seed: 1, std: 0.02 };
    Ok(dopd_worker::model::Llama::<B>::load(
        smollm2_shape(layers),
        &w,
        device,
    )?)
}

/// A fixed, deterministic prompt of `n` tokens (ids spread over the vocabulary).
fn prompt(i: usize, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((i * 7919 + j * 104_729 + 17) % (vocab - 1)) as u32 + 1)
        .collect()
}

fn bench_on<B: Backend>(a: WorkerArgs, device: B::Device) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (model, model_hash) = if a.random_smollm2 {
        let m = random_smollm2::<B>(a.layers, &device)?;
        (m, 1)
    } else {
        let loaded = load_model::<B>(&a.model, &device)
            .with_context(|| format!("loading {}", a.model.display()))?;
        (loaded.model, loaded.model_hash)
    };
    eprintln!(
        "loaded {} in {:.1} s",
        if a.random_smollm2 {
            "random SmolLM2-135M-shaped weights".to_string()
        } else {
            a.model.display().to_string()
        },
        t0.elapsed().as_secs_f64()
    );
    let model = Arc::new(model);
    let vocab = model.config.vocab;
    if a.prompt_len + a.decode_tokens >= model.config.context {
        bail!(
            "--prompt-len + --decode-tokens must stay under the model context of {}",
            model.config.context
        );
    }
    let max_b = a.batches.iter().copied().max().unwrap_or(1);
    let per_seq = (a.prompt_len + a.decode_tokens + 1).div_ceil(16);
    let cfg = EngineConfig {
        block_size: 16,
        kv_blocks: per_seq * max_b + 8,
        max_running: max_b,
        max_prefill_tokens: usize::MAX,
        model_hash,
    };
    let request = |id: u64, mode: Mode, max_tokens: usize| Request {
        id,
        prompt: prompt(id as usize, a.prompt_len, vocab),
        sampling: SamplingParams::default(),
        stop: StopConditions {
            eos: vec![],
            max_tokens,
            stop_strings: vec![],
        },
        mode,
        start: Start::Prompt,
    };
    // Warm-up (first-use allocations, kernel compilation on GPUs).
    let mut e = Engine::new(model.clone(), None, cfg.clone());
    e.submit(request(0, Mode::Generate, 4))?;
    e.run_to_completion();

    let mut rows = Vec::new();
    for &b in &a.batches {
        eprint!("batch {b}: prefill");
        // Prefill: b prompts admitted in one step.
        let mut e = Engine::new(model.clone(), None, cfg.clone());
        for i in 0..b {
            e.submit(request(i as u64, Mode::Prefill, 1))?;
        }
        let t = Instant::now();
        e.run_to_completion();
        let prefill_s = t.elapsed().as_secs_f64();
        eprint!(", decode");
        // Decode: b sequences; time the steps after the one that admitted them.
        let mut e = Engine::new(model.clone(), None, cfg.clone());
        for i in 0..b {
            e.submit(request(i as u64, Mode::Generate, a.decode_tokens + 1))?;
        }
        e.step();
        let (mut toks, mut secs, mut steps) = (0usize, 0.0f64, 0usize);
        while e.has_work() {
            let t = Instant::now();
            let before = e.stats().generated_tokens;
            e.step();
            secs += t.elapsed().as_secs_f64();
            toks += (e.stats().generated_tokens - before) as usize;
            steps += 1;
        }
        eprintln!(" done");
        rows.push(Row {
            batch: b,
            prompt_len: a.prompt_len,
            prefill_tokens_per_s: (b * a.prompt_len) as f64 / prefill_s,
            decode_tokens_per_s: toks as f64 / secs,
            decode_step_s: secs / steps.max(1) as f64,
        });
    }
    let logits_vs_cpu = if a.check_logits {
        Some(logit_diff(&model, &a, vocab)?)
    } else {
        None
    };
    let report = Report {
        model: if a.random_smollm2 {
            "random SmolLM2-135M-shaped weights".to_string()
        } else {
            a.model.display().to_string()
        },
        device: format!("{:?}", a.device).to_lowercase(),
        rows,
        logits_vs_cpu,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model {}  device {}", report.model, report.device);
    println!(
        "{:>6} {:>8} {:>16} {:>16} {:>14}",
        "batch", "prompt", "prefill tok/s", "decode tok/s", "step ms"
    );
    for r in &report.rows {
        println!(
            "{:>6} {:>8} {:>16.1} {:>16.1} {:>14.2}",
            r.batch,
            r.prompt_len,
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_step_s * 1e3
        );
    }
    if let Some(d) = &report.logits_vs_cpu {
        println!(
            "logits vs the CPU backend over {} positions: largest difference {:.2e} of scale {:.2e} \
             (relative {:.2e}), same arg-max at {:.1}% of positions; engine greedy tokens \
             identical for {} of {}",
            d.positions,
            d.max_abs_diff,
            d.max_abs_logit,
            d.rel_diff,
            100.0 * d.top1_agreement,
            d.greedy_same_prefix,
            d.greedy_tokens
        );
    }
    Ok(())
}

/// This backend's logits against the CPU backend's on a fixed 64-token prompt.
fn logit_diff<B: Backend>(
    model: &Arc<dopd_worker::model::Llama<B>>,
    a: &WorkerArgs,
    vocab: usize,
) -> anyhow::Result<LogitCheck> {
    type Cpu = burn::backend::Flex;
    let cpu = if a.random_smollm2 {
        random_smollm2::<Cpu>(a.layers, &Default::default())?
    } else {
        load_model::<Cpu>(&a.model, &Default::default())?.model
    };
    let toks = prompt(3, 64, vocab);
    let a: Vec<f32> = model
        .forward(&toks)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let b: Vec<f32> = cpu.forward(&toks).into_data().to_vec().unwrap_or_default();
    if a.len() != b.len() || a.is_empty() {
        bail!("logit shapes differ ({} vs {})", a.len(), b.len());
    }
    let mut check = compare_logits(&a, &b, vocab);
    // The serving path: cached prefill and decode steps through the engine.
    let greedy_tokens = 32;
    let here = greedy(model.clone(), &toks, greedy_tokens)?;
    let there = greedy(Arc::new(cpu), &toks, greedy_tokens)?;
    check.greedy_tokens = greedy_tokens;
    check.greedy_same_prefix = here.iter().zip(&there).take_while(|(x, y)| x == y).count();
    Ok(check)
}

/// The engine's greedy continuation of `toks` (`n` tokens, EOS ignored).
fn greedy<B: Backend>(
    model: Arc<dopd_worker::model::Llama<B>>,
    toks: &[u32],
    n: usize,
) -> anyhow::Result<Vec<u32>> {
    let blocks = (toks.len() + n + 1).div_ceil(16) + 1;
    let cfg = EngineConfig {
        block_size: 16,
        kv_blocks: blocks,
        max_running: 1,
        max_prefill_tokens: usize::MAX,
        model_hash: 0,
    };
    let mut e = Engine::new(model, None, cfg);
    e.submit(Request {
        id: 0,
        prompt: toks.to_vec(),
        sampling: SamplingParams::default(),
        stop: StopConditions {
            eos: vec![],
            max_tokens: n,
            stop_strings: vec![],
        },
        mode: Mode::Generate,
        start: Start::Prompt,
    })?;
    Ok(e.run_to_completion()
        .into_iter()
        .filter_map(|ev| match ev {
            dopd_worker::engine::Event::Token { token, .. } => Some(token),
            _ => None,
        })
        .collect())
}

/// Compares two row-major `[positions, vocab]` logit matrices (`a` against the reference `b`).
fn compare_logits(a: &[f32], b: &[f32], vocab: usize) -> LogitCheck {
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |m, (i, &x)| if x > m.1 { (i, x) } else { m },
            )
            .0
    };
    let positions = a.len() / vocab.max(1);
    let same = a
        .chunks(vocab)
        .zip(b.chunks(vocab))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    let max_abs_diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max);
    let max_abs_logit = b.iter().map(|x| f64::from(x.abs())).fold(0.0, f64::max);
    LogitCheck {
        positions,
        max_abs_diff,
        max_abs_logit,
        rel_diff: max_abs_diff / max_abs_logit.max(f64::MIN_POSITIVE),
        top1_agreement: same as f64 / positions.max(1) as f64,
        greedy_same_prefix: 0,
        greedy_tokens: 0,
    }
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
fn kv(a: KvArgs) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::compare_logits;

    #[test]
    fn logit_comparison_scales_the_difference_and_counts_argmax_agreement() {
        // Two positions over a vocabulary of 3; the second position's arg-max moves.
        let reference = [1.0, 4.0, 2.0, 0.5, -8.0, 3.0];
        let other = [1.5, 4.0, 2.0, 3.5, -8.0, 3.0];
        let c = compare_logits(&other, &reference, 3);
        assert_eq!(c.positions, 2);
        assert_eq!(c.max_abs_diff, 3.0);
        assert_eq!(c.max_abs_logit, 8.0);
        assert_eq!(c.rel_diff, 3.0 / 8.0);
        assert_eq!(c.top1_agreement, 0.5);
        let same = compare_logits(&reference, &reference, 3);
        assert_eq!((same.max_abs_diff, same.top1_agreement), (0.0, 1.0));
    }
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
fn router_overhead(a: RouterBenchArgs) -> anyhow::Result<()> {
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
            let q = |p: f64| super::load::quantile(&lat, p) * 1e3;
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
