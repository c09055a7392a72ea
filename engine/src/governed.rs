//! Governed datasets: a table provider that applies the caller's row filter and column masks
//! directly above the raw scan, and the plan node that marks that boundary.
//!
//! Because the session's catalog holds only these providers, every scan of a dataset, from the
//! top-level query, a subquery, a CTE, a view or a union, yields filtered and masked rows: WHERE,
//! JOIN, GROUP BY, ORDER BY and every function see the masked value, never the raw one.

use std::any::Any;
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::catalog::{Session as DFSession, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, Result as DFResult};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// A dataset as one caller may see it.
#[derive(Debug)]
pub struct GovernedTable {
    pub(crate) dataset: String,
    raw: Arc<dyn TableProvider>,
    schema: SchemaRef,
    filter: Option<Expr>,
    /// One expression per column, over the raw columns, masked where the policy says.
    columns: Vec<Expr>,
}

impl GovernedTable {
    pub(crate) fn new(
        dataset: String,
        raw: Arc<dyn TableProvider>,
        filter: Option<Expr>,
        columns: Vec<Expr>,
        masked: &[bool],
    ) -> Self {
        let raw_schema = raw.schema();
        let fields: Vec<Field> = raw_schema
            .fields()
            .iter()
            .zip(masked)
            .map(|(f, m)| f.as_ref().clone().with_nullable(f.is_nullable() || *m))
            .collect();
        Self {
            dataset,
            raw,
            schema: Arc::new(Schema::new(fields)),
            filter,
            columns,
        }
    }
}

fn referenced_columns(expr: &Expr, schema: &Schema, into: &mut BTreeSet<usize>) {
    for c in expr.column_refs() {
        if let Ok(i) = schema.index_of(&c.name) {
            into.insert(i);
        }
    }
}

#[async_trait]
impl TableProvider for GovernedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn DFSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        // User filters and limits are deliberately not pushed into the raw scan: they must only
        // ever see rows that passed the policy filter, in masked form.
        let raw_schema = self.raw.schema();
        let wanted: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.columns.len()).collect());
        let mut needed = BTreeSet::new();
        for i in &wanted {
            referenced_columns(&self.columns[*i], &raw_schema, &mut needed);
        }
        if let Some(f) = &self.filter {
            referenced_columns(f, &raw_schema, &mut needed);
        }
        if needed.is_empty() {
            // count(*) needs rows, not columns; read the narrowest one.
            needed.insert(0);
        }
        let needed: Vec<usize> = needed.into_iter().collect();
        let mut plan = self.raw.scan(state, Some(&needed), &[], None).await?;
        let input_schema = DFSchema::try_from(plan.schema().as_ref().clone())?;
        if let Some(f) = &self.filter {
            let predicate = state.create_physical_expr(f.clone(), &input_schema)?;
            let batch_size = state.config().batch_size();
            plan = Arc::new(FilterExec::try_new(predicate, plan)?.with_batch_size(batch_size)?);
        }
        let exprs = wanted
            .iter()
            .map(|i| {
                let e = state.create_physical_expr(self.columns[*i].clone(), &input_schema)?;
                Ok((e, self.schema.field(*i).name().clone()))
            })
            .collect::<DFResult<Vec<(Arc<dyn PhysicalExpr>, String)>>>()?;
        plan = Arc::new(ProjectionExec::try_new(exprs, plan)?);
        Ok(Arc::new(PolicyBoundaryExec::new(
            plan,
            self.dataset.clone(),
        )))
    }
}

/// Marks where a dataset's policy has been applied. It passes batches through unchanged; it
/// exists so that (1) no optimizer pushes a user's filter, projection or limit below the policy
/// (it supports none of those pushdowns) and (2) the verifier can check that every raw scan
/// sits under one.
#[derive(Debug)]
pub struct PolicyBoundaryExec {
    input: Arc<dyn ExecutionPlan>,
    dataset: String,
    properties: Arc<PlanProperties>,
}

