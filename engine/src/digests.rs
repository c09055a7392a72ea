//! Subject digests: the keyed HMAC of a subject id that its pseudonym and date shifts are cut
//! from, computed once per run of a batch, and not computed again for subjects that a table of
//! known subjects under the same key already holds.
//!
//! A stream of a million patients costs a million HMACs (about 170 ns each here, with the CPU's
//! SHA extensions) every time it runs. Subjects the engine has indexed under a key (see
//! `lookup.rs`: the distinct ids of a pseudonymized column, built once per file listing) are
//! kept here sorted, with their digests, so a later stream reads each run's digest by walking
//! the table in step with its ids (about 30 ns when the stream comes in id order, as the lake's
//! files are written). A hash map from id to digest was measured too and lost: at a million
//! ids every lookup misses the CPU caches and costs more than the HMAC it saves
//! (`cargo bench -p lakegate-benches --bench masks`, group `subject_digest`).
//!
//! The table is a cache of a pure function of (key, id): it holds no caller, no row and no
//! policy, so it cannot change an answer. A rotated key is another table; consent withdrawal
//! removes rows before any mask sees them.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::ops::Range;
use std::rc::Rc;
use std::sync::{Arc, RwLock, Weak};

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::common::Result as DFResult;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::strings::Strings;

type HmacSha256 = Hmac<Sha256>;

/// A 32-byte secret of one project: pseudonyms and date shifts are stable within a project and
/// unrelated across projects.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProjectKey(pub [u8; 32]);

impl std::fmt::Debug for ProjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProjectKey(<redacted>)")
    }
}

impl ProjectKey {
    fn mac(&self, domain: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("any key length");
        m.update(domain);
        m
    }
}

/// A subject id's keyed digest, `HMAC-SHA256(project key, "pseudonym\0" || id)`: its first 12
/// bytes are the id's pseudonym, its last 16 the subject's date and time shifts. (The domain is
/// named for the pseudonym, which it served alone first; it stays so pseudonyms stay stable.)
pub(crate) type Digest = [u8; 32];
const SUBJECT_DOMAIN: &[u8] = b"pseudonym\0";

/// One digest per run of equal subject ids, `None` for a run of nulls.
pub(crate) type RunDigests = Rc<[(Range<usize>, Option<Digest>)]>;

/// How many subject columns a thread remembers the digests of.
const DIGEST_CACHE_LEN: usize = 4;

/// Tables of known subjects kept at once (one per project key; the least recently built goes
/// first). Each costs about 45 bytes per subject: the id, its offset and its digest.
const MAX_TABLES: usize = 4;

/// A table grows by the subjects of each column indexed under its key, up to this many ids
/// (about 2.2 GB); past it, the newest column's subjects replace the table.
const MAX_TABLE_IDS: usize = 50_000_000;

/// A walk that has to search the whole table for more than one run in this many (a stream not
/// in id order) stops using the table for the rest of the batch: a search that misses the
/// caches costs more than the HMAC.
const SEARCHES_PER_HIT: usize = 4;

thread_local! {
    /// The digests of the subject columns this thread met last. A projection evaluates its
    /// expressions one after another on one thread, so the pseudonym of `patient_id` and every
    /// date shift keyed on it read the same array of the same batch: one digest per patient
    /// serves them all. Entries hold a weak reference to the array: it keeps the allocation's
    /// address from being reused (so an equal pointer is the same array, the same values)
    /// without keeping its buffers alive.
    static DIGESTS: RefCell<Vec<KnownDigests>> = const { RefCell::new(Vec::new()) };
}

/// The digests of one subject array under one project key.
struct KnownDigests {
    key: ProjectKey,
    subjects: Weak<dyn Array>,
    digests: RunDigests,
}

/// Known subjects of one key: distinct ids in ascending byte order, each with its digest.
struct SubjectTable {
    key: ProjectKey,
    ids: StringArray,
    digests: Vec<Digest>,
}

static TABLES: RwLock<Vec<Arc<SubjectTable>>> = RwLock::new(Vec::new());

