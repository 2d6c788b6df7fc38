//! Sluice compactor: turns the stream topics into an event-time-partitioned Parquet lake in
//! object storage, exactly once. docs/delivery-semantics.md explains how.

mod beyond_end;
mod buffer;
pub mod config;
mod consumer;
mod dead_letter;
mod fault;
mod flush;
mod flush_policy;
mod flush_pool;
mod janitor;
mod merge;
mod metrics;
mod parquet_file;
mod rebalance;
mod reset;
mod supervision;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use sluice_kafka::{BatchProducer, KafkaError, TopicSpec, TopicStatus, ensure_topics};
use sluice_lake::encryption::{EncryptionError, LakeEncryption};
use sluice_lake::{Lake, StoreError};
use sluice_schema::{DecoderSetupError, EVENT_TIME_FIELD, KEY_FIELD, SchemaError, SchemaRegistry};
use sluice_shutdown::CancellationToken;
use tokio::runtime::Handle;

pub use crate::config::CompactorConfig;
pub use crate::consumer::LoopError;
use crate::consumer::{CompactorLoop, StreamInfo};
pub use crate::dead_letter::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER};
use crate::flush_pool::FlushesInFlight;
use crate::janitor::JanitorStreams;
pub use crate::merge::MergeError;
use crate::parquet_file::StreamEncryption;
pub use crate::parquet_file::{EncodeError, writer_properties};
use crate::rebalance::RebalanceContext;
pub use crate::reset::{ResetError, ResetOutcome, reset_position};
use crate::supervision::{CompactorHealth, spawn_supervised, supervise};

