//! Command handlers: what the inventory and payment services do with the commands the
//! order-fulfilment saga sends to their `<service>.commands` queues. Each runs inside
//! the consumer transaction that claims the command's inbox row, so a command's
//! effect happens once however often it is delivered.

use std::collections::{HashMap, HashSet};

use domain::Aggregate;
use domain::inventory::{
    ReservationReply, StockCommand, StockError, StockItem, StockRequest, reserve_all,
};
use domain::payment::{
    CaptureAnswer, Payment, PaymentCommand, PaymentError, PaymentRequest, PaymentStatus,
    ProviderAnswer,
};
use eventstore::metrics::HistogramFamily;
use eventstore::{
    AggregateStore, ExecuteError, ExpectedVersion, Handler, HandlerError, Message, NewEvent,
    StoreTransaction,
};
use uuid::Uuid;

/// The inventory service's command handler.
pub struct InventoryCommands {
    pub aggregates: AggregateStore,
}

/// The payment service's command handler.
pub struct PaymentCommands {
    pub aggregates: AggregateStore,
    pub provider: SimulatedProvider,
    /// `orderflow_provider_call_seconds` ([`crate::telemetry::provider_calls`]).
    pub calls: HistogramFamily,
}

fn stock_stream(sku: &str) -> String {
    AggregateStore::stream_id::<StockItem>(sku)
}

impl Handler for InventoryCommands {
    fn streams_to_lock(&self, message: &Message) -> Vec<String> {
        match message.decode::<StockRequest>() {
            Ok(request) => {
                let mut streams: Vec<String> = request
                    .lines_by_sku()
                    .iter()
                    .map(|line| stock_stream(&line.sku))
                    .collect();
                if matches!(request, StockRequest::ReserveStock { .. }) {
                    streams.push(ReservationReply::stream_id(request.order_id()));
                }
                streams
            }
            Err(_) => Vec::new(),
        }
    }

