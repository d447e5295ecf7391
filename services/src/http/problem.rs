//! Errors as `application/problem+json` (RFC 9457), each with a stable `type`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::inventory::StockError;
use domain::order::OrderError;
use domain::payment::PaymentError;
use domain::user::UserError;
use eventstore::{ExecuteError, StoreError};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of error bodies.
pub const PROBLEM: &str = "application/problem+json";

/// Every `type` starts with this; the rest is the stable [`ProblemKind`], e.g.
/// `invalid-field`.
pub const TYPE_PREFIX: &str = "urn:orderflow:problem:";

/// Every kind of problem an answer can carry, the end of its `type`
/// (`urn:orderflow:problem:<kind>`). Clients may rely on these names: one is never
/// renamed or reused for another meaning. README ("Errors") lists them with their
/// status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// 409: the resource exists already (an order or user id taken).
    AlreadyExists,
    /// 413: the body is over the size limit.
    BodyTooLarge,
    /// 503: the service is busy hashing passwords; retry.
    Busy,
    /// 409: a user with this e-mail exists.
    EmailTaken,
    /// 403: the caller may not act in this name.
    Forbidden,
    /// 422: an `Idempotency-Key` came again with a different request.
    IdempotencyKeyReused,
    /// 500: the server failed; the log has the cause.
    Internal,
    /// 401: wrong e-mail or password.
    InvalidCredentials,
    /// 422: a field of the body or query is invalid (`field` names it).
    InvalidField,
    /// 400: a header is invalid (`field` names it).
    InvalidHeader,
    /// 400: the body is not JSON of the expected shape.
    InvalidJson,
    /// 409: the resource's state does not allow this now.
    InvalidTransition,
    /// 404: no such resource (or not the caller's).
    NotFound,
    /// 503: the service is past its capacity and recorded nothing; retry after
    /// `Retry-After`.
    Overloaded,
    /// 429: the gateway's rate limit for this caller; retry after `Retry-After`.
    RateLimited,
    /// 503: the read model did not reach the asked version in time; retry.
    ReadModelBehind,
    /// 401: the token has expired; log in again.
    TokenExpired,
    /// 401: no valid token.
    Unauthorized,
    /// 400: the body could not be read.
    UnreadableBody,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 502: the service behind the gateway failed to answer.
    UpstreamFailed,
    /// 504: the service behind the gateway did not answer in time.
    UpstreamTimeout,
    /// 503: no instance of the service behind the gateway is available.
    UpstreamUnavailable,
    /// 409 (412 with `If-Match`): the stream moved on since the version given.
    VersionConflict,
}

impl ProblemKind {
    pub const ALL: [ProblemKind; 24] = [
        ProblemKind::AlreadyExists,
        ProblemKind::BodyTooLarge,
        ProblemKind::Busy,
        ProblemKind::EmailTaken,
        ProblemKind::Forbidden,
        ProblemKind::IdempotencyKeyReused,
        ProblemKind::Internal,
        ProblemKind::InvalidCredentials,
        ProblemKind::InvalidField,
        ProblemKind::InvalidHeader,
        ProblemKind::InvalidJson,
        ProblemKind::InvalidTransition,
        ProblemKind::NotFound,
        ProblemKind::Overloaded,
        ProblemKind::RateLimited,
        ProblemKind::ReadModelBehind,
        ProblemKind::TokenExpired,
        ProblemKind::Unauthorized,
        ProblemKind::UnreadableBody,
        ProblemKind::UnsupportedMediaType,
        ProblemKind::UpstreamFailed,
        ProblemKind::UpstreamTimeout,
        ProblemKind::UpstreamUnavailable,
        ProblemKind::VersionConflict,
    ];

    /// The name in `type`, e.g. `invalid-field`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::AlreadyExists => "already-exists",
            ProblemKind::BodyTooLarge => "body-too-large",
            ProblemKind::Busy => "busy",
            ProblemKind::EmailTaken => "email-taken",
            ProblemKind::Forbidden => "forbidden",
            ProblemKind::IdempotencyKeyReused => "idempotency-key-reused",
            ProblemKind::Internal => "internal",
            ProblemKind::InvalidCredentials => "invalid-credentials",
            ProblemKind::InvalidField => "invalid-field",
            ProblemKind::InvalidHeader => "invalid-header",
            ProblemKind::InvalidJson => "invalid-json",
            ProblemKind::InvalidTransition => "invalid-transition",
            ProblemKind::NotFound => "not-found",
            ProblemKind::Overloaded => "overloaded",
            ProblemKind::RateLimited => "rate-limited",
            ProblemKind::ReadModelBehind => "read-model-behind",
            ProblemKind::TokenExpired => "token-expired",
            ProblemKind::Unauthorized => "unauthorized",
            ProblemKind::UnreadableBody => "unreadable-body",
            ProblemKind::UnsupportedMediaType => "unsupported-media-type",
            ProblemKind::UpstreamFailed => "upstream-failed",
            ProblemKind::UpstreamTimeout => "upstream-timeout",
            ProblemKind::UpstreamUnavailable => "upstream-unavailable",
            ProblemKind::VersionConflict => "version-conflict",
        }
    }
}

