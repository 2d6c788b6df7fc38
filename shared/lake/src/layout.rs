//! Every path Sluice writes in the lake, relative to the store root, is built here: the compactor,
//! the executor, the CLI and the tests all name an object through these functions, so that the
//! layout that outside engines and operators see is defined once and cannot drift between the
//! writer and a reader.
//!
//! ```text
//! <stream>/_delta_log/                                  the stream table's log
//! <stream>/dt=YYYY-MM-DD/hour=HH/<file>.parquet         its data files (only those in a version count)
//! results/<job>/_delta_log/                             a job's results table
//! results/<job>/window_start=20261126T080000Z/<file>.parquet
//! _sluice/jobs/<job>/windows/<start, µs, 20 digits>/    run claims and outcomes of each window
//! _sluice/jobs/<job>/backfills/                         backfill and restatement requests
//! _sluice/watermarks/<stream>.json                      a cache of the watermark the log gives
//! _sluice/audit/jobs/                                   the audit table of job requests (Delta)
//! ```

/// Sluice's own records (run claims, outcomes, requests, watermark caches). Stream names cannot
/// start with `_` (sluice-schema refuses them), so no table can collide with it.
pub const METADATA_DIR: &str = "_sluice";

/// The Delta table that records every job definition, deletion and backfill request the
/// executor saw, with its verdict. Under `_sluice/`, so no stream or job can name it.
pub const JOBS_AUDIT_TABLE: &str = "_sluice/audit/jobs";

/// A new file of the audit table: named by its time and a random part, so that replicas
/// appending at once never write the same object.
pub fn audit_file(at_micros: i64, unique: &str) -> String {
    format!("{JOBS_AUDIT_TABLE}/{:020}-{unique}.parquet", at_micros.max(0))
}

/// The Delta log of a table, `<table>/_delta_log`.
pub const DELTA_LOG_DIR: &str = "_delta_log";

/// The jobs' results tables live under `results/`; sluice-schema refuses it as a stream name.
pub use sluice_schema::RESULTS_DIR;

/// The partition column of every results table.
pub const RESULT_PARTITION_COLUMN: &str = "window_start";

pub fn delta_log_dir(table: &str) -> String {
    format!("{table}/{DELTA_LOG_DIR}")
}

/// The commit file of one version of a table, `<table>/_delta_log/<version, 20 digits>.json`.
pub fn delta_commit(table: &str, version: i64) -> String {
    format!("{}/{version:020}.json", delta_log_dir(table))
}

/// A data file of a stream table: `<stream>/<partition>/<file name>`, the partition being the
/// event-time segment (`dt=2026-11-26/hour=08`).
pub fn data_file(stream: &str, partition: &str, file_name: &str) -> String {
    format!("{stream}/{partition}/{file_name}")
}

/// The name of a flush's file: the Kafka partition and first offset it holds, so that an
/// operator can tell where a file came from, and a unique part, because a range re-read after
/// a failed commit must not overwrite what a reader of an older version may still open.
pub fn flush_file_name(kafka_partition: i32, first_offset: i64) -> String {
    format!("p{kafka_partition:03}-o{first_offset:020}-{}.parquet", uuid::Uuid::new_v4().simple())
}

/// The name of a merge's output file, unique for the same reason.
pub fn merged_file_name() -> String {
    format!("merged-{}.parquet", uuid::Uuid::new_v4().simple())
}

/// Where a Kafka partition's edge positions are kept: beside the table's data, under a name
/// starting with `_` so that Delta readers and VACUUM pass it by.
pub fn edge_positions_dir(stream: &str, kafka_partition: i32) -> String {
    format!("{stream}/_sluice_edge_positions/p{kafka_partition:03}")
}

/// The edge positions of a Kafka partition as of the flush ending at `end_offset`: written
/// before that flush's commit, which points at it.
pub fn edge_positions_file(stream: &str, kafka_partition: i32, end_offset: i64) -> String {
    format!("{}/{end_offset:020}.json", edge_positions_dir(stream, kafka_partition))
}

pub fn watermark_record(stream: &str) -> String {
    format!("{METADATA_DIR}/watermarks/{stream}.json")
}

pub fn windows_dir(job: &str) -> String {
    format!("{METADATA_DIR}/jobs/{job}/windows")
}

