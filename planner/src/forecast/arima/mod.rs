//! ARIMA forecasting: exact-likelihood fits ([`model`]), automatic order selection ([`auto`])
//! and the sliding-window [`ArimaForecaster`].

mod auto;
mod kalman;
mod model;
mod optim;
mod poly;

pub use auto::{
    ArimaConfig, ArimaWarmState, AutoArimaResult, Candidate, KpssResult, auto_arima,
    auto_arima_warm, kpss, ndiffs,
};
pub use model::{ArimaFit, ArimaOrder, ArmaParams, FitError, fit as fit_arima, loglike};
pub use poly::{difference, is_invertible, is_stationary, min_root_modulus};

use super::{Forecast, Forecaster, History};

/// Auto-ARIMA refitted on a sliding window at every prediction (DOPD's forecaster).
///
/// Fewer than `min_history` points, a failed fit or a non-finite forecast fall back to the last
/// value, as the DOPD code does.
#[derive(Clone, Debug)]
pub struct ArimaForecaster {
    hist: History,
    cfg: ArimaConfig,
    last_fit: Option<ArimaFit>,
    fallbacks: u64,
    warm: ArimaWarmState,
}

impl ArimaForecaster {
    pub fn new(window: usize, cfg: ArimaConfig) -> Self {
        Self {
            hist: History::new(window),
            cfg,
            last_fit: None,
            fallbacks: 0,
            warm: ArimaWarmState::default(),
        }
    }

    /// The model behind the last prediction, if it came from a fit.
    pub fn last_fit(&self) -> Option<&ArimaFit> {
        self.last_fit.as_ref()
    }

    /// Predictions that fell back to the last value because a fit failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }
}

impl Forecaster for ArimaForecaster {
    fn name(&self) -> &'static str {
        "arima"
    }
    fn observe(&mut self, value: f64) {
        self.hist.push(value);
    }
    fn predict(&mut self) -> Forecast {
        let Some(last) = self.hist.last() else {
            return Forecast::ZERO;
        };
        self.last_fit = None;
        if self.hist.len() < self.cfg.min_history.max(1) {
            return Forecast::new(last, self.hist.diff_variance(), last);
        }
        let y = self.hist.to_vec();
        let fit = match self.cfg.order {
            Some(order) => fit_arima(&y, order),
            None => auto_arima_warm(&y, &self.cfg, &mut self.warm).map(|r| r.best),
        };
        match fit {
            Ok(fit) if fit.forecast.is_finite() => {
                let f = Forecast::new(fit.forecast, fit.forecast_var, last);
                self.last_fit = Some(fit);
                f
            }
            _ => {
                self.fallbacks += 1;
                Forecast::new(last, self.hist.diff_variance(), last)
            }
        }
    }
    fn skipped(&self) -> u64 {
        self.hist.skipped()
    }
    fn len(&self) -> usize {
        self.hist.len()
    }
}
