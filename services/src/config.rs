//! Which services exist, where they listen, and which database each one owns.

use std::net::IpAddr;
use std::path::PathBuf;

use sqlx::postgres::PgConnectOptions;

use crate::secrets::{DIGEST_SECRET, Secret, SecretSource, TOKEN_SECRET};

/// The services of DESIGN §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Gateway,
    Order,
    Inventory,
    Payment,
    User,
    Notification,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Gateway,
        Service::Order,
        Service::Inventory,
        Service::Payment,
        Service::User,
        Service::Notification,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Order => "order",
            Service::Inventory => "inventory",
            Service::Payment => "payment",
            Service::User => "user",
            Service::Notification => "notification",
        }
    }

    pub fn port(self) -> u16 {
        match self {
            Service::Gateway => 8080,
            Service::Order => 8081,
            Service::Inventory => 8082,
            Service::Payment => 8083,
            Service::User => 8084,
            Service::Notification => 8085,
        }
    }

    /// The database the service owns; the gateway owns none.
    pub fn database(self) -> Option<&'static str> {
        match self {
            Service::Gateway => None,
            Service::Order => Some("orderflow_order"),
            Service::Inventory => Some("orderflow_inventory"),
            Service::Payment => Some("orderflow_payment"),
            Service::User => Some("orderflow_user"),
            Service::Notification => Some("orderflow_notification"),
        }
    }

    pub fn parse(name: &str) -> Result<Service, String> {
        Service::ALL
            .into_iter()
            .find(|service| service.name() == name.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = Service::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown service {name:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Configuration from the environment (DESIGN §2).
#[derive(Debug, Clone)]
pub struct Config {
    /// `ORDERFLOW_PG_URL`: the PostgreSQL server every service database lives on.
    pub pg_url: String,
    /// `ORDERFLOW_BIND_ADDRESS`: where the services listen (default 127.0.0.1).
    pub bind_address: IpAddr,
    /// `ORDERFLOW_AMQP_URL`: the RabbitMQ broker (and virtual host) of every service.
    pub amqp_url: String,
    /// `ORDERFLOW_<SERVICE>_DATABASE_URL` overrides, read once at start-up.
    database_urls: Vec<(Service, String)>,
    /// `ORDERFLOW_<SERVICE>_PORT` overrides of the ports of DESIGN §2 (0: any free port).
    ports: Vec<(Service, u16)>,
    /// `ORDERFLOW_PAYMENT_DEADLINE_MS`: how long the order-fulfilment saga waits for a
    /// payment answer before it compensates (default 30 s).
    pub payment_deadline: std::time::Duration,
    /// `ORDERFLOW_CAPTURE_RETRY_MS`: how long the saga waits for a confirmed order's
    /// capture before it asks again (default 30 s).
    pub capture_retry: std::time::Duration,
    /// `ORDERFLOW_DATA_DIR`: where generated secrets are kept (default
    /// `$XDG_DATA_HOME/orderflow`, or `~/.local/share/orderflow`).
    pub data_dir: Option<PathBuf>,
    /// `ORDERFLOW_JWT_SECRET` or `ORDERFLOW_JWT_SECRET_FILE`: signs and checks access
    /// tokens (generated into the data folder when neither is set).
    pub jwt_secret: SecretSource,
    /// `ORDERFLOW_DIGEST_SECRET` or `ORDERFLOW_DIGEST_SECRET_FILE`: keys the request
    /// digests of idempotency records (generated like the token secret).
    pub digest_secret: SecretSource,
    /// `ORDERFLOW_JWT_TTL_SECONDS`: how long an access token is valid (default 3600).
    pub jwt_lifetime: std::time::Duration,
    /// `ORDERFLOW_REDIS_URL`: the registry and the gateway's rate limits.
    pub redis_url: String,
    /// `ORDERFLOW_REGISTRY_NAMESPACE`: the prefix of every Redis key (default
    /// `orderflow`): systems sharing a Redis server keep apart by it.
    pub registry_namespace: String,
    /// `ORDERFLOW_REGISTRY_TTL_MS`: how long a registration lasts without a heartbeat
    /// (default 5000; instances beat every third of it).
    pub registry_ttl: std::time::Duration,
    /// `ORDERFLOW_GATEWAY_RATE_LIMIT`: requests per second per client (default 100).
    pub gateway_rate_limit: u64,
    /// `ORDERFLOW_ANONYMOUS_READS`: whether personal data (profiles, orders, payments,
    /// sagas, notifications) may be read without a token (default false; a warning at
    /// start-up when set).
    pub anonymous_reads: bool,
    /// `ORDERFLOW_TRUST_LOCAL_CALLERS`: whether a request that reaches a service
    /// directly, not through the gateway, and carries no token acts as an operator
    /// (default: when the services listen on a loopback address only, as in
    /// development; refused on any other address).
    pub trust_local_callers: bool,
    /// `ORDERFLOW_GATEWAY_TIMEOUT_MS`: how long the gateway waits for a service
    /// (default 10000).
    pub gateway_timeout: std::time::Duration,
    /// This process's instance id in the registry (`orderflow serve --instance-id`);
    /// a fresh one per start when unset.
    pub instance_id: Option<String>,
    /// `ORDERFLOW_CONSUMER_PARTITIONS`: how many queues each consumer (of events or of
    /// a service's commands) is split into (default 1), so several instances of a
    /// service share its work. Every process must use the same number.
    pub consumer_partitions: u16,
    /// `ORDERFLOW_MAX_OUTBOX_BACKLOG`, `ORDERFLOW_MAX_SUBSCRIPTION_LAG`,
    /// `ORDERFLOW_MAX_ORDERS_IN_FLIGHT`, `ORDERFLOW_MAX_COMMANDS_IN_FLIGHT`: past these,
    /// commands answer 503 `overloaded` ([`crate::pressure`]).
    pub pressure: crate::pressure::Bounds,
    /// `ORDERFLOW_MESSAGE_RETENTION_HOURS` (inbox rows and consumer progress, default
    /// 168) and `ORDERFLOW_IDEMPOTENCY_RETENTION_HOURS` (default 24): how long
    /// bookkeeping is kept ([`eventstore::retention`]).
    pub retention: eventstore::retention::Retention,
}

/// Every `ORDERFLOW_*` variable, declared once: its type, its default and what it
/// does. Each is also a flag of `orderflow serve` (its `--help` lists them all), and a
/// bad value is refused at start-up in one line naming the variable.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Configuration (each flag is also read from the variable named)")]
pub struct Settings {
    /// The PostgreSQL server every service database lives on
    #[arg(
        long,
        env = "ORDERFLOW_PG_URL",
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub pg_url: String,
    /// Where the services listen
    #[arg(
        long,
        env = "ORDERFLOW_BIND_ADDRESS",
        value_name = "IP",
        default_value = "127.0.0.1"
    )]
    pub bind_address: IpAddr,
    /// The RabbitMQ broker (and virtual host) of every service
    #[arg(
        long,
        env = "ORDERFLOW_AMQP_URL",
        value_name = "URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The Redis server of the registry and the gateway's rate limits
    #[arg(
        long,
        env = "ORDERFLOW_REDIS_URL",
        value_name = "URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// The prefix of every Redis key: systems sharing a Redis server keep apart by it
    #[arg(long, env = "ORDERFLOW_REGISTRY_NAMESPACE", value_name = "PREFIX",
          default_value = "orderflow", value_parser = non_empty)]
    pub registry_namespace: String,
    /// How long a registration lasts without a heartbeat (instances beat every third)
    #[arg(long, env = "ORDERFLOW_REGISTRY_TTL_MS", value_name = "MS", default_value = "5000",
          value_parser = positive_u64)]
    pub registry_ttl_ms: u64,
    /// The order service's database [default: orderflow_order on the PostgreSQL server]
    #[arg(long, env = "ORDERFLOW_ORDER_DATABASE_URL", value_name = "URL")]
    pub order_database_url: Option<String>,
    /// The inventory service's database [default: orderflow_inventory]
    #[arg(long, env = "ORDERFLOW_INVENTORY_DATABASE_URL", value_name = "URL")]
    pub inventory_database_url: Option<String>,
    /// The payment service's database [default: orderflow_payment]
    #[arg(long, env = "ORDERFLOW_PAYMENT_DATABASE_URL", value_name = "URL")]
    pub payment_database_url: Option<String>,
    /// The user service's database [default: orderflow_user]
    #[arg(long, env = "ORDERFLOW_USER_DATABASE_URL", value_name = "URL")]
    pub user_database_url: Option<String>,
    /// The notification service's database [default: orderflow_notification]
    #[arg(long, env = "ORDERFLOW_NOTIFICATION_DATABASE_URL", value_name = "URL")]
    pub notification_database_url: Option<String>,
    /// The gateway's port (0: any free one) [default: 8080]
    #[arg(long, env = "ORDERFLOW_GATEWAY_PORT", value_name = "PORT")]
    pub gateway_port: Option<u16>,
    /// The order service's port [default: 8081]
    #[arg(long, env = "ORDERFLOW_ORDER_PORT", value_name = "PORT")]
    pub order_port: Option<u16>,
    /// The inventory service's port [default: 8082]
    #[arg(long, env = "ORDERFLOW_INVENTORY_PORT", value_name = "PORT")]
    pub inventory_port: Option<u16>,
    /// The payment service's port [default: 8083]
    #[arg(long, env = "ORDERFLOW_PAYMENT_PORT", value_name = "PORT")]
    pub payment_port: Option<u16>,
    /// The user service's port [default: 8084]
    #[arg(long, env = "ORDERFLOW_USER_PORT", value_name = "PORT")]
    pub user_port: Option<u16>,
    /// The notification service's port [default: 8085]
    #[arg(long, env = "ORDERFLOW_NOTIFICATION_PORT", value_name = "PORT")]
    pub notification_port: Option<u16>,
    /// How long the order-fulfilment saga waits for a payment answer before it
    /// compensates
    #[arg(long, env = "ORDERFLOW_PAYMENT_DEADLINE_MS", value_name = "MS", default_value = "30000",
          value_parser = positive_u64)]
    pub payment_deadline_ms: u64,
    /// How long the saga waits for a confirmed order's capture before it asks again
    #[arg(long, env = "ORDERFLOW_CAPTURE_RETRY_MS", value_name = "MS", default_value = "30000",
          value_parser = positive_u64)]
    pub capture_retry_ms: u64,
    /// Where generated secrets are kept [default: $XDG_DATA_HOME/orderflow or
    /// ~/.local/share/orderflow]
    #[arg(long, env = "ORDERFLOW_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Signs and checks access tokens, at least 32 bytes [default: generated into the
    /// data folder]
    #[arg(
        long,
        env = "ORDERFLOW_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// A file holding the token secret, instead of the variable
    #[arg(long, env = "ORDERFLOW_JWT_SECRET_FILE", value_name = "PATH")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Keys the request digests of idempotency records, at least 32 bytes [default:
    /// generated into the data folder]
    #[arg(
        long,
        env = "ORDERFLOW_DIGEST_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub digest_secret: Option<String>,
    /// A file holding the digest secret, instead of the variable
    #[arg(long, env = "ORDERFLOW_DIGEST_SECRET_FILE", value_name = "PATH")]
    pub digest_secret_file: Option<PathBuf>,
    /// How long an access token is valid
    #[arg(long, env = "ORDERFLOW_JWT_TTL_SECONDS", value_name = "SECONDS",
          default_value = "3600", value_parser = positive_u64)]
    pub jwt_ttl_seconds: u64,
    /// Requests per second per client at the gateway
    #[arg(long, env = "ORDERFLOW_GATEWAY_RATE_LIMIT", value_name = "N", default_value = "100",
          value_parser = positive_u64)]
    pub gateway_rate_limit: u64,
    /// How long the gateway waits for a service
    #[arg(long, env = "ORDERFLOW_GATEWAY_TIMEOUT_MS", value_name = "MS", default_value = "10000",
          value_parser = positive_u64)]
    pub gateway_timeout_ms: u64,
    /// Whether personal data (profiles, orders, payments, sagas, notifications) may be
    /// read without a token (a warning at start-up when true)
    #[arg(long, env = "ORDERFLOW_ANONYMOUS_READS", value_name = "BOOL", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub anonymous_reads: bool,
    /// Whether a request reaching a service directly, without a token, acts as an
    /// operator; only on a loopback address [default: true on loopback, else false]
    #[arg(long, env = "ORDERFLOW_TRUST_LOCAL_CALLERS", value_name = "BOOL",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub trust_local_callers: Option<bool>,
    /// How many queues each consumer is split into, so instances of a service share
    /// its work (1 to 64; every process must use the same number)
    #[arg(long, env = "ORDERFLOW_CONSUMER_PARTITIONS", value_name = "N", default_value = "1",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub consumer_partitions: u16,
    /// Unpublished outbox rows past which commands answer 503 overloaded
    #[arg(long, env = "ORDERFLOW_MAX_OUTBOX_BACKLOG", value_name = "N", default_value = "2000",
          value_parser = clap::value_parser!(i64).range(1..))]
    pub max_outbox_backlog: i64,
    /// Events a subscription may be behind before commands answer 503 overloaded
    #[arg(long, env = "ORDERFLOW_MAX_SUBSCRIPTION_LAG", value_name = "N",
          default_value = "2000", value_parser = clap::value_parser!(i64).range(1..))]
    pub max_subscription_lag: i64,
    /// Orders waiting for stock or payment before new ones answer 503 overloaded
    #[arg(long, env = "ORDERFLOW_MAX_ORDERS_IN_FLIGHT", value_name = "N",
          default_value = "100", value_parser = clap::value_parser!(i64).range(1..))]
    pub max_orders_in_flight: i64,
    /// Commands handled at once per service before more answer 503 overloaded
    #[arg(long, env = "ORDERFLOW_MAX_COMMANDS_IN_FLIGHT", value_name = "N",
          default_value = "16", value_parser = positive_usize)]
    pub max_commands_in_flight: usize,
    /// How long inbox rows and consumer progress are kept, outliving any redelivery
    #[arg(long, env = "ORDERFLOW_MESSAGE_RETENTION_HOURS", value_name = "HOURS",
          default_value = "168", value_parser = positive_u64)]
    pub message_retention_hours: u64,
    /// How long idempotency keys are kept
    #[arg(long, env = "ORDERFLOW_IDEMPOTENCY_RETENTION_HOURS", value_name = "HOURS",
          default_value = "24", value_parser = positive_u64)]
    pub idempotency_retention_hours: u64,
    /// How log lines are written: text, or one JSON object per line for log shippers
    /// (traces are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set)
    #[arg(
        long,
        env = "ORDERFLOW_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub log_format: crate::telemetry::LogFormat,
}

