//! Next-token sampling (greedy, temperature, top-k, top-p) with a seeded generator, and stop
//! conditions (EOS, token budget, stop strings).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings of one request (OpenAI's names).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A per-request sampler. The random draw for the `n`-th token depends only on the seed and `n`,
/// so a seeded request is reproducible token for token, and a decode worker that continues a
/// remote prefill ([`Sampler::at`]) draws exactly what one worker doing both would.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// Tokens sampled so far.
    n: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::at(params, 0)
    }

    /// A sampler that has already sampled `n` tokens.
    pub fn at(params: SamplingParams, n: u64) -> Self {
        Self { params, n }
    }

    /// Picks the next token from `logits`. Non-finite logits are never picked.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let greedy = || {
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                    if v > b.1 { (i, v) } else { b }
                })
                .0 as u32
        };
        let p = &self.params;
        let n = self.n;
        self.n += 1;
        if !(p.temperature > 0.0) {
            return greedy();
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v / p.temperature))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    acc += q;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut u: f32 = rng.random();
        for (i, q) in probs.iter().enumerate() {
            if u < *q {
                return cand[i].0;
            }
            u -= q;
        }
        cand[probs.len() - 1].0
    }
}

/// Why generation stopped (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// The token budget (`max_tokens`).
    Length,
}

/// Stop conditions of one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopConditions {
    pub eos: Vec<u32>,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
}

impl StopConditions {
    /// Checks the text generated so far after token `last` (the `n`-th generated token). Returns
    /// the reason to stop and, for a stop string, the text cut before it.
    pub fn check(&self, last: u32, n: usize, text: &str) -> Option<(FinishReason, Option<String>)> {
        if self.eos.contains(&last) {
            return Some((FinishReason::Stop, None));
        }
        if let Some(pos) = self
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            return Some((FinishReason::Stop, Some(text[..pos].to_string())));
        }
        (self.max_tokens > 0 && n >= self.max_tokens).then_some((FinishReason::Length, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_finite_logit() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, f32::NAN, 3.0, 2.9]), 2);
        assert_eq!(s.sample(&[f32::INFINITY, 1.0]), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        assert_ne!(
            run(&p),
            run(&SamplingParams {
                seed: 8,
                ..p.clone()
            })
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let logits = [5.0, 4.0, 1.0, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 1,
            ..Default::default()
        });
        assert!((0..200).map(|_| s.sample(&logits)).all(|t| t < 2));
        // The first token alone holds ~70% of the mass: top_p 0.5 keeps only it.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        assert!((0..200).map(|_| s.sample(&logits)).all(|t| t == 0));
        // With everything allowed, sampling does visit other tokens.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 1,
            ..Default::default()
        });
        assert!((0..200).map(|_| s.sample(&logits)).any(|t| t != 0));
    }

    #[test]
    fn stop_conditions() {
        let c = StopConditions {
            eos: vec![2],
            max_tokens: 3,
            stop_strings: vec!["\n\n".into()],
        };
        assert_eq!(c.check(2, 1, "Hi"), Some((FinishReason::Stop, None)));
        assert_eq!(
            c.check(5, 2, "Hi\n\nthere"),
            Some((FinishReason::Stop, Some("Hi".into())))
        );
        assert_eq!(
            c.check(5, 3, "Hi there"),
            Some((FinishReason::Length, None))
        );
        assert_eq!(c.check(5, 2, "Hi"), None);
    }
}
