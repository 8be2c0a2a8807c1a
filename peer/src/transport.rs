//! The MQTT glue: connects to the broker, turns packets into [`Input`]s for the [`Node`], and
//! carries out its [`Action`]s (publish, mine, log).
//!
//! rumqttc's event loop runs in its own task and is polled without pause (it only reconnects while
//! polled, and a blocked poll would stall `publish`). Subscriptions are renewed on every CONNACK
//! because rumqttc does not restore them after a reconnect.
//!
//! Nothing here depends on the embedded broker's (rumqttd's) departures from MQTT 3.1.1; each place
//! that is careful about one says so ("Broker independence" in docs/PROTOCOL.md lists them), and
//! the fault and flood system tests run on rumqttd and on Mosquitto.
//!
//! It also publishes the peer's retained status (see [`crate::status`]) and registers the offline
//! status as the Last Will.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS, StateError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::PeerConfig;
use crate::events::{Event, EventSink};
use crate::miner::{Found, Miner};
use crate::node::{Action, Input, Node, NodeConfig};
use crate::protocol::{self, Envelope, Message, PeerId, Topics};
use crate::status::{Role, STATUS_MIN_GAP, Schedule, Status};

/// Why a peer stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The protocol core found it cannot take part (e.g. its client id is taken).
    #[error("{0}")]
    Protocol(String),
    /// The first connection to the broker never succeeded.
    #[error("cannot connect to the broker at {addr} within {secs} s: {reason}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// The timeout.
        secs: u64,
        /// The last connection error.
        reason: String,
    },
    /// The broker closed the first connections after accepting TCP but before any CONNACK.
    /// rumqttd refuses a bad or missing login this way, without a return code.
    #[error(
        "the broker at {addr} closed the connection before accepting the login ({})",
        if *credentials { "wrong user name or password?" } else { "does it require a login? set --username and HASHVOTE_PASSWORD" }
    )]
    LoginRejected {
        /// host:port.
        addr: String,
        /// Whether a user name (and password) was sent.
        credentials: bool,
    },
    /// The broker refused the login with a CONNACK return code (e.g. Mosquitto's
    /// BadUserNamePassword or NotAuthorized).
    #[error("the broker at {addr} refused the connection ({code}); check the user name and password")]
    Refused {
        /// host:port.
        addr: String,
        /// The CONNACK return code.
        code: String,
    },
}

/// What the network task tells the protocol loop.
pub(crate) enum Net {
    Connected,
    Publish { topic: String, payload: bytes::Bytes, retain: bool },
    Lost(String),
    Fatal(PeerError),
}

