//! Focused tests of the room node; the simulator (`sim/`) covers faults over many seeds.

use std::collections::VecDeque;

use super::*;
use crate::pow::Template;
use crate::protocol::{Change, RejectReason};
use crate::room::msg::{Channel, Member};

/// A room of nodes with instant, ordered, lossless delivery.
struct Room {
    nodes: Vec<RoomNode>,
    now: u64,
    /// What is to be delivered, and to whom (every node if `None`).
    queue: VecDeque<(Option<PeerId>, Envelope)>,
    actions: Vec<(usize, Action)>,
}

impl Room {
    fn new(n: usize) -> Self {
        Self::with_room_size(n, n, Timing::default())
    }

    /// `n` peers for a room of `room_size` (the peers beyond it do not vote).
    fn with_room_size(n: usize, room_size: usize, timing: Timing) -> Self {
        let nodes = (0..n)
            .map(|i| {
                let id = 100 + i as PeerId;
                let cfg = RoomNodeConfig {
                    id,
                    key: 1000 + u64::from(id),
                    incarnation: 7,
                    since_ms: 0,
                    room_size,
                    pace: Pace::Fixed(2),
                    alg: HashAlg::Sha1,
                    seed: 42 + i as u64,
                    timing,
                };
                RoomNode::new(cfg, Restored::default())
            })
            .collect();
        let mut room = Self { nodes, now: 0, queue: VecDeque::new(), actions: Vec::new() };
        for i in 0..n {
            room.input(i, Input::Connected);
        }
        room
    }

    fn input(&mut self, i: usize, input: Input) {
        let actions = self.nodes[i].handle(self.now, input);
        for a in actions {
            if let Action::Publish(msg) = &a {
                let to = match msg.channel() {
                    Channel::Direct(id) => Some(id),
                    _ => None,
                };
                self.queue.push_back((to, Envelope::new(self.nodes[i].id(), msg.clone())));
            }
            self.actions.push((i, a));
        }
    }

    /// Delivers everything queued (and what it causes), then advances time by `ms` in ticks.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        let mut delivered = 0usize;
        loop {
            while let Some((to, env)) = self.queue.pop_front() {
                delivered += 1;
                assert!(delivered < 100_000, "a message storm: {env:?}");
                // A direct message goes to every process under its id, as the broker does.
                let targets: Vec<usize> =
                    (0..self.nodes.len()).filter(|&t| to.is_none_or(|id| self.nodes[t].id() == id)).collect();
                for t in targets {
                    self.input(t, Input::Message(env.clone()));
                }
            }
            if self.now >= end {
                break;
            }
            self.now += 5;
            for i in 0..self.nodes.len() {
                self.input(i, Input::Tick);
            }
        }
    }

    fn controllers(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_controller()).collect()
    }

    /// Mines the open challenge on node `miner` (difficulty 2: a few tries).
    fn mine(&mut self, miner: usize) {
        self.mine_recorded_as(miner, miner);
    }

    /// Mines the last job given to the node recorded as `recorded` in `actions`, which is now
    /// node `miner` (indices shift when a test removes a node).
    fn mine_recorded_as(&mut self, recorded: usize, miner: usize) {
        let job = self.actions.iter().rev().find_map(|(i, a)| match a {
            Action::Mine(job) if *i == recorded => Some(*job),
            _ => None,
        });
        let job = job.expect("the miner has a job");
        let nonce = job.template.search(u32::from(job.difficulty), 0, 1 << 20).expect("found");
        self.input(miner, Input::Mined(Found { tx: job.tx, nonce, hashes: 1, elapsed_ms: 1 }));
    }
}

/// Long enough for a new room to listen for an existing one, then elect.
const FOUNDED_MS: u64 = 350;

#[test]
fn a_room_of_three_elects_the_highest_ballot_and_commits_a_block_with_a_quorum() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let ctl = room.controllers();
    assert_eq!(ctl.len(), 1, "one controller");
    let ctl = ctl[0];
    // The lab's rule: the highest (ballot, id) of the term won.
    let best = room
        .actions
        .iter()
        .filter_map(|(i, a)| match a {
            Action::Emit(Event::VoteCast { vote, .. }) => Some((*vote, room.nodes[*i].id(), *i)),
            _ => None,
        })
        .max()
        .map(|(_, _, i)| i);
    assert_eq!(best, Some(ctl));
    assert!(room.nodes.iter().all(|n| n.controller() == Some(room.nodes[ctl].id())));
    let miner = (ctl + 1) % 3;
    room.mine(miner);
    room.run(10);
    assert!(room.nodes.iter().all(|n| n.commit() == 1), "block 0 committed everywhere");
    assert_eq!(room.nodes[0].config().map(RoomConfig::len), Some(3));
    assert_eq!(room.nodes[1].config(), room.nodes[2].config());
}

#[test]
fn a_new_room_listens_for_an_existing_one_before_it_elects() {
    let mut room = Room::new(3);
    room.run(Timing::default().discovery_ms - 5);
    assert!(
        !room.actions.iter().any(|(_, a)| matches!(a, Action::Publish(Msg::PreBallot { .. }))),
        "no pre-vote while listening"
    );
    room.run(50);
    assert_eq!(room.controllers().len(), 1, "elected once the listening is over");
}

#[test]
fn a_vote_is_persisted_before_it_is_sent() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    for (i, (node, action)) in room.actions.iter().enumerate() {
        if let Action::Publish(Msg::Grant { term, to, .. }) = action {
            let persisted = room.actions[..i].iter().rev().any(|(n, a)| {
                n == node
                    && matches!(a, Action::Persist(Write::Vote { term: t, voted_for: Some(v) }) if t == term && v == to)
            });
            assert!(persisted, "grant of node {node} to {to} in term {term} went out before its vote was written");
        }
    }
}

#[test]
fn a_controller_without_a_quorum_commits_nothing_and_steps_down() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let ctl = room.controllers()[0];
    // Cut the controller off: nothing reaches the others, nothing comes back.
    let others: Vec<usize> = (0..3).filter(|&i| i != ctl).collect();
    let mut lone = Room { nodes: vec![], now: room.now, queue: VecDeque::new(), actions: vec![] };
    std::mem::swap(&mut lone.nodes, &mut room.nodes);
    let mut nodes = std::mem::take(&mut lone.nodes);
    let controller = nodes.remove(ctl);
    lone.nodes = vec![controller];
    lone.run(2_000);
    assert!(!lone.nodes[0].is_controller(), "stepped down without a quorum");
    assert_eq!(lone.nodes[0].commit(), 0);
    let _ = others;
    // The other two elect a new controller of a later term.
    let mut rest = Room { nodes, now: lone.now, queue: VecDeque::new(), actions: vec![] };
    rest.run(2_000);
    assert_eq!(rest.controllers().len(), 1);
    assert!(rest.nodes[0].term() > lone.nodes[0].term() || rest.nodes[0].term() >= 2);
}

/// Found on real processes: a miner that saw its controller's will (and another member's) kept
/// the dead controller's name, and so never said it waited for a quorum.
#[test]
fn a_survivor_of_its_controllers_will_says_it_waits_for_a_quorum() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let ctl = room.controllers()[0];
    let survivor = (ctl + 1) % 3;
    room.mine(survivor);
    room.run(10);
    assert!(room.nodes.iter().all(|n| n.commit() == 1), "block 0 committed: the configuration is fixed");
    let gone: Vec<PeerId> = (0..3).filter(|&i| i != survivor).map(|i| room.nodes[i].id()).collect();
    let mut lone =
        Room { nodes: vec![room.nodes.remove(survivor)], now: room.now, queue: VecDeque::new(), actions: vec![] };
    for id in gone {
        lone.input(0, Input::Message(Envelope::new(id, Msg::Leave { incarnation: 7 })));
    }
    lone.run(1_000);
    let said = lone
        .actions
        .iter()
        .any(|(_, a)| matches!(a, Action::Emit(Event::QuorumWaiting { reachable: 1, needed: 2, voters: 3 })));
    assert!(
        said,
        "the event: {:?}",
        lone.actions.iter().filter(|(_, a)| matches!(a, Action::Emit(_))).collect::<Vec<_>>()
    );
    let waiting = lone.nodes[0].status(0).waiting;
    assert_eq!(waiting, Some(crate::status::Waiting { reachable: 1, needed: 2, voters: 3 }), "the status");
}

/// Found by the simulator (2 seeds in a million): a voter behind the others that drew the
/// highest ballot granted itself, which the others could not, and where the quorum needed every
/// live voter the room split term after term. Voters now grant the most up-to-date candidate.
#[test]
fn a_voter_behind_the_others_grants_the_most_up_to_date_candidate() {
    for terms in 0..8 {
        let mut room = Room::new(3);
        room.run(FOUNDED_MS);
        let ctl = room.controllers()[0];
        let (behind, ahead) = ((ctl + 1) % 3, (ctl + 2) % 3);
        room.mine(behind);
        room.run(10);
        // Block 1 reaches the controller and `ahead` only (`ahead` mines the job it was given
        // before `behind` left: node indices shift by the removal).
        let b = room.nodes.remove(behind);
        let ctl_i = if ctl < behind { ctl } else { ctl - 1 };
        let ahead_i = if ahead < behind { ahead } else { ahead - 1 };
        room.mine_recorded_as(ahead, ahead_i);
        room.run(10);
        assert_eq!(room.nodes[ahead_i].commit(), 2);
        let dead = room.nodes.remove(ctl_i).id();
        let a = room.nodes.remove(0);
        let (b_id, a_id) = (b.id(), a.id());
        let mut pair = Room { nodes: vec![b, a], now: room.now, queue: VecDeque::new(), actions: vec![] };
        for i in 0..2 {
            pair.input(i, Input::Message(Envelope::new(dead, Msg::Leave { incarnation: 7 })));
        }
        // A few elections, each with fresh ballots.
        pair.run(300 + 200 * terms);
        for (i, a) in &pair.actions {
            if let Action::Emit(Event::VoteGranted { term, to }) = a {
                assert_eq!(
                    *to,
                    a_id,
                    "node {} granted {to} in term {term}, not the up-to-date {a_id}",
                    pair.nodes[*i].id()
                );
            }
        }
        assert_eq!(pair.controllers(), vec![1], "{b_id} behind, {a_id} elected");
    }
}

