//! Creating and migrating service databases.

use sqlx::postgres::PgConnectOptions;

use crate::config::{Config, Service};

/// Creates the service's database if it is missing, migrates it, and records the
/// schemas this binary writes in its registry table. Safe to run concurrently and
/// repeatedly (migrations take an advisory lock).
pub async fn prepare_database(
    options: &PgConnectOptions,
    connections: u32,
) -> anyhow::Result<sqlx::PgPool> {
    use anyhow::Context;
    let database = options
        .get_database()
        .context("the database URL names no database")?
        .to_owned();
    eventstore::db::create_database(options, &database)
        .await
        .with_context(|| format!("creating database {database}"))?;
    let pool = eventstore::db::connect(options.clone(), connections)
        .await
        .with_context(|| format!("connecting to database {database}"))?;
    eventstore::db::migrate(&pool)
        .await
        .with_context(|| format!("migrating database {database}"))?;
    eventstore::SchemaRegistry::builtin()?
        .publish(&pool)
        .await
        .with_context(|| format!("publishing schemas to {database}"))?;
    Ok(pool)
}

/// `orderflow migrate`: prepares the database of every service that has one.
pub async fn migrate_all(config: &Config) -> anyhow::Result<Vec<(Service, String)>> {
    let mut done = Vec::new();
    for service in Service::ALL {
        let Some(options) = config.database(service)? else {
            continue;
        };
        let pool = prepare_database(&options, 2).await?;
        pool.close().await;
        done.push((
            service,
            options.get_database().unwrap_or_default().to_owned(),
        ));
    }
    Ok(done)
}
