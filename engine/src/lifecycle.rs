//! What the lake keeps and for how long: legal holds, the deletion of releases whose retention
//! has passed, and the move of old raw extracts to a cold prefix.
//!
//! Every step is safe to run again after an interruption: a release's deletion is decided by
//! writing its tombstone (create-only), after which the run only removes what is left of its
//! files; a raw file is deleted from its hot place only once its cold copy has been read back
//! and matched byte for byte (SHA-256). Nothing under a hold is touched.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use lakegate_catalogs::{Catalog, Lake};
use lakegate_policies::Principal;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::audit::VerifyingKey;
use crate::releases::{self, sha256_hex, store_error, Tombstone};
use crate::{EngineError, Result};

/// Where holds are kept: `catalog/holds/<name>.json`.
const HOLDS: &str = "catalog/holds";
/// The role that may place and lift legal holds.
pub const HOLD_ROLE: &str = "compliance_auditor";
const RULE_HOLDS: &str = "legal-hold-compliance-only";

/// A legal hold: while it stands, nothing of the named release or dataset is deleted or moved.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub name: String,
    pub reason: String,
    pub placed_by: String,
    pub placed_at: String,
}

fn hold_path(name: &str) -> Path {
    Path::from(format!("{HOLDS}/{name}.json"))
}

fn may_hold(principal: &Principal) -> Result<()> {
    if principal.attributes.get("role").map(String::as_str) == Some(HOLD_ROLE) {
        Ok(())
    } else {
        Err(EngineError::PermissionDenied(format!(
            "{} may not place or lift legal holds: only the {HOLD_ROLE} role may (rule: \
             {RULE_HOLDS})",
            principal.name
        )))
    }
}

/// Whether `name` is a release or a dataset of the lake.
async fn known(lake: &Lake, name: &str) -> Result<bool> {
    let catalog = Catalog::load(lake).await?;
    if catalog.dataset(name).is_some() {
        return Ok(true);
    }
    if releases::check_name("release", name).is_err() {
        return Ok(false);
    }
    match lake
        .store()
        .head(&Path::from(format!(
            "{}/{name}/manifest.json",
            releases::ZONE
        )))
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(store_error(e)),
    }
}

/// Place a legal hold on a release or dataset. Refused for anyone but the compliance role, for
/// a name the lake does not hold, and when a hold already stands.
pub async fn add_hold(lake: &Lake, name: &str, reason: &str, by: &Principal) -> Result<Hold> {
    may_hold(by)?;
    if reason.trim().is_empty() {
        return Err(EngineError::InvalidQuery(
            "a legal hold needs a reason (--reason)".into(),
        ));
    }
    if !known(lake, name).await? {
        return Err(EngineError::InvalidQuery(format!(
            "no release or dataset named {name}: nothing to hold"
        )));
    }
    let hold = Hold {
        name: name.to_string(),
        reason: reason.to_string(),
        placed_by: by.name.clone(),
        placed_at: crate::audit::now_rfc3339(),
    };
    let put = lake
        .store()
        .put_opts(
            &hold_path(name),
            PutPayload::from(serde_json::to_vec_pretty(&hold).expect("holds serialize")),
            PutOptions::from(PutMode::Create),
        )
        .await;
    match put {
        Ok(_) => Ok(hold),
        Err(object_store::Error::AlreadyExists { .. }) => Err(EngineError::InvalidQuery(format!(
            "{name} is already under a legal hold"
        ))),
        Err(e) => Err(store_error(e)),
    }
}

/// Lift the legal hold on `name`; returns the hold that stood.
pub async fn remove_hold(lake: &Lake, name: &str, by: &Principal) -> Result<Hold> {
    may_hold(by)?;
    let holds = holds(lake).await?;
    let hold = holds
        .get(name)
        .cloned()
        .ok_or_else(|| EngineError::InvalidQuery(format!("{name} is not under a legal hold")))?;
    lake.store()
        .delete(&hold_path(name))
        .await
        .map_err(store_error)?;
    Ok(hold)
}

