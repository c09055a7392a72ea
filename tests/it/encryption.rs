//! Encryption at rest: an encrypted lake answers as the plain one does, its files open for no
//! Parquet reader without the keys, a dataset whose keys do not unwrap is refused by name while
//! the rest serve, and rotating the master key rewrites no data file.

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::util::pretty::pretty_format_batches;
use lakegate_catalogs::{keys, Catalog, Keyring, Lake};
use lakegate_tests::{build_encrypted_lake, build_lake, test_keyring, ServerOptions, TestServer};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::{code_of, login, sql};

const PATIENTS: u64 = 300;

async fn serve(lake: &Path, keyring: Option<Keyring>) -> TestServer {
    TestServer::start_with(ServerOptions {
        lake: Some(lake.to_path_buf()),
        keyring,
        ..Default::default()
    })
    .await
}

/// Every Parquet file of the lake (the curated tables and the extracts in `raw/`), by path
/// below it, with its bytes.
fn parquet_files(lake: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&lake.join("curated"), lake, &mut out);
    if lake.join("raw").exists() {
        walk(&lake.join("raw"), lake, &mut out);
    }
    out
}

async fn answer(server: &TestServer, user: &str, query: &str) -> String {
    let mut client = login(server, user).await;
    let batches = sql(&mut client, query).await.unwrap();
    pretty_format_batches(&batches).unwrap().to_string()
}

#[tokio::test]
async fn an_encrypted_lake_answers_as_the_plain_one_and_its_files_open_for_no_reader_without_keys()
{
    let (_plain_dir, plain) = build_lake(PATIENTS);
    let (dir, encrypted) = build_encrypted_lake(PATIENTS);

    // The same seed: the same rows, so every governed answer is the same.
    let a = serve(&plain, None).await;
    let b = serve(&encrypted, Some(test_keyring(dir.path()))).await;
    for (user, query) in [
        (
            "alice",
            "SELECT patient_id, birth_date, zip FROM clinical.patients ORDER BY patient_id",
        ),
        (
            "carol",
            "SELECT patient_id, last_name, ssn FROM clinical.patients ORDER BY patient_id",
        ),
        (
            "carol",
            "SELECT e.patient_id, count(*) FROM clinical.encounters e \
             JOIN clinical.conditions c ON c.encounter_id = e.encounter_id \
             GROUP BY e.patient_id ORDER BY 1",
        ),
        (
            "bob",
            "SELECT sex, count(*) FROM clinical.patients GROUP BY sex ORDER BY 1",
        ),
    ] {
        let expected = answer(&a, user, query).await;
        assert!(expected.lines().count() > 4, "{user}: {query}\n{expected}");
        assert_eq!(answer(&b, user, query).await, expected, "{user}: {query}");
    }

    // A copied-out file: footer and columns are encrypted, so a Parquet reader without the
    // data keys opens nothing, and no SSN or name appears in the bytes.
    let files = parquet_files(&encrypted);
    assert!(files.len() >= 5, "{:?}", files.keys());
    assert!(
        files.keys().any(|n| n.starts_with("raw/")),
        "the demo's extracts land in raw/: {:?}",
        files.keys()
    );
    let batches = lakegate_tests::raw_query_in(
        &plain,
        "SELECT ssn, last_name FROM clinical_patients ORDER BY patient_id LIMIT 20",
    )
    .await;
    let secrets: Vec<String> = crate::common::column_text(&batches, 0)
        .into_iter()
        .chain(crate::common::column_text(&batches, 1))
        .collect();
    assert_eq!(secrets.len(), 40);
    for (name, bytes) in &files {
        let opened = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes.clone()));
        assert!(opened.is_err(), "{name} opened without keys");
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{name} holds a plaintext value"
            );
        }
    }
    // The plain lake's patients file does hold them: the check above can fail.
    let plain_files = parquet_files(&plain);
    let patients_plain = plain_files
        .iter()
        .filter(|(n, _)| n.contains("patients"))
        .any(|(_, b)| {
            secrets[..20]
                .iter()
                .any(|s| b.windows(s.len()).any(|w| w == s.as_bytes()))
        });
    assert!(patients_plain, "the plain lake stores SSNs in the clear");

    // The key files in the lake hold wrapped keys only: the keyring's master key is not there.
    let ring = std::fs::read_to_string(dir.path().join("keyring.toml")).unwrap();
    let master = ring
        .lines()
        .find_map(|l| l.split_once(" = \"").filter(|(k, _)| k.starts_with("mk-")))
        .map(|(_, v)| v.trim_end_matches('"').to_string())
        .unwrap();
    for d in ["clinical.patients", "omics.variants"] {
        let file = std::fs::read_to_string(encrypted.join(keys::key_file(d).as_ref())).unwrap();
        assert!(!file.contains(&master));
    }
}

