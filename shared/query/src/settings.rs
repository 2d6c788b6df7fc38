//! The query settings every reader of the lake shares (the executor's `[query]` and `[tables]`
//! sections; the CLI reads the same file), and the catalog they describe.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_lake::encryption::{EncryptionConfig, EncryptionError, LakeEncryption};
use sluice_lake::{ObjectStoreConfig, StoreError, open_store};
use sluice_schema::{SchemaError, SchemaRegistry, SchemasConfig};

use crate::catalog::Catalog;
use crate::limits::RunLimits;
use crate::tables::TablesConfig;

/// DataFusion settings for each run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Parallelism inside one run; 0 means one per core.
    pub target_partitions: usize,
    /// Memory one run may hold; sorts and aggregations spill to disk beyond it. 0 means no limit.
    pub memory_limit_bytes: usize,
    /// Rows of one window's result; a run that produces more fails with the reason. 0: no limit.
    pub max_result_rows: u64,
    /// Bytes of one window's result file (Parquet, as written); past it the run fails. 0: no limit.
    pub max_result_bytes: u64,
    /// The largest value (string, binary, list) a function such as `repeat`, `lpad`, `concat` or
    /// `range` may build; DataFusion's memory pool does not see these. 0: no limit.
    pub max_value_bytes: usize,
    /// What one such function call may build for one batch of rows, all values together.
    /// 0: no limit.
    pub max_function_output_bytes: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            target_partitions: 0,
            memory_limit_bytes: 1024 * 1024 * 1024,
            max_result_rows: 1_000_000,
            max_result_bytes: 256 * 1024 * 1024,
            max_value_bytes: 1024 * 1024,
            max_function_output_bytes: 64 * 1024 * 1024,
        }
    }
}

impl QueryConfig {
    /// The limits a run is held to, besides the memory pool's.
    pub fn run_limits(&self, max_timeout_ms: u64) -> RunLimits {
        RunLimits {
            max_timeout: std::time::Duration::from_millis(max_timeout_ms),
            max_result_rows: self.max_result_rows,
            max_result_bytes: self.max_result_bytes,
            max_value_bytes: self.max_value_bytes,
            max_function_output_bytes: self.max_function_output_bytes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenCatalogError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("failed to open the object store")]
    Store(#[from] StoreError),
    #[error("failed to set up column encryption")]
    Encryption(#[from] EncryptionError),
}

/// The catalog a configuration describes: the lake's store, the stream schemas, the reference
/// tables, run limits with `max_timeout_ms` as the longest timeout a job may ask for. No remote
/// engine: the executor attaches its cluster's.
pub fn open_catalog(
    schemas: &SchemasConfig,
    object_store: &ObjectStoreConfig,
    tables: &TablesConfig,
    query: &QueryConfig,
    encryption: &EncryptionConfig,
    max_timeout_ms: u64,
) -> Result<Catalog, OpenCatalogError> {
    let registry = Arc::new(SchemaRegistry::load_directory(&schemas.directory)?);
    let encryption_opt = LakeEncryption::from_config(encryption, &registry)?;
    let (store, root) = open_store(object_store)?;
    Ok(Catalog::new(store, root, registry, tables.reference.clone())
        .with_encryption(encryption_opt)
        .with_target_partitions(query.target_partitions)
        .with_memory_limit(query.memory_limit_bytes)
        .with_run_limits(query.run_limits(max_timeout_ms)))
}
