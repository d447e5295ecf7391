//! Helpers for orderflow's end-to-end tests and benchmarks: every test gets its own
//! freshly migrated PostgreSQL database and its own RabbitMQ virtual host, both removed
//! again when the test ends, so tests run in parallel and leave nothing behind.

use std::future::Future;
use std::time::{Duration, Instant};

use eventstore::{EventStore, SchemaRegistry};

pub mod chaos;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

/// The PostgreSQL server tests use (`ORDERFLOW_PG_URL`, as the services do).
pub fn server_url() -> String {
    std::env::var("ORDERFLOW_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A uniquely named, migrated database that is dropped when this value is.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    server: PgConnectOptions,
}

impl TestDb {
    /// A fresh database with the event-store tables, and a pool of `connections`.
    pub async fn new(connections: u32) -> anyhow::Result<TestDb> {
        let server: PgConnectOptions = server_url().parse()?;
        let name = format!("orderflow_test_{}", uuid::Uuid::now_v7().simple());
        eventstore::db::create_database(&server, &name).await?;
        let pool = eventstore::db::connect(server.clone().database(&name), connections).await?;
        eventstore::db::migrate(&pool).await?;
        Ok(TestDb { pool, name, server })
    }

    pub fn store(&self) -> EventStore {
        EventStore::new(self.pool.clone())
    }

    /// The built-in schema registry, parsed once per test binary (it is cheap to clone).
    pub fn registry() -> SchemaRegistry {
        static REGISTRY: std::sync::LazyLock<SchemaRegistry> = std::sync::LazyLock::new(|| {
            SchemaRegistry::builtin().expect("the built-in schemas parse")
        });
        REGISTRY.clone()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_database_now(&self.server, &self.name);
    }
}

/// Drops a database from outside async context: a short-lived runtime on its own
/// thread removes it (FORCE disconnects whatever is still connected).
pub(crate) fn drop_database_now(server: &PgConnectOptions, name: &str) {
    let (server, owned_name) = (server.clone(), name.to_owned());
    let dropped = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime
                    .block_on(eventstore::db::drop_database(&server, &owned_name))
                    .map_err(anyhow::Error::from)
            })
    })
    .join();
    match dropped {
        Ok(Ok(())) => {}
        Ok(Err(error)) => eprintln!("could not drop test database {name}: {error}"),
        Err(_) => eprintln!("dropping test database {name} panicked"),
    }
}

/// Services running in this process on free ports, each with a fresh database of its
/// own and all in a fresh RabbitMQ virtual host; everything is removed on drop.
pub struct System {
    pub config: services::config::Config,
    pub http: reqwest::Client,
    running: Option<services::serve::Running>,
    /// (service, database name); dropped after the services stop.
    databases: Vec<(services::config::Service, String)>,
    server: PgConnectOptions,
    pub vhost: Vhost,
    /// The data folder the services keep their generated secrets in; removed on drop
    /// when the system made it.
    data_dir: std::path::PathBuf,
    owns_data_dir: bool,
}

impl System {
    pub async fn start(list: &[services::config::Service]) -> System {
        Self::start_with(list, &[]).await
    }

