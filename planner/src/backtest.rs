//! Scoring forecasters on a series: walk forward, predict each value before seeing it.

use serde::{Deserialize, Serialize};

use crate::forecast::{ForecastConfig, ForecasterKind};

/// Accuracy of one predictor on one series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BacktestScore {
    pub predictor: ForecasterKind,
    /// Points scored (finite actuals at or after the warm-up).
    pub scored: usize,
    /// Mean absolute percentage error over the scored points whose actual is non-zero, in %.
    pub mape_pct: f64,
    /// Points left out of the MAPE because the actual was zero.
    pub zero_actuals: usize,
    /// Root mean squared error.
    pub rmse: f64,
    /// Mean absolute error.
    pub mae: f64,
    /// Fraction of actuals inside the 95% prediction interval.
    pub coverage: f64,
    /// The forecast made for each index (`None` before the warm-up or where the actual was not
    /// finite), for plots.
    #[serde(skip)]
    pub predictions: Vec<Option<f64>>,
}

/// Walks `values` forward: at each index `t >= warmup` with a finite actual, predicts from
/// `values[..t]` and scores against `values[t]`. Non-finite values are fed to the forecaster (which
/// skips them) but not scored. `progress(done, total)` is called after every point.
pub fn backtest(
    values: &[f64],
    predictor: ForecasterKind,
    cfg: &ForecastConfig,
    warmup: usize,
    mut progress: impl FnMut(usize, usize),
) -> BacktestScore {
    let mut f = predictor.build(cfg);
    let (mut n, mut n_pct, mut zeros, mut covered) = (0usize, 0usize, 0usize, 0usize);
    let (mut ape, mut se, mut ae) = (0.0, 0.0, 0.0);
    let mut predictions = vec![None; values.len()];
    for (t, &actual) in values.iter().enumerate() {
        if t >= warmup.max(1) && actual.is_finite() && !f.is_empty() {
            let p = f.predict();
            predictions[t] = Some(p.point);
            let err = actual - p.point;
            n += 1;
            se += err * err;
            ae += err.abs();
            if actual != 0.0 {
                ape += (err / actual).abs();
                n_pct += 1;
            } else {
                zeros += 1;
            }
            if p.lower <= actual && actual <= p.upper {
                covered += 1;
            }
        }
        f.observe(actual);
        progress(t + 1, values.len());
    }
    let div = |a: f64, b: usize| if b == 0 { f64::NAN } else { a / b as f64 };
    BacktestScore {
        predictor,
        scored: n,
        mape_pct: 100.0 * div(ape, n_pct),
        zero_actuals: zeros,
        rmse: div(se, n).sqrt(),
        mae: div(ae, n),
        coverage: div(covered as f64, n),
        predictions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_on_a_ramp_is_off_by_the_step() {
        let ramp: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = backtest(
            &ramp,
            ForecasterKind::Last,
            &ForecastConfig::default(),
            5,
            |_, _| {},
        );
        assert_eq!(s.scored, 15);
        assert!((s.rmse - 1.0).abs() < 1e-12);
        assert!((s.mae - 1.0).abs() < 1e-12);
    }

    #[test]
    fn kalman_beats_last_value_on_a_trend() {
        let ramp: Vec<f64> = (1..=40).map(|t| 10.0 * f64::from(t)).collect();
        let cfg = ForecastConfig::default();
        let last = backtest(&ramp, ForecasterKind::Last, &cfg, 5, |_, _| {});
        let kal = backtest(&ramp, ForecasterKind::Kalman, &cfg, 5, |_, _| {});
        assert!(kal.rmse < last.rmse / 2.0, "{kal:?} vs {last:?}");
    }

    #[test]
    fn zeros_and_gaps_are_handled() {
        let v = [0.0, 1.0, f64::NAN, 0.0, 2.0, 3.0, 0.0];
        let s = backtest(
            &v,
            ForecasterKind::MovingAverage,
            &ForecastConfig::default(),
            1,
            |_, _| {},
        );
        assert_eq!(s.scored, 5);
        assert_eq!(s.zero_actuals, 2);
        assert!(s.mape_pct.is_finite());
    }
}
