//! HTTP ingest against its ceiling, measured in the same run on the same broker, with the CPU time
//! each side's code under test took (issue #17; docs/benchmarks.md explains the method).
//!
//! - ceiling: the Avro records ingest writes (same keys, timestamps and headers) produced with
//!   ingest's own producer settings (`sluice_ingest::producer_client_config`), in batches of
//!   1,000 from `concurrency` tasks, each batch awaited like a request. It runs in a process of
//!   its own, this benchmark started again with `--ceiling-worker`, which builds and encodes its
//!   records before it reports ready: its CPU time in a round is producing and nothing else.
//! - HTTP ingest: the `sluice-ingest` binary configured as the Helm chart deploys it with tokens
//!   and a collector (bearer tokens checked, traces and metrics exported over OTLP/gRPC, JSON
//!   logs), loaded with NDJSON batches of 1,000 by `concurrency` client tasks in this process;
//!   each 200 comes after Kafka acknowledged the batch.
//! - simulator: `sluice simulate` (when built) loading the same ingest, against a ceiling round.
//!
//! Both topics come from `KafkaConfig::stream_topic_spec` through `ensure_topics`, the path
//! ingest creates its own with. A side's CPU time is its process's, read from /proc before and
//! after each round: all of its threads (librdkafka's too), none of the clients', the OTLP
//! receiver's or the broker's, which share the two cores.
//!
//! ```sh
//! cargo build --profile bench --workspace --bin sluice-ingest --bin sluice
//! cargo bench -p sluice-integration-tests --bench ingest_throughput -- \
//!     [--records N] [--rounds R] [--concurrency C] [--partitions P]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_opentelemetry_collector::FakeCollectorServer;
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::json;
use sha2::{Digest, Sha256};
use sluice_ingest::{INGEST_TIME_HEADER, IngestConfig, SCHEMA_FINGERPRINT_HEADER};
use sluice_integration_tests::{
    Broker, IngestToml, Readiness, ServiceBinary, bench_arg, bench_text_arg, ingest_toml, now_micros,
    release_binary, repo_root, unique_suffix,
};
use sluice_kafka::{BatchProducer, BatchRecord, KafkaConfig, ensure_topics};
use sluice_schema::StreamSchema;

// The allocator the sluice-ingest binary uses, so that the ceiling process allocates as ingest does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH_SIZE: usize = 1_000;
const STREAM: &str = "telemetry";
/// Makes this binary the ceiling's process instead of the benchmark.
const CEILING_WORKER_ARG: &str = "--ceiling-worker";
/// What ingest allows itself for creating its topics.
const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

