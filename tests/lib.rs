//! Test fixtures shared by the workspace-level integration tests: a small demo lake built once,
//! and a real Lakegate server started on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lakegate_catalogs::demo::{build_demo_lake, DemoLayout, DemoOptions};
use lakegate_catalogs::Lake;
use lakegate_engine::audit::{AuditKey, AuditLog};
use lakegate_engine::{Engine, EngineConfig, KeyRing};
use lakegate_flight_server::audited::open_audit;
use lakegate_flight_server::config::AuditSettings;
use lakegate_flight_server::demo::{demo_users, DEMO_POLICY, DEMO_PROJECTS};
use lakegate_flight_server::{Identity, Lifetimes, Limiter};
use lakegate_policies::{PolicySet, UserStore, DEFAULT_MODEL};

/// Patients in the test lake: small enough to build in a second, large enough for 4 parts.
pub const TEST_PATIENTS: u64 = 400;

struct Shared {
    _dir: tempfile::TempDir,
    lake_path: PathBuf,
    users: Arc<UserStore>,
    keys: KeyRing,
    audit_pem: String,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (dir, lake_path) = build_lake(TEST_PATIENTS);
        Shared {
            _dir: dir,
            lake_path,
            users: Arc::new(demo_users().expect("users")),
            keys: test_keys(),
            audit_pem: AuditKey::generate().to_pem(),
        }
    })
}

/// A new demo lake of `patients` in a fresh temporary folder.
/// A new demo lake of `patients` in a fresh temporary folder, built as `lakegate demo` builds
/// it: through the ingest path, into Delta tables.
pub fn build_lake(patients: u64) -> (tempfile::TempDir, PathBuf) {
    build_lake_in(
        tempfile::tempdir().expect("tempdir"),
        patients,
        None,
        DemoLayout::Ingested,
    )
}

/// A new demo lake of `patients` as plain Parquet folders (a lake an outside pipeline writes),
/// for tests that add, damage or replace its files while the server runs.
pub fn build_folder_lake(patients: u64) -> (tempfile::TempDir, PathBuf) {
    build_lake_in(
        tempfile::tempdir().expect("tempdir"),
        patients,
        None,
        DemoLayout::Folders,
    )
}

/// The master keyring of a test folder (`keyring.toml` in it, beside the lake), made on first
/// use.
pub fn test_keyring(dir: &std::path::Path) -> lakegate_catalogs::Keyring {
    lakegate_catalogs::Keyring::load_or_create(&dir.join("keyring.toml")).expect("keyring")
}

/// A new demo lake of `patients`, encrypted at rest with the folder's [`test_keyring`].
pub fn build_encrypted_lake(patients: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = test_keyring(dir.path());
    build_lake_in(dir, patients, Some(ring), DemoLayout::Ingested)
}

fn build_lake_in(
    dir: tempfile::TempDir,
    patients: u64,
    keyring: Option<lakegate_catalogs::Keyring>,
    layout: DemoLayout,
) -> (tempfile::TempDir, PathBuf) {
    let lake_path = dir.path().join("lake");
    let lake = Lake::open(lake_path.to_str().expect("utf8 path")).expect("lake");
    let encrypted = keyring.is_some();
    let lake = match keyring {
        Some(ring) => lake.with_keyring(ring),
        None => lake,
    };
    // Built on a private runtime: each #[tokio::test] has its own, which may end first.
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(build_demo_lake(
                &lake,
                &DemoOptions {
                    patients,
                    seed: 42,
                    encrypted,
                    layout,
                },
                |_, _| {},
            ))
            .expect("demo lake")
    })
    .join()
    .expect("builder thread");
    (dir, lake_path)
}

