//! Rooms beyond one process per peer: many peers in one process (`peer --instances`, what
//! `launcher --peers-per-process` runs), several rooms on one broker, and the room of 1,000.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use peer::events::{Event, Record};
use peer::protocol::PeerId;

use crate::support::*;

const ROOMS: usize = 20;
const ROOM_SIZE: usize = 10;

/// 20 rooms of 10 peers on one broker, each under its own `--prefix` and each in one process
/// (`--instances 10`): every room elects its own controller and mines its own chain, and no peer
/// ever counts a member of another room.
#[test]
fn twenty_rooms_on_one_broker_stay_apart() {
    let port = free_port();
    let _broker = start_broker(port);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..ROOMS).map(|k| dir.path().join(format!("room-{k}.jsonl"))).collect();
    let _rooms: Vec<Proc> = (0..ROOMS)
        .map(|k| {
            let (port, size, data) = (port.to_string(), ROOM_SIZE.to_string(), dir.path().join(format!("room-{k}")));
            let room = ["--host", "127.0.0.1", "--port", &port, "--prefix", &format!("room{k}")];
            let peers = ["--instances", &size, "--room-size", &size, "--data-dir", &data.display().to_string()];
            let tuning = ["--difficulty", "10", "--threads", "1", "--keepalive", "2", "--log", "warn"];
            spawn_peer(room.iter().chain(&peers).chain(&tuning), &files[k], format!("room {k}"))
        })
        .collect();
    let started = Instant::now();
    let blocks = |records: &[Record]| -> BTreeSet<u64> {
        records
            .iter()
            .filter_map(|r| match r.event {
                Event::BlockCommitted { tx, .. } => Some(tx),
                _ => None,
            })
            .collect()
    };
    wait_until(Duration::from_secs(120), "three committed blocks in every room", || {
        files.iter().all(|f| blocks(&read_events(f)).len() >= 3)
    });
    println!("20 rooms of 10 on one broker: 3 blocks committed in each after {} ms", started.elapsed().as_millis());
    let mut controllers = BTreeSet::new();
    for (k, file) in files.iter().enumerate() {
        let records = read_events(file);
        let ids: BTreeSet<PeerId> = records.iter().map(|r| r.peer).collect();
        assert_eq!(ids.len(), ROOM_SIZE, "room {k}: one process, ten peers of its own");
        for r in &records {
            match &r.event {
                Event::PeerJoined { id, members } => {
                    assert!(ids.contains(id), "room {k}: peer {} counted {id}, of another room", r.peer);
                    assert!(*members <= ROOM_SIZE, "room {k}: peer {} counted {members} members", r.peer);
                }
                Event::ControllerElected { controller, .. } => {
                    assert!(ids.contains(controller), "room {k}: controller {controller} is of another room");
                    controllers.insert(*controller);
                }
                Event::BlockAccepted { winner, .. } => {
                    assert!(ids.contains(winner), "room {k}: block won by {winner}, of another room");
                }
                _ => {}
            }
        }
        assert_invariants(&records);
    }
    assert!(controllers.len() >= ROOMS, "every room has a controller of its own: {controllers:?}");
}

/// What one `launcher` run printed of its room, and how long it took.
#[derive(Debug, Default)]
struct RoomFigures {
    election_ms: Option<u64>,
    commit_p50_ms: Option<u64>,
    /// Per second: the mean miner's deliveries, and the controller's.
    miner_delivered_per_s: Option<f64>,
    controller_delivered_per_s: Option<f64>,
    miner_published_per_s: Option<f64>,
    largest_peer_mib: Option<f64>,
    /// Connections lost, over all peers.
    disconnects: usize,
    took: Duration,
    /// It was stopped at its time limit, before its rounds.
    stopped: bool,
}

/// The first number in `line` after `marker`.
fn number_after(line: &str, marker: &str) -> Option<f64> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let num: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    num.parse().ok()
}

