//! Performance profile of a model on its hardware: what the sizing formulas and the simulator
//! need to know about latency and memory.
//!
//! A [`Profile`] holds
//! - TTFT(ISL): prefill latency of one request, sampled at increasing ISLs, interpolated with a
//!   monotone cubic (PCHIP) and clamped to the profiled range;
//! - TPOT(concurrency, context): decode step time on a grid, interpolated bilinearly and clamped;
//! - KV capacity of one decode instance (blocks × block size) and KV bytes per token;
//! - GPUs per prefill and per decode instance, and instance start-up time per role.
//!
//! Profiles load from YAML or JSON and are validated on load; every error names the field and the
//! value that is wrong. [`roofline`] builds a profile analytically from a model architecture and a
//! GPU spec when no measured profile exists.

pub mod roofline;

use serde::{Deserialize, Serialize};

/// What an instance does: the one role type of the whole system (planner, simulator, router,
/// operator and worker all use it; the gRPC Health answer carries [`Role::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Prefills prompts and hands their KV blocks to a decode instance.
    Prefill,
    /// Decodes: takes prefilled sequences (and prefills short prompts itself).
    Decode,
    /// Prefills and decodes its own requests (aggregated serving). The planner sizes it as a
    /// decode instance.
    Mixed,
}

impl Role {
    /// The roles the planner sizes, each with its own count.
    pub const SIZED: [Self; 2] = [Self::Prefill, Self::Decode];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
            Self::Mixed => "mixed",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Self::Prefill),
            "decode" => Ok(Self::Decode),
            "mixed" => Ok(Self::Mixed),
            _ => Err(format!(
                "unknown role {s:?} (expected prefill, decode or mixed)"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TTFT samples of one prefill instance (no queueing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillProfile {
    /// Input lengths in tokens, strictly increasing.
    pub isl: Vec<f64>,
    /// Time to first token in seconds at each ISL, non-decreasing.
    pub ttft_s: Vec<f64>,
}

/// TPOT grid of one decode instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeProfile {
    /// Concurrent sequences, strictly increasing, `>= 1`.
    pub concurrency: Vec<f64>,
    /// Mean resident context per sequence in tokens, strictly increasing.
    pub context: Vec<f64>,
    /// `tpot_s[i][j]`: seconds per output token at `concurrency[i]` and `context[j]`.
    pub tpot_s: Vec<Vec<f64>>,
}

/// KV cache geometry of one decode instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSpec {
    /// KV blocks available on one decode instance (`M_KV`).
    pub blocks: u64,
    /// Tokens per block (`b`).
    pub block_size: u32,
    /// KV bytes per token (all layers, K and V), for transfer-time estimates.
    pub bytes_per_token: u64,
}

impl KvSpec {
    /// Total tokens one decode instance can hold.
    pub fn tokens(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// A per-role pair of values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerRole<T> {
    pub prefill: T,
    pub decode: T,
}

impl<T: Copy> PerRole<T> {
    /// The value of `role` (a mixed instance's is decode's).
    pub fn get(&self, role: Role) -> T {
        match role {
            Role::Prefill => self.prefill,
            Role::Decode | Role::Mixed => self.decode,
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short identifier, e.g. `llama-3.3-70b-fp8-h100`.
    pub name: String,
    /// Where the numbers come from (`measured`, `roofline`, ...), free text.
    #[serde(default)]
    pub source: String,
    pub prefill: PrefillProfile,
    pub decode: DecodeProfile,
    pub kv: KvSpec,
    /// GPUs per instance (the tensor-parallel degree of each role).
    pub gpus: PerRole<u32>,
    /// Seconds from "start an instance" to "serving".
    pub startup_s: PerRole<f64>,
}

/// A profile that failed to load or validate.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot parse profile as {format}: {message}")]
    Parse {
        format: &'static str,
        message: String,
    },
    #[error("profile field `{field}` = {value}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

fn invalid(field: impl Into<String>, value: impl std::fmt::Display, reason: &str) -> ProfileError {
    ProfileError::Invalid {
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn check_axis(field: &str, xs: &[f64], min: f64) -> Result<(), ProfileError> {
    if xs.is_empty() {
        return Err(invalid(field, "[]", "needs at least one sample"));
    }
    for (i, &x) in xs.iter().enumerate() {
        if !x.is_finite() || x < min {
            return Err(invalid(
                format!("{field}[{i}]"),
                x,
                &format!("must be finite and >= {min}"),
            ));
        }
        if i > 0 && x <= xs[i - 1] {
            return Err(invalid(
                format!("{field}[{i}]"),
                x,
                "must be strictly increasing",
            ));
        }
    }
    Ok(())
}

fn check_positive(field: String, v: f64) -> Result<(), ProfileError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, v, "must be finite and > 0"))
    }
}

impl Profile {
    /// Parses and validates a YAML profile.
    pub fn from_yaml(s: &str) -> Result<Self, ProfileError> {
        let p: Self = serde_yaml::from_str(s).map_err(|e| ProfileError::Parse {
            format: "YAML",
            message: e.to_string(),
        })?;
        p.validate()?;
        Ok(p)
    }

    /// Parses and validates a JSON profile.
    pub fn from_json(s: &str) -> Result<Self, ProfileError> {
        let p: Self = serde_json::from_str(s).map_err(|e| ProfileError::Parse {
            format: "JSON",
            message: e.to_string(),
        })?;
        p.validate()?;
        Ok(p)
    }

    /// Parses JSON when the text starts with `{`, YAML otherwise.
    pub fn parse(s: &str) -> Result<Self, ProfileError> {
        if s.trim_start().starts_with('{') {
            Self::from_json(s)
        } else {
            Self::from_yaml(s)
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks shapes, ranges and monotonicity.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "\"\"", "must not be empty"));
        }
        let pf = &self.prefill;
        check_axis("prefill.isl", &pf.isl, 1.0)?;
        if pf.ttft_s.len() != pf.isl.len() {
            return Err(invalid(
                "prefill.ttft_s",
                format!("{} samples", pf.ttft_s.len()),
                &format!("must have one sample per ISL ({})", pf.isl.len()),
            ));
        }
        for (i, &t) in pf.ttft_s.iter().enumerate() {
            check_positive(format!("prefill.ttft_s[{i}]"), t)?;
            if i > 0 && t < pf.ttft_s[i - 1] {
                return Err(invalid(
                    format!("prefill.ttft_s[{i}]"),
                    t,
                    "must not decrease as ISL grows (TTFT is monotone in prompt length)",
                ));
            }
        }
        let d = &self.decode;
        check_axis("decode.concurrency", &d.concurrency, 1.0)?;
        check_axis("decode.context", &d.context, 1.0)?;
        if d.tpot_s.len() != d.concurrency.len() {
            return Err(invalid(
                "decode.tpot_s",
                format!("{} rows", d.tpot_s.len()),
                &format!(
                    "must have one row per concurrency value ({})",
                    d.concurrency.len()
                ),
            ));
        }
        for (i, row) in d.tpot_s.iter().enumerate() {
            if row.len() != d.context.len() {
                return Err(invalid(
                    format!("decode.tpot_s[{i}]"),
                    format!("{} columns", row.len()),
                    &format!(
                        "must have one column per context value ({})",
                        d.context.len()
                    ),
                ));
            }
            for (j, &t) in row.iter().enumerate() {
                check_positive(format!("decode.tpot_s[{i}][{j}]"), t)?;
            }
        }
        if self.kv.blocks == 0 || self.kv.blocks > 1 << 40 {
            return Err(invalid("kv.blocks", self.kv.blocks, "must be in 1..=2^40"));
        }
        if self.kv.block_size == 0 {
            return Err(invalid("kv.block_size", 0, "must be >= 1"));
        }
        if self.kv.bytes_per_token == 0 {
            return Err(invalid("kv.bytes_per_token", 0, "must be >= 1"));
        }
        for role in [Role::Prefill, Role::Decode] {
            if self.gpus.get(role) == 0 {
                return Err(invalid(format!("gpus.{role}"), 0, "must be >= 1"));
            }
            let s = self.startup_s.get(role);
            if !s.is_finite() || s < 0.0 {
                return Err(invalid(
                    format!("startup_s.{role}"),
                    s,
                    "must be finite and >= 0",
                ));
            }
        }
        Ok(())
    }

    /// Prefill latency of one request of `isl` tokens (clamped to the profiled range).
    pub fn ttft(&self, isl: f64) -> f64 {
        pchip(&self.prefill.isl, &self.prefill.ttft_s, isl)
    }

    /// Decode seconds per output token at `concurrency` sequences of mean context `context`
    /// (both clamped to the grid).
    pub fn tpot(&self, concurrency: f64, context: f64) -> f64 {
        let d = &self.decode;
        let (i0, i1, fi) = bracket(&d.concurrency, concurrency);
        let (j0, j1, fj) = bracket(&d.context, context);
        let g = |i: usize, j: usize| d.tpot_s[i][j];
        let a = g(i0, j0) + fj * (g(i0, j1) - g(i0, j0));
        let b = g(i1, j0) + fj * (g(i1, j1) - g(i1, j0));
        a + fi * (b - a)
    }

    /// Largest ISL profiled (longer prompts are clamped).
    pub fn max_isl(&self) -> f64 {
        self.prefill.isl.last().copied().unwrap_or(0.0)
    }

    /// A flat profile: constant TTFT and TPOT. Handy for the paper's worked example and tests.
    pub fn constant_latency(ttft_s: f64, tpot_s: f64, kv_blocks: u64, block_size: u32) -> Self {
        Self {
            name: "constant".into(),
            source: "constant".into(),
            prefill: PrefillProfile {
                isl: vec![1.0],
                ttft_s: vec![ttft_s],
            },
            decode: DecodeProfile {
                concurrency: vec![1.0],
                context: vec![1.0],
                tpot_s: vec![vec![tpot_s]],
            },
            kv: KvSpec {
                blocks: kv_blocks,
                block_size,
                bytes_per_token: 1,
            },
            gpus: PerRole {
                prefill: 1,
                decode: 2,
            },
            startup_s: PerRole {
                prefill: 30.0,
                decode: 45.0,
            },
        }
    }
}

