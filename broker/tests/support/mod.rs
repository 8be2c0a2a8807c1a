//! Helpers for the broker's integration tests: free ports, the real binary as a child process
//! that is always killed, condition waits with deadlines, and MQTT clients.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet};

/// How long any single condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A port nobody listens on right now (see [`broker::port::pick`]).
pub fn free_port() -> u16 {
    broker::port::pick().expect("a free port on 127.0.0.1")
}

/// A path for a scratch file, unique to this test process and `name`.
pub fn scratch_file(name: &str, contents: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("broker-{}-{n}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("write scratch file");
    path
}

/// The `broker` binary running as a child. Dropping it kills and reaps the child, also when the
/// test panics.
pub struct BrokerProcess {
    child: Child,
    stdout: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl BrokerProcess {
    /// Starts `broker ARGS...` with stdout and stderr captured.
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the broker binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Self { child, stdout: lines_of(stdout), stderr: Some(stderr) }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the ready line and returns the address in it; panics with stderr if the broker
    /// exits first or the deadline passes.
    pub fn wait_ready(&mut self) -> SocketAddr {
        match self.stdout.recv_timeout(DEADLINE) {
            Ok(line) => {
                broker::parse_ready_line(&line).unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
            }
            Err(RecvTimeoutError::Timeout) => panic!("no ready line within {DEADLINE:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit();
                panic!("broker exited ({status}) before ready: {}", self.stderr());
            }
        }
    }

    /// Waits (bounded by [`DEADLINE`]) for the child to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "broker still running after {DEADLINE:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Kills the child (if still running) and returns everything it wrote to stderr.
    pub fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().map(|reader| reader.join().expect("stderr reader")).unwrap_or_default()
    }

    /// Kills the child (if still running) and returns the stdout lines not yet read.
    pub fn remaining_stdout(&mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdout.iter().collect()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs `future` on a fresh single-threaded runtime, failing the test after [`DEADLINE`].
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(async { tokio::time::timeout(DEADLINE, future).await.expect("MQTT step timed out") })
}

/// MQTT 3.1.1 options for a client of the broker at `addr`.
pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    options
}

/// Polls `eventloop` until the broker answers the CONNECT: `Ok` on CONNACK, else the error.
pub async fn connect(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
        }
    }
}

/// Polls until an incoming packet satisfies `wanted`; panics on a connection error.
pub async fn until<T>(eventloop: &mut EventLoop, mut wanted: impl FnMut(&Packet) -> Option<T>) -> T {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(packet)) => {
                if let Some(found) = wanted(&packet) {
                    return found;
                }
            }
            Ok(Event::Outgoing(_)) => {}
            Err(e) => panic!("connection error: {e}"),
        }
    }
}

/// A connected client, for tests that need one quickly.
pub async fn connected(addr: SocketAddr, id: &str) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options(addr, id), 100);
    connect(&mut eventloop).await.expect("connect");
    (client, eventloop)
}
