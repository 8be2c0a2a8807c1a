//! What the wire formats share: the room's topics, ids, blocks, challenges and results, and the
//! careful first half of decoding a postcard payload ([`decode_bytes`]).
//!
//! The room protocol's messages and their codec are in [`crate::room`] (its `msg` module), the
//! lab's JSON messages in [`crate::lab::wire`]. Decoding is bounded by a size limit and followed by
//! validation, so nothing that comes off the network reaches the state machines unchecked.

use serde::{Deserialize, Serialize};

use crate::pace::{Pace, Paced, Solve};
use crate::pow::{Digest, HashAlg};

/// Largest difficulty (leading zero bits) any message may carry. Far beyond anything minable, but
/// bounded so that a forged challenge cannot ask for more bits than a digest has.
pub const MAX_DIFFICULTY: u8 = 160;

/// The largest difficulty a message may carry for `alg`: [`MAX_DIFFICULTY`], or fewer if the
/// digest has fewer bits.
pub fn max_difficulty(alg: HashAlg) -> u8 {
    // 256 bits does not fit a u8: saturate instead of wrapping to 0.
    MAX_DIFFICULTY.min(u8::try_from(alg.bits()).unwrap_or(u8::MAX))
}

/// Most blocks one sync reply carries; a peer further behind asks again.
pub const MAX_SYNC_BLOCKS: usize = 256;

/// A peer's client id: a random nonzero `u32`, as the lab asks.
pub type PeerId = u32;

/// An election term. Term 0 means "no controller yet".
pub type Term = u64;

/// A transaction id: the height of a block in the chain, starting at 0.
pub type TxId = u64;

/// The MQTT topics of a room, all under one prefix (`sd` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Membership: announcements and departures (Last Will).
    pub init: String,
    /// Votes of an election.
    pub voting: String,
    /// Challenges (and heartbeats) issued by the controller.
    pub challenge: String,
    /// Solutions submitted by miners.
    pub solution: String,
    /// Accepted and rejected results published by the controller.
    pub result: String,
    /// The filter of every peer's status topic, `<prefix>/status/+` (see [`crate::status`]).
    pub status: String,
    prefix: String,
}

/// Which of the room's topics a message belongs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `<prefix>/init`
    Init,
    /// `<prefix>/voting`
    Voting,
    /// `<prefix>/challenge`
    Challenge,
    /// `<prefix>/solution`
    Solution,
    /// `<prefix>/result`
    Result,
}

impl Topics {
    /// The topics under `prefix` (e.g. `sd` gives `sd/init`, `sd/voting`, ...).
    pub fn new(prefix: &str) -> Self {
        let t = |name: &str| format!("{prefix}/{name}");
        Self {
            init: t("init"),
            voting: t("voting"),
            challenge: t("challenge"),
            solution: t("solution"),
            result: t("result"),
            status: t("status/+"),
            prefix: prefix.to_string(),
        }
    }

    /// The five protocol topics, one per [`Channel`].
    pub fn all(&self) -> [&str; 5] {
        [&self.init, &self.voting, &self.challenge, &self.solution, &self.result]
    }

    /// Peer `id`'s own topic, `<prefix>/peer/<id>`: what is meant for it alone (room protocol).
    pub fn direct_topic(&self, id: PeerId) -> String {
        format!("{}/peer/{id}", self.prefix)
    }

    /// The status topic of peer `id`, `<prefix>/status/<id>`.
    pub fn status_topic(&self, id: PeerId) -> String {
        format!("{}/status/{id}", self.prefix)
    }

    /// The topic of a channel.
    pub fn topic(&self, channel: Channel) -> &str {
        match channel {
            Channel::Init => &self.init,
            Channel::Voting => &self.voting,
            Channel::Challenge => &self.challenge,
            Channel::Solution => &self.solution,
            Channel::Result => &self.result,
        }
    }

    /// The channel a topic names, if it is one of ours.
    pub fn channel(&self, topic: &str) -> Option<Channel> {
        [Channel::Init, Channel::Voting, Channel::Challenge, Channel::Solution, Channel::Result]
            .into_iter()
            .find(|&c| self.topic(c) == topic)
    }
}

