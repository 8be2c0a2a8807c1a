//! Runs the exhaustive check of the room's rules with bounds from the command line:
//! `cargo run -p hashvote-model --release --bin room-model -- --max-term 4`.
//! Exits non-zero if a property fails.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use hashvote_model::{Faults, RoomModel, Settings, Variant, check};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Rules {
    Correct,
    VoteNotDurable,
    NoUpToDateCheck,
    CommitOldTerm,
    ChangeUncommitted,
}

/// Exhaustive BFS of the room's election and commit rules (3 peers).
#[derive(Debug, Parser)]
struct Args {
    /// Highest term a peer may time out into.
    #[arg(long, default_value_t = 3)]
    max_term: u8,
    /// Longest log a controller appends to (at most 4).
    #[arg(long, default_value_t = 2)]
    max_log: u8,
    /// Ballots are drawn from 0..BALLOTS.
    #[arg(long, default_value_t = 2)]
    ballots: u8,
    /// Crash-restarts allowed in a run.
    #[arg(long, default_value_t = 1)]
    max_restarts: u8,
    /// Let the network drop messages too.
    #[arg(long)]
    lossy: bool,
    /// The controller sends its log after every prefix length, not only the whole log.
    #[arg(long)]
    any_prefix: bool,
    /// Voters grant only once they hold every member's ballot (adds the liveness property).
    #[arg(long)]
    wait_for_all_ballots: bool,
    /// A controller may change the members (one peer out or in per entry).
    #[arg(long)]
    changes: bool,
    /// Which rules the peers follow (the broken ones stop at the first counterexample).
    #[arg(long, value_enum, default_value_t = Rules::Correct)]
    rules: Rules,
    /// Checker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let variant = match args.rules {
        Rules::Correct => Variant::Correct,
        Rules::VoteNotDurable => Variant::VoteNotDurable,
        Rules::NoUpToDateCheck => Variant::NoUpToDateCheck,
        Rules::CommitOldTerm => Variant::CommitOldTerm,
        Rules::ChangeUncommitted => Variant::ChangeUncommitted,
    };
    let settings = Settings {
        max_term: args.max_term,
        max_log: args.max_log,
        ballots: args.ballots,
        variant,
        any_prefix: args.any_prefix,
        wait_for_all_ballots: args.wait_for_all_ballots,
        changes: args.changes || variant == Variant::ChangeUncommitted,
    };
    let model = RoomModel::new(settings, Faults { max_restarts: args.max_restarts, lossy: args.lossy });
    let report = check(model.clone(), args.threads, variant != Variant::Correct);
    println!("{}", report.summary(&model));
    for (name, path) in &report.discoveries {
        println!("discovery `{name}`:\n{path}");
    }
    let failed = report.failures(&model);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed: {failed:?}");
        ExitCode::FAILURE
    }
}
