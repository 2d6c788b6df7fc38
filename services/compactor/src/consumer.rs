//! The consumer loop: reads the stream topics, buffers rows per Kafka partition, and flushes
//! each buffer as one Delta commit (files at their final paths, then one commit adding them and
//! moving the partition's position).
//!
//! It runs on one blocking thread and calls the object store through the runtime handle. That
//! keeps every state change in one place: rdkafka runs the rebalance callback inside `poll` on
//! this thread, so a revoked partition's buffer is dropped before the loop can flush it, and an
//! assigned partition starts at the position its table's latest version holds, read from the
//! store before the assignment takes effect. Kafka's own committed offsets are written afterwards for
//! lag dashboards only; they are never read back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use parquet::file::properties::WriterProperties;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sluice_kafka::{BatchProducer, BatchRecord};
use sluice_lake::{
    CommitRecord, CommittedFile, CommittedPosition, Lake, NewFile, PartitionGranularity, PartitionKey,
};
use sluice_schema::{DecoderSetupError, StreamDecoder, StreamSchema, event_times_micros};
use sluice_shutdown::CancellationToken;
use tokio::runtime::Handle;

use crate::config::FlushConfig;
use crate::fault::FaultPoint;
use crate::flush_policy::{BufferState, FlushPolicy};
use crate::janitor::JanitorStreams;
use crate::metrics::CompactorMetrics;
use crate::parquet_file::encode_partitioned;
use crate::supervision::CompactorHealth;

pub use sluice_kafka::headers::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER};

const POLL_TIMEOUT: Duration = Duration::from_millis(100);
const TRIGGER_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often a partition waiting beyond the broker's end looks for a new position in the lake.
const NEW_POSITION_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const STORE_RETRY_BACKOFF: Duration = Duration::from_secs(1);
const ASSIGN_LOAD_ATTEMPTS: u32 = 5;
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
}

#[derive(Debug)]
pub(crate) enum RebalanceEvent {
    Assigned(Vec<(String, i32, Option<CommittedPosition>)>),
    Revoked(Vec<(String, i32)>),
    Failed(String),
    /// From librdkafka's statistics: per partition, the high watermark of the last fetch
    /// response and the fetch position at the same moment.
    BrokerEnds(Vec<BrokerEnd>),
}

#[derive(Debug)]
pub(crate) struct BrokerEnd {
    topic: String,
    partition: i32,
    high_watermark: i64,
    fetch_position: i64,
    fetching: bool,
}

pub(crate) struct RebalanceContext {
    lake: Lake,
    handle: Handle,
    streams_by_topic: HashMap<String, String>,
    events_tx: Sender<RebalanceEvent>,
    metrics: Arc<CompactorMetrics>,
    janitor_streams: JanitorStreams,
}

