//! The engine's errors, classified so the server can map each to one gRPC code.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

use crate::contract::OffContract;
use crate::encrypted::Undecryptable;

/// Every way a query can fail, by whom it is to be fixed.
///
/// Messages are safe to show the caller: they name rules, datasets and columns, never a data
/// value or a file location. Details of internal failures stay in the server's log.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The SQL does not parse, names something that does not exist, or is not a query.
    #[error("{0}")]
    InvalidQuery(String),
    /// Policy refuses it; the message names the rule.
    #[error("{0}")]
    PermissionDenied(String),
    /// A memory, size or time limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A configuration file (keys, policy) is unusable.
    #[error("{0}")]
    InvalidConfig(String),
    /// The lake or the catalog cannot be read.
    #[error(transparent)]
    Catalog(#[from] lakegate_catalogs::CatalogError),
    /// A data file failed while a query read it (corrupt, truncated, or replaced or removed
    /// while the query read it). The message names the dataset where it is known;
    /// the reader's detail is logged server-side.
    #[error("{message}")]
    Unreadable { message: String, detail: String },
    /// A data file of a dataset the query reads does not match the catalog's schema for it (a
    /// file written while the server runs). The message names the dataset where the caller may
    /// know it; the file and the difference are logged server-side.
    #[error("{message}")]
    OffContract { message: String, detail: String },
    /// A dataset the query reads is encrypted at rest and the server does not hold its data
    /// keys (a missing or wrong master key). The message names the dataset where the caller
    /// may know it; which key failed is logged server-side.
    #[error("{message}")]
    Undecryptable { message: String, detail: String },
    /// A function or operator refused a value while the query ran (a unit, pattern or format
    /// it does not accept, a string it cannot parse): the caller's mistake, but its detail can
    /// quote the value, so the detail is logged server-side, never sent.
    #[error("{REJECTED}")]
    Rejected(String),
    /// A service the query depends on (the privacy budget ledger) cannot be reached; the
    /// query is refused rather than served without it.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; the detail is logged server-side, never sent.
    #[error("internal error")]
    Internal(String),
}

impl From<DataFusionError> for EngineError {
    fn from(e: DataFusionError) -> Self {
        classify(&e)
    }
}

/// What a caller hears when a function or operator refused a value while the query ran.
pub const REJECTED: &str = "the query failed: a function or operator refused one of its inputs \
 (for example a date unit, pattern or format it does not accept, or a string it cannot \
parse); the detail is withheld because it can quote a data value";

/// The context [`PolicyBoundaryExec`](crate::governed::PolicyBoundaryExec) puts on a failed read
/// of its dataset's files, followed by the dataset's name.
pub(crate) const READING: &str = "reading dataset ";

/// Whether `e` is a failure to read the lake's files rather than of the query: the Parquet
/// reader's (a page that does not decompress or decode), the object store's, or I/O.
pub(crate) fn is_read_error(e: &DataFusionError) -> bool {
    match e {
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            is_read_error(inner)
        }
        DataFusionError::Shared(inner) => is_read_error(inner),
        DataFusionError::ParquetError(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::IoError(_) => true,
        DataFusionError::ArrowError(a, _) => matches!(
            a.as_ref(),
            ArrowError::ParquetError(_) | ArrowError::IoError(..) | ArrowError::JsonError(_)
        ),
        _ => false,
    }
}

fn unreadable(dataset: Option<&str>, e: &DataFusionError) -> EngineError {
    let what = match dataset {
        Some(d) => format!("a data file of {d}"),
        None => "a data file of the lake".to_string(),
    };
    EngineError::Unreadable {
        message: format!(
            "{what} could not be read (corrupt, truncated, or replaced while the query read it); \
             the query was stopped; if it fails again, the lake's operator must restore the file (the server's log has the detail)"
        ),
        detail: e.to_string(),
    }
}

/// The dataset a failed read was of, where a boundary said so (operators above it, such as a
/// repartition sharing one error among partitions, may wrap the error further).
fn read_dataset(e: &DataFusionError) -> Option<&str> {
    match e {
        DataFusionError::Context(c, _) if c.starts_with(READING) => Some(&c[READING.len()..]),
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            read_dataset(inner)
        }
        DataFusionError::Shared(inner) => read_dataset(inner),
        _ => None,
    }
}

