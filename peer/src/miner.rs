//! The miner: a pool of worker threads searching nonces for the jobs of one or more peers.
//!
//! A process runs one [`Pool`]; each peer in it holds a [`Miner`], its seat at the pool (one peer
//! per process, the default: one seat). Workers live as long as the pool. A peer's job is handed
//! to every worker at once and replaced or withdrawn by bumping the pool's generation counter,
//! which every worker checks between small batches, so a decided or superseded transaction stops
//! every thread within a batch (tens of microseconds at full speed; `cargo bench -p peer --bench
//! pow` measures it). With several seats mining (many peers in one process, for scale tests), the
//! workers take the jobs in turn, a slice of [`SLICE`] batches at a time.
//!
//! The workers of a job draw their slices of the nonce space from one counter of that job, one
//! fetch-add a slice: no overlap, and nothing shared is written between batches.
//! Each worker publishes its hash count in its own cache-line-padded slot; a seat's count is
//! added once per slice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use hashvote_core::work::{Found, Job};

/// Candidates a worker tries between checks of the generation counter: about 40 µs of SHA-1 at
/// this kernel's speed, so a stop reaches every worker well under a millisecond, while the check
/// and the counter update cost nothing measurable.
pub const BATCH: u64 = 1 << 12;

/// Batches a worker gives one job before it looks for another seat's (a few ms): the share of
/// each peer when many peers share a pool, and how often a seat's hash count is brought up to date.
pub const SLICE: u32 = 64;

/// A seat's job, as the workers see it.
#[derive(Clone)]
struct Assigned {
    /// The pool generation at which the job was set: it is off once the seat's job changes.
    generation: u64,
    job: Job,
    started: Instant,
    /// The seat's hash count when the job started, to report the job's own.
    hashes_before: u64,
    /// The next batch of the nonce space to search, shared by the job's workers.
    next: Arc<AtomicU64>,
    seat: Arc<Seat>,
}

/// What belongs to one peer of the pool.
struct Seat {
    index: usize,
    /// Candidates tried for this seat since it joined (brought up to date once per slice).
    hashes: AtomicU64,
    on_found: Box<dyn Fn(Found) + Send + Sync>,
}

struct Current {
    generation: u64,
    /// One entry per seat ever taken: its job, if it has one.
    jobs: Vec<Option<Assigned>>,
}

/// What one worker publishes. Written only by its worker; aligned so that no two workers (nor
/// the shared fields) ever write the same cache line (128: adjacent-line prefetch pairs lines).
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    /// Candidates this worker has tried since the pool started.
    hashes: AtomicU64,
    /// Nanoseconds after `Shared::epoch` at which the worker noticed `released`.
    noticed_ns: AtomicU64,
    /// The newest generation this worker has seen: it no longer works on any older one.
    released: AtomicU64,
}

struct Shared {
    generation: AtomicU64,
    shutdown: AtomicBool,
    current: Mutex<Current>,
    wake: Condvar,
    slots: Box<[Slot]>,
    epoch: Instant,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets seat `index`'s job (or none) under the lock, as a new generation, and wakes the
    /// workers.
    fn set(&self, current: &mut Current, index: usize, job: Option<Assigned>) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        current.generation = generation;
        current.jobs[index] = job.map(|a| Assigned { generation, ..a });
        self.wake.notify_all();
    }
}

/// The mining threads of a process, shared by the peers it runs.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.workers.len()).finish()
    }
}

