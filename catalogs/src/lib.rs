//! The lake and its catalog: where datasets live, what they contain, and how they are labelled.
//!
//! A lake is an [`object_store`] location (a local path, `s3://`, `gs://`, `az://`, ...). The
//! catalog is a JSON document stored in the lake itself (`catalog/datasets.json`), read and
//! written through the same object store, so a lake is self-describing wherever it lives.
//! Every dataset carries its Arrow schema, per-column sensitivity labels and dataset tags;
//! [`Catalog::verify`] checks the Parquet files against that contract before anything is served.

mod contract;
pub mod delta;
pub mod describe;
pub mod ingest;
pub mod keys;
mod lake;
mod model;
mod store;

pub use contract::parse_contract;
pub use keys::{DataKeys, Keyring};
pub use lake::{CatalogStamp, Lake};
pub use model::{
    audit_dataset, Bound, Catalog, ColumnChecks, ColumnDef, ColumnType, Dataset, DatasetName,
    FileFormat, NdjsonCheck, Shape, AUDIT_DATASET, AUDIT_EVENTS_PREFIX, AUDIT_RETENTION_DAYS,
    LABELS,
};

/// Everything that can go wrong reading or checking a catalog.
///
/// Messages name datasets and columns, never file locations: they may reach a client.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("invalid lake URL '{url}': {reason}")]
    InvalidLakeUrl { url: String, reason: String },
    #[error("the lake has no catalog (expected catalog/datasets.json); build one with `lakegate demo` or write it")]
    NoCatalog,
    #[error("catalog does not parse: {0}")]
    Malformed(String),
    #[error("catalog entry '{dataset}': {reason}")]
    InvalidEntry { dataset: String, reason: String },
    #[error("dataset '{dataset}' has no data files")]
    MissingFiles { dataset: String },
    #[error("dataset '{dataset}': a data file's schema disagrees with the catalog: {reason}")]
    SchemaMismatch { dataset: String, reason: String },
    #[error("dataset '{dataset}': a data file is not valid Parquet: {reason}")]
    CorruptFile { dataset: String, reason: String },
    #[error("contract {file}: {reason}")]
    Contract { file: String, reason: String },
    #[error("unknown dataset '{0}' (declare it with `lakegate catalog add --contract FILE`)")]
    UnknownDataset(String),
    #[error("dataset '{dataset}' cannot be ingested into: {reason}")]
    NotIngestible { dataset: String, reason: String },
    #[error("another ingest into '{dataset}' holds its lock since {since}; retry when it ends")]
    Busy { dataset: String, since: String },
    #[error("cannot read {path}: {reason}")]
    Source { path: String, reason: String },
    #[error("dataset '{dataset}': its Delta table: {reason}")]
    Delta { dataset: String, reason: String },
    #[error("dataset '{dataset}' cannot be decrypted: {reason}")]
    Keys { dataset: String, reason: String },
    #[error("keyring {path}: {reason}")]
    Keyring { path: String, reason: String },
    #[error("object store error: {0}")]
    Store(#[from] object_store::Error),
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

pub mod demo;
