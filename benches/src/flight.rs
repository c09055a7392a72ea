//! The demo mix through the real server and a real Flight SQL client, side by side with plain
//! DataFusion in-process on the same files, in one run:
//!
//! ```sh
//! cargo build --release --bin lakegate --bin lakegate-bench
//! target/release/lakegate-bench --lake /tmp/lake1m
//! ```
//!
//! The bench starts `lakegate demo` on the lake as a child process (on loopback, port 0, with
//! limits raised so that 16 clients fit), logs in as the personas the mix names and prints, per
//! query: median wall time, time to first batch, rows/s and MB/s of Arrow data over Flight; the
//! same through Lakegate's engine in-process (policy, no transport) and through plain
//! DataFusion (no policy, no transport); and the ratio of Flight to plain. Then N clients run
//! the small-query (BI) mix at once, through the server and through plain DataFusion:
//! throughput, p50 and p99 latency, errors, and the server's peak resident memory.
//!
//! With `--pin`, the server runs on CPU 0 and this process on CPU 1 (`taskset`), so the ratio
//! is the server's single core against plain DataFusion's single core, and the CPU table's
//! `srv_s/GB` against `eng_s/GB` is what serving over Flight adds to the engine's own work for
//! the same rows.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::client::FlightSqlServiceClient;
use clap::Parser;
use datafusion::arrow::array::{Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;
use futures::{Stream, StreamExt};
use lakegate_benches::{governed, persona, plain};
use lakegate_engine::Engine;
use tonic::transport::Channel;

// The server's allocator, so the in-process engine and plain DataFusion allocate as it does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// The lake to measure (build one with `lakegate demo --patients 1000000 --build-only`).
    #[arg(long)]
    lake: String,
    /// The `lakegate` binary to start [default: next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Timed runs per query (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// Queries of the mix to run (default: all).
    #[arg(long, value_delimiter = ',')]
    queries: Vec<String>,
    /// Concurrent clients for the BI mix (0 skips it).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Rounds of the BI mix each client runs.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Skip the in-process governed engine column.
    #[arg(long)]
    no_engine: bool,
    /// Clients keep tonic's fixed 64 KiB HTTP/2 windows instead of adaptive ones.
    #[arg(long)]
    fixed_window: bool,
    /// The largest HTTP/2 frame the clients accept, in KiB (SETTINGS_MAX_FRAME_SIZE; 16 is the
    /// protocol's default, which gRPC-Go and gRPC C++ keep; at most 16383). The server sends
    /// a stream's messages in frames of this size, one socket write and one receive per frame.
    #[arg(long, default_value_t = 16383, value_parser = clap::value_parser!(u32).range(16..=16383))]
    max_frame_kib: u32,
    /// Pin the server to CPU 0 and this process (the client, the in-process engine and plain
    /// DataFusion) to CPU 1 (`taskset`), so the ratio compares one core with one core and the
    /// client's work is not counted against the server.
    #[arg(long)]
    pin: bool,
    /// Keep the server's default memory budgets (2 GiB for all queries, 1 GiB per principal)
    /// instead of raising them to 8 GiB, as a new user's `lakegate demo` runs.
    #[arg(long)]
    default_memory: bool,
    /// Measure releases instead of the mix: alice's live streams of every dataset she may
    /// read, then `lakegate release create` of the same (risk gate, shuffle, write; approved
    /// as erin), then her stream of the release's encounters over Flight against plain
    /// DataFusion scanning the same release files in-process, and against the same batches
    /// streamed from memory by a Flight server that does nothing else (the transport's floor
    /// on this host). Use a lake built with
    /// `--encryption off`, whose release files plain DataFusion can read.
    #[arg(long)]
    releases: bool,
}

/// What a query of the mix is, for its target (`docs/benchmarks.md`): a stream with or without
/// masks, or an aggregate. Targets are throughput against plain DataFusion on the same core
/// count: unmasked streams at least 0.9x, masked at least 0.8x, aggregates within 1.1x.
#[derive(Clone, Copy)]
enum Kind {
    Stream,
    MaskedStream,
    Aggregate,
    Lookup,
}

impl Kind {
    /// The largest Flight/plain time ratio the target allows (None: no target).
    fn target(self) -> Option<f64> {
        match self {
            Kind::Stream => Some(1.0 / 0.9),
            Kind::MaskedStream => Some(1.0 / 0.8),
            Kind::Aggregate => Some(1.1),
            Kind::Lookup => None,
        }
    }
}

