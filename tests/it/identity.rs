//! Real identities and transport: TLS and mutual TLS handshakes with certificates made here
//! (rcgen), bearer JWTs signed here with keys made here, revocation on the next RPC.

use std::time::{SystemTime, UNIX_EPOCH};

use arrow_flight::sql::client::FlightSqlServiceClient;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use lakegate_flight_server::identity::JwtSettings;
use lakegate_flight_server::tls::TlsSettings;
use lakegate_policies::UserStore;
use lakegate_tests::{ServerOptions, TestServer};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::common::{code_of, first_i64, login, sql, Client};

const CONSENTING: &str = "SELECT count(*) FROM clinical.patients";

/// A certificate authority made for one test.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A leaf certificate and its key (PEM) for `cn`, valid for localhost and 127.0.0.1.
    fn issue(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn tls_client(
    server: &TestServer,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(FlightSqlServiceClient::new(channel))
}

/// alice's answer over plaintext, the reference for the TLS runs.
async fn alice_count() -> i64 {
    let plain = TestServer::start().await;
    let mut alice = login(&plain, "alice").await;
    first_i64(&sql(&mut alice, CONSENTING).await.unwrap())
}

#[tokio::test]
async fn tls_serves_only_tls_and_mutual_tls_maps_the_certificate_to_a_principal() {
    let expected = alice_count().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Lakegate test CA");
    let (cert, key) = ca.issue("localhost");
    let tls = TlsSettings {
        cert: write(dir.path(), "server.pem", &cert),
        key: write(dir.path(), "server.key", &key),
        client_ca: None,
    };
    let server = TestServer::start_with(ServerOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .await;
    // TLS with a password login gives alice her view.
    let mut c = tls_client(&server, &ca.pem(), None).await.unwrap();
    c.handshake("alice", "demo-alice").await.unwrap();
    assert_eq!(first_i64(&sql(&mut c, CONSENTING).await.unwrap()), expected);
    // A plaintext client gets nowhere; nor does a client that trusts another CA.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut p = FlightSqlServiceClient::new(channel);
        assert!(p.handshake("alice", "demo-alice").await.is_err());
    }
    let rogue = Ca::new("Rogue CA");
    match tls_client(&server, &rogue.pem(), None).await {
        Err(_) => {}
        Ok(mut c) => assert!(c.handshake("alice", "demo-alice").await.is_err()),
    }

    // Mutual TLS: the client certificate's CN names the principal.
    let mtls = TestServer::start_with(ServerOptions {
        tls: Some(TlsSettings {
            client_ca: Some(write(dir.path(), "client-ca.pem", &ca.pem())),
            ..tls
        }),
        ..Default::default()
    })
    .await;
    let alice_cert = ca.issue("alice");
    let mut c = tls_client(&mtls, &ca.pem(), Some(&alice_cert))
        .await
        .unwrap();
    // No password, no token: the certificate alone identifies alice.
    assert_eq!(first_i64(&sql(&mut c, CONSENTING).await.unwrap()), expected);
    // A handshake without Basic credentials returns a session token for the certificate's user.
    c.handshake("alice", "demo-alice").await.unwrap();
    assert_eq!(first_i64(&sql(&mut c, CONSENTING).await.unwrap()), expected);
    // Another user's password over alice's certificate is refused (rule: mtls-binding).
    let mut c = tls_client(&mtls, &ca.pem(), Some(&alice_cert))
        .await
        .unwrap();
    let err = c.handshake("bob", "demo-bob").await.unwrap_err();
    assert!(err.to_string().contains("mtls-binding"), "{err}");
    // No client certificate, or one from another CA: the TLS handshake fails.
    for identity in [None, Some(rogue.issue("alice"))] {
        match tls_client(&mtls, &ca.pem(), identity.as_ref()).await {
            Err(_) => {}
            Ok(mut c) => assert!(sql(&mut c, CONSENTING).await.is_err()),
        }
    }
    // A certificate for a name that is no user is refused.
    let stranger = ca.issue("stranger");
    let mut c = tls_client(&mtls, &ca.pem(), Some(&stranger)).await.unwrap();
    let err = sql(&mut c, CONSENTING).await.unwrap_err();
    assert_eq!(code_of(&err), "Unauthenticated");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An identity provider made for one test: an RSA and a P-256 key in a JWKS file.
struct Idp {
    rsa: EncodingKey,
    ec: EncodingKey,
    _dir: tempfile::TempDir,
    settings: JwtSettings,
}

const ISSUER: &str = "https://idp.hospital.test";
const AUDIENCE: &str = "lakegate";

/// The identity provider's RSA signing key: a fixed test key (`tests/fixtures/idp-rsa.pem`,
/// made with `openssl genrsa -traditional 2048`, as is `unpublished-rsa.pem`, a key no JWKS
/// names) and its public JWK, so the tests need no RSA key generator of their own.
fn rsa_key() -> (EncodingKey, serde_json::Value) {
    let pem = include_bytes!("../fixtures/idp-rsa.pem");
    let jwk = serde_json::from_str(include_str!("../fixtures/idp-rsa.jwk.json")).unwrap();
    (EncodingKey::from_rsa_pem(pem).unwrap(), jwk)
}

impl Idp {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (rsa, mut rsa_jwk) = rsa_key();
        rsa_jwk["kid"] = "rsa-1".into();
        let ec_key = KeyPair::generate().unwrap();
        let point = ec_key.public_key_raw();
        let ec_jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        let jwks = serde_json::json!({ "keys": [rsa_jwk, ec_jwk] });
        let path = write(dir.path(), "jwks.json", &jwks.to_string());
        Self {
            rsa,
            ec: EncodingKey::from_ec_der(&ec_key.serialize_der()),
            settings: JwtSettings::new(path.to_str().unwrap(), ISSUER, AUDIENCE),
            _dir: dir,
        }
    }

    fn claims(sub: &str) -> serde_json::Value {
        serde_json::json!({
            "sub": sub, "iss": ISSUER, "aud": AUDIENCE,
            "exp": now() + 600, "nbf": now() - 5, "iat": now(),
            "role": "data_scientist", "project": "oncology",
            "purpose": "model_training", "environment": "sandbox",
        })
    }

    fn rs256(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&h, claims, &self.rsa).unwrap()
    }

    fn es256(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("ec-1".into());
        jsonwebtoken::encode(&h, claims, &self.ec).unwrap()
    }
}

