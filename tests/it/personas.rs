//! The six personas of shared/SCENARIO.md get exactly what its table says, compared with plain
//! DataFusion over the same Parquet files.

use lakegate_tests::{raw_query, scalar_i64, TestServer};

use crate::common::{code_of, column_text, first_i64, login, rows, sql, strings};

#[tokio::test]
async fn alice_gets_deidentified_rows_of_consenting_patients() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    let consenting = scalar_i64(
        &raw_query("SELECT count(*) FROM clinical_patients WHERE research_consent").await,
    );
    assert_eq!(
        first_i64(
            &sql(&mut alice, "SELECT count(*) FROM clinical.patients")
                .await
                .unwrap()
        ),
        consenting
    );

    // Direct identifiers are NULL, everywhere.
    let direct = sql(
        &mut alice,
        "SELECT count(*) FROM clinical.patients WHERE mrn IS NOT NULL OR first_name IS NOT NULL \
         OR last_name IS NOT NULL OR ssn IS NOT NULL OR address IS NOT NULL OR phone IS NOT NULL \
         OR email IS NOT NULL OR city IS NOT NULL",
    )
    .await
    .unwrap();
    assert_eq!(first_i64(&direct), 0);

    // Pseudonyms, not raw ids, and they still join across tables.
    let ids = strings(
        &sql(&mut alice, "SELECT patient_id FROM clinical.patients")
            .await
            .unwrap(),
        0,
    );
    assert!(ids
        .iter()
        .all(|p| p.as_deref().is_some_and(|p| p.starts_with("ps_"))));
    let joined = sql(
        &mut alice,
        "SELECT count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id",
    )
    .await
    .unwrap();
    let raw_joined = raw_query(
        "SELECT count(*) FROM clinical_encounters e JOIN clinical_patients p ON e.patient_id = p.patient_id \
         WHERE p.research_consent",
    )
    .await;
    assert_eq!(first_i64(&joined), scalar_i64(&raw_joined));

    // Dates to the year (1 January), ages 90+ collapsed, ZIP3 with restricted areas as 000.
    let dates = sql(
        &mut alice,
        "SELECT count(*) FROM clinical.patients WHERE date_part('month', birth_date) <> 1 OR date_part('day', birth_date) <> 1",
    )
    .await
    .unwrap();
    assert_eq!(first_i64(&dates), 0);
    let oldest = sql(
        &mut alice,
        "SELECT CAST(min(date_part('year', birth_date)) AS BIGINT) FROM clinical.patients",
    )
    .await
    .unwrap();
    let this_year = 2026_i64.max(first_i64(
        &sql(
            &mut alice,
            "SELECT CAST(date_part('year', now()) AS BIGINT)",
        )
        .await
        .unwrap(),
    ));
    assert!(
        first_i64(&oldest) >= this_year - 90,
        "a birth year older than 90+ leaked"
    );
    let zips = strings(
        &sql(&mut alice, "SELECT DISTINCT zip FROM clinical.patients")
            .await
            .unwrap(),
        0,
    );
    assert!(zips
        .iter()
        .all(|z| z.as_deref().is_some_and(|z| z.len() == 3)));
    for restricted in [
        "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
        "879", "884", "890", "893",
    ] {
        assert!(
            !zips.contains(&Some(restricted.to_string())),
            "restricted ZIP3 {restricted} leaked"
        );
    }
    assert!(zips.contains(&Some("000".to_string())));

    // Care dates are shifted: no encounter keeps its raw start time.
    let shifted = sql(
        &mut alice,
        "SELECT start_time FROM clinical.encounters ORDER BY start_time LIMIT 50",
    )
    .await
    .unwrap();
    let raw_times = column_text(
        &raw_query("SELECT start_time FROM clinical_encounters").await,
        0,
    );
    let leaked = column_text(&shifted, 0)
        .iter()
        .filter(|t| raw_times.contains(t))
        .count();
    assert!(
        leaked <= 1,
        "{leaked} raw start times survived the date shift"
    );

    // Genomics: consenting patients only, pseudonymized.
    let variants = first_i64(
        &sql(&mut alice, "SELECT count(*) FROM omics.variants")
            .await
            .unwrap(),
    );
    let raw_variants = scalar_i64(
        &raw_query(
            "SELECT count(*) FROM omics_variants v JOIN clinical_patients p ON v.patient_id = p.patient_id WHERE p.research_consent",
        )
        .await,
    );
    assert_eq!(variants, raw_variants);
}

