//! Governed query cost against plain DataFusion, side by side in one run over the same files:
//!
//! ```sh
//! cargo run --release -p lakegate-benches --bin lakegate-overhead -- --lake ./lake-1m --iterations 5
//! ```
//!
//! Prints, per persona and query: median wall time through Lakegate's engine (decision,
//! rewrite, verification, filters, masks, execution, all rows consumed), median time through
//! plain DataFusion with no policy, rows returned by each, and the ratio.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::TryStreamExt;
use lakegate_benches::{governed, persona, plain, QUERIES};

#[derive(Parser)]
struct Args {
    /// The lake to measure (build one with `lakegate demo --patients 1000000 --build-only`).
    #[arg(long)]
    lake: String,
    /// Timed runs per query (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Personas to measure.
    #[arg(long, value_delimiter = ',', default_value = "bob,carol,alice")]
    personas: Vec<String>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let engine = governed(&args.lake).await;
    let ctx = plain(&args.lake).await;
    println!(
        "{:<8} {:<16} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "persona", "query", "lakegate_ms", "plain_ms", "rows_gov", "rows_plain", "ratio"
    );
    for who in &args.personas {
        let p = persona(who);
        for (name, sql) in QUERIES {
            let mut gov = Vec::new();
            let mut raw = Vec::new();
            let (mut rows_gov, mut rows_plain) = (0usize, 0usize);
            let mut refused = None;
            for i in 0..=args.iterations {
                let t = Instant::now();
                let result = async {
                    let s = engine.session(&p).await?;
                    let stream = s.plan(sql).await?.execute(None).await?;
                    let batches: Vec<_> = stream
                        .try_collect()
                        .await
                        .map_err(lakegate_engine::EngineError::from)?;
                    Ok::<usize, lakegate_engine::EngineError>(
                        batches.iter().map(|b| b.num_rows()).sum(),
                    )
                }
                .await;
                match result {
                    Ok(n) => rows_gov = n,
                    Err(e) => {
                        refused = Some(e.to_string());
                        break;
                    }
                }
                let g = t.elapsed();
                let t = Instant::now();
                let batches = ctx
                    .sql(sql)
                    .await
                    .expect("plain")
                    .collect()
                    .await
                    .expect("plain run");
                rows_plain = batches.iter().map(|b| b.num_rows()).sum();
                let r = t.elapsed();
                if i > 0 {
                    gov.push(g);
                    raw.push(r);
                }
            }
            if let Some(why) = refused {
                println!("{who:<8} {name:<16} refused: {why}");
                continue;
            }
            let (g, r) = (median(gov), median(raw));
            println!(
                "{who:<8} {name:<16} {:>12.1} {:>12.1} {:>12} {:>12} {:>7.2}",
                g.as_secs_f64() * 1e3,
                r.as_secs_f64() * 1e3,
                rows_gov,
                rows_plain,
                g.as_secs_f64() / r.as_secs_f64()
            );
        }
    }
}
