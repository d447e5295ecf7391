//! The Order aggregate: an order placed by a customer, driven to a terminal status
//! (confirmed, rejected or cancelled) by the order-fulfilment saga.

use uuid::Uuid;

use crate::ids::OrderId;

use crate::Aggregate;

/// Upper bound on lines per order; bigger bodies are refused rather than stored.
pub const MAX_LINES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
}

impl OrderLine {
    fn total_cents(&self) -> Option<i64> {
        self.unit_price_cents.checked_mul(i64::from(self.quantity))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        self != OrderStatus::Pending
    }
}

/// Why an order did not confirm. The strings are part of the public contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    OutOfStock,
    PaymentDeclined,
    PaymentTimeout,
    CustomerRequest,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::OutOfStock => "out_of_stock",
            EndReason::PaymentDeclined => "payment_declined",
            EndReason::PaymentTimeout => "payment_timeout",
            EndReason::CustomerRequest => "customer_request",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            EndReason::OutOfStock,
            EndReason::PaymentDeclined,
            EndReason::PaymentTimeout,
            EndReason::CustomerRequest,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    PlaceOrder {
        order_id: Uuid,
        customer_id: Uuid,
        lines: Vec<OrderLine>,
        currency: String,
        /// The payment method the saga will ask the payment service to charge.
        card_token: String,
    },
    ConfirmOrder,
    RejectOrder {
        reason: EndReason,
    },
    /// The customer asks to cancel; the saga decides what to compensate.
    RequestCancellation,
    CancelOrder {
        reason: EndReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    OrderPlaced {
        order_id: Uuid,
        customer_id: Uuid,
        lines: Vec<OrderLine>,
        total_cents: i64,
        currency: String,
        card_token: String,
    },
    OrderConfirmed {
        order_id: Uuid,
        customer_id: Uuid,
        total_cents: i64,
    },
    OrderRejected {
        order_id: Uuid,
        customer_id: Uuid,
        total_cents: i64,
        reason: EndReason,
    },
    OrderCancellationRequested {
        order_id: Uuid,
    },
    OrderCancelled {
        order_id: Uuid,
        customer_id: Uuid,
        total_cents: i64,
        reason: EndReason,
    },
}

impl OrderEvent {
    pub fn order_id(&self) -> OrderId {
        match self {
            OrderEvent::OrderPlaced { order_id, .. }
            | OrderEvent::OrderConfirmed { order_id, .. }
            | OrderEvent::OrderRejected { order_id, .. }
            | OrderEvent::OrderCancellationRequested { order_id }
            | OrderEvent::OrderCancelled { order_id, .. } => OrderId::new(*order_id),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrderError {
    #[error("order already exists")]
    AlreadyExists,
    #[error("order not found")]
    NotFound,
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("order is {} and cannot be {attempted}", status.as_str())]
    InvalidTransition {
        status: OrderStatus,
        attempted: &'static str,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Order {
    pub order_id: Option<Uuid>,
    pub customer_id: Uuid,
    pub status: Option<OrderStatus>,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
    pub reason: Option<EndReason>,
    /// Set once the customer asked to cancel, so a second request decides nothing.
    pub cancellation_requested: bool,
}

impl Order {
    /// Decides a state change that only a pending order allows, with no events when
    /// the order already reached `target` (a repeated command is harmless).
    fn transition(
        &self,
        target: OrderStatus,
        attempted: &'static str,
        event: impl FnOnce(Uuid) -> OrderEvent,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (Some(order_id), Some(status)) = (self.order_id, self.status) else {
            return Err(OrderError::NotFound);
        };
        match status {
            OrderStatus::Pending => Ok(vec![event(order_id)]),
            current if current == target => Ok(vec![]),
            current => Err(OrderError::InvalidTransition {
                status: current,
                attempted,
            }),
        }
    }
}

impl Aggregate for Order {
    const KIND: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        let customer_id = self.customer_id;
        let total_cents = self.total_cents;
        match command {
            OrderCommand::PlaceOrder {
                order_id,
                customer_id,
                lines,
                currency,
                card_token,
            } => {
                if self.status.is_some() {
                    return Err(OrderError::AlreadyExists);
                }
                let total_cents = validate_lines(lines)?;
                if card_token.trim().is_empty() || card_token.len() > 200 {
                    return Err(invalid("card_token", "must be 1 to 200 characters"));
                }
                if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(invalid("currency", "must be a three-letter ISO 4217 code"));
                }
                Ok(vec![OrderEvent::OrderPlaced {
                    order_id: *order_id,
                    customer_id: *customer_id,
                    lines: lines.clone(),
                    total_cents,
                    currency: currency.clone(),
                    card_token: card_token.clone(),
                }])
            }
            OrderCommand::ConfirmOrder => {
                self.transition(OrderStatus::Confirmed, "confirmed", |order_id| {
                    OrderEvent::OrderConfirmed {
                        order_id,
                        customer_id,
                        total_cents,
                    }
                })
            }
            OrderCommand::RejectOrder { reason } => {
                self.transition(OrderStatus::Rejected, "rejected", |order_id| {
                    OrderEvent::OrderRejected {
                        order_id,
                        customer_id,
                        total_cents,
                        reason: *reason,
                    }
                })
            }
            OrderCommand::CancelOrder { reason } => {
                self.transition(OrderStatus::Cancelled, "cancelled", |order_id| {
                    OrderEvent::OrderCancelled {
                        order_id,
                        customer_id,
                        total_cents,
                        reason: *reason,
                    }
                })
            }
            OrderCommand::RequestCancellation => {
                if self.cancellation_requested {
                    return Ok(vec![]);
                }
                let (Some(order_id), Some(status)) = (self.order_id, self.status) else {
                    return Err(OrderError::NotFound);
                };
                if status != OrderStatus::Pending {
                    return Err(OrderError::InvalidTransition {
                        status,
                        attempted: "cancelled",
                    });
                }
                Ok(vec![OrderEvent::OrderCancellationRequested { order_id }])
            }
        }
    }

    fn evolve(mut self, event: &OrderEvent) -> Self {
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                customer_id,
                lines,
                total_cents,
                currency,
                ..
            } => {
                self.order_id = Some(*order_id);
                self.customer_id = *customer_id;
                self.status = Some(OrderStatus::Pending);
                self.lines = lines.clone();
                self.total_cents = *total_cents;
                self.currency = currency.clone();
            }
            OrderEvent::OrderConfirmed { .. } => self.status = Some(OrderStatus::Confirmed),
            OrderEvent::OrderRejected { reason, .. } => {
                self.status = Some(OrderStatus::Rejected);
                self.reason = Some(*reason);
            }
            OrderEvent::OrderCancellationRequested { .. } => self.cancellation_requested = true,
            OrderEvent::OrderCancelled { reason, .. } => {
                self.status = Some(OrderStatus::Cancelled);
                self.reason = Some(*reason);
            }
        }
        self
    }
}

