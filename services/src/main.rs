//! `orderflow`: run the services and operate the system.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use clap::builder::PossibleValuesParser;
use clap::{ArgGroup, Args, Parser, Subcommand};
use eventstore::dlq::DeadLetter;
use services::config::{Config, Service, parse_services};
use services::load::LoadConfig;
use services::ops;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "orderflow",
    version,
    about = "An event-sourced order platform: services, migrations and operator tools",
    after_help = "Examples:\n  orderflow migrate\n  orderflow serve\n  orderflow serve --services order,inventory\n  orderflow schemas check --json\n  orderflow load --rate 200 --duration 30\n  orderflow events tail --service order --follow\n  orderflow replay order-summary\n  orderflow dlq list --service inventory\n  orderflow sagas list --status capturing\n  orderflow users grant ada@example.com operator\n\nConfiguration is by environment: ORDERFLOW_PG_URL (default postgres://postgres@127.0.0.1:5432),\nORDERFLOW_<SERVICE>_DATABASE_URL, ORDERFLOW_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),\nORDERFLOW_BIND_ADDRESS (default 127.0.0.1), RUST_LOG."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services, each on its own port (default: every service, in one process)
    #[command(
        after_help = "Examples:\n  orderflow serve\n  orderflow serve --services order,inventory,payment\n  \
orderflow serve --services order --port 9081 --instance-id order-2"
    )]
    Serve {
        /// Comma-separated services to run: gateway, order, inventory, payment, user,
        /// notification
        #[arg(long, value_name = "a,b,…", value_parser = services_arg)]
        services: Option<ServiceList>,
        /// The port to listen on (with one service only): run several instances of a
        /// service side by side, each on its own port
        #[arg(long, requires = "services")]
        port: Option<u16>,
        /// This instance's id in the registry (default: a new one each start)
        #[arg(long)]
        instance_id: Option<String>,
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
    /// Show recorded events, decoded from Avro to JSON
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Rebuild a read model from its event store, or send recorded events again
    #[command(
        after_help = "A rebuild reads the service's event store into fresh tables \
while queries keep answering from the live ones, then swaps them in atomically; Ctrl-C \
leaves the live read model untouched.\n\nExamples:\n  orderflow replay --list\n  \
orderflow replay stock-levels\n  orderflow replay --republish --service order --from 0 \
--stream order-0192f0c4-9b6e-7a41-9d6f-3c2a1b4e5d60"
    )]
    Replay(ReplayArgs),
    /// List, show, replay or purge a service's dead letters
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// List the order-fulfilment sagas, or show one with its history
    Sagas {
        #[command(subcommand)]
        command: SagasCommand,
    },
    /// Grant or revoke a user's role (operator: reads everyone's data)
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Give a user a role; their tokens carry it from their next log-in
    #[command(after_help = "Example:\n  orderflow users grant ada@example.com operator")]
    Grant(RoleArgs),
    /// Take a role from a user; tokens already issued keep it until they expire
    /// (ORDERFLOW_JWT_TTL_SECONDS)
    #[command(after_help = "Example:\n  orderflow users revoke ada@example.com operator")]
    Revoke(RoleArgs),
}

#[derive(Args)]
struct RoleArgs {
    /// The user's e-mail address or id
    user: String,
    /// The role
    #[arg(value_parser = PossibleValuesParser::new(["operator"]))]
    role: String,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// One stream's events in version order
    #[command(after_help = "Example:\n  orderflow events read stock-SKU-1 --json")]
    Read {
        /// The stream id (`order-<id>`, `stock-<sku>`, `payment-<order id>`, `user-<id>`)
        stream: String,
        /// The first version to show
        #[arg(long, default_value_t = 1)]
        from: i64,
        /// The service storing the stream (found from its id when omitted)
        #[arg(long, value_parser = store_service)]
        service: Option<Service>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// A service's events in global order
    #[command(after_help = "Example:\n  orderflow events tail --service order --follow --json")]
    Tail {
        #[arg(long, value_parser = store_service)]
        service: Service,
        /// Only events after this global position
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Keep waiting for new events (until Ctrl-C)
        #[arg(long)]
        follow: bool,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).args(["list", "projection", "republish"])))]
