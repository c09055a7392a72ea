//! The catalog document: datasets, their columns, labels and tags.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::async_reader::MetadataFetch;
use parquet::arrow::parquet_to_arrow_schema;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaDataReader;
use serde::{Deserialize, Serialize};

use crate::{CatalogError, Lake, Result};

/// Where the catalog document lives inside the lake.
pub(crate) const CATALOG_PATH: &str = "catalog/datasets.json";

/// Column sensitivity labels that the catalog accepts. A label outside this list is refused
/// at load: policies are written against labels, so an unknown one would silently escape them.
pub const LABELS: &[&str] = &["phi.direct", "phi.quasi", "identifier", "clinical", "audit"];

/// The zones a dataset may live in.
const ZONES: &[&str] = &["raw", "curated", "released", "audit"];

/// A column's type, in the catalog's small vocabulary (Arrow types underneath).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Utf8,
    Bool,
    Int32,
    Int64,
    Float64,
    Date32,
    /// Microsecond timestamps in UTC.
    TimestampUtc,
}

impl ColumnType {
    /// The type's name in catalogs and contracts (`timestamp_utc`).
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Utf8 => "utf8",
            ColumnType::Bool => "bool",
            ColumnType::Int32 => "int32",
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Date32 => "date32",
            ColumnType::TimestampUtc => "timestamp_utc",
        }
    }

    pub fn to_arrow(self) -> DataType {
        match self {
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Date32 => DataType::Date32,
            ColumnType::TimestampUtc => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
        }
    }
}

/// One column of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: ColumnType,
    #[serde(default = "yes")]
    pub nullable: bool,
    /// Sensitivity label, one of [`LABELS`].
    pub label: String,
    /// What each value must satisfy beyond type and nullability (from the dataset's
    /// contract, enforced at ingest).
    #[serde(default, skip_serializing_if = "ColumnChecks::is_empty")]
    pub checks: ColumnChecks,
}

/// The value checks of one column of a contract. Each is a rule with a stable name
/// ([`ColumnChecks::RULES`]) that quarantine records and ingest summaries use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnChecks {
    /// The only values a text column may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
    /// Smallest allowed value: a number, or a date / timestamp in ISO form for temporal columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Bound>,
    /// Largest allowed value, in the same form as `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Bound>,
    /// A regular expression every value of a text column matches (anchored at both ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// A code system's shape: `icd10`, `loinc` or `zip5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// No two rows of the dataset share a value (a key).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unique: bool,
    /// Every value exists in another dataset's column: `schema.table.column`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references: Option<String>,
}

impl ColumnDef {
    /// Whether the column's checks fit its type: a range on a number or a time, values,
    /// patterns and shapes on text, a regular expression that compiles.
    fn validate_checks(&self) -> std::result::Result<(), String> {
        let k = &self.checks;
        let text = self.data_type == ColumnType::Utf8;
        if !text && (k.allowed.is_some() || k.regex.is_some() || k.shape.is_some()) {
            return Err("allowed, regex and shape apply to utf8 columns only".into());
        }
        if let Some(allowed) = &k.allowed {
            if allowed.is_empty() {
                return Err("allowed lists no value".into());
            }
        }
        if let Some(r) = &k.regex {
            regex::Regex::new(r).map_err(|e| format!("regex does not compile: {e}"))?;
        }
        let min = k.min.as_ref().map(|b| self.bound(b)).transpose()?;
        let max = k.max.as_ref().map(|b| self.bound(b)).transpose()?;
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                return Err(format!(
                    "min {} is above max {}",
                    k.min.as_ref().unwrap(),
                    k.max.as_ref().unwrap()
                ));
            }
        }
        if let Some(r) = &k.references {
            if r.split('.').count() != 3 {
                return Err(format!("references '{r}' is not schema.table.column"));
            }
        }
        Ok(())
    }

    /// A range bound as the number the column's values compare with: the value itself for
    /// numbers, days since 1970 for dates, microseconds since 1970 (UTC) for timestamps.
    pub fn bound(&self, b: &Bound) -> std::result::Result<f64, String> {
        use arrow::compute::kernels::cast_utils::Parser;
        use arrow::datatypes::{Date32Type, TimestampMicrosecondType};
        let wrong = || format!("bound {b} does not fit a {} column", self.data_type.name());
        match (self.data_type, b) {
            (ColumnType::Int32 | ColumnType::Int64 | ColumnType::Float64, Bound::Number(n))
                if n.is_finite() =>
            {
                Ok(*n)
            }
            (ColumnType::Date32, Bound::Text(t)) => {
                Date32Type::parse(t).map(f64::from).ok_or_else(wrong)
            }
            (ColumnType::TimestampUtc, Bound::Text(t)) => TimestampMicrosecondType::parse(t)
                .map(|v| v as f64)
                .ok_or_else(wrong),
            _ => Err(wrong()),
        }
    }
}

