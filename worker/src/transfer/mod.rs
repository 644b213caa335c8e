//! Moving a prefilled sequence's KV blocks from a prefill worker to a decode worker.
//!
//! Protocol: when a prefill finishes, its blocks are exported and **pinned under a lease** (a TTL)
//! in the prefill worker's [`LeaseTable`]; the Prefill answer carries a [`KvHandle`] (worker id,
//! restart epoch, lease id, token and byte counts, layout fingerprint). The decode worker checks
//! the fingerprint against its own layout, **pulls** the blocks through a [`KvTransport`] under a
//! deadline, imports them and **releases** the lease; the prefill worker then drops its copy.
//! A stale epoch, a fingerprint mismatch, an unknown or expired lease and a missed deadline are
//! immediate typed errors ([`TransferError`]), never a wait; on any of them the decode worker
//! recomputes the prompt itself, so the request still completes, and counts the failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod grpc;
mod ucx;
pub mod wire;

pub use grpc::GrpcTransport;
pub(crate) use ucx::LeaseParts;
pub use ucx::UcxTransport;

use crate::kv::KvExport;

/// Describes pinned KV blocks on a prefill worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvHandle {
    pub worker_id: String,
    /// The prefill worker's restart epoch when it pinned the blocks.
    pub epoch: u64,
    pub lease: u64,
    /// Layout fingerprint of the blocks (model hash, dtype, block size, layers, KV heads, head
    /// dim): the importer's must be equal.
    pub fingerprint: u64,
    pub tokens: usize,
    pub blocks: usize,
    /// Bytes of one block.
    pub block_bytes: usize,
}

impl KvHandle {
    pub fn total_bytes(&self) -> usize {
        self.blocks * self.block_bytes
    }
}

/// Why a transfer failed. Every variant is reported at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("stale KV handle: epoch {got}, the prefill worker restarted (epoch {current})")]
    StaleEpoch { got: u64, current: u64 },
    #[error("KV lease {0} expired before the blocks were pulled")]
    Expired(u64),
    #[error("unknown KV lease {0}")]
    UnknownLease(u64),
    #[error("KV layout mismatch: blocks {got:#x}, this worker {want:#x}")]
    LayoutMismatch { got: u64, want: u64 },
    #[error("KV transfer missed its deadline of {0:?}")]
    Deadline(Duration),
    #[error("KV transport: {0}")]
    Transport(String),
}

impl TransferError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TransferError::StaleEpoch { .. } => "stale_epoch",
            TransferError::Expired(_) => "expired",
            TransferError::UnknownLease(_) => "unknown_lease",
            TransferError::LayoutMismatch { .. } => "layout_mismatch",
            TransferError::Deadline(_) => "deadline",
            TransferError::Transport(_) => "transport",
        }
    }
}

#[derive(Debug)]
struct Lease {
    kv: Arc<KvExport>,
    expires: Instant,
}

/// Pinned exports of a prefill worker.
#[derive(Debug)]
pub struct LeaseTable {
    worker_id: String,
    epoch: u64,
    ttl: Duration,
    next: u64,
    leases: HashMap<u64, Lease>,
    /// Leases dropped because nobody pulled them in time.
    pub expired: u64,
}

