//! The order service's endpoints: place and cancel orders; read an order and a
//! customer's orders from their projections.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use domain::ids::{CustomerId, OrderId};
use domain::order::{MAX_LINES, Order, OrderCommand, OrderLine};
use eventstore::AggregateStore;
use projections::order::{CustomerOrderView, CustomerOrders, OrderSummaries, OrderView};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use super::caller::Caller;
use super::command::{self, Command, CommandContext, Reply};
use super::context::ServiceState;
use super::openapi::{CommandProblems, QueryProblems};
use super::problem::{ApiError, PROBLEM, Problem};
use super::read::{Freshness, found, parse_id};

pub fn router() -> Router<ServiceState> {
    Router::new()
        .route("/orders", post(place_order))
        .route("/orders/{order_id}", get(get_order))
        .route("/orders/{order_id}/cancel", post(cancel_order))
        .route("/customers/{customer_id}/orders", get(customer_orders))
}

/// The order service's endpoints, for `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(place_order, cancel_order, get_order, customer_orders),
    tags((name = "orders", description = "Place, cancel and read orders"))
)]
pub struct Api;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    customer_id: Uuid,
    /// 1 to 100 lines.
    lines: Vec<Line>,
    /// The simulated provider declines `tok_decline` and never answers `tok_timeout`.
    #[schema(example = "tok_visa")]
    card_token: String,
    /// ISO 4217; EUR when absent.
    #[serde(default)]
    #[schema(example = "EUR")]
    currency: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Line {
    #[schema(example = "SKU-1")]
    sku: String,
    quantity: u32,
    unit_price_cents: i64,
}

/// The answer to `POST /orders`.
#[derive(Debug, Serialize, ToSchema)]
struct OrderAccepted {
    order_id: Uuid,
    /// Always `pending`: the saga confirms, rejects or cancels the order later.
    #[schema(example = "pending")]
    status: &'static str,
    total_cents: i64,
    /// The order stream's version: `?min_version=` on `GET /orders/{id}`.
    version: i64,
    /// The global position of the last event written: `?min_position=`.
    position: Option<i64>,
}

/// The answer to `POST /orders/{id}/cancel`.
#[derive(Debug, Serialize, ToSchema)]
struct CancellationAccepted {
    order_id: Uuid,
    #[schema(example = "pending")]
    status: Option<&'static str>,
    cancellation_requested: bool,
    version: i64,
    position: Option<i64>,
}

/// Place an order: 202 with its id, `pending`, and where it was recorded; the saga
/// carries it on.
#[utoipa::path(post, path = "/orders", tag = "orders", request_body = PlaceOrder,
    params(CommandContext),
    responses(
        (status = 202, description = "Recorded", body = OrderAccepted),
        CommandProblems,
    ))]
async fn place_order(
    State(state): State<ServiceState>,
    caller: Caller,
    request: Command<PlaceOrder>,
) -> Result<Response, ApiError> {
    let db = &state.db;
    let body = request.body;
    caller.may_act_for(body.customer_id)?;
    if body.lines.len() > MAX_LINES {
        return Err(ApiError::invalid(
            "lines",
            format!("at most {MAX_LINES} lines"),
        ));
    }
    for (index, line) in body.lines.iter().enumerate() {
        domain::inventory::validate_sku(&line.sku)
            .map_err(|error| ApiError::invalid(format!("lines[{index}].sku"), error.to_string()))?;
    }
    let order_id = Uuid::now_v7();
    let command = OrderCommand::PlaceOrder {
        order_id,
        customer_id: body.customer_id,
        lines: body
            .lines
            .into_iter()
            .map(|line| OrderLine {
                sku: line.sku,
                quantity: line.quantity,
                unit_price_cents: line.unit_price_cents,
            })
            .collect(),
        currency: body.currency.unwrap_or_else(|| "EUR".to_owned()),
        card_token: body.card_token,
    };
    let stream_id = AggregateStore::stream_id::<Order>(order_id);
    // The id is new, so its stream cannot exist: nothing to lock or load.
    let mut context = request.context;
    context.if_match = Some(0);
    command::run::<Order>(&db.aggregates, &context, &stream_id, &command, |executed| {
        Reply {
            status: StatusCode::ACCEPTED,
            body: json!(OrderAccepted {
                order_id,
                status: "pending",
                total_cents: executed.state.total_cents,
                version: executed.version,
                position: executed.append.map(|a| a.last_position),
            }),
        }
    })
    .await
}