/// Found with 100 real peers on 2 cores (100 terms in 15 s): a peer answered every stale
/// pre-ballot with a pre-vote for the next term, so terms went by faster than their ballots could
/// go round. A term's election now gets its election timeout before a voter helps start the next.
/// What `node` does with `input` at `t`, its own broadcasts coming back at once, as a broker
/// that lags not at all echoes them (a broadcast still out stretches the node's timers).
fn handle_echoed(node: &mut RoomNode, t: u64, input: Input) -> Vec<Action> {
    let mut actions = node.handle(t, input);
    let own: Vec<Msg> =
        publishes(&actions).into_iter().filter(|m| !matches!(m.channel(), Channel::Direct(_))).cloned().collect();
    for msg in own {
        actions.extend(node.handle(t, Input::Message(Envelope::new(node.id(), msg))));
    }
    actions
}

#[test]
fn a_young_term_is_not_left_for_the_next_before_its_election_timeout() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let ctl = room.controllers()[0];
    let (a, b) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (b_id, b_key) = (room.nodes[b].id(), room.nodes[b].key());
    let term = room.nodes[a].term() + 1;
    let pos = room.nodes[a].pos();
    let mut t = room.now;
    let node = &mut room.nodes[a];
    // `b` moved to a new term (its ballot says so): `a` follows, with no controller in it.
    handle_echoed(
        node,
        t,
        Input::Message(Envelope::new(b_id, Msg::Ballot { term, ballot: 1, key: b_key, pos, proposal: None })),
    );
    assert_eq!(node.term(), term);
    let pre_votes = |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::Publish(Msg::PreBallot { .. })));
    // A stale pre-ballot, then ticks, within the election timeout: no pre-vote for term + 1.
    t += 10;
    let stale = Msg::PreBallot { to: None, term, key: b_key, pos };
    assert!(!pre_votes(&handle_echoed(node, t, Input::Message(Envelope::new(b_id, stale.clone())))));
    let next = Msg::PreBallot { to: None, term: term + 1, key: b_key, pos };
    assert!(!pre_votes(&handle_echoed(node, t, Input::Message(Envelope::new(b_id, next.clone())))), "joined too early");
    assert_eq!(node.term(), term);
    // Past its election timeout it joins the next term's pre-vote.
    t += Timing::default().election_max_ms * 2;
    assert!(pre_votes(&handle_echoed(node, t, Input::Message(Envelope::new(b_id, next)))));
}

#[test]
fn a_restarted_voter_keeps_its_vote() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let node = &room.nodes[1];
    let (term, vote) = (node.term(), node.voted_for());
    assert!(vote.is_some());
    let restored = Restored {
        term,
        voted_for: vote,
        config: node.config().cloned(),
        blocks: node.chain().blocks().to_vec(),
        commit: node.commit(),
    };
    let cfg = node.cfg.clone();
    let mut again = RoomNode::new(cfg, restored);
    assert_eq!((again.term(), again.voted_for()), (term, vote));
    // A ballot of that term from a higher ballot cannot get a second grant.
    let other = room.nodes[2].id();
    let key = room.nodes[2].key();
    let ballot = Msg::Ballot { term, ballot: u32::MAX, key, pos: Pos::default(), proposal: None };
    let actions = again.handle(100, Input::Message(Envelope::new(other, ballot)));
    assert!(!actions.iter().any(|a| matches!(a, Action::Publish(Msg::Grant { .. }))));
}

/// A room of three, founded, with `blocks` committed.
fn founded_with_blocks(blocks: usize) -> Room {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    mine_blocks(&mut room, blocks);
    room
}

/// Mines `blocks` blocks in `room`, each by a node that is not the controller.
fn mine_blocks(room: &mut Room, blocks: usize) {
    for _ in 0..blocks {
        let ctl = room.controllers()[0];
        room.mine((ctl + 1) % 3);
        room.run(0);
    }
}

#[test]
fn a_peer_whose_last_block_lost_syncs_past_more_than_one_reply_of_agreeing_blocks() {
    let mut room = founded_with_blocks(MAX_SYNC_BLOCKS + 40);
    let ctl = room.controllers()[0];
    let (config, term) = (room.nodes[ctl].config().cloned(), room.nodes[ctl].term());
    // A peer that held the room's first blocks and, last, a block of its own at the height of
    // the room's last block (accepted by a controller deposed before it was committed).
    let mut blocks = room.nodes[ctl].chain().blocks().to_vec();
    let theirs = blocks.pop().expect("blocks");
    let template = Template::new(&theirs.prev, theirs.tx, 999);
    let nonce = template.search(u32::from(theirs.difficulty), 0, 1 << 20).expect("found");
    let stale = Block { miner: 999, nonce, hash: template.digest(nonce), ..theirs };
    blocks.push(stale);
    // Meanwhile the room went on.
    mine_blocks(&mut room, 5);
    let cfg = RoomNodeConfig { id: 200, key: 1200, seed: 9, ..room.nodes[0].cfg.clone() };
    let restored = Restored { term, voted_for: None, config, blocks, commit: 0 };
    room.nodes.push(RoomNode::new(cfg, restored));
    room.input(3, Input::Connected);
    room.run(3_000);
    let (ours, room_chain) = (room.nodes[3].chain().blocks(), room.nodes[ctl].chain().blocks());
    assert_eq!(ours.len(), room_chain.len(), "the peer caught up");
    assert_eq!(ours.last().map(|b| b.hash), room_chain.last().map(|b| b.hash));
}

#[test]
fn a_peer_counted_gone_that_speaks_again_is_seen_to_join_again() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let (gone, id) = (2, room.nodes[2].id());
    let leave = Envelope::new(id, room.nodes[gone].farewell());
    let left = room.nodes[0].handle(room.now, Input::Message(leave));
    assert!(left.iter().any(|a| matches!(a, Action::Emit(Event::PeerLeft { id: x, members: 2 }) if *x == id)));
    // Its link comes back: it says hello again.
    room.actions.clear();
    room.input(gone, Input::Connected);
    room.run(0);
    let joined = room
        .actions
        .iter()
        .any(|(i, a)| *i == 0 && matches!(a, Action::Emit(Event::PeerJoined { id: x, members: 3 }) if *x == id));
    assert!(joined, "node 0 saw it join again");
}

/// A peer waiting on a sync reply from a peer that died (its last controller, killed during a
/// broker outage) resent its request to that peer every `sync_retry_ms`, always just before the
/// new controller's heartbeat could ask that controller instead (the owner runs an overdue timer
/// before a queued message): it never caught up, and a room that needed its acknowledgements
/// changed term every second for good (a 500-cycle chaos run).
#[test]
fn a_sync_request_to_a_dead_peer_does_not_starve_the_one_to_the_controller() {
    let cfg = RoomNodeConfig {
        id: 200,
        key: 1200,
        incarnation: 7,
        since_ms: 0,
        room_size: 3,
        pace: Pace::Fixed(2),
        alg: HashAlg::Sha1,
        seed: 5,
        timing: Timing::default(),
    };
    let mut node = RoomNode::new(cfg, Restored::default());
    let mut sent_to = Vec::new();
    let record = |sent_to: &mut Vec<PeerId>, actions: Vec<Action>| {
        for a in actions {
            if let Action::Publish(Msg::SyncRequest { to, .. }) = a {
                sent_to.push(to);
            }
        }
    };
    record(&mut sent_to, node.handle(0, Input::Connected));
    let dead = 999;
    let hello = Msg::Hello {
        to: None,
        want_reply: false,
        key: 9,
        incarnation: 1,
        since_ms: 0,
        term: 0,
        controller: None,
        height: 10,
        peers: Vec::new(),
    };
    record(&mut sent_to, node.handle(1, Input::Message(Envelope::new(dead, hello))));
    assert_eq!(sent_to, vec![dead]);
    let controller = 100;
    let tip = Digest::zero(HashAlg::Sha1);
    for t in 2..3_000u64 {
        if t >= node.next_timer() {
            record(&mut sent_to, node.handle(t, Input::Tick));
        }
        if t % 100 == 1 {
            let beat = Msg::Heartbeat { term: 1, key: 0, height: 10, commit: 10, tip, open: None };
            record(&mut sent_to, node.handle(t, Input::Message(Envelope::new(controller, beat))));
        }
    }
    assert!(sent_to.contains(&controller), "asked the controller at last: {sent_to:?}");
}

