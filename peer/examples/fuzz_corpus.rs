//! Writes the seed corpus of the `decode` fuzz target: one real, encoded message of each kind
//! (and each outcome, pace and hash function), as the peers put them on the wire.
//!
//! ```sh
//! cargo run -p peer --example fuzz_corpus            # into fuzz/corpus/decode/
//! cargo run -p peer --example fuzz_corpus -- DIR     # elsewhere
//! ```
//!
//! File names are `room_<kind>.bin` (the room protocol's messages), so regenerating overwrites the
//! same files.

use std::path::PathBuf;
use std::process::ExitCode;

use hashvote_core::room::{self, Member, Msg, Pos, RoomConfig};
use peer::pace::Pace;
use peer::pow::{self, Digest, HashAlg, Template};
use peer::protocol::{Block, Challenge, Change, Outcome, RejectReason};

/// A block of `alg` at `tx` on top of `prev`, with real proof of work at a low difficulty.
fn block(alg: HashAlg, tx: u64, prev: Digest, pace: Pace) -> Block {
    let (difficulty, miner, term) = (8, 0x5EED_0001, 2);
    let nonce = Template::new(&prev, tx, miner).search(u32::from(difficulty), 0, 1 << 24).expect("8 bits within 2^24");
    let hash = pow::proof(&prev, tx, miner, nonce);
    let (issued_ms, solved_ms) = (1_700_000_000_000 + tx * 1000, 1_700_000_000_000 + tx * 1000 + 420);
    Block { tx, term, alg, difficulty, pace, issued_ms, solved_ms, prev, miner, nonce, hash, change: None }
}

/// The sender and addressee of the samples.
const FROM: u32 = 0x0C0F_FEE0;
const TO: u32 = 0x5EED_0001;

/// What the samples carry: a room of three, its first blocks under each hash function, a change
/// of members and the challenges of each pace.
struct Fixtures {
    config: RoomConfig,
    /// SHA-1 blocks 0 and 1, at a fixed pace.
    b0: Block,
    b1: Block,
    /// SHA-256 block 1, retargeted.
    s1: Block,
    change: Block,
    /// The challenge for block 2 (SHA-1, fixed), and the same for block 0, of a range pace, and
    /// of SHA-256 retargeted.
    c: Challenge,
    c0: Challenge,
    c_range: Challenge,
    c_sha256: Challenge,
}

impl Fixtures {
    fn new() -> Self {
        let fixed = Pace::Fixed(8);
        let range = Pace::Range { lo: 4, hi: 12 };
        let retarget = Pace::Retarget { target_ms: 1000, start: 8, lo: 4, hi: 30 };
        let config =
            RoomConfig::new(vec![Member { id: FROM, key: 11 }, Member { id: TO, key: 22 }, Member { id: 7, key: 33 }])
                .expect("a valid configuration");
        let b0 = block(HashAlg::Sha1, 0, config.digest(HashAlg::Sha1), fixed);
        let b1 = block(HashAlg::Sha1, 1, b0.hash, fixed);
        let c = Challenge {
            term: 2,
            tx: 2,
            alg: HashAlg::Sha1,
            difficulty: 8,
            pace: fixed,
            issued_ms: 1_700_000_002_000,
            prev: b1.hash,
        };
        let c0 = Challenge { tx: 0, prev: config.digest(HashAlg::Sha1), ..c };
        let s0 = block(HashAlg::Sha256, 0, config.digest(HashAlg::Sha256), retarget);
        let s1 = block(HashAlg::Sha256, 1, s0.hash, retarget);
        // A change of members at height 2: no proof of work, its digest as its hash.
        let change =
            Block::change(2, 2, HashAlg::Sha1, fixed, 1_700_000_000_000, b1.hash, Change::Add { id: 77, key: 7_700 });
        let c_range = Challenge { pace: range, ..c };
        let c_sha256 = Challenge { alg: HashAlg::Sha256, pace: retarget, prev: s1.hash, ..c };
        Self { config, b0, b1, s1, change, c, c0, c_range, c_sha256 }
    }
}

