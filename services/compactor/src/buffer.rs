//! What an assigned Kafka partition holds between two commits: the records not decoded yet, the
//! decoded rows, and the bookkeeping the flush policy and the commit read (value bytes, the age
//! of the oldest record, the offset range, the event-time partitions touched), and which flush of
//! the partition a worker holds. Free of I/O and of the clock, so that what a record adds, what a
//! flush takes, what its answer changes and what a revoke drops are tested without a broker or a
//! store; the consumer loop decodes and dead-letters, the flush workers commit.
//!
//! The tests make this file longer than the others: they stay next to the bookkeeping they pin.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use sluice_lake::{CommittedPosition, GatewayPositions, PartitionGranularity, PartitionKey};
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
    /// Avro bytes consumed since the last hand-off (pending and decoded): a cheap proxy for
    /// memory.
    num_value_bytes: usize,
    /// The position the next flush starts from, which its commit must find in the table: the
    /// table's as this writer last read it, or the end of the flush handed off before.
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
    /// The flush handed to a worker and not answered yet. At most one per partition: the next
    /// flush starts from this one's end, which only its answer confirms.
    in_flight_opt: Option<u64>,
    /// A flush failed and the committed position could not be read again: nothing more of this
    /// partition is buffered or committed until a position is read.
    stopped: bool,
    /// Per edge gateway, the positions committed (or handed off) from this partition.
    committed_edge_positions: BTreeMap<String, GatewayPositions>,
    /// The committed positions and those buffered since; equal to the committed until
    /// `edge_positions_moved`.
    edge_positions: BTreeMap<String, GatewayPositions>,
    edge_positions_moved: bool,
    /// Records left out since the last hand-off because their gateway had sent them before.
    num_edge_repeats: u64,
}

/// Where a record an edge gateway forwarded comes from: the gateway, the record's position, and
/// the first position of the request central took it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EdgeMark<'a> {
    pub(crate) edge_id: &'a str,
    pub(crate) position: i64,
    pub(crate) floor: i64,
}

