//! A room over a cluster of brokers: every peer is given both nodes' addresses, connects to the
//! one its id picks, and moves to the other when its node dies. Two Mosquitto brokers bridged for
//! every topic stand in for a cluster of two nodes (what a peer sees of one: any node delivers
//! what any node was sent; a dead node's connections, and their wills, die with it). The
//! launcher (`--broker`) and `launcher watch` take the same list and ride out the same loss.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use peer::events::Event;

use crate::support::*;

const PEERS: usize = 4;

/// Blocks the launcher's room runs for; the first node dies once the watcher has seen [`KILL_AT`].
const ROUNDS: u64 = 24;
const KILL_AT: u64 = 3;

#[test]
fn peers_spread_over_two_nodes_move_to_the_survivor_and_the_room_goes_on() {
    let a = Mosquitto::start().unwrap_or_else(|e| panic!("{e}"));
    let b = Mosquitto::start_bridged_to(a.port).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let brokers = format!("127.0.0.1:{},127.0.0.1:{}", a.port, b.port);
    let events: Vec<_> = (0..PEERS).map(|i| dir.path().join(format!("peer-{i}.jsonl"))).collect();
    let _peers: Vec<Proc> =
        (0..PEERS).map(|i| start_cluster_peer(&brokers, i + 1, PEERS, dir.path(), &events[i])).collect();
    let brokers_of = |records: &[peer::events::Record]| -> BTreeSet<String> {
        records
            .iter()
            .filter_map(|r| match &r.event {
                Event::Connected { broker } => Some(broker.clone()),
                _ => None,
            })
            .collect()
    };
    let height = || read_all(&events).iter().filter(|r| matches!(r.event, Event::BlockAccepted { .. })).count();
    wait_until(Duration::from_secs(60), "blocks mined across both nodes", || height() >= 3 * PEERS);
    let records = read_all(&events);
    let used = brokers_of(&records);
    assert_eq!(used.len(), 2, "ids 1..=4 spread the peers over both nodes: {used:?}");

    // The controller's node dies: its peers' connections (and their wills) die with it.
    let last_broker = |records: &[peer::events::Record]| {
        records.iter().rev().find_map(|r| match &r.event {
            Event::Connected { broker } => Some(broker.clone()),
            _ => None,
        })
    };
    let controller = records
        .iter()
        .rev()
        .find_map(|r| match r.event {
            Event::ControllerElected { controller, .. } => Some(controller),
            _ => None,
        })
        .expect("a controller");
    let its_node = last_broker(&by_peer(&records)[&controller]).expect("the controller connected");
    let (mut dead, survivor) = if its_node.ends_with(&format!(":{}", a.port)) { (a, b) } else { (b, a) };
    let before = height();
    dead.proc.signal(libc::SIGKILL);
    let _ = dead.proc.wait_exit(Duration::from_secs(10));
    let survivor_addr = format!("127.0.0.1:{}", survivor.port);
    let moved = || events.iter().all(|e| last_broker(&read_events(e)).as_deref() == Some(survivor_addr.as_str()));
    wait_until(Duration::from_secs(60), "every peer on the surviving node", moved);
    wait_until(Duration::from_secs(60), "blocks after the loss of the controller's node", || {
        height() >= before + 3 * PEERS
    });
    let records = read_all(&events);
    let chain = assert_invariants(&records);
    assert!(chain.len() >= 6, "{} blocks", chain.len());
    let terms: BTreeSet<u64> = records
        .iter()
        .filter_map(|r| match r.event {
            Event::ControllerElected { term, .. } => Some(term),
            _ => None,
        })
        .collect();
    println!(
        "cluster of two nodes: {} blocks; {} before the controller's node died; then every peer on the other; terms {terms:?}",
        chain.len(),
        before / PEERS
    );
}

/// The heights of the blocks a watcher's plain output reports (`block 7 won by ...`).
fn blocks_said(text: &str) -> BTreeSet<u64> {
    text.lines().filter_map(|l| l.split_once("] block ")?.1.split_once(" won by ")?.0.parse().ok()).collect()
}

/// The heights of a report's chain table.
fn report_blocks(dir: &std::path::Path) -> BTreeSet<u64> {
    let html = std::fs::read_to_string(dir.join("index.html")).expect("the launcher's report");
    html.split("<tr class=\"block\"><td>").skip(1).filter_map(|row| row.split("</td>").next()?.parse().ok()).collect()
}

