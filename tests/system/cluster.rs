//! A room over a cluster of brokers: every peer is given both nodes' addresses, connects to the
//! one its id picks, and moves to the other when its node dies. Two Mosquitto brokers bridged for
//! every topic stand in for a cluster of two nodes (what a peer sees of one: any node delivers
//! what any node was sent; a dead node's connections, and their wills, die with it).

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use peer::events::Event;

use crate::support::*;

const PEERS: usize = 4;

#[test]
fn peers_spread_over_two_nodes_move_to_the_survivor_and_the_room_goes_on() {
    let a = Mosquitto::start().unwrap_or_else(|e| panic!("{e}"));
    let b = Mosquitto::start_bridged_to(a.port).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let brokers = format!("127.0.0.1:{},127.0.0.1:{}", a.port, b.port);
    let room = PEERS.to_string();
    let events: Vec<_> = (0..PEERS).map(|i| dir.path().join(format!("peer-{i}.jsonl"))).collect();
    let _peers: Vec<Proc> = (0..PEERS)
        .map(|i| {
            let log = std::fs::File::create(events[i].with_extension("log")).expect("create peer log");
            let child = launcher()
                .args(["peer", "--host", &brokers, "--id", &(i + 1).to_string(), "--room-size", &room])
                .args(["--difficulty", "10", "--threads", "1", "--keepalive", "2", "--log", "info"])
                .arg("--data-dir")
                .arg(dir.path().join(format!("data-{i}")))
                .arg("--events")
                .arg(&events[i])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn peer");
            Proc { child, name: format!("peer #{i}") }
        })
        .collect();
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
