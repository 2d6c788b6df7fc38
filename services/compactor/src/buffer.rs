//! What an assigned Kafka partition holds between two commits: the records not decoded yet, the
//! decoded rows, and the bookkeeping the flush policy and the commit read (value bytes, the age
//! of the oldest record, the offset range, the event-time partitions touched). Free of I/O and
//! of the clock, so that what a record adds, what a flush takes and what a revoke drops are
//! tested without a broker or a store; the consumer loop decodes, dead-letters and commits.
//!
//! The tests make this file longer than the others: they stay next to the bookkeeping they pin.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use sluice_lake::{CommittedPosition, PartitionGranularity, PartitionKey};
use sluice_schema::{DecoderSetupError, StreamDecoder};

use crate::consumer::StreamInfo;
use crate::flush_policy::BufferState;

/// Records consumed but not decoded yet, copied out of librdkafka's buffers.
#[derive(Debug, Default)]
pub(crate) struct PendingValues {
    bytes: Vec<u8>,
    /// Per record: offset, key range and value range in `bytes`.
    records: Vec<(i64, Range<usize>, Range<usize>)>,
}

impl PendingValues {
    fn push(&mut self, offset: i64, key: &[u8], value: &[u8]) {
        let key_start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let value_start = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.records.push((offset, key_start..value_start, value_start..self.bytes.len()));
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The values in record order, as the decoder takes them.
    pub(crate) fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.records.iter().map(|(_, _, value)| &self.bytes[value.clone()])
    }

    /// Offset, key and value of the `index`th record. Panics past the end: indexes come from
    /// the decoder, which reports only the values it was given.
    pub(crate) fn record(&self, index: usize) -> (i64, &[u8], &[u8]) {
        let (offset, key, value) = &self.records[index];
        (*offset, &self.bytes[key.clone()], &self.bytes[value.clone()])
    }
}

/// Buffered, not yet committed data of one Kafka partition, and the position it continues from.
#[derive(Debug, Default)]
pub(crate) struct PartitionBuffer {
    pending: PendingValues,
    batches: Vec<RecordBatch>,
    /// Avro bytes consumed since the last commit (pending and decoded): a cheap proxy for memory.
    num_value_bytes: usize,
    /// The partition's position in the table as this writer last saw it: a commit must find it
    /// unchanged.
    committed_opt: Option<i64>,
    /// Start of the range the next commit covers; `None` until the first record of a partition
    /// that has no commit yet.
    range_start_opt: Option<i64>,
    /// Offset after the last record consumed.
    next_offset: i64,
    open_partitions: BTreeSet<PartitionKey>,
    first_buffered_at_opt: Option<Instant>,
    num_dead_lettered: u64,
    committed_max_event_time_opt: Option<i64>,
    buffered_max_event_time_opt: Option<i64>,
}

impl PartitionBuffer {
    /// An empty buffer continuing after `latest`, or from the partition's beginning.
    pub(crate) fn new(latest: Option<&CommittedPosition>) -> Self {
        let mut buffer = Self::default();
        buffer.reset_to(latest);
        buffer
    }

    /// Drops everything buffered and continues after `latest`.
    pub(crate) fn reset_to(&mut self, latest: Option<&CommittedPosition>) {
        self.pending.clear();
        self.batches.clear();
        self.num_value_bytes = 0;
        self.committed_opt = latest.map(|position| position.end_offset);
        self.range_start_opt = latest.map(|position| position.end_offset);
        self.next_offset = latest.map_or(0, |position| position.end_offset);
        self.committed_max_event_time_opt = latest.and_then(|position| position.max_event_time_micros_opt);
        self.open_partitions.clear();
        self.first_buffered_at_opt = None;
        self.num_dead_lettered = 0;
        self.buffered_max_event_time_opt = None;
    }

