//! The launcher: starts a broker and a room of peers as child processes, shows what the room does
//! from the peers' event streams, and stops every child when it stops, whatever the reason.
//!
//! Unless told `--no-auth`, the room's broker requires a login generated for the run (see
//! [`children::Login`]); the password is written to a [`PasswordFile`] for outside clients.

pub mod chaos;
pub mod children;
pub mod cli;
pub mod dashboard;
pub mod failover;
pub mod invariants;
pub mod report;
pub mod tally;
pub mod view;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::mpsc;

use crate::children::{Children, Login, Output};
use crate::cli::RoomArgs;
use crate::tally::Tally;

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
    args.hash.parse::<peer::pow::HashAlg>().map_err(anyhow::Error::msg)?;
    let (port, note) = pick_port(args.port)?;
    if let Some(note) = note {
        println!("{note}");
    }
    let exe = std::env::current_exe().context("cannot find the launcher's own executable")?;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let mut children = Children::new(exe, out_tx);

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
    let mut tally = Tally::new(args.peers as usize);
    for index in 0..args.peers as usize {
        children.start_peer(index, &peer_args(&args, addr))?;
    }
    println!("started {} peers; waiting for them to meet and elect a controller", args.peers);

    let mut events_file = match &args.events {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => None,
    };

    let mut shutdown = Box::pin(shutdown_signal());
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            () = &mut shutdown => {
                println!("stopping the room");
                break Ok(());
            }
            out = out_rx.recv() => match out {
                None => break Ok(()),
                Some(Output::Event { index, line }) => {
                    if let Some(file) = events_file.as_mut() {
                        writeln!(file, "{line}").context("cannot write the events file")?;
                    }
                    match serde_json::from_str(&line) {
                        Ok(record) => tally.record(index, record, &mut |l| print_line(&l)),
                        Err(_) => print_line(&format!("peer #{index}: {line}")),
                    }
                    if args.rounds > 0 && tally.all_have(args.rounds) {
                        break Ok(());
                    }
                }
                Some(Output::Log { index, line }) => {
                    if args.verbose {
                        print_line(&format!("peer #{index}: {line}"));
                    }
                }
                Some(Output::Exited { index, status }) => {
                    tally.exited(index);
                    print_line(&format!("peer #{index} exited unexpectedly ({status})"));
                    if tally.live() == 0 {
                        break Err(anyhow::anyhow!("every peer exited"));
                    }
                }
                Some(Output::BrokerExited { status }) => break Err(anyhow::anyhow!("the broker exited ({status})")),
            }
        }
    };
    if let Some(mut file) = events_file {
        file.flush().context("cannot write the events file")?;
    }
    // Miners first, the controller last: the room should not hold an election while it closes.
    let leader = tally.leader_index();
    children.stop_all(leader, Duration::from_secs(5)).await;
    drop(password_file);
    if args.rounds > 0 && outcome.is_ok() {
        println!("{}", tally.summary());
    }
    outcome
}

fn peer_args(args: &RoomArgs, addr: SocketAddr) -> Vec<String> {
    let mut out = vec![
        "--target-block-ms".into(),
        args.target_block_ms.to_string(),
        "--host".into(),
        addr.ip().to_string(),
        "--port".into(),
        addr.port().to_string(),
        "--room-size".into(),
        args.peers.to_string(),
        "--difficulty".into(),
        args.difficulty.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--hash".into(),
        args.hash.clone(),
        "--keepalive".into(),
        args.keepalive.to_string(),
        "--events".into(),
        "-".into(),
        "--log".into(),
        "warn".into(),
    ];
    if let Some(range) = &args.difficulty_range {
        out.extend(["--difficulty-range".into(), range.clone()]);
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
