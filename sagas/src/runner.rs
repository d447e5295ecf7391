//! Runs the order-fulfilment saga, which hears each of its inputs once:
//!
//! - the order service's own events (an order placed, a cancellation asked for) from
//!   the order store, as a [`Subscriber`] (subscription `order.fulfilment-saga`), never
//!   back through the broker (DESIGN §6);
//! - the other services' answers (stock, payment) as a [`Handler`] of the consumer
//!   runtime (queue `order.saga-replies`);
//! - its deadlines, from a scheduler.
//!
//! Each input is one transaction: the saga row locked, the decision taken, its order
//! commands executed on the order aggregate, its other commands queued in the outbox,
//! the new state, deadline and history step written, and the subscription's
//! checkpoint or the message's inbox row: all or nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::ids::{CustomerId, OrderId};
use domain::inventory::ReservationReply;
use domain::order::{Order, OrderEvent};
use domain::payment::PaymentEvent;
use eventstore::cache::VersionedCache;
use eventstore::metrics::{HistogramFamily, Labels, waiting_histogram};
use eventstore::trace::{self, TraceParent};
use eventstore::{
    AggregateStore, ConsumerConfig, Handler, HandlerError, Message, Metadata, Metrics,
    OutgoingCommand, RecordedEvent, StoreTransaction, Subscriber, SubscriptionConfig,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::fulfilment::{Command, Fulfilment, Input, Settings, Step};
use crate::{Deadline, Decision, ProcessManager};

/// The saga type recorded with each instance.
pub const SAGA_TYPE: &str = "order-fulfilment";
/// How often the scheduler looks for deadlines that fell due.
const DEADLINE_POLL: Duration = Duration::from_millis(100);

/// The order-fulfilment saga as the order service runs it.
#[derive(Clone)]
pub struct FulfilmentRunner {
    aggregates: AggregateStore,
    settings: Settings,
    /// The rows of sagas this process wrote recently (pending until their transaction
    /// commits): an input for a committed one needs no `SELECT … FOR UPDATE`, since
    /// the write is guarded by the version anyway (a stale entry makes it write
    /// nothing, and the runner then reads). A pending one sends the next input to the
    /// row rather than to the older committed state.
    sagas: VersionedCache<SagaRow>,
    /// Where its steps are counted and timed (`None`: nowhere).
    metrics: Option<SagaMetrics>,
}

/// The saga's series: `orderflow_saga_steps_total{saga, input, step}` (every input
/// that changed a saga, by the step it got to), `orderflow_saga_step_seconds{saga,
/// step}` (time spent in a step, observed as the saga leaves it) and
/// `orderflow_order_fulfilment_seconds{outcome}` (from the saga's start, the order
/// placed, to the order's end: confirmed, rejected or cancelled).
#[derive(Debug, Clone)]
struct SagaMetrics {
    steps: Family<Labels, Counter>,
    time_in_step: HistogramFamily,
    fulfilment: HistogramFamily,
}

impl SagaMetrics {
    fn new(metrics: &Metrics) -> SagaMetrics {
        SagaMetrics {
            steps: metrics.family(
                "saga_steps",
                "Inputs that changed a saga, by saga, input and the step it got to",
                Family::default,
            ),
            time_in_step: metrics.family(
                "saga_step_seconds",
                "Time a saga spent in a step, observed as it leaves the step",
                || HistogramFamily::new_with_constructor(waiting_histogram),
            ),
            fulfilment: metrics.family(
                "order_fulfilment_seconds",
                "From an order's saga starting (the order placed) to the order's end, by outcome",
                || HistogramFamily::new_with_constructor(waiting_histogram),
            ),
        }
    }

    /// A step committed: counted by the kind of its input (the first word of its
    /// description: no SKU or reason in a label), and the time in the step it left (if
    /// it left one).
    fn stepped(&self, input: &str, step: Step, planned: Stepped, now: DateTime<Utc>) {
        let kind = input.split_whitespace().next().unwrap_or_default();
        let saga = ("saga", SAGA_TYPE.to_owned());
        let labels = vec![
            saga.clone(),
            ("input", kind.to_owned()),
            ("step", step.as_str().to_owned()),
        ];
        self.steps.get_or_create(&labels).inc();
        let Some((left, since)) = planned.left else {
            return;
        };
        let seconds = |from: DateTime<Utc>| (now - from).to_std().unwrap_or_default().as_secs_f64();
        let labels = vec![saga, ("step", left.as_str().to_owned())];
        self.time_in_step
            .get_or_create(&labels)
            .observe(seconds(since));
        if step.order_ended() && !left.order_ended() {
            let outcome = match step {
                Step::Rejected => "rejected",
                Step::Cancelled => "cancelled",
                _ => "confirmed",
            };
            let labels = vec![("outcome", outcome.to_owned())];
            self.fulfilment
                .get_or_create(&labels)
                .observe(seconds(planned.started_at));
        }
    }
}

/// What the metrics of a committed step need of its plan.
#[derive(Debug, Clone, Copy)]
struct Stepped {
    /// The step it left, and since when it was in it.
    left: Option<(Step, DateTime<Utc>)>,
    started_at: DateTime<Utc>,
}

/// What the runner needs of a `sagas` row besides its version.
#[derive(Debug, Clone)]
struct SagaRow {
    state: Fulfilment,
    deadline_at: Option<DateTime<Utc>>,
    correlation_id: Uuid,
    /// The span of the step that wrote it: where a deadline it set continues.
    trace: Option<TraceParent>,
    started_at: DateTime<Utc>,
    /// When it entered its step.
    step_since: DateTime<Utc>,
}

/// Sagas whose rows each order-service process keeps in memory: those in flight.
const CACHED_SAGAS: usize = 20_000;

/// Writes a saga's new state and the history row of the step that got it there, in one
/// statement, if the row is still at the version `$6` the decision was taken on (0: no
/// row yet); returns the new version, or no row when another transaction moved it.
const WRITE_SAGA: &str = "WITH saga AS (
    INSERT INTO sagas (saga_id, saga_type, version, state, deadline_at, correlation_id,
                       traceparent, started_at, step_entered_at)
    VALUES ($1, $2, 1, $3, $4, $5, $11, $12, $13)
    ON CONFLICT (saga_id) DO UPDATE SET version = sagas.version + 1,
        state = excluded.state, deadline_at = excluded.deadline_at,
        traceparent = excluded.traceparent, step_entered_at = excluded.step_entered_at,
        updated_at = now()
    WHERE sagas.version = $6
    RETURNING version
)
INSERT INTO saga_steps (saga_id, version, at, input, step, commands)
SELECT $1, version, $7, $8, $9, $10 FROM saga
RETURNING version";

