//! The peer's data directory: who the peer is ([`Identity`], drawn once when the directory is
//! created) and what the room protocol must find again after a restart ([`Durable`]: term and vote,
//! the chain, the room configuration of block 0, the commit index). It is one `redb` database,
//! `peer.redb`; [`Store::apply`] writes a batch of [`Write`]s in one transaction that is on disk
//! (fsync) before it returns, so a message that depends on a write is sent only after `apply`
//! returned (`spec/ROOM.md`, "Durable state").
//!
//! The store checks what it can cheaply check and refuses the rest with [`StoreError::Refused`]:
//! blocks are appended at the stored height and link by hash, a term never goes back, a vote once
//! cast in a term never changes, the commit index never goes back nor beyond the chain, and no
//! committed block is truncated. A directory it cannot read is reported, never reset.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Builder, Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::pow::Digest;
use crate::protocol::{Block, PeerId, Term};
use hashvote_core::room::{Restored, RoomConfig};

/// The version of the layout below; a directory written by another layout is refused.
/// 2: blocks carry a change of members (`Block::change`).
pub const FORMAT: u64 = 2;

/// The database in a data directory.
const DB_FILE: &str = "peer.redb";
/// The database while it is being created: renamed to [`DB_FILE`] once the identity is on disk, so
/// a crash during creation leaves no half-made data directory (and no identity anyone has seen).
const NEW_FILE: &str = "peer.redb.new";

/// Identity and format: `format`, `id` (u32), `key`, `created_ms` (u64, little-endian), `room` (UTF-8).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The protocol's small state: `hard` (postcard `(Term, Option<PeerId>)`), `commit` (u64 LE), `config`.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// The chain, one postcard-encoded block per height, so appending never rewrites earlier blocks.
const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");

const HARD: &str = "hard";
const COMMIT: &str = "commit";
const CONFIG: &str = "config";

/// Who this peer is: fixed when its data directory is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The peer's id (nonzero).
    pub id: PeerId,
    /// A random number drawn once with the directory: (id, key) is a member of a room.
    pub key: u64,
    /// When the directory was created (Unix ms).
    pub created_ms: u64,
}

/// What the room protocol needs back after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Durable {
    /// The highest term this peer has entered.
    pub term: Term,
    /// Whom it granted its vote in `term`.
    pub voted_for: Option<PeerId>,
    /// The chain, block `i` at index `i`.
    pub blocks: Vec<Block>,
    /// The room configuration recorded with block 0.
    pub config: Option<RoomConfig>,
    /// Blocks below this height are committed (never truncated).
    pub commit: u64,
}

/// One change to write (the room protocol's [`hashvote_core::room::Write`]). [`Store::apply`]
/// writes a batch in one transaction, in order: a vote is written whole (a new term without a vote
/// clears the old vote); blocks are appended at the stored height, each linking to the one before;
/// truncating to 0 also drops the configuration, which belongs to block 0; the commit index never
/// goes back, nor beyond the height at the end of the batch.
pub use hashvote_core::room::Write;

impl From<Durable> for Restored {
    fn from(d: Durable) -> Self {
        Self { term: d.term, voted_for: d.voted_for, config: d.config, blocks: d.blocks, commit: d.commit }
    }
}

/// What a newly created data directory is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIdentity {
    /// The peer's id; `None` draws a random nonzero one. Given for an existing directory, it must
    /// be the stored id.
    pub id: Option<PeerId>,
    /// The room's topic prefix; an existing directory must belong to this room.
    pub room: String,
}

