//! The gateway (port 8080): every public endpoint of every service under one origin.
//!
//! For each request it: finds the owning service from the path; requires a valid
//! access token for commands, except registering and logging in, and for every read
//! but stock levels (unless `ORDERFLOW_ANONYMOUS_READS` opens them); passes the token
//! on, which the service checks again and answers for its user only (see
//! [`crate::http::caller`]), and marks the request as the gateway's so no service
//! takes it for a local caller's; counts the request against the client's
//! rate limit in Redis (the token's user, or the address it came from), so several
//! gateway instances enforce one limit; picks a healthy instance of the service from
//! the registry (round robin, skipping instances whose circuit breaker is open); and
//! forwards the request with its correlation id, within a timeout. An instance that
//! refuses connections, times out or answers 502/504 counts a failure on its breaker;
//! once that opens, requests for it get a fast 503 until a probe succeeds. A request
//! that never reached its instance goes to the next one; so does one whose connection
//! broke mid-way, when it is a read or carries an Idempotency-Key (the service then
//! answers a second delivery as it answered the first).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use eventstore::{Metrics, trace};
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::auth::Tokens;
use crate::breaker::{Breaker, BreakerMetrics};
use crate::config::{Config, Service};
use crate::http::caller::{Identity, VIA_GATEWAY_HEADER, identify, token_needed};
use crate::http::context::{Base, CORRELATION_HEADER, CorrelationId, MAX_BODY_BYTES};
use crate::http::problem::ApiError;
use crate::http::problem::ProblemKind;
use crate::registry::{Admission, Instance, Registry};

/// Consecutive failures that open an upstream instance's breaker, and for how long.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(3);
/// Names the instance that answered a proxied request.
pub const UPSTREAM_HEADER: &str = "x-upstream-instance";
/// How long the gateway waits for Redis when it first needs it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the gateway keeps between requests.
pub struct Gateway {
    redis_url: String,
    namespace: String,
    registry_ttl: Duration,
    registry: OnceCell<Registry>,
    tokens: Arc<Tokens>,
    /// Requests per second per client.
    rate_limit: u64,
    /// Whether anyone may read personal data (`ORDERFLOW_ANONYMOUS_READS`).
    anonymous_reads: bool,
    client: reqwest::Client,
    /// One breaker per upstream instance (by address).
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    breaker_metrics: BreakerMetrics,
    /// Round-robin position.
    next: AtomicUsize,
    /// The last instances seen of each service, used for a while when Redis is away
    /// (so a blip of the registry does not take every route down).
    last_seen: Mutex<HashMap<String, (std::time::Instant, Vec<Instance>)>>,
}