    /// As [`start`](Self::start), with these environment variables set for the
    /// services' configuration (`ORDERFLOW_PAYMENT_DEADLINE_MS`, say).
    pub async fn start_with(
        list: &[services::config::Service],
        variables: &[(&str, &str)],
    ) -> System {
        let vhost = tokio::task::spawn_blocking(Vhost::new)
            .await
            .expect("vhost task")
            .expect("test vhost");
        let server: PgConnectOptions = server_url().parse().expect("ORDERFLOW_PG_URL");
        // A registry of its own, unless the test shares one between systems.
        let namespace = format!("orderflow-test-{}", uuid::Uuid::now_v7().simple());
        // A data folder of its own (where the services generate their secrets), unless
        // the test gives one to share it or to start again on it.
        let given_data_dir = variables
            .iter()
            .find(|(name, _)| *name == "ORDERFLOW_DATA_DIR")
            .map(|(_, dir)| std::path::PathBuf::from(dir));
        let owns_data_dir = given_data_dir.is_none();
        let data_dir = given_data_dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("orderflow-test-{}", uuid::Uuid::now_v7().simple()))
        });
        let mut config = services::config::Config::from_lookup(|name| match name {
            "ORDERFLOW_PG_URL" => Some(server_url()),
            "ORDERFLOW_DATA_DIR" => Some(data_dir.display().to_string()),
            "ORDERFLOW_AMQP_URL" => Some(vhost.url.clone()),
            "ORDERFLOW_REGISTRY_NAMESPACE" => variables
                .iter()
                .find(|(variable, _)| *variable == name)
                .map_or_else(
                    || Some(namespace.clone()),
                    |(_, value)| Some((*value).to_owned()),
                ),
            other => variables
                .iter()
                .find(|(name, _)| *name == other)
                .map(|(_, value)| (*value).to_owned()),
        })
        .expect("test configuration");
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let mut databases = Vec::new();
        for &service in list {
            let port = format!("ORDERFLOW_{}_PORT", service.name().to_ascii_uppercase());
            if !variables.iter().any(|(name, _)| *name == port) {
                config.set_port(service, 0);
            }
            let name = format!("orderflow_test_{suffix}_{service}");
            config.set_database_url(service, format!("{}/{name}", server_url()));
            databases.push((service, name));
        }
        let running =
            services::serve::start(&config, list, tokio_util::sync::CancellationToken::new())
                .await
                .expect("services start");
        System {
            config,
            http: reqwest::Client::new(),
            running: Some(running),
            databases,
            server,
            vhost,
            data_dir,
            owns_data_dir,
        }
    }

    /// Issues and checks tokens as this system's services do (with the secret they
    /// generated, or were given).
    pub fn tokens(&self) -> services::auth::Tokens {
        self.config.tokens().expect("the system's token secret")
    }

    /// `http://<address of service><path>`.
    pub fn url(&self, service: services::config::Service, path: &str) -> String {
        let address = self
            .running
            .as_ref()
            .and_then(|running| running.address(service))
            .expect("the service runs");
        format!("http://{address}{path}")
    }

    /// GETs `path` on a service: the status and the JSON body (null when there is none).
    pub async fn get(
        &self,
        service: services::config::Service,
        path: &str,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self
            .http
            .get(self.url(service, path))
            .send()
            .await
            .expect("request");
        answer(response).await
    }

    /// GETs `path` on a service with an access token.
    pub async fn get_as(
        &self,
        service: services::config::Service,
        path: &str,
        token: &str,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let request = self.http.get(self.url(service, path)).bearer_auth(token);
        answer(request.send().await.expect("request")).await
    }

    /// Waits (30 s at most) until the gateway sees an instance of each service.
    pub async fn routable(&self, services: &[services::config::Service]) {
        let gateway = services::config::Service::Gateway;
        wait_for(
            Duration::from_secs(30),
            "every service to register",
            || async {
                let (status, upstreams) = self.get(gateway, "/gateway/upstreams").await;
                if status != reqwest::StatusCode::OK {
                    return None;
                }
                let registered: Vec<&str> = upstreams
                    .as_array()?
                    .iter()
                    .filter_map(|u| u["service"].as_str())
                    .collect();
                services
                    .iter()
                    .all(|service| registered.contains(&service.name()))
                    .then_some(())
            },
        )
        .await;
    }

    /// Registers a user through the gateway and logs them in: their access token.
    pub async fn token_for(&self, email: &str) -> String {
        let gateway = services::config::Service::Gateway;
        let user = serde_json::json!({ "email": email, "name": "Gia", "password": "password one" });
        let (status, body) = answer(self.post(gateway, "/users", user).await).await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
        self.log_in(email).await
    }

    /// Logs a user registered by [`token_for`](Self::token_for) in again (a new
    /// token, carrying the roles the user has now).
    pub async fn log_in(&self, email: &str) -> String {
        let gateway = services::config::Service::Gateway;
        let credentials = serde_json::json!({ "email": email, "password": "password one" });
        let (status, body) = answer(self.post(gateway, "/auth/token", credentials).await).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        body["access_token"].as_str().expect("a token").to_owned()
    }

    /// A service's `/metrics` exposition (one for every service of its process).
    pub async fn metrics(&self, service: services::config::Service) -> String {
        let response = self
            .http
            .get(self.url(service, "/metrics"))
            .send()
            .await
            .expect("metrics");
        // The type of what the encoder writes: OpenMetrics text, ending in `# EOF`.
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            eventstore::metrics::CONTENT_TYPE
        );
        let text = response.text().await.expect("metrics text");
        assert!(text.ends_with("# EOF\n"), "{text}");
        text
    }

    /// POSTs `body` as JSON to `path` on a service.
    pub async fn post(
        &self,
        service: services::config::Service,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        self.http
            .post(self.url(service, path))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// The environment that points an `orderflow` process at this system: its
    /// databases and its virtual host.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("ORDERFLOW_PG_URL".to_owned(), server_url()),
            ("ORDERFLOW_AMQP_URL".to_owned(), self.vhost.url.clone()),
            (
                "ORDERFLOW_REGISTRY_NAMESPACE".to_owned(),
                self.config.registry_namespace.clone(),
            ),
            (
                "ORDERFLOW_DATA_DIR".to_owned(),
                self.data_dir.display().to_string(),
            ),
        ];
        for (service, name) in self
            .databases
            .iter()
            .filter(|(s, _)| s.database().is_some())
        {
            let variable = format!(
                "ORDERFLOW_{}_DATABASE_URL",
                service.name().to_ascii_uppercase()
            );
            env.push((variable, format!("{}/{name}", server_url())));
        }
        env
    }

    /// A pool on a service's database, for looking behind the API.
    pub async fn pool(&self, service: services::config::Service) -> PgPool {
        let options = self
            .config
            .database(service)
            .expect("database URL")
            .expect("the service has a database");
        eventstore::db::connect(options, 2).await.expect("connect")
    }

    /// Stops the services gracefully, keeping their databases and virtual host, as a
    /// stopped process would; [`resume`](Self::resume) starts them again.
    pub async fn halt(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("services stop cleanly");
        }
    }

    /// Starts halted services again on the same databases and virtual host (on new
    /// ports), as a restarted process would.
    pub async fn resume(&mut self) {
        assert!(self.running.is_none(), "resume after halt");
        let list: Vec<_> = self.databases.iter().map(|(service, _)| *service).collect();
        let running = services::serve::start(
            &self.config,
            &list,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("services start again");
        self.running = Some(running);
    }

    /// Stops the services gracefully (then drop removes their databases and vhost).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("services stop cleanly");
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for (_, name) in &self.databases {
            drop_database_now(&self.server, name);
        }
        if self.owns_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// The RabbitMQ server tests use (`ORDERFLOW_AMQP_URL`, as the services do), without
/// its virtual host.
fn amqp_server() -> String {
    let url = std::env::var("ORDERFLOW_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    match url.rfind('/') {
        Some(slash) if slash > "amqp://".len() => url[..slash].to_owned(),
        _ => url,
    }
}

/// A RabbitMQ virtual host of a test's own, deleted (with every queue and exchange in
/// it) when this value is dropped. Made with `rabbitmqctl`, which needs to run on the
/// broker's machine, as the test suite does.
pub struct Vhost {
    pub name: String,
    /// An AMQP URL that connects into this virtual host.
    pub url: String,
}

impl Vhost {
    pub fn new() -> anyhow::Result<Vhost> {
        let name = format!("orderflow-test-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = Vhost {
            url: format!("{}/{name}", amqp_server()),
            name,
        };
        // The vhost is removed on drop even if this fails.
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }

    /// Force-closes every client connection into this virtual host, as a broker
    /// restart or a network cut would.
    pub fn close_all_connections(&self) -> anyhow::Result<()> {
        rabbitmqctl(&["close_all_connections", "--vhost", &self.name, "test fault"])
    }

    /// Messages in this virtual host's queues, ready or delivered and not yet
    /// acknowledged, leaving out the dead-letter queues (`dlq.*`).
    pub fn queued_messages(&self) -> anyhow::Result<u64> {
        queue_depths(&self.name).map(|(queued, _)| queued)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Err(error) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("could not delete test vhost {}: {error}", self.name);
        }
    }
}

