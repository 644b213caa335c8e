//! # dopd-worker: DOPD's inference worker
//!
//! The model's files (GGUF reader, Hugging Face configs, tokenizer) are read by `dopd_model`,
//! which the router shares; the wire format is `dopd_protocol`'s.
//!
//! - [`hf`]: Hugging Face safetensors weights.
//! - [`model`]: the Llama-family transformer in burn (grouped-query attention, RoPE with
//!   Llama-3 scaling, RMSNorm, SwiGLU, optional QKV bias).
//! - [`qmat`]: weight matrices kept in their quantized blocks on the CPU, multiplied with kernels
//!   that dequantize in registers.
//! - [`kv`]: the paged KV cache with block export/import.
//! - [`sampling`]: seeded sampling and stop conditions.
//! - [`engine`]: continuous batching with preemption, in `prefill`, `decode` and `mixed` roles.
//! - [`transfer`]: KV blocks from prefill to decode: leases, handles, transports, fallback.
//! - [`service`]: the engine thread and the gRPC service (`proto/dopd/worker/v1/worker.proto`).
//! - [`metrics`]: Stats as Prometheus/OpenMetrics text, served on `/metrics`.

pub mod engine;
pub mod hf;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod qmat;
pub mod sampling;
pub mod service;
pub mod transfer;
