//! Who is in the room and who votes: the peers heard from and those gone, the voters (block 0's
//! configuration with the chain's changes, or before it the proposal) and their quorum, hellos and
//! the answers to them, another process under our own id, how many voters this peer reaches, the
//! acknowledgements of non-voting peers, and the change of members a controller proposes.

use super::{Action, Learner, MAX_HELLO_BACKOFF, Peer, RoomNode};
use crate::events::Event;
use crate::pow::{Digest, HashAlg};
use crate::protocol::{Block, Change, DropReason, MAX_SYNC_BLOCKS, PeerId, Term};
use crate::room::msg::{MAX_ROOM, Member, Msg, RoomConfig};

/// How many peers of a gathering room answer a newcomer's hello, with the list of every live
/// peer they know (see `on_hello`).
const GATHERING_ANSWERERS: usize = 3;

impl RoomNode {
    pub(super) fn hello(&self, to: Option<PeerId>, want_reply: bool) -> Msg {
        Msg::Hello {
            to,
            want_reply,
            key: self.cfg.key,
            incarnation: self.cfg.incarnation,
            since_ms: self.cfg.since_ms,
            term: self.term,
            controller: self.controller,
            height: self.chain.height(),
            peers: Vec::new(),
        }
    }

    /// Whether the room is still gathering, as far as this peer knows: no block 0, no
    /// configuration, no sign of a room with a chain.
    pub(super) fn gathering(&self) -> bool {
        self.config.is_none() && self.chain.height() == 0 && !self.room_seen
    }

    /// The live peers known, this one included: the `room_size` lowest ids (all a proposal needs).
    fn known_live(&self) -> Vec<Member> {
        let mut live: Vec<Member> = (self.peers.iter())
            .filter(|(_, p)| !p.gone)
            .map(|(&id, p)| Member { id, key: p.key })
            .chain(std::iter::once(Member { id: self.cfg.id, key: self.cfg.key }))
            .collect();
        live.sort_unstable();
        live.truncate(self.cfg.room_size);
        live
    }

    /// Whether this peer is one of the few of a gathering room that answer a newcomer: the
    /// [`GATHERING_ANSWERERS`] lowest ids among the live peers it knows.
    fn answers_newcomers(&self) -> bool {
        let below = self.peers.iter().filter(|(id, p)| !p.gone && **id < self.cfg.id).take(GATHERING_ANSWERERS).count();
        below < GATHERING_ANSWERERS
    }

    pub(super) fn report_reach(&mut self) {
        // A controller known gone (its will) or silent is no controller to wait with.
        if self.controller_live() {
            self.last_reach = None;
            self.waiting = None;
            return;
        }
        let Some(r) = self.reach() else {
            self.waiting = None;
            return;
        };
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        self.waiting = (r.reachable < r.needed).then(|| crate::status::Waiting {
            reachable: n(r.reachable),
            needed: n(r.needed),
            voters: n(r.voters),
        });
        let key = (r.reachable, r.needed);
        if self.last_reach != Some(key) && r.reachable < r.needed {
            self.emit(Event::QuorumWaiting { reachable: r.reachable, needed: r.needed, voters: r.voters });
        }
        self.last_reach = Some(key);
    }

    /// Records that `id` (with `key`) spoke; returns false if it must be ignored (a second
    /// process under a member's id).
    pub(super) fn heard(&mut self, id: PeerId, key: Option<u64>) -> bool {
        let now = self.now;
        match (self.peers.get_mut(&id), key) {
            (Some(p), Some(k)) if p.key != k => {
                // Another key under a known id: keep the member's (or the first) one.
                let cfg_key = self.members.as_ref().and_then(|c| c.key_of(id));
                if cfg_key == Some(k) {
                    let revived = p.gone;
                    *p = Peer { key: k, incarnation: 0, gone: false, heard_ms: now, since: now };
                    if revived {
                        self.revived(id);
                    }
                    self.refresh_voters();
                    return true;
                }
                return false;
            }
            (Some(p), _) => {
                let revived = p.gone;
                p.gone = false;
                p.heard_ms = now;
                if revived {
                    p.since = now;
                }
                if revived {
                    self.revived(id);
                    self.refresh_voters();
                }
            }
            (None, Some(k)) => {
                self.peers.insert(id, Peer { key: k, incarnation: 0, gone: false, heard_ms: now, since: now });
                let members = self.peers.len() + 1;
                self.emit(Event::PeerJoined { id, members });
                self.refresh_voters();
            }
            (None, None) => {}
        }
        true
    }

