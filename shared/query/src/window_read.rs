//! What a window run reads of a stream table: the `dt`/`hour` partitions the window touches,
//! the files whose recorded event-time range overlaps the window (the others are skipped whole,
//! their footers never fetched), and whether the rows read need a filter on the event time.
//!
//! The ranges come from the table's log (each `add` action records its file's smallest and
//! largest `ts`, the same values as its `minValues`/`maxValues`), so skipping costs no request.
//! The benchmark against DuckDB builds its view from the same rule, so both engines read the
//! same partitions and return the same rows.

use std::collections::{BTreeMap, BTreeSet};

use sluice_lake::{CommittedFile, PartitionGranularity, PartitionKey};

/// Above this many hours the partitions are named by day instead (the row filter on the event
/// time still bounds the window exactly): a filter of thousands of ORed hours costs more to plan
/// than whole days cost to prune.
const MAX_HOURS_BY_NAME: i64 = 48;
const MICROS_PER_HOUR: i64 = 3_600_000_000;
const HOURS_IN_DAY: usize = 24;

/// The read of one stream for the window `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRead {
    start_micros: i64,
    end_micros: i64,
    partitions: BTreeMap<String, BTreeSet<u8>>,
    partitions_start_micros: i64,
    partitions_end_micros: i64,
}

impl WindowRead {
    pub fn new(granularity: PartitionGranularity, start_micros: i64, end_micros: i64) -> Self {
        let hours =
            (end_micros.saturating_sub(start_micros)).saturating_add(MICROS_PER_HOUR - 1) / MICROS_PER_HOUR;
        let step = match granularity {
            PartitionGranularity::Hour if hours <= MAX_HOURS_BY_NAME => PartitionGranularity::Hour,
            _ => PartitionGranularity::Day,
        };
        let partitions_start_micros = PartitionKey::for_event_time(start_micros, step).start_micros();
        let mut partitions: BTreeMap<String, BTreeSet<u8>> = BTreeMap::new();
        let mut at = start_micros;
        while at < end_micros {
            let key = PartitionKey::for_event_time(at, step);
            partitions.entry(key.date_string()).or_default().extend(key.hour_opt);
            at = key.end_micros();
        }
        // A day read whole is named as the day: one term to prune by instead of 24, and a
        // listing prefix (`dt=D/`) that ORed hours do not give.
        for hours in partitions.values_mut() {
            if hours.len() == HOURS_IN_DAY {
                hours.clear();
            }
        }
        Self {
            start_micros,
            end_micros,
            partitions,
            partitions_start_micros,
            partitions_end_micros: at.max(end_micros),
        }
    }

    /// The window's partitions: each day with the hours of it that the window touches, in order;
    /// no hours means the whole day.
    pub fn partitions(&self) -> &BTreeMap<String, BTreeSet<u8>> {
        &self.partitions
    }

    /// Whether `file` may hold rows of the window. A file without a recorded range (written by
    /// another engine) is always read.
    pub fn reads(&self, file: &CommittedFile) -> bool {
        holds_rows_of(file, self.start_micros, self.end_micros)
    }

    /// Whether some file the run reads also holds rows outside the window, so that its rows need
    /// a filter on the event time. Not so for a window on partition boundaries, the common job
    /// (an hour over an hourly stream, a day), nor where the flushes of an unmerged hour happen
    /// to fall inside a shorter window: the scan then neither decodes `ts` for the bounds nor
    /// compares every row.
    pub fn filters_rows(&self, files: &[CommittedFile]) -> bool {
        files.iter().filter(|file| self.reads(file)).any(|file| !self.holds_only_window_rows(file))
    }

    /// Whether the window's partitions hold rows outside the window: what an engine that reads
    /// the partitions' files without skipping by event time must filter.
    pub fn partitions_hold_other_rows(&self, files: &[CommittedFile]) -> bool {
        files
            .iter()
            .filter(|file| {
                file.min_event_time_micros < self.partitions_end_micros
                    && file.max_event_time_micros >= self.partitions_start_micros
            })
            .any(|file| !self.holds_only_window_rows(file))
    }

    fn holds_only_window_rows(&self, file: &CommittedFile) -> bool {
        file.min_event_time_micros >= self.start_micros && file.max_event_time_micros < self.end_micros
    }
}

