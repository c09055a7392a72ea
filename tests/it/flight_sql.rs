//! The Flight SQL surface as a client sees it: authentication, statements, prepared statements,
//! metadata, tickets, bad input and limits.

use std::sync::Arc;

use crate::common::{column_text, persona};
use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, CommandGetDbSchemas,
    CommandGetTables, CommandPreparedStatementQuery, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightInfo, Ticket};
use datafusion::physical_plan::{displayable, ExecutionPlanProperties};
use futures::{StreamExt, TryStreamExt};
use lakegate_engine::EngineConfig;
use lakegate_flight_server::Lifetimes;
use lakegate_tests::{
    raw_query, raw_query_in, scalar_i64, ServerOptions, TestServer, TEST_PATIENTS,
};
use prost::Message;
use tonic::transport::Channel;

type Client = FlightSqlServiceClient<Channel>;

async fn connect(server: &TestServer) -> Client {
    crate::common::connect_url(&server.url()).await
}

async fn login(server: &TestServer, user: &str) -> Client {
    let mut c = connect(server).await;
    c.handshake(user, &format!("demo-{user}"))
        .await
        .expect("handshake");
    c
}

/// Every endpoint's batches, each checked (as the ADBC driver does) to carry exactly the schema
/// GetFlightInfo announced, nullability included.
async fn fetch(client: &mut Client, info: FlightInfo) -> Result<Vec<RecordBatch>, FlightError> {
    let announced = info.clone().try_decode_schema().expect("announced schema");
    let mut out = Vec::new();
    for ep in info.endpoint {
        assert!(
            ep.location.is_empty(),
            "endpoints must not carry a location"
        );
        let ticket = ep.ticket.expect("ticket");
        let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
        for b in &batches {
            assert_eq!(
                b.schema().as_ref(),
                &announced,
                "DoGet's schema is not the announced one"
            );
        }
        out.extend(batches);
    }
    Ok(out)
}

async fn query(client: &mut Client, sql: &str) -> Result<Vec<RecordBatch>, FlightError> {
    let info = client.execute(sql.to_string(), None).await?;
    fetch(client, info).await
}

fn single_i64(batches: &[RecordBatch]) -> i64 {
    let b = batches.iter().find(|b| b.num_rows() > 0).expect("a row");
    b.column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("int64")
        .value(0)
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// The status code a client error carries, read off the error text (the client flattens
/// tonic statuses into ArrowError).
fn assert_code(err: impl std::fmt::Debug, code: &str) -> String {
    let text = format!("{err:?}");
    assert!(text.contains(code), "expected {code}, got {text}");
    text
}

#[tokio::test]
async fn wrong_password_and_missing_token_are_unauthenticated() {
    let server = TestServer::start().await;
    let mut c = connect(&server).await;
    // The client's handshake flattens the status into text: read what the user reads.
    let err = c.handshake("alice", "wrong").await.unwrap_err();
    assert_code(err, "invalid user name or password");
    let err = c.handshake("nobody", "demo-nobody").await.unwrap_err();
    assert_code(err, "invalid user name or password");
    let err = c.execute("SELECT 1".into(), None).await.unwrap_err();
    assert_code(err, "Unauthenticated");
    c.set_token("forged.token".into());
    let err = c.execute("SELECT 1".into(), None).await.unwrap_err();
    assert_code(err, "Unauthenticated");
}

#[tokio::test]
async fn statement_query_streams_results() {
    // Small batches so that streaming is visible on a small lake.
    let server = TestServer::start_with(ServerOptions {
        engine: Some(EngineConfig {
            batch_size: 512,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let batches = query(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap();
    // alice sees consenting patients only.
    let consenting = scalar_i64(
        &raw_query("SELECT count(*) FROM clinical_patients WHERE research_consent").await,
    );
    assert_eq!(single_i64(&batches), consenting);
    assert!(consenting < TEST_PATIENTS as i64);

    // Every encounter row streams back, over several batches from several files.
    let info = alice
        .execute(
            "SELECT encounter_id, total_cost FROM clinical.encounters".into(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        info.total_records, -1,
        "GetFlightInfo must not run the query"
    );
    let batches = fetch(&mut alice, info).await.unwrap();
    let expected = single_i64(
        &query(&mut alice, "SELECT count(*) FROM clinical.encounters")
            .await
            .unwrap(),
    );
    assert_eq!(rows(&batches) as i64, expected);
    assert!(
        batches.len() > 1,
        "expected a stream of batches, got {}",
        batches.len()
    );
}

#[tokio::test]
async fn prepared_statement_with_bound_parameters() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    let literal = single_i64(
        &query(
            &mut alice,
            "SELECT count(*) FROM clinical.patients WHERE site_id = 'SITE_B'",
        )
        .await
        .unwrap(),
    );
    assert!(literal > 0);

    let mut stmt = alice
        .prepare(
            "SELECT count(*) AS n FROM clinical.patients WHERE site_id = ?".into(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(stmt.parameter_schema().unwrap().fields().len(), 1);
    assert_eq!(stmt.dataset_schema().unwrap().field(0).name(), "n");
    let params = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("$1", DataType::Utf8, true)])),
        vec![Arc::new(StringArray::from(vec!["SITE_B"]))],
    )
    .unwrap();
    stmt.set_parameters(params.clone()).unwrap();
    let info = stmt.execute().await.unwrap();
    let batches = fetch(&mut alice, info).await.unwrap();
    assert_eq!(single_i64(&batches), literal);

    stmt.close().await.unwrap();

    // A handle is bound to its caller: carol cannot use alice's.
    let action = arrow_flight::Action {
        r#type: "CreatePreparedStatement".into(),
        body: ActionCreatePreparedStatementRequest {
            query: "SELECT ssn FROM clinical.patients".into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec()
        .into(),
    };
    let results: Vec<arrow_flight::Result> = alice
        .do_action(action)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let created: ActionCreatePreparedStatementResult =
        arrow_flight::sql::Any::decode(results[0].body.clone())
            .unwrap()
            .unpack()
            .unwrap()
            .unwrap();
    // Parameters streamed without end are refused at the second row, not collected until
    // the server runs out of memory.
    let endless = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_cmd(
            CommandPreparedStatementQuery {
                prepared_statement_handle: created.prepared_statement_handle.clone(),
            }
            .as_any()
            .encode_to_vec(),
        )))
        .build(futures::stream::repeat(params).map(Ok))
        .map(|d| d.unwrap());
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), alice.do_put(endless))
        .await
        .expect("the server answers while the client is still sending")
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("one row of parameters"),
        "{err:?}"
    );
    let mut carol = login(&server, "carol").await;
    let cmd = CommandPreparedStatementQuery {
        prepared_statement_handle: created.prepared_statement_handle,
    };
    let mut request = tonic::Request::new(FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec()));
    let bearer = format!("Bearer {}", carol.token().unwrap());
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    let err = carol
        .inner_mut()
        .get_flight_info(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
}

