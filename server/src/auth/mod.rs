//! Service authentication and authorization.
//!
//! One tower layer identifies every call (client certificate and/or JWT bearer token) and puts the
//! [`Principal`] in the request extensions; grpc.health.v1 passes without credentials because the
//! kubelet probes without any. Handlers ask [`Auth::check`] before acting; denials and admin actions
//! go to the audit log (structured log lines plus a store table, readable through Admin).

pub mod config;
pub mod jwt;
pub mod policy;
pub mod tls;
mod watched;

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::SystemTime,
};

use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use http::HeaderMap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{AuthConfig, ClientAuth, ConnectionsConfig, JwtConfig, TlsConfig};
pub use policy::Action;
use policy::{Evaluator, Policy, Registry};
pub use tls::{ConnInfo, Tls};
use watched::Watched;

use crate::store::{AuditPruned, AuditRecord, EventStore};

pub use crate::bus::DEFAULT_TENANT;

/// Errors of authentication and authorization; each maps to one gRPC status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The caller is not identified.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's bearer token has expired: a call with a fresh one may succeed.
    #[error("{0}")]
    TokenExpired(String),
    /// The caller is identified but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// A per-principal limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's certificate identifies a principal, and its token another: refused (permission
    /// denied), and recorded as a refusal of the certificate's principal, in its tenant.
    #[error("{reason}")]
    SubjectMismatch {
        certified: Box<Principal>,
        reason: String,
    },
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Certificate identity or token subject; "anonymous" when auth is off.
    pub id: String,
    pub tenant: String,
    /// True when auth is off: every action is allowed.
    pub unrestricted: bool,
    /// When the bearer token that identified the caller stops being accepted; its streams end then.
    /// `None` without a token (a certificate's validity is checked at the start of each call: a
    /// stream opened before it expired goes on).
    pub expires: Option<SystemTime>,
}

impl Principal {
    /// The principal's key for per-principal limits: its id within its tenant.
    fn key(&self) -> String {
        format!("{}\u{0}{}", self.tenant, self.id)
    }

    /// Resolves when the caller's token stops being accepted; never for a caller without a token.
    pub fn token_expiry(&self) -> impl Future<Output = ()> + Send + 'static {
        let deadline = self.expires.and_then(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::Instant::now().checked_add(left)
        });
        async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        }
    }

    /// Has the caller's token stopped being accepted?
    pub fn token_has_expired(&self) -> bool {
        self.expires.is_some_and(|at| at <= SystemTime::now())
    }

    /// What ends a stream when the caller's token expires.
    pub fn token_expired(&self) -> AuthError {
        AuthError::TokenExpired(format!(
            "the token of {:?} has expired; open the stream again with a fresh token",
            self.id
        ))
    }
}

enum AuditMessage {
    Record(AuditRecord),
    Flush(oneshot::Sender<()>),
}

/// Authentication state shared by the layer and the handlers.
pub struct Auth {
    enabled: bool,
    client_cert_required: bool,
    jwt: Option<jwt::JwtVerifier>,
    policy: Option<Watched<Policy>>,
    registry: RwLock<Arc<Registry>>,
    /// Held from a refresh's read of the store to its swap: refreshes run one at a time, so an older
    /// read never replaces a newer one (a registry change applies at once on its replica).
    registry_refresh: tokio::sync::Mutex<()>,
    store: Arc<dyn EventStore>,
    audit: mpsc::Sender<AuditMessage>,
    publish_rate: Option<DefaultKeyedRateLimiter<String>>,
    /// Bounds the audit records of callers that could not be identified: anyone can make those.
    unidentified_audit: Option<DefaultDirectRateLimiter>,
    /// Such records not made since the last warning about them.
    unidentified_suppressed: std::sync::atomic::AtomicU64,
    /// Bounds the audit records of each identified principal's refusals: a caller with no grant at
    /// all can make those in a loop, each a row written beside every tenant's commits.
    denied_audit: Option<DefaultKeyedRateLimiter<String>>,
    /// Such records not made since the last warning about them.
    denied_suppressed: std::sync::atomic::AtomicU64,
    streams: Arc<Mutex<HashMap<String, usize>>>,
    max_streams_per_principal: usize,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// Counts a principal's open streams; dropping it closes one.
#[derive(Debug)]
pub struct StreamPermit {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = streams.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

impl Auth {
    /// True when TLS client certificates or JWT keys are configured.
    pub fn configured(tls: &TlsConfig, auth: &AuthConfig) -> bool {
        !tls.client_ca_file.is_empty() || auth.jwt.enabled()
    }

