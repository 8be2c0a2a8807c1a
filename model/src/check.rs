//! The checked system: three [`PeerState`]s, the network and ghost state, as a stateright [`Model`].
//!
//! The network is the set of every message ever published (minus the dropped ones, if lossy):
//! any message may be delivered to any of its recipients at any time, any number of times, in any
//! order — stateright's "unordered duplicating" network, with one envelope per publish instead of
//! one per recipient, as on the room's MQTT topics. That halves the states to explore compared to
//! `stateright::actor::ActorModel` (which also keeps the last delivered message in the state),
//! and is what makes an exhaustive run of terms <= 3 fit in a minute.
//!
//! After each step the [`Ghost`] records every (term, controller) ever elected, the longest
//! prefix anyone ever knew committed, and what each peer ever knew committed (across restarts).
//! The properties read the peers and the ghost; see [`RoomModel::properties`].

use stateright::{Model, Property};

use crate::peer::{Msg, PEERS, PeerId, PeerState, Role, Settings, Term};

/// Faults the environment injects beyond reordering and duplication (always on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// How many crash-restarts may happen in a run (any peer, any moment).
    pub max_restarts: u8,
    /// Whether the network may also drop messages. With a duplicating network a message that is
    /// never delivered is already a lost one for the safety properties, so this only grows the
    /// state space; a test shows it changes nothing.
    pub lossy: bool,
}

/// Auxiliary ("ghost") state: history the protocol never reads, kept only for the properties.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ghost {
    /// Every (term, peer) that was ever controller, sorted.
    pub elected: Vec<(Term, PeerId)>,
    /// The longest prefix any peer ever knew committed: for each index, (the entry's term, the
    /// term of the peer that first knew it committed).
    pub committed: Vec<(Term, Term)>,
    /// For each peer, the longest committed prefix it ever knew (survives its restarts).
    pub known: [u8; PEERS],
    /// Some peer once knew a committed prefix that disagrees with `committed`.
    pub conflict: bool,
}

/// A state of the whole room.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The peers, by index.
    pub peers: [PeerState; PEERS],
    /// Every message published and not dropped; sorted, no duplicates.
    pub net: Vec<Msg>,
    /// Crash-restarts so far.
    pub restarts: u8,
    /// History for the properties.
    pub ghost: Ghost,
}

/// A step of the room. Each nondeterministic choice is a field.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `msg` reaches `to`; if it moves `to` into a new term, `to` publishes `ballot` there.
    Deliver {
        /// The recipient.
        to: PeerId,
        /// The message.
        msg: Msg,
        /// The recipient's own ballot, if it enters a new term.
        ballot: u8,
    },
    /// The network loses `msg` (lossy networks only).
    Drop(Msg),
    /// `peer`'s election timer expires; it enters term + 1 with `ballot`.
    TimeOut {
        /// The peer.
        peer: PeerId,
        /// Its ballot in the new term.
        ballot: u8,
    },
    /// `peer` grants its vote of its term now.
    Grant(PeerId),
    /// The controller `peer` appends an entry.
    ClientRequest(PeerId),
    /// The controller `peer` appends an entry that toggles `target`'s membership.
    ChangeMembers {
        /// The controller.
        peer: PeerId,
        /// The peer out or in.
        target: PeerId,
    },
    /// The controller `peer` publishes its log after `prev_len`.
    Replicate {
        /// The controller.
        peer: PeerId,
        /// The prefix length the entries follow.
        prev_len: u8,
    },
    /// `peer` crashes and restarts with its durable state.
    Restart(PeerId),
}

/// Three peers running the room's rules, with ghost state; see the module docs.
#[derive(Clone, Debug)]
pub struct RoomModel {
    /// Bounds and rules of this instance.
    pub settings: Settings,
    /// Faults of this instance.
    pub faults: Faults,
}

impl RoomModel {
    /// Three peers with `settings`, under `faults`.
    pub fn new(settings: Settings, faults: Faults) -> Self {
        assert!(usize::from(settings.max_log) <= crate::peer::LOG_CAPACITY, "max_log above LOG_CAPACITY");
        assert!(settings.ballots >= 1, "the ballot domain is empty");
        Self { settings, faults }
    }

    fn update_ghost(state: &mut State) {
        let ghost = &mut state.ghost;
        for (i, p) in state.peers.iter().enumerate() {
            let me = (p.term(), i as PeerId);
            if p.role == Role::Controller && !ghost.elected.contains(&me) {
                ghost.elected.push(me);
                ghost.elected.sort_unstable();
            }
            for (k, &entry) in p.committed().iter().enumerate() {
                match ghost.committed.get(k) {
                    Some(&(known, _)) if known != entry => ghost.conflict = true,
                    Some(_) => {}
                    None => ghost.committed.push((entry, p.term())),
                }
            }
            ghost.known[i] = ghost.known[i].max(p.commit);
        }
    }
}

