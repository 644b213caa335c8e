//! Automatic order selection in the manner of pmdarima's `auto_arima` with its defaults, which is
//! what the DOPD authors call (`auto_arima(y, suppress_warnings=True, error_action="ignore")`).
//!
//! What pmdarima 2.0.4 does, step by step (read from its source; mirrored here):
//! 1. `d` from repeated KPSS level-stationarity tests (α = 0.05, `lshort` lag rule), at most 2
//!    ([`ndiffs`]). A constant series is not differenced.
//! 2. A constant (intercept, or drift after one difference) is used when `d ≤ 1`.
//! 3. Stepwise search (Hyndman–Khandakar), minimising AIC: fit ARMA(2,2), (0,0), (1,0), (0,1) and,
//!    with a constant, (0,0) without it. Then repeatedly try, from the current (p,q), the moves
//!    p−1, q−1, p+1, q+1, (p−1,q−1), (p−1,q+1), (p+1,q−1), (p+1,q+1) and finally toggling the
//!    constant; the first move that lowers the AIC is taken and the pass starts again. It stops
//!    after a pass without new fits, or after 100 models. p and q are capped at 5; pmdarima's
//!    `max_order` is not applied by its stepwise solver, so neither is it here.
//! 4. A fit whose largest inverse root is above 0.99 is rejected (AIC = ∞). pmdarima checks the
//!    AR roots and then, for models with an MA part, *replaces* that check by the MA roots; we keep
//!    that quirk so that the same models are rejected.
//! 5. p and q are capped at a third of the sample; with fewer than 10 points the start order is
//!    at most (1,1).
//!
//! Deliberate differences: pmdarima stops L-BFGS after 50 iterations; we run BFGS to convergence,
//! so near-tied AICs can order differently. Fits that statsmodels cannot start also differ.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::model::{self, ArimaFit, ArimaOrder, ArmaParams, FitError, WarmPoint};
use super::poly;

/// Settings of the automatic search (pmdarima's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArimaConfig {
    /// With fewer finite observations than this, forecast the last value.
    pub min_history: usize,
    pub start_p: usize,
    pub start_q: usize,
    pub max_p: usize,
    pub max_q: usize,
    pub max_d: usize,
    /// Significance level of the KPSS test.
    pub kpss_alpha: f64,
    /// Reject fits whose largest inverse AR/MA root exceeds this.
    pub max_inverse_root: f64,
    /// Stop the stepwise search after this many fitted models.
    pub max_models: usize,
    /// Skip the search and always fit this order.
    pub order: Option<ArimaOrder>,
    /// With warm starts (the forecaster's default), every this many searches is run cold —
    /// every candidate from its multi-start — so the choice cannot drift from what a fresh
    /// search would pick. 1 makes every search cold.
    pub cold_search_every: u64,
}

impl Default for ArimaConfig {
    fn default() -> Self {
        Self {
            min_history: 5,
            start_p: 2,
            start_q: 2,
            max_p: 5,
            max_q: 5,
            max_d: 2,
            kpss_alpha: 0.05,
            max_inverse_root: 0.99,
            max_models: 100,
            order: None,
            cold_search_every: 10,
        }
    }
}

/// KPSS level-stationarity test result.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KpssResult {
    pub stat: f64,
    /// Interpolated from the tabulated critical values, clamped to [0.01, 0.10].
    pub pvalue: f64,
    pub lags: usize,
}

/// KPSS test of level stationarity, as pmdarima's `KPSSTest(null="level", lshort=True)` and R's
/// `tseries::kpss.test`: residuals from the mean, Bartlett-weighted long-run variance with
/// `trunc(4·(n/100)^¼)` lags, p-value by linear interpolation in the Kwiatkowski et al. table.
pub fn kpss(x: &[f64]) -> Option<KpssResult> {
    let n = x.len();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let mean = x.iter().sum::<f64>() / nf;
    let e: Vec<f64> = x.iter().map(|v| v - mean).collect();
    let mut s = 0.0;
    let mut eta = 0.0;
    for v in &e {
        s += v;
        eta += s * s;
    }
    eta /= nf * nf;
    let mut s2 = e.iter().map(|v| v * v).sum::<f64>() / nf;
    let lags = (4.0 * (nf / 100.0).powf(0.25)).trunc() as usize;
    let mut acc = 0.0;
    for i in 1..=lags {
        let cov: f64 = (i..n).map(|j| e[j] * e[j - i]).sum();
        acc += cov * (1.0 - i as f64 / (lags as f64 + 1.0));
    }
    s2 += 2.0 * acc / nf;
    let stat = eta / s2;
    if !stat.is_finite() {
        return None;
    }
    // Critical values for level stationarity (Kwiatkowski et al. 1992, table 1).
    const STAT: [f64; 4] = [0.347, 0.463, 0.574, 0.739];
    const P: [f64; 4] = [0.10, 0.05, 0.025, 0.01];
    let pvalue = if stat <= STAT[0] {
        P[0]
    } else if stat >= STAT[3] {
        P[3]
    } else {
        let i = STAT.iter().rposition(|c| *c <= stat).unwrap_or(0);
        let f = (stat - STAT[i]) / (STAT[i + 1] - STAT[i]);
        P[i] + f * (P[i + 1] - P[i])
    };
    Some(KpssResult { stat, pvalue, lags })
}