fn kind_of(name: &str) -> Kind {
    match name {
        "training_stream" => Kind::MaskedStream,
        "filtered_scan" | "site_stream" => Kind::Stream,
        "point_lookup" | "pseudonym_lookup" => Kind::Lookup,
        _ => Kind::Aggregate,
    }
}

/// The mix: (name, persona, SQL). `{pid}` is a SITE_A patient, so carol may look it up; `{ps}`
/// is a pseudonym alice sees, and plain DataFusion, which has no pseudonyms, looks up `{pid}` by
/// its raw id instead: the lookup a user would compare with.
const MIX: &[(&str, &str, &str)] = &[
    (
        "training_stream",
        "alice",
        "SELECT patient_id, start_time, encounter_class, total_cost FROM clinical.encounters",
    ),
    (
        "site_stream",
        "carol",
        "SELECT encounter_id, patient_id, start_time, encounter_class, total_cost FROM clinical.encounters",
    ),
    (
        "filtered_scan",
        "carol",
        "SELECT encounter_id, patient_id, total_cost FROM clinical.encounters WHERE total_cost > 49000",
    ),
    (
        "cohort_count",
        "bob",
        "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY site_id",
    ),
    (
        "join_aggregate",
        "bob",
        "SELECT p.sex, count(DISTINCT p.patient_id) AS n, avg(e.total_cost) AS cost FROM clinical.encounters e \
         JOIN clinical.patients p ON e.patient_id = p.patient_id GROUP BY p.sex",
    ),
    (
        "point_lookup",
        "carol",
        "SELECT patient_id, first_name, last_name, birth_date, ssn, zip FROM clinical.patients WHERE patient_id = '{pid}'",
    ),
    (
        "pseudonym_lookup",
        "alice",
        "SELECT patient_id, birth_date, zip FROM clinical.patients WHERE patient_id = '{ps}'",
    ),
    (
        "lab_aggregate",
        "bob",
        "SELECT loinc_code, count(DISTINCT patient_id) AS n, avg(value) AS v FROM clinical.observations GROUP BY loinc_code",
    ),
];

/// What many BI clients fire at once: small cohort queries and lookups.
const BI_MIX: &[&str] = &["cohort_count", "point_lookup", "filtered_scan"];

/// Limits for the bench's server: the defaults are per-deployment choices, raised here so that
/// 16 clients of the same persona are admitted.
const SERVER_FLAGS: &[&str] = &[
    "--max-concurrent-queries",
    "32",
    "--requests-per-second",
    "10000",
    "--handshakes-per-minute",
    "100000",
];

/// Memory raised so that the 1M-patient lake's distinct counts fit without spilling (unless
/// `--default-memory`).
const MEMORY_FLAGS: &[&str] = &["--memory-limit-mb", "8192", "--principal-memory-mb", "8192"];

type Client = FlightSqlServiceClient<Channel>;

/// A client of the Flight server at `url`, as the bench's clients all connect.
async fn connect(url: String, fixed_window: bool, max_frame_bytes: u32) -> Client {
    // Adaptive HTTP/2 flow-control windows (BDP estimation), as gRPC-Go, which the ADBC driver
    // uses, does by default; tonic's fixed 64 KiB default would throttle a stream. Frames as
    // large as `--max-frame-kib`: at the protocol's default 16 KiB, a 420 MB stream is 26,000
    // frames, each a socket write on the server and a wake-up of the receiving task on the
    // client (570 -> 340 ms of client CPU for alice's stream).
    let channel = Channel::from_shared(url)
        .expect("url")
        .http2_adaptive_window(!fixed_window)
        .max_frame_size(max_frame_bytes)
        .connect()
        .await
        .expect("connect");
    FlightSqlServiceClient::new(channel)
}

/// One run of one query: wall time, time to first batch, rows, bytes of Arrow data.
#[derive(Clone, Copy, Default)]
struct Run {
    total: Duration,
    first: Duration,
    rows: u64,
    bytes: u64,
}

/// Consumes a stream of batches, timing it from `started`.
async fn consume<S, E>(started: Instant, mut stream: S) -> Result<Run, String>
where
    S: Stream<Item = Result<RecordBatch, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut run = Run::default();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| e.to_string())?;
        if run.first.is_zero() {
            run.first = started.elapsed();
        }
        run.rows += batch.num_rows() as u64;
        run.bytes += batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0) as u64)
            .sum::<u64>();
    }
    run.total = started.elapsed();
    if run.first.is_zero() {
        run.first = run.total;
    }
    Ok(run)
}

