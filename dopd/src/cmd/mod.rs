pub mod bench;
pub mod doctor;
pub mod forecast;
pub mod load;
pub mod operator;
pub mod plan;
pub mod profile;
pub mod router;
pub mod scoreboard;
pub mod sim;
pub mod up;
pub mod worker;

use anyhow::{Context, bail};

/// Parses durations like `10s`, `1m`, `500ms`, `1.5s` or a bare number of seconds.
pub fn parse_duration_s(s: &str) -> anyhow::Result<f64> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("duration {s:?} does not start with a number"))?;
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => bail!("duration {s:?} has unknown unit {other:?} (use ms, s, m or h)"),
    };
    let secs = v * scale;
    if !(secs.is_finite() && secs > 0.0) {
        bail!("duration {s:?} must be positive");
    }
    Ok(secs)
}

/// Loads a profile from a file or builds a roofline preset.
pub fn load_profile(
    file: Option<&std::path::Path>,
    preset: &str,
) -> anyhow::Result<dopd_planner::profile::Profile> {
    use dopd_planner::profile::{Profile, roofline};
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read profile {}", path.display()))?;
            Profile::parse(&text).with_context(|| format!("invalid profile {}", path.display()))
        }
        None => {
            let spec = roofline::RooflineSpec::preset(preset).with_context(|| {
                format!(
                    "unknown preset {preset:?}; known: {}",
                    roofline::PRESETS.join(", ")
                )
            })?;
            Ok(spec.build()?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_s("10s").expect("ok"), 10.0);
        assert_eq!(parse_duration_s("1m").expect("ok"), 60.0);
        assert_eq!(parse_duration_s("500ms").expect("ok"), 0.5);
        assert_eq!(parse_duration_s("2").expect("ok"), 2.0);
        assert!(parse_duration_s("10 parsecs").is_err());
        assert!(parse_duration_s("-1s").is_err());
        assert!(parse_duration_s("s").is_err());
    }
}
