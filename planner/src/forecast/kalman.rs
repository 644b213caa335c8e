//! Local-linear-trend Kalman filter.
//!
//! ```text
//! y_t        = level_t + ε_t              ε ~ N(0, σ²)
//! level_t+1  = level_t + slope_t + η_t    η ~ N(0, q_level·σ²)
//! slope_t+1  = slope_t + ζ_t              ζ ~ N(0, q_slope·σ²)
//! ```
//!
//! Each prediction refilters the sliding window (standardised) for every pair of signal-to-noise
//! ratios on a small log grid and keeps the pair with the highest concentrated likelihood, so the
//! filter adapts between "smooth level" and "fast trend" without a numeric optimiser. The state
//! starts diffuse; the first two innovations are left out of the likelihood (they only pin down
//! level and slope). σ² is concentrated out.

use super::{Forecast, Forecaster, History};

const Q_LEVEL: [f64; 5] = [0.001, 0.01, 0.1, 1.0, 10.0];
const Q_SLOPE: [f64; 5] = [0.0, 1e-4, 1e-3, 1e-2, 1e-1];
const DIFFUSE: f64 = 1e6;

/// See the module docs.
#[derive(Clone, Debug)]
pub struct LocalLinearTrend {
    hist: History,
    /// Signal-to-noise ratios chosen at the last prediction.
    pub chosen: Option<(f64, f64)>,
}

impl LocalLinearTrend {
    pub fn new(window: usize) -> Self {
        Self {
            hist: History::new(window),
            chosen: None,
        }
    }
}

struct Run {
    llf: f64,
    next: f64,
    next_var: f64,
}

fn run(x: &[f64], ql: f64, qs: f64) -> Run {
    let mut a = [x[0], 0.0];
    let mut p = [[DIFFUSE, 0.0], [0.0, DIFFUSE]];
    let mut ssr = 0.0;
    let mut sum_log_f = 0.0;
    let mut n = 0usize;
    for (t, &y) in x.iter().enumerate() {
        let f = p[0][0] + 1.0;
        let v = y - a[0];
        if t >= 2 {
            ssr += v * v / f;
            sum_log_f += f.ln();
            n += 1;
        }
        let k = [p[0][0] / f, p[1][0] / f];
        let af = [a[0] + k[0] * v, a[1] + k[1] * v];
        let pf = [
            [p[0][0] - k[0] * p[0][0], p[0][1] - k[0] * p[0][1]],
            [p[1][0] - k[1] * p[0][0], p[1][1] - k[1] * p[0][1]],
        ];
        // Predict with T = [[1, 1], [0, 1]].
        a = [af[0] + af[1], af[1]];
        p = [
            [
                pf[0][0] + pf[0][1] + pf[1][0] + pf[1][1] + ql,
                pf[0][1] + pf[1][1],
            ],
            [pf[1][0] + pf[1][1], pf[1][1] + qs],
        ];
    }
    let nf = n.max(1) as f64;
    let sigma2 = (ssr / nf).max(1e-300);
    let llf = -0.5 * nf * (sigma2.ln() + 1.0) - 0.5 * sum_log_f;
    Run {
        llf,
        next: a[0],
        next_var: sigma2 * (p[0][0] + 1.0),
    }
}

impl Forecaster for LocalLinearTrend {
    fn name(&self) -> &'static str {
        "kalman"
    }
    fn observe(&mut self, value: f64) {
        self.hist.push(value);
    }
    fn predict(&mut self) -> Forecast {
        let Some(last) = self.hist.last() else {
            return Forecast::ZERO;
        };
        if self.hist.len() < 4 {
            return Forecast::new(last, self.hist.diff_variance(), last);
        }
        let y = self.hist.to_vec();
        let n = y.len() as f64;
        let mean = y.iter().sum::<f64>() / n;
        let sd = (y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        if !(sd > 0.0) {
            return Forecast::new(last, 0.0, last);
        }
        let x: Vec<f64> = y.iter().map(|v| (v - mean) / sd).collect();
        let mut best: Option<(Run, f64, f64)> = None;
        for &ql in &Q_LEVEL {
            for &qs in &Q_SLOPE {
                let r = run(&x, ql, qs);
                if r.llf.is_finite() && best.as_ref().is_none_or(|b| r.llf > b.0.llf) {
                    best = Some((r, ql, qs));
                }
            }
        }
        let Some((r, ql, qs)) = best else {
            return Forecast::new(last, 0.0, last);
        };
        self.chosen = Some((ql, qs));
        Forecast::new(mean + sd * r.next, sd * sd * r.next_var, last)
    }
    fn skipped(&self) -> u64 {
        self.hist.skipped()
    }
    fn len(&self) -> usize {
        self.hist.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_linear_trend() {
        let mut f = LocalLinearTrend::new(50);
        for t in 0..30 {
            f.observe(100.0 + 5.0 * f64::from(t));
        }
        let p = f.predict();
        assert!((p.point - 250.0).abs() < 1.0, "{p:?}");
    }

    #[test]
    fn tracks_a_level_shift() {
        let mut f = LocalLinearTrend::new(50);
        for t in 0..40 {
            let wiggle = if t % 2 == 0 { 1.0 } else { -1.0 };
            f.observe(if t < 20 { 10.0 } else { 50.0 } + wiggle);
        }
        let p = f.predict();
        assert!((p.point - 50.0).abs() < 5.0, "{p:?}");
        assert!(p.lower <= p.point && p.point <= p.upper);
    }
}
