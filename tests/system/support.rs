//! Helpers for system tests: free ports, real processes that die with the test, event streams,
//! and the room invariants checked over them.

#![allow(dead_code)] // each test module uses its own part

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use peer::events::{Event, Record};
use peer::protocol::PeerId;

/// The launcher binary, which is also the broker and the peer (`launcher broker|peer ...`).
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_launcher")
}

/// A port nobody listens on right now.
///
/// Chosen below the kernel's ephemeral range (32768 and up here), so that no outgoing connection
/// and no other test's ephemeral bind can take it while a broker restarts on it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((seed.wrapping_add(n.wrapping_mul(7919))) % 12_000) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
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
    let mut child = Command::new(exe())
        .args(["broker", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if broker::server::parse_ready_line(&line).is_some() {
                let _ = tx.send(());
            }
        }
    });
    let proc = Proc { child, name: format!("broker:{port}") };
    rx.recv_timeout(Duration::from_secs(20)).expect("broker ready line");
    proc
}

/// A Mosquitto broker on a free port of 127.0.0.1, with anonymous access, for checking the peers
/// against a second MQTT implementation. Its config and log live in a temporary directory; it is
/// killed when dropped (by its [`Proc`]).
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    /// Holds `mosquitto.conf` and `mosquitto.log` (kept with `KEEP_ROOMS`).
    pub dir: tempfile::TempDir,
}

/// Where Mosquitto is installed on Debian and Ubuntu (`apt-get install mosquitto`).
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

impl Mosquitto {
    /// Starts `mosquitto -c <conf>` listening on a free port and waits until it accepts
    /// connections. Fails (does not skip) if the binary is missing or it does not come up.
    pub fn start() -> Result<Mosquitto, String> {
        let bin = std::env::var("MOSQUITTO").unwrap_or_else(|_| MOSQUITTO.to_string());
        if !Path::new(&bin).is_file() {
            return Err(format!(
                "mosquitto not found at {bin}: install it (apt-get install mosquitto) or set MOSQUITTO=/path/to/mosquitto"
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("hashvote-mosquitto")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir()
            .map_err(|e| format!("temporary directory for mosquitto: {e}"))?;
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let stderr = dir.path().join("mosquitto.stderr");
        let text = format!(
            // `user root`: run as root (as in CI containers), mosquitto would otherwise switch to the
            // `mosquitto` user, which cannot write the log into our private directory. Ignored
            // when not started as root.
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\nlog_dest file {}\n",
            log.display()
        );
        std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
        // Its stderr (a warning about running as root, or why it cannot start) goes to a file.
        let err_file = std::fs::File::create(&stderr).map_err(|e| format!("creating {}: {e}", stderr.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
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
        Ok(Mosquitto { port, proc, dir })
    }
}

/// True if something accepts connections on the port.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(200)).is_ok()
}

/// Starts a peer writing its events to `events` and its log next to it (`.log`).
pub fn start_peer(port: u16, events: &Path, extra: &[&str]) -> Proc {
    let log = std::fs::File::create(events.with_extension("log")).expect("create peer log");
    let child = Command::new(exe())
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
