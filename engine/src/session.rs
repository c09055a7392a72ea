//! Per-request sessions: the caller's catalog view, restricted SQL planning, execution.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::ParamValues;
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::source_as_provider;
use datafusion::execution::cache::cache_manager::{CacheManager, CacheManagerConfig};
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::DiskManagerBuilder;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::logical_expr::{
    cast, col, lit, Aggregate, Expr, ExprSchemable, LogicalPlanBuilder,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::Statement as DFStatement;
use lakegate_catalogs::{Catalog, Dataset, FileFormat, Lake};
use lakegate_policies::{
    Action, Decision, FilterValue, Obligations, PolicySet, Principal, RequestContext, RowFilter,
    SubjectSet, Threshold,
};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Mutex as AsyncMutex;

use crate::governed::{
    order_released_groups, touched_columns, verify_physical, GovernedTable, InSubjectSet,
    ThresholdCheck,
};
use crate::keys::KeyRing;
use crate::masks::mask_expr;
use sqlparser::ast::{Expr as SqlExpr, Statement as SqlStatement, Value as SqlValue};

use crate::{EngineError, Result};

/// The one catalog name clients see.
pub const CATALOG_NAME: &str = "lakegate";
/// The object store URL the lake is registered under: internal, never a user-visible path.
const LAKE_URL: &str = "lakegate://lake/";

/// Limits and tuning shared by all sessions.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Memory all running queries may hold together; sorts, joins and aggregates spill to
    /// disk beyond their share, and a query that cannot spill fails with ResourceExhausted.
    pub memory_limit: usize,
    /// Disk that spill files may take in all.
    pub max_spill_bytes: u64,
    /// Longest SQL text accepted.
    pub max_sql_bytes: usize,
    /// Rows per Arrow batch.
    pub batch_size: usize,
    /// Parallelism of one query.
    pub target_partitions: usize,
    /// Values of the `role` attribute whose holders may EXPLAIN (and EXPLAIN ANALYZE) their
    /// queries: plans show policy internals and storage locations, so nobody else may.
    pub explain_roles: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            memory_limit: 2 << 30,
            max_spill_bytes: 32 << 30,
            max_sql_bytes: 64 << 10,
            batch_size: 8192,
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            explain_roles: vec!["admin".to_string()],
        }
    }
}

struct Inner {
    /// Swapped with the policy when the catalog changes; read under the policy's lock, so a
    /// request never pairs a policy with a catalog it was not checked against.
    lake: std::sync::RwLock<Arc<LakeTables>>,
    template: Planning,
    /// Swapped whole on reload; each session keeps the snapshot it started with.
    policy: std::sync::RwLock<Arc<PolicySet>>,
    keys: KeyRing,
    config: EngineConfig,
    /// The lake's store, for the file listings that tell when a subject set is stale.
    store: Arc<dyn object_store::ObjectStore>,
    /// The template with no cached file listings, for policy-internal reads (subject sets)
    /// that must see the lake as it is now.
    uncached: SessionState,
    /// Subject sets (e.g. consenting patients) per filter, with the files they were read from:
    /// computed again when those files change (a consent withdrawn), never served stale.
    subject_sets: AsyncMutex<HashMap<String, KnownSet>>,
    /// Per memory budget, the template state with that budget in its runtime.
    budgeted: std::sync::Mutex<HashMap<usize, Planning>>,
    /// Callers' catalog views built during the current second. Decisions depend on the
    /// principal, the policy and the request time at one-second resolution (what casbin's
    /// context sees), so within one second a view can be reused exactly.
    views: std::sync::Mutex<(i64, HashMap<ViewKey, Arc<View>>)>,
}

/// The catalog in force and one table per dataset it names.
struct LakeTables {
    catalog: Arc<Catalog>,
    tables: HashMap<String, Arc<dyn TableProvider>>,
}

impl LakeTables {
    fn new(catalog: Catalog, runtime: &RuntimeEnv) -> Result<Self> {
        let mut tables = HashMap::new();
        for d in &catalog.datasets {
            tables.insert(d.name.clone(), listing_table(d, runtime)?);
        }
        Ok(Self {
            catalog: Arc::new(catalog),
            tables,
        })
    }

    fn table(&self, dataset: &str) -> Result<Arc<dyn TableProvider>> {
        self.tables
            .get(dataset)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("unknown dataset {dataset}")))
    }
}

/// A subject set and the files of its dataset it was read from.
struct KnownSet {
    files: Vec<object_store::ObjectMeta>,
    members: Arc<crate::governed::Members>,
}

/// What a caller's view depends on: the policy in force, the principal, the second.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ViewKey {
    policy: usize,
    name: String,
    attributes: Vec<(String, String)>,
}

/// A caller's catalog of governed datasets and the decisions behind it.
struct View {
    /// Held so that the key's policy address cannot be reused while the view lives.
    policy: Arc<PolicySet>,
    catalog: Arc<MemoryCatalogProvider>,
    decisions: HashMap<String, (Decision, Decision)>,
    policy_version: String,
}

/// How long a dataset's file listing is reused: a change to the lake is seen by every query
/// that starts this long after it.
const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Most views kept within one second.
const MAX_VIEWS: usize = 1024;
/// Cached per-budget session states (one per principal); cleared whole when full.
const MAX_BUDGETED_STATES: usize = 1024;

