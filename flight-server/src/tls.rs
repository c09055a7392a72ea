//! Transport security: TLS 1.2+ (rustls through tonic) from PEM files, optionally requiring
//! client certificates signed by a given CA (mutual TLS).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Where the server's certificate, key and (for mutual TLS) the client CA are.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, every client must present a certificate this CA signed; its subject CN names
    /// the principal.
    pub client_ca: Option<PathBuf>,
}

fn read_pem(what: &str, path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("TLS {what} {}: {e}", path.display()))?;
    if !text.contains("-----BEGIN") {
        return Err(format!("TLS {what} {}: not a PEM file", path.display()));
    }
    Ok(text)
}

impl TlsSettings {
    /// The tonic TLS configuration. Files are read (and checked to be PEM) here, so a wrong
    /// path fails at start-up, not at the first handshake.
    pub fn server_config(&self) -> Result<ServerTlsConfig, String> {
        let cert = read_pem("certificate", &self.cert)?;
        let key = read_pem("key", &self.key)?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem("client CA", ca)?));
        }
        Ok(config)
    }
}
