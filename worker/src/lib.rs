//! # dopd-worker: DOPD's inference worker (in progress)
//!
//! Today: [`gguf`], the model-file reader (metadata, tensor directory, dequantization of F32, F16,
//! Q8_0, Q4_0 and Q4_1), and [`tokenizer`], the GGUF tokenizer as a `tokenizers` BPE with the
//! ChatML prompt format. The model, paged KV cache, batching engine, P/D roles and gRPC service
//! arrive with the rest of the worker issue.

pub mod gguf;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod tokenizer;
