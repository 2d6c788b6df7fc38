//! Markers that keep one definition from stopping the executor over and over: the text of a
//! definition is written to the state directory before it is validated and removed after. A
//! marker found with the same text means a previous process died validating it (a crash, an
//! abort, a kill). Definitions stay in the jobs topic, so without this a definition that kills
//! the process would kill every restart.
//!
//! The first death is forgiven once: a replica killed for another reason (an OOM kill of the
//! node, an operator's `kill -9`, the crash tests) in the middle of validating a good definition
//! must not lose that job. A second process dying on the same text makes it poison, and it is
//! refused from then on without being validated again.

use std::path::{Path, PathBuf};

use crate::config::ExecutorConfig;

/// `executor.state_dir`, or a directory of the group under the temporary directory; a
/// configured instance id gets its own, so replicas on one machine never read each other's.
pub fn state_dir(config: &ExecutorConfig) -> PathBuf {
    let section = &config.executor;
    let base = if section.state_dir.is_empty() {
        std::env::temp_dir().join("sluice-executor").join(&section.group_id)
    } else {
        PathBuf::from(&section.state_dir)
    };
    if section.instance_id.is_empty() { base } else { base.join(&section.instance_id) }
}

/// The markers of one executor (one state directory).
#[derive(Debug, Clone)]
pub struct ValidationMarkers {
    directory: PathBuf,
}

/// Processes that may die validating the same text before it is refused.
pub const MAX_DEATHS_VALIDATING: u32 = 2;

/// A definition processes died validating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiedValidating {
    pub marker: PathBuf,
    pub num_deaths: u32,
}

impl DiedValidating {
    /// What the submitter reads on the status topic.
    pub fn reason(&self) -> String {
        format!(
            "an executor stopped (crashed or was killed) while validating this exact definition, {} \
             times, so it is refused without being validated again; change the definition and submit \
             it again, or remove {} on that executor to retry it as it is",
            self.num_deaths,
            self.marker.display()
        )
    }
}

impl ValidationMarkers {
    /// Creates the directory if needed; an error here means markers cannot protect this process.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let directory = state_dir.join("validating");
        std::fs::create_dir_all(&directory)?;
        Ok(Self { directory })
    }

    /// Job names are checked before they reach here (lowercase letters, digits, `_`, `-`), so a
    /// name is a safe file name; any other key is hex-encoded to stay inside the directory.
    fn path(&self, job: &str) -> PathBuf {
        let safe = crate::job::validate_name(job).is_ok();
        let file_name = if safe {
            format!("{job}.sql")
        } else {
            let hex: String = job.bytes().map(|byte| format!("{byte:02x}")).collect();
            format!("key-{hex}.sql")
        };
        self.directory.join(file_name)
    }

    // Plain blocking file calls: one small file per definition, and tokio's `fs` feature would
    // change the features of every crate built with tokio.

    /// How many processes died validating `text` as `job` (a marker holds the count on its
    /// first line, then the text).
    fn num_deaths(&self, job: &str, text: &str) -> u32 {
        let Ok(content) = std::fs::read(self.path(job)) else { return 0 };
        let Some(newline) = content.iter().position(|byte| *byte == b'\n') else { return 0 };
        if &content[newline + 1..] != text.as_bytes() {
            return 0;
        }
        std::str::from_utf8(&content[..newline])
            .ok()
            .and_then(|line| line.strip_prefix("deaths: "))
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    }

    /// Whether enough processes died validating `text` as `job` for it to be refused.
    pub fn died_validating(&self, job: &str, text: &str) -> Option<DiedValidating> {
        let num_deaths = self.num_deaths(job, text);
        (num_deaths >= MAX_DEATHS_VALIDATING).then(|| DiedValidating { marker: self.path(job), num_deaths })
    }

    /// Writes the marker before validation starts, counting the death of a process that
    /// started validating the same text and never finished.
    pub fn begin(&self, job: &str, text: &str) -> std::io::Result<()> {
        let num_deaths = self.num_deaths(job, text).saturating_add(1);
        let mut content = format!("deaths: {num_deaths}\n").into_bytes();
        content.extend_from_slice(text.as_bytes());
        std::fs::write(self.path(job), content)
    }

    /// Removes the marker after validation finished, refused or not.
    pub fn end(&self, job: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(job)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    #[test]
    fn a_text_two_processes_died_validating_is_refused_and_no_other() {
        let directory = tempfile::TempDir::new().unwrap();
        let markers = ValidationMarkers::open(directory.path()).unwrap();
        assert!(markers.died_validating("a", "SELECT 1").is_none());
        markers.begin("a", "SELECT 1").unwrap();
        // A restart: the same directory, a new process. One death is forgiven.
        let restarted = ValidationMarkers::open(directory.path()).unwrap();
        assert!(restarted.died_validating("a", "SELECT 1").is_none());
        restarted.begin("a", "SELECT 1").unwrap();
        // The second process died too.
        let restarted = ValidationMarkers::open(directory.path()).unwrap();
        let died = restarted.died_validating("a", "SELECT 1").unwrap();
        assert_eq!(died.num_deaths, 2);
        assert!(died.reason().contains("2 times") && died.reason().contains("a.sql"), "{}", died.reason());
        assert!(restarted.died_validating("a", "SELECT 2").is_none());
        assert!(restarted.died_validating("b", "SELECT 1").is_none());
        // Another text starts the count again; a finished validation removes the marker.
        restarted.begin("a", "SELECT 2").unwrap();
        assert!(restarted.died_validating("a", "SELECT 1").is_none());
        restarted.end("a").unwrap();
        restarted.begin("a", "SELECT 1").unwrap();
        assert!(restarted.died_validating("a", "SELECT 1").is_none());
        restarted.end("a").unwrap();
        restarted.end("a").unwrap();
        // Keys that are not job names never leave the directory.
        markers.begin("../x", "SELECT 1").unwrap();
        assert!(directory.path().join("validating/key-2e2e2f78.sql").exists());
    }
}
