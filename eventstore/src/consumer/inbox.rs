//! The inbox claim: a batch's inbox rows, stream order and parked streams checked in
//! one statement with the locks of the streams its handlers append to, then the
//! handlers, then one commit.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use sqlx::Row;
use tracing::Instrument;
use uuid::Uuid;

use super::attempt::{Claim, Failure};
use super::{Handler, Message, Shared};
use crate::parking::advance_park;
use crate::trace;

/// Claims the inbox rows of a batch of messages of different streams, in one
/// statement. A message is claimed unless it is a duplicate (its inbox row exists),
/// parked behind another message of its stream, or older than what its stream already
/// applied; a message that is not claimed writes nothing, so the others of its batch
/// can still commit. The message a parked stream waits for (a dead letter being
/// replayed) is the one message it lets through; when that succeeds, the stream moves
/// on to its next parked message in the same transaction.
///
/// First it takes the locks of the streams the handlers will append to (`$5`), before
/// it writes anything: `checked` cannot yield a row before `locked` has taken them all,
/// and nothing is written before `checked` yields, so the transaction id (which orders
/// global positions) is assigned after the streams' previous writers committed.
macro_rules! claim_statement {
    ($batch:literal) => {
        concat!(
            "WITH locked AS (SELECT ",
            crate::store::stream_locks!("$5"),
            "), checked AS (
    SELECT b.message_id, b.stream_id, b.version,
           (SELECT blocking_message_id FROM parked_streams p
            WHERE p.consumer = $1 AND p.stream_id = b.stream_id) AS parked_behind,
           EXISTS (SELECT 1 FROM inbox i WHERE i.consumer = $1 AND i.message_id = b.message_id)
               AS seen,
           (b.version IS NULL OR NOT EXISTS (SELECT 1 FROM consumer_streams s
            WHERE s.consumer = $1 AND s.stream_id = b.stream_id AND s.last_version >= b.version))
               AS in_order
    FROM ",
            $batch,
            " AS b (message_id, stream_id, version), locked WHERE locked.locks >= 0
), claimed AS (
    INSERT INTO inbox (consumer, message_id)
    SELECT $1, message_id FROM checked
    WHERE NOT seen AND in_order AND (parked_behind IS NULL OR parked_behind = message_id)
    ON CONFLICT DO NOTHING
    RETURNING message_id
), advanced AS (
    INSERT INTO consumer_streams (consumer, stream_id, last_version)
    SELECT $1, c.stream_id, c.version FROM checked c
    WHERE c.version IS NOT NULL AND c.message_id IN (SELECT message_id FROM claimed)
    ON CONFLICT (consumer, stream_id)
        DO UPDATE SET last_version = excluded.last_version, applied_at = now()
        WHERE consumer_streams.last_version < excluded.last_version
    RETURNING stream_id
)
SELECT c.message_id,
       c.message_id IN (SELECT message_id FROM claimed) AS claimed,
       c.parked_behind,
       c.seen,
       c.in_order AND (c.version IS NULL
           OR c.message_id NOT IN (SELECT message_id FROM claimed)
           OR c.stream_id IN (SELECT stream_id FROM advanced)) AS in_order
FROM checked c"
        )
    };
}
/// The claim of one message. PostgreSQL plans each execution of these statements
/// anew (custom plans); with arrays, planning cost about half of a lone message's
/// database time, so a lone message binds scalars.
const CLAIM_ONE: &str = claim_statement!("(VALUES ($2::uuid, $3::text, $4::bigint))");
/// The claim of a batch, one array element per message.
const CLAIM_MANY: &str = claim_statement!("unnest($2::uuid[], $3::text[], $4::bigint[])");

/// Why a transaction failed, and the message whose handler failed, if one did.
pub(super) struct Failed {
    pub(super) failure: Failure,
    /// Index of the message whose handler failed (or whose claim went wrong).
    pub(super) culprit: Option<usize>,
}

impl From<Failure> for Failed {
    fn from(failure: Failure) -> Self {
        Failed {
            failure,
            culprit: None,
        }
    }
}

/// Claims and applies `messages` (of different streams) in one transaction on one of
/// the consumer's connections; the verdict for each, in order.
pub(super) async fn try_once<H: Handler>(
    shared: &Shared<H>,
    messages: &[&Message],
) -> Result<Vec<Claim>, Failed> {
    let (_permit, mut connection) = shared
        .connections
        .take()
        .await
        .map_err(|error| Failure::from_database(&error))?;
    // One transaction serves every message of the batch: its span continues a lone
    // message's trace and links to each of a batch's, whose handlers have spans of
    // their own in their own traces.
    let span = tracing::info_span!(
        "transaction",
        otel.kind = "consumer",
        orderflow.service = %shared.config.service,
        messaging.destination.name = %shared.queue,
        messaging.batch.message_count = messages.len(),
        trace_id = tracing::field::Empty,
    );
    let traces: Vec<_> = messages
        .iter()
        .map(|message| message.envelope.trace)
        .collect();
    trace::serve_all(&span, &traces);
    let outcome = claim_and_handle(shared, messages, &mut connection)
        .instrument(span)
        .await;
    // After a failure the connection may be mid-transaction or broken: let it go.
    if outcome.is_ok() {
        shared.connections.give_back(connection);
    }
    outcome
}

