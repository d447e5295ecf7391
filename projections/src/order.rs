//! The order service's read models: one summary per order, and each customer's order
//! history.

use chrono::{DateTime, Utc};
use domain::ids::{CustomerId, OrderId};
use domain::order::{OrderEvent, OrderStatus};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::{EventContext, Projection};

/// `GET /orders/{id}`.
pub struct OrderSummaries;

/// `GET /customers/{id}/orders`.
pub struct CustomerOrders;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    #[cfg_attr(
        feature = "openapi",
        schema(
            example = "confirmed",
            pattern = "^(pending|confirmed|rejected|cancelled)$"
        )
    )]
    pub status: String,
    /// Stored as JSON in the summary row.
    #[sqlx(json)]
    pub lines: Vec<OrderLineView>,
    pub total_cents: i64,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub cancellation_requested: bool,
    pub placed_at: DateTime<Utc>,
    pub version: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CustomerOrderView {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub status: String,
    pub total_cents: i64,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub placed_at: DateTime<Utc>,
    pub version: i64,
}

/// The status and reason an event ends an order with: `(None, None)` when it does not
/// end the order.
fn outcome(event: &OrderEvent) -> (Option<&'static str>, Option<&'static str>) {
    match event {
        OrderEvent::OrderConfirmed { .. } => (Some(OrderStatus::Confirmed.as_str()), None),
        OrderEvent::OrderRejected { reason, .. } => {
            (Some(OrderStatus::Rejected.as_str()), Some(reason.as_str()))
        }
        OrderEvent::OrderCancelled { reason, .. } => {
            (Some(OrderStatus::Cancelled.as_str()), Some(reason.as_str()))
        }
        OrderEvent::OrderPlaced { .. } | OrderEvent::OrderCancellationRequested { .. } => {
            (None, None)
        }
    }
}

impl Projection for OrderSummaries {
    const NAME: &'static str = "order-summary";
    const SERVICE: &'static str = "order";
    const STREAM_PREFIX: &'static str = "order-";
    const TABLES: &'static [&'static str] = &["order_summaries"];
    type Event = OrderEvent;

    async fn apply(
        &self,
        event: &OrderEvent,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        if let OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            lines,
            total_cents,
            currency,
            ..
        } = event
        {
            let lines: Vec<OrderLineView> = lines
                .iter()
                .map(|line| OrderLineView {
                    sku: line.sku.clone(),
                    quantity: line.quantity,
                    unit_price_cents: line.unit_price_cents,
                })
                .collect();
            sqlx::query(
                "INSERT INTO order_summaries (order_id, customer_id, status, lines, total_cents, \
                 currency, correlation_id, version, position, placed_at, updated_at) \
                 VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8, $9, $9) \
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(order_id)
            .bind(customer_id)
            .bind(sqlx::types::Json(lines))
            .bind(total_cents)
            .bind(currency)
            .bind(context.correlation_id)
            .bind(context.stream_version)
            .bind(context.global_position)
            .bind(context.recorded_at)
            .execute(connection)
            .await?;
            return Ok(());
        }
        let (status, reason) = outcome(event);
        let requested = matches!(event, OrderEvent::OrderCancellationRequested { .. });
        // Guarded by version, so applying an event twice (a rebuild racing live
        // updates, say) cannot move a row backwards.
        sqlx::query(
            "UPDATE order_summaries SET status = coalesce($2, status), reason = coalesce($3, reason), \
             cancellation_requested = cancellation_requested OR $4, correlation_id = $5, \
             version = $6, position = $7, updated_at = $8 \
             WHERE order_id = $1 AND version < $6",
        )
        .bind(event.order_id().uuid())
        .bind(status)
        .bind(reason)
        .bind(requested)
        .bind(context.correlation_id)
        .bind(context.stream_version)
        .bind(context.global_position)
        .bind(context.recorded_at)
        .execute(connection)
        .await?;
        Ok(())
    }
}

impl Projection for CustomerOrders {
    const NAME: &'static str = "customer-orders";
    const SERVICE: &'static str = "order";
    const STREAM_PREFIX: &'static str = "order-";
    const TABLES: &'static [&'static str] = &["customer_orders"];
    type Event = OrderEvent;

    async fn apply(
        &self,
        event: &OrderEvent,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        if let OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            total_cents,
            currency,
            ..
        } = event
        {
            sqlx::query(
                "INSERT INTO customer_orders (customer_id, order_id, status, total_cents, currency, \
                 version, position, placed_at) VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7) \
                 ON CONFLICT (customer_id, order_id) DO NOTHING",
            )
            .bind(customer_id)
            .bind(order_id)
            .bind(total_cents)
            .bind(currency)
            .bind(context.stream_version)
            .bind(context.global_position)
            .bind(context.recorded_at)
            .execute(connection)
            .await?;
            return Ok(());
        }
        let (status, reason) = outcome(event);
        sqlx::query(
            "UPDATE customer_orders SET status = coalesce($2, status), reason = coalesce($3, reason), \
             version = $4, position = $5 WHERE order_id = $1 AND version < $4",
        )
        .bind(event.order_id().uuid())
        .bind(status)
        .bind(reason)
        .bind(context.stream_version)
        .bind(context.global_position)
        .execute(connection)
        .await?;
        Ok(())
    }
}

/// One order's summary, if the projection has it.
pub async fn find_order(
    pool: &PgPool,
    order_id: OrderId,
) -> Result<Option<OrderView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, customer_id, status, lines, total_cents, currency, reason, \
         cancellation_requested, placed_at, version FROM order_summaries WHERE order_id = $1",
    )
    .bind(order_id.uuid())
    .fetch_optional(pool)
    .await
}

/// A customer's orders, newest first, at most `limit` of them.
pub async fn customer_orders(
    pool: &PgPool,
    customer_id: CustomerId,
    limit: i64,
) -> Result<Vec<CustomerOrderView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, customer_id, status, total_cents, currency, reason, placed_at, version \
         FROM customer_orders WHERE customer_id = $1 ORDER BY placed_at DESC, order_id DESC LIMIT $2",
    )
    .bind(customer_id.uuid())
    .bind(limit)
    .fetch_all(pool)
    .await
}
