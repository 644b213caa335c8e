//! `dopd sim`: replay a trace through the simulated cluster under one or more policies.

use std::path::PathBuf;

use anyhow::{Context, bail};
use dopd_planner::forecast::ForecasterKind;
use dopd_planner::profile::{PerRole, Profile};
use dopd_planner::trace::Trace;
use dopd_sim::{
    PolicySpec, PrefillQueue, SimConfig, SimRequest, SimResult, SyntheticSpec, Window, from_trace,
    search_static, simulate_with_progress, synthetic,
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run one policy and print its summary.
    Run {
        #[command(flatten)]
        common: Common,
        /// Policy (see `dopd sim compare --help` for the names).
        #[arg(long, default_value = "dopd")]
        policy: String,
        /// Write one CSV row per request here.
        #[arg(long, value_name = "FILE.csv")]
        records: Option<PathBuf>,
        /// Write every control-loop tick here, one JSON object per line: what the loop saw
        /// (`snapshot`), what it ordered (`orders`) and the planner's decision with its
        /// reasons and predicted latencies (`decision`, on the ticks where it decided).
        #[arg(long, value_name = "FILE.jsonl")]
        decisions: Option<PathBuf>,
    },
    /// Run several policies on the same workload and print one row each.
    Compare {
        #[command(flatten)]
        common: Common,
        /// Comma-separated policies: dopd, dopd-paper, oracle, dyn-sla, dyn-load, static:NPxND (e.g.
        /// static:3x1), dopd-static:NPxND (fixed counts with DOPD's length-aware routing),
        /// static:search (the best static split for the budget, as DistServe would),
        /// aggregated or aggregated:N (N defaults to budget / decode GPUs), and the DOPD
        /// ablations dopd-no-bypass, dopd-no-batching, dopd-last, dopd-kalman, dopd-arima (ARIMA
        /// alone instead of the forecaster scorecard), dopd-open-loop
        /// (no SLO-miss correction), dopd-no-trend (no burst readiness), dopd-no-hold (a 30 s
        /// scale-down window instead of one priced in start-ups), dopd-fixed-bypass (the
        /// routing's fixed ultra-short threshold instead of one from the profile),
        /// dopd-no-kv-calibration (decode concurrency from the tracked lengths alone, not
        /// corrected by the measured KV occupancy), dopd-fifo-model (the prefill model waits
        /// every prompt in arrival order, not deadline-first as the router serves them),
        /// dopd-ratio-surges (surges as a share of the forecast, read at any level, instead of
        /// requests above forecasts like the current one), dopd-idle-shrink (quiet spells shrink
        /// to the minimums after `idle_after_s` instead of being sized), dopd-hold-dispersion
        /// (the hold stretched by the index of dispersion alone, not damped for loads whose rate
        /// swings little relative to its level), dopd-bypass-when-full (ultra-short prompts
        /// prefilled on a decode instance even when its KV cache has no room for them),
        /// dopd-kv-full-hold (a decode instance asked for by a full KV cache held for the whole
        /// decode hold, not one start-up), dopd-no-kv-emergency (no decode instance added when
        /// the KV caches fill).
        #[arg(
            long,
            default_value = "dopd,oracle,dyn-sla,dyn-load,static:1x1,aggregated"
        )]
        policies: String,
        /// Write load.svg (requests and forecasts per interval), instances.svg (GPUs and
        /// instance targets over time) and ttft.svg (TTFT by percentile) into this folder.
        #[arg(long, value_name = "DIR")]
        plot_dir: Option<PathBuf>,
    },
    /// Run every row of a suite under every policy and print one table: SLO attainment and
    /// GPU-seconds per policy, DOPD's target changes per hour, and the acceptance checks.
    Scoreboard(super::scoreboard::Args),
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Trace file: Azure LLM inference CSV (2023 or 2024), Mooncake JSONL or BurstGPT CSV.
    #[arg(
        long,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub(super) trace: Option<PathBuf>,
    /// A seeded synthetic workload (YAML: seed, requests, arrivals, isl, osl; see
    /// examples/workloads/).
    #[arg(long, value_name = "FILE.yaml")]
    pub(super) synthetic: Option<PathBuf>,
    /// Profile file (YAML or JSON); without it, --preset builds a roofline profile.
    #[arg(long)]
    pub(super) profile: Option<PathBuf>,
    #[arg(long, default_value = "llama-3.3-70b-fp8-h100")]
    pub(super) preset: String,
    /// GPU budget.
    #[arg(long, default_value_t = 8)]
    pub(super) budget: u32,
    /// Planner interval.
    #[arg(long, default_value = "10s")]
    pub(super) interval: String,
    /// Replay faster (2 = twice the request rate).
    #[arg(long, default_value_t = 1.0)]
    pub(super) rate_scale: f64,
    /// Start of the replayed window, seconds after the first request.
    #[arg(long, default_value_t = 0.0)]
    pub(super) window_start: f64,
    /// End of the replayed window, seconds after the first request.
    #[arg(long)]
    pub(super) window_end: Option<f64>,
    /// Warm-up: requests arriving in the first seconds are served but not scored, and GPUs
    /// count from then on.
    #[arg(long, default_value_t = 0.0)]
    pub(super) warmup: f64,
    /// TTFT SLO, seconds (plus `--slo-ttft-per-token` for each prompt token).
    #[arg(long, default_value_t = 2.0)]
    pub(super) slo_ttft: f64,
    /// Length-aware TTFT SLO: seconds allowed per prompt token on top of `--slo-ttft`.
    #[arg(long, default_value_t = 0.0)]
    pub(super) slo_ttft_per_token: f64,
    /// TPOT SLO, seconds.
    #[arg(long, default_value_t = 0.08)]
    pub(super) slo_tpot: f64,
    /// KV-transfer bandwidth between prefill and decode, GB/s (0: instantaneous).
    #[arg(long, default_value_t = 50.0)]
    pub(super) kv_link_gbps: f64,
    /// Prompts up to this many tokens are prefilled on the decode instance (DOPD's routing;
    /// the paper's 511 by default; `dopd router` and `dopd up` use 32).
    #[arg(long, default_value_t = 511)]
    pub(super) ultra_short_max_isl: u32,
    /// Where prefill work waits for a free prefill instance: `shared` (in the router, earliest
    /// feasible TTFT deadline first, paced by decode room; what `dopd router` does by default),
    /// `shared-fifo` (in the router, in arrival order) or `per-instance` (on the instance picked
    /// at arrival, in arrival order).
    #[arg(long, default_value = "shared", value_parser = parse_prefill_queue)]
    pub(super) prefill_queue: PrefillQueue,
    #[arg(long)]
    pub(super) json: bool,
}

