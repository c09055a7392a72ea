//! Differentially private aggregates: the rewrite that bounds each privacy unit's
//! contribution, and the plan node that adds calibrated noise and selects which groups may be
//! released. The mechanism and its accounting are described in `docs/privacy.md`.
//!
//! An aggregate over datasets under a `differential_privacy` grant becomes:
//!
//! 1. per row: the unit, the group keys, and each measure's value (1 for a count, the value
//!    clamped to the grant's bounds, in fixed point, for a sum);
//! 2. per unit and group: each measure summed, then bounded to L rows' worth (a count to L, a
//!    sum of more than L values to L times their mean);
//! 3. per unit: at most G of its groups kept (chosen at random);
//! 4. per group: the units counted and the bounded measures summed, exactly;
//! 5. [`NoisyRelease`]: discrete Laplace noise on every measure, and a group's key released
//!    only if its noisy count of units passes a threshold derived from epsilon and delta.
//!
//! Everything above the aggregate is post-processing of a differentially private release.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Decimal128Array, Float64Array, Int64Array, UInt32Array};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::Session as PlanningSession;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, DFSchemaRef, DataFusionError};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    col, lit, Aggregate, Expr, ExprFunctionExt, Extension, LogicalPlan, LogicalPlanBuilder,
    UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PhysicalExpr,
    PlanProperties,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use lakegate_policies::DifferentialPrivacy;

use crate::thresholds::{governed_dataset, joins_from_where, traces_to, Trace};
use crate::{EngineError, Result};

/// Sums are computed exactly, in units of 1/1000 of the column's unit: a floating-point sum's
/// rounding depends on the order and size of its terms, which breaks the sensitivity bound.
const FIXED_POINT: f64 = 1000.0;

/// Field metadata keys on every noisy column of a result.
pub const NOISY: &str = "lakegate.dp.noisy";
pub const NOISY_EPSILON: &str = "lakegate.dp.epsilon";
pub const NOISY_MECHANISM: &str = "lakegate.dp.mechanism";

/// What one aggregate of the caller's query measures.
#[derive(Clone, Debug, PartialEq)]
enum Measure {
    /// `count(*)`: rows, at most L per unit and group.
    Rows,
    /// `count(x)`: rows where x is not null.
    NonNull,
    /// `sum(x)`, x clamped to [lo, hi].
    Sum { lo: f64, hi: f64 },
    /// `avg(x)`: a noisy sum over a noisy count of non-null rows.
    Avg { lo: f64, hi: f64 },
    /// `count(DISTINCT unit)`: the units of the group.
    Units,
}

impl Measure {
    /// How many noisy statistics the measure takes (each gets its share of epsilon).
    fn statistics(&self, grouped: bool) -> usize {
        match self {
            Measure::Rows | Measure::NonNull | Measure::Sum { .. } => 1,
            Measure::Avg { .. } => 2,
            // Grouped, partition selection's noisy count of units is this answer.
            Measure::Units => usize::from(!grouped),
        }
    }
}

/// What the noise step needs to know about one query's aggregate.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ReleaseSpec {
    groups: usize,
    measures: Vec<Measure>,
    epsilon: f64,
    delta: f64,
    max_groups: u32,
    max_rows: u32,
    rule: String,
}

impl ReleaseSpec {
    fn grouped(&self) -> bool {
        self.groups > 0
    }

    /// Noisy statistics, partition selection included.
    fn statistics(&self) -> usize {
        let measured: usize = self
            .measures
            .iter()
            .map(|m| m.statistics(self.grouped()))
            .sum();
        measured + usize::from(self.grouped())
    }

    /// Each noisy statistic's epsilon: the query's epsilon split evenly (basic composition).
    fn epsilon_each(&self) -> f64 {
        self.epsilon / self.statistics().max(1) as f64
    }

    /// The L1 sensitivity, in the statistic's own units (fixed point for sums), of a measure's
    /// vector over groups: one unit adds at most L rows' worth to each of at most G groups.
    fn sensitivity(&self, bound: i128) -> i128 {
        let g = if self.grouped() {
            i128::from(self.max_groups)
        } else {
            1
        };
        g * i128::from(self.max_rows) * bound
    }
}

/// What a query under differential privacy costs: epsilon and delta per noisy aggregate.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivateCharge {
    pub rule: String,
    pub grant: DifferentialPrivacy,
    pub epsilon: f64,
    pub delta: f64,
    /// The noisy aggregates of the query.
    pub releases: u32,
}

fn refuse(why: impl fmt::Display, rule: &str) -> EngineError {
    EngineError::PermissionDenied(format!("{why} under differential privacy (rule: {rule})"))
}

