//! What the lab node asks a miner to do and what a miner reports back, and the search one mining
//! thread runs (the peer's `lab::miner` runs it on its threads).
//!
//! The lab's proof of work hashes a free-form string, not hashvote's fixed binary preimage, so the
//! kernels of [`crate::pow`] do not apply. [`search`] hashes `<prefix><16 hex digits of a
//! counter>`, with the SHA-1 state of the prefix computed once; at most 55 bytes keep every
//! candidate to one compression.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha1::{Digest as _, Sha1};

use crate::pow::Digest as PowDigest;

/// Candidates between checks of the stop flag: well under a millisecond at any speed.
pub const BATCH: u64 = 1 << 10;

/// Something to mine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabJob {
    /// The transaction.
    pub tx: u64,
    /// Leading zero bits required.
    pub difficulty: u32,
}

/// A solution found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabFound {
    /// The transaction.
    pub tx: u64,
    /// The solution string.
    pub solution: String,
    /// The counter that gave it (for the event stream).
    pub counter: u64,
    /// Candidates tried for this job by all threads (counted per batch).
    pub hashes: u64,
    /// Milliseconds from the start of the job.
    pub elapsed_ms: u64,
}

/// Searches `prefix` + 16 hex digits until a digest has `difficulty` leading zero bits or `stop`
/// is set; returns the solution and its counter.
pub fn search(prefix: &str, difficulty: u32, stop: &AtomicBool, hashes: &AtomicU64) -> Option<(String, u64)> {
    let base = Sha1::new_with_prefix(prefix.as_bytes());
    let mut digits = [b'0'; 16];
    let mut n: u64 = 0;
    loop {
        for _ in 0..BATCH {
            hex16(n, &mut digits);
            let digest = base.clone().chain_update(digits).finalize();
            if PowDigest::Sha1(digest.into()).leading_zeros() >= difficulty {
                hashes.fetch_add(n % BATCH + 1, Ordering::Relaxed);
                // Hex digits are ASCII.
                return Some((format!("{prefix}{}", String::from_utf8_lossy(&digits)), n));
            }
            n = n.wrapping_add(1);
        }
        hashes.fetch_add(BATCH, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            return None;
        }
    }
}

fn hex16(mut n: u64, out: &mut [u8; 16]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for d in out.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}
