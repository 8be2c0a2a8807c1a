//! The room's state machine: a Raft-style replicated chain whose elections keep the lab's
//! character (in the normal case the highest random ballot wins).
//!
//! Feed [`RoomNode::handle`] an [`Input`] with the current time (monotonic milliseconds) and carry
//! out the returned [`Action`]s **in order**: a [`Action::Persist`] must be durable before any
//! later [`Action::Publish`] of the same batch goes out, since those messages promise what it
//! writes (a vote, a block held). No clock, socket, thread or disk lives here; randomness comes
//! from a seeded generator. See `docs/PROTOCOL.md` for the rules and the argument for their safety.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::msg::{Channel, Envelope, Member, Msg, Pos, RoomConfig};
use crate::chain::Chain;
use crate::events::Event;
use crate::pace::Pace;
use crate::pow::{self, Digest, HashAlg, Template};
use crate::protocol::{
    Block, Challenge, Change, DropReason, MAX_SYNC_BLOCKS, Outcome, PeerId, RejectReason, Term, TxId,
};
use crate::status::Role;
use crate::status::Status;
use crate::work::{Found, Job};

/// The protocol's timers, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often a controller says it is alive.
    pub heartbeat_ms: u64,
    /// A follower that has not heard its controller for a random time in
    /// `election_min_ms..=election_max_ms` looks for a new one.
    pub election_min_ms: u64,
    /// See `election_min_ms`; also how long a controller goes on without hearing a quorum.
    pub election_max_ms: u64,
    /// How long a voter waits for the ballots of members not known to be gone before it grants.
    pub ballot_wait_ms: u64,
    /// How long a peer without a chain listens after it connects before it may found a room:
    /// long enough to hear an existing room's heartbeats, or its answers to our hello.
    pub discovery_ms: u64,
    /// How long a sync request may go unanswered before it is sent again.
    pub sync_retry_ms: u64,
    /// Most blocks in one sync reply of ours (at most [`MAX_SYNC_BLOCKS`]; the simulator makes
    /// it small, so that syncs of a few blocks already take several replies).
    pub sync_blocks: usize,
    /// A controller replaces a voting member it has not heard from for this long by a live
    /// non-voting peer, if there is one (0: never).
    pub replace_after_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 400,
            election_max_ms: 800,
            ballot_wait_ms: 100,
            discovery_ms: 300,
            sync_retry_ms: 500,
            sync_blocks: MAX_SYNC_BLOCKS,
            replace_after_ms: 30_000,
        }
    }
}

/// The settings of a node.
#[derive(Debug, Clone)]
pub struct RoomNodeConfig {
    /// This peer's client id.
    pub id: PeerId,
    /// This peer's key (fixed with its data directory).
    pub key: u64,
    /// This process's incarnation (random per process).
    pub incarnation: u64,
    /// When this process started (ms, the owner's clock; only compared between processes).
    pub since_ms: u64,
    /// Members of the room's configuration, fixed at the first election.
    pub room_size: usize,
    /// Difficulty policy of the challenges this peer issues as controller.
    pub pace: Pace,
    /// Hash function of a chain this peer starts.
    pub alg: HashAlg,
    /// Seed of the ballot and timer generator.
    pub seed: u64,
    /// Timers.
    pub timing: Timing,
}

/// What a node recovers from its disk.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// The latest term it knew.
    pub term: Term,
    /// Whom it voted for in that term.
    pub voted_for: Option<PeerId>,
    /// The configuration recorded in block 0 (present once the chain is not empty).
    pub config: Option<RoomConfig>,
    /// Its chain.
    pub blocks: Vec<Block>,
    /// Blocks it knew committed.
    pub commit: u64,
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
    /// Time passed (at least by the time [`RoomNode::next_timer`] said).
    Tick,
    /// This process stood still for longer than an election timeout (SIGSTOP, a frozen machine).
    Stalled,
}

/// A durable change. Carry them out before the messages that follow them in the same batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The current term and the vote cast in it.
    Vote {
        /// Term.
        term: Term,
        /// Vote.
        voted_for: Option<PeerId>,
    },
    /// Blocks appended at the stored height.
    Append(Vec<Block>),
    /// Drop every block from this height on.
    Truncate(u64),
    /// The configuration of block 0.
    Config(RoomConfig),
    /// Blocks known committed.
    Commit(u64),
}

/// Something the node asks its owner to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Write this durably before carrying out any later action.
    Persist(Write),
    /// Publish this message.
    Publish(Msg),
    /// Mine this job, replacing any other.
    Mine(Job),
    /// Stop mining.
    StopMining,
    /// Write this event to the event stream.
    Emit(Event),
    /// Stop the peer: it cannot take part in the room.
    Fatal(String),
}

/// What this peer is in its term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role2 {
    Follower,
    Controller,
}

/// What the node knows of another peer.
#[derive(Debug, Clone, Copy)]
struct Peer {
    key: u64,
    incarnation: u64,
    /// Its will or goodbye came and nothing since.
    gone: bool,
    /// Last time anything came from it.
    heard_ms: u64,
    /// Since when it has been in the room without a break (the oldest is promoted first).
    since: u64,
}

/// A non-voting peer as the controller last heard of it.
#[derive(Debug, Clone, Copy)]
struct Learner {
    key: u64,
    /// Blocks it holds (the controller's).
    height: u64,
    /// When it last acknowledged.
    at: u64,
}

/// A ballot of the current term.
#[derive(Debug, Clone, Copy)]
struct Ballot {
    ballot: u32,
    pos: Pos,
    proposal: Option<Digest>,
}

/// How many voters this peer can hear, against how many a quorum needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Voters heard from recently (this peer included if it votes).
    pub reachable: usize,
    /// Voters a quorum needs.
    pub needed: usize,
    /// Voters in the configuration (or the proposal, before block 0).
    pub voters: usize,
}

/// One peer's state in the room protocol.
#[derive(Debug)]
pub struct RoomNode {
    cfg: RoomNodeConfig,
    rng: StdRng,
    now: u64,
    // Durable.
    term: Term,
    voted_for: Option<PeerId>,
    /// The last term in which this peer granted a vote (what its disk promises).
    promised: Term,
    /// Whom it granted that vote.
    promised_to: Option<PeerId>,
    chain: Chain,
    /// The configuration recorded with block 0.
    config: Option<RoomConfig>,
    /// The voting members: `config` with the chain's changes applied, the uncommitted ones
    /// included (Raft's rule: a configuration counts from the moment it is in the log).
    members: Option<RoomConfig>,
    commit: u64,
    // Volatile.
    role: Role2,
    controller: Option<PeerId>,
    /// When the controller was last heard from (or the term entered).
    heard_ms: u64,
    /// The controller's will came: it is gone whatever its lease says.
    controller_gone: bool,
    election_deadline: u64,
    peers: BTreeMap<PeerId, Peer>,
    /// Pre-ballots for `pre_term` (= term + 1 when current).
    pre_term: Term,
    pre: BTreeSet<PeerId>,
    /// When this peer last sent a pre-ballot.
    last_pre_sent: u64,
    /// When this peer last answered a pre-ballot of an older term.
    last_pre_answer: u64,
    /// When this peer entered its current term (its election in it gets that long, at least).
    term_since: u64,
    /// Terms in a row whose election this peer took part in (it cast a ballot) and that ended
    /// without a controller: each doubles the election timeouts (up to 16 times), so that in a
    /// room whose ballots take longer to go round than a timeout (hundreds of peers on a few
    /// cores) an election gets the time it needs. Not a term merely joined late (a restart) nor
    /// one whose controller was lost: those say nothing of how long elections take, and a
    /// backoff they left slowed the next failovers (a pause of the controller after a few
    /// restarts took 1.1 s instead of 0.5). It stays while a controller holds (its lease, its
    /// quorum check and its followers' timeouts are as long: a room slow enough to need it
    /// acknowledges as slowly), and comes down one step per `BACKOFF_DECAY_MS` with a live
    /// controller.
    backoff: u32,
    /// When `backoff` last changed, or a controller was last found.
    backoff_since: u64,
    /// A controller of the current term was known (elected here, or followed).
    term_led: bool,
    ballots: BTreeMap<PeerId, Ballot>,
    my_ballot: Option<u32>,
    grant_deadline: Option<u64>,
    /// The grant deadline passed; it was set again for our broadcast's echo (see `try_grant`).
    grant_awaits_echo: bool,
    grants: BTreeSet<PeerId>,
    /// This peer was controller of the current term and stood down: not again in this term.
    deposed: bool,
    /// Evidence that the room already has a chain (do not bootstrap, sync).
    room_seen: bool,
    /// Before this time (set on every connect) this peer does not found a room: it listens.
    discover_until: u64,
    /// Before block 0: the proposed configuration and its digest (SHA-256), kept up to date as
    /// peers come and go (see [`RoomNode::refresh_voters`]).
    proposal: Option<(RoomConfig, Digest)>,
    /// Voters (not this peer) known to be gone: the ballots a voter waits for are the others'.
    gone_voters: usize,
    /// Peers known to be gone (`Peer::gone`), counted as they come and go.
    gone_peers: usize,
    // Controller.
    acks: BTreeMap<PeerId, (u64, u64)>,
    /// Non-voting peers that acknowledged our blocks in this term: who may replace a member.
    learners: BTreeMap<PeerId, Learner>,
    became_ms: u64,
    next_beat: u64,
    open: Option<Challenge>,
    /// A block appended and published, waiting for its commit.
    pending: Option<TxId>,
    // Follower.
    mining: Option<Challenge>,
    submitted: Option<u64>,
    /// The configuration announced with challenge 0, kept to take block 0.
    genesis_offer: Option<RoomConfig>,
    /// The peer asked for blocks, when, and from which height.
    syncing: Option<(PeerId, u64, TxId, u64)>,
    /// A block failed to link: sync from below the tip, first from the commit point, then on
    /// from the height up to which replies of the same controller and term agreed with us.
    diverged: Option<Diverged>,
    /// When this miner last sent its solution.
    last_solution_ms: u64,
    /// The commit point moved in this batch: written at its end.
    commit_dirty: bool,
    last_stale_reply: u64,
    last_reach: Option<(usize, usize)>,
    /// What [`RoomNode::waiting`] reports, as of the last tick.
    waiting: Option<crate::status::Waiting>,
    /// The last acknowledgement sent: controller, term, height, when. One that says nothing new
    /// is not repeated within `ACK_QUIET_MS` (a room of 300 acks every heartbeat 3,000 times a
    /// second otherwise).
    last_ack: (PeerId, Term, u64, u64),
    /// The periodic announcement of a peer that misses something: when next, and how many
    /// times it was made since the last connect or controller (each doubles the wait).
    next_hello: u64,
    hellos_unanswered: u32,
    /// How many peers this one knew when it last considered announcing itself again.
    peers_at_hello: usize,
    /// Another process under our id that we told we stay (its key and incarnation): told once,
    /// and we give way if our chain's changes come to name it the member.
    rival: Option<(u64, u64)>,
    /// The key of another process under our id whose heartbeat we heard, of our term or later
    /// (see `rival_beat`): we give way if our chain's changes come to name it the member.
    rival_led: Option<u64>,
    /// How long our own broadcasts take to come back to us through the broker (rises at once,
    /// comes down slowly, and halves every `LAG_HALF_LIFE_MS` without a new sample): in a room of
    /// hundreds on a busy machine, the broker's queue delays every message by as much, and the
    /// election's timers stretch with it (see `wait_ms`).
    lag_ms: u64,
    /// When `lag_ms` was last sampled.
    lag_at: u64,
    /// The broadcast of ours being timed, and when it left.
    echo: Option<(Msg, u64)>,
    out: Vec<Action>,
}

/// An acknowledgement that moves nothing is sent at most this often (the controller's quorum
/// check looks back `election_max_ms`).
const ACK_QUIET_MS: u64 = 200;

