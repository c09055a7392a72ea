//! Ingestion: contracts, quarantine, the raw zone, recommit safety, and the governed door over
//! what was ingested.

use std::path::{Path, PathBuf};

use lakegate_catalogs::ingest::{self, FileOutcome, IngestOptions, IngestReport};
use lakegate_catalogs::{parse_contract, Catalog, CatalogError, Lake};
use lakegate_tests::{build_lake, raw_query_in, test_keyring, ServerOptions, TestServer};

use crate::common::{login, rows, sql};

const LABS: &str = r#"
dataset = "clinical.lab_results"
description = "Results from the laboratory information system"
owner = "lab-informatics"

[[columns]]
name = "result_id"
type = "utf8"
nullable = false
label = "identifier"
unique = true
regex = "R[0-9]{6}"

[[columns]]
name = "patient_id"
type = "utf8"
nullable = false
label = "identifier"
references = "clinical.patients.patient_id"

[[columns]]
name = "loinc_code"
type = "utf8"
nullable = false
label = "clinical"
shape = "loinc"

[[columns]]
name = "value"
type = "float64"
label = "clinical"
min = 0
max = 1000

[[columns]]
name = "unit"
type = "utf8"
label = "clinical"
allowed = ["mg/dL", "mmol/L", "%"]

[[columns]]
name = "taken"
type = "date32"
nullable = false
label = "phi.quasi"
min = "2000-01-01"
"#;

