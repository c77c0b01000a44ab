//! JWT verification and the visibility rule.
//!
//! Tokens are the ones WindFlow's API already issues: `sub` (the user's
//! UUID) and `exp` are required, `is_superuser` and `organization_id` are
//! optional. Who may see a deployment is decided in one place,
//! [`Viewer::can_see`].

use std::fmt;
use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::JwtArgs;

/// Who is looking: the subject of a verified token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Viewer {
    pub user_id: Uuid,
    pub organization_id: Option<Uuid>,
    pub is_superuser: bool,
}

impl Viewer {
    /// The visibility rule: the owner, members of the deployment's
    /// organization, and superusers may see a deployment.
    pub fn can_see(&self, owner: Uuid, organization_id: Option<Uuid>) -> bool {
        self.is_superuser
            || self.user_id == owner
            || (organization_id.is_some() && organization_id == self.organization_id)
    }
}

/// A verified token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub viewer: Viewer,
    /// `exp`, in seconds since the Unix epoch, at most [`LATEST_EXP`].
    pub expires_at: u64,
}

/// 9999-12-31T23:59:59Z, the last second RFC 3339 can write: a later `exp`
/// (valid JWT, and a year-10000 `exp` once panicked the session) is taken
/// as this one.
pub const LATEST_EXP: u64 = 253_402_300_799;

impl Claims {
    pub fn expires_at_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_at)
    }
}

/// Why a token was refused, in words a client author can act on (these
/// reach the client in the 401 body or the `error` reply).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired (its `exp` has passed); get a fresh one")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// jsonwebtoken's errors, in words: several of them display only the
/// library's enum name ("InvalidToken", "InvalidSignature").
fn in_words(kind: &ErrorKind, algorithm: Algorithm) -> String {
    let key_setting = if is_hmac(algorithm) { "JWT_SECRET_KEY" } else { "JWT_PUBLIC_KEY_FILE" };
    match kind {
        ErrorKind::InvalidToken => "not a JWT (expected three base64url parts separated by dots)".into(),
        ErrorKind::Base64(_) => "not a JWT (a part is not base64url)".into(),
        ErrorKind::Utf8(_) => "not a JWT (a part is not UTF-8)".into(),
        ErrorKind::Json(e) => format!("its header or claims are not the expected JSON ({e})"),
        ErrorKind::InvalidSignature => {
            format!("the signature does not match: it was signed with another key than the server's {key_setting}")
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
            format!("it is not signed with {algorithm:?}, the server's JWT_ALGORITHM")
        }
        ErrorKind::ExpiredSignature => "it expired (its `exp` has passed); get a fresh one".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (its `nbf` is in the future)".into(),
        ErrorKind::InvalidAudience => "its `aud` is not the server's JWT_AUDIENCE".into(),
        ErrorKind::InvalidIssuer => "its `iss` is not the server's JWT_ISSUER".into(),
        ErrorKind::InvalidSubject => "its `sub` is not accepted".into(),
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "aud" => "it has no `aud` claim, which the server's JWT_AUDIENCE requires".into(),
            "iss" => "it has no `iss` claim, which the server's JWT_ISSUER requires".into(),
            other => format!("it has no `{other}` claim"),
        },
        ErrorKind::InvalidClaimFormat(claim) => format!("its `{claim}` claim has the wrong type"),
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => {
            format!("the key is not a valid {algorithm:?} key in PEM")
        }
        _ => format!("it cannot be verified with the server's {key_setting} and JWT_ALGORITHM"),
    }
}

/// A setting that makes the verifier (or the signer) impossible to build.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct KeyError {
    pub setting: &'static str,
    pub problem: String,
}

fn key_error(setting: &'static str, problem: impl fmt::Display) -> KeyError {
    KeyError { setting, problem: problem.to_string() }
}

/// The claims as they travel; checked and converted into [`Claims`].
#[derive(Debug, Serialize, Deserialize)]
struct WireClaims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    is_superuser: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    organization_id: Option<String>,
    /// A string or an array of strings (RFC 7519 §4.1.3); the library
    /// checks it against `JWT_AUDIENCE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

