//! The StockItem aggregate: one SKU's stock, split into available, reserved (held for
//! orders in flight) and sold. Reservations are keyed by order so that releasing or
//! committing one is exact and a repeated command moves nothing twice.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::ids::OrderId;

use crate::Aggregate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockCommand {
    /// Creates the item when it does not exist yet, then adds `quantity`.
    AddStock {
        sku: String,
        name: String,
        quantity: u32,
    },
    ReserveStock {
        order_id: Uuid,
        quantity: u32,
    },
    ReleaseStock {
        order_id: Uuid,
    },
    CommitStock {
        order_id: Uuid,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockEvent {
    StockItemCreated {
        sku: String,
        name: String,
    },
    StockAdded {
        sku: String,
        quantity: u32,
    },
    StockReserved {
        sku: String,
        order_id: Uuid,
        quantity: u32,
    },
    StockReservationFailed {
        sku: String,
        order_id: Uuid,
        requested: u32,
        available: u64,
    },
    StockReleased {
        sku: String,
        order_id: Uuid,
        quantity: u32,
    },
    StockCommitted {
        sku: String,
        order_id: Uuid,
        quantity: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StockError {
    #[error("stock item not found")]
    NotFound,
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no stock is reserved for order {0}")]
    NoReservation(Uuid),
}

/// One SKU's part of a request to the inventory service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockLine {
    pub sku: String,
    pub quantity: u32,
}

/// What another service (the order-fulfilment saga) asks of the inventory service
/// through its command queue. One request can span several stock items; the inventory
/// service applies it to all of them in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockRequest {
    /// Hold every line for the order, or none of them (see [`reserve_all`]).
    ReserveStock {
        order_id: Uuid,
        lines: Vec<StockLine>,
    },
    /// Give back what the order holds on these SKUs (nothing held: nothing happens).
    ReleaseStock {
        order_id: Uuid,
        lines: Vec<StockLine>,
    },
    /// Turn what the order holds on these SKUs into sold stock.
    CommitStock {
        order_id: Uuid,
        lines: Vec<StockLine>,
    },
}

impl StockRequest {
    pub fn order_id(&self) -> OrderId {
        match self {
            StockRequest::ReserveStock { order_id, .. }
            | StockRequest::ReleaseStock { order_id, .. }
            | StockRequest::CommitStock { order_id, .. } => OrderId::new(*order_id),
        }
    }

    /// The lines with one entry per SKU (quantities of repeated SKUs added up), sorted
    /// by SKU so that every writer touches stock items in the same order.
    pub fn lines_by_sku(&self) -> Vec<StockLine> {
        let lines = match self {
            StockRequest::ReserveStock { lines, .. }
            | StockRequest::ReleaseStock { lines, .. }
            | StockRequest::CommitStock { lines, .. } => lines,
        };
        let mut merged: BTreeMap<&str, u32> = BTreeMap::new();
        for line in lines {
            let quantity = merged.entry(line.sku.as_str()).or_default();
            *quantity = quantity.saturating_add(line.quantity);
        }
        merged
            .into_iter()
            .map(|(sku, quantity)| StockLine {
                sku: sku.to_owned(),
                quantity,
            })
            .collect()
    }
}

/// The inventory's one answer to a `ReserveStock`, for the saga that sent it: recorded
/// on the stream `reservation-<order id>` (the per-SKU events stay on the stock
/// streams, for the inventory's own read model) and the only message of the
/// reservation that crosses to the order service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReservationReply {
    /// Every line is held for the order.
    OrderStockReserved {
        order_id: Uuid,
        lines: Vec<StockLine>,
    },
    /// A line could not be held (the first one short, by SKU), so none is.
    OrderStockUnavailable {
        order_id: Uuid,
        sku: String,
        requested: u32,
        available: u64,
    },
}

impl ReservationReply {
    /// The stream a reservation's answer is recorded on.
    pub fn stream_id(order_id: OrderId) -> String {
        format!("reservation-{order_id}")
    }

    pub fn order_id(&self) -> OrderId {
        match self {
            ReservationReply::OrderStockReserved { order_id, .. }
            | ReservationReply::OrderStockUnavailable { order_id, .. } => OrderId::new(*order_id),
        }
    }

    /// The answer to reserving `lines` for `order_id`, from what [`reserve_all`]
    /// decided for them (a line already held for the order decides nothing, and
    /// counts as held).
    pub fn answering(
        order_id: OrderId,
        lines: &[StockLine],
        decided: &[(String, Vec<StockEvent>)],
    ) -> ReservationReply {
        let short = decided
            .iter()
            .flat_map(|(_, events)| events)
            .find_map(|event| match event {
                StockEvent::StockReservationFailed {
                    sku,
                    requested,
                    available,
                    ..
                } => Some((sku.clone(), *requested, *available)),
                _ => None,
            });
        let order_id = order_id.uuid();
        match short {
            Some((sku, requested, available)) => ReservationReply::OrderStockUnavailable {
                order_id,
                sku,
                requested,
                available,
            },
            None => ReservationReply::OrderStockReserved {
                order_id,
                lines: lines.to_vec(),
            },
        }
    }
}

/// Decides a whole-order reservation over several stock items, all lines or none: the
/// events to append to each item's stream. If any line cannot be held (too little
/// available, or no such item), only the failures are recorded, on the short items'
/// streams, and nothing is reserved. Lines already held for the order decide nothing.
pub fn reserve_all(
    order_id: OrderId,
    items: &[(StockLine, StockItem)],
) -> Result<Vec<(String, Vec<StockEvent>)>, StockError> {
    let order_id = order_id.uuid();
    let mut reserved = Vec::new();
    let mut failed = Vec::new();
    for (line, item) in items {
        if item.sku.is_none() {
            failed.push((
                line.sku.clone(),
                vec![StockEvent::StockReservationFailed {
                    sku: line.sku.clone(),
                    order_id,
                    requested: line.quantity,
                    available: 0,
                }],
            ));
            continue;
        }
        let events = item.decide(&StockCommand::ReserveStock {
            order_id,
            quantity: line.quantity,
        })?;
        let short = events
            .iter()
            .any(|event| matches!(event, StockEvent::StockReservationFailed { .. }));
        if short {
            failed.push((line.sku.clone(), events));
        } else if !events.is_empty() {
            reserved.push((line.sku.clone(), events));
        }
    }
    Ok(if failed.is_empty() { reserved } else { failed })
}

/// Serde derives serve snapshots only (a cache; events are the stored truth). Change
/// the snapshot format name in `eventstore` when this layout changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StockItem {
    pub sku: Option<String>,
    pub name: String,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Quantity held per order; an order leaves this map when its stock is released
    /// or committed.
    pub reservations: BTreeMap<Uuid, u32>,
}

