//! Sending recorded events to RabbitMQ again (`orderflow replay --republish`), for a
//! consumer that was added late, lost its queue, or must see a range again. The events
//! go out exactly as the relay sent them (same ids, envelope and routing key), so
//! consumers that already applied them recognise them as duplicates and change nothing.
//! This does not touch the outbox: the relay's own work is unaffected.

use lapin::BasicProperties;
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;

use crate::amqp::{self, EVENTS_EXCHANGE, Envelope};
use crate::store::{EventStore, RecordedEvent, StoreError};

/// Which recorded events to send again.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only events after this global position.
    pub after: i64,
    /// Only events at or before this global position.
    pub up_to: Option<i64>,
    /// Only this stream's events.
    pub stream: Option<String>,
    /// Only events recorded at or after this: consumers recognise an event as a
    /// duplicate only while its inbox row is kept ([`crate::retention`]), so the CLI
    /// leaves out what is older than the retention unless told otherwise.
    pub recorded_since: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused event {0}")]
    Refused(uuid::Uuid),
}

/// Events read from the store per page; a page's confirms are awaited together.
const PAGE: i64 = 1_000;

/// Publishes the selected events of `service`'s store to `orderflow.events` with
/// publisher confirms, in global order; returns how many went out. `progress` is
/// told the running count and the position reached after every page.
pub async fn republish(
    store: &EventStore,
    amqp_url: &str,
    service: &str,
    selection: &Selection,
    mut progress: impl FnMut(u64, i64),
) -> Result<u64, RepublishError> {
    let connection = amqp::connect(amqp_url, "orderflow-republish").await?;
    let channel = amqp::confirming_channel(&connection).await?;
    amqp::declare_service(&channel, service).await?;
    let mut sent = 0;
    if let Some(stream) = &selection.stream {
        let events = store.read_stream(stream, 1, i64::MAX).await?;
        let chosen: Vec<&RecordedEvent> = events.iter().filter(|e| selection.includes(e)).collect();
        sent += publish(&channel, service, &chosen).await?;
        progress(
            sent,
            chosen.last().map_or(selection.after, |e| e.global_position),
        );
    } else {
        let mut after = selection.after;
        loop {
            // History as committed now: an event still being written is not
            // history yet (the relay sends it once it commits).
            let page = store.read_committed(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.global_position;
            let chosen: Vec<&RecordedEvent> =
                page.iter().filter(|e| selection.includes(e)).collect();
            sent += publish(&channel, service, &chosen).await?;
            progress(sent, after);
            if selection.up_to.is_some_and(|up_to| after >= up_to) || (page.len() as i64) < PAGE {
                break;
            }
        }
    }
    let _ = connection.close(200, "republished".into()).await;
    Ok(sent)
}

/// Publishes events as the relay does and waits for every confirm.
async fn publish(
    channel: &lapin::Channel,
    service: &str,
    events: &[&RecordedEvent],
) -> Result<u64, RepublishError> {
    let mut confirms = Vec::with_capacity(events.len());
    for event in events {
        let properties: BasicProperties = Envelope::from(*event).properties();
        let routing_key = format!("{service}.{}", event.event_type);
        let confirm = channel
            .basic_publish(
                EVENTS_EXCHANGE.into(),
                amqp::short_string(&routing_key),
                BasicPublishOptions::default(),
                &event.payload,
                properties,
            )
            .await?;
        confirms.push((event.event_id, confirm));
    }
    for (event_id, confirm) in confirms {
        if !matches!(confirm.await?, Confirmation::Ack(None)) {
            return Err(RepublishError::Refused(event_id));
        }
    }
    Ok(events.len() as u64)
}

impl Selection {
    fn includes(&self, event: &RecordedEvent) -> bool {
        event.global_position > self.after
            && self
                .up_to
                .is_none_or(|up_to| event.global_position <= up_to)
            && self
                .stream
                .as_deref()
                .is_none_or(|stream| stream == event.stream_id)
            && self
                .recorded_since
                .is_none_or(|since| event.recorded_at >= since)
    }
}
