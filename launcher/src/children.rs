//! The room's child processes: the broker and the peers (each a [`Proc`]), their output merged
//! into one channel, and the room stopped in order.
//!
//! A room can require a [`Login`]: the broker and the peers then get it through their
//! environment (`HASHVOTE_BROKER_AUTH`, `HASHVOTE_USERNAME`/`HASHVOTE_PASSWORD`), which only
//! their user can read, never through their command line, which every local user can read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::sync::mpsc;

use crate::login::Login;
use crate::process::{self, Proc};

/// What the children say.
#[derive(Debug)]
pub(crate) enum Output {
    /// A line of a peer's event stream (its stdout).
    Event {
        /// Peer index (0-based, in start order).
        index: usize,
        /// The JSON line.
        line: String,
    },
    /// A line of a peer's log (its stderr).
    Log {
        /// Peer index.
        index: usize,
        /// The line.
        line: String,
    },
    /// A peer exited while the room was running.
    Exited {
        /// Peer index.
        index: usize,
        /// How it ended.
        status: String,
        /// The last error line it printed (`peer: error: ...`), if any: why it ended.
        last_error: Option<String>,
    },
    /// The broker exited while the room was running.
    BrokerExited {
        /// How it ended.
        status: String,
    },
}

/// The broker and the peers the launcher started.
pub(crate) struct Children {
    exe: PathBuf,
    out: mpsc::UnboundedSender<Output>,
    /// Set once the room stops: exits are expected then, and not reported.
    stopping: Arc<AtomicBool>,
    broker: Option<Proc>,
    peers: Vec<Proc>,
    login: Option<Login>,
}

/// How long after a peer's exit its log may still be read for its last error line (a process it
/// left behind could hold the pipe open).
const LAST_WORDS: Duration = Duration::from_secs(1);

/// The message of a line of a child's log that reports an error: `peer: error: MESSAGE` (what a
/// peer prints last when it fails), or a log line at level ERROR (its whole text).
fn error_line(line: &str) -> Option<&str> {
    if let Some((_, message)) = line.split_once(": error: ") {
        return Some(message);
    }
    line.contains(" ERROR ").then_some(line)
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children").field("peers", &self.peers.len()).finish_non_exhaustive()
    }
}

impl Children {
    /// No children yet; `exe` is the launcher's own executable.
    pub(crate) fn new(exe: PathBuf, out: mpsc::UnboundedSender<Output>) -> Self {
        Self { exe, out, stopping: Arc::new(AtomicBool::new(false)), broker: None, peers: Vec::new(), login: None }
    }

    /// Makes the broker started next require `login`, and every peer log in with it (`None`: no
    /// login; any inherited credentials are removed from the children's environment).
    pub(crate) fn set_login(&mut self, login: Option<Login>) {
        self.login = login;
    }

    /// Sends `make(what)` when a child exits, unless the room is stopping.
    fn on_exit<T>(&self, make: impl FnOnce(T) -> Output + Send + 'static) -> impl FnOnce(T) + Send + 'static {
        let (out, stopping) = (self.out.clone(), Arc::clone(&self.stopping));
        move |what| {
            if !stopping.load(Ordering::Acquire) {
                let _ = out.send(make(what));
            }
        }
    }

    /// Starts the broker on 127.0.0.1:`port` and waits until it says it is listening.
    pub(crate) async fn start_broker(&mut self, port: u16) -> anyhow::Result<SocketAddr> {
        let mut cmd = process::broker_command(&self.exe, port);
        match &self.login {
            Some(login) => cmd.env(broker::config::AUTH_ENV, format!("{}:{}", login.user, login.password())),
            None => cmd.env_remove(broker::config::AUTH_ENV),
        };
        let (proc, stdout, stderr) =
            Proc::spawn(cmd, "the broker", self.on_exit(|status| Output::BrokerExited { status }))?;
        let (addr, stdout, stderr) = process::broker_ready(port, stdout, stderr).await?;
        process::drain(stdout, || {});
        process::forward_lines(stderr, self.out.clone(), |line| Output::Log { index: usize::MAX, line }, || {});
        self.broker = Some(proc);
        Ok(addr)
    }

    /// Starts peer number `index` with the given flags.
    pub(crate) fn start_peer(&mut self, index: usize, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = process::command(&self.exe, "peer", args);
        match &self.login {
            Some(login) => cmd.env("HASHVOTE_USERNAME", &login.user).env("HASHVOTE_PASSWORD", login.password()),
            None => cmd.env_remove("HASHVOTE_USERNAME").env_remove("HASHVOTE_PASSWORD"),
        };
        // The exit is reported with the last error line, so once the log has been read to its
        // end too: the reaper may run before the reader has the peer's last words.
        let (last_tx, last_rx) = tokio::sync::oneshot::channel::<Option<String>>();
        let report = self.on_exit(move |(status, last_error)| Output::Exited { index, status, last_error });
        let on_exit = move |status: String| {
            tokio::spawn(async move {
                let last = tokio::time::timeout(LAST_WORDS, last_rx).await.ok().and_then(Result::ok).flatten();
                report((status, last));
            });
        };
        let (proc, stdout, stderr) = Proc::spawn(cmd, &format!("peer #{index}"), on_exit)?;
        let out = self.out.clone();
        process::forward_lines(BufReader::new(stdout), out.clone(), move |line| Output::Event { index, line }, || {});
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let seen = Arc::clone(&last_error);
        let wrap = move |line: String| {
            if let Some(error) = error_line(&line) {
                *seen.lock().expect("not poisoned") = Some(error.to_string());
            }
            Output::Log { index, line }
        };
        let done = move || {
            let _ = last_tx.send(last_error.lock().expect("not poisoned").take());
        };
        process::forward_lines(BufReader::new(stderr), out, wrap, done);
        self.peers.push(proc);
        Ok(())
    }

    /// The peak resident memory (KiB) of the largest peer process still running, and of the
    /// broker if we started it: the memory a room of this size needs.
    pub(crate) fn peak_rss_kib(&self) -> (Option<u64>, Option<u64>) {
        let peers = self.peers.iter().filter_map(Proc::peak_rss_kib).max();
        (peers, self.broker.as_ref().and_then(Proc::peak_rss_kib))
    }

    /// Sends `sig` to peer `index` if it is still running; false if it is not.
    pub(crate) fn signal_peer(&self, index: usize, sig: libc::c_int) -> bool {
        self.peers.get(index).is_some_and(|p| p.signal(sig))
    }

    /// Stops the room: every peer but `last` (the controller), then `last`, then the broker. Each
    /// group gets SIGTERM and `grace` to exit, then SIGKILL.
    pub(crate) async fn stop_all(&mut self, last: Option<usize>, grace: Duration) {
        self.stopping.store(true, Ordering::Release);
        let mut peers = std::mem::take(&mut self.peers);
        let tail = last.filter(|&i| i < peers.len()).map(|i| peers.remove(i));
        process::stop_group(&mut peers, grace).await;
        process::stop_group(&mut Vec::from_iter(tail), grace).await;
        process::stop_group(&mut Vec::from_iter(self.broker.take()), grace).await;
    }
}
