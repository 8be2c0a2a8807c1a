//! The events of the event stream: what a peer does, one JSON object per line.
//!
//! Tests, the launcher and outside tools read this stream (`--events FILE` or `-` for stdout).
//! Every line (a [`Record`]) has `ts_ms` (Unix milliseconds), `peer` (client id) and `event` (a
//! snake_case name); the other fields depend on the event and are documented in
//! `docs/PROTOCOL.md`. The sink that stamps and writes the lines is the peer's (`peer::events`).

use serde::{Deserialize, Serialize};

use crate::protocol::{Change, DropReason, PeerId, Term, TxId};

/// Something a peer did or saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The peer process started (always the first event).
    Started {
        /// OS process id, so tools can inject faults into a chosen peer.
        pid: u32,
        /// The peer's client id.
        client_id: PeerId,
        /// Expected room size.
        room_size: usize,
        /// Mining threads.
        threads: usize,
    },
    /// Connected (or reconnected) to the broker and subscribed.
    Connected {
        /// Broker address.
        broker: String,
    },
    /// Lost the broker connection; it is retried with backoff.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A peer became known.
    PeerJoined {
        /// Its client id.
        id: PeerId,
        /// Members known now, this peer included.
        members: usize,
    },
    /// A peer left (cleanly, or announced by its Last Will).
    PeerLeft {
        /// Its client id.
        id: PeerId,
        /// Members known now, this peer included.
        members: usize,
    },
    /// This peer voted.
    VoteCast {
        /// Term being elected.
        term: Term,
        /// The vote.
        vote: u32,
    },
    /// This peer learned who controls a term.
    ControllerElected {
        /// The term.
        term: Term,
        /// The controller's client id.
        controller: PeerId,
        /// Votes held when deciding (0 when adopted from an announcement or challenge).
        votes: usize,
    },
    /// As controller, issued a challenge.
    ChallengeIssued {
        /// Controller's term.
        term: Term,
        /// Transaction id.
        tx: TxId,
        /// Leading zero bits required.
        difficulty: u8,
    },
    /// As miner, started on a challenge.
    MiningStarted {
        /// Controller's term.
        term: Term,
        /// Transaction id.
        tx: TxId,
        /// Leading zero bits required.
        difficulty: u8,
    },
    /// As miner, found a solution and submitted it.
    SolutionFound {
        /// Transaction id.
        tx: TxId,
        /// The nonce.
        nonce: u64,
        /// Candidates tried for this transaction by all threads.
        hashes: u64,
        /// Milliseconds from the start of mining to the find.
        elapsed_ms: u64,
    },
    /// As controller, rejected a solution.
    SolutionRejected {
        /// Transaction named by the solution.
        tx: TxId,
        /// Miner who sent it.
        miner: PeerId,
        /// Why.
        reason: String,
    },
    /// A verified block was appended to this peer's chain.
    BlockAccepted {
        /// Term of the controller that accepted it.
        term: Term,
        /// Transaction id (height).
        tx: TxId,
        /// Winning miner.
        winner: PeerId,
        /// Leading zero bits required.
        difficulty: u8,
        /// Nonce (the solution).
        nonce: u64,
        /// Controller-measured time from challenge to accepted solution, in ms.
        #[serde(default)]
        solve_ms: u64,
        /// Block hash (hex).
        hash: String,
        /// Previous block hash (hex).
        prev: String,
        /// A change of the room's members instead of a solved transaction (no winner: 0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<Change>,
    },
    /// The miner stopped or replaced a job; cumulative totals, for hash rates.
    MiningStopped {
        /// The transaction that was mined.
        tx: TxId,
        /// Candidates tried by this peer since it started.
        total_hashes: u64,
        /// Milliseconds this peer spent mining since it started.
        total_mining_ms: u64,
    },
    /// Blocks caught up from another peer's chain.
    Synced {
        /// First transaction received.
        from: TxId,
        /// Height after applying them.
        height: u64,
    },
    /// A block became committed: a quorum of the room holds it, so it is never lost.
    BlockCommitted {
        /// Transaction id (height).
        tx: TxId,
        /// Term of the controller that accepted it.
        term: Term,
        /// Winning miner.
        winner: PeerId,
    },
    /// This peer started from its data directory (room protocol): what it restored, so a checker
    /// of the events knows its chain without its earlier runs' records.
    Resumed {
        /// Its term.
        term: Term,
        /// Blocks in its chain.
        height: u64,
        /// Blocks it knows committed.
        commit: u64,
        /// The hash of its last block (hex), if it has one.
        tip: Option<String>,
    },
    /// This peer found the room without a live controller and asked to move to `term`.
    PreVote {
        /// The term proposed.
        term: Term,
    },
    /// This peer gave its one vote of `term` (written to disk before it was sent).
    VoteGranted {
        /// The term.
        term: Term,
        /// The candidate.
        to: PeerId,
    },
    /// This peer stopped being controller of `term` (it did not hear a quorum, or a newer term).
    QuorumLost {
        /// The term.
        term: Term,
        /// Why.
        reason: String,
    },
    /// No controller, and fewer voters within reach than a quorum needs: this peer waits.
    QuorumWaiting {
        /// Voters heard from recently, this peer included.
        reachable: usize,
        /// Voters a quorum needs.
        needed: usize,
        /// Voters in the configuration.
        voters: usize,
    },
    /// The controller asked this peer to drop a block it knows committed: a safety violation,
    /// refused. Never expected; the invariant checks look for it.
    CommittedConflict {
        /// The block asked to be dropped.
        tx: TxId,
        /// Blocks this peer knows committed.
        commit: u64,
    },
    /// This peer's chain held blocks the current controller's chain does not; they were dropped.
    ChainTruncated {
        /// New height.
        height: u64,
    },
    /// A message was dropped (undecodable, invalid, stale or from the wrong sender).
    MessageDropped {
        /// Short reason name: a [`DropReason::as_str`] (see [`Event::dropped`]).
        reason: String,
        /// Details.
        detail: String,
    },
    /// Lab wire format: this peer decided the election (the controller's id as the room wrote
    /// it: decimal digits of an integer, or the string).
    LabElected {
        /// The controller's ClientID.
        controller: String,
        /// Votes held when deciding.
        votes: usize,
    },
    /// Lab wire format: a course client acts as controller (its challenge names no hashvote
    /// issuer) while this peer was, or followed, another: a course client cannot change its
    /// mind, so this peer follows that client's challenges from now on.
    LabYielded {
        /// The course client's first challenge heard.
        tx: TxId,
        /// The controller this peer had decided on.
        was: String,
    },
    /// Lab wire format: a transaction's winner, verified by this peer (as controller: decided).
    LabResult {
        /// Transaction id.
        tx: TxId,
        /// The winner's ClientID (decimal digits of an integer, or the string).
        winner: String,
        /// The winning solution string.
        solution: String,
        /// The lab's Result: 1 (only winners are reported).
        result: u8,
        /// Leading zero bits the transaction required.
        difficulty: u32,
    },
    /// The peer is shutting down.
    Stopped,
}

