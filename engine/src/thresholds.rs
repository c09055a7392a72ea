//! Aggregation thresholds: which datasets a query reads and how (row or aggregate), and the
//! rewrite that releases only groups of at least k privacy units, with the lineage rules that
//! decide what counts as a unit and what an aggregate over protected rows may take.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{
    col, Aggregate, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder,
};
use lakegate_policies::{Action, FilterValue, Obligations, Threshold};

use crate::governed::GovernedTable;
use crate::released::ThresholdCheck;
use crate::{EngineError, Result};

pub(crate) fn governed_dataset(scan: &datafusion::logical_expr::TableScan) -> Option<String> {
    let provider = source_as_provider(&scan.source).ok()?;
    (provider.as_ref() as &dyn std::any::Any)
        .downcast_ref::<GovernedTable>()
        .map(|g| g.dataset.clone())
}

/// Every governed scan in the plan (subqueries included), and whether an aggregate sits
/// between it and the result.
pub(crate) fn collect_scans(
    plan: &LogicalPlan,
    under_aggregate: bool,
    out: &mut Vec<(String, bool)>,
) -> Result<()> {
    let here = under_aggregate || matches!(plan, LogicalPlan::Aggregate(_));
    if let LogicalPlan::TableScan(scan) = plan {
        if let Some(d) = governed_dataset(scan) {
            out.push((d, under_aggregate));
        }
    }
    let mut err = None;
    plan.apply_subqueries(|sub| {
        if let Err(e) = collect_scans(sub, here, out) {
            err = Some(e);
        }
        Ok(TreeNodeRecursion::Jump)
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    for input in plan.inputs() {
        collect_scans(input, here, out)?;
    }
    Ok(())
}

/// The threshold (and its rule) that protects data flowing into `plan` from governed scans
/// below it, not counting data that already passed through an aggregate.
fn protected_below(
    plan: &LogicalPlan,
    thresholds: &HashMap<String, (Threshold, String)>,
) -> Option<(Threshold, String)> {
    let mut found: Option<(Threshold, String)> = None;
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Some(t) = governed_dataset(scan).and_then(|d| thresholds.get(&d)) {
                if found.as_ref().is_none_or(|(f, _)| t.0.k > f.k) {
                    found = Some(t.clone());
                }
            }
        }
        Ok(
            if matches!(node, LogicalPlan::Aggregate(_)) && !std::ptr::eq(node, plan) {
                TreeNodeRecursion::Jump
            } else {
                TreeNodeRecursion::Continue
            },
        )
    });
    found
}

/// Aggregates allowed over protected data: their result over a group of at least k units does
/// not reveal any single unit's value.
const SAFE_AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "var",
    "var_pop",
    "var_samp",
    "variance",
];

/// `dataset: action allowed by rule [obligations]`, naming columns and mask kinds only.
pub(crate) fn describe_rule(dataset: &str, action: Action, rule: &str, o: &Obligations) -> String {
    let mut parts = Vec::new();
    for f in &o.row_filters {
        let how = match (&f.equals, &f.in_set) {
            (Some(FilterValue::Attribute { attribute }), _) => {
                format!("= principal.{attribute}")
            }
            (Some(_), _) => "= constant".to_string(),
            (None, Some(set)) => format!("in subject set of {}", set.dataset),
            (None, None) => "?".to_string(),
        };
        parts.push(format!("row filter {} {how}", f.column));
    }
    if !o.masks.is_empty() {
        let masks: Vec<String> = o
            .masks
            .iter()
            .map(|(c, m)| format!("{c}={}", crate::masks::mask_name(m)))
            .collect();
        parts.push(format!("masks {}", masks.join(" ")));
    }
    if let Some(t) = &o.threshold {
        parts.push(format!("threshold k={} distinct {}", t.k, t.unit));
    }
    let obligations = if parts.is_empty() {
        String::new()
    } else {
        format!(" [{}]", parts.join("; "))
    };
    format!(
        "{dataset}: {} allowed by rule {rule}{obligations}",
        action.as_str()
    )
}

