//! Which side of a hash join DataFusion builds its hash table from.
//!
//! DataFusion builds from the left side unless statistics show the right one is smaller. A
//! grouped aggregate's row estimate is its input's row count (Parquet footers carry no distinct
//! counts), so in `readings JOIN (SELECT device_id, avg(..) FROM readings GROUP BY device_id)`,
//! the way jobs compare each reading with its device's statistics, both sides look equal and
//! the hash table is built from the millions of readings instead of the thousands of devices.

use std::sync::Arc;

use datafusion::common::JoinType;
use datafusion::common::Statistics;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::DataFusionError;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::join_selection::JoinSelection;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};

/// Swaps an inner hash join whose right side is a grouped aggregate, read through operators
/// that never add rows, when the left side has at least as many rows as that aggregate's input.
/// An aggregate emits at most one row per input row, so the right side is then never the
/// larger one, and usually far smaller. Runs right after DataFusion's own join selection, which
/// keeps the written order when its row estimates are equal (placed before it, the swap did not
/// survive into the benchmark's plan), and before repartitioning is planned.
#[derive(Debug, Default)]
pub(crate) struct BuildFromGroupedSide;

impl BuildFromGroupedSide {
    /// DataFusion's rules with this one placed after its join selection.
    pub(crate) fn with_default_rules(
        mut rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    ) -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
        let join_selection = JoinSelection::new();
        let at = rules.iter().position(|rule| rule.name() == join_selection.name()).map_or(0, |at| at + 1);
        rules.insert(at, Arc::new(Self));
        rules
    }
}

impl PhysicalOptimizerRule for BuildFromGroupedSide {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        plan.transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if *join.join_type() != JoinType::Inner || grouped_input_rows(join.left()).is_some() {
                return Ok(Transformed::no(node));
            }
            let Some(right_bound) = grouped_input_rows(join.right()) else {
                return Ok(Transformed::no(node));
            };
            let left_rows = statistics(join.left())?.num_rows;
            match left_rows.get_value() {
                Some(&left_rows) if left_rows >= right_bound => {
                    Ok(Transformed::yes(join.swap_inputs(*join.partition_mode())?))
                }
                _ => Ok(Transformed::no(node)),
            }
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "build_from_grouped_side"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The estimated input rows of the grouped aggregate that `plan` reads, when every operator on
/// the way down keeps or drops rows; `None` for anything else.
fn grouped_input_rows(plan: &Arc<dyn ExecutionPlan>) -> Option<usize> {
    let mut current = plan;
    loop {
        if let Some(aggregate) = current.downcast_ref::<AggregateExec>() {
            if aggregate.group_expr().is_empty() {
                return None;
            }
            // A final aggregate over a partial one: the partial one's input holds the rows.
            let input = match aggregate.mode() {
                AggregateMode::Final | AggregateMode::FinalPartitioned => {
                    match aggregate.input().downcast_ref::<AggregateExec>() {
                        Some(partial) => partial.input(),
                        None => aggregate.input(),
                    }
                }
                _ => aggregate.input(),
            };
            let rows = statistics(input).ok()?.num_rows;
            return rows.get_value().copied();
        }
        let passes_rows_through = current.downcast_ref::<ProjectionExec>().is_some()
            || current.downcast_ref::<FilterExec>().is_some()
            || current.downcast_ref::<RepartitionExec>().is_some()
            || current.downcast_ref::<CoalescePartitionsExec>().is_some()
            || current.downcast_ref::<SortExec>().is_some();
        if !passes_rows_through {
            return None;
        }
        current = current.children().into_iter().next()?;
    }
}

fn statistics(plan: &Arc<dyn ExecutionPlan>) -> Result<Arc<Statistics>, DataFusionError> {
    StatisticsContext::new().compute(plan.as_ref(), &StatisticsArgs::new())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;

    fn table(rows: usize, devices: usize) -> Arc<MemTable> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("temperature", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|row| format!("dev-{}", row % devices)),
                )),
                Arc::new(Float64Array::from_iter_values((0..rows).map(|row| row as f64))),
            ],
        )
        .unwrap();
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())
    }

    fn context() -> SessionContext {
        let state = SessionStateBuilder::new()
            .with_config(SessionConfig::new().with_target_partitions(2))
            .with_default_features()
            .with_physical_optimizer_rules(BuildFromGroupedSide::with_default_rules(
                PhysicalOptimizer::new().rules,
            ))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_table("readings", table(20_000, 10)).unwrap();
        ctx.register_table("devices", table(10, 10)).unwrap();
        ctx
    }

    /// Whether the hash join's build (left) side holds a grouped aggregate.
    async fn builds_from_aggregate(ctx: &SessionContext, sql: &str) -> bool {
        let plan = ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap();
        let mut joins = Vec::new();
        plan.apply(|node| {
            if let Some(join) = node.downcast_ref::<HashJoinExec>() {
                joins.push(Arc::clone(join.left()));
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
        .unwrap();
        assert_eq!(joins.len(), 1, "{}", datafusion::physical_plan::displayable(plan.as_ref()).indent(true));
        let mut found = false;
        joins[0]
            .apply(|node| {
                found |= node.downcast_ref::<AggregateExec>().is_some();
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
            .unwrap();
        found
    }

    #[tokio::test]
    async fn readings_joined_with_their_devices_statistics_build_from_the_statistics() {
        let ctx = context();
        let sql = "WITH stats AS (SELECT device_id, avg(temperature) AS mean FROM readings GROUP BY device_id) \
            SELECT r.device_id, r.temperature - s.mean FROM readings r JOIN stats s ON r.device_id = s.device_id";
        assert!(builds_from_aggregate(&ctx, sql).await);
        // Results are the same either way round: every reading, against its device's mean.
        let rows = ctx.sql(sql).await.unwrap().count().await.unwrap();
        assert_eq!(rows, 20_000);
    }

    #[tokio::test]
    async fn a_smaller_table_stays_the_build_side() {
        let ctx = context();
        let sql = "WITH stats AS (SELECT device_id, avg(temperature) AS mean FROM readings GROUP BY device_id) \
            SELECT d.device_id, s.mean FROM devices d JOIN stats s ON d.device_id = s.device_id";
        assert!(!builds_from_aggregate(&ctx, sql).await);
    }
}
