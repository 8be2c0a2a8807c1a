//! The x86-64 search kernels: SHA-1 and SHA-256 on the SHA extensions, several candidates at a
//! time.
//!
//! One message at a time leaves the SHA unit idle most of the time (`sha1rnds4` has a latency of
//! three times its issue interval), so every step below is written for several independent
//! candidates ("lanes", consecutive nonces) and the CPU overlaps them. The nonce never leaves the
//! registers: the high nonce word is fixed for a whole call and the low word is a vector lane
//! advanced in place. Rounds that depend only on the fixed part of the message (prev, tx, miner
//! id and, for SHA-256, the high nonce word) are computed once per call.
//!
//! A scan compares the first 64 digest bits against a threshold and stops at the first group of
//! lanes with a hit; the caller re-checks that group exactly with the portable path, so a
//! difficulty above 64 bits only costs a (practically never taken) second look.
//!
//! Every kernel is an `unsafe fn` with `#[target_feature]`: calling one on a CPU without the
//! features is undefined behaviour, so callers go through [`available`] first. Inside, the
//! intrinsics are safe to call (the features are enabled there), and so are the helpers, which are
//! safe functions with the same `#[target_feature]`; the one `unsafe` block left is the empty
//! `asm!` of `in_step!`.

use std::arch::x86_64::{
    __m128i, _mm_add_epi32, _mm_alignr_epi8, _mm_extract_epi64, _mm_set_epi32, _mm_setzero_si128, _mm_sha1msg1_epu32,
    _mm_sha1msg2_epu32, _mm_sha1nexte_epu32, _mm_sha1rnds4_epu32, _mm_sha256msg1_epu32, _mm_sha256msg2_epu32,
    _mm_sha256rnds2_epu32, _mm_shuffle_epi32, _mm_slli_si128, _mm_xor_si128,
};
use std::sync::OnceLock;

use super::{SHA1_IV, SHA256_IV};

/// SHA-1 candidates hashed side by side. Three would cover `sha1rnds4`'s latency; eight share
/// one message schedule per group (see below) among more candidates and measured ~15% faster
/// than four on Zen 3, although the 16 registers the SHA instructions can use then hold only
/// part of the lanes' state (the rest stays in L1). A power of two: lane k hashes the group's
/// first nonce XOR k.
pub(super) const SHA1_LANES: usize = 8;

/// SHA-256 candidates hashed side by side. Here each lane needs its own schedule (it is not
/// linear), and six or eight lanes, spilling state and schedule out of the registers, measured
/// slower than four.
pub(super) const SHA256_LANES: usize = 4;

const _: () = assert!(SHA1_LANES.is_power_of_two() && SHA256_LANES.is_power_of_two());
// `in_step!` names the lanes one by one.
const _: () = assert!(SHA1_LANES == 8 && SHA256_LANES == 4);

/// True when this CPU has everything the kernels use. Detected once, then a single load.
pub(super) fn available() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    })
}

/// The message block as big-endian words.
fn words(block: &[u8; 64]) -> [u32; 16] {
    let mut w = [0u32; 16];
    for (i, word) in w.iter_mut().enumerate() {
        *word = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
    }
    w
}

/// Turns the leading bits of a digest into the kernels' hit test: a candidate is a possible hit
/// when its first 64 bits, as a big-endian number, are below the returned value. Exact for
/// `1..=64` bits; above 64 bits it keeps the candidates whose first 64 bits are zero.
pub(super) fn threshold(difficulty: u32) -> u64 {
    match difficulty {
        0 => u64::MAX, // not used: every nonce meets difficulty 0, callers answer it themselves
        1..=63 => 1u64 << (64 - difficulty),
        _ => 1,
    }
}

// ---------------------------------------------------------------------------------------------
// SHA-1. Nonce = message words 8 (high) and 9 (low); the instructions want word 4i of each
// 4-word group in the highest lane, so word 9 is lane 2 of the third message vector.
//
// The message schedule is where this CPU (Zen 3) loses time: `sha1msg1` competes with the round
// instruction (removing the schedule altogether ran 20% faster). But the SHA-1 schedule is
// linear over XOR, and the lanes' messages differ only in the low bits of word 9: lane k hashes
// `low ^ k` with `low` a multiple of SHA1_LANES, so its schedule is the group's schedule XOR a
// per-lane constant computed once per call. One schedule per group instead of one per lane.

