//! Connecting to PostgreSQL, creating a service's database and migrating it.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// The event-store tables every service database holds.
pub static EVENT_STORE_MIGRATIONS: sqlx::migrate::Migrator =
    sqlx::migrate!("../migrations/eventstore");

/// A pool tuned for this workload: sqlx's default pings a connection each time it is
/// taken out, which on a 2-core machine cost 20–40 % of append throughput; a broken
/// connection shows up as an error on first use instead, and callers retry.
///
/// Its connections (and every connection made from its options: relays, consumers)
/// end a transaction left idle for [`IDLE_IN_TRANSACTION_TIMEOUT`]: an open writer
/// holds every reader of the store back (see `store::Fence`), and no code path of
/// orderflow waits between the statements of a transaction for anything but the
/// database, so one that idles that long is stuck (a process paused, a bug).
pub async fn connect(
    options: PgConnectOptions,
    max_connections: u32,
) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(guarded(options))
        .await
}

/// How long an orderflow connection may sit idle inside a transaction before
/// PostgreSQL ends its session (and so rolls the transaction back).
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// `options` with the guard against transactions left open.
pub fn guarded(options: PgConnectOptions) -> PgConnectOptions {
    let timeout = format!("{}ms", IDLE_IN_TRANSACTION_TIMEOUT.as_millis());
    options.options([("idle_in_transaction_session_timeout", timeout.as_str())])
}

/// `options` for a leader's own connection (the relay's, a subscription's): the server
/// must notice quickly when a leader's host dies or is cut off, so that its session,
/// and with it the advisory lock it leads by, ends within seconds, not hours.
pub fn leader_options(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("tcp_keepalives_idle", "1"),
        ("tcp_keepalives_interval", "1"),
        ("tcp_keepalives_count", "2"),
        ("tcp_user_timeout", "3000"),
    ])
}

/// A session advisory lock that elects one leader per database.
#[derive(Debug, Clone, Copy)]
pub enum LeaderLock<'a> {
    /// One 64-bit key (the relay's).
    Key(i64),
    /// A class and a name, hashed (a subscription's).
    Named(i32, &'a str),
}

/// Connects with `options` and tries `lock` every `every` until it holds it (the
/// connection is returned: closing it hands the lead on) or `cancel` fires (`None`).
pub async fn wait_to_lead(
    options: &PgConnectOptions,
    lock: LeaderLock<'_>,
    every: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Option<PgConnection>, sqlx::Error> {
    let mut connection = PgConnection::connect_with(options).await?;
    loop {
        let leading: bool = match lock {
            LeaderLock::Key(key) => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut connection)
                    .await?
            }
            LeaderLock::Named(class, name) => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                    .bind(class)
                    .bind(name)
                    .fetch_one(&mut connection)
                    .await?
            }
        };
        if leading {
            return Ok(Some(connection));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The options for `database` on the server `server_url` points at.
pub fn database_url(server_url: &str, database: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(server_url.parse::<PgConnectOptions>()?.database(database))
}

/// Creates `database` on `server`'s PostgreSQL, unless it exists.
pub async fn create_database(server: &PgConnectOptions, database: &str) -> Result<(), sqlx::Error> {
    let mut admin = admin_connection(server).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let statement = format!("CREATE DATABASE {}", quote_identifier(database));
        match sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
        {
            Ok(_) => {}
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(error))
                if matches!(error.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(error) => return Err(error),
        }
    }
    admin.close().await
}

/// Drops `database` (disconnecting anyone still using it). Used by tests and tools.
pub async fn drop_database(server: &PgConnectOptions, database: &str) -> Result<(), sqlx::Error> {
    let mut admin = admin_connection(server).await?;
    let statement = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_identifier(database)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(&mut admin)
        .await?;
    admin.close().await
}

/// Runs the event-store migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    EVENT_STORE_MIGRATIONS.run(pool).await
}

/// A connection to the server's `postgres` database, for creating and dropping others.
async fn admin_connection(server: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect_with(&server.clone().database("postgres")).await
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
