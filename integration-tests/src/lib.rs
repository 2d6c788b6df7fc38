//! Test fixtures: real servers on 127.0.0.1 (the Tansu Kafka-protocol broker, Mosquitto) on
//! free ports, one set per test, and the Sluice services started in-process against them. Every
//! test gets its own topic prefix, so tests run in parallel without `#[serial]`.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_ingest::IngestConfig;
use sluice_shutdown::CancellationToken;
use tokio::process::{Child, Command};

pub use sluice_ingest::RunningIngest;

pub mod remote_lake;

/// Root of the repository, for schemas/ and deploy/.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A workspace binary (`sluice-compactor`, `sluice`, ...) next to the running test's executable:
/// cargo builds every binary of the workspace before its tests.
pub fn workspace_binary(name: &str) -> PathBuf {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.join(name)))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(binary.exists(), "{} is missing; build the workspace first", binary.display());
    binary
}

/// The lake in a local directory, as the services open it.
pub fn open_local_lake(directory: &Path) -> sluice_lake::Lake {
    let config =
        sluice_lake::ObjectStoreConfig { url: directory.display().to_string(), ..Default::default() };
    let (store, root) = sluice_lake::open_store(&config).expect("local lake directory");
    sluice_lake::Lake::new(store, root)
}

/// A `--name value` number from a benchmark's command line, or `default`.
pub fn bench_arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|candidate| candidate == name)
        .and_then(|index| args.get(index + 1)?.parse().ok())
        .unwrap_or(default)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or(0)
}

/// A short random suffix for topic prefixes, MQTT client ids and file names.
pub fn unique_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tansu_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            // The same install the local run uses; it installs the broker when missing.
            let output = std::process::Command::new("bash")
                .arg(repo_root().join("deploy/local/broker.sh"))
                .arg("path")
                .stderr(Stdio::inherit())
                .output()
                .map_err(|error| format!("failed to run deploy/local/broker.sh: {error}"))?;
            if !output.status.success() {
                return Err("deploy/local/broker.sh path failed".to_string());
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A Tansu broker on a free port, memory storage, killed on drop.
#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    child_opt: Option<Child>,
}

impl Broker {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(free_port()).await
    }

    /// Starts on a given port, for tests that bring a broker back where the old one was.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let binary = tansu_binary()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start the Tansu broker")?;
        let broker = Self { port, child_opt: Some(child) };
        let bootstrap = broker.bootstrap_servers();
        let ready =
            wait_until(Duration::from_secs(15), || {
                let bootstrap = bootstrap.clone();
                async move {
                    tokio::task::spawn_blocking(move || metadata_answers(&bootstrap)).await.unwrap_or(false)
                }
            })
            .await;
        if !ready {
            bail!("broker on port {port} did not answer metadata requests within 15 s");
        }
        Ok(broker)
    }

    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL), as a crash or network loss would look to clients.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child_opt.take() {
            let _ = child.kill().await;
        }
    }
}

fn metadata_answers(bootstrap: &str) -> bool {
    let Ok(consumer) = ClientConfig::new().set("bootstrap.servers", bootstrap).create::<BaseConsumer>()
    else {
        return false;
    };
    consumer.fetch_metadata(None, Duration::from_millis(500)).is_ok()
}

/// A Mosquitto MQTT broker on a free port with anonymous access, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    _child: Child,
    _directory: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("").await
    }
}

/// A device-side MQTT client whose publishes resolve once the MQTT broker acknowledged them.
#[derive(Debug)]
pub struct MqttDevice {
    client: rumqttc::AsyncClient,
    puback_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl MqttDevice {
    pub async fn connect(port: u16) -> Self {
        Self::with_options(rumqttc::MqttOptions::new(
            format!("device-{}", unique_suffix()),
            "127.0.0.1",
            port,
        ))
    }

    fn with_options(options: rumqttc::MqttOptions) -> Self {
        let (client, mut event_loop) = rumqttc::AsyncClient::new(options, 16);
        let (puback_tx, puback_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        let _ = puback_tx.send(());
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, puback_rx }
    }

    /// Publishes JSON with QoS 1 and waits for Mosquitto's PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: serde_json::Value) -> anyhow::Result<()> {
        self.publish_bytes(topic, payload.to_string().into_bytes()).await
    }

    /// Publishes any payload (malformed ones too) with QoS 1 and waits for Mosquitto's PUBACK.
    pub async fn publish_bytes(&mut self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .context("failed to publish")?;
        tokio::time::timeout(Duration::from_secs(10), self.puback_rx.recv())
            .await
            .context("no PUBACK from mosquitto within 10 s")?
            .context("the MQTT event loop stopped")
    }
}

