//! The peer's driver of the room protocol (`--wire room`, the default): connects to the broker,
//! turns packets into [`Input`]s for the [`RoomNode`], makes every [`Action::Persist`] durable in
//! the peer's data directory ([`Store`]) before anything that follows it, and carries out the rest.
//!
//! It uses [`crate::transport`]'s network task, client ids, options, drop log and mining clock.
//! Each peer subscribes to the room topics (the solutions topic only while it is controller) and
//! to its own topic `<prefix>/peer/<id>`, not to the other peers' statuses: it learns of departures from their `Leave`, which is the Last Will
//! of their protocol connection. A second connection, the status beacon, publishes this peer's
//! retained status (see [`crate::status`]), with the offline status as its will, for whoever
//! watches.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::PeerConfig;
use crate::events::{Event, EventSink};
use crate::miner::{Found, Miner};
use crate::protocol::{PeerId, Topics};
use crate::status::{Role, STATUS_MIN_GAP, Schedule, Status};
use crate::store::{Identity, Store};
use crate::transport::{
    DropLog, FirstConnect, MiningClock, Net, PeerError, beacon_client_id, connect, log_event, mqtt_client_id,
    mqtt_options, poll_network,
};
use hashvote_core::room::{self, Action, Channel, Input, Msg, Restored, RoomNode, RoomNodeConfig, Timing};