fn main() {
    if std::env::args().any(|arg| arg == CEILING_WORKER_ARG) {
        ceiling_worker();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let num_records = bench_arg("--records", 500_000);
    let concurrency = bench_arg("--concurrency", 8);
    let rounds = bench_arg("--rounds", 3);
    // Without the argument the service's own default applies, as for a deployment that sets none.
    let partitions_opt =
        std::env::args().any(|arg| arg == "--partitions").then(|| bench_arg("--partitions", 0));
    let Some(ingest_binary) = release_binary("sluice-ingest") else {
        panic!(
            "target/release/sluice-ingest is missing: build it first, \
             cargo build --profile bench --workspace --bin sluice-ingest"
        );
    };

    let broker = Broker::start().await.unwrap();
    let broker_pid = broker.pid().unwrap();
    let telemetry = TelemetryReceiver::start().await;
    let token = format!("bench-{}{}", unique_suffix(), unique_suffix());
    let token_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    let config_dir = tempfile::TempDir::new().unwrap();
    let config_path = config_dir.path().join("ingest.toml");
    let topic_prefix = format!("bench-{}", unique_suffix());
    // ingest.toml as the chart renders it for a deployment with tokens and a collector
    // (helm/sluice/templates/secret.yaml with helm/sluice/ci/s3-ingress-hpa-values.yaml).
    let ingest = ServiceBinary::start_with_config(
        "sluice-ingest",
        Readiness::HttpOk("/readyz"),
        &ingest_binary,
        &config_path,
        |port| {
            ingest_toml(&IngestToml {
                port,
                token_sha256: &token_sha256,
                stream: STREAM,
                bootstrap_servers: &broker.bootstrap_servers(),
                topic_prefix: &topic_prefix,
                otlp_endpoint: &telemetry.endpoint,
                partitions_opt,
            })
        },
    )
    .await
    .unwrap();
    let ingest_pid = ingest.pid().unwrap();
    // The configuration ingest runs with, loaded as it loads it.
    let config: IngestConfig = sluice_config::load(Some(config_path.as_path())).unwrap();

    // Ingest created its topic at start; the ceiling's comes from the same spec under another
    // prefix, so that each side writes a topic that grows with its own records only.
    let ingest_spec = config.kafka.stream_topic_spec(STREAM);
    let ceiling_kafka = KafkaConfig {
        topic_prefix: format!("{}-ceiling", config.kafka.topic_prefix),
        ..config.kafka.clone()
    };
    let ceiling_spec = ceiling_kafka.stream_topic_spec(STREAM);
    ensure_topics(&ceiling_kafka, std::slice::from_ref(&ceiling_spec), TOPIC_SETUP_TIMEOUT).await.unwrap();
    let topic_statuses =
        ensure_topics(&config.kafka, &[ingest_spec.clone(), ceiling_spec.clone()], TOPIC_SETUP_TIMEOUT)
            .await
            .unwrap();

    // Both sides send the same readings: the same start, the same index.
    let start_micros = now_micros() - 3_600_000_000;
    let mut ceiling = tokio::task::block_in_place(|| {
        CeilingProcess::start(&config_path, &ceiling_spec.name, num_records, start_micros, concurrency)
    });
    let clients = HttpClients {
        client: reqwest::Client::new(),
        url: format!("{}/v1/streams/{STREAM}/records", ingest.base_url()),
        token: token.clone(),
        bodies: Arc::new(ndjson_bodies(num_records, start_micros)),
        concurrency,
    };
    let ndjson_bytes: usize = clients.bodies.iter().map(Bytes::len).sum();
    // Warm-up like the ceiling process's: one batch per client (connections, producer id, metadata).
    clients.send(concurrency.min(clients.bodies.len())).await;

    println!(
        "ingest throughput: {num_records} telemetry records ({:.0} bytes of NDJSON, {:.0} of Avro each), \
         batches of {BATCH_SIZE}, {concurrency} concurrent clients and producer tasks, {rounds} rounds, \
         Tansu memory broker on 127.0.0.1",
        ndjson_bytes as f64 / num_records as f64,
        ceiling.avro_bytes as f64 / num_records as f64,
    );
    println!(
        "ingest: {} as its own process (pid {ingest_pid}); bearer tokens on; OTLP/gRPC traces and \
         metrics to {}; JSON logs at info",
        ingest_binary.display(),
        telemetry.endpoint
    );
    println!(
        "ceiling: its own process (pid {}), ingest's producer settings; topics from the same spec \
         ({} partitions, {:?}): {topic_statuses:?}",
        ceiling.pid(),
        ingest_spec.partitions,
        ingest_spec.configs
    );
    println!(
        "CPU per side: utime + stime of its process from /proc/<pid>/stat ({} ticks/s), before and \
         after each round",
        clock_ticks_per_second()
    );

    let mut rows = Vec::new();
    let mut rate_ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    for round in 1..=rounds {
        // Alternate the order so that neither side always runs on a warmer broker.
        let (direct, http) = if round % 2 == 1 {
            let direct = tokio::task::block_in_place(|| ceiling_round(&mut ceiling, broker_pid, num_records));
            (direct, http_round(&clients, ingest_pid, broker_pid, num_records).await)
        } else {
            let http = http_round(&clients, ingest_pid, broker_pid, num_records).await;
            (tokio::task::block_in_place(|| ceiling_round(&mut ceiling, broker_pid, num_records)), http)
        };
        direct.print_result("ceiling", round);
        http.print_result("http_ingest", round);
        let ratio = http.records_per_sec() / direct.records_per_sec();
        let cpu_ratio = http.cpu_s_per_million() / direct.cpu_s_per_million();
        rate_ratios.push(ratio);
        cpu_ratios.push(cpu_ratio);
        rows.push(format!(
            "| {round} | {:.0} | {:.2} | {:.0} | {:.2} | {ratio:.2} | {cpu_ratio:.2} |",
            direct.records_per_sec(),
            direct.cpu_s_per_million(),
            http.records_per_sec(),
            http.cpu_s_per_million(),
        ));
    }
    println!(
        "| round | ceiling rec/s | ceiling CPU-s per M records | HTTP ingest rec/s | ingest CPU-s per M records | ratio | CPU ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!("{row}");
    }
    let median_ratio = median(&mut rate_ratios);
    let median_cpu_ratio = median(&mut cpu_ratios);
    println!("SUMMARY rounds={rounds} median_ratio={median_ratio:.3} median_cpu_ratio={median_cpu_ratio:.3}");
    println!("median ratio HTTP ingest / ceiling rec/s: {median_ratio:.2} (goal: at least 0.8)");
    println!(
        "median CPU ratio, ingest / producer CPU-s per record: {median_cpu_ratio:.2} (goal: at most 1.5)"
    );

    simulator_rounds(&ingest, &token, &mut ceiling, broker_pid, num_records, concurrency, rounds).await;
    telemetry.report(&ingest);
}

/// A `--name value` argument that must be given.
fn required_arg(name: &str) -> String {
    bench_text_arg(name).unwrap_or_else(|| panic!("{name} is required"))
}

/// Reading `index` of a fleet's history: 1,000 devices, 4 sites, a few measurements each, a
/// millisecond apart from `start_micros`.
fn reading(index: usize, start_micros: i64) -> serde_json::Value {
    let device = index % 1_000;
    json!({
        "device_id": format!("device-{device:05}"),
        "ts": start_micros + index as i64 * 1_000,
        "seq": (index / 1_000) as i64,
        "site": format!("site-{}", device % 4),
        "temperature": 15.0 + (index % 200) as f64 / 10.0,
        "humidity": 40.0 + (index % 300) as f64 / 10.0,
        "battery": 1.0 - (index % 1000) as f64 / 2000.0,
        "rssi": -60 - (index % 30) as i64,
    })
}

/// The readings as NDJSON request bodies of `BATCH_SIZE` readings each.
fn ndjson_bodies(num_records: usize, start_micros: i64) -> Vec<Bytes> {
    (0..num_records)
        .step_by(BATCH_SIZE)
        .map(|first| {
            let mut body = String::new();
            for index in first..(first + BATCH_SIZE).min(num_records) {
                body.push_str(&reading(index, start_micros).to_string());
                body.push('\n');
            }
            Bytes::from(body)
        })
        .collect()
}

fn telemetry_schema() -> StreamSchema {
    let schema_path = repo_root().join("schemas/telemetry.avsc");
    StreamSchema::from_avro_json(STREAM, &std::fs::read_to_string(&schema_path).unwrap(), &schema_path)
        .unwrap()
}

/// CPU time process `pid` has used, user and system, all of its threads together, those that
/// ended included: what getrusage(RUSAGE_SELF) would tell the process itself, read from outside
/// (utime and stime, fields 14 and 15 of /proc/<pid>/stat; proc(5)). Resolution: one clock tick.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Field 2, the command name, is in parentheses and may hold spaces: count from after it.
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (the state), so field n is fields[n - 3].
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks_per_second()
}