async fn via_flight(client: &mut Client, sql: &str) -> Result<Run, String> {
    let started = Instant::now();
    let info = client
        .execute(sql.to_string(), None)
        .await
        .map_err(|e| e.to_string())?;
    let mut total = Run::default();
    for ep in info.endpoint {
        let ticket = ep.ticket.ok_or("endpoint without ticket")?;
        let stream = client.do_get(ticket).await.map_err(|e| e.to_string())?;
        let run = consume(started, stream).await?;
        if total.rows == 0 {
            total.first = run.first;
        }
        total.rows += run.rows;
        total.bytes += run.bytes;
    }
    total.total = started.elapsed();
    Ok(total)
}

async fn via_plain(ctx: &SessionContext, sql: &str) -> Result<Run, String> {
    let started = Instant::now();
    let df = ctx.sql(sql).await.map_err(|e| e.to_string())?;
    let stream = df.execute_stream().await.map_err(|e| e.to_string())?;
    consume(started, stream).await
}

async fn via_engine(engine: &Engine, who: &str, sql: &str) -> Result<Run, String> {
    let started = Instant::now();
    let session = engine
        .session(&persona(who))
        .await
        .map_err(|e| e.to_string())?;
    let stream = session
        .plan(sql)
        .await
        .map_err(|e| e.to_string())?
        .execute(None)
        .await
        .map_err(|e| e.to_string())?;
    consume(started, stream).await
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The running server and its peak resident memory while sampling is on.
struct Server {
    child: std::process::Child,
    url: String,
    /// Use tonic's default fixed flow-control windows in the client (for comparison).
    fixed_window: bool,
    /// The clients' SETTINGS_MAX_FRAME_SIZE.
    max_frame_bytes: u32,
    peak_rss: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) a process has used, in ms, from `/proc/PID/stat` (10 ms ticks).
fn proc_cpu_ms(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is parenthesised and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    (ticks(11) + ticks(12)) * 10.0
}

fn cpu_ms(pid: u32) -> f64 {
    proc_cpu_ms(&pid.to_string())
}

fn own_cpu_ms() -> f64 {
    proc_cpu_ms("self")
}

impl Server {
    async fn start(
        bin: &PathBuf,
        lake: &str,
        fixed_window: bool,
        max_frame_bytes: u32,
        pin: bool,
        default_memory: bool,
    ) -> Server {
        use std::io::BufRead;
        // The server's log (alerts fire: the training stream reads many rows) stays out of the
        // table.
        let log_path = std::env::temp_dir().join("lakegate-bench-server.log");
        let log = std::fs::File::create(&log_path).expect("server log");
        eprintln!("server log: {}", log_path.display());
        // `taskset` execs the server in its own process: the child's pid is the server's.
        let mut command = if pin {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", "0"]).arg(bin);
            c
        } else {
            std::process::Command::new(bin)
        };
        let mut child = command
            .args(["demo", "--lake", lake, "--port", "0"])
            .args(SERVER_FLAGS)
            .args(if default_memory {
                &[][..]
            } else {
                MEMORY_FLAGS
            })
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the address, then keeps draining stdout so the server never blocks on a pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("grpc://") {
                    let _ = tx.send(format!("http://{}", line[at + "grpc://".len()..].trim()));
                }
            }
        });
        let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(600)))
            .await
            .expect("reader")
            .expect("the server stopped before it listened");
        let peak_rss = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(false));
        let pid = child.id();
        let (peak, on) = (Arc::clone(&peak_rss), Arc::clone(&sampling));
        tokio::spawn(async move {
            loop {
                if on.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Server {
            child,
            url,
            fixed_window,
            max_frame_bytes,
            peak_rss,
            sampling,
        }
    }

    /// Starts recording peak memory afresh.
    fn sample(&self) {
        self.peak_rss.store(0, Ordering::Relaxed);
        self.sampling.store(true, Ordering::Relaxed);
    }

    /// Stops recording; the peak resident memory since [`Server::sample`], in MiB.
    fn peak_mib(&self) -> f64 {
        self.sampling.store(false, Ordering::Relaxed);
        self.peak_rss.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn login(&self, user: &str) -> Client {
        let mut c = connect(self.url.clone(), self.fixed_window, self.max_frame_bytes).await;
        c.handshake(user, &format!("demo-{user}"))
            .await
            .expect("handshake");
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mb_per_s(run: &Run) -> f64 {
    run.bytes as f64 / 1e6 / run.total.as_secs_f64()
}

fn rows_per_s(run: &Run) -> f64 {
    run.rows as f64 / run.total.as_secs_f64()
}

/// The median run of `runs` (by wall time), with its first-batch time replaced by the median.
fn typical(runs: &[Run]) -> Run {
    let total = median(runs.iter().map(|r| r.total).collect());
    let first = median(runs.iter().map(|r| r.first).collect());
    let r = runs
        .iter()
        .find(|r| r.total == total)
        .copied()
        .unwrap_or_default();
    Run { first, ..r }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.pin {
        // Every thread of this process, before the in-process engines size their partitions by
        // the cores they may use.
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("taskset (util-linux) is needed for --pin");
        assert!(status.success(), "taskset failed: {status}");
    }
    let bin = args.server_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("current exe")
            .with_file_name("lakegate")
    });
    if args.releases {
        return release_bench(&args, &bin).await;
    }
    let ctx = plain(&args.lake, true).await;
    let pid = site_a_patient(&ctx).await;
    let mix: Vec<(&str, &str, String)> = MIX
        .iter()
        .filter(|(n, _, _)| args.queries.is_empty() || args.queries.iter().any(|q| q == n))
        .map(|(n, who, sql)| (*n, *who, sql.replace("{pid}", &pid)))
        .collect();
    let engine = if args.no_engine {
        None
    } else {
        Some(governed(&args.lake).await)
    };
    // 16383 KiB is the protocol's largest frame, 2^24 - 1 bytes, less 1023 bytes.
    let max_frame_bytes = args.max_frame_kib * 1024;
    let server = Server::start(
        &bin,
        &args.lake,
        args.fixed_window,
        max_frame_bytes,
        args.pin,
        args.default_memory,
    )
    .await;
    println!(
        "server {} (pid {}); clients accept HTTP/2 frames up to {} KiB; {}",
        server.url,
        server.pid(),
        args.max_frame_kib,
        if args.pin {
            "pinned: server on CPU 0, client and in-process engines on CPU 1"
        } else {
            "unpinned: server and client share every core"
        }
    );

    println!(
        "\n{:<16} {:<6} {:>10} {:>9} {:>11} {:>10} {:>8} | {:>10} | {:>9} {:>9} {:>8} | {:>6} {:>6} {:>8}",
        "query",
        "who",
        "flight_ms",
        "first_ms",
        "rows",
        "rows/s",
        "MB/s",
        "engine_ms",
        "plain_ms",
        "first_ms",
        "MB/s",
        "ratio",
        "target",
        "srv_MiB"
    );
    // One pseudonym each side can look up (the server's keys are not the in-process engine's).
    let pseudonym = "SELECT min(patient_id) FROM clinical.patients";
    let flight_ps = first_text(&mut server.login("alice").await, pseudonym).await;
    let engine_ps = match &engine {
        Some(engine) => engine_text(engine, "alice", pseudonym).await,
        None => String::new(),
    };
    let mut cpu_rows = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for (name, who, sql) in &mix {
        let mut client = server.login(who).await;
        let (mut flight, mut eng, mut raw) = (Vec::new(), Vec::new(), Vec::new());
        // CPU per run: (server, client) for Flight, this process for the engine and for plain.
        let (mut flight_cpu, mut eng_cpu, mut plain_cpu) = (Vec::new(), Vec::new(), Vec::new());
        let mut refused = None;
        server.sample();
        for i in 0..=args.iterations {
            let (srv0, cli0) = (cpu_ms(server.pid()), own_cpu_ms());
            let f = match via_flight(&mut client, &sql.replace("{ps}", &flight_ps)).await {
                Ok(r) => r,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            };
            let (srv1, cli1) = (cpu_ms(server.pid()), own_cpu_ms());
            let e = match &engine {
                Some(engine) => Some(
                    via_engine(engine, who, &sql.replace("{ps}", &engine_ps))
                        .await
                        .expect("engine"),
                ),
                None => None,
            };
            let cli2 = own_cpu_ms();
            let p = via_plain(&ctx, &sql.replace("{ps}", &pid))
                .await
                .expect("plain");
            let cli3 = own_cpu_ms();
            if i > 0 {
                flight_cpu.push((srv1 - srv0, cli1 - cli0));
                eng_cpu.push(cli2 - cli1);
                plain_cpu.push(cli3 - cli2);
                flight.push(f);
                eng.extend(e);
                raw.push(p);
            }
        }
        let peak = server.peak_mib();
        if let Some(why) = refused {
            println!("{name:<16} {who:<6} refused: {why}");
            continue;
        }
        let (f, p) = (typical(&flight), typical(&raw));
        let engine_ms = if eng.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", typical(&eng).total.as_secs_f64() * 1e3)
        };
        let mid = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (srv_cpu, cli_cpu) = (
            mid(flight_cpu.iter().map(|c| c.0).collect()),
            mid(flight_cpu.iter().map(|c| c.1).collect()),
        );
        let (eng_cpu, bound) = if eng.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            // The best Flight/engine ratio on this host with this client: a server that spent
            // no CPU beyond the engine's would still share the cores with the client.
            let eng_cpu = mid(eng_cpu);
            let eng_ms = typical(&eng).total.as_secs_f64() * 1e3;
            (eng_cpu, eng_ms / eng_ms.max((eng_cpu + cli_cpu) / cores))
        };
        let plain_cpu = mid(plain_cpu);
        // CPU per GB of Arrow data streamed, where a result is large enough to say it.
        let gb = f.bytes as f64 / 1e9;
        let per_gb = |ms: f64| {
            if gb >= 0.01 && ms.is_finite() {
                format!("{:.2}", ms / 1e3 / gb)
            } else {
                "-".to_string()
            }
        };
        let added = if eng_cpu.is_finite() && eng_cpu > 0.0 {
            format!("{:+.0}%", (srv_cpu / eng_cpu - 1.0) * 100.0)
        } else {
            "-".to_string()
        };
        cpu_rows.push(format!(
            "{name:<16} {who:<6} {srv_cpu:>13.0} {cli_cpu:>13.0} {eng_cpu:>13.0} {plain_cpu:>13.0} {bound:>10.2} | {gb:>6.3} {:>9} {:>9} {:>9}",
            per_gb(srv_cpu),
            per_gb(eng_cpu),
            added,
        ));
        let ratio = f.total.as_secs_f64() / p.total.as_secs_f64();
        let target = match kind_of(name).target() {
            Some(t) if ratio <= t => format!("<={t:.2}"),
            Some(t) => format!("!{t:.2}"),
            None => "-".to_string(),
        };
        println!(
            "{name:<16} {who:<6} {:>10.1} {:>9.1} {:>11} {:>10.0} {:>8.1} | {engine_ms:>10} | {:>9.1} {:>9.1} {:>8.1} | {ratio:>6.2} {target:>6} {peak:>8.0}",
            f.total.as_secs_f64() * 1e3,
            f.first.as_secs_f64() * 1e3,
            f.rows,
            rows_per_s(&f),
            mb_per_s(&f),
            p.total.as_secs_f64() * 1e3,
            p.first.as_secs_f64() * 1e3,
            mb_per_s(&p),
        );
    }

    if !cpu_rows.is_empty() {
        // Where the CPU goes: both processes share the machine's cores on loopback.
        println!(
            "\n{:<16} {:<6} {:>13} {:>13} {:>13} {:>13} {:>10}",
            "query",
            "who",
            "server_cpu_ms",
            "client_cpu_ms",
            "engine_cpu_ms",
            "plain_cpu_ms",
            "best_ratio"
        );
        for row in &cpu_rows {
            println!("{row}");
        }
    }

    if args.clients > 0 {
        let bi: Vec<(&str, &str, String)> = MIX
            .iter()
            .filter(|(n, _, _)| BI_MIX.contains(n))
            .map(|(n, who, sql)| (*n, *who, sql.replace("{pid}", &pid)))
            .collect();
        println!(
            "\n{} clients at once, {} rounds each of the BI mix ({})",
            args.clients,
            args.rounds,
            BI_MIX.join(", ")
        );
        println!(
            "{:<8} {:>9} {:>9} {:>10} {:>9} {:>9} {:>7} {:>8}",
            "side", "requests", "seconds", "queries/s", "p50_ms", "p99_ms", "errors", "srv_MiB"
        );
        server.sample();
        let flight = concurrent(args.clients, args.rounds, &bi, Side::Flight(&server)).await;
        let peak = server.peak_mib();
        flight.print("flight", Some(peak));
        let raw = concurrent(args.clients, args.rounds, &bi, Side::Plain(&ctx)).await;
        raw.print("plain", None);
    }
}

