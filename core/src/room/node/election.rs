//! Who controls a term: founding a room, pre-votes, terms, ballots and grants, winning and
//! stepping down, the controller's check that it still hears a quorum, and which controller a
//! peer accepts and follows; with the election timer and its backoff.

use rand::Rng;

use super::{Action, BACKOFF_DECAY_MS, Ballot, Early, MAX_BACKOFF, Role2, RoomNode, Write};
use crate::events::Event;
use crate::protocol::{DropReason, PeerId, Term};
use crate::room::msg::{Msg, Pos};

impl RoomNode {
    /// One step down of the election backoff per `BACKOFF_DECAY_MS` under a live controller.
    pub(super) fn decay_backoff(&mut self) {
        if self.backoff > 0 && self.controller_live() && self.now >= self.backoff_since + BACKOFF_DECAY_MS {
            self.backoff -= 1;
            self.backoff_since = self.now;
        }
    }

    pub(super) fn reset_election_timer(&mut self) {
        let t = self.cfg.timing;
        let base = self.rng.random_range(t.election_min_ms..=t.election_max_ms.max(t.election_min_ms));
        self.election_deadline = self.now + self.wait_ms(base);
    }

    /// We know no configuration, so our term may be a forger's, and we promised nothing in it.
    pub(super) fn term_is_hearsay(&self) -> bool {
        self.voters().is_none() && self.term > self.promised
    }

    /// What a hello says of the room's term and controller: whether to enter its term, and
    /// whom to follow.
    pub(super) fn learn_controller(&mut self, term: Term, controller: Option<PeerId>) {
        // A hint naming someone who cannot lead (its sender was fooled by a forger) is ignored.
        let controller = controller.filter(|&c| self.may_lead(c));
        if let Some(c) = controller
            && term > self.term
        {
            // A newcomer (or a peer back from a partition) learns the room's term and controller.
            // One under our id is another process, with another data directory, that the room
            // made the member in blocks we lack: our requests to it would look like its own
            // echoes, so we sync from the sender (see `sync_after_hello`), and the blocks say who
            // stays (seed 341113: we asked our controller of the term before, long dead, and
            // stayed behind).
            self.enter_term(term);
            if c != self.cfg.id {
                self.follow_controller(c);
            }
        } else if let Some(c) = controller
            && term == self.term
            && self.controller.is_none()
            && c != self.cfg.id
            && self.my_ballot.is_none()
        {
            self.follow_controller(c);
        }
    }

    /// Before block 0: once the proposal is complete and this peer has listened for an existing
    /// room long enough since it connected, start the first election.
    pub(super) fn try_start_bootstrap(&mut self) {
        if self.may_bootstrap() && self.now >= self.discover_until {
            self.start_pre_vote();
        }
    }

    /// This peer could found the room: no chain, no room seen, no term, and it is in the proposal.
    /// (A peer still listening may answer another's pre-ballot: that peer has listened.)
    pub(super) fn may_bootstrap(&self) -> bool {
        self.config.is_none() && self.term == 0 && self.controller.is_none() && self.is_voter()
    }

    /// True when this peer has a controller it heard recently (its lease).
    pub(super) fn controller_live(&self) -> bool {
        match self.controller {
            Some(c) if c == self.cfg.id => self.is_controller(),
            Some(_) => {
                !self.controller_gone && self.now < self.heard_ms + self.wait_ms(self.cfg.timing.election_min_ms)
            }
            None => false,
        }
    }

    /// Whether this term's election still has its time (see `on_pre_ballot`): no pre-vote for
    /// the next term yet, unless the controller is known gone.
    fn patient(&self) -> bool {
        self.term > 0
            && !self.controller_gone
            && self.now < self.term_since + self.wait_ms(self.cfg.timing.election_min_ms)
    }

