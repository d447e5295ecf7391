//! The notification service: who is told what when an order ends or a user registers,
//! and the delivery of it through (simulated) e-mail, SMS and push providers.
//!
//! - [`Planner`]: a consumer of order outcomes and user events. In the transaction that
//!   records the event as consumed, it keeps its own copy of each user's address and
//!   channel preferences, and writes one `notifications` row per triggering event and
//!   channel the user wants (the table's unique key makes a redelivery add nothing).
//! - [`Sender`]: delivers pending notifications through each channel's provider,
//!   behind a circuit breaker per channel (one loop per channel, so a slow provider
//!   holds up only its own), retrying failures with backoff until they go through;
//!   each row is leased while it is tried (a provider gets a third of the lease to
//!   answer, and every update checks the lease is still held), so instances do not
//!   send one twice, and the provider gets the notification id as an idempotency key
//!   for the case where a sender dies between the provider's answer and recording it.
//! - [`Providers`]: the simulated providers, which tests (and operators trying the
//!   system) can make slow or failing through `PUT /providers/{channel}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::order::OrderEvent;
use domain::user::{NotificationPreferences, UserEvent};
use eventstore::metrics::HistogramFamily;
use eventstore::trace::{self, TraceParent};
use eventstore::{ConsumerConfig, Handler, HandlerError, Message, Metrics, StoreTransaction};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::breaker::{Breaker, BreakerMetrics};

/// A way to reach a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
    Push,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Sms, Channel::Push];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Push => "push",
        }
    }

    pub fn parse(text: &str) -> Option<Channel> {
        Channel::ALL
            .into_iter()
            .find(|channel| channel.as_str() == text)
    }

    fn chosen(preferences: NotificationPreferences) -> Vec<Channel> {
        [
            (Channel::Email, preferences.email),
            (Channel::Sms, preferences.sms),
            (Channel::Push, preferences.push),
        ]
        .into_iter()
        .filter_map(|(channel, wanted)| wanted.then_some(channel))
        .collect()
    }
}

/// Decides the notifications (see the module documentation).
pub struct Planner {
    /// Woken after a commit that planned notifications.
    pub sender: Arc<Notify>,
}

impl Planner {
    /// Its consumer, bound to exactly the events it reacts to.
    pub fn config(amqp_url: &str) -> ConsumerConfig {
        ConsumerConfig::events(
            "notification",
            "planner",
            amqp_url,
            &[
                "order.OrderConfirmed",
                "order.OrderRejected",
                "order.OrderCancelled",
                "user.UserRegistered",
                "user.ProfileChanged",
                "user.NotificationPreferencesChanged",
            ],
        )
    }
}

/// What the planner does for one event it consumed.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Keep the user's channels, and the address and name when given (`contact`).
    Remember {
        user_id: Uuid,
        contact: Option<(String, String)>,
        preferences: NotificationPreferences,
    },
    /// Keep the user's new name.
    Rename { user_id: Uuid, name: String },
    /// Tell the user something, on every channel they want.
    Notify {
        user_id: Uuid,
        order_id: Option<Uuid>,
        kind: &'static str,
        text: String,
    },
}

/// An event the planner consumes.
#[derive(Debug, Clone)]
enum Consumed {
    User(UserEvent),
    Order(OrderEvent),
}

