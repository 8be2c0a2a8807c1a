//! A deterministic simulator of a hashvote room: many [`RoomNode`]s, a simulated MQTT broker, a
//! simulated monotonic clock, simulated disks and miners, and random faults, all driven by one
//! seed, so any failure replays exactly (`cargo run -p hashvote-sim -- --seed N`).
//!
//! The broker gives what MQTT 3.1.1 promises and nothing more: per publisher and subscriber, a
//! topic's messages arrive in order; at QoS 1 a message reaches every subscriber connected from
//! publication to delivery (clean sessions: what was in flight to a client that disconnects is
//! lost, and so is what a disconnected client publishes); a client's will is published when its
//! connection drops abnormally (at once when its process dies, after 1.5 × keepalive when it hangs
//! or its network goes), unless the broker itself goes down. On top of that, faults beyond MQTT's
//! guarantees: messages lost, duplicated or delayed at random.
//!
//! After every step the checker asserts safety (at most one controller per term; a committed block
//! is never changed or truncated; one block per height among committed blocks); when the faults
//! end with a quorum of the configuration up, it asserts that a block is committed within a bounded
//! simulated time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use hashvote_core::events::Event;
use hashvote_core::pace::Pace;
use hashvote_core::pow::{Digest, HashAlg};
use hashvote_core::protocol::{Block, Challenge, Change, PeerId, Term};
use hashvote_core::room::{Action, Channel, Envelope, Input, Msg, Restored, RoomNode, RoomNodeConfig, Timing, Write};
use hashvote_core::work::Found;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a run simulates.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Peers started at once (the room's configuration is the first `room_size` of them).
    pub peers: usize,
    /// The room's configured size.
    pub room_size: usize,
    /// Simulated time during which faults are injected (ms).
    pub fault_ms: u64,
    /// Simulated time after the faults end, by which a block must be committed (ms).
    pub settle_ms: u64,
    /// Mean time between faults (ms); 0: no faults.
    pub fault_every_ms: u64,
    /// Mean block time of the whole room (ms).
    pub block_ms: u64,
    /// Keepalive (ms): a hung client's will comes after 1.5 × this.
    pub keepalive_ms: u64,
    /// The protocol's timers.
    pub timing: Timing,
    /// Keep the last this many trace lines (printed when a check fails).
    pub trace: usize,
    /// The peers connect at random times within this window (ms) after the start.
    pub connect_over_ms: u64,
    /// How many deliveries the broker and the peers' processes get through per second, all
    /// together (0: no limit). A room of hundreds of processes on a machine of two cores gets
    /// through some tens of thousands: beyond that, deliveries queue and arrive late.
    pub deliveries_per_s: u64,
    /// The broker is a cluster of this many nodes (1: one broker). Process `p` is connected to
    /// node `p % broker_nodes`; each node gets through its share of `deliveries_per_s` with its
    /// own queue, and a message reaches the queues of the other nodes `node_hop_ms` after its
    /// own node's: the subscribers of each node get a burst of broadcasts (a term's ballots)
    /// in another order, their own node's first, as on a RabbitMQ cluster under load.
    pub broker_nodes: usize,
    /// With `broker_nodes` > 1: how much later a message enters another node's queue (ms).
    pub node_hop_ms: u64,
}

impl Scenario {
    /// A small room with faults: what the test suite runs over many seeds.
    pub fn small(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        // Two at least: the controller does not mine, so a room of one never makes a block.
        let room_size = rng.random_range(2..=5usize);
        Self {
            peers: room_size,
            room_size,
            fault_ms: 6_000,
            settle_ms: 8_000,
            fault_every_ms: 700,
            block_ms: 150,
            keepalive_ms: 1_000,
            // Syncs of a few blocks take several replies, as the syncs of thousands do.
            timing: Timing {
                sync_blocks: rng.random_range(1..=8),
                // Members lost for good are replaced within the run.
                replace_after_ms: rng.random_range(1_000..=4_000),
                ..Timing::default()
            },
            trace: 400,
            connect_over_ms: 50,
            deliveries_per_s: 0,
            broker_nodes: 1,
            node_hop_ms: 0,
        }
    }

    /// A room of `peers` peers with only a few faults (controller crashes).
    pub fn large(peers: usize) -> Self {
        Self {
            peers,
            room_size: peers,
            fault_ms: 4_000,
            settle_ms: 6_000,
            fault_every_ms: 0,
            block_ms: 200,
            keepalive_ms: 2_000,
            timing: Timing::for_room(peers),
            trace: 200,
            connect_over_ms: 50,
            deliveries_per_s: 0,
            broker_nodes: 1,
            node_hop_ms: 0,
        }
    }
}

/// How a run went.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Blocks committed at the end (the longest committed prefix).
    pub committed: u64,
    /// Of those, changes of members.
    pub changes: u64,
    /// The highest term reached.
    pub terms: Term,
    /// Faults injected.
    pub faults: usize,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages the peers published (a hello answered by 300 peers is 301).
    pub published: u64,
    /// Of which hellos (announcements and their answers).
    pub hellos: u64,
    /// Messages published, by kind.
    pub by_kind: BTreeMap<&'static str, u64>,
    /// Of which sent to one peer (its own topic): one delivery each.
    pub direct: u64,
    /// Messages published to the whole room, by kind.
    pub broadcast_by_kind: BTreeMap<&'static str, u64>,
    /// Simulated time at the end (ms).
    pub end_ms: u64,
    /// Elections won (terms with a controller).
    pub controllers: usize,
    /// When block 0 was committed (ms), if it was.
    pub first_commit_ms: Option<u64>,
    /// The longest a delivery waited for the broker's capacity (ms; see
    /// [`Scenario::deliveries_per_s`]).
    pub max_queue_ms: u64,
    /// Blocks committed after the faults ended.
    pub committed_after_faults: u64,
    /// Terms led by a second process under an id (a duplicate, or a member back with its disk
    /// lost), not the first process to run under it.
    pub led_by_later_process: usize,
    /// Too many members lost their data directories: no quorum of the configuration exists any
    /// more, so progress was not required (replacing members is not yet done).
    pub no_quorum: bool,
}

/// A check failed: what, when, and the trace that led there.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed that reproduces it.
    pub seed: u64,
    /// What went wrong.
    pub what: String,
    /// Simulated time (ms).
    pub at_ms: u64,
    /// The last trace lines.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {}: {} at {} ms (replay: cargo run -p hashvote-sim --release -- --seed {} --trace)",
            self.seed, self.what, self.at_ms, self.seed
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// One simulated process.
struct Proc {
    id: PeerId,
    key: u64,
    node: RoomNode,
    /// The process runs (not crashed).
    alive: bool,
    /// Connected to the broker.
    connected: bool,
    /// Bumped on every (re)connection: deliveries of an older connection are lost.
    conn: u64,
    /// Paused until this time: inputs wait.
    paused_until: u64,
    /// Cut off from the broker until this time.
    cut_until: u64,
    /// Inputs that arrived while paused.
    backlog: VecDeque<Input>,
    /// When the current (or last) standstill began: pauses that overlap make one.
    paused_since: u64,
    /// The current mining job's generation (0: none).
    job: u64,
    job_tx: u64,
    job_difficulty: u8,
    job_template: Option<hashvote_core::pow::Template>,
    /// The timer scheduled for this process.
    timer_at: u64,
    /// Its disk: what it persisted.
    disk: Disk,
    incarnation: u64,
    fatal: bool,
}

