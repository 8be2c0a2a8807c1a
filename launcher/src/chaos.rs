//! `launcher chaos`: a room under random faults, checked for safety and progress.
//!
//! It starts a broker and a room, waits for the election and the first block, then runs cycles of
//! one random fault each: a peer killed with SIGKILL (and started again on its data directory), a
//! peer paused with SIGSTOP until the room has noticed (then SIGCONT), the broker killed and
//! restarted on the same port, a peer leaving cleanly (SIGTERM) and coming back, or one of the
//! combined faults (see [`Fault`]). Peer faults sometimes target the controller. After each fault
//! it waits, under a deadline, for the room to make progress: every live peer follows one
//! controller and holds a block no live peer held before. At the end it stops everything and
//! reports the faults, the re-elections, the failover times (controller lost → first challenge of
//! a newer term, from the peers' event clocks), the blocks and the invariants
//! ([`crate::invariants`]) over every event of the run.

pub mod room;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use peer::events::now_ms;
use peer::protocol::Term;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::cli::{ChaosArgs, FaultRoomArgs};
use crate::failover::percentile;
use crate::invariants::{Summary, Violation};
use room::{Failure, Room, RoomConfig};

/// Exit code when interrupted by Ctrl-C (128 + SIGINT).
const INTERRUPTED: u8 = 130;

/// The peers' protocol in a fault run: the room protocol, the only one with failover (the lab's
/// has none). A value of its own so that `--wire room` says what is run, and any other name is
/// refused with the choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// The room protocol: every peer has a data directory and comes back on it.
    Room,
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL a peer, start it again.
    Kill,
    /// SIGSTOP a peer until the room notices, then SIGCONT.
    Pause,
    /// SIGKILL the broker, start a new one on the same port.
    #[value(name = "broker")]
    BrokerRestart,
    /// SIGTERM a peer (it leaves cleanly), start it again.
    #[value(name = "leave")]
    LeaveJoin,
    /// Kill the broker; while it is down, SIGKILL a peer; start the broker again, then the peer.
    #[value(name = "outage")]
    KillInOutage,
    /// SIGKILL the controller and start a peer with a new data directory during the election (a
    /// non-voting newcomer; the previous newcomer leaves).
    Newcomer,
    /// Start a second process under a member's id with its own data directory.
    Duplicate,
    /// SIGKILL every peer at once and start them all again from their data directories.
    #[value(name = "restart")]
    RoomRestart,
}

impl Fault {
    /// Every kind, in report order.
    pub const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::Pause,
        Fault::BrokerRestart,
        Fault::LeaveJoin,
        Fault::KillInOutage,
        Fault::Newcomer,
        Fault::Duplicate,
        Fault::RoomRestart,
    ];

    /// Short name for the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 + restart",
            Fault::Pause => "SIGSTOP/SIGCONT",
            Fault::BrokerRestart => "broker restart",
            Fault::LeaveJoin => "clean leave + return",
            Fault::KillInOutage => "kill -9 during a broker outage",
            Fault::Newcomer => "kill -9 controller + newcomer",
            Fault::Duplicate => "duplicate id",
            Fault::RoomRestart => "whole room kill -9 + restart",
        }
    }
}

/// What the faults did, for the report.
#[derive(Debug, Default)]
struct Tally {
    cycles: u32,
    injected: BTreeMap<Fault, u32>,
    on_controller: BTreeMap<Fault, u32>,
    /// Controller lost → first challenge of a newer term, ms, by fault.
    failovers: BTreeMap<Fault, Vec<u64>>,
    /// Fault → every live peer holds a new block, ms.
    recoveries: Vec<u64>,
}

