//! De-identified releases: what a principal's policy yields, materialised once into the lake's
//! `releases/` zone behind a k-anonymity gate, with a signed manifest and a second person's
//! approval, then read by the project's principals as `releases."NAME".<table>`.
//!
//! Layout of a release in the lake:
//! - `releases/NAME/manifest.json` and `manifest.sig`: who made it, under which policy and key
//!   epoch, from which dataset versions, each table's columns, rows, files with their SHA-256,
//!   and the risk report; Ed25519-signed with the audit key.
//! - `releases/NAME/approval.json`: the approver, the time and the manifest's SHA-256, signed.
//! - `releases/NAME/data/<attempt>/<table>/part-NNNNN.parquet`: the rows, shuffled, encrypted
//!   with the release's own data keys when the lake has a keyring. The attempt folder keeps
//!   two creations of one name from writing over each other's files: only the one whose
//!   manifest lands first (a create-only put) exists.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, Session as DFSession, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::TableType;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use ed25519_dalek::VerifyingKey;
use futures::StreamExt;
use lakegate_catalogs::Lake;
use lakegate_policies::{Principal, ReleaseRules};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{signature_holds, AuditKey};
use crate::{Engine, EngineError, Result};

/// The lake zone that holds releases.
pub const ZONE: &str = "releases";
/// The catalog name releases are read under: `releases."NAME".<table>`.
pub const CATALOG: &str = "releases";
/// Rows per released Parquet file.
const ROWS_PER_FILE: usize = 1_000_000;
/// The output column whose distinct values count the patients of an equivalence class.
pub const UNIT: &str = "patient_id";

/// Rule names that refusals carry.
const RULE_NAME: &str = "release-name";
const RULE_GATE: &str = "release-k-anonymity";
const RULE_DIVERSITY: &str = "release-l-diversity";
const RULE_DEIDENTIFIED: &str = "release-deidentified";
const RULE_PROJECT: &str = "release-project";
const RULE_APPROVAL: &str = "release-approval";
const RULE_READERS: &str = "release-readers";
const RULE_INTEGRITY: &str = "release-integrity";
const RULE_LIFECYCLE: &str = "release-lifecycle";

/// What a release holds and where it came from. Names and figures only, never a value.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Names the folder of this creation's files and its signature (`manifest.<attempt>.sig`).
    pub attempt: String,
    pub created_at: String,
    pub created_by: String,
    /// The creator's attributes as the identity source gave them.
    pub attributes: BTreeMap<String, String>,
    /// Only this project's principals may read the release.
    pub project: String,
    pub policy_version: String,
    /// The project key's epoch: pseudonyms and date shifts join with live queries and other
    /// releases of the same epoch.
    pub key_epoch: Option<String>,
    /// Each dataset read, with its newest version when the release was made.
    pub sources: Vec<SourceVersion>,
    pub tables: Vec<ReleasedTable>,
    /// The data keys' name in the lake's catalog (`catalog/keys/<name>.json`), when encrypted.
    pub data_keys: Option<String>,
    /// After this time (RFC 3339) `lakegate lifecycle run` deletes the release's data, unless
    /// it is under a legal hold (the policy's `[release] retention_days` from its creation).
    pub retain_until: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceVersion {
    pub dataset: String,
    pub version: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedTable {
    pub name: String,
    /// The query it was made from, before generalisation, with every literal replaced by `?`
    /// as the audit trail records it: a manifest never holds a value the creator typed (an
    /// SSN in a WHERE clause).
    pub query: String,
    pub rows: u64,
    pub columns: Vec<ReleasedColumn>,
    pub files: Vec<ReleasedFile>,
    pub risk: RiskReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedColumn {
    pub name: String,
    pub data_type: String,
    /// The labels of the source columns it derives from.
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedFile {
    /// Relative to the lake's root.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The re-identification risk of one released table, as ARX reports it for the prosecutor
/// model: equivalence classes of the quasi-identifiers, counted in distinct patients.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskReport {
    pub k: u64,
    /// What a class's size counts: distinct `patient_id` values, or rows without one.
    pub unit: String,
    pub quasi_identifiers: Vec<String>,
    /// Column -> generalisation applied before the gate.
    pub generalised: BTreeMap<String, String>,
    /// Columns left out of the release by the policy.
    pub dropped: Vec<String>,
    /// As checked, before any suppression.
    pub records: u64,
    pub classes: u64,
    pub smallest_class: u64,
    pub classes_below_k: u64,
    /// Records of the classes below k or below l.
    pub records_at_risk: u64,
    pub highest_risk: f64,
    pub average_risk: f64,
    /// Records removed by `--suppress` (those of classes below k).
    pub suppressed_records: u64,
    /// As released, after suppression.
    pub released_records: u64,
    pub released_highest_risk: f64,
    pub released_average_risk: f64,
    pub passed: bool,
    /// l-diversity: the distinct values each sensitive column must hold per class (0: the
    /// policy asks for none).
    #[serde(default)]
    pub l: u64,
    /// The policy's sensitive columns that this table releases.
    #[serde(default)]
    pub sensitive: Vec<String>,
    #[serde(default)]
    pub classes_below_l: u64,
    /// The fewest distinct values of a sensitive column in any class, counted up to l.
    #[serde(default)]
    pub lowest_diversity: u64,
}

impl fmt::Display for RiskReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let qi = if self.quasi_identifiers.is_empty() {
            "none".to_string()
        } else {
            self.quasi_identifiers.join(", ")
        };
        write!(
            f,
            "k={} over {qi} (class size in {}): {} records in {} classes, smallest {}, {} classes \
             below k",
            self.k,
            self.unit,
            self.records,
            self.classes,
            self.smallest_class,
            self.classes_below_k,
        )?;
        if self.l > 0 && !self.sensitive.is_empty() {
            write!(
                f,
                "; l={} over {}: fewest distinct values in a class {} (counted up to l), {} \
                 classes below l",
                self.l,
                self.sensitive.join(", "),
                self.lowest_diversity,
                self.classes_below_l
            )?;
        }
        write!(
            f,
            "; {} records at risk; highest prosecutor risk {:.4}, average {:.4}",
            self.records_at_risk, self.highest_risk, self.average_risk,
        )?;
        if self.suppressed_records > 0 {
            write!(
                f,
                "; {} records suppressed, {} released, highest risk {:.4}, average {:.4}",
                self.suppressed_records,
                self.released_records,
                self.released_highest_risk,
                self.released_average_risk
            )?;
        }
        Ok(())
    }
}

/// A second principal's approval of one manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub release: String,
    pub manifest_sha256: String,
    pub approved_by: String,
    pub approved_at: String,
    /// Ed25519 over this approval serialized with `signature = ""` (hex).
    pub signature: String,
}

impl Approval {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = String::new();
        serde_json::to_vec(&unsigned).expect("approvals serialize")
    }
}

/// What is left of a release whose data was deleted: its manifest, and this.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub release: String,
    pub deleted_at: String,
    pub reason: String,
}

/// Where a release stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Pending,
    Approved { by: String, at: String },
    Deleted { at: String, reason: String },
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Pending => write!(f, "pending"),
            Status::Approved { by, at } => write!(f, "approved by {by} at {at}"),
            Status::Deleted { at, reason } => write!(f, "deleted at {at} ({reason})"),
        }
    }
}

/// Where a release's tombstone lives.
pub(crate) fn tombstone_path(name: &str) -> Path {
    path(name, "deleted.json")
}

/// What to release: one table per (name, SQL query), run as the creator.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub name: String,
    pub tables: Vec<(String, String)>,
    /// Remove the records of classes below k instead of refusing the release.
    pub suppress: bool,
}

fn refused(rule: &str, what: String) -> EngineError {
    EngineError::PermissionDenied(format!("{what} (rule: {rule})"))
}

fn path(name: &str, rest: &str) -> Path {
    Path::from(format!("{ZONE}/{name}/{rest}"))
}

/// The query that reads one table of a release whole: what a plain Flight client gets a
/// ticket for when it names `["releases", NAME, TABLE]` as a descriptor path. None when the
/// path names no release table.
pub fn path_query(path: &[String]) -> Option<String> {
    match path {
        [zone, name, table] if zone == CATALOG => Some(format!(
            "SELECT * FROM {CATALOG}.{}.{}",
            crate::generalise::quote(name),
            crate::generalise::quote(table)
        )),
        _ => None,
    }
}