impl ColumnChecks {
    /// Every rule name an ingest can report, value checks and the ones every column has.
    pub const RULES: &'static [&'static str] = &[
        "column_count",
        "utf8",
        "json",
        "unknown_column",
        "type",
        "not_null",
        "allowed",
        "min",
        "max",
        "regex",
        "shape",
        "unique",
        "references",
    ];

    pub fn is_empty(&self) -> bool {
        self == &ColumnChecks::default()
    }
}

/// A range bound in a contract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Bound {
    Number(f64),
    Text(String),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Number(n) => write!(f, "{n}"),
            Bound::Text(t) => write!(f, "{t}"),
        }
    }
}

/// The shape of a code system's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// ICD-10-CM: a letter, two characters, then up to four after an optional dot (`E11.9`).
    Icd10,
    /// LOINC: up to seven digits, a dash and a check digit (`4548-4`).
    Loinc,
    /// A 5-digit US ZIP code.
    Zip5,
}

impl Shape {
    /// The regular expression of the shape.
    pub fn pattern(self) -> &'static str {
        match self {
            Shape::Icd10 => r"^[A-TV-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$",
            Shape::Loinc => r"^[0-9]{1,7}-[0-9]$",
            Shape::Zip5 => r"^[0-9]{5}$",
        }
    }
}

fn yes() -> bool {
    true
}

/// A dataset's qualified name, `schema.table`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DatasetName {
    pub schema: String,
    pub table: String,
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// One governed dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// `schema.table`, e.g. `clinical.patients`.
    pub name: String,
    /// Storage zone: `raw`, `curated`, `released` or `audit`.
    pub zone: String,
    /// Folder of Parquet files, relative to the lake root. Server-side only: never sent out.
    pub location: String,
    pub columns: Vec<ColumnDef>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub description: String,
    /// How the files are stored: Parquet (the default) or newline-delimited JSON (the audit
    /// trail, which is appended to one small immutable object per commit).
    #[serde(default, skip_serializing_if = "FileFormat::is_parquet")]
    pub format: FileFormat,
    /// Minimum time the data must be kept, in days (HIPAA asks six years of audit records).
    /// Lakegate never deletes data; this states the obligation for the store's lifecycle rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    /// Whether its files are encrypted at rest (Parquet modular encryption with the data keys
    /// in `catalog/keys/<name>.json`; see [`crate::keys`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// The file format of a dataset's objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    #[default]
    Parquet,
    /// One JSON object per line, files ending in `.jsonl`.
    Ndjson,
    /// A Delta Lake table: Parquet files and the `_delta_log/` that says which of them make
    /// each version (datasets declared by a contract and filled by `lakegate ingest`).
    Delta,
}

impl FileFormat {
    fn is_parquet(&self) -> bool {
        *self == FileFormat::Parquet
    }

    /// The file name suffix of this format's data files.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet | FileFormat::Delta => ".parquet",
            FileFormat::Ndjson => ".jsonl",
        }
    }
}

/// The name of the audit trail's dataset, present in every lake.
pub const AUDIT_DATASET: &str = "audit.events";
/// Where the audit trail's event segments live inside the lake.
pub const AUDIT_EVENTS_PREFIX: &str = "audit/events/";
/// Six years, HIPAA's retention for audit documentation (45 CFR 164.316(b)(2)).
pub const AUDIT_RETENTION_DAYS: u32 = 6 * 366;