impl Pool {
    /// Starts `threads` idle workers.
    pub fn new(threads: usize) -> Arc<Self> {
        let threads = threads.max(1);
        let epoch = Instant::now();
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            current: Mutex::new(Current { generation: 0, jobs: Vec::new() }),
            wake: Condvar::new(),
            slots: (0..threads).map(|_| Slot::default()).collect(),
            epoch,
        });
        let workers = (0..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("miner-{index}"))
                    .spawn(move || worker(&shared, index))
                    .expect("spawn miner thread")
            })
            .collect();
        Arc::new(Self { shared, workers })
    }

    /// The pool's worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// A seat for one peer; `on_found` is called (from a worker) for each of its solutions.
    pub fn seat(self: &Arc<Self>, on_found: impl Fn(Found) + Send + Sync + 'static) -> Miner {
        let mut current = self.shared.lock();
        let seat =
            Arc::new(Seat { index: current.jobs.len(), hashes: AtomicU64::new(0), on_found: Box::new(on_found) });
        current.jobs.push(None);
        Miner { pool: Arc::clone(self), seat }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _current = self.shared.lock();
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One peer's seat at a [`Pool`]: it mines one job at a time.
pub struct Miner {
    pool: Arc<Pool>,
    seat: Arc<Seat>,
}

impl std::fmt::Debug for Miner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Miner").field("seat", &self.seat.index).field("pool", &self.pool).finish()
    }
}

impl Miner {
    /// A pool of `threads` idle workers of its own; `on_found` is called (from a worker) for each
    /// solution.
    pub fn new(threads: usize, on_found: impl Fn(Found) + Send + Sync + 'static) -> Self {
        Pool::new(threads).seat(on_found)
    }

    /// Replaces whatever this seat mines with `job`.
    pub fn start(&self, job: Job) {
        let shared = &self.pool.shared;
        let mut current = shared.lock();
        let assigned = Assigned {
            generation: 0,
            job,
            started: Instant::now(),
            hashes_before: self.seat.hashes.load(Ordering::Relaxed),
            next: Arc::new(AtomicU64::new(0)),
            seat: Arc::clone(&self.seat),
        };
        shared.set(&mut current, self.seat.index, Some(assigned));
    }

    /// Stops this seat's mining.
    pub fn stop(&self) {
        let shared = &self.pool.shared;
        let mut current = shared.lock();
        shared.set(&mut current, self.seat.index, None);
    }

    /// The pool's current generation, bumped by every [`start`](Self::start),
    /// [`stop`](Self::stop) and solution of any seat.
    pub fn generation(&self) -> u64 {
        self.pool.shared.generation.load(Ordering::Acquire)
    }

    /// Candidates tried for this seat since it joined the pool (counted per slice).
    pub fn hashes(&self) -> u64 {
        self.seat.hashes.load(Ordering::Relaxed)
    }

