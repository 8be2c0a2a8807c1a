//! Membership and elections: who is in the room, which term it is, and who controls it.
//!
//! Sans-IO: the owner feeds what it hears and gets back what to do. A term's controller is the
//! member with the highest `(vote, id)` among the votes cast for that term. A peer decides once it
//! holds a vote from every member it knows; a vote that arrives later and beats the decided winner
//! replaces it, so every peer that eventually hears every vote ends on the same controller.

use std::collections::{BTreeMap, BTreeSet};

use crate::protocol::{PeerId, Term};

/// What the owner must do after feeding the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Publish this peer's vote for `term`.
    Vote {
        /// The term.
        term: Term,
        /// The vote to publish.
        vote: u32,
    },
    /// `leader` controls `term` (newly decided, or replaced by a higher vote).
    Elected {
        /// The term.
        term: Term,
        /// The controller.
        leader: PeerId,
    },
}

/// Membership, term and votes of one peer.
#[derive(Debug, Clone)]
pub struct Election {
    me: PeerId,
    expected: usize,
    min_peers: usize,
    members: BTreeSet<PeerId>,
    term: Term,
    leader: Option<PeerId>,
    votes: BTreeMap<PeerId, u32>,
    /// Whether this peer has ever known a controller. Until it has, it only decides an election
    /// once it knows the whole expected room: a vote can reach a peer that has met only a few
    /// members, and "every member I know has voted" would then be a premature verdict.
    seen_leader: bool,
    /// Set by [`Election::withdraw`]: the room removed this peer, which casts no vote until it has
    /// adopted a controller again.
    abstaining: bool,
}

impl Election {
    /// A peer `me` in a room that first elects once `expected` peers know each other, and re-elects
    /// only while at least `min_peers` remain.
    pub fn new(me: PeerId, expected: usize, min_peers: usize) -> Self {
        Self {
            me,
            expected,
            min_peers,
            members: BTreeSet::from([me]),
            term: 0,
            leader: None,
            votes: BTreeMap::new(),
            seen_leader: false,
            abstaining: false,
        }
    }

    /// The highest term seen.
    pub fn term(&self) -> Term {
        self.term
    }

    /// The controller of the current term, once decided.
    pub fn leader(&self) -> Option<PeerId> {
        self.leader
    }

    /// Whether this peer has withdrawn (see [`Election::withdraw`]) and not yet adopted a controller.
    pub fn is_withdrawn(&self) -> bool {
        self.abstaining
    }

