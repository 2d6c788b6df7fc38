//! HTTP ingest throughput against its ceiling, measured in the same run on the same broker.
//!
//! - ceiling: the same Avro records produced straight to Kafka by the rdkafka producer ingest uses,
//!   with ingest's settings (acks=all, idempotence, lz4, linger 5 ms), in batches of 1,000 from
//!   `concurrency` tasks, each batch awaited like a request.
//! - ingest: NDJSON batches of 1,000 readings POSTed over loopback by `concurrency` client tasks
//!   to an in-process sluice-ingest, each answered 200 only after Kafka acknowledged the batch.
//!
//! - simulator: `sluice simulate` (the release binary, when built) sending a fleet's history to the
//!   same ingest, against a ceiling round just before it.
//!
//! `cargo build --release --bin sluice && cargo bench -p sluice-integration-tests --bench ingest_throughput -- [--records N] [--concurrency C]`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_integration_tests::{Broker, IngestService, bench_arg, ingest_config, now_micros, repo_root};
use sluice_kafka::{BatchProducer, BatchRecord};
use sluice_schema::StreamSchema;

// The allocator the sluice-ingest binary uses, so the in-process service runs as it would deployed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH_SIZE: usize = 1_000;

struct Run {
    elapsed: Duration,
    num_records: usize,
    payload_bytes: usize,
}

impl Run {
    fn records_per_sec(&self) -> f64 {
        self.num_records as f64 / self.elapsed.as_secs_f64()
    }

