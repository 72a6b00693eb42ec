//! A fixed pool of hashing threads, each with argon2 memory of its own, reused for every job.
//!
//! A caller submits a job (verify a secret against a stored hash, or hash a new secret) and
//! waits for it. If no thread *starts* the job within the caller's `wait`, the job is
//! withdrawn (it never runs) and the caller gets [`PoolError::Busy`]; once started, a job
//! runs to completion and the caller gets its result. Memory: each thread grows its buffer
//! to the largest job it has run (at most [`super::MAX_M_COST_KIB`]) and keeps it, so the
//! pool holds at most `threads × max m_cost` whatever the number of jobs or of callers.
//! bcrypt (0.2 keys) runs here too: it needs no buffer, but it shares the threads' CPU bound.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use super::argon2id::{self, Memory, StoredArgon2};
use super::{verify_bcrypt, HashError, HashParams, HashScheme};

/// Jobs waiting for a thread, at most (past this a submission is [`PoolError::Busy`] at
/// once). Withdrawn jobs leave the queue as soon as a thread reaches them.
const QUEUE_CAPACITY: usize = 4096;

/// Why a pooled job gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No hashing thread started the job within the wait (it did not run).
    #[error("every hashing thread stayed busy; retry shortly")]
    Busy,
    /// The job ran (or was refused before running) with this error.
    #[error(transparent)]
    Hash(#[from] HashError),
}

enum Job {
    VerifyArgon2 {
        secret: Vec<u8>,
        stored: StoredArgon2,
    },
    VerifyBcrypt {
        input: String,
        stored: String,
    },
    Hash {
        secret: Vec<u8>,
        params: HashParams,
    },
    /// Holds a thread until the sender is dropped (tests: a busy pool).
    #[cfg(test)]
    Hold(Receiver<()>),
}

enum Answer {
    Verified(bool),
    Hashed(String),
}

enum State {
    Queued,
    Running,
    Done(Result<Answer, HashError>),
    Withdrawn,
}

struct Ticket {
    state: Mutex<State>,
    changed: Condvar,
}

struct Submission {
    job: Job,
    ticket: Arc<Ticket>,
}

/// A fixed set of `fmg-hash-<n>` threads running argon2id (and bcrypt) jobs in memory
/// they keep. Dropping the pool stops its threads (after the jobs they are running).
pub struct HashPool {
    queue: Option<Sender<Submission>>,
    workers: Vec<JoinHandle<()>>,
    memory: Arc<AtomicUsize>,
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool")
            .field("threads", &self.workers.len())
            .field("memory_bytes", &self.memory_bytes())
            .finish()
    }
}

impl HashPool {
    /// A pool of `threads` hashing threads (at least 1). Their memory is allocated by the
    /// first job each runs.
    ///
    /// # Errors
    /// The OS error if a thread cannot be started.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Submission>(QUEUE_CAPACITY);
        let memory = Arc::new(AtomicUsize::new(0));
        let mut pool = Self {
            queue: Some(tx),
            workers: Vec::with_capacity(threads.max(1)),
            memory: Arc::clone(&memory),
        };
        for n in 0..threads.max(1) {
            let (rx, memory) = (rx.clone(), Arc::clone(&memory));
            let handle = std::thread::Builder::new()
                .name(format!("fmg-hash-{n}"))
                .spawn(move || work(&rx, &memory))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Number of hashing threads.
    #[must_use]
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Bytes of argon2 memory the threads hold now (at most `threads × max m_cost seen`).
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.memory.load(Ordering::Relaxed)
    }

    /// Checks `input` against `stored` (an argon2id PHC string, or the bcrypt hash of a 0.2
    /// key; see [`super::verify_secret`]) on a pool thread. The hash is parsed and its cost
    /// checked here first, so a malformed or too costly one never reaches a thread.
    ///
    /// # Errors
    /// [`PoolError::Busy`] if no thread started it within `wait`; [`PoolError::Hash`] for a
    /// malformed or too costly stored hash.
    pub fn verify(&self, input: &str, stored: &str, wait: Duration) -> Result<bool, PoolError> {
        let job = if HashScheme::of(stored) == Some(HashScheme::Bcrypt) {
            Job::VerifyBcrypt {
                input: input.to_owned(),
                stored: stored.to_owned(),
            }
        } else {
            Job::VerifyArgon2 {
                secret: input.as_bytes().to_vec(),
                stored: StoredArgon2::parse(stored)?,
            }
        };
        match self.run(job, wait)? {
            Answer::Verified(ok) => Ok(ok),
            Answer::Hashed(_) => Err(PoolError::Hash(HashError::Hashing {
                reason: "internal error: a verification answered with a hash".to_owned(),
            })),
        }
    }

