//! A model's files, read without loading its weights into an engine: the GGUF container
//! ([`gguf`]), Hugging Face checkpoint configs ([`hf`]), the architecture ([`config`]) and the
//! tokenizer with its chat template ([`tokenizer`]).
//!
//! The router tokenizes prompts and counts tokens with the very files the workers load, so both
//! read them through this crate; neither needs the other (nor an inference engine) for it.

pub mod config;
pub mod gguf;
pub mod hf;
pub mod tokenizer;

pub use config::{LlamaConfig, ModelError};
use tokenizer::ModelTokenizer;

/// A model's tokenizer, geometry and served name without its weights (for the router): a GGUF
/// file's metadata, or an HF directory's `config.json` and `tokenizer.json`.
pub fn load_tokenizer(
    path: &std::path::Path,
) -> Result<(ModelTokenizer, LlamaConfig, String), ModelError> {
    // The served name: a checkpoint directory's name, or a file's without its extension.
    let stem = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    let name = stem.map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    if path.is_dir() {
        let config = path.join("config.json");
        let c = hf::config_from_json(&config)?;
        let tok_path = path.join("tokenizer.json");
        let t =
            ModelTokenizer::from_hf_files(&tok_path, &config).map_err(|e| ModelError::File {
                file: tok_path.display().to_string(),
                msg: e.to_string(),
            })?;
        return Ok((t, c, name));
    }
    let g = gguf::Gguf::open(path).map_err(|e| ModelError::File {
        file: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let c = LlamaConfig::from_gguf(&g)?;
    let t = ModelTokenizer::from_gguf(&g).map_err(|e| ModelError::File {
        file: path.display().to_string(),
        msg: format!("tokenizer: {e}"),
    })?;
    Ok((t, c, name))
}
