//! What the CLI reads of the executor's configuration file (`sluice --config executor.toml`):
//! where Kafka, the schemas and the lake are, the query settings and reference tables, and the
//! two executor limits it applies before submitting. The CLI reads that file without linking the
//! executor service, so these are its own views of the sections; keys it does not use are
//! accepted where the executor accepts them, and a key no section has is still an error.

use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, Validate};
use sluice_kafka::KafkaConfig;
use sluice_lake::ObjectStoreConfig;
use sluice_lake::encryption::EncryptionConfig;
use sluice_query::QueryConfig;
use sluice_query::tables::TablesConfig;
use sluice_schema::SchemasConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CliSettings {
    pub(crate) executor: ExecutorLimits,
    pub(crate) query: QueryConfig,
    pub(crate) tables: TablesConfig,
    pub(crate) schemas: SchemasConfig,
    pub(crate) object_store: ObjectStoreConfig,
    /// With the key file, `sluice query` decrypts; without it, it refuses encrypted columns.
    pub(crate) encryption: EncryptionConfig,
    pub(crate) kafka: KafkaConfig,
    pub(crate) ballista: ClusterAddress,
    // The executor's own sections: the CLI has no use for them, the executor checks them.
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shutdown: Option<serde_json::Value>,
    /// The trusted public keys: the CLI signs with a private key (`--key`), the executor checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    signing: Option<serde_json::Value>,
}

/// The executor's limits the CLI applies the same way before a request reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ExecutorLimits {
    /// A backfill over more windows than this is refused before it is written.
    pub(crate) max_backlog_windows: u64,
    /// The longest timeout a job may ask for.
    pub(crate) max_timeout_ms: u64,
}

impl Default for ExecutorLimits {
    fn default() -> Self {
        Self {
            max_backlog_windows: sluice_jobs::catch_up::DEFAULT_MAX_BACKLOG_WINDOWS,
            max_timeout_ms: sluice_query::limits::DEFAULT_MAX_TIMEOUT_MS,
        }
    }
}

/// Whether the executor has a Ballista cluster: a job with `engine: ballista` is refused without
/// one. The CLI never connects to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ClusterAddress {
    pub(crate) scheduler_url: String,
}

impl ClusterAddress {
    pub(crate) fn is_configured(&self) -> bool {
        !self.scheduler_url.trim().is_empty()
    }
}

impl Validate for CliSettings {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        issues.extend(self.kafka.validate("kafka"));
        issues.extend(self.object_store.validate("object_store"));
        issues.extend(self.encryption.validate("encryption", false));
        issues.extend(self.tables.validate("tables"));
        for (key, value) in [
            ("executor.max_backlog_windows", self.executor.max_backlog_windows),
            ("executor.max_timeout_ms", self.executor.max_timeout_ms),
        ] {
            if value == 0 {
                issues.push(ConfigIssue::new(key, "must be greater than 0"));
            }
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn the_shipped_executor_config_file_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/executor.toml");
        let settings: CliSettings = sluice_config::load(Some(&path)).unwrap();
        assert!(settings.validate().is_empty(), "{:?}", settings.validate());
        assert!(!settings.kafka.bootstrap_servers.is_empty());
        assert_eq!(settings.executor, ExecutorLimits::default());
    }

    #[test]
    fn a_key_of_no_section_is_refused() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "[kafkaa]\nbootstrap_servers = \"x:9092\"\n").unwrap();
        let error = sluice_config::load::<CliSettings>(Some(&path)).unwrap_err();
        assert!(format!("{error:#}").contains("kafkaa"), "{error:#}");
    }
}
