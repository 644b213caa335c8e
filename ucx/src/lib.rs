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

// ----- the UCX thread -----

struct Endpoint {
    ep: sys::ucp_ep_h,
    transports: Vec<String>,
}

enum Kind {
    Send {
        /// Read by UCX until every request is done.
        _data: Box<dyn Parts>,
        peer: Vec<u8>,
        bytes: usize,
        reply: Option<Reply<Sent>>,
    },
    Recv {
        /// Written by UCX until every request is done.
        buf: Box<dyn PartsMut>,
        /// Per part: its receive info (UCX writes it; the vector is never resized, so the
        /// elements stay put) and expected length.
        infos: Vec<sys::ucp_tag_recv_info_t>,
        wants: Vec<usize>,
        reply: Option<Reply<Box<dyn PartsMut>>>,
    },
    Close,
}

struct Op {
    /// One request per part; null once that part completed.
    reqs: Vec<*mut c_void>,
    /// Parts before this index are complete.
    next: usize,
    /// The first failure among the parts.
    error: Option<sys::ucs_status_t>,
    kind: Kind,
    deadline: Instant,
    /// Cancelled (receive) or its endpoint force-closed (send); waiting for UCX to finish it.
    abandoned: bool,
}

struct Worker {
    api: sys::Api,
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    address: Vec<u8>,
    info: Info,
    eps: HashMap<Vec<u8>, Endpoint>,
    ops: Vec<Op>,
}

fn wire_tag(tag: u64, part: usize) -> u64 {
    (tag << PART_BITS) | part as u64
}

fn check_tag(tag: u64, parts: usize) -> Result<(), UcxError> {
    if tag > MAX_TAG || parts > MAX_PARTS {
        return Err(UcxError::Status {
            op: "tag",
            status: format!("tag {tag} or {parts} parts out of range"),
        });
    }
    Ok(())
}

impl Worker {
    fn status(&self, op: &'static str, s: sys::ucs_status_t) -> UcxError {
        // SAFETY: ucs_status_string returns a static string for any status value.
        let text = unsafe { CStr::from_ptr((self.api.status_string)(s)) };
        UcxError::Status {
            op,
            status: text.to_string_lossy().into_owned(),
        }
    }

