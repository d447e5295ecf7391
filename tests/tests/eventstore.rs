//! The event store against a real PostgreSQL: concurrency, gap safety, idempotency,
//! the outbox, snapshots and schema evolution.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::Aggregate;
use domain::inventory::{StockCommand, StockError, StockItem};
use domain::order::{Order, OrderEvent, OrderLine};
use domain::wire::{SCHEMA_FILES, WireEvent};
use eventstore::{
    AggregateStore, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent, SchemaRegistry,
    StoreError,
};
use rand::Rng;
use sqlx::{Connection, PgConnection};
use tests::TestDb;
use tokio::sync::Barrier;
use uuid::Uuid;

fn metadata() -> Metadata {
    Metadata::new(Uuid::now_v7(), Uuid::now_v7())
}

fn placed(order_id: Uuid) -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id,
        customer_id: Uuid::from_u128(42),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_cents: 999,
        }],
        total_cents: 999,
        currency: "EUR".into(),
        card_token: "tok_visa".into(),
    }
}

fn new_event() -> NewEvent {
    let registry = TestDb::registry();
    NewEvent::new(
        registry.encode(&placed(Uuid::now_v7())).unwrap(),
        metadata(),
    )
}

/// Reads all events after `after` until at least `count` have arrived. Read-all may
/// lag (never skip) while any older transaction on the server is open, another
/// test's included, so a read right after a commit can legitimately be empty.
async fn read_all_until(store: &EventStore, after: i64, count: usize) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events: Vec<RecordedEvent> = Vec::new();
    while events.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} events became readable",
            events.len()
        );
        let from = events.last().map_or(after, |e| e.global_position);
        let page = store.read_all(from, 10_000).await.unwrap();
        if page.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        events.extend(page);
    }
    events
}

/// Transactions that have nothing to do with a store, left open: one that holds a
/// transaction id in another database, and a read-only one (holding a snapshot, so
/// the server-wide xmin) in the store's own. Neither may hold the store's readers
/// back. Their connections are made without orderflow's idle-in-transaction guard.
struct Unrelated {
    _elsewhere_db: TestDb,
    _elsewhere: PgConnection,
    _reading: PgConnection,
}

async fn unrelated_transactions(db: &TestDb) -> Unrelated {
    let elsewhere_db = TestDb::new(1).await.unwrap();
    let server: sqlx::postgres::PgConnectOptions = tests::server_url().parse().unwrap();
    let mut elsewhere = PgConnection::connect_with(&server.clone().database(&elsewhere_db.name))
        .await
        .unwrap();
    sqlx::raw_sql(
        "BEGIN; INSERT INTO snapshots (stream_id, stream_version, state_format, state) \
         VALUES ('elsewhere', 1, 'x', '{}')",
    )
    .execute(&mut elsewhere)
    .await
    .unwrap();
    let mut reading = PgConnection::connect_with(&server.database(&db.name))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM events")
        .execute(&mut reading)
        .await
        .unwrap();
    Unrelated {
        _elsewhere_db: elsewhere_db,
        _elsewhere: elsewhere,
        _reading: reading,
    }
}

async fn count(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_appenders_racing_on_one_version_have_exactly_one_winner() {
    const WRITERS: usize = 32;
    const ROUNDS: i64 = 15;
    let db = TestDb::new(WRITERS as u32 + 2).await.unwrap();
    let store = db.store();
    let mut winners = Vec::new();
    for version in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(WRITERS));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    let event = new_event();
                    barrier.wait().await;
                    let outcome = store
                        .append(
                            "race-1",
                            ExpectedVersion::Exact(version),
                            std::slice::from_ref(&event),
                        )
                        .await;
                    (event.event_id, outcome)
                })
            })
            .collect();
        let mut won = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (id, Ok(result)) => {
                    assert_eq!(result.stream_version, version + 1);
                    won.push(id);
                }
                (_, Err(StoreError::Concurrency { actual, .. })) => {
                    assert_eq!(
                        actual,
                        Some(version + 1),
                        "a loser sees the winner's version"
                    );
                }
                (_, Err(other)) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "version {} had {} winners",
            version + 1,
            won.len()
        );
        winners.extend(won);
    }
    let stored = store.read_stream("race-1", 1, 1000).await.unwrap();
    let versions: Vec<i64> = stored.iter().map(|e| e.stream_version).collect();
    assert_eq!(
        versions,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "no hole, no duplicate"
    );
    let ids: Vec<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, winners, "each version holds its winner's event");
    assert_eq!(count(&db, "events").await, ROUNDS);
    assert_eq!(count(&db, "outbox").await, ROUNDS);
}

