//! The order-fulfilment saga end to end: order, inventory and payment in-process on
//! free ports, each with a fresh database, all in a fresh RabbitMQ virtual host. Each
//! test places orders over HTTP and waits (with a deadline) for the saga to end them,
//! then checks the order, the stock, the payment and the saga's history.

use std::time::Duration;

use domain::inventory::{ReservationReply, StockLine};
use domain::order::{OrderEvent, OrderLine};
use domain::payment::PaymentEvent;
use domain::wire::WireEvent;
use eventstore::amqp::{EVENTS_EXCHANGE, Envelope};
use eventstore::{
    AggregateStore, EventStore, ExpectedVersion, Handler, Message, NewEvent, RecordedEvent,
    SchemaRegistry, Subscriber,
};
use reqwest::StatusCode;
use sagas::fulfilment::Settings;
use sagas::runner::FulfilmentRunner;
use serde_json::{Value, json};
use services::config::Service::{self, Inventory, Order, Payment};
use tests::{System, TestDb, answer, consumer_duplicates, wait_for};
use uuid::Uuid;

const TRIO: [Service; 3] = [Order, Inventory, Payment];
const DEADLINE: Duration = Duration::from_secs(30);

async fn add_stock(system: &System, sku: &str, quantity: u32) {
    let body = json!({ "sku": sku, "name": sku, "quantity": quantity });
    let (status, reply) = answer(system.post(Inventory, "/inventory/items", body).await).await;
    assert!(status.is_success(), "{reply}");
}

/// Places an order and returns its id.
async fn place(system: &System, lines: &[(&str, u32)], card_token: &str) -> String {
    let lines: Vec<Value> = lines
        .iter()
        .map(
            |(sku, quantity)| json!({ "sku": sku, "quantity": quantity, "unit_price_cents": 1000 }),
        )
        .collect();
    let body = json!({ "customer_id": Uuid::now_v7(), "lines": lines, "card_token": card_token });
    let (status, reply) = answer(system.post(Order, "/orders", body).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    reply["order_id"].as_str().unwrap().to_owned()
}

/// Waits until the order's read model shows a status other than `pending`.
async fn ended(system: &System, order_id: &str) -> Value {
    wait_for(DEADLINE, "the order to end", || async {
        let (status, order) = system.get(Order, &format!("/orders/{order_id}")).await;
        (status == StatusCode::OK && order["status"] != "pending").then_some(order)
    })
    .await
}

/// Asserts how an order that did not confirm ended, and why.
fn assert_outcome(order: &Value, status: &str, reason: &str) {
    assert_eq!(
        (&order["status"], &order["reason"]),
        (&json!(status), &json!(reason)),
        "{order}"
    );
}

/// Waits until the saga reaches `step`.
async fn saga_at(system: &System, order_id: &str, step: &str) -> Value {
    wait_for(DEADLINE, step, || async {
        let (status, saga) = system.get(Order, &format!("/sagas/{order_id}")).await;
        (status == StatusCode::OK && saga["step"] == step).then_some(saga)
    })
    .await
}

/// Waits until the item shows these (available, reserved, sold).
async fn stock_is(system: &System, sku: &str, expected: (u64, u64, u64)) {
    wait_for(DEADLINE, &format!("{sku} at {expected:?}"), || async {
        let (_, item) = system
            .get(Inventory, &format!("/inventory/items/{sku}"))
            .await;
        let levels = (
            item["available"].as_u64()?,
            item["reserved"].as_u64()?,
            item["sold"].as_u64()?,
        );
        (levels == expected).then_some(())
    })
    .await
}

async fn payment_status(system: &System, order_id: &str) -> Option<String> {
    let (status, payment) = system.get(Payment, &format!("/payments/{order_id}")).await;
    (status == StatusCode::OK).then(|| payment["status"].as_str().unwrap().to_owned())
}

fn history(saga: &Value) -> Vec<(String, Vec<String>)> {
    saga["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            let commands = step["commands"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            (step["input"].as_str().unwrap().to_owned(), commands)
        })
        .collect()
}

