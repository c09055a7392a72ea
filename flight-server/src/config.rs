//! `lakegate serve` settings: flags, environment variables and one TOML file.
//!
//! Precedence: a flag (or its environment variable) wins over the config file, which wins over
//! the documented default. Relative paths in the file are relative to the file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use lakegate_engine::audit::{AlertKind, AlertRule};
use lakegate_engine::EngineConfig;
use serde::Deserialize;

use crate::identity::JwtSettings;
use crate::limits::LimitSettings;
use crate::tls::TlsSettings;
use crate::Lifetimes;

/// Settings of a Lakegate server. Every one is a flag, an environment variable and a key of the
/// `--config` TOML file.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML config file (keys as the flags, with `_` for `-`).
    #[arg(long, env = "LAKEGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "LAKEGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The lake: a local folder or an object_store URL (s3://, gs://, az://); credentials are
    /// read from the environment as object_store reads them [default: ./demo-lake].
    #[arg(long, env = "LAKEGATE_LAKE")]
    pub lake: Option<String>,
    /// Users file for Basic authentication (TOML, Argon2 hashes). Without one nobody can log in.
    #[arg(long, env = "LAKEGATE_USERS")]
    pub users: Option<PathBuf>,
    /// Policy file (TOML rules with their obligations; docs/policies.md). Without one every
    /// dataset is denied to everyone.
    #[arg(long, env = "LAKEGATE_POLICY")]
    pub policy: Option<PathBuf>,
    /// casbin model file [default: the built-in model, policies/demo/model.conf].
    #[arg(long, env = "LAKEGATE_MODEL")]
    pub model: Option<PathBuf>,
    /// Key file: per-project secrets for pseudonyms and date shifts (TOML `[projects]`).
    #[arg(long, env = "LAKEGATE_KEYS")]
    pub keys: Option<PathBuf>,
    /// Keyring file (TOML) of the master keys that wrap the data keys of datasets encrypted at
    /// rest, or `env:NAME` for the same text in environment variable NAME. Keep it outside the
    /// lake. [default: LAKE.keyring.toml beside a local lake, when that file exists].
    #[arg(long, env = "LAKEGATE_KEYRING")]
    pub keyring: Option<PathBuf>,
    /// Memory all queries may use together, in MiB; beyond it operators spill to disk
    /// [default: 2048].
    #[arg(long, env = "LAKEGATE_MEMORY_LIMIT_MB")]
    pub memory_limit_mb: Option<u64>,
    /// Longest SQL text accepted, in bytes [default: 65536].
    #[arg(long, env = "LAKEGATE_MAX_SQL_BYTES")]
    pub max_sql_bytes: Option<usize>,
    /// Roles (the `role` attribute) that may EXPLAIN and EXPLAIN ANALYZE, comma-separated
    /// [default: admin].
    #[arg(long, env = "LAKEGATE_EXPLAIN_ROLES", value_delimiter = ',')]
    pub explain_roles: Option<Vec<String>>,
    /// Lifetime of a session token, in seconds [default: 3600].
    #[arg(long, env = "LAKEGATE_SESSION_TTL_SECS")]
    pub session_ttl_secs: Option<u64>,
    /// Lifetime of a ticket between GetFlightInfo and DoGet, in seconds [default: 300].
    #[arg(long, env = "LAKEGATE_TICKET_TTL_SECS")]
    pub ticket_ttl_secs: Option<u64>,
    /// Serve plaintext gRPC on an address other than loopback (logs a warning) [default: false].
    #[arg(long, env = "LAKEGATE_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Ed25519 private key (PKCS#8 PEM) that signs the audit trail's checkpoints. Keep it
    /// outside the lake. `lakegate demo` creates one beside the lake when none is given.
    #[arg(long, env = "LAKEGATE_AUDIT_KEY")]
    pub audit_key: Option<PathBuf>,
    /// TLS certificate chain (PEM). With --tls-key, the server speaks only TLS 1.2+.
    #[arg(long, env = "LAKEGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "LAKEGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs client certificates: every client must present one (mutual TLS),
    /// and its subject CN names a user of the users file.
    #[arg(long, env = "LAKEGATE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// JWKS of the identity provider whose bearer JWTs are accepted: a file or an http(s) URL.
    #[arg(long, env = "LAKEGATE_JWKS")]
    pub jwks: Option<String>,
    /// Required `iss` of accepted JWTs.
    #[arg(long, env = "LAKEGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of accepted JWTs.
    #[arg(long, env = "LAKEGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Queries one principal may run at once [default: 8].
    #[arg(long, env = "LAKEGATE_MAX_CONCURRENT_QUERIES")]
    pub max_concurrent_queries: Option<u32>,
    /// Memory one principal's running queries may hold together, in MiB [default: 1024].
    #[arg(long, env = "LAKEGATE_PRINCIPAL_MEMORY_MB")]
    pub principal_memory_mb: Option<u64>,
    /// Longest a query may stream, in seconds [default: 900].
    #[arg(long, env = "LAKEGATE_QUERY_TIMEOUT_SECS")]
    pub query_timeout_secs: Option<u64>,
    /// RPCs per second one principal may make, sustained [default: 100].
    #[arg(long, env = "LAKEGATE_REQUESTS_PER_SECOND")]
    pub requests_per_second: Option<u32>,
    /// Handshakes one client address may start per minute, sustained [default: 120].
    #[arg(long, env = "LAKEGATE_HANDSHAKES_PER_MINUTE")]
    pub handshakes_per_minute: Option<u32>,
}