    /// A peer counted gone spoke again: it is back (observers see it join, as they saw it leave).
    fn revived(&mut self, id: PeerId) {
        self.gone_peers -= 1;
        let members = self.peers.len() - self.gone_peers + 1;
        self.emit(Event::PeerJoined { id, members });
    }

    pub(super) fn gone(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        if p.gone {
            return;
        }
        p.gone = true;
        self.gone_peers += 1;
        let members = self.peers.len() - self.gone_peers + 1;
        self.emit(Event::PeerLeft { id, members });
        self.refresh_voters();
        if self.controller == Some(id) && !self.is_controller() {
            // Its will: no need to wait for the election timer.
            self.controller_gone = true;
            self.election_deadline = self.now;
            self.start_pre_vote();
        }
        // A ballot this voter was waiting for will not come.
        self.try_grant(false);
    }

    /// The voters: the configuration of block 0, or before it the proposal (the `room_size`
    /// lowest ids among the live peers known, this one included) once enough are known.
    pub(super) fn voters(&self) -> Option<&RoomConfig> {
        self.members.as_ref().or(self.proposal.as_ref().map(|(c, _)| c))
    }

    /// Recomputes the voting members from block 0's configuration and the chain's changes
    /// (after the configuration or the chain changed other than by an append).
    pub(super) fn refresh_members(&mut self) {
        self.members = self.members_at(self.chain.height());
        self.check_rival();
        self.refresh_voters();
    }

    /// The digest of the proposal a ballot carries, before block 0.
    pub(super) fn proposal_digest(&self) -> Option<Digest> {
        if self.config.is_some() { None } else { self.proposal.as_ref().map(|(_, d)| *d) }
    }

    /// Recomputes what depends on the set of peers (called when it changes, not per message).
    pub(super) fn refresh_voters(&mut self) {
        self.proposal = None;
        // Cheap test first: this runs for every peer met, and most of them complete nothing.
        let live = self.peers.len() - self.gone_peers + 1;
        if live >= self.cfg.room_size && self.gathering() {
            let live = self.known_live();
            if live.len() >= self.cfg.room_size {
                self.proposal = RoomConfig::new(live).map(|c| {
                    let d = c.digest(HashAlg::Sha256);
                    (c, d)
                });
            }
        }
        let gone = |m: &Member| self.peers.get(&m.id).is_some_and(|p| p.gone || p.key != m.key);
        self.gone_voters =
            self.voters().map_or(0, |v| v.members().iter().filter(|m| m.id != self.cfg.id && gone(m)).count());
    }

    /// The room has a chain: never found another.
    pub(super) fn saw_room(&mut self) {
        if !self.room_seen {
            self.room_seen = true;
            self.refresh_voters();
        }
    }

    pub(super) fn is_voter(&self) -> bool {
        self.voters().is_some_and(|v| v.contains(self.cfg.id, self.cfg.key))
    }

    pub(super) fn is_voter_id(&self, id: PeerId, key: u64) -> bool {
        self.voters().is_some_and(|v| v.contains(id, key))
    }

    pub(super) fn quorum(&self) -> usize {
        self.voters().map_or(usize::MAX, |v| v.quorum())
    }

    /// A message under our own id: our own broadcast come back through the broker, or another
    /// process's hello or heartbeat (its key or incarnation is not ours).
    pub(super) fn own_id_message(&mut self, msg: Msg) {
        match msg {
            Msg::Hello { key, incarnation, since_ms, .. }
                if key != self.cfg.key || incarnation != self.cfg.incarnation =>
            {
                self.impostor(key, incarnation, since_ms);
            }
            Msg::Heartbeat { key, term, height, .. } if key != self.cfg.key => self.rival_beat(key, term, height),
            msg => {
                self.echoed(&msg);
                // A grant may have waited for it (see `try_grant`).
                self.broadcast_echoed();
            }
        }
    }

