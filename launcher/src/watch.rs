//! `launcher watch`: the dashboard of a room started elsewhere — any broker, peers on any
//! machines — built only from the room's MQTT traffic (see [`observe`](crate::observe)). Without
//! a terminal (or with `--plain`) it prints one timestamped line per happening instead.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cli::WatchArgs;
use crate::dashboard::{Command, Ui};
use crate::observe::{self, Seen, Target};
use crate::screen::{self, Screen};
use crate::view::{Happening, RoomView};
use peer::protocol::RejectReason;

/// Runs `launcher watch`; the whole of `main` for it.
pub fn main(args: WatchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("launcher watch: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("launcher watch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    let target = Target { host: args.host.clone(), port: args.port, prefix: args.prefix.clone(), login: login(&args)? };
    let dashboard = !args.plain && std::io::stdout().is_terminal();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let mut seen_rx = observe::spawn(target, stop.clone());
    let started = std::time::Instant::now();
    let say = |line: String| println!("[{:7.3}s] {line}", started.elapsed().as_secs_f64());
    if !dashboard {
        say(format!("watching room '{}' at {}:{}", args.prefix, args.host, args.port));
    }

    let mut view = RoomView::new();
    let mut ui = Ui::new(format!("watching room '{}'", args.prefix), format!("{}:{}", args.host, args.port), None);
    let (mut screen, mut keys) = if dashboard {
        let (s, k) = Screen::start().context("cannot take over the terminal (try --plain)")?;
        (Some(s), Some(k))
    } else {
        (None, None)
    };
    let mut redraw = tokio::time::interval(Duration::from_millis(100));
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut connected = false;
    let mut shutdown = Box::pin(crate::shutdown_signal());
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            seen = seen_rx.recv() => {
                let Some(seen) = seen else { break Ok(()) };
                let now = peer::events::now_ms();
                let line = match seen {
                    Seen::Observed(o) => {
                        for happening in view.observe(now, o) {
                            if !dashboard && worth_a_line(&happening) {
                                say(happening.to_string());
                            }
                        }
                        None
                    }
                    Seen::Connected => {
                        connected = true;
                        Some(format!("connected to {}:{}", args.host, args.port))
                    }
                    Seen::Lost(reason) if connected => {
                        connected = false;
                        Some(format!("connection lost ({reason}); reconnecting"))
                    }
                    Seen::Lost(_) => None,
                    Seen::Dropped { topic, reason } => Some(format!("dropped a message on {topic}: {reason}")),
                    Seen::Refused(reason) => break Err(anyhow::anyhow!(reason)),
                };
                if let Some(line) = line {
                    if dashboard { ui.message = Some(line) } else { say(line) }
                }
                if args.rounds > 0 && view.height() >= args.rounds {
                    break Ok(());
                }
            }
            Some(key) = crate::next_key(&mut keys) => match crate::dashboard::command(key, &view, &ui) {
                _ if screen::is_interrupt(&key) => break Ok(()),
                Command::Quit => break Ok(()),
                Command::KillController | Command::TogglePause(_) => {
                    ui.message = Some("watch only observes: k and p work in the launcher that started the room".into());
                }
                Command::Up => ui.up(&view),
                Command::Down => ui.down(&view),
                Command::None => {}
            },
            _ = redraw.tick() => {
                let now = peer::events::now_ms();
                for happening in view.tick(now) {
                    if dashboard { ui.message = Some(happening.to_string()) } else { say(happening.to_string()) }
                }
                if let Some(s) = screen.as_mut() {
                    s.draw(&view, &ui, now).context("cannot draw the dashboard")?;
                }
            }
        }
    };
    drop(screen.take());
    if let Some(dir) = &args.report {
        crate::write_report(dir, &view, &format!("hashvote room '{}' at {}:{}", args.prefix, args.host, args.port))?;
    }
    outcome
}
