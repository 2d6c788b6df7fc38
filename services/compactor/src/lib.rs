//! Sluice compactor: turns the stream topics into an event-time-partitioned Parquet lake in
//! object storage, exactly once. docs/delivery-semantics.md explains how.

pub mod config;
mod consumer;
mod merge;
mod metrics;
mod parquet_file;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use sluice_kafka::{BatchProducer, KafkaError, TopicSpec, TopicStatus, ensure_topics};
use sluice_lake::{Lake, StoreError};
use sluice_schema::{DecoderSetupError, EVENT_TIME_FIELD, KEY_FIELD, SchemaError, SchemaRegistry};
use sluice_shutdown::CancellationToken;
use tokio::runtime::Handle;

pub use crate::config::CompactorConfig;
use crate::consumer::{CompactorLoop, RebalanceContext, StreamInfo};
pub use crate::consumer::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER, LoopError};
pub use crate::merge::MergeError;
pub use crate::parquet_file::{EncodeError, writer_properties};

const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum CompactorError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("stream '{stream}' in compactor.streams has no schema")]
    UnknownStream { stream: String },
    #[error("failed to open the object store")]
    Store(#[from] StoreError),
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
    #[error("the consumer loop failed")]
    Loop(#[from] LoopError),
    #[error("the consumer loop panicked")]
    Panicked,
    #[error("failed to serve /healthz and /readyz")]
    Health(#[source] std::io::Error),
}

pub type Result<T, E = CompactorError> = std::result::Result<T, E>;

/// A started compactor.
#[derive(Debug)]
pub struct RunningCompactor {
    worker: tokio::task::JoinHandle<Result<()>>,
    janitor: tokio::task::JoinHandle<()>,
    watermark_publisher: tokio::task::JoinHandle<()>,
    merger_opt: Option<tokio::task::JoinHandle<()>>,
}

impl RunningCompactor {
    /// Waits until the loop stopped and flushed (after `shutdown` was cancelled, or on failure).
    pub async fn wait(self) -> Result<()> {
        let result = self.worker.await.unwrap_or(Err(CompactorError::Panicked));
        // The loop cancels the token when it fails, so the janitor ends either way.
        let _ = self.janitor.await;
        let _ = self.watermark_publisher.await;
        if let Some(merger) = self.merger_opt {
            let _ = merger.await;
        }
        result
    }
}

/// Computes each stream's watermark from the commit records and publishes it, every interval.
async fn run_watermark_publisher(
    lake: Lake,
    partitions_by_stream: Vec<(String, i32)>,
    config: config::WatermarkConfig,
    metrics: Arc<metrics::CompactorMetrics>,
    shutdown: CancellationToken,
) {
    let allowed_lateness_micros =
        i64::try_from(config.allowed_lateness_ms).unwrap_or(i64::MAX / 1_000) * 1_000;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(config.interval_ms)) => {}
        }
        for (stream, num_partitions) in &partitions_by_stream {
            let watermark_micros =
                match lake.watermark(stream, *num_partitions, allowed_lateness_micros).await {
                    Ok(Some(watermark_micros)) => watermark_micros,
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(stream, %error, "failed to compute the watermark");
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
                Err(error) => tracing::warn!(stream, %error, "failed to publish the watermark"),
            }
        }
    }
}

/// Removes staged files of flushes that never committed, every `interval`.
async fn run_janitor(
    lake: Lake,
    streams: Vec<String>,
    config: config::JanitorConfig,
    shutdown: CancellationToken,
) {
    let min_age = Duration::from_millis(config.min_age_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(config.interval_ms)) => {}
        }
        for stream in &streams {
            match lake.remove_orphaned_staging(stream, min_age).await {
                Ok(0) => {}
                Ok(num_deleted) => tracing::info!(
                    stream,
                    num_deleted,
                    "removed staged files of flushes that never committed"
                ),
                Err(error) => tracing::warn!(stream, %error, "janitor failed; trying again later"),
            }
        }
    }
}

/// Runs the compactor until `shutdown` is cancelled and buffered data is committed.
pub async fn run(config: CompactorConfig, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}

pub async fn start(config: CompactorConfig, shutdown: CancellationToken) -> Result<RunningCompactor> {
    let schemas = SchemaRegistry::load_directory(&config.schemas.directory)?;
    let stream_names: Vec<String> = if config.compactor.streams.is_empty() {
        schemas.stream_names().map(str::to_string).collect()
    } else {
        config.compactor.streams.clone()
    };
    let lake = sluice_lake::open_lake(&config.object_store)?;
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
            writer_properties: parquet_file::writer_properties(
                &config.parquet,
                key_column,
                event_time_column,
            )?,
        };
        // Every assigned partition builds its own decoder: find a schema arrow-avro cannot decode now.
        info.decoder()?;
        merge_targets.push(merge::MergeTarget {
            stream: info.stream.clone(),
            granularity: info.granularity,
            writer_properties: info.writer_properties.clone(),
        });
        topic_specs.push(config.kafka.stream_topic_spec(stream));
        topic_specs.push(config.kafka.dead_letter_topic_spec(stream));
        streams.insert(info.topic.clone(), Arc::new(info));
    }
    let readiness = sluice_health::Readiness::default();
    sluice_health::serve(&config.health, readiness.clone(), shutdown.clone())
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
    let (context, events_rx) =
        RebalanceContext::new(lake.clone(), handle.clone(), streams_by_topic, Arc::clone(&metrics));
    let mut consumer_config = config.kafka.consumer_config(&config.compactor.group_id);
    // Defaults for what the passthrough map did not set. librdkafka 2.x pauses fetching a
    // partition for fetch.queue.backoff.ms (1 s) whenever its local queue is full; a consumer
    // that decodes and writes is slower than fetching, so it would starve for a second each time.
    config.kafka.set_defaults(
        &mut consumer_config,
        [
            ("auto.offset.reset", "earliest"),
            ("fetch.queue.backoff.ms", "10"),
            ("statistics.interval.ms", "10000"),
        ],
    );
    let consumer: BaseConsumer<RebalanceContext> = consumer_config
        .create_with_context(context)
        .map_err(|source| CompactorError::Client { role: "consumer", source })?;
    let dead_letters = BatchProducer::new(&config.kafka.producer_config())
        .map_err(|source| CompactorError::Client { role: "dead-letter producer", source })?;
    let writer_id = if config.compactor.instance_id.is_empty() {
        format!("compactor-{}", uuid::Uuid::new_v4().simple())
    } else {
        config.compactor.instance_id.clone()
    };
    let merger_opt = config.merge.enabled.then(|| {
        tokio::spawn(merge::run_merger(
            lake.clone(),
            merge_targets,
            config.merge.clone(),
            writer_id.clone(),
            shutdown.clone(),
        ))
    });
    let watermark_publisher = tokio::spawn(run_watermark_publisher(
        lake.clone(),
        partitions_by_stream,
        config.watermark.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    let janitor = tokio::spawn(run_janitor(
        lake.clone(),
        stream_names.clone(),
        config.janitor.clone(),
        shutdown.clone(),
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
        writer_id,
        shutdown: shutdown.clone(),
    };
    // The loop blocks on Kafka and calls the store through the runtime handle: it lives on a
    // blocking thread. A failed loop cancels the shutdown token so the whole service stops.
    readiness.set(true);
    let worker = tokio::task::spawn_blocking(move || {
        let result = compactor_loop.run().map_err(CompactorError::from);
        readiness.set(false);
        if result.is_err() {
            shutdown.cancel();
        }
        result
    });
    Ok(RunningCompactor { worker, janitor, watermark_publisher, merger_opt })
}
