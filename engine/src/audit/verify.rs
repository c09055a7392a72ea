//! Checking the whole trail: chain, sequence, segments and signed checkpoints.

use std::sync::Arc;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use lakegate_catalogs::AUDIT_EVENTS_PREFIX;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

use super::{
    hex, list_sorted, parse_checkpoint, parse_segment, segment_path, AuditError,
    CHECKPOINTS_PREFIX, GENESIS_HASH,
};

/// What a successful verification checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: u64,
    pub segments: u64,
    pub checkpoints: u64,
    /// Events covered by the last signed checkpoint.
    pub signed_events: u64,
    /// The retention the last checkpoint states.
    pub retention_days: u32,
    pub head_hash: String,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "audit trail intact: {} events in {} segments, hash chain unbroken",
            self.events, self.segments
        )?;
        if let (Some(a), Some(b)) = (&self.first_time, &self.last_time) {
            writeln!(f, "  events from {a} to {b}")?;
        }
        writeln!(
            f,
            "  {} signed checkpoints, chained, every signature valid; the last covers {} events",
            self.checkpoints, self.signed_events
        )?;
        if self.events > self.signed_events {
            writeln!(
                f,
                "  {} newest events not yet under a checkpoint (signed within the checkpoint interval)",
                self.events - self.signed_events
            )?;
        }
        writeln!(
            f,
            "  retention: {} days ({:.1} years), as the last checkpoint states",
            self.retention_days,
            f64::from(self.retention_days) / 365.25
        )?;
        write!(f, "  head hash {}", self.head_hash)
    }
}

fn broken(position: String, reason: impl Into<String>) -> AuditError {
    AuditError::Broken {
        position,
        reason: reason.into(),
    }
}

/// Verify the trail in `store` against the trusted public key `key`. The first problem found
/// is returned as [`AuditError::Broken`], naming its position.
pub async fn verify_trail(
    store: &Arc<dyn ObjectStore>,
    key: &VerifyingKey,
) -> Result<VerifyReport, AuditError> {
    // Checkpoints are listed first: on a live trail, every checkpoint listed then covers only
    // events already written when the segments are listed.
    let checkpoint_paths = list_sorted(store, CHECKPOINTS_PREFIX).await?;
    // 1. Segments and the hash chain.
    let segments = list_sorted(store, AUDIT_EVENTS_PREFIX).await?;
    let mut hashes: Vec<String> = Vec::new();
    let mut prev = GENESIS_HASH.to_string();
    let (mut first_time, mut last_time) = (None, None);
    for path in &segments {
        let expected_name = segment_path(hashes.len() as u64);
        if *path != expected_name {
            let at = hashes.len() as u64;
            let (seq, reason) = match path
                .filename()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(n) if n > at => (
                    at,
                    format!("events {at} to {} are missing (deleted)", n - 1),
                ),
                Some(n) => (
                    n,
                    format!("seq {n} appears twice (an event was inserted or segments reordered)"),
                ),
                None => (
                    at,
                    "an object in the audit zone that is not a segment".into(),
                ),
            };
            return Err(broken(format!("seq {seq} (segment {path})"), reason));
        }
        let bytes = store.get(path).await?.bytes().await?;
        let events = parse_segment(path, &bytes)?;
        if events.is_empty() {
            return Err(broken(
                format!("segment {path}"),
                "empty segment (truncated)",
            ));
        }
        for (line, e) in events.iter().enumerate() {
            let expected = hashes.len() as u64;
            let position = format!("seq {expected} (segment {path} line {})", line + 1);
            if e.seq != expected {
                return Err(broken(
                    position,
                    format!(
                        "found seq {} (events deleted, inserted or reordered)",
                        e.seq
                    ),
                ));
            }
            if e.prev_hash != prev {
                return Err(broken(
                    position,
                    "prev_hash does not match the event before (chain broken)",
                ));
            }
            if e.compute_hash() != e.hash {
                return Err(broken(
                    position,
                    "hash does not match the event's content (modified)",
                ));
            }
            prev = e.hash.clone();
            hashes.push(e.hash.clone());
            first_time.get_or_insert_with(|| e.time.clone());
            last_time = Some(e.time.clone());
        }
    }

    // 2. Checkpoints: each signed by the trusted key, chained, and agreeing with the events.
    let trusted = hex(key.as_bytes());
    if checkpoint_paths.is_empty() {
        return Err(broken(
            CHECKPOINTS_PREFIX.to_string(),
            "no signed checkpoint (every trail starts with one): checkpoints deleted",
        ));
    }
    let mut previous = GENESIS_HASH.to_string();
    let mut signed_events = 0;
    let mut retention_days = 0;
    for (n, path) in checkpoint_paths.iter().enumerate() {
        let position = format!("checkpoint {n} ({path})");
        let bytes = store.get(path).await?.bytes().await?;
        let cp = parse_checkpoint(path, &bytes)?;
        if cp.number != n as u64 {
            return Err(broken(
                position,
                format!("numbered {} (checkpoints deleted or reordered)", cp.number),
            ));
        }
        if cp.key != trusted {
            return Err(broken(
                position,
                "signed by a key other than the trusted one",
            ));
        }
        let signature = decode_signature(&cp.signature)
            .ok_or_else(|| broken(position.clone(), "malformed signature"))?;
        key.verify(&cp.signed_bytes(), &signature)
            .map_err(|_| broken(position.clone(), "signature invalid (checkpoint modified)"))?;
        if cp.previous != previous {
            return Err(broken(
                position,
                "does not follow the checkpoint before it (checkpoints replaced)",
            ));
        }
        if cp.events < signed_events {
            return Err(broken(position, "covers fewer events than the one before"));
        }
        if cp.events > hashes.len() as u64 {
            return Err(broken(
                format!("seq {}", hashes.len()),
                format!(
                    "checkpoint {n} signs {} events but the trail holds only {} (truncated)",
                    cp.events,
                    hashes.len()
                ),
            ));
        }
        let head = match cp.events {
            0 => GENESIS_HASH,
            k => hashes[k as usize - 1].as_str(),
        };
        if cp.head_hash != head {
            return Err(broken(
                format!("seq {}", cp.events.saturating_sub(1)),
                format!("differs from what checkpoint {n} signed (the chain was rewritten)"),
            ));
        }
        previous = hex(&Sha256::digest(&bytes));
        signed_events = cp.events;
        retention_days = cp.retention_days;
    }
    Ok(VerifyReport {
        events: hashes.len() as u64,
        segments: segments.len() as u64,
        checkpoints: checkpoint_paths.len() as u64,
        signed_events,
        retention_days,
        head_hash: prev,
        first_time,
        last_time,
    })
}

fn decode_signature(hex_sig: &str) -> Option<Signature> {
    if hex_sig.len() != 128 || !hex_sig.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 64];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex_sig[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Signature::from_bytes(&bytes))
}
