//! The room protocol's messages (wire version 3), the room's configuration, and their codec.
//!
//! Every payload is one postcard-encoded [`Envelope`]: the version byte, the sender's id, one
//! [`Msg`]. Broadcast messages travel on the lab's five topics; the ones meant for one peer (grants,
//! acknowledgements, sync) on that peer's own topic `<prefix>/peer/<id>`, so a peer's incoming
//! traffic does not grow with the room for messages it has no use for.

use serde::{Deserialize, Serialize};

use crate::pow::{Digest, HashAlg};
use crate::protocol::{
    Block, Challenge, Change, DecodeError, MAX_SYNC_BLOCKS, Outcome, PeerId, Term, TxId, max_difficulty,
};

/// The wire version of the room protocol.
pub const VERSION: u8 = 4;

/// Most members a room's configuration may have.
pub const MAX_ROOM: usize = 2048;

/// One voting member: a client id and the key drawn when its data directory was created. A
/// process claiming the id without the key (another data directory) is not that member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Client id.
    pub id: PeerId,
    /// The member's key (random, fixed with its data directory).
    pub key: u64,
}

/// The voting members of a room, sorted by id, ids unique. Recorded in block 0 (whose `prev` is
/// the configuration's digest, so the hash chain commits to it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoomConfig {
    members: Vec<Member>,
}

impl RoomConfig {
    /// A configuration of `members` (sorted here); `None` if empty, too large or an id repeats.
    pub fn new(mut members: Vec<Member>) -> Option<Self> {
        members.sort();
        let ok = !members.is_empty()
            && members.len() <= MAX_ROOM
            && members.windows(2).all(|w| w[0].id != w[1].id)
            && members.iter().all(|m| m.id != 0);
        ok.then_some(Self { members })
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a configuration has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Votes (or acknowledgements) that make a majority.
    pub fn quorum(&self) -> usize {
        self.members.len() / 2 + 1
    }

    /// The key of member `id`, if it is one.
    pub fn key_of(&self, id: PeerId) -> Option<u64> {
        self.members.binary_search_by_key(&id, |m| m.id).ok().map(|i| self.members[i].key)
    }

    /// Whether `(id, key)` is a member.
    pub fn contains(&self, id: PeerId, key: u64) -> bool {
        self.key_of(id) == Some(key)
    }

    /// The configuration after `change`, if it applies: a member (with its key) removed, never
    /// the last; a peer whose id is no member added, up to [`MAX_ROOM`].
    pub fn apply(&self, change: Change) -> Option<Self> {
        let mut members = self.members.clone();
        match change {
            Change::Remove { id, key } if self.contains(id, key) && self.len() > 1 => members.retain(|m| m.id != id),
            Change::Add { id, key } if self.key_of(id).is_none() && id != 0 => members.push(Member { id, key }),
            _ => return None,
        }
        Self::new(members)
    }

    /// The digest block 0 links to (`prev`): the hash of the encoded configuration with `alg`.
    pub fn digest(&self, alg: HashAlg) -> Digest {
        let bytes = postcard::to_stdvec(self).expect("postcard serialization into a Vec is infallible");
        Digest::of(alg, &bytes)
    }
}

/// A chain's position, for the up-to-date check: the last block's term, then the height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Pos {
    /// Term of the last block (0 for an empty chain).
    pub last_term: Term,
    /// Number of blocks.
    pub height: u64,
}

