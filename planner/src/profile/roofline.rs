//! Analytic roofline profiles: TTFT, TPOT and KV capacity from a model architecture and a GPU
//! spec, for when no measured profile exists yet (measuring a 70B model on H100 takes about four
//! hours — paper §3.3).
//!
//! # Assumptions (each one is a knob in [`Deployment`] or [`GpuSpec`])
//! - **Time = max(compute, memory) + fixed overhead.** A kernel is bound either by FLOP/s or by
//!   HBM bandwidth; we take the larger of the two for the whole forward pass (no overlap modelled
//!   between layers), scaled by efficiency factors: achieved/peak FLOP/s (MFU) and achieved/peak
//!   bandwidth. Fixed per-pass overheads stand for kernel launches, scheduling and sampling.
//! - **FLOPs.** 2 FLOPs per weight per token for all linear layers (Q, K, V, O, gate, up, down and
//!   the LM head; the LM head runs for the last prompt token only during prefill). Causal
//!   attention during prefill adds `2·layers·(heads·head_dim)·ISL²` (QKᵀ and AV, halved by the
//!   mask). Each decode token adds `4·layers·(heads·head_dim)·context` for attention.
//! - **Bytes.** Every forward pass reads all weights once. Decode also reads the whole resident
//!   KV cache (`concurrency · context · kv_bytes_per_token`); prefill writes the prompt's KV.
//!   Activations are ignored (small next to weights and KV at these sizes).
//! - **Tensor parallelism** divides FLOPs and bytes evenly over `tp` GPUs and adds two all-reduces
//!   of the hidden state per layer over the interconnect (ring: `2·(tp−1)/tp` of the bytes).
//! - **KV capacity** of a decode instance: `tp · memory · utilisation − weights − tp · reserve`,
//!   in whole blocks. KV bytes per token = `2 · layers · kv_heads · head_dim · bytes_per_kv_elem`.
//! - No queueing: TTFT here is the latency of one request on an idle instance, which is what the
//!   sizing formulas expect (they model queueing themselves).
//!
//! The paper's preset (Llama-3.3-70B FP8 on H100, prefill TP1, decode TP2, block 128) gives
//! about 2040 KV blocks per decode instance, matching the 2040 hard-coded in the DOPD code.

use serde::{Deserialize, Serialize};

use super::{DecodeProfile, KvSpec, PerRole, PrefillProfile, Profile, ProfileError, invalid};

/// Transformer architecture (Llama family).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelArch {
    pub name: String,
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub kv_heads: u32,
    /// Defaults to `hidden / heads`.
    #[serde(default)]
    pub head_dim: Option<u32>,
    pub intermediate: u32,
    pub vocab: u32,
    /// Input embedding shared with the LM head (no separate LM-head weights).
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Bytes per weight as stored for inference (FP8: 1, BF16: 2, F32: 4, Q4_1: 0.625).
    pub bytes_per_weight: f64,
    /// Bytes per KV-cache element (BF16: 2).
    pub bytes_per_kv_elem: f64,
    /// Longest context served, tokens.
    pub max_context: u32,
}

impl ModelArch {
    pub fn head_dim(&self) -> u32 {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    /// Parameters of the transformer blocks (no embeddings).
    pub fn block_params(&self) -> f64 {
        let (h, hd) = (f64::from(self.hidden), f64::from(self.head_dim()));
        let q = f64::from(self.heads) * hd;
        let kv = f64::from(self.kv_heads) * hd;
        let attn = h * q + 2.0 * h * kv + q * h;
        let mlp = 3.0 * h * f64::from(self.intermediate);
        f64::from(self.layers) * (attn + mlp)
    }

    /// Parameters of the LM head matrix (used for compute even when tied).
    pub fn head_params(&self) -> f64 {
        f64::from(self.vocab) * f64::from(self.hidden)
    }

    /// Bytes of all weights as stored.
    pub fn weight_bytes(&self) -> f64 {
        let embeddings = if self.tied_embeddings { 1.0 } else { 2.0 } * self.head_params();
        (self.block_params() + embeddings) * self.bytes_per_weight
    }

    /// KV-cache bytes per token: K and V for every layer and KV head.
    pub fn kv_bytes_per_token(&self) -> f64 {
        2.0 * f64::from(self.layers)
            * f64::from(self.kv_heads)
            * f64::from(self.head_dim())
            * self.bytes_per_kv_elem
    }
}

/// One accelerator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    pub name: String,
    /// Dense peak FLOP/s for the weight data type in use.
    pub peak_flops: f64,
    /// Peak memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
    /// Interconnect bandwidth per GPU for tensor-parallel all-reduces, bytes/s.
    pub interconnect_bandwidth: f64,
}

