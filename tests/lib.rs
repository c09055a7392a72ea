//! Test fixtures shared by the workspace-level integration tests: a small demo lake built once,
//! and a real Lakegate server started on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lakegate_catalogs::demo::{build_demo_lake, DemoOptions};
use lakegate_catalogs::Lake;
use lakegate_engine::{Engine, EngineConfig};
use lakegate_flight_server::demo::{demo_users, DEMO_GRANTS};
use lakegate_flight_server::Lifetimes;
use lakegate_policies::{GrantPolicy, UserStore};

/// Patients in the test lake: small enough to build in a second, large enough for 4 parts.
pub const TEST_PATIENTS: u64 = 400;

struct Shared {
    _dir: tempfile::TempDir,
    lake_path: PathBuf,
    users: Arc<UserStore>,
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
        }
    })
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
}

/// A running server; it stops when the test's runtime ends.
pub struct TestServer {
    pub addr: SocketAddr,
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
        let known: Vec<String> = catalog.datasets.iter().map(|d| d.name.clone()).collect();
        let grants = GrantPolicy::from_toml("demo grants", DEMO_GRANTS, &known).expect("grants");
        let engine = Engine::open(lake, grants, options.engine.unwrap_or_default())
            .await
            .expect("engine");
        let service = lakegate_flight_server::flight_service(
            engine,
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
        Self { addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
