//! Policy and catalog hot reload: on SIGHUP, or when the policy or model file or the lake's
//! catalog changes, load and validate them and swap them in atomically. A policy or catalog
//! that does not load (or a catalog the lake's files do not match) leaves the last good pair
//! in force, and the failure is logged with the reason (file and line for a policy).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use lakegate_catalogs::{Catalog, CatalogStamp, Lake};
use lakegate_engine::audit::AuditLog;
use lakegate_engine::Engine;
use lakegate_policies::{PolicySet, DEFAULT_MODEL};

/// The policy's text: a file, re-read when it changes, or fixed at start (the demo's, or
/// deny-all when none was given).
#[derive(Clone, Debug)]
pub enum PolicyText {
    File(PathBuf),
    Fixed { name: String, text: String },
}

/// Where the policy comes from, and the lake whose catalog it is checked against.
#[derive(Clone)]
pub struct PolicySource {
    pub policy: PolicyText,
    pub model: Option<PathBuf>,
    pub lake: Lake,
    /// The trail whose PHI-volume alert follows the catalog's `phi.*` labels.
    pub audit: Option<AuditLog>,
}

/// What the watcher compares between polls.
#[derive(PartialEq)]
struct Stamp {
    files: Vec<Option<SystemTime>>,
    catalog: Option<CatalogStamp>,
}

impl PolicySource {
    async fn stamp(&self) -> Stamp {
        let policy = match &self.policy {
            PolicyText::File(p) => Some(p),
            PolicyText::Fixed { .. } => None,
        };
        Stamp {
            files: policy
                .into_iter()
                .chain(self.model.as_ref())
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect(),
            catalog: self.lake.catalog_stamp().await.ok(),
        }
    }
}

/// Load the policy (and the lake's catalog, if it changed) from `source` and swap them in.
/// Returns the policy's version, or why the old policy and catalog stay.
pub async fn reload(engine: &Engine, source: &PolicySource) -> Result<String, String> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let model = match &source.model {
        Some(p) => read(p)?,
        None => DEFAULT_MODEL.to_string(),
    };
    let (name, text) = match &source.policy {
        PolicyText::File(p) => (p.display().to_string(), read(p)?),
        PolicyText::Fixed { name, text } => (name.clone(), text.clone()),
    };
    let catalog = Catalog::load(&source.lake)
        .await
        .map_err(|e| format!("the lake's catalog: {e}"))?;
    let changed = catalog != *engine.catalog();
    if changed {
        // As at start: a catalog the files do not match is never served.
        catalog
            .verify(&source.lake)
            .await
            .map_err(|e| format!("the lake's catalog: {e}"))?;
    }
    let policy = PolicySet::load(&model, &name, &text, &catalog)
        .await
        .map_err(|e| e.to_string())?;
    let version = policy.version().to_string();
    if changed {
        engine
            .replace_catalog(catalog, policy)
            .await
            .map_err(|e| format!("the lake's catalog: {e}"))?;
        if let Some(audit) = &source.audit {
            audit.set_phi_columns(crate::audited::phi_columns(&engine.catalog()));
        }
        tracing::info!(%version, "catalog reloaded");
    } else {
        engine.replace_policy(policy).await;
    }
    Ok(version)
}

/// Watch `source` (polling its files every `every`) and listen for SIGHUP; reload on either.
pub fn spawn_watcher(
    engine: Engine,
    source: PolicySource,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut last = source.stamp().await;
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let forced = tokio::select! {
                _ = hangup => true,
                _ = tokio::time::sleep(every) => false,
            };
            let now = source.stamp().await;
            if !forced && now == last {
                continue;
            }
            last = now;
            let kept = engine.policy().version().to_string();
            match reload(&engine, &source).await {
                Ok(version) => tracing::info!(%version, previous = %kept, "policy reloaded"),
                Err(reason) => {
                    tracing::error!(%reason, version = %kept, "reload failed; keeping the last good policy and catalog")
                }
            }
        }
    })
}