/// A non-voting peer acknowledges the controller's blocks at most this often: enough for the
/// controller to know who could take a member's place.
const LEARNER_ACK_MS: u64 = 1_000;

/// The periodic announcement backs off up to this many doublings of `election_min_ms`.
const MAX_HELLO_BACKOFF: u32 = 5;

/// The most the broker's lag stretches a timer by: an echo lost (QoS 0) or a broker that stopped
/// must not stretch them for good.
const MAX_LAG_MS: u64 = 10_000;

/// The lag measured halves this often without a new sample: a follower times few broadcasts of
/// its own, and one measured while its room gathered must not slow its failovers for good.
const LAG_HALF_LIFE_MS: u64 = 5_000;

impl RoomNode {
    /// A node recovering `restored` from its disk (`Restored::default()` for a new one).
    pub fn new(cfg: RoomNodeConfig, restored: Restored) -> Self {
        let chain = restored_chain(cfg.alg, restored.config.as_ref(), restored.blocks);
        let commit = restored.commit.min(chain.height());
        let rng = StdRng::seed_from_u64(cfg.seed);
        let room_seen = chain.height() > 0;
        // The disk holds the term of the last vote, and blocks: a block of a later term was taken
        // from (and acknowledged to) that term's controller, so the term is at least the last
        // block's. Back in an older term, a restarted peer followed a deposed controller of it
        // and was asked to drop a committed block (simulator, 1 seed in a million).
        let last_term = chain.tip().map_or(0, |b| b.term);
        let (term, voted_for) =
            if last_term > restored.term { (last_term, None) } else { (restored.term, restored.voted_for) };
        let mut node = Self {
            rng,
            now: 0,
            term,
            voted_for,
            promised: if restored.voted_for.is_some() { restored.term } else { 0 },
            promised_to: restored.voted_for,
            chain,
            config: restored.config,
            members: None,
            commit,
            role: Role2::Follower,
            controller: None,
            heard_ms: 0,
            controller_gone: false,
            election_deadline: 0,
            peers: BTreeMap::new(),
            pre_term: 0,
            pre: BTreeSet::new(),
            last_pre_sent: 0,
            last_pre_answer: 0,
            term_since: 0,
            backoff: 0,
            backoff_since: 0,
            term_led: false,
            ballots: BTreeMap::new(),
            my_ballot: None,
            grant_deadline: None,
            grant_awaits_echo: false,
            deposed: false,
            grants: BTreeSet::new(),
            room_seen,
            discover_until: 0,
            proposal: None,
            gone_voters: 0,
            gone_peers: 0,
            acks: BTreeMap::new(),
            learners: BTreeMap::new(),
            became_ms: 0,
            next_beat: 0,
            open: None,
            pending: None,
            mining: None,
            submitted: None,
            genesis_offer: None,
            syncing: None,
            diverged: None,
            last_solution_ms: 0,
            commit_dirty: false,
            last_stale_reply: 0,
            last_ack: (0, 0, 0, 0),
            waiting: None,
            next_hello: 0,
            hellos_unanswered: 0,
            peers_at_hello: 0,
            rival: None,
            rival_led: None,
            last_reach: None,
            lag_ms: 0,
            lag_at: 0,
            echo: None,
            out: Vec::new(),
            cfg,
        };
        node.reset_election_timer();
        node.refresh_members();
        node
    }

    // ----- Queries -------------------------------------------------------------------------

    /// This peer's client id.
    pub fn id(&self) -> PeerId {
        self.cfg.id
    }

    /// This peer's key.
    pub fn key(&self) -> u64 {
        self.cfg.key
    }

    /// The current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// The vote cast in the current term.
    pub fn voted_for(&self) -> Option<PeerId> {
        self.voted_for
    }

    /// The controller of the current term, if known.
    pub fn controller(&self) -> Option<PeerId> {
        self.controller
    }

    /// True while this peer is the controller of its term.
    pub fn is_controller(&self) -> bool {
        self.role == Role2::Controller
    }

    /// The chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The configuration recorded in block 0.
    pub fn config(&self) -> Option<&RoomConfig> {
        self.config.as_ref()
    }

    /// The voting members: block 0's configuration with the chain's changes of members.
    pub fn members(&self) -> Option<&RoomConfig> {
        self.members.as_ref()
    }

    /// The voting members as of the chain's first `height` blocks (the committed ones, say).
    pub fn members_at(&self, height: u64) -> Option<RoomConfig> {
        let blocks =
            &self.chain.blocks()[..usize::try_from(height).unwrap_or(usize::MAX).min(self.chain.blocks().len())];
        self.config
            .as_ref()
            .map(|base| blocks.iter().filter_map(|b| b.change).fold(base.clone(), |m, c| m.apply(c).unwrap_or(m)))
    }

    /// Blocks known committed.
    pub fn commit(&self) -> u64 {
        self.commit
    }

    /// The open challenge (controller: issued; miner: mined).
    pub fn open(&self) -> Option<&Challenge> {
        if self.is_controller() { self.open.as_ref() } else { self.mining.as_ref() }
    }

    /// This peer's chain position.
    pub fn pos(&self) -> Pos {
        Pos { last_term: self.chain.tip().map_or(0, |b| b.term), height: self.chain.height() }
    }

    /// What this peer is doing, as its status shows it.
    pub fn role(&self) -> Role {
        match (self.role, self.controller) {
            (Role2::Controller, _) => Role::Controller,
            (_, Some(_)) => Role::Miner,
            _ if self.voters().is_some() => Role::Electing,
            _ => Role::Joining,
        }
    }

    /// Whether the voters this peer hears make a quorum (see `docs/PROTOCOL.md`, "waiting").
    pub fn reach(&self) -> Option<Reach> {
        let voters = self.voters()?;
        let recent = self.cfg.timing.election_max_ms * 2;
        let reachable = voters
            .members()
            .iter()
            .filter(|m| {
                m.id == self.cfg.id && m.key == self.cfg.key
                    || self
                        .peers
                        .get(&m.id)
                        .is_some_and(|p| p.key == m.key && !p.gone && self.now.saturating_sub(p.heard_ms) <= recent)
            })
            .count();
        Some(Reach { reachable, needed: voters.quorum(), voters: voters.len() })
    }

    /// How far this peer is from a quorum, while it has no controller and cannot reach one.
    ///
    /// As of the last [`Input::Tick`]: counting the reachable voters costs a lookup per voter,
    /// and the status is built after every input (in a room of 300, that alone took a third of
    /// the machine).
    pub fn waiting(&self) -> Option<crate::status::Waiting> {
        if self.controller_live() {
            return None;
        }
        self.waiting
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn next_timer(&self) -> u64 {
        // A controller has no election timer: it beats, and checks it hears a quorum.
        let mut t = if self.is_controller() { self.next_beat } else { self.election_deadline };
        if let Some(g) = self.grant_deadline {
            t = t.min(g);
        }
        if let Some((_, at, _, _)) = self.syncing {
            t = t.min(at + self.sync_retry_ms());
        }
        if self.may_bootstrap() && self.discover_until > self.now {
            t = t.min(self.discover_until);
        }
        t
    }

    /// This peer's status at `at_ms` (mining figures are the owner's to fill in).
    pub fn status(&self, at_ms: u64) -> Status {
        Status {
            version: crate::status::VERSION,
            id: self.cfg.id,
            incarnation: self.cfg.incarnation,
            role: self.role(),
            term: self.term,
            leader: self.controller,
            height: self.chain.height(),
            tx: self.open().map(|c| c.tx),
            difficulty: self.open().map(|c| c.difficulty),
            hash_rate: 0,
            hashes: 0,
            blocks_won: self.chain.won_by(self.cfg.id),
            threads: 0,
            started_ms: self.cfg.since_ms,
            at_ms,
            waiting: self.waiting(),
        }
    }

    /// The message to publish on a clean exit.
    pub fn farewell(&self) -> Msg {
        Msg::Leave { incarnation: self.cfg.incarnation }
    }

    // ----- Input ---------------------------------------------------------------------------

    /// Feeds one input that happened at `now` (monotonic ms) and returns what to do, in order.
    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Action> {
        self.now = self.now.max(now);
        match input {
            Input::Connected => self.connected(),
            Input::Message(env) => self.message(env),
            Input::Mined(found) => self.mined(found),
            Input::Tick => self.tick(),
            Input::Stalled => self.stalled(),
        }
        if std::mem::take(&mut self.commit_dirty) {
            self.out.push(Action::Persist(Write::Commit(self.commit)));
        }
        std::mem::take(&mut self.out)
    }

    fn publish(&mut self, msg: Msg) {
        // Time one broadcast at a time; one not back after `MAX_LAG_MS` was lost (QoS 0). Not a
        // solution: only the controller subscribes to them (a miner's never comes back to it).
        let small = !matches!(msg, Msg::Challenge { .. } | Msg::Result { .. } | Msg::Solution { .. });
        if self.echo.as_ref().is_some_and(|(timed, _)| *timed == msg) {
            // Sent again, so its echo no longer says which copy came back (the first may have
            // been lost): no sample, as TCP takes none from a retransmission (Karn's rule). One
            // such echo once measured a re-sent pre-ballot's period as the lag (seed 524450).
            self.echo = None;
        } else if small
            && !matches!(msg.channel(), Channel::Direct(_))
            && self.echo.as_ref().is_none_or(|(_, sent)| self.now >= sent + MAX_LAG_MS)
        {
            self.echo = Some((msg.clone(), self.now));
        }
        self.out.push(Action::Publish(msg));
    }

    /// One of our own messages came back through the broker: if it is the one being timed, the
    /// time it took is the broker's lag.
    fn echoed(&mut self, msg: &Msg) {
        if let Some((sent, at)) = &self.echo
            && sent == msg
        {
            let lag = self.now.saturating_sub(*at).min(MAX_LAG_MS);
            let before = self.measured_lag();
            self.lag_ms = if lag > before { lag } else { (before * 7 + lag) / 8 };
            self.lag_at = self.now;
            self.echo = None;
        }
    }

    /// How long the broadcast being timed has been out, while it is not presumed lost.
    fn echo_out(&self) -> Option<u64> {
        let (_, sent) = self.echo.as_ref()?;
        let out = self.now.saturating_sub(*sent);
        (out < self.echo_lost_after()).then_some(out)
    }

    /// Whether the broadcast being timed is one that `is` picks and is still in the broker's
    /// queue (out, not presumed lost).
    fn queued(&self, is: impl Fn(&Msg) -> bool) -> bool {
        self.echo_out().is_some() && self.echo.as_ref().is_some_and(|(m, _)| is(m))
    }

    /// A broadcast of ours out for this long is presumed lost: twice the lag measured last and
    /// an election timeout.
    fn echo_lost_after(&self) -> u64 {
        2 * self.measured_lag() + self.cfg.timing.election_max_ms
    }

    /// The lag measured, halved per `LAG_HALF_LIFE_MS` since.
    fn measured_lag(&self) -> u64 {
        let halvings = self.now.saturating_sub(self.lag_at) / LAG_HALF_LIFE_MS;
        self.lag_ms.checked_shr(u32::try_from(halvings).unwrap_or(u32::MAX)).unwrap_or(0)
    }

    /// The broker's lag as it stands: what was measured, or longer while a broadcast is out.
    fn lag(&self) -> u64 {
        let measured = self.measured_lag();
        let most = (2 * measured).max(self.cfg.timing.election_max_ms).min(MAX_LAG_MS);
        let out = self.echo.as_ref().map_or(0, |(_, sent)| self.now.saturating_sub(*sent).min(most));
        measured.max(out)
    }

    /// A timer of `base` ms, doubled per step of the election backoff and stretched by twice the
    /// broker's lag: a message and its answer each wait that long in its queue.
    fn wait_ms(&self, base: u64) -> u64 {
        (base << self.backoff) + 2 * self.lag()
    }

    fn persist(&mut self, write: Write) {
        self.out.push(Action::Persist(write));
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Action::Emit(event));
    }

