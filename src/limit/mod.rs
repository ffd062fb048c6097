//! Rate limits against abuse, keyed by who asks (a source address, a node, a DERP key):
//! a token bucket per key holding up to `per_minute` tokens, refilled at `per_minute`
//! per minute. Written here rather than taken from a crate because callers need to look
//! without spending (a source that failed authentication too often is refused before its
//! key is checked) and the key set must stay bounded without a sweeper task.

pub mod conn;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

/// Most keys remembered; beyond it, buckets that have refilled are forgotten first.
const MAX_KEYS: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A refusal by a rate limit, for the caller's answer (HTTP 429 or gRPC).
pub struct Refusal {
    /// Whole seconds until a retry can pass (at least 1).
    pub retry_after_secs: u64,
    pub message: String,
}

/// Token buckets per key. `per_minute == 0` disables the limit.
pub struct RateLimiter<K> {
    /// The `limits.*` key, the label of `hsd_limit_refusals_total`.
    name: &'static str,
    per_minute: u32,
    refusals: IntCounterVec,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(name: &'static str, per_minute: u32, refusals: IntCounterVec) -> Self {
        RateLimiter {
            name,
            per_minute,
            refusals,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Spends one token of `key`; false (and counted as a refusal) when it has none.
    pub fn allow(&self, key: &K) -> bool {
        self.allow_at(key, Instant::now())
    }

    /// Whether `key` has a token left, without spending it (refusals are counted).
    pub fn has_budget(&self, key: &K) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let ok = buckets
            .get_mut(key)
            .is_none_or(|b| self.refill(b, Instant::now()) >= 1.0);
        if !ok {
            self.refusals.with_label_values(&[self.name]).inc();
        }
        ok
    }

    /// What to tell a caller this limit refused: `too many WHAT; retry in Ns (limits.NAME)`.
    pub fn refusal(&self, key: &K, what: &str) -> Refusal {
        let retry_after_secs = self.retry_after(key).as_secs().max(1);
        Refusal {
            retry_after_secs,
            message: format!(
                "too many {what}; retry in {retry_after_secs}s (limits.{})",
                self.name
            ),
        }
    }

    /// How long until `key` has a token again (zero if it has one).
    pub fn retry_after(&self, key: &K) -> Duration {
        if self.per_minute == 0 {
            return Duration::ZERO;
        }
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let Some(bucket) = buckets.get_mut(key) else {
            return Duration::ZERO;
        };
        let missing = (1.0 - self.refill(bucket, Instant::now())).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / f64::from(self.per_minute))
    }

    fn allow_at(&self, key: &K, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let capacity = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            self.forget_refilled(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        if self.refill(bucket, now) >= 1.0 {
            bucket.tokens -= 1.0;
            return true;
        }
        self.refusals.with_label_values(&[self.name]).inc();
        false
    }

    /// Brings `bucket` up to `now`; returns its tokens.
    fn refill(&self, bucket: &mut Bucket, now: Instant) -> f64 {
        let capacity = f64::from(self.per_minute);
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * capacity / 60.0).min(capacity);
        bucket.at = now;
        bucket.tokens
    }

    /// Drops keys whose buckets are full again (they behave like unknown keys). If every
    /// key is still limited, forgets them all: a flood of sources must not lock out the
    /// next honest one.
    fn forget_refilled(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let capacity = f64::from(self.per_minute);
        buckets.retain(|_, b| self.refill(b, now) < capacity);
        if buckets.len() >= MAX_KEYS {
            buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_minute: u32) -> RateLimiter<u32> {
        let refusals =
            IntCounterVec::new(prometheus::Opts::new("r", "r"), &["limit"]).expect("metric");
        RateLimiter::new("test", per_minute, refusals)
    }

    #[test]
    fn a_burst_up_to_the_budget_then_one_token_per_interval() {
        let l = limiter(6);
        let t0 = Instant::now();
        for _ in 0..6 {
            assert!(l.allow_at(&1, t0));
        }
        assert!(!l.allow_at(&1, t0), "budget spent");
        assert!(l.allow_at(&2, t0), "other keys are not affected");
        assert!(!l.allow_at(&1, t0 + Duration::from_secs(9)), "not yet");
        assert!(l.allow_at(&1, t0 + Duration::from_secs(10)), "one per 10 s");
        assert!(!l.allow_at(&1, t0 + Duration::from_secs(10)));
        assert_eq!(l.refusals.with_label_values(&["test"]).get(), 3);
    }

    #[test]
    fn peeking_spends_nothing_and_zero_disables() {
        let l = limiter(1);
        assert!(l.has_budget(&1));
        assert!(l.allow(&1));
        assert!(!l.has_budget(&1));
        assert!(l.retry_after(&1) > Duration::from_secs(50));
        let off = limiter(0);
        for _ in 0..1000 {
            assert!(off.allow(&1));
        }
    }

    #[test]
    fn the_key_set_stays_bounded() {
        let l = limiter(1);
        let t0 = Instant::now();
        for k in 0..(MAX_KEYS as u32 + 10) {
            l.allow_at(&k, t0);
        }
        assert!(l.buckets.lock().unwrap().len() <= MAX_KEYS);
    }
}
