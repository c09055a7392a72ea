//! De-identified releases through the real server: made as alice behind the k-anonymity gate,
//! approved by a second person, read over Flight SQL by the project's principals only,
//! encrypted at rest, refused once tampered with.

use std::collections::BTreeSet;

use lakegate_engine::releases::{self, CreateRequest};
use lakegate_tests::{
    build_encrypted_lake, test_audit_key, test_keyring, ServerOptions, TestServer,
};

use crate::common::{code_of, column_text, first_i64, login, persona, rows, sql};

const PATIENTS: u64 = 1500;

fn request(name: &str, tables: &[(&str, &str)], suppress: bool) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        tables: tables
            .iter()
            .map(|(t, q)| (t.to_string(), q.to_string()))
            .collect(),
        suppress,
    }
}

fn refusal(e: lakegate_engine::EngineError) -> String {
    match e {
        lakegate_engine::EngineError::PermissionDenied(m) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_gated_approved_read_by_its_project_and_checked() {
    let (dir, lake_path) = build_encrypted_lake(PATIENTS);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(lake_path.clone()),
        keyring: Some(test_keyring(dir.path())),
        ..Default::default()
    })
    .await;
    let engine = &server.engine;
    let signer = test_audit_key();
    let alice = persona("alice");

    // Whole patients: birth year, sex, race, ethnicity and ZIP3 single most patients out.
    let patients = [("patients", "SELECT * FROM clinical.patients")];
    let err = releases::create(engine, &alice, &request("onc-p", &patients, false), &signer)
        .await
        .unwrap_err();
    let msg = refusal(err);
    assert!(msg.contains("rule: release-k-anonymity"), "{msg}");
    assert!(msg.contains("records at risk"), "{msg}");
    assert!(msg.contains("birth_date") && msg.contains("zip"), "{msg}");
    // Nothing of the refused release is left in the lake: no files, no data keys.
    assert!(releases::names(server.lake.store().as_ref())
        .await
        .unwrap()
        .is_empty());
    let keys: Vec<_> = std::fs::read_dir(lake_path.join("catalog/keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("release."))
        .collect();
    assert!(keys.is_empty(), "{keys:?}");

    // With --suppress the records at risk go, counted.
    let made = releases::create(engine, &alice, &request("onc-p", &patients, true), &signer)
        .await
        .expect("suppressed release");
    let risk = &made.tables[0].risk;
    assert!(!risk.passed && risk.suppressed_records > 0, "{risk}");
    assert_eq!(risk.suppressed_records, risk.records_at_risk);
    assert_eq!(made.tables[0].rows, risk.records - risk.suppressed_records);
    assert!(risk.released_highest_risk <= 1.0 / 11.0, "{risk}");
    // city is nullified for alice: not a quasi-identifier that survives masking.
    assert!(!risk.quasi_identifiers.contains(&"city".to_string()));

    // Encounters, with care times generalised to the month by the demo policy.
    let enc = [(
        "encounters",
        "SELECT patient_id, encounter_id, start_time, encounter_class, total_cost FROM clinical.encounters",
    )];
    let made = releases::create(engine, &alice, &request("onc-e", &enc, true), &signer)
        .await
        .expect("encounters release");
    let t = &made.tables[0];
    assert_eq!(
        t.risk.generalised.get("start_time").map(String::as_str),
        Some("month")
    );
    assert_eq!(t.risk.quasi_identifiers, vec!["start_time".to_string()]);
    assert_eq!(made.project, "oncology");
    assert_eq!(made.created_by, "alice");
    assert!(made.key_epoch.is_some() && made.data_keys.is_some());
    assert!(made
        .sources
        .iter()
        .any(|s| s.dataset == "clinical.encounters" && s.version.is_some()));

    // A name is used once.
    let again = releases::create(engine, &alice, &request("onc-e", &enc, true), &signer)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");

    // Pending: not readable, even by its creator.
    let mut a = login(&server, "alice").await;
    let read = "SELECT count(*) FROM releases.\"onc-e\".encounters";
    let err = sql(&mut a, read).await.unwrap_err();
    assert_eq!(code_of(&err), "PermissionDenied");
    assert!(err.to_string().contains("pending approval"), "{err}");

    // Approval: not by someone without the attribute, not by the creator, once by erin.
    let store = server.lake.store();
    let lake = &server.lake;
    let err = releases::approve(lake, "onc-e", &persona("bob"), &signer)
        .await
        .unwrap_err();
    assert!(refusal(err).contains("release_approver"));
    let mut alice_approver = alice.clone();
    alice_approver
        .attributes
        .insert("release_approver".into(), "true".into());
    let err = releases::approve(lake, "onc-e", &alice_approver, &signer)
        .await
        .unwrap_err();
    assert!(refusal(err).contains("two people"));
    releases::approve(lake, "onc-e", &persona("erin"), &signer)
        .await
        .expect("erin approves");
    assert!(releases::approve(lake, "onc-e", &persona("erin"), &signer)
        .await
        .is_err());

    // alice reads it: the rows the manifest counts, with the pseudonyms of her live queries.
    let n = first_i64(&sql(&mut a, read).await.expect("approved release reads"));
    assert_eq!(n as u64, t.rows);
    let released: BTreeSet<String> = column_text(
        &sql(
            &mut a,
            "SELECT DISTINCT patient_id FROM releases.\"onc-e\".encounters",
        )
        .await
        .unwrap(),
        0,
    )
    .into_iter()
    .collect();
    let live: BTreeSet<String> = column_text(
        &sql(
            &mut a,
            "SELECT DISTINCT patient_id FROM clinical.encounters",
        )
        .await
        .unwrap(),
        0,
    )
    .into_iter()
    .collect();
    assert!(!released.is_empty() && released.is_subset(&live));
    // Its classes all hold k patients.
    let small = sql(
        &mut a,
        "SELECT start_time FROM releases.\"onc-e\".encounters GROUP BY start_time \
         HAVING count(DISTINCT patient_id) < 11",
    )
    .await
    .unwrap();
    assert_eq!(rows(&small), 0);
    // Shuffled: not in the order of the live table's files.
    let first = |q: &str| {
        let q = q.to_string();
        let mut a = a.clone();
        async move { column_text(&sql(&mut a, &q).await.unwrap(), 0) }
    };
    let released_order =
        first("SELECT encounter_id FROM releases.\"onc-e\".encounters LIMIT 50").await;
    let live_order = first("SELECT encounter_id FROM clinical.encounters LIMIT 50").await;
    assert_ne!(released_order, live_order);

    // Another project, or nobody's: the same answer as for a name that does not exist.
    for who in ["dave", "bob", "mallory"] {
        let mut c = login(&server, who).await;
        let err = sql(&mut c, read).await.unwrap_err();
        assert_eq!(code_of(&err), "PermissionDenied", "{who}");
        assert!(
            err.to_string().contains("is not available to you"),
            "{who}: {err}"
        );
    }
    let err = sql(&mut a, "SELECT * FROM releases.\"no-such\".encounters")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not available to you"), "{err}");

    // The read is in the audit trail under the release's name.
    let mut trail = String::new();
    for _ in 0..50 {
        trail = crate::audit::trail_text(&server).await;
        if trail.contains("releases.onc-e.encounters") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(trail.contains("releases.onc-e.encounters: read of a release approved by erin"));

    // Copied out of the lake, a released file does not open without the keys.
    let file = &t.files[0];
    let bytes = std::fs::read(lake_path.join(&file.path)).unwrap();
    let opened = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes.clone()),
    );
    assert!(
        opened.is_err(),
        "an encrypted release file opened without keys"
    );

    // A data file changed after approval (same size): verify names it, reads are refused.
    let (_, problems) = releases::verify(store.as_ref(), "onc-e", &signer.verifying_key())
        .await
        .unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let mut changed = bytes;
    let middle = changed.len() / 2;
    changed[middle] ^= 0x01;
    std::fs::write(lake_path.join(&file.path), &changed).unwrap();
    let (_, problems) = releases::verify(store.as_ref(), "onc-e", &signer.verifying_key())
        .await
        .unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("table encounters part 0"),
        "{problems:?}"
    );
    let err = sql(&mut a, read).await.unwrap_err();
    assert_eq!(code_of(&err), "PermissionDenied");
    assert!(err.to_string().contains("release-integrity"), "{err}");
    assert!(
        !err.to_string().contains(&file.path),
        "a file location left: {err}"
    );

    // A manifest changed after approval is no longer approved, nor signed.
    let manifest = lake_path.join("releases/onc-p/manifest.json");
    releases::approve(lake, "onc-p", &persona("erin"), &signer)
        .await
        .unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("\"project\": \"oncology\"", "\"project\": \"cardiology\""),
    )
    .unwrap();
    let err = releases::verify(store.as_ref(), "onc-p", &signer.verifying_key())
        .await
        .err()
        .expect("tampered manifest");
    assert!(err.to_string().contains("signature does not hold"), "{err}");
    let mut d = login(&server, "dave").await;
    let err = sql(&mut d, "SELECT count(*) FROM releases.\"onc-p\".patients")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("release-integrity"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_refuse_what_the_principal_may_not_release() {
    let (dir, lake_path) = build_encrypted_lake(300);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(lake_path),
        keyring: Some(test_keyring(dir.path())),
        ..Default::default()
    })
    .await;
    let engine = &server.engine;
    let signer = test_audit_key();

    // A query the principal's policy refuses: refused with its rule (bob: aggregates only);
    // a dataset they may not see at all does not exist for them.
    let rows_of = [("patients", "SELECT * FROM clinical.patients")];
    let err = releases::create(
        engine,
        &persona("bob"),
        &request("x", &rows_of, true),
        &signer,
    )
    .await
    .unwrap_err();
    let msg = refusal(err);
    assert!(
        msg.contains("row_query on clinical.patients is refused (rule:"),
        "{msg}"
    );
    let omics = [("variants", "SELECT * FROM omics.variants")];
    let err = releases::create(
        engine,
        &persona("dave"),
        &request("x", &omics, true),
        &signer,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    // Identified rows (a clinician's view) never become a release.
    let mut clinician = persona("carol");
    clinician
        .attributes
        .insert("project".into(), "oncology".into());
    let err = releases::create(
        engine,
        &clinician,
        &request(
            "y",
            &[("p", "SELECT patient_id, ssn, sex FROM clinical.patients")],
            true,
        ),
        &signer,
    )
    .await
    .unwrap_err();
    let msg = refusal(err);
    assert!(
        msg.contains("rule: release-deidentified") && msg.contains("ssn"),
        "{msg}"
    );

    // No project, no release; differentially private answers are never materialised.
    let err = releases::create(
        engine,
        &persona("carol"),
        &request("z", &[("p", "SELECT sex FROM clinical.patients")], true),
        &signer,
    )
    .await
    .unwrap_err();
    assert!(refusal(err).contains("rule: release-project"));

    // Names that cannot be a release.
    for bad in ["../curated", "Onc", ""] {
        let err = releases::create(
            engine,
            &persona("alice"),
            &request(bad, &[("p", "SELECT sex FROM clinical.patients")], true),
            &signer,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("rule: release-name"), "{err}");
    }
    assert!(releases::names(server.lake.store().as_ref())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_deletes_expired_releases_moves_cold_data_and_respects_holds() {
    use lakegate_engine::lifecycle::{self, Step, Tiering};
    let (dir, lake_path) = build_encrypted_lake(300);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(lake_path.clone()),
        keyring: Some(test_keyring(dir.path())),
        ..Default::default()
    })
    .await;
    let (engine, lake) = (&server.engine, &server.lake);
    let signer = test_audit_key();
    let key = signer.verifying_key();
    let tables = [(
        "patients",
        "SELECT patient_id, sex FROM clinical.patients WHERE sex <> 'X-123-45-6789'",
    )];
    let made = releases::create(
        engine,
        &persona("alice"),
        &request("old", &tables, true),
        &signer,
    )
    .await
    .unwrap();
    // The manifest keeps the query's shape, never a literal the creator typed.
    let query = &made.tables[0].query;
    assert!(
        query.contains("FROM clinical.patients") && !query.contains("6789"),
        "{query}"
    );
    releases::approve(lake, "old", &persona("erin"), &signer)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    assert!(lifecycle::plan(lake, &key, None, now)
        .await
        .unwrap()
        .is_empty());
    let later = now + chrono::Duration::days(731);

    // Holds: the compliance role only, on names the lake holds.
    let err = lifecycle::add_hold(lake, "old", "litigation", &persona("alice"))
        .await
        .unwrap_err();
    assert!(refusal(err).contains("legal-hold-compliance-only"));
    let err = lifecycle::add_hold(lake, "no-such", "litigation", &persona("erin"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing to hold"), "{err}");
    lifecycle::add_hold(lake, "old", "litigation 2026-117", &persona("erin"))
        .await
        .unwrap();
    let steps = lifecycle::plan(lake, &key, None, later).await.unwrap();
    assert_eq!(
        steps,
        vec![Step::Held {
            name: "old".into(),
            reason: "litigation 2026-117".into()
        }]
    );
    for s in &steps {
        assert!(!lifecycle::apply(lake, &key, s).await.unwrap());
    }
    let file = lake_path.join(&made.tables[0].files[0].path);
    assert!(file.exists(), "a held release was touched");
    lifecycle::remove_hold(lake, "old", &persona("erin"))
        .await
        .unwrap();

    // An interrupted run: the tombstone written, the files not yet removed. The rerun only
    // finishes the files (not a second deletion to audit).
    std::fs::write(
        lake_path.join("releases/old/deleted.json"),
        r#"{"release":"old","deleted_at":"2028-12-07T00:00:00Z","reason":"retention expired"}"#,
    )
    .unwrap();
    let steps = lifecycle::plan(lake, &key, None, later).await.unwrap();
    assert_eq!(
        steps,
        vec![Step::FinishDeletion {
            name: "old".into(),
            files: 1
        }]
    );
    assert!(!lifecycle::apply(lake, &key, &steps[0]).await.unwrap());
    assert!(!file.exists());
    assert!(lifecycle::plan(lake, &key, None, later)
        .await
        .unwrap()
        .is_empty());
    // The manifest stays; reads say what happened.
    let stored = releases::load(lake.store().as_ref(), "old", &key)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(stored.status(), releases::Status::Deleted { .. }));
    let mut a = login(&server, "alice").await;
    let err = sql(&mut a, "SELECT count(*) FROM releases.\"old\".patients")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rule: release-lifecycle"), "{err}");

    // A release past retention with no hold goes in one run.
    releases::create(
        engine,
        &persona("alice"),
        &request("older", &tables, true),
        &signer,
    )
    .await
    .unwrap();
    let steps = lifecycle::plan(lake, &key, None, later).await.unwrap();
    assert!(matches!(&steps[..], [Step::DeleteRelease { name, .. }] if name == "older"));
    assert!(lifecycle::apply(lake, &key, &steps[0]).await.unwrap());
    assert!(lifecycle::plan(lake, &key, None, later)
        .await
        .unwrap()
        .is_empty());

    // Tiering: raw extracts move to cold/ with their bytes unchanged, except a held dataset's.
    lifecycle::add_hold(lake, "clinical.patients", "audit request", &persona("erin"))
        .await
        .unwrap();
    let tiering = Tiering {
        cold_after_days: 30,
        cold_prefix: "cold".into(),
    };
    assert!(lifecycle::plan(lake, &key, Some(&tiering), now)
        .await
        .unwrap()
        .is_empty());
    let steps = lifecycle::plan(lake, &key, Some(&tiering), later)
        .await
        .unwrap();
    let moves: Vec<_> = steps
        .iter()
        .filter_map(|s| match s {
            Step::MoveCold { from, to, .. } => Some((from.clone(), to.clone())),
            _ => None,
        })
        .collect();
    assert!(!moves.is_empty());
    assert!(moves
        .iter()
        .all(|(f, _)| !f.starts_with("raw/clinical/patients/")));
    assert!(steps
        .iter()
        .any(|s| matches!(s, Step::HeldRaw { dataset, .. } if dataset == "clinical.patients")));
    let before: Vec<Vec<u8>> = moves
        .iter()
        .map(|(f, _)| std::fs::read(lake_path.join(f)).unwrap())
        .collect();
    for s in &steps {
        lifecycle::apply(lake, &key, s).await.unwrap();
    }
    for ((from, to), bytes) in moves.iter().zip(before) {
        assert!(!lake_path.join(from).exists());
        assert_eq!(std::fs::read(lake_path.join(to)).unwrap(), bytes);
    }
    assert!(std::fs::read_dir(lake_path.join("raw/clinical/patients"))
        .unwrap()
        .next()
        .is_some());
    // The lake still serves: queries read curated/, never raw/.
    let n = first_i64(
        &sql(&mut a, "SELECT count(*) FROM clinical.encounters")
            .await
            .unwrap(),
    );
    assert!(n > 0);
}

/// The demo policy with further generalisations and l-diversity in its `[release]` section.
fn policy_with_release(section: &str) -> String {
    let demo = lakegate_flight_server::demo::DEMO_POLICY;
    let at = demo.find("[release]").expect("a [release] section");
    let end = demo[at..]
        .find("\n\n")
        .map(|i| at + i)
        .unwrap_or(demo.len());
    format!("{}[release]\n{section}\n{}", &demo[..at], &demo[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ages_bands_states_and_l_diversity_shape_a_release_that_plain_flight_reads_by_path() {
    let (dir, lake_path) = build_encrypted_lake(PATIENTS);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(lake_path),
        keyring: Some(test_keyring(dir.path())),
        policy: Some(policy_with_release(
            "k = 11\n\
             generalise = { birth_date = \"age_band_20\", zip = \"state\", death_date = \"drop\", \
             start_time = \"month\" }\n\
             l = 3\n\
             sensitive = [\"reason_code\", \"readmitted_30d\"]",
        )),
        ..Default::default()
    })
    .await;
    let engine = &server.engine;
    let signer = test_audit_key();
    let alice = persona("alice");

    // Patients: ages in 20-year bands (90+ together), ZIP3 to its state, death_date left out.
    let patients = [(
        "patients",
        "SELECT patient_id, birth_date, zip, death_date, sex FROM clinical.patients",
    )];
    let made = releases::create(engine, &alice, &request("onc-g", &patients, true), &signer)
        .await
        .expect("generalised release");
    let risk = &made.tables[0].risk;
    let this_year = chrono::Datelike::year(&chrono::Utc::now());
    assert_eq!(
        risk.generalised.get("birth_date"),
        Some(&format!("age_band_20 (age in {this_year})"))
    );
    assert_eq!(
        risk.generalised.get("zip").map(String::as_str),
        Some("state")
    );
    assert_eq!(risk.dropped, vec!["death_date".to_string()]);
    assert_eq!(
        risk.quasi_identifiers,
        vec![
            "birth_date".to_string(),
            "zip".to_string(),
            "sex".to_string()
        ]
    );
    // No sensitive column in this table: l-diversity does not apply to it.
    assert!(
        risk.sensitive.is_empty() && risk.classes_below_l == 0,
        "{risk}"
    );
    let columns: Vec<&str> = made.tables[0]
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["patient_id", "birth_date", "zip", "sex"]);

    // Encounters: every start month must hold 3 reason codes; a table whose one sensitive
    // column has two values cannot pass l = 3, and is refused under the l-diversity rule.
    let readmitted = [(
        "readmitted",
        "SELECT patient_id, readmitted_30d FROM clinical.encounters",
    )];
    let err = releases::create(
        engine,
        &alice,
        &request("onc-r", &readmitted, false),
        &signer,
    )
    .await
    .unwrap_err();
    let msg = refusal(err);
    assert!(msg.contains("rule: release-l-diversity"), "{msg}");
    assert!(
        msg.contains("l=3 over readmitted_30d: fewest distinct values in a class 2 (counted"),
        "{msg}"
    );
    let encounters = [(
        "encounters",
        "SELECT patient_id, start_time, reason_code FROM clinical.encounters",
    )];
    let made = releases::create(
        engine,
        &alice,
        &request("onc-l", &encounters, true),
        &signer,
    )
    .await
    .expect("l-diverse release");
    let risk = &made.tables[0].risk;
    assert_eq!(
        (risk.l, risk.sensitive.clone()),
        (3, vec!["reason_code".to_string()])
    );
    for name in ["onc-g", "onc-l"] {
        releases::approve(&server.lake, name, &persona("erin"), &signer)
            .await
            .expect("erin approves");
    }

    // A plain Flight client: GetFlightInfo by path, then DoGet of the ticket it returns.
    let sql_client = login(&server, "alice").await;
    let token = sql_client.token().expect("a session token").clone();
    let url = server.url();
    let batches = plain_read(&url, &token, &["releases", "onc-g", "patients"])
        .await
        .expect("a plain DoGet");
    assert_eq!(rows(&batches) as u64, made_rows(&server, "onc-g").await);
    let bands: BTreeSet<String> = column_text(&batches, 1).into_iter().collect();
    let band = |b: &str| {
        b == "90+"
            || b.split_once('-')
                .is_some_and(|(lo, hi)| lo.parse::<u32>().is_ok() && hi.parse::<u32>().is_ok())
    };
    assert!(bands.iter().all(|b| band(b)), "{bands:?}");
    assert!(bands.len() > 1, "{bands:?}");
    let states: BTreeSet<String> = crate::common::strings(&batches, 2)
        .into_iter()
        .flatten()
        .collect();
    assert!(!states.is_empty(), "no state released");
    assert!(
        states
            .iter()
            .all(|s| s.len() == 2 && s.chars().all(|c| c.is_ascii_uppercase())),
        "{states:?}"
    );

    // Every released start month holds 11 patients and 3 reason codes.
    let mut a = login(&server, "alice").await;
    let thin = sql(
        &mut a,
        "SELECT start_time FROM releases.\"onc-l\".encounters GROUP BY start_time \
         HAVING count(DISTINCT patient_id) < 11 OR count(DISTINCT reason_code) < 3",
    )
    .await
    .unwrap();
    assert_eq!(rows(&thin), 0);

    // Paths name release tables only, and carry the same refusals as SQL.
    let err = plain_read(&url, &token, &["clinical", "patients"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("descriptor path"), "{err}");
    let err = plain_read(&url, &token, &["releases", "onc-g\"; --", "patients"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not available to you"), "{err}");
    let bob = login(&server, "bob").await;
    let err = plain_read(
        &url,
        bob.token().unwrap(),
        &["releases", "onc-g", "patients"],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("is not available to you"), "{err}");
}

async fn made_rows(server: &TestServer, name: &str) -> u64 {
    let key = test_audit_key().verifying_key();
    let stored = releases::load(server.lake.store().as_ref(), name, &key)
        .await
        .unwrap()
        .expect("release");
    stored.manifest.tables[0].rows
}

/// A plain Flight read (no Flight SQL): GetFlightInfo with a descriptor path, then DoGet of
/// the ticket it returns, under a session token.
async fn plain_read(
    url: &str,
    token: &str,
    path: &[&str],
) -> Result<Vec<arrow::array::RecordBatch>, arrow_flight::error::FlightError> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut flight = arrow_flight::FlightClient::new(channel);
    flight.add_header("authorization", &format!("Bearer {token}"))?;
    let descriptor =
        arrow_flight::FlightDescriptor::new_path(path.iter().map(|p| p.to_string()).collect());
    let info = flight.get_flight_info(descriptor).await?;
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    futures::TryStreamExt::try_collect(flight.do_get(ticket).await?).await
}