impl FulfilmentRunner {
    pub fn new(aggregates: AggregateStore, settings: Settings) -> Self {
        FulfilmentRunner {
            aggregates,
            settings,
            sagas: VersionedCache::new(CACHED_SAGAS),
            metrics: None,
        }
    }

    /// The same runner, counting and timing its steps in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(SagaMetrics::new(metrics));
        self
    }

    /// Its subscription on the order store, for the order's own events.
    pub fn subscription_config() -> SubscriptionConfig {
        SubscriptionConfig::new("order.fulfilment-saga")
    }

    /// Its consumer of the other services' answers, bound to exactly the events it
    /// reacts to: every delivery costs work, and most events of these services (stock
    /// committed or released, payments voided) are not inputs.
    pub fn config(amqp_url: &str) -> ConsumerConfig {
        ConsumerConfig::events(
            "order",
            "saga-replies",
            amqp_url,
            &[
                "inventory.OrderStockReserved",
                "inventory.OrderStockUnavailable",
                "payment.PaymentAuthorized",
                "payment.PaymentDeclined",
                "payment.PaymentCaptured",
                "payment.PaymentCaptureFailed",
            ],
        )
    }

    /// Fires due deadlines until `cancel` fires: every [`DEADLINE_POLL`], each saga
    /// whose deadline has passed gets a `DeadlinePassed` input in its own transaction.
    pub async fn run_deadlines(self, cancel: CancellationToken) {
        loop {
            if let Err(error) = self.fire_due_deadlines().await {
                tracing::warn!(%error, "could not fire saga deadlines");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(DEADLINE_POLL) => {}
            }
        }
    }

    /// Fires the deadlines due now; returns how many fired.
    pub async fn fire_due_deadlines(&self) -> Result<usize, HandlerError> {
        let store = self.aggregates.event_store();
        let due: Vec<(Uuid, Option<String>)> = sqlx::query_as(
            "SELECT saga_id, traceparent FROM sagas WHERE deadline_at <= now() \
             ORDER BY deadline_at LIMIT 100",
        )
        .fetch_all(store.pool())
        .await?;
        let mut fired = 0;
        for (order_id, trace) in due {
            // The deadline continues the trace of the step that set it.
            let span = tracing::info_span!(
                "deadline",
                otel.kind = "internal",
                %order_id,
                trace_id = tracing::field::Empty,
            );
            let parent = trace.as_deref().and_then(TraceParent::parse);
            trace::continue_trace(&span, parent, None);
            let fire = async {
                let mut transaction = store.begin().await?;
                // The order stream before the saga row, as the event handler locks
                // them; every writer of the row holds that lock, so the row is ours.
                transaction.lock_streams(&[&order_stream(order_id)]).await?;
                let deadline = Input::DeadlinePassed;
                let stepped = self
                    .step(&mut transaction, order_id, &deadline, Cause::Deadline)
                    .await?;
                if stepped {
                    transaction.commit().await?;
                }
                Ok::<bool, HandlerError>(stepped)
            };
            if fire.instrument(span).await? {
                fired += 1;
            }
        }
        Ok(fired)
    }

    /// Takes one input: loads the saga, decides, and writes the outcome in
    /// `transaction`; true if the saga changed. An input for a saga that has not
    /// started (other than the order being placed) is not for this saga and is
    /// ignored, and so is a deadline that is no longer due.
    ///
    /// The saga comes from this process's cache when it has it, else from its row,
    /// locked. The row is written first, guarded by the version the decision was
    /// taken on: if a cached row turns out to be stale, nothing was sent yet, and the
    /// input is decided again on the row as it is. A decision to write nothing is
    /// checked on the row the same way.
    async fn step(
        &self,
        transaction: &mut StoreTransaction<'_>,
        order_id: Uuid,
        input: &Input,
        cause: Cause,
    ) -> Result<bool, HandlerError> {
        let input_name = input.describe();
        let span = tracing::info_span!(
            "saga step",
            otel.kind = "internal",
            otel.name = %format_args!("saga: {input_name}"),
            %order_id,
            input = %input_name,
            step = tracing::field::Empty,
            commands = tracing::field::Empty,
        );
        self.decide_and_write(transaction, order_id, input, cause)
            .instrument(span)
            .await
    }

    async fn decide_and_write(
        &self,
        transaction: &mut StoreTransaction<'_>,
        order_id: Uuid,
        input: &Input,
        cause: Cause,
    ) -> Result<bool, HandlerError> {
        let now = Utc::now();
        let key = order_id.to_string();
        // Only a committed row is trusted: a pending one (of a transaction that may
        // have rolled back) could match the version of a row another process wrote.
        let cached = self.sagas.get(&key).filter(|cached| cached.committed);
        let (mut version, mut row, mut trusted) = match (&cause, cached) {
            (Cause::Message(_), Some(cached)) => (cached.version, Some(cached.value), true),
            // Most likely no row yet: if there is one, the guarded write says so.
            (Cause::Message(_), None) if matches!(input, Input::OrderPlaced { .. }) => {
                (0, None, true)
            }
            // A deadline is decided on the row itself: whether it is still due.
            _ => {
                let (version, row) = read(transaction, order_id).await?;
                (version, row, false)
            }
        };
        loop {
            let planned = self.plan(order_id, version, row.as_ref(), input, &cause, now);
            let written = match &planned {
                Some(planned) => write(transaction, order_id, version, input, planned, now).await?,
                None => None,
            };
            match (planned, written) {
                (Some(planned), Some(written)) => {
                    let span = tracing::Span::current();
                    span.record("step", planned.decision.state.step.as_str());
                    let commands = planned.described.join(", ");
                    span.record("commands", tracing::field::display(&commands));
                    tracing::debug!(
                        step = planned.decision.state.step.as_str(),
                        %commands,
                        "saga stepped"
                    );
                    self.send(
                        transaction,
                        order_id,
                        &planned.decision.commands,
                        planned.metadata,
                    )
                    .await?;
                    if let Some(metrics) = self.metrics.clone() {
                        // Counted once it commits: a step rolled back and retried is one.
                        let (input, step) = (input.describe(), planned.decision.state.step);
                        let stepped = Stepped {
                            left: planned.left,
                            started_at: planned.started_at,
                        };
                        transaction.after_commit(move || {
                            metrics.stepped(&input, step, stepped, now);
                        });
                    }
                    let saga = SagaRow {
                        state: planned.decision.state,
                        deadline_at: planned.deadline,
                        correlation_id: planned.metadata.correlation_id,
                        trace: planned.trace,
                        started_at: planned.started_at,
                        step_since: planned.step_since,
                    };
                    self.sagas.write_through(transaction, &key, written, saga);
                    return Ok(true);
                }
                _ if trusted => {
                    // Decided on a cached row that may be behind: decide on the row.
                    trusted = false;
                    self.sagas.remove(&key);
                    (version, row) = read(transaction, order_id).await?;
                }
                (Some(_), None) => {
                    // Another transaction wrote the row first: roll back and retry.
                    let error = format!("saga {order_id} changed under us (version {version})");
                    return Err(error.into());
                }
                (None, _) => {
                    tracing::debug!(%order_id, input = %input.describe(), "nothing to do for this input");
                    return Ok(false);
                }
            }
        }
    }

    /// What `input` does to the saga at `version` (`row` is `None` before it started):
    /// `None` when it is not for this saga, not due, or changes nothing.
    fn plan(
        &self,
        order_id: Uuid,
        version: i64,
        row: Option<&SagaRow>,
        input: &Input,
        cause: &Cause,
        now: DateTime<Utc>,
    ) -> Option<Planned> {
        let (state, deadline_at, metadata) = match (row, cause) {
            (Some(row), Cause::Message(metadata)) => (&row.state, row.deadline_at, *metadata),
            (Some(row), Cause::Deadline) if row.deadline_at.is_some_and(|at| at <= now) => {
                // Named after the version it fires at: a retried firing sends the
                // same command ids.
                let firing = Uuid::new_v5(&order_id, &version.to_le_bytes());
                (
                    &row.state,
                    row.deadline_at,
                    Metadata::new(row.correlation_id, firing).traced(row.trace),
                )
            }
            (None, Cause::Message(metadata)) if matches!(input, Input::OrderPlaced { .. }) => {
                (&Fulfilment::default(), None, *metadata)
            }
            _ => return None,
        };
        let decision = state.decide(input, now, &self.settings);
        let deadline = match decision.deadline {
            // A deadline that fired is used up, whatever the saga made of it.
            Deadline::Keep if matches!(input, Input::DeadlinePassed) => None,
            Deadline::Keep => deadline_at,
            Deadline::Set(at) => Some(at),
            Deadline::Clear => None,
        };
        if decision.state == *state && decision.commands.is_empty() && deadline == deadline_at {
            return None;
        }
        let (started_at, step_since) = match row {
            Some(row) if row.state.step == decision.state.step => (row.started_at, row.step_since),
            Some(row) => (row.started_at, now),
            None => (now, now),
        };
        let left = row
            .filter(|row| row.state.step != decision.state.step)
            .map(|row| (row.state.step, row.step_since));
        Some(Planned {
            described: decision.commands.iter().map(Command::describe).collect(),
            decision,
            deadline,
            metadata,
            trace: trace::outgoing(metadata.trace),
            started_at,
            step_since,
            left,
        })
    }

    /// Executes the order's own commands on its aggregate and queues the others in the
    /// outbox, with ids derived from the input, so a retried input sends the same ids.
    async fn send(
        &self,
        transaction: &mut StoreTransaction<'_>,
        order_id: Uuid,
        commands: &[Command],
        metadata: Metadata,
    ) -> Result<(), HandlerError> {
        let stream_id = order_stream(order_id);
        let registry = self.aggregates.registry();
        for (index, command) in commands.iter().enumerate() {
            let (target, encoded) = match command {
                Command::Order(command) => {
                    // The consumer holds the stream's lock; an input is retried if
                    // the append conflicts with a stale cached order.
                    self.aggregates
                        .execute_to_write::<Order>(transaction, &stream_id, command, metadata)
                        .await?;
                    continue;
                }
                Command::Stock(request) => ("inventory", registry.encode(request)?),
                Command::Payment(request) => ("payment", registry.encode(request)?),
            };
            let mut outgoing = OutgoingCommand::new(target, &stream_id, encoded, metadata);
            outgoing.command_id = Uuid::new_v5(&metadata.causation_id, &index.to_le_bytes());
            transaction.send_command(&outgoing).await?;
        }
        Ok(())
    }
}

