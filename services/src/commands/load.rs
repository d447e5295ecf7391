//! `orderflow load`: drive running services at a fixed rate and report latencies.

use std::process::ExitCode;
use std::time::Duration;

use services::load::LoadConfig;

use crate::cli::LoadArgs;

pub(crate) async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let seconds = |name: &str, value: f64| {
        Duration::try_from_secs_f64(value)
            .map_err(|_| anyhow::anyhow!("--{name} must be a number of seconds"))
    };
    if args.skus == 0 || args.customers == 0 || args.max_in_flight == 0 {
        anyhow::bail!("--skus, --customers and --max-in-flight must be at least 1");
    }
    let config = LoadConfig {
        order_url: args.order_url.trim_end_matches('/').to_owned(),
        inventory_url: args.inventory_url.trim_end_matches('/').to_owned(),
        rate: args.rate,
        duration: seconds("duration", args.duration)?,
        warmup: seconds("warmup", args.warmup)?,
        skus: args.skus,
        customers: args.customers,
        query_ratio: args.query_ratio.max(0.0),
        max_in_flight: args.max_in_flight,
        outcome: args.outcome,
    };
    let report = services::load::run(config, |line| eprintln!("load: {line}")).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