/// What every request shares. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Load and verify the lake's catalog and prepare one table per dataset.
    ///
    /// Fails if any dataset's files are missing, corrupt or disagree with the catalog: the
    /// server never starts over a lake it cannot vouch for.
    pub async fn open(
        lake: Lake,
        policy: PolicySet,
        keys: KeyRing,
        config: EngineConfig,
    ) -> Result<Self> {
        let catalog = Catalog::load(&lake).await?;
        catalog.verify(&lake).await?;

        let runtime: Arc<RuntimeEnv> = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_limit)))
            // DataFusion keeps a table's file listing for the life of the process by default:
            // a file replaced while serving would then be read at its old size (a corrupt read)
            // and a file added never seen. Listings are kept for a second instead, the same
            // resolution as callers' views (whose subject sets follow their files): listing on
            // every query cost a point lookup up to a millisecond of its 9. Footers and
            // statistics stay cached, checked against each file's size and modification time.
            .with_cache_manager(
                CacheManagerConfig::default().with_list_files_cache_ttl(Some(LISTING_TTL)),
            )
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_max_temp_directory_size(config.max_spill_bytes),
            )
            .build_arc()?;
        let lake_url = url::Url::parse(LAKE_URL).expect("static URL");
        runtime.register_object_store(&lake_url, lake.store());

        let lake_tables = LakeTables::new(catalog, &runtime)?;

        let session_config = SessionConfig::new()
            .with_information_schema(false)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(CATALOG_NAME, "clinical")
            .with_batch_size(config.batch_size)
            .with_target_partitions(config.target_partitions);
        // Row-level filter pushdown into the Parquet decoder would evaluate a caller's predicate
        // on rows the policy hides (an error oracle); statistics pruning stays on.
        let mut session_config = session_config;
        session_config
            .options_mut()
            .execution
            .parquet
            .pushdown_filters = false;
        let mut template = SessionStateBuilder::new()
            .with_config(session_config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();
        // `VARIANCE` (PostgreSQL's and most BI tools' name for the sample variance, and one of
        // the aggregates a threshold allows) is not among DataFusion's names for it.
        let variance = datafusion::functions_aggregate::variance::var_samp_udaf()
            .as_ref()
            .clone()
            .with_aliases(["variance"]);
        datafusion::execution::FunctionRegistry::register_udaf(&mut template, Arc::new(variance))?;
        crate::bounded::install(&mut template)?;
        let mut uncached_runtime = template.runtime_env().as_ref().clone();
        uncached_runtime.cache_manager =
            CacheManager::try_new(&CacheManagerConfig::default().with_list_files_cache_limit(0))?;
        let uncached = SessionStateBuilder::new_from_existing(template.clone())
            .with_runtime_env(Arc::new(uncached_runtime))
            .build();

        Ok(Self {
            inner: Arc::new(Inner {
                lake: std::sync::RwLock::new(Arc::new(lake_tables)),
                template: Planning::new(template),
                policy: std::sync::RwLock::new(Arc::new(policy)),
                keys,
                config,
                store: lake.store(),
                uncached,
                subject_sets: AsyncMutex::new(HashMap::new()),
                budgeted: std::sync::Mutex::new(HashMap::new()),
                views: std::sync::Mutex::new((0, HashMap::new())),
            }),
        })
    }

    /// The catalog in force now.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.snapshot().1.catalog)
    }

    /// The policy and the catalog's tables in force now, read together.
    fn snapshot(&self) -> (Arc<PolicySet>, Arc<LakeTables>) {
        let policy = match self.inner.policy.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let lake = match self.inner.lake.read() {
            Ok(l) => Arc::clone(&l),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        (Arc::clone(&policy), lake)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<PolicySet> {
        match self.inner.policy.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replace the policy atomically: requests already planning keep the old one, every new
    /// request gets the new one. Cached subject sets (which depend on row filters) are dropped.
    pub async fn replace_policy(&self, policy: PolicySet) {
        let policy = Arc::new(policy);
        match self.inner.policy.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
        self.forget_views().await;
    }

    /// Replace the catalog and the policy checked against it, together and atomically (see
    /// [`Engine::replace_policy`]). The caller has checked the lake's files against `catalog`
    /// ([`Catalog::verify`]); `policy` was loaded against it.
    pub async fn replace_catalog(&self, catalog: Catalog, policy: PolicySet) -> Result<()> {
        let lake = Arc::new(LakeTables::new(
            catalog,
            self.inner.template.state.runtime_env(),
        )?);
        let policy = Arc::new(policy);
        {
            // The policy's lock first, as readers take it: nobody sees one without the other.
            let mut p = match self.inner.policy.write() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            match self.inner.lake.write() {
                Ok(mut l) => *l = lake,
                Err(poisoned) => *poisoned.into_inner() = lake,
            }
            *p = policy;
        }
        self.forget_views().await;
        Ok(())
    }

    /// Drop what was built from the previous policy or catalog: subject sets (which depend on
    /// row filters) and callers' views.
    async fn forget_views(&self) {
        self.inner.subject_sets.lock().await.clear();
        if let Ok(mut views) = self.inner.views.lock() {
            views.1.clear();
        }
    }

    fn decisions(
        policy: &PolicySet,
        principal: &Principal,
        d: &Dataset,
        ctx: &RequestContext,
    ) -> (Decision, Decision) {
        (
            policy.decide(principal, d, Action::RowQuery, ctx),
            policy.decide(principal, d, Action::AggregateQuery, ctx),
        )
    }

    /// The datasets `principal` may query in some way, in catalog order. Everything else is
    /// invisible to them: absent from metadata and "not found" in SQL.
    pub fn visible_datasets(&self, principal: &Principal) -> Vec<Dataset> {
        let ctx = RequestContext::default();
        let (policy, lake) = self.snapshot();
        lake.catalog
            .datasets
            .iter()
            .filter(|d| {
                let (row, agg) = Self::decisions(&policy, principal, d, &ctx);
                row.is_allowed() || agg.is_allowed()
            })
            .cloned()
            .collect()
    }

    /// A fresh session for one request, holding only the caller's visible datasets, each
    /// already filtered and masked for this caller.
    pub async fn session(&self, principal: &Principal) -> Result<Session> {
        self.session_within(principal, None).await
    }

    /// [`Engine::session`] whose queries hold memory within `budget` (shared by every session
    /// given the same budget) as well as within the server's pool.
    pub async fn session_within(
        &self,
        principal: &Principal,
        budget: Option<&crate::MemoryBudget>,
    ) -> Result<Session> {
        let request = RequestContext::default();
        let (policy, lake) = self.snapshot();
        let key = ViewKey {
            policy: Arc::as_ptr(&policy) as usize,
            name: principal.name.clone(),
            attributes: principal
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let second = request.now.timestamp();
        let cached = self.inner.views.lock().ok().and_then(|views| {
            (views.0 == second)
                .then(|| views.1.get(&key).cloned())
                .flatten()
                .filter(|v| Arc::ptr_eq(&v.policy, &policy))
        });
        let view = match cached {
            Some(v) => v,
            None => {
                let v = Arc::new(
                    self.build_view(principal, Arc::clone(&policy), &lake, &request)
                        .await?,
                );
                if let Ok(mut views) = self.inner.views.lock() {
                    if views.0 != second || views.1.len() >= MAX_VIEWS {
                        *views = (second, HashMap::new());
                    }
                    views.1.insert(key, Arc::clone(&v));
                }
                v
            }
        };
        let template = match budget {
            None => self.inner.template.clone(),
            Some(budget) => self.budgeted_state(budget),
        };
        // Each session gets a catalog list of its own, holding the caller's view and nothing
        // else.
        let catalogs = MemoryCatalogProviderList::new();
        catalogs.register_catalog(
            CATALOG_NAME.to_string(),
            Arc::clone(&view.catalog) as Arc<dyn CatalogProvider>,
        );
        let mut state = template.state.as_ref().clone();
        state.register_catalog_list(Arc::new(catalogs));
        // What `SessionContext::state` does for every query: `now()` is the request's time,
        // and aliases are generated afresh.
        state.mark_start_execution();
        let planning = Planning {
            state: Arc::new(state),
            task: template.task,
        };
        let may_explain = principal
            .attributes
            .get("role")
            .is_some_and(|r| self.inner.config.explain_roles.contains(r));
        Ok(Session {
            planning,
            may_explain,
            max_sql_bytes: self.inner.config.max_sql_bytes,
            decisions: view.decisions.clone(),
            policy_version: view.policy_version.clone(),
        })
    }

    /// The template state with queries' memory held within `budget` too. Built once per
    /// budget (a principal keeps one): building a state registers every built-in function
    /// again, 6% of planning bob's join; a clone only copies the registries.
    fn budgeted_state(&self, budget: &crate::MemoryBudget) -> Planning {
        let mut states = match self.inner.budgeted.lock() {
            Ok(states) => states,
            Err(poisoned) => poisoned.into_inner(),
        };
        // The cached state holds the budget's pool, so its address is not reused while cached.
        if let Some(state) = states.get(&budget.id()) {
            return state.clone();
        }
        let mut runtime = (*self.inner.template.state.runtime_env()).as_ref().clone();
        runtime.memory_pool = Arc::new(crate::budget::BudgetedPool {
            budget: budget.clone(),
            shared: Arc::clone(&runtime.memory_pool),
        });
        let state = Planning::new(
            SessionStateBuilder::new_from_existing(self.inner.template.state.as_ref().clone())
                .with_runtime_env(Arc::new(runtime))
                .build(),
        );
        if states.len() >= MAX_BUDGETED_STATES {
            states.clear();
        }
        states.insert(budget.id(), state.clone());
        state
    }

    /// Decide every dataset for `principal` and build its governed tables.
    async fn build_view(
        &self,
        principal: &Principal,
        policy: Arc<PolicySet>,
        lake: &LakeTables,
        request: &RequestContext,
    ) -> Result<View> {
        let catalog = MemoryCatalogProvider::new();
        let mut schemas: BTreeMap<String, Arc<MemorySchemaProvider>> = BTreeMap::new();
        let mut decisions = HashMap::new();
        for d in &lake.catalog.datasets {
            let (row, agg) = Self::decisions(&policy, principal, d, request);
            let obligations = match (&row, &agg) {
                (Decision::Allow { obligations, rule }, _)
                | (_, Decision::Allow { obligations, rule }) => {
                    (Arc::clone(obligations), rule.clone())
                }
                _ => continue,
            };
            let table = self
                .governed_table(principal, lake, d, &obligations.0, &obligations.1)
                .await?;
            let q = d.qualified();
            let schema = schemas.entry(q.schema.clone()).or_default();
            schema.register_table(q.table, Arc::new(table))?;
            decisions.insert(d.name.clone(), (row, agg));
        }
        for (name, schema) in schemas {
            catalog.register_schema(&name, schema)?;
        }
        Ok(View {
            catalog: Arc::new(catalog),
            decisions,
            policy_version: policy.version().to_string(),
            policy,
        })
    }

    async fn governed_table(
        &self,
        principal: &Principal,
        lake: &LakeTables,
        d: &Dataset,
        obligations: &Obligations,
        rule: &str,
    ) -> Result<GovernedTable> {
        let refuse = |why: String| EngineError::PermissionDenied(format!("{why} (rule: {rule})"));
        let mut filter: Option<Expr> = None;
        for f in &obligations.row_filters {
            let e = self.filter_expr(f, principal, lake, rule).await?;
            filter = Some(match filter {
                Some(prev) => prev.and(e),
                None => e,
            });
        }
        let key = principal
            .attribute("project")
            .and_then(|p| self.inner.keys.get(p));
        let mut columns = Vec::with_capacity(d.columns.len());
        let mut masked = Vec::with_capacity(d.columns.len());
        let mut pseudonymized = Vec::with_capacity(d.columns.len());
        for c in &d.columns {
            let raw = Expr::Column(Column::new_unqualified(&c.name));
            match obligations.masks.get(&c.name) {
                Some(mask) => {
                    let subject = match mask {
                        lakegate_policies::Mask::DateShift { subject, .. } => {
                            Some(Expr::Column(Column::new_unqualified(subject)))
                        }
                        _ => None,
                    };
                    let e = mask_expr(mask, raw, &c.data_type.to_arrow(), key, subject).map_err(
                        |e| {
                            refuse(format!(
                                "cannot mask {}.{}: {e} (project '{}')",
                                d.name,
                                c.name,
                                principal.attribute("project").unwrap_or("")
                            ))
                        },
                    )?;
                    columns.push(e);
                    masked.push(true);
                    pseudonymized.push(matches!(mask, lakegate_policies::Mask::Pseudonym));
                }
                None => {
                    columns.push(raw);
                    masked.push(false);
                    pseudonymized.push(false);
                }
            }
        }
        Ok(GovernedTable::new(
            d.name.clone(),
            lake.table(&d.name)?,
            filter,
            columns,
            &masked,
            pseudonymized,
        ))
    }

    fn filter_expr<'a>(
        &'a self,
        f: &'a RowFilter,
        principal: &'a Principal,
        lake: &'a LakeTables,
        rule: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Expr>> {
        Box::pin(async move {
            let column = Expr::Column(Column::new_unqualified(&f.column));
            if let Some(v) = &f.equals {
                let value = match v {
                    FilterValue::Bool(b) => lit(*b),
                    FilterValue::Int(i) => lit(*i),
                    FilterValue::Str(s) => lit(s.clone()),
                    FilterValue::Attribute { attribute } => {
                        let v = principal.attribute(attribute).filter(|v| !v.is_empty()).ok_or_else(|| {
                            EngineError::PermissionDenied(format!(
                                "the principal has no '{attribute}' attribute, which its row filter needs (rule: {rule})"
                            ))
                        })?;
                        lit(v.to_string())
                    }
                };
                return Ok(column.eq(value));
            }
            match &f.in_set {
                Some(set) => {
                    let members = self.subject_set(set, principal, lake, rule).await?;
                    Ok(InSubjectSet::expr(members, column))
                }
                None => Err(EngineError::Internal(
                    "row filter without a condition".into(),
                )),
            }
        })
    }

    async fn subject_set(
        &self,
        spec: &SubjectSet,
        principal: &Principal,
        lake: &LakeTables,
        rule: &str,
    ) -> Result<Arc<crate::governed::Members>> {
        let inner_filter = self
            .filter_expr(&spec.filter, principal, lake, rule)
            .await?;
        let cache_key = format!("{}|{}|{}", spec.dataset, spec.key, inner_filter);
        let dataset = lake
            .catalog
            .dataset(&spec.dataset)
            .ok_or_else(|| EngineError::Internal(format!("unknown dataset {}", spec.dataset)))?;
        // Listed before the set is read: if the files change in between, the set is newer than
        // the listing it is stored with and the next request reads it again.
        let files = dataset.file_versions(&self.inner.store).await?;
        let mut cache = self.inner.subject_sets.lock().await;
        if let Some(known) = cache.get(&cache_key) {
            if known.files == files {
                return Ok(Arc::clone(&known.members));
            }
        }
        // Policy-internal read of the raw dataset: never part of the caller's plan.
        let raw = lake.table(&spec.dataset)?;
        // Read through a state with no cached listing: the set is then at least as new as
        // `files`, never older (a stale listing would also read a replaced file at its old size).
        let ctx = SessionContext::new_with_state(self.inner.uncached.clone());
        let batches = ctx
            .read_table(raw)?
            .filter(inner_filter)?
            .select(vec![Expr::Column(Column::new_unqualified(&spec.key))])?
            .distinct()?
            .collect()
            .await
            .map_err(|e| {
                // For the log only: the dataset may be one the caller cannot see, so the caller
                // is told of "a data file of the lake" (`error::read_dataset` does not match).
                datafusion::error::DataFusionError::Context(
                    format!("reading {}{}", spec.dataset, crate::error::FOR_ROW_FILTER),
                    Box::new(e),
                )
            })?;
        let mut keys = Vec::new();
        for b in &batches {
            let strings = crate::masks::Strings::of(b.column(0)).map_err(|_| {
                EngineError::Internal(format!(
                    "subject key {}.{} is not utf8",
                    spec.dataset, spec.key
                ))
            })?;
            keys.extend((0..strings.len()).filter_map(|i| strings.get(i).map(str::as_bytes)));
        }
        let set = Arc::new(crate::governed::Members::new(keys));
        cache.insert(
            cache_key,
            KnownSet {
                files,
                members: Arc::clone(&set),
            },
        );
        Ok(set)
    }
}

fn listing_table(d: &Dataset, runtime: &RuntimeEnv) -> Result<Arc<dyn TableProvider>> {
    let url = ListingTableUrl::parse(format!("{LAKE_URL}{}", d.location))?;
    let format: Arc<dyn datafusion::datasource::file_format::FileFormat> = match d.format {
        FileFormat::Parquet => Arc::new(crate::contract::ContractFormat::new(
            Arc::new(ParquetFormat::default()),
            d,
        )),
        FileFormat::Ndjson => Arc::new(crate::contract::ContractFormat::new(
            Arc::new(JsonFormat::default()),
            d,
        )),
    };
    let options = ListingOptions::new(format).with_file_extension(d.format.extension());
    // Parquet strings are read as views: no copy out of the pages for rows a filter drops, and
    // short values (ids, codes) compare and hash inline. Results leave as `Utf8` (see
    // `without_views`).
    let schema = match d.format {
        FileFormat::Parquet => with_views(&d.schema()),
        FileFormat::Ndjson => d.schema(),
    };
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    // The runtime's file statistics cache (keyed by path, size and modification time), as
    // `register_parquet` gives plain DataFusion: without it every query re-derived each file's
    // statistics from its Parquet footer while planning.
    Ok(Arc::new(ListingTable::try_new(config)?.with_cache(
        runtime.cache_manager.get_file_statistic_cache(),
    )))
}

/// `schema` with its `Utf8` columns as `Utf8View`.
fn with_views(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => f.as_ref().clone().with_data_type(DataType::Utf8View),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// `t` with every view type (at any depth) as its plain counterpart.
fn without_views(t: &DataType) -> DataType {
    let field = |f: &FieldRef| {
        Arc::new(
            f.as_ref()
                .clone()
                .with_data_type(without_views(f.data_type())),
        )
    };
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::ListView(f) | DataType::List(f) => DataType::List(field(f)),
        DataType::LargeListView(f) | DataType::LargeList(f) => DataType::LargeList(field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(field(f), *n),
        DataType::Struct(fs) => DataType::Struct(fs.iter().map(field).collect()),
        DataType::Map(f, sorted) => DataType::Map(field(f), *sorted),
        other => other.clone(),
    }
}

/// The plan with its view-typed output columns cast to plain types: Flight SQL clients
/// (JDBC, older pyarrow, BI tools) do not all read `Utf8View`.
fn results_without_views(plan: LogicalPlan) -> Result<LogicalPlan> {
    let schema = Arc::clone(plan.schema());
    if schema
        .fields()
        .iter()
        .all(|f| without_views(f.data_type()) == *f.data_type())
    {
        return Ok(plan);
    }
    let exprs: Vec<Expr> = schema
        .iter()
        .map(|(qualifier, f)| {
            let column = Expr::Column(Column::from((qualifier, f)));
            let plain = without_views(f.data_type());
            if plain == *f.data_type() {
                column
            } else {
                cast(column, plain).alias_qualified(qualifier.cloned(), f.name())
            }
        })
        .collect();
    Ok(LogicalPlan::Projection(
        datafusion::logical_expr::Projection::try_new(exprs, Arc::new(plan))?,
    ))
}

/// The plan without a round-robin split of its sorted result on the way out.
///
/// DataFusion's `EnforceDistribution` splits the single sorted stream under a projection at
/// the root (here `results_without_views`' cast) into partitions, to run the projection in
/// parallel (apache/datafusion#21349); the result then leaves with its partitions interleaved,
/// and an `ORDER BY` of more than one batch arrives out of order. Above the last merge only
/// projections run, so the split buys nothing: it is removed, down the chain of projections
/// from the root.
fn keep_output_order(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    use datafusion::physical_plan::execution_plan::replace_children_if_necessary;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::{ExecutionPlanProperties, Partitioning};
    if let Some(split) = plan.downcast_ref::<RepartitionExec>() {
        let input = split.input();
        let sorted_stream =
            input.output_partitioning().partition_count() == 1 && input.output_ordering().is_some();
        if sorted_stream && matches!(split.partitioning(), Partitioning::RoundRobinBatch(_)) {
            return Ok(Arc::clone(input));
        }
        return Ok(plan);
    }
    let Some(projection) = plan.downcast_ref::<ProjectionExec>() else {
        return Ok(plan);
    };
    let kept = keep_output_order(Arc::clone(projection.input()))?;
    Ok(replace_children_if_necessary(plan, vec![kept])?)
}

/// What planning and running a request's queries read, shared (never copied) by every step:
/// cloning a `SessionState` copies every function registry (20 us), and building a
/// `TaskContext` from one copies them again.
#[derive(Clone)]
struct Planning {
    /// The state queries are planned in: the caller's catalog view and nothing else.
    state: Arc<SessionState>,
    /// What execution reads: configuration, functions, runtime. None of it depends on the
    /// caller (their view is in the catalog, which planning has already resolved), so one is
    /// built per template state and shared by every session cloned from it.
    task: Arc<datafusion::execution::TaskContext>,
}

impl Planning {
    fn new(state: SessionState) -> Self {
        let task = Arc::new(datafusion::execution::TaskContext::from(&state));
        Self {
            state: Arc::new(state),
            task,
        }
    }
}

/// One request's view of the lake.
pub struct Session {
    planning: Planning,
    /// Whether the caller's role is one of the engine's `explain_roles`.
    may_explain: bool,
    max_sql_bytes: usize,
    /// Dataset -> (row-query decision, aggregate-query decision), for visible datasets.
    decisions: HashMap<String, (Decision, Decision)>,
    policy_version: String,
}

impl Session {
    /// The version of the policy this session's decisions came from.
    pub fn policy_version(&self) -> &str {
        &self.policy_version
    }
}

/// A planned (not yet executed) query: its result schema and parameters are known, nothing
/// has been read.
pub struct PlannedQuery {
    planning: Planning,
    plan: LogicalPlan,
    schema: SchemaRef,
    parameters: SchemaRef,
    report: AccessReport,
    /// EXPLAIN ANALYZE: the verified plan to run and display when (and only when) the query is
    /// executed. Planning alone (GetFlightInfo) must not run the caller's query.
    analyze: Option<AnalyzeLater>,
}

/// The parts of an EXPLAIN ANALYZE that wait for execution.
struct AnalyzeLater {
    logical: String,
    physical: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
}

impl AnalyzeLater {
    /// A stream that, when first polled, runs the caller's governed query to its end and then
    /// yields the plan annotated with what the run measured. Running inside the stream puts
    /// the run under whatever bounds the consumer puts on the stream (the server's query
    /// timeout), after the decision is audited.
    fn run(self, planning: Planning, schema: SchemaRef) -> SendableRecordBatchStream {
        use futures::{StreamExt, TryStreamExt};
        let external = |e: EngineError| datafusion::error::DataFusionError::External(Box::new(e));
        let run = async move {
            datafusion::physical_plan::collect(
                Arc::clone(&self.physical),
                Arc::clone(&planning.task),
            )
            .await?;
            let text = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(
                self.physical.as_ref(),
            )
            .indent(true)
            .to_string();
            let plan = explain_rows(&self.logical, "physical_plan_with_metrics", text)
                .map_err(external)?;
            let (physical, task) = physical_plan(&planning, plan).await.map_err(external)?;
            datafusion::physical_plan::execute_stream(physical, task)
        };
        Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                schema,
                futures::stream::once(run).try_flatten().boxed(),
            ),
        )
    }
}

/// What a query touches and which rules govern it, for the audit trail. Holds names only,
/// never a value.
#[derive(Clone, Debug, Default)]
pub struct AccessReport {
    /// Datasets the query reads, sorted.
    pub datasets: Vec<String>,
    /// Columns read, `dataset.column` (known once the physical plan exists).
    pub columns: Vec<String>,
    /// One entry per dataset: the action, the deciding rule and its obligations.
    pub rules: Vec<String>,
    /// Groups an aggregation threshold suppressed so far (grows while the query runs).
    pub suppressed: Arc<AtomicU64>,
    /// Whether any aggregation threshold applies.
    pub thresholded: bool,
    /// Under a threshold, the kind of failure that was answered as an empty result instead
    /// (set once, if the query failed while it ran); never a value or a message that could
    /// quote one.
    pub failure_withheld: Arc<std::sync::OnceLock<String>>,
}

impl AccessReport {
    pub fn groups_suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

impl Session {
    /// Parse and plan one SQL query. Only `SELECT`-style queries (with CTEs, set operations,
    /// `VALUES`) are accepted; `?` and `$n` placeholders become parameters.
    pub async fn plan(&self, sql: &str) -> Result<PlannedQuery> {
        if sql.len() > self.max_sql_bytes {
            return Err(EngineError::ResourceExhausted(format!(
                "SQL text is {} bytes; the limit is {}",
                sql.len(),
                self.max_sql_bytes
            )));
        }
        let state = &self.planning.state;
        let dialect = state.config().options().sql_parser.dialect;
        // Parsed on a stack of its own: a deep tree is refused (and dropped) there.
        let parsed = crate::depth::on_parse_stack(sql, || {
            let statement = state.sql_to_statement(sql, &dialect)?;
            crate::depth::check(&statement).map_err(EngineError::InvalidQuery)?;
            Ok::<_, EngineError>(statement)
        });
        let mut statement = match parsed? {
            DFStatement::Explain(e) if self.may_explain => {
                return self.explain(*e.statement, e.options.analyze).await;
            }
            other => other,
        };
        match &mut statement {
            DFStatement::Statement(s) if matches!(**s, SqlStatement::Query(_)) => {
                number_question_marks(s);
            }
            DFStatement::Explain(_) => return Err(explain_refused()),
            DFStatement::Statement(s) if matches!(**s, SqlStatement::Explain { .. }) => {
                return Err(explain_refused())
            }
            _ => {
                let kind = sql
                    .split_whitespace()
                    .next()
                    .unwrap_or("empty")
                    .to_ascii_uppercase();
                return Err(EngineError::InvalidQuery(format!(
                    "only queries are accepted; {kind} statements are refused"
                )));
            }
        }
        self.plan_statement(statement).await
    }

    /// Plans a query statement (already checked to be a query) and governs it.
    async fn plan_statement(&self, statement: DFStatement) -> Result<PlannedQuery> {
        let state = &self.planning.state;
        let plan = state.statement_to_plan(statement).await?;
        // Defence in depth: a query that plans into DDL or DML (SELECT ... INTO) is refused too.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|_| EngineError::InvalidQuery("only read-only queries are accepted".into()))?;

        let (plan, report) = self.govern(plan)?;
        let plan = results_without_views(plan)?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let parameters = parameter_schema(&plan)?;
        Ok(PlannedQuery {
            planning: self.planning.clone(),
            plan,
            schema,
            parameters,
            report,
            analyze: None,
        })
    }
}

impl Session {
    /// Decide each dataset the plan reads for the action the query performs on it, and apply
    /// aggregation thresholds. Refusals name the rule.
    fn govern(&self, plan: LogicalPlan) -> Result<(LogicalPlan, AccessReport)> {
        let mut scans = Vec::new();
        collect_scans(&plan, false, &mut scans)?;
        let mut actions: BTreeMap<String, Action> = BTreeMap::new();
        for (dataset, under_aggregate) in scans {
            let a = if under_aggregate {
                Action::AggregateQuery
            } else {
                Action::RowQuery
            };
            let e = actions.entry(dataset).or_insert(a);
            if a == Action::RowQuery {
                *e = Action::RowQuery;
            }
        }
        let mut thresholds: HashMap<String, (Threshold, String)> = HashMap::new();
        let mut report = AccessReport {
            datasets: actions.keys().cloned().collect(),
            ..Default::default()
        };
        for (dataset, action) in &actions {
            let (row, agg) = self
                .decisions
                .get(dataset)
                .ok_or_else(|| EngineError::Internal(format!("no decision for {dataset}")))?;
            let decision = if *action == Action::RowQuery {
                row
            } else {
                agg
            };
            match decision {
                Decision::Allow { obligations, rule } => {
                    if let Some(t) = &obligations.threshold {
                        thresholds.insert(dataset.clone(), (t.clone(), rule.clone()));
                    }
                    report
                        .rules
                        .push(describe_rule(dataset, *action, rule, obligations));
                }
                Decision::Deny { .. } => {
                    let hint = if *action == Action::RowQuery && agg.is_allowed() {
                        "; only aggregate queries are allowed on it"
                    } else {
                        ""
                    };
                    return Err(EngineError::PermissionDenied(format!(
                        "{} on {dataset} is refused (rule: {}){hint}",
                        action.as_str(),
                        decision.rule_name()
                    )));
                }
            }
        }
        if thresholds.is_empty() {
            return Ok((plan, report));
        }
        report.thresholded = true;
        let plan = apply_thresholds(plan, &thresholds, &report.suppressed)?;
        Ok((plan, report))
    }
}

fn governed_dataset(scan: &datafusion::logical_expr::TableScan) -> Option<String> {
    let provider = source_as_provider(&scan.source).ok()?;
    (provider.as_ref() as &dyn std::any::Any)
        .downcast_ref::<GovernedTable>()
        .map(|g| g.dataset.clone())
}

/// Every governed scan in the plan (subqueries included), and whether an aggregate sits
/// between it and the result.
fn collect_scans(
    plan: &LogicalPlan,
    under_aggregate: bool,
    out: &mut Vec<(String, bool)>,
) -> Result<()> {
    let here = under_aggregate || matches!(plan, LogicalPlan::Aggregate(_));
    if let LogicalPlan::TableScan(scan) = plan {
        if let Some(d) = governed_dataset(scan) {
            out.push((d, under_aggregate));
        }
    }
    let mut err = None;
    plan.apply_subqueries(|sub| {
        if let Err(e) = collect_scans(sub, here, out) {
            err = Some(e);
        }
        Ok(TreeNodeRecursion::Jump)
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    for input in plan.inputs() {
        collect_scans(input, here, out)?;
    }
    Ok(())
}

/// The threshold (and its rule) that protects data flowing into `plan` from governed scans
/// below it, not counting data that already passed through an aggregate.
fn protected_below(
    plan: &LogicalPlan,
    thresholds: &HashMap<String, (Threshold, String)>,
) -> Option<(Threshold, String)> {
    let mut found: Option<(Threshold, String)> = None;
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Some(t) = governed_dataset(scan).and_then(|d| thresholds.get(&d)) {
                if found.as_ref().is_none_or(|(f, _)| t.0.k > f.k) {
                    found = Some(t.clone());
                }
            }
        }
        Ok(
            if matches!(node, LogicalPlan::Aggregate(_)) && !std::ptr::eq(node, plan) {
                TreeNodeRecursion::Jump
            } else {
                TreeNodeRecursion::Continue
            },
        )
    });
    found
}

/// Aggregates allowed over protected data: their result over a group of at least k units does
/// not reveal any single unit's value.
const SAFE_AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "var",
    "var_pop",
    "var_samp",
    "variance",
];

/// `dataset: action allowed by rule [obligations]`, naming columns and mask kinds only.
fn describe_rule(dataset: &str, action: Action, rule: &str, o: &Obligations) -> String {
    let mut parts = Vec::new();
    for f in &o.row_filters {
        let how = match (&f.equals, &f.in_set) {
            (Some(FilterValue::Attribute { attribute }), _) => {
                format!("= principal.{attribute}")
            }
            (Some(_), _) => "= constant".to_string(),
            (None, Some(set)) => format!("in subject set of {}", set.dataset),
            (None, None) => "?".to_string(),
        };
        parts.push(format!("row filter {} {how}", f.column));
    }
    if !o.masks.is_empty() {
        let masks: Vec<String> = o
            .masks
            .iter()
            .map(|(c, m)| format!("{c}={}", crate::masks::mask_name(m)))
            .collect();
        parts.push(format!("masks {}", masks.join(" ")));
    }
    if let Some(t) = &o.threshold {
        parts.push(format!("threshold k={} distinct {}", t.k, t.unit));
    }
    let obligations = if parts.is_empty() {
        String::new()
    } else {
        format!(" [{}]", parts.join("; "))
    };
    format!(
        "{dataset}: {} allowed by rule {rule}{obligations}",
        action.as_str()
    )
}

/// Whether output column `i` of `plan` is, value for value, the privacy unit `unit` of a
/// governed dataset: read by a governed scan and passed up unchanged (renamed at most). Names
/// prove nothing (`SELECT encounter_id AS patient_id` is not a patient), so thresholds and the
/// join rule follow the column back to its scan. Anything computed is not the unit.
///
/// Only datasets under a threshold with this unit supply units: a dataset the caller may read
/// row by row, joined on some other key, could otherwise lend its own patients to a group.
fn is_unit(plan: &LogicalPlan, i: usize, unit: &Units) -> bool {
    is_unit_via(plan, i, unit, true)
}

/// [`is_unit`], where with `optional` false the column may not come from the optional side of
/// an outer join (there it is NULL on the rows that found no match).
fn is_unit_via(plan: &LogicalPlan, i: usize, unit: &Units, optional: bool) -> bool {
    let scanned_unit = |node: &LogicalPlan, i: usize| match node {
        LogicalPlan::TableScan(scan) => {
            governed_dataset(scan).is_some_and(|d| {
                unit.thresholds
                    .get(&d)
                    .is_some_and(|(t, _)| t.unit == unit.name)
            }) && i < scan.projected_schema.fields().len()
                && scan.projected_schema.field(i).name() == unit.name
        }
        _ => false,
    };
    traces_to(
        plan,
        i,
        Trace {
            casts: false,
            optional,
        },
        &scanned_unit,
    )
}

/// Whether output column `i` of `plan` holds a governed dataset's values as its scan read them
/// (renamed, cast). An aggregate over thresholded data may only take such
/// columns: an argument computed from a condition (`sum(CASE WHEN birth_date = ... THEN
/// total_cost END)`, `count(*) FILTER (WHERE ...)`, a weight joined in from `VALUES` or a
/// literal of one union branch) would release one patient's value inside a group the
/// threshold counts as large. Conditions belong in WHERE or GROUP BY, where groups are counted.
/// With `optional` false, a column from the optional side of an outer join does not count
/// (see [`plain_argument`]).
fn carries_dataset_values(plan: &LogicalPlan, i: usize, optional: bool) -> bool {
    // Not an inner aggregate's output: released groups joined back to the rows turn any
    // expression into a weight (`GROUP BY zip3, CASE WHEN zip3 = '890' THEN 1000000 ELSE 0 END`,
    // joined on zip3 and summed per site, counts that area's patients at each site, where the
    // threshold suppresses the sites with few of them).
    let read = |node: &LogicalPlan, _: usize| match node {
        LogicalPlan::TableScan(scan) => governed_dataset(scan).is_some(),
        _ => false,
    };
    traces_to(
        plan,
        i,
        Trace {
            casts: true,
            optional,
        },
        &read,
    )
}

/// What [`traces_to`] lets a column pass through on its way down.
#[derive(Clone, Copy)]
struct Trace {
    /// Casts (`CAST(x AS DOUBLE)` still carries `x`'s values).
    casts: bool,
    /// The side of an outer join that may find no match (the right of a LEFT JOIN, the left
    /// of a RIGHT JOIN, both of a FULL JOIN): its columns are NULL on the rows that did not.
    optional: bool,
}

/// Follows output column `i` of `plan` down through renames (and casts, if `trace.casts`),
/// filters, sorts, limits, unions (every branch) and joins (the optional side of an outer join
/// only if `trace.optional`) to the node that produced it, and asks `source` about that node's
/// column. A column computed by any other expression traces to nothing.
fn traces_to(
    plan: &LogicalPlan,
    i: usize,
    trace: Trace,
    source: &dyn Fn(&LogicalPlan, usize) -> bool,
) -> bool {
    use datafusion::common::JoinType;
    use datafusion::logical_expr::Distinct;
    let down = |input: &LogicalPlan, i: usize| traces_to(input, i, trace, source);
    match plan {
        LogicalPlan::Projection(p) => {
            let Some(e) = p.expr.get(i).map(|e| e.clone().unalias_nested().data) else {
                return false;
            };
            match if trace.casts {
                uncast(e, p.input.schema())
            } else {
                e
            } {
                Expr::Column(c) => p
                    .input
                    .schema()
                    .maybe_index_of_column(&c)
                    .is_some_and(|j| down(&p.input, j)),
                _ => false,
            }
        }
        LogicalPlan::SubqueryAlias(a) => down(&a.input, i),
        LogicalPlan::Filter(f) => down(&f.input, i),
        LogicalPlan::Sort(s) => down(&s.input, i),
        LogicalPlan::Limit(l) => down(&l.input, i),
        LogicalPlan::Repartition(r) => down(&r.input, i),
        LogicalPlan::Distinct(Distinct::All(input)) => down(input, i),
        LogicalPlan::Union(u) => u.inputs.iter().all(|input| down(input, i)),
        LogicalPlan::Join(j) => {
            let left = j.left.schema().fields().len();
            match j.join_type {
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
                    let optional = match j.join_type {
                        JoinType::Left => i >= left,
                        JoinType::Right => i < left,
                        JoinType::Full => true,
                        _ => false,
                    };
                    if optional && !trace.optional {
                        false
                    } else if i < left {
                        down(&j.left, i)
                    } else {
                        down(&j.right, i - left)
                    }
                }
                JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => {
                    i < left && down(&j.left, i)
                }
                JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => {
                    i < j.right.schema().fields().len() && down(&j.right, i)
                }
            }
        }
        other => source(other, i),
    }
}

