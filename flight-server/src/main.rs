//! The `lakegate` command: `demo` builds and serves the demo lake, `serve` runs a deployment,
//! `audit` verifies the trail and `catalog` describes the lake.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lakegate_catalogs::demo::{build_demo_lake, DemoOptions};
use lakegate_catalogs::describe;
use lakegate_catalogs::{ingest, Catalog, CatalogError, Keyring, Lake};
use lakegate_engine::audit::{public_key_from_pem, verify_trail, AuditEvent, AuditKey};
use lakegate_engine::{Engine, KeyRing};
use lakegate_flight_server::audited::open_audit;
use lakegate_flight_server::config::{ServeArgs, Settings};
use lakegate_flight_server::demo;
use lakegate_flight_server::identity::{spawn_users_watcher, JwtVerifier};
use lakegate_flight_server::reload::{PolicySource, PolicyText};
use lakegate_flight_server::{Identity, Limiter};
use lakegate_policies::{Action, Decision, PolicySet, RequestContext, UserStore, DEFAULT_MODEL};

// mimalloc, as datafusion-cli uses: under glibc malloc the server's resident memory crept up
// with traffic while its live heap stayed flat (freed chunks inside arenas stay resident).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "lakegate",
    version,
    about = "Governed Arrow Flight SQL access to a clinical data lake"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the demo lake (unless the folder already holds one) and serve it with the demo
    /// personas and policies.
    Demo(DemoArgs),
    /// Serve a lake.
    Serve(ServeArgs),
    /// The audit trail: verify it, or make a signing key for it.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// What the catalog holds: datasets, labels, contracts and files (never a data value).
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Load CSV, NDJSON or Parquet files into a dataset: each file lands in raw/, rows that
    /// keep the dataset's contract are committed to curated/, the rest go to quarantine/.
    Ingest(IngestArgs),
    /// Encryption at rest: master keys and the data keys they wrap.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// De-identified releases for training: create (behind a k-anonymity gate), approve,
    /// verify, list.
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// Retention and storage tiers: delete releases past their retention (their manifests
    /// stay as tombstones), move old raw extracts to a cold prefix; legal holds respected.
    #[command(subcommand)]
    Lifecycle(LifecycleCmd),
    /// Legal holds (compliance role only): nothing of a held release or dataset is deleted
    /// or moved.
    #[command(subcommand)]
    Hold(HoldCmd),
}