/// Runs a peer until `shutdown` is cancelled (clean exit: announces its departure) or a fatal
/// error. Every event goes to `events`.
pub async fn run(
    cfg: PeerConfig,
    id: PeerId,
    mut events: EventSink,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let topics = Topics::new(&cfg.prefix);
    let threads = cfg.mining_threads();
    events.emit(Event::Started { pid: std::process::id(), client_id: id, room_size: cfg.room_size, threads });
    info!(id, room_size = cfg.room_size, threads, "peer starting");

    // The MQTT client id includes the incarnation: two processes started with one peer id must not
    // take over each other's session at the broker; the protocol tells them apart instead.
    let incarnation: u64 = rand::random();
    let mut node = Node::new(NodeConfig {
        id,
        room_size: cfg.room_size,
        min_peers: cfg.min_peers,
        pace: cfg.pace(),
        alg: cfg.hash,
        seed: None,
        incarnation,
        since_ms: crate::events::now_ms(),
        silence_ms: controller_silence_ms(cfg.keepalive_s),
    });
    let mut status = StatusPublisher {
        topic: topics.status_topic(id),
        threads: u16::try_from(threads).unwrap_or(u16::MAX),
        schedule: Schedule::default(),
    };
    // Our status marked offline, retained: watchers see that we are gone, and the other peers
    // take it as our departure (the incarnation in it keeps a late will from removing a later
    // run of this peer). MQTT fixes a will at CONNECT, so its figures are those at start.
    let will = LastWill::new(
        &status.topic,
        Status { threads: status.threads, ..node.offline_status(crate::events::now_ms()) }.encode(),
        QoS::AtLeastOnce,
        true,
    );
    // Two connections. The protocol's, subscribed to the whole room, and the status beacon's,
    // subscribed to nothing, both with that will. rumqttd restarts a connection's keepalive
    // countdown whenever it *sends* to it, so in a busy room a stopped or cut-off peer's protocol
    // connection can outlive it for half a minute; the beacon receives nothing, so every broker
    // sends its will 1.5 x keepalive after the peer falls silent, as MQTT says.
    let (client, eventloop) = connect(mqtt_options(&cfg, mqtt_client_id(id, incarnation), Some(will.clone())), 1024);
    let (beacon, beacon_loop) = connect(mqtt_options(&cfg, beacon_client_id(id, incarnation), Some(will)), 64);

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
    // Whether the protocol connection is up: the controller's silence is judged only meanwhile.
    let mut main_up = false;
    // Catches up with statuses that changed within STATUS_MIN_GAP of the last one, and sends the
    // once-a-second status.
    // A gap between ticks this long means the process stood still (SIGSTOP, a frozen machine):
    // our will may have gone out, and the room may have gone on without us.
    let stall_after = Duration::from_millis(cfg.keepalive_s * 1500);
    let mut last_tick = Instant::now();
    let mut status_tick = tokio::time::interval(STATUS_MIN_GAP);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    let result = loop {
        let input = tokio::select! {
            // In this order: after the process stood still, the overdue tick comes first and tells
            // the node so before it reads the backlog of what happened meanwhile.
            biased;
            () = shutdown.cancelled() => break Ok(()),
            _ = status_tick.tick() => {
                let stalled = last_tick.elapsed() > stall_after;
                last_tick = Instant::now();
                if online {
                    status.send(&beacon, node.status(crate::events::now_ms()), &miner, false).await;
                }
                if stalled && connected_once {
                    warn!(ms = stall_after.as_millis() as u64, "this process stood still for longer than the room waits");
                    Input::Stalled
                } else if main_up {
                    Input::Tick
                } else {
                    continue;
                }
            }
            Some(found) = found_rx.recv() => Input::Mined(found),
            Some(up) = beacon_rx.recv() => {
                match up {
                    // Retained statuses are lost when a broker without persistence restarts
                    // (rumqttd keeps them in memory only): every connection sends ours again.
                    Net::Connected => {
                        online = true;
                        status.send(&beacon, node.status(crate::events::now_ms()), &miner, true).await;
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
                    // subscription, whatever rumqttc or the broker would otherwise do.
                    let subs =
                        topics.subscriptions().map(|t| rumqttc::SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(subs).await {
                        warn!(error = %e, "subscribe failed");
                        continue;
                    }
                    if !connected_once {
                        info!(broker = %addr, "connected");
                    }
                    connected_once = true;
                    main_up = true;
                    events.emit(Event::Connected { broker: addr.clone() });
                    Input::Connected
                }
                Some(Net::Publish { topic, payload, retain }) => {
                    let Some(input) = decode_input(&topics, &topic, &payload, cfg.max_payload, &mut drops) else {
                        continue;
                    };
                    // Our own will, kept by the broker from a cut we have already come back from and
                    // handed to our new subscription (RETAIN = 1, as MQTT requires for a retained
                    // message sent on subscribing; live deliveries carry 0): the room has seen it
                    // long ago. Only put our status back in its place.
                    if retain
                        && let Input::Status(s) = &input
                        && (s.id, s.incarnation, s.role) == (id, incarnation, Role::Offline)
                    {
                        if online {
                            status.send(&beacon, node.status(crate::events::now_ms()), &miner, true).await;
                        }
                        continue;
                    }
                    input
                }
            },
        };
        // A reconnection may follow a broker restart or our own will (see Node's handling of
        // statuses under our id): send our status again with it.
        let mut force_status = matches!(input, Input::Connected);
        let mut fatal = None;
        for action in node.handle(crate::events::now_ms(), input) {
            match action {
                Action::Publish(msg) => publish(&client, &topics, id, msg).await,
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
                    log_event(&event);
                    events.emit(event);
                }
                Action::Fatal(reason) => fatal = Some(reason),
                Action::PublishStatus => force_status = true,
            }
        }
        if let Some(reason) = fatal {
            break Err(PeerError::Protocol(reason));
        }
        if online {
            status.send(&beacon, node.status(crate::events::now_ms()), &miner, force_status).await;
        }
    };

    miner.stop();
    if connected_once {
        if result.is_ok() {
            // A clean goodbye, so the room does not wait for the keepalive to notice, and our
            // status marked offline (the DISCONNECT below discards the will that would say so).
            publish(&client, &topics, id, Node::farewell()).await;
            // A retained status marked offline replaces the online one. Never an empty publish to
            // clear it: rumqttd deletes a retained message on an empty publish *without* RETAIN,
            // which MQTT says must not touch it.
            let offline = status.fill(node.offline_status(crate::events::now_ms()), &miner, Instant::now());
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
    info!(height = node.chain().height(), "peer stopped");
    result
}

async fn publish(client: &AsyncClient, topics: &Topics, id: PeerId, msg: Message) {
    let topic = topics.topic(msg.channel()).to_string();
    let payload = protocol::encode(&Envelope::new(id, msg));
    // QoS 1 everywhere: every message is idempotent, and QoS 0 may be dropped under load. Published
    // at QoS 1 to QoS 1 subscriptions, so delivered at QoS 1 by any broker: we never count on
    // rumqttd delivering a QoS 0 publish at QoS 1 to a QoS 1 subscriber (MQTT says the lower wins).
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, payload).await {
        warn!(error = %e, "publish failed");
    }
}

/// Decodes a delivery on `topic` (a protocol topic or a status topic) into an input for the node;
/// anything else, or anything that does not decode, is counted in `drops` and gives `None`.
fn decode_input(topics: &Topics, topic: &str, payload: &[u8], limit: usize, drops: &mut DropLog) -> Option<Input> {
    let decoded = if let Some(peer) = topics.status_peer(topic) {
        Status::decode(payload, peer).map(Input::Status)
    } else if let Some(channel) = topics.channel(topic) {
        protocol::decode(payload, channel, limit).map(Input::Message)
    } else {
        drops.count("unexpected_topic", || format!("message on {topic}"));
        return None;
    };
    decoded.map_err(|e| drops.count(e.reason(), || format!("on {topic}: {e}"))).ok()
}

/// The MQTT client id of process `incarnation` of peer `id`: unique per process (two processes
/// started with one peer id must not take over each other's session at the broker; the protocol
/// tells them apart instead), and within what MQTT 3.1.1 obliges every broker to accept — 1 to 23
/// characters from 0-9a-zA-Z — rather than what rumqttd and Mosquitto also allow. 52 random bits
/// of the incarnation keep it unique.
pub fn mqtt_client_id(id: PeerId, incarnation: u64) -> String {
    format!("h{id:08x}{:014x}", incarnation & ((1 << 52) - 1))
}

/// How long a controller may stay silent before its peers take it for gone: well over its
/// once-a-second status, and over the 1.5 x keepalive after which its will would have come.
pub fn controller_silence_ms(keepalive_s: u64) -> u64 {
    (3 * keepalive_s).max(5) * 1000
}

/// The MQTT client id of the status beacon of process `incarnation` of peer `id` (see
/// [`mqtt_client_id`]).
pub fn beacon_client_id(id: PeerId, incarnation: u64) -> String {
    format!("s{id:08x}{:014x}", incarnation & ((1 << 52) - 1))
}

/// The MQTT options of one of the peer's connections.
pub(crate) fn mqtt_options(cfg: &PeerConfig, client_id: String, will: Option<LastWill>) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    options
        // Never 0 (the config allows 1..=3600): rumqttd refuses a keepalive of 0, which MQTT allows
        // (and rumqttc panics below 1 s). Any broker then sends our will 1.5 x keepalive after we
        // fall silent.
        .set_keep_alive(Duration::from_secs(cfg.keepalive_s))
        // A clean session on every connection: nothing is expected to outlive a reconnect or a
        // broker restart (rumqttd keeps sessions in memory only, Mosquitto may persist them). On
        // every CONNACK we subscribe again, the node announces itself and repeats what the room
        // waits on, and our retained status is sent again.
        .set_clean_session(true)
        // Headroom over the payload for the MQTT header and topic. A larger packet would make
        // rumqttc drop our connection, so the broker must refuse such packets itself (rumqttd's
        // max_payload_size, Mosquitto's message_size_limit or max_packet_size): a deployment
        // requirement on any broker, not a rumqttd habit.
        .set_max_packet_size(cfg.max_payload + 1024, cfg.max_payload + 1024);
    if let Some(will) = will {
        options.set_last_will(will);
    }
    if let Some(user) = &cfg.username {
        options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    options
}

/// A client and its event loop, with Nagle's algorithm off: rumqttc leaves it on, and every small
/// publish would wait for the broker's delayed ACK (~40 ms), which alone capped the room at ~20
/// blocks/s.
pub(crate) fn connect(options: MqttOptions, capacity: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Publishes this peer's retained status when its [`Schedule`] says so.
pub(crate) struct StatusPublisher {
    /// `<prefix>/status/<id>`.
    pub(crate) topic: String,
    pub(crate) threads: u16,
    pub(crate) schedule: Schedule,
}

impl StatusPublisher {
    /// Publishes `status` (the node's, built after every input: no field costs more than a map
    /// lookup) if it is due, or at once if `force`.
    pub(crate) async fn send(&mut self, client: &AsyncClient, status: Status, miner: &Miner, force: bool) {
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
    pub(crate) fn fill(&mut self, mut status: Status, miner: &Miner, now: Instant) -> Status {
        let hashes = miner.hashes();
        status.hash_rate = self.schedule.hash_rate(hashes, now);
        status.hashes = hashes;
        status.threads = self.threads;
        status
    }
}

/// Consecutive first-connection attempts closed before a CONNACK after which the login is taken
/// as refused. More than one, so a broker that drops one connection while it restarts is not
/// mistaken for a refusal; few, so a refused peer says so in well under a second.
const CLOSED_BEFORE_CONNACK_LIMIT: u32 = 3;

/// What [`poll_network`] needs to judge the first connection.
#[derive(Clone)]
pub(crate) struct FirstConnect {
    /// host:port, for messages.
    pub(crate) addr: String,
    /// Seconds to keep trying.
    pub(crate) timeout_s: u64,
    /// Whether a user name (and password) is sent.
    pub(crate) credentials: bool,
}

/// True if the error means the TCP connection was made and then closed before the broker's
/// CONNACK: what rumqttd does to a bad or missing login. A broker that is not listening yet
/// gives `ConnectionRefused` on the TCP connect instead.
fn closed_before_connack(error: &ConnectionError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let closed =
        |e: &std::io::Error| matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted);
    match error {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(StateError::Io(e) | StateError::Deserialization(rumqttc::Error::Io(e))) => closed(e),
        ConnectionError::Io(e) => closed(e),
        _ => false,
    }
}

/// Polls rumqttc's event loop for ever, reconnecting with backoff after errors.
///
/// Until the first CONNACK it gives up with a fatal error: at once on a refusing CONNACK code,
/// after [`CLOSED_BEFORE_CONNACK_LIMIT`] attempts in a row closed before any CONNACK (a refused
/// login at rumqttd), or when the connect timeout passes.
pub(crate) async fn poll_network(
    mut eventloop: rumqttc::EventLoop,
    tx: mpsc::Sender<Net>,
    stop: CancellationToken,
    first: FirstConnect,
) {
    let FirstConnect { addr, timeout_s: connect_timeout_s, credentials } = first;
    let started = Instant::now();
    let mut connected_once = false;
    let mut closed_early = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                connected_once = true;
                backoff = Duration::from_millis(50);
                if tx.send(Net::Connected).await.is_err() {
                    return;
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let topic = p.topic;
                if tx.send(Net::Publish { topic, payload: p.payload, retain: p.retain }).await.is_err() {
                    return;
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => {
                let _ = tx.send(Net::Fatal(PeerError::Refused { addr, code: format!("{code:?}") })).await;
                return;
            }
            Err(e) => {
                let reason = e.to_string();
                if !connected_once {
                    closed_early = if closed_before_connack(&e) { closed_early + 1 } else { 0 };
                    let timed_out = started.elapsed() > Duration::from_secs(connect_timeout_s);
                    if closed_early >= CLOSED_BEFORE_CONNACK_LIMIT || (timed_out && closed_early > 0) {
                        let _ = tx.send(Net::Fatal(PeerError::LoginRejected { addr, credentials })).await;
                        return;
                    }
                    if timed_out {
                        let fatal = PeerError::Unreachable { addr, secs: connect_timeout_s, reason };
                        let _ = tx.send(Net::Fatal(fatal)).await;
                        return;
                    }
                }
                if connected_once {
                    warn!(error = %reason, retry_ms = backoff.as_millis() as u64, "broker connection lost; reconnecting");
                    if tx.send(Net::Lost(reason)).await.is_err() {
                        return;
                    }
                } else {
                    debug!(error = %reason, "broker not reachable yet");
                }
                // Backoff between reconnection attempts, capped so a restarted broker is found fast.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Time spent mining, for the hash-rate totals of [`Event::MiningStopped`].
#[derive(Default)]
pub(crate) struct MiningClock {
    current: Option<(u64, Instant)>,
    total: Duration,
}

impl MiningClock {
    /// Records that mining now works on `tx` (or nothing); returns the event for the job that ended.
    pub(crate) fn switch(&mut self, tx: Option<u64>, total_hashes: u64) -> Option<Event> {
        let ended = self.current.take().map(|(done, since)| {
            self.total += since.elapsed();
            Event::MiningStopped { tx: done, total_hashes, total_mining_ms: self.total.as_millis() as u64 }
        });
        self.current = tx.map(|t| (t, Instant::now()));
        ended
    }
}

/// Counts dropped payloads per reason and logs each reason at most once a second, so a flood of
/// garbage does not become a flood of log lines.
#[derive(Default)]
pub(crate) struct DropLog {
    counts: BTreeMap<String, (u64, u64, Option<Instant>)>,
}

impl DropLog {
    /// Counts one drop; returns the running total when this one is logged.
    pub(crate) fn count(&mut self, reason: &str, detail: impl FnOnce() -> String) -> Option<u64> {
        let entry = self.counts.entry(reason.to_string()).or_insert((0, 0, None));
        entry.0 += 1;
        entry.1 += 1;
        if entry.2.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            warn!(reason, total = entry.0, since_last_log = entry.1, "dropped message: {}", detail());
            entry.1 = 0;
            entry.2 = Some(Instant::now());
            return Some(entry.0);
        }
        None
    }
}

pub(crate) fn log_event(event: &Event) {
    match event {
        Event::SolutionRejected { .. }
        | Event::ChainTruncated { .. }
        | Event::BlockAccepted { .. }
        | Event::LeaderElected { .. }
        | Event::ChallengeIssued { .. } => info!("{}", crate::events::describe(event)),
        _ => debug!("{}", crate::events::describe(event)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_connection_closed_before_connack_is_told_apart_from_no_broker() {
        let closed = [
            ConnectionError::MqttState(StateError::ConnectionAborted),
            ConnectionError::MqttState(StateError::Deserialization(rumqttc::Error::Io(Error::from(
                ErrorKind::ConnectionReset,
            )))),
            ConnectionError::Io(Error::from(ErrorKind::BrokenPipe)),
        ];
        assert!(closed.iter().all(closed_before_connack));
        let other = [
            ConnectionError::Io(Error::from(ErrorKind::ConnectionRefused)),
            ConnectionError::NetworkTimeout,
            ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::BadUserNamePassword),
        ];
        assert!(!other.iter().any(closed_before_connack));
    }

    #[test]
    fn client_ids_are_what_every_mqtt_broker_must_accept_and_differ_per_process() {
        for (id, incarnation) in [(1, 0), (u32::MAX, u64::MAX), (7, 1 << 63), (123_456, 0xdead_beef_f00d)] {
            for cid in [mqtt_client_id(id, incarnation), beacon_client_id(id, incarnation)] {
                assert_eq!(cid.len(), 23, "{cid}");
                assert!(cid.bytes().all(|b| b.is_ascii_alphanumeric()), "{cid}");
            }
            assert_ne!(mqtt_client_id(id, incarnation), beacon_client_id(id, incarnation));
        }
        assert_ne!(mqtt_client_id(7, 1), mqtt_client_id(7, 2));
        assert_ne!(mqtt_client_id(7, 1), mqtt_client_id(8, 1));
    }

    #[test]
    fn login_rejection_is_one_line_with_a_hint() {
        let with = PeerError::LoginRejected { addr: "h:1".into(), credentials: true }.to_string();
        assert_eq!(
            with,
            "the broker at h:1 closed the connection before accepting the login (wrong user name or password?)"
        );
        let without = PeerError::LoginRejected { addr: "h:1".into(), credentials: false }.to_string();
        assert!(without.contains("--username and HASHVOTE_PASSWORD") && !without.contains('\n'), "{without}");
    }
}
