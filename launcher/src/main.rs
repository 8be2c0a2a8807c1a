//! The `launcher` binary: `cargo run -p launcher` starts a broker and a room of peers;
//! `launcher chaos` and `launcher failover-bench` put one under faults.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    launcher::main(launcher::cli::Args::parse())
}
