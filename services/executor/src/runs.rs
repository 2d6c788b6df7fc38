//! Running one job over one window, and the records in the lake that make each window run once
//! across replicas and crashes.
//!
//! Under `_sluice/jobs/<job>/windows/<window start, µs, 20 digits>/`:
//! - `<revision>-<attempt>.attempt.json`, created once by whoever starts that attempt: a claim
//!   with a lease. Nobody starts the next attempt while the lease runs (unless the claim is this
//!   instance's own, left by a process that died).
//! - `<revision>.outcome.json`, created once when the revision succeeded or failed for good.
//!
//! The result of a window is one Parquet file, `results/<job>/window_start=<UTC>/result.parquet`,
//! replaced whole by a later revision (a single put or a completed multipart upload: readers
//! see the old file or the new one, never part of either).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::{ExecutionPlan, collect};
use object_store::path::Path;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sluice_lake::{CommitOutcome, Lake, LakeError, METADATA_DIR};

use crate::catalog::{Catalog, Scope, describe, plan_query};
use crate::job::{Engine, JobDefinition};

/// A claim on one attempt of one window revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub job: String,
    pub window_start_micros: i64,
    pub window_end_micros: i64,
    pub revision: u32,
    pub attempt: u32,
    /// `executor.instance_id`: stable across restarts of one replica.
    pub owner: String,
    /// Random per process: tells a restarted replica its own dead claims apart from live ones.
    pub incarnation: String,
    pub started_at_micros: i64,
    pub lease_until_micros: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    Succeeded,
    Failed,
}

/// How a window revision ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub job: String,
    pub window_start_micros: i64,
    pub window_end_micros: i64,
    pub revision: u32,
    pub attempt: u32,
    pub status: OutcomeStatus,
    pub started_at_micros: i64,
    pub finished_at_micros: i64,
    pub stats: RunStats,
    /// Rows of the committed files that overlap the window when it ran: a change means late
    /// data arrived (or a merge dropped duplicates), which a restating job runs again for.
    pub input_rows: u64,
    pub result_path_opt: Option<String>,
    pub error_opt: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStats {
    pub rows_read: u64,
    pub bytes_read: u64,
    pub files_read: u64,
    pub rows_written: u64,
    pub bytes_written: u64,
}

/// What is recorded about one window: its latest revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowState {
    pub revision: u32,
    pub latest_attempt_opt: Option<AttemptRecord>,
    pub outcome_opt: Option<OutcomeRecord>,
}

pub fn windows_dir(job: &str) -> String {
    format!("{METADATA_DIR}/jobs/{job}/windows")
}

fn window_dir(job: &str, window_start_micros: i64) -> String {
    format!("{}/{window_start_micros:020}", windows_dir(job))
}

pub fn attempt_path(job: &str, window_start_micros: i64, revision: u32, attempt: u32) -> String {
    format!("{}/{revision:06}-{attempt:04}.attempt.json", window_dir(job, window_start_micros))
}

pub fn outcome_path(job: &str, window_start_micros: i64, revision: u32) -> String {
    format!("{}/{revision:06}.outcome.json", window_dir(job, window_start_micros))
}

/// `results/<job>/window_start=20261126T080000Z/result.parquet`: compact ISO 8601, since colons
/// are awkward in object keys and file names.
pub fn result_path(job: &str, window_start_micros: i64) -> String {
    let stamp = chrono::DateTime::from_timestamp_micros(window_start_micros)
        .map(|time| time.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|| window_start_micros.to_string());
    format!("results/{job}/window_start={stamp}/result.parquet")
}

/// Reads every window's records of a job.
pub async fn load_windows(lake: &Lake, job: &str) -> Result<BTreeMap<i64, WindowState>, LakeError> {
    let mut windows: BTreeMap<i64, WindowState> = BTreeMap::new();
    // Sorted paths: revisions and attempts come in order, so the last read wins.
    for path in lake.list_under(&windows_dir(job)).await? {
        let mut parts = path.rsplit('/');
        let (Some(file), Some(start)) = (parts.next(), parts.next()) else { continue };
        let Ok(window_start) = start.parse::<i64>() else { continue };
        if file.ends_with(".attempt.json") {
            if let Some(record) = lake.read_record::<AttemptRecord>(&path).await? {
                let state = windows.entry(window_start).or_default();
                if record.revision >= state.revision {
                    if record.revision > state.revision {
                        state.outcome_opt = None;
                    }
                    state.revision = record.revision;
                    state.latest_attempt_opt = Some(record);
                }
            }
        } else if file.ends_with(".outcome.json")
            && let Some(record) = lake.read_record::<OutcomeRecord>(&path).await?
        {
            let state = windows.entry(window_start).or_default();
            if record.revision >= state.revision {
                state.revision = record.revision;
                state.outcome_opt = Some(record);
            }
        }
    }
    Ok(windows)
}