/// The first value of the first row of `sql` over Flight, as text.
async fn first_text(client: &mut Client, sql: &str) -> String {
    let info = client.execute(sql.to_string(), None).await.expect(sql);
    let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
    let batches: Vec<RecordBatch> = client
        .do_get(ticket)
        .await
        .expect(sql)
        .map(|b| b.expect(sql))
        .collect()
        .await;
    text_of(&batches)
}

/// The first value of the first row of `sql` in the in-process engine, as text.
async fn engine_text(engine: &Engine, who: &str, sql: &str) -> String {
    let stream = engine
        .session(&persona(who))
        .await
        .expect("session")
        .plan(sql)
        .await
        .expect(sql)
        .execute(None)
        .await
        .expect(sql);
    let batches: Vec<RecordBatch> = stream.map(|b| b.expect(sql)).collect().await;
    text_of(&batches)
}

/// The first value of the first column, as text (Parquet strings come back as `Utf8View`).
fn text_of(batches: &[RecordBatch]) -> String {
    let col =
        datafusion::arrow::compute::cast(batches[0].column(0), &DataType::Utf8).expect("cast");
    col.as_any()
        .downcast_ref::<StringArray>()
        .filter(|c| !c.is_null(0))
        .map(|c| c.value(0).to_string())
        .expect("a value")
}

