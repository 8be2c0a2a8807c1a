//! hashvote's peer: joins a room of peers over MQTT, elects a controller with them, and mines
//! blocks of a small proof-of-work chain (or, as controller, issues and judges the challenges).
//!
//! The protocol core (the room protocol's node, [`chain`], [`pow`], [`protocol`]) is sans-IO and
//! lives in the `hashvote-core` crate, some of it re-exported here. One driver loop (`driver`)
//! feeds each wire format's node: [`room`] connects the room protocol's node to a broker (through
//! [`transport`], the MQTT plumbing), to the peer's data directory ([`store`]) and to the
//! [`miner`]'s threads; [`lab`] speaks the original course lab's JSON messages instead
//! (`--wire lab`). See `docs/ARCHITECTURE.md`.

pub use hashvote_core::{chain, pace, pow, protocol};

pub mod bench;
pub mod cli;
pub mod config;
pub(crate) mod driver;
pub mod events;
pub(crate) mod lab;
pub(crate) mod miner;
pub(crate) mod room;
pub mod status;
pub(crate) mod store;
pub mod transport;
