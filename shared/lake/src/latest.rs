//! The latest version of tables that a reader asks for again and again, brought up to date from
//! the version it read last instead of loaded from the newest checkpoint each time.
//!
//! A window run starts by loading its stream's latest version. Loading parses the newest
//! checkpoint, which holds every live file: on a day of unmerged flushes (6,000 files) that was
//! about 85 ms of every run, hourly ones included (docs/benchmarks.md). Brought up to date, a
//! table reads only the commits made since, usually none or a few.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};

use deltalake_core::DeltaTable;
use futures::lock::Mutex;
use object_store::ObjectStoreExt as _;

use crate::commit::{CommittedFile, Lake, LakeError};
use crate::layout;
use crate::table::version_of;

type Result<T> = std::result::Result<T, LakeError>;

/// Tables as last read, by table path. Each table has its own lock, so that a slow load of one
/// does not hold up runs over the others.
#[derive(Default)]
pub struct LatestTables {
    tables: SyncMutex<HashMap<String, Arc<Mutex<Option<KnownTable>>>>>,
}

struct KnownTable {
    delta: DeltaTable,
    version: i64,
    /// The kept version's commit file as the store described it: a table deleted and made again
    /// has a commit of the same name, but not the same object.
    commit: CommitIdentity,
    files: Vec<CommittedFile>,
}

#[derive(Debug, PartialEq, Eq)]
struct CommitIdentity {
    e_tag: Option<String>,
    last_modified: chrono::DateTime<chrono::Utc>,
    size: u64,
}

impl std::fmt::Debug for LatestTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatestTables").finish_non_exhaustive()
    }
}

impl LatestTables {
    /// The latest version of `table` and its files in path order, or none if the table does not
    /// exist yet: the same answer as [`Lake::table_files`].
    ///
    /// A table read before is brought up to date from the version read then, if that version's
    /// commit is still the same object in the log (a log cleaned up past it, or a table deleted
    /// and made again, loads the table afresh); anything that fails on the way loads it afresh
    /// too.
    pub async fn table_files(&self, lake: &Lake, table: &str) -> Result<Option<(i64, Vec<CommittedFile>)>> {
        let entry = {
            let mut tables = self.tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(tables.entry(table.to_string()).or_default())
        };
        let mut kept = entry.lock().await;
        if let Some(known) = kept.as_mut() {
            match Self::bring_up_to_date(lake, table, known).await {
                Ok(true) => return Ok(Some((known.version, known.files.clone()))),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(table, error = %error, "could not bring the table up to date; loading it afresh")
                }
            }
            *kept = None;
        }
        let Some(delta) = lake.load_table(table).await? else { return Ok(None) };
        let version = version_of(&delta);
        let files = lake.files_of(&delta, table).await?;
        // Without the commit's identity the table is answered but not kept.
        if let Some(commit) = commit_identity(lake, table, version).await? {
            *kept = Some(KnownTable { delta, version, commit, files: files.clone() });
        }
        Ok(Some((version, files)))
    }

    /// Whether `known` could be brought up to date (false: load the table afresh).
    async fn bring_up_to_date(lake: &Lake, table: &str, known: &mut KnownTable) -> Result<bool> {
        if commit_identity(lake, table, known.version).await?.as_ref() != Some(&known.commit) {
            return Ok(false);
        }
        known.delta.update_incremental(None).await.map_err(LakeError::delta(table))?;
        let version = version_of(&known.delta);
        if version != known.version {
            let Some(commit) = commit_identity(lake, table, version).await? else { return Ok(false) };
            known.files = lake.files_of(&known.delta, table).await?;
            known.version = version;
            known.commit = commit;
        }
        Ok(true)
    }
}

/// How the store describes the commit file of `version`, or none if there is no such file.
async fn commit_identity(lake: &Lake, table: &str, version: i64) -> Result<Option<CommitIdentity>> {
    let commit = lake.absolute(&layout::delta_commit(table, version));
    match lake.store().head(&commit).await {
        Ok(meta) => {
            Ok(Some(CommitIdentity { e_tag: meta.e_tag, last_modified: meta.last_modified, size: meta.size }))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(LakeError::store("head", &commit)(source)),
    }
}
