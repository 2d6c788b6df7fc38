//! Flushing: when buffers are due (the checks on age, scatter and memory that [`FlushPolicy`]
//! decides), how the loop hands them to the flush workers and applies their answers, and how a
//! worker turns them into a Delta commit. The files go to their final paths first, where no
//! Delta reader sees them, then one commit per job adds them and moves each partition's
//! position; the Kafka offset commit after it is advisory. A partition whose flush fails, or
//! whose position another writer moved, drops its buffer and reads again from the table's
//! position.
//!
//! A partition has at most one flush in flight. Its buffer continues after the range handed off
//! as though it were committed, so the next flush states that range's end as the position it
//! starts from, and is handed off only once the answer came: the partition's commits land in
//! offset order, and the table's position check (`Lake::create_commits`) refuses anything else.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use sluice_lake::{CommitRecord, CommittedFile, Lake, NewFile};
use tokio::runtime::Handle;

use crate::buffer::{HandedOff, PartitionState};
use crate::consumer::{CompactorLoop, STORE_RETRY_BACKOFF, StreamInfo, now_micros};
use crate::fault::FaultPoint;
use crate::flush_policy::FlushPolicy;
use crate::flush_pool::{
    FlushJob, FlushOutcome, FlushPart, FlushPool, OUTCOME_WAIT, PartOutcome, PartResult,
};
use crate::parquet_file::encode_partitioned;

/// A partition's flush whose files are uploaded, waiting for its commit.
struct PreparedFlush {
    record: CommitRecord,
    new_files: Vec<NewFile>,
    started: Instant,
}

impl CompactorLoop {
    /// The periodic check: hands off the buffers due on age or scatter (or size, reached while
    /// the partition's previous flush was in flight), then the largest ones while buffers and
    /// flushes in flight together are over the memory budget, and waits for flushes to answer
    /// until they are not.
    pub(crate) fn flush_due(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        pool: &mut FlushPool,
    ) {
        let policy = FlushPolicy::new(&self.flush);
        let mut due = Vec::new();
        for (key, state) in partitions.iter_mut() {
            // Open partitions are known only for decoded rows. The age is read after decoding,
            // which can take a while for a large buffer.
            self.decode_pending(&key.0, key.1, state);
            let is_due = policy.is_due(&state.buffer.buffer_state(), Instant::now())
                || policy.is_full(state.buffer.num_value_bytes());
            if is_due && !state.buffer.has_flush_in_flight() {
                due.push(key.clone());
            }
        }
        self.flush_keys(partitions, pool, &due);
        loop {
            // A buffer whose partition has a flush in flight cannot go yet: it counts, like the
            // flushes in flight, as memory no flush chosen now frees.
            let mut num_other_bytes = pool.num_in_flight_bytes();
            let mut sizes: Vec<((String, i32), usize)> = Vec::with_capacity(partitions.len());
            for (key, state) in partitions.iter() {
                if state.buffer.has_flush_in_flight() {
                    num_other_bytes += state.buffer.num_value_bytes();
                } else {
                    sizes.push((key.clone(), state.buffer.num_value_bytes()));
                }
            }
            // Sorted by key so that equal sizes are chosen the same way every time.
            sizes.sort();
            for key in policy.over_budget(&sizes, num_other_bytes) {
                if let Some(state) = partitions.get_mut(&key) {
                    self.flush_partition(&key, state, pool);
                }
            }
            let num_buffered_bytes: usize =
                partitions.values().map(|state| state.buffer.num_value_bytes()).sum();
            let num_held_bytes = num_buffered_bytes + pool.num_in_flight_bytes();
            if !policy.is_over_budget(num_held_bytes) || !pool.has_flushes_in_flight() {
                self.metrics.set_buffered_bytes(num_held_bytes);
                return;
            }
            // Consumption waits for an answer; the partition it frees is chosen again at once,
            // so that the workers are not left idle until every flush in flight answered.
            pool.wait_for_outcome(OUTCOME_WAIT);
            self.apply_outcomes(partitions, pool);
        }
    }