/// Waits until ingest's MQTT bridge has subscribed: a device publishes probes (readings of
/// device "probe", which tests leave out) until one of them lands in `stream_topic`.
pub async fn wait_for_mqtt_bridge(
    mosquitto: &Mosquitto,
    broker: &Broker,
    stream_topic: &str,
) -> anyhow::Result<()> {
    let mut prober = MqttDevice::connect(mosquitto.port).await;
    let probing = tokio::spawn(async move {
        for attempt in 0..200 {
            let probe = serde_json::json!({"ts": now_micros(), "seq": attempt});
            if prober.publish("sluice/telemetry/probe", probe).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let records = consume_topic(&broker.bootstrap_servers(), stream_topic, 1, Duration::ZERO).await?;
    probing.abort();
    if records.is_empty() {
        bail!("the MQTT bridge never subscribed");
    }
    Ok(())
}

/// An ingest configuration for tests: free port, this repo's schemas, a unique topic prefix.
pub fn ingest_config(broker: &Broker) -> IngestConfig {
    let mut config = IngestConfig::default();
    config.http.listen_address = SocketAddr::from(([127, 0, 0, 1], 0));
    config.schemas.directory = repo_root().join("schemas");
    config.kafka.bootstrap_servers = broker.bootstrap_servers();
    config.kafka.topic_prefix = format!("test-{}", unique_suffix());
    config.auth.enabled = false;
    config.producer.delivery_timeout_ms = 3_000;
    config.producer.health_check_interval_ms = 200;
    config.shutdown.grace_period_ms = 5_000;
    config
}

/// An ingest service running in-process; cancelled (and waited for) by [`IngestService::stop`].
#[derive(Debug)]
pub struct IngestService {
    pub base_url: String,
    pub config: IngestConfig,
    shutdown: CancellationToken,
    running_opt: Option<RunningIngest>,
}

impl IngestService {
    pub async fn start(config: IngestConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let running =
            sluice_ingest::start(config.clone(), shutdown.clone()).await.context("ingest failed to start")?;
        let base_url = format!("http://{}", running.local_addr());
        Ok(Self { base_url, config, shutdown, running_opt: Some(running) })
    }

    pub fn records_url(&self, stream: &str) -> String {
        format!("{}/v1/streams/{stream}/records", self.base_url)
    }

    pub fn stream_topic(&self, stream: &str) -> String {
        self.config.kafka.topic_names().stream(stream)
    }

    pub fn dead_letter_topic(&self, stream: &str) -> String {
        self.config.kafka.topic_names().dead_letter(stream)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(running) = self.running_opt.take() {
            running.wait().await?;
        }
        Ok(())
    }
}

impl Drop for IngestService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct ConsumedRecord {
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub timestamp_millis: Option<i64>,
    pub headers: Vec<(String, String)>,
}

impl ConsumedRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// Reads every partition of `topic` from the beginning until `expected` records arrived, then
/// keeps reading for `settle` to catch any record beyond them (so "exactly N" can be asserted).
pub async fn consume_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    consume_topic_within(bootstrap, topic, expected, settle, Duration::from_secs(30)).await
}

/// [`consume_topic`] that gives up after `max_wait` with whatever arrived.
pub async fn consume_topic_within(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    max_wait: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consume_blocking(&bootstrap, &topic, expected, settle, max_wait))
        .await?
}

fn consume_blocking(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    max_wait: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-reader-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .create()
        .context("failed to create the test consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .context("failed to fetch topic metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|entry| entry.partitions().iter().map(|partition| partition.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions");
    }
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut records = Vec::new();
    let overall_deadline = Instant::now() + max_wait;
    let mut settle_deadline_opt: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if records.len() >= expected && settle_deadline_opt.is_none() {
            settle_deadline_opt = Some(now + settle);
        }
        if settle_deadline_opt.is_some_and(|deadline| now >= deadline) || now >= overall_deadline {
            break;
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.context("failed to consume")?;
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        (
                            header.key.to_string(),
                            header
                                .value
                                .map(|value| String::from_utf8_lossy(value).into_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(ConsumedRecord {
            partition: message.partition(),
            key: message.key().map(|key| String::from_utf8_lossy(key).into_owned()),
            payload: message.payload().unwrap_or_default().to_vec(),
            timestamp_millis: message.timestamp().to_millis(),
            headers,
        });
    }
    Ok(records)
}

/// Decodes a Sluice Kafka value (Avro single-object) with apache-avro, as any Avro reader would.
pub fn decode_value(
    schema_json: &str,
    payload: &[u8],
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let schema = apache_avro::Schema::parse_str(schema_json)?;
    let header = sluice_schema::single_object_header(sluice_schema::fingerprint_of(&schema));
    let reader = apache_avro::GenericSingleObjectReader::builder().schema(schema).header(header).build()?;
    let value = reader.read_value(&mut &payload[..])?;
    let apache_avro::types::Value::Record(fields) = value else { bail!("not a record") };
    Ok(fields.into_iter().map(|(name, value)| (name, avro_to_json(value))).collect())
}

fn avro_to_json(value: apache_avro::types::Value) -> serde_json::Value {
    use apache_avro::types::Value as Avro;
    use serde_json::Value as Json;
    match value {
        Avro::Null => Json::Null,
        Avro::Boolean(flag) => Json::Bool(flag),
        Avro::Int(number) => Json::from(number),
        Avro::Long(number) | Avro::TimestampMicros(number) | Avro::TimestampMillis(number) => {
            Json::from(number)
        }
        Avro::Float(number) => Json::from(f64::from(number)),
        Avro::Double(number) => Json::from(number),
        Avro::String(text) | Avro::Enum(_, text) => Json::String(text),
        Avro::Union(_, inner) => avro_to_json(*inner),
        other => Json::String(format!("{other:?}")),
    }
}

/// The telemetry stream's schema as shipped.
pub fn telemetry_schema_json() -> String {
    std::fs::read_to_string(repo_root().join("schemas/telemetry.avsc")).unwrap_or_default()
}

pub use sluice_clock::now_micros;

/// A compactor configuration for tests: this repo's schemas, a lake in `lake_dir`, quick flushes,
/// and a consumer group of its own.
pub fn compactor_config(
    broker: &Broker,
    topic_prefix: &str,
    lake_dir: &Path,
) -> sluice_compactor::CompactorConfig {
    let mut config = sluice_compactor::CompactorConfig::default();
    config.compactor.group_id = format!("compactor-{}", unique_suffix());
    config.schemas.directory = repo_root().join("schemas");
    config.object_store.url = lake_dir.display().to_string();
    config.kafka.bootstrap_servers = broker.bootstrap_servers();
    config.kafka.topic_prefix = topic_prefix.to_string();
    // Tansu's first group join waits about half the session timeout.
    config.kafka.client.0.insert("session.timeout.ms".into(), "6000".into());
    config.kafka.client.0.insert("heartbeat.interval.ms".into(), "500".into());
    config.flush.max_age_ms = 300;
    config.shutdown.grace_period_ms = 20_000;
    // Tests run side by side: any free port.
    config.health.listen_address = "127.0.0.1:0".into();
    config
}

/// A compactor running in-process.
#[derive(Debug)]
pub struct CompactorService {
    shutdown: CancellationToken,
    running_opt: Option<sluice_compactor::RunningCompactor>,
}

impl CompactorService {
    pub async fn start(config: sluice_compactor::CompactorConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let running =
            sluice_compactor::start(config, shutdown.clone()).await.context("compactor failed to start")?;
        Ok(Self { shutdown, running_opt: Some(running) })
    }

    /// The streams whose tables this instance's janitor keeps.
    pub fn janitor_streams(&self) -> Vec<String> {
        self.running_opt.as_ref().map(|running| running.janitor_streams()).unwrap_or_default()
    }

    /// Whether the instance owns its share of the partitions and each can make progress.
    pub fn is_ready(&self) -> bool {
        self.running_opt.as_ref().is_some_and(|running| running.is_ready())
    }

    /// Records that partitions revoked from this instance held uncommitted.
    pub fn revoked_uncommitted_records(&self) -> u64 {
        self.running_opt.as_ref().map_or(0, |running| running.revoked_uncommitted_records())
    }

    /// Graceful stop: flushes and commits what is buffered.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(running) = self.running_opt.take() {
            running.wait().await?;
        }
        Ok(())
    }
}

impl Drop for CompactorService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An executor configuration for tests: this repo's schemas, the lake in `lake_dir`, quick ticks
/// and retries, and a consumer group of its own.
pub fn executor_config(
    broker: &Broker,
    topic_prefix: &str,
    lake_dir: &Path,
) -> sluice_executor::ExecutorConfig {
    let mut config = sluice_executor::ExecutorConfig::default();
    config.executor.group_id = format!("executor-{}", unique_suffix());
    config.executor.instance_id = format!("executor-{}", unique_suffix());
    config.executor.tick_interval_ms = 200;
    config.executor.retry_backoff_ms = 200;
    config.executor.max_concurrent_runs = 2;
    config.query.target_partitions = 2;
    config.schemas.directory = repo_root().join("schemas");
    config.object_store.url = lake_dir.display().to_string();
    config.kafka.bootstrap_servers = broker.bootstrap_servers();
    config.kafka.topic_prefix = topic_prefix.to_string();
    config.kafka.client.0.insert("session.timeout.ms".into(), "6000".into());
    config.kafka.client.0.insert("heartbeat.interval.ms".into(), "500".into());
    config.shutdown.grace_period_ms = 10_000;
    config.health.listen_address = "127.0.0.1:0".into();
    config
}

/// An executor running in-process.
#[derive(Debug)]
pub struct ExecutorService {
    shutdown: CancellationToken,
    task_opt: Option<tokio::task::JoinHandle<Result<(), sluice_executor::ExecutorError>>>,
}

impl ExecutorService {
    pub fn start(config: sluice_executor::ExecutorConfig) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sluice_executor::run(config, shutdown.clone()));
        Self { shutdown, task_opt: Some(task) }
    }

    /// Graceful stop: running windows finish first.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task_opt.take() {
            task.await.context("executor panicked")??;
        }
        Ok(())
    }
}