    fn drop_msg(&mut self, reason: DropReason, detail: String) {
        self.emit(Event::dropped(reason, detail));
    }

    fn hello(&self, to: Option<PeerId>, want_reply: bool) -> Msg {
        Msg::Hello {
            to,
            want_reply,
            key: self.cfg.key,
            incarnation: self.cfg.incarnation,
            since_ms: self.cfg.since_ms,
            term: self.term,
            controller: self.controller,
            height: self.chain.height(),
        }
    }

    fn connected(&mut self) {
        // Clean sessions: whatever was in flight may be lost. Say again everything the room may
        // be waiting on.
        self.echo = None;
        self.publish(self.hello(None, true));
        self.hellos_unanswered = 0;
        self.next_hello = 0;
        // Whatever we heard of other peers before, an existing room may not have answered yet.
        self.discover_until = self.now + self.cfg.timing.discovery_ms;
        if let Some((peer, _, _, _)) = self.syncing.take() {
            self.request_sync(self.sync_target(peer));
        }
        if self.is_controller() {
            self.beat();
            if let Some(c) = self.open {
                self.publish_challenge(c);
            }
            // Our blocks not yet committed (two at most, see `accept_own`).
            for tx in self.commit..self.chain.height() {
                if let Some(block) = self.chain.get(tx).copied().filter(|b| b.term == self.term) {
                    let commit = self.commit;
                    self.publish(Msg::Result { term: self.term, outcome: Outcome::Accepted(block), commit });
                }
            }
            return;
        }
        if let Some(ballot) = self.my_ballot
            && self.controller.is_none()
        {
            self.publish_ballot(ballot);
        }
        if let Some(to) = self.voted_for.filter(|&c| c != self.cfg.id && self.controller.is_none())
            && let Some(to_key) = self.voters().and_then(|v| v.key_of(to))
        {
            self.publish(Msg::Grant { to, to_key, term: self.term, key: self.cfg.key });
        }
        if let (Some(c), Some(nonce)) = (self.mining, self.submitted) {
            self.publish(Msg::Solution { tx: c.tx, nonce });
        }
        // Silence while disconnected says nothing of the controller.
        self.heard_ms = self.now;
        self.reset_election_timer();
    }

    fn stalled(&mut self) {
        // Our broadcast's echo would time our own standstill, not the broker.
        self.echo = None;
        // What comes next is a backlog; a controller that stood still this long may have been
        // replaced, and must not act on it as controller.
        if self.is_controller() {
            self.step_down("stalled");
        }
        self.publish(self.hello(None, true));
    }

    fn tick(&mut self) {
        let now = self.now;
        self.decay_backoff();
        self.report_reach();
        if self.is_controller() {
            if now >= self.next_beat {
                self.beat();
                // A change of members does not wait for a hard challenge to be solved: it takes
                // the open transaction's place (its solutions come too late), which is issued
                // again on top of it once it is committed.
                if self.pending.is_none()
                    && let Some(change) = self.change_due()
                {
                    self.propose(change);
                }
            }
            self.check_quorum();
        } else if now >= self.election_deadline {
            self.reset_election_timer();
            if self.is_voter() {
                self.start_pre_vote();
            } else if !self.controller_live() && now >= self.next_hello {
                // Not (yet) a voter and no controller in sight: our hello or the answers to it
                // may have been lost. Announce ourselves again (only while something is missing;
                // see also `rival_beat`), less and less often: in
                // a room of hundreds still gathering, each one reaches every peer.
                self.back_off_hello();
                // Not while peers new to us keep coming (the room is gathering, and each one
                // learns of us from our answer to its hello), nor while our last one is still in
                // the broker's queue (see `lag`).
                let gathering = self.peers.len() > self.peers_at_hello;
                let queued = self.queued(|m| matches!(m, Msg::Hello { .. }));
                self.peers_at_hello = self.peers.len();
                if !gathering && !queued {
                    self.publish(self.hello(None, true));
                }
            }
        }
        if self.grant_deadline.is_some_and(|g| now >= g) {
            self.grant_deadline = None;
            self.try_grant(true);
        }
        if now >= self.discover_until {
            self.try_start_bootstrap();
        }
        if let Some((peer, at, _, _)) = self.syncing
            && now >= at + self.sync_retry_ms()
        {
            // Unanswered: ask again, our controller if we know one (the peer asked may be gone).
            self.syncing = None;
            self.request_sync(self.sync_target(peer));
        }
    }

    /// One step down of the election backoff per `BACKOFF_DECAY_MS` under a live controller.
    fn decay_backoff(&mut self) {
        if self.backoff > 0 && self.controller_live() && self.now >= self.backoff_since + BACKOFF_DECAY_MS {
            self.backoff -= 1;
            self.backoff_since = self.now;
        }
    }

    fn reset_election_timer(&mut self) {
        let t = self.cfg.timing;
        let base = self.rng.random_range(t.election_min_ms..=t.election_max_ms.max(t.election_min_ms));
        self.election_deadline = self.now + self.wait_ms(base);
    }

    fn report_reach(&mut self) {
        // A controller known gone (its will) or silent is no controller to wait with.
        if self.controller_live() {
            self.last_reach = None;
            self.waiting = None;
            return;
        }
        let Some(r) = self.reach() else {
            self.waiting = None;
            return;
        };
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        self.waiting = (r.reachable < r.needed).then(|| crate::status::Waiting {
            reachable: n(r.reachable),
            needed: n(r.needed),
            voters: n(r.voters),
        });
        let key = (r.reachable, r.needed);
        if self.last_reach != Some(key) && r.reachable < r.needed {
            self.emit(Event::QuorumWaiting { reachable: r.reachable, needed: r.needed, voters: r.voters });
        }
        self.last_reach = Some(key);
    }

    // ----- Membership ------------------------------------------------------------------------

    /// Records that `id` (with `key`) spoke; returns false if it must be ignored (a second
    /// process under a member's id).
    fn heard(&mut self, id: PeerId, key: Option<u64>) -> bool {
        let now = self.now;
        match (self.peers.get_mut(&id), key) {
            (Some(p), Some(k)) if p.key != k => {
                // Another key under a known id: keep the member's (or the first) one.
                let cfg_key = self.members.as_ref().and_then(|c| c.key_of(id));
                if cfg_key == Some(k) {
                    let revived = p.gone;
                    *p = Peer { key: k, incarnation: 0, gone: false, heard_ms: now, since: now };
                    if revived {
                        self.revived(id);
                    }
                    self.refresh_voters();
                    return true;
                }
                return false;
            }
            (Some(p), _) => {
                let revived = p.gone;
                p.gone = false;
                p.heard_ms = now;
                if revived {
                    p.since = now;
                }
                if revived {
                    self.revived(id);
                    self.refresh_voters();
                }
            }
            (None, Some(k)) => {
                self.peers.insert(id, Peer { key: k, incarnation: 0, gone: false, heard_ms: now, since: now });
                let members = self.peers.len() + 1;
                self.emit(Event::PeerJoined { id, members });
                self.refresh_voters();
            }
            (None, None) => {}
        }
        true
    }

    /// A peer counted gone spoke again: it is back (observers see it join, as they saw it leave).
    fn revived(&mut self, id: PeerId) {
        self.gone_peers -= 1;
        let members = self.peers.len() - self.gone_peers + 1;
        self.emit(Event::PeerJoined { id, members });
    }

    fn gone(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        if p.gone {
            return;
        }
        p.gone = true;
        self.gone_peers += 1;
        let members = self.peers.len() - self.gone_peers + 1;
        self.emit(Event::PeerLeft { id, members });
        self.refresh_voters();
        if self.controller == Some(id) && !self.is_controller() {
            // Its will: no need to wait for the election timer.
            self.controller_gone = true;
            self.election_deadline = self.now;
            self.start_pre_vote();
        }
        // A ballot this voter was waiting for will not come.
        self.try_grant(false);
    }

    /// The voters: the configuration of block 0, or before it the proposal (the `room_size`
    /// lowest ids among the live peers known, this one included) once enough are known.
    fn voters(&self) -> Option<&RoomConfig> {
        self.members.as_ref().or(self.proposal.as_ref().map(|(c, _)| c))
    }

    /// Recomputes the voting members from block 0's configuration and the chain's changes
    /// (after the configuration or the chain changed other than by an append).
    fn refresh_members(&mut self) {
        self.members = self.members_at(self.chain.height());
        self.check_rival();
        self.refresh_voters();
    }

    /// The digest of the proposal a ballot carries, before block 0.
    fn proposal_digest(&self) -> Option<Digest> {
        if self.config.is_some() { None } else { self.proposal.as_ref().map(|(_, d)| *d) }
    }

    /// Recomputes what depends on the set of peers (called when it changes, not per message).
    fn refresh_voters(&mut self) {
        self.proposal = None;
        // Cheap test first: this runs for every peer met, and most of them complete nothing.
        let live = self.peers.len() - self.gone_peers + 1;
        if live >= self.cfg.room_size && self.config.is_none() && !self.room_seen && self.chain.height() == 0 {
            let mut live: Vec<Member> = self
                .peers
                .iter()
                .filter(|(_, p)| !p.gone)
                .map(|(&id, p)| Member { id, key: p.key })
                .chain(std::iter::once(Member { id: self.cfg.id, key: self.cfg.key }))
                .collect();
            if live.len() >= self.cfg.room_size {
                live.sort();
                live.truncate(self.cfg.room_size);
                self.proposal = RoomConfig::new(live).map(|c| {
                    let d = c.digest(HashAlg::Sha256);
                    (c, d)
                });
            }
        }
        let gone = |m: &Member| self.peers.get(&m.id).is_some_and(|p| p.gone || p.key != m.key);
        self.gone_voters =
            self.voters().map_or(0, |v| v.members().iter().filter(|m| m.id != self.cfg.id && gone(m)).count());
    }

    /// The room has a chain: never found another.
    fn saw_room(&mut self) {
        if !self.room_seen {
            self.room_seen = true;
            self.refresh_voters();
        }
    }

    fn is_voter(&self) -> bool {
        self.voters().is_some_and(|v| v.contains(self.cfg.id, self.cfg.key))
    }

    fn is_voter_id(&self, id: PeerId, key: u64) -> bool {
        self.voters().is_some_and(|v| v.contains(id, key))
    }

    fn quorum(&self) -> usize {
        self.voters().map_or(usize::MAX, |v| v.quorum())
    }

    // ----- Messages --------------------------------------------------------------------------

