//! Paged KV cache: allocator invariants, data integrity, export/import.

use dopd_worker::kv::{KvError, KvLayout, PagedKvCache, SeqId};
use proptest::prelude::*;

mod common;

fn layout() -> KvLayout {
    common::kv_layout()
}

/// A recognisable K (V is its negation) for (sequence tag, token, layer).
fn kv(tag: u64, token: usize, layer: usize) -> (Vec<f32>, Vec<f32>) {
    let k: Vec<f32> = (0..6)
        .map(|i| (tag * 10_000 + token as u64 * 100 + layer as u64 * 10 + i) as f32)
        .collect();
    let v = k.iter().map(|x| -x).collect();
    (k, v)
}

fn push_token(c: &mut PagedKvCache, seq: SeqId, tag: u64, token: usize) -> Result<(), KvError> {
    for layer in 0..c.layout().layers {
        let (k, v) = kv(tag, token, layer);
        c.append(seq, layer, &k, &v)?;
    }
    Ok(())
}

fn check_contents(c: &PagedKvCache, seq: SeqId, tag: u64) {
    let n = c.len(seq).expect("known");
    let (heads, hd) = (c.layout().kv_heads, c.layout().head_dim);
    for layer in 0..c.layout().layers {
        // Head-major: [kv_heads, n, head_dim]; the written rows are token-major.
        let mut k = vec![0.0; heads * n * hd];
        let mut v = vec![0.0; heads * n * hd];
        let got = c
            .gather_heads(seq, layer, n, &mut k, &mut v)
            .expect("gathers");
        assert_eq!(got, n);
        // Read in place, block by block, the same values.
        let view = c.view(seq, layer).expect("known");
        assert_eq!(view.len(), n);
        let (bs, w) = (view.block_size(), heads * hd);
        for t in 0..n {
            let (wk, wv) = kv(tag, t, layer);
            for h in 0..heads {
                let at = (h * n + t) * hd;
                assert_eq!(&k[at..at + hd], &wk[h * hd..(h + 1) * hd]);
                assert_eq!(&v[at..at + hd], &wv[h * hd..(h + 1) * hd]);
            }
            let (bk, bv) = view.block(t / bs);
            let at = (t % bs) * w;
            assert_eq!((&bk[at..at + w], &bv[at..at + w]), (&wk[..], &wv[..]));
        }
        assert!(view.block(n.div_ceil(bs)).0.is_empty());
        assert!(view.block(1 << 40).1.is_empty());
    }
}

#[test]
fn blocks_are_taken_only_when_the_last_one_is_full() {
    let mut c = PagedKvCache::new(layout(), 4);
    let s = c.create();
    for t in 0..5 {
        push_token(&mut c, s, 1, t).expect("room");
    }
    assert_eq!(c.blocks(s).expect("known").len(), 2);
    assert_eq!(c.used_blocks(), 2);
    check_contents(&c, s, 1);
    c.free(s).expect("known");
    assert_eq!(c.free_blocks(), 4);
    assert!(c.check_invariants());
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let mut c = PagedKvCache::new(layout(), 1);
    let s = c.create();
    let (k, v) = kv(0, 0, 0);
    // Layers may be written in any order; the token completes with its last layer.
    c.append(s, 1, &k, &v).expect("layer-major writes are fine");
    assert_eq!(c.len(s).expect("known"), 0);
    c.append(s, 0, &k, &v).expect("completes token 0");
    assert_eq!(c.len(s).expect("known"), 1);
    c.free(s).expect("known");
    let s = c.create();
    assert!(matches!(
        c.append(s, 5, &k, &v),
        Err(KvError::BadLayer { .. })
    ));
    assert!(matches!(
        c.append(s, 0, &k[..3], &v),
        Err(KvError::BadWidth { .. })
    ));
    assert!(matches!(
        c.append(99, 0, &k, &v),
        Err(KvError::UnknownSequence(99))
    ));
    for t in 0..4 {
        push_token(&mut c, s, 0, t).expect("one block holds 4 tokens");
    }
    assert!(matches!(
        push_token(&mut c, s, 0, 4),
        Err(KvError::OutOfBlocks { .. })
    ));
    assert!(c.check_invariants());
    assert!(matches!(c.free(s + 1), Err(KvError::UnknownSequence(_))));
}

#[test]
fn export_import_rejects_other_layouts() {
    let mut a = PagedKvCache::new(layout(), 4);
    let s = a.create();
    push_token(&mut a, s, 3, 0).expect("room");
    let e = a.export(s).expect("exports");
    let mut other = PagedKvCache::new(
        KvLayout {
            model_hash: 7,
            ..layout()
        },
        4,
    );
    assert!(matches!(
        other.import(&e),
        Err(KvError::LayoutMismatch { .. })
    ));
    let mut small = PagedKvCache::new(layout(), 0);
    assert!(matches!(small.import(&e), Err(KvError::OutOfBlocks { .. })));
    assert!(small.check_invariants() && other.check_invariants());
    // K/V from a peer holding a NaN or an infinity is refused, and takes no block.
    let mut b = PagedKvCache::new(layout(), 4);
    for bad in [f32::NAN, f32::INFINITY] {
        let mut poisoned = e.clone();
        poisoned.blocks[0][1] = bad;
        assert!(matches!(
            b.import(&poisoned),
            Err(KvError::NonFinite { block: 0 })
        ));
        assert_eq!(b.used_blocks(), 0);
    }
    assert!(b.import(&e).is_ok());
}

