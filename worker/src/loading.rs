//! Loading a model for the engine: a GGUF file or a Hugging Face checkpoint directory, its
//! tokenizer and end-of-sequence ids, and a content hash that names the model to peers.

use burn::prelude::Backend;

use dopd_model::tokenizer::ModelTokenizer;

use crate::model::WeightMode;

/// A model ready to serve.
pub struct LoadedModel<B: Backend> {
    pub model: crate::model::Llama<B>,
    pub tokenizer: Option<ModelTokenizer>,
    /// End-of-sequence ids (EOS and ChatML's `<|im_end|>`).
    pub eos: Vec<u32>,
    /// Identifies the weights (see [`model_hash`]).
    pub model_hash: u64,
    /// Served name (the file stem).
    pub name: String,
}

/// Loads a model: a GGUF file, or a Hugging Face checkpoint directory (`config.json`,
/// `*.safetensors`, `tokenizer.json`).
pub fn load_model<B: Backend>(
    path: &std::path::Path,
    device: &B::Device,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    load_model_with(path, device, WeightMode::for_backend::<B>())
}

/// [`load_model`] with the weights kept as `mode` says.
pub fn load_model_with<B: Backend>(
    path: &std::path::Path,
    device: &B::Device,
    mode: WeightMode,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    if path.is_dir() {
        load_hf(path, device, mode)
    } else {
        load_gguf(path, device, mode)
    }
}

/// Loads a Hugging Face checkpoint directory.
pub fn load_hf<B: Backend>(
    dir: &std::path::Path,
    device: &B::Device,
    mode: WeightMode,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    use crate::model::ModelError;
    let config = dir.join("config.json");
    let c = dopd_model::hf::config_from_json(&config)?;
    let weights = crate::hf::HfWeights::open(dir)?;
    let model = crate::model::Llama::load_with(c, &weights, device, mode)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(
            ModelTokenizer::from_hf_files(&tok_path, &config).map_err(|e| ModelError::File {
                file: tok_path.display().to_string(),
                msg: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let mut eos = dopd_model::hf::eos_from_json(&config);
    if let Some(t) = &tokenizer {
        for id in [Some(t.eos_id), t.token_id("<|im_end|>")]
            .into_iter()
            .flatten()
        {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        eos,
        model_hash: model_hash(dir).map_err(|e| ModelError::File {
            file: dir.display().to_string(),
            msg: e.to_string(),
        })?,
        name: dir
            .file_name()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
    })
}

/// Loads a GGUF model file with its tokenizer.
pub fn load_gguf<B: Backend>(
    path: &std::path::Path,
    device: &B::Device,
    mode: WeightMode,
) -> Result<LoadedModel<B>, crate::model::ModelError> {
    let g = dopd_model::gguf::Gguf::open(path)?;
    let model = crate::model::Llama::from_gguf_with(&g, device, mode)?;
    let tokenizer = ModelTokenizer::from_gguf(&g).map_err(|e| crate::model::ModelError::File {
        file: path.display().to_string(),
        msg: format!("tokenizer: {e}"),
    })?;
    let mut eos = vec![tokenizer.eos_id];
    if let Some(id) = tokenizer.token_id("<|im_end|>")
        && !eos.contains(&id)
    {
        eos.push(id);
    }
    Ok(LoadedModel {
        model,
        tokenizer: Some(tokenizer),
        eos,
        model_hash: model_hash(path).map_err(|e| crate::model::ModelError::File {
            file: path.display().to_string(),
            msg: e.to_string(),
        })?,
        name: path
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
    })
}

/// A fingerprint of a model file or directory: FNV-1a over its size and 16 evenly spaced 64 KiB
/// samples per file (the whole file when smaller). Two workers agree on it exactly when they load
/// the same bytes (barring a crafted collision), without hashing gigabytes at start-up.
pub fn model_hash(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    const CHUNK: u64 = 64 << 10;
    for p in files {
        let mut f = std::fs::File::open(&p)?;
        let len = f.metadata()?.len();
        eat(&len.to_le_bytes());
        let mut buf = vec![0u8; CHUNK as usize];
        for i in 0..16u64 {
            let at = if len <= 16 * CHUNK {
                i * CHUNK
            } else {
                (len - CHUNK) / 15 * i
            };
            if at >= len {
                break;
            }
            f.seek(SeekFrom::Start(at))?;
            let n = f.read(&mut buf)?;
            eat(&buf[..n]);
        }
    }
    Ok(h)
}
