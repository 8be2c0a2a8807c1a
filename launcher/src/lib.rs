//! The launcher: starts a broker and a room of peers as child processes, shows what the room does
//! (the dashboard from the room's own MQTT traffic, as `watch` does from anywhere; the plain lines
//! and the end-of-run summary from the peers' event streams), and stops every child when it stops,
//! whatever the reason. It
//! can also put a room under faults (`chaos`, `failover-bench`), follow a room started elsewhere
//! (`watch`) and decode a room's raw traffic (`decode`); see [`cli`].

mod chaos;
mod children;
pub mod cli;
mod dashboard;
mod decode;
mod failover;
pub mod invariants;
mod launch;
mod login;
mod observe;
mod process;
mod report;
mod runtime;
mod screen;
mod stats;
mod tally;
mod view;
mod watch;

use std::process::ExitCode;

use crate::cli::{Args, Role};

/// Runs what the command line asks for; the whole of the launcher binary's `main`.
pub fn main(args: Args) -> ExitCode {
    match args.role {
        Some(Role::Broker(a)) => broker::cli::main(a),
        Some(Role::Peer(a)) => peer::cli::main(a),
        Some(Role::Chaos(a)) => chaos::main(a),
        Some(Role::FailoverBench(a)) => failover::main(a),
        Some(Role::Watch(a)) => watch::main(a),
        Some(Role::Decode(a)) => decode::main(a),
        None => launch::main(args.room),
    }
}
