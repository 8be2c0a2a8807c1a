//! The room protocol (wire version 3): a Raft-style replicated chain over MQTT whose elections
//! keep the lab's character — each term every voter draws a random ballot and, in the normal case,
//! the highest ballot wins — while a controller acts only with the durable votes of a majority of
//! the room's configuration. See `docs/PROTOCOL.md` for the rules and why they are safe.
//!
//! [`msg`] holds the messages, the configuration and the codec; [`node`] the state machine.

pub mod msg;
pub mod node;

pub use msg::{Channel, Envelope, MAX_ROOM, Member, Msg, Pos, RoomConfig, VERSION, decode, encode};
pub use node::{Action, Input, Reach, Restored, RoomNode, RoomNodeConfig, Timing, Write};