    fn message(&mut self, env: Envelope) {
        let from = env.from;
        if from == self.cfg.id {
            self.own_id_message(env.msg);
            return;
        }
        match env.msg {
            Msg::Hello { want_reply, key, incarnation, term, controller, height, .. } => {
                self.on_hello(from, want_reply, key, incarnation, term, controller, height);
            }
            Msg::Leave { incarnation } => {
                // A will fired late, after the peer restarted and said hello, is not its departure.
                if self.peers.get(&from).is_some_and(|p| p.incarnation == incarnation || p.incarnation == 0) {
                    self.gone(from);
                }
            }
            Msg::PreBallot { to, term, key, pos } => {
                if to.is_none_or(|t| t == self.cfg.id) && self.heard(from, Some(key)) {
                    self.on_pre_ballot(from, key, term, pos);
                }
            }
            Msg::Ballot { term, ballot, key, pos, proposal } => {
                if self.heard(from, Some(key)) {
                    self.on_ballot(from, key, term, Ballot { ballot, pos, proposal });
                }
            }
            Msg::Grant { to, to_key, term, key } => {
                if to == self.cfg.id && to_key == self.cfg.key && self.heard(from, Some(key)) {
                    self.on_grant(from, key, term);
                }
            }
            Msg::Ack { to, term, height, key } if to == self.cfg.id => self.ack_to_us(from, key, term, height),
            // To another controller.
            Msg::Ack { .. } => {}
            Msg::Heartbeat { term, height, commit, tip, open, .. } => {
                self.heard(from, None);
                if self.accept_controller(from, term, "heartbeat") {
                    self.on_heartbeat(from, height, commit, tip, open);
                } else {
                    self.sync_from_unknown_controller(from, height);
                }
            }
            Msg::Challenge { challenge, commit, config } => {
                self.heard(from, None);
                if self.accept_controller(from, challenge.term, "challenge") {
                    self.on_challenge(from, challenge, commit, config);
                }
            }
            Msg::Result { term, outcome, commit } => {
                self.heard(from, None);
                if let Outcome::Accepted(block) = outcome
                    && self.accept_controller(from, term, "result")
                {
                    self.on_block(from, block, commit);
                }
            }
            Msg::Solution { tx, nonce } => self.on_solution(from, tx, nonce),
            Msg::SyncRequest { to, from: start, req, key } => {
                if to == self.cfg.id {
                    // Answered whoever asks (a member back with its disk lost catches up too),
                    // but only the member's own key says the member is alive.
                    let member = self.heard(from, Some(key)) && self.is_voter_id(from, key);
                    self.on_sync_request(from, start, req, member);
                }
            }
            Msg::SyncReply { to, req, term, config, blocks, height, commit, open } => {
                if to == self.cfg.id {
                    self.heard(from, None);
                    let (asked, before) = (self.syncing, (self.chain.height(), self.tip()));
                    self.on_sync_reply(from, req, term, config, blocks, height, commit, open);
                    self.keep_asking(asked, before, height);
                }
            }
        }
    }

    /// A message under our own id: our own broadcast come back through the broker, or another
    /// process's hello or heartbeat (its key or incarnation is not ours).
    fn own_id_message(&mut self, msg: Msg) {
        match msg {
            Msg::Hello { key, incarnation, since_ms, .. }
                if key != self.cfg.key || incarnation != self.cfg.incarnation =>
            {
                self.impostor(key, incarnation, since_ms);
            }
            Msg::Heartbeat { key, term, height, .. } if key != self.cfg.key => self.rival_beat(key, term, height),
            msg => {
                self.echoed(&msg);
                // A grant may have waited for it (see `try_grant`).
                self.try_grant(false);
            }
        }
    }

    /// An acknowledgement addressed to us: a member's, or one from a peer that may replace one.
    fn ack_to_us(&mut self, from: PeerId, key: u64, term: Term, height: u64) {
        if self.heard(from, Some(key)) {
            self.on_ack(from, key, term, height);
        } else if self.is_controller() {
            // A member's id under another key (the member back with its disk lost, or a
            // copy): not that member, but it may take its place. Whatever its term: it
            // never voted in the room, though it may have gone on to terms of its own
            // while it took itself for the member (seed 764004).
            self.learner_ack(from, key, height);
        }
    }

    /// A heartbeat whose sender we do not accept as controller: whether to ask it for blocks.
    fn sync_from_unknown_controller(&mut self, from: PeerId, height: u64) {
        if self.config.is_some() && !self.may_lead(from) && height > self.chain.height() {
            // A controller that our chain does not show as a member (yet): the room may
            // have added it in blocks we lack. We take them, appended only (as from any
            // peer that is not our controller), and follow it once they say it is one.
            // Whatever its term: a member removed in those blocks may have gone on to
            // terms of its own, which its pre-votes never win (seed 106535).
            // It has them: a request to anyone else gives way.
            self.request_sync_now(from);
        }
    }

    /// Another process announced itself under our id.
    fn impostor(&mut self, key: u64, incarnation: u64, since_ms: u64) {
        if key == self.cfg.key {
            // Our own data directory in another process (copied, or run twice): nothing can tell
            // the two apart; the earlier one stays.
            if (since_ms, incarnation) < (self.cfg.since_ms, self.cfg.incarnation) {
                let id = self.cfg.id;
                self.out.push(Action::Fatal(format!(
                    "another process runs with this data directory's identity (client id {id}); stop it, or give this peer its own --data-dir"
                )));
            }
            return;
        }
        // Two data directories under one id. The one the members name (as our chain's changes
        // leave them, not as block 0 had them) stays; otherwise the process that started first.
        let member = self.members.as_ref().and_then(|c| c.key_of(self.cfg.id));
        let we_stay = match member {
            Some(k) if k == self.cfg.key => true,
            Some(k) if k == key => false,
            _ => (since_ms, incarnation) > (self.cfg.since_ms, self.cfg.incarnation),
        };
        let id = self.cfg.id;
        if !we_stay {
            self.give_way();
        } else if self.rival != Some((key, incarnation)) {
            // Once per process: when our chain is behind, both sides may think they stay, and
            // each answer would draw another (seed 764004). The chain we then sync decides.
            self.rival = Some((key, incarnation));
            self.drop_msg(DropReason::DuplicateId, format!("another process claims our client id {id}; it gives way"));
            self.publish(self.hello(None, false));
        }
    }

    /// A process under our id with another data directory controls a term (or says so: a
    /// forger may). A quorum granted it only if their chains name it the member, so when it is
    /// in our term or a later one, ours is behind: we ask the room where it stands (the answers
    /// name the term and a height, see `on_hello`) and sync from whoever answers. Every request
    /// to our id would reach that controller as if from itself, and its answers would look like
    /// our own echoes (seed 736493: the old process, back, voted for the other voter in the
    /// term the new one won, then pre-voted alone for good). Once our blocks name its key the
    /// member, we give way.
    fn rival_beat(&mut self, key: u64, term: Term, height: u64) {
        let id = self.cfg.id;
        // Our term may be hearsay: without the configuration, a forger's (seed 807713).
        if self.is_controller() || (term < self.term && !self.term_is_hearsay()) {
            self.drop_msg(
                DropReason::DuplicateId,
                format!("heartbeat of term {term} from another process under our id {id}"),
            );
            return;
        }
        self.rival_led = Some(key);
        self.check_rival();
        if height > self.chain.height() && self.now >= self.next_hello {
            self.back_off_hello();
            self.publish(self.hello(None, true));
        }
    }

    /// When the next hello that asks for answers may go out, if those to this one do not come:
    /// each waits twice as long as the last (up to `MAX_HELLO_BACKOFF` doublings of
    /// `election_min_ms`).
    fn back_off_hello(&mut self) {
        self.hellos_unanswered = (self.hellos_unanswered + 1).min(MAX_HELLO_BACKOFF);
        self.next_hello = self.now + (self.cfg.timing.election_min_ms << self.hellos_unanswered) + 2 * self.lag();
    }

    /// We know no configuration, so our term may be a forger's, and we promised nothing in it.
    fn term_is_hearsay(&self) -> bool {
        self.voters().is_none() && self.term > self.promised
    }

    fn give_way(&mut self) {
        let id = self.cfg.id;
        self.out.push(Action::Fatal(format!(
            "client id {id} is already used by another peer in this room; pick another with --id"
        )));
    }

    /// The members changed: a process under our id that we thought gave way, or that leads a
    /// term, may be the member.
    fn check_rival(&mut self) {
        let member = self.members.as_ref().and_then(|m| m.key_of(self.cfg.id));
        if member.is_some() && (member == self.rival.map(|(key, _)| key) || member == self.rival_led) {
            self.give_way();
        }
    }

    /// A hello from another peer (its `since_ms` matters only for one under our own id, see
    /// `impostor`).
    #[allow(clippy::too_many_arguments)]
    fn on_hello(
        &mut self,
        from: PeerId,
        want_reply: bool,
        key: u64,
        incarnation: u64,
        term: Term,
        controller: Option<PeerId>,
        height: u64,
    ) {
        // Whether it knows us already: then a repeated hello (its periodic one, see `tick`, or
        // after a reconnect of the same process, even one its will called gone) is answered only
        // by whoever knows more of the room than it says it does. In a room of 300 whose broker
        // lagged, clients gave up on their pings and reconnected by the thousand, and 299
        // answers to each fed the lag.
        let known = self.peers.get(&from).is_some_and(|p| p.key == key && p.incarnation == incarnation);
        if !self.heard(from, Some(key)) {
            self.on_stranger_hello(from, want_reply, controller, height);
            return;
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.incarnation = incarnation;
        }
        let news = !known || self.is_controller() || (self.term, self.chain.height()) > (term, height);
        if want_reply && news {
            self.publish(self.hello(Some(from), false));
            if self.is_controller() {
                // It has just subscribed: what it missed of the open transaction, it gets now.
                self.beat();
                if let Some(c) = self.open {
                    self.publish_challenge(c);
                }
            }
        }
        if height > 0 {
            self.saw_room();
        }
        self.learn_controller(term, controller);
        if height > self.chain.height() {
            self.sync_after_hello(from);
        }
        self.try_start_bootstrap();
    }

    /// A hello from a process under a member's id with another data directory (a copy of the
    /// id, or the member back with its disk lost): not that member. It still learns from our
    /// answer that this room exists, so it never founds another.
    fn on_stranger_hello(&mut self, from: PeerId, want_reply: bool, controller: Option<PeerId>, height: u64) {
        self.drop_msg(DropReason::DuplicateId, format!("hello from {from} under a key that is not its member's"));
        if height > 0 || controller.is_some() {
            // Whoever it is, it speaks for a room that exists.
            self.saw_room();
        }
        if want_reply {
            self.publish(self.hello(Some(from), false));
        }
    }

    /// What a hello says of the room's term and controller: whether to enter its term, and
    /// whom to follow.
    fn learn_controller(&mut self, term: Term, controller: Option<PeerId>) {
        // A hint naming someone who cannot lead (its sender was fooled by a forger) is ignored.
        let controller = controller.filter(|&c| self.may_lead(c));
        if let Some(c) = controller
            && term > self.term
        {
            // A newcomer (or a peer back from a partition) learns the room's term and controller.
            // One under our id is another process, with another data directory, that the room
            // made the member in blocks we lack: our requests to it would look like its own
            // echoes, so we sync from the sender (see `sync_after_hello`), and the blocks say who
            // stays (seed 341113: we asked our controller of the term before, long dead, and
            // stayed behind).
            self.enter_term(term);
            if c != self.cfg.id {
                self.follow_controller(c);
            }
        } else if let Some(c) = controller
            && term == self.term
            && self.controller.is_none()
            && c != self.cfg.id
            && self.my_ballot.is_none()
        {
            self.follow_controller(c);
        }
    }

    /// The sender of a hello has blocks we lack: whom to ask for them, it or our controller.
    fn sync_after_hello(&mut self, from: PeerId) {
        match self.controller.filter(|_| self.controller_live()) {
            Some(c) if c != self.cfg.id => self.request_sync(c),
            // Without a live controller, take the blocks of whoever has them (only a
            // controller can make us drop any): without block 0 we know neither the room's
            // voters nor whether we are one, and a member added in blocks we lack does not
            // know it votes. (Seed 306646: a peer without block 0 had followed a forger,
            // silent since, and kept asking it.) A voter goes before a stranger we asked
            // last (seed 108701: a forger's heartbeat of a long chain drew every retry), or
            // before a controller fallen silent that we asked (seed 807713: a forger again).
            None => {
                // (Our controller, if any, is silent here.)
                let stale = self.syncing.is_some_and(|(to, ..)| !self.may_lead(to) || self.controller == Some(to));
                if self.may_lead(from) && stale {
                    self.request_sync_now(from);
                } else {
                    self.request_sync(from);
                }
            }
            _ => {}
        }
    }

    // ----- Election ----------------------------------------------------------------------------

    /// Before block 0: once the proposal is complete and this peer has listened for an existing
    /// room long enough since it connected, start the first election.
    fn try_start_bootstrap(&mut self) {
        if self.may_bootstrap() && self.now >= self.discover_until {
            self.start_pre_vote();
        }
    }

