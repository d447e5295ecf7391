//! Subscriptions on a service's own store (eventstore::subscription) against a real
//! PostgreSQL: every committed event applied once, in global order, under racing
//! writers and rollbacks; a stop between the effect and the checkpoint; a poison event
//! that parks only its stream; one leader among instances, and a take-over.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use domain::order::{OrderEvent, OrderLine};
use eventstore::subscription::{self, Subscriber, SubscriptionConfig};
use eventstore::{
    EventStore, ExpectedVersion, HandlerError, Metadata, Metrics, NewEvent, Permanent,
    RecordedEvent, StoreTransaction, Subscription,
};
use projections::Runner;
use projections::order::{CustomerOrders, OrderSummaries};
use rand::Rng;
use tests::{TestDb, wait_for};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// Records every event it applies in `seen`, with who applied it: a double
/// application shows as two rows.
struct Seen {
    instance: &'static str,
    /// While set, events of streams starting with `poison` fail.
    poison: Arc<AtomicBool>,
    /// Events of streams starting with `doomed` fail for good ([`Permanent`]); counts
    /// the attempts at them.
    doomed: Arc<AtomicUsize>,
}

impl Seen {
    fn new(instance: &'static str) -> Self {
        Seen {
            instance,
            poison: Arc::new(AtomicBool::new(false)),
            doomed: Arc::default(),
        }
    }
}

impl Subscriber for Seen {
    fn wants(&self, event: &RecordedEvent) -> bool {
        !event.stream_id.starts_with("ignored")
    }

