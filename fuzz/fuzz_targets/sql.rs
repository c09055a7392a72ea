//! SQL through planning, the policy rewrite, verification and execution, as each demo persona:
//! no input may panic the engine, and none may leak. The oracle: no result ever holds a real
//! SSN of the lake (alice sees NULL, bob only aggregates, carol the last 4 digits, mallory
//! nothing), and mallory's successful queries touch no dataset.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::StreamExt;
use lakegate_catalogs::Lake;
use lakegate_engine::{Engine, EngineConfig};
use lakegate_flight_server::demo::{demo_users, DEMO_POLICY};
use lakegate_policies::{PolicySet, Principal, DEFAULT_MODEL};
use lakegate_tests::{lake_path, raw_query, test_keys};
use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    engine: Engine,
    personas: Vec<Principal>,
    ssns: HashSet<String>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let path = lake_path();
        let lake = Lake::open(path.to_str().expect("utf8")).expect("lake");
        let engine = rt.block_on(async {
            let catalog = lakegate_catalogs::Catalog::load(&lake).await.expect("catalog");
            let policy = PolicySet::load(DEFAULT_MODEL, "policy.toml", DEMO_POLICY, &catalog)
                .await
                .expect("policy");
            let config = EngineConfig {
                target_partitions: 1,
                memory_limit: 512 << 20,
                ..Default::default()
            };
            Engine::open(lake, policy, test_keys(), config)
                .await
                .expect("engine")
        });
        let mut ssns = HashSet::new();
        for b in rt.block_on(raw_query("SELECT ssn FROM clinical_patients WHERE ssn IS NOT NULL")) {
            ssns.extend(texts(b.column(0).as_ref()));
        }
        assert!(!ssns.is_empty(), "the oracle needs the lake's SSNs");
        let users = demo_users().expect("users");
        World {
            rt,
            engine,
            personas: ["alice", "bob", "carol", "mallory"]
                .iter()
                .filter_map(|n| users.principal(n))
                .collect(),
            ssns,
        }
    })
}

/// Every value of a column as text.
fn texts(col: &dyn datafusion::arrow::array::Array) -> Vec<String> {
    let Ok(f) = ArrayFormatter::try_new(col, &FormatOptions::default()) else {
        return Vec::new();
    };
    (0..col.len()).map(|r| f.value(r).to_string()).collect()
}

/// Most batches read from one result, and the longest one query may run.
const MAX_BATCHES: usize = 32;
const MAX_TIME: Duration = Duration::from_secs(3);

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    if sql.len() > 4096 {
        return;
    }
    let w = world();
    for p in &w.personas {
        w.rt.block_on(async {
            let run = async {
                let session = w.engine.session(p).await.expect("a session always opens");
                let Ok(planned) = session.plan(sql).await else {
                    return;
                };
                let Ok((mut stream, report)) = planned.execute_with_report(None).await else {
                    return;
                };
                if p.name == "mallory" {
                    assert!(
                        report.datasets.is_empty(),
                        "mallory read {:?}",
                        report.datasets
                    );
                }
                let mut n = 0;
                while let Some(Ok(batch)) = stream.next().await {
                    for col in batch.columns() {
                        for v in texts(col.as_ref()) {
                            // A value the query spelled out itself is no leak.
                            assert!(
                                !w.ssns.contains(&v) || sql.contains(v.as_str()),
                                "{} received a raw SSN for: {sql}",
                                p.name
                            );
                        }
                    }
                    n += 1;
                    if n >= MAX_BATCHES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(MAX_TIME, run).await;
        });
    }
});