/// Ask to cancel an order: records the request; the saga compensates what was done
/// so far and ends the order.
#[utoipa::path(post, path = "/orders/{order_id}/cancel", tag = "orders",
    params(("order_id" = Uuid, Path), CommandContext),
    request_body(content = Option<Object>, description = "Empty, or a JSON object (ignored)"),
    responses(
        (status = 202, description = "Recorded", body = CancellationAccepted),
        (status = 404, description = "No such order", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The order has ended, or If-Match is stale",
            body = Problem, content_type = PROBLEM),
        CommandProblems,
    ))]
async fn cancel_order(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(order_id): Path<String>,
    request: Command<serde_json::Value>,
) -> Result<Response, ApiError> {
    caller.actor()?;
    let db = &state.db;
    let order_id = parse_id("order_id", &order_id)?;
    let stream_id = AggregateStore::stream_id::<Order>(order_id);
    if !caller.sees(None) {
        // Whose order it is, from the aggregate (current, where the read model lags);
        // another customer's order answers as a missing one does.
        let order = db.aggregates.load::<Order>(&stream_id).await?.state;
        if order.order_id.is_some() && !caller.sees(Some(order.customer_id)) {
            return Err(ApiError::from(domain::order::OrderError::NotFound));
        }
    }
    command::run::<Order>(
        &db.aggregates,
        &request.context,
        &stream_id,
        &OrderCommand::RequestCancellation,
        |executed| Reply {
            status: StatusCode::ACCEPTED,
            body: json!(CancellationAccepted {
                order_id,
                status: executed.state.status.map(|s| s.as_str()),
                cancellation_requested: true,
                version: executed.version,
                position: executed.append.map(|a| a.last_position),
            }),
        },
    )
    .await
}

/// An order, from the order-summary read model.
#[utoipa::path(get, path = "/orders/{order_id}", tag = "orders",
    params(("order_id" = Uuid, Path), Freshness),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 404, description = "No such order, or another customer's", body = Problem,
            content_type = PROBLEM),
        QueryProblems,
    ))]
async fn get_order(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(order_id): Path<String>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    caller.reader()?;
    let db = &state.db;
    let order_id = parse_id("order_id", &order_id)?;
    let stream_id = AggregateStore::stream_id::<Order>(order_id);
    freshness
        .wait::<OrderSummaries>(&state, Some(&stream_id))
        .await?;
    let order = projections::order::find_order(&db.pool, OrderId::new(order_id))
        .await?
        .filter(|order| caller.sees(Some(order.customer_id)));
    found(order, || format!("order {order_id} not found"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Page {
    /// How many orders, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
}

/// A customer's orders, newest first, from the customer-orders read model.
#[utoipa::path(get, path = "/customers/{customer_id}/orders", tag = "orders",
    params(("customer_id" = Uuid, Path), Page, Freshness),
    responses(
        (status = 200, description = "The orders (empty for an unknown customer)",
            body = Vec<CustomerOrderView>),
        QueryProblems,
        (status = 404, description = "customer_id is not a UUID, or another customer's",
            body = Problem, content_type = PROBLEM),
        (status = 422, description = "Bad limit or min_position; min_version is refused here",
            body = Problem, content_type = PROBLEM),
    ))]
async fn customer_orders(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    page: Result<Query<Page>, QueryRejection>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    caller.reader()?;
    let Query(page) =
        page.map_err(|rejection| ApiError::invalid("limit", rejection.body_text()))?;
    let db = &state.db;
    let customer_id = parse_id("customer_id", &customer_id)?;
    if !caller.sees(Some(customer_id)) {
        return Err(ApiError::not_found(format!("no customer {customer_id}")));
    }
    let limit = match page.limit.as_deref().map(str::parse::<i64>) {
        None => 100,
        Some(Ok(limit)) if (1..=1000).contains(&limit) => limit,
        Some(_) => return Err(ApiError::invalid("limit", "limit must be 1 to 1000")),
    };
    freshness.wait::<CustomerOrders>(&state, None).await?;
    let orders =
        projections::order::customer_orders(&db.pool, CustomerId::new(customer_id), limit).await?;
    Ok(Json(orders).into_response())
}
