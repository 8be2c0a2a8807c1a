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

/// Starts `launcher peer` with `args`, writing its events to `events` and its log next to it
/// (`.log`); named `name` in failures.
pub fn spawn_peer<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>, events: &Path, name: String) -> Proc {
    let log = std::fs::File::create(events.with_extension("log")).expect("create peer log");
    let child = launcher()
        .arg("peer")
        .args(args)
        .arg("--events")
        .arg(events)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn peer");
    Proc { child, name }
}

/// Starts a peer writing its events to `events` and its log next to it (`.log`).
pub fn start_peer(port: u16, events: &Path, extra: &[&str]) -> Proc {
    let args = ["--host", "127.0.0.1", "--port", &port.to_string(), "--log", "info"];
    spawn_peer(args.iter().chain(extra), events, format!("peer:{}", events.display()))
}

/// Starts peer `id` (1-based) of a room of `room` peers on the broker nodes `hosts` (a
/// comma-separated list), at difficulty 10 with one mining thread and a 2 s keepalive; its data in
/// `dir`/data-<id - 1>, its events in `events` and its log beside them (`.log`).
pub fn start_cluster_peer(hosts: &str, id: usize, room: usize, dir: &Path, events: &Path) -> Proc {
    let data = dir.join(format!("data-{}", id - 1)).display().to_string();
    let args = ["--host", hosts, "--id", &id.to_string(), "--room-size", &room.to_string()];
    let tuning = ["--difficulty", "10", "--threads", "1", "--keepalive", "2", "--log", "info", "--data-dir", &data];
    spawn_peer(args.iter().chain(&tuning), events, format!("peer {id}"))
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

/// Where Debian's rabbitmq-server package keeps its scripts. Not `/usr/sbin/rabbitmq-server`: that
/// wrapper runs the node as the `rabbitmq` user (who cannot write into our private directory) from
/// `/var/lib/rabbitmq`, with that user's Erlang cookie.
pub const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// The environment variable that marks every process of a [`RabbitCluster`] (its nodes' Erlang
/// VMs and their port programs, rabbitmqctl, the private epmd); its value is the cluster's
/// directory. The cluster kills what carries it when dropped, and `.ci/run` fails if any such
/// process outlives the tests.
pub const RABBIT_MARK: &str = "HASHVOTE_RABBIT";

/// One node of a [`RabbitCluster`].
#[derive(Debug)]
pub struct RabbitNode {
    /// Its Erlang node name, `hvN-<random>@localhost`.
    pub name: String,
    /// Its MQTT listener, on 127.0.0.1.
    pub mqtt_port: u16,
    /// Its config, enabled plugins, database, logs and pid file.
    pub dir: PathBuf,
    /// The rabbitmq-server script: a shell waiting for the Erlang VM it started (`None` once
    /// the node is killed).
    proc: Option<Proc>,
}

impl RabbitNode {
    /// Its MQTT address, as a peer's `--host` list names it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.mqtt_port)
    }

    /// True until [`RabbitCluster::kill`] kills it.
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// The `KEY=value` its processes carry in their environment (and no other node's do).
    fn mark(&self) -> String {
        format!("{RABBIT_MARK}_NODE={}", self.name)
    }

    /// The last lines of its log and of the script's output, for an error message.
    fn log_tail(&self) -> String {
        let files = [self.dir.join("log").join(format!("{}.log", self.name)), self.dir.join("stdout.log")];
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                format!("--- {} (last lines):\n{tail}", f.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The pid of its Erlang VM (beam.smp), from the pid file the node writes as it boots, if
    /// that process still runs and is this node's.
    fn vm_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("pid")).ok()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp" && marked(pid, &self.mark())).then_some(pid)
    }
}

/// True if process `pid` carries `mark` (`KEY=value`) in its environment.
fn marked(pid: u32, mark: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == mark.as_bytes()))
}