/// A result in the controller's name whose block does not verify (anyone can publish one) must
/// never make a follower drop a block: it is checked before anything is truncated. A flood of
/// such forgeries made followers try to drop committed blocks (refused, but reported), and would
/// have dropped uncommitted ones.
#[test]
fn a_forged_result_that_does_not_verify_drops_no_block() {
    let mut room = founded_with_blocks(3);
    let ctl = room.controllers()[0];
    let follower = (ctl + 1) % 3;
    let (term, ctl_id) = (room.nodes[ctl].term(), room.nodes[ctl].id());
    let theirs = *room.nodes[follower].chain().blocks().last().expect("blocks");
    // Same height and link as the follower's last block, but a made-up hash.
    let forged = Block { nonce: theirs.nonce ^ 1, hash: Digest::Sha1([7; 20]), ..theirs };
    let result = Msg::Result { term, outcome: Outcome::Accepted(forged), commit: 0 };
    let actions = room.nodes[follower].handle(room.now, Input::Message(Envelope::new(ctl_id, result)));
    let dropped = actions.iter().any(|a| {
        matches!(a, Action::Emit(Event::ChainTruncated { .. } | Event::CommittedConflict { .. }))
            || matches!(a, Action::Persist(Write::Truncate(_)))
    });
    assert!(!dropped, "{actions:?}");
    assert_eq!(room.nodes[follower].chain().blocks().last(), Some(&theirs));
}

#[test]
fn a_controller_message_from_outside_the_configuration_is_not_followed_nor_moves_the_term() {
    let mut room = founded_with_blocks(2);
    let ctl = room.controllers()[0];
    let follower = (ctl + 1) % 3;
    let term = room.nodes[follower].term();
    let stranger: PeerId = 999;
    // A newer term, and the current one once the follower has lost its controller: both would
    // name the stranger as controller if it were followed.
    for t in [term + 1, term] {
        let beat = Msg::Heartbeat { term: t, key: 0, height: 9, commit: 9, tip: Digest::Sha1([7; 20]), open: None };
        let actions = room.nodes[follower].handle(room.now, Input::Message(Envelope::new(stranger, beat)));
        let named = actions
            .iter()
            .any(|a| matches!(a, Action::Emit(Event::ControllerElected { controller, .. }) if *controller == stranger));
        let dropped = actions
            .iter()
            .any(|a| matches!(a, Action::Emit(Event::MessageDropped { reason, .. }) if reason == "not_member"));
        assert!(!named && dropped, "{actions:?}");
        assert_eq!(room.nodes[follower].term(), term);
        room.nodes[follower].controller = None;
    }
}

fn publishes(actions: &[Action]) -> Vec<&Msg> {
    actions.iter().filter_map(|a| if let Action::Publish(m) = a { Some(m) } else { None }).collect()
}

#[test]
fn a_repeated_hello_is_answered_only_by_a_peer_that_knows_more_than_the_asker() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (a, b) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (term, height) = (room.nodes[b].term(), room.nodes[b].chain().height());
    let asker = room.nodes[b].id();
    let hello = |term, height| Msg::Hello {
        to: None,
        want_reply: true,
        key: 1000 + u64::from(asker),
        incarnation: 7,
        since_ms: 0,
        term,
        controller: None,
        height,
        peers: Vec::new(),
    };
    let answers = |room: &mut Room, i: usize, msg: Msg| {
        let actions = room.nodes[i].handle(room.now, Input::Message(Envelope::new(asker, msg)));
        publishes(&actions).iter().filter(|m| matches!(m, Msg::Hello { to: Some(t), .. } if *t == asker)).count()
    };
    // A known peer as far as we are: its periodic hello gets no answer (in a room of 300
    // gathering, each would get 299).
    assert_eq!(answers(&mut room, a, hello(term, height)), 0);
    // We know more than it says: answer.
    assert_eq!(answers(&mut room, a, hello(term, 0)), 1);
    // The controller always answers.
    assert_eq!(answers(&mut room, ctl, hello(term, height)), 1);
    // Its will came (its connection dropped), then the same process says hello again: it still
    // knows the room, so no answer either (in a room of 300 whose clients reconnected by the
    // thousand, 299 answers to each fed the broker's queue).
    let will = Msg::Leave { incarnation: 7 };
    room.nodes[a].handle(room.now, Input::Message(Envelope::new(asker, will)));
    assert_eq!(answers(&mut room, a, hello(term, height)), 0);
    // A new process under its id (a restart: another incarnation) knows nothing: answer.
    let restarted = match hello(term, height) {
        Msg::Hello { to, want_reply, key, since_ms, term, controller, height, .. } => {
            Msg::Hello { to, want_reply, key, incarnation: 8, since_ms, term, controller, height, peers: Vec::new() }
        }
        _ => unreachable!(),
    };
    assert_eq!(answers(&mut room, a, restarted), 1);
}

#[test]
fn an_acknowledgement_that_says_nothing_new_is_not_repeated_within_the_quiet_time() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let f = (ctl + 1) % 3;
    let (term, ctl_id) = (room.nodes[ctl].term(), room.nodes[ctl].id());
    let (height, commit) = (room.nodes[ctl].chain().height(), room.nodes[ctl].commit());
    let tip = room.nodes[ctl].chain().tip_hash(HashAlg::Sha1);
    let beat = Msg::Heartbeat { term, key: 0, height, commit, tip, open: None };
    let acks = |room: &mut Room, at: u64| {
        let actions = room.nodes[f].handle(at, Input::Message(Envelope::new(ctl_id, beat.clone())));
        publishes(&actions).iter().filter(|m| matches!(m, Msg::Ack { .. })).count()
    };
    let quiet = room.nodes[f].cfg.timing.ack_quiet_ms();
    let now = room.now + quiet;
    assert_eq!(acks(&mut room, now), 1);
    assert_eq!(acks(&mut room, now + 50), 0, "nothing new within the quiet time");
    assert_eq!(acks(&mut room, now + quiet), 1, "still here, after it");
}

#[test]
fn a_large_rooms_heartbeat_election_timeout_and_lag_cap_stretch_with_its_size() {
    assert_eq!(Timing::for_room(3), Timing::default());
    assert_eq!(Timing::for_room(ROOM_AT_DEFAULT_TIMING), Timing::default());
    let (d, t) = (Timing::default(), Timing::for_room(300));
    assert_eq!((t.heartbeat_ms, t.election_min_ms, t.election_max_ms), (300, 1_200, 2_400));
    // A broker delivering a room's broadcasts to N peers may lag N / 100 times as long.
    assert_eq!((t.max_lag_ms, t.lag_half_life_ms()), (30_000, 15_000));
    assert_eq!((d.max_lag_ms, d.lag_half_life_ms()), (10_000, 5_000));
    assert_eq!(
        Timing { heartbeat_ms: 100, election_min_ms: 400, election_max_ms: 800, max_lag_ms: 10_000, ..t },
        d,
        "the others stay"
    );
    assert_eq!(t.ack_quiet_ms(), 600, "a follower's acknowledgements slow down with the heartbeats");
    // Heartbeat deliveries a second, at most a thousand at any size.
    for n in [10, 100, 300, 1_000, crate::room::MAX_ROOM] {
        assert!(n as u64 * 1_000 / Timing::for_room(n).heartbeat_ms <= 1_000, "{n}");
    }
}

#[test]
fn a_rejection_goes_to_its_miner_only() {
    let outcome = Outcome::Rejected { tx: 3, miner: 42, nonce: 1, reason: RejectReason::AlreadySolved };
    assert_eq!(Msg::Result { term: 1, outcome, commit: 3 }.channel(), Channel::Direct(42));
}

#[test]
fn a_voter_that_learns_of_a_newer_term_from_a_pre_ballot_joins_that_pre_vote_at_once() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (f, g) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let term = room.nodes[f].term();
    let (g_id, g_key, pos) = (room.nodes[g].id(), room.nodes[g].key(), room.nodes[g].pos());
    // Long after the controller fell silent, g (which reached term + 1 without f) pre-votes.
    let later = room.now + 10_000;
    let pre = Msg::PreBallot { to: None, term: term + 2, key: g_key, pos };
    let actions = room.nodes[f].handle(later, Input::Message(Envelope::new(g_id, pre)));
    // It entered term + 1, joined the pre-vote, and with g's pre-ballot, a quorum: term + 2.
    assert_eq!(room.nodes[f].term(), term + 2);
    let joined =
        publishes(&actions).iter().any(|m| matches!(m, Msg::PreBallot { to: None, term: t, .. } if *t == term + 2));
    assert!(joined, "the election of term {} happened without it: nothing to be patient for; {actions:?}", term + 1);
}

#[test]
fn after_slow_elections_a_controller_waits_as_long_for_its_quorum_and_the_wait_comes_down() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    // As after two terms in a row without a controller (a room whose ballots go round slowly).
    room.nodes[ctl].backoff = 2;
    room.nodes[ctl].backoff_since = room.now;
    let t = Timing::default();
    // Its followers fall silent: it keeps its role for 4 × the usual window, then steps down.
    let start = room.now;
    let stepped_down = |room: &mut Room, at: u64| {
        let actions = room.nodes[ctl].handle(at, Input::Tick);
        actions.iter().any(|a| matches!(a, Action::Emit(Event::QuorumLost { .. })))
    };
    assert!(!stepped_down(&mut room, start + t.election_max_ms * 2));
    assert!(room.nodes[ctl].is_controller());
    assert!(stepped_down(&mut room, start + (t.election_max_ms << 2) + 2 * t.heartbeat_ms));

    // Under a live controller the backoff comes down a step per BACKOFF_DECAY_MS.
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    for n in &mut room.nodes {
        n.backoff = 2;
        n.backoff_since = room.now;
    }
    mine_blocks(&mut room, 1);
    room.run(BACKOFF_DECAY_MS + 200);
    assert!(
        room.nodes.iter().all(|n| n.backoff == 1),
        "{:?}",
        room.nodes.iter().map(|n| n.backoff).collect::<Vec<_>>()
    );
    room.run(BACKOFF_DECAY_MS);
    assert!(room.nodes.iter().all(|n| n.backoff == 0));
}