/// Messages in a virtual host's queues: (outside the dead-letter queues, in them).
pub(crate) fn queue_depths(vhost: &str) -> anyhow::Result<(u64, u64)> {
    let listing = rabbitmqctl_output(&[
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "name",
        "messages",
    ])?;
    let (mut queued, mut dead) = (0, 0);
    for line in listing.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(count)) = (fields.next(), fields.next()) else {
            continue;
        };
        let count = count.parse::<u64>()?;
        if name.starts_with("dlq.") {
            dead += count;
        } else {
            queued += count;
        }
    }
    Ok((queued, dead))
}

pub(crate) fn rabbitmqctl(arguments: &[&str]) -> anyhow::Result<()> {
    rabbitmqctl_output(arguments).map(drop)
}

fn rabbitmqctl_output(arguments: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("--quiet")
        .args(arguments)
        .output()
        .map_err(|error| anyhow::anyhow!("cannot run rabbitmqctl: {error}"))?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {}: {}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// An `orderflow` process a test started, killed when dropped (a failing test leaves
/// none running).
pub struct Spawned(pub std::process::Child);

impl Spawned {
    /// Starts `orderflow` with these arguments and environment.
    pub fn orderflow(arguments: &[&str], env: &[(String, String)]) -> Spawned {
        let child = std::process::Command::new(orderflow_binary())
            .args(arguments)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "error")
            .spawn()
            .expect("orderflow starts");
        Spawned(child)
    }

    /// Starts `orderflow` with its output appended to `log`, logging at `filter`
    /// (a `RUST_LOG` value).
    pub fn orderflow_logged(
        arguments: &[&str],
        env: &[(String, String)],
        log: &std::path::Path,
        filter: &str,
    ) -> anyhow::Result<Spawned> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = std::process::Command::new(orderflow_binary())
            .args(arguments)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(Spawned(child))
    }

    /// SIGKILL: the process ends without a word.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `orderflow` binary of this build, which `cargo test --workspace` builds beside
