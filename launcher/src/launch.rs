//! `launcher` without a subcommand: a broker and a room of peers as child processes, shown as
//! they work (the dashboard on a terminal, plain lines otherwise), and stopped in order however
//! the run ends.
//!
//! [`Launcher`] drives a running room in the manner of mini-redis' `Listener`: its loop waits for
//! the next input (a child's output, the observer, a key, the redraw tick, a signal) and hands it
//! to one method per kind of input, which says whether the room goes on.
//!
//! Unless told `--no-auth`, the room's broker requires a login generated for the run (see
//! [`Login`]); the password is written to a [`PasswordFile`] for outside clients.

use std::collections::BTreeSet;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use broker::port;
use peer::config::Wire;
use ratatui::crossterm::event::KeyEvent;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::children::{Children, Output};
use crate::cli::{Brokers, RoomArgs};
use crate::dashboard::{Command, Ui};
use crate::login::{Login, PasswordFile};
use crate::observe::{Seen, Target};
use crate::screen::{self, Screen};
use crate::tally::Tally;
use crate::view::RoomView;
use crate::{observe, report};

/// The port a demo uses unless told otherwise (MQTT's standard port).
const DEFAULT_PORT: u16 = 1883;

/// The user name of the login a demo generates.
const DEMO_USER: &str = "hashvote";

/// How often the dashboard is redrawn.
pub(crate) const REDRAW: Duration = Duration::from_millis(100);

/// How long the children get to exit after SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

/// Runs a room from parsed arguments; the whole of `main` for the launcher role.
pub(crate) fn main(args: RoomArgs) -> ExitCode {
    crate::runtime::block_on("launcher", async {
        let (launcher, output) = Launcher::start(args).await?;
        launcher.run(output).await.map(|()| ExitCode::SUCCESS)
    })
}

/// The broker the room runs on.
struct Broker {
    /// Ours (one node), or the `--broker` list.
    brokers: Brokers,
    login: Option<Login>,
    /// Ours, kept until the room stops: the password is useless once the broker is gone.
    password_file: Option<PasswordFile>,
}

/// What the loop does after an input.
enum Next {
    /// Wait for the next input.
    Continue,
    /// Stop the room in order, with this outcome.
    Stop(anyhow::Result<()>),
}

/// A running room and what shows it.
struct Launcher {
    args: RoomArgs,
    /// The dashboard is on (else plain lines).
    dashboard: bool,
    children: Children,
    broker: Broker,
    /// What the peers' events say: the plain lines and the summary.
    tally: Tally,
    events_file: Option<BufWriter<std::fs::File>>,
    /// The room's MQTT traffic, for the dashboard and the report.
    observer: Option<mpsc::Receiver<Seen>>,
    _stop_observer: DropGuard,
    view: RoomView,
    ui: Ui,
    screen: Option<Screen>,
    keys: Option<mpsc::UnboundedReceiver<KeyEvent>>,
    /// Which process runs which peers.
    groups: Groups,
    /// Peer processes stopped with SIGSTOP from the dashboard.
    paused: BTreeSet<usize>,
}

