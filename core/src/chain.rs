//! The chain: every peer's copy of the accepted blocks, which is also the lab's transaction table
//! (TransactionID, Challenge, Solution, Winner). Nothing enters it without being verified here.

use std::collections::BTreeMap;

use crate::pow::{self, Digest, HashAlg};
use crate::protocol::{Block, PeerId, TxId};

/// Why a block cannot be appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The block is not the next one.
    #[error("block {got} does not follow the tip (expected transaction {expected})")]
    Height {
        /// The transaction id the chain expects next.
        expected: TxId,
        /// The block's transaction id.
        got: TxId,
    },
    /// The block's `prev` is not the tip's hash.
    #[error("block {0} does not link to the chain tip")]
    Link(TxId),
    /// The block's hash is not the proof of work of its fields.
    #[error("block {0} carries a hash that is not its proof of work")]
    Proof(TxId),
    /// The block's difficulty is not what its pace allows on top of the chain.
    #[error("block {tx} has difficulty {difficulty}, which its pace does not allow here")]
    Difficulty {
        /// The block.
        tx: TxId,
        /// Its difficulty.
        difficulty: u8,
    },
    /// A change of members whose hash is not its digest, or that carries work fields.
    #[error("block {0} changes the room's members but is not well formed")]
    Change(TxId),
    /// A change of members that does not apply to the configuration it follows.
    #[error("block {0} changes the room's members in a way its configuration does not allow")]
    Members(TxId),
    /// The proof of work has fewer leading zero bits than the block's difficulty.
    #[error("block {tx} has {zeros} leading zero bits, needs {difficulty}")]
    Work {
        /// The block.
        tx: TxId,
        /// Leading zero bits of its hash.
        zeros: u32,
        /// Its difficulty.
        difficulty: u8,
    },
}

