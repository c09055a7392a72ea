//! Ingestion: incoming files land unchanged in `raw/`, rows that keep the dataset's contract
//! become curated Parquet, the rest go to `quarantine/` with the rule they broke.
//!
//! One ingest runs per dataset at a time (a lock object, created only if absent). Each file
//! is checksummed first: a file whose checksum was committed before adds nothing. Rows are
//! decoded, checked and written batch by batch to a staging object, so memory stays bounded
//! whatever the file's size. Only when every file of the feed is readable and the share of
//! quarantined rows is within `max_reject_ratio` are the staged parts committed; the commit
//! record of each (`lineage/ingests/`) is written last and names the source, its checksum,
//! the counts and the principal, which is the lineage `catalog history` shows.

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
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use self::check::Checker;
use self::decode::{Chunk, FileProblem, SourceFormat};
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
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            principal: "unknown".into(),
            max_reject_ratio: 0.05,
            progress: Arc::default(),
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
    /// This file (same checksum) was committed by an earlier ingest.
    AlreadyIngested,
    /// An earlier ingest committed this file's rows and stopped before its record; the record
    /// is now written.
    Recovered,
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

/// The record of one committed file: the lineage of the dataset's contents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestRecord {
    pub dataset: String,
    pub source: String,
    pub sha256: String,
    pub bytes: u64,
    pub format: String,
    /// The unchanged copy in the lake's `raw/` zone.
    pub raw: String,
    /// The curated part the accepted rows went to.
    pub curated: String,
    pub rows: u64,
    pub accepted: u64,
    pub quarantined: u64,
    pub principal: String,
    /// Seconds since 1970 (UTC) of the commit.
    pub committed_at: u64,
}

/// Where the commit records of a dataset live.
fn records_prefix(dataset: &str) -> Path {
    Path::from(format!("lineage/ingests/{dataset}"))
}

