//! The order, inventory and payment services end to end: in-process on free ports,
//! each with a fresh database, all in a fresh RabbitMQ virtual host, called over HTTP.
//! Every endpoint, the problem+json error mapping, Idempotency-Key replays, If-Match
//! conflicts, read-your-writes, the commands the saga will send, and a correlation id
//! travelling from the HTTP request through the outbox and RabbitMQ to a projection.

use std::time::Duration;

use domain::inventory::{StockLine, StockRequest};
use domain::payment::PaymentRequest;
use eventstore::{EventStore, Metadata, OutgoingCommand};
use reqwest::StatusCode;
use serde_json::{Value, json};
use services::config::Service::{self, Inventory, Notification, Order, Payment, User};
use tests::{System, TestDb, wait_for};
use uuid::Uuid;

const TRIO: [Service; 3] = [Order, Inventory, Payment];
const DEADLINE: Duration = Duration::from_secs(20);

async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

/// An order whose payment never answers, so that the saga keeps it pending for the
/// whole test (the payment deadline is 30 s by default): these tests look at the API,
/// not at fulfilment (tests/tests/sagas.rs does).
fn order_body(customer: Uuid, sku: &str, quantity: u32) -> Value {
    json!({
        "customer_id": customer,
        "lines": [{ "sku": sku, "quantity": quantity, "unit_price_cents": 250 }],
        "card_token": "tok_timeout",
    })
}

/// Asserts a problem+json response with this status, type and (if given) field.
async fn assert_problem(
    response: reqwest::Response,
    status: StatusCode,
    kind: &str,
    field: Option<&str>,
) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{kind}"
    );
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(
        body["type"],
        format!("urn:orderflow:problem:{kind}"),
        "{body}"
    );
    assert_eq!(body["status"], status.as_u16(), "{body}");
    if let Some(field) = field {
        assert_eq!(body["field"], field, "{body}");
    }
    body
}