/// Release and table names: lower-case letters, digits, `-`, `_` and `.`, starting with a
/// letter or digit, at most 64 characters (they become object keys and SQL identifiers).
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidQuery(format!(
            "{kind} name '{}' is not allowed: use lower-case letters, digits, '-', '_' and '.' \
             (at most 64, starting with a letter or digit) (rule: {RULE_NAME})",
            name.chars().take(80).collect::<String>()
        )))
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    crate::audit::hex(&Sha256::digest(bytes))
}

async fn get_optional(store: &dyn ObjectStore, at: &Path) -> Result<Option<bytes::Bytes>> {
    match store.get(at).await {
        Ok(got) => Ok(Some(got.bytes().await.map_err(store_error)?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_error(e)),
    }
}

fn arrow_error(e: arrow::error::ArrowError) -> EngineError {
    EngineError::from(DataFusionError::from(e))
}

pub(crate) fn store_error(e: object_store::Error) -> EngineError {
    EngineError::Catalog(lakegate_catalogs::CatalogError::Store(e))
}

/// Make a release: run each table's query as `principal` (the same masks, filters and
/// pseudonyms as their live queries), apply the policy's generalisations, check every table
/// against the k-anonymity gate, and write the shuffled rows, then the signed manifest.
/// Nothing is readable until a release approver approves it.
pub async fn create(
    engine: &Engine,
    principal: &Principal,
    request: &CreateRequest,
    signer: &AuditKey,
) -> Result<Manifest> {
    check_name("release", &request.name)?;
    if request.tables.is_empty() {
        return Err(EngineError::InvalidQuery(
            "a release needs at least one table".into(),
        ));
    }
    let mut seen = HashSet::new();
    for (table, _) in &request.tables {
        check_name("table", table)?;
        if !seen.insert(table) {
            return Err(EngineError::InvalidQuery(format!(
                "table {table} is named twice in release {}",
                request.name
            )));
        }
    }
    let project = principal
        .attributes
        .get("project")
        .filter(|p| !p.is_empty())
        .cloned()
        .ok_or_else(|| {
            refused(
                RULE_PROJECT,
                format!(
                    "{} has no project: a release is made for one project's principals",
                    principal.name
                ),
            )
        })?;
    let lake = engine.lake();
    let store = lake.store();
    let manifest_at = path(&request.name, "manifest.json");
    if get_optional(store.as_ref(), &manifest_at).await?.is_some() {
        return Err(EngineError::InvalidQuery(format!(
            "release {} already exists; releases are never modified (make a new one under a new \
             name)",
            request.name
        )));
    }
    let rules = engine.policy().release_rules().clone();
    let session = engine.session(principal).await?;
    let attempt = {
        use rand::RngCore;
        let mut b = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut b);
        crate::audit::hex(&b)
    };
    let data_keys = match lake.keyring() {
        Some(_) => {
            let key_name = format!("release.{}.{attempt}", request.name);
            let keys = lakegate_catalogs::keys::create(lake, &key_name).await?;
            Some((key_name, keys))
        }
        None => None,
    };
    let made = make_tables(
        engine, &session, &rules, request, &attempt, &data_keys, &store,
    )
    .await;
    let (tables, sources) = match made {
        Ok(made) => made,
        Err(e) => {
            remove_attempt(&store, &request.name, &attempt).await;
            if let Some((key_name, _)) = &data_keys {
                let _ = store
                    .delete(&lakegate_catalogs::keys::key_file(key_name))
                    .await;
            }
            return Err(e);
        }
    };
    let manifest = Manifest {
        name: request.name.clone(),
        attempt: attempt.clone(),
        retain_until: (chrono::Utc::now()
            + chrono::Duration::days(i64::from(rules.retention_days)))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        created_at: crate::audit::now_rfc3339(),
        created_by: principal.name.clone(),
        attributes: principal
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        project: project.clone(),
        policy_version: session.policy_version().to_string(),
        key_epoch: engine.keys().epoch(&project),
        sources,
        tables,
        data_keys: data_keys.map(|(n, _)| n),
    };
    let body = serde_json::to_vec_pretty(&manifest).expect("manifests serialize");
    let signature = signer.sign_hex(&body);
    // The signature first: a manifest never exists without one.
    store
        .put(
            &path(&request.name, &format!("manifest.{attempt}.sig")),
            PutPayload::from(signature.into_bytes()),
        )
        .await
        .map_err(store_error)?;
    let put = store
        .put_opts(
            &manifest_at,
            PutPayload::from(body),
            PutOptions::from(PutMode::Create),
        )
        .await;
    match put {
        Ok(_) => Ok(manifest),
        Err(object_store::Error::AlreadyExists { .. }) => {
            remove_attempt(&store, &request.name, &attempt).await;
            let _ = store
                .delete(&path(&request.name, &format!("manifest.{attempt}.sig")))
                .await;
            Err(EngineError::InvalidQuery(format!(
                "release {} already exists (another creation finished first)",
                request.name
            )))
        }
        Err(e) => {
            remove_attempt(&store, &request.name, &attempt).await;
            Err(store_error(e))
        }
    }
}

async fn remove_attempt(store: &Arc<dyn ObjectStore>, name: &str, attempt: &str) {
    let prefix = path(name, &format!("data/{attempt}"));
    let listed: Vec<_> = store
        .list(Some(&prefix))
        .filter_map(|m| async move { m.ok() })
        .collect()
        .await;
    for m in listed {
        let _ = store.delete(&m.location).await;
    }
}

type MadeTables = (Vec<ReleasedTable>, Vec<SourceVersion>);

async fn make_tables(
    engine: &Engine,
    session: &crate::Session,
    rules: &ReleaseRules,
    request: &CreateRequest,
    attempt: &str,
    data_keys: &Option<(String, lakegate_catalogs::DataKeys)>,
    store: &Arc<dyn ObjectStore>,
) -> Result<MadeTables> {
    let catalog = engine.catalog();
    let mut datasets = BTreeSet::new();
    let mut planned_tables = Vec::new();
    let this_year = chrono::Datelike::year(&chrono::Utc::now());
    for (table, sql) in &request.tables {
        let sql = sql.trim().trim_end_matches(';').trim_end();
        let planned = session.plan(sql).await?;
        if planned.report().private.is_some() {
            return Err(refused(
                RULE_DEIDENTIFIED,
                format!(
                    "table {table}: differentially private answers are noisy per query and \
                     cannot be materialised into a release"
                ),
            ));
        }
        datasets.extend(planned.report().datasets.iter().cloned());
        let (wrapped, generalised, dropped) =
            crate::generalise::generalise(sql, &planned.schema(), rules, this_year)?;
        planned_tables.push((table, sql.to_string(), wrapped, generalised, dropped));
    }
    let before = source_versions(engine, &datasets).await?;
    let mut tables = Vec::new();
    for (table, sql, wrapped, generalised, dropped) in planned_tables {
        let planned = session.plan(&wrapped).await?;
        let labels = lineage(&planned.plan, &catalog);
        // One pass: the gate counts each row's class while the row is staged in a random
        // bucket on local disk; nothing is written to the lake before the gate has decided.
        let started = std::time::Instant::now();
        let rows = planned.execute(None).await?;
        // The executed types, which may differ from the planned ones (a string view).
        let schema = rows.schema();
        let gate = Gate::new(&schema, &labels, rules)?;
        let spill = Arc::clone(&session.planning.task.runtime_env().disk_manager);
        let (gate, staged) = stage(rows, gate, spill).await?;
        let gated = started.elapsed();
        let direct = gate.identified();
        if !direct.is_empty() {
            return Err(refused(
                RULE_DEIDENTIFIED,
                format!(
                    "table {table}: column(s) {} carry direct identifiers for this principal; \
                     a release holds none",
                    direct.join(", ")
                ),
            ));
        }
        let mut risk = gate.report(generalised, dropped);
        if !risk.passed && !request.suppress {
            let rule = if risk.classes_below_k > 0 {
                RULE_GATE
            } else {
                RULE_DIVERSITY
            };
            return Err(refused(
                rule,
                format!(
                    "release {} table {table} fails the risk gate: {risk}. Generalise further \
                     in the policy's [release] section, or pass --suppress to remove the {} \
                     records at risk (the highest risk left would be {:.4})",
                    request.name, risk.records_at_risk, risk.released_highest_risk
                ),
            ));
        }
        risk.suppressed_records = risk.records_at_risk;
        let column_labels: Vec<(String, String)> = schema
            .fields()
            .iter()
            .zip(&labels)
            .map(|(f, l)| (f.name().clone(), key_class(l).to_string()))
            .collect();
        let (files, rows) = write_files(
            store,
            format!("{ZONE}/{}/data/{attempt}/{table}", request.name),
            &schema,
            staged,
            Arc::new(gate.released()),
            writer_properties(data_keys, &column_labels)?,
        )
        .await?;
        tracing::info!(
            release = %request.name,
            table = %table,
            rows,
            gate_ms = gated.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "release table written"
        );
        if rows != risk.released_records {
            return Err(EngineError::InvalidQuery(format!(
                "release {} table {table}: its sources changed while it was made; run it again",
                request.name
            )));
        }
        risk.released_records = rows;
        tables.push(ReleasedTable {
            name: table.clone(),
            query: crate::audit::fingerprint(&sql).0,
            rows,
            columns: schema
                .fields()
                .iter()
                .zip(&labels)
                .map(|(f, l)| ReleasedColumn {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                    labels: l.iter().cloned().collect(),
                })
                .collect(),
            files,
            risk,
        });
    }
    let after = source_versions(engine, &datasets).await?;
    if before != after {
        return Err(EngineError::InvalidQuery(format!(
            "release {}: a source dataset got a new version while the release was made; run it \
             again",
            request.name
        )));
    }
    Ok((tables, before))
}

