//! The order-fulfilment saga (DESIGN §6): reserve stock, authorize payment, then
//! confirm the order, commit the stock and capture the payment; compensate whatever
//! was done when a step fails, the payment does not answer in time, or the customer
//! cancels.
//!
//! One saga per order, keyed by its id. Inputs carry no order id: the runner routes
//! each event to the saga of its order.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::inventory::{StockLine, StockRequest};
use domain::order::{EndReason, OrderCommand, OrderLine};
use domain::payment::PaymentRequest;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Deadline, Decision, ProcessManager};

/// How long the saga waits, fixed for a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// For a payment answer (`ORDERFLOW_PAYMENT_DEADLINE_MS`); then it compensates.
    pub payment_deadline: Duration,
    /// Between capture attempts once the order is confirmed.
    pub capture_retry: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            payment_deadline: Duration::from_secs(30),
            capture_retry: Duration::from_secs(30),
        }
    }
}

/// Where the saga is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// No order placed yet.
    #[default]
    NotStarted,
    ReservingStock,
    AuthorizingPayment,
    /// Confirmed; the capture is not yet acknowledged.
    Capturing,
    /// Confirmed and captured.
    Completed,
    Rejected,
    Cancelled,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::NotStarted,
        Step::ReservingStock,
        Step::AuthorizingPayment,
        Step::Capturing,
        Step::Completed,
        Step::Rejected,
        Step::Cancelled,
    ];

    /// The order has ended (confirmed or not); only late answers arrive now.
    pub fn order_ended(self) -> bool {
        matches!(
            self,
            Step::Capturing | Step::Completed | Step::Rejected | Step::Cancelled
        )
    }
}

/// One SKU of the order, as the saga stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: u32,
}

/// The saga's state, persisted as JSON between inputs (its own types, not the
/// domain's, so the domain can change without breaking stored sagas).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub step: Step,
    pub order_id: Uuid,
    pub customer_id: Uuid,
    /// Quantities per SKU (lines of one SKU merged), in SKU order.
    pub lines: Vec<Line>,
    pub total_cents: i64,
    pub currency: String,
    pub card_token: String,
    /// SKUs whose reservation for this order is confirmed.
    pub reserved: BTreeSet<String>,
    /// The customer asked to cancel while the outcome of a step was pending.
    pub cancellation_requested: bool,
    /// Why the order did not confirm: an [`EndReason`] string (`out_of_stock`, …).
    pub reason: Option<String>,
    /// Captures sent (the first, then one per retry).
    pub capture_attempts: u32,
    /// Captures the payment provider refused; each is retried after `capture_retry`.
    #[serde(default)]
    pub capture_failures: u32,
    /// Why the last capture was refused, until one succeeds.
    #[serde(default)]
    pub last_capture_error: Option<String>,
}

/// What the saga reacts to: the order's own events, the inventory's and payment's
/// answers, and its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    OrderPlaced {
        order_id: Uuid,
        customer_id: Uuid,
        lines: Vec<OrderLine>,
        total_cents: i64,
        currency: String,
        card_token: String,
    },
    CancellationRequested,
    /// Every line is held (the inventory's one answer to the reservation).
    StockReserved,
    /// A line could not be held, so none is.
    StockReservationFailed {
        sku: String,
    },
    PaymentAuthorized,
    PaymentDeclined,
    PaymentCaptured,
    PaymentCaptureFailed {
        reason: String,
    },
    /// The pending deadline fell due.
    DeadlinePassed,
}

/// What the saga asks for: of the inventory and payment services through their
/// command queues, and of its own order aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Stock(StockRequest),
    Payment(PaymentRequest),
    Order(OrderCommand),
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::NotStarted => "not_started",
            Step::ReservingStock => "reserving_stock",
            Step::AuthorizingPayment => "authorizing_payment",
            Step::Capturing => "capturing",
            Step::Completed => "completed",
            Step::Rejected => "rejected",
            Step::Cancelled => "cancelled",
        }
    }
}

impl Input {
    /// A short description for the saga's history.
    pub fn describe(&self) -> String {
        match self {
            Input::OrderPlaced { .. } => "OrderPlaced".to_owned(),
            Input::CancellationRequested => "OrderCancellationRequested".to_owned(),
            Input::StockReserved => "StockReserved".to_owned(),
            Input::StockReservationFailed { sku } => format!("StockReservationFailed {sku}"),
            Input::PaymentAuthorized => "PaymentAuthorized".to_owned(),
            Input::PaymentDeclined => "PaymentDeclined".to_owned(),
            Input::PaymentCaptured => "PaymentCaptured".to_owned(),
            Input::PaymentCaptureFailed { reason } => format!("PaymentCaptureFailed {reason}"),
            Input::DeadlinePassed => "DeadlinePassed".to_owned(),
        }
    }
}

