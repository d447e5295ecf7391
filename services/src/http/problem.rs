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

/// Every `type` starts with this; the rest is the stable kind, e.g. `invalid-field`.
pub const TYPE_PREFIX: &str = "urn:orderflow:problem:";

/// An HTTP error. 5xx responses say nothing internal: the cause is kept for the log
/// line the request middleware writes.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// The stable kind, the end of `type`.
    pub kind: &'static str,
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
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
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

    pub fn with_kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", detail).with_field(field)
    }

    pub fn bad_header(header: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid-header", detail).with_field(header)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut error = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server could not complete the request",
        );
        error.cause = Some(cause.to_string());
        error
    }

    pub fn unavailable(kind: &'static str, detail: impl Into<String>, retry_after: u32) -> Self {
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
    /// `urn:orderflow:problem:` and a stable kind, e.g. `invalid-field`.
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
            StoreError::Concurrency { .. } | StoreError::Reordered { .. } => {
                ApiError::new(StatusCode::CONFLICT, "version-conflict", error.to_string())
            }
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
fn conflict(kind: &'static str, detail: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, kind, detail)
}

impl From<OrderError> for ApiError {
    fn from(error: OrderError) -> Self {
        let detail = error.to_string();
        match error {
            OrderError::AlreadyExists => conflict("already-exists", detail),
            OrderError::NotFound => ApiError::not_found(detail),
            OrderError::Invalid { field, .. } => ApiError::invalid(field, detail),
            OrderError::InvalidTransition { .. } => conflict("invalid-transition", detail),
        }
    }
}

impl From<StockError> for ApiError {
    fn from(error: StockError) -> Self {
        let detail = error.to_string();
        match error {
            StockError::NotFound => ApiError::not_found(detail),
            StockError::Invalid { field, .. } => ApiError::invalid(field, detail),
            StockError::NoReservation(_) => conflict("invalid-transition", detail),
        }
    }
}

impl From<crate::auth::Busy> for ApiError {
    fn from(busy: crate::auth::Busy) -> Self {
        ApiError::unavailable("busy", busy.to_string(), 1)
    }
}

impl From<UserError> for ApiError {
    fn from(error: UserError) -> Self {
        let detail = error.to_string();
        match error {
            UserError::AlreadyExists => conflict("already-exists", detail),
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
            PaymentError::InvalidTransition { .. } => conflict("invalid-transition", detail),
        }
    }
}
