//! Pseudonyms that are only counted are read raw (engine/src/counted.rs): the counts are the
//! same as over the pseudonyms, and every other use of such a column keeps its mask.

use datafusion::physical_plan::displayable;
use lakegate_policies::Principal;
use lakegate_tests::{raw_query, TestServer};

use crate::common::{column_text, login, persona, sql};

async fn physical(server: &TestServer, who: &Principal, q: &str) -> String {
    let planned = server
        .engine
        .session(who)
        .await
        .unwrap()
        .plan(q)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"));
    displayable(planned.verified_physical_plan().await.unwrap().as_ref())
        .indent(false)
        .to_string()
}

#[tokio::test]
async fn pseudonyms_only_counted_are_read_raw_and_count_the_same() {
    let server = TestServer::start().await;
    let consenting = "SELECT patient_id FROM clinical_patients WHERE research_consent";
    // (who, governed query, plain DataFusion query giving the same answer over raw files)
    let same: Vec<(Principal, &str, String)> = vec![
        (
            persona("bob"),
            "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY site_id ORDER BY site_id",
            "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical_patients GROUP BY site_id \
             HAVING count(DISTINCT patient_id) >= 11 ORDER BY site_id"
                .into(),
        ),
        (
            // The threshold's own hidden count of patients is read raw too.
            persona("bob"),
            "SELECT encounter_class, count(*) AS n FROM clinical.encounters GROUP BY encounter_class ORDER BY encounter_class",
            "SELECT encounter_class, count(*) AS n FROM clinical_encounters GROUP BY encounter_class \
             HAVING count(DISTINCT patient_id) >= 11 ORDER BY encounter_class"
                .into(),
        ),
        (
            // Under a threshold, both sides of the privacy-unit join compare raw ids.
            persona("bob"),
            "SELECT p.sex, count(DISTINCT p.patient_id) AS n, round(avg(e.total_cost), 2) AS c \
             FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id \
             GROUP BY p.sex ORDER BY p.sex",
            "SELECT p.sex, count(DISTINCT p.patient_id) AS n, round(avg(e.total_cost), 2) AS c \
             FROM clinical_encounters e JOIN clinical_patients p ON e.patient_id = p.patient_id \
             GROUP BY p.sex HAVING count(DISTINCT p.patient_id) >= 11 ORDER BY p.sex"
                .into(),
        ),
        (
            persona("alice"),
            "SELECT count(DISTINCT patient_id) AS d, count(patient_id) AS n FROM clinical.encounters",
            format!(
                "SELECT count(DISTINCT patient_id) AS d, count(patient_id) AS n FROM clinical_encounters \
                 WHERE patient_id IN ({consenting})"
            ),
        ),
        (
            // Renamed, through derived tables and a filter on another column.
            persona("alice"),
            "SELECT n, m FROM (SELECT count(DISTINCT p) AS n, count(*) AS m FROM \
             (SELECT patient_id AS p, site_id FROM clinical.patients WHERE site_id = 'SITE_A') t) u",
            format!(
                "SELECT count(DISTINCT patient_id) AS n, count(*) AS m FROM clinical_patients \
                 WHERE site_id = 'SITE_A' AND patient_id IN ({consenting})"
            ),
        ),
        (
            // Without a threshold, an aggregate of counts only gets the same treatment (its
            // groups leave sorted instead): alice's cohort count, two levels over raw ids...
            persona("alice"),
            "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY site_id ORDER BY site_id",
            format!(
                "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical_patients \
                 WHERE patient_id IN ({consenting}) GROUP BY site_id ORDER BY site_id"
            ),
        ),
        (
            // ... a join counted by group, raw ids on both sides...
            persona("alice"),
            "SELECT p.sex, count(*) AS n, count(DISTINCT e.patient_id) AS d FROM clinical.encounters e \
             JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY p.sex ORDER BY p.sex",
            format!(
                "SELECT p.sex, count(*) AS n, count(DISTINCT e.patient_id) AS d FROM clinical_encounters e \
                 JOIN clinical_patients p ON e.patient_id = p.patient_id \
                 WHERE p.patient_id IN ({consenting}) GROUP BY p.sex ORDER BY p.sex"
            ),
        ),
        (
            // ... and, with no group keys (one row), a grouping of the ids counted.
            persona("alice"),
            "SELECT count(*) AS n FROM (SELECT patient_id FROM clinical.patients GROUP BY patient_id) t",
            format!("SELECT count(*) AS n FROM ({consenting}) t"),
        ),
        (
            // Nested: only the aggregate whose grouping read raw ids gets its groups sorted.
            persona("alice"),
            "SELECT n, count(*) AS sites FROM (SELECT site_id, count(DISTINCT patient_id) AS n \
             FROM clinical.patients GROUP BY site_id) t GROUP BY n ORDER BY n",
            format!(
                "SELECT n, count(*) AS sites FROM (SELECT site_id, count(DISTINCT patient_id) AS n \
                 FROM clinical_patients WHERE patient_id IN ({consenting}) GROUP BY site_id) t \
                 GROUP BY n ORDER BY n"
            ),
        ),
    ];
    // Those groups leave sorted: each partition is sorted directly above a release check that
    // passes every group (k = 0), as above a threshold.
    for q in [same[5].1, same[6].1, same[8].1] {
        let plan = physical(&server, &persona("alice"), q).await;
        assert_eq!(plan.matches("lg_threshold").count(), 1, "{q}:\n{plan}");
        let sort = line_above_check(q, &plan);
        assert!(
            sort.contains("SortExec") && sort.contains("preserve_partitioning=[true]"),
            "{q}: groups not sorted above the check:\n{plan}"
        );
    }
    // bob's cohort count runs as plain DataFusion plans it unguarded: a lone distinct count as
    // a two-level GROUP BY (`alias1`), whose inner grouping reads the ids raw because the
    // released groups leave sorted (engine/src/counted.rs).
    let cohort = physical(&server, &persona("bob"), same[0].1).await;
    assert!(cohort.contains("alias1"), "not two levels:\n{cohort}");
    // Read raw as the scan delivers them (views), not copied into a new array of strings.
    assert!(!cohort.contains("CAST(patient_id"), "ids copied:\n{cohort}");
    // Released groups are sorted once: the sort by every grouping column that the plan already
    // holds directly above the check is kept, and no second one is added below it
    // (`order_released_groups`), also where the check's filter drops the units column.
    for q in [
        same[0].1,
        "SELECT site_id, sex, count(*) AS n FROM clinical.patients GROUP BY site_id, sex",
    ] {
        let plan = physical(&server, &persona("bob"), q).await;
        assert!(
            line_above_check(q, &plan).contains("SortExec"),
            "{q}: groups not sorted above the check:\n{plan}"
        );
        assert_eq!(
            plan.matches("SortExec").count(),
            1,
            "{q}: sorted twice:\n{plan}"
        );
    }
    for (who, q, oracle) in &same {
        let plan = physical(&server, who, q).await;
        assert!(
            !plan.contains("lg_pseudonym"),
            "{q} still pseudonymizes:\n{plan}"
        );
        let mut client = login(&server, &who.name).await;
        let got = sql(&mut client, q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let want = raw_query(oracle).await;
        let cols = want.first().map_or(0, |b| b.num_columns());
        assert!(cols > 0, "{oracle} returned nothing");
        for i in 0..cols {
            assert_eq!(column_text(&got, i), column_text(&want, i), "{q}");
        }
    }

    // Every other use keeps the pseudonym: output, predicate, function, another aggregate,
    // FILTER, group key, join key, union, sort, subquery.
    let kept = [
        "SELECT patient_id FROM clinical.patients",
        "SELECT count(*) FROM clinical.patients WHERE patient_id LIKE 'ps_a%'",
        "SELECT count(DISTINCT upper(patient_id)) FROM clinical.patients",
        "SELECT count(DISTINCT patient_id), min(patient_id) FROM clinical.patients",
        "SELECT count(DISTINCT patient_id) FILTER (WHERE patient_id > 'ps_8') FROM clinical.patients",
        // An aggregate other than a count may depend on the order rows arrive in (a float
        // sum's rounding), which a join or grouping of raw ids would steer.
        "SELECT p.sex, avg(e.total_cost) FROM clinical.encounters e \
         JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY p.sex",
        "SELECT sum(e.total_cost) FROM clinical.encounters e \
         JOIN clinical.patients p ON e.patient_id = p.patient_id",
        "SELECT site_id, count(DISTINCT patient_id), sum(total_cost) FROM clinical.encounters GROUP BY site_id",
        "SELECT count(DISTINCT patient_id) FROM \
         (SELECT patient_id FROM clinical.patients UNION ALL SELECT patient_id FROM clinical.encounters) t",
        "SELECT count(DISTINCT patient_id) FROM \
         (SELECT patient_id FROM clinical.patients ORDER BY patient_id LIMIT 10) t",
        "SELECT count(DISTINCT patient_id) FROM clinical.patients \
         WHERE birth_date > (SELECT min(birth_date) FROM clinical.patients)",
        // A grouping of the id that a LIMIT cuts (which groups it keeps follows their order).
        "SELECT count(*) FROM (SELECT patient_id FROM clinical.patients GROUP BY patient_id LIMIT 5) t",
    ];
    for q in kept {
        let plan = physical(&server, &persona("alice"), q).await;
        assert!(
            plan.contains("lg_pseudonym"),
            "{q} lost its pseudonym:\n{plan}"
        );
    }
    // Under a threshold too, only the counted column of the two-level plan is read raw: a group
    // key of the released groups keeps its pseudonym; so do join keys that also leave as a group
    // key. (Join keys whose rows pass a LIMIT would too, but a LIMIT below the aggregate is
    // refused under a threshold: the attack suite.)
    for q in [
        "SELECT patient_id, count(DISTINCT encounter_id) FROM clinical.encounters GROUP BY patient_id",
        "SELECT p.patient_id, count(*) FROM clinical.encounters e \
         JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY p.patient_id",
    ] {
        let plan = physical(&server, &persona("bob"), q).await;
        // Every scan of the query: both sides of a join, or neither, compare pseudonyms.
        let scans = plan.matches("DataSourceExec").count();
        assert_eq!(
            plan.matches("lg_pseudonym(patient_id").count(),
            scans,
            "{q} lost a pseudonym:\n{plan}"
        );
    }
    let q = "SELECT patient_id, count(DISTINCT encounter_id) FROM clinical.encounters GROUP BY patient_id";
    let plan = physical(&server, &persona("bob"), q).await;
    assert!(
        !plan.contains("lg_pseudonym(encounter_id"),
        "{q} pseudonymizes a count:\n{plan}"
    );
}

/// The line of an indented physical plan directly above its (first) release check.
fn line_above_check<'a>(q: &str, plan: &'a str) -> &'a str {
    let lines: Vec<&str> = plan.lines().collect();
    match lines
        .iter()
        .position(|l| l.contains("FilterExec") && l.contains("lg_threshold"))
    {
        Some(check) if check > 0 => lines[check - 1],
        _ => panic!("{q}: no release check under another node:\n{plan}"),
    }
}
