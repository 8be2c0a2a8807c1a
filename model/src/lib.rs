//! An exhaustive model check of the room's election and commit rules (ROOM.md, "Election" and
//! "Chain replication and commit"), with the [`stateright`] model checker.
//!
//! # What is modelled
//! - Three peers (indices 0..3 for the spec's ids 1..3), all voters at first, quorum 2; with
//!   [`Settings::changes`], the configuration of a log is all three with its changes applied.
//! - Terms, durable with the vote (`voted_for`) and the log; each log entry is just the term of the
//!   controller that appended it (by log matching, (index, term) names a whole prefix).
//! - Election: a peer's timer expires -> term + 1, it publishes `Ballot{term, ballot, pos}` with a
//!   ballot drawn nondeterministically from a small domain and pos = (last entry's term, length).
//!   A peer that hears a ballot of a higher term moves to that term (vote cleared) and may publish
//!   its own ballot. A voter grants at most one candidate per term, at any moment after it holds
//!   an eligible ballot, to the most up-to-date then highest (ballot, id) among the ballots it
//!   holds with pos >= its own pos (itself included). A candidate with a quorum of grants is the controller of its term.
//! - Replication: the controller appends entries of its term and publishes
//!   `Append{term, prev_len, prev_term, entries, commit}`, for every prefix length
//!   ([`Settings::any_prefix`], covering every `next_index` a real controller could hold) or for
//!   the whole log only (the same outcomes, fewer states); a follower accepts only from a term >= its own,
//!   only if the prefix links, truncates its conflicting suffix (never a matching one) and acks
//!   its matching length. The controller commits h when entry h-1 is of its own term and a quorum
//!   (itself included) acked >= h; followers learn `min(commit, matched length)` from Appends.
//! - Faults: stateright's unordered duplicating network (reordering and duplication; a message never
//!   delivered is a lost one), optionally lossy, and crash/restart of a peer, which keeps only the
//!   durable state (term, vote, log) and loses role, ballots, grants, commit and acks.
//!
//! # What is abstracted away
//! - Pre-vote is left out: it only stops a partitioned peer from inflating terms (liveness); any
//!   peer may time out at any moment here, which is a superset of the behaviours pre-vote allows,
//!   so safety does not depend on it.
//! - Time: timers fire in any order at any moment (no heartbeat suppression, no `ballot_wait`, no
//!   check-quorum). Again a superset of the real behaviours, for safety.
//! - Blocks, hashes, mining, challenges, sync requests: an entry is its term; the controller's
//!   `Append` for every prefix stands for the sync protocol's replies.
//! - Bootstrap proposals, keys, and the replacement policy: with [`Settings::changes`], a
//!   controller may toggle any other peer's membership (one entry per change) whenever the rules
//!   allow one, which is a superset of when the room's policy proposes one. Peers count votes and
//!   copies against the configuration of their whole log, uncommitted changes included; a peer
//!   outside its own configuration neither grants nor keeps others' ballots, as in the room.
//! - The commit hint in durable storage (commit is volatile here: a weaker assumption).
//!
//! # State-space reductions (each sound for the safety properties)
//! - `Ballot` and `Append` are one envelope per publish (MQTT topics), not one per recipient.
//! - A crash and its restart are one step: being down looks, to the others, like being slow.
//! - Messages that can no longer change anything (a term below every recipient's, a grant to a
//!   peer that is no longer a candidate of that term, a ballot for voters that all voted) are
//!   forgotten — a loss the network may inflict anyway; acks of length 0 are not sent.
//! - A voter forgets the ballots it holds once it has voted, a controller its grants.
//!
//! # Bounds
//! Peers 3 (fixed); terms, log length, ballot domain, restarts and loss are per instance
//! ([`Settings`], [`Faults`]); see `tests/main.rs` for the instances checked and their sizes.
//!
//! # Properties
//! See [`RoomModel::properties`]. The ghost state they read is in [`Ghost`]. Deliberately broken
//! rule sets ([`Variant`]) show that the check can fail.

mod check;
mod peer;

use std::time::{Duration, Instant};

use stateright::{Checker, Expectation, Model};

pub use check::{Action, Faults, Ghost, RoomModel, State};
pub use peer::{Durable, LOG_CAPACITY, Log, Msg, PEERS, PeerId, PeerState, Pos, QUORUM, Role, Settings, Term, Variant};

/// The outcome of one exhaustive breadth-first run.
#[derive(Debug)]
pub struct Report {
    /// Distinct states explored.
    pub unique_states: usize,
    /// States generated, repeats included.
    pub states: usize,
    /// Longest path explored.
    pub max_depth: usize,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Whether every reachable state was visited (false if it stopped at a counterexample).
    pub complete: bool,
    /// Each property with a discovery: its name and the path to it, one action per line.
    pub discoveries: Vec<(&'static str, String)>,
}

/// Runs an exhaustive BFS of `model` on `threads` threads. With `stop_at_failure` it stops at the
/// first counterexample (for the broken variants); otherwise it visits every reachable state.
pub fn check(model: RoomModel, threads: usize, stop_at_failure: bool) -> Report {
    let start = Instant::now();
    let mut builder = model.checker().threads(threads);
    if stop_at_failure {
        builder = builder.finish_when(stateright::HasDiscoveries::AnyFailures);
    }
    let checker = builder.spawn_bfs().join();
    let elapsed = start.elapsed();
    let mut discoveries: Vec<_> = checker
        .discoveries()
        .into_iter()
        .map(|(name, path)| {
            let steps: Vec<String> = path.into_actions().iter().map(|a| format!("  {a:?}")).collect();
            (name, steps.join("\n"))
        })
        .collect();
    discoveries.sort();
    // `is_done` is also true when every property has a discovery; only a run without a failure
    // discovery is known to have covered the whole state space.
    let complete = checker.is_done() && !stop_at_failure;
    Report {
        unique_states: checker.unique_state_count(),
        states: checker.state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        complete,
        discoveries,
    }
}

impl Report {
    /// The discovered path for property `name`, if any.
    pub fn discovery(&self, name: &str) -> Option<&str> {
        self.discoveries.iter().find(|(n, _)| *n == name).map(|(_, p)| p.as_str())
    }

    /// One line: the instance, the states explored and the time taken.
    pub fn summary(&self, model: &RoomModel) -> String {
        format!(
            "{:?} {:?}: {} unique states ({} generated), max depth {}, {:.1?}{}",
            model.settings,
            model.faults,
            self.unique_states,
            self.states,
            self.max_depth,
            self.elapsed,
            if self.complete { "" } else { " (stopped early)" }
        )
    }

    /// The properties of `model` this run refuted: `always`/`eventually` ones with a
    /// counterexample, and `sometimes` ones without an example after a complete run.
    pub fn failures(&self, model: &RoomModel) -> Vec<&'static str> {
        model
            .properties()
            .into_iter()
            .filter(|p| match p.expectation {
                Expectation::Sometimes => self.complete && self.discovery(p.name).is_none(),
                _ => self.discovery(p.name).is_some(),
            })
            .map(|p| p.name)
            .collect()
    }
}
