//! The consumer loop: reads the stream topics, buffers rows per Kafka partition, and hands each
//! buffer to the flush workers, which write it as one Delta commit (files at their final paths,
//! then one commit adding them and moving the partition's position).
//!
//! The loop runs on one blocking thread and calls the object store through the runtime handle.
//! It keeps every state change in one place: it polls, decodes, dead-letters, decides when a
//! buffer is due and applies the workers' answers, while the workers (`flush_pool`) only encode,
//! upload and commit what they were handed. rdkafka runs the rebalance callback inside `poll`
//! on this thread, so a revoked partition's buffer is dropped before the loop can flush it, and
//! an assigned partition starts at the position its table's latest version holds, read from the
//! store before the assignment takes effect. Kafka's own committed offsets are written afterwards
//! for lag dashboards only; they are never read back.
//!
//! The loop's other concerns have their own modules, each an `impl CompactorLoop` where it acts
//! on the loop: `rebalance` (assignment and revocation), `buffer` (what a partition holds, free
//! of I/O), `flush` (when and how a buffer becomes a commit), `dead_letter` (records that cannot
//! be written) and `beyond_end` (partitions whose broker lost their records).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use parquet::file::properties::WriterProperties;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use sluice_errors::ErrorClass;
use sluice_kafka::BatchProducer;
use sluice_lake::{Lake, LakeError, PartitionGranularity, PartitionKey};
use sluice_schema::wire::{EDGE_FLOOR_HEADER, EDGE_ID_HEADER, EDGE_POSITION_HEADER};
use sluice_schema::{DecoderSetupError, StreamDecoder, StreamSchema, event_times_micros};
use sluice_shutdown::CancellationToken;
use tokio::runtime::Handle;

use crate::buffer::{EdgeMark, PartitionState};
use crate::config::FlushConfig;
use crate::dead_letter::dead_letter_source;
use crate::flush::FlushWriter;
use crate::flush_policy::FlushPolicy;
use crate::flush_pool::{FlushPool, FlushesInFlight};
use crate::metrics::CompactorMetrics;
use crate::parquet_file::StreamEncryption;
use crate::rebalance::{RebalanceContext, RebalanceEvent};
use crate::supervision::CompactorHealth;

const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Records buffered between two rounds of the loop's periodic work (flush answers, the
/// clock-driven checks). A profile at a million records a second found 14% of the loop's time
/// in `clock_gettime`, two of three reads per record the loop's own interval checks; 256 records
/// take well under a millisecond, and the work also runs whenever a poll finds nothing.
const RECORDS_BETWEEN_CHECKS: u32 = 256;
const TRIGGER_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often a partition waiting beyond the broker's end looks for a new position in the lake.
const NEW_POSITION_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Wait before the store or Kafka is asked again after a failure.
pub(crate) const STORE_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Values copied aside before they are decoded together: large enough that arrow-avro decodes
/// in long runs, small enough that a chunk with a bad value is cheap to decode again one by one.
const DECODE_CHUNK_VALUES: usize = 4_096;

/// What the compactor knows about one stream.
pub(crate) struct StreamInfo {
    pub(crate) stream: String,
    pub(crate) topic: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) reader: Arc<StreamSchema>,
    /// Every schema the stream's records may name, the reader's included.
    pub(crate) writers: Vec<Arc<StreamSchema>>,
    pub(crate) granularity: PartitionGranularity,
    pub(crate) writer_properties: WriterProperties,
    pub(crate) encryption_opt: Option<StreamEncryption>,
}

impl StreamInfo {
    pub(crate) fn decoder(&self) -> Result<StreamDecoder, DecoderSetupError> {
        StreamDecoder::new(Arc::clone(&self.reader), &self.writers)
    }
}

