//! The MQTT plumbing of every client in the workspace: the peer's connection options and client
//! ids, and the [`Link`], one connection with its network task ([`poll_network`]) that polls
//! rumqttc's event loop and reconnects with backoff, reporting [`Net`]s. The peer's drivers
//! ([`crate::driver`]) and the launcher's observer read their connections through it.
//!
//! rumqttc's event loop runs in its own task and is polled without pause (it only reconnects while
//! polled, and a blocked poll would stall `publish`). The drivers renew their subscriptions on
//! every CONNACK because rumqttc does not restore them after a reconnect.
//!
//! Nothing here depends on the embedded broker's (rumqttd's) departures from MQTT 3.1.1; each place
//! that is careful about one says so ("Broker independence" in docs/PROTOCOL.md lists them), and
//! the fault and flood system tests run on rumqttd and on Mosquitto.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS, StateError, SubscribeFilter,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::PeerConfig;
use crate::protocol::PeerId;

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
    /// rumqttd refuses a bad or missing login this way, without a return code, and a connection
    /// beyond its `max_connections` too.
    #[error(
        "the broker at {addr} closed the connection before accepting the login ({}; or is it full?)",
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

/// What a [`Link`]'s network task reports.
#[derive(Debug)]
pub enum Net {
    /// A CONNACK from the broker at this host:port: connected, the first time or again (maybe to
    /// another broker of the list). Nothing is subscribed yet.
    Connected(String),
    /// A message on a subscribed topic.
    Publish {
        /// Its topic.
        topic: String,
        /// Its payload, unread.
        payload: bytes::Bytes,
    },
    /// The connection broke (why); the task reconnects.
    Lost(String),
    /// The task gave up: the broker refused us, or never answered the first time.
    Fatal(PeerError),
}

/// The messages through one connection since it opened, counted by its network task as they
/// cross the wire (a publish sent again after a reconnection counts again).
#[derive(Debug, Default)]
pub struct Traffic {
    published: AtomicU64,
    delivered: AtomicU64,
}

impl Traffic {
    /// Messages published to the broker.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Messages the broker delivered.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

/// One MQTT connection: its client, and the task that polls its event loop for ever (see
/// [`poll_network`]), reconnecting after every loss.
#[derive(Debug)]
pub struct Link {
    client: AsyncClient,
    traffic: Arc<Traffic>,
    rx: mpsc::Receiver<Net>,
    task: JoinHandle<()>,
    stop: CancellationToken,
    addr: String,
    connected_once: bool,
}

impl Link {
    /// Starts connecting with the first of `options`, one per broker of a cluster (`capacity`
    /// requests may wait in rumqttc's channel); a lost connection moves on to the next broker.
    /// The first [`Net`] says how it went. Needs a tokio runtime.
    ///
    /// # Panics
    /// If `options` is empty.
    pub fn open(options: Vec<MqttOptions>, capacity: usize, first: FirstConnect) -> Self {
        let addr = first.addr.clone();
        let (client, eventloop) = connect(options[0].clone(), capacity);
        let (tx, rx) = mpsc::channel(capacity.saturating_mul(4).max(16));
        let stop = CancellationToken::new();
        let traffic = Arc::new(Traffic::default());
        let task = tokio::spawn(poll_network(eventloop, options, tx, stop.clone(), first, Arc::clone(&traffic)));
        Self { client, traffic, rx, task, stop, addr, connected_once: false }
    }

    /// The counts of messages through this connection, kept up to date by its network task.
    pub fn traffic(&self) -> Arc<Traffic> {
        Arc::clone(&self.traffic)
    }

    /// The client, to publish with.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// The broker's host:port (the broker connected to last, once connected).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether a CONNACK ever came.
    pub fn connected_once(&self) -> bool {
        self.connected_once
    }

    /// The next report of the network task; `None` once it stopped.
    pub async fn recv(&mut self) -> Option<Net> {
        let net = self.rx.recv().await;
        if let Some(Net::Connected(broker)) = &net {
            debug!(%broker, first = !self.connected_once, "connected");
            self.addr.clone_from(broker);
            self.connected_once = true;
        }
        net
    }

    /// Subscribes to `topics` at `qos`; false (with a warning) if rumqttc refused the request.
    pub async fn subscribe(&self, topics: Vec<String>, qos: QoS) -> bool {
        self.subscribe_with(topics.into_iter().map(|t| (t, qos))).await
    }

    /// Subscribes to each topic at its QoS (see [`Link::subscribe`]).
    pub async fn subscribe_with(&self, topics: impl IntoIterator<Item = (String, QoS)>) -> bool {
        let filters = topics.into_iter().map(|(t, qos)| SubscribeFilter::new(t, qos));
        match self.client.subscribe_many(filters).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "subscribe failed");
                false
            }
        }
    }

    /// Publishes `payload` on `topic` (see [`publish`]).
    pub async fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        publish(&self.client, topic, retain, payload).await;
    }

    /// Closes the connection: a DISCONNECT if it ever connected (which also discards its Last
    /// Will), given 2 s to go out, then the network task stops.
    pub async fn close(&mut self) {
        if self.connected_once {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
        }
        self.stop.cancel();
    }
}

