//! Quasi-Newton minimiser (BFGS with a backtracking Armijo line search and central-difference
//! gradients) used to maximise ARIMA likelihoods.
//!
//! statsmodels uses scipy's L-BFGS-B for the same job; for at most a dozen parameters a dense
//! inverse-Hessian BFGS converges in fewer function evaluations, which is what the tick budget
//! cares about. The objective may return `f64::INFINITY` (or NaN) for invalid points; the line
//! search treats those as "too far" and backs off.

/// Settings for [`minimize`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// Stop when the largest gradient component is below this.
    pub gtol: f64,
    /// Stop when an iteration improves the objective by less than `ftol * (1 + |f|)`, twice in a row.
    pub ftol: f64,
    /// Iteration cap.
    pub max_iter: usize,
    /// Central differences (2k evaluations per gradient) instead of forward ones (k).
    pub central: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            gtol: 1e-7,
            ftol: 1e-12,
            max_iter: 200,
            central: true,
        }
    }
}

/// Result of a minimisation.
#[derive(Clone, Debug)]
pub(crate) struct Minimum {
    pub x: Vec<f64>,
    pub f: f64,
    #[allow(dead_code)] // kept for diagnostics and tests
    pub iterations: usize,
    #[allow(dead_code)]
    pub evaluations: usize,
    pub converged: bool,
    /// Inverse-Hessian approximation at `x` (row-major `k x k`), for warm restarts.
    pub h: Vec<f64>,
}

fn gradient(
    f: &mut impl FnMut(&[f64]) -> f64,
    x: &[f64],
    fx: f64,
    central: bool,
    evals: &mut usize,
) -> Vec<f64> {
    let mut g = vec![0.0; x.len()];
    let mut xp = x.to_vec();
    if !central {
        for i in 0..x.len() {
            let h = 1e-7 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = if fp.is_finite() { fp } else { f(&xp) };
            xp[i] = x[i];
            *evals += 1;
            g[i] = if fp.is_finite() {
                (fp - fx) / h
            } else if fm.is_finite() {
                (fx - fm) / h
            } else {
                0.0
            };
        }
        return g;
    }
    for i in 0..x.len() {
        let h = 1e-6 * x[i].abs().max(1.0);
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        *evals += 2;
        g[i] = if fp.is_finite() && fm.is_finite() {
            (fp - fm) / (2.0 * h)
        } else {
            // One-sided difference when one side leaves the valid region.
            if fp.is_finite() {
                (fp - fx) / h
            } else if fm.is_finite() {
                (fx - fm) / h
            } else {
                0.0
            }
        };
    }
    g
}

/// Minimises `f` from `x0`. `f` must be finite at `x0`, otherwise the start is returned as is.
pub(crate) fn minimize(f: impl FnMut(&[f64]) -> f64, x0: &[f64], s: Settings) -> Minimum {
    minimize_from(f, x0, None, s)
}

