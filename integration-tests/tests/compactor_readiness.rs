//! `/readyz` of the compactor means "owns its partitions, or knows it has none to own": not
//! before the group assigned it its share (which on the local broker takes seconds, and after a
//! member left during its first join, much longer), and true for a member of a group with more
//! members than partitions once it was told it has none.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_integration_tests::{
    Sandbox, assert_exactly_once, produce_readings, read_lake_rows, telemetry_readings, wait_for_lake_rows,
    wait_until,
};
use sluice_shutdown::CancellationToken;

const HOUR: i64 = 3_600_000_000;

async fn readyz(address: SocketAddr) -> u16 {
    match reqwest::get(format!("http://{address}/readyz")).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_assigned_and_a_member_without_partitions_knows_it() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut config = sandbox.compactor_config();
    // One partition, two members: the second has nothing to own.
    config.kafka.topics.partitions = 1;
    let first_shutdown = CancellationToken::new();
    // A failing assertion must not leave the consumer thread running (the runtime waits for it).
    let _first_shutdown_guard = first_shutdown.clone().drop_guard();
    let first = sluice_compactor::start(config.clone(), first_shutdown.clone()).await.unwrap();
    let first_health = first.health_address().unwrap();
    // Tansu's first join takes about half the session timeout (3 s here): not ready before it.
    assert_eq!(readyz(first_health).await, 503, "ready before the group assigned anything");
    assert!(
        wait_until(Duration::from_secs(60), || async move { readyz(first_health).await == 200 }).await,
        "ready once assigned"
    );
    let readings = telemetry_readings(500, 5, HOUR);
    produce_readings(&sandbox.bootstrap_servers(), &sandbox.topic("telemetry"), &readings).await.unwrap();
    wait_for_lake_rows(sandbox.lake_dir(), "telemetry", readings.len(), Duration::from_secs(30)).await;

    let second_shutdown = CancellationToken::new();

    // A failing assertion must not leave the consumer thread running (the runtime waits for it).

    let _second_shutdown_guard = second_shutdown.clone().drop_guard();
    let second = sluice_compactor::start(config.clone(), second_shutdown.clone()).await.unwrap();
    let second_health = second.health_address().unwrap();
    assert_eq!(readyz(second_health).await, 503, "the second member is not ready before its assignment");
    let both_ready = wait_until(Duration::from_secs(90), || async move {
        readyz(first_health).await == 200 && readyz(second_health).await == 200
    })
    .await;
    assert!(both_ready, "after the rebalance both know what they own: one partition, and none");
    // The partition's owner still writes.
    let more: Vec<serde_json::Value> = telemetry_readings(1_000, 5, HOUR)[500..].to_vec();
    produce_readings(&sandbox.bootstrap_servers(), &sandbox.topic("telemetry"), &more).await.unwrap();
    let expected: Vec<serde_json::Value> = readings.iter().chain(&more).cloned().collect();
    let rows =
        wait_for_lake_rows(sandbox.lake_dir(), "telemetry", expected.len(), Duration::from_secs(60)).await;
    assert_exactly_once(&rows, &expected);
    second_shutdown.cancel();
    first_shutdown.cancel();
    second.wait().await.unwrap();
    first.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_member_stopped_during_its_first_join_the_next_is_ready_only_when_it_owns_partitions() {
    let sandbox = Sandbox::start().await.unwrap();
    let config = sandbox.compactor_config();
    let readings = telemetry_readings(2_000, 40, HOUR);

    // Stopped while its first join is still pending on the broker (Tansu answers a first join
    // after about half the session timeout, 3 s here).
    let shutdown = CancellationToken::new();
    let _shutdown_guard = shutdown.clone().drop_guard();
    let stopped = sluice_compactor::start(config.clone(), shutdown.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopped.is_ready());
    shutdown.cancel();
    stopped.wait().await.unwrap();

    // The local broker now holds the group for minutes (it waits for the member that left in
    // the middle of its join). The next compactor must not claim to be ready meanwhile: whenever
    // it says ready, it owns the partitions, and the readings land within a few flushes.
    let shutdown = CancellationToken::new();
    let _shutdown_guard = shutdown.clone().drop_guard();
    let next = sluice_compactor::start(config.clone(), shutdown.clone()).await.unwrap();
    let health = next.health_address().unwrap();
    produce_readings(&sandbox.bootstrap_servers(), &sandbox.topic("telemetry"), &readings).await.unwrap();
    let watch_until = Instant::now() + Duration::from_secs(40);
    let mut num_samples = 0;
    while Instant::now() < watch_until {
        num_samples += 1;
        if readyz(health).await == 200 {
            let ready_after = Instant::now();
            let rows =
                wait_for_lake_rows(sandbox.lake_dir(), "telemetry", readings.len(), Duration::from_secs(15))
                    .await;
            assert_eq!(rows.len(), readings.len(), "said ready, but the readings did not land within 15 s");
            assert!(ready_after.elapsed() < Duration::from_secs(15));
            break;
        }
        // Not ready: then it does not own the partitions either, and nothing lands.
        assert!(read_lake_rows(sandbox.lake_dir(), "telemetry").unwrap().is_empty(), "rows land while 503");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(num_samples > 10);
    shutdown.cancel();
    next.wait().await.unwrap();
    let rows = read_lake_rows(sandbox.lake_dir(), "telemetry").unwrap();
    // Either it got its partitions within the watch and everything landed once, or it never
    // claimed to be ready and nothing landed.
    if !rows.is_empty() {
        assert_exactly_once(&rows, &readings);
    }
}