fn window_dir(job: &str, window_start_micros: i64) -> String {
    format!("{}/{window_start_micros:020}", windows_dir(job))
}

/// A claim on one attempt; revisions and attempts are zero-padded so that a sorted listing
/// returns them in order.
pub fn attempt_path(job: &str, window_start_micros: i64, revision: u32, attempt: u32) -> String {
    format!("{}/{revision:06}-{attempt:04}.attempt.json", window_dir(job, window_start_micros))
}

pub fn outcome_path(job: &str, window_start_micros: i64, revision: u32) -> String {
    format!("{}/{revision:06}.outcome.json", window_dir(job, window_start_micros))
}

pub fn backfills_dir(job: &str) -> String {
    format!("{METADATA_DIR}/jobs/{job}/backfills")
}

/// A new backfill request: ordered by the time it was made, unique even when two are made in the
/// same microsecond.
pub fn backfill_request_path(job: &str, requested_at_micros: i64) -> String {
    format!("{}/{requested_at_micros:020}-{}.json", backfills_dir(job), uuid::Uuid::new_v4())
}

/// `results/<job>`: the job's results table.
pub fn results_table(job: &str) -> String {
    format!("{RESULTS_DIR}/{job}")
}

/// `window_start=20261126T080000Z`: compact ISO 8601, since colons are awkward in object keys
/// and file names.
pub fn result_partition(window_start_micros: i64) -> String {
    let stamp = chrono::DateTime::from_timestamp_micros(window_start_micros)
        .map(|time| time.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|| window_start_micros.to_string());
    format!("{RESULT_PARTITION_COLUMN}={stamp}")
}

/// The window of a result file's path, as its partition names it (`20261126T080000Z`), if the
/// path is one of a results table.
pub fn window_of_result_path(path: &str) -> Option<&str> {
    path.split('/').find_map(|part| part.strip_prefix(RESULT_PARTITION_COLUMN)?.strip_prefix('='))
}

/// A new result file of a window: a fresh name per attempt, so that a revision never overwrites
/// a file an older table version still holds.
pub fn result_path(job: &str, window_start_micros: i64) -> String {
    format!(
        "{}/{}/{}.parquet",
        results_table(job),
        result_partition(window_start_micros),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_path_names_its_window() {
        let start = 1_795_680_000_000_000; // 2026-11-26T08:00:00Z
        let path = result_path("hourly_device_stats", start);
        assert!(path.starts_with("results/hourly_device_stats/window_start=20261126T080000Z/"), "{path}");
        assert_eq!(window_of_result_path(&path), Some("20261126T080000Z"));
        assert_eq!(result_partition(start), "window_start=20261126T080000Z");
        assert_eq!(window_of_result_path("telemetry/dt=2026-11-26/hour=08/a.parquet"), None);
        assert_eq!(window_of_result_path("results/job/window_startX=1/a.parquet"), None);
    }

    #[test]
    fn records_of_a_window_sort_by_revision_then_attempt() {
        let mut paths = vec![
            attempt_path("job", 7, 1, 0),
            outcome_path("job", 7, 0),
            attempt_path("job", 7, 0, 10),
            attempt_path("job", 7, 0, 2),
        ];
        paths.sort();
        assert_eq!(
            paths,
            vec![
                "_sluice/jobs/job/windows/00000000000000000007/000000-0002.attempt.json",
                "_sluice/jobs/job/windows/00000000000000000007/000000-0010.attempt.json",
                "_sluice/jobs/job/windows/00000000000000000007/000000.outcome.json",
                "_sluice/jobs/job/windows/00000000000000000007/000001-0000.attempt.json",
            ]
        );
    }

    #[test]
    fn data_files_sit_in_their_event_time_partition() {
        let name = flush_file_name(3, 42);
        assert!(name.starts_with("p003-o00000000000000000042-") && name.ends_with(".parquet"), "{name}");
        assert_ne!(name, flush_file_name(3, 42), "a re-read range gets a new name");
        assert_eq!(
            data_file("telemetry", "dt=2026-11-26/hour=08", &name),
            format!("telemetry/dt=2026-11-26/hour=08/{name}")
        );
        assert_eq!(delta_log_dir("results/hourly"), "results/hourly/_delta_log");
        assert_eq!(delta_commit("telemetry", 42), "telemetry/_delta_log/00000000000000000042.json");
    }
}
