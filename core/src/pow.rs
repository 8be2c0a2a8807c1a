//! Proof of work: hash functions, the preimage layout, and the leading-zero-bits rule.
//!
//! A solution proves work over `(previous block hash, transaction id, miner id, nonce)`, laid out as
//! `prev || tx (u64 BE) || miner (u32 BE) || nonce (u64 BE)`: 40 bytes for SHA-1, 52 for SHA-256.
//! Both fit one 64-byte block with its padding, so every candidate costs exactly one compression and
//! the miner only rewrites the last 8 message bytes between candidates.
//!
//! [`Template::search`] runs on the fastest [`Kernel`] this CPU has: on x86-64 with the SHA
//! extensions, several candidates interleaved with the nonce kept in registers (`kernel`);
//! elsewhere, one candidate at a time through the sha1/sha2 crates' `compress`. Both return the
//! same nonce for the same input.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha1::digest::generic_array::GenericArray;

#[cfg(target_arch = "x86_64")]
mod kernel;

/// The hash function of a room's proof of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlg {
    /// SHA-1, as in the lab (the default).
    Sha1,
    /// SHA-256.
    Sha256,
}

impl HashAlg {
    /// Digest length in bits.
    pub fn bits(self) -> u32 {
        match self {
            Self::Sha1 => 160,
            Self::Sha256 => 256,
        }
    }

    /// Lower-case name, as used in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
        }
    }
}

impl std::str::FromStr for HashAlg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            other => Err(format!("unknown hash '{other}' (expected sha1 or sha256)")),
        }
    }
}

/// A digest of either hash function. The variant is the algorithm, so a digest can never be
/// compared against one of the wrong length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Digest {
    /// A SHA-1 digest.
    Sha1([u8; 20]),
    /// A SHA-256 digest.
    Sha256([u8; 32]),
}

impl Digest {
    /// The all-zero digest: the `prev` of block 0.
    pub fn zero(alg: HashAlg) -> Self {
        match alg {
            HashAlg::Sha1 => Self::Sha1([0; 20]),
            HashAlg::Sha256 => Self::Sha256([0; 32]),
        }
    }

    /// The digest of `bytes` (any length) with `alg`.
    pub fn of(alg: HashAlg, bytes: &[u8]) -> Self {
        use sha1::Digest as _;
        match alg {
            HashAlg::Sha1 => Self::Sha1(sha1::Sha1::digest(bytes).into()),
            HashAlg::Sha256 => Self::Sha256(sha2::Sha256::digest(bytes).into()),
        }
    }

