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

use super::optim;
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

/// Output of one Kalman pass over a zero-mean ARMA series (σ² = 1 scaling).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FilterOutput {
    /// Σ v_t² / F_t.
    pub ssr: f64,
    /// Σ ln F_t.
    pub sum_log_f: f64,
    pub n: usize,
    /// Predicted value of the next observation (zero-mean scale).
    pub next: f64,
    /// Its variance divided by σ².
    pub next_f: f64,
}

impl FilterOutput {
    /// Log-likelihood with σ² concentrated out.
    pub fn concentrated_llf(&self) -> f64 {
        let n = self.n as f64;
        let sigma2 = self.ssr / n;
        -0.5 * n * ((2.0 * std::f64::consts::PI).ln() + sigma2.ln() + 1.0) - 0.5 * self.sum_log_f
    }

    /// Log-likelihood at a given σ².
    pub fn llf_at(&self, sigma2: f64) -> f64 {
        let n = self.n as f64;
        -0.5 * (n * (2.0 * std::f64::consts::PI).ln()
            + n * sigma2.ln()
            + self.sum_log_f
            + self.ssr / sigma2)
    }
}

const MAX_STATE: usize = 16;

/// Runs the Kalman filter for the zero-mean ARMA series `z`. Returns `None` when the model is not
/// stationary (no stationary initial covariance) or the filter breaks down.
pub(crate) fn arma_filter(z: &[f64], ar: &[f64], ma: &[f64]) -> Option<FilterOutput> {
    arma_filter_with_prefix(z, ar, ma, 0.0)
}

/// [`arma_filter`] where the first value is observed with extra noise of variance `first_noise`
/// (in units of σ²) and left out of the likelihood; `first_noise = 0` is the plain filter.
///
/// This is how ARIMA(p,1,q) under statsmodels' approximately diffuse start reduces to an ARMA
/// filter on the differences: the first observation `y_1 = s_0 + w_1` measures `w_1` through the
/// unknown initial level `s_0 ~ N(0, κ)`, after which the level is known exactly and
/// `w_t = y_t − y_{t−1}` is observed without noise.
pub(crate) fn arma_filter_with_prefix(
    z: &[f64],
    ar: &[f64],
    ma: &[f64],
    first_noise: f64,
) -> Option<FilterOutput> {
    let r = ar.len().max(ma.len() + 1);
    if r > MAX_STATE {
        return None;
    }
    let phi = |i: usize| ar.get(i).copied().unwrap_or(0.0);
    let mut rvec = [0.0; MAX_STATE];
    rvec[0] = 1.0;
    for (j, t) in ma.iter().enumerate() {
        rvec[j + 1] = *t;
    }
    let mut p = stationary_cov(ar, &rvec[..r], r)?;
    let mut a = [0.0; MAX_STATE];
    let mut tp = vec![0.0; r * r];
    let mut pn = vec![0.0; r * r];
    let mut ssr = 0.0;
    let mut sum_log_f = 0.0;
    let mut converged = false;
    let mut gain = [0.0; MAX_STATE];
    let mut f_conv = 0.0;
    let mut ln_f_conv = 0.0;
    let mut included = 0usize;
    for (step, &zt) in z.iter().enumerate() {
        if converged {
            let v = zt - a[0];
            ssr += v * v / f_conv;
            sum_log_f += ln_f_conv;
            included += 1;
            // a ← T·(a + g·v)
            let mut af = [0.0; MAX_STATE];
            for i in 0..r {
                af[i] = a[i] + gain[i] * v;
            }
            for i in 0..r {
                a[i] = phi(i) * af[0] + if i + 1 < r { af[i + 1] } else { 0.0 };
            }
            continue;
        }
        let prefix = step == 0 && first_noise > 0.0;
        let f = p[0] + if prefix { first_noise } else { 0.0 };
        if !(f > 0.0) || !f.is_finite() {
            return None;
        }
        let v = zt - a[0];
        if !prefix {
            ssr += v * v / f;
            sum_log_f += f.ln();
            included += 1;
        }
        // Filtered state and covariance.
        let mut af = [0.0; MAX_STATE];
        for i in 0..r {
            gain[i] = p[i * r] / f;
            af[i] = a[i] + gain[i] * v;
        }
        for i in 0..r {
            for j in 0..r {
                pn[i * r + j] = p[i * r + j] - gain[i] * p[j * r];
            }
        }
        // Predict: a ← T·af, P ← T·Pf·T' + R·R'.
        for i in 0..r {
            a[i] = phi(i) * af[0] + if i + 1 < r { af[i + 1] } else { 0.0 };
        }
        for i in 0..r {
            for j in 0..r {
                tp[i * r + j] = phi(i) * pn[j] + if i + 1 < r { pn[(i + 1) * r + j] } else { 0.0 };
            }
        }
        let mut delta = 0.0f64;
        for i in 0..r {
            for j in 0..r {
                let v = tp[i * r] * phi(j)
                    + if j + 1 < r { tp[i * r + j + 1] } else { 0.0 }
                    + rvec[i] * rvec[j];
                delta = delta.max((v - p[i * r + j]).abs());
                p[i * r + j] = v;
            }
        }
        if delta < 1e-9 && step > 0 {
            converged = true;
            f_conv = p[0];
            ln_f_conv = f_conv.ln();
            for i in 0..r {
                gain[i] = p[i * r] / f_conv;
            }
        }
    }
    let next_f = if converged { f_conv } else { p[0] };
    Some(FilterOutput {
        ssr,
        sum_log_f,
        n: included,
        next: a[0],
        next_f,
    })
}

