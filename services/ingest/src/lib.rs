//! Sluice ingest: takes device readings over HTTP and MQTT, validates them against the stream
//! schemas and produces them to Kafka. An answer of success means the broker acknowledged every
//! record of the request (`acks=all`, idempotent producer).

mod auth;
pub mod config;
mod http;
mod metrics;
mod mqtt;
mod producer;
mod records;
mod server;
mod tasks;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_kafka::{KafkaError, TopicSpec, ensure_topics};
use sluice_schema::{SchemaError, SchemaRegistry};
use sluice_shutdown::{CancellationToken, TaskTracker};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use crate::config::IngestConfig;
pub use crate::producer::{
    DEAD_LETTER_ORIGINAL_SIZE_HEADER, DEAD_LETTER_REASON_HEADER, DEAD_LETTER_RESERVED_BYTES,
    DEAD_LETTER_SOURCE_HEADER, INGEST_TIME_HEADER, SCHEMA_FINGERPRINT_HEADER,
};
pub use crate::producer::{ProduceError, producer_client_config};
pub use crate::records::RECORD_OVERHEAD_BYTES;
pub use crate::tls::TlsError;

const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("failed to set up the Kafka producer")]
    Producer(#[source] producer::ProduceError),
    #[error("failed to set up Kafka topics")]
    Topics(#[from] KafkaError),
    #[error("failed to listen on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up TLS")]
    Tls(#[from] TlsError),
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
    #[error("the background task {task} failed: {cause}")]
    TaskFailed { task: &'static str, cause: String },
}

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// A started ingest service.
#[derive(Debug)]
pub struct RunningIngest {
    local_addr: SocketAddr,
    tracker: TaskTracker,
    supervisor: tasks::Supervisor,
    producer: producer::RecordProducer,
    grace_period: Duration,
}

impl RunningIngest {
    /// The HTTP listener's address (useful when the configured port is 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until shutdown completed: requests drained, MQTT stopped, producer flushed. A
    /// background task that failed (and so started the shutdown) makes this an error.
    pub async fn wait(self) -> Result<()> {
        self.tracker.close();
        self.tracker.wait().await;
        let producer = self.producer.clone();
        let grace_period = self.grace_period;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(grace_period)).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err(error)) => {
                tracing::warn!(error = %sluice_errors::Chain(&error), "producer flush incomplete at shutdown")
            }
            Err(error) => tracing::warn!(error = %sluice_errors::Chain(&error), "producer flush task failed"),
        }
        match self.supervisor.failure() {
            Some(failure) => Err(IngestError::TaskFailed { task: failure.task, cause: failure.cause }),
            None => Ok(()),
        }
    }
}

/// Warns when the soft open-file limit is below what `http.max_connections` needs: past it,
/// accepting fails with "Too many open files" before the connection limit is reached.
fn warn_if_file_descriptors_short(max_connections: usize) {
    // Kafka connections, the listener, logs and the runtime need some beyond the connections.
    const OTHER_DESCRIPTORS: usize = 128;
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else { return };
    let soft_limit_opt = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse::<usize>().ok());
    if let Some(soft_limit) = soft_limit_opt
        && soft_limit < max_connections.saturating_add(OTHER_DESCRIPTORS)
    {
        tracing::warn!(
            soft_limit,
            max_connections,
            "the open-file limit (ulimit -n) is below http.max_connections plus {OTHER_DESCRIPTORS}: raise it or lower http.max_connections"
        );
    }
}

