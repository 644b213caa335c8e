//! Raw UCP 1.13 API: the C types this crate passes and the functions it calls, resolved from
//! `libucp.so.0` at run time (so a machine without UCX builds and runs, and falls back).
//!
//! The struct layouts are written from `ucp/api/ucp.h` and `ucp_def.h` of UCX 1.13;
//! `tests/layout.rs` compiles the real headers and checks every size and offset.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `ucs_status_t`: a packed enum (one signed byte). 0 OK, 1 in progress, negative errors.
pub type ucs_status_t = i8;
pub const UCS_OK: ucs_status_t = 0;
pub const UCS_INPROGRESS: ucs_status_t = 1;
/// `UCS_ERR_LAST`: pointers at or above `(uintptr_t)UCS_ERR_LAST` encode a status.
pub const UCS_ERR_LAST: isize = -100;

pub type ucs_status_ptr_t = *mut c_void;
pub type ucp_context_h = *mut c_void;
pub type ucp_worker_h = *mut c_void;
pub type ucp_ep_h = *mut c_void;
pub type ucp_config_t = c_void;
pub type ucp_address_t = c_void;

pub const UCP_API_MAJOR: c_uint = 1;
pub const UCP_API_MINOR: c_uint = 13;

pub const UCP_PARAM_FIELD_FEATURES: u64 = 1 << 0;
pub const UCP_FEATURE_TAG: u64 = 1 << 0;
pub const UCP_WORKER_PARAM_FIELD_THREAD_MODE: u64 = 1 << 0;
pub const UCS_THREAD_MODE_SINGLE: c_int = 0;
pub const UCP_EP_PARAM_FIELD_REMOTE_ADDRESS: u64 = 1 << 0;
pub const UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE: u64 = 1 << 1;
pub const UCP_ERR_HANDLING_MODE_PEER: c_int = 1;
pub const UCP_OP_ATTR_FIELD_FLAGS: u32 = 1 << 4;
pub const UCP_OP_ATTR_FIELD_RECV_INFO: u32 = 1 << 7;
pub const UCP_EP_CLOSE_FLAG_FORCE: u32 = 1 << 0;

#[repr(C)]
pub struct ucp_params_t {
    pub field_mask: u64,
    pub features: u64,
    pub request_size: usize,
    pub request_init: *mut c_void,
    pub request_cleanup: *mut c_void,
    pub tag_sender_mask: u64,
    pub mt_workers_shared: c_int,
    pub estimated_num_eps: usize,
    pub estimated_num_ppn: usize,
    pub name: *const c_char,
}

#[repr(C)]
pub struct ucp_worker_params_t {
    pub field_mask: u64,
    pub thread_mode: c_int,
    /// `ucs_cpu_set_t`: 1024 bits.
    pub cpu_mask: [u64; 16],
    pub events: c_uint,
    pub user_data: *mut c_void,
    pub event_fd: c_int,
    pub flags: u64,
    pub name: *const c_char,
    pub am_alignment: usize,
    pub client_id: u64,
}

#[repr(C)]
pub struct ucs_sock_addr_t {
    pub addr: *const c_void,
    pub addrlen: u32,
}

#[repr(C)]
pub struct ucp_err_handler_t {
    pub cb: *mut c_void,
    pub arg: *mut c_void,
}

#[repr(C)]
pub struct ucp_ep_params_t {
    pub field_mask: u64,
    pub address: *const ucp_address_t,
    pub err_mode: c_int,
    pub err_handler: ucp_err_handler_t,
    pub user_data: *mut c_void,
    pub flags: c_uint,
    pub sockaddr: ucs_sock_addr_t,
    pub conn_request: *mut c_void,
    pub name: *const c_char,
    pub local_sockaddr: ucs_sock_addr_t,
}

#[repr(C)]
pub struct ucp_tag_recv_info_t {
    pub sender_tag: u64,
    pub length: usize,
}

#[repr(C)]
pub struct ucp_request_param_t {
    pub op_attr_mask: u32,
    pub flags: u32,
    pub request: *mut c_void,
    /// Union of completion callbacks; this crate polls instead and leaves it null.
    pub cb: *mut c_void,
    pub datatype: u64,
    pub user_data: *mut c_void,
    pub reply_buffer: *mut c_void,
    pub memory_type: c_uint,
    /// Union: `size_t *length` or `ucp_tag_recv_info_t *tag_info`.
    pub recv_info: *mut c_void,
    pub memh: *mut c_void,
}

