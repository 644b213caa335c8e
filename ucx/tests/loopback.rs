//! Two UCX workers in one process over loopback TCP (as CI runs them: `UCX_TLS=tcp`). Skipped,
//! with the reason printed, where libucp is not installed.

use std::time::{Duration, Instant};

use dopd_ucx::{Ucx, UcxError};

fn pair() -> Option<(Ucx, Ucx)> {
    match (Ucx::start(), Ucx::start()) {
        (Ok(a), Ok(b)) => Some((a, b)),
        (Err(UcxError::Unavailable(why)), _) | (_, Err(UcxError::Unavailable(why))) => {
            eprintln!("skipped: {why}");
            None
        }
        (Err(e), _) | (_, Err(e)) => panic!("UCX failed to start: {e}"),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn tagged_messages_arrive_intact_small_and_large() {
    let Some((a, b)) = pair() else { return };
    assert!(!a.info().transports.is_empty(), "{:?}", a.info());
    rt().block_on(async {
        for (tag, len) in [(1u64, 1usize), (2, 4096), (3, 3 << 20), (4, 17 << 20)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + tag as usize) as u8).collect();
            let recv = b.recv(tag, len, Duration::from_secs(20)).expect("posted");
            let sent = a
                .send(b.address(), tag, data.clone(), Duration::from_secs(20))
                .await
                .expect("sent");
            assert_eq!(sent.bytes, len);
            assert!(!sent.transports.is_empty());
            assert_eq!(recv.wait().await.expect("received"), data, "tag {tag}");
        }
    });
}

#[test]
fn a_receive_nobody_sends_to_misses_its_deadline_quickly() {
    let Some((_, b)) = pair() else { return };
    rt().block_on(async {
        let t = Instant::now();
        let r = b.recv(9, 1024, Duration::from_millis(200)).expect("posted");
        assert_eq!(r.wait().await, Err(UcxError::Deadline("receive")));
        assert!(t.elapsed() < Duration::from_secs(2));
        // The worker still serves after the cancelled receive.
        let r = b.recv(10, 8, Duration::from_secs(5)).expect("posted");
        drop(r);
    });
}

#[test]
fn a_wrong_length_is_an_error_not_a_short_buffer() {
    let Some((a, b)) = pair() else { return };
    rt().block_on(async {
        let recv = b.recv(5, 100, Duration::from_secs(5)).expect("posted");
        a.send(b.address(), 5, vec![7u8; 60], Duration::from_secs(5))
            .await
            .expect("sent");
        assert_eq!(
            recv.wait().await,
            Err(UcxError::Length { got: 60, want: 100 })
        );
    });
}

#[test]
fn a_send_to_a_vanished_peer_fails_instead_of_hanging() {
    let Some((a, b)) = pair() else { return };
    let addr = b.address().to_vec();
    drop(b);
    rt().block_on(async {
        let t = Instant::now();
        let r = a
            .send(&addr, 1, vec![0u8; 8 << 20], Duration::from_secs(3))
            .await;
        assert!(r.is_err(), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    });
}