fn is_hmac(algorithm: Algorithm) -> bool {
    matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn pem_decoding_key(algorithm: Algorithm, pem: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
    match algorithm {
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        _ => DecodingKey::from_rsa_pem(pem),
    }
}

impl Verifier {
    pub fn from_args(args: &JwtArgs) -> Result<Self, KeyError> {
        let algorithm = args.jwt_algorithm;
        let key = if is_hmac(algorithm) {
            match args.jwt_secret_key.as_deref() {
                Some(secret) if !secret.is_empty() => DecodingKey::from_secret(secret.as_bytes()),
                _ => return Err(key_error("JWT_SECRET_KEY", format!("is required for {algorithm:?}"))),
            }
        } else {
            let path = args
                .jwt_public_key_file
                .as_ref()
                .ok_or_else(|| key_error("JWT_PUBLIC_KEY_FILE", format!("is required for {algorithm:?}")))?;
            let pem =
                fs::read(path).map_err(|e| key_error("JWT_PUBLIC_KEY_FILE", format!("{}: {e}", path.display())))?;
            pem_decoding_key(algorithm, &pem).map_err(|e| {
                key_error(
                    "JWT_PUBLIC_KEY_FILE",
                    format!(
                        "{}: not a {algorithm:?} public key in PEM ({})",
                        path.display(),
                        in_words(e.kind(), algorithm)
                    ),
                )
            })?
        };
        let mut validation = Validation::new(algorithm);
        // No leeway; `exp` itself is checked again in `verify`
        // because the library still accepts a token at its `exp` second.
        validation.leeway = 0;
        // A token is not valid before its `nbf`, when it has one.
        validation.validate_nbf = true;
        // A configured audience or issuer is required, not only checked
        // when present.
        let mut required = vec!["exp", "sub"];
        match &args.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &args.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier { key, validation })
    }

    /// The one algorithm tokens must use (`JWT_ALGORITHM`).
    fn algorithm(&self) -> Algorithm {
        self.validation.algorithms.first().copied().unwrap_or_default()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data =
            jsonwebtoken::decode::<WireClaims>(token.trim(), &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    kind => AuthError::Invalid(in_words(kind, self.algorithm())),
                }
            })?;
        let claims = data.claims;
        if claims.exp <= unix_now() {
            return Err(AuthError::Expired);
        }
        let user_id = parse_uuid_claim("sub", &claims.sub)?;
        let organization_id =
            claims.organization_id.as_deref().map(|org| parse_uuid_claim("organization_id", org)).transpose()?;
        Ok(Claims {
            viewer: Viewer { user_id, organization_id, is_superuser: claims.is_superuser.unwrap_or(false) },
            expires_at: claims.exp.min(LATEST_EXP),
        })
    }
}

