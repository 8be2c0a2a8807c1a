//! The room as an MQTT subscriber to `<prefix>/#` sees it: peers, the open challenge, recent
//! results, elections and failovers, and the chain, built only from decoded messages and statuses.
//!
//! [`RoomView`] is sans-IO: the observer's loop feeds it what it receives ([`RoomView::observe`])
//! and the passing of time ([`RoomView::tick`]), both stamped with the observer's own clock, and
//! gets back the [`Happening`]s worth a line. Every collection it keeps is bounded, so a hostile
//! client publishing made-up ids, terms or transactions cannot make it grow without end.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use hashvote_core::room::{Envelope, Msg};
use peer::protocol::{Block, Challenge, Outcome, PeerId, RejectReason, Term, TxId};
use peer::status::{Role, Status, Waiting};

pub(crate) mod traffic;
use traffic::{Mark, Traffic};

/// Most peers kept; past it the peer heard from least recently (offline ones first) is forgotten.
pub const MAX_PEERS: usize = 1024;
/// Most results kept in [`RoomView::results`].
pub const MAX_RESULTS: usize = 64;
/// Most elections kept in [`RoomView::elections`] (the lowest terms go first).
pub const MAX_ELECTIONS: usize = 256;
/// Most blocks kept in the chain (the lowest transactions go first).
pub const MAX_BLOCKS: usize = 65_536;
/// Most hash-rate samples kept per peer (ten minutes of one status a second).
pub const MAX_SAMPLES: usize = 600;
/// A peer not heard from for this long is shown silent.
pub const SILENT_MS: u64 = 5_000;
/// Most terms whose controller is remembered.
const MAX_CONTROLLERS: usize = 1024;

/// One thing the observer received, already decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A room protocol message from one of the room's topics.
    Message(Envelope),
    /// A peer's status from `<prefix>/status/<id>`.
    Status(Status),
}

/// Whether a peer is there, as far as the observer can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Presence {
    /// Heard from within [`SILENT_MS`].
    Online,
    /// Not heard from for [`SILENT_MS`], but it never said it left.
    Silent,
    /// Left, or its status (or Last Will) says offline.
    Offline,
}

impl Presence {
    /// A short lowercase name for tables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Silent => "silent",
            Self::Offline => "offline",
        }
    }
}

/// What the observer knows of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// The peer's client id.
    pub id: PeerId,
    /// Its latest status, if it published one.
    pub status: Option<Status>,
    /// Observer's clock when it was first heard of.
    pub first_seen_ms: u64,
    /// Observer's clock when it was last heard from (any message or status).
    pub last_heard_ms: u64,
    /// It left, or its latest status says offline; cleared by anything it sends later.
    pub offline: bool,
    /// The term it last spoke of (status, hello or vote).
    pub term: Option<Term>,
    /// The chain height it last spoke of (status, hello or vote).
    pub height: Option<u64>,
    /// `(observer ms, hashes per second)` from its statuses, oldest first, at most [`MAX_SAMPLES`].
    pub samples: VecDeque<(u64, u64)>,
    /// Its role in its latest status that did not say offline.
    last_role: Option<Role>,
    silent_told: bool,
}

impl PeerView {
    fn new(id: PeerId, now_ms: u64) -> Self {
        Self {
            id,
            status: None,
            first_seen_ms: now_ms,
            last_heard_ms: now_ms,
            offline: false,
            term: None,
            height: None,
            samples: VecDeque::new(),
            last_role: None,
            silent_told: false,
        }
    }

    /// Whether the peer is online, silent or offline at `now_ms`.
    pub fn presence(&self, now_ms: u64) -> Presence {
        if self.offline {
            Presence::Offline
        } else if now_ms.saturating_sub(self.last_heard_ms) > SILENT_MS {
            Presence::Silent
        } else {
            Presence::Online
        }
    }

    /// Its role: from its latest status, or offline if it left; `None` if it never published one.
    pub fn role(&self) -> Option<Role> {
        if self.offline {
            return Some(Role::Offline);
        }
        self.status.as_ref().map(|s| s.role)
    }

    /// How far it is from a quorum, if its latest status says it waits for one.
    pub fn waiting(&self) -> Option<Waiting> {
        if self.offline {
            return None;
        }
        self.status.as_ref().and_then(|s| s.waiting)
    }

    /// Its hash rate (H/s) from its latest status.
    pub fn hash_rate(&self) -> Option<u64> {
        self.status.as_ref().map(|s| s.hash_rate)
    }

    /// Its mean hash rate (H/s) while it mined, from its latest status: the hashes it computed
    /// over the time it spent mining; `None` if it never mined.
    pub fn mean_mining_rate(&self) -> Option<u64> {
        let s = self.status.as_ref().filter(|s| s.mining_ms > 0)?;
        Some(u64::try_from(u128::from(s.hashes) * 1000 / u128::from(s.mining_ms)).unwrap_or(u64::MAX))
    }

    /// Its role in its latest status that did not say offline (what it was while in the room).
    pub fn last_role(&self) -> Option<Role> {
        self.last_role
    }
}

