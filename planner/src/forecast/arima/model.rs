//! ARIMA(p,d,q) with an optional constant: exact Gaussian likelihood, maximum-likelihood fit and
//! one-step forecast.
//!
//! # Model
//! With `w = Δ^d y`, the differenced series follows a stationary, invertible ARMA(p,q):
//!
//! ```text
//! w_t = c + φ_1 w_{t-1} + … + φ_p w_{t-p} + ε_t + θ_1 ε_{t-1} + … + θ_q ε_{t-q},  ε_t ~ N(0, σ²)
//! ```
//!
//! `c` is an *intercept* (the mean is `μ = c / (1 − Σφ)`), exactly as statsmodels' `SARIMAX`
//! with `trend="c"` — which is what pmdarima fits — so coefficients compare one to one.
//!
//! # Likelihood
//! For `d = 0` the exact likelihood of `w − μ` is computed with a Kalman filter on Harvey's
//! state-space form (state dimension `r = max(p, q+1)`), started from the stationary covariance
//! (the discrete Lyapunov equation, solved directly), with σ² concentrated out
//! (`σ̂² = Σ v²/F / n`, the same maximiser as statsmodels' joint fit over σ²).
//!
//! For `d > 0` we follow statsmodels' `SARIMAX` (what pmdarima fits) to the letter rather than
//! differencing first: the state holds `d` integration states ahead of the ARMA states, those are
//! started *approximately diffuse* (mean 0, variance 10⁶, in the data's units) and the first `d`
//! prediction errors are left out of the likelihood. That prior is not scale-free, so on
//! token-length series (levels in the thousands) it moves the likelihood by up to about one nat
//! compared with differencing first — enough to change AIC rankings. σ² is a free parameter here.
//!
//! # Fit
//! Parameters are optimised in an unconstrained space: AR and MA polynomials go through the
//! partial-autocorrelation (Monahan/Jones) transform, so every trial point is stationary and
//! invertible, as with statsmodels' `enforce_stationarity=True, enforce_invertibility=True`.
//! Data are standardised first (likelihoods are equivariant under affine maps), starting values
//! come from a Hannan–Rissanen regression, and BFGS does the rest.

// Numeric kernels index several arrays in lockstep; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use serde::{Deserialize, Serialize};

use super::kalman::*;
use super::optim;
use super::poly::*;
use crate::linalg;

/// An ARIMA order and whether the (differenced) model carries a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ArimaOrder {
    pub p: usize,
    pub d: usize,
    pub q: usize,
    /// Intercept in the differenced model (a drift when `d == 1`).
    pub constant: bool,
}

impl ArimaOrder {
    pub const fn new(p: usize, d: usize, q: usize, constant: bool) -> Self {
        Self { p, d, q, constant }
    }

    /// Number of estimated parameters, σ² included (statsmodels' `k` in the AIC).
    pub fn n_params(&self) -> usize {
        self.p + self.q + usize::from(self.constant) + 1
    }
}

impl std::fmt::Display for ArimaOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = if self.constant { "+c" } else { "" };
        write!(f, "ARIMA({},{},{}){c}", self.p, self.d, self.q)
    }
}

/// Coefficients of a fitted (or given) model, in statsmodels' sign convention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmaParams {
    /// Intercept `c` of the differenced model (0 without a constant).
    pub constant: f64,
    /// φ_1..φ_p.
    pub ar: Vec<f64>,
    /// θ_1..θ_q.
    pub ma: Vec<f64>,
    /// Innovation variance.
    pub sigma2: f64,
}

impl ArmaParams {
    /// Mean of the differenced series implied by the intercept.
    pub fn mean(&self) -> f64 {
        let s: f64 = self.ar.iter().sum();
        if self.constant == 0.0 {
            0.0
        } else {
            self.constant / (1.0 - s)
        }
    }
}

/// Why a fit could not be produced.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("{order} needs more than {needed} observations after differencing, got {got}")]
    TooShort {
        order: ArimaOrder,
        needed: usize,
        got: usize,
    },
    #[error("the differenced series is constant, so {order} has no finite likelihood")]
    Degenerate { order: ArimaOrder },
    #[error("{order}: the likelihood is not finite at any starting point")]
    NoFiniteStart { order: ArimaOrder },
}