/// Why a data directory cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory holds something else than a hashvote database.
    #[error("{} is not a hashvote data directory: {why}", .dir.display())]
    NotDataDir {
        /// The directory.
        dir: PathBuf,
        /// What is there instead.
        why: String,
    },
    /// The directory belongs to another room.
    #[error("data directory {} belongs to room `{stored}`, not `{wanted}`", .dir.display())]
    OtherRoom {
        /// The directory.
        dir: PathBuf,
        /// Its room's topic prefix.
        stored: String,
        /// The room this peer was asked to join.
        wanted: String,
    },
    /// The directory belongs to a peer with another id.
    #[error("data directory {} belongs to peer {stored}, not {wanted}", .dir.display())]
    OtherPeer {
        /// The directory.
        dir: PathBuf,
        /// Its peer's id.
        stored: PeerId,
        /// The id this peer was asked to have.
        wanted: PeerId,
    },
    /// The directory was written by a newer build.
    #[error(
        "data directory {} has format version {found}, newer than this build reads ({FORMAT}); run a newer hashvote",
        .dir.display()
    )]
    TooNew {
        /// The directory.
        dir: PathBuf,
        /// Its format version.
        found: u64,
    },
    /// The directory was written by an older build, whose blocks this one does not decode.
    #[error(
        "data directory {} has format version {found}, older than this build reads ({FORMAT}); move it aside to start the peer afresh",
        .dir.display()
    )]
    TooOld {
        /// The directory.
        dir: PathBuf,
        /// Its format version.
        found: u64,
    },
    /// The database cannot be read, or what it holds is inconsistent.
    #[error("data directory {} is damaged or unreadable: {reason}", .dir.display())]
    Damaged {
        /// The directory.
        dir: PathBuf,
        /// What is wrong (redb's reason, or which check failed).
        reason: String,
    },
    /// Another process has the database open.
    #[error("data directory {} is in use by another running process (its database is locked)", .dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The operating system denied access.
    #[error("permission denied on data directory {}", .dir.display())]
    Permission {
        /// The directory.
        dir: PathBuf,
    },
    /// Any other I/O failure.
    #[error("I/O error in data directory {}: {reason}", .dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// Peer ids are nonzero.
    #[error("cannot create data directory {}: peer id 0 is reserved", .dir.display())]
    ZeroId {
        /// The directory.
        dir: PathBuf,
    },
    /// A batch broke one of the store's rules; nothing of it was written.
    #[error("write to data directory {} refused: {why}", .dir.display())]
    Refused {
        /// The directory.
        dir: PathBuf,
        /// The rule.
        why: Refusal,
    },
}

/// The rule a refused batch broke (see [`Write`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An appended block is not at the height the chain has.
    #[error("block {got} appended at height {height}")]
    NotAtHeight {
        /// The block's transaction id.
        got: u64,
        /// The chain's height when it came.
        height: u64,
    },
    /// An appended block's `prev` is not the hash of the block before it.
    #[error("block {0} does not link to block {prev}", prev = .0 - 1)]
    Unlinked(u64),
    /// The term would go back.
    #[error("term {got} is below the stored term {stored}")]
    TermBackwards {
        /// The stored term.
        stored: Term,
        /// The written term.
        got: Term,
    },
    /// A vote cast in a term would change.
    #[error("the vote of term {term} went to {stored}, it cannot become {got:?}")]
    VoteChanged {
        /// The term.
        term: Term,
        /// Whom the stored vote went to.
        stored: PeerId,
        /// The written vote.
        got: Option<PeerId>,
    },
    /// Truncation would drop committed blocks.
    #[error("keeping {keep} blocks would drop committed ones (commit {commit})")]
    BelowCommit {
        /// Blocks to keep.
        keep: u64,
        /// The commit index.
        commit: u64,
    },
    /// The commit index would go back.
    #[error("commit {got} is below the stored commit {stored}")]
    CommitBackwards {
        /// The stored commit index.
        stored: u64,
        /// The written one.
        got: u64,
    },
    /// The commit index would be beyond the chain.
    #[error("commit {commit} is beyond the chain's height {height}")]
    CommitBeyondHeight {
        /// The commit index at the end of the batch.
        commit: u64,
        /// The height at the end of the batch.
        height: u64,
    },
}

