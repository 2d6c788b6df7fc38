//! The lake as the commands that read it see it: the executor's catalog, and a runtime to await
//! its reads on.

use anyhow::Context;
use sluice_query::Catalog;

use crate::settings::CliSettings;

/// The catalog the configuration describes, as the executor builds it (without its cluster).
pub(crate) fn open_catalog(config: &CliSettings) -> anyhow::Result<Catalog> {
    Ok(sluice_query::open_catalog(
        &config.schemas,
        &config.object_store,
        &config.tables,
        &config.query,
        &config.encryption,
        config.executor.max_timeout_ms,
    )?)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("failed to start the runtime")
}
