//! The lab's wire format: its five JSON messages, the [`Id`] its clients use (a JSON integer or
//! string), the room's way of ordering ballots, and its proof of work (SHA-1 of the solution
//! string). Decoding is bounded and every field is validated, so nothing reaches
//! [`super::LabNode`] without passing [`decode`].

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::pow::{Digest, HashAlg};
use crate::protocol::{Channel, DropReason};

/// Largest lab payload accepted, in bytes. The largest valid message (a result with two
/// 64-character ids and a 256-character solution) is well under it.
pub const MAX_PAYLOAD: usize = 1024;
/// Longest string id or vote accepted (a UUID has 36 characters).
pub const MAX_ID_LEN: usize = 64;
/// Longest solution string accepted.
pub const MAX_SOLUTION_LEN: usize = 256;
/// Largest difficulty a received challenge may ask for: beyond anything minable, but it admits
/// the course's later 20..=40 and keeps a forged challenge from asking for more than a digest has.
pub const MAX_CHALLENGE: u32 = 64;
/// Largest difficulty this peer issues as controller (see `config`).
pub const MAX_ISSUED: u8 = 32;

/// A client id or a vote as the lab's clients send them: the assignment asks for integers, the
/// seed's own client sends UUID strings. Two ids are the same only if they are equal as JSON
/// values (`5` and `"5"` are different clients).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    /// A JSON integer.
    Int(i64),
    /// A JSON string (printable ASCII, 1..=[`MAX_ID_LEN`] characters once validated).
    Str(String),
}

impl Id {
    /// True for a JSON integer.
    pub fn is_int(&self) -> bool {
        matches!(self, Self::Int(_))
    }

    /// This id as a hashvote peer id, if it is an integer that fits one.
    pub fn as_peer_id(&self) -> Option<u32> {
        match self {
            Self::Int(n) => u32::try_from(*n).ok(),
            Self::Str(_) => None,
        }
    }

    fn valid(&self) -> bool {
        match self {
            Self::Int(_) => true,
            Self::Str(s) => !s.is_empty() && s.len() <= MAX_ID_LEN && printable(s),
        }
    }
}

impl fmt::Display for Id {
    /// The decimal digits of an integer, or the string itself: the form strings are compared in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// How a room orders the ballots `(VoteID, ClientID)` of one election: numerically when every
/// vote and client id of the election is an integer, otherwise all as strings (integers in
/// decimal), byte by byte, as Python compares `str`. Deciding once per election, over all its
/// ballots, keeps the order total; comparing pair by pair would not be transitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BallotOrder {
    /// Every value is an integer.
    Numeric,
    /// At least one value is a string.
    Text,
}

impl BallotOrder {
    /// The order of an election with these ballots.
    pub fn of<'a>(ballots: impl IntoIterator<Item = (&'a Id, &'a Id)>) -> Self {
        let all_int = ballots.into_iter().all(|(vote, client)| vote.is_int() && client.is_int());
        if all_int { Self::Numeric } else { Self::Text }
    }

    /// Compares two ballots `(vote, client)`: the vote first, the client id breaks ties.
    pub fn cmp(self, a: (&Id, &Id), b: (&Id, &Id)) -> Ordering {
        let one = |x: &Id, y: &Id| match (self, x, y) {
            (Self::Numeric, Id::Int(x), Id::Int(y)) => x.cmp(y),
            _ => x.to_string().cmp(&y.to_string()),
        };
        one(a.0, b.0).then_with(|| one(a.1, b.1))
    }
}

/// `sd/init`: a client announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitMsg {
    /// The client.
    #[serde(rename = "ClientID")]
    pub client: Id,
    /// Sent by a hashvote peer (`"Hashvote": true`, a field the lab's clients ignore): another
    /// hashvote peer need not answer it with its own Init (it learns of us from our vote),
    /// and an Init a course client receives once its list is full makes it vote again.
    #[serde(rename = "Hashvote", default, skip_serializing_if = "std::ops::Not::not")]
    pub hashvote: bool,
}

/// `sd/voting`: a client's vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionMsg {
    /// The voter.
    #[serde(rename = "ClientID")]
    pub client: Id,
    /// Its random vote.
    #[serde(rename = "VoteID")]
    pub vote: Id,
    /// Sent by a hashvote peer (`"Hashvote": true`, a field the lab's clients ignore): its
    /// challenges, should it win, name it (see [`ChallengeMsg::issuer`]).
    #[serde(rename = "Hashvote", default, skip_serializing_if = "std::ops::Not::not")]
    pub hashvote: bool,
}

