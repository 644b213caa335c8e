//! What the process-level tests share: the test model, starting `dopd` and reading its banner.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dopd <args>` (UCX over loopback TCP unless the caller chose) and returns it with the
/// first line it prints (its banner).
pub fn spawn(args: &[&str]) -> (Proc, String) {
    assert!(
        std::path::Path::new(MODEL).exists(),
        "{MODEL} is missing — run scripts/setup.sh"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dopd"));
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if std::env::var_os("UCX_TLS").is_none() {
        cmd.env("UCX_TLS", "tcp");
    }
    let mut child = cmd.spawn().expect("dopd starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("reads the banner");
    (Proc(child), line)
}

/// The `host:port` right after `marker` in `line`.
pub fn addr_after(line: &str, marker: &str) -> Option<String> {
    line.split(marker)
        .nth(1)
        .and_then(|r| r.split(|c: char| c.is_whitespace() || c == '/').next())
        .filter(|a| a.contains(':'))
        .map(str::to_string)
}