/// Rewrites every aggregate over datasets under `grants` into a bounded, noisy release, and
/// returns what the query will cost. Anything it cannot bound is refused naming the rule.
pub(crate) fn apply_differential_privacy(
    state: &datafusion::execution::SessionState,
    plan: LogicalPlan,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
) -> Result<(LogicalPlan, PrivateCharge)> {
    let (grant, rule) = {
        let mut distinct = grants.values();
        let first = distinct.next().expect("called with grants").clone();
        if distinct.any(|(g, r)| g != &first.0 || r != &first.1) {
            return Err(refuse(
                "a query may read only datasets of one differential privacy grant",
                &first.1,
            ));
        }
        first
    };
    let plan = joins_from_where(plan)?;
    let releases = AtomicU64::new(0);
    let fail = |e: EngineError| DataFusionError::External(Box::new(e));
    let rewritten = plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::Aggregate(agg) = &node else {
            return Ok(Transformed::no(node));
        };
        if !reads_granted(&agg.input, grants) {
            return Ok(Transformed::no(node));
        }
        let released = release(state, agg, grants, &grant, &rule).map_err(fail)?;
        releases.fetch_add(1, Ordering::Relaxed);
        Ok(Transformed::yes(released))
    });
    // Nodes above a release keep the schema they were built with: derive each again, so the
    // noisy columns' metadata (and an average's nullability) reaches the result.
    let rewritten = rewritten.and_then(|t| {
        t.data
            .transform_up_with_subqueries(|n| n.recompute_schema().map(Transformed::yes))
    });
    let plan = match rewritten {
        Ok(t) => t.data,
        Err(DataFusionError::External(e)) => {
            return Err(match e.downcast::<EngineError>() {
                Ok(engine) => *engine,
                Err(other) => EngineError::Internal(other.to_string()),
            })
        }
        Err(e) => return Err(e.into()),
    };
    // Every scan of a granted dataset must now sit under a noisy release.
    if reads_granted(&plan, grants) {
        return Err(refuse(
            "only aggregates may read these datasets; row-level output is refused",
            &rule,
        ));
    }
    let releases = releases.load(Ordering::Relaxed) as u32;
    let grouped_releases = count_grouped_releases(&plan);
    Ok((
        plan,
        PrivateCharge {
            epsilon: grant.epsilon_per_query * f64::from(releases),
            delta: grant.delta_per_query * f64::from(grouped_releases),
            grant,
            rule,
            releases,
        },
    ))
}

fn is_granted_scan(
    node: &LogicalPlan,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
) -> bool {
    matches!(node, LogicalPlan::TableScan(s) if governed_dataset(s).is_some_and(|d| grants.contains_key(&d)))
}

