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
use lakegate_benches::{governed, governed_with_keyring, persona, plain, QUERIES};
use lakegate_catalogs::Lake;
use lakegate_engine::audit::{fingerprint, AuditConfig, AuditEvent, AuditKey, AuditLog};
use lakegate_engine::Engine;
use lakegate_flight_server::audited::with_report;
use lakegate_policies::Principal;

// The server's allocator, so the in-process engine and plain DataFusion allocate as it does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Queries of the mix to run (default: all).
    #[arg(long, value_delimiter = ',')]
    queries: Vec<String>,
    /// Concurrent clients for the audit throughput comparison (0 skips it).
    #[arg(long, default_value_t = 8)]
    audit_clients: usize,
    /// Rounds of the query mix each client runs, per mode.
    #[arg(long, default_value_t = 2)]
    audit_rounds: usize,
    /// Skip the per-query table (run only the audit comparison).
    #[arg(long)]
    audit_only: bool,
    /// Plain DataFusion reads strings as `Utf8` (as Lakegate does) instead of its default
    /// `Utf8View`: shows how much of a ratio is the string type rather than the policy.
    #[arg(long)]
    plain_utf8: bool,
    /// After timing, print plain DataFusion's `EXPLAIN ANALYZE` of each query (compare with
    /// Lakegate's, from the server as a role in `--explain-roles`).
    #[arg(long)]
    explain: bool,
    /// The same lake built encrypted at rest (`lakegate demo --build-only` with the same
    /// `--patients` and seed): Lakegate over it is timed beside Lakegate over `--lake`.
    #[arg(long, requires = "keyring")]
    encrypted_lake: Option<String>,
    /// The keyring of `--encrypted-lake`.
    #[arg(long)]
    keyring: Option<std::path::PathBuf>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let engine = governed(&args.lake).await;
    if !args.audit_only {
        let encrypted = match &args.encrypted_lake {
            Some(lake) => Some(governed_with_keyring(lake, args.keyring.as_deref()).await),
            None => None,
        };
        per_query(&args, &engine, encrypted.as_ref()).await;
    }
    if args.audit_clients > 0 {
        audit_throughput(&args, &engine).await;
    }
}

/// One request as the server handles it: plan, (audit the decision durably), execute, consume,
/// (audit the completion). Refusals count as requests too: they are audited as well.
async fn request(engine: &Engine, who: &Principal, sql: &str, audit: Option<&AuditLog>) -> bool {
    let started = Instant::now();
    let planned = match engine.session(who).await {
        Ok(s) => s.plan(sql).await,
        Err(e) => Err(e),
    };
    let (normalized, digest) = fingerprint(sql);
    let mut event = AuditEvent::new("query", "DoGet").by(who);
    event.fingerprint = normalized;
    event.fingerprint_sha256 = digest;
    let planned = match planned {
        Ok(p) => p,
        Err(e) => {
            if let Some(log) = audit {
                event.outcome = "refused".into();
                event.reason = e.to_string();
                log.record_later(event);
            }
            return true;
        }
    };
    let Ok((stream, report)) = planned.execute_with_report(None).await else {
        return false;
    };
    let mut decision = with_report(event, &report);
    decision.outcome = "allowed".into();
    if let Some(log) = audit {
        log.record(decision.clone()).await.expect("audit");
    }
    // A query can fail under load (memory exhausted): counted, like the server would answer it.
    let Ok(batches) = stream.try_collect::<Vec<_>>().await else {
        return false;
    };
    if let Some(log) = audit {
        let mut end = decision;
        end.kind = "query_end".into();
        end.rows = Some(batches.iter().map(|b| b.num_rows() as u64).sum());
        end.duration_us = Some(started.elapsed().as_micros() as u64);
        end.outcome = "completed".into();
        log.record_later(end);
    }
    true
}

