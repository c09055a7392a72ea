//! Lookups by pseudonym (engine/src/lookup.rs) read like lookups by raw id and answer exactly
//! what comparing every row's pseudonym answers.

use datafusion::physical_plan::displayable;
use lakegate_tests::{start_on_own_lake, TestServer};

use crate::common::{first_i64, login, persona, sql, strings, Client};

/// Alice's count of encounters for `predicate`, as the server answers it.
async fn count(alice: &mut Client, predicate: &str) -> i64 {
    first_i64(
        &sql(
            alice,
            &format!("SELECT count(*) FROM clinical.encounters WHERE {predicate}"),
        )
        .await
        .unwrap_or_else(|e| panic!("{predicate}: {e}")),
    )
}

/// Three of alice's pseudonyms that have encounters.
async fn some_pseudonyms(alice: &mut Client) -> Vec<String> {
    let ids = strings(
        &sql(
            alice,
            "SELECT DISTINCT patient_id FROM clinical.encounters ORDER BY patient_id LIMIT 3",
        )
        .await
        .unwrap(),
        0,
    );
    ids.into_iter().map(|p| p.expect("a pseudonym")).collect()
}

#[tokio::test]
async fn a_lookup_by_pseudonym_reads_the_raw_key_and_answers_as_a_full_comparison() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    let ps = some_pseudonyms(&mut alice).await;
    assert_eq!(ps.len(), 3);
    for p in &ps {
        // `concat` is no plain comparison of the column: every row's pseudonym is compared.
        let full = count(&mut alice, &format!("concat(patient_id, '') = '{p}'")).await;
        assert!(full > 0);
        assert_eq!(
            count(&mut alice, &format!("patient_id = '{p}'")).await,
            full
        );
        assert_eq!(
            count(&mut alice, &format!("'{p}' = patient_id")).await,
            full
        );
    }
    let list = format!("'{}', '{}', 'ps_000000000000000000000000'", ps[0], ps[1]);
    let full = count(&mut alice, &format!("concat(patient_id, '') IN ({list})")).await;
    assert_eq!(
        count(&mut alice, &format!("patient_id IN ({list})")).await,
        full
    );
    // Unknown pseudonyms, raw ids and another project's pseudonyms find nothing.
    assert_eq!(
        count(&mut alice, "patient_id = 'ps_000000000000000000000000'").await,
        0
    );
    assert_eq!(count(&mut alice, "patient_id = 'nonsense'").await, 0);
    let mut dave = login(&server, "dave").await;
    let theirs = some_pseudonyms(&mut dave).await;
    assert!(count(&mut dave, &format!("patient_id = '{}'", theirs[0])).await > 0);
    assert_eq!(
        count(&mut alice, &format!("patient_id = '{}'", theirs[0])).await,
        0
    );

    // Below the masks the scan reads only the raw keys that carry the pseudonym, and the
    // caller's own comparison of pseudonyms still runs above them.
    let plan = server
        .engine
        .session(&persona("alice"))
        .await
        .unwrap()
        .plan(&format!(
            "SELECT encounter_id FROM clinical.encounters WHERE patient_id = '{}'",
            ps[0]
        ))
        .await
        .unwrap()
        .verified_physical_plan()
        .await
        .unwrap();
    let plan = displayable(plan.as_ref()).indent(false).to_string();
    let below = plan
        .split("ProjectionExec")
        .nth(1)
        .expect("a masking projection");
    assert!(below.contains(" IN (SET) (["), "{plan}");
    assert!(plan.contains(&format!("= {}", ps[0])), "{plan}");
}

#[tokio::test]
async fn a_lookup_by_pseudonym_sees_files_added_to_the_lake() {
    let (_dir, lake, server) = start_on_own_lake(200).await;
    let mut alice = login(&server, "alice").await;
    let p = some_pseudonyms(&mut alice).await.remove(0);
    let lookup = format!("patient_id = '{p}'");
    let before = count(&mut alice, &lookup).await;
    assert!(before > 0);
    // The same encounters again in a new file: the index follows the listing.
    let dir = lake.join("curated/clinical/encounters");
    std::fs::copy(
        dir.join("part-00000.parquet"),
        dir.join("part-09999.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("part-00001.parquet"),
        dir.join("part-09998.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("part-00002.parquet"),
        dir.join("part-09997.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("part-00003.parquet"),
        dir.join("part-09996.parquet"),
    )
    .unwrap();
    // Past the engine's one-second listing cache.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let full = count(&mut alice, &format!("concat(patient_id, '') = '{p}'")).await;
    assert_eq!(full, 2 * before);
    assert_eq!(count(&mut alice, &lookup).await, full);
}