    fn mb_per_sec(&self) -> f64 {
        self.payload_bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
}

/// Readings like a fleet's: 1,000 devices, 4 sites, a few measurements each.
fn readings(num_records: usize) -> Vec<serde_json::Value> {
    let start = now_micros() - 3_600_000_000;
    (0..num_records)
        .map(|index| {
            let device = index % 1_000;
            json!({
                "device_id": format!("device-{device:05}"),
                "ts": start + index as i64 * 1_000,
                "seq": (index / 1_000) as i64,
                "site": format!("site-{}", device % 4),
                "temperature": 15.0 + (index % 200) as f64 / 10.0,
                "humidity": 40.0 + (index % 300) as f64 / 10.0,
                "battery": 1.0 - (index % 1000) as f64 / 2000.0,
                "rssi": -60 - (index % 30) as i64,
            })
        })
        .collect()
}

/// The direct producer, created and connected (topic created, producer id acquired) before timing.
/// It is the producer ingest uses, with per-batch delivery tracking.
async fn direct_producer(bootstrap: &str, topic: &str) -> BatchProducer {
    let mut config =
        sluice_kafka::KafkaConfig { bootstrap_servers: bootstrap.to_string(), ..Default::default() }
            .producer_config();
    config.set("linger.ms", "5").set("compression.type", "lz4").set("queue.buffering.max.kbytes", "262144");
    let producer = BatchProducer::new(&config).unwrap();
    let warm_up = BatchRecord {
        key: b"warm-up",
        value: b"warm-up",
        timestamp_millis: now_micros() / 1_000,
        headers_opt: None,
    };
    let batch = producer.send_batch(topic, std::iter::once(warm_up)).unwrap();
    let outcome = BatchProducer::wait(&batch, Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome.num_failed, 0);
    producer
}

async fn ceiling(
    producer: &BatchProducer,
    topic: &str,
    schema: &StreamSchema,
    readings: &[serde_json::Value],
    concurrency: usize,
) -> Run {
    let now = now_micros();
    let encoded: Vec<(String, i64, Vec<u8>)> = readings
        .iter()
        .map(|reading| {
            let mut value = Vec::new();
            let meta = schema.encode_json(reading, now, i64::MAX, &mut value).unwrap();
            (meta.key, meta.event_time_micros, value)
        })
        .collect();
    let payload_bytes = encoded.iter().map(|(_, _, value)| value.len()).sum();
    let encoded = Arc::new(encoded);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let producer = producer.clone();
            let encoded = Arc::clone(&encoded);
            let topic = topic.to_string();
            tokio::spawn(async move {
                for batch in encoded.chunks(BATCH_SIZE).skip(worker).step_by(concurrency) {
                    let records = batch.iter().map(|(key, ts, value)| BatchRecord {
                        key: key.as_bytes(),
                        value,
                        timestamp_millis: ts / 1_000,
                        headers_opt: None,
                    });
                    let delivery = producer.send_batch(&topic, records).unwrap();
                    let outcome = BatchProducer::wait(&delivery, Duration::from_secs(30)).await.unwrap();
                    assert_eq!(outcome.num_failed, 0);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Run { elapsed: started.elapsed(), num_records: readings.len(), payload_bytes }
}

async fn http_ingest(url: &str, readings: &[serde_json::Value], concurrency: usize) -> Run {
    let bodies: Vec<String> = readings
        .chunks(BATCH_SIZE)
        .map(|batch| batch.iter().map(|reading| format!("{reading}\n")).collect())
        .collect();
    let payload_bytes = bodies.iter().map(String::len).sum();
    let bodies = Arc::new(bodies);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let client = client.clone();
            let bodies = Arc::clone(&bodies);
            let url = url.to_string();
            tokio::spawn(async move {
                for body in bodies.iter().skip(worker).step_by(concurrency) {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(
                        response.status(),
                        reqwest::StatusCode::OK,
                        "{}",
                        response.text().await.unwrap()
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Run { elapsed: started.elapsed(), num_records: readings.len(), payload_bytes }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let num_records = bench_arg("--records", 500_000);
    let concurrency = bench_arg("--concurrency", 8);
    let rounds = bench_arg("--rounds", 3);
    let schema_path = repo_root().join("schemas/telemetry.avsc");
    let schema = StreamSchema::from_avro_json(
        "telemetry",
        &std::fs::read_to_string(&schema_path).unwrap(),
        Path::new(&schema_path),
    )
    .unwrap();
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.producer.delivery_timeout_ms = 30_000;
    config.shutdown.grace_period_ms = 40_000;
    let ingest = IngestService::start(config).await.unwrap();
    let readings = readings(num_records);
    let direct_topic = "bench-direct";
    let producer = direct_producer(&broker.bootstrap_servers(), direct_topic).await;
    // Warm the HTTP path too: connection pool, producer id, topic metadata.
    http_ingest(&ingest.records_url("telemetry"), &readings[..BATCH_SIZE], 1).await;
    println!(
        "ingest throughput: {num_records} telemetry records, NDJSON batches of {BATCH_SIZE}, {concurrency} concurrent clients, {rounds} rounds, Tansu memory broker on 127.0.0.1"
    );
    println!(
        "| round | ceiling (rdkafka direct) rec/s | ceiling MB/s (Avro) | HTTP ingest rec/s | HTTP MB/s (NDJSON) | ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        // Alternate the order so that neither side always runs on a warmer broker.
        let (direct, http) = if round % 2 == 1 {
            let direct = ceiling(&producer, direct_topic, &schema, &readings, concurrency).await;
            (direct, http_ingest(&ingest.records_url("telemetry"), &readings, concurrency).await)
        } else {
            let http = http_ingest(&ingest.records_url("telemetry"), &readings, concurrency).await;
            (ceiling(&producer, direct_topic, &schema, &readings, concurrency).await, http)
        };
        let ratio = http.records_per_sec() / direct.records_per_sec();
        ratios.push(ratio);
        println!(
            "| {round} | {:.0} | {:.1} | {:.0} | {:.1} | {ratio:.2} |",
            direct.records_per_sec(),
            direct.mb_per_sec(),
            http.records_per_sec(),
            http.mb_per_sec()
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!("median ratio HTTP ingest / ceiling: {:.2}", ratios[ratios.len() / 2]);
    simulator_rounds(&ingest, &producer, direct_topic, &schema, &readings, concurrency, rounds).await;
    ingest.stop().await.unwrap();
}

/// The same ingest loaded by the device simulator (`sluice simulate`, the release binary): a
/// fleet of 1,000 devices with realistic signals sending history as fast as ingest answers, from
/// `concurrency` connections. Its generator shares the two cores with ingest and the broker, so
/// this ratio is lower than the in-process client's; it is what a load test with the simulator
/// sees. Skipped when the binary is not built (`cargo build --release --bin sluice`).
async fn simulator_rounds(
    ingest: &IngestService,
    producer: &BatchProducer,
    direct_topic: &str,
    schema: &StreamSchema,
    readings: &[serde_json::Value],
    concurrency: usize,
    rounds: usize,
) {
    let Some(simulator) = std::env::current_exe()
        .ok()
        .and_then(|bench| Some(bench.parent()?.parent()?.join("sluice")))
        .filter(|path| path.exists())
    else {
        println!("sluice simulate: skipped (build it first: cargo build --release --bin sluice)");
        return;
    };
    // 1,000 devices, one reading a second each: history of N/1000 seconds is N readings.
    let history = format!("{}s", readings.len() / 1_000);
    println!("| round | ceiling (rdkafka direct) rec/s | sluice simulate -> ingest rec/s | ratio |");
    println!("| --- | --- | --- | --- |");
    for round in 1..=rounds {
        let direct = ceiling(producer, direct_topic, schema, readings, concurrency).await;
        let output = tokio::process::Command::new(&simulator)
            .args(["simulate", "--ingest-url", &ingest.base_url, "--devices", "1000", "--rate", "1"])
            .args(["--history", &history, "--batch", &BATCH_SIZE.to_string()])
            .args([
                "--concurrency",
                &concurrency.to_string(),
                "--seed",
                &round.to_string(),
                "--report",
                "json",
            ])
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["http"]["rejected"], 0);
        let simulated = report["readings_per_second"].as_f64().unwrap();
        println!(
            "| {round} | {:.0} | {simulated:.0} | {:.2} |",
            direct.records_per_sec(),
            simulated / direct.records_per_sec()
        );
    }
}
