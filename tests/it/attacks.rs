//! An analyst who wants the raw SSNs: bypass attempts, each asserting refusal or compliant
//! data. Every attempt is run through the real server with the arrow-flight client.

use arrow::array::RecordBatch;
use arrow_flight::error::FlightError;
use lakegate_tests::{raw_query, TestServer};

use crate::common::{code_of, column_text, first_i64, login, rows, sql, Client};

/// What an attempt must produce.
enum Expect {
    /// Refused with this gRPC code; the message must contain the text.
    Refused(&'static str, &'static str),
    /// Answered; the check says whether the answer is compliant.
    Answer(fn(&[RecordBatch]) -> bool),
}
use Expect::*;

fn no_rows(b: &[RecordBatch]) -> bool {
    rows(b) == 0
}
fn zero(b: &[RecordBatch]) -> bool {
    first_i64(b) == 0
}
fn all_null(b: &[RecordBatch]) -> bool {
    column_text(b, 0).iter().all(|v| v == "NULL")
}
fn nothing_looks_like_an_ssn(b: &[RecordBatch]) -> bool {
    (0..b.first().map_or(0, |b| b.num_columns()))
        .all(|i| column_text(b, i).iter().all(|v| !looks_like_ssn(v)))
}
fn pseudonyms(b: &[RecordBatch]) -> bool {
    let v = column_text(b, 0);
    !v.is_empty() && v.iter().all(|v| v.starts_with("ps_"))
}
fn second_is_pseudonym(b: &[RecordBatch]) -> bool {
    let v = column_text(b, 1);
    !v.is_empty() && v.iter().all(|v| v.starts_with("ps_"))
}
fn first_is_ps(b: &[RecordBatch]) -> bool {
    column_text(b, 0).first().is_some_and(|v| v == "ps_")
}
fn first_is_a(b: &[RecordBatch]) -> bool {
    column_text(b, 0).first().is_some_and(|v| v == "a")
}
fn any_answer(_: &[RecordBatch]) -> bool {
    true
}

