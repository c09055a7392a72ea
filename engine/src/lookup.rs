//! Lookups by pseudonym: from a keyed pseudonym back to the raw keys that carry it, per dataset
//! column and project key, so that `WHERE patient_id = 'ps_…'` reads like a lookup by raw id.
//!
//! A pseudonym is a keyed digest of the raw id; no predicate on it can reach the Parquet scan,
//! so without help every row's pseudonym is computed to find one patient. An index, built once
//! per (dataset, column, mask expression with its key, file listing) by masking the column's
//! distinct raw values, turns the pseudonyms a query names into the raw keys that have them;
//! the governed scan then adds `raw IN (those keys)` below the masks, where Parquet statistics
//! prune row groups and pages. The caller's own predicate on the pseudonym is kept above the
//! masks (`Inexact` pushdown), so the index only narrows what is read: a stale or missing index
//! can make a lookup slow, never change its answer. The index sees raw values, never the
//! caller: nothing of it reaches a plan, a result or an error.
//!
//! The same machinery keeps the subjects of each pseudonymized column that a scan reads with
//! their digests (`digests.rs`), read in the background once per file listing, so that the next
//! stream of those subjects under the same key computes no HMAC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::compute::{cast, concat, sort_to_indices};
use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, DataFusionError, Result as DFResult, ScalarValue};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{lit, Expr, Operator};
use datafusion::prelude::SessionContext;
use lakegate_catalogs::Dataset;
use object_store::{ObjectMeta, ObjectStore};
use tokio::sync::Mutex as AsyncMutex;

use crate::digests::partition_point;
use crate::masks::ProjectKey;

/// Indexes kept at once (least recently used first out). One of a million ids holds about
/// 50 MB: the pseudonyms (27 bytes each), the raw ids, and a 4-byte sort order.
const MAX_INDEXES: usize = 8;

/// Columns with more distinct values than this are not indexed (about 2.5 GB at 50 bytes each);
/// lookups on them compute every row's pseudonym, as without an index.
const MAX_INDEXED_KEYS: usize = 50_000_000;

/// How long a column's known subjects are trusted before its file listing is checked again.
const RECHECK: Duration = Duration::from_secs(5);

/// Columns whose subjects were read for their digests, remembered at once.
const MAX_WARMED: usize = 32;

/// The engine's pseudonym indexes, shared by every caller's governed tables.
pub(crate) struct PseudonymIndexes {
    store: Arc<dyn ObjectStore>,
    /// A state without cached file listings: an index is at least as new as the listing it is
    /// stored with.
    uncached: SessionState,
    known: AsyncMutex<Vec<Known>>,
    /// Columns whose subjects' digests are known, with the listing they were read from.
    warmed: Mutex<Vec<Warmed>>,
    /// One column's subjects are read at a time, in the background.
    warming: AtomicBool,
}

struct Warmed {
    dataset: String,
    column: String,
    key: ProjectKey,
    files: Vec<ObjectMeta>,
    checked: Instant,
}

/// Clears the flag it holds when the background read ends, however it ends.
struct Warming<'a>(&'a AtomicBool);

impl Drop for Warming<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for PseudonymIndexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PseudonymIndexes")
    }
}

struct Known {
    dataset: String,
    column: String,
    /// The mask over the raw column, its project key inside: a rotated key is another index.
    mask: Expr,
    files: Vec<ObjectMeta>,
    index: Option<Arc<Index>>,
}

/// Raw keys sorted by their pseudonyms.
struct Index {
    pseudonyms: StringArray,
    raw: StringArray,
    order: UInt32Array,
}

impl Index {
    fn raw_keys(&self, pseudonym: &str, into: &mut Vec<String>) {
        let at = |i: usize| self.pseudonyms.value(self.order.value(i) as usize);
        let start = partition_point(self.order.len(), |i| at(i) < pseudonym);
        let mut i = start;
        // Two raw keys share a 96-bit pseudonym only by collision; both are kept if they do.
        while i < self.order.len() && at(i) == pseudonym {
            let row = self.order.value(i) as usize;
            if self.raw.is_valid(row) {
                into.push(self.raw.value(row).to_string());
            }
            i += 1;
        }
    }
}

/// A caller's predicate that names pseudonyms of one column: `column = 'literal'` (either way
/// round) or `column IN ('a', 'b', …)`.
pub(crate) fn named_pseudonyms(f: &Expr) -> Option<(&Column, Vec<&str>)> {
    fn text(e: &Expr) -> Option<&str> {
        match e {
            Expr::Literal(
                ScalarValue::Utf8(Some(s))
                | ScalarValue::Utf8View(Some(s))
                | ScalarValue::LargeUtf8(Some(s)),
                _,
            ) => Some(s.as_str()),
            _ => None,
        }
    }
    match f {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => match (b.left.as_ref(), b.right.as_ref()) {
            (Expr::Column(c), v) | (v, Expr::Column(c)) => Some((c, vec![text(v)?])),
            _ => None,
        },
        Expr::InList(l) if !l.negated => match l.expr.as_ref() {
            Expr::Column(c) => Some((c, l.list.iter().map(text).collect::<Option<_>>()?)),
            _ => None,
        },
        _ => None,
    }
}

