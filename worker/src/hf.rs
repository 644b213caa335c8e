//! Hugging Face checkpoints: a directory with `config.json`, one or more `*.safetensors` files
//! and `tokenizer.json`.
//!
//! Weights keep PyTorch's `[out, in]` layout, which is what [`WeightSource`] speaks; names are
//! mapped to the GGUF names the model loader uses (`model.layers.3.self_attn.q_proj.weight` ->
//! `blk.3.attn_q.weight`). HF checkpoints rotate halves in RoPE (`rotate_half`), so the config
//! says [`RopeStyle::Halves`]. F32, F16 and BF16 tensors are read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::model::{Llama3RopeScaling, LlamaConfig, ModelError, RopeStyle, WeightSource};

fn file_err(file: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::File {
        file: file.display().to_string(),
        msg: msg.into(),
    }
}

/// Reads `config.json` (Llama, Mistral and Qwen2 model types).
pub fn config_from_json(path: &Path) -> Result<LlamaConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| file_err(path, format!("not JSON: {e}")))?;
    let model_type = v["model_type"].as_str().unwrap_or("llama");
    let qkv_bias = match model_type {
        "llama" | "mistral" => v["attention_bias"].as_bool().unwrap_or(false),
        "qwen2" => true,
        other => return Err(ModelError::UnsupportedArchitecture(other.into())),
    };
    let u = |k: &str| -> Result<usize, ModelError> {
        v[k].as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| file_err(path, format!("`{k}` is missing or not a whole number")))
    };
    let f = |k: &str, default: f64| -> Result<f64, ModelError> {
        match &v[k] {
            Value::Null => Ok(default),
            x => x
                .as_f64()
                .ok_or_else(|| file_err(path, format!("`{k}` is not a number"))),
        }
    };
    let hidden = u("hidden_size")?;
    let heads = u("num_attention_heads")?;
    if heads == 0 {
        return Err(file_err(path, "`num_attention_heads` is 0"));
    }
    let rope_scaling = match &v["rope_scaling"] {
        Value::Null => None,
        s => {
            let kind = s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or("");
            if kind != "llama3" {
                return Err(file_err(
                    path,
                    format!("rope_scaling type {kind:?} is not supported (llama3 is)"),
                ));
            }
            let g = |k: &str| {
                s[k].as_f64()
                    .ok_or_else(|| file_err(path, format!("rope_scaling.{k} is missing")))
            };
            Some(Llama3RopeScaling {
                factor: g("factor")?,
                low_freq_factor: g("low_freq_factor")?,
                high_freq_factor: g("high_freq_factor")?,
                original_max_position_embeddings: g("original_max_position_embeddings")?,
            })
        }
    };
    let c = LlamaConfig {
        vocab: u("vocab_size")?,
        hidden,
        layers: u("num_hidden_layers")?,
        heads,
        kv_heads: u("num_key_value_heads").unwrap_or(heads),
        head_dim: u("head_dim").unwrap_or(hidden / heads),
        ffn: u("intermediate_size")?,
        rope_theta: f("rope_theta", 10_000.0)?,
        rms_eps: f("rms_norm_eps", 1e-6)?,
        context: u("max_position_embeddings").unwrap_or(4096),
        rope_style: RopeStyle::Halves,
        rope_scaling,
        qkv_bias,
        tied_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
    };
    c.validate()?;
    Ok(c)
}

/// End-of-sequence ids from `config.json` (`eos_token_id`: one id or a list).
pub fn eos_from_json(path: &Path) -> Vec<u32> {
    let v: Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    match &v["eos_token_id"] {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The GGUF name of an HF tensor name, if it is one the model uses.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, kind) = name.rsplit_once('.')?;
    let g = match stem {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The safetensors files of a checkpoint, indexed by GGUF tensor name.
pub struct HfWeights {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// GGUF name -> (file index, HF name).
    index: HashMap<String, (usize, String)>,
}

impl HfWeights {
    /// Reads every `*.safetensors` file in `dir` (sorted by name).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| file_err(dir, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(file_err(dir, "no *.safetensors file"));
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            let bytes = std::fs::read(&p).map_err(|e| file_err(&p, e.to_string()))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| file_err(&p, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                if let Some(g) = gguf_name(name) {
                    index.insert(g, (i, name.to_string()));
                }
            }
            files.push((p, bytes));
        }
        Ok(Self { files, index })
    }
}

impl WeightSource for HfWeights {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (i, hf) = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        let (path, bytes) = &self.files[*i];
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| file_err(path, format!("not a valid safetensors file: {e}")))?;
        let t = st
            .tensor(hf)
            .map_err(|e| file_err(path, format!("{hf}: {e}")))?;
        if t.shape() != shape {
            return Err(ModelError::Shape {
                name: hf.clone(),
                got: t.shape().iter().map(|&d| d as u64).collect(),
                want: shape.iter().map(|&d| d as u64).collect(),
            });
        }
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| crate::gguf::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            other => {
                return Err(file_err(
                    path,
                    format!("{hf} has dtype {other:?} (F32, F16 and BF16 are supported)"),
                ));
            }
        })
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}
