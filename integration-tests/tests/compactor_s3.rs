//! The compactor writing to a real S3-compatible server (moto) on 127.0.0.1: conditional
//! commit records, staged uploads, copies to final paths.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::{Duration, Instant};

use sluice_integration_tests::{
    Broker, CompactorService, S3Server, assert_exactly_once, compactor_config, produce_readings,
    read_committed_rows, telemetry_readings, unique_suffix,
};
use sluice_lake::{CommitOutcome, Lake};

const HOUR: i64 = 3_600_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactor_commits_to_s3_exactly_once() {
    let broker = Broker::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let unused_local = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, unused_local.path());
    config.object_store = s3.store_config("lake/prod");
    // Every file goes up as a multipart upload here (the last part may be below S3's 5 MiB).
    config.object_store.multipart_threshold_bytes = 1;
    let readings = telemetry_readings(5_000, 25, 2 * HOUR);
    let compactor = CompactorService::start(config.clone()).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), &readings).await.unwrap();

    let (store, root) = sluice_lake::open_store(&config.object_store).unwrap();
    assert_eq!(root.as_ref(), "lake/prod");
    let lake = Lake::new(store, root);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed: u64 =
            lake.commits("telemetry").await.unwrap().iter().map(|commit| commit.num_rows()).sum();
        if committed >= readings.len() as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    compactor.stop().await.unwrap();
    assert_exactly_once(&read_committed_rows(&lake, "telemetry").await.unwrap(), &readings);

    // The commit point really is create-if-absent on this server.
    let latest = lake.latest_commit("telemetry", 0).await.unwrap().expect("partition 0 committed");
    assert_eq!(lake.create_commit(&latest).await.unwrap(), CommitOutcome::Conflict);
}