/// The fixed part of a SHA-1 search.
struct Sha1Mid {
    /// A..D after rounds 0..8 (words 0..7: prev, tx, miner id).
    abcd8: __m128i,
    /// E of rounds 8..12, to be added to message words 8..11.
    e8: __m128i,
    /// Message words 12..15 plus E, the input of rounds 12..16 (padding and length: constant).
    wk12: __m128i,
    /// `sha1msg1` of message words 0..7, the start of the first schedule step.
    m01: __m128i,
    w1: __m128i,
    w3: __m128i,
    /// Message words 8..11 of the first group.
    w2: __m128i,
    /// Lane k's schedule (words 16..80, four per vector) XOR lane 0's: the schedule of a message
    /// whose only non-zero word is word 9 = k. Row 0 is unused (zero).
    delta: [[__m128i; 16]; SHA1_LANES],
}

/// The message schedule (words 16..80) of the message `w`.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn sha1_schedule(w: [__m128i; 4]) -> [__m128i; 16] {
    let mut m = [_mm_setzero_si128(); 20];
    m[..4].copy_from_slice(&w);
    for j in 0..16 {
        m[j + 4] = _mm_sha1msg2_epu32(_mm_xor_si128(_mm_sha1msg1_epu32(m[j], m[j + 1]), m[j + 2]), m[j + 3]);
    }
    let mut out = [_mm_setzero_si128(); 16];
    out.copy_from_slice(&m[4..]);
    out
}

/// The part of a SHA-1 search that is the same for every nonce of `block`.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn sha1_mid(block: &[u8; 64]) -> Sha1Mid {
    let w = words(block);
    let msg = |i: usize| -> __m128i {
        _mm_set_epi32(w[4 * i] as i32, w[4 * i + 1] as i32, w[4 * i + 2] as i32, w[4 * i + 3] as i32)
    };
    let (w0, w1, w2, w3) = (msg(0), msg(1), msg(2), msg(3));
    let abcd = _mm_set_epi32(SHA1_IV[0] as i32, SHA1_IV[1] as i32, SHA1_IV[2] as i32, SHA1_IV[3] as i32);
    let e = _mm_set_epi32(SHA1_IV[4] as i32, 0, 0, 0);
    let abcd4 = _mm_sha1rnds4_epu32(abcd, _mm_add_epi32(e, w0), 0);
    let abcd8 = _mm_sha1rnds4_epu32(abcd4, _mm_sha1nexte_epu32(abcd, w1), 0);
    let zero = _mm_setzero_si128();
    let mut delta = [[zero; 16]; SHA1_LANES];
    for (k, row) in delta.iter_mut().enumerate().skip(1) {
        *row = sha1_schedule([zero, zero, _mm_set_epi32(0, k as i32, 0, 0), zero]);
    }
    Sha1Mid {
        abcd8,
        e8: _mm_sha1nexte_epu32(abcd4, zero),
        wk12: _mm_sha1nexte_epu32(abcd8, w3),
        m01: _mm_sha1msg1_epu32(w0, w1),
        w1,
        w3,
        w2,
        delta,
    }
}

/// One step of the group's schedule (`$m4` from `$m0..$m3`) and four rounds on every lane with
/// it, adjusted per lane; `$j` is the step (0..16), `$f` the round function.
macro_rules! sha1_step {
    (
        $mid:ident, $ha:ident, $hb:ident,
        $m0:ident, $m1:ident, $m2:ident, $m3:ident, $m4:ident,
        $j:literal, $f:literal
    ) => {
        $m4 = _mm_sha1msg2_epu32(_mm_xor_si128(_mm_sha1msg1_epu32($m0, $m1), $m2), $m3);
        for l in 0..SHA1_LANES {
            let w = if l == 0 { $m4 } else { _mm_xor_si128($m4, $mid.delta[l][$j]) };
            $hb[l] = _mm_sha1rnds4_epu32($ha[l], _mm_sha1nexte_epu32($hb[l], w), $f);
        }
        in_step!($hb);
    };
}

