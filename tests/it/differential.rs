//! Differential test: queries generated at random from a grammar over the demo schema give,
//! under policy, exactly what plain DataFusion gives over each table's policy view (what the
//! persona sees of the whole table) materialized to Parquet.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use lakegate_tests::TestServer;

use crate::common::{column_text, login, sql};

/// A small deterministic generator (xorshift64*): the test needs reproducible queries, not
/// cryptographic randomness.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const TABLES: &[(&str, &[&str])] = &[
    (
        "clinical.patients",
        &[
            "patient_id",
            "birth_date",
            "sex",
            "race",
            "zip",
            "state",
            "site_id",
            "research_consent",
            "ssn",
        ],
    ),
    (
        "clinical.encounters",
        &[
            "encounter_id",
            "patient_id",
            "site_id",
            "start_time",
            "encounter_class",
            "payer",
            "reason_code",
            "readmitted_30d",
        ],
    ),
    (
        "clinical.conditions",
        &["patient_id", "encounter_id", "onset_date", "code"],
    ),
    (
        "clinical.observations",
        &[
            "observation_id",
            "patient_id",
            "obs_time",
            "loinc_code",
            "unit",
        ],
    ),
];

const PREDICATES: &[&str] = &[
    "sex = 'F'",
    "site_id IN ('SITE_A', 'SITE_C')",
    "encounter_class = 'inpatient'",
    "payer IS NULL",
    "reason_code LIKE 'I%'",
    "readmitted_30d",
    "code LIKE 'E%'",
    "loinc_code = '2339-0'",
    "zip = '000'",
    "state <> 'MA'",
    "birth_date < DATE '1960-01-01'",
    "start_time > TIMESTAMP '2020-01-01T00:00:00Z'",
    "onset_date >= DATE '2018-06-01'",
    "ssn IS NULL",
];

fn predicate_for(g: &mut Gen, columns: &[&str]) -> Option<String> {
    let usable: Vec<&&str> = PREDICATES
        .iter()
        .filter(|p| columns.iter().any(|c| p.starts_with(c)))
        .collect();
    (!usable.is_empty()).then(|| g.pick(&usable).to_string())
}

fn query(g: &mut Gen) -> String {
    let (table, columns) = *g.pick(TABLES);
    let mut cols: Vec<&str> = columns.iter().copied().filter(|_| g.chance(50)).collect();
    if cols.is_empty() {
        cols.push(columns[0]);
    }
    let filter = predicate_for(g, columns).filter(|_| g.chance(70));
    let where_ = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
    match g.next() % 7 {
        0 => format!("SELECT {} FROM {table}{where_}", cols.join(", ")),
        1 => {
            let key = g.pick(&cols).to_string();
            format!("SELECT {key}, count(*) AS n, count(DISTINCT patient_id) AS u FROM {table}{where_} GROUP BY {key}")
        }
        2 => format!(
            "SELECT e.encounter_class, p.sex, count(*) AS n FROM clinical.encounters e \
             JOIN clinical.patients p ON e.patient_id = p.patient_id{} GROUP BY e.encounter_class, p.sex",
            if g.chance(50) { " WHERE p.site_id = 'SITE_B'" } else { "" }
        ),
        3 => format!(
            "SELECT {} FROM {table} WHERE patient_id IN (SELECT patient_id FROM clinical.conditions WHERE code = '{}')",
            cols.join(", "),
            g.pick(&["I10", "E11.9", "J45.909", "C50.919"])
        ),
        4 => format!(
            "WITH c AS (SELECT {} FROM {table}{where_}) SELECT * FROM c",
            cols.join(", ")
        ),
        5 => format!(
            "SELECT patient_id FROM {table}{where_} UNION SELECT patient_id FROM {}",
            g.pick(TABLES).0
        ),
        _ => format!(
            "SELECT p.patient_id, p.birth_date, count(o.observation_id) AS n FROM clinical.patients p \
             LEFT JOIN clinical.observations o ON o.patient_id = p.patient_id AND o.loinc_code = '{}' \
             GROUP BY p.patient_id, p.birth_date",
            g.pick(&["8867-4", "2093-3", "4548-4"])
        ),
    }
}

