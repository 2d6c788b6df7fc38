//! Job definitions: one SQL file whose leading `-- key: value` comments are its settings.
//! docs/jobs.md is the user's reference for the syntax.

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::cron::Cron;

/// Placeholders a job's SQL may use; they are bound to the window's bounds (UTC timestamps).
pub const WINDOW_START_PLACEHOLDER: &str = "window_start";
pub const WINDOW_END_PLACEHOLDER: &str = "window_end";

const MICROS_PER_SECOND: i64 = 1_000_000;
/// A window shorter than this would schedule more runs than one executor can keep up with.
const MIN_WINDOW_MICROS: i64 = MICROS_PER_SECOND;
const MAX_NAME_LEN: usize = 100;
/// Ten years: longer windows or lateness are typos, and with starts in years 1970-9999 every sum
/// of a window start, a window and a lateness stays far inside an i64.
const MAX_WINDOW_MICROS: i64 = 3_660 * 86_400 * MICROS_PER_SECOND;
/// 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z: starts outside are typos or overflows.
const MIN_START_MICROS: i64 = 0;
const MAX_START_MICROS: i64 = 253_402_300_799 * MICROS_PER_SECOND;

/// A parsed job: its settings and the SQL body.
#[derive(Debug, Clone, Serialize)]
pub struct JobDefinition {
    pub name: String,
    /// When windows start to run, besides being complete; none means as soon as complete.
    pub schedule_opt: Option<Schedule>,
    /// Length of each event-time window; windows are aligned to multiples of it since the epoch
    /// (UTC), so `1h` windows start on the hour and `1d` windows at midnight UTC.
    pub window_micros: i64,
    /// How far the stream's watermark must be past a window's end before it runs.
    pub lateness_micros: i64,
    /// The first window to run; none means the window in which the job was submitted.
    pub start_micros_opt: Option<i64>,
    /// Re-run a window whose input changed after it ran (late data past the lateness).
    pub restate: bool,
    /// Limit on one attempt; none means the executor's default.
    pub timeout_micros_opt: Option<i64>,
    /// Attempts before a window is marked failed; none means the executor's default.
    pub max_attempts_opt: Option<u32>,
    /// Where the window's plan executes.
    pub engine: Engine,
    /// Free text from `-- description:`.
    pub description: String,
    pub sql: String,
}

/// Where a run's physical plan executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Inside the executor replica that claimed the window.
    #[default]
    Local,
    /// Across the workers of the Ballista cluster in the executor's `[ballista]` config: for
    /// windows bigger than one machine. Planned (and its files chosen) by the replica as usual.
    Ballista,
}

/// A cron expression and the time zone it is read in.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub expression: String,
    pub time_zone: String,
    #[serde(skip)]
    cron: Cron,
    #[serde(skip)]
    tz: chrono_tz::Tz,
}

impl Schedule {
    fn parse(expression: &str, time_zone: &str) -> Result<Self, String> {
        let cron = Cron::parse(expression)
            .map_err(|error| format!("schedule '{expression}' is not a valid cron expression: {error}"))?;
        let tz: chrono_tz::Tz = time_zone.parse().map_err(|_| {
            format!("time_zone '{time_zone}' is not an IANA time zone name (e.g. Europe/Berlin)")
        })?;
        Ok(Self { expression: expression.to_string(), time_zone: time_zone.to_string(), cron, tz })
    }

    /// The first time the schedule fires at or after `micros`, or none if it never does.
    pub fn next_at_or_after(&self, micros: i64) -> Option<i64> {
        let start = Utc.timestamp_micros(micros).single()?.with_timezone(&self.tz);
        let next: DateTime<chrono_tz::Tz> = self.cron.next_at_or_after(&start)?;
        Some(next.with_timezone(&Utc).timestamp_micros())
    }
}

/// Why a job definition was refused; shown to the submitter as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DefinitionError(pub String);

