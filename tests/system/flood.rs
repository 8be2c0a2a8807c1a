//! Flood (issue 5): a room of peers (the room protocol, wire version 2) mines while an outsider
//! floods every topic of the room, the peers' own topics included, with garbage, damaged real
//! messages and well-formed forgeries. The room must keep mining valid
//! blocks, no process may die, no forged block may enter any chain, and memory must stay bounded.
//! Both room tests run on the embedded broker and on Mosquitto (`::on_rumqttd`, `::on_mosquitto`).
//!
//! Also here, because it needs no room: the stable-toolchain replay of the `decode` fuzz target
//! (its seed corpus plus mutated and random inputs through the same check, `fuzz/decode_check.rs`).
//!
//! What the flood does *not* send, on purpose: messages that an unauthenticated publisher can use
//! to take the room over by design — a challenge or result of a term newer than some peer's, a
//! ballot, grant or acknowledgement with a member's real key (keys travel in the clear), a `Hello`
//! or `Leave` in someone's name, a result from the controller's id whose block really verifies. Those are what broker authentication is for. Damaged messages that
//! still decode are such forgeries too, so they are sent on a topic where they do not belong.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hashvote_core::room::{Channel, Envelope, Msg, Pos, decode, encode};
use peer::events::{Event, Record};
use peer::pace::Pace;
use peer::pow::{self, Digest, HashAlg, Template};
use peer::protocol::{Block, Challenge, Outcome, PeerId, RejectReason, Term};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

use crate::room::Room;
use crate::support::*;

#[path = "../../fuzz/decode_check.rs"]
mod decode_check;

/// Peers in the flooded room.
const ROOM: usize = 10;
/// Messages the flood publishes (besides the oversized ones) on the embedded broker.
const FLOOD: usize = 60_000;
/// The same on Mosquitto. It forwards ~2,500 flood messages a second here (one thread, sharing two
/// cores with ten miners), so the full flood would take ~25 s; a third of it still sends every
/// kind of payload thousands of times.
const FLOOD_MOSQUITTO: usize = 20_000;
/// Messages per burst; the publisher pauses between bursts so the broker keeps up.
const BURST: usize = 500;
/// The peers' difficulty (`Room` starts them with `--difficulty 18`).
const DIFFICULTY: u8 = 18;
/// The broker's limit (rumqttd's `max_payload_size`, Mosquitto's `message_size_limit`) and the
/// peers' decode limit.
const MAX_PAYLOAD: usize = PEER_MAX_PAYLOAD;

on_both_brokers!(
    flood_of_garbage_and_forgeries_on_every_topic_does_not_stop_or_fool_the_room,
    forged_future_result_in_the_controllers_name_does_not_stall_the_room,
);

