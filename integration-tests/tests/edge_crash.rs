//! The `sluice-edge` binary killed with SIGKILL again and again, while devices send to it and
//! while it forwards to a real central ingest, Tansu broker and compactor: after the last
//! restart drains the spool, every reading the gateway acknowledged is in the lake exactly once,
//! and nothing is there that was not sent.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_integration_tests::{
    Broker, CompactorService, IngestService, Readiness, ServiceBinary, compactor_config, edge_toml,
    ingest_config, now_micros, read_lake_rows, wait_until, workspace_binary,
};

const KILLS: usize = 5;

/// Starts the gateway binary on the spool in `directory`, forwarding to `central_url` slowly
/// (small batches, a rate limit), so that each kill falls while it forwards.
async fn start_edge(directory: &Path, central_url: &str) -> ServiceBinary {
    let config_path = directory.join("edge.toml");
    let spool = directory.join("spool");
    let forward = format!(
        "url = \"{central_url}\"\nedge_id = \"crash-site\"\nmax_batch_readings = 40\n\
         max_readings_per_second = 400\nlinger_ms = 20\nbackoff_initial_ms = 50\nbackoff_max_ms = 300"
    );
    ServiceBinary::start_with_config(
        "sluice-edge",
        Readiness::HttpOk("/readyz"),
        &workspace_binary("sluice-edge"),
        &config_path,
        |port| edge_toml(port, &spool, &forward, ""),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gateways_lose_nothing_they_acknowledged_and_land_nothing_twice() {
    let broker = Broker::start().await.unwrap();
    let central_config = ingest_config(&broker);
    let prefix = central_config.kafka.topic_prefix.clone();
    let ingest = IngestService::start(central_config).await.unwrap();
    let lake_dir = tempfile::tempdir().unwrap();
    let compactor =
        CompactorService::start(compactor_config(&broker, &prefix, lake_dir.path())).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let acknowledged: Arc<Mutex<BTreeSet<(String, i64)>>> = Arc::default();
    let sent: Arc<Mutex<BTreeSet<(String, i64)>>> = Arc::default();
    let (url_tx, url_rx) = tokio::sync::watch::channel(String::new());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // A device that keeps sending 20 readings a request; a request that fails is not sent
    // again (its readings may or may not be in the spool), the next one has new seqs.
    let device = {
        let (acknowledged, sent) = (Arc::clone(&acknowledged), Arc::clone(&sent));
        tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
            let mut next_seq = 0;
            while !*stop_rx.borrow_and_update() {
                let url = url_rx.borrow().clone();
                let ts = now_micros() - 1_000_000;
                let body: Vec<Value> = (next_seq..next_seq + 20)
                    .map(|seq| json!({"device_id": format!("valve-{}", seq % 3), "ts": ts, "seq": seq}))
                    .collect();
                let keys: Vec<(String, i64)> =
                    (next_seq..next_seq + 20).map(|seq| (format!("valve-{}", seq % 3), seq)).collect();
                next_seq += 20;
                sent.lock().unwrap().extend(keys.iter().cloned());
                let response =
                    client.post(format!("{url}/v1/streams/telemetry/records")).json(&body).send().await;
                if response.is_ok_and(|response| response.status() == StatusCode::OK) {
                    acknowledged.lock().unwrap().extend(keys);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    for kill in 0..KILLS {
        let edge = start_edge(directory.path(), &ingest.base_url).await;
        url_tx.send(edge.base_url()).unwrap();
        // Long enough to take readings and forward some of the spool; a different moment each time.
        tokio::time::sleep(Duration::from_millis(700 + 150 * kill as u64)).await;
        edge.kill().await;
    }
    let edge = start_edge(directory.path(), &ingest.base_url).await;
    url_tx.send(edge.base_url()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    device.await.unwrap();

    let acknowledged = acknowledged.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(acknowledged.len() >= 200, "the device got answers: {} readings", acknowledged.len());
    let all_landed = wait_until(Duration::from_secs(90), || {
        let lake_dir = lake_dir.path().to_path_buf();
        let acknowledged = acknowledged.clone();
        async move {
            let rows = read_lake_rows(&lake_dir, "telemetry").unwrap_or_default();
            let landed: BTreeSet<(String, i64)> =
                rows.into_iter().map(|row| (row.device_id, row.seq)).collect();
            acknowledged.is_subset(&landed)
        }
    })
    .await;
    // Copies sent again after a kill land after the first ones: give them time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = read_lake_rows(lake_dir.path(), "telemetry").unwrap();
    let landed: BTreeSet<(String, i64)> = rows.iter().map(|row| (row.device_id.clone(), row.seq)).collect();
    let missing: Vec<_> = acknowledged.difference(&landed).take(10).collect();
    assert!(all_landed, "acknowledged readings missing from the lake (first 10): {missing:?}");
    assert_eq!(rows.len(), landed.len(), "a reading is in the lake twice");
    assert!(landed.is_subset(&sent), "the lake holds readings nobody sent");
    drop(edge);
    compactor.stop().await.unwrap();
    ingest.stop().await.unwrap();
}