fn is_constant(x: &[f64]) -> bool {
    x.iter().all(|v| *v == x[0])
}

/// Number of differences needed for stationarity by repeated KPSS tests (pmdarima's `ndiffs`).
pub fn ndiffs(x: &[f64], alpha: f64, max_d: usize) -> usize {
    if x.is_empty() || is_constant(x) {
        return 0;
    }
    let Some(mut res) = kpss(x) else { return 0 };
    let mut d = 0;
    let mut w = x.to_vec();
    while res.pvalue < alpha && d < max_d {
        d += 1;
        w = poly::difference(&w, 1);
        if w.is_empty() || is_constant(&w) {
            return d;
        }
        match kpss(&w) {
            Some(r) => res = r,
            None => return d - 1,
        }
    }
    d
}

/// A model tried by the search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub order: ArimaOrder,
    /// AIC, or `None` when the fit failed or was rejected for near-unit roots.
    pub aic: Option<f64>,
}

/// The chosen model plus what the search did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoArimaResult {
    pub best: ArimaFit,
    pub ndiffs: usize,
    pub candidates: Vec<Candidate>,
}

/// Largest inverse root, checked the way pmdarima's `_root_test` does (see the module docs).
fn max_inverse_root(fit: &ArimaFit) -> f64 {
    let mut m = 0.0f64;
    if fit.order.p > 0 {
        let c: Vec<f64> = fit.params.ar.iter().map(|v| -v).collect();
        m = 1.0 / poly::min_root_modulus(&c);
    }
    if fit.order.q > 0 {
        m = 1.0 / poly::min_root_modulus(&fit.params.ma);
    }
    m
}

/// A fit of a series whose differenced values are constant: exact, zero-variance.
fn exact_fit(y: &[f64], d: usize, constant: bool) -> ArimaFit {
    let w = poly::difference(y, d);
    let step = if constant {
        w.first().copied().unwrap_or(0.0)
    } else {
        0.0
    };
    let mut next = step;
    // Undifference: y_{n+1} = w + Σ (−1)^{k+1} C(d,k) y_{n+1−k}.
    let n = y.len();
    let mut binom = 1.0;
    for k in 1..=d {
        binom = binom * (d + 1 - k) as f64 / k as f64;
        let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
        next += sign * binom * y[n - k];
    }
    ArimaFit {
        order: ArimaOrder::new(0, d, 0, constant),
        params: ArmaParams {
            constant: step,
            ar: vec![],
            ma: vec![],
            sigma2: 0.0,
        },
        llf: f64::INFINITY,
        aic: f64::NEG_INFINITY,
        nobs: w.len(),
        forecast: next,
        forecast_var: 0.0,
        converged: true,
    }
}

struct Search<'a> {
    y: &'a [f64],
    d: usize,
    cfg: &'a ArimaConfig,
    fits: Vec<(ArimaOrder, Option<ArimaFit>)>,
    best: Option<usize>,
    /// Optima of the previous search, used as starting points (warm mode).
    warm: Option<&'a HashMap<ArimaOrder, WarmPoint>>,
    /// Optima of this search, for the next one.
    optima: HashMap<ArimaOrder, WarmPoint>,
}

impl Search<'_> {
    fn aic_of(&self, i: usize) -> f64 {
        self.fits[i].1.as_ref().map_or(f64::INFINITY, |f| f.aic)
    }

    /// Fits `(p, d, q)` unless already fitted; returns true when it became the best model.
    fn try_fit(&mut self, p: usize, q: usize, constant: bool) -> bool {
        let order = ArimaOrder::new(p, self.d, q, constant);
        if self.fits.iter().any(|(o, _)| *o == order) {
            return false;
        }
        let start = self.warm.and_then(|w| w.get(&order));
        let fit = match model::fit_warm(self.y, order, model::Precision::Search, start) {
            Ok((f, x)) => {
                self.optima.insert(order, x);
                Some(f)
            }
            Err(_) => None,
        }
        .filter(|f| f.aic.is_finite() && max_inverse_root(f) <= self.cfg.max_inverse_root);
        self.fits.push((order, fit));
        let i = self.fits.len() - 1;
        if self.fits[i].1.is_none() {
            return false;
        }
        match self.best {
            Some(b) if self.aic_of(i) >= self.aic_of(b) => false,
            _ => {
                self.best = Some(i);
                true
            }
        }
    }

    fn budget_left(&self) -> bool {
        self.fits.len() < self.cfg.max_models
    }
}

