//! Llama-family transformer in burn (Llama 1-3, SmolLM, Qwen2): config -> load -> forward.
//!
//! [`LlamaConfig`] comes from GGUF metadata or a Hugging Face `config.json`; [`Llama::load`] reads
//! weights (GGUF naming) from any [`WeightSource`]; three forward passes share one set of layer
//! helpers: [`Llama::forward`] (dense, no cache), [`Llama::forward_cached`] (a prefill or
//! continuation of one sequence over the paged KV cache) and [`Llama::forward_decode`] (one
//! token for each of a batch of sequences).
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
use burn::tensor::activation::softmax;

use dopd_model::gguf::Gguf;
use std::sync::Arc;

use crate::kv::{KvLayout, PagedKvCache};
use crate::qmat::QMatrix;

mod attention;
mod cached;
mod device_kv;
mod fused;
mod host;
mod linear;
pub use device_kv::{ATTENTION_PAD, DeviceKv, decode_bucket, decode_buckets};
use linear::Linear;
pub use linear::WeightMode;

pub use dopd_model::config::{Llama3RopeScaling, LlamaConfig, ModelError, RopeStyle};

/// Prompt tokens run through the layers together in a cached prefill. A chunk's attention
/// scores take `heads · PREFILL_CHUNK · context` floats (SmolLM2 at an 8k context: 75 MB), so a
/// long prompt's memory grows linearly with its length; and a chunk is long enough that the
/// projections stay matrix-matrix products.
pub const PREFILL_CHUNK: usize = 256;

/// Most prompt tokens one packed pass of [`Llama::prefill_batch`] takes from several short
/// prompts. On the CPU the per-token rate of a pass peaks near 128 rows (2-core EPYC, SmolLM2:
/// 8 rows 270 tok/s, 32 rows 345, 128 rows 465, 256 rows 420), so short prompts are packed up
/// to that and no further.
pub const PACK_TOKENS: usize = 128;

#[derive(Debug)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    /// Projections are stored `[in, out]` so that `x[n, in] · w` gives `[n, out]`.
    wq: Linear<B>,
    wk: Linear<B>,
    wv: Linear<B>,
    /// `[out]` each, when the architecture has QKV bias.
    bias: Option<[Tensor<B, 1>; 3]>,
    /// With the fused GPU kernels: `[Wq Wk Wv]` as one `[in, q + k + v]` matrix and the three
    /// biases (zeros without) as one vector; `wq`, `wk` and `wv` are then views of its columns.
    qkv: Option<(Tensor<B, 2>, Tensor<B, 1>)>,
    wo: Linear<B>,
    ffn_norm: Tensor<B, 1>,
    w_gate: Linear<B>,
    w_up: Linear<B>,
    w_down: Linear<B>,
}

impl<B: Backend> Layer<B> {
    /// Joins Q, K and V's dense matrices into one (see `qkv`), keeping views of it.
    fn fuse_qkv(&mut self, device: &B::Device) {
        let (Linear::Dense(q), Linear::Dense(k), Linear::Dense(v)) = (&self.wq, &self.wk, &self.wv)
        else {
            return;
        };
        let widths = [q.dims()[1], k.dims()[1], v.dims()[1]];
        let w = Tensor::cat(vec![q.clone(), k.clone(), v.clone()], 1);
        let bias = match &self.bias {
            Some(b) => Tensor::cat(b.to_vec(), 0),
            None => Tensor::zeros([widths.iter().sum::<usize>()], device),
        };
        let view = |from: usize, n: usize| Linear::Dense(w.clone().narrow(1, from, n));
        self.wq = view(0, widths[0]);
        self.wk = view(widths[0], widths[1]);
        self.wv = view(widths[0] + widths[1], widths[2]);
        self.qkv = Some((w, bias));
    }
}

/// A loaded model.
#[derive(Debug)]
pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    embed: Linear<B>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    /// `[hidden, vocab]`: the output matrix, or the embedding transposed when tied.
    lm_head: Linear<B>,
    /// One inverse frequency per rotated pair (scaling applied).
    inv_freq: Vec<f64>,
    /// `[head_dim]`: for each dimension of a head, the other one of its RoPE pair.
    rope_partner: Tensor<B, 1, Int>,
    device: B::Device,
    /// Attention over the paged cache on the host, reading K/V in place (the CPU backend), or
    /// as tensor operations on gathered K/V (other backends).
    host_attention: bool,
    /// The weights as the decode step on the host reads them, when every matrix is quantized.
    host: Option<host::HostWeights>,
    /// One-kernel versions of the hot operations, on burn's CubeCL backends ([`fused`]).
    fused: Option<Arc<dyn fused::FusedOps<B>>>,
}

