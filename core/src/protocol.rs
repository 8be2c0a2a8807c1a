//! The wire protocol: topics, messages and their codec.
//!
//! Every MQTT payload is one postcard-encoded [`Envelope`]: a protocol version, the sender's id and
//! one [`Message`]. Decoding is bounded by a size limit and followed by validation, so nothing that
//! comes off the network reaches the state machines without passing [`decode`].

use serde::{Deserialize, Serialize};

use crate::pace::Pace;
use crate::pow::{Digest, HashAlg};

/// The protocol version this build speaks; envelopes with another version are rejected.
pub const VERSION: u8 = 1;

/// Largest difficulty (leading zero bits) any message may carry. Far beyond anything minable, but
/// bounded so that a forged challenge cannot ask for more bits than a digest has.
pub const MAX_DIFFICULTY: u8 = 160;

/// The largest difficulty a message may carry for `alg`: [`MAX_DIFFICULTY`], or fewer if the
/// digest has fewer bits.
pub fn max_difficulty(alg: HashAlg) -> u8 {
    // 256 bits does not fit a u8: saturate instead of wrapping to 0.
    MAX_DIFFICULTY.min(u8::try_from(alg.bits()).unwrap_or(u8::MAX))
}

/// Most blocks one [`Message::SyncReply`] carries; a peer further behind asks again.
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
    /// Membership: announcements, departures (Last Will) and chain catch-up.
    pub init: String,
    /// Votes of an election.
    pub voting: String,
    /// Challenges issued by the controller.
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

    /// Every filter a peer subscribes to: the five protocol topics and the status filter.
    pub fn subscriptions(&self) -> [&str; 6] {
        [&self.init, &self.voting, &self.challenge, &self.solution, &self.result, &self.status]
    }

    /// Peer `id`'s own topic, `<prefix>/peer/<id>`: what is meant for it alone (room protocol).
    pub fn direct_topic(&self, id: PeerId) -> String {
        format!("{}/peer/{id}", self.prefix)
    }

    /// The status topic of peer `id`, `<prefix>/status/<id>`.
    pub fn status_topic(&self, id: PeerId) -> String {
        format!("{}/status/{id}", self.prefix)
    }

    /// The peer whose status topic `topic` is, if it is one (see [`crate::status::topic_peer`]).
    pub fn status_peer(&self, topic: &str) -> Option<PeerId> {
        crate::status::topic_peer(&self.prefix, topic)
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

/// What a peer knows of the room, carried by every announcement so that a newcomer learns the
/// current controller and chain height from the first replies it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The highest term this peer has seen.
    pub term: Term,
    /// The controller of that term, if one is elected.
    pub leader: Option<PeerId>,
    /// Number of blocks in this peer's chain.
    pub height: u64,
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
    /// `alg(prev, tx, miner, nonce)`: the proof of work and the block's identity.
    pub hash: Digest,
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

/// The messages of the protocol. Each belongs on one [`Channel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// `init`: "I am here". `want_reply` asks every peer to announce itself back; a peer sets it
    /// on its first announcement after each (re)connection, so it learns the room in one round trip.
    Hello {
        /// Ask everyone to announce themselves back.
        want_reply: bool,
        /// What the sender knows of the room.
        view: View,
        /// Which process speaks: a random number drawn at start, so two processes claiming the
        /// same client id can tell each other apart.
        incarnation: u64,
        /// When that process started (Unix ms): of two claiming one id, the later one gives way.
        since_ms: u64,
    },
    /// `init`: the sender leaves the room. Also registered as the sender's Last Will, so the
    /// broker publishes it when the sender crashes or is cut off.
    Leave,
    /// `init`: asks peer `to` (normally the controller) for its blocks from `from` on.
    SyncRequest {
        /// The peer asked.
        to: PeerId,
        /// First transaction id wanted.
        from: TxId,
    },
    /// `init`: the answer to a [`Message::SyncRequest`], addressed to the peer that asked.
    SyncReply {
        /// The peer that asked.
        to: PeerId,
        /// The controller's term.
        term: Term,
        /// Consecutive blocks starting at the requested id (at most [`MAX_SYNC_BLOCKS`]).
        blocks: Vec<Block>,
        /// Total height of the controller's chain, so the asker knows whether to ask again.
        height: u64,
        /// The open challenge, if any, so the asker can start mining at once.
        open: Option<Challenge>,
    },
    /// `voting`: a random vote for a term; the highest `(vote, sender)` wins.
    Vote {
        /// The term being elected.
        term: Term,
        /// The random vote.
        vote: u32,
        /// The voter's chain height, so the winner can first catch up with the longest chain.
        height: u64,
    },
    /// `challenge`: the controller asks for a block.
    Challenge(Challenge),
    /// `solution`: a miner's answer to a challenge.
    Solution {
        /// The transaction solved.
        tx: TxId,
        /// The nonce found; the miner is the envelope's sender.
        nonce: u64,
    },
    /// `result`: the controller's verdict on a solution.
    Result {
        /// The controller's term.
        term: Term,
        /// The verdict.
        outcome: Outcome,
    },
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

/// The verdict of a [`Message::Result`].
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

impl Message {
    /// The channel this message must travel on.
    pub fn channel(&self) -> Channel {
        match self {
            Self::Hello { .. } | Self::Leave | Self::SyncRequest { .. } | Self::SyncReply { .. } => Channel::Init,
            Self::Vote { .. } => Channel::Voting,
            Self::Challenge(_) => Channel::Challenge,
            Self::Solution { .. } => Channel::Solution,
            Self::Result { .. } => Channel::Result,
        }
    }

    /// A short, stable name for logs and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Leave => "leave",
            Self::SyncRequest { .. } => "sync_request",
            Self::SyncReply { .. } => "sync_reply",
            Self::Vote { .. } => "vote",
            Self::Challenge(_) => "challenge",
            Self::Solution { .. } => "solution",
            Self::Result { .. } => "result",
        }
    }
}

