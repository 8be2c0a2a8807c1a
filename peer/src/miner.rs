//! The miner: a pool of worker threads searching nonces for the current job.
//!
//! Workers live as long as the [`Miner`]; a job is handed to all of them at once and replaced or
//! withdrawn by bumping a generation counter that every worker checks between small batches, so a
//! decided or superseded transaction stops every thread within a batch (well under a millisecond).
//! Thread `i` of `n` searches batches `i, i + n, i + 2n, ...` of the nonce space: no overlap, no
//! shared counter written in the loop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::pow::Template;
use crate::protocol::TxId;

/// Candidates a worker tries between checks of the generation counter.
pub const BATCH: u64 = 1 << 12;

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

struct Current {
    generation: u64,
    job: Option<Job>,
    started: Instant,
}

struct Shared {
    generation: AtomicU64,
    hashes: AtomicU64,
    shutdown: AtomicBool,
    current: Mutex<Current>,
    wake: Condvar,
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
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            hashes: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            current: Mutex::new(Current { generation: 0, job: None, started: Instant::now() }),
            wake: Condvar::new(),
        });
        let on_found = Arc::new(on_found);
        let workers = (0..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let on_found = Arc::clone(&on_found);
                std::thread::Builder::new()
                    .name(format!("miner-{index}"))
                    .spawn(move || worker(&shared, index as u64, threads as u64, &*on_found))
                    .expect("spawn miner thread")
            })
            .collect();
        Self { shared, workers }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Replaces whatever is being mined with `job`.
    pub fn start(&self, job: Job) {
        self.set(Some(job));
    }

    /// Stops mining.
    pub fn stop(&self) {
        self.set(None);
    }

    fn set(&self, job: Option<Job>) {
        let mut current = self.shared.current.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        current.generation = generation;
        current.job = job;
        current.started = Instant::now();
        self.shared.hashes.store(0, Ordering::Relaxed);
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

fn worker(shared: &Shared, index: u64, threads: u64, on_found: &(dyn Fn(Found) + Send + Sync)) {
    let mut seen = 0;
    loop {
        let (generation, job, started) = {
            let mut current = shared.current.lock().unwrap_or_else(|e| e.into_inner());
            while current.generation == seen && !shared.shutdown.load(Ordering::Acquire) {
                current = shared.wake.wait(current).unwrap_or_else(|e| e.into_inner());
            }
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            seen = current.generation;
            (current.generation, current.job, current.started)
        };
        let Some(job) = job else { continue };
        let difficulty = u32::from(job.difficulty);
        let mut batch = index;
        while shared.generation.load(Ordering::Acquire) == generation {
            let start = batch.wrapping_mul(BATCH);
            let found = job.template.search(difficulty, start, BATCH);
            let hashes = shared.hashes.fetch_add(BATCH, Ordering::Relaxed) + BATCH;
            if let Some(nonce) = found {
                // Claim the job so the other threads stop and only one solution is reported.
                if shared
                    .generation
                    .compare_exchange(generation, generation + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    on_found(Found { tx: job.tx, nonce, hashes, elapsed_ms });
                }
                break;
            }
            batch = batch.wrapping_add(threads);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pow::{Digest, HashAlg};
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
