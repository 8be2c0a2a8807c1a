//! `launcher chaos`: a room under random faults, checked for safety and progress.
//!
//! It starts a broker and a room, waits for the election and the first block, then runs cycles of
//! one random fault each: a peer killed with SIGKILL (and started again on its data directory), a
//! peer paused with SIGSTOP until the room has noticed (then SIGCONT), the broker killed and
//! restarted on the same port, a peer leaving cleanly (SIGTERM) and coming back, or one of the
//! combined faults (see [`Fault`](crate::cli::Fault)). Peer faults sometimes target the controller. After each fault
//! it waits, under a deadline, for the room to make progress: every live peer follows one
//! controller and holds a block no live peer held before. At the end it stops everything and
//! reports the faults, the re-elections, the failover times (controller lost → first challenge of
//! a newer term, from the peers' event clocks), the blocks and the invariants
//! ([`crate::invariants`]) over every event of the run.

pub(crate) mod room;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use peer::events::now_ms;
use peer::protocol::Term;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::cli::{ChaosArgs, Fault};
use crate::invariants::{Summary, Violation};
use crate::stats::percentile;
use room::{Failure, Room, RoomConfig};

/// Exit code when interrupted by Ctrl-C (128 + SIGINT).
const INTERRUPTED: u8 = 130;

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
pub(crate) fn main(args: ChaosArgs) -> ExitCode {
    crate::runtime::block_on("launcher", run(args))
}

async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let cfg = RoomConfig::new(args.peers, &args.room);
    let faults = if args.faults.is_empty() { Fault::ALL.to_vec() } else { args.faults.clone() };
    let seed = args.room.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    println!(
        "chaos: {} peers ({:?} wire), difficulty {}, keepalive {} s, {} cycles, seed {seed}",
        cfg.peers, args.room.wire, cfg.difficulty, cfg.keepalive, args.cycles
    );
    let started = Instant::now();
    let mut room = Room::start(cfg).await?;
    println!("broker listening on {}", room.addr());
    let mut tally = Tally::default();
    let outcome = cycles(&mut room, args.cycles, &faults, &mut rng, &mut tally).await;
    let checked = room.stop().await;
    let report = report(&tally, args.cycles, started.elapsed(), seed, &checked);
    print!("{report}");
    if let (Err(Failure::Interrupted), Ok(_)) = (&outcome, &checked) {
        println!("INTERRUPTED after {} of {} cycles (no violation so far)", tally.cycles, args.cycles);
        return Ok(ExitCode::from(INTERRUPTED));
    }
    Ok(match room::verdict(&outcome, &checked) {
        Ok(_) => {
            println!("PASS");
            ExitCode::SUCCESS
        }
        Err(fail) => {
            println!("{fail}");
            ExitCode::FAILURE
        }
    })
}

fn say(room: &Room, line: &str) {
    println!("[{:8.3}s] {line}", room.elapsed().as_secs_f64());
}

/// Runs `n` cycles of one fault each, chosen from `kinds`, once the room works.
async fn cycles(room: &mut Room, n: u32, kinds: &[Fault], rng: &mut StdRng, tally: &mut Tally) -> Result<(), Failure> {
    let (term, controller, height) = room.wait_progress().await?;
    say(room, &format!("room ready: controller peer #{controller} (term {term}), height {height}"));
    let mut faults = Faults { room, rng, tally, term, controller, newcomer: None };
    for cycle in 1..=n {
        let fault = *kinds.choose(faults.rng).unwrap_or(&Fault::Kill);
        faults.cycle(cycle, n, fault).await?;
    }
    Ok(())
}

/// A fault cycle's target: a peer, and how the report names it.
#[derive(Debug)]
struct Target {
    index: usize,
    on_controller: bool,
    /// ` (controller of term T)` for the controller, empty for a miner.
    role: String,
}