/// Why an attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Query(String),
    #[error("the run exceeded its timeout of {0:?}")]
    Timeout(Duration),
    #[error("failed to read or write the lake: {0}")]
    Lake(String),
}

/// One attempt's work: plan over the window's partitions, run, write the result.
#[derive(Debug)]
pub struct WindowRun<'a> {
    pub catalog: &'a Catalog,
    pub job: &'a JobDefinition,
    /// The streams the job reads: their rows in the window are recorded for restatement.
    pub streams: &'a [String],
    pub window_start_micros: i64,
    pub window_end_micros: i64,
    pub timeout: Duration,
}

/// What a successful attempt produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub stats: RunStats,
    pub input_rows: u64,
    pub result_path: String,
}

impl WindowRun<'_> {
    /// Each DataFusion phase runs in its own span (children of `job_run`), so that a trace shows
    /// where a slow window spent its time: listing committed files, planning, optimizing and
    /// physical planning, executing, or writing the result.
    pub async fn execute(&self) -> Result<RunResult, RunError> {
        use tracing::Instrument as _;

        let started = Instant::now();
        let lake_error = |error: &dyn std::fmt::Display| RunError::Lake(error.to_string());
        let snapshot = self
            .catalog
            .snapshot()
            .instrument(tracing::info_span!("snapshot"))
            .await
            .map_err(|error| lake_error(&format!("{error:#}")))?;
        let input_rows =
            snapshot.rows_overlapping(self.streams, self.window_start_micros, self.window_end_micros);
        let scope =
            Scope::Window { start_micros: self.window_start_micros, end_micros: self.window_end_micros };
        let frame = async {
            let ctx = self
                .catalog
                .session(&snapshot, scope, true)
                .await
                .map_err(|error| RunError::Query(format!("{:#}", anyhow::Error::from(error))))?;
            plan_query(&ctx, &self.job.sql, Some((self.window_start_micros, self.window_end_micros)))
                .await
                .map_err(|error| RunError::Query(error.0))
        }
        .instrument(tracing::info_span!("logical_plan"))
        .await?;
        let task_ctx = frame.task_ctx();
        let session_config = task_ctx.session_config().clone();
        let plan = frame
            .create_physical_plan()
            .instrument(tracing::info_span!("physical_plan"))
            .await
            .map_err(|error| RunError::Query(describe(&error)))?;
        let remaining = self.timeout.saturating_sub(started.elapsed());
        let execute_span = tracing::info_span!(
            "execute",
            partitions = plan.properties().output_partitioning().partition_count()
        );
        let running = async {
            match (self.job.engine, self.catalog.ballista()) {
                (Engine::Ballista, Some(cluster)) => {
                    cluster.collect(Arc::clone(&plan), &session_config).await
                }
                // Refused at submission; a replica whose config lost the cluster since then
                // says so instead of running a window meant for many machines on one.
                (Engine::Ballista, None) => Err(DataFusionError::Configuration(
                    "engine 'ballista' needs ballista.scheduler_url, which this executor lacks".into(),
                )),
                (Engine::Local, _) => collect(Arc::clone(&plan), Arc::new(task_ctx)).await,
            }
        };
        let batches = tokio::time::timeout(remaining, running)
            .instrument(execute_span)
            .await
            .map_err(|_| RunError::Timeout(self.timeout))?
            .map_err(|error| RunError::Query(describe(&error)))?;
        // A plan that never yields can finish inside its first poll, past the deadline the timer
        // could not enforce; its claim's lease may have run out meanwhile, so it does not count.
        if started.elapsed() > self.timeout {
            return Err(RunError::Timeout(self.timeout));
        }

        let schema: SchemaRef = plan.schema();
        let rows_written: u64 = batches.iter().map(|batch| batch.num_rows() as u64).sum();
        let path = result_path(&self.job.name, self.window_start_micros);
        let bytes_written = async {
            let bytes = encode_parquet(schema, &batches).map_err(RunError::Query)?;
            let bytes_written = bytes.len() as u64;
            self.catalog.lake().put(&path, bytes).await.map_err(|error| lake_error(&error))?;
            Ok::<_, RunError>(bytes_written)
        }
        .instrument(tracing::info_span!("write_result", rows = rows_written))
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
        Ok(RunResult { stats, input_rows, result_path: path })
    }
}