fn positive_u64(text: &str) -> Result<u64, String> {
    text.trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| "not a positive whole number".to_owned())
}

fn positive_usize(text: &str) -> Result<usize, String> {
    positive_u64(text).and_then(|n| usize::try_from(n).map_err(|error| error.to_string()))
}

fn non_empty(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        Err("empty".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// Variables that are gone, and what replaced them: refused with that advice.
const RETIRED: [(&str, &str); 1] = [(
    "ORDERFLOW_GATEWAY_AUTH_READS",
    "ORDERFLOW_GATEWAY_AUTH_READS is gone: reads of personal data need a token by \
     default; ORDERFLOW_ANONYMOUS_READS=true opens them to anyone",
)];

impl Settings {
    /// The settings `lookup` gives (every variable unset in it takes its default; the
    /// process environment is not read).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        use clap::{Args, FromArgMatches};
        let command = Settings::augment_args(clap::Command::new("orderflow"));
        let mut arguments = vec!["orderflow".to_owned()];
        for argument in command.get_arguments() {
            let (Some(variable), Some(long)) = (argument.get_env(), argument.get_long()) else {
                continue;
            };
            if let Some(value) = variable.to_str().and_then(&lookup) {
                arguments.push(format!("--{long}={value}"));
            }
        }
        // Values only from `lookup`: the environment clap read when the command was
        // built is set aside.
        let matches = command
            .clone()
            .mut_args(|argument| argument.env(None::<&str>))
            .try_get_matches_from(&arguments)
            .map_err(|error| anyhow::anyhow!(Self::error_line(&error, &command)))?;
        Ok(Settings::from_arg_matches(&matches)?)
    }

    /// A refused value as one line naming its variable
    /// (`ORDERFLOW_GATEWAY_RATE_LIMIT="0": not a positive whole number`), or `None` for
    /// an error that is not about a setting's value.
    /// `command` is the one whose arguments the settings are (`serve`, or the settings'
    /// own).
    pub fn value_error(error: &clap::Error, command: &clap::Command) -> Option<String> {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        if !matches!(
            error.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        ) {
            return None;
        }
        let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) else {
            return None;
        };
        let long = flag.trim_start_matches("--").split([' ', '=']).next()?;
        let argument = command
            .get_arguments()
            .find(|argument| argument.get_long() == Some(long))?;
        let variable = argument.get_env()?.to_str()?;
        let value = match error.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(value)) => value.clone(),
            _ => String::new(),
        };
        let why = match std::error::Error::source(error) {
            Some(cause) => cause.to_string(),
            None => match error.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => format!("not one of {}", valid.join(", ")),
                _ => "not a valid value".to_owned(),
            },
        };
        Some(format!("{variable}={value:?}: {why}"))
    }

    fn error_line(error: &clap::Error, command: &clap::Command) -> String {
        Self::value_error(error, command).unwrap_or_else(|| {
            let text = error.to_string();
            text.lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_owned()
        })
    }

    fn database_urls(&self) -> Vec<(Service, String)> {
        [
            (Service::Order, &self.order_database_url),
            (Service::Inventory, &self.inventory_database_url),
            (Service::Payment, &self.payment_database_url),
            (Service::User, &self.user_database_url),
            (Service::Notification, &self.notification_database_url),
        ]
        .into_iter()
        .filter_map(|(service, url)| url.clone().map(|url| (service, url)))
        .collect()
    }

    fn ports(&self) -> Vec<(Service, u16)> {
        [
            (Service::Gateway, self.gateway_port),
            (Service::Order, self.order_port),
            (Service::Inventory, self.inventory_port),
            (Service::Payment, self.payment_port),
            (Service::User, self.user_port),
            (Service::Notification, self.notification_port),
        ]
        .into_iter()
        .filter_map(|(service, port)| port.map(|port| (service, port)))
        .collect()
    }
}