#[derive(Debug, Clone, Default)]
struct Disk {
    term: Term,
    voted_for: Option<PeerId>,
    config: Option<hashvote_core::room::RoomConfig>,
    blocks: Vec<Block>,
    commit: u64,
}

impl Disk {
    fn apply(&mut self, w: &Write) -> Result<(), String> {
        match w {
            Write::Vote { term, voted_for } => {
                if *term < self.term || (*term == self.term && self.voted_for.is_some() && *voted_for != self.voted_for)
                {
                    return Err(format!(
                        "vote {voted_for:?} in term {term} over {:?} in term {}",
                        self.voted_for, self.term
                    ));
                }
                self.term = *term;
                self.voted_for = *voted_for;
            }
            Write::Append(blocks) => {
                for b in blocks {
                    if b.tx != self.blocks.len() as u64 {
                        return Err(format!("append of block {} at height {}", b.tx, self.blocks.len()));
                    }
                    self.blocks.push(*b);
                }
            }
            Write::Truncate(h) => {
                self.blocks.truncate(*h as usize);
                if *h == 0 {
                    self.config = None;
                }
            }
            Write::Config(c) => self.config = Some(c.clone()),
            Write::Commit(c) => self.commit = self.commit.max(*c),
        }
        Ok(())
    }

    fn restored(&self) -> Restored {
        Restored {
            term: self.term,
            voted_for: self.voted_for,
            config: self.config.clone(),
            blocks: self.blocks.clone(),
            commit: self.commit,
        }
    }
}

/// An event at a time; ties in the order they were scheduled.
#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug)]
enum Ev {
    /// A message reaches process `to` over connection `conn`.
    Deliver { to: usize, conn: u64, env: Arc<Envelope> },
    /// The process's timer.
    Timer { p: usize },
    /// The process's miner finds a solution for job `job`.
    Mined { p: usize, job: u64 },
    /// A paused process resumes.
    Resume { p: usize },
    /// A process (re)connects.
    Connect { p: usize },
    /// The broker publishes the will of `p` for connection `conn` (keepalive expired), unless it
    /// restarted since (epoch).
    KeepaliveExpired { p: usize, conn: u64, epoch: u64 },
    /// Inject a random fault.
    Fault,
    /// Inject this fault.
    Scripted(Fault),
    /// The broker comes back.
    BrokerUp,
    /// A crashed process restarts.
    Restart { p: usize, lose_disk: bool },
}

/// The simulated world.
pub struct World {
    seed: u64,
    sc: Scenario,
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    procs: Vec<Proc>,
    /// The processes under each client id (more than one: a duplicate).
    by_id: HashMap<PeerId, Vec<usize>>,
    broker_up: bool,
    /// Bumped on every broker restart: sessions (and their wills) do not survive it.
    epoch: u64,
    /// Mining jobs handed out.
    jobs: u64,
    /// Probability (per mille) that a delivery is lost / duplicated / delayed, while a fault window lasts.
    loss: u32,
    dup: u32,
    delay: u32,
    chaos_until: u64,
    /// When each broker node is next free to deliver (µs; see [`Scenario::deliveries_per_s`]
    /// and [`Scenario::broker_nodes`]).
    broker_free_us: Vec<u64>,
    /// A fresh peer listens for the room until then: no message loss begins before.
    listening_until: u64,
    // Checker state.
    controllers: BTreeMap<Term, (PeerId, u64)>,
    committed: Vec<Block>,
    checked_commit: Vec<u64>,
    trace: VecDeque<Trace>,
    report: Report,
    last_fault: u64,
    commit_at_fault_end: Option<u64>,
    next_id: PeerId,
}

const TICK_MIN_MS: u64 = 1;

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("peers", &self.procs.len())
            .finish()
    }
}

impl World {
    /// A world for `seed` running `sc`.
    pub fn new(seed: u64, sc: Scenario) -> Self {
        let mut w = Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            procs: Vec::new(),
            by_id: HashMap::new(),
            broker_up: true,
            epoch: 0,
            jobs: 0,
            loss: 0,
            dup: 0,
            delay: 0,
            chaos_until: 0,
            broker_free_us: vec![0; sc.broker_nodes.max(1)],
            listening_until: 0,
            controllers: BTreeMap::new(),
            committed: Vec::new(),
            checked_commit: Vec::new(),
            trace: VecDeque::new(),
            report: Report::default(),
            last_fault: 0,
            commit_at_fault_end: None,
            next_id: 0,
            sc,
        };
        // Ids at random, as peers draw them; distinct.
        let mut ids: Vec<PeerId> = Vec::new();
        while ids.len() < w.sc.peers {
            let id = w.rng.random_range(1..=u32::MAX);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        w.next_id = 0;
        for id in ids {
            let at = w.rng.random_range(0..w.sc.connect_over_ms.max(1));
            w.spawn(id, at);
        }
        if w.sc.fault_every_ms > 0 {
            let at = w.rng.random_range(0..w.sc.fault_every_ms * 2);
            w.schedule(at, Ev::Fault);
        }
        w
    }

    fn spawn(&mut self, id: PeerId, at: u64) -> usize {
        let key = self.rng.random();
        let p = self.procs.len();
        let node = self.make_node(id, key, Restored::default());
        let incarnation = self.rng.random();
        self.procs.push(Proc {
            id,
            key,
            node,
            alive: true,
            connected: false,
            conn: 0,
            paused_until: 0,
            cut_until: 0,
            backlog: VecDeque::new(),
            paused_since: 0,
            job: 0,
            job_tx: 0,
            job_difficulty: 0,
            job_template: None,
            timer_at: u64::MAX,
            disk: Disk::default(),
            incarnation,
            fatal: false,
        });
        self.procs[p].node = self.make_node_inc(id, key, incarnation, Restored::default());
        self.checked_commit.push(0);
        self.by_id.entry(id).or_default().push(p);
        self.schedule(self.now + at, Ev::Connect { p });
        p
    }

    fn make_node(&mut self, id: PeerId, key: u64, restored: Restored) -> RoomNode {
        let inc = self.rng.random();
        self.make_node_inc(id, key, inc, restored)
    }

