//! Event-time partitions: `dt=YYYY-MM-DD/hour=HH` (hourly) or `dt=YYYY-MM-DD` (daily), in UTC.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionGranularity {
    Hour,
    Day,
}

/// The partition column of every stream table: the UTC date, `YYYY-MM-DD`.
pub const DATE_PARTITION_COLUMN: &str = "dt";
/// The second partition column of hourly stream tables: the UTC hour, `HH`.
pub const HOUR_PARTITION_COLUMN: &str = "hour";

impl PartitionGranularity {
    /// The table's partition columns, outermost first.
    pub fn partition_columns(self) -> &'static [&'static str] {
        match self {
            Self::Hour => &[DATE_PARTITION_COLUMN, HOUR_PARTITION_COLUMN],
            Self::Day => &[DATE_PARTITION_COLUMN],
        }
    }

    /// The granularity a partition segment (`dt=…/hour=…` or `dt=…`) was written with.
    pub fn of_segment(segment: &str) -> Self {
        let has_hour = segment
            .split('/')
            .any(|part| part.split_once('=').is_some_and(|(column, _)| column == HOUR_PARTITION_COLUMN));
        if has_hour { Self::Hour } else { Self::Day }
    }
}

/// The event-time partition of a row: a UTC day and, for hourly streams, an hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// Days since 1970-01-01.
    pub epoch_day: i64,
    /// Hour of the day, 0-23; `None` for daily partitions.
    pub hour_opt: Option<u8>,
}

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// First microsecond a lake partition can hold: 0000-01-01T00:00:00Z. Partition names are
/// `dt=YYYY-MM-DD`, and only four-digit years sort and parse as dates everywhere (Hive, DataFusion,
/// Spark, DuckDB).
pub const MIN_EVENT_TIME_MICROS: i64 = -62_167_219_200_000_000;
/// Last microsecond a lake partition can hold: 9999-12-31T23:59:59.999999Z.
pub const MAX_EVENT_TIME_MICROS: i64 = 253_402_300_800_000_000 - 1;

/// An event time no lake partition can hold (see [`MIN_EVENT_TIME_MICROS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "event time {event_time_micros} (microseconds since 1970-01-01) is outside 0000-01-01T00:00:00Z to \
     9999-12-31T23:59:59.999999Z, the times a lake partition (dt=YYYY-MM-DD) can hold"
)]
pub struct EventTimeOutOfRange {
    pub event_time_micros: i64,
}

impl PartitionKey {
    /// The partition a row with this event time is written to; refuses times outside
    /// [`MIN_EVENT_TIME_MICROS`]..=[`MAX_EVENT_TIME_MICROS`], whose dates have no four-digit year.
    pub fn try_for_event_time(
        event_time_micros: i64,
        granularity: PartitionGranularity,
    ) -> Result<Self, EventTimeOutOfRange> {
        if !(MIN_EVENT_TIME_MICROS..=MAX_EVENT_TIME_MICROS).contains(&event_time_micros) {
            return Err(EventTimeOutOfRange { event_time_micros });
        }
        Ok(Self::for_event_time(event_time_micros, granularity))
    }

    /// The partition that contains this instant, for any `i64`: window arithmetic may ask about
    /// times no row can have. Outside the range a lake partition can hold, the key names no
    /// partition in the lake (its date has a sign, see [`Self::date_string`]).
    pub fn for_event_time(event_time_micros: i64, granularity: PartitionGranularity) -> Self {
        // Euclidean division by a positive constant cannot overflow, even for i64::MIN.
        let epoch_day = event_time_micros.div_euclid(MICROS_PER_DAY);
        let hour_opt = match granularity {
            PartitionGranularity::Hour => {
                Some((event_time_micros.rem_euclid(MICROS_PER_DAY) / MICROS_PER_HOUR) as u8)
            }
            PartitionGranularity::Day => None,
        };
        Self { epoch_day, hour_opt }
    }