impl Launcher {
    /// Starts the broker (or takes the one given) and the peers, the observer and the dashboard;
    /// returns the room with the channel of its children's output.
    async fn start(args: RoomArgs) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Output>)> {
        // Before anything starts: a mistake here is the user's, with nothing to clean up.
        let outside = args.brokers()?;
        check_peer_args(&args, outside.as_ref())?;
        let events_file = match &args.events {
            Some(path) => Some(BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
            )),
            None => None,
        };
        let run_dir = run_dir(&args)?;
        let dashboard = !args.plain && std::io::stdout().is_terminal();
        let exe = std::env::current_exe().context("cannot find the launcher's own executable")?;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let mut children = Children::new(exe, out_tx);
        let broker = broker(&args, outside, &mut children).await?;
        children.set_login(broker.login.clone());
        let groups = Groups::new(args.peers.into(), args.peers_per_process.into());
        for process in 0..groups.processes() {
            let mut peer = peer_args(&args, &broker.brokers);
            if let Some(dir) = &run_dir {
                let name = if groups.per == 1 { format!("peer-{process}") } else { format!("group-{process}") };
                peer.extend(["--data-dir".into(), dir.join(name).display().to_string()]);
            }
            if groups.per > 1 {
                peer.extend(["--instances".into(), groups.peers_of(process).len().to_string()]);
            }
            children.start_peer(process, &peer)?;
        }
        match groups.processes() {
            n if n == groups.peers => println!("started {n} peers; waiting for them to meet and elect a controller"),
            n => println!(
                "started {} peers in {n} processes; waiting for them to meet and elect a controller",
                groups.peers
            ),
        }
        // The dashboard and the report are built from the room's MQTT traffic, as `launcher watch`
        // builds them from afar; the plain lines and the summary come from the peers' events.
        let stop_observer = CancellationToken::new();
        // The summary's traffic figures come from the peers' statuses too.
        let observer = (dashboard || args.report.is_some() || args.rounds > 0).then(|| {
            let target = Target {
                brokers: broker.brokers.clone(),
                prefix: args.prefix.clone(),
                login: broker.login.as_ref().map(|l| (l.user.clone(), l.password().to_string())),
            };
            observe::spawn(target, stop_observer.clone())
        });
        let ui = Ui::new("hashvote room".to_string(), broker.brokers.to_string(), Some(args.peers as usize));
        let (screen, keys) = if dashboard {
            let (s, k) = Screen::start().context("cannot take over the terminal (try --plain)")?;
            (Some(s), Some(k))
        } else {
            (None, None)
        };
        let launcher = Self {
            tally: Tally::new(args.peers as usize),
            groups,
            args,
            dashboard,
            children,
            broker,
            events_file,
            observer,
            _stop_observer: stop_observer.drop_guard(),
            view: RoomView::new(),
            ui,
            screen,
            keys,
            paused: BTreeSet::new(),
        };
        Ok((launcher, out_rx))
    }

    /// Runs the room until it is done, told to stop, or fails; then stops it in order.
    async fn run(mut self, mut output: mpsc::UnboundedReceiver<Output>) -> anyhow::Result<()> {
        let mut redraw = tokio::time::interval(REDRAW);
        redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut shutdown = std::pin::pin!(peer::cli::shutdown_signal());
        // An error out of a handler (the terminal, the events file) ends the run at once; the
        // children go with the launcher (see `process`).
        let outcome = loop {
            let next = tokio::select! {
                () = &mut shutdown => self.on_signal(),
                Some(seen) = next(&mut self.observer) => self.on_seen(seen),
                Some(key) = screen::next_key(&mut self.keys) => self.on_key(key),
                _ = redraw.tick(), if self.screen.is_some() => self.on_tick()?,
                out = output.recv() => self.on_output(out)?,
            };
            if let Next::Stop(outcome) = next {
                break outcome;
            }
        };
        self.stop(outcome).await
    }

    /// Ctrl-C or SIGTERM.
    fn on_signal(&self) -> Next {
        if !self.dashboard {
            println!("stopping the room");
        }
        Next::Stop(Ok(()))
    }

    /// What the observer saw goes into the view.
    fn on_seen(&mut self, seen: Seen) -> Next {
        match observed(&mut self.view, seen) {
            Some(e) => Next::Stop(Err(e)),
            None => Next::Continue,
        }
    }

    /// A key pressed on the dashboard.
    fn on_key(&mut self, key: KeyEvent) -> Next {
        if screen::is_interrupt(&key) {
            return Next::Stop(Ok(()));
        }
        match crate::dashboard::command(key, &self.view, &self.ui) {
            Command::Quit => return Next::Stop(Ok(())),
            Command::KillController => self.ui.message = Some(self.kill_controller()),
            Command::TogglePause(id) => self.ui.message = Some(self.toggle_pause(id)),
            Command::Up => self.ui.up(&self.view),
            Command::Down => self.ui.down(&self.view),
            Command::None => {}
        }
        Next::Continue
    }

    /// `k`: SIGKILL to the controller's process; what happened, for the message line.
    fn kill_controller(&mut self) -> String {
        let target = self.view.controller().and_then(|(_, id)| self.tally.index_of(id).map(|i| (id, i)));
        match target {
            Some((id, index)) if self.children.signal_peer(self.groups.process_of(index), libc::SIGKILL) => {
                self.paused.remove(&self.groups.process_of(index));
                format!("killed the controller, peer #{index} ({id}), with SIGKILL{}", self.groups.others(index))
            }
            _ => "no running controller to kill".to_string(),
        }
    }

    /// `p`: SIGSTOP to the selected peer, or SIGCONT if it is paused; what happened.
    fn toggle_pause(&mut self, id: peer::protocol::PeerId) -> String {
        let index = self.tally.index_of(id);
        let process = index.map(|i| self.groups.process_of(i));
        let others = index.map(|i| self.groups.others(i)).unwrap_or_default();
        match (index, process) {
            (Some(index), Some(process)) if self.paused.contains(&process) => {
                self.children.signal_peer(process, libc::SIGCONT);
                self.paused.remove(&process);
                self.ui.paused.remove(&id);
                format!("resumed peer #{index} ({id}){others}")
            }
            (Some(index), Some(process)) if self.children.signal_peer(process, libc::SIGSTOP) => {
                self.paused.insert(process);
                self.ui.paused.insert(id);
                format!("paused peer #{index} ({id}) with SIGSTOP{others}; p again resumes it")
            }
            _ => format!("peer {id} is not one of this launcher's running peers"),
        }
    }

    /// The redraw tick: the view ages, the dashboard is drawn.
    fn on_tick(&mut self) -> anyhow::Result<Next> {
        let now = peer::events::now_ms();
        self.view.tick(now);
        if let Some(s) = self.screen.as_mut() {
            s.draw(&self.view, &self.ui, now).context("cannot draw the dashboard")?;
        }
        Ok(Next::Continue)
    }

    /// A line from a child, or a child's exit (`None`: every child's output is closed).
    fn on_output(&mut self, out: Option<Output>) -> anyhow::Result<Next> {
        Ok(match out {
            None => Next::Stop(Ok(())),
            Some(Output::Event { index, line }) => return self.on_event(index, &line),
            Some(Output::Log { index, line }) => {
                if self.args.verbose && !self.dashboard {
                    print_line(&format!("peer #{index}: {line}"));
                }
                Next::Continue
            }
            Some(Output::Exited { index, status, last_error }) => {
                for peer in self.groups.peers_of(index) {
                    self.tally.exited(peer);
                }
                let who = self.groups.name(index);
                match last_error {
                    Some(why) => self.say(format!("{who} exited ({status}): {why}")),
                    None => self.say(format!("{who} exited ({status})")),
                }
                if self.tally.live() == 0 {
                    Next::Stop(Err(anyhow::anyhow!("every peer exited")))
                } else {
                    Next::Continue
                }
            }
            Some(Output::BrokerExited { status }) => Next::Stop(Err(anyhow::anyhow!("the broker exited ({status})"))),
        })
    }

    /// A line of peer process `process`'s event stream: into the events file and the tally.
    fn on_event(&mut self, process: usize, line: &str) -> anyhow::Result<Next> {
        if let Some(file) = self.events_file.as_mut() {
            writeln!(file, "{line}").context("cannot write the events file")?;
        }
        let dashboard = self.dashboard;
        let mut say = |l: String| {
            if !dashboard {
                print_line(&l)
            }
        };
        match serde_json::from_str::<peer::events::Record>(line) {
            Ok(record) => self.tally.record(self.groups.index(process, record.peer), record, &mut say),
            Err(_) => say(format!("{}: {line}", self.groups.name(process))),
        }
        let done = self.args.rounds > 0 && self.tally.all_have(self.args.rounds);
        Ok(if done { Next::Stop(Ok(())) } else { Next::Continue })
    }

    /// A line on the dashboard's message line, or printed without the dashboard.
    fn say(&mut self, line: String) {
        if self.dashboard { self.ui.message = Some(line) } else { print_line(&line) }
    }

    /// Stops the room in order and prints what it did: the summary, the report.
    async fn stop(mut self, outcome: anyhow::Result<()>) -> anyhow::Result<()> {
        drop(self.screen.take());
        if self.dashboard {
            println!("stopping the room");
        }
        if let Some(mut file) = self.events_file.take() {
            file.flush().context("cannot write the events file")?;
        }
        // A stopped peer would only die at the SIGKILL after the grace period.
        for &process in &self.paused {
            self.children.signal_peer(process, libc::SIGCONT);
        }
        let rounds = self.args.rounds;
        // The observer trails the peers' own events by a message or two: let the report catch up
        // with the blocks the summary counts.
        if rounds > 0 && outcome.is_ok() {
            self.catch_up(|v| v.height() >= rounds).await;
        }
        // Who was in the room at its end, before the peers' offline statuses say otherwise.
        self.view.end_run(peer::events::now_ms());
        let memory = self.children.peak_rss_kib();
        // Miners first, the controller last: the room should not hold an election while it closes.
        let controller = self.tally.controller_index().map(|i| self.groups.process_of(i));
        self.children.stop_all(controller, GRACE).await;
        // And the peers' last statuses (offline, with their final figures).
        self.catch_up(|_| false).await;
        drop(self.broker.password_file.take());
        if rounds > 0 && outcome.is_ok() {
            println!("{}", self.tally.summary());
            if let Some(traffic) = self.view.traffic() {
                println!("{traffic}");
            }
            let mib = |kib: Option<u64>| kib.map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
            match memory {
                (peers, None) => println!("memory (peak resident): largest peer process {}", mib(peers)),
                (peers, broker) => {
                    println!("memory (peak resident): largest peer process {}, the broker {}", mib(peers), mib(broker))
                }
            }
        }
        if let Some(dir) = &self.args.report {
            report::save(dir, &self.view, &format!("hashvote room of {} peers", self.args.peers))?;
        }
        outcome
    }

    /// Feeds the view until `done` holds, the observer is quiet for 200 ms, or 2 s have passed.
    async fn catch_up(&mut self, done: impl Fn(&RoomView) -> bool) {
        let Some(rx) = self.observer.as_mut() else { return };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !done(&self.view) {
            let quiet = (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline);
            match tokio::time::timeout_at(quiet, rx.recv()).await {
                Ok(Some(seen)) => {
                    let _ = observed(&mut self.view, seen);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

/// Our own broker with a generated login, or someone else's (`outside`: a broker or a cluster's
/// nodes) with the login in our environment; said on the console.
async fn broker(args: &RoomArgs, outside: Option<Brokers>, children: &mut Children) -> anyhow::Result<Broker> {
    if let Some(brokers) = outside {
        let login = Login::from_env();
        println!("using the broker at {brokers} ({})", if login.is_some() { "with a login" } else { "no login" });
        return Ok(Broker { brokers, login, password_file: None });
    }
    let (port, note) = pick_port(args.port)?;
    if let Some(note) = note {
        println!("{note}");
    }
    let login = (!args.no_auth).then(|| Login::generate(DEMO_USER));
    let password_file = match &login {
        Some(login) => Some(PasswordFile::create(login.password()).context("cannot write the password file")?),
        None => None,
    };
    children.set_login(login.clone());
    let addr = children.start_broker(port).await?;
    println!("broker listening on {addr}");
    match (&login, &password_file) {
        (Some(login), Some(file)) => println!(
            "auth: on; user {}, password in {} (only you can read it; removed on exit); --no-auth turns it off",
            login.user,
            file.path().display()
        ),
        _ => println!("auth: off (--no-auth): anyone who reaches {addr} can connect and publish"),
    }
    Ok(Broker { brokers: Brokers::one(addr.ip().to_string(), addr.port()), login, password_file })
}

/// Picks the broker port: the one asked for (which must be free), else 1883, else any free port.
fn pick_port(asked: Option<u16>) -> anyhow::Result<(u16, Option<String>)> {
    match asked {
        Some(port) => match port::check(port) {
            Ok(()) => Ok((port, None)),
            Err(e) => anyhow::bail!("port {port} on 127.0.0.1 is not available ({e}); choose another with --port"),
        },
        None => match port::check(DEFAULT_PORT) {
            Ok(()) => Ok((DEFAULT_PORT, None)),
            Err(_) => {
                let port = port::pick().context("cannot find a free port")?;
                Ok((port, Some(format!("port {DEFAULT_PORT} is busy; using port {port} instead"))))
            }
        },
    }
}

/// The next item of an optional channel; pending for ever without one.
async fn next<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Feeds what the observer saw into the view; an error if the observer cannot go on.
fn observed(view: &mut RoomView, seen: Seen) -> Option<anyhow::Error> {
    match seen {
        Seen::Observed(o) => {
            view.observe(peer::events::now_ms(), o);
            None
        }
        Seen::Refused(reason) => Some(anyhow::anyhow!("the dashboard's MQTT client: {reason}")),
        Seen::Connected(_) | Seen::Lost(_) | Seen::Dropped { .. } => None,
    }
}

/// With `--wire room`: the run directory (given, or new), said on the console; `None` otherwise.
fn run_dir(args: &RoomArgs) -> anyhow::Result<Option<PathBuf>> {
    if args.wire != Wire::Room {
        anyhow::ensure!(args.run_dir.is_none(), "--run-dir holds the peers' data directories of --wire room only");
        return Ok(None);
    }
    let dir = match &args.run_dir {
        Some(dir) => dir.clone(),
        None => {
            std::env::temp_dir().join(format!("hashvote-room-{}-{:08x}", std::process::id(), rand::random::<u32>()))
        }
    };
    let existing = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("peer-") || name.starts_with("group-")
                })
                .count()
        })
        .unwrap_or(0);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    if existing > 0 {
        println!("resuming the room in {} ({existing} data directories)", dir.display());
    } else {
        println!("run directory: {} (the peers' data; --run-dir {} resumes this room)", dir.display(), dir.display());
    }
    Ok(Some(dir))
}

