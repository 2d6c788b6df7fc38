//! Cron expressions for job schedules: five fields (minute, hour, day of month, month, day of
//! week) of numbers, `*`, ranges `a-b`, steps `*/n` and `a-b/n`, and lists `a,b`. Day of week 0
//! or 7 is Sunday; when both day fields are restricted, either one matching is enough (as in
//! Vixie cron).

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    day_of_month_restricted: bool,
    day_of_week_restricted: bool,
}

/// How far ahead a match is looked for: beyond it the expression is taken to never fire.
const SEARCH_DAYS: i64 = 366 * 5;

impl Cron {
    pub fn parse(expression: &str) -> Result<Self, String> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields[..] else {
            return Err(format!("'{expression}' has {} fields; cron needs 5", fields.len()));
        };
        let mut days_of_week = parse_field(day_of_week, 0, 7, "day of week")?;
        // 7 is Sunday too.
        if days_of_week & (1 << 7) != 0 {
            days_of_week |= 1;
        }
        Ok(Self {
            minutes: parse_field(minute, 0, 59, "minute")?,
            hours: parse_field(hour, 0, 23, "hour")?,
            days_of_month: parse_field(day_of_month, 1, 31, "day of month")?,
            months: parse_field(month, 1, 12, "month")?,
            days_of_week,
            day_of_month_restricted: day_of_month != "*",
            day_of_week_restricted: day_of_week != "*",
        })
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let by_month = self.days_of_month & (1 << date.day()) != 0;
        let by_week = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        match (self.day_of_month_restricted, self.day_of_week_restricted) {
            (true, true) => by_month || by_week,
            (true, false) => by_month,
            (false, true) => by_week,
            (false, false) => true,
        }
    }

    /// The first firing at or after `from`, in the wall-clock time of `tz`.
    pub fn next_at_or_after<Tz: TimeZone>(
        &self,
        from: &chrono::DateTime<Tz>,
    ) -> Option<chrono::DateTime<Tz>> {
        let tz = from.timezone();
        let local = from.naive_local();
        // Round up to a whole minute.
        let mut at = local.with_second(0)?.with_nanosecond(0)?;
        if at < local {
            at += Duration::minutes(1);
        }
        let limit = at + Duration::days(SEARCH_DAYS);
        while at < limit {
            if self.months & (1 << at.month()) == 0 || !self.day_matches(at.date()) {
                at = next_day(at)?;
            } else if self.hours & (1 << at.hour()) == 0 {
                at = at.with_minute(0)? + Duration::hours(1);
            } else if self.minutes & (1 << at.minute()) == 0 {
                at += Duration::minutes(1);
            } else {
                // A wall-clock time skipped by a daylight-saving change does not fire.
                if let Some(time) = tz.from_local_datetime(&at).earliest()
                    && time >= *from
                {
                    return Some(time);
                }
                at += Duration::minutes(1);
            }
        }
        None
    }
}

fn next_day(at: NaiveDateTime) -> Option<NaiveDateTime> {
    at.date().succ_opt()?.and_hms_opt(0, 0, 0)
}

fn parse_field(field: &str, min: u32, max: u32, name: &str) -> Result<u64, String> {
    let invalid =
        || format!("{name} '{field}' is not valid (numbers {min}-{max}, *, a-b, */n, a-b/n, lists)");
    let mut bits = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                (range, step.parse::<u32>().ok().filter(|step| *step > 0).ok_or_else(invalid)?)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((low, high)) = range.split_once('-') {
            (low.parse().map_err(|_| invalid())?, high.parse().map_err(|_| invalid())?)
        } else {
            let value: u32 = range.parse().map_err(|_| invalid())?;
            // `5/15` means from 5 to the end, every 15.
            (value, if part.contains('/') { max } else { value })
        };
        if low < min || high > max || low > high {
            return Err(invalid());
        }
        for value in (low..=high).step_by(step as usize) {
            bits |= 1 << value;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use chrono::Utc;

    use super::*;

    fn at(text: &str) -> chrono::DateTime<Utc> {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn next_firings() {
        let hourly = Cron::parse("5 * * * *").unwrap();
        assert_eq!(hourly.next_at_or_after(&at("2026-11-26T08:00:00Z")), Some(at("2026-11-26T08:05:00Z")));
        assert_eq!(hourly.next_at_or_after(&at("2026-11-26T08:05:00Z")), Some(at("2026-11-26T08:05:00Z")));
        assert_eq!(hourly.next_at_or_after(&at("2026-11-26T08:05:01Z")), Some(at("2026-11-26T09:05:00Z")));
        let weekdays = Cron::parse("30 6 * * 1-5").unwrap();
        // 2026-11-28 is a Saturday: the next weekday 06:30 is Monday the 30th.
        assert_eq!(weekdays.next_at_or_after(&at("2026-11-27T07:00:00Z")), Some(at("2026-11-30T06:30:00Z")));
        let quarter = Cron::parse("*/15 0 1 1,7 *").unwrap();
        assert_eq!(quarter.next_at_or_after(&at("2026-11-26T08:00:00Z")), Some(at("2027-01-01T00:00:00Z")));
        let sunday = Cron::parse("0 0 * * 7").unwrap();
        assert_eq!(sunday.next_at_or_after(&at("2026-11-26T00:00:00Z")), Some(at("2026-11-29T00:00:00Z")));
        // In Berlin (UTC+1 in winter), 09:00 local is 08:00 UTC.
        let berlin = Cron::parse("0 9 * * *").unwrap();
        let from = at("2026-11-26T07:00:00Z").with_timezone(&chrono_tz::Europe::Berlin);
        assert_eq!(berlin.next_at_or_after(&from).unwrap().with_timezone(&Utc), at("2026-11-26T08:00:00Z"));
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_at_or_after(&at("2026-11-26T00:00:00Z")), None);
    }

    #[test]
    fn bad_fields_are_named() {
        for (expression, expected) in [
            ("61 * * * *", "minute '61'"),
            ("* * * *", "4 fields"),
            ("* 25 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("*/0 * * * *", "minute"),
            ("* * * * mon", "day of week"),
        ] {
            let error = Cron::parse(expression).unwrap_err();
            assert!(error.contains(expected), "{expression}: {error}");
        }
    }
}
