//! Who is calling: the local users file, bearer JWTs from an identity provider, and client
//! certificates under mutual TLS. Attributes come only from these sources, never from the client.
//!
//! Every RPC is authenticated afresh: a session token names a user whose current entry is read
//! from the (hot-reloaded) users file, and a JWT is verified completely each time, so revoking a
//! user or changing their attributes takes effect on their next call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use lakegate_policies::{Principal, UserStore};
use serde_json::Value;
use x509_cert::der::Decode;

/// Why a credential was not accepted. Shown to the client: names the check, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("invalid bearer token: {0}")]
    Jwt(String),
    #[error("this user no longer exists or is disabled")]
    Revoked,
    #[error("client certificate: {0}")]
    Certificate(String),
    #[error("the identity provider's keys cannot be read right now")]
    KeysUnavailable,
}

/// How bearer JWTs are checked and turned into a principal.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// JWKS: a file path, or an `http(s)://` URL fetched at start and every `refresh_secs`.
    pub jwks: String,
    pub issuer: String,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// The claim that names the principal.
    pub subject_claim: String,
    /// Principal attribute -> the claim it is read from.
    pub claims: BTreeMap<String, String>,
    pub refresh_secs: u64,
}

impl JwtSettings {
    /// The default claim mapping: `sub` names the principal; `role`, `project`, `site`,
    /// `purpose`, `environment` give the attributes of the same name.
    pub fn new(jwks: &str, issuer: &str, audience: &str) -> Self {
        Self {
            jwks: jwks.into(),
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_secs: 30,
            subject_claim: "sub".into(),
            claims: ["role", "project", "site", "purpose", "environment"]
                .iter()
                .map(|c| (c.to_string(), c.to_string()))
                .collect(),
            refresh_secs: 300,
        }
    }
}

/// A usable verification key from the JWKS.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer JWTs: RS256 or ES256 only, issuer and audience required, `exp` and `nbf`
/// enforced with a small leeway, the key chosen by `kid`.
pub struct JwtVerifier {
    settings: JwtSettings,
    keys: RwLock<Arc<Vec<Key>>>,
    /// When the JWKS was last read, and the file's modification time then.
    fetched: tokio::sync::Mutex<(Instant, Option<SystemTime>)>,
    http: reqwest::Client,
}

/// Longest a JWKS download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// An unknown `kid` refetches the JWKS at most this often (key rotation, not a DoS lever).
const MIN_REFETCH: Duration = Duration::from_secs(30);

impl JwtVerifier {
    /// Read the JWKS once; a JWKS that cannot be read or holds no usable key is an error, so a
    /// misconfigured server does not start.
    pub async fn load(settings: JwtSettings) -> Result<Self, String> {
        if settings.issuer.is_empty() || settings.audience.is_empty() {
            return Err("JWT authentication needs both an issuer and an audience".into());
        }
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let v = Self {
            settings,
            keys: RwLock::new(Arc::new(Vec::new())),
            fetched: tokio::sync::Mutex::new((Instant::now(), None)),
            http,
        };
        let n = v.refresh().await?;
        tracing::info!(keys = n, jwks = %v.settings.jwks, "JWKS loaded");
        Ok(v)
    }

    fn is_url(&self) -> bool {
        self.settings.jwks.starts_with("https://") || self.settings.jwks.starts_with("http://")
    }