struct ReplayArgs {
    /// Name every projection, one per line, name first
    #[arg(long)]
    list: bool,
    /// The projection to rebuild
    #[arg(value_parser = PossibleValuesParser::new(projection_names()))]
    projection: Option<String>,
    /// Send the recorded events of --service to RabbitMQ again (consumers deduplicate)
    #[arg(long, requires = "service")]
    republish: bool,
    /// The service whose events to send again
    #[arg(long, value_parser = store_service)]
    service: Option<Service>,
    /// Only events after this global position. A rebuild with --from starts from the
    /// live rows instead of empty tables and applies the later events again (a
    /// repair: rows already past an event keep their state)
    #[arg(long, default_value_t = 0)]
    from: i64,
    /// Only events up to this global position (with --republish)
    #[arg(long, requires = "republish")]
    to: Option<i64>,
    /// Only this stream's events (with --republish)
    #[arg(long, requires = "republish")]
    stream: Option<String>,
    /// Send events older than the inbox retention too (with --republish); consumers
    /// can no longer tell them from new ones, so only for consumers that never had them
    #[arg(long, requires = "republish")]
    past_retention: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Every dead letter, in the order first published, with its error and attempts
    #[command(after_help = "Example:\n  orderflow dlq list --service inventory --json")]
    List {
        #[arg(long, value_parser = store_service)]
        service: Service,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, with its payload decoded
    #[command(after_help = "Example:\n  orderflow dlq show --service payment --id <message id>")]
    Show {
        #[arg(long, value_parser = store_service)]
        service: Service,
        #[arg(long)]
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their consumer, in order (all, or one with --id)
    #[command(after_help = "Example:\n  orderflow dlq replay --service inventory --dry-run")]
    Replay(DlqSelection),
    /// Delete dead letters for good (all, or one with --id), letting their streams flow
    #[command(after_help = "Example:\n  orderflow dlq purge --service order --id <message id>")]
    Purge(DlqSelection),
}

/// Which dead letters `dlq replay` and `dlq purge` act on, and how.
#[derive(Args)]
struct DlqSelection {
    #[arg(long, value_parser = store_service)]
    service: Service,
    /// Only this message
    #[arg(long)]
    id: Option<Uuid>,
    /// Say what would be done, and do nothing
    #[arg(long)]
    dry_run: bool,
    /// One JSON object per line
    #[arg(long)]
    json: bool,
    /// Replay letters that failed before the message retention too (`dlq replay`)
    #[arg(long)]
    past_retention: bool,
}

#[derive(Subcommand)]
enum SagasCommand {
    /// Sagas, most recently changed first
    #[command(after_help = "Example:\n  orderflow sagas list --status capturing --json")]
    List {
        /// Only sagas at this step
        #[arg(long, value_parser = PossibleValuesParser::new(saga_steps()))]
        status: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// One saga: its state, pending deadline and every step with its time
    #[command(after_help = "Example:\n  orderflow sagas show 0192f0c4-9b6e-7a41-9d6f-3c2a1b4e5d60")]
    Show {
        order_id: Uuid,
        #[arg(long)]
        json: bool,
    },
}

/// A service with an event store (every one but the gateway).
fn store_service(name: &str) -> Result<Service, String> {
    let service = Service::parse(name)?;
    if service.database().is_none() {
        return Err(format!("the {service} has no event store"));
    }
    Ok(service)
}

fn projection_names() -> Vec<&'static str> {
    projections::rebuild::CATALOG
        .iter()
        .map(|p| p.name)
        .collect()
}

fn saga_steps() -> Vec<&'static str> {
    sagas::fulfilment::Step::ALL
        .iter()
        .filter(|step| **step != sagas::fulfilment::Step::NotStarted)
        .map(|step| step.as_str())
        .collect()
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Prove every event type's schema versions backward and forward compatible
    #[command(
        after_help = "Without --dir, checks the schemas built into this binary; with it, the \
files of a schema folder (<aggregate>/<EventType>.v<N>.avsc), such as a working copy's \
domain/schemas before it is built.\n\nExamples:\n  orderflow schemas check --json\n  \
orderflow schemas check --dir domain/schemas"
    )]
    Check {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
        /// Check the schema files under this folder instead
        #[arg(long, value_name = "PATH")]
        dir: Option<std::path::PathBuf>,
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Serve {
            services,
            port,
            instance_id,
        } => {
            let mut config = Config::from_env()?;
            let services = match services {
                Some(ServiceList(services)) => services,
                None => parse_services(None).map_err(anyhow::Error::msg)?,
            };
            if let Some(port) = port {
                let [service] = services[..] else {
                    eprintln!(
                        "orderflow: error: --port takes one service; run one process per instance"
                    );
                    return Ok(ExitCode::from(2));
                };
                config.set_port(service, port);
            }
            config.instance_id = instance_id;
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
            command: SchemasCommand::Check { json, dir },
        } => {
            let files = match dir {
                Some(dir) => schema_files_in(&dir)?,
                None => domain::wire::SCHEMA_FILES.to_vec(),
            };
            Ok(schemas_check(&files, json))
        }
        Command::Events { command } => events(&Config::from_env()?, command).await,
        Command::Replay(args) => replay(&Config::from_env()?, args).await,
        Command::Dlq { command } => dlq(&Config::from_env()?, command).await,
        Command::Sagas { command } => sagas_command(&Config::from_env()?, command).await,
        Command::Users { command } => {
            let (arguments, grant) = match command {
                UsersCommand::Grant(arguments) => (arguments, true),
                UsersCommand::Revoke(arguments) => (arguments, false),
            };
            let role = domain::user::Role::parse(&arguments.role)
                .with_context(|| format!("unknown role {:?}", arguments.role))?;
            let config = Config::from_env()?;
            let change = ops::set_role(&config, &arguments.user, role, grant).await?;
            if arguments.json {
                json_line(&change)?;
            } else {
                println!("{change}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints a value as one JSON line.
fn json_line(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Cancelled on Ctrl-C.
fn interrupted() -> CancellationToken {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            trigger.cancel();
        }
    });
    cancel
}

async fn events(config: &Config, command: EventsCommand) -> anyhow::Result<ExitCode> {
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

async fn replay(config: &Config, args: ReplayArgs) -> anyhow::Result<ExitCode> {
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

async fn dlq(config: &Config, command: DlqCommand) -> anyhow::Result<ExitCode> {
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
fn report_dead_letters(
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

async fn sagas_command(config: &Config, command: SagasCommand) -> anyhow::Result<ExitCode> {
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

/// Prints the result of walking every schema chain; fails when one link breaks.
/// The schema files under `dir`: `<aggregate>/<EventType>.v<N>.avsc`. Their text is
/// kept for the life of the process (this runs once, then exits).
fn schema_files_in(dir: &std::path::Path) -> anyhow::Result<Vec<domain::wire::SchemaFile>> {
    let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
    let mut files = Vec::new();
    let folders =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for folder in folders {
        let folder = folder?.path();
        if !folder.is_dir() {
            continue;
        }
        let aggregate = folder
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        for file in std::fs::read_dir(&folder)? {
            let path = file?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".avsc") else {
                continue;
            };
            let parsed = stem
                .rsplit_once(".v")
                .and_then(|(event_type, version)| Some((event_type, version.parse::<u32>().ok()?)));
            let Some((event_type, version)) = parsed else {
                anyhow::bail!("{}: not named <EventType>.v<N>.avsc", path.display());
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            files.push(domain::wire::SchemaFile {
                aggregate: leak(aggregate.clone()),
                event_type: leak(event_type.to_owned()),
                version,
                text: leak(text),
            });
        }
    }
    anyhow::ensure!(!files.is_empty(), "no schema files under {}", dir.display());
    Ok(files)
}

fn schemas_check(files: &[domain::wire::SchemaFile], json: bool) -> ExitCode {
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

/// What is older than this may have lost its inbox rows to retention, so consumers
/// could not recognise it as a duplicate: the message retention, less an hour for
/// clocks and for the pruner's schedule (half the retention when that is shorter).
fn retention_horizon(config: &Config) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let kept = chrono::Duration::from_std(config.retention.messages)
        .context("the message retention is too long")?;
    let margin = chrono::Duration::hours(1).min(kept / 2);
    Ok(chrono::Utc::now() - kept + margin)
}