/// Whether an argument of an aggregate over `input` is a column `carries_dataset_values` (cast
/// at most) or a literal (`count(*)` counts `1`); with `optional` false, not from the optional
/// side of an outer join. The threshold counts the patients of a group's rows, but such a
/// column holds values only where the join found a match: `patients p LEFT JOIN (SELECT ...
/// FROM encounters WHERE <one patient>) x ON ...` puts one patient's `avg(x.total_cost)` in a
/// group of thousands, exactly as a CASE would.
fn plain_argument(input: &LogicalPlan, arg: &Expr, optional: bool) -> bool {
    match uncast(arg.clone().unalias_nested().data, input.schema()) {
        Expr::Literal(..) => true,
        Expr::Column(c) => input
            .schema()
            .maybe_index_of_column(&c)
            .is_some_and(|i| carries_dataset_values(input, i, optional)),
        _ => false,
    }
}

/// `e` without the casts around it that keep every value: those that never fail and never
/// turn a value into NULL (`CAST(total_cost AS DOUBLE)`). A `TRY_CAST`, or a cast that can
/// fail, is computed: `count(TRY_CAST(total_cost AS DECIMAL(4,2)))` counts only the costs under
/// 100, a condition hidden in a conversion, as a CASE would.
fn uncast(mut e: Expr, schema: &DFSchema) -> Expr {
    loop {
        match e {
            Expr::Cast(c)
                if c.expr
                    .get_type(schema)
                    .is_ok_and(|from| crate::total::cast_is_total(&from, c.field.data_type())) =>
            {
                e = *c.expr
            }
            other => return other,
        }
    }
}

