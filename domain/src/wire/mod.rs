//! Events on the wire and at rest: Avro records, one schema file per event type and
//! version under `domain/schemas/<aggregate>/<EventType>.v<N>.avsc`.
//!
//! - [`SCHEMA_FILES`]: every schema version, embedded at compile time. The highest
//!   version of a type is what this code writes and the reader schema it decodes into;
//!   older versions stay so events they wrote can still be read (Avro schema resolution
//!   is the upcaster).
//! - [`WireEvent`]: how a domain event enum becomes an Avro value and back. The record
//!   structs in the submodules are the stored shape; the domain enums never are.
//! - [`check_schema_chains`]: proves each version of a type is backward and forward
//!   compatible with the one before (used by a test and by `orderflow schemas check`).
//!
//! Single-object framing (magic, fingerprint, body) and the registry table live in
//! `eventstore`, which does the I/O.

mod inventory;
mod order;
mod payment;
mod requests;
mod user;

use std::collections::BTreeMap;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::types::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// One version of one event type's schema.
#[derive(Debug, Clone, Copy)]
pub struct SchemaFile {
    /// Aggregate folder under `domain/schemas/`, also the Avro namespace suffix.
    pub aggregate: &'static str,
    /// The Avro record name, which is also the event's type name.
    pub event_type: &'static str,
    pub version: u32,
    pub text: &'static str,
}

impl SchemaFile {
    pub fn path(&self) -> String {
        format!(
            "domain/schemas/{}/{}.v{}.avsc",
            self.aggregate, self.event_type, self.version
        )
    }
}

macro_rules! schema_files {
    ($($aggregate:literal / $event_type:literal v $version:literal),* $(,)?) => {
        &[$(SchemaFile {
            aggregate: $aggregate,
            event_type: $event_type,
            version: $version,
            text: include_str!(concat!(
                "../../schemas/", $aggregate, "/", $event_type, ".v", stringify!($version), ".avsc"
            )),
        }),*]
    };
}

/// Every schema version of every event type, and of every command one service sends
/// another (the same machinery carries both). A test fails when a file in
/// `domain/schemas/` is missing here.
pub static SCHEMA_FILES: &[SchemaFile] = schema_files![
    "order" / "OrderPlaced" v 1,
    "order" / "OrderPlaced" v 2,
    "order" / "OrderPlaced" v 3,
    "order" / "OrderConfirmed" v 1,
    "order" / "OrderRejected" v 1,
    "order" / "OrderCancellationRequested" v 1,
    "order" / "OrderCancelled" v 1,
    "inventory" / "StockItemCreated" v 1,
    "inventory" / "StockAdded" v 1,
    "inventory" / "StockReserved" v 1,
    "inventory" / "StockReservationFailed" v 1,
    "inventory" / "StockReleased" v 1,
    "inventory" / "StockCommitted" v 1,
    "inventory" / "OrderStockReserved" v 1,
    "inventory" / "OrderStockUnavailable" v 1,
    "payment" / "PaymentAuthorized" v 1,
    "payment" / "PaymentAuthorized" v 2,
    "payment" / "PaymentDeclined" v 1,
    "payment" / "PaymentDeclined" v 2,
    "payment" / "PaymentCaptured" v 1,
    "payment" / "PaymentCaptureFailed" v 1,
    "payment" / "PaymentVoided" v 1,
    "payment" / "PaymentRefunded" v 1,
    "inventory" / "ReserveStock" v 1,
    "inventory" / "ReleaseStock" v 1,
    "inventory" / "CommitStock" v 1,
    "payment" / "AuthorizePayment" v 1,
    "payment" / "AuthorizePayment" v 2,
    "payment" / "CapturePayment" v 1,
    "payment" / "VoidPayment" v 1,
    "payment" / "RefundPayment" v 1,
    "user" / "UserRegistered" v 1,
    "user" / "ProfileChanged" v 1,
    "user" / "NotificationPreferencesChanged" v 1,
    "user" / "RoleGranted" v 1,
    "user" / "RoleRevoked" v 1,
];