/// Stationary state covariance: the solution of `P = T·P·T' + R·R'` (row-major, `r x r`).
///
/// `T` is the companion matrix, so each equation touches at most four unknowns; solving for the
/// `r(r+1)/2` free entries of the symmetric `P` keeps this cheap (21 unknowns at `r = 6`).
fn stationary_cov(ar: &[f64], rvec: &[f64], r: usize) -> Option<Vec<f64>> {
    if ar.is_empty() {
        // Pure MA: the state is a finite moving average of white noise, P has a closed form:
        // P[i][j] = Σ_k R[i+k]·R[j+k].
        let mut p = vec![0.0; r * r];
        for i in 0..r {
            for j in 0..r {
                p[i * r + j] = (0..r)
                    .filter(|k| i + k < r && j + k < r)
                    .map(|k| rvec[i + k] * rvec[j + k])
                    .sum();
            }
        }
        return Some(p);
    }
    let phi = |i: usize| ar.get(i).copied().unwrap_or(0.0);
    // Index of the unknown P[i][j], i <= j, in row-major upper-triangular order.
    let idx = |i: usize, j: usize| {
        let (a, b) = if i <= j { (i, j) } else { (j, i) };
        a * r - a * (a + 1) / 2 + b
    };
    let n = r * (r + 1) / 2;
    let mut m = vec![0.0; n * n];
    let mut b = vec![0.0; n];
    for i in 0..r {
        for j in i..r {
            let row = idx(i, j);
            b[row] = rvec[i] * rvec[j];
            m[row * n + row] += 1.0;
            // (T·P·T')[i][j] = φ_i φ_j P00 + φ_i P[0][j+1] + φ_j P[i+1][0] + P[i+1][j+1]
            m[row * n + idx(0, 0)] -= phi(i) * phi(j);
            if j + 1 < r {
                m[row * n + idx(0, j + 1)] -= phi(i);
            }
            if i + 1 < r {
                m[row * n + idx(i + 1, 0)] -= phi(j);
            }
            if i + 1 < r && j + 1 < r {
                m[row * n + idx(i + 1, j + 1)] -= 1.0;
            }
        }
    }
    linalg::solve_in_place(&mut m, &mut b, n)?;
    let mut p = vec![0.0; r * r];
    for i in 0..r {
        for j in 0..r {
            p[i * r + j] = b[idx(i, j)];
        }
    }
    if !(p[0] > 0.0) {
        return None;
    }
    Some(p)
}

/// Differences a series `d` times.
pub fn difference(y: &[f64], d: usize) -> Vec<f64> {
    let mut w = y.to_vec();
    for _ in 0..d {
        w = w.windows(2).map(|p| p[1] - p[0]).collect();
    }
    w
}

/// Maps partial autocorrelations in (−1, 1) to the coefficients of a stationary AR polynomial
/// `1 − φ_1 L − … − φ_p L^p` (Durbin–Levinson recursion).
pub(crate) fn pacf_to_ar(r: &[f64]) -> Vec<f64> {
    let mut phi: Vec<f64> = Vec::with_capacity(r.len());
    for (k, &rk) in r.iter().enumerate() {
        let prev = phi.clone();
        for j in 0..k {
            phi[j] = prev[j] - rk * prev[k - 1 - j];
        }
        phi.push(rk);
    }
    phi
}