    /// True when this peer controls the current term.
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.me)
    }

    /// This peer's own vote in the current term, if cast.
    pub fn my_vote(&self) -> Option<u32> {
        self.votes.get(&self.me).copied()
    }

    /// The known members, this peer included.
    pub fn members(&self) -> &BTreeSet<PeerId> {
        &self.members
    }

    /// Number of votes held for the current term.
    pub fn votes_held(&self) -> usize {
        self.votes.len()
    }

    /// Records a member; returns whether it was new. May start the first election.
    pub fn join(&mut self, id: PeerId, vote: &mut impl FnMut() -> u32) -> (bool, Vec<Step>) {
        let new = self.members.insert(id);
        let mut steps = Vec::new();
        if self.term == 0 && self.members.len() >= self.expected {
            self.enter(1, vote, &mut steps, true);
        } else {
            self.decide(&mut steps);
        }
        (new, steps)
    }

    /// Removes a member. Losing the controller starts the next term's election (if enough
    /// members remain); losing an undecided voter may complete the current one.
    pub fn leave(&mut self, id: PeerId, vote: &mut impl FnMut() -> u32) -> (bool, Vec<Step>) {
        let known = self.members.remove(&id);
        let mut steps = Vec::new();
        if id == self.me {
            return (known, steps);
        }
        self.votes.remove(&id);
        if self.leader == Some(id) {
            self.leader = None;
            if self.members.len() >= self.min_peers {
                self.enter(self.term + 1, vote, &mut steps, true);
            }
        } else {
            self.decide(&mut steps);
        }
        (known, steps)
    }

    /// Records a vote cast by `from` for `term` (the first, if it votes twice).
    pub fn vote(&mut self, from: PeerId, term: Term, ballot: u32, vote: &mut impl FnMut() -> u32) -> Vec<Step> {
        let mut steps = Vec::new();
        if term < self.term || from == self.me {
            return steps;
        }
        self.members.insert(from);
        if term > self.term {
            // Someone saw a reason to elect that we missed (or we arrived late): take part.
            // Second hand: someone else started this re-election; see `enter`.
            self.enter(term, vote, &mut steps, term == 1);
        }
        // A member votes once per term: the first ballot stands. A second, different one under
        // the same id comes from another process claiming that id (it is told apart, and
        // exits, only when it hears the owner's hello), and must not change the outcome.
        self.votes.entry(from).or_insert(ballot);
        self.decide(&mut steps);
        steps
    }

    /// After taking up a controller without voting in its term: a zero ballot, so that a peer
    /// still deciding that term does not wait for our vote (we may have subscribed after the votes
    /// went out, and would never cast one) and, never beating a real ballot, changes nothing.
    pub fn abstain(&mut self) -> Option<Step> {
        if self.term == 0 || self.votes.contains_key(&self.me) {
            return None;
        }
        self.votes.insert(self.me, 0);
        Some(Step::Vote { term: self.term, vote: 0 })
    }

    /// The room took this peer for gone (its Last Will was published): it forgets the members,
    /// its votes and any controller, stays in its term, and casts no vote until it adopts a
    /// controller again. A peer that was paused or cut off would otherwise wake up to the votes it
    /// received meanwhile and vote in an election the others held without it.
    pub fn withdraw(&mut self) {
        self.members = BTreeSet::from([self.me]);
        self.votes.clear();
        self.leader = None;
        self.abstaining = true;
    }

    /// Adopts `leader` as controller of `term`, on the word of a challenge or announcement.
    /// Returns true if this changed what the peer believed.
    pub fn adopt(&mut self, term: Term, leader: PeerId) -> bool {
        if term < self.term || (term == self.term && self.leader.is_some()) {
            return false;
        }
        if term > self.term {
            self.votes.clear();
        }
        self.term = term;
        self.leader = Some(leader);
        self.seen_leader = true;
        self.abstaining = false;
        self.members.insert(leader);
        true
    }

    /// Starts this peer's part in the election of `term`: move to it and cast a vote.
    /// `first_hand`: this peer saw the reason for the election itself (the first election's full
    /// room, or its controller leaving). A peer moved into a re-election by another's vote casts a
    /// zero ballot instead: it may be a newcomer whose hello reaches some peers only after they
    /// decided, and a real ballot of its arriving late could replace their decision. Zero ballots
    /// count as votes (nobody waits in vain) and never beat a real one; the first peers to notice
    /// the loss of the controller, which vote at once, hold the real ballots.
    fn enter(&mut self, term: Term, vote: &mut impl FnMut() -> u32, steps: &mut Vec<Step>, first_hand: bool) {
        self.term = term;
        self.leader = None;
        self.votes.clear();
        // Withdrawn: a zero ballot too.
        let v = if self.abstaining || !first_hand { 0 } else { vote() };
        self.votes.insert(self.me, v);
        steps.push(Step::Vote { term, vote: v });
        self.decide(steps);
    }

    fn winner(&self) -> Option<PeerId> {
        self.votes.iter().map(|(&id, &v)| (v, id)).max().map(|(_, id)| id)
    }

    fn decide(&mut self, steps: &mut Vec<Step>) {
        if self.term == 0 || self.votes.is_empty() {
            return;
        }
        if !self.seen_leader && self.members.len() < self.expected {
            return;
        }
        let complete = self.members.iter().all(|m| self.votes.contains_key(m));
        let winner = self.winner();
        let decide = match self.leader {
            None => complete,
            // A late vote that beats the decided winner replaces it (see the module docs).
            Some(current) => winner != Some(current) && self.votes.contains_key(&current),
        };
        if decide && let Some(leader) = winner {
            self.leader = Some(leader);
            self.seen_leader = true;
            self.abstaining = false;
            steps.push(Step::Elected { term: self.term, leader });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixed(v: u32) -> impl FnMut() -> u32 {
        move || v
    }

    #[test]
    fn first_election_starts_at_the_expected_size_and_highest_vote_wins() {
        let mut e = Election::new(1, 3, 2);
        assert_eq!(e.join(2, &mut fixed(50)).1, vec![]);
        assert_eq!(e.join(3, &mut fixed(50)).1, vec![Step::Vote { term: 1, vote: 50 }]);
        assert_eq!(e.vote(2, 1, 70, &mut fixed(0)), vec![]);
        assert_eq!(e.vote(3, 1, 60, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 2 }]);
        assert_eq!(e.leader(), Some(2));
    }

    #[test]
    fn a_vote_reaching_a_peer_that_knows_few_members_does_not_decide_early() {
        let mut e = Election::new(1, 4, 2);
        // Peer 2 reached the room size first and voted; we know only it so far.
        assert_eq!(e.vote(2, 1, 10, &mut fixed(5)), vec![Step::Vote { term: 1, vote: 5 }]);
        assert_eq!(e.leader(), None);
        e.join(3, &mut fixed(0));
        e.vote(3, 1, 50, &mut fixed(0));
        assert_eq!(e.leader(), None, "three of four known");
        assert_eq!(e.join(4, &mut fixed(0)).1, vec![]);
        assert_eq!(e.vote(4, 1, 1, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 3 }]);
    }

    #[test]
    fn a_second_ballot_from_one_member_in_one_term_changes_nothing() {
        let mut e = Election::new(1, 3, 2);
        e.join(2, &mut fixed(5));
        e.join(3, &mut fixed(5));
        e.vote(2, 1, 1, &mut fixed(0));
        assert_eq!(e.vote(3, 1, 9, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 3 }]);
        // Another process under id 2 votes higher in the same term: ignored.
        assert_eq!(e.vote(2, 1, 99, &mut fixed(0)), vec![]);
        assert_eq!(e.leader(), Some(3));
    }

    #[test]
    fn a_withdrawn_peer_steps_down_and_casts_only_zero_ballots_until_it_adopts_a_controller() {
        let mut e = Election::new(1, 3, 2);
        e.join(2, &mut fixed(9));
        e.join(3, &mut fixed(9));
        e.vote(2, 1, 1, &mut fixed(0));
        e.vote(3, 1, 2, &mut fixed(0));
        assert!(e.is_leader());
        e.withdraw();
        assert!(!e.is_leader() && e.members().len() == 1);
        // The votes of the election held without it: it moves to the term with a zero ballot,
        // which nobody waits in vain for and which cannot win.
        e.join(2, &mut fixed(0));
        assert_eq!(
            e.vote(2, 2, 5, &mut fixed(7)),
            vec![Step::Vote { term: 2, vote: 0 }, Step::Elected { term: 2, leader: 2 }]
        );
        assert!(!e.is_withdrawn(), "back in once it knows the controller");
        // Back in: the next election gets its real vote.
        e.join(3, &mut fixed(0));
        assert_eq!(e.leave(2, &mut fixed(4)).1, vec![Step::Vote { term: 3, vote: 4 }]);
    }

    #[test]
    fn a_zero_ballot_after_taking_up_a_controller_completes_a_decision_and_changes_no_winner() {
        let mut e = Election::new(1, 3, 2);
        e.join(2, &mut fixed(9));
        e.join(3, &mut fixed(9));
        e.vote(2, 1, 5, &mut fixed(0));
        // Still waiting for 3, which took up a controller without voting: its zero ballot.
        assert_eq!(e.vote(3, 1, 0, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 1 }]);
        let mut f = Election::new(3, 3, 2);
        assert!(f.adopt(1, 1));
        assert_eq!(f.abstain(), Some(Step::Vote { term: 1, vote: 0 }));
        assert_eq!(f.abstain(), None, "once");
    }

    #[test]
    fn equal_votes_are_broken_by_the_higher_id() {
        let mut e = Election::new(5, 2, 2);
        e.join(9, &mut fixed(10));
        assert_eq!(e.vote(9, 1, 10, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 9 }]);
    }

    #[test]
    fn losing_the_controller_elects_for_the_next_term_unless_too_few_remain() {
        let mut e = Election::new(1, 3, 2);
        e.join(2, &mut fixed(1));
        e.join(3, &mut fixed(1));
        e.vote(2, 1, 9, &mut fixed(0));
        e.vote(3, 1, 5, &mut fixed(0));
        assert_eq!(e.leader(), Some(2));
        assert_eq!(e.leave(2, &mut fixed(4)).1, vec![Step::Vote { term: 2, vote: 4 }]);
        assert_eq!(e.vote(3, 2, 3, &mut fixed(0)), vec![Step::Elected { term: 2, leader: 1 }]);
        assert!(e.is_leader());
        // Only two remain (min 2): losing the controller again leaves one, which waits.
        let mut e2 = e.clone();
        assert_eq!(e2.leave(3, &mut fixed(0)).1, vec![]);
        assert_eq!(e.leave(1, &mut fixed(0)).1, vec![]);
    }

    #[test]
    fn a_voter_leaving_completes_a_re_election_but_the_first_one_waits_for_a_full_room() {
        let mut e = Election::new(1, 3, 2);
        e.join(2, &mut fixed(1));
        e.join(3, &mut fixed(1));
        e.vote(2, 1, 0, &mut fixed(0));
        assert_eq!(e.leave(3, &mut fixed(0)).1, vec![], "two of three: wait for the room");
        assert_eq!(e.join(4, &mut fixed(0)).1, vec![]);
        assert_eq!(e.vote(4, 1, 5, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 4 }]);
        // Term 2 (the controller left): a voter leaving completes it.
        e.join(5, &mut fixed(0));
        e.leave(4, &mut fixed(9));
        e.vote(2, 2, 3, &mut fixed(0));
        assert_eq!(e.leave(5, &mut fixed(0)).1, vec![Step::Elected { term: 2, leader: 1 }]);
    }

    #[test]
    fn old_terms_are_ignored_and_newer_ones_joined() {
        let mut e = Election::new(1, 2, 2);
        // Moved into term 3 by another's vote: a zero ballot, so 2's real one wins.
        assert_eq!(
            e.vote(2, 3, 5, &mut fixed(7)),
            vec![Step::Vote { term: 3, vote: 0 }, Step::Elected { term: 3, leader: 2 }]
        );
        assert_eq!(e.vote(2, 2, 9, &mut fixed(0)), vec![]);
        assert!(!e.adopt(2, 2));
        assert!(e.adopt(4, 2));
        assert_eq!((e.term(), e.leader()), (4, Some(2)));
    }

    #[test]
    fn a_late_higher_vote_replaces_the_winner() {
        let mut e = Election::new(1, 2, 2);
        e.join(2, &mut fixed(5));
        e.vote(2, 1, 3, &mut fixed(0));
        assert_eq!(e.leader(), Some(1));
        assert_eq!(e.vote(3, 1, 8, &mut fixed(0)), vec![Step::Elected { term: 1, leader: 3 }]);
    }

    proptest! {
        /// Peers that hear the same votes in any order, with any membership arrivals, agree.
        #[test]
        fn peers_hearing_all_votes_in_any_order_agree(
            votes in proptest::collection::vec(any::<u32>(), 2..12),
            seed in any::<u64>(),
        ) {
            let n = votes.len();
            let ids: Vec<PeerId> = (1..=n as u32).collect();
            let mut leaders = BTreeSet::new();
            for (i, &me) in ids.iter().enumerate() {
                let mut e = Election::new(me, n, 2);
                let mut order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
                // A cheap deterministic shuffle per peer.
                let mut s = seed ^ u64::from(me);
                for k in (1..order.len()).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    order.swap(k, (s >> 33) as usize % (k + 1));
                }
                let my_vote = votes[i];
                for &j in &order {
                    e.join(ids[j], &mut || my_vote);
                }
                for &j in order.iter().rev() {
                    e.vote(ids[j], 1, votes[j], &mut || my_vote);
                }
                leaders.insert(e.leader());
            }
            let expected = ids.iter().map(|&id| (votes[id as usize - 1], id)).max().map(|(_, id)| id);
            prop_assert_eq!(leaders, BTreeSet::from([expected]));
        }
    }
}
