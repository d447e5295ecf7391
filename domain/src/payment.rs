//! The Payment aggregate: one payment per order, authorized or declined by an external
//! provider, then captured, voided or refunded.
//!
//! The provider is called by the payment service *before* `decide`; its answer comes in
//! on the command, so the decision itself stays pure.

use uuid::Uuid;

use crate::ids::{CustomerId, OrderId};

use crate::Aggregate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Authorized,
    Declined,
    Captured,
    Voided,
    Refunded,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Authorized => "authorized",
            PaymentStatus::Declined => "declined",
            PaymentStatus::Captured => "captured",
            PaymentStatus::Voided => "voided",
            PaymentStatus::Refunded => "refunded",
        }
    }
}

/// What the payment provider answered to an authorization request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderAnswer {
    Approved { authorization_id: String },
    Declined { reason: String },
}

/// What the payment provider answered to a capture request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureAnswer {
    Captured,
    /// Refused for now (the provider is down, say): the payment stays authorized and
    /// the capture may be asked for again.
    Refused {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    AuthorizePayment {
        order_id: Uuid,
        /// Who pays: the order's customer (unknown for requests recorded before it was
        /// sent along), whose token may read the payment.
        customer_id: Option<Uuid>,
        amount_cents: i64,
        answer: ProviderAnswer,
    },
    CapturePayment {
        answer: CaptureAnswer,
    },
    VoidPayment,
    RefundPayment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentEvent {
    PaymentAuthorized {
        order_id: Uuid,
        customer_id: Option<Uuid>,
        amount_cents: i64,
        authorization_id: String,
    },
    PaymentDeclined {
        order_id: Uuid,
        customer_id: Option<Uuid>,
        amount_cents: i64,
        reason: String,
    },
    PaymentCaptured {
        order_id: Uuid,
        amount_cents: i64,
    },
    /// The provider refused a capture; the payment is still authorized.
    PaymentCaptureFailed {
        order_id: Uuid,
        amount_cents: i64,
        reason: String,
    },
    PaymentVoided {
        order_id: Uuid,
        amount_cents: i64,
    },
    PaymentRefunded {
        order_id: Uuid,
        amount_cents: i64,
    },
}

/// What another service (the order-fulfilment saga) asks of the payment service
/// through its command queue. The payment service asks its provider for an answer to
/// `AuthorizePayment` before it decides (see [`PaymentCommand`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentRequest {
    AuthorizePayment {
        order_id: Uuid,
        customer_id: Option<Uuid>,
        amount_cents: i64,
        card_token: String,
    },
    CapturePayment {
        order_id: Uuid,
    },
    /// Voids the order's authorization; when there is none, nothing happens.
    VoidPayment {
        order_id: Uuid,
    },
    RefundPayment {
        order_id: Uuid,
    },
}

