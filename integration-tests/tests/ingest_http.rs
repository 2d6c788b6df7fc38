//! Ingest over HTTP against a real Tansu broker: what is answered, and exactly what lands in
//! Kafka, for good and bad requests.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Write;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_integration_tests::{
    Broker, IngestService, consume_topic, decode_value, ingest_config, now_micros, telemetry_schema_json,
    wait_until,
};

const SETTLE: Duration = Duration::from_millis(1500);

fn reading(device: &str, seq: i64, ts_micros: i64) -> Value {
    json!({"device_id": device, "ts": ts_micros, "seq": seq, "site": "farm-1", "temperature": 20.5 + seq as f64})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_batch_lands_with_key_event_time_and_schema_header() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let ts = now_micros() - 60_000_000;
    let body = json!([reading("dev-a", 1, ts), reading("dev-b", 1, ts + 1), reading("dev-a", 2, ts + 2)]);

    let response = client.post(ingest.records_url("telemetry")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"accepted": 3}));

    let records = consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 3, SETTLE)
        .await
        .unwrap();
    assert_eq!(records.len(), 3);
    let schema_json = telemetry_schema_json();
    let fingerprint = sluice_schema::StreamSchema::from_avro_json("telemetry", &schema_json, "t".as_ref())
        .unwrap()
        .fingerprint_hex();
    let mut seen = Vec::new();
    for record in &records {
        let value = decode_value(&schema_json, &record.payload).unwrap();
        let device = value["device_id"].as_str().unwrap().to_string();
        assert_eq!(record.key.as_deref(), Some(device.as_str()), "keyed by device");
        assert_eq!(
            record.timestamp_millis,
            Some(value["ts"].as_i64().unwrap() / 1_000),
            "Kafka timestamp is event time"
        );
        assert_eq!(record.header(sluice_ingest::SCHEMA_FINGERPRINT_HEADER), Some(fingerprint.as_str()));
        let ingest_time: i64 = record.header(sluice_ingest::INGEST_TIME_HEADER).unwrap().parse().unwrap();
        assert!((ingest_time - now_micros()).abs() < 60_000_000);
        assert_eq!(value["site"], json!("farm-1"));
        assert_eq!(value["humidity"], Value::Null);
        seen.push((device, value["seq"].as_i64().unwrap(), value["temperature"].as_f64().unwrap()));
    }
    seen.sort_by(|left, right| left.partial_cmp(right).unwrap());
    assert_eq!(
        seen,
        [("dev-a".to_string(), 1, 21.5), ("dev-a".to_string(), 2, 22.5), ("dev-b".to_string(), 1, 21.5)]
    );
    // Same key, same partition: per-device order is kept.
    let partitions: Vec<i32> = records
        .iter()
        .filter(|record| record.key.as_deref() == Some("dev-a"))
        .map(|record| record.partition)
        .collect();
    assert_eq!(partitions[0], partitions[1]);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_gzip_zstd_and_timestamp_forms_are_accepted() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let millis = now_micros() / 1_000 - 1_000;
    let ndjson = format!(
        "{}\n{}\n",
        json!({"device_id": "n1", "ts": millis, "seq": 1}),
        json!({"device_id": "n2", "ts": "2026-01-02T03:04:05.678901Z", "seq": 1})
    );
    let response = client
        .post(ingest.records_url("telemetry"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(json!({"device_id": "g1", "ts": millis, "seq": 1}).to_string().as_bytes()).unwrap();
    let response = client
        .post(ingest.records_url("telemetry"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let zstd_body =
        zstd::encode_all(json!([{"device_id": "z1", "ts": millis, "seq": 1}]).to_string().as_bytes(), 3)
            .unwrap();
    let response = client
        .post(ingest.records_url("telemetry"))
        .header("content-type", "application/json")
        .header("content-encoding", "zstd")
        .body(zstd_body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let records = consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 4, SETTLE)
        .await
        .unwrap();
    let schema_json = telemetry_schema_json();
    let mut by_device: Vec<(String, i64)> = records
        .iter()
        .map(|record| {
            let value = decode_value(&schema_json, &record.payload).unwrap();
            (value["device_id"].as_str().unwrap().to_string(), value["ts"].as_i64().unwrap())
        })
        .collect();
    by_device.sort();
    assert_eq!(
        by_device,
        [
            ("g1".to_string(), millis * 1_000),
            ("n1".to_string(), millis * 1_000),
            ("n2".to_string(), 1_767_323_045_678_901),
            ("z1".to_string(), millis * 1_000),
        ]
    );
    ingest.stop().await.unwrap();
}

/// Every bad request gets its status and reason, and none of them writes anything: after them a
/// good request is the only thing in the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_reasons_and_write_nothing() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.http.max_body_bytes = 64 * 1024;
    config.http.max_records_per_request = 50;
    let ingest = IngestService::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    let now = now_micros();
    let post_json =
        |body: String| client.post(&url).header("content-type", "application/json").body(body).send();

    // Malformed JSON.
    let response = post_json("{\"device_id\": ".to_string()).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("not valid JSON"), "{answer}");

    // Wrong type in one record of three, missing field in another: the batch is refused whole.
    let body = json!([
        reading("ok-1", 1, now),
        {"device_id": "bad-type", "ts": now, "seq": 1, "temperature": "warm"},
        {"device_id": "missing-seq", "ts": now},
    ]);
    let response = post_json(body.to_string()).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["num_rejected_records"], json!(2));
    let rejected = answer["rejected"].as_array().unwrap();
    assert_eq!(
        (rejected[0]["index"].as_u64(), rejected[0]["field"].as_str()),
        (Some(1), Some("temperature"))
    );
    assert!(rejected[0]["reason"].as_str().unwrap().contains("expected double"), "{answer}");
    assert_eq!((rejected[1]["index"].as_u64(), rejected[1]["field"].as_str()), (Some(2), Some("seq")));
    assert!(rejected[1]["reason"].as_str().unwrap().contains("missing"), "{answer}");

    // Far-future event time.
    let response = post_json(reading("future", 1, now + 3_600_000_000).to_string()).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["rejected"][0]["field"], json!("ts"));
    assert!(answer["rejected"][0]["reason"].as_str().unwrap().contains("in the future"));

    // Unknown stream.
    let response =
        client.post(ingest.records_url("weather")).json(&reading("x", 1, now)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("known streams: telemetry"), "{answer}");

    // Oversized body.
    let big: Vec<Value> = (0..1_000).map(|seq| reading("big", seq, now)).collect();
    let response = post_json(Value::Array(big).to_string()).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Too many records (each small).
    let many: String =
        (0..51).map(|seq| format!("{}\n", json!({"device_id": "m", "ts": now, "seq": seq}))).collect();
    let response =
        client.post(&url).header("content-type", "application/x-ndjson").body(many).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("limit of 50"), "{answer}");

    // Unsupported media type.
    let response = client.post(&url).header("content-type", "text/csv").body("a,b").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // The only records in the topic are the sentinel's.
    let response = client
        .post(&url)
        .json(&json!([reading("sentinel", 1, now), reading("sentinel", 2, now)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let records = consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 2, SETTLE)
        .await
        .unwrap();
    assert_eq!(records.len(), 2, "only the sentinel landed");
    assert!(records.iter().all(|record| record.key.as_deref() == Some("sentinel")));
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_required_and_scoped_to_streams() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.auth.enabled = true;
    config.auth.tokens = vec![
        sluice_ingest::config::TokenConfig {
            name: "other-stream-only".into(),
            token_sha256: sluice_config::Secret::new(sha256_hex("limited-token")),
            streams: vec!["alarms".into()],
        },
        sluice_ingest::config::TokenConfig {
            name: "farm".into(),
            token_sha256: sluice_config::Secret::new(sha256_hex("farm-token")),
            streams: vec!["telemetry".into()],
        },
    ];
    let ingest = IngestService::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    let body = reading("auth", 1, now_micros());

    let response = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let response = client.post(&url).bearer_auth("guess").json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = client.post(&url).bearer_auth("limited-token").json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("'other-stream-only' may not write stream 'telemetry'")
    );
    let response = client.post(&url).bearer_auth("farm-token").json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let records = consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 1, SETTLE)
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    ingest.stop().await.unwrap();
}

fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_broker_gets_503_with_retry_after_within_bounded_time() {
    let mut broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    // Long enough that an answer which waited for it cannot pass for a refusal at once, which
    // is what the second half checks, without a wall-clock bound of a second or two.
    let delivery_timeout = Duration::from_secs(8);
    config.producer.delivery_timeout_ms = delivery_timeout.as_millis() as u64;
    let ingest = IngestService::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    let ready = client.get(format!("{}/readyz", ingest.base_url)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let response = client.post(&url).json(&reading("before", 1, now_micros())).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    broker.kill().await;
    // Straight after the crash, before the health probe noticed: the delivery timeout bounds
    // the answer.
    let started = Instant::now();
    let response = client.post(&url).json(&reading("during", 1, now_micros())).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(
        started.elapsed() < delivery_timeout + Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );

    // Once the probe noticed, /readyz fails and requests are refused at once.
    let readyz = format!("{}/readyz", ingest.base_url);
    let not_ready = wait_until(Duration::from_secs(30), || {
        let client = client.clone();
        let readyz = readyz.clone();
        async move {
            client
                .get(&readyz)
                .send()
                .await
                .map(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(not_ready, "/readyz should report the broker down");
    let started = Instant::now();
    let response = client.post(&url).json(&reading("after", 1, now_micros())).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("unreachable"), "{answer}");
    assert!(started.elapsed() < delivery_timeout, "the refusal waited: {:?}", started.elapsed());
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let health = client.get(format!("{}/healthz", ingest.base_url)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = client.get(format!("{}/readyz", ingest.base_url)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_producer_queue_answers_503_with_retry_after() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    // 1 KiB of producer queue: a request of 2,000 readings cannot fit.
    config.producer.queue_max_kbytes = 1;
    config.producer.linger_ms = 1_000;
    let ingest = IngestService::start(config).await.unwrap();
    let now = now_micros();
    let body: Vec<Value> = (0..2_000).map(|seq| reading("burst", seq, now)).collect();
    let response =
        reqwest::Client::new().post(ingest.records_url("telemetry")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("queue is full"), "{answer}");
    ingest.stop().await.unwrap();
}