pub(super) fn parse_prefill_queue(s: &str) -> Result<PrefillQueue, String> {
    s.parse()
}

pub(super) struct Setup {
    pub(super) requests: Vec<SimRequest>,
    profile: Profile,
    base: SimConfig,
}

pub(super) fn setup(c: &Common) -> anyhow::Result<Setup> {
    if !(c.rate_scale.is_finite() && c.rate_scale > 0.0) {
        bail!(
            "--rate-scale must be a positive number, got {}",
            c.rate_scale
        );
    }
    let window = Window {
        start_s: c.window_start,
        end_s: c.window_end,
    };
    let requests = match (&c.trace, &c.synthetic) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read trace {}", path.display()))?;
            let trace =
                Trace::parse(&text).with_context(|| format!("invalid trace {}", path.display()))?;
            from_trace(&trace, c.rate_scale, window)
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read workload {}", path.display()))?;
            let spec: SyntheticSpec = serde_yaml::from_str(&text)
                .with_context(|| format!("invalid workload {}", path.display()))?;
            let reqs = synthetic(&spec)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("invalid workload {}", path.display()))?;
            reqs.into_iter()
                .filter(|r| {
                    r.arrival_s >= window.start_s && window.end_s.is_none_or(|e| r.arrival_s < e)
                })
                .map(|r| SimRequest {
                    arrival_s: (r.arrival_s - window.start_s) / c.rate_scale,
                    ..r
                })
                .collect()
        }
        (None, None) => bail!("give --trace FILE or --synthetic FILE.yaml"),
    };
    if requests.is_empty() {
        bail!("no requests in the selected window");
    }
    let profile = super::load_profile(c.profile.as_deref(), &c.preset)?;
    let mut base = SimConfig {
        interval_s: super::parse_duration_s(&c.interval)?,
        slo_ttft_s: c.slo_ttft,
        slo_ttft_per_token_s: c.slo_ttft_per_token,
        slo_tpot_s: c.slo_tpot,
        score_from_s: c.warmup,
        kv_link_bytes_per_s: c.kv_link_gbps * 1e9,
        prefill_queue: c.prefill_queue,
        ..SimConfig::default()
    };
    base.planner.sizing.gpu_budget = c.budget;
    base.routing.ultra_short_max_isl = c.ultra_short_max_isl;
    Ok(Setup {
        requests,
        profile,
        base,
    })
}

