//! The configuration reference in docs/operations.md and the example files in deploy/config/
//! against the services' config structs: every key documented exists, and every key that exists
//! is documented, in the reference table and in the example file.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;

use serde_json::Value;
use sluice_integration_tests::repo_root;

/// Dotted keys of a config's default, serialized. Sections recurse; values, lists and maps
/// (such as `kafka.client`, empty by default) are keys.
fn struct_keys(value: &Value) -> BTreeSet<String> {
    fn walk(prefix: &str, value: &Value, keys: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) if !map.is_empty() && !prefix.is_empty() && is_open_map(prefix) => {
                keys.insert(prefix.to_string());
            }
            Value::Object(map) if !map.is_empty() => {
                for (name, child) in map {
                    let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                    walk(&key, child, keys);
                }
            }
            _ => {
                keys.insert(prefix.to_string());
            }
        }
    }
    let mut keys = BTreeSet::new();
    walk("", value, &mut keys);
    keys
}

/// Maps whose entries are the user's (librdkafka properties, store options, per-stream settings),
/// not keys of Sluice's own.
fn is_open_map(key: &str) -> bool {
    matches!(key, "kafka.client" | "object_store.options" | "compactor.granularity")
}

/// The `### <service>` section of docs/operations.md.
fn section<'a>(operations: &'a str, service: &str) -> &'a str {
    let heading = format!("### {service}\n");
    let start = operations.find(&heading).unwrap_or_else(|| panic!("operations.md has {heading}"));
    let rest = &operations[start + heading.len()..];
    let end = ["\n### ", "\n## "].iter().filter_map(|marker| rest.find(marker)).min().unwrap_or(rest.len());
    &rest[..end]
}

/// Keys named in the first column of the section's table (a cell may name several).
fn documented_keys(section: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for line in section.lines().filter(|line| line.starts_with("| `")) {
        let cell = line.split('|').nth(1).unwrap();
        keys.extend(cell.split('`').skip(1).step_by(2).map(str::to_string));
    }
    keys
}

/// Keys an example TOML file sets or shows commented out, and the section headers it has.
fn example_keys(service: &str) -> BTreeSet<String> {
    let file = service.trim_start_matches("sluice-");
    let path = repo_root().join(format!("deploy/config/{file}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        let header = line.split('#').next().unwrap().trim();
        if let Some(name) = header.strip_prefix("[[").and_then(|rest| rest.strip_suffix("]]")) {
            section = name.to_string();
            keys.insert(section.clone());
        } else if let Some(name) = header.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
            section = name.to_string();
            keys.insert(section.clone());
        } else if let Some((name, _)) = line.split_once(" = ")
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            keys.insert(if section.is_empty() { name.to_string() } else { format!("{section}.{name}") });
        }
    }
    keys
}

/// Sections the docs say are "the same as" another service's: (key prefix, that service).
fn inherited(service: &str) -> &'static [(&'static str, &'static str)] {
    match service {
        "sluice-compactor" => &[("kafka.", "sluice-ingest"), ("telemetry.", "sluice-ingest")],
        "sluice-executor" => &[
            ("kafka.", "sluice-compactor"),
            ("telemetry.", "sluice-compactor"),
            ("schemas.", "sluice-compactor"),
            ("object_store.", "sluice-compactor"),
        ],
        "sluice-edge" => &[
            ("http.", "sluice-ingest"),
            ("auth.", "sluice-ingest"),
            ("validation.", "sluice-ingest"),
            ("mqtt.", "sluice-ingest"),
            ("schemas.", "sluice-ingest"),
            ("telemetry.", "sluice-ingest"),
        ],
        _ => &[],
    }
}

/// Keys documented for a service: its table, and what its prose says it shares with another.
fn documented_for(operations: &str, service: &str) -> BTreeSet<String> {
    let text = section(operations, service);
    let mut documented = documented_keys(text);
    for (prefix, from) in inherited(service) {
        assert!(
            text.contains(&format!("`{prefix}*`")),
            "{service}: the section says that `{prefix}*` is as {from}'s"
        );
        documented.extend(documented_for(operations, from).into_iter().filter(|key| key.starts_with(prefix)));
    }
    documented
}

fn check(service: &str, default: Value) {
    let operations = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let keys = struct_keys(&default);
    let documented = documented_for(&operations, service);
    let undocumented: Vec<&String> = keys.difference(&documented).collect();
    assert!(undocumented.is_empty(), "{service}: keys missing from docs/operations.md: {undocumented:?}");
    let unknown: Vec<&String> = documented.difference(&keys).collect();
    assert!(
        unknown.is_empty(),
        "{service}: docs/operations.md documents keys that do not exist: {unknown:?}"
    );

    let example = example_keys(service);
    let missing: Vec<&String> = keys.difference(&example).collect();
    assert!(missing.is_empty(), "{service}: keys missing from its file in deploy/config/: {missing:?}");
    // Every example key is a key, a section holding keys, or inside a key that is a map or list.
    let stray: Vec<&String> = example
        .iter()
        .filter(|name| {
            !keys.iter().any(|key| {
                key == *name || key.starts_with(&format!("{name}.")) || name.starts_with(&format!("{key}."))
            })
        })
        .collect();
    assert!(
        stray.is_empty(),
        "{service}: deploy/config/{service}.toml sets keys that do not exist: {stray:?}"
    );
}

#[test]
fn ingest_configuration_reference_matches_the_config_struct() {
    check("sluice-ingest", serde_json::to_value(sluice_ingest::IngestConfig::default()).unwrap());
}

#[test]
fn compactor_configuration_reference_matches_the_config_struct() {
    check("sluice-compactor", serde_json::to_value(sluice_compactor::CompactorConfig::default()).unwrap());
}

#[test]
fn executor_configuration_reference_matches_the_config_struct() {
    check("sluice-executor", serde_json::to_value(sluice_executor::ExecutorConfig::default()).unwrap());
}

#[test]
fn edge_configuration_reference_matches_the_config_struct() {
    check("sluice-edge", serde_json::to_value(sluice_edge::EdgeConfig::default()).unwrap());
}

#[test]
fn key_extraction_sees_sections_maps_and_commented_keys() {
    let keys = struct_keys(&serde_json::json!({
        "http": {"listen_address": "x", "tls_cert_path": null},
        "kafka": {"client": {"linger.ms": "5"}, "topics": {"partitions": 4}},
        "auth": {"tokens": []}
    }));
    assert_eq!(
        keys.into_iter().collect::<Vec<_>>(),
        [
            "auth.tokens",
            "http.listen_address",
            "http.tls_cert_path",
            "kafka.client",
            "kafka.topics.partitions"
        ]
    );
    assert_eq!(
        documented_keys("| `mqtt.host`, `mqtt.port` | x | y |\n| key | default |\n")
            .into_iter()
            .collect::<Vec<_>>(),
        ["mqtt.host", "mqtt.port"]
    );
}
