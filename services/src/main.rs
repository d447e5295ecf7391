//! `orderflow`: run the services and operate the system. The command line is declared
//! in `cli`; each command is carried out by its file in `commands`; this file only
//! starts the runtime, dispatches, and prints an error as one line.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;
use services::config::{Config, Settings};
use services::telemetry::{Options, Telemetry};

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // A setting's bad value (from its variable or flag) is a configuration
            // error: one line naming it, like every other.
            let command = <Cli as clap::CommandFactory>::command();
            let serve = command.find_subcommand("serve").unwrap_or(&command);
            match Settings::value_error(&error, serve) {
                Some(line) => {
                    eprintln!("orderflow: {line}");
                    return ExitCode::FAILURE;
                }
                None => error.exit(),
            }
        }
    };
    // Before the runtime: the OTLP exporter's HTTP client runs one of its own.
    let options = Options::from_env().map(|mut options| {
        // `serve --log-format` (which also reads the variable) has the last word.
        if let Command::Serve(args) = &cli.command {
            options.format = args.settings.log_format;
        }
        options
    });
    let telemetry = match options.and_then(Telemetry::install) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("orderflow: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orderflow: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("orderflow: {}", one_line(&error));
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

/// The error and its causes on one line, skipping a cause its parent already quoted.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => commands::serve::serve(*args).await,
        Command::Migrate => commands::serve::migrate().await,
        Command::Load(args) => commands::load::load(args).await,
        Command::Schemas { command } => commands::schemas::schemas(command),
        Command::Events { command } => {
            commands::events::events(&Config::from_env()?, command).await
        }
        Command::Replay(args) => commands::replay::replay(&Config::from_env()?, args).await,
        Command::Dlq { command } => commands::dlq::dlq(&Config::from_env()?, command).await,
        Command::Sagas { command } => commands::sagas::sagas(&Config::from_env()?, command).await,
        Command::Trace { order_id, json } => {
            commands::trace::trace(&Config::from_env()?, order_id, json).await
        }
        Command::Users { command } => commands::users::users(command).await,
    }
}