/// A member that lost its chain (so knows no configuration) but kept the vote it granted in
/// the room's current term, as its disk has it: it is its own node, outside `room`'s delivery.
fn member_without_chain(room: &Room, i: usize) -> RoomNode {
    let node = &room.nodes[i];
    let restored = Restored { term: node.term(), voted_for: node.voted_for(), ..Restored::default() };
    let mut again = RoomNode::new(node.cfg.clone(), restored);
    again.handle(room.now, Input::Connected);
    again
}

/// What a peer that knows no configuration does with a controller message at `now`.
fn hear(node: &mut RoomNode, now: u64, from: PeerId, term: Term) -> Vec<Action> {
    let beat = Msg::Heartbeat { term, key: 0, height: 9, commit: 9, tip: Digest::Sha1([7; 20]), open: None };
    node.handle(now, Input::Message(Envelope::new(from, beat)))
}

#[test]
fn a_term_heard_from_a_possible_forger_deposes_no_controller_and_keeps_the_vote_promised() {
    let room = founded_with_blocks(1);
    let ctl = room.nodes[room.controllers()[0]].id();
    let follower = (room.controllers()[0] + 1) % 3;
    let term = room.nodes[follower].term();
    let mut node = member_without_chain(&room, follower);
    assert_eq!(node.voted_for(), Some(ctl));
    // Without the configuration, an outsider's newer term cannot be told from the room's.
    let stranger: PeerId = 999;
    hear(&mut node, room.now, stranger, term + 1);
    assert_eq!((node.term(), node.controller()), (term + 1, Some(stranger)));
    // The room's controller speaks: a peer whose term is hearsay does not tell it to step down
    // (it used to, with an acknowledgement of the forged term, and the room re-elected).
    let actions = hear(&mut node, room.now + 1, ctl, term);
    assert!(!publishes(&actions).iter().any(|m| matches!(m, Msg::Ack { .. })), "{actions:?}");
    // Once the stranger is silent past its lease, the peer goes back to the room's term (in
    // which its disk holds a vote: it keeps it) and follows its controller.
    let later = room.now + 10 * Timing::default().election_max_ms;
    hear(&mut node, later, ctl, term);
    assert_eq!((node.term(), node.controller(), node.voted_for()), (term, Some(ctl), Some(ctl)));
}

/// A node alone (its messages go nowhere), for a room of `room_size`, connected at 0.
fn lone(room_size: usize) -> RoomNode {
    let cfg = RoomNodeConfig {
        id: 100,
        key: 1100,
        incarnation: 7,
        since_ms: 0,
        room_size,
        pace: Pace::Fixed(2),
        alg: HashAlg::Sha1,
        seed: 42,
        timing: Timing::default(),
    };
    let mut node = RoomNode::new(cfg, Restored::default());
    node.handle(0, Input::Connected);
    node
}

fn hello_from(id: PeerId) -> Input {
    let hello = Msg::Hello {
        to: None,
        want_reply: true,
        key: 1000 + u64::from(id),
        incarnation: 7,
        since_ms: 0,
        term: 0,
        controller: None,
        height: 0,
        peers: Vec::new(),
    };
    Input::Message(Envelope::new(id, hello))
}

fn pre_ballots(actions: &[Action]) -> Vec<Option<PeerId>> {
    publishes(actions).iter().filter_map(|m| if let Msg::PreBallot { to, .. } = m { Some(*to) } else { None }).collect()
}

fn ballots(actions: &[Action]) -> usize {
    publishes(actions).iter().filter(|m| matches!(m, Msg::Ballot { .. })).count()
}

#[test]
fn a_room_gathering_casts_one_ballot_not_one_per_hello() {
    let mut node = lone(3);
    // Our hello (on connecting) comes back at once: the broker does not lag.
    node.handle(1, Input::Message(Envelope::new(100, node.hello(None, true))));
    let mut t = Timing::default().discovery_ms + 1;
    // The room is complete: founding, it enters term 1 at once (no pre-vote: there is no
    // controller to disrupt), with one ballot.
    handle_echoed(&mut node, t, hello_from(101));
    let actions = handle_echoed(&mut node, t, hello_from(102));
    assert_eq!((ballots(&actions), pre_ballots(&actions).len(), node.term()), (1, 0, 1));
    // More peers keep coming (a room of 300 gathering): each hello used to send a pre-ballot
    // again, to everyone, and the broker's queue grew faster than it drained.
    let mut again = 0;
    for id in 103..120 {
        t += 10;
        let actions = handle_echoed(&mut node, t, hello_from(id));
        again += ballots(&actions) + pre_ballots(&actions).len();
    }
    assert_eq!(again, 0);
    // After an election timeout without a quorum's answer, the next term's pre-vote starts.
    t += 2 * Timing::default().election_max_ms;
    assert_eq!(pre_ballots(&handle_echoed(&mut node, t, Input::Tick)), vec![None]);
}

#[test]
fn a_pre_ballot_of_an_older_term_is_answered_to_its_sender_alone() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (a, b) = ((ctl + 1) % 3, (ctl + 2) % 3);
    // The controller is gone, and `a` is past its patience.
    room.nodes.remove(ctl);
    let (a, b) = (if a > ctl { a - 1 } else { a }, if b > ctl { b - 1 } else { b });
    let now = room.now + 10 * Timing::default().election_max_ms;
    let (b_id, b_key, pos) = (room.nodes[b].id(), room.nodes[b].key(), room.nodes[b].pos());
    let term = room.nodes[a].term();
    let behind = Msg::PreBallot { to: None, term, key: b_key, pos };
    let actions = room.nodes[a].handle(now, Input::Message(Envelope::new(b_id, behind)));
    assert_eq!(pre_ballots(&actions), vec![Some(b_id)], "{actions:?}");
    let answer = publishes(&actions).into_iter().find(|m| matches!(m, Msg::PreBallot { .. })).unwrap().clone();
    assert_eq!(answer.channel(), Channel::Direct(b_id));
}

#[test]
fn a_broker_that_lags_stretches_the_election_timers_by_as_much() {
    let mut node = lone(3);
    // Our hello (on connecting) comes back at once.
    node.handle(1, Input::Message(Envelope::new(100, node.hello(None, true))));
    assert_eq!(node.lag_ms, 1);
    let t = Timing::default().discovery_ms + 1;
    node.handle(t, hello_from(101));
    let actions = node.handle(t, hello_from(102));
    let sent = publishes(&actions).into_iter().find(|m| matches!(m, Msg::Ballot { .. })).unwrap().clone();
    // Our ballot comes back through the broker 3 s later: its queue is that long.
    let lag = 3_000;
    let back = t + lag;
    node.handle(back, Input::Message(Envelope::new(100, sent)));
    assert_eq!(node.lag_ms, lag);
    node.reset_election_timer();
    assert!(node.election_deadline >= back + Timing::default().election_min_ms + 2 * lag, "{}", node.election_deadline);
    // The lag measured comes down as the echoes come back faster.
    node.echo = Some((node.hello(None, true), back));
    node.handle(back + 10, Input::Message(Envelope::new(100, node.hello(None, true))));
    assert!(node.lag_ms < lag, "{}", node.lag_ms);
}

#[test]
fn a_restarted_peer_is_in_the_term_of_its_last_block_at_least() {
    let room = founded_with_blocks(2);
    let node = &room.nodes[(room.controllers()[0] + 1) % 3];
    let newer = node.chain().tip().unwrap().term;
    // Its disk holds blocks of a term later than its last vote (here: no vote at all, as a peer
    // that took the blocks of a term it did not vote in).
    let restored = Restored {
        term: newer - 1,
        voted_for: Some(999),
        config: node.config().cloned(),
        blocks: node.chain().blocks().to_vec(),
        commit: node.commit(),
    };
    let again = RoomNode::new(node.cfg.clone(), restored);
    // Back in the older term it would follow that term's deposed controller; it is not.
    assert_eq!((again.term(), again.voted_for()), (newer, None));
}

#[test]
fn a_controller_that_stood_down_is_not_controller_of_that_term_again() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let term = room.nodes[ctl].term();
    let now = room.now;
    // Cut off: no acknowledgement for longer than the quorum check's window.
    let later = now + 10 * Timing::default().election_max_ms;
    room.nodes[ctl].handle(later, Input::Tick);
    assert!(!room.nodes[ctl].is_controller());
    // A voter of that term, restarted, sends its grant again: the old quorum must not come back.
    let voter = (ctl + 1) % 3;
    let (id, key) = (room.nodes[voter].id(), room.nodes[voter].key());
    let (to, to_key) = (room.nodes[ctl].id(), room.nodes[ctl].key());
    let grant = Msg::Grant { to, to_key, term, key };
    room.nodes[ctl].handle(later + 1, Input::Message(Envelope::new(id, grant)));
    assert!(!room.nodes[ctl].is_controller());
}

