//! Cumulative load counters: what a router (or the simulator) has seen since it started.
//!
//! The source only ever adds to its totals, and reading them changes nothing, so any number of
//! readers (the planner loop, a second operator replica, a dashboard, a person with curl) may read
//! at any time. The control loop ([`crate::control`]) keeps the previous reading and turns the
//! difference into one interval's [`Observation`](crate::observation::Observation).
//!
//! What is counted, and when (the same in the router and the simulator, which both record through
//! [`LoadTotals`]'s methods):
//! - an **arrival** when a request is admitted, with its prompt length and (when the source
//!   knows it) its time, so the gaps between arrivals give their burstiness within an interval;
//! - a **first token** when it reaches the client, with the time since arrival (TTFT);
//! - a **finish** when a request ends successfully, with its output length, its mean gap between
//!   later tokens (ITL, when it has at least two tokens) and its duration (arrival to last token);
//! - a **failure** when a request ends without finishing.
//!
//! Latencies go into fixed log-spaced histograms, so interval quantiles come from differences of
//! cumulative counts, the way Prometheus computes them.

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the latency histogram buckets: 0.5 ms to about 1,000 s, four
/// buckets per doubling (a bucket spans 19%). A last, unbounded bucket holds the rest.
pub fn latency_bounds_s() -> &'static [f64] {
    static BOUNDS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        (0..=84)
            .map(|k| 0.0005 * 2f64.powf(f64::from(k) / 4.0))
            .collect()
    })
}

/// Upper bounds (tokens) of the length histogram buckets: 1 to about a million tokens, four
/// buckets per doubling. A last, unbounded bucket holds the rest.
pub fn length_bounds() -> &'static [f64] {
    static BOUNDS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| (0..=80).map(|k| 2f64.powf(f64::from(k) / 4.0)).collect())
}

/// A cumulative histogram of latencies over [`latency_bounds_s`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); one more entry than there are bounds.
    pub counts: Vec<u64>,
    /// Sum of every observation.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::empty(latency_bounds_s())
    }
}

impl Histogram {
    fn empty(bounds: &[f64]) -> Self {
        Self {
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe_in(&mut self, bounds: &[f64], v: f64) {
        if !(v.is_finite() && v >= 0.0) {
            return;
        }
        if self.counts.len() != bounds.len() + 1 {
            *self = Self::empty(bounds);
        }
        let k = bounds.partition_point(|b| *b < v);
        self.counts[k] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn well_formed_in(&self, bounds: &[f64]) -> bool {
        self.counts.len() == bounds.len() + 1
            && self.counts.iter().try_fold(0u64, |t, &n| t.checked_add(n)) == Some(self.count)
            && self.sum.is_finite()
    }

    fn since_in(&self, earlier: &Histogram, bounds: &[f64]) -> Option<Histogram> {
        if !self.well_formed_in(bounds) || !earlier.well_formed_in(bounds) {
            return None;
        }
        let mut counts = Vec::with_capacity(self.counts.len());
        for (a, b) in self.counts.iter().zip(&earlier.counts) {
            counts.push(a.checked_sub(*b)?);
        }
        Some(Histogram {
            counts,
            sum: (self.sum - earlier.sum).max(0.0),
            count: self.count - earlier.count,
        })
    }

    fn quantile_in(&self, bounds: &[f64], q: f64) -> Option<f64> {
        if self.count == 0 || !self.well_formed_in(bounds) {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut below = 0u64;
        for (k, &n) in self.counts.iter().enumerate() {
            if n > 0 && below.saturating_add(n) >= rank {
                let lo = if k == 0 { 0.0 } else { bounds[k - 1] };
                let Some(&hi) = bounds.get(k) else {
                    return Some(lo);
                };
                let frac = (rank - below) as f64 / n as f64;
                return Some(lo + (hi - lo) * frac);
            }
            below = below.saturating_add(n);
        }
        None
    }

    /// Adds one observation; non-finite or negative values are ignored.
    pub fn observe(&mut self, v: f64) {
        self.observe_in(latency_bounds_s(), v);
    }

    /// What was added since `earlier` (`None` when the two cannot be compared: different layouts,
    /// or counts that went down).
    pub fn since(&self, earlier: &Histogram) -> Option<Histogram> {
        self.since_in(earlier, latency_bounds_s())
    }

    /// The mean observation (`None` when empty).
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Quantile `q` (0..=1), interpolated linearly inside the bucket that holds the nearest rank;
    /// the unbounded bucket answers its lower bound. `None` when empty or malformed.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_in(latency_bounds_s(), q)
    }
}

/// A cumulative histogram of lengths in tokens over [`length_bounds`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LengthHistogram(pub Histogram);

impl Default for LengthHistogram {
    fn default() -> Self {
        Self(Histogram::empty(length_bounds()))
    }
}

impl LengthHistogram {
    pub fn observe(&mut self, tokens: f64) {
        self.0.observe_in(length_bounds(), tokens);
    }

    pub fn since(&self, earlier: &LengthHistogram) -> Option<LengthHistogram> {
        self.0.since_in(&earlier.0, length_bounds()).map(Self)
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.0.quantile_in(length_bounds(), q)
    }

    /// Share of the observations in each bucket (`None` when empty or malformed).
    pub fn shares(&self) -> Option<Vec<f64>> {
        (self.0.count > 0 && self.0.well_formed_in(length_bounds())).then(|| {
            self.0
                .counts
                .iter()
                .map(|&n| n as f64 / self.0.count as f64)
                .collect()
        })
    }
}

/// Everything counted since the source started. See the module docs for what each field counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadTotals {
    /// Identifies one run of the source (the router's start time in Unix milliseconds; 1 in the
    /// simulator). A reading with another epoch than the previous one means the counters
    /// restarted from zero.
    pub epoch: u64,
    /// Requests admitted.
    pub arrived: u64,
    /// Prompt tokens of the admitted requests, the sum of their squares, and their distribution.
    pub prompt_tokens: u64,
    pub prompt_tokens_sq: f64,
    pub prompt_lengths: LengthHistogram,
    /// Gaps between consecutive timed arrivals: how many, their sum and the sum of their squares
    /// (seconds), and the last timed arrival (seconds on the source's own clock).
    pub gaps: u64,
    pub gap_s: f64,
    pub gap_sq: f64,
    pub last_arrival_s: Option<f64>,
    /// Requests that finished successfully.
    pub finished: u64,
    /// Requests that ended without finishing.
    pub failed: u64,
    /// Streams resumed on another worker after theirs failed mid-stream (a request can count
    /// more than once; it counts in `finished` or `failed` once).
    pub resumed: u64,
    /// Output tokens of the requests that finished successfully, and the sum of their squares.
    pub output_tokens: u64,
    pub output_tokens_sq: f64,
    /// Sum of the durations (arrival to last token) of the requests that finished, seconds.
    pub duration_s: f64,
    /// Time to first token, one observation per first token delivered.
    pub ttft_s: Histogram,
    /// Mean inter-token latency of each finished request with at least two tokens.
    pub itl_s: Histogram,
}

impl LoadTotals {
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            ..Self::default()
        }
    }

