//! The physical-plan verifier: only allow-listed nodes, every raw scan under a policy
//! boundary; and the columns a verified plan reads, for the access report.

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;

use crate::governed::PolicyBoundaryExec;

/// The columns a verified plan reads, `dataset.column`, from its policy boundaries.
pub(crate) fn touched_columns(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
    fn walk(plan: &Arc<dyn ExecutionPlan>, out: &mut BTreeSet<String>) {
        if let Some(b) = (plan.as_ref() as &dyn Any)
            .downcast_ref::<PolicyBoundaryExec>()
            .filter(|b| !b.inner)
        {
            for f in b.schema().fields() {
                out.insert(format!("{}.{}", b.dataset, f.name()));
            }
        }
        for c in plan.children() {
            walk(c, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(plan, &mut out);
    out.into_iter().collect()
}

/// Node names allowed in an executed plan. Anything else (a file sink, a node a future
/// DataFusion adds) is refused until reviewed.
const ALLOWED_NODES: &[&str] = &[
    "PolicyBoundaryExec",
    "NoisyReleaseExec",
    "DataSourceExec",
    "ProjectionExec",
    "FilterExec",
    "AggregateExec",
    "HashJoinExec",
    "SortMergeJoinExec",
    "NestedLoopJoinExec",
    "CrossJoinExec",
    "SymmetricHashJoinExec",
    "SortExec",
    "SortPreservingMergeExec",
    "CoalescePartitionsExec",
    "CoalesceBatchesExec",
    "RepartitionExec",
    "GlobalLimitExec",
    "LocalLimitExec",
    "UnionExec",
    "InterleaveExec",
    "PlaceholderRowExec",
    "EmptyExec",
    "WindowAggExec",
    "BoundedWindowAggExec",
    "CooperativeExec",
    "ProjectionExprs",
    "BufferExec",
    "AsyncFuncExec",
    "UnnestExec",
    "ValuesExec",
    "MemoryExec",
    "LazyMemoryExec",
    "PartialSortExec",
    "AnalyzeExec",
    "ScalarSubqueryExec",
    "RecursiveQueryExec",
    "WorkTableExec",
];

/// Whether `plan` is a source of rows written in the query itself: DataFusion plans a `VALUES`
/// list of several rows as an in-memory `DataSourceExec`. The session's catalog holds only
/// governed tables and no statement can create one, so in-memory rows are the query's own.
fn literal_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::datasource::source::DataSourceExec;
    (plan.as_ref() as &dyn Any)
        .downcast_ref::<DataSourceExec>()
        .is_some_and(|d| {
            d.data_source()
                .downcast_ref::<MemorySourceConfig>()
                .is_some()
        })
}

/// Verify an optimized physical plan: only allow-listed nodes, and every raw data source
/// directly under the policy of its dataset. Returns the offending node's name otherwise.
pub(crate) fn verify_physical(plan: &Arc<dyn ExecutionPlan>) -> Result<(), String> {
    fn walk(plan: &Arc<dyn ExecutionPlan>, under_boundary: bool) -> Result<(), String> {
        // Variants print as `SortExec(TopK)`: the node type is what precedes the parenthesis.
        let name = plan.name().split('(').next().unwrap_or_default();
        if !ALLOWED_NODES.contains(&name) {
            return Err(format!("plan node {name} is not allowed"));
        }
        if name == "AnalyzeExec" {
            return Err("EXPLAIN ANALYZE is not allowed".into());
        }
        if name == "DataSourceExec" && !under_boundary && !literal_rows(plan) {
            return Err("a data source outside its dataset's policy".into());
        }
        let inner = under_boundary
            || (plan.as_ref() as &dyn Any)
                .downcast_ref::<PolicyBoundaryExec>()
                .is_some();
        for c in plan.children() {
            walk(c, inner)?;
        }
        Ok(())
    }
    walk(plan, false)
}