    /// The algorithm this digest belongs to.
    pub fn alg(&self) -> HashAlg {
        match self {
            Self::Sha1(_) => HashAlg::Sha1,
            Self::Sha256(_) => HashAlg::Sha256,
        }
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Sha1(b) => b,
            Self::Sha256(b) => b,
        }
    }

    /// Number of leading zero bits, reading the digest as a big-endian number.
    pub fn leading_zeros(&self) -> u32 {
        let bytes = self.as_bytes();
        match bytes.iter().position(|&b| b != 0) {
            Some(i) => i as u32 * 8 + bytes[i].leading_zeros(),
            None => bytes.len() as u32 * 8,
        }
    }

    /// Hex encoding, for logs and events.
    pub fn to_hex(&self) -> String {
        hex::encode(self.as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg().name(), self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// True when the digest, given as its big-endian state words, has at least `difficulty` leading
/// zero bits. Works on the raw compression state so the miner never serializes a losing candidate.
#[inline(always)]
pub fn meets_words(words: &[u32], difficulty: u32) -> bool {
    let full = (difficulty / 32) as usize;
    let rest = difficulty % 32;
    if full > words.len() || (full == words.len() && rest > 0) {
        return false;
    }
    words[..full].iter().all(|&w| w == 0) && (rest == 0 || words[full].leading_zeros() >= rest)
}

/// The fixed part of a proof of work: everything but the nonce, already padded into one block.
#[derive(Clone, Copy)]
pub struct Template {
    alg: HashAlg,
    block: [u8; 64],
    nonce_at: usize,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Template").field("alg", &self.alg).field("nonce_at", &self.nonce_at).finish()
    }
}

const SHA1_IV: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
const SHA256_IV: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

impl Template {
    /// The template for mining transaction `tx` on top of `prev` as `miner`.
    pub fn new(prev: &Digest, tx: u64, miner: u32) -> Self {
        let mut block = [0u8; 64];
        let p = prev.as_bytes();
        block[..p.len()].copy_from_slice(p);
        let mut at = p.len();
        block[at..at + 8].copy_from_slice(&tx.to_be_bytes());
        at += 8;
        block[at..at + 4].copy_from_slice(&miner.to_be_bytes());
        at += 4;
        let nonce_at = at;
        let len = nonce_at + 8;
        block[len] = 0x80;
        block[56..].copy_from_slice(&((len as u64) * 8).to_be_bytes());
        Self { alg: prev.alg(), block, nonce_at }
    }

    /// The hash function of this template.
    pub fn alg(&self) -> HashAlg {
        self.alg
    }

    /// The unpadded preimage for `nonce` (what an ordinary `digest` call would hash).
    pub fn preimage(&self, nonce: u64) -> Vec<u8> {
        let mut m = self.block[..self.nonce_at + 8].to_vec();
        m[self.nonce_at..].copy_from_slice(&nonce.to_be_bytes());
        m
    }

    /// The digest for `nonce`.
    pub fn digest(&self, nonce: u64) -> Digest {
        let mut block = self.block;
        block[self.nonce_at..self.nonce_at + 8].copy_from_slice(&nonce.to_be_bytes());
        match self.alg {
            HashAlg::Sha1 => {
                let mut s = SHA1_IV;
                sha1::compress(&mut s, &[block.into()]);
                let mut out = [0u8; 20];
                for (o, w) in out.chunks_exact_mut(4).zip(s) {
                    o.copy_from_slice(&w.to_be_bytes());
                }
                Digest::Sha1(out)
            }
            HashAlg::Sha256 => {
                let mut s = SHA256_IV;
                sha2::compress256(&mut s, &[block.into()]);
                let mut out = [0u8; 32];
                for (o, w) in out.chunks_exact_mut(4).zip(s) {
                    o.copy_from_slice(&w.to_be_bytes());
                }
                Digest::Sha256(out)
            }
        }
    }

    /// Searches nonces `start..start + count` (saturating at `u64::MAX`, which is never tried)
    /// for one meeting `difficulty`, on the fastest [`Kernel`] available.
    ///
    /// Returns the *first* qualifying nonce in increasing order, so the answer does not depend on
    /// the kernel or the CPU.
    pub fn search(&self, difficulty: u32, start: u64, count: u64) -> Option<u64> {
        self.search_with(Kernel::best(), difficulty, start, count)
    }

    /// [`search`](Self::search) on a chosen kernel. A kernel this CPU lacks
    /// ([`Kernel::is_available`]) falls back to [`Kernel::Portable`].
    pub fn search_with(&self, kernel: Kernel, difficulty: u32, start: u64, count: u64) -> Option<u64> {
        let end = start.saturating_add(count);
        if difficulty == 0 {
            return (start < end).then_some(start);
        }
        // Segments in which the high 32 bits of the nonce are fixed: only one message word
        // changes between candidates, and it never carries into the other.
        let mut n = start;
        while n < end {
            let len = (end - n).min((1 << 32) - (n & 0xFFFF_FFFF));
            if let Some(found) = self.search_segment(kernel, difficulty, n, len) {
                return Some(found);
            }
            n += len;
        }
        None
    }

    /// Searches `start..start + len`, which must not cross a multiple of 2^32.
    fn search_segment(&self, kernel: Kernel, difficulty: u32, start: u64, len: u64) -> Option<u64> {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::ShaNi && kernel::available() {
            return self.search_sha_ni(difficulty, start, len);
        }
        let _ = kernel; // only one kernel on this architecture
        match self.alg {
            HashAlg::Sha1 => self.search_portable(SHA1_IV, sha1::compress, difficulty, start, len),
            HashAlg::Sha256 => self.search_portable(SHA256_IV, sha2::compress256, difficulty, start, len),
        }
    }

    /// [`search_segment`](Self::search_segment) on the SHA extensions: the kernel finds the first
    /// group of lanes that may hold a solution, the portable path picks the exact one.
    #[cfg(target_arch = "x86_64")]
    fn search_sha_ni(&self, difficulty: u32, start: u64, len: u64) -> Option<u64> {
        let lanes = Kernel::ShaNi.lanes(self.alg) as u64;
        let threshold = kernel::threshold(difficulty);
        // The kernel wants groups starting at a multiple of the lanes; the few before go one by one.
        let head = ((lanes - start % lanes) % lanes).min(len);
        if let Some(found) = self.search_segment(Kernel::Portable, difficulty, start, head) {
            return Some(found);
        }
        let mut done = head;
        while len - done >= lanes {
            let at = start + done;
            let mut block = self.block;
            block[self.nonce_at..self.nonce_at + 8].copy_from_slice(&at.to_be_bytes());
            // At most 2^32 / lanes groups: the segment is at most 2^32 long.
            let groups = u32::try_from((len - done) / lanes).unwrap_or(u32::MAX);
            // SAFETY: search_segment only calls this after kernel::available() confirmed sha,
            // sse2, ssse3 and sse4.1. (The groups start on a multiple of the lanes and stay inside
            // the segment, so the low word does not wrap: needed for a right answer, not safety.)
            let hit = unsafe {
                match self.alg {
                    HashAlg::Sha1 => kernel::sha1_scan(&block, groups, threshold),
                    HashAlg::Sha256 => kernel::sha256_scan(&block, groups, threshold),
                }
            };
            match hit {
                Some(group) => {
                    let first = at + u64::from(group) * lanes;
                    if let Some(found) = self.search_segment(Kernel::Portable, difficulty, first, lanes) {
                        return Some(found);
                    }
                    done += (u64::from(group) + 1) * lanes;
                }
                None => done += u64::from(groups) * lanes,
            }
        }
        if done < len { self.search_segment(Kernel::Portable, difficulty, start + done, len - done) } else { None }
    }

    /// One candidate at a time through a crate's compression function. The changing low nonce
    /// word is written together with the 12 bytes around it in one 16-byte store: the
    /// compression reads the block 16 bytes at a time, and a narrower store could not be
    /// forwarded to that read, making every candidate wait for the previous one.
    fn search_portable<const W: usize>(
        &self,
        iv: [u32; W],
        compress: impl Fn(&mut [u32; W], &[GenericArray<u8, sha1::digest::consts::U64>]),
        difficulty: u32,
        start: u64,
        len: u64,
    ) -> Option<u64> {
        let mut block = self.block;
        block[self.nonce_at..self.nonce_at + 8].copy_from_slice(&start.to_be_bytes());
        let mut chunks = Chunks([[0; 16]; 4]);
        for (chunk, bytes) in chunks.0.iter_mut().zip(block.chunks_exact(16)) {
            chunk.copy_from_slice(bytes);
        }
        // The low nonce word: bytes 36..40 (SHA-1) or 48..52 (SHA-256), inside one 16-byte chunk.
        let low_at = self.nonce_at + 4;
        let (c, shift) = (low_at / 16, 8 * (low_at % 16));
        let around = u128::from_le_bytes(chunks.0[c]) & !(0xFFFF_FFFF_u128 << shift);
        let first = start as u32;
        for i in 0..len {
            // No wrap: the segment ends at or before the next multiple of 2^32.
            let low = first.wrapping_add(i as u32);
            chunks.store(c, around | u128::from(low.swap_bytes()) << shift);
            let mut s = iv;
            compress(&mut s, std::slice::from_ref(GenericArray::from_slice(chunks.0.as_flattened())));
            if meets_words(&s, difficulty) {
                return Some(start + i);
            }
        }
        None
    }
}

/// A message block as four 16-byte chunks, aligned so that each can be written with one vector
/// store.
#[repr(C, align(16))]
struct Chunks([[u8; 16]; 4]);

impl Chunks {
    /// Writes `value`'s little-endian bytes to chunk `c` with a single 16-byte store (see
    /// `search_portable`).
    #[inline(always)]
    fn store(&mut self, c: usize, value: u128) {
        let dst = &mut self.0[c];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m128i, _mm_set_epi64x};
            // SAFETY: `dst` is 16 writable bytes at a multiple of 16 from a 16-aligned struct, so
            // aligned for `__m128i`; SSE2 is part of the x86-64 baseline. Volatile, because the
            // compiler otherwise splits the store into two 8-byte ones, defeating its purpose.
            unsafe {
                let v = _mm_set_epi64x((value >> 64) as i64, value as i64);
                std::ptr::write_volatile(dst.as_mut_ptr().cast::<__m128i>(), v);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            *dst = value.to_le_bytes();
        }
    }
}

