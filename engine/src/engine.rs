//! The engine and its configuration: what every request shares (the catalog in force and one
//! table per dataset, the policy, keys, memory pool, caches of callers' views and subject
//! sets), and the per-request [`Session`] built from a caller's decisions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    SchemaProvider, TableProvider,
};
use datafusion::common::Column;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::cache::cache_manager::{CacheManager, CacheManagerConfig};
use datafusion::execution::disk_manager::DiskManagerBuilder;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{lit, Expr};
use datafusion::prelude::{SessionConfig, SessionContext};
use lakegate_catalogs::{Catalog, Dataset, FileFormat, Lake};
use lakegate_policies::{
    Action, Decision, FilterValue, Obligations, PolicySet, Principal, RequestContext, RowFilter,
    SubjectSet,
};
use tokio::sync::Mutex as AsyncMutex;

use crate::governed::GovernedTable;
use crate::keys::KeyRing;
use crate::masks::mask_expr;
use crate::session::{Planning, Session};
use crate::subjects::InSubjectSet;

use crate::{EngineError, Result};

/// The one catalog name clients see.
pub const CATALOG_NAME: &str = "lakegate";
/// The object store URL the lake is registered under: internal, never a user-visible path.
pub(crate) const LAKE_URL: &str = "lakegate://lake/";

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
    /// The lake as opened (with its keyring, for datasets encrypted at rest).
    lake_handle: Lake,
    /// Approved releases, read by the project's principals.
    releases: Arc<crate::releases::Shelf>,
    /// The data keys of encrypted datasets, which the runtime's Parquet reader asks for.
    lake_keys: Arc<crate::encrypted::LakeKeys>,
    /// The lake's store, for the file listings that tell when a subject set is stale.
    store: Arc<dyn object_store::ObjectStore>,
    /// Privacy budgets, kept in the lake so that every server and restart sees them.
    ledger: Arc<crate::privacy_budget::Ledger>,
    /// The template with no cached file listings, for policy-internal reads (subject sets)
    /// that must see the lake as it is now.
    uncached: SessionState,
    /// Subject sets (e.g. consenting patients) per filter, with the files they were read from:
    /// computed again when those files change (a consent withdrawn), never served stale.
    subject_sets: AsyncMutex<HashMap<String, KnownSet>>,
    /// From pseudonyms back to raw keys, for lookups by pseudonym.
    pseudonym_indexes: Arc<crate::lookup::PseudonymIndexes>,
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
    fn new(
        catalog: Catalog,
        runtime: &RuntimeEnv,
        keys: &Arc<crate::encrypted::LakeKeys>,
    ) -> Result<Self> {
        let mut tables = HashMap::new();
        for d in &catalog.datasets {
            tables.insert(d.name.clone(), listing_table(d, runtime, keys)?);
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
    members: Arc<crate::subjects::Members>,
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
        let lake_keys = Arc::new(crate::encrypted::LakeKeys::default());
        lake_keys.refresh(&lake, &catalog).await;
        runtime.register_parquet_encryption_factory(
            crate::encrypted::FACTORY_ID,
            Arc::clone(&lake_keys) as _,
        );

        let lake_tables = LakeTables::new(catalog, &runtime, &lake_keys)?;

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
            .with_query_planner(Arc::new(crate::private::LakegateQueryPlanner))
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
                ledger: Arc::new(crate::privacy_budget::Ledger::new(lake.store())),
                store: lake.store(),
                lake_handle: lake.clone(),
                releases: Arc::new(crate::releases::Shelf::new(
                    lake.clone(),
                    Arc::clone(&lake_keys),
                    uncached.clone(),
                )),
                lake_keys,
                pseudonym_indexes: Arc::new(crate::lookup::PseudonymIndexes::new(
                    lake.store(),
                    uncached.clone(),
                )),
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

    /// The lake as opened, with its keyring.
    pub fn lake(&self) -> &Lake {
        &self.inner.lake_handle
    }

    /// The projects' pseudonym and date-shift keys.
    pub fn keys(&self) -> &KeyRing {
        &self.inner.keys
    }

    /// The public key that signs release manifests and approvals (the audit key's). Until it
    /// is set, every release read is refused.
    pub fn trust_release_signer(&self, key: crate::audit::VerifyingKey) {
        self.inner.releases.trust(key);
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
        self.inner
            .lake_keys
            .refresh(&self.inner.lake_handle, &catalog)
            .await;
        let lake = Arc::new(LakeTables::new(
            catalog,
            self.inner.template.state.runtime_env(),
            &self.inner.lake_keys,
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
        let mut grants: Vec<(String, lakegate_policies::DifferentialPrivacy)> = Vec::new();
        for (_, decision) in view.decisions.values() {
            if let Decision::Allow { rule, obligations } = decision {
                if let Some(dp) = &obligations.differential_privacy {
                    if !grants.iter().any(|(r, _)| r == rule) {
                        grants.push((rule.clone(), dp.clone()));
                    }
                }
            }
        }
        grants.sort_by(|a, b| a.0.cmp(&b.0));
        let system = crate::system::SystemSchema::new(
            Arc::clone(&self.inner.ledger),
            principal.name.clone(),
            grants,
        );
        catalogs.register_catalog(
            CATALOG_NAME.to_string(),
            Arc::new(crate::system::WithSystem {
                view: Arc::clone(&view.catalog) as Arc<dyn CatalogProvider>,
                system: Arc::new(system),
            }) as Arc<dyn CatalogProvider>,
        );
        catalogs.register_catalog(
            crate::releases::CATALOG.to_string(),
            Arc::new(crate::releases::ReleasesCatalog {
                shelf: Arc::clone(&self.inner.releases),
                project: principal.attributes.get("project").cloned(),
            }),
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
            principal: principal.name.clone(),
            ledger: Arc::clone(&self.inner.ledger),
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
        let mut schemas: BTreeMap<String, Arc<crate::versions::VersionedSchema>> = BTreeMap::new();
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
        )
        .with_lookups(Arc::clone(&self.inner.pseudonym_indexes), d.clone()))
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
    ) -> Result<Arc<crate::subjects::Members>> {
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
            let strings = crate::strings::Strings::of(b.column(0)).map_err(|_| {
                EngineError::Internal(format!(
                    "subject key {}.{} is not utf8",
                    spec.dataset, spec.key
                ))
            })?;
            keys.extend((0..strings.len()).filter_map(|i| strings.get(i).map(str::as_bytes)));
        }
        let set = Arc::new(crate::subjects::Members::new(keys));
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

fn listing_table(
    d: &Dataset,
    runtime: &RuntimeEnv,
    keys: &Arc<crate::encrypted::LakeKeys>,
) -> Result<Arc<dyn TableProvider>> {
    let url = ListingTableUrl::parse(format!("{LAKE_URL}{}", d.location))?;
    let keys = d.encrypted.then(|| Arc::clone(keys));
    let parquet = || -> Arc<ParquetFormat> {
        Arc::new(if d.encrypted {
            ParquetFormat::default().with_options(crate::encrypted::scan_options(&d.name))
        } else {
            ParquetFormat::default()
        })
    };
    let format: Arc<dyn datafusion::datasource::file_format::FileFormat> = match d.format {
        FileFormat::Parquet | FileFormat::Delta => {
            Arc::new(crate::contract::ContractFormat::new(parquet(), d, keys))
        }
        FileFormat::Ndjson => Arc::new(crate::contract::ContractFormat::new(
            Arc::new(JsonFormat::default()),
            d,
            None,
        )),
    };
    let options = ListingOptions::new(format).with_file_extension(d.format.extension());
    // Parquet strings are read as views: no copy out of the pages for rows a filter drops, and
    // short values (ids, codes) compare and hash inline. Results leave as `Utf8` (see
    // `without_views`).
    let schema = match d.format {
        FileFormat::Parquet | FileFormat::Delta => with_views(&d.schema()),
        FileFormat::Ndjson => d.schema(),
    };
    if d.format == FileFormat::Delta {
        let lake = datafusion::execution::object_store::ObjectStoreUrl::parse(LAKE_URL)?;
        return Ok(Arc::new(crate::versions::DeltaVersionTable::new(
            d.clone(),
            runtime.object_store(&lake)?,
            LAKE_URL,
            options,
            schema,
            runtime.cache_manager.get_file_statistic_cache(),
        )));
    }
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
