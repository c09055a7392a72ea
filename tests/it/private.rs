//! Differential privacy through the real server: noisy answers marked as noisy, contribution
//! bounds, the budget (exhaustion, restarts, two servers racing, an unreachable ledger) and the
//! differencing attack that aggregation thresholds do not stop.
//!
//! Each test names its own rule, and a principal's budget is kept per rule: tests sharing the
//! lake never spend each other's budget. Where a test needs exact answers it grants an epsilon
//! so large that the noise is 0 except with probability below 1e-100.

use arrow::array::{Array, Float64Array, Int64Array, StringArray};
use lakegate_tests::{raw_query, scalar_i64, ServerOptions, TestServer};

use crate::common::{code_of, first_i64, login, rows, sql};

/// A policy that grants researchers with purpose public_health differential privacy only,
/// under rule `rule`, with the grant's other `fields`.
fn policy(rule: &str, fields: &str) -> String {
    format!(
        r#"version = "dp-test"

[[rule]]
name = "{rule}"
effect = "allow"
subject = 'r.sub.role == "researcher" && r.sub.purpose == "public_health"'
object = 'r.obj.schema == "clinical"'
actions = ["aggregate_query"]
masks = [{{ label = "phi.direct", mask = "nullify" }}]
differential_privacy = {{ unit = "patient_id", window = "30d", max_groups_per_unit = 4, max_rows_per_group = 5, bounds = {{ total_cost = [0.0, 50000.0], value = [0.0, 500.0] }}, {fields} }}
"#
    )
}

async fn server_with(rule: &str, fields: &str) -> TestServer {
    TestServer::start_with(ServerOptions {
        policy: Some(policy(rule, fields)),
        ..Default::default()
    })
    .await
}

fn i64_column(batches: &[arrow::array::RecordBatch], i: usize) -> Vec<i64> {
    let mut out = Vec::new();
    for b in batches {
        let a = b
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int64");
        out.extend((0..a.len()).map(|r| a.value(r)));
    }
    out
}

/// One number from the caller's `lakegate.privacy_budget` (one grant, so one row).
async fn budget(client: &mut crate::common::Client, column: &str) -> f64 {
    let batches = sql(
        client,
        &format!("SELECT CAST({column} AS DOUBLE) FROM lakegate.privacy_budget"),
    )
    .await
    .expect("budget table");
    batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<Float64Array>()
        .expect("f64")
        .value(0)
}

/// A patient with at least 50 encounters (the demo plants such frequent flyers).
async fn frequent_flyer() -> (String, i64) {
    let batches = raw_query(
        "SELECT patient_id, count(*) AS n FROM clinical_encounters GROUP BY patient_id ORDER BY n DESC, patient_id LIMIT 1",
    )
    .await;
    let b = &batches[0];
    let id = b
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::StringViewArray>()
        .map(|a| a.value(0).to_string())
        .or_else(|| {
            b.column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .map(|a| a.value(0).to_string())
        })
        .expect("a patient id");
    let n = b
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("count")
        .value(0);
    (id, n)
}

const PRECISE: &str =
    "epsilon = 1000000.0, delta = 0.5, epsilon_per_query = 2000.0, delta_per_query = 1e-9";