/// The challenge the room is mining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenChallenge {
    /// The challenge as last issued.
    pub challenge: Challenge,
    /// The controller that issued it.
    pub from: PeerId,
    /// Observer's clock when this transaction was first seen challenged.
    pub seen_ms: u64,
}

impl OpenChallenge {
    /// How long it has been open at `now_ms`, by the observer's clock.
    pub fn elapsed_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.seen_ms)
    }
}

/// A result published by a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultEntry {
    /// Observer's clock when it arrived.
    pub seen_ms: u64,
    /// The controller's term.
    pub term: Term,
    /// The verdict.
    pub outcome: Outcome,
}

/// How long a block took to mine, by its controller's clock: `solved_ms - issued_ms`.
pub fn solve_ms(block: &Block) -> u64 {
    block.solved_ms.saturating_sub(block.issued_ms)
}

/// The loss of a controller, and how long the room took to get challenges again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    /// The controller that went offline or left.
    pub previous: PeerId,
    /// Its term.
    pub previous_term: Term,
    /// Observer's clock when it went.
    pub offline_ms: u64,
    /// Observer's clock at the first challenge of a later term.
    pub done_ms: Option<u64>,
}

/// One election, by its term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Election {
    /// The term elected.
    pub term: Term,
    /// Observer's clock at its first vote, or when the previous controller went if that came
    /// first; `None` if it was over before the observer saw it begin.
    pub started_ms: Option<u64>,
    /// Observer's clock at its first challenge or first status naming its controller.
    pub ended_ms: Option<u64>,
    /// The controller elected.
    pub winner: Option<PeerId>,
    /// Set if the election followed the loss of the previous controller.
    pub failover: Option<Failover>,
}

impl Election {
    /// From start to end, if both were seen.
    pub fn duration_ms(&self) -> Option<u64> {
        Some(self.ended_ms?.saturating_sub(self.started_ms?))
    }

    /// From the previous controller's loss to this term's first challenge, if this was a failover.
    pub fn failover_ms(&self) -> Option<u64> {
        let f = self.failover?;
        Some(f.done_ms?.saturating_sub(f.offline_ms))
    }
}

/// A notable change, worth one line in plain mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happening {
    /// A peer was heard of for the first time.
    Joined {
        /// The peer.
        id: PeerId,
        /// Peers known and not offline, this one included.
        known: usize,
    },
    /// A peer that was offline or silent is heard from again.
    Back {
        /// The peer.
        id: PeerId,
    },
    /// A peer's status comes from a new process (another incarnation).
    Restarted {
        /// The peer.
        id: PeerId,
    },
    /// A peer said it leaves.
    Left {
        /// The peer.
        id: PeerId,
    },
    /// A peer's status (or Last Will) says it is offline.
    Offline {
        /// The peer.
        id: PeerId,
    },
    /// A peer has not been heard from for [`SILENT_MS`].
    Silent {
        /// The peer.
        id: PeerId,
        /// How long since it was last heard.
        for_ms: u64,
    },
    /// The first vote of a new term.
    ElectionStarted {
        /// The term.
        term: Term,
    },
    /// A term's controller is known.
    Elected {
        /// The term.
        term: Term,
        /// Its controller.
        controller: PeerId,
        /// How long the election took, if its start was seen.
        election_ms: Option<u64>,
    },
    /// The controller went offline or left.
    ControllerLost {
        /// The controller.
        id: PeerId,
        /// Its term.
        term: Term,
    },
    /// The first challenge of a later term after a controller was lost.
    FailoverDone {
        /// The new term.
        term: Term,
        /// From the loss to that challenge.
        failover_ms: u64,
    },
    /// A peer says it has no controller and cannot reach a quorum of the room's voters.
    Waiting {
        /// The peer.
        id: PeerId,
        /// How far it is from a quorum.
        waiting: Waiting,
    },
    /// A new challenge (or one reissued by a new controller).
    Challenge {
        /// The transaction.
        tx: TxId,
        /// Leading zero bits asked.
        difficulty: u8,
        /// The controller's term.
        term: Term,
    },
    /// A block was accepted.
    Block {
        /// The transaction.
        tx: TxId,
        /// The miner.
        winner: PeerId,
        /// Solve time by the controller's clock.
        solve_ms: u64,
        /// Its difficulty.
        difficulty: u8,
    },
    /// A transaction already decided was decided again with another block.
    Replaced {
        /// The transaction.
        tx: TxId,
        /// The new block's miner.
        winner: PeerId,
        /// The replaced block's miner.
        previous: PeerId,
    },
    /// A solution was rejected.
    Rejected {
        /// The transaction.
        tx: TxId,
        /// The miner.
        miner: PeerId,
        /// Why.
        reason: RejectReason,
    },
}