async fn source_versions(
    engine: &Engine,
    datasets: &BTreeSet<String>,
) -> Result<Vec<SourceVersion>> {
    let catalog = engine.catalog();
    let mut out = Vec::new();
    for name in datasets {
        let version = match catalog.dataset(name) {
            Some(d) if d.format == lakegate_catalogs::FileFormat::Delta => {
                lakegate_catalogs::delta::history(engine.lake(), d)
                    .await?
                    .iter()
                    .map(|v| v.version)
                    .max()
            }
            _ => None,
        };
        out.push(SourceVersion {
            dataset: name.clone(),
            version,
        });
    }
    Ok(out)
}

/// The key class a released column is encrypted under: that of its most sensitive source.
fn key_class(labels: &BTreeSet<String>) -> &'static str {
    if labels.contains("phi.direct") {
        "phi.direct"
    } else if labels.contains("phi.quasi") {
        "phi.quasi"
    } else {
        "other"
    }
}

/// Per output column of a governed plan, the labels of the dataset columns it derives from.
/// Where the derivation is not followed exactly (an unfamiliar node), every column of the node
/// gets every label of its inputs: more quasi-identifiers, never fewer.
fn lineage(plan: &LogicalPlan, catalog: &lakegate_catalogs::Catalog) -> Vec<BTreeSet<String>> {
    let width = plan.schema().fields().len();
    let from_exprs = |exprs: &[Expr], input: &LogicalPlan| -> Vec<BTreeSet<String>> {
        let inner = lineage(input, catalog);
        exprs
            .iter()
            .map(|e| {
                let mut labels = BTreeSet::new();
                for c in e.column_refs() {
                    match input.schema().index_of_column(c) {
                        Ok(i) => labels.extend(inner[i].iter().cloned()),
                        Err(_) => inner.iter().for_each(|l| labels.extend(l.iter().cloned())),
                    }
                }
                labels
            })
            .collect()
    };
    let everything = |inputs: Vec<&LogicalPlan>| -> Vec<BTreeSet<String>> {
        let mut all = BTreeSet::new();
        for i in inputs {
            for l in lineage(i, catalog) {
                all.extend(l);
            }
        }
        vec![all; width]
    };
    let out = match plan {
        LogicalPlan::TableScan(scan) => {
            let dataset = crate::thresholds::governed_dataset(scan)
                .and_then(|d| catalog.dataset(&d).cloned());
            scan.projected_schema
                .fields()
                .iter()
                .map(|f| {
                    let mut labels = BTreeSet::new();
                    if let Some(c) = dataset
                        .as_ref()
                        .and_then(|d| d.columns.iter().find(|c| &c.name == f.name()))
                    {
                        labels.insert(c.label.clone());
                    }
                    labels
                })
                .collect()
        }
        LogicalPlan::Projection(p) => from_exprs(&p.expr, &p.input),
        LogicalPlan::Aggregate(a) => {
            let exprs: Vec<Expr> = a
                .group_expr
                .iter()
                .chain(a.aggr_expr.iter())
                .cloned()
                .collect();
            // Grouping sets add an id column; fall back to everything then.
            if exprs.len() == width {
                from_exprs(&exprs, &a.input)
            } else {
                everything(vec![&a.input])
            }
        }
        LogicalPlan::Window(w) => {
            let mut out = lineage(&w.input, catalog);
            out.extend(from_exprs(&w.window_expr, &w.input));
            out
        }
        LogicalPlan::Join(j) => {
            use datafusion::logical_expr::JoinType;
            match j.join_type {
                JoinType::LeftSemi | JoinType::LeftAnti => lineage(&j.left, catalog),
                JoinType::RightSemi | JoinType::RightAnti => lineage(&j.right, catalog),
                _ => {
                    let mut out = lineage(&j.left, catalog);
                    out.extend(lineage(&j.right, catalog));
                    out
                }
            }
        }
        LogicalPlan::Union(u) => {
            let mut out = vec![BTreeSet::new(); width];
            for input in &u.inputs {
                for (i, l) in lineage(input, catalog).into_iter().enumerate() {
                    if let Some(slot) = out.get_mut(i) {
                        slot.extend(l);
                    }
                }
            }
            out
        }
        other => {
            let inputs = other.inputs();
            if inputs.len() == 1 && inputs[0].schema().fields().len() == width {
                lineage(inputs[0], catalog)
            } else {
                everything(inputs)
            }
        }
    };
    if out.len() == width {
        out
    } else {
        everything(plan.inputs())
    }
}

/// The k-anonymity gate of one table: equivalence classes of its quasi-identifiers, numbered
/// as rows arrive, with their records and distinct patients. Columns are found by name.
struct Gate {
    k: u64,
    quasi_names: Vec<String>,
    unit: Option<String>,
    /// Hashes a unit's values: a class's patients are counted by their ids' 64-bit hashes.
    unit_hasher: foldhash::fast::FixedState,
    /// Columns derived from `phi.direct`, which must hold no value.
    direct: Vec<String>,
    converter: Option<RowConverter>,
    classes: HashMap<Box<[u8]>, u32, foldhash::fast::RandomState>,
    records: Vec<u64>,
    patients: Vec<u64>,
    /// (class, patient) pairs seen, each folded into one 64-bit key (half the memory of the
    /// pair, which matters at a pair per row). Two pairs that fold alike (about one chance in
    /// 2^64 per pair of pairs, as keys are seeded per gate) count once: a class can only be
    /// counted smaller than it is, never larger, so the gate errs towards suppression.
    seen: HashSet<u64, foldhash::fast::RandomState>,
    /// The key of the row before: rows of one patient and class often come in a run.
    last_pair: Option<u64>,
    /// Non-null values seen per quasi-identifier and per direct column, by name.
    non_null: HashMap<String, u64>,
    /// l-diversity: the policy's l and the sensitive columns of this table.
    l: u64,
    sensitive: Vec<String>,
    /// (class, sensitive column, value hash) seen, and per class and sensitive column (class
    /// * sensitive.len() + column) the distinct non-null values.
    diverse_seen: HashSet<(u32, u32, u64), foldhash::fast::RandomState>,
    diversity: Vec<u64>,
}

impl Gate {
    fn new(schema: &SchemaRef, labels: &[BTreeSet<String>], rules: &ReleaseRules) -> Result<Self> {
        let unit = schema.index_of(UNIT).ok();
        let quasi: Vec<usize> = (0..schema.fields().len())
            .filter(|i| Some(*i) != unit && labels[*i].contains("phi.quasi"))
            .collect();
        let (l, sensitive) = match &rules.diversity {
            None => (0, Vec::new()),
            Some(d) => {
                let present: Vec<String> = d
                    .sensitive
                    .iter()
                    .filter(|c| schema.index_of(c).is_ok())
                    .cloned()
                    .collect();
                if let Some(c) = present.iter().find(|c| {
                    schema
                        .index_of(c)
                        .is_ok_and(|i| quasi.contains(&i) || Some(i) == unit)
                }) {
                    return Err(EngineError::InvalidConfig(format!(
                        "the policy's [release] section names {c} sensitive, but in this \
                         release it is a quasi-identifier or the patient id"
                    )));
                }
                (d.l, present)
            }
        };
        let converter = (!quasi.is_empty()).then(|| {
            RowConverter::new(
                quasi
                    .iter()
                    .map(|i| SortField::new(schema.field(*i).data_type().clone()))
                    .collect(),
            )
            .expect("every Arrow type has a row format")
        });
        Ok(Self {
            k: rules.k,
            quasi_names: quasi
                .iter()
                .map(|i| schema.field(*i).name().clone())
                .collect(),
            unit: unit.map(|i| schema.field(i).name().clone()),
            unit_hasher: {
                use rand::RngCore;
                foldhash::fast::FixedState::with_seed(rand::rngs::OsRng.next_u64())
            },
            direct: (0..schema.fields().len())
                .filter(|i| labels[*i].contains("phi.direct"))
                .map(|i| schema.field(i).name().clone())
                .collect(),
            converter,
            classes: HashMap::default(),
            records: Vec::new(),
            patients: Vec::new(),
            seen: HashSet::default(),
            last_pair: None,
            non_null: HashMap::new(),
            l,
            sensitive,
            diverse_seen: HashSet::default(),
            diversity: Vec::new(),
        })
    }