/// Refuses, before anything starts, what the peers would refuse: the arguments every peer will be
/// given, parsed and checked by the peer's own code (a `--difficulty 200` would otherwise start a
/// broker and ten peers that all exit).
fn check_peer_args(args: &RoomArgs, outside: Option<&Brokers>) -> anyhow::Result<()> {
    use clap::Parser;
    anyhow::ensure!(
        args.peers_per_process == 1 || args.wire == Wire::Room,
        "--peers-per-process runs peers of --wire room only"
    );
    let ours = Brokers::one("127.0.0.1", DEFAULT_PORT);
    let argv = std::iter::once("peer".to_string()).chain(peer_args(args, outside.unwrap_or(&ours)));
    let parsed = peer::cli::Args::try_parse_from(argv).map_err(|e| {
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        anyhow::anyhow!("a peer would refuse these flags: {first}")
    })?;
    parsed.to_config().map(drop)
}

/// A peer's flags: the room's settings, and every node of the broker (each with its port, so the
/// peer's `--port` only repeats the first node's).
fn peer_args(args: &RoomArgs, brokers: &Brokers) -> Vec<String> {
    let mut out = vec![
        "--target-block-ms".into(),
        args.target_block_ms.to_string(),
        "--host".into(),
        brokers.to_host_arg(),
        "--port".into(),
        brokers.first_port().to_string(),
        "--prefix".into(),
        args.prefix.clone(),
        "--room-size".into(),
        args.peers.to_string(),
        "--difficulty".into(),
        args.difficulty.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--hash".into(),
        args.hash.name().into(),
        "--wire".into(),
        args.wire.to_string(),
        "--keepalive".into(),
        args.keepalive_s().to_string(),
        "--events".into(),
        "-".into(),
        "--log".into(),
        "warn".into(),
        // The broker is known to be up, but hundreds of peers starting at once on a few cores
        // queue for it: 10 s (the peer's default, which tells a user of a wrong address quickly)
        // plus 200 ms per peer (measured: 73 of 300 peers gave up after 10 s).
        "--connect-timeout".into(),
        (10 + u64::from(args.peers) / 5).to_string(),
    ];
    if let Some([lo, hi]) = args.difficulty_range {
        out.extend(["--difficulty-range".into(), format!("{lo}-{hi}")]);
    }
    out
}

