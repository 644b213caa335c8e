//! The forward passes on the host (a decode step, a packed or chunked prefill), for a model
//! whose matrices are all quantized blocks on the CPU and whose cache is in host memory (the CPU
//! worker's default): every layer runs on plain vectors with the quantized dot products, RoPE,
//! the paged attention that reads the cache in place, and the element-wise steps written out,
//! so a step makes no tensor of the backend.
//!
//! A decode step is small (a few rows of a few hundred values between products of a few
//! hundred thousand weights), and on burn's CPU backend each tensor operation allocates, copies
//! strided views and hands work to the thread pool: about twenty of them per layer cost as much
//! as the layer's products at batch 1 (a 12.6 ms step, whose products take about 6.7 ms in the
//! products' benchmark, `benches/qmat.rs`). The values are those of the tensor path up to the
//! order of additions (a test compares both).

use std::sync::Arc;

use burn::prelude::*;

use super::attention::{QueryRow, paged_attention};
use super::linear::Linear;
use super::{Layer, Llama, RopeStyle};
use crate::kv::{KvError, PagedKvCache, SeqId};
use crate::qmat::QMatrix;

/// Most sequences a host step takes: past this the products dequantize their matrices for a
/// GEMM ([`super::linear`]), which the tensor path does.
pub(super) const HOST_DECODE_MAX: usize = 16;

/// The weights as the host step reads them: the quantized matrices shared with the tensor
/// path, the norms and biases copied out of their tensors once.
#[derive(Debug)]
pub(super) struct HostWeights {
    embed: Arc<QMatrix>,
    layers: Vec<HostLayer>,
    norm: Vec<f32>,
    lm_head: Arc<QMatrix>,
}

#[derive(Debug)]
struct HostLayer {
    attn_norm: Vec<f32>,
    bias: Option<[Vec<f32>; 3]>,
    wq: Arc<QMatrix>,
    wk: Arc<QMatrix>,
    wv: Arc<QMatrix>,
    wo: Arc<QMatrix>,
    ffn_norm: Vec<f32>,
    w_gate: Arc<QMatrix>,
    w_up: Arc<QMatrix>,
    w_down: Arc<QMatrix>,
}

fn host_vec<B: Backend>(t: &Tensor<B, 1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap_or_default()
}

fn quant<B: Backend>(l: &Linear<B>) -> Option<Arc<QMatrix>> {
    match l {
        Linear::Quant(q) => Some(q.clone()),
        Linear::Dense(_) => None,
    }
}

