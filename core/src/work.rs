//! What the node asks a miner to do and what a miner reports back: the plain data between the
//! sans-IO [`RoomNode`](crate::room::RoomNode) and the peer's mining threads (`peer::miner`).

use crate::pow::Template;
use crate::protocol::TxId;

/// Something to mine.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// The transaction.
    pub tx: TxId,
    /// Fixed part of the preimage.
    pub template: Template,
    /// Leading zero bits required.
    pub difficulty: u8,
}

/// A solution found by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The transaction.
    pub tx: TxId,
    /// The nonce.
    pub nonce: u64,
    /// Candidates tried by all threads for this job (approximate: counted per batch).
    pub hashes: u64,
    /// Milliseconds since the job started.
    pub elapsed_ms: u64,
}
