//! Compactor throughput against its ceiling, measured in the same run on the same broker, each
//! side timed from the moment records can first flow (docs/benchmarks.md, "Compactor").
//!
//! - ceiling: an rdkafka consumer with the compactor's own client settings that assigns itself
//!   every partition from the beginning (no group join) and reads every record, summing value
//!   lengths; timed from its first message to its last.
//! - compactor: sluice-compactor in-process, timed from the moment the group has assigned it its
//!   partitions (`is_ready`) to the Delta commits that hold the records: (a) all of them,
//!   counting the last flush's wait for its age trigger, and (b) the flushes before each
//!   partition's last (steady state).
//! - decoders: Sluice's stream decoder (arrow-avro with the compactor's per-value checks, chunks of
//!   4,096 values as the compactor decodes them) against bare arrow-avro and apache-avro's generic
//!   reader on the same values, single thread.
//!
//! `cargo bench -p sluice-integration-tests --bench compactor_throughput -- [--flush default|small]
//! [--records N] [--rounds N] [--row-group-rows N] [--cpus LIST]`
//!
//! Every round prints one `RESULT side=ceiling ...` and one `RESULT side=compactor ...` line of
//! `key=value` fields, and the run ends with one `SUMMARY ...` line of medians, for scripts that
//! compare runs (for example the same binary under `taskset` with one and with two cores).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use object_store::ObjectStore as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_compactor::CompactorConfig;
use sluice_compactor::config::FlushConfig;
use sluice_integration_tests::{
    Broker, CompactorService, bench_arg, bench_text_arg, compactor_config, now_micros, repo_root,
    unique_suffix,
};
use sluice_kafka::{BatchDelivery, BatchProducer, BatchRecord, KafkaConfig};
use sluice_lake::{CommitRecord, Lake};
use sluice_schema::{StreamDecoder, StreamSchema, single_object_header};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STREAM: &str = "telemetry";
const NUM_DEVICES: usize = 2_000;
/// Event time between consecutive records: each device reports every 8 s.
const RECORD_SPACING_MICROS: i64 = 4_000;
/// Records encoded and handed to the producer at a time while the topic is filled, and how many
/// such batches may wait for their acknowledgement: the bench holds a few MB of records, never
/// the whole topic (20 M readings as JSON values would take tens of GB).
const FILL_BATCH_RECORDS: usize = 10_000;
/// 4 x 10,000 records in flight stays below librdkafka's default queue of 100,000 messages.
const FILL_BATCHES_IN_FLIGHT: usize = 4;
/// Values kept from the fill for the decoder comparison.
const DECODER_SAMPLE_VALUES: usize = 1_000_000;
/// The group assignment is polled this often; the compactor's clock starts within it.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// The lake is polled this often only to know when to stop; the times come from the Delta log.
const COMMITTED_POLL_INTERVAL: Duration = Duration::from_millis(500);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(3_600);

/// The flush settings a run uses (`--flush`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushPreset {
    /// What the compactor ships with (`FlushConfig::default()`).
    Shipped,
    /// Small files and a short age, so that commits are frequent and the tail short.
    Small,
}