async fn claim_and_handle<H: Handler>(
    shared: &Shared<H>,
    messages: &[&Message],
    connection: &mut sqlx::PgConnection,
) -> Result<Vec<Claim>, Failed> {
    let database = |error: sqlx::Error| Failure::from_database(&error);
    let mut transaction = shared
        .store
        .begin_on(connection)
        .await
        .map_err(Failure::from_store)?;
    // Taken by the claim before it writes anything (see `claim_statement!`).
    let streams = transaction.streams_to_lock_in_next_statement(
        messages
            .iter()
            .flat_map(|message| shared.handler.streams_to_lock(message)),
    );
    let claim = match messages {
        [one] => {
            let envelope = &one.envelope;
            sqlx::query(CLAIM_ONE)
                .bind(shared.queue.as_str())
                .bind(envelope.message_id)
                .bind(envelope.stream_id.as_str())
                .bind(envelope.stream_version)
        }
        _ => {
            let envelopes = messages.iter().map(|message| &message.envelope);
            sqlx::query(CLAIM_MANY)
                .bind(shared.queue.as_str())
                .bind(envelopes.clone().map(|e| e.message_id).collect::<Vec<_>>())
                .bind(
                    envelopes
                        .clone()
                        .map(|e| e.stream_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(envelopes.map(|e| e.stream_version).collect::<Vec<_>>())
        }
    }
    .bind(&streams);
    let rows = claim
        .fetch_all(transaction.connection())
        .await
        .map_err(database)?;
    let mut rows_by_id = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get("message_id").map_err(database)?;
        rows_by_id.insert(id, row);
    }
    let mut claims = Vec::with_capacity(messages.len());
    let mut applied = Vec::new();
    let mut moves_on: Vec<&Message> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let id = message.envelope.message_id;
        let Some(row) = rows_by_id.get(&id) else {
            let error = format!("the claim returned no row for {id}");
            return Err(Failure::handler(error).into());
        };
        let claimed: bool = row.try_get("claimed").map_err(database)?;
        let parked_behind: Option<Uuid> = row.try_get("parked_behind").map_err(database)?;
        let seen: bool = row.try_get("seen").map_err(database)?;
        let in_order: bool = row.try_get("in_order").map_err(database)?;
        if seen && parked_behind == Some(id) {
            // The message its stream waits for was applied before it was parked (a
            // redelivery, a republish): nothing to apply, but the stream moves on.
            moves_on.push(*message);
        }
        let claim = match parked_behind {
            // Seen first: a message already applied is a duplicate, parked or not,
            // and must never become the message a parked stream waits for.
            _ if seen => Claim::Duplicate,
            Some(behind) if behind != id => Claim::Parked(behind),
            _ if claimed && in_order => Claim::Applied,
            // Claimed, but its stream moved past it meanwhile: that claim must not
            // commit. Alone, it is rolled back below; in a batch, the batch fails
            // and the message is tried alone.
            _ if claimed && messages.len() > 1 => {
                return Err(Failed {
                    failure: Failure::handler(format!("{id} lost its stream's order")),
                    culprit: Some(index),
                });
            }
            _ if claimed => Claim::OutOfOrder,
            // Claimed meanwhile by a concurrent delivery of the same message.
            _ if in_order => Claim::Duplicate,
            _ => Claim::OutOfOrder,
        };
        if matches!(claim, Claim::Applied) {
            applied.push((index, *message, parked_behind.is_some()));
        }
        claims.push(claim);
    }
    if applied.is_empty() && moves_on.is_empty() {
        transaction.rollback().await.map_err(Failure::from_store)?;
        return Ok(claims);
    }
    for message in moves_on {
        let stream_id = &message.envelope.stream_id;
        advance_park(transaction.connection(), &shared.queue, stream_id)
            .await
            .map_err(database)?;
    }
    for &(index, message, replaying_dead_letter) in &applied {
        // A panicking handler counts as a failed attempt; it must not free the stream
        // for the next message while this one is still unapplied.
        let span = message.span(messages.len() == 1);
        let handled = AssertUnwindSafe(shared.handler.handle(message, &mut transaction))
            .catch_unwind()
            .instrument(span.clone())
            .await
            .unwrap_or_else(|_| Err("the handler panicked".into()));
        if handled.is_ok() {
            span.in_scope(|| tracing::debug!("handled"));
        }
        if let Err(error) = handled {
            // Dropping the transaction rolls back the claims with the handlers' writes.
            drop(transaction);
            return Err(Failed {
                failure: Failure::Handler {
                    error: error.to_string(),
                    permanent: super::is_permanent(error.as_ref()),
                },
                culprit: Some(index),
            });
        }
        if replaying_dead_letter {
            let stream_id = &message.envelope.stream_id;
            advance_park(transaction.connection(), &shared.queue, stream_id)
                .await
                .map_err(database)?;
        }
    }
    transaction.commit().await.map_err(Failure::from_store)?;
    if !applied.is_empty() {
        shared.metrics.transaction(&shared.queue);
    }
    let now = std::time::SystemTime::now();
    for &(_, message, _) in &applied {
        shared.handler.committed(message);
        // Critical time, as NServiceBus defines it: from the sender's recording.
        let recorded =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(message.envelope.timestamp_ms);
        if let Ok(age) = now.duration_since(recorded) {
            shared.metrics.consumer_critical_time(&shared.queue, age);
        }
    }
    Ok(claims)
}
