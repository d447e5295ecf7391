//! HTTP: one router per concern, merged per service in [`app`].

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use eventstore::Metrics;
use serde_json::json;
use sqlx::PgPool;

use crate::config::Service;

/// What every handler of one service can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub service: Service,
    /// The service's own database; `None` for the gateway.
    pub pool: Option<PgPool>,
    /// Shared by every service of the process; each series names its service.
    pub metrics: Metrics,
}

/// A service's whole HTTP surface. Tests call this without binding a socket.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(metrics::router())
        .with_state(state)
}

mod metrics {
    use super::*;
    use axum::http::header::CONTENT_TYPE;

    pub fn router() -> Router<AppState> {
        Router::new().route("/metrics", get(metrics))
    }

    /// Prometheus text exposition.
    async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
        (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            state.metrics.render(),
        )
    }
}

mod health {
    use super::*;

    pub fn router() -> Router<AppState> {
        Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
    }

    /// The process answers: nothing else is checked.
    async fn live(State(state): State<AppState>) -> Json<serde_json::Value> {
        Json(json!({ "status": "live", "service": state.service.name() }))
    }

    /// Ready when every dependency the service has answers within a bound.
    async fn ready(State(state): State<AppState>) -> impl IntoResponse {
        let database = match &state.pool {
            None => None,
            Some(pool) => Some(
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    sqlx::query("SELECT 1").execute(pool),
                )
                .await
                {
                    Ok(Ok(_)) => "ok".to_owned(),
                    Ok(Err(error)) => format!("error: {error}"),
                    Err(_) => "error: no answer within 2 s".to_owned(),
                },
            ),
        };
        let ready = database.as_deref().is_none_or(|status| status == "ok");
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = json!({
            "status": if ready { "ready" } else { "not_ready" },
            "service": state.service.name(),
            "checks": { "database": database },
        });
        (status, Json(body))
    }
}
