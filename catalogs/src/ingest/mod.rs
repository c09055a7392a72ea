//! Ingestion: incoming files land unchanged in `raw/`, rows that keep the dataset's contract
//! become curated Parquet, the rest go to `quarantine/` with the rule they broke.
//!
//! One ingest runs per dataset at a time (a lock object, created only if absent). Each file
//! is checksummed first: a file whose checksum an earlier version committed adds nothing.
//! Rows are decoded, checked and written batch by batch into new Parquet files of the
//! dataset's Delta table, so memory stays bounded whatever the file's size. Only when every
//! file of the feed is readable and the share of quarantined rows is within
//! `max_reject_ratio` is the feed committed, as one new version of the table whose commit
//! names each source, its checksum, its counts and the principal: the lineage that
//! `catalog history` shows. Files written for a feed that is refused or interrupted are
//! never in a version, so no reader sees them.

mod check;
pub mod decode;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::DeltaTable;
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use self::check::Checker;
pub use self::check::KeyCache;
use self::decode::{Chunk, FileProblem, SourceFormat};
use crate::delta::delta_error;
use crate::{Catalog, CatalogError, Dataset, FileFormat, Lake, Result};

/// A lock older than this is taken to be left by a crashed ingest and is taken over.
const LOCK_TTL: Duration = Duration::from_secs(3600);

/// How an ingest runs.
#[derive(Clone)]
pub struct IngestOptions {
    /// Who ingests (recorded in each commit record).
    pub principal: String,
    /// The largest share of quarantined rows (0 to 1) a feed may have and still be committed.
    pub max_reject_ratio: f64,
    /// Bytes read so far across the feed (for a progress bar).
    pub progress: Arc<AtomicU64>,
    /// Key sets of referenced datasets to share with other feeds of this process.
    pub key_cache: Option<Arc<KeyCache>>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            principal: "unknown".into(),
            max_reject_ratio: 0.05,
            progress: Arc::default(),
            key_cache: None,
        }
    }
}

/// What became of one file of a feed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum FileOutcome {
    /// Checked and committed (or staged, if the feed as a whole was refused).
    Checked {
        rows: u64,
        accepted: u64,
        quarantined: u64,
    },
    /// This file (same checksum) was committed by an earlier version.
    AlreadyIngested,
    /// The file as a whole is not readable as its format or does not have the contract's
    /// columns; it is quarantined with this reason.
    Quarantined { reason: String },
}

/// One file of a feed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileReport {
    pub source: String,
    pub sha256: String,
    pub bytes: u64,
    #[serde(flatten)]
    pub outcome: FileOutcome,
}

/// What an ingest did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IngestReport {
    pub dataset: String,
    pub files: Vec<FileReport>,
    pub rows_read: u64,
    pub accepted: u64,
    pub quarantined: u64,
    /// Failures by rule name (a row that breaks two rules counts under both).
    pub by_rule: BTreeMap<String, u64>,
    /// Why the feed was refused as a whole (nothing committed), if it was.
    pub refused: Option<String>,
    /// The dataset version the feed committed, if it committed one.
    pub version: Option<u64>,
    /// The OpenLineage run event of the commit (also stored in the lake's `lineage/` zone).
    #[serde(skip)]
    pub lineage: Option<serde_json::Value>,
}

impl IngestReport {
    /// The summary line: `N rows read, A accepted, Q quarantined`.
    pub fn summary(&self) -> String {
        format!(
            "{} rows read, {} accepted, {} quarantined",
            self.rows_read, self.accepted, self.quarantined
        )
    }
}

/// What a version's commit says about one source file: the lineage of the dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub source: String,
    pub sha256: String,
    pub bytes: u64,
    pub format: String,
    /// The unchanged copy in the lake's `raw/` zone.
    pub raw: String,
    pub rows: u64,
    pub accepted: u64,
    pub quarantined: u64,
}

/// What Lakegate writes into the commit of each version it makes (`commitInfo.lakegate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub principal: String,
    pub sources: Vec<SourceRecord>,
}