impl Drop for ExecutorService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Produces a job file (or, with `None`, a tombstone) to the jobs topic under `name`.
pub async fn submit_job(
    bootstrap: &str,
    topic_prefix: &str,
    name: &str,
    text_opt: Option<&str>,
) -> anyhow::Result<()> {
    let producer: rdkafka::producer::FutureProducer =
        sluice_kafka::KafkaConfig { bootstrap_servers: bootstrap.to_string(), ..Default::default() }
            .producer_config()
            .create()?;
    let topic = format!("{topic_prefix}.jobs");
    let mut record: rdkafka::producer::FutureRecord<'_, str, str> =
        rdkafka::producer::FutureRecord::to(&topic).key(name);
    if let Some(text) = text_opt {
        record = record.payload(text);
    }
    producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error)?;
    Ok(())
}

/// Telemetry readings for tests: `num_devices` devices, `seq` counting per device, event times
/// spread over `span_micros` ending an hour ago, shuffled a little so some arrive late.
pub fn telemetry_readings(
    num_records: usize,
    num_devices: usize,
    span_micros: i64,
) -> Vec<serde_json::Value> {
    let end = now_micros() - 3_600_000_000;
    let start = end - span_micros;
    let step = (span_micros / num_records.max(1) as i64).max(1);
    (0..num_records)
        .map(|index| {
            let device = index % num_devices;
            // Every 7th reading is two steps late relative to its neighbours.
            let lateness = if index % 7 == 0 { 2 * step * num_devices as i64 } else { 0 };
            serde_json::json!({
                "device_id": format!("dev-{device:04}"),
                "ts": (start + index as i64 * step - lateness).max(start),
                "seq": (index / num_devices) as i64,
                "temperature": (index % 50) as f64 / 2.0,
            })
        })
        .collect()
}

/// Encodes readings with the stream's schema and produces them, waiting for Kafka's acks.
pub async fn produce_readings(
    bootstrap: &str,
    topic: &str,
    readings: &[serde_json::Value],
) -> anyhow::Result<()> {
    let schema_path = repo_root().join("schemas/telemetry.avsc");
    let schema = sluice_schema::StreamSchema::from_avro_json(
        "telemetry",
        &std::fs::read_to_string(&schema_path)?,
        &schema_path,
    )?;
    let producer = sluice_kafka::BatchProducer::new(
        &sluice_kafka::KafkaConfig { bootstrap_servers: bootstrap.to_string(), ..Default::default() }
            .producer_config(),
    )?;
    for chunk in readings.chunks(5_000) {
        let encoded: Vec<(String, i64, Vec<u8>)> = chunk
            .iter()
            .map(|reading| {
                let mut value = Vec::new();
                let meta = schema
                    .encode_json(reading, i64::MAX / 2, i64::MAX / 4, &mut value)
                    .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
                Ok((meta.key, meta.event_time_micros, value))
            })
            .collect::<anyhow::Result<_>>()?;
        produce_raw(
            &producer,
            topic,
            encoded.iter().map(|(key, ts, value)| (key.as_bytes(), *ts / 1_000, value.as_slice())),
        )
        .await?;
    }
    Ok(())
}

/// Produces raw key/value records and waits for Kafka's acknowledgement of all of them.
pub async fn produce_raw<'a>(
    producer: &sluice_kafka::BatchProducer,
    topic: &str,
    records: impl ExactSizeIterator<Item = (&'a [u8], i64, &'a [u8])>,
) -> anyhow::Result<()> {
    let records = records.map(|(key, timestamp_millis, value)| sluice_kafka::BatchRecord {
        key,
        value,
        timestamp_millis,
        headers_opt: None,
    });
    let batch = producer.send_batch(topic, records)?;
    let outcome = sluice_kafka::BatchProducer::wait(&batch, Duration::from_secs(30))
        .await
        .context("no acknowledgement")?;
    if outcome.num_failed > 0 {
        bail!("{} records failed: {:?}", outcome.num_failed, outcome.first_error_opt);
    }
    Ok(())
}

/// One row read back from the lake.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LakeRow {
    pub device_id: String,
    pub seq: i64,
    pub ts_micros: i64,
}

/// Every row of the stream table at `<lake_dir>/<stream>/` as its Delta log's latest version
/// has it, with a check that each file sits in the Hive partition of its rows' event times.
///
/// The log is replayed here from its JSON commits (adds less removes), independently of
/// delta-rs, the way any Delta reader must: files outside the log do not count.
pub fn read_lake_rows(lake_dir: &Path, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    let table_dir = lake_dir.join(stream);
    let mut rows = Vec::new();
    for relative in delta_live_files(&table_dir)? {
        for row in parquet_rows(bytes::Bytes::from(std::fs::read(table_dir.join(&relative))?))? {
            let partition = sluice_lake::PartitionKey::for_event_time(
                row.ts_micros,
                sluice_lake::PartitionGranularity::Hour,
            );
            if !relative.starts_with(&partition.to_string()) {
                bail!("row with ts {} ({partition}) is in {relative}", row.ts_micros);
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The data files (relative to the table) of a local Delta table's latest version, from its
/// JSON commits. Empty when the table has no log yet.
pub fn delta_live_files(table_dir: &Path) -> anyhow::Result<Vec<String>> {
    let log_dir = table_dir.join("_delta_log");
    let Ok(entries) = std::fs::read_dir(&log_dir) else { return Ok(Vec::new()) };
    let mut commits: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(version) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".json"))
            .and_then(|version| version.parse::<u64>().ok())
        else {
            continue;
        };
        commits.push((version, path));
    }
    commits.sort();
    for (index, (version, _)) in commits.iter().enumerate() {
        if *version != index as u64 {
            bail!(
                "the log of {} has no commit {index} (log cleanup is not expected in tests)",
                table_dir.display()
            );
        }
    }
    let mut live = std::collections::BTreeSet::new();
    for (_, path) in commits {
        for line in std::fs::read_to_string(&path)?.lines().filter(|line| !line.trim().is_empty()) {
            let action: serde_json::Value = serde_json::from_str(line)?;
            if let Some(path) = action["add"]["path"].as_str() {
                live.insert(path.to_string());
            } else if let Some(path) = action["remove"]["path"].as_str() {
                live.remove(path);
            }
        }
    }
    Ok(live.into_iter().collect())
}

/// The (device_id, seq, ts) of every row of one Parquet file.
fn parquet_rows(bytes: bytes::Bytes) -> anyhow::Result<Vec<LakeRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int64Type, TimestampMicrosecondType};
    let mut rows = Vec::new();
    for batch in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
        let batch = batch?;
        let devices = batch.column_by_name("device_id").context("device_id")?.as_string::<i32>().clone();
        let seqs = batch.column_by_name("seq").context("seq")?.as_primitive::<Int64Type>().clone();
        let times =
            batch.column_by_name("ts").context("ts")?.as_primitive::<TimestampMicrosecondType>().clone();
        rows.extend((0..batch.num_rows()).map(|row| LakeRow {
            device_id: devices.value(row).to_string(),
            seq: seqs.value(row),
            ts_micros: times.value(row),
        }));
    }
    Ok(rows)
}

