//! `GET /openapi.json`: each service's OpenAPI document, generated from the
//! `#[utoipa::path]` annotations next to the handlers, so it cannot drift from them
//! unnoticed (a test requests every path the document names).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Required, Type};
use utoipa::{IntoResponses, OpenApi};

use super::context::CORRELATION_HEADER;
use super::health;
use crate::config::Service;

/// What every service serves, whatever else it does.
#[derive(OpenApi)]
#[openapi(
    paths(health::live, health::ready, health::metrics, openapi_json),
    components(schemas(super::problem::Problem, super::problem::ProblemKind)),
    info(
        description = "An event-sourced order platform. Errors are application/problem+json \
                       (RFC 9457) with a stable `type`; commands accept `Idempotency-Key`; \
                       queries accept `min_version`/`min_position` for read-your-writes."
    )
)]
struct Common;

/// The OpenAPI document of `service`'s server: what every server serves, and
/// `resources`.
pub fn document(service: Service, resources: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let mut document = Common::openapi();
    document.merge(resources);
    document.info.title = format!("orderflow {service} service");
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    // Every request accepts a correlation id, and every response returns it.
    for item in document.paths.paths.values_mut() {
        item.parameters.get_or_insert_with(Vec::new).push(header(
            CORRELATION_HEADER,
            "Ties this request to the events, messages and log lines it causes; \
             generated when absent, always returned.",
        ));
    }
    document
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(
    State(document): State<Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json(utoipa::openapi::OpenApi::clone(&document))
}

/// Serves `document` at `/openapi.json`.
pub fn router(document: utoipa::openapi::OpenApi) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .with_state(Arc::new(document))
}

/// The problems every command endpoint may answer, beyond its own.
pub struct CommandProblems;

impl IntoResponses for CommandProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses([
            (400, problem("Malformed JSON or header")),
            (
                401,
                problem("No access token where one is needed, or one that does not verify"),
            ),
            (
                403,
                problem("The command acts for another user than the access token's"),
            ),
            (413, problem("Body over 64 KiB")),
            (415, problem("Not JSON")),
            (
                422,
                problem("Invalid field (named in `field`) or reused Idempotency-Key"),
            ),
        ])
    }
}

/// The problems every read-your-writes query may answer, beyond its own.
pub struct QueryProblems;

impl IntoResponses for QueryProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let retry = Header::new(ObjectBuilder::new().schema_type(Type::Integer));
        responses([
            (
                401,
                problem("Personal data without an access token, or a token that does not verify"),
            ),
            (422, problem("Bad min_version or min_position")),
            (
                503,
                problem("The read model has not caught up within 2 s").header("Retry-After", retry),
            ),
        ])
    }
}

/// A problem+json response.
fn problem(description: &str) -> ResponseBuilder {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content(super::problem::PROBLEM, content)
}

fn responses<const N: usize>(
    list: [(u16, ResponseBuilder); N],
) -> BTreeMap<String, RefOr<Response>> {
    list.into_iter()
        .map(|(status, response)| (status.to_string(), RefOr::T(response.build())))
        .collect()
}

/// An optional string request header.
pub fn header(name: &str, description: &str) -> Parameter {
    optional(name, ParameterIn::Header, Type::String, description)
}

/// An optional request parameter of a simple type.
pub fn optional(name: &str, place: ParameterIn, kind: Type, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(place)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(kind)))
        .build()
}
