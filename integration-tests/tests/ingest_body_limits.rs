//! What ingest does with bodies at and past its limits, against a real Tansu broker: every
//! gzip member is read and trailing garbage refused; records too large for Kafka are refused
//! before anything of the request is written; bodies at, and one byte over, the size limit;
//! JSON shapes that cost memory (deep nesting, huge arrays of tiny values, long strings, bombs)
//! get a clear answer and write nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Write;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_integration_tests::{
    Broker, IngestService, consume_topic, decode_value, ingest_config, now_micros, telemetry_schema_json,
};

const SETTLE: Duration = Duration::from_millis(1500);

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn line(device: &str, seq: i64) -> String {
    format!("{}\n", json!({"device_id": device, "ts": now_micros() - 1_000_000, "seq": seq}))
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    encoding_opt: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request = client.post(url).header("content-type", content_type).body(body);
    if let Some(encoding) = encoding_opt {
        request = request.header("content-encoding", encoding);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// (device_id, seq) of every record in the stream topic, sorted.
async fn landed(broker: &Broker, ingest: &IngestService, expected: usize) -> Vec<(String, i64)> {
    let records =
        consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), expected, SETTLE)
            .await
            .unwrap();
    let schema_json = telemetry_schema_json();
    let mut keys: Vec<(String, i64)> = records
        .iter()
        .map(|record| {
            let value = decode_value(&schema_json, &record.payload).unwrap();
            (value["device_id"].as_str().unwrap().to_string(), value["seq"].as_i64().unwrap())
        })
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gzip_member_is_read_and_garbage_or_truncation_refused() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");

    // `cat a.gz b.gz c.gz` of NDJSON: every member's records.
    let mut members = gzip(line("m", 1).as_bytes());
    members.extend(gzip(format!("{}{}", line("m", 2), line("m", 3)).as_bytes()));
    members.extend(gzip(line("m", 4).as_bytes()));
    let (status, answer) = post(&client, &url, "application/x-ndjson", Some("gzip"), members).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"accepted": 4})));

    // A JSON array split across two members.
    let reading = |seq: i64| json!({"device_id": "j", "ts": now_micros() - 1_000_000, "seq": seq});
    let mut split = gzip(format!("[{},", reading(1)).as_bytes());
    split.extend(gzip(format!("{}]", reading(2)).as_bytes()));
    let (status, answer) = post(&client, &url, "application/json", Some("gzip"), split).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"accepted": 2})));

    // Trailing garbage after a complete member, and a member cut short.
    let member = gzip(format!("{}{}", line("bad", 1), line("bad", 2)).as_bytes());
    let mut trailing = member.clone();
    trailing.extend_from_slice(b"this is not gzip");
    let (status, answer) = post(&client, &url, "application/x-ndjson", Some("gzip"), trailing).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("not valid gzip"), "{answer}");
    let truncated = member[..member.len() - 4].to_vec();
    let (status, answer) = post(&client, &url, "application/x-ndjson", Some("gzip"), truncated).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("not valid gzip"), "{answer}");
    // Garbage after a zstd frame, too.
    let mut zstd_trailing = zstd::encode_all(line("bad", 3).as_bytes(), 3).unwrap();
    zstd_trailing.extend_from_slice(b"garbage!");
    let (status, answer) = post(&client, &url, "application/x-ndjson", Some("zstd"), zstd_trailing).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    let expected: Vec<(String, i64)> = [("j", 1), ("j", 2), ("m", 1), ("m", 2), ("m", 3), ("m", 4)]
        .into_iter()
        .map(|(device, seq)| (device.to_string(), seq))
        .collect();
    assert_eq!(landed(&broker, &ingest, expected.len()).await, expected);
    ingest.stop().await.unwrap();
}

/// Encoded value plus key of a reading whose `site` is `site_len` characters.
fn record_bytes(device: &str, site_len: usize) -> usize {
    let schema =
        sluice_schema::StreamSchema::from_avro_json("telemetry", &telemetry_schema_json(), "t".as_ref())
            .unwrap();
    let reading = json!({"device_id": device, "ts": now_micros(), "seq": 1, "site": "x".repeat(site_len)});
    let mut value = Vec::new();
    schema.encode_json(&reading, now_micros(), 0, &mut value).unwrap();
    value.len() + device.len()
}