/// A compactor (watermark every 200 ms, 1 s of allowed lateness) that has committed `readings`,
/// produced here to `<prefix>.telemetry`, to the lake in `lake_dir` and published their
/// watermark; returns it with the watermark.
pub async fn compacted_readings(
    broker: &Broker,
    prefix: &str,
    lake_dir: &Path,
    readings: &[serde_json::Value],
) -> (CompactorService, i64) {
    let mut config = compactor_config(broker, prefix, lake_dir);
    config.watermark.interval_ms = 200;
    config.watermark.allowed_lateness_ms = 1_000;
    let compactor = CompactorService::start(config).await.expect("compactor starts");
    produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), readings)
        .await
        .expect("readings produced");
    wait_for_lake_rows(lake_dir, "telemetry", readings.len(), Duration::from_secs(60)).await;
    let watermark = settled_watermark(&open_local_lake(lake_dir), "telemetry", 4, 1_000_000).await;
    (compactor, watermark)
}

/// Waits until every window of `job` starting at one of `starts` has an outcome, and returns
/// whether they all had one in time. An outcome other than success fails the test at once.
pub async fn windows_succeeded(
    lake: &sluice_lake::Lake,
    job: &str,
    starts: &[i64],
    timeout: Duration,
) -> bool {
    use sluice_executor::runs::{OutcomeStatus, load_windows};
    wait_until(timeout, || {
        let lake = lake.clone();
        async move {
            let windows = load_windows(&lake, job).await.expect("window records readable");
            starts.iter().all(|start| {
                windows.get(start).and_then(|state| state.outcome_opt.as_ref()).is_some_and(|outcome| {
                    assert_eq!(
                        outcome.status,
                        OutcomeStatus::Succeeded,
                        "{job} {}: {outcome:?}",
                        sluice_executor::job::format_micros(*start)
                    );
                    true
                })
            })
        }
    })
    .await
}

/// At least `at_least` run events from `<prefix>.job-runs`, decoded.
pub async fn job_run_events(
    broker: &Broker,
    prefix: &str,
    at_least: usize,
) -> Vec<sluice_executor::events::JobRunEvent> {
    consume_topic_within(
        &broker.bootstrap_servers(),
        &format!("{prefix}.job-runs"),
        at_least,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await
    .expect("job-runs topic readable")
    .iter()
    .map(|record| sluice_executor::events::JobRunEvent::decode(&record.payload).expect("run event decodes"))
    .collect()
}

/// The result a job wrote for the window starting at `window_start_micros`.
pub fn read_job_result(
    lake_dir: &Path,
    job: &str,
    window_start_micros: i64,
) -> Vec<arrow_array::RecordBatch> {
    let table_dir = lake_dir.join(sluice_executor::runs::results_table(job));
    let partition = format!("{}/", sluice_executor::runs::result_partition(window_start_micros));
    let files: Vec<String> = delta_live_files(&table_dir)
        .unwrap_or_else(|error| panic!("{}: {error:#}", table_dir.display()))
        .into_iter()
        .filter(|path| path.starts_with(&partition))
        .collect();
    assert_eq!(files.len(), 1, "one result file per window in the table's latest version: {files:?}");
    let path = table_dir.join(&files[0]);
    let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|builder| builder.build()?.collect::<Result<Vec<_>, _>>().map_err(Into::into))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Waits until the compactor has published the watermark of everything committed to
/// `stream` (over its `partitions`), and returns it: the point up to which windows are complete.
pub async fn settled_watermark(
    lake: &sluice_lake::Lake,
    stream: &str,
    partitions: i32,
    lateness_micros: i64,
) -> i64 {
    let expected = lake
        .watermark(stream, partitions, lateness_micros)
        .await
        .expect("commit records readable")
        .expect("all partitions committed");
    let reached = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            lake.published_watermark(stream)
                .await
                .ok()
                .flatten()
                .is_some_and(|published| published.watermark_micros == expected)
        }
    })
    .await;
    assert!(reached, "the watermark {expected} of {stream} is published");
    expected
}