/// Parses a policy name into a run configuration.
fn config_for(name: &str, s: &Setup, budget: u32) -> anyhow::Result<SimConfig> {
    let mut cfg = s.base.clone();
    cfg.policy = match name {
        "dopd" => PolicySpec::Dopd,
        // The paper's method and its baselines forecast with ARIMA, as the paper ran them.
        "dopd-paper" => {
            cfg.planner.predictor = ForecasterKind::Arima;
            PolicySpec::DopdPaper
        }
        "oracle" => PolicySpec::Oracle,
        "dyn-sla" => {
            cfg.planner.predictor = ForecasterKind::Arima;
            PolicySpec::DynSla
        }
        "dyn-load" => {
            cfg.planner.predictor = ForecasterKind::Arima;
            PolicySpec::DynLoad
        }
        // Resolved in `run_one`; validated here.
        "static:search" => PolicySpec::Static {
            replicas: PerRole {
                prefill: 1,
                decode: 1,
            },
        },
        "dopd-no-bypass" => {
            cfg.routing.ultra_short_bypass = false;
            PolicySpec::Dopd
        }
        "dopd-bypass-when-full" => {
            cfg.routing.bypass_needs_kv_room = false;
            PolicySpec::Dopd
        }
        "dopd-no-batching" => {
            cfg.routing.short_batching = false;
            PolicySpec::Dopd
        }
        "dopd-open-loop" => {
            cfg.planner.slo_policy.closed_loop = false;
            PolicySpec::Dopd
        }
        "dopd-no-trend" => {
            cfg.planner.slo_policy.burst_ready = false;
            PolicySpec::Dopd
        }
        "dopd-ratio-surges" => {
            cfg.planner.slo_policy.level_surges = false;
            PolicySpec::Dopd
        }
        "dopd-idle-shrink" => {
            cfg.planner.slo_policy.size_idle = false;
            PolicySpec::Dopd
        }
        "dopd-hold-dispersion" => {
            cfg.planner.slo_policy.hold_by_swing = false;
            PolicySpec::Dopd
        }
        "dopd-kv-full-hold" => {
            cfg.planner.slo_policy.kv_emergency_hold_startups = 1e9;
            PolicySpec::Dopd
        }
        "dopd-no-kv-emergency" => {
            // No cache is used above its whole: the KV emergency never fires.
            cfg.planner.emergency.kv_usage = 1.0;
            PolicySpec::Dopd
        }
        "dopd-no-hold" => {
            cfg.planner.slo_policy.hold_startups = 0.0;
            PolicySpec::Dopd
        }
        "dopd-no-kv-calibration" => {
            cfg.planner.slo_policy.kv_calibration = false;
            PolicySpec::Dopd
        }
        "dopd-fifo-model" => {
            cfg.planner.slo_policy.deadline_first = false;
            PolicySpec::Dopd
        }
        "dopd-fixed-bypass" => {
            cfg.planner.slo_policy.bypass_from_profile = false;
            PolicySpec::Dopd
        }
        "dopd-arima" => {
            cfg.planner.predictor = ForecasterKind::Arima;
            PolicySpec::Dopd
        }
        "dopd-last" => {
            cfg.planner.predictor = ForecasterKind::Last;
            PolicySpec::Dopd
        }
        "dopd-kalman" => {
            cfg.planner.predictor = ForecasterKind::Kalman;
            PolicySpec::Dopd
        }
        "aggregated" => PolicySpec::Aggregated {
            instances: (budget / s.profile.gpus.decode).max(1),
        },
        other => {
            if let Some(n) = other.strip_prefix("aggregated:") {
                let instances = n
                    .parse()
                    .with_context(|| format!("bad instance count in {other:?}"))?;
                PolicySpec::Aggregated { instances }
            } else if let Some(split) = other
                .strip_prefix("static:")
                .or_else(|| other.strip_prefix("dopd-static:"))
            {
                cfg.length_aware_routing = Some(other.starts_with("dopd-static:"));
                let (p, d) = split
                    .split_once('x')
                    .with_context(|| format!("{other:?}: write static:NPxND, e.g. static:3x1"))?;
                let replicas = PerRole {
                    prefill: p
                        .parse()
                        .with_context(|| format!("bad prefill count in {other:?}"))?,
                    decode: d
                        .parse()
                        .with_context(|| format!("bad decode count in {other:?}"))?,
                };
                cfg.initial = replicas;
                PolicySpec::Static { replicas }
            } else {
                bail!("unknown policy {other:?}; see `dopd sim compare --help`");
            }
        }
    };
    Ok(cfg)
}