#[tokio::test]
async fn noisy_answers_are_marked_and_bounded_per_patient() {
    let server = server_with("dp-precise", PRECISE).await;
    let mut frank = login(&server, "frank").await;

    // Exact at this epsilon: the count of patients, ungrouped and grouped.
    let truth =
        scalar_i64(&raw_query("SELECT count(DISTINCT patient_id) FROM clinical_patients").await);
    let got = sql(
        &mut frank,
        "SELECT count(DISTINCT patient_id) AS patients FROM clinical.patients",
    )
    .await
    .expect("a private count");
    assert_eq!(first_i64(&got), truth);
    let schema = got[0].schema();
    let field = schema.field(0);
    assert_eq!(
        field
            .metadata()
            .get("lakegate.dp.noisy")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        field
            .metadata()
            .get("lakegate.dp.mechanism")
            .map(String::as_str),
        Some("discrete_laplace")
    );
    assert_eq!(
        schema
            .metadata()
            .get("lakegate.dp.epsilon_spent")
            .map(String::as_str),
        Some("2000")
    );

    let by_sex = sql(
        &mut frank,
        "SELECT sex, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY sex ORDER BY sex",
    )
    .await
    .expect("grouped");
    let truth = raw_query(
        "SELECT count(DISTINCT patient_id) AS n FROM clinical_patients GROUP BY sex ORDER BY sex",
    )
    .await;
    assert_eq!(i64_column(&by_sex, 1), i64_column(&truth, 0));

    // Whatever is computed from released groups is post-processing: counting them is free.
    let groups = sql(
        &mut frank,
        "SELECT count(*) FROM (SELECT sex, count(*) AS n FROM clinical.patients GROUP BY sex) t WHERE n > 0",
    )
    .await
    .expect("post-processing");
    assert_eq!(first_i64(&groups), i64_column(&truth, 0).len() as i64);

    // A patient with 50+ encounters, joined to themself (2,500+ rows), counts L = 5 rows.
    let (flyer, encounters) = frequent_flyer().await;
    assert!(encounters >= 50, "{encounters}");
    let one = sql(
        &mut frank,
        &format!("SELECT count(*) FROM clinical.encounters a JOIN clinical.encounters b ON a.patient_id = b.patient_id WHERE a.patient_id = '{flyer}'"),
    )
    .await
    .expect("self join");
    assert_eq!(first_i64(&one), 5);
    // Without them, every count moves by at most L.
    let all = first_i64(
        &sql(&mut frank, "SELECT count(*) FROM clinical.encounters")
            .await
            .expect("all"),
    );
    let without = first_i64(
        &sql(
            &mut frank,
            &format!("SELECT count(*) FROM clinical.encounters WHERE patient_id <> '{flyer}'"),
        )
        .await
        .expect("without"),
    );
    assert_eq!(all - without, 5);

    // A sum is of clamped values, at most L rows per patient: the flyer's costs add at most
    // 5 x 50,000.
    let sum_of = |batches: &[arrow::array::RecordBatch]| {
        batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("float")
            .value(0)
    };
    let flyer_sum = sum_of(
        &sql(
            &mut frank,
            &format!(
                "SELECT sum(total_cost) FROM clinical.encounters WHERE patient_id = '{flyer}'"
            ),
        )
        .await
        .expect("sum"),
    );
    assert!((0.0..=250_000.0).contains(&flyer_sum), "{flyer_sum}");
}

