//! UCX for DOPD's KV transfer: the system `libucp` (UCX 1.13, Debian `libucx-dev`) loaded at run
//! time, behind a safe API.
//!
//! One [`Ucx`] owns a UCP context and worker on a thread of its own (UCX's single-thread mode:
//! only that thread ever touches them). Callers on any thread or task send it commands — tagged
//! sends to a peer worker's address and tagged receives into a fresh buffer — and await the
//! answer. The thread owns every buffer until UCX is done with it, drives progress, enforces each
//! operation's deadline (a missed deadline is answered at once; the request is cancelled, or its
//! endpoint force-closed, and reaped later), and keeps one endpoint per peer address, created
//! with peer error handling so a dead peer fails its operations instead of hanging them.
//!
//! UCX reads its usual environment (`UCX_TLS`, `UCX_NET_DEVICES`, `UCX_RNDV_THRESH`, ...).
//! [`Ucx::start`] fails with [`UcxError::Unavailable`] where the library is missing, which
//! callers treat as "use another transport".

pub mod sys;
mod thread;

use thread::Worker;

use std::collections::HashMap;
use std::ffi::{CStr, c_void};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Why a UCX operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UcxError {
    /// No usable libucp on this machine (or a symbol is missing).
    #[error("UCX unavailable: {0}")]
    Unavailable(String),
    /// UCX returned an error status.
    #[error("UCX {op}: {status}")]
    Status { op: &'static str, status: String },
    #[error("UCX {0} missed its deadline")]
    Deadline(&'static str),
    #[error("UCX receive got {got} bytes, expected {want}")]
    Length { got: usize, want: usize },
    /// The caller stopped waiting (its other half of the transfer failed).
    #[error("UCX {0} cancelled by the caller")]
    Cancelled(&'static str),
    /// The UCX thread has stopped.
    #[error("the UCX thread has stopped")]
    Stopped,
}

/// What the local UCX context found and which transports an endpoint uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Info {
    /// libucp's version, e.g. `1.13.1`.
    pub version: String,
    /// Transport names the context may use (`tcp`, `rc_mlx5`, `cuda_ipc`, `posix`, ...), after
    /// `UCX_TLS` filtering, deduplicated in order.
    pub transports: Vec<String>,
}

/// A completed send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub bytes: usize,
    /// The transports the endpoint to that peer uses (see [`endpoint_transports`]).
    pub transports: Vec<String>,
}

type Reply<T> = oneshot::Sender<Result<T, UcxError>>;

/// Most parts in one message (the part index lives in the low bits of the wire tag).
pub const MAX_PARTS: usize = 1 << PART_BITS;
const PART_BITS: u32 = 20;
/// Largest user tag (the wire tag is `tag << 20 | part`).
pub const MAX_TAG: u64 = (1 << (64 - PART_BITS)) - 1;

/// Memory a send reads: one or more byte ranges, owned until UCX is done with them. Each part
/// travels as its own tagged message, all in flight at once (UCX pipelines them).
pub trait Parts: Send + 'static {
    fn parts(&self) -> Vec<&[u8]>;
}

/// Memory a receive fills, part by part (each part must arrive with exactly its length).
pub trait PartsMut: std::any::Any + Send {
    fn parts_mut(&mut self) -> Vec<&mut [u8]>;
}

impl Parts for Vec<u8> {
    fn parts(&self) -> Vec<&[u8]> {
        vec![self]
    }
}

/// Shared memory: the sender keeps its copy (e.g. a buffer reused across sends).
impl<T: Parts + Sync> Parts for std::sync::Arc<T> {
    fn parts(&self) -> Vec<&[u8]> {
        (**self).parts()
    }
}

impl PartsMut for Vec<u8> {
    fn parts_mut(&mut self) -> Vec<&mut [u8]> {
        vec![self]
    }
}

/// KV blocks: one part per block, received straight into the final vectors.
impl PartsMut for Vec<Vec<f32>> {
    fn parts_mut(&mut self) -> Vec<&mut [u8]> {
        self.iter_mut()
            .map(|b| bytemuck::cast_slice_mut::<f32, u8>(b))
            .collect()
    }
}

enum Cmd {
    Send {
        peer: Vec<u8>,
        tag: u64,
        data: Box<dyn Parts>,
        deadline: Instant,
        reply: Reply<Sent>,
    },
    Recv {
        tag: u64,
        buf: Box<dyn PartsMut>,
        deadline: Instant,
        reply: Reply<Box<dyn PartsMut>>,
    },
    Stop,
}

/// A UCP context and worker on their own thread.
pub struct Ucx {
    tx: mpsc::Sender<Cmd>,
    address: Vec<u8>,
    info: Info,
    thread: Option<JoinHandle<()>>,
}

impl Ucx {
    /// Loads libucp, creates a context (tag matching) and a worker, and starts the thread.
    pub fn start() -> Result<Ucx, UcxError> {
        let api = sys::Api::load().map_err(UcxError::Unavailable)?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("dopd-ucx".into())
            .spawn(move || match Worker::create(api) {
                Ok(w) => {
                    let _ = ready_tx.send(Ok((w.address.clone(), w.info.clone())));
                    w.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| UcxError::Unavailable(format!("cannot start the UCX thread: {e}")))?;
        let (address, info) = ready_rx.recv().map_err(|_| UcxError::Stopped)??;
        Ok(Ucx {
            tx,
            address,
            info,
            thread: Some(thread),
        })
    }

    /// This worker's address: a peer connects to it with it.
    pub fn address(&self) -> &[u8] {
        &self.address
    }

    pub fn info(&self) -> &Info {
        &self.info
    }

    /// Sends `data` under `tag` (at most [`MAX_TAG`]) to the worker at `peer`, each part as a
    /// message of its own; fails after `timeout`.
    pub async fn send(
        &self,
        peer: &[u8],
        tag: u64,
        data: impl Parts,
        timeout: Duration,
    ) -> Result<Sent, UcxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Send {
                peer: peer.to_vec(),
                tag,
                data: Box::new(data),
                deadline: Instant::now() + timeout,
                reply,
            })
            .map_err(|_| UcxError::Stopped)?;
        rx.await.map_err(|_| UcxError::Stopped)?
    }