/// Inverse of [`pacf_to_ar`]; `None` if the polynomial is not stationary.
pub(crate) fn ar_to_pacf(phi: &[f64]) -> Option<Vec<f64>> {
    let mut cur = phi.to_vec();
    let mut r = vec![0.0; phi.len()];
    for k in (0..phi.len()).rev() {
        let rk = cur[k];
        if !(rk.abs() < 1.0) {
            return None;
        }
        r[k] = rk;
        let denom = 1.0 - rk * rk;
        let prev: Vec<f64> = (0..k)
            .map(|j| (cur[j] + rk * cur[k - 1 - j]) / denom)
            .collect();
        cur = prev;
    }
    Some(r)
}

fn to_unconstrained(pacf: &[f64]) -> Vec<f64> {
    pacf.iter().map(|r| r / (1.0 - r * r).sqrt()).collect()
}

fn to_pacf(u: &[f64]) -> Vec<f64> {
    u.iter().map(|u| u / (1.0 + u * u).sqrt()).collect()
}

/// True when `1 − Σφ_i L^i` has all roots outside the unit circle.
pub fn is_stationary(ar: &[f64]) -> bool {
    ar_to_pacf(ar).is_some()
}

/// True when `1 + Σθ_j L^j` has all roots outside the unit circle.
pub fn is_invertible(ma: &[f64]) -> bool {
    let neg: Vec<f64> = ma.iter().map(|t| -t).collect();
    ar_to_pacf(&neg).is_some()
}

/// Smallest modulus among the roots of `1 + c_1 z + … + c_k z^k` (∞ for a constant polynomial).
/// Computed with Durand–Kerner iterations, ample for degree ≤ 5.
pub fn min_root_modulus(coeffs: &[f64]) -> f64 {
    let mut deg = coeffs.len();
    while deg > 0 && coeffs[deg - 1].abs() < 1e-12 {
        deg -= 1;
    }
    if deg == 0 {
        return f64::INFINITY;
    }
    // Monic form in z: z^k + (c_{k-1}/c_k) z^{k-1} + … + 1/c_k.
    let lead = coeffs[deg - 1];
    let mut poly = vec![0.0; deg + 1]; // poly[i] = coefficient of z^i
    poly[0] = 1.0 / lead;
    for i in 1..deg {
        poly[i] = coeffs[i - 1] / lead;
    }
    poly[deg] = 1.0;
    let eval = |z: (f64, f64)| {
        let mut acc = (0.0, 0.0);
        for i in (0..=deg).rev() {
            acc = (
                acc.0 * z.0 - acc.1 * z.1 + poly[i],
                acc.0 * z.1 + acc.1 * z.0,
            );
        }
        acc
    };
    let mut roots: Vec<(f64, f64)> = (0..deg)
        .map(|i| {
            let ang = 0.4 + 2.0 * std::f64::consts::PI * i as f64 / deg as f64;
            let rad = 1.0 + poly.iter().take(deg).fold(0.0f64, |m, c| m.max(c.abs()));
            (rad * ang.cos() * 0.5, rad * ang.sin() * 0.5)
        })
        .collect();
    for _ in 0..500 {
        let mut moved = 0.0f64;
        for i in 0..deg {
            let zi = roots[i];
            let num = eval(zi);
            let mut den = (1.0, 0.0);
            for (j, zj) in roots.iter().enumerate() {
                if j != i {
                    let diff = (zi.0 - zj.0, zi.1 - zj.1);
                    den = (
                        den.0 * diff.0 - den.1 * diff.1,
                        den.0 * diff.1 + den.1 * diff.0,
                    );
                }
            }
            let dd = den.0 * den.0 + den.1 * den.1;
            if dd == 0.0 {
                continue;
            }
            let q = (
                (num.0 * den.0 + num.1 * den.1) / dd,
                (num.1 * den.0 - num.0 * den.1) / dd,
            );
            roots[i] = (zi.0 - q.0, zi.1 - q.1);
            moved = moved.max(q.0.abs() + q.1.abs());
        }
        if moved < 1e-14 {
            break;
        }
    }
    roots
        .iter()
        .map(|z| (z.0 * z.0 + z.1 * z.1).sqrt())
        .fold(f64::INFINITY, f64::min)
}

/// statsmodels' default variance of approximately diffuse initial states.
pub const APPROX_DIFFUSE_VARIANCE: f64 = 1e6;

/// Output of the SARIMAX-style filter for `d > 0`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiffuseOutput {
    pub llf: f64,
    /// Observations in the likelihood (`n − d`).
    pub n_eff: usize,
    pub next: f64,
    pub next_var: f64,
}