/// The unit of /proc/<pid>/stat times (`sysconf(_SC_CLK_TCK)`, asked of getconf: no libc here).
fn clock_ticks_per_second() -> f64 {
    static TICKS_PER_SECOND: OnceLock<f64> = OnceLock::new();
    *TICKS_PER_SECOND.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok()?.trim().parse::<f64>().ok())
            // USER_HZ is 100 on every architecture Linux runs Sluice on.
            .unwrap_or(100.0)
    })
}

/// CPU time used so far by the processes of a round, and when it was read.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    under_test_s: f64,
    bench_s: f64,
    broker_s: f64,
    at: Instant,
}

impl CpuMark {
    fn take(under_test_pid: u32, broker_pid: u32) -> Self {
        Self {
            under_test_s: process_cpu_seconds(under_test_pid),
            bench_s: process_cpu_seconds(std::process::id()),
            broker_s: process_cpu_seconds(broker_pid),
            at: Instant::now(),
        }
    }

    /// The round from this mark to `end`, which moved `num_records` records.
    fn until(self, end: CpuMark, num_records: usize) -> Round {
        Round {
            elapsed: end.at - self.at,
            num_records,
            cpu_s: end.under_test_s - self.under_test_s,
            bench_cpu_s: end.bench_s - self.bench_s,
            broker_cpu_s: end.broker_s - self.broker_s,
        }
    }
}

/// One side's round.
#[derive(Debug)]
struct Round {
    elapsed: Duration,
    num_records: usize,
    /// The code under test: the ingest process, or the ceiling process.
    cpu_s: f64,
    /// This process: the HTTP clients and the OTLP receiver.
    bench_cpu_s: f64,
    broker_cpu_s: f64,
}