/// How long the gateway routes by the last instances it saw while Redis is away.
const LAST_SEEN_FOR: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("namespace", &self.namespace)
            .field("rate_limit", &self.rate_limit)
            .field("anonymous_reads", &self.anonymous_reads)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(config: &Config, tokens: Arc<Tokens>, metrics: &Metrics) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.gateway_timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Gateway {
            redis_url: config.redis_url.clone(),
            namespace: config.registry_namespace.clone(),
            registry_ttl: config.registry_ttl,
            registry: OnceCell::new(),
            tokens,
            rate_limit: config.gateway_rate_limit,
            anonymous_reads: config.anonymous_reads,
            client,
            breakers: Mutex::new(HashMap::new()),
            breaker_metrics: BreakerMetrics::new(metrics),
            next: AtomicUsize::new(0),
            last_seen: Mutex::new(HashMap::new()),
        })
    }

    /// The registry, connected on first use.
    async fn registry(&self) -> Result<&Registry, ApiError> {
        self.registry
            .get_or_try_init(|| async {
                let connect =
                    Registry::connect(&self.redis_url, &self.namespace, self.registry_ttl);
                match tokio::time::timeout(REDIS_TIMEOUT, connect).await {
                    Ok(Ok(registry)) => Ok(registry),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("no answer".to_owned()),
                }
            })
            .await
            .map_err(|error| unavailable(format!("the registry (Redis) is unreachable: {error}")))
    }

    /// The registered instances of `service`; the last ones seen (for a while) when
    /// the registry cannot be asked.
    async fn instances(&self, service: Service) -> Result<Vec<Instance>, ApiError> {
        let looked_up = match self.registry().await {
            Ok(registry) => registry.instances(service.name()).await.map_err(|error| {
                unavailable(format!("the registry (Redis) is unreachable: {error}"))
            }),
            Err(error) => Err(error),
        };
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        match looked_up {
            Ok(instances) => {
                let seen = (std::time::Instant::now(), instances.clone());
                last_seen.insert(service.name().to_owned(), seen);
                Ok(instances)
            }
            Err(error) => match last_seen.get(service.name()) {
                Some((at, instances)) if at.elapsed() < LAST_SEEN_FOR => {
                    tracing::warn!(
                        "the registry is unreachable; routing by the last instances seen"
                    );
                    Ok(instances.clone())
                }
                _ => Err(error),
            },
        }
    }

    fn breaker(&self, address: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        breakers
            .entry(address.to_owned())
            .or_insert_with(|| {
                let breaker = Breaker::new(BREAKER_THRESHOLD, BREAKER_OPEN_FOR);
                let name = format!("gateway:{address}");
                Arc::new(breaker.observed(&self.breaker_metrics, name))
            })
            .clone()
    }
}

/// An upstream instance as the gateway sees it (`GET /gateway/upstreams`).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct UpstreamView {
    pub service: String,
    pub instance_id: String,
    pub address: String,
    /// `closed` (healthy), `open` (refused for now) or `half-open` (being probed).
    pub breaker: &'static str,
}

/// Every registered instance of every service, with its breaker here.
#[utoipa::path(get, path = "/gateway/upstreams", tag = "gateway",
    responses(
        (status = 200, description = "The instances and their breakers", body = [UpstreamView]),
        (status = 503, description = "The registry is unreachable", body = crate::http::problem::Problem,
            content_type = crate::http::problem::PROBLEM),
    ))]
async fn upstreams(State(gateway): State<Arc<Gateway>>) -> Result<Response, ApiError> {
    let registry = gateway.registry().await?;
    let mut views = Vec::new();
    for service in Service::ALL.into_iter().filter(|s| *s != Service::Gateway) {
        let instances = registry.instances(service.name()).await.map_err(|error| {
            unavailable(format!("the registry (Redis) is unreachable: {error}"))
        })?;
        for instance in instances {
            let breaker = gateway.breaker(&instance.address).state();
            views.push(UpstreamView {
                service: instance.service,
                instance_id: instance.instance_id,
                address: instance.address,
                breaker,
            });
        }
    }
    Ok(axum::Json(views).into_response())
}

/// The gateway's server: its own endpoints, every service's behind it, and what every
/// server serves. Its `/openapi.json` documents every service's endpoints under one
/// origin.
pub fn app(base: Base, gateway: Arc<Gateway>) -> axum::Router {
    let mut document = <Api as utoipa::OpenApi>::openapi();
    for service in Service::ALL {
        document.merge(crate::http::resources_api(service));
    }
    let document = crate::http::openapi::document(base.service, document);
    let routes = axum::Router::new()
        .route("/gateway/upstreams", axum::routing::get(upstreams))
        .fallback(proxy)
        .with_state(gateway);
    crate::http::serve(routes, base, document)
}

/// The gateway's own endpoints, for `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(upstreams), tags((name = "gateway", description = "The gateway itself")))]
pub struct Api;

/// The service that owns a path.
fn owner(path: &str) -> Option<Service> {
    let first = path.trim_start_matches('/').split('/').next()?;
    match first {
        "users" | "auth" => Some(Service::User),
        "inventory" => Some(Service::Inventory),
        "orders" | "customers" | "sagas" => Some(Service::Order),
        "payments" => Some(Service::Payment),
        "notifications" => Some(Service::Notification),
        _ => None,
    }
}