/// Whether a granted dataset is read below `plan` (subqueries included), other than through a
/// release: an aggregate over noisy releases is post-processing.
fn reads_granted(
    plan: &LogicalPlan,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|n| {
        if NoisyRelease::of(n).is_some() {
            return Ok(TreeNodeRecursion::Jump);
        }
        found |= is_granted_scan(n, grants);
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

fn count_grouped_releases(plan: &LogicalPlan) -> u32 {
    let mut n = 0;
    let _ = plan.apply_with_subqueries(|node| {
        if let Some(r) = NoisyRelease::of(node) {
            n += u32::from(r.spec.grouped());
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    n
}

/// Checks that the rows reaching the aggregate can be bounded per unit: only per-row steps
/// (projections, filters, aliases) and inner joins on the unit, over granted scans; no
/// subquery (a condition on other units' rows would let them change this unit's share).
fn check_input(
    plan: &LogicalPlan,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
    unit: &str,
    rule: &str,
) -> Result<()> {
    let mut subquery = false;
    plan.apply_subqueries(|_| {
        subquery = true;
        Ok(TreeNodeRecursion::Stop)
    })?;
    if subquery {
        return Err(refuse(
            "subqueries below a private aggregate are refused (they let other patients' rows decide which rows count)",
            rule,
        ));
    }
    match plan {
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {}
        LogicalPlan::TableScan(_) if is_granted_scan(plan, grants) => {}
        LogicalPlan::TableScan(_) => {
            return Err(refuse(
                "a private aggregate may read only datasets under its grant",
                rule,
            ))
        }
        LogicalPlan::Join(j) => {
            if j.join_type != datafusion::common::JoinType::Inner {
                return Err(refuse(
                    "only inner joins are allowed below a private aggregate",
                    rule,
                ));
            }
            let mut pairs: Vec<(&Expr, &Expr)> = j.on.iter().map(|(l, r)| (l, r)).collect();
            if let Some(f) = &j.filter {
                for c in datafusion::logical_expr::utils::split_conjunction(f) {
                    if let Expr::BinaryExpr(b) = c {
                        if b.op == datafusion::logical_expr::Operator::Eq {
                            pairs.push((b.left.as_ref(), b.right.as_ref()));
                        }
                    }
                }
            }
            let side_unit = |side: &LogicalPlan, e: &Expr| match e {
                Expr::Column(c) => side
                    .schema()
                    .maybe_index_of_column(c)
                    .is_some_and(|i| is_unit_column(side, i, grants, unit)),
                _ => false,
            };
            let on_unit = pairs.iter().any(|(l, r)| {
                (side_unit(&j.left, l) && side_unit(&j.right, r))
                    || (side_unit(&j.left, r) && side_unit(&j.right, l))
            });
            if !on_unit {
                return Err(refuse(
                    format!("datasets may be joined only on the privacy unit {unit}"),
                    rule,
                ));
            }
        }
        other => {
            return Err(refuse(
                format!(
                    "{} below a private aggregate is refused; write one aggregate over the rows, with WHERE and joins on {unit}",
                    plan_kind(other)
                ),
                rule,
            ))
        }
    }
    for input in plan.inputs() {
        check_input(input, grants, unit, rule)?;
    }
    Ok(())
}

fn plan_kind(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Aggregate(_) => "an aggregate".into(),
        LogicalPlan::Window(_) => "a window function".into(),
        LogicalPlan::Limit(_) => "LIMIT or OFFSET".into(),
        LogicalPlan::Distinct(_) => "DISTINCT".into(),
        LogicalPlan::Union(_) => "UNION".into(),
        LogicalPlan::Sort(_) => "ORDER BY".into(),
        other => format!(
            "{} node",
            other.display().to_string().split(':').next().unwrap_or("a")
        ),
    }
}

/// Whether output column `i` of `plan` is the privacy unit of a granted scan, unchanged.
fn is_unit_column(
    plan: &LogicalPlan,
    i: usize,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
    unit: &str,
) -> bool {
    let source = |node: &LogicalPlan, i: usize| match node {
        LogicalPlan::TableScan(scan) => {
            is_granted_scan(node, grants)
                && i < scan.projected_schema.fields().len()
                && scan.projected_schema.field(i).name() == unit
        }
        _ => false,
    };
    traces_to(
        plan,
        i,
        Trace {
            casts: false,
            optional: false,
        },
        &source,
    )
}

/// The granted column that output column `i` of `plan` carries (cast at most), if any.
fn source_column(
    plan: &LogicalPlan,
    i: usize,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
) -> Option<String> {
    let found = RefCell::new(None);
    let source = |node: &LogicalPlan, i: usize| match node {
        LogicalPlan::TableScan(scan)
            if is_granted_scan(node, grants) && i < scan.projected_schema.fields().len() =>
        {
            *found.borrow_mut() = Some(scan.projected_schema.field(i).name().clone());
            true
        }
        _ => false,
    };
    let traced = traces_to(
        plan,
        i,
        Trace {
            casts: true,
            optional: false,
        },
        &source,
    );
    if traced {
        found.into_inner()
    } else {
        None
    }
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        Expr::Alias(a) => strip_casts(&a.expr),
        other => other,
    }
}

/// Clamping bounds, (lower, upper).
type Bounds = (f64, f64);

/// A measure's per-row value: its name, expression, and bounds if it is a clamped sum.
type RowValue = (String, Expr, Option<Bounds>);

/// Builds the bounded, noisy release of one aggregate.
fn release(
    state: &datafusion::execution::SessionState,
    agg: &Aggregate,
    grants: &HashMap<String, (DifferentialPrivacy, String)>,
    grant: &DifferentialPrivacy,
    rule: &str,
) -> Result<LogicalPlan> {
    let unit = grant.unit.as_str();
    check_input(&agg.input, grants, unit, rule)?;
    // An error is an answer that no noise covers: `WHERE 1 / (CASE WHEN <one patient's
    // attributes> THEN 0 ELSE 1 END) = 1` would fail exactly when that patient is in the data.
    // The caller's expressions (filters, join conditions, group keys, aggregate arguments)
    // must be ones that cannot fail, as under an aggregation threshold: checked as they will
    // run, types coerced and constants folded.
    if agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(refuse("GROUPING SETS, ROLLUP and CUBE are refused", rule));
    }
    let optimized = state.optimize(&LogicalPlan::Aggregate(agg.clone()))?;
    if let Some(what) = crate::total::below(&optimized) {
        return Err(refuse(
            format!("{what} could fail on some rows, and whether it fails would tell whether such rows exist; use operations that cannot fail (TRY_CAST, floating-point arithmetic)"),
            rule,
        ));
    }
    if agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(refuse("GROUPING SETS, ROLLUP and CUBE are refused", rule));
    }
    let input = agg.input.schema();
    let unit_column = (0..input.fields().len())
        .find(|i| is_unit_column(&agg.input, *i, grants, unit))
        .map(|i| Expr::Column(Column::from(input.qualified_field(i))))
        .ok_or_else(|| {
            refuse(
                format!("the privacy unit {unit} must reach every private aggregate"),
                rule,
            )
        })?;
    // Per row: the unit, the group keys, each measure's value.
    let mut row_exprs = vec![unit_column.clone().alias("__lg_unit")];
    let group_names: Vec<String> = (0..agg.group_expr.len())
        .map(|i| format!("__lg_g{i}"))
        .collect();
    for (e, name) in agg.group_expr.iter().zip(&group_names) {
        row_exprs.push(e.clone().alias(name));
    }
    let mut measures = Vec::new();
    // Per measure, the names of its per-row values (a sum, then a count for an average).
    let mut values: Vec<Vec<(String, Option<Bounds>)>> = Vec::new();
    for (j, e) in agg.aggr_expr.iter().enumerate() {
        let e = e.clone().unalias_nested().data;
        let Expr::AggregateFunction(AggregateFunction { func, params }) = &e else {
            return Err(refuse(
                format!(
                    "{} is not an aggregate that can be bounded",
                    e.schema_name()
                ),
                rule,
            ));
        };
        let name = func.name().to_ascii_lowercase();
        if params.filter.is_some() {
            return Err(refuse(
                format!("aggregate {name} with FILTER is refused; put conditions in WHERE"),
                rule,
            ));
        }
        let arg_column = |a: &Expr| match strip_casts(a) {
            Expr::Column(c) => input
                .maybe_index_of_column(c)
                .and_then(|i| source_column(&agg.input, i, grants)),
            _ => None,
        };
        let bounds_of = |a: &Expr| -> Result<(f64, f64)> {
            let column = arg_column(a).ok_or_else(|| {
                refuse(
                    format!("aggregate {name} must take a column of the data as it is (clamping bounds are per column)"),
                    rule,
                )
            })?;
            grant.bounds.get(&column).copied().ok_or_else(|| {
                refuse(
                    format!("aggregate {name} of {column}: the grant gives no clamping bounds for {column}"),
                    rule,
                )
            })
        };
        let fixed = |a: &Expr, lo: f64, hi: f64| {
            // NULL adds nothing to a sum; a value counts as its clamped, rounded fixed point.
            let clamped = datafusion::functions::core::expr_fn::least(vec![
                datafusion::functions::core::expr_fn::greatest(vec![
                    datafusion::logical_expr::cast(a.clone(), DataType::Float64),
                    lit(lo),
                ]),
                lit(hi),
            ]);
            let scaled =
                datafusion::functions::math::expr_fn::round(vec![clamped * lit(FIXED_POINT)]);
            datafusion::functions::core::expr_fn::coalesce(vec![
                datafusion::logical_expr::cast(scaled, DataType::Decimal128(38, 0)),
                lit(datafusion::common::ScalarValue::Decimal128(Some(0), 38, 0)),
            ])
        };
        let non_null = |a: &Expr| {
            datafusion::logical_expr::when(a.clone().is_null(), lit(0i64)).otherwise(lit(1i64))
        };
        let v = |k: usize| format!("__lg_m{j}_{k}");
        let (measure, per_row): (Measure, Vec<RowValue>) =
            match (name.as_str(), params.distinct, params.args.as_slice()) {
                ("count", false, []) => (Measure::Rows, vec![(v(0), lit(1i64), None)]),
                ("count", false, [a]) if matches!(a, Expr::Literal(..)) => {
                    (Measure::Rows, vec![(v(0), non_null(a)?, None)])
                }
                ("count", false, [a]) => (Measure::NonNull, vec![(v(0), non_null(a)?, None)]),
                ("count", true, [a])
                    if matches!(strip_casts(a), Expr::Column(c)
                        if input.maybe_index_of_column(c).is_some_and(|i| is_unit_column(&agg.input, i, grants, unit))) =>
                {
                    (Measure::Units, vec![])
                }
                ("count", true, _) => {
                    return Err(refuse(
                        format!("count(DISTINCT ...) is allowed only of the privacy unit {unit}"),
                        rule,
                    ))
                }
                ("sum", false, [a]) => {
                    let (lo, hi) = bounds_of(a)?;
                    (Measure::Sum { lo, hi }, vec![(v(0), fixed(a, lo, hi), Some((lo, hi)))])
                }
                ("avg" | "mean", false, [a]) => {
                    let (lo, hi) = bounds_of(a)?;
                    (
                        Measure::Avg { lo, hi },
                        vec![(v(0), fixed(a, lo, hi), Some((lo, hi))), (v(1), non_null(a)?, None)],
                    )
                }
                _ => {
                    return Err(refuse(
                        format!("aggregate {name} is refused; allowed: count(*), count(column), count(DISTINCT {unit}), sum and avg of bounded columns"),
                        rule,
                    ))
                }
            };
        measures.push(measure);
        let mut names = Vec::new();
        for (n, e, b) in per_row {
            row_exprs.push(e.alias(&n));
            if b.is_some() {
                // How many values the sum holds, to bound it to L values' worth.
                let a = match &params.args[..] {
                    [a] => a.clone(),
                    _ => lit(1i64),
                };
                row_exprs.push(non_null(&a)?.alias(format!("{n}_n")));
            }
            names.push((n, b));
        }
        values.push(names);
    }
    let l = i64::from(grant.max_rows_per_group);
    let grouped = !agg.group_expr.is_empty();
    let keys: Vec<Expr> = std::iter::once(col("__lg_unit"))
        .chain(group_names.iter().map(|n| col(n.as_str())))
        .collect();
    // Per unit and group: each value summed, then bounded to L rows' worth.
    let sum = |n: &str| datafusion::functions_aggregate::expr_fn::sum(col(n)).alias(n);
    let mut per_unit_aggs = Vec::new();
    for (n, b) in values.iter().flatten() {
        per_unit_aggs.push(sum(n));
        if b.is_some() {
            per_unit_aggs.push(sum(&format!("{n}_n")));
        }
    }
    let mut bounded = keys.clone();
    for (n, b) in values.iter().flatten() {
        let e = match b {
            None => datafusion::functions::core::expr_fn::least(vec![col(n.as_str()), lit(l)]),
            Some((lo, hi)) => {
                let dec = |x: f64| {
                    let v = (x * FIXED_POINT).round() as i128 * i128::from(l);
                    lit(datafusion::common::ScalarValue::Decimal128(Some(v), 38, 0))
                };
                // More than L values: L times their mean, what L of them drawn at random
                // would give on average. Either way at most L times the largest bound.
                let count = col(format!("{n}_n"));
                let float = |e: Expr| datafusion::logical_expr::cast(e, DataType::Float64);
                let mean_of_l = datafusion::functions::math::expr_fn::round(vec![
                    float(col(n.as_str())) * lit(l as f64) / float(count.clone()),
                ]);
                let scaled = datafusion::logical_expr::when(
                    count.gt(lit(l)),
                    datafusion::logical_expr::cast(mean_of_l, DataType::Decimal128(38, 0)),
                )
                .otherwise(datafusion::logical_expr::cast(
                    col(n.as_str()),
                    DataType::Decimal128(38, 0),
                ))?;
                datafusion::functions::core::expr_fn::least(vec![
                    datafusion::functions::core::expr_fn::greatest(vec![scaled, dec(*lo)]),
                    dec(*hi),
                ])
            }
        };
        bounded.push(e.alias(n));
    }
    let mut builder = LogicalPlanBuilder::from(agg.input.as_ref().clone())
        .project(row_exprs)?
        .aggregate(keys, per_unit_aggs)?
        .project(bounded)?;
    if grouped {
        // At most G groups per unit, chosen at random among its groups.
        let rank = datafusion::functions_window::expr_fn::row_number()
            .partition_by(vec![col("__lg_unit")])
            .order_by(vec![
                datafusion::functions::math::expr_fn::random().sort(true, true)
            ])
            .build()?
            .alias("__lg_rank");
        builder = builder
            .window(vec![rank])?
            .filter(col("__lg_rank").lt_eq(lit(i64::from(grant.max_groups_per_unit))))?;
    }
    let mut totals =
        vec![datafusion::functions_aggregate::expr_fn::count(lit(1i64)).alias("__lg_units")];
    for (n, b) in values.iter().flatten() {
        let total = datafusion::functions_aggregate::expr_fn::sum(col(n.as_str()));
        let total = match b {
            None => datafusion::logical_expr::cast(total, DataType::Int64),
            Some(_) => datafusion::logical_expr::cast(total, DataType::Decimal128(38, 0)),
        };
        totals.push(total.alias(n));
    }
    let exact = builder
        .aggregate(group_names.iter().map(|n| col(n.as_str())), totals)?
        .build()?;
    let spec = ReleaseSpec {
        groups: agg.group_expr.len(),
        measures,
        epsilon: grant.epsilon_per_query,
        delta: grant.delta_per_query,
        max_groups: grant.max_groups_per_unit,
        max_rows: grant.max_rows_per_group,
        rule: rule.to_string(),
    };
    if grouped && spec.delta <= 0.0 {
        return Err(refuse(
            "GROUP BY needs a delta for partition selection and the grant gives none",
            rule,
        ));
    }
    let schema = noisy_schema(&agg.schema, &spec)?;
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(NoisyRelease {
            input: exact,
            spec: Arc::new(spec),
            schema,
            id: NEXT_RELEASE.fetch_add(1, Ordering::Relaxed),
        }),
    }))
}

