//! Whole rooms of nodes in memory: a simulated broker delivers every publication to every
//! connected node in one global order (as one MQTT broker does), each node reading at its own
//! pace, and simulated miners solve jobs at random moments. Statuses travel in the same order
//! (one broker orders per topic; one global order is a special case of that).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::pow::Digest;
use crate::work::Found;

struct SimPeer {
    node: Node,
    /// Index of the next publication to deliver; `None` when disconnected.
    cursor: Option<usize>,
    job: Option<Job>,
    events: Vec<Event>,
    /// Role, term and controller of the last status published, as the transport republishes
    /// on any change of them.
    shown: Option<(Role, Term, Option<PeerId>)>,
}

struct Sim {
    peers: BTreeMap<PeerId, SimPeer>,
    /// Every publication: messages and statuses.
    log: Vec<Input>,
    rng: StdRng,
    pace: Pace,
    /// Simulated Unix ms; advances a little with every step.
    clock: u64,
}

impl Sim {
    fn new(seed: u64, difficulty: u8) -> Self {
        Self::with_pace(seed, Pace::Fixed(difficulty))
    }

    fn with_pace(seed: u64, pace: Pace) -> Self {
        let rng = StdRng::seed_from_u64(seed);
        Self { peers: BTreeMap::new(), log: Vec::new(), rng, pace, clock: 1_000_000 }
    }

    fn add(&mut self, id: PeerId, room_size: usize) {
        let cfg = NodeConfig {
            id,
            room_size,
            min_peers: 2,
            pace: self.pace,
            alg: HashAlg::Sha1,
            seed: Some(self.rng.random()),
            incarnation: self.rng.random(),
            since_ms: self.clock,
            silence_ms: 0,
        };
        let cursor = Some(self.log.len());
        self.peers.insert(id, SimPeer { node: Node::new(cfg), cursor, job: None, events: Vec::new(), shown: None });
        self.feed(id, Input::Connected);
    }

    /// Kills a peer: the broker publishes its Last Will, its status marked offline.
    fn kill(&mut self, id: PeerId) {
        let peer = self.peers.remove(&id).expect("a live peer");
        self.log.push(Input::Status(peer.node.offline_status(self.clock)));
    }

    fn feed(&mut self, id: PeerId, input: Input) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        for action in peer.node.handle(self.clock, input) {
            match action {
                Action::Publish(msg) => self.log.push(Input::Message(Envelope::new(id, msg))),
                Action::PublishStatus => self.log.push(Input::Status(peer.node.status(self.clock))),
                Action::Mine(job) => peer.job = Some(job),
                Action::StopMining => peer.job = None,
                Action::Emit(e) => peer.events.push(e),
                Action::Fatal(e) => panic!("peer {id} stopped: {e}"),
            }
        }
        let status = peer.node.status(self.clock);
        let shown = Some((status.role, status.term, status.leader));
        if shown != peer.shown {
            peer.shown = shown;
            self.log.push(Input::Status(status));
        }
    }

    /// One random step: a delivery, or (sometimes) a miner finding its solution.
    fn step(&mut self) -> bool {
        self.clock += self.rng.random_range(0..3);
        let ready: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.cursor.is_some_and(|c| c < self.log.len()))
            .map(|(&id, _)| id)
            .collect();
        let miners: Vec<PeerId> = self.peers.iter().filter(|(_, p)| p.job.is_some()).map(|(&id, _)| id).collect();
        if ready.is_empty() && miners.is_empty() {
            return false;
        }
        if !miners.is_empty() && (ready.is_empty() || self.rng.random_ratio(1, 8)) {
            let id = miners[self.rng.random_range(0..miners.len())];
            let job = self.peers.get_mut(&id).and_then(|p| p.job.take()).expect("job");
            let nonce = job.template.search(u32::from(job.difficulty), 0, u64::MAX).expect("low difficulty");
            self.feed(id, Input::Mined(Found { tx: job.tx, nonce, hashes: 1, elapsed_ms: 0 }));
            return true;
        }
        let id = ready[self.rng.random_range(0..ready.len())];
        let peer = self.peers.get_mut(&id).expect("peer");
        let cursor = peer.cursor.as_mut().expect("connected");
        let input = self.log[*cursor].clone();
        *cursor += 1;
        self.feed(id, input);
        true
    }

    /// Steps until `done` holds, panicking after `limit` steps.
    fn run_until(&mut self, limit: usize, mut done: impl FnMut(&Sim) -> bool) {
        for _ in 0..limit {
            if done(self) {
                return;
            }
            assert!(self.step(), "room went quiet before the condition held");
        }
        panic!("condition not reached in {limit} steps; heights {:?}", self.heights());
    }

    fn heights(&self) -> BTreeMap<PeerId, u64> {
        self.peers.iter().map(|(&id, p)| (id, p.node.chain().height())).collect()
    }

    fn min_height(&self) -> u64 {
        self.peers.values().map(|p| p.node.chain().height()).min().unwrap_or(0)
    }

    fn leaders(&self) -> BTreeSet<(Term, Option<PeerId>)> {
        self.peers.values().map(|p| (p.node.election().term(), p.node.election().leader())).collect()
    }

    /// Every peer's chain is a prefix of the longest one, and each verifies.
    fn assert_one_chain(&self) {
        let longest = self.peers.values().map(|p| p.node.chain().blocks()).max_by_key(|b| b.len()).unwrap();
        for (id, p) in &self.peers {
            let blocks = p.node.chain().blocks();
            assert_eq!(blocks, &longest[..blocks.len()], "peer {id}'s chain forks");
        }
        let mut check = Chain::new();
        for b in longest {
            check.append(*b).expect("every block verifies");
        }
    }
}

