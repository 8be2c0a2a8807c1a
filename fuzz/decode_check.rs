//! The property the `decode` fuzz target checks, shared (by `#[path]`) with the stable replay test
//! in `tests/system/flood.rs`, so that CI on stable checks exactly what the fuzzer checks.
//!
//! For one payload and every channel: [`hashvote_core::room::decode`] (the room protocol, on its
//! five topics and the recipient's own) must not panic, and whatever it accepts must be on its own
//! channel and must survive a round trip (re-encoded, it decodes to the same envelope on the same
//! channel).

use hashvote_core::room;

/// The decoder's limit in the peers (`max_payload`, equal to the broker's `max_payload_size`).
pub const LIMIT: usize = 64 * 1024;

/// Decodes `data` on the five topics, and on the own topic of the peer the payload names (if it
/// parses at all), and checks the round trip of what is accepted; returns the envelopes accepted
/// (at most one, since a message belongs on one channel). Panics on a violation.
pub fn check_decode(data: &[u8]) -> Vec<room::Envelope> {
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
