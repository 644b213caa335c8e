//! The SmolLM2 tokenizer rebuilt from its GGUF metadata.

mod common;

use std::path::Path;

use dopd_model::gguf::Gguf;
use dopd_model::tokenizer::{Message, ModelTokenizer};

fn smollm2() -> ModelTokenizer {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let g = Gguf::open(Path::new(path)).unwrap_or_else(|e| panic!("{e} — run scripts/setup.sh"));
    ModelTokenizer::from_gguf(&g).expect("gpt2 BPE")
}

#[test]
fn special_tokens_have_their_ids() {
    let t = smollm2();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!((t.bos_id, t.eos_id), (1, 2));
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>").expect("encodes");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
}

#[test]
fn text_round_trips() {
    let t = smollm2();
    for s in [
        "What is the capital of France?",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Zürich, 東京, emoji 🚀 and ümlauts",
        "digits 1234567890 and code: fn main() { println!(\"hi\"); }",
    ] {
        let ids = t.encode(s).expect("encodes");
        assert_eq!(t.decode(&ids, true).expect("decodes"), s);
    }
}

#[test]
fn merges_and_digit_splitting_apply() {
    let t = smollm2();
    // Frequent words are single tokens; every digit is its own token.
    assert_eq!(t.encode("Hello").expect("encodes").len(), 1);
    assert_eq!(t.encode(" Paris").expect("encodes").len(), 1);
    assert_eq!(t.encode("12345").expect("encodes").len(), 5);
    let ids = t
        .encode("The capital of France is Paris.")
        .expect("encodes");
    assert!(ids.len() <= 8, "{ids:?}");
}

#[test]
fn chat_prompts_follow_chatml_with_the_default_system_prompt() {
    let t = smollm2();
    let p = t.chat_prompt(&[Message::new("user", "What is the capital of France?")]);
    assert!(
        p.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{p}"
    );
    assert!(
        p.ends_with(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ),
        "{p}"
    );
    let own = t.chat_prompt(&[
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
    ]);
    assert!(
        own.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"),
        "{own}"
    );
    assert_eq!(own.matches("<|im_start|>system").count(), 1);
}

#[test]
fn unsupported_tokenizers_are_named() {
    let bytes = common::Writer::default()
        .kv_str("tokenizer.ggml.model", "llama")
        .build();
    let g = Gguf::parse(bytes).expect("valid file");
    let e = ModelTokenizer::from_gguf(&g).expect_err("SentencePiece is not supported yet");
    assert!(e.to_string().contains("\"llama\""), "{e}");
    let g = Gguf::parse(common::Writer::default().build()).expect("valid file");
    let e = ModelTokenizer::from_gguf(&g).expect_err("no tokenizer");
    assert!(e.to_string().contains("tokenizer.ggml.model"), "{e}");
}

#[test]
fn a_tokenizer_json_export_loads_back_with_the_same_ids() {
    let t = smollm2();
    let dir = std::env::temp_dir().join(format!("dopd-tokjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("tokenizer.json"), t.to_json().expect("json")).expect("write");
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"eos_token_id": {}, "bos_token_id": {}}}"#,
            t.eos_id, t.bos_id
        ),
    )
    .expect("write");
    let back = ModelTokenizer::from_hf_files(&dir.join("tokenizer.json"), &dir.join("config.json"))
        .expect("loads");
    for s in [
        "Hello, world! 12345",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
        "naïve café — ünïcödé",
    ] {
        assert_eq!(
            back.encode(s).expect("enc"),
            t.encode(s).expect("enc"),
            "{s}"
        );
    }
    assert_eq!((back.bos_id, back.eos_id), (t.bos_id, t.eos_id));
    std::fs::write(dir.join("tokenizer.json"), "{ broken").expect("write");
    let err = ModelTokenizer::from_hf_files(&dir.join("tokenizer.json"), &dir.join("config.json"))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