    fn make_node_inc(&mut self, id: PeerId, key: u64, incarnation: u64, restored: Restored) -> RoomNode {
        let cfg = RoomNodeConfig {
            id,
            key,
            incarnation,
            since_ms: self.now,
            room_size: self.sc.room_size,
            pace: Pace::Fixed(3),
            alg: HashAlg::Sha1,
            seed: self.rng.random(),
            timing: self.sc.timing,
        };
        RoomNode::new(cfg, restored)
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq: self.seq, ev }));
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.sc.trace > 0 {
            let (at, text) = (self.now, line());
            self.record(Trace::Note { at, text });
        }
    }

    /// Keeps a trace entry; formatted only when printed (formatting every delivery cost more than
    /// simulating it).
    fn record(&mut self, entry: Trace) {
        if self.sc.trace == 0 {
            return;
        }
        if self.trace.len() == self.sc.trace {
            self.trace.pop_front();
        }
        self.trace.push_back(entry);
    }

    fn trace_lines(&self) -> Vec<String> {
        self.trace.iter().map(Trace::line).collect()
    }

    fn fail(&self, what: String) -> Failure {
        Failure { seed: self.seed, what, at_ms: self.now, trace: self.trace_lines() }
    }

    /// Runs the scenario to its end, checking after every step.
    pub fn run(self) -> Result<Report, Failure> {
        self.run_with_trace().0
    }

    /// [`World::run`], also returning the trace.
    pub fn run_with_trace(mut self) -> (Result<Report, Failure>, Vec<String>) {
        let result = self.run_inner();
        (result, self.trace_lines())
    }

    fn run_inner(&mut self) -> Result<Report, Failure> {
        let end = self.sc.fault_ms + self.sc.settle_ms;
        while let Some(Reverse(Scheduled { at, ev, .. })) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            if self.commit_at_fault_end.is_none() && self.now >= self.sc.fault_ms.max(self.last_fault) {
                self.heal_all();
                self.commit_at_fault_end = Some(self.committed.len() as u64);
            }
            self.step(ev)?;
        }
        self.now = end;
        let after = self.committed.len() as u64 - self.commit_at_fault_end.unwrap_or(0);
        self.report.committed = self.committed.len() as u64;
        self.report.changes = self.committed.iter().filter(|b| b.change.is_some()).count() as u64;
        self.report.committed_after_faults = after;
        self.report.end_ms = end;
        self.report.controllers = self.controllers.len();
        self.report.terms = self.procs.iter().map(|p| p.node.term()).max().unwrap_or(0);
        let quorum_exists = self.members_up(false).is_none_or(|(up, quorum)| up >= quorum);
        self.report.no_quorum = !quorum_exists;
        let report = self.report.clone();
        if after == 0 && quorum_exists {
            return Err(self.no_progress());
        }
        self.check_caught_up(quorum_exists)?;
        self.check_replaced(end, quorum_exists)?;
        Ok(report)
    }

    /// The failure of a room that committed nothing after the faults ended though a quorum was
    /// up, with every process's state.
    fn no_progress(&self) -> Failure {
        let state: Vec<String> = self
            .procs
            .iter()
            .map(|p| {
                format!(
                    "{}: alive {} conn {} term {} ctl {:?} height {} commit {} voted {:?}",
                    p.id,
                    p.alive,
                    p.connected,
                    p.node.term(),
                    p.node.controller(),
                    p.node.chain().height(),
                    p.node.commit(),
                    p.node.voted_for()
                )
            })
            .collect();
        self.fail(format!(
            "no block committed in the {} ms after the faults ended (committed {}; published {:?}, to the whole room {:?}; broker queue up to {} ms); {}",
            self.sc.settle_ms,
            self.committed.len(),
            self.report.by_kind,
            self.report.broadcast_by_kind,
            self.report.max_queue_ms,
            state.join("; ")
        ))
    }

    /// At the end of the run: every process up and connected holds the blocks committed when the
    /// faults ended.
    fn check_caught_up(&self, quorum_exists: bool) -> Result<(), Failure> {
        // Every peer verifies every block: each one up holds what was committed when the faults
        // ended, voter or not, however far behind it was (as long as a quorum lives: without
        // one, no controller hands out blocks).
        let committed = self.commit_at_fault_end.unwrap_or(0);
        let behind =
            self.procs.iter().find(|p| quorum_exists && p.alive && p.connected && p.node.chain().height() < committed);
        if let Some(p) = behind {
            return Err(self.fail(format!(
                "peer {} holds {} blocks, {} ms after the faults ended with {} committed (its term {}, controller {:?}, vote {:?}, key {})",
                p.id,
                p.node.chain().height(),
                self.sc.settle_ms,
                self.commit_at_fault_end.unwrap_or(0),
                p.node.term(), p.node.controller(), p.node.voted_for(), p.node.key()
            )));
        }
        Ok(())
    }

    /// At the end of the run: a member lost for good was replaced, if there was time and a peer
    /// to replace it with.
    fn check_replaced(&self, end: u64, quorum_exists: bool) -> Result<(), Failure> {
        // A member lost for good (dead, or back with its disk lost: another key) is replaced by
        // a peer that can take its place: the controller removes it after `replace_after_ms` of
        // silence, then adds the other, one committed change at a time.
        let replace = self.sc.timing.replace_after_ms;
        // Given the time: its silence, then a block of the controller's term, then two changes.
        let elected = self.controllers.last_key_value().map_or(u64::MAX, |(_, &(_, at))| at);
        let time = elected.saturating_add(replace + 3_000) <= end;
        if let Some(config) = self.room_config().filter(|_| quorum_exists && replace > 0 && time) {
            // An heir: a live process that is no member, under an id no member holds or the lost
            // member's own (ids are unique in a configuration: a process under another member's
            // id cannot take this one's place; seed 48793 once said one could).
            let heir = |m: &hashvote_core::room::Member| {
                self.procs.iter().find(|p| {
                    p.alive
                        && p.connected
                        && config.key_of(p.id) != Some(p.key)
                        && (p.id == m.id || config.key_of(p.id).is_none())
                })
            };
            let lost = (config.members().iter())
                .filter(|m| !self.procs.iter().any(|p| p.alive && p.id == m.id && p.key == m.key))
                .find_map(|m| heir(m).map(|h| (m, h)));
            if let Some((m, h)) = lost {
                return Err(self.fail(format!(
                    "member {} is lost for good and not replaced {} ms after the faults ended, though {} could take its place",
                    m.id, self.sc.settle_ms, h.id
                )));
            }
        }
        Ok(())
    }

    fn step(&mut self, ev: Ev) -> Result<(), Failure> {
        match ev {
            Ev::Deliver { to, conn, env } => {
                let p = &self.procs[to];
                if !p.alive || !p.connected || p.conn != conn {
                    return Ok(());
                }
                self.report.delivered += 1;
                if self.sc.trace > 0 {
                    let (at, id) = (self.now, self.procs[to].id);
                    self.record(Trace::Input { at, id, input: TraceInput::Message(env.clone()) });
                }
                self.input(to, Input::Message((*env).clone()))?;
            }
            Ev::Timer { p } => {
                if self.procs[p].timer_at != self.now || !self.procs[p].alive {
                    return Ok(());
                }
                self.procs[p].timer_at = u64::MAX;
                self.input(p, Input::Tick)?;
            }
            Ev::Mined { p, job } => self.mined(p, job)?,
            Ev::Resume { p } => self.resume(p)?,
            Ev::Connect { p } => self.connect(p)?,
            Ev::KeepaliveExpired { p, conn, epoch } => {
                if self.procs[p].conn != conn || epoch != self.epoch || !self.broker_up {
                    return Ok(());
                }
                // The broker gives up on the connection and publishes the will.
                self.procs[p].connected = false;
                self.publish_will(p);
                if self.procs[p].alive {
                    self.schedule(self.now + 1, Ev::Connect { p });
                }
            }
            Ev::Fault => {
                if self.now < self.sc.fault_ms {
                    self.fault();
                    let next = self.now + self.rng.random_range(1..self.sc.fault_every_ms * 2);
                    self.schedule(next, Ev::Fault);
                }
            }
            Ev::Scripted(fault) => self.apply(fault),
            Ev::BrokerUp => {
                self.broker_up = true;
                self.log(|| "broker up".into());
                for p in 0..self.procs.len() {
                    if self.procs[p].alive {
                        let at = self.now + self.rng.random_range(1..500);
                        self.schedule(at, Ev::Connect { p });
                    }
                }
            }
            Ev::Restart { p, lose_disk } => self.restart(p, lose_disk)?,
        }
        Ok(())
    }

    /// The miner of process `p` finished job `job`: searches a window of nonces from a random
    /// start, and hands the node a solution if the window holds one (a job since replaced, or
    /// of a dead process, is forgotten).
    fn mined(&mut self, p: usize, job: u64) -> Result<(), Failure> {
        let pr = &self.procs[p];
        if !pr.alive || pr.job != job {
            return Ok(());
        }
        let Some(template) = pr.job_template else { return Ok(()) };
        let start = self.rng.random::<u32>() as u64;
        let nonce = template.search(u32::from(pr.job_difficulty), start, 1 << 20);
        let Some(nonce) = nonce else { return Ok(()) };
        let found = Found { tx: pr.job_tx, nonce, hashes: 1, elapsed_ms: 1 };
        self.procs[p].job = 0;
        self.input(p, Input::Mined(found))
    }

    /// A paused process runs again: it notices the standstill if it was long, works through the
    /// inputs that queued meanwhile, and reconnects if its connection was lost.
    fn resume(&mut self, p: usize) -> Result<(), Failure> {
        // Only the resumption due now: an earlier pause's (overlapped by a later one), or
        // one that the end of the faults brought forward, is past (seed 788197: a
        // controller told twice that it stood still stepped down again 2 s later).
        if self.procs[p].paused_until != self.now || !self.procs[p].alive {
            return Ok(());
        }
        // The peer's own check: its tick came more than 1.5 x keepalive late.
        if self.now - self.procs[p].paused_since > self.sc.keepalive_ms * 3 / 2 {
            self.input(p, Input::Stalled)?;
        }
        while let Some(input) = self.procs[p].backlog.pop_front() {
            self.input(p, input)?;
        }
        if !self.procs[p].connected {
            self.schedule(self.now + 1, Ev::Connect { p });
        }
        self.arm(p);
        Ok(())
    }

    /// Process `p` tries to connect: it does once it is neither cut off nor paused and the
    /// broker is up; while blocked, it tries again a little after.
    fn connect(&mut self, p: usize) -> Result<(), Failure> {
        let pr = &self.procs[p];
        if !pr.alive || pr.connected || !self.broker_up {
            return Ok(());
        }
        let blocked = pr.cut_until.max(pr.paused_until);
        if self.now < blocked {
            let at = blocked + self.rng.random_range(1..100);
            self.schedule(at, Ev::Connect { p });
            return Ok(());
        }
        self.procs[p].connected = true;
        self.procs[p].conn += 1;
        self.log(|| format!("{} connects", p));
        self.input(p, Input::Connected)
    }

    /// A crashed process starts again, from its disk or (`lose_disk`) with an empty one and a new
    /// key; it keeps its disk when a fresh peer could not hear the room now.
    fn restart(&mut self, p: usize, mut lose_disk: bool) -> Result<(), Failure> {
        if self.procs[p].alive {
            return Ok(());
        }
        if lose_disk && !self.fresh_peer_allowed() {
            self.log(|| format!("{p} keeps its disk: the room could not be heard"));
            lose_disk = false;
        }
        if lose_disk {
            self.fresh_listening();
        }
        let (id, mut key) = (self.procs[p].id, self.procs[p].key);
        if lose_disk {
            key = self.rng.random();
            self.procs[p].disk = Disk::default();
            self.checked_commit[p] = 0;
        }
        let restored = self.procs[p].disk.restored();
        let incarnation = self.rng.random();
        let node = self.make_node_inc(id, key, incarnation, restored);
        let pr = &mut self.procs[p];
        pr.key = key;
        pr.node = node;
        pr.alive = true;
        pr.connected = false;
        pr.incarnation = incarnation;
        pr.paused_until = 0;
        pr.cut_until = 0;
        pr.backlog.clear();
        pr.job = 0;
        pr.fatal = false;
        self.log(|| format!("{p} restarts{}", if lose_disk { " with an empty disk" } else { "" }));
        self.schedule(self.now + 1, Ev::Connect { p });
        self.check(p)
    }

    /// Feeds one input to process `p` (queued if it is paused) and carries out its actions.
    fn input(&mut self, p: usize, input: Input) -> Result<(), Failure> {
        if !self.procs[p].alive {
            return Ok(());
        }
        if self.now < self.procs[p].paused_until {
            if self.procs[p].backlog.len() < 100_000 {
                self.procs[p].backlog.push_back(input);
            }
            return Ok(());
        }
        if self.sc.trace > 0 {
            let (at, id) = (self.now, self.procs[p].id);
            // Messages are recorded when delivered (see `Ev::Deliver`).
            let input = match &input {
                Input::Message(_) => None,
                Input::Mined(f) => Some(TraceInput::Mined(f.tx)),
                other => Some(TraceInput::Other(format!("{other:?}"))),
            };
            if let Some(input) = input {
                self.record(Trace::Input { at, id, input });
            }
        }
        let actions = self.procs[p].node.handle(self.now, input);
        // A crash in the middle of a batch: the actions before it happened, the rest did not.
        let crash_at = if self.crash_mid_batch() { Some(self.rng.random_range(0..=actions.len())) } else { None };
        for (i, action) in actions.into_iter().enumerate() {
            if crash_at == Some(i) {
                self.crash(p, "mid-batch");
                return self.check(p);
            }
            self.act(p, action)?;
        }
        self.check(p)?;
        self.arm(p);
        Ok(())
    }

    fn crash_mid_batch(&mut self) -> bool {
        self.now < self.sc.fault_ms && self.sc.fault_every_ms > 0 && self.rng.random_range(0..20_000) == 0
    }

    fn arm(&mut self, p: usize) {
        if !self.procs[p].alive {
            return;
        }
        let at = self.procs[p].node.next_timer().max(self.now + TICK_MIN_MS);
        if at < self.procs[p].timer_at || self.procs[p].timer_at <= self.now {
            self.procs[p].timer_at = at;
            self.schedule(at, Ev::Timer { p });
        }
    }

    fn act(&mut self, p: usize, action: Action) -> Result<(), Failure> {
        match action {
            Action::Persist(w) => {
                if let Err(e) = self.procs[p].disk.apply(&w) {
                    return Err(self.fail(format!("peer {} wrote an inconsistent disk: {e}", self.procs[p].id)));
                }
            }
            Action::Publish(msg) => self.publish(p, msg),
            Action::Mine(job) => {
                let miners = self.procs.iter().filter(|q| q.alive).count().max(1) as f64;
                let mean = self.sc.block_ms as f64 * miners;
                let wait = (-mean * (1.0 - self.rng.random::<f64>()).ln()).min(1e9) as u64 + 1;
                self.jobs += 1;
                let gen_ = self.jobs;
                let pr = &mut self.procs[p];
                pr.job = gen_;
                pr.job_tx = job.tx;
                pr.job_difficulty = job.difficulty;
                pr.job_template = Some(job.template);
                self.schedule(self.now + wait, Ev::Mined { p, job: gen_ });
            }
            Action::StopMining => self.procs[p].job = 0,
            Action::Emit(event) => self.event(p, event)?,
            Action::Fatal(why) => {
                self.log(|| format!("{} fatal: {why}", p));
                self.procs[p].fatal = true;
                self.crash(p, "fatal");
            }
        }
        Ok(())
    }

    fn event(&mut self, p: usize, event: Event) -> Result<(), Failure> {
        let id = self.procs[p].id;
        match &event {
            Event::CommittedConflict { tx, commit } => {
                return Err(self.fail(format!("peer {id} was asked to drop committed block {tx} (commit {commit})")));
            }
            Event::ControllerElected { term, controller, .. } if *controller == id => {
                if let Some(&(other, _)) = self.controllers.get(term)
                    && other != id
                {
                    return Err(self.fail(format!("two controllers in term {term}: {other} and {id}")));
                }
                self.controllers.insert(*term, (id, self.now));
                if self.procs.iter().position(|q| q.id == id) != Some(p) {
                    self.report.led_by_later_process += 1;
                }
            }
            _ => {}
        }
        if self.sc.trace > 0 {
            let at = self.now;
            self.record(Trace::Event { at, id, event });
        }
        Ok(())
    }

    /// Safety after a step of process `p`: its committed prefix is the room's.
    fn check(&mut self, p: usize) -> Result<(), Failure> {
        let pr = &self.procs[p];
        if !pr.alive {
            return Ok(());
        }
        let node = &pr.node;
        let commit = node.commit();
        if node.chain().height() < commit {
            return Err(self.fail(format!(
                "peer {} holds {} blocks but says {commit} are committed",
                pr.id,
                node.chain().height()
            )));
        }
        // A controller is a member; whom a peer follows was one at some point of its chain (a
        // peer catching up follows the controller through blocks from before it joined).
        let added = |c: PeerId| {
            node.chain().blocks().iter().any(|b| matches!(b.change, Some(Change::Add { id, .. }) if id == c))
        };
        if let (Some(config), Some(c)) = (node.config(), node.controller())
            && config.key_of(c).is_none()
            && !added(c)
        {
            return Err(self.fail(format!("peer {} follows {c}, who is not a member of the room", pr.id)));
        }
        if node.is_controller() && node.members().is_some_and(|m| m.key_of(pr.id) != Some(pr.key)) {
            return Err(self.fail(format!("peer {} is controller but not a member of the room", pr.id)));
        }
        if node.is_controller()
            && let Some(&(other, _)) = self.controllers.get(&node.term())
            && other != pr.id
        {
            return Err(self.fail(format!("two controllers in term {}: {other} and {}", node.term(), pr.id)));
        }
        // The committed prefix: blocks below `commit` equal the room's committed blocks. By the
        // hash chain, checking the last one checks them all; new ones are recorded.
        let from = self.checked_commit[p].min(commit);
        for h in from..commit {
            let block = *node.chain().get(h).expect("height checked above");
            match self.committed.get(h as usize) {
                // Known by the hash (it covers prev, tx, miner and nonce); two controllers may
                // record one solution under their own terms.
                Some(b) if b.hash != block.hash => {
                    return Err(self.fail(format!(
                        "peer {} committed block {h} {} where the room committed {}",
                        pr.id, block.hash, b.hash
                    )));
                }
                Some(_) => {}
                None => {
                    debug_assert_eq!(self.committed.len() as u64, h);
                    self.committed.push(block);
                    self.report.first_commit_ms.get_or_insert(self.now);
                }
            }
        }
        if commit > 0 {
            let tip = node.chain().get(commit - 1).expect("height checked above");
            if tip.hash != self.committed[commit as usize - 1].hash {
                let id = pr.id;
                return Err(self.fail(format!("peer {id} changed committed block {}", commit - 1)));
            }
        }
        self.checked_commit[p] = commit;
        Ok(())
    }

    // ----- The broker ----------------------------------------------------------------------------

    fn publish(&mut self, p: usize, msg: Msg) {
        let pr = &self.procs[p];
        if !pr.alive || !pr.connected || !self.broker_up {
            return;
        }
        let from = pr.id;
        self.report.published += 1;
        *self.report.by_kind.entry(msg.kind()).or_default() += 1;
        if matches!(msg, Msg::Hello { .. }) {
            self.report.hellos += 1;
        }
        let channel = msg.channel();
        let env = Arc::new(Envelope::new(from, msg));
        let chaos = self.now < self.chaos_until;
        let direct = match channel {
            Channel::Direct(to) => Some(self.by_id.get(&to).cloned().unwrap_or_default()),
            _ => None,
        };
        self.report.direct += u64::from(direct.is_some());
        if direct.is_none() {
            *self.report.broadcast_by_kind.entry(env.msg.kind()).or_default() += 1;
        }
        let count = direct.as_ref().map_or(self.procs.len(), Vec::len);
        for i in 0..count {
            let q = direct.as_ref().map_or(i, |d| d[i]);
            let sub = &self.procs[q];
            if !sub.connected || !sub.alive {
                continue;
            }
            // A peer subscribes to the solutions only while it is controller (the peer's driver
            // does so before its first challenge goes out).
            if matches!(env.msg, Msg::Solution { .. }) && !sub.node.is_controller() {
                continue;
            }
            // A fixed latency per (publisher, subscriber) keeps each pair's messages in order,
            // and so does the broker's queue (it only grows later).
            let base = 1 + (hash3(self.seed, p as u64, q as u64) % 4);
            let nodes = self.broker_free_us.len();
            // The subscriber's node queues the delivery; another node's message enters it later.
            let node = q % nodes;
            let hop = if p % nodes == node { 0 } else { self.sc.node_hop_ms };
            let mut at = self.now + base + hop;
            if let Some(us) = (1_000_000 * nodes as u64).checked_div(self.sc.deliveries_per_s) {
                let free = self.broker_free_us[node].max((self.now + hop) * 1000) + us;
                self.broker_free_us[node] = free;
                let queued = free.div_ceil(1000);
                self.report.max_queue_ms = self.report.max_queue_ms.max(queued.saturating_sub(at));
                at = at.max(queued);
            }
            if chaos {
                let roll = self.rng.random_range(0..1000);
                if roll < self.loss {
                    continue;
                }
                if roll < self.loss + self.delay {
                    at += self.rng.random_range(0..400);
                }
                if roll >= 1000 - self.dup {
                    let conn = sub.conn;
                    self.schedule(at + 1, Ev::Deliver { to: q, conn, env: env.clone() });
                }
            }
            let conn = self.procs[q].conn;
            self.schedule(at, Ev::Deliver { to: q, conn, env: env.clone() });
        }
    }

    /// A stranger publishes a heartbeat and a challenge of the highest term, and a heartbeat of
    /// the next, to every connected process.
    /// Only once the room's configuration is committed: before block 0, nothing tells a member
    /// from a stranger (see docs/PROTOCOL.md, "Fencing").
    fn forge(&mut self) {
        if self.room_config().is_none() {
            return;
        }
        let stranger = loop {
            let id = self.rng.random_range(1..=u32::MAX);
            if !self.by_id.contains_key(&id) {
                break id;
            }
        };
        let term = self.procs.iter().map(|p| p.node.term()).max().unwrap_or(0);
        self.log(|| format!("stranger {stranger} speaks as controller of terms {term} and {}", term + 1));
        let tip = Digest::Sha1(self.rng.random());
        let challenge = Challenge {
            term,
            tx: 0,
            alg: HashAlg::Sha1,
            difficulty: 1,
            pace: Pace::Fixed(1),
            issued_ms: self.now,
            prev: tip,
        };
        let msgs = [
            Msg::Heartbeat { term, key: self.rng.random(), height: 1_000, commit: 1_000, tip, open: None },
            Msg::Challenge { challenge, commit: 0, config: None },
            Msg::Heartbeat { term: term + 1, key: self.rng.random(), height: 1_000, commit: 1_000, tip, open: None },
        ];
        if !self.broker_up {
            return;
        }
        for msg in msgs {
            let env = Arc::new(Envelope::new(stranger, msg));
            for q in 0..self.procs.len() {
                if self.procs[q].connected && self.procs[q].alive {
                    let (at, conn) = (self.now + 1 + self.rng.random_range(0..50), self.procs[q].conn);
                    self.schedule(at, Ev::Deliver { to: q, conn, env: env.clone() });
                }
            }
        }
    }

    /// The broker publishes the Last Will of `p`'s connection: its `Leave`.
    fn publish_will(&mut self, p: usize) {
        if !self.broker_up {
            return;
        }
        let (id, incarnation) = (self.procs[p].id, self.procs[p].incarnation);
        self.log(|| format!("will of {id}"));
        let env = Arc::new(Envelope::new(id, Msg::Leave { incarnation }));
        for q in 0..self.procs.len() {
            if q != p && self.procs[q].connected && self.procs[q].alive {
                let base = 1 + (hash3(self.seed, p as u64, q as u64) % 4);
                let conn = self.procs[q].conn;
                self.schedule(self.now + base, Ev::Deliver { to: q, conn, env: env.clone() });
            }
        }
    }

    // ----- Faults --------------------------------------------------------------------------------

    fn crash(&mut self, p: usize, why: &str) {
        let id = self.procs[p].id;
        self.log(|| format!("{id} crashes ({why})"));
        let was_connected = self.procs[p].connected;
        let pr = &mut self.procs[p];
        pr.alive = false;
        pr.connected = false;
        pr.job = 0;
        pr.backlog.clear();
        // The OS closes the socket: the broker publishes the will at once. (Cut off, the broker
        // learns of it only when the keepalive already scheduled expires.)
        if was_connected {
            self.publish_will(p);
        }
    }

    fn heal_all(&mut self) {
        self.chaos_until = 0;
        self.log(|| "faults end".into());
        if !self.broker_up {
            self.schedule(self.now, Ev::BrokerUp);
        }
        // Sometimes one crashed peer stays dead for good, as a machine that never comes back: the
        // others must not wait on it (a sync request it will never answer, say). Only once
        // another peer holds block 0 committed, which records the configuration: before, a room waits for
        // all of its first `room_size` peers to meet (or for newcomers to complete it).
        let dead: Vec<usize> =
            (0..self.procs.len()).filter(|&p| !self.procs[p].alive && !self.procs[p].fatal).collect();
        let pick = (!dead.is_empty() && self.rng.random_bool(0.3)).then(|| dead[self.rng.random_range(0..dead.len())]);
        let for_good = pick.filter(|&d| {
            // Block 0 committed: the configuration is known, and with it whether a quorum is
            // left to make progress (see `members_up`). Held but uncommitted, it may be lost.
            self.procs.iter().enumerate().any(|(q, p)| q != d && p.node.commit() > 0)
        });
        if let Some(p) = for_good {
            let id = self.procs[p].id;
            self.log(|| format!("{id} stays dead"));
        }
        for p in 0..self.procs.len() {
            let pr = &self.procs[p];
            if !pr.alive && !pr.fatal && Some(p) != for_good {
                self.schedule(self.now + 1, Ev::Restart { p, lose_disk: false });
            } else if pr.alive {
                self.procs[p].cut_until = self.procs[p].cut_until.min(self.now);
                if self.procs[p].paused_until > self.now {
                    self.procs[p].paused_until = self.now;
                    self.schedule(self.now, Ev::Resume { p });
                }
                if !self.procs[p].connected {
                    self.schedule(self.now + 1, Ev::Connect { p });
                }
            }
        }
    }

    fn controller_proc(&self) -> Option<usize> {
        self.procs.iter().position(|p| p.alive && p.node.is_controller())
    }

    fn random_alive(&mut self) -> Option<usize> {
        let alive: Vec<usize> = (0..self.procs.len()).filter(|&p| self.procs[p].alive).collect();
        if alive.is_empty() { None } else { Some(alive[self.rng.random_range(0..alive.len())]) }
    }

    fn fault(&mut self) {
        let kind = self.rng.random_range(0..13);
        // Prefer the controller as a victim half of the time: that is where the protocol works hardest.
        let victim = if self.rng.random_bool(0.5) {
            self.controller_proc().or_else(|| self.random_alive())
        } else {
            self.random_alive()
        };
        let Some(p) = victim else { return };
        let fault = match kind {
            0 | 1 => Fault::Kill { p, down_ms: self.rng.random_range(50..2_000), lose_disk: false },
            2 => Fault::Kill { p, down_ms: self.rng.random_range(50..2_000), lose_disk: true },
            3 => Fault::Pause { p, ms: self.rng.random_range(100..3_000) },
            4 | 5 => {
                let n = self.procs.len();
                let size = if self.rng.random_bool(0.5) { 1 } else { (n.saturating_sub(1) / 2).max(1) };
                let mut cut = vec![p];
                while cut.len() < size {
                    let q = self.rng.random_range(0..n);
                    if !cut.contains(&q) {
                        cut.push(q);
                    }
                }
                Fault::Cut { procs: cut, ms: self.rng.random_range(200..4_000) }
            }
            6 => Fault::BrokerDown { ms: self.rng.random_range(100..2_000) },
            7 | 8 => Fault::Chaos {
                ms: self.rng.random_range(200..2_000),
                loss: self.rng.random_range(0..300),
                dup: self.rng.random_range(0..100),
                delay: self.rng.random_range(0..300),
            },
            9 => Fault::Newcomer,
            10 => Fault::Duplicate { p },
            11 => Fault::RoomRestart,
            _ => Fault::Forgery,
        };
        self.apply(fault);
    }

    /// Schedules `fault` at `at_ms` (a scripted scenario).
    pub fn script(&mut self, at_ms: u64, fault: Fault) {
        self.schedule(at_ms, Ev::Scripted(fault));
    }

    /// The index of the process that is controller of the highest term now, if any.
    pub fn controller_index(&self) -> Option<usize> {
        self.procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.alive && p.node.is_controller())
            .max_by_key(|(_, p)| p.node.term())
            .map(|(i, _)| i)
    }

    fn apply(&mut self, fault: Fault) {
        self.report.faults += 1;
        self.last_fault = self.now;
        match fault {
            Fault::Kill { p, down_ms, lose_disk } => {
                let p = self.resolve(p);
                self.crash(p, if lose_disk { "disk lost" } else { "kill -9" });
                if down_ms < u64::MAX {
                    self.schedule(self.now + down_ms, Ev::Restart { p, lose_disk });
                } else {
                    // Gone for good: not restarted when the faults end.
                    self.procs[p].fatal = true;
                }
            }
            Fault::Pause { p, ms } => {
                let p = self.resolve(p);
                self.pause(p, ms);
            }
            Fault::Cut { procs, ms } => {
                for q in procs {
                    let q = self.resolve(q);
                    self.cut(q, ms);
                }
            }
            Fault::BrokerDown { ms } => {
                if self.broker_up {
                    self.log(|| format!("broker down for {ms} ms"));
                    self.broker_up = false;
                    self.epoch += 1;
                    for p in 0..self.procs.len() {
                        self.procs[p].connected = false;
                    }
                    self.schedule(self.now + ms, Ev::BrokerUp);
                }
            }
            Fault::Chaos { .. } if self.now < self.listening_until => {
                self.log(|| "no network chaos while a fresh peer listens for the room".into());
            }
            Fault::Chaos { ms, loss, dup, delay } => {
                self.log(|| format!("network chaos for {ms} ms: loss {loss}, dup {dup}, delay {delay} per mille"));
                (self.loss, self.dup, self.delay) = (loss, dup, delay);
                self.chaos_until = self.now + ms;
            }
            Fault::Newcomer => {
                // Not in the configuration once block 0 is committed: a non-voting member.
                if self.may_add_process() {
                    let id = self.rng.random_range(1..=u32::MAX);
                    self.log(|| format!("newcomer {id}"));
                    self.add_process(id);
                }
            }
            Fault::Duplicate { p } => {
                // A second process under an existing id, with its own (new) data directory.
                let p = self.resolve(p);
                if self.may_add_process() {
                    let id = self.procs[p].id;
                    self.log(|| format!("duplicate of {id}"));
                    self.add_process(id);
                }
            }
            Fault::RoomRestart => {
                self.log(|| "whole room killed".into());
                for p in 0..self.procs.len() {
                    if self.procs[p].alive {
                        self.crash(p, "room restart");
                        let at = self.now + self.rng.random_range(50..800);
                        self.schedule(at, Ev::Restart { p, lose_disk: false });
                    }
                }
            }
            Fault::Forgery => self.forge(),
        }
    }

    /// Process `p` stands still for `ms` (a pause of a process already paused lengthens its
    /// standstill, never shortens it); its keepalive expires if the standstill is long enough.
    fn pause(&mut self, p: usize, ms: u64) {
        let id = self.procs[p].id;
        self.log(|| format!("{id} paused for {ms} ms"));
        let limit = self.sc.keepalive_ms * 3 / 2;
        let pr = &mut self.procs[p];
        let paused = pr.paused_until > self.now;
        let expired_before = paused && pr.paused_until - pr.paused_since > limit;
        if !paused {
            pr.paused_since = self.now;
        }
        pr.paused_until = pr.paused_until.max(self.now + ms);
        if pr.connected && !expired_before && pr.paused_until - pr.paused_since > limit {
            // Its keepalive expires while it stands still.
            let (conn, epoch) = (pr.conn, self.epoch);
            let at = self.now.max(pr.paused_since + limit);
            self.schedule(at, Ev::KeepaliveExpired { p, conn, epoch });
        }
        let until = self.procs[p].paused_until;
        self.schedule(until, Ev::Resume { p });
    }

    /// Process `q` is cut off from the broker for `ms`: it reconnects a little after.
    fn cut(&mut self, q: usize, ms: u64) {
        let id = self.procs[q].id;
        self.log(|| format!("{id} cut off for {ms} ms"));
        self.procs[q].cut_until = self.now + ms;
        if self.procs[q].connected && self.procs[q].alive {
            // Both ends lose the connection; the broker only notices at keepalive.
            let (conn, epoch) = (self.procs[q].conn, self.epoch);
            self.procs[q].connected = false;
            self.schedule(self.now + self.sc.keepalive_ms * 3 / 2, Ev::KeepaliveExpired { p: q, conn, epoch });
            let back = self.now + ms + self.rng.random_range(1..200);
            self.schedule(back, Ev::Connect { p: q });
        }
    }

    /// Whether a process with an empty disk may join now: it could hear the room, and the room
    /// has not grown by three already.
    fn may_add_process(&self) -> bool {
        self.fresh_peer_allowed() && self.procs.len() < self.sc.peers + 3
    }

    /// Starts a process under `id` with an empty disk.
    fn add_process(&mut self, id: PeerId) {
        self.fresh_listening();
        self.spawn(id, 1);
    }

    /// The room's committed configuration (from block 0), if the room has one.
    /// The voting members as of the most blocks any peer knows committed.
    fn room_config(&self) -> Option<hashvote_core::room::RoomConfig> {
        let p = self.procs.iter().filter(|p| p.node.commit() > 0).max_by_key(|p| p.node.commit())?;
        p.node.members_at(p.node.commit())
    }

    /// Members of the configuration that run with their own data directory (and, if `connected`,
    /// are connected), against the quorum.
    /// With changes of members, each peer's configuration is its chain's (uncommitted changes
    /// included): a controller needs a quorum of its own, so the room can go on if some peer
    /// that is up holds a configuration of which a quorum is up. The best such margin is
    /// returned (the committed configuration's when no peer that is up holds one).
    fn members_up(&self, connected: bool) -> Option<(usize, usize)> {
        let up_in = |config: &hashvote_core::room::RoomConfig| {
            let up = config
                .members()
                .iter()
                .filter(|m| {
                    self.procs.iter().any(|p| {
                        p.id == m.id
                            && p.key == m.key
                            && p.alive
                            && (!connected || p.connected && p.paused_until <= self.now)
                            && p.node.chain().height() > 0
                    })
                })
                .count();
            (up, config.quorum())
        };
        let committed = self.room_config()?;
        let held =
            self.procs.iter().filter(|p| p.alive && p.node.chain().height() > 0).filter_map(|p| p.node.members());
        held.map(up_in).max_by_key(|&(up, quorum)| up as i64 - quorum as i64).or(Some(up_in(&committed)))
    }

    /// Whether a peer with an empty data directory may start now. The documented assumption: a
    /// room is founded only where none of an existing room's peers can be heard; a fresh peer
    /// that meets the room learns its chain and never founds another. So fresh peers start while
    /// a quorum of the room is up and messages are not being lost (no chaos now, none started
    /// while a fresh peer listens: see `listening_until`).
    fn fresh_listening(&mut self) {
        // Its listening, with time to connect and for the room's answers to travel.
        let until = self.now + self.sc.timing.discovery_ms + 100;
        self.listening_until = self.listening_until.max(until);
    }

    fn fresh_peer_allowed(&self) -> bool {
        self.now >= self.chaos_until && self.members_up(true).is_some_and(|(up, quorum)| up >= quorum)
    }

    /// [`CONTROLLER`] stands for the controller of the moment (or any live process).
    fn resolve(&mut self, p: usize) -> usize {
        if p == CONTROLLER { self.controller_index().or_else(|| self.random_alive()).unwrap_or(0) } else { p }
    }
}

