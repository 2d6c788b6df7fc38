//! What SQL sees: each stream as a table of its committed rows, partitioned by `dt` (and
//! `hour`), and the reference tables from config; and the rules a query must follow.
//!
//! Stream tables list their files from one Delta version of the table (a snapshot taken once per
//! query), never from the directory, so a query sees every committed row once even while the
//! compactor commits or merges files: the log is the truth (docs/delivery-semantics.md).
//!
//! Why one file of about 740 lines of code: the snapshot, the session that registers its tables,
//! the window filter and the read-only rule are one contract (a query sees one version, only the
//! window's partitions, and writes nothing), and each piece relies on the others' choices.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::{
    CacheManagerConfig, DEFAULT_FILE_STATISTICS_MEMORY_LIMIT, DEFAULT_METADATA_CACHE_LIMIT,
    FileMetadataCache, FileStatisticsCache,
};
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::{Expr, col, lit};
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{
    CsvReadOptions, DataFrame, ParquetReadOptions, SQLOptions, SessionConfig, SessionContext,
};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::parser::ParserError;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use sluice_lake::encryption::LakeEncryption;
use sluice_lake::{
    CommittedFile, DATE_PARTITION_COLUMN, HOUR_PARTITION_COLUMN, Lake, LakeError, LatestTables,
    PartitionGranularity,
};
use sluice_schema::{EVENT_TIME_FIELD, KEY_FIELD, SchemaRegistry, to_arrow_schema};

use crate::encryption::{FACTORY_ID, LakeDecryption, Reader, UndecryptableColumns, encrypted_columns};
use crate::engine::RemoteEngine;
use crate::join_order::BuildFromGroupedSide;
use crate::limits::{RunLimits, bound_value_building_functions};
use crate::small_files::CoalesceSmallFileBatches;
pub use crate::tables::{ReferenceFormat, ReferenceTable};
use crate::window_bounds::WindowScope;
use crate::window_read::{WindowRead, holds_rows_of};
use sluice_jobs::job::{WINDOW_END_PLACEHOLDER, WINDOW_START_PLACEHOLDER};

/// DataFusion reaches the lake through these two URLs: stream tables through the committed-files
/// view of the store, reference tables through the store itself.
const COMMITTED_URL: &str = "sluice-committed://lake/";
const STORE_URL: &str = "sluice-store://lake/";
/// Partitions of a sort below this size are sorted as one batch rather than merged.
const SORT_IN_PLACE_THRESHOLD_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("failed to read the stream tables")]
    Lake(#[from] LakeError),
    #[error("failed to set up the query engine")]
    DataFusion(#[from] DataFusionError),
    #[error("reference table '{name}' at '{path}' cannot be read")]
    Reference {
        name: String,
        path: String,
        #[source]
        source: DataFusionError,
    },
}

/// Why a query was refused or could not be planned. Both are about the SQL alone, so its
/// Display is the sentence for the person who wrote it.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Not one read-only query, or nested past what the parser and planner can take.
    #[error("{0}")]
    Refused(String),
    /// DataFusion could not parse or plan it (an unknown column, a type mismatch). Shown as
    /// `describe` words it; not a `source`, since the message already is that error's sentence.
    #[error("{}", describe(.0))]
    Planning(DataFusionError),
}

/// One Delta version of each stream table: the files a query reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    streams: BTreeMap<String, Vec<CommittedFile>>,
    versions: BTreeMap<String, i64>,
}

impl Snapshot {
    /// The table version read of each stream that has a table.
    pub fn versions(&self) -> &BTreeMap<String, i64> {
        &self.versions
    }

    pub fn files(&self, stream: &str) -> &[CommittedFile] {
        self.streams.get(stream).map(Vec::as_slice).unwrap_or_default()
    }

    /// Granularity as the compactor wrote it: hourly partitions have an `hour=` segment. A stream
    /// with no files yet is taken to be hourly, the compactor's default.
    pub fn granularity(&self, stream: &str) -> PartitionGranularity {
        self.files(stream)
            .first()
            .map_or(PartitionGranularity::Hour, |file| PartitionGranularity::of_segment(&file.partition))
    }

