//! A silent MQTT client that follows a room: it subscribes to the room's topics and statuses
//! and turns each payload into an [`Observed`] for the [`RoomView`](crate::view::RoomView). It
//! publishes nothing, so it works against any broker and from any machine that can reach it;
//! the dashboard of `launcher` and `launcher watch` are both built on it. Given the nodes of a
//! broker cluster, it connects to the first and moves on to the next when its node is lost (the
//! [`Link`] does, as for the peers). Like the peers, it relies on nothing that only the embedded
//! broker (rumqttd) does (see "Broker independence" in docs/PROTOCOL.md).

use std::time::Duration;

use rumqttc::{MqttOptions, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use hashvote_core::room;
use peer::protocol::Topics;
use peer::status::{self, Status};
use peer::transport::{FirstConnect, Link, Net};

use crate::cli::Brokers;
use crate::view::Observed;

/// Payloads larger than this are dropped unread (the peers' own limit, see config/peer.toml).
const MAX_PAYLOAD: usize = 64 * 1024;

/// Where the room is and how to log in.
#[derive(Debug, Clone)]
pub struct Target {
    /// The broker, or the nodes of a broker cluster.
    pub brokers: Brokers,
    /// The room's topic prefix (`sd` by default).
    pub prefix: String,
    /// User name and password, if the broker wants a login.
    pub login: Option<(String, String)>,
}

/// What the observer reports.
#[derive(Debug)]
pub enum Seen {
    /// Connected (again) and subscribed, to the node at this host:port.
    Connected(String),
    /// The connection broke; the observer keeps reconnecting.
    Lost(String),
    /// A decoded, valid payload.
    Observed(Observed),
    /// A payload that did not decode (garbage, another version, a stranger's topic).
    Dropped {
        /// The topic it came on.
        topic: String,
        /// Why (a stable short reason, as the peers count them).
        reason: &'static str,
    },
    /// The broker refused the login; the observer has stopped.
    Refused(String),
}

/// Decodes one payload seen on `topic` under `topics`/`prefix`.
pub fn decode(topics: &Topics, prefix: &str, topic: &str, payload: &[u8]) -> Result<Observed, &'static str> {
    if let Some(channel) = topics.channel(topic) {
        return room::decode(payload, channel.into(), MAX_PAYLOAD).map(Observed::Message).map_err(|e| e.reason());
    }
    if let Some(id) = status::topic_peer(prefix, topic) {
        if payload.is_empty() {
            // A cleared retained status: nothing to show. Peers never clear theirs; only a
            // retained empty publish does so in MQTT (rumqttd also takes a non-retained one).
            return Err("cleared_status");
        }
        return Status::decode(payload, id).map(Observed::Status).map_err(|e| e.reason());
    }
    Err(peer::protocol::DropReason::UnexpectedTopic.as_str())
}

/// Starts the observer; it runs until `stop` is cancelled or the login is refused.
pub fn spawn(target: Target, stop: CancellationToken) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(run(target, tx, stop));
    rx
}

async fn run(target: Target, tx: mpsc::Sender<Seen>, stop: CancellationToken) {
    // 23 characters from 0-9a-z, what MQTT 3.1.1 obliges every broker to accept.
    let client_id = format!("hvwatch{:016x}", rand::random::<u64>());
    let options = target.brokers.nodes().iter().map(|(host, port)| options(&client_id, host, *port, &target)).collect();
    // No first-connect timeout: a watcher waits for its broker for ever, saying so meanwhile.
    let first = FirstConnect { addr: target.brokers.to_string(), timeout_s: None, credentials: target.login.is_some() };
    let mut link = Link::open(options, 64, first);
    let topics = Topics::new(&target.prefix);
    loop {
        let net = tokio::select! {
            () = stop.cancelled() => break,
            net = link.recv() => net,
        };
        let seen = match net {
            None => break,
            Some(Net::Connected(node)) => {
                // Protocol topics at QoS 1, as the peers publish (without counting on rumqttd's
                // upgrade of QoS 0 publishes). The statuses at QoS 0: rumqttd hands a QoS 1
                // subscriber at most `max_inflight_count` (100) retained messages and drops the
                // rest, and a room's prefix keeps the retained offline status of every peer that
                // ever ran there. A lost status is replaced within a second anyway.
                let mut filters: Vec<(String, QoS)> =
                    topics.all().into_iter().map(|t| (t.to_string(), QoS::AtLeastOnce)).collect();
                filters.push((topics.status.clone(), QoS::AtMostOnce));
                if link.subscribe_with(filters).await {
                    Seen::Connected(node)
                } else {
                    Seen::Lost("cannot subscribe".to_string())
                }
            }
            Some(Net::Publish { topic, payload }) => match decode(&topics, &target.prefix, &topic, &payload) {
                Ok(observed) => Seen::Observed(observed),
                Err(reason) => Seen::Dropped { topic, reason },
            },
            // The node connected to last: the one lost (the link already tries the next).
            Some(Net::Lost(reason)) => Seen::Lost(format!("{}: {reason}", link.addr())),
            Some(Net::Fatal(e)) => {
                let _ = tx.send(Seen::Refused(e.to_string())).await;
                break;
            }
        };
        if tx.send(seen).await.is_err() {
            break;
        }
    }
    link.close().await;
}

/// The options of the observer's connection to the node at `host`:`port`.
fn options(client_id: &str, host: &str, port: u16, target: &Target) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options
        // Not 0: rumqttd refuses a keepalive of 0, which MQTT allows.
        .set_keep_alive(Duration::from_secs(5))
        // Clean: no session to count on after a reconnect, a broker restart or a move to another
        // node (rumqttd keeps them in memory only); we subscribe again on every CONNACK.
        .set_clean_session(true)
        .set_max_packet_size(MAX_PAYLOAD + 1024, MAX_PAYLOAD + 1024);
    if let Some((user, password)) = &target.login {
        options.set_credentials(user.clone(), password.clone());
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_decoded_by_topic_and_garbage_is_named() {
        let topics = Topics::new("sd");
        let leave = room::encode(&room::Envelope::new(7, room::Msg::Leave { incarnation: 1 }));
        assert!(matches!(decode(&topics, "sd", "sd/init", &leave), Ok(Observed::Message(e)) if e.from == 7));
        assert_eq!(decode(&topics, "sd", "sd/voting", &leave).unwrap_err(), "wrong_topic");
        assert_eq!(decode(&topics, "sd", "sd/init", &[room::VERSION, 0xff, 0xff]).unwrap_err(), "malformed");
        // Another wire version (wire version 1's first byte) is named as such.
        assert_eq!(decode(&topics, "sd", "sd/init", b"\x01\x07\x01").unwrap_err(), "bad_version");
        // A message on a status topic is not taken for a status: dropped by the status decoder
        // (as another version, or as malformed while both formats share a version number).
        let reason = decode(&topics, "sd", "sd/status/7", &leave).unwrap_err();
        assert!(["bad_version", "malformed"].contains(&reason), "{reason}");
        assert_eq!(decode(&topics, "sd", "sd/status/7", &[status::VERSION, 0xff, 0xff]).unwrap_err(), "malformed");
        assert_eq!(decode(&topics, "sd", "sd/status/7", b"").unwrap_err(), "cleared_status");
        assert_eq!(decode(&topics, "sd", "sd/other", &leave).unwrap_err(), "unexpected_topic");
    }
}