/// The most one value adds to a sum, in fixed point.
fn fixed_bound(lo: f64, hi: f64) -> i128 {
    (lo.abs().max(hi.abs()) * FIXED_POINT).round() as i128
}

static NEXT_RELEASE: AtomicU64 = AtomicU64::new(0);

/// The aggregate's own schema, each noisy column marked with its mechanism and epsilon.
fn noisy_schema(aggregate: &DFSchemaRef, spec: &ReleaseSpec) -> Result<DFSchemaRef> {
    let each = spec.epsilon_each();
    let mut fields = Vec::new();
    for (i, (qualifier, field)) in aggregate.iter().enumerate() {
        let field = if i < spec.groups {
            field.as_ref().clone()
        } else {
            let m = &spec.measures[i - spec.groups];
            let epsilon = each * m.statistics(spec.grouped()).max(1) as f64;
            let metadata = HashMap::from([
                (NOISY.to_string(), "true".to_string()),
                (NOISY_EPSILON.to_string(), format!("{epsilon}")),
                (NOISY_MECHANISM.to_string(), "discrete_laplace".to_string()),
            ]);
            let mut f = field.as_ref().clone().with_metadata(metadata);
            if matches!(m, Measure::Avg { .. }) {
                f = f.with_nullable(true);
            }
            f
        };
        fields.push((qualifier.cloned(), Arc::new(field)));
    }
    let mut metadata = aggregate.metadata().clone();
    metadata.insert(
        "lakegate.dp.epsilon_spent".into(),
        format!("{}", spec.epsilon),
    );
    metadata.insert(
        "lakegate.dp.delta_spent".into(),
        format!("{}", if spec.grouped() { spec.delta } else { 0.0 }),
    );
    Ok(Arc::new(DFSchema::new_with_metadata(fields, metadata)?))
}