    /// Once every worker of the pool has let go of all generations before `generation` (stopped
    /// hashing an older job), the latest instant at which one of them noticed; `None` while any
    /// may still be hashing one. With [`generation`](Self::generation) read right after a
    /// `stop`, this measures how long the stop took to reach every thread.
    pub fn released(&self, generation: u64) -> Option<Instant> {
        let shared = &self.pool.shared;
        let mut latest = Duration::ZERO;
        for slot in shared.slots.iter() {
            if slot.released.load(Ordering::Acquire) < generation {
                return None;
            }
            latest = latest.max(Duration::from_nanos(slot.noticed_ns.load(Ordering::Relaxed)));
        }
        Some(shared.epoch + latest)
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts the calling thread in Linux's `SCHED_IDLE` class: it runs only when no normal thread
/// wants the core, so a peer's protocol work (and every other peer's, when many share a machine)
/// is never starved by hashing. On a machine with idle cores hashing loses nothing. Elsewhere the
/// threads keep the default priority.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param` that outlives the call; pid 0 names the
        // calling thread; the call changes nothing but that thread's scheduling policy.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::debug!("miner threads keep their priority: {}", std::io::Error::last_os_error());
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    lower_priority();
    let slot = &shared.slots[index];
    // Records the first moment this worker knew of `generation` (only this thread writes the
    // slot, so load-then-store is race-free).
    let release = |generation: u64| {
        if slot.released.load(Ordering::Relaxed) < generation {
            // Time first, then the generation with Release: a reader that sees the generation
            // sees the time.
            let ns = u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            slot.noticed_ns.store(ns, Ordering::Relaxed);
            slot.released.store(generation, Ordering::Release);
        }
    };
    let mut hashes = 0u64;
    let mut cursor = 0;
    while let Some((seen, a)) = next_job(shared, &mut cursor, &release) {
        let difficulty = u32::from(a.job.difficulty);
        let mut done = 0u64;
        let mut found = None;
        // The slice's batches, taken at once: the only shared write of the slice. Those left
        // unsearched when a change interrupts it are skipped (the nonce space is 2^64).
        let first = a.next.fetch_add(u64::from(SLICE), Ordering::Relaxed);
        for batch in first..first.saturating_add(u64::from(SLICE)) {
            if shared.generation.load(Ordering::Acquire) != seen {
                break;
            }
            found = a.job.template.search(difficulty, batch.wrapping_mul(BATCH), BATCH);
            done += BATCH;
            hashes += BATCH;
            // Only this thread writes its slot: a plain store, no read-modify-write.
            slot.hashes.store(hashes, Ordering::Relaxed);
            if found.is_some() {
                break;
            }
        }
        a.seat.hashes.fetch_add(done, Ordering::Relaxed);
        if let Some(nonce) = found {
            claim(shared, &a, nonce);
        }
    }
}

/// The next seat's job after `cursor` (round robin: with many seats, each gets its slices in
/// turn), with the pool generation at which it was taken; waits while no seat has a job. `None`
/// once the pool shuts down.
fn next_job(shared: &Shared, cursor: &mut usize, release: &impl Fn(u64)) -> Option<(u64, Assigned)> {
    let mut current = shared.lock();
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            return None;
        }
        let generation = current.generation;
        // Whatever this worker mined before, it is off it now.
        release(generation);
        let n = current.jobs.len();
        if let Some(i) = (0..n).map(|k| (*cursor + k) % n).find(|&i| current.jobs[i].is_some()) {
            *cursor = i + 1;
            return current.jobs[i].clone().map(|a| (generation, a));
        }
        current = shared.wake.wait(current).unwrap_or_else(|e| e.into_inner());
    }
}