/// Index pair and weight of `x` on a sorted axis, clamped to its ends.
fn bracket(xs: &[f64], x: f64) -> (usize, usize, f64) {
    let n = xs.len();
    if n == 1 || !(x > xs[0]) {
        return (0, 0, 0.0);
    }
    if x >= xs[n - 1] {
        return (n - 1, n - 1, 0.0);
    }
    let hi = xs.partition_point(|v| *v <= x).min(n - 1);
    let lo = hi - 1;
    (lo, hi, (x - xs[lo]) / (xs[hi] - xs[lo]))
}

/// Monotone piecewise-cubic Hermite interpolation (Fritsch–Carlson, the PCHIP of scipy/MATLAB),
/// clamped to `[xs[0], xs[n-1]]`. Monotone data give a monotone curve without overshoot, which a
/// plain cubic spline (the DOPD code's `interp1d(kind="cubic")`) does not guarantee.
pub fn pchip(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    let n = xs.len();
    if n == 1 {
        return ys[0];
    }
    let (k, _, _) = bracket(xs, x);
    if !(x > xs[0]) {
        return ys[0];
    }
    if x >= xs[n - 1] {
        return ys[n - 1];
    }
    let h: Vec<f64> = xs.windows(2).map(|w| w[1] - w[0]).collect();
    let delta: Vec<f64> = (0..n - 1).map(|i| (ys[i + 1] - ys[i]) / h[i]).collect();
    let slope = |i: usize| -> f64 {
        if n == 2 {
            return delta[0];
        }
        if i == 0 || i == n - 1 {
            let (h0, h1, d0, d1) = if i == 0 {
                (h[0], h[1], delta[0], delta[1])
            } else {
                (h[n - 2], h[n - 3], delta[n - 2], delta[n - 3])
            };
            let m = ((2.0 * h0 + h1) * d0 - h0 * d1) / (h0 + h1);
            if m.signum() != d0.signum() || d0 == 0.0 {
                0.0
            } else if d0.signum() != d1.signum() && m.abs() > 3.0 * d0.abs() {
                3.0 * d0
            } else {
                m
            }
        } else if delta[i - 1] * delta[i] <= 0.0 {
            0.0
        } else {
            let w1 = 2.0 * h[i] + h[i - 1];
            let w2 = h[i] + 2.0 * h[i - 1];
            (w1 + w2) / (w1 / delta[i - 1] + w2 / delta[i])
        }
    };
    let (m0, m1) = (slope(k), slope(k + 1));
    let t = (x - xs[k]) / h[k];
    let (t2, t3) = (t * t, t * t * t);
    let h00 = 2.0 * t3 - 3.0 * t2 + 1.0;
    let h10 = t3 - 2.0 * t2 + t;
    let h01 = -2.0 * t3 + 3.0 * t2;
    let h11 = t3 - t2;
    h00 * ys[k] + h10 * h[k] * m0 + h01 * ys[k + 1] + h11 * h[k] * m1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            name: "test".into(),
            source: String::new(),
            prefill: PrefillProfile {
                isl: vec![128.0, 1024.0, 8192.0],
                ttft_s: vec![0.02, 0.1, 1.2],
            },
            decode: DecodeProfile {
                concurrency: vec![1.0, 64.0],
                context: vec![512.0, 4096.0],
                tpot_s: vec![vec![0.01, 0.012], vec![0.02, 0.05]],
            },
            kv: KvSpec {
                blocks: 2040,
                block_size: 128,
                bytes_per_token: 327_680,
            },
            gpus: PerRole {
                prefill: 1,
                decode: 2,
            },
            startup_s: PerRole {
                prefill: 30.0,
                decode: 45.0,
            },
        }
    }

    #[test]
    fn ttft_is_clamped_and_exact_at_samples() {
        let p = sample();
        assert_eq!(p.ttft(1.0), 0.02);
        assert_eq!(p.ttft(1e9), 1.2);
        assert!((p.ttft(1024.0) - 0.1).abs() < 1e-12);
        let mid = p.ttft(3000.0);
        assert!(mid > 0.1 && mid < 1.2);
    }

    #[test]
    fn ttft_interpolation_is_monotone() {
        let p = sample();
        let mut prev = 0.0;
        for isl in (100..9000).step_by(7) {
            let t = p.ttft(f64::from(isl));
            assert!(t >= prev - 1e-15, "isl {isl}: {t} < {prev}");
            prev = t;
        }
    }

    #[test]
    fn tpot_is_bilinear_and_clamped() {
        let p = sample();
        assert_eq!(p.tpot(0.0, 0.0), 0.01);
        assert_eq!(p.tpot(1e6, 1e6), 0.05);
        let mid = p.tpot(32.5, 2304.0);
        assert!(
            (mid - (0.01 + 0.012 + 0.02 + 0.05) / 4.0).abs() < 1e-12,
            "{mid}"
        );
    }

    #[test]
    fn yaml_and_json_round_trip() {
        let p = sample();
        assert_eq!(Profile::from_yaml(&p.to_yaml()).expect("valid"), p);
        assert_eq!(Profile::parse(&p.to_json()).expect("valid"), p);
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let mut p = sample();
        p.prefill.ttft_s[2] = 0.05;
        let e = p.validate().expect_err("decreasing TTFT").to_string();
        assert!(e.contains("prefill.ttft_s[2]") && e.contains("0.05"), "{e}");

        let mut p = sample();
        p.decode.tpot_s[1].pop();
        let e = p.validate().expect_err("ragged grid").to_string();
        assert!(e.contains("decode.tpot_s[1]"), "{e}");

        let mut p = sample();
        p.decode.context = vec![4096.0, 512.0];
        let e = p.validate().expect_err("unsorted axis").to_string();
        assert!(
            e.contains("decode.context[1]") && e.contains("increasing"),
            "{e}"
        );

        let mut p = sample();
        p.kv.blocks = 0;
        assert!(
            p.validate()
                .expect_err("no blocks")
                .to_string()
                .contains("kv.blocks")
        );

        let mut p = sample();
        p.startup_s.decode = f64::NAN;
        assert!(
            p.validate()
                .expect_err("nan")
                .to_string()
                .contains("startup_s.decode")
        );
    }

    #[test]
    fn syntax_errors_are_reported_not_panicked() {
        let e = Profile::from_yaml("name: [unclosed").expect_err("bad yaml");
        assert!(matches!(e, ProfileError::Parse { format: "YAML", .. }));
        let e = Profile::from_yaml("name: x\nbogus: 1\n").expect_err("unknown field");
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
