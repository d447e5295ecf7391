//! The inventory service's endpoints: add stock; read stock levels.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use domain::inventory::{StockCommand, StockEvent, StockItem};
use eventstore::AggregateStore;
use projections::inventory::StockLevels;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::command::{self, Command, Reply};
use super::problem::ApiError;
use super::read::{Freshness, found};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/inventory/items", post(add_stock))
        .route("/inventory/items/{sku}", get(get_item))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddStock {
    sku: String,
    /// Needed when the item is new; ignored when it exists.
    #[serde(default)]
    name: String,
    quantity: u32,
}

/// `POST /inventory/items`: creates the item (201) or adds to it (200).
async fn add_stock(
    State(state): State<AppState>,
    request: Command<AddStock>,
) -> Result<Response, ApiError> {
    let db = state.db()?;
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
                body: json!({
                    "sku": sku,
                    "available": executed.state.available,
                    "reserved": executed.state.reserved,
                    "sold": executed.state.sold,
                    "version": executed.version,
                    "position": executed.append.map(|a| a.last_position),
                }),
            }
        },
    )
    .await
}

/// `GET /inventory/items/{sku}` from the stock-levels projection.
async fn get_item(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    let db = state.db()?;
    let stream_id = AggregateStore::stream_id::<StockItem>(&sku);
    freshness
        .wait::<StockLevels>(db.aggregates.event_store(), Some(&stream_id))
        .await?;
    let item = projections::inventory::find_item(&db.pool, &sku).await?;
    found(item, || format!("stock item {sku:?} not found"))
}