impl fmt::Display for Happening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Joined { id, known } => write!(f, "peer {id} joined ({known} known)"),
            Self::Back { id } => write!(f, "peer {id} is back"),
            Self::Restarted { id } => write!(f, "peer {id} restarted"),
            Self::Left { id } => write!(f, "peer {id} left"),
            Self::Offline { id } => write!(f, "peer {id} offline"),
            Self::Silent { id, for_ms } => write!(f, "peer {id} silent for {:.1} s", for_ms as f64 / 1000.0),
            Self::Waiting { id, waiting } => write!(f, "peer {id}: {waiting}"),
            Self::ElectionStarted { term } => write!(f, "election for term {term} started"),
            Self::Elected { term, controller, election_ms: Some(ms) } => {
                write!(f, "term {term}: controller {controller} elected in {ms} ms")
            }
            Self::Elected { term, controller, election_ms: None } => write!(f, "term {term}: controller {controller}"),
            Self::ControllerLost { id, term } => write!(f, "controller {id} (term {term}) offline: failover"),
            Self::FailoverDone { term, failover_ms } => {
                write!(f, "term {term}: failover done in {failover_ms} ms (controller lost to first challenge)")
            }
            Self::Challenge { tx, difficulty, term } => {
                write!(f, "challenge tx {tx} at difficulty {difficulty} (term {term})")
            }
            Self::Block { tx, winner, solve_ms, difficulty } => {
                write!(f, "block {tx} won by {winner} in {solve_ms} ms (difficulty {difficulty})")
            }
            Self::Replaced { tx, winner, previous } => {
                write!(f, "block {tx} replaced: now won by {winner} (was {previous})")
            }
            Self::Rejected { tx, miner, reason } => {
                write!(f, "tx {tx}: solution from {miner} rejected ({})", reason.as_str())
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Lost {
    id: PeerId,
    term: Term,
    at_ms: u64,
}

/// The whole room, as seen by one subscriber. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct RoomView {
    now_ms: u64,
    peers: BTreeMap<PeerId, PeerView>,
    controllers: BTreeMap<Term, PeerId>,
    open: Option<OpenChallenge>,
    results: VecDeque<ResultEntry>,
    elections: BTreeMap<Term, Election>,
    lost: Option<Lost>,
    chain: BTreeMap<TxId, Block>,
    wins: BTreeMap<PeerId, u64>,
    replaced: u64,
    ignored: u64,
    /// The peers in the room when its run ended, if the run was marked ended (see
    /// [`RoomView::end_run`]).
    at_end: Option<BTreeSet<PeerId>>,
    /// Each peer's counts in its first status of the steady state (see [`traffic`]).
    traffic_from: BTreeMap<PeerId, Mark>,
    /// Each peer's counts, and role, in its latest status when the run was marked ended.
    traffic_to: Option<BTreeMap<PeerId, (Mark, Role)>>,
}

impl RoomView {
    /// An empty room.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the end of the run at `now_ms`, before its peers are stopped: the peers not offline
    /// then were in the room at the end, whatever their last statuses say afterwards.
    pub fn end_run(&mut self, now_ms: u64) {
        let present = self.peers.values().filter(|p| p.presence(now_ms) != Presence::Offline).map(|p| p.id);
        self.at_end = Some(present.collect());
        self.traffic_to = Some(self.traffic_marks());
    }

    /// The room's steady-state traffic: from each peer's first status at a height of
    /// [`traffic::STEADY_FROM`] to its latest when the run was marked ended (or now); `None`
    /// until some peer has statuses at both ends.
    pub fn traffic(&self) -> Option<Traffic> {
        match &self.traffic_to {
            Some(to) => Traffic::between(&self.traffic_from, to),
            None => Traffic::between(&self.traffic_from, &self.traffic_marks()),
        }
    }

    fn traffic_marks(&self) -> BTreeMap<PeerId, (Mark, Role)> {
        let last = |p: &PeerView| Some((Mark::of(p.status.as_ref()?), p.last_role?));
        self.peers.values().filter_map(|p| Some((p.id, last(p)?))).collect()
    }

    /// Whether peer `id` was in the room at the end of the run (or, with no end marked, is now).
    pub fn in_room_at_end(&self, id: PeerId) -> bool {
        match &self.at_end {
            Some(present) => present.contains(&id),
            None => self.peers.get(&id).is_some_and(|p| p.presence(self.now_ms) != Presence::Offline),
        }
    }

