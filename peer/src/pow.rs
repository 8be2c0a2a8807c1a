//! Proof of work: hash functions, the preimage layout, and the leading-zero-bits rule.
//!
//! A solution proves work over `(previous block hash, transaction id, miner id, nonce)`, laid out as
//! `prev || tx (u64 BE) || miner (u32 BE) || nonce (u64 BE)`: 40 bytes for SHA-1, 52 for SHA-256.
//! Both fit one 64-byte block with its padding, so every candidate costs exactly one compression and
//! the miner only rewrites the last 8 message bytes between candidates.

use std::fmt;

use serde::{Deserialize, Serialize};

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

    /// Searches nonces `start..start + count` for one meeting `difficulty`; returns the first.
    pub fn search(&self, difficulty: u32, start: u64, count: u64) -> Option<u64> {
        let mut block = self.block;
        let end = start.saturating_add(count);
        let at = self.nonce_at;
        match self.alg {
            HashAlg::Sha1 => (start..end).find(|&n| {
                block[at..at + 8].copy_from_slice(&n.to_be_bytes());
                let mut s = SHA1_IV;
                sha1::compress(&mut s, &[block.into()]);
                meets_words(&s, difficulty)
            }),
            HashAlg::Sha256 => (start..end).find(|&n| {
                block[at..at + 8].copy_from_slice(&n.to_be_bytes());
                let mut s = SHA256_IV;
                sha2::compress256(&mut s, &[block.into()]);
                meets_words(&s, difficulty)
            }),
        }
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
