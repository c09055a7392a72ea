//! Pseudonyms that are only ever counted are not computed: such a column is read raw.
//!
//! A keyed pseudonym is injective (HMAC-SHA256, 96 bits kept) and maps NULL to NULL, so
//! `count(DISTINCT c)` and `count(c)` give the same number over raw values as over their
//! pseudonyms. Computing 1M HMACs and hashing 27-byte pseudonyms instead of the 9-byte ids was
//! most of the cost of a thresholded cohort count (`docs/benchmarks.md`). This pass finds, in the
//! optimized plan about to run, each pseudonymized column whose every use is the argument of such
//! a count, and has its scan deliver that column raw.
//!
//! It is the one reviewed exception to "masks are applied at the scan" (invariant 2), and it is
//! deliberately narrow, because a raw value must influence nothing but those counts:
//! - the column may only pass up unchanged through projections (renames), aliases, filters that
//!   do not read it, sorts that do not sort by it and limits, into an aggregate where it is the
//!   sole argument of `count`/`count(DISTINCT)` without FILTER or ORDER BY;
//! - any other use (a predicate, a group key, a join key, a function, another aggregate, the
//!   output, a union, a window, a node this pass does not know) keeps the pseudonym. Group and
//!   join keys stay pseudonymized even though only equality is used there: the order rows come
//!   out in follows the hash of the key, and a hash of a guessable raw id must not steer it.
//!   Two exceptions, both only where rows reach an aggregate whose groups leave sorted by
//!   their own values, through projections, aliases, filters and inner joins (no limit, sort,
//!   union or window on the way): the inner grouping of a lone distinct count (DataFusion plans
//!   `count(DISTINCT x) GROUP BY g` as `count(x)` over `GROUP BY g, x`), and an inner join's
//!   key pair of two pseudonyms (one project key: equal exactly when the raw ids are), read
//!   raw on both sides or on neither. Such an aggregate is one under an aggregation threshold
//!   (its released groups are sorted), one without group keys (a single row), or one of counts
//!   only, which then gets its groups sorted too (a release check that passes every group,
//!   sorted above by `order_released_groups`). Counts only, because other aggregates may
//!   depend on the order rows arrive in (a float sum's rounding), and a caller who sees the
//!   values (alice) could read that order back;
//! - a plan holding any subquery expression is left as it is.
//!
//! Nothing is decided by names: columns are followed by position from the scan that produced
//! them. Not eliding is always safe, so whatever this pass does not understand keeps its mask.

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::Column;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::{Expr, Filter, JoinType, LogicalPlan, TableScanBuilder};

use crate::governed::GovernedTable;

/// One pseudonymized column of one scan: the scan's position among the plan's scans (in
/// depth-first order) and the column's index in the dataset's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    scan: usize,
    column: usize,
}

/// What a node directly feeds, as far as this pass cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Above {
    /// A threshold's filter (`lg_threshold(units)`): the node is the thresholded aggregate.
    ThresholdFilter,
    /// An aggregate whose rows leave in an order set by their own values, reached only through
    /// projections, aliases, filters and inner joins: nodes whose rows reach it as a set,
    /// whatever order they come in. `None`: it is under a threshold (whose released groups are
    /// sorted) or has no group keys (one row). `Some(slot)`: an aggregate of counts only, which
    /// gets a sort of its own (`Flow::sorts[slot]`) if anything below reads raw thanks to it.
    SortedAggregate(Option<usize>),
    Other,
}

impl Above {
    /// What the input of a projection, alias, filter or inner join feeds.
    fn through(self) -> Self {
        match self {
            Above::SortedAggregate(slot) => Above::SortedAggregate(slot),
            _ => Above::Other,
        }
    }
}

/// An aggregate that is not under a threshold and whose groups get sorted if a candidate below
/// relies on it.
struct SortSlot {
    /// The aggregate's position among the plan's aggregates in post-order (as `transform_up`
    /// meets them).
    aggregate: usize,
    /// Candidates read raw only because its groups leave sorted.
    relies: Vec<usize>,
}

#[derive(Default)]
struct Flow {
    candidates: Vec<Candidate>,
    /// Per candidate: used in a way that needs the pseudonym.
    kept: Vec<bool>,
    /// Per candidate: another it is joined with (union-find parent). Both sides of such a join
    /// key are read raw or neither is, or the key would compare a raw id with a pseudonym.
    joined: Vec<usize>,
    scans: usize,
    /// Aggregates met so far (numbered in post-order).
    aggregates: usize,
    sorts: Vec<SortSlot>,
}