/// A fitted model and what a forecaster needs from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArimaFit {
    pub order: ArimaOrder,
    pub params: ArmaParams,
    /// Maximised log-likelihood (over the `n − d` differenced observations).
    pub llf: f64,
    /// Akaike information criterion: `−2·llf + 2·k`, `k` counting σ².
    pub aic: f64,
    /// Observations used by the likelihood (`n − d`).
    pub nobs: usize,
    /// One-step-ahead point forecast of the original (undifferenced) series.
    pub forecast: f64,
    /// Variance of that forecast.
    pub forecast_var: f64,
    /// Whether the optimiser met its convergence test.
    pub converged: bool,
}

/// Log-likelihood of `y` under `order` at the given parameters (σ² as given), the way statsmodels'
/// `SARIMAX(...).loglike(params)` computes it. `None` outside the stationary region.
pub fn loglike(y: &[f64], order: ArimaOrder, params: &ArmaParams) -> Option<f64> {
    if order.d > 0 {
        let c = if order.constant { params.constant } else { 0.0 };
        return diffuse_filter(
            y,
            order.d,
            c,
            &params.ar,
            &params.ma,
            params.sigma2,
            APPROX_DIFFUSE_VARIANCE,
        )
        .map(|o| o.llf);
    }
    let w = difference(y, order.d);
    let mu = if order.constant { params.mean() } else { 0.0 };
    let z: Vec<f64> = w.iter().map(|v| v - mu).collect();
    let out = arma_filter(&z, &params.ar, &params.ma)?;
    Some(out.llf_at(params.sigma2))
}

/// Unconstrained parameter vector layout:
/// `[μ or c (if constant)] [AR pacf (p)] [MA pacf (q)] [ln σ² (d > 0 only)]`.
struct Layout {
    order: ArimaOrder,
}

impl Layout {
    fn split<'a>(&self, x: &'a [f64]) -> (f64, &'a [f64], &'a [f64]) {
        let c = usize::from(self.order.constant);
        let mu = if self.order.constant { x[0] } else { 0.0 };
        let end = c + self.order.p + self.order.q;
        (mu, &x[c..c + self.order.p], &x[c + self.order.p..end])
    }

    fn ln_sigma2(&self, x: &[f64]) -> f64 {
        if self.order.d > 0 {
            x[x.len() - 1]
        } else {
            0.0
        }
    }

    /// (μ, φ, θ) in the standardised scale.
    fn constrain(&self, x: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
        let (mu, ua, um) = self.split(x);
        let ar = pacf_to_ar(&to_pacf(ua));
        let ma = pacf_to_ar(&to_pacf(um)).into_iter().map(|v| -v).collect();
        (mu, ar, ma)
    }
}

/// Negative concentrated log-likelihood per observation of standardised data.
fn objective(x: &[f64], layout: &Layout, data: &[f64], scratch: &mut Vec<f64>) -> f64 {
    let (mu, ar, ma) = layout.constrain(x);
    scratch.clear();
    scratch.extend(data.iter().map(|v| v - mu));
    match arma_filter(scratch, &ar, &ma) {
        Some(out) if out.ssr > 0.0 => {
            let v = -out.concentrated_llf() / out.n as f64;
            if v.is_finite() { v } else { f64::INFINITY }
        }
        _ => f64::INFINITY,
    }
}