/// The functions this crate calls, resolved from the loaded library.
pub struct Api {
    pub config_read: unsafe extern "C" fn(
        env_prefix: *const c_char,
        filename: *const c_char,
        config: *mut *mut ucp_config_t,
    ) -> ucs_status_t,
    pub config_release: unsafe extern "C" fn(config: *mut ucp_config_t),
    pub init_version: unsafe extern "C" fn(
        api_major: c_uint,
        api_minor: c_uint,
        params: *const ucp_params_t,
        config: *const ucp_config_t,
        context: *mut ucp_context_h,
    ) -> ucs_status_t,
    pub cleanup: unsafe extern "C" fn(context: ucp_context_h),
    pub context_print_info: unsafe extern "C" fn(context: ucp_context_h, stream: *mut libc::FILE),
    pub get_version: unsafe extern "C" fn(major: *mut c_uint, minor: *mut c_uint, rel: *mut c_uint),
    pub worker_create: unsafe extern "C" fn(
        context: ucp_context_h,
        params: *const ucp_worker_params_t,
        worker: *mut ucp_worker_h,
    ) -> ucs_status_t,
    pub worker_destroy: unsafe extern "C" fn(worker: ucp_worker_h),
    pub worker_get_address: unsafe extern "C" fn(
        worker: ucp_worker_h,
        address: *mut *mut ucp_address_t,
        length: *mut usize,
    ) -> ucs_status_t,
    pub worker_release_address:
        unsafe extern "C" fn(worker: ucp_worker_h, address: *mut ucp_address_t),
    pub worker_progress: unsafe extern "C" fn(worker: ucp_worker_h) -> c_uint,
    pub ep_create: unsafe extern "C" fn(
        worker: ucp_worker_h,
        params: *const ucp_ep_params_t,
        ep: *mut ucp_ep_h,
    ) -> ucs_status_t,
    pub ep_close_nbx:
        unsafe extern "C" fn(ep: ucp_ep_h, param: *const ucp_request_param_t) -> ucs_status_ptr_t,
    pub ep_print_info: unsafe extern "C" fn(ep: ucp_ep_h, stream: *mut libc::FILE),
    pub tag_send_nbx: unsafe extern "C" fn(
        ep: ucp_ep_h,
        buffer: *const c_void,
        count: usize,
        tag: u64,
        param: *const ucp_request_param_t,
    ) -> ucs_status_ptr_t,
    pub tag_recv_nbx: unsafe extern "C" fn(
        worker: ucp_worker_h,
        buffer: *mut c_void,
        count: usize,
        tag: u64,
        tag_mask: u64,
        param: *const ucp_request_param_t,
    ) -> ucs_status_ptr_t,
    pub tag_recv_request_test:
        unsafe extern "C" fn(request: *mut c_void, info: *mut ucp_tag_recv_info_t) -> ucs_status_t,
    pub request_check_status: unsafe extern "C" fn(request: *mut c_void) -> ucs_status_t,
    pub request_cancel: unsafe extern "C" fn(worker: ucp_worker_h, request: *mut c_void),
    pub request_free: unsafe extern "C" fn(request: *mut c_void),
    pub status_string: unsafe extern "C" fn(status: ucs_status_t) -> *const c_char,
    /// Keeps the code the pointers above point into mapped.
    _lib: libloading::Library,
}

/// The library names tried, in order (`DOPD_UCX_LIB` first when set).
pub fn candidates() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("DOPD_UCX_LIB") {
        v.push(p);
    }
    v.push("libucp.so.0".into());
    v.push("libucp.so".into());
    v
}

impl Api {
    /// Loads libucp and resolves every function, or says which library or symbol is missing.
    pub fn load() -> Result<Api, String> {
        let mut errors = Vec::new();
        for name in candidates() {
            // SAFETY: loading libucp runs its constructors, which only initialise UCX's own
            // globals; the library is kept loaded for as long as the pointers are used.
            match unsafe { libloading::Library::new(&name) } {
                Ok(lib) => return Self::resolve(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    fn resolve(lib: libloading::Library) -> Result<Api, String> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the field's type is the C prototype of this symbol in UCX 1.13's
                // headers (checked by tests/layout.rs where the headers are installed).
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("missing symbol {}: {e}", $name))?
            };
        }
        Ok(Api {
            config_read: sym!("ucp_config_read"),
            config_release: sym!("ucp_config_release"),
            init_version: sym!("ucp_init_version"),
            cleanup: sym!("ucp_cleanup"),
            context_print_info: sym!("ucp_context_print_info"),
            get_version: sym!("ucp_get_version"),
            worker_create: sym!("ucp_worker_create"),
            worker_destroy: sym!("ucp_worker_destroy"),
            worker_get_address: sym!("ucp_worker_get_address"),
            worker_release_address: sym!("ucp_worker_release_address"),
            worker_progress: sym!("ucp_worker_progress"),
            ep_create: sym!("ucp_ep_create"),
            ep_close_nbx: sym!("ucp_ep_close_nbx"),
            ep_print_info: sym!("ucp_ep_print_info"),
            tag_send_nbx: sym!("ucp_tag_send_nbx"),
            tag_recv_nbx: sym!("ucp_tag_recv_nbx"),
            tag_recv_request_test: sym!("ucp_tag_recv_request_test"),
            request_check_status: sym!("ucp_request_check_status"),
            request_cancel: sym!("ucp_request_cancel"),
            request_free: sym!("ucp_request_free"),
            status_string: sym!("ucs_status_string"),
            _lib: lib,
        })
    }
}

/// `UCS_PTR_IS_ERR`.
pub fn ptr_is_err(p: ucs_status_ptr_t) -> bool {
    (p as usize) >= (UCS_ERR_LAST as usize)
}

/// `UCS_PTR_IS_PTR`: a request handle (neither NULL nor an encoded error).
pub fn ptr_is_ptr(p: ucs_status_ptr_t) -> bool {
    (p as usize).wrapping_sub(1) < (UCS_ERR_LAST as usize).wrapping_sub(1)
}

/// `UCS_PTR_RAW_STATUS`.
pub fn ptr_status(p: ucs_status_ptr_t) -> ucs_status_t {
    p as isize as ucs_status_t
}
