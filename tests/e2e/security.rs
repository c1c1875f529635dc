//! Authentication, authorization, tenants, audit and connection limits, over real TLS and gRPC.

use std::{path::Path, time::Duration};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nerve::{api::pb, config::Config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tonic::{
    Code, Request, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::harness::{
    Subscriber, TestServer, WAIT, after_sequence, earliest, event, eventually, millis, open,
};

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "nerve";
const HS_SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";
const RSA_KEY: &str = include_str!("fixtures/jwt-rsa-test-key.pem");
const RSA_PUB: &str = include_str!("fixtures/jwt-rsa-test-pub.pem");

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600})
}

fn sign(
    claims: &serde_json::Value,
    alg: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn hs_token(claims: &serde_json::Value) -> String {
    sign(
        claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
        None,
    )
}

fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

fn sourced(id: &str, event_type: &str, source: &str) -> pb::Event {
    let mut e = event(id, event_type);
    e.source = source.to_owned();
    e
}

async fn publish_as(
    server: &TestServer,
    token: &str,
    events: Vec<pb::Event>,
) -> Result<pb::PublishResponse, Status> {
    server
        .bus()
        .publish(authorized(pb::PublishRequest { events }, token))
        .await
        .map(tonic::Response::into_inner)
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
}

/// The `TOKEN_EXPIRED` reason of a status' `ErrorInfo`, when it has it.
fn token_expired_reason(status: &Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .filter(|reason| reason == "TOKEN_EXPIRED")
}

/// Asserts a stream ended because its token expired, saying so in its details.
fn assert_token_expired<T: std::fmt::Debug>(result: Result<T, Status>) {
    let reason = result.as_ref().err().and_then(token_expired_reason);
    assert!(reason.is_some(), "no TOKEN_EXPIRED reason: {result:?}");
    assert_status(result, Code::Unauthenticated, "has expired");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

// ---- JWT ----

fn ec_jwk(key: &KeyPair, kid: &str) -> serde_json::Value {
    // an uncompressed P-256 point: 0x04, x, y
    let raw = key.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
           "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])})
}

fn es_token(key: &KeyPair, kid: &str, claims: &serde_json::Value) -> String {
    let pem = key.serialize_pem();
    sign(
        claims,
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(pem.as_bytes()).expect("ec key"),
        Some(kid),
    )
}

/// PEM keys of one family but other curves are each tried for a token without a kid: a P-384 key
/// listed first does not keep an ES256 token from the P-256 key after it (curves rotated).
#[tokio::test]
async fn a_token_without_kid_is_checked_against_each_curve_of_its_family() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let p384_pub = write(dir.path(), "p384.pub.pem", &p384.public_key_pem());
    let p256_pub = write(dir.path(), "p256.pub.pem", &p256.public_key_pem());
    let policy = write(dir.path(), "policy.toml", PUBLISHER_POLICY);
    let server = TestServer::start_with(|c| {
        c.auth.jwt.issuer = ISSUER.into();
        c.auth.jwt.audience = AUDIENCE.into();
        c.auth.jwt.algorithms = vec!["ES256".into(), "ES384".into()];
        c.auth.jwt.public_key_files = vec![p384_pub.clone(), p256_pub.clone()];
        c.auth.policy_file = policy.clone();
    })
    .await;
    let token = |key: &KeyPair, alg: Algorithm| {
        let pem = key.serialize_pem();
        let key = EncodingKey::from_ec_pem(pem.as_bytes()).expect("ec key");
        sign(&claims("svc"), alg, &key, None)
    };
    publish_as(
        &server,
        &token(&p256, Algorithm::ES256),
        vec![event("p256", "t.created")],
    )
    .await
    .expect("ES256 verified by the second key");
    publish_as(
        &server,
        &token(&p384, Algorithm::ES384),
        vec![event("p384", "t.created")],
    )
    .await
    .expect("ES384 verified by the first key");
    // a key of the right curve that did not sign it: the refusal names the signature
    let stranger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    assert_status(
        publish_as(
            &server,
            &token(&stranger, Algorithm::ES256),
            vec![event("stranger", "t.created")],
        )
        .await,
        Code::Unauthenticated,
        "signature does not verify",
    );
}

const PUBLISHER_POLICY: &str = r#"
[[principal]]
id = "svc"
sources = ["//tests"]
allow = { publish = ["t.>"] }
"#;

#[tokio::test]
async fn bad_tokens_are_unauthenticated_and_rotated_keys_work_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k1 = KeyPair::generate().expect("key");
    let k2 = KeyPair::generate().expect("key");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [ec_jwk(&k1, "k1")]}).to_string()).expect("jwks");
    let rsa_pub = write(dir.path(), "rsa.pub.pem", RSA_PUB);
    let policy = write(dir.path(), "policy.toml", PUBLISHER_POLICY);
    let server = TestServer::start_with(|c| {
        c.auth.jwt.issuer = ISSUER.into();
        c.auth.jwt.audience = AUDIENCE.into();
        c.auth.jwt.algorithms = vec!["RS256".into(), "ES256".into()];
        c.auth.jwt.public_key_files = vec![rsa_pub.clone()];
        c.auth.jwt.jwks_file = jwks.display().to_string();
        c.auth.jwt.max_token_bytes = 4096;
        // check the key files on every use, so the rotation below needs no waiting
        c.auth.reload_check_interval = Duration::ZERO;
        c.auth.policy_file = policy.clone();
    })
    .await;
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).expect("rsa key");
    let ok = |id: &str| vec![event(id, "t.created")];

    // the good tokens work: RS256 from the PEM key, ES256 from the JWKS by kid
    let good = sign(&claims("svc"), Algorithm::RS256, &rsa, None);
    publish_as(&server, &good, ok("rs"))
        .await
        .expect("RS256 accepted");
    publish_as(&server, &es_token(&k1, "k1", &claims("svc")), ok("es"))
        .await
        .expect("ES256 by kid accepted");

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims("svc").to_string())
    );
    let mut no_exp = claims("svc");
    no_exp.as_object_mut().expect("object").remove("exp");
    let mut expired = claims("svc");
    expired["exp"] = json!(now() - 120);
    let mut early = claims("svc");
    early["nbf"] = json!(now() + 300);
    let mut wrong_aud = claims("svc");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("svc");
    wrong_iss["iss"] = json!("https://evil.test");
    let mut huge = claims("svc");
    huge["padding"] = json!("x".repeat(5000));
    let cases = [
        (alg_none, "malformed token"),
        (
            // the classic confusion: the server's RSA public key used as an HMAC secret
            sign(
                &claims("svc"),
                Algorithm::HS256,
                &EncodingKey::from_secret(RSA_PUB.as_bytes()),
                None,
            ),
            "not accepted",
        ),
        (sign(&wrong_aud, Algorithm::RS256, &rsa, None), "audience"),
        (sign(&wrong_iss, Algorithm::RS256, &rsa, None), "issuer"),
        (sign(&no_exp, Algorithm::RS256, &rsa, None), "exp"),
        (sign(&expired, Algorithm::RS256, &rsa, None), "expired"),
        (sign(&early, Algorithm::RS256, &rsa, None), "not valid yet"),
        (es_token(&k2, "k2", &claims("svc")), "unknown key id"),
        (sign(&huge, Algorithm::RS256, &rsa, None), "larger than"),
    ];
    for (token, needle) in cases {
        let refused = publish_as(&server, &token, ok("bad")).await;
        // only an expired token says so in the status' details: a fresh one may succeed
        let reason = refused.as_ref().err().and_then(token_expired_reason);
        assert_eq!(
            reason.is_some(),
            needle == "expired",
            "{needle}: {reason:?}"
        );
        assert_status(refused, Code::Unauthenticated, needle);
    }
    assert_status(
        server
            .bus()
            .publish(pb::PublishRequest { events: ok("none") })
            .await,
        Code::Unauthenticated,
        "credentials required",
    );

    // rotation: k2 added and k1 removed in the JWKS file, no restart; beside it, keys the server
    // cannot verify with are left out, without keeping the removed key in service
    let k3 = KeyPair::generate().expect("key");
    let mut for_encryption = ec_jwk(&k3, "k3");
    for_encryption["use"] = json!("enc");
    let mut no_kid = ec_jwk(&k3, "none");
    no_kid.as_object_mut().expect("object").remove("kid");
    let mut key_agreement = ec_jwk(&k3, "k5");
    key_agreement["alg"] = json!("ECDH-ES");
    key_agreement.as_object_mut().expect("object").remove("use");
    std::fs::write(
        &jwks,
        json!({"keys": [for_encryption, no_kid, ec_jwk(&k2, "k2"), key_agreement]}).to_string(),
    )
    .expect("jwks");
    publish_as(&server, &es_token(&k2, "k2", &claims("svc")), ok("k2"))
        .await
        .expect("a newly added key is accepted");
    for (key, kid) in [(&k1, "k1"), (&k3, "k3"), (&k3, "k5")] {
        assert_status(
            publish_as(&server, &es_token(key, kid, &claims("svc")), ok(kid)).await,
            Code::Unauthenticated,
            "unknown key id",
        );
    }
}

// ---- mTLS ----

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("ca");
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key (PEM) with these SANs and common name.
    fn issue(&self, sans: Vec<SanType>, cn: &str) -> (String, String) {
        self.issue_with(sans, cn, |_| {})
    }

    /// A certificate and key (PEM) with these SANs and common name, its parameters adjusted.
    fn issue_with(
        &self,
        sans: Vec<SanType>,
        cn: &str,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, cn);
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().expect("ia5"))
}

fn dns(d: &str) -> SanType {
    SanType::DnsName(d.try_into().expect("ia5"))
}

