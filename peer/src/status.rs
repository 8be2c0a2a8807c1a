//! When a peer publishes its status: the [`Schedule`], driven by the peer's clock.
//!
//! The status itself (its fields, codec and topic) is the core's ([`hashvote_core::status`],
//! re-exported here).

use std::time::Instant;

pub use hashvote_core::status::*;

use crate::protocol::{PeerId, Term, TxId};

/// When a peer publishes its status, and its hash rate between publications. Pure logic: the
/// owner passes the time and the miner's counter.
#[derive(Debug, Default)]
pub struct Schedule {
    /// What the last published status showed, and when it went out.
    last: Option<(Shown, Instant)>,
    /// The miner's counter at the start of the current hash-rate interval.
    sample: Option<(u64, Instant)>,
    hash_rate: u64,
}

/// The fields whose change is worth a status of its own.
type Shown = (Role, Term, Option<PeerId>, Option<TxId>);

fn shown(s: &Status) -> Shown {
    (s.role, s.term, s.controller, s.tx)
}

impl Schedule {
    /// Whether `status` is due at `now`: nothing published yet, the role, term or controller
    /// changed, the open transaction changed and [`STATUS_MIN_GAP`] passed, or
    /// [`STATUS_INTERVAL`] passed.
    pub fn due(&self, status: &Status, now: Instant) -> bool {
        let Some(((role, term, controller, tx), at)) = self.last else { return true };
        let since = now.saturating_duration_since(at);
        (status.role, status.term, status.controller) != (role, term, controller)
            || (status.tx != tx && since >= STATUS_MIN_GAP)
            || since >= STATUS_INTERVAL
    }

    /// Records that `status` went out at `now`.
    pub fn published(&mut self, status: &Status, now: Instant) {
        self.last = Some((shown(status), now));
    }

    /// Feeds the miner's running count of hashes at `now`; returns the hashes per second over the
    /// last complete interval of at least [`STATUS_INTERVAL`] (0 until there is one).
    pub fn hash_rate(&mut self, total_hashes: u64, now: Instant) -> u64 {
        match self.sample {
            None => self.sample = Some((total_hashes, now)),
            Some((hashes, at)) => {
                let elapsed = now.saturating_duration_since(at);
                if elapsed >= STATUS_INTERVAL {
                    let done = u128::from(total_hashes.saturating_sub(hashes));
                    self.hash_rate = u64::try_from(done * 1000 / elapsed.as_millis().max(1)).unwrap_or(u64::MAX);
                    self.sample = Some((total_hashes, now));
                }
            }
        }
        self.hash_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Status {
        Status {
            version: VERSION,
            id: 42,
            incarnation: 7,
            role: Role::Miner,
            term: 3,
            controller: Some(9),
            height: 12,
            tx: Some(12),
            difficulty: Some(20),
            hash_rate: 70_000_000,
            hashes: 1 << 40,
            mining_ms: 60_000,
            blocks_won: 4,
            published: 0,
            delivered: 0,
            threads: 2,
            started_ms: 1_000,
            at_ms: 5_000,
            waiting: None,
        }
    }

    #[test]
    fn changes_go_out_at_once_a_new_transaction_at_most_every_gap_and_anything_every_interval() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut sched = Schedule::default();
        let s = sample();
        assert!(sched.due(&s, t0), "the first status");
        sched.published(&s, t0);
        assert!(!sched.due(&s, ms(10)));
        assert!(sched.due(&Status { term: 4, ..s.clone() }, ms(10)), "a new term");
        assert!(sched.due(&Status { role: Role::Electing, controller: None, ..s.clone() }, ms(10)), "an election");
        let next = Status { tx: Some(13), ..s.clone() };
        assert!(!sched.due(&next, ms(50)), "a new transaction waits for the gap");
        assert!(sched.due(&next, ms(100)));
        assert!(!sched.due(&s, ms(999)));
        assert!(sched.due(&s, ms(1000)), "once a second");
    }

    #[test]
    fn the_hash_rate_is_measured_over_whole_intervals() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut sched = Schedule::default();
        assert_eq!(sched.hash_rate(1_000, t0), 0);
        assert_eq!(sched.hash_rate(5_000, ms(500)), 0, "no whole interval yet");
        assert_eq!(sched.hash_rate(3_001_000, ms(2000)), 1_500_000);
        assert_eq!(sched.hash_rate(3_001_000, ms(2500)), 1_500_000, "kept until the next interval");
        assert_eq!(sched.hash_rate(3_001_000, ms(3000)), 0, "idle");
    }
}
