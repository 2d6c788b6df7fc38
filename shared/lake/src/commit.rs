//! What the lake records besides tables: flush and merge descriptions (kept in the Delta log's
//! `commitInfo`), the watermark cache, and create-once JSON records under `_sluice/`.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("object store operation {operation} failed on {path}")]
    Store {
        operation: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("record {path} is not valid")]
    InvalidCommit {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Delta table {table}")]
    Delta {
        table: String,
        #[source]
        source: Box<deltalake_core::DeltaTableError>,
    },
    #[error("table {table} has no Delta log yet")]
    NoTable { table: String },
    #[error("the schema of table {table} cannot take the stream's: {message}")]
    Schema { table: String, message: String },
}

impl LakeError {
    pub(crate) fn store(operation: &'static str, path: &Path) -> impl FnOnce(object_store::Error) -> Self {
        let path = path.to_string();
        move |source| Self::Store { operation, path, source }
    }

    pub(crate) fn delta(table: &str) -> impl FnOnce(deltalake_core::DeltaTableError) -> Self {
        let table = table.to_string();
        move |source| Self::Delta { table, source: Box::new(source) }
    }
}

pub(crate) type Result<T, E = LakeError> = std::result::Result<T, E>;

/// One data file of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedFile {
    /// Path relative to the lake root: `<stream>/dt=.../hour=.../<name>.parquet`.
    pub path: String,
    /// Hive partition segment, e.g. `dt=2026-11-26/hour=08`.
    pub partition: String,
    pub num_rows: u64,
    pub size_bytes: u64,
    pub min_event_time_micros: i64,
    pub max_event_time_micros: i64,
}

/// What one flush of one Kafka partition committed: the offset range `[start_offset,
/// end_offset)` and the files holding its rows. Kept in the `commitInfo` of the Delta commit
/// that added the files; the partition's position itself is the commit's `txn` action. Records
/// of a partition form a chain: each starts where the previous ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub stream: String,
    pub topic: String,
    pub kafka_partition: i32,
    /// The partition's committed position this flush started from (`None`: nothing committed
    /// yet). The commit is refused unless the table still holds exactly this position.
    pub previous_end_offset_opt: Option<i64>,
    pub start_offset: i64,
    pub end_offset: i64,
    pub files: Vec<CommittedFile>,
    /// Records of the range that could not be decoded and went to the dead-letter topic.
    pub num_dead_lettered: u64,
    /// Records of the range that repeated another reading of the same flush (same device_id,
    /// ts and seq) and were left out.
    #[serde(default)]
    pub num_duplicates_dropped: u64,
    /// Set when this flush wrote the partition's edge positions (docs/delivery-semantics.md, "Edge
    /// gateways"): the end offset naming their file, which the commit then points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_positions_at_opt: Option<i64>,
    /// Records of the range an edge gateway sent again (a position at or below the gateway's
    /// greatest committed one) and were left out.
    #[serde(default)]
    pub num_edge_repeats_dropped: u64,
    /// Largest event time committed in this partition so far (this and earlier records).
    pub max_event_time_micros_opt: Option<i64>,
    /// Which compactor instance wrote it, for operators.
    pub writer_id: String,
    pub created_at_micros: i64,
    /// Set on a record an operator created with `sluice-compactor reset-position`: it commits no
    /// rows and moves the partition's position from the previous record's end to `end_offset`
    /// (`start_offset` equals it), so the chain of ranges has a gap or overlap here on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_opt: Option<PositionReset>,
    /// The table version that committed it, when read back from the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_version_opt: Option<i64>,
}

/// Why and from where a partition's committed position was moved by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionReset {
    /// End offset of the record before the reset.
    pub previous_end_offset: i64,
    pub reason: String,
}

impl CommitRecord {
    pub fn num_rows(&self) -> u64 {
        self.files.iter().map(|file| file.num_rows).sum()
    }