/// RoPE's cosines and signed sines for the rows of one forward pass, `[n, 1, head_dim]` each
/// (see [`Llama::rope_table`]).
struct Rope<B: Backend> {
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    /// The same times attention's `1/√head_dim`, for Q: the scores come out scaled, with no
    /// operation of their own.
    q_cos: Tensor<B, 3>,
    q_sin: Tensor<B, 3>,
}

/// Where weights come from: a name and a row-major `[rows, cols]` shape (PyTorch's
/// `[out, in]` for projections) to f32 values.
pub trait WeightSource {
    /// The tensor `name` (in GGUF naming, e.g. `blk.0.attn_q.weight`) with exactly `shape`.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;
    /// Whether the source holds `name`.
    fn has(&self, name: &str) -> bool;
    /// The tensor `name` (`[rows, cols]`) in its quantized blocks, when the source stores it so;
    /// `None` has it loaded as f32.
    fn load_quant(
        &self,
        _name: &str,
        _rows: usize,
        _cols: usize,
    ) -> Result<Option<QMatrix>, ModelError> {
        Ok(None)
    }
}

impl WeightSource for Gguf {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let t = self
            .tensor(name)
            .map_err(|_| ModelError::MissingTensor(name.into()))?;
        // GGUF lists dims innermost first.
        let want: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if t.dims != want {
            return Err(ModelError::Shape {
                name: name.into(),
                got: t.dims.clone(),
                want,
            });
        }
        Ok(self.dequantize(name)?)
    }

    fn has(&self, name: &str) -> bool {
        self.tensor(name).is_ok()
    }

    fn load_quant(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<QMatrix>, ModelError> {
        if !self.has(name) {
            return Err(ModelError::MissingTensor(name.into()));
        }
        Ok(QMatrix::from_gguf(self, name, rows, cols)?)
    }
}

impl<B: Backend> Llama<B> {
    /// Loads the model from a parsed GGUF file, dequantizing every weight to f32.
    pub fn from_gguf(g: &Gguf, device: &B::Device) -> Result<Self, ModelError> {
        Self::from_gguf_with(g, device, WeightMode::for_backend::<B>())
    }

    /// [`Llama::from_gguf`] with the weights kept as `mode` says.
    pub fn from_gguf_with(
        g: &Gguf,
        device: &B::Device,
        mode: WeightMode,
    ) -> Result<Self, ModelError> {
        let c = LlamaConfig::from_gguf(g)?;
        let mut m = Self::load_with(c, g, device, mode)?;
        // Llama 3 GGUFs carry the RoPE scaling as per-frequency divisors.
        if g.has("rope_freqs.weight") {
            let f = g.load("rope_freqs.weight", &[m.inv_freq.len()])?;
            for (inv, d) in m.inv_freq.iter_mut().zip(f) {
                if !(d > 0.0) {
                    return Err(ModelError::Config(
                        "rope_freqs.weight holds a non-positive factor".into(),
                    ));
                }
                *inv /= f64::from(d);
            }
        }
        Ok(m)
    }

    /// Loads the weights named in GGUF style from any source.
    pub fn load<S: WeightSource>(
        c: LlamaConfig,
        src: &S,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Self::load_with(c, src, device, WeightMode::for_backend::<B>())
    }