/// The `[jwt]` table of the config file: what the flags do not cover.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtFileConfig {
    leeway_secs: Option<u64>,
    subject_claim: Option<String>,
    /// Attribute -> claim; replaces the default mapping.
    claims: Option<std::collections::BTreeMap<String, String>>,
    refresh_secs: Option<u64>,
}

/// The `[audit]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFileConfig {
    key: Option<PathBuf>,
    checkpoint_every: Option<u64>,
    checkpoint_interval_secs: Option<u64>,
    alert_webhook: Option<String>,
    alerts: Option<Vec<AlertRule>>,
    retention_days: Option<u32>,
}

/// Audit trail settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub key: Option<PathBuf>,
    pub checkpoint_every: u64,
    pub checkpoint_interval_secs: u64,
    /// URL that receives each alert as a JSON POST, besides the log.
    pub alert_webhook: Option<String>,
    pub alerts: Vec<AlertRule>,
    /// Minimum time the trail is kept, stated in every signed checkpoint (default six years).
    pub retention_days: u32,
}

/// Alerts in force unless the config file sets `[audit] alerts` (an empty list turns them off).
pub fn default_alerts() -> Vec<AlertRule> {
    let rule = |name: &str, kind, threshold, window_minutes| AlertRule {
        name: name.into(),
        kind,
        threshold,
        window_minutes,
    };
    vec![
        rule("bulk-phi-read", AlertKind::PhiRows, 50_000, 10),
        rule("refusal-burst", AlertKind::Refusals, 10, 1),
        rule("auth-failure-burst", AlertKind::AuthFailures, 5, 5),
    ]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    lake: Option<String>,
    users: Option<PathBuf>,
    policy: Option<PathBuf>,
    model: Option<PathBuf>,
    keys: Option<PathBuf>,
    keyring: Option<PathBuf>,
    memory_limit_mb: Option<u64>,
    max_sql_bytes: Option<usize>,
    explain_roles: Option<Vec<String>>,
    session_ttl_secs: Option<u64>,
    ticket_ttl_secs: Option<u64>,
    allow_plaintext: Option<bool>,
    audit: Option<AuditFileConfig>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    jwks: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt: Option<JwtFileConfig>,
    limits: Option<LimitSettings>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub lake: String,
    pub users: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub keys: Option<PathBuf>,
    pub keyring: Option<PathBuf>,
    pub engine: EngineConfig,
    pub lifetimes: Lifetimes,
    pub allow_plaintext: bool,
    pub audit: AuditSettings,
    pub tls: Option<TlsSettings>,
    pub jwt: Option<JwtSettings>,
    pub limits: LimitSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {file}: {reason}")]
    File { file: String, reason: String },
    #[error(
        "refusing to serve plaintext gRPC on {0}: only loopback may go without TLS; \
         pass --allow-plaintext to override"
    )]
    PlaintextNotLoopback(SocketAddr),
    #[error("{0}")]
    Invalid(String),
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