    /// The record that moves a partition's committed position from `current` to `to_offset`,
    /// with no files, keeping the committed event time so that the watermark does not move back.
    #[allow(clippy::too_many_arguments, reason = "one plain record, each field named at the call")]
    pub fn position_reset(
        stream: &str,
        topic: &str,
        kafka_partition: i32,
        current: &crate::CommittedPosition,
        to_offset: i64,
        reason: &str,
        writer_id: &str,
        now_micros: i64,
    ) -> Self {
        Self {
            stream: stream.to_string(),
            topic: topic.to_string(),
            kafka_partition,
            previous_end_offset_opt: Some(current.end_offset),
            start_offset: to_offset,
            end_offset: to_offset,
            files: Vec::new(),
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            // The edge positions stay where the table has them.
            edge_positions_at_opt: None,
            num_edge_repeats_dropped: 0,
            max_event_time_micros_opt: current.max_event_time_micros_opt,
            writer_id: writer_id.to_string(),
            created_at_micros: now_micros,
            reset_opt: Some(PositionReset {
                previous_end_offset: current.end_offset,
                reason: reason.to_string(),
            }),
            table_version_opt: None,
        }
    }
}

/// A small-file merge: `inputs` (files of one Hive partition) were replaced by `output`, in one
/// Delta commit whose `commitInfo` keeps this record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub stream: String,
    pub partition: String,
    pub inputs: Vec<CommittedFile>,
    pub output: CommittedFile,
    pub writer_id: String,
    pub created_at_micros: i64,
}

/// A stream's completeness watermark as the compactor published it (`Lake::watermark`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedWatermark {
    pub stream: String,
    /// Epoch microseconds; see docs/delivery-semantics.md for what it promises.
    pub watermark_micros: i64,
    pub allowed_lateness_micros: i64,
    pub num_partitions: i32,
    pub computed_at_micros: i64,
}

/// Whether a create-once record was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Created,
    /// A record is already there: another writer created it first.
    Conflict,
}

/// The lake in one object store, under one root.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    root: Path,
    multipart_threshold_bytes: usize,
}

/// Default size from which uploads are multipart, and of each part.
pub const DEFAULT_MULTIPART_THRESHOLD_BYTES: usize = 64 * 1024 * 1024;

impl Lake {
    pub fn new(store: Arc<dyn ObjectStore>, root: Path) -> Self {
        Self { store, root, multipart_threshold_bytes: DEFAULT_MULTIPART_THRESHOLD_BYTES }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// A path relative to the lake root, as an absolute store path.
    pub fn absolute(&self, relative: &str) -> Path {
        relative
            .split('/')
            .filter(|part| !part.is_empty())
            .fold(self.root.clone(), |path, part| path.join(part))
    }

    /// Writes bytes to a path relative to the root (data files, merged files, results). Files of at
    /// least the multipart threshold go up as multipart uploads, in parts of that size (5 MiB at
    /// least).
    pub async fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.absolute(relative);
        if bytes.len() < self.multipart_threshold_bytes {
            self.store.put(&path, PutPayload::from(bytes)).await.map_err(LakeError::store("put", &path))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(LakeError::store("start multipart upload", &path))?;
        // S3 refuses parts below 5 MiB except the last one.
        let part_bytes = self.multipart_threshold_bytes.max(5 * 1024 * 1024);
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, part_bytes);
        writer.put(bytes::Bytes::from(bytes));
        writer.finish().await.map_err(LakeError::store("multipart upload", &path))?;
        Ok(())
    }

    /// Uploads of at least this many bytes use multipart uploads (S3 parts must be 5 MiB or more,
    /// but for the last).
    pub fn with_multipart_threshold(mut self, multipart_threshold_bytes: usize) -> Self {
        self.multipart_threshold_bytes = multipart_threshold_bytes.max(1);
        self
    }

    /// Reads a path relative to the root.
    pub async fn get(&self, relative: &str) -> Result<bytes::Bytes> {
        let path = self.absolute(relative);
        let result = self.store.get(&path).await.map_err(LakeError::store("get", &path))?;
        result.bytes().await.map_err(LakeError::store("read", &path))
    }

    fn watermark_path(&self, stream: &str) -> Path {
        self.absolute(&layout::watermark_record(stream))
    }

    /// Writes the stream's watermark where the executor looks for it, overwriting whatever is
    /// there without comparing. Every replica publishes the watermark of the table version it
    /// loaded, so one that loaded an older version can put an older value over a newer one until
    /// the next publication. That is tolerable because the file is only a cache: a value that went
    /// back makes the executor wait longer for a window, never run one early, and the exact
    /// watermark comes from the log ([`Lake::watermark`]).
    pub async fn publish_watermark(&self, watermark: &PublishedWatermark) -> Result<()> {
        let path = self.watermark_path(&watermark.stream);
        let bytes = serde_json::to_vec_pretty(watermark)
            .map_err(|source| LakeError::InvalidCommit { path: path.to_string(), source })?;
        self.store.put(&path, PutPayload::from(bytes)).await.map_err(LakeError::store("put", &path))?;
        Ok(())
    }