    /// [`Llama::load`] with the weights kept as `mode` says.
    pub fn load_with<S: WeightSource>(
        c: LlamaConfig,
        src: &S,
        device: &B::Device,
        mode: WeightMode,
    ) -> Result<Self, ModelError> {
        c.validate()?;
        let quant =
            |name: &str, rows: usize, cols: usize| -> Result<Option<Arc<QMatrix>>, ModelError> {
                let q = match mode {
                    WeightMode::Dense => return Ok(None),
                    WeightMode::Quantized => src.load_quant(name, rows, cols)?,
                    WeightMode::QuantizedInt8 => src
                        .load_quant(name, rows, cols)?
                        .map(|q| q.interleaved().unwrap_or(q)),
                };
                Ok(q.map(Arc::new))
            };
        let (h, hd) = (c.hidden, c.head_dim);
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Tensor<B, 2>, ModelError> {
            let d = src.load(name, &[rows, cols])?;
            Ok(Tensor::from_data(TensorData::new(d, [rows, cols]), device))
        };
        // `[rows, cols]` stored, `[cols, rows]` kept, laid out contiguously: a transposed *view*
        // would make some backends copy the whole matrix at every matmul.
        let mat_t = |name: &str, rows: usize, cols: usize| -> Result<Tensor<B, 2>, ModelError> {
            let d = src.load(name, &[rows, cols])?;
            Ok(Tensor::from_data(
                TensorData::new(transpose(&d, rows, cols), [cols, rows]),
                device,
            ))
        };
        let vec = |name: &str, len: usize| -> Result<Tensor<B, 1>, ModelError> {
            Ok(Tensor::from_data(
                TensorData::new(src.load(name, &[len])?, [len]),
                device,
            ))
        };
        let embed_q = quant("token_embd.weight", c.vocab, h)?;
        let embed = match &embed_q {
            Some(q) => Linear::Quant(q.clone()),
            None => Linear::Dense(mat("token_embd.weight", c.vocab, h)?),
        };
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            // Stored [out, in]; kept transposed.
            let proj = |s: &str, inp: usize, out: usize| -> Result<Linear<B>, ModelError> {
                Ok(match quant(&n(s), out, inp)? {
                    Some(q) => Linear::Quant(q),
                    None => Linear::Dense(mat_t(&n(s), out, inp)?),
                })
            };
            let bias = if c.qkv_bias {
                let b = |s: &str, len| vec(&format!("blk.{l}.{s}.bias"), len);
                Some([
                    b("attn_q", c.heads * hd)?,
                    b("attn_k", c.kv_heads * hd)?,
                    b("attn_v", c.kv_heads * hd)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm"), h)?,
                wq: proj("attn_q", h, c.heads * hd)?,
                wk: proj("attn_k", h, c.kv_heads * hd)?,
                wv: proj("attn_v", h, c.kv_heads * hd)?,
                bias,
                qkv: None,
                wo: proj("attn_output", c.heads * hd, h)?,
                ffn_norm: vec(&n("ffn_norm"), h)?,
                w_gate: proj("ffn_gate", h, c.ffn)?,
                w_up: proj("ffn_up", h, c.ffn)?,
                w_down: proj("ffn_down", c.ffn, h)?,
            });
        }
        let norm = vec("output_norm.weight", h)?;
        let lm_head = if c.tied_embeddings {
            match embed_q {
                Some(q) => Linear::Quant(q),
                None => Linear::Dense(mat_t("token_embd.weight", c.vocab, h)?),
            }
        } else {
            match quant("output.weight", c.vocab, h)? {
                Some(q) => Linear::Quant(q),
                None => Linear::Dense(mat_t("output.weight", c.vocab, h)?),
            }
        };
        let fused = fused::for_backend::<B>();
        if fused.is_some() {
            for l in &mut layers {
                l.fuse_qkv(device);
            }
        }
        let host = host::HostWeights::new(&embed, &layers, &norm, &lm_head);
        Ok(Self {
            host,
            inv_freq: c.inv_freq(),
            rope_partner: rope_partner(&c, device),
            config: c,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            host_attention: WeightMode::for_backend::<B>() == WeightMode::Quantized,
            fused,
        })
    }

    /// Turns the fused GPU kernels off (or back on, where the backend has them): the forward
    /// passes then run every operation as burn's tensor operations. For comparisons; both
    /// compute the same values within rounding, and tests compare them.
    pub fn with_fused_kernels(mut self, on: bool) -> Self {
        self.fused = if on { fused::for_backend::<B>() } else { None };
        self
    }

    /// Whether the forward passes use fused GPU kernels (see [`Llama::with_fused_kernels`]).
    pub fn fused_kernels(&self) -> bool {
        self.fused.is_some()
    }

    /// Chooses the attention over the paged cache: on the host, reading K/V where they lie
    /// (the default on the CPU backend), or as tensor operations on gathered K/V (the default
    /// elsewhere). Both compute the same values; tests compare them.
    pub fn with_host_attention(mut self, on: bool) -> Self {
        self.host_attention = on;
        self
    }