fn flood_of_garbage_and_forgeries_on_every_topic_does_not_stop_or_fool_the_room(broker: Broker) {
    let started = Instant::now();
    let seed = std::env::var("FLOOD_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("flood seed {seed} (FLOOD_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);

    println!("broker: {}", broker.name());
    let mut room = Room::start_with(broker, ROOM);
    room.wait_controller(1, Duration::from_secs(30));
    room.wait_height(2, Duration::from_secs(30));
    // Term 1 has no older term to forge votes and challenges for: replace the controller first, so
    // the flood runs in term 2 or later, with a full room again.
    let (term, controller) = room.wait_controller(1, Duration::from_secs(30));
    room.kill(controller);
    room.add_peer();
    room.wait_controller(term + 1, Duration::from_secs(30));
    let prefix = room.prefix();
    println!("room of {ROOM} up in {:.1} s (controller replaced once)", started.elapsed().as_secs_f64());

    let flood_start_ms = peer::events::now_ms();
    let flood_started = Instant::now();
    let mut flood = Flood::new(&prefix, room.port);
    let open = flood.watch_challenges();
    let mut sent = BTreeMap::<&'static str, u64>::new();
    let mut forged_hashes = BTreeSet::<String>::new();
    let mut snap = Snapshot::take(&room).expect("a controller with a chain");
    let height_before = snap.height;
    let mut forge = Forger::default();
    let mut batch = Vec::with_capacity(BURST);
    let size = match broker {
        Broker::Embedded => FLOOD,
        Broker::Mosquitto => FLOOD_MOSQUITTO,
    };
    for i in 0..size {
        if i % 10_000 == 0 {
            // Term, controller and members change rarely; the open challenge is watched live.
            snap = Snapshot::take(&room).unwrap_or(snap);
        }
        if i % 2_500 == 0 {
            snap.follow(&open);
            forge.refill(&snap, &mut rng);
        }
        if i % BURST == 0 {
            snap.follow(&open);
        }
        let (kind, channel, payload) = next_payload(&snap, &mut forge, &mut rng, &mut forged_hashes);
        *sent.entry(kind).or_default() += 1;
        batch.push((channel, payload));
        if batch.len() == BURST {
            flood.publish_burst(std::mem::take(&mut batch));
        }
    }
    flood.publish_burst(batch);
    // A few payloads just under the broker's limit on every topic, on the same connection.
    let near: Vec<_> = [MAX_PAYLOAD - 512, MAX_PAYLOAD - 1024]
        .into_iter()
        .flat_map(|len| (0..6).map(move |c| (c, len)))
        .map(|(c, len)| (Target::all()[c], random_bytes(&mut rng, len)))
        .collect();
    *sent.entry("near_limit").or_default() += near.len() as u64;
    flood.publish_burst(near);
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let oversize = flood.oversized(&[MAX_PAYLOAD + 1024, 2 * MAX_PAYLOAD]);
    let flood_end_ms = peer::events::now_ms();
    let total: u64 = sent.values().sum();
    let dropped_connections = flood.errors.load(std::sync::atomic::Ordering::Relaxed);
    println!("flooded {total} messages in {flood_secs:.1} s ({dropped_connections} publisher connection errors)");
    println!("oversized payloads: {oversize}");
    println!(
        "challenge topic: the flood published {}, a QoS 0 subscriber received {} (the room's own challenges \
         included); {} of {} bursts not passed on by the broker within {SENTINEL_WAIT:?}",
        flood.to_challenge,
        flood.delivered.load(Relaxed),
        flood.unconfirmed,
        flood.sentinels_sent,
    );
    for (kind, n) in &sent {
        println!("  sent {kind:<34} {n:>7}");
    }

    // The room goes on: blocks during the flood, and every live peer (including any that lost real
    // messages to the broker's backlog limit) a few blocks further after it.
    let height_after_flood = room.min_height();
    wait_until(Duration::from_secs(60), "every live peer 3 blocks past the flood", || {
        room.min_height() >= height_after_flood.max(height_before) + 3
    });
    let records = room.records();
    let during = blocks_between(&records, flood_start_ms, flood_end_ms);
    println!(
        "blocks: {height_before} (controller) before the flood, {during} accepted during it, {} (every live peer) after it",
        room.min_height()
    );
    assert!(during > 0, "no block was accepted during the flood");

    // Nobody died.
    for i in room.alive() {
        let p = room.peers[i].as_mut().unwrap();
        assert!(p.child.try_wait().unwrap().is_none(), "{} died during the flood", p.name);
    }
    assert!(room.broker.running(), "the broker ({}) died during the flood", broker.name());

    // Nothing forged got in.
    let chain = room.check();
    let per_peer = chains(&records);
    for (peer, blocks) in &per_peer {
        for b in blocks {
            assert!(!forged_hashes.contains(&b.hash), "peer {peer} accepted forged block {} ({})", b.tx, b.hash);
        }
    }
    println!(
        "invariants hold over a chain of {} blocks; none of {} forged blocks in any chain",
        chain.len(),
        forged_hashes.len()
    );

    print_drop_table(&room, &records);
    check_memory(&room);
    println!("flood test took {:.1} s", started.elapsed().as_secs_f64());
}

/// A forged accepted result in the controller's name whose block lies ahead of the controller's
/// own chain. The controller used to treat it like any result ahead of it and ask "the
/// controller" — itself — for the missing blocks, then wait for ever; now it drops it
/// (`forged_own_result`) and the room goes on.
fn forged_future_result_in_the_controllers_name_does_not_stall_the_room(broker: Broker) {
    let room = Room::start_with(broker, 4);
    room.wait_controller(1, Duration::from_secs(30));
    room.wait_height(2, Duration::from_secs(30));
    let snap = Snapshot::take(&room).expect("a controller with a chain");
    let prefix = room.prefix();
    let mut flood = Flood::new(&prefix, room.port);
    let mut rng = StdRng::seed_from_u64(5);
    let mut block = snap.block_template(&mut rng);
    block.tx = snap.height + 5;
    let result = Msg::Result { term: snap.term, outcome: Outcome::Accepted(block), commit: snap.height };
    let env = Envelope::new(snap.controller, result);
    flood.publish_burst(vec![(Target::Result, encode(&env))]);
    let h = room.min_height();
    room.wait_height(h + 3, Duration::from_secs(20));
}

/// The `decode` fuzz target on the stable toolchain: every seed of `fuzz/corpus/decode/`, then
/// 200,000 inputs derived from them (bit flips, truncations, splices, random bytes), through the
/// same check as the fuzzer (no panic; what decodes round-trips on its own channel).
#[test]
fn decode_fuzz_corpus_replay_on_stable() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(seeds.len() >= 8, "the seed corpus ({}) has one file per message kind", dir.display());
    seeds.sort();
    let accepted: usize = seeds.iter().map(|seed| decode_check::check_decode(seed).len()).sum();
    assert_eq!(accepted, seeds.len(), "every seed is a real message of the room protocol");
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let mut mutants_accepted = 0usize;
    for _ in 0..200_000 {
        let base = &seeds[rng.random_range(0..seeds.len())];
        let input = match rng.random_range(0..4) {
            0 => flip_bits(base, &mut rng),
            1 => base[..rng.random_range(0..=base.len())].to_vec(),
            2 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let (a, b) = (rng.random_range(0..=base.len()), rng.random_range(0..=other.len()));
                [&base[..a], &other[b..]].concat()
            }
            _ => {
                let len = rng.random_range(0..256);
                random_bytes(&mut rng, len)
            }
        };
        mutants_accepted += decode_check::check_decode(&input).len();
    }
    println!("decode replay: {} seeds ({accepted} decode), 200000 mutants ({mutants_accepted} decode)", seeds.len());
}

