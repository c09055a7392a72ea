//! Encryption at rest: master keys outside the lake wrap per-dataset data keys inside it.
//!
//! Curated Parquet of an encrypted dataset is written with Parquet modular encryption (AES-GCM,
//! footer encrypted), one data key per label class: `phi.direct` columns under one key,
//! `phi.quasi` columns under another, every other column and the footer under a third. Each
//! file's key metadata names only the dataset, the class and the key's number, never a key.
//!
//! The data keys are random, generated when the dataset is declared, and stored in the lake
//! (`catalog/keys/<dataset>.json`) wrapped with AES-256-GCM by a master key; the wrap's
//! associated data binds each wrapped key to its dataset, class and number, so a wrapped key
//! copied to another entry does not unwrap. Master keys live in a keyring file that the
//! operator keeps outside the lake (its path is configuration). Rotating the master key
//! re-wraps the data keys, so no data file is rewritten.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use parquet::encryption::encrypt::FileEncryptionProperties;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::{CatalogError, Dataset, Lake, Result};

/// The label classes that get a data key of their own; every other column shares the footer's.
const DIRECT: &str = "phi.direct";
const QUASI: &str = "phi.quasi";
const OTHER: &str = "other";
pub const KEY_CLASSES: [&str; 3] = [DIRECT, QUASI, OTHER];

/// Data keys are AES-256 keys, as are master keys.
const KEY_LEN: usize = 32;

/// Where a dataset's wrapped data keys live in the lake.
pub fn key_file(dataset: &str) -> Path {
    Path::from(format!("catalog/keys/{dataset}.json"))
}

fn keyring_error(path: &FsPath, reason: impl Into<String>) -> CatalogError {
    CatalogError::Keyring {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn keys_error(dataset: &str, reason: impl Into<String>) -> CatalogError {
    CatalogError::Keys {
        dataset: dataset.to_string(),
        reason: reason.into(),
    }
}

fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .expect("the operating system's random source works");
    key
}

/// The keyring file as stored: the active master key's name and every key by name (base64).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    active: String,
    keys: BTreeMap<String, String>,
}