    /// Read the JWKS again and swap in its keys. Returns how many keys are usable.
    pub async fn refresh(&self) -> Result<usize, String> {
        let source = &self.settings.jwks;
        let (text, modified) = if self.is_url() {
            let response = self
                .http
                .get(source)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("JWKS {source}: {e}"))?;
            let text = response
                .text()
                .await
                .map_err(|e| format!("JWKS {source}: {e}"))?;
            (text, None)
        } else {
            let text = tokio::fs::read_to_string(source)
                .await
                .map_err(|e| format!("JWKS {source}: {e}"))?;
            let modified = std::fs::metadata(source).and_then(|m| m.modified()).ok();
            (text, modified)
        };
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| format!("JWKS {source}: {e}"))?;
        let keys = usable_keys(&set);
        if keys.is_empty() {
            return Err(format!(
                "JWKS {source} holds no RS256 or ES256 (P-256) signing key"
            ));
        }
        let n = keys.len();
        match self.keys.write() {
            Ok(mut k) => *k = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
        *self.fetched.lock().await = (Instant::now(), modified);
        Ok(n)
    }

    /// Refresh when the JWKS is due (every `refresh_secs`, or a file that changed), or when
    /// `urgent` (an unknown `kid`) and the last read is not too recent. A failed refresh keeps
    /// the keys in force and is logged.
    async fn maybe_refresh(&self, urgent: bool) {
        let (at, modified) = *self.fetched.lock().await;
        let age = at.elapsed();
        let changed_file = !self.is_url()
            && std::fs::metadata(&self.settings.jwks)
                .and_then(|m| m.modified())
                .ok()
                != modified;
        let due = age >= Duration::from_secs(self.settings.refresh_secs)
            || changed_file
            || (urgent && age >= MIN_REFETCH);
        if due {
            if let Err(e) = self.refresh().await {
                tracing::error!(error = %e, "JWKS refresh failed; keeping the keys in force");
                *self.fetched.lock().await = (Instant::now(), modified);
            }
        }
    }

    fn current_keys(&self) -> Arc<Vec<Key>> {
        match self.keys.read() {
            Ok(k) => Arc::clone(&k),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Verify `token` and map its claims to a principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let fail = |m: &str| AuthError::Jwt(m.to_string());
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| fail("not a well-formed JWT with an accepted algorithm"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(fail("only RS256 and ES256 tokens are accepted"));
        }
        self.maybe_refresh(false).await;
        let mut keys = self.current_keys();
        let mut chosen = pick(&keys, header.kid.as_deref(), header.alg);
        if chosen.is_none() && header.kid.is_some() {
            // Perhaps the provider rotated its keys.
            self.maybe_refresh(true).await;
            keys = self.current_keys();
            chosen = pick(&keys, header.kid.as_deref(), header.alg);
        }
        let key = chosen.ok_or_else(|| match &header.kid {
            Some(_) => fail("no key of the identity provider matches its kid and algorithm"),
            None => fail("it has no kid and the identity provider has several keys"),
        })?;
        let s = &self.settings;
        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[&s.issuer]);
        validation.set_audience(&[&s.audience]);
        validation.leeway = s.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind as K;
                    fail(match e.kind() {
                        K::ExpiredSignature => "expired",
                        K::ImmatureSignature => "not valid yet (nbf)",
                        K::InvalidIssuer => "issued by another issuer",
                        K::InvalidAudience => "meant for another audience",
                        K::InvalidSignature => "signature does not verify",
                        K::MissingRequiredClaim(_) => "missing exp, iss or aud",
                        K::InvalidAlgorithm => "algorithm does not match the key",
                        _ => "malformed",
                    })
                })?;
        principal_from_claims(s, &data.claims).map_err(AuthError::Jwt)
    }
}

fn usable_keys(set: &JwkSet) -> Vec<Key> {
    set.keys
        .iter()
        .filter(
            |j| !matches!(j.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature),
        )
        .filter_map(|j| {
            let alg = match (&j.algorithm, j.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => return None,
            };
            let key = DecodingKey::from_jwk(j).ok()?;
            Some(Key {
                kid: j.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

fn pick<'a>(keys: &'a [Key], kid: Option<&str>, alg: Algorithm) -> Option<&'a Key> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid) && k.alg == alg),
        None => {
            let mut same = keys.iter().filter(|k| k.alg == alg);
            match (same.next(), same.next()) {
                (Some(k), None) => Some(k),
                _ => None,
            }
        }
    }
}

/// The principal a verified token's claims describe.
fn principal_from_claims(
    s: &JwtSettings,
    claims: &serde_json::Map<String, Value>,
) -> Result<Principal, String> {
    let name = match claims.get(&s.subject_claim) {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        _ => {
            return Err(format!(
                "no '{}' claim naming the principal",
                s.subject_claim
            ))
        }
    };
    let mut attributes = BTreeMap::new();
    for (attribute, claim) in &s.claims {
        let value = match claims.get(claim) {
            None | Some(Value::Null) => continue,
            Some(Value::String(v)) => v.clone(),
            Some(Value::Number(v)) => v.to_string(),
            Some(Value::Bool(v)) => v.to_string(),
            Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
                Value::String(v) => v.clone(),
                _ => return Err(format!("claim '{claim}' is not a string")),
            },
            Some(_) => {
                return Err(format!(
                    "claim '{claim}' holds several values; attribute '{attribute}' takes one"
                ))
            }
        };
        attributes.insert(attribute.clone(), value);
    }
    Ok(Principal { name, attributes })
}

/// The common name of a DER certificate's subject: the principal a client certificate names.
pub fn certificate_subject(der: &[u8]) -> Result<String, AuthError> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|_| AuthError::Certificate("cannot be parsed".into()))?;
    const CN: x509_cert::der::oid::ObjectIdentifier =
        x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
    let value = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .ok_or_else(|| AuthError::Certificate("the subject has no common name (CN)".into()))?;
    use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
    use x509_cert::der::{Tag, Tagged};
    let cn = match value.value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(&value.value).map(|s| s.as_str().to_string()),
        Tag::PrintableString => {
            PrintableStringRef::try_from(&value.value).map(|s| s.as_str().to_string())
        }
        _ => return Err(AuthError::Certificate("the CN is not a string".into())),
    }
    .map_err(|_| AuthError::Certificate("the CN is not a string".into()))?;
    if cn.is_empty() {
        return Err(AuthError::Certificate("the CN is empty".into()));
    }
    Ok(cn)
}