pub(super) fn run_one(name: &str, s: &Setup, budget: u32) -> anyhow::Result<SimResult> {
    if name == "static:search" {
        let (best, mut r) = search_static(&s.requests, &s.profile, &s.base)?;
        r.summary.policy = format!("static:{}x{} (search)", best.prefill, best.decode);
        return Ok(r);
    }
    let cfg = config_for(name, s, budget)?;
    let mut bar = crate::progress::Progress::new(name);
    let mut r = simulate_with_progress(&s.requests, &s.profile, &cfg, &mut |d, t| bar.update(d, t))
        .with_context(|| format!("policy {name}"))?;
    bar.update(s.requests.len(), s.requests.len());
    r.summary.policy = name.to_string();
    Ok(r)
}

fn print_header() {
    println!(
        "{:<18} {:>7} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6} {:>6}",
        "policy",
        "SLO %",
        "good tok/s",
        "good req/s",
        "TTFT p50",
        "TTFT p90",
        "TPOT p50",
        "TPOT p90",
        "GPU-s",
        "mean",
        "peak"
    );
}

fn print_row(r: &SimResult) {
    let s = &r.summary;
    println!(
        "{:<18} {:>7.2} {:>9.1} {:>10.3} {:>9.3} {:>9.3} {:>9.4} {:>9.4} {:>10.0} {:>6.2} {:>6}",
        s.policy,
        100.0 * s.slo_attainment,
        s.goodput_tokens_per_s,
        s.goodput_requests_per_s,
        s.ttft_p50_s,
        s.ttft_p90_s,
        s.tpot_p50_s,
        s.tpot_p90_s,
        s.gpu_seconds,
        s.mean_gpus,
        s.peak_gpus
    );
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Scoreboard(a) => return super::scoreboard::run(a),
        Command::Run {
            common,
            policy,
            records,
            decisions,
        } => {
            let mut s = setup(&common)?;
            s.base.record_control = decisions.is_some();
            let r = run_one(&policy, &s, common.budget)?;
            if let Some(path) = decisions {
                let mut lines = String::new();
                for step in &r.control {
                    lines += &serde_json::to_string(step)?;
                    lines.push('\n');
                }
                std::fs::write(&path, lines)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if let Some(path) = records {
                let mut csv =
                    String::from("id,arrival_s,isl,osl,route,ttft_s,tpot_s,finish_s,met_slo\n");
                for x in &r.records {
                    csv += &format!(
                        "{},{},{},{},{},{},{},{},{}\n",
                        x.id,
                        x.arrival_s,
                        x.isl,
                        x.osl,
                        x.route.as_str(),
                        x.ttft_s,
                        x.tpot_s,
                        x.finish_s,
                        x.met_slo
                    );
                }
                std::fs::write(&path, csv)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if common.json {
                let out = serde_json::json!({ "summary": r.summary, "intervals": r.intervals });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_header();
                print_row(&r);
            }
        }
        Command::Compare {
            common,
            policies,
            plot_dir,
        } => {
            let s = setup(&common)?;
            let names: Vec<&str> = policies
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            // Parse every name before running anything.
            for n in &names {
                config_for(n, &s, common.budget)?;
            }
            let mut results = Vec::new();
            for n in &names {
                results.push(run_one(n, &s, common.budget)?);
            }
            if let Some(dir) = &plot_dir {
                write_plots(dir, &results, &s)?;
            }
            if common.json {
                let out: Vec<_> = results.iter().map(|r| &r.summary).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{}: {} requests, budget {} GPUs, SLO TTFT < {} s, TPOT < {} s",
                    common
                        .trace
                        .as_ref()
                        .or(common.synthetic.as_ref())
                        .map_or_else(String::new, |p| p.display().to_string()),
                    s.requests.len(),
                    common.budget,
                    common.slo_ttft,
                    common.slo_tpot
                );
                print_header();
                results.iter().for_each(print_row);
            }
        }
    }
    Ok(())
}

