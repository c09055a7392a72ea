//! Delta datasets: each scan reads exactly the files that the dataset's newest version names.
//!
//! A Delta table's folder can hold Parquet files that no version names (written by an ingest
//! that was refused or interrupted before its commit). Listing the folder would serve them,
//! so the scan asks the table's log for the version's files and reads those through the same
//! contract-checked Parquet format as every other dataset.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, Session};
use datafusion::common::project_schema;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::cache::cache_manager::FileStatisticsCache;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::ExecutionPlan;
use lakegate_catalogs::{Dataset, Lake};

use crate::governed::GovernedTable;
use object_store::ObjectStore;

/// The newest version of a Delta dataset, as a table.
#[derive(Debug)]
pub(crate) struct DeltaVersionTable {
    dataset: Dataset,
    store: Arc<dyn ObjectStore>,
    lake_url: &'static str,
    options: ListingOptions,
    schema: SchemaRef,
    cache: Option<Arc<FileStatisticsCache>>,
    /// None: the newest version at each scan.
    version: Option<u64>,
}

impl DeltaVersionTable {
    pub(crate) fn new(
        dataset: Dataset,
        store: Arc<dyn ObjectStore>,
        lake_url: &'static str,
        options: ListingOptions,
        schema: SchemaRef,
        cache: Option<Arc<FileStatisticsCache>>,
    ) -> Self {
        Self {
            dataset,
            store,
            lake_url,
            options,
            schema,
            cache,
            version: None,
        }
    }

    /// The data files of the table's version.
    async fn files(&self) -> DFResult<Vec<object_store::ObjectMeta>> {
        let lake = Lake::with_store(Arc::clone(&self.store));
        let (_, files) = lakegate_catalogs::delta::files(&lake, &self.dataset, self.version)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(files)
    }
}

#[async_trait]
impl TableProvider for DeltaVersionTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DFResult<Vec<TableProviderFilterPushDown>> {
        // Used to prune row groups only; every filter is applied again above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let files = self.files().await?;
        if files.is_empty() {
            let schema = project_schema(&self.schema, projection)?;
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let urls = files
            .iter()
            .map(|f| ListingTableUrl::parse(format!("{}{}", self.lake_url, f.location)))
            .collect::<DFResult<Vec<_>>>()?;
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(self.options.clone())
            .with_schema(Arc::clone(&self.schema));
        let table = ListingTable::try_new(config)?.with_cache(self.cache.clone());
        table.scan(state, projection, filters, limit).await
    }
}

impl DeltaVersionTable {
    /// The same dataset at one earlier version.
    fn at_version(&self, version: u64) -> Self {
        Self {
            dataset: self.dataset.clone(),
            store: Arc::clone(&self.store),
            lake_url: self.lake_url,
            options: self.options.clone(),
            schema: Arc::clone(&self.schema),
            cache: self.cache.clone(),
            version: Some(version),
        }
    }
}

/// A caller's schema of governed tables, where a versioned dataset can also be named at one
/// of its versions: `clinical.lab_results@v3` (quoted in SQL: `"lab_results@v3"`). The
/// version gets the caller's policy exactly as the newest does: the same governed table over
/// the older files.
#[derive(Debug, Default)]
pub(crate) struct VersionedSchema {
    inner: MemorySchemaProvider,
}

/// `name@vN` as its name and version.
fn parse_versioned(name: &str) -> Option<(&str, u64)> {
    let (base, v) = name.rsplit_once("@v")?;
    let version = v.parse::<u64>().ok()?;
    (!base.is_empty() && v.chars().all(|c| c.is_ascii_digit())).then_some((base, version))
}

#[async_trait]
impl SchemaProvider for VersionedSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        if let Some(t) = self.inner.table(name).await? {
            return Ok(Some(t));
        }
        let Some((base, version)) = parse_versioned(name) else {
            return Ok(None);
        };
        let Some(table) = self.inner.table(base).await? else {
            return Ok(None);
        };
        let Some(governed) = (table.as_ref() as &dyn Any).downcast_ref::<GovernedTable>() else {
            return Ok(None);
        };
        let raw = governed.raw().as_ref() as &dyn Any;
        let Some(newest) = raw.downcast_ref::<DeltaVersionTable>() else {
            return Ok(None);
        };
        let older = newest.at_version(version);
        // A version the table does not have is a table that does not exist.
        if older.files().await.is_err() {
            return Ok(None);
        }
        Ok(Some(Arc::new(governed.with_raw(Arc::new(older)))))
    }

    fn register_table(
        &self,
        name: String,
        table: Arc<dyn TableProvider>,
    ) -> DFResult<Option<Arc<dyn TableProvider>>> {
        self.inner.register_table(name, table)
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_versioned;

    #[test]
    fn versions_are_named_with_at_v() {
        assert_eq!(parse_versioned("lab_results@v3"), Some(("lab_results", 3)));
        assert_eq!(parse_versioned("lab_results@v0"), Some(("lab_results", 0)));
        for bad in [
            "lab_results",
            "lab_results@v",
            "lab_results@v-1",
            "@v2",
            "x@v+2",
            "x@v2a",
        ] {
            assert_eq!(parse_versioned(bad), None, "{bad}");
        }
    }
}
