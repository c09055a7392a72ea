//! Delta Lake tables: how ingested datasets keep their versions.
//!
//! A dataset declared by a contract is a Delta table in its folder (`_delta_log/` beside the
//! Parquet files), so each ingest commits one version atomically and other engines (Spark,
//! DuckDB, Polars) can read what Lakegate wrote. Every byte goes through the lake's own
//! object store (a local folder or a bucket), handed to `deltalake` as its storage backend;
//! the table's URL (`memory:///<folder>`) only names the folder inside that store.

use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::StructType;
use deltalake::operations::create::CreateBuilder;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError, TableProperty};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::store::LakeStore;
use url::Url;

use crate::{CatalogError, Dataset, Lake, Result};

/// A version of a Delta dataset: its number, when it was committed, and what Lakegate wrote
/// into its commit (the sources and the principal), if Lakegate wrote it.
#[derive(Clone, Debug)]
pub struct VersionInfo {
    pub version: u64,
    /// Milliseconds since 1970 (UTC).
    pub timestamp: Option<i64>,
    pub operation: Option<String>,
    pub lakegate: Option<serde_json::Value>,
}

fn table_url(d: &Dataset) -> Result<Url> {
    Url::parse(&format!("memory:///{}/", d.location.trim_end_matches('/'))).map_err(|e| {
        CatalogError::InvalidEntry {
            dataset: d.name.clone(),
            reason: e.to_string(),
        }
    })
}

pub(crate) fn delta_error(d: &Dataset) -> impl Fn(DeltaTableError) -> CatalogError + '_ {
    move |e| CatalogError::Delta {
        dataset: d.name.clone(),
        reason: e.to_string(),
    }
}

fn builder(lake: &Lake, d: &Dataset) -> Result<DeltaTableBuilder> {
    let url = table_url(d)?;
    Ok(DeltaTableBuilder::from_url(url.clone())
        .map_err(delta_error(d))?
        .with_storage_backend(Arc::new(LakeStore::sorted(lake.store())), url))
}

/// Whether the dataset's folder holds a Delta table.
pub async fn exists(lake: &Lake, d: &Dataset) -> Result<bool> {
    let log = Path::from(format!("{}/_delta_log", d.location.trim_end_matches('/')));
    let mut listing = lake.store().list(Some(&log));
    Ok(listing.try_next().await?.is_some())
}

/// Create the dataset's Delta table (version 0, no rows), with the contract's schema.
pub async fn create(lake: &Lake, d: &Dataset) -> Result<DeltaTable> {
    let schema = StructType::try_from_arrow(d.schema().as_ref()).map_err(|e| {
        CatalogError::InvalidEntry {
            dataset: d.name.clone(),
            reason: format!("no Delta type for a column: {e}"),
        }
    })?;
    let table = builder(lake, d)?.build().map_err(delta_error(d))?;
    CreateBuilder::new()
        .with_log_store(table.log_store())
        .with_table_name(d.name.clone())
        .with_comment(d.description.clone())
        .with_columns(schema.fields().cloned())
        // No column statistics in the log: the log is plaintext JSON, and the minimum and
        // maximum of an encrypted (or merely sensitive) column are its values. Lakegate prunes
        // with Parquet footers, which are encrypted with the data.
        .with_configuration_property(TableProperty::DataSkippingNumIndexedCols, Some("0"))
        .await
        .map_err(delta_error(d))
}

/// Open the dataset's table at its newest version, or at `version`.
pub async fn open(lake: &Lake, d: &Dataset, version: Option<u64>) -> Result<DeltaTable> {
    let mut b = builder(lake, d)?;
    if let Some(v) = version {
        b = b.with_version(v);
    }
    let table = b.load().await.map_err(delta_error(d))?;
    Ok(table)
}

/// The data files of one version of the table (paths relative to the lake root), sorted, and
/// the version's number.
pub async fn files(
    lake: &Lake,
    d: &Dataset,
    version: Option<u64>,
) -> Result<(u64, Vec<ObjectMeta>)> {
    let table = open(lake, d, version).await?;
    let snapshot = table.snapshot().map_err(delta_error(d))?;
    let version = snapshot.version();
    let prefix = d.location.trim_end_matches('/');
    let mut out: Vec<ObjectMeta> = snapshot
        .log_data()
        .into_iter()
        .map(|f| ObjectMeta {
            location: Path::from(format!("{prefix}/{}", f.object_store_path())),
            last_modified: chrono_from_millis(f.modification_time()),
            size: f.size().max(0) as u64,
            e_tag: None,
            version: None,
        })
        .collect();
    out.sort_by(|a, b| a.location.cmp(&b.location));
    Ok((version, out))
}

fn chrono_from_millis(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Every version of the table, oldest first, with what Lakegate recorded in each commit,
/// read from the commit files of `_delta_log/` (each names its version).
pub async fn history(lake: &Lake, d: &Dataset) -> Result<Vec<VersionInfo>> {
    let store = lake.store();
    let log = Path::from(format!("{}/_delta_log", d.location.trim_end_matches('/')));
    let metas: Vec<ObjectMeta> = store.list(Some(&log)).try_collect().await?;
    let mut out = Vec::new();
    for m in metas {
        let Some(name) = m.location.filename() else {
            continue;
        };
        let Some(version) = name
            .strip_suffix(".json")
            .filter(|v| v.len() == 20)
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = store.get(&m.location).await?.bytes().await?;
        let mut info = VersionInfo {
            version,
            timestamp: None,
            operation: None,
            lakegate: None,
        };
        for line in bytes.split(|b| *b == b'\n') {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(c) = action.get("commitInfo") {
                info.timestamp = c.get("timestamp").and_then(|t| t.as_i64());
                info.operation = c
                    .get("operation")
                    .and_then(|o| o.as_str())
                    .map(String::from);
                info.lakegate = c.get("lakegate").cloned();
            }
        }
        out.push(info);
    }
    out.sort_by_key(|v| v.version);
    Ok(out)
}
