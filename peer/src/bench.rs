//! The mining benchmark behind `cargo bench -p peer --bench pow`: hash rates of the search on this
//! machine, against a naive baseline measured in the same run, and how quickly a stop reaches
//! every mining thread.
//!
//! For each hash function it measures, one at a time (so they do not compete):
//! - the baseline, `Sha1::digest(format!("{prefix}{nonce}"))` in a loop on one thread (the lab's
//!   way of mining; the message stays within one block, like ours);
//! - [`Template::search`] on the [`Kernel::Portable`] path, one thread;
//! - the [`Miner`] on the best kernel with one worker, then with every hardware thread;
//! - stop latency: from [`Miner::stop`] (and from [`Miner::start`] of a replacing job) until every
//!   worker has noticed, as each worker timestamps it ([`Miner::released`]).
//!
//! The hash rates are taken in interleaved rounds and the median round is reported, so that a
//! shared or frequency-scaling machine slows all of them alike and the ratios stay meaningful.

use std::fmt;
use std::hint::black_box;
use std::time::{Duration, Instant};

use sha1::Digest as _;

use crate::miner::{BATCH, Job, Miner};
use crate::pow::{Digest, HashAlg, Kernel, Template};

/// What to measure and for how long.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Duration of each hash-rate measurement (all rounds together).
    pub duration: Duration,
    /// Rounds each hash-rate measurement is split into, interleaved with the others; the median
    /// round is reported.
    pub rounds: usize,
    /// Worker threads of the all-threads measurement; 0 means every hardware thread.
    pub threads: usize,
    /// Stop-latency trials per hash function (and as many for replacing a job).
    pub stop_trials: usize,
    /// Hash functions to measure, in order.
    pub algs: Vec<HashAlg>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(1),
            rounds: 5,
            threads: 0,
            stop_trials: 50,
            algs: vec![HashAlg::Sha1, HashAlg::Sha256],
        }
    }
}

/// A measured hash rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Candidates hashed.
    pub hashes: u64,
    /// Over this long.
    pub elapsed: Duration,
}

impl Rate {
    /// Hashes per second.
    pub fn per_second(&self) -> f64 {
        self.hashes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Million hashes per second.
    pub fn mhs(&self) -> f64 {
        self.per_second() / 1e6
    }
}

/// A latency distribution over several trials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// Trials that completed.
    pub trials: usize,
    /// Median.
    pub p50: Duration,
    /// Worst trial.
    pub max: Duration,
    /// Trials in which some worker had not noticed within a second (not in p50/max).
    pub timeouts: usize,
}

/// Results for one hash function.
#[derive(Debug, Clone, PartialEq)]
pub struct AlgReport {
    /// The hash function.
    pub alg: HashAlg,
    /// `digest(format!("{prefix}{nonce}"))`, one thread.
    pub baseline: Rate,
    /// [`Template::search`] on [`Kernel::Portable`], one thread.
    pub portable: Rate,
    /// The [`Miner`] with one worker.
    pub one_thread: Rate,
    /// The [`Miner`] with [`BenchReport::threads`] workers.
    pub all_threads: Rate,
    /// From [`Miner::stop`] until every worker noticed.
    pub stop: Latency,
    /// From [`Miner::start`] of a new job until every worker left the old one.
    pub replace: Latency,
}

impl AlgReport {
    /// One-thread miner speed over the baseline.
    pub fn speedup(&self) -> f64 {
        self.one_thread.per_second() / self.baseline.per_second().max(1e-9)
    }

    /// All-threads miner speed over one thread.
    pub fn scaling(&self) -> f64 {
        self.all_threads.per_second() / self.one_thread.per_second().max(1e-9)
    }
}

/// Everything [`run_bench`] measured; `Display` prints it as a table.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The kernel the miner used.
    pub kernel: Kernel,
    /// Worker threads of the all-threads measurement.
    pub threads: usize,
    /// Duration of each hash-rate measurement.
    pub duration: Duration,
    /// One entry per hash function.
    pub algs: Vec<AlgReport>,
}

