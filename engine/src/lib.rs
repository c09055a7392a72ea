//! Governed query planning and execution on DataFusion.
//!
//! [`Engine`] holds what every request shares (the catalog, the dataset tables, one memory pool
//! with spilling); [`Engine::session`] builds a fresh [`Session`] per request from the caller's
//! principal, holding only the datasets that caller may query. All SQL goes through
//! [`Session::plan`], which admits only queries: DDL, DML, COPY, SET, EXPLAIN and every other
//! statement are refused, and URL or file-path tables are never enabled.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lakegate_engine::EngineError> {
//! use lakegate_catalogs::Lake;
//! use lakegate_engine::{Engine, EngineConfig};
//! use lakegate_policies::{GrantPolicy, Principal};
//!
//! let lake = Lake::open("./demo-lake")?;
//! let engine = Engine::open(lake, GrantPolicy::default(), EngineConfig::default()).await?;
//! let alice = Principal { name: "alice".into(), attributes: Default::default() };
//! let query = engine.session(&alice)?.plan("SELECT count(*) FROM clinical.patients").await?;
//! let _stream = query.execute(None).await?;
//! # Ok(()) }
//! ```

mod error;
mod session;

pub use error::EngineError;
pub use session::{Engine, EngineConfig, PlannedQuery, Session};

pub use datafusion::execution::SendableRecordBatchStream;
pub use datafusion::scalar::ScalarValue;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
