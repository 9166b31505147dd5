//! TLS configurations (rustls) from PEM files: the agent's forward client and the collector's
//! listener.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};

/// Debian's bundle of trusted roots, used when no CA file is given.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// A client configuration trusting the certificates in `ca` (or the system roots).
pub fn client_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let path = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
    for cert in certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: a certificate rustls refuses as a trust anchor", path.display()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every reconnect is a full handshake. A receiver that checks client certificates without a
    // session id context (Fluentd's TLS input before 1.18, and with client_cert_auth) answers a
    // resumed session with a fatal internal_error, and would refuse every reconnect; outputs
    // reconnect rarely, so resumption saves nothing worth that.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A server configuration with the certificate chain and key from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certs(cert)?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not go together")?;
    Ok(Arc::new(config))
}