    pub(super) fn start_pre_vote(&mut self) {
        if !self.is_voter() || self.controller_live() || self.patient() {
            return;
        }
        if self.config.is_none() && self.term == 0 && self.now < self.discover_until {
            // Founding a room: not before we have listened for one (see `try_start_bootstrap`).
            return;
        }
        let next = self.term + 1;
        if self.may_bootstrap() && self.chain.height() == 0 {
            // Founding: no controller to disrupt, and no term a peer cut off could have inflated
            // (a pre-vote stops only that), so the first term is entered at once. Its ballot
            // moves the others to it: a room of 1,000 spared a million pre-ballot deliveries,
            // about a second of its first election.
            self.enter_term(next);
            self.cast_ballot();
            return;
        }
        if self.pre_term != next {
            self.pre_term = next;
            self.pre.clear();
        }
        let first = self.pre.insert(self.cfg.id);
        if first {
            self.emit(Event::PreVote { term: next });
        }
        // Sent again when an election timeout passed since the last one: a lost pre-ballot must
        // not stall the room. Not more often (this runs on every hello of a room gathering),
        // nor while the last one is still in the broker's queue: in a room of hundreds on a busy
        // machine, repeats would only lengthen it.
        let due = self.now >= self.last_pre_sent + self.wait_ms(self.cfg.timing.election_min_ms);
        let queued = self.queued(|m| matches!(m, Msg::PreBallot { term, .. } if *term == next));
        if first || (due && !queued) {
            self.last_pre_sent = self.now;
            self.publish(Msg::PreBallot { to: None, term: next, key: self.cfg.key, pos: self.pos() });
        }
        self.check_pre_vote();
    }

    pub(super) fn on_pre_ballot(&mut self, from: PeerId, key: u64, term: Term, pos: Pos) {
        if pos.height > 0 && self.config.is_none() {
            self.saw_room();
            self.request_sync(from);
        } else if !self.controller_live()
            && pos.last_term > self.pos().last_term
            && !self.is_voter_id(from, key)
            && self.members_at(self.commit).is_some_and(|m| m.contains(from, key))
        {
            // A voter as of our commit point, which blocks of ours above it removed, and whose
            // last block is of a later term than ours: those blocks may be a deposed
            // controller's, which the room replaced. We would never count its votes again (seed
            // 831887: two voters of three never elected). We ask it for its blocks from our
            // commit point: those it holds committed replace ours (see `on_sync_reply`).
            self.diverge();
            self.request_sync_now(from);
        } else if pos.height > self.chain.height() && !self.controller_live() {
            // No controller to take blocks from, and the room elects: a member added in blocks
            // we lack does not know it votes until it has them (seed 75280). A voter that has
            // them goes before whoever we asked last (it may be gone for good: seed 883269).
            self.request_sync_now(from);
        }
        if !self.is_voter_id(from, key) {
            self.hold_early(from, Early::PreBallot { key, term, pos });
            return;
        }
        if term > self.term + 1 {
            // The sender reached term - 1 (through a quorum's pre-votes, or its controller): a
            // newer term is always safe to enter, and we can then join its pre-vote. Its
            // election happened without us: no patience owed to it (see `patient`), or in a
            // room of two whose ballot of that term was lost, both wait out ever longer timeouts.
            self.enter_term(term - 1);
            self.term_since = self.now.saturating_sub(self.wait_ms(self.cfg.timing.election_min_ms));
        }
        if term <= self.term {
            // The sender is behind us. If we look for a controller too, our pre-ballot tells it
            // our term, so the two of us do not each wait in a term of our own. To it alone: in a
            // room of 300 whose broker lags, answers to everyone snowball.
            let looking = self.is_voter() && !self.controller_live() && !self.patient();
            if looking && self.now >= self.last_pre_answer + self.cfg.timing.heartbeat_ms {
                self.last_pre_answer = self.now;
                let next = self.term + 1;
                self.publish(Msg::PreBallot { to: Some(from), term: next, key: self.cfg.key, pos: self.pos() });
            }
            return;
        }
        if self.pre_term != term {
            self.pre_term = term;
            self.pre.clear();
        }
        self.pre.insert(from);
        // A term's election gets its time: a voter does not help start the next one until its own
        // election timeout passed since it entered this term (or the controller is known gone).
        // In a large room the ballots of a term take long to arrive everywhere, and peers that
        // granted elsewhere would otherwise move the room on as soon as a controller was elected,
        // before its first heartbeat reached them (seen with 100 peers: 100 terms in 15 s).
        if !self.pre.contains(&self.cfg.id) && self.is_voter() && !self.controller_live() && !self.patient() {
            self.pre.insert(self.cfg.id);
            self.emit(Event::PreVote { term });
            self.last_pre_sent = self.now;
            self.publish(Msg::PreBallot { to: None, term, key: self.cfg.key, pos: self.pos() });
        }
        self.check_pre_vote();
    }