    /// Another process announced itself under our id.
    fn impostor(&mut self, key: u64, incarnation: u64, since_ms: u64) {
        if key == self.cfg.key {
            // Our own data directory in another process (copied, or run twice): nothing can tell
            // the two apart; the earlier one stays.
            if (since_ms, incarnation) < (self.cfg.since_ms, self.cfg.incarnation) {
                let id = self.cfg.id;
                self.out.push(Action::Fatal(format!(
                    "another process runs with this data directory's identity (client id {id}); stop it, or give this peer its own --data-dir"
                )));
            }
            return;
        }
        // Two data directories under one id. The one the members name (as our chain's changes
        // leave them, not as block 0 had them) stays; otherwise the process that started first.
        let member = self.members.as_ref().and_then(|c| c.key_of(self.cfg.id));
        let we_stay = match member {
            Some(k) if k == self.cfg.key => true,
            Some(k) if k == key => false,
            _ => (since_ms, incarnation) > (self.cfg.since_ms, self.cfg.incarnation),
        };
        let id = self.cfg.id;
        if !we_stay {
            self.give_way();
        } else if self.rival != Some((key, incarnation)) {
            // Once per process: when our chain is behind, both sides may think they stay, and
            // each answer would draw another (seed 764004). The chain we then sync decides.
            self.rival = Some((key, incarnation));
            self.drop_msg(DropReason::DuplicateId, format!("another process claims our client id {id}; it gives way"));
            self.publish(self.hello(None, false));
        }
    }

    /// A process under our id with another data directory controls a term (or says so: a
    /// forger may). A quorum granted it only if their chains name it the member, so when it is
    /// in our term or a later one, ours is behind: we ask the room where it stands (the answers
    /// name the term and a height, see `on_hello`) and sync from whoever answers. Every request
    /// to our id would reach that controller as if from itself, and its answers would look like
    /// our own echoes (seed 736493: the old process, back, voted for the other voter in the
    /// term the new one won, then pre-voted alone for good). Once our blocks name its key the
    /// member, we give way.
    fn rival_beat(&mut self, key: u64, term: Term, height: u64) {
        let id = self.cfg.id;
        // Our term may be hearsay: without the configuration, a forger's (seed 807713).
        if self.is_controller() || (term < self.term && !self.term_is_hearsay()) {
            self.drop_msg(
                DropReason::DuplicateId,
                format!("heartbeat of term {term} from another process under our id {id}"),
            );
            return;
        }
        self.rival_led = Some(key);
        self.check_rival();
        if height > self.chain.height() && self.now >= self.next_hello {
            self.back_off_hello();
            self.publish(self.hello(None, true));
        }
    }

    /// When the next hello that asks for answers may go out, if those to this one do not come:
    /// each waits twice as long as the last (up to `MAX_HELLO_BACKOFF` doublings of
    /// `election_min_ms`).
    pub(super) fn back_off_hello(&mut self) {
        self.hellos_unanswered = (self.hellos_unanswered + 1).min(MAX_HELLO_BACKOFF);
        self.next_hello = self.now + (self.cfg.timing.election_min_ms << self.hellos_unanswered) + 2 * self.lag();
    }

    fn give_way(&mut self) {
        let id = self.cfg.id;
        self.out.push(Action::Fatal(format!(
            "client id {id} is already used by another peer in this room; pick another with --id"
        )));
    }

    /// The members changed: a process under our id that we thought gave way, or that leads a
    /// term, may be the member.
    pub(super) fn check_rival(&mut self) {
        let member = self.members.as_ref().and_then(|m| m.key_of(self.cfg.id));
        if member.is_some() && (member == self.rival.map(|(key, _)| key) || member == self.rival_led) {
            self.give_way();
        }
    }

