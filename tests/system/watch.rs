//! `launcher watch` follows a room from MQTT traffic alone — here a room the launcher runs on a
//! real Mosquitto with `--broker` — and both the watcher and the launcher write a report whose
//! chain table is the chain the peers' own events describe.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use peer::events::Event;

use crate::support::*;

const ROUNDS: u64 = 5;

/// The block rows of a report's chain table: (tx, miner).
fn report_rows(dir: &Path) -> Vec<(u64, u32)> {
    let html = std::fs::read_to_string(dir.join("index.html")).expect("index.html");
    assert_eq!(html.matches("<svg").count(), 3, "three plots inlined in {}", dir.display());
    for plot in ["solve_time.svg", "hash_rate.svg", "elections.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(svg.contains("<svg"), "{plot}");
    }
    html.split("<tr class=\"block\">")
        .skip(1)
        .map(|row| {
            let cells: Vec<&str> =
                row.split("<td>").skip(1).map(|c| c.split("</td>").next().unwrap_or_default()).collect();
            (cells[0].parse().expect("tx cell"), cells[3].parse().expect("miner cell"))
        })
        .collect()
}

/// The peer rows of a report's peers table: (id, mean hash rate while mining, blocks won, in the
/// room at the end).
fn report_peers(dir: &Path) -> Vec<(u32, String, u64, String)> {
    let html = std::fs::read_to_string(dir.join("index.html")).expect("index.html");
    html.split("<tr class=\"peer\">")
        .skip(1)
        .map(|row| {
            let cells: Vec<&str> =
                row.split("<td>").skip(1).map(|c| c.split("</td>").next().unwrap_or_default()).collect();
            let id = cells[0].parse().expect("id cell");
            (id, cells[2].to_string(), cells[3].parse().expect("blocks won cell"), cells[4].to_string())
        })
        .collect()
}

/// Reads a child's whole stdout after it exited.
fn stdout_of(proc: &mut Proc) -> String {
    let mut text = String::new();
    proc.child.stdout.take().expect("piped stdout").read_to_string(&mut text).expect("read stdout");
    text
}

#[test]
fn watch_follows_a_room_on_mosquitto_and_both_reports_hold_the_peers_chain() {
    let mosquitto = Mosquitto::start().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("hvw{}p{}", std::process::id(), mosquitto.port);
    let (watch_report, room_report, events) =
        (dir.path().join("watch"), dir.path().join("room"), dir.path().join("events.jsonl"));
    let watch_out = dir.path().join("watch.out");

    let child = launcher()
        .args(["watch", "--host", "127.0.0.1", "--port", &mosquitto.port.to_string(), "--prefix", &prefix])
        .args(["--plain", "--rounds", &ROUNDS.to_string(), "--report"])
        .arg(&watch_report)
        .env_remove("HASHVOTE_USERNAME")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn watch");
    let mut watch = Proc { child, name: "watch".into() };
    let said = || std::fs::read_to_string(&watch_out).unwrap_or_default();
    wait_until(Duration::from_secs(20), "watch connected", || said().contains("connected to"));

    let broker = format!("127.0.0.1:{}", mosquitto.port);
    let child = launcher()
        .args(["--broker", &broker, "--prefix", &prefix, "--peers", "4", "--rounds", &ROUNDS.to_string()])
        .args(["--difficulty", "14", "--target-block-ms", "0", "--plain", "--events"])
        .arg(&events)
        .arg("--report")
        .arg(&room_report)
        .env_remove("HASHVOTE_USERNAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn launcher");
    let mut room = Proc { child, name: "launcher".into() };
    let status = room.wait_exit(Duration::from_secs(180));
    let room_said = stdout_of(&mut room);
    assert!(status.success(), "launcher: {status}\n{room_said}");
    let status = watch.wait_exit(Duration::from_secs(60));
    let watch_said = said();
    assert!(status.success(), "watch: {status}\n{watch_said}");

    // The peers' own account: one controller, a verified chain.
    let records = read_events(&events);
    let chain = assert_invariants(&records);
    assert!(chain.len() as u64 >= ROUNDS, "{} blocks", chain.len());
    let controller = records
        .iter()
        .find_map(|r| match r.event {
            Event::ControllerElected { term: 1, controller, .. } => Some(controller),
            _ => None,
        })
        .expect("an election in term 1");

    // The watcher saw the same election and the same winners, from MQTT alone.
    assert!(watch_said.contains(&format!("term 1: controller {controller} elected in ")), "{watch_said}");
    for b in chain.iter().take(ROUNDS as usize) {
        assert!(
            watch_said.contains(&format!("block {} won by {} in ", b.tx, b.winner)),
            "block {}: {watch_said}",
            b.tx
        );
    }

    // Both reports: three plots, and a chain table that is the peers' chain, row for row.
    for (report, said) in [(&watch_report, &watch_said), (&room_report, &room_said)] {
        let rows = report_rows(report);
        assert!(rows.len() as u64 >= ROUNDS, "{} rows in {}", rows.len(), report.display());
        for (tx, miner) in &rows {
            let block = chain.iter().find(|b| b.tx == *tx);
            if let Some(b) = block {
                assert_eq!(b.winner, *miner, "tx {tx} in {}", report.display());
            }
        }
        let txs: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(txs, (0..rows.len() as u64).collect::<Vec<_>>(), "rows in order, no gap");
        if report == &room_report {
            assert!(said.contains(&format!("({} blocks, 3 plots)", rows.len())), "{said}");
        }
        let peers = report_peers(report);
        assert_eq!(peers.len(), 4, "{peers:?} in {}", report.display());
        assert!(peers.iter().any(|p| p.2 > 0), "nobody won a block in {}: {peers:?}", report.display());
    }
    // The launcher's report, written once the peers' final statuses came: every peer that won a
    // block shows its blocks and a nonzero mean hash rate while mining; all four were in the room
    // at its end, although their last statuses say offline (the launcher stopped them).
    let room_peers = report_peers(&room_report);
    for (id, rate, won, in_room) in &room_peers {
        let won_in_chain = chain.iter().filter(|b| b.winner == *id).count() as u64;
        assert!(*won >= won_in_chain.min(ROUNDS), "peer {id}: {won} blocks won, {won_in_chain} in the chain");
        if *won > 0 {
            assert!(rate.ends_with("H/s") && !rate.starts_with("0 "), "peer {id} won {won} at rate {rate:?}");
        }
        assert_eq!(in_room, "yes", "peer {id}: {room_peers:?}");
    }

    // The launcher stopped its peers and left Mosquitto alone.
    for pid in pids(&records) {
        assert!(!alive(pid), "peer pid {pid} is still running");
    }
    assert!(port_open(mosquitto.port), "mosquitto is still up");
}
