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

/// Epoch microseconds now.
pub fn now_micros() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

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

/// Asserts that `rows` are exactly the (device_id, seq) pairs of `readings`, each once.
pub fn assert_exactly_once(rows: &[LakeRow], readings: &[serde_json::Value]) {
    let mut expected: Vec<(String, i64)> = readings
        .iter()
        .map(|reading| {
            (
                reading["device_id"].as_str().unwrap_or_default().to_string(),
                reading["seq"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    expected.sort();
    let mut actual: Vec<(String, i64)> = rows.iter().map(|row| (row.device_id.clone(), row.seq)).collect();
    actual.sort();
    let num_duplicates = actual.windows(2).filter(|pair| pair[0] == pair[1]).count();
    assert_eq!(num_duplicates, 0, "{num_duplicates} rows appear more than once");
    assert_eq!(actual.len(), expected.len(), "row count differs from what was produced");
    assert!(actual == expected, "rows differ from what was produced");
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
}

/// Every row of the files the commit records list, read through the object store the way an
/// engine that reads by commit records would (and each file must be at its final path).
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
    static PYTHONPATH: OnceLock<Result<String, String>> = OnceLock::new();
    let python_path = PYTHONPATH
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
        .map_err(|message| anyhow::anyhow!("installing the outside Delta readers failed: {message}"))?;
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
        let rows: Vec<LakeRow> = rows
            .iter()
            .map(|row| LakeRow {
                device_id: row["device_id"].as_str().unwrap_or_default().to_string(),
                seq: row["seq"].as_i64().unwrap_or(i64::MIN),
                ts_micros: row["ts"].as_i64().unwrap_or(i64::MIN),
            })
            .collect();
        assert_eq!(rows.len(), readings.len(), "{reader} read {} rows", rows.len());
        assert_exactly_once(&rows, readings);
    }
}
