use std::error::Error as _;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use super::*;
use hashvote_core::room::Member;

/// A room configuration that tells `n` apart from others.
fn config(n: u64) -> RoomConfig {
    RoomConfig::new(vec![Member { id: 1, key: n }, Member { id: 2, key: n + 1 }]).unwrap()
}
use crate::pace::Pace;
use crate::pow::HashAlg;

/// Set in a child process: the directory `crash_child` writes to until it is killed.
const CRASH_CHILD: &str = "HASHVOTE_STORE_TEST_CRASH_CHILD";
/// Set in a child process run as another user: the directory `permission_child` tries to open.
const PERMISSION_CHILD: &str = "HASHVOTE_STORE_TEST_PERMISSION_CHILD";

fn room(id: Option<PeerId>) -> NewIdentity {
    NewIdentity { id, room: "sd".into() }
}

/// A block on top of `tip` (not a valid proof of work: the store does not check work).
fn block_after(tip: Option<&Block>, term: Term) -> Block {
    let tx = tip.map_or(0, |b| b.tx + 1);
    let prev = tip.map_or(Digest::zero(HashAlg::Sha1), |b| b.hash);
    let mut hash = [0u8; 20];
    hash[..8].copy_from_slice(&tx.to_be_bytes());
    hash[8..16].copy_from_slice(&term.to_be_bytes());
    hash[19] = 0xAB;
    Block {
        tx,
        term,
        alg: HashAlg::Sha1,
        difficulty: 1,
        pace: Pace::Fixed(1),
        issued_ms: tx,
        solved_ms: tx + 1,
        prev,
        miner: 7,
        nonce: tx,
        hash: Digest::Sha1(hash),
        change: None,
    }
}

/// `n` blocks of term `term` on top of `chain`.
fn extend(chain: &[Block], n: usize, term: Term) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    for _ in 0..n {
        let tip = out.last().or(chain.last());
        out.push(block_after(tip, term));
    }
    out
}

/// Asserts `e` is one line naming `dir` and containing `needle`, with no source to print again.
fn assert_message(e: &StoreError, dir: &Path, needle: &str) {
    let text = e.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains(&dir.display().to_string()), "names the directory: {text}");
    assert!(text.contains(needle), "`{needle}` in: {text}");
    assert!(e.source().is_none(), "no source repeats the cause: {text}");
}

/// What a child reported after `tag` on `line` (libtest may have begun the line with the test's name).
fn after_tag<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.split_once(tag).map(|(_, rest)| rest)
}