    /// Rows of the committed files of `streams` that hold rows of `[start, end)`, by their
    /// recorded event-time range: what a window run read, and what restatement compares with.
    pub fn rows_overlapping(&self, streams: &[String], start_micros: i64, end_micros: i64) -> u64 {
        streams
            .iter()
            .flat_map(|stream| self.files(stream))
            .filter(|file| holds_rows_of(file, start_micros, end_micros))
            .map(|file| file.num_rows)
            .sum()
    }

    /// Committed rows and bytes of `files` (full paths in the store, as plans name them).
    pub fn totals_of(&self, root: &Path, files: &BTreeSet<Path>) -> (u64, u64) {
        self.streams
            .values()
            .flatten()
            .filter(|file| files.contains(&location_in_store(root, &file.path)))
            .fold((0, 0), |(rows, bytes), file| (rows + file.num_rows, bytes + file.size_bytes))
    }
}

fn location_in_store(root: &Path, relative: &str) -> Path {
    let relative = Path::from(relative);
    if root.as_ref().is_empty() { relative } else { Path::from_iter(root.parts().chain(relative.parts())) }
}

/// Which rows the stream tables hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every committed row.
    All,
    /// Rows whose event time lies in `[start, end)`; only the partitions of that interval are read.
    Window { start_micros: i64, end_micros: i64 },
}

/// Builds query sessions over the lake.
#[derive(Clone)]
pub struct Catalog {
    lake: Lake,
    store: Arc<dyn ObjectStore>,
    root: Path,
    registry: Arc<SchemaRegistry>,
    reference_tables: Vec<ReferenceTable>,
    target_partitions: usize,
    memory_limit_bytes: usize,
    run_limits: RunLimits,
    remote_engine_opt: Option<Arc<dyn RemoteEngine>>,
    file_caches: FileCaches,
    /// Decrypting sessions' own: statistics they read of encrypted columns stay out of the rest's.
    decrypting_file_caches: FileCaches,
    encryption_opt: Option<Arc<LakeEncryption>>,
    latest_tables: Arc<LatestTables>,
}

/// Parquet footers and the statistics read from them, kept across sessions. A committed file's
/// path names one content for good (every name carries a UUID), so what was read of it once
/// stays true, and a window run does not fetch each file's footer again: twice per file and run
/// before (planning, then scanning), each a GET on S3. DataFusion's listing cache stays one per
/// session: listings change with every commit.
#[derive(Clone)]
struct FileCaches {
    footers: Arc<FileMetadataCache>,
    statistics: Arc<FileStatisticsCache>,
}

impl FileCaches {
    fn new() -> Self {
        Self {
            footers: Arc::new(DefaultCache::new(DEFAULT_METADATA_CACHE_LIMIT)),
            statistics: Arc::new(DefaultCache::new(DEFAULT_FILE_STATISTICS_MEMORY_LIMIT)),
        }
    }

    fn config(&self) -> CacheManagerConfig {
        CacheManagerConfig::default()
            .with_file_metadata_cache(Some(Arc::clone(&self.footers)))
            .with_file_statistics_cache(Some(Arc::clone(&self.statistics)))
    }
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Catalog")
            .field("root", &self.root)
            .field("streams", &self.stream_names())
            .field("reference_tables", &self.reference_tables)
            .finish_non_exhaustive()
    }
}

