//! What the process-level tests share: the test model, starting `dopd` and reading its banner.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

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

/// Opens a connection and writes one HTTP/1.1 request with `data` as its body.
pub fn send(addr: &str, method: &str, path: &str, data: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("router port");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{data}",
        data.len()
    )
    .expect("request");
    s
}

/// One HTTP/1.1 exchange with a JSON body: (status, headers, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String, String) {
    let data = body.map(|b| b.to_string()).unwrap_or_default();
    http_raw(addr, method, path, &data)
}

/// One HTTP/1.1 exchange with any body.
pub fn http_raw(addr: &str, method: &str, path: &str, data: &str) -> (u16, String, String) {
    let mut s = send(addr, method, path, data);
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

pub fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, _, b) = http(addr, "POST", path, Some(&body));
    (status, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

pub fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, b) = http(addr, "GET", path, None);
    (status, b)
}
