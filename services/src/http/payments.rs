//! The payment service's endpoint: an order's payment status. Payments change only
//! through commands from the order-fulfilment saga (see `workers`).

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use domain::ids::OrderId;
use domain::payment::Payment;
use eventstore::AggregateStore;
use projections::payment::{PaymentStatuses, PaymentView};
use utoipa::OpenApi;

use super::openapi::QueryProblems;

use super::caller::Caller;
use super::context::ServiceState;
use super::problem::{ApiError, PROBLEM, Problem};
use super::read::{Freshness, found, parse_id};

/// The payment service's endpoints, for `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(get_payment),
    tags((name = "payments", description = "Payment status per order"))
)]
pub struct Api;

pub fn router() -> Router<ServiceState> {
    Router::new().route("/payments/{order_id}", get(get_payment))
}

/// An order's payment, from the payment-status read model.
#[utoipa::path(get, path = "/payments/{order_id}", tag = "payments",
    params(("order_id" = Uuid, Path), Freshness),
    responses(
        (status = 200, description = "The payment", body = PaymentView),
        (status = 404, description = "No payment for this order, or another customer's",
            body = Problem, content_type = PROBLEM),
        QueryProblems,
    ))]
async fn get_payment(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(order_id): Path<String>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    caller.reader()?;
    let db = &state.db;
    let order_id = parse_id("order_id", &order_id)?;
    let stream_id = AggregateStore::stream_id::<Payment>(order_id);
    freshness
        .wait::<PaymentStatuses>(&state, Some(&stream_id))
        .await?;
    let payment = projections::payment::find_payment(&db.pool, OrderId::new(order_id))
        .await?
        .filter(|payment| caller.sees(payment.customer_id));
    found(payment, || format!("no payment for order {order_id}"))
}
