//! JWT bearer tokens: allowed algorithms only, keys from an HMAC secret, PEM public keys or a JWKS file
//! (by `kid`), all re-read when their files change; iss, aud, exp and sub required, nbf checked.

use std::{
    collections::HashMap,
    str::FromStr,
    time::{Duration, SystemTime},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    errors::ErrorKind,
    jwk::{Jwk, KeyOperations, PublicKeyUse},
};
use serde_json::{Map, Value};
use tracing::warn;

use super::{AuthError, config::JwtConfig, watched::Watched};

/// Longest leeway accepted in the configuration.
pub const MAX_LEEWAY_SECS: u64 = 60;

/// What a valid token says about its bearer.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    /// `sub`.
    pub subject: String,
    /// The configured tenant claim, when present.
    pub tenant: Option<String>,
    /// When the token stops being accepted: its `exp` plus the leeway. `None` when that lies beyond
    /// what the clock can represent.
    pub expires: Option<SystemTime>,
}

impl TokenClaims {
    /// Refuses the token once its `exp` plus the leeway has passed.
    pub fn unexpired(&self) -> Result<(), AuthError> {
        if self.expires.is_some_and(|at| at <= SystemTime::now()) {
            return Err(AuthError::TokenExpired("token has expired".into()));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Keys {
    /// Keys for tokens without `kid`; each serves the algorithm family it belongs to.
    static_keys: Vec<DecodingKey>,
    /// JWKS keys by `kid`, with the algorithm the JWK pins, if any.
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
}

/// Verifies bearer tokens.
pub struct JwtVerifier {
    config: JwtConfig,
    algorithms: Vec<Algorithm>,
    keys: Watched<Keys>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

fn load_keys(config: &JwtConfig) -> Result<Keys, String> {
    let mut keys = Keys::default();
    if let Some(path) = super::config::path(&config.hs_secret_file) {
        let secret = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let secret = secret.trim_ascii();
        if secret.len() < 32 {
            return Err(format!(
                "{}: an HMAC secret must be at least 32 bytes",
                path.display()
            ));
        }
        keys.static_keys.push(DecodingKey::from_secret(secret));
    }
    for file in &config.public_key_files {
        let pem = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
        let key = DecodingKey::from_rsa_pem(&pem)
            .or_else(|_| DecodingKey::from_ec_pem(&pem))
            .or_else(|_| DecodingKey::from_ed_pem(&pem))
            .map_err(|e| format!("{file}: not an RSA, EC or Ed25519 public key in PEM: {e}"))?;
        keys.static_keys.push(key);
    }
    if let Some(path) = super::config::path(&config.jwks_file) {
        /// The document, each key read on its own: one this server cannot use is left out, not the
        /// whole set (which would keep the previous keys, removed ones too, in service).
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let document: Document = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not a JWKS document: {e}", path.display()))?;
        for (index, key) in document.keys.into_iter().enumerate() {
            match verifying_key(key) {
                Ok((kid, key, alg)) => {
                    keys.by_kid.insert(kid, (key, alg));
                }
                Err(why) => {
                    warn!(file = %path.display(), index, "a JWKS key is not used: {why}");
                }
            }
        }
    }
    Ok(keys)
}

/// A JWKS entry as a key that verifies signatures: its kid, the key, and the algorithm it is pinned
/// to, if any. Refused: no kid, a key meant for something else (`use` other than `sig`, `key_ops`
/// without `verify`, an `alg` that is not a signing algorithm), or one the token library cannot load.
fn verifying_key(key: Value) -> Result<(String, DecodingKey, Option<Algorithm>), String> {
    let jwk: Jwk = serde_json::from_value(key).map_err(|e| format!("not a key: {e}"))?;
    let kid = jwk.common.key_id.clone().ok_or("it has no kid")?;
    if let Some(key_use) = &jwk.common.public_key_use
        && *key_use != PublicKeyUse::Signature
    {
        return Err(format!(
            "key {kid:?} is not for signatures (use {key_use:?})"
        ));
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err(format!(
            "key {kid:?} is not for verifying (key_ops {ops:?})"
        ));
    }
    let alg =
        match jwk.common.key_algorithm {
            None => None,
            // the library names its algorithms as JWA does; an encryption one (RSA-OAEP) is not among
            // the signing ones
            Some(alg) => Some(Algorithm::from_str(&alg.to_string()).map_err(|_| {
                format!("key {kid:?} is pinned to {alg:?}, not a signing algorithm")
            })?),
        };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
    Ok((kid, key, alg))
}

impl JwtVerifier {
    /// Loads the keys; fails with a message naming the bad setting or file.
    pub fn new(config: &JwtConfig, reload_interval: std::time::Duration) -> Result<Self, String> {
        if config.issuer.is_empty() || config.audience.is_empty() {
            return Err("auth.jwt.issuer and auth.jwt.audience are required with JWT keys".into());
        }
        if config.algorithms.is_empty() {
            return Err(
                "auth.jwt.algorithms must list the accepted algorithms, e.g. [\"RS256\"]".into(),
            );
        }
        if config.leeway.as_secs() > MAX_LEEWAY_SECS {
            return Err(format!(
                "auth.jwt.leeway must be at most {MAX_LEEWAY_SECS}s"
            ));
        }
        // the token library counts leeway in whole seconds: 500ms would silently be none
        if config.leeway.subsec_nanos() != 0 {
            return Err(format!(
                "auth.jwt.leeway must be whole seconds, not {:?}",
                config.leeway
            ));
        }
        let algorithms = config
            .algorithms
            .iter()
            .map(|a| {
                Algorithm::from_str(a)
                    .map_err(|_| format!("auth.jwt.algorithms: unknown algorithm {a:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        files.extend(super::config::path(&config.hs_secret_file));
        files.extend(config.public_key_files.iter().map(std::path::PathBuf::from));
        files.extend(super::config::path(&config.jwks_file));
        let owned = config.clone();
        let keys = Watched::new("jwt keys", files, reload_interval, move || {
            load_keys(&owned)
        })?;
        Ok(JwtVerifier {
            config: config.clone(),
            algorithms,
            keys,
        })
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, AuthError> {
        let claims = self.verify_but_expiry(token)?;
        claims.unexpired()?;
        Ok(claims)
    }

    /// Verifies everything of a token but its expiry, which the caller checks last
    /// ([`TokenClaims::unexpired`]): a token that also fails another check is refused for that, not
    /// as expired, which would have its caller fetch a fresh token only to be refused again.
    pub fn verify_but_expiry(&self, token: &str) -> Result<TokenClaims, AuthError> {
        let bad = |m: String| AuthError::Unauthenticated(m);
        if token.len() > self.config.max_token_bytes {
            return Err(bad(format!(
                "token is larger than {} bytes",
                self.config.max_token_bytes
            )));
        }
        let header = decode_header(token).map_err(|e| bad(format!("malformed token: {e}")))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(bad(format!(
                "token algorithm {:?} is not accepted (accepted: {})",
                header.alg,
                self.config.algorithms.join(", ")
            )));
        }
        let keys = self.keys.get(false);
        let candidates: Vec<DecodingKey> = match &header.kid {
            Some(kid) => {
                // an unknown kid may be a key added since the last check: look at the files now
                let keys = if keys.by_kid.contains_key(kid) {
                    keys
                } else {
                    self.keys.get(true)
                };
                match keys.by_kid.get(kid) {
                    Some((_, Some(pinned))) if *pinned != header.alg => {
                        return Err(bad(format!(
                            "key {kid:?} is for {pinned:?}, not {:?}",
                            header.alg
                        )));
                    }
                    Some((key, _)) => vec![key.clone()],
                    None => return Err(bad(format!("unknown key id {kid:?}"))),
                }
            }
            None => keys
                .static_keys
                .iter()
                .filter(|k| k.family() == header.alg.family())
                .cloned()
                .collect(),
        };
        if candidates.is_empty() {
            return Err(bad(format!(
                "no key for algorithm {:?} without a kid",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        // exp is checked last (`claims`): a token that fails another check is refused for that, not
        // as expired, which would have its caller fetch a fresh token only to be refused again
        validation.validate_exp = false;
        validation.leeway = self.config.leeway.as_secs();
        let mut last = None;
        for key in &candidates {
            match decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => return self.claims(data.claims),
                Err(e) => {
                    // a key of another curve or size (P-384 for an ES256 token) cannot check the
                    // signature at all: the next key of the family may
                    let unfit = matches!(
                        e.kind(),
                        ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidKeyFormat
                    );
                    let signature = matches!(e.kind(), ErrorKind::InvalidSignature);
                    // a signature that does not verify says more than a key that does not fit
                    if !(unfit && last.is_some()) {
                        last = Some(e);
                    }
                    if !(signature || unfit) {
                        break;
                    }
                }
            }
        }
        let reason = match last.as_ref().map(|e| e.kind()) {
            Some(ErrorKind::ImmatureSignature) => "token is not valid yet (nbf)".to_owned(),
            Some(ErrorKind::InvalidAudience) => {
                format!("token audience is not {:?}", self.config.audience)
            }
            Some(ErrorKind::InvalidIssuer) => {
                format!("token issuer is not {:?}", self.config.issuer)
            }
            Some(ErrorKind::MissingRequiredClaim(claim)) => {
                format!("token lacks the required claim {claim:?}")
            }
            Some(ErrorKind::InvalidSignature) => "token signature does not verify".to_owned(),
            Some(other) => format!("invalid token: {other:?}"),
            None => "invalid token".to_owned(),
        };
        Err(bad(reason))
    }

    fn claims(&self, claims: Map<String, Value>) -> Result<TokenClaims, AuthError> {
        // identities are stored (publishers, audit records, presence): no control characters
        let printable = |s: &str| !s.chars().any(char::is_control);
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && printable(s) => s.clone(),
            _ => {
                return Err(AuthError::Unauthenticated(
                    "token sub must be a non-empty string without control characters".into(),
                ));
            }
        };
        // RFC 7519 makes iss one string; the validation takes an array holding the issuer too
        if !matches!(claims.get("iss"), Some(Value::String(_))) {
            return Err(AuthError::Unauthenticated(
                "token iss must be a string".into(),
            ));
        }
        let tenant = if self.config.tenant_claim.is_empty() {
            None
        } else {
            match claims.get(&self.config.tenant_claim) {
                Some(Value::String(s)) if printable(s) => Some(s.clone()),
                Some(Value::String(_)) => {
                    return Err(AuthError::Unauthenticated(format!(
                        "token claim {} must not contain control characters",
                        self.config.tenant_claim
                    )));
                }
                // present but not a string: refused, not read as absent (the default tenant)
                Some(_) => {
                    return Err(AuthError::Unauthenticated(format!(
                        "token claim {} must be a string",
                        self.config.tenant_claim
                    )));
                }
                None => None,
            }
        };
        // validation has checked that exp is there and everything else holds; a token is accepted
        // only before exp plus the leeway, as RFC 7519 says, so that a new call is refused from the
        // moment the caller's open streams end
        // a NumericDate may have a fraction (RFC 7519)
        let exp = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_u64().map(Duration::from_secs).or_else(|| {
                    exp.as_f64()
                        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                })
            })
            .ok_or_else(|| {
                AuthError::Unauthenticated("token exp must be a number of seconds".into())
            })?;
        let expires = SystemTime::UNIX_EPOCH
            .checked_add(exp)
            .and_then(|exp| exp.checked_add(self.config.leeway));
        Ok(TokenClaims {
            subject,
            tenant,
            expires,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A verifier of HS256 tokens (issuer "i", audience "a") with a secret written into `dir`.
    pub(crate) fn hs_verifier(dir: &std::path::Path, tenant_claim: &str) -> JwtVerifier {
        let secret = dir.join("secret");
        std::fs::write(&secret, "x".repeat(40)).expect("secret");
        let config = JwtConfig {
            issuer: "i".into(),
            audience: "a".into(),
            algorithms: vec!["HS256".into()],
            hs_secret_file: secret.display().to_string(),
            tenant_claim: tenant_claim.into(),
            ..JwtConfig::default()
        };
        JwtVerifier::new(&config, std::time::Duration::from_secs(60)).expect("verifier")
    }

    fn with_leeway(leeway: std::time::Duration) -> Result<JwtVerifier, String> {
        let config = JwtConfig {
            issuer: "i".into(),
            audience: "a".into(),
            algorithms: vec!["HS256".into()],
            leeway,
            ..JwtConfig::default()
        };
        JwtVerifier::new(&config, std::time::Duration::from_secs(60))
    }

    #[test]
    fn a_tenant_claim_that_is_not_a_string_is_refused_not_read_as_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let verifier = hs_verifier(dir.path(), "tenant");
        let tenant_of = |tenant: Option<Value>| {
            let mut claims = Map::new();
            claims.insert("sub".into(), Value::String("svc".into()));
            claims.insert("iss".into(), Value::String("i".into()));
            claims.insert("exp".into(), serde_json::json!(u32::MAX));
            if let Some(tenant) = tenant {
                claims.insert("tenant".into(), tenant);
            }
            verifier.claims(claims).map(|c| c.tenant)
        };
        assert_eq!(
            tenant_of(Some(Value::String("acme".into()))).ok(),
            Some(Some("acme".to_owned()))
        );
        assert_eq!(tenant_of(None).ok(), Some(None));
        for wrong in [
            serde_json::json!(["acme"]),
            serde_json::json!({"id": "acme"}),
            serde_json::json!(42),
            Value::Null,
        ] {
            assert!(tenant_of(Some(wrong.clone())).is_err(), "{wrong}");
        }
    }

    #[test]
    fn a_token_is_accepted_only_before_its_exp_plus_the_leeway() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x".repeat(40)).expect("secret");
        let verifier = |leeway| {
            let config = JwtConfig {
                issuer: "i".into(),
                audience: "a".into(),
                algorithms: vec!["HS256".into()],
                hs_secret_file: secret.display().to_string(),
                leeway,
                ..JwtConfig::default()
            };
            JwtVerifier::new(&config, Duration::from_secs(60)).expect("verifier")
        };
        let token = |exp: u64| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": exp}),
                &jsonwebtoken::EncodingKey::from_secret("x".repeat(40).as_bytes()),
            )
            .expect("token")
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let at = |secs| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        let strict = verifier(Duration::ZERO);
        // the token library still accepts it during its exp second
        let refused = strict.verify(&token(now)).expect_err("exp reached");
        assert!(refused.to_string().contains("expired"), "{refused}");
        assert_eq!(
            strict.verify(&token(now + 5)).expect("valid").expires,
            at(now + 5)
        );
        let lenient = verifier(Duration::from_secs(30));
        assert_eq!(
            lenient.verify(&token(now)).expect("in the leeway").expires,
            at(now + 30)
        );
    }

    #[test]
    fn an_expired_token_that_fails_another_check_is_refused_for_that() {
        let dir = tempfile::tempdir().expect("tempdir");
        let verifier = hs_verifier(dir.path(), "");
        let token = |claims: Value, secret: &str| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .expect("token")
        };
        let good = "x".repeat(40);
        let past = 1_000_000_000u64; // 2001
        let refusal = |claims: Value, secret: &str| {
            verifier
                .verify(&token(claims, secret))
                .map(|_| ())
                .expect_err("refused")
        };
        let reasons = [
            (
                serde_json::json!({"sub": "svc", "iss": "i", "aud": "other", "exp": past}),
                "audience",
            ),
            (
                serde_json::json!({"sub": "svc", "iss": "other", "aud": "a", "exp": past}),
                "issuer",
            ),
            (
                serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": past, "nbf": u32::MAX}),
                "not valid yet",
            ),
            (
                serde_json::json!({"sub": "svc", "iss": ["other", "i"], "aud": "a", "exp": past}),
                "iss must be a string",
            ),
        ];
        for (claims, reason) in reasons {
            let refused = refusal(claims, &good);
            assert!(
                matches!(&refused, AuthError::Unauthenticated(m) if m.contains(reason)),
                "{refused:?}, want {reason}"
            );
        }
        let forged = refusal(
            serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": past}),
            &"y".repeat(40),
        );
        assert!(
            matches!(&forged, AuthError::Unauthenticated(m) if m.contains("signature")),
            "{forged:?}"
        );
        // expired, and nothing else wrong
        let expired = refusal(
            serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": past}),
            &good,
        );
        assert!(matches!(expired, AuthError::TokenExpired(_)), "{expired:?}");
        // an exp with a fraction (a NumericDate may have one) expires at it, not never
        let fraction = refusal(
            serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": 1_000_000_000.5}),
            &good,
        );
        assert!(
            matches!(fraction, AuthError::TokenExpired(_)),
            "{fraction:?}"
        );
        let later = verifier
            .verify(&token(
                serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": 4_102_444_800.5}),
                &good,
            ))
            .expect("a fractional exp ahead");
        assert_eq!(
            later.expires,
            Some(
                SystemTime::UNIX_EPOCH
                    + Duration::from_millis(4_102_444_800_500)
                    + JwtConfig::default().leeway
            )
        );
        // one that is not a number is refused
        let odd = refusal(
            serde_json::json!({"sub": "svc", "iss": "i", "aud": "a", "exp": "never"}),
            &good,
        );
        assert!(matches!(odd, AuthError::Unauthenticated(_)), "{odd:?}");
    }

    #[test]
    fn leeway_is_whole_seconds_up_to_a_minute() {
        let refused = |leeway| with_leeway(leeway).err().unwrap_or_default();
        assert!(refused(std::time::Duration::from_millis(500)).contains("whole seconds"));
        assert!(refused(std::time::Duration::from_millis(60_500)).contains("whole seconds"));
        assert!(refused(std::time::Duration::from_secs(61)).contains("at most 60s"));
        // a minute passes the leeway checks (and fails later, on the missing keys)
        assert!(!refused(std::time::Duration::from_secs(60)).contains("leeway"));
    }
}