    /// The watermark last published for a stream, if any.
    pub async fn published_watermark(&self, stream: &str) -> Result<Option<PublishedWatermark>> {
        match self.read_json(&self.watermark_path(stream)).await {
            Ok(watermark) => Ok(Some(watermark)),
            Err(LakeError::Store { source: object_store::Error::NotFound { .. }, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Deletes a path relative to the root; a path already gone is not an error.
    pub async fn delete(&self, relative: &str) -> Result<()> {
        let path = self.absolute(relative);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(LakeError::Store { operation: "delete", path: path.to_string(), source }),
        }
    }

    async fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T> {
        parse_record(path, &self.read_path(path).await?)
    }

    pub(crate) async fn read_path(&self, path: &Path) -> Result<bytes::Bytes> {
        let result = self.store.get(path).await.map_err(LakeError::store("get", path))?;
        result.bytes().await.map_err(LakeError::store("read", path))
    }

    /// Writes a record at `path` only if nothing is there: a commit point.
    async fn create_once<T: Serialize>(&self, path: Path, record: &T) -> Result<CommitOutcome> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|source| LakeError::InvalidCommit { path: path.to_string(), source })?;
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(&path, PutPayload::from(bytes), options).await {
            Ok(_) => Ok(CommitOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(CommitOutcome::Conflict),
            Err(source) => Err(LakeError::Store { operation: "create", path: path.to_string(), source }),
        }
    }

    /// Creates the JSON record at `relative` unless one is there: how the executor claims a
    /// window attempt and records its outcome. The put is conditional (`PutMode::Create`), like
    /// a Delta log commit, so of writers racing for one path exactly one gets `Created`.
    pub async fn create_record<T: Serialize>(&self, relative: &str, record: &T) -> Result<CommitOutcome> {
        self.create_once(self.absolute(relative), record).await
    }

    /// Reads the JSON record at `relative`, or none if it does not exist.
    pub async fn read_record<T: serde::de::DeserializeOwned>(&self, relative: &str) -> Result<Option<T>> {
        match self.read_json(&self.absolute(relative)).await {
            Ok(record) => Ok(Some(record)),
            Err(LakeError::Store { source: object_store::Error::NotFound { .. }, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Paths (relative to the root) of every object under `relative`, sorted.
    pub async fn list_under(&self, relative: &str) -> Result<Vec<String>> {
        let directory = self.absolute(relative);
        let root_parts = self.root.parts().count();
        let mut paths: Vec<String> = self
            .store
            .list(Some(&directory))
            .map_ok(|object| {
                object
                    .location
                    .parts()
                    .skip(root_parts)
                    .map(|part| part.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .try_collect()
            .await
            .map_err(LakeError::store("list", &directory))?;
        paths.sort();
        Ok(paths)
    }
}

pub(crate) use sluice_clock::{micros_ago, now_micros};

fn parse_record<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|source| LakeError::InvalidCommit { path: path.to_string(), source })
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    fn lake() -> Lake {
        Lake::new(Arc::new(InMemory::new()), Path::from("lake"))
    }

    #[tokio::test]
    async fn large_files_go_up_in_parts_and_read_back_whole() {
        let lake = lake().with_multipart_threshold(1_024);
        let bytes: Vec<u8> = (0..12 * 1024 * 1024).map(|index| (index % 251) as u8).collect();
        lake.put("telemetry/dt=2026-11-26/big.parquet", bytes.clone()).await.unwrap();
        assert_eq!(lake.get("telemetry/dt=2026-11-26/big.parquet").await.unwrap().to_vec(), bytes);
    }

    #[tokio::test]
    async fn records_are_created_once_and_read_back() {
        let lake = lake();
        let path = "_sluice/jobs/hourly/claim.json";
        assert_eq!(lake.read_record::<serde_json::Value>(path).await.unwrap(), None);
        assert_eq!(
            lake.create_record(path, &serde_json::json!({"owner": "a"})).await.unwrap(),
            CommitOutcome::Created
        );
        assert_eq!(
            lake.create_record(path, &serde_json::json!({"owner": "b"})).await.unwrap(),
            CommitOutcome::Conflict
        );
        let read: serde_json::Value = lake.read_record(path).await.unwrap().unwrap();
        assert_eq!(read["owner"], "a");
        assert_eq!(lake.list_under("_sluice/jobs").await.unwrap(), vec![path.to_string()]);
    }
}
