//! Avro records of the commands one service sends another (through its outbox, to the
//! receiver's `<service>.commands` queue). Like events, each has a schema file per
//! version under `domain/schemas/`, and the registry resolves old writers' versions.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use super::{WireError, WireEvent, from_avro, parse_uuid, to_avro, to_u32};
use crate::inventory::{StockLine, StockRequest};
use crate::payment::PaymentRequest;

/// One SKU's line, as stock requests and the inventory's reservation answer carry it.
#[derive(Serialize, Deserialize)]
pub(super) struct StockLineRecord {
    sku: String,
    quantity: i64,
}

pub(super) fn line_records(lines: &[StockLine]) -> Vec<StockLineRecord> {
    lines
        .iter()
        .map(|line| StockLineRecord {
            sku: line.sku.clone(),
            quantity: i64::from(line.quantity),
        })
        .collect()
}

pub(super) fn stock_lines(records: Vec<StockLineRecord>) -> Result<Vec<StockLine>, WireError> {
    records
        .into_iter()
        .map(|line| {
            Ok(StockLine {
                sku: line.sku,
                quantity: to_u32("lines.quantity", line.quantity)?,
            })
        })
        .collect()
}

/// The shape shared by reserve, release and commit.
#[derive(Serialize, Deserialize)]
struct StockLines {
    order_id: String,
    lines: Vec<StockLineRecord>,
}

#[derive(Serialize, Deserialize)]
struct AuthorizePayment {
    order_id: String,
    /// Empty when unknown (v1).
    customer_id: String,
    amount_cents: i64,
    card_token: String,
}

#[derive(Serialize, Deserialize)]
struct OrderPayment {
    order_id: String,
}

impl WireEvent for StockRequest {
    fn event_type(&self) -> &'static str {
        match self {
            StockRequest::ReserveStock { .. } => "ReserveStock",
            StockRequest::ReleaseStock { .. } => "ReleaseStock",
            StockRequest::CommitStock { .. } => "CommitStock",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        let (StockRequest::ReserveStock { order_id, lines }
        | StockRequest::ReleaseStock { order_id, lines }
        | StockRequest::CommitStock { order_id, lines }) = self;
        to_avro(&StockLines {
            order_id: order_id.to_string(),
            lines: line_records(lines),
        })
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        let build = match event_type {
            "ReserveStock" => |order_id, lines| StockRequest::ReserveStock { order_id, lines },
            "ReleaseStock" => |order_id, lines| StockRequest::ReleaseStock { order_id, lines },
            "CommitStock" => |order_id, lines| StockRequest::CommitStock { order_id, lines },
            other => return Err(WireError::UnknownType(other.to_owned())),
        };
        let record: StockLines = from_avro(value)?;
        let lines = stock_lines(record.lines)?;
        Ok(build(parse_uuid("order_id", &record.order_id)?, lines))
    }
}

impl WireEvent for PaymentRequest {
    fn event_type(&self) -> &'static str {
        match self {
            PaymentRequest::AuthorizePayment { .. } => "AuthorizePayment",
            PaymentRequest::CapturePayment { .. } => "CapturePayment",
            PaymentRequest::VoidPayment { .. } => "VoidPayment",
            PaymentRequest::RefundPayment { .. } => "RefundPayment",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        match self {
            PaymentRequest::AuthorizePayment {
                order_id,
                customer_id,
                amount_cents,
                card_token,
            } => to_avro(&AuthorizePayment {
                order_id: order_id.to_string(),
                customer_id: customer_id.map(|id| id.to_string()).unwrap_or_default(),
                amount_cents: *amount_cents,
                card_token: card_token.clone(),
            }),
            other => to_avro(&OrderPayment {
                order_id: other.order_id().to_string(),
            }),
        }
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        if event_type == "AuthorizePayment" {
            let record: AuthorizePayment = from_avro(value)?;
            return Ok(PaymentRequest::AuthorizePayment {
                order_id: parse_uuid("order_id", &record.order_id)?,
                customer_id: super::optional_uuid("customer_id", &record.customer_id)?,
                amount_cents: record.amount_cents,
                card_token: record.card_token,
            });
        }
        let build = match event_type {
            "CapturePayment" => |order_id| PaymentRequest::CapturePayment { order_id },
            "VoidPayment" => |order_id| PaymentRequest::VoidPayment { order_id },
            "RefundPayment" => |order_id| PaymentRequest::RefundPayment { order_id },
            other => return Err(WireError::UnknownType(other.to_owned())),
        };
        let record: OrderPayment = from_avro(value)?;
        Ok(build(parse_uuid("order_id", &record.order_id)?))
    }
}