fn open_err(dir: &Path, create: NewIdentity) -> StoreError {
    match Store::open(dir, create) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

/// Writes rows straight into a closed store's database, as a damaged or foreign file would hold them.
fn tamper(dir: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = Database::create(dir.join(DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

#[test]
fn round_trip_keeps_identity_and_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peer");
    let (mut store, identity, durable) = Store::open(&dir, room(None)).unwrap();
    assert_ne!(identity.id, 0);
    assert_eq!(durable, Durable::default());

    let first = extend(&[], 3, 1);
    let more = extend(&first, 2, 2);
    store
        .apply(&[
            Write::Vote { term: 1, voted_for: Some(identity.id) },
            Write::Append(first.clone()),
            Write::Config(config(1)),
            Write::Commit(2),
        ])
        .unwrap();
    store.apply(&[Write::Vote { term: 2, voted_for: Some(5) }, Write::Append(more.clone()), Write::Commit(4)]).unwrap();
    drop(store);

    let (_store, again, durable) = Store::open(&dir, room(Some(identity.id))).unwrap();
    assert_eq!(again, identity);
    let blocks: Vec<Block> = first.into_iter().chain(more).collect();
    assert_eq!(durable, Durable { term: 2, voted_for: Some(5), blocks, config: Some(config(1)), commit: 4 });
}

#[test]
fn an_empty_directory_is_created_with_the_given_id() {
    let tmp = tempfile::tempdir().unwrap();
    let (_store, identity, _) = Store::open(tmp.path(), room(Some(42))).unwrap();
    assert_eq!(identity.id, 42);
    assert!(identity.created_ms > 0);
}

#[test]
fn a_new_term_clears_the_vote_and_a_cast_vote_never_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
    store.apply(&[Write::Vote { term: 3, voted_for: Some(4) }]).unwrap();
    store.apply(&[Write::Vote { term: 3, voted_for: Some(4) }]).unwrap();

    for (term, voted_for, needle) in [
        (3, Some(5), "the vote of term 3 went to 4, it cannot become Some(5)"),
        (3, None, "the vote of term 3 went to 4, it cannot become None"),
        (2, None, "term 2 is below the stored term 3"),
    ] {
        let e = store.apply(&[Write::Vote { term, voted_for }]).unwrap_err();
        assert_message(&e, tmp.path(), needle);
    }
    store.apply(&[Write::Vote { term: 4, voted_for: None }]).unwrap();
    drop(store);
    let (_, _, durable) = Store::open(tmp.path(), room(None)).unwrap();
    assert_eq!((durable.term, durable.voted_for), (4, None));
}

#[test]
fn truncate_then_append_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
    let chain = extend(&[], 5, 1);
    store.apply(&[Write::Append(chain.clone()), Write::Config(config(9)), Write::Commit(2)]).unwrap();

    let e = store.apply(&[Write::Truncate(1)]).unwrap_err();
    assert!(matches!(e, StoreError::Refused { why: Refusal::BelowCommit { keep: 1, commit: 2 }, .. }), "{e}");
    let replacement = extend(&chain[..3], 4, 2);
    store.apply(&[Write::Truncate(3), Write::Append(replacement.clone())]).unwrap();
    drop(store);

    let (mut store, _, durable) = Store::open(tmp.path(), room(None)).unwrap();
    let expected: Vec<Block> = chain[..3].iter().copied().chain(replacement.iter().copied()).collect();
    assert_eq!(durable.blocks, expected);
    assert_eq!(durable.commit, 2);

    // A truncation keeps the tip it leaves for the next append's link check.
    store.apply(&[Write::Truncate(4)]).unwrap();
    let next = extend(&expected[..4], 1, 3);
    store.apply(&[Write::Append(next.clone())]).unwrap();
    let stale = extend(&expected, 1, 3)[0];
    let e = store.apply(&[Write::Append(vec![block_after(Some(&next[0]), 4), stale])]).unwrap_err();
    assert_message(&e, tmp.path(), "block 7 appended at height 6");
    drop(store);
    let (_, _, durable) = Store::open(tmp.path(), room(None)).unwrap();
    assert_eq!(durable.blocks.len(), 5);
    assert_eq!(durable.blocks[4], next[0]);
}

#[test]
fn truncating_to_zero_drops_the_config_of_block_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
    store.apply(&[Write::Append(extend(&[], 2, 1)), Write::Config(config(1))]).unwrap();
    store.apply(&[Write::Truncate(0)]).unwrap();
    store.apply(&[Write::Append(extend(&[], 1, 2))]).unwrap();
    drop(store);
    let (_, _, durable) = Store::open(tmp.path(), room(None)).unwrap();
    assert_eq!((durable.blocks.len(), durable.config), (1, None));
}

