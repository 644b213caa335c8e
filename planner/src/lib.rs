//! # dopd-planner: DOPD's decision core
//!
//! Pure functions and small state machines: inputs in, decisions out. No I/O, no async, no clock
//! reads — time is always an argument — so the operator, the local mode and the simulator run
//! exactly the same code and every decision can be replayed.
//!
//! ## Brief overview
//! - [`forecast`]: one-step-ahead forecasters behind the [`forecast::Forecaster`] trait — last
//!   value, moving average, auto-ARIMA (pmdarima-compatible) and a local-linear-trend Kalman filter.
//! - [`profile`]: the performance profile of a model on its hardware (TTFT(ISL), TPOT(concurrency,
//!   context), KV capacity), validated on load, plus an analytic roofline generator with presets.
//! - [`sizing`]: DOPD's P/D sizing (paper §3.2) and the two comparison planners (Dynamo's SLA and
//!   load planners).
//! - [`headroom`]: placeholder pods for the cluster autoscaler, from the forecast's upper bound
//!   over the start-up horizon, within the budget.
//! - [`routing`]: length-aware request classification and the short-request batch former.
//! - [`planner`]: the tick API, `tick(now, observation) -> decision`, that ties it together.
//! - [`control`]: the control loop around the planner that the simulator, local mode and the
//!   operator share: observation from cumulative [`load`] readings and instance states, tick
//!   timing, routing threshold, headroom and the scale plan (which instances to drain first),
//!   behind an observer and an actuator trait.
//! - [`stats`]: the nearest-rank quantile the router, the load generator and the benchmarks share.
//! - [`trace`]: parsers for request traces (Azure CSV, Mooncake JSONL) and interval aggregation;
//!   [`backtest`] scores forecasters on those series.
//!
//! ```
//! use dopd_planner::sizing::{SizingConfig, SizingInput, size_dopd};
//! use dopd_planner::profile::Profile;
//!
//! // The worked example of the paper (§3.2): ISL 1000, OSL 245, 2040 blocks of 128 tokens.
//! let profile = Profile::constant_latency(0.15, 0.040, 2040, 128);
//! let cfg = SizingConfig { gpu_budget: 8, ..SizingConfig::default() };
//! let s = size_dopd(&profile, &SizingInput::new(300.0, 1000.0, 245.0), &cfg);
//! assert_eq!(s.b_max, 226);
//! assert!((s.r_star - 3.46).abs() < 0.01);
//! ```

pub mod backtest;
pub mod control;
pub mod forecast;
pub mod headroom;
mod linalg;
pub mod load;
pub mod observation;
pub mod planner;
pub mod profile;
pub mod routing;
pub mod sizing;
pub mod slo;
pub mod stats;
pub mod trace;

pub use profile::Role;