impl StockItem {
    /// Everything ever added: available + reserved + sold. Only restocks change it.
    pub fn total(&self) -> u64 {
        self.available + self.reserved + self.sold
    }

    fn existing_sku(&self) -> Result<String, StockError> {
        self.sku.clone().ok_or(StockError::NotFound)
    }
}

impl Aggregate for StockItem {
    const KIND: &'static str = "stock";
    type Command = StockCommand;
    type Event = StockEvent;
    type Error = StockError;

    fn decide(&self, command: &StockCommand) -> Result<Vec<StockEvent>, StockError> {
        match command {
            StockCommand::AddStock {
                sku,
                name,
                quantity,
            } => {
                let mut events = Vec::with_capacity(2);
                match &self.sku {
                    Some(existing) if existing != sku => {
                        return Err(invalid("sku", "does not match this item"));
                    }
                    Some(_) if *quantity == 0 => {
                        return Err(invalid("quantity", "must be at least 1 to restock"));
                    }
                    Some(_) => {}
                    None => {
                        validate_sku(sku)?;
                        if name.trim().is_empty() {
                            return Err(invalid("name", "must not be empty"));
                        }
                        events.push(StockEvent::StockItemCreated {
                            sku: sku.clone(),
                            name: name.clone(),
                        });
                    }
                }
                if *quantity > 0 {
                    events.push(StockEvent::StockAdded {
                        sku: sku.clone(),
                        quantity: *quantity,
                    });
                }
                Ok(events)
            }
            StockCommand::ReserveStock { order_id, quantity } => {
                let sku = self.existing_sku()?;
                if *quantity == 0 {
                    return Err(invalid("quantity", "must be at least 1"));
                }
                if self.reservations.contains_key(order_id) {
                    return Ok(vec![]);
                }
                if u64::from(*quantity) > self.available {
                    return Ok(vec![StockEvent::StockReservationFailed {
                        sku,
                        order_id: *order_id,
                        requested: *quantity,
                        available: self.available,
                    }]);
                }
                Ok(vec![StockEvent::StockReserved {
                    sku,
                    order_id: *order_id,
                    quantity: *quantity,
                }])
            }
            // Releasing what is not held decides nothing: compensation may arrive more
            // than once (a decline and a deadline, say) and must stay harmless.
            StockCommand::ReleaseStock { order_id } => {
                let sku = self.existing_sku()?;
                Ok(self
                    .reservations
                    .get(order_id)
                    .map(|quantity| StockEvent::StockReleased {
                        sku,
                        order_id: *order_id,
                        quantity: *quantity,
                    })
                    .into_iter()
                    .collect())
            }
            StockCommand::CommitStock { order_id } => {
                let sku = self.existing_sku()?;
                let quantity = self
                    .reservations
                    .get(order_id)
                    .ok_or(StockError::NoReservation(*order_id))?;
                Ok(vec![StockEvent::StockCommitted {
                    sku,
                    order_id: *order_id,
                    quantity: *quantity,
                }])
            }
        }
    }