/// Which notifications an event causes, and what it teaches about its user: a pure
/// choice, in the order the steps must be taken (a new user is remembered before being
/// welcomed, so the welcome goes to the channels just recorded).
fn steps(event: Consumed) -> Vec<Step> {
    let order_ended = |order_id: Uuid, customer_id: Uuid, kind, text| {
        vec![Step::Notify {
            user_id: customer_id,
            order_id: Some(order_id),
            kind,
            text,
        }]
    };
    match event {
        Consumed::User(UserEvent::UserRegistered {
            user_id,
            email,
            name,
            ..
        }) => {
            let text = format!("Welcome to orderflow, {name}!");
            vec![
                Step::Remember {
                    user_id,
                    contact: Some((email, name)),
                    preferences: NotificationPreferences::default(),
                },
                Step::Notify {
                    user_id,
                    order_id: None,
                    kind: "welcome",
                    text,
                },
            ]
        }
        Consumed::User(UserEvent::ProfileChanged { user_id, name }) => {
            vec![Step::Rename { user_id, name }]
        }
        Consumed::User(UserEvent::NotificationPreferencesChanged {
            user_id,
            preferences,
        }) => vec![Step::Remember {
            user_id,
            contact: None,
            preferences,
        }],
        // Roles concern access, not what a user is told.
        Consumed::User(UserEvent::RoleGranted { .. } | UserEvent::RoleRevoked { .. }) => vec![],
        Consumed::Order(OrderEvent::OrderConfirmed {
            order_id,
            customer_id,
            total_cents,
        }) => order_ended(
            order_id,
            customer_id,
            "order_confirmed",
            format!("Your order {order_id} is confirmed ({total_cents} cents)."),
        ),
        Consumed::Order(OrderEvent::OrderRejected {
            order_id,
            customer_id,
            reason,
            ..
        }) => order_ended(
            order_id,
            customer_id,
            "order_rejected",
            format!("Your order {order_id} was rejected: {}.", reason.as_str()),
        ),
        Consumed::Order(OrderEvent::OrderCancelled {
            order_id,
            customer_id,
            reason,
            ..
        }) => order_ended(
            order_id,
            customer_id,
            "order_cancelled",
            format!("Your order {order_id} was cancelled: {}.", reason.as_str()),
        ),
        // An order still under way tells nobody anything.
        Consumed::Order(_) => vec![],
    }
}

impl Handler for Planner {
    async fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let trigger = message.envelope.message_id;
        let version = message.envelope.stream_version.unwrap_or(0);
        let connection = transaction.connection();
        let event = match message.routing_key.split('.').next().unwrap_or_default() {
            "user" => Consumed::User(message.decode()?),
            "order" => Consumed::Order(message.decode()?),
            _ => return Ok(()),
        };
        for step in steps(event) {
            match step {
                Step::Remember {
                    user_id,
                    contact,
                    preferences,
                } => {
                    let contact = contact.as_ref().map(|(e, n)| (e.as_str(), n.as_str()));
                    remember(connection, user_id, contact, preferences, version).await?;
                }
                Step::Rename { user_id, name } => {
                    sqlx::query(
                        "UPDATE notification_recipients SET name = $2, version = $3 \
                         WHERE user_id = $1 AND version < $3",
                    )
                    .bind(user_id)
                    .bind(name)
                    .bind(version)
                    .execute(&mut *connection)
                    .await?;
                }
                Step::Notify {
                    user_id,
                    order_id,
                    kind,
                    text,
                } => {
                    // The sender continues the trace of the event that planned it.
                    let trace = trace::outgoing(message.envelope.trace);
                    plan(connection, trigger, user_id, order_id, kind, &text, trace).await?
                }
            }
        }
        Ok(())
    }

    fn committed(&self, _message: &Message) {
        // Every channel's loop that waits; a busy one finds the rows on its next look.
        self.sender.notify_waiters();
    }
}

/// Records what the service knows of a user: the address and name (when given) and the
/// channels, unless a later version of the user is already recorded.
async fn remember(
    connection: &mut PgConnection,
    user_id: Uuid,
    contact: Option<(&str, &str)>,
    preferences: NotificationPreferences,
    version: i64,
) -> Result<(), sqlx::Error> {
    let (email, name) = contact.unzip();
    sqlx::query(
        "INSERT INTO notification_recipients \
         (user_id, email, name, notify_email, notify_sms, notify_push, version) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (user_id) DO UPDATE SET email = coalesce(excluded.email, notification_recipients.email), \
         name = coalesce(excluded.name, notification_recipients.name), \
         notify_email = excluded.notify_email, notify_sms = excluded.notify_sms, \
         notify_push = excluded.notify_push, version = excluded.version \
         WHERE notification_recipients.version < excluded.version",
    )
    .bind(user_id)
    .bind(email)
    .bind(name)
    .bind(preferences.email)
    .bind(preferences.sms)
    .bind(preferences.push)
    .bind(version)
    .execute(connection)
    .await?;
    Ok(())
}

