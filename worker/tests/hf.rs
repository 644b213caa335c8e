//! Hugging Face checkpoints: a tiny random model written as `config.json` + safetensors loads to
//! exactly the model built from the same weights directly; F16/BF16 load within their precision;
//! broken checkpoints fail with errors that name the problem.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use dopd_model::hf::config_from_json;
use dopd_worker::hf::HfWeights;
use dopd_worker::model::{Llama, LlamaConfig, ModelError, RandomWeights, RopeStyle, WeightSource};
use safetensors::{Dtype, View};

type B = Flex;

fn tiny() -> LlamaConfig {
    LlamaConfig {
        vocab: 40,
        rms_eps: 1e-6,
        context: 128,
        rope_style: RopeStyle::Halves,
        qkv_bias: true,
        ..LlamaConfig::tiny()
    }
}

const CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
  "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
  "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
  "tie_word_embeddings": false, "eos_token_id": 3
}"#;

/// (HF name, GGUF name, shape) of every tensor of the tiny model.
fn tensors() -> Vec<(String, String, Vec<usize>)> {
    let c = tiny();
    let (h, hd) = (c.hidden, c.head_dim);
    let mut v = vec![
        (
            "model.embed_tokens.weight".into(),
            "token_embd.weight".into(),
            vec![c.vocab, h],
        ),
        (
            "model.norm.weight".into(),
            "output_norm.weight".into(),
            vec![h],
        ),
        (
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![c.vocab, h],
        ),
    ];
    for l in 0..c.layers {
        for (hf, g, shape) in [
            ("input_layernorm.weight", "attn_norm.weight", vec![h]),
            (
                "self_attn.q_proj.weight",
                "attn_q.weight",
                vec![c.heads * hd, h],
            ),
            ("self_attn.q_proj.bias", "attn_q.bias", vec![c.heads * hd]),
            (
                "self_attn.k_proj.weight",
                "attn_k.weight",
                vec![c.kv_heads * hd, h],
            ),
            (
                "self_attn.k_proj.bias",
                "attn_k.bias",
                vec![c.kv_heads * hd],
            ),
            (
                "self_attn.v_proj.weight",
                "attn_v.weight",
                vec![c.kv_heads * hd, h],
            ),
            (
                "self_attn.v_proj.bias",
                "attn_v.bias",
                vec![c.kv_heads * hd],
            ),
            (
                "self_attn.o_proj.weight",
                "attn_output.weight",
                vec![h, c.heads * hd],
            ),
            (
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                vec![h],
            ),
            ("mlp.gate_proj.weight", "ffn_gate.weight", vec![c.ffn, h]),
            ("mlp.up_proj.weight", "ffn_up.weight", vec![c.ffn, h]),
            ("mlp.down_proj.weight", "ffn_down.weight", vec![h, c.ffn]),
        ] {
            v.push((
                format!("model.layers.{l}.{hf}"),
                format!("blk.{l}.{g}"),
                shape,
            ));
        }
    }
    v
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn encode(x: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // BF16: the top half of the f32 bits (truncation).
        Dtype::BF16 => x
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect(),
        _ => unreachable!("the test writes F32 and BF16"),
    }
}

/// Writes the tiny model's random weights as an HF checkpoint in a fresh directory.
fn write_checkpoint(name: &str, dtype: Dtype, skip: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dopd-hf-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("config.json"), CONFIG).expect("config");
    let src = RandomWeights::new(5);
    let raws: Vec<(String, Raw)> = tensors()
        .into_iter()
        .filter(|(hf, _, _)| Some(hf.as_str()) != skip)
        .map(|(hf, g, shape)| {
            let x = src.load(&g, &shape).expect("random weights");
            let data = encode(&x, dtype);
            (hf, Raw { dtype, shape, data })
        })
        .collect();
    let views: Vec<(String, &Raw)> = raws.iter().map(|(n, r)| (n.clone(), r)).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("write safetensors");
    dir
}