/// Waits until the lake holds at least `expected` rows; returns what it holds then.
pub async fn wait_for_lake_rows(
    lake_dir: &Path,
    stream: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<LakeRow> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = read_lake_rows(lake_dir, stream).unwrap_or_default();
        if rows.len() >= expected || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts that `rows` are exactly the (device_id, seq) pairs of `readings`, each once, and
/// that each row's event time is the one produced (where the readings give it in microseconds).
pub fn assert_exactly_once(rows: &[LakeRow], readings: &[serde_json::Value]) {
    let compare_times = readings.iter().all(|reading| reading["ts"].is_i64());
    let key = |device_id: &str, seq: i64, ts_micros: i64| {
        (device_id.to_string(), seq, if compare_times { ts_micros } else { 0 })
    };
    let mut expected: Vec<(String, i64, i64)> = readings
        .iter()
        .map(|reading| {
            key(
                reading["device_id"].as_str().unwrap_or_default(),
                reading["seq"].as_i64().unwrap_or_default(),
                reading["ts"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    expected.sort();
    let mut actual: Vec<(String, i64, i64)> =
        rows.iter().map(|row| key(&row.device_id, row.seq, row.ts_micros)).collect();
    actual.sort();
    let num_duplicates =
        actual.windows(2).filter(|pair| pair[0].0 == pair[1].0 && pair[0].1 == pair[1].1).count();
    assert_eq!(num_duplicates, 0, "{num_duplicates} rows appear more than once");
    assert_eq!(actual.len(), expected.len(), "row count differs from what was produced");
    if let Some((row, reading)) = actual.iter().zip(&expected).find(|(row, reading)| row != reading) {
        panic!("rows differ from what was produced: first difference {row:?} where {reading:?} was produced");
    }
}

/// An S3-compatible server (moto) on a free port with one bucket, killed on drop.
#[derive(Debug)]
pub struct S3Server {
    pub port: u16,
    pub bucket: String,
    _child: Child,
}

impl S3Server {
    pub async fn start() -> anyhow::Result<Self> {
        let output = std::process::Command::new("bash")
            .arg(repo_root().join("deploy/local/s3-server.sh"))
            .arg("path")
            .stderr(Stdio::inherit())
            .output()
            .context("failed to run deploy/local/s3-server.sh")?;
        if !output.status.success() {
            bail!("deploy/local/s3-server.sh path failed");
        }
        let python_path = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .env("PYTHONPATH", python_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start moto")?;
        let url = format!("http://127.0.0.1:{port}/");
        let client = reqwest::Client::new();
        let ready = wait_until(Duration::from_secs(30), || {
            let request = client.get(&url).send();
            async move { request.await.is_ok() }
        })
        .await;
        if !ready {
            bail!("moto on port {port} did not answer within 30 s");
        }
        let bucket = format!("lake-{}", unique_suffix());
        let created = client.put(format!("{url}{bucket}")).send().await?;
        if !created.status().is_success() {
            bail!("failed to create bucket {bucket}: {}", created.status());
        }
        Ok(Self { port, bucket, _child: child })
    }

    /// Store settings for `s3://<bucket>/<prefix>` on this server.
    pub fn store_config(&self, prefix: &str) -> sluice_lake::ObjectStoreConfig {
        let mut options = sluice_lake::StoreOptions::default();
        for (key, value) in [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_access_key_id", "sluice-test".to_string()),
            ("aws_secret_access_key", "sluice-test-secret".to_string()),
        ] {
            options.0.insert(key.to_string(), value);
        }
        sluice_lake::ObjectStoreConfig {
            url: format!("s3://{}/{prefix}", self.bucket),
            options,
            ..Default::default()
        }
    }

    /// The same settings as storage options of Python `deltalake` (its environment-style names).
    pub fn python_storage_options(&self) -> Vec<(String, String)> {
        let config = self.store_config("");
        config
            .options
            .0
            .iter()
            .filter_map(|(key, value)| {
                let name = match key.as_str() {
                    "aws_endpoint" => "AWS_ENDPOINT_URL",
                    "aws_allow_http" => "AWS_ALLOW_HTTP",
                    "aws_region" => "AWS_REGION",
                    "aws_access_key_id" => "AWS_ACCESS_KEY_ID",
                    "aws_secret_access_key" => "AWS_SECRET_ACCESS_KEY",
                    _ => return None,
                };
                Some((name.to_string(), value.clone()))
            })
            .collect()
    }

    /// A lake under `remote_lake::LAKE_PREFIX` in the bucket.
    pub fn remote_lake(&self) -> remote_lake::RemoteLake {
        remote_lake::RemoteLake {
            config: self.store_config(remote_lake::LAKE_PREFIX),
            url: format!("s3://{}/{}", self.bucket, remote_lake::LAKE_PREFIX),
            python_storage_options: self.python_storage_options(),
        }
    }
}

/// The account every Azurite has, and its key: Microsoft's published development credentials,
/// not a secret (object_store's emulator mode has the same two built in).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The Blob service API version of the one request the fixture makes itself (Azurite runs with
/// `--skipApiVersionCheck`, so object_store's newer version is accepted too).
const AZURITE_API_VERSION: &str = "2021-08-06";

/// An Azure Blob Storage emulator (Azurite) on a free port with one container, killed on drop.
#[derive(Debug)]
pub struct AzuriteServer {
    pub port: u16,
    pub container: String,
    // Fields drop in order: Azurite is killed before its data directory is removed.
    _child: Child,
    _data: tempfile::TempDir,
}

impl AzuriteServer {
    pub async fn start() -> anyhow::Result<Self> {
        let output = std::process::Command::new("bash")
            .arg(repo_root().join("deploy/local/azurite.sh"))
            .arg("path")
            .stderr(Stdio::inherit())
            .output()
            .context("failed to run deploy/local/azurite.sh")?;
        if !output.status.success() {
            bail!("deploy/local/azurite.sh path failed");
        }
        let binary = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        let data = tempfile::TempDir::new().context("failed to create Azurite's data directory")?;
        let port = free_port();
        // --disableTelemetry: without it Azurite reaches for a cloud metadata address off this
        // machine. --skipApiVersionCheck: object_store may speak a newer API version than
        // Azurite knows.
        let child = Command::new(&binary)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
            .arg(data.path())
            .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start Azurite ({})", binary.display()))?;
        let client = reqwest::Client::new();
        let service_url = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}");
        // Any answer means it listens (an unsigned GET of the account gets an error status).
        let ready = wait_until(Duration::from_secs(30), || {
            let request = client.get(&service_url).send();
            async move { request.await.is_ok() }
        })
        .await;
        if !ready {
            bail!("Azurite on port {port} did not answer within 30 s");
        }
        let container = format!("lake-{}", unique_suffix());
        create_azurite_container(&client, &service_url, &container).await?;
        Ok(Self { port, container, _child: child, _data: data })
    }

    /// Store settings for `az://<container>/<prefix>` on this Azurite.
    ///
    /// Not object_store's emulator mode (`azure_storage_use_emulator`): that finds Azurite at
    /// the `AZURITE_BLOB_STORAGE_URL` environment variable or else on port 10000, and the
    /// services under test run in this process, each test with its own Azurite on a free port.
    /// An endpoint that ends in the account name (`http://127.0.0.1:PORT/devstoreaccount1`),
    /// with that account's name and key, gives the same path-style URLs
    /// (`/devstoreaccount1/<container>/<blob>`) and the same shared-key signatures as emulator
    /// mode. The one other thing emulator mode changes, listing from an offset on the client,
    /// is not needed: Azurite 3.37 honours the `startFrom` object_store sends otherwise.
    pub fn store_config(&self, prefix: &str) -> sluice_lake::ObjectStoreConfig {
        let mut options = sluice_lake::StoreOptions::default();
        for (key, value) in [
            ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
            ("azure_storage_account_key", AZURITE_ACCOUNT_KEY.to_string()),
            ("azure_storage_endpoint", format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)),
            ("azure_allow_http", "true".to_string()),
        ] {
            options.0.insert(key.to_string(), value);
        }
        sluice_lake::ObjectStoreConfig {
            url: format!("az://{}/{prefix}", self.container),
            options,
            ..Default::default()
        }
    }

    /// The same settings as storage options of Python `deltalake`, which takes object_store's
    /// Azure keys as they are (checked with deltalake 1.6.6 against Azurite 3.37).
    pub fn python_storage_options(&self) -> Vec<(String, String)> {
        self.store_config("").options.0.into_iter().collect()
    }

    /// A lake under `remote_lake::LAKE_PREFIX` in the container.
    pub fn remote_lake(&self) -> remote_lake::RemoteLake {
        remote_lake::RemoteLake {
            config: self.store_config(remote_lake::LAKE_PREFIX),
            url: format!("az://{}/{}", self.container, remote_lake::LAKE_PREFIX),
            python_storage_options: self.python_storage_options(),
        }
    }
}

/// Creates a container with the Blob service's Create Container call, which object_store does
/// not make, signed with the account's shared key (the 2015-02-21 and later string to sign).
async fn create_azurite_container(
    client: &reqwest::Client,
    service_url: &str,
    container: &str,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let date =
        time::OffsetDateTime::now_utc().format(&format).context("failed to format the request date")?;
    // The verb, then Content-Encoding, Content-Language, Content-Length, Content-MD5,
    // Content-Type, Date, If-Modified-Since, If-Match, If-None-Match, If-Unmodified-Since and
    // Range (all empty here) each ending in a newline; then the x-ms- headers in name order; then
    // the resource: the account, the URL path (path-style: the account again, then the
    // container) and the query parameters.
    let string_to_sign = format!(
        "PUT\n{}x-ms-date:{date}\nx-ms-version:{AZURITE_API_VERSION}\n\
         /{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container",
        "\n".repeat(11)
    );
    let key = STANDARD.decode(AZURITE_ACCOUNT_KEY).context("the Azurite account key is not base64")?;
    let signature = STANDARD.encode(hmac_sha256(&key, string_to_sign.as_bytes()));
    let response = client
        .put(format!("{service_url}/{container}?restype=container"))
        .header("x-ms-date", date.as_str())
        .header("x-ms-version", AZURITE_API_VERSION)
        .header(reqwest::header::AUTHORIZATION, format!("SharedKey {AZURITE_ACCOUNT}:{signature}"))
        .send()
        .await
        .with_context(|| format!("failed to create container {container}"))?;
    let status = response.status();
    if status != reqwest::StatusCode::CREATED {
        let body = response.text().await.unwrap_or_default();
        bail!("failed to create container {container}: {status}: {body}");
    }
    Ok(())
}

/// HMAC-SHA256 (RFC 2104), for the one request the Azurite fixture signs itself.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};

    const BLOCK_BYTES: usize = 64;
    let mut key_block = [0_u8; BLOCK_BYTES];
    if key.len() > BLOCK_BYTES {
        let hashed: [u8; 32] = Sha256::digest(key).into();
        key_block[..hashed.len()].copy_from_slice(&hashed);
    } else {
        key_block[..key.len()].copy_from_slice(key);
    }
    let inner_pad = key_block.map(|byte| byte ^ 0x36);
    let outer_pad = key_block.map(|byte| byte ^ 0x5c);
    let inner: [u8; 32] = Sha256::new().chain_update(inner_pad).chain_update(message).finalize().into();
    Sha256::new().chain_update(outer_pad).chain_update(inner).finalize().into()
}

/// Waits, while a compactor merges and vacuums `stream`, until all `num_rows` are committed,
/// every Hive partition is down to one live file (so no merge is left to make), and every file a
/// merge removed is gone from the store (object_store's NotFound, not any error). Returns false
/// on timeout.
pub async fn wait_until_merged_and_vacuumed(
    lake: &sluice_lake::Lake,
    stream: &str,
    num_rows: u64,
    timeout: Duration,
) -> bool {
    use object_store::ObjectStoreExt as _;
    wait_until(timeout, || {
        let lake = lake.clone();
        async move {
            let Ok(commits) = lake.commits(stream).await else { return false };
            if commits.iter().map(|commit| commit.num_rows()).sum::<u64>() < num_rows {
                return false;
            }
            let Ok(live) = lake.live_files(stream).await else { return false };
            let partitions: std::collections::BTreeSet<&str> =
                live.iter().map(|file| file.partition.as_str()).collect();
            if partitions.len() != live.len() {
                return false;
            }
            let Ok(history) = lake.history(stream).await else { return false };
            for path in history.into_iter().flat_map(|commit| commit.removed) {
                let location = lake.absolute(&format!("{stream}/{path}"));
                if !matches!(lake.store().head(&location).await, Err(object_store::Error::NotFound { .. })) {
                    return false;
                }
            }
            true
        }
    })
    .await
}

/// Every row of the files that the flushes in the Delta log list (`Lake::commits`, from each
/// commit's `sluice.flushes`), fetched through the object store by path. Merges are not applied:
/// the files are read as flushed, merge outputs left out, so every file a flush committed must
/// still be at its final path (a merged-away file the janitor deleted fails the read).
pub async fn read_committed_rows(lake: &sluice_lake::Lake, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    let files: Vec<sluice_lake::CommittedFile> =
        lake.commits(stream).await?.into_iter().flat_map(|commit| commit.files).collect();
    read_rows_of(lake, &files).await
}

/// Every row of the live files (commits, less merged-away files, plus merge outputs).
pub async fn read_live_rows(lake: &sluice_lake::Lake, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    read_rows_of(lake, &lake.live_files(stream).await?).await
}

pub async fn read_rows_of(
    lake: &sluice_lake::Lake,
    files: &[sluice_lake::CommittedFile],
) -> anyhow::Result<Vec<LakeRow>> {
    let mut rows = Vec::new();
    for file in files {
        rows.extend(parquet_rows(lake.get(&file.path).await?)?);
    }
    Ok(rows)
}

impl Broker {
    /// Freezes the broker process (SIGSTOP): it keeps its state and its connections but answers
    /// nothing until [`Broker::resume`], as a broker in a long GC pause or a stalled VM would.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child_opt.as_ref().and_then(Child::id).context("the broker is not running")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .context("failed to run kill")?;
        if !status.success() {
            bail!("kill -{name} {pid} failed: {status}");
        }
        Ok(())
    }
}

impl Mosquitto {
    /// A Mosquitto on a free port with `extra` lines appended to the test configuration (for
    /// example `allow_anonymous false`, or a `max_packet_size`).
    pub async fn start_with(extra: &str) -> anyhow::Result<Self> {
        let port = free_port();
        let directory = tempfile::TempDir::new().context("failed to create a temporary directory")?;
        let config_path = directory.path().join("mosquitto.conf");
        let mut config = format!("listener {port} 127.0.0.1\npersistence false\nmax_inflight_messages 20\n");
        if !extra.contains("allow_anonymous") {
            config.push_str("allow_anonymous true\n");
        }
        config.push_str(extra);
        config.push('\n');
        std::fs::write(&config_path, config)?;
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start mosquitto")?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let ready = wait_until(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(address).await.is_ok()
        })
        .await;
        if !ready {
            bail!("mosquitto on port {port} did not accept connections within 10 s");
        }
        Ok(Self { port, _child: child, _directory: directory })
    }
}

