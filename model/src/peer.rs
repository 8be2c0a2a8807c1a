//! One room peer: the election and commit rules of ROOM.md as a small sans-IO state machine.
//!
//! Every nondeterministic choice (which ballot, when to grant, when to append or replicate, which
//! prefix to send) is a parameter of a method here; the checker (`check.rs`) tries every value.
//! The methods return the messages to publish, and leave the state unchanged when the event is a
//! no-op, so that the checker can tell "nothing happened" (`==`) from a step.

/// A term number (0 = before any election).
pub type Term = u8;

/// Number of peers in the fixed configuration.
pub const PEERS: usize = 3;

/// Grants (or stored copies, the controller's included) needed out of [`PEERS`].
pub const QUORUM: usize = PEERS / 2 + 1;

/// The longest log any instance may use (a fixed array keeps states small and `Copy`).
pub const LOG_CAPACITY: usize = 4;

/// A peer index, 0..[`PEERS`]; it stands for the spec's ids 1..=3 (only their order matters).
pub type PeerId = u8;

/// A log: the term of each entry, and whether it changes the members. By log matching,
/// (index, term) names a whole prefix.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Log {
    len: u8,
    // Invariant: every slot at or past `len` is 0, so equal logs hash equally.
    terms: [Term; LOG_CAPACITY],
    /// Per entry: 0, or `1 + p`, a change of members that toggles peer `p` (out if it is a
    /// member, in if not), as the room's `Change::Remove` and `Change::Add`.
    changes: [u8; LOG_CAPACITY],
}

/// Every peer: the configuration before any change.
pub const ALL: u8 = (1 << PEERS) - 1;

/// Votes (or stored copies) that make a majority of the members `mask`.
pub fn quorum_of(mask: u8) -> usize {
    mask.count_ones() as usize / 2 + 1
}

impl Log {
    /// The entries' terms.
    pub fn entries(&self) -> &[Term] {
        &self.terms[..usize::from(self.len)]
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends an entry of `term`.
    pub fn push(&mut self, term: Term) {
        self.push_entry(term, 0);
    }

    /// Appends an entry of `term` with `change` (0, or `1 + p`: toggles peer `p`).
    pub fn push_entry(&mut self, term: Term, change: u8) {
        self.terms[self.len()] = term;
        self.changes[self.len()] = change;
        self.len += 1;
    }

    /// Entry `i`'s change (0: none).
    pub fn change(&self, i: usize) -> u8 {
        self.changes[i]
    }

    /// The members: every peer, with the log's changes applied, uncommitted ones included.
    pub fn members(&self) -> u8 {
        self.changes[..self.len()].iter().filter(|&&c| c > 0).fold(ALL, |m, &c| m ^ (1 << (c - 1)))
    }

    /// Keeps the first `len` entries.
    pub fn truncate(&mut self, len: usize) {
        self.terms[len..].fill(0);
        self.changes[len..].fill(0);
        self.len = self.len.min(len as u8);
    }

    /// The entries from `start` on, as a log of their own.
    pub fn suffix(&self, start: usize) -> Log {
        let mut l = Log::default();
        (start..self.len()).for_each(|i| l.push_entry(self.terms[i], self.changes[i]));
        l
    }

    /// The log's position, for the up-to-date check.
    pub fn pos(&self) -> Pos {
        Pos { last_term: self.entries().last().copied().unwrap_or(0), len: self.len }
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.entries().fmt(f)
    }
}

/// A log position, ordered lexicographically: last entry's term first, then length (Raft §5.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    /// Term of the last entry (0 for an empty log).
    pub last_term: Term,
    /// Number of entries.
    pub len: u8,
}

/// Which rules the peers follow: the design, or one deliberately broken variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The rules of ROOM.md.
    Correct,
    /// Broken: the vote is not persisted, so a peer that restarts may grant twice in one term.
    VoteNotDurable,
    /// Broken: a voter grants without the up-to-date check (`pos >= own pos`), to the highest
    /// ballot whatever its position (the lab's bare rule).
    NoUpToDateCheck,
    /// Broken: the controller commits an index whose entry is of an earlier term once a quorum
    /// stores it (the Raft paper's figure 8).
    CommitOldTerm,
    /// Broken: a controller changes the members while an entry (a change among them) is not yet
    /// committed, so configurations two changes apart are in use at once.
    ChangeUncommitted,
}