/// The `site` length that makes a record exactly `limit` bytes of value and key.
fn site_len_at(device: &str, limit: usize) -> usize {
    let mut site_len = limit;
    while record_bytes(device, site_len) > limit {
        site_len -= 1;
    }
    assert_eq!(record_bytes(device, site_len), limit);
    assert_eq!(record_bytes(device, site_len + 1), limit + 1);
    site_len
}

/// Records as large as Kafka takes are written; one byte more refuses the request before any of
/// it is produced, so a retry cannot duplicate anything. Default `message.max.bytes`, then a
/// configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_the_message_size_are_refused_before_anything_is_written() {
    let broker = Broker::start().await.unwrap();
    for (message_max_bytes_opt, prefix) in [(None, "default"), (Some(20_000), "configured")] {
        let mut config = ingest_config(&broker);
        if let Some(message_max_bytes) = message_max_bytes_opt {
            config.kafka.client.0.insert("message.max.bytes".into(), message_max_bytes.to_string());
        }
        let ingest = IngestService::start(config).await.unwrap();
        let client = reqwest::Client::new();
        let url = ingest.records_url("telemetry");
        let limit = message_max_bytes_opt.unwrap_or(1_000_000) - sluice_ingest::RECORD_OVERHEAD_BYTES;
        let device = format!("{prefix}-big");
        let site_len = site_len_at(&device, limit);
        let ts = now_micros() - 1_000_000;
        let batch = |first_seq: i64, site_len: usize| {
            json!([
                {"device_id": format!("{prefix}-small"), "ts": ts, "seq": first_seq},
                {"device_id": device, "ts": ts, "seq": first_seq, "site": "x".repeat(site_len)},
            ])
        };

        let response = client.post(&url).json(&batch(1, site_len)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{prefix}: at the limit");

        let response = client.post(&url).json(&batch(2, site_len + 1)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{prefix}: one byte over");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["num_rejected_records"], json!(1), "{answer}");
        assert_eq!(answer["rejected"][0]["index"], json!(1), "{answer}");
        let reason = answer["rejected"][0]["reason"].as_str().unwrap();
        assert!(reason.contains(&format!("is {} bytes", limit + 1)), "{reason}");
        assert!(reason.contains("message.max.bytes"), "{reason}");
        assert!(answer["error"].as_str().unwrap().contains("nothing was written"), "{answer}");

        // The issue's case: a 1 MiB string field.
        let response = client.post(&url).json(&batch(3, 1 << 20)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{prefix}: 1 MiB field");

        // Only the first request's two records: nothing of the refused ones was written.
        let expected = vec![(format!("{prefix}-big"), 1), (format!("{prefix}-small"), 1)];
        assert_eq!(landed(&broker, &ingest, 2).await, expected, "{prefix}");
        ingest.stop().await.unwrap();
    }
}

/// A body of exactly the limit is taken, one byte more is not: plain and decompressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_at_the_size_limit_pass_and_one_byte_over_is_refused() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.http.max_body_bytes = 64 * 1024;
    let ingest = IngestService::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    // NDJSON padded with blank lines to an exact size.
    let body_of = |device: &str, size: usize| {
        let mut body = format!("{}{}", line(device, 1), line(device, 2)).into_bytes();
        body.resize(size, b'\n');
        body
    };
    let limit = 64 * 1024;
    let (status, answer) = post(&client, &url, "application/x-ndjson", None, body_of("plain", limit)).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"accepted": 2})));
    let (status, answer) =
        post(&client, &url, "application/x-ndjson", None, body_of("plain-over", limit + 1)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("http.max_body_bytes"), "{answer}");
    let (status, answer) =
        post(&client, &url, "application/x-ndjson", Some("gzip"), gzip(&body_of("gzip", limit))).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"accepted": 2})));
    let (status, answer) =
        post(&client, &url, "application/x-ndjson", Some("gzip"), gzip(&body_of("gzip-over", limit + 1)))
            .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("decompressed body exceeds"), "{answer}");

    let expected: Vec<(String, i64)> = [("gzip", 1), ("gzip", 2), ("plain", 1), ("plain", 2)]
        .into_iter()
        .map(|(device, seq)| (device.to_string(), seq))
        .collect();
    assert_eq!(landed(&broker, &ingest, 4).await, expected);
    ingest.stop().await.unwrap();
}

