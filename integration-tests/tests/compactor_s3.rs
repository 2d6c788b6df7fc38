//! The compactor writing its Delta tables to a real S3-compatible server (moto) on 127.0.0.1:
//! conditional log commits, multipart uploads, merges and VACUUM, read back by delta-rs and by
//! an outside reader.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::{Duration, Instant};

use sluice_integration_tests::{
    Broker, CompactorService, S3Server, assert_exactly_once, compactor_config, produce_readings,
    read_committed_rows, read_live_rows, telemetry_readings, unique_suffix,
};
use sluice_lake::{Lake, TableCommit};

const HOUR: i64 = 3_600_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactor_commits_merges_and_vacuums_on_s3_exactly_once() {
    let broker = Broker::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let unused_local = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, unused_local.path());
    config.object_store = s3.store_config("lake/prod");
    // Every file goes up as a multipart upload here (the last part may be below S3's 5 MiB).
    config.object_store.multipart_threshold_bytes = 1;
    config.flush.max_age_ms = 300;
    config.merge.interval_ms = 500;
    config.merge.min_partition_age_ms = 0;
    config.merge.small_file_bytes = 1024 * 1024;
    config.janitor.interval_ms = 500;
    config.janitor.removed_retention_ms = 1_000;
    let readings = telemetry_readings(5_000, 25, 2 * HOUR);
    let compactor = CompactorService::start(config.clone()).await.unwrap();
    for burst in readings.chunks(1_000) {
        produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), burst).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (store, root) = sluice_lake::open_store(&config.object_store).unwrap();
    assert_eq!(root.as_ref(), "lake/prod");
    let lake = Lake::new(store, root);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let committed: u64 =
            lake.commits("telemetry").await.unwrap().iter().map(|commit| commit.num_rows()).sum();
        let merged = !lake.merges("telemetry").await.unwrap().is_empty();
        if (committed >= readings.len() as u64 && merged) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // VACUUM's retention passes for the merged-away files.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    compactor.stop().await.unwrap();
    assert!(!lake.merges("telemetry").await.unwrap().is_empty(), "a merge committed on S3");
    assert_exactly_once(&read_live_rows(&lake, "telemetry").await.unwrap(), &readings);
    // Files merged away are gone from the bucket; every file a flush committed and no merge
    // removed is still there.
    let removed: Vec<String> =
        lake.history("telemetry").await.unwrap().into_iter().flat_map(|commit| commit.removed).collect();
    assert!(!removed.is_empty());
    for path in &removed {
        assert!(lake.get(&format!("telemetry/{path}")).await.is_err(), "{path} was vacuumed");
    }
    assert!(read_committed_rows(&lake, "telemetry").await.is_err(), "merged-away files are gone");

    // A replayed flush (a stale writer repeating the first commit of partition 0) is refused by
    // the position check, on this server's conditional puts.
    let first = lake
        .commits("telemetry")
        .await
        .unwrap()
        .into_iter()
        .find(|record| record.kafka_partition == 0)
        .expect("partition 0 committed");
    assert_eq!(lake.create_commit(&first, &[]).await.unwrap(), TableCommit::Conflict);

    // An outside engine reads the same table from the bucket.
    let mut options: Vec<(String, String)> = Vec::new();
    for (key, value) in &config.object_store.options.0 {
        let name = match key.as_str() {
            "aws_endpoint" => "AWS_ENDPOINT_URL",
            "aws_allow_http" => "AWS_ALLOW_HTTP",
            "aws_region" => "AWS_REGION",
            "aws_access_key_id" => "AWS_ACCESS_KEY_ID",
            "aws_secret_access_key" => "AWS_SECRET_ACCESS_KEY",
            _ => continue,
        };
        options.push((name.to_string(), value.clone()));
    }
    let table = format!("s3://{}/lake/prod/telemetry", s3.bucket);
    let rows = sluice_integration_tests::outside_reader_rows(
        "deltalake",
        &table,
        &["device_id", "seq", "ts"],
        None,
        &options,
    )
    .unwrap();
    assert_eq!(rows.len(), readings.len());
}