    /// This peer could found the room: no chain, no room seen, no term, and it is in the proposal.
    /// (A peer still listening may answer another's pre-ballot: that peer has listened.)
    fn may_bootstrap(&self) -> bool {
        self.config.is_none() && self.term == 0 && self.controller.is_none() && self.is_voter()
    }

    /// True when this peer has a controller it heard recently (its lease).
    fn controller_live(&self) -> bool {
        match self.controller {
            Some(c) if c == self.cfg.id => self.is_controller(),
            Some(_) => {
                !self.controller_gone && self.now < self.heard_ms + self.wait_ms(self.cfg.timing.election_min_ms)
            }
            None => false,
        }
    }

    /// Whether this term's election still has its time (see `on_pre_ballot`): no pre-vote for
    /// the next term yet, unless the controller is known gone.
    fn patient(&self) -> bool {
        self.term > 0
            && !self.controller_gone
            && self.now < self.term_since + self.wait_ms(self.cfg.timing.election_min_ms)
    }

    fn start_pre_vote(&mut self) {
        if !self.is_voter() || self.controller_live() || self.patient() {
            return;
        }
        if self.config.is_none() && self.term == 0 && self.now < self.discover_until {
            // Founding a room: not before we have listened for one (see `try_start_bootstrap`).
            return;
        }
        let next = self.term + 1;
        if self.pre_term != next {
            self.pre_term = next;
            self.pre.clear();
        }
        let first = self.pre.insert(self.cfg.id);
        if first {
            self.emit(Event::PreVote { term: next });
        }
        // Sent again when an election timeout passed since the last one: a lost pre-ballot must
        // not stall the room. Not more often (this runs on every hello of a room gathering),
        // nor while the last one is still in the broker's queue: in a room of hundreds on a busy
        // machine, repeats would only lengthen it.
        let due = self.now >= self.last_pre_sent + self.wait_ms(self.cfg.timing.election_min_ms);
        let queued = self.queued(|m| matches!(m, Msg::PreBallot { term, .. } if *term == next));
        if first || (due && !queued) {
            self.last_pre_sent = self.now;
            self.publish(Msg::PreBallot { to: None, term: next, key: self.cfg.key, pos: self.pos() });
        }
        self.check_pre_vote();
    }

    fn on_pre_ballot(&mut self, from: PeerId, key: u64, term: Term, pos: Pos) {
        if pos.height > 0 && self.config.is_none() {
            self.saw_room();
            self.request_sync(from);
        } else if !self.controller_live()
            && pos.last_term > self.pos().last_term
            && !self.is_voter_id(from, key)
            && self.members_at(self.commit).is_some_and(|m| m.contains(from, key))
        {
            // A voter as of our commit point, which blocks of ours above it removed, and whose
            // last block is of a later term than ours: those blocks may be a deposed
            // controller's, which the room replaced. We would never count its votes again (seed
            // 831887: two voters of three never elected). We ask it for its blocks from our
            // commit point: those it holds committed replace ours (see `on_sync_reply`).
            self.diverge();
            self.request_sync_now(from);
        } else if pos.height > self.chain.height() && !self.controller_live() {
            // No controller to take blocks from, and the room elects: a member added in blocks
            // we lack does not know it votes until it has them (seed 75280). A voter that has
            // them goes before whoever we asked last (it may be gone for good: seed 883269).
            self.request_sync_now(from);
        }
        if !self.is_voter_id(from, key) {
            return;
        }
        if term > self.term + 1 {
            // The sender reached term - 1 (through a quorum's pre-votes, or its controller): a
            // newer term is always safe to enter, and we can then join its pre-vote. Its
            // election happened without us: no patience owed to it (see `patient`), or in a
            // room of two whose ballot of that term was lost, both wait out ever longer timeouts.
            self.enter_term(term - 1);
            self.term_since = self.now.saturating_sub(self.wait_ms(self.cfg.timing.election_min_ms));
        }
        if term <= self.term {
            // The sender is behind us. If we look for a controller too, our pre-ballot tells it
            // our term, so the two of us do not each wait in a term of our own. To it alone: in a
            // room of 300 whose broker lags, answers to everyone snowball.
            let looking = self.is_voter() && !self.controller_live() && !self.patient();
            if looking && self.now >= self.last_pre_answer + self.cfg.timing.heartbeat_ms {
                self.last_pre_answer = self.now;
                let next = self.term + 1;
                self.publish(Msg::PreBallot { to: Some(from), term: next, key: self.cfg.key, pos: self.pos() });
            }
            return;
        }
        if self.pre_term != term {
            self.pre_term = term;
            self.pre.clear();
        }
        self.pre.insert(from);
        // A term's election gets its time: a voter does not help start the next one until its own
        // election timeout passed since it entered this term (or the controller is known gone).
        // In a large room the ballots of a term take long to arrive everywhere, and peers that
        // granted elsewhere would otherwise move the room on as soon as a controller was elected,
        // before its first heartbeat reached them (seen with 100 peers: 100 terms in 15 s).
        if !self.pre.contains(&self.cfg.id) && self.is_voter() && !self.controller_live() && !self.patient() {
            self.pre.insert(self.cfg.id);
            self.emit(Event::PreVote { term });
            self.last_pre_sent = self.now;
            self.publish(Msg::PreBallot { to: None, term, key: self.cfg.key, pos: self.pos() });
        }
        self.check_pre_vote();
    }

    fn check_pre_vote(&mut self) {
        if self.pre_term == self.term + 1 && self.pre.contains(&self.cfg.id) && self.pre.len() >= self.quorum() {
            let term = self.pre_term;
            self.enter_term(term);
            self.cast_ballot();
        }
    }

    /// Moves to a newer term: no vote yet, no controller known.
    fn enter_term(&mut self, term: Term) {
        debug_assert!(term > self.term);
        if self.is_controller() {
            self.step_down("newer term");
        }
        if !self.term_led && self.my_ballot.is_some() {
            self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
            self.backoff_since = self.now;
        }
        self.term = term;
        self.term_since = self.now;
        self.term_led = false;
        self.voted_for = None;
        // Not written now: a new term promises nothing until this peer grants in it, and the
        // grant writes the term with the vote (one fsync instead of two on an election's path).
        self.controller = None;
        self.controller_gone = false;
        self.ballots.clear();
        self.grants.clear();
        self.deposed = false;
        self.my_ballot = None;
        self.pre.clear();
        self.heard_ms = self.now;
        // Longer when the broker lags: ballots take that long to go round. Not doubled by the
        // backoff, as the election timer is: the voters' backoffs differ, and a deadline of one
        // voter past another's election timeout splits every term (seed 128203).
        self.grant_deadline = Some(self.now + self.cfg.timing.ballot_wait_ms + 2 * self.lag());
        self.grant_awaits_echo = false;
        self.reset_election_timer();
    }

    fn cast_ballot(&mut self) {
        if !self.is_voter() || self.my_ballot.is_some() || self.controller.is_some() {
            return;
        }
        let ballot = self.rng.random();
        self.my_ballot = Some(ballot);
        let proposal = self.proposal_digest();
        self.ballots.insert(self.cfg.id, Ballot { ballot, pos: self.pos(), proposal });
        self.emit(Event::VoteCast { term: self.term, vote: ballot });
        self.publish_ballot(ballot);
        self.try_grant(false);
    }

    fn publish_ballot(&mut self, ballot: u32) {
        let proposal = self.proposal_digest();
        let msg = Msg::Ballot { term: self.term, ballot, key: self.cfg.key, pos: self.pos(), proposal };
        self.publish(msg);
    }

    fn on_ballot(&mut self, from: PeerId, key: u64, term: Term, ballot: Ballot) {
        if term < self.term {
            return;
        }
        if !self.is_voter_id(from, key) {
            self.try_start_bootstrap();
            if !self.is_voter_id(from, key) {
                self.drop_msg(DropReason::NotAVoter, format!("ballot from {from} in term {term}"));
                return;
            }
        }
        if term > self.term {
            self.enter_term(term);
        }
        if ballot.pos.height > 0 && self.config.is_none() {
            // A room with a chain exists: never found another; take its blocks.
            self.saw_room();
            self.request_sync(from);
        }
        // One ballot per voter and term: the first stands. A new one says the election is still
        // under way: the term's patience (see `patient`) starts again from it (at most once per
        // voter and term; not our election timer, or a voter that moved past a deposed
        // controller's term waited on it with the rest, seed 23207). In a room of hundreds on a broker that takes seconds to
        // deliver a term's ballots, voters otherwise gave up on the term before its ballots were
        // all in, and the next term's pre-votes lengthened the broker's queue further.
        if let std::collections::btree_map::Entry::Vacant(e) = self.ballots.entry(from) {
            e.insert(ballot);
            if self.controller.is_none() {
                self.term_since = self.now;
            }
        }
        if self.controller.is_none() {
            self.cast_ballot();
        }
        self.try_grant(false);
    }

    /// Grants this term's vote once every live voter's ballot is in, or `deadline` passed.
    fn try_grant(&mut self, deadline: bool) {
        if self.voted_for.is_some() || self.controller.is_some() || self.term == 0 || !self.is_voter() {
            return;
        }
        let Some(voters) = self.voters() else { return };
        // The ballots held are voters' only (others are refused), ours included.
        let waiting = self.ballots.len() < voters.len().saturating_sub(self.gone_voters);
        let past = deadline || self.grant_deadline.is_none() || self.grant_awaits_echo;
        // Past the deadline, still not before a quorum's ballots are in: a voter that grants on
        // fewer grants the best of what reached it first, often its own, and in a room of
        // hundreds whose ballots take seconds to go round, every voter then granted itself.
        if waiting && !(past && self.ballots.len() >= voters.quorum()) {
            return;
        }
        // Nor while a broadcast of ours is still in the broker's queue: the ballots sent before
        // ours (most, in an election that starts everywhere at once) reach us before it does.
        if let Some(out) = self.echo_out().filter(|_| waiting) {
            self.grant_deadline = Some(self.now + self.echo_lost_after() - out);
            self.grant_awaits_echo = true;
            return;
        }
        let mine = self.pos();
        let proposal = self.proposal_digest();
        let best = self
            .ballots
            .iter()
            .filter(|(_, b)| b.pos >= mine && (self.config.is_some() || b.proposal == proposal))
            // The most up-to-date candidates first: every voter can grant them, so the room
            // converges on one (a voter behind the others that drew the highest ballot would
            // otherwise grant itself, in vain, and split the term). Among equals, the lab's rule.
            .max_by_key(|(id, b)| (b.pos, b.ballot, **id))
            .map(|(id, _)| *id);
        let Some(to) = best else { return };
        let to_key = voters.key_of(to).unwrap_or_default();
        self.voted_for = Some(to);
        self.persist(Write::Vote { term: self.term, voted_for: Some(to) });
        self.promised = self.term;
        self.promised_to = Some(to);
        self.emit(Event::VoteGranted { term: self.term, to });
        if to == self.cfg.id {
            self.grants.insert(to);
            self.check_won();
        } else {
            self.publish(Msg::Grant { to, to_key, term: self.term, key: self.cfg.key });
        }
    }

    fn on_grant(&mut self, from: PeerId, key: u64, term: Term) {
        if term != self.term || self.my_ballot.is_none() || !self.is_voter_id(from, key) {
            return;
        }
        self.grants.insert(from);
        self.check_won();
    }

