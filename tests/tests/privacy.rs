//! Personal data is its owner's: a profile, preferences, notifications, an order, its
//! payment and saga, and a customer's order list answer only to the owner's token and
//! an operator's, through the gateway and on the services directly; anyone else gets
//! 401 (no token) or 404 (another user's token, as for something that does not exist).
//! Forged tokens verify nowhere, and the secret that signs them is generated, kept and
//! used again when none is configured.

use std::time::Duration;

use domain::user::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use services::auth::{Claims, ISSUER, Tokens};
use services::config::Service::{self, Gateway, Inventory, Notification, Order, Payment, User};
use services::http::caller::VIA_GATEWAY_HEADER;
use services::secrets::RETIRED_DEVELOPMENT_SECRET;
use tests::{System, answer, wait_for};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// A request's status and problem `type` (empty for a success).
async fn outcome(request: reqwest::RequestBuilder) -> (StatusCode, String, Value) {
    let (status, body) = answer(request.send().await.unwrap()).await;
    let kind = body["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("urn:orderflow:problem:")
        .to_owned();
    (status, kind, body)
}

/// Tokens that must verify nowhere, each claiming to be an operator.
fn forgeries(system: &System, user: Uuid) -> Vec<(&'static str, String)> {
    let operator = [Role::Operator];
    let long = Duration::from_secs(600);
    let wrong_key = Tokens::new(b"a key that is not this system's secret", long)
        .issue(user, "x@example.com", &operator)
        .unwrap();
    let old_secret = Tokens::new(RETIRED_DEVELOPMENT_SECRET.as_bytes(), long)
        .issue(user, "x@example.com", &operator)
        .unwrap();
    // The right key's claims with the signature stripped and the algorithm `none`.
    let genuine = system
        .tokens()
        .issue(user, "x@example.com", &operator)
        .unwrap();
    let claims = genuine.split('.').nth(1).unwrap();
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    let now = jsonwebtoken::get_current_timestamp();
    let stale = Claims {
        sub: user,
        email: "x@example.com".into(),
        iss: ISSUER.into(),
        iat: now - 7200,
        exp: now - 3600,
        roles: vec!["operator".into()],
    };
    let secret = system.config.secrets().unwrap().tokens;
    let key = jsonwebtoken::EncodingKey::from_secret(secret.bytes());
    let expired = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &stale, &key).unwrap();
    vec![
        ("wrong key", wrong_key),
        ("old development secret", old_secret),
        ("alg none", unsigned),
        ("expired", expired),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_answers_its_owner_and_operators_only_through_the_gateway_and_directly() {
    let all = [Gateway, Order, Inventory, Payment, User, Notification];
    // Direct requests are checked as from anywhere: no local caller is trusted.
    let system = System::start_with(&all, &[("ORDERFLOW_TRUST_LOCAL_CALLERS", "false")]).await;
    system.routable(&all[1..]).await;
    let owner_token = system.token_for("ada@example.com").await;
    let other_token = system.token_for("bob@example.com").await;
    system.token_for("ops@example.com").await;
    let granted = services::ops::set_role(&system.config, "OPS@example.com", Role::Operator, true)
        .await
        .unwrap();
    assert!(granted.granted && granted.changed);
    let operator_token = system.log_in("ops@example.com").await;
    let owner = system.tokens().verify(&owner_token).unwrap().sub;
    assert!(
        system
            .tokens()
            .verify(&operator_token)
            .unwrap()
            .is_operator()
    );

    // Ada orders; the saga confirms it, captures the payment and notifies her.
    let post = |path: &str, token: &str, body: Value| {
        system
            .http
            .post(system.url(Gateway, path))
            .bearer_auth(token)
            .json(&body)
    };
    let stock = json!({ "sku": "P1", "name": "P1", "quantity": 5 });
    assert_eq!(
        outcome(post("/inventory/items", &owner_token, stock))
            .await
            .0,
        StatusCode::CREATED
    );
    let order = json!({
        "customer_id": owner,
        "lines": [{ "sku": "P1", "quantity": 1, "unit_price_cents": 700 }],
        "card_token": "tok_visa",
    });
    let (status, _, placed) = outcome(post("/orders", &owner_token, order.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let order_id = placed["order_id"].as_str().unwrap().to_owned();
    let resources = [
        (User, format!("/users/{owner}")),
        (Notification, format!("/notifications?user_id={owner}")),
        (Order, format!("/customers/{owner}/orders")),
        (Order, format!("/orders/{order_id}")),
        (Payment, format!("/payments/{order_id}")),
        (Order, format!("/sagas/{order_id}")),
    ];
    wait_for(
        DEADLINE,
        "the order confirmed, paid and notified",
        || async {
            let (_, order) = system.get_as(Gateway, &resources[3].1, &owner_token).await;
            let (_, payment) = system.get_as(Gateway, &resources[4].1, &owner_token).await;
            let (_, sent) = system.get_as(Gateway, &resources[1].1, &owner_token).await;
            let confirmation = sent
                .as_array()?
                .iter()
                .any(|notification| notification["kind"] == "order_confirmed");
            (order["status"] == "confirmed" && payment["status"] == "captured" && confirmation)
                .then_some(())
        },
    )
    .await;

    let get = |service: Service, path: &str, token: Option<&str>| {
        let mut request = system.http.get(system.url(service, path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
    };
    let forged = forgeries(&system, owner);
    for (service, path) in &resources {
        for via in [Gateway, *service] {
            let at = format!("{via} {path}");
            let (status, kind, body) = outcome(get(via, path, None)).await;
            assert_eq!(
                (status, kind.as_str()),
                (StatusCode::UNAUTHORIZED, "unauthorized"),
                "anonymous {at}: {body}"
            );
            let (status, kind, body) = outcome(get(via, path, Some(&other_token))).await;
            assert_eq!(
                (status, kind.as_str()),
                (StatusCode::NOT_FOUND, "not-found"),
                "another user {at}: {body}"
            );
            for token in [&owner_token, &operator_token] {
                let (status, _, body) = outcome(get(via, path, Some(token))).await;
                assert_eq!(status, StatusCode::OK, "{at}: {body}");
            }
            for (forgery, token) in &forged {
                let (status, _, body) = outcome(get(via, path, Some(token))).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{forgery} {at}: {body}");
            }
        }
    }
    // Another user's order answers exactly as one that does not exist.
    let (_, _, theirs) = outcome(get(Order, &resources[3].1, Some(&other_token))).await;
    let missing = Uuid::now_v7();
    let (_, _, nothing) = outcome(get(
        Order,
        &format!("/orders/{missing}"),
        Some(&other_token),
    ))
    .await;
    assert_eq!(
        theirs["detail"].as_str().unwrap().replace(&order_id, "ID"),
        nothing["detail"]
            .as_str()
            .unwrap()
            .replace(&missing.to_string(), "ID")
    );

    // Stock levels are public.
    for via in [Gateway, Inventory] {
        let (status, _, item) = outcome(get(via, "/inventory/items/P1", None)).await;
        assert_eq!(status, StatusCode::OK, "{item}");
    }

    // Commands on Ada's data by Bob: her order and profile do not exist for him, and
    // an order in her name is forbidden.
    let as_other = |request: reqwest::RequestBuilder| request.bearer_auth(&other_token);
    for via in [Gateway, Order] {
        let cancel = system
            .http
            .post(system.url(via, &format!("/orders/{order_id}/cancel")));
        let (status, _, body) = outcome(as_other(cancel.json(&json!({})))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let place = system.http.post(system.url(via, "/orders")).json(&order);
        let (status, kind, body) = outcome(as_other(place)).await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{body}"
        );
        let anonymous = system.http.post(system.url(via, "/orders")).json(&order);
        assert_eq!(outcome(anonymous).await.0, StatusCode::UNAUTHORIZED);
    }
    for via in [Gateway, User] {
        let path = format!("/users/{owner}/preferences");
        let change = system.http.put(system.url(via, &path));
        let preferences = json!({ "email": false, "sms": false, "push": false });
        let (status, _, body) = outcome(as_other(change.json(&preferences))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }

    // A revoked operator's next token reads only its own data again.
    services::ops::set_role(&system.config, "ops@example.com", Role::Operator, false)
        .await
        .unwrap();
    let plain = system.log_in("ops@example.com").await;
    let (status, _, _) = outcome(get(Gateway, &resources[3].1, Some(&plain))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    system.stop().await;
}

/// Where the services listen on loopback only (development), a request that reaches
/// one directly without a token is the machine's own and is served; one the gateway
/// forwarded is not, and neither is anything through the gateway without a token,
/// unless anonymous reads are opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_callers_are_trusted_on_loopback_and_anonymous_reads_are_an_opt_in() {
    let system = System::start(&[Gateway, User]).await;
    system.routable(&[User]).await;
    let token = system.token_for("lou@example.com").await;
    let user = system.tokens().verify(&token).unwrap().sub;
    let path = format!("/users/{user}");
    let (status, body) = system.get(User, &path).await;
    assert_eq!(status, StatusCode::OK, "a local caller: {body}");
    let marked = system
        .http
        .get(system.url(User, &path))
        .header(VIA_GATEWAY_HEADER, "gateway");
    assert_eq!(outcome(marked).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(system.get(Gateway, &path).await.0, StatusCode::UNAUTHORIZED);
    system.stop().await;

    let open = System::start_with(&[Gateway, User], &[("ORDERFLOW_ANONYMOUS_READS", "true")]).await;
    open.routable(&[User]).await;
    let token = open.token_for("max@example.com").await;
    let user = open.tokens().verify(&token).unwrap().sub;
    let (status, body) = open.get(Gateway, &format!("/users/{user}")).await;
    assert_eq!(status, StatusCode::OK, "anonymous reads opened: {body}");
    open.stop().await;
}

/// With no secret configured, the first start generates one into the data folder,
/// readable by its user only, and a restart uses it again: tokens survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_secret_is_kept_and_tokens_survive_a_restart() {
    let data_dir = std::env::temp_dir().join(format!("orderflow-privacy-{}", Uuid::now_v7()));
    let dir = data_dir.display().to_string();
    let variables = [
        ("ORDERFLOW_DATA_DIR", dir.as_str()),
        ("ORDERFLOW_TRUST_LOCAL_CALLERS", "false"),
    ];
    let mut system = System::start_with(&[Gateway, User], &variables).await;
    system.routable(&[User]).await;
    let token = system.token_for("kim@example.com").await;
    let user = system.tokens().verify(&token).unwrap().sub;
    for file in ["jwt-secret", "digest-secret"] {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(data_dir.join(file)).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "{file}");
    }
    system.halt().await;
    system.resume().await;
    let (status, body) = system.get_as(User, &format!("/users/{user}"), &token).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the token from before the restart: {body}"
    );
    system.stop().await;
    std::fs::remove_dir_all(data_dir).unwrap();
}