impl Catalog {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        root: Path,
        registry: Arc<SchemaRegistry>,
        reference_tables: Vec<ReferenceTable>,
    ) -> Self {
        Self {
            lake: Lake::new(Arc::clone(&store), root.clone()),
            store,
            root,
            registry,
            reference_tables,
            target_partitions: std::thread::available_parallelism().map_or(2, usize::from),
            memory_limit_bytes: 0,
            run_limits: RunLimits::default(),
            remote_engine_opt: None,
            file_caches: FileCaches::new(),
            decrypting_file_caches: FileCaches::new(),
            encryption_opt: None,
            latest_tables: Arc::new(LatestTables::default()),
        }
    }

    /// Column encryption of the lake: which sessions decrypt, and which are refused the columns.
    pub fn with_encryption(mut self, encryption_opt: Option<Arc<LakeEncryption>>) -> Self {
        self.encryption_opt = encryption_opt;
        self
    }

    pub fn encryption(&self) -> Option<&Arc<LakeEncryption>> {
        self.encryption_opt.as_ref()
    }

    /// DataFusion's parallelism inside one query (0: one per core).
    pub fn with_target_partitions(mut self, target_partitions: usize) -> Self {
        if target_partitions > 0 {
            self.target_partitions = target_partitions;
        }
        self
    }

    /// Memory one query may hold before operators spill or fail (0: unbounded).
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit_bytes = bytes;
        self
    }

    /// Bounds on what the pool does not see: every session's value-building functions, the
    /// timeouts jobs may ask for, the size of results.
    pub fn with_run_limits(mut self, run_limits: RunLimits) -> Self {
        self.run_limits = run_limits;
        self
    }

    pub fn run_limits(&self) -> &RunLimits {
        &self.run_limits
    }

    /// The cluster that runs jobs with `engine: ballista`.
    pub fn with_remote_engine(mut self, remote_engine_opt: Option<Arc<dyn RemoteEngine>>) -> Self {
        self.remote_engine_opt = remote_engine_opt;
        self
    }

    pub fn remote_engine(&self) -> Option<&Arc<dyn RemoteEngine>> {
        self.remote_engine_opt.as_ref()
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stream_names(&self) -> Vec<String> {
        self.registry.stream_names().map(str::to_string).collect()
    }

    pub fn reference_tables(&self) -> &[ReferenceTable] {
        &self.reference_tables
    }

    /// Loads the latest version of every stream table, each brought up to date from the version
    /// this catalog (or a clone of it) read last.
    pub async fn snapshot(&self) -> Result<Snapshot, CatalogError> {
        let mut snapshot = Snapshot::default();
        for stream in self.stream_names() {
            let (version, files) =
                self.latest_tables.table_files(&self.lake, &stream).await?.unwrap_or((-1, Vec::new()));
            if version >= 0 {
                snapshot.versions.insert(stream.clone(), version);
            }
            snapshot.streams.insert(stream, files);
        }
        Ok(snapshot)
    }

    /// A session whose tables are the streams (as of `snapshot`, limited to `scope`) and the
    /// reference tables. Reference tables that cannot be read are an error only when
    /// `require_reference_tables` is set; otherwise they are left out (a job that names one is
    /// then refused with "table not found"). It decrypts nothing: [`Catalog::session_for`] says
    /// for whom to.
    pub async fn session(
        &self,
        snapshot: &Snapshot,
        scope: Scope,
        require_reference_tables: bool,
    ) -> Result<SessionContext, CatalogError> {
        self.session_for(snapshot, scope, require_reference_tables, Reader::Plaintext).await
    }

    /// The same for `reader`: encrypted columns are decrypted only for a reader allowed to, and
    /// [`plan_query`] refuses other readers' queries of them.
    pub async fn session_for(
        &self,
        snapshot: &Snapshot,
        scope: Scope,
        require_reference_tables: bool,
        reader: Reader<'_>,
    ) -> Result<SessionContext, CatalogError> {
        let decrypting_opt =
            self.encryption_opt.as_ref().filter(|encryption| reader.decrypts(encryption)).map(Arc::clone);
        let caches = if decrypting_opt.is_some() { &self.decrypting_file_caches } else { &self.file_caches };
        let mut runtime = RuntimeEnvBuilder::new().with_cache_manager(caches.config());
        if self.memory_limit_bytes > 0 {
            runtime = runtime.with_memory_limit(self.memory_limit_bytes, 1.0);
        }
        let mut config = SessionConfig::new()
            .with_target_partitions(self.target_partitions)
            .with_information_schema(true)
            // Sorted by (device_id, ts) within files: worth keeping for merges and windows.
            .with_collect_statistics(true)
            // A window function over a day sorts that day's rows by device: one sort of the
            // concatenated rows measured 1.3-1.6x faster than sorting each batch and merging
            // them (docs/benchmarks.md). Still bounded: the memory pool spills past its limit.
            .set_usize("datafusion.execution.sort_in_place_threshold_bytes", SORT_IN_PLACE_THRESHOLD_BYTES);
        let streams = self.stream_names();
        if let Scope::Window { start_micros, end_micros } = scope {
            let streams = streams.clone();
            config = config.with_extension(Arc::new(WindowScope { start_micros, end_micros, streams }));
        }
        if let Some(encryption) = self.encryption_opt.as_ref().filter(|_| decrypting_opt.is_none()) {
            let mut undecryptable = UndecryptableColumns::new(encryption, reader);
            for stream in encryption.encrypted_streams() {
                let url = self.stream_table_url(stream)?;
                undecryptable.tables.insert(
                    url.as_str().to_string(),
                    (stream.to_string(), encrypted_columns(encryption, stream)),
                );
            }
            config = config.with_extension(Arc::new(undecryptable));
        }
        let runtime = runtime.build_arc()?;
        if let Some(encryption) = &decrypting_opt {
            runtime
                .register_parquet_encryption_factory(FACTORY_ID, Arc::new(LakeDecryption::new(encryption)?));
        }
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rules(CoalesceSmallFileBatches::with_rules(
                BuildFromGroupedSide::with_default_rules(PhysicalOptimizer::new().rules),
            ))
            .build();
        let ctx = SessionContext::new_with_state(state);
        bound_value_building_functions(&ctx, &self.run_limits);

        let committed = CommittedFilesStore::new(Arc::clone(&self.store), &self.root, snapshot, scope);
        ctx.register_object_store(&url(COMMITTED_URL), Arc::new(committed));
        ctx.register_object_store(&url(STORE_URL), Arc::clone(&self.store));

        for stream in &streams {
            let Some(schema) = self.registry.stream(stream) else { continue };
            let granularity = snapshot.granularity(stream);
            let decrypts = decrypting_opt
                .as_ref()
                .is_some_and(|encryption| !encryption.encrypted_columns(stream).is_empty());
            let table = self.stream_table(stream, stream_columns(schema), granularity, caches, decrypts)?;
            match scope {
                Scope::All => {
                    ctx.register_table(stream.as_str(), Arc::new(table))?;
                }
                Scope::Window { start_micros, end_micros } => {
                    let rows = ctx.read_table(Arc::new(table))?.filter(window_filter(
                        granularity,
                        snapshot.files(stream),
                        start_micros,
                        end_micros,
                    ))?;
                    ctx.register_table(stream.as_str(), rows.into_view())?;
                }
            }
        }

        for reference in &self.reference_tables {
            let location = format!("{STORE_URL}{}", self.relative_to_store(&reference.path));
            let registered = match reference.format {
                ReferenceFormat::Csv => register_csv_in_memory(&ctx, &reference.name, &location).await,
                ReferenceFormat::Parquet => {
                    ctx.register_parquet(reference.name.as_str(), &location, ParquetReadOptions::default())
                        .await
                }
            };
            if let Err(source) = registered {
                if require_reference_tables {
                    return Err(CatalogError::Reference {
                        name: reference.name.clone(),
                        path: reference.path.clone(),
                        source,
                    });
                }
                tracing::warn!(table = %reference.name, path = %reference.path, error = %source, "reference table left out");
            }
        }
        Ok(ctx)
    }

    fn relative_to_store(&self, relative: &str) -> String {
        let relative = relative.trim_start_matches('/');
        if self.root.as_ref().is_empty() { relative.to_string() } else { format!("{}/{relative}", self.root) }
    }

    fn stream_table_url(&self, stream: &str) -> Result<ListingTableUrl, DataFusionError> {
        ListingTableUrl::parse(format!("{COMMITTED_URL}{}/", self.relative_to_store(stream)))
    }

    /// `decrypts`: the table's files are read with the lake's keys (the stream has encrypted
    /// columns and the session may decrypt them).
    fn stream_table(
        &self,
        stream: &str,
        file_schema: SchemaRef,
        granularity: PartitionGranularity,
        caches: &FileCaches,
        decrypts: bool,
    ) -> Result<ListingTable, DataFusionError> {
        let table_url = self.stream_table_url(stream)?;
        // The compactor (and its merges) write every file sorted by key, then event time:
        // declared, it lets per-device windows and sorts merge files instead of sorting rows.
        let sort_order =
            vec![vec![col(KEY_FIELD).sort(true, false), col(EVENT_TIME_FIELD).sort(true, false)]];
        let mut format = ParquetFormat::default();
        if decrypts {
            let mut parquet_options = format.options().clone();
            parquet_options.crypto.factory_id = Some(FACTORY_ID.to_string());
            format = format.with_options(parquet_options);
        }
        let options = ListingOptions::new(Arc::new(format))
            .with_file_extension(".parquet")
            .with_table_partition_cols(partition_columns(granularity))
            .with_file_sort_order(sort_order);
        Ok(ListingTable::try_new(
            ListingTableConfig::new(table_url).with_listing_options(options).with_schema(file_schema),
        )?
        .with_cache(Some(Arc::clone(&caches.statistics))))
    }
}