#[cfg(test)]
thread_local! {
    /// HMACs computed on this thread, for tests.
    static COMPUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn compute(base: &HmacSha256, id: &str) -> Digest {
    #[cfg(test)]
    COMPUTED.set(COMPUTED.get() + 1);
    let mut m = base.clone();
    m.update(id.as_bytes());
    Digest::from(m.finalize().into_bytes())
}

impl SubjectTable {
    /// The digest of `id`, looked for first just past `finger` (where the previous id was
    /// found), then by binary search (counted in `searches`). `finger` moves past what is found.
    fn find(&self, id: &str, finger: &mut usize, searches: &mut usize) -> Option<&Digest> {
        let n = self.ids.len();
        for i in *finger..(*finger + 4).min(n) {
            match self.ids.value(i).cmp(id) {
                Ordering::Less => continue,
                Ordering::Equal => {
                    *finger = i + 1;
                    return Some(&self.digests[i]);
                }
                Ordering::Greater => break,
            }
        }
        *searches += 1;
        let i = partition_point(n, |i| self.ids.value(i) < id);
        *finger = i;
        (i < n && self.ids.value(i) == id).then(|| {
            *finger = i + 1;
            &self.digests[i]
        })
    }
}

/// The first of `0..len` for which `before` is false (`before` holds for a prefix).
pub(crate) fn partition_point(len: usize, before: impl Fn(usize) -> bool) -> usize {
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

fn table_of(key: &ProjectKey) -> Option<Arc<SubjectTable>> {
    let tables = TABLES.read().unwrap_or_else(|e| e.into_inner());
    tables.iter().find(|t| t.key == *key).cloned()
}

/// Keeps the digests of `ids` (any order, nulls and repeats allowed) under `key`, with those
/// already known under it, so that streams of these subjects under this key compute no HMAC.
pub(crate) fn remember(key: &ProjectKey, ids: &StringArray) {
    let known = table_of(key);
    let mut all: Vec<&str> = ids.iter().flatten().collect();
    if let Some(t) = &known {
        if all.len() + t.ids.len() <= MAX_TABLE_IDS {
            all.extend(t.ids.iter().flatten());
        }
    }
    all.sort_unstable();
    all.dedup();
    if all.len() > MAX_TABLE_IDS {
        return;
    }
    let base = key.mac(SUBJECT_DOMAIN);
    let (mut finger, mut searches) = (0, 0);
    let digests: Vec<Digest> = all
        .iter()
        .map(|id| {
            known
                .as_ref()
                .and_then(|t| t.find(id, &mut finger, &mut searches).copied())
                .unwrap_or_else(|| compute(&base, id))
        })
        .collect();
    let table = Arc::new(SubjectTable {
        key: key.clone(),
        ids: StringArray::from(all),
        digests,
    });
    drop(known);
    let mut tables = TABLES.write().unwrap_or_else(|e| e.into_inner());
    tables.retain(|t| t.key != *key);
    if tables.len() >= MAX_TABLES {
        tables.remove(0);
    }
    tables.push(table);
}

/// The digests of `subjects` under `key`, computed once per array and key on this thread, and
/// read from the key's table of known subjects where it has them.
pub(crate) fn subject_digests(key: &ProjectKey, subjects: &ArrayRef) -> DFResult<RunDigests> {
    let hit = DIGESTS.with_borrow(|cache| {
        cache
            .iter()
            .find(|k| {
                std::ptr::addr_eq(k.subjects.as_ptr(), Arc::as_ptr(subjects)) && k.key == *key
            })
            .map(|k| Rc::clone(&k.digests))
    });
    if let Some(digests) = hit {
        return Ok(digests);
    }
    let strings = Strings::of(subjects)?;
    let mut table = table_of(key);
    let base = key.mac(SUBJECT_DOMAIN);
    let (mut finger, mut searches, mut found) = (0, 0, 0);
    let digests: RunDigests = strings
        .runs()
        .into_iter()
        .map(|run| {
            let digest = (!strings.is_null(run.start)).then(|| {
                let id = strings.value(run.start);
                if let Some(t) = &table {
                    if let Some(d) = t.find(id, &mut finger, &mut searches) {
                        found += 1;
                        return *d;
                    }
                    if searches > 16 && searches * SEARCHES_PER_HIT > found {
                        table = None;
                    }
                }
                compute(&base, id)
            });
            (run, digest)
        })
        .collect();
    DIGESTS.with_borrow_mut(|cache| {
        if cache.len() == DIGEST_CACHE_LEN {
            cache.remove(0);
        }
        cache.push(KnownDigests {
            key: key.clone(),
            subjects: Arc::downgrade(subjects),
            digests: Rc::clone(&digests),
        });
    });
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests_of(key: &ProjectKey, ids: Vec<Option<&str>>) -> (Vec<Option<Digest>>, usize) {
        let before = COMPUTED.get();
        let a: ArrayRef = Arc::new(StringArray::from(ids));
        let runs = subject_digests(key, &a).unwrap();
        let per_row = runs
            .iter()
            .flat_map(|(r, d)| r.clone().map(move |_| *d))
            .collect();
        (per_row, COMPUTED.get() - before)
    }

    #[test]
    fn known_subjects_give_the_same_digests_without_an_hmac() {
        // A key no other test uses: the tables are shared by the whole process.
        let key = ProjectKey([41; 32]);
        let other = ProjectKey([42; 32]);
        let ids: Vec<String> = (0..500).map(|i| format!("P{i:05}")).collect();
        let mut rows: Vec<Option<&str>> = ids.iter().map(|s| Some(s.as_str())).collect();
        rows.insert(7, None);
        rows.insert(8, Some("Z-not-known"));
        rows.push(Some("P00003"));
        let (cold, cold_hmacs) = digests_of(&key, rows.clone());
        assert_eq!(cold_hmacs, 502);

        remember(&key, &StringArray::from(ids[..300].to_vec()));
        remember(&key, &StringArray::from(ids[200..].to_vec()));
        let (warm, warm_hmacs) = digests_of(&key, rows.clone());
        assert_eq!(warm, cold, "a table changes no digest");
        assert_eq!(warm_hmacs, 1, "only the unknown id is computed");

        // Out of order, the same digests (searched, or computed once the walk gives up).
        let mut shuffled = rows.clone();
        shuffled.reverse();
        let (reversed, _) = digests_of(&key, shuffled);
        let mut expected = cold.clone();
        expected.reverse();
        assert_eq!(reversed, expected);

        // Another key's subjects are not this key's: all computed, all different.
        let (theirs, their_hmacs) = digests_of(&other, rows);
        assert_eq!(their_hmacs, 502);
        assert!(theirs.iter().zip(&cold).all(|(a, b)| a.is_none() || a != b));
    }

    #[test]
    fn a_table_holds_the_subjects_of_every_column_indexed_under_its_key() {
        let key = ProjectKey([43; 32]);
        remember(&key, &StringArray::from(vec!["a", "b"]));
        remember(&key, &StringArray::from(vec![Some("c"), None, Some("a")]));
        let t = table_of(&key).unwrap();
        assert_eq!(t.ids.iter().flatten().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(t.ids.len(), t.digests.len());
    }
}
