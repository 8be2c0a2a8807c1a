//! The lab's protocol (`--wire lab`): a sans-IO state machine that speaks the original course
//! lab's JSON messages ([`wire`]), so hashvote peers can share a room with the course's Python
//! clients.
//!
//! Feed a [`LabNode`] inputs (a connection, a decoded message, a miner's [`work::LabFound`]) and it
//! returns [`LabAction`]s, like [`crate::room::RoomNode`]. It keeps the lab's rules (announce, vote once
//! everyone is known, the highest `(VoteID, ClientID)` controls, challenges with growing
//! transaction ids, first valid solution wins) and adds what the lab lacks and a mixed room does
//! not notice: validation of every message, a check of every result against the proof of work,
//! and an immediate re-announcement to newcomers instead of the lab's 10 s timer.
//! The lab has no failure detection: if the controller vanishes, the room waits for ever (this
//! peer keeps running and does not crash). See "Lab wire format" in `docs/PROTOCOL.md`.

pub mod wire;
pub mod work;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

use crate::events::Event;
use crate::protocol::DropReason;
use wire::{BallotOrder, ChallengeMsg, ElectionMsg, Id, InitMsg, LabMsg, ResultMsg, SolutionMsg};
use work::{LabFound, LabJob};

/// Clients known beyond the room size before Inits from new ids are dropped: a room that
/// grows a little (a restarted client under a new id) still works, made-up ids cannot grow the set
/// without bound.
pub const EXTRA_CLIENTS: usize = 64;
/// Rows of the transaction table kept; the oldest go first.
pub const MAX_ROWS: usize = 65_536;
/// An Init that answers a course client's waits a random time up to this (ms): see
/// `LabNode::answer`.
pub const ANSWER_SPREAD_MS: u64 = 500;

/// The settings of a lab node.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Our ClientID.
    pub me: Id,
    /// Clients (us included) that must be known before voting.
    pub room_size: usize,
    /// Difficulty of the challenges we issue as controller: uniform in `lo..=hi`.
    pub difficulty: (u8, u8),
    /// Seed of the vote and difficulty generator (`None`: from the OS).
    pub seed: Option<u64>,
}

/// Something that happened to a lab node.
#[derive(Debug, Clone)]
pub enum LabInput {
    /// (Re)connected to the broker and subscribed.
    Connected,
    /// A decoded, validated message.
    Message(LabMsg),
    /// The local miner found a solution.
    Mined(LabFound),
    /// The time asked for with [`LabAction::WakeAfter`] has passed.
    Wake,
}

/// Something a lab node asks its owner to do.
#[derive(Debug, Clone, PartialEq)]
pub enum LabAction {
    /// Publish this message on its topic.
    Publish(LabMsg),
    /// Give the node [`LabInput::Wake`] after this many ms (see `LabNode::answer`).
    WakeAfter(u64),
    /// Mine this job, replacing any other.
    Mine(LabJob),
    /// Stop mining.
    StopMining,
    /// Write this event (a [`Event::MessageDropped`] is counted per reason by the owner).
    Emit(Event),
}

/// One row of the lab's transaction table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Leading zero bits required.
    pub difficulty: u32,
    /// The winning solution, once solved.
    pub solution: Option<String>,
    /// The winner (the lab's `-1` is `None`).
    pub winner: Option<Id>,
}

/// One client's view of a lab room.
#[derive(Debug)]
pub struct LabNode {
    cfg: LabConfig,
    /// Clients known, us included.
    known: BTreeSet<Id>,
    /// Every vote message heard, in the broker's order, up to the room size: `(ClientID, VoteID)`.
    /// The election is decided over these, as the course's clients decide it (see `on_vote`).
    counted: Vec<(Id, Id)>,
    voted: bool,
    /// Our Init went out at least once.
    announced: bool,
    /// Clients whose Init says they are hashvote peers (and us): their challenges name them.
    peers: BTreeSet<Id>,
    /// A course client acts as controller (it cannot change its mind): we follow its
    /// challenges, whoever we decided on (see `on_challenge`).
    course_controls: bool,
    /// Course clients that may have missed our Init, and whether a wake to answer them is due
    /// (see `answer`).
    owed: BTreeSet<Id>,
    wake_due: bool,
    controller: Option<Id>,
    /// A challenge that arrived before this node decided the election (a controller that decides
    /// first challenges at once); taken up if the decision makes someone else controller.
    held: Option<ChallengeMsg>,
    table: BTreeMap<u64, Row>,
    /// The transaction being mined (miner) or open for solutions (controller).
    open: Option<u64>,
    rng: StdRng,
    out: Vec<LabAction>,
}