fn logits(m: &Llama<B>) -> Vec<f32> {
    m.forward(&[1, 5, 9, 30, 2, 17])
        .into_data()
        .to_vec()
        .expect("f32 logits")
}

#[test]
fn an_hf_checkpoint_loads_to_the_same_model() {
    let dir = write_checkpoint("f32", Dtype::F32, None);
    let c = config_from_json(&dir.join("config.json")).expect("config");
    assert_eq!(c, tiny());
    let w = HfWeights::open(&dir).expect("weights");
    let from_file = Llama::<B>::load(c, &w, &Default::default()).expect("loads");
    let direct = Llama::<B>::random(tiny(), 5, &Default::default()).expect("random");
    assert_eq!(logits(&from_file), logits(&direct));

    // BF16 weights: within bf16 precision of the f32 model.
    let dir16 = write_checkpoint("bf16", Dtype::BF16, None);
    let w = HfWeights::open(&dir16).expect("weights");
    let m16 = Llama::<B>::load(tiny(), &w, &Default::default()).expect("loads");
    let worst = logits(&m16)
        .iter()
        .zip(logits(&direct))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 0.1, "bf16 logits off by {worst}");
    for d in [dir, dir16] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn broken_checkpoints_fail_with_a_named_reason() {
    let dir = write_checkpoint(
        "missing",
        Dtype::F32,
        Some("model.layers.1.mlp.up_proj.weight"),
    );
    let w = HfWeights::open(&dir).expect("weights");
    match Llama::<B>::load(tiny(), &w, &Default::default()) {
        Err(ModelError::MissingTensor(n)) => assert_eq!(n, "blk.1.ffn_up.weight"),
        other => panic!("expected a missing tensor, got {:?}", other.err()),
    }
    // A truncated safetensors file.
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).expect("read");
    std::fs::write(&st, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = HfWeights::open(&dir).err().expect("refused").to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // A config with a missing field, and an unsupported architecture.
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, CONFIG.replace("\"hidden_size\": 32,", "")).expect("write");
    let err = config_from_json(&cfg).expect_err("refused").to_string();
    assert!(err.contains("hidden_size"), "{err}");
    std::fs::write(&cfg, CONFIG.replace("qwen2", "gpt_neox")).expect("write");
    assert!(matches!(
        config_from_json(&cfg),
        Err(ModelError::UnsupportedArchitecture(a)) if a == "gpt_neox"
    ));
    std::fs::write(&cfg, "{ not json").expect("write");
    assert!(config_from_json(&cfg).is_err());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(HfWeights::open(Path::new("/nonexistent/checkpoint")).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

    /// Fuzzing: a safetensors file with bytes changed (in its JSON header most often) or cut
    /// loads or is refused with an error, never a panic.
    #[test]
    fn a_safetensors_file_with_bytes_changed_or_cut_loads_or_is_refused(
        edits in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()),
            1..5,
        ),
        cut in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
    ) {
        static CLEAN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let clean = CLEAN.get_or_init(|| {
            let dir = write_checkpoint("fuzz-clean", Dtype::BF16, None);
            let b = std::fs::read(dir.join("model.safetensors")).expect("read");
            let _ = std::fs::remove_dir_all(&dir);
            b
        });
        let header = 8 + u64::from_le_bytes(clean[..8].try_into().expect("8 bytes")) as usize;
        let mut b = clean.clone();
        for (i, v, in_header) in edits {
            let k = if in_header { i.index(header) } else { i.index(b.len()) };
            b[k] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len() + 1));
        }
        let dir = std::env::temp_dir().join(format!("dopd-hf-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("config.json"), CONFIG).expect("config");
        std::fs::write(dir.join("model.safetensors"), &b).expect("write");
        if let Ok(w) = HfWeights::open(&dir) {
            let _ = Llama::<B>::load(tiny(), &w, &Default::default());
        }
    }
}
