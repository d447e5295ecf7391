//! The operator's tools behind `orderflow events`, `replay`, `dlq` and `sagas`. Each
//! returns what it found or did as plain data that serialises to JSON; `main` prints
//! it as text or, with `--json`, one object per line.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use eventstore::dlq::DeadLetter;
use eventstore::{EventStore, RecordedEvent, SchemaRegistry};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, Service};

/// A pool on a service's database, checked by connecting.
pub async fn connect(config: &Config, service: Service) -> anyhow::Result<PgPool> {
    let options = config
        .database(service)?
        .with_context(|| format!("the {service} service has no database"))?;
    let unreachable = || format!("cannot reach the {service} database");
    // One connection first: it fails at once with the real cause, where the pool
    // would retry until its timeout and report only that.
    let probe = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .with_context(unreachable)?;
    let _ = sqlx::Connection::close(probe).await;
    eventstore::db::connect(options, 2)
        .await
        .with_context(unreachable)
}

/// The service whose event store holds a stream, by the aggregate kind its id starts
/// with (`order-…`, `stock-…`, `payment-…`, `user-…`).
pub fn service_of_stream(stream_id: &str) -> Option<Service> {
    let kind = stream_id.split('-').next()?;
    [
        (Service::Order, "order"),
        (Service::Inventory, "stock"),
        (Service::Payment, "payment"),
        (Service::User, "user"),
    ]
    .into_iter()
    .find(|(_, prefix)| *prefix == kind)
    .map(|(service, _)| service)
}

/// An event as the tools show it: its metadata and its data decoded to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub position: i64,
    pub stream_id: String,
    pub version: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub event_id: Uuid,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl fmt::Display for EventView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>20}  {}@{}  {}  {}  {}",
            self.position,
            self.stream_id,
            self.version,
            self.event_type,
            self.recorded_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.data
        )
    }
}

/// Decodes recorded events for display, learning unknown writer schemas from `pool`.
struct Decoder {
    pool: PgPool,
    registry: SchemaRegistry,
}

impl Decoder {
    fn new(pool: PgPool) -> anyhow::Result<Self> {
        let registry = SchemaRegistry::builtin().context("the built-in schemas")?;
        Ok(Decoder { pool, registry })
    }

    async fn view(&self, event: RecordedEvent) -> anyhow::Result<EventView> {
        let (_, data) = self
            .registry
            .decode_json(&self.pool, &event.payload)
            .await
            .with_context(|| {
                format!("event at position {} is unreadable", event.global_position)
            })?;
        Ok(EventView {
            position: event.global_position,
            stream_id: event.stream_id,
            version: event.stream_version,
            event_type: event.event_type,
            event_id: event.event_id,
            correlation_id: event.correlation_id,
            causation_id: event.causation_id,
            recorded_at: event.recorded_at,
            data,
        })
    }
}

/// The events of one stream from version `from` on. The service is found from the
/// stream's id unless given.
pub async fn read_stream(
    config: &Config,
    stream_id: &str,
    from: i64,
    service: Option<Service>,
) -> anyhow::Result<Vec<EventView>> {
    let service = match service.or_else(|| service_of_stream(stream_id)) {
        Some(service) => service,
        None => {
            anyhow::bail!("cannot tell which service stores {stream_id:?}; name it with --service")
        }
    };
    let pool = connect(config, service).await?;
    let store = EventStore::new(pool.clone());
    let decoder = Decoder::new(pool)?;
    let mut views = Vec::new();
    for event in store.read_stream(stream_id, from.max(1), i64::MAX).await? {
        views.push(decoder.view(event).await?);
    }
    Ok(views)
}

/// How often a following tail looks for new events.
const TAIL_POLL: Duration = Duration::from_millis(200);

