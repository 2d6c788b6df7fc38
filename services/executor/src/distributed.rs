//! Windows bigger than one machine: a job with `-- engine: ballista` is planned by the replica
//! that claimed the window, exactly as a local run (same snapshot, same committed files, same
//! partition pruning), and its physical plan is then executed by a Ballista cluster whose
//! workers are `sluice-executor ballista-worker` processes. docs/distributed-queries.md says
//! how to deploy one.
//!
//! The plan is shipped as a physical plan on purpose: the list of files it scans is the
//! snapshot's committed files, fixed at planning time, so the scheduler and the workers never
//! list the store themselves and cannot see staged files or the inputs of a finished merge.

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_core::execution_plans::execute_physical_plan;
use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::BallistaPhysicalExtensionCodec;
use ballista_core::utils::default_session_builder;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::SessionBuilder;
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::SessionConfig;
use datafusion_proto::protobuf::PhysicalPlanNode;
use object_store::ObjectStore;

use crate::catalog::register_worker_stores;
use crate::config::BallistaSection;
use crate::engine::RemoteEngine;

/// With a timeout set, Ballista 55's worker retries the scheduler connection instead of failing
/// at the first refusal. (Its deadline check measures an `Instant` just created, so in practice
/// it retries until the scheduler answers; a worker waiting for its scheduler is what we want.)
const SCHEDULER_CONNECT_RETRY_SECONDS: u16 = 300;

#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error("{key} '{value}' is not valid: {reason}")]
    Config { key: &'static str, value: String, reason: String },
    #[error("the Ballista {role} stopped: {message}")]
    Process { role: &'static str, message: String },
}

/// Where runs with `engine: ballista` are sent.
#[derive(Debug, Clone)]
pub struct BallistaClient {
    scheduler_url: String,
}

impl BallistaClient {
    /// `None` when no scheduler is configured: such jobs are then refused at submission.
    pub fn from_config(section: &BallistaSection) -> Option<Self> {
        let url = section.scheduler_url.trim();
        (!url.is_empty()).then(|| Self { scheduler_url: url.trim_end_matches('/').to_string() })
    }

    pub fn scheduler_url(&self) -> &str {
        &self.scheduler_url
    }
}

/// Runs a plan on the cluster; its output streams back as the workers produce it. The session
/// config is the one the plan was made with: its DataFusion settings travel with the job to the
/// workers.
#[async_trait::async_trait]
impl RemoteEngine for BallistaClient {
    async fn execute_stream(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        session_config: &SessionConfig,
    ) -> Result<SendableRecordBatchStream, DataFusionError> {
        let config = session_config.clone().upgrade_for_ballista();
        execute_physical_plan::<PhysicalPlanNode>(
            self.scheduler_url.clone(),
            &config.ballista_config(),
            plan,
            &BallistaPhysicalExtensionCodec::default(),
            uuid::Uuid::new_v4().to_string(),
            config,
        )
        .await
    }
}

/// Runs a Ballista scheduler on `section.scheduler_bind` until it fails or the process ends.
/// Its state is in memory: a restarted scheduler forgets running queries, whose windows then
/// fail their attempt and are retried like any other failure. It needs the lake's `store` only
/// because decoding a plan resolves the stores its scans name; it reads nothing.
pub async fn run_scheduler(
    section: &BallistaSection,
    store: Arc<dyn ObjectStore>,
) -> Result<(), DistributedError> {
    let address: SocketAddr = section.scheduler_bind.parse().map_err(|error| DistributedError::Config {
        key: "ballista.scheduler_bind",
        value: section.scheduler_bind.clone(),
        reason: format!("{error}"),
    })?;
    let session_builder: SessionBuilder = Arc::new(move |config: SessionConfig| {
        let state = default_session_builder(config)?;
        register_worker_stores(state.runtime_env(), Arc::clone(&store));
        Ok(state)
    });
    let config = SchedulerConfig {
        bind_host: address.ip().to_string(),
        bind_port: address.port(),
        external_host: address.ip().to_string(),
        override_session_builder: Some(session_builder),
        ..SchedulerConfig::default()
    };
    let process = |error: ballista_core::error::BallistaError| DistributedError::Process {
        role: "scheduler",
        message: error.to_string(),
    };
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(process)?;
    ballista_scheduler::scheduler_process::start_server(cluster, address, Arc::new(config))
        .await
        .map_err(process)
}

/// Runs a Ballista worker that reads the lake through `store` until it fails or the process
/// ends. `memory_limit_bytes` (0: none) is shared by the worker's task slots; operators that can
/// spill do so past it.
pub async fn run_worker(
    section: &BallistaSection,
    store: Arc<dyn ObjectStore>,
    memory_limit_bytes: usize,
) -> Result<(), DistributedError> {
    let scheduler = url::Url::parse(&section.scheduler_url).map_err(|error| DistributedError::Config {
        key: "ballista.scheduler_url",
        value: section.scheduler_url.clone(),
        reason: error.to_string(),
    })?;
    let Some(scheduler_host) = scheduler.host_str().map(str::to_string) else {
        return Err(DistributedError::Config {
            key: "ballista.scheduler_url",
            value: section.scheduler_url.clone(),
            reason: "it names no host (for example http://127.0.0.1:50050)".to_string(),
        });
    };
    let work_dir = (!section.worker_work_dir.is_empty()).then(|| section.worker_work_dir.clone());
    let temp_dir = work_dir.clone();
    // Every task gets a runtime that resolves the lake's URLs to the store; the committed-file
    // filtering already happened when the plan was made.
    let runtime_producer = Arc::new(move |_: &SessionConfig| -> Result<Arc<RuntimeEnv>, DataFusionError> {
        let mut builder = RuntimeEnvBuilder::new();
        if let Some(dir) = &temp_dir {
            builder = builder.with_temp_file_path(dir.clone());
        }
        let runtime = builder.build()?;
        register_worker_stores(&runtime, Arc::clone(&store));
        Ok(Arc::new(runtime))
    });
    let advertised = if section.worker_advertise_host.is_empty() {
        None
    } else {
        Some(section.worker_advertise_host.clone())
    };
    let config = ExecutorProcessConfig {
        bind_host: section.worker_bind_host.clone(),
        external_host: advertised,
        port: section.worker_port,
        grpc_port: section.worker_grpc_port,
        scheduler_host,
        scheduler_port: scheduler.port().unwrap_or(50050),
        // Workers often start before the scheduler listens (pods, or processes started
        // together): keep trying to reach it rather than exit.
        scheduler_connect_timeout_seconds: SCHEDULER_CONNECT_RETRY_SECONDS,
        vcores: section.worker_task_slots,
        work_dir,
        memory_pool_size: (memory_limit_bytes > 0).then_some(memory_limit_bytes as u64),
        override_runtime_producer: Some(runtime_producer),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config))
        .await
        .map_err(|error| DistributedError::Process { role: "worker", message: error.to_string() })
}
