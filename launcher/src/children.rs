//! The launcher's child processes: the broker and the peers.
//!
//! No child may outlive the launcher. Each child is in its own process group (so a terminal's
//! Ctrl-C reaches only the launcher, which then stops the room in order), asks the kernel to kill
//! it when the launcher dies (`PR_SET_PDEATHSIG`, for a launcher killed with SIGKILL), and is
//! killed when its handle is dropped (for any error path of the launcher itself).
//!
//! A room can require a [`Login`]: the broker and the peers then get it through their
//! environment (`HASHVOTE_BROKER_AUTH`, `HASHVOTE_USERNAME`/`HASHVOTE_PASSWORD`), which only
//! their user can read, never through their command line, which every local user can read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the children say.
#[derive(Debug)]
pub enum Output {
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
    },
    /// The broker exited while the room was running.
    BrokerExited {
        /// How it ended.
        status: String,
    },
}

/// The user name and password a room's broker requires and its peers log in with.
#[derive(Clone)]
pub struct Login {
    /// The user name.
    pub user: String,
    password: String,
}

// By hand, so the password never reaches a log line.
impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Login {
    /// Characters of a generated password: 24 alphanumerics carry about 143 bits.
    pub const GENERATED_LEN: usize = 24;

    /// A login for `user` with a fresh random password (from the thread-local CSPRNG).
    pub fn generate(user: &str) -> Self {
        use rand::Rng;
        let password =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(Self::GENERATED_LEN).map(char::from).collect();
        Self { user: user.to_owned(), password }
    }

    /// The login in `HASHVOTE_USERNAME` and `HASHVOTE_PASSWORD` (an empty password if only the
    /// user name is set), for a room on someone else's broker; `None` without a user name.
    pub fn from_env() -> Option<Self> {
        let user = std::env::var("HASHVOTE_USERNAME").ok().filter(|u| !u.is_empty())?;
        Some(Self { user, password: std::env::var("HASHVOTE_PASSWORD").unwrap_or_default() })
    }

    /// A login with a known password (e.g. read from a file).
    pub fn new(user: String, password: String) -> Self {
        Self { user, password }
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }
}

struct Running {
    pid: u32,
    /// Resolves when the child has exited (the task owns the child, which kills it on drop).
    waiter: JoinHandle<()>,
}

/// The broker and the peers the launcher started.
pub struct Children {
    exe: PathBuf,
    out: mpsc::UnboundedSender<Output>,
    stopping: Arc<AtomicBool>,
    broker: Option<Running>,
    peers: Vec<Running>,
    login: Option<Login>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children").field("peers", &self.peers.len()).finish_non_exhaustive()
    }
}

/// The command for a child in `role` (`broker` or `peer`): piped output, its own process group,
/// killed when the launcher dies or drops it.
pub(crate) fn command(exe: &Path, role: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg(role)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the child's own process state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

fn forward_lines<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    out: mpsc::UnboundedSender<Output>,
    wrap: impl Fn(String) -> Output + Send + 'static,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if out.send(wrap(line)).is_err() {
                break;
            }
        }
    });
}

impl Children {
    /// No children yet; `exe` is the launcher's own executable.
    pub fn new(exe: PathBuf, out: mpsc::UnboundedSender<Output>) -> Self {
        Self { exe, out, stopping: Arc::new(AtomicBool::new(false)), broker: None, peers: Vec::new(), login: None }
    }

    /// Makes the broker started next require `login`, and every peer log in with it (`None`: no
    /// login; any inherited credentials are removed from the children's environment).
    pub fn set_login(&mut self, login: Option<Login>) {
        self.login = login;
    }

