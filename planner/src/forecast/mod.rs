//! One-step-ahead forecasters for the planner's three series (requests per interval, mean ISL,
//! mean OSL).
//!
//! Every forecaster implements [`Forecaster`]: feed it one observation per interval with
//! [`Forecaster::observe`], ask for the next interval with [`Forecaster::predict`]. Non-finite
//! observations (an interval with no requests has no mean ISL) are skipped and counted; a
//! prediction is always finite and `>= 0` (these series are counts and lengths), with a
//! prediction interval around it.
//!
//! | name     | type                  | what it does                                                  |
//! |----------|-----------------------|---------------------------------------------------------------|
//! | `last`   | [`LastValue`]         | next = last observation                                       |
//! | `ma`     | [`MovingAverage`]     | next = mean of the last `span` observations                   |
//! | `arima`  | [`ArimaForecaster`]   | auto-ARIMA refitted on a sliding window (pmdarima defaults)   |
//! | `kalman` | [`LocalLinearTrend`]  | local-linear-trend Kalman filter, noise ratios by likelihood  |
//! | `best`   | [`Scorecard`]         | all of the above; answers with the lowest recent error        |

mod arima;
mod kalman;
mod scorecard;

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub use arima::{
    ArimaConfig, ArimaFit, ArimaForecaster, ArimaOrder, ArimaWarmState, ArmaParams,
    AutoArimaResult, Candidate, FitError, KpssResult, auto_arima, auto_arima_warm, difference,
    fit_arima, is_invertible, is_stationary, kpss, loglike, min_root_modulus, ndiffs,
};
pub use kalman::LocalLinearTrend;
pub use scorecard::Scorecard;

/// z-value of a two-sided 95% normal interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A one-step-ahead forecast: point and prediction interval, all finite and `>= 0`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub point: f64,
    pub lower: f64,
    pub upper: f64,
}

impl Forecast {
    /// Builds a forecast from a point and a variance, repairing anything non-finite: a bad point
    /// becomes `fallback`, a bad variance becomes zero width, and everything is clamped at 0.
    pub fn new(point: f64, variance: f64, fallback: f64) -> Self {
        let point = if point.is_finite() { point } else { fallback };
        let point = if point.is_finite() {
            point.max(0.0)
        } else {
            0.0
        };
        let sd = if variance.is_finite() && variance > 0.0 {
            variance.sqrt()
        } else {
            0.0
        };
        let upper = point + Z95 * sd;
        Self {
            point,
            lower: (point - Z95 * sd).max(0.0),
            upper: if upper.is_finite() { upper } else { point },
        }
    }

    /// A forecast with no information: zero.
    pub const ZERO: Self = Self {
        point: 0.0,
        lower: 0.0,
        upper: 0.0,
    };
}

/// The common interface of all forecasters.
pub trait Forecaster: Send + Sync + std::fmt::Debug {
    /// Short name used on the command line and in metrics.
    fn name(&self) -> &'static str;
    /// Adds the latest interval's value. Non-finite values are skipped and counted.
    fn observe(&mut self, value: f64);
    /// Forecast of the next interval. Takes `&mut self` so models may cache their fits.
    fn predict(&mut self) -> Forecast;
    /// Number of non-finite observations skipped so far.
    fn skipped(&self) -> u64;
    /// Number of finite observations currently held (at most the window).
    fn len(&self) -> usize;
    /// True before the first finite observation.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// For a forecaster that chooses among others, the one whose forecast the last `predict`
    /// returned.
    fn chosen(&self) -> Option<&'static str> {
        None
    }
}

/// Forecaster names accepted by [`ForecasterKind::from_str`](std::str::FromStr).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForecasterKind {
    Last,
    #[serde(rename = "ma")]
    MovingAverage,
    Arima,
    Kalman,
    /// The scorecard: each of the others, the one with the lowest recent error answering.
    Best,
}

impl ForecasterKind {
    pub const ALL: [Self; 5] = [
        Self::Last,
        Self::MovingAverage,
        Self::Arima,
        Self::Kalman,
        Self::Best,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::MovingAverage => "ma",
            Self::Arima => "arima",
            Self::Kalman => "kalman",
            Self::Best => "best",
        }
    }

    /// Builds a fresh forecaster of this kind.
    pub fn build(&self, cfg: &ForecastConfig) -> Box<dyn Forecaster> {
        match self {
            Self::Last => Box::new(LastValue::new(cfg.window)),
            Self::MovingAverage => Box::new(MovingAverage::new(cfg.window, cfg.ma_span)),
            Self::Arima => Box::new(ArimaForecaster::new(cfg.window, cfg.arima.clone())),
            Self::Kalman => Box::new(LocalLinearTrend::new(cfg.window)),
            Self::Best => Box::new(Scorecard::new(
                &[Self::Arima, Self::Kalman, Self::MovingAverage, Self::Last],
                cfg,
            )),
        }
    }
}

impl std::fmt::Display for ForecasterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ForecasterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "last" | "last-value" => Ok(Self::Last),
            "ma" | "moving-average" => Ok(Self::MovingAverage),
            "arima" => Ok(Self::Arima),
            "kalman" => Ok(Self::Kalman),
            "best" | "scorecard" => Ok(Self::Best),
            other => Err(format!(
                "unknown predictor {other:?}: expected arima, kalman, last, ma or best"
            )),
        }
    }
}

/// Settings shared by the forecasters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForecastConfig {
    /// Observations kept (the sliding window). Dynamo's SLA planner and DOPD use 50.
    pub window: usize,
    /// Span of the moving average.
    pub ma_span: usize,
    /// ARIMA settings.
    pub arima: ArimaConfig,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            window: 50,
            ma_span: 5,
            arima: ArimaConfig::default(),
        }
    }
}

