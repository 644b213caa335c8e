//! Request traces: parsing and per-interval aggregation.
//!
//! Parsers take the file's text (the caller does the reading) and return every request with its
//! arrival time and token counts, or an error that names the line and what is wrong with it.
//!
//! Formats:
//! - **Azure LLM inference CSV** (2023 and 2024 releases): header
//!   `TIMESTAMP,ContextTokens,GeneratedTokens`; timestamps like `2023-11-16 18:17:03.9799600`
//!   (2023: 7 fractional digits, no zone) or `2024-05-10 00:00:00.009930+00:00` (2024: 6 digits
//!   and an offset). CRLF or LF line ends.
//! - **Mooncake JSONL**: one object per line with `timestamp` (ms), `input_length`,
//!   `output_length` (other fields such as `hash_ids` are ignored).
//! - **BurstGPT CSV**: header `Timestamp,Model,Request tokens,Response tokens,Total tokens,Log
//!   Type`, timestamps in seconds from the trace start (failed requests, with 0 response tokens,
//!   are kept).

use serde::{Deserialize, Serialize};

/// One request of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival time, nanoseconds since the Unix epoch (Mooncake: since the trace start).
    pub arrival_ns: i64,
    /// Prompt tokens.
    pub isl: u32,
    /// Generated tokens.
    pub osl: u32,
}

/// Supported trace formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceFormat {
    AzureCsv,
    MooncakeJsonl,
    BurstGptCsv,
}

/// A trace that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("the trace has no requests")]
    Empty,
    #[error("cannot tell the trace format: {0}")]
    UnknownFormat(String),
    #[error("cannot split the trace into intervals: {0}")]
    Interval(String),
}

fn line_err(line: usize, message: impl Into<String>) -> TraceError {
    TraceError::Line {
        line,
        message: message.into(),
    }
}

/// Header-driven CSV reading shared by the CSV formats: finds the `names` columns in the header
/// (case-insensitively, in any order) and hands their fields, with the 1-based line number, to
/// `row` for every non-empty line. Errors name the line.
fn read_csv<const N: usize>(
    text: &str,
    names: [&str; N],
    mut row: impl FnMut([&str; N], usize) -> Result<TraceRequest, TraceError>,
) -> Result<Vec<TraceRequest>, TraceError> {
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or(TraceError::Empty)?;
    let cols: Vec<String> = header
        .trim_start_matches('\u{feff}')
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let mut idx = [0usize; N];
    for (k, name) in names.iter().enumerate() {
        idx[k] = cols
            .iter()
            .position(|c| *c == name.to_ascii_lowercase())
            .ok_or_else(|| {
                line_err(
                    1,
                    format!("header {header:?} must name {}", names.join(", ")),
                )
            })?;
    }
    let mut out = Vec::new();
    for (i, raw) in lines {
        let line = i + 1;
        let raw = raw.trim_end_matches('\r');
        if raw.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = raw.split(',').collect();
        if fields.len() != cols.len() {
            return Err(line_err(
                line,
                format!("expected {} fields, found {}", cols.len(), fields.len()),
            ));
        }
        out.push(row(idx.map(|k| fields[k]), line)?);
    }
    Ok(out)
}

/// A parsed trace, sorted by arrival.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub format: TraceFormat,
    pub requests: Vec<TraceRequest>,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str, what: &str, lo: i64, hi: i64) -> Result<i64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} {s:?} is not a number"));
    }
    let v: i64 = s
        .parse()
        .map_err(|_| format!("{what} {s:?} is out of range"))?;
    if v < lo || v > hi {
        return Err(format!("{what} {v} is outside {lo}..={hi}"));
    }
    Ok(v)
}

