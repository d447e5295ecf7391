//! Applying a page of events with the checkpoint in one transaction, one event at a
//! time when the page fails, and parking the stream of an event that keeps failing.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::{Connection, PgConnection};
use tracing::Instrument;

use super::{Attempt, Subscriber, Subscription, TermError};
use crate::backoff::TermEnd;
use crate::store::{RecordedEvent, StoreError};
use crate::trace;

impl<S: Subscriber> Subscription<S> {
    /// Applies one page's wanted events with the checkpoint `last`: in one transaction,
    /// or, if that fails, one event at a time, parking the stream of an event that
    /// keeps failing. `Some` when the term must end.
    pub(super) async fn apply_page(
        &self,
        writer: &mut PgConnection,
        wanted: &[&RecordedEvent],
        last: i64,
        stored: &mut i64,
        parked: &mut HashSet<String>,
    ) -> Result<Option<TermEnd>, TermError> {
        let whole = self.attempt(writer, wanted, *stored, last, parked).await;
        let (failure, doomed_at) = match whole {
            Ok(()) => {
                *stored = last;
                return Ok(None);
            }
            Err(Attempt::Failed(error)) => (error, None),
            Err(Attempt::Permanent(error, position)) => (error, Some(position)),
            Err(other) => return self.end_term(other),
        };
        tracing::debug!(%failure, events = wanted.len(), "a batch failed; applying its events one by one");
        for &event in wanted {
            // Why the event is parked, once it is: an event that said in the batch it
            // can never apply gets no further attempt.
            let mut verdict = (doomed_at == Some(event.global_position)).then(|| failure.clone());
            let mut tries = 0;
            while verdict.is_none() {
                match self
                    .attempt(writer, &[event], *stored, event.global_position, parked)
                    .await
                {
                    Ok(()) => {
                        *stored = event.global_position;
                        break;
                    }
                    Err(Attempt::Permanent(error, _)) => verdict = Some(error),
                    Err(Attempt::Failed(error)) => match self.config.retry_delays.get(tries) {
                        Some(pause) => {
                            self.metrics.subscription_failed(&self.config.name);
                            tracing::debug!(%error, position = event.global_position, "applying failed; trying again");
                            tries += 1;
                            tokio::time::sleep(*pause).await;
                        }
                        None => verdict = Some(error),
                    },
                    Err(other) => return self.end_term(other),
                }
            }
            if let Some(error) = verdict {
                self.metrics.subscription_failed(&self.config.name);
                self.park(writer, event, &error, stored).await?;
                parked.insert(event.stream_id.clone());
            }
        }
        // The rest of the page was not wanted: the checkpoint moves past it.
        self.persist(writer, stored, last).await?;
        Ok(None)
    }

    /// How an attempt that was not the events' fault ends the term.
    fn end_term(&self, attempt: Attempt) -> Result<Option<TermEnd>, TermError> {
        match attempt {
            Attempt::Infrastructure(error) => Err(error),
            Attempt::LostLead => Err(TermError::LostLead),
            Attempt::FaultInjected => Ok(Some(TermEnd::FaultInjected)),
            Attempt::Failed(error) | Attempt::Permanent(error, _) => {
                Err(TermError::Database(sqlx::Error::Protocol(error)))
            }
        }
    }

    /// One transaction: lock the events' streams, apply each (or record it behind its
    /// parked stream), move the checkpoint from `from` to `to`, commit.
    async fn attempt(
        &self,
        writer: &mut PgConnection,
        events: &[&RecordedEvent],
        from: i64,
        to: i64,
        parked: &mut HashSet<String>,
    ) -> Result<(), Attempt> {
        let span = tracing::info_span!(
            "transaction",
            otel.kind = "consumer",
            orderflow.service = self.config.name.split('.').next().unwrap_or_default(),
            subscription = %self.config.name,
            events = events.len(),
            trace_id = tracing::field::Empty,
        );
        let traces: Vec<_> = events.iter().map(|event| event.traceparent).collect();
        trace::serve_all(&span, &traces);
        let outcome = self
            .transaction(writer, events, from, to, parked)
            .instrument(span)
            .await;
        match outcome {
            Err(Attempt::Failed(error)) if !alive(writer).await => {
                Err(Attempt::Infrastructure(TermError::Database(
                    sqlx::Error::Protocol(format!("the connection failed while applying: {error}")),
                )))
            }
            other => other,
        }
    }