impl Flow {
    fn root(&mut self, mut id: usize) -> usize {
        while self.joined[id] != id {
            self.joined[id] = self.joined[self.joined[id]];
            id = self.joined[id];
        }
        id
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.root(a), self.root(b));
        self.joined[a] = b;
    }

    /// Per candidate, kept if it or any candidate it is joined with is kept.
    fn settle(&mut self) -> Vec<bool> {
        let mut group_kept = vec![false; self.candidates.len()];
        for id in 0..self.candidates.len() {
            let r = self.root(id);
            group_kept[r] |= self.kept[id];
        }
        (0..self.candidates.len())
            .map(|id| {
                let r = self.root(id);
                group_kept[r]
            })
            .collect()
    }

    fn keep(
        &mut self,
        carried: &[Option<usize>],
        expr: &Expr,
        schema: &datafusion::common::DFSchema,
    ) {
        for c in expr.column_refs() {
            if let Some(Some(id)) = schema.maybe_index_of_column(c).map(|i| carried[i]) {
                self.kept[id] = true;
            }
        }
    }

    /// Per expression: the candidate a bare (possibly renamed) input column carries up; any
    /// other expression keeps the candidates it reads.
    fn pass_bare_columns(
        &mut self,
        exprs: &[Expr],
        input: &[Option<usize>],
        schema: &datafusion::common::DFSchema,
    ) -> Vec<Option<usize>> {
        exprs
            .iter()
            .map(|e| match e.clone().unalias_nested().data {
                Expr::Column(c) => schema.maybe_index_of_column(&c).and_then(|i| input[i]),
                other => {
                    self.keep(input, &other, schema);
                    None
                }
            })
            .collect()
    }

    /// Under an aggregate that sorts only if something relies on it, `ids` do.
    fn rely(&mut self, above: Above, ids: impl IntoIterator<Item = usize>) {
        if let Above::SortedAggregate(Some(slot)) = above {
            self.sorts[slot].relies.extend(ids);
        }
    }

    fn keep_all(&mut self, carried: &[Option<usize>]) {
        for id in carried.iter().flatten() {
            self.kept[*id] = true;
        }
    }

    /// For each output column of `plan`, the candidate it carries unchanged, if any. `above`
    /// is what `plan` directly feeds.
    fn walk(&mut self, plan: &LogicalPlan, above: Above) -> Vec<Option<usize>> {
        let width = plan.schema().fields().len();
        match plan {
            LogicalPlan::TableScan(scan) => {
                let ordinal = self.scans;
                self.scans += 1;
                let provider = source_as_provider(&scan.source).ok();
                let Some(table) = provider
                    .as_ref()
                    .and_then(|p| (p.as_ref() as &dyn Any).downcast_ref::<GovernedTable>())
                else {
                    return vec![None; width];
                };
                let indices: Vec<usize> = scan
                    .projection
                    .clone()
                    .unwrap_or_else(|| (0..table.pseudonymized_len()).collect());
                let carried: Vec<Option<usize>> = indices
                    .iter()
                    .map(|&column| {
                        table.is_pseudonymized(column).then(|| {
                            self.candidates.push(Candidate {
                                scan: ordinal,
                                column,
                            });
                            self.kept.push(false);
                            self.joined.push(self.candidates.len() - 1);
                            self.candidates.len() - 1
                        })
                    })
                    .collect();
                // Pushed-down predicates only ever read unmasked columns; be sure of it anyway.
                for f in &scan.filters {
                    self.keep(&carried, f, &scan.projected_schema);
                }
                carried
            }
            LogicalPlan::Projection(p) => {
                let input = self.walk(&p.input, above.through());
                self.pass_bare_columns(&p.expr, &input, p.input.schema())
            }
            LogicalPlan::SubqueryAlias(a) => self.walk(&a.input, above.through()),
            LogicalPlan::Filter(f) => {
                let feeds = if is_threshold(&f.predicate) {
                    Above::ThresholdFilter
                } else {
                    above.through()
                };
                let input = self.walk(&f.input, feeds);
                self.keep(&input, &f.predicate, f.input.schema());
                input
            }
            LogicalPlan::Sort(s) => {
                let input = self.walk(&s.input, Above::Other);
                for e in &s.expr {
                    self.keep(&input, &e.expr, s.input.schema());
                }
                input
            }
            LogicalPlan::Limit(l) => {
                let input = self.walk(&l.input, Above::Other);
                for e in l.skip.iter().chain(l.fetch.iter()) {
                    self.keep(&input, e, l.input.schema());
                }
                input
            }
            // The inner half of a lone distinct count that DataFusion planned as two levels
            // (`count(DISTINCT x) GROUP BY g` -> `count(x) GROUP BY g` over `GROUP BY g, x`),
            // under an aggregate whose groups leave sorted: grouping only deduplicates, which an
            // injective pseudonym does not change, and the order it leaves groups in cannot
            // reach the caller. Its bare group columns pass up to the count above; anything
            // else keeps the mask.
            LogicalPlan::Aggregate(agg)
                if matches!(above, Above::SortedAggregate(_)) && agg.aggr_expr.is_empty() =>
            {
                let input = self.walk(&agg.input, Above::Other);
                self.aggregates += 1;
                let passed = self.pass_bare_columns(&agg.group_expr, &input, agg.input.schema());
                self.rely(above, passed.iter().flatten().copied());
                passed
            }
            LogicalPlan::Aggregate(agg) => {
                let feeds = if above == Above::ThresholdFilter {
                    Above::SortedAggregate(None)
                } else if agg.aggr_expr.is_empty() || !agg.aggr_expr.iter().all(is_count) {
                    // Other aggregates may depend on the order rows come in (a float sum's
                    // rounding), which a raw id's hash must not steer; a bare GROUP BY (a
                    // DISTINCT) leaves its groups in the order it formed them.
                    Above::Other
                } else if agg.group_expr.is_empty() {
                    Above::SortedAggregate(None)
                } else {
                    self.sorts.push(SortSlot {
                        aggregate: usize::MAX,
                        relies: Vec::new(),
                    });
                    Above::SortedAggregate(Some(self.sorts.len() - 1))
                };
                let input = self.walk(&agg.input, feeds);
                if let Above::SortedAggregate(Some(slot)) = feeds {
                    self.sorts[slot].aggregate = self.aggregates;
                }
                self.aggregates += 1;
                let schema = agg.input.schema();
                for e in &agg.group_expr {
                    self.keep(&input, e, schema);
                }
                for e in &agg.aggr_expr {
                    if !is_plain_count(e) {
                        self.keep(&input, e, schema);
                    }
                }
                vec![None; width]
            }
            // An inner equi-join feeding an aggregate whose groups leave sorted: a key pair of
            // two pseudonyms (one project key, so equal exactly when the raw ids are) may compare
            // raw ids, both sides or neither; the order the join emits rows in (by the key's
            // hash) reaches only that aggregate. Any other key, the join filter, and every other
            // join keep their masks.
            LogicalPlan::Join(j)
                if matches!(above, Above::SortedAggregate(_)) && j.join_type == JoinType::Inner =>
            {
                let left = self.walk(&j.left, above);
                let right = self.walk(&j.right, above);
                let (ls, rs) = (j.left.schema(), j.right.schema());
                for (l, r) in &j.on {
                    let carried = |side: &[Option<usize>],
                                   schema: &datafusion::common::DFSchema,
                                   e: &Expr| match e {
                        Expr::Column(c) => schema.maybe_index_of_column(c).and_then(|i| side[i]),
                        _ => None,
                    };
                    match (carried(&left, ls, l), carried(&right, rs, r)) {
                        (Some(a), Some(b)) => {
                            self.join(a, b);
                            self.rely(above, [a, b]);
                        }
                        _ => {
                            self.keep(&left, l, ls);
                            self.keep(&right, r, rs);
                        }
                    }
                }
                if let Some(f) = &j.filter {
                    let both: Vec<Option<usize>> = left.iter().chain(&right).copied().collect();
                    self.keep(&both, f, &j.schema);
                }
                left.into_iter().chain(right).collect()
            }
            other => {
                for input in other.inputs() {
                    let carried = self.walk(input, Above::Other);
                    self.keep_all(&carried);
                }
                vec![None; width]
            }
        }
    }
}