/// Optimiser state carried between the searches of a sliding window: each candidate order's last
/// optimum. Consecutive windows share all but one point, so starting there converges in a few
/// iterations instead of a multi-start search.
#[derive(Clone, Debug, Default)]
pub struct ArimaWarmState {
    optima: HashMap<ArimaOrder, WarmPoint>,
    searches: u64,
}

impl ArimaWarmState {
    /// Searches run so far.
    pub fn searches(&self) -> u64 {
        self.searches
    }
}

/// Chooses and fits an ARIMA model for `y` (see the module docs), every candidate from a cold
/// multi-start. This is the reference the golden tests compare with pmdarima.
pub fn auto_arima(y: &[f64], cfg: &ArimaConfig) -> Result<AutoArimaResult, FitError> {
    search(y, cfg, None).map(|(r, _)| r)
}

/// [`auto_arima`] warm-started from `state` (and updating it); every
/// `cfg.cold_search_every`-th search is cold.
pub fn auto_arima_warm(
    y: &[f64],
    cfg: &ArimaConfig,
    state: &mut ArimaWarmState,
) -> Result<AutoArimaResult, FitError> {
    let cold = cfg.cold_search_every <= 1 || state.searches.is_multiple_of(cfg.cold_search_every);
    state.searches += 1;
    let result = if cold {
        search(y, cfg, None)
    } else {
        search(y, cfg, Some(&state.optima))
    };
    let (r, optima) = result?;
    // Keep every order seen: the stepwise path wanders, and an order fitted a few windows ago is
    // still a far better start than a cold multi-start.
    state.optima.extend(optima);
    Ok(r)
}

