//! Health endpoints, called in-process on the router against a real database.

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use services::auth::Tokens;
use services::config::Service;
use services::http::{Base, Db, Health, ServiceState};
use services::secrets::Secret;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const SECRET: &str = "a secret of the health tests, 32 bytes or more";

mod common;

async fn get(state: ServiceState, path: &str) -> (StatusCode, serde_json::Value) {
    let response = services::http::inventory(state)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn ready_follows_the_database() {
    let server = common::server();
    let name = format!("orderflow_test_{}", uuid::Uuid::now_v7().simple());
    eventstore::db::create_database(&server, &name)
        .await
        .unwrap();
    let pool = eventstore::db::connect(server.clone().database(&name), 2)
        .await
        .unwrap();
    let store = eventstore::EventStore::new(pool.clone());
    let registry = eventstore::SchemaRegistry::builtin().unwrap();
    let state = ServiceState {
        base: Base {
            service: Service::Inventory,
            metrics: eventstore::Metrics::new(),
            health: Arc::new(Health {
                database: Some(pool.clone()),
                ..Health::default()
            }),
        },
        db: Db {
            pool: pool.clone(),
            aggregates: eventstore::AggregateStore::new(store, registry),
        },
        tokens: Arc::new(Tokens::new(SECRET.as_bytes(), Duration::from_secs(60))),
        digest_key: Arc::new(Secret::new(SECRET, "a test secret").unwrap()),
        access: Default::default(),
        pressure: None,
    };

    let (status, body) = get(state.clone(), "/health/live").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "inventory");
    let (status, body) = get(state.clone(), "/health/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["checks"]["database"], "ok");

    // With the database gone, the service is alive but not ready.
    pool.close().await;
    eventstore::db::drop_database(&server, &name).await.unwrap();
    let (status, body) = get(state.clone(), "/health/live").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body_ready) = get(state, "/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body_ready["status"], "not_ready");
    assert!(
        body_ready["checks"]["database"]
            .as_str()
            .unwrap()
            .starts_with("error")
    );
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text() {
    let metrics = eventstore::Metrics::new();
    metrics.track_service("order");
    metrics.track_consumer("order.summary");
    let response = gateway(metrics)
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The type of what the encoder writes (OpenMetrics, ending in `# EOF`).
    assert_eq!(
        response.headers()["content-type"],
        eventstore::metrics::CONTENT_TYPE
    );
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    for family in [
        "orderflow_outbox_backlog{service=\"order\"} 0",
        "orderflow_relay_published_total{service=\"order\"} 0",
        "orderflow_consumer_dead_lettered_total{consumer=\"order.summary\"} 0",
        "# TYPE orderflow_consumer_processing_seconds histogram",
    ] {
        assert!(text.contains(family), "{family} missing from\n{text}");
    }
}

/// The gateway's router, with the default configuration (Redis is reached only when a
/// request is proxied).
fn gateway(metrics: eventstore::Metrics) -> axum::Router {
    let config = services::config::Config::from_lookup(|_| None).unwrap();
    let tokens = Arc::new(Tokens::new(SECRET.as_bytes(), Duration::from_secs(60)));
    let gateway = services::gateway::Gateway::new(&config, tokens, &metrics).unwrap();
    let gateway = Arc::new(gateway);
    let base = Base {
        service: Service::Gateway,
        metrics,
        health: Default::default(),
    };
    services::gateway::app(base, gateway)
}

#[tokio::test]
async fn the_gateway_documents_every_service_under_one_origin() {
    let response = gateway(eventstore::Metrics::new())
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(document["info"]["title"], "orderflow gateway service");
    let paths = document["paths"].as_object().unwrap();
    // The gateway's own, what every server serves, and one of each service's.
    for path in [
        "/gateway/upstreams",
        "/health/ready",
        "/openapi.json",
        "/orders/{order_id}",
        "/sagas/{order_id}",
        "/inventory/items/{sku}",
        "/payments/{order_id}",
        "/users/{user_id}/profile",
        "/notifications",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the gateway's document"
        );
    }
    let tags: Vec<&str> = document["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tag| tag["name"].as_str().unwrap())
        .collect();
    assert_eq!(tags.first(), Some(&"gateway"), "{tags:?}");
}
