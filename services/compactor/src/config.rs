//! Configuration of the compactor (`sluice-compactor --config compactor.toml`); every key is in
//! docs/operations.md and deploy/config/compactor.toml.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, Validate};
use sluice_health::HealthConfig;
use sluice_kafka::KafkaConfig;
use sluice_lake::encryption::EncryptionConfig;
use sluice_lake::{ObjectStoreConfig, PartitionGranularity};
use sluice_schema::SchemasConfig;
use sluice_telemetry::TelemetryConfig;

/// The most flush workers a compactor starts.
pub const MAX_FLUSH_WORKERS: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactorConfig {
    pub compactor: CompactorSection,
    pub flush: FlushConfig,
    pub parquet: ParquetConfig,
    pub janitor: JanitorConfig,
    pub table: TableConfig,
    pub merge: MergeConfig,
    pub watermark: WatermarkConfig,
    pub schemas: SchemasConfig,
    pub object_store: ObjectStoreConfig,
    pub encryption: EncryptionConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    pub health: HealthConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactorSection {
    /// Kafka consumer group; replicas with the same group split the partitions.
    pub group_id: String,
    /// Streams to compact; empty means every stream in the schema directory.
    pub streams: Vec<String>,
    /// Event-time partitioning per stream; streams not listed use `default_granularity`.
    pub granularity: BTreeMap<String, PartitionGranularity>,
    pub default_granularity: PartitionGranularity,
    /// Names this instance in the commits it makes; empty means a random id per process.
    pub instance_id: String,
}

impl Default for CompactorSection {
    fn default() -> Self {
        Self {
            group_id: "sluice-compactor".to_string(),
            streams: Vec::new(),
            granularity: BTreeMap::new(),
            default_granularity: PartitionGranularity::Hour,
            instance_id: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// A Kafka partition's buffer is flushed when its records reach this many bytes (Avro
    /// size; the Parquet files are smaller).
    pub target_file_bytes: usize,
    /// ... or when its oldest buffered record is this old, so data is queryable within it.
    pub max_age_ms: u64,
    /// Bound on all buffers and the flushes in flight together; past it the largest buffer is
    /// flushed first, and consumption waits for flushes to finish.
    pub max_buffered_bytes: usize,
    /// Bound on distinct event-time partitions buffered per Kafka partition (late data).
    pub max_open_partitions: usize,
    /// Threads that encode, upload and commit flushes while the loop goes on consuming; 0 means
    /// one per core the process may run on.
    pub workers: usize,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            target_file_bytes: 128 * 1024 * 1024,
            max_age_ms: 60_000,
            max_buffered_bytes: 512 * 1024 * 1024,
            max_open_partitions: 48,
            workers: 0,
        }
    }
}

impl FlushConfig {
    /// How many flush workers to start: `workers`, or with 0 the cores this process may run on
    /// (its CPU affinity and cgroup quota count), 1 if that cannot be read.
    pub fn num_workers(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParquetCompression {
    Zstd,
    Snappy,
    Lz4,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    pub compression: ParquetCompression,
    /// zstd level, 1-22.
    pub compression_level: i32,
    /// A row group is the unit one core reads. Smaller groups spread an hour's file over more
    /// cores but compress worse: 131,072 rows wrote 10% more bytes than this default, for query
    /// times within noise (docs/benchmarks.md).
    pub row_group_rows: usize,
    /// A bloom filter on device_id, for point lookups of one device.
    pub device_bloom_filter: bool,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        Self {
            compression: ParquetCompression::Zstd,
            compression_level: 3,
            row_group_rows: 1_048_576,
            device_bloom_filter: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JanitorConfig {
    /// How often files that no table version needs are looked for.
    pub interval_ms: u64,
    /// Data files that no table version adds (a flush or merge that never committed) are
    /// deleted once older than this; younger ones may belong to a commit in progress.
    pub min_age_ms: u64,
    /// Files a merge removed from the table are deleted this long after the merge, so that a
    /// query reading an older version still finds them (VACUUM's retention).
    pub removed_retention_ms: u64,
}

impl Default for JanitorConfig {
    fn default() -> Self {
        Self { interval_ms: 600_000, min_age_ms: 3_600_000, removed_retention_ms: 86_400_000 }
    }
}

/// Settings of the Delta tables the compactor creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// A checkpoint every this many commits (`delta.checkpointInterval`, set when a table is
    /// created): loading a snapshot then reads one checkpoint and at most this many commits.
    pub checkpoint_interval: u64,
    /// Log entries older than this go when a checkpoint is written (`delta.logRetentionDuration`,
    /// set when a table is created): how far back time travel and the table's history reach.
    pub log_retention_ms: u64,
}

impl Default for TableConfig {
    fn default() -> Self {
        let settings = sluice_lake::TableSettings::default();
        Self {
            checkpoint_interval: settings.checkpoint_interval,
            log_retention_ms: settings.log_retention_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MergeConfig {
    pub enabled: bool,
    /// How often closed partitions are looked at.
    pub interval_ms: u64,
    /// A partition is merged once its end (hour or day) is this far in the past, so that late
    /// data has mostly arrived.
    pub min_partition_age_ms: u64,
    /// Committed files smaller than this are merged.
    pub small_file_bytes: usize,
    /// Upper bound on the inputs of one merge, in bytes.
    pub target_file_bytes: usize,
    pub max_files_per_merge: usize,
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 300_000,
            min_partition_age_ms: 3_600_000,
            small_file_bytes: 16 * 1024 * 1024,
            target_file_bytes: 128 * 1024 * 1024,
            max_files_per_merge: 200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatermarkConfig {
    /// How often each stream's watermark is computed from its table's log and published.
    pub interval_ms: u64,
    /// Subtracted from the slowest partition's committed event time: how late (in event time,
    /// behind its partition) a record may arrive and still count as on time.
    pub allowed_lateness_ms: u64,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        Self { interval_ms: 10_000, allowed_lateness_ms: 60_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time allowed after SIGTERM to flush and commit what is buffered.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_ms: 60_000 }
    }
}

impl CompactorConfig {
    /// The Kafka consumer settings the compactor runs with: the passthrough map, the enforced
    /// offset settings, then the compactor's tuning wherever the map does not set it. Public so
    /// that the throughput benchmark's plain consumer fetches exactly as the compactor does.
    pub fn consumer_client_config(&self) -> rdkafka::ClientConfig {
        let mut consumer_config = self.kafka.consumer_config(&self.compactor.group_id);
        // librdkafka 2.x pauses fetching a partition for fetch.queue.backoff.ms (1 s) whenever its
        // local queue is full; a consumer that decodes and writes is slower than fetching, so it
        // would starve for a second each time.
        self.kafka.set_defaults(
            &mut consumer_config,
            [
                ("auto.offset.reset", "earliest"),
                ("fetch.queue.backoff.ms", "10"),
                ("statistics.interval.ms", "10000"),
            ],
        );
        consumer_config
    }
}

impl Validate for CompactorConfig {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        issues.extend(self.kafka.validate("kafka"));
        issues.extend(self.telemetry.validate("telemetry"));
        issues.extend(self.object_store.validate("object_store"));
        issues.extend(self.encryption.validate("encryption", true));
        issues.extend(self.health.validate("health"));
        if self.compactor.group_id.is_empty() {
            issues.push(ConfigIssue::new("compactor.group_id", "must be set"));
        }
        let flush = &self.flush;
        if flush.target_file_bytes == 0 {
            issues.push(ConfigIssue::new("flush.target_file_bytes", "must be greater than 0"));
        }
        if flush.max_age_ms == 0 {
            issues.push(ConfigIssue::new("flush.max_age_ms", "must be greater than 0"));
        }
        // Each worker holds a flush's Arrow rows, their sorted copy and the Parquet output beside
        // the budgeted bytes; far more workers than cores only multiplies that memory.
        if flush.workers > MAX_FLUSH_WORKERS {
            issues.push(ConfigIssue::new(
                "flush.workers",
                format!("must be at most {MAX_FLUSH_WORKERS} (0: one per core)"),
            ));
        }
        if flush.max_buffered_bytes < flush.target_file_bytes {
            issues.push(ConfigIssue::new(
                "flush.max_buffered_bytes",
                format!("must be at least flush.target_file_bytes ({})", flush.target_file_bytes),
            ));
        }
        if flush.max_open_partitions == 0 {
            issues.push(ConfigIssue::new("flush.max_open_partitions", "must be greater than 0"));
        }
        if self.parquet.compression == ParquetCompression::Zstd
            && !(1..=22).contains(&self.parquet.compression_level)
        {
            issues.push(ConfigIssue::new("parquet.compression_level", "zstd levels are 1 to 22"));
        }
        if self.janitor.interval_ms == 0 {
            issues.push(ConfigIssue::new("janitor.interval_ms", "must be greater than 0"));
        }
        if self.janitor.min_age_ms < 2 * self.flush.max_age_ms {
            issues.push(ConfigIssue::new(
                "janitor.min_age_ms",
                format!("must be at least twice flush.max_age_ms ({}) so that flushes in progress are not touched", self.flush.max_age_ms),
            ));
        }
        if self.watermark.interval_ms == 0 {
            issues.push(ConfigIssue::new("watermark.interval_ms", "must be greater than 0"));
        }
        // Checkpoints keep a removed file's tombstone for Delta's default
        // `delta.deletedFileRetentionDuration` (7 days); past it the janitor could not tell a
        // removed file from one no version ever added, and would delete it early.
        if self.janitor.removed_retention_ms > 7 * 86_400_000 {
            issues
                .push(ConfigIssue::new("janitor.removed_retention_ms", "must be at most 7 days (604800000)"));
        }
        if self.table.checkpoint_interval == 0 {
            issues.push(ConfigIssue::new("table.checkpoint_interval", "must be greater than 0"));
        }
        if self.table.log_retention_ms == 0 {
            issues.push(ConfigIssue::new("table.log_retention_ms", "must be greater than 0"));
        }
        if self.merge.interval_ms == 0 {
            issues.push(ConfigIssue::new("merge.interval_ms", "must be greater than 0"));
        }
        if self.merge.max_files_per_merge < 2 {
            issues.push(ConfigIssue::new("merge.max_files_per_merge", "must be at least 2"));
        }
        if self.merge.target_file_bytes < self.merge.small_file_bytes {
            issues
                .push(ConfigIssue::new("merge.target_file_bytes", "must be at least merge.small_file_bytes"));
        }
        if self.parquet.row_group_rows == 0 {
            issues.push(ConfigIssue::new("parquet.row_group_rows", "must be greater than 0"));
        }
        // The rebalance callback loads each assigned partition's position before `assign` takes
        // the whole new assignment, and hands the janitor over on revocation: eager rebalancing.
        // librdkafka refuses `assign` under the cooperative protocol, so every replica would stop.
        if let Some(strategy) = self.kafka.client.0.get("partition.assignment.strategy")
            && strategy.contains("cooperative")
        {
            issues.push(ConfigIssue::new(
                "kafka.client.\"partition.assignment.strategy\"",
                format!("the compactor rebalances eagerly: use range or roundrobin, not '{strategy}'"),
            ));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(CompactorConfig::default().validate(), Vec::new());
    }

    #[test]
    fn shipped_example_config_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/compactor.toml");
        let figment = sluice_config::figment_for::<CompactorConfig>(Some(&path)).expect("file exists");
        let config: CompactorConfig = sluice_config::load_from_figment(figment).expect("valid");
        assert_eq!(config.compactor.group_id, "sluice-compactor");
    }

    #[test]
    fn flush_bounds_are_checked_together() {
        let mut config = CompactorConfig::default();
        config.flush.max_buffered_bytes = 1;
        config.parquet.compression_level = 40;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["flush.max_buffered_bytes", "parquet.compression_level"]);
    }

    #[test]
    fn consumer_settings_tune_fetching_unless_the_passthrough_map_says_otherwise() {
        let mut config = CompactorConfig::default();
        let shipped = config.consumer_client_config();
        assert_eq!(shipped.get("group.id"), Some("sluice-compactor"));
        assert_eq!(shipped.get("enable.auto.commit"), Some("false"));
        assert_eq!(shipped.get("fetch.queue.backoff.ms"), Some("10"));
        config.kafka.client.0.insert("fetch.queue.backoff.ms".into(), "100".into());
        assert_eq!(config.consumer_client_config().get("fetch.queue.backoff.ms"), Some("100"));
    }

    #[test]
    fn flush_workers_default_to_the_cores() {
        let mut flush = FlushConfig::default();
        assert!(flush.num_workers() >= 1);
        flush.workers = 3;
        assert_eq!(flush.num_workers(), 3);
    }

    #[test]
    fn cooperative_rebalancing_is_refused() {
        let mut config = CompactorConfig::default();
        for (strategy, refused) in
            [("cooperative-sticky", true), ("range", false), ("roundrobin,range", false)]
        {
            config.kafka.client.0.insert("partition.assignment.strategy".into(), strategy.into());
            let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
            assert_eq!(
                keys.iter().any(|key| key.contains("partition.assignment.strategy")),
                refused,
                "{strategy}"
            );
        }
    }
}
