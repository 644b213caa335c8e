//! Requests to replay: from a parsed trace, with time scaling and a time window.

use dopd_planner::trace::Trace;
use serde::{Deserialize, Serialize};

/// One request as the simulator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimRequest {
    /// Seconds after the start of the replay.
    pub arrival_s: f64,
    pub isl: u32,
    pub osl: u32,
}

/// A time window of the trace, in seconds after its first request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub start_s: f64,
    /// `None`: to the end.
    pub end_s: Option<f64>,
}

/// Requests of `trace` inside `window`, shifted to start at 0 and with arrivals compressed by
/// `rate_scale` (2.0 replays twice as fast, i.e. twice the request rate). Requests with no output
/// tokens are kept with one output token (the first token is always produced).
pub fn from_trace(trace: &Trace, rate_scale: f64, window: Window) -> Vec<SimRequest> {
    let scale = if rate_scale.is_finite() && rate_scale > 0.0 {
        rate_scale
    } else {
        1.0
    };
    let t0 = trace.requests.first().map_or(0, |r| r.arrival_ns);
    let mut out: Vec<SimRequest> = trace
        .requests
        .iter()
        .map(|r| ((r.arrival_ns - t0) as f64 / 1e9, r))
        .filter(|(t, _)| *t >= window.start_s && window.end_s.is_none_or(|e| *t < e))
        .map(|(t, r)| SimRequest {
            arrival_s: (t - window.start_s) / scale,
            isl: r.isl.max(1),
            osl: r.osl.max(1),
        })
        .collect();
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    out
}

/// Inter-arrival process of a synthetic workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arrivals {
    /// Exponential gaps: `rate` requests per second.
    Poisson { rate: f64 },
    /// Gamma gaps with mean `1/rate` and coefficient of variation `cv` (shape `1/cv²`): `cv > 1`
    /// is bursty (BurstGPT fits shape ≈ 0.25, i.e. cv = 2).
    Gamma { rate: f64, cv: f64 },
    /// Poisson arrivals whose rate swings between `low` and `high` requests per second like a
    /// sine of period `period_s`, starting at `low` (the load shape of Dynamo's planner reports).
    Sine { low: f64, high: f64, period_s: f64 },
    /// A flash crowd: Poisson arrivals at `rate`, times `factor` from `start_s` for
    /// `duration_s`.
    Flash {
        rate: f64,
        factor: f64,
        start_s: f64,
        duration_s: f64,
    },
}

/// An arrival rate as a function of time.
type RateFn = Box<dyn Fn(f64) -> f64>;

impl Arrivals {
    /// The arrival rate at time `t` of the time-varying patterns, and its maximum.
    fn varying(&self) -> Option<(RateFn, f64)> {
        match *self {
            Self::Sine {
                low,
                high,
                period_s,
            } => Some((
                Box::new(move |t: f64| {
                    low + (high - low) * (1.0 - (std::f64::consts::TAU * t / period_s).cos()) / 2.0
                }),
                high.max(low),
            )),
            Self::Flash {
                rate,
                factor,
                start_s,
                duration_s,
            } => Some((
                Box::new(move |t: f64| {
                    if t >= start_s && t < start_s + duration_s {
                        rate * factor
                    } else {
                        rate
                    }
                }),
                rate * factor.max(1.0),
            )),
            Self::Poisson { .. } | Self::Gamma { .. } => None,
        }
    }

    fn check(&self) -> Result<(), String> {
        let pos = |v: f64| v > 0.0 && v.is_finite();
        let ok = match *self {
            Self::Poisson { rate } => pos(rate),
            Self::Gamma { rate, cv } => pos(rate) && pos(cv),
            Self::Sine {
                low,
                high,
                period_s,
            } => low >= 0.0 && pos(high) && high >= low && pos(period_s),
            Self::Flash {
                rate,
                factor,
                start_s,
                duration_s,
            } => {
                pos(rate) && pos(factor) && start_s >= 0.0 && start_s.is_finite() && pos(duration_s)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "arrivals: {self:?}: rates, factors and periods must be finite and > 0 (sine: 0 <= low <= high)"
            ))
        }
    }
}