#[tokio::test]
async fn a_paid_order_is_confirmed_its_stock_sold_and_its_payment_captured() {
    let system = System::start(&TRIO).await;
    add_stock(&system, "A", 10).await;
    add_stock(&system, "B", 5).await;
    let order_id = place(&system, &[("A", 2), ("B", 1), ("A", 1)], "tok_visa").await;
    let order = ended(&system, &order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    let saga = saga_at(&system, &order_id, "completed").await;
    assert!(saga["deadline_at"].is_null(), "{saga}");
    stock_is(&system, "A", (7, 0, 3)).await;
    stock_is(&system, "B", (4, 0, 1)).await;
    wait_for(DEADLINE, "the capture", || async {
        (payment_status(&system, &order_id).await.as_deref() == Some("captured")).then_some(())
    })
    .await;
    let steps = history(&saga);
    let inputs: Vec<&str> = steps.iter().map(|(input, _)| input.as_str()).collect();
    assert_eq!(inputs[0], "OrderPlaced");
    assert_eq!(steps[0].1, ["ReserveStock"]);
    let confirm = steps
        .iter()
        .find(|(input, _)| input == "PaymentAuthorized")
        .expect("authorized");
    assert_eq!(confirm.1, ["ConfirmOrder", "CommitStock", "CapturePayment"]);
    assert_eq!(inputs.last(), Some(&"PaymentCaptured"));
    system.stop().await;
}

#[tokio::test]
async fn short_stock_rejects_the_order_and_holds_nothing() {
    let system = System::start(&TRIO).await;
    add_stock(&system, "A", 10).await;
    add_stock(&system, "B", 1).await;
    let order_id = place(&system, &[("A", 2), ("B", 2)], "tok_visa").await;
    let order = ended(&system, &order_id).await;
    assert_outcome(&order, "rejected", "out_of_stock");
    stock_is(&system, "A", (10, 0, 0)).await;
    stock_is(&system, "B", (1, 0, 0)).await;
    assert_eq!(
        payment_status(&system, &order_id).await,
        None,
        "never charged"
    );
    system.stop().await;
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_and_cancels_the_order() {
    let system = System::start(&TRIO).await;
    add_stock(&system, "A", 10).await;
    let order_id = place(&system, &[("A", 4)], "tok_decline").await;
    let order = ended(&system, &order_id).await;
    assert_outcome(&order, "cancelled", "payment_declined");
    stock_is(&system, "A", (10, 0, 0)).await;
    wait_for(DEADLINE, "the payment declined", || async {
        (payment_status(&system, &order_id).await.as_deref() == Some("declined")).then_some(())
    })
    .await;
    system.stop().await;
}

#[tokio::test]
async fn no_payment_answer_within_the_deadline_compensates() {
    let system = System::start_with(&TRIO, &[("ORDERFLOW_PAYMENT_DEADLINE_MS", "300")]).await;
    add_stock(&system, "A", 10).await;
    let order_id = place(&system, &[("A", 3)], "tok_timeout").await;
    let order = ended(&system, &order_id).await;
    assert_outcome(&order, "cancelled", "payment_timeout");
    stock_is(&system, "A", (10, 0, 0)).await;
    let saga = saga_at(&system, &order_id, "cancelled").await;
    let timed_out = history(&saga)
        .into_iter()
        .find(|(input, _)| input == "DeadlinePassed")
        .expect("the deadline fired");
    assert_eq!(
        timed_out.1,
        [
            "ReleaseStock A",
            "VoidPayment",
            "CancelOrder payment_timeout"
        ]
    );
    assert!(saga["deadline_at"].is_null(), "{saga}");
    system.stop().await;
}

#[tokio::test]
async fn cancelling_a_pending_order_compensates_what_was_done() {
    let system = System::start(&TRIO).await;
    add_stock(&system, "A", 10).await;
    // The payment never answers and the deadline is 30 s: the order waits for it.
    let order_id = place(&system, &[("A", 2)], "tok_timeout").await;
    let saga = saga_at(&system, &order_id, "authorizing_payment").await;
    assert!(
        saga["deadline_at"].is_string(),
        "a deadline is pending: {saga}"
    );
    stock_is(&system, "A", (8, 2, 0)).await;
    let cancel = format!("/orders/{order_id}/cancel");
    let (status, reply) = answer(system.post(Order, &cancel, json!({})).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    let order = ended(&system, &order_id).await;
    assert_outcome(&order, "cancelled", "customer_request");
    stock_is(&system, "A", (10, 0, 0)).await;
    let saga = saga_at(&system, &order_id, "cancelled").await;
    assert!(saga["deadline_at"].is_null(), "{saga}");
    system.stop().await;
}

/// A capture the provider refuses after the order is confirmed is never dropped: the
/// saga records each refusal (its history and state show it) and asks again after
/// `ORDERFLOW_CAPTURE_RETRY_MS` until the capture lands, exactly once.
#[tokio::test]
async fn a_refused_capture_is_retried_and_shown_until_it_lands() {
    let system = System::start_with(&TRIO, &[("ORDERFLOW_CAPTURE_RETRY_MS", "200")]).await;
    add_stock(&system, "A", 10).await;
    // The simulated provider refuses this card's capture twice.
    let order_id = place(&system, &[("A", 1)], "tok_capture_flaky").await;
    assert_eq!(ended(&system, &order_id).await["status"], "confirmed");
    let saga = saga_at(&system, &order_id, "completed").await;
    let steps = history(&saga);
    let after_confirming: Vec<(&str, Vec<&str>)> = steps
        .iter()
        .skip_while(|(input, _)| input != "PaymentAuthorized")
        .skip(1)
        .map(|(input, commands)| {
            let commands = commands.iter().map(String::as_str).collect();
            (input.as_str(), commands)
        })
        .collect();
    let refused = "PaymentCaptureFailed provider_unavailable";
    assert_eq!(
        after_confirming,
        [
            (refused, vec![]),
            ("DeadlinePassed", vec!["CapturePayment"]),
            (refused, vec![]),
            ("DeadlinePassed", vec!["CapturePayment"]),
            ("PaymentCaptured", vec![]),
        ],
        "{saga}"
    );
    assert_eq!(saga["state"]["capture_attempts"], 3, "{saga}");
    assert_eq!(saga["state"]["capture_failures"], 2, "{saga}");
    assert!(saga["state"]["last_capture_error"].is_null(), "{saga}");
    wait_for(DEADLINE, "the capture", || async {
        (payment_status(&system, &order_id).await.as_deref() == Some("captured")).then_some(())
    })
    .await;
    let payment = system.pool(Payment).await;
    let outcomes: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE event_type LIKE 'PaymentCapture%' \
         ORDER BY global_position",
    )
    .fetch_all(&payment)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        [
            "PaymentCaptureFailed",
            "PaymentCaptureFailed",
            "PaymentCaptured"
        ]
    );
    payment.close().await;
    system.stop().await;
}

/// The load generator's outcome mode (issue 5's benchmark) follows each order through
/// the three services to its outcome.
#[tokio::test]
async fn the_load_generator_follows_orders_to_their_outcome() {
    let system = System::start(&TRIO).await;
    let config = services::load::LoadConfig {
        order_url: system.url(Order, ""),
        inventory_url: system.url(Inventory, ""),
        rate: 20.0,
        duration: Duration::from_secs(2),
        warmup: Duration::from_millis(500),
        skus: 3,
        customers: 5,
        query_ratio: 0.0,
        max_in_flight: 16,
        outcome: true,
    };
    let report = services::load::run(config, |_| {}).await.expect("load run");
    assert_eq!(report.commands_failed, 0, "{report}");
    let followed = report.order_to_outcome.count;
    assert!(followed >= 20, "{report}");
    assert_eq!(
        report.outcomes,
        [("confirmed".to_owned(), followed)],
        "{report}"
    );
    // The rest were stock additions, read back as usual.
    assert_eq!(
        followed + report.command_to_read_model.count + report.read_model_behind,
        report.commands_ok,
        "{report}"
    );
    system.stop().await;
}

/// DESIGN §8 invariants 1–4 under contention: 200 orders for 50 units, mixed cards.
#[tokio::test]
async fn concurrent_orders_for_scarce_stock_all_end_and_the_books_balance() {
    // All 200 at once, each taken (the default would refuse those past 16 in hand).
    let system = System::start_with(
        &TRIO,
        &[
            ("ORDERFLOW_PAYMENT_DEADLINE_MS", "1000"),
            ("ORDERFLOW_MAX_COMMANDS_IN_FLIGHT", "256"),
        ],
    )
    .await;
    add_stock(&system, "SCARCE", 50).await;
    let tokens = ["tok_visa", "tok_visa", "tok_decline", "tok_timeout"];
    let placing = (0..200).map(|i| {
        let system = &system;
        async move {
            let token = tokens[i % tokens.len()];
            (place(system, &[("SCARCE", 1)], token).await, token)
        }
    });
    let orders = futures_util::future::join_all(placing).await;
    let mut confirmed = 0;
    for (order_id, token) in &orders {
        let order = ended(&system, order_id).await;
        let status = order["status"].as_str().unwrap();
        let payment = payment_status(&system, order_id).await;
        match status {
            "confirmed" => {
                confirmed += 1;
                assert_eq!(*token, "tok_visa", "{order}");
                wait_for(DEADLINE, "the capture", || async {
                    (payment_status(&system, order_id).await.as_deref() == Some("captured"))
                        .then_some(())
                })
                .await;
            }
            "rejected" => assert_eq!(order["reason"], "out_of_stock", "{order}"),
            "cancelled" => {
                // Never captured; an authorization, if any, was voided.
                assert!(
                    matches!(payment.as_deref(), None | Some("declined" | "voided")),
                    "{order} {payment:?}"
                );
            }
            other => panic!("order {order_id} ended {other}"),
        }
    }
    assert!(confirmed > 0 && confirmed <= 50, "{confirmed} confirmed");
    // Every unit is available or sold; nothing stays reserved for an ended order.
    stock_is(&system, "SCARCE", (50 - confirmed, 0, confirmed)).await;
    // No effect twice: one stock movement per command, one capture per payment.
    let inventory = system.pool(Inventory).await;
    let repeated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events \
         WHERE event_type IN ('StockReserved', 'StockReleased', 'StockCommitted') \
         GROUP BY causation_id, stream_id HAVING count(*) > 1) AS twice",
    )
    .fetch_one(&inventory)
    .await
    .unwrap();
    assert_eq!(repeated, 0, "a stock command moved stock twice");
    inventory.close().await;
    let payment = system.pool(Payment).await;
    let captures: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_id, count(*) FROM events WHERE event_type = 'PaymentCaptured' \
         GROUP BY stream_id",
    )
    .fetch_all(&payment)
    .await
    .unwrap();
    assert_eq!(
        captures.len() as u64,
        confirmed,
        "one capture per confirmed order"
    );
    assert!(
        captures.iter().all(|(_, count)| *count == 1),
        "{captures:?}"
    );
    payment.close().await;
    system.stop().await;
}

