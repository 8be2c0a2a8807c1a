//! The launcher's command line. Besides running a room, the launcher can act as the broker or as
//! a peer (`launcher broker ...`, `launcher peer ...`): it starts its children by re-executing
//! itself that way, so `cargo run -p launcher` needs nothing else built or installed.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Starts an MQTT broker and a room of hashvote peers as separate processes, and shows the join,
/// the election, and every challenge and winner. Runs until Ctrl-C (or `--rounds` blocks).
#[derive(Debug, Parser)]
#[command(name = "launcher", version, args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Act as the broker or a peer instead of launching a room.
    #[command(subcommand)]
    pub role: Option<Role>,
    /// Options of the room.
    #[command(flatten)]
    pub room: RoomArgs,
}

/// The processes the launcher binary can be.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Run the embedded MQTT broker (same flags as the `broker` binary).
    #[command(hide = true)]
    Broker(broker::cli::Args),
    /// Run one peer (same flags as the `peer` binary).
    #[command(hide = true)]
    Peer(peer::cli::Args),
}

/// How to run a room.
#[derive(Debug, Clone, clap::Args)]
pub struct RoomArgs {
    /// Number of peers.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=500))]
    pub peers: u16,
    /// Stop after this many accepted blocks (every peer has them) and print a summary; 0 runs
    /// until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    pub rounds: u64,
    /// Leading zero bits of each challenge.
    #[arg(long, default_value_t = 22)]
    pub difficulty: u8,
    /// Mining threads per peer (0: one per core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Proof-of-work hash: sha1 or sha256.
    #[arg(long, default_value = "sha1")]
    pub hash: String,
    /// Broker port. If not given, 1883, or a free port when 1883 is busy.
    #[arg(long)]
    pub port: Option<u16>,
    /// MQTT keepalive of the peers, in seconds.
    #[arg(long, default_value_t = 2)]
    pub keepalive: u64,
    /// Write every peer's events, merged, as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Also show each peer's warnings and errors (their stderr).
    #[arg(long)]
    pub verbose: bool,
}