impl ServeArgs {
    pub fn resolve(&self, default_lake: &str) -> Result<Settings, ConfigError> {
        let (file, base) = match &self.config {
            Some(path) => {
                let err = |reason: String| ConfigError::File {
                    file: path.display().to_string(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                let parsed: FileConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
                (
                    parsed,
                    path.parent().map(Path::to_path_buf).unwrap_or_default(),
                )
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let lake = match (&self.lake, file.lake) {
            (Some(l), _) => l.clone(),
            (None, Some(l)) if l.contains("://") => l,
            (None, Some(l)) => rel(PathBuf::from(l)).display().to_string(),
            (None, None) => default_lake.to_string(),
        };
        let tls = match (
            self.tls_cert.clone().or(file.tls_cert.map(&rel)),
            self.tls_key.clone().or(file.tls_key.map(&rel)),
        ) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert,
                key,
                client_ca: self.tls_client_ca.clone().or(file.tls_client_ca.map(&rel)),
            }),
            (None, None) if self.tls_client_ca.is_some() || file.tls_client_ca.is_some() => {
                return Err(ConfigError::Invalid(
                    "tls_client_ca (mutual TLS) needs tls_cert and tls_key".into(),
                ))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "TLS needs both tls_cert and tls_key".into(),
                ))
            }
        };
        let jwks = self.jwks.clone().or(file.jwks.map(|j| {
            if j.contains("://") {
                j
            } else {
                rel(PathBuf::from(j)).display().to_string()
            }
        }));
        let issuer = self.jwt_issuer.clone().or(file.jwt_issuer);
        let audience = self.jwt_audience.clone().or(file.jwt_audience);
        let jwt = match (jwks, issuer, audience) {
            (Some(jwks), Some(iss), Some(aud)) => {
                let mut j = JwtSettings::new(&jwks, &iss, &aud);
                let f = file.jwt.unwrap_or_default();
                j.leeway_secs = f.leeway_secs.unwrap_or(j.leeway_secs);
                j.subject_claim = f.subject_claim.unwrap_or(j.subject_claim);
                j.claims = f.claims.unwrap_or(j.claims);
                j.refresh_secs = f.refresh_secs.unwrap_or(j.refresh_secs).max(1);
                Some(j)
            }
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "JWT authentication needs jwks, jwt_issuer and jwt_audience together".into(),
                ))
            }
        };
        let mut limits = file.limits.unwrap_or_default();
        limits.max_concurrent_queries = self
            .max_concurrent_queries
            .or(limits.max_concurrent_queries);
        limits.memory_mb = self.principal_memory_mb.or(limits.memory_mb);
        limits.query_timeout_secs = self.query_timeout_secs.or(limits.query_timeout_secs);
        limits.requests_per_second = self.requests_per_second.or(limits.requests_per_second);
        limits.handshakes_per_minute = self.handshakes_per_minute.or(limits.handshakes_per_minute);
        limits.validate().map_err(ConfigError::Invalid)?;
        let defaults = EngineConfig::default();
        let lifetimes = Lifetimes::default();
        let mut settings = Settings {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("static address")),
            lake,
            users: self.users.clone().or(file.users.map(&rel)),
            policy: self.policy.clone().or(file.policy.map(&rel)),
            model: self.model.clone().or(file.model.map(&rel)),
            keys: self.keys.clone().or(file.keys.map(&rel)),
            keyring: self.keyring.clone().or(file.keyring.map(|k| {
                // `env:NAME` names an environment variable, not a path.
                if k.to_str().is_some_and(|k| k.starts_with("env:")) {
                    k
                } else {
                    rel(k)
                }
            })),
            engine: EngineConfig {
                memory_limit: self
                    .memory_limit_mb
                    .or(file.memory_limit_mb)
                    .map(|mb| (mb as usize) << 20)
                    .unwrap_or(defaults.memory_limit),
                max_sql_bytes: self
                    .max_sql_bytes
                    .or(file.max_sql_bytes)
                    .unwrap_or(defaults.max_sql_bytes),
                explain_roles: self
                    .explain_roles
                    .clone()
                    .or(file.explain_roles)
                    .unwrap_or_else(|| defaults.explain_roles.clone()),
                ..defaults
            },
            lifetimes: Lifetimes {
                session_secs: self
                    .session_ttl_secs
                    .or(file.session_ttl_secs)
                    .unwrap_or(lifetimes.session_secs),
                ticket_secs: self
                    .ticket_ttl_secs
                    .or(file.ticket_ttl_secs)
                    .unwrap_or(lifetimes.ticket_secs),
                ..lifetimes
            },
            allow_plaintext: self.allow_plaintext || file.allow_plaintext.unwrap_or(false),
            audit: {
                let a = file.audit.unwrap_or_default();
                AuditSettings {
                    key: self.audit_key.clone().or(a.key.map(&rel)),
                    checkpoint_every: a.checkpoint_every.unwrap_or(1000),
                    checkpoint_interval_secs: a.checkpoint_interval_secs.unwrap_or(60),
                    alert_webhook: a.alert_webhook,
                    alerts: a.alerts.unwrap_or_else(default_alerts),
                    retention_days: a
                        .retention_days
                        .unwrap_or(lakegate_catalogs::AUDIT_RETENTION_DAYS),
                }
            },
            tls,
            jwt,
            limits,
        };
        // Per principal, SQL text is capped at the server's cap unless set lower.
        let cap = settings.engine.max_sql_bytes;
        let per = settings.limits.max_sql_bytes.get_or_insert(cap);
        *per = (*per).min(cap);
        if settings.tls.is_none()
            && !settings.listen.ip().is_loopback()
            && !settings.allow_plaintext
        {
            return Err(ConfigError::PlaintextNotLoopback(settings.listen));
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_paths_are_relative_to_it() {
        let dir = std::env::temp_dir().join(format!("lakegate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lakegate.toml");
        std::fs::write(
            &file,
            "listen = '127.0.0.1:6000'\nlake = 'lake'\nusers = 'users.toml'\nmax_sql_bytes = 10\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            max_sql_bytes: Some(20),
            ..Default::default()
        };
        let s = args.resolve("./demo-lake").unwrap();
        assert_eq!(s.listen.port(), 6000);
        assert_eq!(s.lake, dir.join("lake").display().to_string());
        assert_eq!(s.users, Some(dir.join("users.toml")));
        assert_eq!(s.engine.max_sql_bytes, 20);
    }

    #[test]
    fn unknown_keys_and_plaintext_on_the_network_are_refused() {
        let dir = std::env::temp_dir().join(format!("lakegate-config2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "listne = '127.0.0.1:1'\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        assert!(args
            .resolve("x")
            .unwrap_err()
            .to_string()
            .contains("unknown field `listne`"));
        let args = ServeArgs {
            listen: Some("0.0.0.0:1".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches!(
            args.resolve("x"),
            Err(ConfigError::PlaintextNotLoopback(_))
        ));
    }

    #[test]
    fn tls_jwt_and_limits_resolve_and_half_settings_are_refused() {
        let dir = std::env::temp_dir().join(format!("lakegate-config3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lakegate.toml");
        std::fs::write(
            &file,
            "listen = '0.0.0.0:6000'\ntls_cert = 'c.pem'\ntls_key = 'k.pem'\n\
             jwks = 'jwks.json'\njwt_issuer = 'https://idp'\njwt_audience = 'lakegate'\n\
             [jwt]\nclaims = { role = 'groups' }\n\
             [limits]\nmemory_mb = 10\nmax_sql_bytes = 1000000\n\
             [limits.roles.analyst]\nmax_concurrent_queries = 2\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            query_timeout_secs: Some(5),
            ..Default::default()
        };
        let s = args
            .resolve("x")
            .expect("TLS makes a non-loopback address acceptable");
        assert_eq!(s.tls.as_ref().unwrap().cert, dir.join("c.pem"));
        let jwt = s.jwt.unwrap();
        assert_eq!(jwt.jwks, dir.join("jwks.json").display().to_string());
        assert_eq!(jwt.claims.get("role").map(String::as_str), Some("groups"));
        assert_eq!(s.limits.memory_mb, Some(10));
        assert_eq!(s.limits.query_timeout_secs, Some(5));
        assert_eq!(
            s.limits.max_sql_bytes,
            Some(s.engine.max_sql_bytes),
            "capped at the server's limit"
        );
        std::fs::write(&file, "tls_cert = 'c.pem'\n").unwrap();
        assert!(args.resolve("x").is_err());
        std::fs::write(&file, "jwks = 'j.json'\n").unwrap();
        assert!(args.resolve("x").is_err());
        std::fs::write(&file, "[limits]\nburst = 0\n").unwrap();
        assert!(args.resolve("x").is_err());
    }
}
