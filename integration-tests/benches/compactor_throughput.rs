//! Compactor throughput against its ceiling, measured in the same run on the same broker.
//!
//! - ceiling: an rdkafka consumer in a consumer group reading the pre-filled topic (4 partitions)
//!   from the beginning without decoding anything;
//! - compactor: sluice-compactor in-process, from start until every record is in a committed
//!   Parquet file (includes joining the consumer group);
//! - decoders: Sluice's stream decoder (arrow-avro with the compactor's per-value checks, chunks of
//!   4,096 values as the compactor decodes them) against bare arrow-avro and apache-avro's generic
//!   reader on the same values, single thread.
//!
//! `cargo bench -p sluice-integration-tests --bench compactor_throughput -- [--records N]
//! [--row-group-rows N]`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use sluice_integration_tests::{
    Broker, CompactorService, bench_arg, compactor_config, produce_readings, repo_root, unique_suffix,
};
use sluice_lake::Lake;
use sluice_schema::{StreamDecoder, StreamSchema, single_object_header};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn readings(num_records: usize) -> Vec<serde_json::Value> {
    let start = sluice_integration_tests::now_micros() - 6 * 3_600_000_000;
    (0..num_records)
        .map(|index| {
            let device = index % 2_000;
            serde_json::json!({
                "device_id": format!("device-{device:05}"),
                "ts": start + index as i64 * 4_000,
                "seq": (index / 2_000) as i64,
                "site": format!("site-{}", device % 8),
                "temperature": 15.0 + (index % 200) as f64 / 10.0,
                "humidity": 40.0 + (index % 300) as f64 / 10.0,
                "battery": 1.0 - (index % 1000) as f64 / 2000.0,
                "rssi": -60 - (index % 30) as i64,
            })
        })
        .collect()
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find(|line| line.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|line| line.split_whitespace().nth(1).and_then(|value| value.parse().ok()))
        .unwrap_or(0)
}

/// Reads everything without decoding: the most a consumer of this broker can do here. It joins
/// a consumer group like the compactor does, so both pay the same group-join wait.
fn ceiling(bootstrap: &str, topic: &str, num_records: usize) -> (Duration, u64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("ceiling-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "3000")
        .set("heartbeat.interval.ms", "300")
        .create()
        .unwrap();
    let started = Instant::now();
    consumer.subscribe(&[topic]).unwrap();
    let (mut count, mut bytes) = (0usize, 0u64);
    while count < num_records {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.unwrap();
            bytes += message.payload().map_or(0, <[u8]>::len) as u64;
            count += 1;
        }
    }
    (started.elapsed(), bytes)
}

