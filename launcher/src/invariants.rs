//! The invariants every run of a room must keep, checked over the peers' event streams.
//!
//! - **One controller per term**: every `controller_elected` of a term names the same peer, and only
//!   that term's controller issues its challenges.
//! - **One chain**: each peer's chain (its `block_accepted` events, with its `chain_truncated`
//!   applied) grows one transaction at a time, every block links to the one before it (block 0 to
//!   the room's configuration, which the events do not show: block 0 must be the room's), its hash is the proof of work of `(prev, tx, winner, nonce)` and has the
//!   block's difficulty in leading zero bits; and every peer's final chain is a prefix of one chain,
//!   the room's.
//! - **One block per term and transaction**: a controller accepts one solution per transaction,
//!   so two distinct blocks never share `(term, tx)`.
//! - **Committed is final** (room protocol): every `block_committed` of a transaction names the
//!   same block, whichever peer says it; no peer drops a block below what it knows committed, and
//!   none is ever asked to (`committed_conflict`).
//! - A peer restarted from its data directory (`resumed`) continues from the chain it restored,
//!   which must be one the events described.
//!
//! [`check`] takes the records of a finished run; [`Checker`] takes them one at a time, so a long
//! run (the `chaos` command) can check as it goes without keeping every record. Blocks are stored
//! once however many peers hold them.

use std::collections::{BTreeMap, HashMap};

use peer::events::{Event, Record};
use peer::pow::{self, Digest};
use peer::protocol::{Change, PeerId, Term, TxId};

/// A block as the events describe it (`block_accepted`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenBlock {
    /// Transaction id (the block's height).
    pub tx: TxId,
    /// Term of the controller that accepted it.
    pub term: Term,
    /// Winning miner.
    pub winner: PeerId,
    /// Leading zero bits the challenge asked for.
    pub difficulty: u8,
    /// The winning nonce.
    pub nonce: u64,
    /// The block's hash (hex).
    pub hash: String,
    /// The previous block's hash (hex).
    pub prev: String,
    /// A change of members instead of a solved transaction.
    pub change: Option<Change>,
}