#[tokio::test]
async fn an_order_placed_just_before_a_restart_completes_after_it() {
    let mut system = System::start(&TRIO).await;
    add_stock(&system, "A", 10).await;
    let order_id = place(&system, &[("A", 1)], "tok_visa").await;
    // Wherever the saga got to (the event still in the outbox, a command in a queue,
    // a step half done and rolled back), it carries on after the restart.
    system.halt().await;
    system.resume().await;
    let order = ended(&system, &order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    saga_at(&system, &order_id, "completed").await;
    stock_is(&system, "A", (9, 0, 1)).await;
    system.stop().await;
}

#[tokio::test]
async fn a_deadline_that_fell_due_while_the_service_was_down_fires_when_it_returns() {
    let mut system = System::start_with(&TRIO, &[("ORDERFLOW_PAYMENT_DEADLINE_MS", "1000")]).await;
    add_stock(&system, "A", 10).await;
    let order_id = place(&system, &[("A", 2)], "tok_timeout").await;
    saga_at(&system, &order_id, "authorizing_payment").await;
    system.halt().await;
    let db = system.pool(Order).await;
    let saga_id = Uuid::parse_str(&order_id).unwrap();
    wait_for(DEADLINE, "the deadline to pass while down", || async {
        let due: bool =
            sqlx::query_scalar("SELECT deadline_at <= now() FROM sagas WHERE saga_id = $1")
                .bind(saga_id)
                .fetch_one(&db)
                .await
                .unwrap();
        due.then_some(())
    })
    .await;
    db.close().await;
    system.resume().await;
    let order = ended(&system, &order_id).await;
    assert_outcome(&order, "cancelled", "payment_timeout");
    stock_is(&system, "A", (10, 0, 0)).await;
    system.stop().await;
}

/// DESIGN §8.4 under redelivery of everything: once the orders have ended, every
/// message the three services ever sent (events and commands) is published again, as a
/// relay that lost its marks would. Every consumer recognises each one as a duplicate
/// and nothing changes: no event recorded, no saga moved, no read model touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_delivered_twice_changes_nothing() {
    let mut system = System::start(&TRIO).await;
    add_stock(&system, "A", 10).await;
    add_stock(&system, "B", 5).await;
    let paid = place(&system, &[("A", 2), ("B", 1)], "tok_visa").await;
    let declined = place(&system, &[("A", 1)], "tok_decline").await;
    let short = place(&system, &[("B", 9)], "tok_visa").await;
    assert_eq!(ended(&system, &paid).await["status"], "confirmed");
    assert_outcome(
        &ended(&system, &declined).await,
        "cancelled",
        "payment_declined",
    );
    assert_outcome(&ended(&system, &short).await, "rejected", "out_of_stock");
    saga_at(&system, &paid, "completed").await;
    let before = quiet_books(&system).await;

    system.halt().await;
    let mut republished = 0;
    for service in TRIO {
        let db = system.pool(service).await;
        let (rows, events): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), \
             (SELECT count(*) FROM outbox o JOIN events e USING (global_position))",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&db)
            .await
            .unwrap();
        // Only what crosses to another service is in the outbox (DESIGN §3).
        assert!(events <= recorded, "{service}");
        sqlx::query("UPDATE outbox SET published_at = NULL")
            .execute(&db)
            .await
            .unwrap();
        republished += rows;
        db.close().await;
    }
    // What crosses the broker, as ARCHITECTURE.md counts it: 8 for the paid order
    // (ReserveStock, OrderStockReserved, AuthorizePayment, PaymentAuthorized,
    // CommitStock, CapturePayment, PaymentCaptured, OrderConfirmed), 6 for the
    // declined one (…, PaymentDeclined, ReleaseStock, OrderCancelled) and 3 for the
    // one short of stock (ReserveStock, OrderStockUnavailable, OrderRejected).
    assert_eq!(republished, 8 + 6 + 3, "messages to send again");
    system.resume().await;

    // Each consumer gets again every message it applied, and counts it a duplicate.
    let applied = inbox_counts(&system).await;
    wait_for(DEADLINE, "every message seen again", || async {
        let text = system.metrics(Order).await;
        let seen: Vec<(String, i64)> = applied
            .iter()
            .map(|(consumer, _)| (consumer.clone(), consumer_duplicates(&text, consumer)))
            .collect();
        (seen == applied).then_some(())
    })
    .await;
    assert_eq!(
        quiet_books(&system).await,
        before,
        "a redelivery changed something"
    );
    system.stop().await;
}