impl ClientContext for RebalanceContext {
    /// librdkafka's periodic statistics carry each assigned partition's lag.
    /// ... and the high watermark of the last fetch response, which says whether the lake's
    /// committed position is beyond the broker's end (ListOffsets is not used for that: Tansu's
    /// memory storage answers it wrongly, while its fetch responses carry the right value).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut broker_ends = Vec::new();
        for (topic, topic_statistics) in &statistics.topics {
            for (partition, partition_statistics) in &topic_statistics.partitions {
                // -1 marks partitions not assigned here, and the internal UA partition.
                if *partition >= 0 && partition_statistics.consumer_lag >= 0 {
                    self.metrics.record_consumer_lag(topic, *partition, partition_statistics.consumer_lag);
                }
                // Negative values mean "no fetch response yet".
                if *partition >= 0
                    && partition_statistics.hi_offset >= 0
                    && partition_statistics.next_offset >= 0
                {
                    broker_ends.push(BrokerEnd {
                        topic: topic.clone(),
                        partition: *partition,
                        high_watermark: partition_statistics.hi_offset,
                        fetch_position: partition_statistics.next_offset,
                        fetching: partition_statistics.fetch_state == "active",
                    });
                }
            }
        }
        if !broker_ends.is_empty() {
            let _ = self.events_tx.send(RebalanceEvent::BrokerEnds(broker_ends));
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let elements: Vec<(String, i32)> = partitions
            .elements()
            .iter()
            .map(|element| (element.topic().to_string(), element.partition()))
            .collect();
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = Vec::with_capacity(elements.len());
                for (topic, partition) in elements {
                    let stream = self.streams_by_topic.get(&topic).cloned().unwrap_or_default();
                    let latest = match self.load_latest_commit(&stream, partition) {
                        Ok(latest) => latest,
                        Err(message) => {
                            let _ = self.events_tx.send(RebalanceEvent::Failed(message));
                            let _ = consumer.assign(&TopicPartitionList::new());
                            return;
                        }
                    };
                    let offset =
                        latest.as_ref().map_or(Offset::Beginning, |record| Offset::Offset(record.end_offset));
                    if let Err(error) = partitions.set_partition_offset(&topic, partition, offset) {
                        tracing::error!(%topic, partition, error = %sluice_errors::Chain(&error), "failed to set the start offset");
                    }
                    assigned.push((topic, partition, latest));
                }
                if let Err(error) = consumer.assign(partitions) {
                    let _ = self
                        .events_tx
                        .send(RebalanceEvent::Failed(format!("failed to assign partitions: {error}")));
                    return;
                }
                for (topic, partition, _) in &assigned {
                    if let Some(stream) = self.streams_by_topic.get(topic) {
                        self.janitor_streams.assigned(stream, *partition);
                    }
                }
                let _ = self.events_tx.send(RebalanceEvent::Assigned(assigned));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Before the partitions go, so that the next owner of partition 0 is the only
                // janitor once it gets it.
                for (topic, partition) in &elements {
                    if let Some(stream) = self.streams_by_topic.get(topic) {
                        self.janitor_streams.revoked(stream, *partition);
                    }
                }
                let _ = self.events_tx.send(RebalanceEvent::Revoked(elements));
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(error = %sluice_errors::Chain(&error), "failed to unassign revoked partitions");
                }
            }
            other => tracing::error!(error = ?other, "rebalance failed"),
        }
    }
}

impl RebalanceContext {
    pub(crate) fn new(
        lake: Lake,
        handle: Handle,
        streams_by_topic: HashMap<String, String>,
        metrics: Arc<CompactorMetrics>,
        janitor_streams: JanitorStreams,
    ) -> (Self, Receiver<RebalanceEvent>) {
        let (events_tx, events_rx) = std::sync::mpsc::channel();
        (Self { lake, handle, streams_by_topic, events_tx, metrics, janitor_streams }, events_rx)
    }

    /// Runs inside `poll` on the loop's blocking thread, so waiting on the store is allowed here.
    fn load_latest_commit(&self, stream: &str, partition: i32) -> Result<Option<CommittedPosition>, String> {
        let mut attempt = 0;
        loop {
            match self.handle.block_on(self.lake.latest_commit(stream, partition)) {
                Ok(latest) => return Ok(latest),
                Err(error) if attempt + 1 < ASSIGN_LOAD_ATTEMPTS => {
                    tracing::warn!(stream, partition, error = %sluice_errors::Chain(&error), "failed to read the committed position; retrying");
                    attempt += 1;
                    std::thread::sleep(STORE_RETRY_BACKOFF);
                }
                Err(error) => {
                    return Err(format!(
                        "failed to read the committed position of {stream} partition {partition}: {error}"
                    ));
                }
            }
        }
    }
}

impl StreamInfo {
    pub(crate) fn decoder(&self) -> Result<StreamDecoder, DecoderSetupError> {
        StreamDecoder::new(Arc::clone(&self.reader), &self.writers)
    }
}

/// Records consumed but not decoded yet, copied out of librdkafka's buffers.
#[derive(Default)]
struct PendingValues {
    bytes: Vec<u8>,
    /// Per record: offset, key range and value range in `bytes`.
    records: Vec<(i64, std::ops::Range<usize>, std::ops::Range<usize>)>,
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
}

/// Partitions of one stream whose buffers are flushed together.
type FlushBatch<'a> = Vec<(&'a (String, i32), &'a mut PartitionState)>;

/// A partition's flush whose files are uploaded, waiting for its commit.
struct PreparedFlush {
    record: CommitRecord,
    new_files: Vec<NewFile>,
    started: Instant,
}

/// Buffered, not yet committed state of one assigned Kafka partition.
struct PartitionState {
    stream: Arc<StreamInfo>,
    decoder: StreamDecoder,
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
    /// The broker's end offset when the committed position was found beyond it: the partition
    /// is paused until an operator records a new position (docs/operations.md).
    beyond_end_opt: Option<i64>,
    /// The previous statistics already showed the fetch position beyond the broker's end.
    seen_beyond_end: bool,
}

