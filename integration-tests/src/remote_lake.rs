//! The checks every remote object store must pass, written once: the S3-compatible server and
//! Azurite run the same compactor and executor bodies, so one backend cannot quietly lose a
//! check that the other keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_lake::{Lake, ObjectStoreConfig, TableCommit};

use crate::{
    Broker, CompactorService, ExecutorService, assert_exactly_once, compactor_config, executor_config,
    lake_rows_of, outside_reader_rows, produce_readings, read_committed_rows, read_live_rows,
    settled_watermark, submit_job, telemetry_readings, unique_suffix, wait_until,
    wait_until_merged_and_vacuumed, windows_succeeded,
};

const HOUR: i64 = 3_600_000_000;
/// Where in the bucket or container the lake lives: below its root, so that the store's prefix
/// handling is exercised as well.
pub const LAKE_PREFIX: &str = "lake/prod";

/// A lake on a remote store, and how an outside reader reaches it.
#[derive(Debug, Clone)]
pub struct RemoteLake {
    /// The store rooted at `LAKE_PREFIX`.
    pub config: ObjectStoreConfig,
    /// The lake root as outside readers spell it, e.g. `s3://bucket/lake/prod`.
    pub url: String,
    /// The same endpoint and credentials, for Python `deltalake`.
    pub python_storage_options: Vec<(String, String)>,
}

/// The compactor flushes with multipart (block) uploads, merges every partition to one file and
/// vacuums the merged-away files; the lake holds every reading once, a replayed flush is refused
/// by the store's conditional put, and an outside engine reads the same rows.
pub async fn compactor_commits_merges_and_vacuums_exactly_once(remote: &RemoteLake) {
    let broker = Broker::start().await.unwrap_or_else(|error| panic!("broker: {error:#}"));
    let prefix = format!("test-{}", unique_suffix());
    let unused_local = tempfile::TempDir::new().unwrap_or_else(|error| panic!("temp dir: {error}"));
    let mut config = compactor_config(&broker, &prefix, unused_local.path());
    config.object_store = remote.config.clone();
    // Every file goes up in parts here (S3's multipart upload, Azure's Put Block and Put Block
    // List), the last part below S3's 5 MiB minimum.
    config.object_store.multipart_threshold_bytes = 1;
    config.flush.max_age_ms = 300;
    config.merge.interval_ms = 500;
    config.merge.min_partition_age_ms = 0;
    config.merge.small_file_bytes = 1024 * 1024;
    config.janitor.interval_ms = 500;
    config.janitor.removed_retention_ms = 1_000;
    let readings = telemetry_readings(5_000, 25, 2 * HOUR);
    let (store, root) =
        sluice_lake::open_store(&config.object_store).unwrap_or_else(|error| panic!("store: {error:#}"));
    assert_eq!(root.as_ref(), LAKE_PREFIX);
    let lake = Lake::new(store, root);
    let compactor =
        CompactorService::start(config.clone()).await.unwrap_or_else(|error| panic!("compactor: {error:#}"));
    let mut num_produced = 0;
    for burst in readings.chunks(1_000) {
        produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), burst)
            .await
            .unwrap_or_else(|error| panic!("produce: {error:#}"));
        num_produced += burst.len() as u64;
        // Each burst is flushed before the next one comes, so that the partitions get several
        // files to merge. Not asserted here: the wait for every row below reports what is missing.
        wait_until(Duration::from_secs(60), || {
            let lake = lake.clone();
            async move {
                let commits = lake.commits("telemetry").await.unwrap_or_default();
                commits.iter().map(|commit| commit.num_rows()).sum::<u64>() >= num_produced
            }
        })
        .await;
    }

    let settled =
        wait_until_merged_and_vacuumed(&lake, "telemetry", readings.len() as u64, Duration::from_secs(90))
            .await;
    assert!(settled, "every partition merged to one file and the merged-away files vacuumed");
    compactor.stop().await.unwrap_or_else(|error| panic!("stop: {error:#}"));
    let merges = lake.merges("telemetry").await.unwrap_or_else(|error| panic!("merges: {error:#}"));
    assert!(!merges.is_empty(), "a merge committed");
    let live = read_live_rows(&lake, "telemetry").await.unwrap_or_else(|error| panic!("read: {error:#}"));
    assert_exactly_once(&live, &readings);
    // Files merged away are gone from the store; every file a flush committed and no merge
    // removed is still there.
    let history = lake.history("telemetry").await.unwrap_or_else(|error| panic!("history: {error:#}"));
    assert!(history.iter().any(|commit| !commit.removed.is_empty()));
    assert!(read_committed_rows(&lake, "telemetry").await.is_err(), "merged-away files are gone");

    // A replayed flush (a stale writer repeating the first commit of partition 0) is refused by
    // the position check, on this store's conditional puts.
    let commits = lake.commits("telemetry").await.unwrap_or_else(|error| panic!("commits: {error:#}"));
    let first = commits
        .into_iter()
        .find(|record| record.kafka_partition == 0)
        .unwrap_or_else(|| panic!("partition 0 committed"));
    let replayed = lake.create_commit(&first, &[]).await.unwrap_or_else(|error| panic!("commit: {error:#}"));
    assert_eq!(replayed, TableCommit::Conflict);

    // An outside engine reads the same table from the store.
    let table = format!("{}/telemetry", remote.url);
    let rows = outside_reader_rows(
        "deltalake",
        &table,
        &["device_id", "seq", "ts"],
        None,
        &remote.python_storage_options,
    )
    .unwrap_or_else(|error| panic!("outside reader: {error:#}"));
    assert_exactly_once(&lake_rows_of(&rows), &readings);
}