/// Hannan–Rissanen starting values on standardised data: (μ, φ, θ).
fn hannan_rissanen(
    x: &[f64],
    order: ArimaOrder,
    long_ar: Option<usize>,
) -> (f64, Vec<f64>, Vec<f64>) {
    let n = x.len();
    let (p, q) = (order.p, order.q);
    let mean = if order.constant {
        x.iter().sum::<f64>() / n as f64
    } else {
        0.0
    };
    let xc: Vec<f64> = x.iter().map(|v| v - mean).collect();
    let zeros = (mean, vec![0.0; p], vec![0.0; q]);
    if p == 0 && q == 0 {
        return zeros;
    }
    // Stage 1: long AR for innovation estimates (only needed when q > 0).
    let mut resid = vec![0.0; n];
    let mut m = 0;
    if q > 0 {
        m = long_ar
            .unwrap_or_else(|| (p + q + 2).max(((n as f64).ln() * 1.5) as usize))
            .min(n / 3);
        if m == 0 {
            return zeros;
        }
        let rows = n - m;
        let mut design = Vec::with_capacity(rows * m);
        for t in m..n {
            design.extend((1..=m).map(|i| xc[t - i]));
        }
        let Some(beta) = linalg::ols(&design, &xc[m..], m) else {
            return zeros;
        };
        for t in m..n {
            resid[t] = xc[t] - (1..=m).map(|i| beta[i - 1] * xc[t - i]).sum::<f64>();
        }
    }
    // Stage 2: regress on lagged values and lagged innovations.
    let start = m + p.max(q);
    let k = p + q;
    if n <= start + k + 1 {
        return zeros;
    }
    let mut design = Vec::with_capacity((n - start) * k);
    for t in start..n {
        design.extend((1..=p).map(|i| xc[t - i]));
        design.extend((1..=q).map(|j| resid[t - j]));
    }
    let Some(beta) = linalg::ols(&design, &xc[start..], k) else {
        return zeros;
    };
    let ar = beta[..p].to_vec();
    let ma = beta[p..].to_vec();
    let ar = if is_stationary(&ar) { ar } else { vec![0.0; p] };
    let ma = if is_invertible(&ma) { ma } else { vec![0.0; q] };
    (mean, ar, ma)
}

/// `Δ^d y`, or an error when it is too short to estimate `order`.
fn differenced_for(y: &[f64], order: ArimaOrder) -> Result<Vec<f64>, FitError> {
    let w = difference(y, order.d);
    let needed = order.n_params();
    if w.len() <= needed {
        return Err(FitError::TooShort {
            order,
            needed,
            got: w.len(),
        });
    }
    Ok(w)
}

/// Negative log-likelihood per observation of the scaled undifferenced series (`d > 0`).
fn diffuse_objective(x: &[f64], layout: &Layout, y: &[f64], prior_var: f64) -> f64 {
    let (c, ar, ma) = layout.constrain(x);
    let sigma2 = layout.ln_sigma2(x).exp();
    match diffuse_filter(y, layout.order.d, c, &ar, &ma, sigma2, prior_var) {
        Some(out) if out.llf.is_finite() => -out.llf / out.n_eff.max(1) as f64,
        _ => f64::INFINITY,
    }
}

/// Maximum likelihood for `d > 0` on the undifferenced series (see the module docs).
fn fit_diffuse(
    y: &[f64],
    order: ArimaOrder,
    precision: Precision,
    warm: Option<&WarmPoint>,
) -> Result<(ArimaFit, WarmPoint), FitError> {
    let w = differenced_for(y, order)?;
    let n = w.len();
    let mean = w.iter().sum::<f64>() / n as f64;
    let sd = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    if !(sd > 1e-12 * mean.abs().max(1.0)) {
        return Err(FitError::Degenerate { order });
    }
    // Scale only: the diffuse prior has mean 0, so shifting the data would change the model.
    let scale = sd;
    let ys: Vec<f64> = y.iter().map(|v| v / scale).collect();
    let ws: Vec<f64> = w.iter().map(|v| v / scale).collect();
    let prior_var = APPROX_DIFFUSE_VARIANCE / (scale * scale);
    let layout = Layout { order };
    let starts: Vec<Vec<f64>> = start_points(&ws, order)
        .into_iter()
        .map(|(mu, ar, ma)| {
            // σ² start: the one-step variance of the start model on the differenced data.
            let z: Vec<f64> = ws
                .iter()
                .map(|v| v - if order.constant { mu } else { 0.0 })
                .collect();
            let s2 = arma_filter(&z, &ar, &ma).map_or(1.0, |o| (o.ssr / n as f64).max(1e-8));
            let c = mu * (1.0 - ar.iter().sum::<f64>());
            unconstrained(order.constant.then_some(c), &ar, &ma, Some(s2.ln()))
        })
        .collect();
    let best = multistart(
        |p| diffuse_objective(p, &layout, &ys, prior_var),
        &starts,
        precision,
        warm,
    );
    let best = best.ok_or(FitError::NoFiniteStart { order })?;
    let (c_s, ar, ma) = layout.constrain(&best.x);
    let sigma2_s = layout.ln_sigma2(&best.x).exp();
    let out = diffuse_filter(&ys, order.d, c_s, &ar, &ma, sigma2_s, prior_var)
        .ok_or(FitError::NoFiniteStart { order })?;
    let llf = out.llf - out.n_eff as f64 * scale.ln();
    let constant = if order.constant { c_s * scale } else { 0.0 };
    let fit = ArimaFit {
        order,
        params: ArmaParams {
            constant,
            ar,
            ma,
            sigma2: sigma2_s * scale * scale,
        },
        llf,
        aic: -2.0 * llf + 2.0 * order.n_params() as f64,
        nobs: out.n_eff,
        forecast: out.next * scale,
        forecast_var: out.next_var * scale * scale,
        converged: best.converged,
    };
    Ok((
        fit,
        WarmPoint {
            x: best.x,
            h: best.h,
        },
    ))
}

