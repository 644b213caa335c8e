//! Small statistics shared by the router's load report, the load generator and the benchmarks.

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
}
