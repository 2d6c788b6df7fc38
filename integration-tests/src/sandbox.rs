//! The prologue most tests share, as one fixture.

use std::path::Path;

use anyhow::Context;

use crate::{Broker, compactor_config, executor_config, unique_suffix};

/// A test's own corner: a broker of its own, a topic prefix no other test uses, and a working
/// directory (removed on drop) that is the lake unless the test puts the lake elsewhere.
#[derive(Debug)]
pub struct Sandbox {
    pub broker: Broker,
    pub prefix: String,
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub async fn start() -> anyhow::Result<Self> {
        let broker = Broker::start().await?;
        let dir = tempfile::TempDir::new().context("failed to create the test's directory")?;
        Ok(Self { broker, prefix: format!("test-{}", unique_suffix()), dir })
    }

    /// The local lake: the working directory itself.
    pub fn lake_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The topic `<prefix>.<name>`: a stream's (`telemetry`) or a deployment topic (`jobs`,
    /// `job-runs`, `job-status`).
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    pub fn bootstrap_servers(&self) -> String {
        self.broker.bootstrap_servers()
    }

    /// [`compactor_config`] for this sandbox's broker, prefix and lake.
    pub fn compactor_config(&self) -> sluice_compactor::CompactorConfig {
        compactor_config(&self.broker, &self.prefix, self.lake_dir())
    }

    /// [`executor_config`] for this sandbox's broker, prefix and lake.
    pub fn executor_config(&self) -> sluice_executor::ExecutorConfig {
        executor_config(&self.broker, &self.prefix, self.lake_dir())
    }
}