/// `sd/challenge`: the controller's challenge. The lab's message names no sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeMsg {
    /// Transaction id, from 0.
    #[serde(rename = "TransactionID")]
    pub tx: u64,
    /// Leading zero bits required.
    #[serde(rename = "Challenge")]
    pub difficulty: u32,
    /// The issuing hashvote peer (`"Issuer"`, a field the lab's clients ignore); a course
    /// client's challenge has none.
    #[serde(rename = "Issuer", default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<Id>,
}

/// `sd/solution`: a miner's solution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SolutionMsg {
    /// The miner.
    #[serde(rename = "ClientID")]
    pub client: Id,
    /// The transaction.
    #[serde(rename = "TransactionID")]
    pub tx: u64,
    /// The solution string (a JSON integer is taken as its decimal digits).
    #[serde(rename = "Solution", deserialize_with = "string_or_int")]
    pub solution: String,
}

/// `sd/result`: the controller's verdict on a solution. Its `ClientID` is the miner's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMsg {
    /// The miner whose solution this judges.
    #[serde(rename = "ClientID")]
    pub client: Id,
    /// The transaction.
    #[serde(rename = "TransactionID")]
    pub tx: u64,
    /// The solution judged.
    #[serde(rename = "Solution", deserialize_with = "string_or_int")]
    pub solution: String,
    /// 1: accepted (the transaction's winner); 0: invalid, or the transaction was already solved.
    #[serde(rename = "Result")]
    pub result: u8,
}

/// One decoded lab message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabMsg {
    /// On `sd/init`.
    Init(InitMsg),
    /// On `sd/voting`.
    Election(ElectionMsg),
    /// On `sd/challenge`.
    Challenge(ChallengeMsg),
    /// On `sd/solution`.
    Solution(SolutionMsg),
    /// On `sd/result`.
    Result(ResultMsg),
}

impl LabMsg {
    /// The topic the message goes on.
    pub fn channel(&self) -> Channel {
        match self {
            Self::Init(_) => Channel::Init,
            Self::Election(_) => Channel::Voting,
            Self::Challenge(_) => Channel::Challenge,
            Self::Solution(_) => Channel::Solution,
            Self::Result(_) => Channel::Result,
        }
    }
}

/// Why a lab payload was dropped; counted per [`reason`](Self::reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabDecodeError {
    /// Larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the lab limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// Not JSON, or not the message of its topic.
    #[error("malformed lab message: {0}")]
    Malformed(String),
    /// Decoded, but a field is out of range.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl LabDecodeError {
    /// Why the payload is dropped.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            Self::TooLarge(_) => DropReason::LabTooLarge,
            Self::Malformed(_) => DropReason::LabMalformed,
            Self::Invalid(_) => DropReason::LabInvalidField,
        }
    }

    /// A short, stable name for counters and events: [`drop_reason`](Self::drop_reason)'s.
    pub fn reason(&self) -> &'static str {
        self.drop_reason().as_str()
    }
}

/// Encodes a message as the lab's JSON.
pub fn encode(msg: &LabMsg) -> Vec<u8> {
    let json = match msg {
        LabMsg::Init(m) => serde_json::to_vec(m),
        LabMsg::Election(m) => serde_json::to_vec(m),
        LabMsg::Challenge(m) => serde_json::to_vec(m),
        LabMsg::Solution(m) => serde_json::to_vec(m),
        LabMsg::Result(m) => serde_json::to_vec(m),
    };
    // Plain structs of integers and strings always serialize.
    json.expect("lab messages serialize")
}

/// Decodes and validates a payload that arrived on `channel`.
pub fn decode(payload: &[u8], channel: Channel) -> Result<LabMsg, LabDecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(LabDecodeError::TooLarge(payload.len()));
    }
    fn json<'a, T: Deserialize<'a>>(p: &'a [u8]) -> Result<T, LabDecodeError> {
        serde_json::from_slice(p).map_err(|e| LabDecodeError::Malformed(e.to_string()))
    }
    let msg = match channel {
        Channel::Init => LabMsg::Init(json(payload)?),
        Channel::Voting => LabMsg::Election(json(payload)?),
        Channel::Challenge => LabMsg::Challenge(json(payload)?),
        Channel::Solution => LabMsg::Solution(json(payload)?),
        Channel::Result => LabMsg::Result(json(payload)?),
    };
    validate(&msg)?;
    Ok(msg)
}

