//! What the launcher makes of the peers' events: readable lines as things happen (each election,
//! challenge and block once, not once per peer) and the summary printed at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::Instant;

use peer::events::{Event, Record};

use crate::stats::percentile;
use peer::protocol::{PeerId, Term, TxId};

#[derive(Debug, Default, Clone)]
struct PeerState {
    id: Option<PeerId>,
    height: u64,
    alive: bool,
    hashes: u64,
    mining_ms: u64,
    wins: u64,
}

#[derive(Debug, Clone, Copy)]
struct BlockInfo {
    winner: PeerId,
    difficulty: u8,
    solve_ms: u64,
}

/// Beyond this many peers, the summary gives the spread of a per-peer figure, not a line a peer.
const MAX_PEER_LINES: usize = 20;

/// The room as seen through its events.
#[derive(Debug)]
pub struct Tally {
    started: Instant,
    expected: usize,
    peers: Vec<PeerState>,
    controllers: BTreeMap<Term, PeerId>,
    announced_terms: BTreeSet<(Term, PeerId)>,
    blocks: BTreeMap<TxId, BlockInfo>,
    /// Blocks that changed the room's members (announced once).
    changes: BTreeSet<TxId>,
    all_known: bool,
    left: BTreeSet<PeerId>,
    late_solutions: u64,
    /// Each peer's first connection (its records' clock, Unix ms).
    first_connected: BTreeMap<PeerId, u64>,
    /// When the first controller elected by a quorum said so.
    first_elected: Option<u64>,
    /// Blocks the controller of their term accepted, and when (its clock).
    accepted: BTreeMap<(PeerId, TxId), u64>,
    /// From a block accepted by its controller to its commit there (ms), block by block.
    commit_ms: Vec<u64>,
}

impl Tally {
    /// A tally for a room of `expected` peers.
    pub fn new(expected: usize) -> Self {
        Self {
            started: Instant::now(),
            expected,
            peers: vec![PeerState { alive: true, ..PeerState::default() }; expected],
            controllers: BTreeMap::new(),
            announced_terms: BTreeSet::new(),
            blocks: BTreeMap::new(),
            changes: BTreeSet::new(),
            all_known: false,
            left: BTreeSet::new(),
            late_solutions: 0,
            first_connected: BTreeMap::new(),
            first_elected: None,
            accepted: BTreeMap::new(),
            commit_ms: Vec::new(),
        }
    }

    /// The index of the peer whose client id is `id`, once it has said so.
    pub fn index_of(&self, id: PeerId) -> Option<usize> {
        self.peers.iter().position(|p| p.id == Some(id))
    }

    fn name(&self, id: PeerId) -> String {
        match self.index_of(id) {
            Some(i) => format!("peer #{i} ({id})"),
            None => format!("peer {id}"),
        }
    }

    /// Takes one record from peer `index`, printing what is worth showing through `print`.
    pub fn record(&mut self, index: usize, r: Record, print: &mut dyn FnMut(String)) {
        let t = self.started.elapsed().as_secs_f64();
        let mut say = |s: String| print(format!("[{t:7.3}s] {s}"));
        self.time(&r);
        let Some(state) = self.peers.get_mut(index) else { return };
        match r.event {
            Event::Started { pid, client_id, .. } => {
                state.id = Some(client_id);
                say(format!("peer #{index} started: client id {client_id}, pid {pid}"));
            }
            Event::PeerJoined { members, .. } if members >= self.expected && !self.all_known => {
                self.all_known = true;
                say(format!("peer #{index} knows all {members} peers: voting starts"));
            }
            Event::PeerLeft { id, members } if self.left.insert(id) => {
                say(format!("{} left the room ({members} remain)", self.name(id)));
            }
            Event::ControllerElected { term, controller, votes } if self.announced_terms.insert((term, controller)) => {
                let previous = self.controllers.insert(term, controller);
                let how = if previous.is_some() { "replaced by a later vote: " } else { "" };
                let by = if votes > 0 { format!("{votes} votes") } else { "announced".into() };
                say(format!("election of term {term}: {how}controller is {} ({by})", self.name(controller)));
            }
            Event::ChallengeIssued { term, tx, difficulty } => {
                say(format!("challenge {tx}: find {difficulty} leading zero bits (term {term})"));
            }
            Event::MiningStopped { total_hashes, total_mining_ms, .. } => {
                state.hashes = total_hashes;
                state.mining_ms = total_mining_ms;
            }
            Event::BlockAccepted { tx, change: Some(change), .. } => {
                state.height = state.height.max(tx + 1);
                if self.changes.insert(tx) {
                    say(format!("block {tx}: the room's members change: {change}"));
                }
            }
            Event::BlockAccepted { tx, winner, difficulty, nonce, solve_ms, .. } => {
                state.height = state.height.max(tx + 1);
                if let std::collections::btree_map::Entry::Vacant(slot) = self.blocks.entry(tx) {
                    slot.insert(BlockInfo { winner, difficulty, solve_ms });
                    if let Some(i) = self.index_of(winner) {
                        self.peers[i].wins += 1;
                    }
                    let name = self.name(winner);
                    say(format!("block {tx}: won by {name} in {solve_ms} ms (solution {nonce}, {difficulty} bits)"));
                }
            }
            Event::SolutionRejected { tx, miner, reason } => {
                // Late solutions are the normal end of every race; count them, show the rest.
                if reason == "already_solved" {
                    self.late_solutions += 1;
                } else {
                    say(format!("controller rejected {}'s solution for {tx}: {reason}", self.name(miner)));
                }
            }
            _ => {}
        }
    }

