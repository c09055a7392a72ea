//! The contract's value rules, applied to decoded rows.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use regex::Regex;

use super::decode::{Chunk, Failure};
use crate::model::{ColumnDef, Dataset, Shape};
use crate::{Catalog, CatalogError, Result};

/// Keys hash with foldhash (randomly seeded per set): SipHash was the ingest's largest single
/// cost, and a set seeded at random gives a feed no collisions to aim for.
type Keys<K> = HashSet<K, foldhash::fast::RandomState>;

/// A set of strings kept in one growing buffer: the table holds each key's hash and place,
/// so inserting allocates nothing per key and growing the table rehashes nothing. Exact: a
/// hash match is confirmed by comparing the bytes.
#[derive(Clone, Default)]
struct TextKeys {
    hasher: foldhash::fast::RandomState,
    table: hashbrown::HashTable<Slot>,
    bytes: Vec<u8>,
}

/// A key's hash, and its start (high 40 bits) and length (low 24 bits) in the buffer.
#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    place: u64,
}

const LEN_BITS: u32 = 24;

impl Slot {
    fn range(self) -> std::ops::Range<usize> {
        let start = (self.place >> LEN_BITS) as usize;
        start..start + (self.place & ((1 << LEN_BITS) - 1)) as usize
    }
}

impl TextKeys {
    fn hash(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key.as_bytes())
    }

    fn contains(&self, key: &str) -> bool {
        let hash = self.hash(key);
        self.table
            .find(hash, |s| {
                s.hash == hash && &self.bytes[s.range()] == key.as_bytes()
            })
            .is_some()
    }

    /// Add a key; false when it was there already.
    fn insert(&mut self, key: &str) -> bool {
        let hash = self.hash(key);
        let bytes = &self.bytes;
        match self.table.entry(
            hash,
            |s| s.hash == hash && &bytes[s.range()] == key.as_bytes(),
            |s| s.hash,
        ) {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                // Keys are identifiers: far below 16 MiB each, and 1 TiB of them in all.
                assert!(key.len() < 1 << LEN_BITS, "a key longer than 16 MiB");
                let place = ((self.bytes.len() as u64) << LEN_BITS) | key.len() as u64;
                slot.insert(Slot { hash, place });
                self.bytes.extend_from_slice(key.as_bytes());
                true
            }
        }
    }

    fn reserve(&mut self, additional: usize) {
        self.table.reserve(additional, |s| s.hash);
    }
}

/// The values a key column holds (for `unique` and `references`).
#[derive(Clone)]
enum KeySet {
    Text(TextKeys),
    Number(Keys<i64>),
}

impl KeySet {
    fn for_column(c: &ColumnDef) -> Self {
        match c.data_type.to_arrow() {
            DataType::Utf8 => KeySet::Text(TextKeys::default()),
            _ => KeySet::Number(Keys::default()),
        }
    }

    fn contains(&self, v: &Value) -> bool {
        match (self, v) {
            (KeySet::Text(s), Value::Text(t)) => s.contains(t),
            (KeySet::Number(s), Value::Number { key, .. }) => s.contains(key),
            (KeySet::Number(s), Value::Bool(b)) => s.contains(&i64::from(*b)),
            _ => false,
        }
    }

    /// Add a value; false when it was there already.
    fn insert(&mut self, v: &Value) -> bool {
        match (self, v) {
            (KeySet::Text(s), Value::Text(t)) => s.insert(t),
            (KeySet::Number(s), Value::Number { key, .. }) => s.insert(*key),
            (KeySet::Number(s), Value::Bool(b)) => s.insert(i64::from(*b)),
            _ => true,
        }
    }

    fn reserve(&mut self, additional: usize) {
        match self {
            KeySet::Text(s) => s.reserve(additional),
            KeySet::Number(s) => s.reserve(additional),
        }
    }

    fn add_array(&mut self, array: &ArrayRef) {
        let view = View::of(array);
        for i in 0..array.len() {
            let v = view.get(i);
            self.insert(&v);
        }
    }
}

/// One value of a column, as the rules compare it.
enum Value<'a> {
    Null,
    Text(&'a str),
    /// `cmp` for ranges; `key` identifies the value exactly (the bits of a float).
    Number {
        cmp: f64,
        key: i64,
    },
    Bool(bool),
}

