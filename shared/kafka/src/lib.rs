//! Kafka client settings, topic names and topic administration shared by the Sluice services.
//!
//! Users may pass any librdkafka property through `kafka.client` (SASL, TLS, tuning). The few
//! settings that Sluice's delivery guarantees depend on are applied after that map, so they always
//! win, and `validate` refuses a map that contradicts them rather than silently overriding it.
//!
//! The file passes 500 lines only with its tests: the settings that guarantees depend on are
//! tested next to the code that enforces them.

mod batch_producer;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, is_secret_property};

pub use crate::batch_producer::{BatchDelivery, BatchOutcome, BatchProducer, BatchRecord, EnqueueError};

/// Whether `code` says the broker refused an idempotent producer itself: its id, epoch or
/// sequence numbers are not (or no longer) the broker's. librdkafka reports these per message
/// without always marking the client fatal and keeps using the same state, so every later send
/// fails the same way until the producer is replaced (seen on Tansu: `ProducerFenced` on every
/// record after a 20 s stall; `UnknownProducerId` from a broker that came back empty).
pub fn is_producer_state_lost(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::InvalidProducerIdMapping
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
    )
}

/// Producer settings that make an acknowledged write durable and retries free of duplicates.
const ENFORCED_PRODUCER_SETTINGS: &[(&str, &str)] = &[("acks", "all"), ("enable.idempotence", "true")];
/// Consumer settings that leave offset handling to Sluice, which commits progress with the data.
const ENFORCED_CONSUMER_SETTINGS: &[(&str, &str)] =
    &[("enable.auto.commit", "false"), ("enable.auto.offset.store", "false")];

/// librdkafka properties passed through. `Debug` hides secret values.
///
/// librdkafka names use dots (`sasl.password`), which configuration layers read as nesting and
/// environment variable names cannot hold. So nested tables are joined with dots, and `_` in a
/// name reads as `.` (no librdkafka property has an underscore): `SLUICE_KAFKA__CLIENT__SASL_PASSWORD`,
/// `"sasl.password" = ...` and `[kafka.client.sasl] password = ...` all set `sasl.password`.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ClientProperties(pub BTreeMap<String, String>);

#[derive(Deserialize)]
#[serde(untagged)]
enum PropertyValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Flag(bool),
    Nested(BTreeMap<String, PropertyValue>),
}

impl<'de> Deserialize<'de> for ClientProperties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        fn flatten(
            prefix: &str,
            entries: BTreeMap<String, PropertyValue>,
            out: &mut BTreeMap<String, String>,
        ) {
            for (key, value) in entries {
                let name = key.replace('_', ".");
                let full_name = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
                let text = match value {
                    PropertyValue::Text(text) => text,
                    PropertyValue::Integer(number) => number.to_string(),
                    PropertyValue::Float(number) => number.to_string(),
                    PropertyValue::Flag(flag) => flag.to_string(),
                    PropertyValue::Nested(nested) => {
                        flatten(&full_name, nested, out);
                        continue;
                    }
                };
                out.insert(full_name, text);
            }
        }
        let entries = BTreeMap::<String, PropertyValue>::deserialize(deserializer)?;
        let mut properties = BTreeMap::new();
        flatten("", entries, &mut properties);
        Ok(Self(properties))
    }
}

impl fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(key, value)| {
                (key.as_str(), if is_secret_property(key) { "<redacted>" } else { value.as_str() })
            }))
            .finish()
    }
}

/// Topic settings used when Sluice creates its topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    /// Create missing topics at start. Off where topics are managed elsewhere (GitOps, Terraform).
    pub create_missing: bool,
    /// Partitions of a new stream topic: the upper bound on compactor parallelism.
    pub partitions: i32,
    /// Replication factor of new topics; -1 takes the broker's default (Kafka 2.4 and later).
    pub replication_factor: i32,
    pub stream_retention_ms: i64,
    pub dead_letter_retention_ms: i64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            create_missing: true,
            partitions: 4,
            replication_factor: -1,
            stream_retention_ms: 7 * 24 * 3_600_000,
            dead_letter_retention_ms: 30 * 24 * 3_600_000,
        }
    }
}

