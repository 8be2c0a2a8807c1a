//! The launcher: starts a broker and a room of peers as child processes, shows what the room does
//! from the peers' event streams, and stops every child when it stops, whatever the reason.
//!
//! Unless told `--no-auth`, the room's broker requires a login generated for the run (see
//! [`children::Login`]); the password is written to a [`PasswordFile`] for outside clients.

pub mod chaos;
pub mod children;
pub mod cli;
pub mod dashboard;
pub mod decode;
pub mod failover;
pub mod invariants;
pub mod observe;
pub mod report;
pub mod screen;
pub mod tally;
pub mod view;
pub mod watch;

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use peer::config::Wire;
use ratatui::crossterm::event::KeyEvent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::children::{Children, Login, Output};
use crate::cli::RoomArgs;
use crate::dashboard::{Command, Ui};
use crate::observe::{Seen, Target};
use crate::screen::Screen;
use crate::tally::Tally;
use crate::view::RoomView;

/// The port a demo uses unless told otherwise (MQTT's standard port).
pub const DEFAULT_PORT: u16 = 1883;

/// The user name of the login a demo generates.
pub const DEMO_USER: &str = "hashvote";

/// A password written for outside clients: `password` in a fresh directory under the system's
/// temporary directory, the directory mode 0700 and the file 0600 (both created new, so nothing
/// planted there beforehand is used). Both are removed when this is dropped.
#[derive(Debug)]
pub struct PasswordFile {
    dir: PathBuf,
    path: PathBuf,
}

