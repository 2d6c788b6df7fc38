//! Configuration of the edge gateway (`sluice-edge --config edge.toml`). The device API's
//! sections (`[http]`, `[auth]`, `[validation]`, `[mqtt]`) are ingest's, key for key; every key
//! is shown with its default in deploy/config/edge.toml and documented in docs/edge.md.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, Secret, Validate};
pub use sluice_device_api::config::{
    AuthConfig, ClientCertificates, DeviceApiConfig, HttpConfig, MqttConfig, TokenConfig, ValidationConfig,
};
use sluice_schema::SchemasConfig;
use sluice_telemetry::TelemetryConfig;

use crate::spool::FullPolicy;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub validation: ValidationConfig,
    pub schemas: SchemasConfig,
    pub mqtt: MqttConfig,
    pub spool: SpoolSettings,
    pub forward: ForwardConfig,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            // Beside a central ingest on the same host (the local demo), not on its port.
            http: HttpConfig {
                listen_address: SocketAddr::from(([127, 0, 0, 1], 8090)),
                ..HttpConfig::default()
            },
            auth: AuthConfig::default(),
            validation: ValidationConfig::default(),
            schemas: SchemasConfig::default(),
            // The MQTT session is kept per client id: the gateway's must not be ingest's.
            mqtt: MqttConfig { client_id: "sluice-edge".to_string(), ..MqttConfig::default() },
            spool: SpoolSettings::default(),
            forward: ForwardConfig::default(),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Where accepted readings are kept until central ingest took them; one gateway per
    /// directory (the spool holds an exclusive lock on it while open).
    pub directory: PathBuf,
    /// Bytes of spool files at most; what happens past it is `full_policy`.
    pub max_bytes: u64,
    /// A spool file is closed and a new one begun past this size; forwarded readings are deleted
    /// a whole file at a time.
    pub segment_bytes: u64,
    /// `refuse` (HTTP 507, MQTT not acknowledged, so devices keep their readings) or
    /// `drop_oldest` (the oldest spool files are deleted, their readings counted and logged).
    pub full_policy: FullPolicy,
    /// Bytes of the local dead-letter log (MQTT messages that failed validation, readings
    /// central refused) at most, across its current and its one previous file.
    pub max_dead_letter_bytes: u64,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            directory: PathBuf::from("/var/lib/sluice-edge/spool"),
            max_bytes: 8 * 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            full_policy: FullPolicy::Refuse,
            max_dead_letter_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// Central ingest's base URL (`https://ingest.example.com`); empty keeps every reading in
    /// the spool (a gateway being set up, or one whose uplink is not there yet).
    pub url: String,
    /// The gateway's name at central ingest, unique among the gateways sharing a token; empty
    /// takes the machine's host name. Central tells a batch sent twice by this name and the
    /// spool's incarnation.
    pub edge_id: String,
    /// Bearer token central ingest knows the gateway by (its `auth.tokens`, by SHA-256).
    pub token: Secret,
    /// PEM certificates of the CA(s) that issued central's certificate; unset trusts the
    /// system's CAs.
    pub ca_cert_path: Option<PathBuf>,
    /// PEM certificate chain and key the gateway presents, when central asks for one.
    pub tls_cert_path: Option<PathBuf>,
    pub tls_key_path: Option<PathBuf>,
    /// Readings per request at most (at least one spooled batch goes); keep it within central's
    /// `http.max_records_per_request`.
    pub max_batch_readings: usize,
    /// Spooled bytes per request, before compression, at most; keep it within central's
    /// `http.max_body_bytes`.
    pub max_batch_bytes: usize,
    /// Readings sent per second at most, so a site draining a long backlog does not flood the
    /// cluster; 0 for no limit.
    pub max_readings_per_second: u64,
    /// Pause while the spool is empty before looking again.
    pub linger_ms: u64,
    /// Time a request may take, connecting included.
    pub request_timeout_ms: u64,
    /// First retry delay bound; each failure doubles it up to `backoff_max_ms`, and each delay is
    /// a random time below the bound (full jitter).
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Central ingest's largest record, key and headers included (its producer's
    /// `message.max.bytes`): a reading the gateway accepts must be one central can produce.
    pub max_message_bytes: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            edge_id: String::new(),
            token: Secret::default(),
            ca_cert_path: None,
            tls_cert_path: None,
            tls_key_path: None,
            max_batch_readings: 5_000,
            max_batch_bytes: 4 * 1024 * 1024,
            max_readings_per_second: 20_000,
            linger_ms: 200,
            request_timeout_ms: 30_000,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            // librdkafka's default, which central ingest keeps unless `kafka.client` sets it.
            max_message_bytes: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time allowed after SIGTERM to answer requests in flight.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_ms: 10_000 }
    }
}

impl EdgeConfig {
    /// The device API's part of the configuration.
    pub fn device_api(&self) -> DeviceApiConfig<'_> {
        DeviceApiConfig { http: &self.http, auth: &self.auth, validation: &self.validation, mqtt: &self.mqtt }
    }
}

/// The smallest spool file worth having: a file per few readings would make deletion and
/// recovery scan thousands of files.
const MIN_SEGMENT_BYTES: u64 = 1024 * 1024;
/// The longest gateway name: with the spool's incarnation and the token's name it must fit
/// central's limit on edge ids.
const MAX_EDGE_NAME_BYTES: usize = 64;
/// The most records a request (a spool frame) may hold: their index in it takes 23 bits of the
/// position central keeps for each forwarded record.
const MAX_RECORDS_PER_FRAME: usize = (1 << 23) - 1;
/// Room for a few of the largest dead letters in each of the log's two files.
const MIN_DEAD_LETTER_BYTES: u64 = 1024 * 1024;