/// Hands every event of a service's store after position `from` to `each`, in global
/// order; with `follow`, keeps waiting for new ones until `cancel`. Returns how many.
pub async fn tail(
    config: &Config,
    service: Service,
    from: i64,
    follow: bool,
    cancel: &CancellationToken,
    mut each: impl FnMut(EventView) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let pool = connect(config, service).await?;
    let store = EventStore::new(pool.clone());
    let decoder = Decoder::new(pool)?;
    let mut after = from;
    let mut shown = 0;
    // The writer holding the tail back, and since when, once it has been said.
    let mut held_back: Option<(i64, std::time::Instant, bool)> = None;
    while !cancel.is_cancelled() {
        // Following needs the gap-safe read (an event committing late with a lower
        // position must not be passed by); reading to the end once does not.
        let page = if follow {
            let fence = store.fence().await?;
            warn_when_held_back(fence.blocker.as_ref(), &mut held_back);
            store.read_below(after, &fence, 500).await?
        } else {
            store.read_committed(after, 500).await?
        };
        let full = page.len() == 500;
        for event in page {
            after = event.global_position;
            each(decoder.view(event).await?)?;
            shown += 1;
        }
        if full {
            continue;
        }
        if !follow {
            break;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(TAIL_POLL) => {}
        }
    }
    Ok(shown)
}

/// How long a writer may hold a following tail back before the tail says so.
const HELD_BACK_WARNING: Duration = Duration::from_secs(2);

/// Says (once per writer) which open transaction of the store holds a following tail
/// back, so an operator can find it in `pg_stat_activity`.
fn warn_when_held_back(
    blocker: Option<&eventstore::Blocker>,
    held_back: &mut Option<(i64, std::time::Instant, bool)>,
) {
    let Some(blocker) = blocker.filter(|blocker| blocker.events_waiting) else {
        *held_back = None;
        return;
    };
    let (xid, since, said) =
        held_back.get_or_insert((blocker.xid, std::time::Instant::now(), false));
    if *xid != blocker.xid {
        *held_back = Some((blocker.xid, std::time::Instant::now(), false));
        return;
    }
    if !*said && since.elapsed() >= HELD_BACK_WARNING {
        *said = true;
        tracing::warn!(
            xid = blocker.xid,
            pid = blocker.pid,
            application_name = %blocker.application_name,
            "events wait behind an open transaction of this store; see pg_stat_activity"
        );
    }
}

/// A dead letter as the tools show it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    pub id: Option<Uuid>,
    #[serde(rename = "type")]
    pub message_type: Option<String>,
    /// The consumer that gave up on it.
    pub queue: Option<String>,
    pub stream_id: Option<String>,
    pub stream_version: Option<i64>,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    pub parked_behind: Option<Uuid>,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub last_failed_at: Option<DateTime<Utc>>,
    pub routing_key: Option<String>,
    /// The payload decoded to JSON (`dlq show` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(letter: &DeadLetter) -> Self {
        DeadLetterView {
            id: letter.message_id,
            message_type: letter.message_type.clone(),
            queue: letter.queue.clone(),
            stream_id: letter.envelope.as_ref().map(|e| e.stream_id.clone()),
            stream_version: letter.envelope.as_ref().and_then(|e| e.stream_version),
            error: letter.error.clone(),
            attempts: letter.attempts,
            parked_behind: letter.parked_behind,
            first_failed_at: letter.first_failed_at,
            last_failed_at: letter.last_failed_at,
            routing_key: letter.routing_key.clone(),
            data: None,
        }
    }
}

impl fmt::Display for DeadLetterView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
        write!(
            f,
            "{}  {}  {}@{}  {}  attempts {}  last failed {}: {}",
            or_dash(self.id.map(|id| id.to_string())),
            or_dash(self.message_type.clone()),
            or_dash(self.stream_id.clone()),
            or_dash(self.stream_version.map(|v| v.to_string())),
            or_dash(self.queue.clone()),
            or_dash(self.attempts.map(|a| a.to_string())),
            or_dash(self.last_failed_at.map(|at| at.to_rfc3339())),
            or_dash(self.error.clone()),
        )?;
        if let Some(behind) = self.parked_behind {
            write!(f, " (parked behind {behind})")?;
        }
        Ok(())
    }
}

