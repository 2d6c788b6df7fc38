//! Sluice ingest: takes device readings over HTTP and MQTT, validates them against the stream
//! schemas and produces them to Kafka. An answer of success means the broker acknowledged every
//! record of the request (`acks=all`, idempotent producer).

pub mod config;
mod metrics;
mod producer;
mod sink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_device_api::{DeviceApiError, DeviceApiMetrics, Supervisor};
use sluice_kafka::{KafkaError, TopicSpec, ensure_topics};
use sluice_schema::{SchemaError, SchemaRegistry};
use sluice_shutdown::{CancellationToken, TaskTracker};

pub use crate::config::IngestConfig;
pub use crate::producer::{
    DEAD_LETTER_ORIGINAL_SIZE_HEADER, DEAD_LETTER_REASON_HEADER, DEAD_LETTER_RESERVED_BYTES,
    DEAD_LETTER_SOURCE_HEADER, EDGE_FLOOR_HEADER, EDGE_ID_HEADER, EDGE_POSITION_HEADER, INGEST_TIME_HEADER,
    SCHEMA_FINGERPRINT_HEADER,
};
pub use crate::producer::{ProduceError, producer_client_config};
pub use sluice_device_api::{RECORD_OVERHEAD_BYTES, TlsError};

const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("failed to set up the Kafka producer")]
    Producer(#[source] producer::ProduceError),
    #[error("failed to set up Kafka topics")]
    Topics(#[from] KafkaError),
    #[error("failed to start the device API")]
    DeviceApi(#[from] DeviceApiError),
    #[error("the background task {task} failed: {cause}")]
    TaskFailed { task: &'static str, cause: String },
}

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// A started ingest service.
#[derive(Debug)]
pub struct RunningIngest {
    local_addr: SocketAddr,
    tracker: TaskTracker,
    supervisor: Supervisor,
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

/// Runs the service until `shutdown` is cancelled and shutdown completed.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Loads schemas, sets up Kafka, binds the listener and starts serving.
pub async fn start(config: IngestConfig, shutdown: CancellationToken) -> Result<RunningIngest> {
    let schemas = SchemaRegistry::load_directory(&config.schemas.directory)?;
    let metrics = Arc::new(metrics::ProducerMetrics::new());
    let producer = producer::RecordProducer::new(&config.kafka, &config.producer, metrics)
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
    let device_api_metrics = Arc::new(DeviceApiMetrics::new("ingest"));
    let supervisor = Supervisor::new(tracker.clone(), shutdown.clone(), Arc::clone(&device_api_metrics));
    producer.spawn_health_probe(health_interval, topic_setup, &supervisor, shutdown.clone());
    let sink = sink::KafkaSink { producer: producer.clone(), topics: config.kafka.topic_names() };
    let local_addr = sluice_device_api::start(
        config.device_api(),
        schemas,
        sink,
        device_api_metrics,
        &supervisor,
        shutdown.clone(),
    )
    .await?;
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
