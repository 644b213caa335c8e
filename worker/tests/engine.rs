//! The continuous-batching engine on a tiny random Llama (no model file needed): batching,
//! preemption, cancellation, stop conditions and the prefill -> decode hand-off must not change
//! a single token, and must never leak a KV block.

use std::sync::Arc;

use burn::backend::Flex;
use burn::prelude::*;
use dopd_worker::engine::{
    Detokenizer, Engine, EngineConfig, EngineError, Event, Mode, Request, RequestId, Start,
};
use dopd_worker::kv::PagedKvCache;
use dopd_worker::model::{Llama, LlamaConfig, RopeStyle};
use dopd_worker::sampling::{FinishReason, SamplingParams, StopConditions};
use proptest::prelude::*;

type B = Flex;

fn tiny(rope_style: RopeStyle, qkv_bias: bool) -> LlamaConfig {
    LlamaConfig {
        context: 160,
        rope_style,
        qkv_bias,
        ..LlamaConfig::tiny()
    }
}

fn model() -> Arc<Llama<B>> {
    Arc::new(
        Llama::random(tiny(RopeStyle::Adjacent, false), 7, &Default::default())
            .expect("ok in this test"),
    )
}

/// Token `i` reads as one letter; `i % 26 == 25` ("z") is a word break for stop-string tests.
struct Letters;

impl Detokenizer for Letters {
    fn detokenize(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| (b'a' + (i % 26) as u8) as char)
            .collect()
    }
}

fn cfg(kv_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        kv_blocks,
        max_running: 16,
        max_prefill_tokens: 64,
        model_hash: 1,
    }
}

fn req(id: RequestId, prompt: Vec<u32>, max_tokens: usize, seed: Option<u64>) -> Request {
    Request {
        id,
        prompt,
        sampling: SamplingParams {
            temperature: if seed.is_some() { 0.9 } else { 0.0 },
            top_k: 20,
            top_p: 0.95,
            seed: seed.unwrap_or(0),
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

fn prompt(id: u64, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((id * 13 + i as u64 * 7) % 48) as u32)
        .collect()
}

/// Tokens per request id, and finish reasons, from a run's events.
fn tokens_of(events: &[Event], id: RequestId) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id: i, token, .. } if *i == id => Some(*token),
            Event::Prefilled {
                id: i, first_token, ..
            } if *i == id => Some(*first_token),
            _ => None,
        })
        .collect()
}

fn finish_of(events: &[Event], id: RequestId) -> Option<(FinishReason, usize)> {
    events.iter().find_map(|e| match e {
        Event::Finished {
            id: i,
            reason,
            usage,
            ..
        } if *i == id => Some((*reason, usage.completion_tokens)),
        _ => None,
    })
}