impl LabNode {
    /// A node that has heard from no one.
    pub fn new(cfg: LabConfig) -> Self {
        let rng = cfg.seed.map_or_else(StdRng::from_os_rng, StdRng::seed_from_u64);
        Self {
            known: BTreeSet::from([cfg.me.clone()]),
            counted: Vec::new(),
            voted: false,
            announced: false,
            peers: BTreeSet::from([cfg.me.clone()]),
            course_controls: false,
            owed: BTreeSet::new(),
            wake_due: false,
            cfg,
            controller: None,
            held: None,
            table: BTreeMap::new(),
            open: None,
            rng,
            out: Vec::new(),
        }
    }

    /// The elected controller, once decided.
    pub fn controller(&self) -> Option<&Id> {
        self.controller.as_ref()
    }

    /// The transaction table.
    pub fn table(&self) -> &BTreeMap<u64, Row> {
        &self.table
    }

    /// Clients known, us included.
    pub fn known(&self) -> &BTreeSet<Id> {
        &self.known
    }

    /// True if this node is the controller (and no course client acts as one instead).
    pub fn is_controller(&self) -> bool {
        self.controller.as_ref() == Some(&self.cfg.me) && !self.course_controls
    }

    /// Handles one input; returns what to do.
    pub fn handle(&mut self, input: LabInput) -> Vec<LabAction> {
        match input {
            LabInput::Connected => self.connected(),
            LabInput::Message(LabMsg::Init(m)) => self.on_init(m),
            LabInput::Message(LabMsg::Election(m)) => self.on_vote(m),
            LabInput::Message(LabMsg::Challenge(m)) => self.on_challenge(m),
            LabInput::Message(LabMsg::Solution(m)) => self.on_solution(m),
            LabInput::Message(LabMsg::Result(m)) => self.on_result(m),
            LabInput::Mined(found) => self.on_mined(found),
            LabInput::Wake => self.on_wake(),
        }
        std::mem::take(&mut self.out)
    }

    fn publish(&mut self, msg: LabMsg) {
        self.out.push(LabAction::Publish(msg));
    }

    fn emit(&mut self, event: Event) {
        self.out.push(LabAction::Emit(event));
    }

    fn drop_msg(&mut self, reason: DropReason, detail: String) {
        self.emit(Event::dropped(reason, detail));
    }

    /// Announces us: at the first connection, and after a reconnection while the room we know
    /// is short of its size (it may have missed us). Never our vote again: a course client
    /// counts every vote message, repeats included.
    fn connected(&mut self) {
        if !self.announced || (self.controller.is_none() && self.known.len() < self.cfg.room_size) {
            self.announce();
        }
    }

    fn announce(&mut self) {
        self.announced = true;
        self.publish(LabMsg::Init(InitMsg { client: self.cfg.me.clone(), hashvote: true }));
    }

    /// Our Init again, for a course client that may have missed it, after a random wait: every
    /// hashvote peer answers the same Init, and a course client that one answer of a burst
    /// completes would take the rest, still in flight when it unsubscribed, for late Inits and
    /// vote again for each. Spread out, they mostly come after its unsubscription; and one whose
    /// vote came meanwhile (its list was full: it knew us) is owed nothing. One Init answers
    /// every client owed one.
    fn answer(&mut self, client: Id) {
        self.owed.insert(client);
        if !self.wake_due {
            self.wake_due = true;
            let wait = self.rng.random_range(0..=ANSWER_SPREAD_MS);
            self.out.push(LabAction::WakeAfter(wait));
        }
    }

    fn on_wake(&mut self) {
        self.wake_due = false;
        if self.controller.is_none() && !self.owed.is_empty() {
            self.announce();
        }
        self.owed.clear();
    }