impl Event {
    /// A message dropped for `reason`.
    pub fn dropped(reason: DropReason, detail: String) -> Self {
        Self::MessageDropped { reason: reason.as_str().into(), detail }
    }
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix time in milliseconds.
    pub ts_ms: u64,
    /// The peer's client id.
    pub peer: PeerId,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// A one-line human description of an event, for logs and the launcher's display.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Started { pid, client_id, room_size, threads } => {
            format!("started as {client_id} (pid {pid}, room of {room_size}, {threads} mining threads)")
        }
        Event::Connected { broker } => format!("connected to {broker}"),
        Event::Disconnected { reason } => format!("lost the broker: {reason}"),
        Event::PeerJoined { id, members } => format!("peer {id} joined ({members} known)"),
        Event::PeerLeft { id, members } => format!("peer {id} left ({members} known)"),
        Event::VoteCast { term, vote } => format!("voted {vote} in term {term}"),
        Event::ControllerElected { term, controller, votes: 0 } => {
            format!("follows controller {controller} of term {term}")
        }
        Event::ControllerElected { term, controller, votes } => {
            format!("elected controller {controller} for term {term} ({votes} votes)")
        }
        Event::ChallengeIssued { term, tx, difficulty } => {
            format!("issued challenge tx {tx}: {difficulty} zero bits (term {term})")
        }
        Event::MiningStarted { tx, difficulty, .. } => format!("mining tx {tx} ({difficulty} bits)"),
        Event::SolutionFound { tx, nonce, hashes, elapsed_ms } => {
            format!("found tx {tx}: nonce {nonce} after {hashes} hashes in {elapsed_ms} ms")
        }
        Event::SolutionRejected { tx, miner, reason } => format!("rejected {miner}'s solution for tx {tx}: {reason}"),
        Event::MiningStopped { tx, total_hashes, total_mining_ms } => {
            let rate = *total_hashes as f64 / (*total_mining_ms).max(1) as f64 / 1000.0;
            format!("stopped mining tx {tx}; {rate:.1} MH/s so far")
        }
        Event::BlockAccepted { tx, change: Some(change), .. } => {
            format!("block {tx}: the room's members change: {change}")
        }
        Event::BlockAccepted { tx, winner, difficulty, nonce, hash, .. } => {
            format!(
                "block {tx}: winner {winner}, solution {nonce}, {difficulty} bits, hash {}",
                &hash[..16.min(hash.len())]
            )
        }
        Event::Synced { from, height } => format!("caught up from tx {from} to height {height}"),
        Event::ChainTruncated { height } => format!("dropped blocks the room never accepted; height {height}"),
        Event::BlockCommitted { tx, term, winner } => format!("block {tx} committed (term {term}, winner {winner})"),
        Event::PreVote { term } => format!("no live controller: asks to move to term {term}"),
        Event::VoteGranted { term, to } => format!("granted its vote of term {term} to {to}"),
        Event::QuorumLost { term, reason } => format!("stepped down as controller of term {term}: {reason}"),
        Event::QuorumWaiting { reachable, needed, voters } => {
            format!("waiting for a quorum: {reachable} of {needed} needed reachable ({voters} voters)")
        }
        Event::Resumed { term, height, commit, .. } => {
            format!("resumed from its data directory: term {term}, {height} blocks, {commit} committed")
        }
        Event::CommittedConflict { tx, commit } => {
            format!("refused to drop block {tx}, below the {commit} blocks known committed")
        }
        Event::MessageDropped { reason, detail } => format!("dropped message ({reason}): {detail}"),
        Event::LabElected { controller, votes } => format!("lab controller {controller} ({votes} votes)"),
        Event::LabYielded { tx, was } => {
            format!("a course client acts as controller (challenge {tx}): follows it, not {was}")
        }
        Event::LabResult { tx, winner, solution, difficulty, .. } => {
            format!("lab tx {tx}: winner {winner}, solution {solution:?}, {difficulty} bits")
        }
        Event::Stopped => "stopped".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of `Event`'s variants, as written in this file, in snake_case (serde's names).
    fn variant_names() -> Vec<String> {
        let source = include_str!("events.rs");
        let body = source.split("pub enum Event {").nth(1).expect("the enum").split("\n}").next().unwrap();
        body.lines()
            .filter_map(|l| l.strip_prefix("    ")?.split([' ', ',']).next())
            .filter(|name| name.starts_with(|c: char| c.is_ascii_uppercase()))
            .map(|name| {
                let mut snake = String::new();
                for (i, c) in name.chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        snake.push('_');
                    }
                    snake.push(c.to_ascii_lowercase());
                }
                snake
            })
            .collect()
    }

    #[test]
    fn every_event_is_in_the_protocol_docs_event_table() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let table = doc.split("## Event stream").nth(1).expect("the section").split("\n## ").next().unwrap();
        let names = variant_names();
        assert!(names.len() >= 25 && names.contains(&"lab_yielded".to_string()), "{names:?}");
        let missing: Vec<_> = names.iter().filter(|n| !table.contains(&format!("`{n}`"))).collect();
        assert!(missing.is_empty(), "events missing from the table in docs/PROTOCOL.md: {missing:?}");
        // The names are serde's: one round trip shows the rule.
        let v = serde_json::to_value(Event::ChainTruncated { height: 1 }).unwrap();
        assert!(names.contains(&v["event"].as_str().unwrap().to_string()));
    }

    #[test]
    fn records_are_flat_json_with_the_documented_fields() {
        let r = Record { ts_ms: 5, peer: 9, event: Event::ControllerElected { term: 2, controller: 3, votes: 10 } };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "controller_elected");
        assert_eq!(v["term"], 2);
        assert_eq!(v["controller"], 3);
        assert_eq!(v["peer"], 9);
        let back: Record = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
