//! The lab's miner: threads searching printable-ASCII solution strings whose SHA-1 has enough
//! leading zero bits.
//!
//! The lab's proof of work hashes a free-form string, not hashvote's fixed binary preimage, so the
//! kernels of [`crate::pow`] do not apply. Each thread hashes `<prefix><16 hex digits of a
//! counter>`, where the prefix holds the client id, a random salt per job and the thread index
//! (so no two threads or peers try the same string), with the SHA-1 state of the prefix computed
//! once per job. At most 55 bytes keep every candidate to one compression. A job runs on its own
//! threads, stopped through one flag they check every [`BATCH`](hashvote_core::lab::work::BATCH) candidates; the first finder
//! sets it, so each job reports at most one solution.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

pub use hashvote_core::lab::work::{LabFound, LabJob, search};

type OnFound = Arc<dyn Fn(LabFound) + Send + Sync>;

/// Mining threads for lab jobs.
pub struct LabMiner {
    threads: usize,
    /// Client id, the first part of every solution.
    me: String,
    current: Mutex<Option<Arc<AtomicBool>>>,
    hashes: Arc<AtomicU64>,
    on_found: OnFound,
}

impl std::fmt::Debug for LabMiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabMiner").field("threads", &self.threads).finish()
    }
}

impl LabMiner {
    /// A miner of `threads` threads per job, whose solutions start with `me` (printable ASCII,
    /// at most 20 characters are used); `on_found` is called from a mining thread.
    pub fn new(threads: usize, me: &str, on_found: impl Fn(LabFound) + Send + Sync + 'static) -> Self {
        let me: String = me.chars().filter(|c| c.is_ascii_alphanumeric()).take(20).collect();
        Self {
            threads: threads.max(1),
            me,
            current: Mutex::new(None),
            hashes: Arc::new(AtomicU64::new(0)),
            on_found: Arc::new(on_found),
        }
    }

    /// Candidates tried since the miner was made.
    pub fn hashes(&self) -> u64 {
        self.hashes.load(Ordering::Relaxed)
    }

    /// Replaces any job with `job`.
    pub fn start(&self, job: LabJob) {
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(old) = self.current.lock().unwrap_or_else(|e| e.into_inner()).replace(Arc::clone(&stop)) {
            old.store(true, Ordering::Relaxed);
        }
        let salt: u32 = rand::random();
        let started = Instant::now();
        let before = self.hashes();
        for t in 0..self.threads {
            let prefix = format!("{}-{salt:08x}-{t:x}-", self.me);
            let (stop, hashes, on_found) = (Arc::clone(&stop), Arc::clone(&self.hashes), Arc::clone(&self.on_found));
            let spawned = std::thread::Builder::new().name(format!("lab-miner-{t}")).spawn(move || {
                crate::miner::lower_priority();
                if let Some((solution, counter)) = search(&prefix, job.difficulty, &stop, &hashes)
                    // Only the first finder reports: the others see the flag already set.
                    && !stop.swap(true, Ordering::AcqRel)
                {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    let hashes = hashes.load(Ordering::Relaxed).saturating_sub(before);
                    on_found(LabFound { tx: job.tx, solution, counter, hashes, elapsed_ms });
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a lab mining thread");
            }
        }
    }

    /// Stops the current job, if any.
    pub fn stop(&self) {
        if let Some(old) = self.current.lock().unwrap_or_else(|e| e.into_inner()).take() {
            old.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for LabMiner {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn finds_a_verifiable_printable_solution_and_reports_it_once() {
        let (tx, rx) = mpsc::channel();
        let miner = LabMiner::new(2, "12345", move |f| tx.send(f).unwrap());
        miner.start(LabJob { tx: 7, difficulty: 14 });
        let found = rx.recv_timeout(Duration::from_secs(30)).expect("a solution");
        assert_eq!(found.tx, 7);
        assert!(found.solution.starts_with("12345-") && super::super::wire::printable(&found.solution));
        assert!(found.solution.len() <= 55, "{}", found.solution);
        assert!(super::super::wire::meets(&found.solution, 14), "{}", found.solution);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "a second report for one job");
    }

    #[test]
    fn stop_ends_a_hopeless_job() {
        let stop = Arc::new(AtomicBool::new(false));
        let hashes = Arc::new(AtomicU64::new(0));
        let (s, h) = (Arc::clone(&stop), Arc::clone(&hashes));
        let worker = std::thread::spawn(move || search("x-", 160, &s, &h));
        while hashes.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(worker.join().unwrap(), None);
    }

    /// `cargo test -p peer --release lab_miner_rate -- --ignored --nocapture` prints the
    /// single-thread rate.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn lab_miner_rate() {
        let stop = AtomicBool::new(false);
        let hashes = AtomicU64::new(0);
        let t = Instant::now();
        // 40 bits are never found: this measures the loop for about two seconds.
        std::thread::scope(|s| {
            s.spawn(|| search("123456789-0badc0de-0-", 40, &stop, &hashes));
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::Relaxed);
        });
        let rate = hashes.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        println!("lab miner: {:.2} MH/s on one thread", rate / 1e6);
    }
}
