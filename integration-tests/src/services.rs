//! The Sluice services started in-process against the test's servers, and their test
//! configurations.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use sluice_edge::{EdgeConfig, RunningEdge};
use sluice_ingest::{IngestConfig, RunningIngest};
use sluice_shutdown::CancellationToken;

use crate::{Broker, repo_root, unique_suffix};

/// An edge gateway configuration for tests: free port, this repo's schemas, the spool in
/// `spool_directory`, auth off.
pub fn edge_config(spool_directory: &Path) -> EdgeConfig {
    let mut config = EdgeConfig::default();
    config.http.listen_address = SocketAddr::from(([127, 0, 0, 1], 0));
    config.schemas.directory = repo_root().join("schemas");
    config.spool.directory = spool_directory.to_path_buf();
    config.auth.enabled = false;
    config.shutdown.grace_period_ms = 5_000;
    config
}

/// edge.toml for the `sluice-edge` binary on `port` with its spool in `spool_directory`, auth
/// off, this repo's schemas, warnings only in the log, `forward` as the `[forward]` section's
/// lines (none: not forwarding) and `spool` as more `[spool]` lines.
pub fn edge_toml(port: u16, spool_directory: &Path, forward: &str, spool: &str) -> String {
    format!(
        "[http]\nlisten_address = \"127.0.0.1:{port}\"\n[auth]\nenabled = false\n\
         [schemas]\ndirectory = \"{}\"\n[spool]\ndirectory = \"{}\"\n{spool}\n\
         [forward]\n{forward}\n[telemetry]\nlog_level = \"warn\"\n",
        repo_root().join("schemas").display(),
        spool_directory.display(),
    )
}

/// A gateway started in-process.
#[derive(Debug)]
pub struct EdgeService {
    pub base_url: String,
    pub config: EdgeConfig,
    service: InProcess<RunningEdge>,
}

impl EdgeService {
    pub async fn start(config: EdgeConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let running = sluice_edge::start(config.clone(), shutdown.clone())
            .await
            .context("the edge gateway failed to start")?;
        let base_url = format!("http://{}", running.local_addr());
        Ok(Self { base_url, config, service: InProcess::new(shutdown, running) })
    }

    pub fn records_url(&self, stream: &str) -> String {
        format!("{}/v1/streams/{stream}/records", self.base_url)
    }

    /// The running gateway (until stopped), for its spool.
    pub fn running(&self) -> Option<&RunningEdge> {
        self.service.running()
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.service.stop(|running| async { Ok(running.wait().await?) }).await
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

/// ingest.toml as the Helm chart renders it for a deployment with bearer tokens
/// (helm/sluice/templates/secret.yaml), pointed at a benchmark's servers on 127.0.0.1: one token,
/// by its SHA-256, that may write `stream`; JSON logs at info; traces and metrics over OTLP/gRPC
/// to `otlp_endpoint`, or none when it is empty (the chart's default). Keys not written here keep
/// the service's defaults.
#[derive(Debug)]
pub struct IngestToml<'a> {
    pub port: u16,
    pub token_sha256: &'a str,
    pub stream: &'a str,
    pub bootstrap_servers: &'a str,
    pub topic_prefix: &'a str,
    pub otlp_endpoint: &'a str,
    /// `kafka.topics.partitions`; `None` keeps the service's default.
    pub partitions_opt: Option<usize>,
}

/// Renders [`IngestToml`].
pub fn ingest_toml(settings: &IngestToml<'_>) -> String {
    let topics = settings
        .partitions_opt
        .map(|partitions| format!("\n[kafka.topics]\npartitions = {partitions}\n"))
        .unwrap_or_default();
    // The delivery timeout and grace period are longer than deployed, so that a slow moment of
    // the shared machine does not fail a request. Neither changes the work done per record.
    format!(
        "[http]\nlisten_address = \"127.0.0.1:{port}\"\n\n\
         [auth]\nenabled = true\n\n\
         [[auth.tokens]]\nname = \"bench-clients\"\ntoken_sha256 = \"{token_sha256}\"\n\
         streams = [\"{stream}\"]\n\n\
         [schemas]\ndirectory = \"{schemas}\"\n\n\
         [kafka]\nbootstrap_servers = \"{bootstrap_servers}\"\ntopic_prefix = \"{topic_prefix}\"\n{topics}\n\
         [producer]\ndelivery_timeout_ms = 30000\n\n\
         [telemetry]\nlog_format = \"json\"\nlog_level = \"info\"\notlp_endpoint = \"{otlp_endpoint}\"\n\
         otlp_protocol = \"grpc\"\n\n\
         [shutdown]\ngrace_period_ms = 40000\n",
        port = settings.port,
        token_sha256 = settings.token_sha256,
        stream = settings.stream,
        schemas = repo_root().join("schemas").display(),
        bootstrap_servers = settings.bootstrap_servers,
        topic_prefix = settings.topic_prefix,
        otlp_endpoint = settings.otlp_endpoint,
    )
}

/// compactor.toml for a benchmark that runs the `sluice-compactor` binary: the shipped defaults
/// with JSON logs at info (as the chart sets them), pointed at the benchmark's broker and a local
/// lake directory, `/healthz` and `/readyz` on 127.0.0.1, and `flush.max_age_ms` when given.
#[derive(Debug)]
pub struct CompactorToml<'a> {
    pub port: u16,
    pub bootstrap_servers: &'a str,
    pub topic_prefix: &'a str,
    pub lake_dir: &'a Path,
    /// `flush.max_age_ms`; `None` keeps the shipped default.
    pub flush_max_age_ms_opt: Option<u64>,
}