/// the test binaries (they run from `target/<profile>/deps`).
pub fn orderflow_binary() -> std::path::PathBuf {
    if let Some(binary) = std::env::var_os("ORDERFLOW_BIN") {
        return binary.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let beside = exe.parent().expect("target directory");
    // A test runs from target/<profile>/deps, a tool like `chaos` from target/<profile>.
    let binary = [beside.join("orderflow"), beside.join("../orderflow")]
        .into_iter()
        .find(|path| path.exists())
        .unwrap_or_else(|| beside.join("../orderflow"));
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p services` first)",
        binary.display()
    );
    binary
}

/// Polls `condition` until it yields `Some`, failing after `deadline`. Tests wait on
/// conditions like this, never on fixed sleeps.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Measuring helpers shared by the benchmarks.
pub mod bench {
    /// The machine's CPU jiffies by kind, from the first line of /proc/stat (user,
    /// nice, system, idle, iowait, irq, softirq, steal, …).
    fn cpu_fields() -> Vec<u64> {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        stat.lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect()
    }

    /// (steal, total) jiffies from the first line of /proc/stat.
    pub fn cpu_times() -> (u64, u64) {
        let fields = cpu_fields();
        (fields.get(7).copied().unwrap_or(0), fields.iter().sum())
    }

    /// Idle plus iowait jiffies from the first line of /proc/stat.
    pub fn idle_jiffies() -> u64 {
        let fields = cpu_fields();
        fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0)
    }

    /// The share of CPU time stolen by the hypervisor between two readings.
    pub fn steal_share(before: (u64, u64), after: (u64, u64)) -> f64 {
        let total = after.1.saturating_sub(before.1);
        if total == 0 {
            return 0.0;
        }
        after.0.saturating_sub(before.0) as f64 / total as f64
    }

    pub fn median(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }

    /// A setting from the environment, or its default.
    pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

/// The `orderflow_consumer_duplicates_total` of `consumer` in a metrics exposition
/// (0 when the series is absent).
pub fn consumer_duplicates(exposition: &str, consumer: &str) -> i64 {
    let series = format!("orderflow_consumer_duplicates_total{{consumer=\"{consumer}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// A response's status and JSON body (null when it has none).
pub async fn answer(response: reqwest::Response) -> (reqwest::StatusCode, serde_json::Value) {
    let status = response.status();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}
