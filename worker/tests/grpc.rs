//! The gRPC service over loopback with a tiny random model: streaming generation, the
//! prefill -> decode hand-off between two servers, roles, drain, stats and cancellation on
//! client disconnect.

use std::sync::Arc;
use std::time::Duration;

use burn::backend::Flex;
use dopd_protocol::proto::{
    self, DecodeRequest, DrainRequest, GenerateRequest, HealthRequest, Sampling, StatsRequest,
    StopSettings, generate_event::Event as Ev, worker_client::WorkerClient,
};
use dopd_protocol::{Role, connect};
use dopd_ucx::Ucx;
use dopd_worker::engine::{Detokenizer, Engine, EngineConfig};
use dopd_worker::engine_thread::EngineHandle;
use dopd_worker::model::{Llama, LlamaConfig};
use dopd_worker::service::{WorkerInfo, WorkerService, serve};
use tonic::Code;
use tonic::transport::Channel;

type B = Flex;

fn tiny() -> LlamaConfig {
    LlamaConfig::tiny()
}

/// Starts a worker on 127.0.0.1:0 and returns a client.
async fn start(role: Role, kv_blocks: usize) -> WorkerClient<Channel> {
    start_with(role, kv_blocks, None).await
}

/// A detokenizer that fails: stands in for any bug inside an engine step.
struct Broken;

impl Detokenizer for Broken {
    fn detokenize(&self, _: &[u32]) -> String {
        panic!("detokenizer bug")
    }
}

async fn start_with(
    role: Role,
    kv_blocks: usize,
    detok: Option<Arc<dyn Detokenizer>>,
) -> WorkerClient<Channel> {
    let s = spawn(role, kv_blocks, detok, Duration::from_secs(30)).await;
    // Keep the server running for the rest of the test process.
    std::mem::forget(s.stop);
    s.client
}