    fn column<'b>(batch: &'b RecordBatch, name: &str) -> Result<&'b ArrayRef> {
        batch
            .column_by_name(name)
            .ok_or_else(|| EngineError::Internal(format!("release gate: no column {name}")))
    }

    fn rows(&self, batch: &RecordBatch) -> Result<Option<arrow::row::Rows>> {
        let Some(converter) = &self.converter else {
            return Ok(None);
        };
        let columns = self
            .quasi_names
            .iter()
            .map(|n| Self::column(batch, n).cloned())
            .collect::<Result<Vec<ArrayRef>>>()?;
        Ok(Some(
            converter.convert_columns(&columns).map_err(arrow_error)?,
        ))
    }

    fn hashes(&self, batch: &RecordBatch, name: &str) -> Result<Vec<u64>> {
        let mut hashes = vec![0; batch.num_rows()];
        datafusion::common::hash_utils::create_hashes(
            [Self::column(batch, name)?],
            &self.unit_hasher,
            &mut hashes,
        )?;
        Ok(hashes)
    }

    fn unit_hashes(&self, batch: &RecordBatch) -> Result<Option<Vec<u64>>> {
        self.unit
            .as_ref()
            .map(|u| self.hashes(batch, u))
            .transpose()
    }

    /// Counts each row's non-null sensitive values into the distinct values of its class, up
    /// to l: the gate needs no more, and a batch whose classes all have l costs no hashing.
    fn observe_diversity(&mut self, batch: &RecordBatch, classes: &[u32]) -> Result<()> {
        let width = self.sensitive.len();
        if width == 0 {
            return Ok(());
        }
        self.diversity.resize(self.records.len() * width, 0);
        for j in 0..width {
            let short = |c: &u32| self.diversity[*c as usize * width + j] < self.l;
            if !classes.iter().any(short) {
                continue;
            }
            let column = Self::column(batch, &self.sensitive[j])?.clone();
            let hashes = self.hashes(batch, &self.sensitive[j])?;
            for (r, class) in classes.iter().enumerate() {
                let at = *class as usize * width + j;
                if self.diversity[at] < self.l
                    && column.is_valid(r)
                    && self.diverse_seen.insert((*class, j as u32, hashes[r]))
                {
                    self.diversity[at] += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether each class holds k patients or more and l distinct values of each sensitive
    /// column.
    fn class_passes(&self) -> Vec<(bool, bool)> {
        let width = self.sensitive.len();
        (0..self.records.len())
            .map(|c| {
                let k_ok = self.patients[c] >= self.k;
                let l_ok = width == 0
                    || self.diversity[c * width..(c + 1) * width]
                        .iter()
                        .all(|d| *d >= self.l);
                (k_ok, l_ok)
            })
            .collect()
    }

    /// Counts a batch's rows and patients into their classes; returns each row's class.
    fn observe(&mut self, batch: &RecordBatch) -> Result<Vec<u32>> {
        for name in self.quasi_names.iter().chain(&self.direct) {
            let c = Self::column(batch, name)?;
            *self.non_null.entry(name.clone()).or_default() +=
                (c.len() - c.logical_null_count()) as u64;
        }
        let rows = self.rows(batch)?;
        let units = self.unit_hashes(batch)?;
        let mut of_rows = Vec::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            let key: &[u8] = match &rows {
                Some(rows) => rows.row(r).data(),
                None => &[],
            };
            let class = match self.classes.get(key) {
                Some(c) => *c,
                None => {
                    let c = self.records.len() as u32;
                    self.classes.insert(key.into(), c);
                    self.records.push(0);
                    self.patients.push(0);
                    c
                }
            };
            of_rows.push(class);
            self.records[class as usize] += 1;
            match &units {
                Some(u) => {
                    let pair = u[r] ^ (u64::from(class) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    if self.last_pair != Some(pair) && self.seen.insert(pair) {
                        self.patients[class as usize] += 1;
                    }
                    self.last_pair = Some(pair);
                }
                None => self.patients[class as usize] += 1,
            }
        }
        self.observe_diversity(batch, &of_rows)?;
        Ok(of_rows)
    }

    /// Direct-identifier columns that held a value.
    fn identified(&self) -> Vec<String> {
        self.direct
            .iter()
            .filter(|n| self.non_null.get(*n).copied().unwrap_or(0) > 0)
            .cloned()
            .collect()
    }

    fn report(&self, generalised: BTreeMap<String, String>, dropped: Vec<String>) -> RiskReport {
        let records: u64 = self.records.iter().sum();
        let mut report = RiskReport {
            k: self.k,
            unit: if self.unit.is_some() {
                format!("distinct {UNIT}")
            } else {
                "rows".into()
            },
            quasi_identifiers: self
                .quasi_names
                .iter()
                .filter(|n| self.non_null.get(*n).copied().unwrap_or(0) > 0)
                .cloned()
                .collect(),
            generalised,
            dropped,
            records,
            classes: self.records.len() as u64,
            smallest_class: self.patients.iter().copied().min().unwrap_or(0),
            l: self.l,
            sensitive: self.sensitive.clone(),
            lowest_diversity: self.diversity.iter().copied().min().unwrap_or(0),
            ..Default::default()
        };
        let mut risk_sum = 0.0;
        let mut released_sum = 0.0;
        let passes = self.class_passes();
        for ((r, p), (k_ok, l_ok)) in self.records.iter().zip(&self.patients).zip(passes) {
            let risk = 1.0 / (*p).max(1) as f64;
            risk_sum += *r as f64 * risk;
            report.highest_risk = report.highest_risk.max(risk);
            report.classes_below_k += u64::from(!k_ok);
            report.classes_below_l += u64::from(!l_ok);
            if !(k_ok && l_ok) {
                report.records_at_risk += r;
            } else {
                released_sum += *r as f64 * risk;
                report.released_highest_risk = report.released_highest_risk.max(risk);
            }
        }
        report.released_records = records - report.records_at_risk;
        if records > 0 {
            report.average_risk = risk_sum / records as f64;
        }
        if report.released_records > 0 {
            report.released_average_risk = released_sum / report.released_records as f64;
        }
        report.passed = report.records_at_risk == 0;
        report
    }

    /// Whether each class is released: it passes k-anonymity and l-diversity.
    fn released(&self) -> Vec<bool> {
        self.class_passes()
            .into_iter()
            .map(|(k_ok, l_ok)| k_ok && l_ok)
            .collect()
    }
}

fn writer_error(e: impl fmt::Display) -> EngineError {
    EngineError::Internal(format!("release writer: {e}"))
}

/// ZSTD, and the release's own data keys per label class when the lake has a keyring.
fn writer_properties(
    data_keys: &Option<(String, lakegate_catalogs::DataKeys)>,
    labels: &[(String, String)],
) -> Result<parquet::file::properties::WriterProperties> {
    use parquet::basic::{Compression, ZstdLevel};
    let mut props = parquet::file::properties::WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()));
    if let Some((_, keys)) = data_keys {
        props = props.with_file_encryption_properties(
            keys.encryption_of(labels.iter().map(|(n, l)| (n.as_str(), l.as_str())))?,
        );
    }
    Ok(props.build())
}

/// Buckets a released table's rows are scattered into: one random byte per row picks one.
const BUCKETS: usize = 256;
/// Rows a bucket gathers before they are appended to its staging file.
const BUCKET_FLUSH_ROWS: usize = 2048;
/// The column staged beside a table's own: each row's equivalence class, as the gate numbered
/// it, so that the write decides which rows are released without recomputing their classes.
const CLASS_COLUMN: &str = "lakegate_release_class";

/// A released table's rows, each in a uniformly random bucket, the buckets in files of the
/// engine's spill directory (the directory DataFusion's own sorts spill to). Shuffling each
/// group of buckets in memory afterwards yields a uniformly random permutation of the whole
/// table without a global sort: the scatter shuffle. Each batch is put in bucket order with
/// one `take` (the batch is small enough to stay in the CPU's cache), and a bucket's slices
/// are appended to its file once they hold [`BUCKET_FLUSH_ROWS`] rows.
struct Staging {
    schema: SchemaRef,
    spill: Arc<datafusion::execution::disk_manager::DiskManager>,
    rng: rand::rngs::StdRng,
    buckets: Vec<StagedBucket>,
}

type StagingWriter = arrow::ipc::writer::StreamWriter<
    std::io::BufWriter<Box<dyn datafusion::execution::SpillWriter>>,
>;

#[derive(Default)]
struct StagedBucket {
    file: Option<Arc<dyn datafusion::execution::SpillFile>>,
    writer: Option<StagingWriter>,
    /// Slices of rows not yet gathered.
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    rows: usize,
}

/// One bucket's staged rows, to be read back.
struct Staged {
    file: Option<Arc<dyn datafusion::execution::SpillFile>>,
    rows: usize,
}

fn staging_error(e: impl fmt::Display) -> EngineError {
    EngineError::Internal(format!("release staging: {e}"))
}

impl Staging {
    fn new(
        schema: SchemaRef,
        spill: Arc<datafusion::execution::disk_manager::DiskManager>,
    ) -> Self {
        use rand::SeedableRng;
        Self {
            schema,
            spill,
            rng: rand::rngs::StdRng::from_entropy(),
            buckets: (0..BUCKETS).map(|_| StagedBucket::default()).collect(),
        }
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        use rand::RngCore;
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let mut picks = vec![0u8; n];
        self.rng.fill_bytes(&mut picks);
        // A counting sort of the rows by bucket.
        let mut starts = [0u32; BUCKETS + 1];
        for p in &picks {
            starts[*p as usize + 1] += 1;
        }
        for b in 0..BUCKETS {
            starts[b + 1] += starts[b];
        }
        let mut next = starts;
        let mut order = vec![0u32; n];
        for (row, p) in picks.iter().enumerate() {
            order[next[*p as usize] as usize] = row as u32;
            next[*p as usize] += 1;
        }
        let grouped =
            arrow::compute::take_record_batch(batch, &arrow::array::UInt32Array::from(order))
                .map_err(arrow_error)?;
        for b in 0..BUCKETS {
            let (from, to) = (starts[b] as usize, starts[b + 1] as usize);
            if to == from {
                continue;
            }
            let bucket = &mut self.buckets[b];
            bucket.pending.push(grouped.slice(from, to - from));
            bucket.pending_rows += to - from;
            if bucket.pending_rows >= BUCKET_FLUSH_ROWS {
                self.flush(b)?;
            }
        }
        Ok(())
    }

    /// Gathers a bucket's pending slices into one batch appended to the bucket's file.
    fn flush(&mut self, b: usize) -> Result<()> {
        let bucket = &mut self.buckets[b];
        if bucket.pending.is_empty() {
            return Ok(());
        }
        let rows =
            arrow::compute::concat_batches(&self.schema, &bucket.pending).map_err(arrow_error)?;
        bucket.pending.clear();
        bucket.pending_rows = 0;
        bucket.rows += rows.num_rows();
        if bucket.writer.is_none() {
            let file = self
                .spill
                .create_tmp_file("staging a release")
                .map_err(staging_error)?;
            let out = std::io::BufWriter::with_capacity(
                1 << 16,
                file.open_writer().map_err(staging_error)?,
            );
            bucket.writer = Some(
                arrow::ipc::writer::StreamWriter::try_new(out, &self.schema)
                    .map_err(staging_error)?,
            );
            bucket.file = Some(file);
        }
        bucket
            .writer
            .as_mut()
            .expect("set above")
            .write(&rows)
            .map_err(staging_error)
    }

    fn finish(mut self) -> Result<Vec<Staged>> {
        let mut out = Vec::with_capacity(BUCKETS);
        for b in 0..BUCKETS {
            self.flush(b)?;
        }
        for b in 0..BUCKETS {
            let bucket = std::mem::take(&mut self.buckets[b]);
            if let Some(mut writer) = bucket.writer {
                writer.finish().map_err(staging_error)?;
                let mut file = writer
                    .into_inner()
                    .map_err(staging_error)?
                    .into_inner()
                    .map_err(|e| staging_error(e.error()))?;
                file.finish().map_err(staging_error)?;
            }
            out.push(Staged {
                file: bucket.file,
                rows: bucket.rows,
            });
        }
        Ok(out)
    }
}

impl Staged {
    fn read(&self) -> Result<Vec<RecordBatch>> {
        let Some(file) = &self.file else {
            return Ok(Vec::new());
        };
        let at = file
            .path()
            .ok_or_else(|| staging_error("the spill directory is not a local one"))?;
        let reader = arrow::ipc::reader::StreamReader::try_new(
            std::io::BufReader::with_capacity(
                1 << 16,
                std::fs::File::open(at).map_err(staging_error)?,
            ),
            None,
        )
        .map_err(staging_error)?;
        reader.map(|b| b.map_err(staging_error)).collect()
    }
}

/// Runs a released table's query once, in a pipeline of three: the query (its masks run
/// once), a thread on which the gate numbers each row's class, and a thread that stages the
/// row with its class.
async fn stage(
    mut stream: datafusion::execution::SendableRecordBatchStream,
    mut gate: Gate,
    spill: Arc<datafusion::execution::disk_manager::DiskManager>,
) -> Result<(Gate, Vec<Staged>)> {
    let mut fields: Vec<_> = stream.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(arrow::datatypes::Field::new(
        CLASS_COLUMN,
        DataType::UInt32,
        false,
    )));
    let schema = Arc::new(arrow::datatypes::Schema::new(fields));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(4);
    let (classed_tx, mut classed_rx) = tokio::sync::mpsc::channel::<RecordBatch>(4);
    let mut staging = Staging::new(Arc::clone(&schema), spill);
    let observer = tokio::task::spawn_blocking(move || -> Result<Gate> {
        while let Some(batch) = rx.blocking_recv() {
            let classes = gate.observe(&batch)?;
            let mut columns = batch.columns().to_vec();
            columns.push(Arc::new(arrow::array::UInt32Array::from(classes)));
            let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(arrow_error)?;
            if classed_tx.blocking_send(batch).is_err() {
                break;
            }
        }
        Ok(gate)
    });
    let stager = tokio::task::spawn_blocking(move || -> Result<Vec<Staged>> {
        while let Some(batch) = classed_rx.blocking_recv() {
            staging.add(&batch)?;
        }
        staging.finish()
    });
    let mut failed = None;
    while let Some(batch) = stream.next().await {
        match batch {
            Ok(batch) => {
                if tx.send(batch).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(EngineError::from(e));
                break;
            }
        }
    }
    drop(tx);
    // The first error in the pipeline's order says why: the query's, the gate's, the staging's.
    let gate = observer.await.map_err(staging_error)?;
    let staged = stager.await.map_err(staging_error)?;
    match failed {
        Some(e) => Err(e),
        None => Ok((gate?, staged?)),
    }
}