/// A subquery expression (`IN`, `EXISTS`, scalar) of `node` that reads rows under a threshold
/// (not through an aggregate of its own, which the threshold then guards) answers from rows no
/// threshold counts: `WHERE EXISTS (SELECT 1 FROM encounters WHERE total_cost > 49998)` released
/// every group exactly when one such encounter existed, and `site_id IN (SELECT site_id FROM
/// encounters WHERE ...)` named the sites holding one. Such a subquery may only select patients
/// for the outer rows: `unit IN (SELECT unit ...)`, or an `EXISTS` whose rows are tied to the
/// outer row by `inner.unit = outer.unit` (a conjunct of a filter on its direct path); the
/// outer threshold then counts the patients it leaves.
///
/// Returns whether `node` holds a subquery expression at all.
fn subqueries_match_units(
    node: &LogicalPlan,
    thresholds: &HashMap<String, (Threshold, String)>,
) -> Result<bool> {
    let outer = node.inputs();
    // Whether `c` is the unit in one of the node's inputs (an outer reference in a subquery).
    let outer_unit = |c: &Column, units: &Units| {
        outer.iter().any(|input| {
            input
                .schema()
                .maybe_index_of_column(c)
                .is_some_and(|i| is_unit(input, i, units))
        })
    };
    let mut refused = None;
    let mut any = false;
    for e in node.expressions() {
        e.apply(|x| {
            let (sub, in_expr) = match x {
                Expr::InSubquery(q) => (&q.subquery, Some(q.expr.as_ref())),
                Expr::Exists(q) => (&q.subquery, None),
                Expr::ScalarSubquery(q) => (q, None),
                _ => return Ok(TreeNodeRecursion::Continue),
            };
            any = true;
            let Some((t, rule)) = protected_below(&sub.subquery, thresholds) else {
                return Ok(TreeNodeRecursion::Continue);
            };
            let units = Units {
                name: &t.unit,
                thresholds,
            };
            let ok = match (x, in_expr) {
                // Not from the optional side of an outer join: a NULL among the subquery's
                // values turns every `NOT IN` false, so whether the join found one patient's
                // match would decide whether any row is counted at all.
                (Expr::InSubquery(_), Some(Expr::Column(c))) => {
                    outer_unit(c, &units) && is_unit_via(&sub.subquery, 0, &units, false)
                }
                (Expr::Exists(_), _) => tied_to_outer_unit(&sub.subquery, &units, &outer_unit),
                _ => false,
            };
            if !ok {
                refused = Some(EngineError::PermissionDenied(format!(
                    "a subquery over data under an aggregation threshold must aggregate, or select \
                     patients by {unit} ({unit} IN (SELECT {unit} ...), not from the optional \
                     side of an outer join, or EXISTS tied by inner.{unit} = outer.{unit}): its \
                     rows are counted by no threshold (rule: {rule})",
                    unit = t.unit
                )));
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
    }
    refused.map_or(Ok(any), Err)
}

/// Whether a filter on the direct path from `plan` down (through projections, aliases, sorts,
/// limits, distinct) has a conjunct `inner.unit = outer.unit`.
fn tied_to_outer_unit(
    plan: &LogicalPlan,
    units: &Units,
    outer_unit: &dyn Fn(&Column, &Units) -> bool,
) -> bool {
    use datafusion::logical_expr::{Distinct, Operator};
    match plan {
        LogicalPlan::Filter(f) => {
            let tied = datafusion::logical_expr::utils::split_conjunction(&f.predicate)
                .into_iter()
                .any(|c| match c {
                    Expr::BinaryExpr(b) if b.op == Operator::Eq => {
                        let pair = |inner: &Expr, out: &Expr| match (inner, out) {
                            (Expr::Column(i), Expr::OuterReferenceColumn(_, o)) => {
                                f.input
                                    .schema()
                                    .maybe_index_of_column(i)
                                    .is_some_and(|j| is_unit(&f.input, j, units))
                                    && outer_unit(o, units)
                            }
                            _ => false,
                        };
                        pair(&b.left, &b.right) || pair(&b.right, &b.left)
                    }
                    _ => false,
                });
            tied || tied_to_outer_unit(&f.input, units, outer_unit)
        }
        LogicalPlan::Projection(p) => tied_to_outer_unit(&p.input, units, outer_unit),
        LogicalPlan::SubqueryAlias(a) => tied_to_outer_unit(&a.input, units, outer_unit),
        LogicalPlan::Sort(s) => tied_to_outer_unit(&s.input, units, outer_unit),
        LogicalPlan::Limit(l) => tied_to_outer_unit(&l.input, units, outer_unit),
        LogicalPlan::Distinct(Distinct::All(input)) => tied_to_outer_unit(input, units, outer_unit),
        _ => false,
    }
}

/// The privacy unit sought, and the thresholds of the datasets that may supply it.
struct Units<'a> {
    name: &'a str,
    thresholds: &'a HashMap<String, (Threshold, String)>,
}

/// Whether `e`, a join condition's operand, is the privacy unit of the join's left or right input.
fn join_operand_is_unit(j: &datafusion::logical_expr::Join, e: &Expr, unit: &Units) -> bool {
    let Expr::Column(c) = e else { return false };
    if let Some(i) = j.left.schema().maybe_index_of_column(c) {
        return is_unit(&j.left, i, unit);
    }
    j.right
        .schema()
        .maybe_index_of_column(c)
        .is_some_and(|i| is_unit(&j.right, i, unit))
}

/// The plan with each `WHERE a.x = b.y` over inner joins (comma joins, `CROSS JOIN`, or
/// `JOIN ... ON` with more in WHERE) moved into the condition of the join that brings `a` and
/// `b` together, where the threshold's join check reads it: for inner joins the two are the
/// same query, and DataFusion's optimizer moves them there itself later. Equalities of a column
/// from each side move into the join; conjuncts on one side only go down with that side when it
/// is itself an inner join (`FROM a, b, c WHERE a.id = b.id AND b.id = c.id`); the rest stays.
fn joins_from_where(plan: LogicalPlan) -> datafusion::common::Result<LogicalPlan> {
    use datafusion::common::JoinType;
    use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
    use datafusion::logical_expr::{Filter, Join};
    fn inner(plan: &LogicalPlan) -> Option<&Join> {
        match plan {
            LogicalPlan::Join(j) if j.join_type == JoinType::Inner => Some(j),
            _ => None,
        }
    }
    fn filtered(
        predicate: Option<Expr>,
        input: LogicalPlan,
    ) -> datafusion::common::Result<LogicalPlan> {
        Ok(match predicate {
            Some(p) => LogicalPlan::Filter(Filter::try_new(p, Arc::new(input))?),
            None => input,
        })
    }
    plan.transform_down_with_subqueries(|node| {
        let LogicalPlan::Filter(filter) = &node else {
            return Ok(Transformed::no(node));
        };
        let Some(join) = inner(filter.input.as_ref()) else {
            return Ok(Transformed::no(node));
        };
        let (left, right) = (join.left.schema(), join.right.schema());
        // 0: left only, 1: right only, 2: both, None: neither or unknown.
        let sides = |e: &Expr| {
            let refs = e.column_refs();
            let l = refs.iter().all(|c| left.has_column(c));
            let r = refs.iter().all(|c| right.has_column(c));
            match (refs.is_empty(), l, r) {
                (true, _, _) | (_, true, true) => None,
                (_, true, false) => Some(0),
                (_, false, true) => Some(1),
                _ => Some(2),
            }
        };
        let (mut across, mut lefts, mut rights, mut rest) = (vec![], vec![], vec![], vec![]);
        for c in split_conjunction_owned(filter.predicate.clone()) {
            let equates_columns = matches!(&c, Expr::BinaryExpr(b)
                if b.op == datafusion::logical_expr::Operator::Eq
                    && matches!((b.left.as_ref(), b.right.as_ref()), (Expr::Column(_), Expr::Column(_))));
            match sides(&c) {
                Some(2) if equates_columns => across.push(c),
                Some(0) if inner(&join.left).is_some() => lefts.push(c),
                Some(1) if inner(&join.right).is_some() => rights.push(c),
                _ => rest.push(c),
            }
        }
        if across.is_empty() && lefts.is_empty() && rights.is_empty() {
            return Ok(Transformed::no(node));
        }
        let mut joined = join.clone();
        joined.filter = conjunction(joined.filter.take().into_iter().chain(across));
        joined.left = Arc::new(filtered(conjunction(lefts), joined.left.as_ref().clone())?);
        joined.right = Arc::new(filtered(conjunction(rights), joined.right.as_ref().clone())?);
        Ok(Transformed::yes(filtered(
            conjunction(rest),
            LogicalPlan::Join(joined),
        )?))
    })
    .map(|t| t.data)
}

fn apply_thresholds(
    plan: LogicalPlan,
    thresholds: &HashMap<String, (Threshold, String)>,
    suppressed: &Arc<AtomicU64>,
) -> Result<LogicalPlan> {
    let refuse =
        |why: String, rule: &str| EngineError::PermissionDenied(format!("{why} (rule: {rule})"));
    let plan = joins_from_where(plan)?;
    let subqueries = std::cell::Cell::new(false);
    let rewritten = plan.transform_up_with_subqueries(|node| {
        let fail = |e: EngineError| datafusion::error::DataFusionError::External(Box::new(e));
        if subqueries_match_units(&node, thresholds).map_err(fail)? {
            subqueries.set(true);
        }
        let Some((threshold, rule)) = protected_below(&node, thresholds) else {
            return Ok(Transformed::no(node));
        };
        let sought = Units {
            name: &threshold.unit,
            thresholds,
        };
        match &node {
            LogicalPlan::Window(_) => Err(fail(refuse(
                "window functions over data under an aggregation threshold are refused".into(),
                &rule,
            ))),
            // A LIMIT (or OFFSET) below the aggregate picks rows by their rank: the answers for
            // `ORDER BY x LIMIT 12` and `LIMIT 11` differ by exactly one row, which no WHERE the
            // threshold counts could single out so cheaply. Above the aggregate it limits
            // released groups, and this node is never reached there.
            LogicalPlan::Limit(_) => Err(fail(refuse(
                "LIMIT and OFFSET over rows under an aggregation threshold are refused (they pick rows by rank); limit the released groups instead".into(),
                &rule,
            ))),
            LogicalPlan::Distinct(datafusion::logical_expr::Distinct::On(_)) => Err(fail(refuse(
                "DISTINCT ON over rows under an aggregation threshold is refused (it picks one row per key by rank, as FIRST_VALUE would)".into(),
                &rule,
            ))),
            LogicalPlan::Join(j) => {
                let both = protected_below(&j.left, thresholds).is_some() && protected_below(&j.right, thresholds).is_some();
                // SQL's `JOIN ... ON a = b` arrives as a join filter (the optimizer turns it into
                // equi-join keys later), a comma join's `WHERE a = b` too (`joins_from_where`):
                // accept keys and filter conjuncts alike. One conjunct unit = unit pairs rows of
                // one unit only; further conditions can only drop such pairs (as they would in
                // WHERE), never pair two units. A disjunction is one conjunct, and not unit = unit.
                let mut pairs: Vec<(&Expr, &Expr)> = j.on.iter().map(|(l, r)| (l, r)).collect();
                if let Some(f) = &j.filter {
                    for c in datafusion::logical_expr::utils::split_conjunction(f) {
                        if let Expr::BinaryExpr(b) = c {
                            if b.op == datafusion::logical_expr::Operator::Eq {
                                pairs.push((b.left.as_ref(), b.right.as_ref()))
                            }
                        }
                    }
                }
                let on_unit = pairs.iter().any(|(l, r)| {
                    join_operand_is_unit(j, l, &sought) && join_operand_is_unit(j, r, &sought)
                });
                if both && !on_unit {
                    return Err(fail(refuse(
                        format!("datasets under an aggregation threshold may be joined only on {}", threshold.unit),
                        &rule,
                    )));
                }
                Ok(Transformed::no(node))
            }
            LogicalPlan::Aggregate(agg) => {
                if agg.group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
                    return Err(fail(refuse(
                        "GROUPING SETS, ROLLUP and CUBE over data under an aggregation threshold are refused".into(),
                        &rule,
                    )));
                }
                for e in &agg.aggr_expr {
                    let e = e.clone().unalias_nested().data;
                    let name = match &e {
                        Expr::AggregateFunction(f) => f.func.name().to_ascii_lowercase(),
                        other => other.schema_name().to_string(),
                    };
                    if !SAFE_AGGREGATES.contains(&name.as_str()) {
                        return Err(fail(refuse(
                            format!(
                                "aggregate {name} is refused over data under an aggregation threshold; allowed: count, sum, avg, stddev, variance"
                            ),
                            &rule,
                        )));
                    }
                    if let Expr::AggregateFunction(f) = &e {
                        if f.params.filter.is_some() || !f.params.args.iter().all(|a| plain_argument(&agg.input, a, true)) {
                            return Err(fail(refuse(
                                format!(
                                    "aggregate {name} over data under an aggregation threshold must take columns of the data as they are (a FILTER clause, CASE or other expression could single out one patient within a group); put conditions in WHERE or GROUP BY"
                                ),
                                &rule,
                            )));
                        }
                        if !f.params.args.iter().all(|a| plain_argument(&agg.input, a, false)) {
                            return Err(fail(refuse(
                                format!(
                                    "aggregate {name} over data under an aggregation threshold may not take a column from the optional side of an outer join (it holds values only for the patients that matched, which the threshold does not count); use an inner join"
                                ),
                                &rule,
                            )));
                        }
                    }
                }
                let input = agg.input.schema();
                let units: Vec<Column> = (0..input.fields().len())
                    .filter(|i| is_unit(&agg.input, *i, &sought))
                    .map(|i| Column::from(input.qualified_field(i)))
                    .collect();
                // Joins of protected data are on the unit, so every unit column of a group holds
                // the same subjects (or nulls, which count for nothing): count the one the caller
                // already counts distinct, and the optimizer computes that count once.
                let counted_by_caller = |c: &Column| {
                    agg.aggr_expr.iter().any(|e| {
                        matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(f)
                            if f.func.name() == "count" && f.params.distinct && f.params.filter.is_none()
                                && matches!(f.params.args.as_slice(), [Expr::Column(x)] if x == c))
                    })
                };
                let unit = units
                    .iter()
                    .find(|c| counted_by_caller(c))
                    .or(units.first())
                    .cloned()
                    .ok_or_else(|| {
                        fail(refuse(
                            format!("the privacy unit {} must reach every aggregate over protected data", threshold.unit),
                            &rule,
                        ))
                    })?;
                // The caller's own `count(DISTINCT unit)`, as it stands in the aggregate, is the
                // threshold's count: no second copy (whose alias would also stop DataFusion from
                // planning a lone distinct count as a two-level GROUP BY, as it does unguarded).
                let units_count = datafusion::functions_aggregate::expr_fn::count_distinct(Expr::Column(unit));
                let (counted, units) = match agg.aggr_expr.iter().position(|e| *e == units_count) {
                    Some(i) => {
                        let field = agg.schema.qualified_field(agg.group_expr.len() + i);
                        (LogicalPlan::Aggregate(agg.clone()), Expr::Column(Column::from(field)))
                    }
                    None => {
                        let mut aggr = agg.aggr_expr.clone();
                        aggr.push(units_count.alias("__lg_units"));
                        let counted = Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr)?;
                        (LogicalPlan::Aggregate(counted), col("__lg_units"))
                    }
                };
                let output: Vec<Expr> = agg.schema.columns().into_iter().map(Expr::Column).collect();
                // Without GROUP BY, DataFusion takes an aggregate to answer exactly one row, and
                // `count(*)` to be non-null: a suppressed one answers none, which a scalar
                // subquery reads as NULL. Its columns are declared nullable (`nullif(x, NULL)` is
                // `x`), or that NULL fails the batch's schema check.
                let shown: Vec<Expr> = if agg.group_expr.is_empty() {
                    agg.schema
                        .columns()
                        .into_iter()
                        .map(|c| {
                            datafusion::functions::core::expr_fn::nullif(
                                Expr::Column(c.clone()),
                                datafusion::prelude::lit(datafusion::common::ScalarValue::Null),
                            )
                            .alias_qualified(c.relation, c.name)
                        })
                        .collect()
                } else {
                    output.clone()
                };
                // Groups with fewer than k distinct units are suppressed, not rounded: nothing about them leaves.
                let released = LogicalPlanBuilder::from(counted)
                    .filter(ThresholdCheck::expr(Arc::clone(suppressed), units, i64::from(threshold.k)))?
                    .project(shown)?;
                // Released groups leave sorted by their own values, not in the order DataFusion
                // met them in the files (which says where one patient's rows lie): a LIMIT picks
                // among sorted groups. A sort the optimizer removes (under the caller's own
                // ORDER BY, a join) is backed by `order_released_groups` on the physical plan.
                let released = if agg.group_expr.is_empty() {
                    released
                } else {
                    released.sort(output.into_iter().map(|e| e.sort(true, true)))?
                };
                let released = released.build()?;
                Ok(Transformed::yes(released))
            }
            _ => Ok(Transformed::no(node)),
        }
    });
    // A node keeps the schema it was built with when a subquery in its expressions changes
    // (a suppressed aggregate's columns become nullable): derive every schema again.
    let rewritten = rewritten.and_then(|t| {
        if t.transformed && subqueries.get() {
            t.data
                .transform_up_with_subqueries(|n| n.recompute_schema().map(Transformed::yes))
        } else {
            Ok(t)
        }
    });
    match rewritten {
        Ok(t) => Ok(t.data),
        Err(datafusion::error::DataFusionError::External(e)) => match e.downcast::<EngineError>() {
            Ok(engine) => Err(*engine),
            Err(other) => Err(EngineError::Internal(other.to_string())),
        },
        Err(e) => Err(e.into()),
    }
}