    /// A request was admitted with a prompt of `isl` tokens.
    pub fn arrive(&mut self, isl: u32) {
        self.arrived += 1;
        self.prompt_tokens += u64::from(isl);
        self.prompt_tokens_sq += f64::from(isl).powi(2);
        self.prompt_lengths.observe(f64::from(isl));
    }

    /// A request was admitted with a prompt of `isl` tokens at `t_s` seconds on the source's
    /// clock (any origin, never going back). The gap since the previous timed arrival is counted
    /// once the clock has moved forward; a time that goes back or is not finite restarts the gaps.
    pub fn arrive_at(&mut self, isl: u32, t_s: f64) {
        self.arrive(isl);
        if !t_s.is_finite() {
            self.last_arrival_s = None;
            return;
        }
        if let Some(last) = self.last_arrival_s
            && t_s >= last
        {
            let gap = t_s - last;
            self.gaps += 1;
            self.gap_s += gap;
            self.gap_sq += gap * gap;
        }
        self.last_arrival_s = Some(t_s);
    }

    /// A request's first token reached the client `ttft_s` after it arrived.
    pub fn first_token(&mut self, ttft_s: f64) {
        self.ttft_s.observe(ttft_s);
    }

    /// A request finished with `osl` output tokens, `itl_s` between later tokens on average (for
    /// two tokens or more), `duration_s` after it arrived.
    pub fn finish(&mut self, osl: u32, itl_s: Option<f64>, duration_s: f64) {
        self.finished += 1;
        self.output_tokens += u64::from(osl);
        self.output_tokens_sq += f64::from(osl).powi(2);
        if duration_s.is_finite() && duration_s >= 0.0 {
            self.duration_s += duration_s;
        }
        if let Some(itl) = itl_s {
            self.itl_s.observe(itl);
        }
    }

    /// A request ended without finishing.
    pub fn fail(&mut self) {
        self.failed += 1;
    }

    /// A stream was resumed on another worker after a failure mid-stream.
    pub fn resume(&mut self) {
        self.resumed += 1;
    }