#[test]
fn a_broadcast_sent_again_gives_no_sample_of_the_lag() {
    let mut node = lone(3);
    node.handle(1, Input::Message(Envelope::new(100, node.hello(None, true))));
    assert_eq!(node.lag_ms, 1);
    let pre = Msg::PreBallot { to: None, term: 1, key: node.cfg.key, pos: node.pos() };
    node.echo = Some((pre.clone(), 1_000));
    // The first copy is lost (QoS 0); the same message goes out again 700 ms later and comes
    // back at once. Timed from the first copy, it would say the broker lags 700 ms.
    node.now = 1_700;
    node.publish(pre.clone());
    node.handle(1_702, Input::Message(Envelope::new(100, pre)));
    assert_eq!(node.lag_ms, 1);
}

#[test]
fn a_voter_after_terms_without_a_controller_grants_after_the_ballot_wait_alone() {
    let mut node = lone(3);
    // Another voter's backoff may be lower: its election timeout must not fall before our grant.
    node.backoff = MAX_BACKOFF;
    node.now = 5_000;
    node.enter_term(node.term() + 1);
    assert_eq!(node.grant_deadline, Some(5_000 + Timing::default().ballot_wait_ms + 2 * node.lag()));
}

#[test]
fn a_term_heard_before_the_configuration_is_left_once_it_is_known() {
    let room = founded_with_blocks(1);
    let ctl = room.nodes[room.controllers()[0]].id();
    let follower = (room.controllers()[0] + 1) % 3;
    let term = room.nodes[follower].term();
    let mut node = member_without_chain(&room, follower);
    hear(&mut node, room.now, 999, term + 1);
    assert_eq!(node.term(), term + 1);
    // The chain's first block brings the configuration: 999 is no member, and the term it
    // brought may be forged. Kept, it would make the peer drop the room's controller as stale.
    let config = room.nodes[follower].config().cloned().unwrap();
    node.take_config(config, HashAlg::Sha1);
    assert_eq!((node.term(), node.voted_for(), node.controller()), (term, Some(ctl), None));
    hear(&mut node, room.now + 1, ctl, term);
    assert_eq!(node.controller(), Some(ctl));
}

fn changes(node: &RoomNode) -> Vec<Change> {
    node.chain().blocks().iter().filter_map(|b| b.change).collect()
}

#[test]
fn a_member_silent_past_the_replacement_time_is_replaced_by_a_live_non_voter_one_change_at_a_time() {
    let timing = Timing { replace_after_ms: 2_000, ..Timing::default() };
    let mut room = Room::with_room_size(4, 3, timing);
    room.run(FOUNDED_MS);
    let ctl = room.controllers()[0];
    let spare = 3;
    assert!(!room.nodes[spare].is_voter(), "the fourth peer does not vote");
    let miner = (0..3).find(|&i| i != ctl).unwrap();
    room.mine(miner);
    room.run(10);
    // A voter dies with its will lost: nothing more comes from it. (Its index is the last voter
    // that is neither the controller nor the miner; the spare keeps index 2 once it is removed.)
    let dead = (0..3).find(|&i| i != ctl && i != miner).unwrap();
    let dead_member = Member { id: room.nodes[dead].id(), key: room.nodes[dead].key() };
    let ctl_id = room.nodes[ctl].id();
    room.nodes.remove(dead);
    let ctl = room.nodes.iter().position(|n| n.id() == ctl_id).unwrap();
    let spare = room.nodes.len() - 1;
    let (spare_id, spare_key) = (room.nodes[spare].id(), room.nodes[spare].key());
    // Before the replacement time, nothing changes.
    room.run(1_500);
    assert!(changes(&room.nodes[ctl]).is_empty());
    room.run(1_000);
    // Out, then in, each committed before the next: the new member's vote counts from its block.
    let expected =
        [Change::Remove { id: dead_member.id, key: dead_member.key }, Change::Add { id: spare_id, key: spare_key }];
    for node in &room.nodes {
        assert_eq!(changes(node), expected, "{}", node.id());
        assert_eq!(node.commit(), node.chain().height(), "{}: committed", node.id());
    }
    assert!(room.nodes[spare].is_voter());
    assert_eq!(room.nodes[ctl].members().unwrap().len(), 3);
    // The room goes on mining, and the new member acknowledges blocks as a voter.
    let miner = (0..room.nodes.len()).find(|&i| i != ctl).unwrap();
    let before = room.nodes[ctl].commit();
    room.mine(miner);
    room.run(10);
    assert_eq!(room.nodes[ctl].commit(), before + 1);
}

/// A room of three that replaces a member silent for 2 s, founded, with one block committed, and
/// the index of its controller.
fn replacing_room_of_three() -> (Room, usize) {
    let timing = Timing { replace_after_ms: 2_000, ..Timing::default() };
    let mut room = Room::with_room_size(3, 3, timing);
    room.run(FOUNDED_MS);
    let ctl = room.controllers()[0];
    room.mine((ctl + 1) % 3);
    room.run(10);
    (room, ctl)
}

#[test]
fn a_member_back_with_its_disk_lost_takes_its_own_place() {
    let (mut room, ctl) = replacing_room_of_three();
    // The third voter comes back under its id with an empty data directory: another key.
    let lost = (ctl + 2) % 3;
    let old = Member { id: room.nodes[lost].id(), key: room.nodes[lost].key() };
    let cfg = RoomNodeConfig { key: old.key + 1, incarnation: 8, ..room.nodes[lost].cfg.clone() };
    room.nodes[lost] = RoomNode::new(cfg, Restored::default());
    room.input(lost, Input::Connected);
    room.run(3_000);
    let expected = [Change::Remove { id: old.id, key: old.key }, Change::Add { id: old.id, key: old.key + 1 }];
    assert_eq!(changes(&room.nodes[ctl]), expected);
    assert_eq!(room.nodes[ctl].commit(), room.nodes[ctl].chain().height());
    assert!(room.nodes[lost].is_voter(), "a member again, under its new key");
}

#[test]
fn a_change_of_members_that_does_not_apply_is_refused_and_truncation_reverts_one() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let follower = (ctl + 1) % 3;
    let node = &mut room.nodes[follower];
    let (term, alg) = (node.term(), HashAlg::Sha1);
    let stranger = Change::Remove { id: 999, key: 1 };
    let block = Block::change(1, term, alg, Pace::Fixed(2), 0, node.tip(), stranger);
    assert_eq!(node.append(block), Err(crate::chain::ChainError::Members(1)));
    // A well-formed one applies at once, uncommitted, and goes with the block.
    let member = node.members().unwrap().members()[0];
    let out = Change::Remove { id: member.id, key: member.key };
    let block = Block::change(1, term, alg, Pace::Fixed(2), 0, node.tip(), out);
    node.append(block).unwrap();
    assert_eq!(node.members().unwrap().len(), 2);
    assert!(node.truncate(1));
    assert_eq!(node.members().unwrap().len(), 3);
}

#[test]
fn without_a_controller_a_voter_with_a_longer_chain_is_asked_before_a_peer_that_never_answered() {
    let mut room = founded_with_blocks(2);
    let ctl = room.controllers()[0];
    let (f, v) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (id, key) = (room.nodes[v].id(), room.nodes[v].key());
    let node = &mut room.nodes[f];
    let (height, term) = (node.chain().height(), node.term());
    // The controller fell silent; our last sync request went to a peer gone for good.
    let later = room.now + 10 * Timing::default().election_max_ms;
    node.syncing = Some((999, later - 10, height, 1));
    let pos = Pos { last_term: term, height: height + 5 };
    let pre = Msg::PreBallot { to: None, term: term + 1, key, pos };
    let actions = node.handle(later, Input::Message(Envelope::new(id, pre)));
    let asked = publishes(&actions).iter().any(|m| matches!(m, Msg::SyncRequest { to, .. } if *to == id));
    assert!(asked, "{actions:?}");
}

fn fatal(room: &Room, i: usize) -> bool {
    room.actions.iter().any(|(j, a)| *j == i && matches!(a, Action::Fatal(_)))
}

#[test]
fn a_member_that_took_its_ids_place_under_a_new_key_stays_when_the_old_process_comes_back() {
    let (mut room, ctl) = replacing_room_of_three();
    // The third voter is paused; a process under its id with another data directory comes up
    // and takes its place.
    let lost = (ctl + 2) % 3;
    let old_key = room.nodes[lost].key();
    let cfg = RoomNodeConfig { key: old_key + 1, incarnation: 8, ..room.nodes[lost].cfg.clone() };
    let old = std::mem::replace(&mut room.nodes[lost], RoomNode::new(cfg, Restored::default()));
    room.input(lost, Input::Connected);
    room.run(3_000);
    assert!(room.nodes[lost].is_voter());
    // The old process resumes, its chain from before the change (seed 764004: the new member
    // read the configuration of block 0, not the one the chain's changes made, and gave way).
    room.nodes.push(old);
    room.input(3, Input::Connected);
    room.run(1_000);
    assert!(!fatal(&room, lost), "the member stays");
    assert!(fatal(&room, 3), "the old process gives way once its chain shows the change");
    assert!(room.nodes[lost].is_voter());
    let before = room.nodes[ctl].commit();
    room.mine((ctl + 1) % 3);
    room.run(10);
    assert_eq!(room.nodes[ctl].commit(), before + 1, "the room goes on");
}