/// Whether `file`'s recorded event-time range overlaps `[start, end)`.
pub fn holds_rows_of(file: &CommittedFile, start_micros: i64, end_micros: i64) -> bool {
    file.min_event_time_micros < end_micros && file.max_event_time_micros >= start_micros
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    const HOUR: i64 = MICROS_PER_HOUR;

    fn at(text: &str) -> i64 {
        sluice_jobs::job::parse_timestamp_micros(text).unwrap()
    }

    fn file_with_rows(min_event_time_micros: i64, max_event_time_micros: i64) -> CommittedFile {
        let partition = PartitionKey::for_event_time(min_event_time_micros, PartitionGranularity::Hour);
        CommittedFile {
            path: format!("telemetry/{partition}/f.parquet"),
            partition: partition.to_string(),
            num_rows: 1,
            size_bytes: 1,
            min_event_time_micros,
            max_event_time_micros,
        }
    }

    #[test]
    fn partitions_are_the_hours_touched_then_whole_days_past_two_days() {
        let start = at("2026-11-26T23:30:00Z");
        let read = WindowRead::new(PartitionGranularity::Hour, start, start + 2 * HOUR);
        let expected: BTreeMap<String, BTreeSet<u8>> = [
            ("2026-11-26".to_string(), BTreeSet::from([23])),
            ("2026-11-27".to_string(), BTreeSet::from([0, 1])),
        ]
        .into();
        assert_eq!(read.partitions(), &expected);

        // Up to 48 hours are named, except that a day read whole is named as the day; 49 read
        // whole days.
        let named = WindowRead::new(PartitionGranularity::Hour, start, start + 47 * HOUR);
        let expected: BTreeMap<String, BTreeSet<u8>> = [
            ("2026-11-26".to_string(), BTreeSet::from([23])),
            ("2026-11-27".to_string(), BTreeSet::new()),
            ("2026-11-28".to_string(), (0..=22).collect()),
        ]
        .into();
        assert_eq!(named.partitions(), &expected);
        let one_day =
            WindowRead::new(PartitionGranularity::Hour, at("2026-11-27T00:00:00Z"), start + 24 * HOUR);
        let expected: BTreeMap<String, BTreeSet<u8>> = [("2026-11-27".to_string(), BTreeSet::new())].into();
        assert_eq!(one_day.partitions(), &expected);
        let days = WindowRead::new(PartitionGranularity::Hour, start, start + 49 * HOUR);
        assert_eq!(days.partitions().len(), 4);
        assert!(days.partitions().values().all(BTreeSet::is_empty));

        let daily = WindowRead::new(PartitionGranularity::Day, start, start + HOUR);
        assert!(daily.partitions().values().all(BTreeSet::is_empty));
        assert_eq!(daily.partitions().len(), 2);
    }

    #[test]
    fn an_empty_or_inverted_window_touches_no_partition() {
        let start = at("2026-11-26T08:00:00Z");
        assert!(WindowRead::new(PartitionGranularity::Hour, start, start).partitions().is_empty());
        assert!(WindowRead::new(PartitionGranularity::Hour, start, start - HOUR).partitions().is_empty());
    }

    #[test]
    fn a_file_without_a_recorded_range_is_read_and_filtered() {
        let unknown = file_with_rows(i64::MIN, i64::MAX);
        let start = at("2026-11-26T08:00:00Z");
        let hour = WindowRead::new(PartitionGranularity::Hour, start, start + HOUR);
        assert!(hour.reads(&unknown));
        assert!(hour.filters_rows(std::slice::from_ref(&unknown)));
        assert!(hour.partitions_hold_other_rows(&[unknown]));
    }

    #[test]
    fn files_outside_the_window_are_skipped_and_the_row_filter_goes_when_the_rest_lie_inside() {
        let start = at("2026-11-26T08:00:00Z");
        let first_half = file_with_rows(start, start + HOUR / 2 - 1);
        let second_half = file_with_rows(start + HOUR / 2, start + HOUR - 1);
        let straddling = file_with_rows(start + HOUR / 4, start + 3 * HOUR / 4);
        let half = WindowRead::new(PartitionGranularity::Hour, start, start + HOUR / 2);
        assert!(half.reads(&first_half));
        assert!(!half.reads(&second_half), "ends at the window's end, exclusive");
        assert!(half.reads(&straddling));

        // The flushes fell inside the half hour: the run reads one file and filters no row,
        // though the partition holds rows of the other half that a plain reader must filter.
        let aligned = [first_half.clone(), second_half.clone()];
        assert!(!half.filters_rows(&aligned));
        assert!(half.partitions_hold_other_rows(&aligned));
        // A file across the boundary is read and its rows filtered.
        assert!(half.filters_rows(&[first_half, second_half, straddling]));

        // The window's own hour, with the hours around it that the partitions leave out.
        let around = [
            file_with_rows(start, start + HOUR - 1),
            file_with_rows(start - HOUR, start - 1),
            file_with_rows(start + HOUR, start + 2 * HOUR - 1),
        ];
        let hour = WindowRead::new(PartitionGranularity::Hour, start, start + HOUR);
        assert!(!hour.filters_rows(&around) && !hour.partitions_hold_other_rows(&around));
        assert_eq!(around.iter().filter(|file| hour.reads(file)).count(), 1);

        // A day-partitioned stream and an hour window: the day's file holds other hours.
        let day_file = CommittedFile {
            partition: PartitionKey::for_event_time(start, PartitionGranularity::Day).to_string(),
            ..file_with_rows(start - 8 * HOUR, start + 16 * HOUR - 1)
        };
        let hour_of_day = WindowRead::new(PartitionGranularity::Day, start, start + HOUR);
        assert!(hour_of_day.filters_rows(std::slice::from_ref(&day_file)));
        assert!(hour_of_day.partitions_hold_other_rows(&[day_file]));
    }
}