    /// What happened between `earlier` and `self`. Counters that restarted (another epoch, or
    /// counts lower than before) count from zero: everything in them happened after `earlier`.
    pub fn since(&self, earlier: Option<&LoadTotals>) -> LoadDelta {
        let zero = LoadTotals::new(self.epoch);
        let base = match earlier {
            Some(e) if e.epoch == self.epoch && !self.went_down_from(e) => e,
            _ => &zero,
        };
        LoadDelta {
            arrived: self.arrived - base.arrived,
            prompt_tokens: self.prompt_tokens - base.prompt_tokens,
            finished: self.finished - base.finished,
            failed: self.failed - base.failed,
            output_tokens: self.output_tokens - base.output_tokens,
            prompt_tokens_sq: (self.prompt_tokens_sq - base.prompt_tokens_sq).max(0.0),
            output_tokens_sq: (self.output_tokens_sq - base.output_tokens_sq).max(0.0),
            duration_s: (self.duration_s - base.duration_s).max(0.0),
            ttft_s: self.ttft_s.since(&base.ttft_s),
            itl_s: self.itl_s.since(&base.itl_s),
            prompt_lengths: self.prompt_lengths.since(&base.prompt_lengths),
            gaps: self.gaps.saturating_sub(base.gaps),
            gap_s: (self.gap_s - base.gap_s).max(0.0),
            gap_sq: (self.gap_sq - base.gap_sq).max(0.0),
        }
    }

    fn went_down_from(&self, e: &LoadTotals) -> bool {
        self.arrived < e.arrived
            || self.prompt_tokens < e.prompt_tokens
            || self.finished < e.finished
            || self.failed < e.failed
            || self.output_tokens < e.output_tokens
            || self.ttft_s.count < e.ttft_s.count
            || self.itl_s.count < e.itl_s.count
            || self.gaps < e.gaps
    }
}

/// The difference of two readings: one interval's counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadDelta {
    pub arrived: u64,
    pub prompt_tokens: u64,
    pub finished: u64,
    pub failed: u64,
    pub output_tokens: u64,
    pub prompt_tokens_sq: f64,
    pub output_tokens_sq: f64,
    pub duration_s: f64,
    /// `None` when the histograms could not be compared.
    pub ttft_s: Option<Histogram>,
    pub itl_s: Option<Histogram>,
    pub prompt_lengths: Option<LengthHistogram>,
    /// Gaps between timed arrivals, their sum and the sum of their squares (seconds).
    pub gaps: u64,
    pub gap_s: f64,
    pub gap_sq: f64,
}

impl LoadDelta {
    /// Mean prompt length of the requests that arrived.
    pub fn mean_isl(&self) -> Option<f64> {
        (self.arrived > 0).then(|| self.prompt_tokens as f64 / self.arrived as f64)
    }

    /// Mean output length of the requests that finished.
    pub fn mean_osl(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.output_tokens as f64 / self.finished as f64)
    }

    /// Mean squared prompt length of the requests that arrived.
    pub fn mean_isl_sq(&self) -> Option<f64> {
        (self.arrived > 0).then(|| self.prompt_tokens_sq / self.arrived as f64)
    }

    /// Mean squared output length of the requests that finished.
    pub fn mean_osl_sq(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.output_tokens_sq / self.finished as f64)
    }

    /// Squared coefficient of variation of the gaps between arrivals (1 for Poisson arrivals,
    /// 0 for evenly spaced ones, more for bursts), from at least `min_gaps` gaps.
    pub fn arrival_cv2(&self, min_gaps: u64) -> Option<f64> {
        if self.gaps < min_gaps.max(2) || !(self.gap_s > 0.0) {
            return None;
        }
        let n = self.gaps as f64;
        let mean = self.gap_s / n;
        let var = (self.gap_sq / n - mean * mean).max(0.0);
        let c = var / (mean * mean);
        c.is_finite().then_some(c)
    }

    /// Mean duration of the requests that finished.
    pub fn mean_duration_s(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.duration_s / self.finished as f64)
    }
}

