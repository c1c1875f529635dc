//! The listener: plain TCP or TLS (rustls), with a handshake timeout, certificates re-read when their
//! files change, and the client certificate's identity handed to every request of the connection.

use std::{
    io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{either::Either, sync::CancellationToken};
use tracing::{debug, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{config::TlsConfig, watched::Watched};

/// What a connection tells about its peer; every request of the connection carries it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client certificate: None without one, Err when it has no usable identity.
    pub peer: Option<Result<PeerCertificate, String>>,
}

/// A client certificate the handshake verified.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// The identity it gives (see [`certificate_identity`]).
    pub identity: String,
    /// When it stops being valid: calls on its connection are refused from then on.
    pub not_after: Option<SystemTime>,
}

/// One accepted connection.
pub struct Conn {
    io: Either<TcpStream, TlsStream<TcpStream>>,
    info: ConnInfo,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).finish()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(config: &TlsConfig) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("tls.cert_file {}: {e}", config.cert_file))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no certificate",
            config.cert_file
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", config.key_file))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if config.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&config.client_ca_file)
            .map_err(|e| format!("tls.client_ca_file {}: {e}", config.client_ca_file))?
        {
            let cert =
                cert.map_err(|e| format!("tls.client_ca_file {}: {e}", config.client_ca_file))?;
            roots
                .add(cert)
                .map_err(|e| format!("tls.client_ca_file {}: {e}", config.client_ca_file))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "tls.client_ca_file {}: no CA certificate",
                config.client_ca_file
            ));
        }
        // a missing certificate is refused per call with UNAUTHENTICATED and a reason, rather than by
        // a bare handshake failure; a certificate from another CA still fails the handshake
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("tls.client_ca_file {}: {e}", config.client_ca_file))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert_file/key_file: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(server)
}

/// A client certificate's identity and the end of its validity.
pub fn peer_certificate(der: &[u8]) -> Result<PeerCertificate, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    // one that ended before 1970 ended (the handshake refuses it anyway)
    let not_after = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(
        u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
    ));
    Ok(PeerCertificate {
        identity: certificate_identity(&cert)?,
        not_after,
    })
}

/// The identity of a client certificate: its one URI SAN (SPIFFE style), else its one DNS SAN.
pub fn certificate_identity(cert: &X509Certificate<'_>) -> Result<String, String> {
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate SAN extension is invalid: {e}"))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let dns: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    match (uris.as_slice(), dns.as_slice()) {
        ([uri], _) => Ok((*uri).to_owned()),
        ([], [name]) => Ok((*name).to_owned()),
        ([], []) => Err(
            "client certificate has no URI or DNS SAN (CN-only certificates are not accepted)"
                .into(),
        ),
        ([], many) => Err(format!(
            "client certificate has {} DNS SANs and no URI SAN; exactly one identity is required",
            many.len()
        )),
        (many, _) => Err(format!(
            "client certificate has {} URI SANs; exactly one is required",
            many.len()
        )),
    }
}

/// TLS settings, re-read when the certificate, key or CA files change.
pub struct Tls {
    config: Watched<Arc<ServerConfig>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate and key (and client CA); fails naming the file.
    pub fn new(config: &TlsConfig, reload_interval: Duration) -> Result<Self, String> {
        if config.key_file.is_empty() {
            return Err("tls.key_file is required with tls.cert_file".into());
        }
        let mut files = vec![
            PathBuf::from(&config.cert_file),
            PathBuf::from(&config.key_file),
        ];
        files.extend(super::config::path(&config.client_ca_file));
        let owned = config.clone();
        let watched = Watched::new("tls certificates", files, reload_interval, move || {
            server_config(&owned).map(Arc::new)
        })?;
        Ok(Tls {
            config: watched,
            handshake_timeout: config.handshake_timeout,
        })
    }
}

/// Accepts connections until `shutdown`, doing TLS handshakes (bounded by the timeout) off the accept loop.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(error) => {
                    // out of file descriptors and the like: pause instead of spinning
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                let conn = Conn {
                    io: Either::Left(tcp),
                    info: ConnInfo { peer: None },
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.config.get(false).as_ref().clone());
            let timeout = tls.handshake_timeout;
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|leaf| peer_certificate(leaf));
                        let conn = Conn {
                            io: Either::Right(stream),
                            info: ConnInfo { peer },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(error)) => debug!(%remote, %error, "TLS handshake failed"),
                    Err(_) => debug!(%remote, ?timeout, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
