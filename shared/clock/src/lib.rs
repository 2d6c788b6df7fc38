//! Wall time as the lake and the topics record it, epoch microseconds in UTC, in one place.
//!
//! Decisions that depend on the time (is a window due, has a lease expired, is a buffer old
//! enough to flush) take a [`Clock`], so that tests can fix the time instead of sleeping past it;
//! the services run on [`SystemClock`]. Times are printed one way, [`format_micros`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{SecondsFormat, TimeZone, Utc};

/// The source of "now".
pub trait Clock: Send + Sync + fmt::Debug {
    /// Epoch microseconds in UTC.
    fn now_micros(&self) -> i64;
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        now_micros()
    }
}

/// A clock that stands still until a test moves it; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct FixedClock {
    micros: Arc<AtomicI64>,
}

impl FixedClock {
    pub fn at(micros: i64) -> Self {
        Self { micros: Arc::new(AtomicI64::new(micros)) }
    }

    pub fn set(&self, micros: i64) {
        self.micros.store(micros, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ =
            self.micros.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| Some(now.saturating_add(by)));
    }
}

impl Clock for FixedClock {
    fn now_micros(&self) -> i64 {
        self.micros.load(Ordering::SeqCst)
    }
}

/// Epoch microseconds now, by the wall clock. A clock set before 1970 reads as the epoch, one
/// past what an i64 holds as its maximum.
pub fn now_micros() -> i64 {
    micros_ago(Duration::ZERO)
}

/// Epoch microseconds `age` before now, by the wall clock.
pub fn micros_ago(age: Duration) -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.saturating_sub(age).as_micros()).unwrap_or(i64::MAX)
}

/// Epoch milliseconds (Kafka's timestamps, config ages) as microseconds, saturating.
pub fn millis_to_micros(millis: u64) -> i64 {
    i64::try_from(millis).unwrap_or(i64::MAX).saturating_mul(1_000)
}

/// Epoch microseconds as RFC 3339 in UTC with as many fraction digits as needed in groups of
/// three (`2026-11-26T08:00:00Z`, `…:00.500Z`), the form of events, logs and the CLI; the number
/// itself where no date can show it.
pub fn format_micros(micros: i64) -> String {
    Utc.timestamp_micros(micros)
        .single()
        .map(|time| time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| micros.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_utc_with_the_fraction_they_need() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_micros(1_796_083_200_000_000), "2026-12-01T00:00:00Z");
        assert_eq!(format_micros(1_796_083_200_500_000), "2026-12-01T00:00:00.500Z");
        assert_eq!(format_micros(1_796_083_200_000_001), "2026-12-01T00:00:00.000001Z");
        assert_eq!(format_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn times_no_date_can_show_print_as_the_number() {
        assert_eq!(format_micros(i64::MAX), i64::MAX.to_string());
        assert_eq!(format_micros(i64::MIN), i64::MIN.to_string());
    }

    #[test]
    fn a_fixed_clock_moves_only_when_told_and_its_clones_follow() {
        let clock = FixedClock::at(1_000);
        let shared = clock.clone();
        assert_eq!(shared.now_micros(), 1_000);
        clock.advance(Duration::from_millis(2));
        assert_eq!(shared.now_micros(), 3_000);
        clock.set(i64::MAX - 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(shared.now_micros(), i64::MAX, "saturates");
    }

    #[test]
    fn the_system_clock_reads_the_wall_clock() {
        let before = now_micros();
        let read = SystemClock.now_micros();
        assert!(read >= before && read - before < 60_000_000);
        assert!(micros_ago(Duration::from_secs(60)) <= read - 60_000_000);
        assert_eq!(millis_to_micros(u64::MAX), i64::MAX);
        assert_eq!(millis_to_micros(1_500), 1_500_000);
    }
}