    /// Sets a consumed record aside for decoding. `now` is called only for the first record
    /// since the last commit, whose arrival starts the buffer's age.
    pub(crate) fn push_record(
        &mut self,
        offset: i64,
        key: &[u8],
        value: &[u8],
        now: impl FnOnce() -> Instant,
    ) {
        // A partition without a commit starts where its first record is, which need not be 0:
        // the topic's retention may have deleted the records before it.
        self.range_start_opt.get_or_insert(offset);
        self.pending.push(offset, key, value);
        self.num_value_bytes += value.len();
        self.next_offset = offset + 1;
        self.first_buffered_at_opt.get_or_insert_with(now);
    }

    pub(crate) fn pending(&self) -> &PendingValues {
        &self.pending
    }

    /// Buffers decoded rows that were kept, with their event times (one per row).
    pub(crate) fn push_rows(
        &mut self,
        rows: RecordBatch,
        event_times_micros: &[i64],
        granularity: PartitionGranularity,
    ) {
        // Consecutive rows nearly always share a partition: one set insert per run of them,
        // not per row.
        let mut previous_opt = None;
        for &event_time in event_times_micros {
            let partition = PartitionKey::for_event_time(event_time, granularity);
            if previous_opt != Some(partition) {
                self.open_partitions.insert(partition);
                previous_opt = Some(partition);
            }
        }
        if let Some(&max) = event_times_micros.iter().max() {
            self.buffered_max_event_time_opt =
                Some(self.buffered_max_event_time_opt.map_or(max, |buffered| buffered.max(max)));
        }
        self.batches.push(rows);
    }

    /// Ends a decode of the pending records: `num_dead_lettered` of them went to the dead-letter
    /// topic, and when a dead letter could not be written, the range ends before the record at
    /// `unread_from_opt`, which whoever resumes the partition reads again.
    pub(crate) fn finish_decoding(&mut self, num_dead_lettered: u64, unread_from_opt: Option<i64>) {
        if let Some(unread_from) = unread_from_opt {
            self.next_offset = unread_from;
        }
        self.num_dead_lettered += num_dead_lettered;
        self.pending.clear();
    }

    /// The offsets the next commit covers: from the committed position (or the first record) to
    /// after the last record consumed; `None` when nothing was consumed since.
    pub(crate) fn uncommitted_range(&self) -> Option<Range<i64>> {
        self.range_start_opt.filter(|&start| self.next_offset > start).map(|start| start..self.next_offset)
    }

    pub(crate) fn has_uncommitted(&self) -> bool {
        self.uncommitted_range().is_some()
    }

    /// Hands the decoded rows to a flush; the range stays until the commit resets the buffer.
    pub(crate) fn take_batches(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.batches)
    }

    /// Drops the rows and the range, so that nothing of this partition can be committed any
    /// more: a flush failed and the committed position could not be read again.
    pub(crate) fn drop_range(&mut self) {
        self.pending.clear();
        self.batches.clear();
        self.range_start_opt = None;
    }

    pub(crate) fn num_buffered_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Records a revoke drops: decoded rows and records not decoded yet. Dead-lettered records
    /// are not among them; they are in the dead-letter topic already.
    pub(crate) fn num_uncommitted_records(&self) -> usize {
        self.num_buffered_rows() + self.pending.len()
    }

    pub(crate) fn num_value_bytes(&self) -> usize {
        self.num_value_bytes
    }

    pub(crate) fn committed_opt(&self) -> Option<i64> {
        self.committed_opt
    }

    pub(crate) fn next_offset(&self) -> i64 {
        self.next_offset
    }

    pub(crate) fn num_dead_lettered(&self) -> u64 {
        self.num_dead_lettered
    }

    /// The latest event time the table holds for this partition once the buffer is committed.
    pub(crate) fn max_event_time_micros_opt(&self) -> Option<i64> {
        match (self.committed_max_event_time_opt, self.buffered_max_event_time_opt) {
            (Some(committed), Some(buffered)) => Some(committed.max(buffered)),
            (committed, buffered) => committed.or(buffered),
        }
    }

    pub(crate) fn buffer_state(&self) -> BufferState {
        BufferState {
            first_buffered_at_opt: self.first_buffered_at_opt,
            num_open_partitions: self.open_partitions.len(),
            num_value_bytes: self.num_value_bytes,
            has_uncommitted: self.has_uncommitted(),
        }
    }
}

