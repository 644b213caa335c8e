//! Prefill and decode tokens/s of candle's quantized Llama at batch 1, on the same
//! prompts (length 128, 32 decoded tokens) that `dopd bench worker` uses. candle keeps the
//! weights quantized (Q4_1 kernels); DOPD dequantizes to f32 on load.

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

fn prompt(i: usize, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((i * 7919 + j * 104_729 + 17) % (vocab - 1)) as u32 + 1)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../../models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let (prompt_len, decode) = (128usize, 32usize);
    let dev = Device::Cpu;
    let load = || -> anyhow::Result<ModelWeights> {
        let mut f = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut f)?;
        Ok(ModelWeights::from_gguf(content, &mut f, &dev)?)
    };
    let vocab = 49152;
    println!("model {path}  candle {}  threads {}", "0.11", candle_core::utils::get_num_threads());
    println!("{:>6} {:>8} {:>16} {:>16} {:>14}", "batch", "prompt", "prefill tok/s", "decode tok/s", "step ms");
    // candle's quantized Llama serves batch 1 only: a batched prompt fails in its last-token
    // slice ("input tensor is not contiguous"), so larger batches are not compared.
    for b in [1usize] {
        let mut m = load()?;
        let ids: Vec<u32> = (0..b).flat_map(|i| prompt(i, prompt_len, vocab)).collect();
        let x = Tensor::from_vec(ids, (b, prompt_len), &dev)?;
        let t = Instant::now();
        let logits = m.forward(&x, 0)?;
        let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.flatten_all()?.to_vec1()?;
        let prefill_s = t.elapsed().as_secs_f64();
        let mut tok = next;
        let t = Instant::now();
        for step in 0..decode {
            let x = Tensor::from_vec(tok.clone(), (b, 1), &dev)?;
            let logits = m.forward(&x, prompt_len + step)?;
            tok = logits.argmax(candle_core::D::Minus1)?.flatten_all()?.to_vec1()?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        println!(
            "{:>6} {:>8} {:>16.1} {:>16.1} {:>14.2}",
            b,
            prompt_len,
            (b * prompt_len) as f64 / prefill_s,
            (b * decode) as f64 / decode_s,
            decode_s / decode as f64 * 1e3
        );
    }
    Ok(())
}
