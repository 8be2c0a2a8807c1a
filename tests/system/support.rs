//! Helpers for system tests: free ports, real processes that die with the test, event streams,
//! and the room invariants checked over them.

#![allow(dead_code)] // each test module uses its own part

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use peer::events::{Event, Record};
use peer::protocol::{PeerId, Term};

/// The launcher binary, which is also the broker and the peer (`launcher broker|peer ...`).
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_launcher")
}

/// Where the processes the tests start put their temporary directories (a peer's data directory
/// for one run, a launcher's run directory): under `target/`, not the machine's `/tmp`, since a
/// peer killed with SIGKILL cannot remove its own.
pub fn scratch() -> &'static str {
    env!("CARGO_TARGET_TMPDIR")
}

/// Makes sure `binary` (a path, or a name looked up in `PATH`, `/usr/sbin` and `/sbin`) exists,
/// installing Debian's `package` when it does not (as root, with `apt-get`): the test command
/// sets up what its tests need on a fresh machine. Returns the binary's path, or why it cannot.
pub fn ensure_installed(binary: &str, package: &str) -> Result<PathBuf, String> {
    fn find(binary: &str) -> Option<PathBuf> {
        if binary.contains('/') {
            return Path::new(binary).is_file().then(|| PathBuf::from(binary));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    }
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(found) = find(binary) {
        return Ok(found);
    }
    // One installation at a time (tests run in parallel threads); the next caller finds it.
    let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(found) = find(binary) {
        return Ok(found);
    }
    let how = format!("install it (apt-get install {package})");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!("{binary} is missing and only root can install it here: {how}"));
    }
    eprintln!("{binary} is missing: installing Debian's {package} (apt-get) for the tests");
    let apt = |args: &[&str]| {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{binary} is missing and apt-get cannot run ({e}): {how}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let said = String::from_utf8_lossy(&out.stderr);
            Err(format!("{binary} is missing and `apt-get {}` failed: {}", args.join(" "), said.trim()))
        }
    };
    apt(&["update", "-qq"])?;
    apt(&["install", "-y", "-qq", package])?;
    find(binary).ok_or_else(|| format!("{package} was installed but {binary} is still missing: {how}"))
}

/// A command running the launcher binary (any of its subcommands), its temporary directories in
/// [`scratch`].
pub fn launcher() -> Command {
    let mut cmd = Command::new(exe());
    cmd.env("TMPDIR", scratch());
    cmd
}

/// A port nobody listens on right now, below the kernel's ephemeral range (see
/// [`broker::port::pick`]).
pub fn free_port() -> u16 {
    broker::port::pick().expect("a free port on 127.0.0.1")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, so no test leaves one behind.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `libc::SIGSTOP`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the broker on `port` and waits for its ready line.
pub fn start_broker(port: u16) -> Proc {
    let child = launcher()
        .args(["broker", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    await_broker(child, format!("broker:{port}"))
}

/// Waits (20 s at most) for the ready line of a broker spawned with its stdout piped.
pub fn await_broker(mut child: Child, name: String) -> Proc {
    let stdout = child.stdout.take().expect("the broker's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if broker::server::parse_ready_line(&line).is_some() {
                let _ = tx.send(());
            }
        }
    });
    let proc = Proc { child, name };
    rx.recv_timeout(Duration::from_secs(20)).expect("broker ready line");
    proc
}

/// Which MQTT broker a test runs its room on. Scenarios that must hold on any broker run once per
/// kind (see [`on_both_brokers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// rumqttd, embedded in `launcher broker` (the demo's broker).
    Embedded,
    /// A real Mosquitto (Debian's package), configured by [`Mosquitto::start_on`].
    Mosquitto,
}

