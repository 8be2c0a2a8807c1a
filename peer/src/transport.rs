//! The MQTT glue: connects to the broker, turns packets into [`Input`]s for the [`Node`], and
//! carries out its [`Action`]s (publish, mine, log).
//!
//! rumqttc's event loop runs in its own task and is polled without pause (it only reconnects while
//! polled, and a blocked poll would stall `publish`). Subscriptions are renewed on every CONNACK
//! because rumqttc does not restore them after a reconnect.
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
use crate::status::{STATUS_MIN_GAP, Schedule, Status};

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
    Publish { topic: String, payload: bytes::Bytes },
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
    });
    let mut status = StatusPublisher {
        topic: topics.status_topic(id),
        threads: u16::try_from(threads).unwrap_or(u16::MAX),
        schedule: Schedule::default(),
    };
    let mut options = MqttOptions::new(format!("hashvote-{id}-{incarnation:016x}"), cfg.host.clone(), cfg.port);
    options
        .set_keep_alive(Duration::from_secs(cfg.keepalive_s))
        .set_clean_session(true)
        // Headroom over the payload for the MQTT header and topic.
        .set_max_packet_size(cfg.max_payload + 1024, cfg.max_payload + 1024)
        // Our status marked offline, retained: watchers see that we are gone, and the other peers
        // take it as our departure (the incarnation in it keeps a late will from removing a later
        // run of this peer). MQTT fixes a will at CONNECT, so its figures are those at start.
        .set_last_will(LastWill::new(
            &status.topic,
            Status { threads: status.threads, ..node.offline_status(crate::events::now_ms()) }.encode(),
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &cfg.username {
        options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // rumqttc leaves Nagle's algorithm on: every small publish would wait for the broker's delayed
    // ACK (~40 ms), which alone capped the room at ~20 blocks/s.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);

    let (net_tx, mut net_rx) = mpsc::channel(4096);
    let stop_net = CancellationToken::new();
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let first =
        FirstConnect { addr: addr.clone(), timeout_s: cfg.connect_timeout_s, credentials: cfg.username.is_some() };
    let net = tokio::spawn(poll_network(eventloop, net_tx, stop_net.clone(), first));

    let (found_tx, mut found_rx) = mpsc::unbounded_channel::<Found>();
    let miner = Miner::new(threads, move |f| {
        let _ = found_tx.send(f);
    });
    let mut drops = DropLog::default();
    let mut mining = MiningClock::default();
    let mut connected_once = false;
    // Whether the broker connection is up: statuses are not queued while it is down (rumqttc's
    // request channel would fill, and block us, during a long outage); the next CONNACK sends one.
    let mut online = false;
    // Catches up with statuses that changed within STATUS_MIN_GAP of the last one, and sends the
    // once-a-second status.
    let mut status_tick = tokio::time::interval(STATUS_MIN_GAP);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    let result = loop {
        let input = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            Some(found) = found_rx.recv() => Input::Mined(found),
            _ = status_tick.tick() => {
                if online {
                    status.send(&client, &node, &miner, false).await;
                }
                continue;
            }
            net = net_rx.recv() => match net {
                None => break Ok(()),
                Some(Net::Fatal(e)) => break Err(e),
                Some(Net::Lost(reason)) => {
                    online = false;
                    events.emit(Event::Disconnected { reason });
                    continue;
                }
                Some(Net::Connected) => {
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
                    online = true;
                    events.emit(Event::Connected { broker: addr.clone() });
                    Input::Connected
                }
                Some(Net::Publish { topic, payload }) => {
                    let Some(input) = decode_input(&topics, &topic, &payload, cfg.max_payload, &mut drops) else {
                        continue;
                    };
                    input
                }
            },
        };
        // Retained statuses are lost when rumqttd restarts: every connection sends ours again.
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
            status.send(&client, &node, &miner, force_status).await;
        }
    };

    miner.stop();
    if connected_once {
        if result.is_ok() {
            // A clean goodbye, so the room does not wait for the keepalive to notice, and our
            // status marked offline (the DISCONNECT below discards the will that would say so).
            publish(&client, &topics, id, Node::farewell()).await;
            let offline = status.fill(node.offline_status(crate::events::now_ms()), &miner, Instant::now());
            if let Err(e) = client.publish(&status.topic, QoS::AtLeastOnce, true, offline.encode()).await {
                warn!(error = %e, "publishing the offline status failed");
            }
        }
        // A DISCONNECT also discards our Last Will: a duplicate giving way must not announce
        // the departure of the peer whose id it shares.
        let _ = client.disconnect().await;
        // Give the event loop a moment to flush the goodbye and the DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_secs(2), net).await;
    }
    stop_net.cancel();
    events.emit(Event::Stopped);
    info!(height = node.chain().height(), "peer stopped");
    result
}

async fn publish(client: &AsyncClient, topics: &Topics, id: PeerId, msg: Message) {
    let topic = topics.topic(msg.channel()).to_string();
    let payload = protocol::encode(&Envelope::new(id, msg));
    // QoS 1 everywhere: every message is idempotent, and QoS 0 may be dropped under load.
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

/// Publishes this peer's retained status when its [`Schedule`] says so.
struct StatusPublisher {
    /// `<prefix>/status/<id>`.
    topic: String,
    threads: u16,
    schedule: Schedule,
}

impl StatusPublisher {
    /// Publishes the node's status if it is due, or at once if `force`.
    async fn send(&mut self, client: &AsyncClient, node: &Node, miner: &Miner, force: bool) {
        let now = Instant::now();
        // Cheap enough to build after every input: no field takes more than a map lookup.
        let status = node.status(crate::events::now_ms());
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

/// Consecutive first-connection attempts closed before a CONNACK after which the login is taken
/// as refused. More than one, so a broker that drops one connection while it restarts is not
/// mistaken for a refusal; few, so a refused peer says so in well under a second.
const CLOSED_BEFORE_CONNACK_LIMIT: u32 = 3;

/// What [`poll_network`] needs to judge the first connection.
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
                if tx.send(Net::Publish { topic, payload: p.payload }).await.is_err() {
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
