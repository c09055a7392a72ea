//! Per-request sessions: the caller's catalog view, restricted SQL planning, execution.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemoryCatalogProviderList, MemorySchemaProvider,
    SchemaProvider, TableProvider,
};
use datafusion::common::ParamValues;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::DiskManagerBuilder;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::Statement as DFStatement;
use lakegate_catalogs::{Catalog, Dataset, Lake};
use lakegate_policies::{GrantPolicy, Principal};
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
        }
    }
}

struct Inner {
    catalog: Catalog,
    tables: HashMap<String, Arc<dyn TableProvider>>,
    template: SessionState,
    grants: GrantPolicy,
    config: EngineConfig,
}

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
    pub async fn open(lake: Lake, grants: GrantPolicy, config: EngineConfig) -> Result<Self> {
        let catalog = Catalog::load(&lake).await?;
        catalog.verify(&lake).await?;

        let runtime: Arc<RuntimeEnv> = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_limit)))
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_max_temp_directory_size(config.max_spill_bytes),
            )
            .build_arc()?;
        let lake_url = url::Url::parse(LAKE_URL).expect("static URL");
        runtime.register_object_store(&lake_url, lake.store());

        let mut tables = HashMap::new();
        for d in &catalog.datasets {
            tables.insert(d.name.clone(), listing_table(d)?);
        }

        let session_config = SessionConfig::new()
            .with_information_schema(false)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(CATALOG_NAME, "clinical")
            .with_batch_size(config.batch_size)
            .with_target_partitions(config.target_partitions);
        let template = SessionStateBuilder::new()
            .with_config(session_config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();

        Ok(Self {
            inner: Arc::new(Inner {
                catalog,
                tables,
                template,
                grants,
                config,
            }),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The datasets `principal` may query, in catalog order. Everything else is invisible to
    /// them: absent from metadata and "not found" in SQL.
    pub fn visible_datasets(&self, principal: &Principal) -> Vec<&Dataset> {
        self.inner
            .catalog
            .datasets
            .iter()
            .filter(|d| self.inner.grants.decide(principal, &d.name).is_allowed())
            .collect()
    }

    /// A fresh session for one request, holding only the caller's visible datasets.
    pub fn session(&self, principal: &Principal) -> Result<Session> {
        let state = SessionStateBuilder::new_from_existing(self.inner.template.clone())
            .with_catalog_list(Arc::new(MemoryCatalogProviderList::new()))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let catalog = MemoryCatalogProvider::new();
        let mut schemas: BTreeMap<String, Arc<MemorySchemaProvider>> = BTreeMap::new();
        for d in self.visible_datasets(principal) {
            let q = d.qualified();
            let schema = schemas.entry(q.schema.clone()).or_default();
            let table = Arc::clone(&self.inner.tables[&d.name]);
            schema.register_table(q.table, table)?;
        }
        for (name, schema) in schemas {
            catalog.register_schema(&name, schema)?;
        }
        ctx.register_catalog(CATALOG_NAME, Arc::new(catalog));
        Ok(Session {
            ctx,
            max_sql_bytes: self.inner.config.max_sql_bytes,
        })
    }
}

fn listing_table(d: &Dataset) -> Result<Arc<dyn TableProvider>> {
    let url = ListingTableUrl::parse(format!("{LAKE_URL}{}", d.location))?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(d.schema());
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// One request's view of the lake.
pub struct Session {
    ctx: SessionContext,
    max_sql_bytes: usize,
}

/// A planned (not yet executed) query: its result schema and parameters are known, nothing
/// has been read.
pub struct PlannedQuery {
    ctx: SessionContext,
    plan: LogicalPlan,
    schema: SchemaRef,
    parameters: SchemaRef,
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
        let state = self.ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let mut statement = state.sql_to_statement(sql, &dialect)?;
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
        let plan = state.statement_to_plan(statement).await?;
        // Defence in depth: a query that plans into DDL or DML (SELECT ... INTO) is refused too.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|_| EngineError::InvalidQuery("only read-only queries are accepted".into()))?;

        let schema = Arc::new(plan.schema().as_arrow().clone());
        let parameters = parameter_schema(&plan)?;
        Ok(PlannedQuery {
            ctx: self.ctx.clone(),
            plan,
            schema,
            parameters,
        })
    }
}

fn explain_refused() -> EngineError {
    EngineError::PermissionDenied(
        "EXPLAIN is refused (rule: explain-admin-only): plans reveal storage internals".into(),
    )
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

    /// Start executing; batches arrive as the scan proceeds, nothing is collected first.
    pub async fn execute(
        self,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<SendableRecordBatchStream> {
        let expected = self.parameters.fields().len();
        let given = params.as_ref().map_or(0, Vec::len);
        if expected != given {
            return Err(EngineError::InvalidQuery(format!(
                "the query has {expected} parameter(s) but {given} value(s) were bound"
            )));
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
        let df = self.ctx.execute_logical_plan(plan).await?;
        Ok(df.execute_stream().await?)
    }
}
