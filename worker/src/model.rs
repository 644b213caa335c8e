//! Llama-family transformer in burn: config from GGUF metadata, weights dequantized on load,
//! a full-sequence forward pass returning logits.
//!
//! This first version recomputes the whole sequence (no KV cache yet); the paged cache and the
//! batched decode step build on the same layers.
//!
//! # Shapes
//! - input: `seq` token ids
//! - hidden states: `[seq, hidden]`
//! - per-head tensors: `[heads, seq, head_dim]`
//! - logits: `[seq, vocab]`
//!
//! RoPE note: llama.cpp's converter permutes the rows of Q and K so that GGUF Llama weights use
//! ggml's "normal" RoPE, which rotates *adjacent* pairs `(x[2i], x[2i+1])` by `pos·θ^(-2i/d)`
//! (not the halves that Hugging Face's `rotate_half` pairs up).

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};

use crate::gguf::{Gguf, GgufError};
use crate::kv::{KvError, KvLayout, PagedKvCache, SeqId};

/// Architecture of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub context: usize,
}

/// A model that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("architecture {0:?} is not supported (llama is)")]
    UnsupportedArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("tensor `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
}

impl LlamaConfig {
    /// Reads the architecture from GGUF metadata (`llama.*` keys).
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.into()));
        }
        let u = |k: &str| -> Result<usize, ModelError> {
            usize::try_from(g.get_u64(&format!("llama.{k}"))?)
                .map_err(|_| ModelError::Config(format!("llama.{k} too large")))
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || hidden % heads != 0 {
            return Err(ModelError::Config(format!(
                "{heads} heads and {kv_heads} KV heads do not divide hidden size {hidden}"
            )));
        }
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .tensor("token_embd.weight")?
                .dims
                .get(1)
                .copied()
                .unwrap_or(0) as usize,
        };
        Ok(Self {
            vocab,
            hidden,
            layers: u("block_count")?,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ffn: u("feed_forward_length")?,
            rope_theta: g.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: g
                .get_f64("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            context: u("context_length").unwrap_or(4096),
        })
    }
}

#[derive(Debug)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    wo: Tensor<B, 2>,
    ffn_norm: Tensor<B, 1>,
    w_gate: Tensor<B, 2>,
    w_up: Tensor<B, 2>,
    w_down: Tensor<B, 2>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    /// `[hidden, vocab]`: the output matrix, or the embedding transposed when tied.
    lm_head: Tensor<B, 2>,
    device: B::Device,
}

/// Loads a weight of GGUF dims `dims` (innermost first) as a `[rows, cols]` tensor with
/// `rows = dims[1]`, `cols = dims[0]`.
fn matrix<B: Backend>(
    g: &Gguf,
    name: &str,
    cols: usize,
    rows: usize,
    dev: &B::Device,
) -> Result<Tensor<B, 2>, ModelError> {
    let t = g.tensor(name)?;
    let want = vec![cols as u64, rows as u64];
    if t.dims != want {
        return Err(ModelError::Shape {
            name: name.into(),
            got: t.dims.clone(),
            want,
        });
    }
    let data = g.dequantize(name)?;
    Ok(Tensor::from_data(TensorData::new(data, [rows, cols]), dev))
}

fn vector<B: Backend>(
    g: &Gguf,
    name: &str,
    len: usize,
    dev: &B::Device,
) -> Result<Tensor<B, 1>, ModelError> {
    let t = g.tensor(name)?;
    if t.dims != [len as u64] {
        return Err(ModelError::Shape {
            name: name.into(),
            got: t.dims.clone(),
            want: vec![len as u64],
        });
    }
    Ok(Tensor::from_data(
        TensorData::new(g.dequantize(name)?, [len]),
        dev,
    ))
}