/// The bounds and rules of one model instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Settings {
    /// Highest term a peer may time out into.
    pub max_term: Term,
    /// Longest log a controller appends to (at most [`LOG_CAPACITY`]).
    pub max_log: u8,
    /// Ballots are drawn from `0..ballots`.
    pub ballots: u8,
    /// Which rules the peers follow.
    pub variant: Variant,
    /// Whether the controller sends its log after *every* prefix length (covering every
    /// `next_index` a real controller could hold, and exercising the follower's link check), or
    /// only its whole log (prev_len 0). An accepted `Append` after prefix k leaves the follower
    /// exactly as the whole log would, so the second is a smaller model of the same outcomes;
    /// the first checks the link check itself too.
    pub any_prefix: bool,
    /// Liveness mode: a voter grants only once it holds a ballot from every member (ROOM.md's
    /// first grant condition, without the `ballot_wait` escape).
    pub wait_for_all_ballots: bool,
    /// Whether a controller may change the members (one peer out or in per entry).
    pub changes: bool,
}

/// A message. `Ballot` and `Append` are published to the whole room (MQTT pub/sub: every other
/// peer may receive them); `Grant` and `Ack` are addressed to one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// A candidate's ballot for `term`.
    Ballot {
        /// The sender's term.
        term: Term,
        /// The sender.
        from: PeerId,
        /// The random ballot (higher wins, ties broken by id).
        ballot: u8,
        /// The sender's log position when it published.
        pos: Pos,
    },
    /// `from` grants its single vote of `term` to `to`.
    Grant {
        /// The term of the vote.
        term: Term,
        /// The voter.
        from: PeerId,
        /// The candidate.
        to: PeerId,
    },
    /// Controller to followers: the entries after `prev_len`, and the controller's commit.
    Append {
        /// The controller's term.
        term: Term,
        /// The controller.
        from: PeerId,
        /// Length of the prefix the entries follow.
        prev_len: u8,
        /// Term of the entry at `prev_len - 1` (0 when `prev_len` is 0).
        prev_term: Term,
        /// The entries `prev_len..` of the controller's log.
        entries: Log,
        /// The controller's commit index.
        commit: u8,
    },
    /// Follower `from` to controller `to`: its log matches the controller's up to `len`.
    Ack {
        /// The follower's (= the controller's) term.
        term: Term,
        /// The follower.
        from: PeerId,
        /// The controller.
        to: PeerId,
        /// The matching length.
        len: u8,
    },
}

impl Msg {
    /// The sender's term.
    pub fn term(&self) -> Term {
        match *self {
            Msg::Ballot { term, .. } | Msg::Grant { term, .. } | Msg::Append { term, .. } | Msg::Ack { term, .. } => {
                term
            }
        }
    }

    /// Whether the message can still change anything, given the peers' current states (terms
    /// never go back, a vote of a term is never given twice, a role once left in a term is never
    /// taken again in it).
    pub fn is_live(&self, peers: &[PeerState; PEERS]) -> bool {
        let at = |p: PeerId| &peers[usize::from(p)];
        match *self {
            Msg::Ballot { term, from, .. } => (0..PEERS as PeerId)
                .filter(|&p| p != from)
                .any(|p| at(p).term() < term || (at(p).term() == term && at(p).durable.voted_for.is_none())),
            Msg::Append { term, from, .. } => (0..PEERS as PeerId).filter(|&p| p != from).any(|p| at(p).term() <= term),
            Msg::Grant { term, to, .. } => at(to).term() == term && at(to).role == Role::Candidate,
            Msg::Ack { term, to, .. } => at(to).term() == term && at(to).role == Role::Controller,
        }
    }

    /// Whether `peer` may receive this message.
    pub fn is_for(&self, peer: PeerId) -> bool {
        match *self {
            Msg::Ballot { from, .. } | Msg::Append { from, .. } => from != peer,
            Msg::Grant { to, .. } | Msg::Ack { to, .. } => to == peer,
        }
    }
}

/// The state a peer persists; all it gets back after a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Durable {
    /// Current term (monotonic).
    pub term: Term,
    /// The peer granted its vote of `term` to this peer, if any.
    pub voted_for: Option<PeerId>,
    /// The log.
    pub log: Log,
}

/// What a peer is in its current term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    /// Has not published a ballot in this term, or has heard the term's controller.
    #[default]
    Follower,
    /// Published a ballot in this term; counts grants.
    Candidate,
    /// Holds grants from a quorum: the controller of its term.
    Controller,
}

/// A peer's whole state: the durable part plus the volatile part (lost on a restart).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerState {
    /// Term, vote and log.
    pub durable: Durable,
    /// Role in `durable.term`.
    pub role: Role,
    /// The ballot (and position) held from each peer in this term, its own included.
    pub ballots: [Option<(u8, Pos)>; PEERS],
    /// Bit i set: peer i granted this peer its vote of this term.
    pub grants: u8,
    /// Entries known committed (a prefix length).
    pub commit: u8,
    /// Controller only: the longest length each follower acked in this term.
    pub matched: [u8; PEERS],
}