    /// Takes the times of one record: connections, the first election, accepted and committed
    /// blocks at their controller.
    fn time(&mut self, r: &Record) {
        match r.event {
            Event::Connected { .. } => {
                self.first_connected.entry(r.peer).or_insert(r.ts_ms);
            }
            Event::ControllerElected { controller, votes, .. } if votes > 0 && controller == r.peer => {
                self.first_elected.get_or_insert(r.ts_ms);
            }
            Event::BlockAccepted { tx, term, .. } if self.controllers.get(&term) == Some(&r.peer) => {
                self.accepted.insert((r.peer, tx), r.ts_ms);
            }
            Event::BlockCommitted { tx, .. } => {
                if let Some(at) = self.accepted.remove(&(r.peer, tx)) {
                    self.commit_ms.push(r.ts_ms.saturating_sub(at));
                }
            }
            _ => {}
        }
    }

    /// From the last peer's first connection to the first controller elected by a quorum (ms);
    /// `None` before both, or if a controller was elected before every peer connected.
    pub fn election_after_last_connect(&self) -> Option<u64> {
        let last = self.first_connected.values().max()?;
        (self.first_connected.len() >= self.expected).then_some(())?;
        self.first_elected?.checked_sub(*last)
    }

    /// Marks peer `index` as gone.
    pub fn exited(&mut self, index: usize) {
        if let Some(p) = self.peers.get_mut(index) {
            p.alive = false;
        }
    }

    /// Peers still running.
    pub fn live(&self) -> usize {
        self.peers.iter().filter(|p| p.alive).count()
    }

    /// True when every live peer holds at least `blocks` blocks.
    pub fn all_have(&self, blocks: u64) -> bool {
        self.live() > 0 && self.peers.iter().filter(|p| p.alive).all(|p| p.height >= blocks)
    }

    /// Index of the controller of the latest term.
    pub fn controller_index(&self) -> Option<usize> {
        self.controllers.values().next_back().and_then(|&id| self.index_of(id))
    }

    /// The end-of-run summary.
    pub fn summary(&self) -> String {
        let mut s = String::from("\nsummary\n");
        for (term, controller) in &self.controllers {
            let _ = writeln!(s, "  term {term}: controller {}", self.name(*controller));
        }
        let _ = writeln!(s, "  blocks: {}", self.blocks.len());
        let mut wins: BTreeMap<PeerId, u64> = BTreeMap::new();
        for b in self.blocks.values() {
            *wins.entry(b.winner).or_default() += 1;
        }
        if wins.len() > MAX_PEER_LINES {
            let most = wins.iter().max_by_key(|(_, n)| **n).map(|(id, n)| (self.name(*id), n));
            if let Some((name, n)) = most {
                let _ = writeln!(s, "    won by {} peers; the most by {name}: {n}", wins.len());
            }
        } else {
            for (id, n) in &wins {
                let _ = writeln!(s, "    {}: {n} won", self.name(*id));
            }
        }
        let times: Vec<u64> = self.blocks.values().map(|b| b.solve_ms).collect();
        if !times.is_empty() {
            let mean = times.iter().sum::<u64>() as f64 / times.len() as f64;
            let (min, max) = (times.iter().min().copied().unwrap_or(0), times.iter().max().copied().unwrap_or(0));
            let _ = writeln!(s, "  solve time: min {min} ms, mean {mean:.0} ms, max {max} ms");
        }
        let _ = writeln!(s, "  late solutions (found after the block was decided): {}", self.late_solutions);
        if let Some(ms) = self.election_after_last_connect() {
            let _ = writeln!(s, "  election: {ms} ms after the last peer connected");
        }
        if !self.commit_ms.is_empty() {
            let mut ms = self.commit_ms.clone();
            ms.sort_unstable();
            let _ = writeln!(
                s,
                "  commit latency (block accepted -> committed, at the controller): p50 {} ms, p95 {} ms, {} blocks",
                percentile(&ms, 50.0).unwrap_or(0),
                percentile(&ms, 95.0).unwrap_or(0),
                ms.len()
            );
        }
        let difficulties: Vec<u8> = self.blocks.values().map(|b| b.difficulty).collect();
        let (lo, hi) = (difficulties.iter().min(), difficulties.iter().max());
        if let (Some(lo), Some(hi), Some(last)) = (lo, hi, difficulties.last()) {
            let _ = writeln!(s, "  difficulty: {lo}..={hi} bits, last {last}");
        }
        let _ = writeln!(s, "  hash rate (per peer, while mining):");
        let rates: Vec<(usize, f64)> = (self.peers.iter().enumerate())
            .filter(|(_, p)| p.mining_ms > 0)
            .map(|(i, p)| (i, p.hashes as f64 / p.mining_ms as f64 / 1000.0))
            .collect();
        // A large room gets the spread, not a line per peer.
        if rates.len() > MAX_PEER_LINES {
            let (lo, hi) = rates.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), (_, r)| (lo.min(*r), hi.max(*r)));
            let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / rates.len() as f64;
            let _ = writeln!(s, "    {} peers: min {lo:.2}, mean {mean:.2}, max {hi:.2} MH/s", rates.len());
        } else {
            for (i, mhs) in &rates {
                let _ = writeln!(s, "    peer #{i}: {mhs:.1} MH/s");
            }
        }
        // A fold from +0.0: an empty float sum is -0.0.
        let total = rates.iter().fold(0.0, |sum, (_, r)| sum + r);
        let _ = write!(s, "  room total: {total:.1} MH/s");
        s
    }
}