/// One message as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version; always [`VERSION`] when encoded by this build.
    pub version: u8,
    /// Client id of the sender.
    pub from: PeerId,
    /// The message.
    pub msg: Message,
}

impl Envelope {
    /// Wraps a message from `from` in an envelope of the current version.
    pub fn new(from: PeerId, msg: Message) -> Self {
        Self { version: VERSION, from, msg }
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
    /// A short, stable name for counters and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Trailing(_) => "trailing_bytes",
            Self::Version(_) => "bad_version",
            Self::WrongTopic { .. } => "wrong_topic",
            Self::Invalid(_) => "invalid_field",
        }
    }
}

/// Encodes an envelope for the wire.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail.
    postcard::to_stdvec(envelope).expect("postcard serialization into a Vec is infallible")
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

/// Decodes and validates a payload that arrived on `channel`, refusing anything over `limit` bytes.
pub fn decode(payload: &[u8], channel: Channel, limit: usize) -> Result<Envelope, DecodeError> {
    let envelope: Envelope = decode_bytes(payload, VERSION, limit)?;
    validate(&envelope)?;
    if envelope.msg.channel() != channel {
        return Err(DecodeError::WrongTopic { kind: envelope.msg.kind(), topic: format!("{channel:?}") });
    }
    Ok(envelope)
}

