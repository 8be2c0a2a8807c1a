//! A peer's status: a small retained message on `<prefix>/status/<id>` that any MQTT client can
//! follow (the launcher's dashboard, `launcher watch` on another machine, `mosquitto_sub` piped
//! into `launcher decode`).
//!
//! Each peer republishes its status on every connection, when its role, term, controller or open
//! transaction changes (the peer's `status::Schedule`) and once a second otherwise (with its hash rate), always
//! retained, so a watcher that subscribes late gets the latest status of every peer at once. The peer's Last Will is its status with
//! [`Role::Offline`], also retained: a peer that dies is shown offline.
//!
//! The payload is postcard, like the protocol's messages, and decoded the same careful way: size
//! limit first, then the version, then validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{DecodeError, PeerId, Term, TxId};

/// The version of the status payload (its first byte), checked before anything else.
pub const VERSION: u8 = 3;

/// Largest encoded status accepted; a real one is well under 100 bytes.
pub const MAX_STATUS_BYTES: usize = 256;

/// A status goes out at least this often, with the hash rate measured over the interval.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Least time between two statuses for a change of open transaction alone. Blocks can come every
/// few ms: one status per block and peer would cost a watcher of a large room more than the
/// mining protocol costs the peers. Role, term and controller changes go out at once.
pub const STATUS_MIN_GAP: Duration = Duration::from_millis(100);

/// What a peer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Connected, waiting to know enough peers for an election.
    Joining,
    /// Voting in an election (no controller known for the current term yet).
    Electing,
    /// The elected controller: issues challenges and judges solutions.
    Controller,
    /// A miner of the current controller's challenges.
    Miner,
    /// Gone: published by the peer when it stops, or by the broker as its Last Will.
    Offline,
}

impl Role {
    /// A short lowercase name for tables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Electing => "electing",
            Self::Controller => "controller",
            Self::Miner => "miner",
            Self::Offline => "offline",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One peer's status, as published on `<prefix>/status/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Payload version; always [`VERSION`] when encoded by this build.
    pub version: u8,
    /// The peer's client id (also the last level of the topic; the two must agree).
    pub id: PeerId,
    /// Random per process: tells a restarted peer apart from its previous run.
    pub incarnation: u64,
    /// What the peer is doing.
    pub role: Role,
    /// The highest term the peer has seen.
    pub term: Term,
    /// The controller of that term, if one is elected.
    pub controller: Option<PeerId>,
    /// Blocks in the peer's chain.
    pub height: u64,
    /// The open transaction the peer mines (or, as controller, has issued).
    pub tx: Option<TxId>,
    /// Difficulty of that transaction.
    pub difficulty: Option<u8>,
    /// Hashes per second over the last status interval (0 when not mining).
    pub hash_rate: u64,
    /// Hashes computed since the peer started.
    pub hashes: u64,
    /// Milliseconds spent mining since the peer started: `hashes` over it is the mean hash rate
    /// while mining.
    pub mining_ms: u64,
    /// Blocks of the peer's chain that it mined.
    pub blocks_won: u64,
    /// Messages the peer has published since it started (both of its connections, its statuses
    /// included), counted as they leave for the broker.
    pub published: u64,
    /// Messages the broker has delivered to the peer since it started.
    pub delivered: u64,
    /// Mining threads.
    pub threads: u16,
    /// The peer's clock (Unix ms) when it started.
    pub started_ms: u64,
    /// The peer's clock (Unix ms) when this status was published.
    pub at_ms: u64,
    /// Set while the peer has no controller and cannot reach a quorum of the room's voters (room
    /// protocol): the minority side of a split says so.
    pub waiting: Option<Waiting>,
}

/// A peer without a quorum: how far it is from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Waiting {
    /// Voters the peer heard from recently (itself included if it votes).
    pub reachable: u32,
    /// Voters a quorum needs.
    pub needed: u32,
    /// Voters in the room's configuration.
    pub voters: u32,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { reachable, needed, voters } = self;
        write!(f, "waiting for a quorum: {reachable} of {needed} needed reachable ({voters} voters)")
    }
}

impl Status {
    /// Uptime in ms at the time of publication.
    pub fn uptime_ms(&self) -> u64 {
        self.at_ms.saturating_sub(self.started_ms)
    }

