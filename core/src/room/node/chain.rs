//! Following the controller's chain: its heartbeats, challenges and blocks as a follower takes
//! them, the mining of its challenges, and the changes to our own chain that every role makes
//! (append, truncate, a divergence noted). The `Chain` type itself is `crate::chain`'s.

use super::{Action, Diverged, RoomNode, SOLUTION_RETRY_MS, Write};
use crate::chain::Chain;
use crate::events::Event;
use crate::pow::{Digest, HashAlg, Template};
use crate::protocol::{Block, Challenge, Change, DropReason, PeerId, TxId};
use crate::room::msg::{Msg, RoomConfig};
use crate::work::{Found, Job};

impl RoomNode {
    pub(super) fn tip(&self) -> Digest {
        self.chain.tip_hash(self.chain.alg(self.cfg.alg))
    }

    /// Our chain equals the controller's up to `upto`: take its commit (as far as that) and
    /// acknowledge.
    pub(super) fn matched(&mut self, controller: PeerId, upto: u64, commit: u64) {
        self.diverged = None;
        self.set_commit(commit.min(upto));
        let (to, term, height, at) = self.last_ack;
        if !self.is_voter() && (to, term) == (controller, self.term) && self.now < at + self.cfg.timing.learner_ack_ms()
        {
            return;
        }
        if (to, term, height) == (controller, self.term, upto) && self.now < at + self.cfg.timing.ack_quiet_ms() {
            return;
        }
        self.last_ack = (controller, self.term, upto, self.now);
        self.publish(Msg::Ack { to: controller, term: self.term, height: upto, key: self.cfg.key });
    }

    /// Whether our chain's first `h` blocks end in `hash` (for `h = 0`: block 0 links to it), so
    /// that, by the hash chain, they are the blocks that `hash` ends.
    pub(super) fn links_at(&self, h: u64, hash: Digest) -> bool {
        match h {
            0 => self.tip_or_base_at_zero(hash.alg()) == Some(hash),
            _ => self.chain.get(h - 1).is_some_and(|b| b.hash == hash),
        }
    }

    fn tip_or_base_at_zero(&self, alg: HashAlg) -> Option<Digest> {
        match (&self.config, &self.genesis_offer) {
            (Some(c), _) | (None, Some(c)) => Some(c.digest(alg)),
            (None, None) => None,
        }
    }

    pub(super) fn on_heartbeat(&mut self, from: PeerId, height: u64, commit: u64, tip: Digest, open: Option<TxId>) {
        if height > 0 {
            self.saw_room();
        }
        if height > self.chain.height() || !self.links_at(height, tip) {
            // Behind, or our block below its height is not the controller's.
            if height <= self.chain.height() {
                self.diverge();
            }
            self.request_sync(from);
            return;
        }
        self.matched(from, height, commit);
        let Some(tx) = open else { return };
        match (self.mining, self.submitted) {
            // Our solution may have been lost (a reconnect, a broker restart): again, at most
            // twice a second.
            (Some(c), Some(nonce)) if c.tx == tx && self.now >= self.last_solution_ms + SOLUTION_RETRY_MS => {
                self.last_solution_ms = self.now;
                self.publish(Msg::Solution { tx, nonce });
            }
            (Some(c), _) if c.tx == tx => {}
            // We missed the challenge: the sync reply carries it.
            _ => self.request_sync(from),
        }
    }

    pub(super) fn on_challenge(&mut self, from: PeerId, c: Challenge, commit: u64, config: Option<RoomConfig>) {
        if c.tx > 0 {
            self.saw_room();
        }
        if c.tx > self.chain.height() {
            self.request_sync(from);
            return;
        }
        if c.tx == 0 && self.config.is_none() {
            // Block 0 links to the configuration it records.
            let Some(config) = config.filter(|k| k.digest(c.alg) == c.prev) else {
                self.drop_msg(DropReason::BadConfiguration, format!("challenge 0 from {from}"));
                return;
            };
            self.genesis_offer = Some(config);
        }
        if !self.links_at(c.tx, c.prev) {
            self.diverge();
            self.request_sync(from);
            return;
        }
        // Our chain is the controller's up to c.tx. Blocks of ours beyond it (accepted by an
        // earlier controller, never committed) stay until the controller's own block at their
        // height replaces them; meanwhile we mine its challenge like everyone.
        self.matched(from, c.tx, commit);
        self.follow(c);
    }

    /// Starts mining `c`, unless it is the job already running.
    pub(super) fn follow(&mut self, c: Challenge) {
        let prefix = &self.chain.blocks()[..usize::try_from(c.tx).unwrap_or(usize::MAX).min(self.chain.blocks().len())];
        if !c.pace.allows(prefix, c.difficulty) {
            let detail =
                format!("challenge {} asks for {} bits, which {:?} does not allow", c.tx, c.difficulty, c.pace);
            self.drop_msg(DropReason::BadDifficulty, detail);
            return;
        }
        let same = self.mining.is_some_and(|o| (o.tx, o.prev, o.difficulty) == (c.tx, c.prev, c.difficulty));
        self.mining = Some(c);
        if same {
            if let Some(nonce) = self.submitted {
                self.publish(Msg::Solution { tx: c.tx, nonce });
            }
            return;
        }
        self.submitted = None;
        let template = Template::new(&c.prev, c.tx, self.cfg.id);
        self.out.push(Action::Mine(Job { tx: c.tx, template, difficulty: c.difficulty }));
        self.emit(Event::MiningStarted { term: c.term, tx: c.tx, difficulty: c.difficulty });
    }

