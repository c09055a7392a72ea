//! The audit trail through the real server: what is recorded, who may read it, that it holds
//! no literal or data value, that it verifies under load, alerts, and failing closed.

use std::time::Duration;

use futures::StreamExt;
use lakegate_engine::audit::{verify_trail, AlertKind, AlertRule};
use lakegate_tests::{
    build_lake, default_audit_settings, raw_query, test_audit_key, ServerOptions, TestServer,
};
use object_store::ObjectStoreExt;

use crate::common::{code_of, column_text, first_i64, login, rows, sql, strings};

/// Every byte of the trail as text (segments only).
pub(crate) async fn trail_text(server: &TestServer) -> String {
    let store = server.lake.store();
    let prefix = object_store::path::Path::from("audit/events");
    let mut listing = store.list(Some(&prefix));
    let mut text = String::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.unwrap();
        let bytes = store
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        text.push_str(std::str::from_utf8(&bytes).unwrap());
    }
    text
}

/// erin's count of events matching `filter`, retried briefly: completions are written when the
/// server drops the stream, a moment after the client has read its last batch.
async fn erin_count(server: &TestServer, filter: &str, expected: i64) -> i64 {
    let mut erin = login(server, "erin").await;
    let mut n = -1;
    for _ in 0..50 {
        server.audit.checkpoint().await.unwrap();
        let q = format!("SELECT count(*) FROM audit.events WHERE {filter}");
        n = first_i64(&sql(&mut erin, &q).await.unwrap());
        if n == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n
}

/// A server on a small lake of its own, for tests that damage the lake or its trail.
async fn on_a_lake_of_its_own() -> (tempfile::TempDir, TestServer) {
    let (dir, lake) = build_lake(200);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(lake),
        ..Default::default()
    })
    .await;
    (dir, server)
}

#[tokio::test]
async fn decisions_are_recorded_without_any_literal_or_value_and_only_erin_reads_them() {
    let server = TestServer::start().await;
    // Real SSNs and names from the lake, used as literals by people who may not see them.
    let raw = raw_query(
        "SELECT ssn, first_name, last_name FROM clinical_patients ORDER BY patient_id LIMIT 2",
    )
    .await;
    let secrets: Vec<String> = (0..3).flat_map(|i| column_text(&raw, i)).collect();
    let marker = "audit_probe_literals";
    let mut alice = login(&server, "alice").await;
    let q = format!(
        "SELECT count(*) AS {marker} FROM clinical.patients WHERE ssn = '{}' OR last_name = '{}'",
        secrets[0], secrets[4]
    );
    sql(&mut alice, &q).await.unwrap();
    let mut bob = login(&server, "bob").await;
    // Refused (row-level for an aggregate-only caller), with a name as a literal.
    let q = format!(
        "SELECT patient_id AS {marker} FROM clinical.patients WHERE first_name = '{}'",
        secrets[2]
    );
    let err = sql(&mut bob, &q).await.unwrap_err();
    assert_eq!(code_of(&err), "PermissionDenied");
    // Invalid SQL whose error would quote the literal.
    let mut carol = login(&server, "carol").await;
    let q = format!(
        "SELECT {marker} FROM clinical.patients WHERE ssn = '{}",
        secrets[1]
    );
    assert!(sql(&mut carol, &q).await.is_err());
    // A cast error at execution that would echo a value.
    let q = format!("SELECT CAST(ssn AS INT) AS {marker} FROM clinical.patients");
    assert!(sql(&mut carol, &q).await.is_err());

    assert_eq!(
        erin_count(
            &server,
            &format!("principal = 'alice' AND kind = 'query_end' AND outcome = 'completed' AND fingerprint LIKE '%{marker}%'"),
            1
        )
        .await,
        1
    );
    let mut erin = login(&server, "erin").await;
    let events = sql(
        &mut erin,
        &format!(
            "SELECT kind, outcome, datasets, columns, rules, policy_version, purpose, attributes, client \
             FROM audit.events WHERE principal = 'alice' AND kind = 'query' AND fingerprint LIKE '%{marker}%'"
        ),
    )
    .await
    .unwrap();
    assert_eq!(rows(&events), 1);
    let text = |i| strings(&events, i)[0].clone().unwrap();
    assert_eq!(text(1), "allowed");
    assert_eq!(text(2), "clinical.patients");
    assert!(text(3).contains("clinical.patients.ssn"), "{}", text(3));
    assert!(
        text(4).contains("allowed by rule research-deidentified")
            && text(4).contains("ssn=nullify"),
        "{}",
        text(4)
    );
    assert_eq!(text(5), "demo-2026-11-24");
    assert_eq!(text(6), "model_training");
    assert!(text(7).contains("project=oncology"), "{}", text(7));
    assert!(text(8).starts_with("127.0.0.1:"), "{}", text(8));
    let refused = sql(
        &mut erin,
        &format!(
            "SELECT reason FROM audit.events WHERE principal = 'bob' AND outcome = 'refused' \
             AND fingerprint LIKE '%{marker}%'"
        ),
    )
    .await
    .unwrap();
    let reason = strings(&refused, 0)[0].clone().unwrap();
    assert!(reason.contains("rule: default-deny"), "{reason}");

    let trail = trail_text(&server).await;
    assert!(trail.contains(marker));
    for secret in &secrets {
        assert!(
            !trail.contains(secret.as_str()),
            "{secret} is in the audit trail"
        );
    }

    // Nobody but the compliance officer sees that the trail exists.
    for user in ["alice", "bob", "carol", "dave", "mallory"] {
        let mut c = login(&server, user).await;
        let err = sql(&mut c, "SELECT count(*) FROM audit.events")
            .await
            .unwrap_err();
        assert_eq!(code_of(&err), "InvalidArgument", "{user}: {err}");
        assert!(err.to_string().contains("not found"), "{user}: {err}");
    }
}