    /// Hands off the buffers of `keys` whose partitions have no flush in flight; those of one
    /// stream share a commit, spread over at most one job per worker so that a group that came
    /// due together is encoded on every core. Returns the number of jobs handed off.
    pub(crate) fn flush_keys(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        pool: &mut FlushPool,
        keys: &[(String, i32)],
    ) -> usize {
        let mut by_stream: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
        for key in keys {
            if let Some(state) = partitions.get(key)
                && !state.buffer.has_flush_in_flight()
            {
                by_stream.entry(state.stream.stream.clone()).or_default().push(key.clone());
            }
        }
        let mut num_jobs = 0;
        for mut stream_keys in by_stream.into_values() {
            stream_keys.sort();
            let keys_per_job = stream_keys.len().div_ceil(pool.num_workers().max(1)).max(1);
            for job_keys in stream_keys.chunks(keys_per_job) {
                let flush_id = pool.next_flush_id();
                let mut stream_opt = None;
                let mut parts = Vec::with_capacity(job_keys.len());
                for key in job_keys {
                    let Some(state) = partitions.get_mut(key) else { continue };
                    if let Some(part) = self.take_flush(key, state, flush_id) {
                        stream_opt.get_or_insert_with(|| Arc::clone(&state.stream));
                        parts.push(part);
                    }
                }
                if let Some(stream) = stream_opt {
                    pool.submit(FlushJob { flush_id, stream, parts });
                    num_jobs += 1;
                }
            }
        }
        num_jobs
    }

    /// Hands off one partition's buffer in a commit of its own (size, memory, a partition that
    /// stops), unless its previous flush has not answered yet: the buffer then waits for a check
    /// after the answer.
    pub(crate) fn flush_partition(
        &self,
        key: &(String, i32),
        state: &mut PartitionState,
        pool: &mut FlushPool,
    ) {
        let flush_id = pool.next_flush_id();
        if let Some(part) = self.take_flush(key, state, flush_id) {
            pool.submit(FlushJob { flush_id, stream: Arc::clone(&state.stream), parts: vec![part] });
        }
    }

    /// Decodes what waits (dead-lettering what does not decode, here on the loop's thread) and
    /// takes the buffer for flush `flush_id`; `None` when nothing is uncommitted or the
    /// partition's previous flush is still in flight.
    fn take_flush(
        &self,
        key: &(String, i32),
        state: &mut PartitionState,
        flush_id: u64,
    ) -> Option<FlushPart> {
        if state.buffer.has_flush_in_flight() {
            return None;
        }
        self.decode_pending(&key.0, key.1, state);
        let taken = state.buffer.hand_off(flush_id)?;
        Some(FlushPart { key: key.clone(), taken })
    }

    /// At shutdown: hands off every buffer and waits until every flush answered. A partition
    /// whose flush was in flight hands off the rest once that one committed, or drops it when it
    /// did not.
    pub(crate) fn flush_remaining(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        pool: &mut FlushPool,
    ) {
        loop {
            self.apply_outcomes(partitions, pool);
            let buffered: Vec<(String, i32)> = partitions
                .iter()
                .filter(|(_, state)| state.buffer.has_uncommitted() && !state.buffer.has_flush_in_flight())
                .map(|(key, _)| key.clone())
                .collect();
            let num_jobs = self.flush_keys(partitions, pool, &buffered);
            if num_jobs == 0 && !pool.has_flushes_in_flight() {
                return;
            }
            pool.wait_for_outcome(OUTCOME_WAIT);
        }
    }

    /// Applies every answer the workers sent so far; never blocks.
    pub(crate) fn apply_outcomes(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        pool: &mut FlushPool,
    ) {
        while let Some(outcome) = pool.next_outcome() {
            self.apply_outcome(partitions, outcome);
        }
    }

    /// Applies a worker's answer. A commit lets the partition's next flush go (its buffer already
    /// continues after the range), and moves Kafka's offset; a flush that failed or lost to
    /// another writer rewinds the partition to the table's position, dropping what was read after
    /// the range. An answer to a flush that is no longer in flight here (its partition was
    /// revoked, or rewound since) changes no partition's state.
    fn apply_outcome(&self, partitions: &mut HashMap<(String, i32), PartitionState>, outcome: FlushOutcome) {
        let FlushOutcome { flush_id, stream, parts, .. } = outcome;
        for PartOutcome { key, result } in parts {
            let state_opt = partitions.get_mut(&key).filter(|state| state.buffer.is_in_flight(flush_id));
            match result {
                PartResult::Committed { record, table_version, elapsed } => {
                    let file_sizes: Vec<u64> = record.files.iter().map(|file| file.size_bytes).collect();
                    self.metrics.record_flush(&stream, key.1, record.num_rows(), &file_sizes, elapsed);
                    self.metrics.record_repeats_dropped(&stream, "same_flush", record.num_duplicates_dropped);
                    self.metrics.record_repeats_dropped(
                        &stream,
                        "edge_retry",
                        record.num_edge_repeats_dropped,
                    );
                    if let Some(max_event_time) = record.max_event_time_micros_opt {
                        self.metrics.record_committed_event_time(&stream, key.1, max_event_time);
                    }
                    tracing::debug!(%stream, partition = key.1, table_version, num_rows = record.num_rows(), num_files = record.files.len(), "committed");
                    if let Some(state) = state_opt {
                        state.buffer.flush_committed();
                        self.commit_kafka_offset(&key, record.end_offset);
                    }
                }
                PartResult::Stale => {
                    self.metrics.record_commit_conflict(&stream);
                    if let Some(state) = state_opt {
                        self.rewind(&key, state);
                    }
                }
                PartResult::Failed => {
                    if let Some(state) = state_opt {
                        self.rewind(&key, state);
                    }
                }
            }
        }
    }