/// The comparison plots (see `--plot-dir`).
fn write_plots(dir: &std::path::Path, results: &[SimResult], s: &Setup) -> anyhow::Result<()> {
    use crate::plot::{Line, Panel, render};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let interval = s.base.interval_s;
    let with_ticks: Vec<&SimResult> = results.iter().filter(|r| !r.intervals.is_empty()).collect();
    let series = |r: &SimResult,
                  f: &dyn Fn(&dopd_sim::IntervalPoint) -> Option<f64>|
     -> Vec<Option<f64>> { r.intervals.iter().map(f).collect() };
    let mut load = Vec::new();
    if let Some(first) = with_ticks.first() {
        load.push(Line {
            name: "actual".into(),
            points: series(first, &|p| Some(p.requests)),
        });
    }
    for r in &with_ticks {
        if r.intervals.iter().any(|p| p.forecast_requests.is_some()) {
            // The forecast made at tick k is for interval k+1: shift it one step right.
            let mut pts = vec![None];
            pts.extend(series(r, &|p| p.forecast_requests));
            load.push(Line {
                name: format!("{} forecast", r.summary.policy),
                points: pts,
            });
        }
    }
    let svg = render(
        "requests per interval and their forecasts",
        "seconds",
        interval,
        &[Panel {
            title: "requests per interval".into(),
            y_label: "requests".into(),
            lines: load,
        }],
    );
    std::fs::write(dir.join("load.svg"), svg)?;
    let lines = |f: &dyn Fn(&dopd_sim::IntervalPoint) -> Option<f64>| -> Vec<Line> {
        with_ticks
            .iter()
            .map(|r| Line {
                name: r.summary.policy.clone(),
                points: series(r, f),
            })
            .collect()
    };
    let svg = render(
        "instances over time",
        "seconds",
        interval,
        &[
            Panel {
                title: "GPUs held".into(),
                y_label: "GPUs".into(),
                lines: lines(&|p| Some(f64::from(p.gpus))),
            },
            Panel {
                title: "prefill instances (target)".into(),
                y_label: "instances".into(),
                lines: lines(&|p| Some(f64::from(p.target_prefill))),
            },
            Panel {
                title: "decode instances (target)".into(),
                y_label: "instances".into(),
                lines: lines(&|p| Some(f64::from(p.target_decode))),
            },
        ],
    );
    std::fs::write(dir.join("instances.svg"), svg)?;
    let ttft: Vec<Line> = results
        .iter()
        .map(|r| {
            let mut t: Vec<f64> = r.records.iter().map(|x| x.ttft_s).collect();
            t.sort_by(f64::total_cmp);
            let points = (0..=100)
                .map(|q| {
                    t.get(
                        ((t.len().saturating_sub(1)) as f64 * f64::from(q) / 100.0).round()
                            as usize,
                    )
                    .copied()
                })
                .collect();
            Line {
                name: r.summary.policy.clone(),
                points,
            }
        })
        .collect();
    let svg = render(
        "TTFT by percentile of requests",
        "percentile of requests",
        1.0,
        &[Panel {
            title: format!("TTFT (SLO {} s)", s.base.slo_ttft_s),
            y_label: "seconds".into(),
            lines: ttft,
        }],
    );
    std::fs::write(dir.join("ttft.svg"), svg)?;
    eprintln!(
        "wrote load.svg, instances.svg and ttft.svg in {}",
        dir.display()
    );
    Ok(())
}