    /// Holds an election message from `from`, not a voter as far as we know, if we may not know
    /// the room yet: before block 0, no room seen, and fewer live peers known than its size.
    /// Returns whether it was held. In a room of 1,000 starting at once, the last peers to
    /// connect waited seconds for the answers to their hellos, queued behind everyone's
    /// pre-ballots and ballots; those reached them first and were dropped, so the late peers
    /// voted last, on the few sent again, and split the term. Held, they count as soon as the
    /// room is known (see `count_early`), as if the broker had delivered them then. One of each
    /// kind per sender, the latest term's; no more senders than twice the room.
    pub(super) fn hold_early(&mut self, from: PeerId, msg: Early) -> bool {
        if !self.gathering() || self.voters().is_some() {
            return false;
        }
        let slot = (matches!(msg, Early::Ballot { .. }), from);
        if self.early.get(&slot).is_some_and(|e| e.term() > msg.term()) {
            return true;
        }
        if !self.early.contains_key(&slot) && self.early.len() >= 4 * self.cfg.room_size {
            return false;
        }
        self.early.insert(slot, msg);
        true
    }

    /// Counts the election messages held by `hold_early` once the room is known (pre-ballots
    /// first, as they came before the ballots), or forgets them once they can no longer count.
    pub(super) fn count_early(&mut self) {
        if self.early.is_empty() {
            return;
        }
        if !self.gathering() {
            self.early.clear();
            return;
        }
        if self.voters().is_none() {
            return;
        }
        // Keyed (is a ballot, sender): the pre-ballots come first.
        for ((_, from), msg) in std::mem::take(&mut self.early) {
            match msg {
                Early::PreBallot { key, term, pos } => self.on_pre_ballot(from, key, term, pos),
                Early::Ballot { key, term, ballot } => self.on_ballot(from, key, term, ballot),
            }
        }
    }

    fn check_pre_vote(&mut self) {
        if self.pre_term == self.term + 1 && self.pre.contains(&self.cfg.id) && self.pre.len() >= self.quorum() {
            let term = self.pre_term;
            self.enter_term(term);
            self.cast_ballot();
        }
    }

    /// Moves to a newer term: no vote yet, no controller known.
    pub(super) fn enter_term(&mut self, term: Term) {
        debug_assert!(term > self.term);
        if self.is_controller() {
            self.step_down("newer term");
        }
        if !self.term_led && self.my_ballot.is_some() {
            self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
            self.backoff_since = self.now;
        }
        self.term = term;
        self.term_since = self.now;
        self.term_led = false;
        self.voted_for = None;
        // Not written now: a new term promises nothing until this peer grants in it, and the
        // grant writes the term with the vote (one fsync instead of two on an election's path).
        self.controller = None;
        self.controller_gone = false;
        self.ballots.clear();
        self.grants.clear();
        self.deposed = false;
        self.my_ballot = None;
        self.pre.clear();
        self.heard_ms = self.now;
        // Longer when the broker lags: ballots take that long to go round. Not doubled by the
        // backoff, as the election timer is: the voters' backoffs differ, and a deadline of one
        // voter past another's election timeout splits every term (seed 128203).
        self.grant_deadline = Some(self.now + self.cfg.timing.ballot_wait_ms + 2 * self.lag());
        self.grant_awaits_echo = false;
        self.reset_election_timer();
    }

    fn cast_ballot(&mut self) {
        if !self.is_voter() || self.my_ballot.is_some() || self.controller.is_some() {
            return;
        }
        let ballot = self.rng.random();
        self.my_ballot = Some(ballot);
        let proposal = self.proposal_digest();
        self.ballots.insert(self.cfg.id, Ballot { ballot, pos: self.pos(), proposal });
        self.emit(Event::VoteCast { term: self.term, vote: ballot });
        self.publish_ballot(ballot);
        self.try_grant(false);
    }