#[test]
fn a_non_voter_in_a_newer_term_may_still_take_a_lost_members_place() {
    let (mut room, ctl) = replacing_room_of_three();
    // A voter dies for good; a process under its id that no longer votes (its key was replaced)
    // comes back from a partition where it ran for terms of its own.
    let lost = (ctl + 2) % 3;
    let node = &room.nodes[lost];
    let (id, term) = (node.id(), node.term());
    let restored = Restored {
        term: term + 3,
        voted_for: Some(id),
        config: node.config().cloned(),
        blocks: node.chain().blocks().to_vec(),
        commit: node.commit(),
    };
    let cfg = RoomNodeConfig { key: node.key() + 1, incarnation: 8, ..node.cfg.clone() };
    room.nodes[lost] = RoomNode::new(cfg, restored);
    room.input(lost, Input::Connected);
    // Under the member's id, its acknowledgements depose no one, whatever their term, yet say it
    // may step in (seed 764004: dropped as of another term, and the place stayed empty for
    // good). Once the member is out, its id is no member's: its newer term moves the room on
    // (it could follow no controller of an older one), and it is added.
    room.run(8_000);
    // A block of the new controller's term commits the removal; the addition follows.
    let ctl = room.controllers()[0];
    room.mine((0..3).find(|&i| i != ctl && i != lost).unwrap());
    room.run(3_000);
    let key = room.nodes[lost].key();
    let ctl = room.controllers()[0];
    assert!(changes(&room.nodes[ctl]).contains(&Change::Add { id, key }), "{:?}", changes(&room.nodes[ctl]));
    assert!(room.nodes[lost].is_voter());
    let before = room.nodes[ctl].chain().height();
    room.mine((ctl + 1) % 3);
    room.run(10);
    assert_eq!(room.nodes[ctl].commit(), before + 1, "the room goes on");
}

/// A solution of `miner` to the controller's open challenge, delivered to the controller alone.
fn solve_at_controller(node: &mut RoomNode, now: u64, miner: PeerId) -> Vec<Action> {
    let c = *node.open().expect("an open challenge");
    let nonce = Template::new(&c.prev, c.tx, miner).search(u32::from(c.difficulty), 0, 1 << 20).expect("found");
    node.handle(now, Input::Message(Envelope::new(miner, Msg::Solution { tx: c.tx, nonce })))
}

fn challenges(actions: &[Action]) -> Vec<TxId> {
    publishes(actions)
        .iter()
        .filter_map(|m| if let Msg::Challenge { challenge, .. } = m { Some(challenge.tx) } else { None })
        .collect()
}

/// 1,000 peers on a 3-node RabbitMQ cluster: nearly every miner is late, and the controller's
/// answer to each (a thousand a block) was more than the cluster took from its connection; its
/// heartbeats waited behind them and the room lost it after 3 to 7 blocks. A late solution is
/// now only recorded: the transaction's result, sent to all, already told its miner. A solution
/// that is wrong is still answered.
#[test]
fn a_late_solution_is_recorded_but_not_answered_and_a_wrong_one_is_answered() {
    let room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (first, late) = (room.nodes[(ctl + 1) % 3].id(), room.nodes[(ctl + 2) % 3].id());
    let mut node = room.nodes.into_iter().nth(ctl).unwrap();
    let tx = node.open().expect("an open challenge").tx;
    let now = 100_000;
    let won = solve_at_controller(&mut node, now, first);
    assert!(
        publishes(&won).iter().any(|m| matches!(m, Msg::Result { outcome: Outcome::Accepted(b), .. } if b.tx == tx))
    );
    let actions = node.handle(now + 1, Input::Message(Envelope::new(late, Msg::Solution { tx, nonce: 7 })));
    assert!(publishes(&actions).is_empty(), "{actions:?}");
    let rejected = |a: &Action| matches!(a, Action::Emit(Event::SolutionRejected { tx: t, miner, reason }) if *t == tx && *miner == late && reason == "already_solved");
    assert!(actions.iter().any(rejected), "recorded: {actions:?}");
    let unknown = node.handle(now + 2, Input::Message(Envelope::new(late, Msg::Solution { tx: tx + 50, nonce: 7 })));
    let answered = publishes(&unknown);
    assert!(
        matches!(
            answered[..],
            [Msg::Result { outcome: Outcome::Rejected { reason: RejectReason::UnknownTransaction, .. }, .. }]
        ),
        "{unknown:?}"
    );
}

#[test]
fn the_next_challenge_goes_out_with_the_result_and_a_second_block_waits_for_the_first_ones_commit() {
    let room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let miner = room.nodes[(ctl + 1) % 3].id();
    let voter = room.nodes[(ctl + 2) % 3].id();
    let mut node = room.nodes.into_iter().nth(ctl).unwrap();
    let (now, term) = (room.now, node.term());
    // Block 1, uncommitted: the quorum writes it while the miners search for block 2.
    let actions = solve_at_controller(&mut node, now, miner);
    assert!(publishes(&actions).iter().any(|m| matches!(m, Msg::Result { .. })));
    assert_eq!(challenges(&actions), [2]);
    assert_eq!((node.commit(), node.chain().height()), (1, 2));
    // Block 2 comes before block 1 is committed: no third challenge, two blocks in flight at most.
    let actions = solve_at_controller(&mut node, now + 1, miner);
    assert!(challenges(&actions).is_empty(), "{actions:?}");
    assert_eq!(node.chain().height(), 3);
    // A voter holds both: both committed, the next challenge goes out.
    let ack = Msg::Ack { to: node.id(), term, height: 3, key: 1000 + u64::from(voter) };
    let actions = node.handle(now + 2, Input::Message(Envelope::new(voter, ack)));
    assert_eq!(node.commit(), 3);
    assert_eq!(challenges(&actions), [3]);
}

#[test]
fn a_commit_after_the_next_challenge_is_announced_at_once() {
    let room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (miner, voter) = (room.nodes[(ctl + 1) % 3].id(), room.nodes[(ctl + 2) % 3].id());
    let mut node = room.nodes.into_iter().nth(ctl).unwrap();
    let (now, term) = (room.now, node.term());
    solve_at_controller(&mut node, now, miner);
    let ack = Msg::Ack { to: node.id(), term, height: 2, key: 1000 + u64::from(voter) };
    let actions = node.handle(now + 1, Input::Message(Envelope::new(voter, ack)));
    let said = publishes(&actions).iter().any(|m| matches!(m, Msg::Heartbeat { commit: 2, .. }));
    assert!(said, "{actions:?}");
}

#[test]
fn neither_a_lost_controller_nor_a_restart_into_a_newer_term_backs_off_the_election_timers() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let old = room.nodes.remove(ctl);
    room.run(3 * Timing::default().election_max_ms);
    let ctl = room.controllers();
    assert_eq!(ctl.len(), 1, "a new controller");
    assert!(room.nodes.iter().all(|n| n.backoff == 0), "a term whose controller was lost");
    // The old controller comes back from its disk, in the term it led, and joins the newer one.
    let restored = Restored {
        term: old.term(),
        voted_for: old.voted_for(),
        config: old.config().cloned(),
        blocks: old.chain().blocks().to_vec(),
        commit: old.commit(),
    };
    room.nodes.push(RoomNode::new(old.cfg.clone(), restored));
    room.input(2, Input::Connected);
    room.run(500);
    assert_eq!(room.nodes[2].controller(), room.nodes[ctl[0]].controller());
    assert_eq!(room.nodes[2].backoff, 0, "a term joined late");
}

#[test]
fn a_sync_request_answered_with_nothing_by_a_copy_of_the_replier_waits_for_the_replier_itself() {
    let room = founded_with_blocks(3);
    let ctl = room.controllers()[0];
    let ctl_node = &room.nodes[ctl];
    let (ctl_id, term, commit) = (ctl_node.id(), ctl_node.term(), ctl_node.commit());
    let blocks = ctl_node.chain().blocks().to_vec();
    // A follower with the first block only asks the controller for the rest.
    let f = &room.nodes[(ctl + 1) % 3];
    let restored = Restored {
        term,
        voted_for: f.voted_for(),
        config: f.config().cloned(),
        blocks: blocks[..1].to_vec(),
        commit: 1,
    };
    let mut node = RoomNode::new(f.cfg.clone(), restored);
    node.handle(room.now, Input::Connected);
    node.request_sync(ctl_id);
    let (.., req) = node.syncing.expect("asked");
    let reply = |blocks: Vec<Block>, height: u64| Msg::SyncReply {
        to: node.id(),
        req,
        term,
        config: None,
        blocks,
        height,
        commit: commit.min(height),
        open: None,
    };
    // A process under the controller's id with another data directory answers first, with
    // nothing beyond where we asked from; the controller's own answer comes next.
    let copy = reply(Vec::new(), 1);
    let member = reply(blocks[1..].to_vec(), blocks.len() as u64);
    node.handle(room.now + 1, Input::Message(Envelope::new(ctl_id, copy)));
    let actions = node.handle(room.now + 2, Input::Message(Envelope::new(ctl_id, member)));
    assert!(!actions.iter().any(|a| matches!(a, Action::Emit(Event::MessageDropped { .. }))), "{actions:?}");
    assert_eq!(node.chain().height(), blocks.len() as u64);
}

#[test]
fn each_new_ballot_of_the_term_gives_its_election_more_time() {
    let mut room = Room::new(3);
    room.run(FOUNDED_MS);
    let ctl = room.controllers()[0];
    let (a, b) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (b_id, b_key, ctl_id, ctl_key) =
        (room.nodes[b].id(), room.nodes[b].key(), room.nodes[ctl].id(), room.nodes[ctl].key());
    let term = room.nodes[a].term() + 1;
    let pos = room.nodes[a].pos();
    let mut t = room.now;
    let node = &mut room.nodes[a];
    let ballot = |key| Msg::Ballot { term, ballot: 1, key, pos, proposal: None };
    handle_echoed(node, t, Input::Message(Envelope::new(b_id, ballot(b_key))));
    // Another voter's ballot of the term comes late (a broker that takes seconds to deliver a
    // term's ballots): the term's patience starts again from it.
    t += Timing::default().election_min_ms - 10;
    handle_echoed(node, t, Input::Message(Envelope::new(ctl_id, ballot(ctl_key))));
    t += Timing::default().election_min_ms - 10;
    let next = Msg::PreBallot { to: None, term: term + 1, key: b_key, pos };
    let actions = handle_echoed(node, t, Input::Message(Envelope::new(b_id, next)));
    assert!(!actions.iter().any(|a| matches!(a, Action::Publish(Msg::PreBallot { .. }))), "joined too early");
}

