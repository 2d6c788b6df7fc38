//! The data lake: Delta Lake tables in Sluice's object store, the contract between the
//! compactor, the executor and every outside engine.
//!
//! Where each object lives is in [`layout`].
//! A flush writes its files at their final paths, then commits one Delta transaction that adds
//! them and moves its Kafka partition's position (a `txn` action). A file that no version of the
//! log adds is invisible to every Delta reader; the janitor deletes such files after a bound.
//! docs/delivery-semantics.md has the guarantees.

mod commit;
mod edge_positions;
pub mod encryption;
mod latest;
pub mod layout;
mod partition;
mod sorted_listing;
mod stats;
mod store;
mod table;

pub use crate::commit::{
    CommitOutcome, CommitRecord, CommittedFile, DEFAULT_MULTIPART_THRESHOLD_BYTES, Lake, LakeError,
    MergeRecord, PositionReset, PublishedWatermark,
};
pub use crate::edge_positions::{GatewayPositions, MAX_SEEN_RUNS};
pub use crate::latest::LatestTables;
pub use crate::partition::{
    DATE_PARTITION_COLUMN, EventTimeOutOfRange, HOUR_PARTITION_COLUMN, MAX_EVENT_TIME_MICROS,
    MIN_EVENT_TIME_MICROS, PartitionGranularity, PartitionKey,
};
pub use crate::stats::{delta_stats, delta_stats_without};
pub use crate::store::{ObjectStoreConfig, StoreError, StoreOptions, open_lake, open_store};
pub use crate::table::{
    CommittedPosition, FlushesCommitted, LogCommit, NewFile, TableCommit, TableSettings, event_time_app_id,
    partition_values, position_app_id,
};
