//! Scripted rooms for the tests of the view, the dashboard and the report.

use hashvote_core::room::{Envelope, Msg, Pos};
use peer::pace::Pace;
use peer::pow::{Digest, HashAlg};
use peer::protocol::{Block, Challenge, Outcome, PeerId, RejectReason, Term, TxId};
use peer::status::{Role, Status, VERSION};
use proptest::prelude::*;

use super::{Observed, RoomView};

/// A status of `id` in `role`.
pub fn status(id: PeerId, role: Role, term: Term, controller: Option<PeerId>, hash_rate: u64) -> Observed {
    Observed::Status(Status {
        version: VERSION,
        id,
        incarnation: u64::from(id) * 7,
        role,
        term,
        controller,
        height: 0,
        tx: None,
        difficulty: None,
        hash_rate,
        hashes: 0,
        mining_ms: 0,
        blocks_won: 0,
        published: 0,
        delivered: 0,
        threads: 1,
        started_ms: 0,
        at_ms: 0,
        waiting: None,
    })
}

/// A message from `from`.
pub fn msg(from: PeerId, msg: Msg) -> Observed {
    Observed::Message(Envelope::new(from, msg))
}

/// A hello from `from` knowing nothing.
pub fn hello(from: PeerId) -> Observed {
    msg(
        from,
        Msg::Hello {
            to: None,
            want_reply: true,
            key: 1,
            incarnation: 1,
            since_ms: 0,
            term: 0,
            controller: None,
            height: 0,
            peers: Vec::new(),
        },
    )
}

/// `from` leaving.
pub fn leave(from: PeerId) -> Observed {
    msg(from, Msg::Leave { incarnation: 1 })
}

/// A ballot of `from` for `term`.
pub fn vote(from: PeerId, term: Term) -> Observed {
    msg(from, Msg::Ballot { term, ballot: from, key: 1, pos: Pos { last_term: 0, height: 0 }, proposal: None })
}

/// A challenge of `from` for `tx`, issued at `issued_ms`.
pub fn challenge(from: PeerId, term: Term, tx: TxId, difficulty: u8, issued_ms: u64) -> Observed {
    let alg = HashAlg::Sha1;
    let challenge =
        Challenge { term, tx, alg, difficulty, pace: Pace::Fixed(difficulty), issued_ms, prev: Digest::zero(alg) };
    msg(from, Msg::Challenge { challenge, commit: tx, config: None })
}

/// A block of `tx` mined by `miner` in `solve` ms.
pub fn block(term: Term, tx: TxId, miner: PeerId, difficulty: u8, issued_ms: u64, solve: u64) -> Block {
    let alg = HashAlg::Sha1;
    let prev = Digest::zero(alg);
    let hash = peer::pow::proof(&prev, tx, miner, tx);
    Block {
        tx,
        term,
        alg,
        difficulty,
        pace: Pace::Fixed(difficulty),
        issued_ms,
        solved_ms: issued_ms + solve,
        prev,
        miner,
        nonce: tx,
        hash,
        change: None,
    }
}

/// An accepted result from `from`.
pub fn accepted(from: PeerId, block: Block) -> Observed {
    msg(from, Msg::Result { term: block.term, outcome: Outcome::Accepted(block), commit: 0 })
}

/// A result of `from` rejecting `miner`'s solution for `tx`.
pub fn rejected(from: PeerId, term: Term, tx: TxId, miner: PeerId, nonce: u64) -> Observed {
    let outcome = Outcome::Rejected { tx, miner, nonce, reason: RejectReason::AlreadySolved };
    msg(from, Msg::Result { term, outcome, commit: 0 })
}

/// Peers of the scripted room.
pub const A: PeerId = 1111;
/// Peers of the scripted room.
pub const B: PeerId = 2222;
/// Peers of the scripted room.
pub const C: PeerId = 3333;

/// Three peers meet and elect B (term 1) in 30 ms; two blocks; B dies and C takes over (term
/// 2) after a 400 ms failover; a third block. Returns the `(observer ms, thing)` script.
pub fn room() -> Vec<(u64, Observed)> {
    vec![
        (1_000, hello(A)),
        (1_010, hello(B)),
        (1_020, hello(C)),
        (1_100, vote(A, 1)),
        (1_105, vote(B, 1)),
        (1_110, vote(C, 1)),
        (1_130, challenge(B, 1, 0, 20, 50_000)),
        (1_200, status(A, Role::Miner, 1, Some(B), 12_300_000)),
        (1_200, status(B, Role::Controller, 1, Some(B), 0)),
        (1_200, status(C, Role::Miner, 1, Some(B), 9_000_000)),
        (1_900, accepted(B, block(1, 0, A, 20, 50_000, 800))),
        (1_910, challenge(B, 1, 1, 21, 50_810)),
        (2_200, status(A, Role::Miner, 1, Some(B), 12_300_000)),
        (2_200, status(B, Role::Controller, 1, Some(B), 0)),
        (2_200, status(C, Role::Miner, 1, Some(B), 9_500_000)),
        (2_500, accepted(B, block(1, 1, C, 21, 50_810, 600))),
        (2_510, challenge(B, 1, 2, 21, 51_420)),
        (3_000, status(B, Role::Offline, 1, Some(B), 0)),
        (3_100, vote(A, 2)),
        (3_120, vote(C, 2)),
        (3_150, status(C, Role::Controller, 2, Some(C), 0)),
        (3_400, challenge(C, 2, 2, 21, 52_000)),
        (3_500, status(A, Role::Miner, 2, Some(C), 12_500_000)),
        (4_000, accepted(C, block(2, 2, A, 21, 52_000, 1_000))),
    ]
}

/// Any message or status, from few ids and terms (so that they collide) and extremes.
pub fn any_observed() -> impl Strategy<Value = (u64, Observed)> {
    let id = prop_oneof![1u32..6, Just(u32::MAX)];
    let num = prop_oneof![0u64..4, Just(u64::MAX), Just(u64::MAX - 1)];
    let role = prop_oneof![
        Just(Role::Joining),
        Just(Role::Electing),
        Just(Role::Controller),
        Just(Role::Miner),
        Just(Role::Offline)
    ];
    let at = prop_oneof![0u64..20_000, Just(u64::MAX)];
    (at, 0u8..8, id.clone(), id, num.clone(), num.clone(), num, role).prop_map(
        |(at, kind, from, other, term, tx, n, role)| {
            let term = term.max(1);
            let seen = match kind {
                0 => status(from, role, term, Some(other), n),
                1 => hello(from),
                2 => leave(from),
                3 => vote(from, term),
                4 => challenge(from, term, tx, 20, n),
                5 => accepted(from, block(term, tx, other, 20, n.min(u64::MAX / 2), n / 2)),
                6 => rejected(from, term, tx, other, n),
                _ => msg(from, Msg::Solution { tx, nonce: n }),
            };
            (at, seen)
        },
    )
}

/// A view fed the whole of [`room`].
pub fn room_view() -> RoomView {
    let mut view = RoomView::new();
    for (at, seen) in room() {
        view.observe(at, seen);
    }
    view
}