/// Renders [`CompactorToml`].
pub fn compactor_toml(settings: &CompactorToml<'_>) -> String {
    let flush = settings
        .flush_max_age_ms_opt
        .map(|max_age_ms| format!("[flush]\nmax_age_ms = {max_age_ms}\n\n"))
        .unwrap_or_default();
    format!(
        "{flush}[schemas]\ndirectory = \"{schemas}\"\n\n\
         [object_store]\nurl = \"{lake}\"\n\n\
         [kafka]\nbootstrap_servers = \"{bootstrap_servers}\"\ntopic_prefix = \"{topic_prefix}\"\n\n\
         [telemetry]\nlog_format = \"json\"\nlog_level = \"info\"\n\n\
         [health]\nlisten_address = \"127.0.0.1:{port}\"\n",
        schemas = repo_root().join("schemas").display(),
        lake = settings.lake_dir.display(),
        bootstrap_servers = settings.bootstrap_servers,
        topic_prefix = settings.topic_prefix,
        port = settings.port,
    )
}

/// An ingest service running in-process; cancelled (and waited for) by [`IngestService::stop`].
/// A service running in-process: its root token is cancelled when it is dropped, so that a
/// failing test does not leave it running beside the next one; `stop` waits for its exit.
#[derive(Debug)]
struct InProcess<R> {
    shutdown: CancellationToken,
    running_opt: Option<R>,
}

impl<R> InProcess<R> {
    fn new(shutdown: CancellationToken, running: R) -> Self {
        Self { shutdown, running_opt: Some(running) }
    }

    fn running(&self) -> Option<&R> {
        self.running_opt.as_ref()
    }

    async fn stop<F, Fut>(&mut self, wait: F) -> anyhow::Result<()>
    where
        F: FnOnce(R) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        self.shutdown.cancel();
        match self.running_opt.take() {
            Some(running) => wait(running).await,
            None => Ok(()),
        }
    }
}

impl<R> Drop for InProcess<R> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug)]
pub struct IngestService {
    pub base_url: String,
    pub config: IngestConfig,
    service: InProcess<RunningIngest>,
}

impl IngestService {
    pub async fn start(config: IngestConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let running =
            sluice_ingest::start(config.clone(), shutdown.clone()).await.context("ingest failed to start")?;
        let base_url = format!("http://{}", running.local_addr());
        Ok(Self { base_url, config, service: InProcess::new(shutdown, running) })
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
        self.service.stop(|running| async { Ok(running.wait().await?) }).await
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
    service: InProcess<sluice_compactor::RunningCompactor>,
}

impl CompactorService {
    pub async fn start(config: sluice_compactor::CompactorConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let running =
            sluice_compactor::start(config, shutdown.clone()).await.context("compactor failed to start")?;
        Ok(Self { service: InProcess::new(shutdown, running) })
    }

    /// The streams whose tables this instance's janitor keeps.
    pub fn janitor_streams(&self) -> Vec<String> {
        self.service.running().map(|running| running.janitor_streams()).unwrap_or_default()
    }

    /// Whether the instance owns its share of the partitions and each can make progress.
    pub fn is_ready(&self) -> bool {
        self.service.running().is_some_and(|running| running.is_ready())
    }

    /// Records that partitions revoked from this instance held uncommitted.
    pub fn revoked_uncommitted_records(&self) -> u64 {
        self.service.running().map_or(0, |running| running.revoked_uncommitted_records())
    }

    /// Graceful stop: flushes and commits what is buffered.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.service.stop(|running| async { Ok(running.wait().await?) }).await
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
    // As the local demo runs; tests/executor_signing.rs turns it on with keys of its own.
    config.signing.enforce = false;
    config
}

/// An executor running in-process.
#[derive(Debug)]
pub struct ExecutorService {
    service: InProcess<tokio::task::JoinHandle<Result<(), sluice_executor::ExecutorError>>>,
}

impl ExecutorService {
    pub fn start(config: sluice_executor::ExecutorConfig) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sluice_executor::run(config, shutdown.clone()));
        Self { service: InProcess::new(shutdown, task) }
    }

    /// Graceful stop: running windows finish first.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.service.stop(|task| async { Ok(task.await.context("executor panicked")??) }).await
    }
}