    pub(super) fn publish_ballot(&mut self, ballot: u32) {
        let proposal = self.proposal_digest();
        let msg = Msg::Ballot { term: self.term, ballot, key: self.cfg.key, pos: self.pos(), proposal };
        self.publish(msg);
    }

    pub(super) fn on_ballot(&mut self, from: PeerId, key: u64, term: Term, ballot: Ballot) {
        if term < self.term {
            return;
        }
        if !self.is_voter_id(from, key) {
            self.try_start_bootstrap();
            if !self.is_voter_id(from, key) {
                if !self.hold_early(from, Early::Ballot { key, term, ballot }) {
                    self.drop_msg(DropReason::NotAVoter, format!("ballot from {from} in term {term}"));
                }
                return;
            }
        }
        if term > self.term {
            self.enter_term(term);
        }
        if ballot.pos.height > 0 && self.config.is_none() {
            // A room with a chain exists: never found another; take its blocks.
            self.saw_room();
            self.request_sync(from);
        }
        // One ballot per voter and term: the first stands. A new one says the election is still
        // under way: the term's patience (see `patient`) starts again from it (at most once per
        // voter and term; not our election timer, or a voter that moved past a deposed
        // controller's term waited on it with the rest, seed 23207). In a room of hundreds on a broker that takes seconds to
        // deliver a term's ballots, voters otherwise gave up on the term before its ballots were
        // all in, and the next term's pre-votes lengthened the broker's queue further.
        if let std::collections::btree_map::Entry::Vacant(e) = self.ballots.entry(from) {
            e.insert(ballot);
            if self.controller.is_none() {
                self.term_since = self.now;
                self.wait_for_more_ballots();
            }
        }
        if self.controller.is_none() {
            self.cast_ballot();
        }
        self.try_grant(false);
    }

    /// A new ballot came: more may be on their way. A voter that grants before every ballot is
    /// in grants the best it holds, so it waits the ballot wait (and twice the broker's lag)
    /// past the last new one, not past its entry into the term: in a room of 1,000 whose ballots
    /// took a second or two to go round, voters that granted a fixed time after entering the
    /// term had each seen another part of them, and split it (464, 374 and 162 grants). Once
    /// they stop coming, every voter holds the same ones. Not capped by the election timer: on
    /// a 3-node RabbitMQ cluster whose queues were a minute long, the ballots of 1,000 voters
    /// came in for a minute and more, and voters that granted at their election timer split the
    /// term three ways, each node's subscribers having heard their own node's ballots first
    /// (371, 323 and 306). A voter has one ballot per voter and term to wait on, so the wait
    /// ends.
    fn wait_for_more_ballots(&mut self) {
        if self.voted_for.is_some() {
            return;
        }
        let until = self.now + self.ballot_quiet_ms();
        if self.grant_deadline.is_none_or(|g| g < until) {
            self.grant_deadline = Some(until);
        }
    }

    /// How long no new ballot must come before a voter grants on part of them.
    pub(super) fn ballot_quiet_ms(&self) -> u64 {
        self.cfg.timing.ballot_wait_ms + 2 * self.lag()
    }

    /// A broadcast of ours came back through the broker. If a grant waited for it (see
    /// `try_grant`), the ballots sent before it through our broker node are in, but not
    /// necessarily those of other nodes, which a cluster forwards later: voters that granted
    /// on their ballot's echo split a room of 1,000 on three nodes by node. So the voter then
    /// waits for the ballots to stop coming, as above, with the lag just measured.
    pub(super) fn broadcast_echoed(&mut self) {
        if self.grant_awaits_echo && self.echo_out().is_none() && self.voted_for.is_none() {
            self.grant_awaits_echo = false;
            self.grant_deadline = Some(self.now + self.ballot_quiet_ms());
        }
        self.try_grant(false);
    }