    /// First microsecond of the partition. The partitions at the ends of `i64` start or end
    /// outside it: their bounds saturate at `i64::MIN` and `i64::MAX`, which keeps loops that
    /// step from partition to partition finite.
    pub fn start_micros(&self) -> i64 {
        let hour_micros = i64::from(self.hour_opt.unwrap_or(0)) * MICROS_PER_HOUR;
        self.epoch_day
            .checked_mul(MICROS_PER_DAY)
            .and_then(|day_start| day_start.checked_add(hour_micros))
            .unwrap_or(if self.epoch_day < 0 { i64::MIN } else { i64::MAX })
    }

    /// First microsecond after the partition (saturating like [`Self::start_micros`]).
    pub fn end_micros(&self) -> i64 {
        let length = if self.hour_opt.is_some() { MICROS_PER_HOUR } else { MICROS_PER_DAY };
        self.start_micros().saturating_add(length)
    }

    /// `YYYY-MM-DD` for years 0000 to 9999. Keys outside them (only window arithmetic makes
    /// those) render with a signed year, `+10000-01-01` or `-0001-12-31`, which no partition in
    /// the lake is named after.
    pub fn date_string(&self) -> String {
        match civil_from_epoch_day(self.epoch_day) {
            Some((year @ 0..=9999, month, day)) => format!("{year:04}-{month:02}-{day:02}"),
            Some((year, month, day)) => format!("{year:+05}-{month:02}-{day:02}"),
            None => format!("epoch-day-{}", self.epoch_day),
        }
    }
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01, for any day
/// count derived from an `i64` of microseconds and far beyond (Howard Hinnant's
/// `civil_from_days`); `None` only where the day count itself is near the ends of `i64`.
fn civil_from_epoch_day(epoch_day: i64) -> Option<(i64, u8, u8)> {
    const DAYS_PER_ERA: i64 = 146_097;
    // Days since 0000-03-01, the start of a 400-year era.
    let shifted = epoch_day.checked_add(719_468)?;
    let era = shifted.div_euclid(DAYS_PER_ERA);
    let day_of_era = shifted.rem_euclid(DAYS_PER_ERA);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = era.checked_mul(400)?.checked_add(year_of_era)?.checked_add(i64::from(month <= 2))?;
    Some((year, u8::try_from(month).ok()?, u8::try_from(day).ok()?))
}

impl fmt::Display for PartitionKey {
    /// The Hive path segment: `dt=2026-11-26/hour=08` or `dt=2026-11-26`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hour_opt {
            Some(hour) => {
                write!(f, "{DATE_PARTITION_COLUMN}={}/{HOUR_PARTITION_COLUMN}={hour:02}", self.date_string())
            }
            None => write!(f, "{DATE_PARTITION_COLUMN}={}", self.date_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Datelike;

    use super::*;

    #[test]
    fn a_segment_names_its_granularity_and_the_columns_follow() {
        assert_eq!(PartitionGranularity::of_segment("dt=2026-11-26/hour=08"), PartitionGranularity::Hour);
        assert_eq!(PartitionGranularity::of_segment("dt=2026-11-26"), PartitionGranularity::Day);
        // A value that happens to contain the column's name is not the column.
        assert_eq!(PartitionGranularity::of_segment("dt=hour=1"), PartitionGranularity::Day);
        assert_eq!(PartitionGranularity::Hour.partition_columns(), ["dt", "hour"]);
        assert_eq!(PartitionGranularity::Day.partition_columns(), ["dt"]);
        let key = PartitionKey::for_event_time(0, PartitionGranularity::Hour);
        assert_eq!(PartitionGranularity::of_segment(&key.to_string()), PartitionGranularity::Hour);
    }

    const NOV_26_08_00: i64 = 1_795_680_000_000_000;

    #[test]
    fn hourly_and_daily_keys_render_hive_segments() {
        let key = PartitionKey::for_event_time(NOV_26_08_00 + 59 * 60_000_000, PartitionGranularity::Hour);
        assert_eq!(key.to_string(), "dt=2026-11-26/hour=08");
        assert_eq!(key.start_micros(), NOV_26_08_00);
        assert_eq!(key.end_micros(), NOV_26_08_00 + MICROS_PER_HOUR);
        let day = PartitionKey::for_event_time(NOV_26_08_00, PartitionGranularity::Day);
        assert_eq!(day.to_string(), "dt=2026-11-26");
        assert_eq!(day.end_micros() - day.start_micros(), MICROS_PER_DAY);
    }

    #[test]
    fn boundaries_and_pre_epoch_times_fall_in_the_right_partition() {
        assert_eq!(
            PartitionKey::for_event_time(0, PartitionGranularity::Hour).to_string(),
            "dt=1970-01-01/hour=00"
        );
        assert_eq!(
            PartitionKey::for_event_time(-1, PartitionGranularity::Hour).to_string(),
            "dt=1969-12-31/hour=23"
        );
        let last_micro = PartitionKey::for_event_time(NOV_26_08_00 - 1, PartitionGranularity::Hour);
        assert_eq!(last_micro.to_string(), "dt=2026-11-26/hour=07");
        assert!(last_micro < PartitionKey::for_event_time(NOV_26_08_00, PartitionGranularity::Hour));
    }

    #[test]
    fn the_ends_of_the_partitionable_range_are_years_0000_and_9999() {
        let first =
            PartitionKey::try_for_event_time(MIN_EVENT_TIME_MICROS, PartitionGranularity::Hour).unwrap();
        assert_eq!(first.to_string(), "dt=0000-01-01/hour=00");
        assert_eq!(first.start_micros(), MIN_EVENT_TIME_MICROS);
        let last =
            PartitionKey::try_for_event_time(MAX_EVENT_TIME_MICROS, PartitionGranularity::Hour).unwrap();
        assert_eq!(last.to_string(), "dt=9999-12-31/hour=23");
        assert_eq!(last.end_micros(), MAX_EVENT_TIME_MICROS + 1);
        let day = PartitionKey::try_for_event_time(MAX_EVENT_TIME_MICROS, PartitionGranularity::Day).unwrap();
        assert_eq!(day.to_string(), "dt=9999-12-31");
        // Leap days, centuries and the epoch, checked against chrono.
        for epoch_day in [-719_528, -1, 0, 11_016, 11_017, 10_956, 19_782, 2_932_896] {
            let date = chrono::NaiveDate::from_epoch_days(epoch_day as i32).unwrap();
            let key = PartitionKey { epoch_day, hour_opt: None };
            assert_eq!(
                key.date_string(),
                format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day())
            );
        }
    }