/// A block of the chain: one solved transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Transaction id, equal to the block's height.
    pub tx: TxId,
    /// Term of the controller that accepted the block.
    pub term: Term,
    /// Hash function of the proof of work.
    pub alg: HashAlg,
    /// Leading zero bits the block's hash must have.
    pub difficulty: u8,
    /// The difficulty policy the controller followed (see [`Pace`]).
    pub pace: Pace,
    /// Controller's clock (Unix ms) when the challenge was issued.
    pub issued_ms: u64,
    /// Controller's clock (Unix ms) when the solution was accepted.
    pub solved_ms: u64,
    /// Hash of the previous block (all zeros for block 0).
    pub prev: Digest,
    /// Winning miner; part of the proof so a solution cannot be claimed by another peer.
    pub miner: PeerId,
    /// The solution found by the miner.
    pub nonce: u64,
    /// `alg(prev, tx, miner, nonce)`: the proof of work and the block's identity; for a change
    /// of members, [`Change::digest`] instead.
    pub hash: Digest,
    /// A change of the room's voting members instead of a solved transaction: no proof of work
    /// (difficulty, miner and nonce 0), issued by the controller between two challenges.
    pub change: Option<Change>,
}

impl Block {
    /// A block that changes the room's members, on top of `prev`.
    pub fn change(tx: TxId, term: Term, alg: HashAlg, pace: Pace, now_ms: u64, prev: Digest, change: Change) -> Self {
        let hash = change.digest(alg, &prev, tx);
        Self {
            tx,
            term,
            alg,
            difficulty: 0,
            pace,
            issued_ms: now_ms,
            solved_ms: now_ms,
            prev,
            miner: 0,
            nonce: 0,
            hash,
            change: Some(change),
        }
    }

    /// Whether the block is a solved transaction (not a change of members).
    pub fn is_mined(&self) -> bool {
        self.change.is_none()
    }
}

impl Paced for Block {
    fn solve(&self) -> Option<Solve> {
        let ms = self.solved_ms.saturating_sub(self.issued_ms).max(1);
        self.is_mined().then_some(Solve { difficulty: self.difficulty, ms })
    }
}

/// A change of the room's voting members: one member out, or one peer in, per block (Raft's
/// single-server change: the majorities of two configurations that differ by one member always
/// share a member).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    /// The member leaves the configuration.
    Remove {
        /// Its client id.
        id: PeerId,
        /// Its key.
        key: u64,
    },
    /// The peer joins the configuration.
    Add {
        /// Its client id.
        id: PeerId,
        /// Its key.
        key: u64,
    },
}

impl Change {
    /// The identity of the block that makes this change at `tx` on top of `prev`: a digest with
    /// `alg` of a tagged encoding, which no proof of work's preimage equals.
    pub fn digest(&self, alg: HashAlg, prev: &Digest, tx: TxId) -> Digest {
        let bytes = postcard::to_stdvec(&("hashvote/change", prev, tx, self))
            .expect("postcard serialization into a Vec is infallible");
        Digest::of(alg, &bytes)
    }

    /// The peer the change is about.
    pub fn id(&self) -> PeerId {
        match *self {
            Self::Remove { id, .. } | Self::Add { id, .. } => id,
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Remove { id, .. } => write!(f, "remove {id}"),
            Self::Add { id, .. } => write!(f, "add {id}"),
        }
    }
}

/// Why a controller rejected a solution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The transaction was already decided.
    AlreadySolved,
    /// The transaction is not the open one (unknown, closed or future).
    UnknownTransaction,
    /// The hash does not have enough leading zero bits.
    InsufficientWork,
}

impl RejectReason {
    /// A short, stable name for logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AlreadySolved => "already_solved",
            Self::UnknownTransaction => "unknown_transaction",
            Self::InsufficientWork => "insufficient_work",
        }
    }
}

