//! The chaos harness (issue 8): the whole system as one process per service, orders
//! driven through the gateway at a steady rate (each retried with its own
//! Idempotency-Key until it is answered), faults injected at random, then, once the
//! faults stop, a wait for quiescence and an exact check of DESIGN §8.
//!
//! Faults: a service process killed with SIGKILL (and started again), the broker's
//! connections into the system's virtual host force-closed, the broker application
//! restarted, PostgreSQL restarted, the e-mail provider made slow for a while. The
//! last three touch the whole machine: run the harness alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::{Value, json};
use services::config::Service;
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::{Spawned, Vhost, server_url};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// A service process killed with SIGKILL, started again a moment later.
    Kill,
    /// One of the order service's instances killed with SIGKILL while the others
    /// serve, started again a few seconds later (the availability scenario).
    KillOrder,
    /// The order instance whose relay leads killed with SIGKILL while another stands
    /// by, started again a moment later.
    KillLeader,
    /// A service process stopped (SIGSTOP) for a few seconds, then continued: its
    /// consumers fall behind and its broker and database sessions may time out.
    Pause,
    /// Every connection into the system's virtual host closed by the broker.
    CloseConnections,
    /// The broker application stopped and started (every virtual host).
    RestartBroker,
    /// PostgreSQL restarted (every database).
    RestartDatabase,
    /// The e-mail provider answering slowly for a while.
    SlowProvider,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::KillOrder,
        Fault::KillLeader,
        Fault::Pause,
        Fault::CloseConnections,
        Fault::RestartBroker,
        Fault::RestartDatabase,
        Fault::SlowProvider,
    ];

    pub fn parse(text: &str) -> Option<Fault> {
        match text {
            "kill" => Some(Fault::Kill),
            "order" => Some(Fault::KillOrder),
            "leader" => Some(Fault::KillLeader),
            "pause" => Some(Fault::Pause),
            "connections" => Some(Fault::CloseConnections),
            "broker" => Some(Fault::RestartBroker),
            "database" => Some(Fault::RestartDatabase),
            "slow" => Some(Fault::SlowProvider),
            _ => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long orders are placed and faults injected.
    pub duration: Duration,
    /// Orders per second.
    pub rate: f64,
    /// Time between faults (each one falls due a little earlier or later, at random).
    pub fault_every: Duration,
    pub faults: Vec<Fault>,
    /// Instances of the order service (its consumers split in as many partitions).
    pub order_instances: usize,
    pub skus: usize,
    pub stock_per_sku: u32,
    /// How long quiescence may take before the run fails.
    pub settle_within: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            duration: Duration::from_secs(120),
            rate: 3.0,
            fault_every: Duration::from_secs(10),
            faults: Fault::ALL.to_vec(),
            order_instances: 2,
            skus: 5,
            stock_per_sku: 1_000,
            settle_within: Duration::from_secs(180),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub seconds: f64,
    /// Orders the load tried to place, and those accepted (202).
    pub commands: usize,
    pub orders: usize,
    pub outcomes: BTreeMap<String, usize>,
    pub faults: BTreeMap<Fault, usize>,
    /// HTTP attempts made, and those answered (2xx or 4xx) rather than failing (5xx,
    /// refused, timed out): the share answered is the availability seen.
    pub requests: usize,
    pub answered: usize,
    /// Orders placed that never ended, events or messages missing.
    pub lost: usize,
    /// Effects that happened twice (an order per key, a stock movement, a capture, a
    /// notification).
    pub duplicated: usize,
    pub dead_letters: usize,
    /// From the last fault until every check held.
    pub settle_seconds: f64,
    /// Broker and database outages seen through `/health/ready` (every service process
    /// unready during it, ready again after it without a restart), and the longest
    /// time from the dependency's return to every process being ready.
    pub outages: usize,
    pub longest_recovery_seconds: f64,
    /// Every broken invariant, in words (empty when all hold).
    pub problems: Vec<String>,
}

impl Report {
    pub fn availability(&self) -> f64 {
        if self.requests == 0 {
            return 1.0;
        }
        self.answered as f64 / self.requests as f64
    }

    /// The report in a few lines.
    pub fn summary(&self) -> String {
        let list = |pairs: Vec<String>| {
            if pairs.is_empty() {
                "none".to_owned()
            } else {
                pairs.join(", ")
            }
        };
        let outcomes = list(
            self.outcomes
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect(),
        );
        let faults = list(
            self.faults
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{v} {}",
                        serde_json::to_value(k)
                            .unwrap_or_default()
                            .as_str()
                            .unwrap_or("?")
                    )
                })
                .collect(),
        );
        let mut text = format!(
            "{} orders accepted of {} placed in {:.0} s: {outcomes}\nfaults: {faults}\n\
             requests answered: {} of {} ({:.3} %)\n\
             lost {}, duplicated {}, dead letters {}, settled {:.1} s after the last fault",
            self.orders,
            self.commands,
            self.seconds,
            self.answered,
            self.requests,
            self.availability() * 100.0,
            self.lost,
            self.duplicated,
            self.dead_letters,
            self.settle_seconds,
        );
        if self.outages > 0 {
            text.push_str(&format!(
                "\n{} outages: every service unready during each, ready again at most {:.1} s after",
                self.outages, self.longest_recovery_seconds
            ));
        }
        if self.problems.is_empty() {
            text.push_str("\nevery invariant holds");
        }
        for problem in &self.problems {
            text.push_str(&format!("\nPROBLEM: {problem}"));
        }
        text
    }
}