/// Which process runs which peers: `--peers-per-process` peers each, the last process the rest.
/// A peer's index (the tally's, 0-based) is its process's first index plus its place among that
/// process's peers in the order their events first name them.
struct Groups {
    peers: usize,
    per: usize,
    slots: std::collections::HashMap<peer::protocol::PeerId, usize>,
    next: Vec<usize>,
}

impl Groups {
    fn new(peers: usize, per: usize) -> Self {
        let per = per.clamp(1, peers.max(1));
        let next = (0..peers.div_ceil(per)).map(|p| p * per).collect();
        Self { peers, per, slots: std::collections::HashMap::new(), next }
    }

    fn processes(&self) -> usize {
        self.next.len()
    }

    /// The indices of the peers of `process`.
    fn peers_of(&self, process: usize) -> std::ops::Range<usize> {
        let first = process * self.per;
        first..(first + self.per).min(self.peers)
    }

    fn process_of(&self, index: usize) -> usize {
        index / self.per
    }

    /// The index of peer `id`, of `process`.
    fn index(&mut self, process: usize, id: peer::protocol::PeerId) -> usize {
        if self.per == 1 {
            return process;
        }
        let range = self.peers_of(process);
        let next = &mut self.next[process];
        *self.slots.entry(id).or_insert_with(|| {
            let index = *next;
            *next = (index + 1).min(range.end.saturating_sub(1));
            index
        })
    }

