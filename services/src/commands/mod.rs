//! What each `orderflow` command does, a file per command; `main` dispatches here.

pub(crate) mod dlq;
pub(crate) mod events;
pub(crate) mod load;
pub(crate) mod replay;
pub(crate) mod sagas;
pub(crate) mod schemas;
pub(crate) mod serve;
pub(crate) mod trace;
pub(crate) mod users;

use anyhow::Context;
use services::config::Config;
use tokio_util::sync::CancellationToken;

/// Prints a value as one JSON line.
pub(crate) fn json_line(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Cancelled on Ctrl-C.
pub(crate) fn interrupted() -> CancellationToken {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            trigger.cancel();
        }
    });
    cancel
}

/// What is older than this may have lost its inbox rows to retention, so consumers
/// could not recognise it as a duplicate: the message retention, less an hour for
/// clocks and for the pruner's schedule (half the retention when that is shorter).
pub(crate) fn retention_horizon(config: &Config) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let kept = chrono::Duration::from_std(config.retention.messages)
        .context("the message retention is too long")?;
    let margin = chrono::Duration::hours(1).min(kept / 2);
    Ok(chrono::Utc::now() - kept + margin)
}