impl std::fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An HTTP error. 5xx responses say nothing internal: the cause is kept for the log
/// line the request middleware writes.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// The stable kind, the end of `type`.
    pub kind: ProblemKind,
    pub detail: String,
    /// The offending request field (`lines[0].quantity`) or header.
    pub field: Option<String>,
    /// Seconds, for 503s and 429s a client should retry.
    pub retry_after: Option<u32>,
    /// A header the answer carries besides (`WWW-Authenticate` on a 401).
    pub header: Option<Box<(header::HeaderName, HeaderValue)>>,
    /// What went wrong inside, for the log only.
    pub cause: Option<String>,
}

/// The cause of a 5xx, handed to the request middleware through the response's
/// extensions so it is logged once, there.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

impl ApiError {
    pub fn new(status: StatusCode, kind: ProblemKind, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            detail: detail.into(),
            field: None,
            retry_after: None,
            header: None,
            cause: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.header = Some(Box::new((name, value)));
        self
    }

    pub fn with_kind(mut self, kind: ProblemKind) -> Self {
        self.kind = kind;
        self
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::InvalidField,
            detail,
        )
        .with_field(field)
    }

    pub fn bad_header(header: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ProblemKind::InvalidHeader, detail).with_field(header)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ProblemKind::NotFound, detail)
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut error = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ProblemKind::Internal,
            "the server could not complete the request",
        );
        error.cause = Some(cause.to_string());
        error
    }

    pub fn unavailable(kind: ProblemKind, detail: impl Into<String>, retry_after: u32) -> Self {
        let mut error = Self::new(StatusCode::SERVICE_UNAVAILABLE, kind, detail);
        error.retry_after = Some(retry_after);
        error
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:orderflow:problem:` and a stable kind (`ProblemKind`), e.g. `invalid-field`.
    #[schema(example = "urn:orderflow:problem:invalid-field")]
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// The offending request field (`lines[0].quantity`) or header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            problem_type: format!("{TYPE_PREFIX}{}", self.kind),
            title: self.title(),
            status: self.status.as_u16(),
            detail: self.detail,
            field: self.field,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM));
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(extra) = self.header {
            let (name, value) = *extra;
            response.headers_mut().insert(name, value);
        }
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(InternalCause(cause));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::internal(format!("database: {error}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Concurrency { .. } | StoreError::Reordered { .. } => ApiError::new(
                StatusCode::CONFLICT,
                ProblemKind::VersionConflict,
                error.to_string(),
            ),
            other => ApiError::internal(other),
        }
    }
}

impl<E> From<ExecuteError<E>> for ApiError
where
    E: std::error::Error + Into<ApiError> + 'static,
{
    fn from(error: ExecuteError<E>) -> Self {
        match error {
            ExecuteError::Domain(error) => error.into(),
            ExecuteError::Store(error) => error.into(),
            ExecuteError::Codec(error) => ApiError::internal(error),
        }
    }
}

/// A state change the aggregate refuses in its current state.
fn conflict(kind: ProblemKind, detail: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, kind, detail)
}

impl From<OrderError> for ApiError {
    fn from(error: OrderError) -> Self {
        let detail = error.to_string();
        match error {
            OrderError::AlreadyExists => conflict(ProblemKind::AlreadyExists, detail),
            OrderError::NotFound => ApiError::not_found(detail),
            OrderError::Invalid { field, .. } => ApiError::invalid(field, detail),
            OrderError::InvalidTransition { .. } => {
                conflict(ProblemKind::InvalidTransition, detail)
            }
        }
    }
}

impl From<StockError> for ApiError {
    fn from(error: StockError) -> Self {
        let detail = error.to_string();
        match error {
            StockError::NotFound => ApiError::not_found(detail),
            StockError::Invalid { field, .. } => ApiError::invalid(field, detail),
            StockError::NoReservation(_) => conflict(ProblemKind::InvalidTransition, detail),
        }
    }
}

impl From<crate::auth::Busy> for ApiError {
    fn from(busy: crate::auth::Busy) -> Self {
        ApiError::unavailable(ProblemKind::Busy, busy.to_string(), 1)
    }
}

impl From<UserError> for ApiError {
    fn from(error: UserError) -> Self {
        let detail = error.to_string();
        match error {
            UserError::AlreadyExists => conflict(ProblemKind::AlreadyExists, detail),
            UserError::NotFound => ApiError::not_found(detail),
            UserError::Invalid { field, .. } => ApiError::invalid(field, detail),
        }
    }
}

impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> Self {
        let detail = error.to_string();
        match error {
            PaymentError::NotFound => ApiError::not_found(detail),
            PaymentError::Invalid { field, .. } => ApiError::invalid(field, detail),
            PaymentError::InvalidTransition { .. } => {
                conflict(ProblemKind::InvalidTransition, detail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProblemKind;

    #[test]
    fn every_kind_has_one_name_the_same_in_json_and_listed_in_the_readme() {
        let readme = include_str!("../../../README.md");
        let mut names = std::collections::HashSet::new();
        for kind in ProblemKind::ALL {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str(), "{kind:?}");
            assert!(names.insert(kind.as_str()), "{kind} twice");
            assert!(
                readme.contains(&format!("`{kind}`")),
                "README lists every problem kind; {kind} is missing"
            );
        }
    }
}
