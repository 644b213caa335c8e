//! Property-based fuzzing of what the worker reads from outside: model files (GGUF images),
//! checkpoint configs (`config.json`) and KV block sets from a peer. Whatever the bytes, the
//! answer is a value or an error naming what is wrong: never a panic, never a huge allocation
//! taken on a header's word, and a refused KV import leaves the cache as it was.

use std::sync::atomic::{AtomicU64, Ordering};

use dopd_model::gguf::Gguf;
use dopd_model::hf::config_from_json;
use dopd_worker::kv::{KvExport, KvLayout, PagedKvCache};
use proptest::prelude::*;

mod common;

use common::{Writer, f16};

/// A small valid GGUF image: metadata of each kind and tensors of several types.
fn image() -> Vec<u8> {
    let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut q8 = f16(0.5).to_vec();
    q8.extend((-16i8..16).map(|q| q as u8));
    let mut q41 = f16(0.5).to_vec();
    q41.extend(f16(-1.0));
    q41.extend((0u8..16).map(|i| i | (i << 4)));
    Writer::default()
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 2)
        .kv_str_array("tokenizer.ggml.tokens", &["<s>", "a", "b"])
        .tensor("a", &[4], 0, f32s)
        .tensor("c", &[32], 8, q8)
        .tensor("e", &[16, 2], 3, q41)
        .build()
}

/// Parses `bytes` and, if they parse, reads every tensor.
fn read_all(bytes: Vec<u8>) {
    if let Ok(g) = Gguf::parse(bytes) {
        let names: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
        for n in names {
            let _ = g.dequantize(&n);
        }
    }
}

fn layout() -> KvLayout {
    common::kv_layout()
}

static CONFIGS: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn a_gguf_image_with_bytes_changed_or_cut_parses_or_is_refused(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = image();
        for (i, v) in edits {
            let k = i.index(b.len());
            b[k] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len() + 1));
        }
        read_all(b);
    }

    #[test]
    fn arbitrary_bytes_behind_a_gguf_magic_are_refused_or_parsed(
        rest in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(rest);
        read_all(b);
    }

    #[test]
    fn a_config_json_of_any_shape_loads_or_is_refused(
        fields in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size",
                    "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim",
                    "tie_word_embeddings", "rope_scaling", "attention_bias", "eos_token_id",
                ]),
                prop_oneof![
                    any::<i64>().prop_map(|v| v.to_string()),
                    any::<f64>().prop_map(|v| if v.is_finite() { v.to_string() } else { "1e999".into() }),
                    "[a-z_]{0,8}".prop_map(|s| format!("\"{s}\"")),
                    Just("null".to_string()),
                    Just("[1, 2]".to_string()),
                    Just("{\"rope_type\": \"llama3\", \"factor\": 0}".to_string()),
                ],
            ),
            0..16,
        ),
    ) {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        let dir = std::env::temp_dir().join(format!(
            "dopd-fuzz-config-{}-{}",
            std::process::id(),
            CONFIGS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.json");
        std::fs::write(&path, format!("{{{}}}", body.join(", "))).expect("write");
        let got = config_from_json(&path);
        let _ = std::fs::remove_dir_all(&dir);
        if let Ok(c) = got {
            // What loads is usable: no zero sizes a model would divide by.
            prop_assert!(c.hidden > 0 && c.heads > 0 && c.kv_heads > 0 && c.layers > 0, "{c:?}");
            prop_assert!(c.head_dim > 0 && c.vocab > 0 && c.ffn > 0, "{c:?}");
            prop_assert!(c.heads % c.kv_heads == 0, "{c:?}");
        }
    }

    #[test]
    fn a_hostile_kv_block_set_is_refused_and_leaves_the_cache_as_it_was(
        tokens in 0usize..64,
        blocks in 0usize..20,
        width in prop_oneof![Just(0i64), -3i64..3],
        fingerprint_ok in prop::bool::weighted(0.8),
        poison in prop::option::of((any::<prop::sample::Index>(), prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)])),
    ) {
        let l = layout();
        let mut c = PagedKvCache::new(l, 12);
        let per = (2 * l.layers * l.block_width()) as i64;
        let len = usize::try_from((per + width).max(0)).unwrap_or(0);
        let mut e = KvExport {
            fingerprint: if fingerprint_ok { l.fingerprint() } else { l.fingerprint() ^ 1 },
            tokens,
            blocks: (0..blocks).map(|b| vec![b as f32 * 0.5; len]).collect(),
        };
        if let Some((i, v)) = poison
            && blocks > 0
            && len > 0
        {
            let b = i.index(blocks);
            e.blocks[b][len / 2] = v;
        }
        let before = (c.free_blocks(), c.used_blocks());
        let poisoned = poison.is_some() && blocks > 0 && len > 0;
        let acceptable = fingerprint_ok
            && (width == 0 || blocks == 0)
            && !poisoned
            && blocks == tokens.div_ceil(l.block_size)
            && blocks <= 12;
        match c.import(&e) {
            Ok(seq) => {
                prop_assert!(acceptable, "imported {blocks} blocks for {tokens} tokens");
                prop_assert_eq!(c.len(seq).ok(), Some(tokens));
                prop_assert!(c.check_invariants());
                c.free(seq).expect("imported");
                prop_assert_eq!((c.free_blocks(), c.used_blocks()), before);
            }
            Err(err) => {
                prop_assert!(!acceptable, "refused a good block set: {err}");
                prop_assert_eq!((c.free_blocks(), c.used_blocks()), before);
                prop_assert!(c.check_invariants());
            }
        }
    }
}
