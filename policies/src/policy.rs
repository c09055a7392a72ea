//! Attribute-based policy: casbin decides allow/deny; each allowing rule carries typed
//! obligations (row filters, column masks, an aggregation threshold) checked against the
//! catalog when the policy loads.
//!
//! A policy file is TOML (`[[rule]]` tables); each rule becomes one casbin policy line
//! `(subject condition, object condition, action, effect, rule name)` evaluated by the casbin
//! model (`model.conf`) with `eval()`. The request is `(principal attributes, dataset
//! attributes, action, context)`. Deny beats allow; no matching allow denies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};
use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use lakegate_catalogs::{Catalog, ColumnType, Dataset};
use serde::Deserialize;

use crate::{PolicyError, Principal, Result};

/// The casbin model used when a policy names none.
pub const DEFAULT_MODEL: &str = include_str!("../demo/model.conf");

/// Attributes a rule may refer to (`r.sub.NAME`). Anything else is a typo and refused at load.
pub const ATTRIBUTES: &[&str] = &[
    "name",
    "role",
    "project",
    "purpose",
    "environment",
    "site",
    "release_approver",
];
/// Dataset attributes (`r.obj.NAME`).
const OBJECT_ATTRIBUTES: &[&str] = &["name", "schema", "table", "zone", "tags", "owner"];
/// Context attributes (`r.ctx.NAME`).
const CONTEXT_ATTRIBUTES: &[&str] = &["now", "hour", "weekday", "environment"];

/// What a query does with a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Individual rows leave (possibly masked and filtered).
    RowQuery,
    /// Only aggregates over the dataset leave.
    AggregateQuery,
    /// New rows are loaded into the dataset (`lakegate ingest`); nothing is read out by it.
    Ingest,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::RowQuery => "row_query",
            Action::AggregateQuery => "aggregate_query",
            Action::Ingest => "ingest",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Effect {
    Allow,
    Deny,
}

/// A literal or a principal attribute in a row filter.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum FilterValue {
    Bool(bool),
    Int(i64),
    Str(String),
    Attribute { attribute: String },
}

/// A set of subjects: the `key` values of `dataset` rows that pass `filter`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectSet {
    pub dataset: String,
    pub key: String,
    #[serde(rename = "where")]
    pub filter: Box<RowFilter>,
}

/// A row filter: `column = value` or `column IN (subject set)`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowFilter {
    pub column: String,
    #[serde(default)]
    pub equals: Option<FilterValue>,
    #[serde(default, rename = "in")]
    pub in_set: Option<SubjectSet>,
}

/// A column mask. All are type-preserving and map NULL to NULL.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Mask {
    /// Always NULL.
    Nullify,
    /// A constant text in place of every non-null value.
    Redact { text: String },
    /// Keep the last `n` characters, replace the others with `*`.
    ShowLast { n: usize },
    /// Keep the first `n` characters, replace the others with `*`.
    ShowFirst { n: usize },
    /// Keyed HMAC-SHA256 pseudonym, with the key of the principal's project.
    Pseudonym,
    /// A date truncated to 1 January of its year; with `collapse_age_over`, birth years of
    /// people older than that are collapsed into one (HIPAA Safe Harbor's 90+).
    YearOnly {
        #[serde(default)]
        collapse_age_over: Option<u32>,
    },
    /// ZIP code to its first three digits, or `000` in a restricted area.
    Zip3,
    /// Shift dates and times by a per-subject offset (keyed HMAC of the subject id, stable within
    /// a project) of at most `max_days` either way.
    DateShift { subject: String, max_days: u32 },
    /// Numbers to the lower bound of their bucket of `width`.
    Bucket { width: f64 },
}

