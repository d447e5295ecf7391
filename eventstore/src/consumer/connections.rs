//! The database connections a consumer applies messages on.

/// The consumer's own database connections, kept open between messages. Handlers run
/// on these rather than on the pool because the pool pings every connection it gets
/// back, which costs a round trip per message (about a fifth of the consumer's
/// database work).
pub(super) struct Connections {
    options: sqlx::postgres::PgConnectOptions,
    idle: std::sync::Mutex<Vec<sqlx::PgConnection>>,
    permits: tokio::sync::Semaphore,
}

impl Connections {
    /// At most `concurrency` (at least one) taken at once.
    pub(super) fn new(options: sqlx::postgres::PgConnectOptions, concurrency: usize) -> Self {
        Connections {
            options,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(concurrency.max(1)),
        }
    }

    pub(super) async fn take(
        &self,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, sqlx::PgConnection), sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.lock().pop();
        let connection = match idle {
            Some(connection) => connection,
            None => <sqlx::PgConnection as sqlx::Connection>::connect_with(&self.options).await?,
        };
        Ok((permit, connection))
    }

    pub(super) fn give_back(&self, connection: sqlx::PgConnection) {
        self.lock().push(connection);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<sqlx::PgConnection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