/// Writes a staged table's released rows into the lake: groups of consecutive buckets of about
/// [`ROWS_PER_FILE`] rows, each on a thread of its own (as many as the machine has cores),
/// without the rows of classes the gate suppressed, shuffled, encoded into Parquet files of at
/// most [`ROWS_PER_FILE`] rows, and uploaded in turn. Returns the files and the rows written.
async fn write_files(
    store: &Arc<dyn ObjectStore>,
    folder: String,
    schema: &SchemaRef,
    staged: Vec<Staged>,
    released: Arc<Vec<bool>>,
    props: parquet::file::properties::WriterProperties,
) -> Result<(Vec<ReleasedFile>, u64)> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut groups: Vec<Vec<Staged>> = Vec::new();
    let mut in_group = 0;
    for bucket in staged {
        if bucket.rows == 0 {
            continue;
        }
        if groups.is_empty() || in_group + bucket.rows > ROWS_PER_FILE {
            groups.push(Vec::new());
            in_group = 0;
        }
        in_group += bucket.rows;
        groups.last_mut().expect("pushed above").push(bucket);
    }
    let groups = Arc::new(groups);
    let (file_tx, mut file_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(2);
    let encode = {
        let (schema, props) = (Arc::clone(schema), props.clone());
        move |batch: &RecordBatch| -> Result<Vec<u8>> {
            // Sized up front: a growing buffer would copy the file at every doubling.
            let mut w = parquet::arrow::ArrowWriter::try_new(
                Vec::with_capacity(batch.get_array_memory_size() / 2),
                Arc::clone(&schema),
                Some(props.clone()),
            )
            .map_err(writer_error)?;
            w.write(batch).map_err(writer_error)?;
            w.into_inner().map_err(writer_error)
        }
    };
    let own_columns: Vec<usize> = (0..schema.fields().len()).collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(groups.len())
        .max(1);
    let (next, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut encoders = Vec::new();
    for _ in 0..workers {
        let (groups, released, encode) =
            (Arc::clone(&groups), Arc::clone(&released), encode.clone());
        let (next, stop, file_tx) = (Arc::clone(&next), Arc::clone(&stop), file_tx.clone());
        let own_columns = own_columns.clone();
        encoders.push(tokio::task::spawn_blocking(move || -> Result<()> {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let mut rng = rand::rngs::StdRng::from_entropy();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= groups.len() || stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let mut work = || -> Result<()> {
                    let mut batches = Vec::new();
                    let mut order = Vec::new();
                    for bucket in &groups[i] {
                        for batch in bucket.read()? {
                            let classes = batch
                                .column(own_columns.len())
                                .as_any()
                                .downcast_ref::<arrow::array::UInt32Array>()
                                .ok_or_else(|| staging_error("no class column"))?;
                            let b = batches.len();
                            order.extend(
                                classes
                                    .values()
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, c)| released[**c as usize])
                                    .map(|(r, _)| (b, r)),
                            );
                            batches.push(batch.project(&own_columns).map_err(arrow_error)?);
                        }
                    }
                    if order.is_empty() {
                        return Ok(());
                    }
                    // The released rows in a random order, in one copy.
                    order.shuffle(&mut rng);
                    let from: Vec<&RecordBatch> = batches.iter().collect();
                    let rows = arrow::compute::interleave_record_batch(&from, &order)
                        .map_err(arrow_error)?;
                    drop(batches);
                    let mut offset = 0;
                    while offset < rows.num_rows() {
                        let n = (rows.num_rows() - offset).min(ROWS_PER_FILE);
                        let bytes = encode(&rows.slice(offset, n))?;
                        file_tx
                            .blocking_send((bytes, n as u64))
                            .map_err(|_| writer_error("the upload stopped"))?;
                        offset += n;
                    }
                    Ok(())
                };
                if let Err(e) = work() {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }));
    }
    drop(file_tx);
    let put = |at: String, bytes: Vec<u8>| async move {
        let file = ReleasedFile {
            path: at.clone(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        };
        store
            .put(&Path::from(at), PutPayload::from(bytes))
            .await
            .map_err(store_error)?;
        Ok::<_, EngineError>(file)
    };
    let uploading = async {
        let (mut files, mut rows) = (Vec::new(), 0u64);
        while let Some((bytes, n)) = file_rx.recv().await {
            let at = format!("{folder}/part-{:05}.parquet", files.len());
            files.push(put(at, bytes).await?);
            rows += n;
        }
        Ok::<_, EngineError>((files, rows))
    };
    let (uploaded, encoded) = tokio::join!(uploading, futures::future::join_all(encoders));
    // An encoder's error says more than the upload's "stopped".
    for e in encoded {
        e.map_err(writer_error)??;
    }
    let (mut files, rows) = uploaded?;
    // An empty table still gets one file, so that it has a schema to read.
    if files.is_empty() {
        let bytes = encode(&RecordBatch::new_empty(Arc::clone(schema)))?;
        files.push(put(format!("{folder}/part-00000.parquet"), bytes).await?);
    }
    Ok((files, rows))
}

/// A release's manifest, as stored, with its signature checked.
pub struct Stored {
    pub manifest: Manifest,
    pub manifest_sha256: String,
    pub approval: Option<Approval>,
    pub deleted: Option<Tombstone>,
}

/// Read a release's manifest and approval and check their signatures with `key`.
/// `Ok(None)` when no release has that name.
pub async fn load(
    store: &dyn ObjectStore,
    name: &str,
    key: &VerifyingKey,
) -> Result<Option<Stored>> {
    check_name("release", name)?;
    let Some(body) = get_optional(store, &path(name, "manifest.json")).await? else {
        return Ok(None);
    };
    let integrity = |what: &str| {
        refused(
            RULE_INTEGRITY,
            format!("release {name} failed verification: {what}"),
        )
    };
    let manifest: Manifest =
        serde_json::from_slice(&body).map_err(|_| integrity("its manifest does not parse"))?;
    if manifest.name != name {
        return Err(integrity("its manifest names another release"));
    }
    if check_name("attempt", &manifest.attempt).is_err() {
        return Err(integrity("its manifest names no valid attempt"));
    }
    let signature = get_optional(
        store,
        &path(name, &format!("manifest.{}.sig", manifest.attempt)),
    )
    .await?
    .ok_or_else(|| integrity("its manifest is not signed"))?;
    if !signature_holds(key, &body, &String::from_utf8_lossy(&signature)) {
        return Err(integrity(
            "its manifest's signature does not hold (changed after it was made)",
        ));
    }
    let manifest_sha256 = sha256_hex(&body);
    let approval = match get_optional(store, &path(name, "approval.json")).await? {
        None => None,
        Some(bytes) => {
            let approval: Approval = serde_json::from_slice(&bytes)
                .map_err(|_| integrity("its approval does not parse"))?;
            if approval.release != name
                || !signature_holds(key, &approval.signed_bytes(), &approval.signature)
            {
                return Err(integrity("its approval's signature does not hold"));
            }
            if approval.manifest_sha256 != manifest_sha256 {
                return Err(integrity("its manifest changed after it was approved"));
            }
            Some(approval)
        }
    };
    let deleted = match get_optional(store, &tombstone_path(name)).await? {
        None => None,
        Some(bytes) => Some(
            serde_json::from_slice(&bytes)
                .map_err(|_| integrity("its deletion record does not parse"))?,
        ),
    };
    Ok(Some(Stored {
        manifest,
        manifest_sha256,
        approval,
        deleted,
    }))
}

impl Stored {
    pub fn status(&self) -> Status {
        if let Some(t) = &self.deleted {
            return Status::Deleted {
                at: t.deleted_at.clone(),
                reason: t.reason.clone(),
            };
        }
        match &self.approval {
            None => Status::Pending,
            Some(a) => Status::Approved {
                by: a.approved_by.clone(),
                at: a.approved_at.clone(),
            },
        }
    }
}

/// Approve a pending release: only a principal with `release_approver=true` who did not
/// create it. The approval names the manifest's SHA-256, so a manifest changed afterwards is
/// no longer approved.
pub async fn approve(
    lake: &Lake,
    name: &str,
    approver: &Principal,
    signer: &AuditKey,
) -> Result<Approval> {
    let store = lake.store();
    let stored = load(store.as_ref(), name, &signer.verifying_key())
        .await?
        .ok_or_else(|| EngineError::InvalidQuery(format!("no release named {name}")))?;
    if approver
        .attributes
        .get("release_approver")
        .map(String::as_str)
        != Some("true")
    {
        return Err(refused(
            RULE_APPROVAL,
            format!(
                "{} may not approve releases: approvers hold the release_approver attribute",
                approver.name
            ),
        ));
    }
    if approver.name == stored.manifest.created_by {
        return Err(refused(
            RULE_APPROVAL,
            format!(
                "{} created release {name} and may not approve it: a release needs two people",
                approver.name
            ),
        ));
    }
    if let Some(t) = &stored.deleted {
        return Err(EngineError::InvalidQuery(format!(
            "release {name} was deleted at {}",
            t.deleted_at
        )));
    }
    if let Some(a) = &stored.approval {
        return Err(EngineError::InvalidQuery(format!(
            "release {name} is already approved by {} at {}",
            a.approved_by, a.approved_at
        )));
    }
    let mut approval = Approval {
        release: name.to_string(),
        manifest_sha256: stored.manifest_sha256,
        approved_by: approver.name.clone(),
        approved_at: crate::audit::now_rfc3339(),
        signature: String::new(),
    };
    approval.signature = signer.sign_hex(&approval.signed_bytes());
    let put = store
        .put_opts(
            &path(name, "approval.json"),
            PutPayload::from(serde_json::to_vec_pretty(&approval).expect("approvals serialize")),
            PutOptions::from(PutMode::Create),
        )
        .await;
    match put {
        Ok(_) => Ok(approval),
        Err(object_store::Error::AlreadyExists { .. }) => Err(EngineError::InvalidQuery(format!(
            "release {name} was approved by someone else meanwhile"
        ))),
        Err(e) => Err(store_error(e)),
    }
}

/// Every release's name in the lake, sorted.
pub async fn names(store: &dyn ObjectStore) -> Result<Vec<String>> {
    let listed = store
        .list_with_delimiter(Some(&Path::from(ZONE)))
        .await
        .map_err(store_error)?;
    let mut names: Vec<String> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// Check a release end to end: signatures, approval, and every file's size and SHA-256.
/// Returns the problems found (empty when intact), each naming the table and file.
pub async fn verify(
    store: &dyn ObjectStore,
    name: &str,
    key: &VerifyingKey,
) -> Result<(Stored, Vec<String>)> {
    let stored = load(store, name, key)
        .await?
        .ok_or_else(|| EngineError::InvalidQuery(format!("no release named {name}")))?;
    let mut problems = Vec::new();
    if stored.deleted.is_some() {
        return Ok((stored, problems));
    }
    for t in &stored.manifest.tables {
        for (i, f) in t.files.iter().enumerate() {
            match get_optional(store, &Path::from(f.path.as_str())).await? {
                None => problems.push(format!("table {} part {i}: missing", t.name)),
                Some(bytes) if bytes.len() as u64 != f.bytes || sha256_hex(&bytes) != f.sha256 => {
                    problems.push(format!(
                        "table {} part {i}: changed (its SHA-256 differs from the manifest's)",
                        t.name
                    ))
                }
                Some(_) => {}
            }
        }
    }
    Ok((stored, problems))
}

/// What the server needs to read releases: the lake, its keys, the key that signs manifests
/// and approvals, and which files it has already checked.
pub(crate) struct Shelf {
    lake: Lake,
    lake_keys: Arc<crate::encrypted::LakeKeys>,
    state: SessionState,
    signer: OnceLock<VerifyingKey>,
    /// Files whose SHA-256 matched their manifest, by path, with the size and version (e-tag
    /// or modification time) they had then: a file changed since is checked again.
    verified: Mutex<HashMap<String, (u64, String)>>,
}

impl fmt::Debug for Shelf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shelf").finish_non_exhaustive()
    }
}