/// A Ballista worker reads the files a plan names through the store itself: the plan was made
/// over the committed-files view, so the files it names are committed ones already.
pub fn register_worker_stores(runtime: &RuntimeEnv, store: Arc<dyn ObjectStore>) {
    runtime.register_object_store(&url(COMMITTED_URL), Arc::clone(&store));
    runtime.register_object_store(&url(STORE_URL), store);
}

/// Registers a CSV reference table that is read into memory when a query scans it, and only
/// then: jobs that do not join it do not pay for it.
async fn register_csv_in_memory(
    ctx: &SessionContext,
    name: &str,
    location: &str,
) -> Result<(), DataFusionError> {
    let file = ctx.read_csv(location, CsvReadOptions::new()).await?.into_view();
    ctx.register_table(name, Arc::new(LoadedOnScan { file }))?;
    Ok(())
}

/// A CSV file carries no row count, so the planner cannot tell a registry of a few thousand
/// devices from the day of readings it is joined with, and builds its hash table from the
/// readings. Loaded at scan, the table has exact statistics and becomes the small side of the
/// join (the daily percentile job ran 1.6-1.8x faster). Reference tables too big for memory
/// belong in Parquet, whose footers carry the counts.
#[derive(Debug)]
struct LoadedOnScan {
    file: Arc<dyn TableProvider>,
}