    /// Encodes the status for the wire.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard serialization into a Vec is infallible")
    }

    /// Decodes and validates a status that arrived on the status topic of peer `topic_id`.
    pub fn decode(payload: &[u8], topic_id: PeerId) -> Result<Self, DecodeError> {
        if payload.len() > MAX_STATUS_BYTES {
            return Err(DecodeError::TooLarge { len: payload.len(), limit: MAX_STATUS_BYTES });
        }
        let (&version, _) = payload.split_first().ok_or_else(|| DecodeError::Malformed("empty payload".into()))?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let (status, rest): (Self, _) =
            postcard::take_from_bytes(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len()));
        }
        if status.id == 0 {
            return Err(DecodeError::Invalid("status of peer id 0"));
        }
        if status.id != topic_id {
            return Err(DecodeError::Invalid("status id differs from its topic"));
        }
        if status.controller == Some(0) {
            return Err(DecodeError::Invalid("status controller id 0"));
        }
        if let Some(w) = status.waiting
            && (w.reachable >= w.needed || w.needed > w.voters)
        {
            return Err(DecodeError::Invalid("status waiting for a quorum it has"));
        }
        Ok(status)
    }
}

/// The peer id named by a status topic `<prefix>/status/<id>`, if `topic` is one.
pub fn topic_peer(prefix: &str, topic: &str) -> Option<PeerId> {
    let id = topic.strip_prefix(prefix)?.strip_prefix("/status/")?;
    // Only canonical decimal: "007" or "+7" would be a second topic for one peer.
    if id.starts_with(['0', '+']) {
        return None;
    }
    id.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Status {
        Status {
            version: VERSION,
            id: 42,
            incarnation: 7,
            role: Role::Miner,
            term: 3,
            controller: Some(9),
            height: 12,
            tx: Some(12),
            difficulty: Some(20),
            hash_rate: 70_000_000,
            hashes: 1 << 40,
            mining_ms: 60_000,
            blocks_won: 4,
            published: 120,
            delivered: 340,
            threads: 2,
            started_ms: 1_000,
            at_ms: 5_000,
            waiting: None,
        }
    }

    #[test]
    fn a_status_round_trips_and_is_small() {
        let s = sample();
        let bytes = s.encode();
        assert!(bytes.len() < 64, "{} bytes", bytes.len());
        assert_eq!(Status::decode(&bytes, 42).unwrap(), s);
        assert_eq!(s.uptime_ms(), 4_000);
    }

    #[test]
    fn a_status_under_another_peers_topic_is_refused() {
        let bytes = sample().encode();
        assert_eq!(Status::decode(&bytes, 43).unwrap_err().reason(), "invalid_field");
        let zero = Status { id: 0, ..sample() }.encode();
        assert_eq!(Status::decode(&zero, 0).unwrap_err().reason(), "invalid_field");
    }

    #[test]
    fn a_peer_without_a_quorum_says_how_far_it_is() {
        let w = Waiting { reachable: 2, needed: 4, voters: 6 };
        let s = Status { role: Role::Electing, controller: None, waiting: Some(w), ..sample() };
        assert_eq!(Status::decode(&s.encode(), 42).unwrap(), s);
        assert_eq!(w.to_string(), "waiting for a quorum: 2 of 4 needed reachable (6 voters)");
        for bad in [Waiting { reachable: 4, ..w }, Waiting { voters: 3, ..w }] {
            let s = Status { controller: None, waiting: Some(bad), ..sample() };
            assert_eq!(Status::decode(&s.encode(), 42).unwrap_err().reason(), "invalid_field", "{bad:?}");
        }
        // The term's controller may be known, and gone: its survivors wait.
        let survivor = Status { waiting: Some(w), ..sample() };
        assert_eq!(Status::decode(&survivor.encode(), 42).unwrap(), survivor);
    }

    #[test]
    fn status_topics_name_their_peer() {
        assert_eq!(topic_peer("sd", "sd/status/42"), Some(42));
        for bad in ["sd/status/", "sd/status/042", "sd/status/+4", "sd/status/x", "sd/init", "sx/status/4"] {
            assert_eq!(topic_peer("sd", bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Status::decode(&bytes, 42);
        }

        #[test]
        fn truncated_statuses_are_refused(cut in 0usize..40) {
            let bytes = sample().encode();
            prop_assume!(cut < bytes.len());
            prop_assert!(Status::decode(&bytes[..cut], 42).is_err());
        }
    }
}
