//! `chaos`: the chaos harness from the command line (`scripts/chaos` builds and runs
//! it). Runs the whole system, breaks it at random while orders flow, and checks
//! DESIGN §8 once it settles; exits 1 when anything was lost, doubled or left over.

use std::time::Duration;

use clap::Parser;
use tests::chaos::{Fault, Settings, run};

#[derive(Parser)]
#[command(about = "Runs orderflow under load while injecting faults, then checks every invariant")]
struct Arguments {
    /// Seconds of load and faults.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Orders per second.
    #[arg(long, default_value_t = 3.0)]
    rate: f64,
    /// Seconds between faults (the n-th falls due n times this after the start, ± 40 %).
    #[arg(long, default_value_t = 10.0)]
    fault_every: f64,
    /// Which faults, comma-separated: kill, order, leader, pause, connections, broker,
    /// database, slow. `--faults order --order-instances 3` measures availability while
    /// order instances die one at a time.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,order,leader,pause,connections,broker,database,slow"
    )]
    faults: Vec<String>,
    /// Instances of the order service.
    #[arg(long, default_value_t = 2)]
    order_instances: usize,
    /// Seconds the system may take to settle after the last fault.
    #[arg(long, default_value_t = 180)]
    settle_within: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() {
    let arguments = Arguments::parse();
    let mut faults = Vec::new();
    for name in &arguments.faults {
        match Fault::parse(name) {
            Some(fault) => faults.push(fault),
            None => {
                eprintln!(
                    "chaos: unknown fault {name:?} (kill, order, leader, pause, connections, broker, database, slow)"
                );
                std::process::exit(2);
            }
        }
    }
    if !(arguments.rate > 0.0 && arguments.fault_every > 0.0) {
        eprintln!("chaos: --rate and --fault-every must be above 0");
        std::process::exit(2);
    }
    let settings = Settings {
        duration: Duration::from_secs(arguments.duration),
        rate: arguments.rate,
        fault_every: Duration::from_secs_f64(arguments.fault_every),
        faults,
        order_instances: arguments.order_instances.max(1),
        settle_within: Duration::from_secs(arguments.settle_within),
        ..Settings::default()
    };
    // Interrupted, the run is dropped: its processes, databases and virtual host go.
    let outcome = tokio::select! {
        outcome = run(settings, |line| eprintln!("chaos: {line}")) => Some(outcome),
        _ = interrupted() => None,
    };
    let report = match outcome {
        Some(Ok(report)) => report,
        None => {
            eprintln!("chaos: interrupted; the system was stopped and removed");
            std::process::exit(130);
        }
        Some(Err(error)) => {
            eprintln!("chaos: {error:#}");
            std::process::exit(1);
        }
    };
    if arguments.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serializes")
        );
    } else {
        println!("{}", report.summary());
    }
    if !report.problems.is_empty() {
        std::process::exit(1);
    }
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
