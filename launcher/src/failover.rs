//! `launcher failover-bench`: how long a room goes without a controller when its controller dies.
//!
//! Each trial waits until the room works (every live peer follows one controller and holds a new
//! block), kills the controller with SIGKILL, and measures from the kill (this process's wall
//! clock, in ms) to the first `challenge_issued` of a newer term (the new controller's event
//! clock: the same machine's wall clock). The killed controller then comes back on its data
//! directory.

use std::process::ExitCode;

use peer::events::now_ms;

use crate::chaos::room::{Failure, Room, RoomConfig, verdict};
use crate::cli::FailoverBenchArgs;
use crate::stats::percentile;

/// Runs `launcher failover-bench`; the whole of `main` for that subcommand.
pub(crate) fn main(args: FailoverBenchArgs) -> ExitCode {
    crate::runtime::block_on("launcher", run(args))
}

async fn run(args: FailoverBenchArgs) -> anyhow::Result<ExitCode> {
    let cfg = RoomConfig::new(args.peers, &args.room);
    println!(
        "failover-bench: {} peers, difficulty {}, keepalive {} s, {} trials",
        cfg.peers, cfg.difficulty, cfg.keepalive, args.trials
    );
    let mut room = Room::start(cfg).await?;
    println!("broker listening on {}", room.addr());
    let mut samples = Vec::new();
    let outcome = trials(&mut room, args.trials, &mut samples).await;
    let checked = room.stop().await;

    let mut sorted = samples.clone();
    sorted.sort_unstable();
    let list: Vec<String> = samples.iter().map(u64::to_string).collect();
    println!("samples (ms, in trial order): {}", list.join(" "));
    if let (Some(p50), Some(p95), Some(max)) = (percentile(&sorted, 50.0), percentile(&sorted, 95.0), sorted.last()) {
        println!(
            "failover (kill -9 of the controller -> first challenge of the next term), {} trials: \
             p50 {p50} ms, p95 {p95} ms, max {max} ms",
            sorted.len()
        );
    }
    Ok(match verdict(&outcome, &checked) {
        Ok(s) => {
            println!("invariants: hold ({} terms, {} blocks)", s.terms, s.blocks);
            ExitCode::SUCCESS
        }
        Err(fail) => {
            println!("{fail}");
            ExitCode::FAILURE
        }
    })
}

async fn trials(room: &mut Room, n: u32, samples: &mut Vec<u64>) -> Result<(), Failure> {
    for trial in 1..=n {
        let (term, controller, height) = room.wait_progress().await?;
        let killed_at = now_ms();
        room.kill(controller).await;
        let first = room.wait_challenge_after(term).await?;
        let ms = first.saturating_sub(killed_at);
        samples.push(ms);
        println!(
            "trial {trial}/{n}: killed controller peer #{controller} of term {term} at height {height}; \
             term {} challenged after {ms} ms",
            room.latest_term()
        );
        room.restart(controller)?;
    }
    // The room still works after the last failover.
    room.wait_progress().await?;
    Ok(())
}
