//! One broker session of a consumer: its channels, the partitions it takes (and hands
//! over when the assignment changes), and the loop that hands deliveries to the
//! dispatcher and starts what it allows.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::attempt::{process, process_batch};
use super::dispatch::{Dispatcher, Done, DoneGuard, Task};
use super::{Consumer, ConsumerError, Handler};
use crate::amqp;

impl<H: Handler> Consumer<H> {
    /// The partitions to consume now.
    fn wanted(&self) -> Vec<u16> {
        let partitions = self.shared.config.partitions.max(1);
        match &self.assignment {
            Some(assignment) if partitions > 1 => assignment
                .borrow()
                .iter()
                .copied()
                .filter(|p| *p < partitions)
                .collect(),
            _ => (0..partitions).collect(),
        }
    }

    /// Starts consuming the partitions of `wanted` not yet consumed, each on a
    /// channel of its own, and lets go of those no longer wanted by closing their
    /// channel (which returns what they held unacknowledged to the queue's head).
    async fn follow(
        &self,
        connection: &lapin::Connection,
        subscribed: &mut HashMap<u16, Channel>,
        deliveries: &mut futures_util::stream::SelectAll<PartitionDeliveries>,
        wanted: &[u16],
    ) -> Result<(), ConsumerError> {
        let config = &self.shared.config;
        let gone: Vec<u16> = subscribed
            .keys()
            .copied()
            .filter(|p| !wanted.contains(p))
            .collect();
        for partition in gone {
            if let Some(channel) = subscribed.remove(&partition) {
                let _ = channel.close(200, "partition handed over".into()).await;
                tracing::info!(partition, "let go of a partition");
            }
        }
        for &partition in wanted {
            if subscribed.contains_key(&partition) {
                continue;
            }
            let channel = connection.create_channel().await?;
            amqp::set_prefetch(&channel, config.prefetch).await?;
            let queue = config.partition_queue(partition);
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            // Tagged with the partition, and ending with a mark of its end (None), so
            // a partition the broker stops delivering is noticed.
            let tagged = consumer
                .map(move |delivery| (partition, Some(delivery)))
                .chain(futures_util::stream::once(async move { (partition, None) }));
            deliveries.push(Box::pin(tagged));
            subscribed.insert(partition, channel);
        }
        Ok(())
    }

