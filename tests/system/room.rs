//! A room of real processes for fault tests: one broker and peers, each peer writing its own
//! events file, with handles to kill, pause or restart any of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use peer::events::{Event, Record};
use peer::protocol::{PeerId, Term};

use crate::support::*;

pub struct Room {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The broker (rumqttd or Mosquitto); killed and restarted in place by the broker fault.
    pub broker: RunningBroker,
    pub peers: Vec<Option<Proc>>,
    pub files: Vec<PathBuf>,
    pub size: usize,
}

impl Room {
    /// Starts the embedded broker and `n` peers expecting a room of `n`.
    pub fn start(n: usize) -> Self {
        Self::start_with(Broker::Embedded, n)
    }

    /// Starts `broker` on a free port and `n` peers expecting a room of `n`.
    pub fn start_with(broker: Broker, n: usize) -> Self {
        let port = free_port();
        let broker = broker.start(port);
        let dir = tempfile::Builder::new()
            .prefix("hashvote-room")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir()
            .unwrap();
        let mut room = Room { dir, port, broker, peers: Vec::new(), files: Vec::new(), size: n };
        for _ in 0..n {
            room.add_peer();
        }
        room
    }

    /// Starts one more peer; returns its index.
    pub fn add_peer(&mut self) -> usize {
        let index = self.files.len();
        let file = self.dir.path().join(format!("peer{index}.jsonl"));
        let size = self.size.to_string();
        // A room of its own on the broker: even a peer that reached another test's broker would
        // not mix with that room.
        let prefix = self.prefix();
        let args =
            ["--room-size", &size, "--difficulty", "18", "--threads", "1", "--keepalive", "1", "--prefix", &prefix];
        self.peers.push(Some(start_peer(self.port, &file, &args)));
        self.files.push(file);
        index
    }

    /// The room's topic prefix (its peers' `--prefix`).
    pub fn prefix(&self) -> String {
        format!("hv{}r{}", std::process::id(), self.port)
    }

    pub fn records(&self) -> Vec<Record> {
        read_all(&self.files)
    }

    pub fn events_of(&self, index: usize) -> Vec<Record> {
        read_events(&self.files[index])
    }

    /// The client id peer `index` reported.
    pub fn id_of(&self, index: usize) -> Option<PeerId> {
        self.events_of(index).iter().find_map(|r| match r.event {
            Event::Started { client_id, .. } => Some(client_id),
            _ => None,
        })
    }

    pub fn index_of(&self, id: PeerId) -> Option<usize> {
        (0..self.files.len()).find(|&i| self.id_of(i) == Some(id))
    }

    pub fn alive(&self) -> Vec<usize> {
        (0..self.peers.len()).filter(|&i| self.peers[i].is_some()).collect()
    }

    /// Height of peer `index`'s chain according to its events.
    pub fn height(&self, index: usize) -> u64 {
        chains(&self.events_of(index)).values().next().map_or(0, |c| c.len() as u64)
    }

    /// The lowest height among live peers.
    pub fn min_height(&self) -> u64 {
        self.alive().into_iter().map(|i| self.height(i)).min().unwrap_or(0)
    }

    /// The controller peer `index` believes in for its latest term.
    pub fn controller_seen_by(&self, index: usize) -> Option<(Term, PeerId)> {
        controller_in(&self.events_of(index))
    }

    /// Waits until every live peer agrees on a controller of at least `term`; returns it.
    pub fn wait_controller(&self, min_term: Term, timeout: Duration) -> (Term, usize) {
        let (term, id) = wait_agreement(timeout, min_term, || self.alive(), |i| self.controller_seen_by(i));
        (term, self.index_of(id).expect("controller is one of ours"))
    }

    pub fn wait_height(&self, height: u64, timeout: Duration) {
        wait_until(timeout, &format!("every live peer at height {height}"), || self.min_height() >= height);
    }

    /// Kills peer `index` with SIGKILL.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut p) = self.peers[index].take() {
            p.signal(libc::SIGKILL);
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// Checks the room invariants over every event written so far.
    pub fn check(&self) -> Vec<SeenBlock> {
        assert_invariants(&self.records())
    }

    /// Failover times: from `t0_ms` to the first challenge of a term above `term`.
    pub fn first_challenge_after(&self, term: Term) -> Option<u64> {
        self.records()
            .iter()
            .filter_map(|r| match r.event {
                Event::ChallengeIssued { term: t, .. } if t > term => Some(r.ts_ms),
                _ => None,
            })
            .min()
    }

    /// Terms each peer saw elected, for asserting that no election happened.
    pub fn terms(&self) -> BTreeMap<usize, Vec<Term>> {
        (0..self.files.len())
            .map(|i| {
                let terms = self
                    .events_of(i)
                    .iter()
                    .filter_map(|r| match r.event {
                        Event::ControllerElected { term, .. } => Some(term),
                        _ => None,
                    })
                    .collect();
                (i, terms)
            })
            .collect()
    }
}