impl HostWeights {
    /// `None` unless every matrix is quantized (a dense one would need a GEMM of its own).
    pub(super) fn new<B: Backend>(
        embed: &Linear<B>,
        layers: &[Layer<B>],
        norm: &Tensor<B, 1>,
        lm_head: &Linear<B>,
    ) -> Option<Self> {
        let layers = layers
            .iter()
            .map(|l| {
                Some(HostLayer {
                    attn_norm: host_vec(&l.attn_norm),
                    bias: l
                        .bias
                        .as_ref()
                        .map(|b| [host_vec(&b[0]), host_vec(&b[1]), host_vec(&b[2])]),
                    wq: quant(&l.wq)?,
                    wk: quant(&l.wk)?,
                    wv: quant(&l.wv)?,
                    wo: quant(&l.wo)?,
                    ffn_norm: host_vec(&l.ffn_norm),
                    w_gate: quant(&l.w_gate)?,
                    w_up: quant(&l.w_up)?,
                    w_down: quant(&l.w_down)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            embed: quant(embed)?,
            layers,
            norm: host_vec(norm),
            lm_head: quant(lm_head)?,
        })
    }
}

impl<B: Backend> Llama<B> {
    /// One decode step on the host (see the module docs): `[b, vocab]` logits, row-major.
    /// The caller has checked the room and that every sequence is known.
    pub(super) fn decode_host(
        &self,
        w: &HostWeights,
        cache: &mut PagedKvCache,
        batch: &[(SeqId, u32)],
        positions: &[usize],
    ) -> Result<Vec<f32>, KvError> {
        let tokens: Vec<u32> = batch.iter().map(|r| r.1).collect();
        let rows: Vec<QueryRow> = batch
            .iter()
            .map(|r| r.0)
            .zip(positions.iter().copied())
            .collect();
        let hidden = self.hidden_host(w, cache, &tokens, &rows)?;
        Ok(w.lm_head.matmul_t(&hidden, batch.len()))
    }

    /// The final-norm hidden states (`[tokens, hidden]`, row-major) of `tokens`, token `i`
    /// continuing sequence `rows[i].0` at position `rows[i].1`: a decode step's one token per
    /// sequence, or a packed prefill's runs of consecutive positions. Each layer appends the
    /// tokens' K/V in row order, then every row attends to its sequence up to its position.
    /// The caller has checked the room.
    pub(super) fn hidden_host(
        &self,
        w: &HostWeights,
        cache: &mut PagedKvCache,
        tokens: &[u32],
        rows: &[QueryRow],
    ) -> Result<Vec<f32>, KvError> {
        let c = &self.config;
        let (n, h, hd) = (tokens.len(), c.hidden, c.head_dim);
        let kv_width = c.kv_heads * hd;
        let mut x = vec![0.0f32; n * h];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            // Token ids were checked against the vocabulary by the engine; one past it reads
            // row 0 rather than panicking, as the tensor path does.
            let t = if (t as usize) < w.embed.rows {
                t as usize
            } else {
                0
            };
            w.embed.dequantize_row(t, row);
        }
        let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let rope = RopeRows::new(&self.inv_freq, &positions, c.rope_style);
        let mut hn = vec![0.0f32; n * h];
        for (li, l) in w.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, c.rms_eps as f32, &mut hn);
            let [mut q, mut k, mut v] =
                three(QMatrix::matmul_t_many(&[&l.wq, &l.wk, &l.wv], &hn, n));
            if let Some([bq, bk, bv]) = &l.bias {
                add_rows(&mut q, bq);
                add_rows(&mut k, bk);
                add_rows(&mut v, bv);
            }
            rope.apply(&mut q, hd);
            rope.apply(&mut k, hd);
            for (i, &(seq, _)) in rows.iter().enumerate() {
                let r = i * kv_width..(i + 1) * kv_width;
                cache.append(seq, li, &k[r.clone()], &v[r])?;
            }
            let attended = paged_attention(
                cache,
                li,
                &q,
                rows,
                c.heads,
                1.0 / (c.head_dim as f32).sqrt(),
            )?;
            add(&mut x, &l.wo.matmul_t(&attended, n));
            rms_norm(&x, &l.ffn_norm, c.rms_eps as f32, &mut hn);
            let [mut gate, up] = two(QMatrix::matmul_t_many(&[&l.w_gate, &l.w_up], &hn, n));
            for (g, u) in gate.iter_mut().zip(&up) {
                // SiLU(g) · u
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            add(&mut x, &l.w_down.matmul_t(&gate, n));
        }
        rms_norm(&x, &w.norm, c.rms_eps as f32, &mut hn);
        Ok(hn)
    }
}

/// `out = x / sqrt(mean(x²) + eps) · w`, row by row.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// The products of [`QMatrix::matmul_t_many`] as an array (it returns one per matrix).
fn three(mut v: Vec<Vec<f32>>) -> [Vec<f32>; 3] {
    let c = v.pop().unwrap_or_default();
    let b = v.pop().unwrap_or_default();
    [v.pop().unwrap_or_default(), b, c]
}

fn two(mut v: Vec<Vec<f32>>) -> [Vec<f32>; 2] {
    let b = v.pop().unwrap_or_default();
    [v.pop().unwrap_or_default(), b]
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Adds `bias` to every row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add(row, bias);
    }
}

/// RoPE's cosines and sines for each row's position (`[rows, head_dim / 2]`), and which
/// dimensions it pairs.
struct RopeRows {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
}

impl RopeRows {
    fn new(inv_freq: &[f64], positions: &[usize], style: RopeStyle) -> Self {
        let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
        let mut sin = Vec::with_capacity(cos.capacity());
        for &p in positions {
            for f in inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos,
            sin,
            half: inv_freq.len(),
            style,
        }
    }

    /// Rotates every head of every row of `x` (`[rows, heads · head_dim]`) by its row's table.
    fn apply(&self, x: &mut [f32], head_dim: usize) {
        let rows = self.cos.len() / self.half.max(1);
        let width = x.len() / rows.max(1);
        for (r, row) in x.chunks_exact_mut(width).enumerate() {
            let cos = &self.cos[r * self.half..(r + 1) * self.half];
            let sin = &self.sin[r * self.half..(r + 1) * self.half];
            for head in row.chunks_exact_mut(head_dim) {
                for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
                    let (a, b) = match self.style {
                        RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                        RopeStyle::Halves => (i, i + self.half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c - x1 * s;
                    head[b] = x0 * s + x1 * c;
                }
            }
        }
    }
}