/// A worker on 127.0.0.1:0.
struct Spawned {
    client: WorkerClient<Channel>,
    url: String,
    /// Send to stop the server (the port then refuses connections).
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn spawn(
    role: Role,
    kv_blocks: usize,
    detok: Option<Arc<dyn Detokenizer>>,
    lease_ttl: Duration,
) -> Spawned {
    spawn_with(role, kv_blocks, detok, lease_ttl, None).await
}

/// UCX for a test, or `None` with the reason printed where libucp is missing.
fn ucx_or_skip() -> Option<Arc<Ucx>> {
    match Ucx::start() {
        Ok(u) => Some(Arc::new(u)),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

async fn spawn_with(
    role: Role,
    kv_blocks: usize,
    detok: Option<Arc<dyn Detokenizer>>,
    lease_ttl: Duration,
    ucx: Option<Arc<Ucx>>,
) -> Spawned {
    let model = Arc::new(Llama::<B>::random(tiny(), 7, &Default::default()).expect("tiny model"));
    let engine = Engine::new(
        model,
        detok,
        EngineConfig {
            block_size: 4,
            kv_blocks,
            max_running: 8,
            max_prefill_tokens: 256,
            model_hash: 42,
        },
    );
    let info = WorkerInfo {
        worker_id: format!("{role}-test"),
        epoch: 1,
        model: "tiny".into(),
        role,
        context: 4096,
    };
    let mut svc = WorkerService::new(EngineHandle::spawn(engine), info, None, vec![])
        .with_transfer(lease_ttl, Duration::from_secs(2));
    if let Some(u) = ucx {
        svc = svc.with_ucx(u, vec![]);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback port");
    let addr = listener.local_addr().expect("bound");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, svc, async {
        let _ = rx.await;
    }));
    let url = format!("http://{addr}");
    Spawned {
        client: connect(url.clone()).await.expect("connects"),
        url,
        stop,
    }
}

fn gen_req(max_tokens: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        request_id: "t".into(),
        inline_kv: true,
        prompt: String::new(),
        prompt_tokens: (0..20).map(|i| (i * 7 + 3) % 48).collect(),
        sampling: Some(Sampling {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.9,
            seed,
        }),
        stop: Some(StopSettings {
            max_tokens,
            stop: vec![],
            ignore_eos: false,
        }),
        step_prefill_budget: 0,
    }
}

/// Generate on `c`: the tokens and the finish event.
async fn generate(
    c: &mut WorkerClient<Channel>,
    r: GenerateRequest,
) -> (Vec<u32>, Option<proto::Finished>) {
    collect(c.generate(r).await.expect("generate").into_inner()).await
}

/// Tokens of a stream and its finish event.
async fn collect(
    mut s: tonic::Streaming<proto::GenerateEvent>,
) -> (Vec<u32>, Option<proto::Finished>) {
    let mut toks = Vec::new();
    let mut fin = None;
    while let Some(ev) = s.message().await.expect("stream ok") {
        match ev.event {
            Some(Ev::Token(t)) => toks.push(t.id),
            Some(Ev::Finished(f)) => fin = Some(f),
            None => {}
        }
    }
    (toks, fin)
}

#[tokio::test]
async fn prefill_on_one_worker_and_decode_on_another_equals_mixed() {
    let mut mixed = start(Role::Mixed, 256).await;
    let mut pre = start(Role::Prefill, 256).await;
    let mut dec = start(Role::Decode, 256).await;

    let (want, fin) = generate(&mut mixed, gen_req(16, 9)).await;
    let fin = fin.expect("finished event");
    assert_eq!(want.len(), 16);
    assert_eq!(fin.completion_tokens, 16);
    assert_eq!(fin.prompt_tokens, 20);
    assert_eq!(fin.reason, proto::FinishReason::Length as i32);

    let p = pre
        .prefill(gen_req(16, 9))
        .await
        .expect("prefill")
        .into_inner();
    assert_eq!(p.finish, proto::FinishReason::Unspecified as i32);
    assert_eq!(p.worker_id, "prefill-test");
    let kv = p.kv.clone().expect("kv blocks");
    assert_eq!(kv.tokens, 20);
    assert_eq!(kv.blocks.len(), 5);
    let r = gen_req(16, 9);
    let (rest, fin) = collect(
        dec.decode(DecodeRequest {
            request_id: "t".into(),
            prompt_tokens: p.prompt_tokens.clone(),
            first_token: p.first_token,
            kv: Some(kv.clone()),
            sampling: r.sampling,
            stop: r.stop,
            ..Default::default()
        })
        .await
        .expect("decode")
        .into_inner(),
    )
    .await;
    let mut got = vec![p.first_token];
    got.extend(rest);
    assert_eq!(got, want);
    assert_eq!(fin.expect("finished").completion_tokens, 16);

    // Corrupt blocks (a wrong fingerprint) are refused before any decoding.
    let mut bad = kv;
    if let Some(l) = bad.layout.as_mut() {
        l.fingerprint ^= 1;
    }
    let err = dec
        .decode(DecodeRequest {
            request_id: "bad".into(),
            prompt_tokens: p.prompt_tokens,
            first_token: p.first_token,
            kv: Some(bad),
            sampling: None,
            stop: None,
            ..Default::default()
        })
        .await;
    let code = match err {
        Err(s) => s.code(),
        Ok(stream) => match stream.into_inner().message().await {
            Err(s) => s.code(),
            Ok(m) => panic!("decoded with a wrong fingerprint: {m:?}"),
        },
    };
    assert_eq!(code, Code::FailedPrecondition);
    // Nothing stays allocated on either side.
    for c in [&mut pre, &mut dec] {
        let s = stats(c).await;
        assert_eq!(s.kv_blocks_used, 0);
        assert_eq!(s.in_flight, 0);
    }
}

#[tokio::test]
async fn roles_refuse_what_they_do_not_serve() {
    let mut pre = start(Role::Prefill, 64).await;
    let err = pre.generate(gen_req(4, 1)).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("prefill worker"));
    let mut dec = start(Role::Decode, 64).await;
    let err = dec.prefill(gen_req(4, 1)).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Bad input is a clear INVALID_ARGUMENT.
    let mut r = gen_req(4, 1);
    r.prompt_tokens = vec![1, 2, 999];
    let err = match dec.generate(r).await {
        Err(s) => s,
        Ok(s) => s.into_inner().message().await.expect_err("bad token"),
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("999"), "{}", err.message());
    let mut r = gen_req(4, 1);
    r.prompt_tokens.clear();
    let err = dec.generate(r).await.expect_err("no tokenizer");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn drain_stops_new_work_and_reports_in_flight() {
    let mut w = start(Role::Mixed, 800).await;
    let h = w
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, proto::health_response::Status::Serving as i32);
    assert_eq!(h.role, "mixed");
    assert_eq!(h.kv_layout.expect("layout").block_size, 4);
    // A long request in flight (long enough that it cannot finish before Drain arrives, even on
    // a loaded machine).
    let mut long = w
        .generate(gen_req(3000, 2))
        .await
        .expect("generate")
        .into_inner();
    long.message().await.expect("first token");
    let d = w.drain(DrainRequest {}).await.expect("drain").into_inner();
    assert_eq!(d.in_flight, 1);
    let err = w.generate(gen_req(4, 1)).await.expect_err("draining");
    assert_eq!(err.code(), Code::Unavailable);
    let h = w
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, proto::health_response::Status::Draining as i32);
    // The in-flight request still completes.
    let mut n = 1;
    while let Some(ev) = long.message().await.expect("stream") {
        if matches!(ev.event, Some(Ev::Token(_))) {
            n += 1;
        }
    }
    assert_eq!(n, 3000);
}

