//! Delta Lake tables: how a flush, a merge and a result become one atomic, versioned commit that
//! every Delta reader (Spark, Trino, DuckDB, Polars, delta-rs) sees whole or not at all.
//!
//! Each Kafka partition's committed position lives in the table's log as a `txn` action (app id
//! [`position_app_id`], version = the next offset to read), written in the same commit as the
//! files of the range it covers: the files and the position move together or not at all. A
//! second `txn` per partition ([`event_time_app_id`]) carries the largest event time committed
//! in it, so the stream's watermark comes from the log too, survives checkpoints, and costs no
//! side file.
//!
//! Why one file of about 850 lines of code: every way Sluice writes a Delta version (flushes,
//! merges, result replacements, position resets, VACUUM) goes through the same conflict rules on
//! the same `txn` actions, and the readers of those actions (positions, watermarks, history) must
//! agree with the writers byte for byte. Keeping writers and readers of the log in one place is
//! what keeps them in step; the paths are in `layout.rs`, the records in `commit.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_schema::Schema as ArrowSchema;
use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake_core::kernel::{Action, Add, DataType, Remove, StructField, Transaction};
use deltalake_core::logstore::{LogStoreRef, StorageConfig, default_logstore};
use deltalake_core::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake_core::table::config::TablePropertiesExt as _;
use deltalake_core::{DeltaTable, DeltaTableError, TableProperty};
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};

use crate::commit::{CommitRecord, CommittedFile, Lake, LakeError, MergeRecord, Result};
use crate::edge_positions::GatewayPositions;
use crate::layout;
use crate::sorted_listing::SortedListing;

/// Add-action tags with a file's exact event-time range. Delta's own statistics hold the same
/// bounds for the event-time column, but as text that other writers may truncate; these are what
/// the executor's window filter relies on.
const TAG_MIN_EVENT_TIME: &str = "sluice.minEventTimeMicros";
const TAG_MAX_EVENT_TIME: &str = "sluice.maxEventTimeMicros";

/// Key of Sluice's own entry in a commit's `commitInfo`.
const COMMIT_INFO_KEY: &str = "sluice";

/// How many times creating a table or adding its columns is tried again after losing a race to
/// another writer doing the same.
const SCHEMA_ATTEMPTS: usize = 5;

/// Settings of the tables Sluice creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSettings {
    /// A checkpoint is written every this many commits, so that loading a snapshot reads one
    /// Parquet checkpoint and at most this many JSON commits however old the table is.
    pub checkpoint_interval: u64,
    /// Log entries older than this are removed when a checkpoint is written
    /// (`delta.logRetentionDuration`): the history that time travel and `sluice tables` see.
    pub log_retention_ms: u64,
}

impl Default for TableSettings {
    fn default() -> Self {
        // Streams commit every few seconds per partition: Delta's default of 100 would leave a
        // reader replaying up to 100 JSON commits. Log cleanup lists the whole retained log at
        // each checkpoint, so Delta's 30 days (a million commits of a busy stream) would make
        // every tenth commit list a million objects; a day keeps it to tens of thousands.
        Self { checkpoint_interval: 10, log_retention_ms: 86_400_000 }
    }
}

/// The app id of a Kafka partition's committed position in a stream table.
pub fn position_app_id(stream: &str, kafka_partition: i32) -> String {
    format!("sluice-compactor/{stream}/{kafka_partition}")
}

/// The app id that merges of one Hive partition of a stream share. delta-rs' conflict checker
/// does not count removes without data change as conflicting, so two merges of the same files
/// would both commit and the rows would be in the table twice; a shared app id makes the later
/// one lose with ConcurrentTransaction instead.
fn merge_app_id(stream: &str, partition: &str) -> String {
    format!("sluice-merge/{stream}/{partition}")
}

/// The app id of one window's result in a results table: its version orders attempts, so an
/// older attempt finishing late never replaces a newer one's result.
fn result_app_id(table: &str, partition: &str) -> String {
    format!("sluice-executor/{table}/{partition}")
}

/// The app id whose version is the end offset of the flush that last wrote a Kafka partition's
/// edge positions, naming their file ([`layout::edge_positions_file`]).
fn edge_positions_app_id(stream: &str, kafka_partition: i32) -> String {
    format!("sluice-compactor/{stream}/{kafka_partition}/edge-positions")
}

/// The app id whose version is the largest event time (µs) committed from a Kafka partition.
pub fn event_time_app_id(stream: &str, kafka_partition: i32) -> String {
    format!("sluice-compactor/{stream}/{kafka_partition}/max-event-time")
}

/// Whether a commit made it into a table's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableCommit {
    Committed {
        version: i64,
    },
    /// Another writer's commit won: the partition's position moved, or a merge input is gone.
    Conflict,
}

/// What a commit of several flushes did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushesCommitted {
    /// The table version holding the flushes that committed; `None` when none did.
    pub version_opt: Option<i64>,
    /// Kafka partitions whose flush was left out: their position had moved.
    pub stale_partitions: Vec<i32>,
}

/// How many times a commit of flushes is built again after a concurrent commit moved one of
/// its positions.
const COMMIT_ATTEMPTS: usize = 4;

/// A Kafka partition's committed state in a stream table's latest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedPosition {
    /// The next offset to read: every record below it is committed (or dead-lettered).
    pub end_offset: i64,
    pub max_event_time_micros_opt: Option<i64>,
    /// Per edge gateway, the positions committed from this partition: a record among them is
    /// one the gateway sent again.
    pub edge_positions: BTreeMap<String, GatewayPositions>,
    /// The table version the position was read from.
    pub table_version: i64,
}

/// A data file written under a table, ready to be added to it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFile {
    pub file: CommittedFile,
    /// Delta statistics (`numRecords`, `minValues`, `maxValues`, `nullCount`) as JSON.
    pub stats_json: String,
}

/// What one commit in a table's log did, read back from the log (tests and `sluice tables`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCommit {
    pub version: i64,
    pub operation: String,
    /// Paths relative to the table.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// App id to version, of the `txn` actions in this commit.
    pub transactions: BTreeMap<String, i64>,
    /// The flushes Sluice recorded in the commit's `commitInfo`.
    pub flushes: Vec<CommitRecord>,
    pub merge_opt: Option<MergeRecord>,
}

/// Sluice's part of a commit's `commitInfo`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CommitInfoEntry {
    #[serde(default)]
    flushes: Vec<CommitRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merge: Option<MergeRecord>,
}

impl Lake {
    /// The URL delta-rs and its kernel know the table by. Its path is the table's path in the
    /// store (the kernel maps URL paths straight to store paths); every read and write goes
    /// through Sluice's own store, so the scheme names nothing.
    fn table_url(&self, table: &str) -> url::Url {
        #[allow(clippy::expect_used, reason = "a constant that parses")]
        let mut url = url::Url::parse("sluice-lake:///").expect("constant URL");
        // Percent-encodes what a URL would read as a query or fragment (`?`, `#`); the kernel
        // decodes the path back into the same store path.
        url.set_path(self.absolute(table).as_ref());
        url
    }

    /// The Delta log store of the table at `table` (relative to the lake root).
    pub fn log_store(&self, table: &str) -> LogStoreRef {
        let root: Arc<dyn ObjectStore> = Arc::new(SortedListing::new(Arc::clone(self.store())));
        let prefixed: Arc<dyn ObjectStore> =
            Arc::new(PrefixStore::new(Arc::clone(&root), self.absolute(table)));
        default_logstore(prefixed, root, &self.table_url(table), &StorageConfig::default())
    }

    /// The latest version of a table, or none if nothing was committed there yet.
    pub async fn load_table(&self, table: &str) -> Result<Option<DeltaTable>> {
        let log_store = self.log_store(table);
        if !log_store.is_delta_table_location().await.map_err(LakeError::delta(table))? {
            return Ok(None);
        }
        let mut delta = DeltaTable::new(log_store);
        delta.load().await.map_err(LakeError::delta(table))?;
        Ok(Some(delta))
    }