/// Where a flood payload goes: one of the room's topics, or one under its prefix that no peer
/// subscribes to (it only loads the broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Init,
    Voting,
    Challenge,
    Solution,
    Result,
    Unexpected,
    /// A peer's own topic (`<prefix>/peer/<id>`).
    Direct(PeerId),
}

impl Target {
    fn all() -> [Target; 6] {
        [Target::Init, Target::Voting, Target::Challenge, Target::Solution, Target::Result, Target::Unexpected]
    }

    fn channel(self) -> Option<Channel> {
        match self {
            Target::Init => Some(Channel::Init),
            Target::Voting => Some(Channel::Voting),
            Target::Challenge => Some(Channel::Challenge),
            Target::Solution => Some(Channel::Solution),
            Target::Result => Some(Channel::Result),
            Target::Unexpected => None,
            Target::Direct(id) => Some(Channel::Direct(id)),
        }
    }

    fn of(channel: Channel) -> Target {
        match channel {
            Channel::Init => Target::Init,
            Channel::Voting => Target::Voting,
            Channel::Challenge => Target::Challenge,
            Channel::Solution => Target::Solution,
            Channel::Result => Target::Result,
            Channel::Direct(id) => Target::Direct(id),
        }
    }
}

/// The publisher: a rumqttc client on its own runtime, publishing at QoS 0.
struct Flood {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    prefix: String,
    port: u16,
    errors: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Payloads published on the challenge topic.
    to_challenge: u64,
    /// Deliveries on the challenge topic to the flood's own subscriber (see
    /// [`Flood::watch_challenges`]), the room's challenges included.
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The latest sentinel (see [`SENTINEL`]) published, and the latest the subscriber received.
    sentinels_sent: u64,
    sentinel_seen: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Bursts whose sentinel did not come back within [`SENTINEL_WAIT`].
    unconfirmed: u64,
}

/// Ends every burst, on the challenge topic, followed by a number: garbage to the peers (version
/// byte 0xFF), and to the flood's subscriber a sign that the broker has passed the burst on. The
/// flood waits for it before the next burst, so it goes no faster than the broker forwards: a
/// slower broker (Mosquitto, whose single thread shares two cores with ten miners) would otherwise
/// let the flood pile up in the kernel's socket buffers, and the flood would still be arriving long
/// after the test measured it, or be thrown away with the publisher's connection when a keepalive
/// expired behind it.
const SENTINEL: &[u8] = b"\xffflood-sentinel";
/// How long a burst waits for its sentinel (it is QoS 0, and a broker under load may drop it).
const SENTINEL_WAIT: Duration = Duration::from_secs(10);