/// Server certificate files, CA file and an adjusted config for TLS with client certificates.
fn tls_config(c: &mut Config, dir: &Path, pki: &Pki) {
    let (cert, key) = pki.issue(vec![dns("localhost")], "server");
    c.tls.cert_file = write(dir, "server.pem", &cert);
    c.tls.key_file = write(dir, "server.key", &key);
    c.tls.client_ca_file = write(dir, "ca.pem", &pki.ca_pem);
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

async fn tls_publish(
    server: &TestServer,
    ca_pem: &str,
    identity: Option<&(String, String)>,
    token: Option<&str>,
) -> Result<pb::PublishResponse, Status> {
    let channel = tls_channel(server.addr(), ca_pem, identity)
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
    let events = vec![sourced(
        &uuid::Uuid::new_v4().to_string(),
        "t.created",
        "//planner",
    )];
    let mut request = Request::new(pb::PublishRequest { events });
    if let Some(token) = token {
        request = authorized(request.into_inner(), token);
    }
    pb::event_bus_client::EventBusClient::new(channel)
        .publish(request)
        .await
        .map(tonic::Response::into_inner)
}

/// A policy for the planner identified by its client certificate's URI SAN, and its tenant's auditor.
const PLANNER_CERT_POLICY: &str = r#"
[[principal]]
id = "spiffe://nerve.test/planner"
tenant = "acme"
sources = ["//planner"]
allow = { publish = ["t.>"] }

[[principal]]
id = "spiffe://nerve.test/acme-auditor"
tenant = "acme"
allow = { admin = ["audit"] }

[[principal]]
id = "spiffe://nerve.test/root-auditor"
allow = { admin = ["audit"] }
"#;

#[tokio::test]
async fn client_certificates_are_verified_and_give_the_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("nerve test ca");
    let policy = write(dir.path(), "policy.toml", PLANNER_CERT_POLICY);
    let rsa_pub = write(dir.path(), "rsa.pub.pem", RSA_PUB);
    let server = TestServer::start_with(|c| {
        tls_config(c, dir.path(), &pki);
        c.health_listen = "127.0.0.1:0".into();
        c.auth.policy_file = policy.clone();
        c.auth.jwt.issuer = ISSUER.into();
        c.auth.jwt.audience = AUDIENCE.into();
        c.auth.jwt.algorithms = vec!["RS256".into()];
        c.auth.jwt.public_key_files = vec![rsa_pub.clone()];
    })
    .await;
    let planner = pki.issue(vec![uri("spiffe://nerve.test/planner")], "planner");
    tls_publish(&server, &pki.ca_pem, Some(&planner), None)
        .await
        .expect("a certificate with one URI SAN identifies the caller");

    assert_status(
        tls_publish(&server, &pki.ca_pem, None, None).await,
        Code::Unauthenticated,
        "client certificate",
    );
    let two_uris = pki.issue(
        vec![uri("spiffe://nerve.test/a"), uri("spiffe://nerve.test/b")],
        "two",
    );
    assert_status(
        tls_publish(&server, &pki.ca_pem, Some(&two_uris), None).await,
        Code::Unauthenticated,
        "2 URI SANs",
    );
    let cn_only = pki.issue(vec![], "spiffe://nerve.test/planner");
    assert_status(
        tls_publish(&server, &pki.ca_pem, Some(&cn_only), None).await,
        Code::Unauthenticated,
        "CN-only",
    );
    // a certificate from another CA fails the handshake: no call gets through
    let foreign = Pki::new("foreign ca").issue(vec![uri("spiffe://nerve.test/planner")], "x");
    let refused = tls_publish(&server, &pki.ca_pem, Some(&foreign), None).await;
    assert!(refused.is_err(), "foreign CA accepted: {refused:?}");
    // certificate and token must name the same principal
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).expect("rsa key");
    let other = sign(
        &claims("spiffe://nerve.test/tester"),
        Algorithm::RS256,
        &rsa,
        None,
    );
    assert_status(
        tls_publish(&server, &pki.ca_pem, Some(&planner), Some(&other)).await,
        Code::PermissionDenied,
        "does not match",
    );
    // recorded as the certificate's principal's refusal, in its tenant: not as an unidentified
    // caller's, which auditors of every other tenant's default one would read
    let auditor = |id: &str| {
        let identity = pki.issue(vec![uri(&format!("spiffe://nerve.test/{id}"))], id);
        let (server, ca_pem) = (&server, &pki.ca_pem);
        async move {
            let channel = tls_channel(server.addr(), ca_pem, Some(&identity))
                .await
                .expect("the auditor connects");
            pb::admin_client::AdminClient::new(channel)
                .list_audit_records(pb::ListAuditRecordsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .expect("the auditor reads its tenant's records")
                .into_inner()
                .records
        }
    };
    let mismatch = |r: &pb::AuditRecord| r.reason.contains("does not match");
    let acme = crate::harness::eventually("the refusal recorded", || async {
        let records = auditor("acme-auditor").await;
        records.iter().any(mismatch).then_some(records)
    })
    .await;
    let record = acme.iter().find(|r| mismatch(r)).expect("recorded");
    assert_eq!(
        record.principal, "spiffe://nerve.test/planner",
        "{record:?}"
    );
    assert_eq!(record.outcome, "denied", "{record:?}");
    assert!(
        !auditor("root-auditor").await.iter().any(mismatch),
        "another tenant's auditor reads it"
    );
    let same = sign(
        &claims("spiffe://nerve.test/planner"),
        Algorithm::RS256,
        &rsa,
        None,
    );
    tls_publish(&server, &pki.ca_pem, Some(&planner), Some(&same))
        .await
        .expect("matching token and certificate");
    // expiry is checked last: an expired token naming another principal is refused for that, and
    // not with TOKEN_EXPIRED, which would only send its caller for a fresh one
    let mut expired_other = claims("spiffe://nerve.test/tester");
    expired_other["exp"] = json!(now() - 120);
    let refused = tls_publish(
        &server,
        &pki.ca_pem,
        Some(&planner),
        Some(&sign(&expired_other, Algorithm::RS256, &rsa, None)),
    )
    .await
    .expect_err("another principal's expired token");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("does not match"), "{refused:?}");
    assert_eq!(token_expired_reason(&refused), None, "{refused:?}");
    // a token refused beside a valid certificate is the certificate's principal's refusal too
    assert_status(
        tls_publish(
            &server,
            &pki.ca_pem,
            Some(&planner),
            Some(&hs_token(&claims("spiffe://nerve.test/planner"))),
        )
        .await,
        Code::Unauthenticated,
        "not accepted",
    );
    let bad_token = |r: &pb::AuditRecord| r.reason.contains("HS256");
    let acme = crate::harness::eventually("the bad token's refusal recorded", || async {
        let records = auditor("acme-auditor").await;
        records.iter().any(bad_token).then_some(records)
    })
    .await;
    let record = acme.iter().find(|r| bad_token(r)).expect("recorded");
    assert_eq!(
        (record.principal.as_str(), record.outcome.as_str()),
        ("spiffe://nerve.test/planner", "unauthenticated"),
        "{record:?}"
    );
    assert!(
        !auditor("root-auditor").await.iter().any(bad_token),
        "another tenant's auditor reads it"
    );

    // health needs no credentials: over TLS without a client certificate, and on the plaintext port
    let channel = tls_channel(server.addr(), &pki.ca_pem, None)
        .await
        .expect("TLS without a client certificate connects");
    // every call must be answered; SERVING may take another backend check, since one can miss its
    // 100 ms deadline while the whole suite loads the shared Postgres
    let serving = |client: HealthClient<tonic::transport::Channel>, what: &'static str| {
        crate::harness::eventually(what, move || {
            let mut client = client.clone();
            async move {
                let status = client
                    .check(HealthCheckRequest::default())
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e:?}"))
                    .into_inner();
                (status.status == 1).then_some(())
            }
        })
    };
    serving(
        HealthClient::new(channel),
        "SERVING over TLS without credentials",
    )
    .await;
    let plain = crate::harness::connect(server.health_addr().expect("health listener")).await;
    serving(
        HealthClient::new(plain.clone()),
        "SERVING on the plaintext health port",
    )
    .await;
    // the health port serves nothing else
    let status = pb::event_bus_client::EventBusClient::new(plain)
        .publish(pb::PublishRequest { events: vec![] })
        .await
        .expect_err("only health on the health port");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

/// A client certificate's validity is checked at every call, not only at the handshake: a
/// connection outlives its certificate for as long as keepalives hold it open.
#[tokio::test]
async fn calls_on_a_connection_whose_certificate_expired_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("nerve test ca");
    let policy = write(dir.path(), "policy.toml", PLANNER_CERT_POLICY);
    let server = TestServer::start_with(|c| {
        tls_config(c, dir.path(), &pki);
        c.auth.policy_file = policy.clone();
    })
    .await;
    // X.509 keeps whole seconds
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("second");
    let expires = now + time::Duration::seconds(2);
    let planner = pki.issue_with(vec![uri("spiffe://nerve.test/planner")], "planner", |p| {
        p.not_after = expires;
    });
    let channel = tls_channel(server.addr(), &pki.ca_pem, Some(&planner))
        .await
        .expect("connects while the certificate is valid");
    let mut bus = pb::event_bus_client::EventBusClient::new(channel);
    let publish = || pb::PublishRequest {
        events: vec![sourced(
            &uuid::Uuid::new_v4().to_string(),
            "t.created",
            "//planner",
        )],
    };
    bus.publish(publish())
        .await
        .expect("a call while the certificate is valid");
    // nothing but the clock ends a certificate
    let left = expires - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(100);
    tokio::time::sleep(left.try_into().unwrap_or_default()).await;
    assert_status(
        bus.publish(publish()).await,
        Code::Unauthenticated,
        "the client certificate has expired",
    );
}

#[tokio::test]
async fn a_server_certificate_replaced_on_disk_is_served_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Pki::new("first ca");
    let server = TestServer::start_with(|c| {
        let (cert, key) = first.issue(vec![dns("localhost")], "server");
        c.tls.cert_file = write(dir.path(), "server.pem", &cert);
        c.tls.key_file = write(dir.path(), "server.key", &key);
        c.auth.reload_check_interval = Duration::ZERO;
        c.auth.jwt.issuer = ISSUER.into();
        c.auth.jwt.audience = AUDIENCE.into();
        c.auth.jwt.algorithms = vec!["HS256".into()];
        c.auth.jwt.hs_secret_file = write(dir.path(), "hs.secret", HS_SECRET);
    })
    .await;
    tls_channel(server.addr(), &first.ca_pem, None)
        .await
        .expect("first certificate served");
    let second = Pki::new("second ca");
    let (cert, key) = second.issue(vec![dns("localhost")], "server");
    // key first, then certificate: a reload between the two writes fails and keeps the old pair
    write(dir.path(), "server.key", &key);
    write(dir.path(), "server.pem", &cert);
    tls_channel(server.addr(), &second.ca_pem, None)
        .await
        .expect("the new certificate is served without restart");
    assert!(
        tls_channel(server.addr(), &first.ca_pem, None)
            .await
            .is_err()
    );
}