    pub(super) fn mined(&mut self, found: Found) {
        let Some(c) = self.mining else { return };
        if c.tx != found.tx || self.is_controller() {
            return;
        }
        self.submitted = Some(found.nonce);
        let (tx, nonce, hashes, elapsed_ms) = (found.tx, found.nonce, found.hashes, found.elapsed_ms);
        self.emit(Event::SolutionFound { tx, nonce, hashes, elapsed_ms });
        self.publish(Msg::Solution { tx, nonce });
    }

    /// An accepted block from the controller of our term.
    pub(super) fn on_block(&mut self, from: PeerId, block: Block, commit: u64) {
        // Anyone can publish in the controller's name: a block that is not its own proof of work
        // is dropped before it can make us drop anything of ours.
        if let Err(e) = crate::chain::verify_work(&block) {
            self.drop_msg(DropReason::InvalidBlock, format!("from {from}: {e}"));
            return;
        }
        let height = self.chain.height();
        if block.tx > height {
            self.saw_room();
            self.request_sync(from);
            return;
        }
        if let Some(mine) = self.chain.get(block.tx) {
            // Blocks are known by their hash (it covers prev, tx, miner and nonce): the same
            // solution accepted by two controllers is one block, whatever term each recorded.
            if mine.hash == block.hash {
                return;
            }
            // Raft's rule: a block of the controller's that conflicts with ours at its height, on
            // a prefix we share, replaces ours and what follows (never below the commit point).
            if !self.links_at(block.tx, block.prev) || !self.truncate(block.tx) {
                self.diverge();
                self.request_sync(from);
                return;
            }
        }
        if block.tx == 0 && self.config.is_none() {
            match self.genesis_offer.take() {
                Some(config) if config.digest(block.alg) == block.prev => self.take_config(config, block.alg),
                _ => {
                    self.saw_room();
                    self.request_sync(from);
                    return;
                }
            }
        }
        if let Err(e) = self.append(block) {
            self.drop_msg(DropReason::InvalidBlock, format!("from {from}: {e}"));
            self.diverge();
            self.request_sync(from);
            return;
        }
        self.matched(from, block.tx + 1, commit);
    }

    pub(super) fn take_config(&mut self, config: RoomConfig, alg: HashAlg) {
        self.chain = Chain::with_base(config.digest(alg));
        self.persist(Write::Config(config.clone()));
        // Followed before we could tell (see `accept_controller`): a stranger is no controller.
        if let Some(c) = self.controller.filter(|&c| config.key_of(c).is_none()) {
            self.controller = None;
            self.drop_msg(
                DropReason::NotMember,
                format!("{c} was followed as controller but is not a voting member of the room"),
            );
            if self.term > self.promised {
                // So was its term, which we promised nothing in: kept, it would make us drop
                // the room's controller as stale for good (seed 937136). Were it the room's, a
                // member would move us to it again.
                self.fall_back_to(self.promised);
            }
        }
        self.config = Some(config);
        self.saw_room();
        self.refresh_members();
    }

    /// Verifies, appends and persists a block; bookkeeping for mining and events.
    pub(super) fn append(&mut self, block: Block) -> Result<(), crate::chain::ChainError> {
        if block.tx == 0 && self.chain.height() == 0 && self.config.is_some() && self.is_controller() {
            let config = self.config.clone().unwrap_or_else(|| unreachable!());
            if self.chain.base().is_none() {
                self.chain = Chain::with_base(config.digest(block.alg));
                self.persist(Write::Config(config));
            }
        }
        let members = match block.change {
            None => None,
            // Applied from the moment it is in the chain, committed or not (Raft §4.1).
            Some(change) => Some(
                self.members
                    .as_ref()
                    .and_then(|m| m.apply(change))
                    .ok_or(crate::chain::ChainError::Members(block.tx))?,
            ),
        };
        self.chain.append(block)?;
        self.persist(Write::Append(vec![block]));
        if let Some(members) = members {
            self.members = Some(members);
            self.check_rival();
            if let Some(Change::Remove { id, key }) = block.change
                && let Some(p) = self.peers.get(&id).filter(|p| p.key == key)
            {
                // Forget the member that left: a process under its id with another key (the
                // member back with its disk lost) is then a peer like any other.
                if p.gone {
                    self.gone_peers -= 1;
                }
                self.peers.remove(&id);
            }
            self.refresh_voters();
        }
        self.emit(Event::BlockAccepted {
            change: block.change,
            term: block.term,
            tx: block.tx,
            winner: block.miner,
            difficulty: block.difficulty,
            nonce: block.nonce,
            solve_ms: block.solved_ms.saturating_sub(block.issued_ms),
            hash: block.hash.to_hex(),
            prev: block.prev.to_hex(),
        });
        if self.mining.is_some_and(|c| c.tx == block.tx) {
            self.out.push(Action::StopMining);
            self.mining = None;
            self.submitted = None;
        }
        Ok(())
    }

    /// Drops our blocks from `tx` on: allowed only above the commit point.
    pub(super) fn truncate(&mut self, tx: TxId) -> bool {
        if tx < self.commit {
            let commit = self.commit;
            self.emit(Event::CommittedConflict { tx, commit });
            return false;
        }
        self.chain.truncate(tx);
        self.persist(Write::Truncate(tx));
        self.emit(Event::ChainTruncated { height: self.chain.height() });
        if tx == 0 {
            self.chain = Chain::new();
            self.config = None;
        }
        self.refresh_members();
        true
    }

    /// A block failed to link: the next sync starts below our tip. What an earlier reply of
    /// the same controller in the same term showed to agree stays agreed; a new controller's
    /// chain is compared from the commit point again.
    pub(super) fn diverge(&mut self) {
        let (controller, term) = (self.controller, self.term);
        if !self.diverged.is_some_and(|d| d.controller == controller && d.term == term) {
            self.diverged = Some(Diverged { controller, term, agreed: self.commit });
        }
    }
}