/// Whether a request needs an access token: every command but registering and
/// logging in, and every read of personal data (all but stock levels) unless
/// anonymous reads are opened.
fn needs_token(method: &Method, path: &str, anonymous_reads: bool) -> bool {
    if method == Method::GET || method == Method::HEAD {
        let public = path == "/inventory" || path.starts_with("/inventory/");
        return !public && !anonymous_reads;
    }
    // Registering and logging in are how a client gets a token.
    !(method == Method::POST && (path == "/users" || path == "/auth/token"))
}

/// Forwards a request to the service that owns it (see the module documentation).
async fn proxy(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
) -> Result<Response, ApiError> {
    let path = request.uri().path().to_owned();
    let service = owner(&path).ok_or_else(|| {
        ApiError::not_found(format!("no such resource: {} {path}", request.method()))
    })?;
    let identity = identify(request.headers(), &gateway.tokens)?;
    if identity.is_none() && needs_token(request.method(), &path, gateway.anonymous_reads) {
        return Err(token_needed());
    }
    let client = match identity {
        Some(Identity::User(user) | Identity::Operator(user)) => format!("user:{user}"),
        _ => request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(
                || "anonymous".to_owned(),
                |info| format!("ip:{}", info.0.ip()),
            ),
    };
    let admission = match gateway.registry().await {
        Ok(registry) => registry
            .admit(&client, gateway.rate_limit)
            .await
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.detail),
    };
    match admission {
        Ok(Admission::Allowed) => {}
        Ok(Admission::Limited { retry_after }) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ProblemKind::RateLimited,
                format!("more than {} requests per second", gateway.rate_limit),
            )
            .with_retry_after(retry_after));
        }
        // Counting is a safeguard, not a dependency: let the request through.
        Err(error) => tracing::warn!(%error, "cannot count the request against its rate limit"),
    }
    let instances = gateway.instances(service).await?;
    if instances.is_empty() {
        return Err(unavailable(format!("no {service} instance is registered")));
    }
    let ids = request.extensions().get::<CorrelationId>().copied();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ProblemKind::BodyTooLarge,
                "the request body is too large",
            )
        })?;
    let replayable = parts.method == Method::GET
        || parts.method == Method::HEAD
        || parts.headers.contains_key("idempotency-key");
    let start = gateway.next.fetch_add(1, Ordering::Relaxed);
    for offset in 0..instances.len() {
        let instance = &instances[(start + offset) % instances.len()];
        let breaker = gateway.breaker(&instance.address);
        if !breaker.allow() {
            continue;
        }
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("http://{}{path_and_query}", instance.address);
        let mut upstream = gateway
            .client
            .request(parts.method.clone(), &url)
            .headers(forwarded(&parts.headers))
            .body(body.clone());
        // Each attempt is a client span; the upstream's request span hangs below it.
        let span = tracing::info_span!(
            "forward",
            otel.kind = "client",
            otel.name = %format_args!("{} {service}", parts.method),
            server.address = %instance.address,
            breaker.state = breaker.state(),
            http.response.status_code = tracing::field::Empty,
        );
        if let Some(ids) = ids {
            upstream = upstream.header(CORRELATION_HEADER, ids.uuid.to_string());
            let trace = span.in_scope(|| trace::outgoing(Some(ids.trace)));
            if let Some(trace) = trace {
                upstream = upstream.header(trace::TRACEPARENT, trace.to_string());
            }
            if let Some(state) = parts.headers.get(trace::TRACESTATE) {
                upstream = upstream.header(trace::TRACESTATE, state);
            }
        }
        upstream = upstream.header(VIA_GATEWAY_HEADER, "gateway");
        let sent = upstream.send().instrument(span.clone()).await;
        if let Ok(response) = &sent {
            span.record("http.response.status_code", response.status().as_u16());
        }
        match sent {
            Ok(response) => {
                // The instance's own health: it answered. A 5xx of its own (a read
                // model behind, a request that failed) says nothing about the
                // instance, and counting it would let any client open the breaker.
                if matches!(
                    response.status(),
                    StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                ) {
                    breaker.failure();
                } else {
                    breaker.success();
                }
                let mut answer = answer(response).await;
                if let Ok(id) = HeaderValue::from_str(&instance.instance_id) {
                    answer.headers_mut().insert(UPSTREAM_HEADER, id);
                }
                return Ok(answer);
            }
            // Never reached the instance: another one may take it.
            Err(error) if error.is_connect() => {
                breaker.failure();
                tracing::warn!(%error, instance = %instance.address, "upstream unreachable");
            }
            // Reached it, then the connection broke (the instance died with the
            // request in hand): a read, or a command whose Idempotency-Key makes a
            // second delivery answer like the first, may go to another instance.
            Err(error) if !error.is_timeout() && replayable => {
                breaker.failure();
                tracing::warn!(%error, instance = %instance.address, "upstream failed; trying another");
            }
            Err(error) => {
                breaker.failure();
                let (status, kind) = if error.is_timeout() {
                    (StatusCode::GATEWAY_TIMEOUT, ProblemKind::UpstreamTimeout)
                } else {
                    (StatusCode::BAD_GATEWAY, ProblemKind::UpstreamFailed)
                };
                return Err(ApiError::new(
                    status,
                    kind,
                    format!("the {service} service did not answer"),
                ));
            }
        }
    }
    Err(unavailable(format!(
        "no healthy {service} instance; try again shortly"
    )))
}

