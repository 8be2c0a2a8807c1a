//! A room across machines: four network namespaces stand for four hosts, each with a network
//! stack and an address of its own. The broker's host runs `launcher broker` bound to 0.0.0.0
//! with a login; three peer hosts run two peers each, pointed at the broker's address with
//! `--host`. Each peer host is linked to the broker's host by a veth pair (a point-to-point /30 of
//! its own, and a route to the broker's address), so their traffic really crosses an interface.
//!
//! Then the controller's host is lost as a machine is: its link goes down (nothing it sends, not
//! even the kernel's FIN or RST, reaches the broker any more) and every process on it dies. The
//! broker notices its peers only by their keepalives; the other hosts' peers, four of the room's
//! six (a quorum), must elect a new controller among themselves and mine on. (Had the lost host
//! held half the room, the rest would rightly wait for a quorum.)
//!
//! Needs root and iproute2, like the partition tests ([`Netns::new`] fails the test without them).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use peer::events::{Event, Record, now_ms};
use peer::protocol::{PeerId, Term};

use crate::netns::{Netns, ip_ok, kill_all_in, netns_list, start_broker_in, start_peer_in};
use crate::support::*;

const T: Duration = Duration::from_secs(60);

/// The broker's address: on its host's loopback, reached from each peer host by a route through
/// that host's own link (as a server's address is reached over a network).
const BROKER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// Fixed: the broker's namespace is fresh and private to this test.
const BROKER_PORT: u16 = 1883;
const USER: &str = "multihost";
const PASSWORD: &str = "two-hosts-and-a-broker";
/// Peers per peer host.
const PER_HOST: usize = 2;

/// The peer hosts: their namespace tag and the /30 of their link (x.x.n.1 the broker's end,
/// x.x.n.2 theirs).
const HOSTS: [(&str, u8); 3] = [("A", 1), ("C", 2), ("D", 3)];

/// Three hosts: the broker's and two with peers.
struct Hosts {
    broker_ns: String,
    /// Namespace of each peer host, in [`HOSTS`] order.
    peer_ns: Vec<String>,
    netns: Netns,
}

