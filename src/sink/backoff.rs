//! Exponential back-off with full jitter (AWS's "Exponential Backoff And Jitter"): the n-th
//! wait is uniform in `0..min(cap, base * 2^n)`, so that the retries of many functions
//! throttled at once spread out instead of arriving together.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The waits between the rounds of retries of one batch.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    round: u32,
    random: u64,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        // std's hashers are seeded at random per process and per `RandomState`: enough
        // randomness for jitter without a crate for it.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Backoff {
            base,
            cap,
            round: 0,
            random: seed | 1,
        }
    }

    /// The next wait; each one's ceiling is twice the last one's, up to the cap.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.round.min(20))
            .min(self.cap);
        self.round += 1;
        // xorshift64: uniform enough for spreading retries.
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let fraction = (self.random >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }

    /// After a request that went through: the next wait starts from the base again.
    pub(crate) fn reset(&mut self) {
        self.round = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_jittered_below_a_doubling_ceiling_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_millis(1_000);
        let mut waits = Vec::new();
        for _ in 0..200 {
            let mut b = Backoff::new(base, cap);
            waits.push([0; 6].map(|_| b.next_wait()));
        }
        for (n, ceiling) in [100, 200, 400, 800, 1000, 1000].into_iter().enumerate() {
            let ceiling = Duration::from_millis(ceiling);
            let round: Vec<_> = waits.iter().map(|w| w[n]).collect();
            assert!(round.iter().all(|w| *w < ceiling), "round {n}: {round:?}");
            // Full jitter: spread over the whole range, not bunched at the top.
            assert!(round.iter().any(|w| *w < ceiling / 4), "round {n}");
            assert!(round.iter().any(|w| *w > ceiling * 3 / 4), "round {n}");
        }
        let mut b = Backoff::new(base, cap);
        for _ in 0..5 {
            b.next_wait();
        }
        b.reset();
        assert!(b.next_wait() < base);
    }

    #[test]
    fn waits_are_uniform_below_the_ceiling() {
        // The cap at the base: every ceiling is one second.
        let second = Duration::from_secs(1);
        let mut b = Backoff::new(second, second);
        let mut tenths = [0usize; 10];
        for _ in 0..10_000 {
            tenths[(b.next_wait().as_secs_f64() * 10.0) as usize] += 1;
        }
        // 1,000 in each tenth, give or take 150: five standard deviations (30) of a uniform
        // source.
        assert!(
            tenths.iter().all(|&n| n.abs_diff(1_000) < 150),
            "{tenths:?}"
        );
    }
}