impl Validate for EdgeConfig {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        issues.extend(self.telemetry.validate("telemetry"));
        issues.extend(self.device_api().validate());
        let spool = &self.spool;
        if spool.directory.as_os_str().is_empty() {
            issues.push(ConfigIssue::new("spool.directory", "must be set"));
        }
        if spool.segment_bytes < MIN_SEGMENT_BYTES {
            issues.push(ConfigIssue::new(
                "spool.segment_bytes",
                format!("must be at least {MIN_SEGMENT_BYTES}"),
            ));
        }
        // A whole request must fit beside a full segment, or a spool at its limit could refuse
        // every request of the largest size for ever.
        let largest_request = if self.mqtt.enabled {
            self.http.max_body_bytes.max(self.mqtt.max_payload_bytes)
        } else {
            self.http.max_body_bytes
        };
        let needed = spool.segment_bytes.saturating_add(largest_request as u64).saturating_mul(2);
        if spool.max_bytes < needed {
            issues.push(ConfigIssue::new(
                "spool.max_bytes",
                format!(
                    "must be at least twice spool.segment_bytes plus the largest request (http.max_body_bytes, \
                     and mqtt.max_payload_bytes with MQTT on): {needed} bytes, so that the largest request fits \
                     while the oldest file is being forwarded"
                ),
            ));
        }
        if self.http.max_records_per_request > MAX_RECORDS_PER_FRAME {
            issues.push(ConfigIssue::new(
                "http.max_records_per_request",
                format!("must be at most {MAX_RECORDS_PER_FRAME} at a gateway: a record's index in its request is part of its position"),
            ));
        }
        if spool.max_dead_letter_bytes < MIN_DEAD_LETTER_BYTES {
            issues.push(ConfigIssue::new(
                "spool.max_dead_letter_bytes",
                format!("must be at least {MIN_DEAD_LETTER_BYTES}: a dead letter keeps up to 64 KiB of its message"),
            ));
        }
        issues.extend(self.forward.validate());
        issues
    }
}

impl ForwardConfig {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if !self.url.is_empty() {
            match reqwest::Url::parse(&self.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => issues.push(ConfigIssue::new(
                    "forward.url",
                    format!(
                        "'{}' is not an http:// or https:// URL such as https://ingest.example.com",
                        self.url
                    ),
                )),
            }
        }
        if !self.edge_id.is_empty()
            && (self.edge_id.len() > MAX_EDGE_NAME_BYTES
                || !self
                    .edge_id
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')))
        {
            issues.push(ConfigIssue::new(
                "forward.edge_id",
                format!("must be at most {MAX_EDGE_NAME_BYTES} letters, digits, '.', '_' or '-'"),
            ));
        }
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            issues.push(ConfigIssue::new(
                "forward.tls_cert_path",
                "set both forward.tls_cert_path and forward.tls_key_path, or neither",
            ));
        }
        for (key, value) in [
            ("forward.max_batch_readings", self.max_batch_readings as u64),
            ("forward.linger_ms", self.linger_ms),
            ("forward.request_timeout_ms", self.request_timeout_ms),
            ("forward.backoff_initial_ms", self.backoff_initial_ms),
        ] {
            if value == 0 {
                issues.push(ConfigIssue::new(key, "must be greater than 0"));
            }
        }
        if self.max_batch_bytes < 1024 {
            issues.push(ConfigIssue::new("forward.max_batch_bytes", "must be at least 1024"));
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            issues.push(ConfigIssue::new(
                "forward.backoff_max_ms",
                "must be at least forward.backoff_initial_ms",
            ));
        }
        if self.max_message_bytes < 1024 {
            issues.push(ConfigIssue::new("forward.max_message_bytes", "must be at least 1024"));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_differ_from_ingest_where_both_run_on_one_host() {
        let config = EdgeConfig::default();
        assert_eq!(config.validate(), Vec::new());
        assert_ne!(config.http.listen_address, HttpConfig::default().listen_address);
        assert_ne!(config.mqtt.client_id, MqttConfig::default().client_id);
    }

    #[test]
    fn a_spool_too_small_for_its_largest_request_is_refused_with_its_key() {
        let mut config = EdgeConfig::default();
        config.spool.max_bytes = 1024 * 1024;
        config.spool.segment_bytes = 1;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["spool.segment_bytes", "spool.max_bytes"]);
    }

    #[test]
    fn forwarding_settings_that_cannot_work_are_named() {
        let mut config = EdgeConfig::default();
        config.forward.url = "ingest.example.com".into();
        config.forward.edge_id = "site 7/north".into();
        config.forward.tls_key_path = Some("gateway.key".into());
        config.forward.backoff_max_ms = 1;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(
            keys,
            ["forward.url", "forward.edge_id", "forward.tls_cert_path", "forward.backoff_max_ms"]
        );
        config.forward.url = "https://ingest.example.com".into();
        config.forward.edge_id = "site-7.north_gate".into();
        config.forward.tls_key_path = None;
        config.forward.backoff_max_ms = 60_000;
        assert_eq!(config.validate(), Vec::new());
    }

    #[test]
    fn device_api_keys_are_checked_as_at_ingest() {
        let mut config = EdgeConfig::default();
        config.http.max_connections = 0;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.max_connections"]);
        config.http.max_connections = 1;
        config.http.max_records_per_request = 1 << 23;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.max_records_per_request"], "a record's index must fit its position");
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/edge.toml");
        let figment = sluice_config::figment_for::<EdgeConfig>(Some(&path)).expect("file exists");
        let config: EdgeConfig = sluice_config::load_from_figment(figment).expect("valid");
        assert_eq!(config.spool.full_policy, FullPolicy::Refuse);
    }
}
