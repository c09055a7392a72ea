//! Ingest speed against DataFusion's own `COPY ... TO` Parquet of the same CSV, in one run:
//!
//! ```sh
//! cargo run --release -p lakegate-benches --bin lakegate-ingest-bench -- --lake /tmp/lake1m
//! ```
//!
//! (`--lake` is built as a 1M-patient demo lake when it holds none.)
//!
//! Exports the lake's `clinical.encounters` once to one CSV file, then times, per iteration,
//! plain DataFusion copying that CSV to Parquet (no checks) and `lakegate ingest` of the same
//! file into a Delta dataset of the same columns whose contract checks every row: types,
//! not-null, allowed values, patterns, ICD-10 shape, a range, unique encounter ids and every
//! patient id against `clinical.patients`. Each ingest runs in a scratch lake that shares the
//! source lake's patient files (hard links), so the source lake is not changed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use datafusion::prelude::{CsvReadOptions, SessionContext};
use lakegate_catalogs::ingest::{ingest, IngestOptions};
use lakegate_catalogs::{parse_contract, Catalog, Lake};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// The demo lake whose encounters are ingested (e.g. `lakegate demo --patients 1000000
    /// --build-only --lake /tmp/lake1m`: about 10M encounters).
    #[arg(long)]
    lake: PathBuf,
    /// Scratch folder for the CSV and the outputs [default: a new temporary folder].
    #[arg(long)]
    work: Option<PathBuf>,
    /// Timed runs of each side.
    #[arg(long, default_value_t = 1)]
    iterations: usize,
    /// Patients of the demo lake built at `--lake` when it holds none (about 10 encounters
    /// each).
    #[arg(long, default_value_t = 1_000_000)]
    patients: u64,
}

