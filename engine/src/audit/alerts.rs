//! Alert rules evaluated over the events as they are written: bulk reads of PHI, bursts of
//! refusals. An alert is itself an audit event (kind `alert`) and goes to the alert sink.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::AuditEvent;

/// What an alert rule counts, per principal, within its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Rows returned by queries that read columns labelled `phi.*`.
    PhiRows,
    /// Refused or rejected requests (queries, metadata calls, updates).
    Refusals,
    /// Failed authentications for one user name.
    AuthFailures,
}

/// One alert rule: raise when a principal's count exceeds `threshold` within `window_minutes`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub name: String,
    pub kind: AlertKind,
    pub threshold: u64,
    pub window_minutes: u64,
}

/// Where alerts go besides the trail (a log line always; a webhook if configured).
pub type AlertSink = Arc<dyn Fn(&AuditEvent) + Send + Sync>;

pub(crate) struct Alerts {
    rules: Vec<AlertRule>,
    phi_columns: HashSet<String>,
    sink: Option<AlertSink>,
    /// (rule index, principal) -> amounts inside the window.
    windows: HashMap<(usize, String), VecDeque<(Instant, u64)>>,
}

impl Alerts {
    pub(crate) fn new(
        rules: Vec<AlertRule>,
        phi_columns: HashSet<String>,
        sink: Option<AlertSink>,
    ) -> Self {
        Self {
            rules,
            phi_columns,
            sink,
            windows: HashMap::new(),
        }
    }

    pub(crate) fn set_phi_columns(&mut self, columns: HashSet<String>) {
        self.phi_columns = columns;
    }

    fn amount(&self, kind: AlertKind, e: &AuditEvent) -> u64 {
        match kind {
            AlertKind::PhiRows => {
                let reads_phi = e.kind == "query_end"
                    && e.columns.split(", ").any(|c| self.phi_columns.contains(c));
                if reads_phi {
                    e.rows.unwrap_or(0)
                } else {
                    0
                }
            }
            AlertKind::Refusals => {
                let refused = e.outcome == "refused" || e.outcome == "invalid";
                u64::from(refused && e.kind != "auth" && e.kind != "alert")
            }
            AlertKind::AuthFailures => u64::from(e.kind == "auth" && e.outcome == "refused"),
        }
    }

    /// The alert events `e` raises (usually none).
    pub(crate) fn observe(&mut self, e: &AuditEvent) -> Vec<AuditEvent> {
        let now = Instant::now();
        let mut raised = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let amount = self.amount(rule.kind, e);
            if amount == 0 {
                continue;
            }
            let window = Duration::from_secs(rule.window_minutes * 60);
            let entries = self.windows.entry((i, e.principal.clone())).or_default();
            entries.push_back((now, amount));
            while entries
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > window)
            {
                entries.pop_front();
            }
            let total: u64 = entries.iter().map(|(_, n)| n).sum();
            if total > rule.threshold {
                // Start counting afresh: one alert per excess, not one per event after it.
                entries.clear();
                let what = match rule.kind {
                    AlertKind::PhiRows => "rows of phi.* columns read",
                    AlertKind::Refusals => "refused requests",
                    AlertKind::AuthFailures => "failed authentications",
                };
                let mut alert = AuditEvent::new("alert", &rule.name);
                alert.principal = e.principal.clone();
                alert.attributes = e.attributes.clone();
                alert.purpose = e.purpose.clone();
                alert.client = e.client.clone();
                alert.policy_version = e.policy_version.clone();
                alert.rules = format!("alert {}", rule.name);
                alert.rows = (rule.kind == AlertKind::PhiRows).then_some(total);
                alert.outcome = "raised".into();
                alert.reason = format!(
                    "{total} {what} within {} min exceeds {} (alert rule {}; last event seq {})",
                    rule.window_minutes, rule.threshold, rule.name, e.seq
                );
                tracing::warn!(
                    target: "lakegate::alert",
                    rule = %rule.name,
                    principal = %e.principal,
                    reason = %alert.reason,
                    "audit alert"
                );
                if let Some(sink) = &self.sink {
                    sink(&alert);
                }
                raised.push(alert);
            }
        }
        raised
    }
}