/// Master keys, by name, and the one new wraps use. Never stored in the lake.
#[derive(Clone)]
pub struct Keyring {
    path: PathBuf,
    active: String,
    keys: BTreeMap<String, [u8; KEY_LEN]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: key material never reaches a log line.
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("active", &self.active)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A keyring "path" of the form `env:NAME` names an environment variable holding the keyring's
/// text instead of a file (a secret injected by the platform).
const FROM_ENV: &str = "env:";

fn env_name(path: &FsPath) -> Option<&str> {
    path.to_str()?.strip_prefix(FROM_ENV)
}

impl Keyring {
    /// Read a keyring file (TOML: `active = "NAME"` and a `[keys]` table of base64 keys), or,
    /// for `env:NAME`, the same text from the environment variable NAME.
    pub fn load(path: &FsPath) -> Result<Self> {
        let text = match env_name(path) {
            Some(var) => std::env::var(var).map_err(|_| {
                keyring_error(path, format!("environment variable {var} is not set"))
            })?,
            None => {
                std::fs::read_to_string(path).map_err(|e| keyring_error(path, e.to_string()))?
            }
        };
        let file: KeyringFile =
            toml::from_str(&text).map_err(|e| keyring_error(path, e.message().to_string()))?;
        let mut keys = BTreeMap::new();
        for (name, encoded) in file.keys {
            let bytes = B64
                .decode(encoded.trim())
                .map_err(|_| keyring_error(path, format!("key '{name}' is not base64")))?;
            let key: [u8; KEY_LEN] = bytes
                .try_into()
                .map_err(|_| keyring_error(path, format!("key '{name}' is not {KEY_LEN} bytes")))?;
            keys.insert(name, key);
        }
        if !keys.contains_key(&file.active) {
            return Err(keyring_error(
                path,
                format!("the active key '{}' is not in [keys]", file.active),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            active: file.active,
            keys,
        })
    }

    /// Read the keyring at `path`, or create it with one fresh master key if there is none
    /// (never for one from the environment).
    pub fn load_or_create(path: &FsPath) -> Result<Self> {
        if path.exists() || env_name(path).is_some() {
            return Self::load(path);
        }
        let mut ring = Self {
            path: path.to_path_buf(),
            active: String::new(),
            keys: BTreeMap::new(),
        };
        ring.add_active_key();
        ring.save()?;
        Ok(ring)
    }

    /// The file this keyring was read from.
    pub fn path(&self) -> &FsPath {
        &self.path
    }

    /// The name of the master key that new wraps use.
    pub fn active(&self) -> &str {
        &self.active
    }

    /// Add a fresh random master key and make it the active one; returns its name.
    pub fn add_active_key(&mut self) -> String {
        let base = format!("mk-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
        let mut name = base.clone();
        let mut n = 1;
        while self.keys.contains_key(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        self.keys.insert(name.clone(), random_key());
        self.active = name.clone();
        name
    }

    /// Drop every master key but the active one; returns the names dropped.
    pub fn retire_inactive(&mut self) -> Vec<String> {
        let retired: Vec<String> = self
            .keys
            .keys()
            .filter(|k| **k != self.active)
            .cloned()
            .collect();
        self.keys.retain(|k, _| *k == self.active);
        retired
    }

    /// Whether the keyring comes from an environment variable (and cannot be saved).
    pub fn from_environment(&self) -> bool {
        env_name(&self.path).is_some()
    }

    /// Write the keyring back to its file, readable by its owner only, replacing it whole.
    pub fn save(&self) -> Result<()> {
        if let Some(var) = env_name(&self.path) {
            return Err(keyring_error(
                &self.path,
                format!(
                    "it comes from the environment variable {var}: put new keys in the secret \
                     that sets it, then re-wrap with `lakegate keys rotate --no-new-key`"
                ),
            ));
        }
        let file = KeyringFile {
            active: self.active.clone(),
            keys: self
                .keys
                .iter()
                .map(|(k, v)| (k.clone(), B64.encode(v)))
                .collect(),
        };
        let text = format!(
            "# Lakegate master keys. Keep this file outside the lake, readable by the server only.\n{}",
            toml::to_string(&file).map_err(|e| keyring_error(&self.path, e.to_string()))?
        );
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| keyring_error(&self.path, e.to_string()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)
            .map_err(|e| keyring_error(&self.path, e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| keyring_error(&self.path, e.to_string()))?;
        }
        std::io::Write::write_all(&mut tmp, text.as_bytes())
            .map_err(|e| keyring_error(&self.path, e.to_string()))?;
        tmp.persist(&self.path)
            .map_err(|e| keyring_error(&self.path, e.to_string()))?;
        Ok(())
    }

    fn cipher(&self, dataset: &str, name: &str) -> Result<LessSafeKey> {
        let key = self.keys.get(name).ok_or_else(|| {
            keys_error(
                dataset,
                format!(
                    "its data keys are wrapped by master key '{name}', which the keyring {} does not hold",
                    self.path.display()
                ),
            )
        })?;
        Ok(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"),
        ))
    }
}

/// One wrapped data key as stored in the lake.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedKey {
    class: String,
    id: u32,
    master_key: String,
    /// base64 of the nonce followed by the sealed key and its tag.
    wrapped: String,
}

/// A dataset's key file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    dataset: String,
    keys: Vec<WrappedKey>,
}

fn associated_data(dataset: &str, class: &str, id: u32) -> String {
    format!("lakegate-data-key:{dataset}:{class}:{id}")
}

/// What a file's key metadata says: which key of which dataset, never the key.
fn key_metadata(dataset: &str, class: &str, id: u32) -> Vec<u8> {
    format!("lakegate:{dataset}:{class}:{id}").into_bytes()
}

fn wrap(ring: &Keyring, dataset: &str, class: &str, id: u32, key: &[u8]) -> Result<WrappedKey> {
    let cipher = ring.cipher(dataset, &ring.active)?;
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the operating system's random source works");
    let mut sealed = key.to_vec();
    cipher
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data(dataset, class, id)),
            &mut sealed,
        )
        .map_err(|_| keys_error(dataset, "wrapping a data key failed"))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(WrappedKey {
        class: class.to_string(),
        id,
        master_key: ring.active.clone(),
        wrapped: B64.encode(out),
    })
}

