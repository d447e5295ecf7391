//! The gateway, the registry and several instances, end to end: tokens required for
//! commands, one rate limit across gateway instances, breakers in front of dead
//! upstreams, registrations that vanish when an instance is killed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use services::auth::{Claims, ISSUER, Tokens};
use services::config::Service::{self, Gateway, Inventory, Notification, Order, Payment, User};
use services::gateway::UPSTREAM_HEADER;
use services::registry::{Instance, Registry};
use tests::{Spawned, System, answer, wait_for};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);
const REDIS: &str = "redis://127.0.0.1:6379";

/// Waits until the gateway sees `count` instances of `service`.
async fn instances_seen(system: &System, service: Service, count: usize) {
    wait_for(
        DEADLINE,
        &format!("{count} {service} instances"),
        || async {
            let (_, upstreams) = system.get(Gateway, "/gateway/upstreams").await;
            let seen = upstreams
                .as_array()?
                .iter()
                .filter(|u| u["service"] == service.name())
                .count();
            (seen == count).then_some(())
        },
    )
    .await;
}

async fn post_with(
    system: &System,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut request = system.http.post(system.url(Gateway, path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// A login and an order through the gateway; commands without a valid token are 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_through_the_gateway_need_a_valid_token() {
    let all = [Gateway, Order, Inventory, Payment, User, Notification];
    let system = System::start(&all).await;
    system.routable(&all[1..]).await;
    let token = system.token_for("gia@example.com").await;
    let stock = json!({ "sku": "G1", "name": "G1", "quantity": 5 });

    let refused = |response: reqwest::Response, kind: &'static str| async move {
        assert!(response.headers().contains_key("www-authenticate"));
        let (status, problem) = answer(response).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
        assert_eq!(problem["type"], format!("urn:orderflow:problem:{kind}"));
    };
    refused(
        post_with(&system, "/inventory/items", None, stock.clone()).await,
        "unauthorized",
    )
    .await;
    let forged = Tokens::new(
        b"not our secret, though long enough",
        Duration::from_secs(60),
    )
    .issue(Uuid::now_v7(), "x@example.com", &[])
    .unwrap();
    let forged_post = post_with(&system, "/inventory/items", Some(&forged), stock.clone()).await;
    refused(forged_post, "unauthorized").await;
    let now = jsonwebtoken::get_current_timestamp();
    let stale = Claims {
        sub: Uuid::now_v7(),
        email: "x@example.com".into(),
        iss: ISSUER.into(),
        iat: now - 7200,
        exp: now - 3600,
        roles: vec![],
    };
    let secret = system.config.secrets().unwrap().tokens;
    let key = jsonwebtoken::EncodingKey::from_secret(secret.bytes());
    let expired = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &stale, &key).unwrap();
    refused(
        post_with(&system, "/inventory/items", Some(&expired), stock.clone()).await,
        "token-expired",
    )
    .await;

    let response = post_with(&system, "/inventory/items", Some(&token), stock).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let claims = system.tokens().verify(&token).unwrap();
    let order = json!({
        "customer_id": claims.sub,
        "lines": [{ "sku": "G1", "quantity": 2, "unit_price_cents": 100 }],
        "card_token": "tok_visa",
    });
    let response = post_with(&system, "/orders", Some(&token), order).await;
    let correlation = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (status, placed) = answer(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let order_id = placed["order_id"].as_str().unwrap().to_owned();
    let confirmed = wait_for(DEADLINE, "the order to be confirmed", || async {
        let path = format!("/orders/{order_id}");
        let (status, order) = system.get_as(Gateway, &path, &token).await;
        (status == StatusCode::OK && order["status"] == "confirmed").then_some(order)
    })
    .await;
    assert_eq!(confirmed["customer_id"], json!(claims.sub));
    // The correlation id made at the edge travelled into the order's events.
    let events = services::ops::read_stream(&system.config, &format!("order-{order_id}"), 1, None)
        .await
        .unwrap();
    assert_eq!(events[0].correlation_id.to_string(), correlation);
    let (status, _) = system.get(Gateway, "/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    system.stop().await;
}

/// Two gateways sharing Redis enforce one limit per client together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_limit_holds_across_two_gateways() {
    let namespace = format!("orderflow-test-{}", Uuid::now_v7().simple());
    let shared = [
        ("ORDERFLOW_REGISTRY_NAMESPACE", namespace.as_str()),
        ("ORDERFLOW_GATEWAY_RATE_LIMIT", "5"),
    ];
    let first = System::start_with(&[Gateway, Inventory], &shared).await;
    let second = System::start_with(&[Gateway], &shared).await;
    first.routable(&[Inventory]).await;
    second.routable(&[Inventory]).await;
    let requests = (0..30).map(|i| {
        let gateway = if i % 2 == 0 { &first } else { &second };
        async move {
            let response = gateway
                .http
                .get(gateway.url(Gateway, "/inventory/items/NONE"))
                .send()
                .await
                .unwrap();
            let retry = response.headers().get("retry-after").cloned();
            (response.status(), retry)
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let limited: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(
        limited.iter().all(|(_, retry)| retry.is_some()),
        "429s say when to retry"
    );
    let passed = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::NOT_FOUND)
        .count();
    assert_eq!(passed + limited.len(), 30, "{answers:?}");
    // One counter per second for this client, incremented by both gateways.
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:rate:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut counted = 0;
    let mut allowed = 0;
    for key in &keys {
        let count: u64 = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        counted += count;
        allowed += count.min(5);
    }
    assert_eq!(
        counted, 30,
        "both gateways counted into the same keys: {keys:?}"
    );
    assert_eq!(
        passed as u64, allowed,
        "at most 5 a second, whichever gateway"
    );
    second.stop().await;
    first.stop().await;
}

/// A registered instance that refuses connections opens its breaker (the gateway then
/// answers 503 at once); when something answers there again, a probe closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_on_a_dead_upstream_and_closes_when_it_returns() {
    let namespace = format!("orderflow-test-{}", Uuid::now_v7().simple());
    let shared = [("ORDERFLOW_REGISTRY_NAMESPACE", namespace.as_str())];
    let gateway = System::start_with(&[Gateway], &shared).await;
    // A port nothing listens on (taken, then let go).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = Registry::connect(REDIS, &namespace, Duration::from_secs(60))
        .await
        .unwrap();
    let dead = Instance {
        service: "inventory".into(),
        instance_id: "dead".into(),
        address: format!("127.0.0.1:{port}"),
    };
    registry.register(&dead).await.unwrap();
    for _ in 0..5 {
        let (status, problem) = gateway.get(Gateway, "/inventory/items/X").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    }
    let (_, upstreams) = gateway.get(Gateway, "/gateway/upstreams").await;
    assert_eq!(upstreams[0]["breaker"], "open", "{upstreams}");
    let started = Instant::now();
    let (status, _) = gateway.get(Gateway, "/inventory/items/X").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "open: refused at once"
    );

    // The upstream comes back at that address.
    let port_text = port.to_string();
    let revived = System::start_with(
        &[Inventory],
        &[
            ("ORDERFLOW_REGISTRY_NAMESPACE", namespace.as_str()),
            ("ORDERFLOW_INVENTORY_PORT", &port_text),
        ],
    )
    .await;
    wait_for(DEADLINE, "the breaker to close", || async {
        let (status, _) = gateway.get(Gateway, "/inventory/items/X").await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    let (_, upstreams) = gateway.get(Gateway, "/gateway/upstreams").await;
    let breakers: Vec<&Value> = upstreams
        .as_array()
        .unwrap()
        .iter()
        .map(|u| &u["breaker"])
        .collect();
    assert!(breakers.iter().all(|b| *b == "closed"), "{upstreams}");
    registry.deregister(&dead).await.unwrap();
    revived.stop().await;
    gateway.stop().await;
}

/// An instance that takes a request and hangs up without answering (it died with the
/// request in hand): a command without an Idempotency-Key gets a 502, since it may
/// have been applied; one with a key, which a service answers twice alike, is sent
/// to another instance and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_command_whose_instance_hangs_up_goes_to_another() {
    let namespace = format!("orderflow-test-{}", Uuid::now_v7().simple());
    let shared = [("ORDERFLOW_REGISTRY_NAMESPACE", namespace.as_str())];
    let system = System::start_with(&[Gateway, Inventory, User], &shared).await;
    system.routable(&[Inventory, User]).await;
    let token = system.token_for("hang@example.com").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let hung_up = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let hung_up = hung_up.clone();
        async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut head = [0_u8; 512];
                let _ = socket.read(&mut head).await;
                hung_up.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let registry = Registry::connect(REDIS, &namespace, Duration::from_secs(60))
        .await
        .unwrap();
    let dying = Instance {
        service: "inventory".into(),
        instance_id: "dying".into(),
        address: address.to_string(),
    };
    registry.register(&dying).await.unwrap();
    instances_seen(&system, Inventory, 2).await;
    let send = |sku: &'static str, key: Option<String>| {
        let mut request = system
            .http
            .post(system.url(Gateway, "/inventory/items"))
            .bearer_auth(&token)
            .json(&json!({ "sku": sku, "name": sku, "quantity": 1 }));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send()
    };

    // Round robin: one of two requests goes to the instance that hangs up.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(send("UNKEYED", None).await.unwrap().status());
    }
    assert!(statuses.contains(&StatusCode::BAD_GATEWAY), "{statuses:?}");
    let before = hung_up.load(Ordering::SeqCst);
    for i in 0..4 {
        let response = send("KEYED", Some(format!("keyed-{i}"))).await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        assert_ne!(response.headers()[UPSTREAM_HEADER], "dying");
    }
    assert!(
        hung_up.load(Ordering::SeqCst) > before,
        "a keyed command met the instance that hangs up"
    );
    registry.deregister(&dying).await.unwrap();
    system.stop().await;
}