/// Runs the service until `shutdown` is cancelled and shutdown completed.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Loads schemas, sets up Kafka, binds the listener and starts serving.
pub async fn start(config: IngestConfig, shutdown: CancellationToken) -> Result<RunningIngest> {
    let schemas = SchemaRegistry::load_directory(&config.schemas.directory)?;
    let metrics = Arc::new(metrics::IngestMetrics::new());
    let producer = producer::RecordProducer::new(&config.kafka, &config.producer, Arc::clone(&metrics))
        .map_err(IngestError::Producer)?;
    let topic_specs: Vec<TopicSpec> = schemas
        .stream_names()
        .flat_map(|stream| {
            [config.kafka.stream_topic_spec(stream), config.kafka.dead_letter_topic_spec(stream)]
        })
        .collect();
    ensure_topics(&config.kafka, &topic_specs, TOPIC_SETUP_TIMEOUT).await?;
    let health_interval = Duration::from_millis(config.producer.health_check_interval_ms);
    let topic_setup = producer::TopicSetup {
        kafka: config.kafka.clone(),
        specs: topic_specs,
        timeout: TOPIC_SETUP_TIMEOUT,
    };
    producer.probe_broker(health_interval.max(Duration::from_secs(1)), &topic_setup).await;

    let tracker = TaskTracker::new();
    let supervisor = tasks::Supervisor::new(tracker.clone(), shutdown.clone(), Arc::clone(&metrics));
    producer.spawn_health_probe(health_interval, topic_setup, &supervisor, shutdown.clone());
    let record_rules = records::RecordRules {
        max_records: config.http.max_records_per_request,
        // Checked by `validate`; a config that skipped it gets no lower bound rather than a panic.
        earliest_event_micros: config.validation.earliest_event_micros().unwrap_or(i64::MIN),
        max_future_skew_micros: config.validation.max_future_skew_micros(),
        max_message_bytes: producer.max_message_bytes(),
    };
    let topics = config.kafka.topic_names();

    if config.mqtt.enabled {
        let tls_opt = tls::mqtt_client_config(&config.mqtt)?;
        let bridge = mqtt::MqttBridge {
            config: config.mqtt.clone(),
            record_rules,
            schemas: schemas.clone(),
            topics: topics.clone(),
            producer: producer.clone(),
            metrics: Arc::clone(&metrics),
            tls_opt,
        };
        supervisor.spawn("mqtt_bridge", bridge.run(shutdown.clone()));
    }

    let state = Arc::new(http::HttpState {
        http: config.http.clone(),
        record_rules,
        schemas,
        topics,
        authorizer: auth::Authorizer::new(&config.auth),
        device_certificates_required: config.http.tls_client_ca_path.is_some()
            && config.http.tls_client_certificates == config::ClientCertificates::Required,
        producer: producer.clone(),
        metrics: Arc::clone(&metrics),
        supervisor: supervisor.clone(),
        in_flight_bytes: Semaphore::new(config.http.max_in_flight_bytes.min(Semaphore::MAX_PERMITS)),
        shutting_down: Default::default(),
    });
    let router = http::router(Arc::clone(&state));
    let address = config.http.listen_address;
    let listener =
        TcpListener::bind(address).await.map_err(|source| IngestError::Bind { address, source })?;
    let local_addr = listener.local_addr().map_err(|source| IngestError::Bind { address, source })?;
    let tls_opt = tls::load_server_config(&config.http)?.map(tokio_rustls::TlsAcceptor::from);
    let limits = server::ConnectionLimits::from_config(&config.http);
    warn_if_file_descriptors_short(limits.max_connections);
    {
        let shutdown = shutdown.clone();
        let state = Arc::clone(&state);
        supervisor.spawn("http_server", async move {
            let closing = async {
                shutdown.cancelled().await;
                state.shutting_down.store(true, Ordering::Relaxed);
                tracing::info!("HTTP listener closing; draining requests in flight");
            };
            let serving = server::serve(listener, tls_opt, router, limits, metrics, shutdown.clone());
            let (_, served) = tokio::join!(closing, serving);
            served.map_err(IngestError::Serve)
        });
    }
    tracing::info!(%local_addr, tls = config.http.tls_cert_path.is_some(),
        device_certificates = config.http.tls_client_ca_path.is_some(), mqtt = config.mqtt.enabled, "ingest ready");
    Ok(RunningIngest {
        local_addr,
        tracker,
        supervisor,
        producer,
        grace_period: Duration::from_millis(config.shutdown.grace_period_ms),
    })
}
