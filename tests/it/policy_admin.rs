//! Running a policy: hot reload (atomic, last good policy kept) and purpose-of-use narrowing.

use std::time::Duration;

use lakegate_flight_server::demo::DEMO_POLICY;
use lakegate_flight_server::reload::{reload, spawn_watcher, PolicySource, PolicyText};
use lakegate_tests::{ServerOptions, TestServer};

use crate::common::{code_of, first_i64, login, sql};

const MALLORY_RULE: &str = r#"
[[rule]]
name = "mallory-trial"
effect = "allow"
subject = 'r.sub.name == "mallory"'
object = 'r.obj.name == "clinical.patients"'
actions = ["row_query", "aggregate_query"]
masks = [{ label = "phi.direct", mask = "nullify" }]
"#;

#[tokio::test]
async fn policy_reload_swaps_atomically_and_keeps_the_last_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, DEMO_POLICY).unwrap();
    let server = TestServer::start_with(ServerOptions {
        policy: Some(DEMO_POLICY.to_string()),
        ..Default::default()
    })
    .await;
    let source = PolicySource {
        policy: PolicyText::File(path.clone()),
        model: None,
        lake: server.lake.clone(),
        audit: Some(server.audit.clone()),
    };
    let mut mallory = login(&server, "mallory").await;
    assert!(sql(&mut mallory, "SELECT count(*) FROM clinical.patients")
        .await
        .is_err());

    // A new version that grants mallory a masked view.
    let granted =
        DEMO_POLICY.replace("version = \"demo-2026-11-24\"", "version = \"v2\"") + MALLORY_RULE;
    std::fs::write(&path, &granted).unwrap();
    assert_eq!(reload(&server.engine, &source).await.unwrap(), "v2");
    assert!(
        first_i64(
            &sql(&mut mallory, "SELECT count(*) FROM clinical.patients")
                .await
                .unwrap()
        ) > 0
    );

    // A broken file is refused with file, line and reason; v2 stays in force.
    std::fs::write(
        &path,
        granted.replace(
            "mask = \"nullify\" }]",
            "mask = \"nullify\", columns = [\"sssn\"] }]",
        ),
    )
    .unwrap();
    let err = reload(&server.engine, &source).await.unwrap_err();
    assert!(
        err.contains("policy.toml:") && err.contains("unknown column 'sssn'"),
        "{err}"
    );
    assert_eq!(server.engine.policy().version(), "v2");
    assert!(sql(&mut mallory, "SELECT count(*) FROM clinical.patients")
        .await
        .is_ok());

    // The watcher picks up a changed file by itself.
    let watcher = spawn_watcher(server.engine.clone(), source, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct mtime on coarse filesystems
    std::fs::write(&path, DEMO_POLICY).unwrap();
    let mut refused = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sql(&mut mallory, "SELECT count(*) FROM clinical.patients")
            .await
            .is_err()
        {
            refused = true;
            break;
        }
    }
    watcher.abort();
    assert!(refused, "the watcher did not reload the changed policy");
    assert_eq!(server.engine.policy().version(), "demo-2026-11-24");
}

#[tokio::test]
async fn a_client_may_narrow_its_purpose_but_never_widen_it() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    alice.set_header("x-lakegate-purpose", "treatment");
    let err = sql(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "PermissionDenied");
    assert!(err.to_string().contains("purpose-of-use"), "{err}");
    alice.set_header("x-lakegate-purpose", "model_training");
    assert!(sql(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .is_ok());
    // No header widens access: a header claiming another role is ignored.
    let mut mallory = login(&server, "mallory").await;
    mallory.set_header("role", "data_scientist");
    mallory.set_header("x-lakegate-role", "clinician");
    assert!(sql(&mut mallory, "SELECT count(*) FROM clinical.patients")
        .await
        .is_err());
}

/// The lake's catalog changes under a running server: a column relabelled `phi.direct` is
/// masked for the next request (alice's rule nulls that label), with no restart. A catalog that
/// does not load, or that the files do not match, is refused and the last good one stays.
#[tokio::test]
async fn a_relabelled_column_is_masked_without_a_restart() {
    let (_dir, lake_path, server) = lakegate_tests::start_on_own_lake(300).await;
    let source = PolicySource {
        policy: PolicyText::Fixed {
            name: "demo".into(),
            text: DEMO_POLICY.into(),
        },
        model: None,
        lake: server.lake.clone(),
        audit: Some(server.audit.clone()),
    };
    let mut alice = login(&server, "alice").await;
    let payers = "SELECT count(*) FROM clinical.encounters WHERE payer IS NOT NULL";
    let before = first_i64(&sql(&mut alice, payers).await.unwrap());
    assert!(before > 0);

    let relabel = |label: &str| {
        let label = label.to_string();
        let lake = server.lake.clone();
        async move {
            let mut catalog = lakegate_catalogs::Catalog::load(&lake).await.unwrap();
            let d = catalog
                .datasets
                .iter_mut()
                .find(|d| d.name == "clinical.encounters")
                .unwrap();
            d.columns
                .iter_mut()
                .find(|c| c.name == "payer")
                .unwrap()
                .label = label;
            catalog.save(&lake).await.unwrap();
        }
    };
    relabel("phi.direct").await;
    reload(&server.engine, &source).await.unwrap();
    assert_eq!(first_i64(&sql(&mut alice, payers).await.unwrap()), 0);
    let mut dave = login(&server, "dave").await;
    assert_eq!(first_i64(&sql(&mut dave, payers).await.unwrap()), 0);

    // A catalog that does not parse: refused, the last good catalog stays in force.
    let document = lake_path.join("catalog/datasets.json");
    let good = std::fs::read(&document).unwrap();
    std::fs::write(&document, b"{ \"version\": 1, \"datasets\": [").unwrap();
    let err = reload(&server.engine, &source).await.unwrap_err();
    assert!(err.starts_with("the lake's catalog:"), "{err}");
    assert_eq!(first_i64(&sql(&mut alice, payers).await.unwrap()), 0);
    // A catalog the files do not match (payer as a number): refused the same way.
    let mut wrong = lakegate_catalogs::Catalog::from_json(&good).unwrap();
    wrong
        .datasets
        .iter_mut()
        .find(|d| d.name == "clinical.encounters")
        .unwrap()
        .columns
        .iter_mut()
        .find(|c| c.name == "payer")
        .unwrap()
        .data_type = lakegate_catalogs::ColumnType::Int64;
    wrong.save(&server.lake).await.unwrap();
    let err = reload(&server.engine, &source).await.unwrap_err();
    assert!(err.contains("clinical.encounters"), "{err}");
    assert_eq!(first_i64(&sql(&mut alice, payers).await.unwrap()), 0);
    std::fs::write(&document, good).unwrap();

    // Back to `clinical`: alice sees payers again.
    relabel("clinical").await;
    reload(&server.engine, &source).await.unwrap();
    assert_eq!(first_i64(&sql(&mut alice, payers).await.unwrap()), before);
}