    /// Creates the table if it does not exist, and adds the columns of `data_columns` it lacks
    /// (a field added to the stream's schema), and returns its latest version. Safe when several
    /// writers do it at once: a writer that loses the race reloads and finds the work done.
    pub async fn ensure_table(
        &self,
        table: &str,
        data_columns: &ArrowSchema,
        partition_columns: &[&str],
        settings: TableSettings,
    ) -> Result<DeltaTable> {
        let mut wanted: Vec<StructField> = Vec::with_capacity(data_columns.fields().len());
        for field in data_columns.fields() {
            let field: StructField = field.as_ref().try_into_kernel().map_err(|source| {
                LakeError::Schema { table: table.to_string(), message: source.to_string() }
            })?;
            wanted.push(field);
        }
        wanted.extend(partition_columns.iter().map(|name| StructField::new(*name, DataType::STRING, false)));
        let mut last_error_opt = None;
        for _ in 0..SCHEMA_ATTEMPTS {
            let Some(existing) = self.load_table(table).await? else {
                let created = DeltaTable::new(self.log_store(table))
                    .create()
                    .with_columns(wanted.clone())
                    .with_partition_columns(partition_columns.iter().copied())
                    .with_configuration_property(
                        TableProperty::CheckpointInterval,
                        Some(settings.checkpoint_interval.max(1).to_string()),
                    )
                    .with_configuration_property(
                        TableProperty::LogRetentionDuration,
                        Some(format!("interval {} milliseconds", settings.log_retention_ms.max(1))),
                    )
                    .with_save_mode(SaveMode::ErrorIfExists)
                    .await;
                match created {
                    Ok(table) => return Ok(table),
                    Err(error) => {
                        last_error_opt = Some(error);
                        continue;
                    }
                }
            };
            let schema = existing.snapshot().map_err(LakeError::delta(table))?.schema();
            let mut missing = Vec::new();
            for field in &wanted {
                match schema.field(field.name()) {
                    Some(present) if present.data_type() != field.data_type() => {
                        return Err(LakeError::Schema {
                            table: table.to_string(),
                            message: format!(
                                "column {} is {:?} in the table but {:?} in the stream's schema; a column's \
                                 type cannot change (add a new field instead)",
                                field.name(),
                                present.data_type(),
                                field.data_type()
                            ),
                        });
                    }
                    Some(_) => {}
                    None => {
                        missing.push(StructField::new(field.name().clone(), field.data_type().clone(), true))
                    }
                }
            }
            if missing.is_empty() {
                return Ok(existing);
            }
            tracing::info!(table, columns = ?missing.iter().map(StructField::name).collect::<Vec<_>>(), "adding columns to the table");
            match existing.add_columns().with_fields(missing).await {
                Ok(table) => return Ok(table),
                Err(error) => last_error_opt = Some(error),
            }
        }
        Err(LakeError::Delta {
            table: table.to_string(),
            source: Box::new(last_error_opt.unwrap_or_else(|| DeltaTableError::generic("no attempt made"))),
        })
    }

    /// The committed position of a Kafka partition in the stream table's latest version.
    pub async fn latest_commit(
        &self,
        stream: &str,
        kafka_partition: i32,
    ) -> Result<Option<CommittedPosition>> {
        let Some(table) = self.load_table(stream).await? else { return Ok(None) };
        let Some(mut position) = position_in(&table, stream, kafka_partition).await? else { return Ok(None) };
        let snapshot = table.snapshot().map_err(LakeError::delta(stream))?;
        let edge_positions_at_opt = snapshot
            .transaction_version(table.log_store().as_ref(), edge_positions_app_id(stream, kafka_partition))
            .await
            .map_err(LakeError::delta(stream))?;
        if let Some(at) = edge_positions_at_opt {
            // The commit points at the file, so it was written before: missing, it is an error,
            // never an empty map (that would let every repeat through).
            let path = layout::edge_positions_file(stream, kafka_partition, at);
            let bytes = self.get(&path).await?;
            position.edge_positions =
                serde_json::from_slice(&bytes).map_err(|source| LakeError::InvalidCommit { path, source })?;
        }
        Ok(Some(position))
    }

    /// Writes a Kafka partition's edge positions for the flush ending at `end_offset`, before the
    /// flush's commit points at them.
    pub async fn write_edge_positions(
        &self,
        stream: &str,
        kafka_partition: i32,
        end_offset: i64,
        edge_positions: &BTreeMap<String, GatewayPositions>,
    ) -> Result<()> {
        let path = layout::edge_positions_file(stream, kafka_partition, end_offset);
        let bytes = serde_json::to_vec(edge_positions)
            .map_err(|source| LakeError::InvalidCommit { path: path.clone(), source })?;
        self.put(&path, bytes).await
    }

    /// Deletes a Kafka partition's edge-position files older than the one at `end_offset`, which
    /// a commit points at now: no commit can point at them again.
    pub async fn delete_edge_positions_before(
        &self,
        stream: &str,
        kafka_partition: i32,
        end_offset: i64,
    ) -> Result<()> {
        let current = layout::edge_positions_file(stream, kafka_partition, end_offset);
        for path in self.list_under(&layout::edge_positions_dir(stream, kafka_partition)).await? {
            if path < current {
                self.delete(&path).await?;
            }
        }
        Ok(())
    }

    /// Commits one flush (or a position reset, which has no files): see [`Lake::create_commits`].
    pub async fn create_commit(&self, record: &CommitRecord, new_files: &[NewFile]) -> Result<TableCommit> {
        let committed = self.create_commits(&record.stream, &[(record.clone(), new_files.to_vec())]).await?;
        Ok(committed.version_opt.map_or(TableCommit::Conflict, |version| TableCommit::Committed { version }))
    }