    /// Adds a client; false (and a drop) if the set is full.
    fn learn(&mut self, client: &Id) -> bool {
        if self.known.contains(client) {
            return true;
        }
        if self.known.len() >= self.cfg.room_size + EXTRA_CLIENTS {
            self.drop_msg(
                DropReason::LabTooManyClients,
                format!("{} clients known; not adding {client}", self.known.len()),
            );
            return false;
        }
        self.known.insert(client.clone());
        if let Some(id) = client.as_peer_id() {
            self.emit(Event::PeerJoined { id, members: self.known.len() });
        }
        info!(client = %client, known = self.known.len(), "lab client joined");
        true
    }

    fn on_init(&mut self, m: InitMsg) {
        if m.client == self.cfg.me || self.known.contains(&m.client) {
            return;
        }
        let before = self.known.len();
        if !self.learn(&m.client) {
            return;
        }
        if m.hashvote {
            self.peers.insert(m.client.clone());
        }
        // The newcomer subscribed before announcing itself, but missed everything said before:
        // a course client learns of us only from an Init, so we answer it at once (instead of
        // the lab's 10 s timer), once. Not a hashvote peer: it learns of us from our vote. And
        // not once the room we know is complete, nor after the election: every Init that a
        // course client receives once its list is full makes it vote again.
        if !m.hashvote && self.controller.is_none() && before < self.cfg.room_size {
            self.answer(m.client);
        }
        self.maybe_vote();
    }

    /// Counts a vote as the course's clients do: every vote message, in the order the broker
    /// delivers them (the same for every subscriber of the topic), ours when it comes back,
    /// repeats and changed ballots too; the election is decided over the first `room_size` of
    /// them. A course client votes again with a fresh ballot on every Init that reaches it once
    /// its list is full, and cannot be told otherwise: keeping each voter's first ballot
    /// instead, as this peer once did, decided over another set of ballots than it did.
    fn on_vote(&mut self, m: ElectionMsg) {
        if self.controller.is_some() {
            if m.client != self.cfg.me {
                self.drop_msg(DropReason::LabLateVote, format!("{} voted {} after the election", m.client, m.vote));
            }
            return;
        }
        // A vote shows its voter is in the room even if its Init was lost.
        if !self.learn(&m.client) {
            return;
        }
        match self.counted.iter().find(|(c, _)| *c == m.client).map(|(_, v)| v) {
            Some(v) if *v != m.vote => {
                info!(client = %m.client, vote = %m.vote, first = %v, "lab vote changed; counted")
            }
            Some(_) => info!(client = %m.client, vote = %m.vote, "lab vote repeated; counted"),
            None => {}
        }
        if m.hashvote {
            self.peers.insert(m.client.clone());
        }
        // Its list is full: it knew us (or its room is larger than ours).
        self.owed.remove(&m.client);
        self.counted.push((m.client, m.vote));
        self.maybe_vote();
        self.maybe_decide();
    }