/// The audit trail as a governed dataset: every column labelled `audit`, the dataset tagged
/// `audit`, so policies grant it by tag (compliance officers) and nobody else sees it.
pub fn audit_dataset() -> Dataset {
    use ColumnType::*;
    let c = |name: &str, data_type: ColumnType, nullable: bool| ColumnDef {
        name: name.into(),
        data_type,
        nullable,
        label: "audit".into(),
        checks: Default::default(),
    };
    Dataset {
        name: AUDIT_DATASET.into(),
        zone: "audit".into(),
        location: AUDIT_EVENTS_PREFIX.into(),
        columns: vec![
            c("seq", Int64, false),
            c("time", TimestampUtc, false),
            c("kind", Utf8, false),
            c("query_id", Utf8, false),
            c("principal", Utf8, false),
            c("attributes", Utf8, false),
            c("purpose", Utf8, false),
            c("client", Utf8, false),
            c("action", Utf8, false),
            c("datasets", Utf8, false),
            c("columns", Utf8, false),
            c("policy_version", Utf8, false),
            c("rules", Utf8, false),
            c("fingerprint", Utf8, false),
            c("fingerprint_sha256", Utf8, false),
            c("rows", Int64, true),
            c("bytes", Int64, true),
            c("duration_us", Int64, true),
            c("groups_suppressed", Int64, true),
            c("outcome", Utf8, false),
            c("reason", Utf8, false),
            c("prev_hash", Utf8, false),
            c("hash", Utf8, false),
        ],
        tags: vec!["audit".into()],
        owner: "lakegate".into(),
        description: "Every access decision: who, what, when, from where, why, under which \
                      policy, and what left. Hash-chained, with signed checkpoints."
            .into(),
        format: FileFormat::Ndjson,
        retention_days: Some(AUDIT_RETENTION_DAYS),
        encrypted: false,
    }
}

impl Dataset {
    pub fn qualified(&self) -> DatasetName {
        let (schema, table) = self.name.split_once('.').unwrap_or(("", &self.name));
        DatasetName {
            schema: schema.to_string(),
            table: table.to_string(),
        }
    }

    /// The Arrow schema the catalog promises for this dataset.
    pub fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.to_arrow(), c.nullable))
                .collect::<Vec<_>>(),
        ))
    }

    /// Whether a file's Arrow schema keeps this dataset's contract: the catalog's column names,
    /// types and order (`expected` is [`Dataset::schema`], passed in where it is reused).
    pub fn check_file_schema(&self, expected: &Schema, actual: &Schema) -> Result<()> {
        compare_schema(&self.name, expected, actual)
    }

    /// Check one newline-delimited JSON file against the contract (see [`NdjsonCheck`]).
    pub fn check_ndjson_file(&self, expected: &SchemaRef, bytes: &[u8]) -> Result<()> {
        let mut check = NdjsonCheck::new(self, expected)?;
        check.lines(bytes)?;
        check.finish()
    }

    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |reason: String| CatalogError::InvalidEntry {
            dataset: self.name.clone(),
            reason,
        };
        let q = self.qualified();
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !ident_ok(&q.schema) || !ident_ok(&q.table) {
            return Err(bad(
                "name must be schema.table in lower-case letters, digits and _".into(),
            ));
        }
        if !ZONES.contains(&self.zone.as_str()) {
            return Err(bad(format!(
                "unknown zone '{}' (known: {})",
                self.zone,
                ZONES.join(", ")
            )));
        }
        if self.location.is_empty()
            || self.location.contains("..")
            || self.location.starts_with('/')
            || self.location.contains("://")
        {
            return Err(bad(
                "location must be a relative folder inside the lake".into()
            ));
        }
        if self.columns.is_empty() {
            return Err(bad("no columns".into()));
        }
        let mut seen = BTreeSet::new();
        for c in &self.columns {
            if !seen.insert(c.name.as_str()) {
                return Err(bad(format!("column '{}' is listed twice", c.name)));
            }
            if !LABELS.contains(&c.label.as_str()) {
                return Err(bad(format!(
                    "column '{}' has unknown label '{}' (known: {})",
                    c.name,
                    c.label,
                    LABELS.join(", ")
                )));
            }
            c.validate_checks()
                .map_err(|e| bad(format!("column '{}': {e}", c.name)))?;
        }
        Ok(())
    }

    /// Data files of this dataset (object paths relative to the lake root), sorted.
    pub async fn files(&self, store: &Arc<dyn ObjectStore>) -> Result<Vec<Path>> {
        Ok(self
            .file_versions(store)
            .await?
            .into_iter()
            .map(|m| m.location)
            .collect())
    }

    /// Data files of this dataset as the store has them now (path, size, modification time,
    /// entity tag), sorted by path: equal lists mean the dataset's contents have not changed.
    ///
    /// For a Delta dataset these are the files of its newest version, as its log says: a file
    /// in the folder that no version names (a refused or interrupted ingest's) is not listed.
    pub async fn file_versions(&self, store: &Arc<dyn ObjectStore>) -> Result<Vec<ObjectMeta>> {
        if self.format == FileFormat::Delta {
            let lake = Lake::with_store(Arc::clone(store));
            return Ok(crate::delta::files(&lake, self, None).await?.1);
        }
        let prefix = Path::from(self.location.trim_end_matches('/'));
        let mut files: Vec<ObjectMeta> = store
            .list(Some(&prefix))
            .try_filter(|m| {
                futures::future::ready(m.location.as_ref().ends_with(self.format.extension()))
            })
            .try_collect()
            .await?;
        files.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(files)
    }
}