fn unavailable(detail: String) -> ApiError {
    ApiError::unavailable(ProblemKind::UpstreamUnavailable, detail, 1)
}

/// Headers that belong to one connection, not to the request or response.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// The request's headers as they go upstream (the token among them, which the
/// service checks again).
fn forwarded(headers: &HeaderMap) -> HeaderMap {
    headers
        .iter()
        .filter(|(name, _)| {
            !hop_by_hop(name)
                && *name != CORRELATION_HEADER
                && *name != VIA_GATEWAY_HEADER
                && *name != trace::TRACEPARENT
                && *name != trace::TRACESTATE
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The upstream's answer, as the client gets it.
async fn answer(response: reqwest::Response) -> Response {
    let status = response.status();
    let headers: HeaderMap = response
        .headers()
        .iter()
        .filter(|(name, _)| !hop_by_hop(name) && *name != CORRELATION_HEADER)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    match response.bytes().await {
        Ok(bytes) => {
            let mut answer = (status, Body::from(bytes)).into_response();
            answer.headers_mut().extend(headers);
            answer
        }
        Err(error) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            ProblemKind::UpstreamFailed,
            format!("the answer broke off: {error}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_to_their_service_and_commands_need_a_token() {
        assert_eq!(owner("/orders/1/cancel"), Some(Service::Order));
        assert_eq!(owner("/customers/1/orders"), Some(Service::Order));
        assert_eq!(owner("/auth/token"), Some(Service::User));
        assert_eq!(owner("/inventory/items"), Some(Service::Inventory));
        assert_eq!(owner("/nowhere"), None);
        assert!(needs_token(&Method::POST, "/orders", false));
        assert!(!needs_token(&Method::POST, "/users", false));
        assert!(!needs_token(&Method::POST, "/auth/token", true));
        assert!(needs_token(&Method::POST, "/inventory/items", true));
        for personal in [
            "/orders/1",
            "/users/1",
            "/customers/1/orders",
            "/payments/1",
            "/sagas/1",
            "/notifications",
        ] {
            assert!(needs_token(&Method::GET, personal, false), "{personal}");
            assert!(!needs_token(&Method::GET, personal, true), "{personal}");
        }
        assert!(!needs_token(&Method::GET, "/inventory/items/SKU-1", false));
        assert!(needs_token(&Method::GET, "/inventory-secrets", false));
    }
}
