//! Identifiers that are easy to mix up, typed where they cross a crate boundary: a
//! query or a stream name that takes an order id refuses a customer id at compile
//! time. Inside an aggregate, and in the events' named fields, ids stay plain UUIDs
//! and strings: there a name already says which is which, and the Avro records keep
//! their shape.
//!
//! Each is serialized as what it wraps, so a JSON body or an Avro record is the same
//! whichever side of the boundary it was built on.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub const fn new(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID, to bind in a query or compare with an event's field.
            pub const fn uuid(self) -> Uuid {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(text: &str) -> Result<Self, uuid::Error> {
                Uuid::parse_str(text).map(Self)
            }
        }
    };
}

uuid_id!(
    /// An order: the id of its stream, and of the saga, reservation and payment that
    /// serve it.
    OrderId
);

uuid_id!(
    /// The user an order is placed for (the same UUID as the user's).
    CustomerId
);

/// A stock-keeping unit: what the inventory counts. Not checked here: a command
/// that records one checks it ([`crate::inventory::validate_sku`]); a query for one
/// that cannot exist finds nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sku(String);

impl Sku {
    pub fn new(text: impl Into<String>) -> Self {
        Sku(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sku {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_serialize_as_what_they_wrap() {
        let uuid = Uuid::now_v7();
        let order = OrderId::new(uuid);
        assert_eq!(
            serde_json::to_value(order).unwrap(),
            serde_json::to_value(uuid).unwrap()
        );
        assert_eq!(order.to_string(), uuid.to_string());
        let back: CustomerId = serde_json::from_value(serde_json::json!(uuid)).unwrap();
        assert_eq!(back.uuid(), uuid);
        assert_eq!(uuid.to_string().parse::<OrderId>().unwrap(), order);
        assert!("not-a-uuid".parse::<CustomerId>().is_err());
        let sku = Sku::new("SKU-1");
        assert_eq!(
            serde_json::to_value(&sku).unwrap(),
            serde_json::json!("SKU-1")
        );
        assert_eq!(sku.to_string(), "SKU-1");
    }
}