// ---- authorization, tenants, registry, audit ----

const POLICY: &str = r#"
[[principal]]
id = "planner"
tenant = "acme"
allow = { publish = ["task.>"], subscribe = ["task.>"], groups = ["planners"], replay = ["task.>"], request = ["tool.*"] }

[[principal]]
id = "tool"
tenant = "acme"
allow = { subscribe = ["tool.>"], reply = ["tool.*"] }
deny = { publish = ["billing.>"] }

[[principal]]
id = "intruder"
tenant = "acme"
allow = { subscribe = ["tool.>"] }

[[principal]]
id = "rival"
tenant = "globex"
allow = { publish = ["task.>"], subscribe = [">"], replay = [">"] }

[[principal]]
id = "admin"
tenant = "acme"
allow = { admin = ["*"] }

[[principal]]
id = "root"
allow = { admin = ["audit"] }
"#;

async fn policy_server(dir: &Path) -> TestServer {
    server_with_policy(dir, POLICY, |_| {}).await
}

/// A server taking HS256 tokens (tenant claim `tenant`) under the given policy, adjusted further.
async fn server_with_policy(
    dir: &Path,
    policy: &str,
    adjust: impl FnOnce(&mut Config),
) -> TestServer {
    let with_policy = policy_settings(dir, policy);
    TestServer::start_with(|c| {
        with_policy(c);
        adjust(c);
    })
    .await
}

/// Writes `policy` and the HS256 secret into `dir`; the settings that make a server use them.
fn policy_settings(dir: &Path, policy: &str) -> impl FnOnce(&mut Config) {
    let policy = write(dir, "policy.toml", policy);
    let secret = write(dir, "hs.secret", HS_SECRET);
    move |c| {
        c.auth.jwt.issuer = ISSUER.into();
        c.auth.jwt.audience = AUDIENCE.into();
        c.auth.jwt.algorithms = vec!["HS256".into()];
        c.auth.jwt.hs_secret_file = secret;
        c.auth.jwt.tenant_claim = "tenant".into();
        c.auth.policy_file = policy;
    }
}

/// Asserts `token`'s GetGroup of "planners" is refused by the policy.
async fn refused_get_group(server: &TestServer, token: &str) {
    assert_status(
        server
            .admin()
            .get_group(authorized(
                pb::GetGroupRequest {
                    group: "planners".into(),
                },
                token,
            ))
            .await,
        Code::PermissionDenied,
        "may not administer \"groups/planners\"",
    );
}

async fn audit_records(server: &TestServer, admin: &str) -> Vec<pb::AuditRecord> {
    server
        .admin()
        .list_audit_records(authorized(
            pb::ListAuditRecordsRequest {
                page_size: 1000,
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("admin reads the audit log")
        .into_inner()
        .records
}

/// A restricted caller's open of a group that may not exist yet looks the group up (to know whether it
/// reads history). A name no backend stores (Postgres refuses a NUL) is refused as the caller's
/// mistake first, not passed to the database to come back as an internal error.
#[tokio::test]
async fn a_group_name_the_backend_cannot_store_is_invalid_for_a_restricted_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = r#"
[[principal]]
id = "planner"
tenant = "acme"
allow = { subscribe = ["task.>"], groups = ["own-*"] }
"#;
    let server = server_with_policy(dir.path(), policy, |_| {}).await;
    let mut bus = server.bus();
    let mut o = open(&["task.>"], "own-\u{0}");
    o.start = earliest();
    let refused = Subscriber::open_as(&mut bus, o, Some(&hs_token(&claims("planner")))).await;
    let status = refused.err().expect("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("open.group"), "{status:?}");
}

/// An open of an existing group skips the `deny.replay` check (the backlog is the group's). When
/// the group is deleted after that check and before the bus opens it, the open creates it again:
/// for a caller denied replay, at the latest event, so the old backlog does not reach it.
#[tokio::test]
async fn a_group_deleted_while_a_caller_denied_replay_opens_it_starts_at_the_latest_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = r#"
[[principal]]
id = "planner"
tenant = "acme"
allow = { subscribe = ["task.>"], groups = ["shared"] }
deny = { replay = ["task.audit.>"] }

[[principal]]
id = "auditor"
tenant = "acme"
sources = ["//tests"]
allow = { publish = ["task.>"], subscribe = ["task.>"], groups = ["shared"], admin = ["groups/shared"] }
"#;
    let (server, injection) =
        crate::injected_store::start_injected_with(policy_settings(dir.path(), policy)).await;
    let planner = hs_token(&claims("planner"));
    let auditor = hs_token(&claims("auditor"));
    let mut bus = server.bus();
    // the group, and history in its backlog
    let mut made = Subscriber::open_as(&mut bus, open(&["task.audit.>"], "shared"), Some(&auditor))
        .await
        .expect("the auditor makes the group");
    made.close_gracefully().await.expect("closed");
    publish_as(&server, &auditor, vec![event("old", "task.audit.x")])
        .await
        .expect("publish");

    // the planner's open passes the API's check, then stops where the bus reads the head
    let (reached, go) = injection.before_head.arm();
    let mut opening = server.bus();
    let token = planner.clone();
    let opened = tokio::spawn(async move {
        let mut o = open(&["task.audit.>"], "shared");
        o.start = earliest();
        Subscriber::open_as(&mut opening, o, Some(&token)).await
    });
    reached.wait("the planner's open reading the head").await;
    server
        .admin()
        .delete_group(authorized(
            pb::DeleteGroupRequest {
                group: "shared".into(),
            },
            &auditor,
        ))
        .await
        .expect("delete the group");
    drop(go);
    let mut planner_sub = opened
        .await
        .expect("join")
        .expect("the open makes the group again");
    publish_as(&server, &auditor, vec![event("new", "task.audit.x")])
        .await
        .expect("publish");
    let first = planner_sub.next_delivery().await.event.expect("event");
    assert_eq!(
        first.id, "new",
        "a caller denied replay read history through a group made again"
    );
}

/// `deny.replay` keeps a type's history from a principal through private subscriptions too: one that
/// starts before the latest event reads history, and so does a group it creates, whose start it
/// picks. From the latest on, the subscribe grant is enough; an existing group's backlog is the
/// group's (its grant decides).
#[tokio::test]
async fn a_subscription_that_starts_in_history_is_held_to_replay_denials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = r#"
[[principal]]
id = "planner"
tenant = "acme"
allow = { subscribe = ["task.>"], groups = ["auditors", "own-*"] }
deny = { replay = ["task.audit.>"] }

[[principal]]
id = "auditor"
tenant = "acme"
allow = { subscribe = ["task.>"], groups = ["auditors"] }
"#;
    let server = server_with_policy(dir.path(), policy, |_| {}).await;
    let planner = hs_token(&claims("planner"));
    let mut bus = server.bus();
    let from = |start: pb::StartPosition| {
        let mut o = open(&["task.audit.>"], "");
        o.start = Some(start);
        o
    };
    for start in [earliest(), after_sequence(0)].into_iter().flatten() {
        assert_status(
            Subscriber::open_as(&mut bus, from(start), Some(&planner))
                .await
                .map(|_| ()),
            Code::PermissionDenied,
            "replay of task.audit.> is denied by task.audit.>",
        );
    }
    Subscriber::open_as(&mut bus, open(&["task.audit.>"], ""), Some(&planner))
        .await
        .expect("from the latest event on, the subscribe grant is enough");
    let mut o = open(&["task.created"], "");
    o.start = earliest();
    Subscriber::open_as(&mut bus, o, Some(&planner))
        .await
        .expect("history of types not denied");
    let in_group = |group: &str| {
        let mut o = open(&["task.audit.>"], group);
        o.start = earliest();
        o
    };
    // creating a group from the earliest event would read the history the caller may not replay
    assert_status(
        Subscriber::open_as(&mut bus, in_group("own-1"), Some(&planner))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "replay of task.audit.> is denied by task.audit.>",
    );
    Subscriber::open_as(&mut bus, in_group("own-1"), Some(&planner))
        .await
        .map(|_| ())
        .expect_err("the refused open created no group: it is refused again");
    // a group another created is joined at its own start: its backlog is the group's
    let auditor = hs_token(&claims("auditor"));
    drop(
        Subscriber::open_as(&mut bus, in_group("auditors"), Some(&auditor))
            .await
            .expect("the auditor may read history"),
    );
    Subscriber::open_as(&mut bus, in_group("auditors"), Some(&planner))
        .await
        .expect("an existing group's start is the group's");
}

/// A request is stored as an event of its type, so `deny.publish` applies to it as to a reply.
#[tokio::test]
async fn a_request_of_a_type_the_caller_may_not_publish_is_denied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = r#"
[[principal]]
id = "planner"
tenant = "acme"
allow = { request = ["tool.*"] }
deny = { publish = ["tool.secret"] }
"#;
    let server = server_with_policy(dir.path(), policy, |_| {}).await;
    let planner = hs_token(&claims("planner"));
    let mut bus = server.bus();
    let ask = |event_type: &str| {
        authorized(
            pb::RequestRequest {
                event: Some(sourced("q", event_type, "planner")),
                timeout: millis(100),
            },
            &planner,
        )
    };
    assert_status(
        bus.request(ask("tool.secret")).await,
        Code::PermissionDenied,
        "publishing \"tool.secret\" is denied by tool.secret",
    );
    // the grant itself holds: nobody answers this one
    assert_status(
        bus.request(ask("tool.run")).await,
        Code::FailedPrecondition,
        "no responders",
    );
}

