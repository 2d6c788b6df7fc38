//! Configuration of the ingest service (`sluice-ingest --config ingest.toml`); every key is
//! documented in docs/operations.md and shown with its default in deploy/config/ingest.toml.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sluice_clock::parse_rfc3339_micros;
use sluice_config::{ConfigIssue, Secret, Validate};
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
pub struct HttpConfig {
    pub listen_address: SocketAddr,
    /// Largest request body accepted, after decompression.
    pub max_body_bytes: usize,
    pub max_records_per_request: usize,
    /// Bytes of request bodies being validated or produced at once; past it requests get 503.
    pub max_in_flight_bytes: usize,
    /// PEM certificate chain and key; both set turns on TLS.
    pub tls_cert_path: Option<PathBuf>,
    pub tls_key_path: Option<PathBuf>,
    /// PEM certificates of the CAs that issue device certificates; set turns on mutual TLS, and a
    /// certificate's subject CN is then the only `device_id` its connection may write.
    pub tls_client_ca_path: Option<PathBuf>,
    /// Whether every client must present a device certificate, or may use a bearer token instead.
    pub tls_client_certificates: ClientCertificates,
    /// PEM certificate revocation lists of the device CAs; a revoked device's handshake fails,
    /// and so does every handshake once a list is past its next update.
    pub tls_client_crl_path: Option<PathBuf>,
    /// Streams a device certificate may write; `"*"` for all.
    pub tls_client_streams: Vec<String>,
    /// Open connections at most; past it a new connection is answered 503 and closed at once, so
    /// that clients holding connections cannot use up the process's file descriptors.
    pub max_connections: usize,
    /// Time a new connection has to complete its TLS handshake and its first request's headers.
    pub header_read_timeout_ms: u64,
    /// Time a kept-alive connection may wait for its next request's headers.
    pub idle_timeout_ms: u64,
    /// Time a request has to deliver its whole body once its headers arrived (408 past it).
    pub request_body_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 16 * 1024 * 1024,
            max_records_per_request: 10_000,
            max_in_flight_bytes: 256 * 1024 * 1024,
            tls_cert_path: None,
            tls_key_path: None,
            tls_client_ca_path: None,
            tls_client_certificates: ClientCertificates::Required,
            tls_client_crl_path: None,
            tls_client_streams: vec!["*".to_string()],
            max_connections: 1_024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            request_body_timeout_ms: 30_000,
        }
    }
}

/// Mutual TLS for devices, once `http.tls_client_ca_path` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertificates {
    /// Writing needs a device certificate; a client without one gets 401 (health and readiness
    /// stay open to it, for probes).
    Required,
    /// A client may instead authenticate with a bearer token (`auth`), for fleets moving to
    /// certificates; one that presents a certificate is still bound to its device.
    Optional,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Off only for local use: anyone who reaches the port can write.
    pub enabled: bool,
    pub tokens: Vec<TokenConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { enabled: true, tokens: Vec::new() }
    }
}

/// A bearer token, stored as the SHA-256 of the token so that the config holds no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token; shows in logs, never the token.
    pub name: String,
    /// Lowercase hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub token_sha256: Secret,
    /// Streams the token may write; `"*"` for all.
    pub streams: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// How far in the future (device clock ahead of ours) an event time may be.
    pub max_future_skew_ms: u64,
    /// The earliest event time accepted, RFC 3339. Readings before it are refused (400 over HTTP,
    /// dead-lettered over MQTT): a clock that was never set reads 1970, and times near the ends
    /// of i64 cannot be partitioned or windowed.
    pub earliest_event_time: String,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self { max_future_skew_ms: 300_000, earliest_event_time: "2000-01-01T00:00:00Z".to_string() }
    }
}