    async fn transaction(
        &self,
        writer: &mut PgConnection,
        events: &[&RecordedEvent],
        from: i64,
        to: i64,
        parked: &mut HashSet<String>,
    ) -> Result<(), Attempt> {
        let name = self.config.name.as_str();
        let failed = |error: &dyn std::fmt::Display| Attempt::Failed(error.to_string());
        let mut transaction = self.store.begin_on(writer).await.map_err(|e| failed(&e))?;
        // The checkpoint moves first, in one statement with the locks of the streams
        // the subscriber appends to: the locks are taken before anything is written
        // (so the transaction id, which orders global positions, comes after those
        // streams' previous writers committed), and a leader that lost its lead learns
        // it before applying anything. The effects commit with it or not at all.
        let streams = transaction.streams_to_lock_in_next_statement(
            events
                .iter()
                .flat_map(|event| self.subscriber.streams_to_lock(event)),
        );
        if !move_checkpoint(transaction.connection(), name, from, to, &streams)
            .await
            .map_err(|e| failed(&e))?
        {
            return Err(Attempt::LostLead);
        }
        // Streams parked here may have been let go by an operator since (or be being
        // replayed now: the share lock waits for that to finish).
        let mut parked_now = HashSet::new();
        let touched: Vec<&str> = events
            .iter()
            .map(|event| event.stream_id.as_str())
            .filter(|stream| parked.contains(*stream))
            .collect();
        if !touched.is_empty() {
            let still: Vec<String> = sqlx::query_scalar(
                "SELECT stream_id FROM parked_streams WHERE consumer = $1 \
                 AND stream_id = ANY($2) FOR SHARE",
            )
            .bind(name)
            .bind(&touched)
            .fetch_all(transaction.connection())
            .await
            .map_err(|e| failed(&e))?;
            for stream in touched {
                if !still.iter().any(|s| s == stream) {
                    parked.remove(stream);
                }
            }
            parked_now.extend(still);
        }
        let mut applied = Vec::with_capacity(events.len());
        for &event in events {
            if parked_now.contains(&event.stream_id) {
                park_behind(transaction.connection(), name, event)
                    .await
                    .map_err(|e| failed(&e))?;
                continue;
            }
            let span = trace::handling(
                &event.event_type,
                event.event_id,
                &event.stream_id,
                event.correlation_id,
                event.traceparent,
                events.len() == 1,
            );
            AssertUnwindSafe(self.subscriber.apply(event, &mut transaction))
                .catch_unwind()
                .instrument(span.clone())
                .await
                .unwrap_or_else(|_| Err("the subscriber panicked".into()))
                .map_err(|error| {
                    let text = format!("event at {}: {error}", event.global_position);
                    if transient(error.as_ref()) {
                        // A deadlock, a lock or pool timeout: not the event's fault.
                        Attempt::Infrastructure(TermError::Database(sqlx::Error::Protocol(text)))
                    } else if crate::consumer::is_permanent(error.as_ref()) {
                        Attempt::Permanent(text, event.global_position)
                    } else {
                        Attempt::Failed(text)
                    }
                })?;
            span.in_scope(|| tracing::debug!("applied"));
            applied.push(event.recorded_at);
        }
        if self.config.stop_before_checkpoint.load(Ordering::Acquire) {
            return Err(Attempt::FaultInjected);
        }
        transaction.commit().await.map_err(|e| failed(&e))?;
        self.metrics
            .subscription_applied(name, applied.len() as u64);
        let now = chrono::Utc::now();
        for recorded_at in applied {
            if let Ok(age) = (now - recorded_at).to_std() {
                self.metrics.subscription_critical_time(name, age);
            }
        }
        Ok(())
    }