    /// Hashes a new secret with `params` on a pool thread; the PHC string.
    ///
    /// # Errors
    /// [`PoolError::Busy`] if no thread started it within `wait`; [`PoolError::Hash`].
    pub fn hash(
        &self,
        secret: &str,
        params: &HashParams,
        wait: Duration,
    ) -> Result<String, PoolError> {
        let job = Job::Hash {
            secret: secret.as_bytes().to_vec(),
            params: *params,
        };
        match self.run(job, wait)? {
            Answer::Hashed(phc) => Ok(phc),
            Answer::Verified(_) => Err(PoolError::Hash(HashError::Hashing {
                reason: "internal error: a hash job answered with a verdict".to_owned(),
            })),
        }
    }

    /// Occupies one thread until the returned sender is dropped (tests: a busy pool). Returns
    /// once a thread runs it.
    #[cfg(test)]
    pub(crate) fn hold_one(&self) -> Sender<()> {
        let (tx, rx) = crossbeam_channel::bounded(0);
        let ticket = self
            .submit(Job::Hold(rx))
            .unwrap_or_else(|_| panic!("queue full"));
        let mut state = ticket.state.lock();
        while matches!(*state, State::Queued) {
            ticket.changed.wait(&mut state);
        }
        tx
    }

    fn submit(&self, job: Job) -> Result<Arc<Ticket>, PoolError> {
        let ticket = Arc::new(Ticket {
            state: Mutex::new(State::Queued),
            changed: Condvar::new(),
        });
        let queue = self.queue.as_ref().ok_or(PoolError::Busy)?;
        match queue.try_send(Submission {
            job,
            ticket: Arc::clone(&ticket),
        }) {
            Ok(()) => Ok(ticket),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(PoolError::Busy),
        }
    }