async fn with_token(server: &TestServer, token: &str) -> Client {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = FlightSqlServiceClient::new(channel);
    c.set_token(token.to_string());
    c
}

#[tokio::test]
async fn bearer_jwts_are_verified_on_every_rpc() {
    let expected = alice_count().await;
    let idp = Idp::new();
    let users = {
        let mut u = lakegate_flight_server::demo::demo_users()
            .unwrap()
            .to_toml();
        u.push_str("\n[[user]]\nname = \"revoked-svc\"\ndisabled = true\n");
        UserStore::from_toml("users.toml", &u).unwrap()
    };
    let server = TestServer::start_with(ServerOptions {
        jwt: Some(idp.settings.clone()),
        users: Some((users, None)),
        ..Default::default()
    })
    .await;

    // A service account with alice's attributes gets alice's view, with either algorithm.
    for token in [
        idp.rs256(&Idp::claims("svc-oncology-training")),
        idp.es256(&Idp::claims("svc-oncology-training")),
    ] {
        let mut c = with_token(&server, &token).await;
        assert_eq!(first_i64(&sql(&mut c, CONSENTING).await.unwrap()), expected);
    }
    // Within the clock-skew leeway an expired token still passes.
    let mut claims = Idp::claims("svc");
    claims["exp"] = (now() - 5).into();
    let mut c = with_token(&server, &idp.rs256(&claims)).await;
    assert!(sql(&mut c, CONSENTING).await.is_ok());

    let refused = |claims: serde_json::Value, why: &'static str| (idp.rs256(&claims), why);
    let mut cases = Vec::new();
    let mut c = Idp::claims("svc");
    c["exp"] = (now() - 120).into();
    cases.push(refused(c, "expired"));
    let mut c = Idp::claims("svc");
    c["nbf"] = (now() + 300).into();
    cases.push(refused(c, "not valid yet"));
    let mut c = Idp::claims("svc");
    c["iss"] = "https://evil.test".into();
    cases.push(refused(c, "another issuer"));
    let mut c = Idp::claims("svc");
    c["aud"] = "another-service".into();
    cases.push(refused(c, "another audience"));
    let mut c = Idp::claims("svc");
    c.as_object_mut().unwrap().remove("exp");
    cases.push(refused(c, "missing exp"));
    cases.push(refused(Idp::claims("revoked-svc"), "disabled"));
    // Signed by a key the provider does not publish, under a published kid.
    let other =
        EncodingKey::from_rsa_pem(include_bytes!("../fixtures/unpublished-rsa.pem")).unwrap();
    let mut h = Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    cases.push((
        jsonwebtoken::encode(&h, &Idp::claims("svc"), &other).unwrap(),
        "signature",
    ));
    // An unknown kid.
    h.kid = Some("rsa-9".into());
    cases.push((
        jsonwebtoken::encode(&h, &Idp::claims("svc"), &other).unwrap(),
        "kid",
    ));
    // alg: none, unsigned.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(Idp::claims("svc").to_string())
    );
    cases.push((none, "accepted algorithm"));
    // HS256 with the public modulus as the secret (the classic key-confusion attack).
    let hs = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &Idp::claims("svc"),
        &EncodingKey::from_secret(b"the public key"),
    )
    .unwrap();
    cases.push((hs, "only RS256 and ES256"));
    // Tampered claims: mallory widens her role, keeping the provider's signature.
    let mut mallory = Idp::claims("mallory");
    mallory["role"] = "clinician".into();
    let genuine = idp.rs256(&mallory);
    let parts: Vec<&str> = genuine.split('.').collect();
    mallory["role"] = "compliance_auditor".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(mallory.to_string()),
        parts[2]
    );
    cases.push((forged, "signature"));

    for (token, why) in cases {
        let mut c = with_token(&server, &token).await;
        let err = sql(&mut c, CONSENTING).await.unwrap_err();
        assert_eq!(code_of(&err), "Unauthenticated", "{why}: {err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // Demo passwords still work beside JWTs.
    let mut bob = login(&server, "bob").await;
    assert!(sql(&mut bob, "SELECT count(*) FROM clinical.patients")
        .await
        .is_ok());
}

#[tokio::test]
async fn revoking_a_user_or_changing_attributes_applies_on_the_next_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let users = lakegate_flight_server::demo::demo_users().unwrap();
    let file = write(dir.path(), "users.toml", &users.to_toml());
    let server = TestServer::start_with(ServerOptions {
        users: Some((users.clone(), Some(file.clone()))),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let row_level = "SELECT patient_id FROM clinical.patients LIMIT 1";
    assert!(sql(&mut alice, row_level).await.is_ok());

    // alice becomes an analyst: row-level queries stop on her next call, same session.
    let text = users
        .to_toml()
        .replacen("role = \"data_scientist\"", "role = \"analyst\"", 1);
    std::fs::write(&file, &text).unwrap();
    assert!(server.identity.reload_users(true).unwrap());
    // (An analyst with alice's project and purpose matches no rule: the table is invisible.)
    let err = sql(&mut alice, row_level).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    // A broken file keeps the users in force.
    std::fs::write(&file, "[[user]]\nname = 'x'\npassword_hash = 'plain'\n").unwrap();
    assert!(server.identity.reload_users(true).is_err());
    assert!(
        sql(&mut alice, row_level).await.is_err(),
        "still the analyst"
    );

    // alice is disabled: her session token stops working at once.
    let at = text.find("name = \"alice\"").unwrap();
    let (head, tail) = text.split_at(at);
    let disabled = format!(
        "{head}{}",
        tail.replacen("disabled = false", "disabled = true", 1)
    );
    assert!(disabled.contains("disabled = true"));
    std::fs::write(&file, disabled).unwrap();
    server.identity.reload_users(true).unwrap();
    let err = sql(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "Unauthenticated");
    assert!(err.to_string().contains("disabled"), "{err}");
}

#[tokio::test]
async fn a_grant_that_expires_is_rechecked_when_the_stream_starts() {
    let until = chrono::Utc::now() + chrono::Duration::seconds(3);
    let policy = lakegate_flight_server::demo::DEMO_POLICY.replacen(
        "name = \"research-deidentified\"",
        &format!(
            "name = \"research-deidentified\"\nvalid_until = {}",
            until.format("%Y-%m-%dT%H:%M:%SZ")
        ),
        1,
    );
    assert!(policy.contains("valid_until"));
    let server = TestServer::start_with(ServerOptions {
        policy: Some(policy),
        ..Default::default()
    })
    .await;
    let mut alice = login(&server, "alice").await;
    let info = alice
        .execute("SELECT patient_id FROM clinical.patients".to_string(), None)
        .await
        .expect("the grant is valid now");
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let wait = (until - chrono::Utc::now()).num_milliseconds().max(0) as u64 + 1200;
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    // The ticket was issued under the grant; the stream starts after it ended: refused.
    let err = match alice.do_get(ticket).await {
        Err(e) => e,
        Ok(stream) => {
            use futures::TryStreamExt;
            stream
                .try_collect::<Vec<_>>()
                .await
                .expect_err("the stream must not start after the grant ended")
        }
    };
    assert!(err.to_string().contains("not found"), "{err}");
    assert!(sql(&mut alice, "SELECT count(*) FROM clinical.patients")
        .await
        .is_err());
}