/// The whole catalog.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub version: u32,
    pub datasets: Vec<Dataset>,
}

impl Catalog {
    /// Parse and validate a catalog document.
    pub fn from_json(text: &[u8]) -> Result<Self> {
        let catalog: Catalog =
            serde_json::from_slice(text).map_err(|e| CatalogError::Malformed(e.to_string()))?;
        catalog.validate()?;
        Ok(catalog)
    }

    pub fn validate(&self) -> Result<()> {
        if self.version != 1 {
            return Err(CatalogError::Malformed(format!(
                "unsupported catalog version {} (this build reads version 1)",
                self.version
            )));
        }
        let mut names = BTreeSet::new();
        for d in &self.datasets {
            d.validate()?;
            if !names.insert(d.name.as_str()) {
                return Err(CatalogError::InvalidEntry {
                    dataset: d.name.clone(),
                    reason: "listed twice".into(),
                });
            }
        }
        for d in &self.datasets {
            for c in &d.columns {
                if let Some(target) = &c.checks.references {
                    self.referenced_column(target)
                        .filter(|t| t.data_type == c.data_type)
                        .ok_or_else(|| CatalogError::InvalidEntry {
                            dataset: d.name.clone(),
                            reason: format!(
                                "column '{}' references '{target}', which is not a {} column of \
                                 a dataset in the catalog",
                                c.name,
                                c.data_type.name()
                            ),
                        })?;
                }
            }
        }
        Ok(())
    }

    /// Read the catalog stored in the lake.
    pub async fn load(lake: &Lake) -> Result<Self> {
        let bytes = match lake.store().get(&Path::from(CATALOG_PATH)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Err(CatalogError::NoCatalog),
            Err(e) => return Err(e.into()),
        };
        let mut catalog = Self::from_json(&bytes)?;
        // The audit trail's shape is Lakegate's own, whatever the catalog file says.
        catalog.datasets.retain(|d| d.name != AUDIT_DATASET);
        catalog.datasets.push(audit_dataset());
        Ok(catalog)
    }