impl Config {
    pub fn from_env() -> anyhow::Result<Config> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds a configuration from any variable lookup (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let settings = Settings::from_lookup(&lookup)?;
        Self::from_settings(settings, lookup)
    }

    /// The configuration `settings` make, with what lies outside them from `lookup`:
    /// retired variables (refused), and `XDG_DATA_HOME` and `HOME` for the data folder.
    pub fn from_settings(
        settings: Settings,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Config> {
        for (variable, advice) in RETIRED {
            if lookup(variable).is_some() {
                anyhow::bail!("{advice}");
            }
        }
        let bind_address = settings.bind_address;
        let trust_local_callers = match settings.trust_local_callers {
            None => bind_address.is_loopback(),
            Some(true) if !bind_address.is_loopback() => anyhow::bail!(
                "ORDERFLOW_TRUST_LOCAL_CALLERS=true needs ORDERFLOW_BIND_ADDRESS on loopback \
                 (it is {bind_address}): anyone on the network could read personal data"
            ),
            Some(trust) => trust,
        };
        let kept = eventstore::retention::Retention::default();
        let retention = eventstore::retention::Retention {
            messages: hours(settings.message_retention_hours),
            idempotency_keys: hours(settings.idempotency_retention_hours),
            ..kept
        };
        let data_dir = settings
            .data_dir
            .clone()
            .filter(|dir| !dir.as_os_str().is_empty())
            .or_else(|| {
                lookup("XDG_DATA_HOME")
                    .filter(|dir| !dir.is_empty())
                    .map(|dir| PathBuf::from(dir).join("orderflow"))
            })
            .or_else(|| {
                lookup("HOME")
                    .filter(|dir| !dir.is_empty())
                    .map(|home| PathBuf::from(home).join(".local/share/orderflow"))
            });
        let secret = |name: &str| -> Option<String> {
            let path = |file: &Option<PathBuf>| file.as_ref().map(|p| p.display().to_string());
            match name {
                "ORDERFLOW_JWT_SECRET" => settings.jwt_secret.clone(),
                "ORDERFLOW_JWT_SECRET_FILE" => path(&settings.jwt_secret_file),
                "ORDERFLOW_DIGEST_SECRET" => settings.digest_secret.clone(),
                "ORDERFLOW_DIGEST_SECRET_FILE" => path(&settings.digest_secret_file),
                _ => None,
            }
        };
        let jwt_secret = SecretSource::from_lookup(TOKEN_SECRET, &secret, data_dir.as_deref())?;
        let digest_secret = SecretSource::from_lookup(DIGEST_SECRET, &secret, data_dir.as_deref())?;
        let milliseconds = std::time::Duration::from_millis;
        Ok(Config {
            database_urls: settings.database_urls(),
            ports: settings.ports(),
            payment_deadline: milliseconds(settings.payment_deadline_ms),
            capture_retry: milliseconds(settings.capture_retry_ms),
            data_dir,
            jwt_secret,
            digest_secret,
            jwt_lifetime: std::time::Duration::from_secs(settings.jwt_ttl_seconds),
            registry_ttl: milliseconds(settings.registry_ttl_ms),
            gateway_rate_limit: settings.gateway_rate_limit,
            anonymous_reads: settings.anonymous_reads,
            trust_local_callers,
            gateway_timeout: milliseconds(settings.gateway_timeout_ms),
            instance_id: None,
            consumer_partitions: settings.consumer_partitions,
            pressure: crate::pressure::Bounds {
                outbox_backlog: settings.max_outbox_backlog,
                subscription_lag: settings.max_subscription_lag,
                orders_in_flight: settings.max_orders_in_flight,
                commands_in_flight: settings.max_commands_in_flight,
            },
            retention,
            pg_url: settings.pg_url,
            bind_address,
            amqp_url: settings.amqp_url,
            redis_url: settings.redis_url,
            registry_namespace: settings.registry_namespace,
        })
    }

    /// The secrets this configuration names, generated into the data folder where
    /// it says so (see [`crate::secrets`]).
    pub fn secrets(&self) -> anyhow::Result<Secrets> {
        Ok(Secrets {
            tokens: self.jwt_secret.resolve(TOKEN_SECRET)?,
            digests: self.digest_secret.resolve(DIGEST_SECRET)?,
        })
    }

    /// The access-token issuer and checker of this configuration.
    pub fn tokens(&self) -> anyhow::Result<crate::auth::Tokens> {
        let secret = self.jwt_secret.resolve(TOKEN_SECRET)?;
        Ok(crate::auth::Tokens::new(secret.bytes(), self.jwt_lifetime))
    }

    /// The port a service listens on: its own from DESIGN §2 unless overridden.
    pub fn port(&self, service: Service) -> u16 {
        self.ports
            .iter()
            .find(|(s, _)| *s == service)
            .map_or(service.port(), |(_, port)| *port)
    }

    /// Sets a service's port (0: any free port), as tests do.
    pub fn set_port(&mut self, service: Service, port: u16) {
        self.ports.retain(|(s, _)| *s != service);
        self.ports.push((service, port));
    }

    /// Points a service at a database of its own, as tests do.
    pub fn set_database_url(&mut self, service: Service, url: impl Into<String>) {
        self.database_urls.retain(|(s, _)| *s != service);
        self.database_urls.push((service, url.into()));
    }

    /// Where a service's database is, or `None` for the gateway.
    pub fn database(&self, service: Service) -> anyhow::Result<Option<PgConnectOptions>> {
        let Some(default_name) = service.database() else {
            return Ok(None);
        };
        let overridden = self
            .database_urls
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, url)| url);
        let options = match overridden {
            Some(url) => url.parse::<PgConnectOptions>().map_err(|error| {
                anyhow::anyhow!("the {service} database URL is not valid: {error}")
            })?,
            None => eventstore::db::database_url(&self.pg_url, default_name)
                .map_err(|error| anyhow::anyhow!("ORDERFLOW_PG_URL is not valid: {error}"))?,
        };
        Ok(Some(options))
    }
}