#[tokio::test]
async fn read_all_waits_for_an_older_open_transaction_then_returns_both_in_order() {
    let db = TestDb::new(4).await.unwrap();
    let store = db.store();
    let mut a = store.begin().await.unwrap();
    let a_event = new_event();
    let a_result = a
        .append(
            "stream-a",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&a_event),
        )
        .await
        .unwrap();
    let b_event = new_event();
    let b_result = store
        .append(
            "stream-b",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&b_event),
        )
        .await
        .unwrap();
    assert!(a_result.first_position < b_result.first_position);

    // B committed, but A (older) is open: a reader must not move past A's position.
    assert_eq!(store.read_all(0, 100).await.unwrap(), vec![]);
    a.commit().await.unwrap();

    let all = read_all_until(&store, 0, 2).await;
    let ids: Vec<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, vec![a_event.event_id, b_event.event_id]);
    assert!(all[0].global_position < all[1].global_position);
    // And continuing from the last position returns nothing more.
    assert_eq!(
        store.read_all(all[1].global_position, 100).await.unwrap(),
        vec![]
    );
}

/// A transaction with an id in another database, and a long read-only one in this
/// database, hold no reader of this store back (with the server-wide xmin as the
/// fence, either stalled every reader on the server).
#[tokio::test]
async fn transactions_that_do_not_write_to_the_store_hold_no_reader_back() {
    let db = TestDb::new(4).await.unwrap();
    let store = db.store();
    let _unrelated = unrelated_transactions(&db).await;
    let event = new_event();
    store
        .append(
            "stream-u",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&event),
        )
        .await
        .unwrap();
    let fence = store.fence().await.unwrap();
    assert_eq!(fence.blocker, None, "nothing of this store's is open");
    let all = store.read_all(0, 10).await.unwrap();
    assert_eq!(all.len(), 1, "readable at once");
    assert_eq!(all[0].event_id, event.event_id);
}

/// A transaction that writes to another table first (so it has a transaction id)
/// and appends only later is waited for: events committed meanwhile by others, with
/// higher positions, are not handed out before its own.
#[tokio::test]
async fn a_writer_that_writes_elsewhere_first_and_appends_late_is_not_skipped() {
    let db = TestDb::new(4).await.unwrap();
    let store = db.store();
    let mut late = store.begin().await.unwrap();
    sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ('test', $1)")
        .bind(Uuid::now_v7())
        .execute(late.connection())
        .await
        .unwrap();
    let early = new_event();
    store
        .append(
            "stream-early",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&early),
        )
        .await
        .unwrap();
    assert_eq!(
        store.read_all(0, 10).await.unwrap(),
        vec![],
        "held back by the open writer"
    );
    let blocker = store
        .fence()
        .await
        .unwrap()
        .blocker
        .expect("the open writer is named");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(late.connection())
        .await
        .unwrap();
    assert_eq!(blocker.pid, Some(pid));
    assert!(blocker.events_waiting, "the early event waits behind it");
    let own = new_event();
    late.append(
        "stream-late",
        ExpectedVersion::NoStream,
        std::slice::from_ref(&own),
    )
    .await
    .unwrap();
    late.commit().await.unwrap();
    let all = read_all_until(&store, 0, 2).await;
    let ids: Vec<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(
        ids,
        vec![own.event_id, early.event_id],
        "the late writer's event first"
    );
}

/// A savepoint rolled back inside a writer leaves its transaction, and its id, in
/// place: the writer is still waited for, its rolled-back event is never seen, and
/// what it appends afterwards is.
#[tokio::test]
async fn a_savepoint_rolled_back_keeps_its_writer_waited_for() {
    let db = TestDb::new(4).await.unwrap();
    let store = db.store();
    let mut writer = store.begin().await.unwrap();
    sqlx::raw_sql("SAVEPOINT attempt")
        .execute(writer.connection())
        .await
        .unwrap();
    let undone = new_event();
    writer
        .append(
            "stream-s",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&undone),
        )
        .await
        .unwrap();
    sqlx::raw_sql("ROLLBACK TO SAVEPOINT attempt")
        .execute(writer.connection())
        .await
        .unwrap();
    let other = new_event();
    store
        .append(
            "stream-o",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&other),
        )
        .await
        .unwrap();
    assert_eq!(
        store.read_all(0, 10).await.unwrap(),
        vec![],
        "still held back"
    );
    let kept = new_event();
    writer
        .append(
            "stream-s",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&kept),
        )
        .await
        .unwrap();
    writer.commit().await.unwrap();
    let all = read_all_until(&store, 0, 2).await;
    let ids: Vec<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, vec![kept.event_id, other.event_id]);
}

/// Every connection orderflow makes ends a transaction left idle, so no stuck writer
/// holds readers back for long.
#[tokio::test]
async fn orderflow_connections_end_transactions_left_idle() {
    let db = TestDb::new(1).await.unwrap();
    let timeout: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(timeout, "10s");
}

#[tokio::test]
async fn a_rolled_back_append_leaves_no_event_and_no_outbox_row() {
    let db = TestDb::new(2).await.unwrap();
    let store = db.store();
    let mut tx = store.begin().await.unwrap();
    tx.append("stream-r", ExpectedVersion::Any, &[new_event()])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&db, "events").await, 0);
    assert_eq!(count(&db, "outbox").await, 0);
    assert_eq!(store.read_all(0, 10).await.unwrap(), vec![]);
}

