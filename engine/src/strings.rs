//! String columns as the masks read them: `Utf8` or `Utf8View`, row by row or in runs of one
//! value.

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::common::{exec_err, Result as DFResult};

/// A string column as `Utf8` or `Utf8View`: the lake's raw strings are read as views (no copy
/// out of the Parquet pages), what masks produce is `Utf8`.
pub(crate) enum Strings<'a> {
    Plain(&'a datafusion::arrow::array::StringArray),
    View(&'a datafusion::arrow::array::StringViewArray),
}

impl<'a> Strings<'a> {
    pub(crate) fn of(a: &'a ArrayRef) -> DFResult<Self> {
        if let Some(s) = a.as_string_opt::<i32>() {
            return Ok(Self::Plain(s));
        }
        if let Some(s) = a.as_string_view_opt() {
            return Ok(Self::View(s));
        }
        exec_err!("expected a string column, got {}", a.data_type())
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Plain(s) => s.len(),
            Self::View(s) => s.len(),
        }
    }

    pub(crate) fn is_null(&self, i: usize) -> bool {
        match self {
            Self::Plain(s) => s.is_null(i),
            Self::View(s) => s.is_null(i),
        }
    }

    pub(crate) fn nulls(&self) -> Option<&'a NullBuffer> {
        match self {
            Self::Plain(s) => (*s).nulls(),
            Self::View(s) => (*s).nulls(),
        }
    }

    /// The value of a row that is not null.
    pub(crate) fn value(&self, i: usize) -> &'a str {
        match self {
            Self::Plain(s) => s.value(i),
            Self::View(s) => s.value(i),
        }
    }

    /// Rows in runs of one value, in order and covering every row: each run is all null or
    /// all one string, and a run ends where the value or its nullness changes. Kernels compute
    /// one answer per run, because rows of one subject lie together (files are written per
    /// patient).
    pub(crate) fn runs(&self) -> Vec<std::ops::Range<usize>> {
        // One pass per kind, each comparing neighbours inline (a call per row cost more than
        // the comparison: this runs on every row a scan reads, once per kernel).
        match self {
            Self::Plain(s) => runs_where(s.len(), s.nulls(), |i| s.value(i) == s.value(i - 1)),
            Self::View(s) => {
                let views = s.views();
                runs_where(s.len(), s.nulls(), |i| {
                    let (a, b) = (views[i], views[i - 1]);
                    a == b
                        || ((a as u64) == (b as u64)
                            && (a as u32) > 12
                            && s.value(i) == s.value(i - 1))
                })
            }
        }
    }

    pub(crate) fn get(&self, i: usize) -> Option<&'a str> {
        (!self.is_null(i)).then(|| self.value(i))
    }

    /// Bytes of the values, for sizing an output.
    pub(crate) fn value_bytes(&self) -> usize {
        match self {
            Self::Plain(s) => s.value_data().len(),
            Self::View(s) => s.total_bytes_len(),
        }
    }
}

/// Runs of rows where `same_as_previous(i)` (asked only when rows `i - 1` and `i` are both
/// valid) holds; nullness changes always cut, and adjacent nulls share a run.
fn runs_where(
    n: usize,
    nulls: Option<&NullBuffer>,
    same_as_previous: impl Fn(usize) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::with_capacity(n / 4 + 1);
    let mut start = 0;
    for i in 1..n {
        let continues = match nulls {
            None => same_as_previous(i),
            Some(b) => match (b.is_valid(i), b.is_valid(i - 1)) {
                (true, true) => same_as_previous(i),
                (false, false) => true,
                _ => false,
            },
        };
        if !continues {
            runs.push(start..i);
            start = i;
        }
    }
    if n > 0 {
        runs.push(start..n);
    }
    runs
}