/// Keeps the lanes in step: every lane's rounds so far come before any lane's next ones. Without
/// it the compiler ran each SHA-1 lane from its first round to its last before starting the next
/// (the lanes' state does not fit in the 16 registers, and that order needs the fewest), which
/// left too few independent rounds in the out-of-order window to cover `sha1rnds4`'s latency: 8
/// lanes ran ~15% slower than with this (SHA-256: ~3%). An `asm!` with no instructions that takes
/// and returns the lanes' new states is a point no round before or after it can be moved across;
/// it costs nothing but register moves. Written for 8 SHA-1 lanes and 4 SHA-256 lanes.
macro_rules! in_step {
    ($h:ident) => {
        in_step!($h[0], $h[1], $h[2], $h[3], $h[4], $h[5], $h[6], $h[7])
    };
    ($a:ident, $b:ident) => {
        in_step!($a[0], $a[1], $a[2], $a[3], $b[0], $b[1], $b[2], $b[3])
    };
    ($x0:expr, $x1:expr, $x2:expr, $x3:expr, $x4:expr, $x5:expr, $x6:expr, $x7:expr) => {
        // SAFETY: the template is only a comment: no instruction runs, so no register, flag, memory
        // or stack is touched, and every operand comes back as it went in, as `pure`, `nomem`,
        // `nostack` and `preserves_flags` promise the compiler. `xmm_reg` operands need SSE, which
        // is in the x86-64 baseline and enabled wherever this expands.
        unsafe {
            std::arch::asm!(
                "/* {0} {1} {2} {3} {4} {5} {6} {7} */",
                inout(xmm_reg) $x0, inout(xmm_reg) $x1, inout(xmm_reg) $x2, inout(xmm_reg) $x3,
                inout(xmm_reg) $x4, inout(xmm_reg) $x5, inout(xmm_reg) $x6, inout(xmm_reg) $x7,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// Rounds 8..80 for the group whose lane 0 has message words 8..11 `$w2` (low nonce word a
/// multiple of SHA1_LANES). Returns A..D (highest lane first) before the final addition, and the
/// vector the final E is derived from.
macro_rules! sha1_lanes {
    ($mid:expr, $w2:expr) => {{
        let mid: &Sha1Mid = $mid;
        let m2: __m128i = $w2;
        let mut h0 = [mid.abcd8; SHA1_LANES];
        let mut h1 = [_mm_setzero_si128(); SHA1_LANES];
        for l in 0..SHA1_LANES {
            let w2 = _mm_xor_si128(m2, _mm_set_epi32(0, l as i32, 0, 0));
            h1[l] = _mm_sha1rnds4_epu32(h0[l], _mm_add_epi32(w2, mid.e8), 0);
        }
        in_step!(h1);
        for l in 0..SHA1_LANES {
            h0[l] = _mm_sha1rnds4_epu32(h1[l], mid.wk12, 0);
        }
        in_step!(h0);
        // The first step's msg1(w0, w1) is precomputed: only its result is needed in place of w0.
        let (mut m0, mut m1, mut m2, mut m3) = (mid.m01, mid.w1, m2, mid.w3);
        let mut m4 = _mm_sha1msg2_epu32(_mm_xor_si128(m0, m2), m3);
        for l in 0..SHA1_LANES {
            let w = if l == 0 { m4 } else { _mm_xor_si128(m4, mid.delta[l][0]) };
            h1[l] = _mm_sha1rnds4_epu32(h0[l], _mm_sha1nexte_epu32(h1[l], w), 0);
        }
        in_step!(h1);
        sha1_step!(mid, h1, h0, m1, m2, m3, m4, m0, 1, 1);
        sha1_step!(mid, h0, h1, m2, m3, m4, m0, m1, 2, 1);
        sha1_step!(mid, h1, h0, m3, m4, m0, m1, m2, 3, 1);
        sha1_step!(mid, h0, h1, m4, m0, m1, m2, m3, 4, 1);
        sha1_step!(mid, h1, h0, m0, m1, m2, m3, m4, 5, 1);
        sha1_step!(mid, h0, h1, m1, m2, m3, m4, m0, 6, 2);
        sha1_step!(mid, h1, h0, m2, m3, m4, m0, m1, 7, 2);
        sha1_step!(mid, h0, h1, m3, m4, m0, m1, m2, 8, 2);
        sha1_step!(mid, h1, h0, m4, m0, m1, m2, m3, 9, 2);
        sha1_step!(mid, h0, h1, m0, m1, m2, m3, m4, 10, 2);
        sha1_step!(mid, h1, h0, m1, m2, m3, m4, m0, 11, 3);
        sha1_step!(mid, h0, h1, m2, m3, m4, m0, m1, 12, 3);
        sha1_step!(mid, h1, h0, m3, m4, m0, m1, m2, 13, 3);
        sha1_step!(mid, h0, h1, m4, m0, m1, m2, m3, 14, 3);
        sha1_step!(mid, h1, h0, m0, m1, m2, m3, m4, 15, 3);
        (h0, h1)
    }};
}

/// Scans `groups` groups of [`SHA1_LANES`] consecutive nonces, the first being the one written in
/// `block`, and returns the index of the first group holding a candidate whose leading 64 digest
/// bits are below `threshold` (see [`threshold`]).
///
/// The low nonce word must be a multiple of [`SHA1_LANES`] and must not wrap:
/// `low + groups * SHA1_LANES <= 2^32`.
///
/// # Safety
/// The CPU must have sha, sse2, ssse3 and sse4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub(super) unsafe fn sha1_scan(block: &[u8; 64], groups: u32, threshold: u64) -> Option<u32> {
    debug_assert_eq!(u32::from_be_bytes([block[36], block[37], block[38], block[39]]) as usize % SHA1_LANES, 0);
    let mid = sha1_mid(block);
    let mut w2 = mid.w2;
    let next = _mm_set_epi32(0, SHA1_LANES as i32, 0, 0);
    let iv = _mm_set_epi32(SHA1_IV[0] as i32, SHA1_IV[1] as i32, 0, 0);
    for group in 0..groups {
        let (abcd, _) = sha1_lanes!(&mid, w2);
        // Lanes 3 and 2 are A and B: the upper 64 bits read as one number are A:B, the
        // digest's first 64 bits. No branch per lane, one per group.
        let mut hit = false;
        for state in abcd {
            hit |= (_mm_extract_epi64(_mm_add_epi32(state, iv), 1) as u64) < threshold;
        }
        if hit {
            return Some(group);
        }
        w2 = _mm_add_epi32(w2, next);
    }
    None
}

/// Full SHA-1 states of the [`SHA1_LANES`] candidates of the group written in `block`, through the
/// same code as [`sha1_scan`]: lane k hashes the low nonce word XOR k. For tests.
///
/// # Safety
/// As [`sha1_scan`].
#[cfg(test)]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub(super) unsafe fn sha1_states(block: &[u8; 64]) -> [[u32; 5]; SHA1_LANES] {
    use std::arch::x86_64::_mm_extract_epi32;
    let mid = sha1_mid(block);
    let (abcd, h1) = sha1_lanes!(&mid, mid.w2);
    let iv = _mm_set_epi32(SHA1_IV[0] as i32, SHA1_IV[1] as i32, SHA1_IV[2] as i32, SHA1_IV[3] as i32);
    let e_iv = _mm_set_epi32(SHA1_IV[4] as i32, 0, 0, 0);
    let mut out = [[0u32; 5]; SHA1_LANES];
    for l in 0..SHA1_LANES {
        let s = _mm_add_epi32(abcd[l], iv);
        let e = _mm_sha1nexte_epu32(h1[l], e_iv);
        out[l] = [
            _mm_extract_epi32(s, 3) as u32,
            _mm_extract_epi32(s, 2) as u32,
            _mm_extract_epi32(s, 1) as u32,
            _mm_extract_epi32(s, 0) as u32,
            _mm_extract_epi32(e, 3) as u32,
        ];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// SHA-256. Nonce = message words 11 (high) and 12 (low); here word 4i is the lowest lane, so the
// low word is lane 0 of the fourth message vector and the high word is fixed with rounds 0..12.

#[rustfmt::skip]
const K256: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// Round constants `4i..4i + 4`, word `4i` in the lowest lane.
macro_rules! k256 {
    ($i:expr) => {
        _mm_set_epi32(K256[4 * $i + 3] as i32, K256[4 * $i + 2] as i32, K256[4 * $i + 1] as i32, K256[4 * $i] as i32)
    };
}

/// Four rounds on one lane's (ABEF, CDGH) with message words `w` (the sha2 crate's `rounds4`).
macro_rules! sha256_rounds4 {
    ($abef:expr, $cdgh:expr, $w:expr, $i:expr) => {{
        let t1 = _mm_add_epi32($w, k256!($i));
        $cdgh = _mm_sha256rnds2_epu32($cdgh, $abef, t1);
        $abef = _mm_sha256rnds2_epu32($abef, $cdgh, _mm_shuffle_epi32(t1, 0x0E));
    }};
}

/// One step of message schedule and four rounds, on every lane (the crate's `schedule_rounds4`).
macro_rules! sha256_step {
    ($abef:ident, $cdgh:ident, $w0:ident, $w1:ident, $w2:ident, $w3:ident, $w4:ident, $i:expr) => {
        for l in 0..SHA256_LANES {
            $w4[l] = _mm_sha256msg2_epu32(
                _mm_add_epi32(_mm_sha256msg1_epu32($w0[l], $w1[l]), _mm_alignr_epi8($w3[l], $w2[l], 4)),
                $w3[l],
            );
            sha256_rounds4!($abef[l], $cdgh[l], $w4[l], $i);
        }
        in_step!($abef, $cdgh);
    };
}

/// The fixed part of a SHA-256 search.
struct Sha256Mid {
    /// A, B, E, F of the initial state, as the instructions want them.
    abef0: __m128i,
    /// The state after rounds 0..12 (words 0..11: prev, tx, miner id, high nonce word).
    abef12: __m128i,
    cdgh12: __m128i,
    w0: __m128i,
    w1: __m128i,
    w2: __m128i,
    /// Message words 12..15 of the first candidate.
    w3: __m128i,
    /// Message words 16..19 if word 12 (the low nonce word) were zero. Word 12 enters words 16..19
    /// only as a term of word 19, so each lane's are these plus its low word in lane 3: the first
    /// schedule step costs an add instead of `sha256msg2`, the instruction this CPU waits on.
    w4z: __m128i,
}

/// The part of a SHA-256 search that is the same for every low nonce word of `block`.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn sha256_mid(block: &[u8; 64]) -> Sha256Mid {
    let w = words(block);
    let msg = |i: usize| -> __m128i {
        _mm_set_epi32(w[4 * i + 3] as i32, w[4 * i + 2] as i32, w[4 * i + 1] as i32, w[4 * i] as i32)
    };
    let (w0, w1, w2, w3) = (msg(0), msg(1), msg(2), msg(3));
    // The instructions keep the state as (A, B, E, F) and (C, D, G, H), A in the highest lane.
    let s = SHA256_IV.map(|x| x as i32);
    let abef0 = _mm_set_epi32(s[0], s[1], s[4], s[5]);
    let cdgh0 = _mm_set_epi32(s[2], s[3], s[6], s[7]);
    let (mut abef, mut cdgh) = (abef0, cdgh0);
    sha256_rounds4!(abef, cdgh, w0, 0);
    sha256_rounds4!(abef, cdgh, w1, 1);
    sha256_rounds4!(abef, cdgh, w2, 2);
    let w3z = _mm_set_epi32(w[15] as i32, w[14] as i32, w[13] as i32, 0);
    let w4z = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3z, w2, 4)), w3z);
    Sha256Mid { abef0, abef12: abef, cdgh12: cdgh, w0, w1, w2, w3, w4z }
}