/// Kalman filter of ARIMA(p,d,q) on the undifferenced series, as statsmodels' SARIMAX with
/// `simple_differencing=False`: state `[d integration states; r ARMA states]`, intercept `c` added
/// to the first ARMA state each step, integration states ~ N(0, `prior_var`), ARMA states from
/// their stationary distribution, first `d` errors burnt.
pub(crate) fn diffuse_filter(
    y: &[f64],
    d: usize,
    c: f64,
    ar: &[f64],
    ma: &[f64],
    sigma2: f64,
    prior_var: f64,
) -> Option<DiffuseOutput> {
    if !(sigma2 > 0.0) || !sigma2.is_finite() {
        return None;
    }
    if d == 1 && !y.is_empty() {
        // Same likelihood through the reduced filter (see `arma_filter_with_prefix`).
        let mu = c / (1.0 - ar.iter().sum::<f64>());
        if !mu.is_finite() {
            return None;
        }
        let z: Vec<f64> = std::iter::once(y[0] - mu)
            .chain(y.windows(2).map(|w| w[1] - w[0] - mu))
            .collect();
        let out = arma_filter_with_prefix(&z, ar, ma, prior_var / sigma2)?;
        let n = out.n as f64;
        let llf = -0.5
            * (n * (2.0 * std::f64::consts::PI).ln()
                + n * sigma2.ln()
                + out.sum_log_f
                + out.ssr / sigma2);
        return Some(DiffuseOutput {
            llf,
            n_eff: out.n,
            next: y[y.len() - 1] + mu + out.next,
            next_var: sigma2 * out.next_f,
        });
    }
    diffuse_filter_dense(y, d, c, ar, ma, sigma2, prior_var)
}