/// The optimized plan that runs: DataFusion's optimizer, then pseudonyms that are only counted
/// read raw (`counted.rs`).
fn optimize(
    state: &datafusion::execution::SessionState,
    plan: &LogicalPlan,
) -> Result<LogicalPlan> {
    let optimized = state.optimize(plan)?;
    crate::total::check(&optimized)?;
    Ok(crate::counted::read_counted_pseudonyms_raw(optimized)?)
}

/// Optimize to a physical plan and verify it; nothing is read yet.
async fn physical_plan(
    planning: &Planning,
    plan: LogicalPlan,
) -> Result<(
    Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    Arc<datafusion::execution::TaskContext>,
)> {
    let state = planning.state.as_ref();
    let optimized = optimize(state, &plan)?;
    let physical = state
        .query_planner()
        .create_physical_plan(&optimized, state)
        .await?;
    let physical = keep_output_order(order_released_groups(physical)?)?;
    verify_physical(&physical).map_err(|why| {
        tracing::error!(%why, "plan verification refused a query");
        EngineError::PermissionDenied(format!(
            "the query plan failed verification: {why} (rule: plan-verifier)"
        ))
    })?;
    Ok((physical, Arc::clone(&planning.task)))
}

impl PlannedQuery {
    /// The verified physical plan, as [`PlannedQuery::execute`] would run it (for benchmarks
    /// and tests of planning cost).
    pub async fn verified_physical_plan(
        &self,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        Ok(physical_plan(&self.planning, self.plan.clone()).await?.0)
    }
}