const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum CompactorError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("stream '{stream}' in compactor.streams has no schema")]
    UnknownStream { stream: String },
    #[error("failed to open the object store")]
    Store(#[from] StoreError),
    #[error("failed to set up the Delta table of stream '{stream}'")]
    Table {
        stream: String,
        #[source]
        source: Box<sluice_lake::LakeError>,
    },
    #[error("failed to set up Kafka topics")]
    Topics(#[from] KafkaError),
    #[error("failed to create the Kafka {role}")]
    Client {
        role: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot decode a stream")]
    Decoder(#[from] DecoderSetupError),
    #[error("invalid Parquet settings")]
    Parquet(#[from] EncodeError),
    #[error("failed to set up column encryption")]
    Encryption(#[from] EncryptionError),
    #[error("the consumer loop failed")]
    Loop(#[from] LoopError),
    #[error("the small-file merge failed")]
    Merge(#[from] MergeError),
    #[error("the {task} task panicked: {message}")]
    TaskPanicked { task: &'static str, message: String },
    #[error("invalid fault point setting")]
    FaultPoint(#[from] fault::InvalidFaultPoint),
    #[error("failed to serve /healthz and /readyz")]
    Health(#[source] std::io::Error),
}

pub type Result<T, E = CompactorError> = std::result::Result<T, E>;

/// The compactor's tasks, as `sluice_compactor_task_failures` labels them.
pub(crate) const TASK_NAMES: [&str; 4] = ["consumer", "merge", "watermark", "janitor"];

/// A started compactor.
#[derive(Debug)]
pub struct RunningCompactor {
    /// Supervised tasks, the consumer loop first.
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    health: CompactorHealth,
    health_address_opt: Option<SocketAddr>,
    janitor_streams: JanitorStreams,
    metrics: Arc<metrics::CompactorMetrics>,
}

impl RunningCompactor {
    /// Waits until every task stopped and the loop flushed (after `shutdown` was cancelled, or
    /// after a task failed, which cancels it); returns the first failure.
    pub async fn wait(self) -> Result<()> {
        let mut first_error_opt = None;
        for task in self.tasks {
            let outcome = task.await.unwrap_or_else(|join_error| {
                Err(CompactorError::TaskPanicked { task: "supervisor", message: join_error.to_string() })
            });
            if let Err(error) = outcome {
                first_error_opt.get_or_insert(error);
            }
        }
        first_error_opt.map_or(Ok(()), Err)
    }

    /// Where `/healthz` and `/readyz` are served (`health.listen_address`, resolved), if on.
    pub fn health_address(&self) -> Option<SocketAddr> {
        self.health_address_opt
    }

    /// What `/readyz` answers: the instance owns its share of the partitions, each can make
    /// progress, and no task failed.
    pub fn is_ready(&self) -> bool {
        self.health.is_ready()
    }

    /// The (topic, partition)s paused because the lake's committed position is beyond the
    /// broker's end (docs/operations.md, "Broker lost a partition's records").
    pub fn partitions_beyond_end(&self) -> Vec<(String, i32)> {
        self.health.partitions_beyond_end()
    }

    /// The streams whose tables this instance's janitor keeps: those whose Kafka partition 0
    /// the group assigned here.
    pub fn janitor_streams(&self) -> Vec<String> {
        self.janitor_streams.snapshot()
    }

    /// Records that partitions revoked from this instance held uncommitted (their new owners
    /// read them again from the committed positions); also the metric
    /// `sluice_compactor_records_revoked_uncommitted`.
    pub fn revoked_uncommitted_records(&self) -> u64 {
        self.metrics.revoked_uncommitted_total()
    }
}

/// Computes each stream's watermark from its table's log and publishes it as a cache for the
/// executor, every interval.
async fn run_watermark_publisher(
    lake: Lake,
    partitions_by_stream: Vec<(String, i32)>,
    config: config::WatermarkConfig,
    metrics: Arc<metrics::CompactorMetrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let allowed_lateness_micros = consumer::millis_to_micros(config.allowed_lateness_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(config.interval_ms)) => {}
        }
        for (stream, num_partitions) in &partitions_by_stream {
            let watermark_micros = match lake
                .watermark(stream, *num_partitions, allowed_lateness_micros)
                .await
            {
                Ok(Some(watermark_micros)) => watermark_micros,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(stream, error = %sluice_errors::Chain(&error), "failed to compute the watermark");
                    continue;
                }
            };
            let published = sluice_lake::PublishedWatermark {
                stream: stream.clone(),
                watermark_micros,
                allowed_lateness_micros,
                num_partitions: *num_partitions,
                computed_at_micros: consumer::now_micros(),
            };
            match lake.publish_watermark(&published).await {
                Ok(()) => metrics.record_watermark(stream, watermark_micros),
                Err(error) => {
                    tracing::warn!(stream, error = %sluice_errors::Chain(&error), "failed to publish the watermark")
                }
            }
        }
    }
}

/// Runs the compactor until `shutdown` is cancelled and buffered data is committed.
pub async fn run(config: CompactorConfig, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}

pub async fn start(config: CompactorConfig, shutdown: CancellationToken) -> Result<RunningCompactor> {
    fault::arm_from_environment()?;
    let schemas = SchemaRegistry::load_directory(&config.schemas.directory)?;
    let stream_names: Vec<String> = if config.compactor.streams.is_empty() {
        schemas.stream_names().map(str::to_string).collect()
    } else {
        config.compactor.streams.clone()
    };
    let lake = sluice_lake::open_lake(&config.object_store)?;
    let encryption_opt = LakeEncryption::from_config(&config.encryption, &schemas)?;
    let topic_names = config.kafka.topic_names();
    let mut streams = HashMap::new();
    let mut merge_targets = Vec::new();
    let mut topic_specs: Vec<TopicSpec> = Vec::new();
    for stream in &stream_names {
        let reader =
            schemas.stream(stream).ok_or_else(|| CompactorError::UnknownStream { stream: stream.clone() })?;
        let key_column = reader.fields.iter().position(|field| field.name == KEY_FIELD).unwrap_or(0);
        let event_time_column =
            reader.fields.iter().position(|field| field.name == EVENT_TIME_FIELD).unwrap_or(1);
        let encryption_opt = encryption_opt
            .as_ref()
            .filter(|encryption| !encryption.encrypted_columns(stream).is_empty())
            .map(|encryption| StreamEncryption { lake: Arc::clone(encryption), stream: stream.clone() });
        let mut writer_properties =
            parquet_file::writer_properties(&config.parquet, key_column, event_time_column)?;
        if let Some(encryption) = &encryption_opt {
            writer_properties = encryption.writer_properties(writer_properties);
        }
        let info = StreamInfo {
            stream: stream.clone(),
            topic: topic_names.stream(stream),
            dead_letter_topic: topic_names.dead_letter(stream),
            reader: Arc::clone(reader),
            writers: schemas.writers_of(stream).cloned().collect(),
            granularity: config
                .compactor
                .granularity
                .get(stream)
                .copied()
                .unwrap_or(config.compactor.default_granularity),
            writer_properties,
            encryption_opt,
        };
        // Every assigned partition builds its own decoder: find a schema arrow-avro cannot decode now.
        info.decoder()?;
        let partition_columns = info.granularity.partition_columns();
        let settings = sluice_lake::TableSettings {
            checkpoint_interval: config.table.checkpoint_interval,
            log_retention_ms: config.table.log_retention_ms,
        };
        lake.ensure_table(stream, &sluice_schema::to_arrow_schema(reader), partition_columns, settings)
            .await
            .map_err(|source| CompactorError::Table { stream: stream.clone(), source: Box::new(source) })?;
        merge_targets.push(merge::MergeTarget {
            stream: info.stream.clone(),
            granularity: info.granularity,
            writer_properties: info.writer_properties.clone(),
            encryption_opt: info.encryption_opt.clone(),
        });
        topic_specs.push(config.kafka.stream_topic_spec(stream));
        topic_specs.push(config.kafka.dead_letter_topic_spec(stream));
        streams.insert(info.topic.clone(), Arc::new(info));
    }
    let readiness = sluice_health::Readiness::default();
    let health = CompactorHealth::new(readiness.clone());
    let health_address_opt = sluice_health::serve(&config.health, readiness, shutdown.clone())
        .await
        .map_err(CompactorError::Health)?;
    let topic_statuses = ensure_topics(&config.kafka, &topic_specs, TOPIC_SETUP_TIMEOUT).await?;
    let partitions_by_stream: Vec<(String, i32)> = streams
        .values()
        .map(|info| {
            let num_partitions = topic_statuses
                .iter()
                .find(|(topic, _)| *topic == info.topic)
                .and_then(|(_, status)| match status {
                    TopicStatus::Existing { partitions } if *partitions > 0 => {
                        i32::try_from(*partitions).ok()
                    }
                    _ => None,
                })
                .unwrap_or(config.kafka.topics.partitions);
            (info.stream.clone(), num_partitions)
        })
        .collect();

    let handle = Handle::current();
    let streams_by_topic = streams.iter().map(|(topic, info)| (topic.clone(), info.stream.clone())).collect();
    let metrics = Arc::new(metrics::CompactorMetrics::new());
    metrics.start_counters(streams.values().map(|info| info.stream.as_str()));
    let janitor_streams = JanitorStreams::default();
    let flushes_in_flight = FlushesInFlight::default();
    let (context, events_rx) = RebalanceContext::new(
        lake.clone(),
        handle.clone(),
        streams_by_topic,
        Arc::clone(&metrics),
        janitor_streams.clone(),
        flushes_in_flight.clone(),
        rebalance::revoke_flush_wait(config.kafka.client.0.get("max.poll.interval.ms").map(String::as_str)),
    );
    let consumer: BaseConsumer<RebalanceContext> = config
        .consumer_client_config()
        .create_with_context(context)
        .map_err(|source| CompactorError::Client { role: "consumer", source })?;
    let dead_letters = BatchProducer::new(&config.kafka.producer_config())
        .map_err(|source| CompactorError::Client { role: "dead-letter producer", source })?;
    let writer_id = if config.compactor.instance_id.is_empty() {
        format!("compactor-{}", uuid::Uuid::new_v4().simple())
    } else {
        config.compactor.instance_id.clone()
    };
    let supervised =
        |task: &'static str, future: std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>| {
            spawn_supervised(task, future, health.clone(), Arc::clone(&metrics), shutdown.clone())
        };
    let mut background = Vec::new();
    if config.merge.enabled {
        let merger = merge::run_merger(
            lake.clone(),
            merge_targets,
            config.merge.clone(),
            writer_id.clone(),
            shutdown.clone(),
        );
        background.push(supervised("merge", Box::pin(async move { Ok(merger.await?) })));
    }
    background.push(supervised(
        "watermark",
        Box::pin(run_watermark_publisher(
            lake.clone(),
            partitions_by_stream,
            config.watermark.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        )),
    ));
    background.push(supervised(
        "janitor",
        Box::pin(janitor::run_janitor(
            lake.clone(),
            janitor_streams.clone(),
            config.janitor.clone(),
            shutdown.clone(),
        )),
    ));
    let compactor_loop = CompactorLoop {
        consumer,
        events_rx,
        handle,
        lake,
        streams,
        flush: config.flush.clone(),
        dead_letters,
        metrics: Arc::clone(&metrics),
        health: health.clone(),
        writer_id,
        flushes_in_flight,
        shutdown: shutdown.clone(),
    };
    // The loop blocks on Kafka and calls the store through the runtime handle: it lives on a
    // blocking thread, and starts its flush workers there. It reports readiness itself once the
    // group assigned it partitions.
    let worker = tokio::task::spawn_blocking(move || compactor_loop.run().map_err(CompactorError::from));
    let mut tasks = vec![supervise("consumer", worker, health.clone(), Arc::clone(&metrics), shutdown)];
    tasks.extend(background);
    Ok(RunningCompactor { tasks, health, health_address_opt, janitor_streams, metrics })
}