impl Flood {
    fn new(prefix: &str, port: u16) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (client, errors) = rt.block_on(connect(&format!("flood-{}", std::process::id()), port));
        Flood {
            rt,
            client,
            prefix: prefix.to_string(),
            port,
            errors,
            to_challenge: 0,
            delivered: Default::default(),
            sentinels_sent: 0,
            sentinel_seen: None,
            unconfirmed: 0,
        }
    }

    fn topic(&self, target: Target) -> String {
        let prefix = &self.prefix;
        match target {
            Target::Init => format!("{prefix}/init"),
            Target::Voting => format!("{prefix}/voting"),
            Target::Challenge => format!("{prefix}/challenge"),
            Target::Solution => format!("{prefix}/solution"),
            Target::Result => format!("{prefix}/result"),
            Target::Unexpected => format!("{prefix}/unexpected"),
            Target::Direct(id) => format!("{prefix}/peer/{id}"),
        }
    }

    /// Publishes one burst, then yields for a moment so the broker drains it; once the challenges
    /// are watched, also waits until the broker has passed the burst on (see [`SENTINEL`]).
    fn publish_burst(&mut self, mut burst: Vec<(Target, Vec<u8>)>) {
        if self.sentinel_seen.is_some() {
            self.sentinels_sent += 1;
            burst.push((Target::Challenge, [SENTINEL, &self.sentinels_sent.to_be_bytes()].concat()));
        }
        self.to_challenge += burst.iter().filter(|(t, _)| *t == Target::Challenge).count() as u64;
        let burst: Vec<_> = burst.into_iter().map(|(t, p)| (self.topic(t), p)).collect();
        let client = self.client.clone();
        let (sentinel, seen) = (self.sentinels_sent, self.sentinel_seen.clone());
        let confirmed = self.rt.block_on(async move {
            for (topic, payload) in burst {
                client.publish(topic, QoS::AtMostOnce, false, payload).await.expect("publish request");
            }
            // Pacing: ~50k messages/s at most.
            tokio::time::sleep(Duration::from_millis(10)).await;
            let Some(seen) = seen else { return true };
            let deadline = tokio::time::Instant::now() + SENTINEL_WAIT;
            while seen.load(Relaxed) < sentinel {
                if tokio::time::Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            true
        });
        self.unconfirmed += u64::from(!confirmed);
    }

    /// Subscribes (on a second connection) to the room's challenges and keeps the latest one that
    /// decodes, so forgeries can aim at the open transaction. The flood's own challenges never
    /// decode there (see [`redirect_if_valid`]) except forged ones, which come from strangers or
    /// are of an old term; [`Snapshot::follow`] keeps only the controller's.
    fn watch_challenges(&mut self) -> Watch {
        let watch = Watch::default();
        let (seen, topic, port) = (watch.clone(), self.topic(Target::Challenge), self.port);
        let sentinel = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.sentinel_seen = Some(sentinel.clone());
        let delivered = self.delivered.clone();
        self.rt.block_on(async move {
            let mut options = MqttOptions::new(format!("flood-{}-watch", std::process::id()), "127.0.0.1", port);
            options
                .set_keep_alive(Duration::from_secs(5))
                .set_clean_session(true)
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = AsyncClient::new(options, 64);
            let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let mut subscribed = Some(subscribed_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.subscribe(topic.clone(), QoS::AtMostOnce).await;
                        }
                        Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                            delivered.fetch_add(1, Relaxed);
                            if let Some(n) = p.payload.strip_prefix(SENTINEL)
                                && let Ok(n) = <[u8; 8]>::try_from(n)
                            {
                                sentinel.fetch_max(u64::from_be_bytes(n), Relaxed);
                            } else if let Ok(env) = decode(&p.payload, Channel::Challenge, MAX_PAYLOAD)
                                && let Msg::Challenge { challenge, .. } = env.msg
                            {
                                seen.lock().unwrap().insert(env.from, challenge);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
            tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
                .await
                .expect("the flood's subscriber subscribes")
                .unwrap();
        });
        watch
    }

    /// Publishes payloads above the broker's limit, each from a fresh connection (the broker is
    /// expected to refuse them by closing it); returns what happened, for the log.
    fn oversized(&mut self, sizes: &[usize]) -> String {
        let topic = self.topic(Target::Challenge);
        let port = self.port;
        let outcomes: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                self.rt.block_on(async {
                    let (client, errors) = connect(&format!("flood-{}-big{i}", std::process::id()), port).await;
                    client.publish(topic.clone(), QoS::AtMostOnce, false, vec![1u8; len]).await.expect("publish");
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while errors.load(std::sync::atomic::Ordering::Relaxed) == 0
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let refused = errors.load(std::sync::atomic::Ordering::Relaxed) > 0;
                    let _ = client.disconnect().await;
                    format!(
                        "{len} B {}",
                        if refused { "refused (connection closed)" } else { "not refused within 5 s" }
                    )
                })
            })
            .collect();
        outcomes.join(", ")
    }
}

