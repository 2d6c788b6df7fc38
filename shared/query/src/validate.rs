//! Whether a job definition may run: it parses, stays within the executor's limits, plans as one
//! read-only query over known tables, and its result can be stored. The executor checks every
//! definition it receives; the CLI checks a file before submitting it, with the same answer.

use std::collections::BTreeSet;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::LogicalPlan;
use sluice_errors::chain_text;
use sluice_jobs::job::{Engine, JobDefinition};
use sluice_jobs::records::RESULT_PARTITION_COLUMN;

use crate::catalog::{Catalog, Scope, plan_query};

/// A job that planned: the definition and what it reads.
#[derive(Debug, Clone)]
pub struct ValidatedJob {
    pub definition: JobDefinition,
    /// Streams the query reads; their watermarks decide when a window is complete.
    pub streams: Vec<String>,
}

/// Checks a job against the catalog: it must plan as one read-only query over known tables.
/// `cluster_configured` says whether the executor has a Ballista cluster for `engine: ballista`
/// (the CLI knows it from the configuration without connecting to one).
pub async fn validate_job(
    catalog: &Catalog,
    text: &str,
    key_opt: Option<&str>,
    cluster_configured: bool,
) -> Result<ValidatedJob, String> {
    let definition = JobDefinition::parse(text, key_opt).map_err(|error| error.0)?;
    catalog.run_limits().check_definition(&definition)?;
    if definition.engine == Engine::Ballista && !cluster_configured {
        return Err("engine 'ballista' needs a Ballista cluster, and this executor has none \
                    (ballista.scheduler_url is not set); use engine 'local' or configure one"
            .to_string());
    }
    let snapshot = catalog.snapshot().await.map_err(|error| chain_text(&error))?;
    let ctx = catalog.session(&snapshot, Scope::All, false).await.map_err(|error| chain_text(&error))?;
    let frame = plan_query(&ctx, &definition.sql, Some((0, definition.window_micros)))
        .await
        .map_err(|error| error.0)?;
    let result_schema = frame.schema().as_arrow();
    if result_schema.field_with_name(RESULT_PARTITION_COLUMN).is_ok() {
        return Err(format!(
            "the result has a column named {}, the partition column of the results table: name it \
             differently (AS ...)",
            RESULT_PARTITION_COLUMN
        ));
    }
    crate::result_types::storable_schema(result_schema)?;
    let stream_names: BTreeSet<String> = catalog.stream_names().into_iter().collect();
    let mut streams = BTreeSet::new();
    let _ = frame.logical_plan().apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let table = scan.table_name.table();
            if stream_names.contains(table) {
                streams.insert(table.to_string());
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    Ok(ValidatedJob { definition, streams: streams.into_iter().collect() })
}