/// Every table a message can change, in every service's database, as "service table"
/// and a digest of its rows; read once nothing is in flight (no unpublished outbox row,
/// no queued or unacknowledged message) and nothing changed while that was checked.
async fn quiet_books(system: &System) -> Vec<(String, String)> {
    wait_for(DEADLINE, "the system to come to rest", || async {
        let first = books(system).await;
        let unpublished = unpublished_rows(system).await;
        let vhost = &system.vhost;
        let queued = tokio::task::block_in_place(|| vhost.queued_messages()).unwrap();
        let second = books(system).await;
        (unpublished == 0 && queued == 0 && first == second).then_some(second)
    })
    .await
}

async fn books(system: &System) -> Vec<(String, String)> {
    // Not `subscription_checkpoints`: redelivery cannot touch them (subscriptions read
    // the store), and one moved only over events nobody wanted is written lazily.
    const TABLES: [&str; 10] = [
        "events",
        "snapshots",
        "inbox",
        "consumer_streams",
        "order_summaries",
        "customer_orders",
        "stock_levels",
        "payment_statuses",
        "sagas",
        "saga_steps",
    ];
    let mut books = Vec::new();
    for service in TRIO {
        let db = system.pool(service).await;
        for table in TABLES {
            // The table names are the constants above.
            let digest: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) || ' rows ' || \
                 coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            )))
            .fetch_one(&db)
            .await
            .unwrap();
            books.push((format!("{service} {table}"), digest));
        }
        db.close().await;
    }
    books
}