/// The messages of the room protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// `init`: "I am here". `want_reply` asks every peer to announce itself back, which each does
    /// with a hello addressed to the asker alone (on its own topic).
    Hello {
        /// The peer this hello answers (then it travels on that peer's own topic), or `None`.
        to: Option<PeerId>,
        /// Ask everyone to announce themselves back.
        want_reply: bool,
        /// The sender's key.
        key: u64,
        /// Random per process: tells a restarted process from its earlier run.
        incarnation: u64,
        /// When that process started (the sender's clock, ms): of two processes with one id and
        /// different keys, the later one gives way.
        since_ms: u64,
        /// The sender's term.
        term: Term,
        /// The controller of that term, if known.
        controller: Option<PeerId>,
        /// The sender's chain height.
        height: u64,
        /// In an answer from a room still gathering (before block 0): the live peers the sender
        /// knows, itself included, the `room_size` lowest ids; empty otherwise.
        peers: Vec<Member>,
    },
    /// `init`: the sender leaves: published on a clean exit, and registered as the Last Will of
    /// its protocol connection, so the broker publishes it when the sender dies or is cut off.
    Leave {
        /// The leaving process.
        incarnation: u64,
    },
    /// `voting`: the sender finds the room without a live controller and would move to `term`.
    /// Sent to one peer only (on its own topic) as the answer to a pre-ballot of an older term.
    PreBallot {
        /// The peer answered, if this is an answer.
        to: Option<PeerId>,
        /// The term proposed (the sender's term + 1).
        term: Term,
        /// The sender's key.
        key: u64,
        /// The sender's chain position.
        pos: Pos,
    },
    /// `voting`: the sender's random ballot in `term`; the highest `(ballot, id)` among up-to-date
    /// candidates gets the grants.
    Ballot {
        /// The term.
        term: Term,
        /// The random ballot.
        ballot: u32,
        /// The sender's key.
        key: u64,
        /// The sender's chain position.
        pos: Pos,
        /// Before block 0: the digest (SHA-256) of the configuration the sender proposes.
        proposal: Option<Digest>,
    },
    /// Direct: the sender's one vote of `term` goes to `to`.
    Grant {
        /// The candidate.
        to: PeerId,
        /// The candidate's key, from its ballot: a second process under its id cannot take the
        /// vote (both subscribe to the id's topic).
        to_key: u64,
        /// The term.
        term: Term,
        /// The voter's key.
        key: u64,
    },
    /// `challenge`: the controller is alive; its chain.
    Heartbeat {
        /// The controller's term.
        term: Term,
        /// The controller's key: a second process under its id (both get the id's broadcasts
        /// back) tells the controller's beats from the echoes of its own.
        key: u64,
        /// Its height.
        height: u64,
        /// Blocks committed.
        commit: u64,
        /// Its tip's hash (block 0's `prev` for an empty chain).
        tip: Digest,
        /// The transaction it has open, if any: a miner that missed the challenge asks for it,
        /// and one whose solution may have been lost sends it again.
        open: Option<TxId>,
    },
    /// `challenge`: the next transaction to mine.
    Challenge {
        /// The challenge.
        challenge: Challenge,
        /// Blocks committed.
        commit: u64,
        /// For transaction 0: the room's configuration, which the block's `prev` is the digest of.
        config: Option<RoomConfig>,
    },
    /// `solution`: a miner's answer.
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
        /// Blocks committed.
        commit: u64,
    },
    /// Direct: the sender's chain equals the controller's up to `height` (or, with a newer
    /// `term`, tells a stale controller that the room moved on).
    Ack {
        /// The controller.
        to: PeerId,
        /// The sender's term.
        term: Term,
        /// Height up to which the sender's chain matches the controller's.
        height: u64,
        /// The sender's key.
        key: u64,
    },
    /// Direct: asks `to` for its blocks from `from` on.
    SyncRequest {
        /// The peer asked.
        to: PeerId,
        /// First height wanted.
        from: TxId,
        /// A random number the reply repeats: it tells this request's reply from an older one,
        /// and from one meant for another process under the asker's id.
        req: u64,
        /// The asker's key: a member's request counts as a sign of life to its controller.
        key: u64,
    },
    /// Direct: the answer to a [`Msg::SyncRequest`].
    SyncReply {
        /// The peer that asked.
        to: PeerId,
        /// The request's `req`.
        req: u64,
        /// The replier's term.
        term: Term,
        /// The configuration, when the blocks start at 0 (or the replier has none yet).
        config: Option<RoomConfig>,
        /// Consecutive blocks from the requested height (at most [`MAX_SYNC_BLOCKS`]).
        blocks: Vec<Block>,
        /// The replier's height.
        height: u64,
        /// Blocks the replier knows committed.
        commit: u64,
        /// The replier's open challenge (controller only).
        open: Option<Challenge>,
    },
}

/// Where a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// `<prefix>/peer/<id>`: one peer's own topic.
    Direct(PeerId),
}

impl From<crate::protocol::Channel> for Channel {
    fn from(c: crate::protocol::Channel) -> Self {
        use crate::protocol::Channel as C;
        match c {
            C::Init => Self::Init,
            C::Voting => Self::Voting,
            C::Challenge => Self::Challenge,
            C::Solution => Self::Solution,
            C::Result => Self::Result,
        }
    }
}

