//! Shared by the services test binaries.

use sqlx::postgres::PgConnectOptions;

/// The PostgreSQL server tests use (`ORDERFLOW_PG_URL`, as the services do).
pub fn server() -> PgConnectOptions {
    std::env::var("ORDERFLOW_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
        .parse()
        .expect("ORDERFLOW_PG_URL is a PostgreSQL URL")
}
