//! One caller's queries: restricted SQL planning (queries only, EXPLAIN for explain roles), the
//! governed rewrite's entry point, the verified physical plan, and execution with the access
//! report the audit trail records.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::common::Column;
use datafusion::common::ParamValues;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::session_state::SessionState;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::logical_expr::{cast, lit, Expr, LogicalPlanBuilder};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::Statement as DFStatement;
use lakegate_policies::{Action, Decision, Threshold};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::released::order_released_groups;
use crate::thresholds::{apply_thresholds, collect_scans, describe_rule};
use crate::verify::{touched_columns, verify_physical};
use sqlparser::ast::{Expr as SqlExpr, Statement as SqlStatement, Value as SqlValue};

use crate::{EngineError, Result};

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
pub(crate) struct Planning {
    /// The state queries are planned in: the caller's catalog view and nothing else.
    pub(crate) state: Arc<SessionState>,
    /// What execution reads: configuration, functions, runtime. None of it depends on the
    /// caller (their view is in the catalog, which planning has already resolved), so one is
    /// built per template state and shared by every session cloned from it.
    pub(crate) task: Arc<datafusion::execution::TaskContext>,
}

impl Planning {
    pub(crate) fn new(state: SessionState) -> Self {
        let task = Arc::new(datafusion::execution::TaskContext::from(&state));
        Self {
            state: Arc::new(state),
            task,
        }
    }
}

/// One request's view of the lake.
pub struct Session {
    pub(crate) planning: Planning,
    /// Whether the caller's role is one of the engine's `explain_roles`.
    pub(crate) may_explain: bool,
    pub(crate) max_sql_bytes: usize,
    /// Dataset -> (row-query decision, aggregate-query decision), for visible datasets.
    pub(crate) decisions: HashMap<String, (Decision, Decision)>,
    pub(crate) policy_version: String,
    /// The caller, whose privacy budget a differentially private query is charged to.
    pub(crate) principal: String,
    pub(crate) ledger: Arc<crate::privacy_budget::Ledger>,
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
    pub(crate) plan: LogicalPlan,
    schema: SchemaRef,
    parameters: SchemaRef,
    report: AccessReport,
    /// Whose privacy budget a noisy release is charged to, and where.
    principal: String,
    ledger: Arc<crate::privacy_budget::Ledger>,
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
    /// Under differential privacy: what each run of the query costs, charged before any result
    /// leaves.
    pub private: Option<crate::private::PrivateCharge>,
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
            principal: self.principal.clone(),
            ledger: Arc::clone(&self.ledger),
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
        let mut private: HashMap<String, (lakegate_policies::DifferentialPrivacy, String)> =
            HashMap::new();
        let mut report = AccessReport {
            datasets: actions.keys().cloned().collect(),
            ..Default::default()
        };
        let released = crate::releases::released_scans(&plan);
        for (table, approver) in &released {
            report.datasets.push(table.clone());
            report.rules.push(format!(
                "{table}: read of a release approved by {approver} (rule: release-readers)"
            ));
        }
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
                    if let Some(dp) = &obligations.differential_privacy {
                        private.insert(dataset.clone(), (dp.clone(), rule.clone()));
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
        if !private.is_empty() {
            if let Some(other) = actions
                .keys()
                .find(|d| !private.contains_key(*d))
                .or(released.first().map(|(t, _)| t))
            {
                let rule = private
                    .values()
                    .next()
                    .map(|(_, r)| r.as_str())
                    .unwrap_or("");
                return Err(EngineError::PermissionDenied(format!(
                    "{other} is not under differential privacy and may not be read in the same query as datasets that are (rule: {rule})"
                )));
            }
            let (plan, charge) =
                crate::private::apply_differential_privacy(&self.planning.state, plan, &private)?;
            report.private = Some(charge);
            return Ok((plan, report));
        }
        if thresholds.is_empty() {
            return Ok((plan, report));
        }
        report.thresholded = true;
        let plan = apply_thresholds(plan, &thresholds, &report.suppressed)?;
        Ok((plan, report))
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
        let mut planned = planned;
        if let Some(charge) = planned.report.private.take() {
            // Its metrics count exact rows and groups: no noise protects them.
            if analyze {
                return Err(EngineError::PermissionDenied(format!(
                    "EXPLAIN ANALYZE of a differentially private query is refused (rule: {})",
                    charge.rule
                )));
            }
        }
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
                principal: self.principal.clone(),
                ledger: Arc::clone(&self.ledger),
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
            principal: self.principal.clone(),
            ledger: Arc::clone(&self.ledger),
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
        if let Some(charge) = &report.private {
            let standing = charge_budget(&self.ledger, &self.principal, charge).await?;
            let delta = if charge.delta > 0.0 {
                format!(" and delta {:e}", charge.delta)
            } else {
                String::new()
            };
            report.rules.push(format!(
                "privacy budget: epsilon {}{delta} charged on rule {}; {} of epsilon {} remains until {}",
                charge.epsilon,
                charge.rule,
                standing.remaining_epsilon,
                charge.grant.epsilon,
                standing.refreshes_at.to_rfc3339(),
            ));
        }
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
        // Under differential privacy too: a failure that escapes the plan-time checks must not
        // answer as an error either.
        let stream = if report.thresholded || report.private.is_some() {
            failures_as_suppressed(stream, Arc::clone(&report.failure_withheld))
        } else {
            stream
        };
        Ok((as_announced(stream, self.schema), report))
    }
}

/// The budget a grant gives, as the ledger reads it.
pub(crate) fn budget_of(
    grant: &lakegate_policies::DifferentialPrivacy,
) -> crate::privacy_budget::Budget {
    crate::privacy_budget::Budget {
        epsilon: grant.epsilon,
        delta: grant.delta,
        window: std::time::Duration::from_secs(grant.window_seconds),
    }
}

/// Charges one run of a private query to `principal`, or refuses it: over budget (naming what
/// remains and when it refreshes), or the ledger unreachable (fail closed, nothing served).
async fn charge_budget(
    ledger: &crate::privacy_budget::Ledger,
    principal: &str,
    charge: &crate::private::PrivateCharge,
) -> Result<crate::privacy_budget::Standing> {
    use crate::privacy_budget::{BudgetError, Cost};
    let cost = Cost {
        epsilon: charge.epsilon,
        delta: charge.delta,
    };
    let reason = format!("{} noisy aggregate(s)", charge.releases);
    match ledger
        .charge_at(
            principal,
            &charge.rule,
            &budget_of(&charge.grant),
            cost,
            &reason,
            chrono::Utc::now(),
        )
        .await
    {
        Ok(standing) => Ok(standing),
        Err(e @ (BudgetError::Exceeded { .. } | BudgetError::DeltaExceeded { .. })) => Err(
            EngineError::PermissionDenied(format!("{e} (rule: {})", charge.rule)),
        ),
        Err(BudgetError::Unavailable(detail)) => {
            tracing::error!(%detail, "privacy budget ledger unavailable: refusing");
            Err(EngineError::Unavailable(format!(
                "the privacy budget cannot be charged right now, so the query is refused (rule: {}; privacy-budget-fail-closed)",
                charge.rule
            )))
        }
        Err(e @ BudgetError::Invalid(_)) => Err(EngineError::Internal(e.to_string())),
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
                        | EngineError::Undecryptable { .. }
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
