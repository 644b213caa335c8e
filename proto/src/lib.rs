//! What DOPD's processes say to each other, in one crate that carries no inference engine:
//!
//! - [`proto`]: the worker's gRPC API (`dopd/worker/v1/worker.proto`, package `dopd.worker.v1`),
//!   client and server, generated at build time;
//! - [`connect`], [`H2_WINDOW`] and [`MAX_MESSAGE_BYTES`]: how a client reaches a worker (KV
//!   blocks travel inline, so messages and flow-control windows are large);
//! - [`Role`]: what an instance does, the planner's own type, which the Health answer carries as
//!   text;
//! - [`load`]: the router's answer to `GET /v1/dopd/load` and its view of each worker, which the
//!   operator and `dopd up` read;
//! - [`openmetrics`]: every process's `GET /metrics` answer.
//!
//! The router and the operator depend on this crate, not on the worker or on each other.

pub mod load;

pub use dopd_planner::Role;

/// Generated gRPC types (package `dopd.worker.v1`).
#[allow(missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("dopd.worker.v1");
}

/// HTTP/2 flow-control window of worker connections (both directions).
pub const H2_WINDOW: u32 = 32 << 20;

/// Largest gRPC message: KV blocks travel inline (SmolLM2 holds ~46 KiB of K/V per token).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// A client with message limits sized for inline KV blocks.
pub async fn connect(
    url: String,
) -> Result<proto::worker_client::WorkerClient<tonic::transport::Channel>, tonic::transport::Error>
{
    Ok(proto::worker_client::WorkerClient::connect(url)
        .await?
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The content type of the OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `GET /metrics` answer: `text` (OpenMetrics, as `prometheus_client` encodes it).
pub fn openmetrics(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        text,
    )
        .into_response()
}
