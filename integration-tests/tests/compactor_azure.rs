//! The lake on Azure Blob Storage, as object_store's Azure client speaks it, against a real
//! Azurite on 127.0.0.1: the compactor's conditional log commits, block uploads, merges and
//! VACUUM, read back by delta-rs and by an outside reader; the executor reading windows and
//! committing results there (both bodies shared with the S3 tests, remote_lake.rs); and writers
//! racing for the same table change and the same partition position, of which exactly one wins.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use arrow_schema::{DataType, Field, Schema, TimeUnit};
use sluice_integration_tests::remote_lake::{
    compactor_commits_merges_and_vacuums_exactly_once, executor_reads_windows_and_commits_results,
};
use sluice_integration_tests::{AzuriteServer, unique_suffix};
use sluice_lake::{CommitRecord, CommittedFile, NewFile, TableCommit, TableSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactor_commits_merges_and_vacuums_on_azurite_exactly_once() {
    let azurite = AzuriteServer::start().await.unwrap();
    compactor_commits_merges_and_vacuums_exactly_once(&azurite.remote_lake()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_reads_windows_from_azurite_and_commits_results_there() {
    let azurite = AzuriteServer::start().await.unwrap();
    executor_reads_windows_and_commits_results(&azurite.remote_lake()).await;
}

/// The stream's columns; `with_battery` adds a field, as a new version of its schema would.
fn telemetry_columns(with_battery: bool) -> Schema {
    let mut fields = vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ];
    if with_battery {
        fields.push(Field::new("battery", DataType::Float64, true));
    }
    Schema::new(fields)
}

/// A flush of offsets [0, 10) of Kafka partition 3, the first the partition commits, with one
/// file named for its writer.
fn first_flush(writer: usize) -> (CommitRecord, Vec<NewFile>) {
    let partition = "dt=2026-11-26/hour=08";
    let file = CommittedFile {
        path: format!("telemetry/{partition}/writer-{writer}.parquet"),
        partition: partition.to_string(),
        num_rows: 10,
        size_bytes: 4,
        min_event_time_micros: 0,
        max_event_time_micros: 10,
    };
    let record = CommitRecord {
        stream: "telemetry".into(),
        topic: "sluice.telemetry".into(),
        kafka_partition: 3,
        previous_end_offset_opt: None,
        start_offset: 0,
        end_offset: 10,
        files: vec![file.clone()],
        num_dead_lettered: 0,
        num_duplicates_dropped: 0,
        edge_positions_at_opt: None,
        num_edge_repeats_dropped: 0,
        max_event_time_micros_opt: Some(10),
        writer_id: format!("writer-{writer}"),
        created_at_micros: 0,
        reset_opt: None,
        table_version_opt: None,
    };
    (record, vec![NewFile { file, stats_json: "{\"numRecords\":10}".into() }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_on_azurite_add_a_column_once_and_move_a_position_once() {
    let azurite = AzuriteServer::start().await.unwrap();
    let config = azurite.store_config(&format!("race-{}", unique_suffix()));
    let settings = TableSettings::default();
    sluice_lake::open_lake(&config)
        .unwrap()
        .ensure_table("telemetry", &telemetry_columns(false), &["dt", "hour"], settings)
        .await
        .unwrap();

    // Four writers, each with its own store client, find the new field missing at once: the
    // log's conditional puts let one ADD COLUMN in, and the others reload and find it done.
    let evolving = (0..4).map(|_| {
        let lake = sluice_lake::open_lake(&config).unwrap();
        tokio::spawn(async move {
            lake.ensure_table("telemetry", &telemetry_columns(true), &["dt", "hour"], settings)
                .await
                .map(|_| ())
        })
    });
    for outcome in futures::future::join_all(evolving).await {
        outcome.unwrap().unwrap();
    }
    let lake = sluice_lake::open_lake(&config).unwrap();
    let history = lake.history("telemetry").await.unwrap();
    let num_added = history.iter().filter(|commit| commit.operation == "ADD COLUMN").count();
    assert_eq!(num_added, 1, "{history:?}");

    // Six writers commit the first flush of the same Kafka partition at once: one moves its
    // position, the others are refused and add nothing.
    let committing = (0..6).map(|writer| {
        let lake = sluice_lake::open_lake(&config).unwrap();
        tokio::spawn(async move {
            let (record, files) = first_flush(writer);
            lake.create_commit(&record, &files).await
        })
    });
    let outcomes: Vec<TableCommit> = futures::future::join_all(committing)
        .await
        .into_iter()
        .map(|outcome| outcome.unwrap().unwrap())
        .collect();
    let num_committed =
        outcomes.iter().filter(|outcome| matches!(outcome, TableCommit::Committed { .. })).count();
    assert_eq!(num_committed, 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|outcome| **outcome == TableCommit::Conflict).count(), 5);
    assert_eq!(lake.live_files("telemetry").await.unwrap().len(), 1);
    let position = lake.latest_commit("telemetry", 3).await.unwrap().expect("partition 3 committed");
    assert_eq!(position.end_offset, 10);
}
