//! How much catching up a job may ask for, and which windows the scheduler looks at: pure
//! arithmetic on window bounds, so that a job with `-- window: 1s` and `-- start: 1970-01-01`
//! is refused by counting, never by enumerating its windows.

use crate::job::{JobDefinition, format_micros};
use crate::records::BackfillRequest;

/// Windows of `window_micros` whose start lies in `[first, end)`; 0 when the range is empty.
pub fn window_count(first_micros: i64, end_micros: i64, window_micros: i64) -> u64 {
    if end_micros <= first_micros || window_micros <= 0 {
        return 0;
    }
    // i128: the span of two i64 times does not fit an i64.
    let span = i128::from(end_micros) - i128::from(first_micros);
    let count = (span + i128::from(window_micros) - 1) / i128::from(window_micros);
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// Why a job with `num_pending` windows to run before now is refused, if it is.
pub fn backlog_refusal(
    definition: &JobDefinition,
    first_window_micros: i64,
    num_pending: u64,
    now_micros: i64,
    max_backlog_windows: u64,
) -> Option<String> {
    if num_pending <= max_backlog_windows {
        return None;
    }
    let window = definition.window_micros;
    let max_span = i64::try_from(max_backlog_windows).unwrap_or(i64::MAX).saturating_mul(window);
    let earliest = definition.window_containing(now_micros.saturating_sub(max_span));
    Some(format!(
        "start {} with window {} leaves {num_pending} windows to run before now; at most \
         {max_backlog_windows} are accepted (executor.max_backlog_windows): start at {} or later, \
         or use a longer window",
        format_micros(first_window_micros),
        format_window(window),
        format_micros(earliest.saturating_add(window)),
    ))
}

/// Windows a job may have left to run when it is accepted, unless configured otherwise
/// (`executor.max_backlog_windows`): a `1s` window from 1970 is 1.8 billion, which no replica
/// should start on.
pub const DEFAULT_MAX_BACKLOG_WINDOWS: u64 = 100_000;

/// Why a backfill request is refused, if it is: more windows than a backlog may hold.
pub fn backfill_refusal(
    request: &BackfillRequest,
    window_micros: i64,
    max_backlog_windows: u64,
) -> Option<String> {
    let first = request.from_micros.div_euclid(window_micros).saturating_mul(window_micros);
    let num_windows = window_count(first, request.to_micros, window_micros);
    (num_windows > max_backlog_windows).then(|| {
        format!(
            "backfill from {} to {} covers {num_windows} windows; at most {max_backlog_windows} are \
             accepted at once (executor.max_backlog_windows): request shorter ranges one after another",
            format_micros(request.from_micros),
            format_micros(request.to_micros),
        )
    })
}

/// The ranges of window starts to look at, oldest first and not overlapping: from the first
/// window on, and each backfill's windows. Windows between them are never visited, however old
/// a backfill is.
pub fn ranges_to_scan(
    first_window_micros: i64,
    window_micros: i64,
    backfills: &[&BackfillRequest],
) -> Vec<(i64, i64)> {
    let mut ranges: Vec<(i64, i64)> = backfills
        .iter()
        .map(|request| {
            (request.from_micros.div_euclid(window_micros).saturating_mul(window_micros), request.to_micros)
        })
        .filter(|(start, end)| start < end)
        .collect();
    ranges.push((first_window_micros, i64::MAX));
    ranges.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// What one tick looks at for one job.
#[derive(Debug, Clone, Copy)]
pub struct WindowScan {
    pub window_micros: i64,
    pub lateness_micros: i64,
    /// Windows ending (plus lateness) after this are not complete yet.
    pub complete_through_micros: i64,
    pub now_micros: i64,
    /// Paging: at most this many due windows per tick, so a long catch-up costs the same
    /// memory per tick as a short one and goes on, oldest first, on the next ticks.
    pub max_due: usize,
}

impl WindowScan {
    /// Complete windows in `ranges` (oldest first) for which `next` says what to start, up to
    /// `max_due` of them. The scan stops at the first incomplete window or the first one the
    /// schedule has not fired for yet, as windows are complete (and fire) in order.
    pub fn due_windows<T>(
        &self,
        ranges: &[(i64, i64)],
        schedule_opt: Option<&crate::job::Schedule>,
        mut next: impl FnMut(i64, i64) -> Option<T>,
    ) -> Vec<(i64, T)> {
        let mut due = Vec::new();
        for (range_start, range_end) in ranges {
            let mut window_start = *range_start;
            while window_start < *range_end {
                let Some(window_end) = window_start.checked_add(self.window_micros) else { return due };
                let ready_at = window_end.saturating_add(self.lateness_micros);
                if ready_at > self.complete_through_micros {
                    return due;
                }
                if let Some(schedule) = schedule_opt {
                    match schedule.next_at_or_after(ready_at) {
                        Some(fires_at) if fires_at <= self.now_micros => {}
                        _ => return due,
                    }
                }
                if let Some(step) = next(window_start, window_end) {
                    due.push((window_start, step));
                    if due.len() >= self.max_due {
                        return due;
                    }
                }
                window_start = window_end;
            }
        }
        due
    }
}

fn format_window(micros: i64) -> String {
    const UNITS: [(i64, &str); 4] =
        [(86_400_000_000, "d"), (3_600_000_000, "h"), (60_000_000, "m"), (1_000_000, "s")];
    for (unit, suffix) in UNITS {
        if micros % unit == 0 {
            return format!("{}{suffix}", micros / unit);
        }
    }
    format!("{}ms", micros / 1_000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;
    use crate::job::parse_timestamp_micros;

    const SECOND: i64 = 1_000_000;

    fn request(from: i64, to: i64) -> BackfillRequest {
        BackfillRequest {
            job: "j".into(),
            from_micros: from,
            to_micros: to,
            requested_at_micros: 0,
            signature_opt: None,
        }
    }

    /// A schedule as a job file gives it.
    fn schedule(cron: &str, time_zone: &str) -> crate::job::Schedule {
        let text =
            format!("-- name: j\n-- window: 1h\n-- schedule: {cron}\n-- time_zone: {time_zone}\nSELECT 1");
        crate::job::JobDefinition::parse(&text, None).unwrap().schedule_opt.unwrap()
    }

    #[test]
    fn due_windows_at_the_edges_of_completeness_lateness_skew_and_time_zones() {
        const HOUR: i64 = 3_600 * SECOND;
        const DAY: i64 = 24 * HOUR;
        let at = |text: &str| parse_timestamp_micros(text).unwrap();
        let hourly_at_five_past = schedule("5 * * * *", "UTC");
        // Half past midnight in Berlin, read on the day summer time ends there (2026-10-25).
        let berlin_daily = schedule("30 0 * * *", "Europe/Berlin");
        struct Case<'a> {
            why: &'a str,
            window: i64,
            lateness: i64,
            first_window: &'a str,
            complete_through: &'a str,
            now: &'a str,
            schedule_opt: Option<&'a crate::job::Schedule>,
            due: &'a [&'a str],
        }
        let cases = [
            Case {
                why: "a window that ends exactly at the watermark is complete",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T09:00:00Z",
                now: "2026-11-26T09:00:00Z",
                schedule_opt: None,
                due: &["2026-11-26T08:00:00Z"],
            },
            Case {
                why: "one microsecond short of its end, it is not",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T08:59:59.999999Z",
                now: "2026-11-26T10:00:00Z",
                schedule_opt: None,
                due: &[],
            },
            Case {
                why: "lateness holds a window back past its end",
                window: HOUR,
                lateness: 10 * 60 * SECOND,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T09:09:59Z",
                now: "2026-11-26T10:00:00Z",
                schedule_opt: None,
                due: &[],
            },
            Case {
                why: "and lets it go once the watermark reaches end plus lateness",
                window: HOUR,
                lateness: 10 * 60 * SECOND,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T09:10:00Z",
                now: "2026-11-26T10:00:00Z",
                schedule_opt: None,
                due: &["2026-11-26T08:00:00Z"],
            },
            Case {
                why: "a stalled watermark holds every later window however late the clock is",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T07:00:00Z",
                complete_through: "2026-11-26T09:00:00Z",
                now: "2026-11-29T09:00:00Z",
                schedule_opt: None,
                due: &["2026-11-26T07:00:00Z", "2026-11-26T08:00:00Z"],
            },
            Case {
                why: "late readings do not reopen a window here: restatement decides that",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T10:00:00Z",
                now: "2026-11-26T10:00:00Z",
                schedule_opt: None,
                due: &["2026-11-26T08:00:00Z", "2026-11-26T09:00:00Z"],
            },
            Case {
                why: "a replica whose clock lags the watermark waits for the schedule by its own clock",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T09:30:00Z",
                now: "2026-11-26T09:04:59.999999Z",
                schedule_opt: Some(&hourly_at_five_past),
                due: &[],
            },
            Case {
                why: "and runs it when its clock reaches the firing",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T09:30:00Z",
                now: "2026-11-26T09:05:00Z",
                schedule_opt: Some(&hourly_at_five_past),
                due: &["2026-11-26T08:00:00Z"],
            },
            Case {
                why: "a clock ahead of the watermark runs nothing the watermark has not completed",
                window: HOUR,
                lateness: 0,
                first_window: "2026-11-26T08:00:00Z",
                complete_through: "2026-11-26T08:30:00Z",
                now: "2026-11-27T08:00:00Z",
                schedule_opt: Some(&hourly_at_five_past),
                due: &[],
            },
            Case {
                // The UTC day 2026-10-25 is 25 local hours in Berlin. Windows stay UTC days;
                // the schedule is read in local time: the first 00:30 in Berlin after
                // 2026-10-26T00:00Z (01:00 CET) is 2026-10-27T00:30 CET, 2026-10-26T23:30Z.
                why: "a daily window across the end of summer time is still one UTC day, run on local time",
                window: DAY,
                lateness: 0,
                first_window: "2026-10-25T00:00:00Z",
                complete_through: "2026-10-27T00:00:00Z",
                now: "2026-10-26T23:29:59Z",
                schedule_opt: Some(&berlin_daily),
                due: &[],
            },
            Case {
                why: "and is due at that firing, and only that day",
                window: DAY,
                lateness: 0,
                first_window: "2026-10-25T00:00:00Z",
                complete_through: "2026-10-27T00:00:00Z",
                now: "2026-10-26T23:30:00Z",
                schedule_opt: Some(&berlin_daily),
                due: &["2026-10-25T00:00:00Z"],
            },
        ];
        for case in cases {
            let scan = WindowScan {
                window_micros: case.window,
                lateness_micros: case.lateness,
                complete_through_micros: at(case.complete_through),
                now_micros: at(case.now),
                max_due: 64,
            };
            let ranges = ranges_to_scan(at(case.first_window), case.window, &[]);
            let due: Vec<i64> = scan
                .due_windows(&ranges, case.schedule_opt, |_, _| Some(()))
                .into_iter()
                .map(|(start, ())| start)
                .collect();
            let expected: Vec<i64> = case.due.iter().map(|text| at(text)).collect();
            assert_eq!(due, expected, "{}", case.why);
        }
    }

    #[test]
    fn counts_never_enumerate_and_never_overflow() {
        assert_eq!(window_count(0, 10 * SECOND, SECOND), 10);
        assert_eq!(window_count(0, 10 * SECOND + 1, SECOND), 11);
        assert_eq!(window_count(5, 5, SECOND), 0);
        assert_eq!(window_count(i64::MIN, i64::MAX, 1), u64::MAX);
        assert_eq!(window_count(i64::MIN, i64::MAX, i64::MAX), 3);
    }

    #[test]
    fn a_backlog_since_1970_is_refused_with_what_would_be_accepted() {
        let definition =
            JobDefinition::parse("-- name: a\n-- window: 1s\n-- start: 1970-01-01\nSELECT 1", None).unwrap();
        let now = parse_timestamp_micros("2026-11-30T12:00:00Z").unwrap();
        let pending = window_count(0, now, SECOND);
        let reason = backlog_refusal(&definition, 0, pending, now, 100_000).unwrap();
        assert!(reason.contains("start 1970-01-01T00:00:00Z with window 1s"), "{reason}");
        assert!(reason.contains(&format!("leaves {pending} windows")), "{reason}");
        assert!(reason.contains("start at 2026-11-29T08:13:21Z or later"), "{reason}");
        // Right at the limit it is accepted, one over it is not.
        assert!(backlog_refusal(&definition, 0, 100_000, now, 100_000).is_none());
        assert!(backlog_refusal(&definition, 0, 100_001, now, 100_000).is_some());
        // The suggested start is accepted.
        let suggested = parse_timestamp_micros("2026-11-29T08:13:21Z").unwrap();
        assert!(window_count(suggested, now, SECOND) <= 100_000);
    }

    #[test]
    fn a_tick_queues_one_page_of_a_backlog_since_1970_and_the_next_page_after_it() {
        let now = parse_timestamp_micros("2026-11-30T12:00:00Z").unwrap();
        let scan = WindowScan {
            window_micros: SECOND,
            lateness_micros: 0,
            complete_through_micros: now,
            now_micros: now,
            max_due: 64,
        };
        let ranges = ranges_to_scan(0, SECOND, &[]);
        // The scan stops at a full page: the windows it looks at, not the 1.8 billion seconds
        // since 1970, bound its work.
        let mut looked_at = 0;
        let page = scan.due_windows(&ranges, None, |_, _| {
            looked_at += 1;
            Some(())
        });
        assert_eq!(page.len(), 64);
        assert_eq!(looked_at, 64);
        assert_eq!(page.first().unwrap().0, 0);
        assert_eq!(page.last().unwrap().0, 63 * SECOND);
        // Windows that ran are passed over; the next page starts after them.
        let mut looked_at = 0;
        let next_page = scan.due_windows(&ranges, None, |start, _| {
            looked_at += 1;
            (start >= 64 * SECOND).then_some(())
        });
        assert_eq!(next_page.first().unwrap().0, 64 * SECOND);
        assert_eq!(next_page.len(), 64);
        assert_eq!(looked_at, 128);
        // Nothing past the complete windows, and lateness holds the last one back.
        let late = WindowScan { lateness_micros: SECOND, complete_through_micros: 10 * SECOND, ..scan };
        let all = late.due_windows(&ranges, None, |_, _| Some(()));
        assert_eq!(all.len(), 9);
        // Extreme values end the scan instead of overflowing.
        let edge = WindowScan { window_micros: i64::MAX / 2, complete_through_micros: i64::MAX, ..scan };
        assert!(edge.due_windows(&[(i64::MAX / 2, i64::MAX)], None, |_, _| Some(())).len() <= 1);
    }

    #[test]
    fn backfills_past_the_limit_are_refused_and_ranges_skip_the_gaps() {
        assert!(backfill_refusal(&request(0, 100 * SECOND), SECOND, 100).is_none());
        let reason = backfill_refusal(&request(0, 101 * SECOND), SECOND, 100).unwrap();
        assert!(reason.contains("covers 101 windows"), "{reason}");
        assert!(backfill_refusal(&request(i64::MIN, i64::MAX), 1, u64::MAX - 1).is_some());
        assert!(backfill_refusal(&request(i64::MIN, i64::MAX), SECOND, u64::MAX - 1).is_none());

        let early = request(10 * SECOND + 5, 20 * SECOND);
        let overlapping = request(15 * SECOND, 30 * SECOND);
        let ranges = ranges_to_scan(1_000 * SECOND, SECOND, &[&overlapping, &early]);
        assert_eq!(ranges, vec![(10 * SECOND, 30 * SECOND), (1_000 * SECOND, i64::MAX)]);
        let inside = request(2_000 * SECOND, 3_000 * SECOND);
        assert_eq!(ranges_to_scan(1_000 * SECOND, SECOND, &[&inside]), vec![(1_000 * SECOND, i64::MAX)]);
        assert_eq!(ranges_to_scan(0, SECOND, &[&request(5, 5)]), vec![(0, i64::MAX)]);
    }
}