#[tokio::test]
async fn every_query_under_load_is_in_a_trail_that_verifies() {
    let server = TestServer::start().await;
    let marker = "audit_probe_load";
    let clients = 8;
    let per_client = 10;
    let tasks: Vec<_> = ["alice", "bob", "carol", "dave"]
        .iter()
        .cycle()
        .take(clients)
        .enumerate()
        .map(|(i, user)| {
            let url = server.url();
            let user = user.to_string();
            tokio::spawn(async move {
                let mut c = crate::common::login_url(&url, &user).await;
                for j in 0..per_client {
                    let q = format!(
                        "SELECT site_id, count(DISTINCT patient_id) AS {marker}_{i}_{j} \
                         FROM clinical.encounters GROUP BY site_id"
                    );
                    sql(&mut c, &q).await.expect("query");
                }
            })
        })
        .collect();
    for t in tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("load finished in time")
    {
        t.unwrap();
    }
    let issued = (clients * per_client) as i64;
    let filter = format!("fingerprint LIKE '%{marker}%'");
    assert_eq!(
        erin_count(&server, &format!("kind = 'query' AND {filter}"), issued).await,
        issued
    );
    assert_eq!(
        erin_count(
            &server,
            &format!("kind = 'query_end' AND outcome = 'completed' AND {filter}"),
            issued
        )
        .await,
        issued
    );
    server.audit.checkpoint().await.unwrap();
    let report = verify_trail(&server.lake.store(), &test_audit_key().verifying_key())
        .await
        .expect("trail verifies");
    assert!(report.events >= 2 * issued as u64, "{report:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_recorded_as_cancelled() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    // A cross join streams far longer than the client reads.
    let info = alice
        .execute(
            "SELECT a.observation_id AS audit_probe_cancel FROM clinical.observations a, \
             clinical.observations b"
                .to_string(),
            None,
        )
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut stream = alice.do_get(ticket).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.num_rows() > 0);
    drop(stream);
    drop(alice);
    let filter = "kind = 'query_end' AND outcome = 'cancelled' AND rows > 0 \
                  AND fingerprint LIKE '%audit_probe_cancel%'";
    assert_eq!(erin_count(&server, filter, 1).await, 1);
}

/// A one-shot HTTP endpoint: answers 200 to every request and hands each body over.
async fn webhook() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ = tx.send(body.to_string());
                            let _ = socket
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn alerts_are_raised_into_the_trail() {
    let (_dir, lake) = build_lake(200);
    let (url, mut hook) = webhook().await;
    let mut audit = default_audit_settings();
    audit.alert_webhook = Some(url);
    audit.alerts = vec![
        AlertRule {
            name: "bulk-phi-read".into(),
            kind: AlertKind::PhiRows,
            threshold: 30,
            window_minutes: 10,
        },
        AlertRule {
            name: "refusal-burst".into(),
            kind: AlertKind::Refusals,
            threshold: 3,
            window_minutes: 1,
        },
    ];
    let server = TestServer::start_with(ServerOptions {
        audit: Some(audit),
        lake: Some(lake),
        ..Default::default()
    })
    .await;
    // carol reads identified rows of her site, twice: 2 x 20 > 30 rows of phi.* columns.
    let mut carol = login(&server, "carol").await;
    for _ in 0..2 {
        let b = sql(
            &mut carol,
            "SELECT first_name, ssn FROM clinical.patients LIMIT 20",
        )
        .await
        .unwrap();
        assert_eq!(rows(&b), 20);
    }
    // mallory probes: four refusals in a minute.
    let mut mallory = login(&server, "mallory").await;
    for _ in 0..4 {
        assert!(sql(&mut mallory, "SELECT * FROM clinical.patients")
            .await
            .is_err());
    }
    assert_eq!(
        erin_count(
            &server,
            "kind = 'alert' AND action = 'bulk-phi-read' AND principal = 'carol'",
            1
        )
        .await,
        1
    );
    assert_eq!(
        erin_count(
            &server,
            "kind = 'alert' AND action = 'refusal-burst' AND principal = 'mallory'",
            1
        )
        .await,
        1
    );
    // Both alerts also reached the webhook, as JSON events.
    let mut delivered = Vec::new();
    for _ in 0..2 {
        let body = tokio::time::timeout(Duration::from_secs(10), hook.recv())
            .await
            .expect("webhook called in time")
            .expect("a body");
        let event: lakegate_engine::audit::AuditEvent = serde_json::from_str(&body).unwrap();
        assert_eq!(event.kind, "alert");
        delivered.push(event.action);
    }
    delivered.sort();
    assert_eq!(delivered, ["bulk-phi-read", "refusal-burst"]);
}

