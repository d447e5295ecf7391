//! The `orderflow` binary end to end: exit codes, one-line errors, and `migrate`
//! against real PostgreSQL (into uniquely named databases, dropped afterwards).

use std::process::{Command, Output};

mod common;

/// Runs the binary with a data folder of its own (removed afterwards), so a `serve`
/// that gets as far as generating its secrets leaves nothing behind.
fn orderflow(args: &[&str], env: &[(String, String)]) -> Output {
    let data_dir = std::env::temp_dir().join(format!("orderflow-cli-{}", uuid::Uuid::now_v7()));
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env("ORDERFLOW_DATA_DIR", &data_dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "error")
        .output()
        .expect("the orderflow binary runs");
    let _ = std::fs::remove_dir_all(data_dir);
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn schemas_check_passes_on_the_shipped_schemas() {
    let out = orderflow(&["schemas", "check"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("compatible:"));
    let out = orderflow(&["schemas", "check", "--json"], &[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compatible"], true);
    assert_eq!(report["problems"], serde_json::json!([]));
}

/// A schema folder whose newer version breaks the older one (a new field without a
/// default) fails the check with a non-zero exit that names the event type.
#[test]
fn schemas_check_fails_on_an_incompatible_change() {
    let dir = std::env::temp_dir().join(format!("orderflow-schemas-{}", uuid::Uuid::now_v7()));
    let folder = dir.join("order");
    std::fs::create_dir_all(&folder).unwrap();
    let record = |fields: &str| {
        format!(
            r#"{{"type":"record","name":"OrderNoted","namespace":"orderflow.order","fields":[{fields}]}}"#
        )
    };
    let id = r#"{"name":"order_id","type":"string"}"#;
    std::fs::write(folder.join("OrderNoted.v1.avsc"), record(id)).unwrap();
    let path = dir.to_str().unwrap().to_owned();
    let fine = orderflow(&["schemas", "check", "--dir", &path], &[]);
    let broken_field = r#"{"name":"note","type":"string"}"#;
    std::fs::write(
        folder.join("OrderNoted.v2.avsc"),
        record(&format!("{id},{broken_field}")),
    )
    .unwrap();
    let broken = orderflow(&["schemas", "check", "--dir", &path, "--json"], &[]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(fine.status.success(), "{}", text(&fine.stdout));
    assert_eq!(broken.status.code(), Some(1), "{}", text(&broken.stdout));
    let report: serde_json::Value = serde_json::from_slice(&broken.stdout).unwrap();
    assert_eq!(report["compatible"], false);
    assert_eq!(report["problems"][0]["event_type"], "OrderNoted");
}

#[test]
fn the_shipped_schema_folder_checks_like_the_built_in_schemas() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../domain/schemas");
    let out = orderflow(&["schemas", "check", "--dir", dir, "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["schemas"], domain::wire::SCHEMA_FILES.len());
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    for args in [
        &["serve", "--services", "shipping"][..],
        &["serve", "--port", "9000"][..],
        &["no-such-command"][..],
        &["schemas"][..],
        &["replay"][..],
        &["replay", "no-such-projection"][..],
        &["replay", "--list", "order-summary"][..],
        &["replay", "--republish"][..],
        &["events", "read"][..],
        &["events", "tail", "--service", "gateway"][..],
        &["dlq", "list"][..],
        &["dlq", "show", "--service", "order", "--id", "not-a-uuid"][..],
        &["sagas", "list", "--status", "sleeping"][..],
        &["sagas", "show", "42"][..],
    ] {
        let out = orderflow(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("error:") || stderr.contains("Usage:"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn an_unreachable_database_is_one_line_and_exit_1() {
    let env = [(
        "ORDERFLOW_PG_URL".to_owned(),
        "postgres://postgres@127.0.0.1:1".to_owned(),
    )];
    // A list of services parses (it once made clap panic) and gets as far as the
    // database, like migrate.
    for arguments in [
        &["migrate"][..],
        &["serve", "--services", "order,inventory"][..],
        &[
            "events",
            "read",
            "order-0192f0c4-9b6e-7a41-9d6f-3c2a1b4e5d60",
        ][..],
        &["events", "tail", "--service", "inventory"][..],
        &["replay", "stock-levels"][..],
        &["sagas", "list"][..],
    ] {
        let out = orderflow(arguments, &env);
        assert_eq!(out.status.code(), Some(1), "{arguments:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("orderflow: "), "{stderr}");
        assert!(stderr.contains("Connection refused"), "{stderr}");
    }
}

#[test]
fn a_short_or_published_secret_is_refused_at_start_up_in_one_line() {
    for (variable, value, says) in [
        (
            "ORDERFLOW_JWT_SECRET",
            "short",
            "ORDERFLOW_JWT_SECRET has 5 bytes",
        ),
        (
            "ORDERFLOW_DIGEST_SECRET",
            "also too short",
            "ORDERFLOW_DIGEST_SECRET has 14 bytes",
        ),
        (
            "ORDERFLOW_JWT_SECRET",
            "orderflow-development-secret-change-me",
            "old development secret",
        ),
        (
            "ORDERFLOW_GATEWAY_AUTH_READS",
            "false",
            "ORDERFLOW_ANONYMOUS_READS",
        ),
        (
            "ORDERFLOW_GATEWAY_RATE_LIMIT",
            "0",
            "ORDERFLOW_GATEWAY_RATE_LIMIT=\"0\": not a positive whole number",
        ),
        (
            "ORDERFLOW_BIND_ADDRESS",
            "localhost",
            "ORDERFLOW_BIND_ADDRESS=\"localhost\"",
        ),
    ] {
        let env = [(variable.to_owned(), value.to_owned())];
        let out = orderflow(&["serve", "--services", "gateway"], &env);
        assert_eq!(out.status.code(), Some(1), "{variable}={value}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

#[test]
fn an_unreachable_broker_is_one_line_and_exit_1() {
    let env = [(
        "ORDERFLOW_AMQP_URL".to_owned(),
        "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
    )];
    for arguments in [
        &["dlq", "list", "--service", "inventory"][..],
        &["dlq", "replay", "--service", "payment", "--dry-run"][..],
    ] {
        let out = orderflow(arguments, &env);
        assert_eq!(out.status.code(), Some(1), "{arguments:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("orderflow: "), "{stderr}");
    }
}

#[test]
fn every_operator_command_has_an_example_in_its_help() {
    for command in [
        &["events", "read"][..],
        &["events", "tail"][..],
        &["replay"][..],
        &["dlq", "list"][..],
        &["dlq", "show"][..],
        &["dlq", "replay"][..],
        &["dlq", "purge"][..],
        &["sagas", "list"][..],
        &["sagas", "show"][..],
        &["users", "grant"][..],
        &["users", "revoke"][..],
    ] {
        let mut arguments = command.to_vec();
        arguments.push("--help");
        let out = orderflow(&arguments, &[]);
        assert!(out.status.success(), "{command:?}");
        let help = text(&out.stdout);
        assert!(help.contains("Example"), "{command:?}: {help}");
        assert!(help.contains("orderflow "), "{command:?}: {help}");
    }
}

#[tokio::test]
async fn migrate_creates_and_migrates_every_service_database() {
    let server = common::server();
    let run = uuid::Uuid::now_v7().simple().to_string();
    let services = ["order", "inventory", "payment", "user", "notification"];
    let databases: Vec<String> = services
        .iter()
        .map(|s| format!("orderflow_test_{run}_{s}"))
        .collect();
    let env: Vec<(String, String)> = services
        .iter()
        .zip(&databases)
        .map(|(service, database)| {
            (
                format!("ORDERFLOW_{}_DATABASE_URL", service.to_ascii_uppercase()),
                format!("postgres://postgres@127.0.0.1:5432/{database}"),
            )
        })
        .collect();

    // Twice: the second run finds everything in place and changes nothing.
    for _ in 0..2 {
        let out = tokio::task::spawn_blocking({
            let env = env.clone();
            move || orderflow(&["migrate"], &env)
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).lines().count(), services.len());
    }
    // Everything is read, and every database dropped, before asserting, so a failing
    // run leaves nothing behind.
    let mut found = Vec::new();
    for database in &databases {
        let pool = eventstore::db::connect(server.clone().database(database), 1)
            .await
            .unwrap();
        let tables: Result<Vec<String>, _> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await;
        let schemas: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM schema_registry")
            .fetch_one(&pool)
            .await;
        pool.close().await;
        found.push((tables, schemas));
    }
    for database in &databases {
        eventstore::db::drop_database(&server, database)
            .await
            .unwrap();
    }
    for (tables, schemas) in found {
        assert_eq!(
            tables.unwrap(),
            [
                "_sqlx_migrations",
                "consumer_streams",
                "customer_orders",
                "events",
                "idempotency_keys",
                "inbox",
                "notification_recipients",
                "notifications",
                "order_summaries",
                "outbox",
                "parked_messages",
                "parked_streams",
                "payment_statuses",
                "saga_steps",
                "sagas",
                "schema_registry",
                "snapshots",
                "stock_levels",
                "subscription_checkpoints",
                "user_emails",
                "user_profiles"
            ]
        );
        assert_eq!(schemas.unwrap() as usize, domain::wire::SCHEMA_FILES.len());
    }
}

/// Every `ORDERFLOW_*` variable the source reads is declared in the one typed
/// configuration, so `orderflow serve --help` lists it with its default and meaning.
#[test]
fn serve_help_lists_every_variable_the_source_names() {
    fn sources(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut texts = Vec::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for crate_dir in [
        "services/src",
        "eventstore/src",
        "projections/src",
        "sagas/src",
    ] {
        sources(&root.join(crate_dir), &mut texts);
    }
    let mut variables = std::collections::BTreeSet::new();
    for text in &texts {
        for (start, _) in text.match_indices("ORDERFLOW_") {
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            // `ORDERFLOW_<SERVICE>_...` patterns in prose, and the retired variable.
            if name.ends_with('_') || name == "ORDERFLOW_GATEWAY_AUTH_READS" {
                continue;
            }
            variables.insert(name);
        }
    }
    assert!(variables.len() > 30, "{variables:?}");
    let out = orderflow(&["serve", "--help"], &[]);
    let help = text(&out.stdout);
    for variable in &variables {
        assert!(
            help.contains(&format!("[env: {variable}")),
            "serve --help does not list {variable}"
        );
    }
}