/// An open data directory; holds the database's lock until dropped.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    db: Database,
    state: State,
    /// Batches staged (committed without fsync) since the last durable commit.
    staged: usize,
    /// The directory held a database before [`Store::open`].
    existed: bool,
}

/// Most batches staged before one is made durable anyway: redb frees pages only in durable
/// commits, so a peer that never promises anything (a non-voter) still bounds its file.
const MAX_STAGED: usize = 64;

/// What [`Store::apply`] checks writes against: the stored state minus the chain itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    term: Term,
    voted_for: Option<PeerId>,
    height: u64,
    tip: Option<Digest>,
    commit: u64,
}

impl Store {
    /// Opens `dir`, creating it and a fresh identity if it does not exist or is empty. Fails with
    /// a precise error otherwise; never resets a directory it cannot read.
    pub fn open(dir: &Path, create: NewIdentity) -> Result<(Store, Identity, Durable), StoreError> {
        let path = dir.join(DB_FILE);
        let existed = match fs::symlink_metadata(&path) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_fresh(dir, &create)?;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(StoreError::NotDataDir { dir: dir.to_owned(), why: "it is not a directory".into() });
            }
            Err(e) => return Err(io_error(dir, e)),
        };
        let db = Builder::new().set_check_integrity_on_open(true).open(&path).map_err(|e| redb_error(dir, e))?;
        let (identity, durable) = read(dir, &db, &create)?;
        let state = State {
            term: durable.term,
            voted_for: durable.voted_for,
            height: durable.blocks.len() as u64,
            tip: durable.blocks.last().map(|b| b.hash),
            commit: durable.commit,
        };
        Ok((Store { dir: dir.to_owned(), db, state, staged: 0, existed }, identity, durable))
    }

    /// Whether the directory held a database before this run (a restart, not a new peer).
    pub fn existed(&self) -> bool {
        self.existed
    }

    /// Writes `writes` in one transaction, in order, durable (fsync) before it returns, with
    /// whatever was staged before. A batch that breaks a rule (see [`Write`]) is refused whole,
    /// with [`StoreError::Refused`].
    pub fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        self.commit(writes, true)
    }

    /// Writes `writes` in one transaction, in order, without waiting for the disk: a crash may
    /// lose them (and every batch staged after the last durable one), never tear them. Before a
    /// message that depends on them goes out, [`Store::sync`] makes them durable.
    pub fn stage(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        self.commit(writes, self.staged + 1 >= MAX_STAGED)
    }

    /// Makes every staged batch durable (one fsync; nothing when none is staged).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.staged == 0 {
            return Ok(());
        }
        self.commit(&[], true)
    }

    fn commit(&mut self, writes: &[Write], durable: bool) -> Result<(), StoreError> {
        if writes.is_empty() && !(durable && self.staged > 0) {
            return Ok(());
        }
        let dir = &self.dir;
        let mut txn = self.db.begin_write().map_err(|e| redb_error(dir, e))?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(|e| redb_error(dir, redb::Error::from(e)))?;
        }
        let mut next = self.state.clone();
        match write_batch(&txn, &mut next, writes) {
            Ok(()) => {}
            Err(e) => {
                // Nothing of the batch may reach the disk; an abort that fails leaves it unwritten too.
                let _ = txn.abort();
                return Err(match e {
                    BatchError::Refused(why) => StoreError::Refused { dir: dir.clone(), why },
                    BatchError::Db(e) => redb_error(dir, e),
                });
            }
        }
        txn.commit().map_err(|e| redb_error(dir, e))?;
        self.state = next;
        self.staged = if durable { 0 } else { self.staged + 1 };
        Ok(())
    }
}

