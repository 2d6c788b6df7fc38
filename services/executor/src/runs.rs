//! Running one job over one window: plan it over one version of the stream tables, execute it
//! here or on the cluster within its limits, and commit its result (records.rs in sluice-jobs
//! says where runs and results are kept).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::{SendableRecordBatchStream, execute_stream};
use futures::StreamExt as _;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sluice_errors::{ErrorClass, chain_text};
use sluice_lake::TableCommit;

pub use sluice_jobs::records::*;
use sluice_lake::layout::{RESULT_PARTITION_COLUMN, result_partition, result_path, results_table};
pub use sluice_query::plan_stats::{planned_files, scan_stats, yield_between_batches};

use sluice_query::Reader;

use crate::catalog::{Catalog, Scope, Snapshot, describe, plan_query};
use crate::job::{Engine, JobDefinition};
pub use crate::run_error::RunError;

/// One attempt's work: plan over the window's partitions, run, write the result.
#[derive(Debug, Clone)]
pub struct WindowRun {
    pub catalog: Catalog,
    pub job: JobDefinition,
    /// The streams the job reads: their rows in the window are recorded for restatement.
    pub streams: Vec<String>,
    pub window_start_micros: i64,
    pub window_end_micros: i64,
    pub revision: u32,
    pub attempt: u32,
}

/// A result file written, not yet committed.
struct WrittenResult {
    stats: RunStats,
    input_rows: u64,
    result_path: String,
    input_versions: BTreeMap<String, i64>,
    schema: SchemaRef,
}

/// What a successful attempt produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub stats: RunStats,
    pub input_rows: u64,
    pub result_path: String,
    /// The version of each stream table the run read.
    pub input_versions: BTreeMap<String, i64>,
    /// The version of the results table that holds the result.
    pub result_version: i64,
}

/// A result's row group is written out once it holds this much: what the writer keeps in
/// memory stays bounded however many rows the result has.
const RESULT_ROW_GROUP_BYTES: usize = 16 * 1024 * 1024;

/// How long committing a written result may take.
const RESULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

