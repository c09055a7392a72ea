//! Signed, expiring, caller-bound tokens: session tokens, tickets and prepared-statement handles.
//!
//! A token is `base64url(json claims) "." base64url(HMAC-SHA256(key, json))`. The key is random
//! per server process, so nothing a client holds outlives a restart, and no client can forge or
//! alter one. Claims say what the token is for (`kind`), whom it belongs to (`sub`) and when it
//! expires (`exp`); the verifier checks all three before the body is trusted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was not accepted. Deliberately coarse: the client learns nothing about keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed or forged {0}")]
    Invalid(&'static str),
    #[error("expired {0}")]
    Expired(&'static str),
    #[error("this {0} belongs to another caller")]
    WrongCaller(&'static str),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    kind: String,
    sub: String,
    exp: u64,
    body: T,
}

/// Signs and verifies tokens with one secret key.
pub struct Signer {
    key: [u8; 32],
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Signer {
    /// A signer with a fresh random key.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self { key }
    }

    /// A signer with a given key (fuzzing and tests; servers use [`Signer::random`]).
    pub fn with_key(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    /// Sign `body` as a `kind` token for `sub`, valid for `ttl_secs`.
    pub fn sign<T: Serialize>(&self, kind: &str, sub: &str, ttl_secs: u64, body: &T) -> String {
        let env = Envelope {
            kind: kind.to_string(),
            sub: sub.to_string(),
            exp: now_secs() + ttl_secs,
            body,
        };
        let json = serde_json::to_vec(&env).expect("claims serialize");
        let mut mac = self.mac();
        mac.update(&json);
        let sig = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// Verify a token's signature, kind and expiry; return its subject and body.
    pub fn verify<T: DeserializeOwned>(
        &self,
        kind: &'static str,
        token: &[u8],
    ) -> Result<(String, T), TokenError> {
        let invalid = TokenError::Invalid(kind);
        let token = std::str::from_utf8(token).map_err(|_| invalid.clone())?;
        let (payload, sig) = token.split_once('.').ok_or(invalid.clone())?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| invalid.clone())?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| invalid.clone())?;
        let mut mac = self.mac();
        mac.update(&json);
        mac.verify_slice(&sig).map_err(|_| invalid.clone())?;
        let env: Envelope<T> = serde_json::from_slice(&json).map_err(|_| invalid.clone())?;
        if env.kind != kind {
            return Err(invalid);
        }
        if env.exp < now_secs() {
            return Err(TokenError::Expired(kind));
        }
        Ok((env.sub, env.body))
    }

    /// Verify and also require that the token belongs to `caller`.
    pub fn verify_for<T: DeserializeOwned>(
        &self,
        kind: &'static str,
        token: &[u8],
        caller: &str,
    ) -> Result<T, TokenError> {
        let (sub, body) = self.verify(kind, token)?;
        if sub != caller {
            return Err(TokenError::WrongCaller(kind));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tampering() {
        let s = Signer::random();
        let t = s.sign("ticket", "alice", 60, &"SELECT 1".to_string());
        assert_eq!(
            s.verify_for::<String>("ticket", t.as_bytes(), "alice")
                .unwrap(),
            "SELECT 1"
        );
        assert_eq!(
            s.verify_for::<String>("ticket", t.as_bytes(), "bob"),
            Err(TokenError::WrongCaller("ticket"))
        );
        assert_eq!(
            s.verify::<String>("handle", t.as_bytes()).unwrap_err(),
            TokenError::Invalid("handle")
        );
        // Flip one character of the payload.
        let mut bad = t.clone().into_bytes();
        bad[3] = if bad[3] == b'A' { b'B' } else { b'A' };
        assert!(matches!(
            s.verify::<String>("ticket", &bad),
            Err(TokenError::Invalid(_))
        ));
        // Another server's key.
        assert!(Signer::random()
            .verify::<String>("ticket", t.as_bytes())
            .is_err());
        // Expired.
        let old = s.sign("ticket", "alice", 0, &"x".to_string());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            s.verify::<String>("ticket", old.as_bytes()).unwrap_err(),
            TokenError::Expired("ticket")
        );
    }
}