/// Every dead letter of a service.
pub async fn dead_letters(config: &Config, service: Service) -> anyhow::Result<Vec<DeadLetter>> {
    eventstore::dlq::list(&config.amqp_url, service.name())
        .await
        .with_context(|| format!("cannot read the {service} dead-letter queue"))
}

/// One dead letter, with its payload decoded (from the service's own schemas and
/// registry table).
pub async fn dead_letter(
    config: &Config,
    service: Service,
    id: Uuid,
) -> anyhow::Result<Option<DeadLetterView>> {
    let letters = dead_letters(config, service).await?;
    let pool = connect(config, service).await?;
    let parked = parked_in(&pool, service).await?;
    let (mut view, payload) = match letters.iter().find(|letter| letter.message_id == Some(id)) {
        Some(letter) => (DeadLetterView::from(letter), letter.payload.clone()),
        None => match parked.iter().find(|parked| parked.event.event_id == id) {
            Some(parked) => (DeadLetterView::from(parked), parked.event.payload.clone()),
            None => return Ok(None),
        },
    };
    let registry = SchemaRegistry::builtin().context("the built-in schemas")?;
    view.data = Some(match registry.decode_json(&pool, &payload).await {
        Ok((_, data)) => data,
        Err(error) => serde_json::json!({ "undecodable": error.to_string() }),
    });
    Ok(Some(view))
}

impl From<&eventstore::subscription::ParkedEvent> for DeadLetterView {
    fn from(parked: &eventstore::subscription::ParkedEvent) -> Self {
        let event = &parked.event;
        DeadLetterView {
            id: Some(event.event_id),
            message_type: Some(event.event_type.clone()),
            queue: Some(parked.subscription.clone()),
            stream_id: Some(event.stream_id.clone()),
            stream_version: Some(event.stream_version),
            error: parked.error.clone(),
            // The event its stream waits for failed every attempt; one parked behind it
            // was never tried.
            attempts: Some(if parked.parked_behind.is_none() { 3 } else { 0 }),
            parked_behind: parked.parked_behind,
            first_failed_at: parked.parked_at,
            last_failed_at: parked.parked_at,
            routing_key: None,
            data: None,
        }
    }
}

/// The subscriptions on a service's own store, by name.
pub fn subscriptions(service: Service) -> Vec<String> {
    match service {
        Service::Gateway | Service::Notification => Vec::new(),
        Service::Order => vec![
            projections::queue("order"),
            sagas::runner::FulfilmentRunner::subscription_config().name,
        ],
        service => vec![projections::queue(service.name())],
    }
}

/// Events parked for a service's subscriptions: the one each stream waits for first,
/// then those behind it.
pub async fn parked_events(
    config: &Config,
    service: Service,
) -> anyhow::Result<Vec<eventstore::subscription::ParkedEvent>> {
    parked_in(&connect(config, service).await?, service).await
}

/// [`parked_events`] on a pool the caller has.
async fn parked_in(
    pool: &PgPool,
    service: Service,
) -> anyhow::Result<Vec<eventstore::subscription::ParkedEvent>> {
    let names = subscriptions(service);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Ok(eventstore::subscription::parked_events(pool, &names).await?)
}

/// What `orderflow dlq replay|purge` did with a service's parked events.
#[derive(Debug, Default)]
pub struct ParkedOutcome {
    /// Replayed or skipped.
    pub done: Vec<eventstore::subscription::ParkedEvent>,
    /// Selected but left parked, and why.
    pub left: Vec<(eventstore::subscription::ParkedEvent, String)>,
}