/// Runs the benchmark. Takes about `4 × duration` plus a few hundred milliseconds per hash
/// function, and keeps every core busy meanwhile.
pub fn run_bench(opts: &BenchOptions) -> BenchReport {
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let rounds = opts.rounds.max(1);
    let slice = opts.duration / u32::try_from(rounds).unwrap_or(u32::MAX);
    let one = Miner::new(1, |_| {});
    let all = Miner::new(threads, |_| {});
    let algs = opts
        .algs
        .iter()
        .map(|&alg| {
            let template = Template::new(&Digest::zero(alg), 7, 42);
            // Never met in practice, so every measurement hashes for its whole duration.
            let unsolvable = u8::try_from(alg.bits()).unwrap_or(u8::MAX);
            let job = Job { tx: 7, template, difficulty: unsolvable };
            let mut samples: [Vec<Rate>; 4] = Default::default();
            for _ in 0..rounds {
                samples[0].push(baseline(alg, slice));
                samples[1].push(portable(&template, u32::from(unsolvable), slice));
                samples[2].push(miner_rate(&one, job, slice));
                samples[3].push(miner_rate(&all, job, slice));
            }
            let [baseline, portable, one_thread, all_threads] = samples.map(median);
            AlgReport {
                alg,
                baseline,
                portable,
                one_thread,
                all_threads,
                stop: stop_latency(&all, job, opts.stop_trials, false),
                replace: stop_latency(&all, job, opts.stop_trials, true),
            }
        })
        .collect();
    BenchReport { kernel: Kernel::best(), threads, duration: opts.duration, algs }
}

fn median(mut rates: Vec<Rate>) -> Rate {
    rates.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    rates.get(rates.len() / 2).copied().unwrap_or(Rate { hashes: 0, elapsed: Duration::ZERO })
}

/// Runs `step` (which hashes `per_step` candidates) until `duration` has passed.
fn timed(duration: Duration, per_step: u64, mut step: impl FnMut()) -> Rate {
    let start = Instant::now();
    let mut hashes = 0;
    loop {
        step();
        hashes += per_step;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            return Rate { hashes, elapsed };
        }
    }
}

fn baseline(alg: HashAlg, duration: Duration) -> Rate {
    const STEP: u64 = 1024;
    // 14 + 12 bytes: one block, as in our own preimage.
    let prefix = "hashvote:7:42:";
    let mut nonce = 100_000_000_000u64;
    let mut best = 0;
    let rate = timed(duration, STEP, || {
        for _ in 0..STEP {
            let first = match alg {
                HashAlg::Sha1 => first_word(&sha1::Sha1::digest(format!("{prefix}{nonce}"))),
                HashAlg::Sha256 => first_word(&sha2::Sha256::digest(format!("{prefix}{nonce}"))),
            };
            best = best.max(first.leading_zeros());
            nonce += 1;
        }
    });
    black_box(best);
    rate
}

fn first_word(digest: &[u8]) -> u32 {
    digest.first_chunk::<4>().map_or(0, |w| u32::from_be_bytes(*w))
}

fn portable(template: &Template, difficulty: u32, duration: Duration) -> Rate {
    let mut start = 0;
    timed(duration, BATCH, || {
        black_box(template.search_with(Kernel::Portable, difficulty, start, BATCH));
        start += BATCH;
    })
}

fn miner_rate(miner: &Miner, job: Job, duration: Duration) -> Rate {
    miner.start(job);
    // Let every worker wake up and reach full speed before counting.
    std::thread::sleep(Duration::from_millis(10));
    let (before, start) = (miner.hashes(), Instant::now());
    std::thread::sleep(duration);
    let (after, elapsed) = (miner.hashes(), start.elapsed());
    miner.stop();
    Rate { hashes: after.saturating_sub(before), elapsed }
}

