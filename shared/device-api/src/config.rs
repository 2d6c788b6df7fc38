//! Configuration of the device API, the same keys in ingest's and the edge gateway's files
//! (`[http]`, `[auth]`, `[validation]`, `[mqtt]`); every key is documented in
//! docs/operations.md.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sluice_clock::parse_rfc3339_micros;
use sluice_config::{ConfigIssue, Secret};

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
    /// Common names of the site gateways whose certificates (subject `OU=sluice-edge`) may
    /// forward batches for any device; empty: no certificate is a gateway's. A certificate with
    /// that unit and an unlisted name is a device's, so a provisioning flow that copies subject
    /// fields from a device's request cannot hand out gateway rights.
    pub tls_gateway_names: Vec<String>,
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
            tls_gateway_names: Vec::new(),
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

/// The device API's part of a service's configuration, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceApiConfig<'a> {
    pub http: &'a HttpConfig,
    pub auth: &'a AuthConfig,
    pub validation: &'a ValidationConfig,
    pub mqtt: &'a MqttConfig,
}

impl DeviceApiConfig<'_> {
    /// What is wrong with the device API's keys, named as in the file.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let Self { http, auth, validation, mqtt } = *self;
        let mut issues = Vec::new();
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
        if let Err(reason) = validation.earliest_event_micros() {
            issues.push(ConfigIssue::new("validation.earliest_event_time", reason));
        }
        if http.tls_cert_path.is_some() != http.tls_key_path.is_some() {
            issues.push(ConfigIssue::new(
                "http.tls_cert_path",
                "set both http.tls_cert_path and http.tls_key_path, or neither",
            ));
        }
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
            && !auth.enabled
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
        if !http.tls_gateway_names.is_empty() && http.tls_client_ca_path.is_none() {
            issues.push(ConfigIssue::new(
                "http.tls_gateway_names",
                "gateway certificates come from the device CA: set http.tls_client_ca_path",
            ));
        }
        let mut token_names = std::collections::BTreeSet::new();
        for (index, token) in auth.tokens.iter().enumerate() {
            // A gateway's positions are kept under its token's name or `certificate:<name>`;
            // two holders sharing one name could pass for each other's gateways.
            if !token_names.insert(token.name.as_str()) || token.name.starts_with("certificate:") {
                issues.push(ConfigIssue::new(
                    format!("auth.tokens[{index}].name"),
                    format!(
                        "token names must be unique and may not start with 'certificate:' ('{}')",
                        token.name
                    ),
                ));
            }
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
        if mqtt.enabled {
            if mqtt.topic_prefix.is_empty() || mqtt.topic_prefix.contains(['+', '#']) {
                issues.push(ConfigIssue::new(
                    "mqtt.topic_prefix",
                    "must be non-empty and free of MQTT wildcards",
                ));
            }
            if mqtt.shared_subscription_group.contains(['+', '#', '/']) {
                issues.push(ConfigIssue::new(
                    "mqtt.shared_subscription_group",
                    "must be free of '/', '+' and '#'",
                ));
            }
            if mqtt.client_id.is_empty() {
                issues.push(ConfigIssue::new(
                    "mqtt.client_id",
                    "must be set: the persistent session is keyed by it",
                ));
            }
            if mqtt.max_in_flight_messages == 0 {
                issues.push(ConfigIssue::new("mqtt.max_in_flight_messages", "must be greater than 0"));
            }
            if mqtt.max_payload_bytes == 0 {
                issues.push(ConfigIssue::new("mqtt.max_payload_bytes", "must be greater than 0"));
            }
        }
        issues
    }
}
