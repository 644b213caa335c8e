//! Chaos: `dopd up` (one prefill and two decode workers) serves a burst of greedy requests
//! undisturbed, then the same burst while a prefill worker and a decode worker are killed with
//! SIGKILL at seeded random moments. Every request must complete with the same answer, token
//! for token; the killed workers must come back; and when `dopd up` itself is killed with
//! SIGKILL, its workers must exit too.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{get, post};

/// Process ids of the live children of `parent`, with their command lines.
fn children(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid == Some(parent) && state != Some("Z") {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push((pid, cmd));
        }
    }
    out
}

fn workers_of(parent: u32, role: &str) -> Vec<u32> {
    children(parent)
        .into_iter()
        .filter(|(_, c)| c.contains(" worker ") && c.contains(&format!("--role {role} ")))
        .map(|(p, _)| p)
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|r| !r.1.trim_start().starts_with('Z'))
    })
}

fn kill(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -KILL {pid}");
}

/// A small seeded generator (SplitMix64): the same seed gives the same kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The prompts of the burst: short and long ones (long ones go through the prefill worker).
fn prompts() -> Vec<String> {
    let topics = [
        "the sea",
        "a mountain village",
        "bread",
        "the moon",
        "a small robot",
        "autumn leaves",
        "a lighthouse keeper",
        "trains",
    ];
    topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i % 2 == 0 {
                format!("Write a short poem about {t}.")
            } else {
                format!(
                    "You are a careful storyteller. Tell a story about {t} for a child, with a \
                     beginning, a middle and an end, in simple words and short sentences."
                )
            }
        })
        .collect()
}