/// Decodes the same values three ways, one thread each: Sluice's stream decoder and bare
/// arrow-avro (both straight to Arrow), and apache-avro's generic reader (to `Value`, no Arrow).
fn decoders(schema: &Arc<StreamSchema>, values: &[Vec<u8>]) -> (Duration, Duration, Duration) {
    let mut decoder = StreamDecoder::new(Arc::clone(schema), [schema]).unwrap();
    let started = Instant::now();
    let mut num_rows = 0;
    for chunk in values.chunks(4_096) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        let decoded = decoder.decode(&refs);
        assert!(decoded.rejected.is_empty());
        num_rows += decoded.batch.num_rows();
    }
    assert_eq!(num_rows, values.len());
    let sluice = started.elapsed();

    let mut store = arrow_avro::schema::SchemaStore::new();
    let fingerprint = store.register(arrow_avro::schema::AvroSchema::new(schema.avro_json.clone())).unwrap();
    assert_eq!(fingerprint, arrow_avro::schema::Fingerprint::Rabin(schema.fingerprint));
    let mut decoder = arrow_avro::reader::ReaderBuilder::new()
        .with_writer_schema_store(store)
        .with_batch_size(100_000)
        .build_decoder()
        .unwrap();
    let started = Instant::now();
    let mut num_rows = 0;
    for value in values {
        decoder.decode(value).unwrap();
        if decoder.batch_is_full() {
            num_rows += decoder.flush().unwrap().map_or(0, |batch| batch.num_rows());
        }
    }
    num_rows += decoder.flush().unwrap().map_or(0, |batch| batch.num_rows());
    assert_eq!(num_rows, values.len());
    let arrow_avro = started.elapsed();

    let reader = apache_avro::GenericSingleObjectReader::builder()
        .schema(schema.avro.clone())
        .header(single_object_header(schema.fingerprint))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut num_fields = 0;
    for value in values {
        if let apache_avro::types::Value::Record(fields) = reader.read_value(&mut &value[..]).unwrap() {
            num_fields += fields.len();
        }
    }
    assert!(num_fields > 0);
    (sluice, arrow_avro, started.elapsed())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let num_records = bench_arg("--records", 5_000_000);
    let broker = Broker::start().await.unwrap();
    let prefix = format!("bench-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    // Steady state, not waiting: buffers flush on size, and the tail within a second.
    config.flush.target_file_bytes = 16 * 1024 * 1024;
    config.flush.max_age_ms = 1_000;
    config.flush.max_buffered_bytes = 256 * 1024 * 1024;
    // `--row-group-rows N`: the row group size's cost in encoding time and bytes.
    config.parquet.row_group_rows = bench_arg("--row-group-rows", config.parquet.row_group_rows);
    // Tansu makes a first group join wait about half the session timeout: keep it short here.
    config.kafka.client.0.insert("session.timeout.ms".into(), "3000".into());
    config.kafka.client.0.insert("heartbeat.interval.ms".into(), "300".into());

    // Create the topics the way the services do, then fill the stream topic.
    let topic_specs =
        [config.kafka.stream_topic_spec("telemetry"), config.kafka.dead_letter_topic_spec("telemetry")];
    sluice_kafka::ensure_topics(&config.kafka, &topic_specs, Duration::from_secs(10)).await.unwrap();
    let readings = readings(num_records);
    let started = Instant::now();
    for chunk in readings.chunks(200_000) {
        produce_readings(&broker.bootstrap_servers(), &topic, chunk).await.unwrap();
    }
    println!(
        "compactor throughput: {num_records} telemetry records (2,000 devices, 6 hours of event time), 4 partitions, Tansu memory broker; topic filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let schema_path = repo_root().join("schemas/telemetry.avsc");
    let schema = Arc::new(
        StreamSchema::from_avro_json(
            "telemetry",
            &std::fs::read_to_string(&schema_path).unwrap(),
            &schema_path,
        )
        .unwrap(),
    );
    let sample: Vec<Vec<u8>> = readings
        .iter()
        .take(1_000_000.min(num_records))
        .map(|reading| {
            let mut value = Vec::new();
            schema.encode_json(reading, i64::MAX / 2, 0, &mut value).unwrap();
            value
        })
        .collect();
    drop(readings);

    let bootstrap = broker.bootstrap_servers();
    let ceiling_topic = topic.clone();
    let (ceiling_time, ceiling_bytes) =
        tokio::task::spawn_blocking(move || ceiling(&bootstrap, &ceiling_topic, num_records)).await.unwrap();

    let baseline_kib = resident_kib();
    let peak_kib = Arc::new(AtomicU64::new(baseline_kib));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak_kib, sampling) = (Arc::clone(&peak_kib), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak_kib.fetch_max(resident_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let (store, root) = sluice_lake::open_store(&config.object_store).unwrap();
    let lake = Lake::new(store, root);
    let started = Instant::now();
    let compactor = CompactorService::start(config).await.unwrap();
    // Cheap progress check (a list and a read per partition) so that watching does not compete
    // with the compactor for the two cores: every offset below a commit's end is committed.
    while lake.committed_offsets("telemetry", 4).await.unwrap() < num_records as i64 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let compactor_time = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    compactor.stop().await.unwrap();
    let commits = lake.commits("telemetry").await.unwrap();
    let committed_rows: u64 = commits.iter().map(|commit| commit.num_rows()).sum();
    let bytes_written: u64 =
        commits.iter().flat_map(|commit| commit.files.iter().map(|file| file.size_bytes)).sum();
    assert_eq!(committed_rows, num_records as u64);

    let (sluice_decode, arrow_avro_decode, apache_decode) = decoders(&schema, &sample);

    let records_per_sec = |time: Duration| num_records as f64 / time.as_secs_f64();
    println!("| path | time s | records/s | MB/s (Avro in) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| ceiling: consume without decoding | {:.2} | {:.0} | {:.1} |",
        ceiling_time.as_secs_f64(),
        records_per_sec(ceiling_time),
        ceiling_bytes as f64 / 1e6 / ceiling_time.as_secs_f64()
    );
    println!(
        "| compactor: consume, decode, Parquet, commit | {:.2} | {:.0} | {:.1} |",
        compactor_time.as_secs_f64(),
        records_per_sec(compactor_time),
        ceiling_bytes as f64 / 1e6 / compactor_time.as_secs_f64()
    );
    println!("ratio compactor / ceiling: {:.2}", ceiling_time.as_secs_f64() / compactor_time.as_secs_f64());
    println!(
        "peak resident memory during compaction: {} MiB (process baseline before it {} MiB)",
        peak_kib.load(Ordering::Relaxed) / 1024,
        baseline_kib / 1024
    );
    println!(
        "Parquet bytes written per record: {:.1} (Avro in: {:.1})",
        bytes_written as f64 / num_records as f64,
        ceiling_bytes as f64 / num_records as f64
    );
    let per_sec = |time: Duration| sample.len() as f64 / time.as_secs_f64();
    println!(
        "decoding {} values, one thread: Sluice stream decoder (arrow-avro + checks) {:.0} values/s, bare arrow-avro {:.0} values/s, apache-avro to Value {:.0} values/s",
        sample.len(),
        per_sec(sluice_decode),
        per_sec(arrow_avro_decode),
        per_sec(apache_decode)
    );
}