/// Every hold in force, by name.
pub async fn holds(lake: &Lake) -> Result<BTreeMap<String, Hold>> {
    let store = lake.store();
    let listed: Vec<_> = store
        .list(Some(&Path::from(HOLDS)))
        .try_collect()
        .await
        .map_err(store_error)?;
    let mut out = BTreeMap::new();
    for m in listed {
        let bytes = store
            .get(&m.location)
            .await
            .map_err(store_error)?
            .bytes()
            .await
            .map_err(store_error)?;
        // A hold that does not parse still holds: whatever it names stays untouched.
        let name = m
            .location
            .filename()
            .and_then(|f| f.strip_suffix(".json"))
            .unwrap_or_default()
            .to_string();
        let hold = serde_json::from_slice::<Hold>(&bytes).unwrap_or(Hold {
            name: name.clone(),
            reason: "(unreadable hold record)".into(),
            placed_by: String::new(),
            placed_at: String::new(),
        });
        out.insert(name, hold);
    }
    Ok(out)
}

/// What a lifecycle run does (or, dry, would do).
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A release's retention has passed: its data goes, its manifest stays with a tombstone.
    DeleteRelease { name: String, retain_until: String },
    /// A release deleted by an earlier, interrupted run still has files: they go now.
    FinishDeletion { name: String, files: usize },
    /// Kept although expired: a legal hold stands.
    Held { name: String, reason: String },
    /// A raw extract older than the tier age moves to the cold prefix.
    MoveCold {
        from: String,
        to: String,
        bytes: u64,
    },
    /// A raw extract of a dataset under hold stays where it is.
    HeldRaw { dataset: String, files: usize },
    /// A release whose manifest cannot be read or trusted: left alone, reported.
    Unreadable { name: String, reason: String },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::DeleteRelease { name, retain_until } => write!(
                f,
                "delete release {name}: retained until {retain_until}; its manifest stays as a tombstone"
            ),
            Step::FinishDeletion { name, files } => write!(
                f,
                "finish deleting release {name}: {files} file(s) left by an interrupted run"
            ),
            Step::Held { name, reason } => {
                write!(f, "keep release {name} past its retention: legal hold ({reason})")
            }
            Step::MoveCold { from, to, bytes } => {
                write!(f, "move {from} to {to} ({bytes} bytes, checksum kept)")
            }
            Step::HeldRaw { dataset, files } => write!(
                f,
                "keep {files} raw file(s) of {dataset} in place: legal hold"
            ),
            Step::Unreadable { name, reason } => {
                write!(f, "leave release {name} alone: {reason}")
            }
        }
    }
}

/// When raw extracts move to cold storage.
#[derive(Clone, Debug)]
pub struct Tiering {
    /// Raw files last written more than this many days ago move.
    pub cold_after_days: u32,
    /// The prefix in the lake they move under (`cold` -> `cold/raw/...`).
    pub cold_prefix: String,
}