impl FlushPreset {
    fn from_args() -> Self {
        match bench_text_arg("--flush").as_deref() {
            None | Some("default") => Self::Shipped,
            Some("small") => Self::Small,
            Some(other) => panic!("--flush {other}: use `default` (the shipped settings) or `small`"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Shipped => "default",
            Self::Small => "small",
        }
    }

    fn flush_config(self) -> FlushConfig {
        match self {
            Self::Shipped => FlushConfig::default(),
            Self::Small => FlushConfig {
                target_file_bytes: 16 * 1024 * 1024,
                max_age_ms: 1_000,
                max_buffered_bytes: 256 * 1024 * 1024,
                ..FlushConfig::default()
            },
        }
    }
}

/// One telemetry reading: `NUM_DEVICES` devices in turn, event times ending at `now` for the last.
fn reading(index: usize, first_event_micros: i64) -> serde_json::Value {
    let device = index % NUM_DEVICES;
    serde_json::json!({
        "device_id": format!("device-{device:05}"),
        "ts": first_event_micros + index as i64 * RECORD_SPACING_MICROS,
        "seq": (index / NUM_DEVICES) as i64,
        "site": format!("site-{}", device % 8),
        "temperature": 15.0 + (index % 200) as f64 / 10.0,
        "humidity": 40.0 + (index % 300) as f64 / 10.0,
        "battery": 1.0 - (index % 1000) as f64 / 2000.0,
        "rssi": -60 - (index % 30) as i64,
    })
}

/// `VmRSS` of a process (`self` or a pid) in KiB, 0 when unreadable.
fn resident_kib(process: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()
        .and_then(|status| status.lines().find(|line| line.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|line| line.split_whitespace().nth(1).and_then(|value| value.parse().ok()))
        .unwrap_or(0)
}

fn broker_resident_mib(broker: &Broker) -> u64 {
    broker.pid().map_or(0, |pid| resident_kib(&pid.to_string()) / 1024)
}

/// Cores this thread may run on (the affinity mask, so `taskset` shows here).
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(0, NonZeroUsize::get)
}

/// Pins every thread of this process to `cpu_list` (taskset's syntax: `0`, `0,1`, `0-1`); threads
/// started later inherit it from the thread that starts them. The broker, a child process started
/// before, keeps every core.
fn pin_this_process(cpu_list: &str) {
    let pid = std::process::id().to_string();
    let output = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpu_list, pid.as_str()])
        .output()
        .expect("taskset (util-linux) is installed");
    assert!(
        output.status.success(),
        "taskset -a -p -c {cpu_list} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What filling the topic left: the Avro bytes produced, and the first values for the decoders.
struct FilledTopic {
    num_value_bytes: u64,
    sample: Vec<Vec<u8>>,
}

/// Encodes and produces `num_records` readings batch by batch, a few batches in flight, with the
/// producer settings ingest starts from (acks=all, idempotence).
async fn fill_topic(bootstrap: &str, topic: &str, schema: &StreamSchema, num_records: usize) -> FilledTopic {
    let producer_config =
        KafkaConfig { bootstrap_servers: bootstrap.to_string(), ..KafkaConfig::default() }.producer_config();
    let producer = BatchProducer::new(&producer_config).unwrap();
    let first_event_micros = now_micros() - num_records as i64 * RECORD_SPACING_MICROS;
    let mut in_flight: VecDeque<Arc<BatchDelivery>> = VecDeque::new();
    let mut num_value_bytes = 0u64;
    let mut sample = Vec::with_capacity(DECODER_SAMPLE_VALUES.min(num_records));
    for batch_start in (0..num_records).step_by(FILL_BATCH_RECORDS) {
        let batch_end = (batch_start + FILL_BATCH_RECORDS).min(num_records);
        let encoded: Vec<(String, i64, Vec<u8>)> = (batch_start..batch_end)
            .map(|index| {
                let mut value = Vec::new();
                let meta = schema
                    .encode_json(&reading(index, first_event_micros), i64::MAX / 2, i64::MAX / 4, &mut value)
                    .unwrap();
                (meta.key, meta.event_time_micros, value)
            })
            .collect();
        num_value_bytes += encoded.iter().map(|(_, _, value)| value.len() as u64).sum::<u64>();
        let records = encoded.iter().map(|(key, event_time_micros, value)| BatchRecord {
            key: key.as_bytes(),
            value: value.as_slice(),
            timestamp_millis: event_time_micros / 1_000,
            headers_opt: None,
        });
        // librdkafka copies each record when it is enqueued: `encoded` can go once this returns.
        in_flight.push_back(producer.send_batch(topic, records).unwrap());
        let num_sampled = DECODER_SAMPLE_VALUES.saturating_sub(sample.len()).min(encoded.len());
        sample.extend(encoded.into_iter().take(num_sampled).map(|(_, _, value)| value));
        while in_flight.len() > FILL_BATCHES_IN_FLIGHT {
            let oldest = in_flight.pop_front().unwrap();
            wait_acknowledged(&oldest).await;
        }
    }
    while let Some(batch) = in_flight.pop_front() {
        wait_acknowledged(&batch).await;
    }
    FilledTopic { num_value_bytes, sample }
}

async fn wait_acknowledged(batch: &BatchDelivery) {
    let outcome =
        BatchProducer::wait(batch, Duration::from_secs(60)).await.expect("acknowledged within 60 s");
    assert_eq!(outcome.num_failed, 0, "records failed: {:?}", outcome.first_error_opt);
}

/// The ceiling's timing: from its first message to its last.
struct CeilingRun {
    elapsed: Duration,
    /// From `assign` to the first message: the ListOffsets and first fetch that its clock leaves
    /// out, and about what the compactor's clock includes between its assignment and first record.
    assign_to_first: Duration,
    num_value_bytes: u64,
    num_consumer_errors: usize,
}

/// Reads every record of `topic` with `client_config` (the compactor's settings), every
/// partition assigned from the beginning: what one consumer of this broker can do with no group
/// join and no work per record beyond summing value lengths.
fn ceiling(client_config: &ClientConfig, topic: &str, num_partitions: i32, num_records: usize) -> CeilingRun {
    let consumer: BaseConsumer = client_config.create().unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..num_partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    let assigned_at = Instant::now();
    consumer.assign(&assignment).unwrap();
    let mut first_message_at_opt: Option<Instant> = None;
    let (mut num_read, mut num_value_bytes, mut num_consumer_errors) = (0usize, 0u64, 0usize);
    while num_read < num_records {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                if first_message_at_opt.is_none() {
                    first_message_at_opt = Some(Instant::now());
                }
                num_value_bytes += message.payload().map_or(0, <[u8]>::len) as u64;
                num_read += 1;
            }
            Some(Err(error)) => {
                num_consumer_errors += 1;
                eprintln!("ceiling consumer error: {error}");
            }
            None => {}
        }
    }
    let last_message_at = Instant::now();
    let first_message_at = first_message_at_opt.unwrap_or(last_message_at);
    CeilingRun {
        elapsed: last_message_at - first_message_at,
        assign_to_first: first_message_at - assigned_at,
        num_value_bytes,
        num_consumer_errors,
    }
}

