//! `launcher watch`: the dashboard of a room started elsewhere — any broker, peers on any
//! machines — built only from the room's MQTT traffic (see [`observe`](crate::observe)). Without
//! a terminal (or with `--plain`) it prints one timestamped line per happening instead. Given the
//! nodes of a broker cluster, it follows the room from the first, and from the next when its node
//! is lost.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use peer::protocol::RejectReason;
use ratatui::crossterm::event::KeyEvent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::{Brokers, WatchArgs};
use crate::dashboard::{Command, Ui};
use crate::launch::REDRAW;
use crate::observe::{self, Seen, Target};
use crate::report;
use crate::screen::{self, Screen};
use crate::view::{Happening, RoomView};

/// Runs `launcher watch`; the whole of `main` for it.
pub(crate) fn main(args: WatchArgs) -> ExitCode {
    crate::runtime::block_on("launcher watch", async { run(args).await.map(|()| ExitCode::SUCCESS) })
}

/// Whether a happening gets a plain line: late solutions are the normal end of every race (the
/// dashboard's results panel still shows them), any other rejection is news.
fn worth_a_line(happening: &Happening) -> bool {
    !matches!(happening, Happening::Rejected { reason: RejectReason::AlreadySolved, .. })
}

/// The login to use: the user name with the password from `--password-file` or HASHVOTE_PASSWORD.
fn login(args: &WatchArgs) -> anyhow::Result<Option<(String, String)>> {
    let Some(user) = &args.username else { return Ok(None) };
    let password = match &args.password_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        None => std::env::var("HASHVOTE_PASSWORD").unwrap_or_default(),
    };
    Ok(Some((user.clone(), password)))
}

async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let brokers = args.brokers()?;
    let target = Target { brokers: brokers.clone(), prefix: args.prefix.clone(), login: login(&args)? };
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let mut seen_rx = observe::spawn(target, stop.clone());
    let mut watcher = Watcher::new(args, brokers)?;
    let mut redraw = tokio::time::interval(REDRAW);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut shutdown = std::pin::pin!(peer::cli::shutdown_signal());
    // An error out of a handler (the terminal) ends the watch at once.
    let outcome = loop {
        let next = tokio::select! {
            () = &mut shutdown => Some(Ok(())),
            seen = seen_rx.recv() => watcher.on_seen(seen),
            Some(key) = screen::next_key(&mut watcher.keys) => watcher.on_key(key),
            _ = redraw.tick() => watcher.on_tick()?,
        };
        if let Some(outcome) = next {
            break outcome;
        }
    };
    watcher.finish(outcome)
}

/// A room being watched and what shows it.
struct Watcher {
    args: WatchArgs,
    /// The broker, or the nodes of its cluster.
    brokers: Brokers,
    /// The dashboard is on (else plain lines).
    dashboard: bool,
    started: std::time::Instant,
    view: RoomView,
    ui: Ui,
    screen: Option<Screen>,
    keys: Option<mpsc::UnboundedReceiver<KeyEvent>>,
    /// The observer is connected (a lost connection is said once).
    connected: bool,
}

/// What a handler says: `None` to go on, else the watch's outcome.
type Next = Option<anyhow::Result<()>>;

impl Watcher {
    fn new(args: WatchArgs, brokers: Brokers) -> anyhow::Result<Self> {
        let dashboard = !args.plain && std::io::stdout().is_terminal();
        let (screen, keys) = if dashboard {
            let (s, k) = Screen::start().context("cannot take over the terminal (try --plain)")?;
            (Some(s), Some(k))
        } else {
            (None, None)
        };
        let ui = Ui::new(format!("watching room '{}'", args.prefix), brokers.to_string(), None);
        let watcher = Self {
            args,
            brokers,
            dashboard,
            started: std::time::Instant::now(),
            view: RoomView::new(),
            ui,
            screen,
            keys,
            connected: false,
        };
        if !dashboard {
            watcher.print(format!("watching room '{}' at {}", watcher.args.prefix, watcher.brokers));
        }
        Ok(watcher)
    }

    /// A plain line, timestamped from the start of the watch.
    fn print(&self, line: String) {
        println!("[{:7.3}s] {line}", self.started.elapsed().as_secs_f64());
    }

    /// A line on the dashboard's message line, or printed without the dashboard.
    fn say(&mut self, line: String) {
        if self.dashboard { self.ui.message = Some(line) } else { self.print(line) }
    }

    /// What the observer saw (`None`: it has stopped).
    fn on_seen(&mut self, seen: Option<Seen>) -> Next {
        let Some(seen) = seen else { return Some(Ok(())) };
        let line = match seen {
            Seen::Observed(o) => {
                for happening in self.view.observe(peer::events::now_ms(), o) {
                    if !self.dashboard && worth_a_line(&happening) {
                        self.print(happening.to_string());
                    }
                }
                None
            }
            Seen::Connected(node) => {
                self.connected = true;
                Some(format!("connected to {node}"))
            }
            Seen::Lost(reason) if self.connected => {
                self.connected = false;
                let to = if self.brokers.nodes().len() > 1 { "the next node" } else { "it" };
                Some(format!("connection lost ({reason}); reconnecting to {to}"))
            }
            Seen::Lost(_) => None,
            Seen::Dropped { topic, reason } => Some(format!("dropped a message on {topic}: {reason}")),
            Seen::Refused(reason) => return Some(Err(anyhow::anyhow!(reason))),
        };
        if let Some(line) = line {
            self.say(line);
        }
        (self.args.rounds > 0 && self.view.height() >= self.args.rounds).then_some(Ok(()))
    }

    /// A key pressed on the dashboard.
    fn on_key(&mut self, key: KeyEvent) -> Next {
        if screen::is_interrupt(&key) {
            return Some(Ok(()));
        }
        match crate::dashboard::command(key, &self.view, &self.ui) {
            Command::Quit => return Some(Ok(())),
            Command::KillController | Command::TogglePause(_) => {
                self.ui.message =
                    Some("watch only observes: k and p work in the launcher that started the room".into());
            }
            Command::Up => self.ui.up(&self.view),
            Command::Down => self.ui.down(&self.view),
            Command::None => {}
        }
        None
    }

    /// The redraw tick: the view ages (which may be news), the dashboard is drawn.
    fn on_tick(&mut self) -> anyhow::Result<Next> {
        let now = peer::events::now_ms();
        for happening in self.view.tick(now) {
            self.say(happening.to_string());
        }
        if let Some(s) = self.screen.as_mut() {
            s.draw(&self.view, &self.ui, now).context("cannot draw the dashboard")?;
        }
        Ok(None)
    }

    /// Gives the terminal back and writes the report.
    fn finish(mut self, outcome: anyhow::Result<()>) -> anyhow::Result<()> {
        drop(self.screen.take());
        // What the room's statuses say of its traffic, as the launcher's summary does.
        if let Some(traffic) = self.view.traffic().filter(|_| self.args.rounds > 0 && outcome.is_ok()) {
            println!("{traffic}");
        }
        if let Some(dir) = &self.args.report {
            report::save(dir, &self.view, &format!("hashvote room '{}' at {}", self.args.prefix, self.brokers))?;
        }
        outcome
    }
}