/// Reports `nonce` for `a` unless the seat's job has changed meanwhile (decided, replaced, or
/// solved by another worker first): one report per job.
fn claim(shared: &Shared, a: &Assigned, nonce: u64) {
    let mut current = shared.lock();
    if current.jobs[a.seat.index].as_ref().is_none_or(|j| j.generation != a.generation) {
        return;
    }
    shared.set(&mut current, a.seat.index, None);
    drop(current);
    let hashes = a.seat.hashes.load(Ordering::Relaxed).saturating_sub(a.hashes_before);
    let elapsed_ms = a.started.elapsed().as_millis() as u64;
    (a.seat.on_found)(Found { tx: a.job.tx, nonce, hashes, elapsed_ms });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pow::{Digest, HashAlg, Template};
    use std::collections::BTreeSet;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn finds_a_valid_solution_with_several_threads_and_reports_it_once() {
        let (tx, rx) = mpsc::channel();
        let miner = Miner::new(3, move |f| tx.send(f).unwrap());
        let prev = Digest::zero(HashAlg::Sha1);
        let template = Template::new(&prev, 4, 99);
        miner.start(Job { tx: 4, template, difficulty: 14 });
        let found = rx.recv_timeout(Duration::from_secs(30)).expect("a solution");
        assert_eq!(found.tx, 4);
        assert!(template.digest(found.nonce).leading_zeros() >= 14);
        assert!(found.hashes >= BATCH);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "only one report per job");
    }

    /// Polls `f` until it returns `Some`, for at most 30 s.
    fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "condition not met within 30 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The scheduling policy (field 41 of `/proc/self/task/<tid>/stat`) of every thread of this
    /// process named `name`.
    #[cfg(target_os = "linux")]
    fn policies_of(name: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("/proc") {
            let dir = task.expect("task").path();
            if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
                let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
                // The command name (field 2) may hold spaces: count from the ')' after it.
                let rest = &stat[stat.rfind(')').expect("comm ends") + 2..];
                let policy = rest.split(' ').nth(41 - 3).expect("41 fields").parse().expect("number");
                out.push(policy);
            }
        }
        out
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn workers_hash_at_idle_priority() {
        let miner = Miner::new(2, |_| {});
        let policy = eventually(|| Some(policies_of("miner-1")).filter(|p| p.contains(&(libc::SCHED_IDLE as u32))));
        assert!(!policy.is_empty());
        drop(miner);
    }

    #[test]
    fn counts_hashes_and_reports_when_every_worker_let_go() {
        let miner = Miner::new(2, |_| {});
        let template = Template::new(&Digest::zero(HashAlg::Sha1), 1, 5);
        assert_eq!(miner.released(1), None, "no worker has seen generation 1 yet");
        miner.start(Job { tx: 1, template, difficulty: 160 });
        // Every worker publishes its own count; the sum grows while they mine.
        let first = eventually(|| Some(miner.hashes()).filter(|&h| h >= 2 * BATCH));
        eventually(|| Some(miner.hashes()).filter(|&h| h > first));
        let asked = Instant::now();
        miner.stop();
        let generation = miner.generation();
        let noticed = eventually(|| miner.released(generation));
        assert!(noticed >= asked, "noticed after the stop was asked for");
        // Stopped: the count no longer moves.
        let stopped = miner.hashes();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(miner.hashes(), stopped);
    }

    #[test]
    fn seats_of_one_pool_mine_their_own_jobs_in_turn() {
        let pool = Pool::new(2);
        let (tx, rx) = mpsc::channel();
        let seats: Vec<Miner> = (0..5u32)
            .map(|i| {
                let tx = tx.clone();
                pool.seat(move |f| tx.send((i, f)).unwrap())
            })
            .collect();
        // An endless job on seat 0 must not starve the others: each takes its slices in turn.
        let endless = Template::new(&Digest::zero(HashAlg::Sha1), 0, 1);
        seats[0].start(Job { tx: 0, template: endless, difficulty: 160 });
        for (i, seat) in seats.iter().enumerate().skip(1) {
            let template = Template::new(&Digest::zero(HashAlg::Sha1), i as u64, 100 + i as u32);
            seat.start(Job { tx: i as u64, template, difficulty: 16 });
        }
        let mut solved = BTreeSet::new();
        while solved.len() < 4 {
            let (seat, found) = rx.recv_timeout(Duration::from_secs(60)).expect("every seat solves its job");
            assert_eq!(found.tx, u64::from(seat), "a seat's solution is for its own job");
            let template = Template::new(&Digest::zero(HashAlg::Sha1), found.tx, 100 + seat);
            assert!(template.digest(found.nonce).leading_zeros() >= 16);
            assert!(solved.insert(seat), "one report per job");
        }
        assert!(seats[0].hashes() > 0, "the endless job got its share");
        // Stopping one seat leaves the others' jobs alone.
        seats[0].stop();
        let template = Template::new(&Digest::zero(HashAlg::Sha1), 9, 101);
        seats[1].start(Job { tx: 9, template, difficulty: 12 });
        seats[2].stop();
        let (seat, found) = rx.recv_timeout(Duration::from_secs(30)).expect("seat 1's new job");
        assert_eq!((seat, found.tx), (1, 9));
        drop(seats);
        drop(pool); // joins every worker
    }

    #[test]
    fn stop_and_replace_interrupt_an_unsolvable_job() {
        let (tx, rx) = mpsc::channel();
        let miner = Miner::new(2, move |f| tx.send(f).unwrap());
        let template = Template::new(&Digest::zero(HashAlg::Sha256), 1, 5);
        // 200 bits is never found: only stop() or a new job ends it.
        miner.start(Job { tx: 1, template, difficulty: 200 });
        miner.start(Job { tx: 2, template: Template::new(&Digest::zero(HashAlg::Sha256), 2, 5), difficulty: 4 });
        let found = rx.recv_timeout(Duration::from_secs(30)).expect("second job solved");
        assert_eq!(found.tx, 2);
        miner.start(Job { tx: 3, template, difficulty: 200 });
        miner.stop();
        drop(miner); // joins every worker: would hang if a worker ignored the stop
    }
}