impl Hosts {
    fn new() -> Self {
        let mut netns = Netns::new();
        let b = netns.add("B");
        ip_ok(&["-n", &b, "addr", "add", &format!("{BROKER_ADDR}/32"), "dev", "lo"]);
        let mut peer_ns = Vec::new();
        for (tag, net) in HOSTS {
            let ns = netns.add(tag);
            let link = link_dev(tag);
            let (ours, theirs) = (format!("10.78.{net}.1"), format!("10.78.{net}.2"));
            // Both ends are born inside our namespaces: nothing appears in the host's.
            ip_ok(&["-n", &b, "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip_ok(&["-n", &b, "addr", "add", &format!("{ours}/30"), "dev", &link]);
            ip_ok(&["-n", &b, "link", "set", &link, "up"]);
            ip_ok(&["-n", &ns, "addr", "add", &format!("{theirs}/30"), "dev", "eth0"]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip_ok(&["-n", &ns, "route", "add", &format!("{BROKER_ADDR}/32"), "via", &ours]);
            peer_ns.push(ns);
        }
        Self { broker_ns: b, peer_ns, netns }
    }

    /// The host's machine dies: its link goes down at the broker's end first (so not even the
    /// kernel's goodbye for the dying processes gets through), then everything on it is killed.
    /// Returns how many processes were killed.
    fn lose(&self, host: usize) -> usize {
        ip_ok(&["-n", &self.broker_ns, "link", "set", &link_dev(HOSTS[host].0), "down"]);
        kill_all_in(&self.peer_ns[host])
    }
}

/// The broker host's end of a peer host's link.
fn link_dev(tag: &str) -> String {
    format!("to{tag}")
}

/// The room: peers `host * PER_HOST ..` run on peer host `host`.
struct Room {
    /// Declared first so they drop before the namespaces go. `None` once their host is lost.
    peers: Vec<Option<Proc>>,
    broker: Proc,
    hosts: Hosts,
    files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Room {
    fn start() -> Self {
        let hosts = Hosts::new();
        let broker = start_broker_in(&hosts.broker_ns, "0.0.0.0", BROKER_PORT, Some((USER, PASSWORD)));
        let dir = tempfile::Builder::new()
            .prefix("hashvote-multihost")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir()
            .unwrap();
        let n = HOSTS.len() * PER_HOST;
        let files: Vec<_> = (0..n).map(|i| dir.path().join(format!("peer{i}.jsonl"))).collect();
        let peers = (0..n)
            .map(|i| {
                Some(start_peer_in(
                    &hosts.peer_ns[i / PER_HOST],
                    (BROKER_ADDR, BROKER_PORT),
                    &files[i],
                    n,
                    Some((USER, PASSWORD)),
                ))
            })
            .collect();
        Self { peers, broker, hosts, files, _dir: dir }
    }

    fn events_of(&self, index: usize) -> Vec<Record> {
        read_events(&self.files[index])
    }

    fn records(&self) -> Vec<Record> {
        read_all(&self.files)
    }

    fn id_of(&self, index: usize) -> Option<PeerId> {
        self.events_of(index).iter().find_map(|r| match r.event {
            Event::Started { client_id, .. } => Some(client_id),
            _ => None,
        })
    }

    fn running(&self) -> Vec<usize> {
        (0..self.peers.len()).filter(|&i| self.peers[i].is_some()).collect()
    }

    fn height(&self, index: usize) -> u64 {
        chains(&self.events_of(index)).values().next().map_or(0, |c| c.len() as u64)
    }

    fn min_height(&self) -> u64 {
        self.running().into_iter().map(|i| self.height(i)).min().unwrap_or(0)
    }

    fn wait_height(&self, height: u64) {
        wait_until(T, &format!("every running peer at height {height}"), || self.min_height() >= height);
    }

    fn controller_seen_by(&self, index: usize) -> Option<(Term, PeerId)> {
        controller_in(&self.events_of(index))
    }

    /// Waits until every running peer agrees on a controller of at least `min_term`; returns the
    /// term and the controller's index.
    fn wait_controller(&self, min_term: Term) -> (Term, usize) {
        let (term, id) = wait_agreement(T, min_term, || self.running(), |i| self.controller_seen_by(i));
        let index = (0..self.files.len()).find(|&i| self.id_of(i) == Some(id)).expect("the controller is ours");
        (term, index)
    }

    /// Loses peer host `host` (see [`Hosts::lose`]) and reaps its peers.
    fn lose_host(&mut self, host: usize) -> usize {
        let killed = self.hosts.lose(host);
        for i in host * PER_HOST..(host + 1) * PER_HOST {
            let mut proc = self.peers[i].take().expect("a running peer");
            proc.wait_exit(Duration::from_secs(10));
        }
        killed
    }

    /// Stops everything and checks that no process and no namespace of this test survived.
    fn teardown(self) {
        let pids: Vec<u32> = self.peers.iter().flatten().chain([&self.broker]).map(Proc::pid).collect();
        let names = self.hosts.netns.names.clone();
        drop(self);
        for pid in pids {
            assert!(!alive(pid), "process {pid} outlived the test");
        }
        let left: Vec<String> = netns_list().into_iter().filter(|n| names.contains(n)).collect();
        assert!(left.is_empty(), "network namespaces outlived the test: {left:?}");
    }
}

#[test]
fn a_room_across_four_hosts_elects_mines_and_survives_the_loss_of_the_controllers_host() {
    let mut room = Room::start();
    let (term, controller) = room.wait_controller(1);
    room.wait_height(2);
    // Every peer reached the broker over its host's link, at the broker's own address.
    for i in 0..room.files.len() {
        let connected = room.events_of(i).iter().find_map(|r| match &r.event {
            Event::Connected { broker } => Some(broker.clone()),
            _ => None,
        });
        assert_eq!(connected, Some(format!("{BROKER_ADDR}:{BROKER_PORT}")), "peer #{i}");
    }

    let lost = controller / PER_HOST;
    let survivors: Vec<usize> = (0..room.files.len()).filter(|&i| i / PER_HOST != lost).collect();
    let lost_at = now_ms();
    let killed = room.lose_host(lost);
    assert_eq!(killed, PER_HOST, "every peer of the controller's host was killed");

    let (new_term, new_controller) = room.wait_controller(term + 1);
    assert!(survivors.contains(&new_controller), "the new controller (#{new_controller}) is on the surviving host");
    let first_challenge = room
        .records()
        .iter()
        .filter_map(|r| match r.event {
            Event::ChallengeIssued { term: t, .. } if t > term => Some(r.ts_ms),
            _ => None,
        })
        .min()
        .expect("a challenge of the new term");
    let h = room.min_height();
    room.wait_height(h + 3);
    println!(
        "lost host {} (controller #{controller}, term {term}): first challenge of term {new_term} from #{new_controller} \
         after {} ms; the surviving host's peers went from height {h} to {}",
        HOSTS[lost].0,
        first_challenge.saturating_sub(lost_at),
        room.min_height()
    );
    let chain = assert_invariants(&room.records());
    assert!(chain.iter().any(|b| b.term >= new_term), "the new controller's term added blocks");
    assert!(room.broker.child.try_wait().expect("try_wait").is_none(), "the broker runs on");
    room.teardown();
}