#[tokio::test]
async fn a_disconnected_stream_is_cancelled_and_frees_its_blocks() {
    let mut w = start(Role::Mixed, 1100).await;
    let mut s = w
        .generate(gen_req(4000, 3))
        .await
        .expect("generate")
        .into_inner();
    s.message().await.expect("first token");
    let busy = stats(&mut w).await;
    assert!(busy.kv_blocks_used > 0);
    drop(s);
    // The engine notices at its next step; poll (bounded) until the blocks are back.
    let mut freed = false;
    for _ in 0..200 {
        let st = stats(&mut w).await;
        if st.kv_blocks_used == 0 && st.in_flight == 0 {
            freed = true;
            assert!(st.generated_tokens < 4000, "ran to completion instead");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "blocks were not freed after the client left");
}

#[tokio::test]
async fn a_failing_engine_fails_its_requests_and_reports_itself() {
    let mut w = start_with(Role::Mixed, 64, Some(Arc::new(Broken))).await;
    let mut s = w
        .generate(gen_req(8, 1))
        .await
        .expect("accepted")
        .into_inner();
    let err = s.message().await.expect_err("the step failed");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("detokenizer bug"),
        "{}",
        err.message()
    );
    let h = w
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, proto::health_response::Status::Failed as i32);
    let err = w.generate(gen_req(8, 1)).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
}

/// Prefill on `pre`, then decode on `dec` through a KV handle (gRPC pull), after `tweak` edits
/// the handle and `before_decode` runs. Returns all tokens and the decode's duration.
async fn handoff(
    pre: &mut WorkerClient<Channel>,
    pre_url: &str,
    dec: &mut WorkerClient<Channel>,
    tweak: impl FnOnce(&mut proto::KvHandle),
) -> (Vec<u32>, Duration) {
    let mut r = gen_req(12, 4);
    r.inline_kv = false;
    let p = pre.prefill(r.clone()).await.expect("prefill").into_inner();
    assert!(p.kv.is_none(), "blocks were sent inline");
    let mut handle = p.handle.expect("a lease handle");
    assert_eq!(handle.tokens, 20);
    tweak(&mut handle);
    let t0 = std::time::Instant::now();
    let (rest, fin) = collect(
        dec.decode(DecodeRequest {
            request_id: "h".into(),
            prompt_tokens: p.prompt_tokens,
            first_token: p.first_token,
            handle: Some(handle),
            prefill_url: pre_url.to_string(),
            sampling: r.sampling,
            stop: r.stop,
            ..Default::default()
        })
        .await
        .expect("decode")
        .into_inner(),
    )
    .await;
    assert_eq!(fin.expect("finished").completion_tokens, 12);
    let mut all = vec![p.first_token];
    all.extend(rest);
    (all, t0.elapsed())
}

async fn stats(c: &mut WorkerClient<Channel>) -> proto::StatsResponse {
    c.stats(StatsRequest {}).await.expect("stats").into_inner()
}

