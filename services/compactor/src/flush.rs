//! Flushing: when buffers are due (the checks on age, scatter and memory that
//! [`FlushPolicy`] decides), and how a partition's buffer becomes a Delta commit. The files go to
//! their final paths first, where no Delta reader sees them, then one commit per stream adds
//! them and moves each partition's position; the Kafka offset commit after it is advisory. A
//! partition whose flush fails, or whose position another writer moved, drops its buffer and
//! reads again from the table's position.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use sluice_lake::{CommitRecord, CommittedFile, CommittedPosition, NewFile};

use crate::buffer::PartitionState;
use crate::consumer::{CompactorLoop, STORE_RETRY_BACKOFF, now_micros};
use crate::fault::FaultPoint;
use crate::flush_policy::FlushPolicy;
use crate::parquet_file::encode_partitioned;

/// Partitions of one stream whose buffers are flushed together.
type FlushBatch<'a> = Vec<(&'a (String, i32), &'a mut PartitionState)>;

/// A partition's flush whose files are uploaded, waiting for its commit.
struct PreparedFlush {
    record: CommitRecord,
    new_files: Vec<NewFile>,
    started: Instant,
}

impl CompactorLoop {
    /// The periodic check: flushes the buffers due on age or scatter, then the largest ones
    /// while all of them together are over the memory budget.
    pub(crate) fn flush_due(&self, partitions: &mut HashMap<(String, i32), PartitionState>) {
        let policy = FlushPolicy::new(&self.flush);
        let mut due = Vec::new();
        for (key, state) in partitions.iter_mut() {
            // Open partitions are known only for decoded rows. The age is read after decoding,
            // which can take a while for a large buffer.
            self.decode_pending(&key.0, key.1, state);
            if policy.is_due(&state.buffer.buffer_state(), Instant::now()) {
                due.push(key.clone());
            }
        }
        self.flush_keys(partitions, &due);
        // Sorted by key so that equal sizes are chosen the same way every time.
        let mut sizes: Vec<((String, i32), usize)> =
            partitions.iter().map(|(key, state)| (key.clone(), state.buffer.num_value_bytes())).collect();
        sizes.sort();
        for key in policy.over_budget(&sizes) {
            if let Some(state) = partitions.get_mut(&key) {
                self.flush_partition(&key, state);
            }
        }
        self.metrics
            .set_buffered_bytes(partitions.values().map(|state| state.buffer.num_value_bytes()).sum());
    }

    /// Flushes the buffers of `keys`, those of one stream in one commit.
    pub(crate) fn flush_keys(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        keys: &[(String, i32)],
    ) {
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

    pub(crate) fn flush_partition(&self, key: &(String, i32), state: &mut PartitionState) {
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
                    state.buffer.reset_to(Some(&CommittedPosition {
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
        let range = state.buffer.uncommitted_range()?;
        let started = Instant::now();
        let stream = Arc::clone(&state.stream);
        let num_rows = state.buffer.num_buffered_rows();
        let batches = state.buffer.take_batches();
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
                self.rewind(key, state);
                return None;
            }
            new_files.push(NewFile { file: committed, stats_json: file.stats_json });
        }
        drop(upload_span);
        let max_event_time_micros_opt = state.buffer.max_event_time_micros_opt();
        let record = CommitRecord {
            stream: stream.stream.clone(),
            topic: stream.topic.clone(),
            kafka_partition: key.1,
            previous_end_offset_opt: state.buffer.committed_opt(),
            start_offset: range.start,
            end_offset: range.end,
            files: new_files.iter().map(|new_file| new_file.file.clone()).collect(),
            num_dead_lettered: state.buffer.num_dead_lettered(),
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
    pub(crate) fn rewind(&self, key: &(String, i32), state: &mut PartitionState) {
        let latest = match self.handle.block_on(self.lake.latest_commit(&state.stream.stream, key.1)) {
            Ok(latest) => latest,
            Err(error) => {
                tracing::error!(partition = key.1, error = %sluice_errors::Chain(&error), "failed to read the committed position; stopping");
                // The buffer may be gone already (taken by the flush that failed): nothing of
                // this partition may be committed on the way out, or its range would be
                // committed without its rows. Whoever owns it next reads it from the table.
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
            self.shutdown.cancel();
            return;
        }
        if state.beyond_end_opt.is_some() {
            // The lake's position changed while the partition waited (a reset record won the
            // race against this flush): try the new position.
            self.resume_partition(key, state);
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