/// Starting points `(mean, φ, θ)` on (standardised) data: Hannan–Rissanen with two long-AR
/// orders (ours and statsmodels' `2q`), AR-only least squares, and all zeros. ARMA likelihoods
/// are often multi-modal (near-cancelling AR and MA roots, MA roots piling up at the unit
/// circle), so one start is not enough to find the maximum statsmodels finds.
fn start_points(x: &[f64], order: ArimaOrder) -> Vec<(f64, Vec<f64>, Vec<f64>)> {
    let mut v = vec![hannan_rissanen(x, order, None)];
    if order.q > 0 {
        v.push(hannan_rissanen(x, order, Some(2 * order.q)));
        if order.p > 0 {
            let (mu, ar, _) = hannan_rissanen(x, ArimaOrder { q: 0, ..order }, None);
            v.push((mu, ar, vec![0.0; order.q]));
        }
    }
    let mu = v[0].0;
    v.push((mu, vec![0.0; order.p], vec![0.0; order.q]));
    v.dedup();
    v
}

/// Unconstrained vector `[lead] [AR pacf] [MA pacf] [tail]` for constrained `(φ, θ)`.
fn unconstrained(lead: Option<f64>, ar: &[f64], ma: &[f64], tail: Option<f64>) -> Vec<f64> {
    let mut x = Vec::with_capacity(ar.len() + ma.len() + 2);
    x.extend(lead);
    x.extend(to_unconstrained(
        &ar_to_pacf(ar).unwrap_or_else(|| vec![0.0; ar.len()]),
    ));
    let neg_ma: Vec<f64> = ma.iter().map(|t| -t).collect();
    x.extend(to_unconstrained(
        &ar_to_pacf(&neg_ma).unwrap_or_else(|| vec![0.0; ma.len()]),
    ));
    x.extend(tail);
    x
}

/// Where a fit ended, in the optimiser's coordinates, with its inverse-Hessian approximation: the
/// starting point for the same order on the next, overlapping window.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WarmPoint {
    pub x: Vec<f64>,
    pub h: Vec<f64>,
}

/// How hard to optimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// To convergence (gradient below 1e-7 per observation), from every start: for the model a
    /// forecast is made with, and for the golden tests.
    Full,
    /// Looser (gradient below 1e-4 per observation), for ranking candidates in the order
    /// search; the winner is refitted at `Full`. pmdarima itself stops L-BFGS after 50
    /// iterations, leaving its candidates up to ~0.04 nats short of their maxima.
    Search,
}