impl Channel {
    /// The room-wide topic of this channel, or `None` for a peer's own topic.
    pub fn broadcast(self) -> Option<crate::protocol::Channel> {
        use crate::protocol::Channel as C;
        Some(match self {
            Self::Init => C::Init,
            Self::Voting => C::Voting,
            Self::Challenge => C::Challenge,
            Self::Solution => C::Solution,
            Self::Result => C::Result,
            Self::Direct(_) => return None,
        })
    }
}

impl Msg {
    /// The channel this message must travel on.
    pub fn channel(&self) -> Channel {
        match *self {
            Self::Hello { to: Some(to), .. } | Self::PreBallot { to: Some(to), .. } => Channel::Direct(to),
            Self::Hello { .. } | Self::Leave { .. } => Channel::Init,
            Self::PreBallot { .. } | Self::Ballot { .. } => Channel::Voting,
            Self::Heartbeat { .. } | Self::Challenge { .. } => Channel::Challenge,
            Self::Solution { .. } => Channel::Solution,
            // A rejection concerns its miner only: in a room of 300, the late solutions of every
            // race would otherwise each reach all 300.
            Self::Result { outcome: Outcome::Rejected { miner, .. }, .. } => Channel::Direct(miner),
            Self::Result { .. } => Channel::Result,
            Self::Grant { to, .. }
            | Self::Ack { to, .. }
            | Self::SyncRequest { to, .. }
            | Self::SyncReply { to, .. } => Channel::Direct(to),
        }
    }

    /// A short, stable name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Leave { .. } => "leave",
            Self::PreBallot { .. } => "pre_ballot",
            Self::Ballot { .. } => "ballot",
            Self::Grant { .. } => "grant",
            Self::Heartbeat { .. } => "heartbeat",
            Self::Challenge { .. } => "challenge",
            Self::Solution { .. } => "solution",
            Self::Result { .. } => "result",
            Self::Ack { .. } => "ack",
            Self::SyncRequest { .. } => "sync_request",
            Self::SyncReply { .. } => "sync_reply",
        }
    }
}

/// One message as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always [`VERSION`] when encoded by this build.
    pub version: u8,
    /// Client id of the sender.
    pub from: PeerId,
    /// The message.
    pub msg: Msg,
}

impl Envelope {
    /// Wraps a message from `from`.
    pub fn new(from: PeerId, msg: Msg) -> Self {
        Self { version: VERSION, from, msg }
    }
}

/// Encodes an envelope for the wire.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    postcard::to_stdvec(envelope).expect("postcard serialization into a Vec is infallible")
}

/// Decodes and validates a payload that arrived on `channel`, refusing anything over `limit`.
pub fn decode(payload: &[u8], channel: Channel, limit: usize) -> Result<Envelope, DecodeError> {
    let envelope: Envelope = crate::protocol::decode_bytes(payload, VERSION, limit)?;
    if envelope.msg.channel() != channel {
        return Err(DecodeError::WrongTopic { kind: envelope.msg.kind(), topic: format!("{channel:?}") });
    }
    validate(&envelope)?;
    Ok(envelope)
}