/// The `[kafka]` section of every service's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Prefix of every topic name: `<prefix>.<stream>`, `<prefix>.<stream>.dlq`, `<prefix>.jobs`.
    pub topic_prefix: String,
    /// Any librdkafka property, for example `"security.protocol" = "SASL_SSL"`.
    pub client: ClientProperties,
    pub topics: TopicSettings,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_string(),
            topic_prefix: "sluice".to_string(),
            client: ClientProperties::default(),
            topics: TopicSettings::default(),
        }
    }
}

impl KafkaConfig {
    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.bootstrap_servers.trim().is_empty() {
            issues.push(ConfigIssue::new(
                format!("{prefix}.bootstrap_servers"),
                "must list at least one host:port",
            ));
        }
        if self.topic_prefix.is_empty()
            || !self.topic_prefix.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
        {
            issues.push(ConfigIssue::new(
                format!("{prefix}.topic_prefix"),
                format!(
                    "'{}' is not a valid topic prefix: use letters, digits, '.', '_' and '-'",
                    self.topic_prefix
                ),
            ));
        }
        for (key, enforced) in ENFORCED_PRODUCER_SETTINGS.iter().chain(ENFORCED_CONSUMER_SETTINGS) {
            if let Some(given) = self.client.0.get(*key)
                && given != enforced
            {
                issues.push(ConfigIssue::new(
                    format!("{prefix}.client.\"{key}\""),
                    format!("Sluice requires {key}={enforced} for its delivery guarantees; remove the '{given}' setting"),
                ));
            }
        }
        if self.client.0.contains_key("bootstrap.servers") {
            issues.push(ConfigIssue::new(
                format!("{prefix}.client.\"bootstrap.servers\""),
                format!("set {prefix}.bootstrap_servers instead"),
            ));
        }
        if self.topics.partitions < 1 {
            issues.push(ConfigIssue::new(format!("{prefix}.topics.partitions"), "must be at least 1"));
        }
        if self.topics.replication_factor == 0 || self.topics.replication_factor < -1 {
            issues.push(ConfigIssue::new(
                format!("{prefix}.topics.replication_factor"),
                "must be at least 1, or -1 for the broker default",
            ));
        }
        issues
    }

    pub fn topic_names(&self) -> TopicNames {
        TopicNames { prefix: self.topic_prefix.clone() }
    }

    fn base_client_config(&self) -> ClientConfig {
        let mut client_config = ClientConfig::new();
        client_config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in &self.client.0 {
            client_config.set(key, value);
        }
        client_config
    }

    /// Producer settings: passthrough first, then the durability settings.
    pub fn producer_config(&self) -> ClientConfig {
        let mut client_config = self.base_client_config();
        for (key, value) in ENFORCED_PRODUCER_SETTINGS {
            client_config.set(*key, *value);
        }
        client_config
    }

    /// Consumer settings for `group_id`: passthrough first, then manual offset handling.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut client_config = self.base_client_config();
        client_config.set("group.id", group_id);
        for (key, value) in ENFORCED_CONSUMER_SETTINGS {
            client_config.set(*key, *value);
        }
        client_config
    }

    /// Sets each of `defaults` that the passthrough map does not set itself: the service's
    /// tuning, which users may override (unlike the enforced settings).
    pub fn set_defaults<V: Into<String>>(
        &self,
        client_config: &mut ClientConfig,
        defaults: impl IntoIterator<Item = (&'static str, V)>,
    ) {
        for (key, value) in defaults {
            if !self.client.0.contains_key(key) {
                client_config.set(key, value);
            }
        }
    }

    /// Settings for admin clients and metadata probes.
    pub fn admin_config(&self) -> ClientConfig {
        self.base_client_config()
    }

    pub fn stream_topic_spec(&self, stream: &str) -> TopicSpec {
        TopicSpec {
            name: self.topic_names().stream(stream),
            partitions: self.topics.partitions,
            replication_factor: self.topics.replication_factor,
            configs: vec![("retention.ms".into(), self.topics.stream_retention_ms.to_string())],
        }
    }

    pub fn dead_letter_topic_spec(&self, stream: &str) -> TopicSpec {
        TopicSpec {
            name: self.topic_names().dead_letter(stream),
            partitions: 1,
            replication_factor: self.topics.replication_factor,
            configs: vec![("retention.ms".into(), self.topics.dead_letter_retention_ms.to_string())],
        }
    }
}

impl KafkaConfig {
    /// The job definitions topic: compacted, so the latest definition of every job is kept.
    pub fn jobs_topic_spec(&self) -> TopicSpec {
        TopicSpec {
            name: self.topic_names().jobs(),
            partitions: self.topics.partitions,
            replication_factor: self.topics.replication_factor,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        }
    }

