//! A window run's stream tables hold only the window's rows, so a job's own `ts >= $window_start
//! AND ts < $window_end` (how jobs are written, and kept so they mean the same run ad hoc) can
//! never drop a row. Left in, DataFusion decodes `ts` and compares every row of the window
//! against both bounds; taken out, `ts` is read only if the query selects it.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::source_as_provider;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{BinaryExpr, Expr, Filter, LogicalPlan, Operator};
use datafusion::scalar::ScalarValue;
use sluice_schema::EVENT_TIME_FIELD;

/// Set on a session whose stream tables are limited to `[start, end)`: only then are bounds
/// redundant, and only for that window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowScope {
    pub(crate) start_micros: i64,
    pub(crate) end_micros: i64,
    pub(crate) streams: Vec<String>,
}

impl WindowScope {
    /// Removes the event-time bounds that the window implies from filters directly over a
    /// stream table; other filters and other conditions stay as written.
    pub(crate) fn drop_implied_bounds(&self, plan: LogicalPlan) -> Result<LogicalPlan, DataFusionError> {
        plan.transform_up(|node| {
            let LogicalPlan::Filter(filter) = node else { return Ok(Transformed::no(node)) };
            if !self.scans_stream(&filter.input) {
                return Ok(Transformed::no(LogicalPlan::Filter(filter)));
            }
            let conditions = split_conjunction_owned(filter.predicate.clone());
            let count = conditions.len();
            let kept: Vec<Expr> =
                conditions.into_iter().filter(|condition| !self.implies(condition)).collect();
            if kept.len() == count {
                return Ok(Transformed::no(LogicalPlan::Filter(filter)));
            }
            match conjunction(kept) {
                Some(predicate) => Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                    predicate,
                    Arc::clone(&filter.input),
                )?))),
                None => Ok(Transformed::yes(Arc::unwrap_or_clone(filter.input))),
            }
        })
        .map(|transformed| transformed.data)
    }

    /// Whether `plan` is a stream's window view (as the session registered it, inlined by the
    /// planner: the stream's name over a filter of its listing table), under aliases and
    /// filters that only drop rows. A CTE that takes a stream's name is not one.
    fn scans_stream(&self, plan: &LogicalPlan) -> bool {
        match plan {
            LogicalPlan::SubqueryAlias(alias)
                if self.streams.iter().any(|stream| stream == alias.alias.table())
                    && is_window_view(&alias.input) =>
            {
                true
            }
            LogicalPlan::SubqueryAlias(alias) => self.scans_stream(&alias.input),
            LogicalPlan::Filter(filter) => self.scans_stream(&filter.input),
            _ => false,
        }
    }

    /// Whether `condition` holds for every row of the window: `ts` compared with a timestamp
    /// at or beyond the window's bounds, either way round.
    fn implies(&self, condition: &Expr) -> bool {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = condition else { return false };
        let (op, value) = match (left.as_ref(), right.as_ref()) {
            (Expr::Column(column), Expr::Literal(value, _)) if column.name == EVENT_TIME_FIELD => {
                (*op, value)
            }
            (Expr::Literal(value, _), Expr::Column(column)) if column.name == EVENT_TIME_FIELD => {
                let Some(op) = op.swap() else { return false };
                (op, value)
            }
            _ => return false,
        };
        let ScalarValue::TimestampMicrosecond(Some(micros), _) = value else { return false };
        match op {
            Operator::GtEq => *micros <= self.start_micros,
            Operator::Gt => *micros < self.start_micros,
            Operator::Lt => *micros >= self.end_micros,
            Operator::LtEq => *micros >= self.end_micros - 1,
            _ => false,
        }
    }
}

fn is_window_view(plan: &LogicalPlan) -> bool {
    let LogicalPlan::Filter(filter) = plan else { return false };
    let LogicalPlan::TableScan(scan) = filter.input.as_ref() else { return false };
    source_as_provider(&scan.source).is_ok_and(|provider| provider.downcast_ref::<ListingTable>().is_some())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use datafusion::logical_expr::{col, lit};

    use super::*;

    const HOUR: i64 = 3_600_000_000;

    fn scope() -> WindowScope {
        WindowScope { start_micros: 10 * HOUR, end_micros: 11 * HOUR, streams: vec!["telemetry".into()] }
    }

    fn at(micros: i64) -> Expr {
        lit(ScalarValue::TimestampMicrosecond(Some(micros), Some("UTC".into())))
    }

    #[test]
    fn bounds_at_or_beyond_the_window_are_implied_and_others_are_not() {
        let scope = scope();
        let ts = || col(EVENT_TIME_FIELD);
        for implied in [
            ts().gt_eq(at(10 * HOUR)),
            ts().gt_eq(at(9 * HOUR)),
            ts().gt(at(10 * HOUR - 1)),
            ts().lt(at(11 * HOUR)),
            ts().lt_eq(at(11 * HOUR - 1)),
            at(10 * HOUR).lt_eq(ts()),
            at(11 * HOUR).gt(ts()),
        ] {
            assert!(scope.implies(&implied), "{implied}");
        }
        for kept in [
            ts().gt_eq(at(10 * HOUR + 1)),
            ts().gt(at(10 * HOUR)),
            ts().lt(at(11 * HOUR - 1)),
            ts().lt_eq(at(11 * HOUR - 2)),
            ts().eq(at(10 * HOUR)),
            col("temperature").gt_eq(lit(10.0)),
            col("seq").gt_eq(lit(ScalarValue::Int64(Some(10 * HOUR)))),
        ] {
            assert!(!scope.implies(&kept), "{kept}");
        }
    }
}