/// A decision that changes the saga, with what goes with it.
struct Planned {
    decision: Decision<Fulfilment, Command>,
    /// The saga's deadline after it.
    deadline: Option<DateTime<Utc>>,
    /// What the commands it sends carry.
    metadata: Metadata,
    /// The step's span (or the trace it continues): stored with the row.
    trace: Option<TraceParent>,
    started_at: DateTime<Utc>,
    /// When the saga entered the step it is in after this decision.
    step_since: DateTime<Utc>,
    /// The step it leaves, and since when it was in it.
    left: Option<(Step, DateTime<Utc>)>,
    /// Its commands as the saga's history and its span show them.
    described: Vec<String>,
}

/// The saga's row at its version, locked; (0, `None`) when it has none.
async fn read(
    transaction: &mut StoreTransaction<'_>,
    order_id: Uuid,
) -> Result<(i64, Option<SagaRow>), HandlerError> {
    let row = sqlx::query(
        "SELECT version, state, deadline_at, correlation_id, traceparent, started_at, \
         step_entered_at FROM sagas \
         WHERE saga_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(transaction.connection())
    .await?;
    let Some(row) = row else {
        return Ok((0, None));
    };
    let state: serde_json::Value = row.try_get("state")?;
    let state: Fulfilment =
        serde_json::from_value(state).map_err(|error| format!("unreadable saga state: {error}"))?;
    let saga = SagaRow {
        state,
        deadline_at: row.try_get("deadline_at")?,
        correlation_id: row.try_get("correlation_id")?,
        trace: trace::stored(&row)?,
        started_at: row.try_get("started_at")?,
        step_since: row.try_get("step_entered_at")?,
    };
    Ok((row.try_get("version")?, Some(saga)))
}

/// Writes the planned state and its history step if the row is still at `version`;
/// the new version, or `None` if another transaction moved the saga first.
async fn write(
    transaction: &mut StoreTransaction<'_>,
    order_id: Uuid,
    version: i64,
    input: &Input,
    planned: &Planned,
    now: DateTime<Utc>,
) -> Result<Option<i64>, HandlerError> {
    let state = &planned.decision.state;
    let commands = &planned.described;
    let state_json =
        serde_json::to_value(state).map_err(|error| format!("cannot store saga state: {error}"))?;
    Ok(sqlx::query_scalar(WRITE_SAGA)
        .bind(order_id)
        .bind(SAGA_TYPE)
        .bind(&state_json)
        .bind(planned.deadline)
        .bind(planned.metadata.correlation_id)
        .bind(version)
        .bind(now)
        .bind(input.describe())
        .bind(state.step.as_str())
        .bind(commands)
        .bind(planned.trace.map(|trace| trace.to_string()))
        .bind(planned.started_at)
        .bind(planned.step_since)
        .fetch_optional(transaction.connection())
        .await?)
}

/// Why a saga takes an input.
enum Cause {
    /// An event, whose metadata the saga's commands carry on.
    Message(Metadata),
    /// Its deadline, if still due once the saga is locked.
    Deadline,
}

/// The order's own events the saga reacts to.
const OWN_INPUTS: [&str; 2] = ["OrderPlaced", "OrderCancellationRequested"];

impl Subscriber for FulfilmentRunner {
    fn wants(&self, event: &RecordedEvent) -> bool {
        OWN_INPUTS.contains(&event.event_type.as_str())
    }

    fn streams_to_lock(&self, event: &RecordedEvent) -> Vec<String> {
        vec![event.stream_id.clone()]
    }

    async fn apply(
        &self,
        event: &RecordedEvent,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let pool = self.aggregates.event_store().pool().clone();
        let decoded: OrderEvent = self
            .aggregates
            .registry()
            .decode_learning(&pool, &event.payload)
            .await?;
        let Some((order_id, input)) = order_input(decoded) else {
            return Ok(());
        };
        let metadata = Metadata::new(event.correlation_id, event.event_id);
        let cause = Cause::Message(metadata.traced(event.traceparent));
        self.step(transaction, order_id, &input, cause)
            .await
            .map(drop)
    }
}

impl Handler for FulfilmentRunner {
    fn streams_to_lock(&self, message: &Message) -> Vec<String> {
        match input_of(message) {
            Ok(Some((order_id, _))) => vec![order_stream(order_id)],
            _ => Vec::new(),
        }
    }

    async fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let Some((order_id, input)) = input_of(message)? else {
            return Ok(());
        };
        let cause = Cause::Message(message.caused_metadata());
        self.step(transaction, order_id, &input, cause)
            .await
            .map(drop)
    }
}

