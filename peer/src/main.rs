//! The `peer` binary: parses the command line and runs [`peer::cli::main`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    peer::cli::main(peer::cli::Args::parse())
}
