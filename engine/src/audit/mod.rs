//! The audit trail: every access decision, hash-chained in immutable segments in the lake's
//! audit zone, with checkpoints signed by an Ed25519 key that is kept outside the lake.
//!
//! Layout inside the lake (all through `object_store`, so a local disk, S3, GCS or Azure):
//!
//! - `audit/events/<first seq, 20 digits>.jsonl`: a segment, one JSON event per line, written
//!   once with a create-only put and never rewritten. Events that arrive together are written
//!   as one segment (group commit), so a busy server does not pay one write per event.
//! - `audit/checkpoints/<number, 20 digits>.json`: "the first N events end in hash H", signed.
//!   Each checkpoint also holds the digest of the one before, so the checkpoints form a chain
//!   of their own (like CloudTrail's digest files).
//!
//! Each event carries `prev_hash` and `hash = SHA-256(event serialized with hash = "")`, so
//! editing, deleting, inserting or reordering any event breaks the chain at that position;
//! rewriting the whole chain consistently is caught by the signatures, which only the holder
//! of the private key can produce. [`verify_trail`] checks all of it.
//!
//! Events never hold a literal from a query or a data value: SQL is recorded as a fingerprint
//! with literals removed ([`fingerprint`]), refusals by the rule that refused.

mod alerts;
mod fingerprint;
mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signer as _, SigningKey};
use futures::TryStreamExt;
use lakegate_catalogs::AUDIT_EVENTS_PREFIX;
use lakegate_policies::Principal;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub use alerts::{AlertKind, AlertRule, AlertSink};
pub use fingerprint::fingerprint;
pub use verify::{verify_trail, VerifyReport};

/// Where signed checkpoints live inside the lake.
pub const CHECKPOINTS_PREFIX: &str = "audit/checkpoints/";
/// The `prev_hash` of the first event and the head of an empty trail.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Everything that can go wrong writing or checking the trail.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The trail cannot be written: queries must be refused (fail closed).
    #[error("the audit trail cannot be written: {0}")]
    Unavailable(String),
    /// The trail is not intact. `position` names the first bad event, segment or checkpoint.
    #[error("audit trail broken at {position}: {reason}")]
    Broken { position: String, reason: String },
    #[error("audit signing key: {0}")]
    Key(String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

/// One audit event. Every field is a plain string or integer so that the trail reads as the
/// governed dataset `audit.events` with a fixed schema, and hashes the same after a round trip.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Position in the trail, from 0, without gaps.
    pub seq: u64,
    /// UTC, RFC 3339 with microseconds.
    pub time: String,
    /// `auth`, `plan`, `prepare`, `query`, `query_end`, `metadata`, `update`, `alert`.
    pub kind: String,
    /// Ties a query's decision to its completion.
    pub query_id: String,
    pub principal: String,
    /// The principal's attributes as the identity source gave them, `key=value, ...`.
    pub attributes: String,
    pub purpose: String,
    /// The client's network address.
    pub client: String,
    /// The RPC or command, e.g. `DoGet`, `GetFlightInfo(CommandGetTables)`.
    pub action: String,
    /// Datasets the request touched, comma-separated.
    pub datasets: String,
    /// Columns the request read, `dataset.column`, comma-separated.
    pub columns: String,
    pub policy_version: String,
    /// The rules applied: decisions, row filters, masks, thresholds; `; `-separated.
    pub rules: String,
    /// The SQL with every literal replaced by `?`.
    pub fingerprint: String,
    pub fingerprint_sha256: String,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
    pub duration_us: Option<u64>,
    pub groups_suppressed: Option<u64>,
    /// `allowed`, `refused`, `failed`, `completed`, `cancelled`, `raised`.
    pub outcome: String,
    /// Why: the refusing rule, an error class, an alert's explanation. Never a data value.
    pub reason: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEvent {
    /// A new event of `kind` for `action`, stamped now.
    pub fn new(kind: &str, action: &str) -> Self {
        Self {
            time: now_rfc3339(),
            kind: kind.into(),
            action: action.into(),
            ..Default::default()
        }
    }

    /// Fill in who asked: the principal's name, attributes and purpose of use.
    pub fn by(mut self, principal: &Principal) -> Self {
        self.principal = principal.name.clone();
        self.attributes = principal
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.purpose = principal.attribute("purpose").unwrap_or("").to_string();
        self
    }

    /// The hash this event must carry, given its content and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).expect("events serialize");
        hex(&Sha256::digest(&bytes))
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A signed statement that the first `events` events of the trail end in `head_hash`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// From 0, without gaps.
    pub number: u64,
    /// How many events the checkpoint covers.
    pub events: u64,
    pub head_hash: String,
    pub time: String,
    /// SHA-256 of the previous checkpoint's file ([`GENESIS_HASH`] for the first).
    pub previous: String,
    /// The signer's public key (hex). Verification trusts only a key given to it, never this.
    pub key: String,
    /// How long the trail must be kept, as configured when this checkpoint was signed.
    pub retention_days: u32,
    /// Ed25519 over this checkpoint serialized with `signature = ""` (hex).
    pub signature: String,
}

impl Checkpoint {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = String::new();
        serde_json::to_vec(&unsigned).expect("checkpoints serialize")
    }

    fn file_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("checkpoints serialize")
    }
}

