//! A pool of helper threads that spin while they wait, for splitting the matrix-vector products
//! of batch-1 decoding over cores.
//!
//! One decoded token is about twenty products of 20 to 90 microseconds each. A general pool
//! (rayon) lets its idle threads sleep, and waking one costs more than the product saves; these
//! helpers stay awake for the few microseconds between products (and sleep after
//! [`SpinPool::IDLE_SPINS`] fruitless polls, so a pool that is not used does not hold a core).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The job of one round: called with the index of the worker (1..threads on helpers).
type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Round number; a helper runs the job when it sees a new one.
    round: AtomicUsize,
    /// Helpers that finished the current round.
    finished: AtomicUsize,
    /// The job of the current round, valid from `round`'s increment until every helper finished.
    job: Mutex<Option<&'static Job>>,
    /// A helper's job panicked this round.
    panicked: AtomicBool,
    stop: AtomicBool,
}

/// `threads - 1` spinning helpers plus the calling thread (see the module docs).
pub struct SpinPool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl SpinPool {
    /// Polls of an idle helper before it sleeps (about a millisecond).
    pub const IDLE_SPINS: u32 = 20_000;

    /// A pool of `threads` workers in all (the caller counts as one; 0 and 1 mean no helpers).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            round: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            job: Mutex::new(None),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let helpers = (1..threads.max(1))
            .map(|index| {
                let shared = Arc::clone(&shared);
                thread::spawn(move || helper(&shared, index))
            })
            .collect();
        SpinPool { shared, helpers }
    }

    /// Workers in all, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Calls `job(i)` for every `i` in `0..threads()`, `job(0)` on the calling thread, and returns
    /// when all calls have returned.
    pub fn run<'a>(&self, job: &'a (dyn Fn(usize) + Sync + 'a)) {
        if self.helpers.is_empty() {
            return job(0);
        }
        // SAFETY: the reference is only used by helpers during this round, and this function
        // does not return, not even by unwinding (panics in `job` are caught on every thread
        // and re-raised after the wait below), until every helper has finished the round.
        let job: &'static Job = unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Job>(job) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        self.shared.finished.store(0, Ordering::Relaxed);
        self.shared.round.fetch_add(1, Ordering::Release);
        for h in &self.helpers {
            h.thread().unpark();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        while self.shared.finished.load(Ordering::Acquire) < self.helpers.len() {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if self.shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a job panicked on a SpinPool helper thread");
        }
    }
}

fn helper(shared: &Shared, index: usize) {
    let mut seen = 0;
    let mut idle = 0u32;
    loop {
        let round = shared.round.load(Ordering::Acquire);
        if round != seen {
            seen = round;
            idle = 0;
            let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(job) = job {
                // A panicking job still counts as finished (or the caller would wait forever);
                // the caller re-raises it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index))).is_err() {
                    shared.panicked.store(true, Ordering::Relaxed);
                }
            }
            shared.finished.fetch_add(1, Ordering::Release);
        } else if shared.stop.load(Ordering::Acquire) {
            return;
        } else if idle < SpinPool::IDLE_SPINS {
            idle += 1;
            std::hint::spin_loop();
        } else {
            // `run` unparks after publishing a round, so a wake-up is never lost; the timeout
            // only bounds the wait on `stop`.
            thread::park_timeout(Duration::from_millis(50));
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for h in self.helpers.drain(..) {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_runs_once_per_round() {
        for threads in [0, 1, 2, 3] {
            let pool = SpinPool::new(threads);
            let counts: Vec<AtomicUsize> = (0..pool.threads()).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..1000 {
                pool.run(&|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1000), "threads {threads}");
        }
    }

    #[test]
    fn sleeping_helpers_wake_up() {
        let pool = SpinPool::new(2);
        let hits = AtomicUsize::new(0);
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(20)); // longer than the spin phase
            pool.run(&|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller_and_the_pool_survives() {
        let pool = SpinPool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(&|i| assert!(i == 0, "worker {i}"))));
        assert!(r.is_err(), "a helper's panic propagates");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(&|i| assert!(i != 0, "caller"))));
        assert!(r.is_err(), "the caller's panic propagates");
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