fn run_alone(r: Request) -> Vec<u32> {
    let mut e = Engine::new(model(), None, cfg(256));
    let id = r.id;
    e.submit(r).expect("ok in this test");
    tokens_of(&e.run_to_completion(), id)
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

#[test]
fn paged_attention_equals_dense_attention_for_every_rope_style_and_bias() {
    for (style, bias) in [(RopeStyle::Adjacent, false), (RopeStyle::Halves, true)] {
        let m =
            Llama::<B>::random(tiny(style, bias), 3, &Default::default()).expect("ok in this test");
        let toks = prompt(5, 23);
        let dense = rows(m.forward(&toks));
        // Block size 4: the prompt spans six blocks, the last one partly.
        let mut cache = PagedKvCache::new(m.kv_layout(4, 0), 32);
        let s = cache.create();
        let paged = rows(
            m.forward_cached(&mut cache, s, &toks[..10])
                .expect("ok in this test"),
        );
        let rest = rows(
            m.forward_cached(&mut cache, s, &toks[10..])
                .expect("ok in this test"),
        );
        for (i, row) in paged.iter().chain(&rest).enumerate() {
            assert!(close(row, &dense[i]) < 1e-4, "{style:?} position {i}");
        }
        // prefill() returns exactly the last row.
        let mut c2 = PagedKvCache::new(m.kv_layout(4, 0), 32);
        let s2 = c2.create();
        let last = rows(m.prefill(&mut c2, s2, &toks).expect("ok in this test"));
        assert_eq!(last.len(), 1);
        assert!(close(&last[0], &dense[22]) < 1e-4);
    }
}

#[test]
fn a_prompt_longer_than_a_prefill_chunk_equals_dense_attention_and_fails_whole() {
    use dopd_worker::model::PREFILL_CHUNK;
    let n = 2 * PREFILL_CHUNK + 37;
    let c = LlamaConfig {
        context: n + 8,
        ..tiny(RopeStyle::Halves, true)
    };
    let m = Llama::<B>::random(c, 11, &Default::default()).expect("ok in this test");
    let toks = prompt(9, n);
    let dense = rows(m.forward(&toks));
    let blocks = n.div_ceil(16);
    let mut cache = PagedKvCache::new(m.kv_layout(16, 0), blocks);
    let s = cache.create();
    let paged = rows(m.forward_cached(&mut cache, s, &toks).expect("room"));
    assert_eq!(paged.len(), n);
    for (i, row) in paged.iter().enumerate() {
        assert!(close(row, &dense[i]) < 1e-4, "position {i}");
    }
    let mut c2 = PagedKvCache::new(m.kv_layout(16, 0), blocks);
    let s2 = c2.create();
    let last = rows(m.prefill(&mut c2, s2, &toks).expect("room"));
    assert_eq!(last.len(), 1);
    assert!(close(&last[0], &dense[n - 1]) < 1e-4);
    // One block short: refused before the first chunk writes anything.
    let mut small = PagedKvCache::new(m.kv_layout(16, 0), blocks - 1);
    let s3 = small.create();
    assert!(m.prefill(&mut small, s3, &toks).is_err());
    assert_eq!(small.len(s3).expect("known"), 0);
    assert_eq!(small.free_blocks(), blocks - 1);
}

#[test]
fn a_packed_prefill_equals_each_prompt_prefilled_alone_and_fails_whole() {
    use dopd_worker::model::{PACK_TOKENS, PREFILL_CHUNK};
    let c = LlamaConfig {
        context: PREFILL_CHUNK + 64,
        ..tiny(RopeStyle::Halves, true)
    };
    let m = Llama::<B>::random(c, 5, &Default::default()).expect("ok in this test");
    // Short prompts packed into passes (one just fits a pass), prompts too long to pack run
    // alone between them (one in several chunks), and last a continuation of a sequence that
    // already holds tokens.
    let lens = [
        3usize,
        17,
        1,
        PREFILL_CHUNK + 9,
        40,
        PACK_TOKENS - 10,
        PACK_TOKENS + 20,
        6,
    ];
    let cont = lens.len() - 1;
    let layout = || m.kv_layout(4, 0);
    let blocks = 4 * PREFILL_CHUNK;
    let mut cache = PagedKvCache::new(layout(), blocks);
    let seqs: Vec<u64> = lens.iter().map(|_| cache.create()).collect();
    let held = prompt(99, 5);
    m.prefill(&mut cache, seqs[cont], &held).expect("room");
    let prompts: Vec<Vec<u32>> = (0..lens.len()).map(|i| prompt(i as u64, lens[i])).collect();
    let items: Vec<(u64, &[u32])> = seqs
        .iter()
        .zip(&prompts)
        .map(|(&s, p)| (s, p.as_slice()))
        .collect();
    let packed = rows(m.prefill_batch(&mut cache, &items).expect("room"));
    assert_eq!(packed.len(), lens.len());
    let next = 11u32;
    for (i, p) in prompts.iter().enumerate() {
        let mut alone = PagedKvCache::new(layout(), blocks);
        let s = alone.create();
        if i == cont {
            m.prefill(&mut alone, s, &held).expect("room");
        }
        let want = rows(m.prefill(&mut alone, s, p).expect("room")).remove(0);
        assert!(close(&packed[i], &want) < 1e-4, "prompt {i}");
        // The cache holds the same K/V: the next token's logits agree too.
        let a = rows(m.forward_decode(&mut alone, &[(s, next)]).expect("room")).remove(0);
        let b = rows(
            m.forward_decode(&mut cache, &[(seqs[i], next)])
                .expect("room"),
        )
        .remove(0);
        assert!(close(&a, &b) < 1e-4, "prompt {i} after its prefill");
    }
    assert!(cache.check_invariants());
    // Refused before anything is written: a sequence listed twice, an empty prompt, or more
    // than the free blocks hold.
    let mut small = PagedKvCache::new(layout(), 8);
    let (a, b) = (small.create(), small.create());
    let p = prompt(1, 12);
    let q = prompt(2, 30);
    assert!(m.prefill_batch(&mut small, &[(a, &p), (a, &p)]).is_err());
    assert!(m.prefill_batch(&mut small, &[(a, &p), (b, &[])]).is_err());
    assert!(m.prefill_batch(&mut small, &[(a, &p), (b, &q)]).is_err());
    assert_eq!(small.len(a).expect("known"), 0);
    assert_eq!(small.free_blocks(), 8);
}

#[test]
fn attention_on_the_host_equals_attention_as_tensor_operations() {
    use dopd_worker::model::PREFILL_CHUNK;
    for (style, bias) in [(RopeStyle::Halves, true), (RopeStyle::Adjacent, false)] {
        let c = LlamaConfig {
            context: 2 * PREFILL_CHUNK + 64,
            ..tiny(style, bias)
        };
        let host = Llama::<B>::random(c.clone(), 3, &Default::default())
            .expect("ok in this test")
            .with_host_attention(true);
        let tensor = Llama::<B>::random(c, 3, &Default::default())
            .expect("ok in this test")
            .with_host_attention(false);
        // A prompt over two chunks (tiles and a short tail), short prompts packed together (one
        // below a tile's rows), then decode steps for all of them in one batch.
        let prompts = [prompt(1, PREFILL_CHUNK + 45), prompt(2, 3), prompt(3, 21)];
        let run = |m: &Llama<B>| {
            let mut cache = PagedKvCache::new(m.kv_layout(4, 0), 512);
            let seqs: Vec<u64> = prompts.iter().map(|_| cache.create()).collect();
            let mut out = rows(m.prefill(&mut cache, seqs[0], &prompts[0]).expect("room"));
            let items: Vec<(u64, &[u32])> = seqs[1..]
                .iter()
                .zip(&prompts[1..])
                .map(|(&s, p)| (s, p.as_slice()))
                .collect();
            out.extend(rows(m.prefill_batch(&mut cache, &items).expect("room")));
            for step in 0..3u32 {
                let batch: Vec<(u64, u32)> = seqs.iter().map(|&s| (s, 7 + step)).collect();
                out.extend(rows(m.forward_decode(&mut cache, &batch).expect("room")));
            }
            out
        };
        let (a, b) = (run(&host), run(&tensor));
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                close(x, y) < 1e-4,
                "{style:?}: logits row {i} differ by {}",
                close(x, y)
            );
        }
    }
}