#[test]
fn refused_batches_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
    let chain = extend(&[], 2, 1);
    store.apply(&[Write::Append(chain.clone()), Write::Commit(1)]).unwrap();

    let gap = extend(&chain, 2, 1)[1];
    let e = store.apply(&[Write::Vote { term: 9, voted_for: Some(1) }, Write::Append(vec![gap])]).unwrap_err();
    assert!(matches!(e, StoreError::Refused { why: Refusal::NotAtHeight { got: 3, height: 2 }, .. }), "{e}");
    assert_message(&e, tmp.path(), "refused: block 3 appended at height 2");

    let mut unlinked = extend(&chain, 1, 1)[0];
    unlinked.prev = Digest::zero(HashAlg::Sha1);
    let e = store.apply(&[Write::Append(vec![unlinked])]).unwrap_err();
    assert_message(&e, tmp.path(), "block 2 does not link to block 1");
    let e = store.apply(&[Write::Commit(3)]).unwrap_err();
    assert_message(&e, tmp.path(), "commit 3 is beyond the chain's height 2");
    let e = store.apply(&[Write::Commit(0)]).unwrap_err();
    assert_message(&e, tmp.path(), "commit 0 is below the stored commit 1");
    // Within a batch the end state counts: a commit may precede the blocks that allow it.
    let next = extend(&chain, 1, 1);
    store.apply(&[Write::Commit(3), Write::Append(next.clone())]).unwrap();
    drop(store);

    let (_, _, durable) = Store::open(tmp.path(), room(None)).unwrap();
    assert_eq!((durable.term, durable.blocks.len(), durable.commit), (0, 3, 3));
}

#[test]
fn foreign_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let e = open_err(tmp.path(), room(None));
    assert_message(&e, tmp.path(), "is not a hashvote data directory: it holds `notes.txt` but no peer.redb");
    assert!(!tmp.path().join(DB_FILE).exists());

    let file = tmp.path().join("notes.txt");
    let e = open_err(&file, room(None));
    assert_message(&e, &file, "is not a hashvote data directory: it is not a directory");

    // A redb database of someone else.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    let db = Database::create(other.join(DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(TableDefinition::<u64, u64>::new("theirs")).unwrap();
    txn.commit().unwrap();
    drop(db);
    let e = open_err(&other, room(None));
    assert_message(&e, &other, "its peer.redb is a redb database without hashvote metadata");
}

#[test]
fn another_room_or_peer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Store::open(tmp.path(), room(Some(3))).unwrap());
    let e = open_err(tmp.path(), NewIdentity { id: None, room: "lab".into() });
    assert_message(&e, tmp.path(), "belongs to room `sd`, not `lab`");
    let e = open_err(tmp.path(), room(Some(4)));
    assert_message(&e, tmp.path(), "belongs to peer 3, not 4");

    let fresh = tmp.path().join("zero");
    let e = open_err(&fresh, room(Some(0)));
    assert_message(&e, &fresh, "peer id 0 is reserved");
}

#[test]
fn a_newer_format_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Store::open(tmp.path(), room(None)).unwrap());
    tamper(tmp.path(), |txn| {
        txn.open_table(META).unwrap().insert("format", (FORMAT + 1).to_le_bytes().as_slice()).unwrap();
    });
    let e = open_err(tmp.path(), room(None));
    assert!(matches!(e, StoreError::TooNew { found: 3, .. }));
    assert_message(&e, tmp.path(), "has format version 3, newer than this build reads (2)");
}

#[test]
fn an_older_format_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Store::open(tmp.path(), room(None)).unwrap());
    tamper(tmp.path(), |txn| {
        txn.open_table(META).unwrap().insert("format", 1u64.to_le_bytes().as_slice()).unwrap();
    });
    let e = open_err(tmp.path(), room(None));
    assert!(matches!(e, StoreError::TooOld { found: 1, .. }));
    assert_message(&e, tmp.path(), "has format version 1, older than this build reads (2); move it aside");
}

#[test]
fn a_second_open_is_refused_while_the_first_holds_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
    let e = open_err(tmp.path(), room(None));
    assert_message(&e, tmp.path(), "is in use by another running process");
    drop(store);
    Store::open(tmp.path(), room(None)).unwrap();
}

#[test]
fn a_file_that_is_not_a_database_is_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join(DB_FILE), b"not a database at all, just some text that is long enough").unwrap();
    let e = open_err(tmp.path(), room(None));
    assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
    assert_message(&e, tmp.path(), "is damaged or unreadable: ");
    // Still there, untouched.
    assert!(fs::read(tmp.path().join(DB_FILE)).unwrap().starts_with(b"not a database"));
}