    /// Loads keys and policy and starts the audit writer and registry refresher; errors name the setting.
    pub async fn start(
        tls: &TlsConfig,
        config: &AuthConfig,
        connections: &ConnectionsConfig,
        store: Arc<dyn EventStore>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let enabled = Auth::configured(tls, config);
        if !enabled && !config.policy_file.is_empty() {
            return Err("auth.policy_file needs a way to identify callers: set tls.client_ca_file or auth.jwt keys".into());
        }
        let jwt = if config.jwt.enabled() {
            Some(jwt::JwtVerifier::new(
                &config.jwt,
                config.reload_check_interval,
            )?)
        } else {
            None
        };
        let policy = if enabled {
            let files: Vec<_> = config::path(&config.policy_file).into_iter().collect();
            let path = config::path(&config.policy_file);
            if path.is_none() {
                warn!(
                    "auth is on without auth.policy_file: only registered publishers may publish, nothing else is allowed"
                );
            }
            Some(Watched::new(
                "policy",
                files,
                config.reload_check_interval,
                move || match &path {
                    Some(path) => Policy::load(path),
                    None => Ok(Policy::default()),
                },
            )?)
        } else {
            None
        };
        let publish_rate = NonZeroU32::new(connections.publish_rate_per_principal).map(|rate| {
            let burst = NonZeroU32::new(connections.publish_burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let (audit, audit_rx) = mpsc::channel(10_000);
        let auth = Arc::new(Auth {
            enabled,
            client_cert_required: !tls.client_ca_file.is_empty()
                && tls.client_auth == ClientAuth::Required,
            jwt,
            policy,
            registry: RwLock::new(Arc::new(Registry::default())),
            registry_refresh: tokio::sync::Mutex::new(()),
            store: store.clone(),
            audit,
            publish_rate,
            unidentified_audit: NonZeroU32::new(config.unidentified_audit_rate).map(|rate| {
                let burst = NonZeroU32::new(rate.get().saturating_mul(10)).unwrap_or(rate);
                DefaultDirectRateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
            }),
            unidentified_suppressed: std::sync::atomic::AtomicU64::new(0),
            denied_audit: NonZeroU32::new(config.denied_audit_rate).map(|rate| {
                let burst = NonZeroU32::new(rate.get().saturating_mul(10)).unwrap_or(rate);
                DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            }),
            denied_suppressed: std::sync::atomic::AtomicU64::new(0),
            streams: Arc::new(Mutex::new(HashMap::new())),
            max_streams_per_principal: connections.max_streams_per_principal,
        });
        tokio::spawn(write_audit(store.clone(), audit_rx));
        if auth.publish_rate.is_some() || auth.denied_audit.is_some() {
            tokio::spawn(forget_rested_principals(auth.clone(), shutdown.clone()));
        }
        if !config.audit_retention.is_zero() {
            tokio::spawn(prune_audit(store, config.audit_retention, shutdown.clone()));
        }
        if enabled {
            if let Err(error) = auth.refresh_registry().await {
                warn!(%error, "could not read the publisher registry; retrying in the background");
            }
            tokio::spawn(refresh_registry(
                auth.clone(),
                config.registry_refresh_interval,
                shutdown,
            ));
            info!(
                mtls = !tls.client_ca_file.is_empty(),
                jwt = config.jwt.enabled(),
                policy = %config.policy_file,
                "authentication on"
            );
        }
        Ok(auth)
    }

    /// Re-reads the publisher registry from the store.
    pub async fn refresh_registry(&self) -> Result<(), String> {
        let _one_at_a_time = self.registry_refresh.lock().await;
        let publishers = self.store.publishers().await.map_err(|e| e.to_string())?;
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Registry::new(&publishers));
        Ok(())
    }

    /// Identifies the caller of a request from its connection and metadata.
    pub fn authenticate(
        &self,
        conn: Option<&ConnInfo>,
        headers: &HeaderMap,
    ) -> Result<Principal, AuthError> {
        if !self.enabled {
            return Ok(Principal {
                id: "anonymous".into(),
                tenant: DEFAULT_TENANT.into(),
                unrestricted: true,
                expires: None,
            });
        }
        let unauthenticated = |m: &str| AuthError::Unauthenticated(m.to_owned());
        let certificate = match conn.and_then(|c| c.peer.clone()) {
            // checked at every call, not only at the handshake: a connection outlives its
            // certificate for as long as keepalives hold it open
            Some(Ok(peer)) if peer.not_after.is_some_and(|at| at <= SystemTime::now()) => {
                return Err(unauthenticated(
                    "the client certificate has expired; connect again with a renewed one",
                ));
            }
            Some(Ok(peer)) => Some(peer.identity),
            Some(Err(reason)) => return Err(AuthError::Unauthenticated(reason)),
            None => None,
        };
        if self.client_cert_required && certificate.is_none() {
            return Err(unauthenticated(
                "a client certificate from the configured CA is required (mTLS)",
            ));
        }
        let token = match headers.get(http::header::AUTHORIZATION) {
            None => None,
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| unauthenticated("authorization metadata is not ASCII"))?;
                let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
                if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
                    return Err(unauthenticated(
                        "authorization metadata must be \"Bearer <token>\"",
                    ));
                }
                Some(token.trim())
            }
        };
        let claims = match (token, &self.jwt) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(unauthenticated(
                    "bearer tokens are not accepted here: no JWT keys are configured",
                ));
            }
            (Some(token), Some(jwt)) => Some(jwt.verify_but_expiry(token)?),
        };
        let expires = claims.as_ref().and_then(|c| c.expires);
        // checked last: a token refused for something else must not send its caller for a new one
        let unexpired = claims.as_ref().map_or(Ok(()), jwt::TokenClaims::unexpired);
        let (id, token_tenant) = match (certificate, claims) {
            (None, None) => {
                return Err(unauthenticated(
                    "credentials required: a client certificate or a bearer token",
                ));
            }
            (Some(cert), Some(claims)) if claims.subject != cert => {
                let reason = format!(
                    "token subject {:?} does not match the client certificate identity {cert:?}",
                    claims.subject
                );
                let certified = Box::new(self.certified_principal(cert));
                return Err(AuthError::SubjectMismatch { certified, reason });
            }
            (Some(cert), claims) => (cert, claims.and_then(|c| c.tenant)),
            (None, Some(claims)) => (claims.subject, claims.tenant),
        };
        let file_tenant = self
            .policy
            .as_ref()
            .and_then(|p| p.get(false).principal(&id).and_then(|e| e.tenant.clone()));
        let tenant = match (file_tenant, token_tenant) {
            (Some(t), _) => t,
            (None, Some(t)) => {
                policy::validate_tenant(&t).map_err(AuthError::Unauthenticated)?;
                t
            }
            (None, None) => DEFAULT_TENANT.to_owned(),
        };
        unexpired?;
        Ok(Principal {
            id,
            tenant,
            unrestricted: false,
            expires,
        })
    }

    /// Evaluates with the current policy and registry.
    fn decide(
        &self,
        principal: &Principal,
        decide: impl FnOnce(&Evaluator<'_>) -> policy::Decision,
    ) -> policy::Decision {
        if principal.unrestricted {
            return Ok(());
        }
        let policy = self
            .policy
            .as_ref()
            .map(|p| p.get(false))
            .unwrap_or_default();
        let registry = self
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        decide(&Evaluator {
            id: &principal.id,
            tenant: &principal.tenant,
            policy: &policy,
            registry: &registry,
        })
    }

    /// Decides with the current policy and registry; a denial is audited and returned as PERMISSION_DENIED.
    pub fn check(
        &self,
        principal: &Principal,
        action: &str,
        resource: &str,
        decide: impl FnOnce(&Evaluator<'_>) -> policy::Decision,
    ) -> Result<(), AuthError> {
        self.decide(principal, decide).map_err(|reason| {
            self.record_refused(principal, action, resource, "denied", &reason);
            AuthError::PermissionDenied(format!("permission denied: {reason}"))
        })
    }

    /// Tells whether the check passes, without auditing (for filtering lists).
    pub fn permits(
        &self,
        principal: &Principal,
        decide: impl FnOnce(&Evaluator<'_>) -> policy::Decision,
    ) -> bool {
        self.decide(principal, decide).is_ok()
    }

    /// Counts a call that stores events against the principal's rate in its tenant: one subject that tokens put
    /// in several tenants is a principal in each, as for open streams.
    pub fn check_publish_rate(&self, principal: &Principal) -> Result<(), AuthError> {
        match &self.publish_rate {
            Some(limiter) if limiter.check_key(&principal.key()).is_err() => {
                Err(AuthError::ResourceExhausted(format!(
                    "publish rate limit exceeded for {:?}; retry later",
                    principal.id
                )))
            }
            _ => Ok(()),
        }
    }

    /// Forgets the publish and refusal rates of principals whose quota is full again, as if never
    /// seen: each limiter keeps one per principal, and per-user tokens or tenant claims make them
    /// without end.
    pub fn forget_rested_principals(&self) {
        for limiter in [&self.publish_rate, &self.denied_audit]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// How many principals' publish rates are kept.
    pub fn publish_rates_kept(&self) -> usize {
        self.publish_rate
            .as_ref()
            .map_or(0, |limiter| limiter.len())
    }

    /// Opens a stream (or a waiting Request: a long call that holds an inbox) for the principal, or
    /// refuses when it has the most it may have.
    pub fn open_stream(&self, principal: &Principal) -> Result<StreamPermit, AuthError> {
        let key = principal.key();
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let open = streams.entry(key.clone()).or_default();
        if *open >= self.max_streams_per_principal {
            return Err(AuthError::ResourceExhausted(format!(
                "{:?} already has {} open streams and waiting requests, the most allowed per \
                 principal (connections.max_streams_per_principal)",
                principal.id, self.max_streams_per_principal
            )));
        }
        *open += 1;
        Ok(StreamPermit {
            streams: self.streams.clone(),
            key,
        })
    }

    /// The principal a connection's valid client certificate identifies, when it has one: whose
    /// refusal a call is when the token beside the certificate is refused.
    pub fn certified(&self, conn: Option<&ConnInfo>) -> Option<Principal> {
        match conn.and_then(|c| c.peer.as_ref()) {
            Some(Ok(peer)) if peer.not_after.is_none_or(|at| at > SystemTime::now()) => {
                Some(self.certified_principal(peer.identity.clone()))
            }
            _ => None,
        }
    }

    /// The certificate identity `id` as a principal: its tenant is the policy's, as a token's claim
    /// beside the certificate is not to be trusted.
    fn certified_principal(&self, id: String) -> Principal {
        let tenant = self
            .policy
            .as_ref()
            .and_then(|p| p.get(false).principal(&id).and_then(|e| e.tenant.clone()))
            .unwrap_or_else(|| DEFAULT_TENANT.to_owned());
        Principal {
            id,
            tenant,
            unrestricted: false,
            expires: None,
        }
    }

    /// Records an audit entry: a log line now, a store row soon after.
    pub fn record(
        &self,
        principal: &Principal,
        action: &str,
        resource: &str,
        outcome: &str,
        reason: &str,
    ) {
        self.record_raw(
            &principal.tenant,
            &principal.id,
            action,
            resource,
            outcome,
            reason,
        );
    }

    fn record_raw(
        &self,
        tenant: &str,
        principal: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        reason: &str,
    ) {
        // what a caller sent ends up here before it is validated (a type of megabytes, a path of the
        // whole header limit, a NUL Postgres refuses, which failed the whole batch of records): the
        // log and the table keep a bounded head of it with control characters escaped
        let resource = &audit_text(resource, MAX_AUDIT_RESOURCE);
        let reason = &audit_text(reason, MAX_AUDIT_REASON);
        let tenant = &audit_text(tenant, MAX_AUDIT_RESOURCE);
        // as long as a registered publisher's may be, so a filter by it finds its records
        let principal = &audit_text(principal, MAX_PRINCIPAL);
        info!(target: "nerve::audit", tenant, principal, action, resource, outcome, reason, "audit");
        let record = AuditRecord {
            id: 0,
            time: chrono::Utc::now(),
            tenant: tenant.clone(),
            principal: principal.clone(),
            action: action.to_owned(),
            resource: resource.clone(),
            outcome: outcome.to_owned(),
            reason: reason.clone(),
        };
        if self.audit.try_send(AuditMessage::Record(record)).is_err() {
            warn!(target: "nerve::audit", "audit queue full; the record above is only in the log");
        }
    }

    /// Records a refused call of an identified principal with its outcome (`denied`,
    /// `unauthenticated`), within the rate allowed for each; beyond it the records are only counted,
    /// and the count is logged with the next one made.
    fn record_refused(
        &self,
        principal: &Principal,
        action: &str,
        resource: &str,
        outcome: &str,
        reason: &str,
    ) {
        use std::sync::atomic::Ordering;
        if self
            .denied_audit
            .as_ref()
            .is_none_or(|limit| limit.check_key(&principal.key()).is_ok())
        {
            let suppressed = self.denied_suppressed.swap(0, Ordering::Relaxed);
            if suppressed > 0 {
                warn!(target: "nerve::audit", suppressed, "audit records of refusals over auth.denied_audit_rate were not made");
            }
            self.record(principal, action, resource, outcome, reason);
        } else {
            self.denied_suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a refused call of a caller that could not be identified, within the rate allowed for
    /// those; beyond it the records are only counted, and the count is logged with the next one made.
    fn record_unidentified(&self, resource: &str, outcome: &str, reason: &str) {
        use std::sync::atomic::Ordering;
        if self
            .unidentified_audit
            .as_ref()
            .is_none_or(|limit| limit.check().is_ok())
        {
            let suppressed = self.unidentified_suppressed.swap(0, Ordering::Relaxed);
            if suppressed > 0 {
                warn!(target: "nerve::audit", suppressed, "audit records of unidentified callers over auth.unidentified_audit_rate were not made");
            }
            // no tenant, no principal: the caller is not identified (or not consistently)
            self.record_raw("", "", "call", resource, outcome, reason);
        } else {
            self.unidentified_suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every audit record made so far is in the store.
    pub async fn flush_audit(&self) {
        let (tx, rx) = oneshot::channel();
        if self.audit.send(AuditMessage::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Most bytes of a registered publisher's description.
const MAX_PUBLISHER_DESCRIPTION: usize = 4096;
/// Most bytes of a registered publisher's principal.
const MAX_PRINCIPAL: usize = 1024;
/// Most bytes of an audit record's resource; longer ones keep their head and say how long they were.
const MAX_AUDIT_RESOURCE: usize = 512;
/// Most bytes of an audit record's reason (it may quote the resource).
const MAX_AUDIT_REASON: usize = 1024;

async fn write_audit(store: Arc<dyn EventStore>, mut rx: mpsc::Receiver<AuditMessage>) {
    while let Some(first) = rx.recv().await {
        let mut records = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                AuditMessage::Record(r) => records.push(r),
                AuditMessage::Flush(tx) => flushes.push(tx),
            }
            next = if records.len() < 512 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !records.is_empty()
            && let Err(error) = store.append_audit(&records).await
        {
            warn!(target: "nerve::audit", %error, lost = records.len(), "could not store audit records (they are in the log)");
        }
        for tx in flushes {
            let _ = tx.send(());
        }
    }
}

/// Audit records one pruning step reads at most (a short hold of SQLite's single writer).
const AUDIT_PRUNE_STEP: usize = 1_000;

/// Deletes audit records older than `retention`, checking a tenth as often as it keeps them (and at
/// least hourly); every replica does it, and deleting what another deleted first is no harm.
async fn prune_audit(
    store: Arc<dyn EventStore>,
    retention: std::time::Duration,
    shutdown: CancellationToken,
) {
    let every = (retention / 10).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(3600),
    );
    loop {
        // a retention past the calendar's reach keeps everything
        let Some(before) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|kept| chrono::Utc::now().checked_sub_signed(kept))
        else {
            return;
        };
        // step by step from the oldest, while steps still find records to delete: ids follow the
        // records' times only roughly (replicas' clocks differ), so a newer record among old ones
        // does not end the pass; a step that deletes nothing does, as the rest is newer still
        let mut after_id = 0;
        while !shutdown.is_cancelled() {
            match store.prune_audit(before, after_id, AUDIT_PRUNE_STEP).await {
                Ok(AuditPruned {
                    deleted,
                    last_id: Some(last),
                }) if deleted > 0 => after_id = last,
                Ok(_) => break,
                Err(error) => {
                    warn!(target: "nerve::audit", %error, "could not delete audit records past auth.audit_retention");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// How often the publish and refusal rates of rested principals are forgotten.
const FORGET_RESTED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

async fn forget_rested_principals(auth: Arc<Auth>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FORGET_RESTED_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        auth.forget_rested_principals();
    }
}

async fn refresh_registry(
    auth: Arc<Auth>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(error) = auth.refresh_registry().await {
            warn!(%error, "could not refresh the publisher registry");
        }
    }
}

/// The tower layer that authenticates every call except health checks.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    /// Wraps the shared state.
    pub fn new(auth: Arc<Auth>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            auth: self.auth.clone(),
            inner,
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// The unary calls that store events, which the publish rate counts (PublishStream counts each of its
/// requests where it reads them).
const STORING_PATHS: &[&str] = &[
    "/nerve.v1.EventBus/Publish",
    "/nerve.v1.EventBus/Request",
    "/nerve.v1.EventBus/Reply",
];

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if !path.starts_with(HEALTH_PREFIX) {
            let publish = STORING_PATHS.contains(&path);
            let identified = self
                .auth
                .authenticate(request.extensions().get::<ConnInfo>(), request.headers())
                .and_then(|principal| {
                    if publish {
                        self.auth.check_publish_rate(&principal)?;
                    }
                    Ok(principal)
                });
            match identified {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Err(error) => {
                    let path = request.uri().path();
                    match &error {
                        AuthError::Unauthenticated(_) | AuthError::TokenExpired(_) => {
                            // a valid certificate identified the caller, whose token was refused:
                            // its refusal, in its tenant, not an unidentified caller's
                            match self.auth.certified(request.extensions().get::<ConnInfo>()) {
                                Some(certified) => self.auth.record_refused(
                                    &certified,
                                    "call",
                                    path,
                                    "unauthenticated",
                                    &error.to_string(),
                                ),
                                None => self.auth.record_unidentified(
                                    path,
                                    "unauthenticated",
                                    &error.to_string(),
                                ),
                            }
                        }
                        AuthError::PermissionDenied(_) => {
                            self.auth
                                .record_unidentified(path, "denied", &error.to_string());
                        }
                        AuthError::SubjectMismatch { certified, reason } => {
                            self.auth
                                .record_refused(certified, "call", path, "denied", reason);
                        }
                        // rate limiting is not an access decision
                        AuthError::ResourceExhausted(_) => {}
                    }
                    let status = crate::api::status::to_status(error.into());
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        // the clone is ready only after poll_ready: call the ready one, keep the clone
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(request))
    }
}

/// Why a registry change failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registration is malformed (field and reason).
    #[error("{0}: {1}")]
    Invalid(String, String),
    /// The principal is already registered.
    #[error("publisher {0:?} is already registered; use UpdatePublisher")]
    Exists(String),
    /// The principal is not registered.
    #[error("publisher {0:?} is not registered")]
    Missing(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<RegistryError> for crate::bus::BusError {
    fn from(e: RegistryError) -> Self {
        use crate::bus::BusError;
        match e {
            RegistryError::Invalid(field, reason) => {
                BusError::Invalid(crate::event::InvalidInput::field(field, reason))
            }
            RegistryError::Exists(_) => BusError::Exists(e.to_string()),
            RegistryError::Missing(_) => BusError::NotFound(e.to_string()),
            RegistryError::Store(s) => s.into(),
        }
    }
}

impl Auth {
    fn valid_publisher(publisher: &crate::store::Publisher) -> Result<(), RegistryError> {
        if publisher.principal.is_empty() || publisher.principal.len() > MAX_PRINCIPAL {
            return Err(RegistryError::Invalid(
                "publisher.principal".into(),
                "must be 1 to 1024 bytes".into(),
            ));
        }
        if publisher.types.len() > 256 || publisher.sources.len() > 256 {
            return Err(RegistryError::Invalid(
                "publisher".into(),
                "at most 256 types and 256 sources".into(),
            ));
        }
        if publisher.description.len() > MAX_PUBLISHER_DESCRIPTION {
            return Err(RegistryError::Invalid(
                "publisher.description".into(),
                format!("must be at most {MAX_PUBLISHER_DESCRIPTION} bytes"),
            ));
        }
        // stored text: Postgres refuses NUL (INTERNAL where SQLite stored it)
        let texts = [
            ("publisher.principal", &publisher.principal),
            ("publisher.description", &publisher.description),
        ]
        .into_iter()
        .chain(publisher.sources.iter().map(|s| ("publisher.sources", s)))
        .chain(publisher.types.iter().map(|t| ("publisher.types", t)));
        for (field, text) in texts {
            crate::event::check_text(field, text).map_err(|e| {
                let reason = e.violations.first().map(|v| v.description.clone());
                RegistryError::Invalid(field.into(), reason.unwrap_or_default())
            })?;
        }
        policy::parse_publisher(&publisher.types, &publisher.sources)
            .map(|_| ())
            .map_err(|e| {
                let (field, reason) = e.split_once(": ").unwrap_or(("", e.as_str()));
                RegistryError::Invalid(format!("publisher.{field}"), reason.to_owned())
            })
    }

    /// Registers a publisher (or replaces one, with `update`) and refreshes the registry at once.
    pub async fn put_publisher(
        &self,
        publisher: &crate::store::Publisher,
        update: bool,
    ) -> Result<(), RegistryError> {
        Auth::valid_publisher(publisher)?;
        let done = if update {
            self.store.update_publisher(publisher).await?
        } else {
            self.store.insert_publisher(publisher).await?
        };
        match (done, update) {
            (true, _) => {}
            (false, true) => return Err(RegistryError::Missing(publisher.principal.clone())),
            (false, false) => return Err(RegistryError::Exists(publisher.principal.clone())),
        }
        self.refresh_registry()
            .await
            .map_err(|e| RegistryError::Store(crate::store::StoreError::Unavailable(e)))
    }

    /// Removes a publisher; false when it was not registered.
    pub async fn remove_publisher(
        &self,
        tenant: &str,
        principal: &str,
    ) -> Result<bool, RegistryError> {
        let removed = self.store.remove_publisher(tenant, principal).await?;
        self.refresh_registry()
            .await
            .map_err(|e| RegistryError::Store(crate::store::StoreError::Unavailable(e)))?;
        Ok(removed)
    }

    /// The registered publishers of a tenant.
    pub async fn publishers(
        &self,
        tenant: &str,
    ) -> Result<Vec<crate::store::Publisher>, crate::store::StoreError> {
        Ok(self
            .store
            .publishers()
            .await?
            .into_iter()
            .filter(|p| p.tenant == tenant)
            .collect())
    }

    /// Reads audit records, after writing out those still queued.
    pub async fn audit_records(
        &self,
        query: &crate::store::AuditQuery,
    ) -> Result<Vec<AuditRecord>, crate::store::StoreError> {
        self.flush_audit().await;
        self.store.audit(query).await
    }
}

/// A bounded head of `text` with control characters escaped (`\u{0}`), as audit records keep it.
fn audit_text(text: &str, max: usize) -> String {
    let head = crate::api::status::bounded(text, max);
    if !head.chars().any(char::is_control) {
        return head.into_owned();
    }
    head.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_rates_of_rested_principals_are_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SqliteStore::started(&dir.path().join("t.db")).await;
        let connections = ConnectionsConfig {
            publish_rate_per_principal: 1000,
            publish_burst: 1,
            ..ConnectionsConfig::default()
        };
        let auth = Auth::start(
            &TlsConfig::default(),
            &AuthConfig::default(),
            &connections,
            store,
            CancellationToken::new(),
        )
        .await
        .expect("auth");
        let principal = |i: usize| Principal {
            id: format!("user-{i}"),
            tenant: "t".into(),
            unrestricted: true,
            expires: None,
        };
        for i in 0..100 {
            auth.check_publish_rate(&principal(i))
                .expect("first publish");
        }
        assert_eq!(auth.publish_rates_kept(), 100);
        // at 1,000 a second with a burst of one, each quota is full again a millisecond later
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while auth.publish_rates_kept() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            auth.forget_rested_principals();
        }
        assert_eq!(auth.publish_rates_kept(), 0, "rested principals forgotten");
        auth.check_publish_rate(&principal(0))
            .expect("a forgotten principal publishes as a new one");
        assert_eq!(auth.publish_rates_kept(), 1);
    }
}
