//! HTTP: one router per resource, merged per service in [`app`].
//!
//! Every request gets a tracing span and an `x-correlation-id` (the client's, or a new
//! one), which is returned and recorded in the metadata of every event the request
//! causes. Errors are `application/problem+json` ([`problem`]); commands share
//! [`command`] (JSON body, `If-Match`, `Idempotency-Key`), queries [`read`]
//! (read-your-writes).

pub mod caller;
pub mod command;
mod health;
mod inventory;
mod notifications;
pub mod openapi;
mod orders;
mod payments;
pub mod problem;
pub mod read;
mod sagas;
mod users;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventstore::{AggregateStore, Metrics};
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::Service;
pub use caller::{Access, Caller, Identity};
pub use health::{Health, SubscriptionWatch};
use problem::{ApiError, InternalCause};

/// Largest request body accepted; larger ones get a 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Parses `bytes` as the body of every command the services take, as their
/// extractors do, and says which parsed: for the JSON fuzz target (`fuzz/`), which
/// asks only that none of them panics, overflows its stack or allocates without bound.
#[doc(hidden)]
pub fn parse_every_command_body(bytes: &[u8]) -> [bool; 7] {
    use command::parse_json;
    [
        parse_json::<orders::PlaceOrder>(bytes).is_ok(),
        parse_json::<inventory::AddStock>(bytes).is_ok(),
        parse_json::<users::Register>(bytes).is_ok(),
        parse_json::<users::Credentials>(bytes).is_ok(),
        parse_json::<users::ChangeProfile>(bytes).is_ok(),
        parse_json::<users::ChangePreferences>(bytes).is_ok(),
        parse_json::<crate::notifications::Mode>(bytes).is_ok(),
    ]
}
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// What every handler of one service can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub service: Service,
    /// The service's own database; `None` for the gateway.
    pub db: Option<Db>,
    /// Shared by every service of the process; each series names its service.
    pub metrics: Metrics,
    /// What `/health/ready` checks beyond the database.
    pub health: Arc<Health>,
    /// Issues access tokens (user service) and checks them (every service).
    pub tokens: Arc<crate::auth::Tokens>,
    /// Keys the request digests of idempotency records.
    pub digest_key: Arc<crate::secrets::Secret>,
    /// How callers without a token are treated.
    pub access: Access,
    /// The notification service's simulated providers.
    pub providers: Option<Arc<crate::notifications::Providers>>,
    /// The gateway's routing, authentication and rate limiting.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// Refuses commands while the service is over capacity (`None`: never).
    pub pressure: Option<Arc<crate::pressure::Pressure>>,
}

/// A service's database, as its handlers use it.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: PgPool,
    pub aggregates: AggregateStore,
}

impl AppState {
    /// The database, for handlers of services that have one.
    pub fn db(&self) -> Result<&Db, ApiError> {
        self.db.as_ref().ok_or_else(|| {
            ApiError::internal(format!("the {} service has no database", self.service))
        })
    }
}

/// The correlation id of the request in hand (in the request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct CorrelationId {
    pub uuid: Uuid,
}

/// A service's whole HTTP surface. Tests call this without binding a socket.
pub fn app(state: AppState) -> Router {
    let resources = match state.service {
        Service::Gateway => {
            // Everything that is not the gateway's own goes to the services.
            return Router::new()
                .merge(health::router())
                .route("/metrics", get(metrics))
                .route("/openapi.json", get(openapi::openapi_json))
                .route("/gateway/upstreams", get(crate::gateway::upstreams))
                .fallback(crate::gateway::proxy)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
                .layer(axum::middleware::from_fn(request_context))
                .with_state(state);
        }
        Service::Order => orders::router().merge(sagas::router()),
        Service::Inventory => inventory::router(),
        Service::Payment => payments::router(),
        Service::User => users::router(),
        Service::Notification => notifications::router(),
    };
    let mut router = Router::new()
        .merge(resources)
        .merge(health::router())
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found);
    if let Some(pressure) = state.pressure.clone() {
        router = router.layer(axum::middleware::from_fn_with_state(
            pressure,
            crate::pressure::admit,
        ));
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(request_context))
        .with_state(state)
}

/// Prometheus text exposition of the process's metrics.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "OpenMetrics text format", body = String,
        content_type = "application/openmetrics-text; version=1.0.0")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            eventstore::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such resource: {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// The correlation id, the request's span, and its one log line.
async fn request_context(mut request: Request, next: Next) -> Response {
    let (correlation_id, header) = correlation_of(&request);
    request.extensions_mut().insert(CorrelationId {
        uuid: correlation_id,
    });
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        correlation_id = %correlation_id,
    );
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let took_ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = response.status().as_u16();
    let _entered = span.enter();
    match response.extensions_mut().remove::<InternalCause>() {
        Some(InternalCause(cause)) => tracing::error!(status, took_ms, %cause, "request failed"),
        None if status >= 500 => tracing::error!(status, took_ms, "request failed"),
        None => tracing::debug!(status, took_ms, "request"),
    }
    response.headers_mut().insert(CORRELATION_HEADER, header);
    response
}

/// The client's `x-correlation-id`, or a new one. Ids that are not UUIDs are mapped to
/// one (UUIDv5 of the text), since event metadata carries UUIDs; the client gets its
/// own text back.
fn correlation_of(request: &Request) -> (Uuid, HeaderValue) {
    let given = request
        .headers()
        .get(CORRELATION_HEADER)
        .filter(|value| !value.is_empty() && value.len() <= 200)
        .and_then(|value| value.to_str().ok().map(|text| (text.trim(), value.clone())));
    match given {
        Some((text, value)) => {
            let uuid = Uuid::parse_str(text)
                .unwrap_or_else(|_| Uuid::new_v5(&Uuid::NAMESPACE_OID, text.as_bytes()));
            (uuid, value)
        }
        None => {
            let uuid = Uuid::now_v7();
            // A UUID's text is always a valid header value.
            let value = HeaderValue::from_str(&uuid.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
            (uuid, value)
        }
    }
}
