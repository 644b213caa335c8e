# The GPU peer of `dopd bench worker --random-smollm2 --device cuda` (run by
# scripts/gpu-check.sh where python3 has torch and transformers): Hugging Face transformers'
# LlamaForCausalLM in SmolLM2-135M's shape, seeded random weights, f32, eager PyTorch with its
# dynamic KV cache; prompts of 128 tokens, greedy. Decode rate: 32 tokens x batch over the time
# of a 33-token generation less that of a 1-token one (best of two each).
#
#   python3 scripts/gpu-peer-transformers.py 1,8,32,128 OUT.json
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)
torch.manual_seed(1)
m = LlamaForCausalLM(cfg).to("cuda", torch.float32).eval()
rows = []
for b in [int(x) for x in sys.argv[1].split(",")]:
    ids = torch.randint(1, 49151, (b, 128), device="cuda")
    def gen(n):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize(); return time.perf_counter() - t
    gen(2)
    p = min(gen(1) for _ in range(2))
    full = min(gen(33) for _ in range(2))
    rows.append({"batch": b, "prefill_tokens_per_s": b * 128 / p, "decode_tokens_per_s": b * 32 / (full - p)})
    print(f"hf transformers batch {b:>3}: prefill {b*128/p:9.1f} tok/s, decode {b*32/(full-p):8.1f} tok/s", flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