    /// Write this catalog into the lake (atomically, as object stores put whole objects).
    pub async fn save(&self, lake: &Lake) -> Result<()> {
        self.validate()?;
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| CatalogError::Malformed(e.to_string()))?;
        lake.store()
            .put(&Path::from(CATALOG_PATH), PutPayload::from(json))
            .await?;
        Ok(())
    }

    /// The column that a `references` check names (`schema.table.column`).
    pub fn referenced_column(&self, target: &str) -> Option<&ColumnDef> {
        let (dataset, column) = target.rsplit_once('.')?;
        self.dataset(dataset)?.column(column)
    }

    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// Check every dataset's files against its contract: files present, each a readable
    /// Parquet file whose schema matches the catalog's column names, types and order.
    pub async fn verify(&self, lake: &Lake) -> Result<()> {
        let store = lake.store();
        for d in self
            .datasets
            .iter()
            .filter(|d| matches!(d.format, FileFormat::Parquet | FileFormat::Delta))
        {
            let files = d.files(&store).await?;
            // A Delta dataset may be empty (declared, nothing ingested yet); opening its log
            // above already proved the table is there.
            if files.is_empty() && d.format == FileFormat::Parquet {
                return Err(CatalogError::MissingFiles {
                    dataset: d.name.clone(),
                });
            }
            // An encrypted dataset whose keys the lake handle cannot unwrap is not checked here:
            // the server refuses its scans by name and serves the rest.
            let decryption = if d.encrypted {
                match crate::keys::load(lake, &d.name).await {
                    Ok(k) => Some(k.decryption()),
                    Err(_) => continue,
                }
            } else {
                None
            };
            let expected = d.schema();
            for f in files {
                let size = store.head(&f).await?.size;
                // The operator reads this (at start, in the log): the file is named.
                let corrupt = |e: ParquetError| CatalogError::CorruptFile {
                    dataset: d.name.clone(),
                    reason: format!("{f}: {e}"),
                };
                let fetch = StoreFetch {
                    store: &store,
                    path: &f,
                };
                let metadata = ParquetMetaDataReader::new()
                    .with_prefetch_hint(Some(64 << 10))
                    .with_decryption_properties(decryption.clone())
                    .load_and_finish(fetch, size)
                    .await
                    .map_err(corrupt)?;
                let fm = metadata.file_metadata();
                let actual = parquet_to_arrow_schema(fm.schema_descr(), fm.key_value_metadata())
                    .map_err(corrupt)?;
                d.check_file_schema(&expected, &actual)
                    .map_err(|e| match e {
                        // The operator reads this: the file is named.
                        CatalogError::SchemaMismatch { dataset, reason } => {
                            CatalogError::SchemaMismatch {
                                dataset,
                                reason: format!("{f}: {reason}"),
                            }
                        }
                        other => other,
                    })?;
            }
        }
        Ok(())
    }
}

/// Reads byte ranges of one object for the Parquet footer reader.
struct StoreFetch<'a> {
    store: &'a Arc<dyn ObjectStore>,
    path: &'a Path,
}

impl MetadataFetch for StoreFetch<'_> {
    fn fetch(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.store
                .get_range(self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }
}

/// One newline-delimited JSON file checked against its dataset's contract, as a Parquet
/// file's schema is: every line an object whose keys are catalog columns; every column present
/// in the file (a column no line names is a renamed or dropped one, not a column of NULLs);
/// every value readable as its column's type; no required column null. JSON carries no schema
/// of its own, so the rows are read, a run of whole lines at a time. Reasons name lines and
/// columns, never a value.
pub struct NdjsonCheck {
    dataset: String,
    expected: SchemaRef,
    decoder: arrow::json::reader::Decoder,
    seen: BTreeSet<String>,
    line: usize,
    rows: usize,
}

impl NdjsonCheck {
    pub fn new(dataset: &Dataset, expected: &SchemaRef) -> Result<Self> {
        Ok(Self {
            dataset: dataset.name.clone(),
            expected: Arc::clone(expected),
            decoder: arrow::json::ReaderBuilder::new(Arc::clone(expected))
                .with_strict_mode(true)
                .build_decoder()
                .map_err(|e| CatalogError::SchemaMismatch {
                    dataset: dataset.name.clone(),
                    reason: e.to_string(),
                })?,
            seen: BTreeSet::new(),
            line: 0,
            rows: 0,
        })
    }

    fn mismatch(&self, reason: String) -> CatalogError {
        CatalogError::SchemaMismatch {
            dataset: self.dataset.clone(),
            reason,
        }
    }

