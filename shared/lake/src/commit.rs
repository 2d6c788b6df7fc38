//! Commit records: what each flush of a Kafka partition committed, created exactly once.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

/// Where Sluice keeps what is not data: staging, commit, merge and run records, watermarks.
pub const METADATA_DIR: &str = "_sluice";

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("object store operation {operation} failed on {path}")]
    Store {
        operation: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("commit record {path} is not valid")]
    InvalidCommit {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl LakeError {
    fn store(operation: &'static str, path: &Path) -> impl FnOnce(object_store::Error) -> Self {
        let path = path.to_string();
        move |source| Self::Store { operation, path, source }
    }
}

pub(crate) type Result<T, E = LakeError> = std::result::Result<T, E>;

/// One data file of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedFile {
    /// Final path, relative to the store root: `<stream>/dt=.../hour=.../<name>.parquet`.
    pub path: String,
    /// Where the file was written before the commit; copied to `path` after it.
    pub staging_path: String,
    /// Hive partition segment, e.g. `dt=2026-11-26/hour=08`.
    pub partition: String,
    pub num_rows: u64,
    pub size_bytes: u64,
    pub min_event_time_micros: i64,
    pub max_event_time_micros: i64,
}

/// What one flush of one Kafka partition committed: the offset range `[start_offset,
/// end_offset)` and the files holding its rows. Records of a partition form a chain: each starts
/// where the previous ended, and sequence numbers have no gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub stream: String,
    pub topic: String,
    pub kafka_partition: i32,
    pub sequence: u64,
    pub start_offset: i64,
    pub end_offset: i64,
    pub files: Vec<CommittedFile>,
    /// Records of the range that could not be decoded and went to the dead-letter topic.
    pub num_dead_lettered: u64,
    /// Records of the range that repeated another reading of the same flush (same device_id,
    /// ts and seq) and were left out.
    #[serde(default)]
    pub num_duplicates_dropped: u64,
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

    /// The record that moves this partition's committed position to `to_offset`: the next in
    /// the chain, with no files, keeping the committed event time so that the watermark does not
    /// move back.
    pub fn position_reset(&self, to_offset: i64, reason: &str, writer_id: &str, now_micros: i64) -> Self {
        Self {
            stream: self.stream.clone(),
            topic: self.topic.clone(),
            kafka_partition: self.kafka_partition,
            sequence: self.sequence.saturating_add(1),
            start_offset: to_offset,
            end_offset: to_offset,
            files: Vec::new(),
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            max_event_time_micros_opt: self.max_event_time_micros_opt,
            writer_id: writer_id.to_string(),
            created_at_micros: now_micros,
            reset_opt: Some(PositionReset {
                previous_end_offset: self.end_offset,
                reason: reason.to_string(),
            }),
        }
    }
}

/// A small-file merge: `inputs` (final paths of committed files of one Hive partition) were
/// replaced by `output`. Merge records of a stream form one chain with no gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub stream: String,
    pub sequence: u64,
    pub partition: String,
    pub inputs: Vec<String>,
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

/// Whether a commit record was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Created,
    /// A record with this sequence exists: another writer committed this partition first.
    Conflict,
}

/// The lake in one object store, under one root.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    root: Path,
    multipart_threshold_bytes: usize,
    records: Arc<RecordCache>,
}

/// Commit and merge records never change once created (each is created once, at its commit
/// point), so their bytes are kept after the first read: a snapshot then costs one listing and
/// reads only the records created since the previous one. Keyed with the listed size and time
/// too, so that a record an operator replaced by hand is read again. Bounded: a lake keeps its
/// records for years, and past the bound the newer ones are simply read each time.
#[derive(Default)]
struct RecordCache {
    entries: std::sync::Mutex<std::collections::HashMap<RecordKey, bytes::Bytes>>,
}

type RecordKey = (Path, u64, i64);

/// About 1 KB each: tens of MB at most.
const MAX_CACHED_RECORDS: usize = 50_000;

impl RecordCache {
    fn key(object: &object_store::ObjectMeta) -> RecordKey {
        (object.location.clone(), object.size, object.last_modified.timestamp_micros())
    }