/// Runs `launcher` over `args` to its end and reads the figures its summary prints; checks every
/// invariant over the events of all its peers. A run still going after `limit` is stopped
/// (SIGTERM: the launcher stops its room in order) and its figures are those it printed.
fn launcher_room(args: &[String], limit: Duration) -> RoomFigures {
    let dir = tempfile::tempdir().unwrap();
    let (events, out) = (dir.path().join("events.jsonl"), dir.path().join("launcher.out"));
    let started = Instant::now();
    let child = launcher()
        .args(args)
        .args(["--plain", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--events")
        .arg(&events)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("create the launcher's output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the launcher");
    let mut room = Proc { child, name: format!("launcher {args:?}") };
    let deadline = started + limit;
    let mut stopped = false;
    let status = loop {
        if let Some(status) = room.child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            room.signal(libc::SIGTERM);
            stopped = true;
            break room.wait_exit(Duration::from_secs(60));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(status.success(), "launcher {args:?} failed ({status}):\n{stdout}");
    let records = read_events(&events);
    assert_invariants(&records);
    let disconnects = records.iter().filter(|r| matches!(r.event, Event::Disconnected { .. })).count();
    let mut f = RoomFigures { took, stopped, disconnects, ..RoomFigures::default() };
    for line in stdout.lines() {
        if line.contains("after the last peer connected") {
            f.election_ms = number_after(line, "election:").map(|ms| ms as u64);
        } else if line.contains("commit latency") {
            f.commit_p50_ms = number_after(line, "p50").map(|ms| ms as u64);
        } else if line.contains("a miner (mean):") {
            f.miner_delivered_per_s = number_after(line, "delivered");
            f.miner_published_per_s = number_after(line, "published");
        } else if line.contains("the controller (") {
            f.controller_delivered_per_s = number_after(line, "delivered");
        } else if line.contains("largest peer process") {
            f.largest_peer_mib = number_after(line, "largest peer process");
        }
    }
    f
}

/// Scale figures, printed as a table, not asserted (this machine is shared and noisy):
/// `cargo test --release -p launcher --test system scale::figures -- --ignored --nocapture`.
///
/// Rooms of 10, 100 and 300 peer processes and of 1,000 peers in 10 processes, each run by
/// `launcher` on its embedded broker, then on a 3-node RabbitMQ cluster (started on free ports;
/// `HASHVOTE_FIGURES_CLUSTER=0` skips it, `HASHVOTE_FIGURES_ROOMS=10,100,1000/100` picks the rooms:
/// `N/K` is N peers, K per process). A
/// room runs until every peer holds 25 blocks, paced to a block every 500 ms. Columns:
/// - election: from the last peer's first connection to the first controller elected by a quorum;
/// - commit p50: at the controller, from a block accepted to its commit by a quorum;
/// - deliveries per second, in steady state (from block 5): the mean miner's and the controller's,
///   from the counts in the peers' statuses;
/// - the largest peer process's peak resident memory.
#[test]
#[ignore = "a benchmark: run it on purpose, see its documentation"]
fn figures() {
    let rooms: Vec<(u16, u16)> = match std::env::var("HASHVOTE_FIGURES_ROOMS") {
        // `N` for N processes of one peer, `N/K` for N peers, K per process.
        Ok(list) => list
            .split(',')
            .filter_map(|room| match room.trim().split_once('/') {
                Some((n, k)) => Some((n.parse().ok()?, k.parse().ok()?)),
                None => Some((room.trim().parse().ok()?, 1)),
            })
            .collect(),
        Err(_) => vec![(10, 1), (100, 1), (300, 1), (1000, 100)],
    };
    let cluster = std::env::var("HASHVOTE_FIGURES_CLUSTER").map_or(true, |v| v != "0");
    let mut brokers: Vec<(&str, Option<String>, Option<RabbitCluster>)> = vec![("embedded", None, None)];
    if cluster {
        let c = RabbitCluster::start().unwrap_or_else(|e| panic!("{e}"));
        brokers.push(("3-node RabbitMQ", Some(c.addrs()), Some(c)));
    }
    println!(
        "| room | broker | election after last connect | commit p50 | deliveries/s: a miner (mean) | the controller | publishes/s: a miner | largest process RSS | run |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, list, _cluster) in &brokers {
        for &(peers, per_process) in &rooms {
            let mut args: Vec<String> =
                ["--peers", &peers.to_string(), "--peers-per-process", &per_process.to_string()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            args.extend(
                ["--rounds", "25", "--target-block-ms", "500", "--difficulty", "12", "--threads", "1"]
                    .map(String::from),
            );
            match list {
                Some(list) => args.extend(["--broker".to_string(), list.clone()]),
                None => args.push("--no-auth".into()),
            }
            // A room that has not done its rounds in 10 minutes is stopped: its row says what it
            // did. (1,000 peers on the RabbitMQ cluster take 3 to 4 minutes here: their founding
            // is two million deliveries through some 12,000 a second.)
            let f = launcher_room(&args, Duration::from_secs(600));
            let room = if per_process > 1 {
                format!("{peers} peers in {} processes", peers / per_process)
            } else {
                format!("{peers} processes")
            };
            let ms = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v} ms"));
            let rate = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            println!(
                "| {room} | {label} | {} | {} | {} | {} | {} | {} | {:.0} s{} |",
                ms(f.election_ms),
                ms(f.commit_p50_ms),
                rate(f.miner_delivered_per_s),
                rate(f.controller_delivered_per_s),
                rate(f.miner_published_per_s),
                f.largest_peer_mib.map_or("-".into(), |v| format!("{v:.0} MiB")),
                f.took.as_secs_f64(),
                if f.stopped { ", stopped before its rounds" } else { "" }
            );
        }
    }
}

/// `launcher --peers-per-process`: six peers in two processes make one room; the summary tells
/// the election, the commit latency, the steady-state traffic counted at the peers, and the
/// memory of the largest process.
#[test]
fn launcher_runs_several_peers_per_process_and_tells_the_rooms_figures() {
    // Paced to a block every 200 ms: statuses (one a second) span the steady state.
    let args = ["--peers", "6", "--peers-per-process", "3", "--rounds", "20", "--target-block-ms", "200"];
    let args = [&args[..], &["--difficulty", "8", "--threads", "1"]].concat();
    let f = launcher_room(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), Duration::from_secs(120));
    println!("{f:?}");
    assert!(!f.stopped, "the room did its rounds");
    assert!(f.election_ms.is_some(), "the election is timed");
    assert!(f.commit_p50_ms.is_some(), "commits are timed");
    // Every miner hears at least each block's challenge and result.
    assert!(f.miner_delivered_per_s.is_some_and(|r| r > 0.0), "the traffic is counted");
    assert!(f.largest_peer_mib.is_some_and(|m| m > 1.0), "the memory is measured");
}

/// A room of 1,000 peers, 100 per process, on the embedded broker: one controller per term,
/// blocks committed. Ten processes take both cores for a minute: `.ci/run` runs it, beside the
/// README's quick test command: `cargo test -p launcher --test system -- --ignored thousand`.
#[test]
#[ignore = "1,000 peers: `cargo test -p launcher --test system -- --ignored thousand`"]
fn a_thousand_peers_in_ten_processes_elect_and_commit() {
    let args =
        ["--peers", "1000", "--peers-per-process", "100", "--rounds", "8", "--difficulty", "12", "--threads", "1"];
    let f = launcher_room(&args.map(String::from), Duration::from_secs(600));
    println!("1,000 peers in 10 processes: {f:?}");
    assert!(!f.stopped, "the room did its rounds within 10 minutes");
    assert!(f.election_ms.is_some(), "every peer connected and a controller was elected");
    // Ten processes opening 2,000 connections at once overflowed the broker's listen queue:
    // connections given up on were opened again under the same client id, and the broker then
    // dropped live ones (and published their wills) in the middle of the first election. A
    // process now opens a few at a time.
    assert_eq!(f.disconnects, 0, "no peer lost its broker connection");
}
