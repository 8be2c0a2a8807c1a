//! hashvote's sans-IO protocol core: everything a peer decides, and nothing it does.
//!
//! It owns the wire types shared by every protocol ([`protocol`]), the proof of work ([`pow`]),
//! the difficulty policies ([`pace`]), the verified chain ([`chain`]), the room protocol's
//! messages and node state machine ([`room`]), what a node asks a miner to do ([`work`]), the
//! lab's node and wire format ([`lab`]), and the types the nodes report through:
//! [`events::Event`] and [`status::Status`].
//!
//! No IO, no clock, no threads: time and randomness are inputs (a `now_ms` argument; a seed, or
//! the OS's entropy when none is given), and the owner (the `peer` crate) carries out the actions
//! the core returns. This crate depends on
//! neither tokio nor an MQTT client, and CI checks that it stays so.

pub mod chain;
pub mod events;
pub mod lab;
pub mod pace;
pub mod pow;
pub mod protocol;
pub mod room;
pub mod status;
pub mod work;