#[test]
fn a_room_of_ten_elects_one_controller_and_mines_a_shared_chain() {
    let mut sim = Sim::new(1, 6);
    for id in 1..=10 {
        sim.add(id * 1000, 10);
    }
    sim.run_until(200_000, |s| s.min_height() >= 5);
    let leaders = sim.leaders();
    assert_eq!(leaders.len(), 1, "all agree: {leaders:?}");
    let (term, leader) = leaders.into_iter().next().unwrap();
    assert_eq!(term, 1);
    let leader = leader.expect("elected");
    sim.assert_one_chain();
    let chain = sim.peers[&leader].node.chain().blocks().to_vec();
    assert!(chain.iter().all(|b| b.miner != leader), "the controller does not mine");
    assert!(chain.iter().enumerate().all(|(i, b)| b.tx == i as u64));
}

#[test]
fn the_room_replaces_a_dead_controller_and_continues_the_chain() {
    let mut sim = Sim::new(2, 6);
    for id in 1..=5 {
        sim.add(id, 5);
    }
    sim.run_until(100_000, |s| s.min_height() >= 2);
    let (_, old) = sim.leaders().into_iter().next().unwrap();
    sim.kill(old.unwrap());
    sim.run_until(100_000, |s| s.min_height() >= 5);
    let leaders = sim.leaders();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let (term, leader) = leaders.into_iter().next().unwrap();
    assert_eq!(term, 2);
    assert_ne!(leader, old);
    sim.assert_one_chain();
}

#[test]
fn a_late_joiner_adopts_the_controller_and_catches_up_without_an_election() {
    let mut sim = Sim::new(3, 6);
    for id in 1..=4 {
        sim.add(id, 4);
    }
    sim.run_until(100_000, |s| s.min_height() >= 3);
    let before = sim.leaders();
    sim.add(99, 4);
    sim.run_until(100_000, |s| s.peers[&99].node.chain().height() >= 5 && s.min_height() >= 5);
    assert_eq!(sim.leaders(), before, "no new election");
    let late = &sim.peers[&99];
    assert!(
        late.events.iter().all(|e| !matches!(e, Event::VoteCast { vote, .. } if *vote != 0)),
        "the late joiner cast no ballot but a zero one"
    );
    sim.assert_one_chain();
}

