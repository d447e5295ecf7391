//! The inventory service's read model: stock levels per SKU.

use domain::ids::Sku;
use domain::inventory::StockEvent;
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgPool};

use crate::{EventContext, Projection};

/// `GET /inventory/items/{sku}`.
pub struct StockLevels;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StockView {
    pub sku: String,
    pub name: String,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub version: i64,
}

impl Projection for StockLevels {
    const NAME: &'static str = "stock-levels";
    const SERVICE: &'static str = "inventory";
    const STREAM_PREFIX: &'static str = "stock-";
    const TABLES: &'static [&'static str] = &["stock_levels"];
    type Event = StockEvent;

    async fn apply(
        &self,
        event: &StockEvent,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        if let StockEvent::StockItemCreated { sku, name } = event {
            sqlx::query(
                "INSERT INTO stock_levels (sku, name, available, reserved, sold, version, position, \
                 updated_at) VALUES ($1, $2, 0, 0, 0, $3, $4, $5) ON CONFLICT (sku) DO NOTHING",
            )
            .bind(sku)
            .bind(name)
            .bind(context.stream_version)
            .bind(context.global_position)
            .bind(context.recorded_at)
            .execute(connection)
            .await?;
            return Ok(());
        }
        // (sku, change to available, to reserved, to sold)
        let (sku, available, reserved, sold) = match event {
            StockEvent::StockAdded { sku, quantity } => (sku, i64::from(*quantity), 0, 0),
            StockEvent::StockReserved { sku, quantity, .. } => {
                (sku, -i64::from(*quantity), i64::from(*quantity), 0)
            }
            StockEvent::StockReleased { sku, quantity, .. } => {
                (sku, i64::from(*quantity), -i64::from(*quantity), 0)
            }
            StockEvent::StockCommitted { sku, quantity, .. } => {
                (sku, 0, -i64::from(*quantity), i64::from(*quantity))
            }
            // Nothing moves; the version still advances. (Creation was handled above.)
            StockEvent::StockReservationFailed { sku, .. }
            | StockEvent::StockItemCreated { sku, .. } => (sku, 0, 0, 0),
        };
        // Guarded by version: the same movement is never counted twice.
        sqlx::query(
            "UPDATE stock_levels SET available = available + $2, reserved = reserved + $3, \
             sold = sold + $4, version = $5, position = $6, updated_at = $7 \
             WHERE sku = $1 AND version < $5",
        )
        .bind(sku)
        .bind(available)
        .bind(reserved)
        .bind(sold)
        .bind(context.stream_version)
        .bind(context.global_position)
        .bind(context.recorded_at)
        .execute(connection)
        .await?;
        Ok(())
    }
}

pub async fn find_item(pool: &PgPool, sku: &Sku) -> Result<Option<StockView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT sku, name, available, reserved, sold, version FROM stock_levels WHERE sku = $1",
    )
    .bind(sku.as_str())
    .fetch_optional(pool)
    .await
}
