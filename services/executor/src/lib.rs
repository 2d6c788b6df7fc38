//! Sluice executor: runs SQL jobs, submitted as files to the jobs topic, over the committed
//! Parquet partitions with DataFusion; each event-time window once, when its data is complete.
//! docs/jobs.md is the user's guide; docs/ARCHITECTURE.md says how replicas share the work.

pub mod config;
pub mod distributed;
pub mod runs;
pub mod scheduler;
pub mod validation_markers;
mod window_step;

// The job contract and the query layer live in shared crates (the CLI uses them without the
// service); re-exported under their old paths for the tests and benchmarks that name them.
pub use sluice_jobs::{catch_up, cron, events, job};
use sluice_query::result_types;
pub use sluice_query::{catalog, engine, limits, plan_stats, sql_depth, tables, window_read};

use std::sync::Arc;
use std::time::Duration;

use sluice_kafka::{KafkaError, ensure_topics};
use sluice_shutdown::CancellationToken;

pub use crate::catalog::{Catalog, QueryError, Scope, Snapshot, plan_query};
pub use crate::config::ExecutorConfig;
pub use crate::job::JobDefinition;
pub use crate::scheduler::SchedulerError;
pub use sluice_query::ValidatedJob;

const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Catalog(#[from] sluice_query::OpenCatalogError),
    #[error("failed to set up Kafka topics")]
    Topics(#[from] KafkaError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("failed to serve /healthz and /readyz")]
    Health(#[source] std::io::Error),
}

/// The catalog a configuration describes: the lake's store, the stream schemas, the reference
/// tables, and the Ballista cluster where one is configured.
pub fn open_catalog(config: &ExecutorConfig) -> Result<Catalog, ExecutorError> {
    let catalog = sluice_query::open_catalog(
        &config.schemas,
        &config.object_store,
        &config.tables,
        &config.query,
        config.executor.max_timeout_ms,
    )?;
    Ok(catalog.with_remote_engine(
        distributed::BallistaClient::from_config(&config.ballista)
            .map(|client| Arc::new(client) as Arc<dyn engine::RemoteEngine>),
    ))
}

/// Checks a job against the catalog as this executor would: `engine: ballista` only where the
/// catalog has the cluster.
pub async fn validate_job(
    catalog: &Catalog,
    text: &str,
    key_opt: Option<&str>,
) -> Result<ValidatedJob, String> {
    sluice_query::validate_job(catalog, text, key_opt, catalog.remote_engine().is_some()).await
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
