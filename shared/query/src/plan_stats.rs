//! What a physical plan reads: the files its scans were given and, after a local run, the rows
//! and bytes they read (a run's statistics, and the basis of restatement); and the yield points
//! that let a run's timeout stop any operator.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;
use object_store::path::Path;
use sluice_jobs::records::RunStats;

/// Makes every operator of a local plan yield to the runtime every so many batches.
/// DataFusion's own yield points are at scans and exchanges only, so an operator that makes many
/// batches from one input batch (a cross join, `unnest`, a join fanning out) can run without
/// ever returning to the runtime: its timeout could not stop it, and an aborted run would keep
/// its thread busy until the query ended by itself. Each batch costs one unit of the task's
/// cooperative budget; the cost of a yield every 128 units is not measurable next to a batch.
pub fn yield_between_batches(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
    plan.transform_up(|node| {
        if node.children().is_empty() || node.downcast_ref::<CooperativeExec>().is_some() {
            return Ok(Transformed::no(node));
        }
        Ok(Transformed::yes(Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>))
    })
    .map(|transformed| transformed.data)
}

/// Rows, bytes and files the plan's scans read, from their metrics after a local run.
pub fn scan_stats(plan: &Arc<dyn ExecutionPlan>) -> RunStats {
    let mut stats = RunStats::default();
    for_each_scan(plan, |scan| {
        if let Some(metrics) = scan.metrics() {
            stats.rows_read += metrics.output_rows().unwrap_or(0) as u64;
            stats.bytes_read +=
                metrics.sum_by_name("bytes_scanned").map_or(0, |value| value.as_usize() as u64);
        }
    });
    stats.files_read = planned_files(plan).len() as u64;
    stats
}

/// The files the plan's scans were given. A large file may be split into byte ranges over
/// several groups: each is named once.
pub fn planned_files(plan: &Arc<dyn ExecutionPlan>) -> BTreeSet<Path> {
    let mut files = BTreeSet::new();
    for_each_scan(plan, |scan| {
        if let Some(config) = scan.data_source().downcast_ref::<FileScanConfig>() {
            files.extend(
                config
                    .file_groups
                    .iter()
                    .flat_map(|group| group.iter())
                    .map(|file| file.object_meta.location.clone()),
            );
        }
    });
    files
}

fn for_each_scan(plan: &Arc<dyn ExecutionPlan>, mut visit: impl FnMut(&DataSourceExec)) {
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if let Some(scan) = node.downcast_ref::<DataSourceExec>() {
            visit(scan);
        }
        stack.extend(node.children().into_iter().cloned());
    }
}
