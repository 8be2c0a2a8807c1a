//! hashvote's peer: joins a room of peers over MQTT, elects a controller with them, and mines
//! blocks of a small proof-of-work chain (or, as controller, issues and judges the challenges).
//!
//! The protocol core ([`node`], built on [`election`], [`chain`] and [`pow`]) is sans-IO and lives
//! in the `hashvote-core` crate, re-exported here under its old paths; [`transport`] connects it to
//! a broker and to the [`miner`]'s threads. [`lab`] speaks the original course lab's JSON messages
//! instead (`--wire lab`). See `docs/ARCHITECTURE.md`.

pub use hashvote_core::{chain, election, node, pace, pow, protocol};

pub mod bench;
pub mod cli;
pub mod config;
pub mod events;
pub mod lab;
pub mod miner;
pub mod room;
pub mod status;
pub mod store;
pub mod transport;
