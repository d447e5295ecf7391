//! `orderflow load`: drives running services over HTTP at a fixed rate and measures
//! what a client sees.
//!
//! It first creates stock items, then sends commands on an open-loop schedule (the
//! i-th command is due at `start + i / rate`, whatever happened to earlier ones, and
//! its latencies count from that moment, so a stalled server cannot hide its stall by
//! slowing the generator down). The mix: nine in ten commands place an order, one in
//! ten adds stock. Each command that succeeds is followed by a read-your-writes query
//! for what it wrote (`?min_version=`); the time from the command's due moment to
//! that query's answer is the command-to-read-model latency. Alongside, plain queries
//! (a customer's orders, an item's levels) run at `query_ratio` per command.
//!
//! With `outcome`, an order's query waits instead for the order's next version, which
//! is how it ended (confirmed, rejected or cancelled by the order-fulfilment saga,
//! across the order, inventory and payment services): the order-to-outcome latency.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::Rng;
use rand::seq::IndexedRandom;
use reqwest::{Client, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

/// What to drive, how hard and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub order_url: String,
    pub inventory_url: String,
    /// Commands per second.
    pub rate: f64,
    /// The measured part of the run.
    pub duration: Duration,
    /// Run before measuring; its samples are dropped.
    pub warmup: Duration,
    pub skus: usize,
    pub customers: usize,
    /// Plain queries per command.
    pub query_ratio: f64,
    /// Requests in flight at most; beyond it, due commands wait (and their wait counts).
    pub max_in_flight: usize,
    /// Follow each order to its outcome rather than to its own write.
    pub outcome: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            count: samples.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: samples[samples.len() - 1],
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

/// What a run measured (warm-up excluded).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target_rate: f64,
    pub seconds: f64,
    pub commands_ok: usize,
    pub commands_failed: usize,
    /// Commands the service refused with 503 `overloaded` (back-pressure): nothing of
    /// them was recorded.
    pub commands_refused: usize,
    /// Commands that succeeded, per second of the measured window.
    pub command_rate: f64,
    pub queries_ok: usize,
    pub queries_failed: usize,
    /// Read-your-writes queries that answered 503: the read model was over 2 s behind.
    pub read_model_behind: usize,
    pub command: Latency,
    pub command_to_read_model: Latency,
    /// From `POST /orders` to the order reading its outcome (with `outcome` only).
    pub order_to_outcome: Latency,
    /// How the followed orders ended: (status, count), by status.
    pub outcomes: Vec<(String, usize)>,
    pub query: Latency,
    /// The first few failures, for the operator.
    pub failures: Vec<String>,
    /// CPU time stolen by the hypervisor during the window, in percent of all CPU time.
    pub cpu_steal_percent: Option<f64>,
    /// CPU busy (not idle, not stolen) during the window, in percent.
    pub cpu_busy_percent: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = |p: Option<f64>| p.map_or("unknown".to_owned(), |p| format!("{p:.1} %"));
        writeln!(
            f,
            "target {:.0} commands/s; measured {:.1} s",
            self.target_rate, self.seconds
        )?;
        writeln!(
            f,
            "commands: {} ok, {} failed, {} refused (overloaded), {:.1}/s accepted; {}",
            self.commands_ok,
            self.commands_failed,
            self.commands_refused,
            self.command_rate,
            self.command
        )?;
        writeln!(
            f,
            "command to read model: {}; {} not caught up within 2 s",
            self.command_to_read_model, self.read_model_behind
        )?;
        if self.order_to_outcome.count > 0 {
            let ended: Vec<String> = self
                .outcomes
                .iter()
                .map(|(status, count)| format!("{count} {status}"))
                .collect();
            writeln!(
                f,
                "order to outcome: {}; {}",
                self.order_to_outcome,
                ended.join(", ")
            )?;
        }
        writeln!(
            f,
            "queries: {} ok, {} failed; {}",
            self.queries_ok, self.queries_failed, self.query
        )?;
        write!(
            f,
            "cpu: steal {}, busy {}",
            percent(self.cpu_steal_percent),
            percent(self.cpu_busy_percent)
        )?;
        for failure in &self.failures {
            write!(f, "\nfailure: {failure}")?;
        }
        Ok(())
    }
}

/// Samples of one run, shared by its request tasks.
#[derive(Default)]
struct Samples {
    command: Vec<f64>,
    read_model: Vec<f64>,
    outcome: Vec<f64>,
    outcomes: std::collections::BTreeMap<String, usize>,
    query: Vec<f64>,
    commands_failed: usize,
    commands_refused: usize,
    queries_failed: usize,
    read_model_behind: usize,
    failures: Vec<String>,
}

impl Samples {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 5 {
            self.failures.push(what);
        }
    }
}

struct Run {
    config: LoadConfig,
    http: Client,
    skus: Vec<String>,
    customers: Vec<Uuid>,
    /// Only commands due at or after this are measured (before it: warm-up).
    measure_from: Instant,
    samples: Mutex<Samples>,
}