/// The full `(d + r)`-state filter behind [`diffuse_filter`].
fn diffuse_filter_dense(
    y: &[f64],
    d: usize,
    c: f64,
    ar: &[f64],
    ma: &[f64],
    sigma2: f64,
    prior_var: f64,
) -> Option<DiffuseOutput> {
    let r = ar.len().max(ma.len() + 1);
    let m = d + r;
    if m > MAX_STATE {
        return None;
    }
    let mut rvec = [0.0; MAX_STATE];
    rvec[d] = 1.0;
    for (j, t) in ma.iter().enumerate() {
        rvec[d + j + 1] = *t;
    }
    // Transition matrix (row-major m x m).
    let mut t = vec![0.0; m * m];
    for i in 0..d {
        for j in i..=d {
            t[i * m + j] = 1.0;
        }
    }
    for i in 0..r {
        t[(d + i) * m + d] = ar.get(i).copied().unwrap_or(0.0);
        if i + 1 < r {
            t[(d + i) * m + d + i + 1] = 1.0;
        }
    }
    // (T·x)[i]: integration rows add the states to their right up to the first ARMA state;
    // ARMA rows are the companion form.
    let t_row = |i: usize, x: &[f64; MAX_STATE]| -> f64 {
        if i < d {
            x[i..=d].iter().sum()
        } else {
            let k = i - d;
            ar.get(k).copied().unwrap_or(0.0) * x[d] + if k + 1 < r { x[i + 1] } else { 0.0 }
        }
    };
    debug_assert!(t.iter().enumerate().all(|(ix, v)| {
        let mut e = [0.0; MAX_STATE];
        e[ix % m] = 1.0;
        (t_row(ix / m, &e) - v).abs() < 1e-15
    }));
    // Initial state: integration states at 0, ARMA block at its stationary mean.
    let mut a = [0.0; MAX_STATE];
    let sum_ar: f64 = ar.iter().sum();
    let mu = c / (1.0 - sum_ar);
    if !mu.is_finite() {
        return None;
    }
    a[d] = mu;
    for i in 1..r {
        a[d + i] = mu * ar.iter().skip(i).sum::<f64>();
    }
    let p_arma = stationary_cov(ar, &rvec[d..d + r], r)?;
    let mut p = vec![0.0; m * m];
    for i in 0..d {
        p[i * m + i] = prior_var;
    }
    for i in 0..r {
        for j in 0..r {
            p[(d + i) * m + d + j] = sigma2 * p_arma[i * r + j];
        }
    }
    let zlen = d + 1; // Z = [1 (d times), 1, 0, ...]
    let mut llf = 0.0;
    let mut pz = [0.0; MAX_STATE];
    let mut tmp = vec![0.0; m * m];
    let mut prev = p.clone();
    let ln2pi = (2.0 * std::f64::consts::PI).ln();
    // Once P stops changing the filter is in steady state: gain and F are fixed and only the
    // state moves (statsmodels switches the same way, with a tighter tolerance; the effect on the
    // likelihood is far below the golden tests' tolerances).
    let mut steady: Option<(f64, f64)> = None; // (F, ln F)
    for (step, &yt) in y.iter().enumerate() {
        let pred: f64 = a[..zlen].iter().sum();
        if let Some((f, ln_f)) = steady {
            let v = yt - pred;
            if step >= d {
                llf -= 0.5 * (ln2pi + ln_f + v * v / f);
            }
            let mut af = [0.0; MAX_STATE];
            for i in 0..m {
                af[i] = a[i] + pz[i] * v / f;
            }
            for i in 0..m {
                a[i] = t_row(i, &af);
            }
            a[d] += c;
            continue;
        }
        for i in 0..m {
            pz[i] = p[i * m..i * m + zlen].iter().sum();
        }
        let f: f64 = pz[..zlen].iter().sum();
        if !(f > 0.0) || !f.is_finite() {
            return None;
        }
        let v = yt - pred;
        if step >= d {
            llf -= 0.5 * (ln2pi + f.ln() + v * v / f);
        }
        // Update.
        let mut af = [0.0; MAX_STATE];
        for i in 0..m {
            af[i] = a[i] + pz[i] * v / f;
        }
        for i in 0..m {
            for j in 0..m {
                p[i * m + j] -= pz[i] * pz[j] / f;
            }
        }
        // Predict: a = T·af + c·e_d;  P = T·P·T' + σ²·R·R'. T is sparse (see `t_row`), so
        // products cost O(m²) rather than O(m³).
        for i in 0..m {
            a[i] = t_row(i, &af);
        }
        a[d] += c;
        let mut col = [0.0; MAX_STATE];
        for j in 0..m {
            for k in 0..m {
                col[k] = p[k * m + j];
            }
            for i in 0..m {
                tmp[i * m + j] = t_row(i, &col);
            }
        }
        let mut delta = 0.0f64;
        let mut size = 0.0f64;
        for i in 0..m {
            let row: [f64; MAX_STATE] =
                std::array::from_fn(|k| if k < m { tmp[i * m + k] } else { 0.0 });
            for j in 0..m {
                let v = t_row(j, &row) + sigma2 * rvec[i] * rvec[j];
                delta = delta.max((v - prev[i * m + j]).abs());
                size = size.max(v.abs());
                p[i * m + j] = v;
            }
        }
        if step >= d && delta <= 1e-9 * size {
            for i in 0..m {
                pz[i] = p[i * m..i * m + zlen].iter().sum();
            }
            let f: f64 = pz[..zlen].iter().sum();
            steady = Some((f, f.ln()));
        }
        prev.copy_from_slice(&p);
    }
    let next: f64 = a[..zlen].iter().sum();
    let next_var: f64 = match steady {
        Some((f, _)) => f,
        None => (0..zlen)
            .map(|i| p[i * m..i * m + zlen].iter().sum::<f64>())
            .sum(),
    };
    Some(DiffuseOutput {
        llf,
        n_eff: y.len().saturating_sub(d),
        next,
        next_var,
    })
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
    fn reduced_d1_filter_equals_the_full_state_filter() {
        let y: Vec<f64> = (0..40)
            .map(|t| 50.0 + (f64::from(t) * 0.7).sin() * 9.0 + f64::from(t % 5))
            .collect();
        for (c, ar, ma) in [
            (0.0, vec![0.5], vec![0.3]),
            (1.5, vec![], vec![-0.6]),
            (0.2, vec![0.4, -0.2], vec![]),
        ] {
            let fast = diffuse_filter(&y, 1, c, &ar, &ma, 3.0, 1e6).expect("valid");
            let full = diffuse_filter_dense(&y, 1, c, &ar, &ma, 3.0, 1e6).expect("valid");
            assert!(
                (fast.llf - full.llf).abs() < 1e-8,
                "{ar:?} {ma:?}: {} vs {}",
                fast.llf,
                full.llf
            );
            assert!(
                (fast.next - full.next).abs() < 1e-8,
                "{} vs {}",
                fast.next,
                full.next
            );
            assert!((fast.next_var - full.next_var).abs() < 1e-8);
        }
    }

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
    fn ar1_stationary_variance() {
        let p = stationary_cov(&[0.5], &[1.0], 1).expect("stationary");
        assert!((p[0] - 1.0 / 0.75).abs() < 1e-12);
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