/// A domain event enum that can be written as, and read back from, Avro.
pub trait WireEvent: Sized {
    /// The event's type name, equal to its Avro record name.
    fn event_type(&self) -> &'static str;
    /// The event as an Avro value of its type's current schema version.
    fn to_avro(&self) -> Result<Value, WireError>;
    /// Rebuilds an event from a value already resolved into the current schema.
    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError>;
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("unknown event type {0}")]
    UnknownType(String),
    #[error("avro: {0}")]
    Avro(String),
    #[error("field {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// What is wrong with one link of a schema chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainProblem {
    pub event_type: String,
    pub message: String,
}

/// Walks every event type's versions in order and reports each schema that does not
/// parse, a gap in the version numbers, a version whose record name differs, and each
/// pair of neighbours that cannot read each other's data (backward: the new reads the
/// old; forward: the old reads the new). An empty result means the chain is sound.
pub fn check_schema_chains(files: &[SchemaFile]) -> Vec<ChainProblem> {
    let mut problems = Vec::new();
    let mut chains: BTreeMap<&str, Vec<&SchemaFile>> = BTreeMap::new();
    for file in files {
        chains.entry(file.event_type).or_default().push(file);
    }
    for (event_type, mut versions) in chains {
        let mut report = |message: String| {
            problems.push(ChainProblem {
                event_type: event_type.to_owned(),
                message,
            })
        };
        versions.sort_by_key(|file| file.version);
        let mut previous: Option<(u32, Schema)> = None;
        for (index, file) in versions.iter().enumerate() {
            if file.version != index as u32 + 1 {
                report(format!(
                    "versions must run 1, 2, 3…; found v{}",
                    file.version
                ));
            }
            let schema = match Schema::parse_str(file.text) {
                Ok(schema) => schema,
                Err(error) => {
                    report(format!("{} does not parse: {error}", file.path()));
                    previous = None;
                    continue;
                }
            };
            match schema.name() {
                Some(name) if name.name() == event_type => {}
                _ => report(format!(
                    "{} must be a record named {event_type}",
                    file.path()
                )),
            }
            if let Some((old_version, old)) = &previous {
                let v = file.version;
                for (direction, writer, reader) in
                    [("backward", old, &schema), ("forward", &schema, old)]
                {
                    match SchemaCompatibility::can_read(writer, reader) {
                        Ok(Compatibility::Full) => {}
                        Ok(partial) => report(format!(
                            "v{v} is only {partial:?}ly {direction} compatible with v{old_version}"
                        )),
                        Err(error) => report(format!(
                            "v{v} is not {direction} compatible with v{old_version}: {error}"
                        )),
                    }
                }
            }
            previous = Some((file.version, schema));
        }
    }
    problems
}

fn to_avro<T: Serialize>(record: &T) -> Result<Value, WireError> {
    apache_avro::to_value(record).map_err(|error| WireError::Avro(error.to_string()))
}

fn from_avro<T: DeserializeOwned>(value: &Value) -> Result<T, WireError> {
    apache_avro::from_value(value).map_err(|error| WireError::Avro(error.to_string()))
}

fn parse_uuid(field: &'static str, text: &str) -> Result<Uuid, WireError> {
    Uuid::parse_str(text).map_err(|error| WireError::Invalid {
        field,
        message: error.to_string(),
    })
}

/// A UUID, or none for the empty text that older schema versions default to.
fn optional_uuid(field: &'static str, text: &str) -> Result<Option<Uuid>, WireError> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_uuid(field, text).map(Some)
}

fn to_u32(field: &'static str, value: i64) -> Result<u32, WireError> {
    u32::try_from(value).map_err(|_| WireError::Invalid {
        field,
        message: format!("{value} is not a quantity"),
    })
}

fn to_u64(field: &'static str, value: i64) -> Result<u64, WireError> {
    u64::try_from(value).map_err(|_| WireError::Invalid {
        field,
        message: format!("{value} is negative"),
    })
}

