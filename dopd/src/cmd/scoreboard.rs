//! `dopd sim scoreboard`: every workload of a suite under every policy, in one table.
//!
//! A suite (YAML, `examples/scoreboard/suite.yaml`) lists rows — a trace with a rate scale, or a
//! synthetic workload — with their budget and SLOs. Each cell is a policy's SLO attainment and
//! GPU-seconds on that row; the last columns check DOPD against the goals: within half a point of
//! the best static split chosen with hindsight (`static:search`) on no more GPU-seconds, at least
//! 99% where that split reaches 99%, ahead of both of Dynamo's planners; and DOPD's target changes
//! per hour.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use dopd_sim::SimResult;
use serde::Deserialize;

use super::sim::{Common, run_one, setup};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The suite (YAML: `defaults` and `rows`).
    #[arg(long, default_value = "examples/scoreboard/suite.yaml")]
    suite: PathBuf,
    /// Comma-separated policies (names as in `dopd sim compare`); `dopd` and `static:search`
    /// are needed for the checks.
    #[arg(
        long,
        default_value = "dopd,dopd-paper,static:search,oracle,dyn-sla,dyn-load,aggregated"
    )]
    policies: String,
    /// Only the rows whose names contain one of these (comma-separated).
    #[arg(long)]
    rows: Option<String>,
    /// Also write the table (Markdown) to this file.
    #[arg(long, value_name = "FILE.md")]
    out: Option<PathBuf>,
    /// Where prefill work waits, for every row (see `dopd sim run --help`; default: as there).
    #[arg(long, value_parser = super::sim::parse_prefill_queue)]
    prefill_queue: Option<dopd_sim::PrefillQueue>,
}

/// Settings a row takes from the suite's defaults unless it sets them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RowSettings {
    preset: Option<String>,
    profile: Option<PathBuf>,
    budget: Option<u32>,
    slo_ttft: Option<f64>,
    slo_ttft_per_token: Option<f64>,
    slo_tpot: Option<f64>,
    interval: Option<String>,
    kv_link_gbps: Option<f64>,
    rate_scale: Option<f64>,
    /// Seconds served but not scored at the start (every policy alike).
    warmup: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    name: String,
    trace: Option<PathBuf>,
    synthetic: Option<PathBuf>,
    #[serde(flatten)]
    settings: RowSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    #[serde(default)]
    defaults: RowSettings,
    rows: Vec<Row>,
}

/// The `dopd sim` settings of a row (relative paths are relative to the suite's folder).
fn common(row: &Row, d: &RowSettings, base: &Path) -> anyhow::Result<Common> {
    let s = &row.settings;
    let locate = |p: &PathBuf| base.join(p);
    if row.trace.is_some() == row.synthetic.is_some() {
        bail!(
            "row {:?}: give exactly one of trace and synthetic",
            row.name
        );
    }
    let def = cli_defaults()?;
    Ok(Common {
        trace: row.trace.as_ref().map(locate),
        synthetic: row.synthetic.as_ref().map(locate),
        profile: s.profile.clone().or(d.profile.clone()).map(|p| locate(&p)),
        preset: s.preset.clone().or(d.preset.clone()).unwrap_or(def.preset),
        budget: s.budget.or(d.budget).unwrap_or(def.budget),
        interval: s
            .interval
            .clone()
            .or(d.interval.clone())
            .unwrap_or(def.interval),
        rate_scale: s.rate_scale.or(d.rate_scale).unwrap_or(def.rate_scale),
        warmup: s.warmup.or(d.warmup).unwrap_or(def.warmup),
        slo_ttft: s.slo_ttft.or(d.slo_ttft).unwrap_or(def.slo_ttft),
        slo_ttft_per_token: s
            .slo_ttft_per_token
            .or(d.slo_ttft_per_token)
            .unwrap_or(def.slo_ttft_per_token),
        slo_tpot: s.slo_tpot.or(d.slo_tpot).unwrap_or(def.slo_tpot),
        kv_link_gbps: s
            .kv_link_gbps
            .or(d.kv_link_gbps)
            .unwrap_or(def.kv_link_gbps),
        ..def
    })
}

/// `dopd sim`'s settings as its flags default them (read from the flags, not copied).
fn cli_defaults() -> anyhow::Result<Common> {
    #[derive(clap::Parser)]
    struct Only {
        #[command(flatten)]
        c: Common,
    }
    let only = <Only as clap::Parser>::try_parse_from(["dopd sim", "--synthetic", "-"])?;
    Ok(Common {
        synthetic: None,
        ..only.c
    })
}