#[tokio::test]
async fn policy_denies_what_it_does_not_grant_and_audits_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let planner = hs_token(&claims("planner"));
    let admin = hs_token(&claims("admin"));
    let mut bus = server.bus();

    publish_as(
        &server,
        &planner,
        vec![sourced("p1", "task.created", "planner/1")],
    )
    .await
    .expect("granted type, own source");
    assert_status(
        publish_as(
            &server,
            &planner,
            vec![sourced("p2", "plan.created", "planner")],
        )
        .await,
        Code::PermissionDenied,
        "not registered to publish \"plan.created\"",
    );
    assert_status(
        publish_as(
            &server,
            &planner,
            vec![sourced("p3", "task.created", "tool")],
        )
        .await,
        Code::PermissionDenied,
        "source \"tool\" does not belong",
    );
    // a type is authorized before it is validated: the answer and the audit keep a bounded head of
    // a huge one (the whole of it overflowed the response's headers)
    let huge = format!("plan.{}", "x".repeat(200_000));
    let status = publish_as(&server, &planner, vec![sourced("p4", &huge, "planner")])
        .await
        .expect_err("a type outside the grant");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("not registered to publish") && status.message().len() < 2200,
        "{} bytes",
        status.message().len()
    );
    let records = audit_records(&server, &admin).await;
    let record = records
        .iter()
        .find(|r| r.principal == "planner" && r.resource.starts_with("plan.xxx"))
        .expect("the huge type's denial is audited");
    assert!(
        record.resource.len() < 600 && record.reason.len() < 1200,
        "{} / {} bytes",
        record.resource.len(),
        record.reason.len()
    );
    assert!(
        record.resource.ends_with("(200005 bytes)"),
        "{}",
        &record.resource[500..]
    );
    // on a PublishStream each request is authorized as a Publish call is, and a refusal ends only it
    let batches = [
        sourced("s1", "plan.created", "planner"),
        sourced("s2", "task.created", "planner/2"),
    ];
    let requests = batches
        .into_iter()
        .enumerate()
        .map(|(i, e)| pb::PublishStreamRequest {
            request_id: i as u64,
            events: vec![e],
        });
    let mut answers = bus
        .publish_stream(authorized(tokio_stream::iter(requests), &planner))
        .await
        .expect("the stream opens")
        .into_inner();
    let denied = answers.message().await.expect("answer").expect("open");
    match denied.outcome {
        Some(pb::publish_stream_response::Outcome::Error(e)) => {
            assert_eq!(e.code, Code::PermissionDenied as i32, "{e:?}");
            assert!(e.message.contains("\"plan.created\""), "{e:?}");
        }
        other => panic!("not refused: {other:?}"),
    }
    let granted = answers.message().await.expect("answer").expect("open");
    assert!(
        matches!(
            granted.outcome,
            Some(pb::publish_stream_response::Outcome::Published(_))
        ),
        "{granted:?}"
    );
    assert_status(
        bus.publish_stream(tokio_stream::iter(Vec::<pb::PublishStreamRequest>::new()))
            .await,
        Code::Unauthenticated,
        "",
    );
    assert_status(
        Subscriber::open_as(&mut bus, open(&[">"], ""), Some(&planner))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "may not subscribe >",
    );
    assert_status(
        Subscriber::open_as(&mut bus, open(&["task.>"], "testers"), Some(&planner))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "join group \"testers\"",
    );
    Subscriber::open_as(&mut bus, open(&["task.>"], "planners"), Some(&planner))
        .await
        .expect("granted types and group");
    assert_status(
        server
            .admin()
            .delete_group(authorized(
                pb::DeleteGroupRequest {
                    group: "planners".into(),
                },
                &planner,
            ))
            .await,
        Code::PermissionDenied,
        "may not administer \"groups/planners\"",
    );
    // a member may not read the group's admin view either
    refused_get_group(&server, &planner).await;
    assert_status(
        server
            .admin()
            .list_audit_records(authorized(pb::ListAuditRecordsRequest::default(), &planner))
            .await,
        Code::PermissionDenied,
        "audit",
    );
    // a caller with no credentials at all
    assert_status(
        bus.publish(pb::PublishRequest {
            events: vec![event("anon", "task.created")],
        })
        .await,
        Code::Unauthenticated,
        "credentials required",
    );

    let records = audit_records(&server, &admin).await;
    let has = |principal: &str, action: &str, resource: &str, outcome: &str| {
        records.iter().any(|r| {
            r.principal == principal
                && r.action == action
                && r.resource == resource
                && r.outcome == outcome
                && r.time.is_some()
        })
    };
    assert!(
        has("planner", "publish", "plan.created", "denied"),
        "{records:#?}"
    );
    assert!(
        has("planner", "publish", "task.created", "denied"),
        "{records:#?}"
    );
    assert!(has("planner", "subscribe", ">", "denied"), "{records:#?}");
    assert!(
        has("planner", "subscribe.group", "testers", "denied"),
        "{records:#?}"
    );
    assert!(
        has("planner", "admin.delete_group", "groups/planners", "denied"),
        "{records:#?}"
    );
    assert!(
        has("planner", "admin.get_group", "groups/planners", "denied"),
        "{records:#?}"
    );
    assert!(
        !records.iter().any(|r| r.principal.is_empty()),
        "{records:#?}"
    );
    // callers that never authenticated have no tenant: the default tenant's admins see them
    let root = hs_token(&claims("root"));
    let records = audit_records(&server, &root).await;
    assert!(
        records.iter().any(|r| r.principal.is_empty()
            && r.action == "call"
            && r.resource == "/nerve.v1.EventBus/Publish"
            && r.outcome == "unauthenticated"),
        "{records:#?}"
    );
    assert!(
        !records.iter().any(|r| r.principal == "planner"),
        "{records:#?}"
    );
    // an admin action is recorded as allowed
    server
        .admin()
        .delete_group(authorized(
            pb::DeleteGroupRequest {
                group: "planners".into(),
            },
            &admin,
        ))
        .await
        .expect("admin deletes");
    let records = audit_records(&server, &admin).await;
    assert!(
        records.iter().any(|r| r.principal == "admin"
            && r.action == "admin.delete_group"
            && r.outcome == "allowed"),
        "{records:#?}"
    );
}

#[tokio::test]
async fn refusals_of_unidentified_callers_are_audited_within_a_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 2 a second, bursts of 20: anyone can make these records, so a flood must not fill the table
    let server =
        server_with_policy(dir.path(), POLICY, |c| c.auth.unidentified_audit_rate = 2).await;
    let started = std::time::Instant::now();
    for i in 0..200 {
        let refused = server
            .bus()
            .publish(pb::PublishRequest {
                events: vec![event(&format!("anon-{i}"), "task.created")],
            })
            .await;
        assert_eq!(
            refused.expect_err("no credentials").code(),
            Code::Unauthenticated
        );
    }
    let allowed = 20 + 2 * (started.elapsed().as_secs() + 1) as usize;
    // an identified caller's refusal is always recorded
    let planner = hs_token(&claims("planner"));
    assert_status(
        publish_as(
            &server,
            &planner,
            vec![sourced("p", "plan.created", "planner")],
        )
        .await,
        Code::PermissionDenied,
        "not registered",
    );
    let root = hs_token(&claims("root"));
    let unidentified = audit_records(&server, &root)
        .await
        .iter()
        .filter(|r| r.outcome == "unauthenticated")
        .count();
    assert!(
        (1..=allowed).contains(&unidentified),
        "{unidentified} records of 200 refusals, at most {allowed} allowed"
    );
    let admin = hs_token(&claims("admin"));
    assert!(
        audit_records(&server, &admin)
            .await
            .iter()
            .any(|r| r.principal == "planner" && r.outcome == "denied")
    );
}

/// GetEvent without a source finds the one event of an id the admin may see, however many events of
/// other sources under that id it may not see come before it.
#[tokio::test]
async fn get_event_finds_the_visible_event_behind_many_hidden_of_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = r#"
[[principal]]
id = "writer"
tenant = "acme"
sources = ["//source-*", "//shop"]
allow = { publish = [">"] }

[[principal]]
id = "orders-admin"
tenant = "acme"
allow = { admin = ["types/orders.*"] }

[[principal]]
id = "auditor"
tenant = "acme"
allow = { admin = ["audit"] }
"#;
    let server = server_with_policy(dir.path(), policy, |_| {}).await;
    let writer = hs_token(&claims("writer"));
    let mut events: Vec<pb::Event> = (0..20)
        .map(|i| sourced("1", "secret.kept", &format!("//source-{i:02}")))
        .collect();
    events.push(sourced("1", "orders.placed", "//shop"));
    events.extend((0..20).map(|i| sourced("2", "secret.kept", &format!("//source-{i:02}"))));
    publish_as(&server, &writer, events).await.expect("publish");
    let admin = hs_token(&claims("orders-admin"));
    let found = server
        .admin()
        .get_event(authorized(
            pb::GetEventRequest {
                id: "1".into(),
                source: String::new(),
            },
            &admin,
        ))
        .await
        .expect("the one event of id 1 the admin may see")
        .into_inner();
    let event = found.event.expect("event");
    assert_eq!(
        (event.r#type.as_str(), event.source.as_str()),
        ("orders.placed", "//shop")
    );
    // an id of hidden events only is not found, and that refusal is one audit record, not one per
    // hidden event; the call that found its event was no refusal
    assert_status(
        server
            .admin()
            .get_event(authorized(
                pb::GetEventRequest {
                    id: "2".into(),
                    source: String::new(),
                },
                &admin,
            ))
            .await,
        Code::NotFound,
        "no event with id \"2\"",
    );
    let refusals: Vec<String> = audit_records(&server, &hs_token(&claims("auditor")))
        .await
        .into_iter()
        .filter(|r| r.principal == "orders-admin" && r.outcome == "denied")
        .map(|r| format!("{} {}", r.action, r.resource))
        .collect();
    assert_eq!(refusals, ["admin.get_event types/secret.kept"]);
}

