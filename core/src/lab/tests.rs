//! A simulated room of lab nodes: every node has its own inbox, filled in publish order (a node
//! receives only what is published after it connected, as with MQTT), and the nodes take turns at
//! random. Miners are simulated by running the real search at low difficulty.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::wire::{self, ChallengeMsg, ElectionMsg, Id, InitMsg, LabMsg, ResultMsg, SolutionMsg};
use super::work::{LabFound, LabJob, search};
use super::*;

struct Sim {
    nodes: Vec<LabNode>,
    connected: Vec<bool>,
    inbox: Vec<VecDeque<LabMsg>>,
    jobs: Vec<Option<LabJob>>,
    events: Vec<Vec<Event>>,
    /// Nodes that asked for a wake, given once the messages in flight are delivered.
    wakes: Vec<usize>,
    rng: StdRng,
}

impl Sim {
    fn new(ids: Vec<Id>, seed: u64) -> Self {
        let n = ids.len();
        let nodes = ids
            .into_iter()
            .enumerate()
            .map(|(i, me)| {
                LabNode::new(LabConfig { me, room_size: n, difficulty: (6, 9), seed: Some(seed + i as u64) })
            })
            .collect();
        Self {
            nodes,
            connected: vec![false; n],
            inbox: vec![VecDeque::new(); n],
            jobs: vec![None; n],
            events: vec![Vec::new(); n],
            wakes: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn apply(&mut self, i: usize, actions: Vec<LabAction>) {
        for a in actions {
            match a {
                LabAction::WakeAfter(_) => self.wakes.push(i),
                LabAction::Publish(m) => {
                    for (j, inbox) in self.inbox.iter_mut().enumerate() {
                        if self.connected[j] {
                            inbox.push_back(m.clone());
                        }
                    }
                }
                LabAction::Mine(job) => self.jobs[i] = Some(job),
                LabAction::StopMining => self.jobs[i] = None,
                LabAction::Emit(e) => self.events[i].push(e),
            }
        }
    }

    fn input(&mut self, i: usize, input: LabInput) {
        let actions = self.nodes[i].handle(input);
        self.apply(i, actions);
    }

    fn connect(&mut self, i: usize) {
        self.connected[i] = true;
        self.input(i, LabInput::Connected);
    }

    /// Delivers messages one at a time to random nodes until every inbox is empty, then the
    /// wakes asked for (the time they wait is longer than a delivery), until nothing is left.
    fn settle(&mut self) {
        loop {
            let ready: Vec<usize> = (0..self.nodes.len()).filter(|&i| !self.inbox[i].is_empty()).collect();
            if ready.is_empty() {
                if self.wakes.is_empty() {
                    return;
                }
                for i in std::mem::take(&mut self.wakes) {
                    self.input(i, LabInput::Wake);
                }
                continue;
            }
            let i = ready[self.rng.random_range(0..ready.len())];
            let msg = self.inbox[i].pop_front().unwrap();
            self.input(i, LabInput::Message(msg));
        }
    }

    /// One random miner with a job finds its solution; false if nobody mines.
    fn mine_one(&mut self) -> bool {
        let busy: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.jobs[i].is_some()).collect();
        if busy.is_empty() {
            return false;
        }
        let i = busy[self.rng.random_range(0..busy.len())];
        let job = self.jobs[i].take().unwrap();
        let (stop, hashes) = (AtomicBool::new(false), AtomicU64::new(0));
        let (solution, counter) = search(&format!("sim{i}-"), job.difficulty, &stop, &hashes).unwrap();
        self.input(i, LabInput::Mined(LabFound { tx: job.tx, solution, counter, hashes: 1, elapsed_ms: 0 }));
        true
    }

    fn results(&self, i: usize) -> Vec<(u64, String, String)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                Event::LabResult { tx, winner, solution, .. } => Some((*tx, winner.clone(), solution.clone())),
                _ => None,
            })
            .collect()
    }

    fn drops(&self, i: usize) -> Vec<&str> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                Event::MessageDropped { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Runs a room whose nodes join one by one (each after the others settled, so it missed all they
/// said), until `blocks` transactions are solved; checks that everyone agrees.
fn run_room(ids: Vec<Id>, seed: u64, blocks: u64) -> Sim {
    let n = ids.len();
    let mut sim = Sim::new(ids, seed);
    for i in 0..n {
        sim.connect(i);
        sim.settle();
    }
    let controller = sim.nodes[0].controller().cloned().expect("an election");
    for (i, node) in sim.nodes.iter().enumerate() {
        assert_eq!(node.controller(), Some(&controller), "node {i}");
    }
    while sim.nodes.iter().map(|n| n.table().values().filter(|r| r.winner.is_some()).count() as u64).min()
        < Some(blocks)
    {
        assert!(sim.mine_one(), "nobody mines");
        sim.settle();
    }
    let c = sim.nodes.iter().position(LabNode::is_controller).unwrap();
    assert!(sim.jobs[c].is_none(), "the controller mines");
    let reference = sim.nodes[c].table().clone();
    for (i, node) in sim.nodes.iter().enumerate() {
        let solved: Vec<_> = node.table().iter().filter(|(_, r)| r.winner.is_some()).collect();
        let expected: Vec<_> = reference.iter().filter(|(_, r)| r.winner.is_some()).collect();
        assert_eq!(solved, expected, "node {i}'s table");
        for (tx, winner, solution) in sim.results(i) {
            assert!(wire::meets(&solution, reference[&tx].difficulty), "{tx} {winner} {solution}");
        }
        assert!(sim.drops(i).is_empty(), "node {i} dropped {:?}", sim.drops(i));
    }
    sim
}

#[test]
fn a_room_of_integer_ids_joining_one_by_one_agrees() {
    for seed in 0..20 {
        let ids = (0..5).map(|i| Id::Int(1000 + i * 7 + seed as i64)).collect();
        let sim = run_room(ids, seed, 5);
        // Everyone voted integers: the election compared numerically.
        let votes: Vec<_> = sim.events.iter().flatten().filter(|e| matches!(e, Event::VoteCast { .. })).collect();
        assert_eq!(votes.len(), 5);
    }
}

#[test]
fn a_room_mixing_integer_and_string_ids_agrees() {
    for seed in 0..20 {
        let ids =
            vec![Id::Int(7), Id::Str("3f2b9c1e-aaaa-4bbb-8ccc-000000000001".into()), Id::Int(99), Id::Str("z".into())];
        let sim = run_room(ids, seed, 4);
        // Someone used strings: every vote was a string.
        for node in &sim.nodes {
            assert!(node.counted.iter().all(|(_, v)| !v.is_int()), "{:?}", node.counted);
        }
    }
}

/// Handles `input`, then gives the node back its own votes, as the broker does.
fn echoed(node: &mut LabNode, input: LabInput) -> Vec<LabAction> {
    let mut out = node.handle(input);
    let mine: Vec<LabMsg> = out
        .iter()
        .filter_map(|a| match a {
            LabAction::Publish(m @ LabMsg::Election(_)) => Some(m.clone()),
            _ => None,
        })
        .collect();
    for m in mine {
        out.extend(node.handle(LabInput::Message(m)));
    }
    out
}

/// A course client's Init (no hashvote marker).
fn init(client: Id) -> LabInput {
    msg(LabMsg::Init(InitMsg { client, hashvote: false }))
}

fn vote(client: Id, vote: Id) -> LabInput {
    msg(LabMsg::Election(ElectionMsg { client, vote, hashvote: false }))
}

fn lone_miner_following(controller: Id) -> LabNode {
    let mut node = LabNode::new(LabConfig { me: Id::Int(1), room_size: 2, difficulty: (8, 8), seed: Some(1) });
    node.handle(LabInput::Connected);
    echoed(&mut node, init(controller.clone()));
    node.handle(vote(controller, Id::Int(i64::MAX)));
    node
}

fn msg(m: LabMsg) -> LabInput {
    LabInput::Message(m)
}

#[test]
fn a_challenge_before_the_decision_is_held_and_a_bad_result_is_not_recorded() {
    let mut node = LabNode::new(LabConfig { me: Id::Int(1), room_size: 2, difficulty: (8, 8), seed: Some(1) });
    node.handle(LabInput::Connected);
    // The controller decided first and challenged before its vote reached us.
    assert!(node.handle(msg(LabMsg::Challenge(ChallengeMsg { tx: 0, difficulty: 12, issuer: None }))).is_empty());
    echoed(&mut node, init(Id::Int(2)));
    let out = node.handle(vote(Id::Int(2), Id::Int(i64::MAX)));
    assert!(out.contains(&LabAction::Mine(LabJob { tx: 0, difficulty: 12 })), "{out:?}");
    // A result 1 whose solution lacks the work is dropped, not recorded, and mining goes on.
    let bad = ResultMsg { client: Id::Int(2), tx: 0, solution: "abc".into(), result: 1 };
    let out = node.handle(msg(LabMsg::Result(bad)));
    assert!(
        matches!(&out[..], [LabAction::Emit(Event::MessageDropped { reason, .. })] if reason == "lab_unverified_result")
    );
    assert_eq!(node.table()[&0].winner, None);
    // A verified one is recorded and stops the miner.
    let (solution, _) = search("ok-", 12, &AtomicBool::new(false), &AtomicU64::new(0)).unwrap();
    let out = node.handle(msg(LabMsg::Result(ResultMsg { client: Id::Int(3), tx: 0, solution, result: 1 })));
    assert!(out.contains(&LabAction::StopMining), "{out:?}");
    assert_eq!(node.table()[&0].winner, Some(Id::Int(3)));
}

#[test]
fn conflicting_challenges_votes_and_results_are_dropped_with_reasons() {
    let mut node = lone_miner_following(Id::Int(2));
    assert_eq!(node.controller(), Some(&Id::Int(2)));
    node.handle(msg(LabMsg::Challenge(ChallengeMsg { tx: 0, difficulty: 8, issuer: None })));
    let reason = |out: Vec<LabAction>| match &out[..] {
        [LabAction::Emit(Event::MessageDropped { reason, .. })] => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        reason(node.handle(msg(LabMsg::Challenge(ChallengeMsg { tx: 0, difficulty: 9, issuer: None })))),
        "lab_conflicting_challenge"
    );
    assert_eq!(reason(node.handle(vote(Id::Int(2), Id::Int(5)))), "lab_late_vote");
    assert_eq!(reason(node.handle(vote(Id::Int(9), Id::Int(5)))), "lab_late_vote");
    let unknown = ResultMsg { client: Id::Int(2), tx: 5, solution: "x".into(), result: 1 };
    assert_eq!(reason(node.handle(msg(LabMsg::Result(unknown)))), "lab_unknown_tx");
    let (solution, _) = search("a-", 8, &AtomicBool::new(false), &AtomicU64::new(0)).unwrap();
    let (other, _) = search("b-", 8, &AtomicBool::new(false), &AtomicU64::new(0)).unwrap();
    node.handle(msg(LabMsg::Result(ResultMsg { client: Id::Int(3), tx: 0, solution, result: 1 })));
    let rival = ResultMsg { client: Id::Int(4), tx: 0, solution: other, result: 1 };
    assert_eq!(reason(node.handle(msg(LabMsg::Result(rival)))), "lab_conflicting_result");
}

#[test]
fn the_controller_judges_first_valid_wins_later_and_invalid_get_zero() {
    let mut c = LabNode::new(LabConfig { me: Id::Int(9), room_size: 2, difficulty: (8, 8), seed: Some(3) });
    c.handle(LabInput::Connected);
    echoed(&mut c, init(Id::Int(1)));
    let out = c.handle(vote(Id::Int(1), Id::Int(-1)));
    assert!(c.is_controller());
    let ours = ChallengeMsg { tx: 0, difficulty: 8, issuer: Some(Id::Int(9)) };
    assert!(out.contains(&LabAction::Publish(LabMsg::Challenge(ours))), "{out:?}");
    let solve = |c: &mut LabNode, client: i64, solution: &str| {
        let m = SolutionMsg { client: Id::Int(client), tx: 0, solution: solution.into() };
        c.handle(msg(LabMsg::Solution(m)))
            .into_iter()
            .find_map(|a| match a {
                LabAction::Publish(LabMsg::Result(r)) => Some(r.result),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(solve(&mut c, 1, "abc"), 0);
    let (good, _) = search("g-", 8, &AtomicBool::new(false), &AtomicU64::new(0)).unwrap();
    assert_eq!(solve(&mut c, 1, &good), 1);
    assert_eq!(solve(&mut c, 2, &good), 0, "a late solution");
    assert_eq!(c.table()[&0].winner, Some(Id::Int(1)));
    assert!(c.table().contains_key(&1), "the next challenge");
    // A challenge that names another hashvote peer, which we did not issue, is dropped.
    let out = c.handle(msg(LabMsg::Challenge(ChallengeMsg { tx: 1, difficulty: 30, issuer: Some(Id::Int(1)) })));
    assert!(
        matches!(&out[..], [LabAction::Emit(Event::MessageDropped { reason, .. })] if reason == "lab_not_from_controller")
    );
}

#[test]
fn a_course_client_acting_as_controller_is_followed_whoever_was_elected() {
    // We decided on hashvote peer 2 (its vote says it is one); a course client missed a vote
    // message and controls in its own eyes: its challenge names no issuer.
    let mut node = LabNode::new(LabConfig { me: Id::Int(1), room_size: 2, difficulty: (8, 8), seed: Some(1) });
    node.handle(LabInput::Connected);
    echoed(&mut node, init(Id::Int(2)));
    node.handle(msg(LabMsg::Election(ElectionMsg { client: Id::Int(2), vote: Id::Int(i64::MAX), hashvote: true })));
    assert_eq!(node.controller(), Some(&Id::Int(2)));
    let ours = |tx| msg(LabMsg::Challenge(ChallengeMsg { tx, difficulty: 8, issuer: Some(Id::Int(2)) }));
    let out = node.handle(ours(0));
    assert!(out.contains(&LabAction::Mine(LabJob { tx: 0, difficulty: 8 })), "{out:?}");
    let course = |tx| msg(LabMsg::Challenge(ChallengeMsg { tx, difficulty: 9, issuer: None }));
    let out = node.handle(course(0));
    assert!(out.iter().any(|a| matches!(a, LabAction::Emit(Event::LabYielded { tx: 0, .. }))), "{out:?}");
    assert!(out.contains(&LabAction::Mine(LabJob { tx: 0, difficulty: 9 })), "{out:?}");
    // From now on only the course client's challenges are mined: one from peer 2 would give a
    // solution for a transaction the course client never issued (which kills it).
    let out = node.handle(ours(1));
    assert!(!out.iter().any(|a| matches!(a, LabAction::Mine(_))), "{out:?}");
    let out = node.handle(course(1));
    assert!(out.contains(&LabAction::Mine(LabJob { tx: 1, difficulty: 9 })), "{out:?}");
    // A hashvote controller gives way the same way, and then mines.
    let mut c = LabNode::new(LabConfig { me: Id::Int(9), room_size: 2, difficulty: (8, 8), seed: Some(3) });
    c.handle(LabInput::Connected);
    echoed(&mut c, init(Id::Int(1)));
    c.handle(vote(Id::Int(1), Id::Int(-1)));
    assert!(c.is_controller());
    let out = c.handle(course(0));
    assert!(!c.is_controller());
    assert!(out.contains(&LabAction::Mine(LabJob { tx: 0, difficulty: 9 })), "{out:?}");
}

fn inits(out: &[LabAction]) -> usize {
    out.iter().filter(|a| matches!(a, LabAction::Publish(LabMsg::Init(_)))).count()
}

#[test]
fn an_init_from_a_course_client_is_answered_once_while_the_room_is_incomplete() {
    let mut node = LabNode::new(LabConfig { me: Id::Int(1), room_size: 3, difficulty: (8, 8), seed: Some(1) });
    let out = node.handle(LabInput::Connected);
    let ours = LabAction::Publish(LabMsg::Init(InitMsg { client: Id::Int(1), hashvote: true }));
    assert_eq!(out, vec![ours.clone()]);
    let out = node.handle(init(Id::Str("u".into())));
    assert!(matches!(&out[..], [LabAction::WakeAfter(ms)] if *ms <= ANSWER_SPREAD_MS), "{out:?}");
    assert_eq!(node.handle(LabInput::Wake), vec![ours.clone()]);
    // Its periodic re-announcement (the lab's 10 s timer) does not make us answer again.
    assert!(node.handle(init(Id::Str("u".into()))).is_empty());
    // Another hashvote peer learns of us from our vote, not from an Init.
    let out = echoed(&mut node, msg(LabMsg::Init(InitMsg { client: Id::Int(2), hashvote: true })));
    assert_eq!(inits(&out), 0, "{out:?}");
    // The room is complete (we voted): a course client whose list is full would vote again on
    // any Init, so a fourth client is not answered, and a reconnection announces nothing.
    assert_eq!(inits(&node.handle(init(Id::Str("v".into())))), 0);
    assert_eq!(inits(&node.handle(LabInput::Connected)), 0);
}

#[test]
fn the_election_is_decided_over_the_first_room_size_vote_messages_as_a_course_client_decides_it() {
    // A room of three: us, a course client "c" and a hashvote peer 2.
    let mut node = LabNode::new(LabConfig { me: Id::Int(1), room_size: 3, difficulty: (8, 8), seed: Some(4) });
    node.handle(LabInput::Connected);
    let c = Id::Str("c".into());
    node.handle(init(c.clone()));
    // The course client voted, then voted again (an Init reached it once its list was full).
    // Both count, as the course client counts them; a third message decides.
    node.handle(vote(c.clone(), Id::Str("a".into())));
    node.handle(vote(c.clone(), Id::Str("b".into())));
    assert_eq!(node.controller(), None);
    let out = node.handle(vote(Id::Int(2), Id::Str("0".into())));
    assert_eq!(node.controller(), Some(&c), "{out:?}");
    // Our own vote, which came back after the third message, is not counted.
    assert!(node.counted.iter().all(|(client, _)| *client != Id::Int(1)));
}

#[test]
fn a_course_client_whose_vote_comes_before_our_answer_is_owed_none() {
    let mut node = LabNode::new(LabConfig { me: Id::Int(1), room_size: 4, difficulty: (8, 8), seed: Some(1) });
    node.handle(LabInput::Connected);
    // Its periodic Init, new to us: it may have missed ours, or not.
    assert!(matches!(&node.handle(init(Id::Str("u".into())))[..], [LabAction::WakeAfter(_)]));
    // It votes before our wait is over: its list was full, so it knew us.
    node.handle(vote(Id::Str("u".into()), Id::Str("b".into())));
    assert_eq!(inits(&node.handle(LabInput::Wake)), 0);
    // Two newcomers within one wait get one Init between them.
    let out = node.handle(init(Id::Str("v".into())));
    assert_eq!(out.iter().filter(|a| matches!(a, LabAction::WakeAfter(_))).count(), 1);
    assert!(node.handle(init(Id::Str("w".into()))).iter().all(|a| !matches!(a, LabAction::WakeAfter(_))));
    assert_eq!(inits(&node.handle(LabInput::Wake)), 1);
}