#[tokio::test]
async fn what_cannot_be_bounded_is_refused_naming_the_rule() {
    let server = server_with("dp-refusals", PRECISE).await;
    let mut frank = login(&server, "frank").await;
    for (query, why) in [
        ("SELECT ssn FROM clinical.patients", "row_query on clinical.patients is refused"),
        ("SELECT max(total_cost) FROM clinical.encounters", "aggregate max is refused"),
        ("SELECT min(birth_date) FROM clinical.patients", "aggregate min is refused"),
        ("SELECT sum(total_cost * 100) FROM clinical.encounters", "must take a column of the data as it is"),
        ("SELECT count(*) FILTER (WHERE total_cost > 100) FROM clinical.encounters", "FILTER is refused"),
        ("SELECT count(DISTINCT site_id) FROM clinical.patients", "count(DISTINCT ...) is allowed only of the privacy unit"),
        ("SELECT count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.site_id = p.site_id", "joined only on the privacy unit patient_id"),
        ("SELECT count(*) FROM clinical.encounters WHERE patient_id IN (SELECT patient_id FROM clinical.patients WHERE ssn = '1')", "subqueries below a private aggregate are refused"),
        ("SELECT count(*) FROM (SELECT * FROM clinical.encounters LIMIT 5)", "LIMIT or OFFSET below a private aggregate is refused"),
        ("SELECT sex, count(*) FROM clinical.patients GROUP BY ROLLUP(sex)", "ROLLUP"),
        // An error would answer for one patient, whatever the noise.
        ("SELECT count(*) FROM clinical.patients WHERE 1 / (CASE WHEN zip = '02139' AND sex = 'F' THEN 0 ELSE 1 END) = 1", "could fail on some rows"),
        ("SELECT CAST(zip AS INT), count(*) FROM clinical.patients GROUP BY CAST(zip AS INT)", "could fail on some rows"),
        ("SELECT count(*) FROM omics.variants", "not found"),
    ] {
        let err = sql(&mut frank, query).await.expect_err(query);
        let text = err.to_string();
        assert!(text.contains(why), "{query}: {text}");
        if why != "not found" {
            assert_eq!(code_of(&err), "PermissionDenied", "{query}: {text}");
            assert!(text.contains("(rule: "), "{query}: {text}");
        }
    }
    // Nothing refused was charged.
    assert_eq!(budget(&mut frank, "charges").await, 0.0);
}

#[tokio::test]
async fn the_budget_runs_out_and_says_when_it_refreshes() {
    let server = server_with(
        "dp-exhaust",
        "epsilon = 3.0, delta = 1e-5, epsilon_per_query = 1.0, delta_per_query = 1e-7",
    )
    .await;
    let mut frank = login(&server, "frank").await;
    for _ in 0..3 {
        sql(&mut frank, "SELECT count(*) FROM clinical.patients")
            .await
            .expect("within budget");
    }
    let err = sql(&mut frank, "SELECT count(*) FROM clinical.patients")
        .await
        .expect_err("over budget");
    let text = err.to_string();
    assert_eq!(code_of(&err), "PermissionDenied", "{text}");
    for part in [
        "privacy budget exceeded",
        "costs epsilon 1",
        "0 of 3 remains",
        "refreshes at",
        "(rule: dp-exhaust)",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(budget(&mut frank, "epsilon_spent").await, 3.0);
    assert_eq!(budget(&mut frank, "epsilon_remaining").await, 0.0);
    assert_eq!(budget(&mut frank, "charges").await, 3.0);
    // The audit trail says what each allowed query spent and what remained, and why the last
    // was refused. Refusals are written a moment after the client hears of them.
    let charged = "epsilon 1 charged on rule dp-exhaust; 0 of epsilon 3 remains";
    let mut trail = String::new();
    for _ in 0..50 {
        trail = crate::audit::trail_text(&server).await;
        if trail.contains(charged) && trail.contains("privacy budget exceeded") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        trail.contains(charged),
        "no charge in the audit trail: {}",
        trail
            .lines()
            .rfind(|l| l.contains("dp-exhaust"))
            .unwrap_or_default()
    );
    assert!(
        trail.contains("privacy budget exceeded"),
        "no refusal in the audit trail"
    );
}

#[tokio::test]
async fn budget_survives_a_restart_and_two_servers_cannot_overspend_it() {
    let fields = "epsilon = 5.0, delta = 1e-5, epsilon_per_query = 1.0, delta_per_query = 1e-7";
    let first = server_with("dp-race", fields).await;
    let mut frank = login(&first, "frank").await;
    for _ in 0..2 {
        sql(&mut frank, "SELECT count(*) FROM clinical.encounters")
            .await
            .expect("spend");
    }
    // A server started afterwards on the same lake (a restart) sees what was spent.
    let second = server_with("dp-race", fields).await;
    let mut again = login(&second, "frank").await;
    assert_eq!(budget(&mut again, "epsilon_spent").await, 2.0);
    // Three remain; eight clients on two servers race for them.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = if i % 2 == 0 {
            first.url()
        } else {
            second.url()
        };
        tasks.push(tokio::spawn(async move {
            let mut c = crate::common::login_url(&url, "frank").await;
            sql(&mut c, "SELECT count(*) FROM clinical.patients").await
        }));
    }
    let mut served = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => served += 1,
            Err(e) => assert!(e.to_string().contains("privacy budget exceeded"), "{e}"),
        }
    }
    assert_eq!(served, 3);
}