impl WindowRun {
    /// Runs the attempt and stops it at `timeout`: planning, execution and writing the result
    /// file on `runtime`; loading the table versions and committing the result on the caller's
    /// runtime, as is the deadline. Plans that never yield cannot starve that runtime, and
    /// delta-rs runs its log work on the runtime it is called from. Aborting the task drops the
    /// plan's streams, which aborts the tasks DataFusion spawned for it, at their next yield
    /// (DataFusion's scans and exchanges yield every few batches).
    pub async fn execute_within(
        self,
        runtime: &tokio::runtime::Handle,
        timeout: Duration,
    ) -> Result<RunResult, RunError> {
        use tracing::Instrument as _;

        let deadline = tokio::time::Instant::now() + timeout;
        let snapshot = tokio::time::timeout_at(
            deadline,
            self.catalog.snapshot().instrument(tracing::info_span!("snapshot")),
        )
        .await
        .map_err(|_| RunError::Timeout(timeout))?
        .map_err(|error| RunError::Lake(chain_text(&error)))?;
        let run = self.clone();
        let mut task = runtime.spawn(run.execute(snapshot).instrument(tracing::Span::current()));
        let written = match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(result)) => result,
            // A panic in a function or operator fails this run, not the replica.
            Ok(Err(error)) if error.is_panic() => {
                Err(RunError::Panicked(sluice_errors::panic_message(error.into_panic().as_ref())))
            }
            Ok(Err(error)) => Err(RunError::Stopped(error.to_string())),
            Err(_) => {
                task.abort();
                Err(RunError::Timeout(timeout))
            }
        }?;
        // Bounded on its own, not by the run's deadline: a commit cut off at the deadline may
        // have landed, and a window would then be failed while its result is in the table.
        let result_version = tokio::time::timeout(
            RESULT_COMMIT_TIMEOUT,
            commit_result(
                &self.catalog,
                &self.job.name,
                self.window_start_micros,
                (i64::from(self.revision) << 32) | i64::from(self.attempt),
                &written,
            )
            .instrument(tracing::info_span!("commit_result")),
        )
        .await
        .map_err(|_| {
            RunError::Lake(format!("committing the result took over {RESULT_COMMIT_TIMEOUT:?}"))
        })??;
        Ok(RunResult {
            stats: written.stats,
            input_rows: written.input_rows,
            result_path: written.result_path,
            input_versions: written.input_versions,
            result_version,
        })
    }

    /// Each DataFusion phase runs in its own span (children of `job_run`), so that a trace shows
    /// where a slow window spent its time: listing committed files, planning, optimizing and
    /// physical planning, executing and writing the result.
    async fn execute(self, snapshot: Snapshot) -> Result<WrittenResult, RunError> {
        use tracing::Instrument as _;

        let input_rows =
            snapshot.rows_overlapping(&self.streams, self.window_start_micros, self.window_end_micros);
        let scope =
            Scope::Window { start_micros: self.window_start_micros, end_micros: self.window_end_micros };
        let frame = async {
            let ctx = self
                .catalog
                .session_for(&snapshot, scope, true, Reader::job(&self.job.name, self.job.engine))
                .await
                .map_err(|error| RunError::session(&error))?;
            plan_query(&ctx, &self.job.sql, Some((self.window_start_micros, self.window_end_micros)))
                .await
                .map_err(RunError::planning)
        }
        .instrument(tracing::info_span!("logical_plan"))
        .await?;
        let task_ctx = frame.task_ctx();
        let session_config = task_ctx.session_config().clone();
        let mut plan = frame
            .create_physical_plan()
            .instrument(tracing::info_span!("physical_plan"))
            .await
            .map_err(|error| RunError::from_datafusion(&error))?;
        if self.job.engine == Engine::Local {
            plan = yield_between_batches(plan).map_err(|error| RunError::from_datafusion(&error))?;
        }
        let execute_span = tracing::info_span!(
            "execute",
            partitions = plan.properties().output_partitioning().partition_count()
        );
        let path = result_path(&self.job.name, self.window_start_micros);
        let schema = crate::result_types::storable_schema(&plan.schema()).map_err(RunError::Invalid)?;
        let (rows_written, bytes_written) = async {
            let stream = match (self.job.engine, self.catalog.remote_engine()) {
                (Engine::Ballista, Some(cluster)) => cluster
                    .execute_stream(Arc::clone(&plan), &session_config)
                    .await
                    .map_err(|error| RunError::from_datafusion(&error)),
                // Refused at submission; a replica whose config lost the cluster since then
                // says so instead of running a window meant for many machines on one. Not
                // poison: the fault is this replica's configuration, not the job's.
                (Engine::Ballista, None) => Err(RunError::Query {
                    message: describe(&DataFusionError::Configuration(
                        "engine 'ballista' needs ballista.scheduler_url, which this executor lacks".into(),
                    )),
                    class: ErrorClass::Retryable,
                }),
                (Engine::Local, _) => execute_stream(Arc::clone(&plan), Arc::new(task_ctx))
                    .map_err(|error| RunError::from_datafusion(&error)),
            }?;
            if plan.schema().field_with_name(RESULT_PARTITION_COLUMN).is_ok() {
                return Err(RunError::Invalid(format!(
                    "the result has a column named {RESULT_PARTITION_COLUMN}, the partition column of the \
                     results table: name it differently (AS ...)"
                )));
            }
            // Rows are written as the plan produces them, so writing is a part of executing.
            write_result(&self.catalog, &path, Arc::clone(&schema), stream)
                .instrument(tracing::info_span!("write_result", rows = tracing::field::Empty))
                .await
        }
        .instrument(execute_span)
        .await?;

        let mut stats = scan_stats(&plan);
        if self.job.engine == Engine::Ballista {
            // The scans ran on the workers, whose metrics stay there: count the files the plan
            // gave them, by their committed row counts and sizes.
            let (rows, bytes) = snapshot.totals_of(self.catalog.root(), &planned_files(&plan));
            stats.rows_read = rows;
            stats.bytes_read = bytes;
        }
        stats.rows_written = rows_written;
        stats.bytes_written = bytes_written;
        Ok(WrittenResult {
            stats,
            input_rows,
            result_path: path,
            input_versions: snapshot.versions().clone(),
            schema,
        })
    }
}

