//! Event times at the extremes over HTTP against a real Tansu broker: every extreme form of `ts`
//! is refused with a 400 that names the field and the reason (none panics the service), the
//! earliest accepted time is configurable and accepted exactly, and only valid readings land.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_integration_tests::{Broker, IngestService, consume_topic, ingest_config, now_micros};

/// 2000-01-01T00:00:00Z, the default earliest event time.
const EARLIEST_MICROS: i64 = 946_684_800_000_000;

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, Value) {
    let response = client.post(url).json(body).send().await.expect("the service answers");
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_event_times_are_refused_with_reasons() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    let refused: Vec<(Value, &str)> = vec![
        (json!(i64::MIN), "earliest"),
        (json!(i64::MIN + 1), "earliest"),
        (json!(i64::MAX), "in the future"),
        (json!(i64::MAX - 1), "in the future"),
        (json!(u64::MAX), "not an integer"),
        (json!(-1), "earliest"),
        (json!(0), "earliest"),
        (json!(-100_000_000_000_000_i64), "earliest"),
        (json!(99_999_999_999_999_i64), "in the future"),
        (json!(EARLIEST_MICROS - 1), "earliest"),
        (json!(EARLIEST_MICROS / 1_000 - 1), "earliest"),
        (json!(1e300), "not an integer"),
        (json!(-1e300), "not an integer"),
        (json!(1.5), "not an integer"),
        (json!("0000-01-01T00:00:00Z"), "earliest"),
        (json!("1999-12-31T23:59:59.999999Z"), "earliest"),
        (json!("9999-12-31T23:59:59.999999Z"), "in the future"),
        (json!("+10000-01-01T00:00:00Z"), "not an RFC 3339 timestamp"),
        (json!("-0001-01-01T00:00:00Z"), "not an RFC 3339 timestamp"),
        (json!("2026-13-01T00:00:00Z"), "not an RFC 3339 timestamp"),
    ];
    for (index, (ts, expected)) in refused.iter().enumerate() {
        let body = json!({"device_id": "extreme", "ts": ts, "seq": index});
        let (status, answer) = post(&client, &url, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ts}: {answer}");
        assert_eq!(answer["rejected"][0]["field"], json!("ts"), "{ts}: {answer}");
        let reason = answer["rejected"][0]["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{ts}: {reason}");
    }
    // All of them in one batch with a valid reading: refused whole, each listed.
    let mut batch: Vec<Value> = refused
        .iter()
        .enumerate()
        .map(|(index, (ts, _))| json!({"device_id": "extreme", "ts": ts, "seq": index}))
        .collect();
    batch.push(json!({"device_id": "valid-neighbour", "ts": now_micros(), "seq": 1}));
    let (status, answer) = post(&client, &url, &Value::Array(batch)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["num_rejected_records"], json!(refused.len()), "{answer}");

    // The bounds themselves are accepted: the earliest time in each form, and now.
    for (seq, ts) in [
        json!(EARLIEST_MICROS),
        json!(EARLIEST_MICROS / 1_000),
        json!("2000-01-01T00:00:00Z"),
        json!(now_micros()),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, answer) =
            post(&client, &url, &json!({"device_id": "bound", "ts": ts, "seq": seq})).await;
        assert_eq!(status, StatusCode::OK, "{ts}: {answer}");
    }
    let records = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.stream_topic("telemetry"),
        4,
        Duration::from_millis(1500),
    )
    .await
    .unwrap();
    assert_eq!(records.len(), 4, "only the readings within bounds landed");
    assert!(records.iter().all(|record| record.key.as_deref() == Some("bound")));
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earliest_event_time_is_configurable() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.validation.earliest_event_time = "2020-01-01T00:00:00Z".into();
    let ingest = IngestService::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    let (status, answer) =
        post(&client, &url, &json!({"device_id": "d", "ts": "2019-12-31T23:59:59.999999Z", "seq": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let reason = answer["rejected"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("is before 2020-01-01T00:00:00Z"), "{reason}");
    let (status, _) =
        post(&client, &url, &json!({"device_id": "d", "ts": "2020-01-01T00:00:00Z", "seq": 2})).await;
    assert_eq!(status, StatusCode::OK);
    ingest.stop().await.unwrap();
}
