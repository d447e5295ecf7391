//! The payment service's endpoint: an order's payment status. Payments change only
//! through commands from the order-fulfilment saga (see `workers`).

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use domain::payment::Payment;
use eventstore::AggregateStore;
use projections::Projection;
use projections::payment::PaymentStatuses;

use super::AppState;
use super::orders::parse_id;
use super::problem::ApiError;
use super::read::Freshness;

pub fn router() -> Router<AppState> {
    Router::new().route("/payments/{order_id}", get(get_payment))
}

/// `GET /payments/{order_id}` from the payment-status projection.
async fn get_payment(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    let db = state.db()?;
    let order_id = parse_id("order_id", &order_id)?;
    let stream_id = AggregateStore::stream_id::<Payment>(order_id);
    freshness
        .wait(
            db.aggregates.event_store(),
            &PaymentStatuses::queue(),
            Some(&stream_id),
        )
        .await?;
    match projections::payment::find_payment(&db.pool, order_id).await? {
        Some(payment) => Ok(Json(payment).into_response()),
        None => Err(ApiError::not_found(format!(
            "no payment for order {order_id}"
        ))),
    }
}