#[tokio::test]
async fn kv_blocks_move_by_lease_over_grpc_and_every_fault_falls_back_to_a_correct_recompute() {
    transfer_and_faults(None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_blocks_move_by_lease_over_ucx_and_every_fault_falls_back_to_a_correct_recompute() {
    let (Some(a), Some(b)) = (ucx_or_skip(), ucx_or_skip()) else {
        return;
    };
    transfer_and_faults(Some(a), Some(b)).await;
}

/// A prefill worker and a decode worker (with UCX each, or gRPC only): the normal path, then a
/// stale epoch, a wrong fingerprint, an expired lease and a dead prefill worker, each a typed
/// error followed by a correct local recompute, and no leaked block.
async fn transfer_and_faults(pre_ucx: Option<Arc<Ucx>>, dec_ucx: Option<Arc<Ucx>>) {
    let transport = if pre_ucx.is_some() { "ucx" } else { "grpc" };
    let mut mixed = start(Role::Mixed, 256).await;
    let (want, _) = generate(&mut mixed, gen_req(12, 4)).await;
    let mut pre = spawn_with(
        Role::Prefill,
        256,
        None,
        Duration::from_millis(300),
        pre_ucx.clone(),
    )
    .await;
    let mut dec = spawn_with(Role::Decode, 256, None, Duration::from_secs(30), dec_ucx).await;

    // The normal path: pulled, lease released.
    let (got, _) = handoff(&mut pre.client, &pre.url, &mut dec.client, |_| {}).await;
    assert_eq!(got, want);
    let d = stats(&mut dec.client).await;
    assert_eq!((d.kv_pulls, d.kv_recomputes), (1, 0));
    assert_eq!(d.kv_pull_bytes, 5 * 2 * 2 * 4 * 2 * 8 * 4);
    assert_eq!(d.kv_transport, transport);
    assert_eq!(d.kv_peers.len(), 1, "{d:?}");
    let peer = &d.kv_peers[0];
    assert_eq!((peer.transport.as_str(), peer.transfers), (transport, 1));
    assert_eq!(peer.bytes, d.kv_pull_bytes);
    assert!(peer.last_gib_per_s > 0.0 && peer.last_seconds > 0.0);
    if transport == "ucx" {
        assert!(!peer.ucx_transports.is_empty(), "{peer:?}");
        assert!(!d.ucx_transports.is_empty() && !d.ucx_version.is_empty());
    }
    // Degraded says whether the lanes UCX chose are slower than what this host offers (TCP where
    // shared memory is available); which lanes it chooses is the machine's, so the flag is
    // checked against the rule rather than assumed.
    let want_degraded =
        transport == "ucx" && dopd_ucx::degraded(&peer.ucx_transports, &d.ucx_transports, &[]);
    assert_eq!(peer.degraded, want_degraded, "{peer:?}");
    assert_eq!(d.kv_degraded, want_degraded);
    assert_eq!(stats(&mut pre.client).await.kv_leases_pinned, 0);

    // Faults: each is a typed error at once, then a local recompute with the same tokens.
    type Tweak = Box<dyn FnOnce(&mut proto::KvHandle)>;
    let faults: [(&str, Tweak); 3] = [
        ("stale_epoch", Box::new(|h| h.epoch += 1)),
        ("layout_mismatch", Box::new(|h| h.fingerprint ^= 1)),
        (
            "expired",
            Box::new(|_| std::thread::sleep(Duration::from_millis(400))),
        ),
    ];
    for (i, (kind, tweak)) in faults.into_iter().enumerate() {
        let (got, took) = handoff(&mut pre.client, &pre.url, &mut dec.client, tweak).await;
        assert_eq!(got, want, "{kind}");
        let d = stats(&mut dec.client).await;
        assert_eq!(d.kv_pull_failures.get(kind), Some(&1), "{kind}: {d:?}");
        assert_eq!(d.kv_recomputes, i as u64 + 1);
        eprintln!("{kind}: recomputed decode of 12 tokens finished in {took:?}");
    }

    // The prefill worker dies before the pull: connection refused, recompute.
    let _ = pre.stop.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut pre2 = spawn_with(
        Role::Prefill,
        256,
        None,
        Duration::from_secs(30),
        pre_ucx.clone(),
    )
    .await;
    let (got, took) = handoff(&mut pre2.client, &pre.url, &mut dec.client, |_| {}).await;
    assert_eq!(got, want);
    let d = stats(&mut dec.client).await;
    assert_eq!(d.kv_pull_failures.get("transport"), Some(&1), "{d:?}");
    eprintln!("dead prefill worker: recomputed decode finished in {took:?}");

    // Nothing leaks: the decode worker holds no block; the unreleased lease of the stale-epoch
    // handle expires with its TTL; pre2's unpulled lease is still pinned until its TTL.
    assert_eq!(d.kv_blocks_used, 0);
    assert_eq!(d.in_flight, 0);
    assert_eq!(stats(&mut pre2.client).await.kv_leases_pinned, 1);
    let _ = pre2.stop.send(());
}
