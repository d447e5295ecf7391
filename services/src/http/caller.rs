//! Who is calling, and what they may see.
//!
//! The services do not trust a header to say who calls: a request names its user with
//! the access token itself (`Authorization: Bearer …`, which the gateway passes on as
//! the client sent it), and every service checks the token's signature and expiry as
//! the gateway does. The one thing a service takes on trust is the network: a request
//! that reaches it directly, without a token and without the gateway's mark
//! ([`VIA_GATEWAY_HEADER`]), comes from the machine itself when the services listen on
//! loopback only, and is then served as an operator's (`ORDERFLOW_TRUST_LOCAL_CALLERS`,
//! on by default only there: development, the load generator, an operator's curl).
//! Anywhere else such a request is anonymous.
//!
//! The rule for personal data (a profile, preferences, notifications, an order, its
//! payment and saga, a customer's order list) is one rule everywhere:
//! - no token: 401, unless `ORDERFLOW_ANONYMOUS_READS` opens reads to anyone;
//! - a token of the owner, or of an operator: the resource;
//! - a token of anyone else: 404, exactly as for a resource that does not exist, so an
//!   id reveals nothing (not even that it exists);
//! - a command that itself names another user as the one it acts for (an order placed
//!   for another customer): 403, since there is nothing to hide.
//!
//! Stock levels are not personal: anyone may read them.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use uuid::Uuid;

use super::context::ServiceState;
use super::problem::ApiError;
use crate::auth::{Claims, TokenError, Tokens};
use crate::http::problem::ProblemKind;

/// Set by the gateway on every request it forwards: a request with it never counts as
/// a local caller's, token or not.
pub const VIA_GATEWAY_HEADER: &str = "x-orderflow-via";

/// Who a request acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// No token.
    Anonymous,
    /// A logged-in user.
    User(Uuid),
    /// A logged-in user with the operator role: reads everyone's data.
    Operator(Uuid),
    /// Reached the service directly, without a token, where local callers are
    /// trusted (see the module documentation).
    Local,
}

impl Identity {
    /// The identity a verified token gives.
    pub fn of(claims: &Claims) -> Identity {
        if claims.is_operator() {
            Identity::Operator(claims.sub)
        } else {
            Identity::User(claims.sub)
        }
    }
}

/// The caller of the request in hand, with the service's rule for anonymous reads.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub identity: Identity,
    anonymous_reads: bool,
}

impl Caller {
    /// Refuses (401) a read of personal data by a caller without a token, unless
    /// anonymous reads are opened.
    pub fn reader(&self) -> Result<(), ApiError> {
        if self.identity == Identity::Anonymous && !self.anonymous_reads {
            return Err(token_needed());
        }
        Ok(())
    }

    /// Refuses (401) a command on personal data by a caller without a token.
    pub fn actor(&self) -> Result<(), ApiError> {
        if self.identity == Identity::Anonymous {
            return Err(token_needed());
        }
        Ok(())
    }

    /// Whether the caller may see what `owner` owns; an owner that is not known (a
    /// payment recorded before payments named their customer) only operators see.
    pub fn sees(&self, owner: Option<Uuid>) -> bool {
        match self.identity {
            Identity::Operator(_) | Identity::Local => true,
            Identity::User(user) => owner == Some(user),
            Identity::Anonymous => self.anonymous_reads,
        }
    }

    /// Refuses (403) a command that acts for someone other than its caller.
    pub fn may_act_for(&self, owner: Uuid) -> Result<(), ApiError> {
        self.actor()?;
        match self.identity {
            Identity::User(user) if user != owner => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ProblemKind::Forbidden,
                "the access token belongs to another user",
            )),
            _ => Ok(()),
        }
    }
}

impl FromRequestParts<ServiceState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ServiceState) -> Result<Self, ApiError> {
        let identity = identify(&parts.headers, &state.tokens)?.unwrap_or_else(|| {
            let via_gateway = parts.headers.contains_key(VIA_GATEWAY_HEADER);
            if state.access.trust_local_callers && !via_gateway {
                Identity::Local
            } else {
                Identity::Anonymous
            }
        });
        Ok(Caller {
            identity,
            anonymous_reads: state.access.anonymous_reads,
        })
    }
}

/// The identity the request's token gives, `None` without one; a token that is
/// malformed, forged or expired is a 401.
pub fn identify(headers: &HeaderMap, tokens: &Tokens) -> Result<Option<Identity>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    let token = match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            token.trim()
        }
        _ => {
            return Err(unauthorized(TokenError::Invalid(
                "Authorization must be `Bearer <token>`".into(),
            )));
        }
    };
    let claims = tokens.verify(token).map_err(unauthorized)?;
    Ok(Some(Identity::of(&claims)))
}

/// 401 for a token that does not verify.
pub fn unauthorized(error: TokenError) -> ApiError {
    let kind = match error {
        TokenError::Expired => ProblemKind::TokenExpired,
        TokenError::Invalid(_) => ProblemKind::Unauthorized,
    };
    ApiError::new(StatusCode::UNAUTHORIZED, kind, error.to_string())
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

/// 401 for a request that needs a token and has none.
pub fn token_needed() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ProblemKind::Unauthorized,
        "this needs an access token: Authorization: Bearer <token> (POST /auth/token)",
    )
    .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Uuid = Uuid::from_u128(1);
    const OTHER: Uuid = Uuid::from_u128(2);

    fn caller(identity: Identity, anonymous_reads: bool) -> Caller {
        Caller {
            identity,
            anonymous_reads,
        }
    }

    #[test]
    fn owners_operators_and_local_callers_see_personal_data_and_nobody_else() {
        for (identity, sees) in [
            (Identity::User(OWNER), true),
            (Identity::Operator(OTHER), true),
            (Identity::Local, true),
            (Identity::User(OTHER), false),
            (Identity::Anonymous, false),
        ] {
            let caller = caller(identity, false);
            assert_eq!(caller.sees(Some(OWNER)), sees, "{identity:?}");
            assert_eq!(caller.reader().is_ok(), identity != Identity::Anonymous);
        }
        assert!(!caller(Identity::User(OWNER), false).sees(None));
        assert!(caller(Identity::Operator(OWNER), false).sees(None));
        let open = caller(Identity::Anonymous, true);
        assert!(open.reader().is_ok() && open.sees(Some(OWNER)));
        assert!(open.actor().is_err(), "commands always need a token");
    }

    #[test]
    fn acting_for_another_user_is_forbidden() {
        let status = |caller: Caller| caller.may_act_for(OWNER).err().map(|e| e.status);
        assert_eq!(status(caller(Identity::User(OWNER), false)), None);
        assert_eq!(status(caller(Identity::Operator(OTHER), false)), None);
        assert_eq!(
            status(caller(Identity::User(OTHER), false)),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(caller(Identity::Anonymous, true)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }
}
