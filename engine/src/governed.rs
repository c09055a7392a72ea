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
use datafusion::arrow::array::BooleanBufferBuilder;
use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::catalog::{Session as DFSession, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Statistics;
use datafusion::common::{DFSchema, DataFusionError, Result as DFResult};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::TableProviderFilterPushDown;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
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
    dataset: String,
    properties: Arc<PlanProperties>,
    /// An inner boundary: above the row filter, below the caller's early predicate and the
    /// masks (its columns are raw, so it is not the dataset's output).
    inner: bool,
}

impl PolicyBoundaryExec {
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

/// The keys of a subject set (e.g. the consenting patients), as bytes.
///
/// A scan asks about every subject it reads. The lake's files are written per subject in key
/// order, so the next subject a scan meets is usually the next key of the set, a step or two
/// past the previous answer: [`Members::contains`] walks forward from there, through memory it
/// has just read, and only searches when the scan jumps. A hash set would take two cache misses
/// per subject on a set of a million keys.
#[derive(Debug, Default)]
pub(crate) struct Members {
    /// Every key once, sorted, back to back; `ends[i]` is where key `i` ends.
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// For scans in no useful order, built when the first such scan asks (a key-ordered scan
    /// never does, and building it is most of the cost of a new set: one allocation per key).
    /// Keys come from the lake, never from a caller, so DataFusion's fast (foldhash) hasher is
    /// fine.
    index: std::sync::OnceLock<datafusion::common::HashSet<Box<[u8]>>>,
}

/// Where a scan is in a [`Members`] set, and whether walking forward is paying off.
#[derive(Default)]
struct Cursor {
    at: usize,
    lookups: u32,
    jumps: u32,
}

impl Members {
    pub(crate) fn new<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut keys: Vec<&[u8]> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut bytes = Vec::with_capacity(keys.iter().map(|k| k.len()).sum());
        let mut ends = Vec::with_capacity(keys.len());
        for k in &keys {
            bytes.extend_from_slice(k);
            ends.push(bytes.len());
        }
        Self {
            bytes,
            ends,
            index: std::sync::OnceLock::new(),
        }
    }

