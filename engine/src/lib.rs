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
//! use lakegate_catalogs::{Catalog, Lake};
//! use lakegate_engine::{Engine, EngineConfig, KeyRing};
//! use lakegate_policies::{PolicySet, Principal, DEFAULT_MODEL};
//!
//! let lake = Lake::open("./demo-lake")?;
//! let catalog = Catalog::load(&lake).await?;
//! let text = std::fs::read_to_string("policies/demo/policy.toml").unwrap();
//! let policy = PolicySet::load(DEFAULT_MODEL, "policy.toml", &text, &catalog).await.unwrap();
//! let keys = KeyRing::generate(["oncology"]);
//! let engine = Engine::open(lake, policy, keys, EngineConfig::default()).await?;
//! let alice = Principal { name: "alice".into(), attributes: Default::default() };
//! let query = engine.session(&alice).await?.plan("SELECT count(*) FROM clinical.patients").await?;
//! let _stream = query.execute(None).await?;
//! # Ok(()) }
//! ```

pub mod audit;
mod bounded;
mod budget;
mod contract;
mod counted;
mod depth;
mod digests;
mod encrypted;
mod engine;
mod error;
mod generalise;
mod governed;
mod keys;
pub mod lifecycle;
mod lookup;
pub mod masks;
pub mod privacy_budget;
mod private;
mod released;
pub mod releases;
mod session;
mod strings;
mod subjects;
mod system;
mod thresholds;
mod total;
mod verify;
mod versions;

pub use bounded::FUNCTION_OUTPUT_LIMIT;
pub use budget::MemoryBudget;
pub use depth::MAX_DEPTH as MAX_QUERY_DEPTH;
pub use engine::{Engine, EngineConfig, CATALOG_NAME};
pub use error::EngineError;
pub use keys::KeyRing;
pub use session::{AccessReport, PlannedQuery, Session};

pub use datafusion::execution::SendableRecordBatchStream;
pub use datafusion::scalar::ScalarValue;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