#[test]
fn overwritten_pages_are_damage_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
    let chain = extend(&[], 50, 1);
    store.apply(&[Write::Append(chain)]).unwrap();
    drop(store);
    let path = tmp.path().join(DB_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let len = bytes.len();
    // Everything after the header: the pages holding the trees.
    for b in &mut bytes[4096.min(len / 2)..] {
        *b ^= 0x5A;
    }
    fs::write(&path, &bytes).unwrap();
    let e = open_err(tmp.path(), room(None));
    assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
    assert_message(&e, tmp.path(), "is damaged or unreadable: ");
    let reason = match &e {
        StoreError::Damaged { reason, .. } => reason.clone(),
        _ => unreachable!(),
    };
    assert_eq!(e.to_string().matches(reason.as_str()).count(), 1, "the reason is given once: {e}");
}

#[test]
fn inconsistent_rows_are_damage() {
    type Tamper = fn(&redb::WriteTransaction);
    let cases: [(&str, Tamper); 4] = [
        ("the chain skips from height 1 to 2", |txn| {
            txn.open_table(BLOCKS).unwrap().remove(1).unwrap();
        }),
        ("the commit 9 is beyond the chain's height 3", |txn| {
            txn.open_table(STATE).unwrap().insert(COMMIT, 9u64.to_le_bytes().as_slice()).unwrap();
        }),
        ("block 2 does not decode", |txn| {
            txn.open_table(BLOCKS).unwrap().insert(2, [1u8, 2].as_slice()).unwrap();
        }),
        ("meta row `key` is missing", |txn| {
            txn.open_table(META).unwrap().remove("key").unwrap();
        }),
    ];
    for (needle, f) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
        store.apply(&[Write::Append(extend(&[], 3, 1))]).unwrap();
        drop(store);
        tamper(tmp.path(), f);
        let e = open_err(tmp.path(), room(None));
        assert_message(&e, tmp.path(), needle);
    }
}

#[test]
fn an_interrupted_creation_is_started_over() {
    let tmp = tempfile::tempdir().unwrap();
    // A crash before redb's header reached the disk, and one after the identity did but before the rename.
    fs::write(tmp.path().join(NEW_FILE), b"\0\0\0 half a header").unwrap();
    let (_, first, _) = Store::open(tmp.path(), room(None)).unwrap();
    assert!(!tmp.path().join(NEW_FILE).exists());

    let other = tmp.path().join("other");
    drop(Store::open(&other, room(Some(8))).unwrap());
    fs::rename(other.join(DB_FILE), other.join(NEW_FILE)).unwrap();
    let (_, second, _) = Store::open(&other, room(None)).unwrap();
    assert_ne!(second.key, first.key);
}

/// Permission errors, from a process without access: as root, a child that drops to `nobody`.
#[test]
fn permission_denied_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let closed = tmp.path().join("closed");
    fs::create_dir(&closed).unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o000)).unwrap();
    let dir = closed.join("peer");

    // SAFETY: geteuid has no preconditions and cannot fail.
    let message = if unsafe { libc::geteuid() } != 0 {
        open_err(&dir, room(None)).to_string()
    } else {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::permission_child", "--nocapture", "--test-threads=1"])
            .env(PERMISSION_CHILD, &dir)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some(line) = stdout.lines().find_map(|l| after_tag(l, "error: ")) else {
            panic!("child said: {stdout} {}", String::from_utf8_lossy(&out.stderr));
        };
        line.to_owned()
    };
    assert_eq!(message, format!("permission denied on data directory {}", dir.display()));
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
}

/// The child of `permission_denied_is_reported`; does nothing unless that test started it.
#[test]
fn permission_child() {
    let Some(dir) = std::env::var_os(PERMISSION_CHILD) else { return };
    match Store::open(Path::new(&dir), room(None)) {
        Ok(_) => println!("opened"),
        Err(e) => println!("error: {e}"),
    }
}

