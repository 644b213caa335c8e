//! `dopd worker`: serve a model over gRPC as a prefill, decode or mixed worker; and
//! `dopd generate`: a small client for trying a worker from the shell.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use burn::prelude::Backend;
use dopd_protocol::{Role, connect, proto};
use dopd_worker::engine::{Detokenizer, Engine, EngineConfig};
use dopd_worker::engine_thread::EngineHandle;
use dopd_worker::loading::load_model_with;
use dopd_worker::model::{Llama, WeightMode};
use dopd_worker::service::{WorkerInfo, WorkerService, serve};

/// The model the set-up step fetches.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// burn's Flex backend (pure-Rust CPU kernels, multithreaded).
    Cpu,
    /// burn-cuda (build with `--features cuda`).
    Cuda,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// prefill, decode or mixed.
    #[arg(long, default_value = "mixed")]
    pub role: Role,
    /// A GGUF model file, or a Hugging Face checkpoint directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Address to serve gRPC on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks in the cache (SmolLM2-135M: 46 KiB per token, so the default 1024 blocks of 16
    /// tokens take 720 MiB).
    #[arg(long, default_value_t = 1024)]
    pub kv_blocks: usize,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Prompt tokens prefilled per engine step.
    #[arg(long, default_value_t = 4096)]
    pub max_prefill_tokens: usize,
    /// How long a prefill worker keeps KV blocks for their decode worker to pull (e.g. 30s).
    #[arg(long, default_value = "30s")]
    pub kv_lease_ttl: String,
    /// Deadline of one KV pull by a decode worker; past it, the prompt is recomputed locally.
    #[arg(long, default_value = "5s")]
    pub kv_transfer_deadline: String,
    /// Name reported in Health and KV handles (default: role@listen address).
    #[arg(long)]
    pub worker_id: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// How KV blocks move between prefill and decode workers: `ucx` (the system libucp; fails
    /// to start without it), `grpc` (streamed over the control connection), or `auto` (UCX when
    /// the library loads, else gRPC). UCX honours UCX_TLS, UCX_NET_DEVICES and the rest.
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_transport: KvTransportChoice,
    /// UCX transports a KV link should use (comma-separated prefixes, e.g. `rc,cuda_ipc`); a link
    /// using none of them is reported degraded in Stats. Default: degraded when a link fell back
    /// to TCP although the UCX context offers RDMA, shared memory or CUDA IPC.
    #[arg(long, value_delimiter = ',')]
    pub kv_expect_transports: Vec<String>,
    /// Also serve Prometheus metrics (OpenMetrics text at `/metrics`) on this address (port 0
    /// picks a free port; the banner prints it).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Testing: wait this long before sending each lease's KV blocks (to kill a worker in the
    /// middle of a transfer).
    #[arg(long, hide = true)]
    pub fault_kv_send_delay: Option<String>,
    /// Exit when standard input closes: how `dopd up` ties its workers to itself, so that they
    /// go when it goes, however it ends (SIGKILL included: the kernel closes its end of the pipe).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvTransportChoice {
    Auto,
    Ucx,
    Grpc,
}

/// How a worker keeps its weights (`dopd worker`, `dopd bench worker`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct WeightArgs {
    /// CPU: multiply the 4-bit weight matrices with their inputs rounded to 8 bits per block
    /// of 32 (integer products, the arithmetic of llama.cpp's CPU kernels): several times
    /// faster at a batch of sequences, and the logits move by about that rounding (measured in
    /// docs/worker.md). Without it the inputs stay f32 and the logits within 2e-3 of the
    /// reference.
    #[arg(long)]
    pub int8_activations: bool,
    /// GPU: run every operation as burn's tensor operations instead of the fused kernels
    /// (RMS norm, Q/K/V with RoPE and the KV write, attention over the paged pool, SiLU·up).
    /// Both give the same logits within rounding; the fused kernels launch a quarter as many
    /// kernels per decode step. For comparisons, or a GPU where a fused kernel misbehaves.
    #[arg(long)]
    pub no_fused_kernels: bool,
}

impl WeightArgs {
    /// How backend `B` keeps the weights: quantized on the CPU (with 8-bit inputs when asked),
    /// dense elsewhere, where 8-bit inputs are refused.
    pub fn mode<B: Backend>(self) -> anyhow::Result<WeightMode> {
        match (WeightMode::for_backend::<B>(), self.int8_activations) {
            (m, false) => Ok(m),
            (WeightMode::Quantized, true) => Ok(WeightMode::QuantizedInt8),
            (_, true) => bail!("--int8-activations is for the CPU device (its quantized kernels)"),
        }
    }