impl Mask {
    fn accepts(&self, t: ColumnType) -> bool {
        use ColumnType::*;
        match self {
            Mask::Nullify => true,
            Mask::Redact { .. }
            | Mask::ShowLast { .. }
            | Mask::ShowFirst { .. }
            | Mask::Pseudonym
            | Mask::Zip3 => t == Utf8,
            Mask::YearOnly { .. } => matches!(t, Date32 | TimestampUtc),
            Mask::DateShift { .. } => matches!(t, Date32 | TimestampUtc),
            Mask::Bucket { .. } => matches!(t, Float64 | Int32 | Int64),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaskSpec {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    columns: Vec<String>,
    mask: Mask,
}

/// An aggregation threshold: every released group must hold at least `k` distinct values of
/// `unit` (the privacy unit, e.g. `patient_id`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub k: u32,
    pub unit: String,
}

/// Differentially private aggregates only (`differential_privacy = { ... }` in a rule): the
/// privacy unit, the budget per window, what one query spends, the contribution bounds and the
/// clamping bounds of every numeric column (from the policy, never from the data).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DifferentialPrivacySpec {
    unit: String,
    epsilon: f64,
    #[serde(default)]
    delta: f64,
    window: String,
    epsilon_per_query: f64,
    #[serde(default)]
    delta_per_query: f64,
    #[serde(default = "one")]
    max_groups_per_unit: u32,
    #[serde(default = "one")]
    max_rows_per_group: u32,
    #[serde(default)]
    bounds: BTreeMap<String, Vec<f64>>,
}

fn one() -> u32 {
    1
}

/// A differential privacy grant, checked against the catalog when the policy loads.
#[derive(Clone, Debug, PartialEq)]
pub struct DifferentialPrivacy {
    /// The privacy unit column (e.g. `patient_id`): one unit's data is what is protected.
    pub unit: String,
    /// Budget per window.
    pub epsilon: f64,
    pub delta: f64,
    /// Window length in seconds; windows are aligned to the Unix epoch.
    pub window_seconds: u64,
    /// What each query spends.
    pub epsilon_per_query: f64,
    pub delta_per_query: f64,
    /// G: the most groups of one query a unit contributes to.
    pub max_groups_per_unit: u32,
    /// L: the most rows a unit contributes to one group.
    pub max_rows_per_group: u32,
    /// Column -> (lower, upper) clamping bounds, for every numeric column.
    pub bounds: BTreeMap<String, (f64, f64)>,
}

/// `30d`, `12h`, `90m`, `3600s` in seconds.
fn parse_window(text: &str) -> std::result::Result<u64, String> {
    let bad =
        || format!("differential_privacy window '{text}' does not parse; write e.g. 30d, 12h, 90m");
    let text = text.trim();
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    match n.checked_mul(seconds) {
        Some(s) if s > 0 => Ok(s),
        _ => Err(bad()),
    }
}

impl DifferentialPrivacySpec {
    /// The typed grant for dataset `d`: every number in range, every numeric column bounded.
    fn check(&self, d: &Dataset) -> std::result::Result<DifferentialPrivacy, String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(format!(
                    "differential_privacy {name} must be a positive number"
                ))
            }
        };
        let probability = |name: &str, v: f64| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(v)
            } else {
                Err(format!(
                    "differential_privacy {name} must be at least 0 and below 1"
                ))
            }
        };
        let epsilon = positive("epsilon", self.epsilon)?;
        let epsilon_per_query = positive("epsilon_per_query", self.epsilon_per_query)?;
        if epsilon_per_query > epsilon {
            return Err(
                "differential_privacy epsilon_per_query exceeds the window's epsilon".into(),
            );
        }
        let delta = probability("delta", self.delta)?;
        let delta_per_query = probability("delta_per_query", self.delta_per_query)?;
        if delta_per_query > delta {
            return Err("differential_privacy delta_per_query exceeds the window's delta".into());
        }
        for (name, v) in [
            ("max_groups_per_unit", self.max_groups_per_unit),
            ("max_rows_per_group", self.max_rows_per_group),
        ] {
            if !(1..=10_000).contains(&v) {
                return Err(format!(
                    "differential_privacy {name} must be between 1 and 10000"
                ));
            }
        }
        let window_seconds = parse_window(&self.window)?;
        if d.column(&self.unit).is_none() {
            return Err(format!(
                "differential_privacy unit '{}' is not a column of {}",
                self.unit, d.name
            ));
        }
        let mut bounds = BTreeMap::new();
        for (column, b) in &self.bounds {
            let [lo, hi] = b.as_slice() else {
                return Err(format!(
                    "differential_privacy bounds for '{column}' must be [lower, upper]"
                ));
            };
            if !(lo.is_finite()
                && hi.is_finite()
                && lo < hi
                && lo.abs() <= 1e12
                && hi.abs() <= 1e12)
            {
                return Err(format!(
                    "differential_privacy bounds for '{column}' must be finite numbers, lower below upper, within 1e12"
                ));
            }
            bounds.insert(column.clone(), (*lo, *hi));
        }
        for c in &d.columns {
            let numeric = matches!(
                c.data_type,
                ColumnType::Float64 | ColumnType::Int32 | ColumnType::Int64
            );
            if numeric && c.name != self.unit && !bounds.contains_key(&c.name) {
                return Err(format!(
                    "differential_privacy has no clamping bounds for the numeric column {}.{}; every column a query could sum needs `bounds`",
                    d.name, c.name
                ));
            }
        }
        for column in self.bounds.keys() {
            if let Some(c) = d.column(column) {
                if !matches!(
                    c.data_type,
                    ColumnType::Float64 | ColumnType::Int32 | ColumnType::Int64
                ) {
                    return Err(format!(
                        "differential_privacy bounds name {}.{column}, which is not numeric",
                        d.name
                    ));
                }
            }
        }
        Ok(DifferentialPrivacy {
            unit: self.unit.clone(),
            epsilon,
            delta,
            window_seconds,
            epsilon_per_query,
            delta_per_query,
            max_groups_per_unit: self.max_groups_per_unit,
            max_rows_per_group: self.max_rows_per_group,
            bounds,
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    effect: Effect,
    /// casbin condition over `r.sub.*` and `r.ctx.*`.
    subject: String,
    /// casbin condition over `r.obj.*`.
    object: String,
    actions: Vec<Action>,
    /// First day the rule applies (a TOML date, UTC).
    #[serde(default)]
    valid_from: Option<toml::value::Datetime>,
    /// First day the rule no longer applies.
    #[serde(default)]
    valid_until: Option<toml::value::Datetime>,
    #[serde(default)]
    row_filters: Vec<RowFilter>,
    #[serde(default)]
    masks: Vec<MaskSpec>,
    #[serde(default)]
    threshold: Option<Threshold>,
    #[serde(default)]
    differential_privacy: Option<DifferentialPrivacySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: String,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
    #[serde(default)]
    release: Option<ReleaseSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseSpec {
    #[serde(default = "default_release_k")]
    k: u64,
    #[serde(default)]
    generalise: BTreeMap<String, Generalisation>,
    #[serde(default = "default_release_retention")]
    retention_days: u32,
    /// l-diversity: at least `l` distinct values of each `sensitive` column per class.
    l: Option<u64>,
    #[serde(default)]
    sensitive: Vec<String>,
}

fn default_release_k() -> u64 {
    ReleaseRules::default().k
}

fn default_release_retention() -> u32 {
    ReleaseRules::default().retention_days
}

/// How a column of a release is coarsened before the risk gate, or whether it is left out.
/// In the policy file each is a string: `month`, `year`, `decade`, `drop`, `state`, or
/// `age_band_N` (N from 2 to 30 years).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Generalisation {
    /// A date or time to the first day of its month.
    Month,
    /// A date or time to the first day of its year.
    Year,
    /// A date to the first day of its decade (1987 -> 1980).
    Decade,
    /// Not released at all.
    Drop,
    /// A ZIP code (5 digits or its first 3) to the US state its 3-digit prefix belongs to;
    /// a prefix that names no state (the `000` of a restricted area) to NULL.
    State,
    /// A date of birth to the band of the age it gives at the release's creation, `N` years
    /// wide (`40-49`), with every age from 90 in one band `90+` as Safe Harbor asks.
    AgeBand(u8),
}

impl TryFrom<String> for Generalisation {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.as_str() {
            "month" => Generalisation::Month,
            "year" => Generalisation::Year,
            "decade" => Generalisation::Decade,
            "drop" => Generalisation::Drop,
            "state" => Generalisation::State,
            other => match other.strip_prefix("age_band_").map(str::parse::<u8>) {
                Some(Ok(n)) if (2..=30).contains(&n) => Generalisation::AgeBand(n),
                _ => {
                    return Err(format!(
                        "unknown generalisation {other:?}: one of month, year, decade, drop, \
                         state, age_band_N (N from 2 to 30)"
                    ))
                }
            },
        })
    }
}

