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

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray, UInt32Array};
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

/// Indexes kept at once (least recently used first out). One of a million ids holds about
/// 50 MB: the pseudonyms (27 bytes each), the raw ids, and a 4-byte sort order.
const MAX_INDEXES: usize = 8;

/// Columns with more distinct values than this are not indexed (about 2.5 GB at 50 bytes each);
/// lookups on them compute every row's pseudonym, as without an index.
const MAX_INDEXED_KEYS: usize = 50_000_000;

/// The engine's pseudonym indexes, shared by every caller's governed tables.
pub(crate) struct PseudonymIndexes {
    store: Arc<dyn ObjectStore>,
    /// A state without cached file listings: an index is at least as new as the listing it is
    /// stored with.
    uncached: SessionState,
    known: AsyncMutex<Vec<Known>>,
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

fn partition_point(len: usize, before: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
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
        }
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
        let ctx = SessionContext::new_with_state(self.uncached.clone());
        let batches = ctx
            .read_table(Arc::clone(raw))?
            .select(vec![key.clone()])?
            .distinct()?
            .select(vec![key, mask.clone().alias("pseudonym")])?
            .collect()
            .await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows > MAX_INDEXED_KEYS {
            return Ok(None);
        }
        let column_of = |i: usize| -> DFResult<StringArray> {
            let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(i).as_ref()).collect();
            let whole: ArrayRef = if parts.is_empty() {
                Arc::new(StringArray::from(Vec::<Option<&str>>::new()))
            } else {
                concat(&parts)?
            };
            Ok(cast(&whole, &DataType::Utf8)?.as_string::<i32>().clone())
        };
        let raw = column_of(0)?;
        let pseudonyms = column_of(1)?;
        let order = sort_to_indices(&pseudonyms, None, None).map_err(DataFusionError::from)?;
        Ok(Some(Index {
            pseudonyms,
            raw,
            order,
        }))
    }
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
