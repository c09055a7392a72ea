//! Helpers shared by the integration tests: log in as a persona, run SQL, read results.

use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use lakegate_tests::TestServer;
use tonic::transport::Channel;

pub type Client = FlightSqlServiceClient<Channel>;

pub async fn login(server: &TestServer, user: &str) -> Client {
    login_url(&server.url(), user).await
}

/// A connection to the server at `url`, not logged in.
pub async fn connect_url(url: &str) -> Client {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    FlightSqlServiceClient::new(channel)
}

pub async fn login_url(url: &str, user: &str) -> Client {
    let mut c = connect_url(url).await;
    c.handshake(user, &format!("demo-{user}"))
        .await
        .expect("handshake");
    c
}

pub async fn sql(client: &mut Client, sql: &str) -> Result<Vec<RecordBatch>, FlightError> {
    let info = client.execute(sql.to_string(), None).await?;
    let mut out = Vec::new();
    for ep in info.endpoint {
        let batches: Vec<RecordBatch> = client
            .do_get(ep.ticket.expect("ticket"))
            .await?
            .try_collect()
            .await?;
        out.extend(batches);
    }
    Ok(out)
}

pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

pub fn first_i64(batches: &[RecordBatch]) -> i64 {
    let b = batches.iter().find(|b| b.num_rows() > 0).expect("a row");
    b.column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("int64")
        .value(0)
}

/// Every value of column `i`, as text ("NULL" for nulls).
pub fn column_text(batches: &[RecordBatch], i: usize) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let col = b.column(i);
        let f = ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default().with_null("NULL"))
            .unwrap();
        for r in 0..b.num_rows() {
            out.push(f.value(r).to_string());
        }
    }
    out
}

pub fn strings(batches: &[RecordBatch], i: usize) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for b in batches {
        let a = b
            .column(i)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("utf8");
        for r in 0..a.len() {
            out.push((!a.is_null(r)).then(|| a.value(r).to_string()));
        }
    }
    out
}

/// The gRPC code name a client error carries.
pub fn code_of(err: &FlightError) -> String {
    match err {
        FlightError::Tonic(s) => format!("{:?}", s.code()),
        other => format!("{other:?}"),
    }
}

/// A demo persona's principal, with the attributes the demo identity gives it.
pub fn persona(name: &str) -> lakegate_policies::Principal {
    let (_, attributes) = lakegate_flight_server::demo::PERSONAS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a demo persona");
    lakegate_policies::Principal {
        name: name.into(),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}
