//! Governed datasets: a table provider that applies the caller's row filter and column masks
//! directly above the raw scan, and the plan node that marks that boundary.
//!
//! Because the session's catalog holds only these providers, every scan of a dataset, from the
//! top-level query, a subquery, a CTE, a view or a union, yields filtered and masked rows: WHERE,
//! JOIN, GROUP BY, ORDER BY and every function see the masked value, never the raw one.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session as DFSession, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Statistics;
use datafusion::common::{DFSchema, DataFusionError, Result as DFResult};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::TableProviderFilterPushDown;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildStats, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, StatisticsArgs,
};

use lakegate_catalogs::Dataset;

use crate::lookup::PseudonymIndexes;

/// A dataset as one caller may see it.
#[derive(Debug, Clone)]
pub struct GovernedTable {
    pub(crate) dataset: String,
    raw: Arc<dyn TableProvider>,
    schema: SchemaRef,
    filter: Option<Expr>,
    /// One expression per column, over the raw columns, masked where the policy says.
    columns: Vec<Expr>,
    /// Columns the caller sees unmasked, by name.
    clear: HashSet<String>,
    /// Per column: masked by a keyed pseudonym (injective, NULL-preserving).
    pseudonymized: Vec<bool>,
    /// Where lookups by pseudonym find their raw keys, with this dataset's definition.
    lookups: Option<(Arc<PseudonymIndexes>, Arc<Dataset>)>,
}

impl GovernedTable {
    pub(crate) fn new(
        dataset: String,
        raw: Arc<dyn TableProvider>,
        filter: Option<Expr>,
        columns: Vec<Expr>,
        masked: &[bool],
        pseudonymized: Vec<bool>,
    ) -> Self {
        let raw_schema = raw.schema();
        let fields: Vec<Field> = raw_schema
            .fields()
            .iter()
            .zip(masked)
            .map(|(f, m)| {
                let f = f.as_ref().clone().with_nullable(f.is_nullable() || *m);
                // Masks turn the raw strings' views into plain `Utf8`.
                match f.data_type() {
                    DataType::Utf8View if *m => f.with_data_type(DataType::Utf8),
                    _ => f,
                }
            })
            .collect();
        let clear = raw_schema
            .fields()
            .iter()
            .zip(masked)
            .filter(|(_, m)| !**m)
            .map(|(f, _)| f.name().clone())
            .collect();
        Self {
            dataset,
            raw,
            schema: Arc::new(Schema::new(fields)),
            filter,
            columns,
            clear,
            pseudonymized,
            lookups: None,
        }
    }

    /// This table with lookups by pseudonym narrowed through `indexes` (see `lookup.rs`).
    pub(crate) fn with_lookups(mut self, indexes: Arc<PseudonymIndexes>, dataset: Dataset) -> Self {
        self.lookups = Some((indexes, Arc::new(dataset)));
        self
    }

    /// The dataset's own table under the policy.
    pub(crate) fn raw(&self) -> &Arc<dyn TableProvider> {
        &self.raw
    }

    /// The same policy over another table of the same dataset and schema (an earlier
    /// version). Lookups by pseudonym are not narrowed: their index follows the newest files.
    pub(crate) fn with_raw(&self, raw: Arc<dyn TableProvider>) -> Self {
        Self {
            raw,
            lookups: None,
            ..self.clone()
        }
    }

    pub(crate) fn pseudonymized_len(&self) -> usize {
        self.pseudonymized.len()
    }

    pub(crate) fn is_pseudonymized(&self, column: usize) -> bool {
        self.pseudonymized.get(column).copied().unwrap_or(false)
    }

    /// This table with the given pseudonymized columns read raw; only for columns whose every
    /// use is a count (see `counted.rs`). Everything else, the row filter included, is unchanged.
    ///
    /// A raw column keeps the raw scan's type (`Utf8View`, where the pseudonym is `Utf8`): no
    /// copy of every id into a new array, and short ids stay inline in their views, which is
    /// what makes grouping and joining on them cheap. The caller retypes the plan above.
    pub(crate) fn counting_raw(&self, columns: &BTreeSet<usize>) -> Self {
        let raw_schema = self.raw.schema();
        let mut table = self.clone();
        let mut fields: Vec<Field> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for &i in columns {
            if self.is_pseudonymized(i) {
                let raw = raw_schema.field(i);
                table.columns[i] =
                    Expr::Column(datafusion::common::Column::new_unqualified(raw.name()));
                fields[i] = fields[i].clone().with_data_type(raw.data_type().clone());
            }
        }
        table.schema = Arc::new(Schema::new_with_metadata(
            fields,
            self.schema.metadata().clone(),
        ));
        table
    }
}