impl PartitionState {
    fn new(stream: Arc<StreamInfo>, latest: Option<&CommittedPosition>) -> Result<Self, DecoderSetupError> {
        let decoder = stream.decoder()?;
        let mut state = Self {
            stream,
            decoder,
            pending: PendingValues::default(),
            batches: Vec::new(),
            num_value_bytes: 0,
            committed_opt: None,
            range_start_opt: None,
            next_offset: 0,
            open_partitions: BTreeSet::new(),
            first_buffered_at_opt: None,
            num_dead_lettered: 0,
            committed_max_event_time_opt: None,
            buffered_max_event_time_opt: None,
            beyond_end_opt: None,
            seen_beyond_end: false,
        };
        state.reset_to(latest);
        Ok(state)
    }

    /// Drops everything buffered and continues after `latest`.
    fn reset_to(&mut self, latest: Option<&CommittedPosition>) {
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

    fn num_buffered_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    fn has_uncommitted(&self) -> bool {
        self.range_start_opt.is_some_and(|start| self.next_offset > start)
    }

    fn buffer_state(&self) -> BufferState {
        BufferState {
            first_buffered_at_opt: self.first_buffered_at_opt,
            num_open_partitions: self.open_partitions.len(),
            num_value_bytes: self.num_value_bytes,
            has_uncommitted: self.has_uncommitted(),
        }
    }
}

/// Why the loop stopped consuming.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("{0}")]
    Rebalance(String),
    #[error("failed to subscribe to {topics:?}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: rdkafka::error::KafkaError,
    },
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
    pub(crate) shutdown: CancellationToken,
}

impl CompactorLoop {
    /// Consumes until shutdown, then flushes and commits what is buffered.
    pub(crate) fn run(self) -> Result<(), LoopError> {
        let topics: Vec<String> = self.streams.keys().cloned().collect();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topic_refs)
            .map_err(|source| LoopError::Subscribe { topics: topics.clone(), source })?;
        tracing::info!(?topics, writer_id = %self.writer_id, "compactor consuming");
        self.health.set_consuming(true);
        let mut partitions: HashMap<(String, i32), PartitionState> = HashMap::new();
        let mut last_trigger_check = Instant::now();
        let mut last_position_check = Instant::now();
        let result = loop {
            if self.shutdown.is_cancelled() {
                break Ok(());
            }
            let polled = self.consumer.poll(POLL_TIMEOUT);
            if let Err(error) = self.apply_rebalance_events(&mut partitions) {
                break Err(error);
            }
            match polled {
                Some(Ok(message)) => {
                    let key = (message.topic().to_string(), message.partition());
                    if let Some(state) = partitions.get_mut(&key) {
                        if !self.buffer_message(state, &message) {
                            // Shutdown interrupted a dead-letter write; the record is read again later.
                            break Ok(());
                        }
                        if FlushPolicy::new(&self.flush).is_full(state.num_value_bytes) {
                            self.flush_partition(&key, state);
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %sluice_errors::Chain(&error), "Kafka consumer error")
                }
                None => {}
            }
            if last_trigger_check.elapsed() >= TRIGGER_CHECK_INTERVAL {
                last_trigger_check = Instant::now();
                self.flush_due(&mut partitions);
            }
            if last_position_check.elapsed() >= NEW_POSITION_CHECK_INTERVAL {
                last_position_check = Instant::now();
                self.check_for_new_positions(&mut partitions);
            }
        };
        self.health.set_consuming(false);
        // Flush what is buffered: the range is committed now rather than read again later.
        let buffered: Vec<(String, i32)> = partitions
            .iter()
            .filter(|(_, state)| state.has_uncommitted())
            .map(|(key, _)| key.clone())
            .collect();
        self.flush_keys(&mut partitions, &buffered);
        self.consumer.unsubscribe();
        tracing::info!("compactor stopped consuming");
        result
    }