/// The Ed25519 key that signs checkpoints. Keep it outside the lake: whoever can write the
/// lake must not be able to sign.
pub struct AuditKey(SigningKey);

impl AuditKey {
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Read a PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519` writes one).
    pub fn from_pem(pem: &str) -> Result<Self, AuditError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| AuditError::Key(format!("not an Ed25519 PKCS#8 PEM private key: {e}")))
    }

    pub fn to_pem(&self) -> String {
        self.0
            .to_pkcs8_pem(Default::default())
            .expect("Ed25519 keys encode")
            .to_string()
    }

    /// The public half, as a PEM `PUBLIC KEY` for `lakegate audit verify --public-key`.
    pub fn public_pem(&self) -> String {
        self.0
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("Ed25519 keys encode")
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    /// An Ed25519 signature of `bytes` (hex): release manifests and approvals are signed with
    /// the audit key, so whoever can write the lake cannot forge either.
    pub fn sign_hex(&self, bytes: &[u8]) -> String {
        hex(&self.0.sign(bytes).to_bytes())
    }
}

/// Whether `signature` (hex) is `key`'s Ed25519 signature of `bytes`.
pub fn signature_holds(key: &VerifyingKey, bytes: &[u8], signature: &str) -> bool {
    let Some(raw) = crate::keys::decode_hex(signature.trim()) else {
        return false;
    };
    let Ok(raw) = <[u8; 64]>::try_from(raw.as_slice()) else {
        return false;
    };
    key.verify_strict(bytes, &ed25519_dalek::Signature::from_bytes(&raw))
        .is_ok()
}

/// Read a PEM public key (or, for convenience, the private key it belongs to).
pub fn public_key_from_pem(pem: &str) -> Result<VerifyingKey, AuditError> {
    if let Ok(k) = VerifyingKey::from_public_key_pem(pem) {
        return Ok(k);
    }
    AuditKey::from_pem(pem)
        .map(|k| k.verifying_key())
        .map_err(|_| AuditError::Key("not an Ed25519 PEM public or private key".into()))
}

/// How the trail is written.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Sign a checkpoint after this many new events...
    pub checkpoint_every: u64,
    /// ...or this long after the first unsigned one, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Most events written in one segment.
    pub max_segment_events: usize,
    /// Alert rules evaluated over every event written.
    pub alerts: Vec<AlertRule>,
    /// Columns whose labels start with `phi.` (`dataset.column`), for the PHI-volume alert.
    pub phi_columns: std::collections::HashSet<String>,
    /// Minimum time the trail is kept (stated in every checkpoint; Lakegate never deletes it).
    pub retention_days: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            max_segment_events: 512,
            alerts: Vec::new(),
            phi_columns: Default::default(),
            retention_days: lakegate_catalogs::AUDIT_RETENTION_DAYS,
        }
    }
}

enum Msg {
    Append {
        event: Box<AuditEvent>,
        done: Option<oneshot::Sender<Result<u64, AuditError>>>,
    },
    Checkpoint(oneshot::Sender<Result<(), AuditError>>),
    /// The catalog changed: the PHI-volume alert counts these columns from now on.
    PhiColumns(std::collections::HashSet<String>),
}

/// The writer's handle. Cheap to clone; one writer task owns the trail's head.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Msg>,
}

impl AuditLog {
    /// Open the trail in `store` (the lake's root), continue its chain, and start the writer.
    ///
    /// Refuses to start over a trail whose head cannot be read or whose checkpoints another
    /// key signed: the server never serves without a trail it can extend.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        key: AuditKey,
        config: AuditConfig,
        sink: Option<AlertSink>,
    ) -> Result<Self, AuditError> {
        let mut writer = Writer {
            alerts: alerts::Alerts::new(config.alerts.clone(), config.phi_columns.clone(), sink),
            store,
            key: key.0,
            config,
            next_seq: 0,
            head_hash: GENESIS_HASH.into(),
            last_segment: None,
            checkpoint_no: 0,
            checkpoint_digest: GENESIS_HASH.into(),
            last_checkpoint: None,
            signed_events: 0,
            unsigned_since: None,
            broken: false,
            pending: Vec::new(),
        };
        writer.refresh().await?;
        if writer.next_seq > writer.signed_events {
            writer.unsigned_since = Some(Instant::now());
        }
        match writer.last_checkpoint {
            Some(_) => {}
            None if writer.next_seq > 0 => {
                return Err(AuditError::Broken {
                    position: CHECKPOINTS_PREFIX.into(),
                    reason: format!(
                        "{} events but no signed checkpoint: the checkpoints were deleted",
                        writer.next_seq
                    ),
                })
            }
            // A new trail starts with a signed genesis checkpoint, so that deleting every
            // checkpoint later is itself evidence of tampering.
            None => writer.write_checkpoint().await?,
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer.run(rx));
        Ok(Self { tx })
    }

    /// Append `event` and wait until it is durably stored. Returns its sequence number.
    /// An error means the event is not in the trail: refuse whatever it was recording.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Append {
                event: Box::new(event),
                done: Some(done),
            })
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }

    /// Append `event` without waiting (completions recorded from a destructor).
    pub fn record_later(&self, event: AuditEvent) {
        let _ = self.tx.send(Msg::Append {
            event: Box::new(event),
            done: None,
        });
    }

    /// Count these columns (`dataset.column`, labelled `phi.*`) for the PHI-volume alert from
    /// the next event on: the catalog was reloaded with new labels.
    pub fn set_phi_columns(&self, columns: std::collections::HashSet<String>) {
        let _ = self.tx.send(Msg::PhiColumns(columns));
    }

    /// Write everything queued and sign a checkpoint over it now (shutdown, tests).
    pub async fn checkpoint(&self) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(done))
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }
}

pub(crate) fn segment_path(first_seq: u64) -> Path {
    Path::from(format!("{AUDIT_EVENTS_PREFIX}{first_seq:020}.jsonl"))
}

fn checkpoint_path(number: u64) -> Path {
    Path::from(format!("{CHECKPOINTS_PREFIX}{number:020}.json"))
}

/// Objects under `prefix`, sorted by name (names are zero-padded numbers).
pub(crate) async fn list_sorted(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
) -> Result<Vec<Path>, AuditError> {
    let prefix = Path::from(prefix.trim_end_matches('/'));
    let mut paths: Vec<Path> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    paths.sort();
    Ok(paths)
}

pub(crate) fn parse_segment(path: &Path, bytes: &[u8]) -> Result<Vec<AuditEvent>, AuditError> {
    let text = std::str::from_utf8(bytes).map_err(|_| AuditError::Broken {
        position: format!("segment {path}"),
        reason: "not UTF-8".into(),
    })?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| AuditError::Broken {
                position: format!("segment {path} line {}", i + 1),
                reason: format!("not an audit event: {e}"),
            })
        })
        .collect()
}

pub(crate) fn parse_checkpoint(path: &Path, bytes: &[u8]) -> Result<Checkpoint, AuditError> {
    serde_json::from_slice(bytes).map_err(|e| AuditError::Broken {
        position: format!("checkpoint {path}"),
        reason: format!("not a checkpoint: {e}"),
    })
}

/// The newest object under `prefix` after `offset` (all of them without one), by name.
async fn newest_after(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    offset: Option<&Path>,
) -> Result<Option<Path>, AuditError> {
    let prefix = Path::from(prefix.trim_end_matches('/'));
    let listing = match offset {
        Some(o) => store.list_with_offset(Some(&prefix), o),
        None => store.list(Some(&prefix)),
    };
    let paths: Vec<Path> = listing.map_ok(|m| m.location).try_collect().await?;
    Ok(paths.into_iter().max())
}

struct Writer {
    store: Arc<dyn ObjectStore>,
    key: SigningKey,
    config: AuditConfig,
    next_seq: u64,
    head_hash: String,
    /// The newest segment known; listings for newer ones start after it.
    last_segment: Option<Path>,
    checkpoint_no: u64,
    checkpoint_digest: String,
    last_checkpoint: Option<Path>,
    signed_events: u64,
    unsigned_since: Option<Instant>,
    /// A write failed in a way that leaves the head uncertain: re-read it before writing.
    broken: bool,
    /// Alert events raised by the last commit, written with the next.
    pending: Vec<AuditEvent>,
    alerts: alerts::Alerts,
}

type Waiter = Option<oneshot::Sender<Result<u64, AuditError>>>;

/// Attempts at a create-only put that another writer (a second server on the same lake) won.
const MAX_RACES: usize = 32;

/// A short, growing, jittered pause after a lost race, so that writers contending for the
/// trail's head (several servers on one lake; many test servers on one shared lake in CI) take
/// turns instead of colliding again at once.
async fn race_backoff(attempt: usize) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) % 4);
    let millis = (attempt as u64).min(8) * 2 + jitter;
    tokio::time::sleep(Duration::from_millis(millis)).await;
}

impl Writer {
    /// Catch up with segments and checkpoints written since we last looked (by another server
    /// on the same lake, or before a restart).
    async fn refresh(&mut self) -> Result<(), AuditError> {
        if let Some(path) =
            newest_after(&self.store, AUDIT_EVENTS_PREFIX, self.last_segment.as_ref()).await?
        {
            let bytes = self.store.get(&path).await?.bytes().await?;
            let events = parse_segment(&path, &bytes)?;
            let last = events.last().ok_or_else(|| AuditError::Broken {
                position: format!("segment {path}"),
                reason: "empty segment".into(),
            })?;
            if last.compute_hash() != last.hash {
                return Err(AuditError::Broken {
                    position: format!("seq {} (segment {path})", last.seq),
                    reason: "the newest event's hash does not match its content".into(),
                });
            }
            self.next_seq = last.seq + 1;
            self.head_hash = last.hash.clone();
            self.last_segment = Some(path);
        }
        if let Some(path) = newest_after(
            &self.store,
            CHECKPOINTS_PREFIX,
            self.last_checkpoint.as_ref(),
        )
        .await?
        {
            let bytes = self.store.get(&path).await?.bytes().await?;
            let cp = parse_checkpoint(&path, &bytes)?;
            if cp.key != hex(self.key.verifying_key().as_bytes()) {
                return Err(AuditError::Key(format!(
                    "checkpoint {} was signed by another key; run `lakegate audit verify` \
                     with the old public key, then rotate deliberately",
                    cp.number
                )));
            }
            self.checkpoint_no = cp.number + 1;
            self.checkpoint_digest = hex(&Sha256::digest(&bytes));
            self.signed_events = cp.events;
            self.last_checkpoint = Some(path);
        }
        Ok(())
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let first = if self.pending.is_empty() {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => Some(m),
                        None => break,
                    },
                    _ = tick.tick() => None,
                }
            } else {
                rx.try_recv().ok()
            };
            let mut batch: Vec<(AuditEvent, Waiter)> = std::mem::take(&mut self.pending)
                .into_iter()
                .map(|e| (e, None))
                .collect();
            let mut checkpoint_waiters = Vec::new();
            let mut next = first;
            while let Some(m) = next {
                match m {
                    Msg::Append { event, done } => batch.push((*event, done)),
                    Msg::Checkpoint(done) => checkpoint_waiters.push(done),
                    Msg::PhiColumns(columns) => self.alerts.set_phi_columns(columns),
                }
                if batch.len() >= self.config.max_segment_events {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.commit(batch).await;
            }
            let due = self.next_seq > self.signed_events
                && (self.next_seq - self.signed_events >= self.config.checkpoint_every
                    || self
                        .unsigned_since
                        .is_some_and(|t| t.elapsed() >= self.config.checkpoint_interval));
            if due || !checkpoint_waiters.is_empty() {
                let result = if self.pending.is_empty() || checkpoint_waiters.is_empty() {
                    self.write_checkpoint().await
                } else {
                    // Alerts raised by this commit belong under the requested checkpoint too.
                    let alerts = std::mem::take(&mut self.pending);
                    self.commit(alerts.into_iter().map(|e| (e, None)).collect())
                        .await;
                    self.write_checkpoint().await
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "audit checkpoint not written");
                }
                for w in checkpoint_waiters {
                    let _ = w.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(AuditError::Unavailable(e.to_string())),
                    });
                }
            }
        }
        // Every sender is gone: sign what was written, so a clean stop leaves no unsigned tail.
        if self.next_seq > self.signed_events {
            if let Err(e) = self.write_checkpoint().await {
                tracing::error!(error = %e, "final audit checkpoint not written");
            }
        }
    }

    /// Chain, write as one segment, and answer the waiters.
    async fn commit(&mut self, batch: Vec<(AuditEvent, Waiter)>) {
        let (mut events, waiters): (Vec<AuditEvent>, Vec<Waiter>) = batch.into_iter().unzip();
        let result = self.write_segment(&mut events).await;
        match result {
            Ok(()) => {
                self.unsigned_since.get_or_insert_with(Instant::now);
                for (e, w) in events.iter().zip(waiters) {
                    if let Some(w) = w {
                        let _ = w.send(Ok(e.seq));
                    }
                }
                for e in &events {
                    self.pending.extend(self.alerts.observe(e));
                }
            }
            Err(e) => {
                self.broken = true;
                let why = e.to_string();
                tracing::error!(error = %why, "audit segment not written");
                for w in waiters.into_iter().flatten() {
                    let _ = w.send(Err(AuditError::Unavailable(why.clone())));
                }
            }
        }
    }

    async fn write_segment(&mut self, events: &mut [AuditEvent]) -> Result<(), AuditError> {
        if self.broken {
            self.refresh().await?;
            self.broken = false;
        }
        for attempt in 0..MAX_RACES {
            let first_seq = self.next_seq;
            let mut prev = self.head_hash.clone();
            let mut lines = Vec::with_capacity(events.len() * 512);
            for (i, e) in events.iter_mut().enumerate() {
                e.seq = first_seq + i as u64;
                e.prev_hash = prev;
                e.hash = e.compute_hash();
                prev = e.hash.clone();
                serde_json::to_writer(&mut lines, &*e).expect("events serialize");
                lines.push(b'\n');
            }
            let path = segment_path(first_seq);
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(lines), opts)
                .await
            {
                Ok(_) => {
                    self.next_seq += events.len() as u64;
                    self.head_hash = prev;
                    self.last_segment = Some(path);
                    return Ok(());
                }
                // Another writer took this position: continue its chain and try again.
                Err(object_store::Error::AlreadyExists { .. }) => {
                    race_backoff(attempt).await;
                    self.refresh().await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(AuditError::Unavailable(
            "lost the race for the trail's head too many times".into(),
        ))
    }

    async fn write_checkpoint(&mut self) -> Result<(), AuditError> {
        for attempt in 0..MAX_RACES {
            if self.last_checkpoint.is_some() && self.next_seq <= self.signed_events {
                // Another writer's checkpoint already covers everything we wrote.
                self.unsigned_since = None;
                return Ok(());
            }
            match self.try_checkpoint().await {
                Err(AuditError::Store(object_store::Error::AlreadyExists { .. })) => {
                    race_backoff(attempt).await;
                    self.refresh().await?
                }
                other => return other,
            }
        }
        Err(AuditError::Unavailable(
            "lost the race for the next checkpoint too many times".into(),
        ))
    }

    async fn try_checkpoint(&mut self) -> Result<(), AuditError> {
        let mut cp = Checkpoint {
            number: self.checkpoint_no,
            events: self.next_seq,
            head_hash: self.head_hash.clone(),
            time: now_rfc3339(),
            previous: self.checkpoint_digest.clone(),
            key: hex(self.key.verifying_key().as_bytes()),
            retention_days: self.config.retention_days,
            signature: String::new(),
        };
        cp.signature = hex(&self.key.sign(&cp.signed_bytes()).to_bytes());
        let bytes = cp.file_bytes();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let path = checkpoint_path(cp.number);
        self.store
            .put_opts(&path, PutPayload::from(bytes.clone()), opts)
            .await?;
        self.last_checkpoint = Some(path);
        self.checkpoint_no += 1;
        self.checkpoint_digest = hex(&Sha256::digest(&bytes));
        self.signed_events = cp.events;
        self.unsigned_since = None;
        Ok(())
    }
}

/// Attributes as a map, for tests and tools reading events back.
pub fn parse_attributes(s: &str) -> BTreeMap<String, String> {
    s.split(", ")
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests;