/// The room protocol's messages, with every outcome, pace and hash function.
fn samples() -> Vec<(&'static str, room::Envelope)> {
    let (from, to) = (FROM, TO);
    let Fixtures { config, b0, b1, s1, change, c, c0, c_range, c_sha256 } = Fixtures::new();
    let pos = Pos { last_term: 2, height: 2 };
    let hello = |to| Msg::Hello {
        to,
        want_reply: to.is_none(),
        key: 11,
        incarnation: 0x1234_5678_9abc_def0,
        since_ms: 1_795_000_000_000,
        term: 2,
        controller: Some(from),
        height: 2,
        peers: if to.is_some() { vec![Member { id: from, key: 11 }] } else { Vec::new() },
    };
    let samples = [
        ("room_hello", hello(None)),
        ("room_hello_to", hello(Some(to))),
        ("room_leave", Msg::Leave { incarnation: 0x1234_5678_9abc_def0 }),
        ("room_pre_ballot", Msg::PreBallot { to: None, term: 3, key: 11, pos }),
        ("room_pre_ballot_answer", Msg::PreBallot { to: Some(7), term: 3, key: 11, pos }),
        ("room_ballot", Msg::Ballot { term: 3, ballot: 0xDEAD_BEEF, key: 11, pos, proposal: None }),
        (
            "room_ballot_proposal",
            Msg::Ballot {
                term: 1,
                ballot: 7,
                key: 11,
                pos: Pos::default(),
                proposal: Some(config.digest(HashAlg::Sha256)),
            },
        ),
        ("room_grant", Msg::Grant { to, to_key: 22, term: 3, key: 11 }),
        ("room_heartbeat", Msg::Heartbeat { term: 2, key: 11, height: 2, commit: 2, tip: b1.hash, open: Some(2) }),
        ("room_challenge", Msg::Challenge { challenge: c, commit: 2, config: None }),
        ("room_challenge_0", Msg::Challenge { challenge: c0, commit: 0, config: Some(config.clone()) }),
        ("room_challenge_range", Msg::Challenge { challenge: c_range, commit: 2, config: None }),
        ("room_challenge_sha256_retarget", Msg::Challenge { challenge: c_sha256, commit: 2, config: None }),
        ("room_solution", Msg::Solution { tx: 2, nonce: 1 << 40 }),
        ("room_result_accepted", Msg::Result { term: 2, outcome: Outcome::Accepted(b1), commit: 1 }),
        ("room_result_accepted_sha256", Msg::Result { term: 2, outcome: Outcome::Accepted(s1), commit: 1 }),
        ("room_result_change", Msg::Result { term: 2, outcome: Outcome::Accepted(change), commit: 2 }),
        (
            "room_result_rejected",
            Msg::Result {
                term: 2,
                outcome: Outcome::Rejected { tx: 1, miner: to, nonce: 77, reason: RejectReason::AlreadySolved },
                commit: 2,
            },
        ),
        ("room_ack", Msg::Ack { to, term: 2, height: 2, key: 11 }),
        ("room_sync_request", Msg::SyncRequest { to, from: 0, req: 99, key: 7 }),
        (
            "room_sync_reply",
            Msg::SyncReply {
                to,
                req: 99,
                term: 2,
                config: Some(config),
                blocks: vec![b0, b1],
                height: 2,
                commit: 2,
                open: Some(c),
            },
        ),
    ];
    samples.into_iter().map(|(name, msg)| (name, room::Envelope::new(from, msg))).collect()
}

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode"), PathBuf::from);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, envelope) in samples() {
        let path = dir.join(format!("{name}.bin"));
        let bytes = room::encode(&envelope);
        // Every seed is a message a peer really sends, so it should decode; one that does not is
        // still written (it exercises the rejection path) but reported, as it points at a bug.
        if let Err(e) = room::decode(&bytes, envelope.msg.channel(), 64 * 1024) {
            eprintln!("warning: the real message {name} does not decode: {e}");
        }
        if let Err(e) = std::fs::write(&path, &bytes) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    ExitCode::SUCCESS
}