/// Connects a publisher whose event loop runs in a task; returns it with its error counter
/// (connection errors seen; the loop keeps reconnecting).
async fn connect(id: &str, port: u16) -> (AsyncClient, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    // Room to send oversized payloads: refusing them is the broker's job here.
    options.set_keep_alive(Duration::from_secs(5)).set_clean_session(true).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 4 * BURST);
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let counter = errors.clone();
    tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Back off before reconnecting (an event loop that errors returns at once).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected_rx).await.expect("flood client connects").unwrap();
    (client, errors)
}

/// The latest challenge seen from each sender.
type Watch = std::sync::Arc<std::sync::Mutex<BTreeMap<PeerId, Challenge>>>;

/// What the flood knows of the room, read from the peers' events every few thousand messages.
#[derive(Debug, Clone)]
struct Snapshot {
    /// The lowest term every live peer has seen elected: forging it (from anyone but its
    /// controller) cannot make any peer adopt a new controller.
    term: Term,
    /// That term's controller.
    controller: PeerId,
    /// The controller's chain height and tip, as its events show them (never ahead of it).
    height: u64,
    tip: Digest,
    members: Vec<PeerId>,
}

impl Snapshot {
    fn take(room: &Room) -> Option<Snapshot> {
        let alive = room.alive();
        let seen: Vec<_> = alive.iter().map(|&i| room.controller_seen_by(i)).collect::<Option<_>>()?;
        let &(term, controller) = seen.iter().min()?;
        let members: Vec<PeerId> = alive.iter().filter_map(|&i| room.id_of(i)).collect();
        let li = alive.iter().copied().find(|&i| room.id_of(i) == Some(controller))?;
        let chain = chains(&room.events_of(li)).remove(&controller).unwrap_or_default();
        let tip = match chain.last() {
            Some(b) => Digest::Sha1(hex::decode(&b.hash).ok()?.try_into().ok()?),
            None => Digest::zero(HashAlg::Sha1),
        };
        Some(Snapshot { term, controller, height: chain.len() as u64, tip, members })
    }

    /// Aims at the controller's latest challenge of this term, if it is ahead of what we knew.
    fn follow(&mut self, watch: &Watch) {
        if let Some(c) = watch.lock().unwrap().get(&self.controller)
            && c.term == self.term
            && c.tx >= self.height
        {
            self.height = c.tx;
            self.tip = c.prev;
        }
    }

    /// The controller's open challenge (as the snapshot knows it), in `term`.
    fn challenge(&self, term: Term) -> Challenge {
        Challenge {
            term,
            tx: self.height,
            alg: HashAlg::Sha1,
            difficulty: DIFFICULTY,
            pace: Pace::Fixed(DIFFICULTY),
            issued_ms: peer::events::now_ms(),
            prev: self.tip,
        }
    }

    /// A block at the controller's height on its tip, with a random nonce and hash.
    fn block_template(&self, rng: &mut StdRng) -> Block {
        let now = peer::events::now_ms();
        Block {
            tx: self.height,
            term: self.term,
            alg: HashAlg::Sha1,
            difficulty: DIFFICULTY,
            pace: Pace::Fixed(DIFFICULTY),
            issued_ms: now - 50,
            solved_ms: now,
            prev: self.tip,
            miner: self.members[rng.random_range(0..self.members.len())],
            nonce: rng.random(),
            hash: Digest::Sha1(rng.random()),
            change: None,
        }
    }

    /// An id that is not a member of the room (nor 0).
    fn stranger(&self, rng: &mut StdRng) -> PeerId {
        loop {
            let id = rng.random::<u32>();
            if id != 0 && !self.members.contains(&id) {
                return id;
            }
        }
    }
}

/// Forgeries that need work: blocks with a real proof of work at the right difficulty but on a
/// wrong `prev` (they verify as work, and must fail the link).
#[derive(Default)]
struct Forger {
    unlinked: Vec<Block>,
}