    /// Check the next whole lines of the file (`text` ends at a line's end or the file's).
    pub fn lines(&mut self, text: &[u8]) -> Result<()> {
        for line in text.split(|b| *b == b'\n') {
            self.line += 1;
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            self.rows += 1;
            let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
                serde_json::from_slice(line).map_err(|_| {
                    self.mismatch(format!("line {} is not a JSON object", self.line))
                })?;
            for key in keys.into_keys() {
                if !self.seen.contains(&key) {
                    if self.expected.field_with_name(&key).is_err() {
                        return Err(self.mismatch(format!(
                            "line {}: '{key}' is not in the catalog",
                            self.line
                        )));
                    }
                    self.seen.insert(key);
                }
            }
        }
        // `split` counts the piece after the last newline as a line of its own.
        if text.ends_with(b"\n") {
            self.line -= 1;
        }
        let mut rest = text;
        while !rest.is_empty() {
            let read = self
                .decoder
                .decode(rest)
                .map_err(|e| self.decode_failed(e))?;
            rest = &rest[read..];
            self.decoder.flush().map_err(|e| self.decode_failed(e))?;
        }
        Ok(())
    }

    /// Types and required values, decoded as the scan will decode them. Arrow's messages can
    /// quote a value: only the kind of failure is kept.
    fn decode_failed(&self, e: arrow::error::ArrowError) -> CatalogError {
        let kind = if e.to_string().contains("non-nullable") {
            "a required column is null or missing on some line"
        } else {
            "a value is not of its column's type"
        };
        self.mismatch(kind.to_string())
    }

    /// The file has ended: every column must have appeared.
    pub fn finish(mut self) -> Result<()> {
        self.decoder.flush().map_err(|e| self.decode_failed(e))?;
        let missing: Vec<String> = self
            .expected
            .fields()
            .iter()
            .filter(|f| !self.seen.contains(f.name()))
            .map(|f| format!("'{}'", f.name()))
            .collect();
        if self.rows > 0 && !missing.is_empty() {
            return Err(self.mismatch(format!("missing from the file: {}", missing.join(", "))));
        }
        Ok(())
    }
}

