//! RabbitMQ: the topology every service declares at start-up, and how a message's
//! identity and lineage travel in AMQP properties and headers (DESIGN §4).
//!
//! Names: topic exchanges `orderflow.events` (routing key `<service>.<EventType>`) and
//! `orderflow.commands` (`<service>.<CommandType>`); a quorum queue per consumer
//! (`<service>.<consumer>`), one per service for its commands (`<service>.commands`),
//! and one per service for dead letters (`dlq.<service>.retry`). Everything is durable
//! and every message persistent. Declaring is idempotent, so every process declares
//! what it uses whenever it connects.

use lapin::options::{
    BasicQosOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

use crate::trace::{TRACEPARENT, TraceParent};

pub const EVENTS_EXCHANGE: &str = "orderflow.events";
pub const COMMANDS_EXCHANGE: &str = "orderflow.commands";

/// Payloads are Avro single-object encoded.
pub const CONTENT_TYPE: &str = "application/vnd.apache.avro+binary";

/// Header names a dead letter carries besides the message's own.
pub mod dead_letter_headers {
    /// Why the last attempt failed.
    pub const ERROR: &str = "x-orderflow-error";
    /// How many times the handler ran (0 when the message could not be decoded).
    pub const ATTEMPTS: &str = "x-orderflow-attempts";
    /// Where the message was originally published.
    pub const EXCHANGE: &str = "x-orderflow-exchange";
    pub const ROUTING_KEY: &str = "x-orderflow-routing-key";
    /// The queue (consumer) that gave up on it: a replay goes back there only.
    pub const QUEUE: &str = "x-orderflow-queue";
    /// Set on a message that was not tried because its stream is parked behind this
    /// earlier dead letter.
    pub const PARKED_BEHIND: &str = "x-orderflow-parked-behind";
    /// When the message was first dead-lettered, in milliseconds since the Unix epoch
    /// (kept when a replayed dead letter fails again).
    pub const FIRST_FAILED_AT: &str = "x-orderflow-first-failed-at";
    /// When it was last dead-lettered.
    pub const LAST_FAILED_AT: &str = "x-orderflow-last-failed-at";
    /// Set when the consumer is split into partitions: a replay goes through this
    /// exchange, which hands it to the partition of its stream.
    pub const REPLAY_EXCHANGE: &str = "x-orderflow-replay-exchange";
}

/// The queue a service's commands arrive on.
pub fn commands_queue(service: &str) -> String {
    format!("{service}.commands")
}

/// The dead-letter queue of a service.
pub fn dead_letter_queue(service: &str) -> String {
    format!("dlq.{service}.retry")
}

/// Connects with a name RabbitMQ shows in its connection list (and that operators
/// can close by).
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    // lapin's connect was seen to hang for good, once in many runs, after the broker
    // refused the connection: bounded, it fails like any refused connection.
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(connected) => connected,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no connection to the broker within {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )
        .into()),
    }
}

