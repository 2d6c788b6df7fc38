//! Event-time partitions: `dt=YYYY-MM-DD/hour=HH` (hourly) or `dt=YYYY-MM-DD` (daily), in UTC.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionGranularity {
    Hour,
    Day,
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

impl PartitionKey {
    pub fn for_event_time(event_time_micros: i64, granularity: PartitionGranularity) -> Self {
        let epoch_day = event_time_micros.div_euclid(MICROS_PER_DAY);
        let hour_opt = match granularity {
            PartitionGranularity::Hour => {
                Some((event_time_micros.rem_euclid(MICROS_PER_DAY) / MICROS_PER_HOUR) as u8)
            }
            PartitionGranularity::Day => None,
        };
        Self { epoch_day, hour_opt }
    }

    /// First microsecond of the partition.
    pub fn start_micros(&self) -> i64 {
        self.epoch_day * MICROS_PER_DAY + i64::from(self.hour_opt.unwrap_or(0)) * MICROS_PER_HOUR
    }

    /// First microsecond after the partition.
    pub fn end_micros(&self) -> i64 {
        self.start_micros() + if self.hour_opt.is_some() { MICROS_PER_HOUR } else { MICROS_PER_DAY }
    }

    /// `YYYY-MM-DD`.
    pub fn date_string(&self) -> String {
        let date =
            time::Date::from_julian_day((self.epoch_day + 2_440_588) as i32).unwrap_or(time::Date::MIN);
        format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
    }
}

impl fmt::Display for PartitionKey {
    /// The Hive path segment: `dt=2026-11-26/hour=08` or `dt=2026-11-26`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hour_opt {
            Some(hour) => write!(f, "dt={}/hour={hour:02}", self.date_string()),
            None => write!(f, "dt={}", self.date_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