impl JobDefinition {
    /// Parses a job file. `key_opt` is the Kafka key it was submitted under, which must agree
    /// with the `name` header when both are present.
    pub fn parse(text: &str, key_opt: Option<&str>) -> Result<Self, DefinitionError> {
        let fail = |message: String| Err(DefinitionError(message));
        let mut headers: Vec<(String, String, usize)> = Vec::new();
        let mut body_start = text.len();
        let mut offset = 0;
        for (index, line) in text.split_inclusive('\n').enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() {
                offset += line.len();
                continue;
            }
            let Some(comment) = trimmed.strip_prefix("--") else {
                body_start = offset;
                break;
            };
            // Only `key: value` with an identifier key is a setting; other comments are prose.
            if let Some((key, value)) = comment.split_once(':') {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    headers.push((key.to_string(), value.trim().to_string(), index + 1));
                }
            }
            offset += line.len();
        }
        let sql = text[body_start..].trim().trim_end_matches(';').trim().to_string();
        if sql.is_empty() {
            return fail("the job has no SQL after its header".to_string());
        }

        let mut name_opt: Option<String> = None;
        let mut schedule_opt: Option<String> = None;
        let mut time_zone = "UTC".to_string();
        let mut window_opt: Option<i64> = None;
        let mut lateness_micros = 0;
        let mut start_micros_opt = None;
        let mut restate = false;
        let mut timeout_micros_opt = None;
        let mut max_attempts_opt = None;
        let mut engine = Engine::Local;
        let mut description = String::new();
        let mut seen: Vec<&str> = Vec::new();
        for (key, value, line) in &headers {
            if seen.contains(&key.as_str()) {
                return fail(format!("line {line}: '{key}' is given twice"));
            }
            seen.push(key);
            let at = |message: String| DefinitionError(format!("line {line}: {message}"));
            match key.as_str() {
                "name" => name_opt = Some(value.clone()),
                "schedule" => schedule_opt = Some(value.clone()),
                "time_zone" | "timezone" => time_zone = value.clone(),
                "window" => window_opt = Some(parse_duration_micros(value).map_err(at)?),
                "lateness" => lateness_micros = parse_duration_micros(value).map_err(at)?,
                "start" => start_micros_opt = Some(parse_timestamp_micros(value).map_err(at)?),
                "restate" => restate = parse_bool(value).map_err(at)?,
                "timeout" => timeout_micros_opt = Some(parse_duration_micros(value).map_err(at)?),
                "retries" => {
                    let retries: u32 =
                        value.parse().map_err(|_| at(format!("retries '{value}' is not a whole number")))?;
                    max_attempts_opt = Some(retries.saturating_add(1));
                }
                "output" => {
                    if !value.eq_ignore_ascii_case("parquet") {
                        return fail(format!(
                            "line {line}: output '{value}' is not supported; results are written as parquet"
                        ));
                    }
                }
                "engine" => {
                    engine = match value.to_ascii_lowercase().as_str() {
                        "local" => Engine::Local,
                        "ballista" => Engine::Ballista,
                        _ => return fail(format!("line {line}: engine '{value}' is not local or ballista")),
                    }
                }
                "description" => description = value.clone(),
                other => {
                    return fail(format!(
                        "line {line}: unknown setting '{other}'; known: name, schedule, time_zone, window, \
                         lateness, start, restate, timeout, retries, output, engine, description"
                    ));
                }
            }
        }

        let name = match (name_opt, key_opt) {
            (Some(name), Some(key)) if name != key => {
                return fail(format!("the name header '{name}' differs from the Kafka key '{key}'"));
            }
            (Some(name), _) => name,
            (None, Some(key)) => key.to_string(),
            (None, None) => return fail("the job has no '-- name:' header".to_string()),
        };
        validate_name(&name).map_err(DefinitionError)?;
        let Some(window_micros) = window_opt else {
            return fail("the job has no '-- window:' header (for example '-- window: 1h')".to_string());
        };
        if window_micros < MIN_WINDOW_MICROS {
            return fail("window must be at least 1s".to_string());
        }
        if window_micros > MAX_WINDOW_MICROS {
            return fail("window must be at most 3660d (ten years)".to_string());
        }
        if lateness_micros > MAX_WINDOW_MICROS {
            return fail("lateness must be at most 3660d (ten years)".to_string());
        }
        if let Some(start) = start_micros_opt
            && !(MIN_START_MICROS..=MAX_START_MICROS).contains(&start)
        {
            return fail("start must be between 1970-01-01 and 9999-12-31".to_string());
        }
        let schedule_opt = schedule_opt
            .map(|expression| Schedule::parse(&expression, &time_zone))
            .transpose()
            .map_err(DefinitionError)?;
        if let Some(timeout) = timeout_micros_opt
            && timeout <= 0
        {
            return fail("timeout must be greater than 0".to_string());
        }
        Ok(Self {
            name,
            schedule_opt,
            window_micros,
            lateness_micros,
            start_micros_opt,
            restate,
            timeout_micros_opt,
            max_attempts_opt,
            engine,
            description,
            sql,
        })
    }

    /// The window that contains `micros`.
    pub fn window_containing(&self, micros: i64) -> i64 {
        // Saturating: a window at the very bottom of the i64 range is not one that runs.
        micros.div_euclid(self.window_micros).saturating_mul(self.window_micros)
    }
}

