//! The latest version of tables that a reader asks for again and again, brought up to date from
//! the version it read last instead of loaded from the newest checkpoint each time.
//!
//! A window run starts by loading its stream's latest version. Loading parses the newest
//! checkpoint, which holds every live file: on a day of unmerged flushes (6,000 files) that was
//! about 85 ms of every run, hourly ones included (docs/benchmarks.md). Brought up to date, a
//! table reads only the commits made since, usually none or a few.

use std::collections::HashMap;

use deltalake_core::DeltaTable;
use futures::lock::Mutex;
use object_store::ObjectStoreExt as _;

use crate::commit::{CommittedFile, Lake, LakeError};
use crate::layout;

type Result<T> = std::result::Result<T, LakeError>;

/// Tables as last read, by table path. Shared by clones of whoever holds it.
#[derive(Default)]
pub struct LatestTables {
    tables: Mutex<HashMap<String, KnownTable>>,
}

struct KnownTable {
    delta: DeltaTable,
    version: i64,
    files: Vec<CommittedFile>,
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
    /// commit is still in the log (a log cleaned up past it, or a table deleted and made again,
    /// loads the table afresh); anything that fails on the way loads it afresh too.
    pub async fn table_files(&self, lake: &Lake, table: &str) -> Result<Option<(i64, Vec<CommittedFile>)>> {
        let mut tables = self.tables.lock().await;
        if let Some(known) = tables.get_mut(table) {
            match Self::bring_up_to_date(lake, table, known).await {
                Ok(true) => return Ok(Some((known.version, known.files.clone()))),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(table, error = %error, "could not bring the table up to date; loading it afresh")
                }
            }
            tables.remove(table);
        }
        let Some(delta) = lake.load_table(table).await? else { return Ok(None) };
        let version = version_of(&delta);
        let files = lake.files_of(&delta, table).await?;
        tables.insert(table.to_string(), KnownTable { delta, version, files: files.clone() });
        Ok(Some((version, files)))
    }

    /// Whether `known` could be brought up to date (false: load the table afresh).
    async fn bring_up_to_date(lake: &Lake, table: &str, known: &mut KnownTable) -> Result<bool> {
        let commit = lake.absolute(&format!("{}/{:020}.json", layout::delta_log_dir(table), known.version));
        match lake.store().head(&commit).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(source) => return Err(LakeError::store("head", &commit)(source)),
        }
        known.delta.update_incremental(None).await.map_err(LakeError::delta(table))?;
        let version = version_of(&known.delta);
        if version != known.version {
            known.files = lake.files_of(&known.delta, table).await?;
            known.version = version;
        }
        Ok(true)
    }
}

fn version_of(delta: &DeltaTable) -> i64 {
    delta.version().and_then(|version| i64::try_from(version).ok()).unwrap_or(-1)
}