/// Parses `YYYY-MM-DD[ T]HH:MM:SS[.fraction][Z|±HH:MM]` into nanoseconds since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let bad = || format!("timestamp {s:?} is not YYYY-MM-DD HH:MM:SS[.fraction][zone]");
    if s.len() < 19 || !s.is_char_boundary(10) || !s.is_char_boundary(19) {
        return Err(bad());
    }
    let (date, rest) = s.split_at(10);
    let sep = rest.as_bytes()[0];
    if sep != b' ' && sep != b'T' {
        return Err(bad());
    }
    let (time, mut tail) = rest[1..].split_at(8);
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return Err(bad());
    }
    let (year, month, day) = (
        // Nanoseconds since 1970 in an i64 cover 1678..2261.
        num(d[0], "year", 1678, 2261)?,
        num(d[1], "month", 1, 12)?,
        num(d[2], "day", 1, 31)?,
    );
    let (hour, minute, second) = (
        num(t[0], "hour", 0, 23)?,
        num(t[1], "minute", 0, 59)?,
        num(t[2], "second", 0, 60)?,
    );
    let mut nanos = 0i64;
    if let Some(frac) = tail.strip_prefix('.') {
        let end = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        let digits = &frac[..end];
        if digits.is_empty() || digits.len() > 9 {
            return Err(format!("fraction of {s:?} must have 1 to 9 digits"));
        }
        let v: i64 = digits.parse().map_err(|_| bad())?;
        nanos = v * 10i64.pow(9 - digits.len() as u32);
        tail = &frac[end..];
    }
    let offset_s = match tail {
        "" | "Z" => 0,
        z if z.is_ascii()
            && (z.starts_with('+') || z.starts_with('-'))
            && z.len() == 6
            && &z[3..4] == ":" =>
        {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            sign * (num(&z[1..3], "zone hour", 0, 23)? * 3600
                + num(&z[4..6], "zone minute", 0, 59)? * 60)
        }
        _ => return Err(format!("unexpected {tail:?} after the time in {s:?}")),
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Ok(secs * 1_000_000_000 + nanos)
}

fn tokens(s: &str, what: &str, line: usize) -> Result<u32, TraceError> {
    let s = s.trim();
    s.parse::<u32>()
        .map_err(|_| line_err(line, format!("{what} {s:?} is not a non-negative integer")))
}

impl Trace {
    /// Parses an Azure LLM inference trace (CSV).
    pub fn parse_azure_csv(text: &str) -> Result<Self, TraceError> {
        let names = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];
        let requests = read_csv(text, names, |[ts, ctx, gen_], line| {
            Ok(TraceRequest {
                arrival_ns: parse_timestamp(ts).map_err(|m| line_err(line, m))?,
                isl: tokens(ctx, "ContextTokens", line)?,
                osl: tokens(gen_, "GeneratedTokens", line)?,
            })
        })?;
        Self::finish(TraceFormat::AzureCsv, requests)
    }

    /// Parses a Mooncake-style JSONL trace.
    pub fn parse_mooncake_jsonl(text: &str) -> Result<Self, TraceError> {
        #[derive(Deserialize)]
        struct Row {
            timestamp: f64,
            input_length: u32,
            output_length: u32,
        }
        let mut requests = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let row: Row = serde_json::from_str(raw).map_err(|e| line_err(line, e.to_string()))?;
            // Up to ~100 years of milliseconds.
            if !(0.0..3.2e12).contains(&row.timestamp) {
                return Err(line_err(
                    line,
                    format!(
                        "timestamp {} must be milliseconds in 0..3.2e12",
                        row.timestamp
                    ),
                ));
            }
            requests.push(TraceRequest {
                arrival_ns: (row.timestamp * 1e6).round() as i64,
                isl: row.input_length,
                osl: row.output_length,
            });
        }
        Self::finish(TraceFormat::MooncakeJsonl, requests)
    }

    /// Parses a BurstGPT trace (CSV).
    pub fn parse_burstgpt_csv(text: &str) -> Result<Self, TraceError> {
        let names = ["Timestamp", "Request tokens", "Response tokens"];
        let requests = read_csv(text, names, |[ts, req, resp], line| {
            let t: f64 = ts.trim().parse().map_err(|_| {
                line_err(
                    line,
                    format!("Timestamp {:?} is not a number of seconds", ts.trim()),
                )
            })?;
            if !(0.0..3.2e9).contains(&t) {
                return Err(line_err(
                    line,
                    format!("Timestamp {t} must be seconds in 0..3.2e9"),
                ));
            }
            Ok(TraceRequest {
                arrival_ns: (t * 1e9).round() as i64,
                isl: tokens(req, "Request tokens", line)?,
                osl: tokens(resp, "Response tokens", line)?,
            })
        })?;
        Self::finish(TraceFormat::BurstGptCsv, requests)
    }

    /// Parses any supported format: JSONL when the first character is `{`, BurstGPT when the
    /// header names `Request tokens`, Azure otherwise.
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        let body = text.trim_start_matches('\u{feff}').trim_start();
        let header = body.lines().next().unwrap_or("").to_ascii_lowercase();
        match body.chars().next() {
            Some('{') => Self::parse_mooncake_jsonl(text),
            Some(_) if header.contains("request tokens") => Self::parse_burstgpt_csv(text),
            Some(_) => Self::parse_azure_csv(text),
            None => Err(TraceError::Empty),
        }
    }

    fn finish(format: TraceFormat, mut requests: Vec<TraceRequest>) -> Result<Self, TraceError> {
        if requests.is_empty() {
            return Err(TraceError::Empty);
        }
        requests.sort_by_key(|r| r.arrival_ns);
        Ok(Self { format, requests })
    }

    /// Seconds from the first to the last arrival.
    pub fn duration_s(&self) -> f64 {
        let first = self.requests.first().map_or(0, |r| r.arrival_ns);
        let last = self.requests.last().map_or(0, |r| r.arrival_ns);
        (last - first) as f64 / 1e9
    }

    /// Aggregates requests into consecutive intervals of `width_ns` starting at the first
    /// arrival (interval `k` holds arrivals in `[t0 + k·w, t0 + (k+1)·w)`).
    ///
    /// Refuses a width below 1 ms or more than [`MAX_INTERVALS`] intervals.
    pub fn intervals(&self, width_ns: i64) -> Result<Vec<IntervalStats>, TraceError> {
        if width_ns < 1_000_000 {
            return Err(TraceError::Interval(format!(
                "width {width_ns} ns is below 1 ms"
            )));
        }
        let t0 = self.requests.first().map_or(0, |r| r.arrival_ns);
        let last = self.requests.last().map_or(0, |r| r.arrival_ns);
        let n = (last.saturating_sub(t0) / width_ns).saturating_add(1);
        if n > MAX_INTERVALS {
            return Err(TraceError::Interval(format!(
                "{:.0} s of trace in {} s intervals makes {n} intervals (at most {MAX_INTERVALS})",
                last.saturating_sub(t0) as f64 / 1e9,
                width_ns as f64 / 1e9
            )));
        }
        let n = n as usize;
        let mut out: Vec<IntervalStats> = (0..n)
            .map(|k| IntervalStats {
                start_s: (k as i64 * width_ns) as f64 / 1e9,
                ..Default::default()
            })
            .collect();
        for r in &self.requests {
            let k = ((r.arrival_ns - t0) / width_ns) as usize;
            let s = &mut out[k];
            s.count += 1;
            s.isl_sum += u64::from(r.isl);
            s.osl_sum += u64::from(r.osl);
        }
        Ok(out)
    }
}

