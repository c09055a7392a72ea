//! Per-project secret keys for pseudonyms and date shifts, kept in a key file apart from the
//! policy and the lake; never logged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::masks::ProjectKey;
use crate::{EngineError, Result};

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    /// project -> 64 hex characters (32 bytes).
    projects: BTreeMap<String, String>,
}

/// The keys of all projects.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, ProjectKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("projects", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// Parse a key file (`[projects] NAME = "<64 hex>"`).
    pub fn from_toml(file: &str, text: &str) -> Result<Self> {
        let bad = |reason: String| EngineError::InvalidConfig(format!("{file}: {reason}"));
        let parsed: KeyFile = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        let mut keys = BTreeMap::new();
        for (project, hex) in parsed.projects {
            let bytes = decode_hex(&hex).filter(|b| b.len() == 32).ok_or_else(|| {
                bad(format!(
                    "the key of project '{project}' must be 64 hexadecimal characters"
                ))
            })?;
            let mut k = [0u8; 32];
            k.copy_from_slice(&bytes);
            keys.insert(project, ProjectKey(k));
        }
        Ok(Self { keys })
    }

    /// Fresh random keys for `projects` (the demo makes its key file this way).
    pub fn generate<'a>(projects: impl IntoIterator<Item = &'a str>) -> Self {
        use rand::RngCore;
        let keys = projects
            .into_iter()
            .map(|p| {
                let mut k = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                (p.to_string(), ProjectKey(k))
            })
            .collect();
        Self { keys }
    }

    pub fn to_toml(&self) -> String {
        let file = KeyFile {
            projects: self
                .keys
                .iter()
                .map(|(p, k)| (p.clone(), k.0.iter().map(|b| format!("{b:02x}")).collect()))
                .collect(),
        };
        toml::to_string(&file).unwrap_or_default()
    }

    pub fn get(&self, project: &str) -> Option<&ProjectKey> {
        self.keys.get(project)
    }

    /// A name for the key a project's pseudonyms and date shifts are made with now (16 hex
    /// characters of a hash of it): two outputs that share an epoch join on their pseudonyms.
    /// Reveals nothing of the key.
    pub fn epoch(&self, project: &str) -> Option<String> {
        use sha2::{Digest, Sha256};
        let key = self.keys.get(project)?;
        let mut h = Sha256::new();
        h.update(b"lakegate key epoch\0");
        h.update(key.0);
        Some(crate::audit::hex(&h.finalize()[..8]))
    }
}

pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_keys() {
        let ring = KeyRing::generate(["oncology", "cardiology"]);
        let again = KeyRing::from_toml("keys.toml", &ring.to_toml()).unwrap();
        assert_eq!(again.get("oncology"), ring.get("oncology"));
        assert_ne!(ring.get("oncology"), ring.get("cardiology"));
        assert!(!format!("{ring:?}").contains(&ring.to_toml()[20..40]));
        let err = KeyRing::from_toml("keys.toml", "[projects]\nx = \"abcd\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "keys.toml: the key of project 'x' must be 64 hexadecimal characters"
        );
    }
}
