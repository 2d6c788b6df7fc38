//! Configuration of the executor (`sluice-executor --config executor.toml`); every key is in
//! docs/operations.md and deploy/config/executor.toml.

use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, Validate};
use sluice_health::HealthConfig;
use sluice_jobs::signing::SigningConfig;
use sluice_kafka::KafkaConfig;
use sluice_lake::ObjectStoreConfig;
use sluice_lake::encryption::EncryptionConfig;
use sluice_schema::SchemasConfig;
use sluice_telemetry::TelemetryConfig;

use sluice_query::limits::DEFAULT_MAX_TIMEOUT_MS;
use sluice_query::settings::QueryConfig;
use sluice_query::tables::TablesConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    pub executor: ExecutorSection,
    pub query: QueryConfig,
    pub tables: TablesConfig,
    pub schemas: SchemasConfig,
    pub object_store: ObjectStoreConfig,
    /// Encrypted columns, the keys to read them, and the jobs that may: docs/operations.md.
    pub encryption: EncryptionConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    #[serde(default = "default_health")]
    pub health: HealthConfig,
    pub shutdown: ShutdownConfig,
    pub ballista: BallistaSection,
    /// Who may submit, delete and backfill jobs: docs/operations.md, "Security".
    pub signing: SigningConfig,
}

/// Beside the compactor's 8081 and ingest's 8080 when all run on one machine.
fn default_health() -> HealthConfig {
    HealthConfig::with_address("127.0.0.1:8082")
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            executor: ExecutorSection::default(),
            query: QueryConfig::default(),
            tables: TablesConfig::default(),
            schemas: SchemasConfig::default(),
            object_store: ObjectStoreConfig::default(),
            encryption: EncryptionConfig::default(),
            kafka: KafkaConfig::default(),
            telemetry: TelemetryConfig::default(),
            health: default_health(),
            shutdown: ShutdownConfig::default(),
            ballista: BallistaSection::default(),
            signing: SigningConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorSection {
    /// Kafka consumer group on the jobs topic; replicas split the jobs by its partitions.
    pub group_id: String,
    /// Names this replica in run records; keep it stable across restarts (the pod name of a
    /// StatefulSet) so a restarted replica takes over its own interrupted runs at once.
    /// Empty means a random id per process.
    pub instance_id: String,
    /// Runs (job windows) at once on this replica; missed windows are caught up oldest first.
    pub max_concurrent_runs: usize,
    /// How often due windows are looked for.
    pub tick_interval_ms: u64,
    /// Limit on one attempt unless the job sets `timeout`.
    pub default_timeout_ms: u64,
    /// The longest `timeout` a job may ask for; a job asking more is refused at submission, so
    /// that no job holds a run slot for longer than this.
    pub max_timeout_ms: u64,
    /// Attempts per window unless the job sets `retries`.
    pub default_max_attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub retry_backoff_ms: u64,
    /// A claim on an attempt lasts its timeout plus this; after that another replica may
    /// start the next attempt.
    pub lease_grace_ms: u64,
    /// How often restating jobs compare their windows' inputs with what they ran on.
    pub restate_check_interval_ms: u64,
    /// Windows a job may have left to run before now when it is accepted (from its `start`), and
    /// windows one backfill request may cover; past it the job or request is refused.
    pub max_backlog_windows: u64,
    /// Due windows one job queues per tick; catch-up goes on in pages of this many.
    pub max_windows_per_job_per_tick: usize,
    /// Local directory for markers of definitions being validated: a definition that two
    /// processes died validating is refused after the restart. Empty: a directory under the
    /// system's temporary directory, named for the group.
    pub state_dir: String,
}

impl Default for ExecutorSection {
    fn default() -> Self {
        Self {
            group_id: "sluice-executor".to_string(),
            instance_id: String::new(),
            max_concurrent_runs: 2,
            tick_interval_ms: 5_000,
            default_timeout_ms: 600_000,
            max_timeout_ms: DEFAULT_MAX_TIMEOUT_MS,
            default_max_attempts: 3,
            retry_backoff_ms: 10_000,
            lease_grace_ms: 30_000,
            restate_check_interval_ms: 60_000,
            max_backlog_windows: sluice_jobs::catch_up::DEFAULT_MAX_BACKLOG_WINDOWS,
            max_windows_per_job_per_tick: 64,
            state_dir: String::new(),
        }
    }
}

/// The Ballista cluster that runs jobs with `-- engine: ballista`, and the settings of the
/// `sluice-executor ballista-scheduler` and `ballista-worker` processes that make one up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BallistaSection {
    /// The scheduler, e.g. `http://ballista-scheduler:50050`. Empty: no cluster, and jobs that
    /// ask for one are refused.
    pub scheduler_url: String,
    /// Where `ballista-scheduler` listens.
    pub scheduler_bind: String,
    /// Where `ballista-worker` listens: `worker_port` serves result and shuffle data (Arrow
    /// Flight), `worker_grpc_port` receives tasks.
    pub worker_bind_host: String,
    pub worker_port: u16,
    pub worker_grpc_port: u16,
    /// The host other workers and the executor reach this worker by (its pod IP or DNS name);
    /// empty means `worker_bind_host`.
    pub worker_advertise_host: String,
    /// Tasks a worker runs at once; 0 means one per core.
    pub worker_task_slots: usize,
    /// Shuffle files and spills; empty means a fresh temporary directory.
    pub worker_work_dir: String,
}