/// Throughput of the query mix with N concurrent clients, without and with the audit trail
/// (written to a local folder, as to a local lake), side by side.
async fn audit_throughput(args: &Args, engine: &Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let trail = Lake::open(dir.path().to_str().expect("utf8")).expect("trail store");
    let log = AuditLog::open(
        trail.store(),
        AuditKey::generate(),
        AuditConfig::default(),
        None,
    )
    .await
    .expect("audit log");
    let personas = ["alice", "bob", "carol", "dave"];
    println!(
        "\naudit throughput: {} clients x {} rounds of the {}-query mix",
        args.audit_clients,
        args.audit_rounds,
        QUERIES.len()
    );
    println!(
        "{:<10} {:>10} {:>12} {:>14} {:>8}",
        "mode", "requests", "seconds", "requests/s", "failed"
    );
    let mut rates = Vec::new();
    // Alternate the modes so that cache warmth favours neither.
    for audited in [false, true, false, true] {
        let started = Instant::now();
        let tasks: Vec<_> = (0..args.audit_clients)
            .map(|i| {
                let engine = engine.clone();
                let log = audited.then(|| log.clone());
                let who = persona(personas[i % personas.len()]);
                let rounds = args.audit_rounds;
                tokio::spawn(async move {
                    let mut failed = 0usize;
                    for _ in 0..rounds {
                        for (_, sql) in QUERIES {
                            if !request(&engine, &who, sql, log.as_ref()).await {
                                failed += 1;
                            }
                        }
                    }
                    failed
                })
            })
            .collect();
        let mut failed = 0;
        for t in tasks {
            failed += t.await.expect("client");
        }
        let secs = started.elapsed().as_secs_f64();
        let n = args.audit_clients * args.audit_rounds * QUERIES.len();
        let mode = if audited { "audited" } else { "unaudited" };
        println!(
            "{mode:<10} {n:>10} {secs:>12.2} {:>14.2} {failed:>8}",
            n as f64 / secs
        );
        rates.push((audited, n as f64 / secs));
    }
    log.checkpoint().await.expect("checkpoint");
    let mean = |a: bool| {
        let v: Vec<f64> = rates.iter().filter(|r| r.0 == a).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "audit cost: {:.1}% of unaudited throughput (mean of 2 runs each)",
        (1.0 - mean(true) / mean(false)) * 100.0
    );
}

/// Run `sql` as `who` through the engine, consuming every row; the number of rows.
async fn run_governed(
    engine: &Engine,
    who: &Principal,
    sql: &str,
) -> Result<usize, lakegate_engine::EngineError> {
    let s = engine.session(who).await?;
    let stream = s.plan(sql).await?.execute(None).await?;
    let batches: Vec<_> = stream
        .try_collect()
        .await
        .map_err(lakegate_engine::EngineError::from)?;
    Ok(batches.iter().map(|b| b.num_rows()).sum())
}

async fn per_query(args: &Args, engine: &Engine, encrypted: Option<&Engine>) {
    let ctx = plain(&args.lake, !args.plain_utf8).await;
    print!(
        "{:<8} {:<16} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "persona", "query", "lakegate_ms", "plain_ms", "rows_gov", "rows_plain", "ratio"
    );
    if encrypted.is_some() {
        print!(" {:>13} {:>8}", "encrypted_ms", "enc/gov");
    }
    println!();
    for who in &args.personas {
        let p = persona(who);
        for (name, sql) in QUERIES
            .iter()
            .filter(|(n, _)| args.queries.is_empty() || args.queries.iter().any(|q| q == n))
        {
            let mut gov = Vec::new();
            let mut raw = Vec::new();
            let mut enc = Vec::new();
            let (mut rows_gov, mut rows_plain) = (0usize, 0usize);
            let mut refused = None;
            for i in 0..=args.iterations {
                let t = Instant::now();
                match run_governed(engine, &p, sql).await {
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
                if let Some(encrypted) = encrypted {
                    let t = Instant::now();
                    let n = run_governed(encrypted, &p, sql).await.expect("encrypted");
                    assert_eq!(n, rows_gov, "the encrypted lake answers the same rows");
                    if i > 0 {
                        enc.push(t.elapsed());
                    }
                }
                if i > 0 {
                    gov.push(g);
                    raw.push(r);
                }
            }
            if let Some(why) = refused {
                println!("{who:<8} {name:<16} refused: {why}");
                continue;
            }
            if args.explain {
                let plans = ctx
                    .sql(&format!("EXPLAIN ANALYZE {sql}"))
                    .await
                    .expect("plain explain")
                    .collect()
                    .await
                    .expect("plain explain run");
                println!(
                    "{}",
                    datafusion::arrow::util::pretty::pretty_format_batches(&plans).expect("format")
                );
            }
            let (g, r) = (median(gov), median(raw));
            print!(
                "{who:<8} {name:<16} {:>12.1} {:>12.1} {:>12} {:>12} {:>7.2}",
                g.as_secs_f64() * 1e3,
                r.as_secs_f64() * 1e3,
                rows_gov,
                rows_plain,
                g.as_secs_f64() / r.as_secs_f64()
            );
            if !enc.is_empty() {
                let e = median(enc);
                print!(
                    " {:>13.1} {:>8.2}",
                    e.as_secs_f64() * 1e3,
                    e.as_secs_f64() / g.as_secs_f64()
                );
            }
            println!();
        }
    }
}