    /// Takes one thing received at `now_ms` (observer's clock); returns what it changed that is
    /// worth telling.
    pub fn observe(&mut self, now_ms: u64, seen: Observed) -> Vec<Happening> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        match seen {
            Observed::Status(s) => self.status(now_ms, s, &mut out),
            Observed::Message(env) => self.message(now_ms, env, &mut out),
        }
        out
    }

    /// Lets time pass: tells of peers that fell silent.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Happening> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        for p in self.peers.values_mut() {
            if !p.silent_told && p.presence(now_ms) == Presence::Silent {
                p.silent_told = true;
                out.push(Happening::Silent { id: p.id, for_ms: now_ms.saturating_sub(p.last_heard_ms) });
            }
        }
        out
    }

    /// The latest observer time given to [`observe`](Self::observe) or [`tick`](Self::tick).
    #[cfg(test)]
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Every known peer, by id.
    pub fn peers(&self) -> impl DoubleEndedIterator<Item = &PeerView> + ExactSizeIterator {
        self.peers.values()
    }

    /// One peer.
    #[cfg(test)]
    pub fn peer(&self, id: PeerId) -> Option<&PeerView> {
        self.peers.get(&id)
    }

    /// How many known peers are online (not silent, not offline) at `now_ms`.
    pub fn online(&self, now_ms: u64) -> usize {
        self.peers.values().filter(|p| p.presence(now_ms) == Presence::Online).count()
    }

    /// The controller of the highest term whose controller is known.
    pub fn controller(&self) -> Option<(Term, PeerId)> {
        self.controllers.last_key_value().map(|(&t, &id)| (t, id))
    }

    /// The controller of `term`, if known.
    pub fn controller_of(&self, term: Term) -> Option<PeerId> {
        self.controllers.get(&term).copied()
    }

    /// The highest term seen in an election or with a controller (0 if none).
    pub fn term(&self) -> Term {
        let elected = self.controllers.last_key_value().map_or(0, |(&t, _)| t);
        let voted = self.elections.last_key_value().map_or(0, |(&t, _)| t);
        elected.max(voted)
    }

    /// The term being elected, if the highest term seen has no controller yet.
    pub fn electing(&self) -> Option<Term> {
        let (&term, e) = self.elections.last_key_value()?;
        (e.ended_ms.is_none() && self.controller().is_none_or(|(t, _)| t < term)).then_some(term)
    }

    /// The open challenge, if any.
    pub fn open_challenge(&self) -> Option<&OpenChallenge> {
        self.open.as_ref()
    }

    /// The latest results, oldest first (at most [`MAX_RESULTS`]).
    pub fn results(&self) -> impl DoubleEndedIterator<Item = &ResultEntry> + ExactSizeIterator {
        self.results.iter()
    }

    /// Elections by term (at most [`MAX_ELECTIONS`]).
    pub fn elections(&self) -> impl DoubleEndedIterator<Item = &Election> + ExactSizeIterator {
        self.elections.values()
    }

    /// The election of `term`, if seen.
    #[cfg(test)]
    pub fn election(&self, term: Term) -> Option<&Election> {
        self.elections.get(&term)
    }

    /// Accepted blocks by transaction (at most [`MAX_BLOCKS`], the latest ones).
    pub fn chain(&self) -> impl DoubleEndedIterator<Item = &Block> + ExactSizeIterator {
        self.chain.values()
    }

    /// The block of the highest transaction.
    pub fn tip(&self) -> Option<&Block> {
        self.chain.last_key_value().map(|(_, b)| b)
    }

    /// The chain's height: one past the tip's transaction (0 if no block was seen).
    pub fn height(&self) -> u64 {
        self.tip().map_or(0, |b| b.tx.saturating_add(1))
    }

    /// Blocks of the chain mined by `id`.
    pub fn blocks_won(&self, id: PeerId) -> u64 {
        self.wins.get(&id).copied().unwrap_or(0)
    }

    /// How many times a decided transaction was decided again with another block.
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// Challenges and results ignored because their sender is not the controller of their term.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    fn not_offline(&self) -> usize {
        self.peers.values().filter(|p| !p.offline).count()
    }

    /// Notes that `id` was heard from (`alive`) or said it is gone (`!alive`), telling of joins,
    /// returns and departures. Returns whether it was online before (false if new or offline).
    fn heard(&mut self, now_ms: u64, id: PeerId, alive: bool, out: &mut Vec<Happening>) -> bool {
        let was_online = match self.peers.get_mut(&id) {
            Some(p) => {
                let was_online = !p.offline;
                if alive && (p.offline || p.silent_told) {
                    out.push(Happening::Back { id });
                }
                p.last_heard_ms = now_ms;
                p.silent_told = false;
                p.offline = !alive;
                was_online
            }
            None => {
                if self.peers.len() >= MAX_PEERS {
                    // Made-up ids must not push real peers out for long: real ones publish a
                    // status every second and come back, so forget the least recently heard.
                    let victim = self.peers.values().min_by_key(|p| (!p.offline, p.last_heard_ms)).map(|p| p.id);
                    if let Some(victim) = victim {
                        self.peers.remove(&victim);
                    }
                }
                let mut p = PeerView::new(id, now_ms);
                p.offline = !alive;
                self.peers.insert(id, p);
                if alive {
                    out.push(Happening::Joined { id, known: self.not_offline() });
                }
                false
            }
        };
        if !alive && was_online {
            // Told once, by whoever calls with the reason (a Leave or an offline status).
            if let Some((term, controller)) = self.controller()
                && controller == id
                && self.lost.is_none_or(|l| l.term < term)
            {
                self.lost = Some(Lost { id, term, at_ms: now_ms });
                out.push(Happening::ControllerLost { id, term });
            }
        }
        was_online
    }

    fn peer_mut(&mut self, id: PeerId) -> Option<&mut PeerView> {
        self.peers.get_mut(&id)
    }

    fn status(&mut self, now_ms: u64, s: Status, out: &mut Vec<Happening>) {
        let alive = s.role != Role::Offline;
        let id = s.id;
        let previous = self.peers.get(&id).and_then(|p| p.status.clone());
        let before = previous.as_ref().map(|st| st.incarnation);
        // A Last Will is fixed when the peer connects, so its figures are zeros: keep the last
        // figures this incarnation published and only mark it offline. A clean exit's offline
        // status has the final counts: the larger of each count.
        let s = match previous {
            Some(last) if !alive && last.incarnation == s.incarnation => Status {
                role: Role::Offline,
                hash_rate: 0,
                at_ms: s.at_ms.max(last.at_ms),
                hashes: s.hashes.max(last.hashes),
                mining_ms: s.mining_ms.max(last.mining_ms),
                blocks_won: s.blocks_won.max(last.blocks_won),
                published: s.published.max(last.published),
                delivered: s.delivered.max(last.delivered),
                ..last
            },
            _ => s,
        };
        if Mark::steady(&s) {
            let mark = Mark::of(&s);
            let from = self.traffic_from.entry(id).or_insert(mark);
            if from.superseded_by(&s) {
                *from = mark;
            }
        }
        let mut said = Vec::new();
        let was_online = self.heard(now_ms, id, alive, &mut said);
        if !alive && was_online {
            out.push(Happening::Offline { id });
        }
        out.append(&mut said);
        if alive && before.is_some_and(|inc| inc != s.incarnation) {
            out.push(Happening::Restarted { id });
        }
        let (term, controller, role) = (s.term, s.controller, s.role);
        // Told when it starts waiting, or when how far it is changes.
        let was_waiting = self.peers.get(&id).and_then(PeerView::waiting);
        if let Some(waiting) = s.waiting.filter(|&w| alive && was_waiting != Some(w)) {
            out.push(Happening::Waiting { id, waiting });
        }
        if let Some(p) = self.peer_mut(id) {
            p.term = Some(s.term);
            p.height = Some(s.height);
            if alive {
                if p.samples.len() >= MAX_SAMPLES {
                    p.samples.pop_front();
                }
                p.samples.push_back((now_ms, s.hash_rate));
            }
            if s.role != Role::Offline {
                p.last_role = Some(s.role);
            }
            p.status = Some(s);
        }
        if alive {
            let claimed = if role == Role::Controller { Some(id) } else { controller };
            if let Some(controller) = claimed {
                self.controller_known(now_ms, term, controller, out);
            }
        }
    }

    /// The story the room's messages tell: a ballot opens the term's election, a heartbeat or
    /// challenge names its controller.
    fn message(&mut self, now_ms: u64, env: Envelope, out: &mut Vec<Happening>) {
        let from = env.from;
        match env.msg {
            Msg::Leave { .. } => {
                let mut said = Vec::new();
                if self.heard(now_ms, from, false, &mut said) {
                    out.push(Happening::Left { id: from });
                }
                out.append(&mut said);
            }
            Msg::Hello { term, controller, height, .. } => {
                self.heard(now_ms, from, true, out);
                if let Some(p) = self.peer_mut(from) {
                    p.term = Some(term);
                    p.height = Some(height);
                }
                if let Some(c) = controller {
                    self.controller_known(now_ms, term, c, out);
                }
            }
            Msg::Ballot { term, pos, .. } => {
                self.heard(now_ms, from, true, out);
                if let Some(p) = self.peer_mut(from) {
                    p.term = Some(term);
                    p.height = Some(pos.height);
                }
                self.vote(now_ms, term, out);
            }
            Msg::Heartbeat { term, height, .. } => {
                self.heard(now_ms, from, true, out);
                if let Some(p) = self.peer_mut(from) {
                    p.term = Some(term);
                    p.height = Some(height);
                }
                if !self.controller_known(now_ms, term, from, out) {
                    self.ignored += 1;
                }
            }
            Msg::Challenge { challenge, .. } => {
                self.heard(now_ms, from, true, out);
                self.challenge(now_ms, from, challenge, out);
            }
            Msg::Result { term, outcome, .. } => {
                self.heard(now_ms, from, true, out);
                if self.controller_of(term) != Some(from) {
                    self.ignored += 1;
                    return;
                }
                self.result(now_ms, term, outcome, out);
            }
            Msg::SyncReply { term, blocks, .. } => {
                self.heard(now_ms, from, true, out);
                self.synced(term, from, blocks);
            }
            Msg::PreBallot { .. }
            | Msg::Grant { .. }
            | Msg::Ack { .. }
            | Msg::Solution { .. }
            | Msg::SyncRequest { .. } => {
                self.heard(now_ms, from, true, out);
            }
        }
    }

    /// Fills gaps for a late observer from a controller's sync reply; what results said is not
    /// overridden.
    fn synced(&mut self, term: Term, from: PeerId, blocks: Vec<Block>) {
        if self.controller_of(term) == Some(from) {
            for b in blocks {
                if !self.chain.contains_key(&b.tx) {
                    self.insert_block(b);
                }
            }
        }
    }

    fn vote(&mut self, now_ms: u64, term: Term, out: &mut Vec<Happening>) {
        if self.controller().is_some_and(|(t, _)| t >= term) || self.elections.contains_key(&term) {
            return;
        }
        self.open_election(now_ms, term, Some(now_ms));
        out.push(Happening::ElectionStarted { term });
    }

    /// Opens the election of `term`: a failover if the controller of an earlier term was lost,
    /// started then; otherwise started at `started_ms`, if known.
    fn open_election(&mut self, now_ms: u64, term: Term, started_ms: Option<u64>) {
        let lost = self.lost.filter(|l| l.term < term);
        self.insert_election(Election {
            term,
            started_ms: lost.map(|l| l.at_ms.min(now_ms)).or(started_ms),
            ended_ms: None,
            winner: None,
            failover: lost.map(|l| Failover {
                previous: l.id,
                previous_term: l.term,
                offline_ms: l.at_ms,
                done_ms: None,
            }),
        });
    }

    fn insert_election(&mut self, e: Election) {
        self.elections.insert(e.term, e);
        while self.elections.len() > MAX_ELECTIONS {
            self.elections.pop_first();
        }
    }

    /// Evidence that `controller` controls `term`: the first one for a term is believed, later
    /// contradicting ones are not. Returns false if it contradicts what is known.
    fn controller_known(&mut self, now_ms: u64, term: Term, controller: PeerId, out: &mut Vec<Happening>) -> bool {
        match self.controllers.get(&term) {
            Some(&known) => return known == controller,
            None => {
                self.controllers.insert(term, controller);
                while self.controllers.len() > MAX_CONTROLLERS {
                    self.controllers.pop_first();
                }
            }
        }
        let newest = self.controller().is_some_and(|(t, _)| t == term);
        if !newest && !self.elections.contains_key(&term) {
            // A peer lagging behind speaks of an old term: nothing was elected just now.
            return true;
        }
        if !self.elections.contains_key(&term) {
            self.open_election(now_ms, term, None);
        }
        if let Some(e) = self.elections.get_mut(&term)
            && e.ended_ms.is_none()
        {
            e.ended_ms = Some(now_ms);
            e.winner = Some(controller);
            out.push(Happening::Elected { term, controller, election_ms: e.duration_ms() });
        }
        true
    }

    fn challenge(&mut self, now_ms: u64, from: PeerId, c: Challenge, out: &mut Vec<Happening>) {
        if !self.controller_known(now_ms, c.term, from, out) {
            self.ignored += 1;
            return;
        }
        if let Some(lost) = self.lost
            && c.term > lost.term
        {
            self.lost = None;
            let failover_ms = now_ms.saturating_sub(lost.at_ms);
            if let Some(e) = self.elections.get_mut(&c.term) {
                let f = e.failover.get_or_insert(Failover {
                    previous: lost.id,
                    previous_term: lost.term,
                    offline_ms: lost.at_ms,
                    done_ms: None,
                });
                f.done_ms = Some(now_ms);
            }
            out.push(Happening::FailoverDone { term: c.term, failover_ms });
        }
        // Repeated after its result, or overtaken by it: already decided at this term or later.
        if self.chain.get(&c.tx).is_some_and(|b| b.term >= c.term) {
            return;
        }
        let seen_ms = match &self.open {
            Some(open) if (c.term, c.tx) < (open.challenge.term, open.challenge.tx) => return,
            Some(open) if open.challenge == c => return,
            Some(open) if open.challenge.tx == c.tx && open.challenge.prev == c.prev => open.seen_ms,
            _ => now_ms,
        };
        self.open = Some(OpenChallenge { challenge: c, from, seen_ms });
        out.push(Happening::Challenge { tx: c.tx, difficulty: c.difficulty, term: c.term });
    }

    fn result(&mut self, now_ms: u64, term: Term, outcome: Outcome, out: &mut Vec<Happening>) {
        match outcome {
            Outcome::Accepted(block) => {
                if self.open.is_some_and(|o| o.challenge.tx == block.tx) {
                    self.open = None;
                }
                match self.chain.get(&block.tx) {
                    // A controller repeats its result until the room has it.
                    Some(old) if old.hash == block.hash => return,
                    Some(old) => {
                        self.replaced += 1;
                        out.push(Happening::Replaced { tx: block.tx, winner: block.miner, previous: old.miner });
                    }
                    None => out.push(Happening::Block {
                        tx: block.tx,
                        winner: block.miner,
                        solve_ms: solve_ms(&block),
                        difficulty: block.difficulty,
                    }),
                }
                self.insert_block(block);
            }
            Outcome::Rejected { tx, miner, reason, .. } => {
                if self.results.iter().any(|r| r.outcome == outcome) {
                    return;
                }
                out.push(Happening::Rejected { tx, miner, reason });
            }
        }
        if self.results.len() >= MAX_RESULTS {
            self.results.pop_front();
        }
        self.results.push_back(ResultEntry { seen_ms: now_ms, term, outcome });
    }

    fn insert_block(&mut self, block: Block) {
        if let Some(old) = self.chain.insert(block.tx, block) {
            self.unwin(old.miner);
        }
        *self.wins.entry(block.miner).or_insert(0) += 1;
        while self.chain.len() > MAX_BLOCKS {
            if let Some((_, old)) = self.chain.pop_first() {
                self.unwin(old.miner);
            }
        }
    }

    fn unwin(&mut self, miner: PeerId) {
        if let Some(n) = self.wins.get_mut(&miner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.wins.remove(&miner);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod script;

#[cfg(test)]
mod tests {
    use peer::status::Role;
    use proptest::prelude::*;

    use super::script::*;
    use super::*;

    fn lines(view: &mut RoomView, script: Vec<(u64, Observed)>) -> Vec<String> {
        script.into_iter().flat_map(|(at, seen)| view.observe(at, seen)).map(|h| h.to_string()).collect()
    }

    #[test]
    fn a_heartbeat_names_its_terms_controller_and_a_contradicting_one_is_ignored() {
        let mut view = room_view();
        assert_eq!(view.controller(), Some((2, C)));
        let beat = |from, term| {
            msg(
                from,
                Msg::Heartbeat {
                    term,
                    key: 1,
                    height: 3,
                    commit: 3,
                    tip: peer::pow::Digest::zero(peer::pow::HashAlg::Sha1),
                    open: None,
                },
            )
        };
        assert!(view.observe(4_100, beat(C, 2)).is_empty());
        view.observe(4_200, beat(A, 2));
        assert_eq!((view.controller(), view.ignored()), (Some((2, C)), 1));
        // A heartbeat of a newer term is the first word of its controller.
        let said: Vec<String> = view.observe(4_300, beat(A, 3)).iter().map(ToString::to_string).collect();
        assert_eq!(said, ["term 3: controller 1111"]);
        assert_eq!(view.controller(), Some((3, A)));
    }

    #[test]
    fn the_scripted_room_tells_its_story_once() {
        let mut view = RoomView::new();
        let said = lines(&mut view, room());
        let expected = [
            "peer 1111 joined (1 known)",
            "peer 2222 joined (2 known)",
            "peer 3333 joined (3 known)",
            "election for term 1 started",
            "term 1: controller 2222 elected in 30 ms",
            "challenge tx 0 at difficulty 20 (term 1)",
            "block 0 won by 1111 in 800 ms (difficulty 20)",
            "challenge tx 1 at difficulty 21 (term 1)",
            "block 1 won by 3333 in 600 ms (difficulty 21)",
            "challenge tx 2 at difficulty 21 (term 1)",
            "peer 2222 offline",
            "controller 2222 (term 1) offline: failover",
            "election for term 2 started",
            "term 2: controller 3333 elected in 150 ms",
            "term 2: failover done in 400 ms (controller lost to first challenge)",
            "challenge tx 2 at difficulty 21 (term 2)",
            "block 2 won by 1111 in 1000 ms (difficulty 21)",
        ];
        assert_eq!(said, expected);

        assert_eq!(view.controller(), Some((2, C)));
        assert_eq!(view.term(), 2);
        assert_eq!(view.electing(), None);
        assert_eq!(view.height(), 3);
        assert_eq!(view.tip().map(|b| b.miner), Some(A));
        assert_eq!((view.blocks_won(A), view.blocks_won(B), view.blocks_won(C)), (2, 0, 1));
        assert!(view.open_challenge().is_none());
        assert_eq!(view.results().len(), 3);
        let e1 = view.election(1).unwrap();
        assert_eq!((e1.duration_ms(), e1.winner, e1.failover_ms()), (Some(30), Some(B), None));
        let e2 = view.election(2).unwrap();
        // Started when B went (3000), ended by C's status (3150); failover to C's challenge (3400).
        assert_eq!((e2.started_ms, e2.duration_ms(), e2.winner), (Some(3_000), Some(150), Some(C)));
        assert_eq!(e2.failover_ms(), Some(400));
        assert_eq!(e2.failover.map(|f| f.previous), Some(B));
        assert_eq!(view.peer(B).unwrap().presence(4_000), Presence::Offline);
        assert_eq!(view.peer(A).unwrap().samples.len(), 3);
        assert_eq!(view.online(4_000), 2);
    }

    #[test]
    fn repeated_challenges_and_results_are_told_once() {
        let mut view = RoomView::new();
        let b0 = block(1, 0, A, 20, 0, 10);
        let said = lines(
            &mut view,
            vec![
                (0, challenge(B, 1, 0, 20, 0)),
                (5, challenge(B, 1, 0, 20, 0)),
                (10, accepted(B, b0)),
                (15, accepted(B, b0)),
                (20, challenge(B, 1, 0, 20, 0)),
            ],
        );
        assert_eq!(said.iter().filter(|l| l.starts_with("challenge")).count(), 1, "{said:?}");
        assert_eq!(said.iter().filter(|l| l.starts_with("block")).count(), 1, "{said:?}");
        assert!(view.open_challenge().is_none());
        assert_eq!(view.results().len(), 1);
    }

    #[test]
    fn a_reissued_challenge_keeps_its_first_sighting() {
        let mut view = RoomView::new();
        view.observe(100, challenge(B, 1, 4, 20, 0));
        view.observe(900, challenge(C, 2, 4, 20, 0));
        let open = view.open_challenge().unwrap();
        assert_eq!((open.challenge.term, open.from, open.elapsed_ms(1_100)), (2, C, 1_000));
    }

    #[test]
    fn results_and_challenges_from_a_non_controller_are_ignored() {
        let mut view = RoomView::new();
        view.observe(0, status(B, Role::Controller, 1, Some(B), 0));
        let said =
            lines(&mut view, vec![(1, accepted(A, block(1, 0, A, 20, 0, 5))), (2, challenge(A, 1, u64::MAX, 1, 0))]);
        assert!(said.iter().all(|l| l.starts_with("peer")), "{said:?}");
        assert_eq!(view.height(), 0);
        assert!(view.open_challenge().is_none());
        assert_eq!(view.ignored(), 2);
    }

    #[test]
    fn a_replaced_block_is_counted_and_wins_move() {
        let mut view = RoomView::new();
        view.observe(0, status(B, Role::Controller, 1, Some(B), 0));
        view.observe(1, accepted(B, block(1, 5, A, 20, 0, 5)));
        let said = lines(&mut view, vec![(2, accepted(B, block(1, 5, C, 20, 0, 7)))]);
        assert_eq!(said, ["block 5 replaced: now won by 3333 (was 1111)"]);
        assert_eq!((view.replaced(), view.blocks_won(A), view.blocks_won(C)), (1, 0, 1));
        assert_eq!(view.height(), 6);
    }

    #[test]
    fn rejections_are_kept_once() {
        let mut view = RoomView::new();
        view.observe(0, status(B, Role::Controller, 1, Some(B), 0));
        let rejected = rejected(B, 1, 3, A, 9);
        let said = lines(&mut view, vec![(1, rejected.clone()), (2, rejected)]);
        assert_eq!(said, ["tx 3: solution from 1111 rejected (already_solved)"]);
        assert_eq!(view.results().len(), 1);
    }

    #[test]
    fn silence_leave_and_return_are_told() {
        let mut view = RoomView::new();
        view.observe(0, hello(A));
        assert!(view.tick(SILENT_MS).is_empty());
        let silent = view.tick(SILENT_MS + 1);
        assert_eq!(silent.len(), 1);
        assert_eq!(silent[0].to_string(), "peer 1111 silent for 5.0 s");
        assert!(view.tick(SILENT_MS + 2).is_empty());
        assert_eq!(view.peer(A).unwrap().presence(SILENT_MS + 2), Presence::Silent);
        let back = lines(&mut view, vec![(6_000, hello(A)), (6_001, leave(A))]);
        assert_eq!(back, ["peer 1111 is back", "peer 1111 left"]);
        assert_eq!(view.peer(A).unwrap().role(), Some(Role::Offline));
        // An offline status retained from an earlier run is no news.
        assert!(view.observe(7_000, status(C, Role::Offline, 1, None, 0)).is_empty());
    }

    #[test]
    fn a_late_observer_learns_the_controller_without_an_election_time() {
        let mut view = RoomView::new();
        let said = lines(&mut view, vec![(0, status(A, Role::Miner, 4, Some(B), 5))]);
        assert_eq!(said, ["peer 1111 joined (1 known)", "term 4: controller 2222"]);
        assert_eq!(view.election(4).unwrap().duration_ms(), None);
        // An older term spoken of afterwards is remembered but is no election.
        view.observe(1, status(C, Role::Miner, 3, Some(A), 5));
        assert_eq!(view.controller_of(3), Some(A));
        assert!(view.election(3).is_none());
        assert_eq!(view.controller(), Some((4, B)));
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_the_view_consistent(script in proptest::collection::vec(any_observed(), 0..120)) {
            let mut view = RoomView::new();
            for (at, seen) in script {
                view.observe(at, seen);
                view.tick(at.saturating_add(SILENT_MS));
            }
            let ids: std::collections::BTreeSet<_> = view.peers().map(|p| p.id).chain([1, 2, 3, 4, 5, u32::MAX]).collect();
            let won: u64 = ids.into_iter().map(|id| view.blocks_won(id)).sum();
            prop_assert_eq!(won, view.chain().len() as u64);
            prop_assert!(view.results().len() <= MAX_RESULTS);
            if let Some((term, _)) = view.controller() {
                prop_assert!(view.term() >= term);
            }
            for e in view.elections() {
                prop_assert!(e.ended_ms.is_none() || e.winner.is_some());
            }
        }
    }

    #[test]
    fn hostile_inputs_stay_bounded() {
        let mut view = RoomView::new();
        view.observe(0, status(B, Role::Controller, 1, Some(B), 0));
        for i in 0..(MAX_PEERS as u32 + 500) {
            view.observe(u64::from(i), vote(10_000 + i, u64::MAX - u64::from(i)));
        }
        for i in 0..(MAX_BLOCKS as u64 + 10) {
            view.observe(i, accepted(B, block(1, u64::MAX - i, A, 1, u64::MAX, 0)));
        }
        for i in 0..(MAX_SAMPLES + 10) {
            view.observe(i as u64, status(A, Role::Miner, 1, Some(B), i as u64));
        }
        assert_eq!(view.peers().len(), MAX_PEERS);
        assert!(view.elections().len() <= MAX_ELECTIONS);
        assert_eq!(view.chain().len(), MAX_BLOCKS);
        assert_eq!(view.blocks_won(A), MAX_BLOCKS as u64);
        assert_eq!(view.results().len(), MAX_RESULTS);
        assert_eq!(view.peer(A).unwrap().samples.len(), MAX_SAMPLES);
        assert_eq!(view.height(), u64::MAX);
        assert_eq!(view.term(), u64::MAX);
        assert_eq!(view.electing(), Some(u64::MAX));
    }
}