/// Replays parked streams of a service's subscriptions in order, with the subscriber
/// the service runs (every parked stream, or the one whose event `id` is): a stream's
/// events apply together or, if one fails again, not at all.
pub async fn replay_parked(
    config: &Config,
    service: Service,
    id: Option<Uuid>,
    dry_run: bool,
) -> anyhow::Result<ParkedOutcome> {
    let pool = connect(config, service).await?;
    let store = EventStore::new(pool.clone());
    let registry = SchemaRegistry::builtin().context("the built-in schemas")?;
    let mut outcome = ParkedOutcome::default();
    let parked = parked_in(&pool, service).await?;
    let mut streams: Vec<(String, String)> = Vec::new();
    for event in &parked {
        if id.is_some_and(|id| id != event.event.event_id) {
            continue;
        }
        if let (Some(_), Some(behind)) = (id, event.parked_behind) {
            let why = format!("it waits behind {behind}: replay that one, which brings it along");
            outcome.left.push((event.clone(), why));
            continue;
        }
        let key = (event.subscription.clone(), event.event.stream_id.clone());
        if !streams.contains(&key) {
            streams.push(key);
        }
    }
    for (name, stream) in streams {
        let events: Vec<_> = parked
            .iter()
            .filter(|p| p.subscription == name && p.event.stream_id == stream)
            .cloned()
            .collect();
        if dry_run {
            outcome.done.extend(events);
            continue;
        }
        match replay_stream(config, &store, &registry, &pool, &name, &stream).await {
            Ok(_) => outcome.done.extend(events),
            Err(error) => {
                let why = error.to_string();
                outcome
                    .left
                    .extend(events.into_iter().map(|e| (e, why.clone())));
            }
        }
    }
    Ok(outcome)
}

/// Lets parked streams move on without their events (every parked event, or the one
/// `id` names): `orderflow dlq purge`.
pub async fn skip_parked(
    config: &Config,
    service: Service,
    id: Option<Uuid>,
    dry_run: bool,
) -> anyhow::Result<ParkedOutcome> {
    let pool = connect(config, service).await?;
    let mut outcome = ParkedOutcome::default();
    for parked in parked_in(&pool, service).await? {
        if id.is_some_and(|id| id != parked.event.event_id) {
            continue;
        }
        if !dry_run {
            eventstore::parking::forget(
                &pool,
                &parked.subscription,
                &parked.event.stream_id,
                parked.event.event_id,
            )
            .await?;
        }
        outcome.done.push(parked);
    }
    Ok(outcome)
}

/// Replays one parked stream of the subscription `name` with the subscriber the
/// service runs under that name.
async fn replay_stream(
    config: &Config,
    store: &EventStore,
    registry: &SchemaRegistry,
    pool: &PgPool,
    name: &str,
    stream: &str,
) -> Result<usize, eventstore::HandlerError> {
    use eventstore::subscription::replay_parked;
    use projections::Runner;
    let (registry, pool) = (registry.clone(), pool.clone());
    match name {
        "order.fulfilment-saga" => {
            let aggregates = eventstore::AggregateStore::new(store.clone(), registry);
            let settings = sagas::fulfilment::Settings {
                payment_deadline: config.payment_deadline,
                capture_retry: config.capture_retry,
            };
            let saga = sagas::runner::FulfilmentRunner::new(aggregates, settings);
            replay_parked(store, &saga, name, stream).await
        }
        "order.read-models" => {
            let models = (
                projections::order::OrderSummaries,
                projections::order::CustomerOrders,
            );
            replay_parked(store, &Runner::new(models, registry, pool), name, stream).await
        }
        "inventory.read-models" => {
            let models = projections::inventory::StockLevels;
            replay_parked(store, &Runner::new(models, registry, pool), name, stream).await
        }
        "payment.read-models" => {
            let models = projections::payment::PaymentStatuses;
            replay_parked(store, &Runner::new(models, registry, pool), name, stream).await
        }
        "user.read-models" => {
            let models = projections::user::UserProfiles;
            replay_parked(store, &Runner::new(models, registry, pool), name, stream).await
        }
        other => Err(format!("no subscription is called {other:?}").into()),
    }
}

/// What `orderflow users grant|revoke` did.
#[derive(Debug, Clone, Serialize)]
pub struct RoleChange {
    pub user_id: Uuid,
    pub email: String,
    pub role: &'static str,
    /// Whether the user has the role now.
    pub granted: bool,
    /// Whether anything was recorded (false when the user already was so).
    pub changed: bool,
    /// The user stream's version afterwards.
    pub version: i64,
}