/// The fault cycles of a run: the room, the random choices, what the faults did so far, and the
/// controller the room last agreed on.
struct Faults<'a> {
    room: &'a mut Room,
    rng: &'a mut StdRng,
    tally: &'a mut Tally,
    term: Term,
    controller: usize,
    /// The latest newcomer (room protocol), which leaves when the next one comes.
    newcomer: Option<usize>,
}

impl Faults<'_> {
    /// Injects `fault`, waits for the room to make progress again, and says what happened.
    async fn cycle(&mut self, cycle: u32, n: u32, fault: Fault) -> Result<(), Failure> {
        let target = self.target(fault);
        // Counted before it happens, so a fault the room does not recover from is in the report.
        *self.tally.injected.entry(fault).or_default() += 1;
        if target.on_controller {
            *self.tally.on_controller.entry(fault).or_default() += 1;
        }
        let began = Instant::now();
        let t0 = now_ms();
        let line = match fault {
            Fault::Kill => self.kill(&target, t0).await?,
            Fault::Pause => self.pause(&target, t0).await?,
            Fault::BrokerRestart => {
                self.room.restart_broker().await?;
                format!(
                    "broker killed and restarted on port {} ({} ms)",
                    self.room.addr().port(),
                    now_ms().saturating_sub(t0)
                )
            }
            Fault::LeaveJoin => self.leave_join(&target, t0).await?,
            Fault::KillInOutage => self.kill_in_outage(&target, t0).await?,
            Fault::Newcomer => self.newcomer(&target, t0).await?,
            Fault::Duplicate => match self.room.duplicate(target.index)? {
                Some(d) => format!(
                    "peer #{d} started under the id of peer #{}{}, with its own data directory",
                    target.index, target.role
                ),
                None => format!("peer #{} has not said its id yet: no duplicate", target.index),
            },
            Fault::RoomRestart => self.room_restart().await?,
        };
        let (t, c, h) = self.room.wait_progress().await?;
        (self.term, self.controller) = (t, c);
        let recovered = began.elapsed().as_millis() as u64;
        self.tally.recoveries.push(recovered);
        self.tally.cycles = cycle;
        say(
            self.room,
            &format!("cycle {cycle}/{n}: {line}; recovered in {recovered} ms: height {h}, controller #{c} (term {t})"),
        );
        // Part of the workload (faults at irregular moments), not a wait for anything.
        self.room.idle(Duration::from_millis(self.rng.random_range(0..300))).await
    }

    /// The peer `fault` hits: the controller (always for a newcomer, sometimes for the other peer
    /// faults) or a random miner.
    fn target(&mut self, fault: Fault) -> Target {
        let on_controller = match fault {
            Fault::BrokerRestart | Fault::RoomRestart => false,
            Fault::Newcomer => true,
            _ => self.rng.random_bool(0.4),
        };
        let index = if on_controller {
            self.controller
        } else {
            let miners: Vec<usize> = self.room.running().into_iter().filter(|&i| i != self.controller).collect();
            *miners.choose(self.rng).expect("a room of three or more has miners")
        };
        let role = if on_controller { format!(" (controller of term {})", self.term) } else { String::new() };
        Target { index, on_controller, role }
    }

    /// [`Fault::Kill`]: the peer comes back at once (half the time, during the election) or once
    /// the room has a new controller.
    async fn kill(&mut self, target: &Target, t0: u64) -> Result<String, Failure> {
        let Target { index, on_controller, role } = target;
        self.room.kill(*index).await;
        let mut line = format!("kill -9 peer #{index}{role}");
        let early = if self.rng.random_bool(0.5) { Some(self.room.restart(*index)?) } else { None };
        if *on_controller {
            self.failover(Fault::Kill, t0, &mut line).await?;
        }
        let (r, when) = match early {
            Some(r) => (r, " at once"),
            None => (self.room.restart(*index)?, ""),
        };
        let _ = write!(line, "; restarted as peer #{r}{when}");
        Ok(line)
    }

    /// [`Fault::Pause`]: resumed once the room has noticed (a new controller, or the peer gone).
    async fn pause(&mut self, target: &Target, t0: u64) -> Result<String, Failure> {
        let Target { index, on_controller, role } = target;
        self.room.pause(*index);
        let mut line;
        if *on_controller {
            line = format!("SIGSTOP peer #{index}{role}");
            self.failover(Fault::Pause, t0, &mut line).await?;
        } else {
            let seen = self.room.wait_left_or_mined_on(*index, t0).await?;
            let what = if seen { "the room saw it leave" } else { "no will came; the room mined on without it" };
            line = format!("SIGSTOP peer #{index}; {what}");
        }
        self.room.resume(*index);
        let _ = write!(line, "; SIGCONT after {} ms", now_ms().saturating_sub(t0));
        Ok(line)
    }

    /// [`Fault::LeaveJoin`].
    async fn leave_join(&mut self, target: &Target, t0: u64) -> Result<String, Failure> {
        let Target { index, on_controller, role } = target;
        self.room.terminate(*index).await?;
        let mut line = format!("SIGTERM peer #{index}{role}: left cleanly");
        if *on_controller {
            self.failover(Fault::LeaveJoin, t0, &mut line).await?;
        }
        let r = self.room.restart(*index)?;
        let _ = write!(line, "; back as peer #{r}");
        Ok(line)
    }

    /// [`Fault::KillInOutage`]: the room must go on without the peer before it comes back.
    async fn kill_in_outage(&mut self, target: &Target, t0: u64) -> Result<String, Failure> {
        let Target { index, on_controller, role } = target;
        self.room.kill_broker().await;
        self.room.kill(*index).await;
        self.room.start_broker_again().await?;
        let mut line = format!(
            "broker killed; kill -9 peer #{index}{role} while it was down (its will died with the broker); broker back"
        );
        if *on_controller {
            self.failover(Fault::KillInOutage, t0, &mut line).await?;
        }
        // The room goes on without it first: the survivors must not wait for it.
        let (t, _, h) = self.room.wait_progress().await?;
        let r = self.room.restart(*index)?;
        let _ = write!(line, "; block {} in term {t} without it; peer #{r} back", h - 1);
        Ok(line)
    }

    /// [`Fault::Newcomer`]: the previous newcomer leaves once this one has come.
    async fn newcomer(&mut self, target: &Target, t0: u64) -> Result<String, Failure> {
        let Target { index, role, .. } = target;
        self.room.kill(*index).await;
        let r = self.room.add_peer()?;
        let mut line = format!("kill -9 peer #{index}{role}; newcomer peer #{r} during the election");
        self.failover(Fault::Newcomer, t0, &mut line).await?;
        let back = self.room.restart(*index)?;
        let _ = write!(line, "; peer #{index} restarted as #{back}");
        if let Some(old) = self.newcomer.replace(r) {
            // It may have been killed and restarted since, under another index.
            let old = self.room.latest(old);
            self.room.terminate(old).await?;
            let _ = write!(line, "; newcomer #{old} left");
        }
        Ok(line)
    }

    /// [`Fault::RoomRestart`].
    async fn room_restart(&mut self) -> Result<String, Failure> {
        let all = self.room.running();
        for &i in &all {
            self.room.kill(i).await;
        }
        for i in all {
            self.room.restart(i)?;
        }
        Ok("kill -9 of the whole room; every peer restarted from its data directory".into())
    }

    /// Waits for the first challenge of a term after the last agreed one and records the failover
    /// time since `t0`.
    async fn failover(&mut self, fault: Fault, t0: u64, line: &mut String) -> Result<(), Failure> {
        let ms = self.room.wait_challenge_after(self.term).await?.saturating_sub(t0);
        self.tally.failovers.entry(fault).or_default().push(ms);
        let _ = write!(line, "; term {} challenged after {ms} ms", self.room.latest_term());
        Ok(())
    }
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