impl Shelf {
    pub(crate) fn new(
        lake: Lake,
        lake_keys: Arc<crate::encrypted::LakeKeys>,
        state: SessionState,
    ) -> Self {
        Self {
            lake,
            lake_keys,
            state,
            signer: OnceLock::new(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn trust(&self, key: VerifyingKey) {
        let _ = self.signer.set(key);
    }

    /// One table of an approved release, for `principal`: refused unless the release is
    /// approved, intact and for the caller's project.
    async fn open(
        &self,
        name: &str,
        table: &str,
        project: Option<&str>,
    ) -> Result<Option<Arc<dyn TableProvider>>> {
        // A release that does not exist and one of another project look the same.
        let unavailable = || {
            refused(
                RULE_READERS,
                format!("release {name} is not available to you"),
            )
        };
        if check_name("release", name).is_err() {
            return Err(unavailable());
        }
        let key = self.signer.get().ok_or_else(|| {
            refused(
                RULE_INTEGRITY,
                "this server has no key to check release signatures with".into(),
            )
        })?;
        let store = self.lake.store();
        let Some(stored) = load(store.as_ref(), name, key).await? else {
            return Err(unavailable());
        };
        if project != Some(stored.manifest.project.as_str()) {
            return Err(unavailable());
        }
        if let Some(t) = &stored.deleted {
            return Err(refused(
                RULE_LIFECYCLE,
                format!(
                    "release {name} was deleted at {} ({}); its manifest is kept",
                    t.deleted_at, t.reason
                ),
            ));
        }
        let Some(approval) = &stored.approval else {
            return Err(refused(
                RULE_APPROVAL,
                format!("release {name} is pending approval"),
            ));
        };
        let Some(t) = stored.manifest.tables.iter().find(|t| t.name == table) else {
            return Ok(None);
        };
        for (i, f) in t.files.iter().enumerate() {
            self.check_file(store.as_ref(), f).await.map_err(|why| {
                refused(
                    RULE_INTEGRITY,
                    format!(
                        "release {name} failed verification: table {table} part {i} {why}; \
                         run `lakegate release verify {name}`"
                    ),
                )
            })?;
        }
        let key_name = stored.manifest.data_keys.clone();
        if let Some(k) = &key_name {
            if self.lake_keys.release(k).is_none() {
                let keys = lakegate_catalogs::keys::load(&self.lake, k)
                    .await
                    .map_err(|e| {
                        tracing::error!(release = name, error = %e, "release keys not unwrapped");
                        EngineError::Undecryptable {
                            message: format!("release {name} cannot be decrypted by this server"),
                            detail: e.to_string(),
                        }
                    })?;
                self.lake_keys.hold_release(k, keys.decryption());
            }
        }
        let format = match &key_name {
            Some(k) => ParquetFormat::default().with_options(crate::encrypted::scan_options(k)),
            None => ParquetFormat::default(),
        }
        // Strings decoded straight into the `Utf8` arrays a result leaves as: a training job
        // reads a release whole, so views would spare no copy and would be cast to `Utf8` on
        // the way out (a second copy of every string; 1.67 -> 1.43 s of server CPU per GB).
        .with_force_view_types(false);
        let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
        let urls = t
            .files
            .iter()
            .map(|f| ListingTableUrl::parse(format!("{}{}", crate::engine::LAKE_URL, f.path)))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .infer_schema(&self.state)
            .await?;
        let inner = ListingTable::try_new(config)?;
        Ok(Some(Arc::new(ReleaseTable {
            label: format!("releases.{name}.{table}"),
            approved_by: approval.approved_by.clone(),
            inner: Arc::new(inner),
        })))
    }

    async fn check_file(&self, store: &dyn ObjectStore, f: &ReleasedFile) -> Result<(), String> {
        let at = Path::from(f.path.as_str());
        let meta = store
            .head(&at)
            .await
            .map_err(|_| "is missing".to_string())?;
        let version = meta
            .e_tag
            .clone()
            .unwrap_or_else(|| meta.last_modified.to_rfc3339());
        let known = self
            .verified
            .lock()
            .ok()
            .and_then(|v| v.get(&f.path).cloned());
        if known == Some((meta.size, version.clone())) {
            return Ok(());
        }
        if meta.size != f.bytes {
            return Err("changed after approval (its size differs)".into());
        }
        let bytes = store
            .get(&at)
            .await
            .map_err(|_| "is missing".to_string())?
            .bytes()
            .await
            .map_err(|_| "could not be read".to_string())?;
        if sha256_hex(&bytes) != f.sha256 {
            return Err("changed after approval (its SHA-256 differs)".into());
        }
        if let Ok(mut v) = self.verified.lock() {
            v.insert(f.path.clone(), (meta.size, version));
        }
        Ok(())
    }
}

/// The `releases` catalog of one caller: each schema is a release, read when named.
#[derive(Debug)]
pub(crate) struct ReleasesCatalog {
    pub(crate) shelf: Arc<Shelf>,
    pub(crate) project: Option<String>,
}

impl CatalogProvider for ReleasesCatalog {
    fn schema_names(&self) -> Vec<String> {
        Vec::new()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        Some(Arc::new(ReleaseSchema {
            shelf: Arc::clone(&self.shelf),
            name: name.to_string(),
            project: self.project.clone(),
        }))
    }
}

#[derive(Debug)]
struct ReleaseSchema {
    shelf: Arc<Shelf>,
    name: String,
    project: Option<String>,
}

#[async_trait]
impl SchemaProvider for ReleaseSchema {
    fn table_names(&self) -> Vec<String> {
        Vec::new()
    }

    async fn table(
        &self,
        table: &str,
    ) -> datafusion::common::Result<Option<Arc<dyn TableProvider>>> {
        self.shelf
            .open(&self.name, table, self.project.as_deref())
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }

    fn table_exist(&self, _name: &str) -> bool {
        false
    }
}

/// One table of an approved release. Its rows were governed when the release was made; its
/// scan sits under a policy boundary named after it, so the verifier and the audit trail see
/// what was read.
#[derive(Debug)]
pub(crate) struct ReleaseTable {
    pub(crate) label: String,
    pub(crate) approved_by: String,
    inner: Arc<ListingTable>,
}

#[async_trait]
impl TableProvider for ReleaseTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        // Every row of a release is the caller's to read: pruning by statistics is safe.
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn DFSession,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let scan = self.inner.scan(state, projection, filters, limit).await?;
        Ok(Arc::new(crate::governed::PolicyBoundaryExec::release(
            scan,
            self.label.clone(),
        )))
    }
}

/// The release tables a plan reads, `releases.NAME.table`, with their approvers.
pub(crate) fn released_scans(plan: &LogicalPlan) -> Vec<(String, String)> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Ok(p) = datafusion::datasource::source_as_provider(&scan.source) {
                if let Some(r) = (p.as_ref() as &dyn Any).downcast_ref::<ReleaseTable>() {
                    out.push((r.label.clone(), r.approved_by.clone()));
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    /// A table of a patient id, a ZIP (the one quasi-identifier) and a value, with labels.
    fn patients_by_zip() -> (SchemaRef, Vec<BTreeSet<String>>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("zip", DataType::Utf8, true),
            Field::new("value", DataType::Int32, true),
        ]));
        let labels = vec![
            BTreeSet::from(["identifier".to_string()]),
            BTreeSet::from(["phi.quasi".to_string()]),
            BTreeSet::from(["clinical".to_string()]),
        ];
        (schema, labels)
    }

    /// A batch of `patients_by_zip`.
    fn rows_of(
        schema: &SchemaRef,
        patients: &[&str],
        zips: &[&str],
        values: Vec<Option<i32>>,
    ) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![
                Arc::new(StringArray::from(patients.to_vec())),
                Arc::new(StringArray::from(zips.to_vec())),
                Arc::new(Int32Array::from(values)),
            ],
        )
        .unwrap()
    }

    /// Whether the gate releases each row, by the classes `observe` gave them.
    fn released_rows(gate: &Gate, classes: &[u32]) -> Vec<bool> {
        let released = gate.released();
        classes.iter().map(|c| released[*c as usize]).collect()
    }

    fn k_of(k: u64) -> ReleaseRules {
        ReleaseRules {
            k,
            ..Default::default()
        }
    }

    /// The one-pass write: every released row exactly once, the suppressed class's rows
    /// never, the staged class column gone, and the rows in a new order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn staged_rows_are_written_once_shuffled_and_without_suppressed_classes() {
        let (schema, labels) = patients_by_zip();
        // 50,000 rows: zip 100 held by 1,000 patients; zip 999 by one patient (3 rows).
        let n = 50_000i32;
        let batches: Vec<RecordBatch> = (0..n)
            .step_by(4096)
            .map(|from| {
                let to = (from + 4096).min(n);
                let zip = |v: i32| if v < 3 { "999" } else { "100" };
                let patient = |v: i32| {
                    if v < 3 {
                        "lonely".to_string()
                    } else {
                        format!("p{}", v % 1000)
                    }
                };
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(StringArray::from(
                            (from..to).map(patient).collect::<Vec<_>>(),
                        )),
                        Arc::new(StringArray::from((from..to).map(zip).collect::<Vec<_>>())),
                        Arc::new(Int32Array::from((from..to).collect::<Vec<_>>())),
                    ],
                )
                .unwrap()
            })
            .collect();
        let stream = Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                Arc::clone(&schema),
                futures::stream::iter(batches.into_iter().map(Ok)),
            ),
        );
        let spill = Arc::new(
            datafusion::execution::disk_manager::DiskManagerBuilder::default()
                .build()
                .unwrap(),
        );
        let (gate, staged) = stage(
            stream,
            Gate::new(&schema, &labels, &k_of(11)).unwrap(),
            spill,
        )
        .await
        .unwrap();
        assert_eq!(staged.len(), BUCKETS);
        assert_eq!(staged.iter().map(|s| s.rows).sum::<usize>(), n as usize);
        let report = gate.report(BTreeMap::new(), Vec::new());
        assert_eq!((report.records, report.records_at_risk), (n as u64, 3));
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let (files, rows) = write_files(
            &store,
            "releases/t/data/a/t".into(),
            &schema,
            staged,
            Arc::new(gate.released()),
            writer_properties(&None, &[]).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(rows, n as u64 - 3);
        let mut values = Vec::new();
        for f in &files {
            let bytes = store
                .get(&Path::from(f.path.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(sha256_hex(&bytes), f.sha256);
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 8192)
                    .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                assert_eq!(
                    batch.schema().fields().len(),
                    3,
                    "the class column is not released"
                );
                let v = batch
                    .column(2)
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .unwrap();
                values.extend(v.values().iter().copied());
            }
        }
        let in_order: Vec<i32> = (3..n).collect();
        assert_ne!(values, in_order, "the rows are shuffled");
        values.sort_unstable();
        assert_eq!(
            values, in_order,
            "every released row exactly once, none suppressed"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("release", "oncology-2026-12").is_ok());
        for bad in ["", "../x", "A", "a/b", "a..b", "-a", &"a".repeat(65)] {
            assert!(check_name("release", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_gate_counts_patients_per_class() {
        let (schema, labels) = patients_by_zip();
        let mut gate = Gate::new(&schema, &labels, &k_of(3)).unwrap();
        // zip 100: patients a, b, c (4 rows); zip 200: patient d twice.
        let batch = rows_of(
            &schema,
            &["a", "b", "c", "a", "d", "d"],
            &["100", "100", "100", "100", "200", "200"],
            (1..=6).map(Some).collect(),
        );
        let classes = gate.observe(&batch).unwrap();
        let report = gate.report(BTreeMap::new(), Vec::new());
        assert_eq!(report.quasi_identifiers, vec!["zip".to_string()]);
        assert_eq!(report.records, 6);
        assert_eq!(report.classes, 2);
        assert_eq!(report.smallest_class, 1);
        assert_eq!(report.classes_below_k, 1);
        assert_eq!(report.records_at_risk, 2);
        assert_eq!(report.highest_risk, 1.0);
        // 4 records at 1/3, 2 at 1/1.
        assert!((report.average_risk - (4.0 / 3.0 + 2.0) / 6.0).abs() < 1e-12);
        assert!(!report.passed);
        assert_eq!(report.released_records, 4);
        assert!((report.released_highest_risk - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            released_rows(&gate, &classes),
            vec![true, true, true, true, false, false]
        );
    }

    #[test]
    fn the_gate_counts_distinct_sensitive_values_per_class() {
        let (schema, labels) = patients_by_zip();
        let rules = ReleaseRules {
            k: 2,
            diversity: Some(lakegate_policies::Diversity {
                l: 2,
                sensitive: vec!["value".into(), "not_released".into()],
            }),
            ..Default::default()
        };
        let mut gate = Gate::new(&schema, &labels, &rules).unwrap();
        // zip 100: patients a, b with values 1, 2 (diverse); zip 200: c, d both with value 7
        // (and a null, which is no value); zip 300: e alone.
        let batch = rows_of(
            &schema,
            &["a", "b", "c", "d", "d", "e"],
            &["100", "100", "200", "200", "200", "300"],
            vec![Some(1), Some(2), Some(7), Some(7), None, Some(9)],
        );
        let classes = gate.observe(&batch).unwrap();
        let report = gate.report(BTreeMap::new(), Vec::new());
        assert_eq!(
            (report.l, report.sensitive.clone()),
            (2, vec!["value".into()])
        );
        assert_eq!(report.classes_below_k, 1);
        assert_eq!(report.classes_below_l, 2);
        assert_eq!(report.lowest_diversity, 1);
        assert_eq!(report.records_at_risk, 4);
        assert_eq!(report.released_records, 2);
        assert!(!report.passed);
        let text = report.to_string();
        assert!(
            text.contains(
                "l=2 over value: fewest distinct values in a class 1 (counted up to l), 2 classes \
                 below l"
            ),
            "{text}"
        );
        assert_eq!(
            released_rows(&gate, &classes),
            vec![true, true, false, false, false, false]
        );
        // A sensitive column that is a quasi-identifier in the release is a policy mistake.
        let rules = ReleaseRules {
            diversity: Some(lakegate_policies::Diversity {
                l: 2,
                sensitive: vec!["zip".into()],
            }),
            ..Default::default()
        };
        let e = Gate::new(&schema, &labels, &rules).err().unwrap();
        assert!(e.to_string().contains("names zip sensitive"), "{e}");
    }
}