#[derive(Subcommand)]
enum LifecycleCmd {
    /// Carry out (or with --dry-run, print) what retention and tiering call for now.
    Run {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Move raw extracts last written more than this many days ago to the cold prefix
        /// [default: no tiering].
        #[arg(long, env = "LAKEGATE_COLD_AFTER_DAYS")]
        cold_after_days: Option<u32>,
        /// The lake prefix cold data moves under.
        #[arg(long, env = "LAKEGATE_COLD_PREFIX", default_value = "cold")]
        cold_prefix: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum HoldCmd {
    /// Place a legal hold on a release or dataset.
    Add {
        name: String,
        #[arg(long)]
        reason: String,
        #[arg(long = "as", env = "LAKEGATE_PRINCIPAL")]
        principal: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Lift the legal hold on a release or dataset.
    Remove {
        name: String,
        #[arg(long)]
        reason: String,
        #[arg(long = "as", env = "LAKEGATE_PRINCIPAL")]
        principal: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Every hold in force.
    List {
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Materialise what a principal's policy yields into the lake's releases/ zone, pending
    /// approval. Each table is one query run as that principal (masks, filters and pseudonyms
    /// as in their live queries), generalised as the policy's [release] section says, checked
    /// for k-anonymity, and written shuffled with a signed manifest.
    Create {
        /// The release's name (lower-case letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// Who the release is made as (see `ingest --as`).
        #[arg(long = "as", env = "LAKEGATE_PRINCIPAL")]
        principal: String,
        /// A file of SQL: one table named after the file (`cohort.sql` -> `cohort`).
        #[arg(
            long,
            conflicts_with = "datasets",
            required_unless_present = "datasets"
        )]
        query: Option<std::path::PathBuf>,
        /// Datasets to release whole, comma-separated (`clinical.encounters` -> table
        /// `encounters`).
        #[arg(long, value_delimiter = ',')]
        datasets: Vec<String>,
        /// Remove the records of classes below k (counted in the report) instead of refusing.
        #[arg(long)]
        suppress: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Approve a pending release (a principal with release_approver=true, not its creator).
    Approve {
        name: String,
        #[arg(long = "as", env = "LAKEGATE_PRINCIPAL")]
        principal: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Check a release's signatures, approval and every file's SHA-256; exit 1 naming what
    /// changed.
    Verify {
        name: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Every release with its status, project, creator, tables and rows.
    List {
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Add a new master key to the keyring, make it the active one and re-wrap every
    /// encrypted dataset's data keys with it (no data file is rewritten).
    Rotate {
        /// The lake (local path or object store URL).
        #[arg(long, env = "LAKEGATE_LAKE", default_value = "./demo-lake")]
        lake: String,
        /// The keyring file [default: LAKE.keyring.toml beside a local lake].
        #[arg(long, env = "LAKEGATE_KEYRING")]
        keyring: Option<std::path::PathBuf>,
        /// Re-wrap under the keyring's active key without adding a new one (to finish an
        /// interrupted rotation, or after putting a new key in the file by hand).
        #[arg(long)]
        no_new_key: bool,
        /// Then remove every other master key from the keyring.
        #[arg(long)]
        retire_old: bool,
    },
}

#[derive(Args)]
struct IngestArgs {
    /// The dataset, as `schema.table`, declared with `lakegate catalog add`.
    #[arg(long)]
    dataset: String,
    /// Who ingests: a principal whom the policy grants `ingest` on the dataset. With a users
    /// file (--users or the config's) the password is read from LAKEGATE_PASSWORD; without
    /// one, the demo personas answer by name.
    #[arg(long = "as", env = "LAKEGATE_PRINCIPAL")]
    principal: String,
    /// The largest share of quarantined rows (0 to 1) with which the feed is still committed.
    #[arg(long, env = "LAKEGATE_MAX_REJECT_RATIO", default_value_t = 0.05)]
    max_reject_ratio: f64,
    /// An OpenLineage HTTP endpoint that also receives each commit's run event (POSTed as
    /// JSON; e.g. Marquez's `http://host:5000/api/v1/lineage`). The event is always stored in
    /// the lake's `lineage/openlineage/` zone.
    #[arg(long, env = "LAKEGATE_LINEAGE_URL")]
    lineage_url: Option<String>,
    /// Files to ingest: local paths or URLs of an object store (s3://bucket/key).
    #[arg(required = true)]
    files: Vec<String>,
    /// The deployment's settings (lake, users, policy, audit key) as `serve` takes them.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// One line per dataset: zone, format, files, bytes, columns by label, retention, owner.
    List {
        /// The lake (local path or object store URL).
        #[arg(long, env = "LAKEGATE_LAKE", default_value = "./demo-lake")]
        lake: String,
    },
    /// One dataset: description, owner, retention, each column's type and label, its files.
    Show {
        /// The lake (local path or object store URL).
        #[arg(long, env = "LAKEGATE_LAKE", default_value = "./demo-lake")]
        lake: String,
        /// The dataset, as `schema.table` (e.g. clinical.encounters).
        dataset: String,
    },
    /// Declare a dataset from its contract (TOML; see docs/ingestion.md).
    Add {
        /// The lake (local path or object store URL).
        #[arg(long, env = "LAKEGATE_LAKE", default_value = "./demo-lake")]
        lake: String,
        /// The contract file.
        #[arg(long)]
        contract: std::path::PathBuf,
        /// The keyring that wraps the new dataset's data keys, unless its contract says
        /// `encrypted = false` [default: LAKE.keyring.toml beside a local lake].
        #[arg(long, env = "LAKEGATE_KEYRING")]
        keyring: Option<std::path::PathBuf>,
    },
    /// Where a dataset's contents came from: each committed file with its checksum, counts,
    /// principal and time.
    History {
        /// The lake (local path or object store URL).
        #[arg(long, env = "LAKEGATE_LAKE", default_value = "./demo-lake")]
        lake: String,
        /// The dataset, as `schema.table`.
        dataset: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the whole trail (hash chain, sequence, segments, signed checkpoints). Exits 0 and
    /// says what it checked when intact; exits 1 naming the first bad position otherwise.
    Verify {
        /// The lake (local path or object store URL) [default: ./demo-lake].
        #[arg(long, env = "LAKEGATE_LAKE")]
        lake: Option<String>,
        /// The trusted public key (PEM) [default: LAKE.audit-key.pub.pem beside a local lake].
        #[arg(long, env = "LAKEGATE_AUDIT_PUBLIC_KEY")]
        public_key: Option<std::path::PathBuf>,
    },
    /// Write a new Ed25519 signing key (FILE, mode 0600) and its public key (FILE.pub.pem).
    Keygen {
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Number of synthetic patients.
    #[arg(long, env = "LAKEGATE_DEMO_PATIENTS", default_value_t = 10_000)]
    patients: u64,
    /// Random seed: the same seed and patient count give byte-identical Parquet.
    #[arg(long, env = "LAKEGATE_DEMO_SEED", default_value_t = 42)]
    seed: u64,
    /// Host to listen on (with --port; overrides --listen) [default: 127.0.0.1].
    #[arg(long, env = "LAKEGATE_HOST")]
    host: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one [default: 50051].
    #[arg(long, env = "LAKEGATE_PORT")]
    port: Option<u16>,
    /// Build the lake and exit without serving.
    #[arg(long)]
    build_only: bool,
    /// Encrypt the demo lake at rest (`off` leaves its files readable by any Parquet reader,
    /// and byte-identical for a seed). The keyring is --keyring, or LAKE.keyring.toml beside
    /// the lake, made on first use.
    #[arg(long, env = "LAKEGATE_DEMO_ENCRYPTION", value_enum, default_value_t = Switch::On)]
    encryption: Switch,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// Lakegate's own events at info; the Delta kernel's per-snapshot chatter only when it warns.
const DEFAULT_LOG: &str = "info,buoyant_kernel=warn,buoyant_kernel_engine=warn,deltalake_core=warn";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // One TLS provider for the whole process (tonic's and reqwest's are ring; rustls also has
    // aws-lc-rs compiled in, through deltalake's HTTP client, and would not choose).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lakegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Demo(args) => demo(args).await,
            Cmd::Serve(args) => serve(args).await,
            Cmd::Audit(AuditCmd::Verify { lake, public_key }) => verify(lake, public_key).await,
            Cmd::Audit(AuditCmd::Keygen { out }) => keygen(&out),
            Cmd::Catalog(CatalogCmd::List { lake }) => catalog_list(&lake).await,
            Cmd::Catalog(CatalogCmd::Show { lake, dataset }) => catalog_show(&lake, &dataset).await,
            Cmd::Catalog(CatalogCmd::Add {
                lake,
                contract,
                keyring,
            }) => catalog_add(&lake, &contract, keyring).await,
            Cmd::Catalog(CatalogCmd::History { lake, dataset }) => {
                catalog_history(&lake, &dataset).await
            }
            Cmd::Ingest(args) => ingest(args).await,
            Cmd::Keys(KeysCmd::Rotate {
                lake,
                keyring,
                no_new_key,
                retire_old,
            }) => keys_rotate(&lake, keyring, no_new_key, retire_old).await,
            Cmd::Release(cmd) => release(cmd).await,
            Cmd::Lifecycle(LifecycleCmd::Run {
                dry_run,
                cold_after_days,
                cold_prefix,
                serve,
            }) => lifecycle_run(serve, dry_run, cold_after_days, cold_prefix).await,
            Cmd::Hold(cmd) => hold(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lakegate: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

async fn demo(args: DemoArgs) -> Result<(), AnyError> {
    let mut settings = args.serve.resolve("./demo-lake")?;
    if args.host.is_some() || args.port.is_some() {
        settings.listen = SocketAddr::new(
            args.host.unwrap_or(settings.listen.ip()),
            args.port.unwrap_or(settings.listen.port()),
        );
        if !settings.listen.ip().is_loopback() && !settings.allow_plaintext {
            return Err(
                lakegate_flight_server::config::ConfigError::PlaintextNotLoopback(settings.listen)
                    .into(),
            );
        }
    }
    let lake = Lake::open(&settings.lake)?;
    let encrypted = args.encryption == Switch::On;
    let lake = if lake.has_catalog().await? {
        let lake = open_lake(&settings.lake, settings.keyring.clone())?;
        if lakegate_catalogs::demo::unfinished(&lake).await? {
            eprintln!(
                "lakegate: finishing the demo lake at {} that an earlier build left unfinished",
                lake.url()
            );
            build_lake(&lake, args.patients, args.seed, encrypted).await?;
        } else {
            eprintln!(
                "lakegate: reusing the lake at {} (delete it to build a new one)",
                lake.url()
            );
        }
        lake
    } else {
        let lake = if encrypted {
            with_new_or_existing_keyring(lake, &settings.lake, settings.keyring.clone())?
        } else {
            lake
        };
        build_lake(&lake, args.patients, args.seed, encrypted).await?;
        lake
    };
    if args.build_only {
        return Ok(());
    }
    let users = match &settings.users {
        Some(path) => load_users(path)?,
        None => tokio::task::spawn_blocking(demo::demo_users).await??,
    };
    let policy = policy_or_demo(&settings)?;
    let keys = match &settings.keys {
        Some(path) => KeyRing::from_toml(&path.display().to_string(), &read(path)?)?,
        None => demo_keys(&settings.lake)?,
    };
    let audit_key = audit_key_or_demo(&settings)?;
    run(settings, lake, users, Some(policy), keys, audit_key, true).await
}

async fn build_lake(
    lake: &Lake,
    patients: u64,
    seed: u64,
    encrypted: bool,
) -> Result<(), AnyError> {
    let bar = ProgressBar::new(patients);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} building demo lake: generating, then ingesting [{bar:40}] {percent}% ({eta} left)",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let options = DemoOptions {
        patients,
        seed,
        encrypted,
        layout: Default::default(),
    };
    let catalog = build_demo_lake(lake, &options, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    eprintln!(
        "lakegate: built {} datasets for {patients} patients (seed {seed}) through the ingest \
         path ({} contract-checked feeds each) in {:.1} s at {}, {}",
        catalog.datasets.len(),
        lakegate_catalogs::demo::FEEDS,
        started.elapsed().as_secs_f64(),
        lake.url(),
        if encrypted {
            "encrypted at rest"
        } else {
            "NOT encrypted at rest (--encryption off)"
        }
    );
    Ok(())
}

fn read(path: &std::path::Path) -> Result<String, AnyError> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// `LAKE.<suffix>` beside a local lake folder (never inside it: whoever can read or write the
/// lake must not get the keys); `demo.<suffix>` in the working folder for a remote lake.
fn beside_lake(lake: &str, suffix: &str) -> std::path::PathBuf {
    if lake.contains("://") {
        return std::path::PathBuf::from(format!("demo.{suffix}"));
    }
    let lake = std::path::Path::new(lake.trim_end_matches('/'));
    let name = lake
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lake".into());
    lake.with_file_name(format!("{name}.{suffix}"))
}

/// The demo's project keys, created with fresh random keys on first use.
fn demo_keys(lake: &str) -> Result<KeyRing, AnyError> {
    let path = beside_lake(lake, "keys.toml");
    if path.exists() {
        return Ok(KeyRing::from_toml(
            &path.display().to_string(),
            &read(&path)?,
        )?);
    }
    let ring = KeyRing::generate(demo::DEMO_PROJECTS.iter().copied());
    write_secret(&path, &ring.to_toml())?;
    eprintln!("lakegate: wrote new project keys to {}", path.display());
    Ok(ring)
}

/// The demo's audit signing key, beside the lake, created on first use with its public key.
fn demo_audit_key(lake: &str) -> Result<AuditKey, AnyError> {
    let path = beside_lake(lake, "audit-key.pem");
    if path.exists() {
        return load_audit_key(&path);
    }
    let key = write_audit_key(&path)?;
    eprintln!(
        "lakegate: wrote a new audit signing key to {} (public key: {})",
        path.display(),
        public_key_path(&path).display()
    );
    Ok(key)
}

fn public_key_path(private: &std::path::Path) -> std::path::PathBuf {
    let name = private
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".pem").unwrap_or(&name);
    private.with_file_name(format!("{stem}.pub.pem"))
}

fn write_audit_key(path: &std::path::Path) -> Result<AuditKey, AnyError> {
    let key = AuditKey::generate();
    write_secret(path, &key.to_pem())?;
    std::fs::write(public_key_path(path), key.public_pem())
        .map_err(|e| format!("{}: {e}", public_key_path(path).display()))?;
    Ok(key)
}

/// The configured policy (its name and text), or the demo policy.
fn policy_or_demo(settings: &Settings) -> Result<(String, String), AnyError> {
    Ok(match &settings.policy {
        Some(path) => (path.display().to_string(), read(path)?),
        None => (
            "policies/demo/policy.toml".to_string(),
            demo::DEMO_POLICY.to_string(),
        ),
    })
}

/// The configured audit signing key, or the demo's beside the lake (made on first use).
fn audit_key_or_demo(settings: &Settings) -> Result<AuditKey, AnyError> {
    match &settings.audit.key {
        Some(path) => load_audit_key(path),
        None => demo_audit_key(&settings.lake),
    }
}

fn load_audit_key(path: &std::path::Path) -> Result<AuditKey, AnyError> {
    Ok(AuditKey::from_pem(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?)
}

fn keygen(out: &std::path::Path) -> Result<(), AnyError> {
    write_audit_key(out)?;
    println!(
        "lakegate: wrote {} (keep it outside the lake) and {}",
        out.display(),
        public_key_path(out).display()
    );
    Ok(())
}

async fn verify(
    lake: Option<String>,
    public_key: Option<std::path::PathBuf>,
) -> Result<(), AnyError> {
    let lake_url = lake.unwrap_or_else(|| "./demo-lake".into());
    let lake = existing_lake(&lake_url).await?;
    let key_path = match public_key {
        Some(p) => p,
        None => {
            let p = public_key_path(&beside_lake(&lake_url, "audit-key.pem"));
            if !p.exists() {
                // No key was ever made for this lake, so it was never served: an empty trail
                // is intact. Anything in the audit zone without a key to check it is not.
                if audit_zone_is_empty(&lake).await? {
                    println!(
                        "audit trail empty: {} has not been served yet (no events, no \
                         checkpoints, no signing key beside it)",
                        lake.url()
                    );
                    return Ok(());
                }
                return Err(format!(
                    "no trusted public key: pass --public-key (looked for {})",
                    p.display()
                )
                .into());
            }
            p
        }
    };
    let key = public_key_from_pem(&read(&key_path)?)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let report = verify_trail(&lake.store(), &key).await?;
    println!("{report}");
    println!("  trusted key {}", key_path.display());
    Ok(())
}

/// Opens a lake that must already hold a catalog, without a keyring: for commands that open
/// no data file (catalog listings, history, audit verification).
async fn existing_lake(url: &str) -> Result<Lake, AnyError> {
    with_catalog(Lake::open(url)?).await
}

/// `lake`, if it holds a catalog.
async fn with_catalog(lake: Lake) -> Result<Lake, AnyError> {
    if !lake.has_catalog().await? {
        return Err(format!("no lake at {} (it has no catalog)", lake.url()).into());
    }
    Ok(lake)
}

const KEYRING_SUFFIX: &str = "keyring.toml";

/// The keyring to use: the configured file, else `LAKE.keyring.toml` beside the lake when it
/// exists (where `lakegate demo` makes it).
fn keyring_path(lake: &str, configured: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    configured.or_else(|| {
        let beside = beside_lake(lake, KEYRING_SUFFIX);
        beside.exists().then_some(beside)
    })
}

/// Master keys kept in the lake would protect nothing: whoever copies the files copies them.
fn check_outside_lake(lake: &Lake, keyring: &std::path::Path) -> Result<(), AnyError> {
    let Some(root) = lake.local_root() else {
        return Ok(());
    };
    if keyring.to_str().is_some_and(|k| k.starts_with("env:")) {
        return Ok(());
    }
    let absolute = match keyring.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .join(keyring.file_name().unwrap_or_default()),
        _ => std::env::current_dir()?.join(keyring),
    };
    if absolute.starts_with(&root) {
        return Err(format!(
            "the keyring {} is inside the lake; keep master keys outside it",
            keyring.display()
        )
        .into());
    }
    Ok(())
}

/// `lake` with the keyring that encrypts new datasets: the configured one, else the one
/// beside the lake; either is made, with one fresh master key, when it does not exist yet.
fn with_new_or_existing_keyring(
    lake: Lake,
    url: &str,
    configured: Option<std::path::PathBuf>,
) -> Result<Lake, AnyError> {
    let path = keyring_path(url, configured).unwrap_or_else(|| beside_lake(url, KEYRING_SUFFIX));
    check_outside_lake(&lake, &path)?;
    let created = !path.exists();
    let ring = Keyring::load_or_create(&path)?;
    if created && !ring.from_environment() {
        eprintln!("lakegate: wrote a new master keyring to {}", path.display());
    }
    Ok(lake.with_keyring(ring))
}

/// Open the lake at `url` with the keyring (configured, or the demo's beside it).
fn open_lake(url: &str, keyring: Option<std::path::PathBuf>) -> Result<Lake, AnyError> {
    let lake = Lake::open(url)?;
    match keyring_path(url, keyring) {
        Some(path) => {
            check_outside_lake(&lake, &path)?;
            Ok(lake.with_keyring(Keyring::load(&path)?))
        }
        None => Ok(lake),
    }
}

async fn keys_rotate(
    lake_url: &str,
    keyring: Option<std::path::PathBuf>,
    no_new_key: bool,
    retire_old: bool,
) -> Result<(), AnyError> {
    let path = keyring_path(lake_url, keyring)
        .ok_or("no keyring: pass --keyring (or LAKEGATE_KEYRING)")?;
    let lake = existing_lake(lake_url).await?;
    check_outside_lake(&lake, &path)?;
    let mut ring = Keyring::load(&path)?;
    if !no_new_key && ring.from_environment() {
        return Err(format!(
            "the keyring {} comes from the environment, where lakegate cannot add a key: add the \
             new key to that secret, make it `active`, then run `lakegate keys rotate --no-new-key`",
            path.display()
        )
        .into());
    }
    if !no_new_key {
        let name = ring.add_active_key();
        // The new key is saved before anything is wrapped with it: a crash in between leaves
        // a keyring that still holds every key in use.
        ring.save()?;
        println!("added master key {name} to {} (now active)", path.display());
    }
    let lake = lake.with_keyring(ring.clone());
    let catalog = Catalog::load(&lake).await?;
    // Encrypted datasets, then releases (whose keys are named `release.<name>.<attempt>`).
    let mut encrypted: Vec<String> = catalog
        .datasets
        .iter()
        .filter(|d| d.encrypted)
        .map(|d| d.name.clone())
        .collect();
    encrypted.extend(release_key_names(&lake).await?);
    let mut total = 0;
    for name in &encrypted {
        let n = lakegate_catalogs::keys::rewrap(&lake, name).await?;
        total += n;
        println!("{name}: {n} data keys re-wrapped");
    }
    println!(
        "{total} data keys now wrapped by {}; no data file was rewritten",
        ring.active()
    );
    if retire_old {
        // Only keys no dataset uses any more may go.
        for name in &encrypted {
            let used = lakegate_catalogs::keys::master_keys_in_use(&lake, name).await?;
            if used.iter().any(|k| k != ring.active()) {
                return Err(format!(
                    "{name} still has data keys wrapped by an older master key; old keys kept"
                )
                .into());
            }
        }
        let retired = ring.retire_inactive();
        ring.save()?;
        println!(
            "retired {} old master key(s): {}",
            retired.len(),
            retired.join(", ")
        );
    }
    Ok(())
}

/// The key names of every release's data keys in the lake.
async fn release_key_names(lake: &Lake) -> Result<Vec<String>, AnyError> {
    use futures::TryStreamExt;
    let prefix = datafusion::object_store::path::Path::from("catalog/keys");
    let listed: Vec<_> = lake.store().list(Some(&prefix)).try_collect().await?;
    let mut names: Vec<String> = listed
        .iter()
        .filter_map(|m| m.location.filename())
        .filter(|f| f.starts_with("release."))
        .filter_map(|f| f.strip_suffix(".json"))
        .map(str::to_string)
        .collect();
    names.sort();
    Ok(names)
}

async fn catalog_list(lake: &str) -> Result<(), AnyError> {
    print!("{}", describe::list(&existing_lake(lake).await?).await?);
    Ok(())
}

async fn catalog_show(lake: &str, dataset: &str) -> Result<(), AnyError> {
    print!(
        "{}",
        describe::show(&existing_lake(lake).await?, dataset).await?
    );
    Ok(())
}

async fn catalog_add(
    lake: &str,
    contract: &std::path::Path,
    keyring: Option<std::path::PathBuf>,
) -> Result<(), AnyError> {
    let text = read(contract)?;
    let dataset = lakegate_catalogs::parse_contract(&contract.display().to_string(), &text)?;
    let lake = if dataset.encrypted {
        with_new_or_existing_keyring(Lake::open(lake)?, lake, keyring)?
    } else {
        open_lake(lake, keyring)?
    };
    let mut catalog = match Catalog::load(&lake).await {
        Ok(c) => c,
        Err(CatalogError::NoCatalog) => Catalog {
            version: 1,
            datasets: Vec::new(),
        },
        Err(e) => return Err(e.into()),
    };
    let name = dataset.name.clone();
    let encrypted = dataset.encrypted;
    if !catalog.declare(&lake, dataset).await? {
        println!("{name} is already declared with this contract");
        return Ok(());
    }
    let at_rest = if encrypted {
        "encrypted at rest"
    } else {
        "NOT encrypted at rest"
    };
    println!(
        "declared {name} (version 0, no rows, {at_rest}) in {}",
        lake.url()
    );
    Ok(())
}

async fn catalog_history(lake: &str, dataset: &str) -> Result<(), AnyError> {
    let lake = existing_lake(lake).await?;
    let versions = ingest::history(&lake, dataset).await?;
    if versions.is_empty() {
        println!("{dataset}: plain files written by `lakegate demo`; no versions");
    }
    for v in versions {
        let at = v
            .timestamp
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "-".into());
        let operation = v.operation.unwrap_or_else(|| "-".into());
        match v.ingest {
            Some(record) => {
                println!("v{}  {at}  ingest by {}", v.version, record.principal);
                for s in record.sources {
                    println!(
                        "    {}  sha256:{}  {} rows, {} accepted, {} quarantined  raw {}",
                        s.source, s.sha256, s.rows, s.accepted, s.quarantined, s.raw
                    );
                }
            }
            None => println!("v{}  {at}  {operation}", v.version),
        }
    }
    Ok(())
}

async fn ingest(args: IngestArgs) -> Result<(), AnyError> {
    let settings = args.serve.resolve("./demo-lake")?;
    let lake = with_catalog(open_lake(&settings.lake, settings.keyring.clone())?).await?;
    let catalog = Catalog::load(&lake).await?;
    let dataset = catalog
        .dataset(&args.dataset)
        .ok_or_else(|| CatalogError::UnknownDataset(args.dataset.clone()))?
        .clone();
    let principal = acting_principal(&settings, &args.principal).await?;
    let (policy_name, policy_text) = policy_or_demo(&settings)?;
    let model = match &settings.model {
        Some(path) => read(path)?,
        None => DEFAULT_MODEL.to_string(),
    };
    let policy = PolicySet::load(&model, &policy_name, &policy_text, &catalog).await?;
    let audit_key = audit_key_or_demo(&settings)?;
    let audit = open_audit(&lake, &catalog, audit_key, &settings.audit).await?;
    let decision = policy.decide(
        &principal,
        &dataset,
        Action::Ingest,
        &RequestContext::default(),
    );
    let mut event = cli_event("ingest", "Ingest", &principal);
    event.datasets = dataset.name.clone();
    event.policy_version = policy.version().to_string();
    let rule = match decision {
        Decision::Allow { rule, .. } => rule,
        Decision::Deny { rule } => {
            let rule = rule.unwrap_or_else(|| "no rule allows ingest".into());
            event.outcome = "refused".into();
            event.reason = rule.clone();
            audit.record(event).await?;
            return Err(format!(
                "refused: {} may not ingest into {} (rule: {rule})",
                principal.name, dataset.name
            )
            .into());
        }
    };
    event.rules = format!("allow ingest by {rule}");
    let options = ingest::IngestOptions {
        principal: principal.name.clone(),
        max_reject_ratio: args.max_reject_ratio,
        ..Default::default()
    };
    let total: u64 = args
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")?
            .progress_chars("=> "),
    );
    let progress = Arc::clone(&options.progress);
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.load(std::sync::atomic::Ordering::Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    };
    let started = Instant::now();
    let result = ingest::ingest(&lake, &args.dataset, &args.files, &options).await;
    ticker.abort();
    bar.finish_and_clear();
    event.duration_us = Some(started.elapsed().as_micros() as u64);
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            event.outcome = "failed".into();
            event.reason = "the ingest stopped with an error".into();
            audit.record(event).await?;
            return Err(e.into());
        }
    };
    event.rows = Some(report.accepted);
    let sources = report
        .files
        .iter()
        .map(|f| format!("{} sha256:{}", f.source, f.sha256))
        .collect::<Vec<_>>()
        .join(", ");
    let (outcome, what) = match (&report.refused, report.version) {
        (Some(why), _) => ("refused", format!("feed refused: {why}")),
        (None, Some(v)) => ("completed", format!("committed version {v}")),
        (None, None) => ("completed", "nothing new to commit".to_string()),
    };
    event.outcome = outcome.into();
    event.reason = format!("{what}; sources: {sources}");
    audit.record(event).await?;
    for f in &report.files {
        let what = match &f.outcome {
            ingest::FileOutcome::Checked {
                rows,
                accepted,
                quarantined,
            } => format!("{rows} rows, {accepted} accepted, {quarantined} quarantined"),
            ingest::FileOutcome::AlreadyIngested => "already ingested (same checksum)".into(),
            ingest::FileOutcome::Quarantined { reason } => format!("quarantined: {reason}"),
        };
        println!("{}  sha256:{}  {what}", f.source, &f.sha256[..16]);
    }
    for (rule, n) in &report.by_rule {
        println!("  rule {rule}: {n}");
    }
    if let Some(v) = report.version {
        println!("committed {} version {v}", report.dataset);
    }
    if let (Some(url), Some(event)) = (&args.lineage_url, &report.lineage) {
        let sent = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(event)?)
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        if let Err(e) = sent {
            // The commit stands and its event is in the lake's lineage zone.
            eprintln!("lakegate: warning: the lineage event did not reach {url}: {e}");
        }
    }
    println!("{}", report.summary());
    match report.refused {
        Some(reason) => Err(format!("feed refused, nothing committed: {reason}").into()),
        None => Ok(()),
    }
}

/// The principal a command acts as: with a users file, authenticated by LAKEGATE_PASSWORD;
/// without one, a demo persona by name.
async fn acting_principal(
    settings: &Settings,
    name: &str,
) -> Result<lakegate_policies::Principal, AnyError> {
    Ok(match &settings.users {
        Some(path) => {
            let password = std::env::var("LAKEGATE_PASSWORD")
                .map_err(|_| "set LAKEGATE_PASSWORD to the password of the --as principal")?;
            let users = load_users(path)?;
            let name = name.to_string();
            tokio::task::spawn_blocking(move || users.authenticate(&name, &password)).await??
        }
        None => {
            let users = tokio::task::spawn_blocking(demo::demo_users).await??;
            users
                .principal(name)
                .ok_or_else(|| format!("unknown principal '{name}'"))?
        }
    })
}

fn cli_event(kind: &str, action: &str, principal: &lakegate_policies::Principal) -> AuditEvent {
    let mut event = AuditEvent::new(kind, action).by(principal);
    event.client = "cli".into();
    event
}

async fn release(cmd: ReleaseCmd) -> Result<(), AnyError> {
    use lakegate_engine::releases;
    match cmd {
        ReleaseCmd::Create {
            name,
            principal,
            query,
            datasets,
            suppress,
            serve,
        } => {
            let settings = serve.resolve("./demo-lake")?;
            let lake = with_catalog(open_lake(&settings.lake, settings.keyring.clone())?).await?;
            let catalog = Catalog::load(&lake).await?;
            let who = acting_principal(&settings, &principal).await?;
            let tables: Vec<(String, String)> = match &query {
                Some(file) => {
                    let table = file
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_lowercase())
                        .unwrap_or_default();
                    vec![(table, read(file)?)]
                }
                None => datasets
                    .iter()
                    .map(|d| {
                        let table = d.rsplit('.').next().unwrap_or(d).to_string();
                        let quoted = d
                            .split('.')
                            .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
                            .collect::<Vec<_>>()
                            .join(".");
                        (table, format!("SELECT * FROM {quoted}"))
                    })
                    .collect(),
            };
            let (policy_name, policy_text) = policy_or_demo(&settings)?;
            let model = match &settings.model {
                Some(path) => read(path)?,
                None => DEFAULT_MODEL.to_string(),
            };
            let policy = PolicySet::load(&model, &policy_name, &policy_text, &catalog).await?;
            let keys = match &settings.keys {
                Some(path) => KeyRing::from_toml(&path.display().to_string(), &read(path)?)?,
                None => demo_keys(&settings.lake)?,
            };
            let audit_key = audit_key_or_demo(&settings)?;
            let signer = AuditKey::from_pem(&audit_key.to_pem())?;
            let audit = open_audit(&lake, &catalog, audit_key, &settings.audit).await?;
            let engine = Engine::open(lake.clone(), policy, keys, settings.engine.clone()).await?;
            let mut event = cli_event("release", "ReleaseCreate", &who);
            event.policy_version = engine.policy().version().to_string();
            event.datasets = format!("releases.{name}");
            let started = Instant::now();
            let request = releases::CreateRequest {
                name: name.clone(),
                tables,
                suppress,
            };
            let bar = ProgressBar::new_spinner();
            bar.set_message(format!(
                "making release {name}: querying, checking, writing"
            ));
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let made = releases::create(&engine, &who, &request, &signer).await;
            bar.finish_and_clear();
            event.duration_us = Some(started.elapsed().as_micros() as u64);
            let manifest = match made {
                Ok(m) => m,
                Err(e) => {
                    event.outcome = match e {
                        lakegate_engine::EngineError::PermissionDenied(_) => "refused",
                        _ => "failed",
                    }
                    .into();
                    event.reason = e.to_string();
                    audit.record(event).await?;
                    audit.checkpoint().await?;
                    return Err(e.into());
                }
            };
            let rows: u64 = manifest.tables.iter().map(|t| t.rows).sum();
            event.outcome = "completed".into();
            event.rows = Some(rows);
            event.reason = format!(
                "release {name} created pending approval: {}",
                manifest
                    .tables
                    .iter()
                    .map(|t| format!("{} {} rows ({})", t.name, t.rows, t.risk))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            audit.record(event).await?;
            audit.checkpoint().await?;
            println!(
                "release {name} created by {} for project {} (policy {}, key epoch {}), pending approval",
                manifest.created_by,
                manifest.project,
                manifest.policy_version,
                manifest.key_epoch.as_deref().unwrap_or("-")
            );
            for s in &manifest.sources {
                println!(
                    "  source {} version {}",
                    s.dataset,
                    s.version.map_or("-".to_string(), |v| v.to_string())
                );
            }
            for t in &manifest.tables {
                println!(
                    "  table {}: {} rows in {} file(s)",
                    t.name,
                    t.rows,
                    t.files.len()
                );
                println!("    risk: {}", t.risk);
            }
            Ok(())
        }
        ReleaseCmd::Approve {
            name,
            principal,
            serve,
        } => {
            let settings = serve.resolve("./demo-lake")?;
            let lake = existing_lake(&settings.lake).await?;
            let catalog = Catalog::load(&lake).await?;
            let who = acting_principal(&settings, &principal).await?;
            let audit_key = audit_key_or_demo(&settings)?;
            let signer = AuditKey::from_pem(&audit_key.to_pem())?;
            let audit = open_audit(&lake, &catalog, audit_key, &settings.audit).await?;
            let mut event = cli_event("release", "ReleaseApprove", &who);
            event.datasets = format!("releases.{name}");
            let result = releases::approve(&lake, &name, &who, &signer).await;
            match result {
                Ok(a) => {
                    event.outcome = "completed".into();
                    event.reason = format!(
                        "release {name} approved; manifest sha256:{}",
                        a.manifest_sha256
                    );
                    audit.record(event).await?;
                    audit.checkpoint().await?;
                    println!(
                        "release {name} approved by {} at {} (manifest sha256:{})",
                        a.approved_by, a.approved_at, a.manifest_sha256
                    );
                    Ok(())
                }
                Err(e) => {
                    event.outcome = "refused".into();
                    event.reason = e.to_string();
                    audit.record(event).await?;
                    audit.checkpoint().await?;
                    Err(e.into())
                }
            }
        }
        ReleaseCmd::Verify { name, serve } => {
            let settings = serve.resolve("./demo-lake")?;
            let lake = existing_lake(&settings.lake).await?;
            let key = release_public_key(&settings)?;
            let (stored, problems) = releases::verify(lake.store().as_ref(), &name, &key).await?;
            let files: usize = stored.manifest.tables.iter().map(|t| t.files.len()).sum();
            if problems.is_empty() {
                println!(
                    "release {name} intact: manifest and approval signatures hold, {files} file(s) match their SHA-256; {}",
                    stored.status()
                );
                Ok(())
            } else {
                for p in &problems {
                    println!("release {name}: {p}");
                }
                Err(format!(
                    "release {name} failed verification: {} of {files} file(s) changed or missing",
                    problems.len()
                )
                .into())
            }
        }
        ReleaseCmd::List { serve } => {
            let settings = serve.resolve("./demo-lake")?;
            let lake = existing_lake(&settings.lake).await?;
            let key = release_public_key(&settings)?;
            let store = lake.store();
            let names = releases::names(store.as_ref()).await?;
            if names.is_empty() {
                println!("no releases in {}", lake.url());
            }
            for name in names {
                match releases::load(store.as_ref(), &name, &key).await {
                    Ok(Some(s)) => {
                        let m = &s.manifest;
                        let tables = m
                            .tables
                            .iter()
                            .map(|t| format!("{} ({} rows)", t.name, t.rows))
                            .collect::<Vec<_>>()
                            .join(", ");
                        println!(
                            "{name}  {}  project {}  created by {} at {}  {tables}",
                            s.status(),
                            m.project,
                            m.created_by,
                            m.created_at
                        );
                    }
                    Ok(None) => println!("{name}  incomplete (no manifest)"),
                    Err(e) => println!("{name}  {e}"),
                }
            }
            Ok(())
        }
    }
}

async fn lifecycle_run(
    serve: ServeArgs,
    dry_run: bool,
    cold_after_days: Option<u32>,
    cold_prefix: String,
) -> Result<(), AnyError> {
    use lakegate_engine::lifecycle::{self, Step, Tiering};
    let settings = serve.resolve("./demo-lake")?;
    let lake = existing_lake(&settings.lake).await?;
    let key = release_public_key(&settings)?;
    let tiering = cold_after_days.map(|days| Tiering {
        cold_after_days: days,
        cold_prefix,
    });
    let steps = lifecycle::plan(&lake, &key, tiering.as_ref(), chrono::Utc::now()).await?;
    if steps.is_empty() {
        println!("nothing to do: no release past its retention, no raw file past the tier age");
        return Ok(());
    }
    if dry_run {
        println!("plan ({} step(s); --dry-run changes nothing):", steps.len());
        for s in &steps {
            println!("  {s}");
        }
        return Ok(());
    }
    let catalog = Catalog::load(&lake).await?;
    let audit = open_audit(
        &lake,
        &catalog,
        audit_key_or_demo(&settings)?,
        &settings.audit,
    )
    .await?;
    let (mut moved, mut moved_bytes) = (0u64, 0u64);
    for s in &steps {
        let decided = lifecycle::apply(&lake, &key, s).await?;
        match s {
            Step::DeleteRelease { name, .. } | Step::FinishDeletion { name, .. } if decided => {
                let mut e = AuditEvent::new("lifecycle", "ReleaseDelete");
                e.principal = "lifecycle".into();
                e.client = "cli".into();
                e.datasets = format!("releases.{name}");
                e.outcome = "completed".into();
                e.reason = s.to_string();
                audit.record(e).await?;
            }
            Step::MoveCold { bytes, .. } => {
                moved += 1;
                moved_bytes += bytes;
            }
            _ => {}
        }
        println!("{s}: done");
    }
    if moved > 0 {
        let mut e = AuditEvent::new("lifecycle", "MoveCold");
        e.principal = "lifecycle".into();
        e.client = "cli".into();
        e.outcome = "completed".into();
        e.reason = format!("{moved} raw file(s), {moved_bytes} bytes, moved to cold storage");
        audit.record(e).await?;
    }
    audit.checkpoint().await?;
    Ok(())
}

async fn hold(cmd: HoldCmd) -> Result<(), AnyError> {
    use lakegate_engine::lifecycle;
    let (serve, name, reason, principal, adding) = match cmd {
        HoldCmd::List { serve } => {
            let settings = serve.resolve("./demo-lake")?;
            let lake = existing_lake(&settings.lake).await?;
            let holds = lifecycle::holds(&lake).await?;
            if holds.is_empty() {
                println!("no legal holds");
            }
            for h in holds.values() {
                println!(
                    "{}  placed by {} at {}: {}",
                    h.name, h.placed_by, h.placed_at, h.reason
                );
            }
            return Ok(());
        }
        HoldCmd::Add {
            name,
            reason,
            principal,
            serve,
        } => (serve, name, reason, principal, true),
        HoldCmd::Remove {
            name,
            reason,
            principal,
            serve,
        } => (serve, name, reason, principal, false),
    };
    let settings = serve.resolve("./demo-lake")?;
    let lake = existing_lake(&settings.lake).await?;
    let catalog = Catalog::load(&lake).await?;
    let who = acting_principal(&settings, &principal).await?;
    let audit = open_audit(
        &lake,
        &catalog,
        audit_key_or_demo(&settings)?,
        &settings.audit,
    )
    .await?;
    let mut event = cli_event("hold", if adding { "HoldAdd" } else { "HoldRemove" }, &who);
    event.datasets = name.clone();
    let result = if adding {
        lifecycle::add_hold(&lake, &name, &reason, &who).await
    } else {
        lifecycle::remove_hold(&lake, &name, &who).await
    };
    match result {
        Ok(h) => {
            event.outcome = "completed".into();
            event.reason = reason.clone();
            audit.record(event).await?;
            audit.checkpoint().await?;
            if adding {
                println!("legal hold placed on {name} by {}: {reason}", h.placed_by);
            } else {
                println!(
                    "legal hold on {name} lifted by {} ({reason}); it was placed by {} at {}: {}",
                    who.name, h.placed_by, h.placed_at, h.reason
                );
            }
            Ok(())
        }
        Err(e) => {
            event.outcome = "refused".into();
            event.reason = e.to_string();
            audit.record(event).await?;
            audit.checkpoint().await?;
            Err(e.into())
        }
    }
}

/// The key release signatures are checked with: the audit key's public half.
fn release_public_key(
    settings: &Settings,
) -> Result<lakegate_engine::audit::VerifyingKey, AnyError> {
    Ok(audit_key_or_demo(settings)?.verifying_key())
}

async fn audit_zone_is_empty(lake: &Lake) -> Result<bool, AnyError> {
    use futures::StreamExt;
    let prefix = datafusion::object_store::path::Path::from("audit");
    let store = lake.store();
    let mut listing = store.list(Some(&prefix));
    Ok(listing.next().await.transpose()?.is_none())
}

fn write_secret(path: &std::path::Path, text: &str) -> Result<(), AnyError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn load_users(path: &std::path::Path) -> Result<UserStore, AnyError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(UserStore::from_toml(&path.display().to_string(), &text)?)
}

async fn serve(args: ServeArgs) -> Result<(), AnyError> {
    let settings = args.resolve("./demo-lake")?;
    let lake = open_lake(&settings.lake, settings.keyring.clone())?;
    let users = match &settings.users {
        Some(path) => load_users(path)?,
        None => {
            tracing::warn!("no --users file: nobody can authenticate");
            UserStore::default()
        }
    };
    let policy = match &settings.policy {
        Some(path) => Some((path.display().to_string(), read(path)?)),
        None => {
            tracing::warn!("no --policy file: every dataset is denied to everyone");
            None
        }
    };
    let keys = match &settings.keys {
        Some(path) => KeyRing::from_toml(&path.display().to_string(), &read(path)?)?,
        None => {
            tracing::warn!(
                "no --keys file: pseudonym and date-shift masks refuse every query that needs them"
            );
            KeyRing::default()
        }
    };
    // Nothing is served without an audit trail, and a trail needs its signing key.
    let audit_key = match &settings.audit.key {
        Some(path) => load_audit_key(path)?,
        None => {
            return Err("serve needs --audit-key: an Ed25519 PEM private key kept outside the \
                 lake, which signs the audit trail (make one with `lakegate audit keygen --out FILE`)"
                .into())
        }
    };
    run(settings, lake, users, policy, keys, audit_key, false).await
}

async fn run(
    settings: Settings,
    lake: Lake,
    users: UserStore,
    policy: Option<(String, String)>,
    keys: KeyRing,
    audit_key: AuditKey,
    demo: bool,
) -> Result<(), AnyError> {
    let catalog = lakegate_catalogs::Catalog::load(&lake).await?;
    let known: Vec<String> = catalog.datasets.iter().map(|d| d.name.clone()).collect();
    let model = match &settings.model {
        Some(path) => read(path)?,
        None => DEFAULT_MODEL.to_string(),
    };
    let (file, text) =
        policy.unwrap_or_else(|| ("(no policy)".into(), "version = \"deny-all\"\n".into()));
    let policy_text = match &settings.policy {
        Some(path) => PolicyText::File(path.clone()),
        None => PolicyText::Fixed {
            name: file.clone(),
            text: text.clone(),
        },
    };
    let release_signer = audit_key.verifying_key();
    let policy = PolicySet::load(&model, &file, &text, &catalog).await?;
    tracing::info!(version = policy.version(), "policy loaded");
    let audit = open_audit(&lake, &catalog, audit_key, &settings.audit).await?;
    let engine = Engine::open(lake.clone(), policy, keys, settings.engine.clone()).await?;
    engine.trust_release_signer(release_signer);
    // The policy file (if any) and the lake's catalog are watched: a change to either is
    // loaded, checked and swapped in, or logged and the last good pair kept.
    lakegate_flight_server::reload::spawn_watcher(
        engine.clone(),
        PolicySource {
            policy: policy_text,
            model: settings.model.clone(),
            lake: lake.clone(),
            audit: Some(audit.clone()),
        },
        std::time::Duration::from_secs(2),
    );
    if settings.tls.is_none() && !settings.listen.ip().is_loopback() {
        tracing::warn!(listen = %settings.listen, "serving plaintext gRPC off loopback: credentials and data cross the network unencrypted");
    }
    let mut identity = Identity::new(users);
    if let Some(path) = &settings.users {
        identity = identity.with_users_file(path.clone());
    }
    if let Some(jwt) = &settings.jwt {
        identity = identity.with_jwt(JwtVerifier::load(jwt.clone()).await?);
    }
    let identity = Arc::new(identity);
    if settings.users.is_some() {
        spawn_users_watcher(Arc::clone(&identity), std::time::Duration::from_secs(2));
    }
    let tls = match &settings.tls {
        Some(t) => Some(t.server_config()?),
        None => None,
    };
    let (listener, addr) = lakegate_flight_server::bind(settings.listen).await?;
    let service = lakegate_flight_server::flight_service(
        engine,
        identity,
        Arc::new(Limiter::new(settings.limits.clone())),
        settings.lifetimes.clone(),
        audit.clone(),
    );
    let scheme = if tls.is_some() { "grpc+tls" } else { "grpc" };
    println!(
        "lakegate: serving {} datasets from {} on {scheme}://{addr}",
        known.len(),
        lake.url()
    );
    if demo {
        print_snippet(scheme, addr);
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    lakegate_flight_server::serve(listener, service, tls, shutdown_signal()).await?;
    // Sign what was written, so a clean stop leaves no unsigned tail.
    audit.checkpoint().await?;
    eprintln!("lakegate: stopped");
    Ok(())
}

fn print_snippet(scheme: &str, addr: SocketAddr) {
    println!(
        r#"
Connect from Python (pip install adbc-driver-flightsql pyarrow) as a demo persona
(alice, bob, carol, dave, erin, frank, gina, mallory; password demo-NAME):

    import adbc_driver_flightsql.dbapi as flightsql
    conn = flightsql.connect("{scheme}://{addr}",
                             db_kwargs={{"username": "alice", "password": "demo-alice"}})
    cur = conn.cursor()
    cur.execute("SELECT site_id, count(*) AS n FROM clinical.patients GROUP BY site_id")
    print(cur.fetch_arrow_table())
"#
    );
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