#[async_trait]
impl TableProvider for LoadedOnScan {
    fn schema(&self) -> SchemaRef {
        self.file.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let whole = self.file.scan(state, None, &[], None).await?;
        let batches = datafusion::physical_plan::collect(whole, state.task_ctx()).await?;
        MemTable::try_new(self.schema(), vec![batches])?.scan(state, projection, filters, limit).await
    }
}

fn url(text: &str) -> url::Url {
    #[allow(clippy::expect_used, reason = "a constant that parses")]
    url::Url::parse(text).expect("constant URL")
}

/// The Hive partition columns of a stream, as DataFusion sees them.
pub fn partition_columns(granularity: PartitionGranularity) -> Vec<(String, DataType)> {
    granularity.partition_columns().iter().map(|column| (column.to_string(), DataType::Utf8)).collect()
}

/// A stream's columns as runs read them: its Avro fields, where a field with a default is
/// nullable. A field added to a schema later (Avro needs a default for that) is missing from
/// the files committed before it; Delta readers read NULL there (the compactor adds the column
/// as nullable), and DataFusion refuses to fill a non-nullable column that a file lacks.
fn stream_columns(schema: &sluice_schema::StreamSchema) -> SchemaRef {
    let columns = to_arrow_schema(schema);
    let fields: Vec<Field> = columns
        .fields()
        .iter()
        .zip(&schema.fields)
        .map(|(column, field)| {
            column.as_ref().clone().with_nullable(column.is_nullable() || field.default_opt.is_some())
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The full schema of a stream table: its Avro fields, then the partition columns.
pub fn stream_table_schema(
    registry: &SchemaRegistry,
    stream: &str,
    granularity: PartitionGranularity,
) -> Option<SchemaRef> {
    let schema = registry.stream(stream)?;
    let mut fields: Vec<Field> =
        stream_columns(schema).fields().iter().map(|field| field.as_ref().clone()).collect();
    fields.extend(
        partition_columns(granularity)
            .into_iter()
            .map(|(name, data_type)| Field::new(name, data_type, false)),
    );
    Some(Arc::new(Schema::new(fields)))
}

pub fn timestamp_literal(micros: i64) -> ScalarValue {
    ScalarValue::TimestampMicrosecond(Some(micros), Some("UTC".into()))
}

/// Partition filter (for pruning: only the window's `dt`/`hour` directories are read) and, where
/// some file read holds rows outside the window, the row filter (the exact bounds) for
/// `[start, end)`. Files with no rows in the window are not listed at all (`CommittedFilesStore`).
fn window_filter(
    granularity: PartitionGranularity,
    files: &[CommittedFile],
    start_micros: i64,
    end_micros: i64,
) -> Expr {
    let read = WindowRead::new(granularity, start_micros, end_micros);
    let partition_filter = read
        .partitions()
        .iter()
        .map(|(date, hours)| {
            let day = col(DATE_PARTITION_COLUMN).eq(lit(date.clone()));
            let hour = |hour: &u8| lit(format!("{hour:02}"));
            // A window is one interval, so the hours it touches in a day are consecutive: a
            // range is two terms to evaluate per file where ORed hours were up to 24 (the
            // two-digit names order as the hours do).
            match (hours.first(), hours.last()) {
                (Some(first), Some(last)) if first == last => {
                    day.and(col(HOUR_PARTITION_COLUMN).eq(hour(first)))
                }
                (Some(first), Some(last)) => day
                    .and(col(HOUR_PARTITION_COLUMN).gt_eq(hour(first)))
                    .and(col(HOUR_PARTITION_COLUMN).lt_eq(hour(last))),
                _ => day,
            }
        })
        .reduce(Expr::or)
        .unwrap_or_else(|| lit(false));
    if !read.filters_rows(files) {
        return partition_filter;
    }
    let rows = col(EVENT_TIME_FIELD)
        .gt_eq(lit(timestamp_literal(start_micros)))
        .and(col(EVENT_TIME_FIELD).lt(lit(timestamp_literal(end_micros))));
    partition_filter.and(rows)
}

/// Plans `sql` as a single read-only query; `window_opt` binds `$window_start` and
/// `$window_end`. Everything else (DDL, DML, COPY, SET, several statements) is refused.
pub async fn plan_query(
    ctx: &SessionContext,
    sql: &str,
    window_opt: Option<(i64, i64)>,
) -> Result<DataFrame, QueryError> {
    check_read_only(sql)?;
    let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
    let frame = ctx.sql_with_options(sql, options).await.map_err(QueryError::Planning)?;
    let frame = match window_opt {
        None => frame,
        Some((start, end)) => bind_window(ctx, frame, start, end)?,
    };
    let undecryptable = ctx.state_ref().read().config().get_extension::<UndecryptableColumns>();
    if let Some(undecryptable) = undecryptable {
        // On the optimized plan: before projection pushdown every scan reads every column.
        let optimized = ctx.state().optimize(frame.logical_plan()).map_err(QueryError::Planning)?;
        undecryptable.check(&optimized)?;
    }
    Ok(frame)
}

fn bind_window(
    ctx: &SessionContext,
    frame: DataFrame,
    start: i64,
    end: i64,
) -> Result<DataFrame, QueryError> {
    let frame = frame
        .with_param_values(vec![
            (WINDOW_START_PLACEHOLDER, timestamp_literal(start)),
            (WINDOW_END_PLACEHOLDER, timestamp_literal(end)),
        ])
        .map_err(QueryError::Planning)?;
    let scope = ctx.state_ref().read().config().get_extension::<WindowScope>();
    match scope {
        Some(scope) if scope.start_micros == start && scope.end_micros == end => {
            let (state, plan) = frame.into_parts();
            let plan = scope.drop_implied_bounds(plan).map_err(QueryError::Planning)?;
            Ok(DataFrame::new(state, plan))
        }
        _ => Ok(frame),
    }
}

/// Refuses anything but one SELECT (or WITH ... SELECT, VALUES, UNION) before planning.
pub fn check_read_only(sql: &str) -> Result<(), QueryError> {
    // First, before any tree is built: a tree too deep would abort the process, not fail.
    crate::sql_depth::check_nesting(sql, crate::sql_depth::MAX_QUERY_NESTING)
        .map_err(|error| QueryError::Refused(error.to_string()))?;
    let statements = DFParser::parse_sql(sql).map_err(|error| match &error {
        DataFusionError::SQL(parser_error, _)
            if matches!(parser_error.as_ref(), ParserError::RecursionLimitExceeded) =>
        {
            QueryError::Refused(
                "the query nests parentheses, subqueries or CASE expressions too deeply: the parser's \
                 recursion limit is 50 (a subquery takes two or more); flatten it with CTEs or joins"
                    .to_string(),
            )
        }
        _ => QueryError::Planning(error),
    })?;
    if statements.len() != 1 {
        return Err(QueryError::Refused(format!(
            "a job holds exactly one query; found {} statements",
            statements.len()
        )));
    }
    match &statements[0] {
        DfStatement::Statement(statement) if matches!(statement.as_ref(), SqlStatement::Query(_)) => Ok(()),
        DfStatement::Statement(statement) => Err(QueryError::Refused(format!(
            "only a read-only query (SELECT) is allowed, not {}",
            statement_kind(&statement.to_string())
        ))),
        DfStatement::CreateExternalTable(_) => Err(QueryError::Refused(
            "only a read-only query (SELECT) is allowed, not CREATE EXTERNAL TABLE".into(),
        )),
        DfStatement::CopyTo(_) => {
            Err(QueryError::Refused("only a read-only query (SELECT) is allowed, not COPY".into()))
        }
        DfStatement::Explain(_) => {
            Err(QueryError::Refused("only a read-only query (SELECT) is allowed, not EXPLAIN".into()))
        }
        other => Err(QueryError::Refused(format!(
            "only a read-only query (SELECT) is allowed, not {}",
            statement_kind(&other.to_string())
        ))),
    }
}

/// The statement's leading keywords, e.g. `DROP TABLE`, for a message.
fn statement_kind(statement: &str) -> String {
    statement.split_whitespace().take(2).collect::<Vec<_>>().join(" ").to_uppercase()
}

/// Whether a store or file-system error is among the causes: DataFusion wraps them in
/// `External`, `ObjectStore`, `IoError` or Parquet's error, at any depth. Such a failure says
/// nothing about the query, so whoever classifies errors for a retry asks this first.
pub fn has_io_cause(error: &DataFusionError) -> bool {
    let mut cause_opt: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = cause_opt {
        if cause.is::<object_store::Error>() || cause.is::<std::io::Error>() {
            return true;
        }
        cause_opt = cause.source();
    }
    false
}

/// DataFusion errors carry context prefixes ("Error during planning: ..."); the submitter wants
/// the sentence about their SQL.
pub fn describe(error: &DataFusionError) -> String {
    let message = error.strip_backtrace();
    message.trim().to_string()
}

/// A read-only view of the lake's store in which a listing returns the files of one table
/// version (with their recorded sizes), and nothing else: not the files of a transaction that
/// never committed, not the inputs of a finished merge, not the output of an unfinished one.
#[derive(Debug)]
struct CommittedFilesStore {
    inner: Arc<dyn ObjectStore>,
    files: BTreeMap<Path, u64>,
}

impl CommittedFilesStore {
    /// In a window's scope, a file whose recorded event-time range misses the window is left
    /// out: no plan names it, so no footer of it is fetched and no byte of it read.
    fn new(inner: Arc<dyn ObjectStore>, root: &Path, snapshot: &Snapshot, scope: Scope) -> Self {
        let in_scope = |file: &CommittedFile| match scope {
            Scope::All => true,
            Scope::Window { start_micros, end_micros } => holds_rows_of(file, start_micros, end_micros),
        };
        let files = snapshot
            .streams
            .values()
            .flatten()
            .filter(|file| in_scope(file))
            .map(|file| (location_in_store(root, &file.path), file.size_bytes))
            .collect();
        Self { inner, files }
    }

    fn meta(location: &Path, size: u64) -> ObjectMeta {
        ObjectMeta {
            location: location.clone(),
            last_modified: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            size,
            e_tag: None,
            version: None,
        }
    }

    fn under<'a>(&'a self, prefix: Option<&'a Path>) -> impl Iterator<Item = (&'a Path, &'a u64)> + 'a {
        self.files
            .iter()
            .filter(move |(location, _)| prefix.is_none_or(|prefix| location.prefix_matches(prefix)))
    }

    /// The files under `prefix`, in path order, after `offset_opt` when one is given.
    fn listing(
        &self,
        prefix: Option<&Path>,
        offset_opt: Option<&Path>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let metas: Vec<_> = self
            .under(prefix)
            .filter(|(location, _)| offset_opt.is_none_or(|offset| *location > offset))
            .map(|(location, size)| Ok(Self::meta(location, *size)))
            .collect();
        futures::stream::iter(metas).boxed()
    }

    fn read_only(operation: &str) -> object_store::Error {
        object_store::Error::NotImplemented {
            operation: operation.to_string(),
            implementer: "the committed-files view (read-only)".to_string(),
        }
    }
}

impl fmt::Display for CommittedFilesStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommittedFiles({})", self.inner)
    }
}

// Every method is the view's own: a default would bypass the inner store's implementation (the
// local file system reads a file's column chunks with one open; the default `get_ranges` opens
// and stats the file once per range).
#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for CommittedFilesStore {
    async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> object_store::Result<PutResult> {
        Err(Self::read_only("put"))
    }

    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(Self::read_only("put_multipart"))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        locations.map(|_| Err(Self::read_only("delete"))).boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.listing(prefix, None)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.listing(prefix, Some(offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let depth = prefix.map_or(0, |prefix| prefix.parts().count());
        let mut common_prefixes = BTreeSet::new();
        let mut objects = Vec::new();
        for (location, size) in self.under(prefix) {
            let parts: Vec<_> = location.parts().collect();
            if parts.len() == depth + 1 {
                objects.push(Self::meta(location, *size));
            } else if parts.len() > depth + 1 {
                common_prefixes.insert(Path::from_iter(parts.into_iter().take(depth + 1)));
            }
        }
        Ok(ListResult { common_prefixes: common_prefixes.into_iter().collect(), objects })
    }

    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> object_store::Result<()> {
        Err(Self::read_only("copy"))
    }

    async fn rename_opts(&self, _: &Path, _: &Path, _: RenameOptions) -> object_store::Result<()> {
        Err(Self::read_only("rename"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    #[test]
    fn only_single_read_only_queries_pass() {
        assert!(check_read_only("SELECT 1").is_ok());
        assert!(check_read_only("WITH a AS (SELECT 1 AS x) SELECT x FROM a").is_ok());
        let refused = [
            ("DROP TABLE telemetry", "DROP TABLE"),
            ("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'", "CREATE EXTERNAL TABLE"),
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("INSERT INTO telemetry VALUES (1)", "INSERT INTO"),
            ("SELECT 1; SELECT 2", "exactly one query"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("SELEC 1", "Expected"),
        ];
        for (sql, expected) in refused {
            let error = check_read_only(sql).unwrap_err();
            assert!(error.to_string().contains(expected), "{sql}: {error}");
        }
    }

    #[test]
    fn window_filter_names_the_window_partitions() {
        let start = sluice_jobs::job::parse_timestamp_micros("2026-11-26T23:00:00Z").unwrap();
        let filter = window_filter(PartitionGranularity::Hour, &[], start, start + 2 * HOUR).to_string();
        assert!(filter.contains("Utf8(\"2026-11-26\")") && filter.contains("Utf8(\"23\")"), "{filter}");
        assert!(filter.contains("Utf8(\"2026-11-27\")") && filter.contains("Utf8(\"00\")"), "{filter}");
        assert!(!filter.contains("Utf8(\"01\")"), "{filter}");
        let days = window_filter(PartitionGranularity::Hour, &[], start, start + 72 * HOUR).to_string();
        assert!(!days.contains("hour"), "{days}");

        let midnight = start + HOUR;
        let day = window_filter(PartitionGranularity::Hour, &[], midnight, midnight + 24 * HOUR);
        assert_eq!(day, col(DATE_PARTITION_COLUMN).eq(lit("2026-11-27")));
        let hours = window_filter(PartitionGranularity::Hour, &[], midnight + 5 * HOUR, midnight + 8 * HOUR);
        let expected = col(DATE_PARTITION_COLUMN)
            .eq(lit("2026-11-27"))
            .and(col(HOUR_PARTITION_COLUMN).gt_eq(lit("05")))
            .and(col(HOUR_PARTITION_COLUMN).lt_eq(lit("07")));
        assert_eq!(hours, expected);
    }

    const HOUR: i64 = 3_600_000_000;
}