impl LeaseTable {
    pub fn new(worker_id: impl Into<String>, epoch: u64, ttl: Duration) -> Self {
        Self {
            worker_id: worker_id.into(),
            epoch,
            ttl,
            next: 1,
            leases: HashMap::new(),
            expired: 0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Pins an export; returns its handle.
    pub fn pin(&mut self, kv: KvExport, now: Instant) -> KvHandle {
        self.sweep(now);
        let lease = self.next;
        self.next += 1;
        let handle = KvHandle {
            worker_id: self.worker_id.clone(),
            epoch: self.epoch,
            lease,
            fingerprint: kv.fingerprint,
            tokens: kv.tokens,
            blocks: kv.blocks.len(),
            block_bytes: kv.blocks.first().map_or(0, |b| b.len() * 4),
        };
        self.leases.insert(
            lease,
            Lease {
                kv: Arc::new(kv),
                expires: now + self.ttl,
            },
        );
        handle
    }

    /// The pinned blocks of a lease, checked for epoch and expiry.
    pub fn get(
        &mut self,
        lease: u64,
        epoch: u64,
        now: Instant,
    ) -> Result<Arc<KvExport>, TransferError> {
        if epoch != self.epoch {
            return Err(TransferError::StaleEpoch {
                got: epoch,
                current: self.epoch,
            });
        }
        match self.leases.get(&lease) {
            Some(l) if l.expires > now => Ok(l.kv.clone()),
            Some(_) => {
                self.leases.remove(&lease);
                self.expired += 1;
                Err(TransferError::Expired(lease))
            }
            None if lease < self.next => Err(TransferError::Expired(lease)),
            None => Err(TransferError::UnknownLease(lease)),
        }
    }

    /// Drops a lease (the decode worker has the blocks). Returns whether it was pinned.
    pub fn release(&mut self, lease: u64) -> bool {
        self.leases.remove(&lease).is_some()
    }

    /// Drops expired leases; returns how many.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.leases.len();
        self.leases.retain(|_, l| l.expires > now);
        let n = before - self.leases.len();
        self.expired += n as u64;
        n
    }

    /// Leases currently pinned.
    pub fn pinned(&self) -> usize {
        self.leases.len()
    }

    /// Bytes currently pinned.
    pub fn pinned_bytes(&self) -> usize {
        self.leases
            .values()
            .map(|l| l.kv.blocks.iter().map(|b| b.len() * 4).sum::<usize>())
            .sum()
    }
}

/// Block vectors recycled between imports and the next transfer's receive: a decode worker
/// receives KV blocks into memory that is already mapped and touched, instead of fresh pages the
/// kernel zero-fills on first write (which costs as much as the transfer itself on loopback).
/// Holds at most `cap_bytes`; beyond that, returned vectors are freed.
#[derive(Debug)]
pub struct BlockPool {
    cap_bytes: usize,
    inner: Mutex<Pooled>,
}

/// Bytes held, and the free vectors by length.
type Pooled = (usize, HashMap<usize, Vec<Vec<f32>>>);

impl BlockPool {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            cap_bytes,
            inner: Mutex::new((0, HashMap::new())),
        }
    }

    /// `n` vectors of `len` floats: recycled ones first (their contents are stale: the caller
    /// overwrites them whole), then new zeroed ones.
    pub fn take(&self, n: usize, len: usize) -> Vec<Vec<f32>> {
        let mut out = Vec::with_capacity(n);
        if let Ok(mut g) = self.inner.lock() {
            let (held, map) = &mut *g;
            if let Some(free) = map.get_mut(&len) {
                while out.len() < n {
                    let Some(v) = free.pop() else { break };
                    *held -= len * 4;
                    out.push(v);
                }
            }
        }
        out.resize_with(n, || vec![0.0; len]);
        out
    }

    /// Returns vectors for reuse (as many as fit under the cap).
    pub fn give(&self, blocks: Vec<Vec<f32>>) {
        if let Ok(mut g) = self.inner.lock() {
            let (held, map) = &mut *g;
            for b in blocks {
                let bytes = b.len() * 4;
                if *held + bytes > self.cap_bytes {
                    break;
                }
                *held += bytes;
                map.entry(b.len()).or_default().push(b);
            }
        }
    }

    /// Bytes currently held.
    pub fn held_bytes(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.0)
    }
}

/// Moves pinned blocks from a prefill worker to this one.
#[tonic::async_trait]
pub trait KvTransport: Send + Sync {
    /// The transport's name for stats and logs (`inproc`, `grpc`, `ucx`).
    fn name(&self) -> &'static str;
    /// Fetches the blocks of `handle`.
    async fn pull(&self, handle: &KvHandle) -> Result<KvExport, TransferError>;
    /// Tells the prefill worker to drop the lease.
    async fn release(&self, handle: &KvHandle) -> Result<(), TransferError>;
}

/// Both workers in one process (tests, local mode): the lease table is shared.
pub struct InProcess {
    pub table: Arc<Mutex<LeaseTable>>,
}

