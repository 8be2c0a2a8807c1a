//! Network namespaces for system tests that need real separate network stacks (partitions,
//! several hosts): `ip` wrappers, namespaces deleted with everything in them when the test ends
//! (also on panic), and the launcher run inside one.
//!
//! Needs root (CAP_SYS_ADMIN) and iproute2; [`Netns::new`] fails the test with a clear message
//! without them. Every namespace is named `hv<pid>x<n>...`, so CI's leftover check finds leaks.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use std::net::Ipv4Addr;
use std::path::Path;

use crate::support::{Proc, await_broker, ensure_installed, exe};

/// iproute2's `ip`, installed first if missing (see [`ensure_installed`]).
fn ip_bin() -> &'static std::path::Path {
    static IP: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IP.get_or_init(|| {
        ensure_installed("ip", "iproute2")
            .unwrap_or_else(|e| panic!("the partition and multi-host tests need iproute2: {e}"))
    })
}

/// Runs `ip ARGS`, returning its stderr on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new(ip_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("`ip {}` failed ({}): {}", args.join(" "), out.status, stderr.trim()))
    }
}

pub fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// Names of the namespaces that exist now.
pub fn netns_list() -> Vec<String> {
    let out = Command::new(ip_bin()).args(["netns", "list"]).output().expect("run `ip netns list`");
    // Lines look like `NAME` or `NAME (id: N)`.
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

/// Network namespaces created for one test, deleted on drop with every link inside them (even
/// when the test panics).
#[derive(Debug)]
pub struct Netns {
    /// `hv{pid}x{n}`: unique per test process and per test within it, short enough to read.
    prefix: String,
    pub names: Vec<String>,
}

impl Netns {
    /// Fails the test with a clear message if this process may not create namespaces.
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("hv{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let probe = format!("{prefix}probe");
        if let Err(e) = ip(&["netns", "add", &probe]) {
            panic!(
                "the partition and multi-host tests need root (CAP_SYS_ADMIN) and iproute2 to create \
                 network namespaces, and this process cannot: {e}"
            );
        }
        ip_ok(&["netns", "del", &probe]);
        Self { prefix, names: Vec::new() }
    }

    /// Creates namespace `{prefix}{tag}` with its loopback up; returns its name.
    pub fn add(&mut self, tag: &str) -> String {
        let name = format!("{}{tag}", self.prefix);
        ip_ok(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip_ok(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            // The processes' own guards have killed them by now. Anything still inside would keep
            // the namespace (and its links) alive after `ip netns del`, which only removes the
            // name; it can only be ours, as nobody else knows these namespaces.
            kill_all_in(name);
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("could not delete network namespace {name}: {e}");
            }
        }
    }
}

/// `launcher ARGS` run inside namespace `ns`. `ip netns exec` execs the launcher in place, so the
/// child's pid is the launcher's (checked against the peers' `started` events): killing the
/// child kills the real process.
pub fn launcher_in(ns: &str) -> Command {
    let mut cmd = Command::new(ip_bin());
    cmd.args(["netns", "exec", ns]).arg(exe()).stdin(Stdio::null()).env("TMPDIR", crate::support::scratch());
    // SAFETY: prctl is async-signal-safe and touches only the child's own state. A test process
    // killed outright (a CI timeout) runs no destructor; the kernel then still kills the children.
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

/// Kills (SIGKILL) every process in namespace `ns`, as a machine that loses power; returns how
/// many there were. Only for namespaces of this test: nobody else knows them.
pub fn kill_all_in(ns: &str) -> usize {
    let Ok(out) = Command::new(ip_bin()).args(["netns", "pids", ns]).output() else { return 0 };
    let pids: Vec<i32> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect();
    for &pid in &pids {
        // SAFETY: kill(2) on a process of this test's own namespace.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    pids.len()
}

/// Starts `launcher broker` in namespace `ns`, bound to `bind`:`port`, requiring `login` if given,
/// and waits for its ready line.
pub fn start_broker_in(ns: &str, bind: &str, port: u16, login: Option<(&str, &str)>) -> Proc {
    let mut cmd = launcher_in(ns);
    cmd.args(["broker", "--bind", bind, "--port", &port.to_string()]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    if let Some((user, password)) = login {
        cmd.env(broker::config::AUTH_ENV, format!("{user}:{password}"));
    }
    await_broker(cmd.spawn().expect("spawn broker"), format!("broker in {ns}"))
}

/// Starts a peer in namespace `ns` against the broker at `host`:`port` (logging in with `login`
/// if given), in a room of `room_size`, writing its events to `events` and its log beside them.
pub fn start_peer_in(
    ns: &str,
    (host, port): (Ipv4Addr, u16),
    events: &Path,
    room_size: usize,
    login: Option<(&str, &str)>,
) -> Proc {
    let log = std::fs::File::create(events.with_extension("log")).expect("create peer log");
    let mut cmd = launcher_in(ns);
    cmd.args(["peer", "--host", &host.to_string(), "--port", &port.to_string()])
        .args(["--room-size", &room_size.to_string(), "--difficulty", "18", "--threads", "1", "--keepalive", "1"])
        .args(["--log", "info", "--events"])
        .arg(events)
        .stdout(Stdio::null())
        .stderr(log);
    if let Some((user, password)) = login {
        cmd.env("HASHVOTE_USERNAME", user).env("HASHVOTE_PASSWORD", password);
    }
    Proc { child: cmd.spawn().expect("spawn peer"), name: format!("peer in {ns}") }
}
