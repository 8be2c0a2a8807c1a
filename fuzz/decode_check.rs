//! The property the `decode` fuzz target checks, shared (by `#[path]`) with the stable replay test
//! in `tests/system/flood.rs`, so that CI on stable checks exactly what the fuzzer checks.
//!
//! For one payload and every channel: [`peer::protocol::decode`] must not panic, and whatever it
//! accepts must be on its own channel and must survive a round trip (re-encoded, it decodes to the
//! same envelope on the same channel).

use peer::protocol::{Channel, Envelope, decode, encode};

/// The decoder's limit in the peers (`max_payload`, equal to the broker's `max_payload_size`).
pub const LIMIT: usize = 64 * 1024;

/// Every channel a payload can arrive on.
pub const CHANNELS: [Channel; 5] =
    [Channel::Init, Channel::Voting, Channel::Challenge, Channel::Solution, Channel::Result];

/// Decodes `data` on every channel and checks the round trip of what is accepted; returns the
/// envelopes accepted (at most one, since a message belongs on one channel). Panics on a violation.
pub fn check_decode(data: &[u8]) -> Vec<Envelope> {
    let mut accepted = Vec::new();
    for channel in CHANNELS {
        if let Ok(envelope) = decode(data, channel, LIMIT) {
            assert_eq!(envelope.msg.channel(), channel, "accepted on the wrong channel: {envelope:?}");
            let again = encode(&envelope);
            assert_eq!(decode(&again, channel, LIMIT).as_ref(), Ok(&envelope), "round trip of {envelope:?}");
            accepted.push(envelope);
        }
    }
    assert!(accepted.len() <= 1, "one payload accepted on several channels: {accepted:?}");
    accepted
}