/// The context a row filter's read of its subject set puts on a failure, after the dataset's
/// name: that dataset may be one the caller cannot see, so it is not named to the caller.
pub(crate) const FOR_ROW_FILTER: &str = " for a row filter";

fn off_contract(e: &OffContract, hidden: bool) -> EngineError {
    let what = if hidden {
        "a data file of the lake".to_string()
    } else {
        format!("a data file of {}", e.dataset)
    };
    EngineError::OffContract {
        message: format!(
            "{what} does not match the catalog's schema for it, so the query was refused rather \
             than read with missing or changed columns; the lake's operator must fix or remove the file"
        ),
        detail: e.to_string(),
    }
}

fn undecryptable(e: &Undecryptable, hidden: bool) -> EngineError {
    let what = if hidden {
        "a dataset of the lake".to_string()
    } else {
        e.dataset.clone()
    };
    EngineError::Undecryptable {
        message: format!(
            "{what} is encrypted at rest and the server cannot unwrap its data keys, so it cannot \
             be read now; the lake's operator must fix the server's keyring (other datasets are \
             served as usual)"
        ),
        detail: e.to_string(),
    }
}

pub(crate) fn classify(e: &DataFusionError) -> EngineError {
    classify_in(e, false)
}

/// `hidden`: under a row filter's read, where the dataset is not named.
fn classify_in(e: &DataFusionError, hidden: bool) -> EngineError {
    let classify = |inner: &DataFusionError| classify_in(inner, hidden);
    match e {
        _ if is_read_error(e) => unreadable(read_dataset(e), e),
        DataFusionError::Context(c, inner) => {
            classify_in(inner, hidden || c.ends_with(FOR_ROW_FILTER))
        }
        DataFusionError::Diagnostic(_, inner) => classify(inner),
        DataFusionError::Shared(inner) => classify(inner),
        DataFusionError::Collection(errs) => errs
            .first()
            .map(classify)
            .unwrap_or_else(|| EngineError::Internal("empty error collection".into())),
        DataFusionError::External(x) if x.downcast_ref::<OffContract>().is_some() => {
            off_contract(x.downcast_ref().expect("checked"), hidden)
        }
        DataFusionError::External(x) if x.downcast_ref::<Undecryptable>().is_some() => {
            undecryptable(x.downcast_ref().expect("checked"), hidden)
        }
        // The engine's own refusals raised inside DataFusion (a release's table provider).
        DataFusionError::External(x) if x.downcast_ref::<EngineError>().is_some() => {
            match x.downcast_ref::<EngineError>().expect("checked") {
                EngineError::PermissionDenied(m) => EngineError::PermissionDenied(m.clone()),
                EngineError::InvalidQuery(m) => EngineError::InvalidQuery(m.clone()),
                EngineError::Unavailable(m) => EngineError::Unavailable(m.clone()),
                EngineError::Undecryptable { message, detail } => EngineError::Undecryptable {
                    message: message.clone(),
                    detail: detail.clone(),
                },
                other => EngineError::Internal(other.to_string()),
            }
        }
        DataFusionError::SQL(p, _) => EngineError::InvalidQuery(format!("SQL error: {p}")),
        DataFusionError::Plan(m) => {
            EngineError::InvalidQuery(format!("planning error: {}", first_line(m)))
        }
        DataFusionError::SchemaError(s, _) => {
            EngineError::InvalidQuery(format!("schema error: {s}"))
        }
        DataFusionError::NotImplemented(m) => {
            EngineError::InvalidQuery(format!("not supported: {}", first_line(m)))
        }
        DataFusionError::ResourcesExhausted(m)
            if m.starts_with(crate::budget::BUDGET_EXCEEDED)
                || m.starts_with(crate::bounded::FUNCTION_TOO_LARGE) =>
        {
            EngineError::ResourceExhausted(m.clone())
        }
        DataFusionError::ResourcesExhausted(_) => EngineError::ResourceExhausted(
            "the query needs more memory than its limit allows; narrow it or aggregate".into(),
        ),
        // Arrow compute errors can quote the offending value (a failed cast prints it), so only
        // the kind of failure is passed on.
        DataFusionError::ArrowError(a, _) => match a.as_ref() {
            ArrowError::DivideByZero => EngineError::InvalidQuery("division by zero".into()),
            ArrowError::CastError(_) | ArrowError::ParseError(_) => EngineError::InvalidQuery(
                "a value could not be converted to the requested type".into(),
            ),
            ArrowError::ComputeError(_) | ArrowError::ArithmeticOverflow(_) => {
                EngineError::InvalidQuery("arithmetic error during evaluation".into())
            }
            ArrowError::MemoryError(_) => EngineError::ResourceExhausted("out of memory".into()),
            other => EngineError::Internal(other.to_string()),
        },
        // DataFusion's functions report an argument they refuse at run time this way (an
        // unknown `date_trunc` unit, a pattern that does not compile, a string that does not
        // parse): the caller can fix the query, so say so, without the message.
        DataFusionError::Execution(m) => EngineError::Rejected(m.clone()),
        // What is not a read of the lake (tested first) comes from a function: a regular
        // expression that does not compile.
        DataFusionError::External(e) => EngineError::Rejected(e.to_string()),
        other => EngineError::Internal(other.to_string()),
    }
}