/// Rounds 12..64 for every lane, given each lane's message words 12..15. Returns (ABEF, CDGH)
/// before the final addition.
macro_rules! sha256_lanes {
    ($mid:expr, $w3:expr) => {{
        let mid: &Sha256Mid = $mid;
        let mut w0 = [mid.w0; SHA256_LANES];
        let mut w1 = [mid.w1; SHA256_LANES];
        let mut w2 = [mid.w2; SHA256_LANES];
        let mut w3: [__m128i; SHA256_LANES] = $w3;
        let mut w4 = [_mm_setzero_si128(); SHA256_LANES];
        let mut abef = [mid.abef12; SHA256_LANES];
        let mut cdgh = [mid.cdgh12; SHA256_LANES];
        for l in 0..SHA256_LANES {
            sha256_rounds4!(abef[l], cdgh[l], w3[l], 3);
        }
        for l in 0..SHA256_LANES {
            w4[l] = _mm_add_epi32(mid.w4z, _mm_slli_si128(w3[l], 12));
            sha256_rounds4!(abef[l], cdgh[l], w4[l], 4);
        }
        sha256_step!(abef, cdgh, w1, w2, w3, w4, w0, 5);
        sha256_step!(abef, cdgh, w2, w3, w4, w0, w1, 6);
        sha256_step!(abef, cdgh, w3, w4, w0, w1, w2, 7);
        sha256_step!(abef, cdgh, w4, w0, w1, w2, w3, 8);
        sha256_step!(abef, cdgh, w0, w1, w2, w3, w4, 9);
        sha256_step!(abef, cdgh, w1, w2, w3, w4, w0, 10);
        sha256_step!(abef, cdgh, w2, w3, w4, w0, w1, 11);
        sha256_step!(abef, cdgh, w3, w4, w0, w1, w2, 12);
        sha256_step!(abef, cdgh, w4, w0, w1, w2, w3, 13);
        sha256_step!(abef, cdgh, w0, w1, w2, w3, w4, 14);
        sha256_step!(abef, cdgh, w1, w2, w3, w4, w0, 15);
        (abef, cdgh)
    }};
}

