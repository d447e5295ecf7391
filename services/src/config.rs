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

impl Config {
    pub fn from_env() -> anyhow::Result<Config> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds a configuration from any variable lookup (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let pg_url = lookup("ORDERFLOW_PG_URL")
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".to_owned());
        let bind_address = match lookup("ORDERFLOW_BIND_ADDRESS") {
            Some(text) => text.parse().map_err(|_| {
                anyhow::anyhow!("ORDERFLOW_BIND_ADDRESS={text:?} is not an IP address")
            })?,
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let amqp_url = lookup("ORDERFLOW_AMQP_URL")
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        let database_urls = Service::ALL
            .into_iter()
            .filter_map(|service| {
                let variable = format!(
                    "ORDERFLOW_{}_DATABASE_URL",
                    service.name().to_ascii_uppercase()
                );
                lookup(&variable).map(|url| (service, url))
            })
            .collect();
        let mut ports = Vec::new();
        for service in Service::ALL {
            let variable = format!("ORDERFLOW_{}_PORT", service.name().to_ascii_uppercase());
            if let Some(text) = lookup(&variable) {
                let port = text
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{variable}={text:?} is not a port number"))?;
                ports.push((service, port));
            }
        }
        let payment_deadline = milliseconds(&lookup, "ORDERFLOW_PAYMENT_DEADLINE_MS")?;
        let capture_retry = milliseconds(&lookup, "ORDERFLOW_CAPTURE_RETRY_MS")?;
        let redis_url =
            lookup("ORDERFLOW_REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let registry_namespace = lookup("ORDERFLOW_REGISTRY_NAMESPACE")
            .filter(|namespace| !namespace.trim().is_empty())
            .unwrap_or_else(|| "orderflow".to_owned());
        let registry_ttl = milliseconds_or(&lookup, "ORDERFLOW_REGISTRY_TTL_MS", 5_000)?;
        let gateway_timeout = milliseconds_or(&lookup, "ORDERFLOW_GATEWAY_TIMEOUT_MS", 10_000)?;
        let gateway_rate_limit = match lookup("ORDERFLOW_GATEWAY_RATE_LIMIT") {
            None => 100,
            Some(text) => text.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                anyhow::anyhow!("ORDERFLOW_GATEWAY_RATE_LIMIT={text:?} is not a positive number")
            })?,
        };
        if lookup("ORDERFLOW_GATEWAY_AUTH_READS").is_some() {
            anyhow::bail!(
                "ORDERFLOW_GATEWAY_AUTH_READS is gone: reads of personal data need a token by \
                 default; ORDERFLOW_ANONYMOUS_READS=true opens them to anyone"
            );
        }
        let anonymous_reads = flag(&lookup, "ORDERFLOW_ANONYMOUS_READS")?.unwrap_or(false);
        let trust_local_callers = match flag(&lookup, "ORDERFLOW_TRUST_LOCAL_CALLERS")? {
            None => bind_address.is_loopback(),
            Some(true) if !bind_address.is_loopback() => anyhow::bail!(
                "ORDERFLOW_TRUST_LOCAL_CALLERS=true needs ORDERFLOW_BIND_ADDRESS on loopback \
                 (it is {bind_address}): anyone on the network could read personal data"
            ),
            Some(trust) => trust,
        };
        let consumer_partitions = match lookup("ORDERFLOW_CONSUMER_PARTITIONS") {
            None => 1,
            Some(text) => text
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "ORDERFLOW_CONSUMER_PARTITIONS={text:?} is not a number from 1 to 64"
                    )
                })?,
        };
        let defaults = crate::pressure::Bounds::default();
        let pressure = crate::pressure::Bounds {
            outbox_backlog: positive(
                &lookup,
                "ORDERFLOW_MAX_OUTBOX_BACKLOG",
                defaults.outbox_backlog,
            )?,
            subscription_lag: positive(
                &lookup,
                "ORDERFLOW_MAX_SUBSCRIPTION_LAG",
                defaults.subscription_lag,
            )?,
            orders_in_flight: positive(
                &lookup,
                "ORDERFLOW_MAX_ORDERS_IN_FLIGHT",
                defaults.orders_in_flight,
            )?,
            commands_in_flight: positive(
                &lookup,
                "ORDERFLOW_MAX_COMMANDS_IN_FLIGHT",
                defaults.commands_in_flight,
            )?,
        };
        let hours = |variable, default: std::time::Duration| -> anyhow::Result<_> {
            let hours = positive(&lookup, variable, default.as_secs() / 3600)?;
            Ok(std::time::Duration::from_secs(hours * 3600))
        };
        let kept = eventstore::retention::Retention::default();
        let retention = eventstore::retention::Retention {
            messages: hours("ORDERFLOW_MESSAGE_RETENTION_HOURS", kept.messages)?,
            idempotency_keys: hours(
                "ORDERFLOW_IDEMPOTENCY_RETENTION_HOURS",
                kept.idempotency_keys,
            )?,
            ..kept
        };
        let data_dir = lookup("ORDERFLOW_DATA_DIR")
            .filter(|dir| !dir.trim().is_empty())
            .map(PathBuf::from)
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
        let jwt_secret = SecretSource::from_lookup(TOKEN_SECRET, &lookup, data_dir.as_deref())?;
        let digest_secret = SecretSource::from_lookup(DIGEST_SECRET, &lookup, data_dir.as_deref())?;
        let jwt_lifetime = match lookup("ORDERFLOW_JWT_TTL_SECONDS") {
            None => std::time::Duration::from_secs(3600),
            Some(text) => text
                .trim()
                .parse()
                .ok()
                .filter(|seconds| *seconds > 0)
                .map(std::time::Duration::from_secs)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "ORDERFLOW_JWT_TTL_SECONDS={text:?} is not a positive number of seconds"
                    )
                })?,
        };
        Ok(Config {
            pg_url,
            bind_address,
            amqp_url,
            database_urls,
            ports,
            payment_deadline,
            capture_retry,
            data_dir,
            jwt_secret,
            digest_secret,
            jwt_lifetime,
            redis_url,
            registry_namespace,
            registry_ttl,
            gateway_rate_limit,
            anonymous_reads,
            trust_local_callers,
            gateway_timeout,
            instance_id: None,
            consumer_partitions,
            pressure,
            retention,
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

/// A true/false variable, `None` when unset.
fn flag(lookup: impl Fn(&str) -> Option<String>, variable: &str) -> anyhow::Result<Option<bool>> {
    match lookup(variable).as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some("true" | "1" | "yes") => Ok(Some(true)),
        Some("false" | "0" | "no") => Ok(Some(false)),
        Some(other) => anyhow::bail!("{variable}={other:?} is not true or false"),
    }
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

/// A positive number of milliseconds from `variable`, 30 s when it is not set.
fn milliseconds(
    lookup: impl Fn(&str) -> Option<String>,
    variable: &str,
) -> anyhow::Result<std::time::Duration> {
    milliseconds_or(lookup, variable, 30_000)
}

/// A positive number from `variable`, `default` when it is not set.
fn positive<N>(
    lookup: impl Fn(&str) -> Option<String>,
    variable: &str,
    default: N,
) -> anyhow::Result<N>
where
    N: std::str::FromStr + Default + PartialOrd,
{
    let Some(text) = lookup(variable) else {
        return Ok(default);
    };
    text.trim()
        .parse()
        .ok()
        .filter(|n| *n > N::default())
        .ok_or_else(|| anyhow::anyhow!("{variable}={text:?} is not a positive number"))
}

/// A positive number of milliseconds from `variable`, `default` when it is not set.
fn milliseconds_or(
    lookup: impl Fn(&str) -> Option<String>,
    variable: &str,
    default: u64,
) -> anyhow::Result<std::time::Duration> {
    let Some(text) = lookup(variable) else {
        return Ok(std::time::Duration::from_millis(default));
    };
    text.trim()
        .parse()
        .ok()
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| {
            anyhow::anyhow!("{variable}={text:?} is not a positive number of milliseconds")
        })
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
