//! Network partitions on a real room. Each peer runs in a network namespace of its own, linked to
//! the broker's namespace by a veth pair on a bridge; a partition is the broker's end of one link
//! going down. The peer's packets then vanish (no RST, no FIN), as when a cable is cut, so only
//! keepalives can tell — unlike the kill and SIGSTOP faults, where the kernel or the broker still
//! answers for the peer.
//!
//! Needs root (CAP_SYS_ADMIN) and iproute2, as CI has. Without them the tests fail and say why:
//! a skipped partition test would look like a passing one.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use peer::events::{Event, Record, now_ms};
use peer::protocol::{PeerId, Term};

use crate::netns::{Netns, ip_ok, netns_list, start_broker_in, start_peer_in};
use crate::support::*;

const T: Duration = Duration::from_secs(60);

/// The broker's address. No address or link of ours lives in the host's namespace (both ends of
/// every veth are created inside our namespaces), so a fixed private subnet cannot clash with the
/// host's or with a parallel run's.
const BROKER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The broker's port: fixed, because the broker's namespace is fresh and private to this test —
/// nothing else can listen in it.
const BROKER_PORT: u16 = 1883;

fn peer_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(index).expect("fewer than 240 peers"))
}

/// The broker-side end of peer `index`'s link, the one a partition takes down.
fn port_dev(index: usize) -> String {
    format!("p{index}")
}

/// The broker's namespace with a bridge, and one namespace per peer linked to it.
#[derive(Debug)]
struct Network {
    broker_ns: String,
    peer_ns: Vec<String>,
    netns: Netns,
}

