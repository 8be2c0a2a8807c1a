//! The room's state machine: a Raft-style replicated chain whose elections keep the lab's
//! character (in the normal case the highest random ballot wins).
//!
//! Feed [`RoomNode::handle`] an [`Input`] with the current time (monotonic milliseconds) and carry
//! out the returned [`Action`]s **in order**: a [`Action::Persist`] must be durable before any
//! later [`Action::Publish`] of the same batch goes out, since those messages promise what it
//! writes (a vote, a block held). No clock, socket, thread or disk lives here; randomness comes
//! from a seeded generator. See `docs/PROTOCOL.md` for the rules and the argument for their safety.
//!
//! This file holds the node's types and state, its queries, [`RoomNode::handle`] with the dispatch
//! of messages and the timers, and the plumbing of what it publishes (the broker's lag timed on
//! our own echoes), writes and emits. The protocol itself is split by concept: `membership` (who
//! is in the room and who votes), `election` (who controls a term), `controller` (the
//! controller's rounds), `chain` (following the controller's chain; changes to our own) and
//! `sync` (catching up).

use std::collections::{BTreeMap, BTreeSet};

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::msg::{Channel, Envelope, Msg, Pos, RoomConfig};
use crate::chain::Chain;
use crate::events::Event;
use crate::pace::Pace;
use crate::pow::{Digest, HashAlg};
use crate::protocol::{Block, Challenge, DropReason, MAX_SYNC_BLOCKS, Outcome, PeerId, Term, TxId};
use crate::status::Role;
use crate::status::Status;
use crate::work::{Found, Job};

mod chain;
mod controller;
mod election;
mod membership;
mod sync;

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
    /// The most the broker's lag measured stretches a timer by (see `RoomNode::lag`): an echo
    /// lost (QoS 0) or a broker that stopped must not stretch them for ever.
    pub max_lag_ms: u64,
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
            max_lag_ms: 10_000,
        }
    }
}

/// Rooms up to this many members run on the default timers; a larger room's election timers
/// stretch in proportion (see [`Timing::for_room`]).
pub const ROOM_AT_DEFAULT_TIMING: usize = 100;

impl Timing {
    /// The timers for a room of `room_size` members: the default up to
    /// [`ROOM_AT_DEFAULT_TIMING`], and beyond it the heartbeat and the election timeout
    /// stretched by `room_size / ROOM_AT_DEFAULT_TIMING`. Each heartbeat costs the broker a
    /// delivery per member, so its rate falls as the room grows, and the broker is asked for a
    /// thousand heartbeat deliveries a second at most. The election timeout stretches with it:
    /// it must stay several heartbeats long (Raft's "broadcast time << election timeout"), and
    /// a broadcast to N peers takes a broker about N times as long. Measured: 300 peer
    /// processes on a 3-node RabbitMQ cluster (subscribed at QoS 0), which got through about
    /// 5,000 deliveries a second, made one block in 5 minutes at 100 ms heartbeats (followers'
    /// timers ran out while the heartbeats sat in the broker's queues, and terms 2 and 3 never
    /// held), and 25 in one term at 300 ms. Failing over then takes as much longer: 1.2 to 2.4 s in a room of 300.
    pub fn for_room(room_size: usize) -> Self {
        let d = Self::default();
        let stretch = |ms: u64| {
            let n = u64::try_from(room_size.max(ROOM_AT_DEFAULT_TIMING)).unwrap_or(u64::MAX);
            ms.saturating_mul(n) / ROOM_AT_DEFAULT_TIMING as u64
        };
        Self {
            heartbeat_ms: stretch(d.heartbeat_ms),
            election_min_ms: stretch(d.election_min_ms),
            election_max_ms: stretch(d.election_max_ms),
            max_lag_ms: stretch(d.max_lag_ms),
            ..d
        }
    }

    /// An acknowledgement that moves nothing is sent at most this often: two heartbeats (the
    /// controller's quorum check looks back `election_max_ms`).
    fn ack_quiet_ms(&self) -> u64 {
        2 * self.heartbeat_ms
    }

