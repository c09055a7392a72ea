//! What the service writes to the audit trail: outcomes and reasons derived from the status a
//! client gets, and result streams that record their completion however they end.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use arrow_flight::FlightData;
use std::future::Future;

use futures::Stream;
use lakegate_catalogs::{Catalog, Lake};
use lakegate_engine::audit::{AlertSink, AuditConfig, AuditError, AuditEvent, AuditKey, AuditLog};
use lakegate_engine::AccessReport;
use tonic::{Code, Status};

use crate::limits::QueryGrant;

/// The columns labelled `phi.*` (`dataset.column`), which the PHI-volume alert counts.
pub fn phi_columns(catalog: &Catalog) -> std::collections::HashSet<String> {
    catalog
        .datasets
        .iter()
        .flat_map(|d| {
            d.columns
                .iter()
                .filter(|c| c.label.starts_with("phi."))
                .map(move |c| format!("{}.{}", d.name, c.name))
        })
        .collect()
}

/// Open the lake's audit trail for writing, with the configured checkpoints and alerts.
pub async fn open_audit(
    lake: &Lake,
    catalog: &Catalog,
    key: AuditKey,
    settings: &crate::config::AuditSettings,
) -> Result<AuditLog, AuditError> {
    let phi_columns = phi_columns(catalog);
    let config = AuditConfig {
        checkpoint_every: settings.checkpoint_every.max(1),
        checkpoint_interval: std::time::Duration::from_secs(settings.checkpoint_interval_secs),
        alerts: settings.alerts.clone(),
        phi_columns,
        retention_days: settings.retention_days,
        ..Default::default()
    };
    let sink = settings.alert_webhook.clone().map(webhook_sink);
    AuditLog::open(lake.store(), key, config, sink).await
}

/// POST each alert as JSON to `url`, in the background; a failed delivery is logged (the alert
/// is in the trail either way).
fn webhook_sink(url: String) -> AlertSink {
    let client = reqwest::Client::new();
    Arc::new(move |alert: &AuditEvent| {
        let body = serde_json::to_string(alert).unwrap_or_default();
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .timeout(std::time::Duration::from_secs(10))
            .body(body);
        tokio::spawn(async move {
            match request.send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::error!(status = %r.status(), "alert webhook refused the alert"),
                Err(e) => tracing::error!(error = %e, "alert webhook unreachable"),
            }
        });
    })
}

/// The audit outcome of a request that ended in `status`.
pub fn outcome_of(status: &Status) -> &'static str {
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => "refused",
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => "invalid",
        Code::ResourceExhausted => "limited",
        _ => "failed",
    }
}

/// Why, for the trail. Only messages Lakegate itself writes (rule names, limits) are kept:
/// parser, planner and execution messages may quote the query's literals or a data value.
pub fn reason_of(status: &Status) -> String {
    match status.code() {
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::ResourceExhausted
        | Code::Unavailable
        | Code::FailedPrecondition => format!("{:?}: {}", status.code(), status.message()),
        code => format!("{code:?} (message withheld: it may quote the query)"),
    }
}

/// The status a client gets when its decision could not be recorded: nothing is served
/// without its audit event.
pub fn audit_unavailable(e: AuditError) -> Status {
    tracing::error!(error = %e, "audit trail unwritable: refusing");
    Status::unavailable(
        "the audit trail cannot be written, so nothing is served (rule: audit-fail-closed)",
    )
}

/// Fill an event with what a query report knows.
pub fn with_report(mut e: AuditEvent, report: &AccessReport) -> AuditEvent {
    e.datasets = report.datasets.join(", ");
    e.columns = report.columns.join(", ");
    e.rules = report.rules.join("; ");
    e
}

/// A query's result stream that writes the query's completion event (rows, bytes, duration,
/// groups suppressed, outcome) when it ends: exhausted, failed, or dropped because the client
/// went away.
pub struct AuditedStream {
    inner: Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send>>,
    rows: Arc<AtomicU64>,
    bytes: u64,
    started: Instant,
    log: AuditLog,
    /// The completion event's template; taken when written.
    end: Option<AuditEvent>,
    report: AccessReport,
    /// The query's concurrency slot and memory budget, released when the stream goes.
    grant: Option<QueryGrant>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: bool,
}

impl AuditedStream {
    pub fn new(
        inner: Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send>>,
        rows: Arc<AtomicU64>,
        log: AuditLog,
        end: AuditEvent,
        report: AccessReport,
        started: Instant,
    ) -> Self {
        Self {
            inner,
            rows,
            bytes: 0,
            started,
            log,
            end: Some(end),
            report,
            grant: None,
            deadline: None,
            timed_out: false,
        }
    }

    /// Hold `grant` while the stream lives and stop the query at its timeout.
    pub fn within(mut self, grant: QueryGrant) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep(grant.timeout)));
        self.grant = Some(grant);
        self
    }

    fn finish(&mut self, outcome: &str, reason: String) {
        if let Some(mut e) = self.end.take() {
            e.time = lakegate_engine::audit::now_rfc3339();
            e.rows = Some(self.rows.load(Ordering::Relaxed));
            e.bytes = Some(self.bytes);
            e.duration_us = Some(self.started.elapsed().as_micros() as u64);
            e.groups_suppressed = self
                .report
                .thresholded
                .then(|| self.report.groups_suppressed());
            match self.report.failure_withheld.get() {
                // The caller saw an empty result; the trail says why.
                Some(kind) if outcome == "completed" => {
                    e.outcome = "suppressed".into();
                    e.reason = format!(
                        "the query failed under an aggregation threshold ({kind}) and was answered \
                         as an empty result (rule: threshold-failures-suppressed)"
                    );
                }
                _ => {
                    e.outcome = outcome.into();
                    e.reason = reason;
                }
            }
            self.log.record_later(e);
        }
    }
}

impl Stream for AuditedStream {
    type Item = Result<FlightData, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.timed_out {
            return Poll::Ready(None);
        }
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if expired {
            let secs = self
                .grant
                .as_ref()
                .map(|g| g.timeout.as_secs())
                .unwrap_or(0);
            let status = Status::resource_exhausted(format!(
                "the query ran past its time limit of {secs} s and was stopped (limit: query_timeout_secs)"
            ));
            self.timed_out = true;
            // Dropping the plan's stream cancels its work and frees its memory now.
            self.inner = Box::pin(futures::stream::empty());
            self.finish(outcome_of(&status), reason_of(&status));
            self.grant = None;
            return Poll::Ready(Some(Err(status)));
        }
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(data))) => {
                self.bytes += (data.data_header.len() + data.data_body.len()) as u64;
            }
            Poll::Ready(Some(Err(status))) => {
                let (outcome, reason) = (outcome_of(status), reason_of(status));
                self.finish(outcome, reason);
            }
            Poll::Ready(None) => self.finish("completed", String::new()),
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for AuditedStream {
    fn drop(&mut self) {
        self.finish(
            "cancelled",
            "the client stopped reading before the end".into(),
        );
    }
}