/// The saga input an order event is, and for which order; `None` for the order's other
/// events.
fn order_input(event: OrderEvent) -> Option<(Uuid, Input)> {
    match event {
        OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            lines,
            total_cents,
            currency,
            card_token,
        } => Some((
            order_id,
            Input::OrderPlaced {
                order_id,
                customer_id,
                lines,
                total_cents,
                currency,
                card_token,
            },
        )),
        OrderEvent::OrderCancellationRequested { order_id } => {
            Some((order_id, Input::CancellationRequested))
        }
        _ => None,
    }
}

/// The saga input another service's answer is, and for which order; `None` for events
/// the saga does not react to.
fn input_of(message: &Message) -> Result<Option<(Uuid, Input)>, HandlerError> {
    let service = message.routing_key.split('.').next().unwrap_or_default();
    Ok(match service {
        "inventory" => match message.decode::<ReservationReply>()? {
            ReservationReply::OrderStockReserved { order_id, .. } => {
                Some((order_id, Input::StockReserved))
            }
            ReservationReply::OrderStockUnavailable { order_id, sku, .. } => {
                Some((order_id, Input::StockReservationFailed { sku }))
            }
        },
        "payment" => match message.decode::<PaymentEvent>()? {
            PaymentEvent::PaymentAuthorized { order_id, .. } => {
                Some((order_id, Input::PaymentAuthorized))
            }
            PaymentEvent::PaymentDeclined { order_id, .. } => {
                Some((order_id, Input::PaymentDeclined))
            }
            PaymentEvent::PaymentCaptured { order_id, .. } => {
                Some((order_id, Input::PaymentCaptured))
            }
            PaymentEvent::PaymentCaptureFailed {
                order_id, reason, ..
            } => Some((order_id, Input::PaymentCaptureFailed { reason })),
            _ => None,
        },
        _ => None,
    })
}

