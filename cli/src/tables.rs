//! `sluice tables`: what SQL can read, with each table's columns.

use std::process::ExitCode;

use sluice_query::Scope;

use crate::catalog::{open_catalog, runtime};
use crate::settings::CliSettings;

pub(crate) fn run(config: &CliSettings) -> anyhow::Result<ExitCode> {
    let catalog = open_catalog(config)?;
    let runtime = runtime()?;
    let snapshot = runtime.block_on(catalog.snapshot())?;
    let ctx = runtime.block_on(catalog.session(&snapshot, Scope::All, false))?;
    for stream in catalog.stream_names() {
        let files = snapshot.files(&stream);
        let rows: u64 = files.iter().map(|file| file.num_rows).sum();
        let bytes: u64 = files.iter().map(|file| file.size_bytes).sum();
        let version = snapshot
            .versions()
            .get(&stream)
            .map_or_else(|| "no table yet".to_string(), |version| format!("Delta version {version}"));
        outln!(
            "{stream} (stream, {version}, {} files, {rows} rows, {bytes} bytes, partitioned by {:?})",
            files.len(),
            snapshot.granularity(&stream)
        );
        print_columns(&runtime, &ctx, &stream)?;
    }
    for reference in catalog.reference_tables() {
        outln!("{} (reference, {:?} at {})", reference.name, reference.format, reference.path);
        print_columns(&runtime, &ctx, &reference.name)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_columns(
    runtime: &tokio::runtime::Runtime,
    ctx: &datafusion::prelude::SessionContext,
    table: &str,
) -> anyhow::Result<()> {
    match runtime.block_on(ctx.table_provider(table)) {
        Ok(provider) => {
            for field in provider.schema().fields() {
                outln!(
                    "  {:<20} {}{}",
                    field.name(),
                    field.data_type(),
                    if field.is_nullable() { "" } else { " NOT NULL" }
                );
            }
        }
        Err(error) => outln!("  (cannot be read: {})", sluice_query::catalog::describe(&error)),
    }
    Ok(())
}
