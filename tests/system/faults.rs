//! Faults on a real room: controller crash, a paused (zombie) controller, churn, broker restart,
//! a duplicate client id. Each scenario runs on the embedded broker (rumqttd) and on Mosquitto
//! (`<scenario>::on_rumqttd`, `<scenario>::on_mosquitto`): the peers must not depend on one broker's
//! ways.

use std::time::Duration;

use peer::events::{Event, now_ms};

use crate::room::Room;
use crate::support::*;

const T: Duration = Duration::from_secs(60);

on_both_brokers!(
    a_killed_controller_is_replaced_and_the_chain_continues_without_a_gap,
    a_paused_controller_is_deposed_and_steps_down_when_it_wakes,
    miners_leave_and_join_without_disturbing_the_room,
    the_room_resumes_after_a_broker_restart,
    a_second_process_claiming_a_taken_client_id_exits_with_one_line,
);

fn a_killed_controller_is_replaced_and_the_chain_continues_without_a_gap(broker: Broker) {
    let mut room = Room::start_with(broker, 5);
    let (term, controller) = room.wait_controller(1, T);
    room.wait_height(2, T);
    let killed_at = now_ms();
    room.kill(controller);
    let (new_term, new_controller) = room.wait_controller(term + 1, T);
    assert_ne!(new_controller, controller);
    let before = room.min_height();
    room.wait_height(before + 3, T);
    let first = room.first_challenge_after(term).expect("a challenge in the new term");
    println!("failover: kill -9 -> first challenge of term {new_term}: {} ms", first.saturating_sub(killed_at));
    let chain = room.check();
    let ids: Vec<u64> = chain.iter().map(|b| b.tx).collect();
    assert_eq!(ids, (0..chain.len() as u64).collect::<Vec<_>>(), "consecutive transaction ids");
}

fn a_paused_controller_is_deposed_and_steps_down_when_it_wakes(broker: Broker) {
    let mut room = Room::start_with(broker, 4);
    let (term, controller) = room.wait_controller(1, T);
    room.wait_height(2, T);
    let zombie = room.peers[controller].take().expect("controller process");
    zombie.signal(libc::SIGSTOP);
    // The others notice after 1.5 x keepalive and elect a new controller, which keeps mining.
    let (new_term, new_controller) = room.wait_controller(term + 1, T);
    assert_ne!(new_controller, controller);
    let h = room.min_height();
    room.wait_height(h + 2, T);
    zombie.signal(libc::SIGCONT);
    room.peers[controller] = Some(zombie);
    // The zombie reconnects, learns of the newer term and follows it.
    wait_until(T, "the zombie to follow the new controller", || {
        room.controller_seen_by(controller).is_some_and(|(t, _)| t >= new_term)
    });
    let h = room.min_height();
    room.wait_height(h + 2, T);
    room.check();
    // Nothing the zombie said after waking was accepted: every block of a later term came from the
    // new controller's term.
    let chain = room.check();
    assert!(chain.iter().filter(|b| b.term == term).count() >= 2);
    assert!(chain.iter().any(|b| b.term >= new_term));
}

fn miners_leave_and_join_without_disturbing_the_room(broker: Broker) {
    let mut room = Room::start_with(broker, 4);
    let (_, controller) = room.wait_controller(1, T);
    room.wait_height(1, T);
    let miner = (0..4).find(|&i| i != controller).unwrap();
    room.kill(miner);
    let h = room.min_height();
    room.wait_height(h + 2, T);
    // A late joiner adopts the controller and the chain, without an election, and mines.
    let late = room.add_peer();
    let h = room.min_height();
    room.wait_height(h + 3, T);
    // Waited for, not asserted at once: a sync can bring the joiner to that height a moment before
    // its first job (seen on Mosquitto, where the room mines faster than on rumqttd).
    wait_until(T, "the late joiner to mine", || {
        room.events_of(late).iter().any(|r| matches!(r.event, Event::MiningStarted { .. }))
    });
    let events = room.events_of(late);
    // No ballot but the zero one a peer casts after taking up a controller without voting.
    assert!(
        events.iter().all(|r| !matches!(r.event, Event::VoteCast { vote, .. } if vote != 0)),
        "the late joiner did not vote"
    );
    for (i, terms) in room.terms() {
        assert!(terms.iter().all(|&t| t == 1), "peer {i} saw another election: {terms:?}");
    }
    room.check();
}

fn the_room_resumes_after_a_broker_restart(broker: Broker) {
    let mut room = Room::start_with(broker, 4);
    room.wait_controller(1, T);
    room.wait_height(2, T);
    room.broker.kill();
    let h = room.min_height();
    // The same broker on the same port: Mosquitto, like rumqttd here, keeps no retained message
    // or session across it (`persistence false`).
    room.broker.restart(room.port);
    // Peers reconnect with backoff, re-subscribe, re-announce; the controller re-issues its
    // challenge (or its last result), and mining goes on from the chains the peers hold.
    room.wait_height(h + 3, T);
    for i in room.alive() {
        let connects = room.events_of(i).iter().filter(|r| matches!(r.event, Event::Connected { .. })).count();
        assert!(connects >= 2, "peer {i} reconnected");
    }
    room.check();
}

/// Fails about one run in ten, on either broker (seen serially and beside a flood): the duplicate
/// hears the others' hellos, whose views name its own id as controller (which it ignores, as only
/// a forgery could point it at itself), counts a full room and votes in term 1 under the taken id
/// before its own hello's echo tells it to give way; the others take that as a changed vote of
/// term 1 and switch to a second controller of that term, which the invariant check reports. A
/// protocol race, not a broker's: left failing until the election refuses such a vote.
fn a_second_process_claiming_a_taken_client_id_exits_with_one_line(broker: Broker) {
    let room = Room::start_with(broker, 3);
    room.wait_controller(1, T);
    let taken = room.id_of(0).expect("peer 0's id").to_string();
    let events = room.dir.path().join("duplicate.jsonl");
    let prefix = room.prefix();
    let mut dup = start_peer(room.port, &events, &["--id", &taken, "--room-size", "3", "--prefix", &prefix]);
    let status = dup.wait_exit(T);
    assert!(!status.success());
    let log = std::fs::read_to_string(events.with_extension("log")).unwrap_or_default();
    let line = log.lines().find(|l| l.contains("peer: error:")).unwrap_or_default();
    assert!(line.contains(&format!("client id {taken} is already used")), "{log}");
    // The room keeps its peer, and goes on mining.
    let h = room.min_height();
    room.wait_height(h + 2, T);
    assert!(!room.records().iter().any(|r| matches!(r.event, Event::PeerLeft { .. })), "nobody left the room");
    room.check();
}
