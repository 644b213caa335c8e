//! The tokenizer stored in a GGUF file's metadata, rebuilt as a `tokenizers` BPE, plus the
//! ChatML prompt format.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE), with the pre-tokenizer named by
//! `tokenizer.ggml.pre`: `smollm` splits every digit on its own before the GPT-2 byte-level split
//! (llama.cpp's definition); `gpt2` and unknown names use the GPT-2 split alone. Tokens whose
//! `tokenizer.ggml.token_type` is not "normal" (1) are special: matched whole, never merged.

use std::path::Path;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{Gguf, GgufError, Value};

/// A tokenizer that cannot be built from a file's metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer model {0:?} is not supported (only \"gpt2\" byte-level BPE is)")]
    UnsupportedModel(String),
    #[error("tokenizer metadata: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// A chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The model's tokenizer and its special ids.
#[derive(Debug, Clone)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    /// System prompt inserted when a conversation has none (SmolLM2's template does this).
    pub default_system: Option<String>,
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>, TokenizerError> {
    let arr = g
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| GgufError::MissingKey(key.into()))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| TokenizerError::Invalid(format!("`{key}` must be an array of strings")))
}

impl ModelTokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.into()));
        }
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let merges = strings(g, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| {
                        TokenizerError::Invalid(format!("merge {m:?} is not two tokens"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match g.get_str("tokenizer.ggml.pre").unwrap_or("gpt2") {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t != 1)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |key: &str| -> Result<u32, TokenizerError> {
            let v = g.get_u64(key)?;
            u32::try_from(v)
                .ok()
                .filter(|v| (*v as usize) < tokens.len())
                .ok_or_else(|| TokenizerError::Invalid(format!("`{key}` = {v} is not a token id")))
        };
        let default_system = g
            .get_str("tokenizer.chat_template")
            .ok()
            .and_then(|t| t.split("<|im_start|>system\n").nth(1))
            .and_then(|rest| rest.split("<|im_end|>").next())
            .map(str::to_owned);
        Ok(Self {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            default_system,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`; BOS and EOS ids come from the checkpoint's
    /// `config.json` (`bos_token_id`, `eos_token_id`; the first of a list).
    pub fn from_hf_files(
        tokenizer_json: &Path,
        config_json: &Path,
    ) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| TokenizerError::Invalid(format!("{}: {e}", tokenizer_json.display())))?;
        let cfg: serde_json::Value = std::fs::read_to_string(config_json)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let id = |k: &str| -> Option<u32> {
            let v = &cfg[k];
            v.as_u64()
                .or_else(|| {
                    v.as_array()
                        .and_then(|a| a.first())
                        .and_then(|x| x.as_u64())
                })
                .and_then(|x| u32::try_from(x).ok())
        };
        let eos_id = id("eos_token_id")
            .or_else(|| inner.token_to_id("<|im_end|>"))
            .or_else(|| inner.token_to_id("</s>"))
            .ok_or_else(|| {
                TokenizerError::Invalid(format!(
                    "{}: no eos_token_id and no known end token",
                    config_json.display()
                ))
            })?;
        Ok(Self {
            bos_id: id("bos_token_id").unwrap_or(eos_id),
            eos_id,
            default_system: None,
            inner,
        })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// Token ids of `text` (special tokens in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are kept when `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, !keep_special)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// Vocabulary size, special tokens included.
    /// Vocabulary size, added tokens included. Not cheap: the tokenizers crate builds the whole
    /// vocabulary map to count it, so callers on a hot path keep the result.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A ChatML prompt for `messages`, ending with the assistant's turn opened, with the model's
    /// default system prompt first when the conversation has none.
    pub fn chat_prompt(&self, messages: &[Message]) -> String {
        let mut out = String::new();
        if messages.first().is_none_or(|m| m.role != "system")
            && let Some(sys) = &self.default_system
        {
            out += &format!("<|im_start|>system\n{sys}<|im_end|>\n");
        }
        for m in messages {
            out += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
        }
        out += "<|im_start|>assistant\n";
        out
    }
}
