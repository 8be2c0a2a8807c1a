//! Status over MQTT: every peer's retained status on `<prefix>/status/<id>`, and its Last Will,
//! the same status marked offline, checked with an outside MQTT client on the embedded broker
//! (rumqttd) and on Mosquitto.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peer::events::Event;
use peer::protocol::PeerId;
use peer::status::{Role, Status, topic_peer};
use rumqttc::{Client, Event as MqttEvent, MqttOptions, Packet, QoS};

use crate::room::Room;
use crate::support::*;

const T: Duration = Duration::from_secs(60);

/// One status delivery as an outside subscriber saw it.
#[derive(Debug, Clone)]
struct Seen {
    status: Status,
    /// The RETAIN flag of the delivery, recorded only to report what the broker does: the peers
    /// never rely on it.
    retain: bool,
    at: Instant,
}

/// An MQTT client subscribed to `<prefix>/status/+`, recording every status it receives.
struct Watcher {
    client: Client,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Watcher {
    fn start(name: &str, port: u16, prefix: &str) -> Self {
        let mut options = MqttOptions::new(format!("{name}-{}", std::process::id()), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5)).set_clean_session(true);
        let (client, mut connection) = Client::new(options, 64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (sub, filter, record, prefix) =
            (client.clone(), format!("{prefix}/status/+"), seen.clone(), prefix.to_string());
        std::thread::spawn(move || {
            for event in connection.iter() {
                // The watcher lives as long as its connection: an error ends it (and the test's
                // waits then time out with a message).
                let Ok(event) = event else { break };
                match event {
                    MqttEvent::Incoming(Packet::ConnAck(_)) => {
                        let _ = sub.subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    MqttEvent::Incoming(Packet::Publish(p)) => {
                        let id = topic_peer(&prefix, &p.topic).expect("a status topic");
                        let status = Status::decode(&p.payload, id).expect("a valid status");
                        record.lock().unwrap().push(Seen { status, retain: p.retain, at: Instant::now() });
                    }
                    _ => {}
                }
            }
        });
        Watcher { client, seen }
    }

    /// The latest status of each peer.
    fn latest(&self) -> BTreeMap<PeerId, Seen> {
        self.seen.lock().unwrap().iter().map(|s| (s.status.id, s.clone())).collect()
    }

    /// Every delivery of `id`'s status so far.
    fn of(&self, id: PeerId) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.status.id == id).cloned().collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// Waits until the watcher shows every peer of the room online, one controller and the others
/// mining under it; returns the peers' latest statuses.
fn wait_all_online(room: &Room, watcher: &Watcher) -> BTreeMap<PeerId, Seen> {
    let ids: Vec<PeerId> = (0..room.size).map(|i| room.id_of(i).expect("peer id")).collect();
    let mut latest = BTreeMap::new();
    wait_until(T, "every peer's status online under one controller", || {
        latest = watcher.latest();
        let statuses: Vec<&Status> = ids.iter().filter_map(|id| latest.get(id)).map(|s| &s.status).collect();
        let controllers: Vec<PeerId> = statuses.iter().filter(|s| s.role == Role::Controller).map(|s| s.id).collect();
        statuses.len() == ids.len()
            && controllers.len() == 1
            && statuses.iter().all(|s| {
                s.controller == Some(controllers[0])
                    && (s.role == Role::Controller || s.role == Role::Miner)
                    && s.threads == 1
                    && s.at_ms >= s.started_ms
            })
    });
    latest
}

/// The check, on a room whose broker is already running: every peer shows online; a miner killed
/// with SIGKILL is shown offline by its will, to a live subscriber and, retained, to one that
/// subscribes afterwards; the other peers count it as gone and keep mining. Returns a line of
/// measurements for the log.
fn retained_will_marks_a_killed_miner_offline(mut room: Room, broker: &str) -> String {
    let prefix = room.prefix();
    let live = Watcher::start("status-live", room.port, &prefix);
    let (_, controller) = room.wait_controller(1, T);
    room.wait_height(2, T);
    let online = wait_all_online(&room, &live);
    // Mining figures come once a second: wait for a hash rate from every miner.
    wait_until(T, "a hash rate from every miner", || {
        live.latest().values().filter(|s| s.status.role == Role::Miner).all(|s| s.status.hash_rate > 0)
    });

    let victim = (0..room.size).find(|&i| i != controller).expect("a miner");
    let victim_id = room.id_of(victim).expect("the miner's id");
    let incarnation = online[&victim_id].status.incarnation;
    let killed_at = Instant::now();
    room.kill(victim);

    // The will: the miner's status, marked offline, of the incarnation that was running.
    let mut will = None;
    wait_until(T, "the killed miner's will on the status topic", || {
        will = live.of(victim_id).into_iter().find(|s| s.at > killed_at && s.status.role == Role::Offline);
        will.is_some()
    });
    let will = will.unwrap();
    assert_eq!(will.status.incarnation, incarnation, "the will is the killed process's");
    let will_ms = will.at.duration_since(killed_at).as_millis();

    // A subscriber that arrives afterwards gets it retained, with everyone else's live status.
    let late = Watcher::start("status-late", room.port, &prefix);
    wait_until(T, "the retained statuses for a late subscriber", || late.latest().len() >= room.size);
    let retained = late.of(victim_id);
    assert_eq!(retained.len(), 1, "one retained status per peer: {retained:?}");
    assert_eq!((retained[0].status.role, retained[0].status.incarnation), (Role::Offline, incarnation));
    let others = late.latest();
    assert!(
        others.values().filter(|s| s.status.id != victim_id).all(|s| s.status.role != Role::Offline),
        "the live peers are retained online: {others:?}"
    );
    let late_retain_flag = retained[0].retain;

    // The room counts the miner as gone (from the will alone: it sent no Leave) and mines on.
    for i in room.alive() {
        wait_until(T, &format!("peer {i} to count the killed miner as left"), || {
            room.events_of(i).iter().any(|r| matches!(r.event, Event::PeerLeft { id, .. } if id == victim_id))
        });
    }
    let h = room.min_height();
    room.wait_height(h + 2, T);
    room.check();
    wait_until(T, "the watcher to show the room without the killed miner", || {
        let latest = live.latest();
        room.alive().iter().all(|&i| {
            let id = room.id_of(i).expect("id");
            latest.get(&id).is_some_and(|s| s.status.role != Role::Offline && s.status.height >= h + 2)
        })
    });
    // Deliveries of statuses published while the live watcher was subscribed (the will and what
    // followed it): MQTT 3.1.1 says their RETAIN flag is 0.
    let live_retain_flags: Vec<bool> =
        live.seen.lock().unwrap().iter().filter(|s| s.at > will.at).map(|s| s.retain).collect();

    format!(
        "{broker}: will seen {will_ms} ms after kill -9; RETAIN flag on the will delivered live: {}, on \
         later live deliveries: {}, on the retained will delivered to a late subscriber: {late_retain_flag}",
        will.retain,
        describe_flags(&live_retain_flags)
    )
}

fn describe_flags(flags: &[bool]) -> String {
    let set = flags.iter().filter(|&&f| f).count();
    format!("{set} of {} set", flags.len())
}

#[test]
fn a_killed_miner_is_shown_offline_by_its_retained_will_on_rumqttd() {
    let report = retained_will_marks_a_killed_miner_offline(Room::start(4), "rumqttd");
    println!("{report}");
}

#[test]
fn a_killed_miner_is_shown_offline_by_its_retained_will_on_mosquitto() {
    let report = retained_will_marks_a_killed_miner_offline(Room::start_with(Broker::Mosquitto, 4), "mosquitto");
    println!("{report}");
}