/// Plan the lifecycle at `now`: releases past retention, interrupted deletions, raw files past
/// the tier age; holds respected.
pub async fn plan(
    lake: &Lake,
    key: &VerifyingKey,
    tiering: Option<&Tiering>,
    now: DateTime<Utc>,
) -> Result<Vec<Step>> {
    let store = lake.store();
    let holds = holds(lake).await?;
    let mut steps = Vec::new();
    for name in releases::names(store.as_ref()).await? {
        let stored = match releases::load(store.as_ref(), &name, key).await {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                steps.push(Step::Unreadable {
                    name,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let files: Vec<&releases::ReleasedFile> = stored
            .manifest
            .tables
            .iter()
            .flat_map(|t| t.files.iter())
            .collect();
        if stored.deleted.is_some() {
            let mut left = 0;
            for f in files {
                if exists(store.as_ref(), &Path::from(f.path.as_str())).await? {
                    left += 1;
                }
            }
            if left > 0 {
                steps.push(Step::FinishDeletion { name, files: left });
            }
            continue;
        }
        let until = DateTime::parse_from_rfc3339(&stored.manifest.retain_until)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                EngineError::InvalidQuery(format!("release {name}: its retention does not parse"))
            })?;
        if until > now {
            continue;
        }
        match holds.get(&name) {
            Some(h) => steps.push(Step::Held {
                name,
                reason: h.reason.clone(),
            }),
            None => steps.push(Step::DeleteRelease {
                name,
                retain_until: stored.manifest.retain_until.clone(),
            }),
        }
    }
    if let Some(t) = tiering {
        let cutoff = now - chrono::Duration::days(i64::from(t.cold_after_days));
        let listed: Vec<_> = store
            .list(Some(&Path::from("raw")))
            .try_collect()
            .await
            .map_err(store_error)?;
        let mut held: BTreeMap<String, usize> = BTreeMap::new();
        for m in listed {
            if m.last_modified > cutoff {
                continue;
            }
            let parts: Vec<&str> = m.location.as_ref().split('/').collect();
            let dataset = match parts.as_slice() {
                ["raw", schema, table, ..] => format!("{schema}.{table}"),
                _ => continue,
            };
            if holds.contains_key(&dataset) {
                *held.entry(dataset).or_default() += 1;
                continue;
            }
            steps.push(Step::MoveCold {
                from: m.location.to_string(),
                to: format!("{}/{}", t.cold_prefix.trim_end_matches('/'), m.location),
                bytes: m.size,
            });
        }
        for (dataset, files) in held {
            steps.push(Step::HeldRaw { dataset, files });
        }
    }
    Ok(steps)
}

async fn exists(store: &dyn ObjectStore, at: &Path) -> Result<bool> {
    match store.head(at).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(store_error(e)),
    }
}

async fn sha256_of(store: &dyn ObjectStore, at: &Path) -> Result<String> {
    let bytes = store
        .get(at)
        .await
        .map_err(store_error)?
        .bytes()
        .await
        .map_err(store_error)?;
    Ok(sha256_hex(&bytes))
}

/// Carry out one planned step. Deleting a release writes its tombstone first (create-only: a
/// second run or a concurrent one finds it and only finishes the files), then removes its
/// files and data keys; returns whether this call decided a deletion (to audit it once).
pub async fn apply(lake: &Lake, key: &VerifyingKey, step: &Step) -> Result<bool> {
    let store = lake.store();
    match step {
        Step::Held { .. } | Step::HeldRaw { .. } | Step::Unreadable { .. } => Ok(false),
        Step::DeleteRelease { name, .. } | Step::FinishDeletion { name, .. } => {
            let holds = holds(lake).await?;
            if holds.contains_key(name) {
                // A hold placed since the plan was made.
                return Ok(false);
            }
            let tombstone = Tombstone {
                release: name.clone(),
                deleted_at: crate::audit::now_rfc3339(),
                reason: "retention expired".into(),
            };
            let decided = match store
                .put_opts(
                    &releases::tombstone_path(name),
                    PutPayload::from(
                        serde_json::to_vec_pretty(&tombstone).expect("tombstones serialize"),
                    ),
                    PutOptions::from(PutMode::Create),
                )
                .await
            {
                Ok(_) => true,
                Err(object_store::Error::AlreadyExists { .. }) => false,
                Err(e) => return Err(store_error(e)),
            };
            let Some(stored) = releases::load(store.as_ref(), name, key).await? else {
                return Ok(decided);
            };
            for f in stored.manifest.tables.iter().flat_map(|t| t.files.iter()) {
                match store.delete(&Path::from(f.path.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
            if let Some(k) = &stored.manifest.data_keys {
                match store.delete(&lakegate_catalogs::keys::key_file(k)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
            Ok(decided)
        }
        Step::MoveCold { from, to, .. } => {
            let (from, to) = (Path::from(from.as_str()), Path::from(to.as_str()));
            let original = sha256_of(store.as_ref(), &from).await?;
            store.copy(&from, &to).await.map_err(store_error)?;
            let copied = sha256_of(store.as_ref(), &to).await?;
            if copied != original {
                let _ = store.delete(&to).await;
                return Err(EngineError::Internal(format!(
                    "the cold copy of {from} does not match it; the original is kept"
                )));
            }
            store.delete(&from).await.map_err(store_error)?;
            Ok(true)
        }
    }
}