impl PeerState {
    /// The term.
    pub fn term(&self) -> Term {
        self.durable.term
    }

    /// The log.
    pub fn log(&self) -> &Log {
        &self.durable.log
    }

    /// The committed prefix this peer knows.
    pub fn committed(&self) -> &[Term] {
        &self.durable.log.entries()[..usize::from(self.commit)]
    }

    fn enter_term(&mut self, term: Term) {
        self.durable.term = term;
        self.durable.voted_for = None;
        self.role = Role::Follower;
        self.ballots = [None; PEERS];
        self.grants = 0;
        self.matched = [0; PEERS];
    }

    fn publish(&mut self, me: PeerId, ballot: u8, out: &mut Vec<Msg>) {
        let pos = self.durable.log.pos();
        self.role = Role::Candidate;
        self.ballots[usize::from(me)] = Some((ballot, pos));
        out.push(Msg::Ballot { term: self.term(), from: me, ballot, pos });
    }

    fn count_grant(&mut self, from: PeerId) {
        // Grants only matter to a candidate: a follower of this term can no longer become one.
        if self.role != Role::Candidate {
            return;
        }
        let members = self.durable.log.members();
        if members & (1 << from) == 0 {
            return; // not a member in the candidate's configuration: its vote does not count
        }
        self.grants |= 1 << from;
        if (self.grants & members).count_ones() as usize >= quorum_of(members) {
            self.role = Role::Controller;
            self.grants = 0; // no longer needed; cleared so that equal situations are equal states
            self.matched = [0; PEERS];
        }
    }

    /// Timer expiry: enter term + 1 and publish `ballot`.
    pub fn time_out(&mut self, me: PeerId, s: &Settings, ballot: u8, out: &mut Vec<Msg>) {
        if self.term() < s.max_term {
            self.enter_term(self.term() + 1);
            self.publish(me, ballot, out);
        }
    }

    /// The candidate this voter would grant to now: among the ballots it holds whose position is
    /// at least its own, the most up-to-date, then the highest (ballot, id). `None` if it has voted or holds none eligible.
    pub fn grant_choice(&self, me: PeerId, s: &Settings) -> Option<PeerId> {
        if self.durable.voted_for.is_some() || (s.wait_for_all_ballots && self.ballots.iter().any(Option::is_none)) {
            return None;
        }
        if self.durable.log.members() & (1 << me) == 0 {
            return None; // not a voter in its own view: it grants no one (as the room's peers)
        }
        let own = self.durable.log.pos();
        let check_pos = s.variant != Variant::NoUpToDateCheck;
        (0..PEERS as u8)
            .filter_map(|i| self.ballots[usize::from(i)].map(|(b, pos)| (b, i, pos)))
            .filter(|&(_, _, pos)| !check_pos || pos >= own)
            // Broken, the lab's bare rule: positions play no part. (Ranking by position first
            // already implies the check whenever the voter holds its own ballot.)
            .max_by_key(|&(b, i, pos)| if check_pos { (pos, b, i) } else { (Pos::default(), b, i) })
            .map(|(_, i, _)| i)
    }

    /// The voter grants its vote of this term now (persisted with the term).
    pub fn grant(&mut self, me: PeerId, s: &Settings, out: &mut Vec<Msg>) {
        if let Some(to) = self.grant_choice(me, s) {
            self.durable.voted_for = Some(to);
            // The ballots held only serve this one grant of the term: drop them (smaller states).
            self.ballots = [None; PEERS];
            if to == me {
                self.count_grant(me);
            } else {
                out.push(Msg::Grant { term: self.term(), from: me, to });
            }
        }
    }

    /// Whether the controller may now toggle `target`'s membership: one change at a time, once
    /// every entry is committed and the last of its own term (the room's rule), or at any moment
    /// in the broken variant; never itself out; never the last member out.
    pub fn may_change(&self, me: PeerId, target: PeerId, s: &Settings) -> bool {
        let log = &self.durable.log;
        let members = log.members();
        let settled = usize::from(self.commit) == log.len() && log.entries().last() == Some(&self.term());
        let allowed = settled || s.variant == Variant::ChangeUncommitted;
        let out = members & (1 << target) != 0;
        s.changes
            && self.role == Role::Controller
            && log.len() < usize::from(s.max_log)
            && target != me
            && allowed
            && !(out && members.count_ones() == 1)
    }