impl std::fmt::Display for Generalisation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Generalisation::Month => f.write_str("month"),
            Generalisation::Year => f.write_str("year"),
            Generalisation::Decade => f.write_str("decade"),
            Generalisation::Drop => f.write_str("drop"),
            Generalisation::State => f.write_str("state"),
            Generalisation::AgeBand(n) => write!(f, "age_band_{n}"),
        }
    }
}

/// l-diversity of a release: within every equivalence class, each sensitive column present
/// in a released table holds at least `l` distinct non-null values.
#[derive(Clone, Debug, PartialEq)]
pub struct Diversity {
    pub l: u64,
    pub sensitive: Vec<String>,
}

/// What a de-identified release must pass before it is written (`[release]` in the policy):
/// every combination of its quasi-identifiers held by at least `k` patients, after the
/// generalisations (by released column name) are applied, and, when the policy names
/// sensitive columns, diverse enough in each of them.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseRules {
    pub k: u64,
    pub generalise: BTreeMap<String, Generalisation>,
    pub diversity: Option<Diversity>,
    /// How long a release is kept: `lakegate lifecycle run` deletes it after this many days
    /// (unless it is under a legal hold).
    pub retention_days: u32,
}

impl Default for ReleaseRules {
    fn default() -> Self {
        Self {
            k: 11,
            generalise: BTreeMap::new(),
            diversity: None,
            retention_days: 730,
        }
    }
}

/// What an allowing rule obliges the engine to do for one dataset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Obligations {
    pub row_filters: Vec<RowFilter>,
    /// Column name -> mask, for the columns of this dataset that a mask covers.
    pub masks: BTreeMap<String, Mask>,
    pub threshold: Option<Threshold>,
    /// Differentially private aggregates only, under a privacy budget.
    pub differential_privacy: Option<DifferentialPrivacy>,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Allow {
        rule: String,
        obligations: Arc<Obligations>,
    },
    /// `rule` is the deny rule that matched, or None when no allow rule matched.
    Deny { rule: Option<String> },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The rule to name in a refusal.
    pub fn rule_name(&self) -> &str {
        match self {
            Decision::Allow { rule, .. } => rule,
            Decision::Deny { rule: Some(r) } => r,
            Decision::Deny { rule: None } => "default-deny",
        }
    }
}

/// Context of a request that is not an attribute of the principal.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub now: DateTime<Utc>,
}

impl Default for RequestContext {
    fn default() -> Self {
        Self { now: Utc::now() }
    }
}

/// A loaded, validated policy.
pub struct PolicySet {
    version: String,
    enforcer: Enforcer,
    release: ReleaseRules,
    /// (rule name, dataset name) -> obligations.
    obligations: HashMap<(String, String), Arc<Obligations>>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .finish()
    }
}

fn line_of(text: &str, rule: &str) -> usize {
    let needle = format!("\"{rule}\"");
    text.lines()
        .position(|l| l.trim_start().starts_with("name") && l.contains(&needle))
        .map(|i| i + 1)
        .unwrap_or(0)
}

fn referenced<'a>(expr: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(prefix) {
        let after = &rest[i + prefix.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        out.push(&after[..end]);
        rest = &after[end..];
    }
    out
}

fn object_map(d: &Dataset) -> BTreeMap<String, casbin::rhai::Dynamic> {
    let q = d.qualified();
    let mut m = BTreeMap::new();
    m.insert("name".into(), d.name.clone().into());
    m.insert("schema".into(), q.schema.into());
    m.insert("table".into(), q.table.into());
    m.insert("zone".into(), d.zone.clone().into());
    m.insert("owner".into(), d.owner.clone().into());
    let tags: casbin::rhai::Array = d.tags.iter().map(|t| t.clone().into()).collect();
    m.insert("tags".into(), tags.into());
    m
}

#[derive(serde::Serialize, Hash)]
struct ObjectReq<'a> {
    name: &'a str,
    schema: &'a str,
    table: &'a str,
    zone: &'a str,
    owner: &'a str,
    tags: &'a [String],
}

#[derive(serde::Serialize, Hash)]
struct ContextReq {
    now: i64,
    hour: i64,
    weekday: i64,
    environment: String,
}

