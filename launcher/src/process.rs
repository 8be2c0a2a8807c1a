//! One child process of the launcher: a broker or a peer, the launcher's own executable run as
//! `launcher broker ...` or `launcher peer ...`.
//!
//! No child may outlive the launcher. Each child is in its own process group (so a terminal's
//! Ctrl-C reaches only the launcher, which then stops its children in order), asks the kernel to
//! kill it when the launcher dies (`PR_SET_PDEATHSIG`, for a launcher killed with SIGKILL), and is
//! killed when its [`Proc`] is dropped (for any error path of the launcher itself). Its output is
//! read line by line by tasks of its own, so it never blocks on a full pipe.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::process::{ChildStderr, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long a broker gets to print its ready line.
const BROKER_READY: Duration = Duration::from_secs(15);
/// How long a process killed with SIGKILL gets to be reaped.
const REAP: Duration = Duration::from_secs(5);

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

/// The command for a broker on 127.0.0.1:`port`.
pub(crate) fn broker_command(exe: &Path, port: u16) -> Command {
    command(exe, "broker", &["--bind".to_string(), "127.0.0.1".into(), "--port".into(), port.to_string()])
}

/// A running child, reaped by a task of its own.
#[derive(Debug)]
pub(crate) struct Proc {
    pid: u32,
    /// How it ended, once it has been reaped.
    status: watch::Receiver<Option<String>>,
    /// Owns the child and reaps it; aborted when this is dropped, which drops the child and so
    /// kills it.
    waiter: JoinHandle<()>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.waiter.abort();
    }
}

impl Proc {
    /// Starts `cmd` (from [`command`]), named `what` in errors; `on_exit` is told how it ended.
    /// Returns it with its stdout and stderr, which the caller must read.
    pub(crate) fn spawn(
        mut cmd: Command,
        what: &str,
        on_exit: impl FnOnce(String) + Send + 'static,
    ) -> anyhow::Result<(Self, ChildStdout, ChildStderr)> {
        let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        let pid = child.id().with_context(|| format!("{what} exited at once"))?;
        let stdout = child.stdout.take().with_context(|| format!("{what}: no stdout"))?;
        let stderr = child.stderr.take().with_context(|| format!("{what}: no stderr"))?;
        let (tx, status) = watch::channel(None);
        let waiter = tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            // No await between the reaping and this: on the launcher's one thread, nothing can
            // signal the reaped pid (which the kernel may give to another process) in between.
            let _ = tx.send(Some(status.clone()));
            on_exit(status);
        });
        Ok((Self { pid, status, waiter }, stdout, stderr))
    }

    /// How it ended, once it has been reaped.
    pub(crate) fn status(&self) -> Option<String> {
        self.status.borrow().clone()
    }

    /// Its peak resident memory so far, in KiB (Linux's `VmHWM`); `None` once it has been reaped
    /// (only then could its pid belong to another process) or where `/proc` cannot tell.
    pub(crate) fn peak_rss_kib(&self) -> Option<u64> {
        if self.status.borrow().is_some() {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// Sends `sig`, unless the process has been reaped (only then could its pid have been given
    /// to another process). Returns whether it was sent.
    pub(crate) fn signal(&self, sig: libc::c_int) -> bool {
        if self.status.borrow().is_some() {
            return false;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else { return false };
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid, sig) == 0 }
    }

    /// Waits up to `timeout` for the process to exit; whether it did.
    pub(crate) async fn exited(&mut self, timeout: Duration) -> bool {
        let reaped = tokio::time::timeout(timeout, self.status.wait_for(Option::is_some)).await;
        // An error: the waiter is gone, and the child with it.
        matches!(reaped, Ok(Ok(_) | Err(_)))
    }

    /// SIGKILL, then reap.
    pub(crate) async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.exited(REAP).await;
    }

    /// Stops the process: SIGTERM, and SIGKILL if it has not exited within `grace`. Returns
    /// whether it exited within `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) -> bool {
        stop_group(std::slice::from_mut(self), grace).await
    }
}

/// Stops every process of `group` at once: each gets SIGCONT (a stopped process acts on SIGTERM
/// only once it runs again) and SIGTERM, then, if it has not exited within `grace`, SIGKILL.
/// Returns whether every one exited within `grace`.
pub(crate) async fn stop_group(group: &mut [Proc], grace: Duration) -> bool {
    for p in group.iter() {
        p.signal(libc::SIGCONT);
        p.signal(libc::SIGTERM);
    }
    let mut all = true;
    for p in group {
        if !p.exited(grace).await {
            all = false;
            p.kill().await;
        }
    }
    all
}

/// Waits for a broker's ready line on its `stdout`; returns the address it listens on and its
/// output, unread past that line. If it dies first, the error is its last line on `stderr`.
pub(crate) async fn broker_ready(
    port: u16,
    stdout: ChildStdout,
    stderr: ChildStderr,
) -> anyhow::Result<(SocketAddr, BufReader<ChildStdout>, BufReader<ChildStderr>)> {
    let mut stdout = BufReader::new(stdout).lines();
    let mut stderr = BufReader::new(stderr).lines();
    let ready = tokio::time::timeout(BROKER_READY, async {
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
        Err(anyhow::anyhow!("the broker did not start on port {port}: {last}"))
    })
    .await;
    match ready {
        Ok(Ok(addr)) => Ok((addr, stdout.into_inner(), stderr.into_inner())),
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!("the broker did not report listening within {} s", BROKER_READY.as_secs()),
    }
}

/// Sends each line of `reader` as `wrap(line)` on `out`, then, at its end, calls `done` (not if
/// `out` is closed first).
pub(crate) fn forward_lines<R, T>(
    reader: R,
    out: mpsc::UnboundedSender<T>,
    wrap: impl Fn(String) -> T + Send + 'static,
    done: impl FnOnce() + Send + 'static,
) where
    R: AsyncBufRead + Unpin + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if out.send(wrap(line)).is_err() {
                return;
            }
        }
        done();
    });
}

/// Reads `reader` to its end, dropping every line, then calls `done`.
pub(crate) fn drain<R: AsyncBufRead + Unpin + Send + 'static>(reader: R, done: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(_)) = lines.next_line().await {}
        done();
    });
}