fn validate(env: &Envelope) -> Result<(), DecodeError> {
    let check = |ok: bool, what: &'static str| if ok { Ok(()) } else { Err(DecodeError::Invalid(what)) };
    check(env.from != 0, "sender")?;
    match &env.msg {
        Msg::Hello { to, controller, peers, .. } => {
            check(*controller != Some(0) && *to != Some(0), "controller or recipient")?;
            check(peers.len() <= MAX_ROOM && peers.iter().all(|m| m.id != 0), "peers")
        }
        Msg::Leave { .. } | Msg::Solution { .. } => Ok(()),
        Msg::PreBallot { term, to, .. } => check(*term > 0 && *to != Some(0), "term or recipient"),
        Msg::Ballot { term, proposal, .. } => {
            check(*term > 0, "term")?;
            check(proposal.is_none_or(|d| d.alg() == HashAlg::Sha256), "proposal")
        }
        Msg::Grant { to, term, .. } | Msg::Ack { to, term, .. } => check(*to != 0 && *term > 0, "term or recipient"),
        Msg::Heartbeat { term, height, commit, .. } => check(*term > 0 && commit <= height, "term or commit"),
        Msg::Challenge { challenge, commit, config } => {
            check_challenge(challenge)?;
            check(*commit <= challenge.tx, "commit")?;
            check(config.is_some() == (challenge.tx == 0), "configuration")?;
            config.as_ref().map_or(Ok(()), check_config)
        }
        Msg::Result { term, outcome, .. } => {
            check(*term > 0, "term")?;
            match outcome {
                Outcome::Accepted(b) => check_block(b),
                Outcome::Rejected { miner, .. } => check(*miner != 0, "miner"),
            }
        }
        Msg::SyncRequest { to, .. } => check(*to != 0, "recipient"),
        Msg::SyncReply { to, blocks, height, commit, open, config, .. } => {
            check(*to != 0 && commit <= height, "recipient or commit")?;
            check(blocks.len() <= MAX_SYNC_BLOCKS, "block count")?;
            check(blocks.windows(2).all(|w| w[1].tx == w[0].tx + 1), "block order")?;
            check(blocks.last().is_none_or(|b| b.tx < *height), "height")?;
            check(config.is_none() || blocks.first().is_none_or(|b| b.tx == 0), "configuration")?;
            blocks.iter().try_for_each(check_block)?;
            config.as_ref().map_or(Ok(()), check_config)?;
            open.as_ref().map_or(Ok(()), check_challenge)
        }
    }
}

fn check_config(config: &RoomConfig) -> Result<(), DecodeError> {
    // Decoding bypasses `RoomConfig::new`: check its invariants here.
    let m = config.members();
    let ok = !m.is_empty() && m.len() <= MAX_ROOM && m.windows(2).all(|w| w[0].id < w[1].id) && m[0].id != 0;
    if ok { Ok(()) } else { Err(DecodeError::Invalid("configuration")) }
}

fn check_challenge(c: &Challenge) -> Result<(), DecodeError> {
    let ok = c.term > 0
        && c.difficulty <= max_difficulty(c.alg)
        && c.pace.is_valid(max_difficulty(c.alg))
        && c.prev.alg() == c.alg;
    if ok { Ok(()) } else { Err(DecodeError::Invalid("challenge")) }
}

