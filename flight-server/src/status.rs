//! The one mapping from errors to gRPC status codes.

use lakegate_engine::EngineError;
use tonic::Status;

use crate::signing::TokenError;

/// Map an engine error of the query `query_id` (its audit events carry the same id; empty when
/// nothing was to run) to the status the client sees. Details go to the log only; where one is
/// withheld, the message names the query, so an operator can find it from what the caller
/// reports.
pub fn query_status(e: EngineError, query_id: &str) -> Status {
    let cite = |message: &str| {
        if query_id.is_empty() {
            message.to_string()
        } else {
            format!("{message} (query {query_id}; the server log has the detail)")
        }
    };
    match e {
        EngineError::InvalidQuery(m) => Status::invalid_argument(m),
        EngineError::PermissionDenied(m) => Status::permission_denied(m),
        EngineError::ResourceExhausted(m) => Status::resource_exhausted(m),
        EngineError::InvalidConfig(c) => {
            tracing::error!(error = %c, "configuration unusable");
            Status::unavailable("the server's policy configuration is unusable")
        }
        EngineError::Catalog(c) => {
            tracing::error!(error = %c, "lake or catalog unreadable");
            Status::unavailable("the lake cannot be read right now")
        }
        EngineError::Unreadable { message, detail } => {
            tracing::error!(%detail, query_id, "{message}");
            Status::data_loss(cite(&message))
        }
        EngineError::Undecryptable { message, detail } => {
            tracing::error!(%detail, query_id, "{message}");
            Status::unavailable(cite(&message))
        }
        EngineError::OffContract { message, detail } => {
            tracing::error!(%detail, query_id, "{message}");
            Status::failed_precondition(cite(&message))
        }
        EngineError::Rejected(ref detail) => {
            tracing::info!(%detail, query_id, "a query's input was refused while it ran");
            Status::invalid_argument(cite(&e.to_string()))
        }
        EngineError::Unavailable(m) => Status::unavailable(m),
        EngineError::Internal(detail) => {
            tracing::error!(%detail, query_id, "internal error");
            Status::internal(cite("internal error"))
        }
    }
}

/// Session tokens that fail are an authentication problem; tickets and handles that fail are
/// refused (they came with a valid session, but are not this caller's to use).
pub fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Invalid("session") | TokenError::Expired("session") => {
            Status::unauthenticated(format!("{e}; authenticate again"))
        }
        TokenError::WrongCaller(_) => Status::permission_denied(e.to_string()),
        TokenError::Invalid(_) => Status::invalid_argument(e.to_string()),
        TokenError::Expired(_) => Status::failed_precondition(e.to_string()),
    }
}