    fn get(&self, key: &RecordKey) -> Option<bytes::Bytes> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    fn insert(&self, key: RecordKey, bytes: bytes::Bytes) {
        if let Ok(mut entries) = self.entries.lock()
            && entries.len() < MAX_CACHED_RECORDS
        {
            entries.insert(key, bytes);
        }
    }
}

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.entries.lock().map(|entries| entries.len()).unwrap_or(0);
        f.debug_struct("RecordCache").field("cached", &cached).finish()
    }
}

/// Default size from which uploads are multipart, and of each part.
pub const DEFAULT_MULTIPART_THRESHOLD_BYTES: usize = 64 * 1024 * 1024;

impl Lake {
    pub fn new(store: Arc<dyn ObjectStore>, root: Path) -> Self {
        Self {
            store,
            root,
            multipart_threshold_bytes: DEFAULT_MULTIPART_THRESHOLD_BYTES,
            records: Arc::new(RecordCache::default()),
        }
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

    pub fn data_file(stream: &str, partition: &str, file_name: &str) -> String {
        format!("{stream}/{partition}/{file_name}")
    }

    pub fn staging_file(stream: &str, file_name: &str) -> String {
        format!("{METADATA_DIR}/staging/{stream}/{file_name}")
    }

    fn commits_dir(&self, stream: &str, kafka_partition: i32) -> Path {
        self.absolute(&format!("{METADATA_DIR}/commits/{stream}/partition={kafka_partition}"))
    }

    fn commit_path(&self, stream: &str, kafka_partition: i32, sequence: u64) -> Path {
        // Zero-padded so that names sort as numbers.
        self.commits_dir(stream, kafka_partition).join(format!("{sequence:020}.json"))
    }

    /// Writes bytes to a path relative to the root (staging files, merged files). Files of at
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

    fn merges_dir(&self, stream: &str) -> Path {
        self.absolute(&format!("{METADATA_DIR}/merges/{stream}"))
    }

    /// Every merge record of a stream, in sequence order.
    pub async fn merges(&self, stream: &str) -> Result<Vec<MergeRecord>> {
        // Zero-padded names: path order is sequence order.
        self.read_records_under(&self.merges_dir(stream)).await
    }

    /// Every JSON record below `directory`, in path order.
    async fn read_records_under<T: serde::de::DeserializeOwned>(&self, directory: &Path) -> Result<Vec<T>> {
        let mut objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(directory))
            .try_collect()
            .await
            .map_err(LakeError::store("list", directory))?;
        objects.retain(|object| object.location.as_ref().ends_with(".json"));
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        // Records are small: reading many at once hides the store's per-request latency.
        // Owned futures: borrowing `self` here would make the caller's future not `Send`.
        let reads = objects.into_iter().map(|object| {
            let lake = self.clone();
            async move {
                let key = RecordCache::key(&object);
                let bytes = match lake.records.get(&key) {
                    Some(bytes) => bytes,
                    None => {
                        let bytes = lake.read_bytes(&object.location).await?;
                        lake.records.insert(key, bytes.clone());
                        bytes
                    }
                };
                parse_record::<T>(&object.location, &bytes)
            }
        });
        futures::stream::iter(reads).buffered(16).try_collect().await
    }

    /// Creates a merge record with create-if-absent: the commit point of a merge.
    pub async fn create_merge(&self, record: &MergeRecord) -> Result<CommitOutcome> {
        self.create_once(
            self.merges_dir(&record.stream).join(format!("{:020}.json", record.sequence)),
            record,
        )
        .await
    }

    /// Applies a merge to the Hive layout: inputs removed first, then the output published, so
    /// that a reader of the directory never sees a row twice (it may miss the partition's rows
    /// for the moment in between). Idempotent, for finishing a merge whose writer died.
    pub async fn apply_merge(&self, record: &MergeRecord) -> Result<()> {
        for input in &record.inputs {
            self.delete(input).await?;
        }
        self.publish_file(&record.output).await
    }

    /// The files that hold a stream's rows: every committed file, less those merged away, plus
    /// merge outputs. Readers that go by records see each merge at once, whole.
    pub async fn live_files(&self, stream: &str) -> Result<Vec<CommittedFile>> {
        let merges = self.merges(stream).await?;
        let merged_away: std::collections::HashSet<&str> =
            merges.iter().flat_map(|merge| merge.inputs.iter().map(String::as_str)).collect();
        let mut files: Vec<CommittedFile> = self
            .commits(stream)
            .await?
            .into_iter()
            .flat_map(|commit| commit.files)
            .filter(|file| !merged_away.contains(file.path.as_str()))
            .collect();
        files.extend(
            merges
                .iter()
                .map(|merge| merge.output.clone())
                .filter(|output| !merged_away.contains(output.path.as_str())),
        );
        Ok(files)
    }

