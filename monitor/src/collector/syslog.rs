//! The `syslog+tls://` sink: RFC 5424 messages over TLS (RFC 5425), octet-counted, to rsyslog,
//! syslog-ng or a SIEM's syslog receiver. Blocking: it runs on the sink's own thread.

use std::{io::Write as _, net::TcpStream, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;

use super::destination::{Destination, Item};
use crate::encode::syslog;

pub struct SyslogTls {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    hostname: Arc<str>,
}

impl SyslogTls {
    pub fn connect(
        host: &str,
        port: u16,
        ca: Option<&Path>,
        server_name: Option<&str>,
        hostname: &Arc<str>,
    ) -> anyhow::Result<Self> {
        let config = crate::tls::client_config(ca)?;
        let name =
            rustls_pki_types::ServerName::try_from(server_name.unwrap_or(host).to_string()).context("server name")?;
        let tcp = TcpStream::connect((host, port)).with_context(|| format!("connecting to {host}:{port}"))?;
        tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
        tcp.set_nodelay(true)?;
        let conn = rustls::ClientConnection::new(config, name)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        // Complete the handshake now, so a bad certificate is an error here, not a silent loss.
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).context("TLS handshake")?;
        }
        Ok(Self { stream, hostname: hostname.clone() })
    }
}

impl Destination for SyslogTls {
    fn deliver(&mut self, items: &[Item]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        for item in items {
            if let Item::Alert(alert) = item {
                out.extend_from_slice(&syslog::octet_counted(&syslog::message(alert, &self.hostname)));
            }
        }
        self.stream.write_all(&out)?;
        self.stream.flush()?;
        Ok(())
    }
}