impl fmt::Display for RoleChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (now, already) = match self.granted {
            true => ("is now", "already was"),
            false => ("is no longer", "already was not"),
        };
        let verb = if self.changed { now } else { already };
        write!(
            f,
            "{} ({}) {verb} {}; tokens issued from the next log-in carry it",
            self.email, self.user_id, self.role
        )
    }
}

/// Grants or revokes a role of the user named by e-mail address or id, as an event
/// on the user's stream (so it is audited, published and projected like any change).
pub async fn set_role(
    config: &Config,
    user: &str,
    role: domain::user::Role,
    grant: bool,
) -> anyhow::Result<RoleChange> {
    use domain::user::{User, UserCommand};
    let pool = connect(config, Service::User).await?;
    let user_id = match Uuid::parse_str(user.trim()) {
        Ok(user_id) => user_id,
        Err(_) => sqlx::query_scalar("SELECT user_id FROM user_emails WHERE email = $1")
            .bind(user.trim().to_ascii_lowercase())
            .fetch_optional(&pool)
            .await
            .context("cannot look the user up")?
            .with_context(|| format!("no user has the e-mail address {user:?}"))?,
    };
    let registry = SchemaRegistry::builtin().context("the built-in schemas")?;
    let store = crate::serve::published_by(Service::User, EventStore::new(pool));
    let aggregates = eventstore::AggregateStore::new(store, registry);
    let command = match grant {
        true => UserCommand::GrantRole(role),
        false => UserCommand::RevokeRole(role),
    };
    let stream_id = eventstore::AggregateStore::stream_id::<User>(user_id);
    let command_id = Uuid::now_v7();
    let metadata = eventstore::Metadata::new(command_id, command_id);
    let executed = aggregates
        .execute::<User>(&stream_id, None, &command, metadata)
        .await
        .map_err(|error| match error {
            eventstore::ExecuteError::Domain(domain::user::UserError::NotFound) => {
                anyhow::anyhow!("no user {user_id}")
            }
            other => anyhow::Error::new(other).context("cannot record the change"),
        })?;
    Ok(RoleChange {
        user_id,
        email: executed.state.email.clone(),
        role: role.as_str(),
        granted: grant,
        changed: !executed.events.is_empty(),
        version: executed.version,
    })
}

/// One link of an order's causal chain: an event, a command or a notification, where
/// it was recorded and what caused it.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// The event id, command id or notification id.
    pub id: Uuid,
    pub at: DateTime<Utc>,
    /// The service whose store holds it.
    #[serde(serialize_with = "service_name")]
    pub service: Service,
    /// `event`, `command` or `notification`.
    pub kind: &'static str,
    /// The event or command type, or the notification's channel and kind.
    pub name: String,
    /// Its stream and version, the command's target, or whether it was sent.
    pub detail: String,
    pub correlation_id: Option<Uuid>,
    /// The command, event or request that caused it.
    pub causation_id: Option<Uuid>,
    /// The W3C trace it was written in (find it in Jaeger by this id).
    pub trace_id: Option<String>,
}

/// An order's causal chain, as the stores hold it (no trace collector needed).
#[derive(Debug, Clone, Serialize)]
pub struct OrderTrace {
    pub order_id: Uuid,
    /// The conversations the order's events belong to (placing it, cancelling it, …).
    pub correlation_ids: Vec<Uuid>,
    /// Every link found, oldest first.
    pub links: Vec<Link>,
    /// What could not be read (a store that is unreachable), so the chain is partial.
    pub gaps: Vec<String>,
}

