//! Every metric the compactor emits, recorded per flush, never per record.

use std::time::Duration;

use opentelemetry::KeyValue;
use sluice_telemetry::{Counter, Gauge, Histogram};

#[derive(Debug)]
pub(crate) struct CompactorMetrics {
    records_written: Counter<u64>,
    repeats_dropped: Counter<u64>,
    bytes_written: Counter<u64>,
    files_written: Counter<u64>,
    file_size: Histogram<u64>,
    flush_duration: Histogram<f64>,
    buffered_bytes: Gauge<u64>,
    dead_lettered: Counter<u64>,
    commit_conflicts: Counter<u64>,
    records_revoked_uncommitted: Counter<u64>,
    /// The same count, readable in-process: a rebalance's cost in records read twice.
    revoked_uncommitted_total: std::sync::atomic::AtomicU64,
    committed_event_time: Gauge<i64>,
    consumer_lag: Gauge<i64>,
    watermark: Gauge<i64>,
    position_beyond_end: Gauge<i64>,
    task_failures: Counter<u64>,
}

impl CompactorMetrics {
    pub(crate) fn new() -> Self {
        let meter = sluice_telemetry::meter("sluice-compactor");
        Self {
            repeats_dropped: meter
                .u64_counter("sluice_compactor_repeats_dropped")
                .with_unit("{record}")
                .with_description(
                    "Readings left out as repeats: of another in the same flush or merge input (same_flush), or \
                     sent again by an edge gateway after a lost answer (edge_retry)",
                )
                .build(),
            records_written: meter
                .u64_counter("sluice_compactor_records_written")
                .with_unit("{record}")
                .build(),
            bytes_written: meter.u64_counter("sluice_compactor_bytes_written").with_unit("By").build(),
            files_written: meter.u64_counter("sluice_compactor_files_written").with_unit("{file}").build(),
            file_size: meter
                .u64_histogram("sluice_compactor_file_size_bytes")
                .with_unit("By")
                .with_boundaries(sluice_telemetry::FILE_SIZE_BUCKETS_BYTES.to_vec())
                .build(),
            flush_duration: meter
                .f64_histogram("sluice_compactor_flush_duration_seconds")
                .with_unit("s")
                .with_boundaries(sluice_telemetry::DURATION_BUCKETS_SECONDS.to_vec())
                .build(),
            buffered_bytes: meter.u64_gauge("sluice_compactor_buffered_bytes").with_unit("By").build(),
            dead_lettered: meter
                .u64_counter("sluice_compactor_records_dead_lettered")
                .with_unit("{record}")
                .build(),
            commit_conflicts: meter
                .u64_counter("sluice_compactor_commit_conflicts")
                .with_unit("{commit}")
                .build(),
            records_revoked_uncommitted: meter
                .u64_counter("sluice_compactor_records_revoked_uncommitted")
                .with_unit("{record}")
                .with_description(
                    "Records a revoked partition held uncommitted: dropped here, read again by its new owner",
                )
                .build(),
            revoked_uncommitted_total: std::sync::atomic::AtomicU64::new(0),
            committed_event_time: meter
                .i64_gauge("sluice_compactor_committed_event_time_seconds")
                .with_unit("s")
                .with_description("Largest event time committed per Kafka partition: the watermark's inputs")
                .build(),
            consumer_lag: meter
                .i64_gauge("sluice_compactor_consumer_lag_records")
                .with_unit("{record}")
                .with_description("Records in the partition not yet consumed (librdkafka statistics)")
                .build(),
            watermark: meter
                .i64_gauge("sluice_compactor_watermark_seconds")
                .with_unit("s")
                .with_description("Completeness watermark of the stream, epoch seconds")
                .build(),
            position_beyond_end: meter
                .i64_gauge("sluice_compactor_position_beyond_end_records")
                .with_unit("{record}")
                .with_description(
                    "How far the lake's committed position of a partition is beyond the broker's end \
                     (0 normally): the broker lost the partition's records, docs/operations.md",
                )
                .build(),
            task_failures: meter
                .u64_counter("sluice_compactor_task_failures")
                .with_unit("{task}")
                .with_description("Tasks of the compactor that failed or panicked; each stops the process")
                .build(),
        }
    }

