//! Functions whose result can be far larger than their input are bounded per batch.
//!
//! The memory pool counts what operators hold (hash tables, sorts), not the arrays a scalar
//! function builds: `repeat('x', 2000000000)` allocated 2 GB and answered, and two such queries
//! at once would take the server down for everyone. The string functions that multiply their
//! input (`repeat`, `lpad`, `rpad`, `replace`, `regexp_replace`) are wrapped: before the inner
//! function runs, the wrapper computes an upper bound of what it would build for the batch and
//! refuses past [`FUNCTION_OUTPUT_LIMIT`] (ResourceExhausted, naming the function). The list
//! functions that build one value of any size from a few numbers (`range` and
//! `generate_series` as scalars, `array_repeat`, `array_resize`) are not offered: they refuse at
//! planning, naming the table functions `generate_series` and `range` in FROM, which stream
//! their rows and stay.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::{DataFusionError, Result as DFResult, ScalarValue};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};

/// The most one call of a bounded function may build for one batch of rows.
pub const FUNCTION_OUTPUT_LIMIT: usize = 64 << 20;

/// The start of the message a refusal carries; the error mapping keeps it whole.
pub(crate) const FUNCTION_TOO_LARGE: &str = "a function's result is limited to";

/// Upper bound, in bytes, of what a function builds for a batch, from its arguments.
type Estimate = fn(&[ColumnarValue], usize) -> u128;

/// Wrap the amplifying string functions and remove the list builders from `registry`.
pub(crate) fn install(registry: &mut dyn FunctionRegistry) -> DFResult<()> {
    let bounded: [(&str, Estimate); 5] = [
        ("repeat", repeat_size),
        ("lpad", pad_size),
        ("rpad", pad_size),
        ("replace", replace_size),
        ("regexp_replace", regexp_replace_size),
    ];
    for (name, estimate) in bounded {
        let inner = registry.udf(name)?;
        let wrapped = Bounded {
            inner: Arc::clone(inner.inner()),
            estimate,
        };
        registry.register_udf(Arc::new(ScalarUDF::new_from_impl(wrapped)))?;
    }
    for name in ["range", "generate_series", "array_repeat", "array_resize"] {
        if let Some(removed) = registry.deregister_udf(name)? {
            let stub = NotOffered {
                name: name.to_string(),
                aliases: removed.aliases().to_vec(),
                signature: Signature::variadic_any(Volatility::Immutable),
            };
            registry.register_udf(Arc::new(ScalarUDF::new_from_impl(stub)))?;
        }
    }
    Ok(())
}

/// In place of a list builder: refuses at planning, saying why and what to use instead (a
/// plain "invalid function" would suggest a typo).
#[derive(Debug, PartialEq, Eq, Hash)]
struct NotOffered {
    name: String,
    aliases: Vec<String>,
    signature: Signature,
}

impl ScalarUDFImpl for NotOffered {
    fn name(&self) -> &str {
        &self.name
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        datafusion::common::plan_err!(
            "the function {} is not offered: it builds one list of any size from a few numbers; \
             for a series of rows use generate_series(...) or range(...) in FROM, which stream",
            self.name
        )
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        datafusion::common::plan_err!("the function {} is not offered", self.name)
    }
}

/// `arg` at `row` as a string (NULL and non-strings: none).
fn str_at(arg: &ColumnarValue, row: usize) -> Option<&str> {
    match arg {
        ColumnarValue::Scalar(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
        ) => Some(s),
        ColumnarValue::Scalar(_) => None,
        ColumnarValue::Array(a) if a.is_null(row) => None,
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Utf8 => Some(a.as_string::<i32>().value(row)),
            DataType::LargeUtf8 => Some(a.as_string::<i64>().value(row)),
            DataType::Utf8View => Some(a.as_string_view().value(row)),
            _ => None,
        },
    }
}

/// `arg` at `row` as a byte length (NULL and non-strings: 0).
fn len_at(arg: &ColumnarValue, row: usize) -> u128 {
    str_at(arg, row).map_or(0, str::len) as u128
}

/// `args[i]` at `row` as a non-negative count (NULL, negative and non-integers: 0).
fn count_at(arg: &ColumnarValue, row: usize) -> u128 {
    let n = match arg {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(n))) => *n,
        ColumnarValue::Scalar(ScalarValue::Int32(Some(n))) => *n as i64,
        ColumnarValue::Scalar(_) => 0,
        ColumnarValue::Array(a) if a.is_null(row) => 0,
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Int64 => a
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(row),
            DataType::Int32 => a
                .as_primitive::<datafusion::arrow::datatypes::Int32Type>()
                .value(row) as i64,
            _ => 0,
        },
    };
    n.max(0) as u128
}

/// Rows to estimate over: one when every argument is a scalar (a constant, folded once).
fn rows_of(args: &[ColumnarValue], rows: usize) -> usize {
    if args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
        1
    } else {
        rows
    }
}

