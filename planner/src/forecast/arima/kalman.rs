//! The ARMA likelihood's Kalman filters on Harvey's state-space form (see [`super::model`] for the
//! model): the stationary filter for `d = 0`, started from the stationary covariance (the
//! discrete Lyapunov equation, solved directly), and statsmodels' SARIMAX-style filter for
//! `d > 0` with approximately diffuse integration states.

// Numeric kernels index several arrays in lockstep; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use crate::linalg;

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
    fn ar1_stationary_variance() {
        let p = stationary_cov(&[0.5], &[1.0], 1).expect("stationary");
        assert!((p[0] - 1.0 / 0.75).abs() < 1e-12);
    }
}