/// An invariant the events show was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Two peers named different controllers for the same term.
    #[error("term {term} had several controllers: {first} and {second} (named by peer {named_by})")]
    SeveralControllers {
        /// The term.
        term: Term,
        /// The controller named first.
        first: PeerId,
        /// Another controller named later.
        second: PeerId,
        /// The peer whose `controller_elected` named `second`.
        named_by: PeerId,
    },
    /// Two peers issued challenges in the same term.
    #[error("term {term} had several peers issuing challenges: {first} and {second}")]
    SeveralIssuers {
        /// The term.
        term: Term,
        /// The first issuer.
        first: PeerId,
        /// Another issuer.
        second: PeerId,
    },
    /// A peer appended a block at a height other than its chain's.
    #[error("peer {peer} appended tx {tx} at height {height}")]
    Gap {
        /// The peer.
        peer: PeerId,
        /// The block's transaction id.
        tx: TxId,
        /// The peer's chain height before it.
        height: u64,
    },
    /// A peer appended a block that does not link to its chain's tip.
    #[error("peer {peer} appended tx {tx} with prev {prev}, but its tip is {tip}")]
    BrokenLink {
        /// The peer.
        peer: PeerId,
        /// The block's transaction id.
        tx: TxId,
        /// The block's `prev`.
        prev: String,
        /// The hash of the peer's block `tx - 1` (zeros for block 0).
        tip: String,
    },
    /// A hash or prev field is not a hex SHA-1 or SHA-256 digest.
    #[error("block {tx}: {field} is not a hex SHA-1 or SHA-256 digest: {value:?}")]
    BadDigest {
        /// The block's transaction id.
        tx: TxId,
        /// `hash` or `prev`.
        field: &'static str,
        /// The field as written.
        value: String,
    },
    /// A block's hash is not the proof of work of its contents.
    #[error("block {tx} (term {term}, winner {winner}, nonce {nonce}): hash {hash} is not its proof of work {proof}")]
    WrongHash {
        /// The block's transaction id.
        tx: TxId,
        /// Its term.
        term: Term,
        /// Its winner.
        winner: PeerId,
        /// Its nonce.
        nonce: u64,
        /// The hash it claims.
        hash: String,
        /// The hash recomputed from `(prev, tx, winner, nonce)`.
        proof: String,
    },
    /// A block's hash has fewer leading zero bits than its difficulty.
    #[error("block {tx}: its hash has {zeros} leading zero bits, below its difficulty {difficulty}")]
    InsufficientWork {
        /// The block's transaction id.
        tx: TxId,
        /// Leading zero bits of its hash.
        zeros: u32,
        /// The difficulty it claims.
        difficulty: u8,
    },
    /// Two distinct blocks of one transaction accepted in one term.
    #[error("term {term} accepted two blocks for tx {tx}: {first} and {second}")]
    TwoBlocksInOneTerm {
        /// The term.
        term: Term,
        /// The transaction.
        tx: TxId,
        /// The first block's hash.
        first: String,
        /// The other block's hash.
        second: String,
    },
    /// Two peers (or one, twice) said different blocks of one transaction were committed.
    #[error("tx {tx} was committed as {first} and, by peer {peer}, as {second}")]
    CommittedChanged {
        /// The transaction.
        tx: TxId,
        /// The block first said committed (hash).
        first: String,
        /// The other (hash).
        second: String,
        /// The peer that said the other.
        peer: PeerId,
    },
    /// A peer dropped blocks below what it knew committed.
    #[error("peer {peer} truncated its chain to {height} blocks, below the {commit} it knew committed")]
    CommittedTruncated {
        /// The peer.
        peer: PeerId,
        /// Its height after the truncation.
        height: u64,
        /// Blocks it knew committed.
        commit: u64,
    },
    /// A controller asked a peer to drop a block it knew committed.
    #[error("peer {peer} was asked to drop committed block {tx} ({commit} committed)")]
    CommittedConflict {
        /// The peer.
        peer: PeerId,
        /// The block.
        tx: TxId,
        /// Blocks it knew committed.
        commit: u64,
    },
    /// A peer resumed from a chain the events never described.
    #[error("peer {peer} resumed with {height} blocks ending in {tip:?}, a chain no event described")]
    UnknownResume {
        /// The peer.
        peer: PeerId,
        /// Its height.
        height: u64,
        /// Its tip's hash.
        tip: Option<String>,
    },
    /// A peer's final chain is not a prefix of the room's chain.
    #[error("peer {peer}'s chain is not a prefix of the room's: at tx {tx} it holds {theirs}, the room {room}")]
    Diverged {
        /// The peer.
        peer: PeerId,
        /// The first transaction where the chains differ.
        tx: TxId,
        /// The peer's block there (term and hash).
        theirs: String,
        /// The room's block there (term and hash).
        room: String,
    },
}

/// What a run that kept the invariants did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Blocks in the room's chain (every peer's chain is a prefix of it).
    pub blocks: usize,
    /// Distinct terms that had a controller.
    pub terms: usize,
    /// The controller of each term, as the peers' `controller_elected` events name it.
    pub controllers_per_term: BTreeMap<Term, PeerId>,
    /// Peers that wrote events.
    pub peers: usize,
    /// `chain_truncated` events: a peer dropped blocks the room did not keep.
    pub truncations: usize,
    /// The room's chain: the longest one.
    pub chain: Vec<SeenBlock>,
}

/// Checks the invariants over every record of a run (any interleaving of the peers' streams, as
/// long as each peer's own records keep their order).
pub fn check(records: &[Record]) -> Result<Summary, Violation> {
    let mut checker = Checker::new();
    for r in records {
        checker.push(r)?;
    }
    checker.finish()
}

/// Each peer's chain as its events tell it (truncations applied); every peer that wrote a record
/// has an entry. Fails on the first block that does not extend its peer's chain or lacks its work.
pub fn chains(records: &[Record]) -> Result<BTreeMap<PeerId, Vec<SeenBlock>>, Violation> {
    let mut checker = Checker::new();
    for r in records {
        checker.push(r)?;
    }
    Ok(checker.chains())
}

/// Checks the invariants one record at a time.
#[derive(Debug, Default)]
pub struct Checker {
    controllers: BTreeMap<Term, PeerId>,
    issuers: BTreeMap<Term, PeerId>,
    /// Every distinct block any peer appended, verified once.
    blocks: Vec<SeenBlock>,
    known: HashMap<SeenBlock, u32>,
    /// Each peer's chain, as indices into `blocks`.
    chains: BTreeMap<PeerId, Vec<u32>>,
    truncations: usize,
    /// Blocks by hash, to rebuild a resumed peer's chain from its tip.
    by_hash: HashMap<String, u32>,
    /// The block accepted for each `(term, tx)`.
    by_term_tx: HashMap<(Term, TxId), u32>,
    /// The block said committed at each transaction.
    committed: BTreeMap<TxId, u32>,
    /// Blocks each peer knows committed.
    commits: HashMap<PeerId, u64>,
}

