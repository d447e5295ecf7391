//! Metrics of messages in flight, in Prometheus exposition: the relay's backlog and
//! throughput, confirm latency, and each consumer's counts and processing latency.
//! One [`Metrics`] per process, shared by every relay and consumer in it; label
//! `service` on relay series, `consumer` (the queue) on consumer series.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The media type of [`Metrics::render`]'s output: what the encoder writes is
/// OpenMetrics text (it ends in `# EOF`), which Prometheus negotiates for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A series' labels, by name.
pub type Labels = Vec<(&'static str, String)>;
/// Histograms by labels, each with the buckets of its constructor.
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.25 ms to about 8 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Buckets from 1 ms to about 65 s: for work that waits on other work (a message from
/// its recording to its handling, an order from placed to ended).
pub fn waiting_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Locked to register the families of other crates ([`Metrics::family`]).
    registry: Mutex<Registry>,
    /// Those families by name, so each is registered once per process.
    families: Mutex<HashMap<&'static str, Box<dyn Any + Send + Sync>>>,
    consumer_critical_time: HistogramFamily,
    subscription_critical_time: HistogramFamily,
    outbox_backlog: Family<Labels, Gauge>,
    outbox_oldest_age: Family<Labels, Gauge<f64, AtomicU64>>,
    published: Family<Labels, Counter>,
    confirm_latency: HistogramFamily,
    consumed: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    duplicates: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    transactions: Family<Labels, Counter>,
    processing: HistogramFamily,
    relay_leading: Family<Labels, Gauge>,
    subscription_applied: Family<Labels, Counter>,
    subscription_failed: Family<Labels, Counter>,
    subscription_parked: Family<Labels, Counter>,
    subscription_leading: Family<Labels, Gauge>,
    subscription_lag: Family<Labels, Gauge>,
    subscription_stalled: Family<Labels, Gauge>,
    subscription_held_back: Family<Labels, Gauge<f64, AtomicU64>>,
    subscription_blocker: Family<Labels, Gauge>,
    commands_refused: Family<Labels, Counter>,
    pruned_rows: Family<Labels, Counter>,
    /// The labels of each subscription's blocker series now, to remove it once gone.
    blockers: std::sync::Mutex<std::collections::HashMap<String, Labels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("orderflow");
        let outbox_backlog = Family::<Labels, Gauge>::default();
        let outbox_oldest_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let published = Family::<Labels, Counter>::default();
        let confirm_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let consumed = Family::<Labels, Counter>::default();
        let failed = Family::<Labels, Counter>::default();
        let duplicates = Family::<Labels, Counter>::default();
        let dead_lettered = Family::<Labels, Counter>::default();
        let transactions = Family::<Labels, Counter>::default();
        let processing: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let relay_leading = Family::<Labels, Gauge>::default();
        let subscription_applied = Family::<Labels, Counter>::default();
        let subscription_failed = Family::<Labels, Counter>::default();
        let subscription_parked = Family::<Labels, Counter>::default();
        let subscription_leading = Family::<Labels, Gauge>::default();
        let subscription_lag = Family::<Labels, Gauge>::default();
        let subscription_stalled = Family::<Labels, Gauge>::default();
        let subscription_held_back = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let subscription_blocker = Family::<Labels, Gauge>::default();
        let commands_refused = Family::<Labels, Counter>::default();
        let pruned_rows = Family::<Labels, Counter>::default();
        let consumer_critical_time: HistogramFamily =
            Family::new_with_constructor(waiting_histogram);
        let subscription_critical_time: HistogramFamily =
            Family::new_with_constructor(waiting_histogram);
        registry.register(
            "consumer_critical_time_seconds",
            "From a message's recording (in the sender's store) to its effect committed here",
            consumer_critical_time.clone(),
        );
        registry.register(
            "subscription_critical_time_seconds",
            "From an event's recording to its effect committed by the subscription",
            subscription_critical_time.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Outbox rows not yet confirmed by the broker",
            outbox_backlog.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row",
            outbox_oldest_age.clone(),
        );
        registry.register(
            "relay_published",
            "Messages the relay published and the broker confirmed",
            published.clone(),
        );
        registry.register(
            "relay_confirm_latency_seconds",
            "From publishing a message to the broker's confirm",
            confirm_latency.clone(),
        );
        registry.register(
            "consumer_consumed",
            "Messages a consumer applied",
            consumed.clone(),
        );
        registry.register(
            "consumer_failed",
            "Handler attempts that failed",
            failed.clone(),
        );
        registry.register(
            "consumer_duplicates",
            "Deliveries of messages the consumer had already applied",
            duplicates.clone(),
        );
        registry.register(
            "consumer_dead_lettered",
            "Messages sent to the dead-letter queue (failed, undecodable or parked)",
            dead_lettered.clone(),
        );
        registry.register(
            "consumer_transactions",
            "Transactions that applied messages (several at once under load)",
            transactions.clone(),
        );
        registry.register(
            "consumer_processing_seconds",
            "From delivery to the handler's transaction committed",
            processing.clone(),
        );
        registry.register(
            "subscription_applied",
            "Events a subscription on the service's own store applied",
            subscription_applied.clone(),
        );
        registry.register(
            "subscription_failed",
            "Attempts at an event that failed (three, and its stream is parked)",
            subscription_failed.clone(),
        );
        registry.register(
            "subscription_parked",
            "Streams a subscription parked behind an event that failed for good",
            subscription_parked.clone(),
        );
        registry.register(
            "subscription_leading",
            "1 while this process leads the subscription, 0 on standby",
            subscription_leading.clone(),
        );
        registry.register(
            "subscription_lag_events",
            "Events recorded after the subscription's checkpoint",
            subscription_lag.clone(),
        );
        registry.register(
            "subscription_stalled",
            "1 while the subscription has events to apply but its checkpoint has not moved for 30 s",
            subscription_stalled.clone(),
        );
        registry.register(
            "subscription_held_back_seconds",
            "How long an open transaction in the store's database has held the subscription back (0: none)",
            subscription_held_back.clone(),
        );
        registry.register(
            "subscription_blocker",
            "1 for the transaction holding the subscription back: its xid, pid and application_name",
            subscription_blocker.clone(),
        );
        registry.register(
            "relay_leading",
            "1 while this process's relay holds the service's relay lock, 0 on standby",
            relay_leading.clone(),
        );
        registry.register(
            "commands_refused",
            "Commands answered 503 overloaded before anything was recorded, by the bound that was passed",
            commands_refused.clone(),
        );
        registry.register(
            "pruned_rows",
            "Bookkeeping rows (inbox, idempotency keys, consumer progress) deleted after their retention",
            pruned_rows.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                families: Mutex::default(),
                consumer_critical_time,
                subscription_critical_time,
                outbox_backlog,
                outbox_oldest_age,
                published,
                confirm_latency,
                consumed,
                failed,
                duplicates,
                dead_lettered,
                transactions,
                processing,
                relay_leading,
                subscription_applied,
                subscription_failed,
                subscription_parked,
                subscription_leading,
                subscription_lag,
                subscription_stalled,
                subscription_held_back,
                subscription_blocker,
                commands_refused,
                pruned_rows,
                blockers: Default::default(),
            }),
        }
    }

    /// The exposition of everything recorded so far, in the OpenMetrics text format
    /// (serve it as [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &lock(&self.inner.registry));
        text
    }

    /// The family registered as `name` (without the `orderflow_` prefix), made by
    /// `make` and registered the first time it is asked for: how other crates add
    /// their series to the process's one exposition. Ask once and keep the family (a
    /// clone shares its series).
    pub fn family<F>(&self, name: &'static str, help: &'static str, make: impl FnOnce() -> F) -> F
    where
        F: prometheus_client::registry::Metric + Clone,
    {
        let mut families = lock(&self.inner.families);
        if let Some(family) = families.get(name) {
            if let Some(family) = family.downcast_ref::<F>() {
                return family.clone();
            }
            tracing::error!(
                name,
                "a metric family of another type has this name; not exported"
            );
            return make();
        }
        let family = make();
        lock(&self.inner.registry).register(name, help, family.clone());
        families.insert(name, Box::new(family.clone()));
        family
    }

    /// A consumer committed the effect of a message recorded `age` ago.
    pub(crate) fn consumer_critical_time(&self, consumer: &str, age: Duration) {
        self.inner
            .consumer_critical_time
            .get_or_create(&consumer_labels(consumer))
            .observe(age.as_secs_f64());
    }

    /// A subscription committed the effect of an event recorded `age` ago.
    pub(crate) fn subscription_critical_time(&self, subscription: &str, age: Duration) {
        self.inner
            .subscription_critical_time
            .get_or_create(&subscription_labels(subscription))
            .observe(age.as_secs_f64());
    }

    /// Starts the series of a service's relay at zero, so they are exported (and
    /// rates computable) before anything happens.
    pub fn track_service(&self, service: &str) {
        let labels = service_labels(service);
        let _ = self.inner.outbox_backlog.get_or_create(&labels);
        let _ = self.inner.outbox_oldest_age.get_or_create(&labels);
        let _ = self.inner.published.get_or_create(&labels);
        let _ = self.inner.confirm_latency.get_or_create(&labels);
        let _ = self.inner.relay_leading.get_or_create(&labels);
    }

    /// Whether this process's relay for `service` leads.
    pub fn relay_leading(&self, service: &str, leading: bool) {
        self.inner
            .relay_leading
            .get_or_create(&service_labels(service))
            .set(i64::from(leading));
    }

    /// Starts the series of a consumer at zero.
    pub fn track_consumer(&self, consumer: &str) {
        let labels = consumer_labels(consumer);
        let _ = self.inner.consumed.get_or_create(&labels);
        let _ = self.inner.failed.get_or_create(&labels);
        let _ = self.inner.duplicates.get_or_create(&labels);
        let _ = self.inner.dead_lettered.get_or_create(&labels);
        let _ = self.inner.transactions.get_or_create(&labels);
        let _ = self.inner.processing.get_or_create(&labels);
    }

    /// Starts the series of a subscription at zero.
    pub fn track_subscription(&self, subscription: &str) {
        let labels = subscription_labels(subscription);
        let _ = self.inner.subscription_applied.get_or_create(&labels);
        let _ = self.inner.subscription_failed.get_or_create(&labels);
        let _ = self.inner.subscription_parked.get_or_create(&labels);
        let _ = self.inner.subscription_leading.get_or_create(&labels);
        let _ = self.inner.subscription_lag.get_or_create(&labels);
        let _ = self.inner.subscription_stalled.get_or_create(&labels);
        let _ = self.inner.subscription_held_back.get_or_create(&labels);
    }

    /// A command `service` refused because `bound` was passed.
    pub fn command_refused(&self, service: &str, bound: &str) {
        self.inner
            .commands_refused
            .get_or_create(&vec![
                ("service", service.to_owned()),
                ("bound", bound.to_owned()),
            ])
            .inc();
    }

    /// How many commands `service` refused because `bound` was passed.
    pub fn refused_count(&self, service: &str, bound: &str) -> u64 {
        self.inner
            .commands_refused
            .get_or_create(&vec![
                ("service", service.to_owned()),
                ("bound", bound.to_owned()),
            ])
            .get()
    }

    /// Rows of `table` that `service`'s retention deleted.
    pub fn pruned(&self, service: &str, table: &str, rows: u64) {
        self.inner
            .pruned_rows
            .get_or_create(&vec![
                ("service", service.to_owned()),
                ("table", table.to_owned()),
            ])
            .inc_by(rows);
    }

    /// Records how far a subscription is behind its event store.
    pub fn subscription_lag(&self, subscription: &str, lag_events: i64, stalled: bool) {
        let labels = subscription_labels(subscription);
        self.inner
            .subscription_lag
            .get_or_create(&labels)
            .set(lag_events);
        self.inner
            .subscription_stalled
            .get_or_create(&labels)
            .set(i64::from(stalled));
    }

    pub(crate) fn subscription_leading(&self, subscription: &str, leading: bool) {
        self.inner
            .subscription_leading
            .get_or_create(&subscription_labels(subscription))
            .set(i64::from(leading));
    }

    pub(crate) fn subscription_applied(&self, subscription: &str, events: u64) {
        self.inner
            .subscription_applied
            .get_or_create(&subscription_labels(subscription))
            .inc_by(events);
    }

    pub(crate) fn subscription_failed(&self, subscription: &str) {
        self.inner
            .subscription_failed
            .get_or_create(&subscription_labels(subscription))
            .inc();
    }

    pub(crate) fn subscription_parked(&self, subscription: &str) {
        self.inner
            .subscription_parked
            .get_or_create(&subscription_labels(subscription))
            .inc();
    }

    /// The transaction holding a subscription back (or none any more).
    pub(crate) fn subscription_held_back(
        &self,
        subscription: &str,
        held: Option<&crate::subscription::HeldBack>,
    ) {
        let labels = subscription_labels(subscription);
        self.inner
            .subscription_held_back
            .get_or_create(&labels)
            .set(held.map_or(0.0, |held| held.for_seconds));
        let mut blockers = self
            .inner
            .blockers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = blockers.remove(subscription) {
            self.inner.subscription_blocker.remove(&previous);
        }
        if let Some(held) = held {
            let blocker = &held.blocker;
            let mut labels = labels;
            labels.push(("xid", blocker.xid.to_string()));
            labels.push((
                "pid",
                blocker.pid.map(|pid| pid.to_string()).unwrap_or_default(),
            ));
            labels.push(("application_name", blocker.application_name.clone()));
            self.inner
                .subscription_blocker
                .get_or_create(&labels)
                .set(1);
            blockers.insert(subscription.to_owned(), labels);
        }
    }

    pub(crate) fn outbox(&self, service: &str, backlog: i64, oldest_age: Duration) {
        let labels = service_labels(service);
        self.inner
            .outbox_backlog
            .get_or_create(&labels)
            .set(backlog);
        self.inner
            .outbox_oldest_age
            .get_or_create(&labels)
            .set(oldest_age.as_secs_f64());
    }

    pub(crate) fn published(&self, service: &str, count: u64, confirm_latency: Duration) {
        let labels = service_labels(service);
        self.inner.published.get_or_create(&labels).inc_by(count);
        self.inner
            .confirm_latency
            .get_or_create(&labels)
            .observe(confirm_latency.as_secs_f64());
    }

    pub(crate) fn consumed(&self, consumer: &str, took: Duration) {
        let labels = consumer_labels(consumer);
        self.inner.consumed.get_or_create(&labels).inc();
        self.inner
            .processing
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub(crate) fn failed(&self, consumer: &str) {
        self.inner
            .failed
            .get_or_create(&consumer_labels(consumer))
            .inc();
    }

    pub(crate) fn duplicate(&self, consumer: &str) {
        self.inner
            .duplicates
            .get_or_create(&consumer_labels(consumer))
            .inc();
    }

    pub(crate) fn dead_lettered(&self, consumer: &str) {
        self.inner
            .dead_lettered
            .get_or_create(&consumer_labels(consumer))
            .inc();
    }

    pub(crate) fn transaction(&self, consumer: &str) {
        self.inner
            .transactions
            .get_or_create(&consumer_labels(consumer))
            .inc();
    }

    /// Transactions in which a consumer applied messages.
    pub fn transaction_count(&self, consumer: &str) -> u64 {
        count(&self.inner.transactions, &consumer_labels(consumer))
    }

    /// Messages a consumer applied so far (for health checks and tests).
    pub fn consumed_count(&self, consumer: &str) -> u64 {
        count(&self.inner.consumed, &consumer_labels(consumer))
    }

    /// Deliveries a consumer recognised as already applied.
    pub fn duplicate_count(&self, consumer: &str) -> u64 {
        count(&self.inner.duplicates, &consumer_labels(consumer))
    }

    /// Messages a consumer sent to the dead-letter queue.
    pub fn dead_lettered_count(&self, consumer: &str) -> u64 {
        count(&self.inner.dead_lettered, &consumer_labels(consumer))
    }

    /// Messages the relay of `service` published so far.
    pub fn published_count(&self, service: &str) -> u64 {
        count(&self.inner.published, &service_labels(service))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn count(family: &Family<Labels, Counter>, labels: &Labels) -> u64 {
    family.get_or_create(labels).get()
}

fn service_labels(service: &str) -> Labels {
    vec![("service", service.to_owned())]
}

fn subscription_labels(subscription: &str) -> Labels {
    vec![("subscription", subscription.to_owned())]
}

fn consumer_labels(consumer: &str) -> Labels {
    vec![("consumer", consumer.to_owned())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_appear_in_the_exposition() {
        let metrics = Metrics::new();
        metrics.outbox("order", 3, Duration::from_millis(1500));
        metrics.published("order", 2, Duration::from_millis(2));
        metrics.consumed("inventory.commands", Duration::from_millis(4));
        metrics.dead_lettered("inventory.commands");
        let text = metrics.render();
        for expected in [
            "orderflow_outbox_backlog{service=\"order\"} 3",
            "orderflow_outbox_oldest_age_seconds{service=\"order\"} 1.5",
            "orderflow_relay_published_total{service=\"order\"} 2",
            "orderflow_consumer_consumed_total{consumer=\"inventory.commands\"} 1",
            "orderflow_consumer_dead_lettered_total{consumer=\"inventory.commands\"} 1",
            "orderflow_consumer_processing_seconds_count{consumer=\"inventory.commands\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
        assert_eq!(metrics.consumed_count("inventory.commands"), 1);
    }

    #[test]
    fn a_family_asked_for_twice_is_one_family() {
        let metrics = Metrics::new();
        let make = Family::<Labels, Counter>::default;
        let first = metrics.family("things", "Things", make);
        let second = metrics.family("things", "Things", make);
        first.get_or_create(&vec![("kind", "a".to_owned())]).inc();
        second.get_or_create(&vec![("kind", "a".to_owned())]).inc();
        let text = metrics.render();
        assert!(
            text.contains("orderflow_things_total{kind=\"a\"} 2"),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE orderflow_things counter").count(), 1);
    }
}