/// Short BFGS runs (forward differences) from every start, then the best one run to the
/// requested convergence.
fn multistart(
    mut f: impl FnMut(&[f64]) -> f64,
    starts: &[Vec<f64>],
    precision: Precision,
    warm: Option<&WarmPoint>,
) -> Option<optim::Minimum> {
    let finish = match precision {
        Precision::Full => optim::Settings::default(),
        Precision::Search => optim::Settings {
            gtol: 1e-4,
            ftol: 1e-9,
            max_iter: 50,
            ..optim::Settings::default()
        },
    };
    // A warm start (the optimum of the previous, overlapping window) needs no scouting.
    if let Some(w) = warm.filter(|w| w.x.len() == starts.first().map_or(0, Vec::len)) {
        let m = optim::minimize_from(&mut f, &w.x, Some(&w.h), finish);
        if m.f.is_finite() {
            return Some(m);
        }
    }
    let scout = optim::Settings {
        max_iter: 12,
        central: false,
        ..finish
    };
    if starts.len() == 1 {
        return Some(optim::minimize(&mut f, &starts[0], finish)).filter(|m| m.f.is_finite());
    }
    let mut scouts: Vec<optim::Minimum> = starts
        .iter()
        .filter(|s| s.iter().all(|v| v.is_finite()))
        .map(|s| optim::minimize(&mut f, s, scout))
        .filter(|m| m.f.is_finite())
        .collect();
    scouts.sort_by(|a, b| a.f.total_cmp(&b.f));
    // Finish the most promising scouts: one when ranking candidates, two for a final fit (the
    // runner-up after 12 iterations sometimes climbs to the higher peak).
    let finishes = match precision {
        Precision::Full => 2,
        Precision::Search => 1,
    };
    let mut best: Option<optim::Minimum> = None;
    for m in scouts.into_iter().take(finishes) {
        let m = if m.converged {
            m
        } else {
            let fin = optim::minimize(&mut f, &m.x, finish);
            if fin.f <= m.f { fin } else { m }
        };
        if best.as_ref().is_none_or(|b| m.f < b.f) {
            best = Some(m);
        }
    }
    best
}

/// Fits `order` to `y` by exact maximum likelihood (statsmodels `SARIMAX` semantics).
pub fn fit(y: &[f64], order: ArimaOrder) -> Result<ArimaFit, FitError> {
    fit_with(y, order, Precision::Full)
}

/// [`fit`] at a chosen optimiser precision.
pub fn fit_with(y: &[f64], order: ArimaOrder, precision: Precision) -> Result<ArimaFit, FitError> {
    fit_warm(y, order, precision, None).map(|(f, _)| f)
}

/// [`fit_with`] optionally started from a previous optimum (`warm`, in the optimiser's own
/// coordinates); also returns the optimum in those coordinates for the next call.
pub(crate) fn fit_warm(
    y: &[f64],
    order: ArimaOrder,
    precision: Precision,
    warm: Option<&WarmPoint>,
) -> Result<(ArimaFit, WarmPoint), FitError> {
    if order.d > 0 {
        return fit_diffuse(y, order, precision, warm);
    }
    let w = differenced_for(y, order)?;
    let n = w.len();
    // Standardise: centre only when the model has a constant to absorb the shift.
    let mean = w.iter().sum::<f64>() / n as f64;
    let center = if order.constant { mean } else { 0.0 };
    let scale = (w.iter().map(|v| (v - center).powi(2)).sum::<f64>() / n as f64).sqrt();
    if !(scale > 1e-12 * mean.abs().max(1.0)) {
        return Err(FitError::Degenerate { order });
    }
    let x: Vec<f64> = w.iter().map(|v| (v - center) / scale).collect();
    let layout = Layout { order };

    let starts: Vec<Vec<f64>> = start_points(&x, order)
        .into_iter()
        .map(|(mu, ar, ma)| unconstrained(order.constant.then_some(mu), &ar, &ma, None))
        .collect();
    let mut scratch = Vec::with_capacity(n);
    let best = multistart(
        |p| objective(p, &layout, &x, &mut scratch),
        &starts,
        precision,
        warm,
    );
    let best = best.ok_or(FitError::NoFiniteStart { order })?;
    let (mu_x, ar, ma) = layout.constrain(&best.x);
    let z: Vec<f64> = x.iter().map(|v| v - mu_x).collect();
    let out = arma_filter(&z, &ar, &ma).ok_or(FitError::NoFiniteStart { order })?;
    let sigma2 = out.ssr / n as f64 * scale * scale;
    let llf = out.concentrated_llf() - n as f64 * scale.ln();
    let mu = center + scale * mu_x;
    let constant = if order.constant {
        mu * (1.0 - ar.iter().sum::<f64>())
    } else {
        0.0
    };
    let w_next = mu + scale * out.next;
    let forecast = undifference_next(y, order.d, w_next);
    let fit = ArimaFit {
        order,
        params: ArmaParams {
            constant,
            ar,
            ma,
            sigma2,
        },
        llf,
        aic: -2.0 * llf + 2.0 * order.n_params() as f64,
        nobs: n,
        forecast,
        forecast_var: sigma2 * out.next_f,
        converged: best.converged,
    };
    Ok((
        fit,
        WarmPoint {
            x: best.x,
            h: best.h,
        },
    ))
}