#[tokio::test]
async fn stock_orders_and_their_read_models() {
    let system = System::start(&TRIO).await;

    // Stock: created (201), then added to (200); read back at the version written.
    let (status, created) = json_of(
        system
            .post(
                Inventory,
                "/inventory/items",
                json!({"sku": "SKU-1", "name": "Widget", "quantity": 10}),
            )
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, added) = json_of(
        system
            .post(
                Inventory,
                "/inventory/items",
                json!({"sku": "SKU-1", "quantity": 5}),
            )
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{added}");
    assert_eq!(added["available"], 15);
    let version = added["version"].as_i64().unwrap();
    let (status, item) = system
        .get(
            Inventory,
            &format!("/inventory/items/SKU-1?min_version={version}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{item}");
    assert_eq!(
        item,
        json!({"sku": "SKU-1", "name": "Widget", "available": 15, "reserved": 0, "sold": 0, "version": version})
    );

    // An order, with a correlation id of the client's.
    let customer = Uuid::now_v7();
    let correlation = Uuid::now_v7();
    let response = system
        .http
        .post(system.url(Order, "/orders"))
        .header("x-correlation-id", correlation.to_string())
        .json(&order_body(customer, "SKU-1", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-correlation-id"],
        correlation.to_string()
    );
    let (status, placed) = json_of(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["status"], "pending");
    let order_id = placed["order_id"].as_str().unwrap().to_owned();
    let position = placed["position"].as_i64().unwrap();
    assert_eq!(placed["version"], 1);

    let (status, order) = system
        .get(Order, &format!("/orders/{order_id}?min_version=1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "pending");
    assert_eq!(order["customer_id"], customer.to_string());
    assert_eq!(order["total_cents"], 500);
    assert_eq!(
        order["lines"],
        json!([{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 250}])
    );
    assert_eq!(order["version"], 1);
    assert!(order.get("reason").is_none(), "{order}");

    // The customer's history, read at the position the command returned (as a header).
    let response = system
        .http
        .get(system.url(Order, &format!("/customers/{customer}/orders")))
        .header("x-min-position", position.to_string())
        .send()
        .await
        .unwrap();
    let (status, history) = json_of(response).await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history[0]["order_id"], order_id);

    // The correlation id went into the event's metadata, through the outbox and
    // RabbitMQ (as the AMQP correlation_id) to the projection that stored it.
    let order_db = system.pool(Order).await;
    let recorded: Uuid =
        sqlx::query_scalar("SELECT correlation_id FROM events WHERE stream_id = $1")
            .bind(format!("order-{order_id}"))
            .fetch_one(&order_db)
            .await
            .unwrap();
    assert_eq!(recorded, correlation);
    let projected: Uuid =
        sqlx::query_scalar("SELECT correlation_id FROM order_summaries WHERE order_id = $1::uuid")
            .bind(&order_id)
            .fetch_one(&order_db)
            .await
            .unwrap();
    assert_eq!(projected, correlation);

    // Cancelling records the request (the saga acts on it: tests/tests/sagas.rs).
    let (status, cancelled) = json_of(
        system
            .post(Order, &format!("/orders/{order_id}/cancel"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    assert_eq!(cancelled["version"], 2);
    let (_, order) = system
        .get(Order, &format!("/orders/{order_id}?min_version=2"))
        .await;
    assert_eq!(order["cancellation_requested"], true, "{order}");

    // Unknown things are 404s.
    let (status, _) = system
        .get(Order, &format!("/orders/{}", Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = system.get(Inventory, "/inventory/items/NOPE").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = system
        .get(Payment, &format!("/payments/{}", Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    order_db.close().await;
    system.stop().await;
}

#[tokio::test]
async fn errors_are_problem_documents_naming_the_field() {
    let system = System::start(&[Order, Inventory]).await;
    let url = system.url(Order, "/orders");
    let raw = |body: &'static str, content_type: &'static str| {
        system
            .http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    assert_problem(
        raw("{\"customer_id\": ", "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid-json",
        Some("body"),
    )
    .await;
    assert_problem(
        raw("{}", "text/plain").await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        None,
    )
    .await;
    let customer = Uuid::now_v7();
    let mut missing = order_body(customer, "SKU-1", 1);
    missing.as_object_mut().unwrap().remove("card_token");
    assert_problem(
        system.post(Order, "/orders", missing).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("card_token"),
    )
    .await;
    let mut wrong_type = order_body(customer, "SKU-1", 1);
    wrong_type["lines"][0]["quantity"] = json!("two");
    assert_problem(
        system.post(Order, "/orders", wrong_type).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("lines[0].quantity"),
    )
    .await;
    let mut empty = order_body(customer, "SKU-1", 1);
    empty["lines"] = json!([]);
    assert_problem(
        system.post(Order, "/orders", empty).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("lines"),
    )
    .await;
    assert_problem(
        system
            .post(Order, "/orders", order_body(customer, "bad sku", 1))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("lines[0].sku"),
    )
    .await;
    let huge = json!({ "customer_id": customer, "lines": [], "card_token": "x".repeat(100_000) });
    assert_problem(
        system.post(Order, "/orders", huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        None,
    )
    .await;
    // Deeply nested JSON within the size limit is refused cleanly wherever it sits:
    // the body parsers never recurse into it (typed fields stop at the first bracket,
    // unknown fields are refused by name, and serde_json stops at depth 128).
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let card = "\"card_token\":\"x\"";
    for nested in [
        deep.clone(),
        format!("{{\"customer_id\":\"{customer}\",{card},\"lines\":{deep}}}"),
        format!("{{\"customer_id\":\"{customer}\",{card},\"lines\":[],\"extra\":{deep}}}"),
        format!(
            "{{\"customer_id\":{}{}}}",
            "{\"a\":".repeat(10_000),
            "}".repeat(10_000)
        ),
    ] {
        let response = reqwest::Client::new()
            .post(system.url(Order, "/orders"))
            .header("content-type", "application/json")
            .body(nested)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY,
            "{status}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_problem(
        system
            .post(
                Inventory,
                "/inventory/items",
                json!({"sku": "a/b", "name": "x", "quantity": 1}),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("sku"),
    )
    .await;
    assert_problem(
        system
            .post(
                Inventory,
                "/inventory/items",
                json!({"sku": "NEW", "quantity": 1}),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("name"),
    )
    .await;

    // Not found: an unknown order, an id that is not a UUID, a path that does not exist.
    assert_problem(
        system
            .post(
                Order,
                &format!("/orders/{}/cancel", Uuid::now_v7()),
                json!({}),
            )
            .await,
        StatusCode::NOT_FOUND,
        "not-found",
        None,
    )
    .await;
    let response = system
        .http
        .get(system.url(Order, "/orders/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::NOT_FOUND,
        "not-found",
        Some("order_id"),
    )
    .await;
    let response = system
        .http
        .get(system.url(Order, "/nowhere"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not-found", None).await;

    // If-Match: a stale version is a 409, a malformed one a 400. The order's SKU is in
    // stock and no payment service runs, so the saga leaves it pending at version 1
    // (an unknown SKU would get it rejected, moving it on, at any moment).
    let stocked = system
        .post(
            Inventory,
            "/inventory/items",
            json!({"sku": "SKU-IFM", "name": "If-Match", "quantity": 5}),
        )
        .await;
    assert_eq!(stocked.status(), StatusCode::CREATED);
    let (_, placed) = json_of(
        system
            .post(Order, "/orders", order_body(customer, "SKU-IFM", 1))
            .await,
    )
    .await;
    let cancel_url = system.url(
        Order,
        &format!("/orders/{}/cancel", placed["order_id"].as_str().unwrap()),
    );
    let cancel_with = |if_match: &'static str| {
        system
            .http
            .post(&cancel_url)
            .header("if-match", if_match)
            .send()
    };
    let stale = cancel_with("\"7\"").await.unwrap();
    assert_problem(stale, StatusCode::CONFLICT, "version-conflict", None).await;
    let malformed = cancel_with("seven").await.unwrap();
    assert_problem(
        malformed,
        StatusCode::BAD_REQUEST,
        "invalid-header",
        Some("if-match"),
    )
    .await;
    // The read model holds version 1; its subscription's checkpoint row is then held
    // locked, so the cancellation (version 2) cannot be applied until the test lets go.
    let order_id = placed["order_id"].as_str().unwrap().to_owned();
    let read = |min_version: u32| {
        system
            .http
            .get(system.url(
                Order,
                &format!("/orders/{order_id}?min_version={min_version}"),
            ))
            .send()
    };
    assert_eq!(read(1).await.unwrap().status(), StatusCode::OK);
    let pool = system.pool(Order).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM subscription_checkpoints WHERE subscription = 'order.read-models' \
         FOR UPDATE",
    )
    .fetch_one(&mut *blocker)
    .await
    .unwrap();
    let current = cancel_with("\"1\"").await.unwrap();
    assert_eq!(current.status(), StatusCode::ACCEPTED);
    // A second cancellation request changes nothing; a stale If-Match still conflicts.
    let again = cancel_with("1").await.unwrap();
    assert_problem(again, StatusCode::CONFLICT, "version-conflict", None).await;
    // A read model that cannot catch up in time answers 503 with Retry-After.
    let response = read(2).await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "read-model-behind",
        None,
    )
    .await;
    blocker.rollback().await.unwrap();
    assert_eq!(read(2).await.unwrap().status(), StatusCode::OK);
    // A version the stream never reached, or a stream that does not exist, is the
    // client's mistake, not something to come back for.
    assert_problem(
        read(99).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("min_version"),
    )
    .await;
    let nowhere = system
        .http
        .get(system.url(Order, &format!("/orders/{}?min_version=3", Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    assert_problem(nowhere, StatusCode::NOT_FOUND, "not-found", None).await;
    // Text with the NUL character, which no read model could store, is refused.
    let mut nul = order_body(customer, "SKU-1", 1);
    nul["card_token"] = json!("tok\u{0}visa");
    assert_problem(
        system.post(Order, "/orders", nul).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("card_token"),
    )
    .await;
    // A repeated query parameter is a 422 problem naming it, like any bad value.
    let twice = system
        .http
        .get(system.url(
            Order,
            &format!("/customers/{customer}/orders?limit=1&limit=2"),
        ))
        .send()
        .await
        .unwrap();
    assert_problem(
        twice,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        Some("limit"),
    )
    .await;
    system.stop().await;
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_response() {
    let system = System::start(&[Order]).await;
    let customer = Uuid::now_v7();
    let send = |key: &'static str, body: Value| {
        system
            .http
            .post(system.url(Order, "/orders"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let first = send("key-1", order_body(customer, "SKU-1", 1))
        .await
        .unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let (status, first) = json_of(first).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let again = send("key-1", order_body(customer, "SKU-1", 1))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let (status, again) = json_of(again).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again, first);
    let other = send("key-1", order_body(customer, "SKU-1", 2))
        .await
        .unwrap();
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        Some("idempotency-key"),
    )
    .await;

    // Ten requests racing with one key place one order and all get its id.
    let racing = (0..10).map(|_| send("key-2", order_body(customer, "SKU-2", 1)));
    let answers = futures_util::future::join_all(racing).await;
    let mut ids = Vec::new();
    for answer in answers {
        let (status, body) = json_of(answer.unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        ids.push(body["order_id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let db = system.pool(Order).await;
    let orders: i64 = sqlx::query_scalar("SELECT count(DISTINCT stream_id) FROM events")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(orders, 2, "one order per key");
    db.close().await;
    system.stop().await;
}

/// Sends a command to another service through the order service's outbox, as the
/// saga will.
async fn send_command(store: &EventStore, command: &OutgoingCommand) {
    let mut transaction = store.begin().await.unwrap();
    transaction.send_command(command).await.unwrap();
    transaction.commit().await.unwrap();
}

fn command<R: domain::wire::WireEvent>(target: &str, key: String, request: &R) -> OutgoingCommand {
    let encoded = TestDb::registry().encode(request).unwrap();
    OutgoingCommand::new(
        target,
        key,
        encoded,
        Metadata::new(Uuid::now_v7(), Uuid::now_v7()),
    )
}

async fn item(system: &System, sku: &str) -> Value {
    system
        .get(Inventory, &format!("/inventory/items/{sku}"))
        .await
        .1
}

#[tokio::test]
async fn inventory_and_payment_handle_the_sagas_commands() {
    let system = System::start(&TRIO).await;
    for (sku, quantity) in [("A", 5), ("B", 3)] {
        let response = system
            .post(
                Inventory,
                "/inventory/items",
                json!({"sku": sku, "name": sku, "quantity": quantity}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let order_db = system.pool(Order).await;
    let outbox = EventStore::new(order_db.clone());
    let lines = |a: u32, b: u32| {
        vec![
            StockLine {
                sku: "A".into(),
                quantity: a,
            },
            StockLine {
                sku: "B".into(),
                quantity: b,
            },
        ]
    };

    // Reserve both lines; the same command delivered twice moves stock once.
    let first = Uuid::now_v7();
    let reserve = command(
        "inventory",
        first.to_string(),
        &StockRequest::ReserveStock {
            order_id: first,
            lines: lines(2, 1),
        },
    );
    send_command(&outbox, &reserve).await;
    send_command(&outbox, &reserve).await;
    wait_for(DEADLINE, "A reserved", || async {
        let a = item(&system, "A").await;
        (a["reserved"] == 2).then_some(())
    })
    .await;
    // An order wanting more B than there is reserves nothing at all.
    let second = Uuid::now_v7();
    send_command(
        &outbox,
        &command(
            "inventory",
            second.to_string(),
            &StockRequest::ReserveStock {
                order_id: second,
                lines: lines(1, 3),
            },
        ),
    )
    .await;
    // Then commit the first order's stock, and release a reservation that never was.
    send_command(
        &outbox,
        &command(
            "inventory",
            first.to_string(),
            &StockRequest::CommitStock {
                order_id: first,
                lines: lines(0, 0),
            },
        ),
    )
    .await;
    send_command(
        &outbox,
        &command(
            "inventory",
            second.to_string(),
            &StockRequest::ReleaseStock {
                order_id: second,
                lines: lines(0, 0),
            },
        ),
    )
    .await;
    // One transaction moved both items, but each item's events reach the read model
    // on their own: wait for both.
    wait_for(DEADLINE, "the first order's stock sold", || async {
        let (a, b) = (item(&system, "A").await, item(&system, "B").await);
        (a["sold"] == 2 && b["sold"] == 1).then_some(())
    })
    .await;
    let a = item(&system, "A").await;
    assert_eq!(
        (&a["available"], &a["reserved"], &a["sold"]),
        (&json!(3), &json!(0), &json!(2)),
        "{a}"
    );
    let b = item(&system, "B").await;
    assert_eq!(
        (&b["available"], &b["reserved"], &b["sold"]),
        (&json!(2), &json!(0), &json!(1)),
        "{b}"
    );
    let inventory_db = system.pool(Inventory).await;
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'StockReservationFailed'",
    )
    .fetch_one(&inventory_db)
    .await
    .unwrap();
    assert_eq!(failures, 1, "the short line is recorded once");
    let reserved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'StockReserved'")
            .fetch_one(&inventory_db)
            .await
            .unwrap();
    assert_eq!(reserved, 2, "the duplicate reserved nothing");

    // Payments: approved, captured; declined; no answer, then voided (nothing happens).
    let paid = Uuid::now_v7();
    let declined = Uuid::now_v7();
    let silent = Uuid::now_v7();
    let customer = Uuid::now_v7();
    let payment = |order_id: Uuid, request: PaymentRequest| {
        command("payment", format!("payment-{order_id}"), &request)
    };
    for (order_id, token) in [
        (paid, "tok_visa"),
        (declined, "tok_decline"),
        (silent, "tok_timeout"),
    ] {
        let request = PaymentRequest::AuthorizePayment {
            order_id,
            customer_id: Some(customer),
            amount_cents: 500,
            card_token: token.into(),
        };
        send_command(&outbox, &payment(order_id, request)).await;
    }
    send_command(
        &outbox,
        &payment(paid, PaymentRequest::CapturePayment { order_id: paid }),
    )
    .await;
    send_command(
        &outbox,
        &payment(silent, PaymentRequest::VoidPayment { order_id: silent }),
    )
    .await;
    let status = |order_id: Uuid| {
        let system = &system;
        async move { system.get(Payment, &format!("/payments/{order_id}")).await }
    };
    wait_for(DEADLINE, "the payment captured", || async {
        let (_, body) = status(paid).await;
        (body["status"] == "captured").then_some(())
    })
    .await;
    let (_, body) = status(paid).await;
    assert_eq!(body["amount_cents"], 500);
    // Who pays travelled from the request, and stayed through the capture.
    assert_eq!(body["customer_id"], customer.to_string());
    wait_for(DEADLINE, "the payment declined", || async {
        let (_, body) = status(declined).await;
        (body["status"] == "declined").then_some(())
    })
    .await;
    let payment_db = system.pool(Payment).await;
    wait_for(DEADLINE, "the void handled", || async {
        let handled: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = 'payment.commands'")
                .fetch_one(&payment_db)
                .await
                .unwrap();
        (handled == 5).then_some(())
    })
    .await;
    assert_eq!(status(silent).await.0, StatusCode::NOT_FOUND);

    // Health and metrics reflect the running workers and projections.
    let (status, ready) = system.get(Payment, "/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["broker"], "ok");
    assert_eq!(ready["checks"]["consumer payment.commands"], "ok");
    let metrics = system.metrics(Inventory).await;
    assert!(
        metrics
            .contains("orderflow_subscription_lag_events{subscription=\"inventory.read-models\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("orderflow_consumer_dead_lettered_total{consumer=\"inventory.commands\"} 0"),
        "{metrics}"
    );
    for pool in [order_db, inventory_db, payment_db] {
        pool.close().await;
    }
    system.stop().await;
}

/// Every `$ref` in `value`.
fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                found.push(target.clone());
            }
            map.values().for_each(|v| references(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, found)),
        _ => {}
    }
}

#[tokio::test]
async fn each_service_documents_exactly_its_endpoints_in_openapi() {
    let system = System::start(&[Order, Inventory, Payment, User, Notification]).await;
    let common = ["/health/live", "/health/ready", "/metrics", "/openapi.json"];
    let own: [(Service, &[&str]); 5] = [
        (
            Order,
            &[
                "/orders",
                "/orders/{order_id}",
                "/orders/{order_id}/cancel",
                "/customers/{customer_id}/orders",
                "/sagas/{order_id}",
            ],
        ),
        (Inventory, &["/inventory/items", "/inventory/items/{sku}"]),
        (Payment, &["/payments/{order_id}"]),
        (
            User,
            &[
                "/users",
                "/auth/token",
                "/users/{user_id}",
                "/users/{user_id}/profile",
                "/users/{user_id}/preferences",
            ],
        ),
        (
            Notification,
            &["/notifications", "/providers", "/providers/{channel}"],
        ),
    ];
    for (service, paths) in own {
        let (status, document) = system.get(service, "/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        assert!(document["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(
            document["info"]["title"],
            format!("orderflow {service} service")
        );
        let mut expected: Vec<&str> = common.iter().chain(paths.iter()).copied().collect();
        expected.sort_unstable();
        let documented: Vec<&str> = document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(documented, expected, "{service}");

        let mut refs = Vec::new();
        references(&document, &mut refs);
        assert!(refs.iter().any(|r| r.ends_with("/Problem")), "{service}");
        for target in refs {
            let name = target.trim_start_matches("#/components/schemas/");
            assert!(
                document["components"]["schemas"].get(name).is_some(),
                "{service}: {target} points nowhere"
            );
        }

        // Each documented operation exists, and answers a status it documents.
        for (path, item) in document["paths"].as_object().unwrap() {
            let names: Vec<&Value> = item["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| &p["name"])
                .collect();
            assert!(names.contains(&&json!("x-correlation-id")), "{path}");
            let concrete = path
                .replace("{order_id}", &Uuid::now_v7().to_string())
                .replace("{customer_id}", &Uuid::now_v7().to_string())
                .replace("{user_id}", &Uuid::now_v7().to_string())
                .replace("{sku}", "NO-SUCH-SKU");
            for (method, operation) in item.as_object().unwrap() {
                let request = match method.as_str() {
                    "get" => system.http.get(system.url(service, &concrete)),
                    "post" => system
                        .http
                        .post(system.url(service, &concrete))
                        .json(&json!({})),
                    "put" => system
                        .http
                        .put(system.url(service, &concrete))
                        .json(&json!({})),
                    "parameters" => continue,
                    other => panic!("{path}: unexpected method {other}"),
                };
                let response = request.send().await.expect("request");
                let status = response.status().as_u16().to_string();
                let body = response.text().await.unwrap_or_default();
                assert!(
                    operation["responses"].get(&status).is_some(),
                    "{service} {method} {path}: {status} is not documented: {body}"
                );
                assert!(
                    !body.contains("no such resource"),
                    "{method} {path}: {body}"
                );
            }
        }
    }
    system.stop().await;
}

#[tokio::test]
async fn the_load_generator_measures_commands_and_read_models() {
    let system = System::start(&[Order, Inventory]).await;
    let config = services::load::LoadConfig {
        order_url: system.url(Order, ""),
        inventory_url: system.url(Inventory, ""),
        rate: 40.0,
        duration: Duration::from_secs(2),
        warmup: Duration::from_millis(500),
        skus: 3,
        customers: 5,
        query_ratio: 1.0,
        max_in_flight: 16,
        outcome: false,
    };
    let report = services::load::run(config, |_| {}).await.expect("load run");
    assert_eq!(report.commands_failed, 0, "{report}");
    assert_eq!(report.queries_failed, 0, "{report}");
    // 2 s at 40/s, give or take the edges of the window.
    assert!((70..=90).contains(&report.commands_ok), "{report}");
    assert_eq!(
        report.command_to_read_model.count + report.read_model_behind,
        report.commands_ok,
        "{report}"
    );
    assert!(report.command.p50_ms <= report.command_to_read_model.p50_ms);
    assert!(report.queries_ok >= 70, "{report}");
    // What it placed is really there: its orders are in the read model.
    let pool = system.pool(Order).await;
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(
        orders >= report.commands_ok as i64 * 7 / 10,
        "{orders} orders"
    );
    system.stop().await;
}