    /// Exports the event counters at zero for every stream, so that `increase()` and alert rules
    /// see the first dead letter or conflict instead of a series that appears already at one.
    pub(crate) fn start_counters<'a>(&self, streams: impl Iterator<Item = &'a str>) {
        for stream in streams {
            let labels = [KeyValue::new("stream", stream.to_string())];
            self.records_written.add(0, &labels);
            for reason in ["same_flush", "edge_retry"] {
                self.repeats_dropped
                    .add(0, &[KeyValue::new("stream", stream.to_string()), KeyValue::new("reason", reason)]);
            }
            self.bytes_written.add(0, &labels);
            self.files_written.add(0, &labels);
            self.dead_lettered.add(0, &labels);
            self.commit_conflicts.add(0, &labels);
        }
        for task in crate::TASK_NAMES {
            self.task_failures.add(0, &[KeyValue::new("task", task)]);
        }
    }

    pub(crate) fn record_flush(
        &self,
        stream: &str,
        partition: i32,
        num_rows: u64,
        file_sizes: &[u64],
        elapsed: Duration,
    ) {
        let labels = [KeyValue::new("stream", stream.to_string())];
        self.records_written.add(num_rows, &labels);
        self.files_written.add(file_sizes.len() as u64, &labels);
        for &size in file_sizes {
            self.bytes_written.add(size, &labels);
            self.file_size.record(size, &labels);
        }
        self.flush_duration.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("stream", stream.to_string()), KeyValue::new("partition", i64::from(partition))],
        );
    }

    pub(crate) fn record_repeats_dropped(&self, stream: &str, reason: &'static str, num_records: u64) {
        if num_records > 0 {
            self.repeats_dropped.add(
                num_records,
                &[KeyValue::new("stream", stream.to_string()), KeyValue::new("reason", reason)],
            );
        }
    }

    pub(crate) fn record_committed_event_time(&self, stream: &str, partition: i32, event_time_micros: i64) {
        self.committed_event_time.record(
            event_time_micros / 1_000_000,
            &[KeyValue::new("stream", stream.to_string()), KeyValue::new("partition", i64::from(partition))],
        );
    }

    pub(crate) fn record_consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.consumer_lag.record(
            lag,
            &[KeyValue::new("topic", topic.to_string()), KeyValue::new("partition", i64::from(partition))],
        );
    }

    pub(crate) fn record_watermark(&self, stream: &str, watermark_micros: i64) {
        self.watermark.record(watermark_micros / 1_000_000, &[KeyValue::new("stream", stream.to_string())]);
    }

    /// Buffers and flushes in flight together: what `flush.max_buffered_bytes` bounds.
    pub(crate) fn set_buffered_bytes(&self, bytes: usize) {
        self.buffered_bytes.record(bytes as u64, &[]);
    }

    pub(crate) fn record_dead_letter(&self, stream: &str) {
        self.dead_lettered.add(1, &[KeyValue::new("stream", stream.to_string())]);
    }

    /// `records_beyond` is 0 when the partition's committed position is within the broker's log.
    pub(crate) fn record_position_beyond_end(&self, stream: &str, partition: i32, records_beyond: i64) {
        self.position_beyond_end.record(
            records_beyond,
            &[KeyValue::new("stream", stream.to_string()), KeyValue::new("partition", i64::from(partition))],
        );
    }

    pub(crate) fn record_task_failure(&self, task: &'static str) {
        self.task_failures.add(1, &[KeyValue::new("task", task)]);
    }

    pub(crate) fn record_commit_conflict(&self, stream: &str) {
        self.commit_conflicts.add(1, &[KeyValue::new("stream", stream.to_string())]);
    }

    pub(crate) fn record_revoked_uncommitted(&self, stream: &str, num_records: u64) {
        self.records_revoked_uncommitted.add(num_records, &[KeyValue::new("stream", stream.to_string())]);
        self.revoked_uncommitted_total.fetch_add(num_records, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn revoked_uncommitted_total(&self) -> u64 {
        self.revoked_uncommitted_total.load(std::sync::atomic::Ordering::Relaxed)
    }
}