#[tokio::test]
async fn metadata_lists_only_visible_datasets() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    let info = alice
        .get_tables(CommandGetTables {
            include_schema: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let batches = fetch(&mut alice, info).await.unwrap();
    let mut names = Vec::new();
    for b in &batches {
        let schemas = b
            .column_by_name("db_schema_name")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let tables = b
            .column_by_name("table_name")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let table_schemas = b
            .column_by_name("table_schema")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::BinaryArray>()
            .unwrap();
        for i in 0..b.num_rows() {
            names.push(format!("{}.{}", schemas.value(i), tables.value(i)));
            // Each column carries Flight SQL's column metadata: clients (ADBC's
            // `xdbc_type_name`, SQLAlchemy's reflected types) read the SQL type name from it.
            let schema =
                arrow::ipc::convert::try_schema_from_ipc_buffer(table_schemas.value(i)).unwrap();
            for f in schema.fields() {
                let md = f.metadata();
                let type_name = md.get("ARROW:FLIGHT:SQL:TYPE_NAME").map(String::as_str);
                let expected = match f.data_type() {
                    DataType::Utf8 => "VARCHAR",
                    DataType::Int64 => "BIGINT",
                    DataType::Float64 => "DOUBLE",
                    DataType::Boolean => "BOOLEAN",
                    DataType::Date32 => "DATE",
                    DataType::Timestamp(_, Some(_)) => "TIMESTAMP WITH TIME ZONE",
                    other => panic!("{}: unexpected type {other}", f.name()),
                };
                assert_eq!(type_name, Some(expected), "{}", f.name());
                assert_eq!(
                    md.get("ARROW:FLIGHT:SQL:TABLE_NAME"),
                    Some(&tables.value(i).to_string())
                );
                assert_eq!(
                    md.get("ARROW:FLIGHT:SQL:SCHEMA_NAME"),
                    Some(&schemas.value(i).to_string())
                );
            }
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "clinical.conditions",
            "clinical.encounters",
            "clinical.observations",
            "clinical.patients",
            "omics.variants"
        ]
    );

    // Filters are applied.
    let info = alice
        .get_tables(CommandGetTables {
            table_name_filter_pattern: Some("pat%".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut alice, info).await.unwrap()), 1);

    // mallory sees no schema and no table, and cannot query by name either.
    let mut mallory = login(&server, "mallory").await;
    let info = mallory
        .get_tables(CommandGetTables::default())
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut mallory, info).await.unwrap()), 0);
    let info = mallory
        .get_db_schemas(CommandGetDbSchemas::default())
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut mallory, info).await.unwrap()), 0);
    let err = query(&mut mallory, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap_err();
    let text = assert_code(err, "InvalidArgument");
    assert!(text.contains("not found"), "{text}");

    // dave's environment does not allow omics.
    let mut dave = login(&server, "dave").await;
    let info = dave.get_tables(CommandGetTables::default()).await.unwrap();
    assert_eq!(rows(&fetch(&mut dave, info).await.unwrap()), 4);

    let info = alice.get_catalogs().await.unwrap();
    assert_eq!(rows(&fetch(&mut alice, info).await.unwrap()), 1);
    let info = alice.get_table_types().await.unwrap();
    assert_eq!(rows(&fetch(&mut alice, info).await.unwrap()), 1);
    let info = alice
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut alice, info).await.unwrap()), 2);
}