/// The noisy release of one aggregate: its input is the exact, bounded per-group statistics.
#[derive(Debug, Clone)]
pub(crate) struct NoisyRelease {
    input: LogicalPlan,
    spec: Arc<ReleaseSpec>,
    schema: DFSchemaRef,
    /// Each release is its own node: two are never merged as equal.
    id: u64,
}

impl NoisyRelease {
    fn of(plan: &LogicalPlan) -> Option<&NoisyRelease> {
        match plan {
            LogicalPlan::Extension(e) => e.node.as_any().downcast_ref(),
            _ => None,
        }
    }
}

impl PartialEq for NoisyRelease {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.input == other.input
    }
}
impl Eq for NoisyRelease {}
impl std::hash::Hash for NoisyRelease {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}
impl PartialOrd for NoisyRelease {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.id.partial_cmp(&other.id)
    }
}

impl UserDefinedLogicalNodeCore for NoisyRelease {
    fn name(&self) -> &str {
        "NoisyRelease"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "NoisyRelease: epsilon={} groups={}",
            self.spec.epsilon, self.spec.groups
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> datafusion::common::Result<Self> {
        Ok(Self {
            input: inputs.swap_remove(0),
            spec: Arc::clone(&self.spec),
            schema: Arc::clone(&self.schema),
            id: self.id,
        })
    }

    fn supports_limit_pushdown(&self) -> bool {
        false
    }
}

/// Plans [`NoisyRelease`] as [`NoisyReleaseExec`].
#[derive(Debug)]
pub(crate) struct NoisyReleasePlanner;

#[async_trait::async_trait]
impl ExtensionPlanner for NoisyReleasePlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session_state: &dyn PlanningSession,
        _planning_ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> datafusion::common::Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(release) = node.as_any().downcast_ref::<NoisyRelease>() else {
            return Ok(None);
        };
        let [input] = physical_inputs else {
            return datafusion::common::internal_err!("NoisyRelease takes one input");
        };
        Ok(Some(Arc::new(NoisyReleaseExec::new(
            Arc::clone(input),
            Arc::clone(&release.spec),
            Arc::new(release.schema.as_arrow().clone()),
        ))))
    }
}

