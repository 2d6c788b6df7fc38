//! Wall time as the lake and the topics record it, epoch microseconds in UTC, in one place.
//!
//! Decisions that depend on the time (is a window due, has a lease expired, is a buffer old
//! enough to flush) take a [`Clock`], so that tests can fix the time instead of sleeping past it;
//! the services run on [`SystemClock`]. Times are printed one way, [`format_micros`], except two
//! forms kept for readers that already depend on them ([`format_micros_shortest_fraction`],
//! [`format_micros_fixed_fraction`]), and read one way, [`parse_rfc3339_micros`].

mod rfc3339;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, SecondsFormat, TimeZone, Timelike, Utc};

pub use crate::rfc3339::{Rfc3339Error, parse_rfc3339_micros};

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

/// Epoch microseconds as RFC 3339 in UTC with only the fraction digits that are not trailing
/// zeros (`…:00Z`, `…:00.5Z`, `…:00.000001Z`), for the years 0000 to 9999 that RFC 3339 can
/// write; `None` for others. The form in which ingest quotes event times back in its 400
/// answers.
pub fn format_micros_shortest_fraction(micros: i64) -> Option<String> {
    let utc = DateTime::from_timestamp_micros(micros).filter(|utc| (0..=9_999).contains(&utc.year()))?;
    let mut text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        utc.year(),
        utc.month(),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    );
    let micros_of_second = micros.rem_euclid(1_000_000);
    if micros_of_second != 0 {
        text.push('.');
        text.push_str(format!("{micros_of_second:06}").trim_end_matches('0'));
    }
    text.push('Z');
    Some(text)
}

/// Epoch microseconds as `YYYY-MM-DDThh:mm:ss.ffffffZ` in UTC, always six fraction digits, for
/// the years -9999 to 9999 (one before 0000 with its sign, `-0001-12-31T…`); `None` beyond. The
/// form of the timestamp bounds in the lake's Delta file statistics.
pub fn format_micros_fixed_fraction(micros: i64) -> Option<String> {
    let utc = DateTime::from_timestamp_micros(micros).filter(|utc| (-9_999..=9_999).contains(&utc.year()))?;
    let sign = if utc.year() < 0 { "-" } else { "" };
    Some(format!(
        "{sign}{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        utc.year().unsigned_abs(),
        utc.month(),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second(),
        micros.rem_euclid(1_000_000)
    ))
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

    /// 2026-11-26T08:00:00Z.
    const NOV_26_08_00: i64 = 1_795_680_000_000_000;
    /// 0000-01-01T00:00:00Z.
    const START_OF_0000: i64 = -62_167_219_200_000_000;
    /// 9999-12-31T23:59:59.999999Z.
    const END_OF_9999: i64 = 253_402_300_800_000_000 - 1;
    /// -9999-01-01T00:00:00Z.
    const START_OF_MINUS_9999: i64 = -377_705_116_800_000_000;

    #[test]
    fn the_shortest_fraction_drops_each_trailing_zero_and_needs_a_four_digit_year() {
        let cases: &[(i64, Option<&str>)] = &[
            (0, Some("1970-01-01T00:00:00Z")),
            (-1_000, Some("1969-12-31T23:59:59.999Z")),
            (-1, Some("1969-12-31T23:59:59.999999Z")),
            // Digit by digit, not in groups of three as format_micros has them.
            (NOV_26_08_00 + 500_000, Some("2026-11-26T08:00:00.5Z")),
            (NOV_26_08_00 + 5_000, Some("2026-11-26T08:00:00.005Z")),
            (NOV_26_08_00 + 123_450, Some("2026-11-26T08:00:00.12345Z")),
            (NOV_26_08_00 + 1, Some("2026-11-26T08:00:00.000001Z")),
            (START_OF_0000, Some("0000-01-01T00:00:00Z")),
            (END_OF_9999, Some("9999-12-31T23:59:59.999999Z")),
            (START_OF_0000 - 1, None),
            (END_OF_9999 + 1, None),
            (i64::MIN, None),
            (i64::MAX, None),
        ];
        for &(micros, expected) in cases {
            assert_eq!(format_micros_shortest_fraction(micros).as_deref(), expected, "{micros}");
        }
    }

    #[test]
    fn the_fixed_fraction_has_six_digits_and_signs_years_before_0000() {
        let cases: &[(i64, Option<&str>)] = &[
            (0, Some("1970-01-01T00:00:00.000000Z")),
            (-1, Some("1969-12-31T23:59:59.999999Z")),
            (NOV_26_08_00 + 1, Some("2026-11-26T08:00:00.000001Z")),
            (NOV_26_08_00 + 500_000, Some("2026-11-26T08:00:00.500000Z")),
            (START_OF_0000, Some("0000-01-01T00:00:00.000000Z")),
            (START_OF_0000 - 1, Some("-0001-12-31T23:59:59.999999Z")),
            (START_OF_MINUS_9999, Some("-9999-01-01T00:00:00.000000Z")),
            (END_OF_9999, Some("9999-12-31T23:59:59.999999Z")),
            (START_OF_MINUS_9999 - 1, None),
            (END_OF_9999 + 1, None),
            (i64::MIN, None),
            (i64::MAX, None),
        ];
        for &(micros, expected) in cases {
            assert_eq!(format_micros_fixed_fraction(micros).as_deref(), expected, "{micros}");
        }
    }

    #[test]
    fn what_is_printed_reads_back() {
        for micros in [START_OF_0000, -1, 0, NOV_26_08_00 + 123_456, END_OF_9999] {
            let printed = format_micros_shortest_fraction(micros).unwrap();
            assert_eq!(parse_rfc3339_micros(&printed), Ok(micros), "{printed}");
            assert_eq!(parse_rfc3339_micros(&format_micros(micros)), Ok(micros), "{micros}");
            let fixed = format_micros_fixed_fraction(micros).unwrap();
            assert_eq!(parse_rfc3339_micros(&fixed), Ok(micros), "{fixed}");
        }
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
        let minute_ago = micros_ago(Duration::from_secs(60));
        let after = now_micros();
        assert!(before <= read && read <= after);
        assert!(before - 60_000_000 <= minute_ago && minute_ago <= after - 60_000_000);
        assert_eq!(millis_to_micros(u64::MAX), i64::MAX);
        assert_eq!(millis_to_micros(1_500), 1_500_000);
    }
}
