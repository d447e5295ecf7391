//! `orderflow replay`: rebuild a read model with progress shown, or send recorded
//! events to the broker again.

use std::process::ExitCode;

use services::config::{Config, Service};
use services::ops;

use super::{interrupted, json_line, retention_horizon};
use crate::cli::ReplayArgs;

pub(crate) async fn replay(config: &Config, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if args.list {
        for projection in projections::rebuild::CATALOG {
            if args.json {
                json_line(&serde_json::json!({
                    "name": projection.name,
                    "service": projection.service,
                    "tables": projection.tables,
                    "about": projection.about,
                }))?;
            } else {
                println!(
                    "{}  {} service, tables {}: {}",
                    projection.name,
                    projection.service,
                    projection.tables.join(", "),
                    projection.about
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.republish {
        let service = args
            .service
            .ok_or_else(|| anyhow::anyhow!("--republish needs --service"))?;
        let pool = ops::connect(config, service).await?;
        let horizon = retention_horizon(config)?;
        let selection = eventstore::republish::Selection {
            after: args.from,
            up_to: args.to,
            stream: args.stream,
            recorded_since: (!args.past_retention).then_some(horizon),
        };
        if !args.past_retention {
            eprintln!(
                "republish: events recorded before {} are past the inbox retention and left out \
                 (--past-retention sends them too)",
                horizon.format("%Y-%m-%d %H:%M UTC")
            );
        }
        let mut report = progress::Lines::new("republish");
        let sent = eventstore::republish::republish(
            &eventstore::EventStore::new(pool),
            &config.amqp_url,
            service.name(),
            &selection,
            |sent, position| report.line(&format!("{sent} events sent, at position {position}")),
        )
        .await?;
        if args.json {
            json_line(&serde_json::json!({ "service": service.name(), "republished": sent }))?;
        } else {
            println!("{service}: {sent} events sent again");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(name) = args.projection else {
        anyhow::bail!("name a projection, or use --list or --republish");
    };
    let Some(projection) = projections::rebuild::find(&name) else {
        anyhow::bail!("no projection is called {name:?}");
    };
    let service = Service::parse(projection.service).map_err(anyhow::Error::msg)?;
    let pool = ops::connect(config, service).await?;
    let registry = eventstore::SchemaRegistry::builtin()?;
    let cancel = interrupted();
    let mut bar = progress::Bar::new(&name);
    let outcome = projections::rebuild::rebuild(
        &name,
        &pool,
        &registry,
        args.from,
        |status| bar.update(status),
        &cancel,
    )
    .await;
    bar.finish();
    match outcome {
        Ok(rebuilt) => {
            if args.json {
                json_line(&serde_json::json!({
                    "projection": name,
                    "events": rebuilt.events,
                    "caught_up": rebuilt.caught_up,
                    "seconds": rebuilt.seconds,
                }))?;
            } else {
                println!(
                    "{name}: rebuilt from {} events in {:.1} s ({:.0} events/s), {} more applied while swapping in",
                    rebuilt.events,
                    rebuilt.seconds,
                    rebuilt.events as f64 / rebuilt.seconds.max(f64::EPSILON),
                    rebuilt.caught_up
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(projections::rebuild::RebuildError::Cancelled) => {
            eprintln!("orderflow: {name}: stopped; the live read model is untouched");
            Ok(ExitCode::from(130))
        }
        Err(error) => Err(error.into()),
    }
}

/// Progress on long work: a bar on a terminal, a plain line at most every second
/// otherwise (both on standard error).
mod progress {
    use std::io::IsTerminal;
    use std::time::{Duration, Instant};

    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use projections::rebuild::Progress;

    /// Plain lines, at most one a second.
    pub struct Lines {
        label: String,
        last: Option<Instant>,
    }

    impl Lines {
        pub fn new(label: &str) -> Self {
            Lines {
                label: label.to_owned(),
                last: None,
            }
        }

        pub fn line(&mut self, text: &str) {
            if self
                .last
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
            {
                eprintln!("{}: {text}", self.label);
                self.last = Some(Instant::now());
            }
        }
    }

    /// A rebuild's progress: events applied of those expected, rate and time left.
    pub struct Bar {
        bar: Option<ProgressBar>,
        lines: Lines,
        started: Instant,
    }

    impl Bar {
        pub fn new(label: &str) -> Self {
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style.progress_chars("=> "));
                bar.set_message(label.to_owned());
                bar
            });
            Bar {
                bar,
                lines: Lines::new(label),
                started: Instant::now(),
            }
        }

        pub fn update(&mut self, status: Progress) {
            match &self.bar {
                Some(bar) => {
                    bar.set_length(status.total.max(status.applied));
                    bar.set_position(status.applied);
                }
                None => {
                    let seconds = self.started.elapsed().as_secs_f64().max(f64::EPSILON);
                    let rate = status.applied as f64 / seconds;
                    let left = status.total.saturating_sub(status.applied) as f64 / rate.max(1.0);
                    self.lines.line(&format!(
                        "{}/{} events, {rate:.0} events/s, about {left:.0} s left (position {})",
                        status.applied, status.total, status.position
                    ));
                }
            }
        }

        pub fn finish(&self) {
            if let Some(bar) = &self.bar {
                bar.finish_and_clear();
            }
        }
    }
}
