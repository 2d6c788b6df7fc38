//! The records in the lake that make each window of a job run once across replicas and crashes,
//! and where a job's results live.
//!
//! Under `_sluice/jobs/<job>/windows/<window start, µs, 20 digits>/` (paths: `sluice_lake::layout`):
//! - `<revision>-<attempt>.attempt.json`, created once by whoever starts that attempt: a claim
//!   with a lease. Nobody starts the next attempt while the lease runs (unless the claim is this
//!   instance's own, left by a process that died).
//! - `<revision>.outcome.json`, created once when the revision succeeded or failed for good.
//!
//! A job's results are one Delta table, `results/<job>/`, partitioned by `window_start`
//! (compact UTC, `20261126T080000Z`). A window's result is one Parquet file in its partition,
//! and each revision replaces the partition in one commit: readers see the old result or the new
//! one, never part of either, and the run record names the table version that holds it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_lake::layout::{attempt_path, backfill_request_path, backfills_dir, outcome_path, windows_dir};
use sluice_lake::{CommitOutcome, Lake, LakeError};

use crate::signing::RequestSignature;

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
    /// The version of each stream table the revision read.
    #[serde(default)]
    pub input_versions: BTreeMap<String, i64>,
    /// The version of the results table that holds the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_version_opt: Option<i64>,
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
    /// The submitter's signature over [`BackfillRequest::signed_body`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_opt: Option<RequestSignature>,
}

impl BackfillRequest {
    /// What a backfill's signature covers besides the action and the job: the range and the
    /// time of the request, which also names its record.
    pub fn signed_body(&self) -> Vec<u8> {
        format!(
            "from_micros={}\nto_micros={}\nrequested_at_micros={}\n",
            self.from_micros, self.to_micros, self.requested_at_micros
        )
        .into_bytes()
    }
}

/// A job's backfill requests, each with the path of its record (what names it in the audit).
pub async fn load_backfills(lake: &Lake, job: &str) -> Result<Vec<(String, BackfillRequest)>, LakeError> {
    let mut requests = Vec::new();
    for path in lake.list_under(&backfills_dir(job)).await? {
        if let Some(request) = lake.read_record::<BackfillRequest>(&path).await? {
            requests.push((path, request));
        }
    }
    Ok(requests)
}

pub async fn request_backfill(lake: &Lake, request: &BackfillRequest) -> Result<(), LakeError> {
    request_backfill_at(lake, &backfill_request_path(&request.job, request.requested_at_micros), request)
        .await
}

/// Writes a request at a path made by `layout::backfill_request_path` beforehand: a signed
/// request names its path in its signature.
pub async fn request_backfill_at(
    lake: &Lake,
    path: &str,
    request: &BackfillRequest,
) -> Result<(), LakeError> {
    lake.create_record(path, request).await?;
    Ok(())
}

/// Whether a window has a revision that started after `requested_at` and finished.
pub fn satisfies(state: &WindowState, requested_at_micros: i64) -> bool {
    state.outcome_opt.as_ref().is_some_and(|outcome| outcome.started_at_micros >= requested_at_micros)
}