#[test]
fn a_newcomer_whose_hello_overtakes_a_re_elections_votes_votes_in_it_instead_of_stalling_it() {
    let mut exercised = 0;
    for seed in 0..20 {
        let mut sim = Sim::new(100 + seed, 6);
        for id in 1..=5 {
            sim.add(id, 5);
        }
        sim.run_until(100_000, |s| s.min_height() >= 2);
        let (_, old) = sim.leaders().into_iter().next().unwrap();
        sim.kill(old.unwrap());
        // Every survivor has voted in term 2, so the newcomer will not see those votes.
        sim.run_until(100_000, |s| s.peers.values().all(|p| p.node.election().term() == 2));
        let winner = sim
            .log
            .iter()
            .filter_map(|i| match i {
                Input::Message(Envelope { from, msg: Message::Vote { term: 2, vote, .. }, .. }) => Some((*vote, *from)),
                _ => None,
            })
            .max()
            .map(|(_, id)| id)
            .expect("votes of term 2");
        if sim.peers[&winner].node.election().leader().is_some() {
            continue;
        }
        exercised += 1;
        sim.add(99, 5);
        // MQTT orders each topic, not the room: the newcomer's hello (on init) reaches the
        // winner-to-be before the votes it still misses (on voting). It now waits for the
        // newcomer's vote in term 2 too.
        let hello = sim
            .log
            .iter()
            .rev()
            .find(|i| matches!(i, Input::Message(Envelope { from: 99, msg: Message::Hello { .. }, .. })))
            .cloned()
            .expect("the newcomer's hello");
        sim.feed(winner, hello);
        sim.run_until(100_000, |s| s.min_height() >= 4);
        let leaders = sim.leaders();
        assert_eq!(leaders, BTreeSet::from([(2, Some(winner))]), "seed {seed}");
        sim.assert_one_chain();
    }
    assert!(exercised >= 3, "only {exercised} seeds reached the window");
}

#[test]
fn solutions_are_judged_once_and_forgeries_are_rejected() {
    let mut sim = Sim::new(4, 6);
    for id in 1..=3 {
        sim.add(id, 3);
    }
    sim.run_until(100_000, |s| s.min_height() >= 1);
    let (term, leader) = sim.leaders().into_iter().next().unwrap();
    let leader = leader.unwrap();
    // Find a peer mining, take its open challenge, and submit a bogus nonce plus a replay of block 0.
    let miner = *sim.peers.keys().find(|&&id| id != leader).unwrap();
    let node = &mut sim.peers.get_mut(&leader).unwrap().node;
    let open = *node.open().expect("a challenge is open");
    let block0 = node.chain().blocks()[0];
    let bad = Template::new(&open.prev, open.tx, miner);
    let wrong = (0..).find(|&n| bad.digest(n).leading_zeros() < u32::from(open.difficulty)).unwrap();
    let mut out = node.handle(0, Input::Message(Envelope::new(miner, Message::Solution { tx: open.tx, nonce: wrong })));
    out.extend(node.handle(0, Input::Message(Envelope::new(miner, Message::Solution { tx: 0, nonce: block0.nonce }))));
    out.extend(node.handle(0, Input::Message(Envelope::new(miner, Message::Solution { tx: 77, nonce: 1 }))));
    let reasons: Vec<RejectReason> = out
        .iter()
        .filter_map(|a| match a {
            Action::Publish(Message::Result { outcome: Outcome::Rejected { reason, .. }, term: t }) => {
                assert_eq!(*t, term);
                Some(*reason)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [RejectReason::InsufficientWork, RejectReason::AlreadySolved, RejectReason::UnknownTransaction]
    );
}

#[test]
fn challenges_and_results_from_anyone_but_the_controller_are_ignored() {
    let mut sim = Sim::new(5, 6);
    for id in 1..=3 {
        sim.add(id, 3);
    }
    sim.run_until(100_000, |s| s.min_height() >= 1);
    let (term, leader) = sim.leaders().into_iter().next().unwrap();
    let leader = leader.unwrap();
    let other = *sim.peers.keys().find(|&&id| id != leader).unwrap();
    let victim = *sim.peers.keys().find(|&&id| id != leader && id != other).unwrap();
    let node = &mut sim.peers.get_mut(&victim).unwrap().node;
    let prev = node.chain().tip_hash(HashAlg::Sha1);
    let tx = node.chain().height();
    let forged = Challenge { term, tx, alg: HashAlg::Sha1, difficulty: 1, pace: Pace::Fixed(1), issued_ms: 0, prev };
    let out = node.handle(0, Input::Message(Envelope::new(other, Message::Challenge(forged))));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Emit(Event::MessageDropped { reason, .. }) if reason == "not_controller"))
    );
    assert!(!out.iter().any(|a| matches!(a, Action::Mine(_))));
    assert_eq!(node.election().leader(), Some(leader));
}

