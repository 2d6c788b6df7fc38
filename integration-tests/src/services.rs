//! The Sluice services started in-process against the test's servers, and their test
//! configurations.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use sluice_ingest::{IngestConfig, RunningIngest};
use sluice_shutdown::CancellationToken;

use crate::{Broker, repo_root, unique_suffix};

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

    /// The streams whose tables this instance's janitor keeps.
    pub fn janitor_streams(&self) -> Vec<String> {
        self.running_opt.as_ref().map(|running| running.janitor_streams()).unwrap_or_default()
    }

    /// Whether the instance owns its share of the partitions and each can make progress.
    pub fn is_ready(&self) -> bool {
        self.running_opt.as_ref().is_some_and(|running| running.is_ready())
    }

    /// Records that partitions revoked from this instance held uncommitted.
    pub fn revoked_uncommitted_records(&self) -> u64 {
        self.running_opt.as_ref().map_or(0, |running| running.revoked_uncommitted_records())
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