impl PolicySet {
    /// Parse, validate against `catalog`, and load into casbin. Errors name the file, the line
    /// of the offending rule and the reason.
    pub async fn load(model: &str, file: &str, text: &str, catalog: &Catalog) -> Result<Self> {
        let fail = |line: usize, reason: String| PolicyError::InvalidFile {
            file: if line > 0 {
                format!("{file}:{line}")
            } else {
                file.to_string()
            },
            reason,
        };
        let parsed: PolicyFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(0);
            fail(line, e.message().to_string())
        })?;
        let model = DefaultModel::from_str(model)
            .await
            .map_err(|e| fail(0, format!("casbin model: {e}")))?;
        let mut enforcer = Enforcer::new(model, MemoryAdapter::default())
            .await
            .map_err(|e| fail(0, format!("casbin: {e}")))?;

        let mut names = BTreeSet::new();
        let mut lines = Vec::new();
        let mut obligations = HashMap::new();
        for rule in &parsed.rules {
            let line = line_of(text, &rule.name);
            let bad = |reason: String| fail(line, format!("rule '{}': {reason}", rule.name));
            if !names.insert(rule.name.clone()) {
                return Err(bad("the name is used twice".into()));
            }
            for attr in referenced(&rule.subject, "r.sub.") {
                if !ATTRIBUTES.contains(&attr) {
                    return Err(bad(format!(
                        "unknown attribute r.sub.{attr} (known: {})",
                        ATTRIBUTES.join(", ")
                    )));
                }
            }
            for attr in referenced(&rule.subject, "r.ctx.")
                .into_iter()
                .chain(referenced(&rule.object, "r.ctx."))
            {
                if !CONTEXT_ATTRIBUTES.contains(&attr) {
                    return Err(bad(format!("unknown context attribute r.ctx.{attr}")));
                }
            }
            for attr in referenced(&rule.object, "r.obj.") {
                if !OBJECT_ATTRIBUTES.contains(&attr) {
                    return Err(bad(format!("unknown dataset attribute r.obj.{attr}")));
                }
            }
            if rule.object.contains("r.sub.") || rule.subject.contains("r.obj.") {
                return Err(bad(
                    "subject conditions use r.sub/r.ctx, object conditions r.obj".into(),
                ));
            }
            if rule.actions.is_empty() {
                return Err(bad("no actions".into()));
            }
            if rule.effect == Effect::Deny
                && (!rule.row_filters.is_empty()
                    || !rule.masks.is_empty()
                    || rule.threshold.is_some()
                    || rule.differential_privacy.is_some())
            {
                return Err(bad("a deny rule carries no obligations".into()));
            }
            // Which datasets does the object condition cover? Evaluate it now, with rhai.
            let engine = casbin::rhai::Engine::new();
            let mut covered = Vec::new();
            for d in &catalog.datasets {
                let mut scope = casbin::rhai::Scope::new();
                let mut r = casbin::rhai::Map::new();
                r.insert(
                    "obj".into(),
                    object_map(d)
                        .into_iter()
                        .map(|(k, v)| (k.into(), v))
                        .collect::<casbin::rhai::Map>()
                        .into(),
                );
                scope.push("r", r);
                let hit: bool = engine
                    .eval_with_scope(&mut scope, &rule.object)
                    .map_err(|e| bad(format!("object condition does not evaluate: {e}")))?;
                if hit {
                    covered.push(d);
                }
            }
            if covered.is_empty() {
                return Err(bad(
                    "the object condition matches no dataset in the catalog".into(),
                ));
            }
            for d in &covered {
                let o = obligations_for(rule, d, catalog).map_err(&bad)?;
                obligations.insert((rule.name.clone(), d.name.clone()), Arc::new(o));
            }
            if rule.differential_privacy.is_some() {
                if rule.threshold.is_some() {
                    return Err(bad(
                        "a rule carries either a threshold or differential_privacy, not both"
                            .into(),
                    ));
                }
                if rule.actions.iter().any(|a| *a != Action::AggregateQuery) {
                    return Err(bad(
                        "differential_privacy grants aggregate_query only".into()
                    ));
                }
            }
            if let Some(t) = &rule.threshold {
                if t.k < 2 {
                    return Err(bad("a threshold's k must be at least 2".into()));
                }
            }
            let mut subject = format!("({})", rule.subject);
            if let Some(from) = &rule.valid_from {
                subject.push_str(&format!(
                    " && r.ctx.now >= {}",
                    day_start(from).map_err(&bad)?
                ));
            }
            if let Some(until) = &rule.valid_until {
                subject.push_str(&format!(
                    " && r.ctx.now < {}",
                    day_start(until).map_err(&bad)?
                ));
            }
            let effect = match rule.effect {
                Effect::Allow => "allow",
                Effect::Deny => "deny",
            };
            for a in &rule.actions {
                lines.push(vec![
                    subject.clone(),
                    format!("({})", rule.object),
                    a.as_str().to_string(),
                    effect.to_string(),
                    rule.name.clone(),
                ]);
            }
        }
        enforcer
            .add_policies(lines)
            .await
            .map_err(|e| fail(0, format!("casbin: {e}")))?;
        let release = match parsed.release {
            None => ReleaseRules::default(),
            Some(spec) => {
                let line = text
                    .lines()
                    .position(|l| l.trim() == "[release]")
                    .map(|i| i + 1)
                    .unwrap_or(0);
                if spec.k < 2 {
                    return Err(fail(line, "[release]: k must be at least 2".into()));
                }
                let known = |column: &str| {
                    catalog
                        .datasets
                        .iter()
                        .any(|d| d.columns.iter().any(|c| c.name == column))
                };
                for column in spec.generalise.keys() {
                    if !known(column) {
                        return Err(fail(
                            line,
                            format!(
                                "[release]: generalise names {column}, a column no dataset has"
                            ),
                        ));
                    }
                }
                let diversity = match (spec.l, spec.sensitive.is_empty()) {
                    (None, true) => None,
                    (Some(l), false) if l >= 2 => {
                        if let Some(c) = spec.sensitive.iter().find(|c| !known(c)) {
                            return Err(fail(
                                line,
                                format!("[release]: sensitive names {c}, a column no dataset has"),
                            ));
                        }
                        if let Some(c) = spec
                            .sensitive
                            .iter()
                            .find(|c| spec.generalise.contains_key(c.as_str()))
                        {
                            return Err(fail(
                                line,
                                format!(
                                    "[release]: {c} is both sensitive and generalised; a \
                                     sensitive column is released as it is"
                                ),
                            ));
                        }
                        Some(Diversity {
                            l,
                            sensitive: spec.sensitive,
                        })
                    }
                    (Some(_), false) => {
                        return Err(fail(line, "[release]: l must be at least 2".into()))
                    }
                    _ => {
                        return Err(fail(
                            line,
                            "[release]: l-diversity needs both l and the sensitive columns".into(),
                        ))
                    }
                };
                ReleaseRules {
                    k: spec.k,
                    generalise: spec.generalise,
                    diversity,
                    retention_days: spec.retention_days,
                }
            }
        };
        Ok(Self {
            version: parsed.version,
            enforcer,
            release,
            obligations,
        })
    }

    /// The policy's version string, recorded with every decision.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What a de-identified release must pass before it is written.
    pub fn release_rules(&self) -> &ReleaseRules {
        &self.release
    }

    /// Decide whether `principal` may perform `action` on `dataset`.
    pub fn decide(
        &self,
        principal: &Principal,
        dataset: &Dataset,
        action: Action,
        ctx: &RequestContext,
    ) -> Decision {
        let mut sub: BTreeMap<&str, &str> = ATTRIBUTES.iter().map(|a| (*a, "")).collect();
        for (k, v) in &principal.attributes {
            if let Some(slot) = sub.get_mut(k.as_str()) {
                *slot = v;
            }
        }
        sub.insert("name", &principal.name);
        let q = dataset.qualified();
        let obj = ObjectReq {
            name: &dataset.name,
            schema: &q.schema,
            table: &q.table,
            zone: &dataset.zone,
            owner: &dataset.owner,
            tags: &dataset.tags,
        };
        let c = ContextReq {
            now: ctx.now.timestamp(),
            hour: i64::from(ctx.now.hour()),
            weekday: i64::from(ctx.now.weekday().num_days_from_monday()),
            environment: principal.attribute("environment").unwrap_or("").to_string(),
        };
        match self.enforcer.enforce_ex((sub, obj, action.as_str(), c)) {
            Ok((true, rules)) => {
                let rule = rules
                    .first()
                    .and_then(|r| r.get(4))
                    .cloned()
                    .unwrap_or_default();
                match self.obligations.get(&(rule.clone(), dataset.name.clone())) {
                    Some(o) => Decision::Allow {
                        rule,
                        obligations: Arc::clone(o),
                    },
                    // Fail closed: an allow we cannot attach obligations to is not an allow.
                    None => Decision::Deny { rule: Some(rule) },
                }
            }
            Ok((false, rules)) => Decision::Deny {
                rule: rules.first().and_then(|r| r.get(4)).cloned(),
            },
            Err(_) => Decision::Deny { rule: None },
        }
    }
}