/// Message words 12..15 of lanes `0..SHA256_LANES`: lane k's low nonce word is the first's XOR k (its
/// plus k, as the first is a multiple of SHA256_LANES), as for SHA-1.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn sha256_first_w3(mid: &Sha256Mid) -> [__m128i; SHA256_LANES] {
    let mut w3 = [mid.w3; SHA256_LANES];
    for (l, w) in w3.iter_mut().enumerate() {
        *w = _mm_xor_si128(*w, _mm_set_epi32(0, 0, 0, l as i32));
    }
    w3
}

/// [`sha1_scan`] for SHA-256, with the same requirements on the nonce.
///
/// # Safety
/// The CPU must have sha, sse2, ssse3 and sse4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub(super) unsafe fn sha256_scan(block: &[u8; 64], groups: u32, threshold: u64) -> Option<u32> {
    debug_assert_eq!(u32::from_be_bytes([block[48], block[49], block[50], block[51]]) as usize % SHA256_LANES, 0);
    let mid = sha256_mid(block);
    let mut w3 = sha256_first_w3(&mid);
    let next = _mm_set_epi32(0, 0, 0, SHA256_LANES as i32);
    for group in 0..groups {
        let (abef, _) = sha256_lanes!(&mid, w3);
        // Lanes 3 and 2 of ABEF are A and B: the digest's first 64 bits.
        let mut hit = false;
        for state in abef {
            hit |= (_mm_extract_epi64(_mm_add_epi32(state, mid.abef0), 1) as u64) < threshold;
        }
        if hit {
            return Some(group);
        }
        for w in &mut w3 {
            *w = _mm_add_epi32(*w, next);
        }
    }
    None
}