impl Command {
    /// A short description for the saga's history.
    pub fn describe(&self) -> String {
        match self {
            Command::Stock(StockRequest::ReserveStock { .. }) => "ReserveStock".to_owned(),
            Command::Stock(StockRequest::ReleaseStock { lines, .. }) => {
                let skus: Vec<&str> = lines.iter().map(|line| line.sku.as_str()).collect();
                format!("ReleaseStock {}", skus.join(","))
            }
            Command::Stock(StockRequest::CommitStock { .. }) => "CommitStock".to_owned(),
            Command::Payment(PaymentRequest::AuthorizePayment { .. }) => {
                "AuthorizePayment".to_owned()
            }
            Command::Payment(PaymentRequest::CapturePayment { .. }) => "CapturePayment".to_owned(),
            Command::Payment(PaymentRequest::VoidPayment { .. }) => "VoidPayment".to_owned(),
            Command::Payment(PaymentRequest::RefundPayment { .. }) => "RefundPayment".to_owned(),
            Command::Order(OrderCommand::ConfirmOrder) => "ConfirmOrder".to_owned(),
            Command::Order(OrderCommand::RejectOrder { reason }) => {
                format!("RejectOrder {}", reason.as_str())
            }
            Command::Order(OrderCommand::CancelOrder { reason }) => {
                format!("CancelOrder {}", reason.as_str())
            }
            Command::Order(other) => format!("{other:?}"),
        }
    }
}

impl ProcessManager for Fulfilment {
    type Input = Input;
    type Command = Command;
    type Settings = Settings;

    fn decide(
        &self,
        input: &Input,
        now: DateTime<Utc>,
        settings: &Settings,
    ) -> Decision<Self, Command> {
        let mut next = self.clone();
        let mut commands = Vec::new();
        let mut deadline = Deadline::Keep;
        let after = |wait: Duration| {
            Deadline::Set(now + chrono::Duration::from_std(wait).unwrap_or(chrono::TimeDelta::MAX))
        };
        match (self.step, input) {
            (
                Step::NotStarted,
                Input::OrderPlaced {
                    order_id,
                    customer_id,
                    lines,
                    total_cents,
                    currency,
                    card_token,
                },
            ) => {
                next.step = Step::ReservingStock;
                next.order_id = *order_id;
                next.customer_id = *customer_id;
                next.lines = merged(*order_id, lines);
                next.total_cents = *total_cents;
                next.currency.clone_from(currency);
                next.card_token.clone_from(card_token);
                commands.push(
                    next.stock(|order_id, lines| StockRequest::ReserveStock { order_id, lines }),
                );
            }

            // Reserving stock: wait for the inventory's answer. A cancellation waits
            // too: only the answer says whether there is anything to release.
            (Step::ReservingStock, Input::StockReserved) => {
                next.reserved = next.lines.iter().map(|line| line.sku.clone()).collect();
                if next.cancellation_requested {
                    commands.push(next.release());
                    next.end(Step::Cancelled, EndReason::CustomerRequest, &mut commands);
                } else {
                    next.step = Step::AuthorizingPayment;
                    commands.push(Command::Payment(PaymentRequest::AuthorizePayment {
                        order_id: next.order_id,
                        customer_id: Some(next.customer_id),
                        amount_cents: next.total_cents,
                        card_token: next.card_token.clone(),
                    }));
                    deadline = after(settings.payment_deadline);
                }
            }
            // All or nothing: a failed line means nothing was reserved.
            (Step::ReservingStock, Input::StockReservationFailed { .. }) => {
                if next.cancellation_requested {
                    next.end(Step::Cancelled, EndReason::CustomerRequest, &mut commands);
                } else {
                    next.end(Step::Rejected, EndReason::OutOfStock, &mut commands);
                }
            }
            (Step::ReservingStock, Input::CancellationRequested) => {
                next.cancellation_requested = true;
            }

            // Authorizing the payment.
            (Step::AuthorizingPayment, Input::PaymentAuthorized) => {
                next.step = Step::Capturing;
                next.capture_attempts = 1;
                commands.push(Command::Order(OrderCommand::ConfirmOrder));
                commands.push(
                    next.stock(|order_id, lines| StockRequest::CommitStock { order_id, lines }),
                );
                commands.push(next.capture());
                deadline = after(settings.capture_retry);
            }
            (Step::AuthorizingPayment, Input::PaymentDeclined) => {
                commands.push(next.release());
                next.end(Step::Cancelled, EndReason::PaymentDeclined, &mut commands);
                deadline = Deadline::Clear;
            }
            (Step::AuthorizingPayment, Input::DeadlinePassed) => {
                commands.push(next.release());
                // An authorization may still be on its way: void it, and void again
                // if it arrives later.
                commands.push(next.void());
                next.end(Step::Cancelled, EndReason::PaymentTimeout, &mut commands);
                deadline = Deadline::Clear;
            }
            (Step::AuthorizingPayment, Input::CancellationRequested) => {
                next.cancellation_requested = true;
                commands.push(next.release());
                commands.push(next.void());
                next.end(Step::Cancelled, EndReason::CustomerRequest, &mut commands);
                deadline = Deadline::Clear;
            }

            // Confirmed: the capture must land; it is retried until it does.
            (Step::Capturing, Input::PaymentCaptured) => {
                next.step = Step::Completed;
                next.last_capture_error = None;
                deadline = Deadline::Clear;
            }
            // Refused: recorded for whoever looks, and asked again when the retry
            // deadline (already pending) falls due.
            (Step::Capturing, Input::PaymentCaptureFailed { reason }) => {
                next.capture_failures += 1;
                next.last_capture_error = Some(reason.clone());
            }
            (Step::Capturing, Input::DeadlinePassed) => {
                next.capture_attempts += 1;
                commands.push(next.capture());
                deadline = after(settings.capture_retry);
            }

            // Late answers after the order ended without confirming: undo them.
            (Step::Cancelled | Step::Rejected, Input::PaymentAuthorized) => {
                commands.push(next.void());
            }
            // (Releasing what is not held changes nothing.)
            (Step::Cancelled | Step::Rejected, Input::StockReserved) => {
                commands.push(next.release());
            }

            // Anything else is a duplicate, or too late to matter.
            _ => {}
        }
        Decision {
            state: next,
            commands,
            deadline,
        }
    }
}