    /// A hello from another peer (its `since_ms` matters only for one under our own id, see
    /// `impostor`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_hello(
        &mut self,
        from: PeerId,
        want_reply: bool,
        key: u64,
        incarnation: u64,
        term: Term,
        controller: Option<PeerId>,
        height: u64,
        peers: Vec<Member>,
    ) {
        // Whether it knows us already: then a repeated hello (its periodic one, see `tick`, or
        // after a reconnect of the same process, even one its will called gone) is answered only
        // by whoever knows more of the room than it says it does. In a room of 300 whose broker
        // lagged, clients gave up on their pings and reconnected by the thousand, and 299
        // answers to each fed the lag.
        let known = self.peers.get(&from).is_some_and(|p| p.key == key && p.incarnation == incarnation);
        if !self.heard(from, Some(key)) {
            self.on_stranger_hello(from, want_reply, controller, height);
            return;
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.incarnation = incarnation;
        }
        let news = !known || self.is_controller() || (self.term, self.chain.height()) > (term, height);
        // A room gathering (ours, and the asker's): its few lowest ids answer, each with every
        // live peer it knows.
        let gathering = self.gathering() && height == 0 && controller.is_none();
        if want_reply && news && (!gathering || self.answers_newcomers()) {
            let mut answer = self.hello(Some(from), false);
            if gathering && let Msg::Hello { peers, .. } = &mut answer {
                *peers = self.known_live();
                peers.truncate(MAX_ROOM);
            }
            self.publish(answer);
            if self.is_controller() {
                // It has just subscribed: what it missed of the open transaction, it gets now.
                self.beat();
                if let Some(c) = self.open {
                    self.publish_challenge(c);
                }
            }
        }
        if height > 0 {
            self.saw_room();
        }
        if self.gathering() {
            // Heard of, not heard from: peers we know already keep their own times.
            for m in peers {
                if m.id != self.cfg.id && !self.peers.contains_key(&m.id) {
                    self.heard(m.id, Some(m.key));
                }
            }
        }
        self.learn_controller(term, controller);
        if height > self.chain.height() {
            self.sync_after_hello(from);
        }
        self.try_start_bootstrap();
    }

    /// A hello from a process under a member's id with another data directory (a copy of the
    /// id, or the member back with its disk lost): not that member. It still learns from our
    /// answer that this room exists, so it never founds another.
    fn on_stranger_hello(&mut self, from: PeerId, want_reply: bool, controller: Option<PeerId>, height: u64) {
        self.drop_msg(DropReason::DuplicateId, format!("hello from {from} under a key that is not its member's"));
        if height > 0 || controller.is_some() {
            // Whoever it is, it speaks for a room that exists.
            self.saw_room();
        }
        if want_reply {
            self.publish(self.hello(Some(from), false));
        }
    }

    pub(super) fn learner_ack(&mut self, from: PeerId, key: u64, height: u64) {
        let height = height.min(self.chain.height());
        self.learners.insert(from, Learner { key, height, at: self.now });
    }

    /// The change of members due now, if any (controller, between two blocks): a live
    /// non-voting peer in for a missing member; or out, a member not heard from for
    /// `replace_after_ms`, when a live non-voting peer can take its place. One change at a
    /// time: none while one is uncommitted (every block is, here), and none before a block of
    /// this term is committed (the condition Raft's single-server changes need, §4.1).
    pub(super) fn change_due(&self) -> Option<Change> {
        let after = self.cfg.timing.replace_after_ms;
        let members = self.members.as_ref()?;
        if after == 0 || self.commit < self.chain.height() {
            return None;
        }
        if self.chain.get(self.commit.checked_sub(1)?).is_none_or(|b| b.term != self.term) {
            return None;
        }
        let live = |at: u64| self.now < at + after;
        // The live non-voting peer longest in the room; the furthest behind last (a newcomer
        // still syncing, say: it acknowledges once a second, so its height is a little old).
        let newcomer = self
            .learners
            .iter()
            .filter(|(id, l)| live(l.at) && members.key_of(**id).is_none())
            .min_by_key(|(id, l)| {
                let behind = self.commit.saturating_sub(l.height) > MAX_SYNC_BLOCKS as u64;
                (behind, self.peers.get(id).map_or(self.now, |p| p.since), **id)
            })
            .map(|(&id, l)| Change::Add { id, key: l.key });
        if members.len() < self.cfg.room_size {
            return newcomer;
        }
        let since = |id: PeerId| self.acks.get(&id).map_or(0, |a| a.1).max(self.became_ms);
        let heir = |m: &Member| self.learners.get(&m.id).is_some_and(|l| live(l.at) && l.key != m.key);
        let silent = members
            .members()
            .iter()
            .find(|m| m.id != self.cfg.id && !live(since(m.id)) && (newcomer.is_some() || heir(m)))?;
        Some(Change::Remove { id: silent.id, key: silent.key })
    }

    /// Appends and sends a block that changes the room's members; the next challenge waits
    /// until it is committed.
    pub(super) fn propose(&mut self, change: Change) {
        let (tx, alg) = (self.chain.height(), self.chain.alg(self.cfg.alg));
        let block = Block::change(tx, self.term, alg, self.cfg.pace, self.now, self.tip(), change);
        // A member just added has `replace_after_ms` to be heard from, as any at an election.
        match change {
            Change::Add { id, .. } => self.acks.insert(id, (0, self.now)),
            Change::Remove { id, .. } => self.acks.remove(&id),
        };
        self.accept_own(block, "change of members");
    }
}