/// Why a batch failed inside its transaction.
enum BatchError {
    Refused(Refusal),
    Db(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for BatchError {
    fn from(e: E) -> Self {
        Self::Db(e.into())
    }
}

fn write_batch(txn: &redb::WriteTransaction, next: &mut State, writes: &[Write]) -> Result<(), BatchError> {
    let mut state = txn.open_table(STATE)?;
    let mut blocks = txn.open_table(BLOCKS)?;
    for write in writes {
        match write {
            Write::Vote { term, voted_for } => {
                if *term < next.term {
                    return Err(BatchError::Refused(Refusal::TermBackwards { stored: next.term, got: *term }));
                }
                if let Some(stored) = next.voted_for
                    && *term == next.term
                    && *voted_for != Some(stored)
                {
                    return Err(BatchError::Refused(Refusal::VoteChanged { term: *term, stored, got: *voted_for }));
                }
                state.insert(HARD, encode(&(*term, *voted_for)).as_slice())?;
                (next.term, next.voted_for) = (*term, *voted_for);
            }
            Write::Append(new) => {
                for block in new {
                    if block.tx != next.height {
                        return Err(BatchError::Refused(Refusal::NotAtHeight { got: block.tx, height: next.height }));
                    }
                    if next.tip.is_some_and(|tip| tip != block.prev) {
                        return Err(BatchError::Refused(Refusal::Unlinked(block.tx)));
                    }
                    blocks.insert(block.tx, encode(block).as_slice())?;
                    next.height += 1;
                    next.tip = Some(block.hash);
                }
            }
            Write::Truncate(keep) => {
                if *keep < next.commit {
                    return Err(BatchError::Refused(Refusal::BelowCommit { keep: *keep, commit: next.commit }));
                }
                if *keep < next.height {
                    for h in *keep..next.height {
                        blocks.remove(h)?;
                    }
                    next.height = *keep;
                    next.tip = match keep.checked_sub(1) {
                        None => None,
                        Some(last) => {
                            let bytes = blocks.get(last)?.map(|v| v.value().to_vec());
                            let block = bytes.and_then(|b| postcard::from_bytes::<Block>(&b).ok());
                            // open() checked every stored block, and this batch stored only valid ones.
                            let block = block.ok_or_else(|| {
                                BatchError::Db(redb::Error::Corrupted(format!(
                                    "block {last} vanished or is unreadable"
                                )))
                            })?;
                            Some(block.hash)
                        }
                    };
                    if *keep == 0 {
                        state.remove(CONFIG)?;
                    }
                }
            }
            Write::Config(config) => {
                let bytes = postcard::to_stdvec(config).expect("postcard serialization into a Vec is infallible");
                state.insert(CONFIG, bytes.as_slice())?;
            }
            Write::Commit(commit) => {
                if *commit < next.commit {
                    return Err(BatchError::Refused(Refusal::CommitBackwards { stored: next.commit, got: *commit }));
                }
                state.insert(COMMIT, commit.to_le_bytes().as_slice())?;
                next.commit = *commit;
            }
        }
    }
    if next.commit > next.height {
        return Err(BatchError::Refused(Refusal::CommitBeyondHeight { commit: next.commit, height: next.height }));
    }
    Ok(())
}

fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serializing plain structs into a Vec cannot fail.
    postcard::to_allocvec(value).expect("postcard encodes into a Vec")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Makes `dir` a data directory with a fresh identity, provided it is missing or empty (a
/// leftover of an interrupted creation does not count: no one has seen its identity).
fn create_fresh(dir: &Path, new: &NewIdentity) -> Result<(), StoreError> {
    if new.id == Some(0) {
        return Err(StoreError::ZeroId { dir: dir.to_owned() });
    }
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let mut foreign: Vec<String> = fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| io_error(dir, e))?;
    foreign.retain(|name| name != NEW_FILE);
    foreign.sort();
    if let Some(first) = foreign.first() {
        let why = match foreign.len() - 1 {
            0 => format!("it holds `{first}` but no {DB_FILE}"),
            more => format!("it holds `{first}` and {more} more entries but no {DB_FILE}"),
        };
        return Err(StoreError::NotDataDir { dir: dir.to_owned(), why });
    }

    let tmp = dir.join(NEW_FILE);
    let db = match Builder::new().create(&tmp) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Locked { dir: dir.to_owned() }),
        Err(_) => {
            // A creation interrupted before redb wrote a valid header.
            fs::remove_file(&tmp).map_err(|e| io_error(dir, e))?;
            Builder::new().create(&tmp).map_err(|e| redb_error(dir, e))?
        }
    };
    let identity = Identity {
        id: new.id.unwrap_or_else(|| rand::random_range(1..=PeerId::MAX)),
        key: rand::random(),
        created_ms: now_ms(),
    };
    let write = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("format", FORMAT.to_le_bytes().as_slice())?;
            meta.insert("id", identity.id.to_le_bytes().as_slice())?;
            meta.insert("key", identity.key.to_le_bytes().as_slice())?;
            meta.insert("created_ms", identity.created_ms.to_le_bytes().as_slice())?;
            meta.insert("room", new.room.as_bytes())?;
            txn.open_table(STATE)?;
            txn.open_table(BLOCKS)?;
        }
        txn.commit()?;
        Ok(())
    };
    write().map_err(|e| redb_error(dir, e))?;
    db.close().map_err(|e| redb_error(dir, e))?;
    fs::rename(&tmp, dir.join(DB_FILE)).map_err(|e| io_error(dir, e))?;
    // The rename is durable only once the directory is.
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