impl GovernedTable {
    /// Whether a caller's predicate may run between the row filter and the masks: it reads
    /// columns, all of them unmasked, and is a plain predicate.
    fn runs_early(&self, f: &Expr) -> bool {
        let refs = f.column_refs();
        !refs.is_empty()
            && refs.iter().all(|c| self.clear.contains(&c.name))
            && is_plain_predicate(f)
    }

    /// The column and pseudonyms a caller's predicate looks up, if it is an equality or `IN`
    /// list of text on a pseudonymized column and an index can serve it.
    fn lookup<'a>(&self, f: &'a Expr) -> Option<(usize, Vec<&'a str>)> {
        self.lookups.as_ref()?;
        let (c, values) = crate::lookup::named_pseudonyms(f)?;
        let i = self.schema.index_of(&c.name).ok()?;
        // A pseudonymized column read raw (`counting_raw`) is no pseudonym any more.
        (self.is_pseudonymized(i) && !matches!(self.columns[i], Expr::Column(_)))
            .then_some((i, values))
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

    /// A caller's predicate that reads only columns it sees unmasked runs before the masks, so
    /// masks are computed only for the rows it keeps. It still runs after the row filter
    /// (behind a boundary no optimizer crosses), so it never sees a hidden row: it can reveal
    /// nothing the caller could not SELECT. `Exact`: `scan` applies every such predicate, so
    /// DataFusion does not filter (and re-batch) the rows a second time above.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DFResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if self.runs_early(f) {
                    TableProviderFilterPushDown::Exact
                } else if self.lookup(f).is_some() {
                    // Narrowed to the raw keys below the masks, checked again above them.
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn DFSession,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        // User filters and limits are never evaluated in the raw scan: they must only ever see
        // rows that passed the policy filter. Predicates on unmasked columns (see
        // `supports_filters_pushdown`) run between the row filter and the masks.
        let raw_schema = self.raw.schema();
        let wanted: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.columns.len()).collect());
        let mut needed = BTreeSet::new();
        for i in &wanted {
            referenced_columns(&self.columns[*i], &raw_schema, &mut needed);
        }
        // Pseudonyms this scan computes: their subjects' digests are read into a table in the
        // background, so the next scan of them under this key computes no HMAC (`digests.rs`).
        if let Some((indexes, dataset)) = &self.lookups {
            for &i in wanted.iter().filter(|&&i| self.is_pseudonymized(i)) {
                indexes.warm(
                    dataset,
                    &self.raw,
                    raw_schema.field(i).name(),
                    &self.columns[i],
                );
            }
        }
        if let Some(f) = &self.filter {
            referenced_columns(f, &raw_schema, &mut needed);
        }
        // DataFusion hands over exactly the predicates `supports_filters_pushdown` accepted,
        // and drops them from the plan: one that cannot run here would be silently lost.
        let (lookups, filters): (Vec<&Expr>, Vec<&Expr>) =
            filters.iter().partition(|f| self.lookup(f).is_some());
        if let Some(f) = filters.iter().find(|f| !self.runs_early(f)) {
            return datafusion::common::internal_err!(
                "a predicate on {} reached the scan but cannot run there: {}",
                self.dataset,
                f.schema_name()
            );
        }
        let early: Vec<Expr> = filters
            .iter()
            .map(|f| unqualified((*f).clone()))
            .collect::<DFResult<_>>()?;
        // Lookups by pseudonym become predicates on the raw keys that carry those pseudonyms:
        // they cannot fail, and they prune like a lookup by raw key. The caller's predicate on
        // the pseudonym stays above the masks (`Inexact`), so the result is the same.
        let mut narrowing = Vec::new();
        if let Some((indexes, dataset)) = &self.lookups {
            for f in lookups {
                let Some((i, values)) = self.lookup(f) else {
                    continue;
                };
                let column = raw_schema.field(i).name();
                if let Some(p) = indexes
                    .raw_predicate(dataset, &self.raw, column, &self.columns[i], &values)
                    .await
                {
                    needed.insert(i);
                    narrowing.push(p);
                }
            }
        }
        for f in &early {
            referenced_columns(f, &raw_schema, &mut needed);
        }
        if needed.is_empty() {
            // count(*) needs rows, not columns; read the narrowest one.
            needed.insert(0);
        }
        let needed: Vec<usize> = needed.into_iter().collect();
        let mut plan = self.raw.scan(state, Some(&needed), &[], None).await?;
        let input_schema = DFSchema::try_from(plan.schema().as_ref().clone())?;
        // The caller's early predicates reach the Parquet scan for pruning only: it skips row
        // groups and pages whose statistics (and bloom filters) prove that no row passes. Pruning
        // reads statistics and never evaluates the caller's expression on a row: row-level
        // pushdown (`parquet.pushdown_filters`) is off in every session, so the filters below
        // still run, in order, and what pruning skipped they would have dropped. (The row
        // filter reaches the scan the same way, through DataFusion's filter pushdown.)
        if let (Some(user), Some(scan)) = (
            narrowing.iter().chain(&early).cloned().reduce(Expr::and),
            plan.downcast_ref::<DataSourceExec>(),
        ) {
            let predicate = state.create_physical_expr(user, &input_schema)?;
            let pushed = scan
                .data_source()
                .try_pushdown_filters(vec![predicate], state.config_options())?;
            if let Some(source) = pushed.updated_node {
                plan = Arc::new(DataSourceExec::new(source));
            }
        }
        // Those that cannot fail on any value run before the row filter, where they cost least
        // (carol's `total_cost > 49000` keeps 2% of the rows; her row filter keeps a fifth).
        // The hidden rows they read show in nothing: no error, no value; only the conjunction
        // of the two decides what passes. The rest run after it, as below.
        let (mut infallible, early): (Vec<Expr>, Vec<Expr>) = early
            .into_iter()
            .partition(|f| cannot_fail(f, &input_schema));
        infallible.splice(0..0, narrowing);
        // A FilterExec holds back what passes until it has a batch of this many rows (larger
        // runs pass straight through). At the session's batch size, a selective row filter
        // followed by a selective caller's predicate (carol: her site, then 2% of it) reads two
        // million rows before the first batch leaves; an eighth of it keeps the first batch
        // within tens of milliseconds and changes nothing for filters that keep most rows.
        let filter_batch = (state.config().batch_size() / 8).max(1);
        // One conjunction, theirs first: DataFusion evaluates the right side of an AND only on
        // the rows the left keeps when it keeps few (two filters in a row are merged anyway).
        if let Some(f) = infallible
            .into_iter()
            .chain(self.filter.clone())
            .reduce(Expr::and)
        {
            let predicate = state.create_physical_expr(f, &input_schema)?;
            plan = Arc::new(FilterExec::try_new(predicate, plan)?.with_batch_size(filter_batch)?);
        }
        if let Some(user) = early.into_iter().reduce(Expr::and) {
            // The barrier keeps the physical optimizer from merging the caller's predicate into
            // the row filter's (or below it), where it could run on hidden rows.
            plan = Arc::new(PolicyBoundaryExec::stage(plan, self.dataset.clone()));
            let predicate = state.create_physical_expr(user, &input_schema)?;
            plan = Arc::new(FilterExec::try_new(predicate, plan)?.with_batch_size(filter_batch)?);
            // And one above it, or projection pushdown would move the masks below the filter.
            plan = Arc::new(PolicyBoundaryExec::stage(plan, self.dataset.clone()));
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
    pub(crate) dataset: String,
    properties: Arc<PlanProperties>,
    /// An inner boundary: above the row filter, below the caller's early predicate and the
    /// masks (its columns are raw, so it is not the dataset's output).
    pub(crate) inner: bool,
}