/// Unix time of a grant bound: a TOML date (00:00 UTC that day) or a date-time (UTC unless it
/// carries an offset). Seconds count, so a grant can end at 18:00, not just at midnight.
fn day_start(d: &toml::value::Datetime) -> std::result::Result<i64, String> {
    let date = d
        .date
        .and_then(|x| {
            NaiveDate::from_ymd_opt(i32::from(x.year), u32::from(x.month), u32::from(x.day))
        })
        .ok_or_else(|| format!("'{d}' is not a date"))?;
    let (h, m, sec) = d
        .time
        .map(|t| (u32::from(t.hour), u32::from(t.minute), u32::from(t.second)))
        .unwrap_or((0, 0, 0));
    let local = date
        .and_hms_opt(h, m, sec.min(59))
        .ok_or_else(|| format!("'{d}' is not a valid time"))?
        .and_utc()
        .timestamp();
    let offset_minutes = match d.offset {
        Some(toml::value::Offset::Custom { minutes }) => i64::from(minutes),
        _ => 0,
    };
    Ok(local - offset_minutes * 60)
}

fn column_type(d: &Dataset, column: &str) -> std::result::Result<ColumnType, String> {
    d.column(column)
        .map(|c| c.data_type)
        .ok_or_else(|| format!("dataset {} has no column '{column}'", d.name))
}

fn check_filter(f: &RowFilter, d: &Dataset, catalog: &Catalog) -> std::result::Result<(), String> {
    let t = column_type(d, &f.column)?;
    match (&f.equals, &f.in_set) {
        (Some(v), None) => {
            let ok = match v {
                FilterValue::Bool(_) => t == ColumnType::Bool,
                FilterValue::Int(_) => matches!(t, ColumnType::Int32 | ColumnType::Int64),
                FilterValue::Str(_) => t == ColumnType::Utf8,
                FilterValue::Attribute { attribute } => {
                    if !ATTRIBUTES.contains(&attribute.as_str()) {
                        return Err(format!("unknown attribute '{attribute}' in a row filter"));
                    }
                    t == ColumnType::Utf8
                }
            };
            if !ok {
                return Err(format!(
                    "row filter value does not fit column {}.{} ({t:?})",
                    d.name, f.column
                ));
            }
            Ok(())
        }
        (None, Some(set)) => {
            let other = catalog
                .dataset(&set.dataset)
                .ok_or_else(|| format!("row filter names unknown dataset '{}'", set.dataset))?;
            let kt = column_type(other, &set.key)?;
            if kt != t {
                return Err(format!(
                    "row filter key {}.{} and {}.{} differ in type",
                    other.name, set.key, d.name, f.column
                ));
            }
            check_filter(&set.filter, other, catalog)
        }
        _ => Err(format!(
            "row filter on '{}' needs exactly one of `equals` or `in`",
            f.column
        )),
    }
}

