//! Settings of TLS, authentication, policy and connection limits.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Whether a TLS client must present a certificate when a client CA is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Every connection needs a certificate from the client CA.
    #[default]
    Required,
    /// Connections without a certificate are accepted (they must then bring a token).
    Optional,
}

/// TLS on the gRPC listener; files are re-read when they change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server; with `key_file`, turns TLS on.
    pub cert_file: String,
    /// PEM private key of the server.
    pub key_file: String,
    /// PEM bundle of the CA(s) client certificates must chain to; turns mTLS on.
    pub client_ca_file: String,
    /// Whether a client certificate is required when `client_ca_file` is set.
    pub client_auth: ClientAuth,
    /// Connections that have not finished the TLS handshake by then are dropped.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            client_auth: ClientAuth::Required,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// True when the listener speaks TLS.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// JWT bearer tokens in the `authorization` metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Accepted algorithms, e.g. ["RS256", "ES256"]; the token header never widens this list.
    pub algorithms: Vec<String>,
    /// File holding the HMAC secret (HS256/384/512).
    pub hs_secret_file: String,
    /// PEM public keys (RSA, EC or Ed25519), tried for tokens without `kid`.
    pub public_key_files: Vec<String>,
    /// JWKS file; tokens with a `kid` are checked against its key of that id.
    pub jwks_file: String,
    /// Clock skew allowed on exp and nbf; whole seconds, at most 60 s.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Largest token accepted, in bytes.
    pub max_token_bytes: usize,
    /// Claim naming the caller's tenant when the policy does not; empty: tenant only from the policy.
    pub tenant_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            issuer: String::new(),
            audience: String::new(),
            algorithms: Vec::new(),
            hs_secret_file: String::new(),
            public_key_files: Vec::new(),
            jwks_file: String::new(),
            leeway: Duration::from_secs(30),
            max_token_bytes: 8192,
            tenant_claim: String::new(),
        }
    }
}

impl JwtConfig {
    /// True when any key source is configured.
    pub fn enabled(&self) -> bool {
        !self.hs_secret_file.is_empty()
            || !self.public_key_files.is_empty()
            || !self.jwks_file.is_empty()
    }
}

/// Authentication and authorization.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML policy file (principals, tenants, allow/deny lists); re-read when it changes.
    pub policy_file: String,
    /// How often key, certificate and policy files are checked for changes (0: on every use).
    #[serde(with = "humantime_serde")]
    pub reload_check_interval: Duration,
    /// How often the publisher registry is re-read from the store (other replicas' changes).
    #[serde(with = "humantime_serde")]
    pub registry_refresh_interval: Duration,
    /// Audit records per second of calls whose caller could not be identified (bursts of ten times
    /// as many); the rest are counted, not recorded. 0 records them all.
    pub unidentified_audit_rate: u32,
    /// Audit records per second of each identified principal's refused calls (bursts of ten times
    /// as many); the rest are counted, not recorded. 0 records them all.
    pub denied_audit_rate: u32,
    /// How long audit records are kept (0: for good); older ones are deleted as they age out.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    pub jwt: JwtConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            policy_file: String::new(),
            reload_check_interval: Duration::from_secs(1),
            registry_refresh_interval: Duration::from_secs(5),
            unidentified_audit_rate: 100,
            denied_audit_rate: 10,
            audit_retention: Duration::from_secs(30 * 24 * 3600),
            jwt: JwtConfig::default(),
        }
    }
}

/// Limits on connections and streams.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// Open Subscribe, Replay and PublishStream streams per principal, over all connections.
    pub max_streams_per_principal: usize,
    /// Publish, Request and Reply calls and PublishStream requests per second per principal; 0 = unlimited.
    pub publish_rate_per_principal: u32,
    /// Publish, Request and Reply calls and PublishStream requests a principal may make at once above the rate.
    pub publish_burst: u32,
    /// A Subscribe stream must send its open message within this time.
    #[serde(with = "humantime_serde")]
    pub stream_open_timeout: Duration,
    /// HTTP/2 keepalive ping interval.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A connection whose keepalive ping is not answered by then is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_concurrent_streams: 256,
            max_streams_per_principal: 1024,
            publish_rate_per_principal: 0,
            publish_burst: 1000,
            stream_open_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// A file path setting, or None when empty.
pub(crate) fn path(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}