impl PolicyBoundaryExec {
    /// The boundary of an approved release's scan: its rows were governed when it was made.
    pub(crate) fn release(input: Arc<dyn ExecutionPlan>, label: String) -> Self {
        Self::new(input, label)
    }

    fn new(input: Arc<dyn ExecutionPlan>, dataset: String) -> Self {
        let properties = Arc::clone(input.properties());
        Self {
            input,
            dataset,
            properties,
            inner: false,
        }
    }

    fn stage(input: Arc<dyn ExecutionPlan>, dataset: String) -> Self {
        Self {
            inner: true,
            ..Self::new(input, dataset)
        }
    }
}

impl DisplayAs for PolicyBoundaryExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let stage = if self.inner { " stage=row-filter" } else { "" };
        write!(f, "PolicyBoundaryExec: dataset={}{stage}", self.dataset)
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

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        vec![ChildStats::At(partition)]
    }

    /// Sizes only, and inexact: enough for the optimizer to put the smaller side of a join on
    /// its build side, nothing it could answer a query from (an exact row count would let it
    /// answer `count(*)` without running the row filter; column minima and maxima are withheld).
    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> DFResult<Arc<Statistics>> {
        let mut stats = Statistics::new_unknown(&self.schema());
        if let Some(input) = input_stats.first() {
            stats.num_rows = input.num_rows.to_inexact();
            stats.total_byte_size = input.total_byte_size.to_inexact();
        }
        Ok(Arc::new(stats))
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return datafusion::common::internal_err!("PolicyBoundaryExec takes one child");
        }
        let mut node = Self::new(children.swap_remove(0), self.dataset.clone());
        node.inner = self.inner;
        Ok(Arc::new(node))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        use futures::TryStreamExt;
        let stream = self.input.execute(partition, context)?;
        if self.inner {
            return Ok(stream);
        }
        // A failed read of this dataset's files says which dataset (never which file) to the
        // caller: see `EngineError::Unreadable`.
        let reading = format!("{}{}", crate::error::READING, self.dataset);
        let schema = stream.schema();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.map_err(move |e| {
                if crate::error::is_read_error(&e) {
                    DataFusionError::Context(reading.clone(), Box::new(e))
                } else {
                    e
                }
            }),
        )))
    }
}