fn validate(envelope: &Envelope) -> Result<(), DecodeError> {
    use DecodeError::Invalid;
    if envelope.from == 0 {
        return Err(Invalid("sender id 0"));
    }
    let check_block = |b: &Block| -> Result<(), DecodeError> {
        let max = max_difficulty(b.alg);
        if b.difficulty > max || !b.pace.is_valid(max) {
            return Err(Invalid("block difficulty"));
        }
        if b.miner == 0 {
            return Err(Invalid("block miner id 0"));
        }
        if b.term == 0 {
            return Err(Invalid("block term 0"));
        }
        if b.prev.alg() != b.alg || b.hash.alg() != b.alg {
            return Err(Invalid("block digest length"));
        }
        Ok(())
    };
    let check_challenge = |c: &Challenge| -> Result<(), DecodeError> {
        if c.term == 0 {
            return Err(Invalid("challenge term 0"));
        }
        let max = max_difficulty(c.alg);
        if c.difficulty > max || !c.pace.is_valid(max) {
            return Err(Invalid("challenge difficulty"));
        }
        if c.prev.alg() != c.alg {
            return Err(Invalid("challenge digest length"));
        }
        Ok(())
    };
    match &envelope.msg {
        Message::Hello { view, .. } => {
            if view.leader == Some(0) {
                return Err(Invalid("leader id 0"));
            }
        }
        Message::Leave | Message::Solution { .. } => {}
        Message::SyncRequest { to, .. } => {
            if *to == 0 {
                return Err(Invalid("sync request addressee 0"));
            }
        }
        Message::SyncReply { to, term, blocks, height, open } => {
            if *to == 0 || *term == 0 {
                return Err(Invalid("sync reply addressee or term"));
            }
            if blocks.len() > MAX_SYNC_BLOCKS {
                return Err(Invalid("sync reply length"));
            }
            if blocks.windows(2).any(|w| w[1].tx != w[0].tx + 1) {
                return Err(Invalid("sync reply blocks not consecutive"));
            }
            if blocks.last().is_some_and(|b| b.tx >= *height) {
                return Err(Invalid("sync reply height"));
            }
            blocks.iter().try_for_each(check_block)?;
            if let Some(c) = open {
                check_challenge(c)?;
            }
        }
        Message::Vote { term, .. } => {
            if *term == 0 {
                return Err(Invalid("vote term 0"));
            }
        }
        Message::Challenge(c) => check_challenge(c)?,
        Message::Result { term, outcome } => {
            if *term == 0 {
                return Err(Invalid("result term 0"));
            }
            match outcome {
                Outcome::Accepted(b) => check_block(b)?,
                Outcome::Rejected { miner, .. } => {
                    if *miner == 0 {
                        return Err(Invalid("rejected miner id 0"));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 64 * 1024;

    fn samples() -> Vec<Envelope> {
        let alg = HashAlg::Sha1;
        let prev = Digest::zero(alg);
        let pace = Pace::Fixed(9);
        let block = Block {
            tx: 3,
            term: 2,
            alg,
            difficulty: 9,
            pace,
            issued_ms: 5,
            solved_ms: 9,
            prev,
            miner: 7,
            nonce: 99,
            hash: prev,
        };
        let challenge = Challenge { term: 2, tx: 4, alg, difficulty: 9, pace, issued_ms: 10, prev };
        [
            Message::Hello {
                want_reply: true,
                view: View { term: 2, leader: Some(5), height: 4 },
                incarnation: 7,
                since_ms: 1000,
            },
            Message::Leave,
            Message::SyncRequest { to: 4, from: 0 },
            Message::SyncReply { to: 3, term: 2, blocks: vec![block], height: 4, open: Some(challenge) },
            Message::Vote { term: 1, vote: 42, height: 3 },
            Message::Challenge(challenge),
            Message::Solution { tx: 4, nonce: 1 << 40 },
            Message::Result { term: 2, outcome: Outcome::Accepted(block) },
            Message::Result {
                term: 2,
                outcome: Outcome::Rejected { tx: 4, miner: 8, nonce: 5, reason: RejectReason::AlreadySolved },
            },
        ]
        .into_iter()
        .map(|m| Envelope::new(11, m))
        .collect()
    }

    #[test]
    fn every_message_round_trips_on_its_topic() {
        for env in samples() {
            let bytes = encode(&env);
            assert_eq!(decode(&bytes, env.msg.channel(), LIMIT), Ok(env));
        }
    }

    #[test]
    fn wrong_topic_version_size_and_trailing_bytes_are_rejected() {
        let env = Envelope::new(11, Message::Vote { term: 1, vote: 2, height: 0 });
        let bytes = encode(&env);
        assert_eq!(decode(&bytes, Channel::Result, LIMIT).unwrap_err().reason(), "wrong_topic");
        assert_eq!(decode(&bytes, Channel::Voting, 2).unwrap_err().reason(), "too_large");
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2, Channel::Voting, LIMIT).unwrap_err(), DecodeError::Version(2));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long, Channel::Voting, LIMIT).unwrap_err(), DecodeError::Trailing(1));
        assert_eq!(decode(&[], Channel::Voting, LIMIT).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn out_of_range_fields_are_rejected() {
        let zero_sender = Envelope::new(0, Message::Leave);
        assert_eq!(decode(&encode(&zero_sender), Channel::Init, LIMIT).unwrap_err().reason(), "invalid_field");
        let alg = HashAlg::Sha1;
        let pace = Pace::Fixed(1);
        let hard = Challenge { term: 1, tx: 0, alg, difficulty: 161, pace, issued_ms: 0, prev: Digest::zero(alg) };
        let env = Envelope::new(1, Message::Challenge(hard));
        assert_eq!(decode(&encode(&env), Channel::Challenge, LIMIT).unwrap_err().reason(), "invalid_field");
        let mixed = Challenge {
            term: 1,
            tx: 0,
            alg: HashAlg::Sha256,
            difficulty: 1,
            pace,
            issued_ms: 0,
            prev: Digest::zero(alg),
        };
        let env = Envelope::new(1, Message::Challenge(mixed));
        assert_eq!(decode(&encode(&env), Channel::Challenge, LIMIT).unwrap_err().reason(), "invalid_field");
    }

    #[test]
    fn sha256_messages_with_real_difficulties_decode() {
        let alg = HashAlg::Sha256;
        assert_eq!(max_difficulty(alg), MAX_DIFFICULTY);
        assert_eq!(max_difficulty(HashAlg::Sha1), 160);
        let pace = Pace::Retarget { target_ms: 1000, start: 20, lo: 1, hi: 40 };
        let c = Challenge { term: 1, tx: 0, alg, difficulty: 20, pace, issued_ms: 0, prev: Digest::zero(alg) };
        let env = Envelope::new(1, Message::Challenge(c));
        assert_eq!(decode(&encode(&env), Channel::Challenge, LIMIT), Ok(env));
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
        // Status topics are not protocol channels; they name their peer instead.
        assert_eq!(topics.status, "room7/status/+");
        assert_eq!(topics.status_topic(42), "room7/status/42");
        assert_eq!(topics.channel(&topics.status_topic(42)), None);
        assert_eq!(topics.status_peer(&topics.status_topic(42)), Some(42));
        assert_eq!(topics.status_peer("room7/init"), None);
        assert_eq!(topics.subscriptions()[..5], topics.all());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for c in [Channel::Init, Channel::Voting, Channel::Challenge, Channel::Solution, Channel::Result] {
                let _ = decode(&bytes, c, LIMIT);
            }
        }

        #[test]
        fn mutated_messages_never_panic_and_decode_to_valid_envelopes(
            pick in 0usize..9, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let env = &samples()[pick];
            let mut bytes = encode(env);
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(decoded) = decode(&bytes, env.msg.channel(), LIMIT) {
                prop_assert!(validate(&decoded).is_ok());
                prop_assert_eq!(decode(&encode(&decoded), env.msg.channel(), LIMIT), Ok(decoded));
            }
        }

        #[test]
        fn votes_round_trip(from in 1u32.., term in 1u64.., vote in any::<u32>()) {
            let env = Envelope::new(from, Message::Vote { term, vote, height: 0 });
            prop_assert_eq!(decode(&encode(&env), Channel::Voting, LIMIT), Ok(env));
        }
    }
}
