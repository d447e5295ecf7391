//! Avro records of the Payment aggregate's events.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use super::{WireError, WireEvent, from_avro, optional_uuid, parse_uuid, to_avro};
use crate::payment::PaymentEvent;

#[derive(Serialize, Deserialize)]
struct PaymentAuthorized {
    order_id: String,
    /// Empty when unknown (v1).
    customer_id: String,
    amount_cents: i64,
    authorization_id: String,
}

#[derive(Serialize, Deserialize)]
struct PaymentDeclined {
    order_id: String,
    customer_id: String,
    amount_cents: i64,
    reason: String,
}

/// The shape of a refused capture.
#[derive(Serialize, Deserialize)]
struct PaymentRefused {
    order_id: String,
    amount_cents: i64,
    reason: String,
}

/// The shape shared by captured, voided and refunded payments.
#[derive(Serialize, Deserialize)]
struct PaymentSettled {
    order_id: String,
    amount_cents: i64,
}

impl WireEvent for PaymentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            PaymentEvent::PaymentAuthorized { .. } => "PaymentAuthorized",
            PaymentEvent::PaymentDeclined { .. } => "PaymentDeclined",
            PaymentEvent::PaymentCaptured { .. } => "PaymentCaptured",
            PaymentEvent::PaymentCaptureFailed { .. } => "PaymentCaptureFailed",
            PaymentEvent::PaymentVoided { .. } => "PaymentVoided",
            PaymentEvent::PaymentRefunded { .. } => "PaymentRefunded",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        match self {
            PaymentEvent::PaymentAuthorized {
                order_id,
                customer_id,
                amount_cents,
                authorization_id,
            } => to_avro(&PaymentAuthorized {
                order_id: order_id.to_string(),
                customer_id: customer_id.map(|id| id.to_string()).unwrap_or_default(),
                amount_cents: *amount_cents,
                authorization_id: authorization_id.clone(),
            }),
            PaymentEvent::PaymentDeclined {
                order_id,
                customer_id,
                amount_cents,
                reason,
            } => to_avro(&PaymentDeclined {
                order_id: order_id.to_string(),
                customer_id: customer_id.map(|id| id.to_string()).unwrap_or_default(),
                amount_cents: *amount_cents,
                reason: reason.clone(),
            }),
            PaymentEvent::PaymentCaptureFailed {
                order_id,
                amount_cents,
                reason,
            } => to_avro(&PaymentRefused {
                order_id: order_id.to_string(),
                amount_cents: *amount_cents,
                reason: reason.clone(),
            }),
            PaymentEvent::PaymentCaptured {
                order_id,
                amount_cents,
            }
            | PaymentEvent::PaymentVoided {
                order_id,
                amount_cents,
            }
            | PaymentEvent::PaymentRefunded {
                order_id,
                amount_cents,
            } => to_avro(&PaymentSettled {
                order_id: order_id.to_string(),
                amount_cents: *amount_cents,
            }),
        }
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        let settled = |value| -> Result<(uuid::Uuid, i64), WireError> {
            let record: PaymentSettled = from_avro(value)?;
            Ok((
                parse_uuid("order_id", &record.order_id)?,
                record.amount_cents,
            ))
        };
        let refused = |value| -> Result<(uuid::Uuid, i64, String), WireError> {
            let record: PaymentRefused = from_avro(value)?;
            let order_id = parse_uuid("order_id", &record.order_id)?;
            Ok((order_id, record.amount_cents, record.reason))
        };
        match event_type {
            "PaymentAuthorized" => {
                let record: PaymentAuthorized = from_avro(value)?;
                Ok(PaymentEvent::PaymentAuthorized {
                    order_id: parse_uuid("order_id", &record.order_id)?,
                    customer_id: optional_uuid("customer_id", &record.customer_id)?,
                    amount_cents: record.amount_cents,
                    authorization_id: record.authorization_id,
                })
            }
            "PaymentDeclined" => {
                let record: PaymentDeclined = from_avro(value)?;
                Ok(PaymentEvent::PaymentDeclined {
                    order_id: parse_uuid("order_id", &record.order_id)?,
                    customer_id: optional_uuid("customer_id", &record.customer_id)?,
                    amount_cents: record.amount_cents,
                    reason: record.reason,
                })
            }
            "PaymentCaptureFailed" => refused(value).map(|(order_id, amount_cents, reason)| {
                PaymentEvent::PaymentCaptureFailed {
                    order_id,
                    amount_cents,
                    reason,
                }
            }),
            "PaymentCaptured" => {
                settled(value).map(|(order_id, amount_cents)| PaymentEvent::PaymentCaptured {
                    order_id,
                    amount_cents,
                })
            }
            "PaymentVoided" => {
                settled(value).map(|(order_id, amount_cents)| PaymentEvent::PaymentVoided {
                    order_id,
                    amount_cents,
                })
            }
            "PaymentRefunded" => {
                settled(value).map(|(order_id, amount_cents)| PaymentEvent::PaymentRefunded {
                    order_id,
                    amount_cents,
                })
            }
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}
