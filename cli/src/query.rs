//! `sluice query`: one read-only query over everything committed in the lake.

use std::process::ExitCode;

use datafusion::arrow::array::RecordBatch;
use sluice_query::{Catalog, Reader, Scope, plan_query};

use crate::catalog::{open_catalog, runtime};
use crate::output::{self, OutputFormat};
use crate::settings::CliSettings;

pub(crate) fn run(config: &CliSettings, sql: &str, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let catalog: Catalog = open_catalog(config)?;
    let runtime = runtime()?;
    let batches: Vec<RecordBatch> = runtime.block_on(async {
        let snapshot = catalog.snapshot().await?;
        // Whoever runs the CLI with the key file reads what it decrypts.
        let ctx = catalog.session_for(&snapshot, Scope::All, false, Reader::KeyHolder).await?;
        let frame = plan_query(&ctx, sql, None).await.map_err(anyhow::Error::msg)?;
        frame.collect().await.map_err(|error| anyhow::anyhow!(sluice_query::catalog::describe(&error)))
    })?;
    output::print_batches(&batches, format)?;
    Ok(ExitCode::SUCCESS)
}