    /// A KV cache of `capacity` blocks for this model: in host memory where attention runs on
    /// the host (the CPU backend), otherwise in the device's memory ([`DeviceKv`]), where the
    /// forward passes write and read it without copying K/V to the host.
    pub fn new_cache(&self, layout: KvLayout, capacity: usize) -> PagedKvCache {
        if self.host_attention {
            PagedKvCache::new(layout, capacity)
        } else {
            let store = DeviceKv::<B>::new(layout, capacity, &self.device);
            PagedKvCache::on_device(layout, capacity, Box::new(store))
        }
    }

    /// A model with seeded random weights (roughly normal, std 0.2; norms near 1), for tests and
    /// benchmarks of shapes no file provides.
    pub fn random(c: LlamaConfig, seed: u64, device: &B::Device) -> Result<Self, ModelError> {
        Self::load(c, &RandomWeights::new(seed), device)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Bytes the weights hold (quantized matrices as stored, the rest as f32; a matrix shared
    /// by the embedding and the output counted once).
    pub fn weight_bytes(&self) -> usize {
        let f32s = |dims: &[usize]| 4 * dims.iter().product::<usize>();
        let lin = |l: &Linear<B>| match l {
            Linear::Dense(t) => f32s(&t.dims()),
            Linear::Quant(q) => q.bytes(),
        };
        let shared = matches!((&self.embed, &self.lm_head), (Linear::Quant(a), Linear::Quant(b)) if Arc::ptr_eq(a, b));
        let mut n = lin(&self.embed) + f32s(&self.norm.dims());
        if !shared {
            n += lin(&self.lm_head);
        }
        for l in &self.layers {
            n += [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                .into_iter()
                .map(lin)
                .sum::<usize>();
            n += f32s(&l.attn_norm.dims()) + f32s(&l.ffn_norm.dims());
            if let Some(b) = &l.bias {
                n += b.iter().map(|t| f32s(&t.dims())).sum::<usize>();
            }
        }
        n
    }

    fn rms_norm(&self, x: Tensor<B, 2>, w: &Tensor<B, 1>) -> Tensor<B, 2> {
        if let Some(f) = &self.fused
            && let Some(y) = f.rms_norm(&x, w, self.config.rms_eps as f32)
        {
            return y;
        }
        // `(var + eps)^-1/2` as one operation (on a GPU, one kernel launch, not two).
        let var = x.clone().powf_scalar(2.0).mean_dim(1);
        let x = x * (var + self.config.rms_eps).powf_scalar(-0.5);
        x * w.clone().unsqueeze_dim(0)
    }

    /// The cosines and sines RoPE applies to rows at `positions`, built once per forward pass
    /// (on a GPU, one upload per pass instead of two per projection and layer), each spread over
    /// the head's dimensions as the model's RoPE style pairs them, the sines signed as the
    /// rotation takes them.
    fn rope_table(&self, positions: &[usize]) -> Rope<B> {
        let n = positions.len();
        let hd = self.config.head_dim;
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        for &p in positions {
            let angle = |j: usize| p as f64 * self.inv_freq[j];
            for d in 0..hd {
                // Pair index and whether `d` is the first of its pair.
                let (i, first) = match self.config.rope_style {
                    RopeStyle::Adjacent => (d / 2, d % 2 == 0),
                    RopeStyle::Halves => (d % half, d < half),
                };
                let a = angle(i);
                cos.push(a.cos() as f32);
                sin.push(if first { -a.sin() } else { a.sin() } as f32);
            }
        }
        let table = |v: &[f32], scale: f32| -> Tensor<B, 3> {
            let v: Vec<f32> = v.iter().map(|x| x * scale).collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [n, hd]), &self.device).reshape([n, 1, hd])
        };
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        Rope {
            cos: table(&cos, 1.0),
            sin: table(&sin, 1.0),
            q_cos: table(&cos, scale),
            q_sin: table(&sin, scale),
        }
    }

    /// RoPE on `[n, heads, head_dim]` with the table of the rows' positions:
    /// `x·cos + partner(x)·sin`, where `partner` swaps each dimension with the other of its pair
    /// (one index select) and the table's sines carry the rotation's sign. Four operations for
    /// all heads, where slicing each pair's halves apart and joining them took eleven, which
    /// on a GPU are eleven kernel launches.
    fn rope(&self, x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(f) = &self.fused
            && let Some(y) = f.rope(&x, cos, sin, &self.rope_partner)
        {
            return y;
        }
        let partner = x.clone().select(2, self.rope_partner.clone());
        x * cos.clone() + partner * sin.clone()
    }

    fn embed_tokens(&self, tokens: &[u32]) -> Tensor<B, 2> {
        match &self.embed {
            Linear::Dense(e) => {
                let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
                let ids = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(ids, [tokens.len()]),
                    &self.device,
                );
                e.clone().select(0, ids)
            }
            Linear::Quant(q) => {
                let h = q.cols;
                let mut rows = vec![0.0f32; tokens.len() * h];
                for (&t, out) in tokens.iter().zip(rows.chunks_exact_mut(h)) {
                    // Token ids were checked against the vocabulary by the engine; one past it
                    // reads row 0 rather than panicking.
                    let t = if (t as usize) < q.rows { t as usize } else { 0 };
                    q.dequantize_row(t, out);
                }
                Tensor::from_data(TensorData::new(rows, [tokens.len(), h]), &self.device)
            }
        }
    }

