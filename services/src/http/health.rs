//! What probes and operators ask every server: `/health/live`, `/health/ready` and
//! `/metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::{Value, json};

use super::context::{Base, SubscriptionWatch};

/// How long a readiness check waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router() -> Router<Base> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

/// The process answers: nothing else is checked.
#[utoipa::path(get, path = "/health/live", tag = "service",
    responses((status = 200, description = "`{status: \"live\", service}`",
        content_type = "application/json")))]
pub(super) async fn live(State(state): State<Base>) -> Json<Value> {
    Json(json!({ "status": "live", "service": state.service.name() }))
}

/// Ready when the database and the broker answer, every worker runs, and no
/// subscription is stalled or held back by an open transaction.
#[utoipa::path(get, path = "/health/ready", tag = "service", responses(
    (status = 200, description = "`{status: \"ready\", service, checks, subscriptions}`: every \
        check is `ok`; `subscriptions` gives each one's lag, position and leader", content_type = "application/json"),
    (status = 503, description = "`status: \"not_ready\"`; each failed check says why",
        content_type = "application/json")))]
pub(super) async fn ready(State(state): State<Base>) -> impl IntoResponse {
    let mut ready = true;
    let mut checks = serde_json::Map::new();
    let mut check = |name: &str, outcome: Result<(), String>| {
        ready &= outcome.is_ok();
        let text = outcome.map_or_else(|error| format!("error: {error}"), |()| "ok".to_owned());
        checks.insert(name.to_owned(), json!(text));
    };
    if let Some(pool) = &state.health.database {
        let query = sqlx::query("SELECT 1").execute(pool);
        check(
            "database",
            within(query)
                .await
                .and_then(|r| r.map(drop).map_err(|e| e.to_string())),
        );
    }
    if let Some(url) = &state.health.amqp_url {
        let connect = eventstore::amqp::connect(url, "orderflow readiness check");
        let outcome = within(connect).await.and_then(|result| match result {
            Ok(connection) => {
                tokio::spawn(async move { connection.close(200, "checked".into()).await });
                Ok(())
            }
            Err(error) => Err(error.to_string()),
        });
        check("broker", outcome);
    }
    for (name, running) in &state.health.workers {
        let outcome = if running.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("stopped".to_owned())
        };
        check(name, outcome);
    }
    let mut lags = serde_json::Map::new();
    for SubscriptionWatch { lag, progress } in &state.health.subscriptions {
        let name = progress.name();
        let lag = *lag.borrow();
        let held_back = progress.held_back();
        lags.insert(
            name.to_owned(),
            json!({
                "lag_events": lag.events,
                "stalled": lag.stalled,
                "position": progress.position(),
                "leading_here": progress.leading(),
                "held_back": held_back.as_ref().map(ToString::to_string),
            }),
        );
        let outcome = match (&held_back, lag.stalled) {
            (Some(held), _) => Err(held.to_string()),
            (None, true) => Err(format!("stalled with {} events to apply", lag.events)),
            (None, false) => Ok(()),
        };
        check(&format!("subscription {name}"), outcome);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "service": state.service.name(),
        "checks": checks,
        "subscriptions": lags,
    });
    (status, Json(body))
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CHECK_TIMEOUT, future)
        .await
        .map_err(|_| format!("no answer within {} s", CHECK_TIMEOUT.as_secs()))
}

/// The process's metrics, in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "OpenMetrics text format", body = String,
        content_type = "application/openmetrics-text; version=1.0.0")))]
pub(super) async fn metrics(State(state): State<Base>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            eventstore::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
}
