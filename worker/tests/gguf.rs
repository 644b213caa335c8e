//! The GGUF reader on synthetic files written here, and on the real SmolLM2 file from the set-up
//! step.

use std::path::PathBuf;

mod common;

use common::{Writer, f16};
use dopd_model::gguf::{GgmlType, Gguf, GgufError, Value, f16_to_f32};

#[test]
fn half_precision_conversion() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert!(f16_to_f32(0x7c00).is_infinite());
    assert_eq!(f16_to_f32(u16::from_le_bytes(f16(0.5))), 0.5);
}

#[test]
fn metadata_and_every_supported_type_round_trip() {
    let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f16s: Vec<u8> = [1.0f32, -0.5].iter().flat_map(|v| f16(*v)).collect();
    // Q8_0: d = 0.5, q = -16..16.
    let mut q8 = f16(0.5).to_vec();
    q8.extend((-16i8..16).map(|q| q as u8));
    // Q4_0: d = 2.0, nibbles 0..16 (low) and 15..0 (high): values (q - 8)·d.
    let mut q40 = f16(2.0).to_vec();
    q40.extend((0u8..16).map(|i| i | ((15 - i) << 4)));
    // Q4_1: d = 0.5, m = -1.0: values q·d + m.
    let mut q41 = f16(0.5).to_vec();
    q41.extend(f16(-1.0));
    q41.extend((0u8..16).map(|i| i | (i << 4)));
    let bytes = Writer::default()
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 30)
        .kv_str_array("tokenizer.ggml.tokens", &["<s>", "hello", "world"])
        .tensor("a", &[4], 0, f32s)
        .tensor("b", &[2], 1, f16s)
        .tensor("c", &[32], 8, q8)
        .tensor("d", &[32], 2, q40)
        .tensor("e", &[16, 2], 3, q41)
        .build();
    let g = Gguf::parse(bytes).expect("valid");
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(g.get_u64("llama.block_count").expect("blocks"), 30);
    let toks = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .expect("tokens");
    assert_eq!(toks[1], Value::String("hello".into()));
    assert_eq!(g.dequantize("a").expect("f32"), vec![1.5, -2.0, 0.25, 8.0]);
    assert_eq!(g.dequantize("b").expect("f16"), vec![1.0, -0.5]);
    let c = g.dequantize("c").expect("q8_0");
    assert_eq!(c[0], -8.0);
    assert_eq!(c[31], 7.5);
    let d = g.dequantize("d").expect("q4_0");
    assert_eq!(d[0], -16.0); // low nibble 0 → (0 - 8)·2
    assert_eq!(d[15], 14.0); // low nibble 15
    assert_eq!(d[16], 14.0); // high nibble of byte 0 is 15
    assert_eq!(d[31], -16.0);
    let e = g.dequantize("e").expect("q4_1");
    assert_eq!(e.len(), 32);
    assert_eq!(e[0], -1.0);
    assert_eq!(e[15], 6.5);
    assert_eq!(e[31], 6.5);
    assert_eq!(g.tensor("e").expect("e").dims, vec![16, 2]);
}

/// Found by `tests/fuzz.rs`: a Q8_0 tensor of 32·(2^59 − 1) values fits a u64 count, but its
/// size in bytes (2^59 − 1 blocks of 34 bytes) did not, and the multiplication overflowed (a panic in debug
/// builds, a wrapped size that passed the bounds check in release builds).
#[test]
fn a_tensor_whose_byte_size_overflows_is_refused_not_wrapped() {
    let bytes = Writer::default()
        .tensor("w", &[32, (1 << 59) - 1], 8, vec![0; 34])
        .build();
    let e = Gguf::parse(bytes).expect_err("cannot fit");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("too many bytes"), "{e}");
}

#[test]
fn broken_files_are_explained() {
    let good = Writer::default()
        .kv_u32("x", 1)
        .tensor("t", &[4], 0, vec![0; 16])
        .build();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        Gguf::parse(bad_magic),
        Err(GgufError::BadMagic(_))
    ));
    let mut v9 = good.clone();
    v9[4] = 9;
    assert!(matches!(
        Gguf::parse(v9),
        Err(GgufError::UnsupportedVersion(9))
    ));
    // The tensor's 16 bytes sit before 16 bytes of padding at the end.
    for cut in [3, 10, 30, good.len() - 20] {
        let e = Gguf::parse(good[..cut].to_vec()).expect_err("truncated");
        assert!(matches!(e, GgufError::Truncated { .. }), "cut {cut}: {e}");
    }
    let g = Gguf::parse(good).expect("valid");
    assert!(matches!(
        g.dequantize("nope"),
        Err(GgufError::MissingTensor(_))
    ));
    assert!(g.get_str("x").is_err());

    let k_quant = Writer::default()
        .tensor("w", &[256], 14, vec![0; 210])
        .build();
    let g = Gguf::parse(k_quant).expect("listed even if not dequantizable");
    let e = g.dequantize("w").expect_err("Q6_K");
    assert!(
        e.to_string().contains("`w`")
            && matches!(
                e,
                GgufError::UnsupportedTensorType {
                    dtype: GgmlType::Other(14),
                    ..
                }
            )
    );

    let ragged = Writer::default().tensor("q", &[33], 8, vec![0; 68]).build();
    assert!(
        Gguf::parse(ragged)
            .expect_err("not whole blocks")
            .to_string()
            .contains("blocks of 32")
    );
    // A huge count must not allocate or panic.
    let mut huge = Writer::default().build();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Gguf::parse(huge),
        Err(GgufError::Truncated { .. })
    ));
}

fn model_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ))
}

#[test]
fn reads_the_smollm2_test_model() {
    let path = model_path();
    let g = Gguf::open(&path)
        .unwrap_or_else(|e| panic!("{e} — run scripts/setup.sh to fetch the test model"));
    assert_eq!(g.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(g.get_u64("llama.block_count").expect("blocks"), 30);
    assert_eq!(g.get_u64("llama.embedding_length").expect("hidden"), 576);
    assert_eq!(g.get_u64("llama.attention.head_count").expect("heads"), 9);
    assert_eq!(
        g.get_u64("llama.attention.head_count_kv")
            .expect("kv heads"),
        3
    );
    let vocab = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .expect("vocab")
        .len();
    assert_eq!(vocab, 49152);
    // Every tensor of the file dequantizes to finite values of the right count.
    for t in &g.tensors {
        let v = g.dequantize(&t.name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.len() as u64, t.elements(), "{}", t.name);
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
    }
    let norm = g.dequantize("blk.0.attn_norm.weight").expect("norm");
    assert_eq!(norm.len(), 576);
}