#[derive(Clone, Debug)]
enum Op {
    Create,
    Push(usize),
    Free(usize),
    Move(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        6 => (0usize..8).prop_map(Op::Push),
        1 => (0usize..8).prop_map(Op::Free),
        1 => (0usize..8).prop_map(Op::Move),
    ]
}

proptest! {
    #[test]
    fn no_block_is_leaked_or_shared_and_data_survives_moves(ops in prop::collection::vec(op(), 1..120)) {
        let mut a = PagedKvCache::new(layout(), 12);
        let mut b = PagedKvCache::new(layout(), 12);
        // (cache, seq id, tag) of live sequences.
        let mut live: Vec<(bool, SeqId, u64)> = Vec::new();
        let mut tag = 0u64;
        for o in ops {
            match o {
                Op::Create => {
                    tag += 1;
                    live.push((false, a.create(), tag));
                }
                Op::Push(i) if !live.is_empty() => {
                    let (in_b, s, t) = live[i % live.len()];
                    let c = if in_b { &mut b } else { &mut a };
                    let n = c.len(s).expect("live");
                    match push_token(c, s, t, n) {
                        Ok(()) | Err(KvError::OutOfBlocks { .. }) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let (in_b, s, _) = live.swap_remove(i % live.len());
                    if in_b { b.free(s).expect("live") } else { a.free(s).expect("live") }
                }
                Op::Move(i) if !live.is_empty() => {
                    // Export from A, import into B, free in A (the P→D hand-off).
                    let k = i % live.len();
                    let (in_b, s, t) = live[k];
                    if !in_b {
                        let e = a.export(s).expect("live");
                        if let Ok(new) = b.import(&e) {
                            a.free(s).expect("live");
                            live[k] = (true, new, t);
                        }
                    }
                }
                _ => {}
            }
            prop_assert!(a.check_invariants() && b.check_invariants());
        }
        let owned_a: usize = live.iter().filter(|l| !l.0).map(|l| a.blocks(l.1).expect("live").len()).sum();
        let owned_b: usize = live.iter().filter(|l| l.0).map(|l| b.blocks(l.1).expect("live").len()).sum();
        prop_assert_eq!(owned_a + a.free_blocks(), 12);
        prop_assert_eq!(owned_b + b.free_blocks(), 12);
        for (in_b, s, t) in live {
            check_contents(if in_b { &b } else { &a }, s, t);
        }
    }
}

#[test]
fn reserved_slots_are_where_appends_land_and_the_same_at_every_layer() {
    // Two interleaved sequences: their blocks alternate in the pool.
    let mut by_append = PagedKvCache::new(layout(), 8);
    let mut by_reserve = PagedKvCache::new(layout(), 8);
    let bs = layout().block_size;
    let (a, b) = (by_append.create(), by_append.create());
    let (ra, rb) = (by_reserve.create(), by_reserve.create());
    let mut slots = [Vec::new(), Vec::new()];
    for (round, n) in [3usize, 1, 5, 2].into_iter().enumerate() {
        for (i, (s, r)) in [(a, ra), (b, rb)].into_iter().enumerate() {
            let tag = i as u64 + 1;
            let start = by_append.len(s).expect("known");
            for t in start..start + n {
                push_token(&mut by_append, s, tag, t).expect("room");
            }
            let first = by_reserve.reserve(r, 0, n).expect("room");
            for layer in 1..layout().layers {
                assert_eq!(
                    by_reserve.reserve(r, layer, n).expect("room"),
                    first,
                    "round {round}"
                );
            }
            slots[i].extend(first);
        }
    }
    for (i, (s, r)) in [(a, ra), (b, rb)].into_iter().enumerate() {
        assert_eq!(by_reserve.len(r), by_append.len(s));
        assert_eq!(by_reserve.blocks(r), by_append.blocks(s));
        let n = by_reserve.len(r).expect("known");
        assert_eq!(by_reserve.slots(r, n).expect("reserved"), slots[i]);
        // A slot is its block's id times the block size plus the offset in it.
        let blocks = by_append.blocks(s).expect("known");
        for (t, &slot) in slots[i].iter().enumerate() {
            assert_eq!(slot, blocks[t / bs] as usize * bs + t % bs);
        }
        // The view of the appended cache reads each token back at that slot's place.
        let view = by_append.view(s, 0).expect("known");
        let (k, _) = view.block(n / bs);
        assert_eq!(k.len(), (n % bs) * layout().token_width());
        assert!(by_reserve.slots(r, blocks.len() * bs + 1).is_err());
    }
    // Short of blocks: refused, nothing changes.
    let free = by_reserve.free_blocks();
    let before = by_reserve.len(ra);
    assert!(matches!(
        by_reserve.reserve(ra, 0, (free + 1) * bs + 1),
        Err(KvError::OutOfBlocks { .. })
    ));
    assert_eq!(
        (by_reserve.free_blocks(), by_reserve.len(ra)),
        (free, before)
    );
    assert!(by_reserve.check_invariants() && by_append.check_invariants());
}

#[test]
fn an_exported_block_is_the_layouts_block_of_k_and_v_at_every_layer() {
    let l = layout();
    let mut c = PagedKvCache::new(l, 4);
    let s = c.create();
    for t in 0..l.block_size + 1 {
        push_token(&mut c, s, 1, t).expect("room");
    }
    let e = c.export(s).expect("exports");
    assert_eq!(e.blocks.len(), 2);
    assert!(e.blocks.iter().all(|b| b.len() == l.block_floats()));
    // The same K/V counted per token, in bytes.
    assert_eq!(l.block_size * l.token_bytes(), 4 * l.block_floats());
    assert_eq!(
        l.token_bytes(),
        2 * l.layers * l.kv_heads * l.head_dim * size_of::<f32>()
    );
}