/// A column downcast once per batch.
enum View<'a> {
    Text(&'a arrow::array::StringArray),
    Bool(&'a BooleanArray),
    Int32(&'a arrow::array::PrimitiveArray<Int32Type>),
    Int64(&'a arrow::array::PrimitiveArray<Int64Type>),
    Float64(&'a arrow::array::PrimitiveArray<Float64Type>),
    Date32(&'a arrow::array::PrimitiveArray<Date32Type>),
    Timestamp(&'a arrow::array::PrimitiveArray<TimestampMicrosecondType>),
}

impl<'a> View<'a> {
    fn of(array: &'a ArrayRef) -> Self {
        match array.data_type() {
            DataType::Utf8 => View::Text(array.as_string::<i32>()),
            DataType::Boolean => View::Bool(array.as_boolean()),
            DataType::Int32 => View::Int32(array.as_primitive()),
            DataType::Int64 => View::Int64(array.as_primitive()),
            DataType::Float64 => View::Float64(array.as_primitive()),
            DataType::Date32 => View::Date32(array.as_primitive()),
            DataType::Timestamp(..) => View::Timestamp(array.as_primitive()),
            other => unreachable!("the catalog has no {other} columns"),
        }
    }

    fn get(&self, i: usize) -> Value<'a> {
        let null = match self {
            View::Text(a) => a.is_null(i),
            View::Bool(a) => a.is_null(i),
            View::Int32(a) => a.is_null(i),
            View::Int64(a) => a.is_null(i),
            View::Float64(a) => a.is_null(i),
            View::Date32(a) => a.is_null(i),
            View::Timestamp(a) => a.is_null(i),
        };
        if null {
            return Value::Null;
        }
        let int = |v: i64| Value::Number {
            cmp: v as f64,
            key: v,
        };
        match self {
            View::Text(a) => Value::Text(a.value(i)),
            View::Bool(a) => Value::Bool(a.value(i)),
            View::Int32(a) => int(i64::from(a.value(i))),
            View::Int64(a) => int(a.value(i)),
            View::Float64(a) => {
                let v = a.value(i);
                Value::Number {
                    cmp: v,
                    key: v.to_bits() as i64,
                }
            }
            View::Date32(a) => int(i64::from(a.value(i))),
            View::Timestamp(a) => int(a.value(i)),
        }
    }
}

struct Rules {
    index: usize,
    nullable: bool,
    allowed: Option<Keys<String>>,
    min: Option<(f64, String)>,
    max: Option<(f64, String)>,
    regex: Option<Regex>,
    shape: Option<(Shape, Regex)>,
    unique: Option<KeySet>,
    references: Option<(String, Arc<KeySet>)>,
}

/// Key sets read from (or, after a commit, known to equal) a column of a dataset's files,
/// shared by the feeds of one process: `references` checks of later feeds that name the same
/// column of the same files, and the `unique` keys of the next feed into the same dataset (the
/// demo's feeds). Dropped with the last feed that holds it.
#[derive(Default)]
pub struct KeyCache {
    sets: std::sync::Mutex<std::collections::HashMap<String, Arc<KeySet>>>,
}

impl KeyCache {
    fn get(&self, id: &str) -> Option<Arc<KeySet>> {
        self.sets.lock().ok()?.get(id).cloned()
    }

    fn put(&self, id: String, keys: &Arc<KeySet>) {
        if let Ok(mut sets) = self.sets.lock() {
            sets.insert(id, Arc::clone(keys));
        }
    }

    /// Take a set to extend it (copied if a reader still holds it).
    fn take(&self, id: &str) -> Option<KeySet> {
        let keys = self.sets.lock().ok()?.remove(id)?;
        Some(Arc::try_unwrap(keys).unwrap_or_else(|shared| (*shared).clone()))
    }
}

/// What identifies the contents of `column` of `dataset` as it is now: its data files.
async fn contents_id(lake: &crate::Lake, dataset: &Dataset, column: &str) -> Result<String> {
    // Equal file lists (path, size, entity tag) mean equal contents.
    let files = dataset.file_versions(&lake.store()).await?;
    let mut id = format!("{}\n{column}", dataset.name);
    for f in &files {
        id.push_str(&format!("\n{}:{}:{:?}", f.location, f.size, f.e_tag));
    }
    Ok(id)
}

/// The keys of `column` in `referenced`'s files, from `cache` when it read the same files.
async fn referenced_keys(
    lake: &crate::Lake,
    referenced: &Dataset,
    column: &str,
    c: &ColumnDef,
    cache: Option<&KeyCache>,
) -> Result<Arc<KeySet>> {
    let id = contents_id(lake, referenced, column).await?;
    if let Some(keys) = cache.and_then(|c| c.get(&id)) {
        return Ok(keys);
    }
    let mut keys = KeySet::for_column(c);
    load_keys(lake, referenced, column, &mut keys).await?;
    let keys = Arc::new(keys);
    if let Some(cache) = cache {
        cache.put(id, &keys);
    }
    Ok(keys)
}

/// Every rule of one dataset's contract, with the keys it already holds.
pub(super) struct Checker {
    rules: Vec<Rules>,
}

impl Checker {
    /// Compile the rules and read the keys that `unique` and `references` compare with from
    /// the lake (the dataset's own files and the referenced datasets').
    pub async fn new(
        catalog: &Catalog,
        dataset: &Dataset,
        lake: &crate::Lake,
        cache: Option<&KeyCache>,
    ) -> Result<Self> {
        let mut rules = Vec::new();
        for (index, c) in dataset.columns.iter().enumerate() {
            let k = &c.checks;
            let bound = |b: &Option<crate::Bound>| -> Result<Option<(f64, String)>> {
                b.as_ref()
                    .map(|b| {
                        c.bound(b).map(|v| (v, b.to_string())).map_err(|reason| {
                            CatalogError::InvalidEntry {
                                dataset: dataset.name.clone(),
                                reason,
                            }
                        })
                    })
                    .transpose()
            };
            let compile = |r: &str| {
                Regex::new(r).map_err(|e| CatalogError::InvalidEntry {
                    dataset: dataset.name.clone(),
                    reason: format!("column '{}': regex does not compile: {e}", c.name),
                })
            };
            let unique = if k.unique {
                let id = contents_id(lake, dataset, &c.name).await?;
                match cache.and_then(|cache| cache.take(&id)) {
                    Some(keys) => Some(keys),
                    None => {
                        let mut keys = KeySet::for_column(c);
                        load_keys(lake, dataset, &c.name, &mut keys).await?;
                        Some(keys)
                    }
                }
            } else {
                None
            };
            let references = match &k.references {
                Some(target) => {
                    let (name, column) = target.rsplit_once('.').unwrap_or_default();
                    let referenced =
                        catalog
                            .dataset(name)
                            .ok_or_else(|| CatalogError::InvalidEntry {
                                dataset: dataset.name.clone(),
                                reason: format!(
                                    "column '{}' references unknown '{target}'",
                                    c.name
                                ),
                            })?;
                    let keys = referenced_keys(lake, referenced, column, c, cache).await?;
                    Some((target.clone(), keys))
                }
                None => None,
            };
            rules.push(Rules {
                index,
                nullable: c.nullable,
                allowed: k.allowed.as_ref().map(|a| a.iter().cloned().collect()),
                min: bound(&k.min)?,
                max: bound(&k.max)?,
                regex: k
                    .regex
                    .as_deref()
                    .map(|r| compile(&format!("^(?:{r})$")))
                    .transpose()?,
                shape: k
                    .shape
                    .map(|s| compile(s.pattern()).map(|r| (s, r)))
                    .transpose()?,
                unique,
                references,
            });
        }
        Ok(Self { rules })
    }

    /// After the feed that this checker checked was committed: its `unique` key sets hold
    /// exactly the keys of the dataset's new version, for the next feed of this process.
    pub async fn keep_unique_keys(
        self,
        lake: &crate::Lake,
        dataset: &Dataset,
        cache: &KeyCache,
    ) -> Result<()> {
        for r in self.rules {
            if let Some(keys) = r.unique {
                let column = &dataset.columns[r.index].name;
                let id = contents_id(lake, dataset, column).await?;
                cache.put(id, &Arc::new(keys));
            }
        }
        Ok(())
    }

    /// Make room in the `unique` key sets for about `rows` more keys.
    pub fn expect_rows(&mut self, rows: usize) {
        for keys in self.rules.iter_mut().filter_map(|r| r.unique.as_mut()) {
            keys.reserve(rows);
        }
    }

    /// Add to `chunk.failures` what each row breaks. A row that keeps every other rule claims
    /// its unique keys, so the first of two duplicates is accepted and the second is not.
    pub fn check(&mut self, chunk: &mut Chunk) {
        let batch: &RecordBatch = &chunk.batch;
        for r in &mut self.rules {
            let view = View::of(batch.column(r.index));
            for (i, failures) in chunk.failures.iter_mut().enumerate() {
                if failures
                    .iter()
                    .any(|f| f.column == Some(r.index) || f.column.is_none())
                {
                    continue;
                }
                let v = view.get(i);
                let mut fail = |rule: &'static str, reason: String| {
                    failures.push(Failure {
                        column: Some(r.index),
                        rule,
                        reason,
                    })
                };
                if let Value::Null = v {
                    if !r.nullable {
                        fail(
                            "not_null",
                            "empty in a column that must have a value".into(),
                        );
                    }
                    continue;
                }
                if let (Some(allowed), Value::Text(t)) = (&r.allowed, &v) {
                    if !allowed.contains(*t) {
                        fail(
                            "allowed",
                            format!("not one of the {} allowed values", allowed.len()),
                        );
                    }
                }
                if let Value::Number { cmp, .. } = v {
                    if let Some((min, text)) = &r.min {
                        if cmp < *min {
                            fail("min", format!("below the minimum {text}"));
                        }
                    }
                    if let Some((max, text)) = &r.max {
                        if cmp > *max {
                            fail("max", format!("above the maximum {text}"));
                        }
                    }
                }
                if let Value::Text(t) = v {
                    if let Some(re) = &r.regex {
                        if !re.is_match(t) {
                            fail("regex", "does not match the contract's pattern".into());
                        }
                    }
                    if let Some((shape, re)) = &r.shape {
                        if !re.is_match(t) {
                            fail(
                                "shape",
                                format!("not shaped like a {} code", shape_name(*shape)),
                            );
                        }
                    }
                }
                if let Some((target, keys)) = &r.references {
                    if !keys.contains(&v) {
                        fail("references", format!("not found in {target}"));
                    }
                }
            }
        }
        // Row by row, in file order: the first of two duplicates is the one accepted.
        let unique: Vec<(usize, View)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.unique.is_some())
            .map(|(k, r)| (k, View::of(batch.column(r.index))))
            .collect();
        if unique.is_empty() {
            return;
        }
        for (i, failures) in chunk.failures.iter_mut().enumerate() {
            if !failures.is_empty() {
                continue;
            }
            if let [(k, view)] = unique.as_slice() {
                // One key column: claiming the key is the check.
                let r = &mut self.rules[*k];
                let v = view.get(i);
                let keys = r.unique.as_mut().expect("unique rule");
                if !matches!(v, Value::Null) && !keys.insert(&v) {
                    failures.push(Failure {
                        column: Some(r.index),
                        rule: "unique",
                        reason: "a key the dataset or this feed already holds".into(),
                    });
                }
                continue;
            }
            for (k, view) in &unique {
                let r = &self.rules[*k];
                let v = view.get(i);
                let keys = r.unique.as_ref().expect("unique rule");
                if !matches!(v, Value::Null) && keys.contains(&v) {
                    failures.push(Failure {
                        column: Some(r.index),
                        rule: "unique",
                        reason: "a key the dataset or this feed already holds".into(),
                    });
                }
            }
            if failures.is_empty() {
                for (k, view) in &unique {
                    let keys = self.rules[*k].unique.as_mut().expect("unique rule");
                    keys.insert(&view.get(i));
                }
            }
        }
    }
}

fn shape_name(s: Shape) -> &'static str {
    match s {
        Shape::Icd10 => "ICD-10",
        Shape::Loinc => "LOINC",
        Shape::Zip5 => "5-digit ZIP",
    }
}

/// Read one column of a dataset's Parquet files into `keys`.
async fn load_keys(
    lake: &crate::Lake,
    dataset: &Dataset,
    column: &str,
    keys: &mut KeySet,
) -> Result<()> {
    let store = &lake.store();
    let decryption = if dataset.encrypted {
        Some(crate::keys::load(lake, &dataset.name).await?.decryption())
    } else {
        None
    };
    let corrupt = |reason: String| CatalogError::CorruptFile {
        dataset: dataset.name.clone(),
        reason,
    };
    for path in dataset.files(store).await? {
        // One file at a time, whole: curated parts are written in bounded sizes.
        let bytes = store.get(&path).await?.bytes().await?;
        let unreadable = |e: parquet::errors::ParquetError| corrupt(format!("{path}: {e}"));
        let mut options = parquet::arrow::arrow_reader::ArrowReaderOptions::new();
        if let Some(d) = &decryption {
            options = options.with_file_decryption_properties(Arc::clone(d));
        }
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options)
            .map_err(unreadable)?;
        keys.reserve(builder.metadata().file_metadata().num_rows().max(0) as usize);
        let mask = ProjectionMask::columns(builder.parquet_schema(), [column]);
        for batch in builder.with_projection(mask).build().map_err(unreadable)? {
            let batch = batch.map_err(|e| corrupt(format!("{path}: {e}")))?;
            if batch.num_columns() == 1 {
                keys.add_array(batch.column(0));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keys_are_exact_through_growth() {
        let mut keys = TextKeys::default();
        let all: Vec<String> = (0..100_000).map(|i| format!("P{i:08}")).collect();
        for k in &all {
            assert!(keys.insert(k), "{k} is new");
        }
        // Regrown many times without rehashing a string: every key still found, once.
        for k in &all {
            assert!(keys.contains(k));
            assert!(!keys.insert(k), "{k} is a duplicate");
        }
        for absent in ["", "P", "P0000000", "P000000000", "P00100000", "p00000001"] {
            assert!(!keys.contains(absent), "{absent}");
        }
        // Empty and multi-byte keys, and keys that are prefixes of others.
        for k in ["", "é", "éé", "P0000000"] {
            assert!(keys.insert(k));
            assert!(keys.contains(k));
        }
        assert_eq!(keys.table.len(), 100_004);
        let mut sized = TextKeys::default();
        sized.reserve(1000);
        assert!(sized.insert("a") && !sized.insert("a") && sized.contains("a"));
    }
}