    async fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let request: StockRequest = message.decode()?;
        let metadata = message.caused_metadata();
        let order_id = request.order_id();
        let lines = request.lines_by_sku();
        match request {
            StockRequest::ReserveStock { .. } => {
                let mut loaded = Vec::with_capacity(lines.len());
                for line in lines.iter().cloned() {
                    let stream_id = stock_stream(&line.sku);
                    // Locked by the consumer already (`streams_to_lock`). A cached
                    // state is trusted: appending on a stale one conflicts, and the
                    // command is tried again.
                    let item = self
                        .aggregates
                        .load_to_write::<StockItem>(transaction, &stream_id)
                        .await?;
                    loaded.push((line, stream_id, item));
                }
                let decided = loop {
                    let items: Vec<_> = loaded
                        .iter()
                        .map(|(line, _, item)| (line.clone(), item.state.clone()))
                        .collect();
                    let decided = reserve_all(order_id, &items);
                    let written: HashSet<&str> = match &decided {
                        Ok(decided) => decided.iter().map(|(sku, _)| sku.as_str()).collect(),
                        Err(_) => HashSet::new(),
                    };
                    // A stream that is not appended to is not checked by an append.
                    let mut moved = false;
                    for (line, stream_id, item) in &mut loaded {
                        if !written.contains(line.sku.as_str()) {
                            moved |= self
                                .aggregates
                                .refresh(transaction, stream_id, item)
                                .await?;
                        }
                    }
                    if !moved {
                        break decided?;
                    }
                };
                // One answer for the whole request: the only part of it the order
                // service hears (the per-SKU events are the inventory's own).
                let reply = ReservationReply::answering(order_id, &lines, &decided);
                let mut loaded: HashMap<String, _> = loaded
                    .into_iter()
                    .map(|(line, _, item)| (line.sku, item))
                    .collect();
                for (sku, events) in decided {
                    let Some(item) = loaded.remove(&sku) else {
                        continue;
                    };
                    self.aggregates
                        .append_decided(transaction, &stock_stream(&sku), item, events, metadata)
                        .await?;
                }
                let mut answer =
                    NewEvent::new(self.aggregates.registry().encode(&reply)?, metadata);
                // Named after the command: an answer sent again is recognised.
                answer.event_id = Uuid::new_v5(&message.envelope.message_id, b"reservation-reply");
                transaction
                    .append(
                        &ReservationReply::stream_id(order_id),
                        ExpectedVersion::Any,
                        &[answer],
                    )
                    .await?;
            }
            StockRequest::ReleaseStock { .. } | StockRequest::CommitStock { .. } => {
                let release = matches!(request, StockRequest::ReleaseStock { .. });
                for line in lines {
                    let command = if release {
                        StockCommand::ReleaseStock {
                            order_id: order_id.uuid(),
                        }
                    } else {
                        StockCommand::CommitStock {
                            order_id: order_id.uuid(),
                        }
                    };
                    let stream_id = stock_stream(&line.sku);
                    let outcome = self
                        .aggregates
                        .execute_to_write::<StockItem>(transaction, &stream_id, &command, metadata)
                        .await;
                    match outcome {
                        Ok(_) => {}
                        // Nothing held for the order (never reserved, or already
                        // released or committed by an earlier command): nothing to do.
                        Err(ExecuteError::Domain(
                            StockError::NotFound | StockError::NoReservation(_),
                        )) => {
                            tracing::debug!(%order_id, sku = %line.sku, "nothing held to release or commit");
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            }
        }
        Ok(())
    }
}

impl Handler for PaymentCommands {
    fn streams_to_lock(&self, message: &Message) -> Vec<String> {
        match message.decode::<PaymentRequest>() {
            Ok(request) => vec![AggregateStore::stream_id::<Payment>(request.order_id())],
            Err(_) => Vec::new(),
        }
    }

    async fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let request: PaymentRequest = message.decode()?;
        let order_id = request.order_id();
        let stream_id = AggregateStore::stream_id::<Payment>(order_id.uuid());
        let command = match request {
            PaymentRequest::AuthorizePayment {
                customer_id,
                amount_cents,
                card_token,
                ..
            } => match self.call("authorize", Option::is_some, || {
                self.provider.authorize(&card_token)
            }) {
                Some(answer) => PaymentCommand::AuthorizePayment {
                    order_id: order_id.uuid(),
                    customer_id,
                    amount_cents,
                    answer,
                },
                // The provider never answers; the saga's deadline deals with it.
                None => {
                    tracing::info!(%order_id, "the payment provider did not answer");
                    return Ok(());
                }
            },
            PaymentRequest::CapturePayment { .. } => {
                // The provider is asked only for an authorized payment; its answer
                // is decided on the state it was given. So that state is read, not
                // trusted from the cache: asking the provider on a stale one (already
                // captured elsewhere) would be an effect no failed append undoes.
                // Locked by the consumer already (`streams_to_lock`).
                let loaded = self
                    .aggregates
                    .load_on::<Payment>(transaction.connection(), &stream_id)
                    .await?;
                let answer =
                    self.call("capture", |_| true, || self.provider.capture(&loaded.state));
                let events = loaded
                    .state
                    .decide(&PaymentCommand::CapturePayment { answer })?;
                let metadata = message.caused_metadata();
                self.aggregates
                    .append_decided(transaction, &stream_id, loaded, events, metadata)
                    .await?;
                return Ok(());
            }
            PaymentRequest::VoidPayment { .. } => PaymentCommand::VoidPayment,
            PaymentRequest::RefundPayment { .. } => PaymentCommand::RefundPayment,
        };
        let void = matches!(command, PaymentCommand::VoidPayment);
        let outcome = self
            .aggregates
            .execute_to_write::<Payment>(
                transaction,
                &stream_id,
                &command,
                message.caused_metadata(),
            )
            .await;
        match outcome {
            Ok(_) => Ok(()),
            // Voiding an authorization that never happened changes nothing.
            Err(ExecuteError::Domain(PaymentError::NotFound)) if void => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// The payment provider of DESIGN §7, simulated: `tok_decline` is declined,
/// `tok_timeout` never answers, any other token is approved. `tok_capture_flaky` is
/// approved, but the provider refuses to capture it twice before it succeeds.
#[derive(Debug, Clone, Default)]
pub struct SimulatedProvider;

/// How the simulated provider marks the authorizations of `tok_capture_flaky`.
const FLAKY_CAPTURE: &str = "auth_flaky_";
/// Captures refused for such an authorization before one succeeds.
const FLAKY_REFUSALS: u32 = 2;

impl SimulatedProvider {
    /// The provider's answer to capturing `payment` (consulted for an authorized
    /// payment only).
    pub fn capture(&self, payment: &Payment) -> CaptureAnswer {
        let flaky = payment
            .authorization_id
            .as_deref()
            .is_some_and(|id| id.starts_with(FLAKY_CAPTURE));
        let authorized = payment.status == Some(PaymentStatus::Authorized);
        if flaky && authorized && payment.failed_captures < FLAKY_REFUSALS {
            CaptureAnswer::Refused {
                reason: "provider_unavailable".to_owned(),
            }
        } else {
            CaptureAnswer::Captured
        }
    }

    /// The provider's answer, or `None` when it does not answer.
    pub fn authorize(&self, card_token: &str) -> Option<ProviderAnswer> {
        match card_token {
            "tok_decline" => Some(ProviderAnswer::Declined {
                reason: "card_declined".to_owned(),
            }),
            "tok_timeout" => None,
            "tok_capture_flaky" => Some(ProviderAnswer::Approved {
                authorization_id: format!("{FLAKY_CAPTURE}{}", Uuid::now_v7().simple()),
            }),
            _ => Some(ProviderAnswer::Approved {
                authorization_id: format!("auth_{}", Uuid::now_v7().simple()),
            }),
        }
    }
}

impl PaymentCommands {
    /// One call to the payment provider (simulated in-process, so it has no breaker: a
    /// provider that does not answer is the saga's deadline's business), in a span of
    /// its own and timed in the metrics; `answered` tells an answer from none.
    fn call<T>(
        &self,
        operation: &'static str,
        answered: impl Fn(&T) -> bool,
        call: impl FnOnce() -> T,
    ) -> T {
        let span = tracing::info_span!(
            "payment provider",
            otel.kind = "client",
            otel.name = %format_args!("payment provider: {operation}"),
            orderflow.service = "payment",
            operation,
        );
        let started = std::time::Instant::now();
        let answer = span.in_scope(call);
        let ok = answered(&answer);
        crate::telemetry::provider_call(&self.calls, "payment", operation, ok, started.elapsed());
        answer
    }
}