    /// Grants this term's vote once every live voter's ballot is in, or `deadline` passed.
    pub(super) fn try_grant(&mut self, deadline: bool) {
        if self.voted_for.is_some() || self.controller.is_some() || self.term == 0 || !self.is_voter() {
            return;
        }
        let Some(voters) = self.voters() else { return };
        // The ballots held are voters' only (others are refused), ours included.
        let waiting = self.ballots.len() < voters.len().saturating_sub(self.gone_voters);
        let past = deadline || self.grant_deadline.is_none();
        // Past the deadline, still not before a quorum's ballots are in: a voter that grants on
        // fewer grants the best of what reached it first, often its own, and in a room of
        // hundreds whose ballots take seconds to go round, every voter then granted itself.
        if waiting && !(past && self.ballots.len() >= voters.quorum()) {
            return;
        }
        // Nor while a broadcast of ours is still in the broker's queue: the ballots sent before
        // ours (most, in an election that starts everywhere at once) reach us before it does.
        if let Some(out) = self.echo_out().filter(|_| waiting) {
            self.grant_deadline = Some(self.now + self.echo_lost_after() - out);
            self.grant_awaits_echo = true;
            return;
        }
        let mine = self.pos();
        let proposal = self.proposal_digest();
        let best = self
            .ballots
            .iter()
            .filter(|(_, b)| b.pos >= mine && (self.config.is_some() || b.proposal == proposal))
            // The most up-to-date candidates first: every voter can grant them, so the room
            // converges on one (a voter behind the others that drew the highest ballot would
            // otherwise grant itself, in vain, and split the term). Among equals, the lab's rule.
            .max_by_key(|(id, b)| (b.pos, b.ballot, **id))
            .map(|(id, _)| *id);
        let Some(to) = best else { return };
        let to_key = voters.key_of(to).unwrap_or_default();
        self.voted_for = Some(to);
        self.persist(Write::Vote { term: self.term, voted_for: Some(to) });
        self.promised = self.term;
        self.promised_to = Some(to);
        self.emit(Event::VoteGranted { term: self.term, to });
        if to == self.cfg.id {
            self.grants.insert(to);
            self.check_won();
        } else {
            self.publish(Msg::Grant { to, to_key, term: self.term, key: self.cfg.key });
        }
    }

    pub(super) fn on_grant(&mut self, from: PeerId, key: u64, term: Term) {
        if term != self.term || self.my_ballot.is_none() || !self.is_voter_id(from, key) {
            return;
        }
        self.grants.insert(from);
        self.check_won();
    }

    fn check_won(&mut self) {
        if self.deposed || self.is_controller() || self.controller.is_some() || self.grants.len() < self.quorum() {
            return;
        }
        if !self.is_voter() {
            // Our chain took a block that removed us after we ran (a sync of blocks the voters
            // that granted us did not have yet): no member, no controller (seed 573124).
            return;
        }
        let Some(voters) = self.voters().cloned() else { return };
        if !self.grants.iter().all(|&g| voters.key_of(g).is_some()) {
            return;
        }
        self.role = Role2::Controller;
        self.controller = Some(self.cfg.id);
        self.term_led = true;
        self.backoff_since = self.now;
        self.syncing = None;
        self.became_ms = self.now;
        self.acks.clear();
        self.learners.clear();
        self.pending = None;
        self.grant_deadline = None;
        self.emit(Event::ControllerElected { term: self.term, controller: self.cfg.id, votes: self.grants.len() });
        self.out.push(Action::StopMining);
        self.mining = None;
        self.submitted = None;
        if self.config.is_none() {
            // The first controller records the configuration it was elected by.
            self.config = Some(voters);
            self.refresh_members();
        }
        self.beat();
        self.issue();
    }

    pub(super) fn step_down(&mut self, why: &str) {
        if !self.is_controller() {
            return;
        }
        self.emit(Event::QuorumLost { term: self.term, reason: why.into() });
        self.role = Role2::Follower;
        self.controller = None;
        // Not controller of this term again: a grant sent again late (a voter back from a
        // restart) would otherwise complete the old quorum, and a controller that stood down
        // would act in a term the room has left.
        self.grants.clear();
        self.deposed = true;
        self.open = None;
        self.pending = None;
        if self.chain.height() == 0 {
            // The configuration is recorded only with block 0: none was taken yet.
            self.config = None;
            self.refresh_members();
        }
        self.heard_ms = self.now;
        self.reset_election_timer();
    }