impl Line {
    fn stock(&self) -> StockLine {
        StockLine {
            sku: self.sku.clone(),
            quantity: self.quantity,
        }
    }
}

impl Fulfilment {
    /// Why the order did not confirm, if it ended so.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.reason.as_deref().and_then(EndReason::parse)
    }

    fn stock(&self, request: impl FnOnce(Uuid, Vec<StockLine>) -> StockRequest) -> Command {
        Command::Stock(request(
            self.order_id,
            self.lines.iter().map(Line::stock).collect(),
        ))
    }

    fn release(&self) -> Command {
        self.stock(|order_id, lines| StockRequest::ReleaseStock { order_id, lines })
    }

    fn void(&self) -> Command {
        Command::Payment(PaymentRequest::VoidPayment {
            order_id: self.order_id,
        })
    }

    fn capture(&self) -> Command {
        Command::Payment(PaymentRequest::CapturePayment {
            order_id: self.order_id,
        })
    }

    /// Ends the order without confirming it.
    fn end(&mut self, step: Step, reason: EndReason, commands: &mut Vec<Command>) {
        self.step = step;
        self.reason = Some(reason.as_str().to_owned());
        commands.push(Command::Order(match step {
            Step::Rejected => OrderCommand::RejectOrder { reason },
            _ => OrderCommand::CancelOrder { reason },
        }));
    }
}