impl PaymentRequest {
    pub fn order_id(&self) -> OrderId {
        match self {
            PaymentRequest::AuthorizePayment { order_id, .. }
            | PaymentRequest::CapturePayment { order_id }
            | PaymentRequest::VoidPayment { order_id }
            | PaymentRequest::RefundPayment { order_id } => OrderId::new(*order_id),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaymentError {
    #[error("payment not found")]
    NotFound,
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("payment is {} and cannot be {attempted}", status.as_str())]
    InvalidTransition {
        status: PaymentStatus,
        attempted: &'static str,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payment {
    pub order_id: Option<Uuid>,
    pub status: Option<PaymentStatus>,
    pub amount_cents: i64,
    /// The provider's id for the authorization, which a capture names.
    pub authorization_id: Option<String>,
    /// Captures the provider refused so far.
    pub failed_captures: u32,
    /// Who pays (see [`PaymentCommand::AuthorizePayment`]).
    pub customer_id: Option<Uuid>,
}

impl Payment {
    /// Moves from `from` to `to`; no events when already at `to` (or at one of the
    /// `harmless` statuses, where the command has nothing left to do).
    fn transition(
        &self,
        from: PaymentStatus,
        to: PaymentStatus,
        harmless: &[PaymentStatus],
        event: impl FnOnce(Uuid, i64) -> PaymentEvent,
    ) -> Result<Vec<PaymentEvent>, PaymentError> {
        let (Some(order_id), Some(status)) = (self.order_id, self.status) else {
            return Err(PaymentError::NotFound);
        };
        if status == from {
            Ok(vec![event(order_id, self.amount_cents)])
        } else if status == to || harmless.contains(&status) {
            Ok(vec![])
        } else {
            Err(PaymentError::InvalidTransition {
                status,
                attempted: to.as_str(),
            })
        }
    }
}

impl Aggregate for Payment {
    const KIND: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;

    fn decide(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        use PaymentStatus::*;
        match command {
            PaymentCommand::AuthorizePayment {
                order_id,
                customer_id,
                amount_cents,
                answer,
            } => {
                // The first answer for an order stands; a retried request changes nothing.
                if self.status.is_some() {
                    return Ok(vec![]);
                }
                if *amount_cents < 0 {
                    return Err(PaymentError::Invalid {
                        field: "amount_cents",
                        message: "must not be negative".into(),
                    });
                }
                Ok(vec![match answer {
                    ProviderAnswer::Approved { authorization_id } => {
                        PaymentEvent::PaymentAuthorized {
                            order_id: *order_id,
                            customer_id: *customer_id,
                            amount_cents: *amount_cents,
                            authorization_id: authorization_id.clone(),
                        }
                    }
                    ProviderAnswer::Declined { reason } => PaymentEvent::PaymentDeclined {
                        order_id: *order_id,
                        customer_id: *customer_id,
                        amount_cents: *amount_cents,
                        reason: reason.clone(),
                    },
                }])
            }
            PaymentCommand::CapturePayment { answer } => self.transition(
                Authorized,
                Captured,
                &[Refunded],
                |order_id, amount_cents| match answer {
                    CaptureAnswer::Captured => PaymentEvent::PaymentCaptured {
                        order_id,
                        amount_cents,
                    },
                    CaptureAnswer::Refused { reason } => PaymentEvent::PaymentCaptureFailed {
                        order_id,
                        amount_cents,
                        reason: reason.clone(),
                    },
                },
            ),
            // A declined payment holds no money: voiding it has nothing to do.
            PaymentCommand::VoidPayment => {
                self.transition(Authorized, Voided, &[Declined], |order_id, amount_cents| {
                    PaymentEvent::PaymentVoided {
                        order_id,
                        amount_cents,
                    }
                })
            }
            PaymentCommand::RefundPayment => {
                self.transition(Captured, Refunded, &[], |order_id, amount_cents| {
                    PaymentEvent::PaymentRefunded {
                        order_id,
                        amount_cents,
                    }
                })
            }
        }
    }

    fn evolve(mut self, event: &PaymentEvent) -> Self {
        let (order_id, amount_cents, status) = event.outcome();
        self.order_id = Some(order_id);
        self.amount_cents = amount_cents;
        self.status = Some(status);
        if let Some(customer_id) = event.customer_id() {
            self.customer_id = Some(customer_id.uuid());
        }
        match event {
            PaymentEvent::PaymentAuthorized {
                authorization_id, ..
            } => self.authorization_id = Some(authorization_id.clone()),
            PaymentEvent::PaymentCaptureFailed { .. } => self.failed_captures += 1,
            _ => {}
        }
        self
    }
}

impl PaymentEvent {
    /// Who pays, on the events that open a payment (when the request named them).
    pub fn customer_id(&self) -> Option<CustomerId> {
        match self {
            PaymentEvent::PaymentAuthorized { customer_id, .. }
            | PaymentEvent::PaymentDeclined { customer_id, .. } => customer_id.map(CustomerId::new),
            _ => None,
        }
    }

    /// The order, the amount and the status every payment event leaves behind.
    pub fn outcome(&self) -> (Uuid, i64, PaymentStatus) {
        let (order_id, amount_cents, status) = match self {
            PaymentEvent::PaymentAuthorized {
                order_id,
                amount_cents,
                ..
            } => (order_id, amount_cents, PaymentStatus::Authorized),
            PaymentEvent::PaymentDeclined {
                order_id,
                amount_cents,
                ..
            } => (order_id, amount_cents, PaymentStatus::Declined),
            PaymentEvent::PaymentCaptured {
                order_id,
                amount_cents,
            } => (order_id, amount_cents, PaymentStatus::Captured),
            PaymentEvent::PaymentCaptureFailed {
                order_id,
                amount_cents,
                ..
            } => (order_id, amount_cents, PaymentStatus::Authorized),
            PaymentEvent::PaymentVoided {
                order_id,
                amount_cents,
            } => (order_id, amount_cents, PaymentStatus::Voided),
            PaymentEvent::PaymentRefunded {
                order_id,
                amount_cents,
            } => (order_id, amount_cents, PaymentStatus::Refunded),
        };
        (*order_id, *amount_cents, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::given;

    const ORDER: Uuid = Uuid::from_u128(9);
    const CUSTOMER: Uuid = Uuid::from_u128(10);

    fn authorize(answer: ProviderAnswer) -> PaymentCommand {
        PaymentCommand::AuthorizePayment {
            order_id: ORDER,
            customer_id: Some(CUSTOMER),
            amount_cents: 2500,
            answer,
        }
    }

    fn approved() -> ProviderAnswer {
        ProviderAnswer::Approved {
            authorization_id: "auth-1".into(),
        }
    }

    fn capture() -> PaymentCommand {
        PaymentCommand::CapturePayment {
            answer: CaptureAnswer::Captured,
        }
    }

    fn authorized() -> PaymentEvent {
        PaymentEvent::PaymentAuthorized {
            order_id: ORDER,
            customer_id: Some(CUSTOMER),
            amount_cents: 2500,
            authorization_id: "auth-1".into(),
        }
    }

    #[test]
    fn an_approval_authorizes_and_a_retry_changes_nothing() {
        let events = given::<Payment>(&[])
            .decide(&authorize(approved()))
            .unwrap();
        assert_eq!(events, vec![authorized()]);
        let declined = ProviderAnswer::Declined {
            reason: "card_declined".into(),
        };
        assert_eq!(
            given::<Payment>(&events).decide(&authorize(declined)),
            Ok(vec![])
        );
    }

    #[test]
    fn a_decline_is_recorded_and_voiding_it_does_nothing() {
        let events = given::<Payment>(&[])
            .decide(&authorize(ProviderAnswer::Declined {
                reason: "card_declined".into(),
            }))
            .unwrap();
        let payment = given::<Payment>(&events);
        assert_eq!(payment.status, Some(PaymentStatus::Declined));
        assert_eq!(payment.decide(&PaymentCommand::VoidPayment), Ok(vec![]));
        assert!(matches!(
            payment.decide(&capture()),
            Err(PaymentError::InvalidTransition { .. })
        ));
    }

    #[test]
    fn capture_then_refund() {
        let payment = given::<Payment>(&[authorized()]);
        let captured = payment.decide(&capture()).unwrap();
        assert_eq!(
            captured,
            vec![PaymentEvent::PaymentCaptured {
                order_id: ORDER,
                amount_cents: 2500
            }]
        );
        let payment = payment.replay(&captured);
        assert_eq!(payment.decide(&capture()), Ok(vec![]));
        assert!(matches!(
            payment.decide(&PaymentCommand::VoidPayment),
            Err(PaymentError::InvalidTransition {
                status: PaymentStatus::Captured,
                ..
            })
        ));
        let refunded = payment.decide(&PaymentCommand::RefundPayment).unwrap();
        assert_eq!(
            payment.replay(&refunded).status,
            Some(PaymentStatus::Refunded)
        );
    }

    #[test]
    fn a_refused_capture_keeps_the_authorization_for_the_next_attempt() {
        let payment = given::<Payment>(&[authorized()]);
        assert_eq!(payment.authorization_id.as_deref(), Some("auth-1"));
        let refused = PaymentCommand::CapturePayment {
            answer: CaptureAnswer::Refused {
                reason: "provider_unavailable".into(),
            },
        };
        let failed = payment.decide(&refused).unwrap();
        assert_eq!(
            failed,
            vec![PaymentEvent::PaymentCaptureFailed {
                order_id: ORDER,
                amount_cents: 2500,
                reason: "provider_unavailable".into(),
            }]
        );
        let payment = payment.replay(&failed);
        assert_eq!(payment.status, Some(PaymentStatus::Authorized));
        assert_eq!(payment.failed_captures, 1);
        let captured = payment.decide(&capture()).unwrap();
        assert!(matches!(
            captured.as_slice(),
            [PaymentEvent::PaymentCaptured { .. }]
        ));
        // Once captured, a refusal that comes late changes nothing.
        assert_eq!(payment.replay(&captured).decide(&refused), Ok(vec![]));
    }

    #[test]
    fn a_voided_authorization_cannot_be_captured() {
        let payment = given::<Payment>(&[authorized()]);
        let voided = payment.decide(&PaymentCommand::VoidPayment).unwrap();
        let payment = payment.replay(&voided);
        assert_eq!(payment.status, Some(PaymentStatus::Voided));
        assert!(payment.decide(&capture()).is_err());
    }

    #[test]
    fn commands_before_authorization_are_not_found() {
        assert_eq!(
            given::<Payment>(&[]).decide(&capture()),
            Err(PaymentError::NotFound)
        );
    }

    #[test]
    fn a_negative_amount_is_refused() {
        let result = given::<Payment>(&[]).decide(&PaymentCommand::AuthorizePayment {
            order_id: ORDER,
            customer_id: None,
            amount_cents: -1,
            answer: approved(),
        });
        assert!(matches!(result, Err(PaymentError::Invalid { .. })));
    }
}
