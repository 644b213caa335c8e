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
//! - [`transfer`]: KV blocks from prefill to decode: leases, handles, the `KvTransport` trait
//!   and its gRPC and UCX transports, their wire form, fallback.
//! - [`engine_thread`]: the engine on its own thread behind a channel.
//! - [`service`]: the gRPC service (`proto/dopd/worker/v1/worker.proto`) and the servers.
//! - [`loading`]: a GGUF file or an HF checkpoint into the engine, and the model's hash.
//! - [`metrics`]: Stats as Prometheus/OpenMetrics text, served on `/metrics`.

pub mod engine;
pub mod engine_thread;
pub mod hf;
pub mod kv;
pub mod loading;
pub mod metrics;
pub mod model;
pub mod qmat;
pub mod sampling;
pub mod service;
pub mod transfer;
