//! The trail detects every kind of tampering, continues across restarts and fails closed.

use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::*;

fn store() -> Arc<dyn ObjectStore> {
    Arc::new(InMemory::new())
}

fn config() -> AuditConfig {
    AuditConfig {
        // Small segments and a checkpoint after every commit, so each test has several of both.
        max_segment_events: 4,
        checkpoint_every: 1,
        ..Default::default()
    }
}

/// A trail of `n` events written one at a time (one segment each), closed cleanly.
async fn trail(n: u64) -> (Arc<dyn ObjectStore>, AuditKey) {
    let store = store();
    let key = AuditKey::generate();
    let pem = key.to_pem();
    let log = AuditLog::open(Arc::clone(&store), key, config(), None)
        .await
        .unwrap();
    for i in 0..n {
        let mut e = AuditEvent::new("query", "DoGet");
        e.principal = format!("user{i}");
        e.outcome = "allowed".into();
        assert_eq!(log.record(e).await.unwrap(), i);
    }
    log.checkpoint().await.unwrap();
    (store, AuditKey::from_pem(&pem).unwrap())
}

async fn read(store: &Arc<dyn ObjectStore>, path: &Path) -> String {
    String::from_utf8(
        store
            .get(path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap()
}

async fn write(store: &Arc<dyn ObjectStore>, path: &Path, text: String) {
    store.put(path, PutPayload::from(text)).await.unwrap();
}

async fn broken_at(store: &Arc<dyn ObjectStore>, key: &AuditKey) -> (String, String) {
    match verify_trail(store, &key.verifying_key()).await {
        Err(AuditError::Broken { position, reason }) => (position, reason),
        other => panic!("expected a broken trail, got {other:?}"),
    }
}

#[tokio::test]
async fn an_intact_trail_verifies() {
    let (store, key) = trail(5).await;
    let report = verify_trail(&store, &key.verifying_key()).await.unwrap();
    assert_eq!(report.events, 5);
    assert_eq!(report.signed_events, 5);
    assert!(report.checkpoints >= 2, "{report:?}");
}

#[tokio::test]
async fn a_modified_event_is_named() {
    let (store, key) = trail(5).await;
    let p = segment_path(2);
    let text = read(&store, &p).await.replace("user2", "someone-else");
    write(&store, &p, text).await;
    let (position, reason) = broken_at(&store, &key).await;
    assert!(position.starts_with("seq 2 "), "{position}");
    assert!(reason.contains("modified"), "{reason}");
}

#[tokio::test]
async fn a_deleted_segment_is_named() {
    let (store, key) = trail(5).await;
    store.delete(&segment_path(1)).await.unwrap();
    let (position, reason) = broken_at(&store, &key).await;
    assert!(position.starts_with("seq 1 "), "{position}");
    assert!(reason.contains("missing"), "{reason}");
}

#[tokio::test]
async fn reordered_events_are_named() {
    let (store, key) = trail(5).await;
    // Swap the contents of two segments.
    let (a, b) = (
        read(&store, &segment_path(1)).await,
        read(&store, &segment_path(2)).await,
    );
    write(&store, &segment_path(1), b).await;
    write(&store, &segment_path(2), a).await;
    let (position, reason) = broken_at(&store, &key).await;
    assert!(position.starts_with("seq 1 "), "{position}");
    assert!(reason.contains("reordered"), "{reason}");
}

#[tokio::test]
async fn an_inserted_event_is_named() {
    let (store, key) = trail(5).await;
    // A well-formed event with a correct hash of its own, slipped in after seq 2.
    let seg = read(&store, &segment_path(2)).await;
    let prev: AuditEvent = serde_json::from_str(seg.lines().next().unwrap()).unwrap();
    let mut forged = AuditEvent::new("query", "DoGet");
    forged.seq = 3;
    forged.prev_hash = prev.hash.clone();
    forged.hash = forged.compute_hash();
    write(
        &store,
        &segment_path(2),
        format!("{seg}{}\n", serde_json::to_string(&forged).unwrap()),
    )
    .await;
    let (position, reason) = broken_at(&store, &key).await;
    assert!(position.starts_with("seq 3 "), "{position}");
    assert!(
        reason.contains("inserted") || reason.contains("chain"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_truncated_trail_is_named() {
    let (store, key) = trail(5).await;
    store.delete(&segment_path(4)).await.unwrap();
    let (position, reason) = broken_at(&store, &key).await;
    assert_eq!(position, "seq 4");
    assert!(reason.contains("truncated"), "{reason}");
}

#[tokio::test]
async fn a_consistently_rewritten_chain_is_caught_by_the_signatures() {
    let (store, key) = trail(5).await;
    // The attacker rewrites every event and recomputes every hash: the chain alone is intact.
    let mut prev = GENESIS_HASH.to_string();
    for i in 0..5 {
        let p = segment_path(i);
        let mut e: AuditEvent = serde_json::from_str(read(&store, &p).await.trim()).unwrap();
        e.principal = "nobody".into();
        e.prev_hash = prev;
        e.hash = e.compute_hash();
        prev = e.hash.clone();
        write(
            &store,
            &p,
            format!("{}\n", serde_json::to_string(&e).unwrap()),
        )
        .await;
    }
    let (position, reason) = broken_at(&store, &key).await;
    assert!(reason.contains("rewritten"), "{position}: {reason}");
}

#[tokio::test]
async fn deleted_or_forged_checkpoints_are_caught() {
    let (store, key) = trail(3).await;
    // A checkpoint re-signed with the attacker's own key.
    let p = Path::from(format!("{CHECKPOINTS_PREFIX}{:020}.json", 1));
    let mut cp: Checkpoint = serde_json::from_str(&read(&store, &p).await).unwrap();
    let mallory = AuditKey::generate();
    cp.key = hex(mallory.verifying_key().as_bytes());
    cp.signature = hex(&mallory.0.sign(&cp.signed_bytes()).to_bytes());
    write(&store, &p, String::from_utf8(cp.file_bytes()).unwrap()).await;
    let (position, reason) = broken_at(&store, &key).await;
    assert!(position.starts_with("checkpoint 1"), "{position}");
    assert!(reason.contains("key other than"), "{reason}");

    let (store, key) = trail(3).await;
    for p in list_sorted(&store, CHECKPOINTS_PREFIX).await.unwrap() {
        store.delete(&p).await.unwrap();
    }
    let (_, reason) = broken_at(&store, &key).await;
    assert!(reason.contains("no signed checkpoint"), "{reason}");
}

#[tokio::test]
async fn the_chain_continues_across_restarts() {
    let (store, key) = trail(3).await;
    let pem = key.to_pem();
    let log = AuditLog::open(Arc::clone(&store), key, config(), None)
        .await
        .unwrap();
    assert_eq!(
        log.record(AuditEvent::new("auth", "Handshake"))
            .await
            .unwrap(),
        3
    );
    log.checkpoint().await.unwrap();
    let key = AuditKey::from_pem(&pem).unwrap();
    assert_eq!(
        verify_trail(&store, &key.verifying_key())
            .await
            .unwrap()
            .events,
        4
    );
    // Another key cannot take over the trail.
    let err = AuditLog::open(Arc::clone(&store), AuditKey::generate(), config(), None)
        .await
        .err()
        .expect("a foreign key is refused");
    assert!(err.to_string().contains("another key"), "{err}");
}

#[tokio::test]
async fn an_unwritable_trail_refuses_with_unavailable() {
    let (store, key) = trail(2).await;
    let log = AuditLog::open(Arc::clone(&store), key, config(), None)
        .await
        .unwrap();
    // Someone occupies the next segment's name: the create-only put fails, and the writer,
    // unable to read a sane head, keeps refusing rather than writing around it.
    write(&store, &segment_path(2), "garbage\n".into()).await;
    for _ in 0..2 {
        let err = log
            .record(AuditEvent::new("query", "DoGet"))
            .await
            .unwrap_err();
        assert!(matches!(err, AuditError::Unavailable(_)), "{err}");
    }
}

#[tokio::test]
async fn concurrent_events_are_group_committed_without_loss() {
    let store = store();
    let key = AuditKey::generate();
    let verifying = key.verifying_key();
    let log = AuditLog::open(
        Arc::clone(&store),
        key,
        AuditConfig {
            checkpoint_every: 50,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move { log.record(AuditEvent::new("query", "DoGet")).await })
        })
        .collect();
    let mut seqs: Vec<u64> = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    log.checkpoint().await.unwrap();
    let report = verify_trail(&store, &verifying).await.unwrap();
    assert_eq!(report.events, 200);
    assert!(report.segments < 200, "no group commit: {report:?}");
}

#[tokio::test]
async fn alerts_fire_once_per_excess_and_are_in_the_trail() {
    let store = store();
    let key = AuditKey::generate();
    let verifying = key.verifying_key();
    let fired = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&fired);
    let sink: AlertSink = Arc::new(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let config = AuditConfig {
        alerts: vec![
            AlertRule {
                name: "bulk-phi".into(),
                kind: AlertKind::PhiRows,
                threshold: 100,
                window_minutes: 10,
            },
            AlertRule {
                name: "refusal-burst".into(),
                kind: AlertKind::Refusals,
                threshold: 2,
                window_minutes: 1,
            },
        ],
        phi_columns: ["clinical.patients.ssn".to_string()].into(),
        ..Default::default()
    };
    let log = AuditLog::open(Arc::clone(&store), key, config, Some(sink))
        .await
        .unwrap();
    for rows in [60, 60] {
        let mut e = AuditEvent::new("query_end", "DoGet");
        e.principal = "carol".into();
        e.columns = "clinical.patients.patient_id, clinical.patients.ssn".into();
        e.rows = Some(rows);
        log.record(e).await.unwrap();
    }
    for _ in 0..3 {
        let mut e = AuditEvent::new("plan", "GetFlightInfo");
        e.principal = "mallory".into();
        e.outcome = "refused".into();
        log.record(e).await.unwrap();
    }
    log.checkpoint().await.unwrap();
    assert_eq!(fired.load(std::sync::atomic::Ordering::Relaxed), 2);
    let report = verify_trail(&store, &verifying).await.unwrap();
    assert_eq!(report.events, 7, "5 events and 2 alerts");
    let mut alerts = Vec::new();
    for p in list_sorted(&store, lakegate_catalogs::AUDIT_EVENTS_PREFIX)
        .await
        .unwrap()
    {
        let text = read(&store, &p).await;
        alerts.extend(
            parse_segment(&p, text.as_bytes())
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "alert"),
        );
    }
    let names: Vec<&str> = alerts.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(names, ["bulk-phi", "refusal-burst"]);
    assert_eq!(alerts[0].principal, "carol");
    assert_eq!(alerts[1].principal, "mallory");
}

/// A catalog reload that labels a column `phi.*` makes the PHI-volume alert count it from the
/// next event on.
#[tokio::test]
async fn the_phi_alert_follows_new_labels() {
    let fired = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&fired);
    let sink: AlertSink = Arc::new(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let config = AuditConfig {
        alerts: vec![AlertRule {
            name: "bulk-phi".into(),
            kind: AlertKind::PhiRows,
            threshold: 100,
            window_minutes: 10,
        }],
        phi_columns: ["clinical.patients.ssn".to_string()].into(),
        ..Default::default()
    };
    let log = AuditLog::open(store(), AuditKey::generate(), config, Some(sink))
        .await
        .unwrap();
    let payers = || {
        let mut e = AuditEvent::new("query_end", "DoGet");
        e.principal = "alice".into();
        e.columns = "clinical.encounters.payer".into();
        e.rows = Some(150);
        e
    };
    log.record(payers()).await.unwrap();
    log.checkpoint().await.unwrap();
    assert_eq!(fired.load(std::sync::atomic::Ordering::Relaxed), 0);
    log.set_phi_columns(["clinical.encounters.payer".to_string()].into());
    log.record(payers()).await.unwrap();
    log.checkpoint().await.unwrap();
    assert_eq!(fired.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn two_servers_on_one_lake_share_one_chain() {
    let store = store();
    let key = AuditKey::generate();
    let pem = key.to_pem();
    let a = AuditLog::open(Arc::clone(&store), key, config(), None)
        .await
        .unwrap();
    let b = AuditLog::open(
        Arc::clone(&store),
        AuditKey::from_pem(&pem).unwrap(),
        config(),
        None,
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let log = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { log.record(AuditEvent::new("query", "DoGet")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    a.checkpoint().await.unwrap();
    b.checkpoint().await.unwrap();
    let key = AuditKey::from_pem(&pem).unwrap();
    let report = verify_trail(&store, &key.verifying_key()).await.unwrap();
    assert_eq!(report.events, 40);
    assert_eq!(report.signed_events, 40);
}