    fn run(&self, job: Job, wait: Duration) -> Result<Answer, PoolError> {
        let ticket = self.submit(job)?;
        let deadline = Instant::now().checked_add(wait);
        let mut state = ticket.state.lock();
        loop {
            match &*state {
                State::Queued => {
                    let timed_out = match deadline {
                        Some(d) => ticket.changed.wait_until(&mut state, d).timed_out(),
                        None => {
                            ticket.changed.wait(&mut state);
                            false
                        }
                    };
                    if timed_out && matches!(*state, State::Queued) {
                        *state = State::Withdrawn;
                        return Err(PoolError::Busy);
                    }
                }
                // Started: it finishes (one hash); wait for it whatever the deadline.
                State::Running => ticket.changed.wait(&mut state),
                State::Done(_) | State::Withdrawn => break,
            }
        }
        match std::mem::replace(&mut *state, State::Withdrawn) {
            State::Done(result) => result.map_err(PoolError::Hash),
            _ => Err(PoolError::Busy),
        }
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        // Closing the queue ends each thread's loop once it is empty.
        drop(self.queue.take());
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// One hashing thread: takes jobs until the queue closes, in one reused buffer.
fn work(queue: &Receiver<Submission>, total: &AtomicUsize) {
    let mut memory = Memory::new();
    while let Ok(Submission { job, ticket }) = queue.recv() {
        {
            let mut state = ticket.state.lock();
            if !matches!(*state, State::Queued) {
                continue; // withdrawn by a caller that stopped waiting
            }
            *state = State::Running;
        }
        ticket.changed.notify_all();
        let before = argon2id::memory_bytes(&memory);
        let result =
            catch_unwind(AssertUnwindSafe(|| run_job(job, &mut memory))).unwrap_or_else(|_| {
                Err(HashError::Hashing {
                    reason: "the hashing thread panicked".to_owned(),
                })
            });
        let after = argon2id::memory_bytes(&memory);
        if after != before {
            total.fetch_add(after, Ordering::Relaxed);
            total.fetch_sub(before, Ordering::Relaxed);
        }
        *ticket.state.lock() = State::Done(result);
        ticket.changed.notify_all();
    }
    total.fetch_sub(argon2id::memory_bytes(&memory), Ordering::Relaxed);
}

fn run_job(job: Job, memory: &mut Memory) -> Result<Answer, HashError> {
    match job {
        Job::VerifyArgon2 { secret, stored } => {
            stored.matches(&secret, memory).map(Answer::Verified)
        }
        Job::VerifyBcrypt { input, stored } => verify_bcrypt(&input, &stored).map(Answer::Verified),
        Job::Hash { secret, params } => {
            argon2id::hash_into(&secret, &params, memory).map(Answer::Hashed)
        }
        #[cfg(test)]
        Job::Hold(rx) => {
            let _ = rx.recv();
            Ok(Answer::Verified(false))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing::{hash_secret, verify_secret};

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn verifies_and_hashes_like_the_direct_functions() {
        let pool = HashPool::new(2).unwrap();
        let p = HashParams::new(256, 1, 1).unwrap();
        let phc = pool.hash("s3cret", &p, WAIT).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{phc}");
        assert!(verify_secret("s3cret", &phc).unwrap());
        assert!(pool.verify("s3cret", &phc, WAIT).unwrap());
        assert!(!pool.verify("s3creT", &phc, WAIT).unwrap());
        let direct = hash_secret("other", &p).unwrap();
        assert!(pool.verify("other", &direct, WAIT).unwrap());
        let bcrypt = ::bcrypt::hash("fmg_sk_0123456789abcdef.tok", 4).unwrap();
        assert!(pool
            .verify("fmg_sk_0123456789abcdef.tok", &bcrypt, WAIT)
            .unwrap());
        assert!(!pool
            .verify("fmg_sk_0123456789abcdef.toK", &bcrypt, WAIT)
            .unwrap());
    }

    #[test]
    fn bad_stored_hashes_are_errors_before_any_thread_runs() {
        let pool = HashPool::new(1).unwrap();
        let _held = pool.hold_one();
        // The only thread is busy, yet these answer at once: they never reach the queue.
        let huge = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
        assert!(matches!(
            pool.verify("x", huge, WAIT),
            Err(PoolError::Hash(HashError::TooCostly { .. }))
        ));
        assert!(matches!(
            pool.verify("x", "plain", WAIT),
            Err(PoolError::Hash(HashError::Malformed { .. }))
        ));
        assert_eq!(pool.memory_bytes(), 0);
    }

    #[test]
    fn memory_is_held_per_thread_and_bounded_by_the_largest_job() {
        let pool = HashPool::new(2).unwrap();
        let big = hash_secret("b", &HashParams::new(1024, 1, 1).unwrap()).unwrap();
        let small = hash_secret("s", &HashParams::new(64, 1, 1).unwrap()).unwrap();
        // Many jobs from many callers: never more than 2 buffers of the largest size.
        std::thread::scope(|s| {
            for i in 0..16 {
                let (pool, big, small) = (&pool, &big, &small);
                s.spawn(move || {
                    for _ in 0..4 {
                        let phc = if i % 2 == 0 { big } else { small };
                        assert!(!pool.verify("wrong", phc, WAIT).unwrap());
                        assert!(pool.memory_bytes() <= 2 * 1024 * 1024);
                    }
                });
            }
        });
        assert!(
            pool.memory_bytes() >= 1024 * 1024,
            "{}",
            pool.memory_bytes()
        );
        assert!(
            pool.memory_bytes() <= 2 * 1024 * 1024,
            "{}",
            pool.memory_bytes()
        );
    }

    #[test]
    fn a_job_no_thread_starts_within_the_wait_is_withdrawn_and_never_runs() {
        let pool = HashPool::new(1).unwrap();
        let phc = hash_secret("s", &HashParams::new(64, 1, 1).unwrap()).unwrap();
        let held = pool.hold_one();
        assert_eq!(
            pool.verify("s", &phc, Duration::from_millis(20)),
            Err(PoolError::Busy)
        );
        assert_eq!(
            pool.hash("s", &HashParams::insecure_fast(), Duration::from_millis(1)),
            Err(PoolError::Busy)
        );
        drop(held);
        // The withdrawn jobs are skipped; the thread is free for the next one.
        assert!(pool.verify("s", &phc, WAIT).unwrap());
        assert_eq!(pool.memory_bytes(), 64 * 1024);
    }

    #[test]
    fn dropping_the_pool_stops_its_threads() {
        let pool = HashPool::new(3).unwrap();
        assert_eq!(pool.threads(), 3);
        let phc = hash_secret("s", &HashParams::insecure_fast()).unwrap();
        assert!(pool.verify("s", &phc, WAIT).unwrap());
        drop(pool); // joins: a hang here fails the test run
    }
}
