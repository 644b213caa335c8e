//! `dopd bench`: benchmarks whose figures go in `docs/benchmarks.md` — the worker engine's
//! throughput ([`worker`]), KV-block transfer between two workers ([`kv`]), a trace replayed
//! against an endpoint (`dopd bench load`, in `cmd/load.rs`) and the router's added latency
//! ([`router`]).

mod kv;
mod router;
mod worker;

use kv::KvArgs;
use router::RouterBenchArgs;
use worker::WorkerArgs;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prefill and decode tokens/s of the worker engine at batch 1, 8 and 32.
    Worker(WorkerArgs),
    /// KV-block transfer bandwidth and latency between two workers on loopback.
    Kv(KvArgs),
    /// Replay a request trace against an OpenAI-compatible endpoint: TTFT/TPOT quantiles,
    /// goodput and SLO attainment.
    Load(crate::cmd::load::LoadArgs),
    /// The router's added latency per request: the same requests to a worker directly (gRPC)
    /// and through the router (HTTP), at a fixed rate, against a worker with a tiny model.
    Router(RouterBenchArgs),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Worker(a) => worker::worker(a),
        Command::Kv(a) => kv::kv(a),
        Command::Load(a) => crate::cmd::load::bench_load(a),
        Command::Router(a) => router::router_overhead(a),
    }
}
