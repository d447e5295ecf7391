//! `orderflow events`: read a stream, tail the store.

use std::process::ExitCode;

use services::config::Config;
use services::ops;

use super::{interrupted, json_line};
use crate::cli::EventsCommand;

pub(crate) async fn events(config: &Config, command: EventsCommand) -> anyhow::Result<ExitCode> {
    match command {
        EventsCommand::Read {
            stream,
            from,
            service,
            json,
        } => {
            let events = ops::read_stream(config, &stream, from, service).await?;
            if events.is_empty() && !json {
                eprintln!("no events in {stream}");
            }
            for event in &events {
                if json {
                    json_line(event)?;
                } else {
                    println!("{event}");
                }
            }
        }
        EventsCommand::Tail {
            service,
            from,
            follow,
            json,
        } => {
            let cancel = interrupted();
            ops::tail(config, service, from, follow, &cancel, |event| {
                if json {
                    json_line(&event)
                } else {
                    println!("{event}");
                    Ok(())
                }
            })
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