impl Default for BallistaSection {
    fn default() -> Self {
        Self {
            scheduler_url: String::new(),
            scheduler_bind: "127.0.0.1:50050".to_string(),
            worker_bind_host: "127.0.0.1".to_string(),
            worker_port: 50051,
            worker_grpc_port: 50052,
            worker_advertise_host: String::new(),
            worker_task_slots: 0,
            worker_work_dir: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time allowed after SIGTERM for running attempts to finish; unfinished ones are taken
    /// over when their lease ends.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_ms: 30_000 }
    }
}

impl Validate for ExecutorConfig {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        issues.extend(self.kafka.validate("kafka"));
        issues.extend(self.telemetry.validate("telemetry"));
        issues.extend(self.object_store.validate("object_store"));
        issues.extend(self.encryption.validate("encryption", false));
        if !self.encryption.decrypting_jobs.is_empty() && !self.signing.enforce {
            issues.push(ConfigIssue::new(
                "encryption.decrypting_jobs",
                "decryption is granted by job name, and with signing.enforce off anyone who can write the jobs \
                 topic names a job as they like: turn signing on",
            ));
        }
        issues.extend(self.health.validate("health"));
        let section = &self.executor;
        if section.group_id.is_empty() {
            issues.push(ConfigIssue::new("executor.group_id", "must be set"));
        }
        for (key, value) in [
            ("executor.max_concurrent_runs", section.max_concurrent_runs as u64),
            ("executor.tick_interval_ms", section.tick_interval_ms),
            ("executor.default_timeout_ms", section.default_timeout_ms),
            ("executor.max_timeout_ms", section.max_timeout_ms),
            ("executor.default_max_attempts", u64::from(section.default_max_attempts)),
            ("executor.restate_check_interval_ms", section.restate_check_interval_ms),
            ("executor.max_backlog_windows", section.max_backlog_windows),
            ("executor.max_windows_per_job_per_tick", section.max_windows_per_job_per_tick as u64),
        ] {
            if value == 0 {
                issues.push(ConfigIssue::new(key, "must be greater than 0"));
            }
        }
        if section.default_timeout_ms > section.max_timeout_ms {
            issues.push(ConfigIssue::new(
                "executor.default_timeout_ms",
                format!("must not be more than executor.max_timeout_ms ({})", section.max_timeout_ms),
            ));
        }
        if !self.ballista.scheduler_url.is_empty() {
            match url::Url::parse(&self.ballista.scheduler_url) {
                Ok(url) if url.host_str().is_some() => {}
                _ => issues.push(ConfigIssue::new(
                    "ballista.scheduler_url",
                    "must be a URL with a host, for example http://127.0.0.1:50050",
                )),
            }
        }
        if self.ballista.scheduler_bind.parse::<std::net::SocketAddr>().is_err() {
            issues.push(ConfigIssue::new("ballista.scheduler_bind", "must be an IP address and port"));
        }
        issues.extend(self.tables.validate("tables"));
        for (key, message) in self.signing.issues("signing") {
            issues.push(ConfigIssue::new(key, message));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    #[test]
    fn the_shipped_config_file_loads_and_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/executor.toml");
        let config: ExecutorConfig = sluice_config::load(Some(&path)).unwrap();
        assert_eq!(config.executor.group_id, "sluice-executor");
        assert!(config.validate().is_empty());
    }

    #[test]
    fn bad_values_are_named() {
        let mut config = ExecutorConfig::default();
        config.executor.max_concurrent_runs = 0;
        config.executor.default_timeout_ms = config.executor.max_timeout_ms + 1;
        config.ballista.scheduler_url = "no host".into();
        config.tables.reference.push(sluice_query::tables::ReferenceTable {
            name: "bad name".into(),
            path: String::new(),
            format: sluice_query::tables::ReferenceFormat::Csv,
        });
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert!(keys.contains(&"executor.max_concurrent_runs".to_string()), "{keys:?}");
        assert!(keys.contains(&"executor.default_timeout_ms".to_string()), "{keys:?}");
        assert!(keys.contains(&"tables.reference[0].name".to_string()), "{keys:?}");
        assert!(keys.contains(&"tables.reference[0].path".to_string()), "{keys:?}");
        assert!(keys.contains(&"ballista.scheduler_url".to_string()), "{keys:?}");
    }
}
