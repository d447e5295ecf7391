//! Rebuilding a read model from its service's event store (`orderflow replay
//! <projection>`), with the same `apply` the live consumer runs.
//!
//! The rebuild writes into fresh copies of the projection's tables, in a schema of its
//! own (`rebuild_<name>`), by putting that schema first on its connection's
//! `search_path`: `apply`'s SQL names its tables without a schema, so the same code
//! writes the copies. Queries keep reading the live tables meanwhile. When the event
//! store has been read to its end, one transaction locks the live tables, applies to
//! the copies whatever the live consumer applied that the rebuild had not seen (from the
//! consumer's per-stream progress), and swaps the copies in. So the swapped-in model
//! holds every event the live consumer applied, and the live consumer carries on from
//! where it was: events it applies later that the rebuild already saw change nothing,
//! since every read-model row is guarded by its stream version.
//!
//! Stopping a rebuild (cancel, a crash) leaves the live tables untouched; the copies
//! are dropped then or by the next rebuild. One rebuild of a projection runs at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use eventstore::{EventStore, RecordedEvent, SchemaRegistry, StoreError};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::inventory::StockLevels;
use crate::order::{CustomerOrders, OrderSummaries};
use crate::payment::PaymentStatuses;
use crate::user::UserProfiles;
use crate::{EventContext, Projection};

/// A projection as the operator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Catalogued {
    pub name: &'static str,
    pub service: &'static str,
    pub tables: &'static [&'static str],
    pub about: &'static str,
}

/// Every projection, by name.
pub const CATALOG: &[Catalogued] = &[
    entry::<OrderSummaries>("one summary per order (GET /orders/{id})"),
    entry::<CustomerOrders>("each customer's orders (GET /customers/{id}/orders)"),
    entry::<StockLevels>("stock per SKU (GET /inventory/items/{sku})"),
    entry::<PaymentStatuses>("each order's payment (GET /payments/{order_id})"),
    entry::<UserProfiles>("each user's profile and preferences (GET /users/{id})"),
];

const fn entry<P: Projection>(about: &'static str) -> Catalogued {
    Catalogued {
        name: P::NAME,
        service: P::SERVICE,
        tables: P::TABLES,
        about,
    }
}

/// The projection called `name`.
pub fn find(name: &str) -> Option<&'static Catalogued> {
    CATALOG.iter().find(|projection| projection.name == name)
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no projection is called {0:?}")]
    Unknown(String),
    #[error("another rebuild of {0} is running")]
    Busy(&'static str),
    #[error("stopped; the live read model is untouched")]
    Cancelled,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    #[error("event at position {position} cannot be read: {error}")]
    Undecodable { position: i64, error: String },
    #[error("a rebuild worker failed: {0}")]
    Worker(String),
}

/// How far a rebuild got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Events applied to the copies so far.
    pub applied: u64,
    /// Events the rebuild expects to apply (counted when it started).
    pub total: u64,
    /// The global position read up to.
    pub position: i64,
}

/// What a finished rebuild did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebuilt {
    /// Events applied from the event store.
    pub events: u64,
    /// Events applied while swapping, that the live consumer had applied meanwhile.
    pub caught_up: u64,
    pub seconds: f64,
}

/// Events read from the store and applied per transaction.
const PAGE: i64 = 2_000;

/// Rebuilds the projection called `name` from the events in `pool` (its service's
/// database) and swaps it in. `progress` is told after every page.
///
/// With `from` above 0 it does not start from empty tables: the copies start as the
/// live rows, and only the events after `from` are applied again (rows already past an
/// event are left as they are, by their version guard). That repairs a read model
/// that missed events after a known position, such as one restored from an older
/// backup, without reading the whole store.
pub async fn rebuild(
    name: &str,
    pool: &PgPool,
    registry: &SchemaRegistry,
    from: i64,
    progress: impl FnMut(Progress),
    cancel: &CancellationToken,
) -> Result<Rebuilt, RebuildError> {
    let run = Run {
        pool,
        registry,
        from,
        cancel,
    };
    match name {
        OrderSummaries::NAME => run.rebuild(OrderSummaries, progress).await,
        CustomerOrders::NAME => run.rebuild(CustomerOrders, progress).await,
        StockLevels::NAME => run.rebuild(StockLevels, progress).await,
        PaymentStatuses::NAME => run.rebuild(PaymentStatuses, progress).await,
        UserProfiles::NAME => run.rebuild(UserProfiles, progress).await,
        other => Err(RebuildError::Unknown(other.to_owned())),
    }
}