impl Checker {
    /// A checker that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next record of one peer's stream; fails if it breaks an invariant that can be
    /// decided at once (everything but the common prefix, which only [`finish`](Self::finish)
    /// can judge: a peer may hold an unconfirmed block for a while and drop it later).
    pub fn push(&mut self, r: &Record) -> Result<(), Violation> {
        // Every peer that wrote a record has a chain, if an empty one.
        self.chains.entry(r.peer).or_default();
        match &r.event {
            Event::ControllerElected { term, controller, .. } => {
                let first = *self.controllers.entry(*term).or_insert(*controller);
                if first != *controller {
                    return Err(Violation::SeveralControllers {
                        term: *term,
                        first,
                        second: *controller,
                        named_by: r.peer,
                    });
                }
            }
            Event::ChallengeIssued { term, .. } => {
                let first = *self.issuers.entry(*term).or_insert(r.peer);
                if first != r.peer {
                    return Err(Violation::SeveralIssuers { term: *term, first, second: r.peer });
                }
            }
            Event::BlockAccepted { term, tx, winner, difficulty, nonce, hash, prev, change, .. } => {
                let block = SeenBlock {
                    tx: *tx,
                    term: *term,
                    winner: *winner,
                    difficulty: *difficulty,
                    nonce: *nonce,
                    hash: hash.clone(),
                    prev: prev.clone(),
                    change: *change,
                };
                self.accepted(r.peer, block)?;
            }
            Event::BlockCommitted { tx, .. } => self.committed(r.peer, *tx)?,
            Event::ChainTruncated { height } => {
                let commit = self.commits.get(&r.peer).copied().unwrap_or(0);
                if *height < commit {
                    return Err(Violation::CommittedTruncated { peer: r.peer, height: *height, commit });
                }
                if let Some(chain) = self.chains.get_mut(&r.peer) {
                    chain.truncate(usize::try_from(*height).unwrap_or(usize::MAX));
                }
                self.truncations += 1;
            }
            Event::CommittedConflict { tx, commit } => {
                return Err(Violation::CommittedConflict { peer: r.peer, tx: *tx, commit: *commit });
            }
            Event::Resumed { height, commit, tip, .. } => {
                let rebuilt = self.rebuild(tip.as_deref());
                if rebuilt.len() as u64 != *height {
                    return Err(Violation::UnknownResume { peer: r.peer, height: *height, tip: tip.clone() });
                }
                self.chains.insert(r.peer, rebuilt);
                let known = self.commits.entry(r.peer).or_default();
                *known = (*known).max(*commit);
            }
            _ => {}
        }
        Ok(())
    }

    /// `peer` appended `block`: it must extend the peer's chain, carry its work, and be the only
    /// block of its transaction in its term.
    fn accepted(&mut self, peer: PeerId, block: SeenBlock) -> Result<(), Violation> {
        let chain = self.chains.entry(peer).or_default();
        let height = chain.len() as u64;
        if block.tx != height {
            return Err(Violation::Gap { peer, tx: block.tx, height });
        }
        let tip = match chain.last() {
            Some(&i) => self.blocks[i as usize].hash.clone(),
            // Block 0 links to the room's configuration, which the events do not show:
            // the common prefix judges it.
            None if block.prev.len() == 40 || block.prev.len() == 64 => block.prev.clone(),
            None => zero_like(&block.prev),
        };
        if block.prev != tip {
            return Err(Violation::BrokenLink { peer, tx: block.tx, prev: block.prev, tip });
        }
        let (term, tx, hash) = (block.term, block.tx, block.hash.clone());
        let index = self.intern(block)?;
        self.chains.entry(peer).or_default().push(index);
        // Blocks are known by their hash: the same solution accepted in two terms (by a
        // deposed controller and by its successor) is one block.
        let first = *self.by_term_tx.entry((term, tx)).or_insert(index);
        if self.blocks[first as usize].hash != hash {
            return Err(Violation::TwoBlocksInOneTerm {
                term,
                tx,
                first: self.blocks[first as usize].hash.clone(),
                second: hash,
            });
        }
        Ok(())
    }

