//! Distributed tracing end to end: the services export their spans over OTLP/HTTP to
//! a receiver in this test process (an axum route decoding `ExportTraceServiceRequest`
//! with `opentelemetry-proto`), and log JSON lines into a buffer. One order placed
//! through the gateway must be one trace, from the gateway through the order service,
//! its saga, inventory and payment to the notification sent, linked parent to child
//! across the broker; the log lines of its consumers and its saga carry its ids.
//!
//! This binary installs the process's one global subscriber, which is why these tests
//! live apart from the others.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use eventstore::trace::TraceParent;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use services::config::Service::{Gateway, Inventory, Notification, Order, Payment, User};
use services::telemetry::{Export, LogFormat, Options, Telemetry};
use tests::{System, answer, wait_for};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

const DEADLINE: Duration = Duration::from_secs(40);

/// A span as the receiver decoded it.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    /// OTLP's enum: 2 server, 3 client, 4 producer, 5 consumer.
    kind: i32,
    attributes: HashMap<String, String>,
    /// Unix nanoseconds.
    start: u64,
    end: u64,
}

const SERVER: i32 = 2;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

/// What every test of this binary shares: the receiver's spans, the captured log
/// lines, and the installed telemetry.
struct Harness {
    spans: Arc<Mutex<Vec<Exported>>>,
    /// The `service.name` of every resource that exported.
    services: Arc<Mutex<HashSet<String>>>,
    /// The receiver's traces URL.
    url: String,
    logs: Arc<Mutex<Vec<u8>>>,
    telemetry: Telemetry,
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let services = Arc::new(Mutex::new(HashSet::new()));
        let url = receive_into(spans.clone(), services.clone());
        let logs = Arc::new(Mutex::new(Vec::new()));
        let capture = Capture(logs.clone());
        // Outside the test's runtime: the exporter's HTTP client runs its own.
        let exported_to = url.clone();
        let telemetry = std::thread::spawn(move || {
            Telemetry::install(Options {
                format: LogFormat::Json,
                filter: EnvFilter::new("warn,eventstore=debug,sagas=debug"),
                writer: BoxMakeWriter::new(move || capture.clone()),
                ansi: false,
                export: Export::To(exported_to),
            })
        })
        .join()
        .expect("installing telemetry")
        .expect("telemetry installs");
        Harness {
            spans,
            services,
            url,
            logs,
            telemetry,
        }
    })
}

/// Starts the OTLP/HTTP receiver on a thread of its own; its traces URL.
fn receive_into(spans: Arc<Mutex<Vec<Exported>>>, services: Arc<Mutex<HashSet<String>>>) -> String {
    let (port_sender, port) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("receiver runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            port_sender
                .send(listener.local_addr().unwrap().port())
                .unwrap();
            let route = axum::routing::post(move |body: axum::body::Bytes| {
                let spans = spans.clone();
                let services = services.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut spans = spans.lock().unwrap();
                    for resource in request.resource_spans {
                        let names = resource.resource.iter().flat_map(|r| &r.attributes);
                        for name in names.filter(|a| a.key == "service.name") {
                            if let Some(AnyValue::StringValue(name)) =
                                name.value.as_ref().and_then(|v| v.value.clone())
                            {
                                services.lock().unwrap().insert(name);
                            }
                        }
                        for scope in resource.scope_spans {
                            spans.extend(scope.spans.into_iter().map(|span| {
                                Exported {
                                    trace_id: span.trace_id,
                                    span_id: span.span_id,
                                    parent: span.parent_span_id,
                                    name: span.name,
                                    kind: span.kind,
                                    start: span.start_time_unix_nano,
                                    end: span.end_time_unix_nano,
                                    attributes: span
                                        .attributes
                                        .into_iter()
                                        .filter_map(|attribute| {
                                            let value = match attribute.value?.value? {
                                                AnyValue::StringValue(text) => text,
                                                AnyValue::IntValue(number) => number.to_string(),
                                                AnyValue::BoolValue(flag) => flag.to_string(),
                                                other => format!("{other:?}"),
                                            };
                                            Some((attribute.key, value))
                                        })
                                        .collect(),
                                }
                            }));
                        }
                    }
                    StatusCode::OK
                }
            });
            let app = axum::Router::new().route("/v1/traces", route);
            axum::serve(listener, app).await.unwrap();
        });
    });
    let port = port.recv().expect("the receiver's port");
    format!("http://127.0.0.1:{port}/v1/traces")
}