/// A sliding window of finite observations plus a count of skipped ones.
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    values: VecDeque<f64>,
    cap: usize,
    skipped: u64,
}

impl History {
    pub fn new(cap: usize) -> Self {
        Self {
            values: VecDeque::with_capacity(cap.max(1)),
            cap: cap.max(1),
            skipped: 0,
        }
    }

    /// Stores a finite value (dropping the oldest beyond the window); counts a non-finite one.
    pub fn push(&mut self, v: f64) -> bool {
        if !v.is_finite() {
            self.skipped += 1;
            return false;
        }
        if self.values.len() == self.cap {
            self.values.pop_front();
        }
        self.values.push_back(v);
        true
    }

    pub fn last(&self) -> Option<f64> {
        self.values.back().copied()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn to_vec(&self) -> Vec<f64> {
        self.values.iter().copied().collect()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &f64> + ExactSizeIterator {
        self.values.iter()
    }

    /// Variance of the first differences: the one-step error variance of a random walk, used for
    /// the intervals of the simple forecasters.
    pub fn diff_variance(&self) -> f64 {
        if self.values.len() < 3 {
            return 0.0;
        }
        let d: Vec<f64> = self
            .values
            .iter()
            .zip(self.values.iter().skip(1))
            .map(|(a, b)| b - a)
            .collect();
        d.iter().map(|x| x * x).sum::<f64>() / d.len() as f64
    }
}

/// Next value = last value; the interval is that of a random walk.
#[derive(Clone, Debug)]
pub struct LastValue {
    hist: History,
}

impl LastValue {
    pub fn new(window: usize) -> Self {
        Self {
            hist: History::new(window),
        }
    }
}

impl Forecaster for LastValue {
    fn name(&self) -> &'static str {
        "last"
    }
    fn observe(&mut self, value: f64) {
        self.hist.push(value);
    }
    fn predict(&mut self) -> Forecast {
        match self.hist.last() {
            Some(v) => Forecast::new(v, self.hist.diff_variance(), 0.0),
            None => Forecast::ZERO,
        }
    }
    fn skipped(&self) -> u64 {
        self.hist.skipped()
    }
    fn len(&self) -> usize {
        self.hist.len()
    }
}

/// Next value = mean of the last `span` values; the interval uses their sample variance.
#[derive(Clone, Debug)]
pub struct MovingAverage {
    hist: History,
    span: usize,
}

impl MovingAverage {
    pub fn new(window: usize, span: usize) -> Self {
        Self {
            hist: History::new(window.max(span)),
            span: span.max(1),
        }
    }
}

impl Forecaster for MovingAverage {
    fn name(&self) -> &'static str {
        "ma"
    }
    fn observe(&mut self, value: f64) {
        self.hist.push(value);
    }
    fn predict(&mut self) -> Forecast {
        let k = self.span.min(self.hist.len());
        if k == 0 {
            return Forecast::ZERO;
        }
        let tail: Vec<f64> = self.hist.iter().rev().take(k).copied().collect();
        let mean = tail.iter().sum::<f64>() / k as f64;
        // Variance of a new value around the mean of k: s²·(1 + 1/k).
        let var = if k > 1 {
            tail.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (k - 1) as f64
                * (1.0 + 1.0 / k as f64)
        } else {
            0.0
        };
        Forecast::new(mean, var, self.hist.last().unwrap_or(0.0))
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
    fn non_finite_inputs_are_skipped_and_counted() {
        for kind in ForecasterKind::ALL {
            let mut f = kind.build(&ForecastConfig::default());
            for v in [1.0, f64::NAN, 2.0, f64::INFINITY, 3.0] {
                f.observe(v);
            }
            assert_eq!(f.skipped(), 2, "{kind}");
            assert_eq!(f.len(), 3, "{kind}");
            let p = f.predict();
            assert!(p.point.is_finite() && p.point >= 0.0, "{kind}: {p:?}");
        }
    }

    #[test]
    fn empty_forecasters_predict_zero() {
        for kind in ForecasterKind::ALL {
            let mut f = kind.build(&ForecastConfig::default());
            assert_eq!(f.predict(), Forecast::ZERO, "{kind}");
        }
    }

    #[test]
    fn moving_average_uses_its_span() {
        let mut f = MovingAverage::new(50, 3);
        for v in [100.0, 1.0, 2.0, 3.0] {
            f.observe(v);
        }
        assert_eq!(f.predict().point, 2.0);
    }

    #[test]
    fn last_value_repeats_the_last_observation() {
        let mut f = LastValue::new(50);
        for v in [5.0, 7.0] {
            f.observe(v);
        }
        let p = f.predict();
        assert_eq!(p.point, 7.0);
        assert!(p.lower <= 7.0 && p.upper >= 7.0);
    }

    #[test]
    fn forecasts_are_clamped_at_zero() {
        let f = Forecast::new(-3.0, 4.0, 0.0);
        assert_eq!(f.point, 0.0);
        assert_eq!(f.lower, 0.0);
        let g = Forecast::new(f64::NAN, f64::NAN, 2.0);
        assert_eq!(
            g,
            Forecast {
                point: 2.0,
                lower: 2.0,
                upper: 2.0
            }
        );
    }

    #[test]
    fn names_parse_back() {
        for kind in ForecasterKind::ALL {
            assert_eq!(kind.as_str().parse::<ForecasterKind>(), Ok(kind));
        }
        assert!("prophet".parse::<ForecasterKind>().is_err());
    }
}

/// Forecasts of the next interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadForecast {
    pub requests: Forecast,
    pub isl: Forecast,
    pub osl: Forecast,
}