/// The honest crash test: a child process writes batches in a loop (applied, staged then synced,
/// or only staged) and reports each one made durable; it is killed with SIGKILL at a random
/// moment; everything it reported must be there, and every batch must be whole (the term and
/// commit are written in the batch of the block they go with).
#[test]
fn a_killed_writer_loses_nothing_it_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peer");
    let mut rng = rand::rng();
    let mut reported_total = 0;
    for round in 0..5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::crash_child", "--nocapture", "--test-threads=1"])
            .env(CRASH_CHILD, &dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = rng.random_range(1..=80);
        let mut reported = None;
        let mut seen = 0;
        while seen < kill_after {
            let line = lines.next().expect("the child exited early").unwrap();
            if let Some(h) = after_tag(&line, "applied ") {
                reported = Some(h.parse::<u64>().unwrap());
                seen += 1;
                if round == 0 && seen == 1 {
                    let e = open_err(&dir, room(Some(9)));
                    assert_message(&e, &dir, "is in use by another running process");
                }
            }
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines the child wrote before it died are still in the pipe: they were reported too.
        for line in lines {
            if let Some(h) = after_tag(&line.unwrap(), "applied ") {
                reported = Some(h.parse::<u64>().unwrap());
                seen += 1;
            }
        }
        reported_total += seen;

        let (_, identity, durable) = Store::open(&dir, room(Some(9))).unwrap();
        assert_eq!(identity.id, 9);
        let height = durable.blocks.len() as u64;
        assert!(height > reported.unwrap(), "round {round}: reported {reported:?}, found {height} blocks");
        assert_eq!(durable.term, height, "the vote of each batch came with its block");
        assert_eq!(durable.voted_for, Some(9));
        assert_eq!(durable.commit, height - 1);
        assert_eq!(durable.config, Some(config(7)));
        for (h, block) in durable.blocks.iter().enumerate() {
            assert_eq!(*block, block_after(h.checked_sub(1).map(|p| &durable.blocks[p]), h as u64 + 1));
        }
    }
    assert!(reported_total >= 5);
}

/// The child of `a_killed_writer_loses_nothing_it_reported`; does nothing unless that test started it.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_CHILD) else { return };
    let (mut store, _, durable) = Store::open(Path::new(&dir), room(Some(9))).unwrap();
    let mut tip = durable.blocks.last().copied();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let h = tip.map_or(0, |b| b.tx + 1);
        let block = block_after(tip.as_ref(), h + 1);
        let mut batch = vec![Write::Vote { term: h + 1, voted_for: Some(9) }, Write::Append(vec![block])];
        if h == 0 {
            batch.push(Write::Config(config(7)));
        }
        batch.push(Write::Commit(h));
        // Durable, staged then made durable, or only staged (never reported: a crash may lose
        // it, but never tear it, nor what was durable before).
        match h % 3 {
            0 => store.apply(&batch).unwrap(),
            1 => {
                store.stage(&batch).unwrap();
                store.sync().unwrap();
            }
            _ => {
                store.stage(&batch).unwrap();
                tip = Some(block);
                continue;
            }
        }
        println!("applied {h}");
        tip = Some(block);
    }
}

/// The cost of durability: `apply` of one one-block `Append`, on /tmp and on the disk holding the
/// workspace. Run with `cargo test -p peer --release store::tests::append_latency -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn append_latency() {
    let places = [std::env::temp_dir(), PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    for place in places {
        let tmp = tempfile::tempdir_in(&place).unwrap();
        let (mut store, _, _) = Store::open(tmp.path(), room(None)).unwrap();
        let mut tip = None;
        let mut times = Vec::new();
        for _ in 0..200 {
            let block = block_after(tip.as_ref(), 1);
            let start = Instant::now();
            store.apply(&[Write::Append(vec![block])]).unwrap();
            times.push(start.elapsed());
            tip = Some(block);
        }
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "apply(Append(1 block)) in {}: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
            place.display(),
            at(0.5),
            at(0.9),
            at(0.99),
            times[times.len() - 1]
        );
    }
}
