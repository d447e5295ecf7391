//! `orderflow sagas`: list the sagas, show one with its history.

use std::process::ExitCode;

use services::config::{Config, Service};
use services::ops;

use super::json_line;
use crate::cli::SagasCommand;

pub(crate) async fn sagas(config: &Config, command: SagasCommand) -> anyhow::Result<ExitCode> {
    let pool = ops::connect(config, Service::Order).await?;
    match command {
        SagasCommand::List {
            status,
            limit,
            json,
        } => {
            let sagas = sagas::runner::list(&pool, status.as_deref(), limit.max(0)).await?;
            if sagas.is_empty() && !json {
                eprintln!("no sagas");
            }
            for saga in &sagas {
                if json {
                    json_line(saga)?;
                } else {
                    println!(
                        "{}  {}  v{}  {}{}",
                        saga.order_id,
                        saga.step,
                        saga.version,
                        saga.updated_at.to_rfc3339(),
                        saga.reason
                            .as_deref()
                            .map(|reason| format!("  ({reason})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        SagasCommand::Show { order_id, json } => {
            let Some(saga) = sagas::runner::find(&pool, order_id).await? else {
                anyhow::bail!("no saga for order {order_id}");
            };
            if json {
                json_line(&saga)?;
            } else {
                println!(
                    "saga {} ({}), step {}, version {}",
                    saga.order_id, saga.saga_type, saga.step, saga.version
                );
                if let Some(at) = saga.deadline_at {
                    println!("deadline pending at {}", at.to_rfc3339());
                }
                println!("state {}", saga.state);
                for step in &saga.history {
                    println!(
                        "  v{}  {}  {} -> {}  sent [{}]",
                        step.version,
                        step.at.to_rfc3339(),
                        step.input,
                        step.step,
                        step.commands.join(", ")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