#[test]
fn batched_decode_step_equals_one_sequence_at_a_time() {
    let m = model();
    let mut cache = PagedKvCache::new(m.kv_layout(4, 0), 64);
    let lens = [3usize, 9, 16];
    let seqs: Vec<u64> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = cache.create();
            m.forward_cached(&mut cache, s, &prompt(i as u64, n))
                .expect("ok in this test");
            s
        })
        .collect();
    let next = [5u32, 17, 40];
    let mut solo = Vec::new();
    for (i, &s) in seqs.iter().enumerate() {
        // Decode each alone in a copy of the cache made by replaying the prompt.
        let mut c = PagedKvCache::new(m.kv_layout(4, 0), 64);
        let t = c.create();
        m.forward_cached(&mut c, t, &prompt(i as u64, lens[i]))
            .expect("ok in this test");
        solo.push(
            rows(
                m.forward_cached(&mut c, t, &[next[i]])
                    .expect("ok in this test"),
            )
            .remove(0),
        );
        let _ = s;
    }
    let batch: Vec<(u64, u32)> = seqs.iter().copied().zip(next).collect();
    let batched = rows(
        m.forward_decode(&mut cache, &batch)
            .expect("ok in this test"),
    );
    for i in 0..3 {
        assert!(close(&batched[i], &solo[i]) < 1e-4, "sequence {i}");
    }
    // A sequence listed twice is refused before anything is written.
    let before = cache.len(seqs[0]).expect("ok in this test");
    assert!(
        m.forward_decode(&mut cache, &[(seqs[0], 1), (seqs[0], 2)])
            .is_err()
    );
    assert_eq!(cache.len(seqs[0]).expect("ok in this test"), before);
    assert!(cache.check_invariants());
}

