//! The peer's protocol core: a sans-IO state machine combining membership, elections, the chain,
//! the controller's transaction table and the miner's job.
//!
//! Feed it an [`Input`] (a connection, a decoded message, a solution found by the local miner) and
//! it returns the [`Action`]s to carry out: messages to publish, jobs for the miner, events to log.
//! No clocks, sockets or threads live here, so tests drive whole rooms of nodes in memory.
//!
//! It also judges the peers' statuses (see [`crate::status`]): an offline status is a departure,
//! but only for the incarnation the peer announced last, and a status that shows this peer wrongly
//! (its own will, or another run's status) makes it republish its own.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chain::{Chain, ChainError};
use crate::election::{Election, Step};
use crate::events::Event;
use crate::pace::Pace;
use crate::pow::{self, HashAlg, Template};
use crate::protocol::{
    Block, Challenge, Envelope, MAX_SYNC_BLOCKS, Message, Outcome, PeerId, RejectReason, Term, TxId, VERSION, View,
};
use crate::status::{Role, Status};
use crate::work::{Found, Job};

/// The settings the protocol core needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This peer's client id.
    pub id: PeerId,
    /// Peers that must know each other before the first election.
    pub room_size: usize,
    /// Fewest members for which a lost controller is replaced.
    pub min_peers: usize,
    /// Difficulty policy of the challenges this peer issues as controller.
    pub pace: Pace,
    /// Hash function of the chain this peer starts as controller.
    pub alg: HashAlg,
    /// Seed of the vote generator (`None`: from the OS).
    pub seed: Option<u64>,
    /// This process's incarnation (random), to tell it from another claiming the same id.
    pub incarnation: u64,
    /// When this process started (Unix ms).
    pub since_ms: u64,
    /// How long the controller may stay silent (no message and no status reaching this connected
    /// peer) before it is taken for gone; 0: never. A backstop for the will, which a controller
    /// that dies while it is disconnected (say, just after a broker restart) never leaves.
    pub silence_ms: u64,
}

/// Something that happened to the node.
#[derive(Debug, Clone)]
pub enum Input {
    /// (Re)connected to the broker and subscribed.
    Connected,
    /// A decoded, validated message.
    Message(Envelope),
    /// The local miner found a solution.
    Mined(Found),
    /// A decoded, validated status from `<prefix>/status/<id>` (any peer's, this one's included).
    Status(Status),
    /// Time passes (a few times a second, while connected): checks the controller's silence.
    Tick,
    /// This process stood still for longer than the room waits for a silent peer (SIGSTOP, a
    /// frozen machine): what it receives next is a backlog of what happened without it.
    Stalled,
}

/// Something the node asks its owner to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Publish this message (the owner wraps it in an envelope and picks the topic).
    Publish(Message),
    /// Mine this job, replacing any other.
    Mine(Job),
    /// Stop mining.
    StopMining,
    /// Write this event to the event stream.
    Emit(Event),
    /// Stop the peer with this error: it cannot take part in the room.
    Fatal(String),
    /// Publish this peer's status (retained) now, whether or not it changed: the broker holds one
    /// that shows this peer wrongly.
    PublishStatus,
}

/// One peer's protocol state.
#[derive(Debug)]
pub struct Node {
    cfg: NodeConfig,
    election: Election,
    chain: Chain,
    /// The challenge being mined (miner) or issued (controller).
    open: Option<Challenge>,
    /// This peer's solution for the open challenge, re-sent if the challenge is re-issued.
    submitted: Option<u64>,
    /// Controller: a block published as accepted and not yet seen back from the broker.
    pending: Option<Block>,
    /// The peer a sync request is outstanding with, and when it was sent.
    syncing: Option<(PeerId, u64)>,
    /// The highest height the controller's messages showed us (to sync again if still behind).
    seen_height: u64,
    /// Chain heights other peers announced, to catch up from the longest.
    heights: BTreeMap<PeerId, u64>,
    /// Votes from peers not (yet) known: counted once the voter announces itself (a vote can
    /// overtake its sender's hello, as brokers keep order per topic only), else never.
    held_votes: BTreeMap<PeerId, (Term, u32, u64)>,
    /// The incarnation each member announced in its latest hello: an offline status counts as a
    /// departure only for that one. Kept for members only, so bounded like the member set.
    incarnations: BTreeMap<PeerId, u64>,
    rng: StdRng,
    /// The owner's clock (Unix ms) at the current input.
    now_ms: u64,
    /// The controller last heard from (or last taken up), and when.
    leader_heard: Option<(PeerId, u64)>,
    out: Vec<Action>,
}