/// One assigned Kafka partition: its stream, its decoder, its buffer, and whether it is paused.
pub(crate) struct PartitionState {
    pub(crate) stream: Arc<StreamInfo>,
    pub(crate) decoder: StreamDecoder,
    pub(crate) buffer: PartitionBuffer,
    /// The broker's end offset when the committed position was found beyond it: the partition
    /// is paused until an operator records a new position (docs/operations.md).
    pub(crate) beyond_end_opt: Option<i64>,
    /// The previous statistics already showed the fetch position beyond the broker's end.
    pub(crate) seen_beyond_end: bool,
}

impl PartitionState {
    pub(crate) fn new(
        stream: Arc<StreamInfo>,
        latest: Option<&CommittedPosition>,
    ) -> Result<Self, DecoderSetupError> {
        let decoder = stream.decoder()?;
        Ok(Self {
            stream,
            decoder,
            buffer: PartitionBuffer::new(latest),
            beyond_end_opt: None,
            seen_beyond_end: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use arrow_array::{ArrayRef, Int64Array};

    use super::*;
    use crate::config::FlushConfig;
    use crate::flush_policy::FlushPolicy;

    const HOUR_MICROS: i64 = 3_600_000_000;

    /// Records consumed, as (offset, value bytes).
    type Records = &'static [(i64, usize)];
    /// Event times of the rows of each decoded batch.
    type EventTimesPerBatch = &'static [&'static [i64]];
    /// The offsets a commit would cover, if any.
    type Uncommitted = Option<Range<i64>>;
    type MaxEventTime = Option<i64>;

    fn position(end_offset: i64, max_event_time_micros_opt: Option<i64>) -> CommittedPosition {
        CommittedPosition { end_offset, max_event_time_micros_opt, table_version: 3 }
    }

    fn rows(num_rows: usize) -> RecordBatch {
        let column = Int64Array::from_iter_values(0..num_rows as i64);
        RecordBatch::try_from_iter([("value", Arc::new(column) as ArrayRef)]).unwrap()
    }

    /// A clock that always says `at` and counts how often it is read.
    fn counting_clock(at: Instant, num_reads: &Cell<u32>) -> impl FnOnce() -> Instant + '_ {
        move || {
            num_reads.set(num_reads.get() + 1);
            at
        }
    }

    /// A buffer after `latest` with a record of `value_len` bytes at each offset.
    fn buffer_with(
        latest: Option<CommittedPosition>,
        records: &[(i64, usize)],
        now: Instant,
    ) -> PartitionBuffer {
        let mut buffer = PartitionBuffer::new(latest.as_ref());
        for &(offset, value_len) in records {
            buffer.push_record(offset, b"key", &vec![7; value_len], || now);
        }
        buffer
    }

    #[test]
    fn a_new_buffer_continues_after_the_committed_position() {
        let cases = [
            (None, None, 0, None, "a partition never committed starts at its first record"),
            (Some(position(0, None)), Some(0), 0, None, "committed at 0: nothing read yet"),
            (Some(position(42, Some(9))), Some(42), 42, Some(9), "committed up to 42"),
        ];
        for (latest, committed_opt, next_offset, max_event_time_opt, case) in cases {
            let buffer = PartitionBuffer::new(latest.as_ref());
            assert_eq!(buffer.committed_opt(), committed_opt, "{case}");
            assert_eq!(buffer.next_offset(), next_offset, "{case}");
            assert_eq!(buffer.uncommitted_range(), None, "{case}");
            assert!(!buffer.has_uncommitted(), "{case}");
            assert_eq!(buffer.max_event_time_micros_opt(), max_event_time_opt, "{case}");
            assert_eq!(buffer.num_value_bytes(), 0, "{case}");
            assert_eq!(buffer.num_uncommitted_records(), 0, "{case}");
            assert_eq!(
                buffer.buffer_state(),
                BufferState {
                    first_buffered_at_opt: None,
                    num_open_partitions: 0,
                    num_value_bytes: 0,
                    has_uncommitted: false,
                },
                "{case}"
            );
        }
    }

    #[test]
    fn records_extend_the_range_and_count_their_value_bytes() {
        let now = Instant::now();
        // (committed position, records as (offset, value bytes), range, value bytes, case)
        let cases: [(Option<CommittedPosition>, Records, Uncommitted, usize, &str); 7] = [
            (None, &[], None, 0, "empty buffer"),
            (None, &[(0, 10)], Some(0..1), 10, "one record"),
            (None, &[(5, 1)], Some(5..6), 1, "no commit and retention deleted offsets 0..5"),
            (Some(position(3, None)), &[(3, 4), (4, 4)], Some(3..5), 8, "contiguous after a commit"),
            (
                Some(position(3, None)),
                &[(5, 1), (7, 1), (10, 1)],
                Some(3..11),
                3,
                "offsets not contiguous (transaction markers, compaction): the range covers the gaps",
            ),
            (None, &[(5, 1), (7, 1), (10, 1)], Some(5..11), 3, "not contiguous, no commit"),
            (
                Some(position(8, None)),
                &[(8, 0)],
                Some(8..9),
                0,
                "an empty value moves the range, not the size",
            ),
        ];
        for (latest, records, range, num_value_bytes, case) in cases {
            let buffer = buffer_with(latest, records, now);
            assert_eq!(buffer.uncommitted_range(), range, "{case}");
            assert_eq!(buffer.has_uncommitted(), range.is_some(), "{case}");
            assert_eq!(buffer.num_value_bytes(), num_value_bytes, "{case}");
            assert_eq!(buffer.pending().len(), records.len(), "{case}");
            assert_eq!(buffer.num_uncommitted_records(), records.len(), "{case}");
            // Keys are kept for dead letters but are not part of the size.
            assert_eq!(buffer.buffer_state().num_value_bytes, num_value_bytes, "{case}");
        }
    }

    #[test]
    fn pending_records_keep_their_offsets_keys_and_values() {
        let mut buffer = PartitionBuffer::new(None);
        let now = Instant::now();
        buffer.push_record(4, b"a", b"first", || now);
        buffer.push_record(9, b"", b"", || now);
        buffer.push_record(10, b"ccc", b"third", || now);
        let pending = buffer.pending();
        assert_eq!(pending.values().collect::<Vec<_>>(), vec![&b"first"[..], b"", b"third"]);
        assert_eq!(pending.record(0), (4, &b"a"[..], &b"first"[..]));
        assert_eq!(pending.record(1), (9, &b""[..], &b""[..]));
        assert_eq!(pending.record(2), (10, &b"ccc"[..], &b"third"[..]));
    }

    #[test]
    fn the_age_starts_with_the_first_record_since_the_last_commit() {
        let started = Instant::now();
        let num_clock_reads = Cell::new(0);
        let clock = |at: Instant| counting_clock(at, &num_clock_reads);
        let mut buffer = PartitionBuffer::new(Some(&position(0, None)));
        buffer.push_record(0, b"", b"v", clock(started));
        buffer.push_record(1, b"", b"v", clock(started + Duration::from_secs(5)));
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, Some(started));
        assert_eq!(num_clock_reads.get(), 1, "the clock is read once per buffer, not per record");

        buffer.reset_to(Some(&position(2, None)));
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, None);
        let later = started + Duration::from_secs(60);
        buffer.push_record(2, b"", b"v", clock(later));
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, Some(later));
        assert_eq!(num_clock_reads.get(), 2);
    }

    #[test]
    fn a_buffer_is_full_from_the_record_that_reaches_the_target_size() {
        let policy = FlushPolicy::new(&FlushConfig { target_file_bytes: 10, ..FlushConfig::default() });
        let now = Instant::now();
        let cases: [(Records, bool, &str); 6] = [
            (&[], false, "empty"),
            (&[(0, 9)], false, "one byte short"),
            (&[(0, 10)], true, "one record exactly at the target"),
            (&[(0, 4), (1, 5)], false, "two records one byte short"),
            (&[(0, 4), (1, 6)], true, "two records exactly at the target"),
            (&[(0, 4), (1, 7)], true, "past the target"),
        ];
        for (records, full, case) in cases {
            let buffer = buffer_with(None, records, now);
            assert_eq!(policy.is_full(buffer.num_value_bytes()), full, "{case}");
        }
    }

    #[test]
    fn decoded_rows_open_event_time_partitions_and_raise_the_max_event_time() {
        // (committed max, event times per batch, open partitions, max after the commit, case)
        let cases: [(MaxEventTime, EventTimesPerBatch, usize, MaxEventTime, &str); 6] = [
            (None, &[], 0, None, "nothing decoded"),
            (None, &[&[]], 0, None, "a batch without rows"),
            (None, &[&[HOUR_MICROS]], 1, Some(HOUR_MICROS), "one row"),
            (None, &[&[0, 1, HOUR_MICROS - 1]], 1, Some(HOUR_MICROS - 1), "one hour"),
            (
                None,
                &[&[2 * HOUR_MICROS], &[0, HOUR_MICROS]],
                3,
                Some(2 * HOUR_MICROS),
                "late data in a later batch",
            ),
            (
                Some(5 * HOUR_MICROS),
                &[&[HOUR_MICROS]],
                1,
                Some(5 * HOUR_MICROS),
                "older than what is committed",
            ),
        ];
        for (committed_max, batches, num_open_partitions, max_event_time, case) in cases {
            let mut buffer = PartitionBuffer::new(Some(&position(0, committed_max)));
            for times in batches {
                buffer.push_rows(rows(times.len()), times, PartitionGranularity::Hour);
            }
            let num_rows: usize = batches.iter().map(|times| times.len()).sum();
            assert_eq!(buffer.buffer_state().num_open_partitions, num_open_partitions, "{case}");
            assert_eq!(buffer.max_event_time_micros_opt(), max_event_time, "{case}");
            assert_eq!(buffer.num_buffered_rows(), num_rows, "{case}");
        }
    }

    #[test]
    fn the_max_event_time_combines_committed_and_buffered() {
        let cases = [
            (None, None, None),
            (Some(5), None, Some(5)),
            (None, Some(7), Some(7)),
            (Some(9), Some(7), Some(9)),
            (Some(7), Some(9), Some(9)),
            (Some(i64::MIN), Some(i64::MAX), Some(i64::MAX)),
        ];
        for (committed, buffered, combined) in cases {
            let mut buffer = PartitionBuffer::new(Some(&position(0, committed)));
            if let Some(buffered) = buffered {
                buffer.push_rows(rows(1), &[buffered], PartitionGranularity::Day);
            }
            assert_eq!(buffer.max_event_time_micros_opt(), combined, "{committed:?} and {buffered:?}");
        }
    }

    #[test]
    fn finishing_a_decode_clears_the_pending_records_and_counts_dead_letters() {
        let now = Instant::now();
        // (records, dead letters written, unread from, range after, case)
        let cases: [(Records, u64, Option<i64>, Uncommitted, &str); 5] = [
            (&[(10, 1), (11, 1)], 0, None, Some(10..12), "all decoded"),
            (&[(10, 1), (11, 1)], 2, None, Some(10..12), "dead-lettered records stay in the range"),
            (&[(10, 1), (11, 1), (12, 1)], 1, Some(12), Some(10..12), "stopped at the last record"),
            (&[(10, 1), (11, 1)], 0, Some(10), None, "stopped at the first record: nothing to commit"),
            (&[(10, 1), (14, 1)], 0, Some(14), Some(10..14), "stopped past a gap"),
        ];
        for (records, num_dead_lettered, unread_from_opt, range, case) in cases {
            let mut buffer = buffer_with(Some(position(10, None)), records, now);
            buffer.finish_decoding(num_dead_lettered, unread_from_opt);
            assert!(buffer.pending().is_empty(), "{case}");
            assert_eq!(buffer.num_dead_lettered(), num_dead_lettered, "{case}");
            assert_eq!(buffer.uncommitted_range(), range, "{case}");
        }
    }

    #[test]
    fn a_flush_takes_the_rows_and_the_commit_resets_the_buffer() {
        let now = Instant::now();
        let mut buffer = buffer_with(Some(position(100, Some(1))), &[(100, 3), (103, 4)], now);
        buffer.push_rows(rows(1), &[HOUR_MICROS], PartitionGranularity::Hour);
        buffer.push_rows(rows(1), &[2 * HOUR_MICROS], PartitionGranularity::Hour);
        buffer.finish_decoding(0, None);

        let range = buffer.uncommitted_range();
        assert_eq!(range, Some(100..104));
        let taken = buffer.take_batches();
        assert_eq!(taken.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        assert_eq!(buffer.num_buffered_rows(), 0);
        // Until the commit, the range and what the commit record says stay as they were.
        assert_eq!(buffer.uncommitted_range(), range);
        assert_eq!(buffer.committed_opt(), Some(100));
        assert_eq!(buffer.max_event_time_micros_opt(), Some(2 * HOUR_MICROS));
        assert_eq!(buffer.num_value_bytes(), 7);

        buffer.reset_to(Some(&position(104, Some(2 * HOUR_MICROS))));
        assert_eq!(buffer.uncommitted_range(), None);
        assert_eq!(buffer.committed_opt(), Some(104));
        assert_eq!(buffer.next_offset(), 104);
        assert_eq!(buffer.num_value_bytes(), 0);
        assert_eq!(buffer.max_event_time_micros_opt(), Some(2 * HOUR_MICROS));
        assert_eq!(buffer.buffer_state().num_open_partitions, 0);
        assert_eq!(buffer.num_dead_lettered(), 0);
    }

    #[test]
    fn a_flush_of_an_empty_buffer_takes_nothing() {
        let mut buffer = PartitionBuffer::new(Some(&position(5, None)));
        assert_eq!(buffer.uncommitted_range(), None);
        assert!(buffer.take_batches().is_empty());
    }

    #[test]
    fn a_revoke_drops_decoded_rows_and_records_not_decoded_yet() {
        let now = Instant::now();
        // (pending records, decoded rows per batch, records dropped, case)
        let cases: [(Records, &[usize], usize, &str); 5] = [
            (&[], &[], 0, "nothing buffered"),
            (&[(0, 1)], &[], 1, "one record not decoded"),
            (&[], &[3], 3, "decoded rows only"),
            (&[(7, 1)], &[2, 4], 7, "rows and a pending record"),
            (&[(7, 1), (9, 1)], &[0], 2, "an empty batch drops nothing"),
        ];
        for (records, batches, dropped, case) in cases {
            let mut buffer = buffer_with(None, records, now);
            for &num_rows in batches {
                let times = vec![0; num_rows];
                buffer.push_rows(rows(num_rows), &times, PartitionGranularity::Day);
            }
            assert_eq!(buffer.num_uncommitted_records(), dropped, "{case}");
        }
    }

    #[test]
    fn a_dropped_range_can_no_longer_be_committed() {
        let now = Instant::now();
        let mut buffer = buffer_with(Some(position(20, None)), &[(20, 1), (21, 1)], now);
        buffer.push_rows(rows(2), &[0, 1], PartitionGranularity::Day);
        buffer.drop_range();
        assert!(!buffer.has_uncommitted());
        assert_eq!(buffer.num_uncommitted_records(), 0);
        assert!(buffer.pending().is_empty());
        assert_eq!(buffer.committed_opt(), Some(20));
    }
}