    /// `model` with the fused GPU kernels on or off as asked (the CPU has none).
    pub fn kernels<B: Backend>(self, model: Llama<B>) -> Llama<B> {
        if self.no_fused_kernels {
            model.with_fused_kernels(false)
        } else {
            model
        }
    }
}

/// Starts UCX as `choice` asks: `None` for gRPC.
pub fn start_ucx(choice: KvTransportChoice) -> anyhow::Result<Option<Arc<dopd_ucx::Ucx>>> {
    match choice {
        KvTransportChoice::Grpc => Ok(None),
        KvTransportChoice::Ucx => {
            let u = dopd_ucx::Ucx::start().context("--kv-transport ucx")?;
            Ok(Some(Arc::new(u)))
        }
        KvTransportChoice::Auto => match dopd_ucx::Ucx::start() {
            Ok(u) => Ok(Some(Arc::new(u))),
            Err(e) => {
                eprintln!("dopd worker: {e}; KV blocks move over gRPC");
                Ok(None)
            }
        },
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.block_size == 0 || a.kv_blocks == 0 || a.max_running == 0 {
        bail!("--block-size, --kv-blocks and --max-running must be positive");
    }
    super::parse_duration_s(&a.kv_lease_ttl).context("--kv-lease-ttl")?;
    super::parse_duration_s(&a.kv_transfer_deadline).context("--kv-transfer-deadline")?;
    if let Some(d) = &a.fault_kv_send_delay {
        super::parse_duration_s(d).context("--fault-kv-send-delay")?;
    }
    if a.exit_with_stdin {
        std::thread::spawn(|| {
            use std::io::Read;
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            eprintln!("dopd worker: the process that started it is gone (stdin closed); exiting");
            std::process::exit(1);
        });
    }
    match a.device {
        Device::Cpu => run_on::<burn::backend::Flex>(a, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            super::doctor::check_cuda()?;
            run_on::<burn::backend::Cuda<f32>>(a, Default::default())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => bail!("this dopd was built without CUDA: rebuild with --features cuda"),
    }
}

fn run_on<B: Backend>(a: Args, device: B::Device) -> anyhow::Result<()>
where
    Engine<B>: Send + 'static,
{
    eprintln!("dopd worker: loading {}", a.model.display());
    let t0 = std::time::Instant::now();
    let loaded = load_model_with::<B>(&a.model, &device, a.weights.mode::<B>()?)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let context = loaded.model.config.context;
    let layout = loaded.model.kv_layout(a.block_size, loaded.model_hash);
    eprintln!(
        "dopd worker: loaded in {:.1} s; KV cache {} blocks x {} tokens ({} MiB)",
        t0.elapsed().as_secs_f64(),
        a.kv_blocks,
        a.block_size,
        (a.kv_blocks * layout.block_size * layout.token_bytes()) >> 20
    );
    let model = Arc::new(a.weights.kernels(loaded.model));
    if !matches!(a.device, Device::Cpu) {
        let t = std::time::Instant::now();
        // A GPU backend compiles each kernel at its first use (tens of milliseconds each),
        // which would stall the first requests: a prefill and a decode step at every batch
        // bucket first.
        model
            .warm_up(a.block_size, a.max_running)
            .context("warming the GPU's kernels up")?;
        eprintln!(
            "dopd worker: warmed up (the GPU's kernels compiled) in {:.1} s; fused kernels {}",
            t.elapsed().as_secs_f64(),
            if model.fused_kernels() { "on" } else { "off" }
        );
    }
    let tokenizer = loaded.tokenizer.map(Arc::new);
    let detok = tokenizer.clone().map(|t| t as Arc<dyn Detokenizer>);
    // Decode side: received KV block vectors are recycled (up to a quarter of the cache's size).
    let pool = Arc::new(dopd_worker::transfer::BlockPool::new(
        a.kv_blocks * layout.block_size * layout.token_bytes() / 4,
    ));
    let engine = Engine::new(
        model,
        detok,
        EngineConfig {
            block_size: a.block_size,
            kv_blocks: a.kv_blocks,
            max_running: a.max_running,
            max_prefill_tokens: a.max_prefill_tokens,
            model_hash: loaded.model_hash,
        },
    )
    .with_block_pool(pool.clone());
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        let info = WorkerInfo {
            worker_id: a.worker_id.unwrap_or_else(|| format!("{}@{addr}", a.role)),
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            model: loaded.name,
            role: a.role,
            context,
        };
        let secs =
            |s: &str| std::time::Duration::from_secs_f64(super::parse_duration_s(s).unwrap_or(1.0));
        let mut svc = WorkerService::new(EngineHandle::spawn(engine), info, tokenizer, loaded.eos)
            .with_transfer(secs(&a.kv_lease_ttl), secs(&a.kv_transfer_deadline));
        if let Some(d) = &a.fault_kv_send_delay {
            svc = svc.with_kv_send_delay(secs(d));
        }
        if let Some(u) = start_ucx(a.kv_transport)? {
            eprintln!(
                "dopd worker: UCX {} with transports {}",
                u.info().version,
                u.info().transports.join(",")
            );
            svc = svc
                .with_ucx(u, a.kv_expect_transports.clone())
                .with_block_pool(pool);
        }
        let metrics = match &a.metrics_listen {
            Some(m) => {
                let l = tokio::net::TcpListener::bind(m)
                    .await
                    .with_context(|| format!("--metrics-listen: cannot listen on {m}"))?;
                let at = l.local_addr()?;
                tokio::spawn(dopd_worker::service::serve_metrics(
                    l,
                    svc.clone(),
                    shutdown_signal(),
                ));
                format!("; metrics on http://{at}/metrics")
            }
            None => String::new(),
        };
        println!(
            "dopd worker: role {} model {} listening on {addr} (KV over {}{metrics})",
            a.role,
            a.model.display(),
            svc.kv_transport()
        );
        std::io::stdout().flush()?;
        serve(listener, svc, shutdown_signal()).await?;
        eprintln!("dopd worker: stopped");
        anyhow::Ok(())
    })
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The prompt (raw text; with --chat, the user message).
    pub prompt: String,
    /// A worker's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub worker: String,
    /// Prefill on this worker and decode on --worker (disaggregated).
    #[arg(long)]
    pub prefill_worker: Option<String>,
    /// Wrap the prompt in the model's chat template (ChatML) — needs --model for the template.
    #[arg(long)]
    pub chat: bool,
    /// The model file, for --chat (the worker has the same tokenizer).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Streams a generation to stdout.
pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let prompt = if a.chat {
        let g = dopd_model::gguf::Gguf::open(&a.model)
            .with_context(|| format!("reading {} for the chat template", a.model.display()))?;
        let t = dopd_model::tokenizer::ModelTokenizer::from_gguf(&g)?;
        t.chat_prompt(&[dopd_model::tokenizer::Message::new("user", &a.prompt)])
    } else {
        a.prompt.clone()
    };
    let req = proto::GenerateRequest {
        request_id: "cli".into(),
        inline_kv: false,
        prompt,
        prompt_tokens: vec![],
        sampling: Some(proto::Sampling {
            temperature: a.temperature,
            top_k: 0,
            top_p: 1.0,
            seed: a.seed,
        }),
        stop: Some(proto::StopSettings {
            max_tokens: a.max_tokens,
            stop: vec![],
            ignore_eos: false,
        }),
        step_prefill_budget: 0,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut out = std::io::stdout();
        let mut dec = connect(a.worker.clone())
            .await
            .with_context(|| format!("connecting to {}", a.worker))?;
        let stream = match &a.prefill_worker {
            None => dec.generate(req).await?.into_inner(),
            Some(url) => {
                let mut pre = connect(url.clone())
                    .await
                    .with_context(|| format!("connecting to {url}"))?;
                let p = pre.prefill(req.clone()).await?.into_inner();
                write!(out, "{}", p.text)?;
                if p.finish != proto::FinishReason::Unspecified as i32 {
                    writeln!(out)?;
                    return Ok(());
                }
                // The decode worker pulls the blocks from the prefill worker by lease.
                dec.decode(proto::DecodeRequest {
                    request_id: req.request_id,
                    prompt_tokens: p.prompt_tokens,
                    first_token: p.first_token,
                    handle: p.handle,
                    prefill_url: url.clone(),
                    sampling: req.sampling,
                    stop: req.stop,
                    ..Default::default()
                })
                .await?
                .into_inner()
            }
        };
        let mut stream = stream;
        while let Some(ev) = stream.message().await? {
            match ev.event {
                Some(proto::generate_event::Event::Token(t)) => write!(out, "{}", t.text)?,
                Some(proto::generate_event::Event::Finished(f)) => {
                    writeln!(out, "{}", f.text)?;
                    eprintln!(
                        "[{} prompt + {} completion tokens, finish {:?}]",
                        f.prompt_tokens,
                        f.completion_tokens,
                        proto::FinishReason::try_from(f.reason).unwrap_or_default()
                    );
                }
                None => {}
            }
            out.flush()?;
        }
        anyhow::Ok(())
    })
}
