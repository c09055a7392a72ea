//! The privacy budget ledger: what each principal has spent of a differential-privacy budget,
//! kept in the lake so that it holds across sessions, restarts, clients and servers.
//!
//! A budget is epsilon (and delta) per window of time; windows are aligned to the Unix epoch
//! (a 30-day window refreshes every 30 days counted from 1970-01-01T00:00:00Z), so every
//! server agrees on when one starts. Spending composes by addition (basic composition).
//!
//! Each charge is one object, `privacy/budget/<principal>/<scope>/w<window>/<seq>.json`,
//! created only if absent (an object-store conditional write) and carrying the totals spent
//! in the window once it is counted. A charge reads the window's last entry, checks that the
//! new totals stay within the budget, and creates the next entry: of two servers or two
//! queries racing for the same entry exactly one wins; the other reads the winner's totals and
//! checks again. So the budget cannot be overspent, and an unreachable store refuses the
//! charge (the caller must then refuse the query: fail closed).
//!
//! Amounts are kept as integers (epsilon in units of 1e-9, delta in units of 1e-18), charges
//! rounded up, so that no sum of floating-point numbers drifts below what was spent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::TryStreamExt;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

/// Epsilon is counted in these units.
const EPSILON_UNIT: f64 = 1e-9;
/// Delta is counted in these units.
const DELTA_UNIT: f64 = 1e-18;
/// How many lost races for the next entry a charge tolerates before it is refused.
const MAX_RACES: usize = 64;

/// What one principal may spend on one scope (e.g. a dataset group) per window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub epsilon: f64,
    pub delta: f64,
    pub window: Duration,
}

/// What a query costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub epsilon: f64,
    pub delta: f64,
}

/// Where a principal stands in the current window.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub spent_epsilon: f64,
    pub spent_delta: f64,
    pub remaining_epsilon: f64,
    pub remaining_delta: f64,
    pub window_start: DateTime<Utc>,
    pub refreshes_at: DateTime<Utc>,
    /// Charges made in the window so far.
    pub charges: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "privacy budget exceeded: the query costs epsilon {wanted}, {remaining} of {budget} \
         remains in this window; the budget refreshes at {refreshes_at}"
    )]
    Exceeded {
        wanted: f64,
        remaining: f64,
        budget: f64,
        refreshes_at: String,
    },
    #[error(
        "privacy budget exceeded: the query costs delta {wanted:e}, {remaining:e} remains in \
         this window; the budget refreshes at {refreshes_at}"
    )]
    DeltaExceeded {
        wanted: f64,
        remaining: f64,
        refreshes_at: String,
    },
    #[error("the privacy budget is not valid: {0}")]
    Invalid(String),
    #[error("the privacy budget ledger is unavailable, so nothing can be charged: {0}")]
    Unavailable(String),
}

impl From<object_store::Error> for BudgetError {
    fn from(e: object_store::Error) -> Self {
        BudgetError::Unavailable(e.to_string())
    }
}

/// One entry of the ledger: a charge and the window's totals once it is counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    at: String,
    /// The query (or other reason) the charge was for.
    reason: String,
    epsilon_units: u64,
    delta_units: u64,
    total_epsilon_units: u64,
    total_delta_units: u64,
}

/// `amount / unit` as an integer: a quotient within floating-point error of a whole number
/// (0.1 / 1e-9) is that number; any other is rounded `up` or down.
fn to_units(amount: f64, unit: f64, what: &str, up: bool) -> Result<u64, BudgetError> {
    if !amount.is_finite() || amount < 0.0 {
        return Err(BudgetError::Invalid(format!(
            "{what} must be a finite number >= 0, not {amount}"
        )));
    }
    let x = amount / unit;
    let nearest = x.round();
    let u = if (x - nearest).abs() <= x * 8.0 * f64::EPSILON {
        nearest
    } else if up {
        x.ceil()
    } else {
        x.floor()
    };
    if u >= u64::MAX as f64 {
        return Err(BudgetError::Invalid(format!(
            "{what} {amount} is too large"
        )));
    }
    Ok(u as u64)
}

