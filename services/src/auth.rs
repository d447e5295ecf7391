//! Credentials: password hashes (Argon2id, salted, in the PHC string format) and access
//! tokens (JWT, HS256 only, signed with the token secret of [`crate::secrets`]).
//!
//! Hashing is deliberately slow (tens of milliseconds of CPU), so it runs on tokio's
//! blocking threads, never on the threads that serve requests.

use std::sync::LazyLock;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use domain::user::Role;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who issues the tokens (`iss`), checked on every token read back.
pub const ISSUER: &str = "orderflow";

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: Uuid,
    pub email: String,
    pub iss: String,
    /// Issued at and expires at, in seconds since the Unix epoch.
    pub iat: u64,
    pub exp: u64,
    /// The user's roles at log-in (`operator`); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

impl Claims {
    /// Whether the token's user may read everyone's data.
    pub fn is_operator(&self) -> bool {
        self.roles
            .iter()
            .any(|role| role == Role::Operator.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// Issues and checks access tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// How long a token is valid.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub fn new(secret: &[u8], lifetime: Duration) -> Self {
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            lifetime,
        }
    }

    /// A signed token for the user with these roles, valid for
    /// [`lifetime`](Self::lifetime).
    pub fn issue(&self, user_id: Uuid, email: &str, roles: &[Role]) -> Result<String, TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id,
            email: email.to_owned(),
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now + self.lifetime.as_secs(),
            roles: roles.iter().map(|role| role.as_str().to_owned()).collect(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|error| TokenError::Invalid(error.to_string()))
    }

    /// The claims of a token signed with this secret (HS256 only: `none` and every
    /// other algorithm are refused) that has not expired.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(error.to_string()),
            })
    }
}

/// Hashing is refused (the caller answers 503) rather than queued for longer than
/// this: each hash takes tens of milliseconds and 19 MiB, and registering and logging
/// in need no token, so an unbounded queue would let anyone exhaust the machine.
const HASHING_WAIT: Duration = std::time::Duration::from_secs(5);

/// Hashes at once: one per core.
static HASHING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    tokio::sync::Semaphore::new(cores)
});

/// Too many passwords are being hashed: try again shortly.
#[derive(Debug, thiserror::Error)]
#[error("too many log-ins and registrations at once; try again shortly")]
pub struct Busy;

async fn hashing_slot() -> Result<tokio::sync::SemaphorePermit<'static>, Busy> {
    match tokio::time::timeout(HASHING_WAIT, HASHING.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(Busy),
    }
}

/// The Argon2id hash of `password` with a fresh random salt, in PHC format.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    let _slot = hashing_slot().await?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|error| anyhow::anyhow!("cannot hash the password: {error}"))
    })
    .await?
}

/// Whether `password` matches `hash`. With no hash (an unknown user) it checks
/// against a fixed one, so an unknown e-mail takes as long as a wrong password.
pub async fn verify_password(password: String, hash: Option<String>) -> Result<bool, Busy> {
    let _slot = hashing_slot().await?;
    let verified = tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| UNKNOWN_USER_HASH.clone());
        let matches = PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        known && matches
    })
    .await
    .unwrap_or(false);
    Ok(verified)
}

/// Verified against when no user has the e-mail given.
static UNKNOWN_USER_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(b"no user has this password", &salt)
        .map(|hash| hash.to_string())
        .unwrap_or_default()
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_a_forged_or_expired_one_does_not() {
        let tokens = Tokens::new(b"secret one", Duration::from_secs(60));
        let user = Uuid::now_v7();
        let token = tokens.issue(user, "a@example.com", &[]).unwrap();
        let claims = tokens.verify(&token).unwrap();
        assert_eq!((claims.sub, claims.email.as_str()), (user, "a@example.com"));
        assert!(!claims.is_operator());
        let operator = tokens
            .issue(user, "a@example.com", &[Role::Operator])
            .unwrap();
        assert!(tokens.verify(&operator).unwrap().is_operator());
        let forger = Tokens::new(b"secret two", Duration::from_secs(60));
        let forged = forger.issue(user, "a@example.com", &[]).unwrap();
        assert!(matches!(
            tokens.verify(&forged),
            Err(TokenError::Invalid(_))
        ));
        let now = jsonwebtoken::get_current_timestamp();
        let old = Claims {
            sub: user,
            email: "a@example.com".into(),
            iss: ISSUER.into(),
            iat: now - 7200,
            exp: now - 3600,
            roles: vec![],
        };
        let key = EncodingKey::from_secret(b"secret one");
        let stale = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &key).unwrap();
        assert_eq!(tokens.verify(&stale), Err(TokenError::Expired));
        assert!(matches!(
            tokens.verify("not.a.token"),
            Err(TokenError::Invalid(_))
        ));
    }

    /// `{"alg":"none","typ":"JWT"}`, base64url-encoded.
    const NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

    #[test]
    fn an_unsigned_token_is_refused() {
        let tokens = Tokens::new(b"secret one", Duration::from_secs(60));
        let signed = tokens
            .issue(Uuid::now_v7(), "x@example.com", &[Role::Operator])
            .unwrap();
        // The same claims with the signature stripped and the algorithm set to none.
        let claims = signed.split('.').nth(1).unwrap();
        let unsigned = format!("{NONE_HEADER}.{claims}.");
        assert!(matches!(
            tokens.verify(&unsigned),
            Err(TokenError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let verify = |password: &str, hash: Option<String>| verify_password(password.into(), hash);
        assert!(verify("correct horse", Some(hash.clone())).await.unwrap());
        assert!(!verify("wrong horse", Some(hash)).await.unwrap());
        assert!(!verify("correct horse", None).await.unwrap());
    }
}