/// The refusals of one identified principal are recorded at most `auth.denied_audit_rate` a second
/// (bursts of ten times that), each principal on its own: a caller with no grant cannot fill the
/// audit log, nor crowd out the records of others.
#[tokio::test]
async fn refusals_of_one_principal_are_recorded_within_its_rate() {
    const REFUSALS: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_with_policy(dir.path(), POLICY, |c| c.auth.denied_audit_rate = 1).await;
    let (planner, tool, admin) = (
        hs_token(&claims("planner")),
        hs_token(&claims("tool")),
        hs_token(&claims("admin")),
    );
    let started = std::time::Instant::now();
    for _ in 0..REFUSALS {
        refused_get_group(&server, &planner).await;
    }
    let seconds = started.elapsed().as_secs() as usize;
    refused_get_group(&server, &tool).await;
    let records = audit_records(&server, &admin).await;
    let denied = |principal: &str| {
        records
            .iter()
            .filter(|r| r.principal == principal && r.outcome == "denied")
            .count()
    };
    // a burst of ten, and one more for each second the calls took
    let recorded = denied("planner");
    assert!(
        (10..=11 + seconds).contains(&recorded),
        "{recorded} of {REFUSALS} refusals in {seconds} s recorded"
    );
    assert_eq!(denied("tool"), 1, "another principal's refusal is recorded");
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let planner = hs_token(&claims("planner"));
    let rival = hs_token(&claims("rival"));
    let mut bus = server.bus();
    // a live subscriber of the other tenant on the same types
    let mut spy = Subscriber::open_as(&mut bus, crate::harness::open(&[">"], ""), Some(&rival))
        .await
        .expect("rival subscribes to its own tenant");
    publish_as(
        &server,
        &planner,
        vec![sourced("secret-1", "task.created", "planner")],
    )
    .await
    .expect("acme publishes");
    publish_as(
        &server,
        &rival,
        vec![sourced("own-1", "task.created", "rival")],
    )
    .await
    .expect("globex publishes");
    // the rival's subscriber gets its own event, and only that
    let d = spy.next_delivery().await;
    assert_eq!(d.event.expect("event").id, "own-1");
    // replay of everything in its tenant shows only its own event
    let mut replay = server
        .bus()
        .replay(authorized(pb::ReplayRequest::default(), &rival))
        .await
        .expect("rival replays")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(page) = replay.message().await.expect("page") {
        ids.extend(page.events.into_iter().map(|e| e.id));
        if page.end_of_history {
            break;
        }
    }
    assert_eq!(ids, vec!["own-1".to_owned()]);
    // admin lookups stay inside the tenant
    let admin = hs_token(&claims("admin"));
    let found = server
        .admin()
        .get_event(authorized(
            pb::GetEventRequest {
                id: "own-1".into(),
                source: String::new(),
            },
            &admin,
        ))
        .await
        .expect_err("acme's admin cannot see globex's event");
    assert_eq!(found.code(), Code::NotFound, "{found:?}");
    // nor does one of its own tenant without a grant on the type learn that the event exists
    let hidden = server
        .admin()
        .get_event(authorized(
            pb::GetEventRequest {
                id: "secret-1".into(),
                source: String::new(),
            },
            &planner,
        ))
        .await
        .expect_err("the planner administers no types");
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    assert!(!hidden.message().contains("task.created"), "{hidden:?}");
    // replay outside the grants is refused, and audited
    assert_status(
        server
            .bus()
            .replay(authorized(pb::ReplayRequest::default(), &planner))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "may not replay >",
    );
    let records = audit_records(&server, &admin).await;
    assert!(
        records.iter().any(|r| r.principal == "planner"
            && r.action == "replay"
            && r.resource == ">"
            && r.outcome == "denied"),
        "{records:#?}"
    );
    assert!(
        records.iter().any(|r| r.principal == "planner"
            && r.action == "admin.get_event"
            && r.resource == "types/task.created"
            && r.outcome == "denied"),
        "{records:#?}"
    );
}

#[tokio::test]
async fn only_a_principal_allowed_to_answer_may_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let planner = hs_token(&claims("planner"));
    let tool = hs_token(&claims("tool"));
    let intruder = hs_token(&claims("intruder"));
    let mut bus = server.bus();
    let mut responder = Subscriber::open_as(&mut bus, open(&["tool.>"], ""), Some(&tool))
        .await
        .expect("tool subscribes");
    let asking = {
        let server_bus = server.bus();
        let planner = planner.clone();
        tokio::spawn(async move {
            let mut server_bus = server_bus;
            server_bus
                .request(authorized(
                    pb::RequestRequest {
                        event: Some(sourced("ask-1", "tool.run", "planner")),
                        timeout: crate::harness::millis(10_000),
                    },
                    &planner,
                ))
                .await
        })
    };
    let d = responder.next_delivery().await;
    let reply_to = d.event.expect("event").reply_to;
    let reply = |token: &str, source: &str, event_type: &str| {
        let mut bus = server.bus();
        let request = authorized(
            pb::ReplyRequest {
                reply_to: reply_to.clone(),
                event: Some(sourced(
                    &uuid::Uuid::new_v4().to_string(),
                    event_type,
                    source,
                )),
            },
            token,
        );
        async move { bus.reply(request).await }
    };
    assert_status(
        reply(&intruder, "intruder", "tool.done").await,
        Code::PermissionDenied,
        "may not reply \"tool.run\"",
    );
    // a reply is stored as an event of its own type: a type the replier may not publish stays out
    assert_status(
        reply(&tool, "tool", "billing.refund.approved").await,
        Code::PermissionDenied,
        "publishing \"billing.refund.approved\" is denied",
    );
    // nor one it may neither publish nor answer: subscribers of that type would receive it
    assert_status(
        reply(&tool, "tool", "task.created").await,
        Code::PermissionDenied,
        "may neither publish nor answer \"task.created\"",
    );
    let admin = hs_token(&claims("admin"));
    let records = audit_records(&server, &admin).await;
    assert!(
        records.iter().any(|r| r.principal == "intruder"
            && r.action == "reply"
            && r.resource == "tool.run"
            && r.outcome == "denied"),
        "{records:#?}"
    );
    let answered = reply(&tool, "tool", "tool.done")
        .await
        .expect("tool replies")
        .into_inner();
    assert!(answered.delivered);
    let response = tokio::time::timeout(WAIT, asking)
        .await
        .expect("answered in time")
        .expect("task")
        .expect("request succeeds")
        .into_inner();
    assert_eq!(response.reply.expect("reply").source, "tool");
    // with its requester gone the inbox is too: a reply is undelivered, and a type the replier may
    // not reply with is still refused, not answered as merely undelivered
    let late = reply(&tool, "tool", "tool.done")
        .await
        .expect("a late reply")
        .into_inner();
    assert!(!late.delivered);
    assert_status(
        reply(&tool, "tool", "task.created").await,
        Code::PermissionDenied,
        "may neither publish nor answer \"task.created\"",
    );
}

#[tokio::test]
async fn registered_publishers_publish_their_types_until_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let admin = hs_token(&claims("admin"));
    let mut billing_claims = claims("billing");
    billing_claims["tenant"] = json!("acme");
    let billing = hs_token(&billing_claims);
    let invoice = |id: &str, source: &str| vec![sourced(id, "invoice.sent", source)];
    assert_status(
        publish_as(&server, &billing, invoice("i0", "//billing")).await,
        Code::PermissionDenied,
        "not registered",
    );
    let registration = pb::Publisher {
        principal: "billing".into(),
        types: vec!["invoice.*".into()],
        sources: vec!["//billing".into()],
        description: "billing service".into(),
        update_time: None,
    };
    let mut admin_client = server.admin();
    admin_client
        .register_publisher(authorized(
            pb::RegisterPublisherRequest {
                publisher: Some(registration.clone()),
            },
            &admin,
        ))
        .await
        .expect("registered");
    assert_status(
        admin_client
            .register_publisher(authorized(
                pb::RegisterPublisherRequest {
                    publisher: Some(registration.clone()),
                },
                &admin,
            ))
            .await,
        Code::AlreadyExists,
        "already registered",
    );
    let mut bad = registration.clone();
    bad.types = vec!["invoice:{x}".into()];
    assert_status(
        admin_client
            .update_publisher(authorized(
                pb::UpdatePublisherRequest {
                    publisher: Some(bad),
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
        "types[0]",
    );
    publish_as(&server, &billing, invoice("i1", "//billing"))
        .await
        .expect("registered type and source");
    assert_status(
        publish_as(&server, &billing, invoice("i2", "//payments")).await,
        Code::PermissionDenied,
        "does not belong",
    );
    let listed = admin_client
        .list_publishers(authorized(pb::ListPublishersRequest::default(), &admin))
        .await
        .expect("listed")
        .into_inner()
        .publishers;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].types, vec!["invoice.*".to_owned()]);
    // another tenant's token for the same principal gets nothing from acme's registry
    let mut elsewhere = claims("billing");
    elsewhere["tenant"] = json!("globex");
    assert_status(
        publish_as(&server, &hs_token(&elsewhere), invoice("i3", "//billing")).await,
        Code::PermissionDenied,
        "not registered",
    );
    let removed = admin_client
        .remove_publisher(authorized(
            pb::RemovePublisherRequest {
                principal: "billing".into(),
            },
            &admin,
        ))
        .await
        .expect("removed")
        .into_inner();
    assert!(removed.removed);
    assert_status(
        publish_as(&server, &billing, invoice("i4", "//billing")).await,
        Code::PermissionDenied,
        "not registered",
    );
    let records = audit_records(&server, &admin).await;
    for action in ["admin.register_publisher", "admin.remove_publisher"] {
        assert!(
            records
                .iter()
                .any(|r| r.action == action && r.outcome == "allowed" && r.principal == "admin"),
            "{action}: {records:#?}"
        );
    }
}

// ---- bad input and connection abuse ----