/// Creates the stock, runs the load and reports. `progress` gets a line now and then.
pub async fn run(config: LoadConfig, progress: impl Fn(String)) -> anyhow::Result<Report> {
    if !config.rate.is_finite() || config.rate <= 0.0 {
        bail!("--rate must be a number above 0");
    }
    let http = Client::builder()
        .pool_max_idle_per_host(config.max_in_flight)
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let prefix = format!("LOAD-{}", &Uuid::now_v7().simple().to_string()[20..]);
    let skus: Vec<String> = (0..config.skus).map(|i| format!("{prefix}-{i}")).collect();
    progress(format!("creating {} stock items", skus.len()));
    for sku in &skus {
        let url = format!("{}/inventory/items", config.inventory_url);
        let body = json!({ "sku": sku, "name": "load test item", "quantity": 1_000_000 });
        let response = http
            .post(&url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach the inventory service at {url}"))?;
        if !response.status().is_success() {
            bail!(
                "creating stock failed: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
    }
    let customers = (0..config.customers).map(|_| Uuid::now_v7()).collect();
    let started = Instant::now();
    let run = Arc::new(Run {
        measure_from: started + config.warmup,
        config: config.clone(),
        http,
        skus,
        customers,
        samples: Mutex::new(Samples::default()),
    });
    let total = config.warmup + config.duration;
    let count = (total.as_secs_f64() * config.rate).round() as u64;
    let slots = Arc::new(Semaphore::new(config.max_in_flight));
    let mut stat_before = None;
    let mut next_report = started + Duration::from_secs(5);
    let mut tasks = tokio::task::JoinSet::new();
    let mut owed_queries = 0.0;
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / config.rate);
        tokio::time::sleep_until(due.into()).await;
        if stat_before.is_none() && due >= run.measure_from {
            stat_before = cpu_times();
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(5);
            let samples = run.samples.lock().await;
            progress(format!(
                "{:.0} s: {} commands sent, {} failed, {} requests in flight",
                started.elapsed().as_secs_f64(),
                i,
                samples.commands_failed,
                config.max_in_flight - slots.available_permits(),
            ));
        }
        let permit = slots.clone().acquire_owned().await?;
        let task_run = run.clone();
        tasks.spawn(async move {
            task_run.command(due).await;
            drop(permit);
        });
        owed_queries += config.query_ratio;
        while owed_queries >= 1.0 {
            owed_queries -= 1.0;
            let permit = slots.clone().acquire_owned().await?;
            let task_run = run.clone();
            tasks.spawn(async move {
                task_run.query(due).await;
                drop(permit);
            });
        }
    }
    let window_end = Instant::now();
    let stat_after = cpu_times();
    while tasks.join_next().await.is_some() {}
    let seconds = window_end
        .saturating_duration_since(run.measure_from)
        .as_secs_f64()
        .max(f64::EPSILON);
    let samples = std::mem::take(&mut *run.samples.lock().await);
    let (steal, busy) = match (stat_before, stat_after) {
        (Some(before), Some(after)) => {
            let (steal, busy) = cpu_share(&before, &after);
            (Some(steal), Some(busy))
        }
        _ => (None, None),
    };
    Ok(Report {
        target_rate: config.rate,
        seconds,
        commands_ok: samples.command.len(),
        commands_failed: samples.commands_failed,
        commands_refused: samples.commands_refused,
        command_rate: samples.command.len() as f64 / seconds,
        queries_ok: samples.query.len(),
        queries_failed: samples.queries_failed,
        read_model_behind: samples.read_model_behind,
        command: Latency::of(samples.command),
        command_to_read_model: Latency::of(samples.read_model),
        order_to_outcome: Latency::of(samples.outcome),
        outcomes: samples.outcomes.into_iter().collect(),
        query: Latency::of(samples.query),
        failures: samples.failures,
        cpu_steal_percent: steal,
        cpu_busy_percent: busy,
    })
}

impl Run {
    fn measured(&self, due: Instant) -> bool {
        due >= self.measure_from
    }

    fn millis_since(due: Instant) -> f64 {
        due.elapsed().as_secs_f64() * 1000.0
    }

    /// One command, then the read-your-writes query for what it wrote.
    async fn command(&self, due: Instant) {
        let (post, body, read) = {
            let mut rng = rand::rng();
            if rng.random_bool(0.9) {
                let lines: Vec<Value> = (0..rng.random_range(1..=3))
                    .map(|_| {
                        json!({
                            "sku": self.skus.choose(&mut rng),
                            "quantity": rng.random_range(1..=3),
                            "unit_price_cents": rng.random_range(100..10_000),
                        })
                    })
                    .collect();
                let body = json!({
                    "customer_id": self.customers.choose(&mut rng),
                    "lines": lines,
                    "card_token": "tok_visa",
                });
                (format!("{}/orders", self.config.order_url), body, None)
            } else {
                let sku = self.skus.choose(&mut rng).cloned().unwrap_or_default();
                let read = format!("{}/inventory/items/{sku}", self.config.inventory_url);
                let body = json!({ "sku": sku, "quantity": 1 });
                (
                    format!("{}/inventory/items", self.config.inventory_url),
                    body,
                    Some(read),
                )
            }
        };
        let answer = self.http.post(&post).json(&body).send().await;
        let command_ms = Self::millis_since(due);
        let reply = match answer {
            Ok(response) if response.status().is_success() => response.json::<Value>().await,
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                let text = response.text().await.unwrap_or_default();
                if text.contains("urn:orderflow:problem:overloaded") {
                    if self.measured(due) {
                        self.samples.lock().await.commands_refused += 1;
                    }
                } else {
                    self.failed_command(due, format!("POST {post}: 503 {text}"))
                        .await;
                }
                return;
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                self.failed_command(due, format!("POST {post}: {status} {text}"))
                    .await;
                return;
            }
            Err(error) => {
                self.failed_command(due, format!("POST {post}: {error}"))
                    .await;
                return;
            }
        };
        let Ok(reply) = reply else {
            self.failed_command(due, format!("POST {post}: unreadable answer"))
                .await;
            return;
        };
        if self.measured(due) {
            self.samples.lock().await.command.push(command_ms);
        }
        let mut version = reply["version"].as_i64().unwrap_or(0);
        let outcome = read.is_none() && self.config.outcome;
        if outcome {
            // The order's next event is its outcome.
            version += 1;
        }
        let read = read.unwrap_or_else(|| {
            let order_id = reply["order_id"].as_str().unwrap_or_default();
            format!("{}/orders/{order_id}", self.config.order_url)
        });
        let answer = self
            .http
            .get(&read)
            .query(&[("min_version", version)])
            .send()
            .await;
        let read_ms = Self::millis_since(due);
        if !self.measured(due) {
            return;
        }
        let answer = match answer {
            Ok(response) if outcome && response.status() == StatusCode::OK => {
                let order = response.json::<Value>().await.unwrap_or_default();
                let status = order["status"].as_str().unwrap_or("unreadable").to_owned();
                let mut samples = self.samples.lock().await;
                samples.outcome.push(read_ms);
                *samples.outcomes.entry(status).or_default() += 1;
                return;
            }
            other => other,
        };
        let mut samples = self.samples.lock().await;
        match answer {
            Ok(response) if response.status() == StatusCode::OK => samples.read_model.push(read_ms),
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                samples.read_model_behind += 1;
            }
            Ok(response) => {
                samples.queries_failed += 1;
                samples.fail(format!("GET {read}: {}", response.status()));
            }
            Err(error) => {
                samples.queries_failed += 1;
                samples.fail(format!("GET {read}: {error}"));
            }
        }
    }

    async fn failed_command(&self, due: Instant, what: String) {
        if self.measured(due) {
            let mut samples = self.samples.lock().await;
            samples.commands_failed += 1;
            samples.fail(what);
        }
    }

    /// A plain query: a customer's latest orders, or an item's levels.
    async fn query(&self, due: Instant) {
        let url = {
            let mut rng = rand::rng();
            if rng.random_bool(0.5) {
                let customer = self.customers.choose(&mut rng).copied().unwrap_or_default();
                format!(
                    "{}/customers/{customer}/orders?limit=10",
                    self.config.order_url
                )
            } else {
                let sku = self.skus.choose(&mut rng).cloned().unwrap_or_default();
                format!("{}/inventory/items/{sku}", self.config.inventory_url)
            }
        };
        let answer = self.http.get(&url).send().await;
        let ms = Self::millis_since(due);
        if !self.measured(due) {
            return;
        }
        let mut samples = self.samples.lock().await;
        match answer {
            Ok(response) if response.status() == StatusCode::OK => samples.query.push(ms),
            Ok(response) => {
                samples.queries_failed += 1;
                samples.fail(format!("GET {url}: {}", response.status()));
            }
            Err(error) => {
                samples.queries_failed += 1;
                samples.fail(format!("GET {url}: {error}"));
            }
        }
    }
}

