//! A live room for fault injection: a broker and peers as child processes that can be killed,
//! paused, resumed, stopped and replaced one at a time, and a view of the room built from the
//! peers' event streams (read from their stdout), with waits on conditions of that view under
//! deadlines.
//!
//! Every record is fed to an [`invariants::Checker`] as it arrives, so a long run keeps the
//! distinct blocks and each peer's chain, not every record. No child outlives the room (see
//! [`process`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use broker::port;
use peer::events::{Event, Record};
use peer::protocol::{PeerId, Term};
use tokio::io::BufReader;
use tokio::sync::mpsc;

use crate::cli::FaultRoomArgs;
use crate::invariants::{Checker, Summary, Violation};
use crate::process::{self, Proc};

/// How long a peer or the broker gets to exit after SIGTERM (or to be reaped after SIGKILL).
const GRACE: Duration = Duration::from_secs(5);
/// How long a restarted broker keeps trying to get its old port back.
const BROKER_REBIND: Duration = Duration::from_secs(10);

/// The room to start.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Peers in the room (`--room-size` of every peer, replacements included).
    pub peers: usize,
    /// Leading zero bits of each challenge.
    pub difficulty: u8,
    /// Mining threads per peer.
    pub threads: usize,
    /// Proof-of-work hash.
    pub hash: peer::pow::HashAlg,
    /// MQTT keepalive of the peers, in seconds.
    pub keepalive: u64,
    /// Longest wait for any condition; waiting longer means the room stopped making progress.
    pub deadline: Duration,
    /// Write every record, merged, to this file.
    pub events: Option<PathBuf>,
    /// Print the peers' and the broker's stderr.
    pub verbose: bool,
}

impl RoomConfig {
    /// The room of a fault run of `peers` peers, from its flags.
    pub fn new(peers: u16, args: &FaultRoomArgs) -> Self {
        Self {
            peers: usize::from(peers),
            difficulty: args.difficulty,
            threads: args.threads,
            hash: args.hash,
            keepalive: args.keepalive,
            deadline: Duration::from_secs(args.deadline),
            events: args.events.clone(),
            verbose: args.verbose,
        }
    }
}

/// Why a room run ended early.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A condition did not hold before its deadline.
    #[error("the room stopped making progress: no {what} within {} s; {state}", timeout.as_secs())]
    Stalled {
        /// What was awaited.
        what: String,
        /// The deadline it missed.
        timeout: Duration,
        /// Every live peer's height and controller at that moment.
        state: String,
    },
    /// The events show a broken invariant.
    #[error("invariant violated: {0}")]
    Violation(Violation),
    /// A peer exited without being told to.
    #[error("peer #{index} exited on its own ({status})")]
    PeerExited {
        /// The peer.
        index: usize,
        /// Its exit status, if known yet.
        status: String,
    },
    /// A peer did not exit within the grace period after SIGTERM.
    #[error("peer #{index} did not exit within {} s of SIGTERM", GRACE.as_secs())]
    Unstoppable {
        /// The peer.
        index: usize,
    },
    /// The broker exited without being told to.
    #[error("the broker exited on its own")]
    BrokerExited,
    /// Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Interrupted,
    /// The room could not be set up (a process did not start, the port was taken).
    #[error("{0:#}")]
    Setup(anyhow::Error),
}

/// A fault run's result: the invariant check's summary if the run and the check passed, else
/// the `FAIL: ...` line that says why.
pub fn verdict<'a>(
    outcome: &Result<(), Failure>,
    checked: &'a Result<Summary, Violation>,
) -> Result<&'a Summary, String> {
    match (outcome, checked) {
        (Ok(()), Ok(s)) => Ok(s),
        (Err(e), _) => Err(format!("FAIL: {e}")),
        (Ok(()), Err(v)) => Err(format!("FAIL: invariant violated: {v}")),
    }
}

/// Where a peer process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Running and expected to take part.
    Running,
    /// Stopped with SIGSTOP.
    Paused,
    /// Killed or stopped for good.
    Gone,
}