impl PseudonymIndexes {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, uncached: SessionState) -> Self {
        Self {
            store,
            uncached,
            known: AsyncMutex::new(Vec::new()),
            warmed: Mutex::new(Vec::new()),
            warming: AtomicBool::new(false),
        }
    }

    /// Makes the subjects of a pseudonymized column known with their digests under the mask's
    /// key, in the background, if they are not known yet or the listing they were read from may
    /// have changed. A scan never waits for it: until it is done, streams compute HMACs.
    pub(crate) fn warm(
        self: &Arc<Self>,
        dataset: &Arc<Dataset>,
        raw: &Arc<dyn TableProvider>,
        column: &str,
        mask: &Expr,
    ) {
        let Some(key) = crate::masks::pseudonym_key(mask) else {
            return;
        };
        let fresh = self
            .warmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|w| {
                w.dataset == dataset.name
                    && w.column == column
                    && w.key == *key
                    && w.checked.elapsed() < RECHECK
            });
        if fresh || self.warming.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, dataset, raw) = (Arc::clone(self), Arc::clone(dataset), Arc::clone(raw));
        let (column, key) = (column.to_string(), key.clone());
        tokio::spawn(async move {
            let _warming = Warming(&this.warming);
            if let Err(e) = this.warm_now(&dataset, &raw, &column, key).await {
                tracing::warn!(dataset = %dataset.name, column, error = %e, "subjects not read; streams compute every pseudonym");
            }
        });
    }

    async fn warm_now(
        &self,
        dataset: &Dataset,
        raw: &Arc<dyn TableProvider>,
        column: &str,
        key: ProjectKey,
    ) -> crate::Result<()> {
        let files = dataset.file_versions(&self.store).await?;
        let same = |w: &Warmed| w.dataset == dataset.name && w.column == column && w.key == key;
        {
            let mut warmed = self.warmed.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = warmed.iter_mut().find(|w| same(w)) {
                if w.files == files {
                    w.checked = Instant::now();
                    return Ok(());
                }
            }
        }
        let ids = self.distinct(raw, column).await?;
        if let Some(ids) = ids {
            let key = key.clone();
            tokio::task::spawn_blocking(move || crate::digests::remember(&key, &ids))
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
        }
        let mut warmed = self.warmed.lock().unwrap_or_else(|e| e.into_inner());
        warmed.retain(|w| !same(w));
        if warmed.len() >= MAX_WARMED {
            warmed.remove(0);
        }
        warmed.push(Warmed {
            dataset: dataset.name.clone(),
            column: column.to_string(),
            key,
            files,
            checked: Instant::now(),
        });
        Ok(())
    }

    /// The distinct values of a raw column, read from the lake as it is now.
    fn distinct_ids(
        &self,
        raw: &Arc<dyn TableProvider>,
        column: &str,
    ) -> DFResult<datafusion::dataframe::DataFrame> {
        let key = Expr::Column(Column::new_unqualified(column));
        SessionContext::new_with_state(self.uncached.clone())
            .read_table(Arc::clone(raw))?
            .select(vec![key])?
            .distinct()
    }

    /// The distinct values of a raw column as text, `None` past `MAX_INDEXED_KEYS`.
    async fn distinct(
        &self,
        raw: &Arc<dyn TableProvider>,
        column: &str,
    ) -> crate::Result<Option<StringArray>> {
        let batches = self.distinct_ids(raw, column)?.collect().await?;
        if batches.iter().map(|b| b.num_rows()).sum::<usize>() > MAX_INDEXED_KEYS {
            return Ok(None);
        }
        Ok(Some(text_column(&batches, 0)?))
    }

    /// The predicate over the raw column that keeps every row whose pseudonym is one of
    /// `pseudonyms`: `raw IN (keys)`, `false` when no key has one, `None` when there is no
    /// index for this column (too many keys, or it could not be built: see the log).
    pub(crate) async fn raw_predicate(
        &self,
        dataset: &Dataset,
        raw: &Arc<dyn TableProvider>,
        column: &str,
        mask: &Expr,
        pseudonyms: &[&str],
    ) -> Option<Expr> {
        let index = match self.index(dataset, raw, column, mask).await {
            Ok(index) => index?,
            Err(e) => {
                tracing::warn!(dataset = %dataset.name, column, error = %e, "pseudonym index not built; lookups scan every row");
                return None;
            }
        };
        let mut keys = Vec::new();
        for p in pseudonyms {
            index.raw_keys(p, &mut keys);
        }
        keys.sort();
        keys.dedup();
        let view = matches!(
            raw.schema()
                .field_with_name(column)
                .map(|f| f.data_type().clone()),
            Ok(DataType::Utf8View)
        );
        let column = Expr::Column(Column::new_unqualified(column));
        Some(if keys.is_empty() {
            lit(false)
        } else {
            let list = keys
                .into_iter()
                .map(|k| {
                    lit(if view {
                        ScalarValue::Utf8View(Some(k))
                    } else {
                        ScalarValue::Utf8(Some(k))
                    })
                })
                .collect();
            column.in_list(list, false)
        })
    }

    async fn index(
        &self,
        dataset: &Dataset,
        raw: &Arc<dyn TableProvider>,
        column: &str,
        mask: &Expr,
    ) -> crate::Result<Option<Arc<Index>>> {
        let files = dataset.file_versions(&self.store).await?;
        let mut known = self.known.lock().await;
        if let Some(at) = known
            .iter()
            .position(|k| k.dataset == dataset.name && k.column == column && k.mask == *mask)
        {
            let k = known.remove(at);
            if k.files == files {
                let index = k.index.clone();
                known.push(k);
                return Ok(index);
            }
        }
        let index = self.build(raw, column, mask).await?.map(Arc::new);
        if known.len() >= MAX_INDEXES {
            known.remove(0);
        }
        known.push(Known {
            dataset: dataset.name.clone(),
            column: column.to_string(),
            mask: mask.clone(),
            files,
            index: index.clone(),
        });
        Ok(index)
    }

    /// Every distinct raw key of the column with its pseudonym, sorted by pseudonym.
    async fn build(
        &self,
        raw: &Arc<dyn TableProvider>,
        column: &str,
        mask: &Expr,
    ) -> crate::Result<Option<Index>> {
        let key = Expr::Column(Column::new_unqualified(column));
        let batches = self
            .distinct_ids(raw, column)?
            .select(vec![key, mask.clone().alias("pseudonym")])?
            .collect()
            .await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows > MAX_INDEXED_KEYS {
            return Ok(None);
        }
        let raw = text_column(&batches, 0)?;
        let pseudonyms = text_column(&batches, 1)?;
        let order = sort_to_indices(&pseudonyms, None, None).map_err(DataFusionError::from)?;
        Ok(Some(Index {
            pseudonyms,
            raw,
            order,
        }))
    }
}