/// In a scripted [`Fault`], the process that is controller when the fault happens.
pub const CONTROLLER: usize = usize::MAX;

/// A fault, injected at random or by a script.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Kill process `p` (`kill -9`); it restarts after `down_ms` (never if `u64::MAX`), with its
    /// disk or an empty one.
    Kill {
        /// The process (or [`CONTROLLER`]).
        p: usize,
        /// Time until it restarts.
        down_ms: u64,
        /// It comes back with an empty data directory (a new key).
        lose_disk: bool,
    },
    /// Stop process `p` (SIGSTOP) for `ms`.
    Pause {
        /// The process (or [`CONTROLLER`]).
        p: usize,
        /// How long.
        ms: u64,
    },
    /// Cut these processes off the broker for `ms`.
    Cut {
        /// The processes.
        procs: Vec<usize>,
        /// How long.
        ms: u64,
    },
    /// Stop the broker for `ms` (sessions, wills and retained messages are lost).
    BrokerDown {
        /// How long.
        ms: u64,
    },
    /// For `ms`, lose, duplicate or delay deliveries with these probabilities (per mille).
    Chaos {
        /// How long.
        ms: u64,
        /// Loss.
        loss: u32,
        /// Duplication.
        dup: u32,
        /// Delay (up to 400 ms).
        delay: u32,
    },
    /// A new peer joins.
    Newcomer,
    /// A second process claims process `p`'s id.
    Duplicate {
        /// The process.
        p: usize,
    },
    /// Every process killed, then started again from its disk.
    RoomRestart,
    /// A stranger (an id outside the room's committed configuration) speaks as controller, in
    /// the current term and the next.
    Forgery,
}