#[tonic::async_trait]
impl KvTransport for InProcess {
    fn name(&self) -> &'static str {
        "inproc"
    }

    async fn pull(&self, handle: &KvHandle) -> Result<KvExport, TransferError> {
        let mut t = self
            .table
            .lock()
            .map_err(|_| TransferError::Transport("lease table poisoned".into()))?;
        Ok((*t.get(handle.lease, handle.epoch, Instant::now())?).clone())
    }

    async fn release(&self, handle: &KvHandle) -> Result<(), TransferError> {
        if let Ok(mut t) = self.table.lock() {
            t.release(handle.lease);
        }
        Ok(())
    }
}

/// Pulls with a deadline and checks the layout first; the caller recomputes on `Err`.
pub async fn fetch(
    transport: &dyn KvTransport,
    handle: &KvHandle,
    want_fingerprint: u64,
    deadline: Duration,
) -> Result<KvExport, TransferError> {
    if handle.fingerprint != want_fingerprint {
        // The blocks are useless here; let the prefill worker drop them now.
        let _ = tokio::time::timeout(deadline, transport.release(handle)).await;
        return Err(TransferError::LayoutMismatch {
            got: handle.fingerprint,
            want: want_fingerprint,
        });
    }
    let kv = tokio::time::timeout(deadline, transport.pull(handle))
        .await
        .map_err(|_| TransferError::Deadline(deadline))??;
    if kv.fingerprint != want_fingerprint || kv.tokens != handle.tokens {
        return Err(TransferError::LayoutMismatch {
            got: kv.fingerprint,
            want: want_fingerprint,
        });
    }
    // The blocks are here: a lost release only costs the prefill worker memory until the TTL.
    let _ = tokio::time::timeout(deadline, transport.release(handle)).await;
    Ok(kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(tokens: usize) -> KvExport {
        KvExport {
            fingerprint: 7,
            tokens,
            blocks: vec![vec![1.0; 8]; tokens.div_ceil(4)],
        }
    }

    #[test]
    fn the_block_pool_recycles_by_length_up_to_its_cap() {
        let p = BlockPool::new(3 * 8 * 4);
        let a = p.take(2, 8);
        assert_eq!((a.len(), a[0].len()), (2, 8));
        let ptr = a[0].as_ptr();
        p.give(a);
        assert_eq!(p.held_bytes(), 64);
        // Other lengths are not handed out; the cap drops what does not fit.
        assert_eq!(p.take(1, 4)[0].len(), 4);
        p.give(vec![vec![1.0; 8], vec![1.0; 8]]);
        assert_eq!(p.held_bytes(), 96);
        let b = p.take(4, 8);
        assert_eq!(b.len(), 4);
        assert!(
            b.iter().any(|v| v.as_ptr() == ptr),
            "a recycled vector is reused"
        );
        assert_eq!(p.held_bytes(), 0);
    }

    #[test]
    fn leases_check_epoch_and_expiry_and_release_once() {
        let t0 = Instant::now();
        let mut t = LeaseTable::new("p", 3, Duration::from_secs(1));
        let h = t.pin(export(10), t0);
        assert_eq!((h.blocks, h.block_bytes, h.tokens), (3, 32, 10));
        assert!(t.get(h.lease, 3, t0).is_ok());
        assert_eq!(
            t.get(h.lease, 2, t0),
            Err(TransferError::StaleEpoch { got: 2, current: 3 })
        );
        assert_eq!(t.get(99, 3, t0), Err(TransferError::UnknownLease(99)));
        assert_eq!(
            t.get(h.lease, 3, t0 + Duration::from_secs(2)),
            Err(TransferError::Expired(h.lease))
        );
        assert_eq!(t.pinned(), 0);
        let h2 = t.pin(export(4), t0);
        assert_eq!(t.pinned_bytes(), 32);
        assert!(t.release(h2.lease));
        assert!(!t.release(h2.lease));
        assert_eq!(t.pinned(), 0);
        // Sweeping drops what nobody pulled.
        t.pin(export(4), t0);
        assert_eq!(t.sweep(t0 + Duration::from_secs(5)), 1);
        assert_eq!(t.expired, 2);
    }
}