#[test]
fn a_sequence_decoded_alone_equals_the_same_sequence_decoded_in_a_batch() {
    for seed in [None, Some(11)] {
        let target = req(0, prompt(0, 12), 24, seed);
        let alone = run_alone(target.clone());
        assert_eq!(alone.len(), 24);
        let mut e = Engine::new(model(), None, cfg(256));
        e.submit(target).expect("ok in this test");
        for id in 1..8 {
            e.submit(req(
                id,
                prompt(id, 3 + 5 * id as usize),
                10 + id as usize,
                seed,
            ))
            .expect("ok in this test");
        }
        let events = e.run_to_completion();
        assert_eq!(tokens_of(&events, 0), alone, "seed {seed:?}");
        // The batch really ran several sequences per step.
        assert!(e.stats().recent_steps.iter().any(|s| s.0 >= 4));
        for id in 1..8 {
            assert_eq!(
                finish_of(&events, id),
                Some((FinishReason::Length, 10 + id as usize))
            );
        }
        assert_eq!(e.stats().kv_blocks_used, 0);
    }
}

#[test]
fn preemption_by_recompute_changes_no_token_and_frees_every_block() {
    let reqs: Vec<Request> = (0..6)
        .map(|id| req(id, prompt(id, 6 + 2 * id as usize), 30, Some(id)))
        .collect();
    let expected: Vec<Vec<u32>> = reqs.iter().map(|r| run_alone(r.clone())).collect();
    // 24 blocks of 4 tokens: six sequences growing to ~46 tokens cannot all stay resident.
    let mut e = Engine::new(model(), None, cfg(24));
    for r in reqs {
        e.submit(r).expect("ok in this test");
    }
    let mut events = Vec::new();
    while e.has_work() {
        events.extend(e.step());
        assert!(e.check_invariants());
    }
    assert!(e.stats().preemptions > 0, "the cache was large enough");
    for (id, want) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&events, id as u64), want, "request {id}");
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
}

#[test]
fn cancellation_frees_the_blocks_and_the_rest_continue() {
    let mut e = Engine::new(model(), None, cfg(64));
    for id in 0..3 {
        e.submit(req(id, prompt(id, 10), 40, None))
            .expect("ok in this test");
    }
    for _ in 0..3 {
        e.step();
    }
    let used = e.stats().kv_blocks_used;
    assert!(e.cancel(1));
    assert!(!e.cancel(1), "a request is cancelled once");
    assert!(e.stats().kv_blocks_used < used);
    assert!(e.check_invariants());
    let events = e.run_to_completion();
    assert!(tokens_of(&events, 1).is_empty());
    assert_eq!(finish_of(&events, 0).map(|f| f.1), Some(40));
    assert_eq!(e.stats().kv_blocks_used, 0);
    // Cancelling a waiting request works too.
    e.submit(req(9, prompt(9, 5), 5, None))
        .expect("ok in this test");
    assert!(e.cancel(9));
    assert!(!e.has_work());
}