/// The query planner of every session: DataFusion's, with [`NoisyRelease`] planned.
#[derive(Debug)]
pub(crate) struct LakegateQueryPlanner;

#[async_trait::async_trait]
impl datafusion::execution::context::QueryPlanner for LakegateQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn PlanningSession,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        datafusion::physical_planner::DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(NoisyReleasePlanner),
        ])
        .create_physical_plan(logical_plan, session_state)
        .await
    }
}

/// Reads the exact bounded statistics of every group, then releases noisy ones.
#[derive(Debug)]
pub(crate) struct NoisyReleaseExec {
    input: Arc<dyn ExecutionPlan>,
    spec: Arc<ReleaseSpec>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl NoisyReleaseExec {
    fn new(input: Arc<dyn ExecutionPlan>, spec: Arc<ReleaseSpec>, schema: SchemaRef) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            input,
            spec,
            schema,
            properties,
        }
    }
}

impl DisplayAs for NoisyReleaseExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "NoisyReleaseExec: epsilon={} groups={}",
            self.spec.epsilon, self.spec.groups
        )
    }
}

impl ExecutionPlan for NoisyReleaseExec {
    fn name(&self) -> &str {
        "NoisyReleaseExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return datafusion::common::internal_err!("NoisyReleaseExec takes one child");
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            Arc::clone(&self.spec),
            Arc::clone(&self.schema),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        use futures::TryStreamExt;
        if partition != 0 {
            return datafusion::common::internal_err!("NoisyReleaseExec has one partition");
        }
        let input = self.input.execute(0, context)?;
        let spec = Arc::clone(&self.spec);
        let schema = Arc::clone(&self.schema);
        let out = Arc::clone(&schema);
        let run = async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            let exact = arrow::compute::concat_batches(&batches_schema(&batches), &batches)?;
            let released =
                noisy(&exact, &spec, &out).map_err(|e| DataFusionError::External(Box::new(e)))?;
            Ok(released)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(run),
        )))
    }
}

fn batches_schema(batches: &[RecordBatch]) -> SchemaRef {
    batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()))
}

/// Noise and partition selection over the exact bounded statistics `exact`: its columns are the
/// group keys, the units per group, then each measure's values.
fn noisy(exact: &RecordBatch, spec: &ReleaseSpec, schema: &SchemaRef) -> Result<RecordBatch> {
    let arrow = |e: arrow::error::ArrowError| EngineError::from(DataFusionError::from(e));
    use crate::private::noise::{laplace_vector, select_partitions};
    let rows = exact.num_rows();
    let each = spec.epsilon_each();
    let column_i64 = |i: usize| -> Result<Vec<i64>> {
        let a = exact.column(i);
        let a = arrow::compute::cast(a, &DataType::Int64).map_err(arrow)?;
        let a = a
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64");
        Ok((0..a.len())
            .map(|r| if a.is_null(r) { 0 } else { a.value(r) })
            .collect())
    };
    let column_i128 = |i: usize| -> Result<Vec<i128>> {
        let a = exact.column(i);
        let a = arrow::compute::cast(a, &DataType::Decimal128(38, 0)).map_err(arrow)?;
        let a = a
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .expect("cast to Decimal128");
        Ok((0..a.len())
            .map(|r| if a.is_null(r) { 0 } else { a.value(r) })
            .collect())
    };
    let units_at = spec.groups;
    let units = column_i64(units_at)?;
    // Which groups leave, with their noisy count of units.
    let (kept, noisy_units): (Vec<usize>, Vec<i64>) = if spec.grouped() {
        select_partitions(&units, each, spec.max_groups, spec.delta)?
            .into_iter()
            .unzip()
    } else {
        let noisy = if spec.measures.contains(&Measure::Units) {
            laplace_vector(&units, 1, each)?
        } else {
            units.clone()
        };
        ((0..rows).collect(), noisy)
    };
    let take = UInt32Array::from(kept.iter().map(|&i| i as u32).collect::<Vec<_>>());
    let mut columns: Vec<ArrayRef> = Vec::new();
    for i in 0..spec.groups {
        columns.push(arrow::compute::take(exact.column(i), &take, None).map_err(arrow)?);
    }
    let mut at = units_at + 1;
    let pick_i64 = |v: Vec<i64>| kept.iter().map(|&i| v[i]).collect::<Vec<i64>>();
    let pick_i128 = |v: Vec<i128>| kept.iter().map(|&i| v[i]).collect::<Vec<i128>>();
    for m in &spec.measures {
        let values: ArrayRef = match m {
            Measure::Units => Arc::new(Int64Array::from(
                noisy_units.iter().map(|&n| n.max(0)).collect::<Vec<_>>(),
            )),
            Measure::Rows | Measure::NonNull => {
                let exact = pick_i64(column_i64(at)?);
                at += 1;
                let noisy = laplace_vector(&exact, spec.sensitivity(1), each)?;
                Arc::new(Int64Array::from(
                    noisy.into_iter().map(|n| n.max(0)).collect::<Vec<_>>(),
                ))
            }
            Measure::Sum { lo, hi } => {
                let exact = pick_i128(column_i128(at)?);
                at += 1;
                let noisy = laplace_vector(&exact, spec.sensitivity(fixed_bound(*lo, *hi)), each)?;
                Arc::new(Float64Array::from(
                    noisy
                        .into_iter()
                        .map(|n| n as f64 / FIXED_POINT)
                        .collect::<Vec<_>>(),
                ))
            }
            Measure::Avg { lo, hi } => {
                let sums = pick_i128(column_i128(at)?);
                let counts = pick_i64(column_i64(at + 1)?);
                at += 2;
                let sums = laplace_vector(&sums, spec.sensitivity(fixed_bound(*lo, *hi)), each)?;
                let counts = laplace_vector(&counts, spec.sensitivity(1), each)?;
                Arc::new(Float64Array::from(
                    sums.into_iter()
                        .zip(counts)
                        .map(|(s, c)| {
                            (c > 0).then(|| (s as f64 / FIXED_POINT / c as f64).clamp(*lo, *hi))
                        })
                        .collect::<Vec<_>>(),
                ))
            }
        };
        let field = schema.field(columns.len());
        columns.push(arrow::compute::cast(&values, field.data_type()).map_err(arrow)?);
    }
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(arrow)
}

