//! Metrics of messages in flight, in Prometheus exposition: the relay's backlog and
//! throughput, confirm latency, and each consumer's counts and processing latency.
//! One [`Metrics`] per process, shared by every relay and consumer in it; label
//! `service` on relay series, `consumer` (the queue) on consumer series.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.25 ms to about 8 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
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
    projection_lag: Family<Labels, Gauge>,
    projection_stalled: Family<Labels, Gauge>,
    relay_leading: Family<Labels, Gauge>,
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
        let projection_lag = Family::<Labels, Gauge>::default();
        let projection_stalled = Family::<Labels, Gauge>::default();
        let relay_leading = Family::<Labels, Gauge>::default();
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
            "projection_lag_events",
            "Events recorded after the last position the projection applied",
            projection_lag.clone(),
        );
        registry.register(
            "projection_stalled",
            "1 while the projection has events to apply but made no progress for a while",
            projection_stalled.clone(),
        );
        registry.register(
            "relay_leading",
            "1 while this process's relay holds the service's relay lock, 0 on standby",
            relay_leading.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
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
                projection_lag,
                projection_stalled,
                relay_leading,
            }),
        }
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.inner.registry);
        text
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

    /// Records how far a projection (named by its queue) is behind its event store.
    pub fn projection(&self, projection: &str, lag_events: i64, stalled: bool) {
        let labels = vec![("projection", projection.to_owned())];
        self.inner
            .projection_lag
            .get_or_create(&labels)
            .set(lag_events);
        self.inner
            .projection_stalled
            .get_or_create(&labels)
            .set(i64::from(stalled));
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

fn count(family: &Family<Labels, Counter>, labels: &Labels) -> u64 {
    family.get_or_create(labels).get()
}

fn service_labels(service: &str) -> Labels {
    vec![("service", service.to_owned())]
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
}