/// Whether output column `i` of `plan` is, value for value, the privacy unit `unit` of a
/// governed dataset: read by a governed scan and passed up unchanged (renamed at most). Names
/// prove nothing (`SELECT encounter_id AS patient_id` is not a patient), so thresholds and the
/// join rule follow the column back to its scan. Anything computed is not the unit.
///
/// Only datasets under a threshold with this unit supply units: a dataset the caller may read
/// row by row, joined on some other key, could otherwise lend its own patients to a group.
fn is_unit(plan: &LogicalPlan, i: usize, unit: &Units) -> bool {
    is_unit_via(plan, i, unit, true)
}

/// [`is_unit`], where with `optional` false the column may not come from the optional side of
/// an outer join (there it is NULL on the rows that found no match).
fn is_unit_via(plan: &LogicalPlan, i: usize, unit: &Units, optional: bool) -> bool {
    let scanned_unit = |node: &LogicalPlan, i: usize| match node {
        LogicalPlan::TableScan(scan) => {
            governed_dataset(scan).is_some_and(|d| {
                unit.thresholds
                    .get(&d)
                    .is_some_and(|(t, _)| t.unit == unit.name)
            }) && i < scan.projected_schema.fields().len()
                && scan.projected_schema.field(i).name() == unit.name
        }
        _ => false,
    };
    traces_to(
        plan,
        i,
        Trace {
            casts: false,
            optional,
        },
        &scanned_unit,
    )
}

/// Whether output column `i` of `plan` holds a governed dataset's values as its scan read them
/// (renamed, cast). An aggregate over thresholded data may only take such
/// columns: an argument computed from a condition (`sum(CASE WHEN birth_date = ... THEN
/// total_cost END)`, `count(*) FILTER (WHERE ...)`, a weight joined in from `VALUES` or a
/// literal of one union branch) would release one patient's value inside a group the
/// threshold counts as large. Conditions belong in WHERE or GROUP BY, where groups are counted.
/// With `optional` false, a column from the optional side of an outer join does not count
/// (see [`plain_argument`]).
fn carries_dataset_values(plan: &LogicalPlan, i: usize, optional: bool) -> bool {
    // Not an inner aggregate's output: released groups joined back to the rows turn any
    // expression into a weight (`GROUP BY zip3, CASE WHEN zip3 = '890' THEN 1000000 ELSE 0 END`,
    // joined on zip3 and summed per site, counts that area's patients at each site, where the
    // threshold suppresses the sites with few of them).
    let read = |node: &LogicalPlan, _: usize| match node {
        LogicalPlan::TableScan(scan) => governed_dataset(scan).is_some(),
        _ => false,
    };
    traces_to(
        plan,
        i,
        Trace {
            casts: true,
            optional,
        },
        &read,
    )
}

/// What [`traces_to`] lets a column pass through on its way down.
#[derive(Clone, Copy)]
pub(crate) struct Trace {
    /// Casts (`CAST(x AS DOUBLE)` still carries `x`'s values).
    pub(crate) casts: bool,
    /// The side of an outer join that may find no match (the right of a LEFT JOIN, the left
    /// of a RIGHT JOIN, both of a FULL JOIN): its columns are NULL on the rows that did not.
    pub(crate) optional: bool,
}

/// Follows output column `i` of `plan` down through renames (and casts, if `trace.casts`),
/// filters, sorts, limits, unions (every branch) and joins (the optional side of an outer join
/// only if `trace.optional`) to the node that produced it, and asks `source` about that node's
/// column. A column computed by any other expression traces to nothing.
pub(crate) fn traces_to(
    plan: &LogicalPlan,
    i: usize,
    trace: Trace,
    source: &dyn Fn(&LogicalPlan, usize) -> bool,
) -> bool {
    use datafusion::common::JoinType;
    use datafusion::logical_expr::Distinct;
    let down = |input: &LogicalPlan, i: usize| traces_to(input, i, trace, source);
    match plan {
        LogicalPlan::Projection(p) => {
            let Some(e) = p.expr.get(i).map(|e| e.clone().unalias_nested().data) else {
                return false;
            };
            match if trace.casts {
                uncast(e, p.input.schema())
            } else {
                e
            } {
                Expr::Column(c) => p
                    .input
                    .schema()
                    .maybe_index_of_column(&c)
                    .is_some_and(|j| down(&p.input, j)),
                _ => false,
            }
        }
        LogicalPlan::SubqueryAlias(a) => down(&a.input, i),
        LogicalPlan::Filter(f) => down(&f.input, i),
        LogicalPlan::Sort(s) => down(&s.input, i),
        LogicalPlan::Limit(l) => down(&l.input, i),
        LogicalPlan::Repartition(r) => down(&r.input, i),
        LogicalPlan::Distinct(Distinct::All(input)) => down(input, i),
        LogicalPlan::Union(u) => u.inputs.iter().all(|input| down(input, i)),
        LogicalPlan::Join(j) => {
            let left = j.left.schema().fields().len();
            match j.join_type {
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
                    let optional = match j.join_type {
                        JoinType::Left => i >= left,
                        JoinType::Right => i < left,
                        JoinType::Full => true,
                        _ => false,
                    };
                    if optional && !trace.optional {
                        false
                    } else if i < left {
                        down(&j.left, i)
                    } else {
                        down(&j.right, i - left)
                    }
                }
                JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => {
                    i < left && down(&j.left, i)
                }
                JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => {
                    i < j.right.schema().fields().len() && down(&j.right, i)
                }
            }
        }
        other => source(other, i),
    }
}