/// Samplers: OpenDP's exact discrete Laplace, on OpenDP's measurements (their privacy maps
/// double-check the epsilon each statistic is charged).
pub(crate) mod noise {
    use std::collections::HashMap;

    use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
    use opendp::measurements::{make_laplace, make_laplace_threshold};
    use opendp::measures::{Approximate, MaxDivergence};
    use opendp::metrics::{AbsoluteDistance, L0PInfDistance, L1Distance};

    use crate::{EngineError, Result};

    fn opendp(e: opendp::error::Error) -> EngineError {
        EngineError::Internal(format!("differential privacy mechanism: {e}"))
    }

    /// Adds discrete Laplace noise to each value, calibrated to an L1 `sensitivity` and
    /// `epsilon`. OpenDP's privacy map must agree that the release costs at most `epsilon`.
    pub(crate) fn laplace_vector<T>(values: &[T], sensitivity: i128, epsilon: f64) -> Result<Vec<T>>
    where
        T: TryFrom<i128> + Clone + opendp::traits::CheckAtom + 'static,
        VectorDomain<AtomDomain<T>>: opendp::core::Domain<Carrier = Vec<T>>,
        (VectorDomain<AtomDomain<T>>, L1Distance<T>): opendp::core::MetricSpace,
        opendp::measurements::DiscreteLaplace: opendp::measurements::MakeNoise<
            VectorDomain<AtomDomain<T>>,
            L1Distance<T>,
            MaxDivergence,
        >,
        AtomDomain<T>: Default,
        L1Distance<T>: Default + opendp::core::Metric<Distance = T>,
    {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let scale = sensitivity as f64 / epsilon;
        let m = make_laplace::<_, _, MaxDivergence>(
            VectorDomain::new(AtomDomain::<T>::default()),
            L1Distance::<T>::default(),
            scale,
            None,
        )
        .map_err(opendp)?;
        let d_in = T::try_from(sensitivity)
            .map_err(|_| EngineError::Internal("sensitivity out of range".into()))?;
        let spent = m.map(&d_in).map_err(opendp)?;
        if spent > epsilon * (1.0 + 1e-9) {
            return Err(EngineError::Internal(format!(
                "a noisy statistic would cost epsilon {spent}, more than its share {epsilon}"
            )));
        }
        m.invoke(&values.to_vec()).map_err(opendp)
    }

    /// Partition selection: the rows whose noisy count of units (discrete Laplace, `epsilon`
    /// for units that each reach at most `max_groups` groups) reaches the smallest threshold
    /// that keeps delta within `delta`. Returns (row, noisy count) of the released rows.
    pub(crate) fn select_partitions(
        units: &[i64],
        epsilon: f64,
        max_groups: u32,
        delta: f64,
    ) -> Result<Vec<(usize, i64)>> {
        let scale = f64::from(max_groups) / epsilon;
        let threshold = threshold_for(scale, max_groups, delta)?;
        let m = make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
            MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default()),
            L0PInfDistance::<1, _>(AbsoluteDistance::<i64>::default()),
            scale,
            threshold,
            None,
        )
        .map_err(opendp)?;
        let (spent, _) = m
            .map(&(max_groups, i64::from(max_groups), 1))
            .map_err(opendp)?;
        if spent > epsilon * (1.0 + 1e-9) {
            return Err(EngineError::Internal(format!(
                "partition selection would cost epsilon {spent}, more than its share {epsilon}"
            )));
        }
        let counts: HashMap<u64, i64> = units
            .iter()
            .enumerate()
            .map(|(i, &n)| (i as u64, n))
            .collect();
        let mut released: Vec<(usize, i64)> = m
            .invoke(&counts)
            .map_err(opendp)?
            .into_iter()
            .map(|(i, n)| (i as usize, n))
            .collect();
        released.sort_unstable();
        Ok(released)
    }

    /// The smallest threshold at which a unit in `max_groups` groups (one each) changes the
    /// released keys with probability at most `delta`, by OpenDP's own privacy map.
    pub(crate) fn threshold_for(scale: f64, max_groups: u32, delta: f64) -> Result<i64> {
        let g = i64::from(max_groups);
        let delta_at = |t: i64| -> Result<f64> {
            let m = make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
                MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default()),
                L0PInfDistance::<1, _>(AbsoluteDistance::<i64>::default()),
                scale,
                t,
                None,
            )
            .map_err(opendp)?;
            Ok(m.map(&(max_groups, g, 1)).map_err(opendp)?.1)
        };
        let (mut lo, mut hi) = (1i64, 2i64);
        while delta_at(hi)? > delta {
            lo = hi;
            hi = hi.checked_mul(2).ok_or_else(|| {
                EngineError::Internal("no partition selection threshold meets delta".into())
            })?;
        }
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if delta_at(mid)? > delta {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(hi)
    }
}