impl Harness {
    /// The spans of `trace` exported so far, after sending every finished span.
    async fn trace(&'static self, trace: TraceParent) -> Vec<Exported> {
        tokio::task::spawn_blocking(|| self.telemetry.flush())
            .await
            .unwrap();
        let id = trace.trace_id.to_bytes().to_vec();
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.trace_id == id).cloned().collect()
    }

    /// The captured log lines, parsed.
    fn log_lines(&self) -> Vec<Value> {
        let logs = self.logs.lock().unwrap();
        String::from_utf8_lossy(&logs)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// The service a span ran in: its own `orderflow.service`, or its nearest ancestor's.
fn service_of<'a>(span: &'a Exported, by_id: &HashMap<&[u8], &'a Exported>) -> Option<&'a str> {
    let mut at = Some(span);
    while let Some(span) = at {
        if let Some(service) = span.attributes.get("orderflow.service") {
            return Some(service);
        }
        at = by_id.get(span.parent.as_slice()).copied();
    }
    None
}

/// Why the trace is not whole yet: every span's parent must be in it (or be the
/// client's span), and it must have reached the notification sender.
fn missing(spans: &[Exported], client: TraceParent) -> Option<String> {
    let ids: HashSet<&[u8]> = spans.iter().map(|s| s.span_id.as_slice()).collect();
    let client_span = client.span_id.to_bytes();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    if !spans.iter().any(|s| s.name.starts_with("send ")) {
        return Some(format!("no notification sent among {names:?}"));
    }
    let orphans: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent != client_span && !ids.contains(s.parent.as_slice()))
        .map(|s| s.name.as_str())
        .collect();
    (!orphans.is_empty()).then(|| format!("parents missing for {orphans:?} among {names:?}"))
}