    /// Starts the broker on 127.0.0.1:`port` and waits until it says it is listening.
    pub async fn start_broker(&mut self, port: u16) -> anyhow::Result<SocketAddr> {
        let args = ["--bind".to_string(), "127.0.0.1".into(), "--port".into(), port.to_string()];
        let mut cmd = command(&self.exe, "broker", &args);
        match &self.login {
            Some(login) => cmd.env(broker::config::AUTH_ENV, format!("{}:{}", login.user, login.password)),
            None => cmd.env_remove(broker::config::AUTH_ENV),
        };
        let mut child = cmd.spawn().context("cannot start the broker")?;
        let pid = child.id().context("the broker exited at once")?;
        let mut stdout = BufReader::new(child.stdout.take().context("broker stdout")?).lines();
        let mut stderr = BufReader::new(child.stderr.take().context("broker stderr")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(15), async {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Some(addr) = broker::server::parse_ready_line(&line) {
                    return Ok(addr);
                }
            }
            // stdout closed: the broker died; its last stderr line says why.
            let mut last = String::from("no message");
            while let Ok(Some(line)) = stderr.next_line().await {
                last = line;
            }
            Err(anyhow::anyhow!("the broker did not start: {last}"))
        })
        .await;
        let addr = match ready {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("the broker did not report listening within 15 s"),
        };
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let out = self.out.clone();
        forward_lines(stderr.into_inner().into_inner(), out.clone(), |line| Output::Log { index: usize::MAX, line });
        let stopping = Arc::clone(&self.stopping);
        let waiter = tokio::spawn(async move {
            let status = describe(child.wait().await);
            if !stopping.load(Ordering::Acquire) {
                let _ = out.send(Output::BrokerExited { status });
            }
        });
        self.broker = Some(Running { pid, waiter });
        Ok(addr)
    }

    /// Starts peer number `index` with the given flags.
    pub fn start_peer(&mut self, index: usize, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = command(&self.exe, "peer", args);
        match &self.login {
            Some(login) => cmd.env("HASHVOTE_USERNAME", &login.user).env("HASHVOTE_PASSWORD", &login.password),
            None => cmd.env_remove("HASHVOTE_USERNAME").env_remove("HASHVOTE_PASSWORD"),
        };
        let mut child = cmd.spawn().with_context(|| format!("cannot start peer #{index}"))?;
        let pid = child.id().with_context(|| format!("peer #{index} exited at once"))?;
        let out = self.out.clone();
        forward_lines(child.stdout.take().context("peer stdout")?, out.clone(), move |line| Output::Event {
            index,
            line,
        });
        forward_lines(child.stderr.take().context("peer stderr")?, out.clone(), move |line| Output::Log {
            index,
            line,
        });
        let stopping = Arc::clone(&self.stopping);
        let waiter = tokio::spawn(async move {
            let status = describe(child.wait().await);
            if !stopping.load(Ordering::Acquire) {
                let _ = out.send(Output::Exited { index, status });
            }
        });
        self.peers.push(Running { pid, waiter });
        Ok(())
    }

    /// Process ids of the peers, by index.
    pub fn peer_pids(&self) -> Vec<u32> {
        self.peers.iter().map(|p| p.pid).collect()
    }

    /// Sends `sig` to peer `index` if it is still running; false if it is not.
    pub fn signal_peer(&self, index: usize, sig: libc::c_int) -> bool {
        match self.peers.get(index) {
            Some(r) if !r.waiter.is_finished() => {
                signal(r.pid, sig);
                true
            }
            _ => false,
        }
    }

    /// Stops the room: every peer but `last` (the controller), then `last`, then the broker. Each
    /// group gets SIGTERM and `grace` to exit, then SIGKILL.
    pub async fn stop_all(&mut self, last: Option<usize>, grace: Duration) {
        self.stopping.store(true, Ordering::Release);
        let mut peers: Vec<(usize, Running)> = self.peers.drain(..).enumerate().collect();
        let tail = last.and_then(|i| peers.iter().position(|(j, _)| *j == i)).map(|at| peers.remove(at));
        stop_group(peers.into_iter().map(|(_, r)| r).collect(), grace).await;
        stop_group(tail.into_iter().map(|(_, r)| r).collect(), grace).await;
        stop_group(self.broker.take().into_iter().collect(), grace).await;
    }
}

async fn stop_group(group: Vec<Running>, grace: Duration) {
    for r in group.iter().filter(|r| !r.waiter.is_finished()) {
        signal(r.pid, libc::SIGTERM);
    }
    for mut r in group {
        if tokio::time::timeout(grace, &mut r.waiter).await.is_err() {
            signal(r.pid, libc::SIGKILL);
            let _ = r.waiter.await;
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own unreaped child
        // (its waiter task has not returned), so it cannot have been recycled for another process.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