#[tokio::test]
async fn appends_in_one_transaction_get_consecutive_positions_and_one_commit() {
    let db = TestDb::new(2).await.unwrap();
    let store = db.store();
    let mut tx = store.begin().await.unwrap();
    let first = tx
        .append(
            "s-1",
            ExpectedVersion::NoStream,
            &[new_event(), new_event()],
        )
        .await
        .unwrap();
    let second = tx
        .append("s-2", ExpectedVersion::NoStream, &[new_event()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(first.last_position, first.first_position + 1);
    assert_eq!(second.first_position, first.last_position + 1);
    let all = read_all_until(&store, 0, 3).await;
    assert_eq!(all.len(), 3);
}

/// Eight writers with random commit delays and some rollbacks; one reader tails
/// read-all the whole time. The reader must see every committed event exactly once,
/// in position order, and nothing that was rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_a_tailing_reader_sees_every_committed_event_once_in_order() {
    const WRITERS: usize = 8;
    let run_for = Duration::from_secs(20);
    let db = TestDb::new(WRITERS as u32 + 4).await.unwrap();
    let store = db.store();
    // Open for the whole run, the final drain included: they must hold nothing back.
    let unrelated = unrelated_transactions(&db).await;
    let start = Instant::now();

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                let mut stream = 0;
                while start.elapsed() < run_for {
                    let (events, delay_ms, roll_back) = {
                        let mut rng = rand::rng();
                        let events: Vec<NewEvent> =
                            (0..rng.random_range(1..=3)).map(|_| new_event()).collect();
                        (events, rng.random_range(0..15u64), rng.random_bool(0.15))
                    };
                    stream += 1;
                    let stream_id = format!("writer-{writer}-{stream}");
                    let mut tx = store.begin().await.unwrap();
                    tx.append(&stream_id, ExpectedVersion::NoStream, &events)
                        .await
                        .unwrap();
                    // Simulated work between the append and the commit, so that
                    // transactions overlap and commit out of position order.
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let ids = events.iter().map(|e| e.event_id);
                    if roll_back {
                        tx.rollback().await.unwrap();
                        rolled_back.extend(ids);
                    } else {
                        tx.commit().await.unwrap();
                        committed.extend(ids);
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();

    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen: Vec<(i64, Uuid)> = Vec::new();
            let mut last = 0;
            while start.elapsed() < run_for {
                let page = store.read_all(last, 500).await.unwrap();
                for event in &page {
                    assert!(event.global_position > last, "positions go forward");
                    last = event.global_position;
                    seen.push((event.global_position, event.event_id));
                }
                if page.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
            (seen, last)
        })
    };

    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for writer in writers {
        let (c, r) = writer.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    let (mut seen, mut last) = reader.await.unwrap();
    // The writers have stopped: drain what the reader has not reached yet.
    let expected_total = committed.len();
    let missing = expected_total.saturating_sub(seen.len());
    for event in read_all_until(&store, last, missing).await {
        assert!(event.global_position > last);
        last = event.global_position;
        seen.push((event.global_position, event.event_id));
    }
    assert_eq!(
        store.read_all(last, 10).await.unwrap(),
        vec![],
        "nothing left"
    );

    let seen_ids: Vec<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    let unique: HashSet<Uuid> = seen_ids.iter().copied().collect();
    assert_eq!(unique.len(), seen_ids.len(), "an event was seen twice");
    assert!(
        unique.is_disjoint(&rolled_back),
        "a rolled-back event was seen"
    );
    assert_eq!(unique, committed, "the reader missed committed events");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "not in position order"
    );
    assert!(
        expected_total > 500,
        "the stress produced too little: {expected_total}"
    );
    assert!(!rolled_back.is_empty());
    drop(unrelated);
    eprintln!(
        "stress: {} committed, {} rolled back, all seen once in order",
        committed.len(),
        rolled_back.len()
    );
}

#[tokio::test]
async fn re_appending_the_same_events_succeeds_and_stores_nothing_twice() {
    let db = TestDb::new(2).await.unwrap();
    let store = db.store();
    let events = vec![new_event(), new_event()];
    let first = store
        .append("order-1", ExpectedVersion::NoStream, &events)
        .await
        .unwrap();
    assert!(!first.already_stored);
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Any,
        ExpectedVersion::Exact(0),
    ] {
        let again = store.append("order-1", expected, &events).await.unwrap();
        assert!(again.already_stored, "{expected:?}");
        assert_eq!(
            (
                again.first_position,
                again.last_position,
                again.stream_version
            ),
            (first.first_position, first.last_position, 2)
        );
    }
    assert_eq!(count(&db, "events").await, 2);
    assert_eq!(count(&db, "outbox").await, 2);

    // Some ids stored, others new: that is not a retry but a conflict.
    let mixed = vec![events[0].clone(), new_event()];
    assert!(matches!(
        store.append("order-1", ExpectedVersion::Any, &mixed).await,
        Err(StoreError::EventIdConflict { .. })
    ));
    // The same ids under another stream are a conflict too.
    assert!(matches!(
        store.append("order-2", ExpectedVersion::Any, &events).await,
        Err(StoreError::EventIdConflict { .. })
    ));
    assert_eq!(count(&db, "events").await, 2);
}