/// Why the loop stopped consuming. Every variant is [`ErrorClass::Fatal`] for the loop: the
/// store reads behind a rebalance were already retried, and a partition whose position cannot be
/// known must not be consumed (its records could land twice). The process exits non-zero, its
/// partitions move to the group's other members, and Kubernetes restarts it.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("failed to read the committed position of {stream} partition {partition}")]
    ReadPosition {
        stream: String,
        partition: i32,
        // Boxed: the error travels through every `Result` of the loop, most of them `Ok`.
        #[source]
        source: Box<LakeError>,
    },
    #[error("failed to assign partitions")]
    Assign(#[source] rdkafka::error::KafkaError),
    #[error("cannot decode stream {stream}")]
    Decoder {
        stream: String,
        #[source]
        source: DecoderSetupError,
    },
    #[error("failed to subscribe to {topics:?}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("failed to start the flush workers")]
    StartFlushWorkers(#[source] std::io::Error),
    /// A bug in encoding or committing: the partitions of the flush read their ranges again
    /// from the table when the process restarts.
    #[error("a flush panicked: {message}")]
    FlushPanicked { message: String },
}

impl LoopError {
    /// How the service treats it: see the type's documentation.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::ReadPosition { .. }
            | Self::Assign(_)
            | Self::Decoder { .. }
            | Self::Subscribe { .. }
            | Self::StartFlushWorkers(_)
            | Self::FlushPanicked { .. } => ErrorClass::Fatal,
        }
    }
}

pub(crate) struct CompactorLoop {
    pub(crate) consumer: BaseConsumer<RebalanceContext>,
    pub(crate) events_rx: Receiver<RebalanceEvent>,
    pub(crate) handle: Handle,
    pub(crate) lake: Lake,
    pub(crate) streams: HashMap<String, Arc<StreamInfo>>,
    pub(crate) flush: FlushConfig,
    pub(crate) dead_letters: BatchProducer,
    pub(crate) metrics: Arc<CompactorMetrics>,
    pub(crate) health: CompactorHealth,
    pub(crate) writer_id: String,
    /// Shared with the rebalance callback, which waits for the flushes in flight on a revoke.
    pub(crate) flushes_in_flight: FlushesInFlight,
    pub(crate) shutdown: CancellationToken,
}