fn explain_refused() -> EngineError {
    EngineError::PermissionDenied(
        "EXPLAIN is refused (rule: explain-admin-only): plans reveal policy and storage internals"
            .into(),
    )
}

impl Session {
    /// EXPLAIN [ANALYZE] for a caller allowed to see plans: the query is planned and governed
    /// exactly as it would run for this caller, and the answer is its governed logical plan and
    /// verified physical plan (with ANALYZE: executed, with each operator's metrics) as rows
    /// `(plan_type, plan)`. The result is a VALUES plan, so it flows through the same paths
    /// (verification, audit) as any query, carrying the explained query's access report.
    async fn explain(&self, inner: DFStatement, analyze: bool) -> Result<PlannedQuery> {
        let query = match inner {
            DFStatement::Statement(mut s) if matches!(*s, SqlStatement::Query(_)) => {
                number_question_marks(&mut s);
                DFStatement::Statement(s)
            }
            _ => {
                return Err(EngineError::InvalidQuery(
                    "only a query can be explained".into(),
                ))
            }
        };
        let planned = self.plan_statement(query).await?;
        let logical = optimize(&self.planning.state, &planned.plan)?
            .display_indent()
            .to_string();
        let (physical, _) = physical_plan(&self.planning, planned.plan.clone()).await?;
        if analyze {
            // The text is known only after the run: plan the result's shape now with an empty
            // placeholder, run at execution (see `PlannedQuery::execute_with_report`).
            let plan = explain_rows(&logical, "physical_plan_with_metrics", String::new())?;
            return Ok(PlannedQuery {
                planning: self.planning.clone(),
                schema: Arc::new(plan.schema().as_arrow().clone()),
                plan,
                parameters: Arc::new(Schema::empty()),
                report: planned.report,
                analyze: Some(AnalyzeLater { logical, physical }),
            });
        }
        let text =
            datafusion::physical_plan::display::DisplayableExecutionPlan::new(physical.as_ref())
                .indent(true)
                .to_string();
        let plan = explain_rows(&logical, "physical_plan", text)?;
        Ok(PlannedQuery {
            planning: self.planning.clone(),
            schema: Arc::new(plan.schema().as_arrow().clone()),
            plan,
            parameters: Arc::new(Schema::empty()),
            report: planned.report,
            analyze: None,
        })
    }
}