/// Reads and checks everything stored.
fn read(dir: &Path, db: &Database, create: &NewIdentity) -> Result<(Identity, Durable), StoreError> {
    let txn = db.begin_read().map_err(|e| redb_error(dir, e))?;
    let identity = read_identity(dir, &txn, create)?;
    let mut durable = read_state(dir, &txn)?;
    durable.blocks = read_blocks(dir, &txn)?;
    let (commit, height) = (durable.commit, durable.blocks.len());
    if commit > height as u64 {
        let reason = format!("the commit {commit} is beyond the chain's height {height}");
        return Err(StoreError::Damaged { dir: dir.to_owned(), reason });
    }
    Ok((identity, durable))
}

/// Reads the identity and checks that the directory is of our format, room and peer.
fn read_identity(dir: &Path, txn: &ReadTransaction, create: &NewIdentity) -> Result<Identity, StoreError> {
    let damaged = |reason: String| StoreError::Damaged { dir: dir.to_owned(), reason };
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => {
            let why = format!("its {DB_FILE} is a redb database without hashvote metadata");
            return Err(StoreError::NotDataDir { dir: dir.to_owned(), why });
        }
        Err(e) => return Err(redb_error(dir, e)),
    };
    let row = |name: &str| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(meta.get(name).map_err(|e| redb_error(dir, e))?.map(|v| v.value().to_vec()))
    };
    let number = |name: &str| -> Result<u64, StoreError> {
        let bytes = row(name)?.ok_or_else(|| damaged(format!("meta row `{name}` is missing")))?;
        let bytes: [u8; 8] = bytes.try_into().map_err(|_| damaged(format!("meta row `{name}` is not 8 bytes")))?;
        Ok(u64::from_le_bytes(bytes))
    };
    match number("format")? {
        0 => return Err(damaged("format version 0".into())),
        found if found > FORMAT => return Err(StoreError::TooNew { dir: dir.to_owned(), found }),
        found if found < FORMAT => return Err(StoreError::TooOld { dir: dir.to_owned(), found }),
        _ => {}
    }
    let id = row("id")?.ok_or_else(|| damaged("meta row `id` is missing".into()))?;
    let id = <[u8; 4]>::try_from(id).map_err(|_| damaged("meta row `id` is not 4 bytes".into()))?;
    let identity = Identity { id: PeerId::from_le_bytes(id), key: number("key")?, created_ms: number("created_ms")? };
    let room = row("room")?.ok_or_else(|| damaged("meta row `room` is missing".into()))?;
    let room = String::from_utf8(room).map_err(|_| damaged("meta row `room` is not UTF-8".into()))?;
    if room != create.room {
        return Err(StoreError::OtherRoom { dir: dir.to_owned(), stored: room, wanted: create.room.clone() });
    }
    if let Some(wanted) = create.id
        && wanted != identity.id
    {
        return Err(StoreError::OtherPeer { dir: dir.to_owned(), stored: identity.id, wanted });
    }
    Ok(identity)
}

