//! The forward passes on the host (plain vectors, quantized dot products, no backend tensors:
//! packed and chunked prefill, and decode steps) against the tensor path on the same quantized
//! weights: the same logits for every RoPE style, with and without QKV bias and tied
//! embeddings, at decode batch sizes on both sides of the host step's limit. Heads of 32
//! values, so attention's value accumulation runs in whole vectors.

use burn::backend::Flex;
use burn::prelude::*;
use dopd_worker::kv::PagedKvCache;
use dopd_worker::model::{Llama, LlamaConfig, ModelError, RandomWeights, RopeStyle, WeightSource};
use dopd_worker::qmat::QMatrix;

type B = Flex;

/// Seeded random weights whose matrices come quantized (Q8 for the value and down
/// projections, Q4 for the rest), as a GGUF file gives them.
struct Quantized(RandomWeights);

impl WeightSource for Quantized {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        self.0.load(name, shape)
    }

    fn has(&self, name: &str) -> bool {
        self.0.has(name)
    }

    fn load_quant(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<QMatrix>, ModelError> {
        let w = self.0.load(name, &[rows, cols])?;
        Ok(if name.contains("attn_v") || name.contains("ffn_down") {
            QMatrix::quantize_q8(&w, rows, cols)
        } else {
            QMatrix::quantize_q4(&w, rows, cols)
        })
    }
}

fn config(rope_style: RopeStyle, qkv_bias: bool, tied_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        vocab: 96,
        hidden: 64,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        ffn: 128,
        context: 1024,
        rope_style,
        qkv_bias,
        tied_embeddings,
        ..LlamaConfig::tiny()
    }
}

fn rows(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [n, v] = t.dims();
    let d: Vec<f32> = t.into_data().to_vec().expect("ok in this test");
    (0..n).map(|i| d[i * v..(i + 1) * v].to_vec()).collect()
}

fn prompt(id: u64, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((id * 13 + i as u64 * 7) % 96) as u32)
        .collect()
}

/// Prompts of several lengths (one over several chunks), then decode steps of 1, 3 and 17
/// sequences (17 is past the host step's limit: the tensor path runs it): every logits row.
fn run(m: &Llama<B>) -> Vec<Vec<f32>> {
    let mut cache = PagedKvCache::new(m.kv_layout(8, 0), 1024);
    let lens: Vec<usize> = (0..17).map(|i| 1 + (i * 37) % 300).collect();
    let seqs: Vec<u64> = lens.iter().map(|_| cache.create()).collect();
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(i as u64, n))
        .collect();
    let items: Vec<(u64, &[u32])> = seqs
        .iter()
        .zip(&prompts)
        .map(|(&s, p)| (s, p.as_slice()))
        .collect();
    let mut out = rows(m.prefill_batch(&mut cache, &items).expect("room"));
    for (step, width) in [1usize, 3, 17, 3, 1].into_iter().enumerate() {
        let batch: Vec<(u64, u32)> = seqs[..width]
            .iter()
            .map(|&s| (s, (step * 5 + s as usize) as u32 % 96))
            .collect();
        out.extend(rows(m.forward_decode(&mut cache, &batch).expect("room")));
    }
    assert!(cache.check_invariants());
    out
}

#[test]
fn the_forward_passes_on_the_host_equal_the_tensor_path_on_quantized_weights() {
    for (style, bias, tied) in [
        (RopeStyle::Adjacent, false, false),
        (RopeStyle::Halves, true, true),
    ] {
        let load = || {
            Llama::<B>::load(
                config(style, bias, tied),
                &Quantized(RandomWeights::new(5)),
                &Default::default(),
            )
            .expect("ok in this test")
        };
        let (host, tensor) = (
            load().with_host_attention(true),
            load().with_host_attention(false),
        );
        let (a, b) = (run(&host), run(&tensor));
        assert_eq!(a.len(), b.len());
        let scale = b.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.1, "logits of some size: {scale}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let diff = x
                .iter()
                .zip(y)
                .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff < 1e-4 * scale.max(1.0),
                "{style:?}: row {i} differs by {diff}"
            );
        }
    }
}