/// Job names become Kafka keys, object paths and metric labels.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("job name must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        || name.starts_with('-')
    {
        return Err(format!(
            "job name '{name}' may only hold lowercase letters, digits, '_' and '-' (it names paths and topics)"
        ));
    }
    Ok(())
}

/// `90s`, `10m`, `1h`, `1d`, `1h30m`, `500ms`.
pub fn parse_duration_micros(text: &str) -> Result<i64, String> {
    let invalid = || format!("'{text}' is not a duration like 30s, 10m, 1h, 1d or 1h30m");
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total: i64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        let amount: i64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_micros = match &rest[..unit_len] {
            "ms" => 1_000,
            "s" => MICROS_PER_SECOND,
            "m" => 60 * MICROS_PER_SECOND,
            "h" => 3_600 * MICROS_PER_SECOND,
            "d" => 86_400 * MICROS_PER_SECOND,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total = amount
            .checked_mul(unit_micros)
            .and_then(|micros| total.checked_add(micros))
            .ok_or_else(invalid)?;
    }
    Ok(total)
}

/// RFC 3339 (`2026-11-26T08:00:00Z`) or a date (`2026-11-26`, midnight UTC).
pub fn parse_timestamp_micros(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(timestamp) = DateTime::parse_from_rfc3339(text) {
        return Ok(timestamp.with_timezone(&Utc).timestamp_micros());
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(midnight) = date.and_hms_opt(0, 0, 0)
    {
        return Ok(midnight.and_utc().timestamp_micros());
    }
    Err(format!("'{text}' is not a time like 2026-11-26T08:00:00Z or a date like 2026-11-26"))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" => Ok(true),
        "false" | "no" | "off" => Ok(false),
        _ => Err(format!("'{text}' is not true or false")),
    }
}