impl Forger {
    fn refill(&mut self, snap: &Snapshot, rng: &mut StdRng) {
        self.unlinked.clear();
        for _ in 0..2 {
            let mut b = snap.block_template(rng);
            b.prev = Digest::Sha1(rng.random());
            let start = rng.random::<u64>() >> 8;
            // 2^18 expected candidates; 2^28 makes a miss practically impossible.
            if let Some(nonce) = Template::new(&b.prev, b.tx, b.miner).search(u32::from(DIFFICULTY), start, 1 << 28) {
                b.nonce = nonce;
                b.hash = pow::proof(&b.prev, b.tx, b.miner, nonce);
                self.unlinked.push(b);
            }
        }
    }
}

/// The next flood payload: its kind (for the counts), target topic and bytes.
fn next_payload(
    snap: &Snapshot,
    forge: &mut Forger,
    rng: &mut StdRng,
    forged_hashes: &mut BTreeSet<String>,
) -> (&'static str, Target, Vec<u8>) {
    let target = Target::all()[rng.random_range(0..6)];
    match rng.random_range(0..100) {
        0..30 => {
            let len = rng.random_range(0..300);
            let mut bytes = random_bytes(rng, len);
            // Half start with the right version byte, to get past the first check.
            if rng.random() && !bytes.is_empty() {
                bytes[0] = hashvote_core::room::VERSION;
            }
            redirect_if_valid("random_bytes", target, bytes, rng)
        }
        30..65 => {
            let real = real_message(snap, rng);
            let (kind, bytes) = if rng.random() {
                ("bit_flipped_real", flip_bits(&real, rng))
            } else {
                ("truncated_real", real[..rng.random_range(0..real.len())].to_vec())
            };
            redirect_if_valid(kind, target, bytes, rng)
        }
        _ => {
            let (kind, env) = forgery(snap, forge, rng);
            match &env.msg {
                Msg::Result { outcome: Outcome::Accepted(b), .. } => {
                    forged_hashes.insert(b.hash.to_hex());
                }
                Msg::SyncReply { blocks, .. } => forged_hashes.extend(blocks.iter().map(|b| b.hash.to_hex())),
                _ => {}
            }
            (kind, Target::of(env.msg.channel()), encode(&env))
        }
    }
}

/// A damaged message that still decodes where it is sent is a forgery of unknown meaning (see the
/// module doc): send it where it does not belong instead.
fn redirect_if_valid(
    kind: &'static str,
    target: Target,
    bytes: Vec<u8>,
    rng: &mut StdRng,
) -> (&'static str, Target, Vec<u8>) {
    let Some(channel) = target.channel() else { return (kind, target, bytes) };
    match decode(&bytes, channel, MAX_PAYLOAD) {
        Err(_) => (kind, target, bytes),
        Ok(env) => {
            let wrong: Vec<_> = Target::all().into_iter().filter(|t| *t != Target::of(env.msg.channel())).collect();
            ("decodable_damage_on_wrong_topic", wrong[rng.random_range(0..wrong.len())], bytes)
        }
    }
}

/// A real message as a peer of this room would send it.
fn real_message(snap: &Snapshot, rng: &mut StdRng) -> Vec<u8> {
    let from = snap.members[rng.random_range(0..snap.members.len())];
    let (term, tx) = (snap.term, snap.height);
    let challenge = snap.challenge(term);
    let block = snap.block_template(rng);
    let pos = Pos { last_term: term, height: tx };
    let key = rng.random();
    let msg = match rng.random_range(0..13) {
        0 => Msg::Hello {
            to: None,
            want_reply: rng.random(),
            key,
            incarnation: rng.random(),
            since_ms: rng.random(),
            term,
            controller: Some(snap.controller),
            height: tx,
            peers: Vec::new(),
        },
        1 => Msg::Leave { incarnation: rng.random() },
        2 => Msg::PreBallot { to: None, term: term + 1, key, pos },
        3 => Msg::Ballot { term, ballot: rng.random(), key, pos, proposal: None },
        4 => Msg::Grant { to: snap.controller, to_key: rng.random(), term, key },
        5 => Msg::Heartbeat { term, key, height: tx, commit: tx, tip: snap.tip, open: Some(tx) },
        6 => Msg::Challenge { challenge, commit: tx, config: None },
        7 => Msg::Solution { tx, nonce: rng.random() },
        8 => Msg::Result { term, outcome: Outcome::Accepted(block), commit: tx },
        9 => Msg::Ack { to: snap.controller, term, height: tx, key },
        10 => {
            Msg::SyncRequest { to: snap.controller, from: tx.saturating_sub(3), req: rng.random(), key: rng.random() }
        }
        11 => Msg::SyncReply {
            to: from,
            req: rng.random(),
            term,
            config: None,
            blocks: vec![block],
            height: tx + 1,
            commit: tx,
            open: Some(challenge),
        },
        _ => Msg::Result {
            term,
            outcome: Outcome::Rejected { tx, miner: from, nonce: rng.random(), reason: RejectReason::InsufficientWork },
            commit: tx,
        },
    };
    encode(&Envelope::new(from, msg))
}

