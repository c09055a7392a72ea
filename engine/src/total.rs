//! Expressions that run on rows under an aggregation threshold must not be able to fail.
//!
//! A caller under a threshold sees no row, only groups of at least k patients. But an error is
//! an answer too: `WHERE 1 / (CASE WHEN birth_date = ... AND code = 'B20' THEN 0 ELSE 1 END) = 1`
//! fails with division by zero exactly when that one patient has that diagnosis, whatever the
//! threshold suppresses. So every expression the optimized plan evaluates below a threshold's
//! check (filters, including those pushed into scans, group keys, join conditions, projections,
//! aggregate arguments) must be built from operations that cannot fail on any value: columns,
//! literals, comparisons, boolean logic, `CASE`, `IN`, `LIKE` with a literal pattern (no regular
//! expressions: one that does not compile fails on the first row it meets), `TRY_CAST`,
//! casts that always succeed, floating-point arithmetic and a list of total functions. Anything
//! else is refused before the query runs, naming what could fail. Above the check (on released
//! groups) anything goes: `order_released_groups` keeps a merged HAVING above it too.
//!
//! A total operation can still fail for its fixed arguments (`date_part('foo', t)`,
//! `substr(x, -9223372036854775808, 1)`, a `LIKE` pattern too large to compile), and then fails
//! exactly when a row reaches it. So each operation that passed is also run once, before the
//! query, on a few made-up rows of its operands' types ([`probe`]): one that fails there is
//! refused as the others are, whatever the lake holds. What fails anyway while the query runs is
//! answered as an empty result (`crate::session`), never as an error.

use crate::error::EngineError;
use crate::released::ThresholdCheck;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};

/// Functions that return a value for every input (given total arguments), by name.
const TOTAL_FUNCTIONS: &[&str] = &[
    "lower",
    "upper",
    "btrim",
    "trim",
    "ltrim",
    "rtrim",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "concat",
    "concat_ws",
    "starts_with",
    "ends_with",
    "strpos",
    "instr",
    "translate",
    "reverse",
    "initcap",
    "left",
    "right",
    "md5",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "levenshtein",
    "coalesce",
    "nullif",
    "nvl",
    "ifnull",
    "nvl2",
    "isnan",
    "iszero",
    "now",
    "current_date",
    "current_time",
];

/// Numeric functions that are total when they compute in floating point (integer `abs` of the
/// smallest value overflows; float functions give NaN or infinity instead of failing).
const FLOAT_FUNCTIONS: &[&str] = &[
    "abs", "round", "floor", "ceil", "trunc", "sqrt", "cbrt", "exp", "ln", "log", "log2", "log10",
    "power", "pow", "signum", "degrees", "radians", "sin", "cos", "tan", "pi",
];

