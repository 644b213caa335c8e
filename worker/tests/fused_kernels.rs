//! The fused GPU kernels (`src/model/fused.rs`) against burn's tensor operations and the CPU
//! backend: the same random weights run on CubeCL's wgpu backend with and without the fused
//! kernels, and on the CPU's Flex backend with attention on the host, give the same logits.
//!
//! Needs the `wgpu` feature and a Vulkan device; without a GPU, Mesa's software one
//! (`apt-get install mesa-vulkan-drivers`, which `scripts/setup.sh` does):
//! `cargo test --release -p dopd-worker --features wgpu --test fused_kernels`.
#![cfg(feature = "wgpu")]

use burn::backend::{Flex, Wgpu};
use burn::prelude::*;
use dopd_worker::kv::PagedKvCache;
use dopd_worker::model::{Llama, LlamaConfig, PREFILL_CHUNK, RopeStyle};

fn rows<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [n, v] = t.dims();
    let d: Vec<f32> = t.into_data().to_vec().expect("f32 logits");
    (0..n).map(|i| d[i * v..(i + 1) * v].to_vec()).collect()
}

fn prompt(id: u64, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((id * 13 + i as u64 * 7) % vocab as u64) as u32)
        .collect()
}

/// A long prompt (two prefill chunks), two short ones packed in one pass, then decode steps of
/// all three together, of two, and of all three again: every logits row.
fn run<B: Backend>(m: &Llama<B>, cache: &mut PagedKvCache) -> Vec<Vec<f32>> {
    let v = m.config.vocab;
    let prompts = [PREFILL_CHUNK + 45, 3, 70].map(|n| prompt(n as u64, n, v));
    let seqs: Vec<u64> = prompts.iter().map(|_| cache.create()).collect();
    let mut out = rows(m.prefill(cache, seqs[0], &prompts[0]).expect("room"));
    let packed: Vec<(u64, &[u32])> = (1..3).map(|i| (seqs[i], &prompts[i][..])).collect();
    out.extend(rows(m.prefill_batch(cache, &packed).expect("room")));
    for step in 0..4u32 {
        let batch: Vec<(u64, u32)> = seqs
            .iter()
            .enumerate()
            .filter(|&(i, _)| step != 2 || i != 1)
            .map(|(i, &s)| (s, (step * 5 + i as u32) % v as u32))
            .collect();
        out.extend(rows(m.forward_decode(cache, &batch).expect("room")));
    }
    out
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn check(c: LlamaConfig) {
    let wgpu = Default::default();
    let fused = Llama::<Wgpu>::random(c.clone(), 5, &wgpu).expect("model");
    assert!(
        fused.fused_kernels(),
        "the wgpu backend has the fused kernels"
    );
    let plain = Llama::<Wgpu>::random(c.clone(), 5, &wgpu)
        .expect("model")
        .with_fused_kernels(false);
    assert!(!plain.fused_kernels());
    let cpu = Llama::<Flex>::random(c, 5, &Default::default()).expect("model");
    assert!(
        !cpu.fused_kernels(),
        "the CPU backend runs tensor operations"
    );
    let layout = cpu.kv_layout(16, 0);
    let mut out = Vec::new();
    let mut cache = fused.new_cache(layout, 128);
    assert!(!cache.on_host(), "a device pool on wgpu");
    out.push(run(&fused, &mut cache));
    let mut cache = plain.new_cache(layout, 128);
    out.push(run(&plain, &mut cache));
    let mut cache = cpu.new_cache(layout, 128);
    out.push(run(&cpu, &mut cache));
    let scale = out[2].iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.1, "logits are not all near zero ({scale})");
    for (name, other) in [("tensor operations on wgpu", &out[1]), ("the CPU", &out[2])] {
        let d = worst(&out[0], other);
        assert!(
            d < 2e-3 * scale.max(1.0),
            "fused kernels differ from {name} by {d} (logits up to {scale})"
        );
    }
}

#[test]
fn fused_kernels_match_tensor_operations_adjacent_rope() {
    check(LlamaConfig {
        context: 2 * PREFILL_CHUNK + 64,
        ..LlamaConfig::tiny()
    });
}

#[test]
fn fused_kernels_match_tensor_operations_halves_rope_with_bias() {
    check(LlamaConfig {
        context: 2 * PREFILL_CHUNK + 64,
        rope_style: RopeStyle::Halves,
        qkv_bias: true,
        ..LlamaConfig::tiny()
    });
}

/// Heads of 64 dimensions, as SmolLM2's: a chunk of the attention kernel is 64 positions, and
/// the short prompt ends inside the first.
#[test]
fn fused_kernels_match_tensor_operations_wide_heads() {
    check(LlamaConfig {
        hidden: 128,
        heads: 6,
        kv_heads: 2,
        head_dim: 64,
        ffn: 96,
        layers: 2,
        context: 2 * PREFILL_CHUNK + 64,
        rope_style: RopeStyle::Halves,
        ..LlamaConfig::tiny()
    });
}
