//! Layered configuration for the Sluice services: built-in defaults, then a TOML file, then
//! `SLUICE_<SECTION>__<KEY>` environment variables. Unknown keys are errors and every error names
//! its key, so a typo in a deployment fails at start instead of being silently ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SLUICE_";
/// Separator between nested keys in environment variable names (`SLUICE_KAFKA__BOOTSTRAP_SERVERS`).
pub const ENV_SEPARATOR: &str = "__";

const MASK: &str = "<redacted>";

/// Substrings of key names whose values are secrets: masked by [`to_masked_toml`].
const SECRET_KEY_MARKERS: &[&str] = &["password", "secret", "token_sha256", "credential", "private_key"];

/// One configuration problem, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, for example `kafka.bootstrap_servers`.
    pub key: String,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    FileNotFound { path: PathBuf },
    #[error("invalid configuration ({} problem(s)):\n{}", issues.len(), format_issues(issues))]
    Invalid { issues: Vec<ConfigIssue> },
}

impl ConfigError {
    /// The problems found, for callers that want to show or test them one by one.
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            Self::FileNotFound { .. } => &[],
            Self::Invalid { issues } => issues,
        }
    }
}

fn format_issues(issues: &[ConfigIssue]) -> String {
    issues.iter().map(|issue| format!("  - {issue}")).collect::<Vec<_>>().join("\n")
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// Cross-field rules checked after loading and before any I/O.
pub trait Validate {
    /// Returns every problem found; an empty list means the configuration is usable.
    fn validate(&self) -> Vec<ConfigIssue>;
}

/// Loads `T` from its defaults, the optional TOML file and the process environment.
pub fn load<T>(config_path_opt: Option<&Path>) -> Result<T>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    load_from_figment(figment_for::<T>(config_path_opt)?)
}

/// The provider stack behind [`load`], exposed so that tests can layer their own values on top.
pub fn figment_for<T: Serialize + Default>(config_path_opt: Option<&Path>) -> Result<Figment> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(config_path) = config_path_opt {
        // Toml::file skips a missing file silently; a path given on the command line must exist.
        if !config_path.is_file() {
            return Err(ConfigError::FileNotFound { path: config_path.to_path_buf() });
        }
        figment = figment.merge(Toml::file_exact(config_path));
    }
    // Only variables with a section separator are configuration: SLUICE_BROKER_PORT and other
    // variables of the local tooling share the prefix but are not keys of any service.
    let env =
        Env::prefixed(ENV_PREFIX).filter(|key| key.as_str().contains(ENV_SEPARATOR)).split(ENV_SEPARATOR);
    Ok(figment.merge(env))
}

/// Extracts and validates `T` from a prepared figment.
pub fn load_from_figment<T>(figment: Figment) -> Result<T>
where
    T: DeserializeOwned + Validate,
{
    let config: T = figment.extract().map_err(|error| ConfigError::Invalid {
        issues: error
            .into_iter()
            .map(|error| {
                let key = error.path.join(".");
                let mut message = error.kind.to_string();
                if let Some(metadata) = &error.metadata {
                    message.push_str(&format!(" (from {})", metadata.name));
                    if let Some(source) = &metadata.source {
                        message.push_str(&format!(" {source}"));
                    }
                }
                ConfigIssue { key, message }
            })
            .collect(),
    })?;
    let issues = config.validate();
    if issues.is_empty() { Ok(config) } else { Err(ConfigError::Invalid { issues }) }
}

/// Renders the effective configuration as TOML with every secret replaced by a mask.
pub fn to_masked_toml<T: Serialize>(config: &T) -> Result<String, toml::ser::Error> {
    let mut value = toml::Value::try_from(config)?;
    mask_secrets(&mut value);
    toml::to_string_pretty(&value)
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // A bearer token (`forward.token`, `access_token`), not a list of token entries (`tokens`).
    let is_token = key == "token" || key.ends_with("_token") || key.ends_with(".token");
    is_token || SECRET_KEY_MARKERS.iter().any(|marker| key.contains(marker))
}

