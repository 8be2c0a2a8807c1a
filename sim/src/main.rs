//! Runs the room simulator: one seed with its trace (`--seed N --trace`), or many seeds
//! (`--seeds N`, spread over the cores), small rooms with faults or large rooms (`--peers N`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use hashvote_sim::{Scenario, World, run_seeds};

/// The deterministic room simulator.
#[derive(Debug, Parser)]
#[command(
    name = "hashvote-sim",
    about = "Runs simulated hashvote rooms under random faults and checks safety and progress"
)]
struct Args {
    /// Run only this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run this many seeds, from --first.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// A room of this many peers (controller crashes only) instead of small rooms with every fault.
    #[arg(long)]
    peers: Option<usize>,
    /// With --peers: the peers connect at random times within this many ms (a real room of
    /// hundreds on one machine takes seconds).
    #[arg(long, default_value_t = 50)]
    connect_over_ms: u64,
    /// With --peers: the broker and the peers together deliver at most this many messages per
    /// second (0: no limit); a real room of hundreds on two cores gets through some tens of
    /// thousands.
    #[arg(long, default_value_t = 0)]
    deliveries_per_s: u64,
    /// With --peers: the broker is a cluster of this many nodes, each with its share of
    /// --deliveries-per-s, the peers spread over them.
    #[arg(long, default_value_t = 1)]
    broker_nodes: usize,
    /// With --broker-nodes: how much later a message enters another node's queue (ms).
    #[arg(long, default_value_t = 0)]
    node_hop_ms: u64,
    /// With --peers: how long after the faults end a block must be committed (ms).
    #[arg(long, default_value_t = 6_000)]
    settle_ms: u64,
    /// Threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the trace of a single seed even when it passes.
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let scenario = |seed: u64| match args.peers {
        // The faults (crashes of the controller) begin once the last peer connected.
        Some(n) => Scenario {
            fault_ms: Scenario::large(n).fault_ms + args.connect_over_ms,
            connect_over_ms: args.connect_over_ms,
            deliveries_per_s: args.deliveries_per_s,
            broker_nodes: args.broker_nodes,
            node_hop_ms: args.node_hop_ms,
            settle_ms: args.settle_ms,
            ..Scenario::large(n)
        },
        None => Scenario::small(seed),
    };
    if let Some(seed) = args.seed {
        let mut sc = scenario(seed);
        if args.trace {
            sc.trace = usize::MAX;
        }
        return match World::new(seed, sc).run_with_trace() {
            (Ok(report), trace) => {
                if args.trace {
                    trace.iter().for_each(|l| println!("{l}"));
                }
                println!("seed {seed}: ok: {report:?}");
                ExitCode::SUCCESS
            }
            (Err(failure), _) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    let threads =
        if args.threads == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { args.threads };
    let started = Instant::now();
    let range = args.first..args.first + args.seeds;
    let (reports, failures) = run_seeds(range, threads, scenario);
    let secs = started.elapsed().as_secs_f64();
    let blocks: u64 = reports.iter().map(|r| r.committed).sum();
    let changes: u64 = reports.iter().map(|r| r.changes).sum();
    let faults: usize = reports.iter().map(|r| r.faults).sum();
    let delivered: u64 = reports.iter().map(|r| r.delivered).sum();
    let published: u64 = reports.iter().map(|r| r.published).sum();
    let hellos: u64 = reports.iter().map(|r| r.hellos).sum();
    println!(
        "{} seeds passed, {} failed in {secs:.1} s ({threads} threads): {blocks} blocks committed ({changes} changes of members), {faults} faults, {published} messages published ({hellos} hellos), {delivered} delivered",
        reports.len(),
        failures.len()
    );
    for f in &failures {
        if f.trace.is_empty() {
            eprintln!("seed {}: {} at {} ms", f.seed, f.what, f.at_ms);
        } else {
            eprintln!("{f}");
        }
    }
    if failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