    /// One broker connection's worth of consuming. `Ok` means cancelled.
    pub(super) async fn session(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let connection = amqp::connect(&config.amqp_url, &shared.queue).await?;
        let channel = connection.create_channel().await?;
        config.declare(&channel).await?;
        let channels = Arc::new(SessionChannels {
            dead_letters: amqp::confirming_channel(&connection).await?,
            consume: channel.clone(),
        });
        let mut subscribed: HashMap<u16, Channel> = HashMap::new();
        let mut deliveries = futures_util::stream::SelectAll::new();
        let wanted = self.wanted();
        self.follow(&connection, &mut subscribed, &mut deliveries, &wanted)
            .await?;
        tracing::info!("consuming");
        let (done_sender, mut done) = tokio::sync::mpsc::unbounded_channel::<Done>();
        let mut dispatcher = Dispatcher::new(config.concurrency, config.batch_size);
        let start = |batch: Vec<(String, Delivery)>| {
            let keys = batch.iter().map(|(key, _)| key.clone()).collect();
            let mut done = DoneGuard::new(keys, Task::Batch { handed_off: 0 }, done_sender.clone());
            let (shared, channels) = (self.shared.clone(), channels.clone());
            let sender = done_sender.clone();
            tokio::spawn(
                async move {
                    let retries = process_batch(&shared, &channels, batch).await;
                    // Messages that must be retried leave the batch's slot to the next
                    // batch and keep only their own stream busy while they wait.
                    let guards: Vec<DoneGuard> = retries
                        .iter()
                        .map(|retry| {
                            done.hand_off(&retry.key);
                            DoneGuard::new(vec![retry.key.clone()], Task::Retry, sender.clone())
                        })
                        .collect();
                    drop(done);
                    for (retry, guard) in retries.into_iter().zip(guards) {
                        let (shared, channels) = (shared.clone(), channels.clone());
                        tokio::spawn(
                            async move {
                                process(&shared, &channels, retry.delivery, retry.attempts).await;
                                drop(guard);
                            }
                            .in_current_span(),
                        );
                    }
                }
                .in_current_span(),
            );
        };
        let outcome = loop {
            tokio::select! {
                biased;
                Some(finished) = done.recv() => {
                    dispatcher.finished(finished);
                    dispatcher.startable().into_iter().for_each(&start);
                }
                _ = cancel.cancelled() => break Ok(()),
                changed = assignment_changed(&mut self.assignment) => {
                    if changed.is_err() {
                        // The assignment's owner is gone: keep what is taken.
                        self.assignment = None;
                        continue;
                    }
                    let wanted = self.wanted();
                    let followed = self.follow(&connection, &mut subscribed, &mut deliveries, &wanted);
                    if let Err(error) = followed.await {
                        break Err(error);
                    }
                }
                delivery = deliveries.next(), if !deliveries.is_empty() => {
                    // Take every delivery already here before starting any, so what
                    // arrived together can go in one transaction.
                    let mut next = Some(delivery);
                    let mut taken = 0;
                    let mut lost = None;
                    while let Some(delivery) = next.take() {
                        match delivery {
                            Some((_, Some(Ok(delivery)))) => {
                                let key = ordering_key(&delivery);
                                dispatcher.arrived(key, delivery);
                            }
                            // The end of a partition let go of on purpose.
                            Some((partition, _)) if !subscribed.contains_key(&partition) => {}
                            Some((_, Some(Err(error)))) => lost = Some(ConsumerError::Broker(error)),
                            // A partition still taken stopped delivering: start over.
                            Some((_, None)) => lost = Some(ConsumerError::CancelledByBroker),
                            // Every partition let go of (the set is empty): nothing to do.
                            None => {}
                        }
                        taken += 1;
                        if lost.is_none() && taken < config.batch_size {
                            next = deliveries.next().now_or_never();
                        }
                    }
                    dispatcher.startable().into_iter().for_each(&start);
                    if let Some(error) = lost {
                        break Err(error);
                    }
                }
            }
        };
        // Finish what is in hand; what waits behind it was never started and goes
        // back to the queue when the channel closes.
        if cancel.is_cancelled() {
            shared.cancel.cancel();
        }
        while dispatcher.in_flight() > 0 {
            match done.recv().await {
                Some(finished) => dispatcher.finished(finished),
                None => break,
            }
        }
        let _ = connection.close(200, "consumer stopping".into()).await;
        outcome
    }
}

/// One partition's deliveries, tagged with it, then `None` when it ends.
pub(super) type PartitionDeliveries = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = (u16, Option<Result<Delivery, lapin::Error>>)> + Send>,
>;

/// Resolves when the assignment changes (or its sender is gone); never without one.
pub(super) async fn assignment_changed(
    assignment: &mut Option<tokio::sync::watch::Receiver<Vec<u16>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match assignment {
        Some(assignment) => assignment.changed().await,
        None => std::future::pending().await,
    }
}

/// The channels of one broker session, shared by its message tasks.
pub(super) struct SessionChannels {
    pub(super) consume: Channel,
    /// With publisher confirms: a message is acknowledged only once its dead letter is
    /// safely in the dead-letter queue.
    pub(super) dead_letters: Channel,
}

impl SessionChannels {
    pub(super) fn alive(&self) -> bool {
        self.consume.status().connected() && self.dead_letters.status().connected()
    }
}

/// The key that serialises a delivery: its stream id, or for a message without one
/// (it will be dead-lettered as malformed) its delivery tag, which serialises nothing.
pub(super) fn ordering_key(delivery: &Delivery) -> String {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| amqp::header_string(headers, amqp::header::STREAM_ID))
        .unwrap_or_else(|| format!("\u{0}delivery-{}", delivery.delivery_tag))
}
