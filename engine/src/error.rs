//! The engine's errors, classified so the server can map each to one gRPC code.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

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
    /// Anything else; the detail is logged server-side, never sent.
    #[error("internal error")]
    Internal(String),
}

impl From<DataFusionError> for EngineError {
    fn from(e: DataFusionError) -> Self {
        classify(&e)
    }
}

fn classify(e: &DataFusionError) -> EngineError {
    match e {
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            classify(inner)
        }
        DataFusionError::Shared(inner) => classify(inner),
        DataFusionError::Collection(errs) => errs
            .first()
            .map(classify)
            .unwrap_or_else(|| EngineError::Internal("empty error collection".into())),
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
        DataFusionError::ResourcesExhausted(m) if m.starts_with(crate::budget::BUDGET_EXCEEDED) => {
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
    fn execution_errors_carry_no_detail() {
        let e = DataFusionError::Execution(
            "reading curated/clinical/patients/part-00000.parquet".into(),
        );
        assert_eq!(EngineError::from(e).to_string(), "internal error");
    }
}
