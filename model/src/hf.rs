//! Hugging Face checkpoints: a directory with `config.json`, one or more `*.safetensors` files
//! and `tokenizer.json`.
//!
//! Here: the config (HF checkpoints rotate halves in RoPE, `rotate_half`, so the config says
//! [`RopeStyle::Halves`]), the end-of-sequence ids, and the mapping of tensor names to the GGUF
//! names the model loader uses (`model.layers.3.self_attn.q_proj.weight` ->
//! `blk.3.attn_q.weight`). The worker reads the weights (`dopd_worker::hf`).

use std::path::Path;

use serde_json::Value;

use crate::config::{Llama3RopeScaling, LlamaConfig, ModelError, RopeStyle};

pub fn file_err(file: &Path, msg: impl Into<String>) -> ModelError {
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