/// One version of a dataset as `catalog history` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub version: u64,
    /// Milliseconds since 1970 (UTC).
    pub timestamp: Option<i64>,
    pub operation: Option<String>,
    /// Set for versions Lakegate's ingest committed.
    pub ingest: Option<CommitRecord>,
}

/// Every version of a dataset, oldest first.
pub async fn history(lake: &Lake, dataset: &str) -> Result<Vec<HistoryEntry>> {
    let catalog = Catalog::load(lake).await?;
    let d = catalog
        .dataset(dataset)
        .ok_or_else(|| CatalogError::UnknownDataset(dataset.to_string()))?;
    if d.format != FileFormat::Delta {
        return Ok(Vec::new());
    }
    Ok(crate::delta::history(lake, d)
        .await?
        .into_iter()
        .map(|v| HistoryEntry {
            version: v.version,
            timestamp: v.timestamp,
            operation: v.operation,
            ingest: v.lakegate.and_then(|l| serde_json::from_value(l).ok()),
        })
        .collect())
}

/// Ingest `sources` (local paths or URLs an object store reads) into `dataset`.
pub async fn ingest(
    lake: &Lake,
    dataset: &str,
    sources: &[String],
    options: &IngestOptions,
) -> Result<IngestReport> {
    let catalog = Catalog::load(lake).await?;
    let d = catalog
        .dataset(dataset)
        .ok_or_else(|| CatalogError::UnknownDataset(dataset.to_string()))?
        .clone();
    if d.format != FileFormat::Delta || d.name == crate::AUDIT_DATASET {
        return Err(CatalogError::NotIngestible {
            dataset: d.name,
            reason: "ingest writes versioned (Delta) datasets, declared with `lakegate catalog \
                     add --contract FILE`; this one is plain files"
                .into(),
        });
    }
    if !(0.0..=1.0).contains(&options.max_reject_ratio) {
        return Err(CatalogError::NotIngestible {
            dataset: d.name,
            reason: "--max-reject-ratio must be between 0 and 1".into(),
        });
    }
    let lock = Lock::acquire(lake, &d.name, &options.principal).await?;
    let result = match Feed::new(lake, &catalog, &d, options).await {
        Ok(mut feed) => feed.run(sources).await,
        Err(e) => Err(e),
    };
    let released = lock.release().await;
    let report = result?;
    released?;
    Ok(report)
}

/// The per-dataset lock: one ingest at a time, so `unique` holds across concurrent feeds.
struct Lock {
    store: Arc<dyn ObjectStore>,
    path: Path,
}