/// A server over a new demo lake of `patients` of its own, as plain Parquet folders (for tests
/// that change the lake's files): the folder (kept while it lives), the lake's path and the
/// server.
pub async fn start_on_own_lake(patients: u64) -> (tempfile::TempDir, PathBuf, TestServer) {
    let (dir, lake) = build_folder_lake(patients);
    let server = TestServer::start_with(ServerOptions {
        lake: Some(lake.clone()),
        ..Default::default()
    })
    .await;
    (dir, lake, server)
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

/// The key that signs the shared test lake's audit trail (every test server writes to it).
pub fn test_audit_key() -> AuditKey {
    AuditKey::from_pem(&shared().audit_pem).expect("audit key")
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
    /// Audit settings instead of the defaults.
    pub audit: Option<AuditSettings>,
    /// Another lake than the shared one (for tests that damage it).
    pub lake: Option<PathBuf>,
    /// Users instead of the demo personas (with the file they came from, to reload it).
    pub users: Option<(UserStore, Option<PathBuf>)>,
    /// Accept bearer JWTs.
    pub jwt: Option<lakegate_flight_server::identity::JwtSettings>,
    /// Per-principal limits instead of the defaults.
    pub limits: Option<lakegate_flight_server::limits::LimitSettings>,
    /// Serve over TLS (and mutual TLS).
    pub tls: Option<lakegate_flight_server::tls::TlsSettings>,
    /// Master keys for a lake with datasets encrypted at rest.
    pub keyring: Option<lakegate_catalogs::Keyring>,
}

/// Audit settings as `lakegate serve` defaults them, with the test key.
pub fn default_audit_settings() -> AuditSettings {
    AuditSettings {
        key: None,
        checkpoint_every: 1000,
        checkpoint_interval_secs: 60,
        alert_webhook: None,
        alerts: lakegate_flight_server::config::default_alerts(),
        retention_days: lakegate_catalogs::AUDIT_RETENTION_DAYS,
    }
}

/// A running server; it stops when the test's runtime ends.
pub struct TestServer {
    pub addr: SocketAddr,
    pub engine: Engine,
    pub audit: AuditLog,
    pub lake: Lake,
    pub identity: Arc<Identity>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> Self {
        let shared = shared();
        let path = options
            .lake
            .clone()
            .unwrap_or_else(|| shared.lake_path.clone());
        let lake = Lake::open(path.to_str().expect("utf8")).expect("lake");
        let lake = match options.keyring.clone() {
            Some(ring) => lake.with_keyring(ring),
            None => lake,
        };
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
        let audit = open_audit(
            &lake,
            &catalog,
            test_audit_key(),
            &options.audit.clone().unwrap_or_else(default_audit_settings),
        )
        .await
        .expect("audit trail");
        let engine = Engine::open(
            lake.clone(),
            policy,
            shared.keys.clone(),
            options.engine.unwrap_or_default(),
        )
        .await
        .expect("engine");
        engine.trust_release_signer(test_audit_key().verifying_key());
        let mut identity = match options.users.clone() {
            Some((users, file)) => {
                let i = Identity::new(users);
                match file {
                    Some(f) => i.with_users_file(f),
                    None => i,
                }
            }
            None => Identity::new((*shared.users).clone()),
        };
        if let Some(jwt) = options.jwt.clone() {
            identity = identity.with_jwt(
                lakegate_flight_server::identity::JwtVerifier::load(jwt)
                    .await
                    .expect("JWKS"),
            );
        }
        let identity = Arc::new(identity);
        let service = lakegate_flight_server::flight_service(
            engine.clone(),
            Arc::clone(&identity),
            Arc::new(Limiter::new(options.limits.clone().unwrap_or_default())),
            options.lifetimes.unwrap_or_default(),
            audit.clone(),
        );
        let (listener, addr) = lakegate_flight_server::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let tls = options
            .tls
            .as_ref()
            .map(|t| t.server_config().expect("TLS config"));
        tokio::spawn(lakegate_flight_server::serve(
            listener,
            service,
            tls,
            std::future::pending(),
        ));
        Self {
            addr,
            engine,
            audit,
            lake,
            identity,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Plain DataFusion over the same Parquet files, with no policy: the oracle that governed
/// results are compared against.
pub async fn raw_query(sql: &str) -> Vec<datafusion::arrow::array::RecordBatch> {
    raw_query_in(&lake_path(), sql).await
}

/// [`raw_query`] over the lake at `lake`.
pub async fn raw_query_in(
    lake: &std::path::Path,
    sql: &str,
) -> Vec<datafusion::arrow::array::RecordBatch> {
    use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(false));
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