impl PolicyBoundaryExec {
    fn new(input: Arc<dyn ExecutionPlan>, dataset: String) -> Self {
        let properties = Arc::clone(input.properties());
        Self {
            input,
            dataset,
            properties,
        }
    }
}

impl DisplayAs for PolicyBoundaryExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PolicyBoundaryExec: dataset={}", self.dataset)
    }
}

impl ExecutionPlan for PolicyBoundaryExec {
    fn name(&self) -> &str {
        "PolicyBoundaryExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        // The boundary evaluates no expression of its own.
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return datafusion::common::internal_err!("PolicyBoundaryExec takes one child");
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.dataset.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}

/// Membership in a precomputed subject set (e.g. the consenting patients): the typed form of
/// `column IN (SELECT key FROM dataset WHERE ...)`, evaluated without exposing the subquery to
/// the caller's plan.
#[derive(Debug, Clone)]
pub(crate) struct InSubjectSet {
    pub(crate) set: Arc<HashSet<String>>,
    signature: Signature,
}

impl PartialEq for InSubjectSet {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.set, &other.set)
    }
}
impl Eq for InSubjectSet {}
impl std::hash::Hash for InSubjectSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.set) as usize).hash(state)
    }
}

impl InSubjectSet {
    pub(crate) fn expr(set: Arc<HashSet<String>>, column: Expr) -> Expr {
        ScalarUDF::from(Self {
            set,
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
        })
        .call(vec![column])
    }
}

impl ScalarUDFImpl for InSubjectSet {
    fn name(&self) -> &str {
        "lg_in_subject_set"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let strings = arrays[0].as_string::<i32>();
        // Adjacent rows usually belong to one subject: remember the last answer.
        let mut last: Option<(&str, bool)> = None;
        let out: BooleanArray = strings
            .iter()
            .map(|v| {
                Some(v.is_some_and(|s| match last {
                    Some((l, member)) if l == s => member,
                    _ => {
                        let member = self.set.contains(s);
                        last = Some((s, member));
                        member
                    }
                }))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}

/// The aggregation threshold's test, `units >= k`, counting the groups it suppresses so the
/// audit trail can say how many were withheld.
#[derive(Debug, Clone)]
pub(crate) struct ThresholdCheck {
    k: i64,
    suppressed: Arc<AtomicU64>,
    signature: Signature,
}

impl PartialEq for ThresholdCheck {
    fn eq(&self, other: &Self) -> bool {
        self.k == other.k && Arc::ptr_eq(&self.suppressed, &other.suppressed)
    }
}
impl Eq for ThresholdCheck {}
impl std::hash::Hash for ThresholdCheck {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.k.hash(state);
        (Arc::as_ptr(&self.suppressed) as usize).hash(state)
    }
}

impl ThresholdCheck {
    pub(crate) fn expr(suppressed: Arc<AtomicU64>, units: Expr, k: i64) -> Expr {
        ScalarUDF::from(Self {
            k,
            suppressed,
            signature: Signature::exact(vec![DataType::Int64], Volatility::Volatile),
        })
        .call(vec![units])
    }
}

impl ScalarUDFImpl for ThresholdCheck {
    fn name(&self) -> &str {
        "lg_threshold"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let units = arrays[0].as_primitive::<Int64Type>();
        let out: BooleanArray = units
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= self.k)))
            .collect();
        let released = out.true_count();
        self.suppressed
            .fetch_add((out.len() - released) as u64, Ordering::Relaxed);
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}

/// The columns a verified plan reads, `dataset.column`, from its policy boundaries.
pub(crate) fn touched_columns(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
    fn walk(plan: &Arc<dyn ExecutionPlan>, out: &mut BTreeSet<String>) {
        if let Some(b) = (plan.as_ref() as &dyn Any).downcast_ref::<PolicyBoundaryExec>() {
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
        if name == "DataSourceExec" && !under_boundary {
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