/// Full SHA-256 states of the [`SHA256_LANES`] candidates of the group written in `block`, through the
/// same code as [`sha256_scan`]: lane k hashes the low nonce word XOR k. For tests.
///
/// # Safety
/// As [`sha256_scan`].
#[cfg(test)]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub(super) unsafe fn sha256_states(block: &[u8; 64]) -> [[u32; 8]; SHA256_LANES] {
    use std::arch::x86_64::_mm_extract_epi32;
    let mid = sha256_mid(block);
    let (abef, cdgh) = sha256_lanes!(&mid, sha256_first_w3(&mid));
    let s = SHA256_IV.map(|x| x as i32);
    let cdgh0 = _mm_set_epi32(s[2], s[3], s[6], s[7]);
    let mut out = [[0u32; 8]; SHA256_LANES];
    for l in 0..SHA256_LANES {
        let abef = _mm_add_epi32(abef[l], mid.abef0);
        let cdgh = _mm_add_epi32(cdgh[l], cdgh0);
        // Lanes (high to low): A B E F and C D G H.
        out[l] = [
            _mm_extract_epi32(abef, 3) as u32,
            _mm_extract_epi32(abef, 2) as u32,
            _mm_extract_epi32(cdgh, 3) as u32,
            _mm_extract_epi32(cdgh, 2) as u32,
            _mm_extract_epi32(abef, 1) as u32,
            _mm_extract_epi32(abef, 0) as u32,
            _mm_extract_epi32(cdgh, 1) as u32,
            _mm_extract_epi32(cdgh, 0) as u32,
        ];
    }
    out
}