    /// Votes once every expected client is known: a random u32, or a UUID-like string if the
    /// room uses string ids or votes (so the room keeps comparing like with like).
    fn maybe_vote(&mut self) {
        if self.voted || self.controller.is_some() || self.known.len() < self.cfg.room_size {
            return;
        }
        let strings = self.known.iter().chain(self.counted.iter().map(|(_, v)| v)).any(|id| !id.is_int());
        let vote = if strings {
            let b: [u8; 16] = self.rng.random();
            let h = hex::encode(b);
            Id::Str(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
        } else {
            let v: u32 = self.rng.random();
            self.emit(Event::VoteCast { term: 1, vote: v });
            Id::Int(i64::from(v))
        };
        info!(vote = %vote, known = self.known.len(), "lab vote");
        self.voted = true;
        // Counted when it comes back from the broker, in its place among the others.
        self.publish(LabMsg::Election(ElectionMsg { client: self.cfg.me.clone(), vote, hashvote: true }));
    }

    /// Decides at the `room_size`-th vote message: the highest `(VoteID, ClientID)` among them in
    /// the room's [`BallotOrder`].
    fn maybe_decide(&mut self) {
        if self.controller.is_some() || self.counted.len() < self.cfg.room_size {
            return;
        }
        let ballots = &self.counted[..self.cfg.room_size];
        let order = BallotOrder::of(ballots.iter().map(|(c, v)| (v, c)));
        let Some((winner, _)) = ballots.iter().max_by(|a, b| order.cmp((&a.1, &a.0), (&b.1, &b.0))) else {
            return;
        };
        let winner = winner.clone();
        let votes = ballots.len();
        info!(controller = %winner, votes, ?order, "lab controller elected");
        self.emit(Event::LabElected { controller: winner.to_string(), votes });
        if let Some(controller) = winner.as_peer_id() {
            self.emit(Event::ControllerElected { term: 1, controller, votes });
        }
        self.controller = Some(winner);
        // A challenge heard before the decision: the controller's (we then mine it), or a
        // course client's that acts as controller (we then give way, before we issue anything).
        if let Some(held) = self.held.take() {
            self.on_challenge(held);
        }
        if self.is_controller() {
            self.issue();
        }
    }

    /// As controller, opens the next transaction.
    fn issue(&mut self) {
        let tx = self.table.keys().next_back().map_or(0, |t| t + 1);
        let (lo, hi) = self.cfg.difficulty;
        let difficulty = self.rng.random_range(lo..=hi);
        self.insert_row(tx, u32::from(difficulty));
        self.open = Some(tx);
        self.emit(Event::ChallengeIssued { term: 1, tx, difficulty });
        let issuer = Some(self.cfg.me.clone());
        self.publish(LabMsg::Challenge(ChallengeMsg { tx, difficulty: u32::from(difficulty), issuer }));
    }

    fn insert_row(&mut self, tx: u64, difficulty: u32) {
        self.table.insert(tx, Row { difficulty, solution: None, winner: None });
        while self.table.len() > MAX_ROWS {
            self.table.pop_first();
        }
        info!(tx, challenge = difficulty, solution = "", winner = -1, "lab table row");
    }

    fn on_challenge(&mut self, m: ChallengeMsg) {
        let Some(controller) = self.controller.clone() else {
            // Kept (the latest only) until this node has decided the election.
            self.held = Some(m);
            return;
        };
        // A hashvote peer's challenge names it; a course client's names no one.
        match &m.issuer {
            Some(i) if *i == controller && !self.course_controls => {}
            // Ours, back from the broker after we gave way.
            Some(i) if *i == self.cfg.me => return,
            Some(i) => {
                let detail = format!("tx {} issued by {i}, not by the controller {controller}", m.tx);
                return self.drop_msg(DropReason::LabNotFromController, detail);
            }
            None if self.peers.contains(&controller) && !self.course_controls => {
                // A course client acts as controller while we decided on a hashvote peer (it
                // missed vote messages, or we did): it cannot change its mind, we can.
                self.yield_to_course(m.tx);
            }
            None => {}
        }
        let existing = self.table.get(&m.tx).map(|r| r.difficulty);
        if self.is_controller() {
            // Our own, back from the broker.
            return;
        }
        match existing {
            Some(d) if d == m.difficulty => return,
            Some(d) => {
                let detail = format!(
                    "tx {} re-issued with {} bits instead of {d} (controller {controller})",
                    m.tx, m.difficulty
                );
                return self.drop_msg(DropReason::LabConflictingChallenge, detail);
            }
            None => {}
        }
        self.insert_row(m.tx, m.difficulty);
        self.open = Some(m.tx);
        let difficulty = u8::try_from(m.difficulty).unwrap_or(u8::MAX);
        self.emit(Event::MiningStarted { term: 1, tx: m.tx, difficulty });
        self.out.push(LabAction::Mine(LabJob { tx: m.tx, difficulty: m.difficulty }));
    }

    /// Follows a course client that acts as controller: what we issued or mined under another
    /// controller is void (its transaction ids are its own).
    fn yield_to_course(&mut self, tx: u64) {
        let was = self.controller.as_ref().map_or_else(String::new, Id::to_string);
        info!(tx, was = %was, "a course client acts as controller; following it");
        self.emit(Event::LabYielded { tx, was });
        self.course_controls = true;
        self.table.clear();
        if self.open.take().is_some() {
            self.out.push(LabAction::StopMining);
        }
    }

    fn on_solution(&mut self, m: SolutionMsg) {
        // Miners see each other's solutions; only the controller judges them.
        if !self.is_controller() || m.client == self.cfg.me {
            return;
        }
        let verdict = match self.table.get(&m.tx) {
            None => Err("unknown transaction"),
            Some(row) if row.winner.is_some() => Err("already solved"),
            Some(_) if self.open != Some(m.tx) => Err("not the open transaction"),
            Some(row) if !wire::meets(&m.solution, row.difficulty) => Err("not enough leading zero bits"),
            Some(_) => Ok(()),
        };
        let result = u8::from(verdict.is_ok());
        self.publish(LabMsg::Result(ResultMsg {
            client: m.client.clone(),
            tx: m.tx,
            solution: m.solution.clone(),
            result,
        }));
        match verdict {
            Ok(()) => {
                self.record(m.tx, &m.client, &m.solution, 1);
                self.issue();
            }
            Err(reason) => {
                let miner = m.client.as_peer_id().unwrap_or(0);
                self.emit(Event::SolutionRejected { tx: m.tx, miner, reason: format!("{reason} (from {})", m.client) });
            }
        }
    }

    /// Records a verified winner and reports it.
    fn record(&mut self, tx: u64, winner: &Id, solution: &str, result: u8) {
        let Some(row) = self.table.get_mut(&tx) else { return };
        row.winner = Some(winner.clone());
        row.solution = Some(solution.to_string());
        let difficulty = row.difficulty;
        info!(tx, challenge = difficulty, solution, winner = %winner, "lab table row");
        self.emit(Event::LabResult { tx, winner: winner.to_string(), solution: solution.into(), result, difficulty });
    }

    fn on_result(&mut self, m: ResultMsg) {
        if self.controller.is_none() {
            return self.drop_msg(DropReason::LabNoController, format!("result for tx {} before the election", m.tx));
        }
        let Some(row) = self.table.get(&m.tx) else {
            return self.drop_msg(DropReason::LabUnknownTx, format!("result for tx {} we saw no challenge for", m.tx));
        };
        if m.result == 0 {
            // A rejection concerns only its miner; the table does not change.
            if m.client == self.cfg.me {
                info!(tx = m.tx, "our lab solution was rejected");
            }
            return;
        }
        if let Some(winner) = &row.winner {
            if *winner != m.client || row.solution.as_deref() != Some(&m.solution) {
                let detail = format!("tx {} already won by {winner}; {} claims it", m.tx, m.client);
                self.drop_msg(DropReason::LabConflictingResult, detail);
            }
            return;
        }
        if self.is_controller() {
            // We decide our transactions; a winner we did not declare is forged.
            let detail = format!("tx {} won by {} was not declared by us, the controller", m.tx, m.client);
            return self.drop_msg(DropReason::LabNotFromController, detail);
        }
        if !wire::meets(&m.solution, row.difficulty) {
            let detail = format!("tx {}: {:?} has fewer than {} zero bits", m.tx, m.solution, row.difficulty);
            return self.drop_msg(DropReason::LabUnverifiedResult, detail);
        }
        self.record(m.tx, &m.client, &m.solution, 1);
        if self.open == Some(m.tx) {
            self.open = None;
            self.out.push(LabAction::StopMining);
        }
    }

    fn on_mined(&mut self, found: LabFound) {
        let unsolved = self.table.get(&found.tx).is_some_and(|r| r.winner.is_none());
        if self.is_controller() || self.open != Some(found.tx) || !unsolved {
            return;
        }
        self.emit(Event::SolutionFound {
            tx: found.tx,
            nonce: found.counter,
            hashes: found.hashes,
            elapsed_ms: found.elapsed_ms,
        });
        // The miner already stopped its threads; this ends the job's clock.
        self.out.push(LabAction::StopMining);
        self.publish(LabMsg::Solution(SolutionMsg {
            client: self.cfg.me.clone(),
            tx: found.tx,
            solution: found.solution,
        }));
    }
}