/// Refuses the plan if an expression below an aggregation threshold's check could fail on
/// some rows. Run on the optimized logical plan: that is where the caller's predicates have
/// been moved to (into scans, below aggregates) and where casts are explicit.
pub(crate) fn check(plan: &LogicalPlan) -> Result<(), EngineError> {
    let mut found: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::Filter(f) = node {
            if is_threshold(&f.predicate) {
                found = below(&f.input);
                if found.is_some() {
                    return Ok(TreeNodeRecursion::Stop);
                }
                return Ok(TreeNodeRecursion::Jump);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    match found {
        None => Ok(()),
        Some(what) => Err(EngineError::PermissionDenied(format!(
            "{what} could fail on some rows of data under an aggregation threshold, and whether it \
             fails would tell whether such rows exist; use operations that cannot fail (TRY_CAST, \
             floating-point arithmetic) (rule: threshold-total-expressions)"
        ))),
    }
}

/// Whether `e` holds a threshold's check with k > 0.
fn is_threshold(e: &Expr) -> bool {
    let mut yes = false;
    let _ = e.apply(|e| {
        if let Expr::ScalarFunction(f) = e {
            yes |= f
                .func
                .inner()
                .downcast_ref::<ThresholdCheck>()
                .is_some_and(|t| t.k() > 0);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    yes
}

/// The first expression under `plan` that could fail, described.
pub(crate) fn below(plan: &LogicalPlan) -> Option<String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        let schema = match node {
            LogicalPlan::TableScan(scan) => {
                DFSchema::try_from_qualified_schema(scan.table_name.clone(), &scan.source.schema())
                    .ok()
            }
            LogicalPlan::Join(j) => Some(j.schema.as_ref().clone()),
            other => other
                .inputs()
                .iter()
                .try_fold(DFSchema::empty(), |mut acc, i| {
                    acc.merge(i.schema());
                    Some(acc)
                }),
        };
        let Some(schema) = schema else {
            found = Some("an expression of unknown type".to_string());
            return Ok(TreeNodeRecursion::Stop);
        };
        let exprs = match node {
            LogicalPlan::TableScan(scan) => scan.filters.clone(),
            other => other.expressions(),
        };
        for e in &exprs {
            if let Some(what) = failing(e, &schema).or_else(|| probe(e, &schema)) {
                found = Some(what);
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Rows a probe evaluates an expression on: a NULL and ordinary values of each type.
const PROBE_ROWS: usize = 5;

/// Runs each operation of `e` once on [`PROBE_ROWS`] made-up rows, and describes the first that
/// fails: it fails for its fixed arguments, on whatever row reaches it. Each operation runs on
/// its own, its literal operands as written and every other operand standing in as a column of
/// its type, since in place it may meet no made-up row at all (a `CASE` branch whose condition
/// none meets, the right side of an `AND`); so the probes grow with the expression's size, not
/// its square. Operations that cannot run on their own (aggregates, subqueries, window
/// functions, placeholders, outer references, Lakegate's own functions, which carry keys or
/// read subject sets) are not run; their operands are operations of `e` too.
fn probe(e: &Expr, schema: &DFSchema) -> Option<String> {
    let mut failed = None;
    let _ = e.apply(|x| {
        if matches!(x, Expr::Column(_) | Expr::Literal(..) | Expr::Alias(_)) || opaque(x) {
            return Ok(TreeNodeRecursion::Continue);
        }
        let Some((runnable, fields)) = with_stand_ins(x, schema) else {
            return Ok(TreeNodeRecursion::Continue);
        };
        match run_on_probe_rows(&runnable, fields) {
            Ok(()) => Ok(TreeNodeRecursion::Continue),
            Err(why) => {
                tracing::debug!(%why, "a probe of an expression under a threshold failed");
                failed = Some(format!(
                    "the expression {} (it fails for its fixed arguments)",
                    describe(x)
                ));
                Ok(TreeNodeRecursion::Stop)
            }
        }
    });
    failed
}

/// Whether `x` cannot be run on made-up rows by itself.
fn opaque(x: &Expr) -> bool {
    match x {
        Expr::ScalarFunction(f) => f.func.name().starts_with("lg_"),
        Expr::AggregateFunction(_)
        | Expr::WindowFunction(_)
        | Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::ScalarSubquery(_)
        | Expr::OuterReferenceColumn(..)
        | Expr::Placeholder(_)
        | Expr::GroupingSet(_) => true,
        _ => false,
    }
}

/// `x` with each operand that is not a literal replaced by a column `probe_N` of its type, and
/// those columns; `None` where a type is unknown (nothing to probe then).
fn with_stand_ins(
    x: &Expr,
    schema: &DFSchema,
) -> Option<(Expr, Vec<datafusion::arrow::datatypes::Field>)> {
    use datafusion::common::tree_node::Transformed;
    let mut fields: Vec<datafusion::arrow::datatypes::Field> = Vec::new();
    let runnable = x
        .clone()
        .map_children(|c| {
            if matches!(c, Expr::Literal(..)) {
                return Ok(Transformed::no(c));
            }
            let t = c.get_type(schema)?;
            let name = format!("probe_{}", fields.len());
            fields.push(datafusion::arrow::datatypes::Field::new(&name, t, true));
            Ok(Transformed::yes(Expr::Column(
                datafusion::common::Column::from_name(name),
            )))
        })
        .ok()?
        .data;
    Some((runnable, fields))
}

/// What a caller may hear of a refused expression: its function or operator, never more
/// (its literals are the caller's own, but a description stays short).
fn describe(e: &Expr) -> String {
    match e {
        Expr::ScalarFunction(f) => format!("calling {}", f.func.name()),
        Expr::BinaryExpr(b) => format!("with the operator {}", b.op),
        Expr::Like(_) => "with LIKE".to_string(),
        Expr::AggregateFunction(f) => format!("aggregating with {}", f.func.name()),
        other => other.variant_name().to_string(),
    }
}

fn run_on_probe_rows(
    e: &Expr,
    fields: Vec<datafusion::arrow::datatypes::Field>,
) -> datafusion::common::Result<()> {
    use datafusion::arrow::array::RecordBatch;
    use datafusion::arrow::datatypes::Schema;
    let columns = fields
        .iter()
        .map(|f| probe_values(f.data_type()))
        .collect::<Vec<_>>();
    let schema = std::sync::Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new_with_options(
        std::sync::Arc::clone(&schema),
        columns,
        &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(PROBE_ROWS)),
    )?;
    let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
    let physical = datafusion::physical_expr::create_physical_expr(
        e,
        &df_schema,
        &datafusion::logical_expr::execution_props::ExecutionProps::new(),
        &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext::default(),
    )?;
    physical.evaluate(&batch)?.into_array(PROBE_ROWS)?;
    Ok(())
}

/// A NULL and ordinary values of `t` (all NULL where none can be made): an empty string, a
/// word, a date and a non-ASCII text; 0, 1, 2, 7; 0.0, 1.5, -2.25, 1000.0; the epoch and
/// 2020-01-01T12:34:56.789012.
fn probe_values(t: &DataType) -> datafusion::arrow::array::ArrayRef {
    use datafusion::arrow::array::{
        new_null_array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray,
    };
    use datafusion::arrow::datatypes::TimeUnit;
    use std::sync::Arc;
    const MICROS: i64 = 1_577_882_096_789_012;
    let base: ArrayRef = match t {
        _ if is_string(t) || matches!(t, DataType::Dictionary(..)) => {
            Arc::new(StringArray::from(vec![
                None,
                Some(""),
                Some("word"),
                Some("2020-01-02"),
                Some("Zoë-09 ."),
            ]))
        }
        _ if is_float(t) => Arc::new(Float64Array::from(vec![
            None,
            Some(0.0),
            Some(1.5),
            Some(-2.25),
            Some(1000.0),
        ])),
        DataType::Boolean => Arc::new(BooleanArray::from(vec![
            None,
            Some(true),
            Some(false),
            Some(true),
            Some(false),
        ])),
        DataType::Date32 => Arc::new(Int32Array::from(vec![
            None,
            Some(0),
            Some(18_262),
            Some(20_000),
            Some(7_000),
        ])),
        DataType::Timestamp(unit, _) => {
            let v = match unit {
                TimeUnit::Second => MICROS / 1_000_000,
                TimeUnit::Millisecond => MICROS / 1_000,
                TimeUnit::Microsecond => MICROS,
                TimeUnit::Nanosecond => MICROS * 1_000,
            };
            Arc::new(Int64Array::from(vec![
                None,
                Some(0),
                Some(v),
                Some(v / 2),
                Some(v + 7),
            ]))
        }
        _ => Arc::new(Int64Array::from(vec![
            None,
            Some(0),
            Some(1),
            Some(2),
            Some(7),
        ])),
    };
    datafusion::arrow::compute::cast(&base, t).unwrap_or_else(|_| new_null_array(t, PROBE_ROWS))
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Whether a cast from `from` to `to` succeeds for every value (and so never turns one into
/// NULL either).
pub(crate) fn cast_is_total(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let int_width = |t: &DataType| match t {
        Int8 => Some((8, true)),
        Int16 => Some((16, true)),
        Int32 => Some((32, true)),
        Int64 => Some((64, true)),
        UInt8 => Some((8, false)),
        UInt16 => Some((16, false)),
        UInt32 => Some((32, false)),
        UInt64 => Some((64, false)),
        _ => None,
    };
    if from == to || is_string(to) || matches!(from, Null) {
        return true;
    }
    if let Dictionary(_, value) = from {
        return cast_is_total(value, to);
    }
    match (int_width(from), int_width(to)) {
        (Some((a, sa)), Some((b, sb))) => return (sa == sb && b >= a) || (!sa && sb && b > a),
        (Some(_), None) if is_float(to) => return true,
        _ => {}
    }
    matches!(
        (from, to),
        (Float16 | Float32, Float32 | Float64)
            | (Decimal128(..), Float64)
            | (Boolean, Int8 | Int16 | Int32 | Int64 | Float32 | Float64)
            | (Date32, Date64 | Timestamp(..))
            | (Timestamp(..), Date32 | Date64)
    )
}

/// What in `e` could fail on some value, if anything.
fn failing(e: &Expr, schema: &DFSchema) -> Option<String> {
    let mut found = None;
    let _ = e.apply(|e| {
        let bad = match e {
            Expr::Column(_)
            | Expr::OuterReferenceColumn(..)
            | Expr::Literal(..)
            | Expr::Placeholder(_)
            | Expr::Alias(_)
            | Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Between(_)
            | Expr::Case(_)
            | Expr::InList(_)
            | Expr::TryCast(_)
            | Expr::Exists(_)
            | Expr::InSubquery(_)
            | Expr::ScalarSubquery(_) => None,
            Expr::Like(l) => (!matches!(*l.pattern, Expr::Literal(..)))
                .then(|| "LIKE with a pattern that is not a literal".to_string()),
            // A regular expression that does not compile fails on the first row that reaches it.
            Expr::SimilarTo(_) => Some("SIMILAR TO".to_string()),
            Expr::Negative(x) => match x.get_type(schema) {
                Ok(t) if is_float(&t) => None,
                _ => Some("negation of an integer (it overflows)".to_string()),
            },
            Expr::BinaryExpr(b) => binary(b, e, schema),
            Expr::Cast(c) => match c.expr.get_type(schema) {
                Ok(from) if cast_is_total(&from, c.field.data_type()) => None,
                Ok(from) => Some(format!("CAST from {from} to {}", c.field.data_type())),
                Err(_) => Some("a cast".to_string()),
            },
            Expr::ScalarFunction(f) => function(f, e, schema),
            // A decimal average fails when the average does not fit its type: on some sums.
            Expr::AggregateFunction(f) => {
                let decimal = f.params.args.iter().any(|a| {
                    a.get_type(schema).is_ok_and(|t| {
                        matches!(
                            t,
                            DataType::Decimal32(..)
                                | DataType::Decimal64(..)
                                | DataType::Decimal128(..)
                                | DataType::Decimal256(..)
                        )
                    })
                });
                (decimal && !matches!(f.func.name(), "count")).then(|| {
                    format!(
                        "the aggregate {} of a decimal (it can overflow)",
                        f.func.name()
                    )
                })
            }
            other => Some(format!("the expression {}", other.variant_name())),
        };
        if bad.is_some() {
            found = bad;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn binary(b: &BinaryExpr, e: &Expr, schema: &DFSchema) -> Option<String> {
    use Operator::*;
    match b.op {
        Eq | NotEq | Lt | LtEq | Gt | GtEq | IsDistinctFrom | IsNotDistinctFrom | And | Or
        | StringConcat => None,
        LikeMatch | ILikeMatch | NotLikeMatch | NotILikeMatch => {
            (!matches!(*b.right, Expr::Literal(..)))
                .then(|| format!("{} with a pattern that is not a literal", b.op))
        }
        Plus | Minus | Multiply | Divide | Modulo => match e.get_type(schema) {
            Ok(t) if is_float(&t) => None,
            Ok(t) => Some(format!("arithmetic ({}) on {t}", b.op)),
            Err(_) => Some(format!("arithmetic ({})", b.op)),
        },
        other => Some(format!("the operator {other}")),
    }
}

fn function(
    f: &datafusion::logical_expr::expr::ScalarFunction,
    e: &Expr,
    schema: &DFSchema,
) -> Option<String> {
    let name = f.func.name();
    if name.starts_with("lg_") || TOTAL_FUNCTIONS.contains(&name) {
        return None;
    }
    if FLOAT_FUNCTIONS.contains(&name) {
        return match e.get_type(schema) {
            Ok(t) if is_float(&t) => None,
            _ => Some(format!("the function {name} on integers")),
        };
    }
    if matches!(name, "date_part" | "datepart" | "date_trunc" | "datetrunc") {
        // The unit must be written in the query: a computed one could be invalid on some rows.
        let literal = matches!(
            f.args.first(),
            Some(Expr::Literal(ScalarValue::Utf8(Some(_)), _))
        );
        return (!literal).then(|| format!("the function {name} with a computed unit"));
    }
    if name == "replace" {
        // Bounded (`bounded.rs`): it fails when the result would grow too large, so only a
        // replacement no longer than the text it replaces (or of nothing: the string is left
        // as it is), which cannot grow it.
        let text = |a: Option<&Expr>| match a {
            Some(Expr::Literal(ScalarValue::Utf8(Some(t)) | ScalarValue::Utf8View(Some(t)), _)) => {
                Some(t.len())
            }
            _ => None,
        };
        let ok = matches!((text(f.args.get(1)), text(f.args.get(2))), (Some(from), Some(to)) if from == 0 || to <= from);
        return (!ok).then(|| {
            format!("the function {name} with a replacement longer than the text it replaces")
        });
    }
    if matches!(name, "substr" | "substring") {
        // A negative length fails; positions and lengths must be literals, lengths >= 0.
        let ok = f.args.iter().skip(1).enumerate().all(|(i, a)| match a {
            Expr::Literal(ScalarValue::Int64(Some(n)), _) => i == 0 || *n >= 0,
            _ => false,
        });
        return (!ok).then(|| format!("the function {name} with computed or negative bounds"));
    }
    Some(format!("the function {name}"))
}
