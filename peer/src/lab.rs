//! The lab's protocol (`--wire lab`): the sans-IO [`LabNode`] and the [`wire`] format are the
//! core's ([`hashvote_core::lab`], re-exported here); this module adds the IO: the mining threads
//! ([`miner`]) and the driver of its MQTT loop ([`driver`]). See "Lab wire format" in `docs/PROTOCOL.md`.

pub mod driver;
pub mod miner;

pub use hashvote_core::lab::*;