/// One entry of the trace.
#[derive(Debug)]
enum Trace {
    Input { at: u64, id: PeerId, input: TraceInput },
    Event { at: u64, id: PeerId, event: Event },
    Note { at: u64, text: String },
}

#[derive(Debug)]
enum TraceInput {
    Message(Arc<Envelope>),
    Mined(u64),
    Other(String),
}

impl Trace {
    fn line(&self) -> String {
        match self {
            Self::Input { at, id, input: TraceInput::Message(env) } => {
                format!("{at:>7} {id} <- {}: {}", env.from, short(&env.msg))
            }
            Self::Input { at, id, input: TraceInput::Mined(tx) } => format!("{at:>7} {id} <- mined tx {tx}"),
            Self::Input { at, id, input: TraceInput::Other(what) } => format!("{at:>7} {id} <- {what}"),
            Self::Event { at, id, event } => format!("{at:>7} {id} event {event:?}"),
            Self::Note { at, text } => format!("{at:>7} {text}"),
        }
    }
}

fn hash3(a: u64, b: u64, c: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x
}

fn short(msg: &Msg) -> String {
    match msg {
        Msg::SyncReply { term, blocks, height, commit, .. } => {
            format!(
                "SyncReply {{ term: {term}, blocks: {}..{}, height: {height}, commit: {commit} }}",
                blocks.first().map_or(0, |b| b.tx),
                blocks.last().map_or(0, |b| b.tx + 1)
            )
        }
        Msg::Result { term, outcome: hashvote_core::protocol::Outcome::Accepted(b), commit } => {
            format!("Result {{ term: {term}, accepted: {} (term {}), commit: {commit} }}", b.tx, b.term)
        }
        other => format!("{other:?}"),
    }
}

/// Runs `seeds` seeds of `scenario(seed)` on `threads` threads; returns the reports and the
/// failures (the first three with their traces).
pub fn run_seeds(
    seeds: std::ops::Range<u64>,
    threads: usize,
    scenario: impl Fn(u64) -> Scenario + Sync,
) -> (Vec<Report>, Vec<Failure>) {
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let results = std::sync::Mutex::new((Vec::new(), Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    let outcome = World::new(seed, scenario(seed)).run();
                    let mut r = results.lock().expect("no thread panics while holding the lock");
                    match outcome {
                        Ok(report) => r.0.push(report),
                        Err(mut f) => {
                            // Every failure counts; the first few keep their traces.
                            if r.1.len() >= 3 {
                                f.trace.clear();
                            }
                            r.1.push(f);
                        }
                    }
                }
            });
        }
    });
    results.into_inner().expect("no thread panicked")
}