    /// Posts a receive of `len` bytes under `tag`. Post it before the peer sends; drop the
    /// returned [`Receive`] to cancel it.
    pub fn recv(
        &self,
        tag: u64,
        len: usize,
        timeout: Duration,
    ) -> Result<Receive<Vec<u8>>, UcxError> {
        self.recv_into(tag, vec![0u8; len], timeout)
    }

    /// Posts a receive that fills `buf` part by part (the sender's parts must have the same
    /// lengths), under `tag`; the filled `buf` comes back from [`Receive::wait`].
    pub fn recv_into<P: PartsMut>(
        &self,
        tag: u64,
        buf: P,
        timeout: Duration,
    ) -> Result<Receive<P>, UcxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Recv {
                tag,
                buf: Box::new(buf),
                deadline: Instant::now() + timeout,
                reply,
            })
            .map_err(|_| UcxError::Stopped)?;
        Ok(Receive {
            rx,
            _p: std::marker::PhantomData,
        })
    }
}

impl Drop for Ucx {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A posted receive; await [`Receive::wait`] for the filled buffer. Dropping it cancels the
/// receive.
pub struct Receive<P> {
    rx: oneshot::Receiver<Result<Box<dyn PartsMut>, UcxError>>,
    _p: std::marker::PhantomData<P>,
}

impl<P: PartsMut> Receive<P> {
    pub async fn wait(self) -> Result<P, UcxError> {
        let b: Box<dyn std::any::Any> = self.rx.await.map_err(|_| UcxError::Stopped)??;
        // The box was made from a `P` in `recv_into`.
        b.downcast::<P>().map(|p| *p).map_err(|_| UcxError::Stopped)
    }
}

/// Transport names in `ucp_ep_print_info` or `ucp_context_print_info` output: the `tl` of every
/// `tl/device` resource it names (`tcp/lo`, `rc_mlx5/mlx5_0:1`, `cuda_ipc/cuda`, ...), in order,
/// without repeats.
pub fn endpoint_transports(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if !(line.starts_with("lane[") || line.starts_with("resource")) {
            continue;
        }
        for word in line.split_whitespace() {
            // `1:tcp/lo.0` in lane lines, `tcp/lo` in resource lines.
            let word = word.rsplit(':').find(|w| w.contains('/')).unwrap_or(word);
            let Some((tl, dev)) = word.split_once('/') else {
                continue;
            };
            let is_name = |s: &str| {
                !s.is_empty()
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            };
            if is_name(tl) && !dev.is_empty() && tl != "md" && !out.iter().any(|t| t == tl) {
                out.push(tl.to_string());
            }
        }
    }
    out
}

/// Whether an endpoint using `used` transports fell back to TCP although the context offers a
/// faster one (RDMA, shared memory or CUDA IPC), or `expected` names transports (prefixes such
/// as `rc`, `cuda_ipc`) none of which it uses.
pub fn degraded(used: &[String], available: &[String], expected: &[String]) -> bool {
    let tcp_only = !used.is_empty() && used.iter().all(|t| t == "tcp");
    if !expected.is_empty() {
        return !used
            .iter()
            .any(|u| expected.iter().any(|e| u.starts_with(e.as_str())));
    }
    let fast = |t: &String| {
        [
            "rc", "dc", "ud", "cuda_ipc", "gdr_copy", "posix", "sysv", "cma", "xpmem", "knem",
        ]
        .iter()
        .any(|f| t.starts_with(f))
    };
    tcp_only && available.iter().any(fast)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_are_read_from_lane_and_resource_lines() {
        let ep = "#\n# UCP endpoint\n#\n#               peer: <no debug data>\n\
                  #                 lane[0]:  1:tcp/lo.0 md[1]          -> md[1]/tcp/sysdev[255] \
                  rma_bw#0 am am_bw#0\n\
                  #                 lane[1]:  3:rc_mlx5/mlx5_0:1.0 md[2] -> md[2]/ib am_bw#1\n";
        assert_eq!(endpoint_transports(ep), ["tcp", "rc_mlx5"]);
        let ctx = "#   resource 0  :  md 0  dev 0  flags -- self/memory\n\
                   #   resource 1  :  md 1  dev 1  flags -- tcp/lo\n\
                   #   resource 2  :  md 1  dev 2  flags -- tcp/eth0\n";
        assert_eq!(endpoint_transports(ctx), ["self", "tcp"]);
    }

    #[test]
    fn tcp_is_degraded_only_where_something_faster_was_possible_or_expected() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(!degraded(&s(&["tcp"]), &s(&["self", "tcp"]), &[]));
        assert!(degraded(&s(&["tcp"]), &s(&["tcp", "rc_mlx5"]), &[]));
        assert!(!degraded(&s(&["rc_mlx5"]), &s(&["tcp", "rc_mlx5"]), &[]));
        assert!(degraded(&s(&["tcp"]), &s(&["tcp"]), &s(&["rc"])));
        assert!(!degraded(
            &s(&["rc_mlx5", "tcp"]),
            &s(&["tcp"]),
            &s(&["rc"])
        ));
    }
}