/// The threads window runs execute on, apart from the runtime that schedules them, publishes
/// events and keeps deadlines: a plan that keeps every one of its threads busy cannot delay its
/// own timeout, nor the other jobs' scheduling.
#[derive(Debug)]
pub struct RunRuntime {
    runtime_opt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl RunRuntime {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sluice-run")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self { runtime_opt: Some(runtime), handle })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for RunRuntime {
    /// Dropped inside the service's runtime, where a blocking shutdown would panic: runs still
    /// going were given the grace period already, and their claims' leases cover them.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime_opt.take() {
            runtime.shutdown_background();
        }
    }
}

/// Streams the plan's output into the result file as it comes, never holding the whole result:
/// a row group at a time, refused past the result limits. The file appears only when complete
/// (one put, or a multipart upload completed at the end); a refused or failed result leaves
/// the previous revision's file as it was. Results are small next to their inputs; zstd keeps
/// them small in the store too.
async fn write_result(
    catalog: &Catalog,
    path: &str,
    schema: SchemaRef,
    mut stream: SendableRecordBatchStream,
) -> Result<(u64, u64), RunError> {
    let parquet_error = |error: parquet::errors::ParquetError| {
        RunError::Lake(format!("cannot write the result as Parquet: {error}"))
    };
    let limits = catalog.run_limits();
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(parquet_error)?))
        .build();
    let lake = catalog.lake();
    let object = object_store::buffered::BufWriter::new(Arc::clone(lake.store()), lake.absolute(path));
    let mut writer =
        AsyncArrowWriter::try_new(object, Arc::clone(&schema), Some(properties)).map_err(parquet_error)?;
    let mut rows_written: u64 = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|error| RunError::from_datafusion(&error))?;
        let batch = crate::result_types::to_storable(batch, &schema).map_err(RunError::Invalid)?;
        rows_written = rows_written.saturating_add(batch.num_rows() as u64);
        limits.check_result(rows_written, writer.bytes_written() as u64).map_err(RunError::Limit)?;
        writer.write(&batch).await.map_err(parquet_error)?;
        if writer.in_progress_size() >= RESULT_ROW_GROUP_BYTES {
            writer.flush().await.map_err(parquet_error)?;
        }
        limits
            .check_result(rows_written, (writer.bytes_written() + writer.in_progress_size()) as u64)
            .map_err(RunError::Limit)?;
    }
    // Completes the upload: the file is visible from here on. Only the footer was added since
    // the last check.
    writer.finish().await.map_err(parquet_error)?;
    tracing::Span::current().record("rows", rows_written);
    Ok((rows_written, writer.bytes_written() as u64))
}

/// Makes the written result file the window's result: one commit replacing the window's
/// partition of the job's results table. A result that cannot be committed is deleted.
async fn commit_result(
    catalog: &Catalog,
    job: &str,
    window_start_micros: i64,
    order: i64,
    written: &WrittenResult,
) -> Result<i64, RunError> {
    let (path, rows, bytes, schema) = (
        written.result_path.as_str(),
        written.stats.rows_written,
        written.stats.bytes_written,
        &written.schema,
    );
    let lake = catalog.lake();
    let file = sluice_lake::CommittedFile {
        path: path.to_string(),
        partition: result_partition(window_start_micros),
        num_rows: rows,
        size_bytes: bytes,
        min_event_time_micros: window_start_micros,
        max_event_time_micros: window_start_micros,
    };
    let stats = serde_json::json!({ "numRecords": rows }).to_string();
    let committed = lake
        .replace_partition(&results_table(job), RESULT_PARTITION_COLUMN, &file, &stats, schema, order)
        .await;
    match committed {
        Ok(TableCommit::Committed { version }) => Ok(version),
        Ok(TableCommit::Conflict) => {
            let _ = lake.delete(path).await;
            Err(RunError::Lake(format!(
                "a later attempt of this window replaced its result in {} first; this one is not counted",
                results_table(job)
            )))
        }
        Err(error) => {
            // Whether it landed is unknown, so the file stays: deleting a committed result would
            // leave the table naming a missing file.
            Err(RunError::Lake(chain_text(&error)))
        }
    }
}