impl Broker {
    /// Starts this broker on `port` of 127.0.0.1 and waits until it accepts connections. A missing
    /// Mosquitto fails the test with how to install it: a skipped broker-independence test would
    /// look like a passing one.
    pub fn start(self, port: u16) -> RunningBroker {
        match self {
            Broker::Embedded => RunningBroker::Embedded(start_broker(port)),
            Broker::Mosquitto => RunningBroker::Mosquitto(Mosquitto::start_on(port).unwrap_or_else(|e| panic!("{e}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Broker::Embedded => "rumqttd",
            Broker::Mosquitto => "mosquitto",
        }
    }
}

/// A broker process started by [`Broker::start`]; killed when dropped.
#[derive(Debug)]
pub enum RunningBroker {
    Embedded(Proc),
    Mosquitto(Mosquitto),
}

impl RunningBroker {
    pub fn kind(&self) -> Broker {
        match self {
            RunningBroker::Embedded(_) => Broker::Embedded,
            RunningBroker::Mosquitto(_) => Broker::Mosquitto,
        }
    }

    pub fn proc(&mut self) -> &mut Proc {
        match self {
            RunningBroker::Embedded(proc) | RunningBroker::Mosquitto(Mosquitto { proc, .. }) => proc,
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            RunningBroker::Embedded(proc) | RunningBroker::Mosquitto(Mosquitto { proc, .. }) => proc.pid(),
        }
    }

    /// True while the broker process runs.
    pub fn running(&mut self) -> bool {
        self.proc().child.try_wait().expect("try_wait").is_none()
    }

    /// Kills the broker with SIGKILL (no goodbye to anyone) and reaps it.
    pub fn kill(&mut self) {
        let proc = self.proc();
        proc.signal(libc::SIGKILL);
        proc.wait_exit(Duration::from_secs(10));
    }

    /// Starts the same broker again on the same port (Mosquitto with the same configuration); the
    /// old process must be gone (see [`RunningBroker::kill`]).
    pub fn restart(&mut self, port: u16) {
        match self {
            RunningBroker::Embedded(proc) => *proc = start_broker(port),
            RunningBroker::Mosquitto(m) => m.restart().unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

/// Defines, for a scenario `fn name(broker: Broker)`, a module `name` with two tests,
/// `name::on_rumqttd` and `name::on_mosquitto`, so a filter can pick a scenario, a broker, or both.
macro_rules! on_both_brokers {
    ($($scenario:ident),+ $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn on_rumqttd() {
                    super::$scenario($crate::support::Broker::Embedded);
                }

                #[test]
                fn on_mosquitto() {
                    super::$scenario($crate::support::Broker::Mosquitto);
                }
            }
        )+
    };
}
pub(crate) use on_both_brokers;

/// A Mosquitto broker on 127.0.0.1, with anonymous access, for checking the peers against a
/// second MQTT implementation. Its config and log live in a temporary directory; it is killed when
/// dropped (by its [`Proc`]).
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    /// Holds `mosquitto.conf` and `mosquitto.log` (kept with `KEEP_ROOMS`).
    pub dir: tempfile::TempDir,
}

/// Where Mosquitto is installed on Debian and Ubuntu (`apt-get install mosquitto`).
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The peers' largest payload (`max_payload` in config/peer.toml, rumqttd's `max_payload_size`).
pub const PEER_MAX_PAYLOAD: usize = 64 * 1024;

impl Mosquitto {
    /// [`Mosquitto::start_on`] a free port.
    pub fn start() -> Result<Mosquitto, String> {
        Self::start_on(free_port())
    }

    /// Starts `mosquitto -c <conf>` listening on `port` and waits until it accepts connections.
    /// Fails (does not skip) if the binary is missing or it does not come up.
    pub fn start_on(port: u16) -> Result<Mosquitto, String> {
        Self::start_with(port, "")
    }

    /// Starts a Mosquitto on a free port bridged to the one on `other` for every topic, both
    /// ways: the two are one pub/sub domain, two nodes of a cluster as the peers see it.
    pub fn start_bridged_to(other: u16) -> Result<Mosquitto, String> {
        let bridge = format!(
            "connection hashvote-bridge\n\
             address 127.0.0.1:{other}\n\
             topic # both 1\n\
             cleansession true\n\
             restart_timeout 1\n\
             try_private true\n"
        );
        Self::start_with(free_port(), &bridge)
    }

    fn start_with(port: u16, extra: &str) -> Result<Mosquitto, String> {
        let dir = tempfile::Builder::new()
            .prefix("hashvote-mosquitto")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir()
            .map_err(|e| format!("temporary directory for mosquitto: {e}"))?;
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let text = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             # Retained messages and sessions in memory only, as rumqttd: a restart loses them.\n\
             persistence false\n\
             # Nagle off on the connections it accepts, as the embedded broker does (see README).\n\
             set_tcp_nodelay true\n\
             # Run as root (as in CI containers): mosquitto would otherwise switch to the `mosquitto`\n\
             # user, which cannot write the log into our private directory. Ignored unless root.\n\
             user root\n\
             log_dest file {log}\n\
             # The peers' limits, as the embedded broker's config/broker.toml sets them: payloads up to\n\
             # 64 KiB, and a packet the peers would refuse (their client takes max_payload + 1 KiB,\n\
             # and drops the connection on anything larger) disconnects its publisher instead of\n\
             # reaching every subscriber.\n\
             message_size_limit {PEER_MAX_PAYLOAD}\n\
             max_packet_size {packet}\n\
             # Mosquitto's defaults (20 in flight, 1000 queued per client) drop most of a burst; the\n\
             # flood tests send 50k messages a second. rumqttd's window is 100.\n\
             max_inflight_messages 100\n\
             max_queued_messages 20000\n\
             {extra}",
            log = log.display(),
            packet = PEER_MAX_PAYLOAD + 1024,
        );
        std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let proc = Self::spawn(port, dir.path())?;
        Ok(Mosquitto { port, proc, dir })
    }

    /// Starts Mosquitto again with the same configuration, on the same port (the old process must
    /// have exited).
    pub fn restart(&mut self) -> Result<(), String> {
        self.proc = Self::spawn(self.port, self.dir.path())?;
        Ok(())
    }

    fn spawn(port: u16, dir: &Path) -> Result<Proc, String> {
        let bin = match std::env::var("MOSQUITTO") {
            Ok(bin) if Path::new(&bin).is_file() => PathBuf::from(bin),
            Ok(bin) => return Err(format!("MOSQUITTO={bin}: no such file")),
            Err(_) => ensure_installed(MOSQUITTO, "mosquitto")
                .map_err(|e| format!("these tests run the room on Mosquitto too: {e}"))?,
        };
        let (conf, log, stderr) = (dir.join("mosquitto.conf"), dir.join("mosquitto.log"), dir.join("mosquitto.stderr"));
        // Its stderr (a warning about running as root, or why it cannot start) goes to a file.
        let err_file = std::fs::File::create(&stderr).map_err(|e| format!("creating {}: {e}", stderr.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut proc = Proc { child, name: format!("mosquitto:{port}") };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_open(port) {
            if let Ok(Some(status)) = proc.child.try_wait() {
                let said = [&stderr, &log].map(|f| std::fs::read_to_string(f).unwrap_or_default()).concat();
                return Err(format!("mosquitto exited ({status}) before listening on {port}:\n{said}"));
            }
            if Instant::now() > deadline {
                return Err(format!("mosquitto did not listen on {port} within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proc)
    }
}

/// The controller a peer believes in for its latest term, from its events.
pub fn controller_in(records: &[Record]) -> Option<(Term, PeerId)> {
    records.iter().rev().find_map(|r| match r.event {
        Event::ControllerElected { term, controller, .. } => Some((term, controller)),
        _ => None,
    })
}

/// Waits until the peers `peers()` all believe in one controller of a term of at least
/// `min_term` (each one's belief from `controller_of`); returns that term and controller.
pub fn wait_agreement(
    timeout: Duration,
    min_term: Term,
    peers: impl Fn() -> Vec<usize>,
    controller_of: impl Fn(usize) -> Option<(Term, PeerId)>,
) -> (Term, PeerId) {
    let mut found = None;
    wait_until(timeout, &format!("agreement on a controller of term >= {min_term}"), || {
        let seen: Vec<_> = peers().into_iter().map(&controller_of).collect();
        found = match seen.first() {
            Some(&Some((t, l))) if t >= min_term && seen.iter().all(|s| *s == Some((t, l))) => Some((t, l)),
            _ => None,
        };
        found.is_some()
    });
    found.expect("agreed")
}

/// True if something accepts connections on the port.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(200)).is_ok()
}

/// Starts a peer writing its events to `events` and its log next to it (`.log`).
pub fn start_peer(port: u16, events: &Path, extra: &[&str]) -> Proc {
    let log = std::fs::File::create(events.with_extension("log")).expect("create peer log");
    let child = launcher()
        .args(["peer", "--host", "127.0.0.1", "--port", &port.to_string(), "--events"])
        .arg(events)
        .args(["--log", "info"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn peer");
    Proc { child, name: format!("peer:{}", events.display()) }
}

/// Reads every record of a JSON-lines events file (a partial last line is skipped).
pub fn read_events(path: &Path) -> Vec<Record> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Reads several events files, or one merged file.
pub fn read_all(paths: &[PathBuf]) -> Vec<Record> {
    paths.iter().flat_map(|p| read_events(p)).collect()
}

/// Each peer's records, by client id.
pub fn by_peer(records: &[Record]) -> BTreeMap<PeerId, Vec<Record>> {
    let mut map: BTreeMap<PeerId, Vec<Record>> = BTreeMap::new();
    for r in records {
        map.entry(r.peer).or_default().push(r.clone());
    }
    map
}

/// A block as the events describe it (defined with the invariants, in the launcher library).
pub use launcher::invariants::SeenBlock;

/// Each peer's chain as its events tell it (truncations applied); panics if a peer appended a
/// block that does not extend its chain or lacks its work.
pub fn chains(records: &[Record]) -> BTreeMap<PeerId, Vec<SeenBlock>> {
    launcher::invariants::chains(records).unwrap_or_else(|v| panic!("invariant violated: {v}"))
}

/// The invariants every run must keep (`launcher::invariants::check`: one controller per term,
/// every chain a prefix of one chain whose blocks link and verify, transaction ids consecutive);
/// panics with the violation. Returns the longest chain.
pub fn assert_invariants(records: &[Record]) -> Vec<SeenBlock> {
    match launcher::invariants::check(records) {
        Ok(summary) => summary.chain,
        Err(v) => panic!("invariant violated: {v}"),
    }
}

/// The pids the peers reported in their `started` events.
pub fn pids(records: &[Record]) -> Vec<u32> {
    records
        .iter()
        .filter_map(|r| match r.event {
            Event::Started { pid, .. } => Some(pid),
            _ => None,
        })
        .collect()
}

/// True if a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