/// How long [`connect`] waits for the broker.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A channel with publisher confirms on.
pub async fn confirming_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Declares both exchanges.
pub async fn declare_exchanges(channel: &Channel) -> Result<(), lapin::Error> {
    for exchange in [EVENTS_EXCHANGE, COMMANDS_EXCHANGE] {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Declares a durable quorum queue bound to `bindings` (exchange, routing pattern).
///
/// A queue that is consumed declares itself single-active-consumer: with several
/// instances of one consumer running, RabbitMQ delivers to one of them at a time
/// (the others stand by), so two instances never handle one stream's messages side by
/// side and out of order.
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    bindings: &[(&str, &str)],
    consumed: bool,
) -> Result<(), lapin::Error> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if consumed {
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await?;
    for (exchange, pattern) in bindings {
        channel
            .queue_bind(
                queue.into(),
                (*exchange).into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// The exchange that spreads a partitioned consumer's messages over its partition
/// queues by a hash of their stream id.
pub fn partition_exchange(queue: &str) -> String {
    format!("{queue}.partitions")
}

/// Partition `partition` of the consumer `queue`.
pub fn partition_queue(queue: &str, partition: u16) -> String {
    format!("{queue}.p{partition}")
}

/// Declares a consumer split into `partitions` queues: a consistent-hash exchange
/// (RabbitMQ's `rabbitmq_consistent_hash_exchange` plugin) bound to `bindings`,
/// hashing on the `stream_id` header so that all of a stream's messages land in one
/// partition, in order, and one single-active-consumer quorum queue per partition.
pub async fn declare_partitioned(
    channel: &Channel,
    queue: &str,
    bindings: &[(&str, &str)],
    partitions: u16,
) -> Result<(), lapin::Error> {
    let exchange = partition_exchange(queue);
    let mut arguments = FieldTable::default();
    arguments.insert("hash-header".into(), long_string(header::STREAM_ID));
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            options,
            arguments,
        )
        .await?;
    for (source, pattern) in bindings {
        channel
            .exchange_bind(
                exchange.as_str().into(),
                (*source).into(),
                (*pattern).into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for partition in 0..partitions {
        // Equal weights: each partition takes an equal share of the hash space.
        declare_queue(
            channel,
            &partition_queue(queue, partition),
            &[(exchange.as_str(), "1")],
            true,
        )
        .await?;
    }
    Ok(())
}

/// Declares what every service has: the exchanges and its dead-letter queue. (Its
/// command queue belongs to its command consumer, whose configuration says whether it
/// is split: see [`ConsumerConfig::commands`](crate::ConsumerConfig::commands).)
pub async fn declare_service(channel: &Channel, service: &str) -> Result<(), lapin::Error> {
    declare_exchanges(channel).await?;
    // Queues of consumers this version no longer runs: left in place, they would
    // keep every event bound to them, for ever, with nobody to read them.
    for obsolete in obsolete_queues(service) {
        channel
            .queue_delete(short_string(&obsolete), QueueDeleteOptions::default())
            .await?;
    }
    // Read by operators (`orderflow dlq`), not by a consumer.
    declare_queue(channel, &dead_letter_queue(service), &[], false).await
}

/// Queues earlier versions declared for a service and this one does not: its read
/// models (which follow its own store now) and, for the order service, the saga's
/// queue of the order's own events.
fn obsolete_queues(service: &str) -> Vec<String> {
    let mut queues = vec![format!("{service}.read-models")];
    if service == "order" {
        queues.push("order.fulfilment-saga".to_owned());
    }
    queues
}

/// Limits how many unacknowledged messages the broker hands this channel.
pub async fn set_prefetch(channel: &Channel, prefetch: u16) -> Result<(), lapin::Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
}

/// Who a message is and where it comes from: the AMQP properties and headers of
/// DESIGN §4. Events and commands both carry one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The event or command id: consumers deduplicate by it.
    pub message_id: Uuid,
    pub message_type: String,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    /// The stream an event belongs to, or a command's ordering key: messages with one
    /// key are handled one at a time, in order.
    pub stream_id: String,
    /// Set on events; commands have none.
    pub stream_version: Option<i64>,
    pub global_position: i64,
    pub schema_fingerprint: i64,
    /// Milliseconds since the Unix epoch when it was recorded.
    pub timestamp_ms: u64,
    /// The span that sent it (the relay's publish), W3C `traceparent` header.
    pub trace: Option<TraceParent>,
}

impl From<&crate::RecordedEvent> for Envelope {
    fn from(event: &crate::RecordedEvent) -> Self {
        Envelope {
            message_id: event.event_id,
            message_type: event.event_type.clone(),
            correlation_id: event.correlation_id,
            causation_id: event.causation_id,
            stream_id: event.stream_id.clone(),
            stream_version: Some(event.stream_version),
            global_position: event.global_position,
            schema_fingerprint: event.schema_fingerprint,
            timestamp_ms: u64::try_from(event.recorded_at.timestamp_millis()).unwrap_or(0),
            trace: event.traceparent,
        }
    }
}

/// Header names of the envelope.
pub(crate) mod header {
    pub const CAUSATION_ID: &str = "causation_id";
    pub const STREAM_ID: &str = "stream_id";
    pub const STREAM_VERSION: &str = "stream_version";
    pub const GLOBAL_POSITION: &str = "global_position";
    pub const SCHEMA_FINGERPRINT: &str = "schema_fingerprint";
}

impl Envelope {
    /// Persistent properties carrying this envelope.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            header::CAUSATION_ID.into(),
            long_string(self.causation_id.to_string()),
        );
        headers.insert(
            header::STREAM_ID.into(),
            long_string(self.stream_id.clone()),
        );
        if let Some(version) = self.stream_version {
            headers.insert(
                header::STREAM_VERSION.into(),
                AMQPValue::LongLongInt(version),
            );
        }
        headers.insert(
            header::GLOBAL_POSITION.into(),
            AMQPValue::LongLongInt(self.global_position),
        );
        headers.insert(
            header::SCHEMA_FINGERPRINT.into(),
            AMQPValue::LongLongInt(self.schema_fingerprint),
        );
        if let Some(trace) = self.trace {
            headers.insert(TRACEPARENT.into(), long_string(trace.to_string()));
        }
        BasicProperties::default()
            .with_message_id(short_string(&self.message_id.to_string()))
            .with_type(short_string(&self.message_type))
            .with_content_type(CONTENT_TYPE.into())
            .with_correlation_id(short_string(&self.correlation_id.to_string()))
            .with_timestamp(self.timestamp_ms)
            .with_delivery_mode(2)
            .with_headers(headers)
    }

    /// Reads an envelope back; the error names what is missing or malformed.
    pub fn from_properties(properties: &BasicProperties) -> Result<Envelope, String> {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let uuid_property = |value: &Option<ShortString>, name: &str| {
            value
                .as_ref()
                .and_then(|v| Uuid::parse_str(v.as_str()).ok())
                .ok_or_else(|| format!("missing or malformed {name}"))
        };
        let causation = header_string(headers, header::CAUSATION_ID)
            .and_then(|v| Uuid::parse_str(&v).ok())
            .ok_or("missing or malformed causation_id header")?;
        Ok(Envelope {
            message_id: uuid_property(properties.message_id(), "message_id")?,
            message_type: properties
                .kind()
                .as_ref()
                .map(|kind| kind.as_str().to_owned())
                .ok_or("missing type")?,
            correlation_id: uuid_property(properties.correlation_id(), "correlation_id")?,
            causation_id: causation,
            stream_id: header_string(headers, header::STREAM_ID)
                .ok_or("missing stream_id header")?,
            stream_version: header_integer(headers, header::STREAM_VERSION),
            global_position: header_integer(headers, header::GLOBAL_POSITION)
                .ok_or("missing global_position header")?,
            schema_fingerprint: header_integer(headers, header::SCHEMA_FINGERPRINT)
                .ok_or("missing schema_fingerprint header")?,
            timestamp_ms: properties.timestamp().unwrap_or(0),
            // A malformed trace context is dropped, as W3C asks, not refused.
            trace: header_string(headers, TRACEPARENT).and_then(|text| TraceParent::parse(&text)),
        })
    }
}

/// A header as text, whichever string type the sender used.
pub fn header_string(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

/// A header as an integer, whichever integer type the sender used.
pub fn header_integer(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(value) => Some(*value),
        AMQPValue::LongInt(value) => Some(i64::from(*value)),
        AMQPValue::LongUInt(value) => Some(i64::from(*value)),
        AMQPValue::ShortInt(value) => Some(i64::from(*value)),
        AMQPValue::ShortUInt(value) => Some(i64::from(*value)),
        AMQPValue::Timestamp(value) => i64::try_from(*value).ok(),
        _ => None,
    }
}

pub fn long_string(value: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A short string, cut to AMQP's 255-byte limit (on a character boundary) rather
/// than panicking on an over-long value.
pub fn short_string(value: &str) -> ShortString {
    let mut end = value.len().min(255);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_survives_the_round_trip_through_properties() {
        let envelope = Envelope {
            message_id: Uuid::now_v7(),
            message_type: "StockReserved".into(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            stream_id: "stock-ABC".into(),
            stream_version: Some(7),
            global_position: 42 << 20,
            schema_fingerprint: -5,
            timestamp_ms: 1_700_000_000_000,
            trace: Some(TraceParent::root()),
        };
        let properties = envelope.properties();
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(Envelope::from_properties(&properties), Ok(envelope.clone()));

        let command = Envelope {
            stream_version: None,
            trace: None,
            ..envelope
        };
        assert_eq!(
            Envelope::from_properties(&command.properties()),
            Ok(command)
        );
    }

    #[test]
    fn a_malformed_traceparent_is_dropped_not_refused() {
        let mut properties = Envelope {
            message_id: Uuid::now_v7(),
            message_type: "StockReserved".into(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            stream_id: "stock-ABC".into(),
            stream_version: Some(1),
            global_position: 1,
            schema_fingerprint: 1,
            timestamp_ms: 0,
            trace: None,
        }
        .properties();
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(TRACEPARENT.into(), long_string("00-nonsense"));
        properties = properties.with_headers(headers);
        let read = Envelope::from_properties(&properties).expect("still an envelope");
        assert_eq!(read.trace, None);
    }

    #[test]
    fn missing_headers_are_named() {
        let error = Envelope::from_properties(&BasicProperties::default()).unwrap_err();
        assert!(error.contains("causation_id"), "{error}");
    }
}
