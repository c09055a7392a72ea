//! Policy files are operator input that may be broken: loading one must refuse it with a clear
//! error or load it, never panic; a policy that loads must decide without panicking.
#![no_main]

use std::sync::OnceLock;

use lakegate_catalogs::demo::demo_catalog;
use lakegate_catalogs::Catalog;
use lakegate_flight_server::demo::demo_users;
use lakegate_policies::{Action, PolicySet, Principal, RequestContext, DEFAULT_MODEL};
use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    catalog: Catalog,
    personas: Vec<Principal>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let users = demo_users().expect("demo users");
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            catalog: demo_catalog(),
            personas: ["alice", "bob", "carol", "dave", "erin", "mallory"]
                .iter()
                .filter_map(|n| users.principal(n))
                .collect(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let w = world();
    let Ok(policy) = w
        .rt
        .block_on(PolicySet::load(DEFAULT_MODEL, "fuzz.toml", text, &w.catalog))
    else {
        return;
    };
    let ctx = RequestContext::default();
    for p in &w.personas {
        for d in &w.catalog.datasets {
            for action in [Action::RowQuery, Action::AggregateQuery] {
                let _ = policy.decide(p, d, action, &ctx);
            }
        }
    }
});