    async fn apply(
        &self,
        event: &RecordedEvent,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        if event.stream_id.starts_with("poison") && self.poison.load(Ordering::Acquire) {
            return Err(format!("{} is poison", event.stream_id).into());
        }
        if event.stream_id.starts_with("doomed") {
            self.doomed.fetch_add(1, Ordering::AcqRel);
            return Err(Permanent::error(format!(
                "{} can never apply",
                event.stream_id
            )));
        }
        sqlx::query(
            "INSERT INTO seen (instance, event_id, position, stream_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(self.instance)
        .bind(event.event_id)
        .bind(event.global_position)
        .bind(&event.stream_id)
        .execute(transaction.connection())
        .await?;
        Ok(())
    }
}

async fn with_seen_table(db: &TestDb) {
    sqlx::raw_sql(
        "CREATE TABLE seen (seq bigserial PRIMARY KEY, instance text NOT NULL, \
         event_id uuid NOT NULL, position bigint NOT NULL, stream_id text NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

fn placed(order_id: Uuid) -> NewEvent {
    let event = OrderEvent::OrderPlaced {
        order_id,
        customer_id: Uuid::from_u128(7),
        lines: vec![OrderLine {
            sku: "S-1".into(),
            quantity: 1,
            unit_price_cents: 100,
        }],
        total_cents: 100,
        currency: "EUR".into(),
        card_token: "tok_visa".into(),
    };
    let encoded = TestDb::registry().encode(&event).unwrap();
    NewEvent::new(encoded, Metadata::new(Uuid::now_v7(), Uuid::now_v7()))
}

async fn append(store: &EventStore, stream: &str, count: usize) -> Vec<NewEvent> {
    let events: Vec<NewEvent> = (0..count).map(|_| placed(Uuid::now_v7())).collect();
    store
        .append(stream, ExpectedVersion::Any, &events)
        .await
        .unwrap();
    events
}

fn start<S: Subscriber>(
    store: &EventStore,
    config: SubscriptionConfig,
    subscriber: S,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let subscription = Subscription::new(config, store.clone(), subscriber, Metrics::new());
    let task = tokio::spawn(subscription.run(cancel.clone()));
    (cancel, task)
}

/// (instance, event id) of every application, in the order they were applied.
async fn seen(db: &TestDb) -> Vec<(String, Uuid, i64)> {
    sqlx::query_as("SELECT instance, event_id, position FROM seen ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn wait_until_seen(db: &TestDb, count: usize) -> Vec<(String, Uuid, i64)> {
    wait_for(DEADLINE, &format!("{count} events applied"), || async {
        let rows = seen(db).await;
        (rows.len() >= count).then_some(rows)
    })
    .await
}

/// Eight writers with random commit delays and rollbacks while the order read models
/// and a counting subscriber tail the store: every committed event applied exactly
/// once, in global order, nothing rolled back, and the read models equal a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_every_committed_event_is_applied_once_in_order() {
    const WRITERS: usize = 8;
    let run_for = Duration::from_secs(8);
    let db = TestDb::new(WRITERS as u32 + 4).await.unwrap();
    with_seen_table(&db).await;
    let store = db.store();
    let read_models = Runner::new(
        (OrderSummaries, CustomerOrders),
        TestDb::registry(),
        db.pool.clone(),
    );
    let (stop_models, models) = start(
        &store,
        Runner::<(OrderSummaries, CustomerOrders)>::config(),
        read_models,
    );
    let (stop_seen, counting) = start(
        &store,
        SubscriptionConfig::new("test.seen"),
        Seen::new("one"),
    );
    let began = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                while began.elapsed() < run_for {
                    let (events, delay_ms, roll_back) = {
                        let mut rng = rand::rng();
                        let events: Vec<NewEvent> = (0..rng.random_range(1..=3))
                            .map(|_| placed(Uuid::now_v7()))
                            .collect();
                        (events, rng.random_range(0..15u64), rng.random_bool(0.15))
                    };
                    let mut transaction = store.begin().await.unwrap();
                    for event in &events {
                        let stream = format!("order-{}", Uuid::now_v7());
                        transaction
                            .append(
                                &stream,
                                ExpectedVersion::NoStream,
                                std::slice::from_ref(event),
                            )
                            .await
                            .unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let ids = events.iter().map(|e| e.event_id);
                    if roll_back {
                        transaction.rollback().await.unwrap();
                        rolled_back.extend(ids);
                    } else {
                        transaction.commit().await.unwrap();
                        committed.extend(ids);
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for writer in writers {
        let (c, r) = writer.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    let rows = wait_until_seen(&db, committed.len()).await;
    let ids: Vec<Uuid> = rows.iter().map(|(_, id, _)| *id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event was applied twice");
    assert_eq!(unique, committed, "applied exactly the committed events");
    assert!(unique.is_disjoint(&rolled_back));
    assert!(rows.windows(2).all(|w| w[0].2 < w[1].2), "in global order");
    assert!(
        committed.len() > 200,
        "the writers produced too little: {}",
        committed.len()
    );
    // The read models caught up with the same events, and equal a rebuild.
    let last = rows.last().unwrap().2;
    wait_for(DEADLINE, "the read models at the end", || async {
        let position = subscription::checkpoint(&db.pool, "order.read-models")
            .await
            .unwrap();
        (position >= last).then_some(())
    })
    .await;
    stop_models.cancel();
    models.await.unwrap();
    let digest = || async {
        let digest: String = sqlx::query_scalar(
            "SELECT md5(string_agg(s::text, ',' ORDER BY order_id)) FROM order_summaries s",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        digest
    };
    let live = digest().await;
    let summaries: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(summaries as usize, committed.len());
    projections::rebuild::rebuild(
        "order-summary",
        &db.pool,
        &TestDb::registry(),
        0,
        |_| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(digest().await, live, "the live read model equals a rebuild");
    stop_seen.cancel();
    counting.await.unwrap();
}

/// Stopped after applying a batch's effects and before its checkpoint (a crash there),
/// the subscription wrote nothing; started again, it applies each event once.
#[tokio::test]
async fn a_stop_between_the_effect_and_the_checkpoint_resumes_without_a_double_effect() {
    let db = TestDb::new(6).await.unwrap();
    with_seen_table(&db).await;
    let store = db.store();
    let events = append(&store, "order-1", 5).await;
    let config = SubscriptionConfig::new("test.crash");
    config.stop_before_checkpoint.store(true, Ordering::Release);
    let (_cancel, crashed) = start(&store, config, Seen::new("first"));
    // The fault hook ends the run as a crash would.
    tokio::time::timeout(DEADLINE, crashed)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen(&db).await,
        vec![],
        "the effect went with the checkpoint"
    );
    assert_eq!(
        subscription::checkpoint(&db.pool, "test.crash")
            .await
            .unwrap(),
        0
    );
    let (cancel, again) = start(
        &store,
        SubscriptionConfig::new("test.crash"),
        Seen::new("second"),
    );
    let rows = wait_until_seen(&db, 5).await;
    let ids: Vec<Uuid> = rows.iter().map(|(_, id, _)| *id).collect();
    assert_eq!(ids, events.iter().map(|e| e.event_id).collect::<Vec<_>>());
    wait_for(DEADLINE, "the checkpoint at the last event", || async {
        let position = subscription::checkpoint(&db.pool, "test.crash")
            .await
            .unwrap();
        (position == rows[4].2).then_some(())
    })
    .await;
    cancel.cancel();
    again.await.unwrap();
    assert_eq!(seen(&db).await.len(), 5, "nothing applied twice");
}

/// An event its subscriber says can never apply parks its stream after that one
/// attempt, whether it came alone or in a page with others; the others apply.
#[tokio::test]
async fn a_permanent_failure_parks_its_stream_after_one_attempt() {
    let db = TestDb::new(6).await.unwrap();
    with_seen_table(&db).await;
    let store = db.store();
    // Written before the subscription starts, so they come in one page.
    append(&store, "healthy-1", 1).await;
    let doomed_first = append(&store, "doomed-1", 1).await;
    append(&store, "healthy-2", 1).await;
    let subscriber = Seen::new("live");
    let doomed = subscriber.doomed.clone();
    let (cancel, task) = start(&store, SubscriptionConfig::new("test.doomed"), subscriber);
    wait_until_seen(&db, 2).await;
    let parked = wait_for(DEADLINE, "the doomed stream parked", || async {
        let parked = subscription::parked_events(&db.pool, &["test.doomed"])
            .await
            .unwrap();
        (!parked.is_empty()).then_some(parked)
    })
    .await;
    assert_eq!(parked[0].event.event_id, doomed_first[0].event_id);
    assert_eq!(
        doomed.load(Ordering::Acquire),
        1,
        "one attempt, in the page"
    );
    // Alone, too: one attempt.
    let doomed_alone = append(&store, "doomed-2", 1).await;
    append(&store, "healthy-3", 1).await;
    wait_until_seen(&db, 3).await;
    wait_for(DEADLINE, "the second doomed stream parked", || async {
        let parked = subscription::parked_events(&db.pool, &["test.doomed"])
            .await
            .unwrap();
        parked
            .iter()
            .any(|p| p.event.event_id == doomed_alone[0].event_id)
            .then_some(())
    })
    .await;
    assert_eq!(doomed.load(Ordering::Acquire), 2);
    cancel.cancel();
    task.await.unwrap();
}

/// An event that keeps failing parks its stream after three attempts; later events of
/// that stream wait behind it while other streams carry on. Replayed once fixed, the
/// stream's events apply in order and it flows again; skipped, the next one is up.
#[tokio::test]
async fn a_poison_event_parks_only_its_stream_until_it_is_replayed_or_skipped() {
    let db = TestDb::new(6).await.unwrap();
    with_seen_table(&db).await;
    let store = db.store();
    let subscriber = Seen::new("live");
    let poison = subscriber.poison.clone();
    poison.store(true, Ordering::Release);
    let (cancel, task) = start(&store, SubscriptionConfig::new("test.poison"), subscriber);
    let bad_first = append(&store, "poison-1", 1).await;
    append(&store, "healthy-1", 1).await;
    let bad_second = append(&store, "poison-1", 1).await;
    append(&store, "healthy-1", 1).await;
    append(&store, "ignored-1", 1).await;
    wait_until_seen(&db, 2).await;
    let streams: Vec<String> = sqlx::query_scalar("SELECT stream_id FROM seen ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(streams, ["healthy-1", "healthy-1"], "other streams flow");
    let parked = wait_for(
        DEADLINE,
        "the poison stream parked behind its first event",
        || async {
            let parked = subscription::parked_events(&db.pool, &["test.poison"])
                .await
                .unwrap();
            (parked.len() == 2).then_some(parked)
        },
    )
    .await;
    assert_eq!(parked[0].event.event_id, bad_first[0].event_id);
    assert!(
        parked[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("is poison")
    );
    assert_eq!(parked[1].event.event_id, bad_second[0].event_id);
    assert_eq!(parked[1].parked_behind, Some(bad_first[0].event_id));
    assert_eq!(
        seen(&db).await.len(),
        2,
        "nothing of the parked stream applied"
    );

    // Fixed and replayed: both apply, in order, and later events flow again.
    poison.store(false, Ordering::Release);
    let replayer = Seen::new("replay");
    let replayed = subscription::replay_parked(&store, &replayer, "test.poison", "poison-1")
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    let third = append(&store, "poison-1", 1).await;
    let rows = wait_until_seen(&db, 5).await;
    let poison_rows: Vec<(String, Uuid)> = rows
        .iter()
        .filter(|(_, id, _)| {
            [
                bad_first[0].event_id,
                bad_second[0].event_id,
                third[0].event_id,
            ]
            .contains(id)
        })
        .map(|(instance, id, _)| (instance.clone(), *id))
        .collect();
    assert_eq!(
        poison_rows,
        [
            ("replay".to_owned(), bad_first[0].event_id),
            ("replay".to_owned(), bad_second[0].event_id),
            ("live".to_owned(), third[0].event_id),
        ]
    );
    assert!(
        subscription::parked_events(&db.pool, &["test.poison"])
            .await
            .unwrap()
            .is_empty()
    );

    // Parked again, then skipped: the event behind it is the one waited for now.
    poison.store(true, Ordering::Release);
    let skipped = append(&store, "poison-2", 1).await;
    let behind = append(&store, "poison-2", 1).await;
    wait_for(DEADLINE, "poison-2 parked", || async {
        let parked = subscription::parked_events(&db.pool, &["test.poison"])
            .await
            .unwrap();
        (parked.len() == 2).then_some(())
    })
    .await;
    eventstore::parking::forget(&db.pool, "test.poison", "poison-2", skipped[0].event_id)
        .await
        .unwrap();
    let parked = subscription::parked_events(&db.pool, &["test.poison"])
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event.event_id, behind[0].event_id);
    assert_eq!(
        parked[0].parked_behind, None,
        "it is what the stream waits for now"
    );
    cancel.cancel();
    task.await.unwrap();
}

/// Two instances of one subscription: only the leader applies; when it dies, the other
/// takes over within seconds, and every event is applied once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_leads_and_another_takes_over_when_it_dies() {
    let db = TestDb::new(8).await.unwrap();
    with_seen_table(&db).await;
    let store = db.store();
    let (_first_cancel, first) = start(
        &store,
        SubscriptionConfig::new("test.pair"),
        Seen::new("first"),
    );
    // The first one leads before the second starts.
    append(&store, "order-a", 3).await;
    wait_until_seen(&db, 3).await;
    let (second_cancel, second) = start(
        &store,
        SubscriptionConfig::new("test.pair"),
        Seen::new("second"),
    );
    append(&store, "order-b", 3).await;
    let rows = wait_until_seen(&db, 6).await;
    assert!(
        rows.iter().all(|(instance, _, _)| instance == "first"),
        "{rows:?}"
    );
    // The leader dies without a word: its connections go with its task.
    first.abort();
    let _ = first.await;
    let died = Instant::now();
    append(&store, "order-c", 3).await;
    let rows = wait_until_seen(&db, 9).await;
    let took_over = died.elapsed();
    assert!(
        took_over < Duration::from_secs(10),
        "took over after {took_over:?}"
    );
    assert!(
        rows[6..]
            .iter()
            .all(|(instance, _, _)| instance == "second"),
        "{rows:?}"
    );
    let ids: HashSet<Uuid> = rows.iter().map(|(_, id, _)| *id).collect();
    assert_eq!(ids.len(), 9, "each event applied once");
    eprintln!("the standby took over {took_over:?} after the leader died");
    second_cancel.cancel();
    second.await.unwrap();
}