    /// Q (`[n, heads, head_dim]`), K and V (`[n, kv_heads, head_dim]`) of `n` new tokens at
    /// the positions `rope` was built for, RoPE applied to Q and K, Q scaled by attention's
    /// `1/√head_dim`. Token-major, as the projections lay them out: the pool takes K/V rows
    /// so, and a decode step's attention takes Q so, without a copy.
    fn qkv(
        &self,
        l: &Layer<B>,
        h: Tensor<B, 2>,
        rope: &Rope<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let c = &self.config;
        let n = h.dims()[0];
        let (qw, kw) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        // Joined matrices (the GPU backends): one product, its columns split.
        let joined = l.qkv.as_ref().map(|(w, b)| {
            let y = h.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
            [(0, qw), (qw, kw), (qw + kw, kw)].map(|(from, len)| y.clone().narrow(1, from, len))
        });
        let [q, k, v] = joined.unwrap_or_else(|| {
            let b = |i: usize| l.bias.as_ref().map(|b| &b[i]);
            [(&l.wq, b(0)), (&l.wk, b(1)), (&l.wv, b(2))].map(|(w, b)| {
                let y = w.apply(h.clone());
                match b {
                    Some(b) => y + b.clone().unsqueeze_dim(0),
                    None => y,
                }
            })
        });
        let heads = |y: Tensor<B, 2>, heads: usize| y.reshape([n, heads, c.head_dim]);
        let q = self.rope(heads(q, c.heads), &rope.q_cos, &rope.q_sin);
        let k = self.rope(heads(k, c.kv_heads), &rope.cos, &rope.sin);
        (q, k, heads(v, c.kv_heads))
    }

    /// On a device pool: Q of `h`'s rows (as [`Llama::qkv`] gives it), their K/V written into
    /// the pool of `layer` at `slots` (`[n, 1]`). With the fused kernels and joined Q/K/V
    /// matrices, two kernels; otherwise tensor operations.
    fn qkv_to_pool(
        &self,
        l: &Layer<B>,
        h: Tensor<B, 2>,
        rope: &Rope<B>,
        store: &mut DeviceKv<B>,
        layer: usize,
        slots: &Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let fused = || {
            let f = self.fused.as_ref()?;
            let (w, bias) = l.qkv.as_ref()?;
            let (kp, vp) = store.pools(layer)?;
            let y = h.clone().matmul(w.clone());
            let tables = [&rope.q_cos, &rope.q_sin, &rope.cos, &rope.sin];
            let heads = self.config.heads;
            f.qkv_into_pool(&y, bias, tables, &self.rope_partner, slots, kp, vp, heads)
        };
        if let Some(q) = fused() {
            return q;
        }
        let (q, k, v) = self.qkv(l, h, rope);
        store.write(layer, slots, self.token_rows(k), self.token_rows(v));
        q
    }