/// DataFusion appends hints and backtraces on later lines; the first line says what is wrong.
fn first_line(m: &str) -> &str {
    m.lines().next().unwrap_or(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cast_errors_do_not_echo_values() {
        let e = DataFusionError::ArrowError(
            Box::new(ArrowError::CastError(
                "Cannot cast string '123-45-6789' to value of Int64".into(),
            )),
            None,
        );
        let msg = EngineError::from(e).to_string();
        assert!(!msg.contains("123-45-6789"), "{msg}");
    }

    #[test]
    fn read_errors_name_the_dataset_not_the_file() {
        let read = DataFusionError::ArrowError(
            Box::new(ArrowError::ParquetError(
                "External: snappy: corrupt input in curated/clinical/patients/part-00000.parquet"
                    .into(),
            )),
            None,
        );
        let e = EngineError::from(DataFusionError::Shared(Arc::new(DataFusionError::Context(
            format!("{READING}clinical.patients"),
            Box::new(read),
        ))));
        let msg = e.to_string();
        assert!(
            msg.starts_with("a data file of clinical.patients could not be read"),
            "{msg}"
        );
        assert!(!msg.contains("curated"), "{msg}");
        assert!(matches!(e, EngineError::Unreadable { detail, .. } if detail.contains("snappy")));
        // A query's own failure under the same context stays what it is.
        let e = EngineError::from(DataFusionError::Context(
            format!("{READING}clinical.patients"),
            Box::new(DataFusionError::ArrowError(
                Box::new(ArrowError::DivideByZero),
                None,
            )),
        ));
        assert_eq!(e.to_string(), "division by zero");
    }

    #[test]
    fn a_file_off_contract_names_its_dataset_unless_a_row_filter_read_it() {
        let off = || {
            DataFusionError::External(Box::new(OffContract {
                dataset: "clinical.patients".into(),
                path: "curated/clinical/patients/part-9.parquet".into(),
                reason: "column 'research_consent' is Boolean in the catalog but Utf8".into(),
            }))
        };
        let e = EngineError::from(DataFusionError::Shared(Arc::new(off())));
        let msg = e.to_string();
        assert!(
            msg.starts_with("a data file of clinical.patients does not match"),
            "{msg}"
        );
        assert!(
            !msg.contains("part-9") && !msg.contains("research_consent"),
            "{msg}"
        );
        let e = EngineError::from(DataFusionError::Context(
            format!("reading clinical.patients{FOR_ROW_FILTER}"),
            Box::new(off()),
        ));
        let msg = e.to_string();
        assert!(
            msg.starts_with("a data file of the lake does not match"),
            "{msg}"
        );
        assert!(
            matches!(e, EngineError::OffContract { detail, .. } if detail.contains("part-9.parquet"))
        );
    }

    #[test]
    fn execution_errors_say_what_failed_without_the_detail() {
        let e = DataFusionError::Execution(
            "Unsupported date_trunc granularity: 'José'. Supported values are: day".into(),
        );
        let e = EngineError::from(DataFusionError::Context("x".into(), Box::new(e)));
        assert!(matches!(e, EngineError::Rejected(_)), "{e:?}");
        assert_eq!(e.to_string(), REJECTED);
        assert!(!REJECTED.contains("José"));
    }
}