/// A patient of SITE_A: carol may look it up.
async fn site_a_patient(ctx: &SessionContext) -> String {
    let batches = ctx
        .sql("SELECT min(patient_id) FROM clinical.patients WHERE site_id = 'SITE_A'")
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    text_of(&batches)
}

#[derive(Clone, Copy)]
enum Side<'a> {
    Flight(&'a Server),
    Plain(&'a SessionContext),
}

struct Concurrent {
    latencies: Vec<Duration>,
    errors: Vec<String>,
    elapsed: Duration,
}

impl Concurrent {
    fn print(&self, side: &str, peak: Option<f64>) {
        let mut l = self.latencies.clone();
        l.sort();
        let n = l.len() + self.errors.len();
        let (p50, p99) = if l.is_empty() {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (percentile(&l, 0.5), percentile(&l, 0.99))
        };
        println!(
            "{side:<8} {n:>9} {:>9.2} {:>10.1} {:>9.1} {:>9.1} {:>7} {:>8}",
            self.elapsed.as_secs_f64(),
            l.len() as f64 / self.elapsed.as_secs_f64(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            self.errors.len(),
            peak.map_or("-".into(), |p| format!("{p:.0}")),
        );
        if let Some(e) = self.errors.first() {
            println!("  first error: {e}");
        }
    }
}

/// `clients` tasks, each running `rounds` rounds of `mix` (each query as its persona, one
/// connection per persona per client), all started at once.
async fn concurrent(
    clients: usize,
    rounds: usize,
    mix: &[(&str, &str, String)],
    side: Side<'_>,
) -> Concurrent {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mix: Vec<(String, String)> = mix
            .iter()
            .map(|(_, who, sql)| (who.to_string(), sql.clone()))
            .collect();
        // Connections are made before the clock starts.
        let mut conns = std::collections::HashMap::new();
        let ctx = match side {
            Side::Flight(server) => {
                for (who, _) in &mix {
                    if !conns.contains_key(who) {
                        conns.insert(who.clone(), server.login(who).await);
                    }
                }
                None
            }
            Side::Plain(ctx) => Some(ctx.clone()),
        };
        tasks.push(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            for r in 0..rounds {
                // Clients start at different points of the mix, as independent users would.
                for k in 0..mix.len() {
                    let (who, sql) = &mix[(c + r + k) % mix.len()];
                    let started = Instant::now();
                    let result = match &ctx {
                        Some(ctx) => via_plain(ctx, sql).await,
                        None => via_flight(conns.get_mut(who).expect("connection"), sql).await,
                    };
                    match result {
                        Ok(_) => latencies.push(started.elapsed()),
                        Err(e) => errors.push(e),
                    }
                }
            }
            (latencies, errors)
        });
    }
    let started = Instant::now();
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    let mut out = Concurrent {
        latencies: Vec::new(),
        errors: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for h in handles {
        let (l, e) = h.await.expect("client task");
        out.latencies.extend(l);
        out.errors.extend(e);
    }
    out.elapsed = started.elapsed();
    out
}

/// Every dataset alice may read, released whole.
const RELEASE_DATASETS: &[&str] = &[
    "clinical.patients",
    "clinical.encounters",
    "clinical.conditions",
    "clinical.observations",
    "omics.variants",
];

fn lakegate(bin: &PathBuf, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("lakegate runs");
    assert!(
        out.status.success(),
        "lakegate {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    started.elapsed()
}

async fn release_bench(args: &Args, bin: &PathBuf) {
    let server = Server::start(
        bin,
        &args.lake,
        args.fixed_window,
        args.max_frame_kib * 1024,
        args.pin,
        args.default_memory,
    )
    .await;
    let mut alice = server.login("alice").await;
    // Her live streams of the same datasets (one warm-up each, then the median).
    let mut live = Duration::ZERO;
    let mut live_rows = 0;
    for d in RELEASE_DATASETS {
        let sql = format!("SELECT * FROM {d}");
        let mut runs = Vec::new();
        for i in 0..=args.iterations {
            let run = via_flight(&mut alice, &sql).await.expect("live stream");
            if i > 0 {
                runs.push(run);
            }
        }
        let t = median(runs.iter().map(|r| r.total).collect());
        live_rows += runs[0].rows;
        println!(
            "live stream {d}: {} rows in {:.1} ms",
            runs[0].rows,
            t.as_secs_f64() * 1e3
        );
        live += t;
    }
    let name = format!("bench-{}", chrono_stamp());
    let datasets = RELEASE_DATASETS.join(",");
    let create = lakegate(
        bin,
        &[
            "release",
            "create",
            "--lake",
            &args.lake,
            "--name",
            &name,
            "--as",
            "alice",
            "--datasets",
            &datasets,
            "--suppress",
        ],
    );
    lakegate(
        bin,
        &[
            "release", "approve", &name, "--lake", &args.lake, "--as", "erin",
        ],
    );
    println!(
        "\nalice's full release ({} datasets, {live_rows} rows live): created in {:.1} s, her \
         live streams of the same {:.1} s: {:.2}x (target under 3x)",
        RELEASE_DATASETS.len(),
        create.as_secs_f64(),
        live.as_secs_f64(),
        create.as_secs_f64() / live.as_secs_f64()
    );

    // The release's encounters through the server, and plain DataFusion on its files.
    let folder = std::fs::read_dir(format!("{}/releases/{name}/data", args.lake))
        .expect("release data")
        .next()
        .expect("an attempt folder")
        .expect("entry")
        .path()
        .join("encounters");
    let ctx = SessionContext::new();
    ctx.register_parquet(
        "encounters",
        folder.to_str().expect("utf8"),
        datafusion::prelude::ParquetReadOptions::default(),
    )
    .await
    .expect("plain DataFusion reads the release's files (an unencrypted lake)");
    let sql = format!("SELECT * FROM releases.\"{name}\".encounters");
    let (mut flight, mut raw, mut cpu, mut bytes) = (Vec::new(), Vec::new(), 0.0, 0);
    for i in 0..=args.iterations {
        let srv0 = cpu_ms(server.pid());
        let f = via_flight(&mut alice, &sql).await.expect("release stream");
        let srv1 = cpu_ms(server.pid());
        let p = via_plain(&ctx, "SELECT * FROM encounters")
            .await
            .expect("plain");
        if i > 0 {
            cpu += srv1 - srv0;
            bytes += f.bytes;
            flight.push(f);
            raw.push(p);
        }
    }
    // The same batches as the server sent them, streamed from memory by a Flight server that
    // does nothing else: what any server would take to hand these rows to this client.
    let received = {
        let info = alice
            .execute(sql.clone(), None)
            .await
            .expect("release stream");
        let mut all = Vec::new();
        for ep in info.endpoint {
            let stream = alice
                .do_get(ep.ticket.expect("ticket"))
                .await
                .expect("do_get");
            let batches: Vec<RecordBatch> = stream.map(|b| b.expect("batch")).collect().await;
            all.extend(batches);
        }
        all
    };
    let mut floor_client =
        transport_floor(received, args.fixed_window, args.max_frame_kib * 1024).await;
    let mut floor = Vec::new();
    for i in 0..=args.iterations {
        let run = via_floor(&mut floor_client).await.expect("floor stream");
        if i > 0 {
            floor.push(run);
        }
    }
    let (f, p, m) = (typical(&flight), typical(&raw), typical(&floor));
    println!(
        "release stream of encounters: {} rows, {:.1} MB; flight {:.1} ms, plain DataFusion on \
         the release files {:.1} ms: {:.2}x plain's throughput (target at least 0.9x); server \
         CPU {:.2} s per GB",
        f.rows,
        f.bytes as f64 / 1e6,
        f.total.as_secs_f64() * 1e3,
        p.total.as_secs_f64() * 1e3,
        p.total.as_secs_f64() / f.total.as_secs_f64(),
        cpu / 1e3 / (bytes as f64 / 1e9)
    );
    println!(
        "transport floor: the same {} rows streamed from memory by a Flight server in this \
         process that does nothing else, {:.1} ms: {:.2}x plain's throughput at best for any \
         Flight server on this host",
        m.rows,
        m.total.as_secs_f64() * 1e3,
        p.total.as_secs_f64() / m.total.as_secs_f64(),
    );
}

/// A Flight service that streams batches it already holds in memory: no scan, no policy, no
/// audit, only what every Flight server pays to send them (IPC encoding, gRPC framing, the
/// loopback socket) and the client pays to receive them. The floor under any server's stream.
struct InMemoryFlight {
    batches: Arc<Vec<RecordBatch>>,
}

type Answer<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

fn floor_only<T>() -> Result<T, tonic::Status> {
    Err(tonic::Status::unimplemented(
        "the transport floor only streams",
    ))
}

#[tonic::async_trait]
impl FlightService for InMemoryFlight {
    type HandshakeStream = Answer<arrow_flight::HandshakeResponse>;
    type ListFlightsStream = Answer<arrow_flight::FlightInfo>;
    type DoGetStream = Answer<arrow_flight::FlightData>;
    type DoPutStream = Answer<arrow_flight::PutResult>;
    type DoExchangeStream = Answer<arrow_flight::FlightData>;
    type DoActionStream = Answer<arrow_flight::Result>;
    type ListActionsStream = Answer<arrow_flight::ActionType>;

    async fn handshake(
        &self,
        _: tonic::Request<tonic::Streaming<arrow_flight::HandshakeRequest>>,
    ) -> Result<tonic::Response<Self::HandshakeStream>, tonic::Status> {
        floor_only()
    }
    async fn list_flights(
        &self,
        _: tonic::Request<arrow_flight::Criteria>,
    ) -> Result<tonic::Response<Self::ListFlightsStream>, tonic::Status> {
        floor_only()
    }
    async fn get_flight_info(
        &self,
        _: tonic::Request<arrow_flight::FlightDescriptor>,
    ) -> Result<tonic::Response<arrow_flight::FlightInfo>, tonic::Status> {
        floor_only()
    }
    async fn poll_flight_info(
        &self,
        _: tonic::Request<arrow_flight::FlightDescriptor>,
    ) -> Result<tonic::Response<arrow_flight::PollInfo>, tonic::Status> {
        floor_only()
    }
    async fn get_schema(
        &self,
        _: tonic::Request<arrow_flight::FlightDescriptor>,
    ) -> Result<tonic::Response<arrow_flight::SchemaResult>, tonic::Status> {
        floor_only()
    }
    async fn do_get(
        &self,
        _: tonic::Request<arrow_flight::Ticket>,
    ) -> Result<tonic::Response<Self::DoGetStream>, tonic::Status> {
        let batches = self.batches.clone();
        let Some(schema) = batches.first().map(RecordBatch::schema) else {
            return floor_only();
        };
        let each = futures::stream::iter((0..batches.len()).map(move |i| Ok(batches[i].clone())));
        // The encoder the Lakegate server streams with, with the same (default) options.
        let data = futures::TryStreamExt::map_err(
            FlightDataEncoderBuilder::new()
                .with_schema(schema)
                .build(each),
            tonic::Status::from,
        );
        Ok(tonic::Response::new(Box::pin(data)))
    }
    async fn do_put(
        &self,
        _: tonic::Request<tonic::Streaming<arrow_flight::FlightData>>,
    ) -> Result<tonic::Response<Self::DoPutStream>, tonic::Status> {
        floor_only()
    }
    async fn do_exchange(
        &self,
        _: tonic::Request<tonic::Streaming<arrow_flight::FlightData>>,
    ) -> Result<tonic::Response<Self::DoExchangeStream>, tonic::Status> {
        floor_only()
    }
    async fn do_action(
        &self,
        _: tonic::Request<arrow_flight::Action>,
    ) -> Result<tonic::Response<Self::DoActionStream>, tonic::Status> {
        floor_only()
    }
    async fn list_actions(
        &self,
        _: tonic::Request<arrow_flight::Empty>,
    ) -> Result<tonic::Response<Self::ListActionsStream>, tonic::Status> {
        floor_only()
    }
}

/// Serves `batches` from memory on a loopback port of this process, as the Lakegate server is
/// served (no Nagle, no limit on a message's size), and connects a client to it.
async fn transport_floor(batches: Vec<RecordBatch>, fixed_window: bool, max_frame: u32) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = FlightServiceServer::new(InMemoryFlight {
        batches: Arc::new(batches),
    })
    .max_encoding_message_size(usize::MAX);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    connect(format!("http://{addr}"), fixed_window, max_frame).await
}

async fn via_floor(client: &mut Client) -> Result<Run, String> {
    let started = Instant::now();
    let stream = client
        .do_get(arrow_flight::Ticket::new(""))
        .await
        .map_err(|e| e.to_string())?;
    consume(started, stream).await
}

fn chrono_stamp() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string()
}