async fn unpublished_rows(system: &System) -> i64 {
    let mut unpublished = 0;
    for service in TRIO {
        let db = system.pool(service).await;
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&db)
                .await
                .unwrap();
        unpublished += rows;
        db.close().await;
    }
    unpublished
}

/// (consumer, messages it applied), over every service's database.
async fn inbox_counts(system: &System) -> Vec<(String, i64)> {
    let mut counts = Vec::new();
    for service in TRIO {
        let db = system.pool(service).await;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT consumer, count(*) FROM inbox GROUP BY consumer ORDER BY consumer",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        counts.extend(rows);
        db.close().await;
    }
    counts
}

/// Two inputs of one saga handled at the same moment in two transactions, as the
/// order service may (the inventory's answer arrives from the broker while the
/// order's own cancellation arrives from its store): the second waits for the first,
/// sees what it decided, and neither input is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_and_an_own_event_for_one_saga_handled_at_once_are_both_taken() {
    let db = TestDb::new(4).await.unwrap();
    let registry = TestDb::registry();
    let runner = FulfilmentRunner::new(
        AggregateStore::new(db.store(), registry.clone()),
        Settings::default(),
    );
    let order = TwoSkuOrder::new(registry);
    let store = db.store();
    take_own(&runner, &store, &order.placed(&store).await).await;
    let cancellation = order.cancellation_requested(&store).await;

    // The answer is decided and not yet committed when the cancellation comes in.
    let first = take(&runner, &store, &order.reserved()).await;
    let second = tokio::spawn({
        let (runner, store) = (runner.clone(), store.clone());
        async move { take_own(&runner, &store, &cancellation).await }
    });
    wait_for(
        DEADLINE,
        "the cancellation to wait for the answer",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        },
    )
    .await;
    first.commit().await.unwrap();
    second.await.unwrap();
    // Reserved, the payment asked for, then cancelled: the stock released, the
    // authorization voided.
    let saga = saga_row(&db, order.order_id).await;
    assert_eq!(saga, (3, "cancelled".to_owned()));
    assert_eq!(
        commands_sent(&db).await,
        [
            "ReserveStock",
            "AuthorizePayment",
            "ReleaseStock",
            "VoidPayment"
        ]
    );
    assert_eq!(
        steps(&db, order.order_id).await,
        ["OrderPlaced", "StockReserved", "OrderCancellationRequested"]
    );
}

/// Two order-service processes share a saga's inputs: one still holds the saga as it
/// left it when the other has moved it on. Its next input must be decided on the row
/// as it is, not on the stale copy: a decision to do nothing on the copy is checked
/// on the row, and the input is decided again.
#[tokio::test]
async fn a_saga_moved_on_by_another_process_is_decided_on_its_row() {
    let db = TestDb::new(4).await.unwrap();
    let registry = TestDb::registry();
    let process = || {
        let aggregates = AggregateStore::new(db.store(), registry.clone()).with_state_cache(100);
        FulfilmentRunner::new(aggregates, Settings::default())
    };
    let (here, elsewhere) = (process(), process());
    let order = TwoSkuOrder::new(registry.clone());
    let store = db.store();
    let commit = |runner: FulfilmentRunner, message: Message| {
        let store = store.clone();
        async move {
            take(&runner, &store, &message)
                .await
                .commit()
                .await
                .unwrap()
        }
    };
    take_own(&here, &store, &order.placed(&store).await).await;
    commit(elsewhere, order.reserved()).await;
    // `here` still has the saga at version 1, reserving stock, where an authorized
    // payment means nothing.
    commit(here, order.authorized()).await;
    assert_eq!(
        saga_row(&db, order.order_id).await,
        (3, "capturing".to_owned())
    );
    assert_eq!(
        commands_sent(&db).await,
        [
            "ReserveStock",
            "AuthorizePayment",
            "CommitStock",
            "CapturePayment"
        ]
    );
}