    fn check_won(&mut self) {
        if self.deposed || self.is_controller() || self.controller.is_some() || self.grants.len() < self.quorum() {
            return;
        }
        if !self.is_voter() {
            // Our chain took a block that removed us after we ran (a sync of blocks the voters
            // that granted us did not have yet): no member, no controller (seed 573124).
            return;
        }
        let Some(voters) = self.voters().cloned() else { return };
        if !self.grants.iter().all(|&g| voters.key_of(g).is_some()) {
            return;
        }
        self.role = Role2::Controller;
        self.controller = Some(self.cfg.id);
        self.term_led = true;
        self.backoff_since = self.now;
        self.syncing = None;
        self.became_ms = self.now;
        self.acks.clear();
        self.learners.clear();
        self.pending = None;
        self.grant_deadline = None;
        self.emit(Event::LeaderElected { term: self.term, leader: self.cfg.id, votes: self.grants.len() });
        self.out.push(Action::StopMining);
        self.mining = None;
        self.submitted = None;
        if self.config.is_none() {
            // The first controller records the configuration it was elected by.
            self.config = Some(voters);
            self.refresh_members();
        }
        self.beat();
        self.issue();
    }

    fn step_down(&mut self, why: &str) {
        if !self.is_controller() {
            return;
        }
        self.emit(Event::QuorumLost { term: self.term, reason: why.into() });
        self.role = Role2::Follower;
        self.controller = None;
        // Not controller of this term again: a grant sent again late (a voter back from a
        // restart) would otherwise complete the old quorum, and a controller that stood down
        // would act in a term the room has left.
        self.grants.clear();
        self.deposed = true;
        self.open = None;
        self.pending = None;
        if self.chain.height() == 0 {
            // The configuration is recorded only with block 0: none was taken yet.
            self.config = None;
            self.refresh_members();
        }
        self.heard_ms = self.now;
        self.reset_election_timer();
    }

    fn check_quorum(&mut self) {
        let window = self.wait_ms(self.cfg.timing.election_max_ms);
        if self.now < self.became_ms + window {
            return;
        }
        let Some(voters) = self.voters() else { return };
        let heard = voters
            .members()
            .iter()
            .filter(|m| m.id == self.cfg.id || self.acks.get(&m.id).is_some_and(|&(_, at)| self.now < at + window))
            .count();
        if heard < voters.quorum() {
            self.step_down("no quorum heard");
        }
    }

    // ----- Controller ----------------------------------------------------------------------------

    fn tip(&self) -> Digest {
        self.chain.tip_hash(self.chain.alg(self.cfg.alg))
    }

    fn beat(&mut self) {
        self.next_beat = self.now + self.cfg.timing.heartbeat_ms;
        let (height, commit, tip) = (self.chain.height(), self.commit, self.tip());
        let open = self.open.map(|c| c.tx);
        self.publish(Msg::Heartbeat { term: self.term, key: self.cfg.key, height, commit, tip, open });
    }

    fn publish_challenge(&mut self, c: Challenge) {
        let config = (c.tx == 0).then(|| self.config.clone()).flatten();
        self.publish(Msg::Challenge { challenge: c, commit: self.commit, config });
    }

    /// Opens the next transaction, once the last block is committed (or re-issues the open one).
    fn issue(&mut self) {
        if !self.is_controller() || self.pending.is_some() {
            return;
        }
        if let Some(change) = self.change_due() {
            self.propose(change);
            return;
        }
        let tx = self.chain.height();
        let alg = self.chain.alg(self.cfg.alg);
        let prev = match (&self.config, tx) {
            (Some(config), 0) => config.digest(alg),
            _ => self.tip(),
        };
        let term = self.term;
        let c = match self.open {
            Some(c) if c.tx == tx && c.prev == prev => Challenge { term, ..c },
            _ => {
                let pace = self.cfg.pace;
                let difficulty = pace.next(self.chain.blocks()).unwrap_or_else(|| {
                    let (lo, hi) = pace.bounds();
                    self.rng.random_range(lo..=hi)
                });
                Challenge { term, tx, alg, difficulty, pace, issued_ms: self.now, prev }
            }
        };
        self.open = Some(c);
        self.emit(Event::ChallengeIssued { term, tx, difficulty: c.difficulty });
        self.publish_challenge(c);
    }

    fn learner_ack(&mut self, from: PeerId, key: u64, height: u64) {
        let height = height.min(self.chain.height());
        self.learners.insert(from, Learner { key, height, at: self.now });
    }

    /// The change of members due now, if any (controller, between two blocks): a live
    /// non-voting peer in for a missing member; or out, a member not heard from for
    /// `replace_after_ms`, when a live non-voting peer can take its place. One change at a
    /// time: none while one is uncommitted (every block is, here), and none before a block of
    /// this term is committed (the condition Raft's single-server changes need, §4.1).
    fn change_due(&self) -> Option<Change> {
        let after = self.cfg.timing.replace_after_ms;
        let members = self.members.as_ref()?;
        if after == 0 || self.commit < self.chain.height() {
            return None;
        }
        if self.chain.get(self.commit.checked_sub(1)?).is_none_or(|b| b.term != self.term) {
            return None;
        }
        let live = |at: u64| self.now < at + after;
        // The live non-voting peer longest in the room; the furthest behind last (a newcomer
        // still syncing, say: it acknowledges once a second, so its height is a little old).
        let newcomer = self
            .learners
            .iter()
            .filter(|(id, l)| live(l.at) && members.key_of(**id).is_none())
            .min_by_key(|(id, l)| {
                let behind = self.commit.saturating_sub(l.height) > MAX_SYNC_BLOCKS as u64;
                (behind, self.peers.get(id).map_or(self.now, |p| p.since), **id)
            })
            .map(|(&id, l)| Change::Add { id, key: l.key });
        if members.len() < self.cfg.room_size {
            return newcomer;
        }
        let since = |id: PeerId| self.acks.get(&id).map_or(0, |a| a.1).max(self.became_ms);
        let heir = |m: &Member| self.learners.get(&m.id).is_some_and(|l| live(l.at) && l.key != m.key);
        let silent = members
            .members()
            .iter()
            .find(|m| m.id != self.cfg.id && !live(since(m.id)) && (newcomer.is_some() || heir(m)))?;
        Some(Change::Remove { id: silent.id, key: silent.key })
    }

    /// Appends and sends a block that changes the room's members; the next challenge waits
    /// until it is committed.
    fn propose(&mut self, change: Change) {
        let (tx, alg) = (self.chain.height(), self.chain.alg(self.cfg.alg));
        let block = Block::change(tx, self.term, alg, self.cfg.pace, self.now, self.tip(), change);
        // A member just added has `replace_after_ms` to be heard from, as any at an election.
        match change {
            Change::Add { id, .. } => self.acks.insert(id, (0, self.now)),
            Change::Remove { id, .. } => self.acks.remove(&id),
        };
        self.accept_own(block, "change of members");
    }

    /// Sends, appends and counts a block of ours. The next transaction is issued at once when
    /// every block below this one is committed (a pipeline of one: the quorum writes the block
    /// while the miners search for the next), and otherwise waits for this one's commit; so is
    /// the next after a change of members (one change at a time, and each alone in flight).
    fn accept_own(&mut self, block: Block, what: &str) {
        // The result goes out before our own write, so the followers write the block while we
        // do (Raft's leader may write in parallel with replication, §10.2.1). The next challenge
        // comes after the write (see the peer's store: a message waits for the writes before it).
        self.publish(Msg::Result { term: self.term, outcome: Outcome::Accepted(block), commit: self.commit });
        if let Err(e) = self.append(block) {
            self.drop_msg(DropReason::InvalidBlock, format!("our own {what} {}: {e}", block.tx));
            return;
        }
        self.pending = Some(block.tx);
        self.check_commit();
        if self.pending.is_some() && block.change.is_none() && self.commit >= block.tx {
            self.pending = None;
            self.issue();
        }
    }

    fn on_solution(&mut self, miner: PeerId, tx: TxId, nonce: u64) {
        if !self.is_controller() {
            return;
        }
        let term = self.term;
        let verdict = match self.open {
            _ if tx < self.chain.height() || self.pending == Some(tx) => Err(RejectReason::AlreadySolved),
            Some(c) if c.tx == tx => {
                let hash = pow::proof(&c.prev, tx, miner, nonce);
                if hash.leading_zeros() >= u32::from(c.difficulty) {
                    let solved_ms = self.now.max(c.issued_ms);
                    let (alg, difficulty, pace, issued_ms, prev) = (c.alg, c.difficulty, c.pace, c.issued_ms, c.prev);
                    Ok(Block {
                        tx,
                        term,
                        alg,
                        difficulty,
                        pace,
                        issued_ms,
                        solved_ms,
                        prev,
                        miner,
                        nonce,
                        hash,
                        change: None,
                    })
                } else {
                    Err(RejectReason::InsufficientWork)
                }
            }
            _ => Err(RejectReason::UnknownTransaction),
        };
        match verdict {
            Ok(block) => self.accept_own(block, "block"),
            Err(reason) => {
                self.emit(Event::SolutionRejected { tx, miner, reason: reason.as_str().into() });
                let outcome = Outcome::Rejected { tx, miner, nonce, reason };
                self.publish(Msg::Result { term, outcome, commit: self.commit });
            }
        }
    }

    fn on_ack(&mut self, from: PeerId, key: u64, term: Term, height: u64) {
        if term > self.term {
            // A peer that moved on: this controller (or follower) is stale. (A member removed in
            // blocks it lacks, say, that went on to terms of its own: it follows us only once we
            // are in a term after them, seed 38056.)
            self.enter_term(term);
            return;
        }
        if term < self.term || !self.is_controller() {
            return;
        }
        if !self.is_voter_id(from, key) {
            self.learner_ack(from, key, height);
            return;
        }
        let entry = self.acks.entry(from).or_insert((0, 0));
        entry.0 = entry.0.max(height.min(self.chain.height()));
        entry.1 = self.now;
        // Most acks only say "still here": only one beyond the commit point can move it.
        if height > self.commit {
            self.check_commit();
        }
    }

    /// The largest height a quorum holds, counting only blocks of this term (Raft §5.4.2).
    fn check_commit(&mut self) {
        let Some(voters) = self.voters() else { return };
        let height = self.chain.height();
        let mut heights: Vec<u64> = voters
            .members()
            .iter()
            .map(|m| if m.id == self.cfg.id { height } else { self.acks.get(&m.id).map_or(0, |a| a.0) })
            .collect();
        let q = voters.quorum() - 1;
        // The quorum-th highest height: a quorum holds at least that much.
        let held = *heights.select_nth_unstable_by(q, |a, b| b.cmp(a)).1;
        if held <= self.commit || self.chain.get(held - 1).is_none_or(|b| b.term != self.term) {
            return;
        }
        self.set_commit(held);
        if self.pending.is_some_and(|tx| tx < held) {
            self.pending = None;
            self.issue();
        } else {
            // The next challenge went out before this commit (see `accept_own`): the room
            // learns of it now, not at the next beat.
            self.beat();
        }
    }

    fn set_commit(&mut self, commit: u64) {
        if commit <= self.commit {
            return;
        }
        let from = self.commit;
        self.commit = commit;
        // A hint, promised to no one: written after the batch's messages (see `handle`), so the
        // next challenge does not wait for it.
        self.commit_dirty = true;
        for tx in from..commit {
            if let Some(b) = self.chain.get(tx) {
                let (term, winner) = (b.term, b.miner);
                self.emit(Event::BlockCommitted { tx, term, winner });
            }
        }
    }

    fn on_sync_request(&mut self, asker: PeerId, start: TxId, req: u64, member: bool) {
        if start > 0 {
            // The asker holds blocks: a room with a chain exists.
            self.saw_room();
        }
        let height = self.chain.height();
        let start = start.min(height);
        let batch = self.cfg.timing.sync_blocks.clamp(1, MAX_SYNC_BLOCKS) as u64;
        let end = start.saturating_add(batch).min(height);
        let blocks: Vec<Block> = (start..end).filter_map(|tx| self.chain.get(tx).copied()).collect();
        let config = if start == 0 { self.config.clone() } else { None };
        let open = if self.is_controller() { self.open } else { None };
        let (term, commit) = (self.term.max(1), self.commit);
        if self.is_controller() && member {
            self.acks.entry(asker).or_insert((0, 0)).1 = self.now;
        }
        self.publish(Msg::SyncReply { to: asker, req, term, config, blocks, height, commit, open });
    }

