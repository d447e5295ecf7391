//! `orderflow`: run the services and operate the system.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use services::config::{Config, Service, parse_services};
use services::load::LoadConfig;

#[derive(Parser)]
#[command(
    name = "orderflow",
    version,
    about = "An event-sourced order platform: services, migrations and operator tools",
    after_help = "Examples:\n  orderflow migrate\n  orderflow serve\n  orderflow serve --services order,inventory\n  orderflow schemas check --json\n  orderflow load --rate 200 --duration 30\n\nConfiguration is by environment: ORDERFLOW_PG_URL (default postgres://postgres@127.0.0.1:5432),\nORDERFLOW_<SERVICE>_DATABASE_URL, ORDERFLOW_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),\nORDERFLOW_BIND_ADDRESS (default 127.0.0.1), RUST_LOG."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services, each on its own port (default: every service, in one process)
    #[command(after_help = "Example:\n  orderflow serve --services order,inventory,payment")]
    Serve {
        /// Comma-separated services to run: order, inventory, payment, user, notification
        #[arg(long, value_name = "a,b,…", value_parser = services_arg)]
        services: Option<ServiceList>,
    },
    /// Create each service's database if missing and run its migrations
    #[command(
        after_help = "Example:\n  ORDERFLOW_PG_URL=postgres://postgres@db:5432 orderflow migrate"
    )]
    Migrate,
    /// Drive running services at a fixed rate of commands and report latencies
    #[command(
        after_help = "Creates stock items, then sends commands on an open-loop schedule \
(nine in ten place an order, one adds stock), each followed by a read-your-writes query, \
plus plain queries. Reports command latency, command-to-read-model latency and query \
latency (p50/p90/p99/max) and the CPU steal seen. With --outcome, each order is followed to \
its outcome (confirmed, rejected or cancelled by the saga) instead.\n\nExamples:\n  orderflow load --rate 500 --duration 30\n  orderflow load --rate 100 --outcome"
    )]
    Load {
        /// Commands per second
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds to measure, after the warm-up
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Seconds to run before measuring
        #[arg(long, default_value_t = 5.0)]
        warmup: f64,
        /// Stock items to create and order from
        #[arg(long, default_value_t = 100)]
        skus: usize,
        /// Distinct customers placing orders
        #[arg(long, default_value_t = 1000)]
        customers: usize,
        /// Plain queries per command
        #[arg(long, default_value_t = 1.0)]
        query_ratio: f64,
        /// Requests in flight at most
        #[arg(long, default_value_t = 512)]
        max_in_flight: usize,
        /// The order service
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        order_url: String,
        /// The inventory service
        #[arg(long, default_value = "http://127.0.0.1:8082")]
        inventory_url: String,
        /// Follow each order to its outcome (POST /orders to confirmed)
        #[arg(long)]
        outcome: bool,
        /// Print the report as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Work with the Avro schemas of events
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Prove every event type's schema versions backward and forward compatible
    #[command(after_help = "Example:\n  orderflow schemas check --json")]
    Check {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
}

/// One `--services` value: a list, which clap must take as a single value (an
/// `Option<Vec<_>>` field would make it expect one value per item).
#[derive(Clone, Debug)]
struct ServiceList(Vec<Service>);

fn services_arg(list: &str) -> Result<ServiceList, String> {
    parse_services(Some(list)).map(ServiceList)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("orderflow: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
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
        Command::Serve { services } => {
            let config = Config::from_env()?;
            let services = match services {
                Some(ServiceList(services)) => services,
                None => parse_services(None).map_err(anyhow::Error::msg)?,
            };
            services::serve::run(&config, &services).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let config = Config::from_env()?;
            for (service, database) in services::setup::migrate_all(&config).await? {
                println!("{service}: database {database} is migrated");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Load {
            rate,
            duration,
            warmup,
            skus,
            customers,
            query_ratio,
            max_in_flight,
            order_url,
            inventory_url,
            outcome,
            json,
        } => {
            let seconds = |name: &str, value: f64| {
                Duration::try_from_secs_f64(value)
                    .map_err(|_| anyhow::anyhow!("--{name} must be a number of seconds"))
            };
            if skus == 0 || customers == 0 || max_in_flight == 0 {
                anyhow::bail!("--skus, --customers and --max-in-flight must be at least 1");
            }
            let config = LoadConfig {
                order_url: order_url.trim_end_matches('/').to_owned(),
                inventory_url: inventory_url.trim_end_matches('/').to_owned(),
                rate,
                duration: seconds("duration", duration)?,
                warmup: seconds("warmup", warmup)?,
                skus,
                customers,
                query_ratio: query_ratio.max(0.0),
                max_in_flight,
                outcome,
            };
            let report = services::load::run(config, |line| eprintln!("load: {line}")).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schemas {
            command: SchemasCommand::Check { json },
        } => Ok(schemas_check(json)),
    }
}

/// Prints the result of walking every schema chain; fails when one link breaks.
fn schemas_check(json: bool) -> ExitCode {
    let files = domain::wire::SCHEMA_FILES;
    let problems = domain::wire::check_schema_chains(files);
    let mut types: Vec<&str> = files.iter().map(|f| f.event_type).collect();
    types.sort_unstable();
    types.dedup();
    if json {
        let problems: Vec<_> = problems
            .iter()
            .map(|p| serde_json::json!({ "event_type": p.event_type, "problem": p.message }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "compatible": problems.is_empty(),
                "event_types": types.len(),
                "schemas": files.len(),
                "problems": problems,
            })
        );
    } else if problems.is_empty() {
        println!(
            "compatible: {} schemas of {} event types; every version reads its predecessor's events and vice versa",
            files.len(),
            types.len()
        );
    } else {
        for problem in &problems {
            println!("{}: {}", problem.event_type, problem.message);
        }
        println!("incompatible: {} problem(s)", problems.len());
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