impl<B: Backend> Llama<B> {
    /// Loads the model from a parsed GGUF file, dequantizing every weight to f32.
    pub fn from_gguf(g: &Gguf, device: &B::Device) -> Result<Self, ModelError> {
        let c = LlamaConfig::from_gguf(g)?;
        let (h, hd) = (c.hidden, c.head_dim);
        let embed = matrix::<B>(g, "token_embd.weight", h, c.vocab, device)?;
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            // Projections are stored [out, in]; forward multiplies x[seq, in] by [in, out].
            let m = |s: &str, inp: usize, out: usize| {
                matrix::<B>(g, &n(s), inp, out, device).map(Tensor::transpose)
            };
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm"), h, device)?,
                wq: m("attn_q", h, c.heads * hd)?,
                wk: m("attn_k", h, c.kv_heads * hd)?,
                wv: m("attn_v", h, c.kv_heads * hd)?,
                wo: m("attn_output", c.heads * hd, h)?,
                ffn_norm: vector(g, &n("ffn_norm"), h, device)?,
                w_gate: m("ffn_gate", h, c.ffn)?,
                w_up: m("ffn_up", h, c.ffn)?,
                w_down: m("ffn_down", c.ffn, h)?,
            });
        }
        let norm = vector(g, "output_norm.weight", h, device)?;
        let lm_head = match g.tensor("output.weight") {
            Ok(_) => matrix::<B>(g, "output.weight", h, c.vocab, device)?.transpose(),
            Err(_) => embed.clone().transpose(),
        };
        Ok(Self {
            config: c,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    fn rms_norm(&self, x: Tensor<B, 2>, w: &Tensor<B, 1>) -> Tensor<B, 2> {
        let var = x.clone().powf_scalar(2.0).mean_dim(1);
        let x = x * (var + self.config.rms_eps).sqrt().recip();
        x * w.clone().unsqueeze_dim(0)
    }

    /// Adjacent-pair RoPE on `[heads, seq, head_dim]` for positions `start..start + seq`.
    fn rope(&self, x: Tensor<B, 3>, start: usize, seq: usize) -> Tensor<B, 3> {
        let [heads, _, hd] = x.dims();
        let half = hd / 2;
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in start..start + seq {
            for i in 0..half {
                let angle = p as f64 * self.config.rope_theta.powf(-2.0 * i as f64 / hd as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| -> Tensor<B, 4> {
            Tensor::<B, 2>::from_data(TensorData::new(v, [seq, half]), &self.device)
                .reshape([1, seq, half, 1])
        };
        let (cos, sin) = (table(cos), table(sin));
        let pairs: Tensor<B, 4> = x.reshape([heads, seq, half, 2]);
        let x0 = pairs.clone().narrow(3, 0, 1);
        let x1 = pairs.narrow(3, 1, 1);
        let r0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
        let r1 = x0 * sin + x1 * cos;
        Tensor::cat(vec![r0, r1], 3).reshape([heads, seq, hd])
    }

    fn embed_tokens(&self, tokens: &[u32]) -> Tensor<B, 2> {
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let ids =
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &self.device);
        self.embed.clone().select(0, ids)
    }

    /// Q (`[heads, n, head_dim]`), K and V (`[kv_heads, n, head_dim]`) of `n` new tokens at
    /// positions `start..start + n`, RoPE applied to Q and K.
    fn qkv(
        &self,
        l: &Layer<B>,
        h: Tensor<B, 2>,
        start: usize,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let c = &self.config;
        let n = h.dims()[0];
        let split = |w: &Tensor<B, 2>, heads: usize| {
            h.clone()
                .matmul(w.clone())
                .reshape([n, heads, c.head_dim])
                .swap_dims(0, 1)
        };
        let q = self.rope(split(&l.wq, c.heads), start, n);
        let k = self.rope(split(&l.wk, c.kv_heads), start, n);
        (q, k, split(&l.wv, c.kv_heads))
    }

    /// Causal grouped-query attention of `q` (`[heads, n, head_dim]`) over `k`, `v`
    /// (`[kv_heads, total, head_dim]`); `mask` is true where attention is forbidden
    /// (`[heads, n, total]`). Returns `[n, heads · head_dim]`.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        mask: Tensor<B, 3, Bool>,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let [_, n, _] = q.dims();
        let total = k.dims()[1];
        let group = c.heads / c.kv_heads;
        // Query head j reads KV head j / group.
        let expand = |t: Tensor<B, 3>| -> Tensor<B, 3> {
            t.unsqueeze_dim::<4>(1)
                .expand([c.kv_heads, group, total, c.head_dim])
                .reshape([c.heads, total, c.head_dim])
        };
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = q
            .matmul(expand(k).swap_dims(1, 2))
            .mul_scalar(scale)
            .mask_fill(mask, f32::NEG_INFINITY);
        softmax(scores, 2)
            .matmul(expand(v))
            .swap_dims(0, 1)
            .reshape([n, c.heads * c.head_dim])
    }

    /// The feed-forward half of a layer, residual included.
    fn mlp(&self, l: &Layer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = self.rms_norm(x.clone(), &l.ffn_norm);
        let gate = silu(h.clone().matmul(l.w_gate.clone()));
        let up = h.matmul(l.w_up.clone());
        x + (gate * up).matmul(l.w_down.clone())
    }

    /// Logits for every position of `tokens` (`[seq, vocab]`).
    pub fn forward(&self, tokens: &[u32]) -> Tensor<B, 2> {
        let c = &self.config;
        let seq = tokens.len();
        let mut x = self.embed_tokens(tokens);
        let mask = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, &self.device)
            .unsqueeze_dim::<3>(0)
            .expand([c.heads, seq, seq]);
        for l in &self.layers {
            let h = self.rms_norm(x.clone(), &l.attn_norm);
            let (q, k, v) = self.qkv(l, h, 0);
            x = x + self.attend(q, k, v, mask.clone()).matmul(l.wo.clone());
            x = self.mlp(l, x);
        }
        self.rms_norm(x, &self.norm).matmul(self.lm_head.clone())
    }

    /// The cache layout this model's K/V need (`model_hash` identifies the weights).
    pub fn kv_layout(&self, block_size: usize, model_hash: u64) -> KvLayout {
        let c = &self.config;
        KvLayout {
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            block_size,
            model_hash,
        }
    }

    /// Runs `tokens` as the continuation of sequence `seq` in `cache` (a prefill when the
    /// sequence is empty, a decode step with one token), appending their K/V; returns the logits
    /// of the new positions (`[tokens, vocab]`).
    pub fn forward_cached(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        tokens: &[u32],
    ) -> Result<Tensor<B, 2>, KvError> {
        let c = &self.config;
        let n = tokens.len();
        let start = cache.len(seq)?;
        let total = start + n;
        let width = c.kv_heads * c.head_dim;
        let mut x = self.embed_tokens(tokens);
        // New position i (absolute start + i) sees cached positions j <= start + i.
        let mask = Tensor::<B, 2, Bool>::tril_mask([n, total], start as i64, &self.device)
            .unsqueeze_dim::<3>(0)
            .expand([c.heads, n, total]);
        let from_cache = |d: Vec<f32>| -> Tensor<B, 3> {
            Tensor::<B, 2>::from_data(TensorData::new(d, [total, width]), &self.device)
                .reshape([total, c.kv_heads, c.head_dim])
                .swap_dims(0, 1)
        };
        for (li, l) in self.layers.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &l.attn_norm);
            let (q, k, v) = self.qkv(l, h, start);
            // Cache rows are tokens: [n, kv_heads, head_dim].
            let kd: Vec<f32> = k.swap_dims(0, 1).into_data().to_vec().unwrap_or_default();
            let vd: Vec<f32> = v.swap_dims(0, 1).into_data().to_vec().unwrap_or_default();
            for t in 0..n {
                cache.append(
                    seq,
                    li,
                    &kd[t * width..(t + 1) * width],
                    &vd[t * width..(t + 1) * width],
                )?;
            }
            let (ka, va) = cache.gather(seq, li)?;
            x = x + self
                .attend(q, from_cache(ka), from_cache(va), mask.clone())
                .matmul(l.wo.clone());
            x = self.mlp(l, x);
        }
        Ok(self.rms_norm(x, &self.norm).matmul(self.lm_head.clone()))
    }
}