    /// Forgets the buffer, and the flush in flight if any, and continues from the latest commit
    /// in the store.
    pub(crate) fn rewind(&self, key: &(String, i32), state: &mut PartitionState) {
        let latest = match self.handle.block_on(self.lake.latest_commit(&state.stream.stream, key.1)) {
            Ok(latest) => latest,
            Err(error) => {
                tracing::error!(partition = key.1, error = %sluice_errors::Chain(&error), "failed to read the committed position; stopping");
                // The buffer continues after a flush that failed: nothing of this partition may
                // be committed on the way out, or a range would be committed without the rows
                // before it. Whoever owns it next reads it from the table.
                state.buffer.drop_range();
                self.shutdown.cancel();
                return;
            }
        };
        state.buffer.reset_to(latest.as_ref());
        let offset =
            latest.as_ref().map_or(Offset::Beginning, |position| Offset::Offset(position.end_offset));
        if let Err(error) = self.consumer.seek(&key.0, key.1, offset, Duration::from_secs(10)) {
            tracing::error!(topic = %key.0, partition = key.1, error = %sluice_errors::Chain(&error), "failed to seek; stopping");
            // The consumer still reads after the failed range: records it hands out before the
            // loop stops would follow the table's position with a gap, so nothing of this
            // partition is committed on the way out.
            state.buffer.drop_range();
            self.shutdown.cancel();
            return;
        }
        if state.beyond_end_opt.is_some() {
            // The lake's position changed while the partition waited (a reset record won the
            // race against this flush): try the new position.
            self.resume_partition(key, state);
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

/// What a flush worker writes with: the lake, the runtime its store calls run on, and the
/// writer id its commits name.
#[derive(Debug, Clone)]
pub(crate) struct FlushWriter {
    pub(crate) lake: Lake,
    pub(crate) handle: Handle,
    pub(crate) writer_id: String,
}

impl FlushWriter {
    /// Runs on a flush worker: encodes and uploads each partition's rows, then commits those
    /// that made it in one Delta commit. A partition whose encoding or upload fails, or whose
    /// position moved (another writer owns it), is answered as such; the others commit.
    pub(crate) fn run(&self, job: FlushJob) -> FlushOutcome {
        let FlushJob { flush_id, stream, parts } = job;
        let _flush_span =
            tracing::info_span!("flush", stream = %stream.stream, num_partitions = parts.len()).entered();
        let mut outcomes: Vec<PartOutcome> = Vec::with_capacity(parts.len());
        let mut prepared: Vec<((String, i32), PreparedFlush)> = Vec::with_capacity(parts.len());
        for FlushPart { key, taken } in parts {
            match self.prepare(&stream, &key, taken) {
                Some(flush) => prepared.push((key, flush)),
                None => outcomes.push(PartOutcome { key, result: PartResult::Failed }),
            }
        }
        if !prepared.is_empty() {
            outcomes.extend(self.commit(&stream.stream, prepared));
        }
        FlushOutcome { flush_id, stream: stream.stream.clone(), parts: outcomes, panic_message_opt: None }
    }

    /// Commits uploaded flushes of one stream in one Delta commit.
    fn commit(&self, stream: &str, prepared: Vec<((String, i32), PreparedFlush)>) -> Vec<PartOutcome> {
        let flushes: Vec<(CommitRecord, Vec<NewFile>)> =
            prepared.iter().map(|(_, flush)| (flush.record.clone(), flush.new_files.clone())).collect();
        FaultPoint::AfterUpload.reached();
        let committed = tracing::info_span!("commit", num_flushes = flushes.len())
            .in_scope(|| self.handle.block_on(self.lake.create_commits(stream, &flushes)));
        if committed.as_ref().is_ok_and(|landed| landed.version_opt.is_some()) {
            FaultPoint::AfterCommit.reached();
        }
        if let Err(error) = &committed {
            // The commit may have landed before the error (a lost answer): the files then belong
            // to the table, and the janitor only deletes files no version adds. The partitions
            // read their positions again after the back-off.
            tracing::error!(stream, error = %sluice_errors::Chain(&error), "failed to commit to the table; re-reading the ranges");
            std::thread::sleep(STORE_RETRY_BACKOFF);
        }
        prepared
            .into_iter()
            .map(|(key, flush)| {
                let result = match &committed {
                    Ok(landed) if !landed.stale_partitions.contains(&key.1) => {
                        if let Some(at) = flush.record.edge_positions_at_opt {
                            // The commit points at the new file now; no commit can point at an
                            // older one again. A file left here is only space.
                            let deleted =
                                self.handle.block_on(self.lake.delete_edge_positions_before(stream, key.1, at));
                            if let Err(error) = deleted {
                                tracing::debug!(stream, partition = key.1, error = %sluice_errors::Chain(&error), "failed to delete older edge positions; the next flush tries again");
                            }
                        }
                        PartResult::Committed {
                            table_version: landed.version_opt.unwrap_or(-1),
                            elapsed: flush.started.elapsed(),
                            record: Box::new(flush.record),
                        }
                    }
                    Ok(_) => {
                        // Another instance committed this partition: it owns it now, or owned
                        // it while we still thought we did. Its commits win; our files go.
                        tracing::warn!(
                            stream,
                            partition = key.1,
                            start_offset = flush.record.start_offset,
                            "commit conflict: another writer moved this partition's position; reloading"
                        );
                        self.delete_written(&flush.new_files);
                        PartResult::Stale
                    }
                    Err(_) => PartResult::Failed,
                };
                PartOutcome { key, result }
            })
            .collect()
    }

    /// Encodes a partition's rows and uploads its files to their final paths, where no Delta
    /// reader sees them before the commit adds them. `None` when that failed; the files written
    /// so far are deleted.
    fn prepare(&self, stream: &StreamInfo, key: &(String, i32), taken: HandedOff) -> Option<PreparedFlush> {
        let started = Instant::now();
        let HandedOff {
            batches,
            range,
            previous_end_offset_opt,
            num_dead_lettered,
            max_event_time_micros_opt,
            num_value_bytes: _,
            edge_positions_opt,
            num_edge_repeats_dropped,
        } = taken;
        let num_rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let encoded = tracing::info_span!("encode_parquet", partition = key.1, num_rows).in_scope(|| {
            encode_partitioned(
                &batches,
                stream.granularity,
                &stream.writer_properties,
                stream.encryption_opt.as_ref(),
            )
        });
        drop(batches);
        let (files, num_duplicates_dropped) = match encoded {
            Ok(flush) => (flush.files, flush.num_duplicates_dropped),
            Err(error) => {
                tracing::error!(stream = %stream.stream, partition = key.1, error = %sluice_errors::Chain(&error), "failed to encode Parquet; re-reading the range");
                return None;
            }
        };
        let upload_span = tracing::info_span!("upload", partition = key.1, num_files = files.len()).entered();
        let mut new_files: Vec<NewFile> = Vec::with_capacity(files.len());
        for file in files {
            let file_name = sluice_lake::layout::flush_file_name(key.1, range.start);
            let partition = file.partition.to_string();
            let committed = CommittedFile {
                path: sluice_lake::layout::data_file(&stream.stream, &partition, &file_name),
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
                return None;
            }
            new_files.push(NewFile { file: committed, stats_json: file.stats_json });
        }
        drop(upload_span);
        // The positions go up before the commit that points at them.
        if let Some(edge_positions) = &edge_positions_opt {
            let written = self.handle.block_on(self.lake.write_edge_positions(
                &stream.stream,
                key.1,
                range.end,
                edge_positions,
            ));
            if let Err(error) = written {
                tracing::error!(stream = %stream.stream, partition = key.1, error = %sluice_errors::Chain(&error), "failed to write the edge positions; re-reading the range");
                self.delete_written(&new_files);
                std::thread::sleep(STORE_RETRY_BACKOFF);
                return None;
            }
        }
        let record = CommitRecord {
            stream: stream.stream.clone(),
            topic: stream.topic.clone(),
            kafka_partition: key.1,
            previous_end_offset_opt,
            start_offset: range.start,
            end_offset: range.end,
            files: new_files.iter().map(|new_file| new_file.file.clone()).collect(),
            num_dead_lettered,
            num_duplicates_dropped: num_duplicates_dropped as u64,
            edge_positions_at_opt: edge_positions_opt.as_ref().map(|_| range.end),
            num_edge_repeats_dropped,
            max_event_time_micros_opt,
            writer_id: self.writer_id.clone(),
            created_at_micros: now_micros(),
            reset_opt: None,
            table_version_opt: None,
        };
        Some(PreparedFlush { record, new_files, started })
    }

    /// Deletes files of a flush that did not commit; one left behind is the janitor's.
    fn delete_written(&self, new_files: &[NewFile]) {
        for new_file in new_files {
            if let Err(error) = self.handle.block_on(self.lake.delete(&new_file.file.path)) {
                tracing::debug!(path = %new_file.file.path, error = %sluice_errors::Chain(&error), "failed to delete an uncommitted file; the janitor removes it");
            }
        }
    }
}
