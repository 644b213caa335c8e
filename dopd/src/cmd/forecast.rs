//! `dopd forecast`: backtest predictors on a trace.

use std::path::PathBuf;

use anyhow::Context;
use dopd_planner::backtest::{BacktestScore, backtest};
use dopd_planner::forecast::{ForecastConfig, ForecasterKind};
use dopd_planner::trace::{Series, Trace};
use serde::Serialize;

use crate::progress::Progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trace file: Azure LLM inference CSV (2023 or 2024) or Mooncake JSONL.
    #[arg(long)]
    trace: PathBuf,
    /// Interval length (e.g. 10s, 1m).
    #[arg(long, default_value = "10s")]
    interval: String,
    /// Predictor to score: arima, kalman, last, ma, or all.
    #[arg(long, default_value = "all")]
    predictor: String,
    /// Sliding window of the forecasters.
    #[arg(long, default_value_t = 50)]
    window: usize,
    /// Intervals observed before scoring starts.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write an SVG plot of actual vs forecast values per series.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    trace: String,
    format: dopd_planner::trace::TraceFormat,
    requests: usize,
    duration_s: f64,
    interval_s: f64,
    intervals: usize,
    empty_intervals: usize,
    results: Vec<SeriesScore>,
}

#[derive(Serialize)]
struct SeriesScore {
    series: Series,
    #[serde(flatten)]
    score: BacktestScore,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let interval_s = super::parse_duration_s(&a.interval)?;
    let predictors: Vec<ForecasterKind> = if a.predictor == "all" {
        ForecasterKind::ALL.to_vec()
    } else {
        vec![a.predictor.parse().map_err(anyhow::Error::msg)?]
    };
    anyhow::ensure!(a.window >= 1, "--window must be at least 1");
    let text = std::fs::read_to_string(&a.trace)
        .with_context(|| format!("cannot read trace {}", a.trace.display()))?;
    let trace =
        Trace::parse(&text).with_context(|| format!("invalid trace {}", a.trace.display()))?;
    let intervals = trace.intervals((interval_s * 1e9).round() as i64)?;
    let cfg = ForecastConfig {
        window: a.window,
        ..ForecastConfig::default()
    };
    let mut results = Vec::new();
    for series in Series::ALL {
        let values = series.extract(&intervals);
        for &p in &predictors {
            let mut bar = Progress::new(format!("{} {}", series.as_str(), p));
            let score = backtest(&values, p, &cfg, a.warmup, |d, t| bar.update(d, t));
            results.push(SeriesScore { series, score });
        }
    }
    if let Some(path) = &a.plot {
        let panels: Vec<crate::plot::Panel> = Series::ALL
            .iter()
            .map(|&series| {
                let actual = series
                    .extract(&intervals)
                    .into_iter()
                    .map(|v| v.is_finite().then_some(v))
                    .collect();
                let mut lines = vec![crate::plot::Line {
                    name: "actual".into(),
                    points: actual,
                }];
                lines.extend(results.iter().filter(|r| r.series == series).map(|r| {
                    crate::plot::Line {
                        name: r.score.predictor.as_str().into(),
                        points: r.score.predictions.clone(),
                    }
                }));
                let (title, unit) = match series {
                    Series::Count => ("requests per interval", "requests"),
                    Series::Isl => ("mean input length (ISL)", "tokens"),
                    Series::Osl => ("mean output length (OSL)", "tokens"),
                };
                crate::plot::Panel {
                    title: title.into(),
                    y_label: unit.into(),
                    lines,
                }
            })
            .collect();
        let name = a.trace.file_name().map_or_else(
            || a.trace.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let svg = crate::plot::render(
            &format!("{name}: one-step forecasts, {interval_s} s intervals"),
            "seconds since the first request",
            interval_s,
            &panels,
        );
        std::fs::write(path, svg)
            .with_context(|| format!("cannot write plot {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let report = Report {
        trace: a.trace.display().to_string(),
        format: trace.format,
        requests: trace.requests.len(),
        duration_s: trace.duration_s(),
        interval_s,
        intervals: intervals.len(),
        empty_intervals: intervals.iter().filter(|s| s.count == 0).count(),
        results,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} requests over {:.0} s; {} intervals of {} s ({} empty)",
        report.trace,
        report.requests,
        report.duration_s,
        report.intervals,
        interval_s,
        report.empty_intervals
    );
    println!(
        "{:<7} {:<9} {:>6} {:>9} {:>11} {:>11} {:>8}",
        "series", "predictor", "scored", "MAPE %", "RMSE", "MAE", "cover95"
    );
    for r in &report.results {
        let s = &r.score;
        println!(
            "{:<7} {:<9} {:>6} {:>9.2} {:>11.2} {:>11.2} {:>8.3}",
            r.series.as_str(),
            s.predictor.as_str(),
            s.scored,
            s.mape_pct,
            s.rmse,
            s.mae,
            s.coverage
        );
    }
    if report.results.iter().any(|r| r.score.zero_actuals > 0) {
        println!("(MAPE leaves out intervals whose actual value is 0)");
    }
    Ok(())
}