    /// The lag measured halves this often without a new sample (5 s up to 100 members): a
    /// follower times few broadcasts of its own, and one measured while its room gathered must
    /// not slow its failovers for good.
    fn lag_half_life_ms(&self) -> u64 {
        (self.max_lag_ms / 2).max(1)
    }

    /// A non-voting peer acknowledges the controller's blocks at most this often: enough for
    /// the controller to know who could take a member's place.
    fn learner_ack_ms(&self) -> u64 {
        10 * self.heartbeat_ms
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

/// An election message held until this peer knows the room it is for.
#[derive(Debug, Clone, Copy)]
enum Early {
    PreBallot { key: u64, term: Term, pos: Pos },
    Ballot { key: u64, term: Term, ballot: Ballot },
}

impl Early {
    fn term(&self) -> Term {
        match *self {
            Self::PreBallot { term, .. } | Self::Ballot { term, .. } => term,
        }
    }
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
    /// Pre-ballots and ballots that came before we knew the room to vote in (see
    /// [`RoomNode::hold_early`]): the latest of each kind per sender, counted once we do.
    early: BTreeMap<(bool, PeerId), Early>,
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
    /// comes down slowly, and halves every `Timing::lag_half_life_ms` without a new sample): in
    /// a room of hundreds on a busy machine, the broker's queue delays every message by as much,
    /// and the election's timers stretch with it (see `wait_ms`).
    lag_ms: u64,
    /// When `lag_ms` was last sampled.
    lag_at: u64,
    /// The broadcast of ours being timed, and when it left.
    echo: Option<(Msg, u64)>,
    out: Vec<Action>,
}

/// The periodic announcement backs off up to this many doublings of `election_min_ms`.
const MAX_HELLO_BACKOFF: u32 = 5;

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
            early: BTreeMap::new(),
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
            controller: self.controller,
            height: self.chain.height(),
            tx: self.open().map(|c| c.tx),
            difficulty: self.open().map(|c| c.difficulty),
            hash_rate: 0,
            hashes: 0,
            mining_ms: 0,
            blocks_won: self.chain.won_by(self.cfg.id),
            published: 0,
            delivered: 0,
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
            Input::Message(env) => {
                self.message(env);
                self.count_early();
            }
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
        // Time one broadcast at a time; one not back after `max_lag_ms` was lost (QoS 0). Not a
        // solution: only the controller subscribes to them (a miner's never comes back to it).
        let small = !matches!(msg, Msg::Challenge { .. } | Msg::Result { .. } | Msg::Solution { .. });
        if self.echo.as_ref().is_some_and(|(timed, _)| *timed == msg) {
            // Sent again, so its echo no longer says which copy came back (the first may have
            // been lost): no sample, as TCP takes none from a retransmission (Karn's rule). One
            // such echo once measured a re-sent pre-ballot's period as the lag (seed 524450).
            self.echo = None;
        } else if small
            && !matches!(msg.channel(), Channel::Direct(_))
            && self.echo.as_ref().is_none_or(|(_, sent)| self.now >= sent + self.cfg.timing.max_lag_ms)
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
            let lag = self.now.saturating_sub(*at).min(self.cfg.timing.max_lag_ms);
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

    /// The lag measured, halved per `Timing::lag_half_life_ms` since.
    fn measured_lag(&self) -> u64 {
        let halvings = self.now.saturating_sub(self.lag_at) / self.cfg.timing.lag_half_life_ms();
        self.lag_ms.checked_shr(u32::try_from(halvings).unwrap_or(u32::MAX)).unwrap_or(0)
    }

    /// The broker's lag as it stands: what was measured, or longer while a broadcast is out.
    fn lag(&self) -> u64 {
        let measured = self.measured_lag();
        let most = (2 * measured).max(self.cfg.timing.election_max_ms).min(self.cfg.timing.max_lag_ms);
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

    // ----- Messages --------------------------------------------------------------------------

    fn message(&mut self, env: Envelope) {
        let from = env.from;
        if from == self.cfg.id {
            self.own_id_message(env.msg);
            return;
        }
        match env.msg {
            Msg::Hello { want_reply, key, incarnation, term, controller, height, peers, .. } => {
                self.on_hello(from, want_reply, key, incarnation, term, controller, height, peers);
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