/// A challenge: the next transaction to mine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The controller's term.
    pub term: Term,
    /// Transaction id (the height the block will have).
    pub tx: TxId,
    /// Hash function to use.
    pub alg: HashAlg,
    /// Leading zero bits required.
    pub difficulty: u8,
    /// The difficulty policy, so every miner can check `difficulty`.
    pub pace: Pace,
    /// Controller's clock (Unix ms) when the challenge was issued.
    pub issued_ms: u64,
    /// Hash of the chain tip the block must link to.
    pub prev: Digest,
}

/// The verdict of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The block is accepted: the transaction is decided.
    Accepted(Block),
    /// A solution was rejected.
    Rejected {
        /// The transaction the solution named.
        tx: TxId,
        /// The miner who sent it.
        miner: PeerId,
        /// The nonce it carried.
        nonce: u64,
        /// Why.
        reason: RejectReason,
    },
}

/// Why a message was dropped: the `reason` of an `Event::MessageDropped`, and what the peer counts
/// drops by. [`DropReason::as_str`] is the name on the wire of the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    // Decoding (see [`DecodeError`]).
    /// Larger than the size limit.
    TooLarge,
    /// Not a postcard payload.
    Malformed,
    /// Bytes after the end of the payload.
    TrailingBytes,
    /// Another wire version.
    BadVersion,
    /// The message arrived on the wrong topic.
    WrongTopic,
    /// A field out of range.
    InvalidField,
    /// A payload on a topic the peer does not read.
    UnexpectedTopic,
    // The room protocol.
    /// Another process under a member's id, or under our own, with another key.
    DuplicateId,
    /// From (or followed as) a controller that is not a voting member of the room.
    NotMember,
    /// A ballot from a peer that is not a voter of the configuration (or of the proposal).
    NotAVoter,
    /// Of a term older than ours.
    StaleTerm,
    /// From a peer that is not the controller of its term.
    NotController,
    /// Block 0 or challenge 0 without the configuration its base is the digest of.
    BadConfiguration,
    /// A challenge whose difficulty its pace does not allow.
    BadDifficulty,
    /// A block that fails its proof of work or does not append to the chain.
    InvalidBlock,
    /// A sync reply to no request of ours (or to one made before we became controller).
    UnsolicitedSync,
    // The lab wire format (see [`crate::lab::wire::LabDecodeError`]).
    /// Larger than the lab's limit.
    LabTooLarge,
    /// Not JSON, or not the message of its topic.
    LabMalformed,
    /// A field out of range.
    LabInvalidField,
    /// An Init beyond the clients kept.
    LabTooManyClients,
    /// A vote after the election was decided.
    LabLateVote,
    /// A challenge or result not from the controller followed.
    LabNotFromController,
    /// A challenge re-issuing a transaction with another difficulty.
    LabConflictingChallenge,
    /// A result before the election.
    LabNoController,
    /// A result for a transaction never challenged.
    LabUnknownTx,
    /// A second, different winner for a solved transaction.
    LabConflictingResult,
    /// A result whose solution does not meet the difficulty.
    LabUnverifiedResult,
}

