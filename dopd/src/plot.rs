//! Minimal SVG line charts (no dependencies): stacked panels sharing an x axis, each with several
//! named lines, axes with round tick values, and a legend.

// Each SVG element is written as one line ending in a newline.
#![allow(clippy::write_with_newline)]

use std::fmt::Write;

/// One line: a name and its points (`None` breaks the line).
pub struct Line {
    pub name: String,
    pub points: Vec<Option<f64>>,
}

/// One panel: a title, a y-axis label and its lines.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub lines: Vec<Line>,
}

const COLORS: [&str; 6] = [
    "#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
];
const W: f64 = 960.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the panels; `x_label` names the shared x axis, `x_scale` converts an index to it.
pub fn render(title: &str, x_label: &str, x_scale: f64, panels: &[Panel]) -> String {
    let n = panels
        .iter()
        .flat_map(|p| p.lines.iter().map(|l| l.points.len()))
        .max()
        .unwrap_or(0);
    let height = TOP + panels.len() as f64 * (PANEL_H + GAP) + 10.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" font-size="15" text-anchor="middle">{}</text>
"##,
        W / 2.0,
        esc(title)
    );
    let plot_w = W - LEFT - RIGHT;
    let x_max = (n.max(2) - 1) as f64;
    let xpos = |i: usize| LEFT + plot_w * i as f64 / x_max;
    for (k, panel) in panels.iter().enumerate() {
        let top = TOP + k as f64 * (PANEL_H + GAP);
        let values = panel
            .lines
            .iter()
            .flat_map(|l| l.points.iter().flatten().copied())
            .filter(|v| v.is_finite());
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let (lo, hi) = if lo.is_finite() {
            (lo.min(0.0), if hi > lo { hi } else { lo + 1.0 })
        } else {
            (0.0, 1.0)
        };
        let ypos = |v: f64| top + PANEL_H - PANEL_H * (v - lo) / (hi - lo);
        let _ = write!(
            s,
            r##"<text x="{LEFT}" y="{}" font-size="13">{}</text>
<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>
<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>
"##,
            top - 6.0,
            esc(&panel.title),
            top + PANEL_H / 2.0,
            esc(&panel.y_label)
        );
        let step = nice_step(hi - lo, 5.0);
        let mut t = (lo / step).ceil() * step;
        while t <= hi + 1e-9 * step {
            let y = ypos(t);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>
"##,
                LEFT + plot_w,
                LEFT - 5.0,
                y + 4.0,
                t
            );
            t += step;
        }
        let xstep = nice_step(x_max * x_scale, 8.0);
        let mut xv = 0.0;
        while xv <= x_max * x_scale + 1e-9 {
            let x = LEFT + plot_w * xv / (x_max * x_scale).max(f64::MIN_POSITIVE);
            let _ = write!(
                s,
                r##"<text x="{x:.1}" y="{}" text-anchor="middle">{xv}</text>
"##,
                top + PANEL_H + 14.0
            );
            xv += xstep;
        }
        if k + 1 == panels.len() {
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" text-anchor="middle">{}</text>
"##,
                LEFT + plot_w / 2.0,
                top + PANEL_H + 30.0,
                esc(x_label)
            );
        }
        for (j, line) in panel.lines.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let mut d = String::new();
            let mut pen_down = false;
            for (i, p) in line.points.iter().enumerate() {
                match p.filter(|v| v.is_finite()) {
                    Some(v) => {
                        let _ = write!(
                            d,
                            "{}{:.1},{:.1} ",
                            if pen_down { "L" } else { "M" },
                            xpos(i),
                            ypos(v)
                        );
                        pen_down = true;
                    }
                    None => pen_down = false,
                }
            }
            let width = if j == 0 { 1.6 } else { 1.0 };
            let _ = write!(
                s,
                r##"<path d="{}" fill="none" stroke="{color}" stroke-width="{width}"/>
<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>
"##,
                d.trim_end(),
                W - RIGHT + 10.0,
                W - RIGHT + 30.0,
                top + 12.0 + 16.0 * j as f64,
                top + 12.0 + 16.0 * j as f64,
                W - RIGHT + 35.0,
                top + 16.0 + 16.0 * j as f64,
                esc(&line.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_lines_with_gaps_and_a_legend() {
        let svg = render(
            "t <1>",
            "seconds",
            10.0,
            &[Panel {
                title: "count".into(),
                y_label: "requests".into(),
                lines: vec![
                    Line {
                        name: "actual".into(),
                        points: vec![Some(1.0), None, Some(3.0), Some(2.0)],
                    },
                    Line {
                        name: "arima".into(),
                        points: vec![None, Some(2.0), Some(2.5), Some(2.2)],
                    },
                ],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(svg.matches("<path").count(), 2);
        // The gap restarts the actual line with a new move.
        assert!(
            svg.matches(" M").count() + svg.matches("\"M").count() >= 3,
            "{svg}"
        );
        assert!(svg.contains(">arima<"));
    }

    #[test]
    fn nice_steps_are_round() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 5.0), 1.0);
        assert_eq!(nice_step(0.3, 5.0), 0.05);
    }
}
