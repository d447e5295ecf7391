//! Back-pressure (DESIGN §6 and §8.9): past capacity a service refuses commands with
//! 503 `overloaded` and `Retry-After` before it records anything, so what it accepted
//! still completes in time and throughput holds instead of collapsing into queues.
//!
//! A service is over capacity when one of its own backlogs passed its bound:
//! - its outbox holds more unpublished messages than `outbox_backlog`;
//! - a subscription on its store is more than `subscription_lag` events behind;
//! - (order service) more orders than `orders_in_flight` wait for stock or payment,
//!   which is where a slow inventory or payment service shows up;
//! - more than `commands_in_flight` of its commands are being handled at once.
//!
//! The outbox backlog and the orders in flight are counted every [`SAMPLE_EVERY`] while
//! commands arrive (an idle service asks nothing), by the crates that own their tables
//! ([`eventstore::relay::backlog_up_to`], [`sagas::runner::orders_in_flight`]); the lag
//! comes from the subscriptions' monitors, and commands are counted in-process.
//! Queries, health checks, cancellations (they relieve the service) and log-ins (they
//! record nothing) are never refused.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use eventstore::Metrics;
use eventstore::subscription::Lag;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::http::problem::ApiError;
use crate::http::problem::ProblemKind;

/// How often the backlogs are measured while commands arrive.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// What a refused client is told to wait, in seconds.
const RETRY_AFTER_SECONDS: u32 = 1;
/// How long a sample may wait: a database whose pool is taken by the commands in hand
/// cannot answer sooner, and that is itself over capacity.
const SAMPLE_TIMEOUT: Duration = Duration::from_millis(500);

/// The bounds past which a service refuses commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// `ORDERFLOW_MAX_OUTBOX_BACKLOG`: unpublished outbox rows (default 2000).
    pub outbox_backlog: i64,
    /// `ORDERFLOW_MAX_SUBSCRIPTION_LAG`: events a subscription is behind (default 2000).
    pub subscription_lag: i64,
    /// `ORDERFLOW_MAX_ORDERS_IN_FLIGHT`: orders waiting for stock or payment (default
    /// 100: at the 100 orders/s this machine handles with ease, a second of work,
    /// well inside the 30 s payment deadline).
    pub orders_in_flight: i64,
    /// `ORDERFLOW_MAX_COMMANDS_IN_FLIGHT`: commands being handled at once (default 16:
    /// a service has 10 database connections, so more would only wait for one, and at
    /// twice capacity 64 let waiting commands hold the pool for seconds, BENCHMARKS.md).
    pub commands_in_flight: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            outbox_backlog: 2_000,
            subscription_lag: 2_000,
            orders_in_flight: 100,
            commands_in_flight: 16,
        }
    }
}

/// What the backlogs measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub outbox_backlog: i64,
    /// The largest lag of the service's subscriptions.
    pub subscription_lag: i64,
    pub orders_in_flight: i64,
}

/// Why commands are refused: the bound passed and what was measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The bound's name, as the `bound` label of `orderflow_commands_refused`.
    pub bound: &'static str,
    pub detail: String,
}

impl Bounds {
    /// The first bound `sample` passes, if any.
    pub fn judge(&self, sample: &Sample) -> Option<Refusal> {
        let checks = [
            (
                "outbox_backlog",
                sample.outbox_backlog,
                self.outbox_backlog,
                "messages wait in the outbox",
            ),
            (
                "subscription_lag",
                sample.subscription_lag,
                self.subscription_lag,
                "events wait for a projection or the saga",
            ),
            (
                "orders_in_flight",
                sample.orders_in_flight,
                self.orders_in_flight,
                "orders wait for stock or payment",
            ),
        ];
        checks
            .into_iter()
            .find(|(_, measured, bound, _)| measured > bound)
            .map(|(bound, measured, limit, what)| Refusal {
                bound,
                detail: format!("{measured} {what} (bound {limit})"),
            })
    }
}

