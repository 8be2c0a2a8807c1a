//! Scripted rooms for the tests of the view, the dashboard and the report.

use peer::pace::Pace;
use peer::pow::{Digest, HashAlg};
use peer::protocol::{Block, Challenge, Envelope, Message, Outcome, PeerId, RejectReason, Term, TxId, VERSION, View};
use peer::status::{Role, Status};
use proptest::prelude::*;

use super::{Observed, RoomView};

/// A status of `id` in `role`.
pub fn status(id: PeerId, role: Role, term: Term, leader: Option<PeerId>, hash_rate: u64) -> Observed {
    Observed::Status(Status {
        version: VERSION,
        id,
        incarnation: u64::from(id) * 7,
        role,
        term,
        leader,
        height: 0,
        tx: None,
        difficulty: None,
        hash_rate,
        hashes: 0,
        blocks_won: 0,
        threads: 1,
        started_ms: 0,
        at_ms: 0,
        waiting: None,
    })
}

/// A message from `from`.
pub fn msg(from: PeerId, msg: Message) -> Observed {
    Observed::Message(Envelope::new(from, msg))
}

/// A hello from `from` knowing nothing.
pub fn hello(from: PeerId) -> Observed {
    msg(
        from,
        Message::Hello {
            want_reply: true,
            view: View { term: 0, leader: None, height: 0 },
            incarnation: 1,
            since_ms: 0,
        },
    )
}

/// A vote of `from` for `term`.
pub fn vote(from: PeerId, term: Term) -> Observed {
    msg(from, Message::Vote { term, vote: from, height: 0 })
}

/// A challenge of `from` for `tx`, issued at `issued_ms`.
pub fn challenge(from: PeerId, term: Term, tx: TxId, difficulty: u8, issued_ms: u64) -> Observed {
    let alg = HashAlg::Sha1;
    msg(
        from,
        Message::Challenge(Challenge {
            term,
            tx,
            alg,
            difficulty,
            pace: Pace::Fixed(difficulty),
            issued_ms,
            prev: Digest::zero(alg),
        }),
    )
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
    }
}

/// An accepted result from `from`.
pub fn accepted(from: PeerId, block: Block) -> Observed {
    msg(from, Message::Result { term: block.term, outcome: Outcome::Accepted(block) })
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

/// The same thing as the room protocol (wire version 2) says it: hellos, ballots, challenges,
/// results and leaves translated; statuses as they are.
pub fn in_room_protocol(seen: Observed) -> Observed {
    use hashvote_core::room::{Envelope as E, Msg, Pos};
    let Observed::Message(env) = seen else { return seen };
    let pos = |height| Pos { last_term: 0, height };
    let msg = match env.msg {
        Message::Hello { want_reply, view, incarnation, since_ms } => Msg::Hello {
            to: None,
            want_reply,
            key: 1,
            incarnation,
            since_ms,
            term: view.term,
            controller: view.leader,
            height: view.height,
        },
        Message::Leave => Msg::Leave { incarnation: 1 },
        Message::Vote { term, vote, height } => {
            Msg::Ballot { term, ballot: vote, key: 1, pos: pos(height), proposal: None }
        }
        Message::Challenge(challenge) => Msg::Challenge { challenge, commit: challenge.tx, config: None },
        Message::Result { term, outcome } => Msg::Result { term, outcome, commit: 0 },
        Message::Solution { tx, nonce } => Msg::Solution { tx, nonce },
        other => panic!("no room protocol twin for {other:?}"),
    };
    Observed::Room(E::new(env.from, msg))
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
    (at, 0u8..16, id.clone(), id, num.clone(), num.clone(), num, role).prop_map(
        |(at, kind, from, other, term, tx, n, role)| {
            let term = term.max(1);
            let seen = match kind % 8 {
                0 => status(from, role, term, Some(other), n),
                1 => hello(from),
                2 => msg(from, Message::Leave),
                3 => vote(from, term),
                4 => challenge(from, term, tx, 20, n),
                5 => accepted(from, block(term, tx, other, 20, n.min(u64::MAX / 2), n / 2)),
                6 => msg(
                    from,
                    Message::Result {
                        term,
                        outcome: Outcome::Rejected { tx, miner: other, nonce: n, reason: RejectReason::AlreadySolved },
                    },
                ),
                _ => msg(from, Message::Solution { tx, nonce: n }),
            };
            // Half of them in the room protocol's words.
            (at, if kind >= 8 { in_room_protocol(seen) } else { seen })
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