/// An instance killed with SIGKILL (no goodbye) leaves the registry within its
/// time-to-live, while a live one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_the_registry_within_its_ttl() {
    let ttl = Duration::from_millis(1500);
    let ttl_text = ttl.as_millis().to_string();
    let system = System::start_with(&[Payment], &[("ORDERFLOW_REGISTRY_TTL_MS", &ttl_text)]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = system.env();
    env.push(("ORDERFLOW_REGISTRY_TTL_MS".into(), ttl_text.clone()));
    let port = port.to_string();
    let arguments = [
        "serve",
        "--services",
        "payment",
        "--port",
        &port,
        "--instance-id",
        "doomed",
    ];
    let mut child = Spawned::orderflow(&arguments, &env);
    let registry = Registry::connect(REDIS, &system.config.registry_namespace, ttl)
        .await
        .unwrap();
    let ids = |instances: Vec<Instance>| -> Vec<String> {
        instances.into_iter().map(|i| i.instance_id).collect()
    };
    wait_for(DEADLINE, "both instances to register", || async {
        let registered = ids(registry.instances("payment").await.unwrap());
        (registered.len() == 2 && registered.contains(&"doomed".to_owned())).then_some(())
    })
    .await;
    child.kill();
    let killed = Instant::now();
    wait_for(DEADLINE, "the killed instance to vanish", || async {
        let registered = ids(registry.instances("payment").await.unwrap());
        (!registered.contains(&"doomed".to_owned())).then_some(())
    })
    .await;
    assert!(
        killed.elapsed() <= ttl + Duration::from_millis(500),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(
        registry.instances("payment").await.unwrap().len(),
        1,
        "the live one stays"
    );
    system.stop().await;
}

/// Three instances of the order service behind the gateway share the requests; one is
/// killed mid-way, the gateway keeps answering, and every order still ends correctly
/// with the stock balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_order_instances_share_the_load_and_survive_losing_one() {
    let ttl = [
        ("ORDERFLOW_REGISTRY_TTL_MS", "1500"),
        ("ORDERFLOW_PAYMENT_DEADLINE_MS", "2000"),
        // Each order consumer in three partitions, one for each instance.
        ("ORDERFLOW_CONSUMER_PARTITIONS", "3"),
    ];
    let system = System::start_with(&[Gateway, Order, Inventory, Payment, User], &ttl).await;
    let mut env = system.env();
    env.extend(ttl.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let mut others = Vec::new();
    let mut ports = Vec::new();
    for id in ["order-2", "order-3"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port = port.to_string();
        ports.push(port.clone());
        let arguments = [
            "serve",
            "--services",
            "order",
            "--port",
            &port,
            "--instance-id",
            id,
        ];
        others.push(Spawned::orderflow(&arguments, &env));
    }
    instances_seen(&system, Order, 3).await;
    let token = system.token_for("tri@example.com").await;
    let customer = system.tokens().verify(&token).unwrap().sub;
    let stock = json!({ "sku": "TRI", "name": "TRI", "quantity": 20 });
    assert_eq!(
        post_with(&system, "/inventory/items", Some(&token), stock)
            .await
            .status(),
        StatusCode::CREATED
    );

    let mut orders = Vec::new();
    let mut answered_by = std::collections::BTreeSet::new();
    for i in 0..30 {
        if i == 15 {
            // One instance dies without a word; its registration lingers until the TTL.
            others[1].kill();
        }
        let card = if i % 3 == 0 {
            "tok_decline"
        } else {
            "tok_visa"
        };
        let order = json!({
            "customer_id": customer,
            "lines": [{ "sku": "TRI", "quantity": 1, "unit_price_cents": 100 }],
            "card_token": card,
        });
        let response = post_with(&system, "/orders", Some(&token), order).await;
        if let Some(id) = response.headers().get("x-upstream-instance") {
            answered_by.insert(id.to_str().unwrap().to_owned());
        }
        let (status, placed) = answer(response).await;
        assert_eq!(status, StatusCode::ACCEPTED, "order {i}: {placed}");
        orders.push(placed["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        answered_by.len(),
        3,
        "every instance took requests: {answered_by:?}"
    );
    let mut sold = 0;
    for order_id in &orders {
        let order = wait_for(Duration::from_secs(60), "the order to end", || async {
            let path = format!("/orders/{order_id}");
            let (status, order) = system.get_as(Gateway, &path, &token).await;
            (status == StatusCode::OK && order["status"] != "pending").then_some(order)
        })
        .await;
        match order["status"].as_str().unwrap() {
            "confirmed" => sold += 1,
            "cancelled" | "rejected" => {}
            other => panic!("{order_id} ended {other}"),
        }
    }
    assert!(sold > 0);
    wait_for(DEADLINE, "the stock to balance", || async {
        let (_, item) = system.get(Gateway, "/inventory/items/TRI").await;
        let levels = (
            item["available"].as_u64()?,
            item["reserved"].as_u64()?,
            item["sold"].as_u64()?,
        );
        (levels == (20 - sold, 0, sold)).then_some(())
    })
    .await;
    // The saga's answers were shared: the first instance and order-2 (alive to the
    // end) both handled some of them.
    let consumed = |metrics: String| -> u64 {
        let series = "orderflow_consumer_consumed_total{consumer=\"order.saga-replies\"} ";
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    };
    let metrics_of =
        |url: String| async move { reqwest::get(url).await.unwrap().text().await.unwrap() };
    let first = consumed(metrics_of(system.url(Order, "/metrics")).await);
    let second = consumed(metrics_of(format!("http://127.0.0.1:{}/metrics", ports[0])).await);
    assert!(
        first > 0 && second > 0,
        "saga messages handled: {first} and {second}"
    );
    drop(others);
    system.stop().await;
}