/// Turns a forecast of `Δ^d y_{n+1}` into a forecast of `y_{n+1}`.
fn undifference_next(y: &[f64], d: usize, w_next: f64) -> f64 {
    // y_{n+1} = w_{n+1} + Σ_{k=1..d} (−1)^{k+1} C(d,k) y_{n+1−k}
    let n = y.len();
    let mut acc = w_next;
    let mut binom = 1.0;
    for k in 1..=d {
        binom = binom * (d + 1 - k) as f64 / k as f64;
        let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
        acc += sign * binom * y[n - k];
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacf_round_trip() {
        let r = [0.5, -0.3, 0.2];
        let phi = pacf_to_ar(&r);
        let back = ar_to_pacf(&phi).expect("stationary");
        for (a, b) in r.iter().zip(&back) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn unit_root_is_not_stationary() {
        assert!(!is_stationary(&[1.0]));
        assert!(!is_stationary(&[0.5, 0.5]));
        assert!(is_stationary(&[0.5, 0.3]));
        assert!(!is_invertible(&[-1.0]));
    }

    #[test]
    fn root_modulus_of_a_known_polynomial() {
        // 1 - 0.5 z has its root at 2.
        assert!((min_root_modulus(&[-0.5]) - 2.0).abs() < 1e-9);
        // (1 - 0.5z)(1 - 0.25z) = 1 - 0.75 z + 0.125 z², roots 2 and 4.
        assert!((min_root_modulus(&[-0.75, 0.125]) - 2.0).abs() < 1e-9);
        assert!(min_root_modulus(&[]).is_infinite());
    }

    #[test]
    fn white_noise_likelihood_is_gaussian() {
        let z = [0.3, -1.2, 0.8, 0.1];
        let out = arma_filter(&z, &[], &[]).expect("valid");
        let ssr: f64 = z.iter().map(|v| v * v).sum();
        assert!((out.ssr - ssr).abs() < 1e-12);
        assert!(out.sum_log_f.abs() < 1e-12);
    }

    #[test]
    fn undifferencing_inverts_differencing() {
        let y = [1.0, 4.0, 9.0, 16.0, 25.0];
        // Second differences are constant 2, so predicting 2 gives the next square.
        assert!((undifference_next(&y, 2, 2.0) - 36.0).abs() < 1e-12);
        assert!((undifference_next(&y, 1, 11.0) - 36.0).abs() < 1e-12);
    }

    #[test]
    fn recovers_an_ar1() {
        // Deterministic pseudo-random AR(1) with φ = 0.7 around 10.
        let mut state = 12345u64;
        let mut noise = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Sum of uniforms ≈ normal.
            (0..12)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 11) as f64 / (1u64 << 53) as f64
                })
                .sum::<f64>()
                - 6.0
        };
        let mut y = vec![10.0];
        for _ in 0..400 {
            let prev = *y.last().expect("non-empty");
            y.push(3.0 + 0.7 * prev + noise());
        }
        let fit = fit(&y, ArimaOrder::new(1, 0, 0, true)).expect("fits");
        assert!((fit.params.ar[0] - 0.7).abs() < 0.08, "{fit:?}");
        assert!((fit.params.mean() - 10.0).abs() < 0.6, "{fit:?}");
        assert!(fit.converged);
    }
}