impl MqttDevice {
    /// A device whose client may send packets up to `max_packet_bytes` (rumqttc's default is
    /// 10 KiB), for oversized payloads.
    pub async fn connect_with_max_packet(port: u16, max_packet_bytes: usize) -> Self {
        let mut options = rumqttc::MqttOptions::new(format!("device-{}", unique_suffix()), "127.0.0.1", port);
        options.set_max_packet_size(max_packet_bytes, max_packet_bytes);
        Self::with_options(options)
    }
}

/// The newest event of `kind` for `job` on the deployment's job-status topic, waiting up to a
/// minute for one (panics past it: test helper).
pub async fn job_status_event(
    broker: &Broker,
    prefix: &str,
    job: &str,
    kind: sluice_executor::events::JobStatusKind,
) -> sluice_executor::events::JobStatusEvent {
    job_status_event_within(broker, prefix, job, kind, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no {kind:?} status for {job}"))
}

/// The newest event of `kind` for `job` on the deployment's job-status topic, or none if none
/// came within `within`.
pub async fn job_status_event_within(
    broker: &Broker,
    prefix: &str,
    job: &str,
    kind: sluice_executor::events::JobStatusKind,
    within: Duration,
) -> Option<sluice_executor::events::JobStatusEvent> {
    let topic = format!("{prefix}.job-status");
    let deadline = Instant::now() + within;
    loop {
        let records = consume_topic_within(
            &broker.bootstrap_servers(),
            &topic,
            1,
            Duration::from_millis(200),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
        let found_opt = records
            .iter()
            .map(|record| {
                serde_json::from_slice::<sluice_executor::events::JobStatusEvent>(&record.payload)
                    .expect("status events are JSON")
            })
            .rfind(|event| event.job == job && event.status == kind);
        if found_opt.is_some() || Instant::now() >= deadline {
            return found_opt;
        }
    }
}

/// Paths (relative to `directory`, sorted) of the Parquet files under it, outside `_delta_log`.
pub fn parquet_files_under(directory: &Path) -> Vec<String> {
    fn walk(root: &Path, directory: &Path, files: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(directory) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, files);
            } else if path.extension().is_some_and(|extension| extension == "parquet")
                && let Ok(relative) = path.strip_prefix(root)
                && !relative.starts_with("_delta_log")
            {
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let mut files = Vec::new();
    walk(directory, directory, &mut files);
    files.sort();
    files
}

/// The Delta readers outside Sluice that CI installs (deploy/local/delta-readers.sh).
pub const OUTSIDE_READERS: [&str; 3] = ["deltalake", "polars", "duckdb"];

/// The PYTHONPATH of the outside Delta readers (`deploy/local/delta-readers.sh path`, which
/// installs them the first time), looked up once per test binary. Blocks while installing.
pub fn delta_readers_python_path() -> anyhow::Result<String> {
    static PYTHONPATH: OnceLock<Result<String, String>> = OnceLock::new();
    PYTHONPATH
        .get_or_init(|| {
            let output = std::process::Command::new(repo_root().join("deploy/local/delta-readers.sh"))
                .arg("path")
                .output()
                .map_err(|error| error.to_string())?;
            if !output.status.success() {
                return Err(String::from_utf8_lossy(&output.stderr).into_owned());
            }
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        })
        .clone()
        .map_err(|message| anyhow::anyhow!("installing the outside Delta readers failed: {message}"))
}

/// Rows of a Delta table as an outside reader returns them (integration-tests/readers), one
/// JSON object per row with `columns`. `table` is a local path or an `s3://` URL with
/// `storage_options`; `filter_opt` is a SQL predicate on partition columns.
pub fn outside_reader_rows(
    reader: &str,
    table: &str,
    columns: &[&str],
    filter_opt: Option<&str>,
    storage_options: &[(String, String)],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let python_path = delta_readers_python_path()?;
    let mut command = std::process::Command::new("python3");
    command
        .arg(repo_root().join("integration-tests/readers/read_delta.py"))
        .args(["--reader", reader, "--table", table, "--columns", &columns.join(",")])
        .env("PYTHONPATH", python_path);
    if let Some(filter) = filter_opt {
        command.args(["--filter", filter]);
    }
    for (key, value) in storage_options {
        command.args(["--storage-option", &format!("{key}={value}")]);
    }
    let output = command.output().context("failed to run read_delta.py")?;
    if !output.status.success() {
        bail!("{reader} failed to read {table}: {}", String::from_utf8_lossy(&output.stderr));
    }
    String::from_utf8(output.stdout)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).context("a row is not JSON"))
        .collect()
}