/// Runs a peer until `shutdown` is cancelled (clean exit: announces its departure) or a fatal
/// error. Its durable state lives in `store`; every event goes to `events`.
pub async fn run(
    cfg: PeerConfig,
    store: Store,
    identity: Identity,
    restored: Restored,
    mut events: EventSink,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let id = identity.id;
    let mut store = store;
    let topics = Topics::new(&cfg.prefix);
    let direct = topics.direct_topic(id);
    let threads = cfg.mining_threads();
    events.emit(Event::Started { pid: std::process::id(), client_id: id, room_size: cfg.room_size, threads });
    info!(
        id,
        room_size = cfg.room_size,
        threads,
        height = restored.blocks.len(),
        term = restored.term,
        "peer starting"
    );

    let incarnation: u64 = rand::random();
    let clock = Clock::new();
    let mut node = RoomNode::new(
        RoomNodeConfig {
            id,
            key: identity.key,
            incarnation,
            since_ms: crate::events::now_ms(),
            room_size: cfg.room_size,
            pace: cfg.pace(),
            alg: cfg.hash,
            seed: rand::random(),
            timing: Timing { replace_after_ms: cfg.replace_after_s.saturating_mul(1_000), ..Timing::default() },
        },
        restored,
    );
    // A restart says what it resumed from, even nothing: what it had only staged (blocks synced
    // but never acknowledged) may be gone, and its events must not pretend otherwise.
    if store.existed() {
        events.emit(Event::Resumed {
            term: node.term(),
            height: node.chain().height(),
            commit: node.commit(),
            tip: node.chain().blocks().last().map(|b| b.hash.to_hex()),
        });
    }
    let mut status = StatusPublisher {
        topic: topics.status_topic(id),
        threads: u16::try_from(threads).unwrap_or(u16::MAX),
        schedule: Schedule::default(),
    };
    // Two connections, each with a Last Will. The protocol connection's will is our `Leave`, on
    // the room's init topic: the peers learn of our death from it. The status beacon subscribes
    // to nothing and its will is our status marked offline, retained, for whoever watches; rumqttd
    // restarts a connection's keepalive countdown whenever it *sends* to it, so a beacon that
    // receives nothing has its will sent 1.5 x keepalive after we fall silent on any broker.
    let leave = LastWill::new(
        topics.topic(crate::protocol::Channel::Init),
        room::encode(&room::Envelope::new(id, node.farewell())),
        QoS::AtLeastOnce,
        false,
    );
    let offline = Status { threads: status.threads, ..offline_status(node.status(crate::events::now_ms())) };
    let beacon_will = LastWill::new(&status.topic, offline.encode(), QoS::AtLeastOnce, true);
    let (client, eventloop) = connect(mqtt_options(&cfg, mqtt_client_id(id, incarnation), Some(leave)), 1024);
    let (beacon, beacon_loop) = connect(mqtt_options(&cfg, beacon_client_id(id, incarnation), Some(beacon_will)), 64);

    let (net_tx, mut net_rx) = mpsc::channel(4096);
    let stop_net = CancellationToken::new();
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let first =
        FirstConnect { addr: addr.clone(), timeout_s: cfg.connect_timeout_s, credentials: cfg.username.is_some() };
    let net = tokio::spawn(poll_network(eventloop, net_tx, stop_net.clone(), first.clone()));
    // The beacon's own failures to connect are the protocol connection's too, which reports them.
    let (beacon_tx, mut beacon_rx) = mpsc::channel(16);
    let beacon_net = tokio::spawn(poll_network(beacon_loop, beacon_tx, stop_net.clone(), first));

    let (found_tx, mut found_rx) = mpsc::unbounded_channel::<Found>();
    let miner = Miner::new(threads, move |f| {
        let _ = found_tx.send(f);
    });
    let mut drops = DropLog::default();
    let mut mining = MiningClock::default();
    let mut connected_once = false;
    // Whether the beacon is connected: statuses are not queued while it is down (rumqttc's
    // request channel would fill, and block us, during a long outage); the next CONNACK sends one.
    let mut online = false;
    // Whether the protocol connection is up: the node's timers run only meanwhile.
    let mut main_up = false;
    // Whether we subscribe to the solutions: only as controller. Every miner's solution to every
    // peer was 300 deliveries per solution in a room of 300, where dozens of miners solve an
    // easy challenge before its result reaches them; only the controller reads them.
    let mut solutions = false;
    // A gap between ticks this long means the process stood still (SIGSTOP, a frozen machine).
    let stall_after = Duration::from_millis(cfg.keepalive_s * 1500);
    let mut last_tick = Instant::now();
    let mut status_tick = tokio::time::interval(STATUS_MIN_GAP);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    let result = loop {
        let timer = clock.instant(node.next_timer());
        let input = tokio::select! {
            // In this order: after the process stood still, the overdue tick comes first and tells
            // the node so before it reads the backlog of what happened meanwhile.
            biased;
            () = shutdown.cancelled() => break Ok(()),
            _ = status_tick.tick() => {
                let stalled = last_tick.elapsed() > stall_after;
                last_tick = Instant::now();
                if online {
                    status.send(&beacon, node.status(clock.now_ms()), &miner, false).await;
                }
                if stalled && connected_once {
                    warn!(ms = stall_after.as_millis() as u64, "this process stood still for longer than the room waits");
                    Input::Stalled
                } else {
                    continue;
                }
            }
            () = tokio::time::sleep_until(timer), if main_up => Input::Tick,
            Some(found) = found_rx.recv() => Input::Mined(found),
            Some(up) = beacon_rx.recv() => {
                match up {
                    // Retained statuses are lost when a broker without persistence restarts
                    // (rumqttd keeps them in memory only): every connection sends ours again.
                    Net::Connected => {
                        online = true;
                        status.send(&beacon, node.status(clock.now_ms()), &miner, true).await;
                    }
                    Net::Lost(_) => online = false,
                    Net::Publish { .. } | Net::Fatal(_) => {}
                }
                continue;
            }
            net = net_rx.recv() => match net {
                None => break Ok(()),
                Some(Net::Fatal(e)) => break Err(e),
                Some(Net::Lost(reason)) => {
                    main_up = false;
                    events.emit(Event::Disconnected { reason });
                    continue;
                }
                Some(Net::Connected) => {
                    // Every CONNACK, first or not: with a clean session the broker kept no
                    // subscription, whatever rumqttc or the broker would otherwise do. The
                    // solutions go to the controller alone (see `solutions`).
                    let solution = topics.topic(crate::protocol::Channel::Solution);
                    let subs = topics
                        .all()
                        .into_iter()
                        .filter(|t| *t != solution || node.is_controller())
                        .chain(std::iter::once(direct.as_str()))
                        .map(|t| rumqttc::SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(subs).await {
                        warn!(error = %e, "subscribe failed");
                        continue;
                    }
                    solutions = node.is_controller();
                    if !connected_once {
                        info!(broker = %addr, "connected");
                    }
                    connected_once = true;
                    main_up = true;
                    events.emit(Event::Connected { broker: addr.clone() });
                    Input::Connected
                }
                Some(Net::Publish { topic, payload }) => {
                    let channel = if topic == direct { Some(Channel::Direct(id)) } else { topics.channel(&topic).map(Channel::from) };
                    let Some(channel) = channel else {
                        drops.count("unexpected_topic", || format!("message on {topic}"));
                        continue;
                    };
                    match room::decode(&payload, channel, cfg.max_payload) {
                        Ok(env) => Input::Message(env),
                        Err(e) => {
                            drops.count(e.reason(), || format!("on {topic}: {e}"));
                            continue;
                        }
                    }
                }
            },
        };
        let mut force_status = matches!(input, Input::Connected);
        let mut fatal = None;
        let mut writes = Vec::new();
        events.hold();
        let actions = node.handle(clock.now_ms(), input);
        if main_up && solutions != node.is_controller() {
            // Before this batch's messages: a new controller's first challenge goes out after
            // its subscription, on the same connection, so no solution to it is missed.
            solutions = node.is_controller();
            follow_solutions(&client, &topics, solutions).await;
        }
        for action in actions {
            // What a message promises (a vote, a block held) is on disk before it goes out: the
            // writes of a batch are committed together before the first action after them, and
            // made durable (with all staged before) before the first message that is not a
            // sync request. A sync request promises nothing, so a peer catching up writes its
            // blocks without waiting for the disk at each reply; a non-voter, which promises
            // nothing, hardly ever waits.
            if let Action::Persist(w) = action {
                writes.push(w);
                continue;
            }
            // An event depends on nothing written, and goes out before what it describes: a peer
            // killed between the two must not resume from blocks its events never said (a
            // failover bench's invariant check once caught a controller's last block on disk
            // without its `block_accepted`, staged before the event was written).
            let event = matches!(action, Action::Emit(_));
            if !event && !writes.is_empty() {
                events.flush();
            }
            let promise = matches!(&action, Action::Publish(msg) if !matches!(msg, Msg::SyncRequest { .. }));
            let written = match (writes.is_empty() || event, promise) {
                (true, false) => Ok(()),
                (false, false) => store.stage(&std::mem::take(&mut writes)),
                (_, true) => store.apply(&std::mem::take(&mut writes)),
            };
            if let Err(e) = written {
                fatal = Some(format!("cannot write the data directory: {e}"));
                break;
            }
            match action {
                Action::Persist(_) => unreachable!("handled above"),
                Action::Publish(msg) => {
                    events.flush();
                    publish(&client, &topics, id, msg).await;
                }
                Action::Mine(job) => {
                    miner.start(job);
                    if let Some(e) = mining.switch(Some(job.tx), miner.hashes()) {
                        events.emit(e);
                    }
                }
                Action::StopMining => {
                    miner.stop();
                    if let Some(e) = mining.switch(None, miner.hashes()) {
                        events.emit(e);
                    }
                }
                Action::Emit(Event::MessageDropped { reason, detail }) => {
                    // Forgeries can come by the thousand: log and record each reason at most once
                    // a second, with the running count.
                    if let Some(total) = drops.count(&reason, || detail.clone()) {
                        events.emit(Event::MessageDropped { reason, detail: format!("{detail} ({total} so far)") });
                    }
                }
                Action::Emit(event) => {
                    force_status |= matches!(event, Event::QuorumWaiting { .. } | Event::LeaderElected { .. });
                    log_event(&event);
                    events.emit(event);
                }
                Action::Fatal(reason) => fatal = Some(reason),
            }
        }
        events.release();
        if fatal.is_none()
            && let Err(e) = store.stage(&writes)
        {
            fatal = Some(format!("cannot write the data directory: {e}"));
        }
        if let Some(reason) = fatal {
            break Err(PeerError::Protocol(reason));
        }
        if online {
            status.send(&beacon, node.status(clock.now_ms()), &miner, force_status).await;
        }
    };

    miner.stop();
    // What we staged becomes durable, so a restart resumes from where we stopped.
    if let Err(e) = store.sync() {
        warn!(error = %e, "cannot write the data directory");
    }
    if connected_once {
        if result.is_ok() {
            // A clean goodbye, so the room does not wait for a timeout, and our status marked
            // offline (the DISCONNECTs below discard the wills that would say so).
            publish(&client, &topics, id, node.farewell()).await;
            // Never an empty publish to clear a retained status: rumqttd deletes a retained
            // message on an empty publish *without* RETAIN, which MQTT says must not touch it.
            let offline = status.fill(offline_status(node.status(crate::events::now_ms())), &miner, Instant::now());
            if let Err(e) = beacon.publish(&status.topic, QoS::AtLeastOnce, true, offline.encode()).await {
                warn!(error = %e, "publishing the offline status failed");
            }
        }
        // A DISCONNECT also discards our Last Will: a duplicate giving way must not announce
        // the departure of the peer whose id it shares.
        let _ = client.disconnect().await;
        let _ = beacon.disconnect().await;
        // Give the event loops a moment to flush the goodbye and the DISCONNECTs.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = net.await;
            let _ = beacon_net.await;
        })
        .await;
    }
    stop_net.cancel();
    events.emit(Event::Stopped);
    info!(height = node.chain().height(), commit = node.commit(), "peer stopped");
    result
}