/// An implementation of [`Template::search`]. All kernels return the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// One candidate at a time through the sha1/sha2 crates' `compress` (which use the SHA
    /// extensions on their own when present). Runs everywhere.
    Portable,
    /// x86-64 SHA extensions (with SSSE3 and SSE4.1), several candidates interleaved.
    ShaNi,
}

impl Kernel {
    /// The fastest kernel this CPU runs; detected once.
    pub fn best() -> Self {
        if Self::ShaNi.is_available() { Self::ShaNi } else { Self::Portable }
    }

    /// True when this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::ShaNi => kernel::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::ShaNi => false,
        }
    }

    /// Candidates the kernel hashes side by side for `alg`.
    pub fn lanes(self, alg: HashAlg) -> usize {
        match (self, alg) {
            (Self::Portable, _) => 1,
            #[cfg(target_arch = "x86_64")]
            (Self::ShaNi, HashAlg::Sha1) => kernel::SHA1_LANES,
            #[cfg(target_arch = "x86_64")]
            (Self::ShaNi, HashAlg::Sha256) => kernel::SHA256_LANES,
            #[cfg(not(target_arch = "x86_64"))]
            (Self::ShaNi, _) => 1,
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::ShaNi => "sha-ni",
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Recomputes the proof of work of `(prev, tx, miner, nonce)`.
pub fn proof(prev: &Digest, tx: u64, miner: u32, nonce: u64) -> Digest {
    Template::new(prev, tx, miner).digest(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha1::Digest as _;

    fn reference(t: &Template, nonce: u64) -> Vec<u8> {
        let m = t.preimage(nonce);
        match t.alg() {
            HashAlg::Sha1 => sha1::Sha1::digest(&m).to_vec(),
            HashAlg::Sha256 => sha2::Sha256::digest(&m).to_vec(),
        }
    }

    #[test]
    fn preimage_layout_and_length() {
        let t = Template::new(&Digest::Sha1([0xAA; 20]), 0x0102, 0x0A0B0C0D);
        let m = t.preimage(0x1122334455667788);
        assert_eq!(m.len(), 40);
        assert_eq!(&m[..20], &[0xAA; 20]);
        assert_eq!(&m[20..28], &0x0102u64.to_be_bytes());
        assert_eq!(&m[28..32], &[0x0A, 0x0B, 0x0C, 0x0D]);
        assert_eq!(&m[32..], &0x1122334455667788u64.to_be_bytes());
        assert_eq!(Template::new(&Digest::zero(HashAlg::Sha256), 0, 1).preimage(0).len(), 52);
    }

    #[test]
    fn leading_zero_bits_at_every_boundary() {
        // Build digests with exactly k leading zero bits and check both rules agree at k and k + 1.
        for alg in [HashAlg::Sha1, HashAlg::Sha256] {
            let bits = alg.bits();
            for k in [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 159, 160, 255, 256] {
                if k > bits {
                    continue;
                }
                let mut bytes = vec![0u8; bits as usize / 8];
                if k < bits {
                    let byte = (k / 8) as usize;
                    bytes[byte] = 0x80 >> (k % 8);
                }
                let d = match alg {
                    HashAlg::Sha1 => Digest::Sha1(bytes.clone().try_into().unwrap()),
                    HashAlg::Sha256 => Digest::Sha256(bytes.clone().try_into().unwrap()),
                };
                assert_eq!(d.leading_zeros(), k, "{alg:?} k={k}");
                let words: Vec<u32> =
                    bytes.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
                assert!(meets_words(&words, k), "{alg:?} meets {k}");
                assert!(!meets_words(&words, k + 1), "{alg:?} not {}", k + 1);
                if k > 0 {
                    assert!(meets_words(&words, k - 1));
                }
            }
        }
    }

    #[test]
    fn search_finds_a_valid_nonce_and_it_verifies() {
        for alg in [HashAlg::Sha1, HashAlg::Sha256] {
            let prev = Digest::zero(alg);
            let t = Template::new(&prev, 5, 77);
            let nonce = t.search(12, 0, 1 << 24).expect("12 bits within 16M tries");
            let d = proof(&prev, 5, 77, nonce);
            assert!(d.leading_zeros() >= 12);
            // Bound to the miner: another id gets another hash.
            assert_ne!(proof(&prev, 5, 78, nonce), d);
        }
    }

    /// The plain definition of a search, against which both kernels are checked.
    fn first_by_definition(t: &Template, difficulty: u32, start: u64, count: u64) -> Option<u64> {
        (start..start.saturating_add(count)).find(|&n| t.digest(n).leading_zeros() >= difficulty)
    }

    fn template(alg: HashAlg, prev: [u8; 32], tx: u64, miner: u32) -> Template {
        let prev = match alg {
            HashAlg::Sha1 => Digest::Sha1(prev[..20].try_into().unwrap()),
            HashAlg::Sha256 => Digest::Sha256(prev),
        };
        Template::new(&prev, tx, miner)
    }

    fn kernels() -> Vec<Kernel> {
        let kernels = vec![Kernel::Portable, Kernel::ShaNi];
        if !Kernel::ShaNi.is_available() {
            eprintln!("this CPU has no SHA extensions: Kernel::ShaNi runs the portable path");
        }
        kernels
    }

    #[test]
    fn threshold_is_exact_up_to_64_bits() {
        #[cfg(target_arch = "x86_64")]
        for d in 1..=70u32 {
            let t = kernel::threshold(d);
            for k in [0u32, 1, 2, 31, 32, 33, 62, 63, 64] {
                let top = if k == 64 { 0 } else { u64::MAX >> k };
                assert_eq!(top < t, top.leading_zeros() >= d.min(64), "d={d} top={top:#x}");
            }
        }
    }

    #[test]
    fn search_edges() {
        for alg in [HashAlg::Sha1, HashAlg::Sha256] {
            let t = Template::new(&Digest::zero(alg), 3, 4);
            for kernel in kernels() {
                assert_eq!(t.search_with(kernel, 0, 17, 5), Some(17), "difficulty 0 takes the first");
                assert_eq!(t.search_with(kernel, 0, 17, 0), None, "empty range");
                assert_eq!(t.search_with(kernel, 1, u64::MAX, 10), None, "u64::MAX is never tried");
                // Fewer candidates than lanes, and ranges ending at the top of the nonce space.
                for count in 0..10 {
                    for start in [0, (1 << 32) - 3, u64::MAX - 6] {
                        let want = first_by_definition(&t, 2, start, count);
                        assert_eq!(t.search_with(kernel, 2, start, count), want, "{alg:?} {kernel} {start} {count}");
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sha_ni_lanes_match_the_crates_digest_at_the_low_word_wrap() {
        for alg in [HashAlg::Sha1, HashAlg::Sha256] {
            let t = Template::new(&Digest::zero(alg), 9, 9);
            for nonce in [0, 0xFFFF_FFFE, 0x1_FFFF_FFFF, u64::MAX - 1] {
                check_lanes(&t, nonce);
            }
        }
    }

    /// Every lane of the SHA-NI kernel against the crates' ordinary `digest`. Lane `k` hashes the
    /// nonce XOR `k` (the nonce plus `k` when the kernel is used: on a multiple of the lanes). On
    /// a CPU without SHA-NI the miner searches with the portable path instead: the same nonces
    /// are checked on it, so the test checks what this CPU runs.
    #[cfg(target_arch = "x86_64")]
    fn check_lanes(t: &Template, nonce: u64) {
        if !kernel::available() {
            for k in 0..4 {
                let lane_nonce = nonce ^ k;
                let got = t.digest(lane_nonce);
                assert_eq!(got.as_bytes(), &reference(t, lane_nonce)[..], "{:?} nonce {nonce:#x} (portable)", t.alg);
            }
            return;
        }
        let mut block = t.block;
        block[t.nonce_at..t.nonce_at + 8].copy_from_slice(&nonce.to_be_bytes());
        // SAFETY: the callers checked kernel::available().
        let states: Vec<Vec<u32>> = unsafe {
            match t.alg {
                HashAlg::Sha1 => kernel::sha1_states(&block).iter().map(|s| s.to_vec()).collect(),
                HashAlg::Sha256 => kernel::sha256_states(&block).iter().map(|s| s.to_vec()).collect(),
            }
        };
        for (k, state) in states.iter().enumerate() {
            let lane_nonce = nonce ^ k as u64;
            let bytes: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
            assert_eq!(bytes, reference(t, lane_nonce), "{:?} nonce {nonce:#x} lane {k}", t.alg);
        }
    }

    fn start_near_edges() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            // The last few thousand nonces before a change of the high word.
            (any::<u32>(), 0u64..5000).prop_map(|(hi, back)| ((u64::from(hi) + 1) << 32).wrapping_sub(back)),
            (0u64..5000).prop_map(|back| u64::MAX - back),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[cfg(target_arch = "x86_64")]
        #[test]
        fn sha_ni_lanes_match_the_crates_digest(
            prev in any::<[u8; 32]>(), tx in any::<u64>(), miner in any::<u32>(), nonce in any::<u64>(),
        ) {
            for alg in [HashAlg::Sha1, HashAlg::Sha256] {
                check_lanes(&template(alg, prev, tx, miner), nonce);
            }
        }

        #[test]
        fn kernels_find_the_first_solution(
            prev in any::<[u8; 32]>(), tx in any::<u64>(), miner in any::<u32>(),
            difficulty in 8u32..=12, start in start_near_edges(), count in 0u64..3000,
        ) {
            for alg in [HashAlg::Sha1, HashAlg::Sha256] {
                let t = template(alg, prev, tx, miner);
                let want = first_by_definition(&t, difficulty, start, count);
                for kernel in kernels() {
                    let got = t.search_with(kernel, difficulty, start, count);
                    prop_assert_eq!(got, want, "{:?} {}", alg, kernel);
                }
                if let Some(n) = want {
                    prop_assert!(n >= start && n - start < count);
                    prop_assert!(pow_ok(&t, n, difficulty));
                }
            }
        }
    }

    fn pow_ok(t: &Template, nonce: u64, difficulty: u32) -> bool {
        Digest::from_reference(t.alg, &reference(t, nonce)).leading_zeros() >= difficulty
    }

    impl Digest {
        fn from_reference(alg: HashAlg, bytes: &[u8]) -> Self {
            match alg {
                HashAlg::Sha1 => Digest::Sha1(bytes.try_into().unwrap()),
                HashAlg::Sha256 => Digest::Sha256(bytes.try_into().unwrap()),
            }
        }
    }

    proptest! {
        #[test]
        fn template_matches_the_crates_digest(
            prev in any::<[u8; 32]>(), tx in any::<u64>(), miner in any::<u32>(), nonce in any::<u64>(),
        ) {
            let sha1_prev = Digest::Sha1(prev[..20].try_into().unwrap());
            for p in [sha1_prev, Digest::Sha256(prev)] {
                let t = Template::new(&p, tx, miner);
                let fast = t.digest(nonce);
                prop_assert_eq!(fast.as_bytes(), &reference(&t, nonce)[..]);
            }
        }
    }
}