/// One reading of a router: its totals and the requests it holds that are not streaming yet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadReading {
    #[serde(flatten)]
    pub totals: LoadTotals,
    /// Requests admitted whose first token has not come yet and that wait in the router itself
    /// (admission, short-prompt batching), now.
    pub router_waiting: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_land_in_the_right_bucket() {
        let mut h = Histogram::default();
        for k in 1..=100 {
            h.observe(f64::from(k) * 0.01);
        }
        let p50 = h.quantile(0.5).unwrap();
        let p90 = h.quantile(0.9).unwrap();
        // Buckets are 19% wide: the interpolated value is within one bucket of the exact one.
        assert!((p50 - 0.5).abs() / 0.5 < 0.19, "{p50}");
        assert!((p90 - 0.9).abs() / 0.9 < 0.19, "{p90}");
        assert!((h.mean().unwrap() - 0.505).abs() < 1e-9);
        assert_eq!(Histogram::default().quantile(0.5), None);
        h.observe(f64::NAN);
        h.observe(-1.0);
        assert_eq!(h.count, 100);
        let mut big = Histogram::default();
        big.observe(1e9);
        assert_eq!(big.quantile(0.5), latency_bounds_s().last().copied());
    }

    #[test]
    fn an_interval_is_the_difference_of_two_readings() {
        let mut t = LoadTotals::new(7);
        t.arrive(100);
        t.first_token(0.2);
        let first = t.clone();
        t.arrive(300);
        t.arrive(500);
        t.first_token(0.4);
        t.finish(20, Some(0.05), 2.0);
        t.fail();
        let d = t.since(Some(&first));
        assert_eq!((d.arrived, d.finished, d.failed), (2, 1, 1));
        assert_eq!(d.mean_isl(), Some(400.0));
        assert_eq!(d.mean_osl(), Some(20.0));
        assert_eq!(d.mean_duration_s(), Some(2.0));
        let ttft = d.ttft_s.clone().unwrap();
        assert_eq!(ttft.count, 1);
        assert!((ttft.mean().unwrap() - 0.4).abs() < 1e-12);
        // Reading again changes nothing.
        assert_eq!(t.since(Some(&first)), d);
    }

    #[test]
    fn gaps_between_arrivals_say_how_bursty_they_are() {
        // Evenly spaced: no spread.
        let mut even = LoadTotals::new(1);
        for k in 0..50 {
            even.arrive_at(10, f64::from(k) * 0.1);
        }
        let d = even.since(None);
        assert_eq!(d.gaps, 49);
        assert!(d.arrival_cv2(10).unwrap() < 1e-9);
        // Poisson (exponential gaps from a fixed-seed generator): close to 1.
        let mut poisson = LoadTotals::new(1);
        let (mut t, mut x) = (0.0, 12345u64);
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            t += -u.ln() / 5.0;
            poisson.arrive_at(10, t);
        }
        let c = poisson.since(None).arrival_cv2(10).unwrap();
        assert!((c - 1.0).abs() < 0.1, "{c}");
        // Groups of ten at once, a second apart: far above Poisson.
        let mut bursts = LoadTotals::new(1);
        for k in 0..100 {
            bursts.arrive_at(10, f64::from(k / 10));
        }
        assert!(bursts.since(None).arrival_cv2(10).unwrap() > 5.0);
        // Too few gaps say nothing; an untimed arrival counts but adds no gap.
        let mut few = LoadTotals::new(1);
        few.arrive_at(10, 0.0);
        few.arrive_at(10, 1.0);
        few.arrive(10);
        let d = few.since(None);
        assert_eq!((d.arrived, d.gaps), (3, 1));
        assert_eq!(d.arrival_cv2(10), None);
        // A clock that goes back adds no gap.
        few.arrive_at(10, 0.5);
        assert_eq!(few.gaps, 1);
        few.arrive_at(10, f64::NAN);
        assert_eq!((few.gaps, few.last_arrival_s), (1, None));
    }

    #[test]
    fn restarted_counters_count_from_zero() {
        let mut old = LoadTotals::new(1);
        for _ in 0..10 {
            old.arrive(10);
        }
        let mut new = LoadTotals::new(2);
        new.arrive(50);
        let d = new.since(Some(&old));
        assert_eq!((d.arrived, d.mean_isl()), (1, Some(50.0)));
        // Same epoch but lower counts (a source that lost its state): also from zero.
        let mut lower = LoadTotals::new(1);
        lower.arrive(30);
        assert_eq!(lower.since(Some(&old)).arrived, 1);
    }

    #[test]
    fn malformed_histograms_are_not_compared() {
        let mut a = Histogram::default();
        a.observe(0.1);
        let b = Histogram {
            counts: vec![1, 2],
            sum: 1.0,
            count: 3,
        };
        assert_eq!(a.since(&b), None);
        assert_eq!(b.quantile(0.5), None);
    }

    #[test]
    fn a_reading_round_trips_through_json() {
        let mut r = LoadReading {
            totals: LoadTotals::new(3),
            router_waiting: 4,
        };
        r.totals.arrive(12);
        r.totals.first_token(0.3);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"arrived\":1"), "{text}");
        let back: LoadReading = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