fn validate(msg: &LabMsg) -> Result<(), LabDecodeError> {
    let check = |ok: bool, what| if ok { Ok(()) } else { Err(LabDecodeError::Invalid(what)) };
    let solution_ok = |s: &str| !s.is_empty() && s.len() <= MAX_SOLUTION_LEN && printable(s);
    match msg {
        LabMsg::Init(m) => check(m.client.valid(), "ClientID"),
        LabMsg::Election(m) => check(m.client.valid(), "ClientID").and(check(m.vote.valid(), "VoteID")),
        LabMsg::Challenge(m) => check((1..=MAX_CHALLENGE).contains(&m.difficulty), "Challenge")
            .and(check(m.issuer.as_ref().is_none_or(Id::valid), "Issuer")),
        LabMsg::Solution(m) => check(m.client.valid(), "ClientID").and(check(solution_ok(&m.solution), "Solution")),
        LabMsg::Result(m) => check(m.client.valid(), "ClientID")
            .and(check(solution_ok(&m.solution), "Solution"))
            .and(check(m.result <= 1, "Result")),
    }
}

/// True if every character is printable ASCII (space to `~`).
pub fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn string_or_int<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Int(u64),
        Str(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::Int(n) => n.to_string(),
        Either::Str(s) => s,
    })
}

/// Leading zero bits of the SHA-1 digest of `solution`'s bytes, read as a big-endian number.
pub fn work(solution: &str) -> u32 {
    Digest::of(HashAlg::Sha1, solution.as_bytes()).leading_zeros()
}

