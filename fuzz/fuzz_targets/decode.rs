//! Fuzz target: arbitrary bytes through the wire decoder on every channel (see `decode_check.rs`).
//! Seeds: `corpus/decode/`, one real message of each kind (`cargo run -p peer --example fuzz_corpus`).

#![no_main]

#[path = "../decode_check.rs"]
mod decode_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    decode_check::check_decode(data);
});