fn compare_schema(dataset: &str, expected: &Schema, actual: &Schema) -> Result<()> {
    let mismatch = |reason: String| CatalogError::SchemaMismatch {
        dataset: dataset.to_string(),
        reason,
    };
    if expected.fields().len() != actual.fields().len() {
        let names = |s: &Schema| -> BTreeSet<String> {
            s.fields().iter().map(|f| f.name().clone()).collect()
        };
        let (e, a) = (names(expected), names(actual));
        let list = |set: Vec<&String>| {
            set.iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let missing = list(e.difference(&a).collect());
        let extra = list(a.difference(&e).collect());
        let mut reason = format!(
            "{} columns in the catalog, {} in the file",
            expected.fields().len(),
            actual.fields().len()
        );
        if !missing.is_empty() {
            reason.push_str(&format!("; missing from the file: {missing}"));
        }
        if !extra.is_empty() {
            reason.push_str(&format!("; not in the catalog: {extra}"));
        }
        return Err(mismatch(reason));
    }
    for (e, a) in expected.fields().iter().zip(actual.fields()) {
        if e.name() != a.name() {
            return Err(mismatch(format!(
                "expected column '{}', found '{}'",
                e.name(),
                a.name()
            )));
        }
        if e.data_type() != a.data_type() {
            return Err(mismatch(format!(
                "column '{}' is {} in the catalog but {} in the file",
                e.name(),
                e.data_type(),
                a.data_type()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Catalog {
        Catalog {
            version: 1,
            datasets: vec![Dataset {
                name: "clinical.things".into(),
                zone: "curated".into(),
                location: "curated/clinical/things/".into(),
                columns: vec![ColumnDef {
                    name: "id".into(),
                    data_type: ColumnType::Utf8,
                    nullable: false,
                    label: "identifier".into(),
                    checks: Default::default(),
                }],
                tags: vec![],
                owner: "test".into(),
                description: String::new(),
                format: FileFormat::Parquet,
                retention_days: None,
                encrypted: false,
            }],
        }
    }

    #[test]
    fn ndjson_files_are_held_to_the_contract_line_by_line() {
        let mut d = sample().datasets.remove(0);
        d.format = FileFormat::Ndjson;
        d.columns.push(ColumnDef {
            name: "n".into(),
            data_type: ColumnType::Int64,
            nullable: true,
            label: "public".into(),
            checks: Default::default(),
        });
        let schema = d.schema();
        let check = |text: &str| {
            d.check_ndjson_file(&schema, text.as_bytes())
                .map_err(|e| e.to_string())
        };
        check("{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":null}\n\n{\"id\":\"c\"}\n").unwrap();
        check("").unwrap();
        let refused = [
            (
                "{\"id\":\"a\",\"n\":1}\n[1,2]\n",
                "line 2 is not a JSON object",
            ),
            (
                "{\"id\":\"a\",\"n\":1,\"ssn\":\"x\"}\n",
                "line 1: 'ssn' is not in the catalog",
            ),
            (
                "{\"id\":\"a\"}\n{\"id\":\"b\"}\n",
                "missing from the file: 'n'",
            ),
            (
                "{\"id\":\"a\",\"n\":\"secret-7\"}\n",
                "not of its column's type",
            ),
            ("{\"id\":null,\"n\":1}\n", "a required column is null"),
        ];
        for (text, reason) in refused {
            let err = check(text).unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
            assert!(!err.contains("secret-7"), "{err}");
        }
    }

    #[test]
    fn unknown_label_is_refused() {
        let mut c = sample();
        c.datasets[0].columns[0].label = "secret".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("unknown label 'secret'"), "{err}");
    }

    #[test]
    fn location_escaping_the_lake_is_refused() {
        for loc in ["../etc", "/etc/", "s3://other/x"] {
            let mut c = sample();
            c.datasets[0].location = loc.into();
            assert!(c.validate().is_err(), "{loc} accepted");
        }
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        let err = Catalog::from_json(b"{\"version\": 1, \"datasets\": [").unwrap_err();
        assert!(matches!(err, CatalogError::Malformed(_)));
    }

    #[tokio::test]
    async fn missing_files_and_missing_catalog_are_named() {
        let lake = Lake::in_memory();
        assert!(matches!(
            Catalog::load(&lake).await,
            Err(CatalogError::NoCatalog)
        ));
        let c = sample();
        c.save(&lake).await.unwrap();
        let loaded = Catalog::load(&lake).await.unwrap();
        assert_eq!(loaded.datasets[0], c.datasets[0]);
        assert_eq!(loaded.dataset(AUDIT_DATASET), Some(&audit_dataset()));
        let err = loaded.verify(&lake).await.unwrap_err().to_string();
        assert_eq!(err, "dataset 'clinical.things' has no data files");
    }

    #[tokio::test]
    async fn corrupt_parquet_is_named() {
        let lake = Lake::in_memory();
        let c = sample();
        c.save(&lake).await.unwrap();
        lake.store()
            .put(
                &Path::from("curated/clinical/things/part-0.parquet"),
                PutPayload::from("not parquet"),
            )
            .await
            .unwrap();
        let err = c.verify(&lake).await.unwrap_err().to_string();
        assert!(
            err.starts_with(
                "dataset 'clinical.things': a data file is not valid Parquet: curated/clinical/things/part-0.parquet: "
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn schema_mismatch_is_named() {
        use arrow::array::{Int64Array, RecordBatch};
        let lake = Lake::in_memory();
        let c = sample();
        c.save(&lake).await.unwrap();
        // The catalog says `id` is utf8; the file holds int64.
        let batch = RecordBatch::try_from_iter([(
            "id",
            Arc::new(Int64Array::from(vec![1, 2])) as arrow::array::ArrayRef,
        )])
        .unwrap();
        let mut buf = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        lake.store()
            .put(
                &Path::from("curated/clinical/things/part-0.parquet"),
                PutPayload::from(buf),
            )
            .await
            .unwrap();
        let err = c.verify(&lake).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "dataset 'clinical.things': a data file's schema disagrees with the catalog: \
             curated/clinical/things/part-0.parquet: column 'id' is Utf8 in the catalog but \
             Int64 in the file"
        );
    }
}