#[tokio::test]
async fn names_that_could_reach_keys_or_sql_are_refused() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    for bad in [
        "a:b",
        "a{b}",
        "a}",
        "a.*",
        "x".repeat(300).as_str(),
        "a.>",
        "a b",
    ] {
        let status = bus
            .publish(pb::PublishRequest {
                events: vec![event("n", bad)],
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    for bad in ["g:1", "g{1}", &"g".repeat(200), "g'; DROP TABLE events; --"] {
        let status = Subscriber::open(&mut bus, open(&["a.b"], bad))
            .await
            .err()
            .expect("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    let status = bus
        .reply(pb::ReplyRequest {
            reply_to: "nerve:inbox:{x}".into(),
            event: Some(event("r", "a.b")),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // metadata beyond the HTTP/2 header limit is refused and the server keeps serving
    let mut request = Request::new(pb::PublishRequest {
        events: vec![event("meta", "a.b")],
    });
    request
        .metadata_mut()
        .insert("x-filler", "y".repeat(64 * 1024).parse().expect("ascii"));
    let status = bus.publish(request).await.expect_err("oversized metadata");
    assert_ne!(status.code(), Code::Ok);
    bus.publish(pb::PublishRequest {
        events: vec![event("after", "a.b")],
    })
    .await
    .expect("still serving");
}

/// A stream goes on no longer than the token it was opened with is accepted (no leeway here): a
/// subscription, a replay and a publish stream opened with a token about to expire end with
/// UNAUTHENTICATED naming the expiry, after what they had sent, and the group delivery left unsettled
/// goes to a member whose token is still good.
#[tokio::test]
async fn streams_end_with_unauthenticated_when_their_token_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        server_with_policy(dir.path(), POLICY, |c| c.auth.jwt.leeway = Duration::ZERO).await;
    let mut bus = server.bus();
    let planner =
        |exp: i64| hs_token(&json!({"sub": "planner", "iss": ISSUER, "aud": AUDIENCE, "exp": exp}));
    let lasting = planner(now() + 600);
    // 4 MB of history: more than the server and a connection with small windows hold for a replay
    // that is not read
    let text = "x".repeat(1_000);
    for batch in 0..40 {
        let events = (0..100)
            .map(|i| {
                let mut e = sourced(&format!("h{batch}-{i}"), "task.history", "planner");
                e.data = Some(pb::event::Data::TextData(text.clone()));
                e
            })
            .collect();
        publish_as(&server, &lasting, events)
            .await
            .expect("history");
    }
    let expiring = planner(now() + 5);

    let mut member =
        Subscriber::open_as(&mut bus, open(&["task.held"], "planners"), Some(&expiring))
            .await
            .expect("the group member opens");
    let held = publish_as(
        &server,
        &lasting,
        vec![sourced("held", "task.held", "planner")],
    )
    .await
    .expect("published")
    .results[0]
        .sequence;
    assert_eq!(
        member.next_delivery().await.event.expect("event").sequence,
        held
    );
    let mut other = Subscriber::open_as(&mut bus, open(&["task.held"], "planners"), Some(&lasting))
        .await
        .expect("a second member opens");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr()))
        .expect("uri")
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .expect("connects");
    let mut replay = pb::event_bus_client::EventBusClient::new(channel)
        .replay(authorized(
            pb::ReplayRequest {
                types: vec!["task.history".into()],
                page_size: 100,
                ..Default::default()
            },
            &expiring,
        ))
        .await
        .expect("the replay opens")
        .into_inner();
    let first = replay.message().await.expect("a page").expect("open");
    assert_eq!(first.events.len(), 100);

    let (requests, queued) = tokio::sync::mpsc::channel(4);
    let mut answers = bus
        .publish_stream(authorized(
            tokio_stream::wrappers::ReceiverStream::new(queued),
            &expiring,
        ))
        .await
        .expect("the publish stream opens")
        .into_inner();
    requests
        .send(pb::PublishStreamRequest {
            request_id: 1,
            events: vec![sourced("sent", "task.sent", "planner")],
        })
        .await
        .expect("queued");
    let answer = answers.message().await.expect("answered").expect("open");
    assert!(
        matches!(
            answer.outcome,
            Some(pb::publish_stream_response::Outcome::Published(_))
        ),
        "{answer:?}"
    );

    // nothing is read from the replay until the token has expired
    let ended = member.next_message(WAIT).await;
    assert_token_expired(ended);
    let ended = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("the publish stream ends");
    assert_token_expired(ended);
    let mut replayed = first.events.len();
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match replay.message().await {
                Ok(Some(page)) => {
                    assert!(
                        !page.end_of_history,
                        "replayed to the end after the token expired"
                    );
                    replayed += page.events.len();
                }
                Ok(None) => panic!("the replay ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the replay ends");
    assert_token_expired(Err::<(), _>(ended));
    assert!(replayed < 4_000, "{replayed} events replayed");

    let redelivered = other.next_delivery().await;
    assert_eq!(redelivered.event.expect("event").sequence, held);
    assert_eq!(redelivered.attempt, 2);
    // the expired token opens nothing more
    assert_status(
        Subscriber::open_as(&mut bus, open(&["task.held"], "planners"), Some(&expiring))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "expired",
    );
}

#[tokio::test]
async fn streams_per_principal_are_capped() {
    let server = TestServer::start_with(|c| c.connections.max_streams_per_principal = 3).await;
    let mut bus = server.bus();
    let mut open_streams = Vec::new();
    for i in 0..3 {
        open_streams.push(
            Subscriber::open(&mut bus, open(&["cap.x"], &format!("g{i}")))
                .await
                .expect("under the cap"),
        );
    }
    let refused = Subscriber::open(&mut bus, open(&["cap.x"], "g3")).await;
    assert_status(refused.map(|_| ()), Code::ResourceExhausted, "open streams");
    // closing one frees its place
    drop(open_streams.pop());
    let reopened = tokio::time::timeout(WAIT, async {
        loop {
            match Subscriber::open(&mut bus, open(&["cap.x"], "g3")).await {
                Ok(s) => return s,
                // the server notices the closed stream a moment after the client drops it
                Err(s) if s.code() == Code::ResourceExhausted => tokio::task::yield_now().await,
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed stream's place was not freed");
}

/// A waiting Request holds an inbox until its reply or timeout: it counts as a stream does.
#[tokio::test]
async fn waiting_requests_count_among_a_principals_streams() {
    let server = TestServer::start_with(|c| c.connections.max_streams_per_principal = 3).await;
    let mut bus = server.bus();
    // a responder that never answers: one of the three places
    let mut responder = Subscriber::open(&mut bus, open(&["cap.asked"], ""))
        .await
        .expect("open");
    let mut waiting = Vec::new();
    for i in 0..2 {
        waiting.push(crate::harness::request_in_background(
            server.bus(),
            event(&format!("asked-{i}"), "cap.asked"),
            60_000,
        ));
        // waiting once its request is delivered
        responder.next_delivery().await;
    }
    let refused = bus
        .request(pb::RequestRequest {
            event: Some(event("asked-2", "cap.asked")),
            timeout: millis(60_000),
        })
        .await;
    assert_status(
        refused.map(|_| ()),
        Code::ResourceExhausted,
        "open streams and waiting requests",
    );
    // a request that ends frees its place
    waiting.pop().expect("a request").abort();
    let asked = tokio::time::timeout(WAIT, async {
        loop {
            match bus
                .request(pb::RequestRequest {
                    event: Some(event("asked-3", "cap.asked")),
                    timeout: millis(100),
                })
                .await
            {
                // the server notices the cancelled call a moment after the client drops it
                Err(s) if s.code() == Code::ResourceExhausted => tokio::task::yield_now().await,
                other => return other,
            }
        }
    })
    .await
    .expect("a cancelled request's place was not freed");
    assert_status(asked.map(|_| ()), Code::DeadlineExceeded, "asked-3");
}

#[tokio::test]
async fn concurrent_streams_per_connection_are_capped() {
    let server = TestServer::start_with(|c| c.connections.max_concurrent_streams = 4).await;
    let mut bus = server.bus();
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(
            Subscriber::open(&mut bus, open(&["cap.x"], &format!("g{i}")))
                .await
                .expect("within the connection's limit"),
        );
    }
    // the server advertised 4: a 5th call on the same connection is not started
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        bus.publish(pb::PublishRequest {
            events: vec![event("fifth", "cap.x")],
        }),
    )
    .await;
    assert!(waiting.is_err(), "a 5th concurrent stream was admitted");
    drop(held.pop());
    tokio::time::timeout(
        WAIT,
        bus.publish(pb::PublishRequest {
            events: vec![event("fifth", "cap.x")],
        }),
    )
    .await
    .expect("a slot frees up")
    .expect("publish succeeds");
}

#[tokio::test]
async fn stalled_handshakes_are_dropped_while_clients_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("ca");
    let server = TestServer::start_with(|c| {
        let (cert, key) = pki.issue(vec![dns("localhost")], "server");
        c.tls.cert_file = write(dir.path(), "server.pem", &cert);
        c.tls.key_file = write(dir.path(), "server.key", &key);
        c.tls.handshake_timeout = Duration::from_millis(500);
        c.insecure = true;
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..200 {
        stalled.push(
            tokio::net::TcpStream::connect(server.addr())
                .await
                .expect("tcp connect"),
        );
    }
    let channel = tls_channel(server.addr(), &pki.ca_pem, None)
        .await
        .expect("a real client connects meanwhile");
    pb::event_bus_client::EventBusClient::new(channel.clone())
        .publish(pb::PublishRequest {
            events: vec![event("during", "a.b")],
        })
        .await
        .expect("and is served");
    for mut socket in stalled {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .expect("the server closes a stalled handshake");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    pb::event_bus_client::EventBusClient::new(channel)
        .publish(pb::PublishRequest {
            events: vec![event("after", "a.b")],
        })
        .await
        .expect("still served");
}

#[tokio::test]
async fn publish_rate_is_limited_per_principal() {
    let server = TestServer::start_with(|c| {
        c.connections.publish_rate_per_principal = 1;
        c.connections.publish_burst = 3;
    })
    .await;
    let mut bus = server.bus();
    let mut outcomes = Vec::new();
    for i in 0..6 {
        outcomes.push(
            bus.publish(pb::PublishRequest {
                events: vec![event(&format!("r{i}"), "a.b")],
            })
            .await,
        );
    }
    let limited: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(!limited.is_empty(), "no call was limited");
    assert!(
        outcomes.iter().take(3).all(Result::is_ok),
        "the burst passes"
    );
    for status in limited {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("rate limit"), "{status:?}");
    }
}

/// A request and a reply store an event each, as a publish does: they count against the same rate.
#[tokio::test]
async fn requests_and_replies_count_against_the_publish_rate() {
    let server = TestServer::start_with(|c| {
        c.connections.publish_rate_per_principal = 1;
        c.connections.publish_burst = 1;
    })
    .await;
    let mut bus = server.bus();
    bus.publish(pb::PublishRequest {
        events: vec![event("first", "a.b")],
    })
    .await
    .expect("the burst passes");
    let request = bus
        .request(pb::RequestRequest {
            event: Some(event("asked", "a.b")),
            timeout: None,
        })
        .await
        .expect_err("a request past the rate");
    let reply = bus
        .reply(pb::ReplyRequest {
            reply_to: format!("_inbox.{}", "0".repeat(32)),
            event: Some(event("answered", "a.b")),
        })
        .await
        .expect_err("a reply past the rate");
    for status in [request, reply] {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("rate limit"), "{status:?}");
    }
}

#[tokio::test]
async fn one_subject_in_two_tenants_has_a_publish_rate_in_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    // no tenant in the policy: each token's tenant claim decides
    let policy = r#"
[[principal]]
id = "multi"
allow = { publish = ["task.>"] }
"#;
    let server = server_with_policy(dir.path(), policy, |c| {
        c.connections.publish_rate_per_principal = 1;
        c.connections.publish_burst = 1;
    })
    .await;
    let in_tenant = |tenant: &str| {
        let mut claims = claims("multi");
        claims["tenant"] = json!(tenant);
        hs_token(&claims)
    };
    let (a, b) = (in_tenant("alpha"), in_tenant("beta"));
    let one = |id: &str| vec![sourced(id, "task.created", "multi")];
    publish_as(&server, &a, one("a1"))
        .await
        .expect("alpha's burst");
    assert_status(
        publish_as(&server, &a, one("a2")).await,
        Code::ResourceExhausted,
        "rate limit",
    );
    publish_as(&server, &b, one("b1"))
        .await
        .expect("beta's calls do not use alpha's rate");
}

#[tokio::test]
async fn publish_stream_requests_count_against_the_publish_rate() {
    let server = TestServer::start_with(|c| {
        c.connections.publish_rate_per_principal = 1;
        c.connections.publish_burst = 3;
    })
    .await;
    let requests = (0..6u64).map(|i| pb::PublishStreamRequest {
        request_id: i,
        events: vec![event(&format!("r{i}"), "a.b")],
    });
    let mut answers = server
        .bus()
        .publish_stream(tokio_stream::iter(requests))
        .await
        .expect("the stream opens")
        .into_inner();
    let mut limited = 0;
    for i in 0..6u64 {
        let answer = answers.message().await.expect("answer").expect("open");
        assert_eq!(answer.request_id, i);
        match answer.outcome {
            // the bucket refills at 1/s, so a later request may pass again
            Some(pb::publish_stream_response::Outcome::Published(_)) => {}
            Some(pb::publish_stream_response::Outcome::Error(e)) => {
                assert!(i >= 3, "the burst passes: {e:?}");
                assert_eq!(e.code, Code::ResourceExhausted as i32, "{e:?}");
                assert!(e.message.contains("rate limit"), "{e:?}");
                limited += 1;
            }
            None => panic!("no outcome"),
        }
    }
    assert!(limited > 0, "no request was limited");
}

#[tokio::test]
async fn a_stream_that_never_opens_is_ended() {
    let server = TestServer::start_with(|c| {
        c.connections.stream_open_timeout = Duration::from_millis(200);
    })
    .await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(1);
    let status = tokio::time::timeout(
        WAIT,
        server
            .bus()
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("ended in time")
    .expect_err("no open message");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn listening_beyond_loopback_without_auth_needs_insecure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = crate::harness::test_config(dir.path());
    config.listen = "0.0.0.0:0".parse().expect("addr");
    let backends = nerve::open_backends(&config).await.expect("backends");
    let err = nerve::start(config.clone(), backends.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("--insecure"), "{err}");
    config.insecure = true;
    let server = nerve::start(config, backends)
        .await
        .expect("starts with --insecure");
    server.shutdown();
}

#[tokio::test]
async fn the_dev_pki_script_makes_a_working_mtls_and_jwt_setup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("pki");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-pki.sh");
    let made = std::process::Command::new("bash")
        .arg(script)
        .arg(&out)
        .arg("planner")
        .output()
        .expect("run scripts/dev-pki.sh");
    assert!(made.status.success(), "{made:?}");
    let args = nerve::config::Args {
        config: Some(out.join("nerve.toml")),
        ..Default::default()
    };
    let (mut config, _) = nerve::config::load(&args, []).expect("the generated nerve.toml loads");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = dir.path().join("data");
    let backends = nerve::open_backends(&config).await.expect("backends");
    let server = TestServer::start_on(config, backends, tempfile::tempdir().expect("dir")).await;
    let read = |name: &str| std::fs::read_to_string(out.join(name)).expect("generated file");
    let identity = (read("planner.pem"), read("planner.key"));
    let channel = tls_channel(server.addr(), &read("ca.pem"), Some(&identity))
        .await
        .expect("the generated certificates connect");
    let token = read("planner.jwt");
    pb::event_bus_client::EventBusClient::new(channel)
        .publish(authorized(
            pb::PublishRequest {
                events: vec![sourced("hello", "dev.hello", "//planner")],
            },
            token.trim(),
        ))
        .await
        .expect("certificate + token + policy let the planner publish");
}

const GAUGE_POLICY: &str = r#"
[[principal]]
id = "ann"
tenant = "acme"
allow = { publish = ["gauge.>"], subscribe = ["gauge.>"], groups = ["*"] }

[[principal]]
id = "bob"
tenant = "globex"
allow = { publish = ["gauge.>"], subscribe = ["gauge.>"], groups = ["*"] }
"#;

/// The sampled group gauges cover every tenant's groups (not only the default tenant's), and groups of
/// one name in two tenants add up, as the counters do.
#[tokio::test]
async fn group_gauges_cover_every_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_with_policy(dir.path(), GAUGE_POLICY, |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.group_sample_interval = Duration::from_millis(100);
    })
    .await;
    let ann = hs_token(&claims("ann"));
    let bob = hs_token(&claims("bob"));
    let mut bus = server.bus();
    // the groups exist once a member has opened them; with no member left, what follows is their
    // lag. Each member ends before the events come: one whose session outlived its cancelled call
    // would claim them, and they would be pending, not lag
    for (token, group) in [(&ann, "shared"), (&bob, "shared"), (&bob, "globex-only")] {
        let mut member = Subscriber::open_as(&mut bus, open(&["gauge.>"], group), Some(token))
            .await
            .expect("member opens");
        member.close_gracefully().await.expect("member closes");
    }
    let events = |prefix: &str, source: &str, n: usize| {
        (0..n)
            .map(|i| sourced(&format!("{prefix}{i}"), "gauge.tick", source))
            .collect::<Vec<_>>()
    };
    publish_as(&server, &ann, events("a", "ann", 2))
        .await
        .expect("acme publishes");
    publish_as(&server, &bob, events("b", "bob", 3))
        .await
        .expect("globex publishes");
    crate::harness::eventually("every tenant's groups sampled", || async {
        let text = server.scrape().await;
        let lag =
            |group| crate::observability::value(&text, "nerve_group_lag", &[("group", group)]);
        (lag("shared") == 5.0 && lag("globex-only") == 3.0).then_some(())
    })
    .await;
}

/// What a refused caller sent is audited before it is validated: control characters in it are escaped,
/// so a NUL (which Postgres refuses) neither loses that record nor the others written with it.
#[tokio::test]
async fn a_refused_call_with_control_characters_is_audited_escaped_with_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let planner = hs_token(&claims("planner"));
    let admin = hs_token(&claims("admin"));
    let refusals = ["plan\u{0}created", "plan.created", "plan\u{7}bell"].map(|event_type| {
        let server = &server;
        let planner = &planner;
        async move {
            publish_as(server, planner, vec![sourced("x", event_type, "planner")])
                .await
                .expect_err("refused")
        }
    });
    for status in futures::future::join_all(refusals).await {
        assert!(
            matches!(
                status.code(),
                Code::PermissionDenied | Code::InvalidArgument
            ),
            "{status:?}"
        );
    }
    let records = audit_records(&server, &admin).await;
    for resource in ["plan\\u{0}created", "plan.created", "plan\\u{7}bell"] {
        assert!(
            records
                .iter()
                .any(|r| r.principal == "planner" && r.resource == resource),
            "{resource} in {records:#?}"
        );
    }
}

/// A token whose subject or tenant holds a control character names no identity the bus can store.
#[tokio::test]
async fn a_token_with_a_control_character_in_its_identity_is_unauthenticated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let mut tenant = claims("planner");
    tenant["tenant"] = "acme\u{0}".into();
    for (token, needle) in [
        (hs_token(&claims("plan\u{0}ner")), "sub"),
        (hs_token(&tenant), "tenant"),
    ] {
        assert_status(
            publish_as(
                &server,
                &token,
                vec![sourced("x", "task.created", "planner")],
            )
            .await,
            Code::Unauthenticated,
            needle,
        );
    }
}

/// Admin text that is stored or matched against stored text: a control character (which Postgres
/// refuses, an INTERNAL error where SQLite stored it) or an oversized description is INVALID_ARGUMENT
/// naming the field, on every call that takes it.
#[tokio::test]
async fn admin_text_with_control_characters_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = policy_server(dir.path()).await;
    let admin = hs_token(&claims("admin"));
    let root = hs_token(&claims("root"));
    let mut client = server.admin();
    let registration = pb::Publisher {
        principal: "billing".into(),
        types: vec!["invoice.*".into()],
        sources: vec!["//billing".into()],
        description: "billing service".into(),
        update_time: None,
    };
    type Spoil = fn(&mut pb::Publisher);
    let spoilt: [(Spoil, &str); 4] = [
        (
            |p| p.principal = "bill\u{0}ing".into(),
            "publisher.principal",
        ),
        (
            |p| p.description = "a\u{0}b".into(),
            "publisher.description",
        ),
        (
            |p| p.description = "x".repeat(4097),
            "publisher.description",
        ),
        (
            |p| p.sources = vec!["//bill\u{0}ing".into()],
            "publisher.sources",
        ),
    ];
    for (spoil, field) in spoilt {
        let mut publisher = registration.clone();
        spoil(&mut publisher);
        assert_status(
            client
                .register_publisher(authorized(
                    pb::RegisterPublisherRequest {
                        publisher: Some(publisher),
                    },
                    &admin,
                ))
                .await,
            Code::InvalidArgument,
            field,
        );
    }
    assert_status(
        client
            .remove_publisher(authorized(
                pb::RemovePublisherRequest {
                    principal: "bill\u{0}ing".into(),
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
        "principal",
    );
    assert_status(
        client
            .list_audit_records(authorized(
                pb::ListAuditRecordsRequest {
                    principal: "\u{0}".into(),
                    ..Default::default()
                },
                &root,
            ))
            .await,
        Code::InvalidArgument,
        "principal",
    );
}

/// The ids of the planner's denials in the audit log, read as `admin` in pages of `page_size`
/// following the tokens, and how many pages that took.
async fn planner_denials(server: &TestServer, admin: &str, page_size: u32) -> (Vec<u64>, usize) {
    let (mut ids, mut pages, mut page_token) = (Vec::new(), 0, String::new());
    loop {
        let page = server
            .admin()
            .list_audit_records(authorized(
                pb::ListAuditRecordsRequest {
                    principal: "planner".into(),
                    outcome: "denied".into(),
                    page_size,
                    page_token,
                },
                admin,
            ))
            .await
            .expect("admin reads the audit log")
            .into_inner();
        pages += 1;
        ids.extend(page.records.iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            return (ids, pages);
        }
        assert!(pages < 20, "the pages never end: {ids:?}");
        page_token = page.next_page_token;
    }
}

/// A page of audit records ends early when its records would not fit one answer's share of the
/// message limit (`limits.max_batch_bytes`), as pages of events do; the next page goes on from it.
#[tokio::test]
async fn audit_records_too_large_for_one_page_end_it_early() {
    const DENIALS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    // about two of these records fit 300 bytes
    let server = server_with_policy(dir.path(), POLICY, |c| c.limits.max_batch_bytes = 300).await;
    let (planner, admin) = (hs_token(&claims("planner")), hs_token(&claims("admin")));
    for _ in 0..DENIALS {
        refused_get_group(&server, &planner).await;
    }
    let (ids, pages) = planner_denials(&server, &admin, 0).await;
    assert_eq!(ids.len(), DENIALS, "{ids:?}");
    assert!(pages > 1, "one page of {DENIALS} records over 300 bytes");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
}

/// Audit records come a page at a time in the order recorded, and a last page that is exactly full
/// has no token.
#[tokio::test]
async fn an_exactly_full_last_page_of_audit_records_has_no_token() {
    const DENIALS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_with_policy(dir.path(), POLICY, |_| {}).await;
    let (planner, admin) = (hs_token(&claims("planner")), hs_token(&claims("admin")));
    for _ in 0..DENIALS {
        refused_get_group(&server, &planner).await;
    }
    let pages = |page_size| planner_denials(&server, &admin, page_size);
    let (all, _) = pages(0).await;
    assert_eq!(all.len(), DENIALS, "{all:?}");
    for (page_size, count) in [(2, 2), (4, 1), (3, 2), (5, 1), (1, 4)] {
        assert_eq!(
            pages(page_size).await,
            (all.clone(), count),
            "pages of {page_size}"
        );
    }
}

/// The admin lists (ListEventTypes, ListGroups, ListPublishers) come a page at a time in name order,
/// each page starting after the last name of the one before, with only what the caller may
/// administer: hidden names between shown ones neither shorten a page nor show. The last page has no
/// token, even when it is exactly full; a page ends early to fit one message.
#[tokio::test]
async fn admin_lists_page_through_what_the_caller_may_administer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = format!(
        r#"{POLICY}
[[principal]]
id = "writer"
tenant = "acme"
sources = ["//tests"]
allow = {{ publish = [">"], subscribe = [">"], groups = ["*"] }}

[[principal]]
id = "curator"
tenant = "acme"
allow = {{ admin = ["types/*.shown", "groups/*-shown", "publishers/*-shown"] }}
"#
    );
    // pages carry 12 KiB: two publishers with 4 KiB descriptions each
    let server =
        server_with_policy(dir.path(), &policy, |c| c.limits.max_batch_bytes = 12 << 10).await;
    let token = |sub: &str| {
        let mut c = claims(sub);
        c["tenant"] = json!("acme");
        hs_token(&c)
    };
    let (writer, curator, admin) = (token("writer"), token("curator"), token("admin"));
    let types = [
        "a.shown", "b.hidden", "c.shown", "d.hidden", "e.shown", "f.hidden", "g.shown", "h.shown",
    ];
    for (i, t) in types.iter().enumerate() {
        publish_as(&server, &writer, vec![event(&format!("e{i}"), t)])
            .await
            .expect("published");
    }
    let mut bus = server.bus();
    for g in ["a-shown", "b-hidden", "c-shown", "d-hidden", "e-shown"] {
        Subscriber::open_as(&mut bus, open(&["a.shown"], g), Some(&writer))
            .await
            .expect("group created")
            .close();
    }
    let mut admin_client = server.admin();
    for p in [
        "a-shown", "b-hidden", "c-shown", "d-shown", "e-shown", "f-shown",
    ] {
        admin_client
            .register_publisher(authorized(
                pb::RegisterPublisherRequest {
                    publisher: Some(pb::Publisher {
                        principal: p.into(),
                        types: vec!["a.shown".into()],
                        sources: vec!["//x".into()],
                        description: "d".repeat(4096),
                        update_time: None,
                    }),
                },
                &admin,
            ))
            .await
            .expect("registered");
    }

    #[derive(Clone, Copy)]
    enum List {
        Types,
        Groups,
        Publishers,
    }
    // the names on each page of a list, following its tokens to the end
    async fn pages(server: &TestServer, list: List, who: &str, page_size: u32) -> Vec<Vec<String>> {
        let mut client = server.admin();
        let mut pages = Vec::new();
        let mut page_token = String::new();
        loop {
            let (names, next): (Vec<String>, String) = match list {
                List::Types => {
                    let request = pb::ListEventTypesRequest {
                        page_size,
                        page_token,
                    };
                    let r = client
                        .list_event_types(authorized(request, who))
                        .await
                        .expect("types")
                        .into_inner();
                    let names = r.types.into_iter().map(|t| t.r#type).collect();
                    (names, r.next_page_token)
                }
                List::Groups => {
                    let request = pb::ListGroupsRequest {
                        page_size,
                        page_token,
                    };
                    let r = client
                        .list_groups(authorized(request, who))
                        .await
                        .expect("groups")
                        .into_inner();
                    let names = r.groups.into_iter().map(|g| g.name).collect();
                    (names, r.next_page_token)
                }
                List::Publishers => {
                    let request = pb::ListPublishersRequest {
                        page_size,
                        page_token,
                    };
                    let r = client
                        .list_publishers(authorized(request, who))
                        .await
                        .expect("publishers")
                        .into_inner();
                    let names = r.publishers.into_iter().map(|p| p.principal).collect();
                    (names, r.next_page_token)
                }
            };
            pages.push(names);
            if next.is_empty() {
                return pages;
            }
            assert!(pages.len() < 20, "the pages never end: {pages:?}");
            page_token = next;
        }
    }
    assert_eq!(
        pages(&server, List::Types, &curator, 2).await,
        [
            vec!["a.shown", "c.shown"],
            vec!["e.shown", "g.shown"],
            vec!["h.shown"]
        ]
    );
    assert_eq!(
        pages(&server, List::Types, &admin, 0).await,
        [types.to_vec()]
    );
    assert_eq!(
        pages(&server, List::Types, &admin, 8).await,
        [types.to_vec()]
    );
    assert_eq!(
        pages(&server, List::Groups, &curator, 2).await,
        [vec!["a-shown", "c-shown"], vec!["e-shown"]]
    );
    assert_eq!(
        pages(&server, List::Groups, &curator, 3).await,
        [vec!["a-shown", "c-shown", "e-shown"]]
    );
    // three of 4 KiB do not fit 12 KiB: the pages end early, and nothing is skipped
    assert_eq!(
        pages(&server, List::Publishers, &curator, 1000).await,
        [
            vec!["a-shown", "c-shown"],
            vec!["d-shown", "e-shown"],
            vec!["f-shown"]
        ]
    );

    let mut client = server.admin();
    assert_status(
        client
            .list_groups(authorized(
                pb::ListGroupsRequest {
                    page_size: 1001,
                    ..Default::default()
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        client
            .list_event_types(authorized(
                pb::ListEventTypesRequest {
                    page_token: "a\0".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
        "page_token",
    );
}

/// Audit records older than `auth.audit_retention` are deleted as they age out; newer ones stay.
#[tokio::test]
async fn audit_records_older_than_the_retention_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let retention = Duration::from_secs(3);
    let server =
        server_with_policy(dir.path(), POLICY, |c| c.auth.audit_retention = retention).await;
    let planner = hs_token(&claims("planner"));
    let admin = hs_token(&claims("admin"));
    let denied = |resource: &'static str| {
        let server = &server;
        let planner = planner.clone();
        async move {
            let refused = publish_as(server, &planner, vec![event("x", resource)]).await;
            assert_eq!(refused.expect_err("denied").code(), Code::PermissionDenied);
        }
    };
    let resources = |records: Vec<pb::AuditRecord>| -> Vec<String> {
        records
            .into_iter()
            .filter(|r| r.principal == "planner")
            .map(|r| r.resource)
            .collect()
    };
    denied("aged.first").await;
    assert_eq!(
        resources(audit_records(&server, &admin).await),
        ["aged.first"]
    );
    eventually("the old record to be deleted", || async {
        resources(audit_records(&server, &admin).await)
            .is_empty()
            .then_some(())
    })
    .await;
    denied("aged.second").await;
    assert_eq!(
        resources(audit_records(&server, &admin).await),
        ["aged.second"],
        "a record younger than the retention stays"
    );
}

/// A graceful shutdown waits until the audit records of the calls before it are in the store: they
/// are queued for a writer of their own, which the process' end would otherwise cut short.
#[tokio::test]
async fn a_shutdown_waits_for_the_audit_records_queued_before_it() {
    let (server, injection) = crate::injected_store::start_injected().await;
    let (reached, go) = injection.before_append_audit.arm();
    server
        .admin()
        .delete_group(pb::DeleteGroupRequest {
            group: "audited".into(),
        })
        .await
        .expect("delete");
    reached.wait("the delete's audit record written").await;
    let mut stopping = tokio::spawn(server.stop());
    // a stop cannot be seen not to happen: it is given half a second with the record held
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut stopping)
            .await
            .is_err(),
        "the server stopped with an audit record not yet in the store"
    );
    drop(go);
    tokio::time::timeout(crate::harness::WAIT, stopping)
        .await
        .expect("the server stops once the record is written")
        .expect("stop");
}