    // ----- Follower ---------------------------------------------------------------------------------

    /// Checks that a controller's message for `term` is from the current controller, adopting a
    /// newer term's. Returns false (and logs) when it must be ignored.
    fn accept_controller(&mut self, from: PeerId, term: Term, what: &str) -> bool {
        // Only a voter can win an election: anyone else speaking as controller is a forger (or
        // from another room), and must neither be followed nor move the term.
        if !self.may_lead(from) {
            self.drop_msg(DropReason::NotMember, format!("{what} from {from}, who is not a voting member of the room"));
            return false;
        }
        if term < self.term && term >= self.promised && self.voters().is_none() && !self.controller_live() {
            // We know no configuration, so we cannot tell a forger's newer term from the room's,
            // and we promised nothing in the terms after `term`. Ours fell silent: follow
            // whoever speaks as controller, keeping the vote we promised in `term`, if any.
            self.fall_back_to(term);
        }
        if term < self.term {
            // A stale controller (paused, cut off): tell it the room moved on, at most once per beat.
            // Unless our term is hearsay: without the configuration we may have taken it from a
            // forger, and we promised nothing in it; the room's own controller of that term, if
            // there is one, will tell the stale one itself.
            let hearsay = self.term_is_hearsay();
            if !hearsay && self.now >= self.last_stale_reply + self.cfg.timing.heartbeat_ms {
                self.last_stale_reply = self.now;
                self.publish(Msg::Ack { to: from, term: self.term, height: 0, key: self.cfg.key });
            }
            let current = self.term;
            self.drop_msg(
                DropReason::StaleTerm,
                format!("{what} from {from} for term {term}, current term is {current}"),
            );
            return false;
        }
        if term > self.term {
            self.enter_term(term);
        }
        match self.controller {
            // Without the configuration we cannot tell a stranger from a member, and may have
            // followed a forger: one that fell silent gives way to whoever speaks as controller.
            Some(c) if c != from && self.voters().is_none() && !self.controller_live() => {
                self.follow_controller(from);
                true
            }
            Some(c) if c != from => {
                self.drop_msg(
                    DropReason::NotController,
                    format!("{what} from {from} in term {term}, whose controller is {c}"),
                );
                false
            }
            Some(_) => {
                self.heard_ms = self.now;
                self.controller_gone = false;
                self.decay_backoff();
                self.reset_election_timer();
                true
            }
            None => {
                self.follow_controller(from);
                true
            }
        }
    }

    /// Leaves a term we only heard of (we promised nothing in it, and took it before we could
    /// tell a forger) for the older `term`, keeping the vote we promised in it, if any. Votes
    /// stay one per term: nothing was promised after `promised`.
    fn fall_back_to(&mut self, term: Term) {
        debug_assert!(term >= self.promised && term < self.term);
        self.term = term;
        self.term_since = self.now;
        self.voted_for = if term == self.promised { self.promised_to } else { None };
        self.controller = None;
        self.term_led = false;
        self.ballots.clear();
        self.grants.clear();
        self.my_ballot = None;
        self.pre.clear();
    }

    /// Whether `id` could be elected: a voter of the configuration (before block 0, of our
    /// proposal). A peer that knows neither cannot tell.
    fn may_lead(&self, id: PeerId) -> bool {
        self.voters().is_none_or(|v| v.key_of(id).is_some())
    }

    fn follow_controller(&mut self, c: PeerId) {
        if self.is_controller() {
            return;
        }
        self.controller = Some(c);
        self.term_led = true;
        self.controller_gone = false;
        self.backoff_since = self.now;
        self.hellos_unanswered = 0;
        self.heard_ms = self.now;
        self.grant_deadline = None;
        self.reset_election_timer();
        self.emit(Event::LeaderElected { term: self.term, leader: c, votes: 0 });
    }

    /// Our chain equals the controller's up to `upto`: take its commit (as far as that) and
    /// acknowledge.
    fn matched(&mut self, controller: PeerId, upto: u64, commit: u64) {
        self.diverged = None;
        self.set_commit(commit.min(upto));
        let (to, term, height, at) = self.last_ack;
        if !self.is_voter() && (to, term) == (controller, self.term) && self.now < at + LEARNER_ACK_MS {
            return;
        }
        if (to, term, height) == (controller, self.term, upto) && self.now < at + ACK_QUIET_MS {
            return;
        }
        self.last_ack = (controller, self.term, upto, self.now);
        self.publish(Msg::Ack { to: controller, term: self.term, height: upto, key: self.cfg.key });
    }

    /// Whether our chain's first `h` blocks end in `hash` (for `h = 0`: block 0 links to it), so
    /// that, by the hash chain, they are the blocks that `hash` ends.
    fn links_at(&self, h: u64, hash: Digest) -> bool {
        match h {
            0 => self.tip_or_base_at_zero(hash.alg()) == Some(hash),
            _ => self.chain.get(h - 1).is_some_and(|b| b.hash == hash),
        }
    }

    fn tip_or_base_at_zero(&self, alg: HashAlg) -> Option<Digest> {
        match (&self.config, &self.genesis_offer) {
            (Some(c), _) | (None, Some(c)) => Some(c.digest(alg)),
            (None, None) => None,
        }
    }

    fn on_heartbeat(&mut self, from: PeerId, height: u64, commit: u64, tip: Digest, open: Option<TxId>) {
        if height > 0 {
            self.saw_room();
        }
        if height > self.chain.height() || !self.links_at(height, tip) {
            // Behind, or our block below its height is not the controller's.
            if height <= self.chain.height() {
                self.diverge();
            }
            self.request_sync(from);
            return;
        }
        self.matched(from, height, commit);
        let Some(tx) = open else { return };
        match (self.mining, self.submitted) {
            // Our solution may have been lost (a reconnect, a broker restart): again, at most
            // twice a second.
            (Some(c), Some(nonce)) if c.tx == tx && self.now >= self.last_solution_ms + SOLUTION_RETRY_MS => {
                self.last_solution_ms = self.now;
                self.publish(Msg::Solution { tx, nonce });
            }
            (Some(c), _) if c.tx == tx => {}
            // We missed the challenge: the sync reply carries it.
            _ => self.request_sync(from),
        }
    }

    fn on_challenge(&mut self, from: PeerId, c: Challenge, commit: u64, config: Option<RoomConfig>) {
        if c.tx > 0 {
            self.saw_room();
        }
        if c.tx > self.chain.height() {
            self.request_sync(from);
            return;
        }
        if c.tx == 0 && self.config.is_none() {
            // Block 0 links to the configuration it records.
            let Some(config) = config.filter(|k| k.digest(c.alg) == c.prev) else {
                self.drop_msg(DropReason::BadConfiguration, format!("challenge 0 from {from}"));
                return;
            };
            self.genesis_offer = Some(config);
        }
        if !self.links_at(c.tx, c.prev) {
            self.diverge();
            self.request_sync(from);
            return;
        }
        // Our chain is the controller's up to c.tx. Blocks of ours beyond it (accepted by an
        // earlier controller, never committed) stay until the controller's own block at their
        // height replaces them; meanwhile we mine its challenge like everyone.
        self.matched(from, c.tx, commit);
        self.follow(c);
    }

    /// Starts mining `c`, unless it is the job already running.
    fn follow(&mut self, c: Challenge) {
        let prefix = &self.chain.blocks()[..usize::try_from(c.tx).unwrap_or(usize::MAX).min(self.chain.blocks().len())];
        if !c.pace.allows(prefix, c.difficulty) {
            let detail =
                format!("challenge {} asks for {} bits, which {:?} does not allow", c.tx, c.difficulty, c.pace);
            self.drop_msg(DropReason::BadDifficulty, detail);
            return;
        }
        let same = self.mining.is_some_and(|o| (o.tx, o.prev, o.difficulty) == (c.tx, c.prev, c.difficulty));
        self.mining = Some(c);
        if same {
            if let Some(nonce) = self.submitted {
                self.publish(Msg::Solution { tx: c.tx, nonce });
            }
            return;
        }
        self.submitted = None;
        let template = Template::new(&c.prev, c.tx, self.cfg.id);
        self.out.push(Action::Mine(Job { tx: c.tx, template, difficulty: c.difficulty }));
        self.emit(Event::MiningStarted { term: c.term, tx: c.tx, difficulty: c.difficulty });
    }

    fn mined(&mut self, found: Found) {
        let Some(c) = self.mining else { return };
        if c.tx != found.tx || self.is_controller() {
            return;
        }
        self.submitted = Some(found.nonce);
        let (tx, nonce, hashes, elapsed_ms) = (found.tx, found.nonce, found.hashes, found.elapsed_ms);
        self.emit(Event::SolutionFound { tx, nonce, hashes, elapsed_ms });
        self.publish(Msg::Solution { tx, nonce });
    }

    /// An accepted block from the controller of our term.
    fn on_block(&mut self, from: PeerId, block: Block, commit: u64) {
        // Anyone can publish in the controller's name: a block that is not its own proof of work
        // is dropped before it can make us drop anything of ours.
        if let Err(e) = crate::chain::verify_work(&block) {
            self.drop_msg(DropReason::InvalidBlock, format!("from {from}: {e}"));
            return;
        }
        let height = self.chain.height();
        if block.tx > height {
            self.saw_room();
            self.request_sync(from);
            return;
        }
        if let Some(mine) = self.chain.get(block.tx) {
            // Blocks are known by their hash (it covers prev, tx, miner and nonce): the same
            // solution accepted by two controllers is one block, whatever term each recorded.
            if mine.hash == block.hash {
                return;
            }
            // Raft's rule: a block of the controller's that conflicts with ours at its height, on
            // a prefix we share, replaces ours and what follows (never below the commit point).
            if !self.links_at(block.tx, block.prev) || !self.truncate(block.tx) {
                self.diverge();
                self.request_sync(from);
                return;
            }
        }
        if block.tx == 0 && self.config.is_none() {
            match self.genesis_offer.take() {
                Some(config) if config.digest(block.alg) == block.prev => self.take_config(config, block.alg),
                _ => {
                    self.saw_room();
                    self.request_sync(from);
                    return;
                }
            }
        }
        if let Err(e) = self.append(block) {
            self.drop_msg(DropReason::InvalidBlock, format!("from {from}: {e}"));
            self.diverge();
            self.request_sync(from);
            return;
        }
        self.matched(from, block.tx + 1, commit);
    }

    fn take_config(&mut self, config: RoomConfig, alg: HashAlg) {
        self.chain = Chain::with_base(config.digest(alg));
        self.persist(Write::Config(config.clone()));
        // Followed before we could tell (see `accept_controller`): a stranger is no controller.
        if let Some(c) = self.controller.filter(|&c| config.key_of(c).is_none()) {
            self.controller = None;
            self.drop_msg(
                DropReason::NotMember,
                format!("{c} was followed as controller but is not a voting member of the room"),
            );
            if self.term > self.promised {
                // So was its term, which we promised nothing in: kept, it would make us drop
                // the room's controller as stale for good (seed 937136). Were it the room's, a
                // member would move us to it again.
                self.fall_back_to(self.promised);
            }
        }
        self.config = Some(config);
        self.saw_room();
        self.refresh_members();
    }