    fn apply_rebalance_events(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
    ) -> Result<(), LoopError> {
        while let Ok(event) = self.events_rx.try_recv() {
            match event {
                RebalanceEvent::Assigned(assigned) => {
                    for (topic, partition, latest) in assigned {
                        let Some(stream) = self.streams.get(&topic) else { continue };
                        if let Some(max_event_time) =
                            latest.as_ref().and_then(|position| position.max_event_time_micros_opt)
                        {
                            self.metrics.record_committed_event_time(
                                &stream.stream,
                                partition,
                                max_event_time,
                            );
                        }
                        tracing::info!(%topic, partition, start_offset = latest.as_ref().map_or(-1, |position| position.end_offset), "partition assigned");
                        let state = PartitionState::new(Arc::clone(stream), latest.as_ref())
                            .map_err(|error| LoopError::Rebalance(error.to_string()))?;
                        self.metrics.record_position_beyond_end(&stream.stream, partition, 0);
                        partitions.insert((topic, partition), state);
                    }
                    // An empty assignment counts too: the group has more members than partitions,
                    // and this one knows it has nothing to do.
                    self.health.set_assigned(true);
                }
                RebalanceEvent::BrokerEnds(broker_ends) => self.apply_broker_ends(partitions, broker_ends),
                RebalanceEvent::Revoked(revoked) => {
                    self.health.set_assigned(false);
                    for key in revoked {
                        if let Some(state) = partitions.remove(&key) {
                            // The gauge would otherwise keep its last value in this instance.
                            self.metrics.record_position_beyond_end(&state.stream.stream, key.1, 0);
                            let dropped_records = state.num_buffered_rows() + state.pending.records.len();
                            self.metrics
                                .record_revoked_uncommitted(&state.stream.stream, dropped_records as u64);
                            tracing::info!(topic = %key.0, partition = key.1, dropped_records, "partition revoked; uncommitted rows dropped");
                        }
                    }
                }
                RebalanceEvent::Failed(message) => return Err(LoopError::Rebalance(message)),
            }
        }
        Ok(())
    }

    /// Adds one record to its partition's buffer; every [`DECODE_CHUNK_VALUES`] records the
    /// buffer is decoded and the undecodable ones dead-lettered. Returns false when shutdown
    /// interrupted a dead-letter write.
    fn buffer_message(&self, state: &mut PartitionState, message: &BorrowedMessage<'_>) -> bool {
        let offset = message.offset();
        if state.beyond_end_opt.is_some() {
            // Fetched before the pause took effect; read again from the position recorded next.
            return true;
        }
        if offset < state.next_offset {
            // Kafka does not hand out a record below the position the consumer was told to start
            // from, unless the partition's offsets went backwards: after an offset-out-of-range
            // reset the broker lost its records (replaced by an empty one, restored from
            // nothing, topic recreated). Skipping them would lose the readings the new log holds,
            // so the partition stops and waits for an operator. If the statistics show that the
            // broker does hold the position after all, it goes on by itself.
            self.stop_beyond_end(message.topic(), message.partition(), state, offset);
            return true;
        }
        state.range_start_opt.get_or_insert(offset);
        let payload = message.payload().unwrap_or_default();
        state.pending.push(offset, message.key().unwrap_or_default(), payload);
        state.num_value_bytes += payload.len();
        state.next_offset = offset + 1;
        state.first_buffered_at_opt.get_or_insert_with(Instant::now);
        if state.pending.records.len() >= DECODE_CHUNK_VALUES {
            return self.decode_pending(message.topic(), message.partition(), state);
        }
        true
    }

    /// Decodes the records set aside, buffers their rows and dead-letters the ones that do not
    /// decode. Returns false when shutdown interrupted a dead-letter write: the buffer then ends
    /// before that record, which is read again by whoever resumes the partition.
    fn decode_pending(&self, topic: &str, partition: i32, state: &mut PartitionState) -> bool {
        if state.pending.records.is_empty() {
            return true;
        }
        let pending = &state.pending;
        let values: Vec<&[u8]> =
            pending.records.iter().map(|(_, _, value)| &pending.bytes[value.clone()]).collect();
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
        for (index, reason) in &refused {
            let (offset, key, value) = &pending.records[*index];
            let source = format!("kafka:{topic}/{partition}@{offset}");
            if !self.dead_letter(
                &state.stream,
                &pending.bytes[key.clone()],
                &pending.bytes[value.clone()],
                reason,
                &source,
            ) {
                cut = *index;
                state.next_offset = *offset;
                completed = false;
                break;
            }
            state.num_dead_lettered += 1;
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
            for &event_time in kept_times {
                state
                    .open_partitions
                    .insert(PartitionKey::for_event_time(event_time, state.stream.granularity));
            }
            if let Some(&max) = kept_times.iter().max() {
                state.buffered_max_event_time_opt =
                    Some(state.buffered_max_event_time_opt.map_or(max, |buffered| buffered.max(max)));
            }
            state.batches.push(kept);
        }
        state.pending.clear();
        completed
    }