/// The `cpu` line of `/proc/stat`: user, nice, system, idle, iowait, irq, softirq,
/// steal (in ticks), or `None` where there is no such file.
fn cpu_times() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|field| field.parse().ok())
            .collect(),
    )
}

/// Steal and busy shares (percent) between two `cpu_times` readings.
fn cpu_share(before: &[u64], after: &[u64]) -> (f64, f64) {
    let delta: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = delta.iter().sum();
    if total == 0 || delta.len() < 8 {
        return (0.0, 0.0);
    }
    let idle = delta[3] + delta[4];
    let steal = delta[7];
    let busy = total - idle - steal;
    (
        steal as f64 * 100.0 / total as f64,
        busy as f64 * 100.0 / total as f64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranked_samples() {
        let latency = Latency::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(latency.count, 100);
        assert_eq!(latency.p50_ms, 51.0);
        assert_eq!(latency.p99_ms, 99.0);
        assert_eq!(latency.max_ms, 100.0);
        assert_eq!(Latency::of(Vec::new()).count, 0);
    }

    #[test]
    fn cpu_shares_split_ticks() {
        let before = [0, 0, 0, 0, 0, 0, 0, 0];
        let after = [30, 0, 10, 50, 0, 0, 0, 10];
        assert_eq!(cpu_share(&before, &after), (10.0, 40.0));
    }
}
