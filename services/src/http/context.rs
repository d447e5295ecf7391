//! What a handler works with: the state its server holds, and the request's
//! correlation id. The leaf of `http`: it imports no other module of it but
//! [`problem`](super::problem), so every router can use it and none is needed to
//! understand it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use eventstore::metrics::{HistogramFamily, latency_histogram};
use eventstore::subscription::{Lag, Progress};
use eventstore::trace::{self, TraceParent};
use eventstore::{AggregateStore, Metrics};
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use super::problem::InternalCause;
use crate::auth::Tokens;
use crate::config::Service;
use crate::pressure::Pressure;
use crate::secrets::Secret;

/// Largest request body accepted; larger ones get a 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Carries a request's correlation id in, and back out on the response.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// What every server of the process, the gateway's or a service's, reports about
/// itself: `/health/*`, `/metrics` and `/openapi.json` need nothing else.
#[derive(Clone, Debug)]
pub struct Base {
    pub service: Service,
    /// Shared by every server of the process; each series names its service.
    pub metrics: Metrics,
    /// What `/health/ready` checks.
    pub health: Arc<Health>,
}

/// What the handlers of one service (order, inventory, payment, user, notification)
/// reach. The gateway has its own ([`crate::gateway::Gateway`]).
#[derive(Clone, Debug)]
pub struct ServiceState {
    pub base: Base,
    /// The service's own database.
    pub db: Db,
    /// Checks access tokens (every service) and issues them (the user service).
    pub tokens: Arc<Tokens>,
    /// Keys the request digests of idempotency records.
    pub digest_key: Arc<Secret>,
    /// How callers without a token are treated.
    pub access: Access,
    /// Refuses commands while the service is over capacity (`None`: never).
    pub pressure: Option<Arc<Pressure>>,
}

/// A service's database, as its handlers use it.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: PgPool,
    pub aggregates: AggregateStore,
}

/// How a service treats callers without a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// Serve a direct request without a token as an operator's.
    pub trust_local_callers: bool,
    /// Let anyone read personal data.
    pub anonymous_reads: bool,
}

/// What a server's readiness depends on.
#[derive(Debug, Default)]
pub struct Health {
    /// The service's database (`None`: the gateway, which has none).
    pub database: Option<PgPool>,
    /// The broker the service's relay and consumers use (`None`: no broker).
    pub amqp_url: Option<String>,
    /// Background workers (relay, consumers) and whether each is still running.
    pub workers: Vec<(String, Arc<AtomicBool>)>,
    /// The subscriptions on the service's own store (projections, the saga's own
    /// events) this process runs or stands by for.
    pub subscriptions: Vec<SubscriptionWatch>,
}

/// A subscription of this process, as queries and readiness see it.
#[derive(Debug)]
pub struct SubscriptionWatch {
    /// Its lag, as its monitor last measured it.
    pub lag: tokio::sync::watch::Receiver<Lag>,
    /// Its progress: read-your-writes queries wake on its commits.
    pub progress: Arc<Progress>,
}

impl Health {
    /// The progress of the subscription called `name`, if this process runs it.
    pub fn progress(&self, name: &str) -> Option<&Arc<Progress>> {
        self.subscriptions
            .iter()
            .find(|watch| watch.progress.name() == name)
            .map(|watch| &watch.progress)
    }
}

/// The correlation id of the request in hand, and the trace it runs in (in the
/// request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct CorrelationId {
    pub uuid: Uuid,
    /// The request's span, or (nothing exported) the `traceparent` it came with or
    /// started: what its commands' events are stored with.
    pub trace: TraceParent,
}

/// What the request middleware records into: a server's service and the
/// `orderflow_http_request_duration_seconds` family every server of the process shares.
#[derive(Clone, Debug)]
pub struct Requests {
    pub service: Service,
    duration: HistogramFamily,
}

impl Requests {
    pub fn new(service: Service, metrics: &Metrics) -> Requests {
        let duration = metrics.family(
            "http_request_duration_seconds",
            "HTTP requests by service, method, route (the path template) and status",
            || HistogramFamily::new_with_constructor(latency_histogram),
        );
        Requests { service, duration }
    }
}

/// The route a request took, as a bounded label: its path template, or for a path no
/// route of this server matched (the gateway forwards those), the resource it names.
fn route_of(request: &Request) -> String {
    if let Some(path) = request.extensions().get::<MatchedPath>() {
        return path.as_str().to_owned();
    }
    const RESOURCES: [&str; 9] = [
        "users",
        "auth",
        "inventory",
        "orders",
        "customers",
        "sagas",
        "payments",
        "notifications",
        "gateway",
    ];
    let first = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next();
    match first {
        Some(resource) if RESOURCES.contains(&resource) => format!("/{resource}/…"),
        _ => "unmatched".to_owned(),
    }
}

/// Middleware: the correlation id, the request's span (continuing the caller's W3C
/// `traceparent`, or starting a trace), its duration in the metrics, and its one log
/// line.
pub async fn request_context(
    State(requests): State<Requests>,
    mut request: Request,
    next: Next,
) -> Response {
    let service = requests.service;
    let (correlation_id, header) = correlation_of(&request);
    let route = route_of(&request);
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        otel.name = %format_args!("{} {route}", request.method()),
        orderflow.service = service.name(),
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        correlation_id = %correlation_id,
        trace_id = tracing::field::Empty,
    );
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let parent = text(trace::TRACEPARENT).and_then(TraceParent::parse);
    let trace = trace::continue_trace(&span, parent, text(trace::TRACESTATE));
    request.extensions_mut().insert(CorrelationId {
        uuid: correlation_id,
        trace,
    });
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let took = started.elapsed();
    let took_ms = took.as_secs_f64() * 1000.0;
    let status = response.status().as_u16();
    let labels = vec![
        ("service", service.name().to_owned()),
        ("method", method.to_string()),
        ("route", route),
        ("status", status.to_string()),
    ];
    requests
        .duration
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    span.record("http.response.status_code", status);
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