#[tokio::test]
async fn an_unreachable_ledger_refuses_the_query_and_the_server_keeps_serving() {
    let (_dir, lake, server) = lakegate_tests::start_on_own_lake(200).await;
    let mut frank = login(&server, "frank").await;
    // The ledger's folder is a file: every write to it fails.
    std::fs::write(lake.join("privacy"), b"not a folder").expect("block the ledger");
    let err = sql(&mut frank, "SELECT count(*) FROM clinical.patients")
        .await
        .expect_err("fail closed");
    assert_eq!(code_of(&err), "Unavailable", "{err}");
    assert!(
        err.to_string().contains("privacy-budget-fail-closed"),
        "{err}"
    );
    std::fs::remove_file(lake.join("privacy")).expect("unblock");
    let ok = sql(&mut frank, "SELECT count(*) FROM clinical.patients")
        .await
        .expect("served again");
    assert_eq!(rows(&ok), 1);
}

#[tokio::test]
async fn a_differencing_attack_yields_only_noise() {
    // The target: the frequent flyer, singled out by quasi-identifiers that bob and frank both
    // see unmasked (bob sees pseudonyms, not patient ids).
    let (flyer, _) = frequent_flyer().await;
    let person = raw_query(&format!(
        "SELECT CAST(birth_date AS VARCHAR), zip FROM clinical_patients WHERE patient_id = '{flyer}'"
    ))
    .await;
    let text = |i: usize| {
        arrow::util::display::array_value_to_string(person[0].column(i), 0).expect("text")
    };
    let (born, zip) = (text(0), text(1));
    let whole = "SELECT count(*) FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id WHERE e.encounter_class = 'inpatient'";
    let target = format!("p.birth_date = DATE '{born}' AND p.zip = '{zip}'");
    let minus = format!("{whole} AND NOT ({target})");
    let truth = scalar_i64(
        &raw_query(&format!(
            "SELECT count(*) FROM clinical_encounters e JOIN clinical_patients p ON e.patient_id = p.patient_id WHERE e.encounter_class = 'inpatient' AND {target}"
        ))
        .await,
    );
    assert!(truth > 0, "the target has inpatient encounters");
    // Under an aggregation threshold both groups are large, so the difference is exactly the
    // patient's count.
    let demo = TestServer::start().await;
    let mut bob = login(&demo, "bob").await;
    let a = first_i64(&sql(&mut bob, whole).await.expect("bob"));
    let b = first_i64(&sql(&mut bob, &minus).await.expect("bob"));
    assert_eq!(a - b, truth);

    // Under differential privacy each answer carries noise of scale L / epsilon = 10: ten
    // differences are all equal with probability below 1e-9.
    let server = server_with(
        "dp-attack",
        "epsilon = 100.0, delta = 1e-5, epsilon_per_query = 0.5, delta_per_query = 1e-7",
    )
    .await;
    let mut frank = login(&server, "frank").await;
    let mut differences = Vec::new();
    for _ in 0..10 {
        let a = first_i64(&sql(&mut frank, whole).await.expect("frank"));
        let b = first_i64(&sql(&mut frank, &minus).await.expect("frank"));
        differences.push(a - b);
    }
    differences.sort_unstable();
    differences.dedup();
    assert!(differences.len() >= 2, "{differences:?}");
    // Repeating the query was charged every time: twenty charges of 0.5.
    assert_eq!(budget(&mut frank, "epsilon_spent").await, 10.0);
}