fn obligations_for(
    rule: &RuleSpec,
    d: &Dataset,
    catalog: &Catalog,
) -> std::result::Result<Obligations, String> {
    for f in &rule.row_filters {
        check_filter(f, d, catalog)?;
    }
    let mut masks = BTreeMap::new();
    for spec in &rule.masks {
        let mut targets: Vec<&str> = Vec::new();
        if let Some(label) = &spec.label {
            if !lakegate_catalogs::LABELS.contains(&label.as_str()) {
                return Err(format!("unknown label '{label}'"));
            }
            targets.extend(
                d.columns
                    .iter()
                    .filter(|c| &c.label == label)
                    .map(|c| c.name.as_str()),
            );
        }
        for c in &spec.columns {
            let exists_somewhere = catalog.datasets.iter().any(|x| x.column(c).is_some());
            if !exists_somewhere {
                return Err(format!("mask names unknown column '{c}'"));
            }
            if d.column(c).is_some() {
                targets.push(c);
            }
        }
        if spec.label.is_none() && spec.columns.is_empty() {
            return Err("a mask needs a `label` or `columns`".into());
        }
        if let Mask::DateShift { subject, max_days } = &spec.mask {
            if *max_days == 0 || *max_days > 3650 {
                return Err("date_shift max_days must be between 1 and 3650".into());
            }
            if !targets.is_empty() {
                column_type(d, subject)?;
            }
        }
        if let Mask::Bucket { width } = &spec.mask {
            if !(width.is_finite() && *width > 0.0) {
                return Err("bucket width must be a positive number".into());
            }
        }
        for t in targets {
            let ct = column_type(d, t)?;
            if !spec.mask.accepts(ct) {
                return Err(format!(
                    "mask {:?} does not apply to {}.{t} ({ct:?})",
                    spec.mask, d.name
                ));
            }
            // The first mask listed for a column wins; later ones cannot weaken it silently.
            masks
                .entry(t.to_string())
                .or_insert_with(|| spec.mask.clone());
        }
    }
    if let Some(t) = &rule.threshold {
        if d.column(&t.unit).is_none() {
            return Err(format!(
                "threshold unit '{}' is not a column of {}",
                t.unit, d.name
            ));
        }
    }
    let differential_privacy = match &rule.differential_privacy {
        Some(spec) => Some(spec.check(d)?),
        None => None,
    };
    Ok(Obligations {
        row_filters: rule.row_filters.clone(),
        masks,
        threshold: rule.threshold.clone(),
        differential_privacy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakegate_catalogs::demo::demo_catalog;

    const DEMO: &str = include_str!("../demo/policy.toml");

    fn who(name: &str, attrs: &[(&str, &str)]) -> Principal {
        Principal {
            name: name.into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    async fn demo() -> (PolicySet, Catalog) {
        // As `Catalog::load` gives it: every lake has the audit trail's dataset.
        let mut catalog = demo_catalog();
        catalog.datasets.push(lakegate_catalogs::audit_dataset());
        let p = PolicySet::load(DEFAULT_MODEL, "policy.toml", DEMO, &catalog)
            .await
            .unwrap();
        (p, catalog)
    }

    #[tokio::test]
    async fn personas_get_what_the_scenario_says() {
        let (p, c) = demo().await;
        let ctx = RequestContext::default();
        let patients = c.dataset("clinical.patients").unwrap();
        let variants = c.dataset("omics.variants").unwrap();
        let alice = who(
            "alice",
            &[
                ("role", "data_scientist"),
                ("project", "oncology"),
                ("purpose", "model_training"),
                ("environment", "sandbox"),
            ],
        );
        let dave = who(
            "dave",
            &[
                ("role", "data_scientist"),
                ("project", "cardiology"),
                ("purpose", "model_training"),
                ("environment", "production"),
            ],
        );
        let bob = who(
            "bob",
            &[
                ("role", "analyst"),
                ("project", "readmissions"),
                ("purpose", "operations"),
            ],
        );
        let carol = who(
            "carol",
            &[
                ("role", "clinician"),
                ("site", "SITE_A"),
                ("purpose", "treatment"),
            ],
        );
        let erin = who("erin", &[("role", "compliance_auditor")]);
        let mallory = who("mallory", &[]);

        let d = p.decide(&alice, patients, Action::RowQuery, &ctx);
        assert_eq!(d.rule_name(), "research-deidentified");
        let Decision::Allow { obligations, .. } = d else {
            panic!()
        };
        assert_eq!(obligations.masks["ssn"], Mask::Nullify);
        assert_eq!(obligations.masks["patient_id"], Mask::Pseudonym);
        assert_eq!(obligations.masks["zip"], Mask::Zip3);
        assert_eq!(obligations.row_filters.len(), 1);
        assert!(p
            .decide(&alice, variants, Action::RowQuery, &ctx)
            .is_allowed());

        assert!(p
            .decide(&dave, patients, Action::RowQuery, &ctx)
            .is_allowed());
        assert_eq!(
            p.decide(&dave, variants, Action::RowQuery, &ctx),
            Decision::Deny {
                rule: Some("no-omics-in-production".into())
            }
        );

        assert_eq!(
            p.decide(&bob, patients, Action::RowQuery, &ctx),
            Decision::Deny { rule: None }
        );
        let Decision::Allow { obligations, .. } =
            p.decide(&bob, patients, Action::AggregateQuery, &ctx)
        else {
            panic!()
        };
        assert_eq!(
            obligations.threshold,
            Some(Threshold {
                k: 11,
                unit: "patient_id".into()
            })
        );
        assert!(!p
            .decide(&bob, variants, Action::AggregateQuery, &ctx)
            .is_allowed());

        let Decision::Allow { obligations, .. } =
            p.decide(&carol, patients, Action::RowQuery, &ctx)
        else {
            panic!()
        };
        assert_eq!(obligations.masks["ssn"], Mask::ShowLast { n: 4 });
        assert!(!p
            .decide(&carol, variants, Action::RowQuery, &ctx)
            .is_allowed());

        // The audit trail is erin's alone; nothing clinical is.
        for who in [&alice, &bob, &carol, &dave, &erin, &mallory] {
            for d in &c.datasets {
                for a in [Action::RowQuery, Action::AggregateQuery] {
                    let expected = if d.name == "audit.events" {
                        who.name == "erin"
                    } else {
                        p.decide(who, d, a, &ctx).is_allowed() && who.name != "erin"
                    };
                    assert_eq!(
                        p.decide(who, d, a, &ctx).is_allowed(),
                        expected,
                        "{} {}",
                        who.name,
                        d.name
                    );
                }
            }
        }
        for d in c.datasets.iter().filter(|d| d.name != "audit.events") {
            assert!(!p
                .decide(&mallory, d, Action::AggregateQuery, &ctx)
                .is_allowed());
            assert!(!p
                .decide(&erin, d, Action::AggregateQuery, &ctx)
                .is_allowed());
        }

        // Attributes, not names: a new user with alice's attributes gets alice's view.
        let twin = who(
            "alice2",
            &[
                ("role", "data_scientist"),
                ("project", "oncology"),
                ("purpose", "model_training"),
                ("environment", "sandbox"),
            ],
        );
        assert_eq!(
            p.decide(&twin, variants, Action::RowQuery, &ctx),
            p.decide(&alice, variants, Action::RowQuery, &ctx)
        );
    }

    #[tokio::test]
    async fn validity_window_is_enforced() {
        let catalog = demo_catalog();
        let text = r#"
version = "t"
[[rule]]
name = "trial-access"
effect = "allow"
subject = 'r.sub.role == "analyst"'
object = 'r.obj.name == "clinical.patients"'
actions = ["row_query"]
valid_from = 2026-01-01
valid_until = 2026-02-01
"#;
        let p = PolicySet::load(DEFAULT_MODEL, "p.toml", text, &catalog)
            .await
            .unwrap();
        let d = catalog.dataset("clinical.patients").unwrap();
        let bob = who("bob", &[("role", "analyst")]);
        let at = |s: &str| RequestContext {
            now: s.parse().unwrap(),
        };
        assert!(p
            .decide(&bob, d, Action::RowQuery, &at("2026-01-15T12:00:00Z"))
            .is_allowed());
        assert!(!p
            .decide(&bob, d, Action::RowQuery, &at("2026-02-01T00:00:01Z"))
            .is_allowed());
        assert!(!p
            .decide(&bob, d, Action::RowQuery, &at("2025-12-31T23:59:59Z"))
            .is_allowed());

        // Date-times count to the second, with their offset.
        let timed = text
            .replace("2026-01-01", "2026-01-01T09:30:00+02:00")
            .replace("2026-02-01", "2026-01-01T18:00:00Z");
        let p = PolicySet::load(DEFAULT_MODEL, "p.toml", &timed, &catalog)
            .await
            .unwrap();
        let allowed = |s: &str| p.decide(&bob, d, Action::RowQuery, &at(s)).is_allowed();
        assert!(!allowed("2026-01-01T07:29:59Z"));
        assert!(allowed("2026-01-01T07:30:00Z"));
        assert!(allowed("2026-01-01T17:59:59Z"));
        assert!(!allowed("2026-01-01T18:00:00Z"));
    }

    async fn load_err(rule_body: &str) -> String {
        let text = format!(
            "version = \"t\"\n\n[[rule]]\nname = \"bad\"\neffect = \"allow\"\n{rule_body}\n"
        );
        PolicySet::load(DEFAULT_MODEL, "p.toml", &text, &demo_catalog())
            .await
            .unwrap_err()
            .to_string()
    }

    #[tokio::test]
    async fn bad_rules_are_refused_with_file_line_and_reason() {
        let base = "subject = 'r.sub.role == \"x\"'\nobject = 'r.obj.schema == \"clinical\"'\nactions = [\"row_query\"]";
        let e = load_err(&format!(
            "{base}\nmasks = [{{ columns = [\"sssn\"], mask = \"nullify\" }}]"
        ))
        .await;
        assert_eq!(e, "p.toml:4: rule 'bad': mask names unknown column 'sssn'");
        let e = load_err(&format!(
            "{base}\nmasks = [{{ label = \"phi.secret\", mask = \"nullify\" }}]"
        ))
        .await;
        assert!(e.contains("unknown label 'phi.secret'"), "{e}");
        let e = load_err(&format!(
            "{base}\nmasks = [{{ columns = [\"ssn\"], mask = \"scramble\" }}]"
        ))
        .await;
        assert!(e.starts_with("p.toml:"), "{e}");
        let e = load_err(&format!(
            "{base}\nmasks = [{{ columns = [\"total_cost\"], mask = \"zip3\" }}]"
        ))
        .await;
        assert!(
            e.contains("does not apply to clinical.encounters.total_cost"),
            "{e}"
        );
        let e = load_err("subject = 'r.sub.rank == \"x\"'\nobject = 'r.obj.schema == \"clinical\"'\nactions = [\"row_query\"]").await;
        assert!(e.contains("unknown attribute r.sub.rank"), "{e}");
        let e = load_err(&format!("{base}\nrow_filters = [{{ column = \"site_id\", equals = {{ attribute = \"clearance\" }} }}]")).await;
        assert!(
            e.contains("dataset clinical.conditions has no column 'site_id'")
                || e.contains("unknown attribute"),
            "{e}"
        );
        let e = load_err("subject = 'r.sub.role == \"x\"'\nobject = 'r.obj.schema == \"finance\"'\nactions = [\"row_query\"]").await;
        assert!(e.contains("matches no dataset"), "{e}");
        let e = load_err(&format!(
            "{base}\nthreshold = {{ k = 1, unit = \"patient_id\" }}"
        ))
        .await;
        assert!(e.contains("at least 2"), "{e}");
    }

    #[tokio::test]
    async fn the_release_section_is_checked() {
        let load = |release: &str| {
            let text = format!("version = \"t\"\n\n[release]\n{release}\n");
            async move { PolicySet::load(DEFAULT_MODEL, "p.toml", &text, &demo_catalog()).await }
        };
        let p = load("").await.unwrap();
        assert_eq!(p.release_rules(), &ReleaseRules::default());
        assert_eq!(p.release_rules().k, 11);
        let p = load("k = 20\ngeneralise = { start_time = \"month\", birth_date = \"decade\", zip = \"drop\" }")
            .await
            .unwrap();
        assert_eq!(p.release_rules().k, 20);
        assert_eq!(
            p.release_rules().generalise.get("zip"),
            Some(&Generalisation::Drop)
        );
        let e = load("k = 1").await.err().unwrap().to_string();
        assert_eq!(e, "p.toml:3: [release]: k must be at least 2");
        let e = load("generalise = { strat_time = \"month\" }")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("strat_time, a column no dataset has"), "{e}");
        let e = load("generalise = { start_time = \"week\" }")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("p.toml:"), "{e}");
        assert!(e.contains("unknown generalisation \"week\""), "{e}");
        let p = load("generalise = { zip = \"state\", birth_date = \"age_band_10\" }\nl = 3\nsensitive = [\"reason_code\", \"code\"]")
            .await
            .unwrap();
        let rules = p.release_rules();
        assert_eq!(rules.generalise.get("zip"), Some(&Generalisation::State));
        assert_eq!(
            rules.generalise.get("birth_date"),
            Some(&Generalisation::AgeBand(10))
        );
        assert_eq!(Generalisation::AgeBand(10).to_string(), "age_band_10");
        assert_eq!(
            rules.diversity,
            Some(Diversity {
                l: 3,
                sensitive: vec!["reason_code".into(), "code".into()]
            })
        );
        for (bad, why) in [
            (
                "generalise = { birth_date = \"age_band_1\" }",
                "unknown generalisation",
            ),
            (
                "generalise = { birth_date = \"age_band_x\" }",
                "unknown generalisation",
            ),
            ("l = 1\nsensitive = [\"code\"]", "l must be at least 2"),
            ("l = 2", "needs both l and the sensitive columns"),
            (
                "sensitive = [\"code\"]",
                "needs both l and the sensitive columns",
            ),
            (
                "l = 2\nsensitive = [\"cod\"]",
                "sensitive names cod, a column no dataset has",
            ),
            (
                "l = 2\nsensitive = [\"code\"]\ngeneralise = { code = \"drop\" }",
                "both sensitive and generalised",
            ),
        ] {
            let e = load(bad).await.err().unwrap().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_broken_differential_privacy_grant_does_not_load() {
        let base = "subject = 'r.sub.role == \"x\"'\nobject = 'r.obj.schema == \"clinical\"'\nactions = [\"aggregate_query\"]";
        let grant = |fields: &str| {
            format!("{base}\ndifferential_privacy = {{ unit = \"patient_id\", {fields} }}")
        };
        let good = "epsilon = 10.0, delta = 1e-5, window = \"30d\", epsilon_per_query = 1.0, delta_per_query = 1e-7, bounds = { total_cost = [0.0, 50000.0], value = [0.0, 500.0] }";
        let cases: &[(&str, &str)] = &[
            (
                "epsilon = 10.0, window = \"30d\", epsilon_per_query = 1.0, bounds = { value = [0.0, 500.0] }",
                "no clamping bounds for the numeric column clinical.encounters.total_cost",
            ),
            (
                &good.replace("epsilon = 10.0", "epsilon = 0.0"),
                "epsilon must be a positive number",
            ),
            (
                &good.replace("epsilon = 10.0", "epsilon = -1.0"),
                "epsilon must be a positive number",
            ),
            (
                &good.replace("epsilon = 10.0", "epsilon = nan"),
                "epsilon must be a positive number",
            ),
            (
                &good.replace("epsilon = 10.0", "epsilon = \"ten\""),
                "invalid type",
            ),
            (
                &good.replace("epsilon_per_query = 1.0", "epsilon_per_query = 11.0"),
                "exceeds the window's epsilon",
            ),
            (
                &good.replace("\"30d\"", "\"30 days\""),
                "window '30 days' does not parse",
            ),
            (&good.replace("\"30d\"", "\"0d\""), "window '0d' does not parse"),
            (
                &good.replace("[0.0, 50000.0]", "[50000.0, 0.0]"),
                "bounds for 'total_cost' must be finite numbers, lower below upper",
            ),
            (
                &good.replace("[0.0, 50000.0]", "[0.0]"),
                "bounds for 'total_cost' must be [lower, upper]",
            ),
            (
                &good.replace("delta = 1e-5", "delta = 1.5"),
                "delta must be at least 0 and below 1",
            ),
            (
                &format!("{good}, max_groups_per_unit = 0"),
                "max_groups_per_unit must be between 1 and 10000",
            ),
        ];
        for (fields, expected) in cases {
            let e = load_err(&grant(fields)).await;
            assert!(e.contains(expected), "{fields}: {e}");
            assert!(e.starts_with("p.toml:"), "{e}");
        }
        let e = load_err(&format!(
            "{}\nthreshold = {{ k = 11, unit = \"patient_id\" }}",
            grant(good)
        ))
        .await;
        assert!(
            e.contains("either a threshold or differential_privacy"),
            "{e}"
        );
        let e = load_err(&grant(good).replace(
            "[\"aggregate_query\"]",
            "[\"row_query\", \"aggregate_query\"]",
        ))
        .await;
        assert!(e.contains("grants aggregate_query only"), "{e}");
        let e = load_err(&grant(good).replace("unit = \"patient_id\"", "unit = \"person\"")).await;
        assert!(e.contains("unit 'person' is not a column"), "{e}");
    }

    #[tokio::test]
    async fn the_demo_grants_frank_differential_privacy_only() {
        let mut catalog = demo_catalog();
        catalog.datasets.push(lakegate_catalogs::audit_dataset());
        let p = PolicySet::load(DEFAULT_MODEL, "policy.toml", DEMO, &catalog)
            .await
            .expect("demo policy");
        let frank = who(
            "frank",
            &[("role", "researcher"), ("purpose", "public_health")],
        );
        let ctx = RequestContext::default();
        let encounters = catalog.dataset("clinical.encounters").expect("dataset");
        assert!(!p
            .decide(&frank, encounters, Action::RowQuery, &ctx)
            .is_allowed());
        let Decision::Allow { rule, obligations } =
            p.decide(&frank, encounters, Action::AggregateQuery, &ctx)
        else {
            panic!("frank may aggregate");
        };
        assert_eq!(rule, "public-health-dp");
        let dp = obligations.differential_privacy.as_ref().expect("a grant");
        assert_eq!(dp.unit, "patient_id");
        assert_eq!(dp.window_seconds, 30 * 86_400);
        assert_eq!(dp.bounds.get("total_cost"), Some(&(0.0, 50_000.0)));
        let omics = catalog.dataset("omics.variants").expect("dataset");
        assert!(!p
            .decide(&frank, omics, Action::AggregateQuery, &ctx)
            .is_allowed());
    }
}