/// Runs `launcher chaos`; the whole of `main` for that subcommand.
pub fn main(args: ChaosArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("launcher: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

/// The room a fault run starts, from its flags.
pub(crate) fn room_config(peers: u16, args: &FaultRoomArgs) -> anyhow::Result<RoomConfig> {
    Ok(RoomConfig {
        peers: usize::from(peers),
        difficulty: args.difficulty,
        threads: args.threads,
        hash: args.hash,
        keepalive: args.keepalive,
        deadline: Duration::from_secs(args.deadline),
        events: args.events.clone(),
        verbose: args.verbose,
    })
}

async fn run(args: ChaosArgs) -> ExitCode {
    let cfg = match room_config(args.peers, &args.room) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("launcher: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let faults = if args.faults.is_empty() { Fault::ALL.to_vec() } else { args.faults.clone() };
    let seed = args.room.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    println!(
        "chaos: {} peers ({:?} wire), difficulty {}, keepalive {} s, {} cycles, seed {seed}",
        cfg.peers, args.room.wire, cfg.difficulty, cfg.keepalive, args.cycles
    );
    let started = Instant::now();
    let mut room = match Room::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("launcher: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("broker listening on {}", room.addr());
    let mut tally = Tally::default();
    let outcome = cycles(&mut room, args.cycles, &faults, &mut rng, &mut tally).await;
    let checked = room.stop().await;
    let report = report(&tally, args.cycles, started.elapsed(), seed, &checked);
    print!("{report}");
    match (outcome, checked) {
        (Ok(()), Ok(_)) => {
            println!("PASS");
            ExitCode::SUCCESS
        }
        (Err(Failure::Interrupted), Ok(_)) => {
            println!("INTERRUPTED after {} of {} cycles (no violation so far)", tally.cycles, args.cycles);
            ExitCode::from(INTERRUPTED)
        }
        (Err(e), _) => {
            println!("FAIL: {e}");
            ExitCode::FAILURE
        }
        (Ok(()), Err(v)) => {
            println!("FAIL: invariant violated: {v}");
            ExitCode::FAILURE
        }
    }
}

fn say(room: &Room, line: &str) {
    println!("[{:8.3}s] {line}", room.elapsed().as_secs_f64());
}

async fn cycles(room: &mut Room, n: u32, kinds: &[Fault], rng: &mut StdRng, tally: &mut Tally) -> Result<(), Failure> {
    let (term, leader, height) = room.wait_progress().await?;
    say(room, &format!("room ready: controller peer #{leader} (term {term}), height {height}"));
    let (mut term, mut controller) = (term, leader);
    // The latest newcomer (room protocol), which leaves when the next one comes.
    let mut newcomer: Option<usize> = None;
    for cycle in 1..=n {
        let fault = *kinds.choose(rng).unwrap_or(&Fault::Kill);
        let on_controller = match fault {
            Fault::BrokerRestart | Fault::RoomRestart => false,
            Fault::Newcomer => true,
            _ => rng.random_bool(0.4),
        };
        let target = if on_controller {
            controller
        } else {
            let miners: Vec<usize> = room.running().into_iter().filter(|&i| i != controller).collect();
            *miners.choose(rng).expect("a room of three or more has miners")
        };
        let role = if on_controller { format!(" (controller of term {term})") } else { String::new() };
        // Counted before it happens, so a fault the room does not recover from is in the report.
        *tally.injected.entry(fault).or_default() += 1;
        if on_controller {
            *tally.on_controller.entry(fault).or_default() += 1;
        }
        let began = Instant::now();
        let t0 = now_ms();
        let mut line = String::new();
        match fault {
            Fault::Kill => {
                room.kill(target).await;
                let _ = write!(line, "kill -9 peer #{target}{role}");
                // Half the time the peer comes back during the election.
                let early = if rng.random_bool(0.5) { Some(room.restart(target)?) } else { None };
                if on_controller {
                    failover(room, term, t0, fault, tally, &mut line).await?;
                }
                let (r, when) = match early {
                    Some(r) => (r, " at once"),
                    None => (room.restart(target)?, ""),
                };
                let _ = write!(line, "; restarted as peer #{r}{when}");
            }
            Fault::Pause => {
                room.pause(target);
                if on_controller {
                    let _ = write!(line, "SIGSTOP peer #{target}{role}");
                    failover(room, term, t0, fault, tally, &mut line).await?;
                } else {
                    let seen = room.wait_left_or_mined_on(target, t0).await?;
                    let what =
                        if seen { "the room saw it leave" } else { "no will came; the room mined on without it" };
                    let _ = write!(line, "SIGSTOP peer #{target}; {what}");
                }
                room.resume(target);
                let _ = write!(line, "; SIGCONT after {} ms", now_ms().saturating_sub(t0));
            }
            Fault::BrokerRestart => {
                room.restart_broker().await?;
                let _ = write!(
                    line,
                    "broker killed and restarted on port {} ({} ms)",
                    room.addr().port(),
                    now_ms().saturating_sub(t0)
                );
            }
            Fault::LeaveJoin => {
                room.terminate(target).await?;
                let _ = write!(line, "SIGTERM peer #{target}{role}: left cleanly");
                if on_controller {
                    failover(room, term, t0, fault, tally, &mut line).await?;
                }
                let r = room.restart(target)?;
                let _ = write!(line, "; back as peer #{r}");
            }
            Fault::KillInOutage => {
                room.kill_broker().await;
                room.kill(target).await;
                room.start_broker_again().await?;
                let _ = write!(
                    line,
                    "broker killed; kill -9 peer #{target}{role} while it was down (its will died with the broker); broker back"
                );
                if on_controller {
                    failover(room, term, t0, fault, tally, &mut line).await?;
                }
                // The room goes on without it first: the survivors must not wait for it.
                let (t, _, h) = room.wait_progress().await?;
                let r = room.restart(target)?;
                let _ = write!(line, "; block {} in term {t} without it; peer #{r} back", h - 1);
            }
            Fault::Newcomer => {
                room.kill(target).await;
                let r = room.add_peer()?;
                let _ = write!(line, "kill -9 peer #{target}{role}; newcomer peer #{r} during the election");
                failover(room, term, t0, fault, tally, &mut line).await?;
                let back = room.restart(target)?;
                let _ = write!(line, "; peer #{target} restarted as #{back}");
                if let Some(old) = newcomer.replace(r) {
                    // It may have been killed and restarted since, under another index.
                    let old = room.latest(old);
                    room.terminate(old).await?;
                    let _ = write!(line, "; newcomer #{old} left");
                }
            }
            Fault::Duplicate => match room.duplicate(target)? {
                Some(d) => {
                    let _ = write!(
                        line,
                        "peer #{d} started under the id of peer #{target}{role}, with its own data directory"
                    );
                }
                None => {
                    let _ = write!(line, "peer #{target} has not said its id yet: no duplicate");
                }
            },
            Fault::RoomRestart => {
                let all = room.running();
                for &i in &all {
                    room.kill(i).await;
                }
                for i in all {
                    room.restart(i)?;
                }
                let _ = write!(line, "kill -9 of the whole room; every peer restarted from its data directory");
            }
        }
        let (t, c, h) = room.wait_progress().await?;
        (term, controller) = (t, c);
        let recovered = began.elapsed().as_millis() as u64;
        tally.recoveries.push(recovered);
        tally.cycles = cycle;
        say(
            room,
            &format!("cycle {cycle}/{n}: {line}; recovered in {recovered} ms: height {h}, controller #{c} (term {t})"),
        );
        // Part of the workload (faults at irregular moments), not a wait for anything.
        room.idle(Duration::from_millis(rng.random_range(0..300))).await?;
    }
    Ok(())
}

/// Waits for the first challenge of a term after `term` and records the failover time.
async fn failover(
    room: &mut Room,
    term: Term,
    t0: u64,
    fault: Fault,
    tally: &mut Tally,
    line: &mut String,
) -> Result<(), Failure> {
    let ms = room.wait_challenge_after(term).await?.saturating_sub(t0);
    tally.failovers.entry(fault).or_default().push(ms);
    let _ = write!(line, "; term {} challenged after {ms} ms", room.latest_term());
    Ok(())
}

fn stats(samples: &[u64]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    match (percentile(&sorted, 50.0), sorted.last()) {
        (Some(p50), Some(max)) => format!("n={}, p50 {p50} ms, max {max} ms", sorted.len()),
        _ => "none".into(),
    }
}

fn report(tally: &Tally, planned: u32, elapsed: Duration, seed: u64, checked: &Result<Summary, Violation>) -> String {
    let mut out = String::new();
    let total: u32 = tally.injected.values().sum();
    let _ = writeln!(
        out,
        "chaos summary: {} of {planned} cycles in {:.1} s (seed {seed})",
        tally.cycles,
        elapsed.as_secs_f64()
    );
    let kinds: Vec<String> = Fault::ALL
        .iter()
        .map(|f| {
            let n = tally.injected.get(f).copied().unwrap_or(0);
            match tally.on_controller.get(f) {
                Some(c) => format!("{}: {n} ({c} on the controller)", f.name()),
                None => format!("{}: {n}", f.name()),
            }
        })
        .collect();
    let _ = writeln!(out, "  faults injected: {total} ({})", kinds.join(", "));
    let all: Vec<u64> = tally.failovers.values().flatten().copied().collect();
    let _ = writeln!(out, "  failover (controller lost -> first challenge of a newer term): {}", stats(&all));
    for (fault, samples) in &tally.failovers {
        let _ = writeln!(out, "    {}: {}", fault.name(), stats(samples));
    }
    let _ = writeln!(out, "  recovery (fault -> a new block held by every live peer): {}", stats(&tally.recoveries));
    match checked {
        Ok(s) => {
            let _ = writeln!(out, "  re-elections: {} ({} terms)", s.terms.saturating_sub(1), s.terms);
            let _ = writeln!(out, "  blocks mined: {} (suffixes dropped by peers: {})", s.blocks, s.truncations);
            let _ = writeln!(
                out,
                "  invariants: hold (one controller in each of {} terms; {} peers' chains are prefixes of one \
                 verified chain of {} blocks)",
                s.terms, s.peers, s.blocks
            );
        }
        Err(v) => {
            let _ = writeln!(out, "  invariants: VIOLATED: {v}");
        }
    }
    out
}