impl CompactorLoop {
    /// Consumes until shutdown, then flushes and commits what is buffered and waits for every
    /// flush in flight.
    pub(crate) fn run(self) -> Result<(), LoopError> {
        let num_flush_workers = self.flush.num_workers();
        let writer = FlushWriter {
            lake: self.lake.clone(),
            handle: self.handle.clone(),
            writer_id: self.writer_id.clone(),
        };
        let mut pool = FlushPool::start(
            num_flush_workers,
            FlushPolicy::new(&self.flush),
            self.flushes_in_flight.clone(),
            move |job| writer.run(job),
        )
        .map_err(LoopError::StartFlushWorkers)?;
        let topics: Vec<String> = self.streams.keys().cloned().collect();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(source) = self.consumer.subscribe(&topic_refs) {
            pool.stop();
            return Err(LoopError::Subscribe { topics, source });
        }
        tracing::info!(?topics, writer_id = %self.writer_id, num_flush_workers, "compactor consuming");
        self.health.set_consuming(true);
        let mut partitions: HashMap<(String, i32), PartitionState> = HashMap::new();
        let mut last_trigger_check = Instant::now();
        let mut last_position_check = Instant::now();
        let mut key: (String, i32) = (String::new(), -1);
        let mut num_records_since_checks = RECORDS_BETWEEN_CHECKS;
        let result = loop {
            let checks_due = num_records_since_checks >= RECORDS_BETWEEN_CHECKS;
            if checks_due {
                num_records_since_checks = 0;
                // Answers first: a partition whose flush answered may hand off its next one, and
                // a failed flush rewinds its partition (dropping what was buffered after the
                // range it handed off), as though the answer had come a few records later.
                self.apply_outcomes(&mut partitions, &mut pool);
                if let Some(message) = pool.take_panic_message() {
                    break Err(LoopError::FlushPanicked { message });
                }
            }
            // Every turn: a rewind or a revoke that failed stops the loop before it buffers
            // another record.
            if self.shutdown.is_cancelled() {
                break Ok(());
            }
            let polled = self.consumer.poll(POLL_TIMEOUT);
            if let Err(error) = self.apply_rebalance_events(&mut partitions, &mut pool) {
                break Err(error);
            }
            match polled {
                Some(Ok(message)) => {
                    num_records_since_checks += 1;
                    // One key, rewritten when the partition changes: consecutive messages mostly
                    // share a partition, so the per-message path allocates nothing.
                    if key.1 != message.partition() || key.0 != message.topic() {
                        key.0.clear();
                        key.0.push_str(message.topic());
                        key.1 = message.partition();
                    }
                    if let Some(state) = partitions.get_mut(&key) {
                        if !self.buffer_message(state, &message, &mut pool) {
                            // Shutdown interrupted a dead-letter write; the record is read again later.
                            break Ok(());
                        }
                        // With a flush in flight the buffer grows past the size until its answer is applied.
                        if !state.buffer.has_flush_in_flight()
                            && FlushPolicy::new(&self.flush).is_full(state.buffer.num_value_bytes())
                        {
                            self.flush_partition(&key, state, &mut pool);
                        }
                    }
                }
                Some(Err(error)) => {
                    num_records_since_checks = RECORDS_BETWEEN_CHECKS;
                    tracing::warn!(error = %sluice_errors::Chain(&error), "Kafka consumer error")
                }
                None => num_records_since_checks = RECORDS_BETWEEN_CHECKS,
            }
            if !checks_due {
                continue;
            }
            if last_trigger_check.elapsed() >= TRIGGER_CHECK_INTERVAL {
                last_trigger_check = Instant::now();
                self.flush_due(&mut partitions, &mut pool);
                // It applied answers while it waited for room: their panics next turn.
                num_records_since_checks = RECORDS_BETWEEN_CHECKS;
            }
            if last_position_check.elapsed() >= NEW_POSITION_CHECK_INTERVAL {
                last_position_check = Instant::now();
                self.check_for_new_positions(&mut partitions);
            }
        };
        self.health.set_consuming(false);
        // Flush what is buffered: the range is committed now rather than read again later.
        self.flush_remaining(&mut partitions, &mut pool);
        pool.stop();
        self.consumer.unsubscribe();
        tracing::info!("compactor stopped consuming");
        result
    }

    /// Adds one record to its partition's buffer; every [`DECODE_CHUNK_VALUES`] records the
    /// buffer is decoded and the undecodable ones dead-lettered. Returns false when shutdown
    /// interrupted a dead-letter write.
    fn buffer_message(
        &self,
        state: &mut PartitionState,
        message: &BorrowedMessage<'_>,
        pool: &mut FlushPool,
    ) -> bool {
        let offset = message.offset();
        if state.beyond_end_opt.is_some() {
            // Fetched before the pause took effect; read again from the position recorded next.
            return true;
        }
        if offset < state.buffer.next_offset() {
            // Kafka does not hand out a record below the position the consumer was told to start
            // from, unless the partition's offsets went backwards: after an offset-out-of-range
            // reset the broker lost its records (replaced by an empty one, restored from
            // nothing, topic recreated). Skipping them would lose the readings the new log holds,
            // so the partition stops and waits for an operator. If the statistics show that the
            // broker does hold the position after all, it goes on by itself.
            self.stop_beyond_end(message.topic(), message.partition(), state, offset, pool);
            return true;
        }
        let payload = message.payload().unwrap_or_default();
        let edge_opt = edge_origin(message);
        state.buffer.push_record(offset, message.key().unwrap_or_default(), payload, edge_opt, Instant::now);
        if state.buffer.pending().len() >= DECODE_CHUNK_VALUES {
            return self.decode_pending(message.topic(), message.partition(), state);
        }
        true
    }