/// A well-formed message that every peer must refuse (or answer with a rejection).
fn forgery(snap: &Snapshot, forge: &mut Forger, rng: &mut StdRng) -> (&'static str, Envelope) {
    let stranger = snap.stranger(rng);
    let (term, h) = (snap.term, snap.height);
    let old_term = term - 1; // the flood starts in term 2 or later
    let challenge = snap.challenge(term);
    let block = snap.block_template(rng);
    let member = snap.members[rng.random_range(0..snap.members.len())];
    // A key no member has (keys are random 64-bit numbers).
    let wrong_key = rng.random();
    let accepted = |b: Block| Msg::Result { term, outcome: Outcome::Accepted(b), commit: h };
    let (kind, from, msg) = match rng.random_range(0..17) {
        0 => ("challenge_current_term_stranger", stranger, Msg::Challenge { challenge, commit: h, config: None }),
        1 => {
            let challenge = Challenge { term: old_term, ..challenge };
            ("challenge_old_term", stranger, Msg::Challenge { challenge, commit: h, config: None })
        }
        2 => ("result_current_term_stranger", stranger, accepted(block)),
        3 => {
            let outcome =
                Outcome::Rejected { tx: h, miner: snap.members[0], nonce: 1, reason: RejectReason::AlreadySolved };
            ("rejection_current_term_stranger", stranger, Msg::Result { term, outcome, commit: h })
        }
        4 => ("result_bad_hash_as_controller", snap.controller, accepted(block)),
        5 => {
            // The hash is the real proof of the fields, but lacks the work (almost surely).
            let hash = pow::proof(&block.prev, block.tx, block.miner, block.nonce);
            ("result_little_work_as_controller", snap.controller, accepted(Block { hash, ..block }))
        }
        6 => match forge.unlinked.pop() {
            Some(b) => ("result_unlinked_as_controller", snap.controller, accepted(b)),
            None => ("result_bad_hash_as_controller", snap.controller, accepted(block)),
        },
        7 => {
            let b = Block { tx: h.saturating_sub(1 + rng.random_range(0..h.max(1))), ..block };
            ("result_old_block_as_controller", snap.controller, accepted(b))
        }
        8 => ("solution_closed_tx", stranger, Msg::Solution { tx: rng.random_range(0..h.max(1)), nonce: rng.random() }),
        9 => {
            let tx = if rng.random() { h + 1 + rng.random_range(0..1000) } else { rng.random() };
            ("solution_future_or_unknown_tx", stranger, Msg::Solution { tx, nonce: rng.random() })
        }
        10 => {
            // For the open transaction, but without the work (checked: a lucky nonce would be a
            // real solution, which the controller rightly accepts).
            let nonce = loop {
                let n = rng.random();
                if pow::proof(&snap.tip, h, stranger, n).leading_zeros() < u32::from(DIFFICULTY) {
                    break n;
                }
            };
            ("solution_open_tx_no_work", stranger, Msg::Solution { tx: h, nonce })
        }
        11 => {
            let pos = Pos { last_term: term, height: h + 1000 };
            let msg = Msg::Ballot { term: old_term, ballot: u32::MAX, key: wrong_key, pos, proposal: None };
            ("ballot_old_term", stranger, msg)
        }
        12 => {
            let msg = Msg::SyncReply {
                to: member,
                req: rng.random(),
                term,
                config: None,
                blocks: vec![block],
                height: h + 1,
                commit: h + 1,
                open: Some(challenge),
            };
            ("sync_reply_unsolicited", stranger, msg)
        }
        13 => {
            // In a member's name, with a key that is not its own: no vote for the controller.
            let msg = Msg::Grant { to: snap.controller, to_key: wrong_key, term, key: wrong_key };
            ("grant_wrong_key", member, msg)
        }
        14 => {
            // "I hold far more than you": must not move the commit point.
            let msg = Msg::Ack { to: snap.controller, term, height: h + 1000, key: wrong_key };
            ("ack_wrong_key", member, msg)
        }
        15 => {
            let height = h + 50;
            let msg = Msg::Heartbeat {
                term,
                key: rng.random(),
                height,
                commit: height,
                tip: Digest::Sha1(rng.random()),
                open: None,
            };
            ("heartbeat_current_term_stranger", stranger, msg)
        }
        _ => {
            let pos = Pos { last_term: term, height: h + 1000 };
            ("pre_ballot_wrong_key", member, Msg::PreBallot { to: None, term: term + 1, key: wrong_key, pos })
        }
    };
    (kind, Envelope::new(from, msg))
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

fn flip_bits(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.is_empty() {
        return out;
    }
    for _ in 0..rng.random_range(1..=4) {
        let i = rng.random_range(0..out.len());
        out[i] ^= 1 << rng.random_range(0..8);
    }
    out
}

/// Blocks any peer accepted between two instants (Unix ms).
fn blocks_between(records: &[Record], from_ms: u64, to_ms: u64) -> usize {
    let txs: BTreeSet<u64> = records
        .iter()
        .filter(|r| (from_ms..=to_ms).contains(&r.ts_ms))
        .filter_map(|r| match r.event {
            Event::BlockAccepted { tx, .. } => Some(tx),
            _ => None,
        })
        .collect();
    txs.len()
}

/// Prints, per reason, how many flood messages the peers dropped: the transport's decode-level
/// drops (from the rate-limited `dropped message` log lines: the last `total=` per peer, a lower
/// bound since drops after the last logged line are not in it) and the node's `message_dropped`
/// events (exact).
fn print_drop_table(room: &Room, records: &[Record]) {
    // reason -> per-peer counts
    let mut decode_drops: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for file in &room.files {
        let log = std::fs::read_to_string(file.with_extension("log")).unwrap_or_default();
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for line in log.lines().filter(|l| l.contains("dropped message")).map(strip_ansi) {
            if let (Some(reason), Some(total)) = (field(&line, "reason"), field(&line, "total")) {
                let total = total.parse().unwrap_or(0);
                let e = last.entry(reason.to_string()).or_default();
                *e = (*e).max(total);
            }
        }
        for (reason, n) in last {
            decode_drops.entry(reason).or_default().push(n);
        }
    }
    println!("dropped by the peers ({} peers' files):", room.files.len());
    println!("  {:<6} {:<22} {:>10} {:>8} {:>8}", "layer", "reason", "total", "min/peer", "max/peer");
    let row = |layer: &str, reason: &str, counts: Vec<u64>| {
        let (min, max) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
        println!("  {layer:<6} {reason:<22} {:>10} {min:>8} {max:>8}", counts.iter().sum::<u64>());
    };
    for (reason, counts) in decode_drops {
        row("peer", &reason, counts);
    }
    let rejected = records.iter().filter(|r| matches!(r.event, Event::SolutionRejected { .. })).count();
    println!(
        "  (last logged total per reason, rate-limited, so a lower bound; {rejected} solutions rejected by controllers)"
    );
}

/// The line without terminal colour codes (the peers' logs have them even in a file).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ params letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=` in a tracing log line, without quotes.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// Peak resident memory (VmHWM) of every live peer and the broker: printed, and bounded.
fn check_memory(room: &Room) {
    let hwm_kb = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let broker = hwm_kb(room.broker.pid());
    let peers: Vec<u64> = room.alive().into_iter().map(|i| hwm_kb(room.peers[i].as_ref().unwrap().pid())).collect();
    println!(
        "peak memory (VmHWM): broker {:.1} MB; peers {} MB",
        broker as f64 / 1024.0,
        peers.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(" ")
    );
    assert!(broker > 0 && peers.iter().all(|&k| k > 0), "VmHWM readable for every process");
    assert!(broker < 150 * 1024, "broker peak memory {broker} kB");
    for (i, &k) in peers.iter().enumerate() {
        assert!(k < 200 * 1024, "peer {i} peak memory {k} kB");
    }
}
