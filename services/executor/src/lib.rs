//! Sluice executor: runs SQL jobs, submitted as files to the jobs topic, over the committed
//! Parquet partitions with DataFusion; each event-time window once, when its data is complete.
//! docs/jobs.md is the user's guide; docs/ARCHITECTURE.md says how replicas share the work.

mod attempt;
pub mod config;
mod context;
mod definitions;
pub mod distributed;
mod job_auth;
mod metrics;
mod publisher;
mod run_error;
mod run_slots;
pub mod runs;
pub mod scheduler;
pub mod validation_markers;
mod window_step;

// The job contract and the query layer live in shared crates (the CLI uses them without the
// service); re-exported under their old paths for the tests and benchmarks that name them.
pub use sluice_jobs::{audit, catch_up, cron, events, job, signing};
use sluice_query::result_types;
pub use sluice_query::{catalog, engine, limits, plan_stats, sql_depth, tables, window_read};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_clock::SystemClock;
use sluice_health::Readiness;
use sluice_kafka::{KafkaError, ensure_topics};
use sluice_shutdown::CancellationToken;
use tokio::task::JoinHandle;

use crate::scheduler::Scheduler;

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
    #[error("the scheduling loop panicked: {message}")]
    LoopPanicked { message: String },
}

/// The catalog a configuration describes: the lake's store, the stream schemas, the reference
/// tables, and the Ballista cluster where one is configured.
pub fn open_catalog(config: &ExecutorConfig) -> Result<Catalog, ExecutorError> {
    let catalog = sluice_query::open_catalog(
        &config.schemas,
        &config.object_store,
        &config.tables,
        &config.query,
        &config.encryption,
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
) -> Result<ValidatedJob, sluice_query::ValidationError> {
    sluice_query::validate_job(catalog, text, key_opt, catalog.remote_engine().is_some()).await
}

/// A started executor: its loop runs until `shutdown` is cancelled or it fails.
#[derive(Debug)]
pub struct RunningExecutor {
    task: JoinHandle<Result<(), SchedulerError>>,
    readiness: Readiness,
    health_address_opt: Option<SocketAddr>,
    shutdown: CancellationToken,
}

impl RunningExecutor {
    /// Waits until the loop stopped and the attempts it ran finished or were stopped at the end
    /// of the grace period; returns why it stopped if not for `shutdown`. A loop that fails
    /// cancels `shutdown`, so the health endpoints stop with it.
    pub async fn wait(self) -> Result<(), ExecutorError> {
        match self.task.await {
            Ok(result) => Ok(result?),
            Err(join_error) => {
                self.readiness.set(false);
                self.shutdown.cancel();
                Err(ExecutorError::LoopPanicked { message: join_error.to_string() })
            }
        }
    }

    /// Where `/healthz` and `/readyz` are served (`health.listen_address`, resolved), if on.
    pub fn health_address(&self) -> Option<SocketAddr> {
        self.health_address_opt
    }

    /// What `/readyz` answers: the topics are set up and the loop runs.
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }
}

/// Runs the executor until `shutdown` is cancelled and its runs finished or their grace ran out.
pub async fn run(config: ExecutorConfig, shutdown: CancellationToken) -> Result<(), ExecutorError> {
    start(config, shutdown).await?.wait().await
}

/// Opens the catalog, serves the health endpoints, sets up the topics and the Kafka clients,
/// and starts the loop on the wall clock.
pub async fn start(
    config: ExecutorConfig,
    shutdown: CancellationToken,
) -> Result<RunningExecutor, ExecutorError> {
    let catalog = open_catalog(&config)?;
    let readiness = Readiness::default();
    let health_address_opt = sluice_health::serve(&config.health, readiness.clone(), shutdown.clone())
        .await
        .map_err(ExecutorError::Health)?;
    let mut specs = vec![config.kafka.jobs_topic_spec()];
    specs.extend(config.kafka.job_event_topic_specs());
    ensure_topics(&config.kafka, &specs, TOPIC_SETUP_TIMEOUT).await?;
    let scheduler = Scheduler::new(config, catalog, Arc::new(SystemClock), shutdown.clone())?;
    readiness.set(true);
    let task = tokio::spawn({
        let readiness = readiness.clone();
        async move {
            let result = scheduler.run().await;
            readiness.set(false);
            result
        }
    });
    Ok(RunningExecutor { task, readiness, health_address_opt, shutdown })
}