/// The trail is newline-delimited JSON: a file dropped among its segments is held to the
/// catalog's contract line by line before a scan reads it, as a Parquet file's schema is.
#[tokio::test]
async fn a_foreign_file_in_the_trail_is_refused_by_its_contract() {
    let (_dir, server) = on_a_lake_of_its_own().await;
    let mut erin = login(&server, "erin").await;
    let count = "SELECT count(*) FROM audit.events";
    let before = first_i64(&sql(&mut erin, count).await.unwrap());
    assert!(before > 0);
    let store = server.lake.store();
    let first = {
        let mut listing = store.list(Some(&object_store::path::Path::from("audit/events")));
        listing.next().await.unwrap().unwrap().location
    };
    let line = store.get(&first).await.unwrap().bytes().await.unwrap();
    let line = std::str::from_utf8(&line)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let foreign = object_store::path::Path::from("audit/events/zz-foreign.jsonl");
    let changes = [
        // An extra column, which a reader with the catalog's schema would never show.
        line.replacen('{', "{\"ssn\":\"123-45-6789\",", 1),
        // A value of another type.
        line.replacen("\"seq\":", "\"seq\":\"123-45-6789\",\"seq_was\":", 1),
        // Not JSON at all.
        "123-45-6789".to_string(),
    ];
    for text in changes {
        store
            .put(&foreign, format!("{line}\n{text}\n").into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let err = sql(&mut erin, count).await.unwrap_err();
        assert_eq!(code_of(&err), "FailedPrecondition", "{text}: {err}");
        let message = err.to_string();
        assert!(
            message.contains("a data file of audit.events does not match the catalog's schema"),
            "{message}"
        );
        for leak in ["foreign", "123-45", "ssn"] {
            assert!(!message.contains(leak), "{leak}: {message}");
        }
    }
    // A copy of a real line keeps the contract: it is read (and counted).
    store
        .put(&foreign, format!("{line}\n").into())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let with_copy = first_i64(&sql(&mut erin, count).await.unwrap());
    assert!(with_copy > before, "{with_copy} vs {before}");
    store.delete(&foreign).await.unwrap();
}

#[tokio::test]
async fn a_trail_that_cannot_be_written_refuses_queries_with_unavailable() {
    let (_dir, server) = on_a_lake_of_its_own().await;
    let mut alice = login(&server, "alice").await;
    sql(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap();
    // Occupy every next segment name: the create-only writes fail and the writer finds a head
    // it cannot trust, so nothing more is served until an operator looks.
    server.audit.checkpoint().await.unwrap();
    let store = server.lake.store();
    let report = verify_trail(&store, &test_audit_key().verifying_key())
        .await
        .unwrap();
    for seq in report.events..report.events + 4 {
        store
            .put(
                &object_store::path::Path::from(format!("audit/events/{seq:020}.jsonl")),
                "not an event\n".into(),
            )
            .await
            .unwrap();
    }
    let err = sql(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "Unavailable", "{err}");
    assert!(err.to_string().contains("audit-fail-closed"), "{err}");
}

/// SQL over the size limit is audited without being parsed; SQL that nests too deep is parsed
/// (on a stack of its own) but recorded without a rendering: neither stalls nor crashes the trail.
#[tokio::test]
async fn oversized_and_too_deep_sql_are_audited_unrendered() {
    let server = TestServer::start().await;
    let mut carol = login(&server, "carol").await;
    let long = format!("SELECT {}", vec!["1"; 500_000].join("+"));
    assert!(sql(&mut carol, &long).await.is_err());
    let deep = format!("SELECT {}", vec!["1"; 5_000].join("+"));
    assert!(sql(&mut carol, &deep).await.is_err());
    for marker in ["<too long>", "<too deep>"] {
        let filter = format!("principal = 'carol' AND fingerprint = '{marker}'");
        assert_eq!(erin_count(&server, &filter, 1).await, 1, "{marker}");
    }
}
