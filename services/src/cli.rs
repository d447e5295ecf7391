//! The `orderflow` command line: every command, its arguments and its help.

use clap::builder::PossibleValuesParser;
use clap::{ArgGroup, Args, Parser, Subcommand};
use services::config::{Service, Settings, parse_services};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "orderflow",
    version,
    about = "An event-sourced order platform: services, migrations and operator tools",
    after_help = "Examples:\n  orderflow migrate\n  orderflow serve\n  orderflow serve --services order,inventory\n  orderflow schemas check --json\n  orderflow load --rate 200 --duration 30\n  orderflow events tail --service order --follow\n  orderflow replay order-summary\n  orderflow dlq list --service inventory\n  orderflow sagas list --status capturing\n  orderflow users grant ada@example.com operator\n\nConfiguration is by environment: ORDERFLOW_PG_URL (default postgres://postgres@127.0.0.1:5432),\nORDERFLOW_<SERVICE>_DATABASE_URL, ORDERFLOW_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),\nORDERFLOW_BIND_ADDRESS (default 127.0.0.1), RUST_LOG."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run services, each on its own port (default: every service, in one process)
    #[command(
        after_help = "Examples:\n  orderflow serve\n  orderflow serve --services order,inventory,payment\n  \
orderflow serve --services order --port 9081 --instance-id order-2"
    )]
    Serve(Box<ServeArgs>),
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
    Load(LoadArgs),
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
    /// Show an order's causal chain: its events, the commands and events it caused
    /// in every service, and its notifications, with their correlation, causation and
    /// trace ids (read from the stores; no trace collector needed)
    Trace {
        order_id: uuid::Uuid,
        /// One JSON object instead of the tree
        #[arg(long)]
        json: bool,
    },
    /// Grant or revoke a user's role (operator: reads everyone's data)
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Comma-separated services to run: gateway, order, inventory, payment, user,
    /// notification
    #[arg(long, value_name = "a,b,…", value_parser = services_arg)]
    pub(crate) services: Option<ServiceList>,
    /// The port to listen on (with one service only): run several instances of a
    /// service side by side, each on its own port
    #[arg(long, requires = "services")]
    pub(crate) port: Option<u16>,
    /// This instance's id in the registry (default: a new one each start)
    #[arg(long)]
    pub(crate) instance_id: Option<String>,
    #[command(flatten)]
    pub(crate) settings: Settings,
}

#[derive(Args)]
pub(crate) struct LoadArgs {
    /// Commands per second
    #[arg(long, default_value_t = 200.0)]
    pub(crate) rate: f64,
    /// Seconds to measure, after the warm-up
    #[arg(long, default_value_t = 30.0)]
    pub(crate) duration: f64,
    /// Seconds to run before measuring
    #[arg(long, default_value_t = 5.0)]
    pub(crate) warmup: f64,
    /// Stock items to create and order from
    #[arg(long, default_value_t = 100)]
    pub(crate) skus: usize,
    /// Distinct customers placing orders
    #[arg(long, default_value_t = 1000)]
    pub(crate) customers: usize,
    /// Plain queries per command
    #[arg(long, default_value_t = 1.0)]
    pub(crate) query_ratio: f64,
    /// Requests in flight at most
    #[arg(long, default_value_t = 512)]
    pub(crate) max_in_flight: usize,
    /// The order service
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub(crate) order_url: String,
    /// The inventory service
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    pub(crate) inventory_url: String,
    /// Follow each order to its outcome (POST /orders to confirmed)
    #[arg(long)]
    pub(crate) outcome: bool,
    /// Print the report as one JSON object
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum UsersCommand {
    /// Give a user a role; their tokens carry it from their next log-in
    #[command(after_help = "Example:\n  orderflow users grant ada@example.com operator")]
    Grant(RoleArgs),
    /// Take a role from a user; tokens already issued keep it until they expire
    /// (ORDERFLOW_JWT_TTL_SECONDS)
    #[command(after_help = "Example:\n  orderflow users revoke ada@example.com operator")]
    Revoke(RoleArgs),
}

#[derive(Args)]
pub(crate) struct RoleArgs {
    /// The user's e-mail address or id
    pub(crate) user: String,
    /// The role
    #[arg(value_parser = PossibleValuesParser::new(["operator"]))]
    pub(crate) role: String,
    /// Print one JSON object
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum EventsCommand {
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
pub(crate) struct ReplayArgs {
    /// Name every projection, one per line, name first
    #[arg(long)]
    pub(crate) list: bool,
    /// The projection to rebuild
    #[arg(value_parser = PossibleValuesParser::new(projection_names()))]
    pub(crate) projection: Option<String>,
    /// Send the recorded events of --service to RabbitMQ again (consumers deduplicate)
    #[arg(long, requires = "service")]
    pub(crate) republish: bool,
    /// The service whose events to send again
    #[arg(long, value_parser = store_service)]
    pub(crate) service: Option<Service>,
    /// Only events after this global position. A rebuild with --from starts from the
    /// live rows instead of empty tables and applies the later events again (a
    /// repair: rows already past an event keep their state)
    #[arg(long, default_value_t = 0)]
    pub(crate) from: i64,
    /// Only events up to this global position (with --republish)
    #[arg(long, requires = "republish")]
    pub(crate) to: Option<i64>,
    /// Only this stream's events (with --republish)
    #[arg(long, requires = "republish")]
    pub(crate) stream: Option<String>,
    /// Send events older than the inbox retention too (with --republish); consumers
    /// can no longer tell them from new ones, so only for consumers that never had them
    #[arg(long, requires = "republish")]
    pub(crate) past_retention: bool,
    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
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
pub(crate) struct DlqSelection {
    #[arg(long, value_parser = store_service)]
    pub(crate) service: Service,
    /// Only this message
    #[arg(long)]
    pub(crate) id: Option<Uuid>,
    /// Say what would be done, and do nothing
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// One JSON object per line
    #[arg(long)]
    pub(crate) json: bool,
    /// Replay letters that failed before the message retention too (`dlq replay`)
    #[arg(long)]
    pub(crate) past_retention: bool,
}

#[derive(Subcommand)]
pub(crate) enum SagasCommand {
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
        order_id: domain::ids::OrderId,
        #[arg(long)]
        json: bool,
    },
}

/// A service with an event store (every one but the gateway).
pub(crate) fn store_service(name: &str) -> Result<Service, String> {
    let service = Service::parse(name)?;
    if service.database().is_none() {
        return Err(format!("the {service} has no event store"));
    }
    Ok(service)
}

pub(crate) fn projection_names() -> Vec<&'static str> {
    projections::rebuild::CATALOG
        .iter()
        .map(|p| p.name)
        .collect()
}

pub(crate) fn saga_steps() -> Vec<&'static str> {
    sagas::fulfilment::Step::ALL
        .iter()
        .filter(|step| **step != sagas::fulfilment::Step::NotStarted)
        .map(|step| step.as_str())
        .collect()
}

#[derive(Subcommand)]
pub(crate) enum SchemasCommand {
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
pub(crate) struct ServiceList(pub(crate) Vec<Service>);

pub(crate) fn services_arg(list: &str) -> Result<ServiceList, String> {
    parse_services(Some(list)).map(ServiceList)
}