fn order_stream(order_id: Uuid) -> String {
    AggregateStore::stream_id::<Order>(order_id)
}

/// A saga as `GET /sagas/{order_id}` shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SagaView {
    pub order_id: Uuid,
    #[cfg_attr(feature = "openapi", schema(example = "order-fulfilment"))]
    pub saga_type: String,
    /// `reserving_stock`, `authorizing_payment`, `capturing`, `completed`, `rejected`
    /// or `cancelled`.
    #[cfg_attr(feature = "openapi", schema(example = "completed"))]
    pub step: String,
    pub version: i64,
    /// Everything the saga keeps: lines, totals, what is reserved, the end reason.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub state: serde_json::Value,
    /// When the pending deadline falls due, if one is pending.
    pub deadline_at: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub history: Vec<StepView>,
}

impl SagaView {
    /// The customer whose order the saga fulfils, as its state records it.
    pub fn customer_id(&self) -> Option<CustomerId> {
        self.state
            .get("customer_id")
            .and_then(|id| id.as_str())
            .and_then(|id| Uuid::parse_str(id).ok())
            .map(CustomerId::new)
    }
}

/// One input that changed the saga.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepView {
    pub version: i64,
    pub at: DateTime<Utc>,
    pub input: String,
    /// Where the saga got to.
    pub step: String,
    /// What it sent, in order.
    pub commands: Vec<String>,
}

