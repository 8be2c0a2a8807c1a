//! The pace of the chain: how a controller sets each challenge's difficulty, by a rule that
//! every peer can recompute from the chain it holds.
//!
//! Three policies: a fixed difficulty; the lab's random range (any difficulty within bounds); and
//! retargeting, which (like Bitcoin's) moves the difficulty towards a target block interval using
//! the solve times recorded in the last blocks, by at most one bit (a factor of two) per block.
//!
//! The pace reads the chain through [`Paced`]: the protocol's blocks carry a [`Pace`] and implement
//! [`Paced`], so the protocol depends on this module and not the other way round.

use serde::{Deserialize, Serialize};

/// Blocks whose solve times the retarget rule averages.
pub const WINDOW: usize = 4;

/// What the pace needs of a mined block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Solve {
    /// The difficulty it was mined at.
    pub difficulty: u8,
    /// How long it took to solve, in milliseconds (at least 1).
    pub ms: u64,
}

/// A block of the chain, as the pace sees it.
pub trait Paced {
    /// Its difficulty and solve time if it was mined; `None` for a change of members, which has
    /// no solve time.
    fn solve(&self) -> Option<Solve>;
}

/// A difficulty policy, carried by every challenge and block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pace {
    /// Always this difficulty.
    Fixed(u8),
    /// Any difficulty in `lo..=hi`, picked at random by the controller (the lab's way).
    Range {
        /// Lowest difficulty.
        lo: u8,
        /// Highest difficulty.
        hi: u8,
    },
    /// Move towards blocks every `target_ms`, starting at `start`, staying within `lo..=hi`.
    Retarget {
        /// Target block interval in milliseconds.
        target_ms: u32,
        /// Difficulty of the first block.
        start: u8,
        /// Lowest difficulty.
        lo: u8,
        /// Highest difficulty.
        hi: u8,
    },
}

impl Pace {
    /// The bounds any difficulty of this policy lies in.
    pub fn bounds(&self) -> (u8, u8) {
        match *self {
            Self::Fixed(d) => (d, d),
            Self::Range { lo, hi } | Self::Retarget { lo, hi, .. } => (lo, hi),
        }
    }

    /// True when the policy is well formed (bounds ordered and at most `max`).
    pub fn is_valid(&self, max: u8) -> bool {
        let (lo, hi) = self.bounds();
        let start_ok = match *self {
            Self::Retarget { start, target_ms, .. } => (lo..=hi).contains(&start) && target_ms > 0,
            _ => true,
        };
        lo <= hi && hi <= max && start_ok
    }

    /// The difficulty the next block on top of `chain` must have, or `None` when the policy
    /// leaves the choice to the controller (a range).
    pub fn next(&self, chain: &[impl Paced]) -> Option<u8> {
        match *self {
            Self::Fixed(d) => Some(d),
            Self::Range { .. } => None,
            Self::Retarget { target_ms, start, lo, hi } => {
                // Only mined blocks: a change of members has no solve time.
                let recent: Vec<Solve> = chain.iter().rev().filter_map(Paced::solve).take(WINDOW).collect();
                let Some(last) = recent.first() else { return Some(start) };
                let total: u64 = recent.iter().map(|s| s.ms).sum();
                let mean = total as f64 / recent.len() as f64;
                // One bit doubles the expected work: step by the rounded log2 of the ratio, capped
                // at one bit per block so the difficulty moves smoothly.
                let step = (f64::from(target_ms) / mean).log2().round().clamp(-1.0, 1.0) as i16;
                Some((i16::from(last.difficulty) + step).clamp(i16::from(lo), i16::from(hi)) as u8)
            }
        }
    }

    /// Checks that `difficulty` is what this policy allows on top of `chain`.
    pub fn allows(&self, chain: &[impl Paced], difficulty: u8) -> bool {
        let (lo, hi) = self.bounds();
        match self.next(chain) {
            Some(d) => d == difficulty,
            None => (lo..=hi).contains(&difficulty),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mined block, or (`None`) a change of members.
    struct Block(Option<Solve>);

    impl Paced for Block {
        fn solve(&self) -> Option<Solve> {
            self.0
        }
    }

    fn block(difficulty: u8, solve_ms: u64) -> Block {
        Block(Some(Solve { difficulty, ms: solve_ms }))
    }

    /// An empty chain.
    const EMPTY: &[Block] = &[];

    #[test]
    fn fixed_and_range_policies() {
        assert_eq!(Pace::Fixed(12).next(EMPTY), Some(12));
        assert!(Pace::Fixed(12).allows(EMPTY, 12) && !Pace::Fixed(12).allows(EMPTY, 13));
        let range = Pace::Range { lo: 10, hi: 20 };
        assert_eq!(range.next(EMPTY), None);
        assert!(
            range.allows(EMPTY, 10) && range.allows(EMPTY, 20) && !range.allows(EMPTY, 21) && !range.allows(EMPTY, 9)
        );
    }

    #[test]
    fn retarget_moves_one_bit_at_most_towards_the_target_and_stays_in_bounds() {
        let pace = Pace::Retarget { target_ms: 1000, start: 20, lo: 8, hi: 22 };
        assert_eq!(pace.next(EMPTY), Some(20));
        // Far too fast: one bit up, not more.
        assert_eq!(pace.next(&[block(20, 10)]), Some(21));
        // Far too slow: one bit down.
        assert_eq!(pace.next(&[block(20, 60_000)]), Some(19));
        // On target (within a factor of sqrt 2): unchanged.
        assert_eq!(pace.next(&[block(20, 1200), block(20, 800)]), Some(20));
        // Bounds hold.
        assert_eq!(pace.next(&[block(22, 1)]), Some(22));
        assert_eq!(pace.next(&[block(8, 100_000)]), Some(8));
        // Only the last WINDOW blocks count.
        let mut chain: Vec<Block> = (0..10).map(|_| block(20, 100_000)).collect();
        chain.extend((0..WINDOW).map(|_| block(20, 1000)));
        assert_eq!(pace.next(&chain), Some(20));
        // Changes of members have no solve time: they neither count nor push mined blocks out.
        chain.push(Block(None));
        assert_eq!(pace.next(&chain), Some(20));
    }

    #[test]
    fn validity() {
        assert!(Pace::Range { lo: 10, hi: 20 }.is_valid(160));
        assert!(!Pace::Range { lo: 21, hi: 20 }.is_valid(160));
        assert!(!Pace::Fixed(200).is_valid(160));
        assert!(!Pace::Retarget { target_ms: 0, start: 10, lo: 1, hi: 20 }.is_valid(160));
        assert!(!Pace::Retarget { target_ms: 5, start: 30, lo: 1, hi: 20 }.is_valid(160));
    }
}