/// Writes one pending notification per channel the user wants (e-mail when the user is
/// not known here yet); named after the triggering event and the channel, so a second
/// delivery of the event writes nothing.
async fn plan(
    connection: &mut PgConnection,
    trigger: Uuid,
    user_id: Uuid,
    order_id: Option<Uuid>,
    kind: &str,
    text: &str,
    trace: Option<TraceParent>,
) -> Result<(), sqlx::Error> {
    let known: Option<(bool, bool, bool)> = sqlx::query_as(
        "SELECT notify_email, notify_sms, notify_push FROM notification_recipients \
         WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(&mut *connection)
    .await?;
    let preferences = known.map_or_else(NotificationPreferences::default, |(email, sms, push)| {
        NotificationPreferences { email, sms, push }
    });
    for channel in Channel::chosen(preferences) {
        sqlx::query(
            "INSERT INTO notifications (notification_id, trigger_event_id, user_id, order_id, \
             channel, kind, message, traceparent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT DO NOTHING",
        )
        .bind(Uuid::new_v5(&trigger, channel.as_str().as_bytes()))
        .bind(trigger)
        .bind(user_id)
        .bind(order_id)
        .bind(channel.as_str())
        .bind(kind)
        .bind(text)
        .bind(trace.map(|trace| trace.to_string()))
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// How a simulated provider behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Mode {
    /// Takes every message at once.
    Ok,
    /// Refuses every message (the provider is down).
    Failing,
    /// Takes every message after `delay_ms`.
    Slow { delay_ms: u64 },
}

/// One channel's simulated provider, and the breaker in front of it.
#[derive(Debug)]
pub struct Provider {
    mode: Mutex<Mode>,
    pub breaker: Breaker,
    /// Notification ids taken, and how often each was offered (a real provider keys
    /// on the id we send as an idempotency key, and sends each message once).
    delivered: Mutex<HashMap<Uuid, u32>>,
    refused: AtomicU64,
}

/// What a provider reports about itself (`GET /providers`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderView {
    pub channel: Channel,
    #[serde(flatten)]
    pub mode: Mode,
    /// `closed`, `open` or `half-open`.
    pub breaker: &'static str,
    /// Distinct messages delivered to users.
    pub delivered: usize,
    /// Offers of a message already delivered (answered without sending it again).
    pub repeated: u64,
    /// Offers refused while failing.
    pub refused: u64,
}

/// The three simulated providers.
#[derive(Debug)]
pub struct Providers {
    channels: HashMap<Channel, Provider>,
    /// `orderflow_provider_call_seconds`.
    calls: HistogramFamily,
}

/// Consecutive failures that open a provider's breaker, and for how long.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(2);

impl Providers {
    /// The providers, their breakers and calls reported in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let breakers = BreakerMetrics::new(metrics);
        let calls = crate::telemetry::provider_calls(metrics);
        let channels = Channel::ALL
            .into_iter()
            .map(|channel| {
                let breaker = Breaker::new(BREAKER_THRESHOLD, BREAKER_OPEN_FOR)
                    .observed(&breakers, format!("provider:{}", channel.as_str()));
                let provider = Provider {
                    mode: Mutex::new(Mode::Ok),
                    breaker,
                    delivered: Mutex::default(),
                    refused: AtomicU64::new(0),
                };
                (channel, provider)
            })
            .collect();
        Providers { channels, calls }
    }

    pub fn provider(&self, channel: Channel) -> &Provider {
        &self.channels[&channel]
    }

    pub fn set_mode(&self, channel: Channel, mode: Mode) {
        *lock(&self.provider(channel).mode) = mode;
    }

    pub fn view(&self, channel: Channel) -> ProviderView {
        let provider = self.provider(channel);
        let delivered = lock(&provider.delivered);
        ProviderView {
            channel,
            mode: *lock(&provider.mode),
            breaker: provider.breaker.state(),
            delivered: delivered.len(),
            repeated: delivered.values().map(|offers| u64::from(offers - 1)).sum(),
            refused: provider.refused.load(Ordering::Relaxed),
        }
    }

    /// Offers a message to the channel's provider.
    async fn send(&self, channel: Channel, id: Uuid) -> Result<(), String> {
        let provider = self.provider(channel);
        let mode = *lock(&provider.mode);
        match mode {
            Mode::Failing => {
                provider.refused.fetch_add(1, Ordering::Relaxed);
                return Err(format!("the {} provider is unavailable", channel.as_str()));
            }
            Mode::Slow { delay_ms } => tokio::time::sleep(Duration::from_millis(delay_ms)).await,
            Mode::Ok => {}
        }
        *lock(&provider.delivered).entry(id).or_default() += 1;
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Delivers pending notifications (see the module documentation).
pub struct Sender {
    pub pool: PgPool,
    pub providers: Arc<Providers>,
    pub wake: Arc<Notify>,
}

/// Notifications tried at once.
const SEND_BATCH: i64 = 50;
/// How long a sender holds a notification it is trying.
const LEASE: Duration = Duration::from_secs(30);
/// How often it looks for due retries when nothing wakes it.
const SEND_POLL: Duration = Duration::from_millis(200);

/// How long a provider may take with one message: well inside the lease, so a
/// notification is never tried by two senders at once.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// A notification a sender holds: its lease is the `next_attempt_at` it set, and
/// every later update of the row checks it still holds that lease.
struct Leased {
    id: Uuid,
    attempts: i32,
    lease: chrono::DateTime<chrono::Utc>,
}

impl Sender {
    /// One loop per channel, so a slow or failing provider holds up only its own.
    pub async fn run(self, cancel: CancellationToken) {
        let sender = Arc::new(self);
        let loops = Channel::ALL.map(|channel| sender.clone().run_channel(channel, cancel.clone()));
        futures_util::future::join_all(loops).await;
    }

    async fn run_channel(self: Arc<Self>, channel: Channel, cancel: CancellationToken) {
        let mut failing_since = None;
        loop {
            let pause = match self.send_due(channel).await {
                Ok(0) => SEND_POLL,
                Ok(_) => Duration::ZERO,
                Err(error) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    tracing::warn!(%error, channel = channel.as_str(), "cannot send notifications; retrying");
                    SEND_POLL.max(since.elapsed().min(Duration::from_secs(5)))
                }
            };
            if pause.is_zero() {
                failing_since = None;
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Tries the channel's due notifications, unless its breaker is open; returns how
    /// many it tried.
    pub async fn send_due(&self, channel: Channel) -> Result<usize, sqlx::Error> {
        if self.providers.provider(channel).breaker.retry_in() > Duration::ZERO {
            return Ok(0);
        }
        let due = sqlx::query(
            "UPDATE notifications SET next_attempt_at = now() + make_interval(secs => $1) \
             WHERE notification_id IN (SELECT notification_id FROM notifications \
               WHERE sent_at IS NULL AND next_attempt_at <= now() AND channel = $2 \
               ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING notification_id, attempts, next_attempt_at, traceparent",
        )
        .bind(LEASE.as_secs_f64())
        .bind(channel.as_str())
        .bind(SEND_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let mut tries = Vec::with_capacity(due.len());
        for row in &due {
            let leased = Leased {
                id: row.try_get("notification_id")?,
                attempts: row.try_get("attempts")?,
                lease: row.try_get("next_attempt_at")?,
            };
            let parent = trace::stored(row)?;
            let span = tracing::info_span!(
                "notify",
                otel.kind = "client",
                otel.name = %format_args!("send {}", channel.as_str()),
                orderflow.service = "notification",
                notification_id = %leased.id,
                channel = channel.as_str(),
                attempt = leased.attempts + 1,
                breaker.state = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            trace::continue_trace(&span, parent, None);
            tries.push(self.try_one(leased, channel).instrument(span));
        }
        for outcome in futures_util::future::join_all(tries).await {
            outcome?;
        }
        Ok(due.len())
    }

    async fn try_one(&self, leased: Leased, channel: Channel) -> Result<(), sqlx::Error> {
        let breaker = &self.providers.provider(channel).breaker;
        tracing::Span::current().record("breaker.state", breaker.state());
        if !breaker.allow() {
            // Open: back when the breaker lets a probe through.
            let wait = breaker.retry_in().max(Duration::from_millis(50));
            return self.retry_later(&leased, leased.attempts, wait, None).await;
        }
        let started = std::time::Instant::now();
        let sent = tokio::time::timeout(PROVIDER_TIMEOUT, self.providers.send(channel, leased.id))
            .await
            .unwrap_or_else(|_| Err(format!("the {} provider did not answer", channel.as_str())));
        crate::telemetry::provider_call(
            &self.providers.calls,
            channel.as_str(),
            "send",
            sent.is_ok(),
            started.elapsed(),
        );
        match sent {
            Ok(()) => {
                breaker.success();
                sqlx::query(
                    "UPDATE notifications SET sent_at = now(), attempts = attempts + 1, \
                     last_error = NULL WHERE notification_id = $1 AND next_attempt_at = $2",
                )
                .bind(leased.id)
                .bind(leased.lease)
                .execute(&self.pool)
                .await?;
                Ok(())
            }
            Err(error) => {
                breaker.failure();
                let backoff = Duration::from_millis(100)
                    .saturating_mul(2u32.saturating_pow(leased.attempts.clamp(0, 20) as u32))
                    .min(Duration::from_secs(30));
                self.retry_later(&leased, leased.attempts + 1, backoff, Some(&error))
                    .await
            }
        }
    }

    /// Gives the lease up until `wait` from now, unless it was lost meanwhile.
    async fn retry_later(
        &self,
        leased: &Leased,
        attempts: i32,
        wait: Duration,
        error: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE notifications SET attempts = $2, last_error = coalesce($3, last_error), \
             next_attempt_at = now() + make_interval(secs => $4) \
             WHERE notification_id = $1 AND next_attempt_at = $5 AND sent_at IS NULL",
        )
        .bind(leased.id)
        .bind(attempts)
        .bind(error)
        .bind(wait.as_secs_f64())
        .bind(leased.lease)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// A notification as `GET /notifications` shows it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct NotificationView {
    pub id: Uuid,
    pub user_id: Uuid,
    /// The order it is about, if any.
    pub order_id: Option<Uuid>,
    #[schema(example = "email")]
    pub channel: String,
    /// `order_confirmed`, `order_rejected`, `order_cancelled` or `welcome`.
    #[schema(example = "order_confirmed")]
    pub kind: String,
    pub sent_at: chrono::DateTime<chrono::Utc>,
}

/// A notification about an order, sent or not, as `orderflow trace` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OrderNotification {
    pub id: Uuid,
    pub trigger_event_id: Uuid,
    pub channel: String,
    pub kind: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
    pub attempts: i32,
    pub traceparent: Option<String>,
}

/// The notifications planned about an order, oldest first.
pub async fn about_order(
    pool: &PgPool,
    order_id: Uuid,
) -> Result<Vec<OrderNotification>, sqlx::Error> {
    sqlx::query_as(
        "SELECT notification_id AS id, trigger_event_id, channel, kind, created_at, sent_at, \
         attempts, traceparent FROM notifications WHERE order_id = $1 \
         ORDER BY created_at, notification_id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
}

/// The notifications sent to a user, newest first.
pub async fn sent_to(
    pool: &PgPool,
    user_id: Uuid,
    limit: i64,
) -> Result<Vec<NotificationView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT notification_id AS id, user_id, order_id, channel, kind, sent_at \
         FROM notifications WHERE user_id = $1 AND sent_at IS NOT NULL \
         ORDER BY sent_at DESC, notification_id LIMIT $2",
    )
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use domain::order::{EndReason, OrderEvent};
    use domain::user::{NotificationPreferences, Role, UserEvent};
    use uuid::Uuid;

    use super::{Consumed, Step, steps};

    fn notified(steps: &[Step]) -> Vec<(Uuid, Option<Uuid>, &'static str, &str)> {
        steps
            .iter()
            .filter_map(|step| match step {
                Step::Notify {
                    user_id,
                    order_id,
                    kind,
                    text,
                } => Some((*user_id, *order_id, *kind, text.as_str())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_user_is_remembered_with_email_only_and_then_welcomed() {
        let user_id = Uuid::now_v7();
        let done = steps(Consumed::User(UserEvent::UserRegistered {
            user_id,
            email: "ada@example.com".into(),
            name: "Ada".into(),
            password_hash: "x".into(),
        }));
        assert_eq!(
            done,
            vec![
                Step::Remember {
                    user_id,
                    contact: Some(("ada@example.com".into(), "Ada".into())),
                    preferences: NotificationPreferences {
                        email: true,
                        sms: false,
                        push: false,
                    },
                },
                Step::Notify {
                    user_id,
                    order_id: None,
                    kind: "welcome",
                    text: "Welcome to orderflow, Ada!".into(),
                },
            ]
        );
    }

    #[test]
    fn profile_and_preference_changes_are_kept_and_tell_nobody() {
        let user_id = Uuid::now_v7();
        let preferences = NotificationPreferences {
            email: false,
            sms: true,
            push: true,
        };
        let changed = steps(Consumed::User(UserEvent::NotificationPreferencesChanged {
            user_id,
            preferences,
        }));
        assert_eq!(
            changed,
            vec![Step::Remember {
                user_id,
                contact: None,
                preferences
            }]
        );
        let renamed = steps(Consumed::User(UserEvent::ProfileChanged {
            user_id,
            name: "Ada L.".into(),
        }));
        assert_eq!(
            renamed,
            vec![Step::Rename {
                user_id,
                name: "Ada L.".into()
            }]
        );
        let role = Role::Operator;
        assert!(steps(Consumed::User(UserEvent::RoleGranted { user_id, role })).is_empty());
        assert!(steps(Consumed::User(UserEvent::RoleRevoked { user_id, role })).is_empty());
    }

    #[test]
    fn each_way_an_order_ends_tells_its_customer_and_names_the_order() {
        let (order_id, customer_id) = (Uuid::now_v7(), Uuid::now_v7());
        let confirmed = steps(Consumed::Order(OrderEvent::OrderConfirmed {
            order_id,
            customer_id,
            total_cents: 2500,
        }));
        let text = format!("Your order {order_id} is confirmed (2500 cents).");
        assert_eq!(
            notified(&confirmed),
            vec![(
                customer_id,
                Some(order_id),
                "order_confirmed",
                text.as_str()
            )]
        );
        let rejected = steps(Consumed::Order(OrderEvent::OrderRejected {
            order_id,
            customer_id,
            total_cents: 2500,
            reason: EndReason::OutOfStock,
        }));
        let text = format!("Your order {order_id} was rejected: out_of_stock.");
        assert_eq!(
            notified(&rejected),
            vec![(customer_id, Some(order_id), "order_rejected", text.as_str())]
        );
        let cancelled = steps(Consumed::Order(OrderEvent::OrderCancelled {
            order_id,
            customer_id,
            total_cents: 2500,
            reason: EndReason::PaymentTimeout,
        }));
        let text = format!("Your order {order_id} was cancelled: payment_timeout.");
        assert_eq!(
            notified(&cancelled),
            vec![(
                customer_id,
                Some(order_id),
                "order_cancelled",
                text.as_str()
            )]
        );
        assert_eq!(confirmed.len() + rejected.len() + cancelled.len(), 3);
    }

    #[test]
    fn an_order_under_way_tells_nobody() {
        let order_id = Uuid::now_v7();
        let placed = OrderEvent::OrderPlaced {
            order_id,
            customer_id: Uuid::now_v7(),
            lines: vec![],
            total_cents: 0,
            currency: "EUR".into(),
            card_token: "tok_visa".into(),
        };
        assert!(steps(Consumed::Order(placed)).is_empty());
        let asked = OrderEvent::OrderCancellationRequested { order_id };
        assert!(steps(Consumed::Order(asked)).is_empty());
    }
}