    /// Parks `event`'s stream behind it and moves the checkpoint past it.
    async fn park(
        &self,
        writer: &mut PgConnection,
        event: &RecordedEvent,
        error: &str,
        stored: &mut i64,
    ) -> Result<(), TermError> {
        let name = self.config.name.as_str();
        tracing::warn!(
            stream = %event.stream_id,
            position = event.global_position,
            correlation_id = %event.correlation_id,
            %error,
            "an event failed for good; its stream is parked"
        );
        let mut transaction = writer.begin().await?;
        let parked = sqlx::query(
            "INSERT INTO parked_streams (consumer, stream_id, blocking_message_id, error) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, stream_id) DO NOTHING",
        )
        .bind(name)
        .bind(&event.stream_id)
        .bind(event.event_id)
        .bind(error)
        .execute(&mut *transaction)
        .await?;
        if parked.rows_affected() == 0 {
            // Parked already (by an earlier process under this name): behind that.
            park_behind(&mut transaction, name, event).await?;
        }
        if !move_checkpoint(&mut transaction, name, *stored, event.global_position, &[]).await? {
            return Err(TermError::LostLead);
        }
        transaction.commit().await?;
        *stored = event.global_position;
        self.metrics.subscription_parked(name);
        Ok(())
    }

    /// Writes a checkpoint that moved over unwanted events only.
    pub(super) async fn persist(
        &self,
        writer: &mut PgConnection,
        stored: &mut i64,
        checkpoint: i64,
    ) -> Result<(), TermError> {
        if *stored >= checkpoint {
            return Ok(());
        }
        if !move_checkpoint(writer, &self.config.name, *stored, checkpoint, &[]).await? {
            return Err(TermError::LostLead);
        }
        *stored = checkpoint;
        Ok(())
    }
}

/// Records `event` behind its stream's parked event, in order, unapplied.
pub(super) async fn park_behind(
    connection: &mut PgConnection,
    name: &str,
    event: &RecordedEvent,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO parked_messages (consumer, stream_id, message_id) \
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(&event.stream_id)
    .bind(event.event_id)
    .execute(connection)
    .await
    .map(drop)
}

/// Moves a subscription's checkpoint from `from` to `to`, first taking the locks of
/// `streams` (none: an empty slice); false when it was not at `from` (another leader
/// moved it).
pub(super) async fn move_checkpoint(
    connection: &mut PgConnection,
    name: &str,
    from: i64,
    to: i64,
    streams: &[String],
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(concat!(
        "WITH locked AS (SELECT ",
        crate::store::stream_locks!("$4"),
        ") UPDATE subscription_checkpoints SET position = $3, updated_at = now() \
         FROM locked WHERE subscription = $1 AND position = $2 AND locked.locks >= 0",
    ))
    .bind(name)
    .bind(from)
    .bind(to)
    .bind(streams)
    .execute(connection)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Whether an error says the database could not do it now rather than that the event
/// cannot be applied: a lost connection, a pool or lock timeout, a deadlock, a
/// serialization failure, a server shutting down.
fn transient(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let database = error.downcast_ref::<sqlx::Error>().or_else(|| {
            match error.downcast_ref::<StoreError>() {
                Some(StoreError::Database(database)) => Some(database),
                _ => None,
            }
        });
        if let Some(database) = database {
            return match database {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
                sqlx::Error::Database(database) => database.code().is_some_and(|code| {
                    ["40001", "40P01", "55P03", "57014"].contains(&code.as_ref())
                        || code.starts_with("08")
                        || code.starts_with("57P0")
                }),
                _ => false,
            };
        }
        cause = error.source();
    }
    false
}

/// Whether a connection still answers (after a failed transaction).
async fn alive(connection: &mut PgConnection) -> bool {
    tokio::time::timeout(Duration::from_secs(5), connection.ping())
        .await
        .is_ok_and(|pinged| pinged.is_ok())
}