#[cfg(test)]
mod tests {
    use super::noise::{laplace_vector, select_partitions, threshold_for};
    use super::*;

    fn spec(groups: usize, measures: Vec<Measure>) -> ReleaseSpec {
        ReleaseSpec {
            groups,
            measures,
            epsilon: 1.0,
            delta: 1e-7,
            max_groups: 4,
            max_rows: 5,
            rule: "r".into(),
        }
    }

    #[test]
    fn each_aggregate_has_its_sensitivity_and_share_of_epsilon() {
        // Without GROUP BY a patient is in one group: L rows, L clamped values.
        let s = spec(
            0,
            vec![
                Measure::Rows,
                Measure::Sum {
                    lo: -10.0,
                    hi: 50.0,
                },
                Measure::Avg { lo: 0.0, hi: 500.0 },
                Measure::Units,
            ],
        );
        assert_eq!(s.statistics(), 5);
        assert_eq!(s.epsilon_each(), 0.2);
        assert_eq!(s.sensitivity(1), 5);
        // Sums are in thousandths: the largest magnitude of the bounds, L times.
        assert_eq!(fixed_bound(-10.0, 50.0), 50_000);
        assert_eq!(fixed_bound(-80.0, 50.0), 80_000);
        assert_eq!(s.sensitivity(fixed_bound(-10.0, 50.0)), 250_000);
        // With GROUP BY, in up to G groups; the count of patients is partition selection's.
        let g = spec(2, vec![Measure::Rows, Measure::Units, Measure::NonNull]);
        assert_eq!(g.statistics(), 3);
        assert_eq!(g.sensitivity(1), 20);
        assert!((g.epsilon_each() - 1.0 / 3.0).abs() < 1e-12);
    }

    /// Discrete Laplace of scale b: P(X = k) = (1 - p) / (1 + p) p^|k| with p = e^(-1/b).
    /// Each check compares an empirical frequency of n draws with its exact probability; by
    /// Hoeffding's inequality one is off by more than t with probability at most
    /// 2 exp(-2 n t^2) = 2.8e-13 (n = 40,000, t = 0.03), so the test fails by chance with
    /// probability below 2e-12.
    #[test]
    fn the_noise_has_the_discrete_laplace_distribution() {
        let n = 40_000;
        let b = 4.0f64;
        let draws = laplace_vector(&vec![0i64; n], 4, 1.0).expect("noise");
        let p = (-1.0 / b).exp();
        let within = |m: i64| 1.0 - 2.0 * p.powi(m as i32 + 1) / (1.0 + p);
        type Check = (&'static str, f64, Box<dyn Fn(i64) -> bool>);
        let checks: Vec<Check> = vec![
            ("X = 0", (1.0 - p) / (1.0 + p), Box::new(|x| x == 0)),
            ("|X| <= 4", within(4), Box::new(|x: i64| x.abs() <= 4)),
            ("|X| <= 12", within(12), Box::new(|x: i64| x.abs() <= 12)),
            ("X > 0", p / (1.0 + p), Box::new(|x| x > 0)),
            ("X < 0", p / (1.0 + p), Box::new(|x| x < 0)),
        ];
        for (what, exact, hit) in checks {
            let seen = draws.iter().filter(|x| hit(**x)).count() as f64 / n as f64;
            assert!((seen - exact).abs() < 0.03, "{what}: {seen} vs {exact}");
        }
        // Integer noise on integer values: 128-bit sums too.
        let big = laplace_vector(&[i128::MAX / 4], 1, 1.0).expect("i128");
        assert!((big[0] - i128::MAX / 4).abs() < 1_000);
    }

    #[test]
    fn partition_selection_releases_large_groups_and_hides_single_patients() {
        let scale = 8.0;
        let t = threshold_for(scale, 4, 1e-7).expect("threshold");
        // Below the threshold a group of one patient would leave more often than delta allows.
        assert!(threshold_for(scale, 4, 1e-3).expect("threshold") < t);
        assert!((100..200).contains(&t), "{t}");
        // 20 single-patient groups: each leaves with probability below delta / G (so any of
        // them, below 1e-6), and one of 100,000 with probability 1 - e^-12,000.
        let mut units = vec![1i64; 20];
        units.push(100_000);
        let released = select_partitions(&units, 0.5, 4, 1e-7).expect("selection");
        assert_eq!(
            released.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![20]
        );
        assert!((released[0].1 - 100_000).abs() < 1_000);
    }
}