fn search(
    y: &[f64],
    cfg: &ArimaConfig,
    warm: Option<&HashMap<ArimaOrder, WarmPoint>>,
) -> Result<(AutoArimaResult, HashMap<ArimaOrder, WarmPoint>), FitError> {
    if y.is_empty() || is_constant(y) {
        // pmdarima fits a (0,0,0) model without intercept here, which forecasts 0; a constant
        // series is far better served by its value.
        let best = exact_fit(y, 0, true);
        let r = AutoArimaResult {
            best,
            ndiffs: 0,
            candidates: vec![],
        };
        return Ok((r, HashMap::new()));
    }
    let d = ndiffs(y, cfg.kpss_alpha, cfg.max_d);
    let w = poly::difference(y, d);
    let constant = d <= 1;
    if is_constant(&w) {
        let best = exact_fit(y, d, constant);
        let r = AutoArimaResult {
            best,
            ndiffs: d,
            candidates: vec![],
        };
        return Ok((r, HashMap::new()));
    }
    // pmdarima caps the orders at a third of the sample and starts lower on short series.
    let (max_p, max_q) = (cfg.max_p.min(y.len() / 3), cfg.max_q.min(y.len() / 3));
    let (mut start_p, mut start_q) = (cfg.start_p.min(max_p), cfg.start_q.min(max_q));
    if y.len() < 10 {
        start_p = start_p.min(1);
        start_q = start_q.min(1);
    }
    let mut s = Search {
        y,
        d,
        cfg,
        fits: Vec::new(),
        best: None,
        warm,
        optima: HashMap::new(),
    };
    let (mut p, mut q) = (start_p.min(max_p), start_q.min(max_q));
    let mut with_c = constant;
    s.try_fit(p, q, with_c);
    if s.try_fit(0, 0, with_c) {
        (p, q) = (0, 0);
    }
    if max_p > 0 && s.try_fit(1, 0, with_c) {
        (p, q) = (1, 0);
    }
    if max_q > 0 && s.try_fit(0, 1, with_c) {
        (p, q) = (0, 1);
    }
    if with_c && s.try_fit(0, 0, false) {
        (p, q) = (0, 0);
    }
    loop {
        let before = s.fits.len();
        if !s.budget_left() {
            break;
        }
        // Neighbour moves in pmdarima's order; the first improvement restarts the pass.
        let moves: [(bool, isize, isize); 8] = [
            (p > 0, -1, 0),
            (q > 0, 0, -1),
            (p < max_p, 1, 0),
            (q < max_q, 0, 1),
            (p > 0 && q > 0, -1, -1),
            (q < max_q && p > 0, -1, 1),
            (q > 0 && p < max_p, 1, -1),
            (q < max_q && p < max_p, 1, 1),
        ];
        let mut improved = false;
        for (ok, dp, dq) in moves {
            if !ok || !s.budget_left() {
                continue;
            }
            let (np, nq) = ((p as isize + dp) as usize, (q as isize + dq) as usize);
            if s.try_fit(np, nq, with_c) {
                (p, q) = (np, nq);
                improved = true;
                break;
            }
        }
        if !improved && s.budget_left() && s.try_fit(p, q, !with_c) {
            with_c = !with_c;
        }
        if s.fits.len() == before {
            break;
        }
    }
    let candidates = s
        .fits
        .iter()
        .map(|(o, f)| Candidate {
            order: *o,
            aic: f.as_ref().map(|f| f.aic),
        })
        .collect();
    match s.best {
        Some(b) => {
            let order = s.fits[b].0;
            let rough = s
                .fits
                .swap_remove(b)
                .1
                .expect("best index points at a successful fit");
            // Polish the winner: cold, from a multi-start; warm, from its search optimum.
            let polished = match warm {
                None => model::fit(y, order).ok(),
                Some(_) => {
                    let start = s.optima.get(&order).cloned();
                    model::fit_warm(y, order, model::Precision::Full, start.as_ref())
                        .ok()
                        .map(|(f, x)| {
                            s.optima.insert(order, x);
                            f
                        })
                }
            };
            // Keep the search fit if polishing somehow does worse.
            let best = match polished {
                Some(f) if f.llf >= rough.llf => f,
                _ => rough,
            };
            Ok((
                AutoArimaResult {
                    best,
                    ndiffs: d,
                    candidates,
                },
                s.optima,
            ))
        }
        None => Err(FitError::NoFiniteStart {
            order: ArimaOrder::new(start_p, d, start_q, constant),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kpss_pvalue_is_clamped_to_the_table() {
        // White-ish noise from a fixed LCG: level-stationary.
        let mut state = 7u64;
        let stationary: Vec<f64> = (0..60)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect();
        let r = kpss(&stationary).expect("finite");
        assert_eq!(r.pvalue, 0.10);
        let trend: Vec<f64> = (0..60).map(f64::from).collect();
        let r = kpss(&trend).expect("finite");
        assert_eq!(r.pvalue, 0.01);
        assert_eq!(r.lags, 3);
    }

    #[test]
    fn a_trend_needs_one_difference_and_a_constant_none() {
        let trend: Vec<f64> = (0..60)
            .map(|i| f64::from(i) * 2.0 + if i % 3 == 0 { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(ndiffs(&trend, 0.05, 2), 1);
        assert_eq!(ndiffs(&[3.0; 10], 0.05, 2), 0);
    }

    #[test]
    fn a_straight_line_is_forecast_exactly() {
        let line: Vec<f64> = (0..20).map(|i| 5.0 + 3.0 * f64::from(i)).collect();
        let r = auto_arima(&line, &ArimaConfig::default()).expect("fits");
        assert_eq!(r.ndiffs, 1);
        assert!((r.best.forecast - 65.0).abs() < 1e-9, "{:?}", r.best);
    }

    #[test]
    fn warm_searches_track_cold_ones_on_a_clean_ar1() {
        let mut state = 99u64;
        let mut y = vec![50.0];
        for _ in 0..120 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let e = ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 10.0;
            let prev = *y.last().expect("non-empty");
            y.push(20.0 + 0.6 * prev + e);
        }
        let cfg = ArimaConfig {
            cold_search_every: 1000,
            ..ArimaConfig::default()
        };
        let mut warm = ArimaWarmState::default();
        let (mut same, mut total) = (0, 0);
        for end in 50..y.len() {
            let w = &y[end - 50..end];
            let a = auto_arima(w, &cfg).expect("cold");
            let b = auto_arima_warm(w, &cfg, &mut warm).expect("warm");
            total += 1;
            if a.best.order == b.best.order {
                same += 1;
                assert!(
                    (a.best.forecast - b.best.forecast).abs() < 1e-3 * a.best.forecast.abs(),
                    "{end}"
                );
            }
        }
        assert_eq!(warm.searches(), total);
        assert!(same * 10 >= total * 9, "{same}/{total}");
    }

    #[test]
    fn the_search_records_every_candidate_once() {
        let y: Vec<f64> = (0..50)
            .map(|i| 100.0 + 10.0 * (f64::from(i) * 0.7).sin() + f64::from(i % 7))
            .collect();
        let r = auto_arima(&y, &ArimaConfig::default()).expect("fits");
        let mut orders: Vec<_> = r.candidates.iter().map(|c| c.order).collect();
        let n = orders.len();
        orders.sort();
        orders.dedup();
        assert_eq!(orders.len(), n);
        assert!(n >= 4);
        let best_aic = r.best.aic;
        assert!(
            r.candidates
                .iter()
                .filter_map(|c| c.aic)
                .all(|a| a >= best_aic)
        );
    }
}
