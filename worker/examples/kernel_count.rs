//! Counts the kernels one decode step launches and compiles on a CubeCL backend (burn-wgpu on
//! whatever Vulkan device there is: Mesa's software lavapipe on a machine without a GPU). On a
//! GPU a small model's decode step costs about one launch overhead per kernel, so the count is
//! the step time's measure that a machine without a GPU can take; compiles after the first
//! steps are stalls a serving worker would see.
//!
//! `scripts/kernel-count.sh` runs it with CubeCL's logs on and tallies them; alone:
//! `CUBECL_DEBUG_OPTION=profile-full CUBECL_DEBUG_LOG=stderr cargo run --release -p dopd-worker
//! --features wgpu --example kernel_count -- LAYERS STEPS [warm]`. With `warm`, the model's
//! warm-up for batches up to 40 runs first. Each step is framed by `=== STEP i batch b` and
//! `=== END i` lines on stderr; batch 2 for the first STEPS steps, then one more sequence a step
//! up to batch 40.

use dopd_worker::model::{Llama, LlamaConfig};

type B = burn::backend::Wgpu;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: usize| {
        args.next()
            .and_then(|a| a.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let (layers, steps) = (arg(2), arg(40));
    let warm = std::env::args().nth(3).is_some_and(|a| a == "warm");
    let device = Default::default();
    let c = LlamaConfig {
        layers,
        context: 512,
        ..LlamaConfig::tiny()
    };
    let m = match Llama::<B>::random(c, 3, &device) {
        Ok(m) => m.with_host_attention(false),
        Err(e) => {
            eprintln!("kernel_count: {e}");
            std::process::exit(1);
        }
    };
    if warm && let Err(e) = m.warm_up(16, 40) {
        eprintln!("kernel_count: warm-up: {e}");
        std::process::exit(1);
    }
    eprintln!("=== WARMED");
    let mut cache = m.new_cache(m.kv_layout(16, 0), 512);
    let prompt: Vec<u32> = (0..37).map(|i| (i * 7 % 40) as u32).collect();
    let mut seqs = Vec::new();
    let add = |cache: &mut dopd_worker::kv::PagedKvCache, seqs: &mut Vec<u64>| {
        let s = cache.create();
        let logits = m.prefill(cache, s, &prompt).map(|l| l.into_data());
        if let Err(e) = logits {
            eprintln!("kernel_count: prefill: {e}");
            std::process::exit(1);
        }
        seqs.push(s);
    };
    add(&mut cache, &mut seqs);
    add(&mut cache, &mut seqs);
    for step in 0..steps + 38 {
        if step >= steps {
            add(&mut cache, &mut seqs);
        }
        eprintln!("=== STEP {step} batch {}", seqs.len());
        let batch: Vec<(u64, u32)> = seqs.iter().map(|&s| (s, 3 + step as u32 % 20)).collect();
        let t = std::time::Instant::now();
        if let Err(e) = m.forward_decode(&mut cache, &batch).map(|l| l.into_data()) {
            eprintln!("kernel_count: decode: {e}");
            std::process::exit(1);
        }
        eprintln!("=== END {step} {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
}