/// What the reader tasks report.
#[derive(Debug)]
enum Msg {
    /// A line of a peer's stdout (an event record).
    Line { index: usize, line: String },
    /// A line of a peer's (`Some`) or the broker's (`None`) stderr.
    Log { index: Option<usize>, line: String },
    /// A peer's stdout closed: it exited.
    Eof { index: usize },
    /// The broker of this generation closed its stdout: it exited.
    BrokerEof { generation: u64 },
    /// Ctrl-C or SIGTERM.
    Interrupt,
}

#[derive(Debug)]
struct Slot {
    proc: Option<Proc>,
    state: State,
    /// Its data directory.
    data: PathBuf,
    /// Expected to exit on its own (a duplicate of another peer's id).
    may_exit: bool,
    id: Option<PeerId>,
    /// The latest `controller_elected` of this peer.
    controller: Option<(Term, PeerId)>,
    /// Its stdout has closed.
    eof: bool,
}

/// A broker and a room of peers, and what their events say.
#[derive(Debug)]
pub struct Room {
    exe: PathBuf,
    cfg: RoomConfig,
    port: u16,
    broker: Option<Proc>,
    generation: u64,
    slots: Vec<Slot>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    ids: HashMap<PeerId, usize>,
    /// The first challenge of each term: its time and issuer.
    challenges: BTreeMap<Term, (u64, PeerId)>,
    /// The latest time any peer reported each peer leaving.
    left: HashMap<PeerId, u64>,
    checker: Checker,
    violation: Option<Violation>,
    interrupted: bool,
    events: Option<std::io::BufWriter<std::fs::File>>,
    started: Instant,
    /// The peers' data directories, removed with the room.
    run_dir: tempfile::TempDir,
}