/// Length distribution (tokens, at least 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Lengths {
    Constant {
        value: u32,
    },
    /// Log-normal with the given mean and log-space standard deviation `sigma`, capped at `max`.
    LogNormal {
        mean: f64,
        sigma: f64,
        max: u32,
    },
    /// Zipf over `1..=max` with exponent `exponent` (BurstGPT's fits use about 1.1).
    Zipf {
        max: u32,
        exponent: f64,
    },
}

/// A seeded synthetic workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    pub seed: u64,
    pub requests: usize,
    pub arrivals: Arrivals,
    pub isl: Lengths,
    pub osl: Lengths,
}

enum LenSampler {
    Constant(u32),
    LogNormal(rand_distr::LogNormal<f64>, u32),
    Zipf(rand_distr::Zipf<f64>),
}

impl LenSampler {
    fn new(l: &Lengths, what: &str) -> Result<Self, String> {
        let bad = |m: String| format!("{what}: {m}");
        Ok(match *l {
            Lengths::Constant { value } => Self::Constant(value.max(1)),
            Lengths::LogNormal { mean, sigma, max } => {
                if !(mean > 0.0 && mean.is_finite() && sigma >= 0.0 && sigma.is_finite()) {
                    return Err(bad(format!(
                        "log-normal needs mean > 0 and sigma >= 0, got {mean}, {sigma}"
                    )));
                }
                let mu = mean.ln() - sigma * sigma / 2.0;
                let d = rand_distr::LogNormal::new(mu, sigma).map_err(|e| bad(e.to_string()))?;
                Self::LogNormal(d, max.max(1))
            }
            Lengths::Zipf { max, exponent } => {
                let d = rand_distr::Zipf::new(f64::from(max.max(1)), exponent)
                    .map_err(|e| bad(e.to_string()))?;
                Self::Zipf(d)
            }
        })
    }

    fn sample(&self, rng: &mut impl rand::Rng) -> u32 {
        use rand_distr::Distribution;
        match self {
            Self::Constant(v) => *v,
            Self::LogNormal(d, max) => (d.sample(rng).round() as u32).clamp(1, *max),
            Self::Zipf(d) => (d.sample(rng) as u32).max(1),
        }
    }
}