/// An append-only, verified sequence of blocks starting at transaction 0.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// What block 0 links to (its `prev`): all zeros, or the digest of the room's configuration.
    base: Option<Digest>,
    blocks: Vec<Block>,
    /// Blocks per winning miner, kept with the blocks so a status can say it cheaply.
    wins: BTreeMap<PeerId, u64>,
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty chain whose block 0 must link to `base` (the room's configuration digest).
    pub fn with_base(base: Digest) -> Self {
        Self { base: Some(base), ..Self::default() }
    }

    /// What block 0 links to, when not all zeros.
    pub fn base(&self) -> Option<Digest> {
        self.base
    }

    /// Number of blocks; also the id of the next transaction.
    pub fn height(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The accepted blocks, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The block of transaction `tx`, if accepted.
    pub fn get(&self, tx: TxId) -> Option<&Block> {
        usize::try_from(tx).ok().and_then(|i| self.blocks.get(i))
    }

    /// The last block.
    pub fn tip(&self) -> Option<&Block> {
        self.blocks.last()
    }

    /// The hash the next block must link to; `alg` is used only for the empty chain.
    pub fn tip_hash(&self, alg: HashAlg) -> Digest {
        match (self.tip(), self.base) {
            (Some(b), _) => b.hash,
            (None, Some(base)) if base.alg() == alg => base,
            (None, _) => Digest::zero(alg),
        }
    }

    /// The hash function of the chain: the first block's, or `default` while empty.
    pub fn alg(&self, default: HashAlg) -> HashAlg {
        self.blocks.first().map_or(default, |b| b.alg)
    }

    /// Checks that `block` is a valid next block, without appending it.
    pub fn check(&self, block: &Block) -> Result<(), ChainError> {
        if block.tx != self.height() {
            return Err(ChainError::Height { expected: self.height(), got: block.tx });
        }
        if block.prev != self.tip_hash(block.alg) {
            return Err(ChainError::Link(block.tx));
        }
        if block.is_mined() && !block.pace.allows(&self.blocks, block.difficulty) {
            return Err(ChainError::Difficulty { tx: block.tx, difficulty: block.difficulty });
        }
        verify_work(block)
    }

    /// Verifies and appends `block`.
    pub fn append(&mut self, block: Block) -> Result<(), ChainError> {
        self.check(&block)?;
        if block.is_mined() {
            *self.wins.entry(block.miner).or_default() += 1;
        }
        self.blocks.push(block);
        Ok(())
    }

    /// How many blocks of the chain `miner` won.
    pub fn won_by(&self, miner: PeerId) -> u64 {
        self.wins.get(&miner).copied().unwrap_or(0)
    }

    /// Drops every block from transaction `tx` on. Used only when the controller of a newer term
    /// shows that this peer's suffix was never accepted by the room (see `docs/PROTOCOL.md`).
    pub fn truncate(&mut self, tx: TxId) {
        let keep = usize::try_from(tx).unwrap_or(usize::MAX).min(self.blocks.len());
        for block in self.blocks.drain(keep..).filter(Block::is_mined) {
            if let Some(n) = self.wins.get_mut(&block.miner) {
                *n -= 1;
                if *n == 0 {
                    self.wins.remove(&block.miner);
                }
            }
        }
    }
}

/// Verifies a block's proof of work on its own (not its link to a chain).
pub fn verify_work(block: &Block) -> Result<(), ChainError> {
    if let Some(change) = &block.change {
        let plain = (block.difficulty, block.miner, block.nonce) == (0, 0, 0);
        if !plain || block.hash != change.digest(block.alg, &block.prev, block.tx) {
            return Err(ChainError::Change(block.tx));
        }
        return Ok(());
    }
    let hash = pow::proof(&block.prev, block.tx, block.miner, block.nonce);
    if hash != block.hash {
        return Err(ChainError::Proof(block.tx));
    }
    let zeros = hash.leading_zeros();
    if zeros < u32::from(block.difficulty) {
        return Err(ChainError::Work { tx: block.tx, zeros, difficulty: block.difficulty });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pow::Template;

    /// Mines a real block on top of `chain` (test helper, low difficulty).
    pub(crate) fn mine(chain: &Chain, alg: HashAlg, miner: u32, difficulty: u8) -> Block {
        let prev = chain.tip_hash(alg);
        let tx = chain.height();
        let t = Template::new(&prev, tx, miner);
        let nonce = t.search(u32::from(difficulty), 0, u64::MAX).expect("found");
        let pace = crate::pace::Pace::Fixed(difficulty);
        let hash = t.digest(nonce);
        Block { tx, term: 1, alg, difficulty, pace, issued_ms: 0, solved_ms: 1, prev, miner, nonce, hash, change: None }
    }

    #[test]
    fn appends_valid_blocks_and_refuses_everything_else() {
        let mut chain = Chain::new();
        let b0 = mine(&chain, HashAlg::Sha1, 7, 8);
        chain.append(b0).unwrap();
        let b1 = mine(&chain, HashAlg::Sha1, 9, 8);

        assert_eq!(chain.append(b0), Err(ChainError::Height { expected: 1, got: 0 }));
        let mut unlinked = b1;
        unlinked.prev = Digest::zero(HashAlg::Sha1);
        assert!(matches!(chain.check(&unlinked), Err(ChainError::Link(1))));
        let mut stolen = b1;
        stolen.miner = 10;
        assert_eq!(chain.check(&stolen), Err(ChainError::Proof(1)));
        let mut inflated = b1;
        inflated.difficulty = (b1.hash.leading_zeros() + 1) as u8;
        inflated.pace = crate::pace::Pace::Fixed(inflated.difficulty);
        assert!(matches!(chain.check(&inflated), Err(ChainError::Work { .. })));
        let mut off_pace = b1;
        off_pace.difficulty = 7;
        assert!(matches!(chain.check(&off_pace), Err(ChainError::Difficulty { .. })));

        chain.append(b1).unwrap();
        assert_eq!(chain.height(), 2);
        assert_eq!(chain.get(1), Some(&b1));
        assert_eq!((chain.won_by(7), chain.won_by(9), chain.won_by(10)), (1, 1, 0));
        chain.truncate(1);
        assert_eq!(chain.height(), 1);
        assert_eq!((chain.won_by(7), chain.won_by(9)), (1, 0), "truncated blocks are no longer won");
        chain.truncate(5);
        assert_eq!(chain.height(), 1);
    }

    #[test]
    fn sha256_chains_verify_too() {
        let mut chain = Chain::new();
        for miner in 1..4 {
            let b = mine(&chain, HashAlg::Sha256, miner, 6);
            chain.append(b).unwrap();
        }
        assert_eq!(chain.alg(HashAlg::Sha1), HashAlg::Sha256);
    }
}
