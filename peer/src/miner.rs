//! The miner: a pool of worker threads searching nonces for the current job.
//!
//! Workers live as long as the [`Miner`]; a job is handed to all of them at once and replaced or
//! withdrawn by bumping a generation counter that every worker checks between small batches, so a
//! decided or superseded transaction stops every thread within a batch (tens of microseconds at
//! full speed; `cargo bench -p peer --bench pow` measures it).
//! Thread `i` of `n` searches batches `i, i + n, i + 2n, ...` of the nonce space: no overlap, and
//! nothing shared is written in the loop: each worker publishes its hash count in its own
//! cache-line-padded slot, summed only when someone asks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use hashvote_core::work::{Found, Job};

/// Candidates a worker tries between checks of the generation counter: about 40 µs of SHA-1 at
/// this kernel's speed, so a stop reaches every worker well under a millisecond, while the check
/// and the counter update cost nothing measurable.
pub const BATCH: u64 = 1 << 12;

struct Current {
    generation: u64,
    job: Option<Job>,
    started: Instant,
    /// All workers' hash count when the job started, to report the job's own.
    hashes_before: u64,
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
    fn hashes(&self) -> u64 {
        self.slots.iter().map(|s| s.hashes.load(Ordering::Relaxed)).sum()
    }
}

/// A pool of mining threads.
pub struct Miner {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Miner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Miner").field("threads", &self.workers.len()).finish()
    }
}

impl Miner {
    /// Starts `threads` idle workers; `on_found` is called (from a worker) for each solution.
    pub fn new(threads: usize, on_found: impl Fn(Found) + Send + Sync + 'static) -> Self {
        let threads = threads.max(1);
        let epoch = Instant::now();
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            current: Mutex::new(Current { generation: 0, job: None, started: epoch, hashes_before: 0 }),
            wake: Condvar::new(),
            slots: (0..threads).map(|_| Slot::default()).collect(),
            epoch,
        });
        let on_found = Arc::new(on_found);
        let workers = (0..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let on_found = Arc::clone(&on_found);
                std::thread::Builder::new()
                    .name(format!("miner-{index}"))
                    .spawn(move || worker(&shared, index, threads as u64, &*on_found))
                    .expect("spawn miner thread")
            })
            .collect();
        Self { shared, workers }
    }

    /// Replaces whatever is being mined with `job`.
    pub fn start(&self, job: Job) {
        self.set(Some(job));
    }

    /// Stops mining.
    pub fn stop(&self) {
        self.set(None);
    }

    /// The current generation, bumped by every [`start`](Self::start), [`stop`](Self::stop) and
    /// solution.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Candidates tried by all workers since the pool started (counted per batch).
    pub fn hashes(&self) -> u64 {
        self.shared.hashes()
    }

    /// Once every worker has let go of all generations before `generation` (stopped hashing an
    /// older job), the latest instant at which one of them noticed; `None` while any may still be
    /// hashing one. With [`generation`](Self::generation) read right after a `stop`, this measures
    /// how long the stop took to reach every thread.
    pub fn released(&self, generation: u64) -> Option<Instant> {
        let mut latest = Duration::ZERO;
        for slot in self.shared.slots.iter() {
            if slot.released.load(Ordering::Acquire) < generation {
                return None;
            }
            latest = latest.max(Duration::from_nanos(slot.noticed_ns.load(Ordering::Relaxed)));
        }
        Some(self.shared.epoch + latest)
    }

    fn set(&self, job: Option<Job>) {
        let mut current = self.shared.current.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        current.generation = generation;
        current.job = job;
        current.started = Instant::now();
        current.hashes_before = self.shared.hashes();
        self.shared.wake.notify_all();
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.stop();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
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

fn worker(shared: &Shared, index: usize, threads: u64, on_found: &(dyn Fn(Found) + Send + Sync)) {
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
    let mut seen = 0;
    loop {
        let (generation, job, started, hashes_before) = {
            let mut current = shared.current.lock().unwrap_or_else(|e| e.into_inner());
            while current.generation == seen && !shared.shutdown.load(Ordering::Acquire) {
                current = shared.wake.wait(current).unwrap_or_else(|e| e.into_inner());
            }
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            seen = current.generation;
            (current.generation, current.job, current.started, current.hashes_before)
        };
        release(generation);
        let Some(job) = job else { continue };
        let difficulty = u32::from(job.difficulty);
        let mut batch = index as u64;
        while shared.generation.load(Ordering::Acquire) == generation {
            let start = batch.wrapping_mul(BATCH);
            let found = job.template.search(difficulty, start, BATCH);
            hashes += BATCH;
            // Only this thread writes its slot: a plain store, no read-modify-write.
            slot.hashes.store(hashes, Ordering::Relaxed);
            if let Some(nonce) = found {
                // Claim the job so the other threads stop and only one solution is reported.
                if shared
                    .generation
                    .compare_exchange(generation, generation + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    let hashes = shared.hashes().saturating_sub(hashes_before);
                    on_found(Found { tx: job.tx, nonce, hashes, elapsed_ms });
                }
                break;
            }
            batch = batch.wrapping_add(threads);
        }
        // Whatever ended the loop (a new generation, or this worker's own claim), it is off the job.
        release(shared.generation.load(Ordering::Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pow::{Digest, HashAlg, Template};
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