/// A demo lake of 200 patients with `clinical.lab_results` declared; its folder, path and
/// three patient ids.
async fn lake_with_labs() -> (tempfile::TempDir, PathBuf, Lake, Vec<String>) {
    let (dir, path) = build_lake(200);
    // The contract leaves `encrypted` at its default: the labs are encrypted at rest.
    let lake = Lake::open(path.to_str().unwrap())
        .unwrap()
        .with_keyring(test_keyring(dir.path()));
    let mut catalog = Catalog::load(&lake).await.unwrap();
    let labs = parse_contract("labs.toml", LABS).unwrap();
    catalog.declare(&lake, labs).await.unwrap();
    let batches = raw_query_in(
        &path,
        "SELECT patient_id FROM clinical_patients ORDER BY patient_id LIMIT 3",
    )
    .await;
    let ids = crate::common::column_text(&batches, 0);
    (dir, path, lake, ids)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

async fn run(lake: &Lake, files: &[String], ratio: f64) -> IngestReport {
    let options = IngestOptions {
        principal: "lab-feed".into(),
        max_reject_ratio: ratio,
        ..Default::default()
    };
    ingest::ingest(lake, "clinical.lab_results", files, &options)
        .await
        .unwrap()
}

async fn list(lake: &Lake, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let store = lake.store();
    let mut paths: Vec<String> = store
        .list(Some(&object_store::path::Path::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    paths.sort();
    paths
}

/// The Parquet files in the dataset's folder, whether a version names them or not.
async fn parquet_in_folder(lake: &Lake) -> Vec<String> {
    list(lake, "curated/clinical/lab_results")
        .await
        .into_iter()
        .filter(|p| p.ends_with(".parquet"))
        .collect()
}

async fn versions(lake: &Lake) -> Vec<u64> {
    ingest::history(lake, "clinical.lab_results")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect()
}

async fn read_text(lake: &Lake, path: &str) -> String {
    use object_store::ObjectStoreExt;
    let bytes = lake
        .store()
        .get(&object_store::path::Path::from(path))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn bad_rows_are_quarantined_with_row_column_and_rule_and_good_rows_are_served() {
    let (dir, path, lake, ids) = lake_with_labs().await;
    let (p0, p1) = (&ids[0], &ids[1]);
    let mut csv = String::from("result_id,patient_id,loinc_code,value,unit,taken\n");
    for i in 0..20 {
        csv += &format!(
            "R{:06},{p0},2345-7,{}.5,mg/dL,2024-03-{:02}\n",
            i,
            90 + i,
            i + 1
        );
    }
    csv += &format!("R100001,{p1},2345-7,5.1,mmol/L\n"); // row 21: a field short
    csv += &format!("R100002,{p1},2345-7,5.1,mmol/L,2024-02-30\n"); // 22: no such date
    csv += &format!("R000003,{p1},4548-4,6.0,%,2024-01-05\n"); // 23: duplicate key
    csv += "R100004,nobody,4548-4,6.0,%,2024-01-05\n"; // 24: unknown patient
    csv += &format!("R100005,{p1},E11.9,6.0,%,2024-01-05\n"); // 25: not a LOINC code
    csv += &format!("R100006,{p1},4548-4,-3,%,2024-01-05\n"); // 26: below the range
    csv += &format!("R100007,{p1},4548-4,6.0,g,2024-01-05\n"); // 27: unit not allowed
    csv += &format!("R100008,{p1},4548-4,6.0,%,\n"); // 28: no date
    let mut bytes = csv.into_bytes();
    // 29: a byte that is not UTF-8
    bytes.extend_from_slice(format!("R100009,{p1},4548-4,6.0,%").as_bytes());
    bytes.extend_from_slice(b"\xff,2024-01-05\n");
    let file = write(dir.path(), "labs-2024-03.csv", &bytes);

    let report = run(&lake, std::slice::from_ref(&file), 0.5).await;
    assert_eq!(report.refused, None);
    assert_eq!(report.version, Some(1));
    assert_eq!(report.version, Some(1));
    assert_eq!(
        (report.rows_read, report.accepted, report.quarantined),
        (29, 20, 9),
        "{report:?}"
    );
    assert_eq!(report.summary(), "29 rows read, 20 accepted, 9 quarantined");
    for rule in [
        "column_count",
        "type",
        "unique",
        "references",
        "shape",
        "min",
        "allowed",
        "not_null",
        "utf8",
    ] {
        assert_eq!(
            report.by_rule.get(rule),
            Some(&1),
            "{rule}: {:?}",
            report.by_rule
        );
    }

    let sha = &report.files[0].sha256;
    assert_eq!(
        list(&lake, "raw/clinical/lab_results").await,
        vec![format!("raw/clinical/lab_results/{sha}/labs-2024-03.csv")]
    );
    let quarantined = read_text(
        &lake,
        &format!("quarantine/clinical/lab_results/{sha}/rows.jsonl"),
    )
    .await;
    let lines: Vec<serde_json::Value> = quarantined
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9);
    let at = |row: u64| {
        lines
            .iter()
            .find(|l| l["row"] == row)
            .unwrap_or_else(|| panic!("row {row} in {quarantined}"))
    };
    assert_eq!(at(22)["failed"][0]["column"], "taken");
    assert_eq!(at(22)["failed"][0]["rule"], "type");
    assert_eq!(at(23)["failed"][0]["rule"], "unique");
    assert_eq!(at(24)["failed"][0]["column"], "patient_id");
    assert_eq!(at(29)["failed"][0]["column"], "unit");
    assert_eq!(at(29)["file"], "labs-2024-03.csv");
    assert!(
        !quarantined.contains("nobody") && !quarantined.contains("E11.9"),
        "quarantine records name rules, not values: {quarantined}"
    );

    // Re-ingesting the same file adds nothing.
    let again = run(&lake, std::slice::from_ref(&file), 0.5).await;
    assert_eq!(again.files[0].outcome, FileOutcome::AlreadyIngested);
    assert_eq!(again.rows_read, 0);
    assert_eq!(again.version, None);
    let history = ingest::history(&lake, "clinical.lab_results")
        .await
        .unwrap();
    assert_eq!(history.len(), 2, "version 0 (declared) and 1 (the feed)");
    let record = history[1].ingest.clone().unwrap();
    assert_eq!(record.principal, "lab-feed");
    assert_eq!(record.sources[0].sha256, *sha);
    assert_eq!(
        (record.sources[0].accepted, record.sources[0].quarantined),
        (20, 9)
    );
    assert!(list(&lake, "catalog/locks").await.is_empty());

    // The governed door serves the new dataset under the same rules as the demo tables:
    // carol sees her site's patients only, alice consenting patients under pseudonyms.
    let server = TestServer::start_with(ServerOptions {
        lake: Some(path.clone()),
        keyring: lake.keyring().cloned(),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let batches = sql(&mut alice, "SELECT patient_id FROM clinical.lab_results")
        .await
        .unwrap();
    let seen = crate::common::column_text(&batches, 0);
    assert!(seen.iter().all(|p| p != p0), "pseudonyms");
    let consenting = raw_query_in(
        &path,
        &format!(
            "SELECT count(*) FROM clinical_patients WHERE patient_id = '{p0}' AND research_consent"
        ),
    )
    .await;
    assert_eq!(
        rows(&batches) as i64,
        20 * lakegate_tests::scalar_i64(&consenting)
    );
}

#[tokio::test]
async fn a_feed_over_the_reject_ratio_or_with_a_broken_file_commits_nothing() {
    let (dir, path, lake, ids) = lake_with_labs().await;
    let p0 = &ids[0];
    let header = "result_id,patient_id,loinc_code,value,unit,taken\n";
    let good = write(
        dir.path(),
        "good.csv",
        format!("{header}R000001,{p0},2345-7,1,%,2024-01-01\nR000002,{p0},2345-7,2,%,2024-01-01\n")
            .as_bytes(),
    );
    let half_bad = write(
        dir.path(),
        "half.csv",
        format!("{header}R000003,{p0},2345-7,1,%,2024-01-01\nR000004,{p0},2345-7,2,%,1999-01-01\n")
            .as_bytes(),
    );
    let report = run(&lake, &[good.clone(), half_bad.clone()], 0.1).await;
    assert!(report
        .refused
        .as_deref()
        .unwrap()
        .contains("above --max-reject-ratio 0.1"));
    assert_eq!(
        (report.rows_read, report.accepted, report.quarantined),
        (4, 3, 1)
    );
    assert_eq!(report.version, None);
    assert_eq!(versions(&lake).await, vec![0]);
    assert!(
        parquet_in_folder(&lake).await.is_empty(),
        "the refused feed's files are removed"
    );

    // Whole-file problems: wrong columns, an empty file, Parquet under a CSV name, a Parquet
    // file of another schema, an NDJSON file that is not JSON, an unknown extension.
    let wrong_columns = write(
        dir.path(),
        "cols.csv",
        b"result_id,patient,loinc_code,value,unit,taken\nR1,x,1-1,1,%,2024-01-01\n",
    );
    let empty = write(dir.path(), "empty.csv", b"");
    let header_only = write(dir.path(), "header.csv", header.as_bytes());
    let patients_file = list(&lake, "curated/clinical/patients")
        .await
        .into_iter()
        .find(|p| p.ends_with(".parquet"))
        .unwrap();
    let other_schema = path.join(&patients_file);
    let as_csv = write(
        dir.path(),
        "disguised.csv",
        &std::fs::read(&other_schema).unwrap(),
    );
    let as_parquet = write(
        dir.path(),
        "patients.parquet",
        &std::fs::read(&other_schema).unwrap(),
    );
    let not_json = write(dir.path(), "feed.jsonl", b"result_id,patient_id\n");
    let unknown = write(dir.path(), "feed.xlsx", b"PK\x03\x04");
    for (file, expected) in [
        (
            &wrong_columns,
            "wrong columns: missing [patient_id], not in the contract [patient]",
        ),
        (&empty, "the file is empty"),
        (&header_only, "the file holds no rows"),
        (&as_csv, "not a CSV file"),
        (&as_parquet, "wrong columns"),
        (&not_json, "not NDJSON"),
        (&unknown, "not a .csv"),
    ] {
        let report = run(&lake, &[good.clone(), file.clone()], 1.0).await;
        let reason = match &report.files[1].outcome {
            FileOutcome::Quarantined { reason } => reason.clone(),
            other => panic!("{file}: {other:?}"),
        };
        assert!(reason.contains(expected), "{file}: {reason}");
        assert!(report.refused.is_some());
        assert_eq!(versions(&lake).await, vec![0], "{file}: nothing committed");
        assert!(parquet_in_folder(&lake).await.is_empty(), "{file}");
        let sha = &report.files[1].sha256;
        let record = read_text(
            &lake,
            &format!("quarantine/clinical/lab_results/{sha}/file.json"),
        )
        .await;
        assert!(record.contains(expected), "{record}");
    }

    // The good file alone goes in.
    let report = run(&lake, &[good], 0.0).await;
    assert_eq!(report.refused, None);
    assert_eq!(report.accepted, 2);
    assert_eq!(versions(&lake).await, vec![0, 1]);
}

#[tokio::test]
async fn ndjson_and_parquet_feeds_are_held_to_the_same_contract() {
    let (dir, path, lake, ids) = lake_with_labs().await;
    let p0 = &ids[0];
    let ndjson = format!(
        "{{\"result_id\":\"R000001\",\"patient_id\":\"{p0}\",\"loinc_code\":\"2345-7\",\"value\":1.5,\"unit\":\"%\",\"taken\":\"2024-01-01\"}}\n\
         {{\"result_id\":\"R000002\",\"patient_id\":\"{p0}\",\"loinc_code\":\"2345-7\",\"value\":\"high\",\"unit\":\"%\",\"taken\":\"2024-01-01\"}}\n\
         {{\"result_id\":\"R000003\",\"patient_id\":\"{p0}\",\"loinc_code\":\"2345-7\",\"taken\":\"2024-01-01\",\"ssn\":\"123-45-6789\"}}\n\
         not json at all\n\
         \n\
         {{\"result_id\":\"R000004\",\"patient_id\":\"{p0}\",\"loinc_code\":\"2345-7\",\"taken\":\"2024-01-02\"}}\n"
    );
    let file = write(dir.path(), "labs.ndjson", ndjson.as_bytes());
    let report = run(&lake, &[file], 1.0).await;
    assert_eq!(
        (report.rows_read, report.accepted, report.quarantined),
        (5, 2, 3),
        "{report:?}"
    );
    assert_eq!(report.by_rule.get("type"), Some(&1));
    assert_eq!(report.by_rule.get("unknown_column"), Some(&1));
    assert_eq!(report.by_rule.get("json"), Some(&1));

    // The curated part as it lies in the lake is sealed with the dataset's own data keys: fed
    // back in, the ingest reads it with them (so a sealed extract lands in `raw/` sealed), and
    // its keys are taken, so every row is a duplicate.
    let part = parquet_in_folder(&lake).await.remove(0);
    let sealed = std::fs::read(path.join(&part)).unwrap();
    let copy = write(dir.path(), "sealed.parquet", &sealed);
    let report = run(&lake, &[copy], 1.0).await;
    assert_eq!((report.rows_read, report.quarantined), (2, 2), "{report:?}");
    assert_eq!(report.by_rule.get("unique"), Some(&2));
    let keys = lakegate_catalogs::keys::load(&lake, "clinical.lab_results")
        .await
        .unwrap();
    let options = parquet::arrow::arrow_reader::ArrowReaderOptions::new()
        .with_file_decryption_properties(keys.decryption());
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new_with_options(
            bytes::Bytes::from(sealed),
            options,
        )
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let mut plain = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut plain, batches[0].schema(), None).unwrap();
    for b in &batches {
        writer.write(b).unwrap();
    }
    writer.close().unwrap();
    let copy = write(dir.path(), "extract.parquet", &plain);
    let report = run(&lake, &[copy], 1.0).await;
    assert_eq!((report.rows_read, report.quarantined), (2, 2));
    assert_eq!(report.by_rule.get("unique"), Some(&2));

    // The same rows sealed with another lake's keys: not readable here, so the whole file is
    // quarantined saying it is encrypted.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Lake::in_memory().with_keyring(test_keyring(other_dir.path()));
    let foreign = lakegate_catalogs::keys::create(&other, "clinical.lab_results")
        .await
        .unwrap();
    let catalog = Catalog::load(&lake).await.unwrap();
    let labs = catalog.dataset("clinical.lab_results").unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .with_file_encryption_properties(foreign.encryption(labs).unwrap())
        .build();
    let mut alien = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut alien, batches[0].schema(), Some(props)).unwrap();
    for b in &batches {
        writer.write(b).unwrap();
    }
    writer.close().unwrap();
    let copy = write(dir.path(), "alien.parquet", &alien);
    let report = run(&lake, &[copy], 1.0).await;
    assert_eq!((report.rows_read, report.accepted), (0, 0), "{report:?}");
    assert!(
        matches!(&report.files[0].outcome, FileOutcome::Quarantined { reason } if reason.contains("ncrypt") || reason.contains("ecrypt")),
        "{:?}",
        report.files[0]
    );
}

#[tokio::test]
async fn a_second_ingest_into_the_same_dataset_waits_its_turn() {
    let (dir, _, lake, ids) = lake_with_labs().await;
    let p0 = &ids[0];
    let body = |n: u32| {
        let mut s = String::from("result_id,patient_id,loinc_code,value,unit,taken\n");
        for i in 0..5000 {
            s += &format!("R{:06},{p0},2345-7,1,%,2024-01-01\n", n * 10_000 + i);
        }
        s
    };
    let a = write(dir.path(), "a.csv", body(1).as_bytes());
    let b = write(dir.path(), "b.csv", body(2).as_bytes());
    let options = IngestOptions::default();
    let (ra, rb) = tokio::join!(
        ingest::ingest(
            &lake,
            "clinical.lab_results",
            std::slice::from_ref(&a),
            &options
        ),
        ingest::ingest(
            &lake,
            "clinical.lab_results",
            std::slice::from_ref(&b),
            &options
        ),
    );
    let outcomes = [ra, rb];
    let busy = outcomes
        .iter()
        .filter(|r| matches!(r, Err(CatalogError::Busy { .. })))
        .count();
    let done = outcomes.iter().filter(|r| r.is_ok()).count();
    assert_eq!(done + busy, 2, "{outcomes:?}");
    assert!(done >= 1);
    // The one that was told to retry does, and nothing is lost.
    for f in [&a, &b] {
        ingest::ingest(
            &lake,
            "clinical.lab_results",
            std::slice::from_ref(f),
            &options,
        )
        .await
        .unwrap();
    }
    let history = ingest::history(&lake, "clinical.lab_results")
        .await
        .unwrap();
    let accepted: u64 = history
        .iter()
        .filter_map(|v| v.ingest.as_ref())
        .flat_map(|r| r.sources.iter().map(|s| s.accepted))
        .sum();
    assert_eq!(accepted, 10_000);
}

#[tokio::test]
async fn each_feed_is_one_version_and_files_no_version_names_are_never_served() {
    let (dir, path, lake, ids) = lake_with_labs().await;
    let p0 = &ids[0];
    let header = "result_id,patient_id,loinc_code,value,unit,taken\n";
    let one = write(
        dir.path(),
        "one.csv",
        format!("{header}R000001,{p0},2345-7,1,%,2024-01-01\n").as_bytes(),
    );
    let two = write(
        dir.path(),
        "two.ndjson",
        format!(
            "{{\"result_id\":\"R000002\",\"patient_id\":\"{p0}\",\"loinc_code\":\"2345-7\",\"taken\":\"2024-01-02\"}}\n\
             {{\"result_id\":\"R000003\",\"patient_id\":\"{p0}\",\"loinc_code\":\"2345-7\",\"taken\":\"2024-01-03\"}}\n"
        )
        .as_bytes(),
    );
    assert_eq!(run(&lake, &[one], 0.0).await.version, Some(1));
    assert_eq!(run(&lake, &[two], 0.0).await.version, Some(2));
    assert_eq!(versions(&lake).await, vec![0, 1, 2]);
    // Each commit's OpenLineage run event, in the lake's lineage zone.
    let event: serde_json::Value = serde_json::from_str(
        &read_text(
            &lake,
            "lineage/openlineage/clinical.lab_results/v00000000000000000002.json",
        )
        .await,
    )
    .unwrap();
    assert_eq!(event["eventType"], "COMPLETE");
    assert_eq!(event["job"]["name"], "ingest.clinical.lab_results");
    assert_eq!(event["outputs"][0]["name"], "clinical.lab_results");
    assert_eq!(
        event["outputs"][0]["facets"]["version"]["datasetVersion"],
        "2"
    );
    assert_eq!(
        event["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"],
        2
    );
    let input = &event["inputs"][0];
    assert_eq!(input["facets"]["lakegate_source"]["file"], "two.ndjson");
    assert!(input["name"]
        .as_str()
        .unwrap()
        .starts_with("raw/clinical/lab_results/"));
    assert_eq!(
        input["facets"]["lakegate_source"]["sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    let d = Catalog::load(&lake)
        .await
        .unwrap()
        .dataset("clinical.lab_results")
        .unwrap()
        .clone();
    let (v1, files1) = lakegate_catalogs::delta::files(&lake, &d, Some(1))
        .await
        .unwrap();
    let (v2, files2) = lakegate_catalogs::delta::files(&lake, &d, None)
        .await
        .unwrap();
    assert_eq!((v1, files1.len(), v2, files2.len()), (1, 1, 2, 2));

    // A file in the folder that no version names (what an ingest stopped before its commit
    // leaves) is never read: carol, at the patient's site or not, and the catalog agree.
    let committed = parquet_in_folder(&lake).await.remove(0);
    std::fs::copy(
        path.join(&committed),
        path.join("curated/clinical/lab_results/part-99999-stray.parquet"),
    )
    .unwrap();
    assert_eq!(parquet_in_folder(&lake).await.len(), 3);
    assert_eq!(d.file_versions(&lake.store()).await.unwrap().len(), 2);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(path.clone()),
        keyring: lake.keyring().cloned(),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let batches = sql(&mut alice, "SELECT count(*) FROM clinical.lab_results")
        .await
        .unwrap();
    let consenting = raw_query_in(
        &path,
        &format!(
            "SELECT count(*) FROM clinical_patients WHERE patient_id = '{p0}' AND research_consent"
        ),
    )
    .await;
    let per_row = lakegate_tests::scalar_i64(&consenting);
    assert_eq!(crate::common::first_i64(&batches), 3 * per_row);

    // Earlier versions by name, under the same policy: alice's consent filter and pseudonyms.
    for (version, rows) in [(0, 0), (1, 1), (2, 3)] {
        let q = format!("SELECT count(*) FROM clinical.\"lab_results@v{version}\"");
        let batches = sql(&mut alice, &q).await.unwrap();
        assert_eq!(crate::common::first_i64(&batches), rows * per_row, "{q}");
    }
    let batches = sql(
        &mut alice,
        "SELECT patient_id FROM clinical.\"lab_results@v1\"",
    )
    .await
    .unwrap();
    assert!(crate::common::column_text(&batches, 0)
        .iter()
        .all(|p| p != p0));
    let missing = sql(&mut alice, "SELECT * FROM clinical.\"lab_results@v7\"")
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("not found"), "{missing}");
    let mut mallory = login(&server, "mallory").await;
    let denied = sql(&mut mallory, "SELECT * FROM clinical.\"lab_results@v1\"")
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("not found"), "{denied}");
}

#[tokio::test]
async fn loading_data_is_a_grant_of_its_own() {
    use lakegate_flight_server::demo::DEMO_POLICY;
    use lakegate_policies::{Action, PolicySet, RequestContext, DEFAULT_MODEL};
    let (_dir, _, lake, _) = lake_with_labs().await;
    let catalog = Catalog::load(&lake).await.unwrap();
    let policy = PolicySet::load(DEFAULT_MODEL, "policy.toml", DEMO_POLICY, &catalog)
        .await
        .unwrap();
    let decide = |who: &str, dataset: &str, action: Action| {
        policy
            .decide(
                &crate::common::persona(who),
                catalog.dataset(dataset).unwrap(),
                action,
                &RequestContext::default(),
            )
            .is_allowed()
    };
    assert!(decide("gina", "clinical.lab_results", Action::Ingest));
    assert!(decide("gina", "clinical.encounters", Action::Ingest));
    assert!(!decide("gina", "omics.variants", Action::Ingest));
    assert!(!decide("gina", "audit.events", Action::Ingest));
    for reader in ["alice", "bob", "carol", "dave", "erin", "mallory"] {
        assert!(
            !decide(reader, "clinical.lab_results", Action::Ingest),
            "{reader}"
        );
    }
    // gina loads; she reads nothing.
    for action in [Action::RowQuery, Action::AggregateQuery] {
        assert!(!decide("gina", "clinical.lab_results", action));
        assert!(!decide("gina", "clinical.patients", action));
    }
}

/// `lakegate demo`'s lake is filled through the ingest path: each demo dataset has one version
/// per feed, committed by the demo's principal with no rejected row and its extracts in `raw/`,
/// and its earlier versions are served under the caller's policy like the newest.
#[tokio::test]
async fn the_demo_lake_is_built_through_ingest_in_versions() {
    use lakegate_catalogs::demo::{demo_catalog, DEMO_PRINCIPAL, FEEDS};
    let path = lakegate_tests::lake_path();
    let lake = Lake::open(path.to_str().unwrap()).unwrap();
    for d in demo_catalog().datasets {
        let history = ingest::history(&lake, &d.name).await.unwrap();
        assert_eq!(history.len() as u64, FEEDS + 1, "{}", d.name);
        for v in &history[1..] {
            let record = v.ingest.as_ref().expect("lineage");
            assert_eq!(record.principal, DEMO_PRINCIPAL);
            assert!(!record.sources.is_empty());
            for s in &record.sources {
                assert_eq!(s.quarantined, 0, "{}", s.source);
                assert!(path.join(&s.raw).is_file(), "{}", s.raw);
            }
        }
    }
    let server = TestServer::start().await;
    let mut carol = login(&server, "carol").await;
    let count = |version: &str| format!("SELECT count(*) FROM clinical.\"encounters{version}\"");
    let mut seen = Vec::new();
    for v in 1..=FEEDS {
        let batches = sql(&mut carol, &count(&format!("@v{v}"))).await.unwrap();
        seen.push(crate::common::first_i64(&batches));
    }
    let now = crate::common::first_i64(&sql(&mut carol, &count("")).await.unwrap());
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(*seen.last().unwrap(), now);
    // carol's site filter holds on an old version: only her site's rows.
    let sites = sql(
        &mut carol,
        "SELECT DISTINCT site_id FROM clinical.\"encounters@v1\"",
    )
    .await
    .unwrap();
    assert_eq!(crate::common::column_text(&sites, 0), vec!["SITE_A"]);
    // bob's threshold holds there too: row-level reads are refused.
    let mut bob = login(&server, "bob").await;
    assert!(sql(&mut bob, "SELECT * FROM clinical.\"patients@v2\"")
        .await
        .is_err());
}

/// Feeds of one process that share a key cache (as the demo's do) check `unique` and
/// `references` exactly as feeds that read the lake afresh: a later feed's duplicate of a
/// committed key is refused, and a key of a refused feed (never committed) is not taken.
#[tokio::test]
async fn feeds_sharing_a_key_cache_check_as_fresh_ones_do() {
    let (dir, _, lake, ids) = lake_with_labs().await;
    let cache = std::sync::Arc::new(ingest::KeyCache::default());
    let feed = |ratio: f64| IngestOptions {
        principal: "lab-feed".into(),
        max_reject_ratio: ratio,
        key_cache: Some(std::sync::Arc::clone(&cache)),
        ..Default::default()
    };
    let header = "result_id,patient_id,loinc_code,value,unit,taken\n";
    let csv = |rows: &[(&str, &str)]| {
        let mut s = header.to_string();
        for (id, patient) in rows {
            s += &format!("{id},{patient},2345-7,1,%,2024-01-01\n");
        }
        s
    };
    let go = |name: &str, body: String, ratio: f64| {
        let path = write(dir.path(), name, body.as_bytes());
        let options = feed(ratio);
        let lake = &lake;
        async move {
            ingest::ingest(lake, "clinical.lab_results", &[path], &options)
                .await
                .unwrap()
        }
    };
    let first = go(
        "a.csv",
        csv(&[("R000001", &ids[0]), ("R000002", &ids[1])]),
        0.0,
    )
    .await;
    assert_eq!((first.accepted, first.version), (2, Some(1)), "{first:?}");
    // R000003 is accepted row by row but the feed is refused (an unknown patient): nothing of
    // it is committed, so its key stays free.
    let refused = go(
        "b.csv",
        csv(&[("R000003", &ids[2]), ("R000004", "nobody")]),
        0.0,
    )
    .await;
    assert!(refused.refused.is_some(), "{refused:?}");
    assert_eq!(refused.by_rule.get("references"), Some(&1));
    let second = go(
        "c.csv",
        csv(&[
            ("R000001", &ids[2]),
            ("R000003", &ids[2]),
            ("R000005", "nobody"),
        ]),
        1.0,
    )
    .await;
    assert_eq!(second.version, Some(2), "{second:?}");
    assert_eq!(second.accepted, 1, "only R000003: {second:?}");
    assert_eq!(second.by_rule.get("unique"), Some(&1));
    assert_eq!(second.by_rule.get("references"), Some(&1));
    // A feed without the cache reads the lake and agrees.
    let fresh = run(
        &lake,
        &[write(
            dir.path(),
            "d.csv",
            csv(&[("R000003", &ids[0])]).as_bytes(),
        )],
        1.0,
    )
    .await;
    assert_eq!(fresh.by_rule.get("unique"), Some(&1), "{fresh:?}");
}