pub use sluice_clock::format_micros;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    const HOURLY: &str = "-- name: hourly_device_stats\n\
        -- Readings per device and hour.\n\
        -- schedule: 5 * * * *\n\
        -- window: 1h\n\
        -- lateness: 10m\n\
        -- output: parquet\n\
        SELECT device_id, count(*) AS readings FROM telemetry\n\
        WHERE ts >= $window_start AND ts < $window_end GROUP BY device_id;\n";

    #[test]
    fn parses_the_documented_header() {
        let job = JobDefinition::parse(HOURLY, Some("hourly_device_stats")).unwrap();
        assert_eq!(job.name, "hourly_device_stats");
        assert_eq!(job.window_micros, 3_600_000_000);
        assert_eq!(job.lateness_micros, 600_000_000);
        assert!(job.sql.starts_with("SELECT device_id"));
        assert!(!job.sql.ends_with(';'));
        assert_eq!(job.engine, Engine::Local);
        let distributed = JobDefinition::parse(&format!("-- engine: Ballista\n{HOURLY}"), None).unwrap();
        assert_eq!(distributed.engine, Engine::Ballista);
        let schedule = job.schedule_opt.unwrap();
        // 08:00:00 UTC: the next firing of "5 * * * *" is 08:05.
        let eight = parse_timestamp_micros("2026-11-26T08:00:00Z").unwrap();
        assert_eq!(schedule.next_at_or_after(eight), Some(eight + 300_000_000));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let cases = [
            ("-- window: 1h\nSELECT 1", None, "no '-- name:'"),
            ("-- name: a\n-- window: 1h\nSELECT 1", Some("b"), "differs from the Kafka key"),
            ("-- name: a\nSELECT 1", None, "no '-- window:'"),
            ("-- name: a\n-- window: 1 hour\nSELECT 1", None, "not a duration"),
            ("-- name: a\n-- window: 1h\n-- schedul: 5 * * * *\nSELECT 1", None, "unknown setting 'schedul'"),
            ("-- name: a\n-- window: 1h\n-- schedule: 61 * * * *\nSELECT 1", None, "not a valid cron"),
            ("-- name: a\n-- window: 1h\n-- output: csv\nSELECT 1", None, "output 'csv'"),
            ("-- name: a\n-- window: 1h\n-- engine: spark\nSELECT 1", None, "engine 'spark'"),
            ("-- name: A b\n-- window: 1h\nSELECT 1", None, "lowercase letters"),
            ("-- name: a\n-- window: 1h\n", None, "no SQL"),
            (
                "-- name: a\n-- window: 1h\n-- time_zone: Mars/Base\n-- schedule: 0 * * * *\nSELECT 1",
                None,
                "IANA",
            ),
        ];
        for (text, key, expected) in cases {
            let error = JobDefinition::parse(text, key).unwrap_err();
            assert!(error.0.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn durations_and_windows() {
        assert_eq!(parse_duration_micros("1h30m").unwrap(), 5_400_000_000);
        assert_eq!(parse_duration_micros("500ms").unwrap(), 500_000);
        assert!(parse_duration_micros("h").is_err());
        assert!(parse_duration_micros("99999999999999999d").is_err());
        let job = JobDefinition::parse("-- name: a\n-- window: 1h\nSELECT 1", None).unwrap();
        let t = parse_timestamp_micros("2026-11-26T08:59:59Z").unwrap();
        assert_eq!(format_micros(job.window_containing(t)), "2026-11-26T08:00:00Z");
        assert_eq!(format_micros(parse_timestamp_micros("2026-11-26").unwrap()), "2026-11-26T00:00:00Z");
    }

    #[test]
    fn windows_lateness_and_starts_are_bounded_so_their_sums_cannot_overflow() {
        let parse = |headers: &str| JobDefinition::parse(&format!("-- name: a\n{headers}\nSELECT 1"), None);
        assert!(parse("-- window: 3660d").is_ok());
        assert!(parse("-- window: 3661d").unwrap_err().0.contains("at most 3660d"));
        assert!(parse("-- window: 1h\n-- lateness: 3660d").is_ok());
        assert!(
            parse("-- window: 1h\n-- lateness: 3661d").unwrap_err().0.contains("lateness must be at most")
        );
        assert!(parse("-- window: 1s\n-- start: 1970-01-01").is_ok());
        assert!(parse("-- window: 3660d\n-- start: 9999-12-31T23:59:59Z").is_ok());
        for start in ["1969-12-31T23:59:59Z", "0000-01-01"] {
            let error = parse(&format!("-- window: 1h\n-- start: {start}")).unwrap_err();
            assert!(error.0.contains("between 1970-01-01 and 9999-12-31"), "{start}: {error}");
        }
        let job = parse("-- window: 3660d").unwrap();
        assert!(job.window_containing(i64::MIN) <= i64::MIN / 2);
        assert!(job.window_containing(i64::MAX) > 0);
    }
}