/// Avro has no unsigned longs; stock levels beyond i64 are not a real concern.
fn from_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{ReservationReply, StockEvent, StockLine, StockRequest};
    use crate::order::{EndReason, OrderEvent, OrderLine};
    use crate::payment::{PaymentEvent, PaymentRequest};
    use crate::user::{NotificationPreferences, UserEvent};

    fn current_schema(event_type: &str) -> Schema {
        let file = SCHEMA_FILES
            .iter()
            .filter(|file| file.event_type == event_type)
            .max_by_key(|file| file.version)
            .unwrap_or_else(|| panic!("no schema for {event_type}"));
        Schema::parse_str(file.text).unwrap()
    }

    /// Encodes with the current schema, decodes, and expects the same event; also
    /// returns the type so the caller can check every type was covered.
    fn round_trip<E: WireEvent + PartialEq + std::fmt::Debug>(event: E) -> &'static str {
        let event_type = event.event_type();
        let value = event.to_avro().unwrap();
        let schema = current_schema(event_type);
        assert!(
            value.validate(&schema),
            "{event_type} does not match its schema"
        );
        assert_eq!(E::from_avro(event_type, &value).unwrap(), event);
        event_type
    }

    #[test]
    fn every_event_type_round_trips_through_its_current_schema() {
        let order = Uuid::from_u128(1);
        let customer = Uuid::from_u128(2);
        let sku = || "SKU-1".to_string();
        let mut covered = vec![
            round_trip(OrderEvent::OrderPlaced {
                order_id: order,
                customer_id: customer,
                lines: vec![OrderLine {
                    sku: sku(),
                    quantity: 2,
                    unit_price_cents: 150,
                }],
                total_cents: 300,
                currency: "USD".into(),
                card_token: "tok_visa".into(),
            }),
            round_trip(OrderEvent::OrderConfirmed {
                order_id: order,
                customer_id: customer,
                total_cents: 300,
            }),
            round_trip(OrderEvent::OrderRejected {
                order_id: order,
                customer_id: customer,
                total_cents: 300,
                reason: EndReason::OutOfStock,
            }),
            round_trip(OrderEvent::OrderCancellationRequested { order_id: order }),
            round_trip(OrderEvent::OrderCancelled {
                order_id: order,
                customer_id: customer,
                total_cents: 300,
                reason: EndReason::PaymentTimeout,
            }),
            round_trip(StockEvent::StockItemCreated {
                sku: sku(),
                name: "Widget".into(),
            }),
            round_trip(StockEvent::StockAdded {
                sku: sku(),
                quantity: 10,
            }),
            round_trip(StockEvent::StockReserved {
                sku: sku(),
                order_id: order,
                quantity: 2,
            }),
            round_trip(StockEvent::StockReservationFailed {
                sku: sku(),
                order_id: order,
                requested: 20,
                available: 10,
            }),
            round_trip(StockEvent::StockReleased {
                sku: sku(),
                order_id: order,
                quantity: 2,
            }),
            round_trip(StockEvent::StockCommitted {
                sku: sku(),
                order_id: order,
                quantity: 2,
            }),
            round_trip(PaymentEvent::PaymentAuthorized {
                order_id: order,
                customer_id: Some(customer),
                amount_cents: 300,
                authorization_id: "auth-1".into(),
            }),
            round_trip(PaymentEvent::PaymentDeclined {
                order_id: order,
                customer_id: None,
                amount_cents: 300,
                reason: "card_declined".into(),
            }),
            round_trip(PaymentEvent::PaymentCaptured {
                order_id: order,
                amount_cents: 300,
            }),
            round_trip(PaymentEvent::PaymentCaptureFailed {
                order_id: order,
                amount_cents: 300,
                reason: "provider_unavailable".into(),
            }),
            round_trip(PaymentEvent::PaymentVoided {
                order_id: order,
                amount_cents: 300,
            }),
            round_trip(PaymentEvent::PaymentRefunded {
                order_id: order,
                amount_cents: 300,
            }),
            round_trip(UserEvent::UserRegistered {
                user_id: customer,
                email: "a@b.c".into(),
                name: "Ada".into(),
                password_hash: "h".into(),
            }),
            round_trip(UserEvent::ProfileChanged {
                user_id: customer,
                name: "Ada".into(),
            }),
            round_trip(UserEvent::NotificationPreferencesChanged {
                user_id: customer,
                preferences: NotificationPreferences {
                    email: false,
                    sms: true,
                    push: true,
                },
            }),
            round_trip(UserEvent::RoleGranted {
                user_id: customer,
                role: crate::user::Role::Operator,
            }),
            round_trip(UserEvent::RoleRevoked {
                user_id: customer,
                role: crate::user::Role::Operator,
            }),
            round_trip(ReservationReply::OrderStockReserved {
                order_id: order,
                lines: vec![StockLine {
                    sku: sku(),
                    quantity: 2,
                }],
            }),
            round_trip(ReservationReply::OrderStockUnavailable {
                order_id: order,
                sku: sku(),
                requested: 3,
                available: 1,
            }),
            round_trip(StockRequest::ReserveStock {
                order_id: order,
                lines: vec![StockLine {
                    sku: sku(),
                    quantity: 2,
                }],
            }),
            round_trip(StockRequest::ReleaseStock {
                order_id: order,
                lines: vec![],
            }),
            round_trip(StockRequest::CommitStock {
                order_id: order,
                lines: vec![StockLine {
                    sku: sku(),
                    quantity: 1,
                }],
            }),
            round_trip(PaymentRequest::AuthorizePayment {
                order_id: order,
                customer_id: Some(customer),
                amount_cents: 300,
                card_token: "tok_visa".into(),
            }),
            round_trip(PaymentRequest::CapturePayment { order_id: order }),
            round_trip(PaymentRequest::VoidPayment { order_id: order }),
            round_trip(PaymentRequest::RefundPayment { order_id: order }),
        ];
        covered.sort_unstable();
        let mut all: Vec<&str> = SCHEMA_FILES.iter().map(|file| file.event_type).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(covered, all, "every event type needs a round-trip case");
    }

    #[test]
    fn the_schema_chains_are_compatible() {
        assert_eq!(check_schema_chains(SCHEMA_FILES), vec![]);
    }

    #[test]
    fn every_schema_file_on_disk_is_in_the_catalogue() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut on_disk = Vec::new();
        for aggregate in std::fs::read_dir(&root).unwrap() {
            let aggregate = aggregate.unwrap();
            for file in std::fs::read_dir(aggregate.path()).unwrap() {
                let name = file.unwrap().file_name().into_string().unwrap();
                on_disk.push(format!(
                    "domain/schemas/{}/{name}",
                    aggregate.file_name().to_string_lossy()
                ));
            }
        }
        on_disk.sort();
        let mut catalogued: Vec<String> = SCHEMA_FILES.iter().map(SchemaFile::path).collect();
        catalogued.sort();
        assert_eq!(on_disk, catalogued);
    }

    #[test]
    fn an_incompatible_change_is_reported() {
        // v2 adds a field without a default: v2 code cannot read v1 data.
        let broken = [
            SchemaFile {
                aggregate: "test",
                event_type: "Thing",
                version: 1,
                text: r#"{"type":"record","name":"Thing","fields":[{"name":"a","type":"long"}]}"#,
            },
            SchemaFile {
                aggregate: "test",
                event_type: "Thing",
                version: 2,
                text: r#"{"type":"record","name":"Thing","fields":[{"name":"a","type":"long"},{"name":"b","type":"string"}]}"#,
            },
        ];
        let problems = check_schema_chains(&broken);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("backward"), "{problems:?}");
    }

    #[test]
    fn a_gap_in_versions_is_reported() {
        let text = r#"{"type":"record","name":"Thing","fields":[]}"#;
        let files = [
            SchemaFile {
                aggregate: "test",
                event_type: "Thing",
                version: 1,
                text,
            },
            SchemaFile {
                aggregate: "test",
                event_type: "Thing",
                version: 3,
                text,
            },
        ];
        let problems = check_schema_chains(&files);
        assert!(
            problems.iter().any(|p| p.message.contains("1, 2, 3")),
            "{problems:?}"
        );
    }
}
