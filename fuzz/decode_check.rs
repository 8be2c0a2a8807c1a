//! The property the `decode` fuzz target checks, shared (by `#[path]`) with the stable replay test
//! in `tests/system/flood.rs`, so that CI on stable checks exactly what the fuzzer checks.
//!
//! For one payload and every channel: [`peer::protocol::decode`] (wire version 1) and
//! [`hashvote_core::room::decode`] (the room protocol, wire version 2, on its five topics and the
//! recipient's own) must not panic, and whatever they accept must be on its own channel and must
//! survive a round trip (re-encoded, it decodes to the same envelope on the same channel).

use hashvote_core::room;
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

/// [`check_decode`] for the room protocol: the five topics, and the own topic of the peer the
/// payload names (if it parses at all); returns the envelopes accepted (at most one).
pub fn check_room_decode(data: &[u8]) -> Vec<room::Envelope> {
    use room::Channel as C;
    let mut channels = vec![C::Init, C::Voting, C::Challenge, C::Solution, C::Result];
    if let Ok(raw) = hashvote_core::protocol::decode_bytes::<room::Envelope>(data, room::VERSION, LIMIT)
        && let C::Direct(id) = raw.msg.channel()
    {
        channels.push(C::Direct(id));
    }
    let mut accepted = Vec::new();
    for channel in channels {
        if let Ok(envelope) = room::decode(data, channel, LIMIT) {
            assert_eq!(envelope.msg.channel(), channel, "accepted on the wrong channel: {envelope:?}");
            let again = room::encode(&envelope);
            assert_eq!(room::decode(&again, channel, LIMIT).as_ref(), Ok(&envelope), "round trip of {envelope:?}");
            accepted.push(envelope);
        }
    }
    assert!(accepted.len() <= 1, "one payload accepted on several channels: {accepted:?}");
    accepted
}
