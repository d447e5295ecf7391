//! The inventory service's endpoints: add stock; read stock levels.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use domain::ids::Sku;
use domain::inventory::{StockCommand, StockEvent, StockItem};
use eventstore::AggregateStore;
use projections::inventory::{StockLevels, StockView};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use super::command::{self, Command, CommandContext, Reply};
use super::context::ServiceState;
use super::openapi::{CommandProblems, QueryProblems};
use super::problem::{ApiError, PROBLEM, Problem};
use super::read::{Freshness, found};

pub fn router() -> Router<ServiceState> {
    Router::new()
        .route("/inventory/items", post(add_stock))
        .route("/inventory/items/{sku}", get(get_item))
}

/// The inventory service's endpoints, for `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(add_stock, get_item),
    tags((name = "inventory", description = "Stock items and their levels"))
)]
pub struct Api;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddStock {
    #[schema(example = "SKU-1")]
    sku: String,
    /// Needed when the item is new; ignored when it exists.
    #[serde(default)]
    name: String,
    quantity: u32,
}

/// The answer to `POST /inventory/items`: the item's levels after the change.
#[derive(Debug, Serialize, ToSchema)]
struct StockChanged {
    sku: String,
    available: u64,
    reserved: u64,
    sold: u64,
    /// The item stream's version: `?min_version=` on `GET /inventory/items/{sku}`.
    version: i64,
    /// The global position of the last event written: `?min_position=`.
    position: Option<i64>,
}

/// Create a stock item (201), or add `quantity` to an existing one (200).
#[utoipa::path(post, path = "/inventory/items", tag = "inventory", request_body = AddStock,
    params(CommandContext),
    responses(
        (status = 201, description = "Created", body = StockChanged),
        (status = 200, description = "Added to an existing item", body = StockChanged),
        (status = 409, description = "If-Match is stale", body = Problem, content_type = PROBLEM),
        CommandProblems,
    ))]
async fn add_stock(
    State(state): State<ServiceState>,
    request: Command<AddStock>,
) -> Result<Response, ApiError> {
    let db = &state.db;
    let body = request.body;
    domain::inventory::validate_sku(&body.sku)?;
    let stream_id = AggregateStore::stream_id::<StockItem>(&body.sku);
    let sku = body.sku.clone();
    let command = StockCommand::AddStock {
        sku: body.sku,
        name: body.name,
        quantity: body.quantity,
    };
    command::run::<StockItem>(
        &db.aggregates,
        &request.context,
        &stream_id,
        &command,
        |executed| {
            let created = executed
                .events
                .iter()
                .any(|event| matches!(event, StockEvent::StockItemCreated { .. }));
            Reply {
                status: if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                body: json!(StockChanged {
                    sku: sku.clone(),
                    available: executed.state.available,
                    reserved: executed.state.reserved,
                    sold: executed.state.sold,
                    version: executed.version,
                    position: executed.append.map(|a| a.last_position),
                }),
            }
        },
    )
    .await
}

/// A stock item's levels, from the stock-levels read model.
#[utoipa::path(get, path = "/inventory/items/{sku}", tag = "inventory",
    params(("sku" = String, Path), Freshness),
    responses(
        (status = 200, description = "The item", body = StockView),
        (status = 404, description = "No such item", body = Problem, content_type = PROBLEM),
        QueryProblems,
    ))]
async fn get_item(
    State(state): State<ServiceState>,
    Path(sku): Path<Sku>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    let db = &state.db;
    let stream_id = AggregateStore::stream_id::<StockItem>(&sku);
    freshness
        .wait::<StockLevels>(&state, Some(&stream_id))
        .await?;
    let item = projections::inventory::find_item(&db.pool, &sku).await?;
    found(item, || format!("stock item {:?} not found", sku.as_str()))
}
