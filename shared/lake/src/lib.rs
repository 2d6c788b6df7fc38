//! The data lake: Delta Lake tables in Sluice's object store, the contract between the
//! compactor, the executor and every outside engine.
//!
//! Layout under the store root:
//! ```text
//! <stream>/_delta_log/                                  the stream table's log
//! <stream>/dt=YYYY-MM-DD/hour=HH/<file>.parquet         its data files (only those in a version count)
//! results/<job>/_delta_log/, results/<job>/window_start=.../<file>.parquet   a job's results table
//! _sluice/jobs/<job>/...                                run claims, outcomes, backfill requests
//! _sluice/watermarks/<stream>.json                      a cache of the watermark the log gives
//! ```
//! A flush writes its files at their final paths, then commits one Delta transaction that adds
//! them and moves its Kafka partition's position (a `txn` action). A file that no version of the
//! log adds is invisible to every Delta reader; the janitor deletes such files after a bound.
//! docs/delivery-semantics.md has the guarantees.

mod commit;
mod partition;
mod sorted_listing;
mod stats;
mod store;
mod table;

pub use crate::commit::{
    CommitOutcome, CommitRecord, CommittedFile, DEFAULT_MULTIPART_THRESHOLD_BYTES, Lake, LakeError,
    METADATA_DIR, MergeRecord, PositionReset, PublishedWatermark,
};
pub use crate::partition::{
    DATE_PARTITION_COLUMN, EventTimeOutOfRange, HOUR_PARTITION_COLUMN, MAX_EVENT_TIME_MICROS,
    MIN_EVENT_TIME_MICROS, PartitionGranularity, PartitionKey,
};
pub use crate::stats::delta_stats;
pub use crate::store::{ObjectStoreConfig, StoreError, StoreOptions, open_lake, open_store};
pub use crate::table::{
    CommittedPosition, DELTA_LOG_DIR, FlushesCommitted, LogCommit, NewFile, TableCommit, TableSettings,
    event_time_app_id, partition_values, position_app_id,
};