/// True if `solution` proves `difficulty` bits of work.
pub fn meets(solution: &str, difficulty: u32) -> bool {
    work(solution) >= difficulty
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha1::Digest as _;

    fn dec(json: &str, ch: Channel) -> Result<LabMsg, LabDecodeError> {
        decode(json.as_bytes(), ch)
    }

    #[test]
    fn integer_and_string_ids_decode_and_round_trip() {
        let m = dec(r#"{"ClientID": 42, "VoteID": "9f1c-aa"}"#, Channel::Voting).unwrap();
        let LabMsg::Election(e) = &m else { panic!("{m:?}") };
        assert_eq!((&e.client, &e.vote), (&Id::Int(42), &Id::Str("9f1c-aa".into())));
        assert_eq!(String::from_utf8(encode(&m)).unwrap(), r#"{"ClientID":42,"VoteID":"9f1c-aa"}"#);
        assert_eq!(decode(&encode(&m), Channel::Voting).unwrap(), m);
        let r = dec(r#"{"ClientID":"c","TransactionID":3,"Solution":12345,"Result":1,"extra":true}"#, Channel::Result);
        let LabMsg::Result(r) = r.unwrap() else { panic!() };
        assert_eq!((r.tx, r.solution.as_str(), r.result), (3, "12345", 1));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let cases = [
            (r#"{"ClientID": 1.5}"#, Channel::Init, "lab_malformed"),
            (r#"{"ClientID": ""}"#, Channel::Init, "lab_invalid_field"),
            (r#"{"ClientID": "a\u0007b"}"#, Channel::Init, "lab_invalid_field"),
            (r#"{"ClientID": null}"#, Channel::Init, "lab_malformed"),
            (r#"{"ClientID": 18446744073709551615}"#, Channel::Init, "lab_malformed"),
            (r#"{"TransactionID": 0, "Challenge": 0}"#, Channel::Challenge, "lab_invalid_field"),
            (r#"{"TransactionID": 0, "Challenge": 65}"#, Channel::Challenge, "lab_invalid_field"),
            (r#"{"TransactionID": -1, "Challenge": 12}"#, Channel::Challenge, "lab_malformed"),
            (r#"{"ClientID": 1, "TransactionID": 0, "Solution": ""}"#, Channel::Solution, "lab_invalid_field"),
            (r#"{"ClientID":1,"TransactionID":0,"Solution":"x","Result":2}"#, Channel::Result, "lab_invalid_field"),
            (r#"{"ClientID": 1}"#, Channel::Voting, "lab_malformed"),
            ("not json", Channel::Init, "lab_malformed"),
        ];
        for (json, ch, reason) in cases {
            assert_eq!(dec(json, ch).unwrap_err().reason(), reason, "{json}");
        }
        let long = format!(r#"{{"ClientID":1,"TransactionID":0,"Solution":"{}"}}"#, "a".repeat(MAX_SOLUTION_LEN + 1));
        assert_eq!(dec(&long, Channel::Solution).unwrap_err().reason(), "lab_invalid_field");
        let huge = format!(r#"{{"ClientID":"{}"}}"#, "a".repeat(MAX_PAYLOAD));
        assert_eq!(dec(&huge, Channel::Init).unwrap_err().reason(), "lab_too_large");
    }

    #[test]
    fn ballots_compare_numerically_only_when_all_are_integers() {
        let (i, s) = (Id::Int, |x: &str| Id::Str(x.into()));
        let numeric = BallotOrder::of([(&i(9), &i(1)), (&i(10), &i(2))]);
        assert_eq!(numeric, BallotOrder::Numeric);
        assert_eq!(numeric.cmp((&i(10), &i(1)), (&i(9), &i(7))), Ordering::Greater);
        assert_eq!(numeric.cmp((&i(5), &i(2)), (&i(5), &i(10))), Ordering::Less);
        let text = BallotOrder::of([(&i(9), &i(1)), (&s("10"), &i(2))]);
        assert_eq!(text, BallotOrder::Text);
        // "9" > "10" as strings, as in Python.
        assert_eq!(text.cmp((&i(9), &i(1)), (&s("10"), &i(2))), Ordering::Greater);
        assert_eq!(text.cmp((&s("ab"), &i(10)), (&s("ab"), &s("9"))), Ordering::Less);
        assert_eq!(text.cmp((&s("a"), &i(1)), (&s("a"), &i(1))), Ordering::Equal);
    }

    fn any_id() -> impl proptest::strategy::Strategy<Value = Id> {
        use proptest::prelude::*;
        prop_oneof![any::<i64>().prop_map(Id::Int), "[ -~]{1,64}".prop_map(Id::Str)]
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_drop_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            for ch in [Channel::Init, Channel::Voting, Channel::Challenge, Channel::Solution, Channel::Result] {
                if let Ok(m) = decode(&bytes, ch) {
                    proptest::prop_assert_eq!(decode(&encode(&m), ch), Ok(m));
                }
            }
        }

        #[test]
        fn valid_messages_round_trip(client in any_id(), vote in any_id(), tx in 0u64.., solution in "[ -~]{1,256}", result in 0u8..=1, marked: bool, d in 1u32..=64) {
            let msgs = [
                LabMsg::Init(InitMsg { client: client.clone(), hashvote: marked }),
                LabMsg::Election(ElectionMsg { client: client.clone(), vote, hashvote: marked }),
                LabMsg::Challenge(ChallengeMsg { tx, difficulty: d, issuer: marked.then(|| client.clone()) }),
                LabMsg::Result(ResultMsg { client, tx, solution, result }),
            ];
            for m in msgs {
                proptest::prop_assert_eq!(decode(&encode(&m), m.channel()), Ok(m.clone()));
            }
        }
    }

    #[test]
    fn proof_of_work_matches_known_sha1_values() {
        // SHA-1("abc") = a9993e36...: the first byte 0xa9 has no leading zero bit.
        assert_eq!(hex::encode(sha1::Sha1::digest(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(work("abc"), 0);
        // SHA-1("lab-260416") = 00000f2d... (found with Python's hashlib): 20 zero bits.
        assert_eq!(hex::encode(sha1::Sha1::digest(b"lab-260416")), "00000f2d5ff49c55ea26aa1c6eacaff9d34cf775");
        assert_eq!(work("lab-260416"), 20);
        assert!(meets("lab-260416", 20) && !meets("lab-260416", 21));
        // Search a few candidates and check each against the digest computed independently.
        let found = (0u64..)
            .map(|n| format!("hv-{n}"))
            .find(|s| {
                let d = sha1::Sha1::digest(s.as_bytes());
                d[0] == 0 && d[1] & 0xf0 == 0
            })
            .unwrap();
        assert!(meets(&found, 12), "{found}");
        let d = sha1::Sha1::digest(found.as_bytes());
        let top = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        assert_eq!(work(&found), top.leading_zeros().min(31), "{found}");
    }
}