/// The order's lines with each SKU once, in SKU order.
fn merged(order_id: Uuid, lines: &[OrderLine]) -> Vec<Line> {
    let lines = lines
        .iter()
        .map(|line| StockLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
        })
        .collect();
    StockRequest::ReserveStock { order_id, lines }
        .lines_by_sku()
        .into_iter()
        .map(|line| Line {
            sku: line.sku,
            quantity: line.quantity,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GivenWhenThen;

    fn order_id() -> Uuid {
        Uuid::from_u128(7)
    }

    fn placed() -> Input {
        let line = |sku: &str, quantity| OrderLine {
            sku: sku.into(),
            quantity,
            unit_price_cents: 100,
        };
        Input::OrderPlaced {
            order_id: order_id(),
            customer_id: Uuid::from_u128(1),
            // Two lines of A are one stock line of 3.
            lines: vec![line("B", 1), line("A", 1), line("A", 2)],
            total_cents: 400,
            currency: "EUR".into(),
            card_token: "tok_visa".into(),
        }
    }

    fn lines() -> Vec<StockLine> {
        vec![
            StockLine {
                sku: "A".into(),
                quantity: 3,
            },
            StockLine {
                sku: "B".into(),
                quantity: 1,
            },
        ]
    }

    fn reserved() -> Input {
        Input::StockReserved
    }

    fn reserve() -> Command {
        Command::Stock(StockRequest::ReserveStock {
            order_id: order_id(),
            lines: lines(),
        })
    }

    fn release() -> Command {
        Command::Stock(StockRequest::ReleaseStock {
            order_id: order_id(),
            lines: lines(),
        })
    }

    fn commit() -> Command {
        Command::Stock(StockRequest::CommitStock {
            order_id: order_id(),
            lines: lines(),
        })
    }

    fn authorize() -> Command {
        Command::Payment(PaymentRequest::AuthorizePayment {
            order_id: order_id(),
            customer_id: Some(Uuid::from_u128(1)),
            amount_cents: 400,
            card_token: "tok_visa".into(),
        })
    }

    fn capture() -> Command {
        Command::Payment(PaymentRequest::CapturePayment {
            order_id: order_id(),
        })
    }

    fn void() -> Command {
        Command::Payment(PaymentRequest::VoidPayment {
            order_id: order_id(),
        })
    }

    fn order(command: OrderCommand) -> Command {
        Command::Order(command)
    }

    fn saga() -> GivenWhenThen<Fulfilment> {
        GivenWhenThen::new(Settings {
            payment_deadline: Duration::from_secs(5),
            capture_retry: Duration::from_secs(60),
        })
    }

    fn ended(step: Step, reason: EndReason) -> impl FnOnce(&Fulfilment) {
        move |state| {
            assert_eq!(state.step, step);
            assert_eq!(state.end_reason(), Some(reason));
        }
    }

    #[test]
    fn a_placed_order_reserves_its_stock_merged_by_sku() {
        saga()
            .given(&[])
            .when(placed())
            .then_commands(&[reserve()])
            .then_deadline(Deadline::Keep)
            .then_state(|state| {
                assert_eq!(state.step, Step::ReservingStock);
                let stock: Vec<StockLine> = state.lines.iter().map(Line::stock).collect();
                assert_eq!(stock, lines());
            });
    }

    #[test]
    fn payment_is_asked_for_once_every_sku_is_reserved_with_a_deadline() {
        let then = saga()
            .given(&[placed()])
            .when(reserved())
            .then_commands(&[authorize()]);
        let due = then.at + chrono::Duration::seconds(5);
        then.then_deadline(Deadline::Set(due))
            .then_state(|state| assert_eq!(state.step, Step::AuthorizingPayment));
    }

    #[test]
    fn an_authorized_payment_confirms_commits_and_captures() {
        let then = saga()
            .given(&[placed(), reserved()])
            .when(Input::PaymentAuthorized)
            .then_commands(&[order(OrderCommand::ConfirmOrder), commit(), capture()])
            .then_state(|state| assert_eq!(state.step, Step::Capturing));
        let retry = then.at + chrono::Duration::seconds(60);
        then.then_deadline(Deadline::Set(retry));
        saga()
            .given(&[placed(), reserved(), Input::PaymentAuthorized])
            .when(Input::PaymentCaptured)
            .then_commands(&[])
            .then_deadline(Deadline::Clear)
            .then_state(|state| assert_eq!(state.step, Step::Completed));
    }

    #[test]
    fn a_capture_without_answer_is_sent_again_and_counted() {
        saga()
            .given(&[
                placed(),
                reserved(),
                Input::PaymentAuthorized,
                Input::DeadlinePassed,
            ])
            .when(Input::DeadlinePassed)
            .then_commands(&[capture()])
            .then_state(|state| {
                assert_eq!(state.step, Step::Capturing);
                assert_eq!(state.capture_attempts, 3);
            });
    }

    #[test]
    fn a_refused_capture_is_recorded_and_asked_again_when_the_retry_falls_due() {
        let refused = || Input::PaymentCaptureFailed {
            reason: "provider_unavailable".into(),
        };
        let confirmed = [placed(), reserved(), Input::PaymentAuthorized];
        saga()
            .given(&confirmed)
            .when(refused())
            .then_commands(&[])
            .then_deadline(Deadline::Keep)
            .then_state(|state| {
                assert_eq!(state.step, Step::Capturing);
                assert_eq!(state.capture_failures, 1);
                assert_eq!(
                    state.last_capture_error.as_deref(),
                    Some("provider_unavailable")
                );
            });
        let refused_once = [&confirmed[..], &[refused()]].concat();
        saga()
            .given(&refused_once)
            .when(Input::DeadlinePassed)
            .then_commands(&[capture()]);
        let captured_at_last = [&refused_once[..], &[Input::DeadlinePassed]].concat();
        saga()
            .given(&captured_at_last)
            .when(Input::PaymentCaptured)
            .then_deadline(Deadline::Clear)
            .then_state(|state| {
                assert_eq!(state.step, Step::Completed);
                assert_eq!((state.capture_attempts, state.capture_failures), (2, 1));
                assert_eq!(state.last_capture_error, None);
            });
    }

    #[test]
    fn short_stock_rejects_the_order_and_releases_nothing() {
        saga()
            .given(&[placed()])
            .when(Input::StockReservationFailed { sku: "B".into() })
            .then_commands(&[order(OrderCommand::RejectOrder {
                reason: EndReason::OutOfStock,
            })])
            .then_state(ended(Step::Rejected, EndReason::OutOfStock));
    }

    #[test]
    fn a_declined_payment_releases_the_stock_and_cancels() {
        saga()
            .given(&[placed(), reserved()])
            .when(Input::PaymentDeclined)
            .then_commands(&[
                release(),
                order(OrderCommand::CancelOrder {
                    reason: EndReason::PaymentDeclined,
                }),
            ])
            .then_deadline(Deadline::Clear)
            .then_state(ended(Step::Cancelled, EndReason::PaymentDeclined));
    }

    #[test]
    fn no_payment_answer_in_time_releases_voids_and_cancels_then_voids_a_late_one() {
        let timed_out = [placed(), reserved(), Input::DeadlinePassed];
        saga()
            .given(&timed_out[..2])
            .when(Input::DeadlinePassed)
            .then_commands(&[
                release(),
                void(),
                order(OrderCommand::CancelOrder {
                    reason: EndReason::PaymentTimeout,
                }),
            ])
            .then_deadline(Deadline::Clear)
            .then_state(ended(Step::Cancelled, EndReason::PaymentTimeout));
        saga()
            .given(&timed_out)
            .when(Input::PaymentAuthorized)
            .then_commands(&[void()])
            .then_state(ended(Step::Cancelled, EndReason::PaymentTimeout));
    }

    #[test]
    fn a_cancellation_compensates_exactly_what_was_done() {
        let cancelled = order(OrderCommand::CancelOrder {
            reason: EndReason::CustomerRequest,
        });
        // While stock is pending: wait for the answer, then release what it reserved.
        saga()
            .given(&[placed()])
            .when(Input::CancellationRequested)
            .then_commands(&[]);
        saga()
            .given(&[placed(), Input::CancellationRequested])
            .when(reserved())
            .then_commands(&[release(), cancelled.clone()])
            .then_state(ended(Step::Cancelled, EndReason::CustomerRequest));
        // ...or, if it reserved nothing, release nothing.
        saga()
            .given(&[placed(), Input::CancellationRequested])
            .when(Input::StockReservationFailed { sku: "A".into() })
            .then_commands(std::slice::from_ref(&cancelled))
            .then_state(ended(Step::Cancelled, EndReason::CustomerRequest));
        // While the payment is pending: release the stock and void any authorization.
        saga()
            .given(&[placed(), reserved()])
            .when(Input::CancellationRequested)
            .then_commands(&[release(), void(), cancelled])
            .then_deadline(Deadline::Clear);
        // Once confirmed, there is nothing to cancel.
        saga()
            .given(&[placed(), reserved(), Input::PaymentAuthorized])
            .when(Input::CancellationRequested)
            .then_commands(&[])
            .then_state(|state| assert_eq!(state.step, Step::Capturing));
    }

    #[test]
    fn every_input_delivered_twice_decides_nothing_the_second_time() {
        let script = [
            placed(),
            reserved(),
            Input::PaymentAuthorized,
            Input::PaymentCaptured,
        ];
        for end in 1..=script.len() {
            let given = saga().given(&script[..end]);
            let before = given.state().clone();
            let duplicate = script[end - 1].clone();
            given
                .when(duplicate)
                .then_commands(&[])
                .then_deadline(Deadline::Keep)
                .then_state(|after| assert_eq!(after, &before));
        }
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let state = saga()
            .given(&[placed()])
            .when(Input::CancellationRequested)
            .decision
            .state;
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["step"], "reserving_stock");
        assert_eq!(json["cancellation_requested"], true);
        let back: Fulfilment = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
        let ended = saga()
            .given(&[placed()])
            .when(Input::StockReservationFailed { sku: "A".into() })
            .decision
            .state;
        assert_eq!(
            serde_json::to_value(&ended).unwrap()["reason"],
            "out_of_stock"
        );
    }
}
