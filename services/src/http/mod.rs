//! HTTP: one router per resource, merged per service here, each service's OpenAPI
//! document assembled next to its router.
//!
//! Every request gets a tracing span and an `x-correlation-id` (the client's, or a new
//! one), which is returned and recorded in the metadata of every event the request
//! causes ([`context`]). Errors are `application/problem+json` ([`problem`]);
//! commands share [`command`] (JSON body, `If-Match`, `Idempotency-Key`), queries
//! [`read`] (read-your-writes). The gateway's router is its own
//! ([`crate::gateway::app`]); it shares [`serve`] with the services.
//!
//! Imports run one way: resource modules → `command`, `read`, `caller`, `openapi` →
//! `context` → `problem`; only this file names the resource modules.

pub mod caller;
pub mod command;
pub mod context;
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

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use utoipa::OpenApi;

use crate::config::Service;
use crate::notifications::Providers;
pub use caller::{Caller, Identity};
pub use context::{Access, Base, Db, Health, ServiceState, SubscriptionWatch};
use problem::ApiError;

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

/// The order service: orders, a customer's orders, and the order sagas.
pub fn order(state: ServiceState) -> Router {
    service(state, orders::router().merge(sagas::router()))
}

/// The inventory service: stock items.
pub fn inventory(state: ServiceState) -> Router {
    service(state, inventory::router())
}

/// The payment service: payments.
pub fn payment(state: ServiceState) -> Router {
    service(state, payments::router())
}

/// The user service: users, their profiles and preferences, and access tokens.
pub fn user(state: ServiceState) -> Router {
    service(state, users::router())
}

/// The notification service: what was sent to a user, and its providers.
pub fn notification(state: ServiceState, providers: Arc<Providers>) -> Router {
    service(state, notifications::router(providers))
}

/// The OpenAPI paths of a service's own resources; the gateway's document merges
/// them all.
pub fn resources_api(service: Service) -> utoipa::openapi::OpenApi {
    let parts = match service {
        Service::Order => vec![orders::Api::openapi(), sagas::Api::openapi()],
        Service::Inventory => vec![inventory::Api::openapi()],
        Service::Payment => vec![payments::Api::openapi()],
        Service::User => vec![users::Api::openapi()],
        Service::Notification => vec![notifications::Api::openapi()],
        Service::Gateway => vec![],
    };
    let mut document = utoipa::openapi::OpenApiBuilder::new().build();
    for part in parts {
        document.merge(part);
    }
    document
}

/// A service's resources, behind its back-pressure, with what every server serves.
fn service(state: ServiceState, resources: Router<ServiceState>) -> Router {
    let mut router = resources.fallback(not_found);
    if let Some(pressure) = state.pressure.clone() {
        router = router.layer(axum::middleware::from_fn_with_state(
            pressure,
            crate::pressure::admit,
        ));
    }
    let base = state.base.clone();
    let document = openapi::document(base.service, resources_api(base.service));
    serve(router.with_state(state), base, document)
}

/// What every server serves besides its resources (`/health/*`, `/metrics`,
/// `/openapi.json` with `document`), and the layers every request passes: the body
/// limit and the request's context.
pub fn serve(resources: Router, base: Base, document: utoipa::openapi::OpenApi) -> Router {
    let requests = context::Requests::new(base.service, &base.metrics);
    resources
        .merge(health::router().with_state(base))
        .merge(openapi::router(document))
        .layer(DefaultBodyLimit::max(context::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            requests,
            context::request_context,
        ))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such resource: {} {}",
        request.method(),
        request.uri().path()
    ))
}