/// The trace as an indented tree, children in start order, each span with its
/// service.
fn render(spans: &[Exported], client: TraceParent) -> String {
    fn walk(spans: &[Exported], parent: &[u8], depth: usize, out: &mut String) {
        let mut children: Vec<&Exported> = spans.iter().filter(|s| s.parent == parent).collect();
        children.sort_by_key(|s| s.start);
        for child in children {
            let service = child
                .attributes
                .get("orderflow.service")
                .map_or(String::new(), |service| format!("  [{service}]"));
            let took = (child.end.saturating_sub(child.start)) as f64 / 1e6;
            out.push_str(&format!(
                "{}{}{service}  {took:.1} ms\n",
                "  ".repeat(depth),
                child.name
            ));
            walk(spans, &child.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, &client.span_id.to_bytes(), 0, &mut out);
    out
}

/// Places an order through the gateway as a client that traces, and waits for it to
/// reach `status`. Returns the client's span, the order id and the correlation id.
async fn traced_order(
    system: &System,
    sku: &str,
    card: &str,
    status: &str,
) -> (TraceParent, String, String) {
    let token = system
        .token_for(&format!("{sku}@example.com").to_lowercase())
        .await;
    let stock = json!({ "sku": sku, "name": sku, "quantity": 5 });
    let response = system
        .http
        .post(system.url(Gateway, "/inventory/items"))
        .bearer_auth(&token)
        .json(&stock)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let claims = system.tokens().verify(&token).unwrap();
    let client = TraceParent::root();
    let order = json!({
        "customer_id": claims.sub,
        "lines": [{ "sku": sku, "quantity": 2, "unit_price_cents": 100 }],
        "card_token": card,
    });
    let response = system
        .http
        .post(system.url(Gateway, "/orders"))
        .bearer_auth(&token)
        .header("traceparent", client.to_string())
        .json(&order)
        .send()
        .await
        .unwrap();
    let correlation = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (code, placed) = answer(response).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
    let order_id = placed["order_id"].as_str().unwrap().to_owned();
    wait_for(DEADLINE, &format!("the order to be {status}"), || async {
        let path = format!("/orders/{order_id}");
        let (code, order) = system.get_as(Gateway, &path, &token).await;
        (code == StatusCode::OK && order["status"] == status).then_some(())
    })
    .await;
    (client, order_id, correlation)
}

/// Waits for the whole trace of `client` and returns its spans.
async fn whole_trace(client: TraceParent) -> Vec<Exported> {
    let harness = harness();
    let started = std::time::Instant::now();
    loop {
        let spans = harness.trace(client).await;
        match missing(&spans, client) {
            None => return spans,
            Some(why) if started.elapsed() > DEADLINE => panic!("the trace is not whole: {why}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_every_service() {
    let harness = harness();
    let all = [Gateway, Order, Inventory, Payment, User, Notification];
    let system = System::start(&all).await;
    system.routable(&all[1..]).await;
    let (client, order_id, correlation) =
        traced_order(&system, "T1", "tok_visa", "confirmed").await;
    let spans = whole_trace(client).await;
    // What README.md shows (`cargo test --test tracing -- --nocapture`).
    eprintln!("{}", render(&spans, client));
    let by_id: HashMap<&[u8], &Exported> =
        spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();

    // One root below the client: the gateway's request span.
    let client_span = client.span_id.to_bytes();
    let roots: Vec<&Exported> = spans.iter().filter(|s| s.parent == client_span).collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(roots[0].kind, SERVER);
    assert_eq!(roots[0].attributes["orderflow.service"], "gateway");

    // Every service on the order's path has spans in it.
    let services: HashSet<&str> = spans.iter().filter_map(|s| service_of(s, &by_id)).collect();
    for service in ["gateway", "order", "inventory", "payment", "notification"] {
        assert!(
            services.contains(service),
            "no {service} span in {services:?}"
        );
    }
    // Across the broker: inventory and payment handle what the order service's relay
    // published, as children of its publish spans.
    for (service, command) in [
        ("inventory", "ReserveStock"),
        ("payment", "AuthorizePayment"),
    ] {
        let handled = spans
            .iter()
            .find(|s| s.kind == CONSUMER && s.name == command)
            .unwrap_or_else(|| panic!("no {command} handled in {services:?}"));
        let mut at = by_id[handled.parent.as_slice()];
        // The handler's span hangs below its transaction's, which continues the message.
        if at.kind == CONSUMER {
            at = by_id[at.parent.as_slice()];
        }
        assert_eq!(at.kind, PRODUCER, "{command}'s parent: {at:?}");
        assert_eq!(at.attributes["orderflow.service"], "order");
        assert_eq!(service_of(handled, &by_id), Some(service));
    }
    // The saga's steps, each with the commands it sent.
    let steps: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.name.starts_with("saga: "))
        .collect();
    assert!(steps.len() >= 3, "{steps:#?}");
    assert!(steps.iter().any(|s| {
        s.attributes
            .get("commands")
            .is_some_and(|c| c.contains("ReserveStock"))
    }));

    // The log lines of the consumers and the saga for this order carry its ids.
    let trace_id = client.trace_id.to_string();
    let lines = harness.log_lines();
    let ours = |line: &&Value| {
        line["spans"].as_array().is_some_and(|spans| {
            spans
                .iter()
                .any(|span| span["correlation_id"] == correlation.as_str())
                && spans
                    .iter()
                    .any(|span| span["trace_id"] == trace_id.as_str())
        })
    };
    for message in ["handled", "applied", "saga stepped"] {
        let found = lines
            .iter()
            .filter(|line| line["fields"]["message"] == message)
            .filter(ours)
            .count();
        assert!(
            found > 0,
            "no {message:?} line of order {order_id} carries its ids"
        );
    }
    stores_tell_the_chain(&system, &order_id, client);
    system.stop().await;
}

/// `orderflow trace` reads the same causal chain from the stores: each link caused by
/// the one before it, across services, every one in the request's trace.
fn stores_tell_the_chain(system: &System, order_id: &str, client: TraceParent) {
    let output = std::process::Command::new(tests::orderflow_binary())
        .args(["trace", order_id, "--json"])
        .envs(system.env())
        .env("RUST_LOG", "error")
        .output()
        .expect("orderflow trace runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let chain: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(chain["gaps"], json!([]));
    let links = chain["links"].as_array().expect("links");
    let find = |service: &str, name: &str| {
        links
            .iter()
            .find(|link| link["service"] == service && link["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {service}: {links:#?}"))
    };
    let placed = find("order", "OrderPlaced");
    let reserve = find("order", "ReserveStock");
    let reserved = find("inventory", "StockReserved");
    let answered = find("inventory", "OrderStockReserved");
    let authorize = find("order", "AuthorizePayment");
    let authorized = find("payment", "PaymentAuthorized");
    let confirmed = find("order", "OrderConfirmed");
    let notified = find("notification", "email order_confirmed");
    assert_eq!(reserve["kind"], "command");
    assert_eq!(
        reserve["causation_id"], placed["id"],
        "the saga's command, caused by the event"
    );
    assert_eq!(
        reserved["causation_id"], reserve["id"],
        "inventory's event, caused by the command"
    );
    assert_eq!(answered["causation_id"], reserve["id"]);
    assert_eq!(
        authorize["causation_id"], answered["id"],
        "the saga's next step, caused by the answer"
    );
    assert_eq!(authorized["causation_id"], authorize["id"]);
    assert_eq!(notified["causation_id"], confirmed["id"]);
    let trace_id = client.trace_id.to_string();
    for link in [
        placed, reserve, reserved, answered, authorize, authorized, confirmed, notified,
    ] {
        assert_eq!(link["trace_id"], trace_id.as_str(), "{link}");
    }
    // The text form is a tree with the order's placement at its root.
    let output = std::process::Command::new(tests::orderflow_binary())
        .args(["trace", order_id])
        .envs(system.env())
        .env("RUST_LOG", "error")
        .output()
        .expect("orderflow trace runs");
    let text = String::from_utf8_lossy(&output.stdout);
    eprintln!("{text}");
    let roots: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("  2"))
        .collect();
    assert_eq!(roots.len(), 1, "one root: {text}");
    assert!(roots[0].contains("OrderPlaced"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_orders_compensation_is_in_its_trace() {
    let all = [Gateway, Order, Inventory, Payment, User, Notification];
    let system = System::start(&all).await;
    system.routable(&all[1..]).await;
    let (client, _, _) = traced_order(&system, "T2", "tok_decline", "cancelled").await;
    let spans = whole_trace(client).await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"PaymentDeclined"), "{names:?}");
    assert!(
        names.contains(&"ReleaseStock"),
        "the compensation: {names:?}"
    );
    system.stop().await;
}

/// The binary exports over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (to the
/// spans of a request that carried a `traceparent`), and nothing when it is not; both
/// run and stop cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exports_only_when_an_endpoint_is_set() {
    let harness = harness();
    let endpoint = harness.url.trim_end_matches("/v1/traces").to_owned();
    for export in [true, false] {
        let client =
            one_traced_request(export.then_some(endpoint.as_str()), "orderflow-under-test").await;
        let spans = harness.trace(client).await;
        if export {
            assert!(
                spans
                    .iter()
                    .any(|s| s.name == "GET /gateway/upstreams" && s.kind == SERVER),
                "{spans:#?}"
            );
            let services = harness.services.lock().unwrap();
            assert!(services.contains("orderflow-under-test"), "{services:?}");
        } else {
            assert!(spans.is_empty(), "exported without an endpoint: {spans:#?}");
        }
    }
}

/// Runs `orderflow serve --services gateway` (exporting to `endpoint` if given, as
/// `service_name`), sends it one request with a new client `traceparent`, and stops it
/// with SIGTERM, a graceful stop that sends what is buffered. The client's span.
async fn one_traced_request(endpoint: Option<&str>, service_name: &str) -> TraceParent {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let data_dir =
        std::env::temp_dir().join(format!("orderflow-test-{}", uuid::Uuid::now_v7().simple()));
    let mut env = vec![
        (
            "ORDERFLOW_DATA_DIR".to_owned(),
            data_dir.display().to_string(),
        ),
        (
            "ORDERFLOW_REGISTRY_NAMESPACE".to_owned(),
            format!("orderflow-test-{}", uuid::Uuid::now_v7().simple()),
        ),
        ("OTEL_SERVICE_NAME".to_owned(), service_name.to_owned()),
    ];
    if let Some(endpoint) = endpoint {
        env.push((
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            endpoint.to_owned(),
        ));
    }
    let arguments = ["serve", "--services", "gateway", "--port", &port];
    let mut gateway = tests::Spawned::orderflow(&arguments, &env);
    let client = TraceParent::root();
    let url = format!("http://127.0.0.1:{port}/gateway/upstreams");
    let http = reqwest::Client::new();
    wait_for(DEADLINE, "the gateway to answer", || async {
        let sent = http
            .get(&url)
            .header("traceparent", client.to_string())
            .send()
            .await;
        sent.is_ok_and(|r| r.status() == StatusCode::OK)
            .then_some(())
    })
    .await;
    let pid = gateway.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || gateway.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the gateway stopped with {status}");
    let _ = std::fs::remove_dir_all(&data_dir);
    client
}

/// Handles every message by doing nothing: what is traced is the consumer around it.
struct Nothing;

impl eventstore::Handler for Nothing {
    async fn handle(
        &self,
        _: &eventstore::Message,
        _: &mut eventstore::StoreTransaction<'_>,
    ) -> Result<(), eventstore::HandlerError> {
        Ok(())
    }
}

/// A consumer that crashes with a message unacknowledged gets it again from the broker;
/// handling the redelivery continues the trace the message was sent in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_after_a_crash_continues_its_trace() {
    use eventstore::amqp::{self, EVENTS_EXCHANGE, Envelope};
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};

    let harness = harness();
    let db = tests::TestDb::new(5).await.unwrap();
    let vhost = tokio::task::spawn_blocking(tests::Vhost::new)
        .await
        .unwrap()
        .unwrap();
    let config = eventstore::ConsumerConfig::events("order", "traced", &vhost.url, &["order.#"]);
    let crashing = amqp::connect(&vhost.url, "crashing").await.unwrap();
    let channel = crashing.create_channel().await.unwrap();
    config.declare(&channel).await.unwrap();
    let event = domain::inventory::StockEvent::StockAdded {
        sku: "TRACED".into(),
        quantity: 1,
    };
    let encoded = tests::TestDb::registry().encode(&event).unwrap();
    let sender = TraceParent::root();
    let envelope = Envelope {
        message_id: uuid::Uuid::now_v7(),
        message_type: "StockAdded".into(),
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        stream_id: "stock-TRACED".into(),
        stream_version: Some(1),
        global_position: 1,
        schema_fingerprint: encoded.fingerprint,
        timestamp_ms: 0,
        trace: Some(sender),
    };
    channel
        .basic_publish(
            EVENTS_EXCHANGE.into(),
            "order.StockAdded".into(),
            BasicPublishOptions::default(),
            &encoded.payload,
            envelope.properties(),
        )
        .await
        .unwrap();
    // The first consumer takes the message and dies without acknowledging it.
    let mut deliveries = channel
        .basic_consume(
            config.queue().as_str().into(),
            "crashing".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let first = deliveries.next().await.unwrap().unwrap();
    assert!(!first.redelivered);
    crashing.close(320, "crash".into()).await.unwrap();

    let cancel = tokio_util::sync::CancellationToken::new();
    let consumer = eventstore::Consumer::new(
        config,
        db.store(),
        tests::TestDb::registry(),
        Nothing,
        eventstore::Metrics::new(),
    );
    tokio::spawn(consumer.run(cancel.clone()));
    let id = envelope.message_id.to_string();
    // The handler's span and its transaction's, which ends (and is exported) later.
    let what = "the redelivery's handle and transaction spans in the sender's trace";
    let (handled, transaction) = wait_for(DEADLINE, what, || async {
        let spans = harness.trace(sender).await;
        let handled = spans
            .iter()
            .find(|s| s.attributes.get("messaging.message.id") == Some(&id))?;
        let transaction = spans.iter().find(|s| s.span_id == handled.parent)?;
        Some((handled.clone(), transaction.clone()))
    })
    .await;
    // handle → transaction → the sender's span: the original trace, continued.
    assert_eq!(handled.kind, CONSUMER);
    assert_eq!(transaction.kind, CONSUMER);
    assert_eq!(transaction.parent, sender.span_id.to_bytes().to_vec());
    cancel.cancel();
}

/// The series names (`orderflow_…`) a PromQL expression reads.
fn series_in(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    while let Some(start) = rest.find("orderflow_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The shipped Grafana dashboard queries only series `/metrics` serves: after one
/// order through the gateway (so histograms, breakers and providers have reported),
/// every name its expressions read is in the exposition, which is OpenMetrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_served() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/orderflow.json"
        ))
        .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let expressions: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .filter_map(|target| target["expr"].as_str())
        .collect();
    assert!(expressions.len() >= 10, "{expressions:?}");
    let all = [Gateway, Order, Inventory, Payment, User, Notification];
    let system = System::start(&all).await;
    system.routable(&all[1..]).await;
    traced_order(&system, "M1", "tok_visa", "confirmed").await;
    let response = system
        .http
        .get(system.url(Order, "/metrics"))
        .send()
        .await
        .unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let exposition = response.text().await.unwrap();
    let served = |name: &str| {
        exposition.lines().any(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
    };
    let mut missing = Vec::new();
    for expression in &expressions {
        for name in series_in(expression) {
            if !served(&name) {
                missing.push(name);
            }
        }
    }
    // The saga's step counted once it committed, under its input's kind.
    let placed = "orderflow_saga_steps_total{saga=\"order-fulfilment\",input=\"OrderPlaced\",step=\"reserving_stock\"} 1";
    assert!(exposition.contains(placed), "{exposition}");
    let fulfilled = "orderflow_order_fulfilment_seconds_count{outcome=\"confirmed\"} 1";
    assert!(exposition.contains(fulfilled), "{exposition}");
    assert!(
        missing.is_empty(),
        "the dashboard queries series /metrics lacks: {missing:?}"
    );
    system.stop().await;
}

/// The shipped Prometheus configuration is YAML that scrapes `/metrics` of every
/// service at its default port.
#[test]
fn the_scrape_config_covers_every_service() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/prometheus.yml"
    ))
    .expect("the scrape config");
    let documents =
        yaml_rust2::YamlLoader::load_from_str(&text).expect("the scrape config is YAML");
    let job = &documents[0]["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let targets: HashSet<String> = job["static_configs"]
        .as_vec()
        .expect("static_configs")
        .iter()
        .flat_map(|config| config["targets"].as_vec().cloned().unwrap_or_default())
        .filter_map(|target| target.as_str().map(str::to_owned))
        .collect();
    for service in [Gateway, Order, Inventory, Payment, User, Notification] {
        let port = service.port();
        assert!(
            targets
                .iter()
                .any(|target| target.ends_with(&format!(":{port}"))),
            "{service} (port {port}) is not scraped: {targets:?}"
        );
    }
}

/// An independent check outside Rust: `scripts/otlp-receiver.py`, on the official
/// Python classes of the OpenTelemetry protocol, receives the binary's export and
/// reads the request's server span in the client's trace, below the client's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_in_python_reads_the_export() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::process::Command::new(root.join("scripts/python-otlp"))
        .output()
        .expect("scripts/python-otlp runs");
    assert!(
        python.status.success(),
        "cannot set up Python's OTLP classes: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let receiver_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let output =
        std::env::temp_dir().join(format!("orderflow-otlp-{}.jsonl", uuid::Uuid::now_v7()));
    let mut receiver = std::process::Command::new(&python)
        .arg(root.join("scripts/otlp-receiver.py"))
        .args([receiver_port.as_str(), output.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the Python receiver starts");
    // It says when it listens.
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(receiver.stdout.take().unwrap()),
        &mut said,
    )
    .unwrap();
    assert_eq!(said.trim(), "listening");

    let endpoint = format!("http://127.0.0.1:{receiver_port}");
    let client = one_traced_request(Some(&endpoint), "orderflow-for-python").await;
    let _ = receiver.kill();
    let _ = receiver.wait();
    let lines = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&output);
    let spans: Vec<Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let trace_id = client.trace_id.to_string();
    let server = spans
        .iter()
        .find(|span| {
            span["trace_id"] == trace_id.as_str() && span["name"] == "GET /gateway/upstreams"
        })
        .unwrap_or_else(|| panic!("Python read no span of the request: {spans:#?}"));
    assert_eq!(server["kind"], SERVER);
    assert_eq!(server["parent"], client.span_id.to_string().as_str());
    assert_eq!(server["service"], "orderflow-for-python");
}
