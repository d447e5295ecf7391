//! The order service's endpoints: place and cancel orders; read an order and a
//! customer's orders from their projections.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use domain::order::{MAX_LINES, Order, OrderCommand, OrderLine};
use eventstore::AggregateStore;
use projections::order::{CustomerOrders, OrderSummaries};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::command::{self, Command, Reply};
use super::problem::ApiError;
use super::read::{Freshness, found};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orders", post(place_order))
        .route("/orders/{order_id}", get(get_order))
        .route("/orders/{order_id}/cancel", post(cancel_order))
        .route("/customers/{customer_id}/orders", get(customer_orders))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    customer_id: Uuid,
    lines: Vec<Line>,
    card_token: String,
    /// ISO 4217; EUR when absent.
    #[serde(default)]
    currency: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    sku: String,
    quantity: u32,
    unit_price_cents: i64,
}

/// `POST /orders`: 202 with the new order's id, `pending`, and where it was recorded.
async fn place_order(
    State(state): State<AppState>,
    request: Command<PlaceOrder>,
) -> Result<Response, ApiError> {
    let db = state.db()?;
    let body = request.body;
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
    command::run::<Order>(
        &db.aggregates,
        &request.context,
        &stream_id,
        &command,
        |executed| Reply {
            status: StatusCode::ACCEPTED,
            body: json!({
                "order_id": order_id,
                "status": "pending",
                "total_cents": executed.state.total_cents,
                "version": executed.version,
                "position": executed.append.map(|a| a.last_position),
            }),
        },
    )
    .await
}

/// `POST /orders/{id}/cancel`: records the customer's request; the saga compensates
/// what was done so far and ends the order.
async fn cancel_order(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    request: Command<serde_json::Value>,
) -> Result<Response, ApiError> {
    let db = state.db()?;
    let order_id = parse_id("order_id", &order_id)?;
    let stream_id = AggregateStore::stream_id::<Order>(order_id);
    command::run::<Order>(
        &db.aggregates,
        &request.context,
        &stream_id,
        &OrderCommand::RequestCancellation,
        |executed| Reply {
            status: StatusCode::ACCEPTED,
            body: json!({
                "order_id": order_id,
                "status": executed.state.status.map(|s| s.as_str()),
                "cancellation_requested": true,
                "version": executed.version,
                "position": executed.append.map(|a| a.last_position),
            }),
        },
    )
    .await
}

/// `GET /orders/{id}` from the order-summary projection.
async fn get_order(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    let db = state.db()?;
    let order_id = parse_id("order_id", &order_id)?;
    let stream_id = AggregateStore::stream_id::<Order>(order_id);
    freshness
        .wait::<OrderSummaries>(db.aggregates.event_store(), Some(&stream_id))
        .await?;
    let order = projections::order::find_order(&db.pool, order_id).await?;
    found(order, || format!("order {order_id} not found"))
}

#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<String>,
}

/// `GET /customers/{id}/orders`: newest first (`?limit=`, default 100, at most 1000).
async fn customer_orders(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    Query(page): Query<Page>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    let db = state.db()?;
    let customer_id = parse_id("customer_id", &customer_id)?;
    let limit = match page.limit.as_deref().map(str::parse::<i64>) {
        None => 100,
        Some(Ok(limit)) if (1..=1000).contains(&limit) => limit,
        Some(_) => return Err(ApiError::invalid("limit", "limit must be 1 to 1000")),
    };
    freshness
        .wait::<CustomerOrders>(db.aggregates.event_store(), None)
        .await?;
    let orders = projections::order::customer_orders(&db.pool, customer_id, limit).await?;
    Ok(Json(orders).into_response())
}

/// A path segment that must be a UUID; anything else cannot name a resource.
pub fn parse_id(field: &str, text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::not_found(format!("{field} {text:?} is not a UUID")).with_field(field)
    })
}
