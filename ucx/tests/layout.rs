//! The hand-written struct layouts and constants in `dopd_ucx::sys` against UCX's own headers,
//! compiled with the system C compiler. Skipped, with the reason printed, where the headers
//! (`libucx-dev`) or a C compiler are missing.

use std::mem::{offset_of, size_of};
use std::process::Command;

use dopd_ucx::sys::*;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <ucp/api/ucp.h>
#define S(t) printf(#t " %zu\n", sizeof(t));
#define O(t, f) printf(#t "." #f " %zu\n", offsetof(t, f));
#define C(c) printf(#c " %lld\n", (long long)(c));
int main(void) {
    S(ucp_params_t) O(ucp_params_t, features) O(ucp_params_t, tag_sender_mask)
    O(ucp_params_t, mt_workers_shared) O(ucp_params_t, estimated_num_eps) O(ucp_params_t, name)
    S(ucp_worker_params_t) O(ucp_worker_params_t, thread_mode) O(ucp_worker_params_t, cpu_mask)
    O(ucp_worker_params_t, events) O(ucp_worker_params_t, user_data)
    O(ucp_worker_params_t, event_fd) O(ucp_worker_params_t, flags) O(ucp_worker_params_t, name)
    O(ucp_worker_params_t, am_alignment) O(ucp_worker_params_t, client_id)
    S(ucp_ep_params_t) O(ucp_ep_params_t, address) O(ucp_ep_params_t, err_mode)
    O(ucp_ep_params_t, err_handler) O(ucp_ep_params_t, user_data) O(ucp_ep_params_t, flags)
    O(ucp_ep_params_t, sockaddr) O(ucp_ep_params_t, conn_request) O(ucp_ep_params_t, name)
    O(ucp_ep_params_t, local_sockaddr)
    S(ucp_request_param_t) O(ucp_request_param_t, flags) O(ucp_request_param_t, request)
    O(ucp_request_param_t, cb) O(ucp_request_param_t, datatype) O(ucp_request_param_t, user_data)
    O(ucp_request_param_t, reply_buffer) O(ucp_request_param_t, memory_type)
    O(ucp_request_param_t, recv_info) O(ucp_request_param_t, memh)
    S(ucp_tag_recv_info_t) O(ucp_tag_recv_info_t, length)
    S(ucs_status_t) S(ucs_sock_addr_t) S(ucp_err_handler_t)
    C(UCS_OK) C(UCS_INPROGRESS) C(UCS_ERR_LAST) C(UCP_API_MAJOR) C(UCP_API_MINOR)
    C(UCP_PARAM_FIELD_FEATURES) C(UCP_FEATURE_TAG) C(UCP_WORKER_PARAM_FIELD_THREAD_MODE)
    C(UCS_THREAD_MODE_SINGLE) C(UCP_EP_PARAM_FIELD_REMOTE_ADDRESS)
    C(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE) C(UCP_ERR_HANDLING_MODE_PEER)
    C(UCP_OP_ATTR_FIELD_FLAGS) C(UCP_OP_ATTR_FIELD_RECV_INFO) C(UCP_EP_CLOSE_FLAG_FORCE)
    return 0;
}
"#;

fn c_values() -> Option<Vec<(String, i64)>> {
    let dir = std::env::temp_dir().join(format!("dopd-ucx-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, PROGRAM).expect("write C");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc).arg(&src).arg("-o").arg(&exe).output();
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "skipped: cannot compile against <ucp/api/ucp.h> (install libucx-dev): {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            );
            return None;
        }
        Err(e) => {
            eprintln!("skipped: no C compiler ({cc}): {e}");
            return None;
        }
    }
    let out = Command::new(&exe).output().expect("run the layout program");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let _ = std::fs::remove_dir_all(&dir);
    Some(
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, v)| (k.to_string(), v.parse().expect("a number")))
            .collect(),
    )
}

#[test]
fn struct_layouts_and_constants_match_the_installed_headers() {
    let Some(c) = c_values() else { return };
    macro_rules! s {
        ($t:ident) => {
            (stringify!($t).to_string(), size_of::<$t>() as i64)
        };
    }
    macro_rules! o {
        ($t:ident, $f:ident) => {
            (
                format!("{}.{}", stringify!($t), stringify!($f)),
                offset_of!($t, $f) as i64,
            )
        };
    }
    macro_rules! k {
        ($c:ident) => {
            (stringify!($c).to_string(), $c as i64)
        };
    }
    let rust = vec![
        s!(ucp_params_t),
        o!(ucp_params_t, features),
        o!(ucp_params_t, tag_sender_mask),
        o!(ucp_params_t, mt_workers_shared),
        o!(ucp_params_t, estimated_num_eps),
        o!(ucp_params_t, name),
        s!(ucp_worker_params_t),
        o!(ucp_worker_params_t, thread_mode),
        o!(ucp_worker_params_t, cpu_mask),
        o!(ucp_worker_params_t, events),
        o!(ucp_worker_params_t, user_data),
        o!(ucp_worker_params_t, event_fd),
        o!(ucp_worker_params_t, flags),
        o!(ucp_worker_params_t, name),
        o!(ucp_worker_params_t, am_alignment),
        o!(ucp_worker_params_t, client_id),
        s!(ucp_ep_params_t),
        o!(ucp_ep_params_t, address),
        o!(ucp_ep_params_t, err_mode),
        o!(ucp_ep_params_t, err_handler),
        o!(ucp_ep_params_t, user_data),
        o!(ucp_ep_params_t, flags),
        o!(ucp_ep_params_t, sockaddr),
        o!(ucp_ep_params_t, conn_request),
        o!(ucp_ep_params_t, name),
        o!(ucp_ep_params_t, local_sockaddr),
        s!(ucp_request_param_t),
        o!(ucp_request_param_t, flags),
        o!(ucp_request_param_t, request),
        o!(ucp_request_param_t, cb),
        o!(ucp_request_param_t, datatype),
        o!(ucp_request_param_t, user_data),
        o!(ucp_request_param_t, reply_buffer),
        o!(ucp_request_param_t, memory_type),
        o!(ucp_request_param_t, recv_info),
        o!(ucp_request_param_t, memh),
        s!(ucp_tag_recv_info_t),
        o!(ucp_tag_recv_info_t, length),
        s!(ucs_status_t),
        s!(ucs_sock_addr_t),
        s!(ucp_err_handler_t),
        k!(UCS_OK),
        k!(UCS_INPROGRESS),
        k!(UCS_ERR_LAST),
        k!(UCP_API_MAJOR),
        k!(UCP_API_MINOR),
        k!(UCP_PARAM_FIELD_FEATURES),
        k!(UCP_FEATURE_TAG),
        k!(UCP_WORKER_PARAM_FIELD_THREAD_MODE),
        k!(UCS_THREAD_MODE_SINGLE),
        k!(UCP_EP_PARAM_FIELD_REMOTE_ADDRESS),
        k!(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE),
        k!(UCP_ERR_HANDLING_MODE_PEER),
        k!(UCP_OP_ATTR_FIELD_FLAGS),
        k!(UCP_OP_ATTR_FIELD_RECV_INFO),
        k!(UCP_EP_CLOSE_FLAG_FORCE),
    ];
    assert_eq!(
        rust.len(),
        c.len(),
        "the C program and this test list different items"
    );
    for ((rk, rv), (ck, cv)) in rust.iter().zip(&c) {
        assert_eq!(rk, ck, "item order");
        assert_eq!(rv, cv, "{rk}: Rust {rv}, C {cv}");
    }
}