#[tokio::test]
async fn expected_versions_are_enforced() {
    let db = TestDb::new(2).await.unwrap();
    let store = db.store();
    store
        .append("s", ExpectedVersion::NoStream, &[new_event()])
        .await
        .unwrap();
    match store
        .append("s", ExpectedVersion::NoStream, &[new_event()])
        .await
    {
        Err(StoreError::Concurrency {
            expected, actual, ..
        }) => {
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, Some(1));
        }
        other => panic!("expected a concurrency error, got {other:?}"),
    }
    assert!(matches!(
        store
            .append("s", ExpectedVersion::Exact(5), &[new_event()])
            .await,
        Err(StoreError::Concurrency {
            actual: Some(1),
            ..
        })
    ));
    let result = store
        .append("s", ExpectedVersion::Exact(1), &[new_event()])
        .await
        .unwrap();
    assert_eq!(result.stream_version, 2);
    let result = store
        .append("s", ExpectedVersion::Any, &[new_event(), new_event()])
        .await
        .unwrap();
    assert_eq!(result.stream_version, 4);
    assert!(matches!(
        store.append("s", ExpectedVersion::Any, &[]).await,
        Err(StoreError::BadBatch(0))
    ));
    // A version the store reported continues the stream; a stale one is refused.
    let stale = result.next_expected();
    let next = store
        .append("s", stale, &[new_event()])
        .await
        .unwrap()
        .next_expected();
    assert!(matches!(
        store.append("s", stale, &[new_event()]).await,
        Err(StoreError::Concurrency {
            actual: Some(5),
            ..
        })
    ));
    assert_eq!(
        store
            .append("s", next, &[new_event(), new_event()])
            .await
            .unwrap()
            .stream_version,
        7
    );
    let tail = store.read_stream("s", 3, 10).await.unwrap();
    assert_eq!(
        tail.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![3, 4, 5, 6, 7]
    );
    assert_eq!(store.stream_version("s").await.unwrap(), 7);
    assert_eq!(store.stream_version("nothing").await.unwrap(), 0);
}

#[tokio::test]
async fn every_event_carries_its_metadata_and_the_committed_append_wakes_the_relay() {
    let db = TestDb::new(2).await.unwrap();
    let store = db.store();
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen(eventstore::OUTBOX_CHANNEL).await.unwrap();

    let meta = metadata();
    let registry = TestDb::registry();
    let encoded = registry.encode(&placed(Uuid::now_v7())).unwrap();
    let event = NewEvent::new(encoded.clone(), meta);
    let result = store
        .append(
            "order-m",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&event),
        )
        .await
        .unwrap();

    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a NOTIFY arrives")
        .unwrap();
    assert_eq!(notification.channel(), eventstore::OUTBOX_CHANNEL);

    let stored = &store.read_stream("order-m", 1, 1).await.unwrap()[0];
    assert_eq!(stored.event_id, event.event_id);
    assert_eq!(stored.event_id.get_version_num(), 7, "event ids are UUIDv7");
    assert_eq!(stored.correlation_id, meta.correlation_id);
    assert_eq!(stored.causation_id, meta.causation_id);
    assert_eq!(stored.schema_fingerprint, encoded.fingerprint);
    assert_eq!(stored.event_type, "OrderPlaced");
    assert_eq!(stored.global_position, result.first_position);
    assert!(
        (chrono::Utc::now() - stored.recorded_at)
            .num_seconds()
            .abs()
            < 60
    );
    let outbox: Vec<i64> = sqlx::query_scalar("SELECT global_position FROM outbox")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, vec![result.first_position]);
}

#[tokio::test]
async fn deleting_snapshots_changes_no_loaded_state() {
    let db = TestDb::new(4).await.unwrap();
    let aggregates = AggregateStore::new(db.store(), TestDb::registry()).with_snapshot_after(5);
    let stream = AggregateStore::stream_id::<StockItem>("SKU-9");
    let run = |command: StockCommand| {
        let (aggregates, stream) = (aggregates.clone(), stream.clone());
        async move {
            aggregates
                .execute::<StockItem>(&stream, None, &command, metadata())
                .await
                .unwrap()
        }
    };
    run(StockCommand::AddStock {
        sku: "SKU-9".into(),
        name: "Gadget".into(),
        quantity: 100,
    })
    .await;
    for n in 0..30u128 {
        let order_id = Uuid::from_u128(n);
        run(StockCommand::ReserveStock {
            order_id,
            quantity: 2,
        })
        .await;
        let settle = if n % 3 == 0 {
            StockCommand::ReleaseStock { order_id }
        } else {
            StockCommand::CommitStock { order_id }
        };
        if n % 5 != 4 {
            run(settle).await;
        }
    }
    let with_snapshot = aggregates.load::<StockItem>(&stream).await.unwrap();
    assert!(
        with_snapshot.from_snapshot,
        "loads along the way saved a snapshot"
    );
    assert!(with_snapshot.events_read < 5);

    assert_eq!(aggregates.delete_snapshots(None).await.unwrap(), 1);
    let without = aggregates.load::<StockItem>(&stream).await.unwrap();
    assert!(!without.from_snapshot);
    assert_eq!(without.state, with_snapshot.state);
    assert_eq!(without.version, with_snapshot.version);
    let item = without.state;
    assert_eq!(item.total(), 100);
    assert_eq!(item.reserved, 2 * item.reservations.len() as u64);

    // A snapshot of an unknown format is ignored, not trusted.
    sqlx::query("UPDATE snapshots SET state_format = 'StockItem/0', state = '{}'")
        .execute(&db.pool)
        .await
        .unwrap();
    let reloaded = aggregates.load::<StockItem>(&stream).await.unwrap();
    assert_eq!(reloaded.state, item);
}

