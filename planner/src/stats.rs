//! Small statistics shared by the router's load report, the load generator, the benchmarks and the
//! planner's trend estimates.

/// Nearest-rank quantile `q` (0..=1) of `sorted` (ascending): the smallest value with at least
/// `q` of the sample at or below it. NaN for an empty sample.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts `v` (NaN last) and returns its nearest-rank quantiles at `qs`.
pub fn quantiles<const N: usize>(v: &mut [f64], qs: [f64; N]) -> [f64; N] {
    v.sort_by(f64::total_cmp);
    qs.map(|q| nearest_rank(v, q))
}

/// Least-squares line through `y` against its indices `0, 1, …`: the slope, and the standard
/// error of the slope (`None` with fewer than two points; the error is NaN with two).
pub fn trend_line(y: &[f64]) -> Option<(f64, f64)> {
    if y.len() < 2 {
        return None;
    }
    let n = y.len() as f64;
    let mx = (n - 1.0) / 2.0;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, v) in y.iter().enumerate() {
        sxy += (i as f64 - mx) * (v - my);
        sxx += (i as f64 - mx).powi(2);
    }
    let slope = sxy / sxx;
    let resid: f64 = y
        .iter()
        .enumerate()
        .map(|(i, v)| (v - my - slope * (i as f64 - mx)).powi(2))
        .sum();
    Some((slope, (resid / (n - 2.0) / sxx).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_matches_the_definition() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.5), 50.0);
        assert_eq!(nearest_rank(&v, 0.99), 99.0);
        assert_eq!(nearest_rank(&v, 1.0), 100.0);
        assert_eq!(nearest_rank(&v, 0.0), 1.0);
        assert_eq!(nearest_rank(&[7.0], 0.9), 7.0);
        assert!(nearest_rank(&[], 0.5).is_nan());
        let mut w = vec![3.0, 1.0, 2.0];
        assert_eq!(quantiles(&mut w, [0.5, 1.0]), [2.0, 3.0]);
    }

    #[test]
    fn trend_line_finds_the_slope_and_its_error() {
        assert_eq!(trend_line(&[1.0, 3.0, 5.0, 7.0]), Some((2.0, 0.0)));
        let (slope, se) = trend_line(&[0.0, 2.0, 1.0, 3.0]).expect("four points");
        assert!((slope - 0.8).abs() < 1e-12, "{slope}");
        assert!(se > 0.0 && se < slope, "{se}");
        assert!(trend_line(&[5.0]).is_none());
    }
}