fn unwrap(ring: &Keyring, dataset: &str, w: &WrappedKey) -> Result<Vec<u8>> {
    let cipher = ring.cipher(dataset, &w.master_key)?;
    let bytes = B64
        .decode(&w.wrapped)
        .map_err(|_| keys_error(dataset, "a wrapped data key is not base64"))?;
    if bytes.len() < NONCE_LEN {
        return Err(keys_error(dataset, "a wrapped data key is truncated"));
    }
    let (nonce, sealed) = bytes.split_at(NONCE_LEN);
    let mut sealed = sealed.to_vec();
    let key = cipher
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).expect("nonce length checked"),
            Aad::from(associated_data(dataset, &w.class, w.id)),
            &mut sealed,
        )
        .map_err(|_| {
            keys_error(
                dataset,
                format!(
                    "master key '{}' in the keyring does not unwrap its {} data key (a wrong key, \
                     or a key file that was changed)",
                    w.master_key, w.class
                ),
            )
        })?;
    if key.len() != KEY_LEN {
        return Err(keys_error(
            dataset,
            "an unwrapped data key has the wrong length",
        ));
    }
    Ok(key.to_vec())
}

/// A dataset's unwrapped data keys: the encryption and decryption properties of its files.
#[derive(Clone)]
pub struct DataKeys {
    dataset: String,
    /// class -> (number, key)
    by_class: HashMap<String, (u32, Vec<u8>)>,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeys")
            .field("dataset", &self.dataset)
            .finish_non_exhaustive()
    }
}

impl DataKeys {
    fn key(&self, class: &str) -> Result<&(u32, Vec<u8>)> {
        self.by_class
            .get(class)
            .ok_or_else(|| keys_error(&self.dataset, format!("no {class} data key")))
    }

    /// How a file of `dataset` is encrypted: each column under its label class's key, the
    /// footer under the `other` key.
    pub fn encryption(&self, dataset: &Dataset) -> Result<Arc<FileEncryptionProperties>> {
        self.encryption_of(
            dataset
                .columns
                .iter()
                .map(|c| (c.name.as_str(), c.label.as_str())),
        )
    }

    /// How a file with these (column, label) pairs is encrypted: each column under its label
    /// class's key, the footer under the `other` key.
    pub fn encryption_of<'a>(
        &self,
        columns: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Arc<FileEncryptionProperties>> {
        let (footer_id, footer_key) = self.key(OTHER)?;
        let mut builder = FileEncryptionProperties::builder(footer_key.clone())
            .with_footer_key_metadata(key_metadata(&self.dataset, OTHER, *footer_id));
        for (name, label) in columns {
            let class = match label {
                DIRECT => DIRECT,
                QUASI => QUASI,
                _ => OTHER,
            };
            let (id, key) = self.key(class)?;
            builder = builder.with_column_key_and_metadata(
                name,
                key.clone(),
                key_metadata(&self.dataset, class, *id),
            );
        }
        builder
            .build()
            .map_err(|e| keys_error(&self.dataset, e.to_string()))
    }

    /// How any file of the dataset is read: keys found by the metadata each file carries.
    pub fn decryption(&self) -> Arc<FileDecryptionProperties> {
        let retriever = Retriever {
            keys: self
                .by_class
                .iter()
                .map(|(class, (id, key))| (key_metadata(&self.dataset, class, *id), key.clone()))
                .collect(),
        };
        FileDecryptionProperties::with_key_retriever(Arc::new(retriever))
            .build()
            .expect("a key retriever is a complete decryption configuration")
    }
}

struct Retriever {
    keys: HashMap<Vec<u8>, Vec<u8>>,
}

impl KeyRetriever for Retriever {
    fn retrieve_key(&self, key_metadata: &[u8]) -> parquet::errors::Result<Vec<u8>> {
        self.keys.get(key_metadata).cloned().ok_or_else(|| {
            parquet::errors::ParquetError::General(
                "the file names a data key this dataset does not have".into(),
            )
        })
    }
}

fn keyring<'a>(lake: &'a Lake, dataset: &str) -> Result<&'a Keyring> {
    lake.keyring().ok_or_else(|| {
        keys_error(
            dataset,
            "it is encrypted at rest and no keyring is configured (--keyring or LAKEGATE_KEYRING)",
        )
    })
}

