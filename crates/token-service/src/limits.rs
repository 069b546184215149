//! Login abuse limits on `/jwt/auth`: per-client and per-username rate limits and the bounded
//! queue in front of argon2.
//!
//! - **Per client** (the peer address): every token request counts, whatever the grant
//!   (password, personal access token, deploy token, refresh token).
//! - **Per username**: *failed* logins count (wrong secret, unknown user, unusable refresh
//!   token), so a CI fleet sharing one deploy token is not throttled while it succeeds, and
//!   a password guesser is after a handful of tries. An attempt takes a token before
//!   authenticating and gives it back on success, so concurrent guesses cannot all pass the
//!   check before the first failure is counted.
//! - **argon2**: at most `slots` verifications run at once and at most `queue` wait; a
//!   request that would wait beyond that, or longer than `queue_timeout`, is refused.
//!
//! Over a limit, the service answers 429 `TOOMANYREQUESTS` with `Retry-After` (Docker
//! clients understand both).
//!
//! The limiter is a token bucket per key in a map bounded to `max_keys` entries: when full,
//! entries whose bucket has refilled are dropped first (they are equivalent to absent), then
//! the fullest one. Written here rather than taken from `governor`: its keyed limiters
//! consume on every check and cannot give a token back (needed to count failures only), and
//! its keyed state has no bound besides periodic `retain_recent` calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, SemaphorePermit};

/// A rate: `burst` requests at once, refilled at `per_minute` requests a minute.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

/// `login_limits` of `token-service.json`; every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginLimits {
    /// Every token request of one client address.
    pub per_client: Rate,
    /// Failed logins of one username.
    pub per_username: Rate,
    /// Concurrent argon2 verifications (default: one per available core).
    pub argon2_slots: Option<usize>,
    /// Verifications that may wait for a slot; more are refused at once.
    pub argon2_queue: usize,
    /// Longest wait for a slot, in milliseconds.
    pub argon2_queue_timeout_ms: u64,
    /// Clients and usernames tracked at once (each limiter).
    pub max_tracked_keys: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            per_client: Rate { burst: 100, per_minute: 600 },
            per_username: Rate { burst: 10, per_minute: 10 },
            argon2_slots: None,
            argon2_queue: 16,
            argon2_queue_timeout_ms: 2_000,
            max_tracked_keys: 100_000,
        }
    }
}

impl LoginLimits {
    /// Checks the ranges; the error names the field.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (name, rate) in [("per_client", self.per_client), ("per_username", self.per_username)] {
            if rate.burst == 0 || rate.per_minute == 0 {
                return Err((format!("$.login_limits.{name}"), "`burst` and `per_minute` must be at least 1".into()));
            }
        }
        if self.argon2_slots == Some(0) {
            return Err(("$.login_limits.argon2_slots".into(), "must be at least 1".into()));
        }
        if self.argon2_queue > 100_000 {
            return Err(("$.login_limits.argon2_queue".into(), "must be at most 100000".into()));
        }
        if !(1..=60_000).contains(&self.argon2_queue_timeout_ms) {
            return Err(("$.login_limits.argon2_queue_timeout_ms".into(), "must be between 1 and 60000".into()));
        }
        if !(1..=10_000_000).contains(&self.max_tracked_keys) {
            return Err(("$.login_limits.max_tracked_keys".into(), "must be between 1 and 10000000".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by key, bounded in keys.
#[derive(Debug)]
pub struct KeyedLimiter {
    burst: f64,
    per_second: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyedLimiter {
    pub fn new(rate: Rate, max_keys: usize) -> KeyedLimiter {
        KeyedLimiter {
            burst: f64::from(rate.burst.max(1)),
            per_second: f64::from(rate.per_minute.max(1)) / 60.0,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
    }

    /// Takes one token for `key` at `now`; `Err(wait)` when there is none, with the time
    /// until there is one.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.burst, updated: now });
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_second))
        }
    }

    /// Gives back the token taken for `key` (a login that succeeded).
    pub fn give_back(&self, key: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the refilled buckets (the same as absent ones); if none is, the fullest.
    fn make_room(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let full_after = |b: &Bucket| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * self.per_second
        };
        buckets.retain(|_, b| full_after(b) < self.burst);
        if buckets.len() >= self.max_keys {
            let fullest =
                buckets.iter().max_by(|a, b| full_after(a.1).total_cmp(&full_after(b.1))).map(|(k, _)| k.clone());
            if let Some(k) = fullest {
                buckets.remove(&k);
            }
        }
    }
}

/// Why a request was refused by a limit, with the wait to announce in `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttled {
    pub message: String,
    pub retry_after: Duration,
}

impl Throttled {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)
    }
}

/// Counters of the login limits (`GET /stats`).
#[derive(Debug, Default, Serialize)]
pub struct LoginStats {
    pub failed_logins: AtomicU64,
    pub throttled_client: AtomicU64,
    pub throttled_username: AtomicU64,
    pub argon2_queue_full: AtomicU64,
}

