//! Tiny dense linear algebra for the forecasters (matrices up to ~36x36).
//!
//! Kept in-tree on purpose: the planner must stay dependency-light and the systems solved here are
//! small enough that a textbook Gaussian elimination with partial pivoting is the fastest option.

/// Solves `a · x = b` in place for a row-major `n x n` matrix `a`.
///
/// Returns `None` when the matrix is (numerically) singular. `a` and `b` are overwritten; on
/// success `b` holds the solution.
pub(crate) fn solve_in_place(a: &mut [f64], b: &mut [f64], n: usize) -> Option<()> {
    debug_assert_eq!(a.len(), n * n);
    debug_assert_eq!(b.len(), n);
    let scale = a
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    for col in 0..n {
        let mut piv = col;
        let mut best = a[col * n + col].abs();
        for row in col + 1..n {
            let v = a[row * n + col].abs();
            if v > best {
                best = v;
                piv = row;
            }
        }
        if best <= scale * 1e-13 || !best.is_finite() {
            return None;
        }
        if piv != col {
            for k in 0..n {
                a.swap(col * n + k, piv * n + k);
            }
            b.swap(col, piv);
        }
        let d = a[col * n + col];
        for row in col + 1..n {
            let f = a[row * n + col] / d;
            if f == 0.0 {
                continue;
            }
            for k in col..n {
                a[row * n + k] -= f * a[col * n + k];
            }
            b[row] -= f * b[col];
        }
    }
    for col in (0..n).rev() {
        let mut s = b[col];
        for k in col + 1..n {
            s -= a[col * n + k] * b[k];
        }
        b[col] = s / a[col * n + col];
    }
    b.iter().all(|v| v.is_finite()).then_some(())
}

/// Ordinary least squares: the coefficients minimising `|y - X·beta|²` for a row-major design
/// matrix with `k` columns. Solved through the normal equations, which is accurate enough for the
/// short, well-scaled regressions used to seed ARIMA fits.
pub(crate) fn ols(x: &[f64], y: &[f64], k: usize) -> Option<Vec<f64>> {
    let rows = y.len();
    if rows < k || x.len() != rows * k {
        return None;
    }
    let mut xtx = vec![0.0; k * k];
    let mut xty = vec![0.0; k];
    for r in 0..rows {
        let row = &x[r * k..(r + 1) * k];
        for i in 0..k {
            xty[i] += row[i] * y[r];
            for j in 0..k {
                xtx[i * k + j] += row[i] * row[j];
            }
        }
    }
    solve_in_place(&mut xtx, &mut xty, k)?;
    Some(xty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_small_system() {
        let mut a = vec![2.0, 1.0, 1.0, 3.0];
        let mut b = vec![3.0, 5.0];
        solve_in_place(&mut a, &mut b, 2).expect("regular");
        assert!((b[0] - 0.8).abs() < 1e-12 && (b[1] - 1.4).abs() < 1e-12);
    }

    #[test]
    fn singular_matrix_is_reported() {
        let mut a = vec![1.0, 2.0, 2.0, 4.0];
        let mut b = vec![1.0, 2.0];
        assert!(solve_in_place(&mut a, &mut b, 2).is_none());
    }

    #[test]
    fn ols_recovers_a_line() {
        let xs: Vec<f64> = (0..10).map(f64::from).collect();
        let design: Vec<f64> = xs.iter().flat_map(|&x| [1.0, x]).collect();
        let y: Vec<f64> = xs.iter().map(|x| 2.0 + 0.5 * x).collect();
        let beta = ols(&design, &y, 2).expect("full rank");
        assert!((beta[0] - 2.0).abs() < 1e-10 && (beta[1] - 0.5).abs() < 1e-10);
    }
}
