//! A user's mistakes, through the real binaries: a missing file, a bad value and a busy port each
//! get one clear line on stderr and a non-zero exit from the launcher, the broker and the peer
//! (`launcher broker` and `launcher peer` run exactly the `broker` and `peer` binaries' code);
//! and a peer that dies in a room the launcher runs is reported with the error it printed.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use crate::support::*;

/// Runs the launcher with `args` and checks the one line it must print: `{who}: error: ...`
/// holding each of `said`, and no cause said twice.
fn one_line_error(args: &[&str], who: &str, said: &[&str]) {
    let out =
        launcher().args(args).env_remove("HASHVOTE_PASSWORD").stdin(Stdio::null()).output().expect("run the launcher");
    let what = args.join(" ");
    assert!(!out.status.success(), "`{what}` succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "`{what}` printed more than one line:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with(&format!("{who}: error: ")), "`{what}`: {line}");
    for s in said {
        assert!(line.contains(s), "`{what}` does not say {s:?}: {line}");
    }
    // The error chain names each cause once (a cause both formatted and chained reads twice).
    if let Some(os) = line.find("(os error") {
        assert_eq!(line.matches(&line[os..]).count(), 1, "`{what}` repeats its cause: {line}");
        let reason_start = line[..os].rfind(": ").map_or(0, |i| i + 2);
        let reason = &line[reason_start..os];
        assert_eq!(line.matches(reason).count(), 1, "`{what}` repeats its cause: {line}");
    }
}

#[test]
fn the_broker_explains_a_missing_file_a_bad_value_and_a_busy_port_in_one_line() {
    one_line_error(
        &["broker", "--config", "/nonexistent/broker.toml"],
        "broker",
        &["/nonexistent/broker.toml", "No such file"],
    );
    one_line_error(&["broker", "--max-payload", "0"], "broker", &["max payload 0"]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().unwrap().port().to_string();
    one_line_error(&["broker", "--port", &port], "broker", &[&port, "in use"]);
}

#[test]
fn the_peer_explains_a_missing_file_a_bad_value_and_an_unreachable_broker_in_one_line() {
    one_line_error(
        &["peer", "--config", "/nonexistent/peer.toml"],
        "peer",
        &["/nonexistent/peer.toml", "No such file"],
    );
    one_line_error(&["peer", "--difficulty", "200"], "peer", &["difficulty", "160"]);
    // A peer binds no port: its mistake of that kind is a broker port nobody listens on.
    let port = free_port().to_string();
    one_line_error(
        &["peer", "--port", &port, "--connect-timeout", "1", "--log", "error"],
        "peer",
        &[&port, "cannot connect"],
    );
}

#[test]
fn the_launcher_explains_a_missing_directory_a_bad_value_and_a_busy_port_in_one_line_before_starting_anything() {
    one_line_error(
        &["--plain", "--events", "/nonexistent/events.jsonl"],
        "launcher",
        &["/nonexistent/events.jsonl", "No such file"],
    );
    // A value only the peers check: refused by the peers' own code before any broker starts.
    one_line_error(&["--plain", "--difficulty", "200"], "launcher", &["difficulty", "160"]);
    one_line_error(&["--plain", "--target-block-ms", "10", "--difficulty-range", "30-20"], "launcher", &["30"]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().unwrap().port().to_string();
    one_line_error(&["--plain", "--port", &port], "launcher", &[&port]);
}

/// A bad `--broker` list (of the launcher, or of `watch`): one line naming the entry and exit 1, before
/// any peer starts or any connection is tried (a watcher would otherwise wait for ever).
#[test]
fn a_bad_broker_list_is_one_line_and_exit_1_before_anything_starts() {
    for (args, who, said) in [
        (&["--plain", "--broker", "127.0.0.1:x"][..], "launcher", &["--broker", "'x' is not in 1..=65535"][..]),
        (&["--plain", "--broker", "127.0.0.1:1883,:1884"], "launcher", &["--broker", "':1884' has no host"]),
        (&["--plain", "--broker", "127.0.0.1:1883,,b"], "launcher", &["--broker", "empty broker address"]),
        (&["watch", "--plain", "--broker", "127.0.0.1:1883,h:0"], "launcher watch", &["--broker", "h:0"]),
        (&["watch", "--plain", "--host", "127.0.0.1:x"], "launcher watch", &["--host", "'x'"]),
    ] {
        one_line_error(args, who, said);
        let out = launcher().args(args).env_remove("HASHVOTE_HOST").stdin(Stdio::null()).output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("started") && !stdout.contains("watching"), "{args:?} started: {stdout}");
    }
}

/// A peer whose data directory is damaged exits at once; the launcher says which peer and why,
/// with the peer's own last error line, and keeps the rest of the room running.
#[test]
fn a_peer_that_dies_in_the_launchers_room_is_reported_with_its_last_error_line() {
    let run = tempfile::tempdir().unwrap();
    let damaged = run.path().join("peer-1");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(damaged.join("peer.redb"), b"not a database").unwrap();
    let child = launcher()
        .args(["--plain", "--peers", "3", "--difficulty", "8", "--threads", "1", "--port", &free_port().to_string()])
        .arg("--run-dir")
        .arg(run.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn launcher");
    let mut launcher = Proc { child, name: "launcher".into() };
    let (tx, rx) = mpsc::channel();
    let stdout = launcher.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let reported = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("peer #1 exited") => break line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no exit of peer #1 reported within 30 s; the launcher said:\n{}", seen.join("\n")),
        }
    };
    assert!(reported.contains("exit status: 1"), "{reported}");
    assert!(reported.contains("peer-1") && reported.contains("damaged or unreadable"), "no reason given: {reported}");
    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(30));
    assert!(status.code().is_some(), "the launcher stopped cleanly on SIGTERM: {status}");
}
