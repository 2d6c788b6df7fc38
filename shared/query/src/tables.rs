//! The tables a job may read besides the streams, as the configuration names them. Apart from
//! the catalog so that the configuration does not depend on the query layer.

use serde::{Deserialize, Serialize};
use sluice_config::ConfigIssue;

/// A table that is not a stream: a device registry, a site list. Read as it is in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceTable {
    pub name: String,
    /// Path under the store root: a file, or a directory ending in `/`.
    pub path: String,
    pub format: ReferenceFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceFormat {
    /// With a header row.
    Csv,
    Parquet,
}

/// Tables besides the streams (which come from schemas/).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TablesConfig {
    pub reference: Vec<ReferenceTable>,
}

impl TablesConfig {
    /// Names must be SQL identifiers and unique, paths set; `prefix` is the section's key.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for (index, table) in self.reference.iter().enumerate() {
            if table.name.is_empty() || !table.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                issues.push(ConfigIssue::new(
                    format!("{prefix}.reference[{index}].name"),
                    "must be letters, digits and '_'",
                ));
            }
            if !names.insert(table.name.as_str()) {
                issues.push(ConfigIssue::new(format!("{prefix}.reference[{index}].name"), "is given twice"));
            }
            if table.path.is_empty() {
                issues.push(ConfigIssue::new(format!("{prefix}.reference[{index}].path"), "must be set"));
            }
        }
        issues
    }
}