/// Reads the protocol's small state (term and vote, commit index, room configuration, each at its
/// starting value when absent): what is stored but the blocks.
fn read_state(dir: &Path, txn: &ReadTransaction) -> Result<Durable, StoreError> {
    let damaged = |reason: String| StoreError::Damaged { dir: dir.to_owned(), reason };
    let state = txn.open_table(STATE).map_err(|e| redb_error(dir, e))?;
    let get = |name: &str| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(state.get(name).map_err(|e| redb_error(dir, e))?.map(|v| v.value().to_vec()))
    };
    let (term, voted_for) = match get(HARD)? {
        None => (0, None),
        Some(bytes) => postcard::from_bytes::<(Term, Option<PeerId>)>(&bytes)
            .map_err(|e| damaged(format!("the term and vote do not decode ({e})")))?,
    };
    let commit = match get(COMMIT)? {
        None => 0,
        Some(bytes) => u64::from_le_bytes(bytes.try_into().map_err(|_| damaged("the commit is not 8 bytes".into()))?),
    };
    let config = match get(CONFIG)? {
        None => None,
        Some(bytes) => Some(
            postcard::from_bytes::<RoomConfig>(&bytes)
                .map_err(|e| damaged(format!("the room configuration does not decode ({e})")))?,
        ),
    };
    Ok(Durable { term, voted_for, blocks: Vec::new(), config, commit })
}

/// Reads the chain, checking that every height is filled, each block is stored at its own
/// height and links to the one before.
fn read_blocks(dir: &Path, txn: &ReadTransaction) -> Result<Vec<Block>, StoreError> {
    let damaged = |reason: String| StoreError::Damaged { dir: dir.to_owned(), reason };
    let table = txn.open_table(BLOCKS).map_err(|e| redb_error(dir, e))?;
    let mut blocks: Vec<Block> = Vec::new();
    for row in table.iter().map_err(|e| redb_error(dir, e))? {
        let (key, value) = row.map_err(|e| redb_error(dir, e))?;
        let (height, expected) = (key.value(), blocks.len() as u64);
        if height != expected {
            return Err(damaged(format!("the chain skips from height {expected} to {height}")));
        }
        let block: Block = postcard::from_bytes(value.value())
            .map_err(|e| damaged(format!("block {height} does not decode ({e})")))?;
        if block.tx != height {
            return Err(damaged(format!("block {} is stored at height {height}", block.tx)));
        }
        if blocks.last().is_some_and(|prev| prev.hash != block.prev) {
            return Err(damaged(format!("block {height} does not link to block {}", height - 1)));
        }
        blocks.push(block);
    }
    Ok(blocks)
}

/// Maps an I/O error to the concern a user acts on.
fn io_error(dir: &Path, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::PermissionDenied => StoreError::Permission { dir: dir.to_owned() },
        // redb reports a file that is not a database as InvalidData.
        io::ErrorKind::InvalidData => StoreError::Damaged { dir: dir.to_owned(), reason: e.to_string() },
        _ => StoreError::Io { dir: dir.to_owned(), reason: e.to_string() },
    }
}

/// Maps a redb error; its text goes into the message once, and is not kept as a source.
fn redb_error(dir: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StoreError::Locked { dir: dir.to_owned() }
        }
        redb::Error::Io(e) => io_error(dir, e),
        e => StoreError::Damaged { dir: dir.to_owned(), reason: e.to_string() },
    }
}

#[cfg(test)]
mod tests;
