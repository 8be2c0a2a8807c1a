//! The controller's rounds: its heartbeats, the challenges it issues, the solutions it judges and
//! the blocks it makes of them, the acknowledgements it counts and the commit point they move.

use rand::Rng;

use super::RoomNode;
use crate::events::Event;
use crate::pow;
use crate::protocol::{Block, Challenge, DropReason, Outcome, PeerId, RejectReason, Term, TxId};
use crate::room::msg::Msg;

impl RoomNode {
    pub(super) fn beat(&mut self) {
        self.next_beat = self.now + self.cfg.timing.heartbeat_ms;
        let (height, commit, tip) = (self.chain.height(), self.commit, self.tip());
        let open = self.open.map(|c| c.tx);
        self.publish(Msg::Heartbeat { term: self.term, key: self.cfg.key, height, commit, tip, open });
    }

    pub(super) fn publish_challenge(&mut self, c: Challenge) {
        let config = (c.tx == 0).then(|| self.config.clone()).flatten();
        self.publish(Msg::Challenge { challenge: c, commit: self.commit, config });
    }

    /// Opens the next transaction, once the last block is committed (or re-issues the open one).
    pub(super) fn issue(&mut self) {
        if !self.is_controller() || self.pending.is_some() {
            return;
        }
        if let Some(change) = self.change_due() {
            self.propose(change);
            return;
        }
        let tx = self.chain.height();
        let alg = self.chain.alg(self.cfg.alg);
        let prev = match (&self.config, tx) {
            (Some(config), 0) => config.digest(alg),
            _ => self.tip(),
        };
        let term = self.term;
        let c = match self.open {
            Some(c) if c.tx == tx && c.prev == prev => Challenge { term, ..c },
            _ => {
                let pace = self.cfg.pace;
                let difficulty = pace.next(self.chain.blocks()).unwrap_or_else(|| {
                    let (lo, hi) = pace.bounds();
                    self.rng.random_range(lo..=hi)
                });
                Challenge { term, tx, alg, difficulty, pace, issued_ms: self.now, prev }
            }
        };
        self.open = Some(c);
        self.emit(Event::ChallengeIssued { term, tx, difficulty: c.difficulty });
        self.publish_challenge(c);
    }

    /// Sends, appends and counts a block of ours. The next transaction is issued at once when
    /// every block below this one is committed (a pipeline of one: the quorum writes the block
    /// while the miners search for the next), and otherwise waits for this one's commit; so is
    /// the next after a change of members (one change at a time, and each alone in flight).
    pub(super) fn accept_own(&mut self, block: Block, what: &str) {
        // The result goes out before our own write, so the followers write the block while we
        // do (Raft's leader may write in parallel with replication, §10.2.1). The next challenge
        // comes after the write (see the peer's store: a message waits for the writes before it).
        self.publish(Msg::Result { term: self.term, outcome: Outcome::Accepted(block), commit: self.commit });
        if let Err(e) = self.append(block) {
            self.drop_msg(DropReason::InvalidBlock, format!("our own {what} {}: {e}", block.tx));
            return;
        }
        self.pending = Some(block.tx);
        self.check_commit();
        if self.pending.is_some() && block.change.is_none() && self.commit >= block.tx {
            self.pending = None;
            self.issue();
        }
    }

    pub(super) fn on_solution(&mut self, miner: PeerId, tx: TxId, nonce: u64) {
        if !self.is_controller() {
            return;
        }
        let term = self.term;
        let verdict = match self.open {
            _ if tx < self.chain.height() || self.pending == Some(tx) => Err(RejectReason::AlreadySolved),
            Some(c) if c.tx == tx => {
                let hash = pow::proof(&c.prev, tx, miner, nonce);
                if hash.leading_zeros() >= u32::from(c.difficulty) {
                    let solved_ms = self.now.max(c.issued_ms);
                    let (alg, difficulty, pace, issued_ms, prev) = (c.alg, c.difficulty, c.pace, c.issued_ms, c.prev);
                    Ok(Block {
                        tx,
                        term,
                        alg,
                        difficulty,
                        pace,
                        issued_ms,
                        solved_ms,
                        prev,
                        miner,
                        nonce,
                        hash,
                        change: None,
                    })
                } else {
                    Err(RejectReason::InsufficientWork)
                }
            }
            _ => Err(RejectReason::UnknownTransaction),
        };
        match verdict {
            Ok(block) => self.accept_own(block, "block"),
            Err(reason) => {
                self.emit(Event::SolutionRejected { tx, miner, reason: reason.as_str().into() });
                // A late solution is not answered: the transaction's `Accepted` result, sent to
                // every peer, already told its miner. In a large room nearly every miner is
                // late: 1,000 peers on a 3-node RabbitMQ cluster sent their controller about a
                // thousand late solutions a block, and its thousand answers a block were more
                // than the cluster took from one connection; its publishes, and with them its
                // heartbeats, waited, and the room lost it after 3 to 7 blocks.
                if reason != RejectReason::AlreadySolved {
                    let outcome = Outcome::Rejected { tx, miner, nonce, reason };
                    self.publish(Msg::Result { term, outcome, commit: self.commit });
                }
            }
        }
    }

    pub(super) fn on_ack(&mut self, from: PeerId, key: u64, term: Term, height: u64) {
        if term > self.term {
            // A peer that moved on: this controller (or follower) is stale. (A member removed in
            // blocks it lacks, say, that went on to terms of its own: it follows us only once we
            // are in a term after them, seed 38056.)
            self.enter_term(term);
            return;
        }
        if term < self.term || !self.is_controller() {
            return;
        }
        if !self.is_voter_id(from, key) {
            self.learner_ack(from, key, height);
            return;
        }
        let entry = self.acks.entry(from).or_insert((0, 0));
        entry.0 = entry.0.max(height.min(self.chain.height()));
        entry.1 = self.now;
        // Most acks only say "still here": only one beyond the commit point can move it.
        if height > self.commit {
            self.check_commit();
        }
    }

    /// The largest height a quorum holds, counting only blocks of this term (Raft §5.4.2).
    fn check_commit(&mut self) {
        let Some(voters) = self.voters() else { return };
        let height = self.chain.height();
        let mut heights: Vec<u64> = voters
            .members()
            .iter()
            .map(|m| if m.id == self.cfg.id { height } else { self.acks.get(&m.id).map_or(0, |a| a.0) })
            .collect();
        let q = voters.quorum() - 1;
        // The quorum-th highest height: a quorum holds at least that much.
        let held = *heights.select_nth_unstable_by(q, |a, b| b.cmp(a)).1;
        if held <= self.commit || self.chain.get(held - 1).is_none_or(|b| b.term != self.term) {
            return;
        }
        self.set_commit(held);
        if self.pending.is_some_and(|tx| tx < held) {
            self.pending = None;
            self.issue();
        } else {
            // The next challenge went out before this commit (see `accept_own`): the room
            // learns of it now, not at the next beat.
            self.beat();
        }
    }

    pub(super) fn set_commit(&mut self, commit: u64) {
        if commit <= self.commit {
            return;
        }
        let from = self.commit;
        self.commit = commit;
        // A hint, promised to no one: written after the batch's messages (see `handle`), so the
        // next challenge does not wait for it.
        self.commit_dirty = true;
        for tx in from..commit {
            if let Some(b) = self.chain.get(tx) {
                let (term, winner) = (b.term, b.miner);
                self.emit(Event::BlockCommitted { tx, term, winner });
            }
        }
    }
}
