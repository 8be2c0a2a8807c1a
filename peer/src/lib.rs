//! hashvote's peer: joins a room of peers over MQTT, elects a controller with them, and mines
//! blocks of a small proof-of-work chain (or, as controller, issues and judges the challenges).
//!
//! The protocol core ([`node`], built on [`election`], [`chain`] and [`pow`]) is sans-IO;
//! [`transport`] connects it to a broker and to the [`miner`]'s threads. [`lab`] speaks the original
//! course lab's JSON messages instead (`--wire lab`). See `docs/ARCHITECTURE.md`.

pub mod bench;
pub mod chain;
pub mod cli;
pub mod config;
pub mod election;
pub mod events;
pub mod lab;
pub mod miner;
pub mod node;
pub mod pace;
pub mod pow;
pub mod protocol;
pub mod status;
pub mod store;
pub mod transport;
