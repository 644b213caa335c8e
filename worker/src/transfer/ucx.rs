//! KV blocks read from the prefill worker's memory over UCX (RDMA where the fabric has it),
//! with gRPC for the control messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dopd_ucx::Ucx;

use crate::kv::KvExport;
use crate::transfer::{KvHandle, KvTransport, TransferError};

use super::GrpcTransport;
use super::wire::*;
use dopd_protocol::proto;

/// A pinned export as UCX message parts: one per block, sent from the lease's own memory.
pub(crate) struct LeaseParts(pub(crate) Arc<KvExport>);

/// The UCX transport: the decode worker posts a tagged receive of the whole lease, asks the
/// prefill worker (over gRPC) to send it there over UCX, and releases the lease over gRPC.
pub struct UcxTransport {
    pub grpc: GrpcTransport,
    pub ucx: Arc<Ucx>,
    /// Source of tags unique among this worker's receives (one per pull).
    pub tags: Arc<AtomicU64>,
    pub deadline: Duration,
    /// Filled with the link's UCX transports (as the sender reports them) on success.
    pub lanes: Arc<Mutex<Vec<String>>>,
    /// Recycled block vectors to receive into (fresh ones otherwise).
    pub pool: Option<Arc<crate::transfer::BlockPool>>,
}

impl dopd_ucx::Parts for LeaseParts {
    fn parts(&self) -> Vec<&[u8]> {
        // The receiver is the same architecture family (UCX peers exchange raw f32 memory).
        self.0
            .blocks
            .iter()
            .map(|b| bytemuck::cast_slice::<f32, u8>(b))
            .collect()
    }
}

#[tonic::async_trait]
impl KvTransport for UcxTransport {
    fn name(&self) -> &'static str {
        "ucx"
    }

    async fn pull(&self, h: &KvHandle) -> Result<KvExport, TransferError> {
        if !h.block_bytes.is_multiple_of(4) || h.blocks > dopd_ucx::MAX_PARTS {
            return Err(TransferError::Transport(format!(
                "handle of {} blocks of {} bytes cannot travel over UCX",
                h.blocks, h.block_bytes
            )));
        }
        let tag = self.tags.fetch_add(1, Ordering::Relaxed) & dopd_ucx::MAX_TAG;
        // Each block is received straight into its final vector.
        let blocks = match &self.pool {
            Some(p) => p.take(h.blocks, h.block_bytes / 4),
            None => (0..h.blocks)
                .map(|_| vec![0f32; h.block_bytes / 4])
                .collect(),
        };
        let receive = self
            .ucx
            .recv_into(tag, blocks, self.deadline)
            .map_err(|e| TransferError::Transport(e.to_string()))?;
        let mut c = self.grpc.client.clone();
        // An error here (lease gone, prefill worker dead) drops `receive`, which cancels it.
        let sent = c
            .push_kv_ucx(proto::PushKvUcxRequest {
                lease: h.lease,
                epoch: h.epoch,
                ucx_address: self.ucx.address().to_vec(),
                tag,
                deadline_ms: self.deadline.as_millis().min(u128::from(u32::MAX)) as u32,
            })
            .await
            .map_err(|s| transfer_error(&s, h))?
            .into_inner();
        let blocks = receive.wait().await.map_err(|e| match e {
            dopd_ucx::UcxError::Deadline(_) => TransferError::Deadline(self.deadline),
            e => TransferError::Transport(e.to_string()),
        })?;
        if let Ok(mut l) = self.lanes.lock() {
            *l = sent.ucx_transports;
        }
        Ok(KvExport {
            fingerprint: h.fingerprint,
            tokens: h.tokens,
            blocks,
        })
    }

    async fn release(&self, h: &KvHandle) -> Result<(), TransferError> {
        self.grpc.release(h).await
    }
}