    /// Commits flushes of several Kafka partitions of one stream in one Delta transaction: their
    /// files and each partition's new position, so that a compactor's commit rate does not grow
    /// with the partitions it owns.
    ///
    /// A flush is left out, and its partition reported stale, when the partition's position in
    /// the table is not the one the flush started from (`previous_end_offset_opt`): another
    /// writer owns the partition now, or did while this one still read it. delta-rs would let a
    /// replayed or lower `txn` version through (delta-io/delta-rs#2580), so the check is made
    /// here against the version the commit is built on; the conflict checker then refuses the
    /// commit if a later version moved any of the same positions, and the check is made again on
    /// the newer version.
    pub async fn create_commits(
        &self,
        stream: &str,
        flushes: &[(CommitRecord, Vec<NewFile>)],
    ) -> Result<FlushesCommitted> {
        let mut stale_partitions: Vec<i32> = Vec::new();
        for _ in 0..COMMIT_ATTEMPTS {
            let Some(table) = self.load_table(stream).await? else {
                return Err(LakeError::NoTable { table: stream.to_string() });
            };
            let mut remaining: Vec<&(CommitRecord, Vec<NewFile>)> = Vec::with_capacity(flushes.len());
            for flush in flushes {
                if stale_partitions.contains(&flush.0.kafka_partition) {
                    continue;
                }
                let committed = position_in(&table, stream, flush.0.kafka_partition).await?;
                if committed.map(|position| position.end_offset) == flush.0.previous_end_offset_opt {
                    remaining.push(flush);
                } else {
                    stale_partitions.push(flush.0.kafka_partition);
                }
            }
            if remaining.is_empty() {
                return Ok(FlushesCommitted { version_opt: None, stale_partitions });
            }
            let now_millis = crate::commit::now_micros() / 1_000;
            let mut actions: Vec<Action> = Vec::new();
            for (record, new_files) in &remaining {
                actions.extend(new_files.iter().map(|new_file| {
                    Action::Add(add_action(
                        stream,
                        &new_file.file,
                        Some(&new_file.stats_json),
                        now_millis,
                        true,
                    ))
                }));
                actions.push(Action::Txn(Transaction {
                    app_id: position_app_id(stream, record.kafka_partition),
                    version: record.end_offset,
                    last_updated: Some(now_millis),
                }));
                if let Some(at) = record.edge_positions_at_opt {
                    actions.push(Action::Txn(Transaction {
                        app_id: edge_positions_app_id(stream, record.kafka_partition),
                        version: at,
                        last_updated: Some(now_millis),
                    }));
                }
                if let Some(max_event_time) = record.max_event_time_micros_opt {
                    actions.push(Action::Txn(Transaction {
                        app_id: event_time_app_id(stream, record.kafka_partition),
                        version: max_event_time,
                        last_updated: Some(now_millis),
                    }));
                }
            }
            let entry = CommitInfoEntry {
                flushes: remaining.iter().map(|(record, _)| record.clone()).collect(),
                merge: None,
            };
            let operation = DeltaOperation::StreamingUpdate {
                output_mode: OutputMode::Append,
                query_id: format!("sluice-compactor/{stream}"),
                epoch_id: remaining.iter().map(|(record, _)| record.end_offset).max().unwrap_or_default(),
            };
            if let TableCommit::Committed { version } =
                self.commit(stream, &table, actions, &entry, operation).await?
            {
                return Ok(FlushesCommitted { version_opt: Some(version), stale_partitions });
            }
        }
        // Lost again and again to other writers of the same positions: every flush left is read
        // again by whoever owns its partition.
        stale_partitions.extend(
            flushes
                .iter()
                .map(|(record, _)| record.kafka_partition)
                .filter(|partition| !stale_partitions.contains(partition))
                .collect::<Vec<_>>(),
        );
        Ok(FlushesCommitted { version_opt: None, stale_partitions })
    }

    /// Commits a small-file merge: the merged file is added and its inputs removed in one
    /// transaction, so a reader of any version sees each row once; `dataChange` is false unless
    /// the merge dropped duplicate readings. Refused with [`TableCommit::Conflict`] when an input is no longer in the
    /// table (another merge took it).
    pub async fn create_merge(&self, record: &MergeRecord, stats_json: &str) -> Result<TableCommit> {
        let stream = &record.stream;
        let Some(table) = self.load_table(stream).await? else {
            return Err(LakeError::NoTable { table: stream.clone() });
        };
        let live: std::collections::HashSet<String> =
            self.files_of(&table, stream).await?.into_iter().map(|file| file.path).collect();
        if !record.inputs.iter().all(|input| live.contains(&input.path)) {
            return Ok(TableCommit::Conflict);
        }
        // A merge drops readings that two flushes both hold (a device sent one twice): then it
        // does change the data, and a reader that follows changes (Delta streaming, change
        // feeds) must be told so.
        let input_rows: u64 = record.inputs.iter().map(|input| input.num_rows).sum();
        let data_change = record.output.num_rows != input_rows;
        let now_millis = crate::commit::now_micros() / 1_000;
        let mut actions = vec![
            Action::Add(add_action(stream, &record.output, Some(stats_json), now_millis, data_change)),
            Action::Txn(Transaction {
                app_id: merge_app_id(stream, &record.partition),
                version: crate::commit::now_micros(),
                last_updated: Some(now_millis),
            }),
        ];
        actions.extend(
            record
                .inputs
                .iter()
                .map(|input| Action::Remove(remove_action(stream, input, now_millis, data_change))),
        );
        let entry = CommitInfoEntry { flushes: Vec::new(), merge: Some(record.clone()) };
        let operation = DeltaOperation::Optimize {
            predicate: Some(record.partition.clone()),
            target_size: i64::try_from(record.output.size_bytes).unwrap_or(i64::MAX),
        };
        self.commit(stream, &table, actions, &entry, operation).await
    }