    /// The index of `block` among the blocks seen; a block seen for the first time is verified.
    fn intern(&mut self, block: SeenBlock) -> Result<u32, Violation> {
        if let Some(&i) = self.known.get(&block) {
            return Ok(i);
        }
        verify(&block)?;
        let i = u32::try_from(self.blocks.len()).expect("fewer than 2^32 distinct blocks");
        self.known.insert(block.clone(), i);
        self.by_hash.insert(block.hash.clone(), i);
        self.blocks.push(block);
        Ok(i)
    }

    /// `peer` says block `tx` is committed: every peer must say so of the same block.
    fn committed(&mut self, peer: PeerId, tx: TxId) -> Result<(), Violation> {
        // Known only if this peer's chain was described (always, with `resumed`).
        let held = usize::try_from(tx).ok().and_then(|t| self.chains.get(&peer)?.get(t).copied());
        if let Some(index) = held {
            let first = *self.committed.entry(tx).or_insert(index);
            if self.blocks[first as usize].hash != self.blocks[index as usize].hash {
                return Err(Violation::CommittedChanged {
                    tx,
                    first: self.blocks[first as usize].hash.clone(),
                    second: self.blocks[index as usize].hash.clone(),
                    peer,
                });
            }
        }
        let commit = self.commits.entry(peer).or_default();
        *commit = (*commit).max(tx + 1);
        Ok(())
    }

    /// Each peer's chain so far.
    pub fn chains(&self) -> BTreeMap<PeerId, Vec<SeenBlock>> {
        self.chains.iter().map(|(&peer, chain)| (peer, self.resolve(chain))).collect()
    }

    /// Height of one peer's chain so far (0 for a peer not seen).
    pub fn height(&self, peer: PeerId) -> u64 {
        self.chains.get(&peer).map_or(0, |c| c.len() as u64)
    }

    /// Checks that every peer's chain is a prefix of the longest, and sums up the run. With the
    /// room protocol (peers report commits), each peer's chain up to its own commit point: beyond
    /// it, a peer may end holding blocks it never took for committed (a deposed controller's last
    /// block, on a peer that died before the new controller replaced it), which is no harm.
    pub fn finish(&self) -> Result<Summary, Violation> {
        let room: &[u32] = self.chains.values().max_by_key(|c| c.len()).map_or(&[], |c| c.as_slice());
        let room_protocol = !self.commits.is_empty();
        for (&peer, chain) in &self.chains {
            let agreed = match self.commits.get(&peer) {
                Some(&commit) => usize::try_from(commit).unwrap_or(usize::MAX),
                None if room_protocol => 0,
                None => usize::MAX,
            };
            let hash = |i: u32| &self.blocks[i as usize].hash;
            if let Some(at) = chain.iter().zip(room).take(agreed).position(|(&a, &b)| hash(a) != hash(b)) {
                let describe = |i: u32| {
                    let b = &self.blocks[i as usize];
                    format!("term {} winner {} hash {}", b.term, b.winner, b.hash)
                };
                return Err(Violation::Diverged {
                    peer,
                    tx: at as u64,
                    theirs: describe(chain[at]),
                    room: describe(room[at]),
                });
            }
        }
        Ok(Summary {
            blocks: room.len(),
            terms: self.controllers.len(),
            controllers_per_term: self.controllers.clone(),
            peers: self.chains.len(),
            truncations: self.truncations,
            chain: self.resolve(room),
        })
    }

    /// The chain ending in the block hashed `tip`, following `prev` links through the blocks seen;
    /// it stops at the first block it does not know (block 0's `prev` is the configuration's
    /// digest, never a block).
    fn rebuild(&self, tip: Option<&str>) -> Vec<u32> {
        let mut chain = Vec::new();
        let mut next = tip.and_then(|t| self.by_hash.get(t)).copied();
        while let Some(i) = next {
            chain.push(i);
            let b = &self.blocks[i as usize];
            next = if b.tx == 0 { None } else { self.by_hash.get(&b.prev).copied() };
            if chain.len() > self.blocks.len() {
                break;
            }
        }
        chain.reverse();
        chain
    }

    fn resolve(&self, chain: &[u32]) -> Vec<SeenBlock> {
        chain.iter().map(|&i| self.blocks[i as usize].clone()).collect()
    }
}

