//! `dopd bench worker`: the engine's prefill and decode throughput on a model, measured in
//! process (no network), at several batch sizes; optionally the logits of a device checked
//! against the CPU backend (the GPU check).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::prelude::*;
use dopd_worker::engine::{Engine, EngineConfig, Mode, Request, Start};
use dopd_worker::loading::{load_model, load_model_with};
use dopd_worker::sampling::{SamplingParams, StopConditions};
use serde::Serialize;

use crate::cmd::worker::{DEFAULT_MODEL, Device};

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
    #[command(flatten)]
    pub weights: crate::cmd::worker::WeightArgs,
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
    /// Bytes a decode step reads at least: the weights as held, plus the K/V of every
    /// sequence at the phase's mean context.
    decode_bytes_per_step: f64,
    /// `decode_bytes_per_step / decode_step_s`, in GB/s: set against the device's peak memory
    /// bandwidth, how close decode comes to the bound it has.
    decode_read_gb_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    device: String,
    /// Bytes of the model file (0 for random weights).
    model_file_bytes: u64,
    /// Bytes of each engine's KV pool (the largest batch's sequences at full length).
    kv_pool_bytes: u64,
    /// Whether the forward passes ran the fused GPU kernels (`--no-fused-kernels` turns them
    /// off; the CPU has none).
    fused_kernels: bool,
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

pub(super) fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    if a.batches.is_empty() || a.batches.contains(&0) || a.prompt_len == 0 || a.decode_tokens == 0 {
        bail!("--batches, --prompt-len and --decode-tokens must be positive");
    }
    match a.device {
        Device::Cpu => bench_on::<burn::backend::Flex>(a, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            crate::cmd::doctor::check_cuda()?;
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
        let mode = a.weights.mode::<B>()?;
        let loaded = load_model_with::<B>(&a.model, &device, mode)
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
    let model = Arc::new(a.weights.kernels(model));
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
        step_budget: None,
    };
    let kv_token_bytes = model.kv_layout(cfg.block_size, 0).token_bytes();
    // Warm-up (first-use allocations, kernel compilation on GPUs).
    // Each engine is dropped before the next starts, so that the process holds one KV pool at a
    // time (its peak memory is then the worker's).
    let mut e = Engine::new(model.clone(), None, cfg.clone());
    e.submit(request(0, Mode::Generate, 4))?;
    e.run_to_completion();
    drop(e);

    // A GPU backend compiles each kernel at its first use: the warm-up `dopd worker` runs
    // before serving (a decode step at every batch bucket), so that the rows measure serving,
    // not compilation. A no-op on the CPU.
    model.warm_up(cfg.block_size, max_b)?;
    let mut rows = Vec::new();
    for &b in &a.batches {
        eprint!("batch {b}: prefill");
        // Prefill: b prompts admitted in one step.
        let mut e = Engine::new(model.clone(), None, cfg.clone());
        for i in 0..b {
            // A generation of one token: the prompt's prefill and its first token, as a mixed
            // worker serves it (a prefill-role worker would also export the sequence's K/V,
            // a copy as large as the sequence's share of the pool, held until the decode
            // worker pulls it).
            e.submit(request(i as u64, Mode::Generate, 1))?;
        }
        let t = Instant::now();
        e.run_to_completion();
        let prefill_s = t.elapsed().as_secs_f64();
        drop(e);
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
        let context = (a.prompt_len + a.decode_tokens.div_ceil(2)) as f64;
        let kv = (b * kv_token_bytes) as f64 * context;
        let bytes = model.weight_bytes() as f64 + kv;
        let step_s = secs / steps.max(1) as f64;
        rows.push(Row {
            batch: b,
            prompt_len: a.prompt_len,
            prefill_tokens_per_s: (b * a.prompt_len) as f64 / prefill_s,
            decode_tokens_per_s: toks as f64 / secs,
            decode_step_s: step_s,
            decode_bytes_per_step: bytes,
            decode_read_gb_per_s: bytes / step_s / 1e9,
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
        fused_kernels: model.fused_kernels(),
        model_file_bytes: if a.random_smollm2 {
            0
        } else {
            std::fs::metadata(&a.model).map_or(0, |m| m.len())
        },
        kv_pool_bytes: (cfg.kv_blocks * cfg.block_size * kv_token_bytes) as u64,
        rows,
        logits_vs_cpu,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model {}  device {}", report.model, report.device);
    println!(
        "{:>6} {:>8} {:>16} {:>16} {:>14} {:>12}",
        "batch", "prompt", "prefill tok/s", "decode tok/s", "step ms", "read GB/s"
    );
    for r in &report.rows {
        println!(
            "{:>6} {:>8} {:>16.1} {:>16.1} {:>14.2} {:>12.1}",
            r.batch,
            r.prompt_len,
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_step_s * 1e3,
            r.decode_read_gb_per_s
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
        step_budget: None,
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