/// An order of one unit each of SKUs A and B, as the saga's inputs.
struct TwoSkuOrder {
    order_id: Uuid,
    registry: SchemaRegistry,
}

impl TwoSkuOrder {
    fn new(registry: SchemaRegistry) -> Self {
        TwoSkuOrder {
            order_id: Uuid::now_v7(),
            registry,
        }
    }

    /// The order placed, recorded in `store` as the order service records it, and read
    /// back as the saga's subscription reads it.
    async fn placed(&self, store: &EventStore) -> RecordedEvent {
        let line = |sku: &str| OrderLine {
            sku: sku.to_owned(),
            quantity: 1,
            unit_price_cents: 500,
        };
        self.record(
            store,
            &OrderEvent::OrderPlaced {
                order_id: self.order_id,
                customer_id: Uuid::now_v7(),
                lines: vec![line("A"), line("B")],
                total_cents: 1000,
                currency: "EUR".to_owned(),
                card_token: "tok_visa".to_owned(),
            },
        )
        .await
    }

    async fn cancellation_requested(&self, store: &EventStore) -> RecordedEvent {
        let event = OrderEvent::OrderCancellationRequested {
            order_id: self.order_id,
        };
        self.record(store, &event).await
    }

    /// Appends `event` to the order's stream and reads it back.
    async fn record(&self, store: &EventStore, event: &OrderEvent) -> RecordedEvent {
        let stream = format!("order-{}", self.order_id);
        let encoded = self.registry.encode(event).unwrap();
        let metadata = eventstore::Metadata::new(Uuid::now_v7(), Uuid::now_v7());
        let appended = store
            .append(
                &stream,
                ExpectedVersion::Any,
                &[NewEvent::new(encoded, metadata)],
            )
            .await
            .unwrap();
        let version = appended.stream_version;
        store
            .read_stream(&stream, version, 1)
            .await
            .unwrap()
            .remove(0)
    }

    /// The inventory's one answer: both lines held.
    fn reserved(&self) -> Message {
        let reply = ReservationReply::OrderStockReserved {
            order_id: self.order_id,
            lines: ["A", "B"]
                .map(|sku| StockLine {
                    sku: sku.to_owned(),
                    quantity: 1,
                })
                .to_vec(),
        };
        let stream = ReservationReply::stream_id(domain::ids::OrderId::new(self.order_id));
        message(&self.registry, "inventory", &stream, &reply)
    }

    fn authorized(&self) -> Message {
        let event = PaymentEvent::PaymentAuthorized {
            order_id: self.order_id,
            customer_id: None,
            amount_cents: 1000,
            authorization_id: "auth-1".to_owned(),
        };
        let stream = format!("payment-{}", self.order_id);
        message(&self.registry, "payment", &stream, &event)
    }
}