/// Sends every prompt at once (greedy, 64 tokens each); returns the answers in prompt order.
fn burst(addr: &str, model: &str) -> Vec<Result<String, String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts()
            .into_iter()
            .map(|p| {
                s.spawn(move || {
                    let (status, v) = post(
                        addr,
                        "/v1/chat/completions",
                        json!({
                            "model": model,
                            "messages": [{"role": "user", "content": p}],
                            "max_tokens": 64,
                            "temperature": 0,
                        }),
                    );
                    match v["choices"][0]["message"]["content"].as_str() {
                        Some(t) if status == 200 => Ok(t.to_string()),
                        _ => Err(format!("{status}: {v}")),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    })
}

fn workers_up(addr: &str) -> (u64, u64) {
    let (_, b) = get(addr, "/health");
    let v: Value = serde_json::from_str(&b).unwrap_or_default();
    (
        v["prefill_workers"].as_u64().unwrap_or(0),
        v["decode_workers"].as_u64().unwrap_or(0),
    )
}

/// The router's load summary (`/v1/dopd/load`).
fn load_now(addr: &str) -> Value {
    let (_, b) = get(addr, "/v1/dopd/load");
    serde_json::from_str(&b).unwrap_or_default()
}

/// The port of a decode worker that surely holds a stream past its first token, if one does.
/// Streams with a first token and no end yet (since `start`) are counted low: first tokens from
/// one read of the router's load, which reads its totals before the workers' counts of requests
/// held, and ends from a second read after it, so a stream that ends between the reads is not
/// counted. A worker holds at least that many less what all other decode workers hold; among
/// the workers with the most, `pick` chooses.
fn streaming_decode_worker(addr: &str, start: &Value, pick: usize) -> Option<(u16, u64)> {
    let now = load_now(addr);
    let after = load_now(addr);
    let count = |v: &Value| v["ttft_s"]["count"].as_u64().unwrap_or(0);
    let done = |v: &Value| v["finished"].as_u64().unwrap_or(0) + v["failed"].as_u64().unwrap_or(0);
    let streaming = (count(&now) + done(start)).saturating_sub(count(start) + done(&after));
    let decode: Vec<(u64, &str)> = now["workers"]
        .as_array()?
        .iter()
        .filter(|w| w["role"] == "decode")
        .filter_map(|w| Some((w["in_flight"].as_u64()?, w["url"].as_str()?)))
        .collect();
    let total: u64 = decode.iter().map(|d| d.0).sum();
    let surely = |held: u64| streaming.saturating_sub(total - held).min(held);
    let most = decode
        .iter()
        .map(|d| surely(d.0))
        .max()
        .filter(|&m| m > 0)?;
    let best: Vec<&str> = decode
        .iter()
        .filter(|d| surely(d.0) == most)
        .map(|d| d.1)
        .collect();
    let url = best.get(pick % best.len())?;
    let port = url.rsplit(':').next()?.trim_end_matches('/').parse().ok()?;
    Some((port, most))
}

/// Which of `candidates` listens on TCP `port` (from the socket inodes in `/proc`).
fn listener_pid(port: u16, candidates: &[u32]) -> Option<u32> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let local = f.get(1).and_then(|a| a.rsplit_once(':'));
            let on_port = local.is_some_and(|(_, p)| u16::from_str_radix(p, 16) == Ok(port));
            if let (true, true, Some(inode)) = (listening, on_port, f.get(9)) {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    candidates.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| inodes.contains(&l.to_string_lossy().into_owned()))
            })
        })
    })
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn workers_killed_at_random_lose_no_request_and_change_no_token() {
    let seed = std::env::var("DOPD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261129u64);
    let mut rng = Rng(seed);
    let (mut up, line) = common::spawn(&[
        "up",
        "--model",
        common::MODEL,
        "--listen",
        "127.0.0.1:0",
        "--prefill",
        "1",
        "--decode",
        "2",
        "--max-workers",
        "3",
        "--no-planner",
        "--health-interval",
        "200ms",
    ]);
    let addr = common::addr_after(&line, "on http://").expect("dopd up prints its address");
    let model = line
        .split("serving ")
        .nth(1)
        .and_then(|r| r.split(" on ").next())
        .expect("dopd up names its model")
        .to_string();
    let pid = up.0.id();
    wait_for("the workers", Duration::from_secs(120), || {
        workers_up(&addr) == (1, 2)
    });

    let t = Instant::now();
    let undisturbed = burst(&addr, &model);
    let span = t.elapsed().as_secs_f64();
    for (i, a) in undisturbed.iter().enumerate() {
        assert!(a.is_ok(), "request {i} failed undisturbed: {a:?}");
    }

    // The same burst, with a prefill worker killed at a seeded moment early in it, and a decode
    // worker killed at a seeded moment while streams are cut mid-way: from that moment on, as
    // soon as the router's counts prove that the victim holds a stream past its first token
    // (however fast or slow the machine serves the burst).
    let prefill_victim = workers_of(pid, "prefill");
    let pick = (rng.next() % 2) as usize;
    let prefill_at = rng.between(0.0, 0.1) * span;
    let decode_at = rng.between(0.1, 0.4) * span;
    let start = load_now(&addr);
    let before: HashSet<u32> = children(pid).into_iter().map(|c| c.0).collect();
    let (disturbed, killed) = std::thread::scope(|s| {
        let load = s.spawn(|| burst(&addr, &model));
        let t0 = Instant::now();
        let wait_until = |at: f64| {
            std::thread::sleep(Duration::from_secs_f64(
                (at - t0.elapsed().as_secs_f64()).max(0.0),
            ))
        };
        let mut killed = Vec::new();
        wait_until(prefill_at);
        if let Some(&victim) = prefill_victim.first() {
            kill(victim);
            eprintln!(
                "chaos (seed {seed}): killed prefill worker {victim} at {:.2} s of a {span:.1} s burst",
                t0.elapsed().as_secs_f64()
            );
            killed.push(victim);
        }
        wait_until(decode_at);
        while !load.is_finished() {
            let victim = streaming_decode_worker(&addr, &start, pick).and_then(|(port, held)| {
                Some((listener_pid(port, &workers_of(pid, "decode"))?, held))
            });
            if let Some((victim, held)) = victim {
                kill(victim);
                eprintln!(
                    "chaos (seed {seed}): killed decode worker {victim} at {:.2} s, while it \
                     surely held {held} stream(s) past the first token",
                    t0.elapsed().as_secs_f64()
                );
                killed.push(victim);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (load.join().expect("the client threads"), killed)
    });
    assert_eq!(
        killed.len(),
        2,
        "one prefill and one decode worker killed (the burst ended before a decode worker was \
         seen holding a stream past its first token)"
    );
    for (i, (a, b)) in undisturbed.iter().zip(&disturbed).enumerate() {
        assert_eq!(b, a, "request {i}: the answer changed or was lost");
    }
    let load = load_now(&addr);
    eprintln!(
        "chaos (seed {seed}): {} requests, all identical; {} streams resumed, {} failed",
        disturbed.len(),
        load["resumed"],
        load["failed"]
    );
    assert_eq!(load["failed"], 0, "{load}");
    assert!(
        load["resumed"].as_u64() > Some(0),
        "no stream was resumed: {load}"
    );

    // dopd up restarts what was killed: the router sees 1 + 2 workers again, new processes.
    wait_for(
        "the killed workers to come back",
        Duration::from_secs(120),
        || workers_up(&addr) == (1, 2),
    );
    let after: HashSet<u32> = children(pid).into_iter().map(|c| c.0).collect();
    assert!(killed.iter().all(|k| !after.contains(k)));
    assert_eq!(
        after.difference(&before).count(),
        2,
        "two restarted workers"
    );
    let again = burst(&addr, &model);
    assert_eq!(again, undisturbed, "the restarted workers answer the same");

    // Killing dopd up itself (no chance to clean up) takes its workers with it.
    let workers: Vec<u32> = children(pid).into_iter().map(|c| c.0).collect();
    assert_eq!(workers.len(), 3);
    let _ = up.0.kill();
    let _ = up.0.wait();
    wait_for(
        "the workers to exit with dopd up",
        Duration::from_secs(20),
        || workers.iter().all(|&w| !alive(w)),
    );
}