#[tokio::test]
async fn a_dataset_whose_keys_do_not_unwrap_is_refused_by_name_while_the_rest_serve() {
    let (dir, lake_path) = build_encrypted_lake(100);
    // Swap two wrapped keys of clinical.observations: each is bound to its class, so neither
    // unwraps any more (a key file changed by hand, or restored from another lake).
    let key_file = lake_path.join(keys::key_file("clinical.observations").as_ref());
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    let wrapped = file["keys"].as_array_mut().unwrap();
    let first = wrapped[0]["wrapped"].clone();
    wrapped[0]["wrapped"] = wrapped[1]["wrapped"].clone();
    wrapped[1]["wrapped"] = first;
    std::fs::write(&key_file, serde_json::to_vec(&file).unwrap()).unwrap();

    let server = serve(&lake_path, Some(test_keyring(dir.path()))).await;
    let mut carol = login(&server, "carol").await;
    let err = sql(&mut carol, "SELECT count(*) FROM clinical.observations")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(code_of(&err), "Unavailable", "{text}");
    assert!(
        text.contains("clinical.observations") && text.contains("encrypted at rest"),
        "{text}"
    );
    assert!(!text.contains("mk-"), "no key names reach a client: {text}");
    // Every other dataset serves, and the server keeps serving.
    let batches = sql(&mut carol, "SELECT count(*) FROM clinical.encounters")
        .await
        .unwrap();
    assert!(crate::common::first_i64(&batches) > 0);

    // Without any keyring, every encrypted dataset is refused the same way; carol's row
    // filter reads clinical.patients first, and a row filter's read names no dataset.
    let server = serve(&lake_path, None).await;
    let mut carol = login(&server, "carol").await;
    let err = sql(&mut carol, "SELECT count(*) FROM clinical.encounters")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "Unavailable", "{err}");
    assert!(
        err.to_string()
            .contains("a dataset of the lake is encrypted at rest"),
        "{err}"
    );
    let mut bob = login(&server, "bob").await;
    let err = sql(&mut bob, "SELECT count(*) FROM clinical.encounters")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "Unavailable", "{err}");
    assert!(err.to_string().contains("clinical.encounters"), "{err}");
}

#[tokio::test]
async fn rotating_the_master_key_rewraps_data_keys_and_rewrites_no_data_file() {
    let (dir, lake_path) = build_encrypted_lake(100);
    let before = parquet_files(&lake_path);
    let query = "SELECT count(*), count(DISTINCT patient_id) FROM clinical.encounters";
    let expected = answer(
        &serve(&lake_path, Some(test_keyring(dir.path()))).await,
        "carol",
        query,
    )
    .await;

    // The keyring as it was, kept in a file of its own.
    let old_file = dir.path().join("old-keyring.toml");
    std::fs::copy(dir.path().join("keyring.toml"), &old_file).unwrap();
    let mut ring = test_keyring(dir.path());
    ring.add_active_key();
    ring.save().unwrap();
    let lake = Lake::open(lake_path.to_str().unwrap())
        .unwrap()
        .with_keyring(ring.clone());
    let catalog = Catalog::load(&lake).await.unwrap();
    let mut rewrapped = 0;
    for d in catalog.datasets.iter().filter(|d| d.encrypted) {
        rewrapped += keys::rewrap(&lake, &d.name).await.unwrap();
    }
    assert_eq!(rewrapped, 5 * keys::KEY_CLASSES.len());
    ring.retire_inactive();
    ring.save().unwrap();

    assert_eq!(parquet_files(&lake_path), before, "no data file changed");
    let rotated = serve(&lake_path, Some(Keyring::load(ring.path()).unwrap())).await;
    assert_eq!(answer(&rotated, "carol", query).await, expected);
    // The retired key alone no longer opens the lake.
    let retired = serve(&lake_path, Some(Keyring::load(&old_file).unwrap())).await;
    let mut carol = login(&retired, "carol").await;
    let err = sql(&mut carol, query).await.unwrap_err();
    assert_eq!(code_of(&err), "Unavailable", "{err}");
}
