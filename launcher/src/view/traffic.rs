//! The room's MQTT traffic in steady state, from the counts in the peers' statuses: messages each
//! peer published and was delivered, per second and per block.
//!
//! Each peer's window opens at its first status at a height of [`STEADY_FROM`] blocks or more
//! that names the controller of its term (catching up and the election are over), opens again
//! at each later term (an election is not the steady state), and closes at its latest status when
//! the run ends (before the peers are stopped); a window whose two ends are of different terms
//! does not count. Rates are over the peer's own clock between the two statuses,
//! and per block over the blocks its chain grew by meanwhile, so a status that arrives late
//! skews nothing.

use std::collections::BTreeMap;
use std::fmt;

use peer::protocol::PeerId;
use peer::status::{Role, Status};

/// The chain height from which a room counts as in steady state.
pub const STEADY_FROM: u64 = 5;

/// One peer's counts in one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    at_ms: u64,
    height: u64,
    published: u64,
    delivered: u64,
    incarnation: u64,
    term: u64,
}

impl Mark {
    /// Whether `s`, a status of the steady state, opens a new window after this one: another
    /// process, or another term.
    pub(crate) fn superseded_by(&self, s: &Status) -> bool {
        self.incarnation != s.incarnation || self.term != s.term
    }

    /// Whether `s` is of the steady state: high enough, its term's controller known.
    pub(crate) fn steady(s: &Status) -> bool {
        s.height >= STEADY_FROM && s.controller.is_some() && s.role != Role::Offline
    }

    pub(crate) fn of(s: &Status) -> Self {
        Self {
            at_ms: s.at_ms,
            height: s.height,
            published: s.published,
            delivered: s.delivered,
            incarnation: s.incarnation,
            term: s.term,
        }
    }
}

/// Per second and per block, over one peer's window or the mean of several.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Messages published per second.
    pub published_per_s: f64,
    /// Messages delivered per second.
    pub delivered_per_s: f64,
    /// Messages published per block.
    pub published_per_block: f64,
    /// Messages delivered per block.
    pub delivered_per_block: f64,
}

impl Rates {
    fn between(from: Mark, to: Mark) -> Option<Self> {
        let secs = to.at_ms.checked_sub(from.at_ms).filter(|&ms| ms > 0)? as f64 / 1000.0;
        let blocks = to.height.saturating_sub(from.height).max(1) as f64;
        let published = to.published.saturating_sub(from.published) as f64;
        let delivered = to.delivered.saturating_sub(from.delivered) as f64;
        Some(Self {
            published_per_s: published / secs,
            delivered_per_s: delivered / secs,
            published_per_block: published / blocks,
            delivered_per_block: delivered / blocks,
        })
    }

    fn mean(all: &[Self]) -> Self {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Self) -> f64| all.iter().map(f).sum::<f64>() / n;
        Self {
            published_per_s: sum(|r| r.published_per_s),
            delivered_per_s: sum(|r| r.delivered_per_s),
            published_per_block: sum(|r| r.published_per_block),
            delivered_per_block: sum(|r| r.delivered_per_block),
        }
    }
}

impl fmt::Display for Rates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published {:.1}/s ({:.2}/block), delivered {:.1}/s ({:.2}/block)",
            self.published_per_s, self.published_per_block, self.delivered_per_s, self.delivered_per_block
        )
    }
}

/// The room's steady-state traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    /// Peers with a window (statuses at both ends, same incarnation).
    pub peers: usize,
    /// The longest window, in seconds, and the most blocks one spanned.
    pub seconds: f64,
    /// Blocks over the longest window.
    pub blocks: u64,
    /// The mean over the peers other than the controller.
    pub miner: Rates,
    /// The miner delivered the most messages per second, and its rates.
    pub busiest_miner: Option<(PeerId, Rates)>,
    /// The controller at the end of the window, and its rates.
    pub controller: Option<(PeerId, Rates)>,
    /// The whole room: the sum of every peer's rates per second (per block: of the mean block).
    pub total: Rates,
}

