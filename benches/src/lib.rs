//! Shared set-up for Lakegate's benchmarks: the demo personas, queries, and side-by-side
//! engines (governed Lakegate and plain DataFusion) over the same lake.

use std::collections::BTreeMap;

use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use lakegate_catalogs::{Catalog, Lake};
use lakegate_engine::{Engine, EngineConfig, KeyRing};
use lakegate_flight_server::demo::{DEMO_POLICY, DEMO_PROJECTS, PERSONAS};
use lakegate_policies::{PolicySet, Principal, DEFAULT_MODEL};

/// The demo query mix: (name, SQL). Every query is valid for bob (aggregates) unless marked.
pub const QUERIES: &[(&str, &str)] = &[
    ("cohort_count", "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY site_id"),
    (
        "join_aggregate",
        "SELECT p.sex, count(DISTINCT p.patient_id) AS n, avg(e.total_cost) AS cost FROM clinical.encounters e \
         JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY p.sex",
    ),
    ("lab_aggregate", "SELECT loinc_code, count(DISTINCT patient_id) AS n, avg(value) AS v FROM clinical.observations GROUP BY loinc_code"),
    ("filtered_scan", "SELECT encounter_id, patient_id, total_cost FROM clinical.encounters WHERE total_cost > 49000"),
    ("training_stream", "SELECT patient_id, start_time, encounter_class, total_cost FROM clinical.encounters"),
];

pub fn persona(name: &str) -> Principal {
    let attrs = PERSONAS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, a)| {
            a.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_else(BTreeMap::new);
    Principal {
        name: name.to_string(),
        attributes: attrs,
    }
}

/// The demo policy, with frank's privacy budget so large that no run exhausts it: repeated
/// runs measure his queries (each still charged to the ledger), not their refusal.
pub fn bench_policy() -> String {
    let policy = DEMO_POLICY.replace(
        "differential_privacy = { unit = \"patient_id\", epsilon = 20.0,",
        "differential_privacy = { unit = \"patient_id\", epsilon = 1000000000.0,",
    );
    assert_ne!(policy, DEMO_POLICY, "frank's grant in the demo policy");
    policy
}

/// Lakegate's engine over `lake` with the demo policy and fixed benchmark keys.
pub async fn governed(lake: &str) -> Engine {
    governed_with_keyring(lake, None).await
}

/// [`governed`] over a lake encrypted at rest, with the keyring that opens it.
pub async fn governed_with_keyring(lake: &str, keyring: Option<&std::path::Path>) -> Engine {
    let lake = Lake::open(lake).expect("lake");
    let lake = match keyring {
        Some(path) => lake.with_keyring(lakegate_catalogs::Keyring::load(path).expect("keyring")),
        None => lake,
    };
    let catalog = Catalog::load(&lake).await.expect("catalog");
    let policy = PolicySet::load(DEFAULT_MODEL, "policy.toml", &bench_policy(), &catalog)
        .await
        .expect("policy");
    let keys = KeyRing::generate(DEMO_PROJECTS.iter().copied());
    Engine::open(lake, policy, keys, EngineConfig::default())
        .await
        .expect("engine")
}

/// Plain DataFusion over the same files, same table names, no policy. With `string_views`
/// (DataFusion's default) strings are read as `Utf8View`; without, as `Utf8`, the type
/// Lakegate's catalog gives them, which separates the policy's cost from the string type's.
pub async fn plain(lake: &str, string_views: bool) -> SessionContext {
    let mut config = SessionConfig::new().with_batch_size(EngineConfig::default().batch_size);
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = string_views;
    let ctx = SessionContext::new_with_config(config);
    for schema in ["clinical", "omics"] {
        ctx.sql(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("schema");
    }
    let catalog = Catalog::load(&Lake::open(lake).expect("lake"))
        .await
        .expect("catalog");
    for d in catalog
        .datasets
        .iter()
        // A demo lake's Delta tables only ever had files added, so the Parquet files in each
        // folder are exactly its newest version's.
        .filter(|d| {
            matches!(
                d.format,
                lakegate_catalogs::FileFormat::Parquet | lakegate_catalogs::FileFormat::Delta
            )
        })
    {
        let path = std::path::Path::new(lake).join(&d.location);
        ctx.register_parquet(
            d.name.as_str(),
            path.to_str().expect("utf8"),
            ParquetReadOptions::default(),
        )
        .await
        .expect("register");
    }
    ctx
}
