//! `broker`: runs the hashvote MQTT broker until killed. See `broker --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    broker::cli::main(broker::cli::Args::parse())
}