/// EXPLAIN's result, `(plan_type, plan)`: the logical plan's row and the physical plan's.
/// Constant rows from one-row projections (what `SELECT 'a', 'b'` plans to): the verifier
/// admits no in-memory data source outside a dataset's policy.
fn explain_rows(logical: &str, physical_type: &str, physical: String) -> Result<LogicalPlan> {
    let row = |plan_type: &str, text: String| {
        LogicalPlanBuilder::empty(true).project(vec![
            lit(plan_type.to_string()).alias("plan_type"),
            lit(text).alias("plan"),
        ])
    };
    Ok(row("logical_plan", logical.to_string())?
        .union(row(physical_type, physical)?.build()?)?
        .build()?)
}

/// ADBC and JDBC clients write `?`; DataFusion plans `$1, $2, ...`. Number them in order.
fn number_question_marks(statement: &mut SqlStatement) {
    let mut n = 0;
    let _ = sqlparser::ast::visit_expressions_mut(statement, |e| {
        if let SqlExpr::Value(v) = e {
            if matches!(&v.value, SqlValue::Placeholder(p) if p == "?") {
                n += 1;
                v.value = SqlValue::Placeholder(format!("${n}"));
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

fn parameter_schema(plan: &LogicalPlan) -> Result<SchemaRef> {
    let mut params: Vec<(usize, String, Option<DataType>)> = plan
        .get_parameter_types()?
        .into_iter()
        .map(|(name, t)| {
            let pos = name
                .trim_start_matches('$')
                .parse::<usize>()
                .unwrap_or(usize::MAX);
            (pos, name, t)
        })
        .collect();
    params.sort();
    Ok(Arc::new(Schema::new(
        params
            .into_iter()
            .map(|(_, name, t)| Field::new(name, t.unwrap_or(DataType::Null), true))
            .collect::<Vec<_>>(),
    )))
}

impl PlannedQuery {
    /// The schema of the result.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The query's parameters (`$1`, `$2`, ...) and their inferred types.
    pub fn parameters(&self) -> SchemaRef {
        Arc::clone(&self.parameters)
    }

    /// What the query touches and the rules that govern it.
    pub fn report(&self) -> &AccessReport {
        &self.report
    }

    /// Start executing; batches arrive as the scan proceeds, nothing is collected first.
    pub async fn execute(
        self,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<SendableRecordBatchStream> {
        Ok(self.execute_with_report(params).await?.0)
    }

    /// [`PlannedQuery::execute`], also returning the access report completed with the columns
    /// the verified plan reads.
    pub async fn execute_with_report(
        self,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<(SendableRecordBatchStream, AccessReport)> {
        let expected = self.parameters.fields().len();
        let given = params.as_ref().map_or(0, Vec::len);
        if expected != given {
            return Err(EngineError::InvalidQuery(format!(
                "the query has {expected} parameter(s) but {given} value(s) were bound"
            )));
        }
        let mut report = self.report;
        if let Some(later) = self.analyze {
            report.columns = touched_columns(&later.physical);
            return Ok((later.run(self.planning, self.schema), report));
        }
        let plan = match params {
            Some(values) if !values.is_empty() => {
                // Clients bind whatever type their language has (Python ints are Int64); cast
                // to the type the planner inferred for each placeholder.
                let values = values
                    .into_iter()
                    .zip(self.parameters.fields())
                    .map(|(v, f)| match f.data_type() {
                        DataType::Null => Ok(v),
                        t if v.data_type() == *t => Ok(v),
                        t => v.cast_to(t).map_err(|_| {
                            EngineError::InvalidQuery(format!(
                                "parameter {} must be of type {t}",
                                f.name()
                            ))
                        }),
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.plan.with_param_values(ParamValues::from(values))?
            }
            _ => self.plan,
        };
        let (physical, task) = physical_plan(&self.planning, plan).await?;
        report.columns = touched_columns(&physical);
        let stream = datafusion::physical_plan::execute_stream(physical, task)?;
        let stream = if report.thresholded {
            failures_as_suppressed(stream, Arc::clone(&report.failure_withheld))
        } else {
            stream
        };
        Ok((as_announced(stream, self.schema), report))
    }
}

/// A thresholded query's result, answered as an empty one (every group suppressed) if the
/// query fails while it runs. A failure is an answer too: an expression that fails on one
/// hidden row, or an aggregate that overflows, would tell whether a row nobody counts exists.
/// Planning refuses what it can see could fail (`crate::total`); this catches the rest. The
/// released groups are gathered before the first leaves (they are few: each holds at least k
/// patients), so a failure after some were computed answers exactly as one before any was.
/// Failures of the lake itself (a file unreadable or off the catalog's schema) and of limits
/// (memory, time) still answer as errors: they do not depend on what the caller's expressions
/// meet in the rows. The kind of what was withheld goes to the access report for the audit trail.
fn failures_as_suppressed(
    stream: SendableRecordBatchStream,
    withheld: Arc<std::sync::OnceLock<String>>,
) -> SendableRecordBatchStream {
    use futures::StreamExt;
    let schema = stream.schema();
    let gathered = async move {
        let mut stream = stream;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            match batch {
                Ok(b) => batches.push(Ok(b)),
                Err(e) => {
                    let kind = match crate::error::classify(&e) {
                        EngineError::Unreadable { .. }
                        | EngineError::OffContract { .. }
                        | EngineError::ResourceExhausted(_)
                        | EngineError::Catalog(_) => {
                            return vec![Err(e)];
                        }
                        EngineError::Rejected(detail) => {
                            tracing::info!(%detail, "a failure under an aggregation threshold answered as an empty result");
                            "a function or operator refused one of its inputs"
                        }
                        other => {
                            tracing::info!(error = %other, "a failure under an aggregation threshold answered as an empty result");
                            "the query failed while it ran"
                        }
                    };
                    let _ = withheld.set(kind.to_string());
                    return Vec::new();
                }
            }
        }
        batches
    };
    Box::pin(
        datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(gathered).flat_map(futures::stream::iter),
        ),
    )
}

/// `stream` with the schema that planning announced (GetFlightInfo's), where the executed plan's
/// differs only in nullability or metadata: the optimizer folds constants (`length('abc')`
/// becomes a non-null 3), and clients that compare the two (the ADBC Flight SQL driver) refused
/// the result as inconsistent. Batches are rebuilt under the announced schema, which checks
/// that a column announced non-null holds no null.
fn as_announced(
    stream: SendableRecordBatchStream,
    announced: SchemaRef,
) -> SendableRecordBatchStream {
    use futures::StreamExt;
    let actual = stream.schema();
    let same_types = actual.fields().len() == announced.fields().len()
        && actual
            .fields()
            .iter()
            .zip(announced.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
    if actual == announced || !same_types {
        return stream;
    }
    let schema = Arc::clone(&announced);
    Box::pin(
        datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            announced,
            stream.map(move |batch| {
                let batch = batch?;
                Ok(RecordBatch::try_new_with_options(
                    Arc::clone(&schema),
                    batch.columns().to_vec(),
                    &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
                )?)
            }),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::error::DataFusionError;
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use futures::TryStreamExt;

    fn stream_of(
        items: Vec<datafusion::common::Result<RecordBatch>>,
    ) -> (SendableRecordBatchStream, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![12, 40]))],
        )
        .unwrap();
        let items: Vec<_> = items
            .into_iter()
            .map(|i| i.map(|_| batch.clone()))
            .collect();
        (
            Box::pin(RecordBatchStreamAdapter::new(
                schema,
                futures::stream::iter(items),
            )),
            batch,
        )
    }

    fn ok() -> datafusion::common::Result<RecordBatch> {
        Ok(RecordBatch::new_empty(Arc::new(Schema::empty())))
    }

    #[tokio::test]
    async fn a_failure_under_a_threshold_answers_as_an_empty_result() {
        // Groups computed before the failure do not leave either: the answer is the same
        // whether the failing row was met first or last.
        for failure in [
            DataFusionError::Execution("Date part 'foo' not supported".into()),
            DataFusionError::ArrowError(
                Box::new(datafusion::arrow::error::ArrowError::ComputeError(
                    "Overflow happened on: 123 + 456".into(),
                )),
                None,
            ),
        ] {
            let withheld = Arc::new(std::sync::OnceLock::new());
            let (s, _) = stream_of(vec![ok(), ok(), Err(failure)]);
            let out: Vec<RecordBatch> = failures_as_suppressed(s, Arc::clone(&withheld))
                .try_collect()
                .await
                .expect("no error leaves");
            assert!(out.is_empty());
            let kind = withheld.get().expect("recorded for the audit trail");
            assert!(!kind.contains("foo") && !kind.contains("123"), "{kind}");
        }
        // A query that does not fail leaves whole.
        let withheld = Arc::new(std::sync::OnceLock::new());
        let (s, batch) = stream_of(vec![ok(), ok()]);
        let out: Vec<RecordBatch> = failures_as_suppressed(s, Arc::clone(&withheld))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, vec![batch.clone(), batch]);
        assert!(withheld.get().is_none());
    }

    #[tokio::test]
    async fn failures_of_the_lake_and_of_limits_still_answer_as_errors() {
        for failure in [
            DataFusionError::ResourcesExhausted("memory pool".into()),
            DataFusionError::IoError(std::io::Error::other("disk")),
        ] {
            let withheld = Arc::new(std::sync::OnceLock::new());
            let (s, _) = stream_of(vec![ok(), Err(failure)]);
            let out: datafusion::common::Result<Vec<RecordBatch>> =
                failures_as_suppressed(s, Arc::clone(&withheld))
                    .try_collect()
                    .await;
            assert!(out.is_err());
            assert!(withheld.get().is_none());
        }
    }
}