fn parse_uuid_claim(name: &str, value: &str) -> Result<Uuid, AuthError> {
    Uuid::parse_str(value).map_err(|_| AuthError::Invalid(format!("its `{name}` claim is not a UUID")))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What the `token` command signs.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub viewer: Viewer,
    pub ttl: Duration,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// Sign a token with the HS* secret, or with a PEM private key for the
/// asymmetric algorithms.
pub fn sign(
    request: &TokenRequest,
    algorithm: Algorithm,
    secret: Option<&str>,
    private_key_pem: Option<&[u8]>,
) -> Result<String, KeyError> {
    let key = if is_hmac(algorithm) {
        match secret {
            Some(secret) if !secret.is_empty() => EncodingKey::from_secret(secret.as_bytes()),
            _ => return Err(key_error("JWT_SECRET_KEY", format!("is required to sign {algorithm:?} tokens"))),
        }
    } else {
        let pem = private_key_pem
            .ok_or_else(|| key_error("--private-key-file", format!("is required to sign {algorithm:?} tokens")))?;
        match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .map_err(|e| {
            key_error(
                "--private-key-file",
                format!("not a {algorithm:?} private key in PEM ({})", in_words(e.kind(), algorithm)),
            )
        })?
    };
    let claims = WireClaims {
        sub: request.viewer.user_id.to_string(),
        exp: unix_now() + request.ttl.as_secs(),
        is_superuser: Some(request.viewer.is_superuser),
        organization_id: request.viewer.organization_id.map(|o| o.to_string()),
        aud: request.audience.clone().map(Audience::One),
        iss: request.issuer.clone(),
    };
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).map_err(|e| key_error("token", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(secret: &str) -> JwtArgs {
        JwtArgs {
            jwt_algorithm: Algorithm::HS256,
            jwt_secret_key: Some(secret.into()),
            jwt_public_key_file: None,
            jwt_audience: None,
            jwt_issuer: None,
        }
    }

    fn viewer() -> Viewer {
        Viewer { user_id: Uuid::new_v4(), organization_id: Some(Uuid::new_v4()), is_superuser: false }
    }

    fn request(viewer: Viewer) -> TokenRequest {
        TokenRequest { viewer, ttl: Duration::from_secs(60), audience: None, issuer: None }
    }

    #[test]
    fn owner_organization_and_superuser_may_see() {
        let owner = Uuid::new_v4();
        let org = Uuid::new_v4();
        let stranger = Viewer { user_id: Uuid::new_v4(), organization_id: None, is_superuser: false };
        assert!(Viewer { user_id: owner, ..stranger }.can_see(owner, None));
        assert!(Viewer { organization_id: Some(org), ..stranger }.can_see(owner, Some(org)));
        assert!(Viewer { is_superuser: true, ..stranger }.can_see(owner, Some(org)));
        assert!(!stranger.can_see(owner, Some(org)));
        assert!(!Viewer { organization_id: Some(Uuid::new_v4()), ..stranger }.can_see(owner, Some(org)));
        // Two deployments without an organization do not make their owners colleagues.
        assert!(!stranger.can_see(owner, None));
    }

    #[test]
    fn signed_token_round_trips() {
        let verifier = Verifier::from_args(&args("s3cret")).unwrap();
        let viewer = viewer();
        let token = sign(&request(viewer), Algorithm::HS256, Some("s3cret"), None).unwrap();
        assert_eq!(verifier.verify(&token).unwrap().viewer, viewer);
    }

    #[test]
    fn wrong_secret_is_invalid() {
        let verifier = Verifier::from_args(&args("s3cret")).unwrap();
        let token = sign(&request(viewer()), Algorithm::HS256, Some("other"), None).unwrap();
        assert!(matches!(verifier.verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn other_algorithm_is_invalid() {
        let verifier = Verifier::from_args(&args("s3cret")).unwrap();
        let token = sign(&request(viewer()), Algorithm::HS512, Some("s3cret"), None).unwrap();
        assert!(matches!(verifier.verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn unsigned_token_is_invalid() {
        let verifier = Verifier::from_args(&args("s3cret")).unwrap();
        // {"alg":"none"} . {"sub":...,"exp":...} . (no signature)
        let claims = format!(r#"{{"sub":"{}","exp":{}}}"#, Uuid::new_v4(), unix_now() + 60);
        use base64_encode as b64;
        let token = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims.as_bytes()));
        assert!(matches!(verifier.verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn an_exp_past_the_year_9999_is_taken_as_its_last_second() {
        let verifier = Verifier::from_args(&args("k")).unwrap();
        for exp in [LATEST_EXP + 1, u64::MAX] {
            let claims = WireClaims {
                sub: Uuid::new_v4().to_string(),
                exp,
                is_superuser: None,
                organization_id: None,
                aud: None,
                iss: None,
            };
            let token = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k")).unwrap();
            let claims = verifier.verify(&token).unwrap();
            assert_eq!(claims.expires_at, LATEST_EXP);
            let shown = crate::protocol::ServerMessage::authenticated(claims.viewer.user_id, claims.expires_at_time());
            assert!(shown.to_text().contains("9999-12-31T23:59:59Z"), "{}", shown.to_text());
        }
    }

    #[test]
    fn token_is_expired_from_exp_on() {
        let verifier = Verifier::from_args(&args("k")).unwrap();
        let claims = WireClaims {
            sub: Uuid::new_v4().to_string(),
            exp: unix_now(),
            is_superuser: None,
            organization_id: None,
            aud: None,
            iss: None,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k")).unwrap();
        assert_eq!(verifier.verify(&token), Err(AuthError::Expired));
    }

    #[test]
    fn sub_must_be_a_uuid() {
        let verifier = Verifier::from_args(&args("k")).unwrap();
        let claims = WireClaims {
            sub: "alice".into(),
            exp: unix_now() + 60,
            is_superuser: None,
            organization_id: None,
            aud: None,
            iss: None,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k")).unwrap();
        assert!(matches!(verifier.verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let mut configured = args("k");
        configured.jwt_audience = Some("windflow".into());
        configured.jwt_issuer = Some("windflow-api".into());
        let verifier = Verifier::from_args(&configured).unwrap();
        let mut good = request(viewer());
        good.audience = Some("windflow".into());
        good.issuer = Some("windflow-api".into());
        let token = sign(&good, Algorithm::HS256, Some("k"), None).unwrap();
        assert!(verifier.verify(&token).is_ok());
        let bare = sign(&request(viewer()), Algorithm::HS256, Some("k"), None).unwrap();
        assert!(verifier.verify(&bare).is_err());
        let mut wrong = good.clone();
        wrong.issuer = Some("someone-else".into());
        assert!(verifier.verify(&sign(&wrong, Algorithm::HS256, Some("k"), None).unwrap()).is_err());
    }

    #[test]
    fn refusals_say_what_is_wrong_in_words() {
        let verifier = Verifier::from_args(&args("s3cret")).unwrap();
        let refusal = |token: &str| verifier.verify(token).unwrap_err().to_string();
        assert_eq!(refusal("garbage"), "invalid token: not a JWT (expected three base64url parts separated by dots)");
        let other_key = sign(&request(viewer()), Algorithm::HS256, Some("other"), None).unwrap();
        assert!(
            refusal(&other_key).contains("another key than the server's JWT_SECRET_KEY"),
            "{}",
            refusal(&other_key)
        );
        let other_algorithm = sign(&request(viewer()), Algorithm::HS512, Some("s3cret"), None).unwrap();
        assert!(refusal(&other_algorithm).contains("not signed with HS256"), "{}", refusal(&other_algorithm));
        for token in ["garbage", "a.b.c", &other_key, &other_algorithm] {
            let refusal = refusal(token);
            assert!(!refusal.contains("Invalid") && !refusal.contains("Error"), "no library enum names: {refusal}");
        }
    }

    #[test]
    fn missing_secret_names_the_setting() {
        let mut missing = args("");
        missing.jwt_secret_key = None;
        let error = Verifier::from_args(&missing).unwrap_err();
        assert_eq!(error.setting, "JWT_SECRET_KEY");
        missing.jwt_algorithm = Algorithm::RS256;
        assert_eq!(Verifier::from_args(&missing).unwrap_err().setting, "JWT_PUBLIC_KEY_FILE");
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