    /// Verifies, appends and persists a block; bookkeeping for mining and events.
    fn append(&mut self, block: Block) -> Result<(), crate::chain::ChainError> {
        if block.tx == 0 && self.chain.height() == 0 && self.config.is_some() && self.is_controller() {
            let config = self.config.clone().unwrap_or_else(|| unreachable!());
            if self.chain.base().is_none() {
                self.chain = Chain::with_base(config.digest(block.alg));
                self.persist(Write::Config(config));
            }
        }
        let members = match block.change {
            None => None,
            // Applied from the moment it is in the chain, committed or not (Raft §4.1).
            Some(change) => Some(
                self.members
                    .as_ref()
                    .and_then(|m| m.apply(change))
                    .ok_or(crate::chain::ChainError::Members(block.tx))?,
            ),
        };
        self.chain.append(block)?;
        self.persist(Write::Append(vec![block]));
        if let Some(members) = members {
            self.members = Some(members);
            self.check_rival();
            if let Some(Change::Remove { id, key }) = block.change
                && let Some(p) = self.peers.get(&id).filter(|p| p.key == key)
            {
                // Forget the member that left: a process under its id with another key (the
                // member back with its disk lost) is then a peer like any other.
                if p.gone {
                    self.gone_peers -= 1;
                }
                self.peers.remove(&id);
            }
            self.refresh_voters();
        }
        self.emit(Event::BlockAccepted {
            change: block.change,
            term: block.term,
            tx: block.tx,
            winner: block.miner,
            difficulty: block.difficulty,
            nonce: block.nonce,
            solve_ms: block.solved_ms.saturating_sub(block.issued_ms),
            hash: block.hash.to_hex(),
            prev: block.prev.to_hex(),
        });
        if self.mining.is_some_and(|c| c.tx == block.tx) {
            self.out.push(Action::StopMining);
            self.mining = None;
            self.submitted = None;
        }
        Ok(())
    }

    /// Drops our blocks from `tx` on: allowed only above the commit point.
    fn truncate(&mut self, tx: TxId) -> bool {
        if tx < self.commit {
            let commit = self.commit;
            self.emit(Event::CommittedConflict { tx, commit });
            return false;
        }
        self.chain.truncate(tx);
        self.persist(Write::Truncate(tx));
        self.emit(Event::ChainTruncated { height: self.chain.height() });
        if tx == 0 {
            self.chain = Chain::new();
            self.config = None;
        }
        self.refresh_members();
        true
    }

    /// A block failed to link: the next sync starts below our tip. What an earlier reply of
    /// the same controller in the same term showed to agree stays agreed; a new controller's
    /// chain is compared from the commit point again.
    fn diverge(&mut self) {
        let (controller, term) = (self.controller, self.term);
        if !self.diverged.is_some_and(|d| d.controller == controller && d.term == term) {
            self.diverged = Some(Diverged { controller, term, agreed: self.commit });
        }
    }

    /// Whom to ask again for what `peer` was asked: our controller while we hear it (`peer` may
    /// be gone), else `peer`.
    fn sync_target(&self, peer: PeerId) -> PeerId {
        self.controller.filter(|&c| c != self.cfg.id && self.controller_live()).unwrap_or(peer)
    }

    /// How long a sync request may go unanswered: `sync_retry_ms` and twice the broker's lag
    /// (a reply behind a long queue would otherwise be asked for again, and come twice).
    fn sync_retry_ms(&self) -> u64 {
        self.cfg.timing.sync_retry_ms + 2 * self.lag()
    }

    fn request_sync(&mut self, peer: PeerId) {
        if peer == self.cfg.id {
            return;
        }
        // One request at a time, sent again after `sync_retry_ms()`; but one to a peer that may
        // never answer (it died) never holds back one to our controller.
        if let Some((to, at, _, _)) = self.syncing
            && self.now < at + self.sync_retry_ms()
            && (to == peer || self.controller != Some(peer))
        {
            return;
        }
        let from = match self.diverged {
            Some(d) => d.agreed.max(self.commit).min(self.chain.height()),
            None => self.chain.height(),
        };
        let req = self.rng.random();
        self.syncing = Some((peer, self.now, from, req));
        self.publish(Msg::SyncRequest { to: peer, from, req, key: self.cfg.key });
    }

    /// Asks `peer` now, whoever a request outstanding went to.
    fn request_sync_now(&mut self, peer: PeerId) {
        if self.syncing.is_some_and(|(to, ..)| to != peer) {
            self.syncing = None;
        }
        self.request_sync(peer);
    }

    /// Two processes under the replier's id (the member and a copy with another data
    /// directory) both answer a request to it. One that has nothing beyond where we asked from
    /// (we asked because the replier seemed to) leaves the request open for the other's answer
    /// (seeds 2764 and 52115: the copy's short chain answered first, every time, and the
    /// member's was dropped as unsolicited).
    fn keep_asking(&mut self, asked: Option<(PeerId, u64, TxId, u64)>, before: (u64, Digest), height: u64) {
        let nothing = asked.is_some_and(|(.., start, _)| height <= start);
        if self.syncing.is_none() && nothing && (self.chain.height(), self.tip()) == before {
            self.syncing = asked;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_sync_reply(
        &mut self,
        from: PeerId,
        req: u64,
        term: Term,
        config: Option<RoomConfig>,
        blocks: Vec<Block>,
        height: u64,
        commit: u64,
        open: Option<Challenge>,
    ) {
        let Some((_, _, asked, _)) =
            self.syncing.filter(|&(p, _, _, r)| p == from && r == req && !self.is_controller())
        else {
            // A controller's chain grows only by the blocks it accepts: a reply to a request it
            // made as a follower comes too late.
            self.drop_msg(DropReason::UnsolicitedSync, format!("sync reply from {from}"));
            return;
        };
        self.syncing = None;
        // Only the controller of our term may make us drop blocks; anyone may extend our chain.
        let authoritative = self.controller == Some(from) && term == self.term;
        if authoritative && height < self.commit {
            // A controller's chain holds every committed block and only grows in its term: this
            // is an old reply, overtaken by what we learnt since.
            return;
        }
        let first = blocks.first().map(|b| b.tx);
        let last = blocks.last().map(|b| b.tx);
        if !self.sync_reply_config(from, &blocks, config, open, authoritative) {
            return;
        }
        let before = self.chain.height();
        // A block below the replier's commit point is committed: one of ours that conflicts
        // with it never can be, and goes, whoever tells us (above our own commit point only). A
        // peer behind a change of members needs this: the controller it cannot yet tell from a
        // stranger is a member by blocks that its own stale suffix keeps out.
        let overrides = |tx: TxId| authoritative || tx < commit;
        let linked = self.take_synced_blocks(from, blocks, overrides);
        if let Some(tx) = first {
            self.emit(Event::Synced { from: tx, height: self.chain.height() });
        }
        if !linked {
            if first.is_some_and(overrides) && self.diverged.is_none() {
                self.diverge();
                self.request_sync(from);
            }
            return;
        }
        let committed = last.is_some_and(|l| l < commit);
        let agreed_more = match last {
            Some(last) if authoritative || committed => self.agree_up_to(from, term, last, committed),
            _ => false,
        };
        if height > 0 {
            self.saw_room();
        }
        // The reply reached the replier's tip, every block equal to ours or appended (so, by the
        // hash chain, our prefix is the replier's); or, empty, the replier has nothing beyond a
        // height below which all our blocks are committed (hence its too). Never do we drop
        // blocks because a reply is shorter than our chain: it may be older than them.
        let reached = match last {
            Some(t) => t + 1 == height,
            None => asked >= height && (height <= self.commit || height == 0),
        };
        // Behind, or diverged and not yet shown where: ask for what follows, as long as replies
        // take us further (a reply of blocks we hold, from a peer that cannot make us drop
        // ours, would only be asked for again and again; the controller's heartbeat takes over).
        let grew = self.chain.height() > before;
        if first.is_some() && ((grew && self.chain.height() < height) || (agreed_more && !reached)) {
            self.request_sync(from);
            return;
        }
        let links = open.is_some_and(|c| c.tx == height && self.links_at(c.tx, c.prev));
        if authoritative && self.chain.height() >= height && (reached || links) {
            self.matched(from, height, commit);
            if let Some(c) = open.filter(|_| links) {
                self.follow(c);
            }
        }
    }

    /// The configuration a sync reply carries: with block 0, the one its base is the digest of
    /// (false, and the reply dropped, if it is missing or another); with no blocks before block
    /// 0, our controller's offer, kept if it goes with the open challenge 0.
    fn sync_reply_config(
        &mut self,
        from: PeerId,
        blocks: &[Block],
        config: Option<RoomConfig>,
        open: Option<Challenge>,
        authoritative: bool,
    ) -> bool {
        let first = blocks.first();
        if first.is_some_and(|b| b.tx == 0) && self.config.is_none() {
            match (config, first) {
                (Some(config), Some(b)) if config.digest(b.alg) == b.prev => self.take_config(config, b.alg),
                _ => {
                    self.drop_msg(DropReason::BadConfiguration, format!("sync reply from {from}"));
                    return false;
                }
            }
        } else if first.is_none() && self.chain.height() == 0 && self.config.is_none() && authoritative {
            // Before block 0: the configuration comes with the open challenge 0.
            self.genesis_offer = config.filter(|k| open.is_some_and(|c| c.tx == 0 && k.digest(c.alg) == c.prev));
        }
        true
    }

    /// Takes a sync reply's blocks: those equal to ours are skipped, one that conflicts with
    /// ours replaces our blocks from it on where the reply `overrides` them, the others are
    /// appended. False where the reply stops linking to our chain.
    fn take_synced_blocks(&mut self, from: PeerId, blocks: Vec<Block>, overrides: impl Fn(TxId) -> bool) -> bool {
        for block in blocks {
            if let Some(mine) = self.chain.get(block.tx) {
                if mine.hash == block.hash {
                    continue;
                }
                if !overrides(block.tx) || !self.truncate(block.tx) {
                    return false;
                }
            }
            if self.chain.height() != block.tx {
                return false;
            }
            if let Err(e) = self.append(block) {
                self.drop_msg(DropReason::InvalidBlock, format!("sync from {from}: {e}"));
                return false;
            }
        }
        true
    }

    /// A diverged peer took every block of a reply up to `last`, and the reply is our
    /// controller's (or its blocks are `committed`): records how far our chain now agrees.
    /// Whether that moved the agreed height up.
    fn agree_up_to(&mut self, from: PeerId, term: Term, last: TxId, committed: bool) -> bool {
        let Some(d) = self.diverged.as_mut() else {
            return false;
        };
        // Every block of the reply is now ours, and the reply is our controller's (or its
        // blocks are committed, the same for all): the next request starts after them.
        let same = d.controller == Some(from) && d.term == term;
        let agreed = if same || committed { d.agreed } else { 0 };
        *d = Diverged { controller: Some(from), term, agreed: agreed.max(last + 1) };
        last + 1 > agreed
    }
}

/// The chain a node recovers: its disk's blocks up to the first that fails to link, on the base
/// of the recorded configuration (hashed with the chain's function: its first block's, else
/// `alg`).
fn restored_chain(alg: HashAlg, config: Option<&RoomConfig>, blocks: Vec<Block>) -> Chain {
    let alg = blocks.first().map_or(alg, |b| b.alg);
    let mut chain = match config {
        Some(config) => Chain::with_base(config.digest(alg)),
        None => Chain::new(),
    };
    for block in blocks {
        if chain.append(block).is_err() {
            break;
        }
    }
    chain
}

/// Where a peer whose chain failed to link syncs from (see [`RoomNode::diverge`]).
#[derive(Debug, Clone, Copy)]
struct Diverged {
    /// The controller and term whose replies `agreed` counts.
    controller: Option<PeerId>,
    term: Term,
    /// Our first blocks up to this height are the controller's.
    agreed: u64,
}

/// With a live controller, the election backoff comes down one step this often (see `backoff`).
const BACKOFF_DECAY_MS: u64 = 5_000;

/// Most doublings of the election timeouts after terms without a controller (see `backoff`).
const MAX_BACKOFF: u32 = 4;

/// How often a miner sends again a solution the controller has not judged.
const SOLUTION_RETRY_MS: u64 = 500;

#[cfg(test)]
mod tests;