impl Round {
    fn records_per_sec(&self) -> f64 {
        self.num_records as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_s_per_million(&self) -> f64 {
        self.cpu_s / self.num_records as f64 * 1e6
    }

    fn print_result(&self, side: &str, round: usize) {
        println!(
            "RESULT side={side} round={round} records_per_s={:.0} cpu_s_per_million={:.3} cpu_s={:.3} \
             elapsed_s={:.3} records={} bench_cpu_s={:.3} broker_cpu_s={:.3}",
            self.records_per_sec(),
            self.cpu_s_per_million(),
            self.cpu_s,
            self.elapsed.as_secs_f64(),
            self.num_records,
            self.bench_cpu_s,
            self.broker_cpu_s,
        );
    }
}

/// The median; of an even number of values, the mean of the middle two.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// The HTTP clients: `concurrency` tasks in this process, each sending its share of the bodies
/// one request at a time, with the bearer token.
struct HttpClients {
    client: reqwest::Client,
    url: String,
    token: String,
    bodies: Arc<Vec<Bytes>>,
    concurrency: usize,
}

impl HttpClients {
    /// Sends the first `num_bodies` bodies; every answer must be 200.
    async fn send(&self, num_bodies: usize) {
        let tasks: Vec<_> = (0..self.concurrency)
            .map(|worker| {
                let client = self.client.clone();
                let url = self.url.clone();
                let token = self.token.clone();
                let bodies = Arc::clone(&self.bodies);
                let concurrency = self.concurrency;
                tokio::spawn(async move {
                    for body in bodies[..num_bodies].iter().skip(worker).step_by(concurrency) {
                        let response = client
                            .post(&url)
                            .header("content-type", "application/x-ndjson")
                            .bearer_auth(&token)
                            .body(body.clone())
                            .send()
                            .await
                            .unwrap();
                        let status = response.status();
                        assert_eq!(
                            status,
                            reqwest::StatusCode::OK,
                            "{}",
                            response.text().await.unwrap_or_default()
                        );
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }
}

async fn http_round(clients: &HttpClients, ingest_pid: u32, broker_pid: u32, num_records: usize) -> Round {
    let start = CpuMark::take(ingest_pid, broker_pid);
    clients.send(clients.bodies.len()).await;
    start.until(CpuMark::take(ingest_pid, broker_pid), num_records)
}

/// One ceiling round, blocking: every record produced once and acknowledged.
fn ceiling_round(ceiling: &mut CeilingProcess, broker_pid: u32, num_records: usize) -> Round {
    let start = CpuMark::take(ceiling.pid(), broker_pid);
    ceiling.run_round();
    start.until(CpuMark::take(ceiling.pid(), broker_pid), num_records)
}

/// This benchmark's end of the ceiling process: commands on its stdin, answers on its stdout,
/// its errors on our stderr. Killed on drop.
struct CeilingProcess {
    child: Child,
    commands: ChildStdin,
    answers: BufReader<ChildStdout>,
    /// Bytes of Avro values it produces per round.
    avro_bytes: usize,
}

impl CeilingProcess {
    /// Starts it and waits (blocking) until it has encoded its records and warmed up.
    fn start(
        config_path: &Path,
        topic: &str,
        num_records: usize,
        start_micros: i64,
        concurrency: usize,
    ) -> Self {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg(CEILING_WORKER_ARG)
            .arg("--config")
            .arg(config_path)
            .args(["--topic", topic])
            .args(["--records", &num_records.to_string()])
            .args(["--start-micros", &start_micros.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let commands = child.stdin.take().unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap());
        let mut process = Self { child, commands, answers, avro_bytes: 0 };
        let ready = process.answer();
        process.avro_bytes = ready
            .strip_prefix("ready ")
            .and_then(|bytes| bytes.parse().ok())
            .unwrap_or_else(|| panic!("the ceiling process answered {ready:?} instead of ready"));
        process
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.answers.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the ceiling process exited; its errors are above");
        line.trim_end().to_string()
    }

    fn run_round(&mut self) {
        writeln!(self.commands, "run").unwrap();
        self.commands.flush().unwrap();
        let answer = self.answer();
        assert_eq!(answer, "done", "the ceiling process answered {answer:?}");
    }
}

impl Drop for CeilingProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A record as ingest produces it: its key, event time and single-object Avro value.
struct EncodedRecord {
    key: String,
    event_time_micros: i64,
    value: Vec<u8>,
}

/// The ceiling's producer and records, in the ceiling process.
struct Ceiling {
    producer: BatchProducer,
    topic: Arc<str>,
    fingerprint_hex: Arc<str>,
    records: Arc<Vec<EncodedRecord>>,
    concurrency: usize,
}

impl Ceiling {
    /// Produces the first `num_records` records in batches, each of `concurrency` tasks awaiting
    /// its batch's acknowledgement before it sends its next, as a client awaits its answer.
    async fn produce(&self, num_records: usize) {
        let tasks: Vec<_> = (0..self.concurrency)
            .map(|worker| {
                let producer = self.producer.clone();
                let topic = Arc::clone(&self.topic);
                let fingerprint_hex = Arc::clone(&self.fingerprint_hex);
                let records = Arc::clone(&self.records);
                let concurrency = self.concurrency;
                tokio::spawn(async move {
                    for batch in records[..num_records].chunks(BATCH_SIZE).skip(worker).step_by(concurrency) {
                        produce_batch(&producer, &topic, &fingerprint_hex, batch).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }
}

/// One batch as ingest produces a request's records (`RecordProducer::produce_batch`): the
/// schema fingerprint and the ingest time in headers, the event time as the Kafka timestamp.
async fn produce_batch(
    producer: &BatchProducer,
    topic: &str,
    fingerprint_hex: &str,
    batch: &[EncodedRecord],
) {
    let ingest_time = now_micros().to_string();
    let records = batch.iter().map(|record| BatchRecord {
        key: record.key.as_bytes(),
        value: &record.value,
        timestamp_millis: record.event_time_micros.div_euclid(1_000),
        headers_opt: Some(
            OwnedHeaders::new_with_capacity(2)
                .insert(Header { key: SCHEMA_FINGERPRINT_HEADER, value: Some(fingerprint_hex) })
                .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) }),
        ),
    });
    let delivery = producer.send_batch(topic, records).unwrap();
    let outcome = BatchProducer::wait(&delivery, Duration::from_secs(60))
        .await
        .expect("the broker answered within 60 s");
    assert_eq!(outcome.num_failed, 0, "{:?}", outcome.first_error_opt);
}

/// The ceiling process (`--ceiling-worker`): answers `ready <Avro bytes>` once its records are
/// encoded and a warm-up batch per task went through, then produces every record once per `run`
/// line on stdin and answers `done` when all were acknowledged. It ends at the end of stdin.
fn ceiling_worker() {
    let config_path = PathBuf::from(required_arg("--config"));
    let topic: Arc<str> = required_arg("--topic").into();
    let num_records = bench_arg("--records", 0);
    let concurrency = bench_arg("--concurrency", 8);
    let start_micros: i64 = required_arg("--start-micros").parse().unwrap();
    // The file ingest runs with: both sides' producer settings come from it.
    let config: IngestConfig = sluice_config::load(Some(config_path.as_path())).unwrap();
    let schema = telemetry_schema();
    let now = now_micros();
    let records: Vec<EncodedRecord> = (0..num_records)
        .map(|index| {
            let mut value = Vec::new();
            let meta = schema.encode_json(&reading(index, start_micros), now, i64::MAX, &mut value).unwrap();
            EncodedRecord { key: meta.key, event_time_micros: meta.event_time_micros, value }
        })
        .collect();
    let avro_bytes: usize = records.iter().map(|record| record.value.len()).sum();
    let producer =
        BatchProducer::new(&sluice_ingest::producer_client_config(&config.kafka, &config.producer)).unwrap();
    let ceiling = Ceiling {
        producer,
        topic,
        fingerprint_hex: schema.fingerprint_hex().into(),
        records: Arc::new(records),
        concurrency,
    };
    // The same runtime as the ingest binary's: multi-threaded, a worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(ceiling.produce((concurrency * BATCH_SIZE).min(num_records)));
    let mut answers = std::io::stdout().lock();
    writeln!(answers, "ready {avro_bytes}").unwrap();
    answers.flush().unwrap();
    for command in std::io::stdin().lock().lines() {
        let command = command.unwrap();
        assert_eq!(command, "run", "unknown command from the benchmark");
        runtime.block_on(ceiling.produce(num_records));
        writeln!(answers, "done").unwrap();
        answers.flush().unwrap();
    }
}

/// The OTLP/gRPC receiver ingest exports to, in this process (its CPU time is not ingest's).
/// Drained as it receives: its channels hold 64 items and an export waits while one is full,
/// which would hold up ingest's exporter as no real collector does.
struct TelemetryReceiver {
    endpoint: String,
    num_spans: Arc<AtomicU64>,
    num_metric_batches: Arc<AtomicU64>,
    draining: tokio::task::JoinHandle<()>,
}

impl TelemetryReceiver {
    async fn start() -> Self {
        let mut collector = FakeCollectorServer::start().await.unwrap();
        let endpoint = collector.endpoint();
        let num_spans = Arc::new(AtomicU64::new(0));
        let num_metric_batches = Arc::new(AtomicU64::new(0));
        let draining = {
            let num_spans = Arc::clone(&num_spans);
            let num_metric_batches = Arc::clone(&num_metric_batches);
            tokio::spawn(async move {
                loop {
                    let spans = collector.exported_spans(64, Duration::from_millis(20)).await;
                    num_spans.fetch_add(spans.len() as u64, Ordering::Relaxed);
                    let metrics = collector.exported_metrics(1, Duration::ZERO).await;
                    num_metric_batches.fetch_add(metrics.len() as u64, Ordering::Relaxed);
                }
            })
        };
        Self { endpoint, num_spans, num_metric_batches, draining }
    }

    /// Prints what ingest exported, the evidence that telemetry was on while it was measured.
    fn report(self, ingest: &ServiceBinary) {
        self.draining.abort();
        let num_spans = self.num_spans.load(Ordering::Relaxed);
        let num_metric_batches = self.num_metric_batches.load(Ordering::Relaxed);
        println!(
            "OTLP receiver: {num_spans} spans and {num_metric_batches} metric batches from ingest during the run"
        );
        if num_spans == 0 {
            println!("WARNING: ingest exported no spans; its log:\n{}", ingest.log_tail());
        }
    }
}

/// The same ingest loaded by the device simulator (`sluice simulate`, the release binary): a
/// fleet of 1,000 devices with realistic signals sending history as fast as ingest answers, from
/// `concurrency` connections, with the token. Its generator shares the two cores with ingest and
/// the broker, so this ratio is lower than the in-process clients'; it is what a load test with
/// the simulator sees. Skipped when the binary is not built.
async fn simulator_rounds(
    ingest: &ServiceBinary,
    token: &str,
    ceiling: &mut CeilingProcess,
    broker_pid: u32,
    num_records: usize,
    concurrency: usize,
    rounds: usize,
) {
    let Some(simulator) = release_binary("sluice") else {
        println!(
            "sluice simulate: skipped (build it first: cargo build --profile bench --workspace --bin sluice)"
        );
        return;
    };
    let ingest_pid = ingest.pid().unwrap();
    let base_url = ingest.base_url();
    // 1,000 devices, one reading a second each: history of N/1000 seconds is N readings.
    let history = format!("{}s", num_records / 1_000);
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let direct = tokio::task::block_in_place(|| ceiling_round(&mut *ceiling, broker_pid, num_records));
        let start = CpuMark::take(ingest_pid, broker_pid);
        let output = tokio::process::Command::new(&simulator)
            .args(["simulate", "--ingest-url", &base_url, "--token", token])
            .args(["--devices", "1000", "--rate", "1", "--history", &history])
            .args(["--batch", &BATCH_SIZE.to_string(), "--concurrency", &concurrency.to_string()])
            .args(["--seed", &round.to_string(), "--report", "json"])
            .output()
            .await
            .unwrap();
        let end = CpuMark::take(ingest_pid, broker_pid);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["http"]["rejected"], 0);
        let num_accepted = report["http"]["accepted"].as_u64().unwrap() as usize;
        let mut simulated = start.until(end, num_accepted);
        // The simulator's own clock, from its first request to its last answer: its start-up,
        // when ingest idles, is in the CPU marks' interval but adds no ingest CPU time.
        simulated.elapsed = Duration::from_secs_f64(report["elapsed_seconds"].as_f64().unwrap());
        direct.print_result("simulator_ceiling", round);
        simulated.print_result("simulator_ingest", round);
        rows.push(format!(
            "| {round} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} |",
            direct.records_per_sec(),
            direct.cpu_s_per_million(),
            simulated.records_per_sec(),
            simulated.cpu_s_per_million(),
            simulated.records_per_sec() / direct.records_per_sec(),
            simulated.cpu_s_per_million() / direct.cpu_s_per_million(),
        ));
    }
    println!(
        "| round | ceiling rec/s | ceiling CPU-s per M records | sluice simulate -> ingest rec/s | ingest CPU-s per M records | ratio | CPU ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!("{row}");
    }
}
