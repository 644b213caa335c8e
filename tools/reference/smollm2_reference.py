#!/usr/bin/env python3
"""Independent numpy reference of the SmolLM2-135M-Instruct forward pass.

Run from the repository root (CPython 3.11, pinned environment):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install -r tools/reference/requirements.txt
    /tmp/refvenv/bin/python tools/reference/smollm2_reference.py

It reads models/SmolLM2-135M-Instruct.Q4_1.gguf with ``gguf.GGUFReader``,
dequantizes every tensor to float32 with ``gguf.quants.dequantize`` (exact:
Q4_1 is d*q + m with f16 d/m, Q8_0 is d*q with f16 d) and runs the Llama
forward pass in plain numpy.  It writes
worker/tests/fixtures/smollm2_reference.json, which the Rust tests read;
Python is never needed to run them.  Runtime is well under a minute on
2 cores.

Options: ``--rope normal|neox`` (default ``normal``, see below),
``--dtype float64|float32`` (activation/accumulation dtype, default float64),
``--no-write`` (print only), ``--model`` / ``--out`` paths.

Model (hyper-parameters are read from the GGUF and checked):
    30 blocks, hidden 576, 9 query heads, 3 KV heads, head_dim 64,
    FFN 1536, vocab 49152, rope freq_base 100000, RMS eps 1e-5 (stored as
    f32, i.e. 9.99999974738e-06), no output.weight: the LM head is tied to
    token_embd.weight (the only Q8_0 tensor).

Shapes: GGUF lists dims innermost-first, so a tensor with dims [576, 1536]
is the numpy array of shape (1536, 576): rows = output features, and a
projection is ``y = x @ W.T``.

Forward pass (per token sequence, all positions at once, causal):
    h = token_embd[ids]
    per block:
        x = rmsnorm(h) * attn_norm
        q, k, v = x @ Wq.T, x @ Wk.T, x @ Wv.T      (576, 192, 192 wide)
        q, k = rope(q), rope(k)                      per 64-wide head
        query head j uses KV head j // 3             (grouped-query attention)
        att = softmax(q k^T / sqrt(64) + causal mask) v
        h = h + att @ Wo.T
        x = rmsnorm(h) * ffn_norm
        h = h + (silu(x @ Wgate.T) * (x @ Wup.T)) @ Wdown.T
    logits = (rmsnorm(h) * output_norm) @ token_embd.T
rmsnorm(x) = x / sqrt(mean(x^2) + eps).

RoPE convention.  llama.cpp's HF->GGUF converter permutes the rows of the
Llama Q and K weights so that ggml's "normal" RoPE (mode 0) applies: within
each head, ADJACENT pairs (x[2i], x[2i+1]) are rotated by the angle
pos * base^(-2i/64), i = 0..31.  That is ``--rope normal`` (the default).
``--rope neox`` rotates the HF rotate_half halves (x[i], x[i+32]) instead;
it exists only to show that it is the wrong one for these weights (the
greedy continuations become incoherent).

Recorded per sequence: for the last position the top 20 (id, logit), the
logsumexp, mean and std of the logits, and the full logits as base64 of
little-endian float32; for every position the argmax id, the max logit, the
gap between the best and second-best logit and the logsumexp.  Greedy
continuations (full recompute each step) of sequence A (24 tokens) and B
(16 tokens), stopping early on id 2 (<|im_end|>), which is recorded.
All float values in the JSON except the base64 blob are the float64 values
of the computation (the blob is those values rounded to float32).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

import gguf
from gguf import GGUFReader
from gguf.quants import dequantize

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "worker/tests/fixtures/smollm2_reference.json"
SCRIPT_PATH = "tools/reference/smollm2_reference.py"

SEQUENCES = {
    "chat_france": [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308,
        34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780,
        314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ],
    "plain_fox": [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767],
    "digits": [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28],
}
GREEDY = {"chat_france": 24, "plain_fox": 16}
EOS_ID = 2
TOP_K = 20


# --------------------------------------------------------------------------
# GGUF loading
# --------------------------------------------------------------------------

def field_value(reader: GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents()


class Model:
    def __init__(self, path: str, dtype):
        self.path = path
        self.dtype = dtype
        r = GGUFReader(path)
        arch = field_value(r, "general.architecture")
        if arch != "llama":
            raise SystemExit(f"expected llama architecture, got {arch!r}")
        self.n_layer = int(field_value(r, "llama.block_count"))
        self.n_embd = int(field_value(r, "llama.embedding_length"))
        self.n_ff = int(field_value(r, "llama.feed_forward_length"))
        self.n_head = int(field_value(r, "llama.attention.head_count"))
        self.n_head_kv = int(field_value(r, "llama.attention.head_count_kv"))
        self.rope_base = float(field_value(r, "llama.rope.freq_base"))
        self.eps = float(field_value(r, "llama.attention.layer_norm_rms_epsilon"))
        self.n_ctx = int(field_value(r, "llama.context_length"))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(field_value(r, "llama.rope.dimension_count"))
        assert self.n_rot == self.head_dim, "partial RoPE not handled"
        self.tokens = list(field_value(r, "tokenizer.ggml.tokens"))
        self.token_types = [int(x) for x in field_value(r, "tokenizer.ggml.token_type")]
        self.n_vocab = len(self.tokens)

        self.tensor_info = []
        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            logical = tuple(int(d) for d in reversed(list(t.shape)))
            arr = dequantize(t.data, t.tensor_type).astype(np.float32)
            arr = arr.reshape(logical)
            self.tensor_info.append(
                {
                    "name": t.name,
                    "type": t.tensor_type.name,
                    "gguf_dims": [int(d) for d in t.shape],
                    "numpy_shape": list(logical),
                }
            )
            self.w[t.name] = arr
        self._check_shapes()
        # Pre-cast the weights to the computation dtype once (exact for f32->f64).
        self.wc = {k: v.astype(dtype) for k, v in self.w.items()}

    def _check_shapes(self):
        e, f, hd = self.n_embd, self.n_ff, self.head_dim
        kv = self.n_head_kv * hd
        exp = {"token_embd.weight": (self.n_vocab, e), "output_norm.weight": (e,)}
        for i in range(self.n_layer):
            p = f"blk.{i}."
            exp.update(
                {
                    p + "attn_norm.weight": (e,),
                    p + "attn_q.weight": (self.n_head * hd, e),
                    p + "attn_k.weight": (kv, e),
                    p + "attn_v.weight": (kv, e),
                    p + "attn_output.weight": (e, self.n_head * hd),
                    p + "ffn_norm.weight": (e,),
                    p + "ffn_gate.weight": (f, e),
                    p + "ffn_up.weight": (f, e),
                    p + "ffn_down.weight": (e, f),
                }
            )
        if "output.weight" in self.w:
            exp["output.weight"] = (self.n_vocab, e)
        got = {k: v.shape for k, v in self.w.items()}
        if got != exp:
            missing = set(exp) - set(got)
            extra = set(got) - set(exp)
            bad = {k: (got[k], exp[k]) for k in set(got) & set(exp) if got[k] != exp[k]}
            raise SystemExit(f"tensor mismatch: missing={missing} extra={extra} bad={bad}")

    # ----------------------------------------------------------------------
    # forward pass
    # ----------------------------------------------------------------------

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.dtype(self.eps)) * w

    def rope_tables(self, n: int):
        hd = self.head_dim
        i = np.arange(hd // 2, dtype=np.float64)
        inv_freq = self.rope_base ** (-2.0 * i / hd)  # theta_i = base^(-2i/d)
        ang = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
        return np.cos(ang).astype(self.dtype), np.sin(ang).astype(self.dtype)

    def apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: str):
        """x: (T, H, hd); cos/sin: (T, hd/2)."""
        c = cos[:, None, :]
        s = sin[:, None, :]
        half = self.head_dim // 2
        if mode == "normal":  # ggml mode 0: adjacent pairs (x[2i], x[2i+1])
            x0 = x[..., 0::2]
            x1 = x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x0 * c - x1 * s
            out[..., 1::2] = x0 * s + x1 * c
            return out
        if mode == "neox":  # HF rotate_half: (x[i], x[i+half])
            x0 = x[..., :half]
            x1 = x[..., half:]
            return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
        raise ValueError(mode)

    def forward(self, ids: list[int], rope_mode: str, last_only: bool = False) -> np.ndarray:
        """Logits (T, vocab) for every position (or (1, vocab) for the last)."""
        W = self.wc
        T = len(ids)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_head_kv
        group = nh // nkv
        cos, sin = self.rope_tables(T)
        mask = np.triu(np.full((T, T), -np.inf, dtype=self.dtype), k=1)
        scale = self.dtype(1.0 / np.sqrt(hd))

        h = W["token_embd.weight"][np.asarray(ids)]
        for i in range(self.n_layer):
            p = f"blk.{i}."
            x = self.rmsnorm(h, W[p + "attn_norm.weight"])
            q = (x @ W[p + "attn_q.weight"].T).reshape(T, nh, hd)
            k = (x @ W[p + "attn_k.weight"].T).reshape(T, nkv, hd)
            v = (x @ W[p + "attn_v.weight"].T).reshape(T, nkv, hd)
            q = self.apply_rope(q, cos, sin, rope_mode)
            k = self.apply_rope(k, cos, sin, rope_mode)
            att = np.empty((T, nh, hd), dtype=self.dtype)
            for j in range(nh):
                kj = k[:, j // group, :]
                vj = v[:, j // group, :]
                s = (q[:, j, :] @ kj.T) * scale + mask
                s = s - s.max(axis=-1, keepdims=True)
                e = np.exp(s)
                pr = e / e.sum(axis=-1, keepdims=True)
                att[:, j, :] = pr @ vj
            h = h + att.reshape(T, nh * hd) @ W[p + "attn_output.weight"].T
            x = self.rmsnorm(h, W[p + "ffn_norm.weight"])
            g = x @ W[p + "ffn_gate.weight"].T
            u = x @ W[p + "ffn_up.weight"].T
            silu = g / (1.0 + np.exp(-g))
            h = h + (silu * u) @ W[p + "ffn_down.weight"].T
        if last_only:
            h = h[-1:]
        h = self.rmsnorm(h, W["output_norm.weight"])
        head = W.get("output.weight", W["token_embd.weight"])
        return (h @ head.T).astype(np.float64)

    # ----------------------------------------------------------------------
    # tokens -> text (GPT-2 byte-level, good enough for reports)
    # ----------------------------------------------------------------------

    def decode(self, ids: list[int]) -> str:
        byte_dec = gpt2_unicode_to_byte()
        out = bytearray()
        for t in ids:
            s = self.tokens[t]
            if self.token_types[t] == 3:  # control token, e.g. <|im_end|>
                out += s.encode("utf-8")
                continue
            for ch in s:
                if ch in byte_dec:
                    out.append(byte_dec[ch])
                else:
                    out += ch.encode("utf-8")
        return out.decode("utf-8", errors="replace")


def gpt2_unicode_to_byte() -> dict[str, int]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def logsumexp(x: np.ndarray, axis=-1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def greedy(model: Model, ids: list[int], n: int, rope: str):
    seq = list(ids)
    gen, margins = [], []
    for _ in range(n):
        lg = model.forward(seq, rope, last_only=True)[0]
        order = np.argsort(-lg, kind="stable")
        t = int(order[0])
        gen.append(t)
        margins.append(float(lg[order[0]] - lg[order[1]]))
        seq.append(t)
        if t == EOS_ID:
            break
    return gen, margins


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--rope", choices=["normal", "neox"], default="normal")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    t0 = time.time()
    dtype = np.float64 if args.dtype == "float64" else np.float32
    model = Model(args.model, dtype)
    t_load = time.time() - t0
    print(f"loaded {len(model.w)} tensors in {t_load:.1f}s", file=sys.stderr)

    seq_out = {}
    for name, ids in SEQUENCES.items():
        lg = model.forward(ids, args.rope)  # (T, V) float64
        last = lg[-1]
        order = np.argsort(-last, kind="stable")
        top = [[int(i), float(last[i])] for i in order[:TOP_K]]
        srt = np.sort(lg, axis=-1)
        entry = {
            "ids": ids,
            "text": model.decode(ids),
            "last": {
                "top": top,
                "logsumexp": float(logsumexp(last)),
                "mean": float(last.mean()),
                "std": float(last.std()),
                "logits_f32le_b64": base64.b64encode(
                    last.astype("<f4").tobytes()
                ).decode("ascii"),
            },
            "positions": {
                "argmax": [int(x) for x in lg.argmax(axis=-1)],
                "max_logit": [float(x) for x in srt[:, -1]],
                "top2_gap": [float(x) for x in srt[:, -1] - srt[:, -2]],
                "logsumexp": [float(x) for x in logsumexp(lg)],
            },
        }
        if name in GREEDY:
            gen, margins = greedy(model, ids, GREEDY[name], args.rope)
            entry["greedy"] = {
                "max_new_tokens": GREEDY[name],
                "stop_id": EOS_ID,
                "ids": gen,
                "top2_gap": margins,
                "text": model.decode(gen),
            }
        seq_out[name] = entry
        print(f"[{name}] top5 last: "
              + ", ".join(f"{i}:{model.tokens[i]!r}={v:.4f}" for i, v in top[:5]),
              file=sys.stderr)
        if "greedy" in entry:
            print(f"[{name}] greedy: {entry['greedy']['ids']}", file=sys.stderr)
            print(f"[{name}] greedy text: {entry['greedy']['text']!r}", file=sys.stderr)

    runtime = time.time() - t0
    print(f"total runtime {runtime:.1f}s", file=sys.stderr)

    doc = {
        "generator": {
            "script": SCRIPT_PATH,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "model_file": os.path.basename(args.model),
            "model_sha256": sha256(args.model),
            "rope": {
                "convention": args.rope,
                "description": (
                    "ggml mode 0: adjacent pairs (x[2i], x[2i+1]) rotated by "
                    "pos * freq_base^(-2i/head_dim)"
                    if args.rope == "normal"
                    else "neox/HF rotate_half: pairs (x[i], x[i+head_dim/2])"
                ),
                "freq_base": model.rope_base,
            },
            "compute_dtype": args.dtype,
            "weights": "dequantized exactly to float32 with gguf.quants.dequantize",
            "rms_eps": model.eps,
            "lm_head": "output.weight" if "output.weight" in model.w else "token_embd.weight (tied)",
            "notes": (
                "floats are float64 values of the computation except "
                "last.logits_f32le_b64 (float32, little-endian, vocab-size values)"
            ),
        },
        "model": {
            "n_layer": model.n_layer,
            "n_embd": model.n_embd,
            "n_head": model.n_head,
            "n_head_kv": model.n_head_kv,
            "head_dim": model.head_dim,
            "n_ff": model.n_ff,
            "n_vocab": model.n_vocab,
            "n_ctx": model.n_ctx,
            "n_tensors": len(model.w),
        },
        "sequences": seq_out,
    }
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