/// The total of the lines, or why they are not acceptable.
pub fn validate_lines(lines: &[OrderLine]) -> Result<i64, OrderError> {
    if lines.is_empty() {
        return Err(invalid("lines", "an order needs at least one line"));
    }
    if lines.len() > MAX_LINES {
        return Err(invalid("lines", format!("at most {MAX_LINES} lines")));
    }
    let mut total: i64 = 0;
    for (index, line) in lines.iter().enumerate() {
        if line.sku.trim().is_empty() {
            return Err(invalid(
                "lines.sku",
                format!("line {index} has an empty sku"),
            ));
        }
        if line.quantity == 0 {
            return Err(invalid(
                "lines.quantity",
                format!("line {index} must be at least 1"),
            ));
        }
        if line.unit_price_cents < 0 {
            return Err(invalid(
                "lines.unit_price_cents",
                format!("line {index} is negative"),
            ));
        }
        total = line
            .total_cents()
            .and_then(|line_total| total.checked_add(line_total))
            .ok_or_else(|| invalid("lines", "order total is too large"))?;
    }
    Ok(total)
}

fn invalid(field: &'static str, message: impl Into<String>) -> OrderError {
    OrderError::Invalid {
        field,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::given;

    fn line(sku: &str, quantity: u32, unit_price_cents: i64) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            quantity,
            unit_price_cents,
        }
    }

    fn place(lines: Vec<OrderLine>) -> OrderCommand {
        OrderCommand::PlaceOrder {
            order_id: Uuid::from_u128(1),
            customer_id: Uuid::from_u128(2),
            lines,
            currency: "EUR".into(),
            card_token: "tok_visa".into(),
        }
    }

    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: Uuid::from_u128(1),
            customer_id: Uuid::from_u128(2),
            lines: vec![line("A", 2, 150), line("B", 1, 1000)],
            total_cents: 1300,
            currency: "EUR".into(),
            card_token: "tok_visa".into(),
        }
    }

    #[test]
    fn placing_an_order_totals_its_lines() {
        let events = given::<Order>(&[])
            .decide(&place(vec![line("A", 2, 150), line("B", 1, 1000)]))
            .unwrap();
        assert_eq!(events, vec![placed()]);
        let order = given::<Order>(&events);
        assert_eq!(order.status, Some(OrderStatus::Pending));
        assert_eq!(order.total_cents, 1300);
    }

    #[test]
    fn placing_twice_is_refused() {
        let err = given::<Order>(&[placed()])
            .decide(&place(vec![line("A", 1, 1)]))
            .unwrap_err();
        assert_eq!(err, OrderError::AlreadyExists);
    }

    #[test]
    fn bad_lines_name_the_field() {
        let cases = [
            (vec![], "lines"),
            (vec![line("A", 0, 1)], "lines.quantity"),
            (vec![line(" ", 1, 1)], "lines.sku"),
            (vec![line("A", 1, -5)], "lines.unit_price_cents"),
            (vec![line("A", u32::MAX, i64::MAX)], "lines"),
        ];
        for (lines, expected_field) in cases {
            match given::<Order>(&[]).decide(&place(lines)) {
                Err(OrderError::Invalid { field, .. }) => assert_eq!(field, expected_field),
                other => panic!("expected Invalid({expected_field}), got {other:?}"),
            }
        }
    }

    #[test]
    fn confirming_a_pending_order_carries_customer_and_total() {
        let events = given::<Order>(&[placed()])
            .decide(&OrderCommand::ConfirmOrder)
            .unwrap();
        assert_eq!(
            events,
            vec![OrderEvent::OrderConfirmed {
                order_id: Uuid::from_u128(1),
                customer_id: Uuid::from_u128(2),
                total_cents: 1300
            }]
        );
    }

    #[test]
    fn repeating_a_terminal_command_decides_nothing() {
        let confirmed = given::<Order>(&[placed()])
            .decide(&OrderCommand::ConfirmOrder)
            .unwrap();
        let history = [vec![placed()], confirmed].concat();
        assert_eq!(
            given::<Order>(&history).decide(&OrderCommand::ConfirmOrder),
            Ok(vec![])
        );
    }

    #[test]
    fn a_terminal_order_cannot_change_its_outcome() {
        let rejected = OrderEvent::OrderRejected {
            order_id: Uuid::from_u128(1),
            customer_id: Uuid::from_u128(2),
            total_cents: 1300,
            reason: EndReason::OutOfStock,
        };
        let order = given::<Order>(&[placed(), rejected]);
        assert_eq!(order.reason, Some(EndReason::OutOfStock));
        assert!(matches!(
            order.decide(&OrderCommand::ConfirmOrder),
            Err(OrderError::InvalidTransition {
                status: OrderStatus::Rejected,
                ..
            })
        ));
        assert!(matches!(
            order.decide(&OrderCommand::RequestCancellation),
            Err(OrderError::InvalidTransition { .. })
        ));
    }

    #[test]
    fn cancellation_is_requested_once_then_cancelled() {
        let order = given::<Order>(&[placed()]);
        let requested = order.decide(&OrderCommand::RequestCancellation).unwrap();
        assert_eq!(
            requested,
            vec![OrderEvent::OrderCancellationRequested {
                order_id: Uuid::from_u128(1)
            }]
        );
        let order = order.replay(&requested);
        assert_eq!(order.decide(&OrderCommand::RequestCancellation), Ok(vec![]));
        let cancelled = order
            .decide(&OrderCommand::CancelOrder {
                reason: EndReason::CustomerRequest,
            })
            .unwrap();
        let order = order.replay(&cancelled);
        assert_eq!(order.status, Some(OrderStatus::Cancelled));
        assert_eq!(order.reason, Some(EndReason::CustomerRequest));
    }

    #[test]
    fn commands_on_a_missing_order_are_not_found() {
        assert_eq!(
            given::<Order>(&[]).decide(&OrderCommand::ConfirmOrder),
            Err(OrderError::NotFound)
        );
        assert_eq!(
            given::<Order>(&[]).decide(&OrderCommand::RequestCancellation),
            Err(OrderError::NotFound)
        );
    }

    #[test]
    fn reasons_round_trip_through_their_names() {
        for reason in [
            EndReason::OutOfStock,
            EndReason::PaymentDeclined,
            EndReason::PaymentTimeout,
            EndReason::CustomerRequest,
        ] {
            assert_eq!(EndReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(EndReason::parse("bored"), None);
    }

    proptest! {
        #[test]
        fn an_order_total_is_the_sum_of_its_lines(
            lines in prop::collection::vec((0u32..1000, 1u32..50, 0i64..100_000), 1..20)
        ) {
            let lines: Vec<OrderLine> = lines
                .into_iter()
                .map(|(sku, quantity, price)| line(&format!("sku-{sku}"), quantity, price))
                .collect();
            let expected: i64 = lines.iter().map(|l| l.unit_price_cents * i64::from(l.quantity)).sum();
            let events = given::<Order>(&[]).decide(&place(lines)).unwrap();
            let order = given::<Order>(&events);
            prop_assert_eq!(order.total_cents, expected);
        }
    }
}