/// SIGKILLs `first` (a process checked to carry `mark`), then every live process that carries
/// `mark` in its environment but `spare`, until none is left (10 s at most), and waits until they
/// are reaped; the error lists the survivors.
fn kill_marked(mark: &str, first: Option<u32>, spare: &[u32]) -> Result<(), String> {
    let find = || -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| !spare.contains(&pid) && marked(pid, mark) && alive(pid))
            .collect()
    };
    let mut ours: std::collections::BTreeSet<u32> = find().into_iter().chain(first).collect();
    if let Some(pid) = first {
        // SAFETY: kill(2) has no memory-safety preconditions; the caller checked the pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = find();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("processes marked {mark} survive SIGKILL: {left:?}"));
        }
        for pid in left {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid was just seen carrying
            // our mark, so it is one of the processes this cluster started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            ours.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Their parents may be dead too (the VM's port programs outlive it by a moment): init reaps
    // them, in its own time (some container inits poll every few seconds). Wait for it, so that
    // no zombie of ours is listed after the test; a zombie runs nothing, so one left is no error.
    let reaped = Instant::now() + Duration::from_secs(10);
    while ours.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) && Instant::now() < reaped {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A private RabbitMQ cluster of three nodes with the MQTT plugin, on 127.0.0.1 and free ports,
/// in a temporary directory: its own epmd (port mapper), Erlang cookie and `HOME`, so it shares
/// nothing with a RabbitMQ the machine may run. Dropping it kills every process it started.
#[derive(Debug)]
pub struct RabbitCluster {
    /// The nodes; the 2nd and 3rd joined the 1st.
    pub nodes: Vec<RabbitNode>,
    /// How long [`RabbitCluster::start`] took, installation included.
    pub started_in: Duration,
    epmd_port: u16,
    epmd: Proc,
    home: PathBuf,
    /// Everything of the cluster (kept with `KEEP_ROOMS`).
    dir: tempfile::TempDir,
}

impl RabbitCluster {
    /// Starts three nodes (installing Debian's rabbitmq-server when it is missing), joins the 2nd
    /// and 3rd to the 1st, and waits until every node's MQTT listener accepts connections and the
    /// plugin's client-id tracker (a Raft cluster) has all three as members. The error names the
    /// node and shows the end of its log.
    pub fn start() -> Result<RabbitCluster, String> {
        let t0 = Instant::now();
        let server = ensure_installed(&format!("{RABBITMQ_BIN}/rabbitmq-server"), "rabbitmq-server")
            .map_err(|e| format!("the RabbitMQ cluster test needs RabbitMQ: {e}"))?;
        let epmd_bin = ensure_installed("epmd", "erlang-base")?;
        let dir = tempfile::Builder::new()
            .prefix("hashvote-rabbit")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir_in(scratch())
            .map_err(|e| format!("temporary directory for RabbitMQ: {e}"))?;
        let home = dir.path().join("home");
        std::fs::create_dir(&home).map_err(|e| format!("creating {}: {e}", home.display()))?;
        // Erlang refuses a cookie file that others can read.
        let cookie = home.join(".erlang.cookie");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&cookie)
                .map_err(|e| format!("creating {}: {e}", cookie.display()))?;
            write!(f, "HASHVOTE{:016X}", rand::random::<u64>()).map_err(|e| format!("writing the cookie: {e}"))?;
        }
        // rabbitmq-env sources this file (the package's is /etc/rabbitmq/rabbitmq-env.conf).
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").map_err(|e| format!("rabbitmq-env.conf: {e}"))?;

        // A private epmd in the foreground, ours to kill: a node started without one would start a
        // daemon that outlives it.
        let epmd_port = free_port();
        let epmd_log = std::fs::File::create(dir.path().join("epmd.log")).map_err(|e| format!("epmd.log: {e}"))?;
        let child = Command::new(&epmd_bin)
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .env(RABBIT_MARK, dir.path())
            .stdin(Stdio::null())
            .stdout(epmd_log.try_clone().map_err(|e| format!("epmd.log: {e}"))?)
            .stderr(epmd_log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", epmd_bin.display()))?;
        let epmd = Proc { child, name: format!("epmd:{epmd_port}") };
        let mut cluster = RabbitCluster { nodes: Vec::new(), started_in: Duration::ZERO, epmd_port, epmd, home, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !port_open(epmd_port) {
            if Instant::now() > deadline {
                return Err(format!("epmd did not listen on {epmd_port} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        for i in 1..=3 {
            let node = cluster.spawn_node(&server, i)?;
            cluster.nodes.push(node);
        }
        // The three boot in parallel (each takes several seconds).
        for i in 0..3 {
            cluster.await_mqtt(i, Duration::from_secs(120))?;
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..3 {
            for args in [&["stop_app"][..], &["join_cluster", &first], &["start_app"]] {
                cluster.ctl(i, args, Duration::from_secs(120))?;
            }
            cluster.await_mqtt(i, Duration::from_secs(120))?;
        }
        // Every node running, and the MQTT client-id tracker's Raft cluster with all three as
        // members: losing one node then leaves it a majority.
        let everyone = Instant::now() + Duration::from_secs(60);
        let ra_members = "{ok, Members, _} = ra:members({mqtt_node, node()}), length(Members).";
        loop {
            let running = cluster.ctl(0, &["eval", "length(rabbit_nodes:all_running())."], Duration::from_secs(30))?;
            let members = cluster.ctl(0, &["eval", ra_members], Duration::from_secs(30)).unwrap_or_default();
            if running.trim() == "3" && members.trim() == "3" {
                break;
            }
            if Instant::now() > everyone {
                return Err(format!(
                    "the cluster did not form within 60 s: {} nodes running, {} in the MQTT tracker\n{}",
                    running.trim(),
                    members.trim(),
                    cluster.nodes[0].log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster.started_in = t0.elapsed();
        Ok(cluster)
    }

    /// The nodes' MQTT addresses, comma-separated (a peer's `--host`).
    pub fn addrs(&self) -> String {
        self.nodes.iter().map(RabbitNode::addr).collect::<Vec<_>>().join(",")
    }

    /// Which node listens at `addr` (`127.0.0.1:PORT`).
    pub fn node_at(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr() == addr)
    }

    /// Kills node `i` as a crash would: SIGKILL to its Erlang VM (beam.smp), then to whatever of
    /// that node still runs (its port programs: erl_child_setup, inet_gethost). Its clients'
    /// connections die with it.
    pub fn kill(&mut self, i: usize) {
        self.stop_node(i).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `rabbitmqctl -n <node i> args...` against this cluster (its epmd, its cookie) for at
    /// most `timeout`; returns its standard output, or an error naming the node with the
    /// command's output and the end of the node's log.
    pub fn ctl(&self, i: usize, args: &[&str], timeout: Duration) -> Result<String, String> {
        let node = &self.nodes[i];
        let bin = format!("{RABBITMQ_BIN}/rabbitmqctl");
        let dist = free_port().to_string();
        let child = Command::new(&bin)
            .args(["-n", &node.name])
            .args(args)
            .envs(self.env())
            // The command line's own Erlang node needs a distribution port too (35672 by default,
            // which a RabbitMQ of the machine's may hold).
            .env("RABBITMQ_CTL_DIST_PORT_MIN", &dist)
            .env("RABBITMQ_CTL_DIST_PORT_MAX", &dist)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let what = format!("rabbitmqctl -n {} {}", node.name, args.join(" "));
        let out = match rx.recv_timeout(timeout) {
            Ok(out) => out.map_err(|e| format!("{what}: {e}"))?,
            Err(_) => {
                // SAFETY: kill(2) on our own child, not yet reaped (its waiter still waits).
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                return Err(format!("{what}: no answer within {timeout:?}\n{}", node.log_tail()));
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(format!("{what} failed ({}):\n{stdout}{stderr}\n{}", out.status, node.log_tail()))
        }
    }

    /// The environment every process of the cluster gets: the private `HOME` (its Erlang cookie),
    /// epmd port and rabbitmq-env file, and the mark.
    fn env(&self) -> Vec<(String, String)> {
        let dir = self.dir.path();
        [
            ("HOME", self.home.display().to_string()),
            ("ERL_EPMD_PORT", self.epmd_port.to_string()),
            ("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf").display().to_string()),
            (RABBIT_MARK, dir.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Writes node `i`'s files and starts it (it boots alone; [`RabbitCluster::start`] joins it).
    fn spawn_node(&self, server: &Path, i: usize) -> Result<RabbitNode, String> {
        let name = format!("hv{i}-{:08x}@localhost", rand::random::<u32>());
        let dir = self.dir.path().join(format!("node{i}"));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let (amqp, dist, mqtt) = (free_port(), free_port(), free_port());
        let conf = dir.join("rabbitmq.conf");
        let text = format!(
            "# Node {name} of the hashvote system tests' private cluster.\n\
             mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
             mqtt.allow_anonymous = true\n\
             loopback_users = none\n\
             # The peers' payload limit, as Mosquitto's message_size_limit in these tests: a larger\n\
             # publish is refused (its channel closed) instead of reaching, and disconnecting, every peer.\n\
             max_message_size = {PEER_MAX_PAYLOAD}\n"
        );
        std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
        // The MQTT plugin alone: no management plugin, no web listener.
        let plugins = dir.join("enabled_plugins");
        std::fs::write(&plugins, "[rabbitmq_mqtt].\n").map_err(|e| format!("writing {}: {e}", plugins.display()))?;
        let out = std::fs::File::create(dir.join("stdout.log")).map_err(|e| format!("stdout.log: {e}"))?;
        let path = |p: PathBuf| p.display().to_string();
        let node = RabbitNode { name, mqtt_port: mqtt, dir: dir.clone(), proc: None };
        let child = Command::new(server)
            .envs(self.env())
            .env(format!("{RABBIT_MARK}_NODE"), &node.name)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            // Erlang distribution on the loopback interface only (it listens on all by default).
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .env("RABBITMQ_CONFIG_FILE", path(conf))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path(dir.join("advanced.config")))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path(plugins))
            .env("RABBITMQ_MNESIA_BASE", path(dir.join("mnesia")))
            .env("RABBITMQ_LOG_BASE", path(dir.join("log")))
            .env("RABBITMQ_PID_FILE", path(dir.join("pid")))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| format!("stdout.log: {e}"))?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", server.display()))?;
        Ok(RabbitNode { proc: Some(Proc { child, name: format!("rabbitmq {}", node.name) }), ..node })
    }

    /// Waits until node `i`'s MQTT listener accepts connections (it opens at the end of boot).
    fn await_mqtt(&mut self, i: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let node = &mut self.nodes[i];
        while !port_open(node.mqtt_port) {
            let proc = node.proc.as_mut().ok_or_else(|| format!("node {} was killed", node.name))?;
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!("node {} exited ({status}) while starting:\n{}", node.name, node.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {} did not listen for MQTT on {} within {timeout:?}:\n{}",
                    node.name,
                    node.mqtt_port,
                    node.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// [`RabbitCluster::kill`], with the error returned.
    fn stop_node(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let Some(mut script) = node.proc.take() else { return Ok(()) };
        // The VM first, as a crash; the script is spared: it reaps the VM and exits, and we reap it.
        let swept = kill_marked(&node.mark(), node.vm_pid(), &[script.pid()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while script.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(script); // SIGKILL and reap, if it has not exited
        swept.map_err(|e| format!("node {}: {e}", node.name))
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Err(e) = self.stop_node(i) {
                eprintln!("{e}");
            }
        }
        // Anything else of ours (a rabbitmqctl that timed out, a port program); epmd last, by
        // its Proc.
        let mark = format!("{RABBIT_MARK}={}", self.dir.path().display());
        if let Err(e) = kill_marked(&mark, None, &[self.epmd.pid()]) {
            eprintln!("{e}");
        }
    }
}