/// Asserts that every outside reader finds exactly `readings` in the local stream table at
/// `table_dir`.
pub fn assert_outside_readers_see(table_dir: &Path, readings: &[serde_json::Value]) {
    for reader in OUTSIDE_READERS {
        let rows =
            outside_reader_rows(reader, &table_dir.to_string_lossy(), &["device_id", "seq", "ts"], None, &[])
                .unwrap_or_else(|error| panic!("{error:#}"));
        let rows = lake_rows_of(&rows);
        assert_eq!(rows.len(), readings.len(), "{reader} read {} rows", rows.len());
        assert_exactly_once(&rows, readings);
    }
}

/// The rows an outside reader printed (with `device_id`, `seq` and `ts` among its columns).
pub fn lake_rows_of(rows: &[serde_json::Value]) -> Vec<LakeRow> {
    rows.iter()
        .map(|row| LakeRow {
            device_id: row["device_id"].as_str().unwrap_or_default().to_string(),
            seq: row["seq"].as_i64().unwrap_or(i64::MIN),
            ts_micros: row["ts"].as_i64().unwrap_or(i64::MIN),
        })
        .collect()
}

/// The rows of a stream table in a local lake as the executor's DataFusion reads them: the
/// latest Delta version of the table, through the executor's own catalog.
pub async fn datafusion_rows(lake_dir: &Path, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int64Type, TimestampMicrosecondType};
    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: lake_dir.display().to_string(),
        ..Default::default()
    })?;
    let registry =
        std::sync::Arc::new(sluice_schema::SchemaRegistry::load_directory(&repo_root().join("schemas"))?);
    let catalog = sluice_executor::Catalog::new(store, root, registry, Vec::new());
    let snapshot = catalog.snapshot().await?;
    let ctx = catalog.session(&snapshot, sluice_executor::Scope::All, false).await?;
    let sql = format!("SELECT device_id, seq, ts FROM \"{stream}\"");
    let frame =
        sluice_executor::plan_query(&ctx, &sql, None).await.map_err(|error| anyhow::anyhow!(error.0))?;
    let mut rows = Vec::new();
    for batch in frame.collect().await? {
        // Strings come out as views or plain arrays depending on the scan's settings.
        let devices: Vec<String> = match batch.column(0).as_string_view_opt() {
            Some(views) => views.iter().map(|value| value.unwrap_or_default().to_string()).collect(),
            None => batch
                .column(0)
                .as_string::<i32>()
                .iter()
                .map(|value| value.unwrap_or_default().to_string())
                .collect(),
        };
        let seqs = batch.column(1).as_primitive::<Int64Type>();
        let times = batch.column(2).as_primitive::<TimestampMicrosecondType>();
        rows.extend((0..batch.num_rows()).map(|row| LakeRow {
            device_id: devices[row].clone(),
            seq: seqs.value(row),
            ts_micros: times.value(row),
        }));
    }
    Ok(rows)
}

/// Asserts that the stream table in a local lake holds exactly `readings`, each once with its
/// values, as read by three independent paths: the log replayed here, every outside reader
/// (Python deltalake, Polars, DuckDB), and the executor's DataFusion.
pub async fn assert_every_reader_sees(lake_dir: &Path, stream: &str, readings: &[serde_json::Value]) {
    assert_exactly_once(
        &read_lake_rows(lake_dir, stream).unwrap_or_else(|error| panic!("the log: {error:#}")),
        readings,
    );
    assert_outside_readers_see(&lake_dir.join(stream), readings);
    let rows =
        datafusion_rows(lake_dir, stream).await.unwrap_or_else(|error| panic!("DataFusion: {error:#}"));
    assert_exactly_once(&rows, readings);
}

/// One read by [`ReadLoop`]: what Python `deltalake` found in the table version it loaded. A
/// failed read has `error_opt` set (the exception's type and message), `version_opt` when the
/// load got that far, and zero counts and an empty digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopRead {
    pub version_opt: Option<i64>,
    pub num_rows: u64,
    pub num_distinct_keys: u64,
    /// [`loop_keys_sha256`] of the rows read.
    pub keys_sha256: String,
    /// Data files of the version read.
    pub num_files: u64,
    /// Wall clock, microseconds since the epoch (comparable with [`now_micros`]).
    pub started_micros: i64,
    pub finished_micros: i64,
    pub error_opt: Option<String>,
}