#[test]
fn the_launcher_and_a_watcher_given_both_nodes_ride_out_the_loss_of_the_first() {
    let mut a = Mosquitto::start().unwrap_or_else(|e| panic!("{e}"));
    let b = Mosquitto::start_bridged_to(a.port).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let (node_a, node_b) = (format!("127.0.0.1:{}", a.port), format!("127.0.0.1:{}", b.port));
    let nodes = format!("{node_a},{node_b}");
    let prefix = format!("hvc{}p{}", std::process::id(), a.port);
    let (events, room_report) = (dir.path().join("events.jsonl"), dir.path().join("room"));
    let (watch_out, room_out) = (dir.path().join("watch.out"), dir.path().join("room.out"));
    let rounds = ROUNDS.to_string();
    // Only these flags say where the room is and how to log in (anonymous Mosquitto).
    let env_free = |cmd: &mut std::process::Command| {
        for var in ["HASHVOTE_HOST", "HASHVOTE_PORT", "HASHVOTE_USERNAME", "HASHVOTE_PASSWORD"] {
            cmd.env_remove(var);
        }
    };

    let mut cmd = launcher();
    cmd.args(["watch", "--broker", &nodes, "--prefix", &prefix, "--plain", "--rounds", &rounds])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .stderr(Stdio::inherit());
    env_free(&mut cmd);
    let mut watch = Proc { child: cmd.spawn().expect("spawn watch"), name: "watch".into() };
    let said = || std::fs::read_to_string(&watch_out).unwrap_or_default();
    wait_until(Duration::from_secs(20), "the watcher on the first node", || {
        said().contains(&format!("connected to {node_a}"))
    });

    // The launcher's report makes it run its own observer, which starts on the first node too.
    let mut cmd = launcher();
    cmd.args(["--broker", &nodes, "--prefix", &prefix, "--peers", &PEERS.to_string(), "--rounds", &rounds])
        .args(["--plain", "--difficulty", "10", "--target-block-ms", "300", "--events"])
        .arg(&events)
        .arg("--report")
        .arg(&room_report)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&room_out).unwrap())
        .stderr(Stdio::inherit());
    env_free(&mut cmd);
    let mut room = Proc { child: cmd.spawn().expect("spawn launcher"), name: "launcher --broker A,B".into() };
    let room_said = || std::fs::read_to_string(&room_out).unwrap_or_default();

    wait_until(Duration::from_secs(60), "the watcher sees the first blocks", || {
        blocks_said(&said()).contains(&KILL_AT)
    });
    // What the watcher says from here on, its word on the loss among it.
    let at_kill = said().len();
    a.proc.signal(libc::SIGKILL);
    let _ = a.proc.wait_exit(Duration::from_secs(10));
    let after_kill = || said().get(at_kill..).unwrap_or_default().to_string();
    wait_until(Duration::from_secs(30), "the watcher on the second node", || {
        after_kill().contains(&format!("connected to {node_b}"))
    });

    let status = room.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "launcher: {status}\n{}", room_said());
    let status = watch.wait_exit(Duration::from_secs(60));
    let watch_said = said();
    assert!(status.success(), "watch: {status}\n{watch_said}");

    // The launcher named both nodes, and its peers finished the rounds on the survivor.
    let room_said = room_said();
    assert!(room_said.contains(&format!("using the broker at {node_a}, {node_b} (no login)")), "{room_said}");
    assert!(room_said.contains("summary"), "{room_said}");
    let records = read_events(&events);
    let chain = assert_invariants(&records);
    assert!(chain.len() as u64 >= ROUNDS, "{} blocks", chain.len());

    // The watcher said it lost the first node and moved on, and reported blocks mined after that
    // (the last of the rounds among them: it stopped on its own at that height).
    let moved = after_kill();
    assert!(moved.contains(&format!("connection lost ({node_a}: ")), "{watch_said}");
    let reconnected = moved.find(&format!("connected to {node_b}")).expect("said above");
    let later = blocks_said(&moved[reconnected..]);
    assert!(later.contains(&(ROUNDS - 1)) && later.iter().all(|&h| h > KILL_AT), "{watch_said}");
    for h in &later {
        let block = chain.iter().find(|b| b.tx == *h).unwrap_or_else(|| panic!("block {h} not in the chain"));
        assert!(moved.contains(&format!("block {h} won by {} in ", block.winner)), "{watch_said}");
    }

    // The launcher's own observer moved too: its report holds the blocks mined after the loss.
    let in_report = report_blocks(&room_report);
    assert!(in_report.contains(&(ROUNDS - 1)), "{in_report:?}");

    for pid in pids(&records) {
        assert!(!alive(pid), "peer pid {pid} is still running");
    }
    println!(
        "launcher and watch on two nodes: {} blocks; the first node died after block {KILL_AT}; the watcher then \
         reported {} blocks from the second",
        chain.len(),
        later.len()
    );
}
