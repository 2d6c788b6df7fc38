//! Batches of full size from scans over many small files.
//!
//! A Parquet scan ends a batch at the end of each file. Before the compactor merges an hour, its
//! files are one flush of one Kafka partition each, about a hundred rows, so a day's scan hands
//! the operators above it thousands of batches of a hundred rows. Every batch costs an
//! aggregate a fixed amount per group and accumulator: with `approx_percentile_cont` or a
//! distinct count, which run one accumulator per group, a day of unmerged files took 700 ms of
//! aggregation for 720,000 rows that take a tenth of that in full batches (docs/benchmarks.md).
//! DataFusion stopped inserting its coalescing operator above scans in version 52.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
#[expect(
    deprecated,
    reason = "the operator itself is what this rule places; see CoalesceSmallFileBatches"
)]
use datafusion::physical_plan::coalesce_batches::CoalesceBatchesExec;

/// Puts a coalescing operator above every file scan whose files hold on average less than half a
/// batch (`datafusion.execution.batch_size`) each, by their statistics. Scans of larger files,
/// and scans without row counts, are left as they are: coalescing them would copy full batches
/// for nothing. The operator keeps its input's partitioning and order.
///
/// DataFusion 52 deprecated `CoalesceBatchesExec` in favour of coalescing inside the operators
/// that produce small batches (filters, repartitions); a Parquet scan does not, and no other
/// operator does it for the operators above a scan.
#[derive(Debug, Default)]
pub(crate) struct CoalesceSmallFileBatches;

impl CoalesceSmallFileBatches {
    /// `rules` with this one placed before DataFusion's cooperative-scheduling rule, after every
    /// rule that may still add, move or remove a scan.
    pub(crate) fn with_rules(
        mut rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    ) -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
        let at = rules.iter().position(|rule| rule.name() == "EnsureCooperative").unwrap_or(rules.len());
        rules.insert(at, Arc::new(Self));
        rules
    }
}

impl PhysicalOptimizerRule for CoalesceSmallFileBatches {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let batch_size = config.execution.batch_size.get();
        plan.transform_up(|node| match mean_rows_per_file(&node) {
            Some(mean_rows) if mean_rows < batch_size / 2 => {
                #[expect(deprecated, reason = "see the type's documentation")]
                let coalesced = CoalesceBatchesExec::new(node, batch_size);
                Ok(Transformed::yes(Arc::new(coalesced) as Arc<dyn ExecutionPlan>))
            }
            _ => Ok(Transformed::no(node)),
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "CoalesceSmallFileBatches"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The mean number of rows per file of a file scan, where every file's statistics know its rows.
/// Summed from the files' own statistics (read from their footers when the table was listed)
/// rather than the scan's merged statistics, which would merge every column's too.
fn mean_rows_per_file(node: &Arc<dyn ExecutionPlan>) -> Option<usize> {
    let scan = node.downcast_ref::<DataSourceExec>()?.data_source().downcast_ref::<FileScanConfig>()?;
    let (mut files, mut rows) = (0_usize, 0_usize);
    for file in scan.file_groups.iter().flat_map(|group| group.files()) {
        files += 1;
        rows = rows.saturating_add(*file.statistics.as_ref()?.num_rows.get_value()?);
    }
    rows.checked_div(files)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

    use super::*;

    /// `files` Parquet files of `rows_per_file` rows each in a new directory.
    fn files(files: usize, rows_per_file: usize) -> tempfile::TempDir {
        let directory = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("temperature", DataType::Float64, false),
        ]));
        for file in 0..files {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from_iter_values(
                        (0..rows_per_file).map(|row| format!("dev-{}", row % 7)),
                    )),
                    Arc::new(Float64Array::from_iter_values(
                        (0..rows_per_file).map(|row| (file + row) as f64),
                    )),
                ],
            )
            .unwrap();
            let path = directory.path().join(format!("f{file:04}.parquet"));
            let mut writer =
                ArrowWriter::try_new(std::fs::File::create(path).unwrap(), Arc::clone(&schema), None)
                    .unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
        }
        directory
    }

    fn context(with_rule: bool) -> SessionContext {
        let rules = PhysicalOptimizer::new().rules;
        let rules = if with_rule { CoalesceSmallFileBatches::with_rules(rules) } else { rules };
        let state = SessionStateBuilder::new()
            .with_config(SessionConfig::new().with_target_partitions(2).with_collect_statistics(true))
            .with_default_features()
            .with_physical_optimizer_rules(rules)
            .build();
        SessionContext::new_with_state(state)
    }

    /// Exact aggregates only (whole-number sums are exact in any order), so that both plans'
    /// answers compare equal.
    const QUERY: &str = "SELECT device_id, count(*) AS n, count(DISTINCT temperature) AS values, \
                         median(temperature) AS p50, sum(temperature) AS total \
                         FROM readings GROUP BY device_id ORDER BY device_id";

    /// The scans in `ctx`'s plan of `QUERY` whose parent coalesces batches, and all scans.
    async fn coalesced_scans(ctx: &SessionContext) -> (usize, usize) {
        let plan = ctx.sql(QUERY).await.unwrap().create_physical_plan().await.unwrap();
        let (mut coalesced, mut scans) = (0, 0);
        plan.apply(|node| {
            #[expect(deprecated, reason = "the operator the rule places")]
            if let Some(coalesce) = node.downcast_ref::<CoalesceBatchesExec>() {
                coalesced += usize::from(coalesce.input().downcast_ref::<DataSourceExec>().is_some());
            }
            scans += usize::from(node.downcast_ref::<DataSourceExec>().is_some());
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        (coalesced, scans)
    }

    async fn register(ctx: &SessionContext, directory: &tempfile::TempDir) {
        let location = format!("{}/", directory.path().display());
        ctx.register_parquet("readings", &location, ParquetReadOptions::default()).await.unwrap();
    }

    #[tokio::test]
    async fn scans_of_many_small_files_are_coalesced_with_the_same_answer() {
        let directory = files(60, 50);
        let ctx = context(true);
        register(&ctx, &directory).await;
        assert_eq!(coalesced_scans(&ctx).await, (1, 1));

        let plain = context(false);
        register(&plain, &directory).await;
        let answer = ctx.sql(QUERY).await.unwrap().collect().await.unwrap();
        let expected = plain.sql(QUERY).await.unwrap().collect().await.unwrap();
        assert_eq!(
            datafusion::arrow::util::pretty::pretty_format_batches(&answer).unwrap().to_string(),
            datafusion::arrow::util::pretty::pretty_format_batches(&expected).unwrap().to_string()
        );
    }

    #[tokio::test]
    async fn scans_of_files_of_half_a_batch_or_more_are_left_alone() {
        // 4,096 rows a file is exactly half the default batch: the first size left alone.
        for (count, rows_per_file, expected) in [(2, 4_095, 1), (2, 4_096, 0), (1, 20_000, 0)] {
            let directory = files(count, rows_per_file);
            let ctx = context(true);
            register(&ctx, &directory).await;
            assert_eq!(coalesced_scans(&ctx).await, (expected, 1), "{count} files of {rows_per_file} rows");
        }
    }
}