impl Traffic {
    /// The traffic between each peer's `from` and `to` marks; `None` without a window.
    pub(crate) fn between(from: &BTreeMap<PeerId, Mark>, to: &BTreeMap<PeerId, (Mark, Role)>) -> Option<Self> {
        let mut miners = Vec::new();
        let mut busiest: Option<(PeerId, Rates)> = None;
        let mut controller = None;
        let (mut seconds, mut blocks) = (0.0f64, 0u64);
        let mut total = Rates::default();
        for (&id, &(end, role)) in to {
            let Some(&start) = from.get(&id).filter(|m| m.incarnation == end.incarnation && m.term == end.term) else {
                continue;
            };
            let Some(r) = Rates::between(start, end) else { continue };
            seconds = seconds.max(end.at_ms.saturating_sub(start.at_ms) as f64 / 1000.0);
            blocks = blocks.max(end.height.saturating_sub(start.height));
            total.published_per_s += r.published_per_s;
            total.delivered_per_s += r.delivered_per_s;
            total.published_per_block += r.published_per_block;
            total.delivered_per_block += r.delivered_per_block;
            if role == Role::Controller {
                controller = Some((id, r));
            } else {
                if busiest.is_none_or(|(_, b)| r.delivered_per_s > b.delivered_per_s) {
                    busiest = Some((id, r));
                }
                miners.push(r);
            }
        }
        let peers = miners.len() + usize::from(controller.is_some());
        (peers > 0).then(|| Self {
            peers,
            seconds,
            blocks,
            miner: Rates::mean(&miners),
            busiest_miner: busiest,
            controller,
            total,
        })
    }
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "traffic in steady state (from block {STEADY_FROM}; {} peers, {:.1} s, {} blocks), counted at the peers:",
            self.peers, self.seconds, self.blocks
        )?;
        writeln!(f, "  a miner (mean): {}", self.miner)?;
        if let Some((id, r)) = self.busiest_miner {
            writeln!(f, "  busiest miner ({id}): {r}")?;
        }
        if let Some((id, r)) = self.controller {
            writeln!(f, "  the controller ({id}): {r}")?;
        }
        write!(f, "  the room: {}", self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(at_ms: u64, height: u64, published: u64, delivered: u64) -> Mark {
        Mark { at_ms, height, published, delivered, incarnation: 7, term: 1 }
    }

    #[test]
    fn rates_are_over_each_peers_own_window() {
        let from = BTreeMap::from([(1, mark(1_000, 5, 10, 100)), (2, mark(1_500, 6, 10, 50)), (3, mark(900, 5, 0, 0))]);
        let to = BTreeMap::from([
            (1, (mark(3_000, 15, 30, 140), Role::Miner)),
            (2, (mark(2_500, 11, 15, 70), Role::Miner)),
            (3, (mark(2_900, 15, 40, 400), Role::Controller)),
            // No start: not counted.
            (4, (mark(2_900, 15, 40, 400), Role::Miner)),
        ]);
        let t = Traffic::between(&from, &to).expect("a window");
        assert_eq!(t.peers, 3);
        assert_eq!((t.seconds, t.blocks), (2.0, 10));
        // Peer 1: 20 published, 40 delivered over 2 s and 10 blocks; peer 2: 5 and 20 over 1 s, 5 blocks.
        assert_eq!(t.miner.delivered_per_s, (20.0 + 20.0) / 2.0);
        assert_eq!(t.miner.published_per_block, (2.0 + 1.0) / 2.0);
        let (controller, c) = t.controller.expect("the controller");
        assert_eq!((controller, c.delivered_per_s, c.delivered_per_block), (3, 200.0, 40.0));
        assert_eq!(t.total.published_per_s, 10.0 + 5.0 + 20.0);
        assert_eq!(t.busiest_miner.map(|(id, _)| id), Some(1));
    }

    #[test]
    fn a_restarted_peer_a_new_term_or_an_empty_window_counts_for_nothing() {
        let from = BTreeMap::from([
            (1, Mark { incarnation: 8, ..mark(1_000, 5, 0, 0) }),
            (2, mark(2_000, 5, 0, 0)),
            (3, mark(1_000, 5, 0, 0)),
        ]);
        let to = BTreeMap::from([
            (1, (mark(3_000, 9, 5, 5), Role::Miner)),
            (2, (mark(2_000, 5, 0, 0), Role::Miner)),
            (3, (Mark { term: 2, ..mark(3_000, 9, 5, 5) }, Role::Miner)),
        ]);
        assert_eq!(Traffic::between(&from, &to), None);
    }
}
