//! The whole lab through the launcher: ten peers, one election, three blocks, no survivors; and a
//! room of the launcher's peers on an outside broker.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use peer::events::Event;

use crate::support::*;

#[test]
fn launcher_runs_ten_peers_that_agree_on_a_controller_and_three_blocks_then_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let port = free_port();
    let child = launcher()
        .args(["--peers", "10", "--rounds", "3", "--difficulty", "12", "--threads", "1", "--target-block-ms", "0"])
        .args(["--port", &port.to_string(), "--events"])
        .arg(&events)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn launcher");
    let mut launcher = Proc { child, name: "launcher".into() };
    let status = launcher.wait_exit(Duration::from_secs(180));
    let mut stdout = String::new();
    use std::io::Read;
    launcher.child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "launcher failed: {status}\n{stdout}");
    assert!(stdout.contains("summary"), "{stdout}");

    let records = read_events(&events);
    let per_peer = by_peer(&records);
    assert_eq!(per_peer.len(), 10, "ten peers wrote events");

    // One controller, the same for all, in term 1.
    let mut controllers = BTreeSet::new();
    for (peer, recs) in &per_peer {
        let elected: Vec<_> = recs
            .iter()
            .filter_map(|r| match r.event {
                Event::ControllerElected { term, controller, .. } => Some((term, controller)),
                _ => None,
            })
            .collect();
        assert_eq!(elected.len(), 1, "peer {peer} elected once: {elected:?}");
        controllers.insert(elected[0]);
    }
    assert_eq!(controllers.len(), 1, "{controllers:?}");
    let (term, controller) = controllers.into_iter().next().unwrap();
    assert_eq!(term, 1);

    // The same three verified blocks everywhere; the controller won none.
    let chain = assert_invariants(&records);
    for (peer, c) in chains(&records) {
        assert!(c.len() >= 3, "peer {peer} has {} blocks", c.len());
    }
    assert!(chain.iter().all(|b| b.winner != controller));

    // Nothing survives: no peer, no broker.
    let pids = pids(&records);
    assert_eq!(pids.len(), 10);
    for pid in pids {
        assert!(!alive(pid), "peer pid {pid} is still running");
    }
    assert!(!port_open(port), "the broker still listens on {port}");
}

#[test]
fn launcher_refuses_a_busy_port_with_one_line() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = launcher().args(["--port", &port.to_string()]).output().expect("run launcher");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
}

/// A typo in a flag the peers would refuse is the launcher's own error, before any broker or peer
/// starts: clap parses `--hash` and `--difficulty-range` into the peer's own types.
#[test]
fn launcher_refuses_a_bad_hash_or_difficulty_range_before_starting_anything() {
    for (flag, value, said) in [("--hash", "sha3", "sha3"), ("--difficulty-range", "20", "LO-HI")] {
        let out = launcher().args([flag, value, "--plain"]).output().expect("run launcher");
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains(said), "{flag} {value}: {err}");
        assert!(!err.contains("peer #") && !err.contains("broker"), "a room started: {err}");
    }
}

/// `launcher --broker`: a room of local peers on a broker the launcher did not start (Mosquitto
/// here) completes its rounds, keeps the invariants, stops its peers, and leaves the broker alone.
#[test]
fn launcher_runs_a_room_on_an_outside_mosquitto_and_leaves_it_running() {
    let mut mosquitto = Broker::Mosquitto.start(free_port());
    let port = match &mosquitto {
        RunningBroker::Mosquitto(m) => m.port,
        RunningBroker::Embedded(_) => unreachable!(),
    };
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let prefix = format!("hv{}launcher", std::process::id());
    let child = launcher()
        .args(["--broker", &format!("127.0.0.1:{port}"), "--peers", "4", "--rounds", "3", "--plain"])
        .args(["--prefix", &prefix, "--difficulty", "12", "--target-block-ms", "0", "--events"])
        .arg(&events)
        // Mosquitto here admits anyone: no login, whatever the caller's environment says.
        .env_remove("HASHVOTE_USERNAME")
        .env_remove("HASHVOTE_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn launcher");
    let mut launcher = Proc { child, name: "launcher --broker".into() };
    let status = launcher.wait_exit(Duration::from_secs(120));
    let (mut stdout, mut stderr) = (String::new(), String::new());
    use std::io::Read;
    launcher.child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    launcher.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "launcher failed: {status}\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("127.0.0.1:{port}")), "it says which broker it uses:\n{stdout}");

    let records = read_events(&events);
    assert_eq!(by_peer(&records).len(), 4, "four peers wrote events");
    let chain = assert_invariants(&records);
    assert!(chain.len() >= 3, "{} blocks", chain.len());

    // Its peers are gone; the broker it did not start is not.
    let pids = pids(&records);
    assert_eq!(pids.len(), 4);
    for pid in pids {
        assert!(!alive(pid), "peer pid {pid} is still running");
    }
    assert!(mosquitto.running(), "the launcher left the outside broker running");
    assert!(port_open(port), "mosquitto still listens on {port}");
}