    /// A mask over `b` sequences' scores, `[b, n, t]` (true where a row of `n` new tokens may
    /// not see one of `t` positions), laid out as [`Llama::attend`] takes it:
    /// `[b, kv_heads, group·n, t]`.
    pub(crate) fn attention_mask(&self, mask: Tensor<B, 3, Bool>) -> Tensor<B, 4, Bool> {
        let c = &self.config;
        let [b, n, t] = mask.dims();
        let group = c.heads / c.kv_heads;
        mask.reshape([b, 1, 1, n, t])
            .expand([b, c.kv_heads, group, n, t])
            .reshape([b, c.kv_heads, group * n, t])
    }

    /// Grouped-query attention for `b` sequences of `n` new tokens each.
    ///
    /// - `q`: `[b·n, heads, head_dim]` (rows sequence-major);
    /// - `k`, `v`: `[b, kv_heads, t, head_dim]` (K/V need not be repeated per query head: the
    ///   `group = heads / kv_heads` query heads that share a KV head attend as one matrix);
    /// - `mask`: true where attention is forbidden (future or padding), laid out as the scores
    ///   (`[b, kv_heads, group·n, t]`, see [`Llama::attention_mask`]): built once per forward
    ///   pass, not expanded again at every layer (on a GPU, a copy kernel per layer).
    ///
    /// Returns `[b·n, heads · head_dim]`.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let [b, kvh, _, hd] = k.dims();
        let n = q.dims()[0] / b;
        let group = c.heads / kvh;
        // [b·n, heads, hd] -> [b, kv_heads, group·n, hd]: for one token per sequence (a decode
        // step) the same memory, otherwise a copy.
        let q = if n == 1 {
            q.reshape([b, kvh, group, hd])
        } else {
            q.reshape([b, n, kvh, group, hd])
                .permute([0, 2, 3, 1, 4])
                .reshape([b, kvh, group * n, hd])
        };
        let mut scores = q.matmul(k.swap_dims(2, 3));
        if let Some(mask) = mask {
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        // [b, kv_heads, group·n, hd] -> [b·n, heads·hd] (for n = 1, the same memory)
        let out = softmax(scores, 3).matmul(v);
        if n == 1 {
            out.reshape([b, c.heads * hd])
        } else {
            out.reshape([b, kvh * group, n, hd])
                .swap_dims(1, 2)
                .reshape([b * n, c.heads * hd])
        }
    }

    /// `x + y` (when there is a `y`: the last sub-layer's output, added to the residual stream)
    /// and its RMS norm with `w`, in one kernel where the fused kernels run.
    fn add_norm(
        &self,
        x: Tensor<B, 2>,
        y: Option<Tensor<B, 2>>,
        w: &Tensor<B, 1>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let Some(y) = y else {
            let h = self.rms_norm(x.clone(), w);
            return (x, h);
        };
        if let Some(f) = &self.fused
            && let Some(r) = f.add_rms_norm(&x, &y, w, self.config.rms_eps as f32)
        {
            return r;
        }
        let x = x + y;
        let h = self.rms_norm(x.clone(), w);
        (x, h)
    }

    /// The feed-forward half of a layer: adds the attention's output `attn` to the residual
    /// stream `x` and returns the stream and the MLP's output (which the next norm adds).
    fn mlp(
        &self,
        l: &Layer<B>,
        x: Tensor<B, 2>,
        attn: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (x, h) = self.add_norm(x, Some(attn), &l.ffn_norm);
        let gate = l.w_gate.apply(h.clone());
        let up = l.w_up.apply(h);
        if let Some(f) = &self.fused
            && let Some(y) = f.silu_mul(&gate, &up)
        {
            return (x, l.w_down.apply(y));
        }
        // silu(gate)·up = gate·up / (1 + e^-gate): five element-wise operations (on a GPU,
        // kernel launches), where burn's `silu` and the product took eight.
        let denom = gate.clone().mul_scalar(-1.0).exp().add_scalar(1.0);
        (x, l.w_down.apply((gate * up) / denom))
    }

