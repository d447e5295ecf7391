//! Read-your-writes for queries: `?min_version=` / `x-min-version` (a stream version a
//! command returned) or `?min_position=` / `x-min-position` (a global position). The
//! query waits up to [`WAIT`] for its read model to catch up, then answers, or 503.

use std::time::Duration;

use super::context::ServiceState;
use super::openapi;
use super::problem::ApiError;
use crate::http::problem::ProblemKind;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Json, Response};
use projections::Projection;
use utoipa::IntoParams;
use utoipa::openapi::Type;
use utoipa::openapi::path::{Parameter, ParameterIn};
use uuid::Uuid;

/// How long a query waits for its read model.
pub const WAIT: Duration = Duration::from_secs(2);
/// How often a query waiting for a stream version not yet written looks again, at
/// most (the read model moving on wakes it sooner).
const NEXT_LOOK: Duration = Duration::from_millis(100);

/// What the client has seen and wants the answer to include.
#[derive(Debug, Default, Clone, Copy)]
pub struct Freshness {
    pub min_version: Option<i64>,
    pub min_position: Option<i64>,
}

/// The query parameters and headers a query reads, for the OpenAPI document.
impl IntoParams for Freshness {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let integer =
            |name, place, description| openapi::optional(name, place, Type::Integer, description);
        let version = "Answer only once the read model includes this version of the stream \
                       (a command's `version`); waits up to 2 s, then 503 with Retry-After.";
        let position = "Answer only once the read model includes the event at this global \
                        position (a command's `position`); waits up to 2 s, then 503.";
        vec![
            integer("min_version", ParameterIn::Query, version),
            integer("min_position", ParameterIn::Query, position),
            integer("x-min-version", ParameterIn::Header, "As `min_version`."),
            integer("x-min-position", ParameterIn::Header, "As `min_position`."),
        ]
    }
}

#[derive(serde::Deserialize)]
struct FreshnessQuery {
    min_version: Option<String>,
    min_position: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Freshness {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = Query::<FreshnessQuery>::try_from_uri(&parts.uri)
            .map_err(|rejection| ApiError::invalid("query", rejection.body_text()))?
            .0;
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ok(Freshness {
            min_version: number(
                "min_version",
                query.min_version.or_else(|| header("x-min-version")),
            )?,
            min_position: number(
                "min_position",
                query.min_position.or_else(|| header("x-min-position")),
            )?,
        })
    }
}

fn number(field: &str, text: Option<String>) -> Result<Option<i64>, ApiError> {
    match text {
        None => Ok(None),
        Some(text) => match text.trim().parse::<i64>() {
            Ok(value) if value >= 0 => Ok(Some(value)),
            _ => Err(ApiError::invalid(
                field,
                format!("{field} must be a whole number"),
            )),
        },
    }
}

impl Freshness {
    /// Waits until the read models of `P`'s service have applied what the client asked
    /// to see: `min_version` of `stream_id`, and the event at `min_position`. Their
    /// subscription applies the store in global order, so this is one position to
    /// wait for. A 503 with `Retry-After` when it has not within [`WAIT`] (or the
    /// stream is parked behind an event that failed); a 404 or 422 when there is
    /// nothing to wait for (a version the stream never reached, no event at the
    /// position).
    pub async fn wait<P: Projection>(
        &self,
        state: &ServiceState,
        stream_id: Option<&str>,
    ) -> Result<(), ApiError> {
        let store = state.db.aggregates.event_store();
        let name = projections::queue(P::SERVICE);
        let progress = state.base.health.progress(&name);
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut targets = Vec::new();
        match (self.min_version, stream_id) {
            (Some(version), Some(stream_id)) if version > 0 => {
                // The version may still be on its way (a saga about to confirm): look
                // again each time the read model moves on, until the deadline.
                let position = loop {
                    if let Some(position) = store.position_of(stream_id, version).await? {
                        break position;
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        let recorded = store.stream_version(stream_id).await?;
                        if recorded == 0 {
                            return Err(ApiError::not_found(format!("{stream_id} has no events")));
                        }
                        return Err(ApiError::invalid(
                            "min_version",
                            format!(
                                "{stream_id} is at version {recorded}; {version} was never written"
                            ),
                        ));
                    }
                    let pause = (deadline - now).min(NEXT_LOOK);
                    match progress {
                        Some(progress) => {
                            let next = progress.position() + 1;
                            progress.wait_for(store.pool(), next, pause).await?;
                        }
                        None => tokio::time::sleep(pause).await,
                    }
                };
                targets.push((stream_id.to_owned(), position));
            }
            (Some(_), Some(_)) => {}
            // A list spans many streams: only a position says what to wait for.
            (Some(_), None) => {
                return Err(ApiError::invalid(
                    "min_version",
                    "this query spans many streams; pass min_position instead",
                ));
            }
            (None, _) => {}
        }
        if let Some(position) = self.min_position {
            match store.event_at(position).await? {
                Some((stream_id, _)) => targets.push((stream_id, position)),
                None => {
                    return Err(ApiError::invalid(
                        "min_position",
                        format!("no event is recorded at position {position}"),
                    ));
                }
            }
        }
        let Some(position) = targets.iter().map(|(_, position)| *position).max() else {
            return Ok(());
        };
        let behind = || {
            ApiError::unavailable(
                ProblemKind::ReadModelBehind,
                format!("the read model has not caught up with position {position} yet"),
                1,
            )
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let caught_up = match progress {
            Some(progress) => progress.wait_for(store.pool(), position, remaining).await?,
            // Not run by this process (a tool, a test): look once.
            None => eventstore::subscription::checkpoint(store.pool(), &name).await? >= position,
        };
        if !caught_up {
            return Err(behind());
        }
        for (stream_id, _) in &targets {
            if eventstore::subscription::is_parked(store.pool(), &name, stream_id).await? {
                return Err(ApiError::unavailable(
                    ProblemKind::ReadModelBehind,
                    format!(
                        "{stream_id} is parked behind an event its read model could not apply (orderflow dlq list)"
                    ),
                    30,
                ));
            }
        }
        Ok(())
    }
}

/// The view as JSON, or a 404 saying what is missing.
pub fn found<T: serde::Serialize>(
    view: Option<T>,
    missing: impl FnOnce() -> String,
) -> Result<Response, ApiError> {
    match view {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::not_found(missing())),
    }
}

/// The id in a path; one that is not a UUID names nothing (404).
pub fn parse_id(field: &str, text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::not_found(format!("{field} {text:?} is not a UUID")).with_field(field)
    })
}