/// Bodies built to cost memory or stack: each gets its answer, nothing is written, and the
/// service goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costly_json_shapes_are_refused_with_reasons() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let url = ingest.records_url("telemetry");
    let ts = now_micros() - 1_000_000;

    // Deeply nested arrays and objects, as a field value and as the body.
    let depth = 1_000_000;
    let deep_array = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let deep_object = format!("{}0{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    for (name, nested) in [("array", &deep_array), ("object", &deep_object)] {
        let body = format!(r#"{{"device_id":"nested","ts":{ts},"seq":1,"temperature":{nested}}}"#);
        let (status, answer) = post(&client, &url, "application/json", None, body.into_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {answer}");
        assert_eq!(answer["rejected"][0]["field"], json!("temperature"), "{answer}");
        assert!(
            answer["rejected"][0]["reason"].as_str().unwrap().contains(&format!("found an {name}")),
            "{answer}"
        );
    }
    let (status, answer) =
        post(&client, &url, "application/json", None, deep_array.clone().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["rejected"][0]["reason"].as_str().unwrap().contains("must be a JSON object"), "{answer}");
    let (status, answer) =
        post(&client, &url, "application/json", None, deep_object.clone().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    // A gzip of 16 MiB of `[0,0,...]`: 16 KiB on the wire, millions of tiny values.
    let mut zeros = format!("[0{}]", ",0".repeat((16 * 1024 * 1024 - 3) / 2)).into_bytes();
    assert!(zeros.len() <= 16 * 1024 * 1024);
    let (status, answer) = post(&client, &url, "application/json", Some("gzip"), gzip(&zeros)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("more than 10000 records"), "{answer}");
    // The same as a gzip bomb past the body limit.
    zeros.truncate(zeros.len() - 1);
    zeros.extend_from_slice(b",0,0]");
    let (status, answer) = post(&client, &url, "application/json", Some("gzip"), gzip(&zeros)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("decompressed body exceeds"), "{answer}");

    // One long string: a reading far over what a record can carry, refused by index.
    let long = json!([
        {"device_id": "long", "ts": ts, "seq": 1},
        {"device_id": "long", "ts": ts, "seq": 2, "site": "x".repeat(8 * 1024 * 1024)},
    ]);
    let (status, answer) = post(&client, &url, "application/json", None, long.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], json!(1), "{answer}");
    // The answer quotes none of the 8 MiB.
    assert!(answer.to_string().len() < 2_000, "{} bytes", answer.to_string().len());

    // Many unknown fields in one reading: each is listed up to the answer's limit...
    let wide = |num_fields: usize| {
        let fields: String = (0..num_fields).map(|index| format!("\"f{index}\":0,")).collect();
        format!(r#"{{{fields}"device_id":"wide","ts":{ts},"seq":1}}"#).into_bytes()
    };
    let (status, answer) = post(&client, &url, "application/json", None, wide(500)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["rejected"].as_array().unwrap().len(), 100, "{answer}");
    assert_eq!(answer["rejections_truncated"], json!(true), "{answer}");
    // ...and past what a record can carry, the reading is refused whole without being kept.
    let (status, answer) = post(&client, &url, "application/json", None, wide(1_000_000)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["rejected"][0]["reason"].as_str().unwrap().contains("holds more than"), "{answer}");

    let response =
        client.post(&url).json(&json!({"device_id": "after", "ts": ts, "seq": 1})).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(landed(&broker, &ingest, 1).await, [("after".to_string(), 1)]);
    ingest.stop().await.unwrap();
}
