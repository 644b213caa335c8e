//! The KV pool in the backend's device memory (`DeviceKv`, what a GPU worker uses), run here on
//! the CPU backend through the same tensor code: the same logits as the host pool, blocks that
//! move between a device pool and a host pool either way, and an engine on it that batches,
//! preempts and hands off without changing a token or leaking a block.

use std::sync::Arc;

use burn::backend::Flex;
use burn::prelude::*;
use dopd_worker::engine::{Engine, EngineConfig, Event, Mode, Request, Start};
use dopd_worker::kv::{KvError, PagedKvCache};
use dopd_worker::model::{Llama, LlamaConfig, PREFILL_CHUNK, RopeStyle};
use dopd_worker::sampling::{SamplingParams, StopConditions};

type B = Flex;

fn config() -> LlamaConfig {
    LlamaConfig {
        context: 2 * PREFILL_CHUNK + 64,
        rope_style: RopeStyle::Halves,
        qkv_bias: true,
        ..LlamaConfig::tiny()
    }
}

/// The same random weights with attention on the host (host pool) or as tensor operations
/// (whose `new_cache` is a device pool).
fn model(host: bool) -> Llama<B> {
    Llama::<B>::random(config(), 3, &Default::default())
        .expect("ok in this test")
        .with_host_attention(host)
}

fn prompt(id: u64, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((id * 13 + i as u64 * 7) % 48) as u32)
        .collect()
}

fn rows(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [n, v] = t.dims();
    let d: Vec<f32> = t.into_data().to_vec().expect("ok in this test");
    (0..n).map(|i| d[i * v..(i + 1) * v].to_vec()).collect()
}

fn close(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A prompt over two chunks, two short prompts packed together, then three decode steps of all
/// three in one batch: every logits row.
fn run(m: &Llama<B>, cache: &mut PagedKvCache) -> Vec<Vec<f32>> {
    let prompts = [prompt(1, PREFILL_CHUNK + 45), prompt(2, 3), prompt(3, 21)];
    let seqs: Vec<u64> = prompts.iter().map(|_| cache.create()).collect();
    let mut out = rows(m.prefill(cache, seqs[0], &prompts[0]).expect("room"));
    let items: Vec<(u64, &[u32])> = seqs[1..]
        .iter()
        .zip(&prompts[1..])
        .map(|(&s, p)| (s, p.as_slice()))
        .collect();
    out.extend(rows(m.prefill_batch(cache, &items).expect("room")));
    for step in 0..3u32 {
        let batch: Vec<(u64, u32)> = seqs.iter().map(|&s| (s, 7 + step)).collect();
        out.extend(rows(m.forward_decode(cache, &batch).expect("room")));
    }
    assert!(cache.check_invariants());
    out
}

#[test]
fn a_device_resident_pool_gives_the_logits_of_the_host_pool() {
    let (host, tensor) = (model(true), model(false));
    let layout = host.kv_layout(4, 0);
    let mut host_cache = host.new_cache(layout, 512);
    let mut device_cache = tensor.new_cache(layout, 512);
    assert!(host_cache.on_host());
    assert!(
        !device_cache.on_host(),
        "a tensor-attention model keeps K/V on its device"
    );
    let (a, b) = (run(&host, &mut host_cache), run(&tensor, &mut device_cache));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            close(x, y) < 1e-4,
            "logits row {i} differ by {}",
            close(x, y)
        );
    }
    assert_eq!(host_cache.used_blocks(), device_cache.used_blocks());
    // The pool is not in host memory: reading it in place is refused, not garbage.
    assert!(matches!(device_cache.view(0, 0), Err(KvError::OnDevice)));
    // A host-attention model given a device pool still runs (as tensor operations on it).
    let mut other = tensor.new_cache(layout, 512);
    let c = run(&host, &mut other);
    assert!(a.iter().zip(&c).all(|(x, y)| close(x, y) < 1e-4));
}

