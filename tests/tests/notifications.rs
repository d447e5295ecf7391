//! The notification service end to end: who is told what when orders end and users
//! register, exactly once per triggering event and channel, under redelivery and
//! through a provider that fails and recovers.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use services::config::Service::{self, Inventory, Notification, Order, Payment, User};
use tests::{System, answer, consumer_duplicates, wait_for};
use uuid::Uuid;

const ALL: [Service; 5] = [Order, Inventory, Payment, User, Notification];
const DEADLINE: Duration = Duration::from_secs(30);

async fn confirmed_order(system: &System, customer_id: &str) -> String {
    let body = json!({ "sku": "N1", "name": "N1", "quantity": 100 });
    answer(system.post(Inventory, "/inventory/items", body).await).await;
    let order = json!({
        "customer_id": customer_id,
        "lines": [{ "sku": "N1", "quantity": 1, "unit_price_cents": 990 }],
        "card_token": "tok_visa",
    });
    let (status, placed) = answer(system.post(Order, "/orders", order).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    placed["order_id"].as_str().unwrap().to_owned()
}

async fn sent_to(system: &System, user_id: &str, count: usize) -> Vec<Value> {
    wait_for(DEADLINE, &format!("{count} notifications"), || async {
        let (status, list) = system
            .get(Notification, &format!("/notifications?user_id={user_id}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let list = list.as_array().unwrap().clone();
        assert!(list.len() <= count, "more than {count}: {list:?}");
        (list.len() == count).then_some(list)
    })
    .await
}

async fn provider(system: &System, channel: &str) -> Value {
    let (_, providers) = system.get(Notification, "/providers").await;
    providers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["channel"] == channel)
        .cloned()
        .unwrap()
}

/// The planner's duplicates, from the notification service's metrics.
async fn planner_duplicates(system: &System) -> i64 {
    consumer_duplicates(&system.metrics(Notification).await, "notification.planner")
}

/// A registered user who chose SMS and push gets the welcome by e-mail (the default
/// when they registered) and their order's confirmation by SMS and push; every
/// message of the system delivered again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_notifies_once_per_channel_the_user_chose_even_when_delivered_twice() {
    let system = System::start(&ALL).await;
    let body = json!({ "email": "nia@example.com", "name": "Nia", "password": "password one" });
    let (status, user) = answer(system.post(User, "/users", body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let user_id = user["user_id"].as_str().unwrap().to_owned();
    let preferences = json!({ "email": false, "sms": true, "push": true });
    let response = system
        .http
        .put(system.url(User, &format!("/users/{user_id}/preferences")))
        .json(&preferences)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The notification service learns the preferences from the user's events.
    let db = system.pool(Notification).await;
    let id = Uuid::parse_str(&user_id).unwrap();
    wait_for(DEADLINE, "the preferences to arrive", || async {
        let sms: Option<bool> =
            sqlx::query_scalar("SELECT notify_sms FROM notification_recipients WHERE user_id = $1")
                .bind(id)
                .fetch_optional(&db)
                .await
                .unwrap();
        (sms == Some(true)).then_some(())
    })
    .await;
    db.close().await;

    let order_id = confirmed_order(&system, &user_id).await;
    let sent = sent_to(&system, &user_id, 3).await;
    let mut seen: Vec<(String, String, Value)> = sent
        .iter()
        .map(|n| {
            let (kind, channel) = (n["kind"].as_str().unwrap(), n["channel"].as_str().unwrap());
            (kind.to_owned(), channel.to_owned(), n["order_id"].clone())
        })
        .collect();
    seen.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        seen,
        [
            ("order_confirmed".into(), "push".into(), json!(order_id)),
            ("order_confirmed".into(), "sms".into(), json!(order_id)),
            ("welcome".into(), "email".into(), Value::Null),
        ]
    );

    // Everything again: every order and user event is republished.
    let mut republished = 0;
    for service in [Order, User] {
        let store = eventstore::EventStore::new(system.pool(service).await);
        republished += eventstore::republish::republish(
            &store,
            &system.config.amqp_url,
            service.name(),
            &eventstore::republish::Selection::default(),
            |_, _| {},
        )
        .await
        .unwrap();
    }
    // Placed, confirmed; registered, preferences changed.
    assert_eq!(republished, 4);
    // The planner is bound to three of them (an order being placed is not an input).
    wait_for(DEADLINE, "the redelivered events", || async {
        (planner_duplicates(&system).await == 3).then_some(())
    })
    .await;
    assert_eq!(sent_to(&system, &user_id, 3).await.len(), 3);
    for (channel, delivered) in [("email", 1), ("sms", 1), ("push", 1)] {
        let view = provider(&system, channel).await;
        assert_eq!(view["delivered"], delivered, "{view}");
        assert_eq!(view["repeated"], 0, "{view}");
    }
    system.stop().await;
}

/// A provider that fails: its notifications wait (retried with backoff), its breaker
/// opens, and once it works again each is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_is_retried_behind_its_breaker_until_it_recovers() {
    let system = System::start(&ALL).await;
    let failing = system
        .http
        .put(system.url(Notification, "/providers/email"))
        .json(&json!({ "mode": "failing" }))
        .send()
        .await
        .unwrap();
    assert_eq!(failing.status(), StatusCode::OK);
    // A customer the notification service knows nothing of: e-mail, the default.
    let customer = Uuid::now_v7().to_string();
    let order_id = confirmed_order(&system, &customer).await;
    wait_for(DEADLINE, "the e-mail breaker to open", || async {
        let view = provider(&system, "email").await;
        (view["breaker"] == "open").then_some(())
    })
    .await;
    let view = provider(&system, "email").await;
    assert!(view["refused"].as_u64().unwrap() >= 5, "{view}");
    assert_eq!(view["delivered"], 0);
    let (_, nothing) = system
        .get(Notification, &format!("/notifications?user_id={customer}"))
        .await;
    assert_eq!(nothing, json!([]), "not sent while the provider fails");

    let recovered = system
        .http
        .put(system.url(Notification, "/providers/email"))
        .json(&json!({ "mode": "ok" }))
        .send()
        .await
        .unwrap();
    assert_eq!(recovered.status(), StatusCode::OK);
    let sent = sent_to(&system, &customer, 1).await;
    assert_eq!(sent[0]["order_id"], json!(order_id));
    assert_eq!(sent[0]["kind"], "order_confirmed");
    let view = provider(&system, "email").await;
    assert_eq!(
        (view["delivered"].as_u64(), view["breaker"].as_str()),
        (Some(1), Some("closed"))
    );
    system.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let system = System::start(&[Notification]).await;
    for path in ["/notifications", "/notifications?user_id=42"] {
        let (status, problem) = system.get(Notification, path).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {problem}"
        );
        assert_eq!(problem["field"], "user_id");
    }
    let response = system
        .http
        .put(system.url(Notification, "/providers/pigeon"))
        .json(&json!({ "mode": "ok" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = system
        .http
        .put(system.url(Notification, "/providers/sms"))
        .json(&json!({ "mode": "sleepy" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    system.stop().await;
}