pub fn looks_like_ssn(text: &str) -> bool {
    text.as_bytes().windows(11).any(|w| {
        w.iter().enumerate().all(|(i, c)| match i {
            3 | 6 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
    })
}

const ATTACKS: &[(&str, &str, Expect)] = &[
    // Predicates, ordering and grouping on masked columns see only the masked value.
    ("alice", "SELECT ssn FROM clinical.patients WHERE ssn IS NOT NULL", Answer(no_rows)),
    ("alice", "SELECT count(*) FROM clinical.patients WHERE ssn LIKE '1%'", Answer(zero)),
    ("alice", "SELECT count(*) FROM clinical.patients WHERE substr(ssn, 1, 1) = '1'", Answer(zero)),
    ("alice", "SELECT ssn FROM clinical.patients ORDER BY ssn DESC LIMIT 3", Answer(all_null)),
    ("alice", "SELECT ssn, count(*) FROM clinical.patients GROUP BY ssn", Answer(all_null)),
    ("alice", "SELECT count(*) FROM clinical.patients a JOIN clinical.patients b ON a.ssn = b.ssn", Answer(zero)),
    ("alice", "SELECT count(*) FROM clinical.patients WHERE first_name = 'José' OR last_name = 'Nguyễn'", Answer(zero)),
    ("alice", "SELECT count(*) FROM clinical.patients WHERE patient_id = 'P00000001'", Answer(zero)),
    ("alice", "SELECT count(*) FROM clinical.patients WHERE patient_id LIKE 'P%'", Answer(zero)),
    ("alice", "SELECT max(length(ssn)), max(mrn), max(email) FROM clinical.patients", Answer(all_null)),
    // Pseudonyms that are only counted are read raw (engine/src/counted.rs): any other use of
    // the same column, beside the count or on its way to it, still sees the pseudonym.
    ("alice", "SELECT count(DISTINCT patient_id) FILTER (WHERE patient_id LIKE 'P%') FROM clinical.patients", Answer(zero)),
    ("alice", "SELECT count(DISTINCT p) FROM (SELECT patient_id AS p FROM clinical.patients WHERE patient_id LIKE 'P0%') t", Answer(zero)),
    ("alice", "SELECT count(DISTINCT patient_id) AS n, max(patient_id) AS m FROM clinical.patients", Answer(second_is_pseudonym)),
    ("alice", "SELECT max(p) FROM (SELECT patient_id AS p FROM clinical.patients) t", Answer(pseudonyms)),
    ("alice", "SELECT count(DISTINCT patient_id) AS n, patient_id FROM clinical.encounters GROUP BY patient_id LIMIT 3", Answer(second_is_pseudonym)),
    // CTE, view-like, subquery and UNION routes.
    ("alice", "WITH x AS (SELECT * FROM clinical.patients) SELECT ssn FROM x WHERE ssn IS NOT NULL", Answer(no_rows)),
    ("alice", "SELECT ssn FROM (SELECT * FROM (SELECT ssn FROM clinical.patients) s) t WHERE ssn IS NOT NULL", Answer(no_rows)),
    ("alice", "SELECT ssn FROM clinical.patients UNION SELECT ssn FROM clinical.patients", Answer(all_null)),
    ("alice", "SELECT (SELECT max(ssn) FROM clinical.patients)", Answer(all_null)),
    ("alice", "SELECT count(*) FROM clinical.encounters WHERE patient_id IN (SELECT patient_id FROM clinical.patients WHERE NOT research_consent)", Answer(zero)),
    ("alice", "SELECT count(*) FROM clinical.encounters e WHERE EXISTS (SELECT 1 FROM clinical.patients p WHERE p.patient_id = e.patient_id AND NOT p.research_consent)", Answer(zero)),
    ("alice", "SELECT count(*) FROM clinical.patients WHERE NOT research_consent", Answer(zero)),
    ("alice", "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT p.ssn FROM r, clinical.patients p WHERE p.ssn IS NOT NULL", Answer(no_rows)),
    // Files, paths, DDL, DML, COPY, SET, catalogs.
    ("alice", "SELECT * FROM '/etc/passwd'", Refused("InvalidArgument", "not found")),
    ("alice", "SELECT * FROM 'curated/clinical/patients/'", Refused("InvalidArgument", "not found")),
    ("alice", "SELECT * FROM 'lakegate://lake/curated/clinical/patients/part-00000.parquet'", Refused("InvalidArgument", "not found")),
    ("alice", "CREATE EXTERNAL TABLE raw STORED AS PARQUET LOCATION 'curated/clinical/patients/'", Refused("InvalidArgument", "CREATE statements are refused")),
    ("alice", "CREATE VIEW v AS SELECT * FROM clinical.patients", Refused("InvalidArgument", "CREATE statements are refused")),
    ("alice", "COPY clinical.patients TO '/tmp/leak.csv'", Refused("InvalidArgument", "COPY statements are refused")),
    ("alice", "INSERT INTO clinical.patients SELECT * FROM clinical.patients", Refused("InvalidArgument", "INSERT statements are refused")),
    ("alice", "SET datafusion.execution.batch_size = 1", Refused("InvalidArgument", "SET statements are refused")),
    ("alice", "SELECT * INTO leak FROM clinical.patients", Refused("InvalidArgument", "read-only")),
    ("alice", "SELECT * FROM information_schema.columns", Refused("InvalidArgument", "not found")),
    ("alice", "EXPLAIN SELECT ssn FROM clinical.patients", Refused("PermissionDenied", "explain-admin-only")),
    ("alice", "EXPLAIN ANALYZE SELECT ssn FROM clinical.patients", Refused("PermissionDenied", "explain-admin-only")),
    // Error oracles: the row filter runs before any user expression.
    ("alice", "SELECT count(*) FROM clinical.patients WHERE 1 / (CASE WHEN research_consent THEN 1 ELSE 0 END) = 1", Answer(any_answer)),
    ("carol", "SELECT count(*) FROM clinical.patients WHERE 1 / (CASE WHEN site_id = 'SITE_A' THEN 1 ELSE 0 END) = 1", Answer(any_answer)),
    ("carol", "SELECT CAST(ssn AS BIGINT) FROM clinical.patients", Refused("InvalidArgument", "could not be converted")),
    ("carol", "SELECT CAST(first_name AS INT) FROM clinical.patients", Refused("InvalidArgument", "could not be converted")),
    ("carol", "SELECT count(*) FROM clinical.patients WHERE ssn LIKE '1%' OR ssn LIKE '2%'", Answer(zero)),
    ("carol", "SELECT ssn FROM clinical.patients", Answer(nothing_looks_like_an_ssn)),
    ("carol", "SELECT count(*) FROM clinical.patients WHERE site_id <> 'SITE_A'", Answer(zero)),
    ("carol", "SELECT count(*) FROM clinical.encounters WHERE site_id = 'SITE_B'", Answer(zero)),
    // Aggregation thresholds.
    ("bob", "SELECT patient_id FROM clinical.patients", Refused("PermissionDenied", "row_query on clinical.patients is refused")),
    ("bob", "SELECT DISTINCT site_id FROM clinical.patients", Refused("PermissionDenied", "row_query")),
    ("bob", "SELECT min(birth_date) FROM clinical.patients", Refused("PermissionDenied", "aggregate min is refused")),
    ("bob", "SELECT site_id, max(total_cost) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "aggregate max is refused")),
    ("bob", "SELECT array_agg(ssn) FROM clinical.patients", Refused("PermissionDenied", "aggregate array_agg is refused")),
    ("bob", "SELECT string_agg(code, ',') FROM clinical.conditions", Refused("PermissionDenied", "aggregate string_agg is refused")),
    ("bob", "SELECT median(total_cost) FROM clinical.encounters", Refused("PermissionDenied", "is refused")),
    ("bob", "SELECT site_id, sex, count(*) FROM clinical.patients GROUP BY ROLLUP(site_id, sex)", Refused("PermissionDenied", "GROUPING SETS, ROLLUP and CUBE")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients GROUP BY GROUPING SETS ((site_id), ())", Refused("PermissionDenied", "GROUPING SETS")),
    ("bob", "SELECT site_id, count(*) OVER (PARTITION BY site_id) FROM clinical.patients", Refused("PermissionDenied", "row_query")),
    ("bob", "SELECT count(*) FROM clinical.conditions WHERE code = 'D81.0'", Answer(no_rows)),
    ("bob", "SELECT patient_id, count(*) FROM clinical.observations GROUP BY patient_id", Answer(no_rows)),
    ("bob", "SELECT code, count(*) FROM clinical.conditions GROUP BY code HAVING count(DISTINCT patient_id) < 11", Answer(no_rows)),
    ("bob", "SELECT birth_date, count(*) FROM clinical.patients GROUP BY birth_date", Answer(no_rows)),
    ("bob", "SELECT count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.site_id = p.site_id", Refused("PermissionDenied", "joined only on patient_id")),
    // More in the join condition than unit = unit only drops same-patient pairs, as WHERE
    // would; a rare group met that way is still suppressed.
    ("bob", "SELECT c.code, count(*) FROM clinical.conditions c JOIN clinical.patients p ON c.patient_id = p.patient_id AND c.code = 'D81.0' GROUP BY c.code", Answer(no_rows)),
    // Comma and cross joins are joins on what their WHERE says.
    ("bob", "SELECT count(*) FROM clinical.encounters e, clinical.patients p", Refused("PermissionDenied", "joined only on patient_id")),
    ("bob", "SELECT count(*) FROM clinical.encounters e CROSS JOIN clinical.patients p WHERE e.site_id = p.site_id", Refused("PermissionDenied", "joined only on patient_id")),
    ("bob", "SELECT count(*) FROM clinical.encounters e, clinical.patients p WHERE e.patient_id = p.patient_id OR e.site_id = p.site_id", Refused("PermissionDenied", "joined only on patient_id")),
    ("bob", "SELECT count(*) FROM clinical.conditions c, clinical.encounters e, clinical.patients p WHERE c.patient_id = e.patient_id AND e.site_id = p.site_id", Refused("PermissionDenied", "joined only on patient_id")),
    ("bob", "SELECT c.code, count(*) FROM clinical.conditions c, clinical.patients p WHERE c.patient_id = p.patient_id AND c.code = 'D81.0' GROUP BY c.code", Answer(no_rows)),
    ("bob", "SELECT count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id OR e.site_id = p.site_id", Refused("PermissionDenied", "joined only on patient_id")),
    // The privacy-unit join is what cohort analysts need; its small groups are still suppressed.
    ("bob", "SELECT p.sex, count(DISTINCT p.patient_id) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY p.sex", Answer(any_answer)),
    ("bob", "SELECT c.code, count(*) FROM clinical.conditions c JOIN clinical.patients p ON c.patient_id = p.patient_id WHERE c.code = 'D81.0' GROUP BY c.code", Answer(no_rows)),
    ("bob", "SELECT x, count(*) FROM (SELECT site_id AS x FROM clinical.patients) s GROUP BY x", Refused("PermissionDenied", "privacy unit patient_id")),
    // Groups leave sorted by their own values, never in the order the rows lie in the files:
    // otherwise LIMIT 1 answers with the group of the first patient of a file, and so says
    // that patient's site.
    ("bob", "SELECT CASE WHEN site_id = 'SITE_A' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("bob", "SELECT CASE WHEN site_id = 'SITE_B' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("bob", "SELECT CASE WHEN site_id = 'SITE_C' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("bob", "SELECT CASE WHEN site_id = 'SITE_D' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("bob", "SELECT CASE WHEN site_id = 'SITE_E' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("bob", "SELECT CASE WHEN e.site_id = 'SITE_B' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    // Under a threshold the unit join compares raw ids (engine/src/counted.rs); any other use
    // of either key, beside the join, keeps both sides pseudonymized.
    ("bob", "SELECT count(DISTINCT p.patient_id) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id WHERE e.patient_id LIKE 'P%'", Answer(no_rows)),
    ("bob", "SELECT substr(e.patient_id, 1, 3) AS k, count(DISTINCT p.patient_id) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY 1", Answer(first_is_ps)),
    // alice's counts group and join raw ids (engine/src/counted.rs); their groups then leave
    // sorted too, so neither the files' order nor a hash of raw ids decides which one a LIMIT
    // keeps. Any other use of the id keeps its pseudonym.
    ("alice", "SELECT CASE WHEN site_id = 'SITE_A' THEN 'z' ELSE 'a' END AS g, count(DISTINCT patient_id) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("alice", "SELECT CASE WHEN site_id = 'SITE_B' THEN 'z' ELSE 'a' END AS g, count(DISTINCT patient_id) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("alice", "SELECT CASE WHEN site_id = 'SITE_C' THEN 'z' ELSE 'a' END AS g, count(DISTINCT patient_id) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("alice", "SELECT CASE WHEN site_id = 'SITE_D' THEN 'z' ELSE 'a' END AS g, count(DISTINCT patient_id) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("alice", "SELECT CASE WHEN site_id = 'SITE_E' THEN 'z' ELSE 'a' END AS g, count(DISTINCT patient_id) FROM clinical.patients GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("alice", "SELECT CASE WHEN e.site_id = 'SITE_B' THEN 'z' ELSE 'a' END AS g, count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY 1 LIMIT 1", Answer(first_is_a)),
    ("alice", "SELECT substr(e.patient_id, 1, 3) AS k, count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY 1", Answer(first_is_ps)),
    // Names prove nothing: a column renamed to the privacy unit is not the unit. Grouping by the
    // real unit under another name still leaves one patient per group, suppressed; joining on an
    // impostor is refused.
    ("bob", "SELECT p, count(*) FROM (SELECT patient_id AS p, encounter_id AS patient_id FROM clinical.encounters) t GROUP BY p", Answer(no_rows)),
    ("bob", "SELECT count(*) FROM clinical.encounters e JOIN (SELECT encounter_id AS patient_id FROM clinical.observations) o ON e.patient_id = o.patient_id", Refused("PermissionDenied", "joined only on patient_id")),
    ("bob", "SELECT s, count(*) FROM (SELECT site_id AS s, upper(patient_id) AS patient_id FROM clinical.patients) t GROUP BY s", Refused("PermissionDenied", "privacy unit patient_id")),
    // Targeting inside a large group: an aggregate's argument built from a condition would
    // carry one patient's value (or presence) in a group of thousands. Aggregates over
    // thresholded data take columns as they are; conditions go to WHERE or GROUP BY, where the
    // threshold counts the patients they leave.
    ("bob", "SELECT site_id, count(CASE WHEN birth_date = DATE '1950-03-04' AND zip = '02139' THEN 1 END) FROM clinical.patients GROUP BY site_id", Refused("PermissionDenied", "must take columns of the data as they are")),
    ("bob", "SELECT site_id, sum(CASE WHEN sex = 'F' THEN total_cost ELSE 0 END) FROM clinical.encounters e JOIN clinical.patients p USING (patient_id, site_id) GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, count(*) FILTER (WHERE zip = '02139') FROM clinical.patients GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, sum(x) FROM (SELECT site_id, patient_id, CASE WHEN birth_date = DATE '1950-03-04' THEN 1 ELSE 0 END AS x FROM clinical.patients) t GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, sum(power(total_cost, 20)) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT p.site_id, sum(v.w) FROM clinical.patients p JOIN (VALUES ('02139', 1000000)) v(z, w) ON p.zip = v.z GROUP BY p.site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, sum(w) FROM (SELECT site_id, patient_id, 1 AS w FROM clinical.patients WHERE zip = '02139' UNION ALL SELECT site_id, patient_id, 0 FROM clinical.patients WHERE zip <> '02139') t GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, avg(CAST(total_cost AS DOUBLE)), count(DISTINCT patient_id) FROM clinical.encounters GROUP BY site_id", Answer(any_answer)),
    // An outer join is a CASE in disguise: the threshold counts the patients of the group's rows,
    // but the optional side holds values only where a (filtered) match was found, so its
    // columns may not be aggregated; the preserved side's may.
    ("bob", "SELECT e.site_id, count(x.patient_id), avg(x.total_cost) FROM clinical.encounters e LEFT JOIN (SELECT patient_id, total_cost FROM clinical.encounters WHERE total_cost > 49995) x ON e.patient_id = x.patient_id GROUP BY e.site_id", Refused("PermissionDenied", "optional side of an outer join")),
    ("bob", "SELECT p.site_id, avg(x.total_cost) FROM clinical.patients p LEFT JOIN clinical.encounters x ON p.patient_id = x.patient_id AND x.total_cost > 49995 GROUP BY p.site_id", Refused("PermissionDenied", "optional side of an outer join")),
    ("bob", "SELECT p.site_id, sum(x.total_cost) FROM clinical.encounters x RIGHT JOIN clinical.patients p ON p.patient_id = x.patient_id AND p.birth_date = DATE '1950-03-04' GROUP BY p.site_id", Refused("PermissionDenied", "optional side of an outer join")),
    ("bob", "SELECT site_id, avg(c) FROM (SELECT p.site_id, p.patient_id, x.total_cost AS c FROM clinical.patients p FULL JOIN (SELECT patient_id, total_cost FROM clinical.encounters WHERE total_cost > 49995) x ON p.patient_id = x.patient_id) t GROUP BY site_id", Refused("PermissionDenied", "optional side of an outer join")),
    ("bob", "SELECT p.site_id, count(DISTINCT p.patient_id), count(*) FROM clinical.patients p LEFT JOIN clinical.encounters e ON p.patient_id = e.patient_id GROUP BY p.site_id", Answer(any_answer)),
    // Released groups joined back to the rows they came from make any expression a weight: here
    // each site's count of patients in one ZIP3 area, where the threshold suppresses the sites
    // with few of them. Aggregate arguments come from the data's rows, not from inner aggregates.
    ("bob", "SELECT p.site_id, sum(a.w) FROM clinical.patients p JOIN (SELECT substr(zip, 1, 3) AS z3, CASE WHEN substr(zip, 1, 3) = '890' THEN 1000000 ELSE 0 END AS w, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY 1, 2) a ON substr(p.zip, 1, 3) = a.z3 GROUP BY p.site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT p.site_id, sum(v.w) FROM clinical.patients p JOIN (SELECT z, sum(w) AS w FROM (VALUES ('021', 1000000), ('100', 1)) t(z, w) GROUP BY z) v ON substr(p.zip, 1, 3) = v.z GROUP BY p.site_id", Refused("PermissionDenied", "must take columns")),
    // Errors are answers too: under a threshold, an expression that fails on some rows tells
    // whether such rows exist (one patient's diagnosis), whatever the threshold suppresses.
    // Below the threshold only operations that cannot fail run; a HAVING over released groups
    // runs on released groups only (it used to be merged into the threshold's own filter).
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE 1 / (CASE WHEN total_cost > 49995 THEN 0 ELSE 1 END) = 1 GROUP BY site_id", Refused("PermissionDenied", "could fail on some rows")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE CAST(CASE WHEN zip = '02139' THEN 'x' ELSE '1' END AS INT) = 1 GROUP BY site_id", Refused("PermissionDenied", "could fail on some rows")),
    ("bob", "SELECT code, count(*) FROM clinical.conditions GROUP BY code HAVING 1 / (CASE WHEN code = 'G71.01' THEN 0 ELSE 1 END) = 1", Refused("PermissionDenied", "could fail on some rows")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE substr(zip, 1, CASE WHEN zip = '02139' THEN -1 ELSE 3 END) <> '' GROUP BY site_id", Refused("PermissionDenied", "could fail on some rows")),
    ("bob", "SELECT site_id, count(*) FROM (SELECT * FROM clinical.patients WHERE zip = '02139') t WHERE zip ~ '[0-9]{3}.[1-5]' GROUP BY site_id", Refused("PermissionDenied", "could fail on some rows")),
    ("bob", "SELECT code, count(*) FROM clinical.conditions GROUP BY code HAVING 1 / (count(DISTINCT patient_id) - 1) > 0", Answer(any_answer)),
    ("bob", "SELECT date_trunc('month', start_time) AS m, count(*) FROM clinical.encounters WHERE date_part('year', start_time) > 2000 GROUP BY 1", Answer(any_answer)),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE total_cost / 2 > 100 AND substr(reason_code, 1, 1) = 'I' GROUP BY site_id", Answer(any_answer)),
    // A total function can still fail for its fixed arguments, and then fails exactly when a
    // row reaches it: a yes/no per query about rows nobody counts (a 37-query bisection found
    // the one patient with D81.0). Each expression under a threshold is run on made-up rows
    // before the query, and refused if it fails there.
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters GROUP BY site_id, date_part('foo', start_time)", Refused("PermissionDenied", "fails for its fixed arguments")),
    ("bob", "SELECT date_trunc('foo', start_time) AS d, count(*) FROM clinical.encounters GROUP BY 1", Refused("PermissionDenied", "fails for its fixed arguments")),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE CASE WHEN reason_code = 'D81.0' THEN date_part('foo', start_time) > 0 ELSE true END GROUP BY site_id", Refused("PermissionDenied", "fails for its fixed arguments")),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE substr(reason_code, -9223372036854775808, 1) = 'x' GROUP BY site_id", Refused("PermissionDenied", "fails for its fixed arguments")),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE reason_code LIKE repeat('%_', 30000) GROUP BY site_id", Refused("PermissionDenied", "fails for its fixed arguments")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients p WHERE EXISTS (SELECT 1 FROM clinical.conditions c WHERE c.patient_id = p.patient_id AND date_part('foo', c.onset_date) > 0) GROUP BY site_id", Refused("PermissionDenied", "fails for its fixed arguments")),
    // An average of decimals fails when the average does not fit: on some sums.
    ("bob", "SELECT site_id, avg(TRY_CAST(total_cost AS DECIMAL(38,36))) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "")),
    ("bob", "SELECT encounter_class, count(*) FROM clinical.encounters WHERE date_part('dow', start_time) = 1 AND substr(reason_code, 2, 2) <> 'xx' GROUP BY encounter_class", Answer(any_answer)),
    // TRY_CAST is a CASE in disguise: it keeps the values that fit. In an aggregate's argument
    // it counts as computed, as does any cast that can fail or turn a value into NULL.
    ("bob", "SELECT site_id, count(TRY_CAST(total_cost AS DECIMAL(4,2))) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, avg(TRY_CAST(total_cost AS DECIMAL(4,2))) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, sum(TRY_CAST(total_cost AS TINYINT)) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, sum(x) FROM (SELECT site_id, patient_id, TRY_CAST(total_cost AS SMALLINT) AS x FROM clinical.encounters) t GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, count(TRY_CAST(reason_code AS INT)) FROM clinical.encounters GROUP BY site_id", Refused("PermissionDenied", "must take columns")),
    ("bob", "SELECT site_id, sum(CAST(readmitted_30d AS INT)), avg(CAST(total_cost AS DOUBLE)) FROM clinical.encounters GROUP BY site_id", Answer(any_answer)),
    // NOT IN over a subquery that holds a NULL is false for every row: a unit from the optional
    // side of an outer join is NULL exactly when the join found no match, so whether one
    // patient has a code would decide whether any row is counted at all.
    ("bob", "SELECT count(*) FROM clinical.patients p WHERE p.patient_id NOT IN (SELECT c.patient_id FROM clinical.patients p2 LEFT JOIN clinical.conditions c ON p2.patient_id = c.patient_id AND c.code = 'E78.5' WHERE p2.zip = '02139')", Refused("PermissionDenied", "not from the optional side of an outer join")),
    ("bob", "SELECT count(*) FROM clinical.patients p WHERE p.patient_id IN (SELECT c.patient_id FROM clinical.conditions c RIGHT JOIN clinical.patients p2 ON p2.patient_id = c.patient_id AND c.code = 'E78.5' WHERE p2.zip = '02139')", Refused("PermissionDenied", "not from the optional side of an outer join")),
    ("bob", "SELECT count(*) FROM clinical.patients p WHERE p.patient_id NOT IN (SELECT x.patient_id FROM clinical.patients p2 FULL JOIN (SELECT patient_id FROM clinical.conditions WHERE code = 'E78.5') x ON p2.patient_id = x.patient_id)", Refused("PermissionDenied", "not from the optional side of an outer join")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE patient_id NOT IN (SELECT p2.patient_id FROM clinical.patients p2 LEFT JOIN clinical.conditions c ON p2.patient_id = c.patient_id WHERE c.code = 'E78.5') GROUP BY site_id", Answer(any_answer)),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE patient_id NOT IN (SELECT patient_id FROM clinical.conditions WHERE code = 'E78.5') GROUP BY site_id", Answer(any_answer)),
    // Subqueries answer from rows no threshold counts unless they aggregate or only pick
    // patients for the outer rows (IN on the unit, EXISTS tied by the unit).
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE EXISTS (SELECT 1 FROM clinical.encounters WHERE total_cost > 49998) GROUP BY site_id", Refused("PermissionDenied", "subquery over data under an aggregation threshold")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE site_id IN (SELECT site_id FROM clinical.encounters WHERE total_cost > 49998) GROUP BY site_id", Refused("PermissionDenied", "subquery over data under an aggregation threshold")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients WHERE (SELECT total_cost FROM clinical.encounters WHERE total_cost > 49998) > 49000 GROUP BY site_id", Refused("PermissionDenied", "subquery over data under an aggregation threshold")),
    ("bob", "SELECT count(*) FROM (VALUES (1)) t(x) WHERE EXISTS (SELECT 1 FROM clinical.encounters WHERE total_cost > 49998)", Refused("PermissionDenied", "subquery over data under an aggregation threshold")),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients p WHERE EXISTS (SELECT 1 FROM clinical.encounters e WHERE e.patient_id = p.patient_id UNION ALL SELECT 1 FROM clinical.encounters WHERE total_cost > 49998) GROUP BY site_id", Refused("PermissionDenied", "subquery over data under an aggregation threshold")),
    ("bob", "SELECT site_id, count(DISTINCT patient_id) FROM clinical.patients WHERE patient_id IN (SELECT patient_id FROM clinical.conditions WHERE code LIKE 'I%') GROUP BY site_id", Answer(any_answer)),
    ("bob", "SELECT site_id, count(*) FROM clinical.patients p WHERE EXISTS (SELECT 1 FROM clinical.encounters e WHERE e.patient_id = p.patient_id AND e.total_cost > 40000) GROUP BY site_id", Answer(any_answer)),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE total_cost > (SELECT avg(total_cost) FROM clinical.encounters) GROUP BY site_id", Answer(any_answer)),
    // Rows picked by rank: LIMIT 12 minus LIMIT 11 is the twelfth row's cost, released in a
    // group of twelve patients; the same through the patients an IN subquery picks.
    ("bob", "SELECT count(*), sum(total_cost) FROM (SELECT * FROM clinical.encounters ORDER BY total_cost DESC LIMIT 12) t", Refused("PermissionDenied", "LIMIT and OFFSET over rows under an aggregation threshold")),
    ("bob", "SELECT count(DISTINCT patient_id), sum(total_cost) FROM (SELECT * FROM clinical.encounters ORDER BY total_cost DESC OFFSET 5) t", Refused("PermissionDenied", "LIMIT and OFFSET over rows under an aggregation threshold")),
    ("bob", "SELECT count(*), sum(total_cost) FROM clinical.encounters WHERE patient_id IN (SELECT patient_id FROM clinical.patients ORDER BY ssn LIMIT 12)", Refused("PermissionDenied", "LIMIT and OFFSET over rows under an aggregation threshold")),
    ("bob", "SELECT count(*), sum(total_cost) FROM (SELECT DISTINCT ON (patient_id) * FROM clinical.encounters ORDER BY patient_id, total_cost DESC) t", Refused("PermissionDenied", "DISTINCT ON over rows under an aggregation threshold")),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters GROUP BY site_id ORDER BY site_id LIMIT 2", Answer(any_answer)),
    // A suppressed aggregate without GROUP BY answers no row; as a scalar subquery, NULL (it
    // failed with an internal error: a NULL in a column declared non-nullable).
    ("bob", "SELECT site_id, count(*) AS n, (SELECT count(*) FROM clinical.encounters WHERE total_cost > 49998) AS m FROM clinical.patients GROUP BY site_id", Answer(any_answer)),
    // Functions that multiply their input: one call allocated 2 GB outside the memory pool
    // (two at once take the server down). Bounded per batch; list builders not offered.
    ("carol", "SELECT length(repeat('x', 2000000000))", Refused("ResourceExhausted", "a function's result is limited to 64 MiB")),
    ("carol", "SELECT max(length(replace(first_name, 'a', repeat('x', 1000000)))) FROM clinical.patients", Refused("ResourceExhausted", "replace would build")),
    ("carol", "SELECT max(length(lpad(first_name, 1000000))) FROM clinical.patients", Refused("ResourceExhausted", "lpad would build")),
    ("carol", "SELECT count(*) FROM unnest(range(1, 1000000000))", Refused("InvalidArgument", "the function range is not offered")),
    ("carol", "SELECT lpad(zip, 10, '0'), repeat(first_name, 3), replace(ssn, '*', '#') FROM clinical.patients", Answer(nothing_looks_like_an_ssn)),
    ("carol", "SELECT count(*) FROM generate_series(1, 1000)", Answer(any_answer)),
    ("carol", "SELECT max(length(regexp_replace(first_name, '', repeat('x', 1000000), 'g'))) FROM clinical.patients", Refused("ResourceExhausted", "regexp_replace would build")),
    ("carol", "SELECT regexp_replace(address, '[0-9]+', '#', 'g'), regexp_replace(first_name, '(.)', '<$1>', 'g') FROM clinical.patients", Answer(any_answer)),
    // Under a threshold a bounded function could fail on some rows: only a replace that
    // cannot grow its string runs there.
    ("bob", "SELECT replace(reason_code, '.', '') AS r, count(*) FROM clinical.encounters GROUP BY 1", Answer(any_answer)),
    ("bob", "SELECT site_id, count(*) FROM clinical.encounters WHERE length(replace(reason_code, '.', repeat('x', 9000))) > 0 GROUP BY site_id", Refused("PermissionDenied", "replacement longer than the text it replaces")),
    ("bob", "SELECT count(*) FROM omics.variants", Refused("InvalidArgument", "not found")),
    // Nothing at all for those without grants.
    ("mallory", "SELECT * FROM clinical.patients", Refused("InvalidArgument", "not found")),
    ("erin", "SELECT count(*) FROM clinical.encounters", Refused("InvalidArgument", "not found")),
    ("dave", "SELECT * FROM omics.variants", Refused("InvalidArgument", "not found")),
];

#[tokio::test]
async fn bypass_attempts_are_refused_or_compliant() {
    assert!(ATTACKS.len() >= 40);
    let server = TestServer::start().await;
    let mut clients: Vec<(&str, Client)> = Vec::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "mallory"] {
        clients.push((user, login(&server, user).await));
    }
    let mut failures = Vec::new();
    for (user, query, expect) in ATTACKS {
        let client = &mut clients
            .iter_mut()
            .find(|(u, _)| u == user)
            .expect("persona")
            .1;
        let result: Result<Vec<RecordBatch>, FlightError> = sql(client, query).await;
        let ok = match (expect, &result) {
            (Refused(code, text), Err(e)) => {
                code_of(e) == *code
                    && e.to_string().contains(text)
                    && !looks_like_ssn(&e.to_string())
            }
            (Answer(check), Ok(batches)) => check(batches),
            _ => false,
        };
        if !ok {
            let got = match &result {
                Ok(b) => format!(
                    "{} rows: {:?}",
                    rows(b),
                    b.first().map(|b| column_text(std::slice::from_ref(b), 0))
                ),
                Err(e) => format!("{}: {e}", code_of(e)),
            };
            failures.push(format!("{user}: {query}\n    got {got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} attempts not handled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn released_bob_counts_never_describe_fewer_than_eleven_patients() {
    // Overlapping filters: every group released, whatever the slicing, holds at least 11.
    let server = TestServer::start().await;
    let mut bob = login(&server, "bob").await;
    for q in [
        "SELECT site_id, sex, race, count(*) AS n, count(DISTINCT patient_id) AS u FROM clinical.patients GROUP BY site_id, sex, race",
        "SELECT encounter_class, payer, count(DISTINCT patient_id) AS u, avg(total_cost) FROM clinical.encounters GROUP BY encounter_class, payer",
        "SELECT reason_code, readmitted_30d, count(DISTINCT patient_id) AS u FROM clinical.encounters WHERE total_cost > 40000 GROUP BY reason_code, readmitted_30d",
    ] {
        let b = sql(&mut bob, q).await.unwrap();
        let units_col = b.first().map(|b| b.schema().index_of("u").unwrap()).unwrap_or(0);
        for u in column_text(&b, units_col) {
            assert!(u.parse::<i64>().unwrap() >= 11, "{q}: released a group of {u}");
        }
    }
    // And what is released matches plain DataFusion with the same HAVING.
    let governed = sql(
        &mut bob,
        "SELECT sex, count(*) FROM clinical.patients GROUP BY sex ORDER BY sex",
    )
    .await
    .unwrap();
    let plain =
        raw_query("SELECT sex, count(*) FROM clinical_patients GROUP BY sex ORDER BY sex").await;
    assert_eq!(column_text(&governed, 1), column_text(&plain, 1));
}

/// A caller's predicate on columns it sees unmasked runs early (so masks are computed only for
/// the rows it keeps). One that could fail on some value (arithmetic, a cast, a function) runs
/// above the row filter, behind a boundary: never on hidden rows, whose values an error could
/// tell. One that cannot fail (a column compared with a constant of its type) runs first, in
/// the row filter's own conjunction, where it is cheapest: the rows it reads but the row filter
/// hides show in nothing.
#[tokio::test]
async fn early_predicates_run_before_the_masks_and_never_fail_on_hidden_rows() {
    use datafusion::physical_plan::displayable;
    let server = TestServer::start().await;
    let alice = lakegate_policies::Principal {
        name: "alice".into(),
        attributes: [
            ("role", "data_scientist"),
            ("project", "oncology"),
            ("purpose", "model_training"),
            ("environment", "sandbox"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    let physical = |q: &'static str| {
        let (server, alice) = (&server, &alice);
        async move {
            let planned = server
                .engine
                .session(alice)
                .await
                .unwrap()
                .plan(q)
                .await
                .unwrap();
            displayable(planned.verified_physical_plan().await.unwrap().as_ref())
                .indent(false)
                .to_string()
        }
    };
    let line = |plan: &str, needle: &str| {
        plan.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not in\n{plan}"))
    };

    // Cannot fail: one filter, the caller's comparison before the row filter, masks above.
    let plan = physical(
        "SELECT encounter_id FROM clinical.encounters WHERE total_cost > 49000 AND encounter_class IN ('inpatient', 'emergency')",
    )
    .await;
    let filter = line(&plan, "lg_in_subject_set");
    let text = plan.lines().nth(filter).unwrap();
    let (mine, row) = (
        text.find("total_cost@").expect("early"),
        text.find("lg_in_subject_set").unwrap(),
    );
    assert!(
        text.contains("FilterExec") && text.contains("encounter_class@") && mine < row,
        "not one conjunction, the caller's first:\n{plan}"
    );
    assert!(line(&plan, "lg_pseudonym") < filter, "{plan}");
    assert!(!plan.contains("stage=row-filter"), "{plan}");

    // Could fail (division, a cast, a function): above the row filter, behind a boundary.
    for q in [
        "SELECT encounter_id FROM clinical.encounters WHERE 1 / (total_cost - 49000.5) > 0",
        "SELECT encounter_id FROM clinical.encounters WHERE CAST(encounter_class AS INT) = 1",
        "SELECT encounter_id FROM clinical.encounters WHERE length(encounter_class) > 3",
    ] {
        let plan = physical(q).await;
        let masks = line(&plan, "lg_pseudonym");
        let early = plan
            .lines()
            .position(|l| {
                l.contains("FilterExec") && !l.contains("lg_in_subject_set") && !l.contains("lg_")
            })
            .unwrap_or_else(|| panic!("no early filter in\n{plan}"));
        let stage = plan
            .lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.contains("stage=row-filter"))
            .unwrap_or_else(|| panic!("no stage boundary in\n{plan}"));
        let row_filter = line(&plan, "lg_in_subject_set");
        assert!(
            masks < early && early < stage && stage < row_filter,
            "wrong order in\n{plan}"
        );
    }
    // And on the wire: carol's hidden rows (other sites) would divide by zero here.
    let mut carol = login(&server, "carol").await;
    for q in [
        "SELECT count(*) FROM clinical.encounters WHERE 1 / (CASE WHEN site_id = 'SITE_B' THEN 0 ELSE 1 END) = 1",
        "SELECT count(*) FROM clinical.encounters WHERE site_id <> 'SITE_B' AND 1 / (CASE WHEN site_id = 'SITE_C' THEN 0 ELSE 1 END) = 1",
    ] {
        sql(&mut carol, q)
            .await
            .unwrap_or_else(|e| panic!("{q}: a hidden row failed the predicate: {e}"));
    }
    // And a predicate on a masked column never runs early, however plain.
    for q in [
        "SELECT count(*) FROM clinical.patients WHERE ssn LIKE '1%'",
        "SELECT count(*) FROM clinical.patients WHERE ssn = '123-45-6789'",
    ] {
        let plan = physical(q).await;
        assert!(!plan.contains("stage=row-filter"), "{plan}");
        let row = plan.lines().nth(line(&plan, "lg_in_subject_set")).unwrap();
        assert!(!row.contains("ssn"), "{plan}");
    }
}

/// Only datasets under the threshold supply privacy units. With row access to conditions
/// (no threshold) beside thresholded patients, bob must not be able to make the threshold
/// count the conditions' patients: a birth date held by one protected patient, crossed with 20
/// unrelated condition holders, is still a group of one.
#[tokio::test]
async fn units_come_only_from_datasets_under_the_threshold() {
    let rows_rule = "# bob may also read conditions row by row (a test-only grant).\n\
        [[rule]]\nname = \"operations-conditions-rows\"\neffect = \"allow\"\n\
        subject = 'r.sub.role == \"analyst\" && r.sub.purpose == \"operations\"'\n\
        object = 'r.obj.name == \"clinical.conditions\"'\n\
        actions = [\"row_query\", \"aggregate_query\"]\n\
        masks = [{ label = \"identifier\", mask = \"pseudonym\" }]\n\n";
    let policy = lakegate_flight_server::demo::DEMO_POLICY.replacen(
        "# bob: cohort counts for operations",
        &format!("{rows_rule}# bob: cohort counts for operations"),
        1,
    );
    assert!(policy.contains("operations-conditions-rows"));
    let server = TestServer::start_with(lakegate_tests::ServerOptions {
        policy: Some(policy),
        ..Default::default()
    })
    .await;
    let mut bob = login(&server, "bob").await;
    // The grant works: conditions are row-level for bob now, patients still aggregate-only.
    assert!(
        sql(&mut bob, "SELECT code FROM clinical.conditions LIMIT 1")
            .await
            .is_ok()
    );
    let q = "SELECT p.birth_date, count(DISTINCT c.patient_id) AS n FROM clinical.patients p \
             CROSS JOIN (SELECT DISTINCT patient_id FROM clinical.conditions LIMIT 20) c \
             GROUP BY p.birth_date";
    let b = sql(&mut bob, q)
        .await
        .expect("allowed, with small groups suppressed");
    let per_date = sql(
        &mut bob,
        "SELECT birth_date, count(*) AS n FROM clinical.patients GROUP BY birth_date",
    )
    .await
    .unwrap();
    // Whatever birth dates are released here are exactly those held by 11+ patients.
    assert_eq!(rows(&b), rows(&per_date), "{q}");
}

/// Each pseudonym's times of day, in microseconds after midnight, sorted: what a whole-day date
/// shift left unchanged.
fn times_of_day(batches: &[RecordBatch]) -> std::collections::HashMap<String, Vec<i64>> {
    use arrow::array::AsArray;
    use arrow::datatypes::TimestampMicrosecondType;
    const DAY: i64 = 86_400_000_000;
    let ids = column_text(batches, 0);
    let mut out: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let times = batches.iter().flat_map(|b| {
        b.column(1)
            .as_primitive::<TimestampMicrosecondType>()
            .iter()
    });
    for (id, t) in ids.into_iter().zip(times) {
        if let Some(t) = t {
            out.entry(id).or_default().push(t.rem_euclid(DAY));
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// Date shifts move a patient's times by an offset with a part of a day in it. With whole days,
/// every time of day survived to the microsecond: joining alice's and dave's times of day linked
/// all their pseudonyms one to one across projects, and carol's identified rows named hundreds
/// of alice's patients.
#[tokio::test]
async fn shifted_times_do_not_link_pseudonyms_across_projects() {
    let server = TestServer::start().await;
    let q = "SELECT patient_id, start_time FROM clinical.encounters";
    let mut seen = Vec::new();
    for persona in ["alice", "dave", "carol"] {
        let mut client = login(&server, persona).await;
        let b = sql(&mut client, q).await.unwrap();
        seen.push(times_of_day(&b));
    }
    let (alice, dave, carol) = (&seen[0], &seen[1], &seen[2]);
    assert!(alice.len() > 50 && dave.len() > 50 && carol.len() > 50);
    for (name, other) in [("dave", dave), ("carol", carol)] {
        let theirs: std::collections::HashSet<&Vec<i64>> = other.values().collect();
        let linked = alice.values().filter(|t| theirs.contains(t)).count();
        assert_eq!(
            linked,
            0,
            "{linked} of alice's {} pseudonyms link to {name}'s by their times of day",
            alice.len()
        );
    }
}
