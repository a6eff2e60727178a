//! Reconnect pacing (exponential backoff with jitter) and the randomness it and the twin
//! request ids need, from the OS generator.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first retry delay.
const INITIAL: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
const MAX: Duration = Duration::from_secs(30);
/// ±20%: clients that lost the hub together do not all come back in the same instant.
const JITTER: f64 = 0.2;

/// Delays between reconnect attempts: 100 ms doubling up to 30 s, each ±20%.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = INITIAL
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(MAX);
        self.attempt = self.attempt.saturating_add(1);
        // A uniform factor in [1 - JITTER, 1 + JITTER].
        let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
    }

    /// Starts over after a connection that held.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// 64 random bits. If the OS generator fails (it practically never does) the clock stands
/// in: these values pace retries and name requests, they guard no secret.
pub(crate) fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        now.as_secs()
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(u64::from(now.subsec_nanos()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_cap_at_thirty_seconds() {
        let mut b = Backoff::default();
        let mut expected = 0.1;
        for _ in 0..12 {
            let d = b.next_delay().as_secs_f64();
            assert!(
                d >= expected * 0.8 - 1e-9 && d <= expected * 1.2 + 1e-9,
                "{d} vs {expected}"
            );
            expected = (expected * 2.0).min(30.0);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
