//! The payment service's read model: each order's payment status.

use domain::ids::{CustomerId, OrderId};
use domain::payment::PaymentEvent;
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::{EventContext, Projection};

/// `GET /payments/{order_id}`.
pub struct PaymentStatuses;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PaymentView {
    pub order_id: Uuid,
    /// Who pays; absent for payments recorded before payments named their customer.
    pub customer_id: Option<Uuid>,
    #[cfg_attr(
        feature = "openapi",
        schema(
            example = "captured",
            pattern = "^(authorized|declined|captured|voided|refunded)$"
        )
    )]
    pub status: String,
    pub amount_cents: i64,
    pub version: i64,
}

impl Projection for PaymentStatuses {
    const NAME: &'static str = "payment-status";
    const SERVICE: &'static str = "payment";
    const STREAM_PREFIX: &'static str = "payment-";
    const TABLES: &'static [&'static str] = &["payment_statuses"];
    type Event = PaymentEvent;

    async fn apply(
        &self,
        event: &PaymentEvent,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        let (order_id, amount_cents, status) = event.outcome();
        // Only the events that open a payment name its customer; later ones keep it.
        sqlx::query(
            "INSERT INTO payment_statuses (order_id, status, amount_cents, version, position, \
             updated_at, customer_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, \
             amount_cents = excluded.amount_cents, version = excluded.version, \
             position = excluded.position, updated_at = excluded.updated_at, \
             customer_id = coalesce(excluded.customer_id, payment_statuses.customer_id) \
             WHERE payment_statuses.version < excluded.version",
        )
        .bind(order_id)
        .bind(status.as_str())
        .bind(amount_cents)
        .bind(context.stream_version)
        .bind(context.global_position)
        .bind(context.recorded_at)
        .bind(event.customer_id().map(CustomerId::uuid))
        .execute(connection)
        .await?;
        Ok(())
    }
}

pub async fn find_payment(
    pool: &PgPool,
    order_id: OrderId,
) -> Result<Option<PaymentView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, customer_id, status, amount_cents, version FROM payment_statuses \
         WHERE order_id = $1",
    )
    .bind(order_id.uuid())
    .fetch_optional(pool)
    .await
}
