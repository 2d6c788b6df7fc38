//! Reading RFC 3339 times into epoch microseconds, the one reader behind event times (`ts`) and
//! time settings. It accepts and refuses exactly what the `time` crate's `Rfc3339` parser (0.3)
//! did, with the same results and the same messages, because devices and configs were written
//! against that parser; chrono's own `parse_from_rfc3339` differs (separators, leap seconds,
//! messages), so only its calendar is used here.

use chrono::{Datelike, NaiveDate};

const SECONDS_PER_DAY: i64 = 86_400;

/// Nanoseconds each fraction digit is worth. Digits past the ninth are read but worth nothing:
/// fractions are cut, never rounded.
const NANOS_PER_FRACTION_DIGIT: [u32; 9] =
    [100_000_000, 10_000_000, 1_000_000, 100_000, 10_000, 1_000, 100, 10, 1];

/// Why a text is not an RFC 3339 time. The messages are word for word those of the `time`
/// crate's parser: they reach devices in 400 answers and operators in config errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rfc3339Error {
    /// A `-` or `:` is missing where the layout has one.
    #[error("a character literal was not valid")]
    MissingSeparator,
    /// A part is missing or has other than its digits: `year` (four), `month` (two, not `00`),
    /// `day`, `hour`, `minute`, `second` (two each), `subsecond` (a `.` with no digit after it),
    /// `separator` (the text ends after the date), `offset hour` (no `Z`, `+` or `-`, or an
    /// hour past 23), `offset minute`.
    #[error("the '{0}' component could not be parsed")]
    UnreadablePart(&'static str),
    /// Something follows the offset.
    #[error("unexpected trailing characters; the end of input was expected")]
    TrailingCharacters,
    /// A part is well formed but names no time: `month` past 12, `day` not in its month, `hour`
    /// past 23, `minute` or `offset minute` past 59, `second` past 60, or 60 anywhere but the
    /// last second of a month in UTC.
    #[error("{0} was not in range")]
    PartOutOfRange(&'static str),
}

/// Epoch microseconds of an RFC 3339 time: `YYYY-MM-DD`, any one byte, `hh:mm:ss`, an optional
/// `.` and one or more digits, then `Z`/`z` or `+hh:mm`/`-hh:mm` (hours at most 23).
///
/// - Years are four digits, 0000 to 9999, proleptic Gregorian (0000 is a leap year).
/// - The byte between date and time may be anything, `T`, `t`, a space, even a digit: RFC 3339
///   leaves it to applications and the old parser took whatever was there.
/// - A leap second (`:60`, whatever fraction follows) reads as the last nanosecond before it,
///   and only on the last second of a month in UTC.
/// - The time is counted in nanoseconds (later digits are dropped) and divided by 1000 toward
///   zero, as the old parser's result was: before 1970 a sub-microsecond remainder moves the
///   result to the later microsecond (`1969-12-31T23:59:59.9999995Z` is 0).
///
/// Every accepted time is within about 10^17 microseconds of 1970 and fits an `i64`, so there is
/// no range error; which times are acceptable event times is the caller's to decide.
pub fn parse_rfc3339_micros(text: &str) -> Result<i64, Rfc3339Error> {
    use Rfc3339Error::{PartOutOfRange, TrailingCharacters, UnreadablePart};

    let mut input = text.as_bytes();
    let year = take_digits::<4>(&mut input).ok_or(UnreadablePart("year"))?;
    take_separator(&mut input, b'-')?;
    let month = take_digits::<2>(&mut input).filter(|&month| month != 0).ok_or(UnreadablePart("month"))?;
    take_separator(&mut input, b'-')?;
    let day = take_digits::<2>(&mut input).ok_or(UnreadablePart("day"))?;
    // Whatever byte is next separates date and time; only a text ending here has none.
    input = input.get(1..).ok_or(UnreadablePart("separator"))?;
    let hour = take_digits::<2>(&mut input).ok_or(UnreadablePart("hour"))?;
    take_separator(&mut input, b':')?;
    let minute = take_digits::<2>(&mut input).ok_or(UnreadablePart("minute"))?;
    take_separator(&mut input, b':')?;
    let mut second = take_digits::<2>(&mut input).ok_or(UnreadablePart("second"))?;
    let mut nanosecond: u32 = 0;
    if let Some(after_point) = input.strip_prefix(b".") {
        let num_digits = after_point.iter().take_while(|byte| byte.is_ascii_digit()).count();
        if num_digits == 0 {
            return Err(UnreadablePart("subsecond"));
        }
        let (fraction, rest) = after_point.split_at(num_digits);
        nanosecond = fraction
            .iter()
            .zip(NANOS_PER_FRACTION_DIGIT)
            .map(|(&digit, nanos_per_digit)| u32::from(digit - b'0') * nanos_per_digit)
            .sum();
        input = rest;
    }
    // The offset's own range error comes before the check for trailing characters, as it did.
    let offset_seconds = take_offset_seconds(&mut input)?;
    if !input.is_empty() {
        return Err(TrailingCharacters);
    }

    // The fields are checked in the old parser's order (date, then time, then the leap second),
    // so that a text with several faults is refused with the same reason.
    let is_leap_second = second == 60;
    if is_leap_second {
        second = 59;
        nanosecond = 999_999_999;
    }
    if month > 12 {
        return Err(PartOutOfRange("month"));
    }
    // Four digits keep the year within 0000 to 9999, all of which chrono represents, so `None`
    // means the day is not in the month. The cast cannot wrap: the year is at most 9999.
    let date = NaiveDate::from_ymd_opt(year as i32, month, day).ok_or(PartOutOfRange("day"))?;
    if hour > 23 {
        return Err(PartOutOfRange("hour"));
    }
    if minute > 59 {
        return Err(PartOutOfRange("minute"));
    }
    if second > 59 {
        return Err(PartOutOfRange("second"));
    }
    // At most 9999-12-31 plus a day: about 2.5 * 10^11 seconds, 2.5 * 10^17 microseconds, so
    // none of this arithmetic can overflow an i64.
    let local_seconds =
        i64::from(date.to_epoch_days()) * SECONDS_PER_DAY + i64::from(hour * 3_600 + minute * 60 + second);
    let unix_seconds = local_seconds - offset_seconds;
    if is_leap_second && !is_last_second_of_a_month(unix_seconds) {
        return Err(PartOutOfRange("second"));
    }
    // Toward zero: down after 1970, up before it.
    let micros_of_second = if unix_seconds < 0 { nanosecond.div_ceil(1_000) } else { nanosecond / 1_000 };
    Ok(unix_seconds * 1_000_000 + i64::from(micros_of_second))
}

/// Takes exactly `N` ASCII digits off the front of `input`; `None` when fewer are there.
fn take_digits<const N: usize>(input: &mut &[u8]) -> Option<u32> {
    // A copy of the slice, so that the parts taken borrow the text and not `input`.
    let bytes = *input;
    let (digits, rest) = bytes.split_first_chunk::<N>()?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    *input = rest;
    Some(digits.iter().fold(0, |value, &digit| value * 10 + u32::from(digit - b'0')))
}

/// Takes `separator` off the front of `input`.
fn take_separator(input: &mut &[u8], separator: u8) -> Result<(), Rfc3339Error> {
    let bytes = *input;
    match bytes.split_first() {
        Some((&first, rest)) if first == separator => {
            *input = rest;
            Ok(())
        }
        _ => Err(Rfc3339Error::MissingSeparator),
    }
}

/// Takes the offset off the front of `input`: seconds east of UTC.
fn take_offset_seconds(input: &mut &[u8]) -> Result<i64, Rfc3339Error> {
    use Rfc3339Error::{PartOutOfRange, UnreadablePart};

    let bytes = *input;
    let (is_negative, after_sign) = match bytes.split_first() {
        Some((b'Z' | b'z', rest)) => {
            *input = rest;
            return Ok(0);
        }
        Some((b'+', rest)) => (false, rest),
        Some((b'-', rest)) => (true, rest),
        _ => return Err(UnreadablePart("offset hour")),
    };
    *input = after_sign;
    let hours = take_digits::<2>(input).filter(|&hours| hours <= 23).ok_or(UnreadablePart("offset hour"))?;
    take_separator(input, b':')?;
    let minutes = take_digits::<2>(input).ok_or(UnreadablePart("offset minute"))?;
    if minutes > 59 {
        return Err(PartOutOfRange("offset minute"));
    }
    let magnitude = i64::from(hours * 3_600 + minutes * 60);
    Ok(if is_negative { -magnitude } else { magnitude })
}

/// Whether the second starting at `unix_seconds` is the last of a month in UTC, the only place
/// a leap second is inserted.
fn is_last_second_of_a_month(unix_seconds: i64) -> bool {
    let next_day = unix_seconds.div_euclid(SECONDS_PER_DAY) + 1;
    unix_seconds.rem_euclid(SECONDS_PER_DAY) == SECONDS_PER_DAY - 1
        && i32::try_from(next_day)
            .ok()
            .and_then(NaiveDate::from_epoch_days)
            .is_some_and(|date| date.day() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-26T08:00:00Z.
    const NOV_26_08_00: i64 = 1_795_680_000_000_000;
    /// 0000-01-01T00:00:00Z, the first time a four-digit year can write.
    const START_OF_0000: i64 = -62_167_219_200_000_000;
    /// 9999-12-31T23:59:59.999999Z, the last microsecond a four-digit year can write.
    const END_OF_9999: i64 = 253_402_300_800_000_000 - 1;

    #[test]
    fn accepted_times_give_these_microseconds() {
        let cases: &[(&str, i64)] = &[
            ("2026-11-26T08:00:00Z", NOV_26_08_00),
            ("2026-11-26T08:00:00.123456Z", NOV_26_08_00 + 123_456),
            ("2026-11-26T08:00:00.5Z", NOV_26_08_00 + 500_000),
            // Digits past the microsecond are cut, not rounded.
            ("2026-11-26T08:00:00.1234569Z", NOV_26_08_00 + 123_456),
            ("2026-11-26T08:00:00.999999999999Z", NOV_26_08_00 + 999_999),
            ("2026-11-26T08:00:00.000000999Z", NOV_26_08_00),
            // Any one byte separates date and time; `Z` in either case.
            ("2026-11-26t08:00:00z", NOV_26_08_00),
            ("2026-11-26 08:00:00Z", NOV_26_08_00),
            ("2026-11-26x08:00:00Z", NOV_26_08_00),
            ("2026-11-26008:00:00Z", NOV_26_08_00),
            // Offsets east are subtracted, west added; up to 23:59 either way.
            ("2026-11-26T09:00:00+01:00", NOV_26_08_00),
            ("2026-11-26T08:00:00+14:00", NOV_26_08_00 - 14 * 3_600_000_000),
            ("2026-11-26T08:00:00+23:59", NOV_26_08_00 - 86_340_000_000),
            ("2026-11-26T08:00:00-23:59", NOV_26_08_00 + 86_340_000_000),
            ("2026-11-26T08:00:00-00:00", NOV_26_08_00),
            ("2026-11-26T08:00:00-00:30", NOV_26_08_00 + 1_800_000_000),
            // Around the epoch the nanoseconds are divided toward zero: up before 1970.
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:00.000000999Z", 0),
            ("1969-12-31T23:59:59.999999Z", -1),
            ("1969-12-31T23:59:59.9999995Z", 0),
            ("1969-12-31T23:59:59.000000001Z", -999_999),
            // The ends of four-digit years, and beyond them in UTC through the offset.
            ("0000-01-01T00:00:00Z", START_OF_0000),
            ("0000-01-01T00:00:00+23:59", START_OF_0000 - 86_340_000_000),
            ("9999-12-31T23:59:59.999999Z", END_OF_9999),
            ("9999-12-31T23:59:59.999999999Z", END_OF_9999),
            ("9999-12-31T23:59:59-23:59", END_OF_9999 - 999_999 + 86_340_000_000),
            // Year 0000 is a leap year, 2000 too (divisible by 400).
            ("0000-02-29T00:00:00Z", START_OF_0000 + 59 * 86_400_000_000),
            ("2000-02-29T00:00:00Z", 951_782_400_000_000),
            // A leap second is the last nanosecond of the month's last second in UTC, whatever
            // fraction it has, in any month, and wherever the offset puts it locally.
            ("2016-12-31T23:59:60Z", 1_483_228_800_000_000 - 1),
            ("2016-12-31T23:59:60.5Z", 1_483_228_800_000_000 - 1),
            ("2026-11-30T23:59:60Z", 1_796_083_200_000_000 - 1),
            ("2026-06-30T19:59:60-04:00", 1_782_864_000_000_000 - 1),
            ("9999-12-31T23:59:60Z", END_OF_9999),
            ("9999-12-31T00:00:60-23:59", END_OF_9999),
            // Before 1970 the stand-in nanosecond rounds toward zero to the next second.
            ("1969-12-31T23:59:60Z", 0),
            ("0000-01-01T00:59:60+01:00", START_OF_0000),
        ];
        for &(text, expected) in cases {
            assert_eq!(parse_rfc3339_micros(text), Ok(expected), "{text}");
        }
        let many_digits = format!("2026-11-26T08:00:00.{}Z", "9".repeat(10_000));
        assert_eq!(parse_rfc3339_micros(&many_digits), Ok(NOV_26_08_00 + 999_999));
    }

    #[test]
    fn refused_times_give_these_reasons() {
        let literal = "a character literal was not valid";
        let trailing = "unexpected trailing characters; the end of input was expected";
        let cases: &[(&str, &str)] = &[
            ("", "the 'year' component could not be parsed"),
            ("noon", "the 'year' component could not be parsed"),
            (" 2026-11-26T08:00:00Z", "the 'year' component could not be parsed"),
            ("+10000-01-01T00:00:00Z", "the 'year' component could not be parsed"),
            ("-0001-01-01T00:00:00Z", "the 'year' component could not be parsed"),
            ("26-11-26T08:00:00Z", "the 'year' component could not be parsed"),
            ("\u{ff12}\u{ff10}\u{ff12}\u{ff16}-11-26T08:00:00Z", "the 'year' component could not be parsed"),
            ("10000-01-01T00:00:00Z", literal),
            ("2026/11/26T08:00:00Z", literal),
            ("2026-00-26T08:00:00Z", "the 'month' component could not be parsed"),
            ("2026-1-26T08:00:00Z", "the 'month' component could not be parsed"),
            ("2026-13-01T00:00:00Z", "month was not in range"),
            ("2026-11-00T08:00:00Z", "day was not in range"),
            ("2026-11-31T08:00:00Z", "day was not in range"),
            ("2026-02-29T08:00:00Z", "day was not in range"),
            ("1900-02-29T08:00:00Z", "day was not in range"),
            ("2026-11-26", "the 'separator' component could not be parsed"),
            ("2026-11-26T", "the 'hour' component could not be parsed"),
            ("2026-11-26T8:00:00Z", "the 'hour' component could not be parsed"),
            // A two-byte character: its first byte is the separator, its second no digit.
            ("2026-11-26\u{e9}08:00:00Z", "the 'hour' component could not be parsed"),
            ("2026-11-26T08:00Z", literal),
            ("2026-11-26T08:00:0Z", "the 'second' component could not be parsed"),
            ("2026-11-26T24:00:00Z", "hour was not in range"),
            ("2026-11-26T08:60:00Z", "minute was not in range"),
            ("2026-11-26T08:00:61Z", "second was not in range"),
            // Leap seconds only at the end of a month in UTC.
            ("2026-11-26T08:00:60Z", "second was not in range"),
            ("2026-12-31T23:59:60+01:00", "second was not in range"),
            ("2026-11-26T08:00:00", "the 'offset hour' component could not be parsed"),
            ("2026-11-26T08:00:00.Z", "the 'subsecond' component could not be parsed"),
            ("2026-11-26T08:00:00,5Z", "the 'offset hour' component could not be parsed"),
            ("2026-11-26T08:00:00 Z", "the 'offset hour' component could not be parsed"),
            ("2026-11-26T08:00:00UTC", "the 'offset hour' component could not be parsed"),
            ("2026-11-26T08:00:00+24:00", "the 'offset hour' component could not be parsed"),
            ("2026-11-26T08:00:00+1:00", "the 'offset hour' component could not be parsed"),
            ("2026-11-26T08:00:00+0100", literal),
            ("2026-11-26T08:00:00+01", literal),
            ("2026-11-26T08:00:00+01:0", "the 'offset minute' component could not be parsed"),
            ("2026-11-26T08:00:00+01:60", "offset minute was not in range"),
            ("2026-11-26T08:00:00Z ", trailing),
            ("2026-11-26T08:00:00ZZ", trailing),
            ("2026-11-26T08:00:00+01:00:00", trailing),
            // With several faults, the first in the old parser's order is named: the offset's
            // range, then what follows it, then the date, the time, the leap second.
            ("2026-11-26T08:00:00+01:60x", "offset minute was not in range"),
            ("2026-13-01T08:00:00Zx", trailing),
            ("2026-13-01T25:00:00Z", "month was not in range"),
            ("2026-02-30T23:59:60Z", "day was not in range"),
            ("2026-11-30T24:59:60Z", "hour was not in range"),
        ];
        for &(text, reason) in cases {
            let refused = parse_rfc3339_micros(text);
            assert_eq!(refused.map_err(|error| error.to_string()), Err(reason.to_string()), "{text:?}");
        }
    }
}