#[test]
fn a_miners_solution_which_never_comes_back_to_it_does_not_stretch_its_timers() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let miner = (ctl + 1) % 3;
    let before = room.nodes[miner].lag();
    room.mine(miner);
    // Only the controller subscribes to the solutions: ours is not timed as a broadcast (it
    // stretched every timer of the miner by up to 1.6 s, and a paused controller's failover
    // took 3.7 s instead of 0.6).
    let later = room.now + 2 * Timing::default().election_max_ms;
    room.nodes[miner].now = later;
    assert_eq!(room.nodes[miner].lag(), before);
}

#[test]
fn a_candidate_whose_chain_removed_it_is_not_controller_whatever_its_grants() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (a, b) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (ctl_id, ctl_key, b_id, b_key) =
        (room.nodes[ctl].id(), room.nodes[ctl].key(), room.nodes[b].id(), room.nodes[b].key());
    let node = &mut room.nodes[a];
    let (id, key, term) = (node.id(), node.key(), node.term());
    // `a` ran in the next term; then a sync brought it the (uncommitted) block that removes it.
    node.enter_term(term + 1);
    node.my_ballot = Some(1);
    let out = Block::change(1, term, HashAlg::Sha1, Pace::Fixed(2), 0, node.tip(), Change::Remove { id, key });
    node.append(out).unwrap();
    assert!(!node.is_voter());
    // The voters that grant it have not seen that block yet.
    for (from, from_key) in [(ctl_id, ctl_key), (b_id, b_key)] {
        let grant = Msg::Grant { to: id, to_key: key, term: term + 1, key: from_key };
        node.handle(room.now, Input::Message(Envelope::new(from, grant)));
    }
    assert!(!node.is_controller(), "seed 573124: a controller that is no member of the room");
}

/// A room test node's answer (its key `key`) to `to`'s hello: where it stands.
fn answer_to(to: PeerId, key: u64, term: Term, controller: PeerId, height: u64) -> Msg {
    Msg::Hello {
        to: Some(to),
        want_reply: false,
        key,
        incarnation: 7,
        since_ms: 0,
        term,
        controller: Some(controller),
        height,
        peers: Vec::new(),
    }
}

#[test]
fn a_process_that_hears_another_under_its_id_lead_asks_the_room_and_syncs_from_an_answer() {
    let mut room = founded_with_blocks(2);
    let ctl = room.controllers()[0];
    let (f, v) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (id, v_id, v_key) = (room.nodes[f].id(), room.nodes[v].id(), room.nodes[v].key());
    let (term, height) = (room.nodes[f].term(), room.nodes[f].chain().height());
    // Back from a partition (whatever it asked before is long out of date).
    let mut now = room.now + 10 * Timing::default().election_max_ms;
    let node = &mut room.nodes[f];
    // Our own beat (our key) is an echo; another key's, of our term or later, is not.
    let beat = |key| {
        let tip = Digest::Sha1([7; 20]);
        Input::Message(Envelope::new(
            id,
            Msg::Heartbeat { term: term + 1, key, height: height + 5, commit: 0, tip, open: None },
        ))
    };
    let hellos = |actions: &[Action]| publishes(actions).iter().filter(|m| matches!(m, Msg::Hello { .. })).count();
    assert_eq!(hellos(&node.handle(now, beat(node.key()))), 0);
    let asked = node.handle(now, beat(node.key() + 1));
    assert!(publishes(&asked).iter().any(|m| matches!(m, Msg::Hello { to: None, want_reply: true, .. })), "{asked:?}");
    // Its beats keep coming: asked again only after a wait, not at each one.
    now += 100;
    assert_eq!(hellos(&node.handle(now, beat(node.key() + 1))), 0);
    // A voter's answer names our id its controller, in a term after ours: we cannot follow that
    // process (our requests would be its own echoes), so we ask the voter for its blocks.
    let answer = answer_to(id, v_key, term + 1, id, height + 5);
    let actions = node.handle(now, Input::Message(Envelope::new(v_id, answer)));
    let sync = publishes(&actions).iter().any(|m| matches!(m, Msg::SyncRequest { to, .. } if *to == v_id));
    assert!(sync, "{actions:?}");
    assert_eq!(node.term(), term + 1);
    assert!(!fatal(&room, f), "nothing yet says the other process is the member");
}

#[test]
fn a_controller_keeps_its_place_whatever_beats_come_under_its_id() {
    let mut room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (id, term, height) = (room.nodes[ctl].id(), room.nodes[ctl].term(), room.nodes[ctl].chain().height());
    let tip = Digest::Sha1([7; 20]);
    let forged =
        Msg::Heartbeat { term, key: room.nodes[ctl].key() + 1, height: height + 9, commit: 0, tip, open: None };
    room.queue.push_back((None, Envelope::new(id, forged)));
    room.run(100);
    assert!(room.nodes[ctl].is_controller());
    assert!(!fatal(&room, ctl));
}

#[test]
fn a_voter_whose_uncommitted_blocks_removed_a_pre_ballots_sender_of_a_later_term_syncs_from_its_commit_point() {
    let mut room = founded_with_blocks(2);
    let ctl = room.controllers()[0];
    let (f, v) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (v_id, v_key, ctl_id, ctl_key) =
        (room.nodes[v].id(), room.nodes[v].key(), room.nodes[ctl].id(), room.nodes[ctl].key());
    let later = room.now + 10 * Timing::default().election_max_ms;
    let node = &mut room.nodes[f];
    let (term, commit) = (node.term(), node.commit());
    let height = node.chain().height();
    let pre = |key, height| Msg::PreBallot { to: None, term: term + 2, key, pos: Pos { last_term: term + 1, height } };
    let asked_from_commit = |actions: &[Action], peer| {
        publishes(actions)
            .iter()
            .any(|m| matches!(m, Msg::SyncRequest { to, from, .. } if *to == peer && *from == commit))
    };
    // A voter we count, as long as we are: nothing to take from it (in a room of 300 electing,
    // a sync on each such pre-ballot slowed the election down to 35 s).
    let actions = node.handle(later, Input::Message(Envelope::new(ctl_id, pre(ctl_key, height))));
    assert!(!publishes(&actions).iter().any(|m| matches!(m, Msg::SyncRequest { .. })), "{actions:?}");
    // A deposed controller's last block, never committed, removed `v`: we no longer count it.
    let out = Change::Remove { id: v_id, key: v_key };
    node.append(Block::change(commit, term, HashAlg::Sha1, Pace::Fixed(2), 0, node.tip(), out)).unwrap();
    // The room replaced that block with one of a later term, and `v` runs for the next.
    let actions = node.handle(later + 1, Input::Message(Envelope::new(v_id, pre(v_key, height + 1))));
    assert!(asked_from_commit(&actions, v_id), "seed 831887: {actions:?}");
}

#[test]
fn a_hello_showing_a_longer_chain_is_asked_for_it_before_a_silent_controller_or_a_stranger() {
    let mut room = founded_with_blocks(2);
    let ctl = room.controllers()[0];
    let (f, v) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (v_id, v_key) = (room.nodes[v].id(), room.nodes[v].key());
    let node = &mut room.nodes[f];
    let (term, height) = (node.term(), node.chain().height());
    let hello = answer_to(node.id(), v_key, term, room.nodes[ctl].id(), height + 5);
    let node = &mut room.nodes[f];
    let asked = |actions: &[Action]| {
        publishes(actions).iter().find_map(|m| if let Msg::SyncRequest { to, .. } = m { Some(*to) } else { None })
    };
    // Our controller fell silent (seed 306646: one a peer without block 0 followed was a forger).
    let later = room.now + 10 * Timing::default().election_max_ms;
    let actions = node.handle(later, Input::Message(Envelope::new(v_id, hello.clone())));
    assert_eq!(asked(&actions), Some(v_id), "{actions:?}");
    // A request just sent to a stranger (a forger's heartbeat showed a long chain, seed 108701)
    // gives way to a voter's.
    node.syncing = Some((999, later + 1, height, 1));
    let actions = node.handle(later + 2, Input::Message(Envelope::new(v_id, hello)));
    assert_eq!(asked(&actions), Some(v_id), "{actions:?}");
}

