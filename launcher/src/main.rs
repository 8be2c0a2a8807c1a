//! The `launcher` binary: `cargo run -p launcher` starts a broker and a room of peers;
//! `launcher chaos` and `launcher failover-bench` put one under faults.

use std::process::ExitCode;

use clap::Parser;
use launcher::cli::{Args, Role};

fn main() -> ExitCode {
    let args = Args::parse();
    match args.role {
        Some(Role::Broker(a)) => broker::cli::main(a),
        Some(Role::Peer(a)) => peer::cli::main(a),
        Some(Role::Chaos(a)) => launcher::chaos::main(a),
        Some(Role::FailoverBench(a)) => launcher::failover::main(a),
        Some(Role::Watch(a)) => launcher::watch::main(a),
        Some(Role::Decode(a)) => launcher::decode::main(a),
        None => launcher::main(args.room),
    }
}
