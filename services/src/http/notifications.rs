//! The notification service's endpoints: the notifications sent to a user, and the
//! controls of its simulated providers.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};
use uuid::Uuid;

use super::caller::Caller;
use super::command::parse_json;
use super::context::ServiceState;
use super::problem::{ApiError, PROBLEM, Problem};
use crate::notifications::{Channel, Mode, NotificationView, ProviderView, Providers};

/// The notification service's routes; the providers' controls reach `providers`.
pub fn router(providers: Arc<Providers>) -> Router<ServiceState> {
    let controls = Router::new()
        .route("/providers", get(provider_views))
        .route("/providers/{channel}", put(set_provider))
        .with_state(providers);
    Router::new()
        .route("/notifications", get(list))
        .merge(controls)
}

/// The notification service's endpoints, for `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(list, provider_views, set_provider),
    tags((name = "notifications", description = "Notifications sent, and the simulated providers"))
)]
pub struct Api;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Whose notifications.
    user_id: String,
    /// At most this many (default 100, at most 1000).
    limit: Option<i64>,
}

/// The notifications sent to a user, newest first, each naming the order it is about.
#[utoipa::path(get, path = "/notifications", tag = "notifications", params(ListQuery),
    responses(
        (status = 200, description = "Sent notifications", body = [NotificationView]),
        (status = 401, description = "No access token, or one that does not verify",
            body = Problem, content_type = PROBLEM),
        (status = 404, description = "Another user's notifications", body = Problem,
            content_type = PROBLEM),
        (status = 422, description = "Missing or bad user_id", body = Problem, content_type = PROBLEM),
    ))]
async fn list(
    State(state): State<ServiceState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    caller.reader()?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid("user_id", rejection.body_text()))?;
    let user_id = Uuid::parse_str(query.user_id.trim())
        .map_err(|_| ApiError::invalid("user_id", "must be a UUID"))?;
    if !caller.sees(Some(user_id)) {
        return Err(ApiError::not_found(format!("no user {user_id}")));
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let sent = crate::notifications::sent_to(&state.db.pool, user_id, limit).await?;
    Ok(Json(sent).into_response())
}

/// The simulated providers: mode, breaker state and what each delivered.
#[utoipa::path(get, path = "/providers", tag = "notifications",
    responses((status = 200, description = "One entry per channel", body = [ProviderView])))]
async fn provider_views(State(providers): State<Arc<Providers>>) -> Json<Vec<ProviderView>> {
    let views: Vec<ProviderView> = Channel::ALL
        .into_iter()
        .map(|channel| providers.view(channel))
        .collect();
    Json(views)
}

/// Makes a simulated provider work, fail or answer slowly: `{"mode":"ok"}`,
/// `{"mode":"failing"}`, `{"mode":"slow","delay_ms":500}`.
#[utoipa::path(put, path = "/providers/{channel}", tag = "notifications",
    params(("channel" = String, Path, description = "email, sms or push")),
    request_body = Mode,
    responses(
        (status = 200, description = "The provider now", body = ProviderView),
        (status = 404, description = "No such channel", body = Problem, content_type = PROBLEM),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = PROBLEM),
        (status = 422, description = "Unknown mode", body = Problem, content_type = PROBLEM),
    ))]
async fn set_provider(
    State(providers): State<Arc<Providers>>,
    Path(channel): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let channel = Channel::parse(&channel)
        .ok_or_else(|| ApiError::not_found(format!("no channel {channel:?}")))?;
    let mode: Mode = parse_json(&body)?;
    providers.set_mode(channel, mode);
    Ok(Json(providers.view(channel)).into_response())
}
