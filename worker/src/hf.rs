//! Hugging Face checkpoints' weights: the `*.safetensors` files of a checkpoint directory (its
//! `config.json` and `tokenizer.json` are read by `dopd_model`).
//!
//! Weights keep PyTorch's `[out, in]` layout, which is what [`WeightSource`] speaks; names are
//! mapped to GGUF names (`dopd_model::hf::gguf_name`). F32, F16 and BF16 tensors are read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dopd_model::hf::{file_err, gguf_name};
use safetensors::{Dtype, SafeTensors};

use crate::model::{ModelError, WeightSource};

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
                .map(|c| dopd_model::gguf::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
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