/// What a flush takes from a buffer: the rows, and what its commit record says about them.
#[derive(Debug)]
pub(crate) struct HandedOff {
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) range: Range<i64>,
    /// The partition's position the commit must find in the table.
    pub(crate) previous_end_offset_opt: Option<i64>,
    pub(crate) num_dead_lettered: u64,
    /// The latest event time of the partition once this flush is committed.
    pub(crate) max_event_time_micros_opt: Option<i64>,
    /// Its share of `flush.max_buffered_bytes` until the flush answers.
    pub(crate) num_value_bytes: usize,
    /// The partition's edge positions once this flush is committed, when it moved any.
    pub(crate) edge_positions_opt: Option<BTreeMap<String, GatewayPositions>>,
    pub(crate) num_edge_repeats_dropped: u64,
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
        // A flush still running is no longer this buffer's: its answer changes nothing here.
        self.in_flight_opt = None;
        self.stopped = false;
        self.committed_edge_positions =
            latest.map(|position| position.edge_positions.clone()).unwrap_or_default();
        self.edge_positions.clone_from(&self.committed_edge_positions);
        self.edge_positions_moved = false;
        self.num_edge_repeats = 0;
    }

    /// Whether a record an edge gateway forwarded repeats one already buffered or committed
    /// from this partition; if not, it is now among the seen. Within a partition a repeat never
    /// comes before what it repeats: the gateway sends a request again only after the first
    /// one's answer, and Kafka keeps a partition's records in the order they were acknowledged.
    fn is_edge_repeat(&mut self, mark: &EdgeMark<'_>) -> bool {
        if !self.edge_positions.contains_key(mark.edge_id) {
            self.edge_positions.insert(mark.edge_id.to_string(), GatewayPositions::default());
        }
        let Some(positions) = self.edge_positions.get_mut(mark.edge_id) else { return false };
        let repeat = positions.observe(mark.position, mark.floor);
        self.edge_positions_moved |= !repeat;
        repeat
    }

    /// Sets a consumed record aside for decoding. `now` is called only for the first record
    /// since the last hand-off, whose arrival starts the buffer's age.
    pub(crate) fn push_record(
        &mut self,
        offset: i64,
        key: &[u8],
        value: &[u8],
        edge_opt: Option<EdgeMark<'_>>,
        now: impl FnOnce() -> Instant,
    ) {
        if self.stopped {
            return;
        }
        // A partition without a commit starts where its first record is, which need not be 0:
        // the topic's retention may have deleted the records before it.
        self.range_start_opt.get_or_insert(offset);
        // A range of repeats alone must be committed too, or its records are read again.
        self.first_buffered_at_opt.get_or_insert_with(now);
        if let Some(mark) = edge_opt
            && self.is_edge_repeat(&mark)
        {
            // Left out, but inside the range: the commit covers it.
            self.num_edge_repeats += 1;
            self.next_offset = offset + 1;
            return;
        }
        self.pending.push(offset, key, value);
        self.num_value_bytes += value.len();
        self.next_offset = offset + 1;
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
            // Positions of records past the new end were taken as seen: forgetting what this
            // buffer saw can let a repeat through, keeping it could drop a reading never stored.
            self.edge_positions.clone_from(&self.committed_edge_positions);
            self.edge_positions_moved = false;
        }
        self.num_dead_lettered += num_dead_lettered;
        self.pending.clear();
    }

    /// The offsets the next commit covers: from the committed position (or the first record) to
    /// after the last record consumed; `None` when nothing was consumed since.
    pub(crate) fn uncommitted_range(&self) -> Option<Range<i64>> {
        if self.stopped {
            return None;
        }
        self.range_start_opt.filter(|&start| self.next_offset > start).map(|start| start..self.next_offset)
    }

    pub(crate) fn has_uncommitted(&self) -> bool {
        self.uncommitted_range().is_some()
    }

    /// Hands the buffered range to flush `flush_id` and continues after it as though it were
    /// committed: the next flush states this one's end as the position it starts from, so the
    /// partition's commits chain whichever worker makes them. `None` when nothing is uncommitted,
    /// while an earlier flush is in flight (its answer decides where the next one starts), or
    /// while records wait to be decoded (the range would cover them without their rows).
    pub(crate) fn hand_off(&mut self, flush_id: u64) -> Option<HandedOff> {
        if self.in_flight_opt.is_some() || !self.pending.is_empty() {
            return None;
        }
        let range = self.uncommitted_range()?;
        let max_event_time_micros_opt = self.max_event_time_micros_opt();
        let edge_positions_opt = std::mem::take(&mut self.edge_positions_moved).then(|| {
            self.committed_edge_positions.clone_from(&self.edge_positions);
            self.edge_positions.clone()
        });
        let handed_off = HandedOff {
            batches: std::mem::take(&mut self.batches),
            range: range.clone(),
            previous_end_offset_opt: self.committed_opt,
            num_dead_lettered: self.num_dead_lettered,
            max_event_time_micros_opt,
            num_value_bytes: self.num_value_bytes,
            edge_positions_opt,
            num_edge_repeats_dropped: std::mem::take(&mut self.num_edge_repeats),
        };
        self.committed_opt = Some(range.end);
        self.range_start_opt = Some(range.end);
        self.committed_max_event_time_opt = max_event_time_micros_opt;
        self.buffered_max_event_time_opt = None;
        self.num_value_bytes = 0;
        self.num_dead_lettered = 0;
        self.open_partitions.clear();
        self.first_buffered_at_opt = None;
        self.in_flight_opt = Some(flush_id);
        Some(handed_off)
    }

    /// Whether a flush of this partition is with a worker: the next one waits for its answer.
    pub(crate) fn has_flush_in_flight(&self) -> bool {
        self.in_flight_opt.is_some()
    }

    /// Whether `flush_id` is the flush in flight here. An answer to any other flush (one of an
    /// earlier assignment of the partition, or one a rewind already gave up on) changes nothing.
    pub(crate) fn is_in_flight(&self, flush_id: u64) -> bool {
        self.in_flight_opt == Some(flush_id)
    }

    /// The flush in flight committed: the buffer already continues after it, and the next flush
    /// may go. A flush that failed or lost to another writer is answered with
    /// [`Self::reset_to`] the table's position instead.
    pub(crate) fn flush_committed(&mut self) {
        self.in_flight_opt = None;
    }

    /// Drops the rows and the range, so that nothing of this partition can be committed any
    /// more, not even of records consumed later: a flush failed and the committed position could
    /// not be read again.
    pub(crate) fn drop_range(&mut self) {
        self.pending.clear();
        self.batches.clear();
        self.num_value_bytes = 0;
        self.range_start_opt = None;
        self.in_flight_opt = None;
        self.stopped = true;
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

    #[test]
    fn an_edge_gateways_repeats_are_left_out_inside_the_range_and_its_positions_go_with_the_flush() {
        let now = Instant::now();
        let mut committed = position(100, None);
        committed
            .edge_positions
            .insert("site-7.a1".into(), GatewayPositions { floor: 40, seen: vec![[45, 50]] });
        let mut buffer = PartitionBuffer::new(Some(&committed));
        buffer.push_record(100, b"d", b"v", mark("site-7.a1", 50, 45), || now);
        buffer.push_record(101, b"d", b"v", mark("site-7.a1", 51, 45), || now);
        buffer.push_record(102, b"d", b"v", mark("site-7.a1", 51, 45), || now);
        buffer.push_record(103, b"d", b"v", mark("site-9.b2", 1, 1), || now);
        buffer.push_record(104, b"d", b"v", None, || now);
        assert_eq!(buffer.pending().len(), 3, "the committed repeat and the buffered one are left out");
        assert_eq!(buffer.uncommitted_range(), Some(100..105), "left-out records are inside the range");
        buffer.finish_decoding(0, None);
        let handed = buffer.hand_off(1).expect("handed off");
        assert_eq!(handed.num_edge_repeats_dropped, 2);
        let expected = BTreeMap::from([
            ("site-7.a1".to_string(), GatewayPositions { floor: 45, seen: vec![[45, 51]] }),
            ("site-9.b2".to_string(), GatewayPositions { floor: 1, seen: vec![[1, 1]] }),
        ]);
        assert_eq!(handed.edge_positions_opt.as_ref(), Some(&expected));
        buffer.flush_committed();

        // Still known after the hand-off; a flush that moves no position writes none.
        buffer.push_record(105, b"d", b"v", mark("site-7.a1", 51, 45), || now);
        buffer.push_record(106, b"d", b"v", None, || now);
        buffer.finish_decoding(0, None);
        let handed = buffer.hand_off(2).expect("handed off");
        assert_eq!((handed.num_edge_repeats_dropped, handed.edge_positions_opt), (1, None));
        buffer.flush_committed();

        // Below the floor is a repeat too. A range of repeats alone ages like any other, so the policy commits it.
        buffer.push_record(107, b"d", b"v", mark("site-7.a1", 40, 40), || now);
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, Some(now));
        buffer.finish_decoding(0, None);
        let handed = buffer.hand_off(3).expect("handed off");
        assert_eq!((handed.range, handed.num_edge_repeats_dropped), (107..108, 1));
        buffer.flush_committed();

        // Positions of records past a shortened range are forgotten, not committed.
        buffer.push_record(108, b"d", b"v", mark("site-7.a1", 60, 60), || now);
        buffer.finish_decoding(0, Some(108));
        assert_eq!(buffer.uncommitted_range(), None);

        // A rewind goes back to the table's positions: 51 was never committed there.
        buffer.reset_to(Some(&committed));
        buffer.push_record(100, b"d", b"v", mark("site-7.a1", 51, 45), || now);
        assert_eq!(buffer.pending().len(), 1);
    }

    fn mark(edge_id: &str, position: i64, floor: i64) -> Option<EdgeMark<'_>> {
        Some(EdgeMark { edge_id, position, floor })
    }

    fn position(end_offset: i64, max_event_time_micros_opt: Option<i64>) -> CommittedPosition {
        CommittedPosition {
            end_offset,
            max_event_time_micros_opt,
            edge_positions: BTreeMap::new(),
            table_version: 3,
        }
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
            buffer.push_record(offset, b"key", &vec![7; value_len], None, || now);
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
        buffer.push_record(4, b"a", b"first", None, || now);
        buffer.push_record(9, b"", b"", None, || now);
        buffer.push_record(10, b"ccc", b"third", None, || now);
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
        buffer.push_record(0, b"", b"v", None, clock(started));
        buffer.push_record(1, b"", b"v", None, clock(started + Duration::from_secs(5)));
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, Some(started));
        assert_eq!(num_clock_reads.get(), 1, "the clock is read once per buffer, not per record");

        buffer.reset_to(Some(&position(2, None)));
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, None);
        let later = started + Duration::from_secs(60);
        buffer.push_record(2, b"", b"v", None, clock(later));
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
            assert_eq!(buffer.num_dead_lettered, num_dead_lettered, "{case}");
            assert_eq!(buffer.uncommitted_range(), range, "{case}");
        }
    }

    /// A buffer after 100 with records 100, 101 and 103, decoded: two rows in two hours and one
    /// dead letter.
    fn decoded_buffer(now: Instant) -> PartitionBuffer {
        let mut buffer = buffer_with(Some(position(100, Some(1))), &[(100, 3), (101, 0), (103, 4)], now);
        buffer.push_rows(rows(1), &[HOUR_MICROS], PartitionGranularity::Hour);
        buffer.push_rows(rows(1), &[2 * HOUR_MICROS], PartitionGranularity::Hour);
        buffer.finish_decoding(1, None);
        buffer
    }

    #[test]
    fn a_hand_off_takes_the_rows_and_the_buffer_continues_after_them() {
        let now = Instant::now();
        let mut buffer = decoded_buffer(now);
        let taken = buffer.hand_off(7).expect("a range to flush");
        assert_eq!(taken.range, 100..104);
        assert_eq!(taken.previous_end_offset_opt, Some(100));
        assert_eq!(taken.batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        assert_eq!(taken.num_dead_lettered, 1);
        assert_eq!(taken.max_event_time_micros_opt, Some(2 * HOUR_MICROS));
        assert_eq!(taken.num_value_bytes, 7);

        // The buffer continues after the flush as though it were committed.
        assert!(buffer.has_flush_in_flight());
        assert!(buffer.is_in_flight(7));
        assert_eq!(buffer.uncommitted_range(), None);
        assert_eq!(buffer.committed_opt(), Some(104));
        assert_eq!(buffer.next_offset(), 104);
        assert_eq!(buffer.num_buffered_rows(), 0);
        assert_eq!(buffer.num_value_bytes(), 0);
        assert_eq!(buffer.num_dead_lettered, 0);
        assert_eq!(buffer.max_event_time_micros_opt(), Some(2 * HOUR_MICROS));
        assert_eq!(
            buffer.buffer_state(),
            BufferState {
                first_buffered_at_opt: None,
                num_open_partitions: 0,
                num_value_bytes: 0,
                has_uncommitted: false,
            }
        );
    }

    #[test]
    fn a_flush_of_an_empty_buffer_takes_nothing() {
        let mut buffer = PartitionBuffer::new(Some(&position(5, None)));
        assert_eq!(buffer.uncommitted_range(), None);
        assert!(buffer.hand_off(1).is_none());
        assert!(!buffer.has_flush_in_flight());
    }

    #[test]
    fn records_not_decoded_yet_keep_the_buffer_from_a_flush() {
        let now = Instant::now();
        let mut buffer = buffer_with(Some(position(0, None)), &[(0, 1)], now);
        assert!(buffer.hand_off(1).is_none(), "the range would cover a record without its row");
        assert!(!buffer.has_flush_in_flight());
        buffer.finish_decoding(0, None);
        assert_eq!(buffer.hand_off(1).map(|taken| taken.range), Some(0..1));
    }

    #[test]
    fn the_next_flush_waits_for_the_answer_and_starts_where_the_one_in_flight_ends() {
        let now = Instant::now();
        let mut buffer = decoded_buffer(now);
        buffer.hand_off(7).expect("a range to flush");
        // Records read while the flush is in flight form the next range.
        buffer.push_record(104, b"", &[1; 5], None, || now);
        buffer.push_rows(rows(1), &[3 * HOUR_MICROS], PartitionGranularity::Hour);
        buffer.finish_decoding(0, None);
        assert_eq!(buffer.uncommitted_range(), Some(104..105));
        assert_eq!(buffer.num_value_bytes(), 5);
        assert_eq!(buffer.buffer_state().first_buffered_at_opt, Some(now));
        assert!(buffer.hand_off(8).is_none(), "one flush per partition in flight");
        assert!(buffer.is_in_flight(7));

        buffer.flush_committed();
        assert!(!buffer.has_flush_in_flight());
        let next = buffer.hand_off(8).expect("the next range");
        assert_eq!(next.range, 104..105);
        assert_eq!(next.previous_end_offset_opt, Some(104), "the position the first flush committed");
        assert_eq!(next.max_event_time_micros_opt, Some(3 * HOUR_MICROS));
        assert_eq!(next.num_dead_lettered, 0, "the first flush's dead letters are its own");
        assert!(buffer.is_in_flight(8));
    }

    #[test]
    fn a_flush_that_failed_rewinds_to_the_table_and_drops_what_came_after_it() {
        let now = Instant::now();
        // Failed or stale: the loop reads the table's position again and starts from it.
        for (table_position, case) in [
            (position(100, Some(1)), "the commit did not land"),
            (position(104, Some(2 * HOUR_MICROS)), "its outcome was unknown and it landed"),
        ] {
            let mut buffer = decoded_buffer(now);
            buffer.hand_off(7).expect("a range to flush");
            assert!(!buffer.is_in_flight(6), "{case}: an answer to another flush is not this one's");
            buffer.push_record(104, b"", b"v", None, || now);
            buffer.reset_to(Some(&table_position));
            assert!(!buffer.has_flush_in_flight(), "{case}");
            assert!(!buffer.is_in_flight(7), "{case}: a late answer changes nothing");
            assert_eq!(buffer.uncommitted_range(), None, "{case}");
            assert_eq!(buffer.committed_opt(), Some(table_position.end_offset), "{case}");
            assert_eq!(buffer.next_offset(), table_position.end_offset, "{case}");
            assert_eq!(buffer.num_uncommitted_records(), 0, "{case}");
            assert_eq!(buffer.num_value_bytes(), 0, "{case}");
            assert_eq!(
                buffer.max_event_time_micros_opt(),
                table_position.max_event_time_micros_opt,
                "{case}"
            );
        }
    }

    #[test]
    fn what_a_revoke_while_a_flush_is_in_flight_drops_is_only_what_came_after_the_hand_off() {
        let now = Instant::now();
        let mut buffer = decoded_buffer(now);
        buffer.hand_off(7).expect("a range to flush");
        assert_eq!(buffer.num_uncommitted_records(), 0, "the flush's rows are the worker's");
        buffer.push_record(104, b"", b"v", None, || now);
        buffer.push_record(105, b"", b"v", None, || now);
        buffer.push_rows(rows(1), &[0], PartitionGranularity::Day);
        assert_eq!(buffer.num_uncommitted_records(), 3);
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
        assert_eq!(buffer.num_value_bytes(), 0, "no longer memory the budget counts");
        assert!(buffer.pending().is_empty());
        assert_eq!(buffer.committed_opt(), Some(20));
        // A record consumed later must not start a range that skips the dropped ones.
        buffer.push_record(22, b"", b"v", None, || now);
        buffer.finish_decoding(0, None);
        assert!(!buffer.has_uncommitted());
        assert!(buffer.hand_off(1).is_none());
        // A position read again lets the partition go on from there.
        buffer.reset_to(Some(&position(20, None)));
        buffer.push_record(20, b"", b"v", None, || now);
        assert_eq!(buffer.uncommitted_range(), Some(20..21));
    }

    #[test]
    fn a_dropped_range_forgets_its_flush_in_flight() {
        let now = Instant::now();
        let mut buffer = decoded_buffer(now);
        buffer.hand_off(7).expect("a range to flush");
        buffer.drop_range();
        assert!(!buffer.has_flush_in_flight());
        assert!(!buffer.is_in_flight(7));
    }
}