/// Rows as sorted lines of text, so results compare whatever the order of arrival.
fn canonical(batches: &[RecordBatch]) -> Vec<String> {
    let Some(first) = batches.first() else {
        return Vec::new();
    };
    let columns: Vec<Vec<String>> = (0..first.num_columns())
        .map(|i| column_text(batches, i))
        .collect();
    let n = columns.first().map_or(0, Vec::len);
    let mut rows: Vec<String> = (0..n)
        .map(|r| {
            columns
                .iter()
                .map(|c| c[r].as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect();
    rows.sort();
    rows
}

#[tokio::test]
async fn governed_answers_equal_plain_datafusion_over_policy_views() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    for persona in ["alice", "carol"] {
        let mut client = login(&server, persona).await;
        // Materialize this persona's policy view of every table.
        let plain = SessionContext::new();
        plain.sql("CREATE SCHEMA clinical").await.unwrap();
        for (table, _) in TABLES {
            let batches = sql(&mut client, &format!("SELECT * FROM {table}"))
                .await
                .unwrap();
            let path = dir.path().join(format!("{persona}-{table}.parquet"));
            let file = std::fs::File::create(&path).unwrap();
            let schema = batches[0].schema();
            let mut w =
                parquet::arrow::ArrowWriter::try_new(file, Arc::clone(&schema), None).unwrap();
            for b in &batches {
                w.write(b).unwrap();
            }
            w.close().unwrap();
            plain
                .register_parquet(
                    *table,
                    path.to_str().unwrap(),
                    ParquetReadOptions::default(),
                )
                .await
                .unwrap();
        }
        let mut g = Gen(0x5EED_0000 + persona.len() as u64);
        let mut non_empty = 0;
        for i in 0..40 {
            let q = query(&mut g);
            let governed = sql(&mut client, &q)
                .await
                .unwrap_or_else(|e| panic!("{persona} #{i} {q}: {e}"));
            let expected = plain.sql(&q).await.unwrap().collect().await.unwrap();
            let rows = canonical(&governed);
            non_empty += usize::from(!rows.is_empty());
            assert_eq!(rows, canonical(&expected), "{persona} #{i}: {q}");
        }
        assert!(
            non_empty >= 25,
            "{persona}: only {non_empty} of 40 queries returned rows"
        );
    }
}

/// Columns bob sees as they are (no mask): what he may group by.
const BOB_KEYS: &[(&str, &[&str])] = &[
    (
        "clinical.patients",
        &[
            "birth_date",
            "sex",
            "race",
            "zip",
            "state",
            "site_id",
            "research_consent",
        ],
    ),
    (
        "clinical.encounters",
        &[
            "site_id",
            "start_time",
            "encounter_class",
            "payer",
            "reason_code",
            "readmitted_30d",
        ],
    ),
    ("clinical.conditions", &["onset_date", "code"]),
    ("clinical.observations", &["obs_time", "loinc_code", "unit"]),
];

/// A query of bob's kind (aggregates over patients), and the same question to plain DataFusion
/// over the raw files, where the threshold is a `HAVING` on the distinct patients of each group.
fn bob_query(g: &mut Gen) -> (String, String) {
    let (table, keys) = *g.pick(BOB_KEYS);
    let key = *g.pick(keys);
    let filter = predicate_for(g, keys)
        .filter(|_| g.chance(70))
        .map(|f| format!(" WHERE {f}"))
        .unwrap_or_default();
    let (governed, having) = match g.next() % 5 {
        0 | 1 => (
            format!("SELECT {key}, count(*) AS n, count(DISTINCT patient_id) AS u FROM {table}{filter} GROUP BY {key}"),
            "count(DISTINCT patient_id)",
        ),
        2 => (
            format!(
                "SELECT e.encounter_class, p.sex, count(*) AS n FROM clinical.encounters e \
                 JOIN clinical.patients p ON e.patient_id = p.patient_id{} \
                 GROUP BY e.encounter_class, p.sex",
                if g.chance(50) { " WHERE p.site_id = 'SITE_B'" } else { "" }
            ),
            "count(DISTINCT p.patient_id)",
        ),
        3 => (
            format!(
                "SELECT {key}, count(*) AS n FROM {table} WHERE patient_id {}IN \
                 (SELECT patient_id FROM clinical.conditions WHERE code = '{}') GROUP BY {key}",
                if g.chance(50) { "NOT " } else { "" },
                g.pick(&["I10", "E11.9", "J45.909", "C50.919", "D81.0"])
            ),
            "count(DISTINCT patient_id)",
        ),
        _ => (
            format!("SELECT count(*) AS n, count(DISTINCT patient_id) AS u FROM {table}{filter}"),
            "count(DISTINCT patient_id)",
        ),
    };
    let raw = format!(
        "{} HAVING {having} >= 11",
        governed.replace("clinical.", "clinical_")
    );
    (governed, raw)
}

/// bob's answers (aggregates under a threshold of 11 patients) equal plain DataFusion's over the
/// raw files with the threshold written as a HAVING: nothing suppressed that should be
/// released, nothing released that should not, every count exact.
#[tokio::test]
async fn bob_answers_equal_plain_datafusion_with_the_threshold_as_having() {
    let server = TestServer::start().await;
    let mut bob = login(&server, "bob").await;
    let mut g = Gen(0x5EED_0B0B);
    let (mut non_empty, mut some_suppressed) = (0, 0);
    for i in 0..40 {
        let (q, raw) = bob_query(&mut g);
        let governed = sql(&mut bob, &q)
            .await
            .unwrap_or_else(|e| panic!("bob #{i} {q}: {e}"));
        let expected = lakegate_tests::raw_query(&raw).await;
        let rows = canonical(&governed);
        non_empty += usize::from(!rows.is_empty());
        let all_groups = lakegate_tests::raw_query(&raw.replace(" >= 11", " >= 0")).await;
        some_suppressed += usize::from(canonical(&all_groups).len() > rows.len());
        assert_eq!(rows, canonical(&expected), "bob #{i}: {q}");
    }
    assert!(
        non_empty >= 25,
        "only {non_empty} of 40 queries returned rows"
    );
    assert!(
        some_suppressed >= 10,
        "only {some_suppressed} of 40 queries suppressed a group"
    );
}
