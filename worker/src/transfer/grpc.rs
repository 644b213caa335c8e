//! KV blocks fetched from the prefill worker over gRPC (`FetchKv`, blocks inline in the
//! message): the transport that always works.

use std::time::Duration;

use crate::kv::KvExport;
use crate::transfer::{KvHandle, KvTransport, TransferError};

use super::wire::*;
use dopd_protocol::proto;
use dopd_protocol::{H2_WINDOW, MAX_MESSAGE_BYTES};

/// The gRPC transport: pulls a lease's blocks as a stream of messages from the prefill worker.
pub struct GrpcTransport {
    pub(crate) client: proto::worker_client::WorkerClient<tonic::transport::Channel>,
}

impl GrpcTransport {
    /// Connects to the worker at `url`, failing after `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, TransferError> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| TransferError::Transport(format!("bad prefill_url {url:?}: {e}")))?
            .connect_timeout(timeout)
            .initial_stream_window_size(Some(H2_WINDOW))
            .initial_connection_window_size(Some(H2_WINDOW));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| TransferError::Transport(format!("cannot reach {url}: {e}")))?;
        Ok(Self {
            client: proto::worker_client::WorkerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }
}

#[tonic::async_trait]
impl KvTransport for GrpcTransport {
    fn name(&self) -> &'static str {
        "grpc"
    }

    async fn pull(&self, h: &KvHandle) -> Result<KvExport, TransferError> {
        let mut c = self.client.clone();
        let mut stream = c
            .pull_kv(proto::PullKvRequest {
                lease: h.lease,
                epoch: h.epoch,
            })
            .await
            .map_err(|s| transfer_error(&s, h))?
            .into_inner();
        let mut blocks = Vec::with_capacity(h.blocks);
        while let Some(chunk) = stream.message().await.map_err(|s| transfer_error(&s, h))? {
            if chunk.index as usize != blocks.len() || chunk.data.len() != h.block_bytes {
                return Err(TransferError::Transport(format!(
                    "block {} of {} bytes, expected block {} of {} bytes",
                    chunk.index,
                    chunk.data.len(),
                    blocks.len(),
                    h.block_bytes
                )));
            }
            blocks.push(le_bytes_to_f32(&chunk.data));
        }
        if blocks.len() != h.blocks {
            return Err(TransferError::Transport(format!(
                "stream ended after {} of {} blocks",
                blocks.len(),
                h.blocks
            )));
        }
        Ok(KvExport {
            fingerprint: h.fingerprint,
            tokens: h.tokens,
            blocks,
        })
    }

    async fn release(&self, h: &KvHandle) -> Result<(), TransferError> {
        let mut c = self.client.clone();
        c.release_kv(proto::ReleaseKvRequest {
            lease: h.lease,
            epoch: h.epoch,
        })
        .await
        .map(|_| ())
        .map_err(|s| transfer_error(&s, h))
    }
}