/// `e` with its columns unqualified, to evaluate over the raw scan's schema.
fn unqualified(e: Expr) -> DFResult<Expr> {
    e.transform(|node| {
        Ok(match node {
            Expr::Column(c) => Transformed::yes(Expr::Column(
                datafusion::common::Column::new_unqualified(c.name),
            )),
            other => Transformed::no(other),
        })
    })
    .map(|t| t.data)
}

/// Whether a predicate cannot fail, whatever the values of the rows it reads: comparisons of
/// a column with a constant (or another column) of exactly its type, `IS [NOT] NULL`, `IN`
/// lists and `BETWEEN` of constants, a boolean column, and `AND`/`OR`/`NOT` of those. No cast,
/// function or arithmetic: those can refuse a value, and an error raised on a row the row
/// filter hides would tell the caller something about it. Where a type is unknown, it can fail.
fn cannot_fail(e: &Expr, schema: &DFSchema) -> bool {
    use datafusion::logical_expr::{Between, BinaryExpr, ExprSchemable, Operator};
    let type_of = |e: &Expr| match e {
        Expr::Column(_) | Expr::Literal(..) => e.get_type(schema).ok().filter(comparable),
        _ => None,
    };
    let is_column = |e: &Expr| matches!(e, Expr::Column(_));
    let same_type = |a: &Expr, b: &Expr| match (type_of(a), type_of(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    };
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And | Operator::Or => cannot_fail(left, schema) && cannot_fail(right, schema),
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom => {
                (is_column(left) || is_column(right)) && same_type(left, right)
            }
            _ => false,
        },
        Expr::Not(inner) => cannot_fail(inner, schema),
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => is_column(inner),
        Expr::Column(_) => e.get_type(schema).ok() == Some(DataType::Boolean),
        Expr::InList(list) => {
            is_column(&list.expr)
                && list
                    .list
                    .iter()
                    .all(|v| matches!(v, Expr::Literal(..)) && same_type(&list.expr, v))
        }
        Expr::Between(Between {
            expr, low, high, ..
        }) => {
            is_column(expr)
                && matches!(**low, Expr::Literal(..))
                && matches!(**high, Expr::Literal(..))
                && same_type(expr, low)
                && same_type(expr, high)
        }
        _ => false,
    }
}

/// Types whose comparison kernels take any two values of the type without error.
fn comparable(t: &DataType) -> bool {
    t.is_integer()
        || t.is_floating()
        || matches!(
            t,
            DataType::Boolean
                | DataType::Utf8
                | DataType::Utf8View
                | DataType::LargeUtf8
                | DataType::Date32
                | DataType::Date64
                | DataType::Timestamp(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
        )
}

/// Whether a pushed predicate is plain row-wise logic: no subquery, aggregate, window or
/// placeholder (those are planned elsewhere and must not move below the masks).
fn is_plain_predicate(e: &Expr) -> bool {
    let mut plain = true;
    let _ = e.apply(|node| {
        if matches!(
            node,
            Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::AggregateFunction(_)
                | Expr::WindowFunction(_)
                | Expr::Placeholder(_)
                | Expr::OuterReferenceColumn(..)
        ) {
            plain = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    plain
}