/// Everything that bounds login work.
#[derive(Debug)]
pub struct LoginGuard {
    pub limits: LoginLimits,
    pub per_client: KeyedLimiter,
    pub per_username: KeyedLimiter,
    slots: Semaphore,
    waiting: AtomicUsize,
    /// argon2 memory, one buffer per slot, reused from run to run.
    memory: Mutex<Vec<Vec<argon2::Block>>>,
    pub stats: LoginStats,
}

/// Concurrent argon2 verifications by default: one per available core (argon2 is CPU-bound;
/// more slots only add memory: each holds the hash's `m` KiB, 19 MiB for OWASP's default).
fn default_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl LoginGuard {
    /// Password verifications waiting for an argon2 slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn new(limits: LoginLimits) -> LoginGuard {
        LoginGuard {
            per_client: KeyedLimiter::new(limits.per_client, limits.max_tracked_keys),
            per_username: KeyedLimiter::new(limits.per_username, limits.max_tracked_keys),
            slots: Semaphore::new(limits.argon2_slots.unwrap_or_else(default_slots)),
            waiting: AtomicUsize::new(0),
            memory: Mutex::new(Vec::new()),
            stats: LoginStats::default(),
            limits,
        }
    }

    /// Counts one token request of `client`.
    pub fn client_request(&self, client: &str) -> Result<(), Throttled> {
        self.per_client.take(client, Instant::now()).map_err(|retry_after| {
            self.stats.throttled_client.fetch_add(1, Ordering::Relaxed);
            Throttled { message: "too many token requests from this client; retry later".into(), retry_after }
        })
    }

    /// Reserves one failed login of `username` before an attempt; the caller gives it back
    /// ([`LoginGuard::login_succeeded`]) when the attempt succeeds.
    pub fn login_attempt(&self, username: &str) -> Result<(), Throttled> {
        self.per_username.take(username, Instant::now()).map_err(|retry_after| {
            self.stats.throttled_username.fetch_add(1, Ordering::Relaxed);
            Throttled { message: "too many failed logins for this username; retry later".into(), retry_after }
        })
    }

    pub fn login_succeeded(&self, username: &str) {
        self.per_username.give_back(username);
    }

    /// Counts a failed login; returns the running total.
    pub fn login_failed(&self) -> u64 {
        self.stats.failed_logins.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// argon2 memory for a run in a slot (a buffer kept from an earlier run, or a new one).
    pub fn take_memory(&self) -> Vec<argon2::Block> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default()
    }

    /// Gives a run's memory back for the next run.
    pub fn return_memory(&self, memory: Vec<argon2::Block>) {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner).push(memory);
    }

    /// A slot for one argon2 verification: at once, or after waiting in a bounded queue.
    pub async fn argon2_slot(&self) -> Result<SemaphorePermit<'_>, Throttled> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let full = || {
            self.stats.argon2_queue_full.fetch_add(1, Ordering::Relaxed);
            Throttled {
                message: "too many password logins in progress; retry later".into(),
                retry_after: Duration::from_secs(1),
            }
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.limits.argon2_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(full());
        }
        let timeout = Duration::from_millis(self.limits.argon2_queue_timeout_ms);
        let permit = tokio::time::timeout(timeout, self.slots.acquire()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(full()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_say_how_long_to_wait() {
        let l = KeyedLimiter::new(Rate { burst: 3, per_minute: 60 }, 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take("a", t0).is_ok());
        }
        let wait = l.take("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.take("b", t0).is_ok(), "keys are independent");
        assert!(l.take("a", t0 + Duration::from_secs(1)).is_ok());
        l.give_back("a");
        assert!(l.take("a", t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn keys_are_bounded() {
        let l = KeyedLimiter::new(Rate { burst: 2, per_minute: 1 }, 100);
        let t0 = Instant::now();
        for _ in 0..2 {
            l.take("victim", t0).unwrap();
        }
        for i in 0..10_000 {
            let _ = l.take(&format!("user-{i}"), t0);
            assert!(l.len() <= 100);
        }
        // Every tracked bucket is fresh-and-used: the fullest go first, so the exhausted
        // victim (0 tokens) is kept while the others (1 token left) are evicted.
        assert!(l.take("victim", t0).is_err());
    }

    #[tokio::test]
    async fn the_argon2_queue_is_bounded() {
        let g = LoginGuard::new(LoginLimits {
            argon2_slots: Some(1),
            argon2_queue: 1,
            argon2_queue_timeout_ms: 50,
            ..LoginLimits::default()
        });
        let held = g.argon2_slot().await.unwrap();
        // One may wait (and times out); a second waiter is refused at once.
        let (a, b) = tokio::join!(g.argon2_slot(), async {
            tokio::task::yield_now().await;
            g.argon2_slot().await
        });
        assert!(a.is_err() && b.is_err());
        assert_eq!(g.stats.argon2_queue_full.load(Ordering::Relaxed), 2);
        drop(held);
        assert!(g.argon2_slot().await.is_ok());
    }

    #[test]
    fn defaults_are_valid_and_ranges_checked() {
        assert!(LoginLimits::default().check().is_ok());
        let bad = LoginLimits { per_username: Rate { burst: 0, per_minute: 1 }, ..LoginLimits::default() };
        assert_eq!(bad.check().unwrap_err().0, "$.login_limits.per_username");
    }
}
