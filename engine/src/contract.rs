//! Every file a scan reads (Parquet or newline-delimited JSON) keeps its dataset's contract,
//! including files that arrive while the server runs.
//!
//! The catalog is verified against the lake's files at start and at each catalog reload. A
//! file written later (a pipeline's new part) is listed by the next query a second later, and
//! DataFusion would read it through the catalog's schema: a column it lacks reads as NULL, one
//! it adds is never seen, a type it changes is cast where it can be. Clinical data read as
//! silent NULLs is wrong data, so [`ContractFormat`] checks each file version before a scan
//! may read it, and refuses the query if it does not match: a Parquet file's schema (from its
//! footer, which the listing's statistics read has just cached), an NDJSON file's lines (JSON
//! has no schema to read; see `NdjsonCheck`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::Statistics;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::{FileFormat, FileMeta};
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::{FileScanConfig, FileSinkConfig, FileSource};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::physical_expr::LexRequirement;
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;
use lakegate_catalogs::{CatalogError, Dataset, FileFormat as Stored, NdjsonCheck};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::parquet_to_arrow_schema;

/// Most paths remembered as checked; past it the memory starts again (each file is then
/// checked once more, from its cached footer).
const MAX_CHECKED: usize = 100_000;

/// What identifies one version of a file under its path: a file replaced under the same name
/// is checked again.
type Version = (u64, i64, Option<String>);

fn modified_nanos(meta: &ObjectMeta) -> i64 {
    meta.last_modified.timestamp_nanos_opt().unwrap_or(i64::MIN)
}

fn version(meta: &ObjectMeta) -> Version {
    (meta.size, modified_nanos(meta), meta.e_tag.clone())
}

/// A file that breaks its dataset's contract. Its `Display` (the file and the difference) is
/// for the server's log; the caller hears only which dataset (see `EngineError::OffContract`).
#[derive(Debug, thiserror::Error)]
#[error("{path} does not match the catalog's schema of {dataset}: {reason}")]
pub(crate) struct OffContract {
    pub dataset: String,
    pub path: String,
    pub reason: String,
}

/// A file format reading only files that keep the catalog's contract for `dataset`.
#[derive(Debug)]
pub(crate) struct ContractFormat {
    inner: Arc<dyn FileFormat>,
    dataset: Dataset,
    expected: SchemaRef,
    /// The version of each path last found to keep the contract.
    checked: Mutex<HashMap<Path, Version>>,
    /// The data keys of a dataset encrypted at rest, to read its footers.
    keys: Option<Arc<crate::encrypted::LakeKeys>>,
}

impl ContractFormat {
    pub(crate) fn new(
        inner: Arc<dyn FileFormat>,
        dataset: &Dataset,
        keys: Option<Arc<crate::encrypted::LakeKeys>>,
    ) -> Self {
        Self {
            keys,
            inner,
            expected: dataset.schema(),
            dataset: dataset.clone(),
            checked: Mutex::new(HashMap::new()),
        }
    }

    fn is_checked(&self, meta: &ObjectMeta) -> bool {
        let checked = self.checked.lock().expect("not poisoned");
        checked
            .get(&meta.location)
            .is_some_and(|(size, modified, e_tag)| {
                *size == meta.size
                    && *modified == modified_nanos(meta)
                    && e_tag.as_deref() == meta.e_tag.as_deref()
            })
    }

    fn mark_checked(&self, meta: &ObjectMeta) {
        let mut checked = self.checked.lock().expect("not poisoned");
        if checked.len() >= MAX_CHECKED {
            checked.clear();
        }
        checked.insert(meta.location.clone(), version(meta));
    }