/// The protocol's clock: monotonic milliseconds, starting at the Unix time the process started
/// (so block times read like wall-clock times, yet a clock step never moves a timer).
struct Clock {
    start: Instant,
    base_ms: u64,
}

impl Clock {
    fn new() -> Self {
        Self { start: Instant::now(), base_ms: crate::events::now_ms() }
    }

    fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }

    /// The instant at protocol time `ms` (capped a second ahead: nothing waits longer unseen).
    fn instant(&self, ms: u64) -> tokio::time::Instant {
        let ahead = ms.saturating_sub(self.now_ms()).min(1000);
        tokio::time::Instant::now() + Duration::from_millis(ahead)
    }
}

/// Publishes this peer's retained status when its [`Schedule`] says so.
struct StatusPublisher {
    /// `<prefix>/status/<id>`.
    topic: String,
    threads: u16,
    schedule: Schedule,
}

impl StatusPublisher {
    /// Publishes `status` (the node's, built after every input: no field costs more than a map
    /// lookup) if it is due, or at once if `force`.
    async fn send(&mut self, client: &AsyncClient, status: Status, miner: &Miner, force: bool) {
        let now = Instant::now();
        if !force && !self.schedule.due(&status, now) {
            return;
        }
        let status = self.fill(status, miner, now);
        // Retained, so a watcher that subscribes later gets it; QoS 1 like everything else.
        if let Err(e) = client.publish(&self.topic, QoS::AtLeastOnce, true, status.encode()).await {
            warn!(error = %e, "status publish failed");
        }
        self.schedule.published(&status, now);
    }