/// The compactor's timing, from its assignment to the commits in the Delta log.
struct CompactorRun {
    /// Until the commit that holds the last record: the last flush's wait included.
    elapsed_all: Duration,
    /// Rows of the flushes before each partition's last one, and until the last of them landed;
    /// `None` when no partition flushed more than once.
    steady_opt: Option<(u64, Duration)>,
    num_flushes: usize,
    parquet_bytes: u64,
    peak_rss_growth_mib: u64,
    revoked_uncommitted_records: u64,
}

/// When each version of `table`'s Delta log was written (its file's modification time), in
/// microseconds since the epoch: when the commit landed, without polling for it.
async fn log_entries_landed_micros(lake: &Lake, table: &str) -> BTreeMap<i64, i64> {
    let log_dir = lake.absolute(&sluice_lake::layout::delta_log_dir(table));
    let objects: Vec<object_store::ObjectMeta> =
        lake.store().list(Some(&log_dir)).try_collect().await.unwrap();
    objects
        .into_iter()
        .filter_map(|object| {
            let version = object.location.filename()?.strip_suffix(".json")?.parse::<i64>().ok()?;
            Some((version, object.last_modified.timestamp_micros()))
        })
        .collect()
}

async fn run_compactor(config: CompactorConfig, num_records: usize) -> CompactorRun {
    let num_partitions = config.kafka.topics.partitions;
    let lake = sluice_lake::open_lake(&config.object_store).unwrap();
    let baseline_kib = resident_kib("self");
    let peak_kib = Arc::new(AtomicU64::new(baseline_kib));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak_kib, sampling) = (Arc::clone(&peak_kib), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak_kib.fetch_max(resident_kib("self"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let compactor = CompactorService::start(config).await.unwrap();
    // Ready means the group assigned the partitions and the loop took them at their (empty)
    // positions: records can flow from here, as they can for the ceiling once it assigned
    // itself. The compactor reports no first message, so its clock starts here; the ceiling's
    // starts at its first message, which leaves out the ListOffsets and first fetch that the
    // compactor's clock includes (the ceiling's `assign_to_first_ms` shows how long they take).
    let ready_deadline = Instant::now() + READY_TIMEOUT;
    while !compactor.is_ready() {
        assert!(Instant::now() < ready_deadline, "the compactor got no assignment within {READY_TIMEOUT:?}");
        tokio::time::sleep(READY_POLL_INTERVAL).await;
    }
    let started_micros = now_micros();
    let committed_deadline = Instant::now() + COMMITTED_TIMEOUT;
    loop {
        let committed = lake.committed_offsets(STREAM, num_partitions).await.unwrap();
        if committed >= num_records as i64 {
            break;
        }
        assert!(
            Instant::now() < committed_deadline,
            "the compactor committed {committed} of {num_records} records within {COMMITTED_TIMEOUT:?}"
        );
        tokio::time::sleep(COMMITTED_POLL_INTERVAL).await;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let revoked_uncommitted_records = compactor.revoked_uncommitted_records();
    compactor.stop().await.unwrap();

    let commits = lake.commits(STREAM).await.unwrap();
    let landed_micros = log_entries_landed_micros(&lake, STREAM).await;
    let committed_rows: u64 = commits.iter().map(CommitRecord::num_rows).sum();
    assert_eq!(committed_rows, num_records as u64, "the flushes in the log hold every record once");
    let since_start = |record: &CommitRecord| {
        let version = record.table_version_opt.expect("read from the log");
        let landed = landed_micros.get(&version).copied().expect("every flush's log entry is listed");
        Duration::from_micros(u64::try_from(landed - started_micros).unwrap_or(0))
    };
    // A partition's last flush reaches the end of its records; nothing fills it further, so it
    // waits for the age trigger. Every earlier one ended while records were still arriving.
    let mut end_by_partition: HashMap<i32, i64> = HashMap::new();
    for record in &commits {
        let end = end_by_partition.entry(record.kafka_partition).or_insert(record.end_offset);
        *end = (*end).max(record.end_offset);
    }
    let steady: Vec<&CommitRecord> = commits
        .iter()
        .filter(|record| record.end_offset < end_by_partition[&record.kafka_partition])
        .collect();
    let steady_opt = steady.iter().map(|&record| since_start(record)).max().map(|elapsed| {
        let rows: u64 = steady.iter().map(|record| record.num_rows()).sum();
        (rows, elapsed)
    });
    CompactorRun {
        elapsed_all: commits.iter().map(since_start).max().unwrap_or_default(),
        steady_opt,
        num_flushes: commits.len(),
        parquet_bytes: commits
            .iter()
            .flat_map(|commit| commit.files.iter().map(|file| file.size_bytes))
            .sum(),
        peak_rss_growth_mib: peak_kib.load(Ordering::Relaxed).saturating_sub(baseline_kib) / 1024,
        revoked_uncommitted_records,
    }
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

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 { values[middle] } else { (values[middle - 1] + values[middle]) / 2.0 }
}

/// One round's figures, for the table and the summary.
struct RoundFigures {
    ceiling_rows_per_s: f64,
    steady_rows_per_s_opt: Option<f64>,
    all_rows_per_s: f64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let num_records = bench_arg("--records", 20_000_000);
    let num_rounds = bench_arg("--rounds", 3).max(1);
    let preset = FlushPreset::from_args();
    let row_group_rows =
        bench_arg("--row-group-rows", sluice_compactor::config::ParquetConfig::default().row_group_rows);
    let cpus_opt = bench_text_arg("--cpus");

    let broker = Broker::start().await.unwrap();
    let prefix = format!("bench-{}", unique_suffix());
    let kafka = KafkaConfig {
        bootstrap_servers: broker.bootstrap_servers(),
        topic_prefix: prefix.clone(),
        ..KafkaConfig::default()
    };
    let topic = kafka.topic_names().stream(STREAM);
    let num_partitions = kafka.topics.partitions;
    // Created the way the services create them, then filled once for every round.
    let topic_specs = [kafka.stream_topic_spec(STREAM), kafka.dead_letter_topic_spec(STREAM)];
    sluice_kafka::ensure_topics(&kafka, &topic_specs, Duration::from_secs(10)).await.unwrap();
    let schema_path = repo_root().join("schemas/telemetry.avsc");
    let schema = Arc::new(
        StreamSchema::from_avro_json(STREAM, &std::fs::read_to_string(&schema_path).unwrap(), &schema_path)
            .unwrap(),
    );
    let fill_started = Instant::now();
    let filled = fill_topic(&broker.bootstrap_servers(), &topic, &schema, num_records).await;
    let flush = preset.flush_config();
    println!(
        "compactor throughput: {num_records} telemetry records ({NUM_DEVICES} devices, {:.1} hours of event time, {:.1} bytes of Avro each), {num_partitions} partitions, Tansu memory broker; topic filled in {:.1} s; broker resident memory {} MiB",
        num_records as f64 * RECORD_SPACING_MICROS as f64 / 3.6e9,
        filled.num_value_bytes as f64 / num_records as f64,
        fill_started.elapsed().as_secs_f64(),
        broker_resident_mib(&broker)
    );
    println!(
        "flush preset {}: target_file_bytes {}, max_age_ms {}, max_buffered_bytes {}; row_group_rows {row_group_rows}; merges off",
        preset.name(),
        flush.target_file_bytes,
        flush.max_age_ms,
        flush.max_buffered_bytes
    );
    if let Some(cpu_list) = &cpus_opt {
        pin_this_process(cpu_list);
        println!("this process pinned to cpus {cpu_list} (the broker is not)");
    }

    let mut figures: Vec<RoundFigures> = Vec::with_capacity(num_rounds);
    let mut table_rows: Vec<String> = Vec::with_capacity(num_rounds);
    for round in 1..=num_rounds {
        let lake_dir = tempfile::TempDir::new().unwrap();
        // A fresh consumer group and lake per round (compactor_config draws a new group id).
        let mut config = compactor_config(&broker, &prefix, lake_dir.path());
        config.flush = flush.clone();
        config.parquet.row_group_rows = row_group_rows;
        // The merger first runs 5 minutes after start: it would fall into some rounds and not
        // others. Its cost is not the path from Kafka to committed files measured here.
        config.merge.enabled = false;
        let mut ceiling_config = config.clone();
        ceiling_config.compactor.group_id = format!("ceiling-{}", unique_suffix());
        let ceiling_client_config = ceiling_config.consumer_client_config();
        if round == 1 {
            let settings: Vec<String> = ceiling_client_config
                .config_map()
                .into_iter()
                .filter(|(key, _)| !matches!(*key, "bootstrap.servers" | "group.id"))
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            println!("consumer settings of both sides: {}", settings.join(" "));
        }
        let run_ceiling = || {
            let topic = topic.clone();
            let client_config = ceiling_client_config.clone();
            tokio::task::spawn_blocking(move || ceiling(&client_config, &topic, num_partitions, num_records))
        };
        // Alternated so that neither side always runs on a broker (and page cache) the other warmed.
        let ceiling_first = round % 2 == 1;
        let (ceiling_run, compactor_run) = if ceiling_first {
            let ceiling_run = run_ceiling().await.unwrap();
            (ceiling_run, run_compactor(config, num_records).await)
        } else {
            let compactor_run = run_compactor(config, num_records).await;
            (run_ceiling().await.unwrap(), compactor_run)
        };
        drop(lake_dir);
        assert_eq!(ceiling_run.num_value_bytes, filled.num_value_bytes, "the ceiling read every value");

        let cores = available_cores();
        let mb_per_s = |elapsed: Duration| filled.num_value_bytes as f64 / 1e6 / elapsed.as_secs_f64();
        let ceiling_rows_per_s = num_records as f64 / ceiling_run.elapsed.as_secs_f64();
        let all_rows_per_s = num_records as f64 / compactor_run.elapsed_all.as_secs_f64();
        let steady_rows_per_s_opt =
            compactor_run.steady_opt.map(|(rows, elapsed)| rows as f64 / elapsed.as_secs_f64());
        let (steady_rows, steady_seconds) =
            compactor_run.steady_opt.map_or((0, f64::NAN), |(rows, elapsed)| (rows, elapsed.as_secs_f64()));
        let steady_rows_per_s = steady_rows_per_s_opt.unwrap_or(f64::NAN);
        println!(
            "RESULT side=ceiling round={round} flush={} cores={cores} records={num_records} seconds={:.3} rows_per_s={:.0} mb_per_s={:.1} assign_to_first_ms={:.1} consumer_errors={}",
            preset.name(),
            ceiling_run.elapsed.as_secs_f64(),
            ceiling_rows_per_s,
            mb_per_s(ceiling_run.elapsed),
            ceiling_run.assign_to_first.as_secs_f64() * 1e3,
            ceiling_run.num_consumer_errors
        );
        println!(
            "RESULT side=compactor round={round} flush={} cores={cores} records={num_records} seconds_all={:.3} rows_per_s_all={:.0} ratio_all={:.3} steady_rows={steady_rows} seconds_steady={steady_seconds:.3} rows_per_s_steady={steady_rows_per_s:.0} ratio_steady={:.3} flushes={} peak_rss_growth_mib={} parquet_bytes_per_row={:.2} revoked_uncommitted={} ran_first={}",
            preset.name(),
            compactor_run.elapsed_all.as_secs_f64(),
            all_rows_per_s,
            all_rows_per_s / ceiling_rows_per_s,
            steady_rows_per_s / ceiling_rows_per_s,
            compactor_run.num_flushes,
            compactor_run.peak_rss_growth_mib,
            compactor_run.parquet_bytes as f64 / num_records as f64,
            compactor_run.revoked_uncommitted_records,
            if ceiling_first { "ceiling" } else { "compactor" }
        );
        if compactor_run.revoked_uncommitted_records > 0 {
            println!(
                "warning: round {round} rebalanced during the run and read {} records twice; its compactor figures are low",
                compactor_run.revoked_uncommitted_records
            );
        }
        table_rows.push(format!(
            "| {round} | {} | {:.0} | {:.0} | {:.2} | {:.0} ({:.1} s) | {:.2} | {} MiB | {:.1} |",
            if ceiling_first { "ceiling" } else { "compactor" },
            ceiling_rows_per_s,
            steady_rows_per_s,
            steady_rows_per_s / ceiling_rows_per_s,
            all_rows_per_s,
            compactor_run.elapsed_all.as_secs_f64(),
            all_rows_per_s / ceiling_rows_per_s,
            compactor_run.peak_rss_growth_mib,
            compactor_run.parquet_bytes as f64 / num_records as f64
        ));
        figures.push(RoundFigures { ceiling_rows_per_s, steady_rows_per_s_opt, all_rows_per_s });
    }

    println!();
    println!(
        "| round | first | ceiling rec/s | compactor steady rec/s | ratio steady | compactor all committed rec/s (time) | ratio all | peak RSS growth | Parquet bytes/record |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &table_rows {
        println!("{row}");
    }
    let ratios_steady: Vec<f64> = figures
        .iter()
        .filter_map(|round| round.steady_rows_per_s_opt.map(|steady| steady / round.ceiling_rows_per_s))
        .collect();
    println!(
        "SUMMARY flush={} cores={} records={num_records} rounds={num_rounds} ceiling_rows_per_s_median={:.0} rows_per_s_steady_median={:.0} rows_per_s_all_median={:.0} ratio_steady_median={:.3} ratio_all_median={:.3} broker_rss_mib={}",
        preset.name(),
        available_cores(),
        median(figures.iter().map(|round| round.ceiling_rows_per_s).collect()),
        median(figures.iter().filter_map(|round| round.steady_rows_per_s_opt).collect()),
        median(figures.iter().map(|round| round.all_rows_per_s).collect()),
        median(ratios_steady),
        median(figures.iter().map(|round| round.all_rows_per_s / round.ceiling_rows_per_s).collect()),
        broker_resident_mib(&broker)
    );

    let sample = filled.sample;
    let (sluice_decode, arrow_avro_decode, apache_decode) = decoders(&schema, &sample);
    let per_sec = |time: Duration| sample.len() as f64 / time.as_secs_f64();
    println!(
        "decoding {} values, one thread: Sluice stream decoder (arrow-avro + checks) {:.0} values/s, bare arrow-avro {:.0} values/s, apache-avro to Value {:.0} values/s",
        sample.len(),
        per_sec(sluice_decode),
        per_sec(arrow_avro_decode),
        per_sec(apache_decode)
    );
}