    /// Logits for every position of `tokens` (`[seq, vocab]`), no cache (dense attention).
    pub fn forward(&self, tokens: &[u32]) -> Tensor<B, 2> {
        let seq = tokens.len();
        let positions: Vec<usize> = (0..seq).collect();
        let rope = self.rope_table(&positions);
        let mut x = self.embed_tokens(tokens);
        let mask = self.attention_mask(
            Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, &self.device).unsqueeze_dim(0),
        );
        let mut pending = None;
        for l in &self.layers {
            let (xs, h) = self.add_norm(x, pending.take(), &l.attn_norm);
            x = xs;
            let (q, k, v) = self.qkv(l, h, &rope);
            // [seq, kv_heads, hd] -> [1, kv_heads, seq, hd]
            let heads_first = |t: Tensor<B, 3>| t.swap_dims(0, 1).unsqueeze_dim(0);
            let out = self.attend(q, heads_first(k), heads_first(v), Some(mask.clone()));
            let (xs, y) = self.mlp(l, x, l.wo.apply(out));
            (x, pending) = (xs, Some(y));
        }
        self.lm_head.apply(self.add_norm(x, pending, &self.norm).1)
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
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`.
fn transpose(d: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; d.len()];
    for r in 0..rows {
        for (c, &x) in d[r * cols..(r + 1) * cols].iter().enumerate() {
            out[c * rows + r] = x;
        }
    }
    out
}

/// Seeded random weights in GGUF naming (see [`Llama::random`]).
pub struct RandomWeights {
    pub seed: u64,
    /// Standard deviation of the matrices (norm weights are `1 ± std/2`).
    pub std: f32,
}

impl RandomWeights {
    /// The test default: std 0.2, large enough that tiny models' logits separate clearly.
    pub fn new(seed: u64) -> Self {
        Self { seed, std: 0.2 }
    }
}

impl WeightSource for RandomWeights {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        use rand::{Rng, SeedableRng};
        // One stream per tensor name, so the weights do not depend on loading order.
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(h);
        let n: usize = shape.iter().product();
        let norm = name.contains("norm");
        Ok((0..n)
            .map(|_| {
                // Sum of uniforms: cheap, roughly normal, bounded.
                let z = (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 1.73;
                if norm {
                    1.0 + 0.5 * self.std * z
                } else {
                    self.std * z
                }
            })
            .collect())
    }

    fn has(&self, _: &str) -> bool {
        true
    }
}

/// For each dimension of a head, the other one of its RoPE pair (adjacent dimensions, or the
/// same place in the other half), as an index tensor.
fn rope_partner<B: Backend>(c: &LlamaConfig, device: &B::Device) -> Tensor<B, 1, Int> {
    let (hd, half) = (c.head_dim, c.head_dim / 2);
    let idx: Vec<i64> = (0..hd)
        .map(|d| match c.rope_style {
            RopeStyle::Adjacent => d ^ 1,
            RopeStyle::Halves => (d + half) % hd,
        } as i64)
        .collect();
    Tensor::from_data(TensorData::new(idx, [hd]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        // Llama 3.1's published settings.
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let pi2 = 2.0 * std::f64::consts::PI;
        // Wavelength 100 tokens (< 8192/4): unchanged.
        assert_eq!(s.scale(pi2 / 100.0), pi2 / 100.0);
        // Wavelength 20000 tokens (> 8192): divided by the factor.
        assert!((s.scale(pi2 / 20_000.0) - pi2 / 20_000.0 / 8.0).abs() < 1e-15);
        // In the band the result lies between the two and moves monotonically.
        let mid = s.scale(pi2 / 4096.0);
        assert!(mid < pi2 / 4096.0 && mid > pi2 / 4096.0 / 8.0);
        let c = LlamaConfig {
            vocab: 8,
            hidden: 8,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 8,
            ffn: 8,
            rope_theta: 500_000.0,
            rms_eps: 1e-5,
            context: 64,
            rope_style: RopeStyle::Halves,
            rope_scaling: Some(s),
            qkv_bias: false,
            tied_embeddings: true,
        };
        let f = c.inv_freq();
        assert_eq!(f[0], 1.0);
        assert!(f.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn bad_geometry_is_a_config_error() {
        let mut c = LlamaConfig {
            vocab: 8,
            hidden: 8,
            layers: 1,
            heads: 3,
            kv_heads: 2,
            head_dim: 8,
            ffn: 8,
            rope_theta: 1e4,
            rms_eps: 1e-5,
            context: 64,
            rope_style: RopeStyle::Adjacent,
            rope_scaling: None,
            qkv_bias: false,
            tied_embeddings: true,
        };
        assert!(matches!(c.validate(), Err(ModelError::Config(_))));
        c.heads = 2;
        c.head_dim = 7;
        assert!(matches!(c.validate(), Err(ModelError::Config(_))));
        c.head_dim = 8;
        assert!(c.validate().is_ok());
    }
}