/// How the model is deployed and how efficiently the hardware is used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub prefill_tp: u32,
    pub decode_tp: u32,
    /// Achieved / peak FLOP/s during prefill (MFU).
    pub prefill_compute_efficiency: f64,
    /// Achieved / peak FLOP/s during decode.
    pub decode_compute_efficiency: f64,
    /// Achieved / peak memory bandwidth.
    pub bandwidth_efficiency: f64,
    /// Fraction of device memory the engine may use on a decode instance.
    pub decode_memory_utilization: f64,
    /// Bytes per GPU kept for activations, CUDA graphs and workspace.
    pub reserve_bytes_per_gpu: f64,
    /// Fixed seconds per prefill (launch, scheduling, sampling).
    pub prefill_overhead_s: f64,
    /// Fixed seconds per decode step.
    pub decode_step_overhead_s: f64,
    /// Bytes per activation element for TP all-reduces.
    pub bytes_per_activation: f64,
    pub block_size: u32,
    /// Start-up seconds per role (paper §6: P ≈ 30 s, D ≈ 1.5× that).
    pub startup_s: PerRole<f64>,
}

/// Everything the generator needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RooflineSpec {
    pub model: ModelArch,
    pub gpu: GpuSpec,
    pub deployment: Deployment,
}

/// Names accepted by [`RooflineSpec::preset`].
pub const PRESETS: [&str; 3] = [
    "llama-3.3-70b-fp8-h100",
    "smollm2-135m-h100",
    "smollm2-135m-cpu",
];

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