/// Most intervals [`Trace::intervals`] will produce (a week at 1 s is 604,800).
pub const MAX_INTERVALS: i64 = 10_000_000;

/// Aggregates of one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalStats {
    /// Seconds since the first arrival.
    pub start_s: f64,
    pub count: u64,
    pub isl_sum: u64,
    pub osl_sum: u64,
}

impl IntervalStats {
    /// Mean ISL, NaN for an empty interval (forecasters skip it).
    pub fn mean_isl(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.isl_sum as f64 / self.count as f64
        }
    }

    /// Mean OSL, NaN for an empty interval.
    pub fn mean_osl(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.osl_sum as f64 / self.count as f64
        }
    }
}

/// The planner's three series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Series {
    Count,
    Isl,
    Osl,
}

impl Series {
    pub const ALL: [Self; 3] = [Self::Count, Self::Isl, Self::Osl];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Isl => "isl",
            Self::Osl => "osl",
        }
    }

    /// This series' value in one interval.
    pub fn value(&self, s: &IntervalStats) -> f64 {
        match self {
            Self::Count => s.count as f64,
            Self::Isl => s.mean_isl(),
            Self::Osl => s.mean_osl(),
        }
    }

    /// The series over a list of intervals (NaN where undefined).
    pub fn extract(&self, intervals: &[IntervalStats]) -> Vec<f64> {
        intervals.iter().map(|s| self.value(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_azure_timestamp_styles_parse() {
        let a = parse_timestamp("2023-11-16 18:17:03.9799600").expect("2023 style");
        let b = parse_timestamp("2023-11-16T18:17:03.97996Z").expect("iso");
        assert_eq!(a, b);
        let c = parse_timestamp("2024-05-10 00:00:00.009930+00:00").expect("2024 style");
        let d = parse_timestamp("2024-05-10 02:00:00.009930+02:00").expect("offset");
        assert_eq!(c, d);
        assert_eq!(c % 1_000_000_000, 9_930_000);
        // 2024-05-10 is 19853 days after the epoch.
        assert_eq!(c / 1_000_000_000, 19_853 * 86_400);
    }

    #[test]
    fn bad_timestamps_are_explained() {
        for (s, needle) in [
            ("2023-13-01 00:00:00", "month"),
            ("2023-11-16 25:00:00", "hour"),
            ("yesterday", "not YYYY-MM-DD"),
            ("2023-11-16 18:17:03.1234567890", "1 to 9 digits"),
            ("2023-11-16 18:17:03 PST", "unexpected"),
        ] {
            let e = parse_timestamp(s).expect_err(s);
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn azure_csv_with_crlf_parses_and_aggregates() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n\
                    2023-11-16 18:17:03.0000000,100,10\r\n\
                    2023-11-16 18:17:05.0000000,300,30\r\n\
                    2023-11-16 18:17:25.5000000,50,5";
        let t = Trace::parse(text).expect("valid");
        assert_eq!(t.requests.len(), 3);
        let iv = t.intervals(10_000_000_000).expect("10 s intervals");
        assert_eq!(iv.len(), 3);
        assert_eq!(iv[0].count, 2);
        assert_eq!(iv[0].mean_isl(), 200.0);
        assert_eq!(iv[1].count, 0);
        assert!(iv[1].mean_isl().is_nan());
        assert_eq!(Series::Osl.value(&iv[2]), 5.0);
    }

    #[test]
    fn malformed_rows_name_their_line() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,100,10\n2023-11-16 18:17:04,abc,3\n";
        assert_eq!(
            Trace::parse(text).expect_err("bad number").to_string(),
            "line 3: ContextTokens \"abc\" is not a non-negative integer"
        );
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,100\n";
        assert!(
            Trace::parse(text)
                .expect_err("short row")
                .to_string()
                .starts_with("line 2: expected 3 fields")
        );
        let text = "time,in,out\n";
        assert!(
            Trace::parse(text)
                .expect_err("header")
                .to_string()
                .starts_with("line 1:")
        );
        assert_eq!(Trace::parse("").expect_err("empty"), TraceError::Empty);
        assert_eq!(
            Trace::parse("TIMESTAMP,ContextTokens,GeneratedTokens\n"),
            Err(TraceError::Empty)
        );
    }

    #[test]
    fn hostile_timestamps_are_errors_not_panics() {
        assert!(parse_timestamp("2023-11-16 18:17:03+0é00").is_err());
        assert!(
            parse_timestamp("2300-01-01 00:00:00")
                .expect_err("overflow")
                .contains("year")
        );
        let text = "{\"timestamp\": 1e13, \"input_length\": 1, \"output_length\": 1}\n";
        assert!(Trace::parse(text).is_err());
    }

    #[test]
    fn interval_counts_are_bounded() {
        let text = "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n\
                    {\"timestamp\": 3.1e12, \"input_length\": 1, \"output_length\": 1}\n";
        let t = Trace::parse(text).expect("valid");
        assert!(matches!(
            t.intervals(10_000_000),
            Err(TraceError::Interval(_))
        ));
        assert!(matches!(t.intervals(0), Err(TraceError::Interval(_))));
    }

    #[test]
    fn burstgpt_csv_parses() {
        let text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
                    5,ChatGPT,472,18,490,Conversation log\n\
                    45.5,GPT-4,1087,0,1087,API log\n";
        let t = Trace::parse(text).expect("valid");
        assert_eq!(t.format, TraceFormat::BurstGptCsv);
        assert_eq!(
            t.requests[1],
            TraceRequest {
                arrival_ns: 45_500_000_000,
                isl: 1087,
                osl: 0
            }
        );
        let bad = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\nsoon,GPT-4,1,1,2,API log\n";
        let e = Trace::parse(bad).expect_err("bad time").to_string();
        assert!(e.starts_with("line 2:") && e.contains("Timestamp"), "{e}");
    }

    #[test]
    fn mooncake_jsonl_parses() {
        let text = "{\"timestamp\": 0, \"input_length\": 6955, \"output_length\": 52, \"hash_ids\": [0, 1]}\n\
                    {\"timestamp\": 1500, \"input_length\": 10, \"output_length\": 3}\n";
        let t = Trace::parse(text).expect("valid");
        assert_eq!(t.format, TraceFormat::MooncakeJsonl);
        assert_eq!(
            t.requests[1],
            TraceRequest {
                arrival_ns: 1_500_000_000,
                isl: 10,
                osl: 3
            }
        );
        let bad =
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n{\"timestamp\": 1}\n";
        let e = Trace::parse(bad).expect_err("missing field").to_string();
        assert!(
            e.starts_with("line 2:") && e.contains("input_length"),
            "{e}"
        );
    }
}