/// [`minimize`] with an initial inverse-Hessian approximation (e.g. from the optimum of a
/// neighbouring problem), which lets a warm start converge in a few iterations.
pub(crate) fn minimize_from(
    mut f: impl FnMut(&[f64]) -> f64,
    x0: &[f64],
    h0: Option<&[f64]>,
    s: Settings,
) -> Minimum {
    let k = x0.len();
    let mut x = x0.to_vec();
    let mut fx = f(&x);
    let mut evals = 1;
    if !fx.is_finite() || k == 0 {
        return Minimum {
            x,
            f: fx,
            iterations: 0,
            evaluations: evals,
            converged: k == 0,
            h: identity(k),
        };
    }
    let mut g = gradient(&mut f, &x, fx, s.central, &mut evals);
    let warm_h = h0.filter(|h| h.len() == k * k && h.iter().all(|v| v.is_finite()));
    let mut h = warm_h.map_or_else(|| identity(k), <[f64]>::to_vec);
    let mut first = warm_h.is_none();
    let mut stalls = 0;
    let mut converged = false;
    let mut iter = 0;
    while iter < s.max_iter {
        iter += 1;
        if g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < s.gtol {
            converged = true;
            break;
        }
        let mut d = mat_vec(&h, &g, k);
        d.iter_mut().for_each(|v| *v = -*v);
        let mut slope = dot(&g, &d);
        if slope >= 0.0 || !slope.is_finite() {
            h = identity(k);
            d = g.iter().map(|v| -v).collect();
            slope = dot(&g, &d);
        }
        // Backtracking line search with the Armijo condition.
        let mut alpha = 1.0;
        let mut accepted = None;
        for _ in 0..40 {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a + alpha * b).collect();
            let fn_ = f(&xn);
            evals += 1;
            if fn_.is_finite() && fn_ <= fx + 1e-4 * alpha * slope {
                accepted = Some((xn, fn_));
                break;
            }
            alpha *= 0.5;
        }
        let Some((xn, fn_)) = accepted else {
            // No descent along d: converged as far as the numerics allow.
            converged = g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < s.gtol.sqrt();
            break;
        };
        let gn = gradient(&mut f, &xn, fn_, s.central, &mut evals);
        let sv: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&sv, &yv);
        if sy > 1e-14 {
            if first {
                let yy = dot(&yv, &yv);
                let scale = sy / yy;
                h.iter_mut().for_each(|v| *v *= scale);
                first = false;
            }
            bfgs_update(&mut h, &sv, &yv, sy, k);
        }
        let improvement = fx - fn_;
        x = xn;
        g = gn;
        fx = fn_;
        if improvement <= s.ftol * (1.0 + fx.abs()) {
            stalls += 1;
            if stalls >= 2 {
                converged = true;
                break;
            }
        } else {
            stalls = 0;
        }
    }
    Minimum {
        x,
        f: fx,
        iterations: iter,
        evaluations: evals,
        converged,
        h,
    }
}

fn identity(k: usize) -> Vec<f64> {
    let mut m = vec![0.0; k * k];
    (0..k).for_each(|i| m[i * k + i] = 1.0);
    m
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn mat_vec(m: &[f64], v: &[f64], k: usize) -> Vec<f64> {
    (0..k).map(|i| dot(&m[i * k..(i + 1) * k], v)).collect()
}

/// Inverse-Hessian BFGS update: H += (1 + y'Hy/sy)·ss'/sy − (Hy s' + s y'H)/sy.
fn bfgs_update(h: &mut [f64], s: &[f64], y: &[f64], sy: f64, k: usize) {
    let hy = mat_vec(h, y, k);
    let yhy = dot(y, &hy);
    let c = (1.0 + yhy / sy) / sy;
    for i in 0..k {
        for j in 0..k {
            h[i * k + j] += c * s[i] * s[j] - (hy[i] * s[j] + s[i] * hy[j]) / sy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimises_the_rosenbrock_function() {
        let rosen = |x: &[f64]| (1.0 - x[0]).powi(2) + 100.0 * (x[1] - x[0] * x[0]).powi(2);
        let m = minimize(
            rosen,
            &[-1.2, 1.0],
            Settings {
                max_iter: 500,
                ..Settings::default()
            },
        );
        assert!(
            (m.x[0] - 1.0).abs() < 1e-4 && (m.x[1] - 1.0).abs() < 1e-4,
            "{m:?}"
        );
    }

    #[test]
    fn backs_off_from_invalid_regions() {
        // Valid only for x > 0; the minimum of x - ln x is at x = 1.
        let f = |x: &[f64]| {
            if x[0] <= 0.0 {
                f64::INFINITY
            } else {
                x[0] - x[0].ln()
            }
        };
        let m = minimize(f, &[5.0], Settings::default());
        assert!((m.x[0] - 1.0).abs() < 1e-5, "{m:?}");
    }
}