/// The saga of `order_id` with its history, oldest step first.
pub async fn find(pool: &PgPool, order_id: OrderId) -> Result<Option<SagaView>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT saga_type, version, state, deadline_at, started_at, updated_at \
         FROM sagas WHERE saga_id = $1",
    )
    .bind(order_id.uuid())
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query_as(
        "SELECT version, at, input, step, commands FROM saga_steps \
         WHERE saga_id = $1 ORDER BY version",
    )
    .bind(order_id.uuid())
    .fetch_all(pool)
    .await?;
    let state: serde_json::Value = row.try_get("state")?;
    Ok(Some(SagaView {
        order_id: order_id.uuid(),
        saga_type: row.try_get("saga_type")?,
        step: state["step"].as_str().unwrap_or_default().to_owned(),
        version: row.try_get("version")?,
        state,
        deadline_at: row.try_get("deadline_at")?,
        started_at: row.try_get("started_at")?,
        updated_at: row.try_get("updated_at")?,
        history,
    }))
}

/// A saga in a listing (`orderflow sagas list`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SagaSummary {
    pub order_id: Uuid,
    pub saga_type: String,
    pub step: String,
    pub version: i64,
    /// Why the order did not confirm, once it ended so.
    pub reason: Option<String>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The orders waiting for stock or payment (their saga has not confirmed, rejected or
/// cancelled them yet), counted no further than `limit` (through the partial index
/// `sagas_open`, which holds only those sagas).
pub async fn orders_in_flight(
    executor: impl sqlx::PgExecutor<'_>,
    limit: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM sagas \
         WHERE state->>'step' IN ('not_started', 'reserving_stock', 'authorizing_payment') \
         LIMIT $1) AS open",
    )
    .bind(limit)
    .fetch_one(executor)
    .await
}

/// The sagas at `step` (any step when `None`), most recently changed first, at most
/// `limit` of them.
pub async fn list(
    pool: &PgPool,
    step: Option<&str>,
    limit: i64,
) -> Result<Vec<SagaSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT saga_id AS order_id, saga_type, state->>'step' AS step, version, \
         state->>'reason' AS reason, deadline_at, started_at, updated_at FROM sagas \
         WHERE $1::text IS NULL OR state->>'step' = $1 \
         ORDER BY updated_at DESC, saga_id LIMIT $2",
    )
    .bind(step)
    .bind(limit)
    .fetch_all(pool)
    .await
}
