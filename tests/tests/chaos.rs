//! The short chaos run (issue 8): about two minutes of orders through the gateway while
//! processes are killed and paused, the relay leader dies, broker connections close,
//! the broker and PostgreSQL restart and the e-mail provider slows down; then every
//! invariant of DESIGN §8 is checked exactly (see `tests::chaos`).
//!
//! Broker and database restarts touch the whole machine, which is why this is a test
//! binary of its own: `cargo test` runs test binaries one after another.

use std::time::Duration;

use tests::chaos::{Fault, Settings, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_every_kind_of_fault_and_every_invariant_holds() {
    let settings = Settings {
        duration: Duration::from_secs(110),
        rate: 3.0,
        fault_every: Duration::from_secs(8),
        faults: Fault::ALL.to_vec(),
        order_instances: 3,
        ..Settings::default()
    };
    let report = run(settings, |line| eprintln!("chaos: {line}"))
        .await
        .expect("the chaos run completes");
    eprintln!("{}", report.summary());
    assert!(
        report.problems.is_empty(),
        "broken invariants: {:#?}",
        report.problems
    );
    assert_eq!((report.lost, report.duplicated), (0, 0));
    assert!(
        report.orders >= 300,
        "only {} orders were placed",
        report.orders
    );
    let faults: usize = report.faults.values().sum();
    assert!(
        faults >= 10,
        "only {faults} faults were injected: {:?}",
        report.faults
    );
    assert!(
        report.faults.len() >= 5,
        "faults of only {} kinds: {:?}",
        report.faults.len(),
        report.faults
    );
    // Every broker and database outage was seen through readiness and recovered from
    // without a restart (a failure to is among the problems above).
    let count = |fault| report.faults.get(&fault).copied().unwrap_or(0);
    assert_eq!(
        report.outages,
        count(Fault::RestartBroker) + count(Fault::RestartDatabase)
    );
    // Every order was accepted in the end (the load retries with its key until it is)
    // and reached an outcome.
    assert_eq!(report.orders, report.commands);
    assert_eq!(report.outcomes.values().sum::<usize>(), report.orders);
}
