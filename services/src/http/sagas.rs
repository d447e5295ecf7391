//! The order service's view of its sagas: `GET /sagas/{order_id}`.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use domain::ids::{CustomerId, OrderId};
use sagas::runner::SagaView;
use utoipa::OpenApi;

use super::caller::Caller;
use super::context::ServiceState;
use super::problem::{ApiError, PROBLEM, Problem};
use super::read::{found, parse_id};

/// The saga endpoints, for `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(get_saga),
    tags((name = "sagas", description = "The order-fulfilment saga of each order"))
)]
pub struct Api;

pub fn router() -> Router<ServiceState> {
    Router::new().route("/sagas/{order_id}", get(get_saga))
}

/// An order's fulfilment saga: where it is, its pending deadline, and every step it
/// took with what it sent.
#[utoipa::path(get, path = "/sagas/{order_id}", tag = "sagas",
    params(("order_id" = Uuid, Path)),
    responses(
        (status = 200, description = "The saga", body = SagaView),
        (status = 401, description = "No access token, or one that does not verify",
            body = Problem, content_type = PROBLEM),
        (status = 404, description = "No saga for this order (yet), or another customer's",
            body = Problem, content_type = PROBLEM),
    ))]
async fn get_saga(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    caller.reader()?;
    let db = &state.db;
    let order_id = parse_id("order_id", &order_id)?;
    let saga = sagas::runner::find(&db.pool, OrderId::new(order_id))
        .await?
        .filter(|saga| caller.sees(saga.customer_id().map(CustomerId::uuid)));
    found(saga, || format!("no saga for order {order_id}"))
}
