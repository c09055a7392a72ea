//! Subject sets in row filters: whether each subject id a scan reads is in a precomputed
//! set (e.g. the consenting patients), walked in the files' key order.

use std::sync::Arc;

use datafusion::arrow::array::BooleanBufferBuilder;
use datafusion::arrow::array::{ArrayRef, BooleanArray};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result as DFResult;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The keys of a subject set (e.g. the consenting patients), as bytes.
///
/// A scan asks about every subject it reads. The lake's files are written per subject in key
/// order, so the next subject a scan meets is usually the next key of the set, a step or two
/// past the previous answer: [`Members::contains`] walks forward from there, through memory it
/// has just read, and only searches when the scan jumps. A hash set would take two cache misses
/// per subject on a set of a million keys.
#[derive(Debug, Default)]
pub(crate) struct Members {
    /// Every key once, sorted, back to back; `ends[i]` is where key `i` ends.
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// For scans in no useful order, built when the first such scan asks (a key-ordered scan
    /// never does, and building it is most of the cost of a new set: one allocation per key).
    /// Keys come from the lake, never from a caller, so DataFusion's fast (foldhash) hasher is
    /// fine.
    index: std::sync::OnceLock<datafusion::common::HashSet<Box<[u8]>>>,
}

/// Where a scan is in a [`Members`] set, and whether walking forward is paying off.
#[derive(Default)]
struct Cursor {
    at: usize,
    lookups: u32,
    jumps: u32,
}

impl Members {
    pub(crate) fn new<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut keys: Vec<&[u8]> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut bytes = Vec::with_capacity(keys.iter().map(|k| k.len()).sum());
        let mut ends = Vec::with_capacity(keys.len());
        for k in &keys {
            bytes.extend_from_slice(k);
            ends.push(bytes.len());
        }
        Self {
            bytes,
            ends,
            index: std::sync::OnceLock::new(),
        }
    }

    fn index(&self) -> &datafusion::common::HashSet<Box<[u8]>> {
        self.index.get_or_init(|| {
            (0..self.ends.len())
                .map(|i| Box::from(self.key(i)))
                .collect()
        })
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    fn contains(&self, key: &[u8], cursor: &mut Cursor) -> bool {
        use std::cmp::Ordering;
        const WALK: usize = 8;
        cursor.lookups += 1;
        let n = self.ends.len();
        let mut i = cursor.at;
        if n == 0 || (i == n && self.key(n - 1) < key) {
            // Past the last key, as the previous subject was.
            return false;
        }
        if i < n {
            if self.key(i) > key {
                // Between the key before the cursor and the cursor's: not a member, and the
                // cursor stays (a run of non-members, e.g. other sites' patients).
                if i == 0 || self.key(i - 1) < key {
                    return false;
                }
            } else {
                // Walk forward only from a key at or before the one sought: then the first key
                // not below it is its place.
                let end = (i + WALK).min(n);
                while i < end {
                    match self.key(i).cmp(key) {
                        Ordering::Less => i += 1,
                        found => {
                            cursor.at = i;
                            return found == Ordering::Equal;
                        }
                    }
                }
            }
        }
        cursor.jumps += 1;
        // A scan in key order jumps once per batch or file; one that keeps jumping is in no
        // useful order, and the hash set answers it.
        if cursor.lookups > 64 && cursor.jumps * 8 > cursor.lookups {
            return self.index().contains(key);
        }
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        cursor.at = lo;
        lo < n && self.key(lo) == key
    }
}

/// Membership in a precomputed subject set (e.g. the consenting patients): the typed form of
/// `column IN (SELECT key FROM dataset WHERE ...)`, evaluated without exposing the subquery to
/// the caller's plan.
#[derive(Debug, Clone)]
pub(crate) struct InSubjectSet {
    pub(crate) set: Arc<Members>,
    signature: Signature,
}

impl PartialEq for InSubjectSet {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.set, &other.set)
    }
}
impl Eq for InSubjectSet {}
impl std::hash::Hash for InSubjectSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.set) as usize).hash(state)
    }
}

impl InSubjectSet {
    pub(crate) fn expr(set: Arc<Members>, column: Expr) -> Expr {
        ScalarUDF::from(Self {
            set,
            signature: Signature::uniform(
                1,
                vec![DataType::Utf8, DataType::Utf8View],
                Volatility::Immutable,
            ),
        })
        .call(vec![column])
    }
}

impl InSubjectSet {
    fn members(&self, strings: &crate::strings::Strings) -> BooleanBuffer {
        // One answer per run of a subject's rows (this runs on every row the scan reads).
        let mut cursor = Cursor::default();
        let mut out = BooleanBufferBuilder::new(strings.len());
        for run in strings.runs() {
            let member = !strings.is_null(run.start)
                && self
                    .set
                    .contains(strings.value(run.start).as_bytes(), &mut cursor);
            out.append_n(run.len(), member);
        }
        out.finish()
    }
}

impl ScalarUDFImpl for InSubjectSet {
    fn name(&self) -> &str {
        "lg_in_subject_set"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let members = self.members(&crate::strings::Strings::of(&arrays[0])?);
        Ok(ColumnarValue::Array(
            Arc::new(BooleanArray::new(members, None)) as ArrayRef,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("P{i:08}")).collect()
    }

    #[test]
    fn members_answer_the_same_in_any_scan_order() {
        // Even ids are members; odd ones are not, and some lie outside the set's range.
        let all = ids(0..5_000);
        let even: Vec<&[u8]> = all.iter().step_by(2).map(|s| s.as_bytes()).collect();
        let set = Members::new(even.iter().rev().copied());
        let truth = |k: &str| k[1..].parse::<u32>().unwrap() % 2 == 0;
        let mut probes: Vec<String> = ids(0..6_000);
        let check = |probes: &[String]| {
            let mut cursor = Cursor::default();
            for p in probes {
                let k = p.as_str();
                let expect = k[1..].parse::<u32>().unwrap() < 5_000 && truth(k);
                assert_eq!(set.contains(k.as_bytes(), &mut cursor), expect, "{k}");
            }
            cursor
        };
        // In key order (as the lake's files are written) and in runs: walks, a jump or two.
        let sorted = check(&probes);
        assert!(sorted.jumps <= 2, "{} jumps", sorted.jumps);
        assert!(
            set.index.get().is_none(),
            "a key-ordered scan built the hash index"
        );
        // One key in five a member (one site's patients among five): runs of non-members
        // answer from where the cursor stands.
        let fifth: Vec<&[u8]> = all.iter().step_by(5).map(|s| s.as_bytes()).collect();
        let sparse = Members::new(fifth);
        let mut cursor = Cursor::default();
        for (i, p) in all.iter().enumerate() {
            assert_eq!(
                sparse.contains(p.as_bytes(), &mut cursor),
                i % 5 == 0,
                "{p}"
            );
        }
        assert!(cursor.jumps <= 2, "{} jumps", cursor.jumps);
        // Backwards, and shuffled: every answer still right.
        probes.reverse();
        check(&probes);
        let mut state = 7u64;
        for i in (1..probes.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            probes.swap(i, (state >> 33) as usize % (i + 1));
        }
        check(&probes);
        assert!(set.index.get().is_some(), "a shuffled scan kept searching");
        // The empty key, a key before the first and after the last, an empty set.
        let mut c = Cursor::default();
        assert!(!set.contains(b"", &mut c));
        assert!(!set.contains(b"A", &mut c));
        assert!(!set.contains(b"Z", &mut c));
        assert!(!Members::new([]).contains(b"P00000000", &mut Cursor::default()));
    }
}
