//! Why an attempt at a window failed, and what the scheduler does about it ([`ErrorClass`]):
//! retry it after a backoff, fail the window at once with the reason, or stop the process.
//! Decided from typed errors where they are built (DataFusion's variants, the lake's errors),
//! since the messages the outcome keeps are for people.
//!
//! | failure | class |
//! | --- | --- |
//! | reading or writing the lake (snapshot, result file, result commit), an object store or I/O error anywhere in a query's causes | retryable |
//! | the attempt's timeout | retryable |
//! | a panic in a function or operator (on the run threads, or a task DataFusion spawned) | retryable |
//! | an error from outside DataFusion (the Ballista cluster) | retryable |
//! | a query that planned failing while it runs (Arrow compute errors such as a cast or a division by zero, DataFusion `Execution` errors) | retryable, see below |
//! | SQL, names, types, plans DataFusion cannot run (`SQL`, `Plan`, `SchemaError`, `NotImplemented`, `Configuration`, `Internal`) | poison |
//! | a limit: result rows or bytes, a value or a function's output past its bound, the run's memory pool (`ResourcesExhausted`) | poison |
//! | a result that cannot be stored (a column type the results table cannot hold, the partition column's name) | poison |
//! | the run threads shut down under the run (its task cancelled without a panic) | fatal |
//!
//! Run-time failures of a planned query stay retryable, as they always were: by variant they
//! cannot be told from failures that pass (a Ballista task lost with its worker comes back as an
//! `Execution` error), and integration-tests/tests/executor.rs pins that a cast failing at run
//! time is retried (`failing_cast`: attempt 2, runs `[Retrying, Failed]`). `ResourcesExhausted`
//! is poison because each run has a memory pool of its own (`query.memory_limit_bytes`, not
//! shared with other runs) and the bounds on values are raised as it too: another attempt
//! meets the same bound (integration-tests/tests/executor_limits.rs: one attempt each).

use std::time::Duration;

use datafusion::error::DataFusionError;
use sluice_errors::{ErrorClass, chain_text};
use sluice_query::catalog::{CatalogError, QueryError, describe, has_io_cause};

/// Why an attempt failed. The message is what the outcome record, the run event and the
/// `window_failed` status event say.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    /// The query failed while being planned or run; `class` was decided where the error was
    /// built, from its type.
    #[error("{message}")]
    Query { message: String, class: ErrorClass },
    /// Past a bound of the run's (result size, value size, memory): running again gives the
    /// same answer, so the window fails without retrying.
    #[error("{0}")]
    Limit(String),
    #[error("the run exceeded its timeout of {0:?}")]
    Timeout(Duration),
    #[error("failed to read or write the lake: {0}")]
    Lake(String),
    /// The query's result cannot be stored as it is: another attempt gives the same answer.
    #[error("{0}")]
    Invalid(String),
    /// A function or operator panicked. It ran on the run threads, so only this run failed.
    #[error("the run failed unexpectedly (panic): {0}")]
    Panicked(String),
    /// The run's task was cancelled without a panic: nothing aborts it before it is awaited, so
    /// the run threads were shut down, and every later run would end the same way.
    #[error("the run was stopped: {0}")]
    Stopped(String),
}

impl RunError {
    /// What the scheduler does with this failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Query { class, .. } => *class,
            Self::Timeout(_) | Self::Lake(_) | Self::Panicked(_) => ErrorClass::Retryable,
            Self::Limit(_) | Self::Invalid(_) => ErrorClass::Poison,
            Self::Stopped(_) => ErrorClass::Fatal,
        }
    }

    /// A failure of DataFusion's: past the memory pool or a value bound is a limit.
    pub(crate) fn from_datafusion(error: &DataFusionError) -> Self {
        match error.find_root() {
            DataFusionError::ResourcesExhausted(_) => Self::Limit(describe(error)),
            _ => Self::Query { message: describe(error), class: classify_datafusion(error) },
        }
    }

    /// `plan_query` refused the SQL or could not plan it. Its errors are about the SQL alone
    /// (its tables are registered already, so planning reads nothing), and are the same on
    /// every attempt.
    pub(crate) fn planning(error: QueryError) -> Self {
        Self::Query { message: error.to_string(), class: ErrorClass::Poison }
    }

    /// The session the query runs in could not be set up.
    pub(crate) fn session(error: &CatalogError) -> Self {
        let class = match error {
            CatalogError::Lake(_) => ErrorClass::Retryable,
            CatalogError::DataFusion(source) | CatalogError::Reference { source, .. } => {
                classify_datafusion(source)
            }
        };
        Self::Query { message: chain_text(error), class }
    }
}