/// The zero hash as long as `like` (block 0's `prev`); SHA-1's length if `like` is odd.
fn zero_like(like: &str) -> String {
    let len = if like.len() == 64 { 64 } else { 40 };
    "0".repeat(len)
}

fn digest(tx: TxId, field: &'static str, value: &str) -> Result<Digest, Violation> {
    let bad = || Violation::BadDigest { tx, field, value: value.to_string() };
    let bytes = hex::decode(value).map_err(|_| bad())?;
    match bytes.len() {
        20 => Ok(Digest::Sha1(bytes.try_into().map_err(|_| bad())?)),
        32 => Ok(Digest::Sha256(bytes.try_into().map_err(|_| bad())?)),
        _ => Err(bad()),
    }
}

/// The block's hash is its proof of work, with enough leading zeros.
fn verify(b: &SeenBlock) -> Result<(), Violation> {
    let prev = digest(b.tx, "prev", &b.prev)?;
    let hash = digest(b.tx, "hash", &b.hash)?;
    // A change of members is identified by its digest; it carries no work.
    let proof = match b.change {
        Some(change) => change.digest(hash.alg(), &prev, b.tx),
        None => pow::proof(&prev, b.tx, b.winner, b.nonce),
    };
    if proof != hash {
        return Err(Violation::WrongHash {
            tx: b.tx,
            term: b.term,
            winner: b.winner,
            nonce: b.nonce,
            hash: b.hash.clone(),
            proof: proof.to_hex(),
        });
    }
    if proof.leading_zeros() < u32::from(b.difficulty) {
        return Err(Violation::InsufficientWork { tx: b.tx, zeros: proof.leading_zeros(), difficulty: b.difficulty });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer::pow::{HashAlg, Template};

    const DIFFICULTY: u8 = 6;

    fn record(peer: PeerId, event: Event) -> Record {
        Record { ts_ms: 0, peer, event }
    }

    /// A `block_accepted` event, built from JSON so fields added later (with serde defaults) need no
    /// change here.
    fn accepted(term: Term, tx: TxId, winner: PeerId, difficulty: u8, nonce: u64, hash: &str, prev: &str) -> Event {
        let v = serde_json::json!({
            "event": "block_accepted", "term": term, "tx": tx, "winner": winner, "difficulty": difficulty,
            "nonce": nonce, "hash": hash, "prev": prev,
        });
        serde_json::from_value(v).expect("a block_accepted event")
    }

    /// The same event with one field changed.
    fn with(event: &Event, field: &str, value: serde_json::Value) -> Event {
        let mut v = serde_json::to_value(event).expect("serialize");
        v[field] = value;
        serde_json::from_value(v).expect("deserialize")
    }

    /// A valid chain of `n` blocks in `term`, mined for real at a low difficulty.
    fn mine(n: u64, term: Term, winner: PeerId) -> Vec<Event> {
        mine_on(Digest::zero(HashAlg::Sha1), n, term, winner)
    }

    /// The same on `base` (the room protocol's block 0 links to its configuration's digest).
    fn mine_on(base: Digest, n: u64, term: Term, winner: PeerId) -> Vec<Event> {
        let mut prev = base;
        (0..n)
            .map(|tx| {
                let nonce = Template::new(&prev, tx, winner)
                    .search(u32::from(DIFFICULTY), 0, u64::MAX)
                    .expect("a nonce at a low difficulty");
                let hash = pow::proof(&prev, tx, winner, nonce);
                let event = accepted(term, tx, winner, DIFFICULTY, nonce, &hash.to_hex(), &prev.to_hex());
                prev = hash;
                event
            })
            .collect()
    }

    fn elected(term: Term, controller: PeerId) -> Event {
        Event::ControllerElected { term, controller, votes: 3 }
    }

    #[test]
    fn a_clean_run_sums_up() {
        let blocks = mine(3, 1, 7);
        let mut records = vec![record(1, elected(1, 9)), record(2, elected(1, 9))];
        records.extend(blocks.iter().map(|e| record(1, e.clone())));
        records.extend(blocks[..2].iter().map(|e| record(2, e.clone())));
        records.push(record(9, Event::ChallengeIssued { term: 1, tx: 0, difficulty: DIFFICULTY }));
        let summary = check(&records).expect("valid");
        assert_eq!(summary.blocks, 3);
        assert_eq!(summary.terms, 1);
        assert_eq!(summary.controllers_per_term, BTreeMap::from([(1, 9)]));
        assert_eq!(summary.peers, 3);
        assert_eq!(summary.chain.iter().map(|b| b.tx).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(chains(&records).expect("valid")[&2].len(), 2);
    }

    #[test]
    fn two_controllers_in_one_term_are_a_violation() {
        let records = [record(1, elected(2, 9)), record(2, elected(2, 8))];
        let v = check(&records).unwrap_err();
        assert_eq!(v, Violation::SeveralControllers { term: 2, first: 9, second: 8, named_by: 2 });
        assert!(v.to_string().contains("term 2 had several controllers"), "{v}");
    }

    #[test]
    fn two_issuers_in_one_term_are_a_violation() {
        let challenge = Event::ChallengeIssued { term: 1, tx: 0, difficulty: 1 };
        let records = [record(1, challenge.clone()), record(2, challenge)];
        assert!(matches!(check(&records), Err(Violation::SeveralIssuers { term: 1, .. })));
    }

    #[test]
    fn gaps_broken_links_and_forged_work_are_violations() {
        let blocks = mine(2, 1, 7);
        assert!(matches!(check(&[record(1, blocks[1].clone())]), Err(Violation::Gap { tx: 1, height: 0, .. })));

        let other = mine(2, 1, 8);
        let records = [record(1, blocks[0].clone()), record(1, other[1].clone())];
        assert!(matches!(check(&records), Err(Violation::BrokenLink { tx: 1, .. })));

        let nonce = serde_json::to_value(&blocks[0]).expect("json")["nonce"].as_u64().expect("nonce");
        let forged = with(&blocks[0], "nonce", (nonce + 1).into());
        assert!(matches!(check(&[record(1, forged)]), Err(Violation::WrongHash { tx: 0, .. })));

        let greedy = with(&blocks[0], "difficulty", 100.into());
        assert!(matches!(check(&[record(1, greedy)]), Err(Violation::InsufficientWork { tx: 0, .. })));

        let garbled = with(&blocks[0], "hash", "xyz".into());
        assert!(matches!(check(&[record(1, garbled)]), Err(Violation::BadDigest { field: "hash", .. })));
    }

    fn hash_of(e: &Event) -> String {
        match e {
            Event::BlockAccepted { hash, .. } => hash.clone(),
            _ => panic!("not a block"),
        }
    }

    fn committed(tx: TxId) -> Event {
        Event::BlockCommitted { tx, term: 1, winner: 7 }
    }

    #[test]
    fn a_room_protocol_chain_links_block_0_to_its_configuration() {
        let base = pow::proof(&Digest::zero(HashAlg::Sha1), 99, 99, 99);
        let blocks = mine_on(base, 2, 1, 7);
        let records: Vec<Record> = blocks.iter().map(|e| record(1, e.clone())).collect();
        assert_eq!(check(&records).expect("valid").blocks, 2);
    }

    #[test]
    fn two_blocks_of_one_transaction_in_one_term_are_a_violation() {
        let (ours, theirs) = (mine(1, 1, 7), mine(1, 1, 8));
        let records = [record(1, ours[0].clone()), record(2, theirs[0].clone())];
        assert!(matches!(check(&records), Err(Violation::TwoBlocksInOneTerm { term: 1, tx: 0, .. })));
    }

    #[test]
    fn what_is_committed_never_changes_nor_is_dropped() {
        let (ours, theirs) = (mine(2, 1, 7), mine(2, 2, 8));
        // Two peers committing different blocks at one height.
        let records = [
            record(1, ours[0].clone()),
            record(1, committed(0)),
            record(2, theirs[0].clone()),
            record(2, committed(0)),
        ];
        assert!(matches!(check(&records), Err(Violation::CommittedChanged { tx: 0, peer: 2, .. })));

        // Dropping an uncommitted block is fine, a committed one is not.
        let mut records: Vec<Record> = ours.iter().map(|e| record(1, e.clone())).collect();
        records.push(record(1, committed(0)));
        records.push(record(1, Event::ChainTruncated { height: 1 }));
        check(&records).expect("block 1 was not committed");
        records.push(record(1, Event::ChainTruncated { height: 0 }));
        assert_eq!(check(&records).unwrap_err(), Violation::CommittedTruncated { peer: 1, height: 0, commit: 1 });

        let asked = [record(3, Event::CommittedConflict { tx: 2, commit: 5 })];
        assert_eq!(check(&asked).unwrap_err(), Violation::CommittedConflict { peer: 3, tx: 2, commit: 5 });
    }

    /// Found by a 500-cycle chaos run: one solution accepted in two terms (by a deposed controller
    /// and by its successor, when the miner sent it again) is one block, known by its hash.
    #[test]
    fn one_solution_accepted_in_two_terms_is_one_block() {
        let block = mine(1, 1, 7).remove(0);
        let again = with(&block, "term", 2.into());
        let records = [record(1, block), record(1, committed(0)), record(2, again), record(2, committed(0))];
        assert_eq!(check(&records).expect("one block").blocks, 1);
    }

    #[test]
    fn a_resumed_peer_continues_from_the_chain_it_restored() {
        let blocks = mine(3, 1, 7);
        let resumed = |height: u64, tip: Option<String>| Event::Resumed { term: 1, height, commit: height, tip };
        let mut records: Vec<Record> = blocks.iter().map(|e| record(2, e.clone())).collect();
        records.push(record(1, blocks[0].clone()));
        // Peer 1's second run restored two blocks (the second one's event was lost to a kill).
        records.push(record(1, resumed(2, Some(hash_of(&blocks[1])))));
        records.push(record(1, blocks[2].clone()));
        let summary = check(&records).expect("valid");
        assert_eq!(chains(&records).unwrap()[&1].len(), 3);
        assert_eq!(summary.blocks, 3);
        // It cannot drop what it restored as committed.
        records.push(record(1, Event::ChainTruncated { height: 1 }));
        assert!(matches!(check(&records), Err(Violation::CommittedTruncated { peer: 1, .. })));

        let unknown = [record(1, resumed(1, Some("ab".repeat(20))))];
        assert!(matches!(check(&unknown), Err(Violation::UnknownResume { peer: 1, height: 1, .. })));
    }

    #[test]
    fn a_dropped_suffix_is_fine_but_a_kept_fork_is_not() {
        let ours = mine(2, 1, 7);
        let theirs = mine(2, 2, 8);
        // Peer 1 held block 1 of the old term, then dropped it for the new controller's chain.
        let mut records: Vec<Record> = ours.iter().map(|e| record(1, e.clone())).collect();
        records.push(record(1, Event::ChainTruncated { height: 0 }));
        records.extend(theirs.iter().map(|e| record(1, e.clone())));
        records.extend(theirs.iter().map(|e| record(2, e.clone())));
        let summary = check(&records).expect("the suffix was dropped");
        assert_eq!(summary.truncations, 1);
        assert_eq!(summary.chain[0].winner, 8);

        // Peer 3 kept its fork.
        records.extend(ours.iter().map(|e| record(3, e.clone())));
        assert!(matches!(check(&records), Err(Violation::Diverged { tx: 0, .. })));
    }

    #[test]
    fn with_commits_only_committed_blocks_must_agree_at_the_end() {
        // Block 0 is the room's; block 1 of term 1 (winner 7) was never committed: peer 1 died
        // holding it, while the room replaced it in term 2 (winner 8) and committed that.
        let ours = mine(2, 1, 7);
        let prev = pow::Digest::Sha1(<[u8; 20]>::try_from(hex::decode(hash_of(&ours[0])).unwrap()).unwrap());
        let nonce = Template::new(&prev, 1, 8).search(u32::from(DIFFICULTY), 0, u64::MAX).expect("a nonce");
        let hash = pow::proof(&prev, 1, 8, nonce);
        let theirs = accepted(2, 1, 8, DIFFICULTY, nonce, &hash.to_hex(), &prev.to_hex());
        let mut records: Vec<Record> = ours.iter().map(|e| record(1, e.clone())).collect();
        records.extend([record(1, committed(0)), record(2, ours[0].clone()), record(2, theirs)]);
        records.extend([record(2, committed(0)), record(2, committed(1))]);
        check(&records).expect("an uncommitted block on a dead peer is no violation");
        // Had block 1 been committed before, peer 1 would hold a fork of a committed block.
        records.push(record(3, ours[0].clone()));
        records.push(record(3, ours[1].clone()));
        records.push(record(3, committed(1)));
        assert!(check(&records).is_err(), "two different blocks committed at tx 1");
    }
}
