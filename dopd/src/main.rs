//! `dopd`: one binary, role subcommands.
//!
//! Planner commands (`forecast`, `plan`, `profile`, `sim`), the worker (`worker`, `generate`), the
//! router and local mode (`router`, `up`), and the Kubernetes operator (`operator`, `crd`).

mod cmd;
mod plot;
mod progress;

use clap::{Parser, Subcommand};

/// DOPD: serve an LLM under TTFT/TPOT SLOs with the fewest GPUs by keeping the prefill:decode
/// ratio optimal as the workload shifts.
#[derive(Debug, Parser)]
#[command(name = "dopd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Backtest the forecasters on a request trace (request count, mean ISL, mean OSL per interval).
    Forecast(cmd::forecast::Args),
    /// Size prefill and decode for a workload: instance counts and the constraint that bound them.
    Plan(cmd::plan::Args),
    /// Build, convert or check performance profiles.
    #[command(subcommand)]
    Profile(cmd::profile::Command),
    /// Replay a trace through a simulated prefill/decode cluster.
    #[command(subcommand)]
    Sim(cmd::sim::Command),
    /// Benchmarks: the worker engine, KV transfer, a trace replayed against an endpoint, the router's overhead.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// Serve a model over gRPC as a prefill, decode or mixed worker.
    Worker(cmd::worker::Args),
    /// Send one prompt to a worker (or a prefill and a decode worker) and stream the answer.
    Generate(cmd::worker::GenerateArgs),
    /// The OpenAI-compatible router in front of a list of workers.
    Router(cmd::router::RouterArgs),
    /// The whole system on this machine: router, prefill and decode workers, planner loop.
    Up(cmd::up::UpArgs),
    /// The Kubernetes operator: reconciles DopdServices and resizes them with the planner.
    Operator(cmd::operator::Args),
    /// Print the DopdService CustomResourceDefinition (YAML).
    Crd,
    /// What a worker would find here: the build's devices, UCX, the CUDA libraries, the GPU.
    Doctor(cmd::doctor::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forecast(a) => cmd::forecast::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Profile(c) => cmd::profile::run(c),
        Command::Sim(c) => cmd::sim::run(c),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Generate(a) => cmd::worker::generate(a),
        Command::Router(a) => cmd::router::router(a),
        Command::Up(a) => cmd::up::up(a),
        Command::Operator(a) => cmd::operator::run(a),
        Command::Crd => cmd::operator::crd(),
        Command::Doctor(a) => cmd::doctor::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
