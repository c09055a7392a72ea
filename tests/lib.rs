//! Test fixtures shared by the workspace-level integration tests: a small demo lake built once,
//! and a real Lakegate server started on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lakegate_catalogs::demo::{build_demo_lake, DemoOptions};
use lakegate_catalogs::Lake;
use lakegate_engine::{Engine, EngineConfig, KeyRing};
use lakegate_flight_server::demo::{demo_users, DEMO_POLICY, DEMO_PROJECTS};
use lakegate_flight_server::Lifetimes;
use lakegate_policies::{PolicySet, UserStore, DEFAULT_MODEL};

/// Patients in the test lake: small enough to build in a second, large enough for 4 parts.
pub const TEST_PATIENTS: u64 = 400;

struct Shared {
    _dir: tempfile::TempDir,
    lake_path: PathBuf,
    users: Arc<UserStore>,
    keys: KeyRing,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake_path = dir.path().join("lake");
        let lake = Lake::open(lake_path.to_str().expect("utf8 path")).expect("lake");
        // Built on a private runtime: each #[tokio::test] has its own, which may end first.
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(build_demo_lake(
                    &lake,
                    &DemoOptions {
                        patients: TEST_PATIENTS,
                        seed: 42,
                    },
                    |_, _| {},
                ))
                .expect("demo lake")
        })
        .join()
        .expect("builder thread");
        Shared {
            _dir: dir,
            lake_path,
            users: Arc::new(demo_users().expect("users")),
            keys: test_keys(),
        }
    })
}

/// Fixed project keys, so that pseudonyms and date shifts in expected results are stable.
pub fn test_keys() -> KeyRing {
    let text: String = DEMO_PROJECTS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{p} = \"{}\"\n", format!("{:02x}", i + 1).repeat(32)))
        .collect();
    KeyRing::from_toml("test keys", &format!("[projects]\n{text}")).expect("test keys")
}

/// Path of the shared test lake.
pub fn lake_path() -> PathBuf {
    shared().lake_path.clone()
}

/// Options for a test server.
#[derive(Clone, Default)]
pub struct ServerOptions {
    pub engine: Option<EngineConfig>,
    pub lifetimes: Option<Lifetimes>,
    /// Policy text instead of the demo policy.
    pub policy: Option<String>,
}

/// A running server; it stops when the test's runtime ends.
pub struct TestServer {
    pub addr: SocketAddr,
    pub engine: Engine,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> Self {
        let shared = shared();
        let lake = Lake::open(shared.lake_path.to_str().expect("utf8")).expect("lake");
        let catalog = lakegate_catalogs::Catalog::load(&lake)
            .await
            .expect("catalog");
        let text = options
            .policy
            .clone()
            .unwrap_or_else(|| DEMO_POLICY.to_string());
        let policy = PolicySet::load(DEFAULT_MODEL, "policy.toml", &text, &catalog)
            .await
            .expect("policy");
        let engine = Engine::open(
            lake,
            policy,
            shared.keys.clone(),
            options.engine.unwrap_or_default(),
        )
        .await
        .expect("engine");
        let service = lakegate_flight_server::flight_service(
            engine.clone(),
            Arc::clone(&shared.users),
            options.lifetimes.unwrap_or_default(),
        );
        let (listener, addr) = lakegate_flight_server::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        tokio::spawn(lakegate_flight_server::serve(
            listener,
            service,
            std::future::pending(),
        ));
        Self { addr, engine }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Plain DataFusion over the same Parquet files, with no policy: the oracle that governed
/// results are compared against.
pub async fn raw_query(sql: &str) -> Vec<datafusion::arrow::array::RecordBatch> {
    use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(false));
    let lake = lake_path();
    for (schema, table) in [
        ("clinical", "patients"),
        ("clinical", "encounters"),
        ("clinical", "conditions"),
        ("clinical", "observations"),
        ("omics", "variants"),
    ] {
        let path = lake.join("curated").join(schema).join(table);
        ctx.register_parquet(
            format!("{schema}_{table}"),
            path.to_str().expect("utf8"),
            ParquetReadOptions::default(),
        )
        .await
        .expect("register");
    }
    // Raw tables are named schema_table here so the same SQL text is not accidentally shared.
    ctx.sql(sql)
        .await
        .expect("raw sql")
        .collect()
        .await
        .expect("raw collect")
}

/// The single i64 of a one-row, one-column result.
pub fn scalar_i64(batches: &[datafusion::arrow::array::RecordBatch]) -> i64 {
    use datafusion::arrow::array::{Array, Int64Array};
    let b = batches.iter().find(|b| b.num_rows() > 0).expect("a row");
    b.column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("int64")
        .value(0)
}
