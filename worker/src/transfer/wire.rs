//! The gRPC form of what a transfer moves: KV blocks as little-endian bytes, their layout,
//! handles, and transfer errors as gRPC statuses and back.

use std::time::Duration;

use tonic::Status;

use super::{KvHandle, TransferError};
use crate::kv::{KvExport, KvLayout};

use dopd_protocol::proto;

/// f32 values as little-endian bytes (a plain copy on little-endian hosts).
pub fn f32_to_le_bytes(v: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice::<f32, u8>(v).to_vec()
    } else {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

/// Little-endian bytes (a multiple of 4) as f32 values.
pub fn le_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec::<u8, f32>(&b[..b.len() / 4 * 4])
    } else {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// The proto form of a layout.
pub fn layout_to_proto(l: &KvLayout) -> proto::KvLayout {
    proto::KvLayout {
        layers: l.layers as u32,
        kv_heads: l.kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_size: l.block_size as u32,
        model_hash: l.model_hash,
        dtype: "f32".into(),
        fingerprint: l.fingerprint(),
    }
}

/// KV blocks as bytes (f32 little-endian).
pub fn kv_to_proto(kv: &KvExport, layout: &KvLayout) -> proto::KvBlocks {
    proto::KvBlocks {
        layout: Some(layout_to_proto(layout)),
        tokens: kv.tokens as u32,
        blocks: kv.blocks.iter().map(|b| f32_to_le_bytes(b)).collect(),
    }
}

/// Parses KV blocks; the engine checks the fingerprint and sizes against its own layout.
pub fn kv_from_proto(kv: proto::KvBlocks) -> Result<KvExport, Status> {
    let layout = kv
        .layout
        .ok_or_else(|| Status::invalid_argument("kv.layout is missing"))?;
    if layout.dtype != "f32" {
        return Err(Status::failed_precondition(format!(
            "KV dtype {:?} is not supported (f32 is)",
            layout.dtype
        )));
    }
    let blocks = kv
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if b.len() % 4 != 0 {
                return Err(Status::invalid_argument(format!(
                    "kv block {i} has {} bytes, not a whole number of f32",
                    b.len()
                )));
            }
            Ok(le_bytes_to_f32(b))
        })
        .collect::<Result<Vec<Vec<f32>>, Status>>()?;
    Ok(KvExport {
        fingerprint: layout.fingerprint,
        tokens: kv.tokens as usize,
        blocks,
    })
}

pub(crate) fn handle_to_proto(h: &KvHandle, ttl: Duration, ucx: bool) -> proto::KvHandle {
    proto::KvHandle {
        worker_id: h.worker_id.clone(),
        epoch: h.epoch,
        lease: h.lease,
        fingerprint: h.fingerprint,
        tokens: h.tokens as u32,
        blocks: h.blocks as u32,
        block_bytes: h.block_bytes as u64,
        ttl_ms: ttl.as_millis().min(u128::from(u32::MAX)) as u32,
        ucx,
    }
}

/// A handle from its proto form.
pub fn handle_from_proto(h: &proto::KvHandle) -> KvHandle {
    KvHandle {
        worker_id: h.worker_id.clone(),
        epoch: h.epoch,
        lease: h.lease,
        fingerprint: h.fingerprint,
        tokens: h.tokens as usize,
        blocks: h.blocks as usize,
        block_bytes: h.block_bytes as usize,
    }
}

/// A transfer error as a status whose message starts with `kv:<kind>:<number>:` so that the
/// client gets the same typed error back.
pub(crate) fn transfer_status(e: &TransferError) -> Status {
    let (code, n) = match e {
        TransferError::StaleEpoch { current, .. } => (tonic::Code::FailedPrecondition, *current),
        TransferError::Expired(l) | TransferError::UnknownLease(l) => (tonic::Code::NotFound, *l),
        TransferError::LayoutMismatch { want, .. } => (tonic::Code::FailedPrecondition, *want),
        TransferError::Deadline(d) => (tonic::Code::DeadlineExceeded, d.as_millis() as u64),
        TransferError::Transport(_) => (tonic::Code::Unavailable, 0),
    };
    Status::new(code, format!("kv:{}:{n}: {e}", e.kind()))
}

pub(crate) fn transfer_error(s: &Status, h: &KvHandle) -> TransferError {
    let mut parts = s.message().splitn(3, ':');
    let (tag, kind, n) = (parts.next(), parts.next(), parts.next());
    let n: u64 = n.and_then(|x| x.parse().ok()).unwrap_or(0);
    match (tag, kind) {
        (Some("kv"), Some("stale_epoch")) => TransferError::StaleEpoch {
            got: h.epoch,
            current: n,
        },
        (Some("kv"), Some("expired")) => TransferError::Expired(h.lease),
        (Some("kv"), Some("unknown_lease")) => TransferError::UnknownLease(h.lease),
        _ => TransferError::Transport(format!("{}: {}", s.code(), s.message())),
    }
}
