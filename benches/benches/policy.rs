//! Policy decision + rewrite + verification latency, against plain DataFusion planning of the
//! same SQL: `cargo bench -p lakegate-benches --bench policy`.

use criterion::{criterion_group, criterion_main, Criterion};
use lakegate_benches::{governed, persona, plain, QUERIES};
use lakegate_catalogs::demo::{build_demo_lake, DemoOptions};
use lakegate_catalogs::Lake;

fn planning(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lake");
    let path = path.to_str().expect("utf8").to_string();
    let (engine, ctx) = rt.block_on(async {
        let lake = Lake::open(&path).expect("lake");
        build_demo_lake(
            &lake,
            &DemoOptions {
                patients: 2_000,
                seed: 42,
                encrypted: false,
                layout: lakegate_catalogs::demo::DemoLayout::Folders,
            },
            |_, _| {},
        )
        .await
        .expect("demo lake");
        (governed(&path).await, plain(&path, true).await)
    });
    let mut group = c.benchmark_group("plan");
    for (name, sql) in QUERIES {
        for who in ["bob", "carol", "alice"] {
            let p = persona(who);
            // Skip combinations the policy refuses (bob's row-level queries).
            let allowed = rt.block_on(async {
                let s = engine.session(&p).await.ok()?;
                s.plan(sql).await.ok()
            });
            if allowed.is_none() {
                continue;
            }
            group.bench_function(format!("lakegate/{who}/{name}"), |b| {
                b.to_async(&rt).iter(|| async {
                    let session = engine.session(&p).await.expect("session");
                    let planned = session.plan(sql).await.expect("plan");
                    planned.verified_physical_plan().await.expect("physical")
                })
            });
        }
        group.bench_function(format!("datafusion/{name}"), |b| {
            b.to_async(&rt).iter(|| async {
                let df = ctx.sql(sql).await.expect("plan");
                df.create_physical_plan().await.expect("physical")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