impl Room {
    /// Starts a broker on a free port and `cfg.peers` peers; returns as soon as they are spawned.
    pub async fn start(cfg: RoomConfig) -> Result<Self, Failure> {
        let exe =
            std::env::current_exe().context("cannot find the launcher's own executable").map_err(Failure::Setup)?;
        let events = match &cfg.events {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create {}", path.display()))
                    .map_err(Failure::Setup)?,
            )),
            None => None,
        };
        let run_dir = tempfile::Builder::new()
            .prefix("hashvote-chaos")
            .tempdir()
            .context("cannot create the peers' run directory")
            .map_err(Failure::Setup)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let interrupt = tx.clone();
        tokio::spawn(async move {
            peer::cli::shutdown_signal().await;
            let _ = interrupt.send(Msg::Interrupt);
        });
        let mut room = Self {
            exe,
            cfg,
            port: 0,
            broker: None,
            generation: 0,
            slots: Vec::new(),
            tx,
            rx,
            ids: HashMap::new(),
            challenges: BTreeMap::new(),
            left: HashMap::new(),
            checker: Checker::new(),
            violation: None,
            interrupted: false,
            events,
            started: Instant::now(),
            run_dir,
        };
        // Another process may take the port between the check and the broker's bind: try others.
        let mut last = None;
        for _ in 0..5 {
            room.port = port::pick().context("cannot find a free port").map_err(Failure::Setup)?;
            match room.spawn_broker().await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(Failure::Setup(e));
        }
        for _ in 0..room.cfg.peers {
            room.add_peer()?;
        }
        Ok(room)
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Time since the room started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts one more peer with a new data directory (a newcomer, not a voter once the room is
    /// configured); returns its index.
    pub fn add_peer(&mut self) -> Result<usize, Failure> {
        let data = self.run_dir.path().join(format!("peer-{}", self.slots.len()));
        self.spawn_peer(data, None)
    }

    /// Starts peer `index` again on its data directory: the same peer, with its id, vote and
    /// chain; returns its new index.
    pub fn restart(&mut self, index: usize) -> Result<usize, Failure> {
        let data = self.slots[index].data.clone();
        self.spawn_peer(data, None)
    }

    /// Starts a second process under peer `index`'s id with a data directory of its own. It must
    /// not disturb the room; it may exit, refused. Returns its index.
    pub fn duplicate(&mut self, index: usize) -> Result<Option<usize>, Failure> {
        let Some(id) = self.id(index) else { return Ok(None) };
        let data = self.run_dir.path().join(format!("duplicate-{}", self.slots.len()));
        self.spawn_peer(data, Some(id)).map(Some)
    }

    fn spawn_peer(&mut self, data: PathBuf, id: Option<PeerId>) -> Result<usize, Failure> {
        let index = self.slots.len();
        let mut args = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--room-size".into(),
            self.cfg.peers.to_string(),
            "--difficulty".into(),
            self.cfg.difficulty.to_string(),
            "--threads".into(),
            self.cfg.threads.to_string(),
            "--hash".into(),
            self.cfg.hash.name().into(),
            "--keepalive".into(),
            self.cfg.keepalive.to_string(),
            "--events".into(),
            "-".into(),
            "--log".into(),
            "warn".into(),
            "--wire".into(),
            "room".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        if let Some(id) = id {
            args.extend(["--id".into(), id.to_string()]);
        }
        let cmd = process::command(&self.exe, "peer", &args);
        let (proc, stdout, stderr) = Proc::spawn(cmd, &format!("peer #{index}"), |_| {}).map_err(Failure::Setup)?;
        let tx = self.tx.clone();
        let eof = move || {
            let _ = tx.send(Msg::Eof { index });
        };
        process::forward_lines(BufReader::new(stdout), self.tx.clone(), move |line| Msg::Line { index, line }, eof);
        let log = move |line| Msg::Log { index: Some(index), line };
        process::forward_lines(BufReader::new(stderr), self.tx.clone(), log, || {});
        let may_exit = id.is_some();
        self.slots.push(Slot {
            proc: Some(proc),
            state: State::Running,
            data,
            may_exit,
            id: None,
            controller: None,
            eof: false,
        });
        Ok(index)
    }

    async fn spawn_broker(&mut self) -> anyhow::Result<()> {
        let (proc, stdout, stderr) = Proc::spawn(process::broker_command(&self.exe, self.port), "the broker", |_| {})?;
        let (_, stdout, stderr) = process::broker_ready(self.port, stdout, stderr).await?;
        self.generation += 1;
        let generation = self.generation;
        let tx = self.tx.clone();
        process::drain(stdout, move || {
            let _ = tx.send(Msg::BrokerEof { generation });
        });
        process::forward_lines(stderr, self.tx.clone(), |line| Msg::Log { index: None, line }, || {});
        self.broker = Some(proc);
        Ok(())
    }

    /// Kills the broker (SIGKILL) and starts a new one on the same port. Another process can take
    /// the port while it is free; the restart is retried for a while, then fails saying so.
    pub async fn restart_broker(&mut self) -> Result<(), Failure> {
        self.kill_broker().await;
        self.start_broker_again().await
    }

    /// Kills the broker with SIGKILL (every connection, will and retained message is lost).
    pub async fn kill_broker(&mut self) {
        if let Some(mut old) = self.broker.take() {
            old.kill().await;
        }
    }

    /// Starts a broker again on the room's port, after [`kill_broker`](Self::kill_broker).
    pub async fn start_broker_again(&mut self) -> Result<(), Failure> {
        let deadline = Instant::now() + BROKER_REBIND;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.spawn_broker().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    let owner = if port::check(self.port).is_err() {
                        "; the port is in use, so another process took it while the broker was down"
                    } else {
                        ""
                    };
                    return Err(Failure::Setup(e.context(format!(
                        "cannot restart the broker on port {} for {} s{owner}",
                        self.port,
                        BROKER_REBIND.as_secs()
                    ))));
                }
                // A retry after a failed start, not a wait for the room: nothing to wait on.
                Err(_) => tokio::time::sleep(pause).await,
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Indices of the peers running now (not paused, not gone, not duplicates).
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].state == State::Running && !self.slots[i].may_exit).collect()
    }

    /// The index of the latest process of peer `index` (the same peer restarted on its data
    /// directory has a new index); `index` itself if it has not said its id yet.
    pub fn latest(&self, index: usize) -> usize {
        self.id(index).and_then(|id| self.ids.get(&id).copied()).unwrap_or(index)
    }

    /// The client id peer `index` reported, once it has.
    pub fn id(&self, index: usize) -> Option<PeerId> {
        self.slots.get(index).and_then(|s| s.id)
    }

    /// Height of peer `index`'s chain according to its events.
    pub fn height(&self, index: usize) -> u64 {
        self.id(index).map_or(0, |id| self.checker.height(id))
    }

    /// The controller every running peer follows, if they agree, it is running, and it has
    /// issued a challenge in its term: `(term, index)`.
    pub fn agreed(&self) -> Option<(Term, usize)> {
        let running = self.running();
        let first = self.slots.get(*running.first()?)?.controller?;
        if !running.iter().all(|&i| self.slots[i].controller == Some(first)) {
            return None;
        }
        let (term, controller) = first;
        let index = *self.ids.get(&controller)?;
        let issued = self.challenges.get(&term).is_some_and(|&(_, by)| by == controller);
        (self.slots[index].state == State::Running && issued).then_some((term, index))
    }

    /// Time (event clock, Unix ms) of the first challenge of a term above `term`, if any yet.
    pub fn first_challenge_after(&self, term: Term) -> Option<u64> {
        self.challenges.range(term + 1..).map(|(_, &(ts, _))| ts).min()
    }

    /// Highest term any peer has issued a challenge in.
    pub fn latest_term(&self) -> Term {
        self.challenges.keys().next_back().copied().unwrap_or(0)
    }

    /// Waits until every running peer agrees on a running controller that has issued a challenge,
    /// and every running peer holds a block that no peer held when the wait began (peers just
    /// restarted included, whose chains are those they held before): the room works. Returns the
    /// controller `(term, index)` and the height reached.
    pub async fn wait_progress(&mut self) -> Result<(Term, usize, u64), Failure> {
        let target = (0..self.slots.len()).map(|i| self.height(i)).max().unwrap_or(0) + 1;
        let what = format!("controller agreed by every live peer and block {} held by all", target - 1);
        self.wait_for(&what, |room| {
            room.agreed().is_some() && room.running().iter().all(|&i| room.height(i) >= target)
        })
        .await?;
        let (term, controller) = self.agreed().expect("checked by the wait");
        Ok((term, controller, target))
    }

    /// Waits for the first challenge of a term above `term`; returns its time (Unix ms).
    pub async fn wait_challenge_after(&mut self, term: Term) -> Result<u64, Failure> {
        self.wait_for(&format!("challenge of a term above {term}"), |room| room.first_challenge_after(term).is_some())
            .await?;
        Ok(self.first_challenge_after(term).expect("checked by the wait"))
    }

    /// For a paused peer that is not the controller: waits until some peer reports that it left,
    /// or, once its will is overdue (it may have had no connection to leave a will on: paused
    /// while it reconnected after a broker restart), until every other running peer holds two
    /// blocks more than the room had at `since_ms`: the room mines on without it, which is what
    /// the room protocol needs (it never waits for departures). Returns whether its departure
    /// was seen.
    pub async fn wait_left_or_mined_on(&mut self, index: usize, since_ms: u64) -> Result<bool, Failure> {
        let Some(id) = self.id(index) else { return Ok(true) };
        let others: Vec<usize> = self.running().into_iter().filter(|&i| i != index).collect();
        let base = others.iter().map(|&i| self.height(i)).max().unwrap_or(0);
        let overdue = Instant::now() + Duration::from_millis(self.cfg.keepalive * 1500 + 2000);
        self.wait_for(&format!("peer_left of peer #{index}, or the room mining on without it"), |room| {
            room.left.get(&id).is_some_and(|&t| t >= since_ms)
                || (Instant::now() >= overdue && others.iter().all(|&i| room.height(i) >= base + 2))
        })
        .await?;
        Ok(self.left.get(&id).is_some_and(|&t| t >= since_ms))
    }

    /// Processes events for `pause`, as part of a workload (not to wait for anything).
    pub async fn idle(&mut self, pause: Duration) -> Result<(), Failure> {
        let until = Instant::now() + pause;
        match self.wait_until(until, &mut |_| false).await {
            Ok(()) | Err(Failure::Stalled { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits, processing events, until `cond` holds, for at most the room's deadline.
    pub async fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Self) -> bool) -> Result<(), Failure> {
        let timeout = self.cfg.deadline;
        match self.wait_until(Instant::now() + timeout, &mut cond).await {
            Err(Failure::Stalled { state, .. }) => Err(Failure::Stalled { what: what.into(), timeout, state }),
            other => other,
        }
    }

    async fn wait_until(&mut self, until: Instant, cond: &mut dyn FnMut(&Self) -> bool) -> Result<(), Failure> {
        loop {
            if self.interrupted {
                return Err(Failure::Interrupted);
            }
            if let Some(v) = &self.violation {
                return Err(Failure::Violation(v.clone()));
            }
            if cond(self) {
                return Ok(());
            }
            // About to block: make the events file current, so a stalled room can be inspected.
            if self.rx.is_empty()
                && let Some(file) = self.events.as_mut()
            {
                let _ = file.flush();
            }
            match tokio::time::timeout_at(until.into(), self.rx.recv()).await {
                Ok(Some(msg)) => {
                    self.apply(msg)?;
                    // Take whatever else is queued before looking at the condition again.
                    while let Ok(msg) = self.rx.try_recv() {
                        self.apply(msg)?;
                    }
                }
                Ok(None) => return Err(Failure::Setup(anyhow::anyhow!("the room's event channel closed"))),
                Err(_) => {
                    return Err(Failure::Stalled {
                        what: String::new(),
                        timeout: Duration::ZERO,
                        state: self.describe(),
                    });
                }
            }
        }
    }

    fn apply(&mut self, msg: Msg) -> Result<(), Failure> {
        match msg {
            Msg::Line { index, line } => {
                let Ok(record) = serde_json::from_str::<Record>(&line) else {
                    // A peer killed mid-write leaves half a line.
                    if self.cfg.verbose {
                        eprintln!("peer #{index}: {line}");
                    }
                    return Ok(());
                };
                self.record(index, &record);
                let mut record = record;
                let mut line = line;
                if self.slots[index].may_exit {
                    // A duplicate's chain is its own: checked apart from the peer whose id it
                    // took (its controllers and blocks must still agree with the room's), here
                    // and in the events file.
                    record.peer = PeerId::MAX - u32::try_from(index).unwrap_or(0);
                    line = serde_json::to_string(&record).unwrap_or(line);
                }
                if let Some(file) = self.events.as_mut()
                    && let Err(e) = writeln!(file, "{line}")
                {
                    eprintln!("chaos: cannot write the events file ({e}); no more events are written");
                    self.events = None;
                }
                if self.violation.is_none()
                    && let Err(v) = self.checker.push(&record)
                {
                    self.violation = Some(v.clone());
                    return Err(Failure::Violation(v));
                }
            }
            Msg::Log { index, line } => {
                if self.cfg.verbose {
                    match index {
                        Some(i) => eprintln!("peer #{i}: {line}"),
                        None => eprintln!("broker: {line}"),
                    }
                }
            }
            Msg::Eof { index } => {
                let slot = &mut self.slots[index];
                slot.eof = true;
                if slot.may_exit {
                    slot.state = State::Gone;
                    slot.proc = None;
                } else if slot.state != State::Gone {
                    slot.state = State::Gone;
                    let status =
                        slot.proc.as_ref().and_then(Proc::status).unwrap_or_else(|| "closed its event stream".into());
                    return Err(Failure::PeerExited { index, status });
                }
            }
            Msg::BrokerEof { generation } => {
                if generation == self.generation && self.broker.is_some() {
                    return Err(Failure::BrokerExited);
                }
            }
            Msg::Interrupt => {
                self.interrupted = true;
                return Err(Failure::Interrupted);
            }
        }
        Ok(())
    }

    fn record(&mut self, index: usize, r: &Record) {
        match &r.event {
            Event::Started { client_id, .. } => {
                self.slots[index].id = Some(*client_id);
                // A duplicate does not stand for the peer whose id it takes.
                if !self.slots[index].may_exit {
                    self.ids.insert(*client_id, index);
                }
            }
            Event::ControllerElected { term, controller, .. } => {
                self.slots[index].controller = Some((*term, *controller))
            }
            Event::ChallengeIssued { term, .. } => {
                let first = self.challenges.entry(*term).or_insert((r.ts_ms, r.peer));
                first.0 = first.0.min(r.ts_ms);
            }
            Event::PeerLeft { id, .. } => {
                let t = self.left.entry(*id).or_insert(r.ts_ms);
                *t = (*t).max(r.ts_ms);
            }
            _ => {}
        }
    }

    /// One line per running or paused peer: index, id, height, controller.
    pub fn describe(&self) -> String {
        let mut out = String::from("peers (index id state height term:controller):");
        for (i, s) in self.slots.iter().enumerate().filter(|(_, s)| s.state != State::Gone) {
            let controller = match s.controller {
                Some((t, l)) => format!("{t}:{}", self.ids.get(&l).map_or(l.to_string(), |i| format!("#{i}"))),
                None => "-".into(),
            };
            let id = s.id.map_or("?".into(), |id| id.to_string());
            let _ = write!(out, " [#{i} {id} {:?} {} {controller}]", s.state, self.height(i));
        }
        out
    }

    /// Kills peer `index` with SIGKILL and reaps it.
    pub async fn kill(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.state = State::Gone;
        if let Some(mut p) = slot.proc.take() {
            p.kill().await;
        }
    }

    /// Pauses peer `index` with SIGSTOP.
    pub fn pause(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if let Some(p) = &slot.proc
            && p.signal(libc::SIGSTOP)
        {
            slot.state = State::Paused;
        }
    }

    /// Resumes a paused peer with SIGCONT.
    pub fn resume(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if let Some(p) = &slot.proc
            && slot.state == State::Paused
        {
            p.signal(libc::SIGCONT);
            slot.state = State::Running;
        }
    }

    /// Stops peer `index` cleanly (SIGTERM) and waits for it to exit.
    pub async fn terminate(&mut self, index: usize) -> Result<(), Failure> {
        let slot = &mut self.slots[index];
        slot.state = State::Gone;
        let Some(mut p) = slot.proc.take() else { return Ok(()) };
        if !p.stop(GRACE).await {
            return Err(Failure::Unstoppable { index });
        }
        Ok(())
    }

    /// Stops everything: the peers with SIGTERM (miners first, then the controller, so the room
    /// does not hold an election while it closes), then the broker; takes the last events and
    /// returns the invariant check over the whole run.
    pub async fn stop(mut self) -> Result<Summary, Violation> {
        let controller = self.agreed().map(|(_, i)| i);
        let miners: Vec<usize> = (0..self.slots.len()).filter(|&i| Some(i) != controller).collect();
        for group in [miners, controller.into_iter().collect()] {
            let mut procs: Vec<Proc> = group
                .into_iter()
                .filter_map(|i| {
                    self.slots[i].state = State::Gone;
                    self.slots[i].proc.take()
                })
                .collect();
            process::stop_group(&mut procs, GRACE).await;
        }
        // Every peer has exited, so every reader reaches the end of its pipe: take what is left.
        let until = Instant::now() + GRACE;
        while self.slots.iter().any(|s| !s.eof) {
            match tokio::time::timeout_at(until.into(), self.rx.recv()).await {
                Ok(Some(msg)) => {
                    // Violations are kept in `self.violation`; nothing else matters now.
                    let _ = self.apply(msg);
                }
                Ok(None) | Err(_) => break,
            }
        }
        if let Some(mut broker) = self.broker.take() {
            broker.stop(GRACE).await;
        }
        if let Some(file) = self.events.as_mut() {
            let _ = file.flush();
        }
        match self.violation.take() {
            Some(v) => Err(v),
            None => self.checker.finish(),
        }
    }
}