/// The process's secrets, resolved.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub tokens: Secret,
    pub digests: Secret,
}

/// Parses `--services a,b,c`; empty means every service this build can run.
pub fn parse_services(list: Option<&str>) -> Result<Vec<Service>, String> {
    let Some(list) = list.filter(|l| !l.trim().is_empty()) else {
        return Ok(Service::ALL.to_vec());
    };
    let mut services = Vec::new();
    for name in list.split(',') {
        let service = Service::parse(name)?;
        if !services.contains(&service) {
            services.push(service);
        }
    }
    Ok(services)
}

fn hours(hours: u64) -> std::time::Duration {
    std::time::Duration::from_secs(hours.saturating_mul(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let config = Config::from_lookup(|name| match name {
            "ORDERFLOW_PAYMENT_DATABASE_URL" => Some("postgres://u@db.example:6543/pay".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.pg_url, "postgres://postgres@127.0.0.1:5432");
        let order = config.database(Service::Order).unwrap().unwrap();
        assert_eq!(order.get_database(), Some("orderflow_order"));
        let payment = config.database(Service::Payment).unwrap().unwrap();
        assert_eq!(payment.get_database(), Some("pay"));
        assert_eq!(payment.get_port(), 6543);
        assert!(config.database(Service::Gateway).unwrap().is_none());
    }

    #[test]
    fn a_bad_bind_address_is_refused() {
        let error = Config::from_lookup(|name| {
            (name == "ORDERFLOW_BIND_ADDRESS").then(|| "localhost:80".to_owned())
        })
        .unwrap_err();
        assert!(error.to_string().contains("ORDERFLOW_BIND_ADDRESS"));
    }

    #[test]
    fn personal_reads_are_closed_and_local_callers_trusted_only_on_loopback() {
        let config = |variables: &[(&str, &str)]| {
            Config::from_lookup(|name| {
                variables
                    .iter()
                    .find(|(variable, _)| *variable == name)
                    .map(|(_, value)| (*value).to_owned())
            })
        };
        let default = config(&[]).unwrap();
        assert!(!default.anonymous_reads);
        assert!(default.trust_local_callers, "127.0.0.1 is loopback");
        let exposed = config(&[("ORDERFLOW_BIND_ADDRESS", "0.0.0.0")]).unwrap();
        assert!(!exposed.trust_local_callers);
        let error = config(&[
            ("ORDERFLOW_BIND_ADDRESS", "0.0.0.0"),
            ("ORDERFLOW_TRUST_LOCAL_CALLERS", "true"),
        ])
        .unwrap_err();
        assert!(error.to_string().contains("loopback"), "{error}");
        let strict = config(&[("ORDERFLOW_TRUST_LOCAL_CALLERS", "false")]).unwrap();
        assert!(!strict.trust_local_callers);
        let open = config(&[("ORDERFLOW_ANONYMOUS_READS", "true")]).unwrap();
        assert!(open.anonymous_reads);
        let old = config(&[("ORDERFLOW_GATEWAY_AUTH_READS", "false")]).unwrap_err();
        assert!(
            old.to_string().contains("ORDERFLOW_ANONYMOUS_READS"),
            "{old}"
        );
        let home = config(&[("HOME", "/home/ada")]).unwrap();
        assert_eq!(
            home.data_dir.as_deref(),
            Some(std::path::Path::new("/home/ada/.local/share/orderflow"))
        );
    }

    #[test]
    fn the_declared_defaults_are_the_runtime_defaults() {
        let config = Config::from_lookup(|_| None).unwrap();
        let bounds = crate::pressure::Bounds::default();
        assert_eq!(config.pressure.outbox_backlog, bounds.outbox_backlog);
        assert_eq!(config.pressure.subscription_lag, bounds.subscription_lag);
        assert_eq!(config.pressure.orders_in_flight, bounds.orders_in_flight);
        assert_eq!(
            config.pressure.commands_in_flight,
            bounds.commands_in_flight
        );
        let kept = eventstore::retention::Retention::default();
        assert_eq!(config.retention.messages, kept.messages);
        assert_eq!(config.retention.idempotency_keys, kept.idempotency_keys);
        assert_eq!(config.consumer_partitions, 1);
        assert_eq!(config.port(Service::Gateway), Service::Gateway.port());
    }

    #[test]
    fn a_bad_value_is_one_line_naming_its_variable() {
        for (variable, value, says) in [
            (
                "ORDERFLOW_GATEWAY_RATE_LIMIT",
                "0",
                "not a positive whole number",
            ),
            ("ORDERFLOW_CONSUMER_PARTITIONS", "65", "1..=64"),
            ("ORDERFLOW_ANONYMOUS_READS", "maybe", ""),
            ("ORDERFLOW_ORDER_PORT", "80000", ""),
            ("ORDERFLOW_REGISTRY_NAMESPACE", " ", "empty"),
        ] {
            let error = Config::from_lookup(|name| (name == variable).then(|| value.to_owned()))
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("{variable}={value:?}: ")),
                "{error}"
            );
            assert!(error.contains(says), "{error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
    }

    #[test]
    fn service_lists() {
        assert_eq!(
            parse_services(Some("order, inventory,order")).unwrap(),
            vec![Service::Order, Service::Inventory]
        );
        assert!(
            parse_services(None)
                .unwrap()
                .contains(&Service::Notification)
        );
        assert!(
            parse_services(Some("shipping"))
                .unwrap_err()
                .contains("unknown")
        );
        assert_eq!(parse_services(Some("gateway")), Ok(vec![Service::Gateway]));
        assert_eq!(parse_services(None).unwrap().len(), Service::ALL.len());
    }
}