    /// Decodes the records set aside, buffers their rows and dead-letters the ones that do not
    /// decode. Returns false when shutdown interrupted a dead-letter write: the buffer then ends
    /// before that record, which is read again by whoever resumes the partition.
    pub(crate) fn decode_pending(&self, topic: &str, partition: i32, state: &mut PartitionState) -> bool {
        if state.buffer.pending().is_empty() {
            return true;
        }
        let pending = state.buffer.pending();
        let values: Vec<&[u8]> = pending.values().collect();
        let decoded = state.decoder.decode(&values);
        let batch = decoded.batch;
        // Rows come in record order, one per record the decoder did not refuse.
        let mut row_records = Vec::with_capacity(batch.num_rows());
        let mut refused_by_decoder = decoded.rejected.iter().map(|(index, _)| *index).peekable();
        for index in 0..values.len() {
            if refused_by_decoder.next_if_eq(&index).is_none() {
                row_records.push(index);
            }
        }
        let event_times = event_times_micros(&batch).unwrap_or_default();
        // A row whose event time no partition can hold (any i64 can be in Kafka: records of older
        // ingest versions, or of other producers) is refused like one that does not decode.
        let mut refused: Vec<(usize, String)> = decoded.rejected;
        let mut row_refused = vec![false; batch.num_rows()];
        debug_assert_eq!(row_records.len(), batch.num_rows(), "one row per record not refused");
        for (row, &event_time) in event_times.iter().enumerate() {
            if let Err(error) = PartitionKey::try_for_event_time(event_time, state.stream.granularity)
                && let Some(&record) = row_records.get(row)
            {
                row_refused[row] = true;
                refused.push((record, error.to_string()));
            }
        }
        refused.sort_by_key(|(index, _)| *index);
        let mut completed = true;
        // Records from this index on stay unread: a dead letter could not be written.
        let mut cut = values.len();
        let mut unread_from_opt = None;
        let mut num_dead_lettered = 0;
        for (index, reason) in &refused {
            let (offset, key, value) = pending.record(*index);
            let source = dead_letter_source(topic, partition, offset);
            if !self.dead_letter(&state.stream, key, value, reason, &source) {
                cut = *index;
                unread_from_opt = Some(offset);
                completed = false;
                break;
            }
            num_dead_lettered += 1;
        }
        // The kept rows as zero-copy slices of the decoded batch, one per run of kept rows.
        let is_read = |row: usize| row_records.get(row).is_some_and(|&record| record < cut);
        let mut row = 0;
        while row < batch.num_rows() && is_read(row) {
            if row_refused[row] {
                row += 1;
                continue;
            }
            let run_start = row;
            while row < batch.num_rows() && is_read(row) && !row_refused[row] {
                row += 1;
            }
            let kept = batch.slice(run_start, row - run_start);
            let kept_times = event_times.get(run_start..row).unwrap_or_default();
            state.buffer.push_rows(kept, kept_times, state.stream.granularity);
        }
        // Applied once the dead letters are written: the pending records are borrowed until then.
        state.buffer.finish_decoding(num_dead_lettered, unread_from_opt);
        completed
    }
}

// A huge age setting means "never", not an overflow: millis_to_micros saturates.
pub(crate) use sluice_clock::{millis_to_micros, now_micros};

/// Where a record central ingest produced for an edge gateway comes from; none for a record
/// without the gateway and a position that is a number at or above 0 (such a record is kept). A
/// record without the request's floor (from a central before it was written) is taken as its
/// own request's first.
fn edge_origin<'a>(message: &'a BorrowedMessage<'_>) -> Option<EdgeMark<'a>> {
    let headers = message.headers()?;
    let number = |value: Option<&[u8]>| {
        value
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|text| text.parse::<i64>().ok())
            .filter(|number| *number >= 0)
    };
    let mut edge_id_opt = None;
    let mut position_opt = None;
    let mut floor_opt = None;
    for header in headers.iter() {
        match header.key {
            EDGE_ID_HEADER => edge_id_opt = header.value.and_then(|value| std::str::from_utf8(value).ok()),
            EDGE_POSITION_HEADER => position_opt = number(header.value),
            EDGE_FLOOR_HEADER => floor_opt = number(header.value),
            _ => {}
        }
    }
    let position = position_opt?;
    Some(EdgeMark { edge_id: edge_id_opt?, position, floor: floor_opt.unwrap_or(position) })
}