    fn create(api: sys::Api) -> Result<Worker, UcxError> {
        let fail = |api: &sys::Api, op: &'static str, s: sys::ucs_status_t| {
            // SAFETY: as in `status`.
            let text = unsafe { CStr::from_ptr((api.status_string)(s)) };
            UcxError::Unavailable(format!("{op}: {}", text.to_string_lossy()))
        };
        let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: null prefix and file mean "UCX_ environment variables"; config is an out
        // pointer, released below.
        let s = unsafe { (api.config_read)(std::ptr::null(), std::ptr::null(), &mut config) };
        if s != sys::UCS_OK {
            return Err(fail(&api, "reading the UCX configuration", s));
        }
        let params = sys::ucp_params_t {
            field_mask: sys::UCP_PARAM_FIELD_FEATURES,
            features: sys::UCP_FEATURE_TAG,
            request_size: 0,
            request_init: std::ptr::null_mut(),
            request_cleanup: std::ptr::null_mut(),
            tag_sender_mask: 0,
            mt_workers_shared: 0,
            estimated_num_eps: 0,
            estimated_num_ppn: 0,
            name: std::ptr::null(),
        };
        let mut context: sys::ucp_context_h = std::ptr::null_mut();
        // SAFETY: params is a fully initialised ucp_params_t (only `features` is read, per
        // field_mask); config came from ucp_config_read; context is an out pointer.
        let s = unsafe {
            (api.init_version)(
                sys::UCP_API_MAJOR,
                sys::UCP_API_MINOR,
                &params,
                config,
                &mut context,
            )
        };
        // SAFETY: the context copied what it needs from config.
        unsafe { (api.config_release)(config) };
        if s != sys::UCS_OK {
            return Err(fail(&api, "creating the UCX context", s));
        }
        let wparams = sys::ucp_worker_params_t {
            field_mask: sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE,
            thread_mode: sys::UCS_THREAD_MODE_SINGLE,
            cpu_mask: [0; 16],
            events: 0,
            user_data: std::ptr::null_mut(),
            event_fd: 0,
            flags: 0,
            name: std::ptr::null(),
            am_alignment: 0,
            client_id: 0,
        };
        let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: context is live; wparams is fully initialised; worker is an out pointer.
        let s = unsafe { (api.worker_create)(context, &wparams, &mut worker) };
        if s != sys::UCS_OK {
            // SAFETY: the context has no workers.
            unsafe { (api.cleanup)(context) };
            return Err(fail(&api, "creating the UCX worker", s));
        }
        let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: worker is live; addr/len are out pointers; the address is copied, then
        // released with the matching call.
        let s = unsafe { (api.worker_get_address)(worker, &mut addr, &mut len) };
        if s != sys::UCS_OK {
            // SAFETY: destroy in creation order's reverse.
            unsafe {
                (api.worker_destroy)(worker);
                (api.cleanup)(context);
            }
            return Err(fail(&api, "reading the UCX worker address", s));
        }
        // SAFETY: UCX returned `len` readable bytes at `addr`.
        let address = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len) }.to_vec();
        // SAFETY: addr came from worker_get_address on this worker.
        unsafe { (api.worker_release_address)(worker, addr) };
        // SAFETY: context is live; the closure gets a FILE* valid for its duration.
        let text = print_to_string(|f| unsafe { (api.context_print_info)(context, f) });
        let (mut ma, mut mi, mut re) = (0, 0, 0);
        // SAFETY: three out pointers.
        unsafe { (api.get_version)(&mut ma, &mut mi, &mut re) };
        let info = Info {
            version: format!("{ma}.{mi}.{re}"),
            transports: endpoint_transports(&text),
        };
        Ok(Worker {
            api,
            context,
            worker,
            address,
            info,
            eps: HashMap::new(),
            ops: Vec::new(),
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            // Block briefly while idle; poll while operations are in flight.
            let cmd = if self.ops.is_empty() {
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Cmd::Stop),
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => Some(Cmd::Stop),
                }
            };
            match cmd {
                Some(Cmd::Stop) => break,
                Some(Cmd::Send {
                    peer,
                    tag,
                    data,
                    deadline,
                    reply,
                }) => self.start_send(peer, tag, data, deadline, reply),
                Some(Cmd::Recv {
                    tag,
                    buf,
                    deadline,
                    reply,
                }) => self.start_recv(tag, buf, deadline, reply),
                None => {}
            }
            let mut progressed = false;
            for _ in 0..64 {
                // SAFETY: the worker is live and only this thread uses it.
                if unsafe { (self.api.worker_progress)(self.worker) } == 0 {
                    break;
                }
                progressed = true;
            }
            self.reap();
            if !progressed && !self.ops.is_empty() {
                std::thread::yield_now();
            }
        }
        self.shutdown();
    }

    fn endpoint(&mut self, peer: &[u8]) -> Result<sys::ucp_ep_h, UcxError> {
        if let Some(e) = self.eps.get(peer) {
            return Ok(e.ep);
        }
        let params = sys::ucp_ep_params_t {
            field_mask: sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
            address: peer.as_ptr().cast(),
            err_mode: sys::UCP_ERR_HANDLING_MODE_PEER,
            err_handler: sys::ucp_err_handler_t {
                cb: std::ptr::null_mut(),
                arg: std::ptr::null_mut(),
            },
            user_data: std::ptr::null_mut(),
            flags: 0,
            sockaddr: sys::ucs_sock_addr_t {
                addr: std::ptr::null(),
                addrlen: 0,
            },
            conn_request: std::ptr::null_mut(),
            name: std::ptr::null(),
            local_sockaddr: sys::ucs_sock_addr_t {
                addr: std::ptr::null(),
                addrlen: 0,
            },
        };
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: the worker is live; `address` points at a worker address a peer produced
        // (UCX validates it); the params are fully initialised; ep is an out pointer.
        let s = unsafe { (self.api.ep_create)(self.worker, &params, &mut ep) };
        if s != sys::UCS_OK {
            return Err(self.status("connecting to the peer", s));
        }
        self.eps.insert(
            peer.to_vec(),
            Endpoint {
                ep,
                transports: Vec::new(),
            },
        );
        Ok(ep)
    }

    fn param(recv_info: *mut c_void) -> sys::ucp_request_param_t {
        sys::ucp_request_param_t {
            op_attr_mask: if recv_info.is_null() {
                0
            } else {
                sys::UCP_OP_ATTR_FIELD_RECV_INFO
            },
            flags: 0,
            request: std::ptr::null_mut(),
            cb: std::ptr::null_mut(),
            datatype: 0,
            user_data: std::ptr::null_mut(),
            reply_buffer: std::ptr::null_mut(),
            memory_type: 0,
            recv_info,
            memh: std::ptr::null_mut(),
        }
    }

    /// Turns `nbx` results into an op's request list: a request handle stays pending, an
    /// immediate completion is null, an error is recorded (and posting stops).
    fn collect(
        results: impl Iterator<Item = sys::ucs_status_ptr_t>,
    ) -> (Vec<*mut c_void>, Option<sys::ucs_status_t>) {
        let mut reqs = Vec::new();
        for p in results {
            if sys::ptr_is_err(p) {
                return (reqs, Some(sys::ptr_status(p)));
            }
            reqs.push(if sys::ptr_is_ptr(p) {
                p
            } else {
                std::ptr::null_mut()
            });
        }
        (reqs, None)
    }

    fn start_send(
        &mut self,
        peer: Vec<u8>,
        tag: u64,
        data: Box<dyn Parts>,
        deadline: Instant,
        reply: Reply<Sent>,
    ) {
        let parts = data.parts();
        if let Err(e) = check_tag(tag, parts.len()) {
            let _ = reply.send(Err(e));
            return;
        }
        let ep = match self.endpoint(&peer) {
            Ok(ep) => ep,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let param = Self::param(std::ptr::null_mut());
        let bytes = parts.iter().map(|p| p.len()).sum();
        let send = self.api.tag_send_nbx;
        let (reqs, error) = Self::collect(parts.iter().enumerate().map(|(i, p)| {
            // SAFETY: ep is live; every part borrows from `data`, which the Op below owns
            // until all requests are complete, so the memory outlives them.
            unsafe { send(ep, p.as_ptr().cast(), p.len(), wire_tag(tag, i), &param) }
        }));
        drop(parts);
        self.ops.push(Op {
            reqs,
            next: 0,
            error,
            kind: Kind::Send {
                _data: data,
                peer,
                bytes,
                reply: Some(reply),
            },
            deadline,
            abandoned: false,
        });
    }

    fn start_recv(
        &mut self,
        tag: u64,
        mut buf: Box<dyn PartsMut>,
        deadline: Instant,
        reply: Reply<Box<dyn PartsMut>>,
    ) {
        let parts = buf.parts_mut();
        if let Err(e) = check_tag(tag, parts.len()) {
            let _ = reply.send(Err(e));
            return;
        }
        let wants: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        let mut infos: Vec<sys::ucp_tag_recv_info_t> = parts
            .iter()
            .map(|_| sys::ucp_tag_recv_info_t {
                sender_tag: 0,
                length: 0,
            })
            .collect();
        let (worker, recv) = (self.worker, self.api.tag_recv_nbx);
        let (reqs, error) = Self::collect(parts.into_iter().zip(infos.iter_mut()).enumerate().map(
            |(i, (p, info))| {
                let param = Self::param((info as *mut sys::ucp_tag_recv_info_t).cast());
                // SAFETY: the worker is live; the part and its info box are heap memory owned
                // by the Op below until every request is complete.
                unsafe {
                    recv(
                        worker,
                        p.as_mut_ptr().cast(),
                        p.len(),
                        wire_tag(tag, i),
                        u64::MAX,
                        &param,
                    )
                }
            },
        ));
        self.ops.push(Op {
            reqs,
            next: 0,
            error,
            kind: Kind::Recv {
                buf,
                infos,
                wants,
                reply: Some(reply),
            },
            deadline,
            abandoned: false,
        });
    }

    /// Polls an op's pending requests in order, stopping at the first still in progress (parts
    /// complete roughly in order, so each poll costs O(1) however many parts are in flight);
    /// returns whether all are done.
    fn poll(&mut self, i: usize) -> bool {
        let api = &self.api;
        let op = &mut self.ops[i];
        while op.next < op.reqs.len() {
            let j = op.next;
            let req = op.reqs[j];
            if !req.is_null() {
                let status = match &mut op.kind {
                    // SAFETY: req is a live receive request; infos[j] is its out struct.
                    Kind::Recv { infos, .. } => unsafe {
                        (api.tag_recv_request_test)(req, &mut infos[j])
                    },
                    // SAFETY: req is a live request.
                    _ => unsafe { (api.request_check_status)(req) },
                };
                if status == sys::UCS_INPROGRESS {
                    return false;
                }
                // SAFETY: the request is complete; it is freed once and nulled.
                unsafe { (api.request_free)(req) };
                op.reqs[j] = std::ptr::null_mut();
                if status != sys::UCS_OK && op.error.is_none() {
                    op.error = Some(status);
                }
            }
            op.next += 1;
        }
        true
    }

    /// Answers finished operations and abandons overdue, failed or unwanted ones.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.ops.len() {
            if !self.poll(i) {
                let op = &self.ops[i];
                let unwanted = match &op.kind {
                    Kind::Recv { reply, .. } => reply.as_ref().is_none_or(|r| r.is_closed()),
                    Kind::Send { reply, .. } => reply.as_ref().is_none_or(|r| r.is_closed()),
                    Kind::Close => false,
                };
                let overdue = now >= op.deadline;
                if !op.abandoned && (overdue || unwanted || op.error.is_some()) {
                    self.abandon(i, overdue);
                }
                i += 1;
                continue;
            }
            let op = self.ops.swap_remove(i);
            let error = op.error.map(|s| {
                let what = if matches!(op.kind, Kind::Recv { .. }) {
                    "receive"
                } else {
                    "send"
                };
                self.status(what, s)
            });
            match op.kind {
                Kind::Send {
                    peer, bytes, reply, ..
                } => {
                    let r = match error {
                        None => Ok(Sent {
                            bytes,
                            transports: self.endpoint_info(&peer),
                        }),
                        Some(e) => {
                            self.drop_endpoint(&peer);
                            Err(e)
                        }
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Kind::Recv {
                    buf,
                    infos,
                    wants,
                    reply,
                } => {
                    let short = infos
                        .iter()
                        .zip(&wants)
                        .find(|(info, want)| info.length != **want)
                        .map(|(info, want)| UcxError::Length {
                            got: info.length,
                            want: *want,
                        });
                    let r = match (error, short) {
                        (Some(e), _) | (None, Some(e)) => Err(e),
                        (None, None) => Ok(buf),
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Kind::Close => {}
            }
        }
    }

    /// Gives up on operation `i`: answers its caller now, and asks UCX to finish it (cancel a
    /// receive's parts; force-close a send's endpoint). The memory stays owned until UCX is
    /// done.
    fn abandon(&mut self, i: usize, overdue: bool) {
        self.ops[i].abandoned = true;
        let status = self.ops[i].error.map(|s| self.status("transfer", s));
        let why = |what: &'static str| match (&status, overdue) {
            (Some(e), _) => e.clone(),
            (None, true) => UcxError::Deadline(what),
            (None, false) => UcxError::Cancelled(what),
        };
        let mut close = None;
        let (worker, cancel) = (self.worker, self.api.request_cancel);
        let op = &mut self.ops[i];
        match &mut op.kind {
            Kind::Recv { reply, .. } => {
                if let Some(r) = reply.take() {
                    let _ = r.send(Err(why("receive")));
                }
                for req in op.reqs.iter().filter(|r| !r.is_null()) {
                    // SAFETY: req is a live receive request of this worker.
                    unsafe { cancel(worker, *req) };
                }
            }
            Kind::Send { reply, peer, .. } => {
                if let Some(r) = reply.take() {
                    let _ = r.send(Err(why("send")));
                }
                close = Some(peer.clone());
            }
            Kind::Close => {}
        }
        if let Some(peer) = close {
            self.drop_endpoint(&peer);
        }
    }

    /// The transports of the endpoint to `peer` (read once, after its first completed send:
    /// by then wire-up has chosen its lanes).
    fn endpoint_info(&mut self, peer: &[u8]) -> Vec<String> {
        let api = &self.api;
        match self.eps.get_mut(peer) {
            Some(e) if e.transports.is_empty() => {
                let ep = e.ep;
                // SAFETY: ep is live; the closure gets a FILE* valid for its duration.
                let text = print_to_string(|f| unsafe { (api.ep_print_info)(ep, f) });
                e.transports = endpoint_transports(&text);
                tracing::debug!(transports = ?e.transports, "UCX endpoint lanes:\n{text}");
                e.transports.clone()
            }
            Some(e) => e.transports.clone(),
            None => Vec::new(),
        }
    }

    /// Force-closes the endpoint to `peer` (after an error, so the next send reconnects).
    fn drop_endpoint(&mut self, peer: &[u8]) {
        let Some(e) = self.eps.remove(peer) else {
            return;
        };
        let mut param = Self::param(std::ptr::null_mut());
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = sys::UCP_EP_CLOSE_FLAG_FORCE;
        // SAFETY: the endpoint is live and removed from the map, so it is closed once; its
        // outstanding sends complete with an error and are reaped (memory still owned).
        let p = unsafe { (self.api.ep_close_nbx)(e.ep, &param) };
        if sys::ptr_is_ptr(p) {
            self.ops.push(Op {
                reqs: vec![p],
                next: 0,
                error: None,
                kind: Kind::Close,
                deadline: Instant::now() + Duration::from_secs(3600),
                abandoned: true,
            });
        }
    }

    fn shutdown(mut self) {
        let peers: Vec<Vec<u8>> = self.eps.keys().cloned().collect();
        for p in peers {
            self.drop_endpoint(&p);
        }
        for i in 0..self.ops.len() {
            if !self.ops[i].abandoned {
                self.abandon(i, false);
            }
        }
        let until = Instant::now() + Duration::from_secs(2);
        while !self.ops.is_empty() && Instant::now() < until {
            // SAFETY: as in `run`.
            unsafe { (self.api.worker_progress)(self.worker) };
            self.reap();
        }
        if !self.ops.is_empty() {
            // UCX still holds requests into this memory: leak it rather than free memory UCX
            // may write to, and leave the worker and context alive for the same reason.
            tracing::warn!(
                pending = self.ops.len(),
                "UCX operations still pending at shutdown"
            );
            std::mem::forget(std::mem::take(&mut self.ops));
            std::mem::forget(self);
            return;
        }
        // SAFETY: no endpoint or request remains; destroy the worker, then the context.
        unsafe {
            (self.api.worker_destroy)(self.worker);
            (self.api.cleanup)(self.context);
        }
    }
}

/// Runs a UCX `*_print_info` into a temporary file and returns the text.
fn print_to_string(print: impl FnOnce(*mut libc::FILE)) -> String {
    // SAFETY: tmpfile returns an owned FILE* or null; it is closed below.
    let f = unsafe { libc::tmpfile() };
    if f.is_null() {
        return String::new();
    }
    print(f);
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    // SAFETY: f is a valid FILE*; fread writes at most chunk.len() bytes into chunk.
    unsafe {
        libc::fflush(f);
        libc::rewind(f);
        loop {
            let n = libc::fread(chunk.as_mut_ptr().cast(), 1, chunk.len(), f);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        libc::fclose(f);
    }
    String::from_utf8_lossy(&out).into_owned()
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