    /// The executor's event topics: job status and run history, kept like dead letters.
    pub fn job_event_topic_specs(&self) -> Vec<TopicSpec> {
        let names = self.topic_names();
        [names.job_status(), names.job_runs()]
            .into_iter()
            .map(|name| TopicSpec {
                name,
                partitions: 1,
                replication_factor: self.topics.replication_factor,
                configs: vec![("retention.ms".into(), self.topics.dead_letter_retention_ms.to_string())],
            })
            .collect()
    }
}

/// Topic names, all under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    pub fn stream(&self, stream: &str) -> String {
        format!("{}.{stream}", self.prefix)
    }

    pub fn dead_letter(&self, stream: &str) -> String {
        format!("{}.{stream}.dlq", self.prefix)
    }

    pub fn jobs(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// Accepted, rejected and deleted jobs, and windows marked failed: JSON, keyed by job.
    pub fn job_status(&self) -> String {
        format!("{}.job-status", self.prefix)
    }

    /// One Avro event per run attempt (schemas/events/job-run.avsc), keyed by job.
    pub fn job_runs(&self) -> String {
        format!("{}.job-runs", self.prefix)
    }
}

/// A topic Sluice needs, with the settings to create it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub configs: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("failed to create the Kafka {role} client")]
    CreateClient {
        role: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("failed to fetch metadata from {bootstrap_servers}")]
    FetchMetadata {
        bootstrap_servers: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("failed to create topic {topic}")]
    CreateTopics {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("failed to create topic {topic}: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
    #[error(
        "topic {topic} is missing and kafka.topics.create_missing is off; create it or turn the setting on"
    )]
    MissingTopic { topic: String },
}

pub type Result<T, E = KafkaError> = std::result::Result<T, E>;

/// What [`ensure_topics`] did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicStatus {
    Created,
    Existing { partitions: usize },
}

