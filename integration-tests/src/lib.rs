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
        let port = free_port();
        let directory = tempfile::TempDir::new().context("failed to create a temporary directory")?;
        let config_path = directory.path().join("mosquitto.conf");
        std::fs::write(
            &config_path,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 20\n"
            ),
        )?;
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
    let reader = apache_avro::GenericSingleObjectReader::builder().schema(schema).build()?;
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