#[tokio::test]
async fn pseudonyms_differ_between_projects_and_attributes_not_names_decide() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    let mut dave = login(&server, "dave").await;
    let q = "SELECT patient_id FROM clinical.patients ORDER BY patient_id";
    let a = strings(&sql(&mut alice, q).await.unwrap(), 0);
    let d = strings(&sql(&mut dave, q).await.unwrap(), 0);
    assert_eq!(a.len(), d.len());
    assert!(
        a.iter().all(|x| !d.contains(x)),
        "a pseudonym is shared across projects"
    );
    // Stable within a project, across sessions.
    let mut alice2 = login(&server, "alice").await;
    assert_eq!(a, strings(&sql(&mut alice2, q).await.unwrap(), 0));
    // dave: no genomics (wrong project and environment): not even visible.
    let err = sql(&mut dave, "SELECT count(*) FROM omics.variants")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "InvalidArgument", "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn bob_gets_only_aggregates_over_groups_of_eleven_or_more() {
    let server = TestServer::start().await;
    let mut bob = login(&server, "bob").await;
    let err = sql(&mut bob, "SELECT * FROM clinical.patients")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "PermissionDenied");
    assert!(
        err.to_string()
            .contains("only aggregate queries are allowed"),
        "{err}"
    );

    // Per condition code: exactly the groups with at least 11 distinct patients.
    let released = sql(
        &mut bob,
        "SELECT code, count(DISTINCT patient_id) AS n FROM clinical.conditions GROUP BY code ORDER BY code",
    )
    .await
    .unwrap();
    let expected = raw_query(
        "SELECT code, count(DISTINCT patient_id) AS n FROM clinical_conditions GROUP BY code \
         HAVING count(DISTINCT patient_id) >= 11 ORDER BY code",
    )
    .await;
    assert_eq!(column_text(&released, 0), column_text(&expected, 0));
    assert_eq!(column_text(&released, 1), column_text(&expected, 1));
    for rare in ["E75.22", "Q87.40", "D81.0", "G71.01"] {
        assert!(
            !column_text(&released, 0).contains(&rare.to_string()),
            "rare condition {rare} released"
        );
    }
    // A frequent flyer's chronic code: many rows, too few patients. The demo lake's skew
    // plants such codes; the threshold counts patients, not rows.
    let reasons = sql(
        &mut bob,
        "SELECT reason_code, count(*) AS n FROM clinical.encounters GROUP BY reason_code ORDER BY reason_code",
    )
    .await
    .unwrap();
    let expected = raw_query(
        "SELECT reason_code, count(*) AS n FROM clinical_encounters GROUP BY reason_code \
         HAVING count(DISTINCT patient_id) >= 11 ORDER BY reason_code",
    )
    .await;
    assert_eq!(column_text(&reasons, 0), column_text(&expected, 0));
    assert_eq!(column_text(&reasons, 1), column_text(&expected, 1));
    let crowded_but_few = raw_query(
        "SELECT reason_code FROM clinical_encounters WHERE reason_code IS NOT NULL GROUP BY reason_code \
         HAVING count(*) >= 30 AND count(DISTINCT patient_id) < 11",
    )
    .await;
    let crowded_but_few = column_text(&crowded_but_few, 0);
    assert!(
        !crowded_but_few.is_empty(),
        "the lake plants no frequent flyer"
    );
    for code in &crowded_but_few {
        assert!(!column_text(&reasons, 0).contains(code), "{code} released");
    }
    // One patient with many rows is still one patient.
    let per_patient = sql(
        &mut bob,
        "SELECT patient_id, count(*) FROM clinical.encounters GROUP BY patient_id",
    )
    .await
    .unwrap();
    assert_eq!(rows(&per_patient), 0);
    // No genomics.
    let err = sql(&mut bob, "SELECT count(*) FROM omics.variants")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn carol_gets_identified_rows_at_her_site_with_ssn_last_four() {
    let server = TestServer::start().await;
    let mut carol = login(&server, "carol").await;
    let at_site = scalar_i64(
        &raw_query("SELECT count(*) FROM clinical_patients WHERE site_id = 'SITE_A'").await,
    );
    assert_eq!(
        first_i64(
            &sql(&mut carol, "SELECT count(*) FROM clinical.patients")
                .await
                .unwrap()
        ),
        at_site
    );
    let sites = strings(
        &sql(&mut carol, "SELECT DISTINCT site_id FROM clinical.patients")
            .await
            .unwrap(),
        0,
    );
    assert_eq!(sites, vec![Some("SITE_A".to_string())]);
    let ssns = strings(
        &sql(&mut carol, "SELECT ssn, first_name FROM clinical.patients")
            .await
            .unwrap(),
        0,
    );
    assert!(ssns.iter().all(|s| {
        let s = s.as_deref().unwrap_or("");
        s.len() == 11 && s.starts_with("***-**-") && s[7..].bytes().all(|b| b.is_ascii_digit())
    }));
    let names = sql(
        &mut carol,
        "SELECT count(*) FROM clinical.patients WHERE first_name IS NULL",
    )
    .await
    .unwrap();
    assert_eq!(first_i64(&names), 0, "carol's patients are identified");
    // Tables without site_id are filtered through the patient's site.
    let obs = first_i64(
        &sql(&mut carol, "SELECT count(*) FROM clinical.observations")
            .await
            .unwrap(),
    );
    let raw_obs = scalar_i64(
        &raw_query(
            "SELECT count(*) FROM clinical_observations o JOIN clinical_patients p ON o.patient_id = p.patient_id WHERE p.site_id = 'SITE_A'",
        )
        .await,
    );
    assert_eq!(obs, raw_obs);
    let err = sql(&mut carol, "SELECT * FROM omics.variants")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn erin_and_mallory_see_no_clinical_table() {
    let server = TestServer::start().await;
    for user in ["erin", "mallory"] {
        let mut c = login(&server, user).await;
        for table in [
            "clinical.patients",
            "clinical.encounters",
            "clinical.conditions",
            "clinical.observations",
            "omics.variants",
        ] {
            let err = sql(&mut c, &format!("SELECT count(*) FROM {table}"))
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("not found"),
                "{user} {table}: {err}"
            );
        }
    }
}