/// Writers whose transactions hold every connection of the pool, each loading a
/// stream whose snapshot is due, do not wait for another connection to save it (ten
/// HTTP commands waiting so on a pool of ten held it until the acquire timeout, with
/// their stream locks, at twice capacity); the snapshots are saved once they commit.
#[tokio::test]
async fn writers_holding_every_connection_never_wait_for_one_to_save_a_snapshot() {
    let db = TestDb::new(2).await.unwrap();
    let aggregates = AggregateStore::new(db.store(), TestDb::registry()).with_snapshot_after(1);
    let streams = ["SKU-P1", "SKU-P2"].map(AggregateStore::stream_id::<StockItem>);
    for (stream, sku) in streams.iter().zip(["SKU-P1", "SKU-P2"]) {
        let add = StockCommand::AddStock {
            sku: sku.into(),
            name: sku.into(),
            quantity: 10,
        };
        aggregates
            .execute::<StockItem>(stream, None, &add, metadata())
            .await
            .unwrap();
    }
    let reserve = StockCommand::ReserveStock {
        order_id: Uuid::now_v7(),
        quantity: 1,
    };
    let mut first = aggregates.event_store().begin().await.unwrap();
    let mut second = aggregates.event_store().begin().await.unwrap();
    let both = async {
        for (transaction, stream) in [(&mut first, &streams[0]), (&mut second, &streams[1])] {
            aggregates
                .execute_in::<StockItem>(transaction, stream, None, &reserve, metadata())
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("a load waited for a connection nobody could give back");
    first.commit().await.unwrap();
    second.commit().await.unwrap();
    tests::wait_for(Duration::from_secs(10), "both snapshots", || async {
        let saved: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (saved == 2).then_some(())
    })
    .await;
}

/// An OrderPlaced stored by the v1 code (no currency) is loaded by today's code.
#[tokio::test]
async fn a_stored_v1_event_is_read_by_v2_code() {
    let db = TestDb::new(2).await.unwrap();
    let v1_only: Vec<_> = SCHEMA_FILES
        .iter()
        .copied()
        .filter(|f| f.version == 1)
        .collect();
    let old_code = SchemaRegistry::from_files(&v1_only).unwrap();
    let new_code = TestDb::registry();
    assert_ne!(
        old_code.current_fingerprint("OrderPlaced"),
        new_code.current_fingerprint("OrderPlaced")
    );

    // The v1 code wrote the record without a currency field, under the v1 schema.
    let order_id = Uuid::now_v7();
    let v1_schema = apache_avro::Schema::parse_str(
        SCHEMA_FILES
            .iter()
            .find(|f| f.event_type == "OrderPlaced" && f.version == 1)
            .unwrap()
            .text,
    )
    .unwrap();
    let apache_avro::types::Value::Record(mut fields) = placed(order_id).to_avro().unwrap() else {
        panic!("an event is an Avro record");
    };
    fields.retain(|(name, _)| name != "currency" && name != "card_token");
    let fingerprint = old_code.current_fingerprint("OrderPlaced").unwrap();
    let mut payload = vec![0xC3, 0x01];
    payload.extend_from_slice(&fingerprint.to_le_bytes());
    apache_avro::writer::datum::GenericDatumWriter::builder(&v1_schema)
        .build()
        .unwrap()
        .write_value(&mut payload, apache_avro::types::Value::Record(fields))
        .unwrap();
    let v1_event = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "OrderPlaced".into(),
        schema_fingerprint: fingerprint,
        payload,
        metadata: metadata(),
    };
    let stream = AggregateStore::stream_id::<Order>(order_id);
    db.store()
        .append(&stream, ExpectedVersion::NoStream, &[v1_event])
        .await
        .unwrap();

    let aggregates = AggregateStore::new(db.store(), new_code.clone());
    let order = aggregates.load::<Order>(&stream).await.unwrap().state;
    assert_eq!(
        order.currency, "EUR",
        "the v2 default fills the missing field"
    );
    // (v3 added the card token; the order does not keep it, the event does.)
    assert_eq!(order.total_cents, 999);

    // The other way round: old code meets a v2 event. It learns the writer schema from
    // the registry table the new code published, and resolves the event into its own
    // (v1) reader schema: forward compatibility.
    let v2 = new_code.encode(&placed(order_id)).unwrap();
    assert!(matches!(
        old_code.decode_value(&v2.payload),
        Err(eventstore::CodecError::UnknownFingerprint(_))
    ));
    new_code.publish(&db.pool).await.unwrap();
    assert!(old_code.learn(&db.pool, v2.fingerprint).await.unwrap());
    let (event_type, value) = old_code.decode_value(&v2.payload).unwrap();
    assert_eq!(event_type, "OrderPlaced");
    let apache_avro::types::Value::Record(fields) = value else {
        panic!("an event is an Avro record");
    };
    let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["order_id", "customer_id", "lines", "total_cents"]);
    assert_eq!(
        fields[0].1,
        apache_avro::types::Value::String(order_id.to_string())
    );
}

