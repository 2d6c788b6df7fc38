//! Reading encrypted columns: which sessions decrypt them, the DataFusion hook that hands Parquet
//! the keys, and the plan check that refuses every other session's reads of them with the column
//! named, before anything is read, rather than let Parquet fail mid-scan.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_schema::SchemaRef;
use async_trait::async_trait;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::config::EncryptionFactoryOptions;
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::source_as_provider;
use datafusion::error::DataFusionError;
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::logical_expr::LogicalPlan;
use datafusion::parquet::encryption::decrypt::FileDecryptionProperties;
use datafusion::parquet::encryption::encrypt::FileEncryptionProperties;
use object_store::path::Path;
use sluice_jobs::signing::glob_matches;
use sluice_lake::encryption::LakeEncryption;

use crate::catalog::QueryError;

/// The name the lake's decryption is registered under in a session's runtime.
pub(crate) const FACTORY_ID: &str = "sluice-lake";

/// Who a session reads for; it decrypts encrypted columns only for a reader allowed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader<'a> {
    /// Reads no encrypted column, whatever keys the catalog holds.
    Plaintext,
    /// Whoever holds the key provider itself: an operator's CLI with the key file.
    KeyHolder,
    /// A job: its runs decrypt when `encryption.decrypting_jobs` names it.
    Job(&'a str),
    /// A job that runs with engine `ballista`: plans travel to the workers without keys
    /// (datafusion-proto carries no decryption settings), so it never decrypts.
    RemoteJob(&'a str),
}

impl<'a> Reader<'a> {
    /// The reader a job's runs are on `engine`.
    pub fn job(name: &'a str, engine: sluice_jobs::job::Engine) -> Self {
        match engine {
            sluice_jobs::job::Engine::Ballista => Self::RemoteJob(name),
            sluice_jobs::job::Engine::Local => Self::Job(name),
        }
    }
}

impl Reader<'_> {
    /// Whether this reader's sessions decrypt under `encryption`.
    pub(crate) fn decrypts(self, encryption: &LakeEncryption) -> bool {
        encryption.holds_keys()
            && match self {
                Self::Plaintext => false,
                Self::KeyHolder => true,
                Self::Job(job) => encryption.decrypting_jobs().iter().any(|glob| glob_matches(glob, job)),
                Self::RemoteJob(_) => false,
            }
    }

    /// Why this reader does not decrypt, for the refusal.
    fn why_not(self, encryption: &LakeEncryption) -> String {
        match self {
            _ if !encryption.holds_keys() => {
                "this process holds no keys (encryption.key_file is not set)".to_string()
            }
            Self::Plaintext | Self::KeyHolder => "this session does not decrypt".to_string(),
            Self::Job(job) => format!("job '{job}' is not among encryption.decrypting_jobs"),
            Self::RemoteJob(job) => format!(
                "job '{job}' runs with engine 'ballista', whose workers are given no keys (use engine 'local')"
            ),
        }
    }
}

/// Hands Parquet the lake's key retriever for every file of a decrypting session's encrypted
/// streams (plaintext files read through it too). Built once per session: every file's keys are
/// in the file, so one retriever serves them all.
#[derive(Debug)]
pub(crate) struct LakeDecryption {
    properties: Arc<FileDecryptionProperties>,
}

impl LakeDecryption {
    pub(crate) fn new(encryption: &LakeEncryption) -> Result<Self, DataFusionError> {
        let properties =
            encryption.decryption().map_err(|error| DataFusionError::External(Box::new(error)))?;
        Ok(Self { properties })
    }
}

#[async_trait]
impl EncryptionFactory for LakeDecryption {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        _file_path: &Path,
    ) -> datafusion::error::Result<Option<Arc<FileEncryptionProperties>>> {
        // Sessions only read the streams; results are written elsewhere, in plaintext.
        Ok(None)
    }

    async fn get_file_decryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _file_path: &Path,
    ) -> datafusion::error::Result<Option<Arc<FileDecryptionProperties>>> {
        Ok(Some(Arc::clone(&self.properties)))
    }
}

/// The encrypted columns a session may not read, by the URL of their stream's table, and why.
#[derive(Debug, Clone)]
pub(crate) struct UndecryptableColumns {
    /// Table URL, then the stream and its encrypted columns.
    pub(crate) tables: BTreeMap<String, (String, BTreeSet<String>)>,
    pub(crate) why: String,
}

impl UndecryptableColumns {
    pub(crate) fn new(encryption: &LakeEncryption, reader: Reader<'_>) -> Self {
        Self { tables: BTreeMap::new(), why: reader.why_not(encryption) }
    }

    /// Refuses `plan` if it reads any of the columns: projected by a scan of their table, or in
    /// a filter pushed into one.
    pub(crate) fn check(&self, plan: &LogicalPlan) -> Result<(), QueryError> {
        let mut read: BTreeSet<(String, String)> = BTreeSet::new();
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Some((stream, columns)) = self.table_of(scan)
            {
                let projected = scan.projected_schema.fields().iter().map(|field| field.name().clone());
                let filtered = scan.filters.iter().flat_map(|filter| {
                    filter.column_refs().into_iter().map(|column| column.name.clone()).collect::<Vec<_>>()
                });
                for column in projected.chain(filtered) {
                    if columns.contains(&column) {
                        read.insert((stream.clone(), column));
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
        if read.is_empty() {
            return Ok(());
        }
        let named: Vec<String> = read.iter().map(|(stream, column)| format!("{stream}.{column}")).collect();
        Err(QueryError::Refused(format!(
            "the query reads {} ({}), encrypted in the lake, and {}; leave {} out of the query or have \
             it allowed to decrypt",
            if named.len() == 1 { "a column" } else { "columns" },
            named.join(", "),
            self.why,
            if named.len() == 1 { "it" } else { "them" },
        )))
    }

    fn table_of(&self, scan: &datafusion::logical_expr::TableScan) -> Option<&(String, BTreeSet<String>)> {
        let provider = source_as_provider(&scan.source).ok()?;
        let table = provider.downcast_ref::<ListingTable>()?;
        table.table_paths().iter().find_map(|url| self.tables.get(url.as_str()))
    }
}

/// The encrypted columns of `stream`, owned.
pub(crate) fn encrypted_columns(encryption: &LakeEncryption, stream: &str) -> BTreeSet<String> {
    encryption.encrypted_columns(stream).into_iter().map(str::to_string).collect()
}
