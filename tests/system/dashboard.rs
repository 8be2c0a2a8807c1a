//! The dashboard for real: the launcher under a pseudo-terminal, read back through a terminal
//! emulator (vt100), driven with its keys: `p` pauses a peer, `k` kills the controller, `q`
//! stops everything.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peer::events::Event;
use portable_pty::{CommandBuilder, PtySize, native_pty_system};

use crate::support::*;

const ROWS: u16 = 40;
const COLS: u16 = 140;

/// What the pseudo-terminal shows, kept up to date by a reader thread.
struct Terminal {
    screen: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
}

impl Terminal {
    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    fn wait_for(&self, timeout: Duration, what: &str, cond: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let last = self.contents();
            if cond(&last) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}; the screen:\n{last}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn press(&mut self, key: &str) {
        self.writer.write_all(key.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }
}

/// The state letter of a process (R, S, T for stopped, ...), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

#[test]
fn the_dashboard_runs_under_a_terminal_and_its_keys_pause_kill_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let port = free_port();
    let pty = native_pty_system().openpty(PtySize { rows: ROWS, cols: COLS, pixel_width: 0, pixel_height: 0 }).unwrap();
    let mut cmd = CommandBuilder::new(exe());
    cmd.env("TMPDIR", scratch());
    cmd.args(["--peers", "4", "--difficulty", "16", "--target-block-ms", "0", "--keepalive", "1"]);
    cmd.args(["--port", &port.to_string(), "--events"]);
    cmd.arg(&events);
    cmd.env("TERM", "xterm-256color");
    let mut child = pty.slave.spawn_command(cmd).unwrap();
    drop(pty.slave);
    let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
    let mut reader = pty.master.try_clone_reader().unwrap();
    let feed = Arc::clone(&screen);
    let reader_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            feed.lock().unwrap().process(&buf[..n]);
        }
    });
    let mut term = Terminal { screen, writer: pty.master.take_writer().unwrap() };

    // The room shows up: a controller is elected and blocks are won, all on the dashboard.
    // Every peer on the dashboard first: `p` acts on the first row, which a peer the dashboard
    // has not heard of yet (a lower id) would take over.
    term.wait_for(Duration::from_secs(120), "all four peers and a controller on the dashboard", |s| {
        s.contains("controller") && s.contains("q quit") && s.contains("peers 4/4 online")
    });
    let records = || read_events(&events);
    wait_until(Duration::from_secs(60), "a block", || {
        records().iter().any(|r| matches!(r.event, Event::BlockAccepted { .. }))
    });
    let pids: Vec<u32> = pids(&records());
    assert_eq!(pids.len(), 4);

    // `p` stops the selected peer's process; `p` again resumes it.
    term.press("p");
    wait_until(Duration::from_secs(10), "one peer stopped", || {
        pids.iter().filter(|&&p| proc_state(p) == Some('T')).count() == 1
    });
    term.press("p");
    wait_until(Duration::from_secs(10), "the peer resumed", || pids.iter().all(|&p| proc_state(p) != Some('T')));

    // `k` kills the controller; the room elects another, which the dashboard shows.
    let first_term = |recs: &[peer::events::Record]| {
        recs.iter()
            .filter_map(|r| match r.event {
                Event::ControllerElected { term, controller, .. } => Some((term, controller)),
                _ => None,
            })
            .max()
    };
    wait_until(Duration::from_secs(30), "an elected controller", || first_term(&records()).is_some());
    let (term1, controller1) = first_term(&records()).unwrap();
    term.press("k");
    wait_until(Duration::from_secs(30), "a new controller", || {
        first_term(&records()).is_some_and(|(t, l)| t > term1 && l != controller1)
    });
    term.wait_for(Duration::from_secs(10), "the killed controller shown offline", |s| {
        s.lines().any(|l| l.contains(&controller1.to_string()) && l.contains("offline"))
    });

    // `q` stops everything and gives the terminal back.
    term.press("q");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the launcher did not quit on q:\n{}", term.contents());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "launcher exit: {status:?}\n{}", term.contents());
    drop(term);
    drop(pty.master);
    let _ = reader_thread.join();
    for pid in pids {
        assert!(!alive(pid), "peer pid {pid} is still running");
    }
    assert!(!port_open(port), "the broker still listens on {port}");
}