#[test]
fn prompts_with_a_step_budget_are_spread_over_steps_while_others_decode() {
    // Two 10-token prompts, each allowed a step that prefills at most 15 tokens in all (the
    // router's bypass threshold), arrive together.
    let budgeted = |id, budget| Request {
        step_budget: budget,
        ..req(id, prompt(id, 10), 4, None)
    };
    let first_step = |events: &[Vec<Event>], id| {
        events
            .iter()
            .position(|ev| !tokens_of(ev, id).is_empty())
            .expect("a token")
    };
    for (budget, apart) in [(Some(15), true), (None, false)] {
        let mut e = Engine::new(model(), None, cfg(64));
        e.submit(req(0, prompt(0, 8), 20, None))
            .expect("ok in this test");
        e.step();
        // While sequence 0 decodes, the second prompt waits for the next step (20 > 15); with
        // no budget of their own, the engine's 64 tokens take both in one step.
        e.submit(budgeted(1, budget)).expect("ok in this test");
        e.submit(budgeted(2, budget)).expect("ok in this test");
        let mut steps = Vec::new();
        while e.has_work() {
            steps.push(e.step());
        }
        let (a, b) = (first_step(&steps, 1), first_step(&steps, 2));
        assert_eq!(a, 0, "{budget:?}");
        assert_eq!(b, usize::from(apart), "{budget:?}");
        // The tokens are those of each prompt run alone.
        let all: Vec<Event> = steps.concat();
        assert_eq!(tokens_of(&all, 2), run_alone(budgeted(2, budget)));
    }
    // With nothing decoding, both budgeted prompts are taken in the first step.
    let mut e = Engine::new(model(), None, cfg(64));
    e.submit(budgeted(1, Some(15))).expect("ok in this test");
    e.submit(budgeted(2, Some(15))).expect("ok in this test");
    let ev = e.step();
    assert!(!tokens_of(&ev, 1).is_empty() && !tokens_of(&ev, 2).is_empty());
}

