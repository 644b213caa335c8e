//! Distributions the sizing integrates over: the standard normal, log-normal lengths, and
//! measured prompt-length histograms.

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 through erf; |error| < 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-z * z).exp();
    let erf = if z >= 0.0 { y } else { -y };
    0.5 * (1.0 + erf)
}

/// Standard normal quantile (Acklam's rational approximation; relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// A log-normal length distribution with a given mean and squared coefficient of variation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lengths {
    mean: f64,
    mu: f64,
    sigma: f64,
}

impl Lengths {
    pub fn new(mean: f64, cv2: f64) -> Self {
        let mean = if mean.is_finite() && mean > 0.0 {
            mean
        } else {
            1.0
        };
        let s2 = if cv2.is_finite() && cv2 > 0.0 {
            (1.0 + cv2.min(100.0)).ln()
        } else {
            0.0
        };
        Self {
            mean,
            mu: mean.ln() - s2 / 2.0,
            sigma: s2.sqrt(),
        }
    }

    /// `P(X <= x)`.
    pub fn cdf(&self, x: f64) -> f64 {
        if x <= 0.0 {
            return 0.0;
        }
        if self.sigma == 0.0 {
            return if self.mean <= x { 1.0 } else { 0.0 };
        }
        normal_cdf((x.ln() - self.mu) / self.sigma)
    }

    /// `E[X; X <= x]` (the partial mean).
    pub fn partial_mean(&self, x: f64) -> f64 {
        if x <= 0.0 {
            return 0.0;
        }
        if self.sigma == 0.0 {
            return if self.mean <= x { self.mean } else { 0.0 };
        }
        self.mean * normal_cdf((x.ln() - self.mu - self.sigma * self.sigma) / self.sigma)
    }

    /// The `q` quantile.
    pub fn quantile(&self, q: f64) -> f64 {
        (self.mu + self.sigma * normal_quantile(q)).exp()
    }

    /// `n` points of equal probability above `from` (their quantiles' midpoints), for averaging
    /// over the distribution of the lengths above `from`.
    pub fn points_above(&self, from: f64, n: usize) -> Vec<f64> {
        let lo = self.cdf(from);
        (0..n)
            .map(|i| self.quantile(lo + (1.0 - lo) * (i as f64 + 0.5) / n as f64))
            .collect()
    }
}

/// A prompt-length distribution: measured (shares of the length histogram's buckets, see
/// [`crate::load::length_bounds`]) or, until there are measurements, log-normal.
#[derive(Clone, Debug, PartialEq)]
pub enum LengthDist {
    LogNormal(Lengths),
    Measured {
        /// Share of prompts in each bucket (sums to 1).
        shares: Vec<f64>,
        mean: f64,
    },
}

impl LengthDist {
    /// A measured distribution from bucket shares (log-normal from `mean`/`cv2` when the shares
    /// do not fit the layout or are empty).
    pub fn new(shares: Option<&[f64]>, mean: f64, cv2: f64) -> Self {
        let layout = crate::load::length_bounds().len() + 1;
        match shares {
            Some(s) if s.len() == layout && s.iter().sum::<f64>() > 0.5 => {
                let total: f64 = s.iter().sum();
                Self::Measured {
                    shares: s.iter().map(|v| v / total).collect(),
                    mean,
                }
            }
            _ => Self::LogNormal(Lengths::new(mean, cv2)),
        }
    }

    /// Lower and upper edge of bucket `k` (the unbounded last bucket spans one doubling).
    fn edges(k: usize) -> (f64, f64) {
        let b = crate::load::length_bounds();
        let lo = if k == 0 { 0.0 } else { b[k - 1] };
        let hi = b.get(k).copied().unwrap_or(lo * 2.0);
        (lo, hi)
    }

    pub fn mean(&self) -> f64 {
        match self {
            Self::LogNormal(l) => l.mean,
            Self::Measured { mean, .. } => *mean,
        }
    }

    /// `P(X <= x)`.
    pub fn cdf(&self, x: f64) -> f64 {
        match self {
            Self::LogNormal(l) => l.cdf(x),
            Self::Measured { shares, .. } => shares
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (lo, hi) = Self::edges(k);
                    p * ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
                })
                .sum::<f64>()
                .min(1.0),
        }
    }

    /// `E[f(X); X <= x]`, with lengths spread evenly within a bucket (midpoint rule).
    pub fn expect_below(&self, x: f64, f: &dyn Fn(f64) -> f64) -> f64 {
        match self {
            Self::LogNormal(l) => {
                let below = l.cdf(x);
                if below <= 0.0 {
                    return 0.0;
                }
                let pts: Vec<f64> = (0..16)
                    .map(|i| l.quantile(below * (f64::from(i) + 0.5) / 16.0))
                    .collect();
                below * pts.iter().map(|&v| f(v)).sum::<f64>() / 16.0
            }
            Self::Measured { shares, .. } => shares
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (lo, hi) = Self::edges(k);
                    let top = hi.min(x);
                    if top <= lo {
                        0.0
                    } else {
                        p * (top - lo) / (hi - lo) * f((lo + top) / 2.0)
                    }
                })
                .sum(),
        }
    }

    /// The `q` quantile.
    pub fn quantile(&self, q: f64) -> f64 {
        match self {
            Self::LogNormal(l) => l.quantile(q),
            Self::Measured { shares, .. } => {
                let mut acc = 0.0;
                for (k, p) in shares.iter().enumerate() {
                    if *p > 0.0 && acc + p >= q {
                        let (lo, hi) = Self::edges(k);
                        return lo + (hi - lo) * ((q - acc) / p).clamp(0.0, 1.0);
                    }
                    acc += p;
                }
                Self::edges(shares.len().saturating_sub(1)).1
            }
        }
    }

    /// `n` points of equal probability above `from`.
    pub fn points_above(&self, from: f64, n: usize) -> Vec<f64> {
        let lo = self.cdf(from);
        (0..n)
            .map(|i| {
                self.quantile(lo + (1.0 - lo) * (i as f64 + 0.5) / n as f64)
                    .max(from)
            })
            .collect()
    }
}