impl Network {
    fn new(peers: usize) -> Self {
        let mut netns = Netns::new();
        let b = netns.add("b");
        ip_ok(&["-n", &b, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &b, "addr", "add", &format!("{BROKER_ADDR}/24"), "dev", "br0"]);
        ip_ok(&["-n", &b, "link", "set", "br0", "up"]);
        let mut peer_ns = Vec::new();
        for i in 0..peers {
            let ns = netns.add(&format!("p{i}"));
            let port = port_dev(i);
            // Both ends are born inside our namespaces: nothing appears in the host's.
            ip_ok(&["-n", &b, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip_ok(&["-n", &b, "link", "set", &port, "master", "br0", "up"]);
            ip_ok(&["-n", &ns, "addr", "add", &format!("{}/24", peer_addr(i)), "dev", "eth0"]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            peer_ns.push(ns);
        }
        Self { broker_ns: b, peer_ns, netns }
    }

    /// Cuts peer `index` off: its link goes down at the broker's end, so everything in flight on
    /// it is lost silently.
    fn cut(&self, index: usize) {
        ip_ok(&["-n", &self.broker_ns, "link", "set", &port_dev(index), "down"]);
    }

    fn heal(&self, index: usize) {
        ip_ok(&["-n", &self.broker_ns, "link", "set", &port_dev(index), "up"]);
    }
}

/// A room whose peers each sit behind a link of their own. Self-contained rather than built on
/// `room::Room`, whose peers all share the host's loopback.
struct Partitioned {
    /// Declared before the network so they drop first: every process dies before its namespace
    /// goes. A peer cut off is out of here (its `Proc` is with the test) until its link returns.
    peers: Vec<Option<Proc>>,
    broker: Proc,
    net: Network,
    files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Partitioned {
    fn start(n: usize) -> Self {
        let net = Network::new(n);
        let broker = start_broker_in(&net.broker_ns, &BROKER_ADDR.to_string(), BROKER_PORT, None);
        let dir = tempfile::Builder::new()
            .prefix("hashvote-partition")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir()
            .unwrap();
        let files: Vec<_> = (0..n).map(|i| dir.path().join(format!("peer{i}.jsonl"))).collect();
        let peers = (0..n)
            .map(|i| Some(start_peer_in(&net.peer_ns[i], (BROKER_ADDR, BROKER_PORT), &files[i], n, None)))
            .collect();
        let p = Self { peers, broker, net, files, _dir: dir };
        wait_until(T, "every peer's started event", || (0..n).all(|i| p.id_of(i).is_some()));
        for i in 0..n {
            let reported = p.events_of(i).iter().find_map(|r| match r.event {
                Event::Started { pid, .. } => Some(pid),
                _ => None,
            });
            let child = p.peers[i].as_ref().map(Proc::pid);
            assert_eq!(reported, child, "`ip netns exec` ran the peer in place, so killing the child kills it");
        }
        p
    }

    fn events_of(&self, index: usize) -> Vec<Record> {
        read_events(&self.files[index])
    }

    fn records(&self) -> Vec<Record> {
        self.files.iter().flat_map(|f| read_events(f)).collect()
    }

    /// The client id peer `index` reported.
    fn id_of(&self, index: usize) -> Option<PeerId> {
        self.events_of(index).iter().find_map(|r| match r.event {
            Event::Started { client_id, .. } => Some(client_id),
            _ => None,
        })
    }

    /// Peers whose link is up.
    fn connected(&self) -> Vec<usize> {
        (0..self.peers.len()).filter(|&i| self.peers[i].is_some()).collect()
    }

    /// Height of peer `index`'s chain according to its events.
    fn height(&self, index: usize) -> u64 {
        chains(&self.events_of(index)).values().next().map_or(0, |c| c.len() as u64)
    }

    fn wait_height(&self, height: u64) {
        wait_until(T, &format!("every connected peer at height {height}"), || {
            self.connected().into_iter().all(|i| self.height(i) >= height)
        });
    }

    fn min_height(&self) -> u64 {
        self.connected().into_iter().map(|i| self.height(i)).min().unwrap_or(0)
    }

    /// The controller peer `index` believes in for its latest term.
    fn controller_seen_by(&self, index: usize) -> Option<(Term, PeerId)> {
        controller_in(&self.events_of(index))
    }

    /// Waits until every connected peer agrees on a controller of at least `min_term`; returns
    /// the term and the controller's index.
    fn wait_controller(&self, min_term: Term) -> (Term, usize) {
        let (term, id) = wait_agreement(T, min_term, || self.connected(), |i| self.controller_seen_by(i));
        let index = (0..self.files.len()).find(|&i| self.id_of(i) == Some(id)).expect("the controller is ours");
        (term, index)
    }

    /// Every term each peer saw elected.
    fn terms(&self, index: usize) -> Vec<Term> {
        self.events_of(index)
            .iter()
            .filter_map(|r| match r.event {
                Event::ControllerElected { term, .. } => Some(term),
                _ => None,
            })
            .collect()
    }

    /// When the first challenge of a term above `term` was issued.
    fn first_challenge_after(&self, term: Term) -> Option<u64> {
        self.records()
            .iter()
            .filter_map(|r| match r.event {
                Event::ChallengeIssued { term: t, .. } if t > term => Some(r.ts_ms),
                _ => None,
            })
            .min()
    }

    /// The first event of peer `index` at or after `since` (Unix ms) that `pred` picks; its time.
    fn first(&self, index: usize, since: u64, pred: impl Fn(&Event) -> bool) -> Option<u64> {
        self.events_of(index).iter().find(|r| r.ts_ms >= since && pred(&r.event)).map(|r| r.ts_ms)
    }

    fn others(&self, index: usize) -> Vec<usize> {
        (0..self.files.len()).filter(|&i| i != index).collect()
    }

    /// Cuts peer `index`'s link; returns its process (out of `peers`, so the waits skip it) and
    /// the time of the cut.
    fn cut(&mut self, index: usize) -> (Proc, u64) {
        let proc = self.peers[index].take().expect("a running peer");
        let at = now_ms();
        self.net.cut(index);
        (proc, at)
    }

    fn heal(&mut self, index: usize, proc: Proc) -> u64 {
        let at = now_ms();
        self.net.heal(index);
        self.peers[index] = Some(proc);
        at
    }

    /// Waits until every other peer has heard that `index` left (its Last Will, sent by the
    /// broker once the keepalive lapses); returns when the last of them heard it.
    ///
    /// In a busy room this takes longer than 1.5 x keepalive: rumqttd restarts a connection's
    /// keepalive timer whenever it forwards a message to it, and never times out a cut peer the
    /// room keeps sending to; the embedded broker's TCP user timeout closes the connection once
    /// what it sent has gone unacknowledged for 10 s (`broker::TCP_USER_TIMEOUT`).
    fn wait_left(&self, index: usize, since: u64) -> u64 {
        let id = self.id_of(index).expect("id");
        let mut at = 0;
        wait_until(T, &format!("every other peer to see peer #{index} leave"), || {
            let seen: Option<Vec<u64>> = self
                .others(index)
                .into_iter()
                .map(|i| self.first(i, since, |e| matches!(e, Event::PeerLeft { id: x, .. } if *x == id)))
                .collect();
            seen.map(|ts| at = ts.into_iter().max().unwrap_or(0)).is_some()
        });
        at
    }

    /// Waits until every other peer has met `index` again; returns when the last of them did.
    fn wait_rejoined(&self, index: usize, since: u64) -> u64 {
        let id: PeerId = self.id_of(index).expect("id");
        let mut at = 0;
        wait_until(T, &format!("every other peer to see peer #{index} rejoin"), || {
            let seen: Option<Vec<u64>> = self
                .others(index)
                .into_iter()
                .map(|i| self.first(i, since, |e| matches!(e, Event::PeerJoined { id: x, .. } if *x == id)))
                .collect();
            seen.map(|ts| at = ts.into_iter().max().unwrap_or(0)).is_some()
        });
        at
    }

    fn wait_event(&self, index: usize, since: u64, what: &str, pred: impl Fn(&Event) -> bool) -> u64 {
        let mut at = 0;
        wait_until(T, &format!("peer #{index}: {what}"), || self.first(index, since, &pred).map(|t| at = t).is_some());
        at
    }

    /// Asserts that every peer counts all `n` members again (its latest membership event).
    fn assert_whole(&self) {
        let n = self.files.len();
        for i in 0..n {
            let members = self.events_of(i).iter().rev().find_map(|r| match r.event {
                Event::PeerJoined { members, .. } | Event::PeerLeft { members, .. } => Some(members),
                _ => None,
            });
            assert_eq!(members, Some(n), "peer #{i} knows the whole room again");
        }
    }

    /// The longest chain among the other peers.
    fn others_height(&self, index: usize) -> u64 {
        self.others(index).into_iter().map(|i| self.height(i)).max().unwrap_or(0)
    }

    /// Waits until peer `index` holds `height` blocks; returns when it appended the last of them.
    fn wait_caught_up(&self, index: usize, height: u64) -> u64 {
        wait_until(T, &format!("peer #{index} to catch up to height {height}"), || self.height(index) >= height);
        self.events_of(index)
            .iter()
            .rev()
            .find_map(|r| match r.event {
                Event::BlockAccepted { tx, .. } if tx + 1 == height => Some(r.ts_ms),
                _ => None,
            })
            .expect("the block that completed the catch-up")
    }

    /// Stops everything and checks that no process and no namespace of this test survived.
    fn teardown(self) {
        let pids: Vec<u32> = self.peers.iter().flatten().chain([&self.broker]).map(Proc::pid).collect();
        let names = self.net.netns.names.clone();
        drop(self);
        for pid in pids {
            assert!(!alive(pid), "process {pid} outlived the test");
        }
        let left: Vec<String> = netns_list().into_iter().filter(|n| names.contains(n)).collect();
        assert!(left.is_empty(), "network namespaces outlived the test: {left:?}");
    }
}

fn truncations(records: &[Record]) -> usize {
    records.iter().filter(|r| matches!(r.event, Event::ChainTruncated { .. })).count()
}

#[test]
fn a_partitioned_peer_is_treated_as_crashed_and_rejoins_without_rolling_the_room_back() {
    let mut p = Partitioned::start(4);
    let (term, controller) = p.wait_controller(1);
    p.wait_height(2);
    let cut = (0..4).find(|&i| i != controller).expect("a miner");

    let (proc, cut_at) = p.cut(cut);
    let left_at = p.wait_left(cut, cut_at);
    let lost_at = p.wait_event(cut, cut_at, "notice the lost connection", |e| matches!(e, Event::Disconnected { .. }));
    // The others mine on without it, so it has blocks to catch up on.
    p.wait_height(p.height(cut) + 2);
    let target = p.others_height(cut);

    let healed_at = p.heal(cut, proc);
    let back_at = p.wait_event(cut, healed_at, "reconnect", |e| matches!(e, Event::Connected { .. }));
    let rejoined_at = p.wait_rejoined(cut, healed_at);
    let caught_up_at = p.wait_caught_up(cut, target);
    p.wait_event(cut, healed_at, "mine again", |e| matches!(e, Event::MiningStarted { .. }));
    let h = p.min_height();
    p.wait_height(h + 2);
    p.assert_whole();

    println!(
        "miner partition: cut -> peer_left at all others {} ms (peer noticed after {} ms); \
         link up -> reconnected {} ms -> re-announced {} ms -> caught up to height {target} {} ms",
        left_at - cut_at,
        lost_at - cut_at,
        back_at - healed_at,
        rejoined_at - healed_at,
        caught_up_at - healed_at,
    );
    // A lost miner is no reason for an election, and the room never went back on a block.
    for i in 0..4 {
        let terms = p.terms(i);
        assert!(terms.iter().all(|&t| t == term), "peer #{i} saw another election: {terms:?}");
    }
    let records = p.records();
    assert_eq!(truncations(&records), 0, "nobody dropped a block");
    assert_invariants(&records);
    p.teardown();
}

#[test]
fn a_partitioned_controller_is_replaced_and_follows_the_new_term_when_the_link_returns() {
    let mut p = Partitioned::start(4);
    let (term, controller) = p.wait_controller(1);
    p.wait_height(2);

    let (proc, cut_at) = p.cut(controller);
    let left_at = p.wait_left(controller, cut_at);
    let (new_term, new_controller) = p.wait_controller(term + 1);
    assert_ne!(new_controller, controller);
    let challenge_at = p.first_challenge_after(term).expect("a challenge of the new term");
    let lost_at =
        p.wait_event(controller, cut_at, "notice the lost connection", |e| matches!(e, Event::Disconnected { .. }));
    // The new controller's room mines on, so the old controller falls behind.
    p.wait_height(p.height(controller) + 2);
    let target = p.others_height(controller);

    let healed_at = p.heal(controller, proc);
    let back_at = p.wait_event(controller, healed_at, "reconnect", |e| matches!(e, Event::Connected { .. }));
    let rejoined_at = p.wait_rejoined(controller, healed_at);
    // It learns of the newer term from the others' replies to its hello and follows it.
    let followed_at = p.wait_event(
        controller,
        healed_at,
        "follow the new term",
        |e| matches!(e, Event::ControllerElected { term: t, .. } if *t >= new_term),
    );
    let caught_up_at = p.wait_caught_up(controller, target);
    p.wait_event(
        controller,
        healed_at,
        "mine for the new controller",
        |e| matches!(e, Event::MiningStarted { term: t, .. } if *t >= new_term),
    );
    assert_eq!(p.wait_controller(new_term), (new_term, new_controller), "all four agree on the new controller");
    let h = p.min_height();
    p.wait_height(h + 2);
    p.assert_whole();

    let old = p.events_of(controller);
    println!(
        "controller partition: cut -> peer_left at all others {} ms -> first challenge of term {new_term} {} ms \
         (old controller noticed after {} ms); link up -> reconnected {} ms -> re-announced {} ms \
         -> follows term {new_term} {} ms -> caught up to height {target} {} ms; \
         old controller truncated its chain {} times",
        left_at - cut_at,
        challenge_at.saturating_sub(cut_at),
        lost_at - cut_at,
        back_at - healed_at,
        rejoined_at - healed_at,
        followed_at - healed_at,
        caught_up_at - healed_at,
        truncations(&old),
    );
    // Its return starts no election, and only its own unconfirmed suffix may have been dropped.
    for i in 0..4 {
        let terms = p.terms(i);
        assert!(terms.iter().all(|&t| t <= new_term), "peer #{i} saw a term after {new_term}: {terms:?}");
    }
    for i in p.others(controller) {
        assert_eq!(truncations(&p.events_of(i)), 0, "peer #{i} dropped a block the room had");
    }
    let chain = assert_invariants(&p.records());
    assert!(chain.iter().any(|b| b.term >= new_term), "the new controller's term added blocks");
    p.teardown();
}