    async fn check(
        &self,
        state: &dyn Session,
        store: &dyn ObjectStore,
        meta: &ObjectMeta,
    ) -> DFResult<()> {
        if self.is_checked(meta) {
            return Ok(());
        }
        let off_contract = |e: CatalogError| {
            DataFusionError::External(Box::new(OffContract {
                dataset: self.dataset.name.clone(),
                path: meta.location.to_string(),
                reason: match e {
                    CatalogError::SchemaMismatch { reason, .. } => reason,
                    other => other.to_string(),
                },
            }))
        };
        match self.dataset.format {
            Stored::Parquet | Stored::Delta => {
                // The footer is in the runtime's metadata cache when the listing collected the
                // file's statistics (it always does here), so this reads nothing new.
                let decryption = match &self.keys {
                    Some(keys) => Some(keys.decryption(&self.dataset.name)?),
                    None => None,
                };
                let metadata = DFParquetMetadata::new(store, meta)
                    .with_decryption_properties(decryption)
                    .with_file_metadata_cache(Some(
                        state.runtime_env().cache_manager.get_file_metadata_cache(),
                    ))
                    .fetch_metadata()
                    .await?;
                let fm = metadata.file_metadata();
                let actual = parquet_to_arrow_schema(fm.schema_descr(), fm.key_value_metadata())?;
                self.dataset
                    .check_file_schema(&self.expected, &actual)
                    .map_err(off_contract)?;
            }
            Stored::Ndjson => {
                let mut check =
                    NdjsonCheck::new(&self.dataset, &self.expected).map_err(off_contract)?;
                // Streamed: whole lines go to the check, a line cut by a chunk waits for its end.
                let mut chunks = store.get(&meta.location).await?.into_stream();
                let mut partial: Vec<u8> = Vec::new();
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk?;
                    match chunk.iter().rposition(|b| *b == b'\n') {
                        Some(end) => {
                            partial.extend_from_slice(&chunk[..=end]);
                            check.lines(&partial).map_err(off_contract)?;
                            partial.clear();
                            partial.extend_from_slice(&chunk[end + 1..]);
                        }
                        None => partial.extend_from_slice(&chunk),
                    }
                }
                check.lines(&partial).map_err(off_contract)?;
                check.finish().map_err(off_contract)?;
            }
        }
        self.mark_checked(meta);
        Ok(())
    }
}

#[async_trait]
impl FileFormat for ContractFormat {
    fn get_ext(&self) -> String {
        self.inner.get_ext()
    }

    fn get_ext_with_compression(&self, c: &FileCompressionType) -> DFResult<String> {
        self.inner.get_ext_with_compression(c)
    }

    fn compression_type(&self) -> Option<FileCompressionType> {
        self.inner.compression_type()
    }

    async fn infer_schema(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        objects: &[ObjectMeta],
    ) -> DFResult<SchemaRef> {
        self.inner.infer_schema(state, store, objects).await
    }

    async fn infer_stats(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        object: &ObjectMeta,
    ) -> DFResult<Statistics> {
        self.inner
            .infer_stats(state, store, table_schema, object)
            .await
    }

    /// What the listing calls (the parquet format's single footer read): the ordering alone
    /// (`infer_ordering`, left to its default) is asked for only by the default of this.
    async fn infer_stats_and_ordering(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        object: &ObjectMeta,
    ) -> DFResult<FileMeta> {
        self.inner
            .infer_stats_and_ordering(state, store, table_schema, object)
            .await
    }

    /// Every file of the scan is checked (once per version) before the plan exists.
    async fn create_physical_plan(
        &self,
        state: &dyn Session,
        conf: FileScanConfig,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let store = state.runtime_env().object_store(&conf.object_store_url)?;
        for file in conf.file_groups.iter().flat_map(|g| g.iter()) {
            self.check(state, store.as_ref(), &file.object_meta).await?;
        }
        self.inner.create_physical_plan(state, conf).await
    }

    async fn create_writer_physical_plan(
        &self,
        input: Arc<dyn ExecutionPlan>,
        state: &dyn Session,
        conf: FileSinkConfig,
        order_requirements: Option<LexRequirement>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        self.inner
            .create_writer_physical_plan(input, state, conf, order_requirements)
            .await
    }

    fn file_source(&self, table_schema: TableSchema) -> Arc<dyn FileSource> {
        self.inner.file_source(table_schema)
    }
}
