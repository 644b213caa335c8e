//! `dopd profile`: roofline profiles and profile checks.

use std::path::PathBuf;

use anyhow::Context;
use dopd_planner::profile::{
    Profile,
    roofline::{PRESETS, RooflineSpec},
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build a profile analytically from a preset or a roofline spec file (model + GPU + deployment).
    Roofline {
        /// One of the built-in presets.
        #[arg(long, conflicts_with = "spec")]
        preset: Option<String>,
        /// A RooflineSpec in YAML or JSON.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Print JSON instead of YAML.
        #[arg(long)]
        json: bool,
    },
    /// Validate a profile file and print its key figures.
    Check { file: PathBuf },
    /// List the roofline presets.
    Presets,
    /// Measure TTFT(ISL) and TPOT(concurrency, context) through an OpenAI-compatible endpoint
    /// and write a profile the planner and the simulator accept.
    Measure(super::load::MeasureArgs),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Roofline { preset, spec, json } => {
            let spec = match (preset, spec) {
                (_, Some(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let parsed: Result<RooflineSpec, String> = if text.trim_start().starts_with('{')
                    {
                        serde_json::from_str(&text).map_err(|e| e.to_string())
                    } else {
                        serde_yaml::from_str(&text).map_err(|e| e.to_string())
                    };
                    parsed
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("invalid roofline spec {}", path.display()))?
                }
                (Some(name), None) => RooflineSpec::preset(&name).with_context(|| {
                    format!("unknown preset {name:?}; known: {}", PRESETS.join(", "))
                })?,
                (None, None) => anyhow::bail!("give --preset NAME or --spec FILE"),
            };
            let p = spec.build()?;
            print!(
                "{}",
                if json {
                    p.to_json() + "\n"
                } else {
                    p.to_yaml()
                }
            );
        }
        Command::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let p = Profile::parse(&text)
                .with_context(|| format!("invalid profile {}", file.display()))?;
            println!(
                "{}: ok — TTFT {:.4}..{:.4} s over ISL {}..{}, KV {} blocks x {} tokens, g_P {}, g_D {}",
                p.name,
                p.prefill.ttft_s[0],
                p.prefill.ttft_s[p.prefill.ttft_s.len() - 1],
                p.prefill.isl[0],
                p.max_isl(),
                p.kv.blocks,
                p.kv.block_size,
                p.gpus.prefill,
                p.gpus.decode
            );
        }
        Command::Presets => PRESETS.iter().for_each(|p| println!("{p}")),
        Command::Measure(a) => return super::load::measure(a),
    }
    Ok(())
}
