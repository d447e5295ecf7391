//! A consumer's settings and the broker topology it declares.

use std::time::Duration;

use lapin::Channel;

use crate::amqp::{self, COMMANDS_EXCHANGE, EVENTS_EXCHANGE};

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub service: String,
    /// The consumer's name; its queue is `<service>.<name>`.
    pub name: String,
    /// (exchange, routing pattern) pairs the queue is bound with.
    pub bindings: Vec<(String, String)>,
    pub amqp_url: String,
    /// Unacknowledged messages the broker may hand over at once.
    pub prefetch: u16,
    /// Transactions in flight at once, each on a connection the consumer keeps open.
    pub concurrency: usize,
    /// Most messages (of different streams) applied in one transaction. Messages that
    /// are ready while every transaction slot is busy go together, which divides the
    /// commits and round trips per message under load and costs nothing when idle.
    pub batch_size: usize,
    /// Queues the consumer is split into, each with a share of the streams (by a hash
    /// of the stream id), so instances of a service can share the work: each takes the
    /// partitions assigned to it ([`Consumer::with_assignment`](super::Consumer::with_assignment)). 1: one queue.
    pub partitions: u16,
    /// Handler attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// The pause after the first failed attempt; it doubles after each further one.
    pub first_retry_delay: Duration,
}

impl ConsumerConfig {
    /// A consumer of the events whose routing keys match `patterns`
    /// (`<service>.<EventType>`, `#` and `*` allowed).
    pub fn events(service: &str, name: &str, amqp_url: &str, patterns: &[&str]) -> Self {
        let bindings = patterns
            .iter()
            .map(|pattern| (EVENTS_EXCHANGE.to_owned(), (*pattern).to_owned()))
            .collect();
        Self::with_bindings(service, name, amqp_url, bindings)
    }

    /// The consumer of a service's own command queue, `<service>.commands`.
    pub fn commands(service: &str, amqp_url: &str) -> Self {
        let bindings = vec![(COMMANDS_EXCHANGE.to_owned(), format!("{service}.#"))];
        Self::with_bindings(service, "commands", amqp_url, bindings)
    }

    fn with_bindings(
        service: &str,
        name: &str,
        amqp_url: &str,
        bindings: Vec<(String, String)>,
    ) -> Self {
        ConsumerConfig {
            service: service.to_owned(),
            name: name.to_owned(),
            bindings,
            amqp_url: amqp_url.to_owned(),
            prefetch: 256,
            concurrency: 4,
            batch_size: 64,
            partitions: 1,
            max_attempts: 3,
            first_retry_delay: Duration::from_millis(100),
        }
    }

    /// The queue, which also names the consumer in the inbox and in metrics.
    pub fn queue(&self) -> String {
        format!("{}.{}", self.service, self.name)
    }

    /// The queue partition `partition` is read from (the consumer's queue itself when
    /// it is not split).
    pub fn partition_queue(&self, partition: u16) -> String {
        if self.partitions <= 1 {
            self.queue()
        } else {
            amqp::partition_queue(&self.queue(), partition)
        }
    }

    /// Declares the service's topology and this consumer's queue (or partitions) with
    /// its bindings.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        amqp::declare_service(channel, &self.service).await?;
        let bindings: Vec<(&str, &str)> = self
            .bindings
            .iter()
            .map(|(exchange, pattern)| (exchange.as_str(), pattern.as_str()))
            .collect();
        if self.partitions <= 1 {
            amqp::declare_queue(channel, &self.queue(), &bindings, true).await
        } else {
            amqp::declare_partitioned(channel, &self.queue(), &bindings, self.partitions).await
        }
    }
}
