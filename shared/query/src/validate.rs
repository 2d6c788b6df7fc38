//! Whether a job definition may run: it parses, stays within the executor's limits, plans as one
//! read-only query over known tables, and its result can be stored. The executor checks every
//! definition it receives; the CLI checks a file before submitting it, with the same answer.

use std::collections::BTreeSet;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::LogicalPlan;
use sluice_errors::{ErrorClass, chain_text};
use sluice_jobs::job::{DefinitionError, Engine, JobDefinition};
use sluice_lake::layout::RESULT_PARTITION_COLUMN;

use crate::catalog::{Catalog, CatalogError, QueryError, Scope, has_io_cause, plan_query};
use crate::encryption::Reader;

/// Why a definition was not accepted. Each message is for the submitter; [`Self::class`] says
/// whether the definition is at fault or the lake was.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// Asks for more than this executor allows (its timeout).
    #[error("{0}")]
    Limit(String),
    #[error(
        "engine 'ballista' needs a Ballista cluster, and this executor has none \
         (ballista.scheduler_url is not set); use engine 'local' or configure one"
    )]
    NoCluster,
    /// The tables could not be read to plan against. The whole chain is the message (not a
    /// `source`), since the submitter sees only the message.
    #[error("{}", chain_text(.0))]
    Catalog(CatalogError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(
        "the result has a column named {RESULT_PARTITION_COLUMN}, the partition column of the \
         results table: name it differently (AS ...)"
    )]
    PartitionColumnInResult,
    #[error("{0}")]
    UnstorableResult(String),
}

impl ValidationError {
    /// Poison when the definition is at fault; retryable when reading the lake or a reference
    /// table failed, which says nothing about the definition.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Catalog(CatalogError::Lake(_)) => ErrorClass::Retryable,
            Self::Catalog(CatalogError::DataFusion(source) | CatalogError::Reference { source, .. })
                if has_io_cause(source) =>
            {
                ErrorClass::Retryable
            }
            _ => ErrorClass::Poison,
        }
    }
}

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
) -> Result<ValidatedJob, ValidationError> {
    let definition = JobDefinition::parse(text, key_opt)?;
    catalog.run_limits().check_definition(&definition).map_err(ValidationError::Limit)?;
    if definition.engine == Engine::Ballista && !cluster_configured {
        return Err(ValidationError::NoCluster);
    }
    let snapshot = catalog.snapshot().await.map_err(ValidationError::Catalog)?;
    let reader = Reader::job(&definition.name, definition.engine);
    let ctx =
        catalog.session_for(&snapshot, Scope::All, false, reader).await.map_err(ValidationError::Catalog)?;
    let frame = plan_query(&ctx, &definition.sql, Some((0, definition.window_micros))).await?;
    let result_schema = frame.schema().as_arrow();
    if result_schema.field_with_name(RESULT_PARTITION_COLUMN).is_ok() {
        return Err(ValidationError::PartitionColumnInResult);
    }
    crate::result_types::storable_schema(result_schema).map_err(ValidationError::UnstorableResult)?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::error::DataFusionError;

    use super::*;

    #[test]
    fn only_a_failure_to_read_the_tables_is_worth_another_try() {
        let not_found = || object_store::Error::NotFound {
            path: "reference/sites.csv".into(),
            source: "gone for a moment".into(),
        };
        let cases = [
            (
                ValidationError::Catalog(CatalogError::Reference {
                    name: "sites".into(),
                    path: "reference/sites.csv".into(),
                    source: DataFusionError::ObjectStore(Box::new(not_found())),
                }),
                ErrorClass::Retryable,
            ),
            (
                ValidationError::Catalog(CatalogError::DataFusion(DataFusionError::External(Box::new(
                    DataFusionError::Shared(Arc::new(DataFusionError::ObjectStore(Box::new(not_found())))),
                )))),
                ErrorClass::Retryable,
            ),
            (
                ValidationError::Catalog(CatalogError::DataFusion(DataFusionError::Plan(
                    "no such function".into(),
                ))),
                ErrorClass::Poison,
            ),
            (
                ValidationError::Query(QueryError::Planning(DataFusionError::Plan(
                    "column 'humidityy' not found".into(),
                ))),
                ErrorClass::Poison,
            ),
            (ValidationError::Definition(DefinitionError("bad window".into())), ErrorClass::Poison),
            (
                ValidationError::Limit("timeout 3650d is more than this executor allows".into()),
                ErrorClass::Poison,
            ),
            (ValidationError::NoCluster, ErrorClass::Poison),
            (ValidationError::PartitionColumnInResult, ErrorClass::Poison),
            (ValidationError::UnstorableResult("a column of type Duration".into()), ErrorClass::Poison),
        ];
        for (error, class) in cases {
            assert_eq!(error.class(), class, "{error}");
        }
    }

    #[test]
    fn refusals_say_what_to_change() {
        assert!(ValidationError::NoCluster.to_string().contains("ballista.scheduler_url is not set"));
        assert_eq!(
            ValidationError::PartitionColumnInResult.to_string(),
            format!(
                "the result has a column named {RESULT_PARTITION_COLUMN}, the partition column of the \
                 results table: name it differently (AS ...)"
            )
        );
        let lake = ValidationError::Catalog(CatalogError::DataFusion(DataFusionError::Plan(
            "no such function".into(),
        )));
        assert!(lake.to_string().starts_with("failed to set up the query engine"), "{lake}");
    }
}