    /// Reads a path relative to the root.
    pub async fn get(&self, relative: &str) -> Result<bytes::Bytes> {
        let path = self.absolute(relative);
        let result = self.store.get(&path).await.map_err(LakeError::store("get", &path))?;
        result.bytes().await.map_err(LakeError::store("read", &path))
    }

    fn watermark_path(&self, stream: &str) -> Path {
        self.absolute(&format!("{METADATA_DIR}/watermarks/{stream}.json"))
    }

    /// Writes the stream's watermark where readers look for it (overwriting the previous one:
    /// it only moves forward, since each partition's committed event time only grows).
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

    /// The newest commit record of a Kafka partition, if it has any.
    pub async fn latest_commit(&self, stream: &str, kafka_partition: i32) -> Result<Option<CommitRecord>> {
        let directory = self.commits_dir(stream, kafka_partition);
        let objects: Vec<_> = self
            .store
            .list(Some(&directory))
            .try_collect()
            .await
            .map_err(LakeError::store("list", &directory))?;
        let Some(newest) = objects
            .into_iter()
            .map(|object| object.location)
            .filter(|path| path.as_ref().ends_with(".json"))
            .max()
        else {
            return Ok(None);
        };
        self.read_json(&newest).await.map(Some)
    }

    /// The Kafka partitions of a stream that have commit records, in order.
    pub async fn committed_partitions(&self, stream: &str) -> Result<Vec<i32>> {
        let commits_dir = self.absolute(&format!("{METADATA_DIR}/commits/{stream}"));
        let listing = self
            .store
            .list_with_delimiter(Some(&commits_dir))
            .await
            .map_err(LakeError::store("list", &commits_dir))?;
        let mut partitions: Vec<i32> = listing
            .common_prefixes
            .iter()
            .filter_map(|directory| directory.filename()?.strip_prefix("partition=")?.parse().ok())
            .collect();
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Every commit record of a stream, in (partition, sequence) order.
    pub async fn commits(&self, stream: &str) -> Result<Vec<CommitRecord>> {
        let directory = self.absolute(&format!("{METADATA_DIR}/commits/{stream}"));
        let mut records: Vec<CommitRecord> = self.read_records_under(&directory).await?;
        // Path order sorts partition 10 before 2: order by number.
        records.sort_by_key(|record| (record.kafka_partition, record.sequence));
        Ok(records)
    }

    async fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T> {
        parse_record(path, &self.read_bytes(path).await?)
    }

    async fn read_bytes(&self, path: &Path) -> Result<bytes::Bytes> {
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
    /// window attempt and records its outcome, with the same guarantee as commit records.
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

    /// Offsets committed across the first `num_partitions` partitions: the sum of each latest
    /// commit's end offset (every offset below it is committed). Cheap: one list and one read per
    /// partition.
    pub async fn committed_offsets(&self, stream: &str, num_partitions: i32) -> Result<i64> {
        let mut total = 0;
        for partition in 0..num_partitions {
            total += self.latest_commit(stream, partition).await?.map_or(0, |record| record.end_offset);
        }
        Ok(total)
    }

    /// The completeness watermark of a stream: the smallest, over its `num_partitions` Kafka
    /// partitions, of the largest event time committed in each, minus `allowed_lateness_micros`.
    /// Every record that reached the compactor with an event time at or below it, and arrived no
    /// later than the allowed lateness behind its partition's newest committed record, is
    /// committed. `None` until every partition has committed something.
    pub async fn watermark(
        &self,
        stream: &str,
        num_partitions: i32,
        allowed_lateness_micros: i64,
    ) -> Result<Option<i64>> {
        let mut watermark_opt: Option<i64> = None;
        for partition in 0..num_partitions {
            let Some(max_event_time) = self
                .latest_commit(stream, partition)
                .await?
                .and_then(|record| record.max_event_time_micros_opt)
            else {
                return Ok(None);
            };
            watermark_opt =
                Some(watermark_opt.map_or(max_event_time, |watermark| watermark.min(max_event_time)));
        }
        Ok(watermark_opt.map(|watermark| watermark.saturating_sub(allowed_lateness_micros)))
    }

    /// Deletes staged files that no commit will ever publish: older than `min_age` and not named
    /// by the latest commit record of any partition or the latest merge record (only a latest
    /// record can still be waiting for its publish; every earlier one was published before its
    /// successor was created).
    /// Returns how many were deleted.
    pub async fn remove_orphaned_staging(&self, stream: &str, min_age: std::time::Duration) -> Result<usize> {
        let commits_dir = self.absolute(&format!("{METADATA_DIR}/commits/{stream}"));
        let listing = self
            .store
            .list_with_delimiter(Some(&commits_dir))
            .await
            .map_err(LakeError::store("list", &commits_dir))?;
        let mut referenced = std::collections::HashSet::new();
        for partition_dir in listing.common_prefixes {
            let Some(partition) = partition_dir
                .filename()
                .and_then(|name| name.strip_prefix("partition="))
                .and_then(|number| number.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some(latest) = self.latest_commit(stream, partition).await? {
                referenced.extend(latest.files.into_iter().map(|file| self.absolute(&file.staging_path)));
            }
        }
        // Likewise the output of the latest merge, which its swap may still need.
        if let Some(latest_merge) = self.merges(stream).await?.pop() {
            referenced.insert(self.absolute(&latest_merge.output.staging_path));
        }
        let staging_dir = self.absolute(&format!("{METADATA_DIR}/staging/{stream}"));
        let staged: Vec<_> = self
            .store
            .list(Some(&staging_dir))
            .try_collect()
            .await
            .map_err(LakeError::store("list", &staging_dir))?;
        let cutoff = micros_ago(min_age);
        let mut num_deleted = 0;
        for object in staged {
            if referenced.contains(&object.location) || object.last_modified.timestamp_micros() > cutoff {
                continue;
            }
            match self.store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => num_deleted += 1,
                Err(source) => {
                    return Err(LakeError::Store {
                        operation: "delete",
                        path: object.location.to_string(),
                        source,
                    });
                }
            }
        }
        Ok(num_deleted)
    }

    /// Creates the commit record; never overwrites one. This is the commit point of a flush.
    pub async fn create_commit(&self, record: &CommitRecord) -> Result<CommitOutcome> {
        self.create_once(self.commit_path(&record.stream, record.kafka_partition, record.sequence), record)
            .await
    }

    /// Makes a committed record's files visible at their final paths. Idempotent: a file already
    /// in place is left alone, so a new owner can finish what a crashed writer started.
    pub async fn publish(&self, record: &CommitRecord) -> Result<()> {
        for file in &record.files {
            self.publish_file(file).await?;
        }
        Ok(())
    }

    /// Copies a file from staging to its final path unless it is there, then deletes the staged
    /// copy. A staged copy that is gone was copied before (staging is deleted only after a copy
    /// succeeded) and may since have been merged away: nothing to do.
    async fn publish_file(&self, file: &CommittedFile) -> Result<()> {
        let final_path = self.absolute(&file.path);
        match self.store.head(&final_path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                let staging_path = self.absolute(&file.staging_path);
                match self.store.copy(&staging_path, &final_path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(source) => {
                        return Err(LakeError::Store {
                            operation: "copy",
                            path: staging_path.to_string(),
                            source,
                        });
                    }
                }
            }
            Err(source) => {
                return Err(LakeError::Store { operation: "head", path: final_path.to_string(), source });
            }
        }
        self.delete(&file.staging_path).await
    }
}

/// Epoch microseconds `age` ago.
fn micros_ago(age: std::time::Duration) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.saturating_sub(age).as_micros()).unwrap_or(i64::MAX)
}

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

    fn record(sequence: u64, start_offset: i64, end_offset: i64, file_name: &str) -> CommitRecord {
        CommitRecord {
            stream: "telemetry".into(),
            topic: "sluice.telemetry".into(),
            kafka_partition: 3,
            sequence,
            start_offset,
            end_offset,
            files: vec![CommittedFile {
                path: Lake::data_file("telemetry", "dt=2026-11-26/hour=08", file_name),
                staging_path: Lake::staging_file("telemetry", file_name),
                partition: "dt=2026-11-26/hour=08".into(),
                num_rows: (end_offset - start_offset) as u64,
                size_bytes: 4,
                min_event_time_micros: 0,
                max_event_time_micros: 0,
            }],
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            max_event_time_micros_opt: None,
            writer_id: "test".into(),
            created_at_micros: 0,
            reset_opt: None,
        }
    }

    #[tokio::test]
    async fn commits_are_created_once_and_the_latest_wins() {
        let lake = lake();
        assert_eq!(lake.latest_commit("telemetry", 3).await.unwrap(), None);
        for sequence in 0..12 {
            let created = lake
                .create_commit(&record(
                    sequence,
                    sequence as i64 * 10,
                    sequence as i64 * 10 + 10,
                    "a.parquet",
                ))
                .await;
            assert_eq!(created.unwrap(), CommitOutcome::Created);
        }
        let latest = lake.latest_commit("telemetry", 3).await.unwrap().unwrap();
        assert_eq!((latest.sequence, latest.end_offset), (11, 120), "numeric order, not text order");
        // A stale writer trying the same sequence is refused, and nothing is overwritten.
        let stale = record(11, 110, 999, "stale.parquet");
        assert_eq!(lake.create_commit(&stale).await.unwrap(), CommitOutcome::Conflict);
        assert_eq!(lake.latest_commit("telemetry", 3).await.unwrap().unwrap().end_offset, 120);
        assert_eq!(lake.latest_commit("telemetry", 4).await.unwrap(), None);
        assert_eq!(lake.commits("telemetry").await.unwrap().len(), 12);
    }

    #[tokio::test]
    async fn a_position_reset_is_the_next_record_created_once_and_read_back() {
        let lake = lake();
        assert_eq!(lake.committed_partitions("telemetry").await.unwrap(), Vec::<i32>::new());
        let mut first = record(0, 0, 500, "a.parquet");
        first.max_event_time_micros_opt = Some(7_000);
        lake.create_commit(&first).await.unwrap();
        let mut other = record(0, 0, 10, "b.parquet");
        other.kafka_partition = 10;
        lake.create_commit(&other).await.unwrap();
        assert_eq!(lake.committed_partitions("telemetry").await.unwrap(), [3, 10], "numeric order");

        let reset = first.position_reset(0, "broker replaced", "operator", 42);
        assert_eq!((reset.sequence, reset.start_offset, reset.end_offset), (1, 0, 0));
        assert_eq!(reset.max_event_time_micros_opt, Some(7_000), "the watermark does not move back");
        assert_eq!(lake.create_commit(&reset).await.unwrap(), CommitOutcome::Created);
        assert_eq!(lake.create_commit(&reset).await.unwrap(), CommitOutcome::Conflict, "created once");
        let latest = lake.latest_commit("telemetry", 3).await.unwrap().unwrap();
        assert_eq!(latest, reset);
        assert_eq!(
            latest.reset_opt,
            Some(PositionReset { previous_end_offset: 500, reason: "broker replaced".into() })
        );
        // Records of older versions, without the field, still read.
        let mut old_json = serde_json::to_value(&first).unwrap();
        old_json.as_object_mut().unwrap().remove("reset_opt");
        let parsed: CommitRecord = serde_json::from_value(old_json).unwrap();
        assert_eq!(parsed.reset_opt, None);
        assert!(!serde_json::to_string(&first).unwrap().contains("reset_opt"), "absent unless set");
    }

    #[tokio::test]
    async fn records_read_again_see_new_and_replaced_ones_from_any_clone() {
        let lake = lake();
        lake.create_commit(&record(0, 0, 10, "a.parquet")).await.unwrap();
        assert_eq!(lake.commits("telemetry").await.unwrap().len(), 1);
        // A clone shares what was read, and still sees records created since.
        let clone = lake.clone();
        clone.create_commit(&record(1, 10, 20, "b.parquet")).await.unwrap();
        let files: Vec<String> =
            lake.live_files("telemetry").await.unwrap().into_iter().map(|file| file.path).collect();
        assert_eq!(files.len(), 2, "{files:?}");
        // A record replaced by hand (not something Sluice does) is read again, not served stale.
        let replaced = record(0, 0, 15, "a-replaced.parquet");
        let path = lake.commit_path("telemetry", 3, 0);
        lake.store.put(&path, PutPayload::from(serde_json::to_vec(&replaced).unwrap())).await.unwrap();
        let commits = clone.commits("telemetry").await.unwrap();
        assert_eq!(commits[0].end_offset, 15);
        assert!(commits[0].files[0].path.ends_with("a-replaced.parquet"));
    }

    #[tokio::test]
    async fn watermark_is_the_slowest_partition_minus_lateness() {
        let lake = lake();
        let mut first = record(0, 0, 10, "a.parquet");
        first.max_event_time_micros_opt = Some(5_000);
        lake.create_commit(&first).await.unwrap();
        assert_eq!(lake.watermark("telemetry", 1, 0).await.unwrap(), None, "partition 0 has no commit yet");
        let mut other = record(0, 0, 10, "b.parquet");
        other.kafka_partition = 0;
        other.max_event_time_micros_opt = Some(3_000);
        lake.create_commit(&other).await.unwrap();
        // Partitions 0 and 3 have commits; 1 and 2 do not.
        assert_eq!(lake.watermark("telemetry", 4, 0).await.unwrap(), None);
        let mut late = record(0, 0, 10, "c.parquet");
        for partition in [1, 2] {
            late.kafka_partition = partition;
            late.max_event_time_micros_opt = Some(9_000);
            lake.create_commit(&late).await.unwrap();
        }
        assert_eq!(lake.watermark("telemetry", 4, 1_000).await.unwrap(), Some(2_000));
    }

    #[tokio::test]
    async fn janitor_removes_only_staged_files_no_commit_will_publish() {
        let lake = lake();
        let published = record(0, 0, 10, "published.parquet");
        lake.put(&published.files[0].staging_path, b"PAR1".to_vec()).await.unwrap();
        lake.create_commit(&published).await.unwrap();
        lake.publish(&published).await.unwrap();
        // The latest commit, not yet published (its writer died between commit and publish).
        let pending = record(1, 10, 20, "pending.parquet");
        lake.put(&pending.files[0].staging_path, b"PAR1".to_vec()).await.unwrap();
        lake.create_commit(&pending).await.unwrap();
        // A flush that never reached its commit point.
        let orphan = Lake::staging_file("telemetry", "orphan.parquet");
        lake.put(&orphan, b"PAR1".to_vec()).await.unwrap();

        assert_eq!(
            lake.remove_orphaned_staging("telemetry", std::time::Duration::from_secs(3600)).await.unwrap(),
            0,
            "too young"
        );
        assert_eq!(lake.remove_orphaned_staging("telemetry", std::time::Duration::ZERO).await.unwrap(), 1);
        assert!(lake.store().head(&lake.absolute(&orphan)).await.is_err());
        lake.publish(&pending).await.unwrap();
        assert!(
            lake.store().head(&lake.absolute(&pending.files[0].path)).await.is_ok(),
            "pending commit still publishable"
        );
    }

    #[tokio::test]
    async fn large_files_go_up_in_parts_and_read_back_whole() {
        let lake = lake().with_multipart_threshold(1_024);
        let bytes: Vec<u8> = (0..12 * 1024 * 1024).map(|index| (index % 251) as u8).collect();
        lake.put("_sluice/staging/telemetry/big.parquet", bytes.clone()).await.unwrap();
        assert_eq!(lake.get("_sluice/staging/telemetry/big.parquet").await.unwrap().to_vec(), bytes);
    }

    #[tokio::test]
    async fn publish_moves_staged_files_and_is_idempotent() {
        let lake = lake();
        let record = record(0, 0, 10, "f.parquet");
        lake.put(&record.files[0].staging_path, b"PAR1".to_vec()).await.unwrap();
        lake.create_commit(&record).await.unwrap();
        lake.publish(&record).await.unwrap();
        lake.publish(&record).await.unwrap();
        let final_path = lake.absolute(&record.files[0].path);
        assert_eq!(final_path.as_ref(), "lake/telemetry/dt=2026-11-26/hour=08/f.parquet");
        let bytes = lake.store().get(&final_path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&bytes[..], b"PAR1");
        assert!(lake.store().head(&lake.absolute(&record.files[0].staging_path)).await.is_err());
    }
}
