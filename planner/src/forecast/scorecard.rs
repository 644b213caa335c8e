//! A forecaster that runs the others side by side and answers with the one whose recent
//! out-of-sample error is lowest.
//!
//! Every member sees every observation. Each interval, before a new value is observed, each
//! member's last one-step forecast is scored against it: the absolute error, doubled when the
//! forecast was short (an under-forecast costs SLO misses, an over-forecast only GPUs). The
//! scorecard keeps the last `MEMORY` errors per member and predicts with the member of the lowest
//! mean error. Until every member has been scored `MIN_SCORED` times it answers with its first
//! member (the configured default). Which member answered is `Forecaster::chosen`.

use std::collections::VecDeque;

use super::{Forecast, ForecastConfig, Forecaster, ForecasterKind};

/// Errors remembered per member (at 10 s intervals, five minutes).
const MEMORY: usize = 30;
/// Scored forecasts a member needs before it can be chosen.
const MIN_SCORED: usize = 6;

#[derive(Debug)]
struct Member {
    kind: ForecasterKind,
    model: Box<dyn Forecaster>,
    /// Its forecast for the interval not yet observed.
    pending: Option<f64>,
    errors: VecDeque<f64>,
}

impl Member {
    fn mean_error(&self) -> Option<f64> {
        (self.errors.len() >= MIN_SCORED)
            .then(|| self.errors.iter().sum::<f64>() / self.errors.len() as f64)
    }
}

/// The best recent forecaster of `members`.
#[derive(Debug)]
pub struct Scorecard {
    members: Vec<Member>,
    chosen: usize,
}

impl Scorecard {
    /// A scorecard over `kinds` (the first is the default until all are scored); `kinds` without
    /// `Best`, which would nest.
    pub fn new(kinds: &[ForecasterKind], cfg: &ForecastConfig) -> Self {
        let members = kinds
            .iter()
            .filter(|k| **k != ForecasterKind::Best)
            .map(|&kind| Member {
                kind,
                model: kind.build(cfg),
                pending: None,
                errors: VecDeque::with_capacity(MEMORY),
            })
            .collect();
        Self { members, chosen: 0 }
    }

    /// Each member's mean (weighted) error over its recent forecasts (`None` until scored enough).
    pub fn scores(&self) -> Vec<(ForecasterKind, Option<f64>)> {
        self.members
            .iter()
            .map(|m| (m.kind, m.mean_error()))
            .collect()
    }
}

impl Forecaster for Scorecard {
    fn name(&self) -> &'static str {
        "best"
    }

    fn observe(&mut self, value: f64) {
        for m in &mut self.members {
            if value.is_finite()
                && let Some(p) = m.pending.take()
            {
                if m.errors.len() == MEMORY {
                    m.errors.pop_front();
                }
                m.errors.push_back(if value > p {
                    2.0 * (value - p)
                } else {
                    p - value
                });
            }
            m.model.observe(value);
        }
    }

    fn predict(&mut self) -> Forecast {
        let mut out = Vec::with_capacity(self.members.len());
        for m in &mut self.members {
            let f = m.model.predict();
            m.pending = Some(f.point);
            out.push(f);
        }
        let scored: Option<Vec<f64>> = self.members.iter().map(Member::mean_error).collect();
        self.chosen = match scored {
            Some(e) => e
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(k, _)| k),
            None => 0,
        };
        out.get(self.chosen).copied().unwrap_or(Forecast::ZERO)
    }

    fn skipped(&self) -> u64 {
        self.members.first().map_or(0, |m| m.model.skipped())
    }

    fn len(&self) -> usize {
        self.members.first().map_or(0, |m| m.model.len())
    }

    fn chosen(&self) -> Option<&'static str> {
        self.members.get(self.chosen).map(|m| m.kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> Scorecard {
        Scorecard::new(
            &[
                ForecasterKind::Arima,
                ForecasterKind::Last,
                ForecasterKind::MovingAverage,
            ],
            &ForecastConfig::default(),
        )
    }

    #[test]
    fn the_default_answers_until_every_member_is_scored() {
        let mut c = card();
        for v in [10.0, 12.0, 11.0] {
            c.observe(v);
            c.predict();
        }
        assert_eq!(c.chosen(), Some("arima"));
        assert!(c.scores().iter().all(|(_, e)| e.is_none()));
    }

    #[test]
    fn a_ramp_is_followed_by_the_last_value_rather_than_the_mean() {
        // A steady climb: the moving average lags by its half-span, the last value by one step.
        let mut c = card();
        for k in 0..40 {
            c.observe(10.0 * f64::from(k));
            c.predict();
        }
        let s = c.scores();
        let err = |kind| s.iter().find(|(k, _)| *k == kind).and_then(|(_, e)| *e);
        assert!(err(ForecasterKind::Last) < err(ForecasterKind::MovingAverage));
        assert_ne!(c.chosen(), Some("ma"));
    }

    #[test]
    fn noise_around_a_level_is_followed_by_the_mean_rather_than_the_last_value() {
        let mut c = card();
        for k in 0..40 {
            c.observe(if k % 2 == 0 { 80.0 } else { 120.0 });
            c.predict();
        }
        let s = c.scores();
        let err = |kind| s.iter().find(|(k, _)| *k == kind).and_then(|(_, e)| *e);
        assert!(err(ForecasterKind::MovingAverage) < err(ForecasterKind::Last));
        assert_ne!(c.chosen(), Some("last"));
    }
}