/// Whether an argument of an aggregate over `input` is a column `carries_dataset_values` (cast
/// at most) or a literal (`count(*)` counts `1`); with `optional` false, not from the optional
/// side of an outer join. The threshold counts the patients of a group's rows, but such a
/// column holds values only where the join found a match: `patients p LEFT JOIN (SELECT ...
/// FROM encounters WHERE <one patient>) x ON ...` puts one patient's `avg(x.total_cost)` in a
/// group of thousands, exactly as a CASE would.
fn plain_argument(input: &LogicalPlan, arg: &Expr, optional: bool) -> bool {
    match uncast(arg.clone().unalias_nested().data, input.schema()) {
        Expr::Literal(..) => true,
        Expr::Column(c) => input
            .schema()
            .maybe_index_of_column(&c)
            .is_some_and(|i| carries_dataset_values(input, i, optional)),
        _ => false,
    }
}

/// `e` without the casts around it that keep every value: those that never fail and never
/// turn a value into NULL (`CAST(total_cost AS DOUBLE)`). A `TRY_CAST`, or a cast that can
/// fail, is computed: `count(TRY_CAST(total_cost AS DECIMAL(4,2)))` counts only the costs under
/// 100, a condition hidden in a conversion, as a CASE would.
fn uncast(mut e: Expr, schema: &DFSchema) -> Expr {
    loop {
        match e {
            Expr::Cast(c)
                if c.expr
                    .get_type(schema)
                    .is_ok_and(|from| crate::total::cast_is_total(&from, c.field.data_type())) =>
            {
                e = *c.expr
            }
            other => return other,
        }
    }
}

