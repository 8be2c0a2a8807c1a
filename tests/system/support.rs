//! Helpers for system tests: free ports, real processes that die with the test, event streams,
//! and the room invariants checked over them.

#![allow(dead_code)] // each test module uses its own part

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use peer::events::{Event, Record};
use peer::pow::{self, Digest};
use peer::protocol::{PeerId, Term};

/// The launcher binary, which is also the broker and the peer (`launcher broker|peer ...`).
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_launcher")
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
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

/// A block as the events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenBlock {
    pub tx: u64,
    pub term: Term,
    pub winner: PeerId,
    pub difficulty: u8,
    pub nonce: u64,
    pub hash: String,
    pub prev: String,
}

/// Each peer's chain as its events tell it (truncations applied).
pub fn chains(records: &[Record]) -> BTreeMap<PeerId, Vec<SeenBlock>> {
    let mut out: BTreeMap<PeerId, Vec<SeenBlock>> = BTreeMap::new();
    for r in records {
        let chain = out.entry(r.peer).or_default();
        match &r.event {
            Event::BlockAccepted { term, tx, winner, difficulty, nonce, hash, prev, .. } => {
                assert_eq!(*tx, chain.len() as u64, "peer {} appended tx {tx} at height {}", r.peer, chain.len());
                chain.push(SeenBlock {
                    tx: *tx,
                    term: *term,
                    winner: *winner,
                    difficulty: *difficulty,
                    nonce: *nonce,
                    hash: hash.clone(),
                    prev: prev.clone(),
                });
            }
            Event::ChainTruncated { height } => chain.truncate(*height as usize),
            _ => {}
        }
    }
    out
}

fn digest(hex_str: &str) -> Digest {
    let bytes = hex::decode(hex_str).expect("hex digest");
    match bytes.len() {
        20 => Digest::Sha1(bytes.try_into().expect("20")),
        32 => Digest::Sha256(bytes.try_into().expect("32")),
        n => panic!("digest of {n} bytes"),
    }
}

/// The invariants every run must keep, checked over all events: at most one controller per
/// term (as decided by election), every chain a prefix of one chain whose blocks link and verify,
/// and transaction ids consecutive. Returns the longest chain.
pub fn assert_invariants(records: &[Record]) -> Vec<SeenBlock> {
    let mut leaders: BTreeMap<Term, BTreeSet<PeerId>> = BTreeMap::new();
    for r in records {
        if let Event::LeaderElected { term, leader, .. } = r.event {
            leaders.entry(term).or_default().insert(leader);
        }
    }
    for (term, set) in &leaders {
        assert_eq!(set.len(), 1, "term {term} had several controllers: {set:?}");
    }
    let chains = chains(records);
    let longest = chains.values().max_by_key(|c| c.len()).cloned().unwrap_or_default();
    for (peer, chain) in &chains {
        assert_eq!(chain[..], longest[..chain.len()], "peer {peer}'s chain is not a prefix of the room's");
    }
    let mut prev = None;
    for b in &longest {
        let p = digest(&b.prev);
        if let Some(expected) = &prev {
            assert_eq!(&b.prev, expected, "block {} does not link", b.tx);
        } else {
            assert!(p.as_bytes().iter().all(|&x| x == 0), "block 0 links to the zero hash");
        }
        let proof = pow::proof(&p, b.tx, b.winner, b.nonce);
        assert_eq!(proof.to_hex(), b.hash, "block {} hash is its proof of work", b.tx);
        assert!(proof.leading_zeros() >= u32::from(b.difficulty), "block {} has its work", b.tx);
        prev = Some(b.hash.clone());
    }
    longest
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