struct Run<'a> {
    pool: &'a PgPool,
    registry: &'a SchemaRegistry,
    from: i64,
    cancel: &'a CancellationToken,
}

/// Connections filling the copies side by side, each with the streams that hash to
/// it, so a stream's events are still applied one after the other, in order.
const WORKERS: usize = 8;

impl Run<'_> {
    async fn rebuild<P: Projection>(
        &self,
        projection: P,
        mut progress: impl FnMut(Progress),
    ) -> Result<Rebuilt, RebuildError> {
        let started = Instant::now();
        // A connection of its own: its search_path must not go back to the pool.
        let mut work = self.pool.acquire().await?.detach();
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(2, hashtext($1))")
            .bind(P::NAME)
            .fetch_one(&mut work)
            .await?;
        if !locked {
            return Err(RebuildError::Busy(P::NAME));
        }
        let copies = Copies::<P>::new();
        copies.create(&mut work, self.from > 0).await?;
        let applier = Arc::new(Applier {
            projection,
            registry: self.registry.clone(),
            pool: self.pool.clone(),
        });
        let outcome = self
            .fill_and_swap(&applier, &copies, &mut work, &mut progress)
            .await;
        if outcome.is_err() {
            // Best effort: the next rebuild drops them anyway.
            let _ = copies.drop_schema(&mut work).await;
        }
        let _ = work.close().await;
        let (events, caught_up) = outcome?;
        Ok(Rebuilt {
            events,
            caught_up,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn fill_and_swap<P: Projection>(
        &self,
        applier: &Arc<Applier<P>>,
        copies: &Copies<P>,
        work: &mut PgConnection,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(u64, u64), RebuildError> {
        let store = EventStore::new(self.pool.clone());
        let total = eventstore::store::count_after_on(work, self.from, P::STREAM_PREFIX).await?;
        let mut status = Progress {
            applied: 0,
            total: total.max(0) as u64,
            position: self.from,
        };
        let applied = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::with_capacity(WORKERS);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..WORKERS {
            let connection = copies.connect(self.pool).await?;
            let (sender, batches) = tokio::sync::mpsc::channel(2);
            senders.push(sender);
            workers.spawn(fill(applier.clone(), connection, batches, applied.clone()));
        }
        let mut stopped = false;
        loop {
            if self.cancel.is_cancelled() {
                stopped = true;
                break;
            }
            let page = store.read_all(status.position, PAGE).await?;
            let Some(last) = page.last() else { break };
            status.position = last.global_position;
            let full = page.len() as i64 == PAGE;
            let mut batches: Vec<Vec<RecordedEvent>> = vec![Vec::new(); WORKERS];
            for event in page {
                if event.stream_id.starts_with(P::STREAM_PREFIX) {
                    batches[worker_of(&event.stream_id)].push(event);
                }
            }
            let mut failed = false;
            for (sender, batch) in senders.iter().zip(batches) {
                if !batch.is_empty() && sender.send(batch).await.is_err() {
                    failed = true; // that worker stopped on an error, reported below
                }
            }
            status.applied = applied.load(Ordering::Relaxed);
            progress(status);
            if failed || !full {
                break;
            }
        }
        drop(senders);
        while let Some(done) = workers.join_next().await {
            done.map_err(|error| RebuildError::Worker(error.to_string()))??;
        }
        status.applied = applied.load(Ordering::Relaxed);
        progress(status);
        if stopped || self.cancel.is_cancelled() {
            return Err(RebuildError::Cancelled);
        }
        let caught_up = swap(applier, copies, work, status.position).await?;
        Ok((status.applied, caught_up))
    }
}

/// The worker a stream's events go to.
fn worker_of(stream_id: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(stream_id) as usize % WORKERS
}

/// One worker: applies each batch it is sent in a transaction of its own.
async fn fill<P: Projection>(
    applier: Arc<Applier<P>>,
    mut connection: PgConnection,
    mut batches: tokio::sync::mpsc::Receiver<Vec<RecordedEvent>>,
    applied: Arc<AtomicU64>,
) -> Result<(), RebuildError> {
    while let Some(batch) = batches.recv().await {
        let mut transaction = connection.begin().await?;
        for event in &batch {
            applier.apply(event, &mut transaction).await?;
        }
        transaction.commit().await?;
        applied.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    let _ = connection.close().await;
    Ok(())
}

/// Locks the live tables, brings the copies up to what the live subscription applied,
/// and puts the copies in their place, in one transaction. The copies hold every event
/// up to `read_up_to`; the live read model everything up to its subscription's
/// checkpoint, which cannot move while the tables are locked (the subscription writes
/// them in the transaction that moves it). Events between the two are applied to the
/// copies; if the live model is behind the copies instead, its subscription applies
/// them again after the swap, which changes nothing (every row keeps the version of
/// the last event it reflects, and older ones pass it by).
async fn swap<P: Projection>(
    applier: &Applier<P>,
    copies: &Copies<P>,
    work: &mut PgConnection,
    read_up_to: i64,
) -> Result<u64, RebuildError> {
    for table in P::TABLES {
        execute(work, format!("ANALYZE {}.{table}", copies.schema)).await?;
    }
    let mut transaction = work.begin().await?;
    // Queries queue behind the lock while it is wanted: give up rather than hold
    // them for long behind a busy writer.
    execute(
        &mut transaction,
        "SET LOCAL lock_timeout = '10s'".to_owned(),
    )
    .await?;
    let live = P::TABLES
        .iter()
        .map(|table| format!("public.{table}"))
        .collect::<Vec<_>>()
        .join(", ");
    execute(
        &mut transaction,
        format!("LOCK TABLE {live} IN ACCESS EXCLUSIVE MODE"),
    )
    .await?;
    let applied_live =
        eventstore::subscription::checkpoint_on(&mut transaction, &crate::queue(P::SERVICE))
            .await?;
    let mut caught_up = 0;
    let mut after = read_up_to;
    while after < applied_live {
        let events: Vec<RecordedEvent> =
            eventstore::store::read_between_on(&mut transaction, after, applied_live, PAGE).await?;
        let Some(last) = events.last() else { break };
        after = last.global_position;
        for event in events
            .iter()
            .filter(|e| e.stream_id.starts_with(P::STREAM_PREFIX))
        {
            applier.apply(event, &mut transaction).await?;
            caught_up += 1;
        }
    }
    copies.move_in(&mut transaction).await?;
    transaction.commit().await?;
    // Swapped in; the emptied schema is dropped by the next rebuild if not now.
    if let Err(error) = copies.drop_schema(work).await {
        tracing::warn!(%error, schema = %copies.schema, "could not drop the rebuild schema");
    }
    Ok(caught_up)
}

/// What applying a recorded event to the copies takes; shared by the workers.
struct Applier<P> {
    projection: P,
    registry: SchemaRegistry,
    /// For learning writer schemas this code does not know.
    pool: PgPool,
}

impl<P: Projection> Applier<P> {
    async fn apply(
        &self,
        event: &RecordedEvent,
        connection: &mut PgConnection,
    ) -> Result<(), RebuildError> {
        let undecodable = |error: String| RebuildError::Undecodable {
            position: event.global_position,
            error,
        };
        let decoded = match self.registry.decode::<P::Event>(&event.payload) {
            Err(eventstore::CodecError::UnknownFingerprint(fingerprint)) => {
                self.registry
                    .learn(&self.pool, fingerprint)
                    .await
                    .map_err(|error| undecodable(error.to_string()))?;
                self.registry.decode::<P::Event>(&event.payload)
            }
            other => other,
        }
        .map_err(|error| undecodable(error.to_string()))?;
        let context =
            EventContext::from_recorded(event).map_err(|error| undecodable(error.to_string()))?;
        self.projection
            .apply(&decoded, &context, connection)
            .await?;
        Ok(())
    }
}

/// The fresh copies of a projection's tables, in the schema `rebuild_<name>`.
struct Copies<P> {
    schema: String,
    projection: std::marker::PhantomData<P>,
}

impl<P: Projection> Copies<P> {
    fn new() -> Self {
        Copies {
            schema: format!("rebuild_{}", P::NAME.replace('-', "_")),
            projection: std::marker::PhantomData,
        }
    }

    /// Makes the copies (what an earlier, stopped rebuild left is dropped first), with
    /// the live tables' index names, holding the live rows when `with_rows`, else
    /// empty; and points the connection at them.
    async fn create(&self, work: &mut PgConnection, with_rows: bool) -> Result<(), sqlx::Error> {
        let schema = &self.schema;
        self.drop_schema(work).await?;
        execute(work, format!("CREATE SCHEMA {schema}")).await?;
        for table in P::TABLES {
            execute(
                work,
                format!("CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"),
            )
            .await?;
            // Copied indexes get generated names; give them the live ones, so the
            // swapped-in table looks exactly like the one it replaces.
            let renames: Vec<(String, String)> = sqlx::query_as(
                "SELECT c.indexname::text, l.indexname::text FROM pg_indexes c \
                 JOIN pg_indexes l ON l.schemaname = 'public' AND l.tablename = c.tablename \
                  AND split_part(l.indexdef, ' USING ', 2) = split_part(c.indexdef, ' USING ', 2) \
                  AND (l.indexdef LIKE 'CREATE UNIQUE %') = (c.indexdef LIKE 'CREATE UNIQUE %') \
                 WHERE c.schemaname = $1 AND c.tablename = $2 AND c.indexname <> l.indexname",
            )
            .bind(schema)
            .bind(table)
            .fetch_all(&mut *work)
            .await?;
            for (copy, live) in renames {
                execute(
                    work,
                    format!("ALTER INDEX {schema}.\"{copy}\" RENAME TO \"{live}\""),
                )
                .await?;
            }
            if with_rows {
                execute(
                    work,
                    format!("INSERT INTO {schema}.{table} SELECT * FROM public.{table}"),
                )
                .await?;
            }
        }
        execute(work, format!("SET search_path = {schema}, public")).await
    }

    /// Another connection pointed at the copies (for a worker), committing without
    /// waiting for the disk: a rebuild that dies is started again anyway.
    async fn connect(&self, pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
        let mut connection = pool.acquire().await?.detach();
        let schema = &self.schema;
        execute(
            &mut connection,
            format!("SET search_path = {schema}, public"),
        )
        .await?;
        execute(&mut connection, "SET synchronous_commit = off".to_owned()).await?;
        Ok(connection)
    }

    /// Drops the live tables and moves the copies into their place.
    async fn move_in(&self, transaction: &mut PgConnection) -> Result<(), sqlx::Error> {
        for table in P::TABLES {
            execute(transaction, format!("DROP TABLE public.{table}")).await?;
            execute(
                transaction,
                format!("ALTER TABLE {}.{table} SET SCHEMA public", self.schema),
            )
            .await?;
        }
        Ok(())
    }

    async fn drop_schema(&self, work: &mut PgConnection) -> Result<(), sqlx::Error> {
        execute(work, "RESET search_path".to_owned()).await?;
        execute(
            work,
            format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
        )
        .await
    }
}

/// Runs a statement built from the projection's own constant names (never from
/// input).
async fn execute(connection: &mut PgConnection, statement: String) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(statement))
        .execute(connection)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_projection_is_catalogued_once_with_its_tables() {
        let mut names: Vec<&str> = CATALOG.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
        assert_eq!(
            find("stock-levels").map(|p| p.tables),
            Some(&["stock_levels"][..])
        );
        assert!(CATALOG.iter().all(|p| !p.tables.is_empty()));
        assert_eq!(find("nope"), None);
    }
}
