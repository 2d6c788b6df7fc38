//! Markers that keep one definition from stopping the executor over and over: the text of a
//! definition is written to the state directory before it is validated and removed after. A
//! marker found with the same text means a previous process died validating it (a crash, an
//! abort, a kill), and the definition is refused with that reason instead of validated again.
//! Definitions stay in the jobs topic, so without this a definition that kills the process
//! would kill every restart.

use std::path::{Path, PathBuf};

/// The markers of one executor (one state directory).
#[derive(Debug, Clone)]
pub struct ValidationMarkers {
    directory: PathBuf,
}

/// A definition the previous process died validating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiedValidating {
    pub marker: PathBuf,
}

impl DiedValidating {
    /// What the submitter reads on the status topic.
    pub fn reason(&self) -> String {
        format!(
            "an executor stopped (crashed or was killed) while validating this exact definition, so it \
             is refused without being validated again; change the definition and submit it again, or \
             remove {} on that executor to retry it as it is",
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

    /// Whether a previous process died validating `text` as `job`.
    pub fn died_validating(&self, job: &str, text: &str) -> Option<DiedValidating> {
        let marker = self.path(job);
        match std::fs::read(&marker) {
            Ok(content) if content == text.as_bytes() => Some(DiedValidating { marker }),
            _ => None,
        }
    }

    /// Writes the marker before validation starts.
    pub fn begin(&self, job: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(self.path(job), text)
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
    fn a_marker_left_behind_refuses_that_text_only() {
        let directory = tempfile::TempDir::new().unwrap();
        let markers = ValidationMarkers::open(directory.path()).unwrap();
        assert!(markers.died_validating("a", "SELECT 1").is_none());
        markers.begin("a", "SELECT 1").unwrap();
        // A restart: the same directory, a new process.
        let restarted = ValidationMarkers::open(directory.path()).unwrap();
        let died = restarted.died_validating("a", "SELECT 1").unwrap();
        assert!(died.reason().contains("a.sql"), "{}", died.reason());
        assert!(restarted.died_validating("a", "SELECT 2").is_none());
        assert!(restarted.died_validating("b", "SELECT 1").is_none());
        restarted.end("a").unwrap();
        assert!(restarted.died_validating("a", "SELECT 1").is_none());
        restarted.end("a").unwrap();
        // Keys that are not job names never leave the directory.
        markers.begin("../x", "SELECT 1").unwrap();
        assert!(directory.path().join("validating/key-2e2e2f78.sql").exists());
    }
}