/// A charge in units, rounded up: never less than what the query costs.
fn units(amount: f64, unit: f64, what: &str) -> Result<u64, BudgetError> {
    to_units(amount, unit, what, true)
}

/// A budget's limit in units, rounded down: never more than what was granted.
fn limit_units(amount: f64, unit: f64, what: &str) -> Result<u64, BudgetError> {
    to_units(amount, unit, what, false)
}

/// The ledger of one lake.
pub struct Ledger {
    store: Arc<dyn ObjectStore>,
    /// The last entry seen per window folder (its path and contents), so that a charge lists
    /// only what is newer and reads an entry only when another writer added it.
    last_seen: Mutex<HashMap<Path, (Path, Entry)>>,
}

impl Ledger {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            last_seen: Mutex::new(HashMap::new()),
        }
    }

    fn window(
        budget: &Budget,
        now: DateTime<Utc>,
    ) -> Result<(u64, DateTime<Utc>, DateTime<Utc>), BudgetError> {
        let secs = budget.window.as_secs();
        if secs == 0 {
            return Err(BudgetError::Invalid(
                "the window must be at least one second".into(),
            ));
        }
        let t = u64::try_from(now.timestamp())
            .map_err(|_| BudgetError::Invalid("the clock is before 1970".into()))?;
        let index = t / secs;
        let at = |i: u64| {
            i64::try_from(i.saturating_mul(secs))
                .ok()
                .and_then(|s| Utc.timestamp_opt(s, 0).single())
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        };
        Ok((index, at(index), at(index + 1)))
    }

    fn folder(principal: &str, scope: &str, window: u64) -> Path {
        Path::from_iter([
            PathPart::from("privacy"),
            PathPart::from("budget"),
            PathPart::from(principal),
            PathPart::from(scope),
            PathPart::from(format!("w{window:012}")),
        ])
    }

    /// The last entry of a window folder, if any.
    async fn last(&self, folder: &Path) -> Result<Option<Entry>, BudgetError> {
        let since = self
            .last_seen
            .lock()
            .expect("ledger cache")
            .get(folder)
            .cloned();
        let listing = match &since {
            Some((offset, _)) => self.store.list_with_offset(Some(folder), offset),
            None => self.store.list(Some(folder)),
        };
        let found: Vec<_> = listing.try_collect().await?;
        let newer = found
            .into_iter()
            .map(|meta| meta.location)
            .filter(|p| since.as_ref().is_none_or(|(seen, _)| p > seen))
            .max();
        let Some(path) = newer else {
            return Ok(since.map(|(_, entry)| entry));
        };
        let bytes = self.store.get(&path).await?.bytes().await?;
        let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| {
            BudgetError::Unavailable(format!("ledger entry {path} is unreadable: {e}"))
        })?;
        self.last_seen
            .lock()
            .expect("ledger cache")
            .insert(folder.clone(), (path, entry.clone()));
        Ok(Some(entry))
    }

    fn standing(
        budget: &Budget,
        last: Option<&Entry>,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Standing {
        let (e, d, n) = last.map_or((0, 0, 0), |l| {
            (l.total_epsilon_units, l.total_delta_units, l.seq + 1)
        });
        let spent_epsilon = e as f64 * EPSILON_UNIT;
        let spent_delta = d as f64 * DELTA_UNIT;
        Standing {
            spent_epsilon,
            spent_delta,
            remaining_epsilon: (budget.epsilon - spent_epsilon).max(0.0),
            remaining_delta: (budget.delta - spent_delta).max(0.0),
            window_start: start,
            refreshes_at: end,
            charges: n,
        }
    }

    /// Where `principal` stands on `scope` in the window that holds `now`.
    pub async fn standing_at(
        &self,
        principal: &str,
        scope: &str,
        budget: &Budget,
        now: DateTime<Utc>,
    ) -> Result<Standing, BudgetError> {
        let (index, start, end) = Self::window(budget, now)?;
        let last = self.last(&Self::folder(principal, scope, index)).await?;
        Ok(Self::standing(budget, last.as_ref(), start, end))
    }

    /// Charge `cost` to `principal` on `scope` in the window that holds `now`, or refuse it
    /// (nothing charged) when it would take the window's totals past `budget`.
    pub async fn charge_at(
        &self,
        principal: &str,
        scope: &str,
        budget: &Budget,
        cost: Cost,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Standing, BudgetError> {
        let (index, start, end) = Self::window(budget, now)?;
        let folder = Self::folder(principal, scope, index);
        let max_e = limit_units(budget.epsilon, EPSILON_UNIT, "the budget's epsilon")?;
        let max_d = limit_units(budget.delta, DELTA_UNIT, "the budget's delta")?;
        let want_e = units(cost.epsilon, EPSILON_UNIT, "a query's epsilon")?;
        let want_d = units(cost.delta, DELTA_UNIT, "a query's delta")?;
        for _ in 0..MAX_RACES {
            let last = self.last(&folder).await?;
            let (spent_e, spent_d, seq) = last.as_ref().map_or((0, 0, 0), |l| {
                (l.total_epsilon_units, l.total_delta_units, l.seq + 1)
            });
            let standing = Self::standing(budget, last.as_ref(), start, end);
            if spent_e.saturating_add(want_e) > max_e {
                return Err(BudgetError::Exceeded {
                    wanted: cost.epsilon,
                    remaining: standing.remaining_epsilon,
                    budget: budget.epsilon,
                    refreshes_at: end.to_rfc3339(),
                });
            }
            if spent_d.saturating_add(want_d) > max_d {
                return Err(BudgetError::DeltaExceeded {
                    wanted: cost.delta,
                    remaining: standing.remaining_delta,
                    refreshes_at: end.to_rfc3339(),
                });
            }
            let entry = Entry {
                seq,
                at: now.to_rfc3339(),
                reason: reason.to_string(),
                epsilon_units: want_e,
                delta_units: want_d,
                total_epsilon_units: spent_e + want_e,
                total_delta_units: spent_d + want_d,
            };
            let path = folder.clone().join(format!("{seq:020}.json"));
            let body = serde_json::to_vec(&entry).expect("entries serialize");
            let put = self
                .store
                .put_opts(
                    &path,
                    PutPayload::from(body),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match put {
                Ok(_) => {
                    self.last_seen
                        .lock()
                        .expect("ledger cache")
                        .insert(folder.clone(), (path, entry.clone()));
                    return Ok(Self::standing(budget, Some(&entry), start, end));
                }
                // Another query took this entry: count it, then check again.
                Err(object_store::Error::AlreadyExists { .. }) => {
                    tokio::time::sleep(Duration::from_millis(1 + seq % 3)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(BudgetError::Unavailable(
            "lost the race for the ledger's next entry too many times".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ledger(dir: &std::path::Path) -> Ledger {
        Ledger::new(Arc::new(LocalFileSystem::new_with_prefix(dir).unwrap()))
    }

    fn budget(epsilon: f64) -> Budget {
        Budget {
            epsilon,
            delta: 1e-6,
            window: 30 * DAY,
        }
    }

    fn cost(epsilon: f64) -> Cost {
        Cost {
            epsilon,
            delta: 0.0,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap()
    }

    #[tokio::test]
    async fn charges_add_up_to_the_budget_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let b = budget(1.0);
        // Ten charges of 0.1 spend exactly 1.0: no floating-point drift refuses the tenth.
        for i in 0..10 {
            let s = l
                .charge_at("frank", "clinical", &b, cost(0.1), "q", now())
                .await
                .unwrap();
            assert_eq!(s.charges, i + 1);
        }
        let refused = l
            .charge_at("frank", "clinical", &b, cost(1e-9), "q", now())
            .await
            .unwrap_err();
        let text = refused.to_string();
        assert!(text.contains("privacy budget exceeded"), "{text}");
        assert!(text.contains("0 of 1 remains"), "{text}");
        // The window is the 30 days counted from the epoch that hold `now`.
        let s = l.standing_at("frank", "clinical", &b, now()).await.unwrap();
        assert_eq!(s.charges, 10);
        assert!((s.spent_epsilon - 1.0).abs() < 1e-12);
        assert_eq!(s.remaining_epsilon, 0.0);
        let secs = 30 * 86_400;
        assert_eq!(s.window_start.timestamp() % secs, 0);
        assert!(s.window_start <= now() && now() < s.refreshes_at);
        assert!(text.contains(&s.refreshes_at.to_rfc3339()), "{text}");
        // Other principals and scopes have budgets of their own.
        let other = l.standing_at("gina", "clinical", &b, now()).await.unwrap();
        assert_eq!((other.charges, other.remaining_epsilon), (0, 1.0));
        // The next window starts afresh.
        let later = s.refreshes_at + chrono::Duration::seconds(1);
        let s = l
            .charge_at("frank", "clinical", &b, cost(0.5), "q", later)
            .await
            .unwrap();
        assert_eq!((s.charges, s.remaining_epsilon), (1, 0.5));
    }

    #[tokio::test]
    async fn a_restart_keeps_what_was_spent() {
        let dir = tempfile::tempdir().unwrap();
        let b = budget(2.0);
        ledger(dir.path())
            .charge_at("frank", "clinical", &b, cost(1.5), "q", now())
            .await
            .unwrap();
        let fresh = ledger(dir.path());
        let s = fresh
            .standing_at("frank", "clinical", &b, now())
            .await
            .unwrap();
        assert!((s.remaining_epsilon - 0.5).abs() < 1e-12);
        assert!(fresh
            .charge_at("frank", "clinical", &b, cost(1.0), "q", now())
            .await
            .is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racers_for_the_last_of_the_budget_cannot_both_win() {
        let dir = tempfile::tempdir().unwrap();
        let b = budget(1.0);
        for round in 0..20 {
            // Two servers on one lake: separate ledgers, so no shared memory decides.
            let (a, z) = (ledger(dir.path()), ledger(dir.path()));
            let scope = format!("round{round}");
            let at = now();
            let (x, y) = tokio::join!(
                a.charge_at("frank", &scope, &b, cost(0.6), "x", at),
                z.charge_at("frank", &scope, &b, cost(0.6), "y", at)
            );
            assert!(x.is_ok() != y.is_ok(), "round {round}: {x:?} {y:?}");
            let s = a.standing_at("frank", &scope, &b, at).await.unwrap();
            assert_eq!(s.charges, 1);
        }
        // Many small racers: never more than the budget, and every success counted.
        let ledgers: Vec<_> = (0..8).map(|_| Arc::new(ledger(dir.path()))).collect();
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let l = Arc::clone(&ledgers[i % ledgers.len()]);
                tokio::spawn(async move {
                    l.charge_at("frank", "many", &budget(1.0), cost(0.1), "q", now())
                        .await
                        .is_ok()
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            won += usize::from(t.await.unwrap());
        }
        assert_eq!(won, 10);
        let s = ledgers[0]
            .standing_at("frank", "many", &b, now())
            .await
            .unwrap();
        assert_eq!(s.charges, 10);
    }

    #[tokio::test]
    async fn an_unwritable_ledger_refuses_the_charge() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the ledger's folder must be: every write fails.
        std::fs::write(dir.path().join("privacy"), b"not a folder").unwrap();
        let e = ledger(dir.path())
            .charge_at("frank", "clinical", &budget(1.0), cost(0.1), "q", now())
            .await
            .unwrap_err();
        assert!(matches!(e, BudgetError::Unavailable(_)), "{e}");
    }

    #[tokio::test]
    async fn bad_amounts_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        for bad in [f64::NAN, -0.1, f64::INFINITY] {
            let e = l
                .charge_at("frank", "clinical", &budget(1.0), cost(bad), "q", now())
                .await
                .unwrap_err();
            assert!(matches!(e, BudgetError::Invalid(_)), "{e}");
        }
        let zero = Budget {
            window: Duration::ZERO,
            ..budget(1.0)
        };
        assert!(l.standing_at("frank", "c", &zero, now()).await.is_err());
        assert!(!dir.path().join("privacy").exists());
    }
}
