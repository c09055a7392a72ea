//! The one mapping from errors to gRPC status codes.

use lakegate_engine::EngineError;
use tonic::Status;

use crate::signing::TokenError;

/// Map an engine error to the status the client sees. Internal details go to the log only.
pub fn engine_status(e: EngineError) -> Status {
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
            tracing::error!(%detail, "{message}");
            Status::data_loss(message)
        }
        EngineError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            Status::internal("internal error")
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