/// What another attempt of a query that failed with `error` may do. Input/output anywhere in
/// the causes decides first (a scan's store error arrives wrapped in Parquet's or DataFusion's
/// `External`); otherwise the innermost DataFusion error does (`Context`, `Shared` and
/// `Diagnostic` only wrap one).
pub(crate) fn classify_datafusion(error: &DataFusionError) -> ErrorClass {
    if has_io_cause(error) {
        return ErrorClass::Retryable;
    }
    match error.find_root() {
        // Reading the lake's files: a store that failed, a file merged away under the scan, a
        // spill file that could not be written.
        DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) | DataFusionError::ParquetError(_) => {
            ErrorClass::Retryable
        }
        // A task of the plan panicked, or something outside DataFusion (the Ballista cluster)
        // failed for a reason this side cannot see.
        DataFusionError::ExecutionJoin(_) | DataFusionError::External(_) => ErrorClass::Retryable,
        // Failures of a planned query while it runs (see the module's table for why retried).
        DataFusionError::ArrowError(..) | DataFusionError::Execution(_) => ErrorClass::Retryable,
        // Each run has a pool of its own, and value bounds are raised as this: the same again.
        DataFusionError::ResourcesExhausted(_) => ErrorClass::Poison,
        // The SQL, its names and types, or a plan DataFusion cannot run: the same every time.
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Configuration(_)
        | DataFusionError::Internal(_)
        | DataFusionError::Substrait(_)
        | DataFusionError::Ffi(_) => ErrorClass::Poison,
        // Wrappers are their own root only when they wrap nothing (an empty `Collection`):
        // nothing says another attempt would do better.
        DataFusionError::Context(..)
        | DataFusionError::Shared(_)
        | DataFusionError::Diagnostic(..)
        | DataFusionError::Collection(_) => ErrorClass::Poison,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use std::sync::Arc;

    use datafusion::arrow::error::ArrowError;
    use datafusion::common::{Column, SchemaError};
    use datafusion::sql::sqlparser::parser::ParserError;
    use parquet::errors::ParquetError;

    use super::*;

    fn not_found() -> object_store::Error {
        object_store::Error::NotFound {
            path: "telemetry/dt=2026-12-01/hour=00/part-0.parquet".into(),
            source: "merged away".into(),
        }
    }

    fn arrow(error: ArrowError) -> DataFusionError {
        DataFusionError::ArrowError(Box::new(error), None)
    }

    #[test]
    fn datafusion_errors_are_retried_only_where_another_attempt_may_end_differently() {
        use ErrorClass::{Poison, Retryable};

        let cases = [
            (
                DataFusionError::ObjectStore(Box::new(not_found())),
                Retryable,
                "a file merged away under the scan",
            ),
            (DataFusionError::IoError(std::io::Error::other("no space left")), Retryable, "a spill file"),
            (
                DataFusionError::ParquetError(Box::new(ParquetError::EOF("truncated footer".into()))),
                Retryable,
                "a file read short",
            ),
            (
                DataFusionError::ParquetError(Box::new(ParquetError::External(Box::new(
                    object_store::Error::Generic { store: "S3", source: "503 Slow Down".into() },
                )))),
                Retryable,
                "a store error under Parquet's",
            ),
            (
                DataFusionError::Context(
                    "reading telemetry".into(),
                    Box::new(DataFusionError::Shared(Arc::new(DataFusionError::ObjectStore(Box::new(
                        not_found(),
                    ))))),
                ),
                Retryable,
                "a store error passed through a repartition and a context",
            ),
            (
                arrow(ArrowError::ExternalError(Box::new(std::io::Error::other("connection reset")))),
                Retryable,
                "I/O under Arrow",
            ),
            (DataFusionError::External(Box::new(std::fmt::Error)), Retryable, "an error from the cluster"),
            (
                DataFusionError::Execution("Job failed: task lost with its worker".into()),
                Retryable,
                "a run-time failure",
            ),
            (
                arrow(ArrowError::CastError("Cannot cast string 'dev-0001' to value of Int64 type".into())),
                Retryable,
                "a cast at run time (pinned by integration-tests/tests/executor.rs)",
            ),
            (arrow(ArrowError::DivideByZero), Retryable, "a division by zero at run time"),
            (
                DataFusionError::ResourcesExhausted("Failed to allocate additional 1 GB".into()),
                Poison,
                "the run's own memory pool",
            ),
            (
                DataFusionError::SQL(
                    Box::new(ParserError::ParserError("Expected: an expression".into())),
                    None,
                ),
                Poison,
                "SQL",
            ),
            (DataFusionError::Plan("table 'devices' not found".into()), Poison, "a name"),
            (
                DataFusionError::SchemaError(
                    Box::new(SchemaError::AmbiguousReference { field: Box::new(Column::from_name("ts")) }),
                    Box::new(None),
                ),
                Poison,
                "a schema",
            ),
            (DataFusionError::NotImplemented("Unsupported ast node".into()), Poison, "unsupported SQL"),
            (DataFusionError::Configuration("engine 'ballista'".into()), Poison, "configuration"),
            (DataFusionError::Internal("physical plan mismatch".into()), Poison, "a DataFusion bug"),
            (
                DataFusionError::Context(
                    "optimizer rule".into(),
                    Box::new(DataFusionError::Plan("cannot coerce".into())),
                ),
                Poison,
                "a planning error in a context",
            ),
            (DataFusionError::Collection(Vec::new()), Poison, "an empty collection"),
        ];
        for (error, expected, case) in cases {
            assert_eq!(classify_datafusion(&error), expected, "{case}: {error}");
        }
    }

    #[tokio::test]
    async fn a_task_of_the_plan_that_panicked_or_was_stopped_is_retried() {
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        let join_error = task.await.unwrap_err();
        let error = DataFusionError::ExecutionJoin(Box::new(join_error));
        assert_eq!(classify_datafusion(&error), ErrorClass::Retryable);
    }

    #[test]
    fn resources_exhausted_is_a_limit_wherever_it_is_wrapped_and_messages_are_kept() {
        let exhausted = DataFusionError::Context(
            "aggregate".into(),
            Box::new(DataFusionError::ResourcesExhausted(
                "repeat() would build a value of 400000000 bytes; at most 1048576 bytes are allowed \
                 (query.max_value_bytes)"
                    .into(),
            )),
        );
        let error = RunError::from_datafusion(&exhausted);
        assert!(matches!(error, RunError::Limit(_)), "{error:?}");
        assert_eq!(error.class(), ErrorClass::Poison);
        assert!(error.to_string().contains("(query.max_value_bytes)"), "{error}");

        let cast = arrow(ArrowError::CastError("Cannot cast string 'dev-0001'".into()));
        let error = RunError::from_datafusion(&cast);
        assert_eq!(error.to_string(), describe(&cast), "the message is DataFusion's, as before");
        assert!(error.to_string().contains("Cast error"), "{error}");
    }

    #[test]
    fn every_run_error_has_the_class_its_failure_calls_for() {
        use ErrorClass::{Fatal, Poison, Retryable};

        let cases = [
            (RunError::Timeout(Duration::from_secs(600)), Retryable),
            (RunError::Lake("503 Slow Down".into()), Retryable),
            (RunError::Panicked("index out of bounds".into()), Retryable),
            (RunError::Query { message: "Job failed".into(), class: Retryable }, Retryable),
            (RunError::planning(QueryError::Refused("column 'humidityy' not found".into())), Poison),
            (RunError::Limit("the result has more than 1000000 rows (query.max_result_rows)".into()), Poison),
            (RunError::Invalid("the result has a column named window_start".into()), Poison),
            (RunError::Stopped("task 7 was cancelled".into()), Fatal),
        ];
        for (error, expected) in cases {
            assert_eq!(error.class(), expected, "{error:?}");
        }
    }

    #[test]
    fn a_session_that_could_not_be_set_up_is_classified_by_its_cause() {
        let unreadable = CatalogError::Reference {
            name: "devices".into(),
            path: "reference/devices.csv".into(),
            source: DataFusionError::ObjectStore(Box::new(not_found())),
        };
        assert_eq!(RunError::session(&unreadable).class(), ErrorClass::Retryable);
        let message = RunError::session(&unreadable).to_string();
        assert!(message.starts_with("reference table 'devices' at 'reference/devices.csv' cannot be read: "));
        let bad_setting = CatalogError::DataFusion(DataFusionError::Configuration("bad".into()));
        assert_eq!(RunError::session(&bad_setting).class(), ErrorClass::Poison);
    }
}