    /// Writes a record that cannot be decoded to the dead-letter topic and waits for Kafka's
    /// acknowledgement, retrying until it succeeds; false if shutdown came first.
    fn dead_letter(
        &self,
        stream: &StreamInfo,
        key: &[u8],
        payload: &[u8],
        reason: &str,
        source: &str,
    ) -> bool {
        tracing::warn!(stream = %stream.stream, %source, %reason, "record cannot be compacted; dead-lettering it");
        loop {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header { key: DEAD_LETTER_REASON_HEADER, value: Some(reason) })
                .insert(Header { key: DEAD_LETTER_SOURCE_HEADER, value: Some(source) });
            let record = BatchRecord {
                key,
                value: payload,
                timestamp_millis: now_micros() / 1_000,
                headers_opt: Some(headers),
            };
            let delivered =
                match self.dead_letters.send_batch(&stream.dead_letter_topic, std::iter::once(record)) {
                    Ok(batch) => self
                        .handle
                        .block_on(BatchProducer::wait(&batch, Duration::from_secs(30)))
                        .is_some_and(|outcome| outcome.num_failed == 0),
                    Err(_) => false,
                };
            if delivered {
                self.metrics.record_dead_letter(&stream.stream);
                return true;
            }
            if self.shutdown.is_cancelled() {
                return false;
            }
            tracing::warn!(topic = %stream.dead_letter_topic, "failed to write a dead letter; retrying");
            std::thread::sleep(STORE_RETRY_BACKOFF);
        }
    }

    fn flush_due(&self, partitions: &mut HashMap<(String, i32), PartitionState>) {
        let policy = FlushPolicy::new(&self.flush);
        let mut due = Vec::new();
        for (key, state) in partitions.iter_mut() {
            // Open partitions are known only for decoded rows. The age is read after decoding,
            // which can take a while for a large buffer.
            self.decode_pending(&key.0, key.1, state);
            if policy.is_due(&state.buffer_state(), Instant::now()) {
                due.push(key.clone());
            }
        }
        self.flush_keys(partitions, &due);
        // Sorted by key so that equal sizes are chosen the same way every time.
        let mut sizes: Vec<((String, i32), usize)> =
            partitions.iter().map(|(key, state)| (key.clone(), state.num_value_bytes)).collect();
        sizes.sort();
        for key in policy.over_budget(&sizes) {
            if let Some(state) = partitions.get_mut(&key) {
                self.flush_partition(&key, state);
            }
        }
        self.metrics.set_buffered_bytes(partitions.values().map(|state| state.num_value_bytes).sum());
    }

    /// Flushes the buffers of `keys`, those of one stream in one commit.
    fn flush_keys(&self, partitions: &mut HashMap<(String, i32), PartitionState>, keys: &[(String, i32)]) {
        if keys.is_empty() {
            return;
        }
        let mut by_stream: BTreeMap<String, FlushBatch<'_>> = BTreeMap::new();
        for (key, state) in partitions.iter_mut().filter(|(key, _)| keys.contains(key)) {
            by_stream.entry(state.stream.stream.clone()).or_default().push((key, state));
        }
        for batch in by_stream.into_values() {
            self.flush_batch(batch);
        }
    }

    fn flush_partition(&self, key: &(String, i32), state: &mut PartitionState) {
        self.flush_batch(vec![(key, state)]);
    }

    /// Commits the buffered ranges of partitions of one stream in one Delta commit. A partition
    /// whose encoding or upload fails, or whose position moved (another writer owns it), drops
    /// its buffer and reads the range again from the table's position; the others commit.
    fn flush_batch(&self, mut batch: FlushBatch<'_>) {
        let Some(stream) = batch.first().map(|(_, state)| Arc::clone(&state.stream)) else { return };
        let _flush_span =
            tracing::info_span!("flush", stream = %stream.stream, num_partitions = batch.len()).entered();
        let mut prepared: Vec<(usize, PreparedFlush)> = Vec::with_capacity(batch.len());
        for (index, (key, state)) in batch.iter_mut().enumerate() {
            if let Some(flush) = self.prepare_flush(key, state) {
                prepared.push((index, flush));
            }
        }
        if prepared.is_empty() {
            return;
        }
        let flushes: Vec<(CommitRecord, Vec<NewFile>)> =
            prepared.iter().map(|(_, flush)| (flush.record.clone(), flush.new_files.clone())).collect();
        FaultPoint::AfterUpload.reached();
        let committed = tracing::info_span!("commit", num_flushes = flushes.len())
            .in_scope(|| self.handle.block_on(self.lake.create_commits(&stream.stream, &flushes)));
        if committed.as_ref().is_ok_and(|committed| committed.version_opt.is_some()) {
            FaultPoint::AfterCommit.reached();
        }
        if let Err(error) = &committed {
            // The commit may have landed before the error (a lost answer): the files then belong
            // to the table, and the janitor only deletes files no version adds.
            tracing::error!(stream = %stream.stream, error = %sluice_errors::Chain(&error), "failed to commit to the table; re-reading the ranges");
            std::thread::sleep(STORE_RETRY_BACKOFF);
        }
        for (index, flush) in prepared {
            let (key, state) = &mut batch[index];
            match &committed {
                Ok(committed) if !committed.stale_partitions.contains(&key.1) => {
                    let version = committed.version_opt.unwrap_or(-1);
                    let record = &flush.record;
                    let file_sizes: Vec<u64> = record.files.iter().map(|file| file.size_bytes).collect();
                    self.metrics.record_flush(
                        &stream.stream,
                        key.1,
                        record.num_rows(),
                        &file_sizes,
                        flush.started.elapsed(),
                    );
                    if let Some(max_event_time) = record.max_event_time_micros_opt {
                        self.metrics.record_committed_event_time(&stream.stream, key.1, max_event_time);
                    }
                    tracing::debug!(stream = %stream.stream, partition = key.1, table_version = version, num_rows = record.num_rows(), num_files = record.files.len(), "committed");
                    state.reset_to(Some(&CommittedPosition {
                        end_offset: record.end_offset,
                        max_event_time_micros_opt: record.max_event_time_micros_opt,
                        table_version: version,
                    }));
                    self.commit_kafka_offset(key, record.end_offset);
                }
                Ok(_) => {
                    // Another instance committed this partition: it owns it now, or owned it
                    // while we still thought we did. Its commits win; our files are deleted.
                    self.metrics.record_commit_conflict(&stream.stream);
                    tracing::warn!(stream = %stream.stream, partition = key.1, start_offset = flush.record.start_offset, "commit conflict: another writer moved this partition's position; reloading");
                    self.delete_written(&flush.new_files);
                    self.rewind(key, state);
                }
                Err(_) => self.rewind(key, state),
            }
        }
    }

    /// Encodes a partition's buffer and uploads its files to their final paths, where no Delta
    /// reader sees them before the commit adds them. On failure the buffer is dropped and the
    /// range is read again.
    fn prepare_flush(&self, key: &(String, i32), state: &mut PartitionState) -> Option<PreparedFlush> {
        self.decode_pending(&key.0, key.1, state);
        let range_start = state.range_start_opt.filter(|&start| state.next_offset > start)?;
        let started = Instant::now();
        let stream = Arc::clone(&state.stream);
        let num_rows = state.num_buffered_rows();
        let batches = std::mem::take(&mut state.batches);
        let encoded = tracing::info_span!("encode_parquet", partition = key.1, num_rows)
            .in_scope(|| encode_partitioned(&batches, stream.granularity, &stream.writer_properties));
        drop(batches);
        let (files, num_duplicates_dropped) = match encoded {
            Ok(flush) => (flush.files, flush.num_duplicates_dropped),
            Err(error) => {
                tracing::error!(stream = %stream.stream, partition = key.1, error = %sluice_errors::Chain(&error), "failed to encode Parquet; re-reading the range");
                self.rewind(key, state);
                return None;
            }
        };
        let upload_span = tracing::info_span!("upload", partition = key.1, num_files = files.len()).entered();
        let mut new_files: Vec<NewFile> = Vec::with_capacity(files.len());
        for file in files {
            let file_name = Lake::flush_file_name(key.1, range_start);
            let partition = file.partition.to_string();
            let committed = CommittedFile {
                path: Lake::data_file(&stream.stream, &partition, &file_name),
                partition,
                num_rows: file.num_rows as u64,
                size_bytes: file.bytes.len() as u64,
                min_event_time_micros: file.min_event_time_micros,
                max_event_time_micros: file.max_event_time_micros,
            };
            if let Err(error) = self.handle.block_on(self.lake.put(&committed.path, file.bytes)) {
                tracing::error!(stream = %stream.stream, partition = key.1, error = %sluice_errors::Chain(&error), "failed to upload; re-reading the range");
                self.delete_written(&new_files);
                std::thread::sleep(STORE_RETRY_BACKOFF);
                self.rewind(key, state);
                return None;
            }
            new_files.push(NewFile { file: committed, stats_json: file.stats_json });
        }
        drop(upload_span);
        let max_event_time_micros_opt =
            match (state.committed_max_event_time_opt, state.buffered_max_event_time_opt) {
                (Some(committed), Some(buffered)) => Some(committed.max(buffered)),
                (committed, buffered) => committed.or(buffered),
            };
        let record = CommitRecord {
            stream: stream.stream.clone(),
            topic: stream.topic.clone(),
            kafka_partition: key.1,
            previous_end_offset_opt: state.committed_opt,
            start_offset: range_start,
            end_offset: state.next_offset,
            files: new_files.iter().map(|new_file| new_file.file.clone()).collect(),
            num_dead_lettered: state.num_dead_lettered,
            num_duplicates_dropped: num_duplicates_dropped as u64,
            max_event_time_micros_opt,
            writer_id: self.writer_id.clone(),
            created_at_micros: now_micros(),
            reset_opt: None,
            table_version_opt: None,
        };
        Some(PreparedFlush { record, new_files, started })
    }

    /// Forgets the buffer and continues from the latest commit in the store.
    fn rewind(&self, key: &(String, i32), state: &mut PartitionState) {
        let latest = match self.handle.block_on(self.lake.latest_commit(&state.stream.stream, key.1)) {
            Ok(latest) => latest,
            Err(error) => {
                tracing::error!(partition = key.1, error = %sluice_errors::Chain(&error), "failed to read the committed position; stopping");
                // The buffer may be gone already (taken by the flush that failed): nothing of
                // this partition may be committed on the way out, or its range would be
                // committed without its rows. Whoever owns it next reads it from the table.
                state.pending.clear();
                state.batches.clear();
                state.range_start_opt = None;
                self.shutdown.cancel();
                return;
            }
        };
        state.reset_to(latest.as_ref());
        let offset =
            latest.as_ref().map_or(Offset::Beginning, |position| Offset::Offset(position.end_offset));
        if let Err(error) = self.consumer.seek(&key.0, key.1, offset, Duration::from_secs(10)) {
            tracing::error!(topic = %key.0, partition = key.1, error = %sluice_errors::Chain(&error), "failed to seek; stopping");
            self.shutdown.cancel();
            return;
        }
        if state.beyond_end_opt.is_some() {
            // The lake's position changed while the partition waited (a reset record won the
            // race against this flush): try the new position.
            self.resume_partition(key, state);
        }
    }

    /// Stops reading a partition whose committed position is beyond the broker's end, and says
    /// so loudly: error log, `sluice_compactor_position_beyond_end_records`, `/readyz` 503.
    fn stop_beyond_end(&self, topic: &str, partition: i32, state: &mut PartitionState, broker_end: i64) {
        if state.has_uncommitted() {
            // Rows read before the broker lost its records exist nowhere else now.
            self.flush_partition(&(topic.to_string(), partition), state);
        }
        state.beyond_end_opt = Some(broker_end);
        let mut paused = TopicPartitionList::new();
        paused.add_partition(topic, partition);
        if let Err(error) = self.consumer.pause(&paused) {
            tracing::warn!(topic, partition, error = %sluice_errors::Chain(&error), "failed to pause the partition");
        }
        let records_beyond = state.next_offset.saturating_sub(broker_end);
        self.metrics.record_position_beyond_end(&state.stream.stream, partition, records_beyond);
        self.health.set_beyond_end(topic, partition, true);
        tracing::error!(
            stream = %state.stream.stream,
            topic,
            partition,
            committed_position = state.next_offset,
            broker_end,
            "the lake's committed position is beyond the end of the partition on the broker: the broker lost \
             the partition's records (replaced by an empty broker, restored from nothing, or the topic was \
             recreated). The partition is paused so that no new reading is skipped. To read what the broker \
             holds now, record a new position: sluice-compactor reset-position --stream <stream> \
             --partition <partition> --to-offset 0 (docs/operations.md, \"Broker lost a partition's records\")"
        );
    }

    /// Reads a paused partition again from the state's position.
    fn resume_partition(&self, key: &(String, i32), state: &mut PartitionState) {
        state.beyond_end_opt = None;
        state.seen_beyond_end = false;
        let mut resumed = TopicPartitionList::new();
        resumed.add_partition(&key.0, key.1);
        if let Err(error) = self.consumer.resume(&resumed) {
            tracing::warn!(topic = %key.0, partition = key.1, error = %sluice_errors::Chain(&error), "failed to resume the partition");
        }
        self.metrics.record_position_beyond_end(&state.stream.stream, key.1, 0);
        self.health.set_beyond_end(&key.0, key.1, false);
    }

    /// Compares each partition's position with the broker's end from librdkafka's statistics.
    fn apply_broker_ends(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        broker_ends: Vec<BrokerEnd>,
    ) {
        for end in broker_ends {
            let key = (end.topic, end.partition);
            let Some(state) = partitions.get_mut(&key) else { continue };
            match state.beyond_end_opt {
                // A fetch position above the high watermark happens only when the log ends below
                // where the consumer was told to read (Tansu's memory broker answers such fetches
                // with nothing instead of an error). librdkafka keeps a partition's high
                // watermark across assignments, so right after one it can be an old value: only
                // a second report in a row counts.
                None => {
                    let beyond = end.fetching
                        && end.fetch_position > end.high_watermark
                        && end.high_watermark < state.next_offset;
                    if beyond && state.seen_beyond_end {
                        self.stop_beyond_end(&key.0, key.1, state, end.high_watermark);
                    }
                    state.seen_beyond_end = beyond;
                }
                Some(_) if end.high_watermark >= state.next_offset => {
                    tracing::info!(topic = %key.0, partition = key.1, position = state.next_offset, broker_end = end.high_watermark, "the broker holds the committed position after all; reading on");
                    if let Err(error) = self.consumer.seek(
                        &key.0,
                        key.1,
                        Offset::Offset(state.next_offset),
                        Duration::from_secs(10),
                    ) {
                        tracing::warn!(topic = %key.0, partition = key.1, error = %sluice_errors::Chain(&error), "failed to seek");
                        continue;
                    }
                    self.resume_partition(&key, state);
                }
                _ => {}
            }
        }
    }

    /// A partition waiting beyond the broker's end goes on once its committed position changed:
    /// `sluice-compactor reset-position` recorded a new one.
    fn check_for_new_positions(&self, partitions: &mut HashMap<(String, i32), PartitionState>) {
        for (key, state) in partitions.iter_mut().filter(|(_, state)| state.beyond_end_opt.is_some()) {
            let latest = match self.handle.block_on(self.lake.latest_commit(&state.stream.stream, key.1)) {
                Ok(latest) => latest,
                Err(error) => {
                    tracing::warn!(partition = key.1, error = %sluice_errors::Chain(&error), "failed to read the committed position");
                    continue;
                }
            };
            if latest.map(|position| position.end_offset) == state.committed_opt {
                continue;
            }
            tracing::info!(
                topic = %key.0,
                partition = key.1,
                position = latest.as_ref().map_or(0, |position| position.end_offset),
                "a new committed position was recorded; reading from it"
            );
            if state.has_uncommitted() {
                tracing::info!(topic = %key.0, partition = key.1, dropped_records = state.num_buffered_rows(), "uncommitted rows dropped; they are read again if the new position is below them");
            }
            self.rewind(key, state);
        }
    }

    /// Deletes files of a flush that did not commit; one left behind is the janitor's.
    fn delete_written(&self, new_files: &[NewFile]) {
        for new_file in new_files {
            if let Err(error) = self.handle.block_on(self.lake.delete(&new_file.file.path)) {
                tracing::debug!(path = %new_file.file.path, error = %sluice_errors::Chain(&error), "failed to delete an uncommitted file; the janitor removes it");
            }
        }
    }

    fn commit_kafka_offset(&self, key: &(String, i32), end_offset: i64) {
        let mut offsets = TopicPartitionList::new();
        let added: KafkaResult<()> = offsets.add_partition_offset(&key.0, key.1, Offset::Offset(end_offset));
        if added.is_ok()
            && let Err(error) = self.consumer.commit(&offsets, CommitMode::Async)
        {
            tracing::debug!(error = %sluice_errors::Chain(&error), "advisory Kafka offset commit failed");
        }
    }
}

// A huge age setting means "never", not an overflow: millis_to_micros saturates.
pub(crate) use sluice_clock::{millis_to_micros, now_micros};
