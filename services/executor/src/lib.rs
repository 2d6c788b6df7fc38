//! Sluice executor: runs SQL jobs, submitted as files to the jobs topic, over the committed
//! Parquet partitions with DataFusion; each event-time window once, when its data is complete.
//! docs/jobs.md is the user's guide; docs/ARCHITECTURE.md says how replicas share the work.

pub mod catalog;
pub mod catch_up;
pub mod config;
pub mod cron;
pub mod distributed;
pub mod events;
pub mod job;
mod join_order;
pub mod limits;
pub mod runs;
pub mod scheduler;
pub mod sql_depth;
pub mod validation_markers;
mod window_bounds;

use std::sync::Arc;
use std::time::Duration;

use sluice_kafka::{KafkaError, ensure_topics};
use sluice_lake::{StoreError, open_store};
use sluice_schema::{SchemaError, SchemaRegistry};
use sluice_shutdown::CancellationToken;

pub use crate::catalog::{Catalog, QueryError, Scope, Snapshot, plan_query};
pub use crate::config::ExecutorConfig;
pub use crate::job::JobDefinition;
pub use crate::scheduler::{SchedulerError, ValidatedJob, validate_job};

const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("failed to open the object store")]
    Store(#[from] StoreError),
    #[error("failed to set up Kafka topics")]
    Topics(#[from] KafkaError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("failed to serve /healthz and /readyz")]
    Health(#[source] std::io::Error),
}

/// The catalog a configuration describes: the lake's store, the stream schemas, the reference
/// tables. The CLI builds the same one to validate jobs and run queries.
pub fn open_catalog(config: &ExecutorConfig) -> Result<Catalog, ExecutorError> {
    let registry = Arc::new(SchemaRegistry::load_directory(&config.schemas.directory)?);
    let (store, root) = open_store(&config.object_store)?;
    Ok(Catalog::new(store, root, registry, config.tables.reference.clone())
        .with_target_partitions(config.query.target_partitions)
        .with_memory_limit(config.query.memory_limit_bytes)
        .with_run_limits(config.query.run_limits(config.executor.max_timeout_ms))
        .with_ballista(distributed::BallistaClient::from_config(&config.ballista)))
}

/// Runs the executor until `shutdown` is cancelled.
pub async fn run(config: ExecutorConfig, shutdown: CancellationToken) -> Result<(), ExecutorError> {
    let catalog = open_catalog(&config)?;
    let readiness = sluice_health::Readiness::default();
    sluice_health::serve(&config.health, readiness.clone(), shutdown.clone())
        .await
        .map_err(ExecutorError::Health)?;
    let mut specs = vec![config.kafka.jobs_topic_spec()];
    specs.extend(config.kafka.job_event_topic_specs());
    ensure_topics(&config.kafka, &specs, TOPIC_SETUP_TIMEOUT).await?;
    readiness.set(true);
    let result = scheduler::run(config, catalog, shutdown).await;
    readiness.set(false);
    result?;
    Ok(())
}