#[test]
fn retargeting_controllers_set_difficulties_every_peer_verifies() {
    // Blocks come every few simulated ms; a 1 s target pushes the difficulty up a bit per block.
    let pace = Pace::Retarget { target_ms: 1000, start: 3, lo: 2, hi: 7 };
    let mut sim = Sim::with_pace(6, pace);
    for id in 1..=4 {
        sim.add(id, 4);
    }
    sim.run_until(200_000, |s| s.min_height() >= 8);
    sim.assert_one_chain();
    let chain = sim.peers[&1].node.chain().blocks().to_vec();
    let difficulties: Vec<u8> = chain.iter().map(|b| b.difficulty).collect();
    assert_eq!(&difficulties[..5], &[3, 4, 5, 6, 7], "one bit per block up to the bound");
    assert!(difficulties[5..].iter().all(|&d| d == 7));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the delivery interleaving, a room agrees on one controller and one chain, and a
    /// controller's death never loses or forks a block.
    #[test]
    fn any_interleaving_keeps_one_controller_and_one_chain(seed in any::<u64>(), n in 3u32..8, kill_after in 1u64..4) {
        let mut sim = Sim::new(seed, 4);
        for id in 1..=n {
            sim.add(id * 7, n as usize);
        }
        sim.run_until(200_000, |s| s.min_height() >= kill_after);
        let (_, leader) = sim.leaders().into_iter().next().unwrap();
        sim.kill(leader.unwrap());
        // Blocks beyond what the dead controller may already have published need the new one.
        let published = sim.peers.values().map(|p| p.node.chain().height()).max().unwrap_or(0) + 1;
        sim.run_until(200_000, |s| s.min_height() >= published + 2);
        prop_assert_eq!(sim.leaders().len(), 1);
        sim.assert_one_chain();
    }
}

