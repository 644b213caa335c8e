//! A minimal progress line on stderr: redrawn in place on a terminal, a line per quarter
//! otherwise, once the work has run for two seconds (so logs show that long work is moving
//! without being flooded by short work).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Off a terminal, work shorter than this prints nothing.
const QUIET_FOR: Duration = Duration::from_secs(2);

pub struct Progress {
    label: String,
    tty: bool,
    last_quarter: usize,
    started: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            tty: std::io::stderr().is_terminal(),
            last_quarter: 0,
            started: Instant::now(),
        }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        let total = total.max(1);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = done.min(total) * width / total;
            let _ = write!(
                err,
                "\r{:<28} [{}{}] {done}/{total}",
                self.label,
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            if done >= total {
                let _ = writeln!(err);
            }
        } else {
            let quarter = done * 4 / total;
            if quarter > self.last_quarter && self.started.elapsed() >= QUIET_FOR {
                self.last_quarter = quarter;
                let _ = writeln!(err, "{}: {}%", self.label, quarter * 25);
            }
        }
    }
}
