//! The UCX thread: it owns the UCP context and worker, makes endpoints, posts tagged sends and
//! receives of a message's parts, and progresses them until each completes, fails or passes its
//! deadline. The public API (`Ucx`) talks to it over a channel.

use super::*;

pub(super) struct Endpoint {
    ep: sys::ucp_ep_h,
    transports: Vec<String>,
}

pub(super) enum Kind {
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

pub(super) struct Op {
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

pub(super) struct Worker {
    api: sys::Api,
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    pub(super) address: Vec<u8>,
    pub(super) info: Info,
    eps: HashMap<Vec<u8>, Endpoint>,
    ops: Vec<Op>,
}

pub(super) fn wire_tag(tag: u64, part: usize) -> u64 {
    (tag << PART_BITS) | part as u64
}

pub(super) fn check_tag(tag: u64, parts: usize) -> Result<(), UcxError> {
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

    pub(super) fn create(api: sys::Api) -> Result<Worker, UcxError> {
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

    pub(super) fn run(mut self, rx: mpsc::Receiver<Cmd>) {
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

/// Runs a UCX `*_print_info` into an in-memory stream and returns the text. (In memory: a
/// container with a read-only root filesystem has no writable place for a temporary file, and
/// UCX's transports would read as none.)
pub(super) fn print_to_string(print: impl FnOnce(*mut libc::FILE)) -> String {
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream returns an owned FILE* or null and, once the stream is closed,
    // leaves in buf a malloc'ed buffer of len bytes (freed below).
    let f = unsafe { libc::open_memstream(&mut buf, &mut len) };
    if f.is_null() {
        return String::new();
    }
    print(f);
    // SAFETY: f is the stream opened above, closed once; afterwards buf holds len bytes (or is
    // null when nothing could be allocated).
    unsafe {
        libc::fclose(f);
        if buf.is_null() {
            return String::new();
        }
        let text =
            String::from_utf8_lossy(std::slice::from_raw_parts(buf.cast::<u8>(), len)).into_owned();
        libc::free(buf.cast());
        text
    }
}