/// The executor reads each complete window's table version from the store and commits its
/// result table there; an outside engine reads the results, equal to counts made here.
pub async fn executor_reads_windows_and_commits_results(remote: &RemoteLake) {
    let broker = Broker::start().await.unwrap_or_else(|error| panic!("broker: {error:#}"));
    let prefix = format!("test-{}", unique_suffix());
    let unused_local = tempfile::TempDir::new().unwrap_or_else(|error| panic!("temp dir: {error}"));
    let mut compactor_settings = compactor_config(&broker, &prefix, unused_local.path());
    compactor_settings.object_store = remote.config.clone();
    compactor_settings.watermark.interval_ms = 200;
    compactor_settings.watermark.allowed_lateness_ms = 1_000;
    let readings = telemetry_readings(3_000, 20, 3 * HOUR);
    let compactor = CompactorService::start(compactor_settings.clone())
        .await
        .unwrap_or_else(|error| panic!("compactor: {error:#}"));
    produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), &readings)
        .await
        .unwrap_or_else(|error| panic!("produce: {error:#}"));
    let lake = sluice_lake::open_lake(&compactor_settings.object_store)
        .unwrap_or_else(|error| panic!("lake: {error:#}"));
    let num_readings = readings.len() as u64;
    let committed = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            let commits = lake.commits("telemetry").await.unwrap_or_default();
            commits.iter().map(|commit| commit.num_rows()).sum::<u64>() >= num_readings
        }
    })
    .await;
    assert!(committed, "the readings were committed");
    let watermark = settled_watermark(&lake, "telemetry", 4, 1_000_000).await;

    let mut settings = executor_config(&broker, &prefix, unused_local.path());
    settings.object_store = remote.config.clone();
    let executor = ExecutorService::start(settings);
    let ts = |reading: &serde_json::Value| reading["ts"].as_i64().unwrap_or_else(|| panic!("ts: {reading}"));
    let first_hour = readings.iter().map(ts).min().unwrap_or_default().div_euclid(HOUR) * HOUR;
    let job = format!(
        "-- name: device_counts\n-- window: 1h\n-- lateness: 0s\n-- start: {}\n\
         SELECT device_id, count(*) AS readings FROM telemetry GROUP BY device_id\n",
        sluice_executor::job::format_micros(first_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "device_counts", Some(&job))
        .await
        .unwrap_or_else(|error| panic!("submit: {error:#}"));
    let windows: Vec<i64> =
        (0..).map(|index| first_hour + index * HOUR).take_while(|start| start + HOUR <= watermark).collect();
    assert!(windows.len() >= 2, "the readings span complete hours");
    assert!(
        windows_succeeded(&lake, "device_counts", &windows, Duration::from_secs(120)).await,
        "every complete window ran"
    );
    executor.stop().await.unwrap_or_else(|error| panic!("stop executor: {error:#}"));
    compactor.stop().await.unwrap_or_else(|error| panic!("stop compactor: {error:#}"));

    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for reading in &readings {
        let start = ts(reading).div_euclid(HOUR) * HOUR;
        if windows.contains(&start) {
            let partition = sluice_lake::layout::result_partition(start);
            let window = partition.split_once('=').map(|(_, value)| value.to_string()).unwrap_or(partition);
            let device = reading["device_id"].as_str().unwrap_or_default().to_string();
            *expected.entry((window, device)).or_default() += 1;
        }
    }
    let table = format!("{}/{}", remote.url, sluice_lake::layout::results_table("device_counts"));
    let rows = outside_reader_rows(
        "deltalake",
        &table,
        &["window_start", "device_id", "readings"],
        None,
        &remote.python_storage_options,
    )
    .unwrap_or_else(|error| panic!("outside reader: {error:#}"));
    let mut actual = BTreeMap::new();
    for row in &rows {
        let text =
            |column: &str| row[column].as_str().unwrap_or_else(|| panic!("{column}: {row}")).to_string();
        let readings = row["readings"].as_i64().unwrap_or_else(|| panic!("readings: {row}"));
        assert!(
            actual.insert((text("window_start"), text("device_id")), readings).is_none(),
            "one row per window and device"
        );
    }
    assert_eq!(actual, expected);
}