#[test]
fn a_peer_whose_term_a_forger_gave_it_still_hears_another_process_under_its_id_lead_and_syncs() {
    let room = founded_with_blocks(1);
    let ctl = room.controllers()[0];
    let (f, v) = ((ctl + 1) % 3, (ctl + 2) % 3);
    let (id, term, v_id, v_key) = (room.nodes[f].id(), room.nodes[f].term(), room.nodes[v].id(), room.nodes[v].key());
    let mut node = member_without_chain(&room, f);
    // Without the configuration, a forger's newer term (seed 807713); we ask it for its chain.
    hear(&mut node, room.now, 999, term + 1);
    assert_eq!(node.controller(), Some(999));
    // Another process under our id leads the room's term, older than the forged one.
    let tip = Digest::Sha1([7; 20]);
    let beat = Msg::Heartbeat { term, key: node.key() + 1, height: 9, commit: 9, tip, open: None };
    let actions = node.handle(room.now + 1, Input::Message(Envelope::new(id, beat)));
    assert!(publishes(&actions).iter().any(|m| matches!(m, Msg::Hello { want_reply: true, .. })), "{actions:?}");
    // The forger fell silent; a voter answers: it is asked, not the forger again.
    let answer = answer_to(id, v_key, term, id, 9);
    let later = room.now + 10 * Timing::default().election_max_ms;
    node.syncing = Some((999, later - 1, 0, 1));
    let actions = node.handle(later, Input::Message(Envelope::new(v_id, answer)));
    let asked = publishes(&actions).iter().any(|m| matches!(m, Msg::SyncRequest { to, .. } if *to == v_id));
    assert!(asked, "{actions:?}");
}

/// A room of 1,000 starting at once: the last peers to connect waited seconds for the answers
/// to their hellos, queued behind everyone's pre-ballots and ballots. Those reached them first,
/// from peers they did not know yet to vote, and were dropped. The late peers then entered the
/// term last, voted on the few ballots sent again, and split it (terms 1 of two runs in five).
#[test]
fn election_messages_that_come_before_the_room_is_known_count_once_it_is() {
    let mut node = lone(4);
    node.handle(1, Input::Message(Envelope::new(100, node.hello(None, true))));
    let t = Timing::default().discovery_ms + 1;
    let pos = Pos::default();
    let members = (100..104).map(|id| Member { id, key: 1000 + u64::from(id) }).collect();
    let proposal = Some(RoomConfig::new(members).unwrap().digest(HashAlg::Sha256));
    // 101 and 102 are known only from their election messages, 103 not at all yet.
    for id in [101, 102] {
        let key = 1000 + u64::from(id);
        node.handle(t, Input::Message(Envelope::new(id, Msg::PreBallot { to: None, term: 1, key, pos })));
    }
    let ballots = [(101, 7u32), (102, u32::MAX)];
    for (id, ballot) in ballots {
        let key = 1000 + u64::from(id);
        let msg = Msg::Ballot { term: 1, ballot, key, pos, proposal };
        node.handle(t, Input::Message(Envelope::new(id, msg)));
    }
    assert_eq!(node.term(), 0, "no quorum known yet");
    // 103's hello completes the room: the pre-ballots and ballots held count now.
    node.handle(t + 10, hello_from(103));
    assert_eq!(node.term(), 1, "the pre-vote of 101 and 102 made a quorum with ours");
    assert_eq!(node.ballots.keys().copied().collect::<Vec<_>>(), vec![100, 101, 102]);
    assert_eq!(node.proposal_digest(), proposal);
    // Once the last ballot is in, it grants the highest: 102's, held since before.
    let msg = Msg::Ballot { term: 1, ballot: 3, key: 1103, pos, proposal };
    node.handle(t + 20, Input::Message(Envelope::new(103, msg)));
    assert_eq!(node.voted_for(), Some(102));
}

/// A follower of a founded room of five with a block (not its controller), and the three other
/// voters that are not the controller either: the setting of the next term's ballots.
struct NextTerm {
    node: RoomNode,
    now: u64,
    term: Term,
    pos: Pos,
    voters: [(PeerId, u64); 3],
}

fn next_term_of_five() -> NextTerm {
    let mut room = Room::new(5);
    room.run(FOUNDED_MS);
    mine_blocks(&mut room, 1);
    let ctl = room.controllers()[0];
    let others: Vec<usize> = (0..5).filter(|&i| i != ctl).collect();
    let voter = |i: usize| (room.nodes[i].id(), room.nodes[i].key());
    let voters = [voter(others[1]), voter(others[2]), voter(others[3])];
    let now = room.now;
    let node = room.nodes.into_iter().nth(others[0]).expect("a follower");
    NextTerm { term: node.term() + 1, pos: node.pos(), node, now, voters }
}

/// Voters that granted at a fixed time after entering the term, on the ballots in by then, split
/// the first term of a room of 1,000 (464, 374 and 162 grants): its ballots took a second or two
/// to go round, and each voter had seen another part of them. A voter now waits the ballot wait
/// past the last new ballot, so those that grant before every ballot is in have seen the same ones.
#[test]
fn a_voter_waits_for_the_ballots_to_stop_coming_before_it_grants_on_part_of_them() {
    let NextTerm { mut node, now: t, term, pos, voters: [v1, v2, v3] } = next_term_of_five();
    let ballot = |(id, key): (PeerId, u64), ballot: u32| {
        Input::Message(Envelope::new(id, Msg::Ballot { term, ballot, key, pos, proposal: None }))
    };
    let wait = Timing::default().ballot_wait_ms;
    let node = &mut node;
    handle_echoed(node, t, ballot(v1, 5));
    assert_eq!(node.term(), term);
    handle_echoed(node, t + wait - 10, ballot(v2, 6));
    // A quorum's ballots (ours, v1's, v2's) and the wait past entering the term: not yet, a
    // ballot came in only 60 ms ago.
    handle_echoed(node, t + wait + 50, Input::Tick);
    assert_eq!(node.voted_for(), None, "granted on part of the ballots while they were still coming");
    handle_echoed(node, t + wait + 60, ballot(v3, u32::MAX));
    // Then none for the ballot wait (and the broker's lag): it grants the best it holds.
    handle_echoed(node, t + 3 * wait + 100, Input::Tick);
    assert_eq!(node.voted_for(), Some(v3.0));
}

/// On a 3-node RabbitMQ cluster whose queues were a minute long, the first term of a room of
/// 1,000 split 371, 323 and 306: each node's subscribers heard their own node's ballots first,
/// and a voter granted once its own ballot came back, or at its election timer, on the ballots of
/// its node and part of the others'. A voter now waits, after its echo and past its election
/// timer, until no new ballot has come for the ballot wait and twice the lag.
#[test]
fn a_voter_grants_on_part_of_the_ballots_only_once_they_stop_coming_not_on_its_echo_or_timer() {
    let NextTerm { mut node, now: t, term, pos, voters: [v1, v2, v3] } = next_term_of_five();
    let ballot = |(id, key): (PeerId, u64), ballot: u32| {
        Input::Message(Envelope::new(id, Msg::Ballot { term, ballot, key, pos, proposal: None }))
    };
    // Our ballot goes out with the first one heard; its echo is held back (a long queue).
    let out = node.handle(t, ballot(v1, 5));
    let mine = publishes(&out).into_iter().find(|m| matches!(m, Msg::Ballot { .. })).cloned().expect("our ballot");
    node.handle(t + 10, ballot(v2, 6));
    // A quorum's ballots (ours, v1's, v2's), the deadline past: the echo is awaited.
    node.handle(t + 300, Input::Tick);
    assert_eq!(node.voted_for(), None, "our ballot is still in the queue");
    // The echo comes back 600 ms after it left: ballots of other nodes may still be on their way.
    let echoed = t + 600;
    node.handle(echoed, Input::Message(Envelope::new(node.id(), mine)));
    assert_eq!(node.voted_for(), None, "not on the echo");
    assert!(node.ballot_quiet_ms() >= 2 * 600, "the lag just measured");
    // Another voter's ballot comes past our election timer: the wait starts again from it.
    let late = t + 1_000;
    assert!(late > node.election_deadline, "past the election timer");
    node.handle(late - 1, Input::Tick);
    node.handle(late, ballot(v3, u32::MAX));
    assert_eq!(node.voted_for(), None, "one voter's ballot is still missing");
    let quiet = node.ballot_quiet_ms();
    node.handle(late + quiet - 10, Input::Tick);
    assert_eq!(node.voted_for(), None, "a ballot came in within the wait");
    node.handle(late + quiet + 10, Input::Tick);
    assert_eq!(node.voted_for(), Some(v3.0), "the best of those in, once they stopped coming");
}

/// A room of 1,000 gathering: every peer answered every newcomer's hello, a million answers,
/// most of the start-up's traffic, and the last peers to connect learned the room seconds late.
/// Now the three lowest ids answer, each with every live peer it knows.
#[test]
fn in_a_gathering_room_the_three_lowest_ids_answer_a_newcomer_with_every_peer_they_know() {
    let mut room = Room::with_room_size(5, 6, Timing::default());
    room.run(FOUNDED_MS);
    assert!(room.controllers().is_empty(), "five of six: no proposal yet");
    let cfg = RoomNodeConfig {
        id: 105,
        key: 1105,
        incarnation: 7,
        since_ms: 0,
        room_size: 6,
        pace: Pace::Fixed(2),
        alg: HashAlg::Sha1,
        seed: 47,
        timing: Timing::default(),
    };
    room.nodes.push(RoomNode::new(cfg, Restored::default()));
    let first = room.actions.len();
    room.input(5, Input::Connected);
    room.run(0);
    let answers: Vec<(PeerId, usize)> = room.actions[first..]
        .iter()
        .filter_map(|(i, a)| match a {
            Action::Publish(Msg::Hello { to: Some(105), peers, .. }) => Some((room.nodes[*i].id(), peers.len())),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![(100, 6), (101, 6), (102, 6)]);
    assert!(room.nodes[5].is_voter(), "the newcomer knows the whole room from the answers");
    room.run(FOUNDED_MS);
    assert_eq!(room.controllers().len(), 1);
}