impl Node {
    /// A node that has not yet heard from anyone.
    pub fn new(cfg: NodeConfig) -> Self {
        let rng = match cfg.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            election: Election::new(cfg.id, cfg.room_size, cfg.min_peers),
            cfg,
            chain: Chain::new(),
            open: None,
            submitted: None,
            pending: None,
            syncing: None,
            seen_height: 0,
            leader_heard: None,
            heights: BTreeMap::new(),
            held_votes: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            rng,
            now_ms: 0,
            out: Vec::new(),
        }
    }

    /// This peer's client id.
    pub fn id(&self) -> PeerId {
        self.cfg.id
    }

    /// The verified chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Membership and election state.
    pub fn election(&self) -> &Election {
        &self.election
    }

    /// The open challenge, if any.
    pub fn open(&self) -> Option<&Challenge> {
        self.open.as_ref()
    }

    /// What this peer tells others about the room.
    pub fn view(&self) -> View {
        View { term: self.election.term(), leader: self.election.leader(), height: self.chain.height() }
    }

    /// What this peer is doing, as its status shows it.
    pub fn role(&self) -> Role {
        let e = &self.election;
        match e.leader() {
            Some(leader) if leader == self.cfg.id => Role::Controller,
            Some(_) => Role::Miner,
            // A term without a controller is being elected, if enough members remain to elect one.
            None if e.term() > 0 && e.members().len() >= self.cfg.min_peers => Role::Electing,
            None => Role::Joining,
        }
    }

    /// The incarnation `id` announced in its latest hello, while it is a member.
    pub fn incarnation_of(&self, id: PeerId) -> Option<u64> {
        self.incarnations.get(&id).copied()
    }

    /// This peer's status at `at_ms` (Unix ms). The mining figures (`hash_rate`, `hashes`,
    /// `threads`) are the owner's to fill in; they are 0 here.
    pub fn status(&self, at_ms: u64) -> Status {
        Status {
            version: VERSION,
            id: self.cfg.id,
            incarnation: self.cfg.incarnation,
            role: self.role(),
            term: self.election.term(),
            leader: self.election.leader(),
            height: self.chain.height(),
            tx: self.open.map(|c| c.tx),
            difficulty: self.open.map(|c| c.difficulty),
            hash_rate: 0,
            hashes: 0,
            blocks_won: self.chain.won_by(self.cfg.id),
            threads: 0,
            started_ms: self.cfg.since_ms,
            at_ms,
            waiting: None,
        }
    }

    /// This peer's status marked [`Role::Offline`]: its Last Will, and its last word on a clean exit.
    pub fn offline_status(&self, at_ms: u64) -> Status {
        Status { role: Role::Offline, tx: None, difficulty: None, ..self.status(at_ms) }
    }

    /// Feeds one input, which happened at `now_ms` (Unix ms), and returns what to do.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Action> {
        self.now_ms = now_ms;
        let from = match &input {
            Input::Message(env) => Some(env.from),
            Input::Status(s) if s.role != Role::Offline => Some(s.id),
            _ => None,
        };
        if let Some(leader) = self.election.leader()
            && (from == Some(leader) || matches!(input, Input::Connected))
        {
            // On a (re)connection too: silence while we were cut off says nothing of it.
            self.leader_heard = Some((leader, now_ms));
        }
        match input {
            Input::Connected => self.connected(),
            Input::Message(env) => self.message(env),
            Input::Mined(found) => self.mined(found),
            Input::Status(status) => self.status_of(status),
            Input::Tick => self.tick(),
            Input::Stalled => self.withdraw(),
        }
        std::mem::take(&mut self.out)
    }

    /// Takes a controller silent for longer than `silence_ms` for gone, as if its will had come.
    fn tick(&mut self) {
        let Some(leader) = self.election.leader().filter(|&l| l != self.cfg.id) else { return };
        let since = match self.leader_heard {
            Some((heard, at)) if heard == leader => at,
            // A controller taken up since the last tick: its silence starts now.
            _ => {
                self.leader_heard = Some((leader, self.now_ms));
                return;
            }
        };
        let silent_ms = self.now_ms.saturating_sub(since);
        if self.cfg.silence_ms > 0 && silent_ms > self.cfg.silence_ms {
            self.leader_heard = None;
            self.emit(Event::ControllerSilent { id: leader, silent_ms });
            self.leave(leader);
        }
    }

    /// The message to publish on a clean exit (with [`Node::offline_status`], which is also the
    /// Last Will: MQTT allows one will, and the status reaches watchers too).
    pub fn farewell() -> Message {
        Message::Leave
    }

    fn publish(&mut self, msg: Message) {
        self.out.push(Action::Publish(msg));
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Action::Emit(event));
    }

    fn drop_msg(&mut self, reason: &str, detail: String) {
        self.emit(Event::MessageDropped { reason: reason.into(), detail });
    }

    fn connected(&mut self) {
        // Every connection is a clean session (see transport): whatever the broker held for us,
        // subscriptions, queued messages, retained state, may be gone, so we say again who we are.
        self.publish(self.hello_msg(true));
        // A sync request in flight when the connection dropped may be lost: ask again.
        if let Some((peer, _)) = self.syncing.take() {
            self.request_sync(peer, self.chain.height());
        }
        // After a broker restart anything in flight may be lost: say again what the room waits on.
        if self.election.is_leader() {
            self.repeat_open();
        } else if let (Some(c), Some(nonce)) = (self.open, self.submitted) {
            self.publish(Message::Solution { tx: c.tx, nonce });
        }
    }

    fn hello_msg(&self, want_reply: bool) -> Message {
        let (incarnation, since_ms) = (self.cfg.incarnation, self.cfg.since_ms);
        Message::Hello { want_reply, view: self.view(), incarnation, since_ms }
    }

    /// Another process announced itself under our client id.
    fn impostor(&mut self, incarnation: u64, since_ms: u64) {
        let id = self.cfg.id;
        if (since_ms, incarnation) < (self.cfg.since_ms, self.cfg.incarnation) {
            // It was there first: we are the duplicate.
            let msg = format!("client id {id} is already used by another peer in this room; pick another with --id");
            self.out.push(Action::Fatal(msg));
        } else {
            self.drop_msg(
                "duplicate_id",
                format!("another process claims our client id {id}; it started later and gives way"),
            );
            // Let it hear us (it may be new and waiting for replies).
            self.publish(self.hello_msg(false));
        }
    }

    /// As controller, publishes again the pending result, or else the open challenge.
    fn repeat_open(&mut self) {
        match (self.pending, self.open) {
            (Some(block), _) => {
                let term = self.election.term();
                self.publish(Message::Result { term, outcome: Outcome::Accepted(block) });
            }
            (None, Some(c)) => self.publish(Message::Challenge(c)),
            (None, None) => {}
        }
    }

    fn message(&mut self, env: Envelope) {
        let from = env.from;
        if from == self.cfg.id {
            // Our own messages come back from the broker; only an accepted result matters, as it
            // is how the controller knows the room has the block (see `result`).
            match env.msg {
                Message::Result { term, outcome: Outcome::Accepted(block) } => self.result_accepted(from, term, block),
                Message::Hello { incarnation, since_ms, .. } if incarnation != self.cfg.incarnation => {
                    self.impostor(incarnation, since_ms);
                }
                _ => {}
            }
            return;
        }
        match env.msg {
            Message::Hello { want_reply, view, incarnation, .. } => self.hello(from, want_reply, view, incarnation),
            Message::Leave => self.leave(from),
            Message::SyncRequest { to, from: start } => {
                if to == self.cfg.id {
                    self.sync_request(from, start);
                }
            }
            Message::SyncReply { to, term, blocks, height, open } => {
                if to == self.cfg.id {
                    self.sync_reply(from, term, blocks, height, open);
                }
            }
            Message::Vote { term, vote, height } => {
                if term < self.election.term() {
                    let current = self.election.term();
                    self.drop_msg("stale_term", format!("vote from {from} for term {term}, current term is {current}"));
                    return;
                }
                if !self.election.members().contains(&from) {
                    if self.held_votes.len() < MAX_HELD_VOTES || self.held_votes.contains_key(&from) {
                        self.held_votes.insert(from, (term, vote, height));
                    }
                    self.drop_msg("unknown_voter", format!("vote from {from}, who has not announced itself; held"));
                    return;
                }
                self.count_vote(from, term, vote, height);
            }
            Message::Challenge(c) => self.challenge(from, c),
            Message::Solution { tx, nonce } => self.solution(from, tx, nonce),
            Message::Result { term, outcome } => match outcome {
                Outcome::Accepted(block) => self.result_accepted(from, term, block),
                Outcome::Rejected { .. } => {
                    // Informational for the miner; the controller already logged it.
                    let _ = self.fence(from, term, "result");
                }
            },
        }
    }

    fn count_vote(&mut self, from: PeerId, term: Term, vote: u32, height: u64) {
        self.heights.insert(from, height);
        let steps = self.election.vote(from, term, vote, &mut rng_vote(&mut self.rng));
        self.apply(steps);
    }

    fn hello(&mut self, from: PeerId, want_reply: bool, view: View, incarnation: u64) {
        let members = self.election.members();
        if !members.contains(&from) && members.len() >= MAX_MEMBERS.max(self.cfg.room_size * 4) {
            // Hellos under made-up ids must not grow the member set (and this peer's memory)
            // without bound.
            self.drop_msg("too_many_members", format!("hello from {from}: {} members known already", members.len()));
            return;
        }
        self.heights.insert(from, view.height);
        self.incarnations.insert(from, incarnation);
        // Adopt the room's controller before counting the member, so a newcomer joins the running
        // term instead of starting an election of its own.
        // Our own id only while withdrawn: the room still counts us its controller of our term.
        if let Some(leader) = view.leader
            && (leader != self.cfg.id || (self.election.is_withdrawn() && view.term == self.election.term()))
            && self.election.adopt(view.term, leader)
        {
            self.emit(Event::LeaderElected { term: view.term, leader, votes: 0 });
            self.abstain();
            self.stepped_into_term();
        }
        let (new, steps) = self.election.join(from, &mut rng_vote(&mut self.rng));
        if new {
            let members = self.election.members().len();
            self.emit(Event::PeerJoined { id: from, members });
        }
        if want_reply {
            self.publish(self.hello_msg(false));
            // The peer has just (re)subscribed: whatever it was waiting for may have been lost
            // with its connection (after a broker restart, the controller can reconnect and
            // re-issue its challenge before the miners are back). Say it again.
            if self.election.is_leader() {
                self.repeat_open();
            }
            if let Some((peer, _)) = self.syncing
                && peer == from
            {
                self.syncing = None;
                self.request_sync(peer, self.chain.height());
            }
        }
        self.apply(steps);
        if let Some((term, vote, height)) = self.held_votes.remove(&from)
            && term >= self.election.term()
        {
            self.count_vote(from, term, vote, height);
        }
        if view.leader == Some(from) || self.election.leader() == Some(from) {
            self.catch_up_with(from, view.height);
        }
    }

    fn leave(&mut self, from: PeerId) {
        self.heights.remove(&from);
        self.held_votes.remove(&from);
        self.incarnations.remove(&from);
        let (known, steps) = self.election.leave(from, &mut rng_vote(&mut self.rng));
        if known {
            let members = self.election.members().len();
            self.emit(Event::PeerLeft { id: from, members });
        }
        if self.syncing.is_some_and(|(p, _)| p == from) {
            self.syncing = None;
            self.issue_if_leader();
        }
        self.apply(steps);
    }

    fn status_of(&mut self, status: Status) {
        // Judged by its incarnation alone, never by the RETAIN flag of the delivery (brokers differ
        // on it for a will delivered live) or by whether the broker still holds it.
        let (id, incarnation) = (status.id, status.incarnation);
        if id == self.cfg.id {
            self.own_status(&status);
            return;
        }
        if status.role != Role::Offline {
            return;
        }
        match self.incarnations.get(&id) {
            Some(&live) if live == incarnation => self.leave(id),
            // A retained status from the peer's earlier run, or the will of that run firing after
            // the peer came back: the live process must stay.
            Some(&live) => self.drop_msg(
                "stale_offline",
                format!("offline status of {id} for incarnation {incarnation:016x}; it announced {live:016x}"),
            ),
            // Not a member (or never announced): nothing to remove. Every newcomer hears the
            // retained statuses of all the peers that ever left, so this is not worth a log line.
            None => {}
        }
    }

    /// A zero ballot in a term whose controller we took up without voting (see
    /// [`Election::abstain`]).
    fn abstain(&mut self) {
        if let Some(step) = self.election.abstain() {
            self.apply(vec![step]);
        }
    }

    /// The room may have gone on without us: step down, vote in nothing we may have missed the
    /// start of (our backlog can hold the votes of an election held without us), show us online
    /// and ask the room where it is. Its replies re-admit us (and, if they still name us
    /// controller of our term, we carry on as such).
    fn withdraw(&mut self) {
        if self.election.is_withdrawn() {
            return;
        }
        let term = self.election.term();
        self.election.withdraw();
        self.emit(Event::Withdrawn { term });
        self.out.push(Action::PublishStatus);
        self.publish(self.hello_msg(true));
    }

    /// A status under our own id: our echo, our will, or another process's.
    fn own_status(&mut self, status: &Status) {
        let ours = status.incarnation == self.cfg.incarnation;
        if ours {
            if status.role == Role::Offline {
                // Our will fired (we were paused, hung or cut off long enough): the others took it
                // as our departure, and may have elected without us.
                self.withdraw();
            }
            return;
        }
        // The will of our previous run, or the status of a later process claiming our id (it will
        // give way, see `impostor`). A status from an *earlier* process is not answered: ours
        // follows it anyway on every connection, and two processes answering each other would
        // republish without end.
        let later = (status.started_ms, status.incarnation) > (self.cfg.since_ms, self.cfg.incarnation);
        if status.role == Role::Offline || later {
            self.out.push(Action::PublishStatus);
        }
    }

    fn apply(&mut self, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Vote { term, vote } => {
                    self.emit(Event::VoteCast { term, vote });
                    self.publish(Message::Vote { term, vote, height: self.chain.height() });
                }
                Step::Elected { term, leader } => {
                    let votes = self.election.votes_held();
                    self.emit(Event::LeaderElected { term, leader, votes });
                    self.stepped_into_term();
                }
            }
        }
    }

    /// Called whenever the controller or term changed.
    fn stepped_into_term(&mut self) {
        self.pending = None;
        if !self.election.is_leader() {
            // Our tip may be a block the room never accepted (a deposed controller appends its own
            // last result when the broker echoes it): have the new controller confirm it.
            if let (Some(leader), Some(tip)) = (self.election.leader(), self.chain.tip())
                && tip.term < self.election.term()
            {
                let from = tip.tx;
                self.request_sync(leader, from);
            }
            return;
        }
        // The controller does not mine.
        self.out.push(Action::StopMining);
        self.submitted = None;
        // Continue from the longest chain any voter announced, so no accepted block is lost.
        let best = self.heights.iter().filter(|&(&p, _)| p != self.cfg.id).max_by_key(|&(_, &h)| h);
        if let Some((&peer, &height)) = best
            && height > self.chain.height()
        {
            self.request_sync(peer, self.chain.height());
            return;
        }
        self.issue_if_leader();
    }

    /// As controller, issues the challenge for the next transaction (re-issuing the open one, with
    /// the same difficulty, if it is still undecided, so miners continue where they were).
    fn issue_if_leader(&mut self) {
        if !self.election.is_leader() || self.syncing.is_some() || self.pending.is_some() {
            return;
        }
        let tx = self.chain.height();
        let prev = self.chain.tip_hash(self.cfg.alg);
        let alg = self.chain.alg(self.cfg.alg);
        let term = self.election.term();
        let c = match self.open {
            // Re-issue the undecided challenge unchanged but for the term: miners keep their job.
            Some(c) if c.tx == tx && c.prev == prev => Challenge { term, ..c },
            _ => {
                let pace = self.cfg.pace;
                let difficulty = pace.next(self.chain.blocks()).unwrap_or_else(|| {
                    let (lo, hi) = pace.bounds();
                    self.rng.random_range(lo..=hi)
                });
                Challenge { term, tx, alg, difficulty, pace, issued_ms: self.now_ms, prev }
            }
        };
        let difficulty = c.difficulty;
        self.open = Some(c);
        self.emit(Event::ChallengeIssued { term, tx, difficulty });
        self.publish(Message::Challenge(c));
    }

    /// Checks that a controller message for `term` from `from` is from the current controller,
    /// adopting it if it announces a newer term. Returns false (and logs) if it must be ignored.
    fn fence(&mut self, from: PeerId, term: Term, what: &str) -> bool {
        let current = self.election.term();
        if term < current {
            self.drop_msg("stale_term", format!("{what} from {from} for term {term}, current term is {current}"));
            return false;
        }
        if term == current && self.election.leader().is_some_and(|l| l != from) {
            let leader = self.election.leader().unwrap_or_default();
            self.drop_msg("not_controller", format!("{what} from {from} in term {term}, whose controller is {leader}"));
            return false;
        }
        if self.election.adopt(term, from) {
            self.emit(Event::LeaderElected { term, leader: from, votes: 0 });
            self.abstain();
            self.stepped_into_term();
        }
        true
    }

    fn challenge(&mut self, from: PeerId, c: Challenge) {
        if !self.fence(from, c.term, "challenge") {
            return;
        }
        let height = self.chain.height();
        if c.tx < height {
            self.drop_msg("stale_transaction", format!("challenge for transaction {} at height {height}", c.tx));
            return;
        }
        self.seen_height = self.seen_height.max(c.tx);
        if c.tx > height || c.prev != self.chain.tip_hash(c.alg) {
            // We missed blocks (or hold a block the room does not): catch up, then mine.
            self.request_sync(from, self.chain.height());
            return;
        }
        self.follow(c);
    }

    /// Starts mining `c`, unless it is the job already running (a re-issued challenge).
    fn follow(&mut self, c: Challenge) {
        if !c.pace.allows(self.chain.blocks(), c.difficulty) {
            let detail =
                format!("challenge {} asks for {} bits, which {:?} does not allow", c.tx, c.difficulty, c.pace);
            self.drop_msg("bad_difficulty", detail);
            return;
        }
        let same_job = self.open.is_some_and(|o| (o.tx, o.prev, o.difficulty) == (c.tx, c.prev, c.difficulty));
        self.open = Some(c);
        if same_job {
            if let Some(nonce) = self.submitted {
                // The controller re-issued the challenge: our answer may have been lost.
                self.publish(Message::Solution { tx: c.tx, nonce });
            }
            return;
        }
        self.submitted = None;
        let template = Template::new(&c.prev, c.tx, self.cfg.id);
        self.out.push(Action::Mine(Job { tx: c.tx, template, difficulty: c.difficulty }));
        self.emit(Event::MiningStarted { term: c.term, tx: c.tx, difficulty: c.difficulty });
    }

    fn mined(&mut self, found: Found) {
        let Some(c) = self.open else { return };
        if c.tx != found.tx || self.election.is_leader() {
            return;
        }
        self.submitted = Some(found.nonce);
        self.emit(Event::SolutionFound {
            tx: found.tx,
            nonce: found.nonce,
            hashes: found.hashes,
            elapsed_ms: found.elapsed_ms,
        });
        self.publish(Message::Solution { tx: found.tx, nonce: found.nonce });
    }

    fn solution(&mut self, miner: PeerId, tx: TxId, nonce: u64) {
        if !self.election.is_leader() {
            return;
        }
        let term = self.election.term();
        let verdict = match (self.open, self.pending) {
            (_, Some(p)) if p.tx == tx => Err(RejectReason::AlreadySolved),
            _ if tx < self.chain.height() => Err(RejectReason::AlreadySolved),
            (Some(c), None) if c.tx == tx => {
                let hash = pow::proof(&c.prev, tx, miner, nonce);
                if hash.leading_zeros() >= u32::from(c.difficulty) {
                    let (alg, difficulty, prev, pace, issued_ms) = (c.alg, c.difficulty, c.prev, c.pace, c.issued_ms);
                    let solved_ms = self.now_ms.max(issued_ms);
                    Ok(Block { tx, term, alg, difficulty, pace, issued_ms, solved_ms, prev, miner, nonce, hash })
                } else {
                    Err(RejectReason::InsufficientWork)
                }
            }
            _ => Err(RejectReason::UnknownTransaction),
        };
        match verdict {
            Ok(block) => {
                self.pending = Some(block);
                self.publish(Message::Result { term, outcome: Outcome::Accepted(block) });
            }
            Err(reason) => {
                self.emit(Event::SolutionRejected { tx, miner, reason: reason.as_str().into() });
                self.publish(Message::Result { term, outcome: Outcome::Rejected { tx, miner, nonce, reason } });
            }
        }
    }

    fn result_accepted(&mut self, from: PeerId, term: Term, block: Block) {
        if from != self.cfg.id && !self.fence(from, term, "result") {
            return;
        }
        if from == self.cfg.id && (term < self.election.term() || !self.election.is_leader()) {
            // The echo of a result we published as controller, arriving after we learnt we are not
            // (any more): the room may never have taken it. The new controller's chain decides.
            self.drop_msg("stale_own_result", format!("our result for transaction {} of term {term}", block.tx));
            return;
        }
        let height = self.chain.height();
        if block.tx < height {
            if self.chain.get(block.tx) != Some(&block) {
                self.drop_msg("conflicting_block", format!("block {} from {from} differs from ours", block.tx));
                if from != self.cfg.id && self.election.leader() == Some(from) {
                    // The controller's chain wins (our block was never the room's): compare from there.
                    self.request_sync(from, block.tx);
                }
            }
            return;
        }
        if from == self.cfg.id && block.tx > height {
            self.drop_msg("forged_own_result", format!("an accepted result in our name for transaction {}", block.tx));
            return;
        }
        self.seen_height = self.seen_height.max(block.tx + 1);
        if block.tx > height {
            self.request_sync(from, height);
            return;
        }
        if let Err(e) = self.chain.append(block) {
            self.drop_msg("invalid_block", format!("from {from}: {e}"));
            return;
        }
        self.accepted(block);
        if from == self.cfg.id {
            self.pending = None;
            self.issue_if_leader();
        }
    }

    /// Bookkeeping after appending `block`.
    fn accepted(&mut self, block: Block) {
        self.emit(Event::BlockAccepted {
            term: block.term,
            tx: block.tx,
            winner: block.miner,
            difficulty: block.difficulty,
            nonce: block.nonce,
            solve_ms: block.solved_ms.saturating_sub(block.issued_ms),
            hash: block.hash.to_hex(),
            prev: block.prev.to_hex(),
        });
        if self.open.is_some_and(|c| c.tx == block.tx) {
            if !self.election.is_leader() {
                self.out.push(Action::StopMining);
                self.open = None;
            }
            self.submitted = None;
        }
    }

    fn catch_up_with(&mut self, peer: PeerId, height: u64) {
        if height > self.chain.height() && peer != self.cfg.id {
            self.request_sync(peer, self.chain.height());
        }
    }

    fn request_sync(&mut self, peer: PeerId, from: TxId) {
        if peer == self.cfg.id {
            // Only a forgery in our name can point us at ourselves.
            return;
        }
        // One request at a time, but a request unanswered for long (lost, or asked of a peer that
        // had not yet reconnected) is sent again rather than waited on for ever.
        if let Some((_, at)) = self.syncing
            && self.now_ms.saturating_sub(at) < SYNC_RETRY_MS
        {
            return;
        }
        self.syncing = Some((peer, self.now_ms));
        self.publish(Message::SyncRequest { to: peer, from });
    }

    fn sync_request(&mut self, asker: PeerId, start: TxId) {
        let height = self.chain.height();
        let start = start.min(height);
        let end = start.saturating_add(MAX_SYNC_BLOCKS as u64).min(height);
        let blocks = (start..end).filter_map(|tx| self.chain.get(tx).copied()).collect();
        let open = if self.election.is_leader() { self.open } else { None };
        let term = self.election.term().max(1);
        self.publish(Message::SyncReply { to: asker, term, blocks, height, open });
    }

    fn sync_reply(&mut self, from: PeerId, term: Term, blocks: Vec<Block>, height: u64, open: Option<Challenge>) {
        let from_leader = self.election.leader() == Some(from) && term >= self.election.term();
        if self.syncing.is_none_or(|(p, _)| p != from) && !from_leader {
            self.drop_msg("unsolicited_sync", format!("sync reply from {from}"));
            return;
        }
        self.syncing = None;
        let first = blocks.first().map(|b| b.tx);
        for block in blocks {
            if let Some(mine) = self.chain.get(block.tx) {
                if *mine == block {
                    continue;
                }
                if !from_leader {
                    self.drop_msg("conflicting_block", format!("sync block {} from {from} differs", block.tx));
                    break;
                }
                // The controller's chain wins: our suffix was never accepted by the room.
                self.chain.truncate(block.tx);
                self.emit(Event::ChainTruncated { height: self.chain.height() });
            }
            if let Err(e) = self.chain.append(block) {
                self.drop_msg("invalid_block", format!("sync from {from}: {e}"));
                if from_leader && matches!(e, ChainError::Link(_)) && block.tx > 0 {
                    // We diverged from the controller before this block: compare from the start.
                    self.request_sync(from, 0);
                    return;
                }
                break;
            }
            self.accepted(block);
        }
        if let Some(tx) = first {
            self.emit(Event::Synced { from: tx, height: self.chain.height() });
        }
        // Behind the reply's height, or behind what the controller showed us meanwhile: ask again.
        // Only while replies bring blocks, so two peers cannot ping-pong empty replies.
        if first.is_some() && (self.chain.height() < height || self.chain.height() < self.seen_height) {
            self.request_sync(from, self.chain.height());
            return;
        }
        if let Some(c) = open
            && from_leader
            && c.tx == self.chain.height()
            && c.prev == self.chain.tip_hash(c.alg)
        {
            self.follow(c);
        }
        self.issue_if_leader();
    }
}

/// Most members a peer keeps track of (or four times the room size, if larger).
const MAX_MEMBERS: usize = 1024;

/// Most votes held from peers not yet known (forgeries under random ids cannot grow it further).
const MAX_HELD_VOTES: usize = 256;

/// How long a sync request may go unanswered before it is sent again.
const SYNC_RETRY_MS: u64 = 500;

fn rng_vote(rng: &mut StdRng) -> impl FnMut() -> u32 + '_ {
    move || rng.random()
}

#[cfg(test)]
mod tests;
