//! A Llama-family model's architecture ([`LlamaConfig`]: from GGUF metadata or a Hugging Face
//! `config.json`) and the errors of reading a model's files ([`ModelError`]).

use crate::gguf::{Gguf, GgufError};

/// How RoPE pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(x[2i], x[2i+1])`: GGUF Llama weights (llama.cpp permutes Q/K rows on conversion).
    Adjacent,
    /// `(x[i], x[i + d/2])`: Hugging Face's `rotate_half` (HF checkpoints, GGUF Qwen2).
    Halves,
}

/// Llama 3.1's frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3RopeScaling {
    /// The scaled inverse frequency for one unscaled `inv_freq` (Meta's reference formula: long
    /// wavelengths are divided by `factor`, short ones kept, the band between interpolated).
    pub fn scale(&self, inv_freq: f64) -> f64 {
        let low_wavelen = self.original_max_position_embeddings / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < high_wavelen {
            inv_freq
        } else if wavelen > low_wavelen {
            inv_freq / self.factor
        } else {
            let smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

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
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Q, K and V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// The output matrix is the token embedding (no separate `lm_head`).
    pub tied_embeddings: bool,
}

/// A model that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("architecture {0:?} is not supported (llama and qwen2 are)")]
    UnsupportedArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("tensor `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
}

impl LlamaConfig {
    /// A tiny geometry (vocabulary 48, 2 layers, 4 query and 2 KV heads of 8, context 4096) for
    /// tests and benchmarks with `dopd_worker::model::Llama::random`; adjust fields with struct update syntax.
    pub fn tiny() -> Self {
        Self {
            vocab: 48,
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            ffn: 48,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context: 4096,
            rope_style: RopeStyle::Adjacent,
            rope_scaling: None,
            qkv_bias: false,
            tied_embeddings: false,
        }
    }

    /// Checks the head geometry.
    pub fn validate(&self) -> Result<(), ModelError> {
        let c = self;
        if c.heads == 0 || c.kv_heads == 0 || !c.heads.is_multiple_of(c.kv_heads) {
            return Err(ModelError::Config(format!(
                "{} attention heads are not a multiple of {} KV heads",
                c.heads, c.kv_heads
            )));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return Err(ModelError::Config(format!(
                "head dimension {} must be even and positive (RoPE rotates pairs)",
                c.head_dim
            )));
        }
        for (what, v) in [
            ("vocab", c.vocab),
            ("hidden", c.hidden),
            ("layers", c.layers),
            ("ffn", c.ffn),
        ] {
            if v == 0 {
                return Err(ModelError::Config(format!("{what} size is 0")));
            }
        }
        if !(c.rope_theta > 0.0) || !(c.rms_eps > 0.0) {
            return Err(ModelError::Config(
                "rope theta and RMS epsilon must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Reads the architecture from GGUF metadata (`llama.*` or `qwen2.*` keys).
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?;
        let (rope_style, qkv_bias) = match arch {
            "llama" => (RopeStyle::Adjacent, false),
            "qwen2" => (RopeStyle::Halves, true),
            _ => return Err(ModelError::UnsupportedArchitecture(arch.into())),
        };
        let u = |k: &str| -> Result<usize, ModelError> {
            usize::try_from(g.get_u64(&format!("{arch}.{k}"))?)
                .map_err(|_| ModelError::Config(format!("{arch}.{k} too large")))
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(ModelError::Config(format!(
                "{heads} heads do not divide hidden size {hidden}"
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
        let c = Self {
            vocab,
            hidden,
            layers: u("block_count")?,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ffn: u("feed_forward_length")?,
            rope_theta: g
                .get_f64(&format!("{arch}.rope.freq_base"))
                .unwrap_or(10_000.0),
            rms_eps: g
                .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            context: u("context_length").unwrap_or(4096),
            rope_style,
            // llama.cpp stores Llama-3 scaling as per-frequency divisors (`rope_freqs.weight`),
            // applied in `Llama::from_gguf`.
            rope_scaling: None,
            qkv_bias,
            tied_embeddings: g.tensor("output.weight").is_err(),
        };
        c.validate()?;
        Ok(c)
    }

    /// Unscaled-then-scaled inverse frequencies `θ^(-2i/d)`, one per rotated pair.
    pub fn inv_freq(&self) -> Vec<f64> {
        (0..self.head_dim / 2)
            .map(|i| {
                let f = self.rope_theta.powf(-2.0 * i as f64 / self.head_dim as f64);
                self.rope_scaling.map_or(f, |s| s.scale(f))
            })
            .collect()
    }
}