/// Runs the harness; `progress` gets a line now and then.
pub async fn run(
    settings: Settings,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> anyhow::Result<Report> {
    let progress = Arc::new(progress);
    let mut cluster = Cluster::start(&settings).await?;
    progress(format!("system up: {} processes", cluster.processes.len()));
    let started = Instant::now();
    let client = Client::new(&cluster.gateway_url)?;
    let (user_id, token) = client.user().await?;
    for sku in cluster.skus(&settings) {
        client.stock(&token, &sku, settings.stock_per_sku).await?;
    }
    let stats = Arc::new(Stats::default());
    let placed: Arc<Mutex<Vec<(String, Uuid)>>> = Arc::default();
    // Orders, on an open-loop schedule, each retried with its key until answered.
    let load = {
        let (client, token, stats, placed) =
            (client.clone(), token.clone(), stats.clone(), placed.clone());
        let skus = cluster.skus(&settings);
        let (rate, duration) = (settings.rate, settings.duration);
        tokio::spawn(async move {
            let mut orders = tokio::task::JoinSet::new();
            let count = (duration.as_secs_f64() * rate) as usize;
            let begun = Instant::now();
            for i in 0..count {
                let due = begun + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let (client, token, stats, placed) =
                    (client.clone(), token.clone(), stats.clone(), placed.clone());
                let sku = skus[i % skus.len()].clone();
                // Every SKU sees every card: 3 in 5 paid, 1 declined, 1 never answered.
                let cards = [
                    "tok_visa",
                    "tok_visa",
                    "tok_visa",
                    "tok_decline",
                    "tok_timeout",
                ];
                let card = cards[(i / skus.len()) % cards.len()];
                orders.spawn(async move {
                    let key = Uuid::now_v7().to_string();
                    stats.commands.fetch_add(1, Ordering::Relaxed);
                    if let Some(order_id) = client
                        .order(&token, user_id, &sku, card, &key, &stats)
                        .await
                    {
                        placed.lock().await.push((key, order_id));
                    }
                });
            }
            while orders.join_next().await.is_some() {}
        })
    };
    // Faults until the load's time is up.
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut last_fault = Instant::now();
    let mut bag: Vec<Fault> = Vec::new();
    // The n-th fault falls due n periods after the start, give or take 40 %: the pace
    // holds however long each fault takes.
    for n in 1.. {
        if settings.fault_every * (n + 1) > settings.duration {
            break;
        }
        let jitter = rand::rng().random_range(-0.4..0.4);
        let due = started + settings.fault_every.mul_f64(f64::from(n) + jitter);
        tokio::time::sleep_until(due.into()).await;
        // Drawn from a shuffled bag of every kind, so that even a short run mixes them.
        if bag.is_empty() {
            bag = settings.faults.clone();
            bag.shuffle(&mut rand::rng());
        }
        let Some(fault) = bag.pop() else { break };
        match cluster.inject(fault, &client).await {
            Ok(what) => {
                *faults.entry(fault).or_default() += 1;
                last_fault = Instant::now();
                progress(format!("{:.0} s: {what}", started.elapsed().as_secs_f64()));
            }
            Err(error) => progress(format!("could not inject {fault:?}: {error}")),
        }
    }
    load.await?;
    let placed = std::mem::take(&mut *placed.lock().await);
    progress(format!(
        "{} orders placed; waiting for the system to settle",
        placed.len()
    ));
    // Every process runs again (a kill may have been the last fault).
    cluster.ensure_running().await?;
    let checks = Checks {
        cluster: &cluster,
        settings: &settings,
        placed: &placed,
    };
    let settle_deadline = Instant::now() + settings.settle_within;
    let mut findings = checks.run().await?;
    let commands = stats.commands.load(Ordering::Relaxed);
    while !findings.problems.is_empty() && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        findings = checks.run().await?;
    }
    let settle_seconds = last_fault.elapsed().as_secs_f64();
    // The read models against rebuilds from their event stores, once settled.
    if findings.problems.is_empty() {
        findings
            .problems
            .extend(checks.rebuilds_equal_live().await?);
    }
    findings
        .problems
        .extend(cluster.readiness_problems.iter().cloned());
    if placed.len() < commands {
        findings.problems.push(format!(
            "{} of {commands} orders were never accepted",
            commands - placed.len()
        ));
    }
    let report = Report {
        seconds: started.elapsed().as_secs_f64(),
        commands,
        orders: placed.len(),
        outcomes: findings.outcomes,
        faults,
        requests: stats.requests.load(Ordering::Relaxed),
        answered: stats.answered.load(Ordering::Relaxed),
        lost: findings.lost,
        duplicated: findings.duplicated,
        dead_letters: findings.dead_letters,
        settle_seconds,
        outages: cluster.recoveries.len(),
        longest_recovery_seconds: cluster.recoveries.iter().copied().fold(0.0, f64::max),
        problems: findings.problems,
    };
    cluster.stop();
    if report.problems.is_empty() {
        let _ = std::fs::remove_dir_all(&cluster.logs);
    } else {
        progress(format!(
            "the processes' logs are in {}",
            cluster.logs.display()
        ));
    }
    Ok(report)
}