    async fn commit(
        &self,
        table_name: &str,
        table: &DeltaTable,
        actions: Vec<Action>,
        entry: &CommitInfoEntry,
        operation: DeltaOperation,
    ) -> Result<TableCommit> {
        let snapshot = table.snapshot().map_err(LakeError::delta(table_name))?;
        let entry = serde_json::to_value(entry)
            .map_err(|source| LakeError::InvalidCommit { path: table_name.to_string(), source })?;
        let own_paths: Vec<String> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Add(add) => Some(add.path.clone()),
                _ => None,
            })
            .collect();
        // Log cleanup lists the whole log, so it runs with the commits that write a checkpoint
        // rather than with every commit (delta-rs' default).
        let interval = snapshot.table_config().checkpoint_interval().get();
        let checkpoint_due = (snapshot.version() + 1).is_multiple_of(interval);
        // From `CommitProperties`, not `CommitBuilder::default()`: only that way does the commit
        // run delta-rs' post-commit hook, which writes a checkpoint every
        // `delta.checkpointInterval` commits and cleans up the log past `delta.logRetentionDuration`
        // (by whichever writer makes the commit that is due).
        let committed =
            CommitBuilder::from(CommitProperties::default().with_cleanup_expired_logs(Some(checkpoint_due)))
                .with_actions(actions)
                .with_app_metadata(HashMap::from([(COMMIT_INFO_KEY.to_string(), entry)]))
                .build(Some(snapshot), table.log_store(), operation)
                .await;
        let error = match committed {
            Ok(finalized) => {
                return Ok(TableCommit::Committed {
                    version: i64::try_from(finalized.version()).unwrap_or(i64::MAX),
                });
            }
            Err(error) => error,
        };
        // A commit that landed can still come back as a failure: the store retries a conditional
        // put whose answer was lost and finds the object there (delta-rs then checks its own
        // commit for conflicts and finds its own `txn`s), or the checkpoint after the commit
        // point fails. Deleting the files then would leave the table naming missing files; the
        // commit's own uniquely named files in the table say that it landed.
        if !own_paths.is_empty() {
            match self.version_holding(table_name, &own_paths).await {
                Ok(Some(version)) => {
                    tracing::warn!(table = table_name, error = %sluice_errors::Chain(&error), version, "the commit landed although it reported a failure");
                    return Ok(TableCommit::Committed { version });
                }
                Ok(None) => {}
                // Whether it landed is unknown: a conflict answer would let the caller delete
                // files the table may name, an error makes it re-read the table first.
                Err(check_error) => {
                    tracing::warn!(table = table_name, error = %sluice_errors::Chain(&error), %check_error, "could not tell whether a failed commit landed");
                    return Err(LakeError::Delta { table: table_name.to_string(), source: Box::new(error) });
                }
            }
        }
        match error {
            DeltaTableError::Transaction { source: TransactionError::CommitConflict(conflict) } => {
                tracing::debug!(table = table_name, %conflict, "commit lost to a concurrent one");
                Ok(TableCommit::Conflict)
            }
            error => Err(LakeError::Delta { table: table_name.to_string(), source: Box::new(error) }),
        }
    }

    /// The latest version of a table if it holds any of `paths` (relative to the table).
    async fn version_holding(&self, table: &str, paths: &[String]) -> Result<Option<i64>> {
        let Some(delta) = self.load_table(table).await? else { return Ok(None) };
        let snapshot = delta.snapshot().map_err(LakeError::delta(table))?;
        let holds =
            snapshot.log_data().iter().any(|view| paths.iter().any(|path| view.path() == path.as_str()));
        Ok(holds.then(|| i64::try_from(snapshot.version()).unwrap_or(i64::MAX)))
    }

    /// The latest version of a table and its files, or none if the table does not exist yet.
    pub async fn table_files(&self, table: &str) -> Result<Option<(i64, Vec<CommittedFile>)>> {
        let Some(delta) = self.load_table(table).await? else { return Ok(None) };
        Ok(Some((version_of(&delta), self.files_of(&delta, table).await?)))
    }

    /// Replaces one partition of a table (a job's result for one window) with `file` in one
    /// commit: readers see the previous result or the new one, never both or neither. Creates
    /// the table, or adds the columns it lacks, first. `order` ranks the writers of the
    /// partition (a window's revision and attempt): a commit is refused with
    /// [`TableCommit::Conflict`] when one of a higher or equal rank replaced it already.
    #[allow(clippy::too_many_arguments, reason = "each is one fact of the replacement, named at the call")]
    pub async fn replace_partition(
        &self,
        table: &str,
        partition_column: &str,
        file: &CommittedFile,
        stats_json: &str,
        data_columns: &ArrowSchema,
        order: i64,
    ) -> Result<TableCommit> {
        let delta =
            self.ensure_table(table, data_columns, &[partition_column], TableSettings::default()).await?;
        let app_id = result_app_id(table, &file.partition);
        let replaced_by = delta
            .snapshot()
            .map_err(LakeError::delta(table))?
            .transaction_version(delta.log_store().as_ref(), &app_id)
            .await
            .map_err(LakeError::delta(table))?;
        if replaced_by.is_some_and(|replaced_by| replaced_by >= order) {
            return Ok(TableCommit::Conflict);
        }
        let now_millis = crate::commit::now_micros() / 1_000;
        let mut actions = vec![
            Action::Add(add_action(table, file, Some(stats_json), now_millis, true)),
            Action::Txn(Transaction { app_id, version: order, last_updated: Some(now_millis) }),
        ];
        for replaced in
            self.files_of(&delta, table).await?.into_iter().filter(|live| live.partition == file.partition)
        {
            actions.push(Action::Remove(remove_action(table, &replaced, now_millis, true)));
        }
        let value = partition_values(&file.partition).remove(partition_column).flatten().unwrap_or_default();
        let operation = DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: Some(vec![partition_column.to_string()]),
            predicate: Some(format!("{partition_column} = '{}'", value.replace('\'', "''"))),
        };
        self.commit(table, &delta, actions, &CommitInfoEntry::default(), operation).await
    }

    /// Adds one file to an unpartitioned table, creating the table on first use, in a commit of
    /// its own; returns the version. Appends never conflict with each other, so a commit that lost
    /// the race for a version is built again on the newer one.
    pub async fn append_file(
        &self,
        table: &str,
        file: &CommittedFile,
        stats_json: &str,
        data_columns: &ArrowSchema,
    ) -> Result<i64> {
        for _ in 0..SCHEMA_ATTEMPTS {
            let delta = self.ensure_table(table, data_columns, &[], TableSettings::default()).await?;
            let now_millis = crate::commit::now_micros() / 1_000;
            let actions = vec![Action::Add(add_action(table, file, Some(stats_json), now_millis, true))];
            let operation =
                DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
            if let TableCommit::Committed { version } =
                self.commit(table, &delta, actions, &CommitInfoEntry::default(), operation).await?
            {
                return Ok(version);
            }
        }
        Err(LakeError::Delta {
            table: table.to_string(),
            source: Box::new(DeltaTableError::generic("every attempt to append lost to a concurrent commit")),
        })
    }

    /// The files of the stream table's latest version, in path order.
    pub async fn live_files(&self, stream: &str) -> Result<Vec<CommittedFile>> {
        match self.load_table(stream).await? {
            Some(table) => self.files_of(&table, stream).await,
            None => Ok(Vec::new()),
        }
    }

    /// The files of one loaded version of a table whose path is `table`.
    pub async fn files_of(&self, delta: &DeltaTable, table: &str) -> Result<Vec<CommittedFile>> {
        let snapshot = delta.snapshot().map_err(LakeError::delta(table))?;
        let mut files: Vec<CommittedFile> = snapshot
            .log_data()
            .iter()
            .map(|view| {
                let values = view.partition_values_map();
                let partition = partition_segment(&values, snapshot.metadata().partition_columns());
                // The only public way to a file's tags in delta-rs 1.1; reading them from the
                // Arrow log data would need its crate-private column helpers.
                #[allow(deprecated, reason = "see above")]
                let tags = view.add_action().tags.unwrap_or_default();
                let tag =
                    |key: &str| tags.get(key).cloned().flatten().and_then(|text| text.parse::<i64>().ok());
                CommittedFile {
                    path: format!("{table}/{}", view.path()),
                    partition,
                    num_rows: view.num_records().unwrap_or(0) as u64,
                    size_bytes: u64::try_from(view.size()).unwrap_or(0),
                    min_event_time_micros: tag(TAG_MIN_EVENT_TIME).unwrap_or(i64::MIN),
                    max_event_time_micros: tag(TAG_MAX_EVENT_TIME).unwrap_or(i64::MAX),
                }
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Records committed across the first `num_partitions` Kafka partitions: the sum of their
    /// committed positions.
    pub async fn committed_offsets(&self, stream: &str, num_partitions: i32) -> Result<i64> {
        let Some(table) = self.load_table(stream).await? else { return Ok(0) };
        let mut total: i64 = 0;
        for partition in 0..num_partitions {
            total += position_in(&table, stream, partition).await?.map_or(0, |position| position.end_offset);
        }
        Ok(total)
    }

    /// The completeness watermark of a stream: the smallest, over its `num_partitions` Kafka
    /// partitions, of the largest event time committed in each, minus `allowed_lateness_micros`,
    /// read from one version of the table. `None` until every partition has committed something.
    pub async fn watermark(
        &self,
        stream: &str,
        num_partitions: i32,
        allowed_lateness_micros: i64,
    ) -> Result<Option<i64>> {
        let Some(table) = self.load_table(stream).await? else { return Ok(None) };
        let mut watermark_opt: Option<i64> = None;
        for partition in 0..num_partitions {
            let Some(max_event_time) = position_in(&table, stream, partition)
                .await?
                .and_then(|position| position.max_event_time_micros_opt)
            else {
                return Ok(None);
            };
            watermark_opt =
                Some(watermark_opt.map_or(max_event_time, |watermark| watermark.min(max_event_time)));
        }
        Ok(watermark_opt.map(|watermark| watermark.saturating_sub(allowed_lateness_micros)))
    }

    /// Every commit in a table's log that is still there (log cleanup removes the oldest), in
    /// version order.
    pub async fn history(&self, table: &str) -> Result<Vec<LogCommit>> {
        let log_dir = self.absolute(&layout::delta_log_dir(table));
        let mut paths: Vec<(i64, Path)> = self
            .store()
            .list(Some(&log_dir))
            .try_filter_map(|object| async move {
                let name = object.location.filename().unwrap_or_default().to_string();
                Ok(name
                    .strip_suffix(".json")
                    .and_then(|version| version.parse::<i64>().ok())
                    .map(|version| (version, object.location)))
            })
            .try_collect()
            .await
            .map_err(LakeError::store("list", &log_dir))?;
        paths.sort();
        let reads = paths.into_iter().map(|(version, path)| {
            let lake = self.clone();
            async move {
                let bytes = lake.read_path(&path).await?;
                parse_log_commit(version, &path, &bytes)
            }
        });
        futures::stream::iter(reads).buffered(16).try_collect().await
    }

    /// Every flush recorded in a stream table's log, in (Kafka partition, version) order.
    pub async fn commits(&self, stream: &str) -> Result<Vec<CommitRecord>> {
        let mut records: Vec<CommitRecord> = Vec::new();
        for commit in self.history(stream).await? {
            for mut record in commit.flushes {
                record.table_version_opt = Some(commit.version);
                records.push(record);
            }
        }
        records.sort_by_key(|record| (record.kafka_partition, record.table_version_opt));
        Ok(records)
    }

    /// Every merge recorded in a stream table's log, in version order.
    pub async fn merges(&self, stream: &str) -> Result<Vec<MergeRecord>> {
        Ok(self.history(stream).await?.into_iter().filter_map(|commit| commit.merge_opt).collect())
    }

    /// Deletes what no reader of the table can need any more, and returns how many files:
    /// - data files no version references, left by a flush or merge that did not commit, once
    ///   older than `uncommitted_min_age` (a flush in progress is younger);
    /// - files a merge removed, once removed longer than `removed_retention` ago, so that a query
    ///   still reading an older version finds them.
    pub async fn vacuum(
        &self,
        table: &str,
        uncommitted_min_age: std::time::Duration,
        removed_retention: std::time::Duration,
    ) -> Result<usize> {
        let Some(delta) = self.load_table(table).await? else { return Ok(0) };
        let snapshot = delta.snapshot().map_err(LakeError::delta(table))?;
        let live: std::collections::HashSet<String> =
            snapshot.log_data().iter().map(|view| view.path().to_string()).collect();
        let log_store = delta.log_store();
        let tombstones: HashMap<String, i64> = snapshot
            .all_tombstones(log_store.as_ref())
            .map_ok(|tombstone| (tombstone.path().to_string(), tombstone.deletion_timestamp().unwrap_or(0)))
            .try_collect()
            .await
            .map_err(LakeError::delta(table))?;
        let table_dir = self.absolute(table);
        let table_parts = table_dir.parts().count();
        let uncommitted_before = crate::commit::micros_ago(uncommitted_min_age);
        let removed_before_millis = crate::commit::micros_ago(removed_retention) / 1_000;
        let objects: Vec<object_store::ObjectMeta> = self
            .store()
            .list(Some(&table_dir))
            .try_collect()
            .await
            .map_err(LakeError::store("list", &table_dir))?;
        let mut deleted = 0;
        for object in objects {
            let relative: Vec<String> =
                object.location.parts().skip(table_parts).map(|part| part.as_ref().to_string()).collect();
            if relative.first().is_none_or(|first| first == layout::DELTA_LOG_DIR || first.starts_with('_')) {
                continue;
            }
            let relative = relative.join("/");
            if live.contains(&relative) {
                continue;
            }
            let expired = match tombstones.get(&relative) {
                Some(&removed_at_millis) => removed_at_millis < removed_before_millis,
                None => object.last_modified.timestamp_micros() < uncommitted_before,
            };
            if expired {
                match self.store().delete(&object.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(source) => {
                        return Err(LakeError::Store {
                            operation: "delete",
                            path: object.location.to_string(),
                            source,
                        });
                    }
                }
            }
        }
        Ok(deleted)
    }
}

/// The committed position of a partition in one loaded version of a stream table.
async fn position_in(
    table: &DeltaTable,
    stream: &str,
    kafka_partition: i32,
) -> Result<Option<CommittedPosition>> {
    let snapshot = table.snapshot().map_err(LakeError::delta(stream))?;
    let log_store = table.log_store();
    let Some(end_offset) = snapshot
        .transaction_version(log_store.as_ref(), position_app_id(stream, kafka_partition))
        .await
        .map_err(LakeError::delta(stream))?
    else {
        return Ok(None);
    };
    let max_event_time_micros_opt = snapshot
        .transaction_version(log_store.as_ref(), event_time_app_id(stream, kafka_partition))
        .await
        .map_err(LakeError::delta(stream))?;
    Ok(Some(CommittedPosition {
        end_offset,
        max_event_time_micros_opt,
        edge_positions: BTreeMap::new(),
        table_version: i64::try_from(snapshot.version()).unwrap_or(i64::MAX),
    }))
}

fn add_action(
    table: &str,
    file: &CommittedFile,
    stats_json: Option<&str>,
    now_millis: i64,
    data_change: bool,
) -> Add {
    let tags = HashMap::from([
        (TAG_MIN_EVENT_TIME.to_string(), Some(file.min_event_time_micros.to_string())),
        (TAG_MAX_EVENT_TIME.to_string(), Some(file.max_event_time_micros.to_string())),
    ]);
    Add {
        path: relative_to_table(table, &file.path),
        partition_values: partition_values(&file.partition),
        size: i64::try_from(file.size_bytes).unwrap_or(i64::MAX),
        modification_time: now_millis,
        data_change,
        stats: stats_json.map(str::to_string),
        tags: Some(tags),
        ..Add::default()
    }
}

fn remove_action(table: &str, file: &CommittedFile, now_millis: i64, data_change: bool) -> Remove {
    Remove {
        path: relative_to_table(table, &file.path),
        data_change,
        deletion_timestamp: Some(now_millis),
        extended_file_metadata: Some(true),
        partition_values: Some(partition_values(&file.partition)),
        size: i64::try_from(file.size_bytes).ok(),
        ..Remove::default()
    }
}

/// A file path relative to the lake root as the table-relative path its log records.
fn relative_to_table(table: &str, path: &str) -> String {
    path.strip_prefix(table).and_then(|rest| rest.strip_prefix('/')).unwrap_or(path).to_string()
}

/// `dt=2026-11-26/hour=08` as partition values.
pub fn partition_values(segment: &str) -> HashMap<String, Option<String>> {
    segment
        .split('/')
        .filter_map(|part| part.split_once('='))
        .map(|(name, value)| (name.to_string(), Some(value.to_string())))
        .collect()
}

/// Partition values as the Hive segment, in the table's partition column order.
fn partition_segment(values: &HashMap<String, Option<String>>, columns: &[String]) -> String {
    columns
        .iter()
        .map(|column| format!("{column}={}", values.get(column).cloned().flatten().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("/")
}

fn parse_log_commit(version: i64, path: &Path, bytes: &[u8]) -> Result<LogCommit> {
    let invalid = |source| LakeError::InvalidCommit { path: path.to_string(), source };
    let mut commit = LogCommit {
        version,
        operation: String::new(),
        added: Vec::new(),
        removed: Vec::new(),
        transactions: BTreeMap::new(),
        flushes: Vec::new(),
        merge_opt: None,
    };
    for line in bytes.split(|&byte| byte == b'\n').filter(|line| !line.is_empty()) {
        let action: serde_json::Value = serde_json::from_slice(line).map_err(invalid)?;
        if let Some(add) = action.get("add") {
            commit.added.push(add["path"].as_str().unwrap_or_default().to_string());
        } else if let Some(remove) = action.get("remove") {
            commit.removed.push(remove["path"].as_str().unwrap_or_default().to_string());
        } else if let Some(txn) = action.get("txn") {
            commit.transactions.insert(
                txn["appId"].as_str().unwrap_or_default().to_string(),
                txn["version"].as_i64().unwrap_or_default(),
            );
        } else if let Some(info) = action.get("commitInfo") {
            commit.operation = info["operation"].as_str().unwrap_or_default().to_string();
            if let Some(entry) = info.get(COMMIT_INFO_KEY) {
                let entry: CommitInfoEntry = serde_json::from_value(entry.clone()).map_err(invalid)?;
                commit.flushes = entry.flushes;
                commit.merge_opt = entry.merge;
            }
        }
    }
    Ok(commit)
}

/// The version a loaded table is at (-1 before its first commit).
pub(crate) fn version_of(delta: &DeltaTable) -> i64 {
    delta.version().and_then(|version| i64::try_from(version).ok()).unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_schema::{DataType as ArrowType, Field, TimeUnit};
    use object_store::memory::InMemory;

    use super::*;

    fn lake() -> Lake {
        Lake::new(Arc::new(InMemory::new()), Path::from("lake"))
    }

    async fn telemetry_table(lake: &Lake) {
        lake.ensure_table("telemetry", &columns(false), &["dt", "hour"], TableSettings::default())
            .await
            .unwrap();
    }

    fn columns(extra: bool) -> ArrowSchema {
        let mut fields = vec![
            Field::new("device_id", ArrowType::Utf8, false),
            Field::new("ts", ArrowType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        ];
        if extra {
            fields.push(Field::new("battery", ArrowType::Float64, true));
        }
        ArrowSchema::new(fields)
    }

    fn flush(previous: Option<i64>, start: i64, end: i64, file_name: &str) -> (CommitRecord, Vec<NewFile>) {
        let file = CommittedFile {
            path: format!("telemetry/dt=2026-11-26/hour=08/{file_name}"),
            partition: "dt=2026-11-26/hour=08".into(),
            num_rows: (end - start) as u64,
            size_bytes: 4,
            min_event_time_micros: start,
            max_event_time_micros: end,
        };
        let record = CommitRecord {
            stream: "telemetry".into(),
            topic: "sluice.telemetry".into(),
            kafka_partition: 3,
            previous_end_offset_opt: previous,
            start_offset: start,
            end_offset: end,
            files: vec![file.clone()],
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            edge_positions_at_opt: None,
            num_edge_repeats_dropped: 0,
            max_event_time_micros_opt: Some(end * 10),
            writer_id: "test".into(),
            created_at_micros: 0,
            reset_opt: None,
            table_version_opt: None,
        };
        let stats = format!("{{\"numRecords\":{}}}", end - start);
        (record, vec![NewFile { file, stats_json: stats }])
    }

    /// A merge of `inputs` (files of `dt=2026-11-26/hour=08`) into the file `output_name` of
    /// `num_rows` rows.
    fn merge_of(inputs: Vec<CommittedFile>, output_name: &str, num_rows: u64) -> MergeRecord {
        let output = CommittedFile {
            path: format!("telemetry/dt=2026-11-26/hour=08/{output_name}"),
            num_rows,
            ..inputs[0].clone()
        };
        MergeRecord {
            stream: "telemetry".into(),
            partition: "dt=2026-11-26/hour=08".into(),
            inputs,
            output,
            writer_id: "test".into(),
            created_at_micros: 0,
        }
    }

    async fn commit(lake: &Lake, previous: Option<i64>, start: i64, end: i64, name: &str) -> TableCommit {
        let (record, files) = flush(previous, start, end, name);
        lake.create_commit(&record, &files).await.unwrap()
    }

    #[tokio::test]
    async fn positions_move_only_from_where_the_writer_started() {
        let lake = lake();
        telemetry_table(&lake).await;
        assert_eq!(lake.latest_commit("telemetry", 3).await.unwrap(), None);
        assert!(matches!(
            commit(&lake, None, 0, 10, "a.parquet").await,
            TableCommit::Committed { version: 1 }
        ));
        assert!(matches!(commit(&lake, Some(10), 10, 25, "b.parquet").await, TableCommit::Committed { .. }));
        // A stale writer replaying from an older position, and one that thinks nothing is
        // committed yet, are both refused: the position never goes back and nothing is added.
        assert_eq!(commit(&lake, Some(10), 10, 40, "stale.parquet").await, TableCommit::Conflict);
        assert_eq!(commit(&lake, None, 0, 40, "stale2.parquet").await, TableCommit::Conflict);
        let position = lake.latest_commit("telemetry", 3).await.unwrap().unwrap();
        assert_eq!((position.end_offset, position.max_event_time_micros_opt), (25, Some(250)));
        let files: Vec<String> =
            lake.live_files("telemetry").await.unwrap().into_iter().map(|f| f.path).collect();
        assert_eq!(
            files,
            vec!["telemetry/dt=2026-11-26/hour=08/a.parquet", "telemetry/dt=2026-11-26/hour=08/b.parquet"]
        );
        let commits = lake.commits("telemetry").await.unwrap();
        let ranges: Vec<(i64, i64)> = commits.iter().map(|r| (r.start_offset, r.end_offset)).collect();
        assert_eq!(ranges, vec![(0, 10), (10, 25)]);
        assert_eq!(lake.committed_offsets("telemetry", 4).await.unwrap(), 25);
        // Partitions 0-2 have committed nothing: no watermark yet.
        assert_eq!(lake.watermark("telemetry", 4, 0).await.unwrap(), None);
        assert_eq!(lake.watermark("telemetry", 1, 0).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_local_directory_replays_many_commits_in_order() {
        // The local file system lists in directory order, not name order.
        let directory = tempfile::TempDir::new().unwrap();
        let config =
            crate::ObjectStoreConfig { url: directory.path().display().to_string(), ..Default::default() };
        let lake = crate::open_lake(&config).unwrap();
        lake.ensure_table(
            "telemetry",
            &columns(false),
            &["dt", "hour"],
            TableSettings { checkpoint_interval: 5, ..TableSettings::default() },
        )
        .await
        .unwrap();
        let mut previous = None;
        for flush_index in 0..23 {
            let end = (flush_index + 1) * 10;
            let outcome = commit(&lake, previous, end - 10, end, &format!("f{flush_index}.parquet")).await;
            assert!(matches!(outcome, TableCommit::Committed { .. }), "{outcome:?}");
            previous = Some(end);
        }
        let position = lake.latest_commit("telemetry", 3).await.unwrap().unwrap();
        assert_eq!((position.end_offset, position.table_version), (230, 23));
        assert_eq!(lake.live_files("telemetry").await.unwrap().len(), 23);
        let checkpoints = std::fs::read_dir(directory.path().join("telemetry/_delta_log"))
            .unwrap()
            .filter(|entry| {
                entry.as_ref().unwrap().file_name().to_string_lossy().ends_with(".checkpoint.parquet")
            })
            .count();
        assert!(checkpoints >= 4, "a checkpoint every 5 commits: {checkpoints}");
    }

    #[tokio::test]
    async fn log_entries_past_the_retention_go_at_the_next_checkpoint() {
        let directory = tempfile::TempDir::new().unwrap();
        let config =
            crate::ObjectStoreConfig { url: directory.path().display().to_string(), ..Default::default() };
        let lake = crate::open_lake(&config).unwrap();
        let settings = TableSettings { checkpoint_interval: 5, log_retention_ms: 1_000 };
        lake.ensure_table("telemetry", &columns(false), &["dt", "hour"], settings).await.unwrap();
        let log_dir = directory.path().join("telemetry/_delta_log");
        let commits_in_log = || {
            let mut versions: Vec<u64> = std::fs::read_dir(&log_dir)
                .unwrap()
                .filter_map(|entry| {
                    entry.unwrap().file_name().to_string_lossy().strip_suffix(".json")?.parse().ok()
                })
                .collect();
            versions.sort_unstable();
            versions
        };
        for flush_index in 0..11 {
            if flush_index == 6 {
                assert_eq!(commits_in_log().first(), Some(&0), "no checkpoint past the retention yet");
                tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
            }
            // From the seventh on (versions 7 to 11), the checkpoint at 10 removes the older.
            let start = flush_index * 10;
            let previous = (flush_index > 0).then_some(start);
            commit(&lake, previous, start, start + 10, &format!("f{flush_index}.parquet")).await;
        }
        // delta-rs removes the expired entries up to a checkpoint it can still start from; the
        // ones younger than the retention stay.
        let versions = commits_in_log();
        assert!(versions.first().is_some_and(|&first| first > 0), "{versions:?}");
        assert!((7..=11).all(|version| versions.contains(&version)), "{versions:?}");
        let position = lake.latest_commit("telemetry", 3).await.unwrap().unwrap();
        assert_eq!((position.end_offset, position.table_version), (110, 11));
        assert_eq!(lake.live_files("telemetry").await.unwrap().len(), 11);
    }

    #[tokio::test]
    async fn flushes_of_several_partitions_share_a_commit_and_a_stale_one_is_left_out() {
        let lake = lake();
        telemetry_table(&lake).await;
        commit(&lake, None, 0, 10, "p3-first.parquet").await;
        let mut flushes = Vec::new();
        for partition in 0..3 {
            let (mut record, files) = flush(None, 0, 5, &format!("p{partition}.parquet"));
            record.kafka_partition = partition;
            flushes.push((record, files));
        }
        // Partition 3 moved on since this writer read it: its flush must not land.
        flushes.push(flush(None, 0, 10, "p3-stale.parquet"));
        let committed = lake.create_commits("telemetry", &flushes).await.unwrap();
        assert_eq!(committed, FlushesCommitted { version_opt: Some(2), stale_partitions: vec![3] });
        for partition in 0..3 {
            assert_eq!(lake.latest_commit("telemetry", partition).await.unwrap().unwrap().end_offset, 5);
        }
        let files: Vec<String> =
            lake.live_files("telemetry").await.unwrap().into_iter().map(|f| f.path).collect();
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(!files.iter().any(|path| path.ends_with("p3-stale.parquet")));
        let history = lake.history("telemetry").await.unwrap();
        assert_eq!(history.last().unwrap().flushes.len(), 3, "one commit for three flushes");
    }

    /// A store whose first log commit lands but answers as if another writer had made it, as
    /// object_store's retry of a conditional put whose answer was lost does.
    #[derive(Debug)]
    struct LostAnswer {
        inner: Arc<dyn ObjectStore>,
        lost: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for LostAnswer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "LostAnswer({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for LostAnswer {
        async fn put_opts(
            &self,
            location: &Path,
            payload: object_store::PutPayload,
            options: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let result = self.inner.put_opts(location, payload, options).await?;
            let is_commit = location.as_ref().contains("_delta_log/") && location.as_ref().ends_with(".json");
            if is_commit && self.lost.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(object_store::Error::AlreadyExists {
                    path: location.to_string(),
                    source: "the retry of a put whose answer was lost".into(),
                });
            }
            Ok(result)
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            options: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, options).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_counts_as_committed() {
        let store = Arc::new(LostAnswer {
            inner: Arc::new(InMemory::new()),
            lost: std::sync::atomic::AtomicBool::new(false),
        });
        let lake = Lake::new(Arc::clone(&store) as Arc<dyn ObjectStore>, Path::from("lake"));
        telemetry_table(&lake).await;
        store.lost.store(true, std::sync::atomic::Ordering::SeqCst);
        let outcome = commit(&lake, None, 0, 10, "a.parquet").await;
        assert!(matches!(outcome, TableCommit::Committed { version: 1 }), "{outcome:?}");
        assert!(!store.lost.load(std::sync::atomic::Ordering::SeqCst), "the answer was lost");
        assert_eq!(lake.latest_commit("telemetry", 3).await.unwrap().unwrap().end_offset, 10);
        assert_eq!(lake.live_files("telemetry").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_writers_of_one_partition_commit_once() {
        let lake = lake();
        telemetry_table(&lake).await;
        let attempts = (0..6).map(|writer| {
            let lake = lake.clone();
            tokio::spawn(async move { commit(&lake, None, 0, 10, &format!("w{writer}.parquet")).await })
        });
        let outcomes = futures::future::join_all(attempts).await;
        let created = outcomes
            .into_iter()
            .filter(|outcome| matches!(outcome.as_ref().unwrap(), TableCommit::Committed { .. }))
            .count();
        assert_eq!(created, 1);
        assert_eq!(lake.live_files("telemetry").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn schema_gains_added_fields_once_and_refuses_type_changes() {
        let lake = lake();
        let settings = TableSettings::default();
        lake.ensure_table("telemetry", &columns(false), &["dt", "hour"], settings).await.unwrap();
        let evolving = (0..4).map(|_| {
            let lake = lake.clone();
            tokio::spawn(async move {
                lake.ensure_table("telemetry", &columns(true), &["dt", "hour"], settings).await
            })
        });
        for outcome in futures::future::join_all(evolving).await {
            outcome.unwrap().unwrap();
        }
        let table = lake.load_table("telemetry").await.unwrap().unwrap();
        let schema = table.snapshot().unwrap().schema();
        assert!(schema.field("battery").is_some());
        let added = lake.history("telemetry").await.unwrap();
        assert_eq!(added.iter().filter(|commit| commit.operation == "ADD COLUMN").count(), 1);
        let changed = ArrowSchema::new(vec![Field::new("device_id", ArrowType::Int64, false)]);
        let refused = lake.ensure_table("telemetry", &changed, &["dt", "hour"], settings).await;
        assert!(matches!(refused, Err(LakeError::Schema { .. })), "{refused:?}");
    }

    #[tokio::test]
    async fn merges_swap_files_once() {
        let lake = lake();
        telemetry_table(&lake).await;
        commit(&lake, None, 0, 10, "a.parquet").await;
        commit(&lake, Some(10), 10, 20, "b.parquet").await;
        let merge = merge_of(lake.live_files("telemetry").await.unwrap(), "m.parquet", 20);
        let output = merge.output.clone();
        assert!(matches!(
            lake.create_merge(&merge, "{\"numRecords\":20}").await.unwrap(),
            TableCommit::Committed { .. }
        ));
        assert_eq!(lake.create_merge(&merge, "{\"numRecords\":20}").await.unwrap(), TableCommit::Conflict);
        let live = lake.live_files("telemetry").await.unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].path.as_str(), live[0].num_rows), (output.path.as_str(), 20));
        assert_eq!(lake.merges("telemetry").await.unwrap().len(), 1);
        let (version, _) = lake.table_files("telemetry").await.unwrap().unwrap();
        assert_eq!(data_changes(&lake, version).await, vec![false; 3], "the same rows in fewer files");
    }

    #[tokio::test]
    async fn latest_tables_answer_as_a_fresh_load_through_commits_merges_checkpoints_and_a_new_table() {
        let lake = lake();
        let latest = crate::LatestTables::default();
        let both = || async {
            let fresh = lake.table_files("telemetry").await.unwrap();
            let kept = latest.table_files(&lake, "telemetry").await.unwrap();
            assert_eq!(kept, fresh);
            fresh
        };
        assert_eq!(both().await, None, "no table yet");
        telemetry_table(&lake).await;
        commit(&lake, None, 0, 10, "a.parquet").await;
        assert_eq!(both().await.unwrap().1.len(), 1);
        commit(&lake, Some(10), 10, 20, "b.parquet").await;
        let (_, inputs) = both().await.unwrap();
        assert_eq!(inputs.len(), 2, "a commit after the first read");
        let merge = merge_of(inputs, "m.parquet", 20);
        lake.create_merge(&merge, "{\"numRecords\":20}").await.unwrap();
        assert_eq!(both().await.unwrap().1, vec![merge.output], "a merge removes its inputs");
        // Past a checkpoint (every 10 versions) from the kept version 3: rebuilt from it.
        for flush_index in 2..14 {
            let start = flush_index * 10;
            commit(&lake, Some(start), start, start + 10, &format!("f{flush_index}.parquet")).await;
        }
        let (version, files) = both().await.unwrap();
        assert_eq!((version, files.len()), (15, 13));
        // Two commits after the kept version 15 with no checkpoint between: replayed.
        for flush_index in 14..16 {
            let start = flush_index * 10;
            commit(&lake, Some(start), start, start + 10, &format!("f{flush_index}.parquet")).await;
        }
        assert_eq!(both().await.unwrap().0, 17);

        // The table deleted and made again: up to a lower version than the one kept, then up to
        // a higher one, whose log has a commit of the kept version's name.
        let delete_table = || async {
            let table_objects: Vec<Path> = lake
                .store()
                .list(Some(&Path::from("lake/telemetry")))
                .map_ok(|meta| meta.location)
                .try_collect()
                .await
                .unwrap();
            for location in table_objects {
                lake.store().delete(&location).await.unwrap();
            }
        };
        delete_table().await;
        telemetry_table(&lake).await;
        commit(&lake, None, 0, 10, "again.parquet").await;
        let (version, files) = both().await.unwrap();
        assert_eq!(version, 1);
        assert!(files[0].path.ends_with("again.parquet"), "{files:?}");

        // Kept: version 4 of the second table; the third reaches version 5 without a checkpoint.
        for flush_index in 1..4 {
            let start = flush_index * 10;
            commit(&lake, Some(start), start, start + 10, &format!("again{flush_index}.parquet")).await;
        }
        assert_eq!(both().await.unwrap().0, 4);
        delete_table().await;
        telemetry_table(&lake).await;
        for flush_index in 0..5 {
            let start = flush_index * 10;
            let previous = (flush_index > 0).then_some(start);
            commit(&lake, previous, start, start + 10, &format!("third{flush_index}.parquet")).await;
        }
        let (version, files) = both().await.unwrap();
        assert_eq!(version, 5);
        assert!(files.iter().all(|file| file.path.contains("third")), "{files:?}");
    }

    /// The `dataChange` flag of every add and remove in one version of the telemetry table.
    async fn data_changes(lake: &Lake, version: i64) -> Vec<bool> {
        let log = lake.get(&layout::delta_commit("telemetry", version)).await.unwrap();
        std::str::from_utf8(&log)
            .unwrap()
            .lines()
            .filter_map(|line| {
                let action: serde_json::Value = serde_json::from_str(line).unwrap();
                let file = action.get("add").or_else(|| action.get("remove"))?;
                Some(file["dataChange"].as_bool().unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_merge_that_drops_duplicate_readings_changes_data() {
        let lake = lake();
        telemetry_table(&lake).await;
        commit(&lake, None, 0, 10, "a.parquet").await;
        commit(&lake, Some(10), 10, 20, "b.parquet").await;
        let merge = merge_of(lake.live_files("telemetry").await.unwrap(), "m.parquet", 19);
        let TableCommit::Committed { version } =
            lake.create_merge(&merge, "{\"numRecords\":19}").await.unwrap()
        else {
            panic!("the merge commits");
        };
        assert_eq!(data_changes(&lake, version).await, vec![true; 3], "a reading fewer than the inputs held");
    }

    #[tokio::test]
    async fn of_two_merges_built_on_the_same_version_one_loses() {
        let lake = lake();
        telemetry_table(&lake).await;
        commit(&lake, None, 0, 10, "a.parquet").await;
        commit(&lake, Some(10), 10, 20, "b.parquet").await;
        let inputs = lake.live_files("telemetry").await.unwrap();
        // Both merges check their inputs before either commits, as two replicas racing would.
        let merges = (0..2).map(|replica| MergeRecord {
            stream: "telemetry".into(),
            partition: "dt=2026-11-26/hour=08".into(),
            inputs: inputs.clone(),
            output: CommittedFile {
                path: format!("telemetry/dt=2026-11-26/hour=08/m{replica}.parquet"),
                num_rows: 20,
                ..inputs[0].clone()
            },
            writer_id: format!("replica-{replica}"),
            created_at_micros: 0,
        });
        let table = lake.load_table("telemetry").await.unwrap().unwrap();
        let mut outcomes = Vec::new();
        for merge in merges {
            let now_millis = crate::commit::now_micros() / 1_000;
            let actions = vec![
                Action::Add(add_action(
                    "telemetry",
                    &merge.output,
                    Some("{\"numRecords\":20}"),
                    now_millis,
                    false,
                )),
                Action::Txn(Transaction::new(merge_app_id("telemetry", &merge.partition), 1)),
            ];
            let entry = CommitInfoEntry { flushes: Vec::new(), merge: Some(merge.clone()) };
            let operation = DeltaOperation::Optimize { predicate: None, target_size: 0 };
            outcomes.push(lake.commit("telemetry", &table, actions, &entry, operation).await.unwrap());
        }
        assert!(matches!(outcomes[0], TableCommit::Committed { .. }));
        assert_eq!(outcomes[1], TableCommit::Conflict);
    }

    #[tokio::test]
    async fn an_older_attempt_never_replaces_a_newer_result() {
        let lake = lake();
        let columns = ArrowSchema::new(vec![Field::new("readings", ArrowType::Int64, false)]);
        let result = |name: &str| CommittedFile {
            path: format!("results/hourly/window_start=20261126T080000Z/{name}.parquet"),
            partition: "window_start=20261126T080000Z".into(),
            num_rows: 1,
            size_bytes: 1,
            min_event_time_micros: 0,
            max_event_time_micros: 0,
        };
        let replace = |name: &str, order: i64| {
            let (lake, columns, file) = (lake.clone(), columns.clone(), result(name));
            async move {
                lake.replace_partition("results/hourly", "window_start", &file, "{}", &columns, order)
                    .await
                    .unwrap()
            }
        };
        assert!(matches!(replace("first", 1).await, TableCommit::Committed { .. }));
        assert!(matches!(replace("newer", 3).await, TableCommit::Committed { .. }));
        assert_eq!(replace("stale", 2).await, TableCommit::Conflict);
        let files: Vec<String> =
            lake.live_files("results/hourly").await.unwrap().into_iter().map(|f| f.path).collect();
        assert_eq!(files, vec![result("newer").path]);
    }

    #[tokio::test]
    async fn watermark_is_the_slowest_partition_minus_lateness() {
        let lake = lake();
        telemetry_table(&lake).await;
        for (partition, max_event_time) in [(0, 3_000), (1, 9_000), (2, 9_000)] {
            let (mut record, files) = flush(None, 0, 10, &format!("p{partition}.parquet"));
            record.kafka_partition = partition;
            record.max_event_time_micros_opt = Some(max_event_time);
            assert!(matches!(
                lake.create_commit(&record, &files).await.unwrap(),
                TableCommit::Committed { .. }
            ));
            if partition == 0 {
                assert_eq!(
                    lake.watermark("telemetry", 2, 0).await.unwrap(),
                    None,
                    "partition 1 has no commit"
                );
            }
        }
        assert_eq!(lake.watermark("telemetry", 3, 1_000).await.unwrap(), Some(2_000));
    }

    #[tokio::test]
    async fn vacuum_removes_uncommitted_and_long_removed_files_only() {
        let lake = lake();
        telemetry_table(&lake).await;
        let dir = "telemetry/dt=2026-11-26/hour=08";
        for name in ["a.parquet", "b.parquet", "orphan.parquet"] {
            lake.put(&format!("{dir}/{name}"), b"PAR1".to_vec()).await.unwrap();
        }
        commit(&lake, None, 0, 10, "a.parquet").await;
        let inputs = lake.live_files("telemetry").await.unwrap();
        let num_rows = inputs[0].num_rows;
        let merge = merge_of(inputs, "b.parquet", num_rows);
        lake.create_merge(&merge, "{}").await.unwrap();
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(lake.vacuum("telemetry", hour, hour).await.unwrap(), 0, "all too young");
        // The orphan goes; the merged-away file stays while its removal is recent.
        assert_eq!(lake.vacuum("telemetry", std::time::Duration::ZERO, hour).await.unwrap(), 1);
        assert!(lake.get(&format!("{dir}/orphan.parquet")).await.is_err());
        assert!(lake.get(&format!("{dir}/a.parquet")).await.is_ok());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(
            lake.vacuum("telemetry", std::time::Duration::ZERO, std::time::Duration::ZERO).await.unwrap(),
            1
        );
        assert!(lake.get(&format!("{dir}/a.parquet")).await.is_err());
        assert!(lake.get(&format!("{dir}/b.parquet")).await.is_ok(), "live file kept");
        assert!(lake.load_table("telemetry").await.unwrap().is_some(), "log kept");
    }
}