/// Collects `order_id`'s causal chain from every store on its path: the order's events
/// and the commands the order service queued; the stock events and replies of its
/// items; its payment's events and replies; the notifications about it.
pub async fn trace(config: &Config, order_id: Uuid) -> anyhow::Result<OrderTrace> {
    use domain::ids::OrderId;
    use domain::inventory::{ReservationReply, StockItem};
    use domain::order::Order;
    use domain::payment::Payment;
    use eventstore::AggregateStore;

    let orders = connect(config, Service::Order).await?;
    let stream = AggregateStore::stream_id::<Order>(order_id);
    let events = EventStore::new(orders.clone())
        .read_stream(&stream, 1, i64::MAX)
        .await?;
    anyhow::ensure!(!events.is_empty(), "no order {order_id}");
    let mut correlation_ids: Vec<Uuid> = Vec::new();
    for event in &events {
        if !correlation_ids.contains(&event.correlation_id) {
            correlation_ids.push(event.correlation_id);
        }
    }
    // The items' streams, from the order as placed, and the reservation's answer.
    let decoder = Decoder::new(orders.clone())?;
    let placed = decoder.view(events[0].clone()).await?;
    let mut stock: Vec<String> = placed.data["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|line| line["sku"].as_str())
        .map(AggregateStore::stream_id::<StockItem>)
        .collect();
    stock.push(ReservationReply::stream_id(OrderId::new(order_id)));
    let mut trace = OrderTrace {
        order_id,
        correlation_ids: correlation_ids.clone(),
        links: events
            .into_iter()
            .map(|event| event_link(Service::Order, event))
            .collect(),
        gaps: Vec::new(),
    };
    let payment = vec![AggregateStore::stream_id::<Payment>(order_id)];
    for (service, streams) in [
        (Service::Order, Vec::new()),
        (Service::Inventory, stock),
        (Service::Payment, payment),
    ] {
        let found = async {
            let pool = connect(config, service).await?;
            let mut links = Vec::new();
            if !streams.is_empty() {
                let events =
                    eventstore::store::read_correlated(&pool, &streams, &correlation_ids).await?;
                links.extend(events.into_iter().map(|event| event_link(service, event)));
            }
            let commands = eventstore::store::queued_commands(&pool, &correlation_ids).await?;
            links.extend(commands.into_iter().map(|command| Link {
                id: command.command_id,
                at: command.enqueued_at,
                service,
                kind: "command",
                name: command.command_type,
                detail: format!(
                    "→ {} ({})",
                    command.target_service,
                    if command.published_at.is_some() {
                        "sent"
                    } else {
                        "queued"
                    }
                ),
                correlation_id: Some(command.correlation_id),
                causation_id: Some(command.causation_id),
                trace_id: command.traceparent.map(|t| t.trace_id.to_string()),
            }));
            anyhow::Ok(links)
        };
        match found.await {
            Ok(links) => trace.links.extend(links),
            Err(error) => trace.gaps.push(format!("{service}: {error:#}")),
        }
    }
    let notified = async {
        let pool = connect(config, Service::Notification).await?;
        anyhow::Ok(crate::notifications::about_order(&pool, order_id).await?)
    };
    match notified.await {
        Ok(notifications) => trace.links.extend(notifications.into_iter().map(|n| {
            Link {
                id: n.id,
                at: n.created_at,
                service: Service::Notification,
                kind: "notification",
                name: format!("{} {}", n.channel, n.kind),
                detail: match n.sent_at {
                    Some(at) => format!("sent {}", at.format("%H:%M:%S%.3f")),
                    None => format!("not sent yet ({} attempts)", n.attempts),
                },
                correlation_id: None,
                causation_id: Some(n.trigger_event_id),
                trace_id: n
                    .traceparent
                    .as_deref()
                    .and_then(eventstore::trace::TraceParent::parse)
                    .map(|t| t.trace_id.to_string()),
            }
        })),
        Err(error) => trace.gaps.push(format!("notification: {error:#}")),
    }
    trace.links.sort_by_key(|link| (link.at, link.id));
    Ok(trace)
}

fn service_name<S: serde::Serializer>(service: &Service, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(service.name())
}

fn event_link(service: Service, event: RecordedEvent) -> Link {
    Link {
        id: event.event_id,
        at: event.recorded_at,
        service,
        kind: "event",
        name: event.event_type,
        detail: format!("{} v{}", event.stream_id, event.stream_version),
        correlation_id: Some(event.correlation_id),
        causation_id: Some(event.causation_id),
        trace_id: event.traceparent.map(|t| t.trace_id.to_string()),
    }
}