    #[test]
    fn times_outside_the_range_are_refused_and_never_panic() {
        for (event_time, expected) in [
            (i64::MIN, "dt=-290308-12-21/hour=19"),
            (i64::MIN + 1, "dt=-290308-12-21/hour=19"),
            (MIN_EVENT_TIME_MICROS - 1, "dt=-0001-12-31/hour=23"),
            (MAX_EVENT_TIME_MICROS + 1, "dt=+10000-01-01/hour=00"),
            (i64::MAX, "dt=+294247-01-10/hour=04"),
        ] {
            let refused = PartitionKey::try_for_event_time(event_time, PartitionGranularity::Hour);
            assert_eq!(refused, Err(EventTimeOutOfRange { event_time_micros: event_time }));
            assert!(refused.unwrap_err().to_string().contains("0000-01-01T00:00:00Z to 9999-12-31"));
            // Window arithmetic still gets a key; it names no lake partition.
            let key = PartitionKey::for_event_time(event_time, PartitionGranularity::Hour);
            assert_eq!(key.to_string(), expected);
            assert!(key.start_micros() <= event_time && event_time <= key.end_micros());
        }
        // The partitions at the ends of i64 saturate instead of overflowing.
        let lowest = PartitionKey::for_event_time(i64::MIN, PartitionGranularity::Day);
        assert_eq!(lowest.start_micros(), i64::MIN);
        let highest = PartitionKey::for_event_time(i64::MAX, PartitionGranularity::Hour);
        assert_eq!(highest.end_micros(), i64::MAX);
        let absurd = PartitionKey { epoch_day: i64::MAX, hour_opt: Some(23) };
        assert_eq!(absurd.start_micros(), i64::MAX);
        assert_eq!(absurd.date_string(), format!("epoch-day-{}", i64::MAX));
        let absurd_low = PartitionKey { epoch_day: i64::MIN, hour_opt: None };
        assert_eq!(
            (absurd_low.start_micros(), absurd_low.end_micros()),
            (i64::MIN, i64::MIN + MICROS_PER_DAY)
        );
    }
}