#[derive(Default)]
struct Stats {
    commands: AtomicUsize,
    requests: AtomicUsize,
    answered: AtomicUsize,
}

/// The gateway, as the load sees it.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    gateway: String,
}

impl Client {
    fn new(gateway: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Client {
            http,
            gateway: gateway.to_owned(),
        })
    }

    /// POSTs until the gateway answers (2xx or 4xx), for at most two minutes.
    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: &Value,
        stats: Option<&Stats>,
    ) -> Option<(reqwest::StatusCode, Value)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut pause = Duration::from_millis(100);
        while Instant::now() < deadline {
            let mut request = self.http.post(format!("{}{path}", self.gateway)).json(body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let outcome = request.send().await;
            if let Some(stats) = stats {
                stats.requests.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(response) = outcome {
                let status = response.status();
                if !status.is_server_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
                    if let Some(stats) = stats {
                        stats.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    let body = response.json::<Value>().await.unwrap_or_default();
                    return Some((status, body));
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        None
    }

    async fn user(&self) -> anyhow::Result<(Uuid, String)> {
        let email = format!("chaos-{}@example.com", Uuid::now_v7().simple());
        let body = json!({ "email": email, "name": "Chaos", "password": "chaos chaos" });
        let (_, user) = self
            .post("/users", None, None, &body, None)
            .await
            .ok_or_else(|| anyhow::anyhow!("cannot register"))?;
        let user_id = user["user_id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| anyhow::anyhow!("registration: {user}"))?;
        let body = json!({ "email": email, "password": "chaos chaos" });
        let (_, token) = self
            .post("/auth/token", None, None, &body, None)
            .await
            .ok_or_else(|| anyhow::anyhow!("cannot log in"))?;
        let token = token["access_token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("log-in: {token}"))?;
        Ok((user_id, token.to_owned()))
    }

    async fn stock(&self, token: &str, sku: &str, quantity: u32) -> anyhow::Result<()> {
        let body = json!({ "sku": sku, "name": sku, "quantity": quantity });
        let key = format!("stock-{sku}");
        let (status, answer) = self
            .post("/inventory/items", Some(token), Some(&key), &body, None)
            .await
            .ok_or_else(|| anyhow::anyhow!("cannot add stock"))?;
        anyhow::ensure!(status.is_success(), "adding stock: {status} {answer}");
        Ok(())
    }

    /// Places an order with its own Idempotency-Key, retrying until answered.
    async fn order(
        &self,
        token: &str,
        customer: Uuid,
        sku: &str,
        card: &str,
        key: &str,
        stats: &Stats,
    ) -> Option<Uuid> {
        let body = json!({
            "customer_id": customer,
            "lines": [{ "sku": sku, "quantity": 1, "unit_price_cents": 500 }],
            "card_token": card,
        });
        let (status, answer) = self
            .post("/orders", Some(token), Some(key), &body, Some(stats))
            .await?;
        if status != reqwest::StatusCode::ACCEPTED {
            return None;
        }
        answer["order_id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
    }
}

/// One `orderflow serve` process of the cluster.
struct Process {
    service: Service,
    instance_id: String,
    port: u16,
    running: Option<Spawned>,
}

/// The system under test: its databases, virtual host and processes.
struct Cluster {
    vhost: Vhost,
    databases: Vec<String>,
    env: Vec<(String, String)>,
    processes: Vec<Process>,
    gateway_url: String,
    run: String,
    /// Each process's output, `<instance>.log`.
    pub logs: std::path::PathBuf,
    /// What readiness showed around outages: problems, and how long each recovery took.
    readiness_problems: Vec<String>,
    recoveries: Vec<f64>,
}

impl Cluster {
    async fn start(settings: &Settings) -> anyhow::Result<Cluster> {
        let vhost = tokio::task::spawn_blocking(Vhost::new).await??;
        let run = Uuid::now_v7().simple().to_string()[20..].to_owned();
        let mut env = vec![
            ("ORDERFLOW_PG_URL".to_owned(), server_url()),
            ("ORDERFLOW_AMQP_URL".to_owned(), vhost.url.clone()),
            (
                "ORDERFLOW_REGISTRY_NAMESPACE".to_owned(),
                format!("orderflow-chaos-{run}"),
            ),
            ("ORDERFLOW_REGISTRY_TTL_MS".to_owned(), "1500".to_owned()),
            (
                "ORDERFLOW_PAYMENT_DEADLINE_MS".to_owned(),
                "3000".to_owned(),
            ),
            ("ORDERFLOW_CAPTURE_RETRY_MS".to_owned(), "2000".to_owned()),
            (
                "ORDERFLOW_JWT_SECRET".to_owned(),
                format!("chaos-{run}-signs-the-tokens-of-this-run"),
            ),
            (
                "ORDERFLOW_DIGEST_SECRET".to_owned(),
                format!("chaos-{run}-keys-the-request-digests"),
            ),
            (
                "ORDERFLOW_GATEWAY_RATE_LIMIT".to_owned(),
                "100000".to_owned(),
            ),
            (
                "ORDERFLOW_CONSUMER_PARTITIONS".to_owned(),
                settings.order_instances.max(1).to_string(),
            ),
        ];
        let mut databases = Vec::new();
        for service in Service::ALL.into_iter().filter(|s| s.database().is_some()) {
            let name = format!("orderflow_chaos_{run}_{service}");
            env.push((
                format!(
                    "ORDERFLOW_{}_DATABASE_URL",
                    service.name().to_ascii_uppercase()
                ),
                format!("{}/{name}", server_url()),
            ));
            databases.push(name);
        }
        let migrate = {
            let env = env.clone();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(crate::orderflow_binary())
                    .arg("migrate")
                    .envs(env)
                    .env("RUST_LOG", "error")
                    .output()
            })
            .await??
        };
        anyhow::ensure!(
            migrate.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );
        let mut processes = Vec::new();
        let mut plan = vec![
            Service::Gateway,
            Service::Inventory,
            Service::Payment,
            Service::User,
            Service::Notification,
        ];
        plan.extend(std::iter::repeat_n(
            Service::Order,
            settings.order_instances.max(1),
        ));
        for (index, service) in plan.into_iter().enumerate() {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            processes.push(Process {
                service,
                instance_id: format!("{service}-{index}"),
                port,
                running: None,
            });
        }
        let gateway_url = format!("http://127.0.0.1:{}", processes[0].port);
        let logs = std::env::temp_dir().join(format!("orderflow-chaos-{run}"));
        std::fs::create_dir_all(&logs)?;
        let mut cluster = Cluster {
            vhost,
            databases,
            env,
            processes,
            gateway_url,
            run,
            logs,
            readiness_problems: Vec::new(),
            recoveries: Vec::new(),
        };
        for index in 0..cluster.processes.len() {
            cluster.spawn(index)?;
        }
        cluster.wait_routable().await?;
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let process = &mut self.processes[index];
        let port = process.port.to_string();
        let arguments = [
            "serve",
            "--services",
            process.service.name(),
            "--port",
            &port,
            "--instance-id",
            &process.instance_id,
        ];
        let log = self.logs.join(format!("{}.log", process.instance_id));
        let filter =
            std::env::var("CHAOS_LOG").unwrap_or_else(|_| "info,sqlx=warn,lapin=off".to_owned());
        process.running = Some(Spawned::orderflow_logged(
            &arguments, &self.env, &log, &filter,
        )?);
        Ok(())
    }

    /// Until the gateway sees every service.
    async fn wait_routable(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let wanted = Service::ALL.len() - 1;
        while Instant::now() < deadline {
            if let Ok(response) = http
                .get(format!("{}/gateway/upstreams", self.gateway_url))
                .send()
                .await
                && let Ok(upstreams) = response.json::<Vec<Value>>().await
            {
                let mut services: Vec<&str> = upstreams
                    .iter()
                    .filter_map(|u| u["service"].as_str())
                    .collect();
                services.sort_unstable();
                services.dedup();
                if services.len() == wanted {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("the services did not all register within 60 s")
    }

    fn skus(&self, settings: &Settings) -> Vec<String> {
        (0..settings.skus)
            .map(|i| format!("CHAOS-{}-{i}", self.run))
            .collect()
    }

    async fn ensure_running(&mut self) -> anyhow::Result<()> {
        for index in 0..self.processes.len() {
            let alive = self.processes[index]
                .running
                .as_mut()
                .is_some_and(|child| matches!(child.0.try_wait(), Ok(None)));
            if !alive {
                self.spawn(index)?;
            }
        }
        self.wait_routable().await
    }

    /// Injects one fault; says what it did.
    async fn inject(&mut self, fault: Fault, client: &Client) -> anyhow::Result<String> {
        match fault {
            Fault::Kill => {
                let index = rand::rng().random_range(0..self.processes.len());
                let down = self.kill_and_restart(index, 200..2000).await?;
                Ok(format!(
                    "killed {} (kill -9), back after {down:?}",
                    self.processes[index].instance_id
                ))
            }
            Fault::KillOrder => {
                let orders: Vec<usize> = (0..self.processes.len())
                    .filter(|&i| self.processes[i].service == Service::Order)
                    .collect();
                anyhow::ensure!(
                    orders.len() > 1,
                    "only one order instance: killing it stops the service"
                );
                let index = orders[rand::rng().random_range(0..orders.len())];
                let down = self.kill_and_restart(index, 2000..5000).await?;
                Ok(format!(
                    "killed order instance {} (kill -9), back after {down:?}",
                    self.processes[index].instance_id
                ))
            }
            Fault::KillLeader => {
                let index = self.relay_leader(Service::Order).await?;
                let down = self.kill_and_restart(index, 500..3000).await?;
                Ok(format!(
                    "killed the order relay leader {} (kill -9), back after {down:?}",
                    self.processes[index].instance_id
                ))
            }
            Fault::Pause => {
                let index = rand::rng().random_range(0..self.processes.len());
                let pid = self.processes[index]
                    .running
                    .as_ref()
                    .map(|child| child.0.id().to_string())
                    .ok_or_else(|| {
                        anyhow::anyhow!("{} is not running", self.processes[index].instance_id)
                    })?;
                let paused = Duration::from_millis(rand::rng().random_range(2000..8000));
                signal(&pid, "-STOP")?;
                tokio::time::sleep(paused).await;
                signal(&pid, "-CONT")?;
                Ok(format!(
                    "paused {} (SIGSTOP) for {paused:?}",
                    self.processes[index].instance_id
                ))
            }
            Fault::CloseConnections => {
                let vhost_name = self.vhost.name.clone();
                tokio::task::spawn_blocking(move || {
                    crate::rabbitmqctl(&["close_all_connections", "--vhost", &vhost_name, "chaos"])
                })
                .await??;
                Ok("closed every broker connection".to_owned())
            }
            Fault::RestartBroker => {
                tokio::task::spawn_blocking(|| crate::rabbitmqctl(&["stop_app"])).await??;
                let outage = self.outage("the broker").await;
                tokio::task::spawn_blocking(|| crate::rabbitmqctl(&["start_app"])).await??;
                Ok(format!(
                    "restarted the broker; {}",
                    self.recovery("the broker", outage).await
                ))
            }
            Fault::RestartDatabase => {
                tokio::task::spawn_blocking(|| postgres("stop")).await??;
                let outage = self.outage("PostgreSQL").await;
                tokio::task::spawn_blocking(|| postgres("start")).await??;
                Ok(format!(
                    "restarted PostgreSQL; {}",
                    self.recovery("PostgreSQL", outage).await
                ))
            }
            Fault::SlowProvider => {
                let notification = self
                    .processes
                    .iter()
                    .find(|p| p.service == Service::Notification)
                    .map(|p| format!("http://127.0.0.1:{}/providers/email", p.port))
                    .ok_or_else(|| anyhow::anyhow!("no notification service"))?;
                let slow = json!({ "mode": "slow", "delay_ms": 1500 });
                client.http.put(&notification).json(&slow).send().await?;
                let http = client.http.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let _ = http
                        .put(&notification)
                        .json(&json!({ "mode": "ok" }))
                        .send()
                        .await;
                });
                Ok("made the e-mail provider slow for 5 s".to_owned())
            }
        }
    }

    /// Kills a process with SIGKILL and starts it again after a pause drawn from
    /// `down_ms`; the pause.
    async fn kill_and_restart(
        &mut self,
        index: usize,
        down_ms: std::ops::Range<u64>,
    ) -> anyhow::Result<Duration> {
        if let Some(mut child) = self.processes[index].running.take() {
            child.kill();
        }
        let down = Duration::from_millis(rand::rng().random_range(down_ms));
        tokio::time::sleep(down).await;
        self.spawn(index)?;
        Ok(down)
    }

    /// The `/health/ready` URL of every service process that has a database and a
    /// broker (the gateway has neither).
    fn readiness_urls(&self) -> Vec<(String, String)> {
        self.processes
            .iter()
            .filter(|p| p.service != Service::Gateway)
            .map(|p| {
                (
                    p.instance_id.clone(),
                    format!("http://127.0.0.1:{}/health/ready", p.port),
                )
            })
            .collect()
    }

    /// While a dependency is down: waits (at most 15 s) until every service process
    /// says it is not ready, and notes any that never did.
    async fn outage(&mut self, what: &str) -> (Instant, f64) {
        let began = Instant::now();
        let pending = self.readiness_until(false, Duration::from_secs(15)).await;
        if !pending.is_empty() {
            self.readiness_problems.push(format!(
                "{} stayed ready while {what} was down",
                pending.join(", ")
            ));
        }
        (began, began.elapsed().as_secs_f64())
    }

    /// Once the dependency is back: waits (at most 60 s) until every service process is
    /// ready again, without being restarted, and says how long that took.
    async fn recovery(&mut self, what: &str, (outage, noticed): (Instant, f64)) -> String {
        let back = Instant::now();
        let pending = self.readiness_until(true, Duration::from_secs(60)).await;
        if !pending.is_empty() {
            self.readiness_problems.push(format!(
                "{} not ready 60 s after {what} came back",
                pending.join(", ")
            ));
            return "some services did not recover".to_owned();
        }
        let recovered = back.elapsed().as_secs_f64();
        self.recoveries.push(recovered);
        format!(
            "every service unready within {noticed:.1} s, ready again {recovered:.1} s after its \
             return (down {:.1} s)",
            (back - outage).as_secs_f64()
        )
    }

    /// Polls readiness (every process at once) until every process answers `ready`
    /// (or not); the ones that never did by the deadline.
    async fn readiness_until(&self, ready: bool, within: Duration) -> Vec<String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default();
        let deadline = Instant::now() + within;
        let mut pending = self.readiness_urls();
        loop {
            let mut polls = tokio::task::JoinSet::new();
            for (instance, url) in pending {
                let http = http.clone();
                polls.spawn(async move {
                    let answer = http.get(&url).send().await.map(|r| r.status().is_success());
                    // A process that does not answer at all is not ready either.
                    (answer.unwrap_or(false) == ready, instance, url)
                });
            }
            pending = polls
                .join_all()
                .await
                .into_iter()
                .filter(|(done, _, _)| !done)
                .map(|(_, instance, url)| (instance, url))
                .collect();
            if pending.is_empty() || Instant::now() >= deadline {
                return pending.into_iter().map(|(instance, _)| instance).collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process whose relay for `service` leads, by its `/metrics`.
    async fn relay_leader(&self, service: Service) -> anyhow::Result<usize> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let gauge = format!("orderflow_relay_leading{{service=\"{service}\"}} 1");
        let candidates: Vec<usize> = (0..self.processes.len())
            .filter(|&i| self.processes[i].service == service)
            .collect();
        anyhow::ensure!(
            candidates.len() > 1,
            "only one {service} instance: no standby to take over"
        );
        for index in candidates {
            let url = format!("http://127.0.0.1:{}/metrics", self.processes[index].port);
            if let Ok(response) = http.get(url).send().await
                && let Ok(text) = response.text().await
                && text.lines().any(|line| line == gauge)
            {
                return Ok(index);
            }
        }
        anyhow::bail!("no {service} instance says its relay leads")
    }

    async fn pool(&self, service: Service) -> anyhow::Result<PgPool> {
        let variable = format!(
            "ORDERFLOW_{}_DATABASE_URL",
            service.name().to_ascii_uppercase()
        );
        let url = self
            .env
            .iter()
            .find(|(name, _)| *name == variable)
            .map(|(_, url)| url.clone())
            .ok_or_else(|| anyhow::anyhow!("no database for {service}"))?;
        Ok(eventstore::db::connect(url.parse()?, 2).await?)
    }

    fn stop(&mut self) {
        for process in &mut self.processes {
            process.running = None;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if let Ok(server) = server_url().parse() {
            for name in &self.databases {
                crate::drop_database_now(&server, name);
            }
        }
    }
}

/// Sends a signal to a process (`-STOP`, `-CONT`).
fn signal(pid: &str, which: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([which, pid])
        .status()?;
    anyhow::ensure!(status.success(), "kill {which} {pid} failed");
    Ok(())
}

/// Stops or starts the machine's PostgreSQL cluster (as `scripts/infra` starts it).
fn postgres(action: &str) -> anyhow::Result<()> {
    let versions = std::fs::read_dir("/etc/postgresql")?;
    let version = versions
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .max()
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL cluster in /etc/postgresql"))?;
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .status()?;
    anyhow::ensure!(status.success(), "pg_ctlcluster {action} failed");
    Ok(())
}

/// What the checks found.
#[derive(Default)]
struct Findings {
    outcomes: BTreeMap<String, usize>,
    lost: usize,
    duplicated: usize,
    dead_letters: usize,
    problems: Vec<String>,
}

/// DESIGN §8, checked exactly against the databases and the broker.
struct Checks<'a> {
    cluster: &'a Cluster,
    settings: &'a Settings,
    placed: &'a [(String, Uuid)],
}

impl Checks<'_> {
    async fn run(&self) -> anyhow::Result<Findings> {
        let mut found = Findings::default();
        let orders = self.cluster.pool(Service::Order).await?;
        let inventory = self.cluster.pool(Service::Inventory).await?;
        let payment = self.cluster.pool(Service::Payment).await?;
        let notification = self.cluster.pool(Service::Notification).await?;
        let users = self.cluster.pool(Service::User).await?;
        // Every order's status, read once for the order and the money checks.
        let statuses: HashMap<Uuid, String> =
            sqlx::query_as::<_, (Uuid, String)>("SELECT order_id, status FROM order_summaries")
                .fetch_all(&orders)
                .await?
                .into_iter()
                .collect();
        let outcome = self.orders(&statuses, &mut found);
        let stock = self.stock(&inventory).await;
        let money = self.money(&payment, &statuses).await;
        let notified = self.notified(&notification, &found).await;
        match self
            .plumbing(&[
                (Service::Order, &orders),
                (Service::Inventory, &inventory),
                (Service::Payment, &payment),
                (Service::Notification, &notification),
                (Service::User, &users),
            ])
            .await
        {
            Ok((problems, _, _, dead)) => {
                found.dead_letters = dead as usize;
                found.problems.extend(problems);
            }
            Err(error) => found
                .problems
                .push(format!("could not check the plumbing: {error}")),
        }
        for pool in [orders, inventory, payment, notification, users] {
            pool.close().await;
        }
        for problems in [outcome, stock, money, notified] {
            match problems {
                Ok((problems, lost, duplicated)) => {
                    found.lost += lost;
                    found.duplicated += duplicated;
                    found.problems.extend(problems);
                }
                Err(error) => found.problems.push(format!("could not check: {error}")),
            }
        }
        Ok(found)
    }

    /// Every order ended; one order per Idempotency-Key.
    fn orders(
        &self,
        statuses: &HashMap<Uuid, String>,
        found: &mut Findings,
    ) -> anyhow::Result<(Vec<String>, usize, usize)> {
        let mut problems = Vec::new();
        found.outcomes.clear();
        let mut lost = 0;
        for (_, order_id) in self.placed {
            match statuses.get(order_id) {
                Some(status) => *found.outcomes.entry(status.clone()).or_default() += 1,
                None => lost += 1,
            }
        }
        let pending = found.outcomes.get("pending").copied().unwrap_or(0);
        if pending + lost > 0 {
            problems.push(format!(
                "{pending} orders still pending, {lost} accepted orders unknown to the read model"
            ));
        }
        // Every order the system holds was placed by the load, once per key.
        let duplicated = statuses.len().saturating_sub(self.placed.len());
        if duplicated > 0 {
            problems.push(format!(
                "{duplicated} more orders than the {} keys used",
                self.placed.len()
            ));
        }
        Ok((problems, pending + lost, duplicated))
    }

    /// Per SKU, stock adds up and nothing is held for an ended order; one movement
    /// per command and stream.
    async fn stock(&self, pool: &PgPool) -> anyhow::Result<(Vec<String>, usize, usize)> {
        let mut problems = Vec::new();
        let initial = i64::from(self.settings.stock_per_sku);
        let rows: Vec<(String, i64, i64, i64)> =
            sqlx::query_as("SELECT sku, available, reserved, sold FROM stock_levels")
                .fetch_all(pool)
                .await?;
        for (sku, available, reserved, sold) in rows {
            if available + reserved + sold != initial || reserved != 0 {
                problems.push(format!("{sku}: available {available} + reserved {reserved} + sold {sold}, started with {initial}"));
            }
        }
        let twice: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM events \
             WHERE event_type ~ '(StockReserved|StockReleased|StockCommitted)$' \
             GROUP BY causation_id, stream_id HAVING count(*) > 1) AS twice",
        )
        .fetch_one(pool)
        .await?;
        if twice > 0 {
            problems.push(format!("{twice} stock commands moved stock twice"));
        }
        Ok((problems, 0, twice as usize))
    }

    /// Captured only for confirmed orders, once; an authorization for an order that did
    /// not confirm is voided.
    async fn money(
        &self,
        pool: &PgPool,
        statuses: &HashMap<Uuid, String>,
    ) -> anyhow::Result<(Vec<String>, usize, usize)> {
        let mut problems = Vec::new();
        let payments: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT order_id, status FROM payment_statuses")
                .fetch_all(pool)
                .await?;
        for (order_id, payment) in payments {
            let order = statuses.get(&order_id).map_or("unknown", String::as_str);
            let fine = matches!(
                (order, payment.as_str()),
                ("confirmed", "captured")
                    | (_, "declined")
                    | ("cancelled" | "rejected", "voided" | "refunded")
            );
            if !fine {
                problems.push(format!(
                    "order {order_id} is {order} but its payment is {payment}"
                ));
            }
        }
        let captured_twice: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE event_type ~ 'PaymentCaptured$' \
             GROUP BY stream_id HAVING count(*) > 1) AS twice",
        )
        .fetch_one(pool)
        .await?;
        if captured_twice > 0 {
            problems.push(format!("{captured_twice} payments captured twice"));
        }
        Ok((problems, 0, captured_twice as usize))
    }

    /// Each ended order notified once (its customer takes e-mail), and sent.
    async fn notified(
        &self,
        pool: &PgPool,
        found: &Findings,
    ) -> anyhow::Result<(Vec<String>, usize, usize)> {
        let mut problems = Vec::new();
        let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
            "SELECT order_id, count(*), count(sent_at) FROM notifications \
             WHERE order_id IS NOT NULL GROUP BY order_id",
        )
        .fetch_all(pool)
        .await?;
        let ended: usize = found
            .outcomes
            .iter()
            .filter(|(status, _)| *status != "pending")
            .map(|(_, n)| n)
            .sum();
        let twice = rows.iter().filter(|(_, planned, _)| *planned > 1).count();
        let unsent = rows
            .iter()
            .filter(|(_, planned, sent)| sent < planned)
            .count();
        if rows.len() != ended {
            problems.push(format!("{} orders notified, {ended} ended", rows.len()));
        }
        if twice > 0 || unsent > 0 {
            problems.push(format!(
                "{twice} orders notified twice, {unsent} notifications not sent"
            ));
        }
        let lost = ended.saturating_sub(rows.len());
        Ok((problems, lost, twice))
    }

    /// Every outbox row published, no message left in a queue.
    async fn plumbing(
        &self,
        pools: &[(Service, &PgPool)],
    ) -> anyhow::Result<(Vec<String>, usize, usize, u64)> {
        let mut problems = Vec::new();
        for (service, pool) in pools {
            let (rows, oldest): (i64, Option<i64>) = sqlx::query_as(
                "SELECT count(*), min(global_position) FROM outbox WHERE published_at IS NULL",
            )
            .fetch_one(*pool)
            .await?;
            if rows > 0 {
                problems.push(format!(
                    "{service}: {rows} outbox rows not published, the oldest at position {}",
                    oldest.unwrap_or(0)
                ));
            }
        }
        let name = self.cluster.vhost.name.clone();
        let (queued, dead) =
            tokio::task::spawn_blocking(move || crate::queue_depths(&name)).await??;
        if queued > 0 {
            problems.push(format!("{queued} messages still queued"));
        }
        Ok((problems, 0, 0, dead))
    }

    /// Every read model equals a rebuild of it from its event store (DESIGN §8.5).
    async fn rebuilds_equal_live(&self) -> anyhow::Result<Vec<String>> {
        let mut problems = Vec::new();
        let registry = eventstore::SchemaRegistry::builtin()?;
        for projection in projections::rebuild::CATALOG {
            let service = Service::parse(projection.service).map_err(anyhow::Error::msg)?;
            let pool = self.cluster.pool(service).await?;
            let live = digest(&pool, projection.tables).await?;
            let cancel = tokio_util::sync::CancellationToken::new();
            projections::rebuild::rebuild(projection.name, &pool, &registry, 0, |_| {}, &cancel)
                .await?;
            let rebuilt = digest(&pool, projection.tables).await?;
            if live != rebuilt {
                problems.push(format!(
                    "{}: the rebuilt read model differs from the live one",
                    projection.name
                ));
            }
            pool.close().await;
        }
        Ok(problems)
    }
}

/// Row count and md5 of every row of the tables.
async fn digest(pool: &PgPool, tables: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut digests = Vec::new();
    for table in tables {
        let statement = format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
        );
        let digest: String = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
            .fetch_one(pool)
            .await?;
        digests.push(digest);
    }
    Ok(digests)
}