/// A forgery the protocol must shrug off, aimed at the room as one peer currently sees it.
fn forgery(sim: &mut Sim, kind: u8) -> Option<Envelope> {
    let (term, leader) = sim.leaders().into_iter().next_back()?;
    let leader = leader?;
    let ids: Vec<PeerId> = sim.peers.keys().copied().collect();
    let outsider = ids.iter().copied().find(|&id| id != leader)?;
    let view = &sim.peers.get(&outsider)?.node;
    let tx = view.chain().height();
    let prev = view.chain().tip_hash(HashAlg::Sha1);
    let r: u64 = sim.rng.random();
    let challenge = Challenge { term, tx, alg: HashAlg::Sha1, difficulty: 1, pace: Pace::Fixed(1), issued_ms: 0, prev };
    let env = match kind % 5 {
        // A challenge for the current term from someone who is not its controller.
        0 => Envelope::new(outsider, Message::Challenge(challenge)),
        // A challenge of an older term (if there is one), in the controller's name.
        1 if term > 1 => Envelope::new(leader, Message::Challenge(Challenge { term: term - 1, ..challenge })),
        1 => return None,
        // An accepted block whose hash is not its proof of work, in the controller's name.
        2 => {
            let block = Block {
                tx,
                term,
                alg: HashAlg::Sha1,
                difficulty: 1,
                pace: Pace::Fixed(1),
                issued_ms: 0,
                solved_ms: 1,
                prev,
                miner: outsider,
                nonce: r,
                hash: Digest::Sha1([0; 20]),
            };
            Envelope::new(leader, Message::Result { term, outcome: Outcome::Accepted(block) })
        }
        // A solution that does not do the work, or names a transaction far ahead.
        3 => Envelope::new(outsider, Message::Solution { tx, nonce: r }),
        _ => Envelope::new(outsider, Message::Solution { tx: tx + 1000, nonce: r }),
    };
    Some(env)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Random forgeries mixed into a running room (and a controller's death) never break the
    /// invariants: one controller per term, one chain of consecutive, verified blocks.
    #[test]
    fn forgeries_mixed_into_a_running_room_never_break_the_invariants(
        seed in any::<u64>(), kinds in proptest::collection::vec(any::<u8>(), 20..60),
    ) {
        let mut sim = Sim::new(seed, 4);
        for id in 1..=4 {
            sim.add(id * 11, 4);
        }
        sim.run_until(200_000, |s| s.min_height() >= 1);
        for (i, kind) in kinds.iter().enumerate() {
            if let Some(env) = forgery(&mut sim, *kind) {
                sim.log.push(Input::Message(env));
            }
            if i == kinds.len() / 2 {
                let (_, leader) = sim.leaders().into_iter().next_back().unwrap();
                sim.kill(leader.unwrap());
            }
            for _ in 0..50 {
                if !sim.step() {
                    break;
                }
            }
        }
        let published = sim.peers.values().map(|p| p.node.chain().height()).max().unwrap_or(0) + 1;
        sim.run_until(400_000, |s| s.min_height() >= published + 2);
        prop_assert_eq!(sim.leaders().len(), 1);
        sim.assert_one_chain();
        for p in sim.peers.values() {
            prop_assert!(p.node.chain().blocks().iter().all(|b| b.hash != Digest::Sha1([0; 20])));
        }
        let dropped = sim.peers.values().flat_map(|p| &p.events).filter(|e| matches!(e, Event::MessageDropped { .. }));
        prop_assert!(dropped.count() > 0, "the forgeries reached the peers and were dropped");
    }
}

fn bare_node(id: PeerId, room_size: usize, incarnation: u64, since_ms: u64) -> Node {
    Node::new(NodeConfig {
        id,
        room_size,
        min_peers: 2,
        pace: Pace::Fixed(4),
        alg: HashAlg::Sha1,
        seed: Some(u64::from(id)),
        incarnation,
        since_ms,
        silence_ms: 2_000,
    })
}

#[test]
fn a_stalled_controller_steps_down_ignores_its_backlogs_election_and_resumes_if_the_room_still_names_it() {
    let vote = |from, term, vote| Input::Message(Envelope::new(from, Message::Vote { term, vote, height: 0 }));
    let elected = || {
        let mut n = bare_node(1, 3, 7, 0);
        n.handle(0, Input::Connected);
        n.handle(0, hello(2, 20, 0));
        n.handle(0, hello(3, 30, 0));
        n.handle(0, vote(2, 1, 0));
        n.handle(0, vote(3, 1, 1));
        assert!(n.election().is_leader());
        n
    };
    let mut n = elected();
    let out = n.handle(9_000, Input::Stalled);
    assert!(!n.election().is_leader());
    assert!(out.iter().any(|a| matches!(a, Action::Emit(Event::Withdrawn { term: 1 }))), "{out:?}");
    assert!(out.iter().any(|a| matches!(a, Action::Publish(Message::Hello { want_reply: true, .. }))), "{out:?}");
    // The backlog: the others' votes of the election they held without us. A zero ballot at most.
    let out = n.handle(9_001, vote(2, 2, 5));
    assert!(!out.iter().any(|a| matches!(a, Action::Publish(Message::Vote { vote, .. }) if *vote != 0)), "{out:?}");
    let mut m = elected();
    m.handle(9_000, Input::Stalled);
    let reply = |term, leader| {
        let view = View { term, leader: Some(leader), height: 0 };
        Input::Message(Envelope::new(2, Message::Hello { want_reply: false, view, incarnation: 20, since_ms: 0 }))
    };
    // A reply that still names us controller of our term: we carry on.
    m.handle(9_002, reply(1, 1));
    assert!(m.election().is_leader());
    // One that names another controller of a later term: we follow it.
    n.handle(9_002, reply(2, 3));
    assert_eq!((n.election().term(), n.election().leader()), (2, Some(3)));
}

#[test]
fn a_controller_silent_for_too_long_is_taken_for_gone_and_the_room_re_elects() {
    let mut n = bare_node(1, 3, 7, 0);
    n.handle(0, Input::Connected);
    n.handle(0, hello(2, 20, 0));
    n.handle(0, hello(3, 30, 0));
    let vote = |from, vote| Input::Message(Envelope::new(from, Message::Vote { term: 1, vote, height: 0 }));
    n.handle(0, vote(2, 0));
    n.handle(0, vote(3, u32::MAX));
    assert_eq!(n.election().leader(), Some(3));
    n.handle(1_000, Input::Tick);
    // Anything from the controller keeps it alive.
    n.handle(2_500, hello(3, 30, 0));
    assert!(n.handle(4_400, Input::Tick).is_empty());
    // A reconnection restarts the count: the silence while we were cut off says nothing.
    n.handle(4_450, Input::Connected);
    assert!(!n.handle(6_400, Input::Tick).iter().any(|a| matches!(a, Action::Emit(Event::ControllerSilent { .. }))));
    let out = n.handle(6_500, Input::Tick);
    assert!(
        out.iter().any(|a| matches!(a, Action::Emit(Event::ControllerSilent { id: 3, silent_ms: 2_050 }))),
        "{out:?}"
    );
    assert!(out.iter().any(|a| matches!(a, Action::Publish(Message::Vote { term: 2, .. }))), "{out:?}");
    assert!(!n.election().members().contains(&3));
}

fn hello(from: PeerId, incarnation: u64, since_ms: u64) -> Input {
    let view = View { term: 0, leader: None, height: 0 };
    Input::Message(Envelope::new(from, Message::Hello { want_reply: false, view, incarnation, since_ms }))
}

#[test]
fn a_vote_that_overtakes_its_voters_hello_is_held_until_the_hello_arrives() {
    let mut node = bare_node(1, 2, 1, 0);
    let vote = Input::Message(Envelope::new(2, Message::Vote { term: 1, vote: u32::MAX, height: 0 }));
    let out = node.handle(0, vote);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Emit(Event::MessageDropped { reason, .. }) if reason == "unknown_voter"))
    );
    assert_eq!(node.election().members().len(), 1, "an unknown voter is not a member");
    node.handle(0, hello(2, 9, 0));
    assert_eq!(node.election().leader(), Some(2), "the held vote counted once 2 announced itself");
}