#[test]
fn blocks_move_between_a_device_pool_and_a_host_pool_either_way() {
    let (host, tensor) = (model(true), model(false));
    let layout = host.kv_layout(4, 0);
    let p = prompt(5, 37);
    let mut on_host = host.new_cache(layout, 64);
    let mut on_device = tensor.new_cache(layout, 64);
    let (hs, ds) = (on_host.create(), on_device.create());
    host.prefill(&mut on_host, hs, &p).expect("room");
    tensor.prefill(&mut on_device, ds, &p).expect("room");
    let (he, de) = (
        on_host.export(hs).expect("known"),
        on_device.export(ds).expect("known"),
    );
    assert_eq!((he.tokens, he.blocks.len()), (de.tokens, de.blocks.len()));
    for (i, (x, y)) in he.blocks.iter().zip(&de.blocks).enumerate() {
        // Equal up to the written tokens; a last block's unwritten slots may differ.
        let used = (p.len() - 4 * i).min(4) * layout.token_width();
        for layer in 0..2 * layout.layers {
            let at = layer * layout.block_width();
            assert!(
                close(&x[at..at + used], &y[at..at + used]) < 1e-5,
                "block {i}"
            );
        }
    }
    // Device -> host and host -> device: the next token's logits agree with a run that
    // never moved.
    let next = 9u32;
    let want = rows(
        host.forward_decode(&mut on_host, &[(hs, next)])
            .expect("room"),
    )
    .remove(0);
    let mut host2 = host.new_cache(layout, 64);
    let s = host2.import(&de).expect("same layout");
    let got = rows(host.forward_decode(&mut host2, &[(s, next)]).expect("room")).remove(0);
    assert!(close(&want, &got) < 1e-4, "device -> host");
    let mut device2 = tensor.new_cache(layout, 64);
    let s = device2.import(&he).expect("same layout");
    let got = rows(
        tensor
            .forward_decode(&mut device2, &[(s, next)])
            .expect("room"),
    )
    .remove(0);
    assert!(close(&want, &got) < 1e-4, "host -> device");
    // An import that does not fit takes nothing.
    let mut small = tensor.new_cache(layout, 3);
    assert!(matches!(
        small.import(&he),
        Err(KvError::OutOfBlocks { .. })
    ));
    assert_eq!(small.free_blocks(), 3);
}

fn req(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        id,
        prompt,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            seed: id,
        },
        stop: StopConditions {
            eos: vec![],
            max_tokens,
            stop_strings: vec![],
        },
        mode: Mode::Generate,
        start: Start::Prompt,
        step_budget: None,
    }
}

fn engine(kv_blocks: usize) -> Engine<B> {
    let cfg = EngineConfig {
        block_size: 4,
        kv_blocks,
        max_running: 16,
        max_prefill_tokens: 64,
        model_hash: 1,
    };
    Engine::new(Arc::new(model(false)), None, cfg)
}

fn tokens(events: &[Event], id: u64) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id: i, token, .. } if *i == id => Some(*token),
            _ => None,
        })
        .collect()
}

#[test]
fn an_engine_on_a_device_pool_batches_and_preempts_without_changing_a_token() {
    let reqs: Vec<Request> = (0..6)
        .map(|id| req(id, prompt(id, 6 + 2 * id as usize), 30))
        .collect();
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| {
            let mut e = engine(256);
            e.submit(r.clone()).expect("ok in this test");
            tokens(&e.run_to_completion(), r.id)
        })
        .collect();
    // 24 blocks of 4 tokens: six sequences growing to ~46 tokens cannot all stay resident.
    let mut e = engine(24);
    for r in reqs {
        e.submit(r).expect("ok in this test");
    }
    let mut events = Vec::new();
    while e.has_work() {
        events.extend(e.step());
        assert!(e.check_invariants());
    }
    assert!(e.stats().preemptions > 0, "the cache was large enough");
    for (id, want) in alone.iter().enumerate() {
        assert_eq!(&tokens(&events, id as u64), want, "request {id}");
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// After the warm-up (a decode step at every batch bucket), a decode of five sequences, which
/// runs padded to a batch of eight on a device pool, gives each sequence the logits the host
/// pool gives it, and the pool holds exactly the blocks of the five.
#[test]
fn a_padded_decode_batch_gives_each_sequence_its_own_logits() {
    let (host, tensor) = (model(true), model(false));
    tensor.warm_up(4, 12).expect("warm-up");
    let layout = host.kv_layout(4, 0);
    let mut caches = [host.new_cache(layout, 256), tensor.new_cache(layout, 256)];
    let mut out = Vec::new();
    for (m, cache) in [&host, &tensor].into_iter().zip(caches.iter_mut()) {
        let seqs: Vec<u64> = (0..5).map(|_| cache.create()).collect();
        for (i, &s) in seqs.iter().enumerate() {
            m.prefill(cache, s, &prompt(i as u64, 3 + 4 * i))
                .expect("room");
        }
        let batch: Vec<(u64, u32)> = seqs.iter().map(|&s| (s, 5)).collect();
        out.push(rows(m.forward_decode(cache, &batch).expect("room")));
        assert!(cache.check_invariants());
    }
    assert_eq!(out[1].len(), 5, "the padding rows are dropped");
    for (i, (a, b)) in out[0].iter().zip(&out[1]).enumerate() {
        assert!(
            close(a, b) < 1e-4,
            "sequence {i} differs by {}",
            close(a, b)
        );
    }
    assert_eq!(caches[0].used_blocks(), caches[1].used_blocks());
}
