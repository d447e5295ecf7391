//! The payment service's endpoint: an order's payment status. Payments change only
//! through commands from the order-fulfilment saga (see `workers`).

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use domain::payment::Payment;
use eventstore::AggregateStore;
use projections::payment::PaymentStatuses;

use super::AppState;
use super::orders::parse_id;
use super::problem::ApiError;
use super::read::{Freshness, found};

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
        .wait::<PaymentStatuses>(db.aggregates.event_store(), Some(&stream_id))
        .await?;
    let payment = projections::payment::find_payment(&db.pool, order_id).await?;
    found(payment, || format!("no payment for order {order_id}"))
}
