//! Catching up: whom a peer asks for blocks and when it asks again, the blocks it hands whoever
//! asks, and how it takes a reply (which of our blocks it replaces, how far our chain is shown
//! to agree with the replier's).

use rand::Rng;

use super::{Diverged, RoomNode};
use crate::events::Event;
use crate::pow::Digest;
use crate::protocol::{Block, Challenge, DropReason, MAX_SYNC_BLOCKS, PeerId, Term, TxId};
use crate::room::msg::{Msg, RoomConfig};

impl RoomNode {
    /// A heartbeat whose sender we do not accept as controller: whether to ask it for blocks.
    pub(super) fn sync_from_unknown_controller(&mut self, from: PeerId, height: u64) {
        if self.config.is_some() && !self.may_lead(from) && height > self.chain.height() {
            // A controller that our chain does not show as a member (yet): the room may
            // have added it in blocks we lack. We take them, appended only (as from any
            // peer that is not our controller), and follow it once they say it is one.
            // Whatever its term: a member removed in those blocks may have gone on to
            // terms of its own, which its pre-votes never win (seed 106535).
            // It has them: a request to anyone else gives way.
            self.request_sync_now(from);
        }
    }

    /// The sender of a hello has blocks we lack: whom to ask for them, it or our controller.
    pub(super) fn sync_after_hello(&mut self, from: PeerId) {
        match self.controller.filter(|_| self.controller_live()) {
            Some(c) if c != self.cfg.id => self.request_sync(c),
            // Without a live controller, take the blocks of whoever has them (only a
            // controller can make us drop any): without block 0 we know neither the room's
            // voters nor whether we are one, and a member added in blocks we lack does not
            // know it votes. (Seed 306646: a peer without block 0 had followed a forger,
            // silent since, and kept asking it.) A voter goes before a stranger we asked
            // last (seed 108701: a forger's heartbeat of a long chain drew every retry), or
            // before a controller fallen silent that we asked (seed 807713: a forger again).
            None => {
                // (Our controller, if any, is silent here.)
                let stale = self.syncing.is_some_and(|(to, ..)| !self.may_lead(to) || self.controller == Some(to));
                if self.may_lead(from) && stale {
                    self.request_sync_now(from);
                } else {
                    self.request_sync(from);
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_sync_request(&mut self, asker: PeerId, start: TxId, req: u64, member: bool) {
        if start > 0 {
            // The asker holds blocks: a room with a chain exists.
            self.saw_room();
        }
        let height = self.chain.height();
        let start = start.min(height);
        let batch = self.cfg.timing.sync_blocks.clamp(1, MAX_SYNC_BLOCKS) as u64;
        let end = start.saturating_add(batch).min(height);
        let blocks: Vec<Block> = (start..end).filter_map(|tx| self.chain.get(tx).copied()).collect();
        let config = if start == 0 { self.config.clone() } else { None };
        let open = if self.is_controller() { self.open } else { None };
        let (term, commit) = (self.term.max(1), self.commit);
        if self.is_controller() && member {
            self.acks.entry(asker).or_insert((0, 0)).1 = self.now;
        }
        self.publish(Msg::SyncReply { to: asker, req, term, config, blocks, height, commit, open });
    }

    /// Whom to ask again for what `peer` was asked: our controller while we hear it (`peer` may
    /// be gone), else `peer`.
    pub(super) fn sync_target(&self, peer: PeerId) -> PeerId {
        self.controller.filter(|&c| c != self.cfg.id && self.controller_live()).unwrap_or(peer)
    }

    /// How long a sync request may go unanswered: `sync_retry_ms` and twice the broker's lag
    /// (a reply behind a long queue would otherwise be asked for again, and come twice).
    pub(super) fn sync_retry_ms(&self) -> u64 {
        self.cfg.timing.sync_retry_ms + 2 * self.lag()
    }

    pub(super) fn request_sync(&mut self, peer: PeerId) {
        if peer == self.cfg.id {
            return;
        }
        // One request at a time, sent again after `sync_retry_ms()`; but one to a peer that may
        // never answer (it died) never holds back one to our controller.
        if let Some((to, at, _, _)) = self.syncing
            && self.now < at + self.sync_retry_ms()
            && (to == peer || self.controller != Some(peer))
        {
            return;
        }
        let from = match self.diverged {
            Some(d) => d.agreed.max(self.commit).min(self.chain.height()),
            None => self.chain.height(),
        };
        let req = self.rng.random();
        self.syncing = Some((peer, self.now, from, req));
        self.publish(Msg::SyncRequest { to: peer, from, req, key: self.cfg.key });
    }

    /// Asks `peer` now, whoever a request outstanding went to.
    pub(super) fn request_sync_now(&mut self, peer: PeerId) {
        if self.syncing.is_some_and(|(to, ..)| to != peer) {
            self.syncing = None;
        }
        self.request_sync(peer);
    }

    /// Two processes under the replier's id (the member and a copy with another data
    /// directory) both answer a request to it. One that has nothing beyond where we asked from
    /// (we asked because the replier seemed to) leaves the request open for the other's answer
    /// (seeds 2764 and 52115: the copy's short chain answered first, every time, and the
    /// member's was dropped as unsolicited).
    pub(super) fn keep_asking(&mut self, asked: Option<(PeerId, u64, TxId, u64)>, before: (u64, Digest), height: u64) {
        let nothing = asked.is_some_and(|(.., start, _)| height <= start);
        if self.syncing.is_none() && nothing && (self.chain.height(), self.tip()) == before {
            self.syncing = asked;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_sync_reply(
        &mut self,
        from: PeerId,
        req: u64,
        term: Term,
        config: Option<RoomConfig>,
        blocks: Vec<Block>,
        height: u64,
        commit: u64,
        open: Option<Challenge>,
    ) {
        let Some((_, _, asked, _)) =
            self.syncing.filter(|&(p, _, _, r)| p == from && r == req && !self.is_controller())
        else {
            // A controller's chain grows only by the blocks it accepts: a reply to a request it
            // made as a follower comes too late.
            self.drop_msg(DropReason::UnsolicitedSync, format!("sync reply from {from}"));
            return;
        };
        self.syncing = None;
        // Only the controller of our term may make us drop blocks; anyone may extend our chain.
        let authoritative = self.controller == Some(from) && term == self.term;
        if authoritative && height < self.commit {
            // A controller's chain holds every committed block and only grows in its term: this
            // is an old reply, overtaken by what we learnt since.
            return;
        }
        let first = blocks.first().map(|b| b.tx);
        let last = blocks.last().map(|b| b.tx);
        if !self.sync_reply_config(from, &blocks, config, open, authoritative) {
            return;
        }
        let before = self.chain.height();
        // A block below the replier's commit point is committed: one of ours that conflicts
        // with it never can be, and goes, whoever tells us (above our own commit point only). A
        // peer behind a change of members needs this: the controller it cannot yet tell from a
        // stranger is a member by blocks that its own stale suffix keeps out.
        let overrides = |tx: TxId| authoritative || tx < commit;
        let linked = self.take_synced_blocks(from, blocks, overrides);
        if let Some(tx) = first {
            self.emit(Event::Synced { from: tx, height: self.chain.height() });
        }
        if !linked {
            if first.is_some_and(overrides) && self.diverged.is_none() {
                self.diverge();
                self.request_sync(from);
            }
            return;
        }
        let committed = last.is_some_and(|l| l < commit);
        let agreed_more = match last {
            Some(last) if authoritative || committed => self.agree_up_to(from, term, last, committed),
            _ => false,
        };
        if height > 0 {
            self.saw_room();
        }
        // The reply reached the replier's tip, every block equal to ours or appended (so, by the
        // hash chain, our prefix is the replier's); or, empty, the replier has nothing beyond a
        // height below which all our blocks are committed (hence its too). Never do we drop
        // blocks because a reply is shorter than our chain: it may be older than them.
        let reached = match last {
            Some(t) => t + 1 == height,
            None => asked >= height && (height <= self.commit || height == 0),
        };
        // Behind, or diverged and not yet shown where: ask for what follows, as long as replies
        // take us further (a reply of blocks we hold, from a peer that cannot make us drop
        // ours, would only be asked for again and again; the controller's heartbeat takes over).
        let grew = self.chain.height() > before;
        if first.is_some() && ((grew && self.chain.height() < height) || (agreed_more && !reached)) {
            self.request_sync(from);
            return;
        }
        let links = open.is_some_and(|c| c.tx == height && self.links_at(c.tx, c.prev));
        if authoritative && self.chain.height() >= height && (reached || links) {
            self.matched(from, height, commit);
            if let Some(c) = open.filter(|_| links) {
                self.follow(c);
            }
        }
    }

    /// The configuration a sync reply carries: with block 0, the one its base is the digest of
    /// (false, and the reply dropped, if it is missing or another); with no blocks before block
    /// 0, our controller's offer, kept if it goes with the open challenge 0.
    fn sync_reply_config(
        &mut self,
        from: PeerId,
        blocks: &[Block],
        config: Option<RoomConfig>,
        open: Option<Challenge>,
        authoritative: bool,
    ) -> bool {
        let first = blocks.first();
        if first.is_some_and(|b| b.tx == 0) && self.config.is_none() {
            match (config, first) {
                (Some(config), Some(b)) if config.digest(b.alg) == b.prev => self.take_config(config, b.alg),
                _ => {
                    self.drop_msg(DropReason::BadConfiguration, format!("sync reply from {from}"));
                    return false;
                }
            }
        } else if first.is_none() && self.chain.height() == 0 && self.config.is_none() && authoritative {
            // Before block 0: the configuration comes with the open challenge 0.
            self.genesis_offer = config.filter(|k| open.is_some_and(|c| c.tx == 0 && k.digest(c.alg) == c.prev));
        }
        true
    }

    /// Takes a sync reply's blocks: those equal to ours are skipped, one that conflicts with
    /// ours replaces our blocks from it on where the reply `overrides` them, the others are
    /// appended. False where the reply stops linking to our chain.
    fn take_synced_blocks(&mut self, from: PeerId, blocks: Vec<Block>, overrides: impl Fn(TxId) -> bool) -> bool {
        for block in blocks {
            if let Some(mine) = self.chain.get(block.tx) {
                if mine.hash == block.hash {
                    continue;
                }
                if !overrides(block.tx) || !self.truncate(block.tx) {
                    return false;
                }
            }
            if self.chain.height() != block.tx {
                return false;
            }
            if let Err(e) = self.append(block) {
                self.drop_msg(DropReason::InvalidBlock, format!("sync from {from}: {e}"));
                return false;
            }
        }
        true
    }

    /// A diverged peer took every block of a reply up to `last`, and the reply is our
    /// controller's (or its blocks are `committed`): records how far our chain now agrees.
    /// Whether that moved the agreed height up.
    fn agree_up_to(&mut self, from: PeerId, term: Term, last: TxId, committed: bool) -> bool {
        let Some(d) = self.diverged.as_mut() else {
            return false;
        };
        // Every block of the reply is now ours, and the reply is our controller's (or its
        // blocks are committed, the same for all): the next request starts after them.
        let same = d.controller == Some(from) && d.term == term;
        let agreed = if same || committed { d.agreed } else { 0 };
        *d = Diverged { controller: Some(from), term, agreed: agreed.max(last + 1) };
        last + 1 > agreed
    }
}
