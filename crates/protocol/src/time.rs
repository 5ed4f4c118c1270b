//! Time helpers: every timestamp on the wire is milliseconds since the Unix epoch (UTC); and the
//! one exponential backoff every retry in the fleet follows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now. A clock before 1970 reads as 0.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Converts an epoch-milliseconds timestamp to `SystemTime`.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// Exponential backoff: `base` for the first retry (`retry` 0), doubling with each further one,
/// never more than `max`.
pub fn backoff(base: Duration, retry: u32, max: Duration) -> Duration {
    base.saturating_mul(2u32.saturating_pow(retry.min(31))).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let ms = Duration::from_millis;
        let b = |n| backoff(ms(500), n, ms(30_000));
        assert_eq!(
            [b(0), b(1), b(2), b(5), b(6), b(40)],
            [ms(500), ms(1000), ms(2000), ms(16_000), ms(30_000), ms(30_000)]
        );
        assert_eq!(backoff(Duration::from_secs(u64::MAX / 2), 3, Duration::MAX), Duration::MAX);
    }
}
