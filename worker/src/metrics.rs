//! The worker's Stats as OpenMetrics text (Prometheus scrapes it): engine load, KV cache use,
//! leases, and KV transfers in total and per prefill peer, with the degraded-link flag.
//!
//! Every scrape builds a fresh registry from one Stats snapshot, so the figures a scrape shows
//! are consistent with each other and with the Stats RPC.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use dopd_protocol::proto::StatsResponse;

type Labels = Vec<(String, String)>;

fn gauge(r: &mut Registry, name: &str, help: &str, v: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: f64) {
    let c = Counter::<f64, AtomicU64>::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// OpenMetrics text for one Stats snapshot of the worker `worker_id` in `role`.
pub fn render(s: &StatsResponse, worker_id: &str, role: &str) -> String {
    let mut r = Registry::with_prefix_and_labels(
        "dopd_worker",
        [
            ("worker".into(), worker_id.to_string().into()),
            ("role".into(), role.to_string().into()),
        ]
        .into_iter(),
    );
    let f = f64::from;
    gauge(&mut r, "running", "Sequences decoding", f(s.running));
    gauge(
        &mut r,
        "waiting",
        "Requests waiting for admission",
        f(s.waiting),
    );
    gauge(
        &mut r,
        "in_flight",
        "Requests with a live stream",
        f(s.in_flight),
    );
    gauge(
        &mut r,
        "kv_blocks_used",
        "KV cache blocks in use",
        f(s.kv_blocks_used),
    );
    gauge(
        &mut r,
        "kv_blocks_free",
        "KV cache blocks free",
        f(s.kv_blocks_free),
    );
    gauge(
        &mut r,
        "draining",
        "1 while draining",
        f(u32::from(s.draining)),
    );
    let n = |x: u64| x as f64;
    counter(&mut r, "steps", "Engine steps", n(s.steps));
    counter(
        &mut r,
        "preemptions",
        "Sequences preempted",
        n(s.preemptions),
    );
    counter(
        &mut r,
        "prompt_tokens",
        "Prompt tokens admitted",
        n(s.prompt_tokens),
    );
    counter(
        &mut r,
        "generated_tokens",
        "Tokens generated",
        n(s.generated_tokens),
    );
    counter(
        &mut r,
        "requests_finished",
        "Requests finished",
        n(s.finished),
    );
    counter(&mut r, "requests_failed", "Requests failed", n(s.failed));
    gauge(
        &mut r,
        "kv_leases_pinned",
        "KV leases pinned for decode workers",
        f(s.kv_leases_pinned),
    );
    gauge(
        &mut r,
        "kv_leases_pinned_bytes",
        "Bytes of pinned KV leases",
        n(s.kv_leases_pinned_bytes),
    );
    counter(
        &mut r,
        "kv_leases_expired",
        "KV leases expired unpulled",
        n(s.kv_leases_expired),
    );
    counter(&mut r, "kv_pulls", "KV transfers received", n(s.kv_pulls));
    counter(
        &mut r,
        "kv_pull_bytes",
        "KV bytes received",
        n(s.kv_pull_bytes),
    );
    counter(
        &mut r,
        "kv_pull_seconds",
        "Wall time of KV transfers received",
        s.kv_pull_seconds,
    );
    counter(
        &mut r,
        "kv_recomputes",
        "Prompts recomputed locally (no or failed transfer)",
        n(s.kv_recomputes),
    );
    counter(
        &mut r,
        "resumed_streams",
        "Streams taken over after another worker failed mid-stream",
        n(s.resumed_streams),
    );
    let failures = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for (kind, v) in &s.kv_pull_failures {
        failures
            .get_or_create(&labels(&[("kind", kind)]))
            .inc_by(n(*v));
    }
    r.register("kv_pull_failures", "Failed KV transfers by kind", failures);
    let info = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    info.get_or_create(&labels(&[
        ("transport", &s.kv_transport),
        ("ucx_version", &s.ucx_version),
        ("ucx_transports", &s.ucx_transports.join(",")),
    ]))
    .set(1.0);
    r.register(
        "kv_transport_info",
        "The preferred KV transport (value 1)",
        info,
    );
    gauge(
        &mut r,
        "kv_degraded",
        "1 when some peer's KV link is degraded",
        f(u32::from(s.kv_degraded)),
    );

    let peer_counter = || Family::<Labels, Counter<f64, AtomicU64>>::default();
    let peer_gauge = || Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let (transfers, bytes, seconds, fails) = (
        peer_counter(),
        peer_counter(),
        peer_counter(),
        peer_counter(),
    );
    let (latency, bandwidth, degraded) = (peer_gauge(), peer_gauge(), peer_gauge());
    for p in &s.kv_peers {
        let l = labels(&[("peer", &p.peer), ("transport", &p.transport)]);
        transfers.get_or_create(&l).inc_by(n(p.transfers));
        bytes.get_or_create(&l).inc_by(n(p.bytes));
        seconds.get_or_create(&l).inc_by(p.seconds);
        fails.get_or_create(&l).inc_by(n(p.failures));
        latency.get_or_create(&l).set(p.last_seconds);
        bandwidth
            .get_or_create(&l)
            .set(p.last_gib_per_s * f64::from(1u32 << 30));
        let mut dl = l.clone();
        dl.push(("ucx_transports".into(), p.ucx_transports.join(",")));
        degraded.get_or_create(&dl).set(f(u32::from(p.degraded)));
    }
    r.register(
        "kv_peer_transfers",
        "KV transfers from a prefill peer",
        transfers,
    );
    r.register("kv_peer_bytes", "KV bytes from a prefill peer", bytes);
    r.register(
        "kv_peer_seconds",
        "Wall time of KV transfers from a prefill peer",
        seconds,
    );
    r.register(
        "kv_peer_failures",
        "Failed KV transfers from a prefill peer",
        fails,
    );
    r.register(
        "kv_peer_last_latency_seconds",
        "The last KV transfer's latency from a prefill peer",
        latency,
    );
    r.register(
        "kv_peer_last_bandwidth_bytes_per_second",
        "The last KV transfer's bandwidth from a prefill peer",
        bandwidth,
    );
    r.register(
        "kv_peer_degraded",
        "1 when the link to a prefill peer fell back to TCP where a faster transport was available or expected",
        degraded,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dopd_protocol::proto::KvPeer;

    #[test]
    fn stats_become_labelled_openmetrics() {
        let s = StatsResponse {
            running: 3,
            kv_pulls: 2,
            kv_pull_bytes: 1000,
            kv_transport: "ucx".into(),
            kv_degraded: true,
            kv_pull_failures: [("deadline".to_string(), 4u64)].into_iter().collect(),
            kv_peers: vec![KvPeer {
                peer: "http://p:1".into(),
                transport: "ucx".into(),
                ucx_transports: vec!["tcp".into()],
                degraded: true,
                transfers: 2,
                bytes: 1000,
                last_seconds: 0.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = render(&s, "decode-0", "decode");
        for want in [
            r#"dopd_worker_running{worker="decode-0",role="decode"} 3.0"#,
            r#"dopd_worker_kv_pull_bytes_total{worker="decode-0",role="decode"} 1000.0"#,
            r#"dopd_worker_kv_pull_failures_total{worker="decode-0",role="decode",kind="deadline"} 4.0"#,
            r#"dopd_worker_kv_degraded{worker="decode-0",role="decode"} 1.0"#,
            r#"dopd_worker_kv_peer_degraded{worker="decode-0",role="decode",peer="http://p:1",transport="ucx",ucx_transports="tcp"} 1.0"#,
            r#"dopd_worker_kv_peer_last_latency_seconds{worker="decode-0",role="decode",peer="http://p:1",transport="ucx"} 0.5"#,
        ] {
            assert!(t.contains(want), "missing {want} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"));
    }
}
