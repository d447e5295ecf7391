//! The store's public types: what is appended, what is read, what can go wrong.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::trace::TraceParent;

/// The channel the relay `LISTEN`s on; it is notified after appends commit.
pub const OUTBOX_CHANNEL: &str = "orderflow_outbox";

/// Events one transaction may append in total: the ordinal takes the low 20 bits of a
/// position.
pub const MAX_EVENTS_PER_TRANSACTION: usize = (1 << 20) - 1;

/// What the writer believes about the stream's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have exactly this version (the first event is 1).
    Exact(i64),
    /// Like `Exact`, with a version this store reported (from a load, a read or an
    /// earlier append). Events are never deleted, so such a version still exists and
    /// the append skips the lookup that proves it: the common load-decide-append path
    /// pays for no extra read.
    Stored(StoredVersion),
}

/// A stream version this store has seen stored. Only the store makes these, which is
/// what lets [`ExpectedVersion::Stored`] trust it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredVersion(pub(super) i64);

impl StoredVersion {
    pub(crate) fn new(version: i64) -> Self {
        StoredVersion(version)
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(version) => write!(f, "{version}"),
            ExpectedVersion::Stored(version) => write!(f, "{}", version.0),
        }
    }
}

/// Who caused an event and which conversation it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    /// Shared by everything that follows from one outside request.
    pub correlation_id: Uuid,
    /// The command or event that directly caused this one.
    pub causation_id: Uuid,
    /// The trace the cause ran in. What is stored is the span running at the append
    /// when one is exported, else this (see [`crate::trace::outgoing`]).
    pub trace: Option<TraceParent>,
}

impl Metadata {
    pub fn new(correlation_id: Uuid, causation_id: Uuid) -> Self {
        Metadata {
            correlation_id,
            causation_id,
            trace: None,
        }
    }

    /// The same metadata in the trace `trace`.
    pub fn traced(self, trace: Option<TraceParent>) -> Self {
        Metadata { trace, ..self }
    }
}

/// An event ready to append: already encoded, with its id chosen by the writer so a
/// retried append can be recognised.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// UUIDv7: unique, and roughly time-ordered for indexes and humans.
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_fingerprint: i64,
    pub payload: Vec<u8>,
    pub metadata: Metadata,
}

impl NewEvent {
    pub fn new(encoded: crate::Encoded, metadata: Metadata) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: encoded.event_type.to_owned(),
            schema_fingerprint: encoded.fingerprint,
            payload: encoded.payload,
            metadata,
        }
    }
}

/// A command for another service, sent through the outbox (see
/// [`StoreTransaction::send_command`](super::StoreTransaction::send_command)) and handled from that service's command queue,
/// idempotently by `command_id`.
#[derive(Debug, Clone)]
pub struct OutgoingCommand {
    /// The receiver's inbox is keyed by it: choose it so that a retried sender sends
    /// the same id (for example derived from the event that caused the command).
    pub command_id: Uuid,
    pub command_type: String,
    /// The service whose `<service>.commands` queue receives it.
    pub target_service: String,
    /// Commands with one ordering key are handled one at a time, in the order sent
    /// (typically the stream the command acts on).
    pub ordering_key: String,
    pub schema_fingerprint: i64,
    /// Avro single-object encoding, like an event's.
    pub payload: Vec<u8>,
    pub metadata: Metadata,
}

impl OutgoingCommand {
    pub fn new(
        target_service: &str,
        ordering_key: impl Into<String>,
        encoded: crate::Encoded,
        metadata: Metadata,
    ) -> Self {
        OutgoingCommand {
            command_id: Uuid::now_v7(),
            command_type: encoded.event_type.to_owned(),
            target_service: target_service.to_owned(),
            ordering_key: ordering_key.into(),
            schema_fingerprint: encoded.fingerprint,
            payload: encoded.payload,
            metadata,
        }
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub global_position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_fingerprint: i64,
    pub payload: Vec<u8>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    /// The span that appended it, if its writer was traced.
    pub traceparent: Option<TraceParent>,
}

/// Where an append left the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append: the expected version for the next one.
    pub stream_version: i64,
    pub first_position: i64,
    pub last_position: i64,
    /// True when every event was already stored by an earlier append of the same ids,
    /// and nothing was written this time.
    pub already_stored: bool,
}

impl AppendResult {
    /// The version to expect on the next append to this stream.
    pub fn next_expected(&self) -> ExpectedVersion {
        ExpectedVersion::Stored(StoredVersion(self.stream_version))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else appended first. `actual` is `None` when the race was lost inside a
    /// [`StoreTransaction`](super::StoreTransaction) (which PostgreSQL has then aborted, so it cannot be asked).
    #[error("stream {stream_id}: expected version {expected}, but it is at {}", .actual.map_or("a newer version".to_owned(), |v| v.to_string()))]
    Concurrency {
        stream_id: String,
        expected: ExpectedVersion,
        actual: Option<i64>,
    },
    /// Inside a [`StoreTransaction`](super::StoreTransaction) that began writing before the stream's head was
    /// committed: appending now would give the new events lower global positions than
    /// their predecessor. Roll back and retry in a new transaction.
    #[error(
        "stream {stream_id}: its head was written after this transaction began; retry in a new transaction"
    )]
    Reordered { stream_id: String },
    /// Some of the event ids are already stored, but not as this exact append.
    #[error("stream {stream_id}: some event ids are already stored elsewhere")]
    EventIdConflict { stream_id: String },
    #[error("an append takes 1 to {MAX_EVENTS_PER_TRANSACTION} events; got {0}")]
    BadBatch(usize),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// A race lost to another writer: retrying (in a new transaction) can succeed.
    pub fn is_concurrency(&self) -> bool {
        matches!(
            self,
            StoreError::Concurrency { .. } | StoreError::Reordered { .. }
        )
    }
}