/// `count(x)` or `count(DISTINCT x)` of a bare column, without FILTER or ORDER BY: its result
/// depends only on which values of `x` are equal and which are NULL.
fn is_plain_count(e: &Expr) -> bool {
    matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(f)
        if f.func.name() == "count"
            && f.params.filter.is_none()
            && f.params.order_by.is_empty()
            && matches!(f.params.args.as_slice(), [Expr::Column(_)]))
}

/// `count` in any form: an exact number, whatever order its rows come in.
fn is_count(e: &Expr) -> bool {
    matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(f)
        if f.func.name() == "count")
}

/// A threshold's test of a group (`lg_threshold(units)`), alone or among other conjuncts.
fn is_threshold(predicate: &Expr) -> bool {
    predicate
        .exists(|e| {
            Ok(matches!(e, Expr::ScalarFunction(f)
                if f.func.name() == crate::released::ThresholdCheck::NAME))
        })
        .unwrap_or(false)
}

/// The plan with every pseudonymized column that is only counted read raw by its scan.
pub(crate) fn read_counted_pseudonyms_raw(
    plan: LogicalPlan,
) -> datafusion::common::Result<LogicalPlan> {
    let mut has_subquery = false;
    plan.apply(|node| {
        node.apply_subqueries(|_| {
            has_subquery = true;
            Ok(TreeNodeRecursion::Stop)
        })?;
        Ok(
            if has_subquery || matches!(node, LogicalPlan::Subquery(_)) {
                has_subquery = true;
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            },
        )
    })?;
    if has_subquery {
        return Ok(plan);
    }
    let mut flow = Flow::default();
    let output = flow.walk(&plan, Above::Other);
    // What the query returns is never read raw.
    flow.keep_all(&output);
    let mut raw: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); flow.scans];
    let kept = flow.settle();
    for (c, kept) in flow.candidates.iter().zip(&kept) {
        if !kept {
            raw[c.scan].insert(c.column);
        }
    }
    if raw.iter().all(BTreeSet::is_empty) {
        return Ok(plan);
    }
    // Aggregates whose groups must now leave sorted because something below reads raw.
    let sorted: BTreeSet<usize> = flow
        .sorts
        .iter()
        .filter(|s| s.relies.iter().any(|&id| !kept[id]))
        .map(|s| s.aggregate)
        .collect();
    let mut retype = Retype {
        raw: &raw,
        sorted: &sorted,
        scans: 0,
        aggregates: 0,
    };
    Ok(retype.apply(plan)?.0)
}