fn mask_secrets(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, entry) in table.iter_mut() {
                let is_set = !matches!(entry, toml::Value::String(text) if text.is_empty());
                if is_secret_key(key) && is_set && !entry.is_table() {
                    *entry = toml::Value::String(MASK.to_string());
                } else {
                    mask_secrets(entry);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

/// A configuration value that must not appear in logs: `Debug` masks it. Serialization keeps the
/// value (the loader round-trips defaults through it); [`to_masked_toml`] masks by key name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str("\"\"") } else { f.write_str(MASK) }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Whether a key of a free-form map (such as librdkafka properties) holds a secret.
pub fn is_secret_property(key: &str) -> bool {
    is_secret_key(key)
}

#[cfg(test)]
// figment's Jail closures return its large error type by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct TestConfig {
        kafka: KafkaSection,
        listen_port: u16,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct KafkaSection {
        bootstrap_servers: String,
        sasl_password: Secret,
        produce_timeout_ms: u64,
        request_timeout_ms: u64,
    }

    impl Default for TestConfig {
        fn default() -> Self {
            Self { kafka: KafkaSection::default(), listen_port: 8080 }
        }
    }

    impl Default for KafkaSection {
        fn default() -> Self {
            Self {
                bootstrap_servers: "127.0.0.1:9092".into(),
                sasl_password: Secret::default(),
                produce_timeout_ms: 5_000,
                request_timeout_ms: 10_000,
            }
        }
    }

    impl Validate for TestConfig {
        fn validate(&self) -> Vec<ConfigIssue> {
            let mut issues = Vec::new();
            if self.kafka.produce_timeout_ms > self.kafka.request_timeout_ms {
                issues.push(ConfigIssue::new(
                    "kafka.produce_timeout_ms",
                    "must not exceed kafka.request_timeout_ms",
                ));
            }
            issues
        }
    }

    #[test]
    fn file_then_environment_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "sluice.toml",
                "listen_port = 9000\n[kafka]\nbootstrap_servers = \"file:9092\"\n",
            )?;
            jail.set_env("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "env:9092");
            // Shares the prefix but has no section separator: tooling, not a key.
            jail.set_env("SLUICE_BROKER_PORT", "1234");
            let config: TestConfig = load(Some(Path::new("sluice.toml"))).expect("loads");
            assert_eq!(config.listen_port, 9000);
            assert_eq!(config.kafka.bootstrap_servers, "env:9092");
            assert_eq!(config.kafka.produce_timeout_ms, 5_000);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("sluice.toml", "[kafka]\nbootstrap_server = \"typo:9092\"\n")?;
            let error = load::<TestConfig>(Some(Path::new("sluice.toml"))).expect_err("typo rejected");
            let text = error.to_string();
            assert!(text.contains("bootstrap_server"), "{text}");
            assert!(text.contains("kafka"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn wrong_type_from_environment_names_key() {
        Jail::expect_with(|jail| {
            jail.set_env("SLUICE_KAFKA__PRODUCE_TIMEOUT_MS", "soon");
            let error = load::<TestConfig>(None).expect_err("not a number");
            let issue = &error.issues()[0];
            assert_eq!(issue.key, "kafka.produce_timeout_ms");
            Ok(())
        });
    }

    #[test]
    fn validation_reports_cross_field_rules() {
        Jail::expect_with(|jail| {
            jail.set_env("SLUICE_KAFKA__PRODUCE_TIMEOUT_MS", "20000");
            let error = load::<TestConfig>(None).expect_err("invalid");
            assert_eq!(error.issues()[0].key, "kafka.produce_timeout_ms");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        Jail::expect_with(|_jail| {
            let error = load::<TestConfig>(Some(Path::new("absent.toml"))).expect_err("missing");
            assert!(matches!(error, ConfigError::FileNotFound { .. }));
            Ok(())
        });
    }

    #[test]
    fn secrets_are_masked_in_print_and_debug() {
        let mut config = TestConfig::default();
        config.kafka.sasl_password = Secret::new("hunter2");
        let printed = to_masked_toml(&config).expect("serializes");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains(MASK));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn bearer_tokens_are_secret_and_lists_of_token_entries_are_not() {
        for key in ["token", "forward_token", "access_token", "TOKEN", "token_sha256", "sasl.password"] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["tokens", "token_name", "tokenizer", "streams"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }
}