/// Generate a dataset's data keys and store them, wrapped by the active master key. Refuses if
/// the dataset already has keys: replacing them would make its files unreadable.
pub async fn create(lake: &Lake, dataset: &str) -> Result<DataKeys> {
    let ring = keyring(lake, dataset)?;
    let mut by_class = HashMap::new();
    let mut wrapped = Vec::new();
    for class in KEY_CLASSES {
        let key = random_key().to_vec();
        wrapped.push(wrap(ring, dataset, class, 1, &key)?);
        by_class.insert(class.to_string(), (1, key));
    }
    let file = KeyFile {
        dataset: dataset.to_string(),
        keys: wrapped,
    };
    let body = serde_json::to_vec_pretty(&file).expect("serializable");
    lake.store()
        .put_opts(
            &key_file(dataset),
            PutPayload::from(body),
            PutOptions::from(PutMode::Create),
        )
        .await
        .map_err(|e| match e {
            object_store::Error::AlreadyExists { .. } => {
                keys_error(dataset, "it already has data keys")
            }
            other => CatalogError::Store(other),
        })?;
    Ok(DataKeys {
        dataset: dataset.to_string(),
        by_class,
    })
}

async fn read_key_file(lake: &Lake, dataset: &str) -> Result<(KeyFile, UpdateVersion)> {
    let got = lake
        .store()
        .get(&key_file(dataset))
        .await
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => {
                keys_error(dataset, "its key file is missing from the lake's catalog")
            }
            other => CatalogError::Store(other),
        })?;
    let version = UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    let bytes = got.bytes().await?;
    let file: KeyFile = serde_json::from_slice(&bytes)
        .map_err(|e| keys_error(dataset, format!("its key file does not parse: {e}")))?;
    if file.dataset != dataset {
        return Err(keys_error(dataset, "its key file names another dataset"));
    }
    Ok((file, version))
}