#[test]
fn of_two_processes_claiming_one_id_the_later_one_gives_way() {
    let mut first = bare_node(5, 3, 111, 1000);
    let mut second = bare_node(5, 3, 222, 2000);
    // Each hears the other's hello under its own id.
    let out = second.handle(0, hello(5, 111, 1000));
    assert!(out.iter().any(|a| matches!(a, Action::Fatal(m) if m.contains("client id 5"))), "{out:?}");
    let out = first.handle(0, hello(5, 222, 2000));
    assert!(!out.iter().any(|a| matches!(a, Action::Fatal(_))));
    assert!(
        out.iter().any(|a| matches!(a, Action::Emit(Event::MessageDropped { reason, .. }) if reason == "duplicate_id"))
    );
    assert!(out.iter().any(|a| matches!(a, Action::Publish(Message::Hello { incarnation: 111, .. }))), "answers");
    // Its own echo is not a duplicate.
    assert!(first.handle(0, hello(5, 111, 1000)).is_empty());
}

#[test]
fn hellos_under_made_up_ids_cannot_grow_the_member_set_without_bound() {
    let mut node = bare_node(1, 10, 1, 0);
    for id in 2..5000 {
        node.handle(0, hello(id, 1, 0));
    }
    assert_eq!(node.election().members().len(), MAX_MEMBERS);
}

fn status_of(node: &Node, incarnation: u64, since_ms: u64, role: Role) -> Input {
    let status = node.status(since_ms + 5);
    Input::Status(Status { incarnation, started_ms: since_ms, role, ..status })
}