fn repeat_size(args: &[ColumnarValue], rows: usize) -> u128 {
    let [s, n, ..] = args else { return 0 };
    (0..rows_of(args, rows))
        .map(|i| len_at(s, i) * count_at(n, i))
        .sum()
}

/// `lpad(s, n [, fill])`: n characters of at most 4 bytes each.
fn pad_size(args: &[ColumnarValue], rows: usize) -> u128 {
    let [_, n, ..] = args else { return 0 };
    (0..rows_of(args, rows)).map(|i| 4 * count_at(n, i)).sum()
}

/// `replace(s, from, to)`: what it adds to the string. Each of at most `len(s) / len(from)`
/// occurrences grows it by `len(to) - len(from)`; an empty `from` leaves the string as it is
/// (PostgreSQL's rule, which DataFusion follows). A replacement no longer than what it replaces
/// adds nothing, so it never fails (which `total.rs` relies on), however long the strings are.
fn replace_size(args: &[ColumnarValue], rows: usize) -> u128 {
    let [s, from, to, ..] = args else { return 0 };
    (0..rows_of(args, rows))
        .map(|i| {
            let (len, f, t) = (len_at(s, i), len_at(from, i), len_at(to, i));
            match f {
                0 => 0,
                f => (len / f) * t.saturating_sub(f),
            }
        })
        .sum()
}

/// `regexp_replace(s, pattern, replacement [, flags])`: what it adds to the string. At most one
/// match per character boundary (a pattern can match the empty string), each replaced by the
/// replacement, whose group references (`\1`, `$1`, `${name}`: counted by their `\` and `$`)
/// may each repeat the whole string.
fn regexp_replace_size(args: &[ColumnarValue], rows: usize) -> u128 {
    let [s, _, to, ..] = args else { return 0 };
    (0..rows_of(args, rows))
        .map(|i| {
            let len = len_at(s, i);
            let references = str_at(to, i)
                .map(|t| t.bytes().filter(|b| matches!(b, b'\\' | b'$')).count())
                .unwrap_or(0) as u128;
            (len + 1) * (len_at(to, i) + references * len)
        })
        .sum()
}

/// A function with its result bounded per batch; everything else is the inner function's.
#[derive(Debug)]
struct Bounded {
    inner: Arc<dyn ScalarUDFImpl>,
    estimate: Estimate,
}

impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        self.inner.name() == other.inner.name()
    }
}

impl Eq for Bounded {}

impl Hash for Bounded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.name().hash(state);
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DFResult<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DFResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> DFResult<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let bytes = (self.estimate)(&args.args, args.number_rows);
        if bytes > FUNCTION_OUTPUT_LIMIT as u128 {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{FUNCTION_TOO_LARGE} {} MiB per batch of rows: {} would build up to {} MiB; ask for shorter values (limit: function output)",
                FUNCTION_OUTPUT_LIMIT >> 20,
                self.inner.name(),
                bytes >> 20
            )));
        }
        self.inner.invoke_with_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;

    fn strings(v: &[&str]) -> ColumnarValue {
        ColumnarValue::Array(Arc::new(StringArray::from(v.to_vec())))
    }

    fn text(s: &str) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(s.into())))
    }

    #[test]
    fn estimates_bound_what_each_function_builds() {
        let long = "a".repeat(1 << 20);
        let s = strings(&["abc", &long]);
        // repeat: every row's length times its count; a constant call counts once.
        let n = ColumnarValue::Scalar(ScalarValue::Int64(Some(3)));
        assert_eq!(repeat_size(&[s.clone(), n.clone()], 2), 3 * (3 + (1 << 20)));
        assert_eq!(repeat_size(&[text("ab"), n], 8192), 6);
        // A replacement no longer than what it replaces, or of nothing, adds nothing, however
        // long the strings: such a replace never fails.
        assert_eq!(replace_size(&[s.clone(), text("a"), text("b")], 2), 0);
        assert_eq!(replace_size(&[s.clone(), text(""), text("xyz")], 2), 0);
        assert_eq!(
            replace_size(&[s.clone(), text("a"), text("xyz")], 2),
            2 * 3 + 2 * (1 << 20)
        );
        // lpad: four bytes per character asked for; negative counts build nothing.
        let widths =
            ColumnarValue::Array(Arc::new(datafusion::arrow::array::Int64Array::from(vec![
                10, -5,
            ])));
        assert_eq!(pad_size(&[s.clone(), widths], 2), 40);
        // regexp_replace: a plain replacement adds itself at most once per character boundary;
        // each group reference may add the whole string.
        assert_eq!(
            regexp_replace_size(&[s.clone(), text("a*"), text("xy")], 2),
            4 * 2 + ((1 << 20) + 1) * 2
        );
        assert_eq!(
            regexp_replace_size(&[s, text("(a)"), text("<$1>")], 2),
            4 * (4 + 3) + ((1 << 20) + 1) * (4 + (1 << 20))
        );
    }
}