impl PasswordFile {
    /// Writes `password` (and a newline) to a new private file.
    pub fn create(password: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let suffix: u64 = rand::random();
        let dir = std::env::temp_dir().join(format!("hashvote-{}-{suffix:016x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let created = Self { path: dir.join("password"), dir };
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&created.path)?;
        writeln!(file, "{password}")?;
        Ok(created)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PasswordFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs a room from parsed arguments; the whole of `main` for the launcher role.
pub fn main(args: RoomArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("launcher: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("launcher: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Picks the broker port: the one asked for (which must be free), else 1883, else any free port.
fn pick_port(asked: Option<u16>) -> anyhow::Result<(u16, Option<String>)> {
    let free = |port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(|l| l.local_addr().map(|a| a.port()));
    match asked {
        Some(port) => match free(port) {
            Ok(_) => Ok((port, None)),
            Err(e) => bail!("port {port} on 127.0.0.1 is not available ({e}); choose another with --port"),
        },
        None => match free(DEFAULT_PORT) {
            Ok(_) => Ok((DEFAULT_PORT, None)),
            Err(_) => {
                let port = free(0).context("cannot find a free port")??;
                Ok((port, Some(format!("port {DEFAULT_PORT} is busy; using port {port} instead"))))
            }
        },
    }
}

async fn run(args: RoomArgs) -> anyhow::Result<()> {
    // Before anything starts: a mistake here is the user's, with nothing to clean up.
    let run_dir = run_dir(&args)?;
    let dashboard = !args.plain && std::io::stdout().is_terminal();
    let exe = std::env::current_exe().context("cannot find the launcher's own executable")?;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let mut children = Children::new(exe, out_tx);

    // Our own broker with a generated login, or someone else's with the login in our environment.
    let (host, port, login, password_file) = match &args.broker {
        Some((host, port)) => {
            let login = Login::from_env();
            println!(
                "using the broker at {host}:{port} ({})",
                if login.is_some() { "with a login" } else { "no login" }
            );
            (host.clone(), *port, login, None)
        }
        None => {
            let (port, note) = pick_port(args.port)?;
            if let Some(note) = note {
                println!("{note}");
            }
            let login = (!args.no_auth).then(|| Login::generate(DEMO_USER));
            // Kept until the room stops: the password is useless once the broker is gone.
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
            (addr.ip().to_string(), addr.port(), login, password_file)
        }
    };
    children.set_login(login.clone());
    let mut tally = Tally::new(args.peers as usize);
    for index in 0..args.peers as usize {
        let mut peer = peer_args(&args, &host, port);
        if let Some(dir) = &run_dir {
            peer.extend(["--data-dir".into(), dir.join(format!("peer-{index}")).display().to_string()]);
        }
        children.start_peer(index, &peer)?;
    }
    println!("started {} peers; waiting for them to meet and elect a controller", args.peers);

    let mut events_file = match &args.events {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => None,
    };

    // The dashboard and the report are built from the room's MQTT traffic, as `launcher watch`
    // builds them from afar; the plain lines and the summary come from the peers' events.
    let stop_observer = CancellationToken::new();
    let _stop_observer = stop_observer.clone().drop_guard();
    let mut observer = (dashboard || args.report.is_some()).then(|| {
        let target = Target {
            host: host.clone(),
            port,
            prefix: args.prefix.clone(),
            login: login.as_ref().map(|l| (l.user.clone(), l.password().to_string())),
        };
        observe::spawn(target, stop_observer.clone())
    });
    let mut view = RoomView::new();
    let mut ui = Ui::new("hashvote room".to_string(), format!("{host}:{port}"), Some(args.peers as usize));
    let mut screen = None;
    let mut keys = None;
    if dashboard {
        let (s, k) = Screen::start().context("cannot take over the terminal (try --plain)")?;
        screen = Some(s);
        keys = Some(k);
    }
    let mut paused: BTreeSet<usize> = BTreeSet::new();
    let mut redraw = tokio::time::interval(REDRAW);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    let mut shutdown = Box::pin(shutdown_signal());
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            () = &mut shutdown => {
                if !dashboard {
                    println!("stopping the room");
                }
                break Ok(());
            }
            Some(seen) = next(&mut observer) => {
                if let Some(e) = observed(&mut view, seen) {
                    break Err(e);
                }
            }
            Some(key) = next_key(&mut keys) => {
                match dashboard::command(key, &view, &ui) {
                    _ if screen::is_interrupt(&key) => break Ok(()),
                    Command::Quit => break Ok(()),
                    Command::KillController => {
                        let target = view.controller().and_then(|(_, id)| tally.index_of(id).map(|i| (id, i)));
                        ui.message = Some(match target {
                            Some((id, index)) if children.signal_peer(index, libc::SIGKILL) => {
                                paused.remove(&index);
                                format!("killed the controller, peer #{index} ({id}), with SIGKILL")
                            }
                            _ => "no running controller to kill".to_string(),
                        });
                    }
                    Command::TogglePause(id) => {
                        ui.message = Some(match tally.index_of(id) {
                            Some(index) if paused.contains(&index) => {
                                children.signal_peer(index, libc::SIGCONT);
                                paused.remove(&index);
                                ui.paused.remove(&id);
                                format!("resumed peer #{index} ({id})")
                            }
                            Some(index) if children.signal_peer(index, libc::SIGSTOP) => {
                                paused.insert(index);
                                ui.paused.insert(id);
                                format!("paused peer #{index} ({id}) with SIGSTOP; p again resumes it")
                            }
                            _ => format!("peer {id} is not one of this launcher's running peers"),
                        });
                    }
                    Command::Up => ui.up(&view),
                    Command::Down => ui.down(&view),
                    Command::None => {}
                }
            }
            _ = redraw.tick(), if screen.is_some() => {
                let now = peer::events::now_ms();
                view.tick(now);
                if let Some(s) = screen.as_mut() {
                    s.draw(&view, &ui, now).context("cannot draw the dashboard")?;
                }
            }
            out = out_rx.recv() => match out {
                None => break Ok(()),
                Some(Output::Event { index, line }) => {
                    if let Some(file) = events_file.as_mut() {
                        writeln!(file, "{line}").context("cannot write the events file")?;
                    }
                    let mut say = |l: String| if !dashboard { print_line(&l) };
                    match serde_json::from_str(&line) {
                        Ok(record) => tally.record(index, record, &mut say),
                        Err(_) => say(format!("peer #{index}: {line}")),
                    }
                    if args.rounds > 0 && tally.all_have(args.rounds) {
                        break Ok(());
                    }
                }
                Some(Output::Log { index, line }) => {
                    if args.verbose && !dashboard {
                        print_line(&format!("peer #{index}: {line}"));
                    }
                }
                Some(Output::Exited { index, status }) => {
                    tally.exited(index);
                    let line = format!("peer #{index} exited ({status})");
                    if dashboard { ui.message = Some(line) } else { print_line(&line) }
                    if tally.live() == 0 {
                        break Err(anyhow::anyhow!("every peer exited"));
                    }
                }
                Some(Output::BrokerExited { status }) => break Err(anyhow::anyhow!("the broker exited ({status})")),
            }
        }
    };
    drop(screen);
    if dashboard {
        println!("stopping the room");
    }
    if let Some(mut file) = events_file {
        file.flush().context("cannot write the events file")?;
    }
    // A stopped peer would only die at the SIGKILL after the grace period.
    for &index in &paused {
        children.signal_peer(index, libc::SIGCONT);
    }
    // The observer trails the peers' own events by a message or two: let the report catch up
    // with the blocks the summary counts.
    if args.rounds > 0 && outcome.is_ok() {
        catch_up(&mut observer, &mut view, |v| v.height() >= args.rounds).await;
    }
    // Miners first, the controller last: the room should not hold an election while it closes.
    let leader = tally.leader_index();
    children.stop_all(leader, Duration::from_secs(5)).await;
    // And the peers' last statuses (offline, with their final figures).
    catch_up(&mut observer, &mut view, |_| false).await;
    drop(password_file);
    if args.rounds > 0 && outcome.is_ok() {
        println!("{}", tally.summary());
    }
    if let Some(dir) = &args.report {
        write_report(dir, &view, &format!("hashvote room of {} peers", args.peers))?;
    }
    outcome
}

/// How often the dashboard is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

/// The next item of an optional channel; pending for ever without one.
async fn next<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn next_key(rx: &mut Option<mpsc::UnboundedReceiver<KeyEvent>>) -> Option<KeyEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Feeds the view until `done` holds, the observer is quiet for 200 ms, or 2 s have passed.
async fn catch_up(observer: &mut Option<mpsc::Receiver<Seen>>, view: &mut RoomView, done: impl Fn(&RoomView) -> bool) {
    let Some(rx) = observer.as_mut() else { return };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !done(view) {
        let quiet = (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline);
        match tokio::time::timeout_at(quiet, rx.recv()).await {
            Ok(Some(seen)) => {
                let _ = observed(view, seen);
            }
            Ok(None) | Err(_) => break,
        }
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
        Seen::Connected | Seen::Lost(_) | Seen::Dropped { .. } => None,
    }
}

/// Writes the report and says where it is.
pub(crate) fn write_report(dir: &Path, view: &RoomView, title: &str) -> anyhow::Result<()> {
    let summary =
        report::write(dir, view, title).with_context(|| format!("cannot write the report to {}", dir.display()))?;
    println!("report: {} ({} blocks, {} plots)", dir.join("index.html").display(), summary.blocks, summary.plots);
    Ok(())
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
            entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("peer-")).count()
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

fn peer_args(args: &RoomArgs, host: &str, port: u16) -> Vec<String> {
    let mut out = vec![
        "--target-block-ms".into(),
        args.target_block_ms.to_string(),
        "--host".into(),
        host.to_string(),
        "--port".into(),
        port.to_string(),
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

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
