//! Opening a lake through object_store's own backends.

use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::{CatalogError, Result};

/// The size, modification time and entity tag of the lake's catalog document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogStamp(object_store::ObjectMeta);

/// A lake: one object store, rooted at the lake's top folder.
///
/// All paths inside Lakegate are relative to this root (`curated/clinical/patients/...`), so
/// the same catalog works whether the lake is a local folder or a bucket.
#[derive(Clone, Debug)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// Master keys for datasets encrypted at rest: held in memory, never stored in the lake.
    keyring: Option<Arc<crate::Keyring>>,
}

impl Lake {
    /// Open a lake from a local path or a URL understood by object_store
    /// (`file://`, `s3://`, `gs://`, `az://`, `abfss://`, `memory://`).
    ///
    /// Cloud credentials and options are read from the environment exactly as object_store's
    /// builders read them (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `AZURE_STORAGE_ACCOUNT_NAME`, ...). A local path that does not exist yet is created.
    pub fn open(location: &str) -> Result<Self> {
        let invalid = |reason: String| CatalogError::InvalidLakeUrl {
            url: location.to_string(),
            reason,
        };
        let looks_like_url = location.contains("://");
        if !looks_like_url || location.starts_with("file://") {
            let path = if looks_like_url {
                Url::parse(location)
                    .map_err(|e| invalid(e.to_string()))?
                    .to_file_path()
                    .map_err(|_| invalid("not a local file URL".into()))?
            } else {
                std::path::PathBuf::from(location)
            };
            std::fs::create_dir_all(&path).map_err(|e| invalid(e.to_string()))?;
            let path = path.canonicalize().map_err(|e| invalid(e.to_string()))?;
            let store = LocalFileSystem::new_with_prefix(&path)?;
            return Ok(Self {
                keyring: None,
                store: Arc::new(store),
                url: Url::from_directory_path(&path)
                    .map(|u| u.to_string())
                    .unwrap_or_else(|_| path.display().to_string()),
            });
        }
        let url = Url::parse(location).map_err(|e| invalid(e.to_string()))?;
        let (store, prefix) = object_store::parse_url_opts(&url, std::env::vars())?;
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(store)
        } else {
            let store: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(store, prefix.clone()));
            Arc::new(crate::store::LakeStore::prefixed(store, prefix))
        };
        Ok(Self {
            store,
            url: location.to_string(),
            keyring: None,
        })
    }

    /// The lake rooted at `store` (as the engine holds it).
    pub fn with_store(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            url: "lake:///".into(),
            keyring: None,
        }
    }

    /// An in-memory lake, for tests.
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(object_store::memory::InMemory::new()),
            url: "memory:///".into(),
            keyring: None,
        }
    }

    /// The same lake, reading and writing encrypted datasets with `keyring`'s master keys.
    pub fn with_keyring(mut self, keyring: crate::Keyring) -> Self {
        self.keyring = Some(Arc::new(keyring));
        self
    }

    /// The master keys this lake handle was given, if any.
    pub fn keyring(&self) -> Option<&crate::Keyring> {
        self.keyring.as_deref()
    }

    /// The lake's folder when it is a local one.
    pub fn local_root(&self) -> Option<std::path::PathBuf> {
        Url::parse(&self.url).ok()?.to_file_path().ok()
    }

    /// The object store rooted at the lake's top folder.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// The URL the lake was opened from (for operators' logs; never sent to clients).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which version of the catalog document the lake holds now: equal stamps, the same
    /// document (a server polls it to reload a changed catalog).
    pub async fn catalog_stamp(&self) -> Result<CatalogStamp> {
        let meta = self
            .store
            .head(&Path::from(crate::model::CATALOG_PATH))
            .await?;
        Ok(CatalogStamp(meta))
    }

    /// Whether the lake already holds a catalog.
    pub async fn has_catalog(&self) -> Result<bool> {
        match self
            .store
            .head(&Path::from(crate::model::CATALOG_PATH))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