impl ValidationConfig {
    /// `earliest_event_time` in epoch microseconds, or why it is not a usable time. It is read as
    /// a reading's `ts` string is, so that any time a device can send can be set.
    pub fn earliest_event_micros(&self) -> Result<i64, String> {
        parse_rfc3339_micros(&self.earliest_event_time).map_err(|error| {
            format!(
                "'{}' is not an RFC 3339 time such as 2000-01-01T00:00:00Z ({error})",
                self.earliest_event_time
            )
        })
    }

    /// `max_future_skew_ms` in microseconds, saturated rather than overflowed.
    pub fn max_future_skew_micros(&self) -> i64 {
        i64::try_from(self.max_future_skew_ms).unwrap_or(i64::MAX).saturating_mul(1_000)
    }
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
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Client id; with a persistent session the broker keeps unacknowledged readings for it.
    pub client_id: String,
    pub username: String,
    pub password: Secret,
    /// Readings arrive on `<topic_prefix>/<stream>/<device_id>`.
    pub topic_prefix: String,
    /// When set, subscribe as `$share/<group>/...` so that ingest replicas split the messages
    /// instead of each receiving all of them (MQTT 5 shared subscriptions; Mosquitto 2 accepts
    /// them from MQTT 3.1.1 clients too).
    pub shared_subscription_group: String,
    pub keep_alive_secs: u64,
    /// Readings being produced at once before the bridge stops reading from MQTT.
    pub max_in_flight_messages: usize,
    /// Largest MQTT payload taken as readings; a larger one is dead-lettered with its first
    /// bytes and its size. The MQTT broker's own packet limit (Mosquitto `max_packet_size`)
    /// bounds what ingest has to read at all.
    pub max_payload_bytes: usize,
    /// Connect to the MQTT broker over TLS (its TLS listener, usually port 8883).
    pub tls: bool,
    /// PEM certificates of the CA(s) that issued the broker's certificate; unset trusts the
    /// system's CAs.
    pub tls_ca_path: Option<PathBuf>,
    /// PEM certificate chain and key the bridge presents, for brokers that require client
    /// certificates (Mosquitto `require_certificate true`).
    pub tls_cert_path: Option<PathBuf>,
    pub tls_key_path: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "127.0.0.1".to_string(),
            port: 1883,
            client_id: "sluice-ingest".to_string(),
            username: String::new(),
            password: Secret::default(),
            topic_prefix: "sluice".to_string(),
            shared_subscription_group: String::new(),
            keep_alive_secs: 30,
            max_in_flight_messages: 1_000,
            max_payload_bytes: 16 * 1024 * 1024,
            tls: false,
            tls_ca_path: None,
            tls_cert_path: None,
            tls_key_path: None,
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

impl Validate for IngestConfig {
    fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        issues.extend(self.kafka.validate("kafka"));
        issues.extend(self.telemetry.validate("telemetry"));
        let http = &self.http;
        if http.max_body_bytes == 0 {
            issues.push(ConfigIssue::new("http.max_body_bytes", "must be greater than 0"));
        }
        if http.max_records_per_request == 0 {
            issues.push(ConfigIssue::new("http.max_records_per_request", "must be greater than 0"));
        }
        if http.max_in_flight_bytes < http.max_body_bytes.saturating_mul(2) {
            issues.push(ConfigIssue::new(
                "http.max_in_flight_bytes",
                format!(
                    "must be at least twice http.max_body_bytes ({}): a compressed body and its decoded \
                     form, or a body and its encoded records, are held together",
                    http.max_body_bytes
                ),
            ));
        }
        if http.max_connections == 0 {
            issues.push(ConfigIssue::new("http.max_connections", "must be greater than 0"));
        }
        for (key, value) in [
            ("http.header_read_timeout_ms", http.header_read_timeout_ms),
            ("http.idle_timeout_ms", http.idle_timeout_ms),
            ("http.request_body_timeout_ms", http.request_body_timeout_ms),
        ] {
            if value == 0 {
                issues.push(ConfigIssue::new(key, "must be greater than 0"));
            }
        }
        if let Err(reason) = self.validation.earliest_event_micros() {
            issues.push(ConfigIssue::new("validation.earliest_event_time", reason));
        }
        if http.tls_cert_path.is_some() != http.tls_key_path.is_some() {
            issues.push(ConfigIssue::new(
                "http.tls_cert_path",
                "set both http.tls_cert_path and http.tls_key_path, or neither",
            ));
        }
        let mqtt = &self.mqtt;
        if mqtt.tls_cert_path.is_some() != mqtt.tls_key_path.is_some() {
            issues.push(ConfigIssue::new(
                "mqtt.tls_cert_path",
                "set both mqtt.tls_cert_path and mqtt.tls_key_path, or neither",
            ));
        }
        if !mqtt.tls && (mqtt.tls_ca_path.is_some() || mqtt.tls_cert_path.is_some()) {
            issues.push(ConfigIssue::new(
                "mqtt.tls",
                "mqtt.tls_ca_path or mqtt.tls_cert_path is set but mqtt.tls is false; set mqtt.tls = true",
            ));
        }
        if http.tls_client_ca_path.is_some() && http.tls_cert_path.is_none() {
            issues.push(ConfigIssue::new(
                "http.tls_client_ca_path",
                "device certificates need TLS on the listener: set http.tls_cert_path and http.tls_key_path",
            ));
        }
        if http.tls_client_ca_path.is_some()
            && http.tls_client_certificates == ClientCertificates::Optional
            && !self.auth.enabled
        {
            issues.push(ConfigIssue::new(
                "http.tls_client_certificates",
                "\"optional\" with auth.enabled = false lets a device leave its certificate out and write \
                 for any device; turn auth on (tokens for clients without certificates) or require certificates",
            ));
        }
        if http.tls_client_streams.is_empty() {
            issues.push(ConfigIssue::new(
                "http.tls_client_streams",
                "device certificates may write no stream; list streams or \"*\"",
            ));
        }
        if http.tls_client_crl_path.is_some() && http.tls_client_ca_path.is_none() {
            issues.push(ConfigIssue::new(
                "http.tls_client_crl_path",
                "revocation lists need device certificates: set http.tls_client_ca_path",
            ));
        }
        for (index, token) in self.auth.tokens.iter().enumerate() {
            let hash = token.token_sha256.expose();
            if hash.len() != 64
                || !hash.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
            {
                issues.push(ConfigIssue::new(
                    format!("auth.tokens[{index}].token_sha256"),
                    format!(
                        "token '{}' needs 64 lowercase hex digits: the SHA-256 of the token, not the token",
                        token.name
                    ),
                ));
            }
            if token.streams.is_empty() {
                issues.push(ConfigIssue::new(
                    format!("auth.tokens[{index}].streams"),
                    format!("token '{}' may write no stream; list streams or \"*\"", token.name),
                ));
            }
        }
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
        if self.mqtt.enabled {
            if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['+', '#']) {
                issues.push(ConfigIssue::new(
                    "mqtt.topic_prefix",
                    "must be non-empty and free of MQTT wildcards",
                ));
            }
            if self.mqtt.shared_subscription_group.contains(['+', '#', '/']) {
                issues.push(ConfigIssue::new(
                    "mqtt.shared_subscription_group",
                    "must be free of '/', '+' and '#'",
                ));
            }
            if self.mqtt.client_id.is_empty() {
                issues.push(ConfigIssue::new(
                    "mqtt.client_id",
                    "must be set: the persistent session is keyed by it",
                ));
            }
            if self.mqtt.max_in_flight_messages == 0 {
                issues.push(ConfigIssue::new("mqtt.max_in_flight_messages", "must be greater than 0"));
            }
            if self.mqtt.max_payload_bytes == 0 {
                issues.push(ConfigIssue::new("mqtt.max_payload_bytes", "must be greater than 0"));
            }
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