impl DropReason {
    /// The short, stable name counted and written in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::TrailingBytes => "trailing_bytes",
            Self::BadVersion => "bad_version",
            Self::WrongTopic => "wrong_topic",
            Self::InvalidField => "invalid_field",
            Self::UnexpectedTopic => "unexpected_topic",
            Self::DuplicateId => "duplicate_id",
            Self::NotMember => "not_member",
            Self::NotAVoter => "not_a_voter",
            Self::StaleTerm => "stale_term",
            Self::NotController => "not_controller",
            Self::BadConfiguration => "bad_configuration",
            Self::BadDifficulty => "bad_difficulty",
            Self::InvalidBlock => "invalid_block",
            Self::UnsolicitedSync => "unsolicited_sync",
            Self::LabTooLarge => "lab_too_large",
            Self::LabMalformed => "lab_malformed",
            Self::LabInvalidField => "lab_invalid_field",
            Self::LabTooManyClients => "lab_too_many_clients",
            Self::LabLateVote => "lab_late_vote",
            Self::LabNotFromController => "lab_not_from_controller",
            Self::LabConflictingChallenge => "lab_conflicting_challenge",
            Self::LabNoController => "lab_no_controller",
            Self::LabUnknownTx => "lab_unknown_tx",
            Self::LabConflictingResult => "lab_conflicting_result",
            Self::LabUnverifiedResult => "lab_unverified_result",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a payload was dropped. Each variant is counted separately by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is larger than the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The payload is not a postcard envelope.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The envelope has bytes after its end.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// The envelope is of another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The message arrived on the wrong topic.
    #[error("{kind} message on topic {topic}")]
    WrongTopic {
        /// Message kind.
        kind: &'static str,
        /// Topic it came on.
        topic: String,
    },
    /// The envelope decoded but a field is out of range.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// Why the payload is dropped.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            Self::TooLarge { .. } => DropReason::TooLarge,
            Self::Malformed(_) => DropReason::Malformed,
            Self::Trailing(_) => DropReason::TrailingBytes,
            Self::Version(_) => DropReason::BadVersion,
            Self::WrongTopic { .. } => DropReason::WrongTopic,
            Self::Invalid(_) => DropReason::InvalidField,
        }
    }

    /// A short, stable name for counters and events: [`drop_reason`](Self::drop_reason)'s.
    pub fn reason(&self) -> &'static str {
        self.drop_reason().as_str()
    }
}

/// The careful first half of decoding a payload of wire `version`: the size limit, then the
/// version byte (first, so that another version is reported as such, not as garbage), then
/// postcard with no trailing bytes. Validation is the caller's.
pub fn decode_bytes<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    version: u8,
    limit: usize,
) -> Result<T, DecodeError> {
    if payload.len() > limit {
        return Err(DecodeError::TooLarge { len: payload.len(), limit });
    }
    let (&got, _) = payload.split_first().ok_or_else(|| DecodeError::Malformed("empty payload".into()))?;
    if got != version {
        return Err(DecodeError::Version(got));
    }
    let (value, rest): (T, _) =
        postcard::take_from_bytes(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    #[test]
    fn decode_bytes_checks_size_then_version_then_trailing_bytes() {
        let bytes = postcard::to_stdvec(&(2u8, 7u32)).unwrap();
        assert_eq!(decode_bytes::<(u8, u32)>(&bytes, 2, LIMIT), Ok((2, 7)));
        assert_eq!(decode_bytes::<(u8, u32)>(&bytes, 2, 1).unwrap_err().reason(), "too_large");
        assert_eq!(decode_bytes::<(u8, u32)>(&bytes, 1, LIMIT).unwrap_err(), DecodeError::Version(2));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode_bytes::<(u8, u32)>(&long, 2, LIMIT).unwrap_err(), DecodeError::Trailing(1));
        assert_eq!(decode_bytes::<(u8, u32)>(&[], 2, LIMIT).unwrap_err().reason(), "malformed");
        assert_eq!(decode_bytes::<(u8, u32)>(&[2], 2, LIMIT).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn difficulty_is_bounded_by_the_digest() {
        assert_eq!(max_difficulty(HashAlg::Sha256), MAX_DIFFICULTY);
        assert_eq!(max_difficulty(HashAlg::Sha1), 160);
    }

    #[test]
    fn topics_map_both_ways() {
        let topics = Topics::new("room7");
        assert_eq!(topics.init, "room7/init");
        for t in topics.all() {
            let c = topics.channel(t).unwrap();
            assert_eq!(topics.topic(c), t);
        }
        assert_eq!(topics.channel("room7/other"), None);
        // Status topics and a peer's own topic are not broadcast channels.
        assert_eq!(topics.status, "room7/status/+");
        assert_eq!(topics.status_topic(42), "room7/status/42");
        assert_eq!(topics.channel(&topics.status_topic(42)), None);
        assert_eq!(topics.direct_topic(42), "room7/peer/42");
        assert_eq!(topics.channel(&topics.direct_topic(42)), None);
    }
}
