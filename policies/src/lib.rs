//! Who is asking and what they may see: principals, their attributes, and access decisions.
//!
//! Attributes come only from the identity source (the users file today, an identity provider's
//! token later), never from anything a client sends with a query.

mod policy;
mod users;

pub use policy::{
    Action, Decision, DifferentialPrivacy, Diversity, FilterValue, Generalisation, Mask,
    Obligations, PolicySet, ReleaseRules, RequestContext, RowFilter, SubjectSet, Threshold,
    ATTRIBUTES, DEFAULT_MODEL,
};
pub use users::{Principal, UserStore};

/// Errors of identity and policy handling.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {reason}")]
    InvalidFile { file: String, reason: String },
    #[error("invalid user name or password")]
    BadCredentials,
    #[error("could not hash password: {0}")]
    Hash(String),
}

pub type Result<T, E = PolicyError> = std::result::Result<T, E>;