impl RooflineSpec {
    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "llama-3.3-70b-fp8-h100" => Some(Self::llama33_70b_fp8_h100()),
            "smollm2-135m-h100" => Some(Self::smollm2_135m_h100()),
            "smollm2-135m-cpu" => Some(Self::smollm2_135m_cpu()),
            _ => None,
        }
    }

    /// H100 SXM 80 GB: 1979 TFLOP/s dense FP8, 3.35 TB/s HBM3, 450 GB/s NVLink per direction
    /// (NVIDIA H100 datasheet).
    pub fn h100_sxm() -> GpuSpec {
        GpuSpec {
            name: "H100-SXM-80GB".into(),
            peak_flops: 1979e12,
            memory_bandwidth: 3.35e12,
            memory_bytes: 80.0 * GIB,
            interconnect_bandwidth: 450e9,
        }
    }

    /// The paper's setting: Llama-3.3-70B (FP8 weights, BF16 KV cache) on H100, prefill TP1,
    /// decode TP2, KV block 128, start-up 30 s / 45 s.
    pub fn llama33_70b_fp8_h100() -> Self {
        Self {
            model: ModelArch {
                name: "Llama-3.3-70B-Instruct-FP8".into(),
                layers: 80,
                hidden: 8192,
                heads: 64,
                kv_heads: 8,
                head_dim: Some(128),
                intermediate: 28672,
                vocab: 128_256,
                tied_embeddings: false,
                bytes_per_weight: 1.0,
                bytes_per_kv_elem: 2.0,
                max_context: 16384,
            },
            gpu: Self::h100_sxm(),
            deployment: Deployment {
                prefill_tp: 1,
                decode_tp: 2,
                prefill_compute_efficiency: 0.6,
                decode_compute_efficiency: 0.5,
                bandwidth_efficiency: 0.8,
                decode_memory_utilization: 0.96,
                reserve_bytes_per_gpu: 4.0 * GIB,
                prefill_overhead_s: 0.010,
                decode_step_overhead_s: 0.003,
                bytes_per_activation: 2.0,
                block_size: 128,
                startup_s: PerRole {
                    prefill: 30.0,
                    decode: 45.0,
                },
            },
        }
    }

    fn smollm2_arch(bytes_per_weight: f64, bytes_per_kv_elem: f64) -> ModelArch {
        ModelArch {
            name: "SmolLM2-135M-Instruct".into(),
            layers: 30,
            hidden: 576,
            heads: 9,
            kv_heads: 3,
            head_dim: Some(64),
            intermediate: 1536,
            vocab: 49152,
            tied_embeddings: true,
            bytes_per_weight,
            bytes_per_kv_elem,
            max_context: 8192,
        }
    }

    /// SmolLM2-135M in BF16 on one H100 per role. A model this small is launch-bound: the
    /// overheads dominate.
    pub fn smollm2_135m_h100() -> Self {
        let mut gpu = Self::h100_sxm();
        gpu.peak_flops = 989e12; // dense BF16
        Self {
            model: Self::smollm2_arch(2.0, 2.0),
            gpu,
            deployment: Deployment {
                prefill_tp: 1,
                decode_tp: 1,
                prefill_compute_efficiency: 0.3,
                decode_compute_efficiency: 0.2,
                bandwidth_efficiency: 0.6,
                decode_memory_utilization: 0.9,
                reserve_bytes_per_gpu: 2.0 * GIB,
                prefill_overhead_s: 0.004,
                decode_step_overhead_s: 0.004,
                bytes_per_activation: 2.0,
                block_size: 16,
                startup_s: PerRole {
                    prefill: 10.0,
                    decode: 15.0,
                },
            },
        }
    }

    /// SmolLM2-135M on a 2-core CPU with F32 weights (the local-mode worker dequantizes the
    /// GGUF to F32): roughly 100 GFLOP/s peak, 20 GB/s memory, 8 GiB set aside for the engine.
    pub fn smollm2_135m_cpu() -> Self {
        Self {
            model: Self::smollm2_arch(4.0, 4.0),
            gpu: GpuSpec {
                name: "cpu-2core".into(),
                peak_flops: 100e9,
                memory_bandwidth: 20e9,
                memory_bytes: 8.0 * GIB,
                interconnect_bandwidth: 10e9,
            },
            deployment: Deployment {
                prefill_tp: 1,
                decode_tp: 1,
                prefill_compute_efficiency: 0.3,
                decode_compute_efficiency: 0.2,
                bandwidth_efficiency: 0.5,
                decode_memory_utilization: 0.5,
                reserve_bytes_per_gpu: 0.5 * GIB,
                prefill_overhead_s: 0.005,
                decode_step_overhead_s: 0.002,
                bytes_per_activation: 4.0,
                block_size: 16,
                startup_s: PerRole {
                    prefill: 2.0,
                    decode: 2.0,
                },
            },
        }
    }

    fn allreduce_s(&self, tokens: f64, tp: u32) -> f64 {
        if tp <= 1 {
            return 0.0;
        }
        let tpf = f64::from(tp);
        let bytes = 2.0
            * f64::from(self.model.layers)
            * tokens
            * f64::from(self.model.hidden)
            * self.deployment.bytes_per_activation;
        bytes * 2.0 * (tpf - 1.0) / tpf / self.gpu.interconnect_bandwidth
    }

    /// Prefill latency of one request of `isl` tokens on an idle prefill instance.
    pub fn prefill_time(&self, isl: f64) -> f64 {
        let m = &self.model;
        let d = &self.deployment;
        let tp = f64::from(d.prefill_tp);
        let attn_width = f64::from(m.heads) * f64::from(m.head_dim());
        let flops = 2.0 * m.block_params() * isl
            + 2.0 * f64::from(m.layers) * attn_width * isl * isl
            + 2.0 * m.head_params();
        let bytes = m.weight_bytes() + isl * m.kv_bytes_per_token();
        let compute = flops / (tp * self.gpu.peak_flops * d.prefill_compute_efficiency);
        let memory = bytes / (tp * self.gpu.memory_bandwidth * d.bandwidth_efficiency);
        compute.max(memory) + self.allreduce_s(isl, d.prefill_tp) + d.prefill_overhead_s
    }

    /// Decode step time with `concurrency` sequences of mean context `context`.
    pub fn decode_step_time(&self, concurrency: f64, context: f64) -> f64 {
        let m = &self.model;
        let d = &self.deployment;
        let tp = f64::from(d.decode_tp);
        let attn_width = f64::from(m.heads) * f64::from(m.head_dim());
        let flops = concurrency
            * (2.0 * (m.block_params() + m.head_params())
                + 4.0 * f64::from(m.layers) * attn_width * context);
        let bytes = m.weight_bytes() + concurrency * context * m.kv_bytes_per_token();
        let compute = flops / (tp * self.gpu.peak_flops * d.decode_compute_efficiency);
        let memory = bytes / (tp * self.gpu.memory_bandwidth * d.bandwidth_efficiency);
        compute.max(memory) + self.allreduce_s(concurrency, d.decode_tp) + d.decode_step_overhead_s
    }

    /// KV blocks that fit on one decode instance.
    pub fn kv_blocks(&self) -> Result<u64, ProfileError> {
        let d = &self.deployment;
        let tp = f64::from(d.decode_tp);
        let free = tp * self.gpu.memory_bytes * d.decode_memory_utilization
            - self.model.weight_bytes()
            - tp * d.reserve_bytes_per_gpu;
        let per_block = self.model.kv_bytes_per_token() * f64::from(d.block_size);
        let blocks = (free / per_block).floor();
        if !(blocks >= 1.0) {
            return Err(invalid(
                "deployment.decode_tp",
                d.decode_tp,
                &format!(
                    "{} ({:.1} GiB of weights) leaves no room for a KV block on {} x {}",
                    self.model.name,
                    self.model.weight_bytes() / GIB,
                    d.decode_tp,
                    self.gpu.name
                ),
            ));
        }
        Ok(blocks as u64)
    }

    fn validate(&self) -> Result<(), ProfileError> {
        let m = &self.model;
        for (field, v) in [
            ("model.layers", m.layers),
            ("model.hidden", m.hidden),
            ("model.heads", m.heads),
            ("model.kv_heads", m.kv_heads),
            ("model.intermediate", m.intermediate),
            ("model.vocab", m.vocab),
            ("model.max_context", m.max_context),
            ("deployment.prefill_tp", self.deployment.prefill_tp),
            ("deployment.decode_tp", self.deployment.decode_tp),
            ("deployment.block_size", self.deployment.block_size),
        ] {
            if v == 0 {
                return Err(invalid(field, v, "must be >= 1"));
            }
        }
        let d = &self.deployment;
        for (field, v) in [
            ("model.bytes_per_weight", m.bytes_per_weight),
            ("model.bytes_per_kv_elem", m.bytes_per_kv_elem),
            ("gpu.peak_flops", self.gpu.peak_flops),
            ("gpu.memory_bandwidth", self.gpu.memory_bandwidth),
            ("gpu.memory_bytes", self.gpu.memory_bytes),
            (
                "gpu.interconnect_bandwidth",
                self.gpu.interconnect_bandwidth,
            ),
            ("deployment.bytes_per_activation", d.bytes_per_activation),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(field, v, "must be finite and > 0"));
            }
        }
        for (field, v) in [
            (
                "deployment.prefill_compute_efficiency",
                d.prefill_compute_efficiency,
            ),
            (
                "deployment.decode_compute_efficiency",
                d.decode_compute_efficiency,
            ),
            ("deployment.bandwidth_efficiency", d.bandwidth_efficiency),
            (
                "deployment.decode_memory_utilization",
                d.decode_memory_utilization,
            ),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(invalid(field, v, "must be in (0, 1]"));
            }
        }
        Ok(())
    }

    /// Builds the profile: TTFT at powers of two up to the max context, TPOT on a grid of
    /// concurrency (powers of two up to what the KV cache can hold at the shortest context) by
    /// context (powers of two up to the max context).
    pub fn build(&self) -> Result<Profile, ProfileError> {
        self.validate()?;
        let blocks = self.kv_blocks()?;
        let max_ctx = f64::from(self.model.max_context);
        let grid = |lo: f64, hi: f64| {
            let mut v = Vec::new();
            let mut x = lo;
            while x < hi {
                v.push(x);
                x *= 2.0;
            }
            v.push(hi);
            v
        };
        let isl = grid(16.0, max_ctx);
        let ttft_s = isl.iter().map(|&s| self.prefill_time(s)).collect();
        let context = grid(128.0_f64.min(max_ctx), max_ctx);
        let tokens = blocks as f64 * f64::from(self.deployment.block_size);
        let max_conc = (tokens / context[0]).floor().max(1.0);
        let concurrency = grid(1.0, max_conc);
        let tpot_s = concurrency
            .iter()
            .map(|&c| {
                context
                    .iter()
                    .map(|&l| self.decode_step_time(c, l))
                    .collect()
            })
            .collect();
        let profile = Profile {
            name: format!("{}-{}", self.model.name, self.gpu.name).to_lowercase(),
            source: "roofline".into(),
            prefill: PrefillProfile { isl, ttft_s },
            decode: DecodeProfile {
                concurrency,
                context,
                tpot_s,
            },
            kv: KvSpec {
                blocks,
                block_size: self.deployment.block_size,
                bytes_per_token: self.model.kv_bytes_per_token().round() as u64,
            },
            gpus: PerRole {
                prefill: self.deployment.prefill_tp,
                decode: self.deployment.decode_tp,
            },
            startup_s: self.deployment.startup_s,
        };
        profile.validate()?;
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_70b_kv_bytes_match_the_paper() {
        // Paper §3.2 note: 80 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 327,680 B.
        assert_eq!(
            RooflineSpec::llama33_70b_fp8_h100()
                .model
                .kv_bytes_per_token(),
            327_680.0
        );
    }

    #[test]
    fn llama_70b_on_tp2_h100_holds_about_2040_blocks() {
        let blocks = RooflineSpec::llama33_70b_fp8_h100()
            .kv_blocks()
            .expect("fits");
        assert!((1900..=2200).contains(&blocks), "{blocks}");
    }

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        let l = RooflineSpec::llama33_70b_fp8_h100().model;
        let total = l.block_params() + 2.0 * l.head_params();
        assert!((total / 1e9 - 70.6).abs() < 0.5, "{total}");
        let s = RooflineSpec::smollm2_135m_cpu().model;
        let total = s.block_params() + s.head_params();
        assert!((total / 1e6 - 134.5).abs() < 1.5, "{total}");
    }

    #[test]
    fn every_preset_builds_a_valid_monotone_profile() {
        for name in PRESETS {
            let p = RooflineSpec::preset(name)
                .expect("preset")
                .build()
                .expect(name);
            assert!(p.ttft(1000.0) < p.ttft(8000.0), "{name}");
            assert!(p.tpot(1.0, 1000.0) <= p.tpot(64.0, 1000.0), "{name}");
            assert!(p.tpot(8.0, 512.0) <= p.tpot(8.0, 4096.0), "{name}");
        }
    }

    #[test]
    fn paper_setting_latencies_are_in_the_published_range() {
        let p = RooflineSpec::llama33_70b_fp8_h100()
            .build()
            .expect("builds");
        let ttft = p.ttft(1000.0);
        assert!((0.05..0.4).contains(&ttft), "TTFT(1000) = {ttft}");
        let tpot = p.tpot(226.0, 1122.5);
        assert!((0.015..0.08).contains(&tpot), "TPOT = {tpot}");
    }

    #[test]
    fn a_model_that_does_not_fit_is_an_error() {
        let mut s = RooflineSpec::llama33_70b_fp8_h100();
        s.model.bytes_per_weight = 4.0;
        let e = s.build().expect_err("280 GB on 2 GPUs").to_string();
        assert!(e.contains("deployment.decode_tp"), "{e}");
    }
}