fn check_block(b: &Block) -> Result<(), DecodeError> {
    // A change of members has no miner; a solved block always has one.
    let ok = b.term > 0
        && (b.miner != 0) == b.is_mined()
        && b.change.is_none_or(|c| c.id() != 0)
        && b.difficulty <= max_difficulty(b.alg)
        && b.pace.is_valid(max_difficulty(b.alg))
        && b.prev.alg() == b.alg
        && b.hash.alg() == b.alg;
    if ok { Ok(()) } else { Err(DecodeError::Invalid("block")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pace::Pace;

    fn config() -> RoomConfig {
        RoomConfig::new(vec![Member { id: 3, key: 30 }, Member { id: 1, key: 10 }, Member { id: 2, key: 20 }]).unwrap()
    }

    #[test]
    fn a_configuration_is_sorted_with_unique_nonzero_ids_and_a_majority_quorum() {
        let c = config();
        assert_eq!(c.members().iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(c.quorum(), 2);
        assert!(c.contains(2, 20) && !c.contains(2, 21) && !c.contains(4, 40));
        assert!(RoomConfig::new(vec![Member { id: 1, key: 1 }, Member { id: 1, key: 2 }]).is_none());
        assert!(RoomConfig::new(vec![Member { id: 0, key: 1 }]).is_none());
        assert!(RoomConfig::new(vec![]).is_none());
        assert_eq!(RoomConfig::new(vec![Member { id: 1, key: 1 }; 1]).unwrap().quorum(), 1);
        let four = (1..=4).map(|id| Member { id, key: 0 }).collect();
        assert_eq!(RoomConfig::new(four).unwrap().quorum(), 3);
        assert_ne!(c.digest(HashAlg::Sha1), config_with_key(2, 21).digest(HashAlg::Sha1));
    }

    fn config_with_key(id: PeerId, key: u64) -> RoomConfig {
        let mut m = config().members().to_vec();
        m.iter_mut().filter(|m| m.id == id).for_each(|m| m.key = key);
        RoomConfig::new(m).unwrap()
    }

    #[test]
    fn positions_compare_by_last_term_then_height() {
        assert!(Pos { last_term: 2, height: 1 } > Pos { last_term: 1, height: 9 });
        assert!(Pos { last_term: 2, height: 3 } > Pos { last_term: 2, height: 2 });
    }

    #[test]
    fn every_message_round_trips_on_its_channel_and_nowhere_else() {
        let alg = HashAlg::Sha1;
        let challenge = Challenge {
            term: 1,
            tx: 0,
            alg,
            difficulty: 4,
            pace: Pace::Fixed(4),
            issued_ms: 5,
            prev: config().digest(alg),
        };
        let msgs = [
            Msg::Hello {
                to: None,
                want_reply: true,
                key: 1,
                incarnation: 2,
                since_ms: 3,
                term: 4,
                controller: Some(5),
                height: 6,
                peers: Vec::new(),
            },
            Msg::Hello {
                to: Some(9),
                want_reply: false,
                key: 1,
                incarnation: 2,
                since_ms: 3,
                term: 4,
                controller: None,
                height: 6,
                peers: vec![Member { id: 7, key: 8 }],
            },
            Msg::Leave { incarnation: 2 },
            Msg::PreBallot { to: None, term: 2, key: 1, pos: Pos::default() },
            Msg::PreBallot { to: Some(3), term: 2, key: 1, pos: Pos::default() },
            Msg::Ballot {
                term: 2,
                ballot: 7,
                key: 1,
                pos: Pos::default(),
                proposal: Some(config().digest(HashAlg::Sha256)),
            },
            Msg::Grant { to: 9, to_key: 3, term: 2, key: 1 },
            Msg::Heartbeat { term: 2, key: 1, height: 3, commit: 2, tip: Digest::zero(alg), open: Some(3) },
            Msg::Challenge { challenge, commit: 0, config: Some(config()) },
            Msg::Solution { tx: 0, nonce: 1 },
            Msg::Ack { to: 9, term: 2, height: 3, key: 1 },
            Msg::SyncRequest { to: 9, from: 0, req: 5, key: 6 },
            Msg::SyncReply {
                to: 9,
                req: 5,
                term: 2,
                config: None,
                blocks: vec![],
                height: 0,
                commit: 0,
                open: Some(challenge),
            },
        ];
        for msg in msgs {
            let env = Envelope::new(7, msg.clone());
            let bytes = encode(&env);
            assert_eq!(decode(&bytes, msg.channel(), 65536), Ok(env.clone()), "{msg:?}");
            let other = if msg.channel() == Channel::Init { Channel::Voting } else { Channel::Init };
            assert_eq!(decode(&bytes, other, 65536).unwrap_err().reason(), "wrong_topic");
            assert_eq!(decode(&bytes, msg.channel(), bytes.len() - 1).unwrap_err().reason(), "too_large");
        }
    }

    #[test]
    fn invalid_fields_are_refused() {
        let bad = [
            Envelope::new(0, Msg::Leave { incarnation: 1 }),
            Envelope::new(1, Msg::PreBallot { to: None, term: 0, key: 1, pos: Pos::default() }),
            Envelope::new(1, Msg::Grant { to: 0, to_key: 1, term: 1, key: 1 }),
            Envelope::new(
                1,
                Msg::Heartbeat { term: 1, key: 1, height: 1, commit: 2, tip: Digest::zero(HashAlg::Sha1), open: None },
            ),
            Envelope::new(
                1,
                Msg::Ballot {
                    term: 1,
                    ballot: 1,
                    key: 1,
                    pos: Pos::default(),
                    proposal: Some(Digest::zero(HashAlg::Sha1)),
                },
            ),
        ];
        for env in bad {
            let got = decode(&encode(&env), env.msg.channel(), 65536);
            assert_eq!(got.unwrap_err().reason(), "invalid_field", "{env:?}");
        }
        let mut v1 = encode(&Envelope::new(1, Msg::Leave { incarnation: 1 }));
        v1[0] = 1;
        assert_eq!(decode(&v1, Channel::Init, 65536).unwrap_err().reason(), "bad_version");
        let mut trailing = encode(&Envelope::new(1, Msg::Leave { incarnation: 1 }));
        trailing.push(0);
        assert_eq!(decode(&trailing, Channel::Init, 65536).unwrap_err().reason(), "trailing_bytes");
    }
}
