//! Policy hot reload: on SIGHUP or when the policy or model file changes, load and validate the
//! new policy and swap it in atomically. A file that does not load leaves the last good policy
//! in force, and the failure is logged with the file, line and reason.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use lakegate_engine::Engine;
use lakegate_policies::{PolicySet, DEFAULT_MODEL};

/// Where the policy comes from.
#[derive(Clone, Debug)]
pub struct PolicySource {
    pub policy: PathBuf,
    pub model: Option<PathBuf>,
}

impl PolicySource {
    fn stamp(&self) -> Vec<Option<SystemTime>> {
        std::iter::once(&self.policy)
            .chain(self.model.as_ref())
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// Load the policy from `source` and swap it in. Returns the new version, or why the old one
/// stays.
pub async fn reload(engine: &Engine, source: &PolicySource) -> Result<String, String> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let model = match &source.model {
        Some(p) => read(p)?,
        None => DEFAULT_MODEL.to_string(),
    };
    let text = read(&source.policy)?;
    let policy = PolicySet::load(
        &model,
        &source.policy.display().to_string(),
        &text,
        engine.catalog(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let version = policy.version().to_string();
    engine.replace_policy(policy).await;
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
        let mut last = source.stamp();
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
            let now = source.stamp();
            if !forced && now == last {
                continue;
            }
            last = now;
            let kept = engine.policy().version().to_string();
            match reload(&engine, &source).await {
                Ok(version) => tracing::info!(%version, previous = %kept, "policy reloaded"),
                Err(reason) => {
                    tracing::error!(%reason, version = %kept, "policy reload failed; keeping the last good policy")
                }
            }
        }
    })
}
