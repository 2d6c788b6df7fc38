//! The data lake: where the compactor puts Parquet files and how it records what is committed,
//! which is the contract the executor and external engines read by.
//!
//! Layout under the store root:
//! ```text
//! <stream>/dt=YYYY-MM-DD/hour=HH/<file>.parquet            committed data, what readers see
//! _sluice/staging/<stream>/<file>.parquet                   written before its commit, never read
//! _sluice/commits/<stream>/partition=<p>/<sequence>.json    one commit record per flush, created once
//! _sluice/merges/<stream>/<sequence>.json                   one record per small-file merge, created once
//! _sluice/watermarks/<stream>.json                          the stream's completeness watermark
//! ```
//! A flush writes its files to staging, then creates the next commit record of its Kafka
//! partition with a create-if-absent put (the commit point), then copies the files to their
//! final paths. Only committed files ever appear under `<stream>/`, so an engine that reads the
//! Hive layout never sees a row of a flush that did not commit, and never sees one twice.

mod commit;
mod partition;
mod store;

pub use crate::commit::{
    CommitOutcome, CommitRecord, CommittedFile, DEFAULT_MULTIPART_THRESHOLD_BYTES, Lake, LakeError,
    METADATA_DIR, MergeRecord, PositionReset, PublishedWatermark,
};
pub use crate::partition::{
    EventTimeOutOfRange, MAX_EVENT_TIME_MICROS, MIN_EVENT_TIME_MICROS, PartitionGranularity, PartitionKey,
};
pub use crate::store::{ObjectStoreConfig, StoreError, StoreOptions, open_lake, open_store};