impl LoopRead {
    fn from_json(line: &serde_json::Value) -> anyhow::Result<Self> {
        let integer = |name: &str| line[name].as_i64().with_context(|| format!("no integer {name}"));
        let count = |name: &str| line[name].as_u64().with_context(|| format!("no count {name}"));
        let started_micros = integer("started_micros")?;
        let finished_micros = integer("finished_micros")?;
        if let Some(error) = line.get("error") {
            return Ok(Self {
                version_opt: line["version"].as_i64(),
                num_rows: 0,
                num_distinct_keys: 0,
                keys_sha256: String::new(),
                num_files: 0,
                started_micros,
                finished_micros,
                error_opt: Some(error.as_str().map_or_else(|| error.to_string(), str::to_string)),
            });
        }
        Ok(Self {
            version_opt: Some(integer("version")?),
            num_rows: count("num_rows")?,
            num_distinct_keys: count("num_distinct_keys")?,
            keys_sha256: line["keys_sha256"].as_str().context("no keys_sha256")?.to_string(),
            num_files: count("num_files")?,
            started_micros,
            finished_micros,
            error_opt: None,
        })
    }
}

/// The reads in read_loop.py's output: one JSON object per line. A last line without its
/// newline is still being written and is left for the next look.
pub fn parse_loop_reads(text: &str) -> anyhow::Result<Vec<LoopRead>> {
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n') && !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("a read is not JSON: {line}"))?;
            LoopRead::from_json(&value).with_context(|| format!("unexpected read: {line}"))
        })
        .collect()
}

/// The digest read_loop.py writes as `keys_sha256`, computed from readings as
/// [`telemetry_readings`] makes them, so that one string compares a whole read with them.
///
/// Format (the same bytes as `keys_digest` in integration-tests/readers/read_loop.py): each row's
/// key is `<device_id>/<seq>` (the device id as it is, seq in decimal; a missing value is
/// `<null>`), e.g. `dev-0003/17`; the keys, duplicates kept, are sorted by bytes (UTF-8 byte
/// order is Python's code point order), each followed by `\n`; the digest is the lowercase hex
/// SHA-256 of that text.
pub fn loop_keys_sha256(readings: &[serde_json::Value]) -> String {
    use sha2::Digest;
    let mut keys: Vec<String> = readings
        .iter()
        .map(|reading| {
            let device_id = reading["device_id"].as_str().unwrap_or("<null>");
            let seq = reading["seq"].as_i64().map_or_else(|| "<null>".to_string(), |seq| seq.to_string());
            format!("{device_id}/{seq}")
        })
        .collect();
    keys.sort();
    let mut text = String::with_capacity(keys.iter().map(|key| key.len() + 1).sum());
    for key in &keys {
        text.push_str(key);
        text.push('\n');
    }
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A Python `deltalake` reader in a child process (integration-tests/readers/read_loop.py)
/// reading the (device_id, seq) of a Delta table's latest version over and over, one
/// [`LoopRead`] per read, until [`ReadLoop::stop`]. Killed on drop; its files live in a
/// temporary directory of its own.
#[derive(Debug)]
pub struct ReadLoop {
    child: Child,
    files: tempfile::TempDir,
}

impl ReadLoop {
    /// Starts reading `table` (a local path, or an `s3://` URL with `storage_options`). The
    /// table must exist already.
    pub async fn start(table: &str, storage_options: &[(String, String)]) -> anyhow::Result<Self> {
        // The first call may install the readers (about 20 s): off the runtime's workers.
        let python_path = tokio::task::spawn_blocking(delta_readers_python_path)
            .await
            .context("the delta-readers.sh lookup panicked")??;
        let files = tempfile::TempDir::new().context("failed to create the read loop's directory")?;
        let stderr = std::fs::File::create(files.path().join("stderr"))
            .context("failed to create the read loop's stderr file")?;
        let mut command = Command::new("python3");
        command
            .arg(repo_root().join("integration-tests/readers/read_loop.py"))
            .arg("--table")
            .arg(table)
            .arg("--stop-file")
            .arg(files.path().join("stop"))
            .arg("--out")
            .arg(files.path().join("reads.jsonl"))
            .args(["--columns", "device_id,seq"])
            .env("PYTHONPATH", python_path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        for (key, value) in storage_options {
            command.arg("--storage-option").arg(format!("{key}={value}"));
        }
        let child = command.spawn().context("failed to start read_loop.py")?;
        Ok(Self { child, files })
    }

    /// The reads made so far.
    pub fn reads(&self) -> anyhow::Result<Vec<LoopRead>> {
        match std::fs::read_to_string(self.files.path().join("reads.jsonl")) {
            Ok(text) => parse_loop_reads(&text),
            // The loop opens its output once Python has imported deltalake.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error).context("failed to read read_loop.py's output"),
        }
    }

    /// Waits until the loop has made `num_reads` reads (failed ones count too) and returns them;
    /// an error if it exits first or takes longer than `timeout`.
    pub async fn wait_for_reads(
        &mut self,
        num_reads: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<LoopRead>> {
        let deadline = Instant::now() + timeout;
        loop {
            let reads = self.reads()?;
            if reads.len() >= num_reads {
                return Ok(reads);
            }
            if let Some(status) = self.child.try_wait().context("failed to poll read_loop.py")? {
                bail!("read_loop.py exited ({status}) after {} reads: {}", reads.len(), self.stderr());
            }
            if Instant::now() >= deadline {
                bail!("read_loop.py made {} of {num_reads} reads within {timeout:?}", reads.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates the stop file, waits (up to `timeout`) for the loop to finish its read and exit
    /// 0, and returns every read it made.
    pub async fn stop(mut self, timeout: Duration) -> anyhow::Result<Vec<LoopRead>> {
        std::fs::write(self.files.path().join("stop"), b"").context("failed to create the stop file")?;
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("read_loop.py did not stop within {timeout:?}"))?
            .context("failed to wait for read_loop.py")?;
        if !status.success() {
            bail!("read_loop.py exited with {status}: {}", self.stderr());
        }
        self.reads()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.files.path().join("stderr")).unwrap_or_default()
    }
}

#[cfg(test)]
mod read_loop_tests {
    use super::*;

    #[test]
    fn the_key_digest_matches_read_loop_py() {
        // Computed by read_loop.py's keys_digest for these three rows, in another order.
        let readings = [
            serde_json::json!({"device_id": "dev-0001", "seq": 10}),
            serde_json::json!({"device_id": "dev-0000", "seq": 2}),
            serde_json::json!({"device_id": "dev-0001", "seq": 9}),
        ];
        assert_eq!(
            loop_keys_sha256(&readings),
            "60e8da81d5bf9ee5be656cd62da8453875731bea28c2f96c972c846f4d21aa59"
        );
    }

    #[test]
    fn reads_and_failed_reads_parse_and_a_partial_line_waits() {
        let text = concat!(
            r#"{"version":3,"num_rows":2,"num_distinct_keys":2,"keys_sha256":"ab","num_files":4,"#,
            r#""started_micros":10,"finished_micros":20}"#,
            "\n",
            r#"{"error":"FileNotFoundError: gone","version":null,"started_micros":30,"finished_micros":31}"#,
            "\n",
            r#"{"version":4,"num_ro"#,
        );
        let reads = parse_loop_reads(text).unwrap();
        assert_eq!(reads.len(), 2);
        assert_eq!((reads[0].version_opt, reads[0].num_rows, reads[0].num_files), (Some(3), 2, 4));
        assert_eq!(reads[0].error_opt, None);
        assert_eq!(reads[1].version_opt, None);
        assert_eq!(reads[1].error_opt.as_deref(), Some("FileNotFoundError: gone"));
        assert!(parse_loop_reads("{\"version\":1}\n").is_err(), "a read line without its counts");
    }
}