/// The saga's version and step.
async fn saga_row(db: &TestDb, order_id: Uuid) -> (i64, String) {
    sqlx::query_as("SELECT version, state->>'step' FROM sagas WHERE saga_id = $1")
        .bind(order_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The commands the saga queued for other services, in order.
async fn commands_sent(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT message_type FROM outbox WHERE target_service IS NOT NULL ORDER BY global_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The inputs of the saga's history, in order.
async fn steps(db: &TestDb, order_id: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT input FROM saga_steps WHERE saga_id = $1 ORDER BY version")
        .bind(order_id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Runs the saga on the order's own `event` as its subscription does (its streams
/// locked first), and commits.
async fn take_own(runner: &FulfilmentRunner, store: &EventStore, event: &RecordedEvent) {
    let mut transaction = store.begin().await.unwrap();
    let streams = Subscriber::streams_to_lock(runner, event);
    transaction.lock_streams(&streams).await.unwrap();
    Subscriber::apply(runner, event, &mut transaction)
        .await
        .unwrap();
    transaction.commit().await.unwrap();
}

/// Runs the saga on `message` as its consumer does (its streams locked first), and
/// returns the open transaction.
async fn take<'a>(
    runner: &FulfilmentRunner,
    store: &'a EventStore,
    message: &Message,
) -> eventstore::StoreTransaction<'a> {
    let mut transaction = store.begin().await.unwrap();
    let streams = Handler::streams_to_lock(runner, message);
    transaction.lock_streams(&streams).await.unwrap();
    runner.handle(message, &mut transaction).await.unwrap();
    transaction
}

/// `event` as the consumer hands it to a handler: encoded, then decoded by the
/// registry, with its envelope.
fn message(
    registry: &SchemaRegistry,
    service: &str,
    stream_id: &str,
    event: &impl WireEvent,
) -> Message {
    let encoded = registry.encode(event).unwrap();
    let (_, value) = registry.decode_value(&encoded.payload).unwrap();
    Message {
        envelope: Envelope {
            message_id: Uuid::now_v7(),
            message_type: encoded.event_type.to_owned(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            stream_id: stream_id.to_owned(),
            stream_version: Some(1),
            global_position: 1,
            schema_fingerprint: encoded.fingerprint,
            timestamp_ms: 0,
            trace: None,
        },
        value,
        payload: encoded.payload,
        exchange: EVENTS_EXCHANGE.to_owned(),
        routing_key: format!("{service}.{}", encoded.event_type),
        redelivered: false,
    }
}

/// A connection of the test's own to a service's database, without orderflow's guard
/// against idle transactions (as an operator's `psql` would be).
async fn raw_connection(system: &System, service: Service) -> sqlx::PgConnection {
    use sqlx::Connection;
    let options = system.config.database(service).unwrap().unwrap();
    sqlx::PgConnection::connect_with(&options).await.unwrap()
}

/// DESIGN §8.10: transactions that cannot write to the order store (one holding a
/// transaction id in another database, a long read-only one in the order database)
/// do not slow the order flow, whose read models and saga read the store behind the
/// read fence. With the server-wide xmin as the fence, the order below would never
/// have confirmed while they stayed open.
#[tokio::test]
async fn unrelated_open_transactions_hold_no_order_back() {
    let system = System::start(&TRIO).await;
    add_stock(&system, "U1", 3).await;
    let mut elsewhere = raw_connection(&system, Payment).await;
    sqlx::raw_sql(
        "BEGIN; INSERT INTO snapshots (stream_id, stream_version, state_format, state) \
         VALUES ('elsewhere', 1, 'x', '{}')",
    )
    .execute(&mut elsewhere)
    .await
    .unwrap();
    let mut reading = raw_connection(&system, Order).await;
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM events")
        .execute(&mut reading)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let order_id = place(&system, &[("U1", 1)], "tok_visa").await;
    let order = ended(&system, &order_id).await;
    let took = started.elapsed();
    assert_eq!(order["status"], "confirmed");
    assert!(took < Duration::from_secs(5), "confirmed after {took:?}");
    drop((elsewhere, reading));
    system.stop().await;
}

/// A writing transaction left open in a service's own database does hold its
/// subscriptions back (it could still append), and readiness and metrics name it:
/// its xid, pid and application_name, for `pg_stat_activity`. Once it ends, the
/// subscription carries on.
#[tokio::test]
async fn a_writer_left_open_in_the_services_database_is_named_by_readiness() {
    let system = System::start(&[Inventory]).await;
    let mut forgotten = raw_connection(&system, Inventory).await;
    sqlx::raw_sql(
        "SET application_name = 'forgotten psql'; BEGIN; \
         INSERT INTO inbox (consumer, message_id) VALUES ('operator', gen_random_uuid())",
    )
    .execute(&mut forgotten)
    .await
    .unwrap();
    add_stock(&system, "H1", 2).await;
    let check = wait_for(DEADLINE, "readiness to name the open writer", || async {
        let (status, ready) = system.get(Inventory, "/health/ready").await;
        let check = ready["checks"]["subscription inventory.read-models"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (status == StatusCode::SERVICE_UNAVAILABLE && check.contains("forgotten psql"))
            .then_some(check)
    })
    .await;
    assert!(check.contains("held back at position"), "{check}");
    let metrics = system.metrics(Inventory).await;
    assert!(
        metrics.contains("application_name=\"forgotten psql\""),
        "{metrics}"
    );
    let (status, _) = system.get(Inventory, "/inventory/items/H1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not applied while held back");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut forgotten)
        .await
        .unwrap();
    wait_for(DEADLINE, "the read model to carry on", || async {
        let (status, ready) = system.get(Inventory, "/health/ready").await;
        let (found, _) = system.get(Inventory, "/inventory/items/H1").await;
        (status == StatusCode::OK && found == StatusCode::OK && ready["status"] == "ready")
            .then_some(())
    })
    .await;
    system.stop().await;
}

/// OrderPlaced events in the order store: what was recorded.
async fn orders_recorded(system: &System) -> i64 {
    let db = system.pool(Order).await;
    let count = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'OrderPlaced'")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    count
}

/// Asserts a response is back-pressure: 503 `overloaded` with `Retry-After`.
async fn assert_overloaded(response: reqwest::Response) {
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, problem) = answer(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(
        problem["type"], "urn:orderflow:problem:overloaded",
        "{problem}"
    );
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("1"),
        "{problem}"
    );
}

/// DESIGN §8.9: with more orders waiting for payment than its bound, the order service
/// refuses commands (503 `overloaded`, `Retry-After`, through the gateway too) before it
/// records anything, keeps answering queries and cancellations, and takes orders again
/// once they end.
#[tokio::test]
async fn an_order_service_past_its_bound_refuses_commands_and_records_nothing() {
    use services::config::Service::{Gateway, User};
    let system = System::start_with(
        &[Gateway, Order, Inventory, Payment, User],
        &[
            ("ORDERFLOW_MAX_ORDERS_IN_FLIGHT", "1"),
            // Long enough that the orders stay in flight however slow the machine.
            ("ORDERFLOW_PAYMENT_DEADLINE_MS", "120000"),
        ],
    )
    .await;
    system.routable(&[Order, Inventory, Payment, User]).await;
    let token = system.token_for("busy@example.com").await;
    add_stock(&system, "A", 100).await;
    // Two orders whose payment never answers: two in flight, one past the bound.
    let waiting = [
        place(&system, &[("A", 1)], "tok_timeout").await,
        place(&system, &[("A", 1)], "tok_timeout").await,
    ];
    for order_id in &waiting {
        saga_at(&system, order_id, "authorizing_payment").await;
    }
    let recorded = orders_recorded(&system).await;
    // A body that would be refused as invalid (422) shows when the sampler caught up.
    wait_for(DEADLINE, "the order service to refuse", || async {
        let response = system.post(Order, "/orders", json!({})).await;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let order = json!({
        "customer_id": Uuid::now_v7(),
        "lines": [{ "sku": "A", "quantity": 1, "unit_price_cents": 1000 }],
        "card_token": "tok_visa",
    });
    assert_overloaded(system.post(Order, "/orders", order.clone()).await).await;
    let through_gateway = system
        .http
        .post(system.url(Gateway, "/orders"))
        .bearer_auth(&token)
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_overloaded(through_gateway).await;
    assert_eq!(orders_recorded(&system).await, recorded, "nothing recorded");
    // Queries keep answering.
    let (status, body) = system.get(Order, &format!("/orders/{}", waiting[0])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let metrics = system.metrics(Order).await;
    assert!(
        metrics.contains(
            r#"orderflow_commands_refused_total{service="order",bound="orders_in_flight"}"#
        ),
        "{metrics}"
    );
    // A cancellation relieves the service, so it is taken; then orders are again.
    for order_id in &waiting {
        let cancel = format!("/orders/{order_id}/cancel");
        let (status, reply) = answer(system.post(Order, &cancel, json!({})).await).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
        assert_outcome(
            &ended(&system, order_id).await,
            "cancelled",
            "customer_request",
        );
    }
    let order_id = wait_for(DEADLINE, "an order to be taken again", || async {
        let (status, reply) = answer(system.post(Order, "/orders", order.clone()).await).await;
        (status == StatusCode::ACCEPTED).then(|| reply["order_id"].as_str().unwrap().to_owned())
    })
    .await;
    assert_eq!(ended(&system, &order_id).await["status"], "confirmed");
    system.stop().await;
}

/// DESIGN §8.9 under a burst far past the bounds: part is refused with 503 and
/// `Retry-After` and leaves no trace; every accepted order confirms, and the stock
/// adds up to exactly the accepted orders.
#[tokio::test]
async fn a_burst_past_capacity_is_refused_in_part_and_every_accepted_order_confirms() {
    let system = System::start_with(
        &TRIO,
        &[
            ("ORDERFLOW_MAX_ORDERS_IN_FLIGHT", "10"),
            ("ORDERFLOW_MAX_COMMANDS_IN_FLIGHT", "4"),
        ],
    )
    .await;
    add_stock(&system, "BURST", 1_000).await;
    let order = json!({
        "customer_id": Uuid::now_v7(),
        "lines": [{ "sku": "BURST", "quantity": 1, "unit_price_cents": 500 }],
        "card_token": "tok_visa",
    });
    let burst = (0..200).map(|_| {
        let (system, order) = (&system, order.clone());
        async move {
            let response = system.post(Order, "/orders", order).await;
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                assert_overloaded(response).await;
                return None;
            }
            let (status, reply) = answer(response).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
            Some(reply["order_id"].as_str().unwrap().to_owned())
        }
    });
    let answers = futures_util::future::join_all(burst).await;
    let accepted: Vec<String> = answers.into_iter().flatten().collect();
    let refused = 200 - accepted.len();
    assert!(refused > 0, "nothing was refused");
    assert!(!accepted.is_empty(), "nothing was accepted");
    assert_eq!(orders_recorded(&system).await, accepted.len() as i64);
    for order_id in &accepted {
        assert_eq!(ended(&system, order_id).await["status"], "confirmed");
    }
    let sold = accepted.len() as u64;
    stock_is(&system, "BURST", (1_000 - sold, 0, sold)).await;
    system.stop().await;
}