/// Makes sure every topic in `specs` exists: creates the missing ones when allowed, and reports a
/// partition count that differs from the spec (never changes an existing topic).
pub async fn ensure_topics(
    config: &KafkaConfig,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<Vec<(String, TopicStatus)>> {
    let admin_config = config.admin_config();
    let admin: AdminClient<DefaultClientContext> =
        admin_config.create().map_err(|source| KafkaError::CreateClient { role: "admin", source })?;
    let metadata = admin.inner().fetch_metadata(None, timeout).map_err(|source| {
        KafkaError::FetchMetadata { bootstrap_servers: config.bootstrap_servers.clone(), source }
    })?;
    let existing: BTreeMap<&str, usize> = metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| (topic.name(), topic.partitions().len()))
        .collect();
    let mut statuses = Vec::with_capacity(specs.len());
    let mut missing = Vec::new();
    for spec in specs {
        match existing.get(spec.name.as_str()) {
            Some(&partitions) => {
                if partitions != spec.partitions as usize {
                    tracing::warn!(topic = %spec.name, partitions, configured_partitions = spec.partitions, "existing topic has a different partition count; leaving it as it is");
                }
                statuses.push((spec.name.clone(), TopicStatus::Existing { partitions }));
            }
            None if !config.topics.create_missing => {
                return Err(KafkaError::MissingTopic { topic: spec.name.clone() });
            }
            None => missing.push(spec),
        }
    }
    if missing.is_empty() {
        return Ok(statuses);
    }
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|spec| {
            spec.configs.iter().fold(
                NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(spec.replication_factor)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| KafkaError::CreateTopics { topic: missing[0].name.clone(), source })?;
    for result in results {
        match result {
            Ok(topic) => {
                tracing::info!(%topic, "created topic");
                statuses.push((topic, TopicStatus::Created));
            }
            // Another replica created it between our metadata read and the create: fine.
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                statuses.push((topic, TopicStatus::Existing { partitions: 0 }))
            }
            Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, code }),
        }
    }
    Ok(statuses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforced_settings_win_over_passthrough() {
        let mut config = KafkaConfig::default();
        config.client.0.insert("acks".into(), "1".into());
        config.client.0.insert("linger.ms".into(), "20".into());
        let producer = config.producer_config();
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("linger.ms"), Some("20"));
        let consumer = config.consumer_config("g");
        let mut tuned = config.producer_config();
        config.set_defaults(&mut tuned, [("linger.ms", "5"), ("compression.type", "lz4")]);
        assert_eq!(tuned.get("linger.ms"), Some("20"), "passthrough wins over defaults");
        assert_eq!(tuned.get("compression.type"), Some("lz4"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("group.id"), Some("g"));
    }

    /// What docs/operations.md gives for a real cluster: librdkafka accepts each security setup
    /// at client creation only when it was built with them (the `ssl` feature), so a build
    /// without TLS or SCRAM fails here rather than at a user's first connection.
    #[test]
    fn tls_and_sasl_settings_pass_through_to_clients_that_accept_them() {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;

        let setups: [&[(&str, &str)]; 3] = [
            &[("security.protocol", "SSL")],
            &[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "sluice-ingest"),
                ("sasl.password", "secret"),
            ],
            &[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "KEY"),
                ("sasl.password", "SECRET"),
            ],
        ];
        for setup in setups {
            let mut config = KafkaConfig::default();
            for (key, value) in setup {
                config.client.0.insert((*key).into(), (*value).into());
            }
            assert_eq!(config.validate("kafka"), Vec::new());
            let producer = config.producer_config().create::<BaseProducer>();
            assert!(producer.is_ok(), "{setup:?}: {:?}", producer.err());
            let consumer = config.consumer_config("g").create::<BaseConsumer>();
            assert!(consumer.is_ok(), "{setup:?}: {:?}", consumer.err());
        }
        // What librdkafka cannot use is refused at creation, saying what: a protocol it does not
        // know, and SASL credentials left out.
        let refusals: [(&[(&str, &str)], &str); 2] = [
            (&[("security.protocol", "SASL_TLS")], "SASL_TLS"),
            (&[("security.protocol", "SASL_SSL"), ("sasl.mechanism", "PLAIN")], "sasl.username"),
        ];
        for (setup, named) in refusals {
            let mut config = KafkaConfig::default();
            for (key, value) in setup {
                config.client.0.insert((*key).into(), (*value).into());
            }
            let created = config.producer_config().create::<BaseProducer>();
            let error = created.err().map(|error| error.to_string()).unwrap_or_default();
            assert!(error.contains(named), "{setup:?}: {error:?}");
        }
    }

    #[test]
    fn contradicting_passthrough_is_a_named_error() {
        let mut config = KafkaConfig::default();
        config.client.0.insert("enable.auto.commit".into(), "true".into());
        config.topic_prefix = "bad prefix".into();
        let keys: Vec<String> = config.validate("kafka").into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["kafka.topic_prefix", "kafka.client.\"enable.auto.commit\""]);
    }

    #[test]
    fn secrets_are_hidden_in_debug() {
        let mut config = KafkaConfig::default();
        config.client.0.insert("sasl.password".into(), "hunter2".into());
        config.client.0.insert("sasl.username".into(), "svc".into());
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"));
        assert!(debug.contains("svc"));
    }

    #[test]
    fn client_properties_accept_dotted_nested_and_underscored_names() {
        let config: KafkaConfig = toml::from_str(
            "[client]\n\"linger.ms\" = 20\nsasl_password = \"x\"\n[client.ssl]\nca.location = \"/ca.pem\"\nenable_ssl_certificate_verification = false\n",
        )
        .unwrap();
        let properties: Vec<(&str, &str)> =
            config.client.0.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
        assert_eq!(
            properties,
            [
                ("linger.ms", "20"),
                ("sasl.password", "x"),
                ("ssl.ca.location", "/ca.pem"),
                ("ssl.enable.ssl.certificate.verification", "false"),
            ]
        );
    }

    #[test]
    fn topic_names_follow_the_prefix() {
        let names =
            KafkaConfig { topic_prefix: "acme.sluice".into(), ..KafkaConfig::default() }.topic_names();
        assert_eq!(names.stream("telemetry"), "acme.sluice.telemetry");
        assert_eq!(names.dead_letter("telemetry"), "acme.sluice.telemetry.dlq");
        assert_eq!(names.jobs(), "acme.sluice.jobs");
    }

    #[test]
    fn jobs_topic_is_compacted() {
        let spec = KafkaConfig::default().jobs_topic_spec();
        assert_eq!(spec.name, "sluice.jobs");
        assert!(spec.configs.contains(&("cleanup.policy".to_string(), "compact".to_string())));
    }
}