#[test]
fn stop_on_eos_max_tokens_and_stop_strings_with_streamed_text() {
    let alone = run_alone(req(0, prompt(0, 8), 30, None));
    // EOS: stop at the 5th generated token by declaring it end-of-sequence.
    let eos = alone[4];
    let first = alone
        .iter()
        .position(|&t| t == eos)
        .expect("ok in this test");
    let mut r = req(0, prompt(0, 8), 30, None);
    r.stop.eos = vec![eos];
    let mut e = Engine::new(model(), Some(Arc::new(Letters)), cfg(64));
    e.submit(r).expect("ok in this test");
    let events = e.run_to_completion();
    assert_eq!(finish_of(&events, 0), Some((FinishReason::Stop, first + 1)));
    // The EOS token itself is not streamed as text.
    let text: String = events
        .iter()
        .map(|ev| match ev {
            Event::Token { text, .. } | Event::Finished { text, .. } => text.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(text, Letters.detokenize(&alone[..first]));

    // Stop string: the text of tokens 6..8 of the greedy answer; output is cut before it and
    // never streams any part of it.
    let full = Letters.detokenize(&alone);
    let stop = full[6..8].to_string();
    let cut = full.find(&stop).expect("ok in this test");
    let mut r = req(1, prompt(0, 8), 30, None);
    r.stop.stop_strings = vec![stop.clone()];
    let mut e = Engine::new(model(), Some(Arc::new(Letters)), cfg(64));
    e.submit(r).expect("ok in this test");
    let events = e.run_to_completion();
    let streamed: String = events
        .iter()
        .map(|ev| match ev {
            Event::Token { text, .. } | Event::Finished { text, .. } => text.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(streamed, full[..cut]);
    assert_eq!(finish_of(&events, 1).map(|f| f.0), Some(FinishReason::Stop));
}

/// Each token of `id` with the text streamed with it, and the text its finish released.
fn stream_of(events: &[Event], id: RequestId) -> (Vec<(u32, String)>, String) {
    let mut toks = Vec::new();
    let mut tail = String::new();
    for e in events {
        match e {
            Event::Token {
                id: i, token, text, ..
            } if *i == id => toks.push((*token, text.clone())),
            Event::Finished { id: i, text, .. } if *i == id => tail = text.clone(),
            _ => {}
        }
    }
    (toks, tail)
}

#[test]
fn a_stream_resumed_on_another_engine_continues_token_for_token_and_byte_for_byte() {
    // A stop string that never matches holds the last 3 bytes back, so what the client has
    // lags the tokens generated.
    let stop = StopConditions {
        eos: vec![],
        max_tokens: 24,
        stop_strings: vec!["@@@@".into()],
    };
    for seed in [None, Some(5)] {
        let run = |r: Request| {
            let mut e = Engine::new(model(), Some(Arc::new(Letters)), cfg(64));
            e.submit(r).expect("ok in this test");
            let ev = e.run_to_completion();
            (
                stream_of(&ev, 0),
                finish_of(&ev, 0),
                e.stats().kv_blocks_used,
            )
        };
        let mut whole = req(0, prompt(4, 10), 24, seed);
        whole.stop = stop.clone();
        let ((toks, tail), finish, _) = run(whole.clone());
        assert_eq!(toks.len(), 24);
        let full: String = toks.iter().map(|t| t.1.as_str()).collect::<String>() + &tail;
        for cut in [1, 2, 7, 23] {
            // The client has the first `cut` tokens' streamed text; the worker died.
            let sent: String = toks[..cut].iter().map(|t| t.1.as_str()).collect();
            let mut r = whole.clone();
            r.start = Start::Resume {
                generated: toks[..cut].iter().map(|t| t.0).collect(),
                sent: sent.len(),
            };
            let ((more, more_tail), more_finish, leaked) = run(r);
            let ids: Vec<u32> = toks[..cut].iter().chain(&more).map(|t| t.0).collect();
            let all: Vec<u32> = toks.iter().map(|t| t.0).collect();
            assert_eq!(ids, all, "seed {seed:?}, cut {cut}");
            let text = sent + &more.iter().map(|t| t.1.as_str()).collect::<String>() + &more_tail;
            assert_eq!(text, full, "seed {seed:?}, cut {cut}");
            assert_eq!(more_finish, finish, "usage counts every token, {cut}");
            assert_eq!(leaked, 0);
        }
    }
    // Nothing to resume from, or more than the context holds: refused with the reason.
    let mut e = Engine::new(model(), None, cfg(64));
    let mut r = req(1, prompt(4, 10), 24, None);
    r.start = Start::Resume {
        generated: vec![],
        sent: 0,
    };
    assert_eq!(e.submit(r), Err(EngineError::EmptyResume));
    let mut r = req(2, prompt(4, 10), 24, None);
    r.start = Start::Resume {
        generated: vec![3; 150],
        sent: 0,
    };
    assert!(matches!(
        e.submit(r),
        Err(EngineError::PromptTooLong { tokens: 160, .. })
    ));
}

#[test]
fn prefill_then_decode_elsewhere_equals_mixed() {
    for seed in [None, Some(5)] {
        let mixed = run_alone(req(0, prompt(3, 14), 20, seed));
        let mut p = Engine::new(model(), None, cfg(64));
        let mut r = req(0, prompt(3, 14), 20, seed);
        r.mode = Mode::Prefill;
        p.submit(r).expect("ok in this test");
        let ev = p.run_to_completion();
        let Some(Event::Prefilled {
            first_token,
            kv,
            finish: None,
            ..
        }) = ev.first().cloned()
        else {
            panic!("expected a prefill result, got {ev:?}");
        };
        // The prefill worker keeps nothing.
        assert_eq!(p.stats().kv_blocks_used, 0);
        let mut d = Engine::new(model(), None, cfg(64));
        let mut r = req(0, prompt(3, 14), 20, seed);
        r.start = Start::Imported {
            kv: kv.clone(),
            first_token,
        };
        d.submit(r).expect("ok in this test");
        let ev = d.run_to_completion();
        let mut got = vec![first_token];
        got.extend(tokens_of(&ev, 0));
        assert_eq!(got, mixed, "seed {seed:?}");
        assert_eq!(finish_of(&ev, 0), Some((FinishReason::Length, 20)));
        assert_eq!(d.stats().kv_blocks_used, 0);

        // A decode worker with another block size refuses the blocks.
        let mut other = Engine::new(
            model(),
            None,
            EngineConfig {
                block_size: 8,
                ..cfg(64)
            },
        );
        let mut r = req(1, prompt(3, 14), 20, seed);
        r.start = Start::Imported { kv, first_token };
        assert!(matches!(other.submit(r), Err(EngineError::Import(_))));
    }
}

#[test]
fn requests_that_can_never_run_are_refused_with_a_reason() {
    let mut e = Engine::new(model(), None, cfg(8));
    assert_eq!(
        e.submit(req(0, vec![], 4, None)),
        Err(EngineError::EmptyPrompt)
    );
    assert!(matches!(
        e.submit(req(1, prompt(1, 200), 4, None)),
        Err(EngineError::PromptTooLong { .. })
    ));
    assert!(matches!(
        e.submit(req(2, vec![1, 99], 4, None)),
        Err(EngineError::BadToken { token: 99, .. })
    ));
    assert!(matches!(
        e.submit(req(3, prompt(3, 40), 4, None)),
        Err(EngineError::TooLargeForCache { .. })
    ));
    e.submit(req(4, prompt(4, 4), 4, None))
        .expect("ok in this test");
    assert_eq!(
        e.submit(req(4, prompt(4, 4), 4, None)),
        Err(EngineError::DuplicateId(4))
    );
}

#[test]
fn a_sequence_that_outgrows_the_whole_cache_ends_at_length() {
    // 8 blocks of 4 = 32 tokens; nothing else is running, so it cannot be preempted.
    let mut e = Engine::new(model(), None, cfg(8));
    e.submit(req(0, prompt(0, 10), 100, None))
        .expect("ok in this test");
    let events = e.run_to_completion();
    let (reason, n) = finish_of(&events, 0).expect("ok in this test");
    assert_eq!(reason, FinishReason::Length);
    // 32 tokens fill the cache; the 33rd was sampled from them and needs no slot.
    assert_eq!(10 + n, 33);
    assert_eq!(e.stats().kv_blocks_used, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Any interleaving of submissions, cancellations and steps keeps every block owned once,
    /// and an idle engine holds no block.
    #[test]
    fn no_block_is_leaked_or_shared(ops in proptest::collection::vec((0u8..3, 1usize..20, 1usize..12), 1..25)) {
        let mut e = Engine::new(model(), None, cfg(20));
        let mut next = 0u64;
        for (op, len, max) in ops {
            match op {
                0 => {
                    let _ = e.submit(req(next, prompt(next, len), max, Some(next)));
                    next += 1;
                }
                1 => {
                    e.cancel(len as u64 % (next + 1));
                }
                _ => {
                    e.step();
                }
            }
            prop_assert!(e.check_invariants());
        }
        e.run_to_completion();
        prop_assert!(e.check_invariants());
        prop_assert_eq!(e.stats().kv_blocks_used, 0);
    }
}