/// Results are small next to their inputs; zstd keeps them small in the store too.
fn encode_parquet(
    schema: SchemaRef,
    batches: &[datafusion::arrow::array::RecordBatch],
) -> Result<Vec<u8>, String> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(|error| error.to_string())?))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), schema, Some(properties))
        .map_err(|error| format!("cannot write the result as Parquet: {error}"))?;
    for batch in batches {
        writer.write(batch).map_err(|error| format!("cannot write the result as Parquet: {error}"))?;
    }
    writer.into_inner().map_err(|error| format!("cannot write the result as Parquet: {error}"))
}

/// Rows, bytes and files the plan's scans read, from their metrics after a local run.
pub fn scan_stats(plan: &Arc<dyn ExecutionPlan>) -> RunStats {
    let mut stats = RunStats::default();
    for_each_scan(plan, |scan| {
        if let Some(metrics) = scan.metrics() {
            stats.rows_read += metrics.output_rows().unwrap_or(0) as u64;
            stats.bytes_read +=
                metrics.sum_by_name("bytes_scanned").map_or(0, |value| value.as_usize() as u64);
        }
    });
    stats.files_read = planned_files(plan).len() as u64;
    stats
}

/// The files the plan's scans were given. A large file may be split into byte ranges over
/// several groups: each is named once.
pub fn planned_files(plan: &Arc<dyn ExecutionPlan>) -> BTreeSet<Path> {
    let mut files = BTreeSet::new();
    for_each_scan(plan, |scan| {
        if let Some(config) = scan.data_source().downcast_ref::<FileScanConfig>() {
            files.extend(
                config
                    .file_groups
                    .iter()
                    .flat_map(|group| group.iter())
                    .map(|file| file.object_meta.location.clone()),
            );
        }
    });
    files
}

fn for_each_scan(plan: &Arc<dyn ExecutionPlan>, mut visit: impl FnMut(&DataSourceExec)) {
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if let Some(scan) = node.downcast_ref::<DataSourceExec>() {
            visit(scan);
        }
        stack.extend(node.children().into_iter().cloned());
    }
}

/// Creates an attempt claim; `false` if another instance claimed it first.
pub async fn claim(lake: &Lake, record: &AttemptRecord) -> Result<bool, LakeError> {
    let path = attempt_path(&record.job, record.window_start_micros, record.revision, record.attempt);
    Ok(lake.create_record(&path, record).await? == CommitOutcome::Created)
}

/// Records how a revision ended; `false` if an outcome was there already (a stale attempt
/// finished after another one).
pub async fn record_outcome(lake: &Lake, record: &OutcomeRecord) -> Result<bool, LakeError> {
    let path = outcome_path(&record.job, record.window_start_micros, record.revision);
    Ok(lake.create_record(&path, record).await? == CommitOutcome::Created)
}

/// A request to run a job's windows in `[from, to)` again, written by `sluice jobs backfill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillRequest {
    pub job: String,
    pub from_micros: i64,
    pub to_micros: i64,
    pub requested_at_micros: i64,
}

pub fn backfills_dir(job: &str) -> String {
    format!("{METADATA_DIR}/jobs/{job}/backfills")
}

pub async fn load_backfills(lake: &Lake, job: &str) -> Result<Vec<BackfillRequest>, LakeError> {
    let mut requests = Vec::new();
    for path in lake.list_under(&backfills_dir(job)).await? {
        if let Some(request) = lake.read_record::<BackfillRequest>(&path).await? {
            requests.push(request);
        }
    }
    Ok(requests)
}

pub async fn request_backfill(lake: &Lake, request: &BackfillRequest) -> Result<(), LakeError> {
    let path = format!(
        "{}/{:020}-{}.json",
        backfills_dir(&request.job),
        request.requested_at_micros,
        uuid::Uuid::new_v4()
    );
    lake.create_record(&path, request).await?;
    Ok(())
}

/// Whether a window has a revision that started after `requested_at` and finished.
pub fn satisfies(state: &WindowState, requested_at_micros: i64) -> bool {
    state.outcome_opt.as_ref().is_some_and(|outcome| outcome.started_at_micros >= requested_at_micros)
}
