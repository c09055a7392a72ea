//! Datasets encrypted at rest are decrypted at the scan, with keys that never leave the server.
//!
//! DataFusion's Parquet reader asks an encryption factory for each file's decryption
//! properties; [`LakeKeys`] is that factory. It holds, per encrypted dataset, the data keys the
//! server unwrapped with its keyring when it opened the lake (or reloaded the catalog), or why
//! it could not: a dataset whose keys are missing or wrong is refused by name at its scan while
//! every other dataset keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::config::{EncryptionFactoryOptions, TableParquetOptions};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::parquet_encryption::EncryptionFactory;
use lakegate_catalogs::{Catalog, Lake};
use object_store::path::Path;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;

/// The factory's name in the runtime's registry.
pub(crate) const FACTORY_ID: &str = "lakegate";
/// The factory option that names the dataset a scan reads.
const DATASET: &str = "dataset";

/// A scan of a dataset whose data keys the server does not have.
#[derive(Debug, thiserror::Error)]
#[error("dataset {dataset} cannot be decrypted: {reason}")]
pub(crate) struct Undecryptable {
    pub dataset: String,
    pub reason: String,
}

type Keys = Result<Arc<FileDecryptionProperties>, String>;

/// Each encrypted dataset's decryption properties, or why there are none.
#[derive(Default)]
pub(crate) struct LakeKeys {
    keys: RwLock<HashMap<String, Keys>>,
    /// Releases' keys, by their key name, unwrapped when a release is first read. Kept apart
    /// from the datasets' (which a catalog reload replaces whole).
    releases: RwLock<HashMap<String, Arc<FileDecryptionProperties>>>,
}

impl std::fmt::Debug for LakeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Dataset names only: key material never reaches a log line.
        let names: Vec<String> = match self.keys.read() {
            Ok(k) => k.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        f.debug_struct("LakeKeys")
            .field("datasets", &names)
            .finish()
    }
}

impl LakeKeys {
    /// Unwrap the data keys of every encrypted dataset in `catalog` with the lake's keyring and
    /// put them in force. The keyring file is read again first, so a catalog reload after
    /// `lakegate keys rotate` unwraps with the new master key. A dataset whose keys fail keeps
    /// the keys it was served with (rotation never changes a data key); one that never had
    /// them is logged, and refused at its scans.
    pub(crate) async fn refresh(&self, lake: &Lake, catalog: &Catalog) {
        let lake = match lake.keyring() {
            Some(ring) => match lakegate_catalogs::Keyring::load(ring.path()) {
                Ok(fresh) => lake.clone().with_keyring(fresh),
                Err(e) => {
                    tracing::warn!(error = %e, "keyring not read again; using the one loaded");
                    lake.clone()
                }
            },
            None => lake.clone(),
        };
        let previous = match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut keys = HashMap::new();
        for d in catalog.datasets.iter().filter(|d| d.encrypted) {
            let loaded = match lakegate_catalogs::keys::load(&lake, &d.name).await {
                Ok(k) => Ok(k.decryption()),
                Err(e) => match previous.get(&d.name) {
                    Some(Ok(held)) => {
                        tracing::warn!(
                            dataset = %d.name,
                            error = %e,
                            "data keys not unwrapped again; serving with the ones held"
                        );
                        Ok(Arc::clone(held))
                    }
                    _ => {
                        tracing::error!(
                            dataset = %d.name,
                            error = %e,
                            "encrypted dataset unavailable: queries that read it are refused"
                        );
                        Err(e.to_string())
                    }
                },
            };
            keys.insert(d.name.clone(), loaded);
        }
        match self.keys.write() {
            Ok(mut k) => *k = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
    }

    /// How to read the files of `dataset`.
    pub(crate) fn decryption(&self, dataset: &str) -> DFResult<Arc<FileDecryptionProperties>> {
        let keys = match self.keys.read() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        let undecryptable = |reason: String| {
            DataFusionError::External(Box::new(Undecryptable {
                dataset: dataset.to_string(),
                reason,
            }))
        };
        if let Some(k) = self.release(dataset) {
            return Ok(k);
        }
        match keys.get(dataset) {
            Some(Ok(k)) => Ok(Arc::clone(k)),
            Some(Err(reason)) => Err(undecryptable(reason.clone())),
            None => Err(undecryptable("the server has no data keys for it".into())),
        }
    }
}

impl LakeKeys {
    /// The held decryption properties of a release's files, by key name.
    pub(crate) fn release(&self, key_name: &str) -> Option<Arc<FileDecryptionProperties>> {
        let held = match self.releases.read() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        held.get(key_name).cloned()
    }

    pub(crate) fn hold_release(&self, key_name: &str, keys: Arc<FileDecryptionProperties>) {
        match self.releases.write() {
            Ok(mut k) => k.insert(key_name.to_string(), keys),
            Err(poisoned) => poisoned.into_inner().insert(key_name.to_string(), keys),
        };
    }
}

/// Parquet options that make a scan of `dataset` decrypt through the factory.
pub(crate) fn scan_options(dataset: &str) -> TableParquetOptions {
    let mut options = TableParquetOptions::default();
    options.crypto.factory_id = Some(FACTORY_ID.to_string());
    options.crypto.factory_options = EncryptionFactoryOptions {
        options: HashMap::from([(DATASET.to_string(), dataset.to_string())]),
    };
    options
}

#[async_trait]
impl EncryptionFactory for LakeKeys {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        _file_path: &Path,
    ) -> DFResult<Option<Arc<FileEncryptionProperties>>> {
        // Queries never write (COPY and DML are refused); ingest encrypts on its own path.
        Err(DataFusionError::NotImplemented(
            "writing encrypted files through a query".into(),
        ))
    }

    async fn get_file_decryption_properties(
        &self,
        config: &EncryptionFactoryOptions,
        _file_path: &Path,
    ) -> DFResult<Option<Arc<FileDecryptionProperties>>> {
        let dataset = config.options.get(DATASET).ok_or_else(|| {
            DataFusionError::Internal(format!("{FACTORY_ID} factory used without a dataset"))
        })?;
        self.decryption(dataset).map(Some)
    }
}