/// One service's back-pressure: the verdict of the last sample and the commands in
/// hand.
#[derive(Debug)]
pub struct Pressure {
    service: &'static str,
    bounds: Bounds,
    metrics: Metrics,
    verdict: RwLock<Option<Refusal>>,
    in_flight: AtomicUsize,
    /// A command arrived since the last sample.
    demand: AtomicBool,
}

impl Pressure {
    pub fn new(service: &'static str, bounds: Bounds, metrics: Metrics) -> Arc<Self> {
        Arc::new(Pressure {
            service,
            bounds,
            metrics,
            verdict: RwLock::new(None),
            in_flight: AtomicUsize::new(0),
            demand: AtomicBool::new(false),
        })
    }

    /// Admits a command, or says why not. The admission lasts as long as the guard.
    pub fn admit(self: &Arc<Self>) -> Result<InFlight, Refusal> {
        self.demand.store(true, Ordering::Relaxed);
        let refusal = self
            .verdict
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            pressure: self.clone(),
        };
        if before >= self.bounds.commands_in_flight {
            drop(guard);
            return Err(Refusal {
                bound: "commands_in_flight",
                detail: format!(
                    "{before} commands are being handled (bound {})",
                    self.bounds.commands_in_flight
                ),
            });
        }
        Ok(guard)
    }

    fn judge(&self, sample: &Sample) {
        self.set(self.bounds.judge(sample));
    }

    fn refuse(&self, refusal: Refusal) {
        self.set(Some(refusal));
    }

    fn set(&self, verdict: Option<Refusal>) {
        if let Some(refusal) = &verdict {
            tracing::debug!(service = self.service, reason = %refusal.detail, "refusing commands");
        }
        *self
            .verdict
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verdict;
    }

    /// Measures the service's backlogs every [`SAMPLE_EVERY`] while commands arrive or
    /// while it refuses them, until `shutdown`. `lags` are its subscriptions' monitors;
    /// `counts_orders` for the order service.
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        lags: Vec<watch::Receiver<Lag>>,
        counts_orders: bool,
        shutdown: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let refusing = self
                .verdict
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some();
            if !self.demand.swap(false, Ordering::Relaxed) && !refusing {
                continue;
            }
            let measured =
                tokio::time::timeout(SAMPLE_TIMEOUT, measure(&pool, &self.bounds, counts_orders))
                    .await;
            match measured {
                Err(_) => self.refuse(Refusal {
                    bound: "database",
                    detail: format!(
                        "the database did not count the backlog within {} ms",
                        SAMPLE_TIMEOUT.as_millis()
                    ),
                }),
                Ok(Ok((outbox_backlog, orders_in_flight))) => {
                    let subscription_lag = lags
                        .iter()
                        .map(|lag| lag.borrow().events)
                        .max()
                        .unwrap_or(0);
                    self.judge(&Sample {
                        outbox_backlog,
                        subscription_lag,
                        orders_in_flight,
                    });
                }
                // The last verdict stands; the database's trouble shows elsewhere.
                Ok(Err(error)) => {
                    tracing::warn!(service = self.service, %error, "cannot measure the backlog");
                }
            }
        }
    }
}

/// The outbox backlog and the orders in flight, each counted no further than one past
/// its bound, on one connection: a saturated pool is waited for once, as when this was
/// one statement, so the 500 ms limit does not turn into two waits.
async fn measure(
    pool: &PgPool,
    bounds: &Bounds,
    counts_orders: bool,
) -> Result<(i64, i64), sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let backlog =
        eventstore::relay::backlog_up_to(&mut *connection, bounds.outbox_backlog.saturating_add(1))
            .await?;
    let in_flight = if counts_orders {
        sagas::runner::orders_in_flight(&mut *connection, bounds.orders_in_flight.saturating_add(1))
            .await?
    } else {
        0
    };
    Ok((backlog, in_flight))
}