/// The commit records of a dataset, oldest first.
pub async fn history(lake: &Lake, dataset: &str) -> Result<Vec<IngestRecord>> {
    let store = lake.store();
    let metas: Vec<_> = store
        .list(Some(&records_prefix(dataset)))
        .try_collect()
        .await?;
    let mut records = Vec::new();
    for m in metas {
        let bytes = store.get(&m.location).await?.bytes().await?;
        let record: IngestRecord = serde_json::from_slice(&bytes)
            .map_err(|e| CatalogError::Malformed(format!("ingest record {}: {e}", m.location)))?;
        records.push(record);
    }
    records.sort_by(|a, b| (a.committed_at, &a.sha256).cmp(&(b.committed_at, &b.sha256)));
    Ok(records)
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
    if d.zone != "curated" || d.format != FileFormat::Parquet || d.name == crate::AUDIT_DATASET {
        return Err(CatalogError::NotIngestible {
            dataset: d.name,
            reason: "only curated Parquet datasets take ingests".into(),
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

/// A staged file, waiting for the feed's verdict.
struct Staged {
    record: IngestRecord,
    staging: Path,
}

struct Feed<'a> {
    store: Arc<dyn ObjectStore>,
    dataset: &'a Dataset,
    options: &'a IngestOptions,
    checker: Checker,
    report: IngestReport,
    staged: Vec<Staged>,
}

impl<'a> Feed<'a> {
    async fn new(
        lake: &'a Lake,
        catalog: &Catalog,
        dataset: &'a Dataset,
        options: &'a IngestOptions,
    ) -> Result<Self> {
        let store = lake.store();
        let checker = Checker::new(catalog, dataset, &store).await?;
        Ok(Self {
            store,
            dataset,
            options,
            checker,
            report: IngestReport {
                dataset: dataset.name.clone(),
                ..Default::default()
            },
            staged: Vec::new(),
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
            if !seen.insert(sha256.clone()) || self.committed(&sha256).await? {
                self.options.progress.fetch_add(bytes, Ordering::Relaxed);
                self.report.files.push(report);
                continue;
            }
            if self.recover(&sha256).await? {
                self.options.progress.fetch_add(bytes, Ordering::Relaxed);
                report.outcome = FileOutcome::Recovered;
                self.report.files.push(report);
                continue;
            }
            let raw = self.zone_path("raw", &format!("{sha256}/{}", local.name));
            upload(&self.store, &local.path, &raw).await?;
            let before = self.options.progress.load(Ordering::Relaxed);
            report.outcome = self.process(&local, &sha256, bytes, &raw).await?;
            self.options
                .progress
                .store(before + bytes, Ordering::Relaxed);
            self.report.files.push(report);
        }
        self.decide().await?;
        Ok(std::mem::take(&mut self.report))
    }

    async fn committed(&self, sha256: &str) -> Result<bool> {
        let record = Path::from(format!(
            "{}/{sha256}.json",
            records_prefix(&self.dataset.name)
        ));
        exists(&self.store, &record).await
    }

    /// Finish a commit that stopped between the curated part and its record.
    async fn recover(&self, sha256: &str) -> Result<bool> {
        let part = self.part_path(sha256);
        let sidecar = self.zone_path("staging", &format!("{sha256}.json"));
        if !exists(&self.store, &part).await? || !exists(&self.store, &sidecar).await? {
            return Ok(false);
        }
        let bytes = self.store.get(&sidecar).await?.bytes().await?;
        let record: IngestRecord = serde_json::from_slice(&bytes)
            .map_err(|e| CatalogError::Malformed(format!("staged record {sidecar}: {e}")))?;
        self.write_record(&record).await?;
        self.store.delete(&sidecar).await?;
        let _ = self
            .store
            .delete(&self.zone_path("staging", &format!("{sha256}.parquet")))
            .await;
        Ok(true)
    }

    fn part_path(&self, sha256: &str) -> Path {
        // Named by the source's checksum: a commit repeated after a crash rewrites the same part.
        Path::from(format!(
            "{}part-{}.parquet",
            self.dataset.location,
            &sha256[..16]
        ))
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
        let staging = self.zone_path("staging", &format!("{sha256}.parquet"));
        let rejects = self.zone_path("quarantine", &format!("{sha256}/rows.jsonl"));
        let read = Arc::new(AtomicU64::new(0));
        let mut decoder = match decode::open(format, &local.path, self.dataset, Arc::clone(&read)) {
            Ok(d) => d,
            Err(FileProblem(reason)) => {
                return self.quarantine_file(local, sha256, raw, reason).await
            }
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer = AsyncArrowWriter::try_new(
            BufWriter::new(Arc::clone(&self.store), staging.clone()),
            self.dataset.schema(),
            Some(props),
        )
        .map_err(parquet_error(self.dataset))?;
        let mut quarantine = BufWriter::new(Arc::clone(&self.store), rejects.clone());
        let (mut rows, mut accepted, mut quarantined) = (0u64, 0u64, 0u64);
        let base = self.options.progress.load(Ordering::Relaxed);
        let problem = loop {
            let mut chunk = match decoder.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => break None,
                Err(FileProblem(reason)) => break Some(reason),
            };
            self.checker.check(&mut chunk);
            rows += chunk.rows.len() as u64;
            let (ok, lines) = self.split(&chunk, &local.name, raw)?;
            accepted += ok.num_rows() as u64;
            quarantined += chunk.rows.len() as u64 - ok.num_rows() as u64;
            if ok.num_rows() > 0 {
                writer
                    .write(&ok)
                    .await
                    .map_err(parquet_error(self.dataset))?;
            }
            if !lines.is_empty() {
                quarantine.put(lines.into()).await?;
            }
            self.options
                .progress
                .store(base + read.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        writer.close().await.map_err(parquet_error(self.dataset))?;
        quarantine
            .shutdown()
            .await
            .map_err(|e| CatalogError::Source {
                path: rejects.to_string(),
                reason: e.to_string(),
            })?;
        if quarantined == 0 {
            self.store.delete(&rejects).await?;
        }
        let problem = problem.or_else(|| (rows == 0).then(|| "the file holds no rows".to_string()));
        if let Some(reason) = problem {
            self.store.delete(&staging).await?;
            return self.quarantine_file(local, sha256, raw, reason).await;
        }
        self.report.rows_read += rows;
        self.report.accepted += accepted;
        self.report.quarantined += quarantined;
        let record = IngestRecord {
            dataset: self.dataset.name.clone(),
            source: local.name.clone(),
            sha256: sha256.into(),
            bytes,
            format: format!("{format:?}").to_lowercase(),
            raw: raw.to_string(),
            curated: self.part_path(sha256).to_string(),
            rows,
            accepted,
            quarantined,
            principal: self.options.principal.clone(),
            committed_at: 0,
        };
        self.staged.push(Staged { record, staging });
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
        self.store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec_pretty(&body).expect("json")),
            )
            .await?;
        *self.report.by_rule.entry("file".into()).or_default() += 1;
        Ok(FileOutcome::Quarantined { reason })
    }

    /// Commit every staged file, or none: a feed with a quarantined file or more rejects than
    /// allowed is refused as a whole.
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
        let staged = std::mem::take(&mut self.staged);
        if self.report.refused.is_some() {
            for s in staged {
                self.store.delete(&s.staging).await?;
            }
            return Ok(());
        }
        for mut s in staged {
            s.record.committed_at = now_secs();
            let sidecar = self.zone_path("staging", &format!("{}.json", s.record.sha256));
            let json = serde_json::to_vec_pretty(&s.record).expect("serializable");
            self.store.put(&sidecar, PutPayload::from(json)).await?;
            let part = Path::from(s.record.curated.as_str());
            self.store.copy(&s.staging, &part).await?;
            self.write_record(&s.record).await?;
            self.store.delete(&sidecar).await?;
            self.store.delete(&s.staging).await?;
        }
        Ok(())
    }

    async fn write_record(&self, record: &IngestRecord) -> Result<()> {
        let path = Path::from(format!(
            "{}/{}.json",
            records_prefix(&self.dataset.name),
            record.sha256
        ));
        let json = serde_json::to_vec_pretty(record).expect("serializable");
        match self
            .store
            .put_opts(
                &path,
                PutPayload::from(json),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn parquet_error(dataset: &Dataset) -> impl Fn(parquet::errors::ParquetError) -> CatalogError + '_ {
    move |e| CatalogError::NotIngestible {
        dataset: dataset.name.clone(),
        reason: e.to_string(),
    }
}

async fn exists(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<bool> {
    match store.head(path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
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

/// Copy a local file into the lake unchanged, in parts (bounded memory).
async fn upload(store: &Arc<dyn ObjectStore>, from: &FsPath, to: &Path) -> Result<()> {
    if exists(store, to).await? {
        return Ok(());
    }
    let unreadable = |e: std::io::Error| CatalogError::Source {
        path: from.display().to_string(),
        reason: e.to_string(),
    };
    let mut file = tokio::fs::File::open(from).await.map_err(unreadable)?;
    let mut writer = BufWriter::new(Arc::clone(store), to.clone());
    tokio::io::copy(&mut file, &mut writer)
        .await
        .map_err(unreadable)?;
    writer.shutdown().await.map_err(unreadable)?;
    Ok(())
}
