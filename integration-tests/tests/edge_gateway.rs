//! The edge gateway's device side with real clients (HTTP, and MQTT through a real Mosquitto):
//! a reading is answered 200 only once it is in the spool on disk, with central ingest's
//! validation and answers; a full spool refuses with 507 and keeps everything it acknowledged,
//! or drops its oldest batches when configured to; a restart keeps everything acknowledged; MQTT
//! messages that fail validation go to the local dead-letter log.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_edge::spool::{FullPolicy, Spool};
use sluice_integration_tests::{
    EdgeService, Mosquitto, MqttDevice, decode_value, edge_config, now_micros, telemetry_schema_json,
    wait_until,
};

/// `count` readings of `device`, seq from `first_seq`, each padded with `pad` bytes of site name.
fn readings(device: &str, first_seq: i64, count: i64, pad: usize) -> Value {
    let site = "s".repeat(pad);
    let ts = now_micros() - 1_000_000;
    Value::Array(
        (first_seq..first_seq + count)
            .map(|seq| json!({"device_id": device, "ts": ts, "seq": seq, "site": site}))
            .collect(),
    )
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// (device_id, seq) of every reading in the spool not yet forwarded, in spool order.
fn spooled(spool: &Spool) -> Vec<(String, i64)> {
    let schema_json = telemetry_schema_json();
    let mut keys = Vec::new();
    for frame in spool.unforwarded(usize::MAX, usize::MAX).unwrap() {
        let batch = sluice_edge::forwarded::decode_spooled(&frame.payload).unwrap();
        assert_eq!(batch.stream, "telemetry");
        for record in batch.records {
            let value = decode_value(&schema_json, record.value).unwrap();
            let device = value["device_id"].as_str().unwrap().to_string();
            assert_eq!(record.key, device, "the key is the reading's device");
            keys.push((device, value["seq"].as_i64().unwrap()));
        }
    }
    keys
}

/// The spool of a stopped gateway, opened as the next start would open it.
fn reopened(directory: &Path) -> Spool {
    let config = edge_config(directory);
    Spool::open(sluice_edge::spool::SpoolConfig {
        directory: directory.to_path_buf(),
        max_bytes: config.spool.max_bytes,
        segment_bytes: config.spool.segment_bytes,
        full_policy: config.spool.full_policy,
    })
    .unwrap()
}

fn keys(device: &str, seqs: std::ops::Range<i64>) -> Vec<(String, i64)> {
    seqs.map(|seq| (device.to_string(), seq)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_readings_are_in_the_spool_and_survive_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let edge = EdgeService::start(edge_config(directory.path())).await.unwrap();
    let client = reqwest::Client::new();
    let url = edge.records_url("telemetry");
    for first_seq in [0, 10, 20] {
        let (status, body) = post(&client, &url, &readings("pump-1", first_seq, 10, 4)).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"accepted": 10})));
    }
    // Central ingest's answers for bad input, and nothing of it spooled.
    let mut invalid = readings("pump-1", 100, 3, 4);
    invalid[1]["seq"] = json!("not a number");
    let (status, body) = post(&client, &url, &invalid).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["num_rejected_records"], 1);
    assert_eq!(body["rejected"][0]["index"], 1);
    let (status, body) = post(&client, &edge.records_url("nope"), &readings("pump-1", 0, 1, 4)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let ready = client.get(format!("{}/readyz", edge.base_url)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let spool = edge.running().unwrap().spool().clone();
    assert_eq!(spooled(&spool), keys("pump-1", 0..30));
    drop(spool);
    edge.stop().await.unwrap();

    assert_eq!(spooled(&reopened(directory.path())), keys("pump-1", 0..30), "on disk after a stop");
    let edge = EdgeService::start(edge_config(directory.path())).await.unwrap();
    let (status, _) = post(&client, &edge.records_url("telemetry"), &readings("pump-2", 0, 5, 4)).await;
    assert_eq!(status, StatusCode::OK);
    let expected: Vec<(String, i64)> =
        keys("pump-1", 0..30).into_iter().chain(keys("pump-2", 0..5)).collect();
    assert_eq!(spooled(edge.running().unwrap().spool()), expected, "appended after what the restart found");
    edge.stop().await.unwrap();
}

/// A gateway whose spool holds about two megabytes: the smallest spool files and request bodies
/// of at most 64 KiB.
fn small_spool_config(directory: &Path, full_policy: FullPolicy) -> sluice_edge::EdgeConfig {
    let mut config = edge_config(directory);
    config.http.max_body_bytes = 64 * 1024;
    config.spool.segment_bytes = 1024 * 1024;
    config.spool.max_bytes = 2 * (config.spool.segment_bytes + config.http.max_body_bytes as u64);
    config.spool.full_policy = full_policy;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_with_507_and_keeps_all_it_acknowledged() {
    let directory = tempfile::tempdir().unwrap();
    let edge = EdgeService::start(small_spool_config(directory.path(), FullPolicy::Refuse)).await.unwrap();
    let client = reqwest::Client::new();
    let url = edge.records_url("telemetry");
    let mut accepted = Vec::new();
    let mut refusal_opt = None;
    for request in 0..1_000 {
        let (status, body) = post(&client, &url, &readings("pump-1", request * 100, 100, 200)).await;
        match status {
            StatusCode::OK => accepted.extend(keys("pump-1", request * 100..request * 100 + 100)),
            StatusCode::INSUFFICIENT_STORAGE => {
                refusal_opt = Some((request, body));
                break;
            }
            other => panic!("request {request}: {other} {body}"),
        }
    }
    let (refused_request, body) = refusal_opt.expect("the spool filled up");
    assert!(refused_request > 20, "about two megabytes took {refused_request} requests");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("the spool is full") && error.contains("nothing was written"), "{error}");
    // Still full for a request of that size: refused again, whole.
    let (status, _) = post(&client, &url, &readings("pump-1", refused_request * 100, 100, 200)).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    let ready = client.get(format!("{}/readyz", edge.base_url)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "a full spool is not a broken gateway");
    assert_eq!(
        spooled(edge.running().unwrap().spool()),
        accepted,
        "everything acknowledged, nothing refused"
    );
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_taking_readings_and_loses_only_the_oldest() {
    let directory = tempfile::tempdir().unwrap();
    let edge =
        EdgeService::start(small_spool_config(directory.path(), FullPolicy::DropOldest)).await.unwrap();
    let client = reqwest::Client::new();
    let url = edge.records_url("telemetry");
    let num_requests = 400;
    for request in 0..num_requests {
        let (status, body) = post(&client, &url, &readings("pump-1", request * 100, 100, 200)).await;
        assert_eq!(status, StatusCode::OK, "request {request}: {body}");
    }
    let kept = spooled(edge.running().unwrap().spool());
    let first_kept = kept.first().unwrap().1;
    assert!(first_kept > 0, "the oldest were dropped");
    assert_eq!(first_kept % 100, 0, "whole requests are dropped, never part of one");
    assert_eq!(kept, keys("pump-1", first_kept..num_requests * 100), "every newer reading is kept, in order");
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_readings_are_spooled_and_invalid_ones_go_to_the_dead_letter_log() {
    let mosquitto = Mosquitto::start().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let mut config = edge_config(directory.path());
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("sluice-edge-{}", sluice_integration_tests::unique_suffix());
    let edge = EdgeService::start(config).await.unwrap();
    let spool = edge.running().unwrap().spool().clone();
    // Until the bridge subscribed, a publish has no subscriber: probe until one is spooled.
    let mut device = MqttDevice::connect(mosquitto.port).await;
    let mut subscribed = false;
    for attempt in 0..100 {
        let probe = json!({"ts": now_micros(), "seq": attempt});
        let _ = device.publish("sluice/telemetry/probe", probe).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !spooled(&spool).is_empty() {
            subscribed = true;
            break;
        }
    }
    assert!(subscribed, "the bridge never spooled a probe");
    for seq in 0..20 {
        device
            .publish("sluice/telemetry/valve-7", json!({"ts": now_micros() - 1_000, "seq": seq}))
            .await
            .unwrap();
    }
    device.publish_bytes("sluice/telemetry/valve-7", b"{not json".to_vec()).await.unwrap();
    let of_valve =
        |spool: &Spool| spooled(spool).into_iter().filter(|(device, _)| device == "valve-7").count();
    let all_in = wait_until(Duration::from_secs(10), || {
        let spool = spool.clone();
        async move { of_valve(&spool) >= 20 }
    })
    .await;
    assert!(all_in, "valve-7 readings spooled: {}", of_valve(&spool));
    let valve: Vec<(String, i64)> =
        spooled(&spool).into_iter().filter(|(device, _)| device == "valve-7").collect();
    assert_eq!(valve, keys("valve-7", 0..20), "each reading once, in order");
    let log_path = directory.path().join(sluice_edge::DEAD_LETTER_FILE);
    let lettered = wait_until(Duration::from_secs(10), || {
        let log_path = log_path.clone();
        async move { std::fs::metadata(&log_path).map(|metadata| metadata.len() > 0).unwrap_or(false) }
    })
    .await;
    assert!(lettered, "no dead letter written");
    let dead_letters = std::fs::read_to_string(&log_path).unwrap();
    let letter: Value = serde_json::from_str(dead_letters.lines().last().unwrap()).unwrap();
    assert_eq!(letter["payload_hex"], hex::encode(b"{not json"));
    assert_eq!(letter["key"], "valve-7");
    assert_eq!(letter["source"], "mqtt:sluice/telemetry/valve-7");
    drop(spool);
    edge.stop().await.unwrap();
}