    /// How the launcher names `process` in its messages.
    fn name(&self, process: usize) -> String {
        match self.per {
            1 => format!("peer #{process}"),
            _ => format!("peer process #{process} (peers #{:?})", self.peers_of(process)),
        }
    }

    /// What a signal to peer `index`'s process also reaches, for the message that tells it.
    fn others(&self, index: usize) -> String {
        match self.peers_of(self.process_of(index)).len() {
            0 | 1 => String::new(),
            n => format!(" (and the {} other peers of its process)", n - 1),
        }
    }
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

#[cfg(test)]
mod tests {
    use super::Groups;

    #[test]
    fn groups_number_each_process_peers_in_the_order_their_events_name_them() {
        let mut g = Groups::new(7, 3);
        assert_eq!(g.processes(), 3);
        assert_eq!((g.peers_of(0), g.peers_of(2)), (0..3, 6..7));
        assert_eq!((g.index(1, 40), g.index(1, 10), g.index(1, 40), g.index(0, 99)), (3, 4, 3, 0));
        assert_eq!((g.process_of(4), g.process_of(6)), (1, 2));
        assert_eq!(g.others(6), "", "the last process has one peer");
        assert_eq!(g.others(0), " (and the 2 other peers of its process)");
        // One peer a process: the process is the peer.
        let mut one = Groups::new(4, 1);
        assert_eq!((one.processes(), one.index(2, 12345), one.name(2)), (4, 2, "peer #2".to_string()));
    }
}