#[derive(Serialize, Deserialize)]
struct LockBody {
    principal: String,
    since: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Lock {
    async fn acquire(lake: &Lake, dataset: &str, principal: &str) -> Result<Self> {
        let store = lake.store();
        let path = Path::from(format!("catalog/locks/{dataset}.json"));
        let body = serde_json::to_vec(&LockBody {
            principal: principal.into(),
            since: now_secs(),
        })
        .expect("serializable");
        for _ in 0..2 {
            let put = store
                .put_opts(
                    &path,
                    PutPayload::from(body.clone()),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match put {
                Ok(_) => return Ok(Self { store, path }),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let held = store.get(&path).await?.bytes().await?;
                    let since = serde_json::from_slice::<LockBody>(&held)
                        .map(|b| b.since)
                        .unwrap_or(0);
                    if now_secs().saturating_sub(since) < LOCK_TTL.as_secs() {
                        return Err(CatalogError::Busy {
                            dataset: dataset.into(),
                            since: format!("{since} (seconds since 1970, UTC)"),
                        });
                    }
                    // Left by a crashed ingest: remove it and try once more (a racing taker
                    // that creates it first wins, the other is told the dataset is busy).
                    store.delete(&path).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CatalogError::Busy {
            dataset: dataset.into(),
            since: "just now".into(),
        })
    }

    /// Remove the lock (one left behind by a failure here expires after `LOCK_TTL`).
    async fn release(self) -> Result<()> {
        self.store.delete(&self.path).await?;
        Ok(())
    }
}

/// A file of the feed, readable on the local disk.
struct Local {
    name: String,
    path: PathBuf,
    _download: Option<tempfile::TempPath>,
}

struct Feed<'a> {
    lake: &'a Lake,
    store: Arc<dyn ObjectStore>,
    lake_url: String,
    dataset: &'a Dataset,
    options: &'a IngestOptions,
    /// Lent to the reading thread while a file is read.
    checker: Option<Checker>,
    table: DeltaTable,
    writer: Option<RecordBatchWriter>,
    /// The dataset's data keys, when it is encrypted at rest: a Parquet extract sealed with
    /// them (so that it lands in `raw/` sealed) is read with them.
    decryption: Option<Arc<parquet::encryption::decrypt::FileDecryptionProperties>>,
    /// Checksums of the sources earlier versions committed.
    committed: std::collections::HashSet<String>,
    sources: Vec<SourceRecord>,
    report: IngestReport,
}

impl<'a> Feed<'a> {
    async fn new(
        lake: &'a Lake,
        catalog: &Catalog,
        dataset: &'a Dataset,
        options: &'a IngestOptions,
    ) -> Result<Self> {
        let store = lake.store();
        let table = crate::delta::open(lake, dataset, None).await?;
        let committed = crate::delta::history(lake, dataset)
            .await?
            .into_iter()
            .filter_map(|v| v.lakegate)
            .filter_map(|l| serde_json::from_value::<CommitRecord>(l).ok())
            .flat_map(|c| c.sources.into_iter().map(|s| s.sha256))
            .collect();
        let mut props = WriterProperties::builder().set_compression(Compression::SNAPPY);
        let mut decryption = None;
        if dataset.encrypted {
            let keys = crate::keys::load(lake, &dataset.name).await?;
            props = props.with_file_encryption_properties(keys.encryption(dataset)?);
            decryption = Some(keys.decryption());
        }
        let props = props.build();
        let writer = RecordBatchWriter::for_table(&table)
            .map_err(delta_error(dataset))?
            .with_writer_properties(props);
        let checker = Checker::new(catalog, dataset, lake, options.key_cache.as_deref()).await?;
        Ok(Self {
            lake,
            store,
            lake_url: lake.url().to_string(),
            dataset,
            options,
            checker: Some(checker),
            table,
            writer: Some(writer),
            decryption,
            committed,
            sources: Vec::new(),
            report: IngestReport {
                dataset: dataset.name.clone(),
                ..Default::default()
            },
        })
    }

    fn zone_path(&self, zone: &str, rest: &str) -> Path {
        let q = self.dataset.qualified();
        Path::from(format!("{zone}/{}/{}/{rest}", q.schema, q.table))
    }

    async fn run(&mut self, sources: &[String]) -> Result<IngestReport> {
        let mut seen = std::collections::HashSet::new();
        for source in sources {
            let local = fetch(source).await?;
            let (sha256, bytes) = checksum(&local.path)?;
            let mut report = FileReport {
                source: local.name.clone(),
                sha256: sha256.clone(),
                bytes,
                outcome: FileOutcome::AlreadyIngested,
            };
            if !seen.insert(sha256.clone()) || self.committed.contains(&sha256) {
                self.options.progress.fetch_add(bytes, Ordering::Relaxed);
                self.report.files.push(report);
                continue;
            }
            let raw = self.zone_path("raw", &format!("{sha256}/{}", local.name));
            // The raw copy runs beside the checks; the file counts as landed (and the feed can
            // commit) only once both are done.
            let copying = tokio::spawn(upload(
                self.store.clone(),
                self.lake.local_root(),
                local.path.clone(),
                raw.clone(),
            ));
            let before = self.options.progress.load(Ordering::Relaxed);
            let outcome = self.process(&local, &sha256, bytes, &raw).await;
            let copied = copying.await.map_err(|e| CatalogError::Source {
                path: local.name.clone(),
                reason: format!("the copy into raw/ stopped: {e}"),
            })?;
            report.outcome = outcome?;
            copied?;
            self.options
                .progress
                .store(before + bytes, Ordering::Relaxed);
            self.report.files.push(report);
        }
        self.decide().await?;
        Ok(std::mem::take(&mut self.report))
    }

    async fn process(
        &mut self,
        local: &Local,
        sha256: &str,
        bytes: u64,
        raw: &Path,
    ) -> Result<FileOutcome> {
        let Some(format) = SourceFormat::from_name(&local.name) else {
            let reason = "not a .csv, .jsonl/.ndjson/.json or .parquet file name".to_string();
            return self.quarantine_file(local, sha256, raw, reason).await;
        };
        let rejects = self.zone_path("quarantine", &format!("{sha256}/rows.jsonl"));
        let read = Arc::new(AtomicU64::new(0));
        let keys = self.decryption.clone();
        let decoder = match decode::open(format, &local.path, self.dataset, keys, Arc::clone(&read))
        {
            Ok(d) => d,
            Err(FileProblem(reason)) => {
                return self.quarantine_file(local, sha256, raw, reason).await
            }
        };
        // Three stages, each on its own thread: one decodes, one checks (in file order, so
        // the first of two duplicates is the one kept), and this task encodes and writes the
        // accepted rows. The bounded channels keep memory bounded.
        let (decoded, to_check) = std::sync::mpsc::sync_channel(2);
        let (sender, mut batches) = tokio::sync::mpsc::channel(2);
        let decoding = tokio::task::spawn_blocking(move || {
            let mut decoder = decoder;
            loop {
                let next = decoder.next_chunk().transpose();
                let stop = !matches!(next, Some(Ok(_)));
                if let Some(next) = next {
                    if decoded.send(next).is_err() {
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
        });
        let mut checker = self.checker.take().expect("one file at a time");
        let decoded_bytes = Arc::clone(&read);
        let reading = tokio::task::spawn_blocking(move || {
            let mut first = true;
            while let Ok(next) = to_check.recv() {
                let next = next.map(|mut chunk: Chunk| {
                    if std::mem::take(&mut first) {
                        // Key sets sized once for the whole file, from the first chunk's
                        // bytes per row, rather than regrown as it is read.
                        let done = decoded_bytes.load(Ordering::Relaxed).max(1);
                        let rows = u128::from(bytes) * chunk.rows.len() as u128 / u128::from(done);
                        checker.expect_rows(rows.min(u128::from(bytes / 2)) as usize);
                    }
                    checker.check(&mut chunk);
                    chunk
                });
                let stop = next.is_err();
                if sender.blocking_send(next).is_err() || stop {
                    break;
                }
            }
            checker
        });
        // Opened at the first rejected row: a clean file leaves no trace in `quarantine/`.
        let mut quarantine: Option<BufWriter> = None;
        let (mut rows, mut accepted, mut quarantined) = (0u64, 0u64, 0u64);
        let base = self.options.progress.load(Ordering::Relaxed);
        let mut problem = None;
        let mut failed = None;
        while let Some(next) = batches.recv().await {
            let chunk = match next {
                Ok(chunk) => chunk,
                Err(FileProblem(reason)) => {
                    problem = Some(reason);
                    break;
                }
            };
            rows += chunk.rows.len() as u64;
            let written = async {
                let (ok, lines) = self.split(&chunk, &local.name, raw)?;
                accepted += ok.num_rows() as u64;
                quarantined += chunk.rows.len() as u64 - ok.num_rows() as u64;
                if ok.num_rows() > 0 {
                    let writer = self
                        .writer
                        .as_mut()
                        .expect("the writer lives until the verdict");
                    writer.write(ok).await.map_err(delta_error(self.dataset))?;
                }
                if !lines.is_empty() {
                    quarantine
                        .get_or_insert_with(|| {
                            BufWriter::new(Arc::clone(&self.store), rejects.clone())
                        })
                        .put(lines.into())
                        .await?;
                }
                Ok::<_, CatalogError>(())
            }
            .await;
            if let Err(e) = written {
                failed = Some(e);
                break;
            }
            self.options
                .progress
                .store(base + read.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        drop(batches);
        let stopped = |e: tokio::task::JoinError| CatalogError::Source {
            path: local.name.clone(),
            reason: format!("the reading thread stopped: {e}"),
        };
        self.checker = Some(reading.await.map_err(stopped)?);
        decoding.await.map_err(stopped)?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(mut quarantine) = quarantine {
            quarantine
                .shutdown()
                .await
                .map_err(|e| CatalogError::Source {
                    path: rejects.to_string(),
                    reason: e.to_string(),
                })?;
        }
        let problem = problem.or_else(|| (rows == 0).then(|| "the file holds no rows".to_string()));
        if let Some(reason) = problem {
            return self.quarantine_file(local, sha256, raw, reason).await;
        }
        self.report.rows_read += rows;
        self.report.accepted += accepted;
        self.report.quarantined += quarantined;
        self.sources.push(SourceRecord {
            source: local.name.clone(),
            sha256: sha256.into(),
            bytes,
            format: format!("{format:?}").to_lowercase(),
            raw: raw.to_string(),
            rows,
            accepted,
            quarantined,
        });
        Ok(FileOutcome::Checked {
            rows,
            accepted,
            quarantined,
        })
    }

    /// The rows of a chunk that passed (in the dataset's schema) and the quarantine lines of
    /// those that did not.
    fn split(&mut self, chunk: &Chunk, source: &str, raw: &Path) -> Result<(RecordBatch, Vec<u8>)> {
        let keep: BooleanArray = chunk.failures.iter().map(|f| Some(f.is_empty())).collect();
        let ok = filter_record_batch(&chunk.batch, &keep)
            .and_then(|b| RecordBatch::try_new(self.dataset.schema(), b.columns().to_vec()))
            .map_err(|e| CatalogError::NotIngestible {
                dataset: self.dataset.name.clone(),
                reason: e.to_string(),
            })?;
        let mut lines = Vec::new();
        for (row, failures) in chunk.rows.iter().zip(&chunk.failures) {
            for f in failures {
                *self.report.by_rule.entry(f.rule.to_string()).or_default() += 1;
            }
            if failures.is_empty() {
                continue;
            }
            let failed: Vec<_> = failures
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "column": f.column.map(|c| self.dataset.columns[c].name.as_str()),
                        "rule": f.rule,
                        "reason": f.reason,
                    })
                })
                .collect();
            let line = serde_json::json!({
                "file": source,
                "raw": raw.as_ref(),
                "row": row,
                "failed": failed,
            });
            serde_json::to_writer(&mut lines, &line).expect("serializable");
            lines.push(b'\n');
        }
        Ok((ok, lines))
    }

    async fn quarantine_file(
        &mut self,
        local: &Local,
        sha256: &str,
        raw: &Path,
        reason: String,
    ) -> Result<FileOutcome> {
        let path = self.zone_path("quarantine", &format!("{sha256}/file.json"));
        let body = serde_json::json!({
            "file": local.name,
            "raw": raw.as_ref(),
            "sha256": sha256,
            "reason": reason,
            "at": now_secs(),
        });
        let json = serde_json::to_vec_pretty(&body).expect("json");
        self.store.put(&path, PutPayload::from(json)).await?;
        *self.report.by_rule.entry("file".into()).or_default() += 1;
        Ok(FileOutcome::Quarantined { reason })
    }

    /// Commit the feed as one version, or nothing: a feed with a quarantined file or more
    /// rejects than allowed is refused as a whole, and the files written for it are removed.
    async fn decide(&mut self) -> Result<()> {
        let whole = self
            .report
            .files
            .iter()
            .filter(|f| matches!(f.outcome, FileOutcome::Quarantined { .. }))
            .count();
        let ratio = if self.report.rows_read == 0 {
            0.0
        } else {
            self.report.quarantined as f64 / self.report.rows_read as f64
        };
        self.report.refused = if whole > 0 {
            Some(format!("{whole} file(s) quarantined as a whole"))
        } else if ratio > self.options.max_reject_ratio {
            Some(format!(
                "{:.2}% of rows quarantined, above --max-reject-ratio {}",
                ratio * 100.0,
                self.options.max_reject_ratio
            ))
        } else {
            None
        };
        let mut writer = self.writer.take().expect("one verdict per feed");
        if self.report.refused.is_some() || self.sources.is_empty() {
            // Never in a version, so never read; removed so that they do not linger.
            let table_root = self.dataset.location.trim_end_matches('/');
            for add in writer.flush().await.map_err(delta_error(self.dataset))? {
                let path = Path::from(format!("{table_root}/{}", add.path));
                self.store.delete(&path).await?;
            }
            return Ok(());
        }
        let record = CommitRecord {
            principal: self.options.principal.clone(),
            sources: std::mem::take(&mut self.sources),
        };
        let metadata = serde_json::to_value(&record).expect("serializable");
        let sources = record.sources.clone();
        let mut writer = writer.with_commit_properties(
            CommitProperties::default().with_metadata([("lakegate".to_string(), metadata)]),
        );
        let version = writer
            .flush_and_commit(&mut self.table)
            .await
            .map_err(delta_error(self.dataset))?;
        self.report.version = Some(version);
        if let (Some(cache), Some(checker)) = (&self.options.key_cache, self.checker.take()) {
            checker
                .keep_unique_keys(self.lake, self.dataset, cache)
                .await?;
        }
        let event = openlineage_event(&self.lake_url, self.dataset, version, &sources);
        let path = Path::from(format!(
            "lineage/openlineage/{}/v{version:020}.json",
            self.dataset.name
        ));
        let json = serde_json::to_vec_pretty(&event).expect("serializable");
        self.store.put(&path, PutPayload::from(json)).await?;
        self.report.lineage = Some(event);
        Ok(())
    }
}

async fn exists(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<bool> {
    match store.head(path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Who produced the lineage events (OpenLineage's `producer`).
const PRODUCER: &str = concat!(
    "https://github.com/lakegate/lakegate/tree/v",
    env!("CARGO_PKG_VERSION")
);

/// The OpenLineage run event (spec 2-0-2) of one committed version: the raw copies of the
/// sources as inputs, the dataset at its new version as output.
fn openlineage_event(
    lake_url: &str,
    dataset: &Dataset,
    version: u64,
    sources: &[SourceRecord],
) -> serde_json::Value {
    use serde_json::json;
    let facet = |schema: &str| {
        json!({
            "_producer": PRODUCER,
            "_schemaURL": schema,
        })
    };
    let with = |mut base: serde_json::Value, extra: serde_json::Value| {
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        base
    };
    let inputs: Vec<_> = sources
        .iter()
        .map(|s| {
            json!({
                "namespace": lake_url,
                "name": s.raw,
                "facets": {
                    "lakegate_source": with(
                        facet("https://lakegate.dev/spec/facets/SourceFileFacet.json"),
                        json!({
                            "file": s.source,
                            "sha256": s.sha256,
                            "bytes": s.bytes,
                            "format": s.format,
                            "rows": s.rows,
                            "accepted": s.accepted,
                            "quarantined": s.quarantined,
                        }),
                    ),
                },
            })
        })
        .collect();
    let fields: Vec<_> = dataset
        .columns
        .iter()
        .map(|c| json!({ "name": c.name, "type": c.data_type.name(), "description": c.label }))
        .collect();
    let accepted: u64 = sources.iter().map(|s| s.accepted).sum();
    json!({
        "eventType": "COMPLETE",
        "eventTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "producer": PRODUCER,
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
        "run": { "runId": uuid::Uuid::new_v4().to_string() },
        "job": { "namespace": "lakegate", "name": format!("ingest.{}", dataset.name) },
        "inputs": inputs,
        "outputs": [{
            "namespace": lake_url,
            "name": dataset.name,
            "facets": {
                "version": with(
                    facet("https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet"),
                    json!({ "datasetVersion": version.to_string() }),
                ),
                "schema": with(
                    facet("https://openlineage.io/spec/facets/1-1-1/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet"),
                    json!({ "fields": fields }),
                ),
            },
            "outputFacets": {
                "outputStatistics": with(
                    facet("https://openlineage.io/spec/facets/1-0-2/OutputStatisticsOutputDatasetFacet.json#/$defs/OutputStatisticsOutputDatasetFacet"),
                    json!({ "rowCount": accepted }),
                ),
            },
        }],
    })
}

/// A source on the local disk, or downloaded to a temporary file from its object store.
async fn fetch(source: &str) -> Result<Local> {
    let unreadable = |reason: String| CatalogError::Source {
        path: source.to_string(),
        reason,
    };
    if !source.contains("://") || source.starts_with("file://") {
        let path = match source.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(source),
        };
        let meta = std::fs::metadata(&path).map_err(|e| unreadable(e.to_string()))?;
        if !meta.is_file() {
            return Err(unreadable("not a file".into()));
        }
        let name = file_name(&path.to_string_lossy());
        return Ok(Local {
            name,
            path,
            _download: None,
        });
    }
    let url = url::Url::parse(source).map_err(|e| unreadable(e.to_string()))?;
    let (store, path) = object_store::parse_url_opts(&url, std::env::vars())
        .map_err(|e| unreadable(e.to_string()))?;
    let temp = tempfile::NamedTempFile::new().map_err(|e| unreadable(e.to_string()))?;
    let mut out = tokio::fs::File::create(temp.path())
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    let mut stream = store
        .get(&path)
        .await
        .map_err(|e| unreadable(e.to_string()))?
        .into_stream();
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| unreadable(e.to_string()))?
    {
        out.write_all(&chunk)
            .await
            .map_err(|e| unreadable(e.to_string()))?;
    }
    out.flush().await.map_err(|e| unreadable(e.to_string()))?;
    Ok(Local {
        name: file_name(path.as_ref()),
        path: temp.path().to_path_buf(),
        _download: Some(temp.into_temp_path()),
    })
}

fn file_name(path: &str) -> String {
    let name = path.rsplit(['/', '\\']).next().unwrap_or(path);
    // Kept as a path segment of the raw zone: nothing that could climb out of it.
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// SHA-256 and size of a local file, read in 1 MiB blocks.
fn checksum(path: &FsPath) -> Result<(String, u64)> {
    let unreadable = |e: std::io::Error| CatalogError::Source {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    Ok((digest.iter().map(|b| format!("{b:02x}")).collect(), size))
}

/// Copy a local file into the lake unchanged: on a local lake a file copy (the kernel's, where
/// it can) into a temporary name renamed into place, so a reader never sees half a file;
/// elsewhere a multipart upload in 8 MiB parts (bounded memory).
async fn upload(
    store: Arc<dyn ObjectStore>,
    local_root: Option<PathBuf>,
    from: PathBuf,
    to: Path,
) -> Result<()> {
    if exists(&store, &to).await? {
        return Ok(());
    }
    let unreadable = |e: std::io::Error| CatalogError::Source {
        path: from.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(root) = local_root {
        let target = root.join(to.as_ref());
        let copied = tokio::task::spawn_blocking(move || {
            let folder = target.parent().expect("a raw path has a folder");
            std::fs::create_dir_all(folder)?;
            let temp = tempfile::NamedTempFile::new_in(folder)?;
            std::fs::copy(&from, temp.path())?;
            temp.persist(&target).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(|e| CatalogError::Source {
            path: to.to_string(),
            reason: e.to_string(),
        })?;
        return copied.map_err(|e: std::io::Error| CatalogError::Source {
            path: to.to_string(),
            reason: e.to_string(),
        });
    }
    let file = tokio::fs::File::open(&from).await.map_err(unreadable)?;
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, file);
    let mut writer = BufWriter::with_capacity(store, to.clone(), 8 << 20);
    tokio::io::copy_buf(&mut reader, &mut writer)
        .await
        .map_err(unreadable)?;
    writer.shutdown().await.map_err(unreadable)?;
    Ok(())
}