/// Time from `stop()` (or, with `replace`, from `start()` of another job) to the last worker
/// noticing, over `trials` trials, each interrupting the workers at a different point of a batch.
fn stop_latency(miner: &Miner, job: Job, trials: usize, replace: bool) -> Latency {
    let mut samples = Vec::with_capacity(trials);
    let mut timeouts = 0;
    let mut phase: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..trials {
        miner.start(job);
        // 1 to 3 ms of mining, varied so the stop lands anywhere in a batch.
        phase = phase.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_micros(1000 + (phase >> 33) % 2000));
        let asked = Instant::now();
        if replace {
            miner.start(Job { tx: job.tx + 1, ..job });
        } else {
            miner.stop();
        }
        let generation = miner.generation();
        let deadline = asked + Duration::from_secs(1);
        loop {
            if let Some(noticed) = miner.released(generation) {
                samples.push(noticed.saturating_duration_since(asked));
                break;
            }
            if Instant::now() >= deadline {
                timeouts += 1;
                break;
            }
            // Sleep rather than spin: the workers need the cores.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    miner.stop();
    samples.sort();
    Latency {
        trials: samples.len(),
        p50: samples.get(samples.len() / 2).copied().unwrap_or_default(),
        max: samples.last().copied().unwrap_or_default(),
        timeouts,
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p50 {}, max {} ({} trials", micros(self.p50), micros(self.max), self.trials)?;
        if self.timeouts > 0 {
            write!(f, ", {} over 1 s", self.timeouts)?;
        }
        f.write_str(")")
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "proof-of-work search: kernel {}, {} threads, {:.1} s per measurement",
            self.kernel,
            self.threads,
            self.duration.as_secs_f64()
        )?;
        for a in &self.algs {
            let name = a.alg.name();
            let miner = format!("Miner, {} ×{}", self.kernel, self.kernel.lanes(a.alg));
            writeln!(f)?;
            writeln!(f, "{name:<7} {:<34} {:>7} {:>9} {:>11}", "loop", "threads", "MH/s", "× baseline")?;
            let base = a.baseline.per_second().max(1e-9);
            let digest = format!("{}::digest(format!(..))", if a.alg == HashAlg::Sha1 { "Sha1" } else { "Sha256" });
            let rows = [
                (digest.as_str(), 1, a.baseline),
                ("Template::search, portable", 1, a.portable),
                (miner.as_str(), 1, a.one_thread),
                (miner.as_str(), self.threads, a.all_threads),
            ];
            for (what, threads, rate) in rows {
                writeln!(
                    f,
                    "{name:<7} {what:<34} {threads:>7} {:>9.1} {:>10.2}×",
                    rate.mhs(),
                    rate.per_second() / base
                )?;
            }
            writeln!(f, "{name:<7} scaling {} threads / 1 thread: {:.2}×", self.threads, a.scaling())?;
            writeln!(f, "{name:<7} stop latency:    {}", a.stop)?;
            writeln!(f, "{name:<7} replace latency: {}", a.replace)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_run_measures_everything() {
        let report = run_bench(&BenchOptions {
            duration: Duration::from_millis(40),
            rounds: 2,
            threads: 2,
            stop_trials: 3,
            algs: vec![HashAlg::Sha1, HashAlg::Sha256],
        });
        assert_eq!(report.algs.len(), 2);
        for a in &report.algs {
            // A starved worker may legitimately count nothing in 20 ms on a busy test machine.
            for rate in [a.baseline, a.portable] {
                assert!(rate.hashes > 0, "{a:?}");
            }
            for rate in [a.baseline, a.portable, a.one_thread, a.all_threads] {
                assert!(rate.elapsed >= Duration::from_millis(20), "{a:?}");
            }
            assert_eq!(a.stop.trials + a.stop.timeouts, 3);
            assert_eq!(a.replace.trials + a.replace.timeouts, 3);
        }
        let table = report.to_string();
        assert!(table.contains("sha1") && table.contains("sha256") && table.contains("stop latency"), "{table}");
    }
}