    /// Adds the mining figures the node does not know.
    fn fill(&mut self, mut status: Status, miner: &Miner, now: Instant) -> Status {
        let hashes = miner.hashes();
        status.hash_rate = self.schedule.hash_rate(hashes, now);
        status.hashes = hashes;
        status.threads = self.threads;
        status
    }
}

/// `status` marked offline: the beacon's Last Will, and our last word on a clean exit.
fn offline_status(status: Status) -> Status {
    Status { role: Role::Offline, tx: None, difficulty: None, ..status }
}

/// Subscribes to the solutions topic (or unsubscribes from it).
async fn follow_solutions(client: &AsyncClient, topics: &Topics, on: bool) {
    let topic = topics.topic(crate::protocol::Channel::Solution).to_string();
    let done = if on { client.subscribe(topic, QoS::AtLeastOnce).await } else { client.unsubscribe(topic).await };
    if let Err(e) = done {
        warn!(error = %e, "cannot change the subscription to the solutions");
    }
}

async fn publish(client: &AsyncClient, topics: &Topics, id: PeerId, msg: Msg) {
    let topic = match msg.channel() {
        Channel::Direct(to) => topics.direct_topic(to),
        other => topics.topic(other.broadcast().expect("a broadcast channel")).to_string(),
    };
    let payload = room::encode(&room::Envelope::new(id, msg));
    // QoS 1 everywhere: every message is idempotent, and QoS 0 may be dropped under load. Published
    // at QoS 1 to QoS 1 subscriptions, so delivered at QoS 1 by any broker: we never count on
    // rumqttd delivering a QoS 0 publish at QoS 1 to a QoS 1 subscriber (MQTT says the lower wins).
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, payload).await {
        warn!(error = %e, "publish failed");
    }
}
