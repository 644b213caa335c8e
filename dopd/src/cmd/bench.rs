//! `dopd bench worker`: the engine's prefill and decode throughput on a model, measured in
//! process (no network), at several batch sizes; optionally the logits of a device checked
//! against the CPU backend (the GPU check).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::prelude::*;
use dopd_worker::engine::{Engine, EngineConfig, Mode, Request, Start};
use dopd_worker::sampling::{SamplingParams, StopConditions};
use dopd_worker::service::load_model;
use serde::Serialize;

use super::worker::{DEFAULT_MODEL, Device};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prefill and decode tokens/s of the worker engine at batch 1, 8 and 32.
    Worker(WorkerArgs),
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
    max_logit_diff_vs_cpu: Option<f64>,
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Worker(a) => worker(a),
    }
}

fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    if a.batches.is_empty() || a.batches.contains(&0) || a.prompt_len == 0 || a.decode_tokens == 0 {
        bail!("--batches, --prompt-len and --decode-tokens must be positive");
    }
    match a.device {
        Device::Cpu => bench_on::<burn::backend::Flex>(a, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda => bench_on::<burn::backend::Cuda<f32>>(a, Default::default()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => bail!("this dopd was built without CUDA: rebuild with --features cuda"),
    }
}

/// A fixed, deterministic prompt of `n` tokens (ids spread over the vocabulary).
fn prompt(i: usize, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((i * 7919 + j * 104_729 + 17) % (vocab - 1)) as u32 + 1)
        .collect()
}

fn bench_on<B: Backend>(a: WorkerArgs, device: B::Device) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let loaded = load_model::<B>(&a.model, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    eprintln!(
        "loaded {} in {:.1} s",
        a.model.display(),
        t0.elapsed().as_secs_f64()
    );
    let model = Arc::new(loaded.model);
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
        model_hash: loaded.model_hash,
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
    let max_logit_diff_vs_cpu = if a.check_logits {
        Some(logit_diff(&model, &a.model, vocab)?)
    } else {
        None
    };
    let report = Report {
        model: a.model.display().to_string(),
        device: format!("{:?}", a.device).to_lowercase(),
        rows,
        max_logit_diff_vs_cpu,
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
    if let Some(d) = report.max_logit_diff_vs_cpu {
        println!("largest logit difference vs the CPU backend: {d:.2e}");
    }
    Ok(())
}

/// Largest absolute difference between this backend's and the CPU backend's logits on a fixed
/// 64-token prompt.
fn logit_diff<B: Backend>(
    model: &dopd_worker::model::Llama<B>,
    path: &std::path::Path,
    vocab: usize,
) -> anyhow::Result<f64> {
    type Cpu = burn::backend::Flex;
    let cpu = load_model::<Cpu>(path, &Default::default())?.model;
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
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max))
}