    fn index(&self) -> &datafusion::common::HashSet<Box<[u8]>> {
        self.index.get_or_init(|| {
            (0..self.ends.len())
                .map(|i| Box::from(self.key(i)))
                .collect()
        })
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    fn contains(&self, key: &[u8], cursor: &mut Cursor) -> bool {
        use std::cmp::Ordering;
        const WALK: usize = 8;
        cursor.lookups += 1;
        let n = self.ends.len();
        let mut i = cursor.at;
        if n == 0 || (i == n && self.key(n - 1) < key) {
            // Past the last key, as the previous subject was.
            return false;
        }
        if i < n {
            if self.key(i) > key {
                // Between the key before the cursor and the cursor's: not a member, and the
                // cursor stays (a run of non-members, e.g. other sites' patients).
                if i == 0 || self.key(i - 1) < key {
                    return false;
                }
            } else {
                // Walk forward only from a key at or before the one sought: then the first key
                // not below it is its place.
                let end = (i + WALK).min(n);
                while i < end {
                    match self.key(i).cmp(key) {
                        Ordering::Less => i += 1,
                        found => {
                            cursor.at = i;
                            return found == Ordering::Equal;
                        }
                    }
                }
            }
        }
        cursor.jumps += 1;
        // A scan in key order jumps once per batch or file; one that keeps jumping is in no
        // useful order, and the hash set answers it.
        if cursor.lookups > 64 && cursor.jumps * 8 > cursor.lookups {
            return self.index().contains(key);
        }
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        cursor.at = lo;
        lo < n && self.key(lo) == key
    }
}

/// Membership in a precomputed subject set (e.g. the consenting patients): the typed form of
/// `column IN (SELECT key FROM dataset WHERE ...)`, evaluated without exposing the subquery to
/// the caller's plan.
#[derive(Debug, Clone)]
pub(crate) struct InSubjectSet {
    pub(crate) set: Arc<Members>,
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
    pub(crate) fn expr(set: Arc<Members>, column: Expr) -> Expr {
        ScalarUDF::from(Self {
            set,
            signature: Signature::uniform(
                1,
                vec![DataType::Utf8, DataType::Utf8View],
                Volatility::Immutable,
            ),
        })
        .call(vec![column])
    }
}

impl InSubjectSet {
    fn members(&self, strings: &crate::masks::Strings) -> BooleanBuffer {
        // One answer per run of a subject's rows (this runs on every row the scan reads).
        let mut cursor = Cursor::default();
        let mut out = BooleanBufferBuilder::new(strings.len());
        for run in strings.runs() {
            let member = !strings.is_null(run.start)
                && self
                    .set
                    .contains(strings.value(run.start).as_bytes(), &mut cursor);
            out.append_n(run.len(), member);
        }
        out.finish()
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
        let members = self.members(&crate::masks::Strings::of(&arrays[0])?);
        Ok(ColumnarValue::Array(
            Arc::new(BooleanArray::new(members, None)) as ArrayRef,
        ))
    }
}

/// Released groups of a thresholded aggregate in an order set by their own values.
///
/// DataFusion emits groups in the order it first meets them, and that is the order of the rows
/// in the files: `GROUP BY <site is X> LIMIT 1` answered with the group of the first patient of
/// a file, a fact about one person that no threshold hides. Directly above each threshold
/// filter of the optimized physical plan (where no optimizer pass can take it out again), every
/// partition is sorted by all its columns; a limit DataFusion fused into the filter moves onto
/// the sort, so it picks among the sorted groups. Which partition a group lands in follows a
/// hash of its own (released) values.
///
/// Where the plan already sorts a threshold filter's groups by every grouping column directly
/// above it (the order `apply_thresholds` asks for, unless the caller's own ORDER BY replaced
/// it), that sort is kept and none is added: groups are unique in their keys, so it is already
/// an order set by their own values, and rebuilding the plan above a second sort cost 60 us
/// of planning each thresholded query.
pub(crate) fn order_released_groups(
    plan: Arc<dyn ExecutionPlan>,
) -> DFResult<Arc<dyn ExecutionPlan>> {
    use datafusion::arrow::compute::SortOptions;
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_expr::{
        conjunction, split_conjunction, LexOrdering, PhysicalSortExpr, ScalarFunctionExpr,
    };
    use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
    use datafusion::physical_plan::filter::FilterExecBuilder;
    use datafusion::physical_plan::sorts::sort::SortExec;
    let is_check = |e: &Arc<dyn datafusion::physical_expr::PhysicalExpr>| {
        let mut found = false;
        e.apply(|e| {
            found |= e
                .downcast_ref::<ScalarFunctionExpr>()
                .is_some_and(|f| f.name() == ThresholdCheck::NAME);
            Ok(TreeNodeRecursion::Continue)
        })
        .map(|_| found)
    };
    // Threshold filters (by address) already under such a sort. A filter whose subtree changes
    // below is rebuilt at a new address before it is visited, and then gets a sort of its own.
    let mut ordered: HashSet<*const ()> = HashSet::new();
    plan.apply(|node| {
        let Some(sort) = node.downcast_ref::<SortExec>() else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let Some(filter) = sort.input().downcast_ref::<FilterExec>() else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let only_check = split_conjunction(filter.predicate())
            .into_iter()
            .try_fold(true, |all, e| Ok::<_, DataFusionError>(all && is_check(e)?))?;
        // Only the check, no rows picked by a limit.
        let plain_filter = only_check && filter.fetch().is_none();
        let groups = filter
            .input()
            .downcast_ref::<AggregateExec>()
            .filter(|a| {
                matches!(
                    a.mode(),
                    AggregateMode::Final
                        | AggregateMode::FinalPartitioned
                        | AggregateMode::Single
                        | AggregateMode::SinglePartitioned
                ) && a.group_expr().is_single()
            })
            .map_or(0, |a| a.group_expr().expr().len());
        // The aggregate's columns the sort orders by (its grouping columns come first).
        let sorted: HashSet<usize> = sort
            .expr()
            .iter()
            .filter_map(|e| e.expr.downcast_ref::<Column>().map(Column::index))
            .filter_map(|i| match filter.projection() {
                Some(p) => p.get(i).copied(),
                None => Some(i),
            })
            .collect();
        if plain_filter && groups > 0 && (0..groups).all(|i| sorted.contains(&i)) {
            ordered.insert(Arc::as_ptr(sort.input()) as *const ());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    plan.transform_up(|node| {
        let Some(filter) = node.downcast_ref::<FilterExec>() else {
            return Ok(Transformed::no(node));
        };
        if !is_check(filter.predicate())? || ordered.contains(&(Arc::as_ptr(&node) as *const ())) {
            return Ok(Transformed::no(node));
        }
        // The optimizer merges a HAVING over the aggregate into the threshold's filter, whose
        // conjunction evaluates the caller's part on every group, suppressed ones too: there
        // `HAVING 1 / (count(DISTINCT patient_id) - 1) > 0` failed with division by zero exactly
        // when some group held one patient. The caller's part runs above, on released groups.
        let (check, theirs): (Vec<_>, Vec<_>) = split_conjunction(filter.predicate())
            .into_iter()
            .cloned()
            .try_fold((vec![], vec![]), |(mut c, mut t), e| {
                if is_check(&e)? {
                    c.push(e)
                } else {
                    t.push(e)
                }
                Ok::<_, datafusion::error::DataFusionError>((c, t))
            })?;
        let node: Arc<dyn ExecutionPlan> = if theirs.is_empty() {
            node
        } else {
            let released = FilterExecBuilder::new(conjunction(check), Arc::clone(filter.input()))
                .with_batch_size(filter.batch_size())
                .build()?;
            Arc::new(
                FilterExecBuilder::new(conjunction(theirs), Arc::new(released))
                    .apply_projection(filter.projection().as_ref().map(|p| p.to_vec()))?
                    .with_batch_size(filter.batch_size())
                    .with_fetch(filter.fetch())
                    .build()?,
            )
        };
        let schema = node.schema();
        let ordering = LexOrdering::new(schema.fields().iter().enumerate().map(|(i, f)| {
            PhysicalSortExpr::new(
                Arc::new(Column::new(f.name(), i)),
                SortOptions {
                    descending: false,
                    nulls_first: true,
                },
            )
        }));
        let Some(ordering) = ordering else {
            return Ok(Transformed::yes(node));
        };
        let fetch = node.fetch();
        let input = match fetch {
            Some(_) => node.with_fetch(None).ok_or_else(|| {
                datafusion::error::DataFusionError::Internal(
                    "threshold filter keeps its limit".into(),
                )
            })?,
            None => node,
        };
        Ok(Transformed::yes(Arc::new(
            SortExec::new(ordering, input)
                .with_preserve_partitioning(true)
                .with_fetch(fetch),
        ) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
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
    pub(crate) const NAME: &'static str = "lg_threshold";

    /// The least number of units a released group holds (0: a release check only).
    pub(crate) fn k(&self) -> i64 {
        self.k
    }

    pub(crate) fn expr(suppressed: Arc<AtomicU64>, units: Expr, k: i64) -> Expr {
        ScalarUDF::from(Self {
            k,
            suppressed,
            signature: Signature::exact(vec![DataType::Int64], Volatility::Volatile),
        })
        .call(vec![units])
    }

    /// A check with k = 0, which every group passes: it marks an aggregate that is under no
    /// threshold but whose groups must leave sorted by their own values, because a raw id
    /// decided the order they were formed in (`counted.rs`); `order_released_groups` sorts
    /// above it as above a threshold.
    pub(crate) fn release_every_group(count: Expr) -> Expr {
        Self::expr(Arc::new(AtomicU64::new(0)), count, 0)
    }
}

impl ScalarUDFImpl for ThresholdCheck {
    fn name(&self) -> &str {
        Self::NAME
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("P{i:08}")).collect()
    }

    #[test]
    fn members_answer_the_same_in_any_scan_order() {
        // Even ids are members; odd ones are not, and some lie outside the set's range.
        let all = ids(0..5_000);
        let even: Vec<&[u8]> = all.iter().step_by(2).map(|s| s.as_bytes()).collect();
        let set = Members::new(even.iter().rev().copied());
        let truth = |k: &str| k[1..].parse::<u32>().unwrap() % 2 == 0;
        let mut probes: Vec<String> = ids(0..6_000);
        let check = |probes: &[String]| {
            let mut cursor = Cursor::default();
            for p in probes {
                let k = p.as_str();
                let expect = k[1..].parse::<u32>().unwrap() < 5_000 && truth(k);
                assert_eq!(set.contains(k.as_bytes(), &mut cursor), expect, "{k}");
            }
            cursor
        };
        // In key order (as the lake's files are written) and in runs: walks, a jump or two.
        let sorted = check(&probes);
        assert!(sorted.jumps <= 2, "{} jumps", sorted.jumps);
        assert!(
            set.index.get().is_none(),
            "a key-ordered scan built the hash index"
        );
        // One key in five a member (one site's patients among five): runs of non-members
        // answer from where the cursor stands.
        let fifth: Vec<&[u8]> = all.iter().step_by(5).map(|s| s.as_bytes()).collect();
        let sparse = Members::new(fifth);
        let mut cursor = Cursor::default();
        for (i, p) in all.iter().enumerate() {
            assert_eq!(
                sparse.contains(p.as_bytes(), &mut cursor),
                i % 5 == 0,
                "{p}"
            );
        }
        assert!(cursor.jumps <= 2, "{} jumps", cursor.jumps);
        // Backwards, and shuffled: every answer still right.
        probes.reverse();
        check(&probes);
        let mut state = 7u64;
        for i in (1..probes.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            probes.swap(i, (state >> 33) as usize % (i + 1));
        }
        check(&probes);
        assert!(set.index.get().is_some(), "a shuffled scan kept searching");
        // The empty key, a key before the first and after the last, an empty set.
        let mut c = Cursor::default();
        assert!(!set.contains(b"", &mut c));
        assert!(!set.contains(b"A", &mut c));
        assert!(!set.contains(b"Z", &mut c));
        assert!(!Members::new([]).contains(b"P00000000", &mut Cursor::default()));
    }
}
