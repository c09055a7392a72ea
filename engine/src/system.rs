//! The `lakegate` schema: tables about the caller themself, read when queried. Today one,
//! `lakegate.privacy_budget`: where each of the caller's privacy budgets stands.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampMicrosecondArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, Session as DFSession, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use lakegate_policies::DifferentialPrivacy;

use crate::privacy_budget::Ledger;

/// The schema's name, in the session's default catalog.
pub const SYSTEM_SCHEMA: &str = "lakegate";

/// A catalog that adds the `lakegate` schema to the caller's view.
#[derive(Debug)]
pub(crate) struct WithSystem {
    pub(crate) view: Arc<dyn CatalogProvider>,
    pub(crate) system: Arc<dyn SchemaProvider>,
}

impl CatalogProvider for WithSystem {
    fn schema_names(&self) -> Vec<String> {
        let mut names = self.view.schema_names();
        names.push(SYSTEM_SCHEMA.to_string());
        names
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == SYSTEM_SCHEMA {
            Some(Arc::clone(&self.system))
        } else {
            self.view.schema(name)
        }
    }
}

/// The `lakegate` schema of one caller.
#[derive(Debug)]
pub(crate) struct SystemSchema {
    budget: Arc<PrivacyBudgetTable>,
}

impl SystemSchema {
    /// `grants`: (rule, grant) of every differential privacy grant the caller holds.
    pub(crate) fn new(
        ledger: Arc<Ledger>,
        principal: String,
        grants: Vec<(String, DifferentialPrivacy)>,
    ) -> Self {
        Self {
            budget: Arc::new(PrivacyBudgetTable {
                ledger,
                principal,
                grants,
            }),
        }
    }
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        vec!["privacy_budget".into()]
    }

    async fn table(
        &self,
        name: &str,
    ) -> datafusion::common::Result<Option<Arc<dyn TableProvider>>> {
        Ok((name == "privacy_budget").then(|| Arc::clone(&self.budget) as Arc<dyn TableProvider>))
    }

    fn table_exist(&self, name: &str) -> bool {
        name == "privacy_budget"
    }
}

/// One row per differential privacy grant of the caller: the budget, what is spent and what
/// remains in the current window, and when it refreshes. Read from the ledger at each scan.
pub(crate) struct PrivacyBudgetTable {
    ledger: Arc<Ledger>,
    principal: String,
    grants: Vec<(String, DifferentialPrivacy)>,
}

impl std::fmt::Debug for PrivacyBudgetTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivacyBudgetTable({})", self.principal)
    }
}

fn budget_schema() -> SchemaRef {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("rule", DataType::Utf8, false),
        Field::new("epsilon_budget", DataType::Float64, false),
        Field::new("epsilon_spent", DataType::Float64, false),
        Field::new("epsilon_remaining", DataType::Float64, false),
        Field::new("epsilon_per_query", DataType::Float64, false),
        Field::new("delta_budget", DataType::Float64, false),
        Field::new("delta_spent", DataType::Float64, false),
        Field::new("delta_remaining", DataType::Float64, false),
        Field::new("charges", DataType::UInt64, false),
        Field::new("window_start", time.clone(), false),
        Field::new("refreshes_at", time, false),
    ]))
}

#[async_trait]
impl TableProvider for PrivacyBudgetTable {
    fn schema(&self) -> SchemaRef {
        budget_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn DFSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let now = chrono::Utc::now();
        let mut standings = Vec::new();
        for (rule, grant) in &self.grants {
            let standing = self
                .ledger
                .standing_at(
                    &self.principal,
                    rule,
                    &crate::session::budget_of(grant),
                    now,
                )
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "privacy budget ledger unreadable");
                    DataFusionError::External(Box::new(crate::EngineError::Unavailable(
                        "the privacy budget cannot be read right now (rule: privacy-budget-fail-closed)"
                            .into(),
                    )))
                })?;
            standings.push((rule, grant, standing));
        }
        let micros = |t: chrono::DateTime<chrono::Utc>| t.timestamp_micros();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                standings.iter().map(|(r, _, _)| r.as_str()),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, g, _)| g.epsilon),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, _, s)| s.spent_epsilon),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, _, s)| s.remaining_epsilon),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, g, _)| g.epsilon_per_query),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, g, _)| g.delta),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, _, s)| s.spent_delta),
            )),
            Arc::new(Float64Array::from_iter_values(
                standings.iter().map(|(_, _, s)| s.remaining_delta),
            )),
            Arc::new(UInt64Array::from_iter_values(
                standings.iter().map(|(_, _, s)| s.charges),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    standings.iter().map(|(_, _, s)| micros(s.window_start)),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    standings.iter().map(|(_, _, s)| micros(s.refreshes_at)),
                )
                .with_timezone("UTC"),
            ),
        ];
        let batch = RecordBatch::try_new(budget_schema(), columns)?;
        let exec =
            MemorySourceConfig::try_new_exec(&[vec![batch]], budget_schema(), projection.cloned())?;
        Ok(exec)
    }
}