/// Column `i` of `batches`, as one `Utf8` array.
fn text_column(batches: &[RecordBatch], i: usize) -> DFResult<StringArray> {
    let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(i).as_ref()).collect();
    let whole: ArrayRef = if parts.is_empty() {
        Arc::new(StringArray::from(Vec::<Option<&str>>::new()))
    } else {
        concat(&parts)?
    };
    Ok(cast(&whole, &DataType::Utf8)?.as_string::<i32>().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_equality_and_in_lists_of_text_only() {
        let c = || Expr::Column(Column::new_unqualified("patient_id"));
        let eq = c().eq(lit("ps_1"));
        let (col, v) = named_pseudonyms(&eq).unwrap();
        assert_eq!((col.name.as_str(), v), ("patient_id", vec!["ps_1"]));
        assert!(named_pseudonyms(&lit("ps_2").eq(c())).is_some());
        let list = c().in_list(vec![lit("a"), lit("b")], false);
        let (_, v) = named_pseudonyms(&list).unwrap();
        assert_eq!(v, vec!["a", "b"]);
        assert!(named_pseudonyms(&c().in_list(vec![lit("a")], true)).is_none());
        assert!(named_pseudonyms(&c().not_eq(lit("a"))).is_none());
        assert!(named_pseudonyms(&c().eq(lit(1))).is_none());
        assert!(named_pseudonyms(&c().in_list(vec![lit("a"), c()], false)).is_none());
    }

    #[test]
    fn finds_every_raw_key_of_a_pseudonym() {
        let index = Index {
            pseudonyms: StringArray::from(vec!["ps_b", "ps_a", "ps_c", "ps_b"]),
            raw: StringArray::from(vec!["2", "1", "3", "4"]),
            order: sort_to_indices(
                &StringArray::from(vec!["ps_b", "ps_a", "ps_c", "ps_b"]),
                None,
                None,
            )
            .unwrap(),
        };
        let mut keys = Vec::new();
        index.raw_keys("ps_b", &mut keys);
        keys.sort();
        assert_eq!(keys, vec!["2", "4"]);
        keys.clear();
        index.raw_keys("ps_z", &mut keys);
        index.raw_keys("ps_", &mut keys);
        assert!(keys.is_empty());
        index.raw_keys("ps_a", &mut keys);
        assert_eq!(keys, vec!["1"]);
    }
}
