//! The MQTT plumbing the peer's drivers share: the connection options and client ids, the network
//! task that polls rumqttc's event loop and reconnects with backoff ([`poll_network`], reporting
//! [`Net`]s), the peer's errors ([`PeerError`]), and the drop log and mining clock each driver
//! keeps. The drivers are [`crate::room`] (the room protocol, the default) and
//! [`crate::lab::transport`] (the lab's JSON messages).
//!
//! rumqttc's event loop runs in its own task and is polled without pause (it only reconnects while
//! polled, and a blocked poll would stall `publish`). The drivers renew their subscriptions on
//! every CONNACK because rumqttc does not restore them after a reconnect.
//!
//! Nothing here depends on the embedded broker's (rumqttd's) departures from MQTT 3.1.1; each place
//! that is careful about one says so ("Broker independence" in docs/PROTOCOL.md lists them), and
//! the fault and flood system tests run on rumqttd and on Mosquitto.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event as MqttEvent, LastWill, MqttOptions, Packet, StateError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::PeerConfig;
use crate::events::Event;
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

/// The MQTT client id of process `incarnation` of peer `id`: unique per process (two processes
/// started with one peer id must not take over each other's session at the broker; the protocol
/// tells them apart instead), and within what MQTT 3.1.1 obliges every broker to accept — 1 to 23
/// characters from 0-9a-zA-Z — rather than what rumqttd and Mosquitto also allow. 52 random bits
/// of the incarnation keep it unique.
pub fn mqtt_client_id(id: PeerId, incarnation: u64) -> String {
    format!("h{id:08x}{:014x}", incarnation & ((1 << 52) - 1))
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
/// blocks/s. The broker's CONNACK may take the keepalive and 5 s more (rumqttc's 5 s alone):
/// with 300 peers starting on two cores, connections given up after 5 s were opened again under
/// the same client id, and the broker took the new one over the old, publishing a live peer's will.
pub(crate) fn connect(options: MqttOptions, capacity: usize) -> (AsyncClient, rumqttc::EventLoop) {
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