impl Model for RoomModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State { peers: [PeerState::default(); PEERS], net: Vec::new(), restarts: 0, ghost: Ghost::default() }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        let s = &self.settings;
        for &msg in &state.net {
            if self.faults.lossy {
                actions.push(Action::Drop(msg));
            }
            for to in (0..PEERS as PeerId).filter(|&p| msg.is_for(p)) {
                let ballots = match msg {
                    Msg::Ballot { term, .. } if term > state.peers[usize::from(to)].term() => s.ballots,
                    _ => 1,
                };
                actions.extend((0..ballots).map(|ballot| Action::Deliver { to, msg, ballot }));
            }
        }
        for (i, p) in state.peers.iter().enumerate() {
            let peer = i as PeerId;
            if p.term() < s.max_term {
                actions.extend((0..s.ballots).map(|ballot| Action::TimeOut { peer, ballot }));
            }
            if p.grant_choice(peer, s).is_some() {
                actions.push(Action::Grant(peer));
            }
            if p.role == Role::Controller {
                if p.log().len() < usize::from(s.max_log) {
                    actions.push(Action::ClientRequest(peer));
                }
                for target in (0..PEERS as PeerId).filter(|&t| p.may_change(peer, t, s)) {
                    actions.push(Action::ChangeMembers { peer, target });
                }
                let longest = if s.any_prefix { p.log().len() as u8 } else { 0 };
                actions.extend((0..=longest).map(|prev_len| Action::Replicate { peer, prev_len }));
            }
            if state.restarts < self.faults.max_restarts {
                actions.push(Action::Restart(peer));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let s = &self.settings;
        let mut next = last.clone();
        let mut out = Vec::new();
        match action {
            Action::Deliver { to, msg, ballot } => next.peers[usize::from(to)].receive(to, s, msg, ballot, &mut out),
            Action::Drop(msg) => next.net.retain(|&m| m != msg),
            Action::TimeOut { peer, ballot } => next.peers[usize::from(peer)].time_out(peer, s, ballot, &mut out),
            Action::Grant(peer) => next.peers[usize::from(peer)].grant(peer, s, &mut out),
            Action::ClientRequest(peer) => next.peers[usize::from(peer)].client_request(s),
            Action::ChangeMembers { peer, target } => next.peers[usize::from(peer)].change_members(peer, target, s),
            Action::Replicate { peer, prev_len } => next.peers[usize::from(peer)].replicate(peer, prev_len, &mut out),
            Action::Restart(peer) => {
                next.peers[usize::from(peer)].restart(s);
                next.restarts += 1;
            }
        }
        for msg in out {
            if let Err(at) = next.net.binary_search(&msg) {
                next.net.insert(at, msg);
            }
        }
        // Forget the messages that can no longer change anything (a loss the network may inflict
        // anyway), so that states differing only in dead messages are one.
        let peers = &next.peers;
        next.net.retain(|m| m.is_live(peers));
        // No-ops (a stale message, a re-sent one, a restart of a fresh peer) are not steps: the
        // checker explores fewer edges, and `eventually` sees quiescent states as terminal.
        if next.peers == last.peers && next.net == last.net {
            return None;
        }
        Self::update_ghost(&mut next);
        Some(next)
    }

    /// - always `one controller per term`: no term twice in the ghost's election history;
    /// - always `committed prefixes agree`: every prefix any peer ever knew committed is a prefix
    ///   of one common log (the ghost's `committed`);
    /// - always `committed prefix never changes`: each peer's log still starts with every entry it
    ///   ever knew committed (restarts included: the log is durable, the commit index is not);
    /// - always `controller holds committed entries`: a controller of term T holds every entry
    ///   first known committed in a term <= T (Raft's leader completeness);
    /// - sometimes `a controller is elected`, `an entry is committed` and `a later controller holds
    ///   a committed entry` (when the bounds allow them), so that the checks above are not vacuous;
    /// - in liveness mode (`wait_for_all_ballots`), eventually `a controller is elected`.
    fn properties(&self) -> Vec<Property<Self>> {
        let mut p = vec![
            Property::always("one controller per term", |_, s: &State| {
                s.ghost.elected.windows(2).all(|w| w[0].0 != w[1].0)
            }),
            Property::always("committed prefixes agree", |_, s: &State| !s.ghost.conflict),
            Property::always("committed prefix never changes", |_, s: &State| {
                s.peers.iter().zip(s.ghost.known).all(|(p, known)| {
                    let known = &s.ghost.committed[..usize::from(known)];
                    let log = p.log().entries();
                    log.len() >= known.len() && known.iter().zip(log).all(|(&(t, _), &e)| t == e)
                })
            }),
            Property::always("controller holds committed entries", |_, s: &State| {
                s.peers.iter().filter(|c| c.role == Role::Controller).all(|c| {
                    s.ghost
                        .committed
                        .iter()
                        .enumerate()
                        .filter(|&(_, &(_, when))| when <= c.term())
                        .all(|(k, &(t, _))| c.log().entries().get(k) == Some(&t))
                })
            }),
            Property::sometimes("a controller is elected", |_, s: &State| !s.ghost.elected.is_empty()),
        ];
        if self.settings.max_log > 0 {
            p.push(Property::sometimes("an entry is committed", |_, s: &State| !s.ghost.committed.is_empty()));
        }
        if self.settings.max_log > 0 && self.settings.max_term > 1 {
            p.push(Property::sometimes("a later controller holds a committed entry", |_, s: &State| {
                s.peers
                    .iter()
                    .any(|c| c.role == Role::Controller && s.ghost.committed.iter().any(|&(_, when)| when < c.term()))
            }));
        }
        if self.settings.changes {
            p.push(Property::sometimes("a change of members is committed", |_, s: &State| {
                s.peers.iter().any(|p| (0..usize::from(p.commit)).any(|i| p.log().change(i) != 0))
            }));
        }
        if self.settings.wait_for_all_ballots {
            p.push(Property::eventually("eventually a controller is elected", |_, s: &State| {
                !s.ghost.elected.is_empty()
            }));
        }
        p
    }
}