/// The MQTT client id of process `incarnation` of peer `id`, less its last character, which
/// names the broker node (see [`mqtt_options`]): unique per process (two processes started with
/// one peer id must not take over each other's session at the broker; the protocol tells them
/// apart instead), and within what MQTT 3.1.1 obliges every broker to accept — 1 to 23
/// characters from 0-9a-zA-Z — rather than what rumqttd and Mosquitto also allow. 52 random bits
/// of the incarnation keep it unique.
pub fn mqtt_client_id(id: PeerId, incarnation: u64) -> String {
    format!("h{id:08x}{:013x}", incarnation & ((1 << 52) - 1))
}

/// The MQTT client id of the status beacon of process `incarnation` of peer `id` (see
/// [`mqtt_client_id`]).
pub fn beacon_client_id(id: PeerId, incarnation: u64) -> String {
    format!("s{id:08x}{:013x}", incarnation & ((1 << 52) - 1))
}

/// The MQTT options of one of the peer's connections, one per broker of `cfg`'s list, starting
/// at the broker `spread` picks (so that the peers of a room spread over a cluster's nodes).
///
/// The client id is `client_id` followed by the node's place in the list (0-9a-z): one id per
/// node. A RabbitMQ cluster keeps a clean session's subscription queue, named after its client
/// id, on the client's node; when that node dies the queue stays behind, down, and the same id
/// cannot subscribe on another node until an operator forgets the dead node (measured on 3.10).
pub(crate) fn mqtt_options(cfg: &PeerConfig, client_id: &str, will: Option<LastWill>, spread: u32) -> Vec<MqttOptions> {
    let brokers = cfg.brokers().unwrap_or_else(|_| vec![(cfg.host.clone(), cfg.port)]);
    let first = spread as usize % brokers.len().max(1);
    let node = |i: usize| char::from_digit((i % 36) as u32, 36).expect("below 36");
    let options: Vec<MqttOptions> = (brokers.iter().enumerate())
        .map(|(i, (host, port))| broker_options(cfg, &format!("{client_id}{}", node(i)), will.clone(), host, *port))
        .collect();
    options[first..].iter().chain(&options[..first]).cloned().collect()
}