/// Whether the lake holds a key file for `dataset`.
pub async fn exists(lake: &Lake, dataset: &str) -> Result<bool> {
    match lake.store().head(&key_file(dataset)).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Read and unwrap a dataset's data keys with the lake's keyring.
pub async fn load(lake: &Lake, dataset: &str) -> Result<DataKeys> {
    let ring = keyring(lake, dataset)?;
    let (file, _) = read_key_file(lake, dataset).await?;
    let mut by_class = HashMap::new();
    for w in &file.keys {
        let key = unwrap(ring, dataset, w)?;
        by_class.insert(w.class.clone(), (w.id, key));
    }
    for class in KEY_CLASSES {
        if !by_class.contains_key(class) {
            return Err(keys_error(
                dataset,
                format!("its key file has no {class} key"),
            ));
        }
    }
    Ok(DataKeys {
        dataset: dataset.to_string(),
        by_class,
    })
}

/// Re-wrap every data key of `dataset` under the keyring's active master key. Data files are
/// untouched. Returns how many keys were re-wrapped (0 when all already were).
pub async fn rewrap(lake: &Lake, dataset: &str) -> Result<usize> {
    let ring = keyring(lake, dataset)?;
    let (mut file, version) = read_key_file(lake, dataset).await?;
    let original = file.keys.clone();
    let mut changed = 0;
    for w in &mut file.keys {
        if w.master_key == ring.active {
            continue;
        }
        let key = unwrap(ring, dataset, w)?;
        *w = wrap(ring, dataset, &w.class, w.id, &key)?;
        changed += 1;
    }
    if changed > 0 {
        let body = serde_json::to_vec_pretty(&file).expect("serializable");
        // Conditional on the version read: a concurrent rotation makes this one fail, never
        // interleave. A local folder has no conditional update; there the file is compared
        // with the one read just before it is replaced.
        let store = lake.store();
        let conditional = store
            .put_opts(
                &key_file(dataset),
                PutPayload::from(body.clone()),
                PutOptions::from(PutMode::Update(version)),
            )
            .await;
        match conditional {
            Ok(_) => {}
            Err(object_store::Error::NotImplemented { .. }) => {
                let (now, _) = read_key_file(lake, dataset).await?;
                let unchanged = now
                    .keys
                    .iter()
                    .zip(&original)
                    .all(|(a, b)| a.wrapped == b.wrapped)
                    && now.keys.len() == original.len();
                if !unchanged {
                    return Err(keys_error(
                        dataset,
                        "its key file changed during the rotation (another rotation?); run it again",
                    ));
                }
                store
                    .put(&key_file(dataset), PutPayload::from(body))
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(changed)
}

/// The master keys that wrap some data key of `dataset`.
pub async fn master_keys_in_use(lake: &Lake, dataset: &str) -> Result<Vec<String>> {
    let (file, _) = read_key_file(lake, dataset).await?;
    let mut names: Vec<String> = file.keys.into_iter().map(|w| w.master_key).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_in(dir: &FsPath) -> Keyring {
        Keyring::load_or_create(&dir.join("keyring.toml")).unwrap()
    }

    /// A keyring in `dir` and a lake beside it opened with it.
    fn keyed_lake(dir: &FsPath) -> (Keyring, Lake) {
        let ring = ring_in(dir);
        let lake = Lake::open(dir.join("lake").to_str().unwrap())
            .unwrap()
            .with_keyring(ring.clone());
        (ring, lake)
    }

    #[tokio::test]
    async fn data_keys_unwrap_only_with_their_master_key_and_survive_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, lake) = keyed_lake(dir.path());
        let created = create(&lake, "clinical.patients").await.unwrap();
        let loaded = load(&lake, "clinical.patients").await.unwrap();
        assert_eq!(created.by_class, loaded.by_class);
        assert!(matches!(
            create(&lake, "clinical.patients").await,
            Err(CatalogError::Keys { .. })
        ));

        // Rotation: a new active key re-wraps, the data keys stay the same, the old key can go.
        let mut rotated = Keyring::load(ring.path()).unwrap();
        let old = rotated.active().to_string();
        rotated.add_active_key();
        let lake = lake.with_keyring(rotated.clone());
        assert_eq!(rewrap(&lake, "clinical.patients").await.unwrap(), 3);
        assert_eq!(rewrap(&lake, "clinical.patients").await.unwrap(), 0);
        assert_eq!(rotated.retire_inactive(), vec![old]);
        let lake = lake.with_keyring(rotated);
        assert_eq!(
            load(&lake, "clinical.patients").await.unwrap().by_class,
            created.by_class
        );

        // A keyring without the wrapping key names the dataset and the missing key.
        let other = Keyring::load_or_create(&dir.path().join("other.toml")).unwrap();
        let lake = lake.with_keyring(other);
        let err = load(&lake, "clinical.patients")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clinical.patients") && err.contains("does not hold"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_wrapped_key_moved_to_another_class_does_not_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let (_, lake) = keyed_lake(dir.path());
        create(&lake, "clinical.patients").await.unwrap();
        let (mut file, _) = read_key_file(&lake, "clinical.patients").await.unwrap();
        let direct = file.keys.iter().position(|w| w.class == DIRECT).unwrap();
        let quasi = file.keys.iter().position(|w| w.class == QUASI).unwrap();
        let moved = file.keys[direct].wrapped.clone();
        file.keys[quasi].wrapped = moved;
        lake.store()
            .put(
                &key_file("clinical.patients"),
                PutPayload::from(serde_json::to_vec(&file).unwrap()),
            )
            .await
            .unwrap();
        let err = load(&lake, "clinical.patients")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not unwrap"), "{err}");
    }

    #[tokio::test]
    async fn a_keyring_from_the_environment_unwraps_what_its_file_twin_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, lake) = keyed_lake(dir.path());
        let created = create(&lake, "clinical.patients").await.unwrap();
        let var = "LAKEGATE_TEST_KEYRING_FROM_ENV";
        let env = FsPath::new("env:LAKEGATE_TEST_KEYRING_FROM_ENV");
        assert!(Keyring::load(env)
            .unwrap_err()
            .to_string()
            .contains("is not set"));
        // This test alone sets the variable, and reads it back before it returns.
        std::env::set_var(var, std::fs::read_to_string(ring.path()).unwrap());
        let from_env = Keyring::load_or_create(env).unwrap();
        assert!(from_env.from_environment());
        assert!(from_env.save().unwrap_err().to_string().contains(var));
        let lake = lake.with_keyring(from_env);
        assert_eq!(
            load(&lake, "clinical.patients").await.unwrap().by_class,
            created.by_class
        );
        std::env::remove_var(var);
    }

    #[test]
    fn a_keyring_that_is_not_one_is_refused_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        for (text, expected) in [
            ("active = \"a\"\n[keys]\na = \"!!\"\n", "not base64"),
            ("active = \"a\"\n[keys]\na = \"AAAA\"\n", "not 32 bytes"),
            ("active = \"b\"\n[keys]\n", "not in [keys]"),
            ("nonsense", ""),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Keyring::load(&path).unwrap_err().to_string();
            assert!(err.contains("k.toml") && err.contains(expected), "{err}");
        }
    }
}