/// A subquery expression (`IN`, `EXISTS`, scalar) of `node` that reads rows under a threshold
/// (not through an aggregate of its own, which the threshold then guards) answers from rows no
/// threshold counts: `WHERE EXISTS (SELECT 1 FROM encounters WHERE total_cost > 49998)` released
/// every group exactly when one such encounter existed, and `site_id IN (SELECT site_id FROM
/// encounters WHERE ...)` named the sites holding one. Such a subquery may only select patients
/// for the outer rows: `unit IN (SELECT unit ...)`, or an `EXISTS` whose rows are tied to the
/// outer row by `inner.unit = outer.unit` (a conjunct of a filter on its direct path); the
/// outer threshold then counts the patients it leaves.
///
/// Returns whether `node` holds a subquery expression at all.
fn subqueries_match_units(
    node: &LogicalPlan,
    thresholds: &HashMap<String, (Threshold, String)>,
) -> Result<bool> {
    let outer = node.inputs();
    // Whether `c` is the unit in one of the node's inputs (an outer reference in a subquery).
    let outer_unit = |c: &Column, units: &Units| {
        outer.iter().any(|input| {
            input
                .schema()
                .maybe_index_of_column(c)
                .is_some_and(|i| is_unit(input, i, units))
        })
    };
    let mut refused = None;
    let mut any = false;
    for e in node.expressions() {
        e.apply(|x| {
            let (sub, in_expr) = match x {
                Expr::InSubquery(q) => (&q.subquery, Some(q.expr.as_ref())),
                Expr::Exists(q) => (&q.subquery, None),
                Expr::ScalarSubquery(q) => (q, None),
                _ => return Ok(TreeNodeRecursion::Continue),
            };
            any = true;
            let Some((t, rule)) = protected_below(&sub.subquery, thresholds) else {
                return Ok(TreeNodeRecursion::Continue);
            };
            let units = Units {
                name: &t.unit,
                thresholds,
            };
            let ok = match (x, in_expr) {
                // Not from the optional side of an outer join: a NULL among the subquery's
                // values turns every `NOT IN` false, so whether the join found one patient's
                // match would decide whether any row is counted at all.
                (Expr::InSubquery(_), Some(Expr::Column(c))) => {
                    outer_unit(c, &units) && is_unit_via(&sub.subquery, 0, &units, false)
                }
                (Expr::Exists(_), _) => tied_to_outer_unit(&sub.subquery, &units, &outer_unit),
                _ => false,
            };
            if !ok {
                refused = Some(EngineError::PermissionDenied(format!(
                    "a subquery over data under an aggregation threshold must aggregate, or select \
                     patients by {unit} ({unit} IN (SELECT {unit} ...), not from the optional \
                     side of an outer join, or EXISTS tied by inner.{unit} = outer.{unit}): its \
                     rows are counted by no threshold (rule: {rule})",
                    unit = t.unit
                )));
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
    }
    refused.map_or(Ok(any), Err)
}

/// Whether a filter on the direct path from `plan` down (through projections, aliases, sorts,
/// limits, distinct) has a conjunct `inner.unit = outer.unit`.
fn tied_to_outer_unit(
    plan: &LogicalPlan,
    units: &Units,
    outer_unit: &dyn Fn(&Column, &Units) -> bool,
) -> bool {
    use datafusion::logical_expr::{Distinct, Operator};
    match plan {
        LogicalPlan::Filter(f) => {
            let tied = datafusion::logical_expr::utils::split_conjunction(&f.predicate)
                .into_iter()
                .any(|c| match c {
                    Expr::BinaryExpr(b) if b.op == Operator::Eq => {
                        let pair = |inner: &Expr, out: &Expr| match (inner, out) {
                            (Expr::Column(i), Expr::OuterReferenceColumn(_, o)) => {
                                f.input
                                    .schema()
                                    .maybe_index_of_column(i)
                                    .is_some_and(|j| is_unit(&f.input, j, units))
                                    && outer_unit(o, units)
                            }
                            _ => false,
                        };
                        pair(&b.left, &b.right) || pair(&b.right, &b.left)
                    }
                    _ => false,
                });
            tied || tied_to_outer_unit(&f.input, units, outer_unit)
        }
        LogicalPlan::Projection(p) => tied_to_outer_unit(&p.input, units, outer_unit),
        LogicalPlan::SubqueryAlias(a) => tied_to_outer_unit(&a.input, units, outer_unit),
        LogicalPlan::Sort(s) => tied_to_outer_unit(&s.input, units, outer_unit),
        LogicalPlan::Limit(l) => tied_to_outer_unit(&l.input, units, outer_unit),
        LogicalPlan::Distinct(Distinct::All(input)) => tied_to_outer_unit(input, units, outer_unit),
        _ => false,
    }
}

/// The privacy unit sought, and the thresholds of the datasets that may supply it.
struct Units<'a> {
    name: &'a str,
    thresholds: &'a HashMap<String, (Threshold, String)>,
}

/// Whether `e`, a join condition's operand, is the privacy unit of the join's left or right input.
fn join_operand_is_unit(j: &datafusion::logical_expr::Join, e: &Expr, unit: &Units) -> bool {
    let Expr::Column(c) = e else { return false };
    if let Some(i) = j.left.schema().maybe_index_of_column(c) {
        return is_unit(&j.left, i, unit);
    }
    j.right
        .schema()
        .maybe_index_of_column(c)
        .is_some_and(|i| is_unit(&j.right, i, unit))
}

/// The plan with each `WHERE a.x = b.y` over inner joins (comma joins, `CROSS JOIN`, or
/// `JOIN ... ON` with more in WHERE) moved into the condition of the join that brings `a` and
/// `b` together, where the threshold's join check reads it: for inner joins the two are the
/// same query, and DataFusion's optimizer moves them there itself later. Equalities of a column
/// from each side move into the join; conjuncts on one side only go down with that side when it
/// is itself an inner join (`FROM a, b, c WHERE a.id = b.id AND b.id = c.id`); the rest stays.
pub(crate) fn joins_from_where(plan: LogicalPlan) -> datafusion::common::Result<LogicalPlan> {
    use datafusion::common::JoinType;
    use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
    use datafusion::logical_expr::{Filter, Join};
    fn inner(plan: &LogicalPlan) -> Option<&Join> {
        match plan {
            LogicalPlan::Join(j) if j.join_type == JoinType::Inner => Some(j),
            _ => None,
        }
    }
    fn filtered(
        predicate: Option<Expr>,
        input: LogicalPlan,
    ) -> datafusion::common::Result<LogicalPlan> {
        Ok(match predicate {
            Some(p) => LogicalPlan::Filter(Filter::try_new(p, Arc::new(input))?),
            None => input,
        })
    }
    plan.transform_down_with_subqueries(|node| {
        let LogicalPlan::Filter(filter) = &node else {
            return Ok(Transformed::no(node));
        };
        let Some(join) = inner(filter.input.as_ref()) else {
            return Ok(Transformed::no(node));
        };
        let (left, right) = (join.left.schema(), join.right.schema());
        // 0: left only, 1: right only, 2: both, None: neither or unknown.
        let sides = |e: &Expr| {
            let refs = e.column_refs();
            let l = refs.iter().all(|c| left.has_column(c));
            let r = refs.iter().all(|c| right.has_column(c));
            match (refs.is_empty(), l, r) {
                (true, _, _) | (_, true, true) => None,
                (_, true, false) => Some(0),
                (_, false, true) => Some(1),
                _ => Some(2),
            }
        };
        let (mut across, mut lefts, mut rights, mut rest) = (vec![], vec![], vec![], vec![]);
        for c in split_conjunction_owned(filter.predicate.clone()) {
            let equates_columns = matches!(&c, Expr::BinaryExpr(b)
                if b.op == datafusion::logical_expr::Operator::Eq
                    && matches!((b.left.as_ref(), b.right.as_ref()), (Expr::Column(_), Expr::Column(_))));
            match sides(&c) {
                Some(2) if equates_columns => across.push(c),
                Some(0) if inner(&join.left).is_some() => lefts.push(c),
                Some(1) if inner(&join.right).is_some() => rights.push(c),
                _ => rest.push(c),
            }
        }
        if across.is_empty() && lefts.is_empty() && rights.is_empty() {
            return Ok(Transformed::no(node));
        }
        let mut joined = join.clone();
        joined.filter = conjunction(joined.filter.take().into_iter().chain(across));
        joined.left = Arc::new(filtered(conjunction(lefts), joined.left.as_ref().clone())?);
        joined.right = Arc::new(filtered(conjunction(rights), joined.right.as_ref().clone())?);
        Ok(Transformed::yes(filtered(
            conjunction(rest),
            LogicalPlan::Join(joined),
        )?))
    })
    .map(|t| t.data)
}

pub(crate) fn apply_thresholds(
    plan: LogicalPlan,
    thresholds: &HashMap<String, (Threshold, String)>,
    suppressed: &Arc<AtomicU64>,
) -> Result<LogicalPlan> {
    let refuse =
        |why: String, rule: &str| EngineError::PermissionDenied(format!("{why} (rule: {rule})"));
    let plan = joins_from_where(plan)?;
    let subqueries = std::cell::Cell::new(false);
    let rewritten = plan.transform_up_with_subqueries(|node| {
        let fail = |e: EngineError| datafusion::error::DataFusionError::External(Box::new(e));
        if subqueries_match_units(&node, thresholds).map_err(fail)? {
            subqueries.set(true);
        }
        let Some((threshold, rule)) = protected_below(&node, thresholds) else {
            return Ok(Transformed::no(node));
        };
        let sought = Units {
            name: &threshold.unit,
            thresholds,
        };
        match &node {
            LogicalPlan::Window(_) => Err(fail(refuse(
                "window functions over data under an aggregation threshold are refused".into(),
                &rule,
            ))),
            // A LIMIT (or OFFSET) below the aggregate picks rows by their rank: the answers for
            // `ORDER BY x LIMIT 12` and `LIMIT 11` differ by exactly one row, which no WHERE the
            // threshold counts could single out so cheaply. Above the aggregate it limits
            // released groups, and this node is never reached there.
            LogicalPlan::Limit(_) => Err(fail(refuse(
                "LIMIT and OFFSET over rows under an aggregation threshold are refused (they pick rows by rank); limit the released groups instead".into(),
                &rule,
            ))),
            LogicalPlan::Distinct(datafusion::logical_expr::Distinct::On(_)) => Err(fail(refuse(
                "DISTINCT ON over rows under an aggregation threshold is refused (it picks one row per key by rank, as FIRST_VALUE would)".into(),
                &rule,
            ))),
            LogicalPlan::Join(j) => {
                let both = protected_below(&j.left, thresholds).is_some() && protected_below(&j.right, thresholds).is_some();
                // SQL's `JOIN ... ON a = b` arrives as a join filter (the optimizer turns it into
                // equi-join keys later), a comma join's `WHERE a = b` too (`joins_from_where`):
                // accept keys and filter conjuncts alike. One conjunct unit = unit pairs rows of
                // one unit only; further conditions can only drop such pairs (as they would in
                // WHERE), never pair two units. A disjunction is one conjunct, and not unit = unit.
                let mut pairs: Vec<(&Expr, &Expr)> = j.on.iter().map(|(l, r)| (l, r)).collect();
                if let Some(f) = &j.filter {
                    for c in datafusion::logical_expr::utils::split_conjunction(f) {
                        if let Expr::BinaryExpr(b) = c {
                            if b.op == datafusion::logical_expr::Operator::Eq {
                                pairs.push((b.left.as_ref(), b.right.as_ref()))
                            }
                        }
                    }
                }
                let on_unit = pairs.iter().any(|(l, r)| {
                    join_operand_is_unit(j, l, &sought) && join_operand_is_unit(j, r, &sought)
                });
                if both && !on_unit {
                    return Err(fail(refuse(
                        format!("datasets under an aggregation threshold may be joined only on {}", threshold.unit),
                        &rule,
                    )));
                }
                Ok(Transformed::no(node))
            }
            LogicalPlan::Aggregate(agg) => {
                if agg.group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
                    return Err(fail(refuse(
                        "GROUPING SETS, ROLLUP and CUBE over data under an aggregation threshold are refused".into(),
                        &rule,
                    )));
                }
                for e in &agg.aggr_expr {
                    let e = e.clone().unalias_nested().data;
                    let name = match &e {
                        Expr::AggregateFunction(f) => f.func.name().to_ascii_lowercase(),
                        other => other.schema_name().to_string(),
                    };
                    if !SAFE_AGGREGATES.contains(&name.as_str()) {
                        return Err(fail(refuse(
                            format!(
                                "aggregate {name} is refused over data under an aggregation threshold; allowed: count, sum, avg, stddev, variance"
                            ),
                            &rule,
                        )));
                    }
                    if let Expr::AggregateFunction(f) = &e {
                        if f.params.filter.is_some() || !f.params.args.iter().all(|a| plain_argument(&agg.input, a, true)) {
                            return Err(fail(refuse(
                                format!(
                                    "aggregate {name} over data under an aggregation threshold must take columns of the data as they are (a FILTER clause, CASE or other expression could single out one patient within a group); put conditions in WHERE or GROUP BY"
                                ),
                                &rule,
                            )));
                        }
                        if !f.params.args.iter().all(|a| plain_argument(&agg.input, a, false)) {
                            return Err(fail(refuse(
                                format!(
                                    "aggregate {name} over data under an aggregation threshold may not take a column from the optional side of an outer join (it holds values only for the patients that matched, which the threshold does not count); use an inner join"
                                ),
                                &rule,
                            )));
                        }
                    }
                }
                let input = agg.input.schema();
                let units: Vec<Column> = (0..input.fields().len())
                    .filter(|i| is_unit(&agg.input, *i, &sought))
                    .map(|i| Column::from(input.qualified_field(i)))
                    .collect();
                // Joins of protected data are on the unit, so every unit column of a group holds
                // the same subjects (or nulls, which count for nothing): count the one the caller
                // already counts distinct, and the optimizer computes that count once.
                let counted_by_caller = |c: &Column| {
                    agg.aggr_expr.iter().any(|e| {
                        matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(f)
                            if f.func.name() == "count" && f.params.distinct && f.params.filter.is_none()
                                && matches!(f.params.args.as_slice(), [Expr::Column(x)] if x == c))
                    })
                };
                let unit = units
                    .iter()
                    .find(|c| counted_by_caller(c))
                    .or(units.first())
                    .cloned()
                    .ok_or_else(|| {
                        fail(refuse(
                            format!("the privacy unit {} must reach every aggregate over protected data", threshold.unit),
                            &rule,
                        ))
                    })?;
                // The caller's own `count(DISTINCT unit)`, as it stands in the aggregate, is the
                // threshold's count: no second copy (whose alias would also stop DataFusion from
                // planning a lone distinct count as a two-level GROUP BY, as it does unguarded).
                let units_count = datafusion::functions_aggregate::expr_fn::count_distinct(Expr::Column(unit));
                let (counted, units) = match agg.aggr_expr.iter().position(|e| *e == units_count) {
                    Some(i) => {
                        let field = agg.schema.qualified_field(agg.group_expr.len() + i);
                        (LogicalPlan::Aggregate(agg.clone()), Expr::Column(Column::from(field)))
                    }
                    None => {
                        let mut aggr = agg.aggr_expr.clone();
                        aggr.push(units_count.alias("__lg_units"));
                        let counted = Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr)?;
                        (LogicalPlan::Aggregate(counted), col("__lg_units"))
                    }
                };
                let output: Vec<Expr> = agg.schema.columns().into_iter().map(Expr::Column).collect();
                // Without GROUP BY, DataFusion takes an aggregate to answer exactly one row, and
                // `count(*)` to be non-null: a suppressed one answers none, which a scalar
                // subquery reads as NULL. Its columns are declared nullable (`nullif(x, NULL)` is
                // `x`), or that NULL fails the batch's schema check.
                let shown: Vec<Expr> = if agg.group_expr.is_empty() {
                    agg.schema
                        .columns()
                        .into_iter()
                        .map(|c| {
                            datafusion::functions::core::expr_fn::nullif(
                                Expr::Column(c.clone()),
                                datafusion::prelude::lit(datafusion::common::ScalarValue::Null),
                            )
                            .alias_qualified(c.relation, c.name)
                        })
                        .collect()
                } else {
                    output.clone()
                };
                // Groups with fewer than k distinct units are suppressed, not rounded: nothing about them leaves.
                let released = LogicalPlanBuilder::from(counted)
                    .filter(ThresholdCheck::expr(Arc::clone(suppressed), units, i64::from(threshold.k)))?
                    .project(shown)?;
                // Released groups leave sorted by their own values, not in the order DataFusion
                // met them in the files (which says where one patient's rows lie): a LIMIT picks
                // among sorted groups. A sort the optimizer removes (under the caller's own
                // ORDER BY, a join) is backed by `order_released_groups` on the physical plan.
                let released = if agg.group_expr.is_empty() {
                    released
                } else {
                    released.sort(output.into_iter().map(|e| e.sort(true, true)))?
                };
                let released = released.build()?;
                Ok(Transformed::yes(released))
            }
            _ => Ok(Transformed::no(node)),
        }
    });
    // A node keeps the schema it was built with when a subquery in its expressions changes
    // (a suppressed aggregate's columns become nullable): derive every schema again.
    let rewritten = rewritten.and_then(|t| {
        if t.transformed && subqueries.get() {
            t.data
                .transform_up_with_subqueries(|n| n.recompute_schema().map(Transformed::yes))
        } else {
            Ok(t)
        }
    });
    match rewritten {
        Ok(t) => Ok(t.data),
        Err(datafusion::error::DataFusionError::External(e)) => match e.downcast::<EngineError>() {
            Ok(engine) => Err(*engine),
            Err(other) => Err(EngineError::Internal(other.to_string())),
        },
        Err(e) => Err(e.into()),
    }
}
