//! Avro records of the Order aggregate's events.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use super::{WireError, WireEvent, from_avro, parse_uuid, to_avro, to_u32};
use crate::order::{EndReason, OrderEvent, OrderLine};

#[derive(Serialize, Deserialize)]
struct OrderLineRecord {
    sku: String,
    quantity: i64,
    unit_price_cents: i64,
}

/// `OrderPlaced` v3 (v1 had no currency: resolution fills in "EUR"; v1 and v2 had no
/// card token: it reads as empty).
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer_id: String,
    lines: Vec<OrderLineRecord>,
    total_cents: i64,
    currency: String,
    card_token: String,
}

#[derive(Serialize, Deserialize)]
struct OrderOutcome {
    order_id: String,
    customer_id: String,
    total_cents: i64,
}

#[derive(Serialize, Deserialize)]
struct OrderEnded {
    order_id: String,
    customer_id: String,
    total_cents: i64,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct OrderCancellationRequested {
    order_id: String,
}

impl TryFrom<OrderPlaced> for OrderEvent {
    type Error = WireError;

    fn try_from(record: OrderPlaced) -> Result<Self, WireError> {
        let lines = record
            .lines
            .into_iter()
            .map(|line| {
                Ok(OrderLine {
                    sku: line.sku,
                    quantity: to_u32("lines.quantity", line.quantity)?,
                    unit_price_cents: line.unit_price_cents,
                })
            })
            .collect::<Result<_, WireError>>()?;
        Ok(OrderEvent::OrderPlaced {
            order_id: parse_uuid("order_id", &record.order_id)?,
            customer_id: parse_uuid("customer_id", &record.customer_id)?,
            lines,
            total_cents: record.total_cents,
            currency: record.currency,
            card_token: record.card_token,
        })
    }
}

fn ended(
    order_id: &uuid::Uuid,
    customer_id: &uuid::Uuid,
    total_cents: i64,
    reason: EndReason,
) -> OrderEnded {
    OrderEnded {
        order_id: order_id.to_string(),
        customer_id: customer_id.to_string(),
        total_cents,
        reason: reason.as_str().to_owned(),
    }
}

/// Parses the parts shared by rejected and cancelled orders.
fn parse_ended(record: OrderEnded) -> Result<(uuid::Uuid, uuid::Uuid, i64, EndReason), WireError> {
    let reason = EndReason::parse(&record.reason).ok_or_else(|| WireError::Invalid {
        field: "reason",
        message: format!("unknown reason {:?}", record.reason),
    })?;
    Ok((
        parse_uuid("order_id", &record.order_id)?,
        parse_uuid("customer_id", &record.customer_id)?,
        record.total_cents,
        reason,
    ))
}

impl WireEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::OrderConfirmed { .. } => "OrderConfirmed",
            OrderEvent::OrderRejected { .. } => "OrderRejected",
            OrderEvent::OrderCancellationRequested { .. } => "OrderCancellationRequested",
            OrderEvent::OrderCancelled { .. } => "OrderCancelled",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        match self {
            OrderEvent::OrderPlaced {
                order_id,
                customer_id,
                lines,
                total_cents,
                currency,
                card_token,
            } => to_avro(&OrderPlaced {
                order_id: order_id.to_string(),
                customer_id: customer_id.to_string(),
                lines: lines
                    .iter()
                    .map(|line| OrderLineRecord {
                        sku: line.sku.clone(),
                        quantity: i64::from(line.quantity),
                        unit_price_cents: line.unit_price_cents,
                    })
                    .collect(),
                total_cents: *total_cents,
                currency: currency.clone(),
                card_token: card_token.clone(),
            }),
            OrderEvent::OrderConfirmed {
                order_id,
                customer_id,
                total_cents,
            } => to_avro(&OrderOutcome {
                order_id: order_id.to_string(),
                customer_id: customer_id.to_string(),
                total_cents: *total_cents,
            }),
            OrderEvent::OrderRejected {
                order_id,
                customer_id,
                total_cents,
                reason,
            }
            | OrderEvent::OrderCancelled {
                order_id,
                customer_id,
                total_cents,
                reason,
            } => to_avro(&ended(order_id, customer_id, *total_cents, *reason)),
            OrderEvent::OrderCancellationRequested { order_id } => {
                to_avro(&OrderCancellationRequested {
                    order_id: order_id.to_string(),
                })
            }
        }
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        match event_type {
            "OrderPlaced" => from_avro::<OrderPlaced>(value)?.try_into(),
            "OrderConfirmed" => {
                let record: OrderOutcome = from_avro(value)?;
                Ok(OrderEvent::OrderConfirmed {
                    order_id: parse_uuid("order_id", &record.order_id)?,
                    customer_id: parse_uuid("customer_id", &record.customer_id)?,
                    total_cents: record.total_cents,
                })
            }
            "OrderRejected" => {
                let (order_id, customer_id, total_cents, reason) = parse_ended(from_avro(value)?)?;
                Ok(OrderEvent::OrderRejected {
                    order_id,
                    customer_id,
                    total_cents,
                    reason,
                })
            }
            "OrderCancelled" => {
                let (order_id, customer_id, total_cents, reason) = parse_ended(from_avro(value)?)?;
                Ok(OrderEvent::OrderCancelled {
                    order_id,
                    customer_id,
                    total_cents,
                    reason,
                })
            }
            "OrderCancellationRequested" => {
                let record: OrderCancellationRequested = from_avro(value)?;
                Ok(OrderEvent::OrderCancellationRequested {
                    order_id: parse_uuid("order_id", &record.order_id)?,
                })
            }
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}