/// Generates a synthetic workload; the same spec always gives the same requests.
pub fn synthetic(spec: &SyntheticSpec) -> Result<Vec<SimRequest>, String> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
    spec.arrivals.check()?;
    // Time-varying rates: candidates at the peak rate, each kept with probability rate(t)/peak
    // (thinning), so arrivals are Poisson at rate(t).
    let varying = spec.arrivals.varying();
    let gap: Box<dyn Fn(&mut rand_chacha::ChaCha8Rng) -> f64> = match spec.arrivals {
        Arrivals::Poisson { rate } => {
            let d =
                rand_distr::Exp::new(rate).map_err(|e| format!("arrivals: rate {rate}: {e}"))?;
            Box::new(move |r| d.sample(r))
        }
        Arrivals::Gamma { rate, cv } => {
            let shape = 1.0 / (cv * cv);
            let d = rand_distr::Gamma::new(shape, 1.0 / (rate * shape))
                .map_err(|e| format!("arrivals: {e}"))?;
            Box::new(move |r| d.sample(r))
        }
        Arrivals::Sine { .. } | Arrivals::Flash { .. } => {
            let peak = varying.as_ref().map_or(1.0, |v| v.1);
            let d = rand_distr::Exp::new(peak).map_err(|e| format!("arrivals: {e}"))?;
            Box::new(move |r| d.sample(r))
        }
    };
    let isl = LenSampler::new(&spec.isl, "isl")?;
    let osl = LenSampler::new(&spec.osl, "osl")?;
    let mut t = 0.0;
    let mut out = Vec::with_capacity(spec.requests);
    while out.len() < spec.requests {
        let keep = match &varying {
            Some((rate, peak)) => rand::Rng::random::<f64>(&mut rng) * peak < rate(t),
            None => true,
        };
        if keep {
            out.push(SimRequest {
                arrival_s: t,
                isl: isl.sample(&mut rng),
                osl: osl.sample(&mut rng),
            });
        }
        t += gap(&mut rng);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arrivals: Arrivals) -> SyntheticSpec {
        SyntheticSpec {
            seed: 42,
            requests: 20_000,
            arrivals,
            isl: Lengths::LogNormal {
                mean: 1000.0,
                sigma: 0.8,
                max: 16384,
            },
            osl: Lengths::Zipf {
                max: 1000,
                exponent: 1.1,
            },
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let s = spec(Arrivals::Poisson { rate: 5.0 });
        assert_eq!(synthetic(&s), synthetic(&s));
        let other = SyntheticSpec {
            seed: 43,
            ..s.clone()
        };
        assert_ne!(synthetic(&s), synthetic(&other));
    }

    #[test]
    fn rates_and_means_come_out_as_asked() {
        for arrivals in [
            Arrivals::Poisson { rate: 5.0 },
            Arrivals::Gamma { rate: 5.0, cv: 2.0 },
        ] {
            let w = synthetic(&spec(arrivals.clone())).expect("valid");
            let span = w.last().expect("non-empty").arrival_s;
            let rate = w.len() as f64 / span;
            assert!((rate - 5.0).abs() < 0.4, "{arrivals:?}: {rate}");
            let mean_isl = w.iter().map(|r| f64::from(r.isl)).sum::<f64>() / w.len() as f64;
            assert!((mean_isl - 1000.0).abs() < 40.0, "{mean_isl}");
            assert!(w.iter().all(|r| r.osl >= 1 && r.osl <= 1000));
        }
    }

    #[test]
    fn gamma_with_a_high_cv_is_burstier_than_poisson() {
        let cv_of_gaps = |w: &[SimRequest]| {
            let g: Vec<f64> = w
                .windows(2)
                .map(|p| p[1].arrival_s - p[0].arrival_s)
                .collect();
            let m = g.iter().sum::<f64>() / g.len() as f64;
            (g.iter().map(|x| (x - m).powi(2)).sum::<f64>() / g.len() as f64).sqrt() / m
        };
        let p = synthetic(&spec(Arrivals::Poisson { rate: 5.0 })).expect("valid");
        let b = synthetic(&spec(Arrivals::Gamma { rate: 5.0, cv: 2.0 })).expect("valid");
        assert!((cv_of_gaps(&p) - 1.0).abs() < 0.1);
        assert!((cv_of_gaps(&b) - 2.0).abs() < 0.3, "{}", cv_of_gaps(&b));
    }

    #[test]
    fn a_sine_load_swings_between_its_rates_and_a_flash_crowd_multiplies_its_base() {
        let w = synthetic(&spec(Arrivals::Sine {
            low: 1.0,
            high: 24.0,
            period_s: 600.0,
        }))
        .expect("valid");
        let count = |w: &[SimRequest], from: f64, to: f64| {
            w.iter()
                .filter(|r| r.arrival_s >= from && r.arrival_s < to)
                .count() as f64
        };
        // Around the trough (t = 0, 600, ...) about 1 req/s, around the peak (300) about 24.
        let trough = count(&w, 570.0, 630.0) / 60.0;
        let peak = count(&w, 270.0, 330.0) / 60.0;
        assert!(trough < 3.0 && peak > 18.0, "trough {trough}, peak {peak}");
        let f = synthetic(&spec(Arrivals::Flash {
            rate: 4.0,
            factor: 5.0,
            start_s: 600.0,
            duration_s: 120.0,
        }))
        .expect("valid");
        let base = count(&f, 0.0, 600.0) / 600.0;
        let crowd = count(&f, 600.0, 720.0) / 120.0;
        assert!((base - 4.0).abs() < 0.5, "{base}");
        assert!((crowd / base - 5.0).abs() < 1.0, "{crowd} vs {base}");
        let bad = Arrivals::Sine {
            low: 5.0,
            high: 1.0,
            period_s: 60.0,
        };
        assert!(synthetic(&spec(bad)).is_err());
    }

    #[test]
    fn bad_specs_are_explained() {
        let mut s = spec(Arrivals::Gamma {
            rate: -1.0,
            cv: 2.0,
        });
        assert!(
            synthetic(&s)
                .expect_err("negative rate")
                .contains("arrivals")
        );
        s.arrivals = Arrivals::Poisson { rate: 1.0 };
        s.isl = Lengths::LogNormal {
            mean: 0.0,
            sigma: 1.0,
            max: 10,
        };
        assert!(synthetic(&s).expect_err("zero mean").starts_with("isl"));
    }
}