/// The identity sources of one server.
pub struct Identity {
    users: RwLock<Arc<UserStore>>,
    users_file: Option<PathBuf>,
    users_stamp: std::sync::Mutex<Option<SystemTime>>,
    jwt: Option<JwtVerifier>,
}

impl Identity {
    /// Identities from a users file only (Basic authentication).
    pub fn new(users: UserStore) -> Self {
        Self {
            users: RwLock::new(Arc::new(users)),
            users_file: None,
            users_stamp: std::sync::Mutex::new(None),
            jwt: None,
        }
    }

    /// Re-read `file` when it changes ([`Identity::reload_users`]).
    pub fn with_users_file(mut self, file: PathBuf) -> Self {
        *self.users_stamp.get_mut().expect("fresh mutex") =
            std::fs::metadata(&file).and_then(|m| m.modified()).ok();
        self.users_file = Some(file);
        self
    }

    pub fn with_jwt(mut self, jwt: JwtVerifier) -> Self {
        self.jwt = Some(jwt);
        self
    }

    pub fn accepts_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    pub fn users(&self) -> Arc<UserStore> {
        match self.users.read() {
            Ok(u) => Arc::clone(&u),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-read the users file if it changed (or `force`). A file that does not parse keeps the
    /// users in force and is reported.
    pub fn reload_users(&self, force: bool) -> Result<bool, String> {
        let Some(file) = &self.users_file else {
            return Ok(false);
        };
        let stamp = std::fs::metadata(file).and_then(|m| m.modified()).ok();
        {
            let mut last = self.users_stamp.lock().map_err(|_| "poisoned")?;
            if !force && *last == stamp {
                return Ok(false);
            }
            *last = stamp;
        }
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let store =
            UserStore::from_toml(&file.display().to_string(), &text).map_err(|e| e.to_string())?;
        match self.users.write() {
            Ok(mut u) => *u = Arc::new(store),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(store),
        }
        Ok(true)
    }

    /// The principal a session token names, as the users file describes it now.
    pub fn session_principal(&self, name: &str) -> Result<Principal, AuthError> {
        self.users().principal(name).ok_or(AuthError::Revoked)
    }

    /// The principal of a bearer JWT. A subject disabled in the users file is refused, so an
    /// operator can revoke an identity-provider user at once.
    pub async fn jwt_principal(&self, token: &str) -> Result<Principal, AuthError> {
        let jwt = self
            .jwt
            .as_ref()
            .ok_or_else(|| AuthError::Jwt("this server does not accept JWTs".into()))?;
        let principal = jwt.verify(token).await?;
        if self.users().is_disabled(&principal.name) {
            return Err(AuthError::Revoked);
        }
        Ok(principal)
    }

    /// The principal a verified client certificate names: its subject CN must be a user of the
    /// users file (whose attributes apply).
    pub fn certificate_principal(&self, der: &[u8]) -> Result<Principal, AuthError> {
        let cn = certificate_subject(der)?;
        self.users().principal(&cn).ok_or_else(|| {
            AuthError::Certificate("its subject is not a known, enabled user".into())
        })
    }
}

/// Poll the users file every `every` (and reload on SIGHUP) so revocations apply at once.
pub fn spawn_users_watcher(identity: Arc<Identity>, every: Duration) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let forced = tokio::select! {
                _ = hangup => true,
                _ = tokio::time::sleep(every) => false,
            };
            match identity.reload_users(forced) {
                Ok(true) => tracing::info!("users file reloaded"),
                Ok(false) => {}
                Err(reason) => {
                    tracing::error!(%reason, "users file reload failed; keeping the users in force")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_map_to_attributes() {
        let s = JwtSettings::new("x", "iss", "aud");
        let claims: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"sub":"svc-train","role":["data_scientist"],"project":"oncology","site":7,"other":"x"}"#,
        )
        .unwrap();
        let p = principal_from_claims(&s, &claims).unwrap();
        assert_eq!(p.name, "svc-train");
        assert_eq!(p.attribute("role"), Some("data_scientist"));
        assert_eq!(p.attribute("site"), Some("7"));
        assert_eq!(p.attribute("other"), None);
        let several: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"sub":"x","role":["a","b"]}"#).unwrap();
        assert!(principal_from_claims(&s, &several)
            .unwrap_err()
            .contains("several values"));
        let nameless: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"role":"a"}"#).unwrap();
        assert!(principal_from_claims(&s, &nameless).is_err());
    }

    #[test]
    fn hmac_and_foreign_keys_are_never_usable() {
        let set: JwkSet = serde_json::from_str(
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"},
                        {"kty":"EC","crv":"P-384","x":"AAAA","y":"AAAA","kid":"p384"}]}"#,
        )
        .unwrap();
        assert!(usable_keys(&set).is_empty());
    }
}
