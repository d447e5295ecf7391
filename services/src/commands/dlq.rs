//! `orderflow dlq`: list, show, replay and purge dead letters and parked events.

use std::process::ExitCode;

use anyhow::Context;
use eventstore::dlq::DeadLetter;
use services::config::Config;
use services::ops;

use super::{json_line, retention_horizon};
use crate::cli::{DlqCommand, DlqSelection};

pub(crate) async fn dlq(config: &Config, command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List { service, json } => {
            let letters = ops::dead_letters(config, service).await?;
            let parked = ops::parked_events(config, service).await?;
            if letters.is_empty() && parked.is_empty() && !json {
                eprintln!("no dead letters for {service}");
            }
            let views = letters
                .iter()
                .map(ops::DeadLetterView::from)
                .chain(parked.iter().map(ops::DeadLetterView::from));
            for view in views {
                if json {
                    json_line(&view)?;
                } else {
                    println!("{view}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { service, id, json } => {
            let Some(view) = ops::dead_letter(config, service, id).await? else {
                anyhow::bail!("no dead letter {id} for {service}");
            };
            if json {
                json_line(&view)?;
            } else {
                println!("{view}");
                println!("{}", serde_json::to_string_pretty(&view.data)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay(chosen) => {
            let select =
                |letter: &DeadLetter| chosen.id.is_none_or(|id| letter.message_id == Some(id));
            let service = chosen.service;
            let url = &config.amqp_url;
            let outcome = if chosen.past_retention {
                eventstore::dlq::replay(url, service.name(), select, chosen.dry_run).await
            } else {
                let horizon = retention_horizon(config)?;
                eventstore::dlq::replay_since(url, service.name(), select, chosen.dry_run, horizon)
                    .await
            }
            .with_context(|| format!("cannot replay the {service} dead letters"))?;
            let parked = ops::replay_parked(config, service, chosen.id, chosen.dry_run)
                .await
                .with_context(|| format!("cannot replay the {service} parked events"))?;
            let verb = if chosen.dry_run {
                "would replay"
            } else {
                "replayed"
            };
            report_dead_letters(&outcome, &parked, verb, &chosen)
        }
        DlqCommand::Purge(chosen) => {
            let select =
                |letter: &DeadLetter| chosen.id.is_none_or(|id| letter.message_id == Some(id));
            let service = chosen.service;
            let pool = ops::connect(config, service).await?;
            let outcome = eventstore::dlq::purge(
                &config.amqp_url,
                service.name(),
                &pool,
                select,
                chosen.dry_run,
            )
            .await
            .with_context(|| format!("cannot purge the {service} dead letters"))?;
            let parked = ops::skip_parked(config, service, chosen.id, chosen.dry_run)
                .await
                .with_context(|| format!("cannot skip the {service} parked events"))?;
            let verb = if chosen.dry_run {
                "would purge"
            } else {
                "purged"
            };
            report_dead_letters(&outcome, &parked, verb, &chosen)
        }
    }
}

/// Prints what a replay or purge did, with the dead letters of the broker and the
/// events parked by the service's own subscriptions alike; fails when `--id` named
/// neither.
pub(crate) fn report_dead_letters(
    outcome: &eventstore::dlq::Outcome,
    parked: &ops::ParkedOutcome,
    verb: &str,
    chosen: &DlqSelection,
) -> anyhow::Result<ExitCode> {
    let (json, id) = (chosen.json, chosen.id);
    let done = outcome
        .done
        .iter()
        .map(ops::DeadLetterView::from)
        .chain(parked.done.iter().map(ops::DeadLetterView::from));
    let mut handled = 0;
    for view in done {
        handled += 1;
        if json {
            json_line(&serde_json::json!({ "action": verb, "letter": view }))?;
        } else {
            println!("{verb} {view}");
        }
    }
    let left: Vec<(ops::DeadLetterView, &String)> = outcome
        .skipped
        .iter()
        .map(|(letter, why)| (ops::DeadLetterView::from(letter), why))
        .chain(
            parked
                .left
                .iter()
                .map(|(event, why)| (ops::DeadLetterView::from(event), why)),
        )
        .collect();
    for (view, why) in &left {
        eprintln!(
            "left {}: {why}",
            view.id.map(|id| id.to_string()).unwrap_or_default()
        );
    }
    if !json {
        eprintln!(
            "{verb} {handled} dead letter(s); {} left as they were",
            outcome.others + left.len()
        );
    }
    if let (Some(id), true) = (id, handled == 0 && left.is_empty()) {
        anyhow::bail!("no dead letter {id}");
    }
    if !left.is_empty() {
        anyhow::bail!("{} dead letter(s) could not be handled", left.len());
    }
    Ok(ExitCode::SUCCESS)
}