fn left(out: &[Action]) -> Vec<PeerId> {
    out.iter()
        .filter_map(|a| match a {
            Action::Emit(Event::PeerLeft { id, .. }) => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn an_offline_status_is_a_departure_only_for_the_incarnation_of_the_latest_hello() {
    let mut node = bare_node(1, 3, 1, 0);
    node.handle(0, hello(2, 20, 100));
    node.handle(0, hello(3, 30, 100));
    let peer2 = bare_node(2, 3, 20, 100);
    assert_eq!(node.incarnation_of(2), Some(20));

    // A retained offline status of 2's earlier run.
    let out = node.handle(0, status_of(&peer2, 19, 50, Role::Offline));
    assert!(left(&out).is_empty());
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Emit(Event::MessageDropped { reason, .. }) if reason == "stale_offline"))
    );
    // Any other role of the live incarnation is not a departure either.
    assert!(left(&node.handle(0, status_of(&peer2, 20, 100, Role::Miner))).is_empty());

    // 2 restarts; the will of its previous run fires after its new hello.
    node.handle(0, hello(2, 21, 200));
    assert!(left(&node.handle(0, status_of(&peer2, 20, 100, Role::Offline))).is_empty());
    assert!(node.election().members().contains(&2));

    // The will of the live run removes it, once.
    assert_eq!(left(&node.handle(0, status_of(&peer2, 21, 200, Role::Offline))), [2]);
    assert!(!node.election().members().contains(&2));
    assert_eq!(node.incarnation_of(2), None);
    assert!(node.handle(0, status_of(&peer2, 21, 200, Role::Offline)).is_empty(), "no longer a member");
    // Peers never announced (retained statuses of long-gone peers) are ignored silently.
    let stranger = bare_node(9, 3, 90, 0);
    assert!(node.handle(0, status_of(&stranger, 90, 0, Role::Offline)).is_empty());
    assert_eq!(node.election().members().len(), 2);
}

#[test]
fn a_peer_shown_wrongly_under_its_own_id_republishes_its_status() {
    let mut node = bare_node(5, 3, 500, 1000);
    let me = bare_node(5, 3, 500, 1000);
    let republishes = |out: &[Action]| out.iter().filter(|a| matches!(a, Action::PublishStatus)).count();
    // Our own echo.
    assert!(node.handle(0, status_of(&me, 500, 1000, Role::Joining)).is_empty());
    // The will of our previous run, retained or late.
    assert_eq!(republishes(&node.handle(0, status_of(&me, 499, 10, Role::Offline))), 1);
    // Our own will, fired while we were cut off: the room took it as our departure.
    let out = node.handle(0, status_of(&me, 500, 1000, Role::Offline));
    assert_eq!(republishes(&out), 1);
    assert!(out.iter().any(|a| matches!(a, Action::Publish(Message::Hello { incarnation: 500, .. }))), "{out:?}");
    // A later process claiming our id overwrote our status: answer it (it will give way).
    assert_eq!(republishes(&node.handle(0, status_of(&me, 600, 2000, Role::Joining))), 1);
    // An earlier one: we are the later process, and do not answer (no republishing back and forth).
    assert!(node.handle(0, status_of(&me, 400, 900, Role::Miner)).is_empty());
}

#[test]
fn statuses_show_roles_terms_open_transactions_and_blocks_won() {
    let mut sim = Sim::new(7, 5);
    for id in 1..=4 {
        sim.add(id, 4);
    }
    assert!(sim.peers.values().all(|p| p.node.role() == Role::Joining), "no election before all are known");
    sim.run_until(200_000, |s| s.min_height() >= 6);
    let statuses: Vec<Status> = sim.peers.values().map(|p| p.node.status(7)).collect();
    let (_, leader) = sim.leaders().into_iter().next().unwrap();
    for s in &statuses {
        let expected = if Some(s.id) == leader { Role::Controller } else { Role::Miner };
        assert_eq!((s.role, s.term, s.leader), (expected, 1, leader));
        assert_eq!(Status::decode(&s.encode(), s.id).as_ref(), Ok(s), "a node's status is valid on the wire");
        assert_eq!(
            s.blocks_won,
            sim.peers[&s.id].node.chain().blocks().iter().filter(|b| b.miner == s.id).count() as u64
        );
    }
    let controller = statuses.iter().find(|s| s.role == Role::Controller).unwrap();
    assert_eq!(controller.blocks_won, 0, "the controller does not mine");
    assert_eq!(controller.tx, sim.peers[&controller.id].node.open().map(|c| c.tx));
    assert_eq!(sim.peers[&1].node.offline_status(9).role, Role::Offline);

    // Killing the controller: the others see its will, and elect again.
    sim.kill(leader.unwrap());
    sim.run_until(200_000, |s| s.peers.values().all(|p| p.node.role() != Role::Miner));
    assert!(sim.peers.values().all(|p| p.node.role() == Role::Electing || p.node.role() == Role::Controller));
    sim.run_until(200_000, |s| s.leaders().len() == 1 && s.leaders().iter().all(|(t, l)| *t == 2 && l.is_some()));
}
