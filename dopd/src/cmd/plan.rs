//! `dopd plan`: one sizing decision for a given workload.

use std::path::PathBuf;

use dopd_planner::sizing::{
    BudgetRule, DecodeLoad, PrefillRule, SizingConfig, SizingInput, SlaTargets, size_dopd,
    size_dyn_sla,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Profile file (YAML or JSON). Without it, --preset builds a roofline profile.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Roofline preset used when no --profile is given.
    #[arg(long, default_value = "llama-3.3-70b-fp8-h100")]
    preset: String,
    /// Mean input length of the next interval, tokens.
    #[arg(long)]
    isl: f64,
    /// Mean output length of the next interval, tokens.
    #[arg(long)]
    osl: f64,
    /// Requests in the next interval.
    #[arg(long)]
    requests: f64,
    /// GPU budget.
    #[arg(long, default_value_t = 8)]
    budget: u32,
    /// Interval length (for Little's law and the SLA planner).
    #[arg(long, default_value = "10s")]
    interval: String,
    /// Sizing policy: dopd or dyn-sla.
    #[arg(long, default_value = "dopd")]
    policy: String,
    /// Prefill rule: general (ceil(r*·N_D)), per-decode-instance (authors' code), proportional.
    #[arg(long, default_value = "general")]
    prefill_rule: String,
    /// Budget rule: balanced (monotone in load) or paper-loop (the authors' loop).
    #[arg(long, default_value = "balanced")]
    budget_rule: String,
    /// Read --requests as a concurrency via Little's law instead of requests per interval.
    #[arg(long)]
    littles_law: bool,
    /// Decode correction factor (observed / profiled ITL).
    #[arg(long, default_value_t = 1.0)]
    kappa_d: f64,
    /// Minimum instances per role.
    #[arg(long, default_value_t = 1)]
    min_replicas: u32,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    for (name, v) in [
        ("--isl", a.isl),
        ("--osl", a.osl),
        ("--requests", a.requests),
        ("--kappa-d", a.kappa_d),
    ] {
        anyhow::ensure!(
            v.is_finite() && v >= 0.0,
            "{name} must be a finite number >= 0, got {v}"
        );
    }
    let profile = super::load_profile(a.profile.as_deref(), &a.preset)?;
    let prefill_rule = match a.prefill_rule.as_str() {
        "general" => PrefillRule::General,
        "per-decode-instance" => PrefillRule::PerDecodeInstance,
        "proportional" => PrefillRule::Proportional,
        other => anyhow::bail!(
            "unknown --prefill-rule {other:?}: expected general, per-decode-instance or proportional"
        ),
    };
    let budget_rule = match a.budget_rule.as_str() {
        "balanced" => BudgetRule::Balanced,
        "paper-loop" => BudgetRule::PaperLoop,
        other => anyhow::bail!("unknown --budget-rule {other:?}: expected balanced or paper-loop"),
    };
    let cfg = SizingConfig {
        gpu_budget: a.budget,
        budget_rule,
        prefill_rule,
        decode_load: if a.littles_law {
            DecodeLoad::LittlesLaw
        } else {
            DecodeLoad::RequestsPerInterval
        },
        min_replicas: dopd_planner::profile::PerRole {
            prefill: a.min_replicas,
            decode: a.min_replicas,
        },
        ..SizingConfig::default()
    };
    let input = SizingInput {
        interval_s: super::parse_duration_s(&a.interval)?,
        kappa_d: a.kappa_d,
        ..SizingInput::new(a.requests, a.isl, a.osl)
    };
    let sizing = match a.policy.as_str() {
        "dopd" => size_dopd(&profile, &input, &cfg),
        "dyn-sla" => size_dyn_sla(&profile, &input, &SlaTargets::default(), &cfg),
        other => anyhow::bail!("unknown --policy {other:?}: expected dopd or dyn-sla"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sizing)?);
        return Ok(());
    }
    println!(
        "{} on {}: {} requests, ISL {}, OSL {}, budget {} GPUs (g_P {}, g_D {})",
        a.policy,
        profile.name,
        a.requests,
        a.isl,
        a.osl,
        a.budget,
        profile.gpus.prefill,
        profile.gpus.decode
    );
    println!(
        "blocks/request {}  B_max {}  r* {:.3}  TTFT {:.4} s  TPOT {:.4} s  decode load {:.1}",
        sizing.blocks_per_request,
        sizing.b_max,
        sizing.r_star,
        sizing.ttft_s,
        sizing.tpot_s,
        sizing.decode_load
    );
    println!(
        "unconstrained {}P + {}D  ->  {}P + {}D = {} GPUs",
        sizing.unconstrained.prefill,
        sizing.unconstrained.decode,
        sizing.replicas.prefill,
        sizing.replicas.decode,
        sizing.gpus
    );
    for r in &sizing.reasons {
        println!("  reason: {}", serde_json::to_string(r)?);
    }
    Ok(())
}