#[tokio::test]
async fn a_pinned_version_is_refused_once_the_stream_moved_and_unpinned_commands_retry() {
    let db = TestDb::new(8).await.unwrap();
    let aggregates = AggregateStore::new(db.store(), TestDb::registry());
    let stream = AggregateStore::stream_id::<StockItem>("SKU-P");
    let add = |quantity| StockCommand::AddStock {
        sku: "SKU-P".into(),
        name: "Pinned".into(),
        quantity,
    };
    let created = aggregates
        .execute::<StockItem>(&stream, Some(0), &add(1), metadata())
        .await
        .unwrap();
    assert_eq!(created.version, 2);
    let stale = aggregates
        .execute::<StockItem>(&stream, Some(1), &add(1), metadata())
        .await;
    assert!(matches!(
        stale,
        Err(eventstore::ExecuteError::Store(StoreError::Concurrency {
            actual: Some(2),
            ..
        }))
    ));
    // Unpinned restocks racing each other all land.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (aggregates, stream) = (aggregates.clone(), stream.clone());
            tokio::spawn(async move {
                aggregates
                    .execute::<StockItem>(&stream, None, &add(1), metadata())
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let item = aggregates.load::<StockItem>(&stream).await.unwrap().state;
    assert_eq!(item.available, 9);
}

/// `execute_in` with `Some(0)` creates a stream without loading it, and refuses a
/// stream that already exists rather than appending to it.
#[tokio::test]
async fn creating_in_a_transaction_refuses_a_stream_that_exists() {
    let db = TestDb::new(2).await.unwrap();
    let aggregates = AggregateStore::new(db.store(), TestDb::registry());
    let stream = AggregateStore::stream_id::<StockItem>("SKU-NEW");
    let add = StockCommand::AddStock {
        sku: "SKU-NEW".into(),
        name: "New".into(),
        quantity: 3,
    };
    let create = |aggregates: AggregateStore, stream: String, add: StockCommand| async move {
        let mut transaction = aggregates.event_store().begin().await.unwrap();
        let executed = aggregates
            .execute_in::<StockItem>(&mut transaction, &stream, Some(0), &add, metadata())
            .await?;
        transaction.commit().await?;
        Ok::<_, eventstore::ExecuteError<_>>(executed)
    };
    let created = create(aggregates.clone(), stream.clone(), add.clone())
        .await
        .unwrap();
    assert_eq!(created.version, 2);
    assert_eq!(created.state.available, 3);
    let again = create(aggregates.clone(), stream.clone(), add).await;
    assert!(
        matches!(
            again,
            Err(eventstore::ExecuteError::Store(
                StoreError::Concurrency { .. }
            ))
        ),
        "{again:?}"
    );
    let item = aggregates.load::<StockItem>(&stream).await.unwrap();
    assert_eq!((item.version, item.state.available), (2, 3));
}

/// The aggregate's stream reads back exactly what `decide` produced.
#[tokio::test]
async fn a_stream_reads_back_what_was_decided() {
    let db = TestDb::new(2).await.unwrap();
    let aggregates = AggregateStore::new(db.store(), TestDb::registry());
    let order_id = Uuid::now_v7();
    let stream = AggregateStore::stream_id::<Order>(order_id);
    let place = domain::order::OrderCommand::PlaceOrder {
        order_id,
        customer_id: Uuid::now_v7(),
        lines: vec![OrderLine {
            sku: "A".into(),
            quantity: 3,
            unit_price_cents: 100,
        }],
        currency: "EUR".into(),
        card_token: "tok_visa".into(),
    };
    let placed = aggregates
        .execute::<Order>(&stream, None, &place, metadata())
        .await
        .unwrap();
    let confirmed = aggregates
        .execute::<Order>(
            &stream,
            None,
            &domain::order::OrderCommand::ConfirmOrder,
            metadata(),
        )
        .await
        .unwrap();
    let mut decided = placed.events.clone();
    decided.extend(confirmed.events.clone());
    let stored: Vec<OrderEvent> = db
        .store()
        .read_stream(&stream, 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| aggregates.registry().decode(&e.payload).unwrap())
        .collect();
    assert_eq!(stored, decided);
    assert_eq!(
        Order::default().replay(&stored).status,
        Some(domain::order::OrderStatus::Confirmed)
    );
    let by_type: BTreeMap<String, usize> =
        read_all_until(&db.store(), 0, 2)
            .await
            .iter()
            .fold(BTreeMap::new(), |mut acc, e| {
                *acc.entry(e.event_type.clone()).or_default() += 1;
                acc
            });
    assert_eq!(by_type.len(), 2);
}

#[tokio::test]
async fn a_transaction_older_than_a_streams_head_cannot_append_before_it_in_global_order() {
    let db = TestDb::new(4).await.unwrap();
    let store = db.store();
    // The transaction gets its id by writing first, as a consumer's inbox claim does;
    // then another writer commits the head of "shared".
    let mut older = store.begin().await.unwrap();
    older
        .append("first-write", ExpectedVersion::NoStream, &[new_event()])
        .await
        .unwrap();
    let head = store
        .append("shared", ExpectedVersion::NoStream, &[new_event()])
        .await
        .unwrap();

    for expected in [
        head.next_expected(),
        ExpectedVersion::Exact(1),
        ExpectedVersion::Any,
    ] {
        let error = older
            .append("shared", expected, &[new_event()])
            .await
            .unwrap_err();
        assert!(
            matches!(error, StoreError::Reordered { .. }),
            "{expected}: {error}"
        );
        assert!(error.is_concurrency(), "callers retry it like a conflict");
    }
    // A wrong version is still an ordinary conflict.
    let error = older
        .append("shared", ExpectedVersion::Exact(5), &[new_event()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Concurrency {
                actual: Some(1),
                ..
            }
        ),
        "{error}"
    );
    older.rollback().await.unwrap();

    // Retried in a new transaction, the append lands after the head.
    let mut newer = store.begin().await.unwrap();
    newer
        .append("first-write", ExpectedVersion::NoStream, &[new_event()])
        .await
        .unwrap();
    let appended = newer
        .append("shared", head.next_expected(), &[new_event()])
        .await
        .unwrap();
    newer.commit().await.unwrap();
    assert!(appended.first_position > head.last_position);
    let shared = store.read_stream("shared", 1, 10).await.unwrap();
    assert!(shared[0].global_position < shared[1].global_position);
}

/// Two processes of one service over one database, each with its own state cache.
fn two_cached_processes(db: &TestDb) -> (AggregateStore, AggregateStore) {
    let process = || AggregateStore::new(db.store(), TestDb::registry()).with_state_cache(100);
    (process(), process())
}

/// Runs `command` as a consumer handler does: in a transaction, trusting the cache.
async fn write_trusting_cache(
    aggregates: &AggregateStore,
    stream: &str,
    command: StockCommand,
) -> Result<eventstore::Executed<StockItem>, eventstore::ExecuteError<StockError>> {
    let mut transaction = aggregates.event_store().begin().await.unwrap();
    let executed = aggregates
        .execute_to_write::<StockItem>(&mut transaction, stream, &command, metadata())
        .await?;
    transaction.commit().await.unwrap();
    Ok(executed)
}

fn restock(sku: &str, quantity: u32) -> StockCommand {
    StockCommand::AddStock {
        sku: sku.into(),
        name: "Cached".into(),
        quantity,
    }
}

fn reserve(order: u128, quantity: u32) -> StockCommand {
    StockCommand::ReserveStock {
        order_id: Uuid::from_u128(order),
        quantity,
    }
}

/// A cached state another process has overtaken is trusted once: its append
/// conflicts (nothing is written on the stale state) and drops it, and the next
/// attempt reads the stream.
#[tokio::test]
async fn a_cached_state_behind_its_stream_fails_its_append_and_the_next_attempt_reads() {
    let db = TestDb::new(4).await.unwrap();
    let (here, elsewhere) = two_cached_processes(&db);
    let stream = AggregateStore::stream_id::<StockItem>("SKU-C");
    write_trusting_cache(&here, &stream, restock("SKU-C", 10))
        .await
        .unwrap();
    write_trusting_cache(&here, &stream, reserve(1, 2))
        .await
        .unwrap();
    write_trusting_cache(&elsewhere, &stream, reserve(2, 3))
        .await
        .unwrap();

    let stale = write_trusting_cache(&here, &stream, reserve(3, 1)).await;
    assert!(
        matches!(&stale, Err(eventstore::ExecuteError::Store(error)) if error.is_concurrency()),
        "appending on the stale state must conflict: {stale:?}"
    );
    let retried = write_trusting_cache(&here, &stream, reserve(3, 1))
        .await
        .unwrap();
    assert_eq!(retried.version, 5);
    assert_eq!(retried.state.available, 4);
    assert_eq!(retried.state.reservations.len(), 3);
    let loaded = AggregateStore::new(db.store(), TestDb::registry())
        .load::<StockItem>(&stream)
        .await
        .unwrap();
    assert_eq!(loaded.state, retried.state);
}

/// A decision to write nothing is not checked by any append: taken on a stale cached
/// state (no reservation to release, though another process has since reserved), it
/// must look at the stream and decide again.
#[tokio::test]
async fn deciding_nothing_on_a_stale_cached_state_looks_at_the_stream_first() {
    let db = TestDb::new(4).await.unwrap();
    let (here, elsewhere) = two_cached_processes(&db);
    let stream = AggregateStore::stream_id::<StockItem>("SKU-D");
    write_trusting_cache(&here, &stream, restock("SKU-D", 10))
        .await
        .unwrap();
    write_trusting_cache(&elsewhere, &stream, reserve(7, 4))
        .await
        .unwrap();

    let release = StockCommand::ReleaseStock {
        order_id: Uuid::from_u128(7),
    };
    let released = write_trusting_cache(&here, &stream, release).await.unwrap();
    assert_eq!(released.version, 4, "the release was decided and stored");
    assert_eq!(released.state.available, 10);
    assert!(released.state.reservations.is_empty());
}

/// A state written by a transaction that rolled back stays in the cache as pending.
/// If another process then stores a different event at that version, the pending
/// state must not be taken for it.
#[tokio::test]
async fn a_rolled_back_write_is_never_taken_for_the_event_another_process_stored() {
    let db = TestDb::new(4).await.unwrap();
    let (here, elsewhere) = two_cached_processes(&db);
    let stream = AggregateStore::stream_id::<StockItem>("SKU-R");
    write_trusting_cache(&here, &stream, restock("SKU-R", 10))
        .await
        .unwrap();
    let mut transaction = here.event_store().begin().await.unwrap();
    here.execute_to_write::<StockItem>(&mut transaction, &stream, &reserve(1, 5), metadata())
        .await
        .unwrap();
    transaction.rollback().await.unwrap();
    write_trusting_cache(&elsewhere, &stream, reserve(2, 1))
        .await
        .unwrap();

    let loaded = here.load::<StockItem>(&stream).await.unwrap();
    assert_eq!(loaded.version, 3);
    assert_eq!(loaded.state.available, 9);
    assert!(loaded.state.reservations.contains_key(&Uuid::from_u128(2)));
    assert!(!loaded.state.reservations.contains_key(&Uuid::from_u128(1)));
    let next = write_trusting_cache(&here, &stream, reserve(3, 1))
        .await
        .unwrap();
    assert_eq!((next.version, next.state.available), (4, 8));
}

/// Without other writers, a cached stream is written without being read: what the
/// cache holds is what the stream says.
#[tokio::test]
async fn a_stream_written_through_the_cache_loads_the_same_from_the_database() {
    let db = TestDb::new(4).await.unwrap();
    let (here, _) = two_cached_processes(&db);
    let stream = AggregateStore::stream_id::<StockItem>("SKU-S");
    write_trusting_cache(&here, &stream, restock("SKU-S", 50))
        .await
        .unwrap();
    let mut last = None;
    for order in 0..20 {
        write_trusting_cache(&here, &stream, reserve(order, 2))
            .await
            .unwrap();
        let release = StockCommand::CommitStock {
            order_id: Uuid::from_u128(order),
        };
        last = Some(write_trusting_cache(&here, &stream, release).await.unwrap());
    }
    let cached = here.load::<StockItem>(&stream).await.unwrap();
    assert!(cached.from_cache);
    assert_eq!(cached.events_read, 0);
    let uncached = AggregateStore::new(db.store(), TestDb::registry())
        .load::<StockItem>(&stream)
        .await
        .unwrap();
    assert_eq!(uncached.version, 42);
    assert_eq!(cached.state, uncached.state);
    assert_eq!(last.map(|executed| executed.state), Some(uncached.state));
}

/// The read fence widens a running transaction's 32-bit id against the snapshot's
/// xmax, and running ids lie on either side of it (xmax is one past the last
/// *completed* id): each must come out as the 64-bit id it stands for, across an
/// epoch boundary too. (Taken as if always below xmax, an id just above it came out
/// 2^32 too low, and held every reader back.)
#[tokio::test]
async fn the_fence_widens_running_ids_on_either_side_of_the_horizon() {
    let db = TestDb::new(1).await.unwrap();
    let epoch = 1_i64 << 32;
    for (next, xid32, full) in [
        (1001, 1002, 1002),
        (1001, 999, 999),
        (1001, 1001, 1001),
        (epoch + 5, (epoch - 6) % epoch, epoch - 6),
        (epoch - 3, 2, epoch + 2),
        (
            3 * epoch + 100,
            100 + (1 << 30),
            3 * epoch + 100 + (1 << 30),
        ),
    ] {
        let widened: i64 = sqlx::query_scalar("SELECT orderflow_xid8($1, $2::text::xid)")
            .bind(next)
            .bind(xid32.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(widened, full, "next {next}, xid {xid32}");
    }
}