/// The MQTT options of one connection to the broker at `host`:`port`.
fn broker_options(cfg: &PeerConfig, client_id: &str, will: Option<LastWill>, host: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
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
/// blocks/s. The broker's CONNACK may take the keepalive and 5 s more (rumqttc's 5 s alone):
/// with 300 peers starting on two cores, connections given up after 5 s were opened again under
/// the same client id, and the broker took the new one over the old, publishing a live peer's will.
fn connect(options: MqttOptions, capacity: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let patience = options.keep_alive().as_secs() + 5;
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(patience);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Consecutive first-connection attempts closed before a CONNACK after which the login is taken
/// as refused. More than one, so a broker that drops one connection while it restarts is not
/// mistaken for a refusal; few, so a refused peer says so in well under a second.
const CLOSED_BEFORE_CONNACK_LIMIT: u32 = 3;

/// Publishes `payload` on `topic` at QoS 1; a failure (the request channel closed) is logged.
///
/// QoS 1 everywhere: every message is idempotent, and the broker acknowledges each. A QoS 1
/// subscriber (the lab wire's peers, the watcher) is delivered at QoS 1 by any broker: nothing
/// counts on rumqttd delivering a QoS 0 publish at QoS 1 to a QoS 1 subscriber (MQTT says the
/// lower wins). The room's peers subscribe at QoS 0 on purpose, so they are delivered at QoS 0
/// (see the room driver's `subscription_qos`).
pub(crate) async fn publish(client: &AsyncClient, topic: String, retain: bool, payload: Vec<u8>) {
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, retain, payload).await {
        warn!(error = %e, "publish failed");
    }
}

/// What [`poll_network`] needs to judge the first connection.
#[derive(Debug, Clone)]
pub struct FirstConnect {
    /// host:port, for messages.
    pub addr: String,
    /// Seconds to keep trying, or `None`: for ever, every failure reported as [`Net::Lost`].
    pub timeout_s: Option<u64>,
    /// Whether a user name (and password) is sent.
    pub credentials: bool,
}

impl FirstConnect {
    /// What a peer configured with `cfg` waits for.
    pub(crate) fn of(cfg: &PeerConfig) -> Self {
        Self {
            addr: match cfg.brokers() {
                Ok(list) => list.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(", "),
                Err(_) => format!("{}:{}", cfg.host, cfg.port),
            },
            timeout_s: Some(cfg.connect_timeout_s),
            credentials: cfg.username.is_some(),
        }
    }
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

/// How many connection attempts of this process may wait for their CONNACK at once. A process
/// running many peers (`--instances`) opened all their connections at once: rumqttd listens
/// with a backlog of 128 and accepts about one connection per millisecond at best, so most of
/// 2,000 connections from ten processes overflowed its queue; the kernel dropped them and they
/// came in over the next 50 s, in waves of SYN retries, some given up on after the connection
/// timeout and opened again under the same client id, which made the broker drop the live one
/// (and publish its will) in the middle of the first election. A peer alone holds two.
const CONNECTING_AT_ONCE: usize = 8;

static CONNECTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONNECTING_AT_ONCE);

/// Polls rumqttc's event loop for ever, reconnecting with backoff after errors.
///
/// It gives up with a fatal error at once on a refusing CONNACK code. With a first-connect
/// timeout, until the first CONNACK it also gives up after [`CLOSED_BEFORE_CONNACK_LIMIT`]
/// attempts in a row closed before any CONNACK (a refused login at rumqttd), or when the timeout
/// passes; and it reports nothing but that meanwhile.
async fn poll_network(
    mut eventloop: rumqttc::EventLoop,
    brokers: Vec<MqttOptions>,
    tx: mpsc::Sender<Net>,
    stop: CancellationToken,
    first: FirstConnect,
    traffic: Arc<Traffic>,
) {
    let FirstConnect { addr, timeout_s: connect_timeout_s, credentials } = first;
    let started = Instant::now();
    let mut connected_once = false;
    let mut closed_early = 0;
    let mut backoff = Duration::from_millis(50);
    let mut broker = 0;
    let mut up = false;
    loop {
        // A connection attempt (TCP, CONNECT, CONNACK: all within one poll) holds one of the
        // process's few permits; an established connection holds none.
        let permit = if up {
            None
        } else {
            tokio::select! {
                () = stop.cancelled() => return,
                p = CONNECTING.acquire() => p.ok(),
            }
        };
        let event = tokio::select! {
            () = stop.cancelled() => return,
            e = eventloop.poll() => e,
        };
        drop(permit);
        up = matches!(event, Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) || (up && event.is_ok());
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                connected_once = true;
                backoff = Duration::from_millis(50);
                let (host, port) = eventloop.mqtt_options.broker_address();
                if tx.send(Net::Connected(format!("{host}:{port}"))).await.is_err() {
                    return;
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                traffic.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                traffic.delivered.fetch_add(1, Ordering::Relaxed);
                if tx.send(Net::Publish { topic: p.topic, payload: p.payload }).await.is_err() {
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
                let patient = connected_once || connect_timeout_s.is_none();
                if let (false, Some(connect_timeout_s)) = (connected_once, connect_timeout_s) {
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
                if patient {
                    warn!(error = %reason, retry_ms = backoff.as_millis() as u64, "broker connection lost; reconnecting");
                    if tx.send(Net::Lost(reason)).await.is_err() {
                        return;
                    }
                } else {
                    debug!(error = %reason, "broker not reachable yet");
                }
                // The next broker of the list, if there is one: a lost node's peers move to the
                // others of its cluster (rumqttc reconnects to the options it holds).
                if brokers.len() > 1 {
                    broker = (broker + 1) % brokers.len();
                    eventloop.mqtt_options = brokers[broker].clone();
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
        let hosts = (0..40).map(|p| format!("n:{}", p + 1)).collect::<Vec<_>>().join(",");
        let cfg = PeerConfig { host: hosts, ..PeerConfig::load(None).expect("the embedded defaults") };
        for (id, incarnation) in [(1, 0), (u32::MAX, u64::MAX), (7, 1 << 63), (123_456, 0xdead_beef_f00d)] {
            for cid in [mqtt_client_id(id, incarnation), beacon_client_id(id, incarnation)] {
                // One id per node of a cluster, each within MQTT 3.1.1's 23 characters.
                let ids: Vec<String> =
                    mqtt_options(&cfg, &cid, None, id).iter().map(|o| o.client_id().to_string()).collect();
                assert_eq!(ids.iter().collect::<std::collections::BTreeSet<_>>().len(), 36, "{ids:?}");
                for cid in ids {
                    assert_eq!(cid.len(), 23, "{cid}");
                    assert!(cid.bytes().all(|b| b.is_ascii_alphanumeric()), "{cid}");
                }
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
            "the broker at h:1 closed the connection before accepting the login (wrong user name or password?; or is it full?)"
        );
        let without = PeerError::LoginRejected { addr: "h:1".into(), credentials: false }.to_string();
        assert!(without.contains("--username and HASHVOTE_PASSWORD") && !without.contains('\n'), "{without}");
    }
}