    /// The controller appends an entry of its term that toggles `target`'s membership.
    pub fn change_members(&mut self, me: PeerId, target: PeerId, s: &Settings) {
        if self.may_change(me, target, s) {
            let term = self.term();
            self.durable.log.push_entry(term, 1 + target);
        }
    }

    /// A client's request reaches the controller: it appends an entry of its term.
    pub fn client_request(&mut self, s: &Settings) {
        if self.role == Role::Controller && self.durable.log.len() < usize::from(s.max_log) {
            let term = self.term();
            self.durable.log.push(term);
        }
    }

    /// The controller publishes its log after `prev_len` (a heartbeat when nothing follows).
    pub fn replicate(&mut self, me: PeerId, prev_len: u8, out: &mut Vec<Msg>) {
        let log = &self.durable.log;
        let prev = usize::from(prev_len);
        if self.role == Role::Controller && prev <= log.len() {
            out.push(Msg::Append {
                term: self.term(),
                from: me,
                prev_len,
                prev_term: if prev == 0 { 0 } else { log.entries()[prev - 1] },
                entries: log.suffix(prev),
                commit: self.commit,
            });
        }
    }

    /// A crash and restart: only the durable state survives (minus the vote in the broken
    /// variant). Being down for a while is not modelled apart: it looks like being slow.
    pub fn restart(&mut self, s: &Settings) {
        let mut durable = self.durable;
        if s.variant == Variant::VoteNotDurable {
            durable.voted_for = None;
        }
        *self = PeerState { durable, ..PeerState::default() };
    }

    /// Receives `msg`. A ballot of a higher term moves the peer into that term, where it publishes
    /// its own ballot, `ballot` (every voter publishes one per term).
    pub fn receive(&mut self, me: PeerId, s: &Settings, msg: Msg, ballot: u8, out: &mut Vec<Msg>) {
        match msg {
            Msg::Ballot { term, from, ballot: theirs, pos } => {
                if term > self.term() {
                    self.enter_term(term);
                    self.publish(me, ballot, out);
                }
                // A ballot from a peer that is no member in our view is refused.
                let member = self.durable.log.members() & (1 << from) != 0;
                if term == self.term() && self.durable.voted_for.is_none() && member {
                    self.ballots[usize::from(from)] = Some((theirs, pos));
                }
            }
            Msg::Grant { term, from, .. } => {
                if term == self.term() {
                    self.count_grant(from);
                }
            }
            Msg::Append { term, from, prev_len, prev_term, entries, commit } => {
                if term < self.term() {
                    return;
                }
                if term > self.term() {
                    self.enter_term(term);
                }
                if self.role == Role::Controller {
                    return; // a second controller of this term: the properties report it
                }
                self.role = Role::Follower;
                let log = &mut self.durable.log;
                let prev = usize::from(prev_len);
                if prev > log.len() || (prev > 0 && log.entries()[prev - 1] != prev_term) {
                    return; // does not link: the controller also sends shorter prefixes
                }
                for (k, &e) in entries.entries().iter().enumerate() {
                    let i = prev + k;
                    if i < log.len() && (log.entries()[i], log.change(i)) != (e, entries.change(k)) {
                        log.truncate(i); // only a conflicting suffix, never a matching one
                    }
                    if i >= log.len() {
                        log.push_entry(e, entries.change(k));
                    }
                }
                let matched = prev_len + entries.len() as u8;
                self.commit = self.commit.max(commit.min(matched));
                if matched > 0 {
                    // An ack of 0 tells the controller nothing.
                    out.push(Msg::Ack { term, from: me, to: from, len: matched });
                }
            }
            Msg::Ack { term, from, len, .. } => {
                if term == self.term() && self.role == Role::Controller {
                    let m = &mut self.matched[usize::from(from)];
                    *m = (*m).max(len);
                    self.advance_commit(me, s);
                }
            }
        }
    }

    /// The controller's commit rule: the largest h whose entry h-1 is of its own term (unless
    /// [`Variant::CommitOldTerm`]) and which a quorum, itself included, stores.
    fn advance_commit(&mut self, me: PeerId, s: &Settings) {
        // Counted against the configuration of the controller's whole log (its latest).
        let members = self.durable.log.members();
        let log = self.durable.log.entries();
        for h in (usize::from(self.commit) + 1..=log.len()).rev() {
            let holds =
                |p: usize| members & (1 << p) != 0 && (p == usize::from(me) || usize::from(self.matched[p]) >= h);
            let stored = (0..PEERS).filter(|&p| holds(p)).count();
            let own_term = log[h - 1] == self.term() || s.variant == Variant::CommitOldTerm;
            if stored >= quorum_of(members) && own_term {
                self.commit = h as u8;
                return;
            }
        }
    }
}