    pub(super) fn check_quorum(&mut self) {
        let window = self.wait_ms(self.cfg.timing.election_max_ms);
        if self.now < self.became_ms + window {
            return;
        }
        let Some(voters) = self.voters() else { return };
        let heard = voters
            .members()
            .iter()
            .filter(|m| m.id == self.cfg.id || self.acks.get(&m.id).is_some_and(|&(_, at)| self.now < at + window))
            .count();
        if heard < voters.quorum() {
            self.step_down("no quorum heard");
        }
    }

    /// Checks that a controller's message for `term` is from the current controller, adopting a
    /// newer term's. Returns false (and logs) when it must be ignored.
    pub(super) fn accept_controller(&mut self, from: PeerId, term: Term, what: &str) -> bool {
        // Only a voter can win an election: anyone else speaking as controller is a forger (or
        // from another room), and must neither be followed nor move the term.
        if !self.may_lead(from) {
            self.drop_msg(DropReason::NotMember, format!("{what} from {from}, who is not a voting member of the room"));
            return false;
        }
        if term < self.term && term >= self.promised && self.voters().is_none() && !self.controller_live() {
            // We know no configuration, so we cannot tell a forger's newer term from the room's,
            // and we promised nothing in the terms after `term`. Ours fell silent: follow
            // whoever speaks as controller, keeping the vote we promised in `term`, if any.
            self.fall_back_to(term);
        }
        if term < self.term {
            // A stale controller (paused, cut off): tell it the room moved on, at most once per beat.
            // Unless our term is hearsay: without the configuration we may have taken it from a
            // forger, and we promised nothing in it; the room's own controller of that term, if
            // there is one, will tell the stale one itself.
            let hearsay = self.term_is_hearsay();
            if !hearsay && self.now >= self.last_stale_reply + self.cfg.timing.heartbeat_ms {
                self.last_stale_reply = self.now;
                self.publish(Msg::Ack { to: from, term: self.term, height: 0, key: self.cfg.key });
            }
            let current = self.term;
            self.drop_msg(
                DropReason::StaleTerm,
                format!("{what} from {from} for term {term}, current term is {current}"),
            );
            return false;
        }
        if term > self.term {
            self.enter_term(term);
        }
        match self.controller {
            // Without the configuration we cannot tell a stranger from a member, and may have
            // followed a forger: one that fell silent gives way to whoever speaks as controller.
            Some(c) if c != from && self.voters().is_none() && !self.controller_live() => {
                self.follow_controller(from);
                true
            }
            Some(c) if c != from => {
                self.drop_msg(
                    DropReason::NotController,
                    format!("{what} from {from} in term {term}, whose controller is {c}"),
                );
                false
            }
            Some(_) => {
                self.heard_ms = self.now;
                self.controller_gone = false;
                self.decay_backoff();
                self.reset_election_timer();
                true
            }
            None => {
                self.follow_controller(from);
                true
            }
        }
    }

    /// Leaves a term we only heard of (we promised nothing in it, and took it before we could
    /// tell a forger) for the older `term`, keeping the vote we promised in it, if any. Votes
    /// stay one per term: nothing was promised after `promised`.
    pub(super) fn fall_back_to(&mut self, term: Term) {
        debug_assert!(term >= self.promised && term < self.term);
        self.term = term;
        self.term_since = self.now;
        self.voted_for = if term == self.promised { self.promised_to } else { None };
        self.controller = None;
        self.term_led = false;
        self.ballots.clear();
        self.grants.clear();
        self.my_ballot = None;
        self.pre.clear();
    }

    /// Whether `id` could be elected: a voter of the configuration (before block 0, of our
    /// proposal). A peer that knows neither cannot tell.
    pub(super) fn may_lead(&self, id: PeerId) -> bool {
        self.voters().is_none_or(|v| v.key_of(id).is_some())
    }

    fn follow_controller(&mut self, c: PeerId) {
        if self.is_controller() {
            return;
        }
        self.controller = Some(c);
        self.term_led = true;
        self.controller_gone = false;
        self.backoff_since = self.now;
        self.hellos_unanswered = 0;
        self.heard_ms = self.now;
        self.grant_deadline = None;
        self.reset_election_timer();
        self.emit(Event::ControllerElected { term: self.term, controller: c, votes: 0 });
    }
}