/// A command being handled; counted until dropped.
#[derive(Debug)]
pub struct InFlight {
    pressure: Arc<Pressure>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pressure.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a request is never refused: a query, a cancellation (it relieves the
/// service: a cancelled order leaves the orders in flight) or a log-in (it records
/// nothing).
fn exempt(request: &Request) -> bool {
    let path = request.uri().path();
    request.method().is_safe() || path.ends_with("/cancel") || path.ends_with("/auth/token")
}

/// Middleware: refuses a command (any method but GET, HEAD and OPTIONS, except a
/// cancellation or a log-in) with 503 `overloaded` while the service is over a bound.
pub async fn admit(
    State(pressure): State<Arc<Pressure>>,
    request: Request,
    next: Next,
) -> Response {
    if exempt(&request) {
        return next.run(request).await;
    }
    match pressure.admit() {
        Ok(_in_flight) => next.run(request).await,
        Err(refusal) => {
            pressure
                .metrics
                .command_refused(pressure.service, refusal.bound);
            ApiError::unavailable(
                ProblemKind::Overloaded,
                format!(
                    "the {} service is over capacity: {}; nothing was recorded, try again later",
                    pressure.service, refusal.detail
                ),
                RETRY_AFTER_SECONDS,
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            outbox_backlog: 10,
            subscription_lag: 20,
            orders_in_flight: 30,
            commands_in_flight: 2,
        }
    }

    #[test]
    fn a_sample_at_its_bounds_is_admitted() {
        let sample = Sample {
            outbox_backlog: 10,
            subscription_lag: 20,
            orders_in_flight: 30,
        };
        assert_eq!(bounds().judge(&sample), None);
    }

    #[test]
    fn each_bound_passed_refuses_and_names_itself() {
        let at_bounds = Sample {
            outbox_backlog: 10,
            subscription_lag: 20,
            orders_in_flight: 30,
        };
        let cases = [
            (
                Sample {
                    outbox_backlog: 11,
                    ..at_bounds
                },
                "outbox_backlog",
            ),
            (
                Sample {
                    subscription_lag: 21,
                    ..at_bounds
                },
                "subscription_lag",
            ),
            (
                Sample {
                    orders_in_flight: 31,
                    ..at_bounds
                },
                "orders_in_flight",
            ),
        ];
        for (sample, bound) in cases {
            let refusal = bounds().judge(&sample).expect("refused");
            assert_eq!(refusal.bound, bound);
            assert!(refusal.detail.contains("bound"), "{}", refusal.detail);
        }
    }

    #[test]
    fn commands_in_flight_are_counted_until_their_guard_drops() {
        let pressure = Pressure::new("order", bounds(), Metrics::new());
        let first = pressure.admit().expect("first admitted");
        let second = pressure.admit().expect("second admitted");
        let third = pressure.admit().expect_err("third refused");
        assert_eq!(third.bound, "commands_in_flight");
        drop(first);
        let again = pressure.admit().expect("admitted once one finished");
        drop((second, again));
        assert_eq!(pressure.in_flight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn queries_cancellations_and_log_ins_are_never_refused() {
        let request = |method: &str, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
                .expect("a request")
        };
        assert!(exempt(&request("GET", "/orders/1")));
        assert!(exempt(&request("POST", "/orders/1/cancel")));
        assert!(exempt(&request("POST", "/auth/token")));
        assert!(!exempt(&request("POST", "/orders")));
        assert!(!exempt(&request("POST", "/inventory/items")));
        assert!(!exempt(&request("PUT", "/users/1/profile")));
    }

    #[test]
    fn a_sampled_verdict_refuses_until_a_sample_clears_it() {
        let pressure = Pressure::new("order", bounds(), Metrics::new());
        pressure.judge(&Sample {
            outbox_backlog: 11,
            ..Sample::default()
        });
        assert_eq!(
            pressure.admit().expect_err("refused").bound,
            "outbox_backlog"
        );
        pressure.judge(&Sample::default());
        assert!(pressure.admit().is_ok());
    }
}