fn ticket_of(info: &FlightInfo) -> Ticket {
    info.endpoint[0].ticket.clone().unwrap()
}

#[tokio::test]
async fn tickets_are_bound_signed_and_expire() {
    let server = TestServer::start_with(ServerOptions {
        lifetimes: Some(Lifetimes {
            ticket_secs: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let mut carol = login(&server, "carol").await;
    let info = alice
        .execute("SELECT ssn FROM clinical.patients".into(), None)
        .await
        .unwrap();
    let ticket = ticket_of(&info);

    // Replayed by another user.
    let err = carol.do_get(ticket.clone()).await.unwrap_err();
    assert_code(err, "PermissionDenied");

    // Altered: decode, flip a byte inside the signed payload, re-encode.
    let any = arrow_flight::sql::Any::decode(ticket.ticket.clone()).unwrap();
    let mut inner: TicketStatementQuery = any.unpack().unwrap().unwrap();
    let mut bytes = inner.statement_handle.to_vec();
    bytes[10] ^= 0x01;
    inner.statement_handle = bytes.into();
    let forged = Ticket::new(inner.as_any().encode_to_vec());
    let err = alice.do_get(forged).await.unwrap_err();
    assert_code(err, "InvalidArgument");

    // Garbage.
    let err = alice
        .do_get(Ticket::new(b"\x00garbage".to_vec()))
        .await
        .unwrap_err();
    assert_code(err, "InvalidArgument");

    // Expired.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let err = alice.do_get(ticket).await.unwrap_err();
    assert_code(err, "FailedPrecondition");

    // The server still serves.
    let batches = query(&mut alice, "SELECT 1").await.unwrap();
    assert_eq!(rows(&batches), 1);
}

#[tokio::test]
async fn non_queries_paths_and_bad_sql_are_refused_clearly() {
    let server = TestServer::start().await;
    let mut alice = login(&server, "alice").await;
    let err = query(&mut alice, "SELEC * FROM clinical.patients")
        .await
        .unwrap_err();
    let text = assert_code(err, "InvalidArgument");
    assert!(text.contains("SQL error"), "{text}");

    for sql in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM 'curated/clinical/patients/part-00000.parquet'",
        "SELECT * FROM 'file:///etc/passwd'",
    ] {
        let err = query(&mut alice, sql).await.unwrap_err();
        let text = assert_code(err, "InvalidArgument");
        assert!(!text.contains("root:"), "{text}");
    }
    for (sql, kind) in [
        (
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE",
        ),
        (
            "CREATE TABLE t AS SELECT * FROM clinical.patients",
            "CREATE",
        ),
        ("DROP TABLE clinical.patients", "DROP"),
        (
            "INSERT INTO clinical.patients SELECT * FROM clinical.patients",
            "INSERT",
        ),
        (
            "COPY (SELECT * FROM clinical.patients) TO '/tmp/out.parquet'",
            "COPY",
        ),
        ("SET datafusion.catalog.information_schema = true", "SET"),
        ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ] {
        let err = query(&mut alice, sql).await.unwrap_err();
        let text = assert_code(err, "InvalidArgument");
        assert!(
            text.contains(&format!("{kind} statements are refused")),
            "{sql}: {text}"
        );
    }
    let err = query(&mut alice, "SELECT * INTO t2 FROM clinical.patients")
        .await
        .unwrap_err();
    assert_code(err, "InvalidArgument");
    let err = query(&mut alice, "EXPLAIN SELECT * FROM clinical.patients")
        .await
        .unwrap_err();
    assert_code(err, "PermissionDenied");
    let err = query(&mut alice, "SELECT * FROM information_schema.tables")
        .await
        .unwrap_err();
    assert_code(err, "InvalidArgument");
    let err = alice
        .execute_update("DELETE FROM clinical.patients".into(), None)
        .await
        .unwrap_err();
    assert_code(err, "InvalidArgument");
    // Casting a patient's (partly shown) SSN fails without echoing it.
    let mut carol = login(&server, "carol").await;
    let err = query(
        &mut carol,
        "SELECT CAST(ssn AS BIGINT) FROM clinical.patients",
    )
    .await
    .unwrap_err();
    let text = format!("{err:?}");
    assert!(!regex_like_ssn(&text), "{text}");
    // A function refusing an argument at run time is the caller's mistake, said as such, with
    // the query's id for the operator and never the value (the parse error quotes a name).
    for sql in [
        "SELECT to_timestamp(first_name, '%Y') FROM clinical.patients",
        "SELECT date_trunc('fortnight', start_time) FROM clinical.encounters",
        "SELECT regexp_like(first_name, '[') FROM clinical.patients",
    ] {
        let err = query(&mut carol, sql).await.unwrap_err();
        let text = assert_code(err, "InvalidArgument");
        assert!(text.contains("refused one of its inputs"), "{sql}: {text}");
        assert!(text.contains("(query "), "{sql}: {text}");
        assert!(
            !text.contains("parsing") && !text.contains("fortnight") && !text.contains("regex"),
            "{sql}: {text}"
        );
    }
    // Oversized SQL.
    let big = format!("SELECT 1 -- {}", "x".repeat(70_000));
    let err = query(&mut alice, &big).await.unwrap_err();
    assert_code(err, "ResourceExhausted");
    // And the server keeps serving.
    let batches = query(&mut alice, "SELECT count(*) FROM clinical.conditions")
        .await
        .unwrap();
    assert!(single_i64(&batches) > 0);
}

fn regex_like_ssn(text: &str) -> bool {
    let b = text.as_bytes();
    b.windows(11).any(|w| {
        w.iter().enumerate().all(|(i, c)| match i {
            3 | 6 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
    })
}

#[tokio::test]
async fn memory_limit_fails_cleanly_or_spills_and_server_keeps_serving() {
    let server = TestServer::start_with(ServerOptions {
        engine: Some(EngineConfig {
            memory_limit: 256 << 10,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let result = query(
        &mut alice,
        "SELECT o.patient_id, array_agg(o.description) AS d FROM clinical.observations o \
         JOIN clinical.encounters e ON o.encounter_id = e.encounter_id GROUP BY o.patient_id ORDER BY 1",
    )
    .await;
    let consenting = scalar_i64(
        &raw_query("SELECT count(*) FROM clinical_patients WHERE research_consent").await,
    );
    match result {
        Ok(b) => assert_eq!(rows(&b) as i64, consenting),
        Err(e) => {
            assert_code(e, "ResourceExhausted");
        }
    }
    let batches = query(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap();
    assert_eq!(single_i64(&batches), consenting);
}

/// EXPLAIN is for `explain_roles` only (here the clinician role, so carol): it shows the
/// governed plan (row filter, masks, boundaries) of the query as the caller would run it.
#[tokio::test]
async fn explain_shows_the_governed_plan_to_explain_roles_only() {
    let server = TestServer::start_with(ServerOptions {
        engine: Some(EngineConfig {
            explain_roles: vec!["clinician".into()],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let mut carol = login(&server, "carol").await;
    let sql = "SELECT patient_id, ssn FROM clinical.patients WHERE patient_id = 'P00000001'";
    let plans = query(&mut carol, &format!("EXPLAIN {sql}")).await.unwrap();
    let text = column_text(&plans, 1).join("\n");
    assert_eq!(
        column_text(&plans, 0),
        vec!["logical_plan", "physical_plan"]
    );
    for part in [
        "PolicyBoundaryExec: dataset=clinical.patients",
        "lg_show_last(ssn",
        "lg_in_subject_set(patient_id",
        // The caller's predicate prunes by statistics (and still runs above the row filter).
        "pruning_predicate=",
    ] {
        assert!(text.contains(part), "missing {part} in:\n{text}");
    }
    let analyzed = query(&mut carol, &format!("EXPLAIN ANALYZE {sql}"))
        .await
        .unwrap();
    assert_eq!(column_text(&analyzed, 0)[1], "physical_plan_with_metrics");
    assert!(column_text(&analyzed, 1)[1].contains("output_rows="));
    // Only queries can be explained, and hidden datasets stay hidden.
    let err = query(&mut carol, "EXPLAIN CREATE VIEW v AS SELECT 1")
        .await
        .unwrap_err();
    assert_code(err, "InvalidArgument");
    let err = query(&mut carol, "EXPLAIN SELECT * FROM omics.variants")
        .await
        .unwrap_err();
    assert!(assert_code(err, "not found").contains("omics.variants"));
    // Other roles are refused, naming the rule.
    let mut alice = login(&server, "alice").await;
    let err = query(&mut alice, &format!("EXPLAIN {sql}"))
        .await
        .unwrap_err();
    assert!(assert_code(err, "PermissionDenied").contains("explain-admin-only"));
}

/// Queries that nest deeply (a long flat chain of operators parses into a tree as deep as it is
/// long) are refused with a clear error, and the server keeps serving: a 5,000-term sum used to
/// overflow a worker's stack and abort the process. Just under the limit, every stage (planning,
/// optimizing, evaluating) still fits, in this debug build too.
#[tokio::test]
async fn deep_queries_are_refused_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let mut carol = login(&server, "carol").await;
    let terms = |n: usize, term: &str, op: &str| vec![term; n].join(op);
    for sql in [
        format!("SELECT {}", terms(5_000, "1", "+")),
        format!("SELECT {}", terms(30_000, "1", "+")),
        format!(
            "SELECT count(*) FROM clinical.patients WHERE {}",
            terms(3_000, "sex = 'x'", " OR ")
        ),
        format!(
            "SELECT NOT {}",
            terms(1_500, "x IS NULL", " IS NOT TRUE AND ")
        ),
        terms(1_500, "SELECT 1", " UNION ALL "),
        // A deep tree that fails to parse is dropped on the parser's stack too.
        format!("SELECT {} FROM", terms(30_000, "1", "+")),
    ] {
        let err = query(&mut carol, &sql).await.unwrap_err();
        let text = assert_code(err, "InvalidArgument");
        assert!(
            text.contains("nests deeper than") || text.contains("SQL error"),
            "{text}"
        );
    }
    // Over the size limit, refused for its size: the audit trail's fingerprint parses it first
    // (on a stack sized for it) and records it as too deep to render.
    let huge = format!("SELECT {}", terms(500_000, "1", "+"));
    let err = query(&mut carol, &huge).await.unwrap_err();
    assert!(assert_code(err, "ResourceExhausted").contains("limit"));
    // Explicit nesting stops at the parser's recursion limit.
    let err = query(
        &mut carol,
        &format!("SELECT {}1{}", "(".repeat(200), ")".repeat(200)),
    )
    .await
    .unwrap_err();
    assert!(assert_code(err, "InvalidArgument").contains("recursion limit"));
    // Just under the limit: answered, through planning, optimizing and evaluation.
    let n = lakegate_engine::MAX_QUERY_DEPTH - 10;
    let sum = query(&mut carol, &format!("SELECT {}", terms(n, "1", "+")))
        .await
        .unwrap();
    assert_eq!(column_text(&sum, 0), vec![n.to_string()]);
    let ors = format!(
        "SELECT count(*) FROM clinical.encounters WHERE {} OR total_cost > 0",
        terms(n - 5, "encounter_class = 'x'", " OR ")
    );
    let all = query(&mut carol, "SELECT count(*) FROM clinical.encounters")
        .await
        .unwrap();
    let counted = query(&mut carol, &ors).await.unwrap();
    assert_eq!(column_text(&counted, 0), column_text(&all, 0));
    let unions = query(&mut carol, &terms(n, "SELECT 1 AS one", " UNION ALL "))
        .await
        .unwrap();
    assert_eq!(unions.iter().map(|b| b.num_rows()).sum::<usize>(), n);
}

/// The optimizer folds constants into non-null literals; the result still carries the schema
/// GetFlightInfo announced (`fetch` checks it), or the ADBC driver refuses it as inconsistent.
#[tokio::test]
async fn folded_constants_keep_the_announced_schema() {
    let server = TestServer::start().await;
    let mut carol = login(&server, "carol").await;
    for sql in [
        "SELECT length('abc') AS n",
        "SELECT 1 + 1 AS two, upper('x') AS u, CAST(NULL AS INT) AS nothing",
        "SELECT patient_id, length('abc') AS n, coalesce(death_date, DATE '2000-01-01') AS d FROM clinical.patients LIMIT 3",
    ] {
        let batches = query(&mut carol, sql).await.unwrap();
        assert!(rows(&batches) > 0, "{sql}");
    }
    let mut prepared = carol
        .prepare("SELECT length('abc') + $1 AS n".to_string(), None)
        .await
        .unwrap();
    let params =
        RecordBatch::try_from_iter([("$1", Arc::new(Int64Array::from(vec![2])) as Arc<dyn Array>)])
            .unwrap();
    prepared.set_parameters(params).unwrap();
    let info = prepared.execute().await.unwrap();
    assert_eq!(
        column_text(&fetch(&mut carol, info).await.unwrap(), 0),
        ["5"]
    );
}

/// An ORDER BY holds over the whole result, not batch by batch: the cast that turns views into
/// `Utf8` at the root must not let DataFusion split the sorted stream into partitions that
/// then leave interleaved (apache/datafusion#21349). Small batches make any result span many.
#[tokio::test]
async fn order_by_holds_across_batches() {
    let server = TestServer::start_with(ServerOptions {
        engine: Some(EngineConfig {
            batch_size: 64,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    for (user, sql, descending) in [
        ("carol", "SELECT patient_id, encounter_class FROM clinical.encounters ORDER BY patient_id", false),
        ("carol", "SELECT encounter_class, patient_id FROM clinical.encounters WHERE total_cost > 100 ORDER BY encounter_class DESC, patient_id DESC", true),
        ("alice", "SELECT patient_id, zip FROM clinical.patients ORDER BY patient_id DESC LIMIT 500", true),
        ("alice", "SELECT upper(encounter_class) AS c FROM clinical.encounters ORDER BY c", false),
    ] {
        // The plan leaves as one stream (however the partitions happen to interleave in a run,
        // which on a small lake is often in order)...
        let planned = server
            .engine
            .session(&persona(user))
            .await
            .unwrap()
            .plan(sql)
            .await
            .unwrap();
        let plan = planned.verified_physical_plan().await.unwrap();
        assert_eq!(
            plan.output_partitioning().partition_count(),
            1,
            "{sql}:\n{}",
            displayable(plan.as_ref()).indent(false)
        );
        // ...and what the client reads is in order.
        let mut client = login(&server, user).await;
        let batches = query(&mut client, sql).await.unwrap();
        assert!(batches.len() > 4, "{sql}: {} batches", batches.len());
        let rows: Vec<(String, String)> = column_text(&batches, 0)
            .into_iter()
            .zip(column_text(&batches, batches[0].num_columns() - 1))
            .collect();
        let mut expected = rows.clone();
        expected.sort();
        if descending {
            expected.reverse();
        }
        // Ties (equal keys) may come in any order; the key column must not.
        let keys = |r: &[(String, String)]| r.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&rows), keys(&expected), "{user}: {sql}");
    }
}

/// Raw strings are read as `Utf8View` inside the engine; every result leaves as plain `Utf8`
/// (also inside lists), in the schema GetFlightInfo announces and in the batches, for clients
/// that do not read views.
#[tokio::test]
async fn strings_leave_as_plain_utf8() {
    let server = TestServer::start().await;
    let mut carol = login(&server, "carol").await;
    let sql = "SELECT patient_id, encounter_class, upper(encounter_class) || '!' AS loud, \
               (SELECT array_agg(code) FROM clinical.conditions c WHERE c.patient_id = '-') AS codes \
               FROM clinical.encounters LIMIT 5";
    let info = carol.execute(sql.to_string(), None).await.unwrap();
    let announced = Schema::try_from(info.clone()).unwrap();
    let batches = fetch(&mut carol, info).await.unwrap();
    assert!(!batches.is_empty());
    let list = DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)));
    for schema in std::iter::once(&announced).chain(batches.iter().map(|b| b.schema_ref().as_ref()))
    {
        let types: Vec<&DataType> = schema.fields().iter().map(|f| f.data_type()).collect();
        assert_eq!(
            types,
            [&DataType::Utf8, &DataType::Utf8, &DataType::Utf8, &list],
            "{schema:?}"
        );
    }
}

/// A data file damaged after the server checked it at start: the query that reads it fails
/// with DATA_LOSS naming the dataset (never the file or a value), and the server goes on
/// serving every other dataset.
#[tokio::test]
async fn a_file_damaged_while_serving_fails_its_query_only() {
    let (_dir, lake, server) = lakegate_tests::start_on_own_lake(300).await;
    let mut carol = crate::common::login(&server, "carol").await;
    let count = "SELECT count(*), sum(total_cost) FROM clinical.encounters";
    crate::common::sql(&mut carol, count).await.unwrap();
    // Flip bits through every encounters file, past the magic number, before the footer.
    let dir = lake.join("curated/clinical/encounters");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let end = bytes.len() / 2;
        for b in bytes[4..end].iter_mut().step_by(7) {
            *b ^= 0x5a;
        }
        std::fs::write(&path, bytes).unwrap();
    }
    // carol's count, and bob's grouped count (whose repartition shares the error).
    let mut bob = crate::common::login(&server, "bob").await;
    for (client, q) in [
        (&mut carol, count),
        (
            &mut bob,
            "SELECT site_id, count(DISTINCT patient_id) FROM clinical.encounters GROUP BY site_id",
        ),
    ] {
        let err = crate::common::sql(client, q).await.unwrap_err();
        let FlightError::Tonic(status) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(status.code(), tonic::Code::DataLoss, "{q}: {status:?}");
        assert!(
            status
                .message()
                .starts_with("a data file of clinical.encounters could not be read"),
            "{q}: {status:?}"
        );
        assert!(!status.message().contains("curated"), "{status:?}");
    }
    let b = crate::common::sql(&mut carol, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap();
    assert!(crate::common::first_i64(&b) > 0);
}

/// Write to `to` the batches of the Parquet file `from`, each changed by `change`.
fn rewrite_parquet(
    from: &std::path::Path,
    to: &std::path::Path,
    change: impl Fn(RecordBatch) -> RecordBatch,
) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(from).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| change(b.unwrap())).collect();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(to).unwrap(),
        batches[0].schema(),
        None,
    )
    .unwrap();
    for b in batches {
        writer.write(&b).unwrap();
    }
    writer.close().unwrap();
}

/// `b` with column `name` set to `array` (typed as `array` is): replaced where it exists, added
/// after the others where it does not.
fn set_column(b: RecordBatch, name: &str, array: arrow::array::ArrayRef) -> RecordBatch {
    let schema = b.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = b.columns().to_vec();
    let field = Field::new(name, array.data_type().clone(), true);
    match schema.index_of(name) {
        Ok(at) => (fields[at], columns[at]) = (field, array),
        Err(_) => {
            fields.push(field);
            columns.push(array);
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

/// Replace a Parquet file the way a pipeline does (write a new file, rename it over the old
/// one), with `research_consent` false on every row.
fn withdraw_consent(path: &std::path::Path) {
    use arrow::array::BooleanArray;
    let tmp = path.with_extension("tmp");
    rewrite_parquet(path, &tmp, |b| {
        let at = b.schema().index_of("research_consent").unwrap();
        let mut columns = b.columns().to_vec();
        columns[at] = Arc::new(BooleanArray::from(vec![false; b.num_rows()]));
        RecordBatch::try_new(b.schema(), columns).unwrap()
    });
    std::fs::rename(&tmp, path).unwrap();
}

/// The lake changes while it is served: a patient file rewritten with consent withdrawn, an
/// encounters file removed. A query that starts a second later reads the lake as it is now
/// (callers' views are reused within one second): alice no longer gets the rows of patients
/// who withdrew (her consent filter is read again when its files change), and nobody's query
/// fails on a file listed before it changed.
#[tokio::test]
async fn a_lake_changed_while_serving_is_read_as_it_is_now() {
    let (_dir, lake, server) = lakegate_tests::start_on_own_lake(300).await;
    let mut alice = crate::common::login(&server, "alice").await;
    let mut carol = crate::common::login(&server, "carol").await;
    let consenting_encounters = "SELECT count(*) FROM clinical_encounters WHERE patient_id IN \
        (SELECT patient_id FROM clinical_patients WHERE research_consent)";
    let alice_count = "SELECT count(*) FROM clinical.encounters";
    let carol_count = "SELECT count(*) FROM clinical.encounters";
    let carol_raw = "SELECT count(*) FROM clinical_encounters WHERE patient_id IN \
        (SELECT patient_id FROM clinical_patients WHERE site_id = 'SITE_A')";
    let before =
        crate::common::first_i64(&crate::common::sql(&mut alice, alice_count).await.unwrap());
    assert_eq!(
        before,
        scalar_i64(&raw_query_in(&lake, consenting_encounters).await)
    );
    crate::common::sql(&mut carol, carol_count).await.unwrap();

    let patients = lake.join("curated/clinical/patients");
    let mut files: Vec<_> = std::fs::read_dir(&patients)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    withdraw_consent(&files[0]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let after =
        crate::common::first_i64(&crate::common::sql(&mut alice, alice_count).await.unwrap());
    assert_eq!(
        after,
        scalar_i64(&raw_query_in(&lake, consenting_encounters).await)
    );
    assert!(
        after < before,
        "{after} encounters after a withdrawal, {before} before"
    );

    let encounters = lake.join("curated/clinical/encounters");
    let gone = std::fs::read_dir(&encounters)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(gone).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let carol_now =
        crate::common::first_i64(&crate::common::sql(&mut carol, carol_count).await.unwrap());
    assert_eq!(carol_now, scalar_i64(&raw_query_in(&lake, carol_raw).await));
    let alice_now =
        crate::common::first_i64(&crate::common::sql(&mut alice, alice_count).await.unwrap());
    assert_eq!(
        alice_now,
        scalar_i64(&raw_query_in(&lake, consenting_encounters).await)
    );
}

/// Files a pipeline adds while the server runs are held to the catalog's schema, as the files
/// present at start were: a file with a column missing, retyped or added is never read (its
/// rows would carry NULLs or values the catalog does not describe). Queries of its dataset are
/// refused with FAILED_PRECONDITION naming the dataset (never the file), the rest of the lake
/// stays served, and once the file is removed the dataset is served again.
#[tokio::test]
async fn a_file_added_off_the_catalog_schema_is_refused_not_read() {
    use arrow::array::BooleanArray;
    let (_dir, lake, server) = lakegate_tests::start_on_own_lake(300).await;
    let mut carol = crate::common::login(&server, "carol").await;
    let mut alice = crate::common::login(&server, "alice").await;
    let count = "SELECT count(*) FROM clinical.encounters";
    let before = crate::common::first_i64(&crate::common::sql(&mut carol, count).await.unwrap());

    let first_file = |dir: &str| {
        let mut files: Vec<_> = std::fs::read_dir(lake.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files.remove(0)
    };
    let encounters = first_file("curated/clinical/encounters");
    let patients = first_file("curated/clinical/patients");
    let drop_column = |name: &'static str| {
        move |b: RecordBatch| {
            let mut b = b;
            b.remove_column(b.schema().index_of(name).unwrap());
            b
        }
    };
    let as_text = |name: &'static str| {
        move |b: RecordBatch| {
            let text = arrow::compute::cast(b.column_by_name(name).unwrap(), &DataType::Utf8);
            set_column(b, name, text.unwrap())
        }
    };
    let extra_column = |b: RecordBatch| {
        let ssn = StringArray::from(vec!["123-45-6789"; b.num_rows()]);
        set_column(b, "ssn", Arc::new(ssn))
    };
    let added = encounters.with_file_name("part-99999-added.parquet");
    let refused = |err: FlightError, dataset: &str| {
        let FlightError::Tonic(status) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        let expected = format!("a data file of {dataset} does not match the catalog's schema");
        assert!(status.message().starts_with(&expected), "{status:?}");
        for leak in ["part-99999", "curated", "ssn", "123-45"] {
            assert!(!status.message().contains(leak), "{leak}: {status:?}");
        }
    };
    let changes: [Box<dyn Fn(RecordBatch) -> RecordBatch>; 3] = [
        Box::new(drop_column("payer")),
        Box::new(as_text("total_cost")),
        Box::new(extra_column),
    ];
    for change in changes {
        rewrite_parquet(&encounters, &added, change);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        refused(
            crate::common::sql(&mut carol, count).await.unwrap_err(),
            "clinical.encounters",
        );
        refused(
            crate::common::sql(
                &mut alice,
                "SELECT patient_id FROM clinical.encounters LIMIT 1",
            )
            .await
            .unwrap_err(),
            "clinical.encounters",
        );
        // The rest of the lake is served meanwhile.
        let b = crate::common::sql(&mut carol, "SELECT count(*) FROM clinical.patients")
            .await
            .unwrap();
        assert!(crate::common::first_i64(&b) > 0);
        std::fs::remove_file(&added).unwrap();
    }

    // A patients file whose consent column is text: alice's consent filter reads patients, so
    // her encounters are refused too (it is the filter's read: the dataset is not named).
    let added = patients.with_file_name("part-99999-added.parquet");
    rewrite_parquet(&patients, &added, |b| {
        let b = as_text("research_consent")(b);
        let at = b.schema().index_of("research_consent").unwrap();
        assert!(b
            .column(at)
            .as_any()
            .downcast_ref::<BooleanArray>()
            .is_none());
        b
    });
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let err = crate::common::sql(&mut alice, count).await.unwrap_err();
    let FlightError::Tonic(status) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(!status.message().contains("part-99999"), "{status:?}");
    std::fs::remove_file(&added).unwrap();

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let after = crate::common::first_i64(&crate::common::sql(&mut carol, count).await.unwrap());
    assert_eq!(after, before);
    crate::common::sql(&mut alice, count).await.unwrap();
}