/// Puts the raw scans and the release checks in place, bottom up.
struct Retype<'a> {
    /// Per scan, in depth-first order: the columns it reads raw.
    raw: &'a [BTreeSet<usize>],
    /// The aggregates (in post-order) whose groups must leave sorted.
    sorted: &'a BTreeSet<usize>,
    scans: usize,
    aggregates: usize,
}

impl Retype<'_> {
    /// The plan rewritten, and whether its schema may differ from what the nodes above were
    /// built on (a raw column keeps the scan's type). Children are visited in the order `walk`
    /// numbered scans and aggregates in; only nodes above a changed scan are retyped.
    fn apply(&mut self, plan: LogicalPlan) -> datafusion::common::Result<(LogicalPlan, bool)> {
        let mut retyped = false;
        let plan = plan
            .map_children(|child| {
                let (child, changed) = self.apply(child)?;
                retyped |= changed;
                Ok(Transformed::new_transformed(child, changed))
            })?
            .data;
        match plan {
            LogicalPlan::TableScan(scan) => {
                let columns = &self.raw[self.scans];
                self.scans += 1;
                if columns.is_empty() {
                    return Ok((LogicalPlan::TableScan(scan), false));
                }
                let provider = source_as_provider(&scan.source)?;
                let Some(table) = (provider.as_ref() as &dyn Any).downcast_ref::<GovernedTable>()
                else {
                    return Ok((LogicalPlan::TableScan(scan), false));
                };
                let source = provider_as_source(Arc::new(table.counting_raw(columns)));
                // The raw columns keep the raw type: the scan's schema is derived again, and
                // so is every schema above it.
                let scan = TableScanBuilder::new(scan.table_name, source)
                    .with_projection(scan.projection)
                    .with_filters(scan.filters)
                    .with_fetch(scan.fetch)
                    .with_statistics_requests(scan.statistics_requests)
                    .build()?;
                Ok((LogicalPlan::TableScan(scan), true))
            }
            LogicalPlan::Aggregate(agg) => {
                self.aggregates += 1;
                let mut plan = LogicalPlan::Aggregate(agg);
                if retyped {
                    // A raw column below may have changed a group key's type.
                    plan = plan.recompute_schema()?;
                }
                if !self.sorted.contains(&(self.aggregates - 1)) {
                    return Ok((plan, retyped));
                }
                // A release check that passes every group (k = 0): the physical plan sorts
                // each partition directly above it (`order_released_groups`), where no
                // optimizer pass can drop the sort. Its argument is one of the counts (slots
                // hold only counts).
                let LogicalPlan::Aggregate(agg) = &plan else {
                    unreachable!("an aggregate stays an aggregate")
                };
                let count = Expr::Column(Column::from(
                    agg.schema.qualified_field(agg.group_expr.len()),
                ));
                let check = crate::released::ThresholdCheck::release_every_group(count);
                let plan = LogicalPlan::Filter(Filter::try_new(check, Arc::new(plan))?);
                Ok((plan, retyped))
            }
            // Projections, filters, joins and aliases pass a raw column up with its new type.
            other if retyped => Ok((other.recompute_schema()?, true)),
            other => Ok((other, false)),
        }
    }
}