const CONTRACT: &str = r#"
dataset = "bench.encounters"
[[columns]]
name = "encounter_id"
type = "utf8"
nullable = false
label = "identifier"
unique = true
regex = "E[0-9]{11}"
[[columns]]
name = "patient_id"
type = "utf8"
nullable = false
label = "identifier"
references = "clinical.patients.patient_id"
[[columns]]
name = "site_id"
type = "utf8"
nullable = false
label = "clinical"
allowed = ["SITE_A", "SITE_B", "SITE_C", "SITE_D", "SITE_E"]
[[columns]]
name = "start_time"
type = "timestamp_utc"
nullable = false
label = "phi.quasi"
min = "1900-01-01T00:00:00Z"
[[columns]]
name = "stop_time"
type = "timestamp_utc"
nullable = false
label = "phi.quasi"
[[columns]]
name = "encounter_class"
type = "utf8"
nullable = false
label = "clinical"
allowed = ["ambulatory", "emergency", "inpatient", "outpatient", "wellness", "urgentcare"]
[[columns]]
name = "provider_id"
type = "utf8"
nullable = false
label = "clinical"
regex = "PR[0-9]{5}"
[[columns]]
name = "payer"
type = "utf8"
label = "clinical"
[[columns]]
name = "total_cost"
type = "float64"
nullable = false
label = "clinical"
min = 0
[[columns]]
name = "reason_code"
type = "utf8"
label = "clinical"
shape = "icd10"
[[columns]]
name = "readmitted_30d"
type = "bool"
nullable = false
label = "clinical"
"#;

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => folder_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A lake holding only `clinical.patients`, by hard links to the source lake's files.
async fn scratch_lake(source: &Path, at: &Path) -> Lake {
    let _ = std::fs::remove_dir_all(at);
    let from = source.join("curated/clinical/patients");
    let to = at.join("curated/clinical/patients");
    std::fs::create_dir_all(&to).expect("scratch folder");
    for entry in std::fs::read_dir(&from).expect("patients folder").flatten() {
        std::fs::hard_link(entry.path(), to.join(entry.file_name())).expect("hard link");
    }
    let src = Catalog::load(&Lake::open(source.to_str().expect("utf8")).expect("lake"))
        .await
        .expect("source catalog");
    // The contract leaves `encrypted` at its default: the ingest encrypts, as a user's would.
    let keyring = at.with_extension("keyring.toml");
    let lake = Lake::open(at.to_str().expect("utf8"))
        .expect("scratch lake")
        .with_keyring(lakegate_catalogs::Keyring::load_or_create(&keyring).expect("keyring"));
    let mut catalog = Catalog {
        version: 1,
        datasets: vec![src.dataset("clinical.patients").expect("patients").clone()],
    };
    let bench = parse_contract("bench contract", CONTRACT).expect("contract");
    catalog.declare(&lake, bench).await.expect("declare");
    lake
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let temp = tempfile::tempdir().expect("tempdir");
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&work).expect("work folder");
    let csv = work.join("encounters.csv");
    let source = Lake::open(args.lake.to_str().expect("utf8")).expect("lake");
    if !source.has_catalog().await.expect("lake") {
        let started = Instant::now();
        let options = lakegate_catalogs::demo::DemoOptions {
            patients: args.patients,
            seed: 42,
            encrypted: false,
            layout: lakegate_catalogs::demo::DemoLayout::Folders,
        };
        lakegate_catalogs::demo::build_demo_lake(&source, &options, |_, _| {})
            .await
            .expect("demo lake");
        eprintln!(
            "built the demo lake in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let ctx = lakegate_benches::plain(args.lake.to_str().expect("utf8"), false).await;
    if !csv.exists() {
        let started = Instant::now();
        ctx.sql(&format!(
            "COPY (SELECT * FROM clinical.encounters) TO '{}' STORED AS CSV OPTIONS ('format.has_header' 'true')",
            csv.display()
        ))
        .await
        .expect("export plan")
        .collect()
        .await
        .expect("export");
        eprintln!(
            "exported the CSV in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let csv_bytes = std::fs::metadata(&csv).expect("csv").len();
    let schema = parse_contract("bench contract", CONTRACT)
        .expect("contract")
        .schema();

    println!("CSV: {} ({:.0} MB)", csv.display(), csv_bytes as f64 / 1e6);
    println!(
        "{:<34} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "side", "seconds", "CPU s", "rows", "Mrows/s", "out MB"
    );
    let mut plain_best = f64::MAX;
    let mut ingest_best = f64::MAX;
    for _ in 0..args.iterations {
        let out = work.join("copy-out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).expect("copy folder");
        let plain = SessionContext::new();
        plain
            .register_csv(
                "src",
                csv.to_str().expect("utf8"),
                CsvReadOptions::new().has_header(true).schema(&schema),
            )
            .await
            .expect("register csv");
        let started = Instant::now();
        let cpu = cpu_seconds();
        let done = plain
            .sql(&format!(
                "COPY (SELECT * FROM src) TO '{}/' STORED AS PARQUET",
                out.display()
            ))
            .await
            .expect("copy plan")
            .collect()
            .await
            .expect("copy");
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        let rows = copied_rows(&done);
        plain_best = plain_best.min(secs);
        println!(
            "{:<34} {:>10.2} {:>10.2} {:>12} {:>10.2} {:>10.0}",
            "DataFusion COPY csv -> parquet",
            secs,
            cpu,
            rows,
            rows as f64 / secs / 1e6,
            folder_bytes(&out) as f64 / 1e6
        );

        let scratch = work.join("scratch-lake");
        let lake = scratch_lake(&args.lake, &scratch).await;
        let options = IngestOptions {
            principal: "bench".into(),
            max_reject_ratio: 0.0,
            ..Default::default()
        };
        let started = Instant::now();
        let cpu = cpu_seconds();
        let report = ingest(
            &lake,
            "bench.encounters",
            &[csv.to_str().expect("utf8").to_string()],
            &options,
        )
        .await
        .expect("ingest");
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        assert_eq!(report.refused, None, "{:?}", report.by_rule);
        ingest_best = ingest_best.min(secs);
        println!(
            "{:<34} {:>10.2} {:>10.2} {:>12} {:>10.2} {:>10.0}",
            "lakegate ingest (contract checks)",
            secs,
            cpu,
            report.accepted,
            report.rows_read as f64 / secs / 1e6,
            folder_bytes(&scratch.join("curated/bench/encounters")) as f64 / 1e6
        );
    }
    println!(
        "ingest / COPY time (best of {}): {:.2}x",
        args.iterations,
        ingest_best / plain_best
    );
}

/// CPU time this process has used (user and system), from `/proc/self/stat`; 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The row count a `COPY` reports.
fn copied_rows(batches: &[datafusion::arrow::array::RecordBatch]) -> u64 {
    use datafusion::arrow::array::{Array, UInt64Array};
    batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .filter_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .map(|a| a.value(0))
        })
        .sum()
}
