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
            let log = std::fs::File::create(files[k].with_extension("log")).expect("create the room's log");
            let child = launcher()
                .args(["peer", "--host", "127.0.0.1", "--port", &port.to_string(), "--prefix", &format!("room{k}")])
                .args(["--instances", &ROOM_SIZE.to_string(), "--room-size", &ROOM_SIZE.to_string()])
                .args(["--difficulty", "10", "--threads", "1", "--keepalive", "2", "--log", "warn"])
                .arg("--data-dir")
                .arg(dir.path().join(format!("room-{k}")))
                .arg("--events")
                .arg(&files[k])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn a room's process");
            Proc { child, name: format!("room {k}") }
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
