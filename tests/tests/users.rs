//! The user service end to end: registration with a unique e-mail, log-in with an
//! access token, the profile read model, and changes to profile and preferences.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use services::auth::{TokenError, Tokens};
use services::config::Service::User;
use tests::{System, answer};

async fn register(system: &System, email: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({ "email": email, "name": "Ada Lovelace", "password": password });
    answer(system.post(User, "/users", body).await).await
}

async fn log_in(system: &System, email: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({ "email": email, "password": password });
    answer(system.post(User, "/auth/token", body).await).await
}

#[tokio::test]
async fn a_user_registers_logs_in_and_reads_their_profile() {
    let system = System::start(&[User]).await;
    let (status, registered) = register(&system, " Ada@Example.com ", "correct horse").await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    let user_id = registered["user_id"].as_str().unwrap().to_owned();
    let version = registered["version"].as_i64().unwrap();

    // Right after registering, with any spelling of the address.
    let (status, token) = log_in(&system, "ada@EXAMPLE.com", "correct horse").await;
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["expires_in"], 3600);
    let claims = system
        .tokens()
        .verify(token["access_token"].as_str().unwrap())
        .expect("signed with the configured secret");
    assert_eq!(claims.sub.to_string(), user_id);
    assert_eq!(claims.email, "ada@example.com");

    let path = format!("/users/{user_id}?min_version={version}");
    let (status, profile) = system.get(User, &path).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["email"], "ada@example.com");
    assert_eq!(profile["name"], "Ada Lovelace");
    assert_eq!(
        profile["preferences"],
        json!({ "email": true, "sms": false, "push": false })
    );
    let everything = format!("{registered}{token}{profile}");
    assert!(
        !everything.contains("argon2"),
        "no password hash is ever shown"
    );

    // The password is stored as an Argon2id hash only: nowhere in the database as sent.
    let pool = system.pool(User).await;
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT encode(payload, 'escape') FROM events UNION ALL \
         SELECT encode(request, 'escape') FROM idempotency_keys",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(stored.iter().any(|text| text.contains("$argon2id$")));
    assert!(stored.iter().all(|text| !text.contains("correct horse")));
    system.stop().await;
}

#[tokio::test]
async fn wrong_credentials_and_bad_input_are_refused() {
    let system = System::start(&[User]).await;
    assert_eq!(
        register(&system, "bob@example.com", "hunter22!").await.0,
        StatusCode::CREATED
    );
    for (email, password) in [
        ("bob@example.com", "hunter23!"),
        ("nobody@example.com", "hunter22!"),
    ] {
        let (status, problem) = log_in(&system, email, password).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
        assert_eq!(problem["type"], "urn:orderflow:problem:invalid-credentials");
    }
    let (status, problem) = register(&system, "bob@example.com", "short").await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("password"))
    );
    let (status, problem) = register(&system, "not-an-address", "long enough").await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("email"))
    );
    let (status, _) = system
        .get(User, "/users/0192f0c4-9b6e-7a41-9d6f-3c2a1b4e5d60")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    system.stop().await;
}

/// One address, one user: a second registration is a 409, and of ten racing
/// registrations of one new address exactly one wins.
#[tokio::test]
async fn an_email_address_belongs_to_one_user() {
    let system = System::start(&[User]).await;
    assert_eq!(
        register(&system, "eve@example.com", "password one").await.0,
        StatusCode::CREATED
    );
    let (status, problem) = register(&system, "EVE@example.com", "password two").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["type"], "urn:orderflow:problem:email-taken");
    let racing = (0..10).map(|i| {
        let system = &system;
        async move {
            register(system, "race@example.com", &format!("password {i}"))
                .await
                .0
        }
    });
    let statuses = futures_util::future::join_all(racing).await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let taken = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, taken), (1, 9), "{statuses:?}");
    system.stop().await;
}

#[tokio::test]
async fn profile_and_preferences_change_with_if_match() {
    let system = System::start(&[User]).await;
    let (_, registered) = register(&system, "kim@example.com", "password one").await;
    let user_id = registered["user_id"].as_str().unwrap().to_owned();
    let put = |path: String, body: Value, if_match: Option<&str>| {
        let mut request = system.http.put(system.url(User, &path)).json(&body);
        if let Some(version) = if_match {
            request = request.header("if-match", version);
        }
        async move { answer(request.send().await.unwrap()).await }
    };
    let (status, changed) = put(
        format!("/users/{user_id}/profile"),
        json!({ "name": "Kim Lee" }),
        Some("1"),
    )
    .await;
    assert_eq!(
        (status, changed["version"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{changed}"
    );
    // Stale If-Match: the user moved on to version 2.
    let (status, problem) = put(
        format!("/users/{user_id}/preferences"),
        json!({ "email": true, "sms": true, "push": false }),
        Some("1"),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let (status, changed) = put(
        format!("/users/{user_id}/preferences"),
        json!({ "email": false, "sms": true, "push": true }),
        Some("2"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    let (_, profile) = system
        .get(User, &format!("/users/{user_id}?min_version=3"))
        .await;
    assert_eq!(profile["name"], "Kim Lee");
    assert_eq!(
        profile["preferences"],
        json!({ "email": false, "sms": true, "push": true })
    );
    let (status, _) = put(
        format!("/users/{}/profile", uuid::Uuid::now_v7()),
        json!({ "name": "Nobody" }),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    system.stop().await;
}

/// Tokens expire after ORDERFLOW_JWT_TTL_SECONDS and are signed with
/// ORDERFLOW_JWT_SECRET.
#[tokio::test]
async fn tokens_use_the_configured_secret_and_lifetime() {
    let system = System::start_with(
        &[User],
        &[
            ("ORDERFLOW_JWT_SECRET", "a test secret, long enough to sign"),
            ("ORDERFLOW_JWT_TTL_SECONDS", "120"),
        ],
    )
    .await;
    register(&system, "lee@example.com", "password one").await;
    let (_, token) = log_in(&system, "lee@example.com", "password one").await;
    assert_eq!(token["expires_in"], 120);
    let token = token["access_token"].as_str().unwrap();
    let configured = Tokens::new(
        b"a test secret, long enough to sign",
        Duration::from_secs(120),
    );
    assert!(configured.verify(token).is_ok());
    let other = Tokens::new(
        b"another secret, as long as the first",
        Duration::from_secs(120),
    );
    assert!(matches!(other.verify(token), Err(TokenError::Invalid(_))));
    system.stop().await;
}