    fn evolve(mut self, event: &StockEvent) -> Self {
        match event {
            StockEvent::StockItemCreated { sku, name } => {
                self.sku = Some(sku.clone());
                self.name = name.clone();
            }
            StockEvent::StockAdded { quantity, .. } => self.available += u64::from(*quantity),
            StockEvent::StockReserved {
                order_id, quantity, ..
            } => {
                let quantity_u64 = u64::from(*quantity);
                self.available = self.available.saturating_sub(quantity_u64);
                self.reserved += quantity_u64;
                self.reservations.insert(*order_id, *quantity);
            }
            StockEvent::StockReservationFailed { .. } => {}
            StockEvent::StockReleased { order_id, .. } => {
                if let Some(quantity) = self.reservations.remove(order_id) {
                    self.reserved = self.reserved.saturating_sub(u64::from(quantity));
                    self.available += u64::from(quantity);
                }
            }
            StockEvent::StockCommitted { order_id, .. } => {
                if let Some(quantity) = self.reservations.remove(order_id) {
                    self.reserved = self.reserved.saturating_sub(u64::from(quantity));
                    self.sold += u64::from(quantity);
                }
            }
        }
        self
    }
}

/// SKUs become stream ids and URL path segments, so they are kept to a safe alphabet.
pub fn validate_sku(sku: &str) -> Result<(), StockError> {
    let well_formed = !sku.is_empty()
        && sku.len() <= 64
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if well_formed {
        Ok(())
    } else {
        Err(invalid(
            "sku",
            "1 to 64 characters of letters, digits, '-', '_' or '.'",
        ))
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> StockError {
    StockError::Invalid {
        field,
        message: message.into(),
    }
}

#[cfg(test)]
mod reply_tests {
    use super::*;

    #[test]
    fn a_reservation_is_answered_once_for_all_its_lines() {
        let order_id = Uuid::from_u128(3);
        let line = |sku: &str, quantity| StockLine {
            sku: sku.into(),
            quantity,
        };
        let item = |sku: &str, available| {
            let mut item = StockItem::default().evolve(&StockEvent::StockItemCreated {
                sku: sku.into(),
                name: sku.into(),
            });
            if available > 0 {
                item = item.evolve(&StockEvent::StockAdded {
                    sku: sku.into(),
                    quantity: available,
                });
            }
            item
        };
        let lines = [line("A", 2), line("B", 1)];
        let enough = [
            (lines[0].clone(), item("A", 5)),
            (lines[1].clone(), item("B", 1)),
        ];
        let decided = reserve_all(OrderId::new(order_id), &enough).unwrap();
        assert_eq!(decided.len(), 2, "one stream per SKU");
        assert_eq!(
            ReservationReply::answering(OrderId::new(order_id), &lines, &decided),
            ReservationReply::OrderStockReserved {
                order_id,
                lines: lines.to_vec(),
            }
        );
        let short = [
            (lines[0].clone(), item("A", 5)),
            (lines[1].clone(), item("B", 0)),
        ];
        let decided = reserve_all(OrderId::new(order_id), &short).unwrap();
        assert_eq!(
            ReservationReply::answering(OrderId::new(order_id), &lines, &decided),
            ReservationReply::OrderStockUnavailable {
                order_id,
                sku: "B".into(),
                requested: 1,
                available: 0,
            }
        );
        assert_eq!(
            ReservationReply::stream_id(OrderId::new(order_id)),
            format!("reservation-{order_id}")
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::given;

    fn created_with(quantity: u32) -> Vec<StockEvent> {
        vec![
            StockEvent::StockItemCreated {
                sku: "SKU-1".into(),
                name: "Widget".into(),
            },
            StockEvent::StockAdded {
                sku: "SKU-1".into(),
                quantity,
            },
        ]
    }

    fn order(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn ten_with_four_held_for_order_7() -> Vec<StockEvent> {
        let mut history = created_with(10);
        history.push(StockEvent::StockReserved {
            sku: "SKU-1".into(),
            order_id: order(7),
            quantity: 4,
        });
        history
    }

    fn line(sku: &str, quantity: u32) -> StockLine {
        StockLine {
            sku: sku.into(),
            quantity,
        }
    }

    fn item(sku: &str, available: u32) -> StockItem {
        given::<StockItem>(&[
            StockEvent::StockItemCreated {
                sku: sku.into(),
                name: "Widget".into(),
            },
            StockEvent::StockAdded {
                sku: sku.into(),
                quantity: available,
            },
        ])
    }

    #[test]
    fn a_whole_order_is_reserved_when_every_line_fits() {
        let items = [(line("A", 2), item("A", 5)), (line("B", 5), item("B", 5))];
        let decided = reserve_all(OrderId::new(order(1)), &items).unwrap();
        let skus: Vec<&str> = decided.iter().map(|(sku, _)| sku.as_str()).collect();
        assert_eq!(skus, ["A", "B"]);
        assert!(
            decided
                .iter()
                .all(|(_, events)| matches!(events.as_slice(), [StockEvent::StockReserved { .. }]))
        );
    }

    #[test]
    fn one_short_line_reserves_nothing_and_records_only_the_shortage() {
        let items = [(line("A", 2), item("A", 5)), (line("B", 6), item("B", 5))];
        let decided = reserve_all(OrderId::new(order(1)), &items).unwrap();
        assert_eq!(
            decided,
            vec![(
                "B".to_owned(),
                vec![StockEvent::StockReservationFailed {
                    sku: "B".into(),
                    order_id: order(1),
                    requested: 6,
                    available: 5,
                }]
            )]
        );
    }

    #[test]
    fn an_unknown_sku_fails_the_reservation() {
        let items = [
            (line("A", 1), item("A", 5)),
            (line("NOPE", 1), StockItem::default()),
        ];
        let decided = reserve_all(OrderId::new(order(1)), &items).unwrap();
        assert_eq!(decided.len(), 1);
        assert!(matches!(
            &decided[0].1[..],
            [StockEvent::StockReservationFailed { available: 0, .. }]
        ));
    }

    #[test]
    fn a_repeated_reservation_decides_nothing() {
        let held = given::<StockItem>(&ten_with_four_held_for_order_7());
        let decided = reserve_all(OrderId::new(order(7)), &[(line("SKU-1", 4), held)]).unwrap();
        assert!(decided.is_empty());
    }

    #[test]
    fn request_lines_are_merged_and_sorted_by_sku() {
        let request = StockRequest::ReserveStock {
            order_id: order(1),
            lines: vec![line("B", 1), line("A", 2), line("B", 3)],
        };
        assert_eq!(request.lines_by_sku(), vec![line("A", 2), line("B", 4)]);
    }

    #[test]
    fn adding_to_a_new_sku_creates_it() {
        let events = given::<StockItem>(&[])
            .decide(&StockCommand::AddStock {
                sku: "SKU-1".into(),
                name: "Widget".into(),
                quantity: 10,
            })
            .unwrap();
        assert_eq!(events, created_with(10));
        assert_eq!(given::<StockItem>(&events).available, 10);
    }

    #[test]
    fn restocking_adds_without_recreating() {
        let events = given::<StockItem>(&created_with(10))
            .decide(&StockCommand::AddStock {
                sku: "SKU-1".into(),
                name: "ignored".into(),
                quantity: 5,
            })
            .unwrap();
        assert_eq!(
            events,
            vec![StockEvent::StockAdded {
                sku: "SKU-1".into(),
                quantity: 5
            }]
        );
    }

    #[test]
    fn bad_skus_are_refused() {
        for sku in ["", "has space", "slash/ed", &"x".repeat(65)] {
            let result = given::<StockItem>(&[]).decide(&StockCommand::AddStock {
                sku: sku.into(),
                name: "n".into(),
                quantity: 1,
            });
            assert!(
                matches!(result, Err(StockError::Invalid { field: "sku", .. })),
                "{sku:?}"
            );
        }
    }

    #[test]
    fn a_reservation_holds_stock_once_per_order() {
        let item = given::<StockItem>(&created_with(10));
        let reserve = StockCommand::ReserveStock {
            order_id: order(7),
            quantity: 4,
        };
        let events = item.decide(&reserve).unwrap();
        let item = item.replay(&events);
        assert_eq!((item.available, item.reserved, item.sold), (6, 4, 0));
        assert_eq!(item.decide(&reserve), Ok(vec![]));
    }

    #[test]
    fn a_short_reservation_fails_without_moving_stock() {
        let events = given::<StockItem>(&created_with(3))
            .decide(&StockCommand::ReserveStock {
                order_id: order(7),
                quantity: 4,
            })
            .unwrap();
        assert_eq!(
            events,
            vec![StockEvent::StockReservationFailed {
                sku: "SKU-1".into(),
                order_id: order(7),
                requested: 4,
                available: 3
            }]
        );
        assert_eq!(
            given::<StockItem>(&[created_with(3), events].concat()).available,
            3
        );
    }

    #[test]
    fn release_returns_stock_and_a_second_release_does_nothing() {
        let item = given::<StockItem>(&ten_with_four_held_for_order_7());
        let release = StockCommand::ReleaseStock { order_id: order(7) };
        let item = item.clone().replay(&item.decide(&release).unwrap());
        assert_eq!((item.available, item.reserved), (10, 0));
        assert_eq!(item.decide(&release), Ok(vec![]));
    }

    #[test]
    fn commit_sells_what_was_reserved_and_needs_a_reservation() {
        let item = given::<StockItem>(&ten_with_four_held_for_order_7());
        let commit = StockCommand::CommitStock { order_id: order(7) };
        let item = item.clone().replay(&item.decide(&commit).unwrap());
        assert_eq!((item.available, item.reserved, item.sold), (6, 0, 4));
        assert_eq!(
            item.decide(&commit),
            Err(StockError::NoReservation(order(7)))
        );
    }

    #[test]
    fn an_unknown_sku_cannot_be_reserved() {
        assert_eq!(
            given::<StockItem>(&[]).decide(&StockCommand::ReserveStock {
                order_id: order(1),
                quantity: 1
            }),
            Err(StockError::NotFound)
        );
    }

    fn any_command() -> impl Strategy<Value = StockCommand> {
        let order_id = (0u128..6).prop_map(Uuid::from_u128);
        prop_oneof![
            (0u32..20).prop_map(|quantity| StockCommand::AddStock {
                sku: "SKU-1".into(),
                name: "Widget".into(),
                quantity
            }),
            (order_id.clone(), 0u32..15)
                .prop_map(|(order_id, quantity)| StockCommand::ReserveStock { order_id, quantity }),
            order_id
                .clone()
                .prop_map(|order_id| StockCommand::ReleaseStock { order_id }),
            order_id.prop_map(|order_id| StockCommand::CommitStock { order_id }),
        ]
    }

    proptest! {
        /// Whatever commands arrive, in whatever order: stock never goes negative (the
        /// fold never saturates), the held reservations add up to `reserved`, and the
        /// total changes only by what restocks added.
        #[test]
        fn stock_is_conserved(commands in prop::collection::vec(any_command(), 1..60)) {
            let mut item = StockItem::default();
            let mut added: u64 = 0;
            for command in &commands {
                let Ok(events) = item.decide(command) else { continue };
                for event in &events {
                    if let StockEvent::StockAdded { quantity, .. } = event {
                        added += u64::from(*quantity);
                    }
                    if let StockEvent::StockReserved { quantity, .. } = event {
                        prop_assert!(u64::from(*quantity) <= item.available);
                    }
                    item = item.evolve(event);
                }
                prop_assert_eq!(item.total(), added);
                let held: u64 = item.reservations.values().map(|q| u64::from(*q)).sum();
                prop_assert_eq!(held, item.reserved);
            }
        }
    }
}
