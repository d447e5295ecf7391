//! Avro records of the StockItem aggregate's events.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use super::requests::{StockLineRecord, line_records, stock_lines};
use super::{WireError, WireEvent, from_avro, from_u64, parse_uuid, to_avro, to_u32, to_u64};
use crate::inventory::{ReservationReply, StockEvent};

#[derive(Serialize, Deserialize)]
struct StockItemCreated {
    sku: String,
    name: String,
}

#[derive(Serialize, Deserialize)]
struct StockAdded {
    sku: String,
    quantity: i64,
}

/// The shape shared by reserved, released and committed stock.
#[derive(Serialize, Deserialize)]
struct StockMovement {
    sku: String,
    order_id: String,
    quantity: i64,
}

#[derive(Serialize, Deserialize)]
struct StockReservationFailed {
    sku: String,
    order_id: String,
    requested: i64,
    available: i64,
}

fn movement(sku: &str, order_id: &uuid::Uuid, quantity: u32) -> StockMovement {
    StockMovement {
        sku: sku.to_owned(),
        order_id: order_id.to_string(),
        quantity: i64::from(quantity),
    }
}

fn parse_movement(value: &Value) -> Result<(String, uuid::Uuid, u32), WireError> {
    let record: StockMovement = from_avro(value)?;
    Ok((
        record.sku,
        parse_uuid("order_id", &record.order_id)?,
        to_u32("quantity", record.quantity)?,
    ))
}

impl WireEvent for StockEvent {
    fn event_type(&self) -> &'static str {
        match self {
            StockEvent::StockItemCreated { .. } => "StockItemCreated",
            StockEvent::StockAdded { .. } => "StockAdded",
            StockEvent::StockReserved { .. } => "StockReserved",
            StockEvent::StockReservationFailed { .. } => "StockReservationFailed",
            StockEvent::StockReleased { .. } => "StockReleased",
            StockEvent::StockCommitted { .. } => "StockCommitted",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        match self {
            StockEvent::StockItemCreated { sku, name } => to_avro(&StockItemCreated {
                sku: sku.clone(),
                name: name.clone(),
            }),
            StockEvent::StockAdded { sku, quantity } => to_avro(&StockAdded {
                sku: sku.clone(),
                quantity: i64::from(*quantity),
            }),
            StockEvent::StockReserved {
                sku,
                order_id,
                quantity,
            }
            | StockEvent::StockReleased {
                sku,
                order_id,
                quantity,
            }
            | StockEvent::StockCommitted {
                sku,
                order_id,
                quantity,
            } => to_avro(&movement(sku, order_id, *quantity)),
            StockEvent::StockReservationFailed {
                sku,
                order_id,
                requested,
                available,
            } => to_avro(&StockReservationFailed {
                sku: sku.clone(),
                order_id: order_id.to_string(),
                requested: i64::from(*requested),
                available: from_u64(*available),
            }),
        }
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        match event_type {
            "StockItemCreated" => {
                let record: StockItemCreated = from_avro(value)?;
                Ok(StockEvent::StockItemCreated {
                    sku: record.sku,
                    name: record.name,
                })
            }
            "StockAdded" => {
                let record: StockAdded = from_avro(value)?;
                Ok(StockEvent::StockAdded {
                    sku: record.sku,
                    quantity: to_u32("quantity", record.quantity)?,
                })
            }
            "StockReserved" => {
                let (sku, order_id, quantity) = parse_movement(value)?;
                Ok(StockEvent::StockReserved {
                    sku,
                    order_id,
                    quantity,
                })
            }
            "StockReleased" => {
                let (sku, order_id, quantity) = parse_movement(value)?;
                Ok(StockEvent::StockReleased {
                    sku,
                    order_id,
                    quantity,
                })
            }
            "StockCommitted" => {
                let (sku, order_id, quantity) = parse_movement(value)?;
                Ok(StockEvent::StockCommitted {
                    sku,
                    order_id,
                    quantity,
                })
            }
            "StockReservationFailed" => {
                let record: StockReservationFailed = from_avro(value)?;
                Ok(StockEvent::StockReservationFailed {
                    sku: record.sku,
                    order_id: parse_uuid("order_id", &record.order_id)?,
                    requested: to_u32("requested", record.requested)?,
                    available: to_u64("available", record.available)?,
                })
            }
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct OrderStockReserved {
    order_id: String,
    lines: Vec<StockLineRecord>,
}

#[derive(Serialize, Deserialize)]
struct OrderStockUnavailable {
    order_id: String,
    sku: String,
    requested: i64,
    available: i64,
}

impl WireEvent for ReservationReply {
    fn event_type(&self) -> &'static str {
        match self {
            ReservationReply::OrderStockReserved { .. } => "OrderStockReserved",
            ReservationReply::OrderStockUnavailable { .. } => "OrderStockUnavailable",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        match self {
            ReservationReply::OrderStockReserved { order_id, lines } => {
                to_avro(&OrderStockReserved {
                    order_id: order_id.to_string(),
                    lines: line_records(lines),
                })
            }
            ReservationReply::OrderStockUnavailable {
                order_id,
                sku,
                requested,
                available,
            } => to_avro(&OrderStockUnavailable {
                order_id: order_id.to_string(),
                sku: sku.clone(),
                requested: i64::from(*requested),
                available: from_u64(*available),
            }),
        }
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        match event_type {
            "OrderStockReserved" => {
                let record: OrderStockReserved = from_avro(value)?;
                Ok(ReservationReply::OrderStockReserved {
                    order_id: parse_uuid("order_id", &record.order_id)?,
                    lines: stock_lines(record.lines)?,
                })
            }
            "OrderStockUnavailable" => {
                let record: OrderStockUnavailable = from_avro(value)?;
                Ok(ReservationReply::OrderStockUnavailable {
                    order_id: parse_uuid("order_id", &record.order_id)?,
                    sku: record.sku,
                    requested: to_u32("requested", record.requested)?,
                    available: to_u64("available", record.available)?,
                })
            }
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}
