//! Polynomials of the ARIMA model: differencing, the partial-autocorrelation (Monahan/Jones)
//! transform between PACF values and AR coefficients, and the stationarity and invertibility
//! tests by root modulus.

// Numeric kernels index several arrays in lockstep; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

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

pub(super) fn to_unconstrained(pacf: &[f64]) -> Vec<f64> {
    pacf.iter().map(|r| r / (1.0 - r * r).sqrt()).collect()
}

pub(super) fn to_pacf(u: &[f64]) -> Vec<f64> {
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
