//! Configuration of the ingest service (`sluice-ingest --config ingest.toml`); every key is
//! documented in docs/operations.md and shown with its default in deploy/config/ingest.toml.

use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, Validate};
pub use sluice_device_api::config::{
    AuthConfig, ClientCertificates, DeviceApiConfig, HttpConfig, MqttConfig, TokenConfig, ValidationConfig,
};
use sluice_kafka::KafkaConfig;
use sluice_schema::SchemasConfig;
use sluice_telemetry::TelemetryConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub validation: ValidationConfig,
    pub schemas: SchemasConfig,
    pub kafka: KafkaConfig,
    pub producer: ProducerConfig,
    pub mqtt: MqttConfig,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// How long a record may wait for the broker's acknowledgement (librdkafka
    /// `message.timeout.ms`); bounds how long a request waits when the broker is unreachable.
    pub delivery_timeout_ms: u64,
    /// How often broker reachability is probed for `/readyz` and fast 503 answers.
    pub health_check_interval_ms: u64,
    /// librdkafka `linger.ms`: batching delay that trades latency for throughput.
    pub linger_ms: u64,
    /// librdkafka `queue.buffering.max.kbytes`: the producer queue; a full queue answers 503.
    pub queue_max_kbytes: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            delivery_timeout_ms: 10_000,
            health_check_interval_ms: 1_000,
            linger_ms: 5,
            queue_max_kbytes: 262_144,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time allowed after SIGTERM to drain requests and flush the producer.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_ms: 20_000 }
    }
}
impl IngestConfig {
    /// The device API's part of the configuration.
    pub fn device_api(&self) -> DeviceApiConfig<'_> {
        DeviceApiConfig { http: &self.http, auth: &self.auth, validation: &self.validation, mqtt: &self.mqtt }
    }
}

impl Validate for IngestConfig {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        issues.extend(self.kafka.validate("kafka"));
        issues.extend(self.telemetry.validate("telemetry"));
        issues.extend(self.device_api().validate());
        let producer = &self.producer;
        if producer.delivery_timeout_ms < 1_000 {
            issues.push(ConfigIssue::new("producer.delivery_timeout_ms", "must be at least 1000"));
        }
        if producer.health_check_interval_ms == 0 {
            issues.push(ConfigIssue::new("producer.health_check_interval_ms", "must be greater than 0"));
        }
        if producer.queue_max_kbytes == 0 {
            issues.push(ConfigIssue::new("producer.queue_max_kbytes", "must be greater than 0"));
        }
        if self.shutdown.grace_period_ms <= producer.delivery_timeout_ms {
            issues.push(ConfigIssue::new(
                "shutdown.grace_period_ms",
                format!(
                    "must exceed producer.delivery_timeout_ms ({}) so that in-flight records can be acknowledged",
                    producer.delivery_timeout_ms
                ),
            ));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use sluice_config::Secret;

    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(IngestConfig::default().validate(), Vec::new());
    }

    #[test]
    fn token_given_in_clear_is_refused_with_its_key() {
        let mut config = IngestConfig::default();
        config.auth.tokens.push(TokenConfig {
            name: "farm".into(),
            token_sha256: Secret::new("my-secret-token"),
            streams: vec!["telemetry".into()],
        });
        let issues = config.validate();
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].key, "auth.tokens[0].token_sha256");
        assert!(!issues[0].message.contains("my-secret-token"));
    }

    #[test]
    fn token_names_are_unique_and_cannot_pass_for_a_gateway_certificate() {
        let mut config = IngestConfig::default();
        for name in ["farm", "farm", "certificate:site-7"] {
            config.auth.tokens.push(TokenConfig {
                name: name.into(),
                token_sha256: Secret::new("a".repeat(64)),
                streams: vec!["telemetry".into()],
            });
        }
        config.http.tls_gateway_names.push("site-7".into());
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.tls_gateway_names", "auth.tokens[1].name", "auth.tokens[2].name"]);
    }

    #[test]
    fn grace_period_must_cover_delivery_timeout() {
        let mut config = IngestConfig::default();
        config.shutdown.grace_period_ms = 5_000;
        assert_eq!(config.validate()[0].key, "shutdown.grace_period_ms");
    }

    #[test]
    fn earliest_event_time_must_be_rfc3339() {
        let mut config = IngestConfig::default();
        assert_eq!(config.validation.earliest_event_micros(), Ok(946_684_800_000_000));
        config.validation.earliest_event_time = "2000-01-01".into();
        assert_eq!(config.validate().len(), 1);
        assert_eq!(config.validate()[0].key, "validation.earliest_event_time");
        config.validation.max_future_skew_ms = u64::MAX;
        assert_eq!(config.validation.max_future_skew_micros(), i64::MAX);
    }

    #[test]
    fn http_limits_must_be_positive_and_in_flight_hold_two_bodies() {
        let mut config = IngestConfig::default();
        config.http.max_connections = 0;
        config.http.idle_timeout_ms = 0;
        config.http.max_in_flight_bytes = config.http.max_body_bytes;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.max_in_flight_bytes", "http.max_connections", "http.idle_timeout_ms"]);
    }

    #[test]
    fn tls_settings_that_cannot_work_together_are_named() {
        let mut config = IngestConfig::default();
        config.http.tls_client_ca_path = Some("devices-ca.crt".into());
        config.http.tls_client_crl_path = Some("devices.crl".into());
        config.mqtt.tls_cert_path = Some("bridge.crt".into());
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["mqtt.tls_cert_path", "mqtt.tls", "http.tls_client_ca_path"]);
        config.http.tls_cert_path = Some("tls.crt".into());
        config.http.tls_key_path = Some("tls.key".into());
        config.mqtt.tls = true;
        config.mqtt.tls_key_path = Some("bridge.key".into());
        assert_eq!(config.validate(), Vec::new());
        config.http.tls_client_certificates = ClientCertificates::Optional;
        config.auth.enabled = false;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.tls_client_certificates"]);
        config.auth.enabled = true;
        config.http.tls_client_streams.clear();
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.tls_client_streams"]);
        config.http.tls_client_streams.push("telemetry".into());
        config.http.tls_client_ca_path = None;
        let keys: Vec<String> = config.validate().into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["http.tls_client_crl_path"]);
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/ingest.toml");
        let figment = sluice_config::figment_for::<IngestConfig>(Some(&path)).expect("file exists");
        let config: IngestConfig = sluice_config::load_from_figment(figment).expect("valid");
        assert!(!config.auth.enabled);
    }
}
