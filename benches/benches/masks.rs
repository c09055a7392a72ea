//! Mask throughput, values per second on one core: `cargo bench -p lakegate-benches --bench masks`.
//!
//! Each mask is evaluated as the engine evaluates it (the physical expression over a batch of
//! the engine's batch size). Pseudonym and date shift run twice: over ids unique per row (the
//! worst case: an HMAC per value) and over ids in runs of 10 rows (a patient's encounters, as
//! the lake's files hold them: the kernels reuse the last result). Every iteration gets its
//! columns as new arrays, as each batch of a scan is: the keyed masks remember the digests of
//! the subject array they met last (so a pseudonym and a date shift of one batch share them),
//! and evaluating the same array again would time that memory, not the HMACs.

use std::sync::Arc;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use datafusion::arrow::array::{
    make_array, Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::common::DFSchema;
use datafusion::logical_expr::{col, Expr};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use lakegate_engine::masks::{mask_expr, remember_subjects, ProjectKey};
use lakegate_engine::EngineConfig;
use lakegate_policies::Mask;

fn ids(n: usize) -> StringArray {
    StringArray::from_iter_values((0..n).map(|i| format!("P{i:08}")))
}

fn batch(rows: usize, run: usize) -> RecordBatch {
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..rows).map(|i| format!("P{:08}", i / run)),
    ));
    let zips: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..rows).map(|i| format!("{:05}", (i * 7919) % 100_000)),
    ));
    let times: ArrayRef = Arc::new(
        TimestampMicrosecondArray::from_iter_values(
            (0..rows).map(|i| 1_600_000_000_000_000 + i as i64 * 3_600_000_000),
        )
        .with_timezone("UTC"),
    );
    let schema = Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("zip", DataType::Utf8, false),
        Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]);
    RecordBatch::try_new(Arc::new(schema), vec![ids, zips, times]).expect("batch")
}

/// The same values in new arrays (the buffers are shared, not copied).
fn fresh(b: &RecordBatch) -> RecordBatch {
    let columns = b
        .columns()
        .iter()
        .map(|c| make_array(c.to_data()))
        .collect();
    RecordBatch::try_new(b.schema(), columns).expect("batch")
}

/// Times `expr` over new arrays holding `b`'s values, as each batch of a scan is.
fn evaluate(
    group: &mut BenchmarkGroup<'_, WallTime>,
    ctx: &SessionContext,
    name: &str,
    expr: Expr,
    b: &RecordBatch,
) {
    let schema = DFSchema::try_from(b.schema().as_ref().clone()).expect("schema");
    let physical: Arc<dyn PhysicalExpr> =
        ctx.create_physical_expr(expr, &schema).expect("physical");
    group.bench_function(name, |bench| {
        bench.iter_batched(
            || fresh(b),
            |b| physical.evaluate(&b).expect("evaluate"),
            BatchSize::SmallInput,
        )
    });
}

fn masks(c: &mut Criterion) {
    let rows = EngineConfig::default().batch_size;
    let key = ProjectKey([7; 32]);
    let ctx = SessionContext::new();
    let mut group = c.benchmark_group("mask");
    group.throughput(Throughput::Elements(rows as u64));
    for (run, label) in [(1, "unique"), (10, "runs_of_10")] {
        let b = batch(rows, run);
        let cases: Vec<(String, Mask, &str, DataType)> = vec![
            (
                format!("pseudonym/{label}"),
                Mask::Pseudonym,
                "id",
                DataType::Utf8,
            ),
            (
                format!("date_shift/{label}"),
                Mask::DateShift {
                    subject: "id".into(),
                    max_days: 365,
                },
                "t",
                b.schema().field(2).data_type().clone(),
            ),
        ];
        let mut cases = cases;
        if run == 1 {
            cases.push(("zip3".into(), Mask::Zip3, "zip", DataType::Utf8));
            cases.push((
                "show_last_4".into(),
                Mask::ShowLast { n: 4 },
                "id",
                DataType::Utf8,
            ));
        }
        for (name, mask, column, data_type) in cases {
            let expr = mask_expr(&mask, col(column), &data_type, Some(&key), Some(col("id")))
                .expect("mask");
            evaluate(&mut group, &ctx, &name, expr, &b);
        }
    }
    // Subjects the engine knows under the key (as after a first scan of them): a million ids,
    // the batch's among them. Another key, so the cases above computed their HMACs.
    let known = ProjectKey([9; 32]);
    remember_subjects(&known, &ids(1_000_000));
    for (run, label) in [(1, "unique"), (10, "runs_of_10")] {
        let expr = mask_expr(
            &Mask::Pseudonym,
            col("id"),
            &DataType::Utf8,
            Some(&known),
            None,
        )
        .expect("mask");
        let name = format!("pseudonym_known_subjects/{label}");
        evaluate(&mut group, &ctx, &name, expr, &batch(rows, run));
    }
    // The same masks as a user would write them in plain DataFusion, built-in functions only,
    // over the same batches: an unkeyed SHA-256 for the pseudonym (HMAC needs two), substrings
    // for ZIP3 and the last four.
    let b = batch(rows, 1);
    let df_schema = DFSchema::try_from(b.schema().as_ref().clone()).expect("schema");
    let restricted = lakegate_engine::masks::RESTRICTED_ZIP3
        .iter()
        .map(|z| format!("'{z}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let plain = [
        (
            "plain_sha256_pseudonym/unique",
            "concat('ps_', substr(encode(sha256(concat('0707070707', id)), 'hex'), 1, 24))".to_string(),
        ),
        (
            "plain_zip3",
            format!(
                "CASE WHEN substr(zip, 1, 3) IN ({restricted}) THEN '000' ELSE substr(zip, 1, 3) END"
            ),
        ),
        ("plain_show_last_4", "concat('*****', right(id, 4))".to_string()),
    ];
    for (name, sql) in plain {
        let expr = ctx
            .parse_sql_expr(&sql, &df_schema)
            .expect("plain expression");
        evaluate(&mut group, &ctx, name, expr, &b);
    }
    group.finish();
}

/// A subject's digest read from a hash map from id to digest (DataFusion's hashbrown and
/// foldhash) against its HMAC, per id over `n` distinct ids in order. The engine keeps a sorted
/// table instead (group `mask`, `pseudonym_known_subjects`): past the CPU caches, each map
/// lookup misses memory and costs more than the HMAC it saves.
fn subject_digest(c: &mut Criterion) {
    use hmac::{Hmac, Mac};
    let mut group = c.benchmark_group("subject_digest");
    group.sample_size(10);
    let mut base = Hmac::<sha2::Sha256>::new_from_slice(&[7; 32]).expect("key");
    base.update(b"pseudonym\0");
    let hmac = |id: &str| -> [u8; 32] {
        let mut m = base.clone();
        m.update(id.as_bytes());
        m.finalize().into_bytes().into()
    };
    for n in [10_000, 1_000_000] {
        let ids = ids(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("hmac_sha256/{n}"), |b| {
            b.iter(|| {
                ids.iter()
                    .flatten()
                    .map(|id| hmac(id)[0])
                    .fold(0, |a, x| a ^ x)
            })
        });
        let map: hashbrown::HashMap<&str, [u8; 32]> =
            ids.iter().flatten().map(|id| (id, hmac(id))).collect();
        group.bench_function(format!("hash_map/{n}"), |b| {
            b.iter(|| {
                ids.iter()
                    .flatten()
                    .map(|id| map[id][0])
                    .fold(0, |a, x| a ^ x)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, masks, subject_digest);
criterion_main!(benches);