/// One row's results, by policy.
struct Line {
    name: String,
    requests: usize,
    budget: u32,
    runs: Vec<(String, SimResult)>,
}

impl Line {
    fn get(&self, policy: &str) -> Option<&SimResult> {
        self.runs.iter().find(|(p, _)| p == policy).map(|(_, r)| r)
    }

    /// The acceptance checks, as `(name, passed)`.
    fn checks(&self) -> Vec<(&'static str, bool)> {
        let att = |p: &str| self.get(p).map(|r| 100.0 * r.summary.slo_attainment);
        let gpus = |p: &str| self.get(p).map(|r| r.summary.gpu_seconds);
        let mut out = Vec::new();
        if let (Some(d), Some(s), Some(dg), Some(sg)) = (
            att("dopd"),
            att("static:search"),
            gpus("dopd"),
            gpus("static:search"),
        ) {
            out.push(("static", d >= s - 0.5 && dg <= sg * 1.000_001));
            if s >= 99.0 {
                out.push(("99", d >= 99.0));
            }
        }
        if let (Some(d), Some(a), Some(b)) = (att("dopd"), att("dyn-sla"), att("dyn-load")) {
            out.push(("dynamo", d > a && d > b));
        }
        out
    }
}

fn table(lines: &[Line], policies: &[&str]) -> String {
    let mut t = String::from("| workload | requests | budget |");
    for p in policies {
        t += &format!(" {p} |");
    }
    t += " dopd changes/h | checks |\n|---|---:|---:|";
    for _ in policies {
        t += "---|";
    }
    t += "---:|---|\n";
    for l in lines {
        t += &format!("| {} | {} | {} |", l.name, l.requests, l.budget);
        for p in policies {
            t += &match l.get(p) {
                Some(r) => format!(
                    " {:.2}% / {:.0} |",
                    100.0 * r.summary.slo_attainment,
                    r.summary.gpu_seconds
                ),
                None => " - |".into(),
            };
        }
        let changes = l.get("dopd").map_or("-".into(), |r| {
            format!("{:.0}", r.summary.target_changes_per_hour)
        });
        let checks: Vec<String> = l
            .checks()
            .iter()
            .map(|(n, ok)| format!("{n} {}", if *ok { "ok" } else { "MISS" }))
            .collect();
        t += &format!(" {changes} | {} |\n", checks.join(", "));
    }
    t
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.suite)
        .with_context(|| format!("cannot read the suite {}", a.suite.display()))?;
    let suite: Suite = serde_yaml::from_str(&text)
        .with_context(|| format!("invalid suite {}", a.suite.display()))?;
    let base = a.suite.parent().unwrap_or(Path::new(".")).to_path_buf();
    let policies: Vec<&str> = a
        .policies
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let wanted: Option<Vec<String>> = a
        .rows
        .as_ref()
        .map(|r| r.split(',').map(|s| s.trim().to_string()).collect());
    let mut lines = Vec::new();
    for row in &suite.rows {
        if wanted
            .as_ref()
            .is_some_and(|w| !w.iter().any(|n| row.name.contains(n.as_str())))
        {
            continue;
        }
        let mut c = common(row, &suite.defaults, &base)?;
        if let Some(q) = a.prefill_queue {
            c.prefill_queue = q;
        }
        let s = setup(&c).with_context(|| format!("row {:?}", row.name))?;
        let mut runs = Vec::new();
        for p in &policies {
            eprintln!("scoreboard: {} / {p}", row.name);
            let r = run_one(p, &s, c.budget).with_context(|| format!("row {:?}", row.name))?;
            runs.push((p.to_string(), r));
        }
        let line = Line {
            name: row.name.clone(),
            requests: runs.first().map_or(0, |(_, r)| r.summary.requests),
            budget: c.budget,
            runs,
        };
        eprintln!("{}", table(std::slice::from_ref(&line), &policies));
        lines.push(line);
    }
    let t = format!(
        "Each cell: SLO attainment / GPU-seconds. Checks: `static` = dopd within 0.5 points of \
         static:search on no more GPU-seconds; `99` = dopd >= 99% where static:search is; \
         `dynamo` = dopd ahead of dyn-sla and dyn-load.\n\n{}",
        table(&lines, &policies)
    );
    println!("{t}");
    if let Some(path) = &a.out {
        std::fs::write(path, &t).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed suite under examples/scoreboard, and the folder its paths are relative to.
    fn committed(name: &str) -> (Suite, PathBuf) {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/scoreboard");
        let text = std::fs::read_to_string(base.join(name)).expect("the suite");
        (serde_yaml::from_str(&text).expect("parses"), base)
    }

    #[test]
    fn the_committed_suite_parses_and_every_row_names_one_workload() {
        let (suite, base) = committed("suite.yaml");
        let base = base.as_path();
        assert!(suite.rows.len() >= 11);
        for row in &suite.rows {
            let c = common(row, &suite.defaults, base).expect("a valid row");
            let file = c.trace.or(c.synthetic).expect("a workload");
            assert!(file.exists(), "{}: {}", row.name, file.display());
        }
        // The held-out suite, too, and every synthetic workload it names generates.
        let (heldout, heldout_base) = committed("heldout.yaml");
        assert!(heldout.rows.len() >= 9);
        for row in &heldout.rows {
            let c = common(row, &heldout.defaults, &heldout_base).expect("a valid row");
            if c.synthetic.is_some() {
                assert!(setup(&c).is_ok(), "{}", row.name);
            } else {
                let file = c.trace.expect("a workload");
                assert!(file.exists(), "{}: {}", row.name, file.display());
            }
        }
        let bad = Row {
            name: "both".into(),
            trace: Some("a".into()),
            synthetic: Some("b".into()),
            settings: RowSettings::default(),
        };
        assert!(common(&bad, &suite.defaults, base).is_err());
    }

    #[test]
    fn the_flash_crowds_base_alone_is_the_flash_crowd_until_the_crowd_comes() {
        // The argument of docs/experiments.md ("The flash crowd cannot be met by a causal
        // policy") rests on the two workloads of examples/scoreboard/flash-onset.yaml drawing
        // the same requests until the crowd's onset.
        let (suite, base) = committed("flash-onset.yaml");
        let runs: Vec<Vec<dopd_sim::SimRequest>> = suite
            .rows
            .iter()
            .map(|row| {
                let c = common(row, &suite.defaults, &base).expect("a valid row");
                setup(&c).expect("a workload").requests
            })
            .collect();
        let [crowd, base_alone] = runs.as_slice() else {
            panic!("two rows, the flash crowd and its base")
        };
        let before = |w: &[dopd_sim::SimRequest], t: f64| {
            w.iter()
                .filter(|r| r.arrival_s < t)
                .cloned()
                .collect::<Vec<_>>()
        };
        let onset = 600.0;
        let early = before(crowd, onset);
        assert!(
            early.len() > 2000,
            "{} requests before the onset",
            early.len()
        );
        assert_eq!(early, before(base_alone, onset));
        // The crowd is there in one and not in the other: its two minutes hold about five
        // times the base's arrivals.
        let during = |w: &[dopd_sim::SimRequest]| {
            w.iter()
                .filter(|r| r.arrival_s >= onset && r.arrival_s < onset + 120.0)
                .count()
        };
        assert!(during(crowd) > 4 * during(base_alone));
        // Both runs last about as long, so their GPU-seconds compare.
        let end = |w: &[dopd_sim::SimRequest]| w.last().map_or(0.0, |r| r.arrival_s);
        assert!((end(crowd) - end(base_alone)).abs() < 0.05 * end(crowd));
    }

    #[test]
    fn what_a_suite_leaves_out_is_dopd_sims_own_default() {
        let row = Row {
            name: "bare".into(),
            trace: None,
            synthetic: Some("w.yaml".into()),
            settings: RowSettings {
                budget: Some(3),
                ..RowSettings::default()
            },
        };
        let c = common(&row, &RowSettings::default(), Path::new("/s")).expect("a valid row");
        assert_eq!(c.synthetic, Some(PathBuf::from("/s/w.yaml")));
        assert_eq!(c.trace, None);
        assert_eq!(c.budget, 3);
        assert_eq!(c.preset, "llama-3.3-70b-fp8-h100");
        assert_eq!((c.slo_ttft, c.slo_tpot, c.warmup), (2.0, 0.08, 0.0));
        assert_eq!(c.ultra_short_max_isl, 511);
    }
}
